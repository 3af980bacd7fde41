//! The configuration schema. Every section takes defaults for keys it does not name
//! and rejects keys it does not know.

use std::{collections::HashSet, fmt, net::SocketAddr, path::PathBuf, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::ConfigError;

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where custody accepts client connections.
    #[serde(default)]
    pub listen: Listen,
    /// Where and how audit records are written.
    #[serde(default)]
    pub audit: Audit,
    /// How custody talks to upstream providers.
    #[serde(default)]
    pub upstream: Upstream,
    /// What is redacted from bodies before they are written, and how.
    #[serde(default)]
    pub redaction: crate::Redaction,
    /// Routes by path prefix; a request that matches none gets a 404 from custody.
    #[serde(default, rename = "route")]
    pub routes: Vec<Route>,
    /// Virtual keys. None: custody passes clients' own credentials through. Any: every
    /// request must present one of them, and custody sends the real provider key.
    #[serde(default, rename = "key")]
    pub keys: Vec<VirtualKey>,
    /// Where the traffic comes from, stamped on every record (`source.*`), on top of
    /// the Kubernetes downward-API environment (`POD_NAME`, `POD_NAMESPACE`,
    /// `NODE_NAME`, `POD_SERVICE_ACCOUNT`).
    #[serde(default)]
    pub source: std::collections::BTreeMap<String, String>,
    /// Request headers that tie records to sessions and prompt templates.
    #[serde(default)]
    pub lineage: Lineage,
    /// The admin listener: metrics, health, readiness, reload.
    #[serde(default)]
    pub admin: Admin,
    /// Custody's own log.
    #[serde(default)]
    pub log: Log,
    /// What one client may do.
    #[serde(default)]
    pub limits: Limits,
    /// Where sealed segments are shipped.
    #[serde(default)]
    pub ship: Ship,
    /// Each exchange as an OpenTelemetry span, sent by OTLP/HTTP.
    #[serde(default)]
    pub otel: Otel,
    /// Rules over each exchange: flag, block or sanitize (`docs/policy.md`).
    #[serde(default, rename = "policy")]
    pub policies: Vec<crate::Policy>,
    /// Named term lists for rules: `request.text.containsAny(terms.NAME)`.
    #[serde(default)]
    pub policy_terms: std::collections::BTreeMap<String, Vec<String>>,
    /// The review console, run as `custody console` (never by `serve`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<crate::Console>,
    /// Who may read through the console, and what.
    #[serde(default, rename = "reviewer", skip_serializing_if = "Vec::is_empty")]
    pub reviewers: Vec<crate::Reviewer>,
}

/// `[ship]`: sealed segments, their indexes and the checkpoint log, uploaded to object
/// storage under `<url>/<source>/`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Ship {
    /// `s3://bucket/prefix`, `gs://...`, `az://...` or `file:///path`; unset: no shipping.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// This trail's name under the prefix; default `POD_NAME`, else the host name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Delete local copies once their upload is confirmed (the newest segment stays).
    pub delete_local: bool,
    /// How often the audit directory is scanned for sealed segments (seconds; default 5).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval_secs: Option<u64>,
    /// Options for the object store (`endpoint`, `region`, `allow_http`...); credentials
    /// come from each cloud's standard environment.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub options: std::collections::BTreeMap<String, String>,
}

/// `[otel]`: each exchange exported as a span following the GenAI semantic conventions,
/// from the writer (never the request path).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Otel {
    /// The collector's OTLP/HTTP base URL (`http://collector:4318`; `/v1/traces` is
    /// appended unless the URL already ends with it); unset: no export. Headers (an API
    /// key for a hosted backend) come from `OTEL_EXPORTER_OTLP_HEADERS`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Also export the (redacted) messages, as the `gen_ai.client.inference.operation.details`
    /// event. Off: spans carry metadata only.
    pub content: bool,
    /// `service.name` of custody's spans.
    pub service_name: String,
    /// How long one export may take before it is abandoned (seconds).
    pub timeout_secs: u64,
    /// Spans held for export; past it new spans are dropped (and counted), never waited for.
    pub queue: usize,
}

