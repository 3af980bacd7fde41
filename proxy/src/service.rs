//! The per-request path: route, rewrite, tee both bodies, forward, map failures.
//! Nothing here parses JSON, redacts or blocks; the writer does the heavy work. The
//! one exception is opt-in: a route an enforcing `block` or `sanitize` policy applies
//! to reads its request body first ([`crate::policy`]).

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use custody_audit::{
    exchange::RequestDecided,
    policy::{
        request::{Checked, RequestHead, RequestPolicy},
        PolicySet,
    },
    AuditSender, Capture, Exchange, Outcome,
};
use custody_config::{Config, Provider};
use http::{Request, Response, Version};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;

use crate::{
    admission::{Admission, Admit},
    error::Refusal,
    keys::{self, KeyTable},
    metrics::ProxyMetrics,
    policy::{self as guard, Replay},
    route::Router,
    tee::{Handoff, InFlight, Reporter, Side, TeeBody},
    timeout::{Limited, Limits},
    trace,
    upstream::{self, Connector},
    ProxyError,
};

/// What custody answers with: the upstream's body, teed, or its own JSON error.
pub type ProxyBody = Either<TeeBody<Limited<Incoming>>, Full<Bytes>>;

/// What goes upstream: the client's body as it streams in, or, when custody had to
/// read it first (a key restricted to some models, a request policy), the bytes it
/// read (or the sanitized body) and the rest.
pub type RequestBody = Either<Limited<Incoming>, Replay>;

/// The part of the configuration that a reload replaces, swapped atomically: each
/// request works with the one it loaded at admission.
pub struct Active {
    router: Router,
    keys: KeyTable,
    version: Arc<str>,
    response_timeout: Duration,
    upstream_idle: Option<Duration>,
    total: Option<Duration>,
    limits: custody_config::Limits,
    /// Enforcing `block` and `sanitize` rules, when the configuration has any.
    policy: Option<Arc<RequestPolicy>>,
}

impl Active {
    /// Resolves routes and keys (reading provider keys from the environment).
    pub fn new(config: &Config, version: &str) -> Result<Self, ProxyError> {
        Ok(Self {
            router: Router::new(&config.routes)?,
            keys: KeyTable::from_config(config)?,
            version: Arc::from(version),
            response_timeout: Duration::from_secs(config.upstream.response_timeout_secs),
            upstream_idle: secs(config.upstream.idle_timeout_secs),
            total: secs(config.upstream.total_timeout_secs),
            limits: config.limits.clone(),
            policy: request_policy(config)?,
        })
    }
}

/// The request path's rules; a rule that does not compile refuses the configuration.
fn request_policy(config: &Config) -> Result<Option<Arc<RequestPolicy>>, ProxyError> {
    let set = PolicySet::from_config(config).map_err(custody_audit::AuditError::from)?;
    Ok(RequestPolicy::new(config, Arc::new(set))?.map(Arc::new))
}

/// A limit in seconds, `0` meaning none.
fn secs(n: u64) -> Option<Duration> {
    (n > 0).then(|| Duration::from_secs(n))
}

/// State shared by every connection.
pub struct Shared {
    active: ArcSwap<Active>,
    client: Client<Connector, Handoff<TeeBody<RequestBody>>>,
    reporter: Arc<Reporter>,
    pub admission: Admission,
    capture_max: usize,
    /// `durability = "durable"`: responses end only once their record is fsynced.
    durable: bool,
}

impl Shared {
    pub fn new(
        config: &Config,
        audit: AuditSender,
        metrics: Arc<ProxyMetrics>,
        version: &str,
    ) -> Result<Self, ProxyError> {
        Ok(Self {
            active: ArcSwap::from_pointee(Active::new(config, version)?),
            client: upstream::client(
                Duration::from_secs(config.upstream.connect_timeout_secs),
                Duration::from_secs(config.upstream.pool_idle_timeout_secs),
                config.upstream.ca_file.as_deref(),
            )?,
            admission: Admission::new(&config.audit, metrics.audit.clone()),
            reporter: Arc::new(Reporter {
                audit,
                metrics,
                log_exchanges: config.log.exchanges,
            }),
            capture_max: config.audit.capture_max_bytes,
            durable: config.audit.durability == custody_config::Durability::Durable,
        })
    }

