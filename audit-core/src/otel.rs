//! `[otel]`: each record exported as an OpenTelemetry span following the GenAI semantic
//! conventions, by OTLP/HTTP. Spans are built on the writer thread from the finished
//! record (never on the request path) and handed to the SDK's batch processor, whose
//! bounded queue drops rather than waits; its own thread does the HTTP.

use std::{
    borrow::Cow,
    cell::Cell,
    sync::Arc,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use opentelemetry::{
    trace::{
        Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
        TraceState, Tracer as _, TracerProvider as _,
    },
    Array, Context, KeyValue, StringValue, Value,
};
use opentelemetry_http::{HttpClient, HttpError};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::{
    error::OTelSdkResult,
    trace::{
        BatchConfigBuilder, BatchSpanProcessor, IdGenerator, RandomIdGenerator, SdkTracer,
        SdkTracerProvider, SpanData, SpanExporter,
    },
    Resource,
};

use crate::{
    error::AuditError,
    metrics::AuditStats,
    record::Record,
    review::turns::{self, Part, Turn},
};

/// The details event's content attributes together stay under this; one that would
/// pass it is left out (and the event says so). With the queue, it bounds the memory
/// spans waiting for export can hold.
pub const CONTENT_MAX_BYTES: usize = 64 * 1024;

/// The exporter: a tracer provider with its batch processor and HTTP runtime.
pub struct Otel {
    provider: SdkTracerProvider,
    timeout: Duration,
    tracer: SdkTracer,
    content: bool,
    stats: Arc<AuditStats>,
}

impl std::fmt::Debug for Otel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Otel")
            .field("content", &self.content)
            .finish()
    }
}

impl Otel {
    /// The exporter `[otel]` describes; `None` when it names no endpoint.
    pub fn start(
        config: &custody_config::Otel,
        stats: Arc<AuditStats>,
    ) -> Result<Option<Self>, AuditError> {
        let Some(base) = &config.endpoint else {
            return Ok(None);
        };
        let err = |e: &dyn std::fmt::Display| AuditError::Writer(format!("[otel]: {e}"));
        let endpoint = traces_url(base);
        let timeout = Duration::from_secs(config.timeout_secs);
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(endpoint)
            .with_timeout(timeout)
            .with_http_client(Client::new(timeout).map_err(|e| err(&e))?)
            .build()
            .map_err(|e| err(&e))?;
        let exporter = Counted {
            inner: exporter,
            stats: stats.clone(),
        };
        let batch = BatchConfigBuilder::default()
            .with_max_queue_size(config.queue)
            .build();
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(batch)
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_id_generator(RecordIds::default())
            .with_resource(
                Resource::builder()
                    .with_service_name(config.service_name.clone())
                    .build(),
            )
            .build();
        let tracer = provider.tracer("custody");
        tracing::info!(endpoint = %traces_url(base), content = config.content, "exporting exchanges as OpenTelemetry spans");
        Ok(Some(Self {
            provider,
            timeout,
            tracer,
            content: config.content,
            stats,
        }))
    }

    /// Hands the record's span to the batch processor (never waits on the network).
    pub fn export(&self, record: &Record, started: SystemTime) {
        let Some(g) = &record.gen_ai else { return };
        let operation = g.operation.as_ref().map_or("chat", |o| o.name.as_str());
        let name = match &g.request.model {
            Some(m) => format!("{operation} {m}"),
            None => operation.to_owned(),
        };
        let took =
            Duration::try_from_secs_f64(record.time.duration_ms / 1000.0).unwrap_or_default();
        let end = started + took;
        RECORD_IDS.with(|c| c.set(None));
        let parent = self.ids(record);
        let builder = self
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Client)
            .with_start_time(started)
            .with_attributes(attributes(record, operation));
        let mut span = builder.start_with_context(&self.tracer, &parent);
        RECORD_IDS.with(|c| c.set(None));
        if let Some(status) = status(record) {
            span.set_status(status);
        }
        if self.content {
            span.add_event_with_timestamp(
                "gen_ai.client.inference.operation.details",
                end,
                details(record),
            );
        }
        span.end_with_timestamp(end);
        self.stats.otel_span("queued");
        // `span` is an SDK span: ending it hands it to the processor.
        drop(span);
    }

    /// The parent context: the caller's span when the request carried one; else the
    /// span custody sent upstream becomes this span itself (so the provider's spans,
    /// if any, hang under it), through [`RecordIds`].
    fn ids(&self, record: &Record) -> Context {
        let Some(t) = &record.trace else {
            return Context::new();
        };
        let (Ok(trace), Ok(span)) = (TraceId::from_hex(&t.id), SpanId::from_hex(&t.span_id)) else {
            return Context::new();
        };
        if t.generated {
            RECORD_IDS.with(|c| c.set(Some((trace, span))));
            return Context::new();
        }
        let remote = SpanContext::new(trace, span, TraceFlags::SAMPLED, true, TraceState::NONE);
        Context::new().with_remote_span_context(remote)
    }

    /// Exports what is queued (bounded by the timeout) and stops.
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown_with_timeout(self.timeout) {
            tracing::warn!(error = %e, "[otel] export did not finish at shutdown");
        }
    }
}