impl Default for Otel {
    fn default() -> Self {
        Self {
            endpoint: None,
            content: false,
            service_name: "custody".into(),
            timeout_secs: 10,
            queue: 2048,
        }
    }
}

impl Otel {
    fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |key: &str, reason: &str| ConfigError::Invalid {
            origin: origin.to_owned(),
            key: format!("otel.{key}"),
            reason: reason.to_owned(),
        };
        if let Some(url) = &self.endpoint {
            if crate::secret::url_password(url).is_some() || url.contains('@') {
                return Err(invalid(
                    "endpoint",
                    "must not carry credentials; put them in OTEL_EXPORTER_OTLP_HEADERS",
                ));
            }
            let ok = http::Uri::from_str(url).is_ok_and(|u| {
                matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some()
            });
            if !ok {
                return Err(invalid(
                    "endpoint",
                    "must be an http:// or https:// URL (`http://collector:4318`)",
                ));
            }
        }
        if self.timeout_secs == 0 || self.queue == 0 {
            return Err(invalid("timeout_secs / queue", "must be greater than 0"));
        }
        if self.service_name.is_empty() {
            return Err(invalid("service_name", "must not be empty"));
        }
        Ok(())
    }
}

/// `[admin]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Admin {
    /// Where `/metrics`, `/healthz`, `/readyz` and `/admin/*` are served; `"off"` for none.
    #[serde(with = "optional_addr")]
    pub addr: Option<SocketAddr>,
    /// Bearer token for `/admin/*` endpoints (prefer `token_env`). Neither: they are off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Environment variable holding the admin token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_env: Option<String>,
}

impl Default for Admin {
    fn default() -> Self {
        Self {
            addr: Some(SocketAddr::from(([127, 0, 0, 1], 9090))),
            token: None,
            token_env: None,
        }
    }
}

/// An address, or `"off"`.
mod optional_addr {
    use std::net::SocketAddr;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(a) => s.collect_str(a),
            None => s.serialize_str("off"),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        let text = String::deserialize(d)?;
        if text == "off" {
            return Ok(None);
        }
        text.parse().map(Some).map_err(|_| {
            serde::de::Error::custom(format!("`{text}` is not an address (or \"off\")"))
        })
    }
}

/// `[log]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Log {
    /// `text` or `json` (one JSON object per line).
    pub format: LogFormat,
    /// One line per exchange (route, status, outcome, durations; no bodies, no keys).
    pub exchanges: bool,
}

impl Default for Log {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            exchanges: false,
        }
    }
}

/// `[log] format`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// `[audit] on_full`: what a request meets when the writer is behind and the queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFull {
    /// Wait (asynchronously, up to `admission_timeout_ms`) for room, then 503.
    #[default]
    Backpressure,
    /// 503 at once: no unaudited traffic (fail closed).
    Reject,
    /// Proceed unaudited (fail open); the loss is recorded as a `gap` event.
    Drop,
}

/// `[[key]]`: a virtual key a client presents instead of a provider key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtualKey {
    /// Recorded as `client.key_id`; unique, not secret.
    pub id: String,
    /// Recorded as `client.user`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Recorded as `client.team`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team: Option<String>,
    /// Lowercase hex SHA-256 of the key the client presents (`custody key new` prints
    /// it), so that the file holds no secret. Exactly one of this and `key_env`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_sha256: Option<String>,
    /// Environment variable holding the key the client presents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_env: Option<String>,
    /// Route names this key may use; unset: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes: Option<Vec<String>>,
    /// Models this key may ask for (request `model`, Azure deployment, Gemini model);
    /// unset: all. Setting it makes custody read the request body before forwarding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<String>>,
    /// Environment variable holding the provider key sent upstream for this client;
    /// unset: the route's `upstream_key_env`, else no credential is sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_key_env: Option<String>,
}