    pub fn metrics(&self) -> &Arc<ProxyMetrics> {
        &self.reporter.metrics
    }

    /// Makes `active` the configuration of every request admitted from now on.
    pub fn swap(&self, active: Active) {
        self.active.store(Arc::new(active));
    }
}

/// The service for one client connection.
#[derive(Clone)]
pub struct ProxyService {
    pub shared: Arc<Shared>,
    pub remote: SocketAddr,
    /// Accepted beyond `[limits] max_connections`: every request gets a 503.
    pub over_capacity: bool,
    /// Told when a request arrives (the connection is no longer silent).
    pub seen: crate::connection::Seen,
}

impl hyper::service::Service<Request<Incoming>> for ProxyService {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        self.seen.mark();
        let shared = self.shared.clone();
        let remote = self.remote;
        let over = self.over_capacity;
        Box::pin(async move { Ok(proxy(shared, remote, over, req).await) })
    }
}

async fn proxy(
    shared: Arc<Shared>,
    remote: SocketAddr,
    over_capacity: bool,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let active = shared.active.load_full();
    let (mut parts, body) = req.into_parts();
    let mut ex = Exchange::begin(
        parts.method.clone(),
        parts.uri.clone(),
        parts.headers.clone(),
        Some(remote),
    );
    ex.config_version = Some(active.version.clone());
    let audit = &shared.reporter;
    let target = active.router.find(parts.uri.path());
    match shared.admission.admit().await {
        Admit::Audited(permit) => ex.permit = Some(permit),
        Admit::Unaudited => {}
        Admit::Refused => {
            let provider = target.map_or(Provider::Generic, |t| t.provider);
            drain(body).await;
            return refuse(ex, audit, Refusal::AuditQueueFull, provider, None);
        }
    }
    // Never forwarded, whatever the route: a method no provider uses, or a path that
    // could mean another route's once the upstream normalizes it.
    let unsafe_request = if !crate::route::method_allowed(&parts.method) {
        Some(Refusal::MethodNotAllowed)
    } else if crate::route::ambiguous_path(parts.uri.path()) {
        Some(Refusal::AmbiguousPath)
    } else {
        None
    };
    if let Some(refusal) = unsafe_request {
        let provider = target.map_or(Provider::Generic, |t| t.provider);
        drain(body).await;
        return refuse(ex, audit, refusal, provider, None);
    }
    let Some(target) = target else {
        drain(body).await;
        return refuse(ex, audit, Refusal::NoRoute, Provider::Generic, None);
    };
    ex.route = Some(target.name.clone());
    ex.provider = target.provider;
    let provider = target.provider;
    if let Some(refusal) = over_limits(&active.limits, &parts, over_capacity) {
        if refusal != Refusal::BodyTooLarge {
            drain(body).await;
        }
        return refuse(ex, audit, refusal, provider, None);
    }
    let deadline = active.total.map(|t| tokio::time::Instant::now() + t);
    let body = Limited::new(
        body,
        Limits {
            side: "client",
            idle: secs(active.limits.client_timeout_secs),
            deadline,
            total_secs: active.total.map_or(0, |t| t.as_secs()),
            max_bytes: Some(active.limits.max_request_body_bytes),
        },
    );

    let mut key = None;
    if active.keys.enabled() {
        let found = keys::presented(&parts.headers, parts.uri.query())
            .and_then(|p| active.keys.authenticate(p));
        let Some(k) = found else {
            drain(body).await;
            return refuse(ex, audit, Refusal::UnknownKey, provider, None);
        };
        ex.identity = Some(k.identity.clone());
        if !k.allows_route(&target.name) {
            let what = format!("route `{}`", target.name);
            drain(body).await;
            return not_allowed(ex, audit, provider, k, &what);
        }
        key = Some(k);
    }
    let (uri, forwarded) = match target.upstream_uri(&parts.uri, key.is_some()) {
        Ok(u) => u,
        Err(_) => {
            drain(body).await;
            return refuse(ex, audit, Refusal::BadRequest, provider, None);
        }
    };
    let body = match key.filter(|k| k.restricts_models()) {
        None => Either::Left(body),
        Some(k) => {
            let (model, body) =
                match requested_model(provider, &forwarded, body, shared.capture_max).await {
                    Ok(m) => m,
                    Err(why) => return refuse(ex, audit, Refusal::BadRequest, provider, Some(why)),
                };
            if !model.as_deref().is_some_and(|m| k.allows_model(m)) {
                let what = format!("model `{}`", model.as_deref().unwrap_or("(none named)"));
                return not_allowed(ex, audit, provider, k, &what);
            }
            body
        }
    };
    let body = match active.policy.as_ref().filter(|p| p.applies(&target.name)) {
        None => body,
        Some(policy) => {
            let read = match body {
                Either::Left(b) => guard::read(b, shared.capture_max).await,
                Either::Right(r) => Ok(r.into_read()),
            };
            let read = match read {
                Ok(r) => r,
                Err(e) => {
                    let refusal = match e {
                        crate::timeout::LimitError::TooLarge { .. } => Refusal::BodyTooLarge,
                        crate::timeout::LimitError::Idle { .. }
                        | crate::timeout::LimitError::Total { .. } => Refusal::ClientTimeout,
                        crate::timeout::LimitError::Inner(_) => Refusal::BadRequest,
                    };
                    let why = format!("request body could not be read for the policies: {e}");
                    return refuse(ex, audit, refusal, provider, Some(why));
                }
            };
            let identity = key.map(|k| &k.identity);
            let head = RequestHead {
                route: &target.name,
                provider,
                path: &forwarded,
                headers: &parts.headers,
                key_id: identity.map(|i| &*i.key_id),
                user: identity.and_then(|i| i.user.as_deref()),
                team: identity.and_then(|i| i.team.as_deref()),
            };
            let Checked {
                decisions,
                blocked,
                body: replaced,
                sanitized,
                decoded,
                seconds,
            } = guard::check(policy, head, &read, shared.capture_max).await;
            audit.audit.stats().count_policy("request", &[], seconds);
            let blocked = blocked.map(|message| {
                let name = decisions
                    .iter()
                    .find(|d| d.effect == custody_audit::policy::Effect::Blocked)
                    .map_or_else(String::new, |d| d.name.clone());
                (message, name)
            });
            ex.policy = Some(Box::new(RequestDecided {
                decisions,
                sanitized,
            }));
            if let Some((message, name)) = blocked {
                // The record keeps the prompt that was blocked.
                for c in &read.chunks {
                    ex.request.push(c, shared.capture_max);
                }
                ex.request.complete = read.complete();
                ex.upstream_path = Some(forwarded);
                let why = format!("blocked by policy `{name}`");
                let inflight = InFlight::new(ex, audit.clone());
                return respond(
                    &inflight,
                    Refusal::PolicyBlocked,
                    provider,
                    Some(why),
                    &message,
                );
            }
            match replaced {
                Some(b) => {
                    guard::replaced_body(&mut parts.headers, decoded, b.len());
                    Either::Right(Replay::whole(b))
                }
                None => Either::Right(read.forward()),
            }
        }
    };
    if let Some(k) = key {
        keys::strip_credentials(&mut parts.headers);
        if let Some(secret) = k.upstream.as_ref().or(target.upstream_key.as_ref()) {
            secret.inject(provider, &mut parts.headers);
        }
    }
    ex.trace = Some(trace::propagate(&mut parts.headers));
    ex.upstream_path = Some(forwarded);
    let inflight = InFlight::new(ex, shared.reporter.clone());

    parts.uri = uri;
    // The client picks HTTP/1.1 or HTTP/2 per upstream connection (ALPN); the response
    // goes back in the client's own version.
    let client_version = parts.version;
    parts.version = Version::HTTP_11;
    upstream::rewrite_request_headers(&mut parts.headers, remote);
    let body = TeeBody::new(body, Side::Request, shared.capture_max, inflight.clone());
    let (body, handback) = Handoff::new(body);
    let upstream_req = Request::from_parts(parts, body);

    let timeout = active.response_timeout;
    let sent_at = Instant::now();
    inflight.update(|ex| ex.upstream_sent_at = Some(sent_at));
    let result = tokio::time::timeout(timeout, shared.client.request(upstream_req)).await;
    let (refusal, error) = match result {
        // The upstream was still reading a body the client had not finished sending:
        // whatever ended the exchange, the client's trickle is what held it up.
        Ok(Err(_)) | Err(_) if handback.waiting_on_client() => {
            let what = match &result {
                Ok(Err(e)) => error_chain(e),
                _ => format!("no response head within {timeout:?}"),
            };
            (
                Refusal::ClientTimeout,
                format!("the request body was still arriving from the client: {what}"),
            )
        }
        Ok(Ok(resp)) => {
            let (mut parts, body) = resp.into_parts();
            let head_at = Instant::now();
            upstream::strip_hop_by_hop(&mut parts.headers);
            parts.version = client_version;
            inflight.update(|ex| {
                ex.status = Some(parts.status);
                ex.response_headers = parts.headers.clone();
                ex.response_head_at = Some(head_at);
            });
            let limits = Limits {
                side: "upstream",
                idle: active.upstream_idle,
                deadline,
                total_secs: active.total.map_or(0, |t| t.as_secs()),
                max_bytes: None,
            };
            let body = Limited::new(body, limits);
            let body = TeeBody::new(body, Side::Response, shared.capture_max, inflight.clone())
                .durable(shared.durable);
            inflight.update(|ex| ex.response_returned_at = Some(Instant::now()));
            return Response::from_parts(parts, Either::Left(body));
        }
        Ok(Err(e)) => {
            let chain = error_chain(&e);
            // The client's own body broke the limits before the upstream answered.
            if chain.contains("request body exceeds") {
                (Refusal::BodyTooLarge, chain)
            } else if chain.contains("client idle") {
                (Refusal::ClientTimeout, chain)
            } else if is_timeout(&e) {
                (Refusal::UpstreamTimeout, chain)
            } else {
                (Refusal::UpstreamUnreachable, chain)
            }
        }
        Err(_) => (
            Refusal::UpstreamTimeout,
            format!("no response head within {timeout:?}"),
        ),
    };
    // The upstream never read the body (it could not be reached, or timed out first):
    // read the rest here, so the record holds the prompt that was attempted.
    let unread = matches!(
        refusal,
        Refusal::UpstreamUnreachable | Refusal::UpstreamTimeout
    )
    .then(|| handback.take())
    .flatten();
    if let Some(body) = unread {
        let wait = secs(active.limits.client_timeout_secs).unwrap_or(Duration::from_secs(30));
        let read = http_body_util::Limited::new(body, shared.capture_max).collect();
        let _ = tokio::time::timeout(wait, read).await;
    }
    tracing::warn!(route = %target.name, code = refusal.code(), error = %error, "upstream failed");
    respond_refusal(&inflight, refusal, provider, Some(error))
}

