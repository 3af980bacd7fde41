//! The request path's share of the policies: enforcing `block` and `sanitize` rules,
//! evaluated on the request body before anything goes upstream. The proxy calls
//! [`RequestPolicy::check`] only for routes such a rule applies to; other requests
//! never read their body here.

use std::{collections::BTreeMap, sync::Arc};

use bytes::Bytes;
use custody_config::{Config, Mode, Provider};
use http::HeaderMap;
use serde_json::Value as Json;

use super::{Decision, Facts, Phase, PolicySet, SideFacts};
use crate::{
    decode::decode_body,
    genai::{self, GenAiFacts, Operation},
    redact::{Counts, Redactor},
    AuditError,
};

/// Who and where a request comes from, as the proxy knows it at admission.
pub struct RequestHead<'a> {
    pub route: &'a str,
    pub provider: Provider,
    /// The path as forwarded upstream.
    pub path: &'a str,
    pub headers: &'a HeaderMap,
    /// From the virtual key, when keys are on.
    pub key_id: Option<&'a str>,
    pub user: Option<&'a str>,
    pub team: Option<&'a str>,
}

impl RequestHead<'_> {
    /// An owned copy, for evaluation on another thread.
    pub fn to_owned(&self) -> OwnedHead {
        let s = |v: Option<&str>| v.map(str::to_owned);
        OwnedHead {
            route: self.route.to_owned(),
            provider: self.provider,
            path: self.path.to_owned(),
            headers: self.headers.clone(),
            key_id: s(self.key_id),
            user: s(self.user),
            team: s(self.team),
        }
    }
}

/// [`RequestHead`], owned.
pub struct OwnedHead {
    route: String,
    provider: Provider,
    path: String,
    headers: HeaderMap,
    key_id: Option<String>,
    user: Option<String>,
    team: Option<String>,
}

impl OwnedHead {
    pub fn as_head(&self) -> RequestHead<'_> {
        RequestHead {
            route: &self.route,
            provider: self.provider,
            path: &self.path,
            headers: &self.headers,
            key_id: self.key_id.as_deref(),
            user: self.user.as_deref(),
            team: self.team.as_deref(),
        }
    }
}

/// What the request-path rules decided.
#[derive(Debug, Default)]
pub struct Checked {
    pub decisions: Vec<Decision>,
    /// The blocking rule's message, when one blocks.
    pub blocked: Option<String>,
    /// The body to forward instead, when a sanitize rule replaced something.
    pub body: Option<Bytes>,
    /// Entities replaced in the forwarded body, by name.
    pub sanitized: BTreeMap<String, u64>,
    /// The forwarded body is no longer compressed (it was decoded to be sanitized).
    pub decoded: bool,
    pub seconds: f64,
}

/// The compiled set with what the request path needs beside it.
pub struct RequestPolicy {
    set: Arc<PolicySet>,
    /// Counts `request.entities` (the `[redaction]` engine), when a rule names them.
    counter: Option<Redactor>,
    /// Each sanitize rule's engine: its entities only, replaced as `[redaction]` would.
    sanitizers: BTreeMap<usize, Redactor>,
    session_header: http::HeaderName,
    source: BTreeMap<String, String>,
    decode_limit: usize,
}

impl std::fmt::Debug for RequestPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestPolicy")
            .field("set", &self.set)
            .finish()
    }
}

/// The message a blocked client gets when its rule names none.
pub const DEFAULT_BLOCK_MESSAGE: &str = "custody: this request was blocked by policy";

impl RequestPolicy {
    /// `None` when no rule acts on requests: the request path then never reads a body
    /// for policies.
    pub fn new(config: &Config, set: Arc<PolicySet>) -> Result<Option<Self>, AuditError> {
        if !set.rules().iter().any(|r| r.in_phase(Phase::Request)) {
            return Ok(None);
        }
        let counter = if set.needs(Phase::Request).request_entities() {
            Some(crate::fingerprint::redactor_for(config)?)
        } else {
            None
        };
        let mut sanitizers = BTreeMap::new();
        for (i, r) in set.rules().iter().enumerate() {
            if r.in_phase(Phase::Request) && r.policy.action == custody_config::Action::Sanitize {
                sanitizers.insert(i, sanitizer(config, r.policy.entities.as_deref())?);
            }
        }
        // Validation checked it is a header name.
        let session_header = http::HeaderName::from_bytes(config.lineage.session_header.as_bytes())
            .unwrap_or(http::HeaderName::from_static("x-session-id"));
        Ok(Some(Self {
            set,
            counter,
            sanitizers,
            session_header,
            source: crate::record::source_map(&config.source),
            decode_limit: config.audit.decoded_max_bytes,
        }))
    }

    pub fn version(&self) -> &str {
        self.set.version()
    }

    /// Whether an enforcing request rule applies to `route`.
    pub fn applies(&self, route: &str) -> bool {
        self.set.applies(Phase::Request, route)
    }

    /// The decisions when the body could not be read whole: every rule that applies
    /// failed to evaluate, for `why`, and blocks if its `on_error` says so.
    pub fn unread(&self, route: &str, why: &str) -> Checked {
        let verdict = self.set.unevaluated(Phase::Request, route, why);
        Checked {
            blocked: verdict.block.map(|i| self.message(i)),
            decisions: verdict.decisions,
            ..Checked::default()
        }
    }