/// `[lineage]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Lineage {
    /// Request header carrying the application's session id (`session.id`).
    pub session_header: String,
    /// Request header naming the prompt template (`prompt.template.id`).
    pub prompt_id_header: String,
    /// Request header carrying the prompt template's version (`prompt.template.version`).
    pub prompt_version_header: String,
    /// Recent conversation turns the writer remembers to link a request to the record
    /// it continues (`chain.conversation_parent`).
    pub conversation_index_size: usize,
}

impl Default for Lineage {
    fn default() -> Self {
        Self {
            session_header: "x-session-id".into(),
            prompt_id_header: "x-prompt-id".into(),
            prompt_version_header: "x-prompt-version".into(),
            conversation_index_size: 100_000,
        }
    }
}

/// `[listen]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Listen {
    /// Socket address to accept HTTP/1.1 and cleartext HTTP/2 on.
    pub addr: SocketAddr,
    /// On SIGTERM/SIGINT, how long in-flight exchanges may take to finish before they are cut.
    pub shutdown_grace_secs: u64,
    /// Serve TLS (1.2 and 1.3, HTTP/2 and HTTP/1.1 by ALPN) instead of cleartext.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<ListenTls>,
}

/// `[listen.tls]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenTls {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates: set, every client must present a certificate they signed (mTLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
    /// How often the files are checked for changes; a change is loaded for new
    /// connections without a restart.
    #[serde(default = "default_tls_reload_secs")]
    pub reload_secs: u64,
}

fn default_tls_reload_secs() -> u64 {
    10
}

impl Default for Listen {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            shutdown_grace_secs: 30,
            tls: None,
        }
    }
}

/// `[audit]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Audit {
    /// Directory holding the segment files and the fingerprint key; created 0700 if missing.
    pub dir: PathBuf,
    /// A segment is rotated once it holds this many bytes.
    pub segment_max_bytes: u64,
    /// A segment is rotated once it is this old (and holds at least one record).
    pub segment_max_age_secs: u64,
    /// Exchanges waiting for the writer; when full, new exchanges are dropped and counted.
    pub queue_capacity: usize,
    /// Bytes of each body (request and response, separately) kept for the record;
    /// beyond it the record says `truncated` and carries the full length.
    pub capture_max_bytes: usize,
    /// Largest size a compressed body (`Content-Encoding`) may decode to for the record;
    /// past it the body is omitted (its length and hash kept) and the record says why.
    /// Bounds the writer's memory against decompression bombs.
    pub decoded_max_bytes: usize,
    /// File holding the secret for `client.key_id` fingerprints (HMAC-SHA-256).
    /// Unset: `<dir>/fingerprint.key`, generated on first start.
    pub fingerprint_key_file: Option<PathBuf>,
    /// When written blocks are fsynced: `interval` (at most `fsync_interval_ms` after
    /// being written), `always` (every block), `never` (left to the OS; seals and
    /// checkpoints are still synced).
    pub fsync: Fsync,
    /// Longest time a written block may wait for fsync under `fsync = "interval"`.
    pub fsync_interval_ms: u64,
    /// Ed25519 private key (hex seed, from `custody keygen`) that signs seals and
    /// checkpoints. Unset: statements are unsigned and the trail is a hash chain only.
    pub signing_key: Option<PathBuf>,
    /// A signed checkpoint of the live segment is written at least this often while
    /// records arrive, and at shutdown.
    pub checkpoint_interval_secs: u64,
    /// Sealed segments whose newest record is older than this many days are deleted by
    /// custody, oldest first, each deletion recorded as an event in the chain. Unset:
    /// keep everything. `0` deletes every segment as soon as it is sealed.
    pub retention_days: Option<u32>,
    /// Request and response bodies of sealed segments whose newest record is older than
    /// this many days are purged: every other field, the chain, the seals and the
    /// tree heads stay verifiable, and each purge is an event in the chain. Unset: bodies
    /// are kept as long as their segment. Must be shorter than `retention_days`.
    pub content_retention_days: Option<u32>,
    /// When the queue is full (`queue_capacity` exchanges or `queue_max_bytes` of
    /// captured bodies): `backpressure`, `reject` or `drop`. Decided at admission, before
    /// the request goes upstream; a response already streaming is never stalled.
    pub on_full: OnFull,
    /// Captured body bytes the queue may hold.
    pub queue_max_bytes: u64,
    /// Under `backpressure`, how long a request may wait for room before its 503.
    pub admission_timeout_ms: u64,
    /// `async`: records are fsynced within `fsync_interval_ms`. `durable`: a response's
    /// last frame reaches the client only once its record is fsynced (group commit).
    pub durability: Durability,
    /// Served-model tracking (`drift` events in the chain) and the live drift metrics
    /// (`custody_gen_ai_*`). Off saves the writer their cost (see `docs/benchmarks.md`).
    pub drift: bool,
}