/// The model a request asks for: from the path (Azure deployment, Gemini model), else
/// from the JSON body, which is then read whole (up to `limit`) and forwarded as read.
async fn requested_model(
    provider: Provider,
    path: &str,
    body: Limited<Incoming>,
    limit: usize,
) -> Result<(Option<String>, RequestBody), String> {
    if let Some(m) = custody_audit::genai::path_model(provider, path) {
        return Ok((Some(m.to_owned()), Either::Left(body)));
    }
    let bytes = http_body_util::Limited::new(body, limit)
        .collect()
        .await
        .map_err(|e| format!("request body could not be read for the model check: {e}"))?
        .to_bytes();
    #[derive(serde::Deserialize)]
    struct Model {
        model: Option<String>,
    }
    let model = serde_json::from_slice::<Model>(&bytes)
        .ok()
        .and_then(|m| m.model);
    Ok((model, Either::Right(Replay::whole(bytes))))
}

/// The limit a request head breaks, if any: too many connections, a head or a declared
/// body too large.
fn over_limits(
    limits: &custody_config::Limits,
    parts: &http::request::Parts,
    over_capacity: bool,
) -> Option<Refusal> {
    if over_capacity {
        return Some(Refusal::TooManyConnections);
    }
    // Measured in place: no copy of the URI or headers on the hot path.
    let uri_len = parts.uri.path_and_query().map_or(0, |pq| pq.as_str().len())
        + parts.uri.authority().map_or(0, |a| a.as_str().len());
    let head: usize = uri_len
        + parts
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum::<usize>();
    if head > limits.max_header_bytes {
        return Some(Refusal::HeadersTooLarge);
    }
    let declared = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_request_body_bytes) {
        return Some(Refusal::BodyTooLarge);
    }
    None
}

