//! Turning a captured [`Exchange`] into a [`Record`]: decode, parse, reassemble, redact.
//! Runs on the writer thread only.

use std::{borrow::Cow, time::Instant};

use http::{HeaderMap, HeaderName};
use serde_json::{value::RawValue, Value};
use sha2::{Digest, Sha256};

use crate::{
    decode::decode_body,
    exchange::{Capture, Exchange, Outcome},
    fingerprint::{credential_token, Fingerprinter, CREDENTIAL_HEADERS},
    genai::{self, GenAiFacts, Operation},
    lineage::{self, Lineage, LineageHasher},
    policy::{self, Facts, Phase, PolicyRecord, PolicySet},
    record::{
        self, Body, Chain, Client, Completion, ConfigRef, Conversation, GenAi, GenAiRequest,
        GenAiResponse, Http, InputTokens, Name, OutputTokens, Prompt, Record, Session, Template,
        Time, Trace, Usage,
    },
    redact::{scrub_literals, Counts, Redactor},
};

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const REQUEST_ID: HeaderName = HeaderName::from_static("request-id");

/// Query parameters that carry credentials (Gemini's `key`, Azure's `api-key`...).
const CREDENTIAL_PARAMS: [&str; 5] = ["key", "api-key", "api_key", "access_token", "token"];

/// Which body of an exchange is being recorded; a response knows its operation.
#[derive(Clone, Copy)]
enum Side {
    Request,
    Response(Option<Operation>),
}

/// The request headers that carry lineage (`[lineage]`).
#[derive(Debug, Clone)]
pub struct LineageHeaders {
    pub session: HeaderName,
    pub prompt_id: HeaderName,
    pub prompt_version: HeaderName,
}

impl LineageHeaders {
    pub fn from_config(l: &custody_config::Lineage) -> Self {
        // Validation checked these are header names; fall back to the defaults anyway.
        let name = |s: &str, d: &'static str| {
            HeaderName::from_bytes(s.as_bytes()).unwrap_or(HeaderName::from_static(d))
        };
        Self {
            session: name(&l.session_header, "x-session-id"),
            prompt_id: name(&l.prompt_id_header, "x-prompt-id"),
            prompt_version: name(&l.prompt_version_header, "x-prompt-version"),
        }
    }
}

/// The largest text buffer the writer keeps from one record to the next.
const MAX_KEPT_TEXT: usize = 1 << 20;

/// Builds records; holds the automata and keys, built once.
pub struct Assembler {
    redactor: Redactor,
    /// Keys identity pseudonyms (`client.user`, `client.end_user`).
    identity_key: Vec<u8>,
    fingerprinter: Fingerprinter,
    lineage: LineageHasher,
    headers: LineageHeaders,
    /// `source` as JSON, the same on every record.
    source: Option<Box<RawValue>>,
    /// Largest decoded body accepted (a compressed body may expand; beyond this it is omitted).
    decode_limit: usize,
    /// The rules the writer evaluates (flag, and observe-mode rules).
    policy: std::sync::Arc<PolicySet>,
    /// `source.*` as the rules see it.
    source_map: std::collections::BTreeMap<String, String>,
    /// The request's and the response's text as the rules read it, reused from record
    /// to record (an allocation per text cost the writer more than reading it).
    texts: std::cell::RefCell<[String; 2]>,
}

/// What assembly learned beyond the record, for the writer's conversation index.
#[derive(Debug, Default)]
pub struct Learned {
    pub lineage: Lineage,
    pub response_id: Option<String>,
    pub previous_response_id: Option<String>,
    /// Time the writer's policy work took on this exchange: reading what the rules
    /// read, and evaluating them (0 without policies).
    pub policy_seconds: f64,
}

impl Assembler {
    pub fn new(
        redactor: Redactor,
        fingerprinter: Fingerprinter,
        decode_limit: usize,
        config: &custody_config::Config,
        policy: std::sync::Arc<PolicySet>,
    ) -> Self {
        let lineage = LineageHasher::new(&fingerprinter.derive("custody.lineage/v1"));
        Self {
            identity_key: identity_key(&fingerprinter),
            redactor,
            fingerprinter,
            lineage,
            headers: LineageHeaders::from_config(&config.lineage),
            source: source_json(&config.source),
            decode_limit,
            policy,
            source_map: record::source_map(&config.source),
            texts: Default::default(),
        }
    }

