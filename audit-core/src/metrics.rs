//! What the audit side counts, as Prometheus metrics shared by the proxy (which submits
//! and admits) and the writer (which writes). Label values are bounded: entity names,
//! configured routes, and at most [`MODEL_LABELS`] model names.

use std::{
    collections::HashSet,
    path::Path,
    sync::{Arc, Mutex},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// Distinct model names kept as label values; later ones are counted as `other`.
pub const MODEL_LABELS: usize = 200;

/// Model names as providers write them: `gpt-4o-2024-08-06`, `claude-3-5-sonnet@20240620`,
/// `models/gemini-1.5-pro`, `accounts/x/models/y`: at most 96 characters of letters,
/// digits and `.-_:/@`.
pub fn well_formed_model(m: &str) -> bool {
    !m.is_empty()
        && m.len() <= 96
        && m.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':' | b'/' | b'@')
        })
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EntityLabels {
    pub entity: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServedLabels {
    pub route: String,
    pub requested_model: String,
    pub served_model: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServedChangeLabels {
    pub route: String,
    pub requested_model: String,
    pub kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub route: String,
    pub model: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelResultLabels {
    pub route: String,
    pub model: String,
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FinishLabels {
    pub route: String,
    pub model: String,
    pub finish_reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub route: String,
    pub model: String,
    pub token_type: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    pub policy: String,
    pub action: &'static str,
    pub mode: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: &'static str,
}

/// Counters shared by the proxy and the writer.
#[derive(Debug)]
pub struct AuditStats {
    /// Exchanges handed to the queue.
    pub submitted: Counter,
    /// Exchanges lost (not audited), by reason.
    pub dropped: Family<ReasonLabels, Counter>,
    /// Exchanges lost because the queue was full (`on_full = "drop"`).
    pub dropped_full: Counter,
    /// Exchanges lost because the writer had stopped.
    pub dropped_closed: Counter,
    /// Requests refused at admission because the queue was full.
    pub rejected: Counter,
    /// Records (and events) handed to the segment file.
    pub written: Counter,
    /// Compressed bytes appended to segments.
    pub bytes_written: Counter,
    /// Failed block writes (each retried).
    pub write_errors: Counter,
    /// 1 while the writer cannot write (disk full, read-only, I/O errors).
    pub failing: Gauge,
    /// Exchanges admitted and not yet written.
    pub queue_depth: Gauge,
    /// Captured body bytes of the exchanges waiting for the writer.
    pub queue_bytes: Gauge,
    /// The most exchanges ever waiting at once (since start).
    pub queue_high_water: Gauge,
    /// Requests waiting at admission for room in the queue (`on_full = "backpressure"`).
    pub admission_waiting: Gauge,
    pub fsync_seconds: Histogram,
    /// From an exchange's end to its record being assembled.
    pub writer_lag_seconds: Histogram,
    pub redactions: Family<EntityLabels, Counter>,
    pub tokens: Family<TokenLabels, Counter>,
    /// The drift dimensions, live, per route and requested model (`log drift` compares
    /// the same from the trail): exchanges by result, finish reasons (normalized across
    /// providers), and the distributions of duration, time to first chunk and answer
    /// length.
    pub exchanges: Family<ModelResultLabels, Counter>,
    pub finish_reasons: Family<FinishLabels, Counter>,
    pub operation_seconds: Family<ModelLabels, Histogram, fn() -> Histogram>,
    pub first_chunk_seconds: Family<ModelLabels, Histogram, fn() -> Histogram>,
    pub response_tokens: Family<ModelLabels, Histogram, fn() -> Histogram>,
    /// Policy decisions, by policy, action and mode (names are the configured rules').
    pub policy_decisions: Family<PolicyLabels, Counter>,
    /// Time to evaluate one exchange's rules, by phase (request, record).
    pub policy_seconds: Family<PhaseLabels, Histogram, fn() -> Histogram>,
    pub segments: Gauge,
    pub disk_bytes: Gauge,
    /// Free space an unprivileged writer has on the trail's filesystem.
    pub disk_available_bytes: Gauge,
    /// `purge` events written (content retention passes that purged, data subjects'
    /// requests), and the bodies they purged.
    pub purges: Counter,
    pub purged_bodies: Counter,
    /// 1 per route and requested model for the model serving it now (`drift` events).
    pub served_model: Family<ServedLabels, Gauge>,
    pub served_model_changes: Family<ServedChangeLabels, Counter>,
    /// `[otel]` spans, by what became of them (queued, exported, failed).
    pub otel_spans: Family<ResultLabels, Counter>,
    /// Woken each time the writer takes an exchange (room for waiting admissions).
    pub room: tokio::sync::Notify,
    /// Traffic not audited because the queue was full, waiting to be told in the chain.
    losses: Mutex<Losses>,
    models: Mutex<HashSet<String>>,
}

/// Exchanges the trail does not hold, by reason, since the last event that told them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Losses {
    /// Proceeded unaudited (`on_full = "drop"`).
    pub unaudited: u64,
    /// Refused with a 503 at admission (nothing went upstream).
    pub refused: u64,
    pub first_ms: Option<i64>,
    pub last_ms: Option<i64>,
}

/// Model calls take from tens of milliseconds to minutes (the GenAI conventions'
/// buckets).
fn operation_histogram() -> Histogram {
    Histogram::new([
        0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
    ])
}

/// Answers from one token to a book: powers of four.
fn tokens_histogram() -> Histogram {
    Histogram::new((0..12).map(|i| 4f64.powi(i)))
}

/// Policy evaluations take microseconds: buckets from 5 µs to 25 ms.
fn policy_histogram() -> Histogram {
    Histogram::new([
        0.000_005, 0.00001, 0.000_025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.005, 0.025,
    ])
}

impl Default for AuditStats {
    fn default() -> Self {
        let dropped = Family::<ReasonLabels, Counter>::default();
        let reason = |reason| dropped.get_or_create_owned(&ReasonLabels { reason });
        let (dropped_full, dropped_closed) = (reason("queue_full"), reason("writer_stopped"));
        let seconds =
            || Histogram::new([0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]);
        Self {
            submitted: Counter::default(),
            dropped,
            dropped_full,
            dropped_closed,
            rejected: Counter::default(),
            written: Counter::default(),
            bytes_written: Counter::default(),
            write_errors: Counter::default(),
            failing: Gauge::default(),
            queue_depth: Gauge::default(),
            queue_bytes: Gauge::default(),
            queue_high_water: Gauge::default(),
            admission_waiting: Gauge::default(),
            fsync_seconds: seconds(),
            writer_lag_seconds: seconds(),
            redactions: Family::default(),
            tokens: Family::default(),
            exchanges: Family::default(),
            finish_reasons: Family::default(),
            operation_seconds: Family::new_with_constructor(operation_histogram),
            first_chunk_seconds: Family::new_with_constructor(operation_histogram),
            response_tokens: Family::new_with_constructor(tokens_histogram),
            policy_decisions: Family::default(),
            policy_seconds: Family::new_with_constructor(policy_histogram),
            segments: Gauge::default(),
            disk_bytes: Gauge::default(),
            disk_available_bytes: Gauge::default(),
            purges: Counter::default(),
            purged_bodies: Counter::default(),
            served_model: Family::default(),
            served_model_changes: Family::default(),
            otel_spans: Family::default(),
            room: tokio::sync::Notify::new(),
            losses: Mutex::new(Losses::default()),
            models: Mutex::new(HashSet::new()),
        }
    }
}

impl AuditStats {
    pub fn otel_span(&self, result: &'static str) {
        self.otel_spans(result, 1);
    }

    pub fn otel_spans(&self, result: &'static str, n: u64) {
        self.otel_spans
            .get_or_create(&ResultLabels { result })
            .inc_by(n);
    }

    /// Registers every metric (counters get `_total` appended by the encoder).
    pub fn register(self: &Arc<Self>, r: &mut Registry) {
        r.register(
            "custody_audit_submitted",
            "Exchanges handed to the audit queue",
            self.submitted.clone(),
        );
        r.register(
            "custody_audit_dropped",
            "Exchanges not audited, by reason (queue_full: on_full = drop; writer_stopped)",
            self.dropped.clone(),
        );
        r.register(
            "custody_audit_rejected",
            "Requests refused at admission because the audit queue was full",
            self.rejected.clone(),
        );
        r.register(
            "custody_audit_records_written",
            "Records and events appended to segments",
            self.written.clone(),
        );
        r.register(
            "custody_audit_bytes_written",
            "Compressed bytes appended to segments",
            self.bytes_written.clone(),
        );
        r.register(
            "custody_audit_write_errors",
            "Failed block writes (each retried)",
            self.write_errors.clone(),
        );
        r.register(
            "custody_audit_writer_failing",
            "1 while the writer cannot write (disk full, read-only, I/O errors)",
            self.failing.clone(),
        );
        r.register(
            "custody_audit_queue_depth",
            "Exchanges admitted and not yet written",
            self.queue_depth.clone(),
        );
        r.register(
            "custody_audit_queue_high_water",
            "The most exchanges waiting for the writer at once since start",
            self.queue_high_water.clone(),
        );
        r.register(
            "custody_audit_queue_bytes",
            "Captured body bytes waiting for the writer",
            self.queue_bytes.clone(),
        );
        r.register(
            "custody_audit_admission_waiting",
            "Requests waiting at admission for room in the audit queue (on_full = backpressure)",
            self.admission_waiting.clone(),
        );
        r.register(
            "custody_audit_fsync_seconds",
            "Time of each fsync of the live segment",
            self.fsync_seconds.clone(),
        );
        r.register(
            "custody_audit_writer_lag_seconds",
            "From an exchange's end to its record being assembled",
            self.writer_lag_seconds.clone(),
        );
        r.register(
            "custody_audit_segments",
            "Segment files in the audit directory",
            self.segments.clone(),
        );
        r.register(
            "custody_audit_disk_bytes",
            "Bytes of segment files in the audit directory",
            self.disk_bytes.clone(),
        );
        r.register(
            "custody_audit_disk_available_bytes",
            "Free bytes on the audit directory's filesystem",
            self.disk_available_bytes.clone(),
        );
        r.register(
            "custody_audit_purges",
            "Purge events written: content retention, data subjects' requests",
            self.purges.clone(),
        );
        r.register(
            "custody_served_model",
            "1 for the model serving each route and requested model now",
            self.served_model.clone(),
        );
        r.register(
            "custody_served_model_changes",
            "Changes of the model (or backend fingerprint) serving a route and requested model",
            self.served_model_changes.clone(),
        );
        r.register(
            "custody_otel_spans",
            "[otel] spans: queued by the writer, exported, or failed to export (queued minus the others: in flight or dropped)",
            self.otel_spans.clone(),
        );
        r.register(
            "custody_audit_purged_bodies",
            "Request and response bodies purged from sealed segments",
            self.purged_bodies.clone(),
        );
        r.register(
            "custody_redactions",
            "Redactions applied, by entity",
            self.redactions.clone(),
        );
        r.register(
            "custody_policy_decisions",
            "Policy decisions (matches and evaluation errors), by policy, action and mode",
            self.policy_decisions.clone(),
        );
        r.register(
            "custody_policy_evaluation_seconds",
            "Time the policies took on one exchange, by phase (request: block and sanitize before the upstream; record: on the writer, reading what the rules read and evaluating them)",
            self.policy_seconds.clone(),
        );
        r.register(
            "gen_ai_client_token_usage",
            "Tokens used, by route, model (served, else requested) and token_type (input, output)",
            self.tokens.clone(),
        );
        r.register(
            "custody_gen_ai_exchanges",
            "Exchanges per route and requested model, by result (ok, client_error, rate_limited, error, blocked)",
            self.exchanges.clone(),
        );
        r.register(
            "custody_gen_ai_finish_reasons",
            "Finish reasons of answers per route and requested model, normalized across providers (stop, length, tool_calls, content_filter, refusal, ...)",
            self.finish_reasons.clone(),
        );
        r.register(
            "gen_ai_client_operation_duration_seconds",
            "Duration of model calls per route and requested model, request to end of response",
            self.operation_seconds.clone(),
        );
        r.register(
            "gen_ai_client_operation_time_to_first_chunk_seconds",
            "Time to the first chunk of the response per route and requested model",
            self.first_chunk_seconds.clone(),
        );
        r.register(
            "custody_gen_ai_response_tokens",
            "Output tokens per answer (its length) per route and requested model",
            self.response_tokens.clone(),
        );
    }

    /// Counts one exchange's policy decisions and the time their evaluation took.
    pub fn count_policy(
        &self,
        phase: &'static str,
        decisions: &[crate::record::Decision],
        seconds: f64,
    ) {
        if seconds > 0.0 {
            self.policy_seconds
                .get_or_create(&PhaseLabels { phase })
                .observe(seconds);
        }
        for d in decisions {
            let labels = PolicyLabels {
                policy: d.name.clone(),
                action: d.action.as_str(),
                mode: d.mode.as_str(),
            };
            self.policy_decisions.get_or_create(&labels).inc();
        }
    }

    /// Counts an exchange that proceeded unaudited (`refused == false`) or was refused
    /// at admission; returns true for the first of a run (worth one warning).
    pub fn lose(&self, refused: bool) -> bool {
        if refused {
            self.rejected.inc();
        } else {
            self.dropped_full.inc();
        }
        let now = crate::store::now_ms();
        let Ok(mut l) = self.losses.lock() else {
            return false;
        };
        let first = l.unaudited == 0 && l.refused == 0;
        if refused {
            l.refused += 1;
        } else {
            l.unaudited += 1;
        }
        l.first_ms.get_or_insert(now);
        l.last_ms = Some(now);
        first
    }

    /// The losses not yet told in the chain, emptied.
    pub fn take_losses(&self) -> Option<Losses> {
        let mut l = self.losses.lock().ok()?;
        (l.unaudited > 0 || l.refused > 0).then(|| std::mem::take(&mut *l))
    }

    /// The model label for `model`: itself while fewer than [`MODEL_LABELS`] are known
    /// and it looks like a model name; `other` for anything else an upstream or client
    /// may have sent there (a redacted value, a sentence, control characters).
    pub fn model_label(&self, model: &str) -> String {
        if !well_formed_model(model) {
            return "other".into();
        }
        let Ok(mut known) = self.models.lock() else {
            return "other".into();
        };
        if known.contains(model) || known.len() < MODEL_LABELS && known.insert(model.to_owned()) {
            model.to_owned()
        } else {
            "other".into()
        }
    }

    /// Segment count and bytes, from the directory.
    pub fn measure_disk(&self, dir: &Path) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let (mut n, mut bytes) = (0i64, 0i64);
        for e in entries.flatten() {
            if e.path().extension().is_some_and(|x| x == "seg") {
                n += 1;
                bytes += e.metadata().map_or(0, |m| m.len() as i64);
            }
        }
        self.segments.set(n);
        self.disk_bytes.set(bytes);
        if let Ok(fs) = rustix::fs::statvfs(dir) {
            let free = fs.f_bavail.saturating_mul(fs.f_frsize);
            self.disk_available_bytes
                .set(i64::try_from(free).unwrap_or(i64::MAX));
        }
    }
}
