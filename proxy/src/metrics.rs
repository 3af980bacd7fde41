//! The proxy's metrics, and the registry the admin listener serves. Labels are bounded:
//! configured route names, status classes, outcomes, error kinds.

use std::sync::Arc;

use custody_audit::{AuditStats, Exchange};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: Arc<str>,
    status_class: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: Arc<str>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamErrorLabels {
    route: Arc<str>,
    kind: &'static str,
}

type Histograms = Family<RouteLabels, Histogram, fn() -> Histogram>;

/// Request counts and latencies, updated once per exchange as it ends.
pub struct ProxyMetrics {
    requests: Family<RequestLabels, Counter>,
    duration: Histograms,
    ttfb: Histograms,
    overhead: Histograms,
    upstream_errors: Family<UpstreamErrorLabels, Counter>,
    pub connections: Gauge,
    /// Connections closed at accept: past the cap and its overflow, on either listener.
    pub connections_refused: Counter,
    pub audit: Arc<AuditStats>,
}

fn latency() -> Histogram {
    Histogram::new([
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    ])
}

fn overhead() -> Histogram {
    Histogram::new([
        0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05,
    ])
}

impl ProxyMetrics {
    pub fn new(audit: Arc<AuditStats>) -> Self {
        Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(latency),
            ttfb: Family::new_with_constructor(latency),
            overhead: Family::new_with_constructor(overhead),
            upstream_errors: Family::default(),
            connections: Gauge::default(),
            connections_refused: Counter::default(),
            audit,
        }
    }

    /// Every metric, for `/metrics`.
    pub fn registry(&self) -> Registry {
        let mut r = Registry::default();
        r.register(
            "custody_requests",
            "Requests by route, status class and outcome",
            self.requests.clone(),
        );
        r.register(
            "custody_request_duration_seconds",
            "From the request head to the end of the response",
            self.duration.clone(),
        );
        r.register(
            "custody_time_to_first_byte_seconds",
            "From the request head to the upstream's response head",
            self.ttfb.clone(),
        );
        r.register(
            "custody_overhead_seconds",
            "Time spent in custody itself: admission, routing and rewriting before the upstream request, and handing the response head back",
            self.overhead.clone(),
        );
        r.register(
            "custody_upstream_errors",
            "Upstream failures by route and kind (unreachable, timeout, body)",
            self.upstream_errors.clone(),
        );
        r.register(
            "custody_connections",
            "Client connections open",
            self.connections.clone(),
        );
        r.register(
            "custody_connections_refused",
            "Connections closed as soon as accepted: past the connection cap and its overflow",
            self.connections_refused.clone(),
        );
        self.audit.register(&mut r);
        r
    }

    /// Counts an exchange as it ends.
    pub fn observe(&self, ex: &Exchange) {
        let route: Arc<str> = ex.route.clone().unwrap_or_else(|| Arc::from("none"));
        let status_class = match ex.status.map(|s| s.as_u16() / 100) {
            Some(1) => "1xx",
            Some(2) => "2xx",
            Some(3) => "3xx",
            Some(4) => "4xx",
            Some(5) => "5xx",
            _ => "none",
        };
        let outcome = ex.outcome.as_str();
        let kind = match (outcome, &ex.error) {
            ("upstream_timeout", _) => Some("timeout"),
            ("upstream_error", Some(e)) if e.starts_with("upstream body") => Some("body"),
            ("upstream_error", _) => Some("unreachable"),
            _ => None,
        };
        if let Some(kind) = kind {
            let labels = UpstreamErrorLabels {
                route: route.clone(),
                kind,
            };
            self.upstream_errors.get_or_create(&labels).inc();
        }
        let labels = RequestLabels {
            route: route.clone(),
            status_class,
            outcome,
        };
        self.requests.get_or_create(&labels).inc();
        let route = RouteLabels { route };
        let since = |t: Option<std::time::Instant>| {
            t.map(|t| t.saturating_duration_since(ex.started).as_secs_f64())
        };
        if let Some(d) = since(ex.ended_at) {
            self.duration.get_or_create(&route).observe(d);
        }
        if let Some(d) = since(ex.response_head_at) {
            self.ttfb.get_or_create(&route).observe(d);
        }
        if let Some(before) = since(ex.upstream_sent_at) {
            let after = match (ex.response_head_at, ex.response_returned_at) {
                (Some(h), Some(r)) => r.saturating_duration_since(h).as_secs_f64(),
                _ => 0.0,
            };
            self.overhead.get_or_create(&route).observe(before + after);
        }
    }
}