    /// The record for `ex`, with `seq` and `chain` left for the writer to fill in.
    pub fn assemble(&self, ex: &Exchange, seq: u64) -> (Record, Learned) {
        let mut counts = Counts::new();
        let credentials = self.credentials(&ex.request_headers, ex.uri.query());
        let key_id = match &ex.identity {
            Some(id) => Some(id.key_id.to_string()),
            None => credentials
                .first()
                .map(|c| self.fingerprinter.key_id(c.as_bytes())),
        };

        let path = ex.upstream_path.as_deref().unwrap_or_else(|| ex.uri.path());
        let op = Operation::detect(ex.provider, path);
        let path_model = genai::path_model(ex.provider, path);
        let mut facts = GenAiFacts::default();
        let mut prompt = Vec::new();
        let mut completion = None;
        // What the rules see of the bodies, read before redaction and never written;
        // and the time reading it takes, counted with the rules' own.
        let needs = self.policy.needs(Phase::Record);
        let mut texts = self.texts.borrow_mut();
        let [request_text, response_text] = &mut *texts;
        let (mut request_read, mut response_read) = (false, false);
        let mut seen = Facts::default();
        let mut reading = std::time::Duration::ZERO;

        let (req_body, _) = self.body(
            &ex.request_headers,
            &ex.request,
            &credentials,
            &mut counts,
            Side::Request,
            |v| {
                if let Some(op) = op {
                    genai::request_facts(op, v, path_model, &mut facts);
                    prompt = lineage::prompt_messages(op, v);
                }
                if needs.text("request") {
                    let t = Instant::now();
                    policy::facts::text_into(v, request_text);
                    request_read = true;
                    reading += t.elapsed();
                }
            },
        );
        let (resp_body, stream_error) = self.body(
            &ex.response_headers,
            &ex.response,
            &credentials,
            &mut counts,
            Side::Response(op),
            |v| {
                if let Some(op) = op {
                    genai::response_facts(op, v, &mut facts);
                    completion = lineage::completion_message(op, v);
                }
                if needs.text("response") || needs.tool_calls() {
                    let t = Instant::now();
                    if needs.text("response") {
                        policy::facts::text_into(v, response_text);
                        response_read = true;
                    }
                    if needs.tool_calls() {
                        seen.response.tools = policy::facts::tool_calls_of(v);
                    }
                    reading += t.elapsed();
                }
            },
        );
        if request_read {
            seen.request.text = request_text.as_str().into();
        }
        if response_read {
            seen.response.text = response_text.as_str().into();
        }
        if facts.request_model.is_none() {
            facts.request_model = path_model.map(str::to_owned);
        }
        let mut learned = Learned {
            lineage: Lineage {
                prefixes: self.lineage.prefixes(&prompt),
                completion: completion.map(|c| self.lineage.message(&c)),
            },
            response_id: facts.response_id.clone(),
            previous_response_id: facts.previous_response_id.clone(),
            policy_seconds: 0.0,
        };

        let ms = |t: Option<Instant>| t.map(|t| millis(t.duration_since(ex.started)));
        let rh = &ex.response_headers;
        let request_id = self
            .header(rh, &X_REQUEST_ID, &credentials, &mut counts)
            .or_else(|| self.header(rh, &REQUEST_ID, &credentials, &mut counts));
        let qh = &ex.request_headers;
        let user_agent = self.header(qh, &http::header::USER_AGENT, &credentials, &mut counts);
        let session = self
            .header(qh, &self.headers.session, &credentials, &mut counts)
            .map(|id| Session { id });
        let template_id = self.header(qh, &self.headers.prompt_id, &credentials, &mut counts);
        let template_version =
            self.header(qh, &self.headers.prompt_version, &credentials, &mut counts);
        let query = ex.uri.query().map(|q| self.query(q, &mut counts));
        // Every field custody extracts is redacted like the bodies: a client can put
        // anything (its own key, an e-mail address) where a model or user is expected.
        let key_user = ex.identity.as_ref().and_then(|i| i.user.as_deref());
        if !self.policy.is_empty() {
            let copy = |name: &str, v: Option<&String>| match v {
                Some(v) if needs.has(name) => v.clone(),
                _ => String::new(),
            };
            seen.model = copy("model", facts.request_model.as_ref());
            seen.served_model = copy("served_model", facts.response_model.as_ref());
            if needs.has("user") {
                seen.user = key_user
                    .or(facts.end_user.as_deref())
                    .unwrap_or_default()
                    .to_owned();
            }
            if needs.has("request") {
                seen.request.tools = facts.tool_names.clone();
            }
            if needs.finish_reasons() {
                seen.finish_reasons = facts.finish_reasons.clone();
            }
        }
        let end_user = facts
            .end_user
            .take()
            .map(|u| self.identity(&u, &credentials, &mut counts));
        self.redact_facts(&mut facts, &credentials, &mut counts);
        // A stream that began with a 200 and then carried the provider's error failed,
        // whatever the transport says.
        let (outcome, error) = match &stream_error {
            Some(e) if matches!(ex.outcome, Outcome::Ok | Outcome::ClientCancelled) => {
                let message = e
                    .get("message")
                    .and_then(Value::as_str)
                    .map_or_else(|| e.to_string(), str::to_owned);
                let message = self.field(&message, &credentials, &mut counts);
                (
                    Outcome::UpstreamError.as_str().to_owned(),
                    Some(format!("upstream error in the stream: {message}")),
                )
            }
            _ => (ex.outcome.as_str().to_owned(), ex.error.clone()),
        };
        let (user, end_user) = match key_user {
            Some(u) => (Some(u.to_owned()), end_user),
            None => (end_user, None),
        };
        let prompt = (learned.lineage.prompt_hash().is_some()
            || template_id.is_some()
            || template_version.is_some())
        .then(|| Prompt {
            hash: learned.lineage.prompt_hash().map(hex::encode),
            template: (template_id.is_some() || template_version.is_some()).then_some(Template {
                id: template_id,
                version: template_version,
            }),
        });
        let gen_ai = (ex.provider != custody_config::Provider::Generic).then(|| GenAi {
            provider: Name {
                name: ex.provider.as_str().to_owned(),
            },
            operation: op.map(|o| Name {
                name: o.name().to_owned(),
            }),
            request: GenAiRequest {
                model: facts.request_model,
                stream: facts.request_stream,
                temperature: facts.temperature,
                max_tokens: facts.max_tokens,
                top_p: facts.top_p,
                top_k: facts.top_k,
                seed: facts.seed,
                frequency_penalty: facts.frequency_penalty,
                presence_penalty: facts.presence_penalty,
                stop_sequences: facts.stop_sequences,
                choice_count: facts.choice_count,
                tool_names: facts.tool_names,
                output_type: facts.output_type,
                reasoning_effort: facts.reasoning_effort,
            },
            conversation: facts.conversation_id.map(|id| Conversation { id }),
            response: (facts.response_model.is_some()
                || facts.response_id.is_some()
                || !facts.finish_reasons.is_empty())
            .then_some(GenAiResponse {
                model: facts.response_model,
                id: facts.response_id,
                finish_reasons: facts.finish_reasons,
                system_fingerprint: facts.system_fingerprint,
            }),
            usage: (facts.input_tokens.is_some() || facts.output_tokens.is_some()).then_some(
                Usage {
                    input_tokens: facts.input_tokens,
                    output_tokens: facts.output_tokens,
                    cache_read: facts
                        .cache_read_tokens
                        .map(|input_tokens| InputTokens { input_tokens }),
                    cache_creation: facts
                        .cache_creation_tokens
                        .map(|input_tokens| InputTokens { input_tokens }),
                    reasoning: facts
                        .reasoning_tokens
                        .map(|output_tokens| OutputTokens { output_tokens }),
                },
            ),
        });

        let (policy, policy_seconds) = self.decide(
            ex,
            seen,
            &req_body,
            &resp_body,
            &outcome,
            &usage_of(&gen_ai),
        );
        // A huge body's text is not kept past its record.
        for text in texts.iter_mut() {
            if text.capacity() > MAX_KEPT_TEXT {
                *text = String::new();
            }
        }
        drop(texts);
        learned.policy_seconds = if policy.is_some() {
            policy_seconds + reading.as_secs_f64()
        } else {
            0.0
        };
        let record = Record {
            schema: record::SCHEMA.to_owned(),
            id: record_id(ex.started_at),
            seq,
            route: ex.route.as_deref().map(str::to_owned),
            time: Time {
                start: humantime::format_rfc3339_millis(ex.started_at).to_string(),
                duration_ms: ms(ex.ended_at).unwrap_or_else(|| millis(ex.started.elapsed())),
                ttfb_ms: ms(ex.response_head_at),
                first_chunk_ms: ms(ex.first_chunk_at),
            },
            http: Http {
                method: ex.method.as_str().to_owned(),
                path: self.field(ex.uri.path(), &credentials, &mut counts),
                query,
                upstream_path: ex
                    .upstream_path
                    .as_deref()
                    .map(|p| self.field(p, &credentials, &mut counts)),
                status: ex.status.map(|s| s.as_u16()),
                request_bytes: ex.request.total,
                response_bytes: ex.response.total,
                request_id,
                user_agent,
            },
            client: Client {
                key_id,
                user,
                team: ex
                    .identity
                    .as_ref()
                    .and_then(|i| i.team.as_deref())
                    .map(str::to_owned),
                end_user,
                addr: ex.client_addr.map(|a| a.to_string()),
            },
            source: self.source.clone(),
            trace: ex.trace.map(|t| Trace {
                id: hex::encode(t.trace_id),
                span_id: hex::encode(t.span_id),
                generated: t.generated,
            }),
            session,
            prompt,
            completion: learned.lineage.completion.map(|h| Completion {
                hash: hex::encode(h),
            }),
            config: ex.config_version.as_ref().map(|v| ConfigRef {
                version: v.to_string(),
            }),
            outcome,
            error,
            policy,
            gen_ai,
            request: req_body,
            response: resp_body,
            redactions: counts.into_map(),
            chain: Chain {
                conversation_parent: None,
                bodies: None,
                prev: String::new(),
                hash: String::new(),
            },
        };
        (record, learned)
    }

