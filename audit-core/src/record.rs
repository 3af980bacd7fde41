//! The record: one JSON object per exchange, schema `custody.record/v1`.
//!
//! Field names follow the OpenTelemetry GenAI semantic conventions, nested
//! (`gen_ai.request.model` is `{"gen_ai":{"request":{"model":...}}}`). `chain` is always
//! the last member, and `hash` the last member of `chain`: the hash chain relies on it
//! (see [`crate::segment`]). `docs/record.md` describes every field.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{value::RawValue, Value};

pub const SCHEMA: &str = "custody.record/v1";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub schema: String,
    pub id: String,
    pub seq: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    pub time: Time,
    pub http: Http,
    pub client: Client,
    /// Where the traffic came from: `[source]` and the Kubernetes downward API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Box<RawValue>>,
    /// W3C trace context of the exchange.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<Trace>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<Session>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<Prompt>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion: Option<Completion>,
    /// The configuration in force when the exchange was admitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<ConfigRef>,
    pub outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gen_ai: Option<GenAi>,
    pub request: Body,
    pub response: Body,
    #[serde(default)]
    pub redactions: BTreeMap<String, u64>,
    pub chain: Chain,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Time {
    /// RFC 3339, UTC, milliseconds.
    pub start: String,
    pub duration_ms: f64,
    /// Until the upstream's response head arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttfb_ms: Option<f64>,
    /// Until the first response body byte arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_chunk_ms: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Http {
    pub method: String,
    pub path: String,
    /// The query string, redacted, credential parameters removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    pub request_bytes: u64,
    pub response_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Client {
    /// Keyed fingerprint of the credential the client presented; never the credential.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// The virtual key's user, else the end user the request named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team: Option<String>,
    /// The end user the request named (`user`, `metadata.user_id`) when a virtual key
    /// already gave `user`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trace {
    /// 32 hex digits.
    pub id: String,
    /// The span the upstream request belongs to: the caller's (from its `traceparent`)
    /// or, when custody started the trace, the one custody sent.
    pub span_id: String,
    /// Custody started the trace: the request carried no valid `traceparent`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub generated: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Session {
    pub id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prompt {
    /// Keyed hash of the prompt's messages before redaction (see `docs/record.md`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<Template>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Template {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    /// Keyed hash of the answer (first choice) before redaction.
    pub hash: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigRef {
    pub version: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conversation {
    pub id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenAi {
    pub provider: Name,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<Name>,
    pub request: GenAiRequest,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation: Option<Conversation>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<GenAiResponse>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Name {
    pub name: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GenAiRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<serde_json::Number>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop_sequences: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub choice_count: Option<u64>,
    /// Names of the tools offered to the model.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_names: Vec<String>,
    /// `response_format` / `text.format` / `responseMimeType`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_type: Option<String>,
    /// `reasoning_effort`, `reasoning.effort`, or `budget:N` for thinking budgets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_effort: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GenAiResponse {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub finish_reasons: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_tokens: Option<u64>,
    /// `gen_ai.usage.cache_read.input_tokens`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_read: Option<InputTokens>,
    /// `gen_ai.usage.cache_creation.input_tokens`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_creation: Option<InputTokens>,
    /// `gen_ai.usage.reasoning.output_tokens`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<OutputTokens>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InputTokens {
    pub input_tokens: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OutputTokens {
    pub output_tokens: u64,
}

/// A body as recorded.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Body {
    /// Redacted JSON, embedded as the text the client or upstream sent (only string
    /// values changed); a (redacted) string when the body is text but not JSON; absent
    /// when there was no body or it could not be recorded (see `omitted`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Box<RawValue>>,
    /// SHA-256 (hex) of `body` as it was written, in its place once the body was purged
    /// (content retention, a data subject's request): see `chain.bodies`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// The response was a stream (SSE) and `body` is its reassembled object.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub streamed: bool,
    /// Only the first `capture_max_bytes` were kept; `http.*_bytes` has the full length.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
    /// Why `body` is absent although bytes were sent (binary, undecodable...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub omitted: Option<String>,
    /// SHA-256 of the bytes as sent, when `body` was omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// The bytes were not valid UTF-8: each invalid sequence was replaced by U+FFFD
    /// before redaction, and `body` is what remained.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub invalid_utf8: bool,
    /// Why a JSON body is stored as a (redacted) string rather than as JSON: nested
    /// deeper than every review command could read back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_as_text: Option<String>,
    /// Stream reassembly left parts out to stay within its bounds (a stream naming more
    /// choices, candidates or content blocks than any provider sends); what it kept is
    /// in `body`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reassembly_stopped: Option<String>,
    /// Entities found (and replaced) in this body, by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub redactions: BTreeMap<String, u64>,
}

/// `policy`: the policy set in force and what its rules decided.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyRecord {
    /// The policy set's fingerprint (`[[policy]]` and `[policy_terms]`); shared, as
    /// every record of a set carries the same.
    pub version: std::sync::Arc<str>,
    /// Every rule that matched or failed to evaluate; empty when none did.
    pub decisions: Vec<Decision>,
    /// Entities a sanitize rule replaced in the request before it went upstream.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sanitized: BTreeMap<String, u64>,
}

/// What a matching (or failing) rule did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    Flagged,
    Blocked,
    Sanitized,
    WouldFlag,
    WouldBlock,
    WouldSanitize,
    /// The rule failed to evaluate and did nothing (`on_error = "ignore"`).
    Error,
}

/// One rule's decision on one exchange, as records carry it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub name: String,
    pub action: custody_config::Action,
    pub severity: custody_config::Severity,
    pub mode: custody_config::PolicyMode,
    pub effect: Effect,
    /// Why the rule failed to evaluate (types and names only, never values).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Chain {
    /// The id of the record whose prompt and answer this request continues (its
    /// history starts with them, or it names that record's response id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation_parent: Option<String>,
    /// Where the line's `body` members lie (offset, length of the value; see
    /// `custody_audit::content`), so that they can be purged without breaking the hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bodies: Option<Vec<u64>>,
    /// Hex SHA-256 of the previous record (64 zeros before the first record of a trail).
    pub prev: String,
    /// Hex SHA-256 of this record's line with this field set to 64 zeros.
    pub hash: String,
}

pub const EVENT_SCHEMA: &str = "custody.event/v1";

/// An event in the chain: something about the trail itself (a crash repaired, segments
/// removed by retention...). Same chain rules as a record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    pub schema: String,
    pub id: String,
    pub seq: u64,
    pub time: EventTime,
    /// `{"type": "...", ...}`
    pub event: Value,
    pub chain: Chain,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventTime {
    pub start: String,
}

/// Whether text (JSON or not) opens more than `max` brackets at once outside strings.
/// One pass, no allocation, stops at the first level past `max`.
pub fn nesting_exceeds(b: &[u8], max: usize) -> bool {
    // Fewer opening brackets in all than the limit: no need to follow strings.
    if memchr::memchr2_iter(b'[', b'{', b).take(max + 1).count() <= max {
        return false;
    }
    let (mut depth, mut i) = (0usize, 0);
    while i < b.len() {
        match b[i] {
            b'"' => {
                // Skip the string: to its closing quote, over escapes.
                i += 1;
                loop {
                    match b.get(i..).and_then(|r| memchr::memchr2(b'"', b'\\', r)) {
                        Some(o) if b[i + o] == b'"' => {
                            i += o;
                            break;
                        }
                        Some(o) => i += o + 2,
                        None => return false,
                    }
                }
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    false
}

/// The Unix-ms timestamp in a UUID v7, if it is one.
pub fn id_time_ms(id: &str) -> Option<i64> {
    let u = uuid::Uuid::parse_str(id).ok()?;
    let (secs, nanos) = u.get_timestamp()?.to_unix();
    Some(secs as i64 * 1000 + i64::from(nanos / 1_000_000))
}

/// `source.*`: the Kubernetes downward-API environment, then `[source]`.
pub fn source_map(
    config: &std::collections::BTreeMap<String, String>,
) -> std::collections::BTreeMap<String, String> {
    let mut m: std::collections::BTreeMap<String, String> = [
        ("k8s.pod.name", "POD_NAME"),
        ("k8s.namespace.name", "POD_NAMESPACE"),
        ("k8s.node.name", "NODE_NAME"),
        ("k8s.serviceaccount.name", "POD_SERVICE_ACCOUNT"),
    ]
    .into_iter()
    .filter_map(|(k, env)| {
        std::env::var(env)
            .ok()
            .filter(|v| !v.is_empty())
            .map(|v| (k.to_owned(), v))
    })
    .collect();
    m.extend(config.iter().map(|(k, v)| (k.clone(), v.clone())));
    m
}