/// `[audit] durability`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    #[default]
    Async,
    Durable,
}

/// `[audit] fsync`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fsync {
    #[default]
    Interval,
    Always,
    Never,
}

impl Default for Audit {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("./custody-audit"),
            segment_max_bytes: 128 * 1024 * 1024,
            segment_max_age_secs: 3600,
            queue_capacity: 4096,
            capture_max_bytes: 16 * 1024 * 1024,
            decoded_max_bytes: 32 * 1024 * 1024,
            fingerprint_key_file: None,
            fsync: Fsync::Interval,
            fsync_interval_ms: 100,
            signing_key: None,
            checkpoint_interval_secs: 10,
            retention_days: None,
            content_retention_days: None,
            on_full: OnFull::Backpressure,
            queue_max_bytes: 64 * 1024 * 1024,
            admission_timeout_ms: 5000,
            durability: Durability::Async,
            drift: true,
        }
    }
}

/// `[upstream]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Upstream {
    /// TCP connect (and TLS handshake) deadline; past it the client gets a 504.
    pub connect_timeout_secs: u64,
    /// Deadline for the upstream's response head after the request was sent; past it, 504.
    /// Long, because a non-streamed completion sends nothing until it is done.
    pub response_timeout_secs: u64,
    /// Idle pooled upstream connections are closed after this long.
    pub pool_idle_timeout_secs: u64,
    /// Longest silence between two chunks of an upstream response (a stalled stream);
    /// past it the exchange ends as `upstream_timeout`. `0`: no limit.
    pub idle_timeout_secs: u64,
    /// Longest a whole exchange may take, head to last byte. `0`: no limit.
    pub total_timeout_secs: u64,
    /// PEM file of extra CA certificates trusted for upstreams (a private gateway, a
    /// corporate proxy), on top of the public roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

/// `[limits]`: what one client may do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest request body; larger gets a 413 (recorded).
    pub max_request_body_bytes: u64,
    /// Largest request head (request line and headers); larger gets a 431 (recorded).
    pub max_header_bytes: usize,
    /// Client connections served at once; beyond it, requests get a 503 (recorded).
    pub max_connections: usize,
    /// Longest a client may take to send its request head, and the longest silence
    /// while it sends its body (slow clients).
    pub client_timeout_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_request_body_bytes: 64 * 1024 * 1024,
            max_header_bytes: 64 * 1024,
            max_connections: 10_000,
            client_timeout_secs: 30,
        }
    }
}

impl Default for Upstream {
    fn default() -> Self {
        Self {
            connect_timeout_secs: 10,
            response_timeout_secs: 600,
            pool_idle_timeout_secs: 90,
            idle_timeout_secs: 300,
            total_timeout_secs: 3600,
            ca_file: None,
        }
    }
}

/// `[[route]]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Name recorded in every record of this route; unique.
    pub name: String,
    /// Path prefix this route serves, starting with `/`. The longest matching prefix wins.
    pub prefix: String,
    /// Base URL of the provider: `http(s)://host[:port][/base/path]`.
    pub upstream: UpstreamUrl,
    /// How exchanges on this route are understood: `openai`, `anthropic` or `generic`.
    #[serde(default)]
    pub provider: Provider,
    /// Remove `prefix` from the path before forwarding (`/anthropic/v1/messages` -> `/v1/messages`).
    #[serde(default)]
    pub strip_prefix: bool,
    /// Environment variable holding the provider key sent upstream for clients with a
    /// virtual key that names none of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_key_env: Option<String>,
}