    /// Evaluates the writer's rules on what was seen before redaction, and joins their
    /// decisions to the request path's.
    fn decide(
        &self,
        ex: &Exchange,
        mut seen: Facts,
        request: &Body,
        response: &Body,
        outcome: &str,
        usage: &(Option<u64>, Option<u64>),
    ) -> (Option<PolicyRecord>, f64) {
        let decided = ex.policy.as_deref();
        if self.policy.is_empty() && decided.is_none() {
            return (None, 0.0);
        }
        let tokens = |n: Option<u64>| n.map_or(0, |n| i64::try_from(n).unwrap_or(i64::MAX));
        seen.route = ex.route.as_deref().unwrap_or_default().to_owned();
        // Only what some rule reads is copied (the route always: rules apply by it).
        let needs = self.policy.needs(Phase::Record);
        if needs.has("provider") {
            seen.provider = ex.provider.as_str().to_owned();
        }
        if needs.has("operation") {
            let path = ex.upstream_path.as_deref().unwrap_or_else(|| ex.uri.path());
            seen.operation = Operation::detect(ex.provider, path)
                .map_or_else(String::new, |o| o.name().to_owned());
        }
        let identity = ex.identity.as_ref();
        if needs.has("team") {
            seen.team = identity
                .and_then(|i| i.team.as_deref())
                .unwrap_or_default()
                .to_owned();
        }
        if needs.has("key_id") {
            seen.key_id = identity.map(|i| i.key_id.to_string()).unwrap_or_default();
        }
        if needs.has("session") {
            seen.session = ex
                .request_headers
                .get(&self.headers.session)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
        }
        if needs.has("source") {
            seen.source = self.source_map.clone();
        }
        seen.status = ex.status.map_or(0, |s| i64::from(s.as_u16()));
        if needs.has("outcome") {
            seen.outcome = outcome.to_owned();
        }
        if needs.request_entities() {
            seen.request.entities = request.redactions.clone();
        }
        if needs.response_entities() {
            seen.response.entities = response.redactions.clone();
        }
        seen.input_tokens = tokens(usage.0);
        seen.output_tokens = tokens(usage.1);
        let verdict = self.policy.evaluate(&seen, Phase::Record);
        let (decisions, sanitized) = match decided {
            Some(d) => {
                let mut decisions = d.decisions.clone();
                decisions.extend(verdict.decisions);
                (decisions, d.sanitized.clone())
            }
            None => (verdict.decisions, Default::default()),
        };
        let record = PolicyRecord {
            version: self.policy.version_shared(),
            decisions,
            sanitized,
        };
        (Some(record), verdict.seconds)
    }