/// `…/v1/traces`, unless the URL already names it.
fn traces_url(base: &str) -> String {
    let base = base.trim_end_matches('/');
    if base.ends_with("/v1/traces") {
        base.to_owned()
    } else {
        format!("{base}/v1/traces")
    }
}

fn attributes(record: &Record, operation: &str) -> Vec<KeyValue> {
    let mut a = Vec::with_capacity(24);
    let Some(g) = &record.gen_ai else { return a };
    a.push(KeyValue::new("gen_ai.operation.name", operation.to_owned()));
    a.push(KeyValue::new(
        "gen_ai.provider.name",
        g.provider.name.clone(),
    ));
    let r = &g.request;
    let strings = [
        ("gen_ai.request.model", &r.model),
        ("gen_ai.output.type", &r.output_type),
    ];
    for (k, v) in strings {
        if let Some(v) = v {
            a.push(KeyValue::new(k, v.clone()));
        }
    }
    let floats = [
        ("gen_ai.request.temperature", r.temperature),
        ("gen_ai.request.top_p", r.top_p),
        ("gen_ai.request.frequency_penalty", r.frequency_penalty),
        ("gen_ai.request.presence_penalty", r.presence_penalty),
    ];
    for (k, v) in floats {
        if let Some(v) = v {
            a.push(KeyValue::new(k, v));
        }
    }
    let ints = [
        ("gen_ai.request.max_tokens", r.max_tokens),
        ("gen_ai.request.choice.count", r.choice_count),
        ("gen_ai.request.seed", r.seed.map(|s| s as u64)),
    ];
    for (k, v) in ints {
        if let Some(v) = v {
            a.push(KeyValue::new(k, v as i64));
        }
    }
    if !r.stop_sequences.is_empty() {
        a.push(KeyValue::new(
            "gen_ai.request.stop_sequences",
            strings_value(&r.stop_sequences),
        ));
    }
    if let Some(c) = &g.conversation {
        a.push(KeyValue::new("gen_ai.conversation.id", c.id.clone()));
    }
    if let Some(resp) = &g.response {
        if let Some(m) = &resp.model {
            a.push(KeyValue::new("gen_ai.response.model", m.clone()));
        }
        if let Some(id) = &resp.id {
            a.push(KeyValue::new("gen_ai.response.id", id.clone()));
        }
        if !resp.finish_reasons.is_empty() {
            a.push(KeyValue::new(
                "gen_ai.response.finish_reasons",
                strings_value(&resp.finish_reasons),
            ));
        }
        if let Some(f) = &resp.system_fingerprint {
            a.push(KeyValue::new(
                "openai.response.system_fingerprint",
                f.clone(),
            ));
        }
    }
    if let Some(u) = &g.usage {
        let usage = [
            ("gen_ai.usage.input_tokens", u.input_tokens),
            ("gen_ai.usage.output_tokens", u.output_tokens),
            (
                "gen_ai.usage.cache_read.input_tokens",
                u.cache_read.as_ref().map(|c| c.input_tokens),
            ),
            (
                "gen_ai.usage.cache_creation.input_tokens",
                u.cache_creation.as_ref().map(|c| c.input_tokens),
            ),
        ];
        for (k, v) in usage {
            if let Some(v) = v {
                a.push(KeyValue::new(k, v as i64));
            }
        }
    }
    if let Some(s) = record.http.status {
        a.push(KeyValue::new("http.response.status_code", i64::from(s)));
    }
    if let Some(e) = error_type(record) {
        a.push(KeyValue::new("error.type", e));
    }
    a.push(KeyValue::new("custody.record.id", record.id.clone()));
    a.push(KeyValue::new("custody.record.seq", record.seq as i64));
    a.push(KeyValue::new("custody.outcome", record.outcome.clone()));
    if let Some(route) = &record.route {
        a.push(KeyValue::new("custody.route", route.clone()));
    }
    if let Some(p) = &record.policy {
        let names: Vec<String> = p
            .decisions
            .iter()
            .map(|d| format!("{}:{}", d.name, effect(d.effect)))
            .collect();
        if !names.is_empty() {
            a.push(KeyValue::new(
                "custody.policy.decisions",
                strings_value(&names),
            ));
        }
    }
    let redactions: u64 = record.redactions.values().sum();
    if redactions > 0 {
        a.push(KeyValue::new("custody.redactions", redactions as i64));
    }
    a
}