/// Reads (and discards) a little of a request body custody answers without forwarding:
/// an HTTP/1.1 server that closes with unread request bytes makes the kernel reset the
/// connection, and the client would see the reset instead of custody's answer.
async fn drain<B>(body: B)
where
    B: http_body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    const DRAIN_MAX: usize = 256 * 1024;
    let read = http_body_util::Limited::new(body, DRAIN_MAX).collect();
    let _ = tokio::time::timeout(Duration::from_secs(1), read).await;
}

/// A 403 for a virtual key used outside what it allows; `what` names the route or model.
fn not_allowed(
    ex: Exchange,
    audit: &Arc<Reporter>,
    provider: Provider,
    key: &keys::Key,
    what: &str,
) -> Response<ProxyBody> {
    let why = format!("key `{}` may not use {what}", key.identity.key_id);
    refuse(ex, audit, Refusal::KeyNotAllowed, provider, Some(why))
}

/// Answers for custody itself and records the exchange.
fn refuse(
    ex: Exchange,
    audit: &Arc<Reporter>,
    refusal: Refusal,
    provider: Provider,
    error: Option<String>,
) -> Response<ProxyBody> {
    let inflight = InFlight::new(ex, audit.clone());
    respond_refusal(&inflight, refusal, provider, error)
}