    /// Every credential the client presented, as tokens (for fingerprinting and
    /// scrubbing): the credential headers, then the query's credential parameters
    /// (Gemini's `?key=`), as sent and percent-decoded.
    fn credentials(&self, headers: &HeaderMap, query: Option<&str>) -> Vec<String> {
        let mut out: Vec<String> = CREDENTIAL_HEADERS
            .iter()
            .flat_map(|h| headers.get_all(h))
            .map(|v| String::from_utf8_lossy(credential_token(v.as_bytes())).into_owned())
            .collect();
        for kv in query.unwrap_or_default().split('&') {
            if let Some((k, v)) = kv.split_once('=') {
                if CREDENTIAL_PARAMS.iter().any(|c| c.eq_ignore_ascii_case(k)) {
                    let decoded = percent_encoding::percent_decode_str(v).decode_utf8_lossy();
                    if decoded != v {
                        out.push(decoded.into_owned());
                    }
                    out.push(v.to_owned());
                }
            }
        }
        out.retain(|t| t.len() >= 8);
        out
    }

    fn header(
        &self,
        h: &HeaderMap,
        name: &HeaderName,
        credentials: &[String],
        counts: &mut Counts,
    ) -> Option<String> {
        h.get(name)
            .and_then(|v| v.to_str().ok())
            .map(|v| self.field(v, credentials, counts))
    }