/// The API family behind a route; it decides how the writer parses exchanges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// OpenAI and OpenAI-compatible servers (vLLM, Ollama, LM Studio...).
    Openai,
    /// Anthropic's Messages API.
    Anthropic,
    /// Azure OpenAI (`/openai/deployments/{deployment}/...?api-version=`, and `/openai/v1/`).
    Azure,
    /// Google Gemini API (`/v1beta/models/{model}:generateContent`...).
    Gemini,
    /// Anything else: recorded as a plain HTTP exchange.
    #[default]
    Generic,
}

impl Provider {
    /// The `gen_ai.provider.name` value, where there is one.
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Openai => "openai",
            Provider::Anthropic => "anthropic",
            Provider::Azure => "azure.ai.openai",
            Provider::Gemini => "gcp.gemini",
            Provider::Generic => "generic",
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An upstream base URL, checked when the file is parsed so that errors carry the line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    uri: http::Uri,
}

impl UpstreamUrl {
    /// `http` or `https`.
    pub fn scheme(&self) -> &str {
        self.uri.scheme_str().unwrap_or("https")
    }
    /// `host[:port]`.
    pub fn authority(&self) -> &str {
        self.uri.authority().map(|a| a.as_str()).unwrap_or_default()
    }
    /// The base path without a trailing slash (empty for none).
    pub fn base_path(&self) -> &str {
        self.uri.path().trim_end_matches('/')
    }
}

impl FromStr for UpstreamUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let uri: http::Uri = s.parse().map_err(|e| format!("is not a URL ({e})"))?;
        match uri.scheme_str() {
            Some("http") | Some("https") => {}
            _ => return Err("must start with http:// or https://".into()),
        }
        let Some(authority) = uri.authority() else {
            return Err("has no host".into());
        };
        // Never used (the provider key travels in its header), and a credential that
        // would otherwise reach logs and the config snapshot.
        if authority.as_str().contains('@') {
            return Err(
                "must not carry credentials (`user:password@`); use `upstream_key_env`".into(),
            );
        }
        if uri.query().is_some() {
            return Err("must not carry a query".into());
        }
        Ok(Self { uri })
    }
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}://{}{}",
            self.scheme(),
            self.authority(),
            self.base_path()
        )
    }
}

impl<'de> Deserialize<'de> for UpstreamUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        // The value is not echoed: a pasted URL may hold a credential.
        s.parse()
            .map_err(|e| serde::de::Error::custom(format!("upstream URL {e}")))
    }
}

impl Serialize for UpstreamUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

// === impl Config ===