fn effect(e: crate::record::Effect) -> &'static str {
    use crate::record::Effect::*;
    match e {
        Flagged => "flagged",
        Blocked => "blocked",
        Sanitized => "sanitized",
        WouldFlag => "would_flag",
        WouldBlock => "would_block",
        WouldSanitize => "would_sanitize",
        Error => "error",
    }
}

fn strings_value(v: &[String]) -> Value {
    Value::Array(Array::String(
        v.iter().map(|s| StringValue::from(s.clone())).collect(),
    ))
}

/// `error.type`: custody's outcome when the exchange did not end well (`blocked`,
/// `upstream_timeout`...), else the status code of an error answer.
fn error_type(record: &Record) -> Option<String> {
    match record.http.status {
        _ if record.outcome != "ok" => Some(record.outcome.clone()),
        Some(s) if s >= 400 => Some(s.to_string()),
        _ => None,
    }
}

fn status(record: &Record) -> Option<Status> {
    error_type(record).map(|e| Status::error(Cow::Owned(e)))
}

/// The details event: the messages as the record holds them (redacted), in the
/// conventions' shape (`role` and typed `parts`), as JSON strings.
fn details(record: &Record) -> Vec<KeyValue> {
    let body = |b: &crate::record::Body| {
        b.body
            .as_ref()
            .and_then(|raw| serde_json::from_str::<serde_json::Value>(raw.get()).ok())
    };
    let mut out = Vec::new();
    let mut omitted = Vec::new();
    let mut budget = CONTENT_MAX_BYTES;
    if let Some(req) = body(&record.request) {
        let (system, input): (Vec<Turn>, Vec<Turn>) = turns::of_request(&req)
            .into_iter()
            .partition(|t| t.role == "system");
        let system: Vec<serde_json::Value> = system
            .iter()
            .flat_map(|t| t.parts.iter().map(part))
            .collect();
        if !system.is_empty() {
            push(
                &mut out,
                &mut omitted,
                &mut budget,
                "gen_ai.system_instructions",
                &system.into(),
            );
        }
        let input: Vec<serde_json::Value> = input.iter().map(|t| message(t, None)).collect();
        push(
            &mut out,
            &mut omitted,
            &mut budget,
            "gen_ai.input.messages",
            &input.into(),
        );
    }
    if let Some(resp) = body(&record.response) {
        let finish = record
            .gen_ai
            .as_ref()
            .and_then(|g| g.response.as_ref())
            .map(|r| r.finish_reasons.as_slice())
            .unwrap_or_default();
        let output: Vec<serde_json::Value> = turns::of_response(&resp)
            .iter()
            .enumerate()
            .map(|(i, t)| message(t, finish.get(i).map(String::as_str)))
            .collect();
        push(
            &mut out,
            &mut omitted,
            &mut budget,
            "gen_ai.output.messages",
            &output.into(),
        );
    }
    if !omitted.is_empty() {
        out.push(KeyValue::new(
            "custody.content_omitted",
            strings_value(&omitted),
        ));
    }
    out
}

fn push(
    out: &mut Vec<KeyValue>,
    omitted: &mut Vec<String>,
    budget: &mut usize,
    key: &'static str,
    v: &serde_json::Value,
) {
    let s = v.to_string();
    match budget.checked_sub(s.len()) {
        Some(left) => {
            *budget = left;
            out.push(KeyValue::new(key, s));
        }
        None => omitted.push(format!("{key}: past the event's {CONTENT_MAX_BYTES} bytes")),
    }
}

fn message(t: &Turn, finish: Option<&str>) -> serde_json::Value {
    let mut m = serde_json::json!({
        "role": t.role,
        "parts": t.parts.iter().map(part).collect::<Vec<_>>(),
    });
    if let Some(f) = finish {
        m["finish_reason"] = f.into();
    }
    m
}