    /// Redacts every string fact in place (the facts were read from the bodies before
    /// redaction).
    fn redact_facts(&self, f: &mut GenAiFacts, credentials: &[String], counts: &mut Counts) {
        let single = [
            &mut f.request_model,
            &mut f.output_type,
            &mut f.reasoning_effort,
            &mut f.conversation_id,
            &mut f.response_model,
            &mut f.response_id,
            &mut f.system_fingerprint,
        ];
        let lists = f
            .tool_names
            .iter_mut()
            .chain(f.finish_reasons.iter_mut())
            .chain(f.stop_sequences.iter_mut());
        for s in single.into_iter().flatten().chain(lists) {
            // Most facts hold nothing to redact: no copy for them.
            if let Cow::Owned(red) = self.redactor.redact_str(s, counts) {
                *s = red;
            }
            scrub_credentials(s, credentials, counts);
        }
    }

    /// An end user named by the request, in its searchable form: entities in it (an
    /// e-mail address) pseudonymized with the deployment's identity key whatever their
    /// redaction mode, so that users stay distinct and `log search --user` can find
    /// them from the clear value ([`identity_token`]) without the trail holding it.
    fn identity(&self, s: &str, credentials: &[String], counts: &mut Counts) -> String {
        let mut out = self
            .redactor
            .pseudonymize_str(s, &self.identity_key, counts)
            .into_owned();
        scrub_credentials(&mut out, credentials, counts);
        out
    }

    /// A body recorded as one redacted JSON string (text that is not JSON, or JSON too
    /// deep to keep as JSON).
    fn as_text(
        &self,
        text: &str,
        credentials: &[String],
        counts: &mut Counts,
    ) -> Option<Box<RawValue>> {
        let s = self.field(text, credentials, counts);
        serde_json::value::to_raw_value(&s).ok()
    }

    /// An extracted field, redacted and with the exchange's own credentials removed.
    fn field(&self, s: &str, credentials: &[String], counts: &mut Counts) -> String {
        let mut out = self.redactor.redact_str(s, counts).into_owned();
        scrub_credentials(&mut out, credentials, counts);
        out
    }