impl Config {
    /// Checks the rules that the types alone cannot; errors name the key.
    pub fn validate(self, origin: &str) -> Result<Self, ConfigError> {
        let invalid = |key: String, reason: &str| ConfigError::Invalid {
            origin: origin.to_owned(),
            key,
            reason: reason.to_owned(),
        };
        if self.routes.is_empty() {
            return Err(invalid("route".into(), "at least one [[route]] is needed"));
        }
        let mut names = HashSet::new();
        let mut prefixes = HashSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            let key = |field: &str| format!("route[{i}].{field} (route `{}`)", r.name);
            if r.name.is_empty() {
                return Err(invalid(key("name"), "must not be empty"));
            }
            if !names.insert(r.name.as_str()) {
                return Err(invalid(key("name"), "is used by another route"));
            }
            if !r.prefix.starts_with('/') {
                return Err(invalid(key("prefix"), "must start with `/`"));
            }
            if !prefixes.insert(r.prefix.as_str()) {
                return Err(invalid(key("prefix"), "is used by another route"));
            }
        }
        let mut ids = HashSet::new();
        for (i, k) in self.keys.iter().enumerate() {
            let key = |field: &str| format!("key[{i}].{field} (key `{}`)", k.id);
            if k.id.is_empty() {
                return Err(invalid(key("id"), "must not be empty"));
            }
            if !ids.insert(k.id.as_str()) {
                return Err(invalid(key("id"), "is used by another key"));
            }
            match (&k.key_sha256, &k.key_env) {
                (Some(h), None) => {
                    if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return Err(invalid(key("key_sha256"), "must be 64 hex digits"));
                    }
                }
                (None, Some(_)) => {}
                _ => {
                    return Err(invalid(
                        key("key_sha256"),
                        "exactly one of `key_sha256` and `key_env` is needed",
                    ))
                }
            }
            for r in k.routes.iter().flatten() {
                if !names.contains(r.as_str()) {
                    return Err(invalid(key("routes"), &format!("names no route `{r}`")));
                }
            }
        }
        for h in [
            &self.lineage.session_header,
            &self.lineage.prompt_id_header,
            &self.lineage.prompt_version_header,
        ] {
            if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                return Err(invalid(format!("lineage: `{h}`"), "is not a header name"));
            }
        }
        let a = &self.audit;
        let positive: [(&str, u64); 7] = [
            ("audit.segment_max_bytes", a.segment_max_bytes),
            ("audit.decoded_max_bytes", a.decoded_max_bytes as u64),
            ("audit.segment_max_age_secs", a.segment_max_age_secs),
            ("audit.queue_capacity", a.queue_capacity as u64),
            ("audit.capture_max_bytes", a.capture_max_bytes as u64),
            (
                "upstream.connect_timeout_secs",
                self.upstream.connect_timeout_secs,
            ),
            ("audit.checkpoint_interval_secs", a.checkpoint_interval_secs),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(invalid(key.into(), "must be greater than 0"));
            }
        }
        if self.upstream.response_timeout_secs == 0 {
            return Err(invalid(
                "upstream.response_timeout_secs".into(),
                "must be greater than 0",
            ));
        }
        if let Err((key, reason)) = self.redaction.check() {
            return Err(invalid(key, &reason));
        }
        let entities: HashSet<&str> = crate::BUILTIN_ENTITIES
            .iter()
            .copied()
            .chain(self.redaction.custom.iter().map(|c| c.name.as_str()))
            .collect();
        if let Err((key, reason)) =
            crate::policy::check(&self.policies, &self.policy_terms, &names, &entities)
        {
            return Err(invalid(key, &reason));
        }
        if let (Some(content), Some(all)) = (a.content_retention_days, a.retention_days) {
            if content >= all {
                return Err(invalid(
                    "audit.content_retention_days".into(),
                    "must be shorter than audit.retention_days (segments are deleted whole at retention_days)",
                ));
            }
        }
        if a.dir.as_os_str().is_empty() {
            return Err(invalid("audit.dir".into(), "must not be empty"));
        }
        match &self.console {
            Some(console) => {
                if let Err((key, reason)) = crate::console::check(console, &self.reviewers) {
                    return Err(invalid(key, &reason));
                }
            }
            None if !self.reviewers.is_empty() => {
                return Err(invalid(
                    "reviewer".into(),
                    "[[reviewer]] entries need a [console] section",
                ));
            }
            None => {}
        }
        if let Some(url) = &self.ship.url {
            if crate::secret::url_password(url).is_some() {
                return Err(invalid(
                    "ship.url".into(),
                    "must not carry credentials (`user:password@`); use the store's environment",
                ));
            }
        }
        self.otel.validate(origin)?;
        Ok(self)
    }

    /// A configuration for tests: one route per given `(name, prefix, upstream, provider)`,
    /// listening on `127.0.0.1:0`, auditing into `dir`.
    pub fn for_test(dir: impl Into<PathBuf>, routes: Vec<Route>) -> Self {
        Self {
            listen: Listen {
                addr: SocketAddr::from(([127, 0, 0, 1], 0)),
                shutdown_grace_secs: 5,
                tls: None,
            },
            audit: Audit {
                dir: dir.into(),
                ..Audit::default()
            },
            upstream: Upstream::default(),
            redaction: crate::Redaction::default(),
            routes,
            keys: Vec::new(),
            source: Default::default(),
            lineage: Lineage::default(),
            admin: Admin {
                addr: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
                ..Admin::default()
            },
            log: Log::default(),
            limits: Limits::default(),
            ship: Ship::default(),
            otel: Otel::default(),
            policies: Vec::new(),
            policy_terms: Default::default(),
            console: None,
            reviewers: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DEFAULT_TOML;

    #[test]
    fn embedded_default_is_valid_and_matches_the_contract() {
        let c = Config::embedded_default().unwrap();
        assert_eq!(c.listen.addr.to_string(), "127.0.0.1:8080");
        assert_eq!(c.audit.dir, PathBuf::from("./custody-audit"));
        assert_eq!(c.routes.len(), 2);
        assert_eq!(c.routes[0].name, "openai");
        assert_eq!(c.routes[0].prefix, "/v1/");
        assert_eq!(c.routes[0].upstream.to_string(), "https://api.openai.com");
        assert_eq!(c.routes[0].provider, Provider::Openai);
        assert!(!c.routes[0].strip_prefix);
        assert_eq!(c.routes[1].provider, Provider::Anthropic);
        assert!(c.routes[1].strip_prefix);
        assert!(DEFAULT_TOML.contains("strip_prefix = true"));
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_line() {
        let text = "[listen]\naddr = \"127.0.0.1:1\"\nport = 3\n";
        let err = Config::from_toml_str(text, "x.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("x.toml"), "{err}");
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("port"), "{err}");
    }

    #[test]
    fn bad_upstream_names_its_line() {
        let text = "[[route]]\nname = \"a\"\nprefix = \"/\"\nupstream = \"ftp://x\"\n";
        let err = Config::from_toml_str(text, "x.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 4"), "{err}");
        assert!(err.contains("http://"), "{err}");
    }

    #[test]
    fn rule_violations_name_the_key() {
        let base =
            "[[route]]\nname = \"a\"\nprefix = \"/v1/\"\nupstream = \"http://127.0.0.1:9\"\n";
        let dup = format!("{base}{base}");
        let err = Config::from_toml_str(&dup, "x").unwrap_err().to_string();
        assert!(err.contains("route[1].name"), "{err}");
        let no_slash = base.replace("\"/v1/\"", "\"v1\"");
        let err = Config::from_toml_str(&no_slash, "x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("route[0].prefix"), "{err}");
        let zero = format!("[audit]\nqueue_capacity = 0\n{base}");
        let err = Config::from_toml_str(&zero, "x").unwrap_err().to_string();
        assert!(err.contains("audit.queue_capacity"), "{err}");
        let err = Config::from_toml_str("", "x").unwrap_err().to_string();
        assert!(err.contains("[[route]]"), "{err}");
    }

    #[test]
    fn redaction_rules_are_checked_by_name() {
        let base = "[[route]]\nname = \"a\"\nprefix = \"/\"\nupstream = \"http://127.0.0.1:9\"\n";
        let ok = format!("[redaction]\ndefault_mode = \"pseudonymize\"\nallow = [\"help@example.com\"]\n[redaction.entities]\nIP_ADDRESS = \"off\"\nACME = \"drop\"\n[[redaction.custom]]\nname = \"ACME\"\nprefix = \"acme_\"\nmin_len = 8\n{base}");
        let c = Config::from_toml_str(&ok, "x").unwrap();
        assert_eq!(c.redaction.mode_of("IP_ADDRESS"), crate::Mode::Off);
        assert_eq!(
            c.redaction.mode_of("EMAIL_ADDRESS"),
            crate::Mode::Pseudonymize
        );
        for (bad, want) in [
            (
                "[redaction.entities]\nNOPE = \"mask\"\n",
                "redaction.entities.NOPE",
            ),
            (
                "[[redaction.custom]]\nname = \"X1\"\nterms = [\"ab\"]\n",
                "rule `X1`",
            ),
            (
                "[[redaction.custom]]\nname = \"lower\"\nterms = [\"abc\"]\n",
                "UPPER_SNAKE_CASE",
            ),
            (
                "[[redaction.custom]]\nname = \"EMAIL_ADDRESS\"\nterms = [\"abc\"]\n",
                "already an entity",
            ),
            (
                "[[redaction.custom]]\nname = \"Y\"\n",
                "needs `terms` or a `prefix`",
            ),
            (
                "[[redaction.custom]]\nname = \"Z\"\nprefix = \"zz_\"\nmin_len = 9\nmax_len = 3\n",
                "min_len",
            ),
        ] {
            let err = Config::from_toml_str(&format!("{bad}{base}"), "x")
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{bad}: {err}");
        }
        let err = Config::from_toml_str(&format!("[redaction]\nmode = \"mask\"\n{base}"), "x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn errors_never_echo_a_pasted_secret() {
        let base = "[[route]]\nname = \"a\"\nprefix = \"/\"\nupstream = \"http://127.0.0.1:9\"\n";
        // A syntax error on a line holding a token, a token as a wrong-typed value, and
        // credentials in an upstream URL: each error names the line, never the text.
        for bad in [
            "[admin]\ntoken = \"sk-live-SECRET123\" oops\n".to_owned(),
            "[limits]\nmax_connections = \"sk-live-SECRET123\"\n".to_owned(),
            "[[route]]\nname = \"b\"\nprefix = \"/b/\"\nupstream = \"https://u:sk-live-SECRET123@api.example.com\"\n"
                .to_owned(),
        ] {
            let err = Config::from_toml_str(&format!("{bad}{base}"), "x")
                .unwrap_err()
                .to_string();
            assert!(!err.contains("SECRET123"), "{err}");
            assert!(err.contains("line 2") || err.contains("line 4"), "{err}");
        }
        let err = Config::from_toml_str(
            &format!("[[route]]\nname = \"b\"\nprefix = \"/b/\"\nupstream = \"https://user@api.example.com\"\n{base}"),
            "x",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("must not carry credentials"), "{err}");
        let err = Config::from_toml_str(
            &format!("[ship]\nurl = \"s3://k:SECRET123@bucket/p\"\n{base}"),
            "x",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("ship.url") && !err.contains("SECRET123"),
            "{err}"
        );
        for bad in [
            "http://k:SECRET123@collector:4318",
            "http://SECRET123@collector:4318",
            "collector:4318",
            "ftp://collector",
        ] {
            let err = Config::from_toml_str(&format!("[otel]\nendpoint = \"{bad}\"\n{base}"), "x")
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("otel.endpoint") && !err.contains("SECRET123"),
                "{err}"
            );
        }
        let ok = Config::from_toml_str(
            &format!("[otel]\nendpoint = \"https://collector:4318\"\ncontent = true\n{base}"),
            "x",
        )
        .unwrap();
        assert!(ok.otel.content);
    }

    #[test]
    fn a_config_path_that_is_not_a_small_regular_file_is_refused() {
        let err = Config::load(std::path::Path::new("/dev/zero"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a regular file"), "{err}");
        let dir = std::env::temp_dir().join(format!("custody-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let big = dir.join("big.toml");
        let f = std::fs::File::create(&big).unwrap();
        f.set_len(crate::load::MAX_CONFIG_BYTES + 10).unwrap();
        let err = Config::load(&big).unwrap_err().to_string();
        assert!(err.contains("larger than"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn upstream_base_path_is_kept() {
        let u: UpstreamUrl = "http://127.0.0.1:9/base/".parse().unwrap();
        assert_eq!(u.scheme(), "http");
        assert_eq!(u.authority(), "127.0.0.1:9");
        assert_eq!(u.base_path(), "/base");
    }
}