    fn message(&self, rule: usize) -> String {
        self.set.rules()[rule]
            .policy
            .message
            .clone()
            .unwrap_or_else(|| DEFAULT_BLOCK_MESSAGE.to_owned())
    }

    /// Evaluates the request rules on a whole request body. A body that is not JSON
    /// is evaluated as text (`request.text` is all of it).
    pub fn check(&self, head: &RequestHead<'_>, raw: &[u8]) -> Checked {
        // A body the rules cannot read (a bad or oversized encoding) is not let through
        // as if it were clean: every rule says it was not evaluated, per its `on_error`.
        let decoded = match decode_body(head.headers, raw.into(), self.decode_limit) {
            Ok(d) => d,
            Err(e) => return self.unread(head.route, &format!("request body not evaluated: {e}")),
        };
        let was_encoded = matches!(decoded, std::borrow::Cow::Owned(_));
        // Invalid bytes do not hide text from the rules. (`from_utf8` first: the lossy
        // scan is several times slower on valid text.)
        let text = match std::str::from_utf8(&decoded) {
            Ok(t) => std::borrow::Cow::Borrowed(t),
            Err(_) => String::from_utf8_lossy(&decoded),
        };
        let text = text.as_ref();
        // The conversation is read where it lies; only the settings become a value.
        let (body_text, settings, is_json) = match super::facts::RequestView::read(text) {
            Some(v) => {
                let (t, settings) = v.into_parts();
                (t, settings, true)
            }
            // JSON that is not an object (no provider's request), else not JSON at all.
            None => match serde_json::from_str::<Json>(text) {
                Ok(v) => (super::facts::text_of(&v).into(), Json::Null, true),
                Err(_) => (std::borrow::Cow::Borrowed(text), Json::Null, false),
            },
        };
        let needs = self.set.needs(Phase::Request);
        let op = Operation::detect(head.provider, head.path);
        let mut g = GenAiFacts::default();
        if let (Some(op), true) = (op, is_json) {
            let path_model = genai::path_model(head.provider, head.path);
            genai::request_facts(op, &settings, path_model, &mut g);
        }
        let mut request = SideFacts::default();
        if needs.text("request") {
            request.text = body_text;
        }
        if needs.has("request") {
            if let Some(r) = &self.counter {
                let mut counts = Counts::new();
                if is_json {
                    r.redact_valid_json_text(text, &mut counts);
                } else {
                    r.redact_str(text, &mut counts);
                }
                request.entities = counts.into_map();
            }
            request.tools = std::mem::take(&mut g.tool_names);
        }
        let facts = Facts {
            route: head.route.to_owned(),
            provider: head.provider.as_str().to_owned(),
            operation: op.map(|o| o.name().to_owned()).unwrap_or_default(),
            model: g.request_model.take().unwrap_or_default(),
            user: head
                .user
                .map(str::to_owned)
                .or(g.end_user.take())
                .unwrap_or_default(),
            team: head.team.unwrap_or_default().to_owned(),
            key_id: head.key_id.unwrap_or_default().to_owned(),
            session: head
                .headers
                .get(&self.session_header)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned(),
            source: if needs.has("source") {
                self.source.clone()
            } else {
                BTreeMap::new()
            },
            request,
            ..Facts::default()
        };
        let verdict = self.set.evaluate(&facts, Phase::Request);
        let mut out = Checked {
            seconds: verdict.seconds,
            ..Checked::default()
        };
        if let Some(i) = verdict.block {
            out.blocked = Some(self.message(i));
        } else if !verdict.sanitize.is_empty() && !text.is_empty() {
            let mut counts = Counts::new();
            let mut body = text.to_owned();
            for i in &verdict.sanitize {
                let Some(r) = self.sanitizers.get(i) else {
                    continue;
                };
                let replaced = if is_json {
                    r.redact_valid_json_text(&body, &mut counts)
                } else {
                    Some(r.redact_str(&body, &mut counts).into_owned())
                };
                if let Some(b) = replaced {
                    body = b;
                }
            }
            if !counts.is_empty() {
                out.sanitized = counts.into_map();
                out.body = Some(Bytes::from(body));
                out.decoded = was_encoded;
            }
        }
        out.decisions = verdict.decisions;
        out
    }
}

/// The engine of a sanitize rule: `[redaction]` with only `entities` on (all of them
/// when unset); an entity `[redaction]` turns off is masked.
fn sanitizer(config: &Config, entities: Option<&[String]>) -> Result<Redactor, AuditError> {
    let mut c = config.clone();
    let r = &mut c.redaction;
    let all: Vec<String> = custody_config::BUILTIN_ENTITIES
        .iter()
        .map(|s| (*s).to_owned())
        .chain(r.custom.iter().map(|c| c.name.clone()))
        .collect();
    for name in all {
        let wanted = entities.is_none_or(|list| list.contains(&name));
        let mode = r.entities.get(&name).copied().unwrap_or(r.default_mode);
        let mode = match (wanted, mode) {
            (false, _) => Mode::Off,
            (true, Mode::Off) => Mode::Mask,
            (true, m) => m,
        };
        r.entities.insert(name, mode);
    }
    crate::fingerprint::redactor_for(&c)
}