    fn query(&self, q: &str, counts: &mut Counts) -> String {
        let parts: Vec<Cow<'_, str>> = q
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if CREDENTIAL_PARAMS.iter().any(|c| c.eq_ignore_ascii_case(k)) => {
                    counts.add("CLIENT_CREDENTIAL", 1);
                    Cow::Owned(format!("{k}=[CLIENT_CREDENTIAL]"))
                }
                _ => self.redactor.redact_str(kv, counts),
            })
            .collect();
        parts.join("&")
    }

    /// Decodes, parses and redacts one body; with it, the provider's error if the body is
    /// a stream that carried one. `inspect` sees the body before redaction, for
    /// fact extraction (JSON text as sent, or a reassembled stream), and says whether it
    /// read the text as JSON, which spares the redactor a validating pass.
    fn body(
        &self,
        headers: &HeaderMap,
        cap: &Capture,
        credentials: &[String],
        counts: &mut Counts,
        side: Side,
        inspect: impl FnOnce(&Value),
    ) -> (Body, Option<Value>) {
        // Each body says what was found in it (`request.entities` for the rules, and
        // for `policy test` on exported records); the record's total is the sum.
        let mut own = Counts::new();
        let (mut body, error) =
            self.body_counted(headers, cap, credentials, &mut own, side, inspect);
        for (entity, n) in own.iter() {
            counts.add(entity, n);
        }
        body.redactions = own.into_map();
        (body, error)
    }

    fn body_counted(
        &self,
        headers: &HeaderMap,
        cap: &Capture,
        credentials: &[String],
        counts: &mut Counts,
        side: Side,
        inspect: impl FnOnce(&Value),
    ) -> (Body, Option<Value>) {
        let content_type = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let mut out = Body {
            content_type: content_type.clone(),
            truncated: cap.truncated,
            ..Body::default()
        };
        if cap.total == 0 {
            return (out, None);
        }
        let raw = cap.contiguous();
        let omit = |out: &mut Body, why: String, bytes: &[u8]| {
            out.omitted = Some(why);
            out.sha256 = Some(hex::encode(Sha256::digest(bytes)));
        };
        let decoded = match decode_body(headers, raw, self.decode_limit) {
            Ok(d) => d,
            // A truncated compressed body cannot be decoded; say so, keep the hash.
            Err(e) => {
                omit(&mut out, e.to_string(), &cap.contiguous());
                return (out, None);
            }
        };
        // Uploads (audio, images, files): the form's model is a fact; the parts, files
        // among them, are recorded by length and hash only.
        if content_type
            .as_deref()
            .is_some_and(|c| c.starts_with("multipart/form-data"))
        {
            if let Some(model) = multipart_field(&decoded, "model") {
                inspect(&serde_json::json!({ "model": model }));
            }
            omit(&mut out, "multipart form upload".into(), &decoded);
            return (out, None);
        }
        // Text with a few bad bytes (a lenient upstream processes it) is kept, the bad
        // sequences replaced; mostly-binary bytes are not text and stay omitted.
        let text: Cow<'_, str> = match std::str::from_utf8(&decoded) {
            Ok(t) => Cow::Borrowed(t),
            Err(_) if !mostly_text(&decoded) => {
                omit(&mut out, "binary".into(), &decoded);
                return (out, None);
            }
            Err(_) => {
                out.invalid_utf8 = true;
                String::from_utf8_lossy(&decoded)
            }
        };
        let text = text.as_ref();
        // A reader must get every record back: JSON nested past what the review commands
        // parse (serde_json's limit, less the record's own levels) is kept as text.
        if record::nesting_exceeds(text.as_bytes(), MAX_BODY_DEPTH) {
            out.stored_as_text = Some(format!(
                "JSON nested deeper than {MAX_BODY_DEPTH} levels; stored as redacted text"
            ));
            out.body = self.as_text(text, credentials, counts);
            return (out, None);
        }
        let is_sse = content_type
            .as_deref()
            .is_some_and(|c| c.starts_with("text/event-stream"));
        // Gemini streams without `alt=sse` send one JSON array, chunk by chunk.
        let json_array_stream = matches!(side, Side::Response(Some(Operation::GenerateContent)))
            && !is_sse
            && text.trim_start().starts_with('[');
        let mut stream_error = None;
        let recorded: Option<Box<RawValue>> = match side {
            Side::Response(op) if is_sse || json_array_stream => {
                out.streamed = true;
                let genai::Reassembled {
                    value: reassembled,
                    stopped,
                    error,
                } = if is_sse {
                    genai::reassemble_bounded(op, text)
                } else {
                    genai::reassemble_json_array(text)
                };
                stream_error = error;
                if stopped {
                    out.reassembly_stopped = Some(format!(
                        "parts with an index of {} or more were left out",
                        genai::MAX_STREAM_INDEX
                    ));
                }
                match reassembled {
                    Some(mut v) => {
                        inspect(&v);
                        self.redactor.redact_json(&mut v, counts);
                        scrub_literals(&mut v, credentials, "CLIENT_CREDENTIAL", counts);
                        serde_json::value::to_raw_value(&v).ok()
                    }
                    None => self.as_text(text, credentials, counts),
                }
            }
            // JSON is redacted as text, string by string: nothing else of it is rebuilt.
            _ => {
                // The parse for the facts also proves the text is JSON: no second
                // validating pass.
                let redacted = match serde_json::from_str::<Value>(text) {
                    Ok(mut v) => {
                        inspect(&v);
                        // Inline binaries (base64 images, audio) become length and hash.
                        if may_hold_binary(text) && slim_binary(&mut v) {
                            self.redactor.redact_valid_json_text(&v.to_string(), counts)
                        } else {
                            self.redactor.redact_valid_json_text(text, counts)
                        }
                    }
                    Err(_) => self.redactor.redact_json_text(text, counts),
                };
                match redacted {
                    Some(red) => {
                        let red = one_line(scrub_text(red, credentials, counts));
                        RawValue::from_string(red).ok()
                    }
                    None => self.as_text(text, credentials, counts),
                }
            }
        };
        out.body = recorded;
        (out, stream_error)
    }
}