fn part(p: &Part) -> serde_json::Value {
    use serde_json::json;
    match p {
        Part::Text(s) => json!({"type": "text", "content": s}),
        Part::ToolCall { name, arguments } => {
            json!({"type": "tool_call", "name": name, "arguments": arguments})
        }
        Part::ToolResult { of, content } => {
            json!({"type": "tool_call_response", "id": of, "response": content})
        }
        Part::Reasoning(s) => json!({"type": "reasoning", "content": s}),
        Part::Other(s) => json!({"type": "other", "content": s}),
    }
}

thread_local! {
    /// The ids the next span on this thread must take (see [`Otel::ids`]).
    static RECORD_IDS: Cell<Option<(TraceId, SpanId)>> = const { Cell::new(None) };
}

/// The SDK takes no ids from the caller; this generator gives the one the record
/// names when custody started the trace, and random ones otherwise.
#[derive(Debug, Default)]
struct RecordIds(RandomIdGenerator);

impl IdGenerator for RecordIds {
    fn new_trace_id(&self) -> TraceId {
        RECORD_IDS
            .with(Cell::get)
            .map_or_else(|| self.0.new_trace_id(), |(t, _)| t)
    }

    fn new_span_id(&self) -> SpanId {
        RECORD_IDS
            .with(Cell::get)
            .map_or_else(|| self.0.new_span_id(), |(_, s)| s)
    }
}

/// The OTLP exporter, counting what it sent and what failed.
#[derive(Debug)]
struct Counted<E> {
    inner: E,
    stats: Arc<AuditStats>,
}

impl<E: SpanExporter> SpanExporter for Counted<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len() as u64;
        let result = self.inner.export(batch).await;
        let label = if result.is_ok() { "exported" } else { "failed" };
        self.stats.otel_spans(label, n);
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

type Connector = hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;

/// The SDK's hyper client needs a Tokio runtime around it, and the batch processor's
/// thread has none: each export runs on a small runtime of its own (one worker thread).
#[derive(Debug, Clone)]
struct Client {
    inner: opentelemetry_http::hyper::HyperClient<Connector>,
    runtime: Arc<Runtime>,
}

impl Client {
    fn new(timeout: Duration) -> Result<Self, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("custody-otel")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            inner: opentelemetry_http::hyper::HyperClient::new(https, timeout, None),
            runtime: Arc::new(Runtime(Some(runtime))),
        })
    }
}

#[async_trait::async_trait]
impl HttpClient for Client {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, HttpError> {
        let Some(rt) = &self.runtime.0 else {
            return Err("the export runtime has stopped".into());
        };
        let inner = self.inner.clone();
        rt.spawn(async move { inner.send_bytes(request).await })
            .await?
    }
}

/// A runtime that may be dropped anywhere (also inside another runtime's context).
#[derive(Debug)]
struct Runtime(Option<tokio::runtime::Runtime>);

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_traces_path_is_appended_once() {
        assert_eq!(traces_url("http://c:4318"), "http://c:4318/v1/traces");
        assert_eq!(traces_url("http://c:4318/"), "http://c:4318/v1/traces");
        assert_eq!(
            traces_url("http://c:4318/v1/traces"),
            "http://c:4318/v1/traces"
        );
    }

    #[test]
    fn content_past_the_budget_is_left_out_and_named() {
        let (mut out, mut omitted, mut budget) = (Vec::new(), Vec::new(), CONTENT_MAX_BYTES);
        let small = serde_json::json!(["x"]);
        let big = serde_json::json!(["y".repeat(CONTENT_MAX_BYTES)]);
        push(
            &mut out,
            &mut omitted,
            &mut budget,
            "gen_ai.system_instructions",
            &small,
        );
        push(
            &mut out,
            &mut omitted,
            &mut budget,
            "gen_ai.input.messages",
            &big,
        );
        push(
            &mut out,
            &mut omitted,
            &mut budget,
            "gen_ai.output.messages",
            &small,
        );
        let keys: Vec<&str> = out.iter().map(|kv| kv.key.as_str()).collect();
        assert_eq!(
            keys,
            ["gen_ai.system_instructions", "gen_ai.output.messages"]
        );
        assert_eq!(omitted.len(), 1);
        assert!(omitted[0].starts_with("gen_ai.input.messages"));
    }
}