fn respond_refusal(
    inflight: &Arc<InFlight>,
    refusal: Refusal,
    provider: Provider,
    error: Option<String>,
) -> Response<ProxyBody> {
    respond(inflight, refusal, provider, error, refusal.message())
}

/// Answers for custody with `message` in the provider's error shape.
fn respond(
    inflight: &Arc<InFlight>,
    refusal: Refusal,
    provider: Provider,
    error: Option<String>,
    message: &str,
) -> Response<ProxyBody> {
    let body = refusal.body_saying(provider, message);
    let mut resp = Response::new(Either::Right(Full::new(body.clone())));
    *resp.status_mut() = refusal.status();
    for (k, v) in refusal.headers() {
        resp.headers_mut().insert(k, v);
    }
    let headers = resp.headers().clone();
    let now = Instant::now();
    inflight.update(|ex| {
        ex.status = Some(refusal.status());
        ex.response_headers = headers;
        ex.response_head_at = Some(now);
        ex.ended_at = Some(now);
        let mut cap = Capture::default();
        cap.push(&body, usize::MAX);
        cap.complete = true;
        ex.response = cap;
        ex.outcome = match refusal {
            Refusal::NoRoute
            | Refusal::BadRequest
            | Refusal::UnknownKey
            | Refusal::KeyNotAllowed
            | Refusal::AuditQueueFull
            | Refusal::BodyTooLarge
            | Refusal::HeadersTooLarge
            | Refusal::TooManyConnections
            | Refusal::MethodNotAllowed
            | Refusal::AmbiguousPath => Outcome::Rejected,
            Refusal::PolicyBlocked => Outcome::Blocked,
            Refusal::ClientTimeout => Outcome::ClientCancelled,
            Refusal::UpstreamTimeout => Outcome::UpstreamTimeout,
            Refusal::UpstreamUnreachable => Outcome::UpstreamError,
        };
        if ex.error.is_none() {
            ex.error = error.or_else(|| Some(refusal.code().to_owned()));
        }
    });
    resp
}

fn is_timeout(e: &hyper_util::client::legacy::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return true;
            }
        }
        if s.to_string().contains("timed out") {
            return true;
        }
        source = s.source();
    }
    false
}

/// The error and its causes on one line (hyper's top-level message alone is vague).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