/// Deepest JSON nesting a recorded body keeps as JSON. serde_json reads 128 levels; the
/// record adds two (`request.body`), and headroom stays for readers that wrap records.
pub const MAX_BODY_DEPTH: usize = 100;

/// Whether bytes that are not valid UTF-8 are still mostly text: at most one invalid
/// sequence per 64 bytes (a stray Latin-1 byte, a cut multibyte character), and no NUL.
fn mostly_text(b: &[u8]) -> bool {
    if memchr::memchr(0, b).is_some() {
        return false;
    }
    let mut bad = 0usize;
    for chunk in b.utf8_chunks() {
        if !chunk.invalid().is_empty() {
            bad += 1;
        }
    }
    bad <= b.len() / 64 + 1
}

/// The key of identity pseudonyms, derived from the deployment's fingerprint key.
fn identity_key(fp: &Fingerprinter) -> Vec<u8> {
    fp.derive("custody.identity/v1")
}

/// How a user value is stored in `client.user` / `client.end_user` under this
/// fingerprint key (built-in entities): what `log search --user` looks for.
pub fn identity_token(fp: &Fingerprinter, value: &str) -> String {
    Redactor::builtin()
        .pseudonymize_str(value, &identity_key(fp), &mut Counts::new())
        .into_owned()
}

/// Pretty-printed JSON on one line: a record is one line of the segment. Raw line
/// breaks in valid JSON are whitespace between tokens (inside strings they are
/// escaped), so turning them into spaces changes nothing of the value.
fn one_line(mut text: String) -> String {
    if memchr::memchr2(b'\n', b'\r', text.as_bytes()).is_some() {
        text = text.replace(['\n', '\r'], " ");
    }
    text
}

/// Replaces the exchange's credentials in an extracted field, in place.
fn scrub_credentials(s: &mut String, credentials: &[String], counts: &mut Counts) {
    for c in credentials {
        // Most fields are shorter than a credential: no search to set up for them.
        if s.len() >= c.len() && memchr::memmem::find(s.as_bytes(), c.as_bytes()).is_some() {
            let n = s.matches(c.as_str()).count() as u64;
            *s = s.replace(c.as_str(), "[CLIENT_CREDENTIAL]");
            counts.add("CLIENT_CREDENTIAL", n);
        }
    }
}

/// Base64 strings shorter than this stay: they are not worth a marker.
const BINARY_MIN: usize = 1024;

/// Whether JSON text may carry inline base64 (a cheap test before walking the value).
fn may_hold_binary(text: &str) -> bool {
    text.len() > BINARY_MIN
        && (memchr::memmem::find(text.as_bytes(), b"base64").is_some()
            || memchr::memmem::find(text.as_bytes(), b"b64_json").is_some()
            || memchr::memmem::find(text.as_bytes(), b"\"data\"").is_some())
}

/// Replaces inline binaries by `[binary omitted: N bytes, sha256 H]`: OpenAI's
/// `b64_json` and audio `data`, Anthropic's and Gemini's base64 `data`, and `data:`
/// URLs. The record keeps what was sent, provably, without megabytes of pixels.
/// Returns whether anything was replaced.
fn slim_binary(v: &mut Value) -> bool {
    let marker = |s: &str| {
        Value::String(format!(
            "[binary omitted: {} bytes, sha256 {}]",
            s.len(),
            hex::encode(Sha256::digest(s.as_bytes()))
        ))
    };
    match v {
        Value::Object(o) => {
            let mut changed = false;
            for (k, child) in o.iter_mut() {
                let binary_key = matches!(k.as_str(), "b64_json" | "data" | "result");
                match child {
                    Value::String(s)
                        if s.len() >= BINARY_MIN
                            && (binary_key
                                || (s.starts_with("data:") && s.contains(";base64,")))
                            && looks_base64(s) =>
                    {
                        *child = marker(s);
                        changed = true;
                    }
                    _ => changed |= slim_binary(child),
                }
            }
            changed
        }
        Value::Array(a) => a.iter_mut().fold(false, |c, x| slim_binary(x) | c),
        _ => false,
    }
}

/// Base64 (or a `data:...;base64,` URL of it): no spaces, only the alphabet.
fn looks_base64(s: &str) -> bool {
    let payload = match s.split_once(";base64,") {
        Some((head, rest)) if head.starts_with("data:") => rest,
        _ => s,
    };
    payload
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'-' | b'_'))
}

/// A form field of a `multipart/form-data` body (`model` of an audio upload), read
/// without parsing the parts: the field's header line, a blank line, the value.
fn multipart_field<'a>(body: &'a [u8], name: &str) -> Option<&'a str> {
    let needle = format!("name=\"{name}\"");
    let at = memchr::memmem::find(body, needle.as_bytes())? + needle.len();
    let rest = &body[at..];
    let start = memchr::memmem::find(rest, b"\r\n\r\n")? + 4;
    let value = &rest[start..];
    let end = memchr::memmem::find(value, b"\r\n")?;
    std::str::from_utf8(&value[..end])
        .ok()
        .filter(|v| v.len() <= 256)
}

/// `[source]` plus the Kubernetes downward-API environment, as one JSON object.
fn source_json(config: &std::collections::BTreeMap<String, String>) -> Option<Box<RawValue>> {
    let m = record::source_map(config);
    if m.is_empty() {
        return None;
    }
    serde_json::value::to_raw_value(&m).ok()
}

/// Removes client credentials from redacted JSON text. A credential with a character
/// JSON escapes differently goes through a parse instead of a text replace.
fn scrub_text(text: String, credentials: &[String], counts: &mut Counts) -> String {
    if credentials.is_empty() {
        return text;
    }
    let plain = |c: &str| {
        !c.bytes()
            .any(|b| b == b'"' || b == b'\\' || !(0x20..0x7f).contains(&b))
    };
    if credentials.iter().all(|c| plain(c)) {
        let mut text = text;
        scrub_credentials(&mut text, credentials, counts);
        return text;
    }
    match serde_json::from_str::<Value>(&text) {
        Ok(mut v) => {
            scrub_literals(&mut v, credentials, "CLIENT_CREDENTIAL", counts);
            v.to_string()
        }
        Err(_) => text,
    }
}

/// A UUID v7 whose timestamp is the exchange's start, so that `log show ID` can find the
/// segment from the id alone (segment indexes hold time ranges).
pub fn record_id(started_at: std::time::SystemTime) -> String {
    let d = started_at
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    // Random bits from a thread-local generator: `new_v7` asks the kernel for them,
    // a syscall per record. Ids need to be unique, not unguessable.
    let mut random = [0u8; 10];
    fastrand::fill(&mut random);
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    uuid::Builder::from_unix_timestamp_millis(ms, &random)
        .into_uuid()
        .to_string()
}

fn millis(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0
}

/// Input and output tokens of a record's usage.
fn usage_of(g: &Option<GenAi>) -> (Option<u64>, Option<u64>) {
    g.as_ref()
        .and_then(|g| g.usage.as_ref())
        .map_or((None, None), |u| (u.input_tokens, u.output_tokens))
}
