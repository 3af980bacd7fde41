//! Understanding model-provider exchanges: which operation a path is, the request
//! parameters, and the response (streamed responses reassembled into the object the
//! same call would have returned without streaming).

use std::collections::BTreeMap;

use custody_config::Provider;
use serde_json::{json, Map, Value};

use crate::sse::{self, SseEvent};

/// The API operation an exchange is, by provider and path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// OpenAI chat completions.
    Chat,
    /// OpenAI legacy completions.
    TextCompletion,
    Embeddings,
    /// OpenAI Responses API.
    Responses,
    /// Anthropic Messages API.
    Messages,
    /// OpenAI moderations.
    Moderations,
    /// OpenAI image generation, edits and variations.
    Images,
    /// OpenAI speech, transcriptions and translations.
    Audio,
    /// Gemini `generateContent` and `streamGenerateContent`.
    GenerateContent,
}

impl Operation {
    /// Classifies a forwarded path (query excluded).
    pub fn detect(provider: Provider, path: &str) -> Option<Self> {
        let path = path.trim_end_matches('/');
        match provider {
            Provider::Openai | Provider::Azure => {
                if path.ends_with("/chat/completions") {
                    Some(Self::Chat)
                } else if path.ends_with("/completions") {
                    Some(Self::TextCompletion)
                } else if path.ends_with("/embeddings") {
                    Some(Self::Embeddings)
                } else if path.ends_with("/responses") {
                    Some(Self::Responses)
                } else if path.ends_with("/moderations") {
                    Some(Self::Moderations)
                } else if path.contains("/images/") {
                    Some(Self::Images)
                } else if path.contains("/audio/") {
                    Some(Self::Audio)
                } else {
                    None
                }
            }
            Provider::Anthropic => path.ends_with("/messages").then_some(Self::Messages),
            Provider::Gemini => {
                let method = path.rsplit_once(':').map(|(_, m)| m)?;
                match method {
                    "generateContent" | "streamGenerateContent" => Some(Self::GenerateContent),
                    "embedContent" | "batchEmbedContents" => Some(Self::Embeddings),
                    _ => None,
                }
            }
            Provider::Generic => None,
        }
    }

    /// `gen_ai.operation.name` (OpenTelemetry GenAI semantic conventions where they
    /// name one; the Responses API, moderations, images and audio have none yet).
    pub fn name(self) -> &'static str {
        match self {
            Self::Chat | Self::Messages => "chat",
            Self::TextCompletion => "text_completion",
            Self::Embeddings => "embeddings",
            Self::Responses => "responses",
            Self::Moderations => "moderations",
            Self::Images => "images",
            Self::Audio => "audio",
            Self::GenerateContent => "generate_content",
        }
    }
}

/// The model a path names: Azure's deployment, Gemini's model.
pub fn path_model(provider: Provider, path: &str) -> Option<&str> {
    match provider {
        Provider::Azure => path
            .split_once("/deployments/")
            .and_then(|(_, rest)| rest.split('/').next()),
        Provider::Gemini => path
            .split_once("/models/")
            .and_then(|(_, rest)| rest.split(':').next()),
        _ => None,
    }
    .filter(|m| !m.is_empty())
}

/// The `gen_ai` facts of one exchange.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct GenAiFacts {
    pub request_model: Option<String>,
    pub request_stream: Option<bool>,
    pub temperature: Option<f64>,
    pub max_tokens: Option<u64>,
    pub top_p: Option<f64>,
    /// As sent (an integer stays an integer).
    pub top_k: Option<serde_json::Number>,
    pub seed: Option<i64>,
    pub frequency_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub stop_sequences: Vec<String>,
    pub choice_count: Option<u64>,
    pub tool_names: Vec<String>,
    pub output_type: Option<String>,
    pub reasoning_effort: Option<String>,
    /// The end user the application named (`user`, `metadata.user_id`, `safety_identifier`).
    pub end_user: Option<String>,
    /// Responses API `conversation` or `previous_response_id`.
    pub conversation_id: Option<String>,
    pub previous_response_id: Option<String>,
    pub response_model: Option<String>,
    pub response_id: Option<String>,
    pub system_fingerprint: Option<String>,
    pub finish_reasons: Vec<String>,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub cache_read_tokens: Option<u64>,
    pub cache_creation_tokens: Option<u64>,
    pub reasoning_tokens: Option<u64>,
}

/// Where an API puts its sampling parameters: OpenAI and Anthropic in the body, in
/// snake case; Gemini in `generationConfig`, in camel case.
struct SamplingNames {
    top_p: &'static str,
    top_k: &'static str,
    max_tokens: &'static [&'static str],
    choice_count: &'static str,
    frequency_penalty: &'static str,
    presence_penalty: &'static str,
    stop: &'static [&'static str],
}

const OPENAI_PARAMS: SamplingNames = SamplingNames {
    top_p: "top_p",
    top_k: "top_k",
    max_tokens: &["max_tokens", "max_completion_tokens", "max_output_tokens"],
    choice_count: "n",
    frequency_penalty: "frequency_penalty",
    presence_penalty: "presence_penalty",
    stop: &["stop", "stop_sequences"],
};

const GEMINI_PARAMS: SamplingNames = SamplingNames {
    top_p: "topP",
    top_k: "topK",
    max_tokens: &["maxOutputTokens"],
    choice_count: "candidateCount",
    frequency_penalty: "frequencyPenalty",
    presence_penalty: "presencePenalty",
    stop: &["stopSequences"],
};

fn sampling(o: &Value, n: &SamplingNames, facts: &mut GenAiFacts) {
    let f64_at = |k: &str| o.get(k).and_then(Value::as_f64);
    facts.temperature = f64_at("temperature");
    facts.top_p = f64_at(n.top_p);
    facts.top_k = o.get(n.top_k).and_then(Value::as_number).cloned();
    facts.frequency_penalty = f64_at(n.frequency_penalty);
    facts.presence_penalty = f64_at(n.presence_penalty);
    facts.seed = o.get("seed").and_then(Value::as_i64);
    facts.choice_count = o.get(n.choice_count).and_then(Value::as_u64);
    facts.max_tokens = n
        .max_tokens
        .iter()
        .find_map(|k| o.get(*k).and_then(Value::as_u64));
    facts.stop_sequences = match n.stop.iter().find_map(|k| o.get(*k)) {
        Some(Value::String(s)) => vec![s.clone()],
        other => strings(other),
    };
}

/// Reads the request parameters custody records. `path_model` is the model a path
/// names (Azure deployment, Gemini model), used when the body names none.
pub fn request_facts(
    op: Operation,
    body: &Value,
    path_model: Option<&str>,
    facts: &mut GenAiFacts,
) {
    facts.request_model = str_at(body, "model").or_else(|| path_model.map(str::to_owned));
    facts.request_stream = body.get("stream").and_then(Value::as_bool);
    if op == Operation::GenerateContent {
        let g = body.get("generationConfig").unwrap_or(&Value::Null);
        sampling(g, &GEMINI_PARAMS, facts);
        facts.output_type = str_at(g, "responseMimeType");
        facts.reasoning_effort = g
            .get("thinkingConfig")
            .and_then(|t| t.get("thinkingBudget"))
            .map(|b| format!("budget:{b}"));
        facts.tool_names = array(body.get("tools"))
            .flat_map(|t| array(t.get("functionDeclarations")))
            .filter_map(|f| str_at(f, "name"))
            .collect();
        return;
    }
    sampling(body, &OPENAI_PARAMS, facts);
    // Chat: {"type":"function","function":{"name"}}; Responses and Anthropic: {"name"}.
    facts.tool_names = array(body.get("tools"))
        .filter_map(|t| {
            str_at(t, "name").or_else(|| t.get("function").and_then(|f| str_at(f, "name")))
        })
        .collect();
    facts.output_type = body
        .get("response_format")
        .or_else(|| body.get("text").and_then(|t| t.get("format")))
        .and_then(|f| str_at(f, "type"));
    facts.reasoning_effort = str_at(body, "reasoning_effort")
        .or_else(|| body.get("reasoning").and_then(|r| str_at(r, "effort")))
        .or_else(|| {
            body.get("thinking")
                .and_then(|t| t.get("budget_tokens"))
                .map(|b| format!("budget:{b}"))
        });
    facts.end_user = str_at(body, "user")
        .or_else(|| str_at(body, "safety_identifier"))
        .or_else(|| body.get("metadata").and_then(|m| str_at(m, "user_id")));
    facts.previous_response_id = str_at(body, "previous_response_id");
    facts.conversation_id = match body.get("conversation") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(c) => str_at(c, "id"),
        None => None,
    }
    .or_else(|| facts.previous_response_id.clone());
}

/// Reads the response facts from a (plain or reassembled) response object.
pub fn response_facts(op: Operation, body: &Value, facts: &mut GenAiFacts) {
    facts.response_model = str_at(body, "model").or_else(|| str_at(body, "modelVersion"));
    facts.response_id = str_at(body, "id").or_else(|| str_at(body, "responseId"));
    facts.system_fingerprint = str_at(body, "system_fingerprint");
    let usage = body.get("usage").unwrap_or(&Value::Null);
    let u = |k: &str| usage.get(k).and_then(Value::as_u64);
    let deep = |a: &str, b: &str| usage.get(a).and_then(|d| d.get(b)).and_then(Value::as_u64);
    match op {
        Operation::Chat | Operation::TextCompletion => {
            facts.finish_reasons = array(body.get("choices"))
                .filter_map(|c| str_at(c, "finish_reason"))
                .collect();
            facts.input_tokens = u("prompt_tokens");
            facts.output_tokens = u("completion_tokens");
            facts.cache_read_tokens = deep("prompt_tokens_details", "cached_tokens");
            facts.reasoning_tokens = deep("completion_tokens_details", "reasoning_tokens");
        }
        Operation::Embeddings | Operation::Images => {
            facts.input_tokens = u("prompt_tokens").or_else(|| u("input_tokens"));
            facts.output_tokens = u("output_tokens");
        }
        Operation::Moderations | Operation::Audio => {
            facts.input_tokens = u("input_tokens");
            facts.output_tokens = u("output_tokens");
        }
        Operation::Responses => {
            facts.finish_reasons = str_at(body, "status").into_iter().collect();
            facts.input_tokens = u("input_tokens");
            facts.output_tokens = u("output_tokens");
            facts.cache_read_tokens = deep("input_tokens_details", "cached_tokens");
            facts.reasoning_tokens = deep("output_tokens_details", "reasoning_tokens");
        }
        Operation::Messages => {
            facts.finish_reasons = str_at(body, "stop_reason").into_iter().collect();
            facts.input_tokens = u("input_tokens");
            facts.output_tokens = u("output_tokens");
            facts.cache_read_tokens = u("cache_read_input_tokens");
            facts.cache_creation_tokens = u("cache_creation_input_tokens");
        }
        Operation::GenerateContent => {
            facts.finish_reasons = array(body.get("candidates"))
                .filter_map(|c| str_at(c, "finishReason"))
                .collect();
            let m = body.get("usageMetadata").unwrap_or(&Value::Null);
            let g = |k: &str| m.get(k).and_then(Value::as_u64);
            facts.input_tokens = g("promptTokenCount");
            facts.output_tokens = g("candidatesTokenCount");
            facts.cache_read_tokens = g("cachedContentTokenCount");
            facts.reasoning_tokens = g("thoughtsTokenCount");
        }
    }
}

fn array(v: Option<&Value>) -> impl Iterator<Item = &Value> {
    v.and_then(Value::as_array).into_iter().flatten()
}

fn strings(v: Option<&Value>) -> Vec<String> {
    array(v)
        .filter_map(|s| s.as_str().map(str::to_owned))
        .collect()
}

fn str_at(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_owned)
}

/// The highest choice, candidate, content-block or tool-call index reassembly keeps.
/// Providers allow far fewer (OpenAI `n` <= 128, Gemini 8 candidates); a stream that
/// names more is hostile or broken, and would make reassembly's memory grow with every
/// index it names instead of with the bytes it carries.
pub const MAX_STREAM_INDEX: u64 = 256;

/// Reassembles a streamed response body into the equivalent non-streamed object.
/// `None` when the stream holds no usable event.
pub fn reassemble(op: Operation, body: &str) -> Option<Value> {
    reassemble_bounded(Some(op), body).value
}

/// What a stream adds up to, read in one pass over its events.
#[derive(Debug, Default)]
pub struct Reassembled {
    /// The equivalent non-streamed object (for a known operation with usable events).
    pub value: Option<Value>,
    /// Parts whose index is past [`MAX_STREAM_INDEX`] were left out.
    pub stopped: bool,
    /// The provider's error reported inside the stream (see [`stream_error`]).
    pub error: Option<Value>,
}

/// [`reassemble`], with what it left out and the provider's error, if the stream
/// carried one.
pub fn reassemble_bounded(op: Option<Operation>, body: &str) -> Reassembled {
    let events = sse::parse(body);
    let mut out = Reassembled {
        error: stream_error(&events),
        ..Reassembled::default()
    };
    let datas = events.iter().filter_map(|e| {
        if e.data == "[DONE]" {
            return None;
        }
        serde_json::from_str::<Value>(&e.data).ok()
    });
    let stop = &mut out.stopped;
    out.value = match op {
        Some(op @ (Operation::Chat | Operation::TextCompletion)) => openai_choices(op, datas, stop),
        Some(Operation::Responses) => responses(&events),
        Some(Operation::Messages) => anthropic(datas, stop),
        Some(Operation::GenerateContent) => gemini(datas, stop),
        _ => None,
    };
    out
}

/// The provider's error reported inside a stream that began with a 200: OpenAI's
/// `data: {"error": ...}`, Anthropic's and the Responses API's `event: error`, a
/// Responses `response.failed`. SDKs raise on these; the record must not say `ok`.
fn stream_error(events: &[sse::SseEvent]) -> Option<Value> {
    events.iter().find_map(|e| {
        let named = e.event.as_deref();
        if !matches!(named, Some("error") | Some("response.failed"))
            && !e.data.trim_start().starts_with("{\"error\"")
        {
            return None;
        }
        let v: Value = serde_json::from_str(&e.data).ok()?;
        let err = match named {
            Some("response.failed") => v.get("response")?.get("error")?.clone(),
            _ => v
                .get("error")
                .filter(|e| e.is_object())
                .cloned()
                .unwrap_or(v),
        };
        (!err.is_null()).then_some(err)
    })
}

/// Gemini's stream without `alt=sse`: one JSON array of response chunks, sent piece by
/// piece. Reads the chunks that arrived whole (a cut stream keeps them) and merges them.
pub fn reassemble_json_array(body: &str) -> Reassembled {
    let mut out = Reassembled::default();
    out.value = json_array_inner(body, &mut out.stopped);
    out
}

fn json_array_inner(body: &str, stop: &mut bool) -> Option<Value> {
    let mut chunks = Vec::new();
    let mut rest = body.trim_start().strip_prefix('[')?;
    loop {
        rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == ',');
        if rest.is_empty() || rest.starts_with(']') {
            break;
        }
        let mut it = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
        match it.next() {
            Some(Ok(v)) => {
                chunks.push(v);
                rest = &rest[it.byte_offset()..];
            }
            _ => break,
        }
    }
    gemini(chunks.into_iter(), stop)
}

/// Merges Gemini response chunks: text parts joined per candidate, the rest from the
/// latest chunk that has it.
fn gemini(datas: impl Iterator<Item = Value>, stop: &mut bool) -> Option<Value> {
    let mut out = Map::new();
    let mut candidates: BTreeMap<u64, (Map<String, Value>, Vec<Value>)> = BTreeMap::new();
    let mut seen = false;
    for d in datas {
        seen = true;
        let Value::Object(d) = d else { continue };
        for (k, v) in &d {
            if k != "candidates" {
                out.insert(k.clone(), v.clone());
            }
        }
        for c in array(d.get("candidates")) {
            let idx = c.get("index").and_then(Value::as_u64).unwrap_or(0);
            if idx >= MAX_STREAM_INDEX {
                *stop = true;
                continue;
            }
            let (cand, parts) = candidates.entry(idx).or_default();
            if let Value::Object(c) = c {
                for (k, v) in c {
                    if k != "content" {
                        cand.insert(k.clone(), v.clone());
                    }
                }
            }
            let content = c.get("content");
            if let Some(r) = content.and_then(|c| c.get("role")) {
                cand.insert("role".into(), r.clone());
            }
            for p in array(content.and_then(|c| c.get("parts"))) {
                let text = p.get("text").and_then(Value::as_str);
                let last_text = parts.last_mut().filter(|l: &&mut Value| {
                    l.get("text").is_some() && l.as_object().map_or(0, Map::len) == 1
                });
                match (text, last_text, p.as_object().map_or(0, Map::len)) {
                    (Some(t), Some(Value::Object(l)), 1) => {
                        let joined =
                            format!("{}{t}", l.get("text").and_then(Value::as_str).unwrap_or(""));
                        l.insert("text".into(), Value::String(joined));
                    }
                    _ => parts.push(p.clone()),
                }
            }
        }
    }
    if !seen {
        return None;
    }
    let candidates: Vec<Value> = candidates
        .into_values()
        .map(|(mut cand, parts)| {
            let role = cand.remove("role").unwrap_or_else(|| json!("model"));
            cand.insert("content".into(), json!({"role": role, "parts": parts}));
            Value::Object(cand)
        })
        .collect();
    out.insert("candidates".into(), Value::Array(candidates));
    Some(Value::Object(out))
}

#[derive(Default)]
struct ToolCallAcc {
    id: Option<Value>,
    kind: Option<Value>,
    name: String,
    arguments: String,
}

#[derive(Default)]
struct ChoiceAcc {
    role: Option<Value>,
    content: Option<String>,
    refusal: Option<String>,
    tool_calls: BTreeMap<u64, ToolCallAcc>,
    finish_reason: Value,
}

fn openai_choices(
    op: Operation,
    datas: impl Iterator<Item = Value>,
    stop: &mut bool,
) -> Option<Value> {
    let mut out = Map::new();
    let mut choices: BTreeMap<u64, ChoiceAcc> = BTreeMap::new();
    let mut seen = false;
    for d in datas {
        seen = true;
        for key in [
            "id",
            "created",
            "model",
            "system_fingerprint",
            "service_tier",
        ] {
            // Azure's first chunk carries only content-filter results, with `""` ids.
            if let Some(v) = d
                .get(key)
                .filter(|v| !v.is_null() && v.as_str() != Some(""))
            {
                out.entry(key).or_insert_with(|| v.clone());
            }
        }
        if let Some(u) = d.get("usage").filter(|u| !u.is_null()) {
            out.insert("usage".into(), u.clone());
        }
        if let Some(e) = d.get("error") {
            out.insert("error".into(), e.clone());
        }
        for c in d
            .get("choices")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let idx = c.get("index").and_then(Value::as_u64).unwrap_or(0);
            if idx >= MAX_STREAM_INDEX {
                *stop = true;
                continue;
            }
            let acc = choices.entry(idx).or_default();
            if let Some(fr) = c.get("finish_reason").filter(|v| !v.is_null()) {
                acc.finish_reason = fr.clone();
            }
            if let Some(t) = c.get("text").and_then(Value::as_str) {
                acc.content.get_or_insert_with(String::new).push_str(t);
            }
            let Some(delta) = c.get("delta") else {
                continue;
            };
            if let Some(r) = delta.get("role").filter(|v| !v.is_null()) {
                acc.role = Some(r.clone());
            }
            if let Some(t) = delta.get("content").and_then(Value::as_str) {
                acc.content.get_or_insert_with(String::new).push_str(t);
            }
            if let Some(t) = delta.get("refusal").and_then(Value::as_str) {
                acc.refusal.get_or_insert_with(String::new).push_str(t);
            }
            for tc in delta
                .get("tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let ti = tc.get("index").and_then(Value::as_u64).unwrap_or(0);
                if ti >= MAX_STREAM_INDEX {
                    *stop = true;
                    continue;
                }
                let t = acc.tool_calls.entry(ti).or_default();
                if let Some(id) = tc.get("id").filter(|v| !v.is_null()) {
                    t.id = Some(id.clone());
                }
                if let Some(k) = tc.get("type").filter(|v| !v.is_null()) {
                    t.kind = Some(k.clone());
                }
                if let Some(f) = tc.get("function") {
                    if let Some(n) = f.get("name").and_then(Value::as_str) {
                        t.name.push_str(n);
                    }
                    if let Some(a) = f.get("arguments").and_then(Value::as_str) {
                        t.arguments.push_str(a);
                    }
                }
            }
        }
    }
    if !seen {
        return None;
    }
    let choices: Vec<Value> = choices
        .into_iter()
        .map(|(index, c)| {
            if op == Operation::TextCompletion {
                return json!({"index": index, "text": c.content.unwrap_or_default(), "finish_reason": c.finish_reason});
            }
            let mut message = Map::new();
            message.insert("role".into(), c.role.unwrap_or_else(|| json!("assistant")));
            message.insert("content".into(), c.content.map_or(Value::Null, Value::String));
            if let Some(r) = c.refusal {
                message.insert("refusal".into(), Value::String(r));
            }
            if !c.tool_calls.is_empty() {
                let calls: Vec<Value> = c
                    .tool_calls
                    .into_values()
                    .map(|t| {
                        json!({
                            "id": t.id.unwrap_or(Value::Null),
                            "type": t.kind.unwrap_or_else(|| json!("function")),
                            "function": {"name": t.name, "arguments": t.arguments},
                        })
                    })
                    .collect();
                message.insert("tool_calls".into(), Value::Array(calls));
            }
            json!({"index": index, "message": message, "finish_reason": c.finish_reason})
        })
        .collect();
    let object = match op {
        Operation::TextCompletion => "text_completion",
        _ => "chat.completion",
    };
    out.insert("object".into(), json!(object));
    out.insert("choices".into(), Value::Array(choices));
    Some(Value::Object(out))
}

fn responses(events: &[SseEvent]) -> Option<Value> {
    // The terminal event carries the whole response; short of it, the latest snapshot.
    let mut latest = None;
    for e in events {
        let Ok(d) = serde_json::from_str::<Value>(&e.data) else {
            continue;
        };
        let kind = d
            .get("type")
            .and_then(Value::as_str)
            .or(e.event.as_deref())
            .unwrap_or("");
        if let Some(r) = d.get("response").filter(|r| r.is_object()) {
            let terminal = matches!(
                kind,
                "response.completed" | "response.failed" | "response.incomplete"
            );
            latest = Some(r.clone());
            if terminal {
                break;
            }
        } else if kind == "error" {
            latest
                .get_or_insert_with(|| json!({}))
                .as_object_mut()
                .map(|o| o.insert("error".into(), d.clone()));
        }
    }
    latest
}

#[derive(Default)]
struct BlockAcc {
    block: Map<String, Value>,
    text: Option<String>,
    thinking: Option<String>,
    json: Option<String>,
}

fn anthropic(datas: impl Iterator<Item = Value>, stop: &mut bool) -> Option<Value> {
    let mut message: Option<Map<String, Value>> = None;
    let mut blocks: BTreeMap<u64, BlockAcc> = BTreeMap::new();
    let mut usage = Map::new();
    let mut error = None;
    for d in datas {
        let index = d.get("index").and_then(Value::as_u64).unwrap_or(0);
        if index >= MAX_STREAM_INDEX {
            *stop = true;
            continue;
        }
        match d.get("type").and_then(Value::as_str).unwrap_or("") {
            "message_start" => {
                if let Some(Value::Object(m)) = d.get("message") {
                    if let Some(Value::Object(u)) = m.get("usage") {
                        usage.extend(u.clone());
                    }
                    message = Some(m.clone());
                }
            }
            "content_block_start" => {
                if let Some(Value::Object(b)) = d.get("content_block") {
                    blocks.insert(
                        index,
                        BlockAcc {
                            block: b.clone(),
                            ..Default::default()
                        },
                    );
                }
            }
            "content_block_delta" => {
                let acc = blocks.entry(index).or_default();
                let Some(delta) = d.get("delta") else {
                    continue;
                };
                match delta.get("type").and_then(Value::as_str).unwrap_or("") {
                    "text_delta" => push(&mut acc.text, delta.get("text")),
                    "input_json_delta" => push(&mut acc.json, delta.get("partial_json")),
                    "thinking_delta" => push(&mut acc.thinking, delta.get("thinking")),
                    "signature_delta" => {
                        if let Some(s) = delta.get("signature") {
                            acc.block.insert("signature".into(), s.clone());
                        }
                    }
                    _ => {}
                }
            }
            "message_delta" => {
                if let Some(Value::Object(delta)) = d.get("delta") {
                    let m = message.get_or_insert_with(Map::new);
                    for (k, v) in delta {
                        m.insert(k.clone(), v.clone());
                    }
                }
                if let Some(Value::Object(u)) = d.get("usage") {
                    for (k, v) in u {
                        if !v.is_null() {
                            usage.insert(k.clone(), v.clone());
                        }
                    }
                }
            }
            "error" => error = d.get("error").cloned(),
            _ => {}
        }
    }
    if message.is_none() && blocks.is_empty() && error.is_none() {
        return None;
    }
    let mut m = message.unwrap_or_default();
    let content: Vec<Value> = blocks
        .into_values()
        .map(|mut acc| {
            if let Some(t) = acc.text {
                let prior = acc
                    .block
                    .get("text")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned();
                acc.block.insert("text".into(), Value::String(prior + &t));
            }
            if let Some(t) = acc.thinking {
                let prior = acc
                    .block
                    .get("thinking")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned();
                acc.block
                    .insert("thinking".into(), Value::String(prior + &t));
            }
            if let Some(j) = acc.json {
                // A stream cut mid-way leaves partial JSON: keep it as the string it is.
                let input = serde_json::from_str(&j).unwrap_or(Value::String(j));
                acc.block.insert("input".into(), input);
            }
            Value::Object(acc.block)
        })
        .collect();
    m.insert("content".into(), Value::Array(content));
    if !usage.is_empty() {
        m.insert("usage".into(), Value::Object(usage));
    }
    if let Some(e) = error {
        m.insert("error".into(), e);
    }
    Some(Value::Object(m))
}

fn push(acc: &mut Option<String>, v: Option<&Value>) {
    if let Some(s) = v.and_then(Value::as_str) {
        acc.get_or_insert_with(String::new).push_str(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sse(datas: &[&str]) -> String {
        datas.iter().map(|d| format!("data: {d}\n\n")).collect()
    }

    #[test]
    fn detects_operations() {
        assert_eq!(
            Operation::detect(Provider::Openai, "/v1/chat/completions"),
            Some(Operation::Chat)
        );
        assert_eq!(
            Operation::detect(Provider::Openai, "/v1/completions"),
            Some(Operation::TextCompletion)
        );
        assert_eq!(
            Operation::detect(Provider::Openai, "/v1/embeddings"),
            Some(Operation::Embeddings)
        );
        assert_eq!(
            Operation::detect(Provider::Openai, "/v1/responses"),
            Some(Operation::Responses)
        );
        assert_eq!(Operation::detect(Provider::Openai, "/v1/models"), None);
        assert_eq!(
            Operation::detect(Provider::Anthropic, "/v1/messages"),
            Some(Operation::Messages)
        );
        assert_eq!(
            Operation::detect(Provider::Generic, "/v1/chat/completions"),
            None
        );
    }

    #[test]
    fn openai_chat_stream_with_tool_calls_and_usage() {
        let body = sse(&[
            r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp","choices":[{"index":0,"delta":{"role":"assistant","content":"Hel"},"finish_reason":null}]}"#,
            r#"{"id":"c1","choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":null}]}"#,
            r#"{"id":"c1","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"get_weather","arguments":"{\"ci"}}]},"finish_reason":null}]}"#,
            r#"{"id":"c1","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"ty\":\"Paris\"}"}}]},"finish_reason":"tool_calls"}]}"#,
            r#"{"id":"c1","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}"#,
            "[DONE]",
        ]);
        let v = reassemble(Operation::Chat, &body).unwrap();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["message"]["content"], "Hello");
        assert_eq!(
            v["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
            r#"{"city":"Paris"}"#
        );
        assert_eq!(v["choices"][0]["message"]["tool_calls"][0]["id"], "call_1");
        let mut f = GenAiFacts::default();
        response_facts(Operation::Chat, &v, &mut f);
        assert_eq!(f.response_model.as_deref(), Some("gpt-4o-2024-08-06"));
        assert_eq!(f.finish_reasons, vec!["tool_calls"]);
        assert_eq!((f.input_tokens, f.output_tokens), (Some(5), Some(7)));
    }

    #[test]
    fn responses_stream_takes_the_completed_object() {
        let body = "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"r1\",\"status\":\"in_progress\"}}\n\n\
                    event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}\n\n\
                    event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"r1\",\"model\":\"gpt-4.1\",\"status\":\"completed\",\"usage\":{\"input_tokens\":3,\"output_tokens\":1}}}\n\n";
        let v = reassemble(Operation::Responses, body).unwrap();
        assert_eq!(v["status"], "completed");
        let mut f = GenAiFacts::default();
        response_facts(Operation::Responses, &v, &mut f);
        assert_eq!(f.output_tokens, Some(1));
    }

    #[test]
    fn anthropic_stream_merges_blocks_and_usage() {
        let evs = [
            (
                "message_start",
                r#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","content":[],"stop_reason":null,"usage":{"input_tokens":12,"output_tokens":1}}}"#,
            ),
            (
                "content_block_start",
                r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
            ),
            (
                "content_block_delta",
                r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi "}}"#,
            ),
            (
                "content_block_delta",
                r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"there"}}"#,
            ),
            (
                "content_block_start",
                r#"{"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_1","name":"get_weather","input":{}}}"#,
            ),
            (
                "content_block_delta",
                r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"city\":"}}"#,
            ),
            (
                "content_block_delta",
                r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"\"Paris\",\"units\":\"c\"}"}}"#,
            ),
            (
                "message_delta",
                r#"{"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":30}}"#,
            ),
            ("message_stop", r#"{"type":"message_stop"}"#),
        ];
        let body: String = evs
            .iter()
            .map(|(e, d)| format!("event: {e}\ndata: {d}\n\n"))
            .collect();
        let v = reassemble(Operation::Messages, &body).unwrap();
        assert_eq!(v["content"][0]["text"], "Hi there");
        assert_eq!(v["content"][1]["input"]["city"], "Paris");
        // The input keeps the order the model wrote its keys in.
        assert_eq!(
            v["content"][1]["input"].to_string(),
            r#"{"city":"Paris","units":"c"}"#
        );
        assert_eq!(v["stop_reason"], "tool_use");
        assert_eq!(v["usage"]["input_tokens"], 12);
        assert_eq!(v["usage"]["output_tokens"], 30);
    }

    #[test]
    fn request_parameters_across_apis() {
        let mut f = GenAiFacts::default();
        let responses = json!({"model": "o4-mini", "previous_response_id": "resp_1",
            "reasoning": {"effort": "high"}, "text": {"format": {"type": "json_schema"}},
            "tools": [{"type": "function", "name": "get_weather"}], "max_output_tokens": 500,
            "safety_identifier": "user-9"});
        request_facts(Operation::Responses, &responses, None, &mut f);
        assert_eq!(f.reasoning_effort.as_deref(), Some("high"));
        assert_eq!(f.output_type.as_deref(), Some("json_schema"));
        assert_eq!(f.tool_names, vec!["get_weather"]);
        assert_eq!(f.max_tokens, Some(500));
        assert_eq!(f.conversation_id.as_deref(), Some("resp_1"));
        assert_eq!(f.end_user.as_deref(), Some("user-9"));

        let mut f = GenAiFacts::default();
        let chat = json!({"model": "gpt-4o", "stop": "END", "n": 2, "seed": -1,
            "response_format": {"type": "json_object"}, "reasoning_effort": "low",
            "tools": [{"type": "function", "function": {"name": "f1"}}]});
        request_facts(Operation::Chat, &chat, None, &mut f);
        assert_eq!(f.stop_sequences, vec!["END"]);
        assert_eq!((f.choice_count, f.seed), (Some(2), Some(-1)));
        assert_eq!(f.tool_names, vec!["f1"]);
        assert_eq!(f.output_type.as_deref(), Some("json_object"));

        let mut f = GenAiFacts::default();
        let anthropic = json!({"model": "claude-sonnet-4-5", "max_tokens": 1024,
            "thinking": {"type": "enabled", "budget_tokens": 2048},
            "metadata": {"user_id": "u-77"}, "stop_sequences": ["\n\nHuman:"]});
        request_facts(Operation::Messages, &anthropic, None, &mut f);
        assert_eq!(f.reasoning_effort.as_deref(), Some("budget:2048"));
        assert_eq!(f.end_user.as_deref(), Some("u-77"));
        assert_eq!(f.stop_sequences.len(), 1);

        assert_eq!(
            path_model(
                Provider::Azure,
                "/openai/deployments/prod-4o/chat/completions"
            ),
            Some("prod-4o")
        );
        assert_eq!(
            path_model(
                Provider::Gemini,
                "/v1beta/models/gemini-2.5-pro:streamGenerateContent"
            ),
            Some("gemini-2.5-pro")
        );
        assert_eq!(
            Operation::detect(Provider::Gemini, "/v1beta/models/x:countTokens"),
            None
        );
    }

    #[test]
    fn cut_streams_keep_what_arrived() {
        let body = "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"par\"}}]}\n\ndata: {\"id\":\"c\",\"cho";
        let v = reassemble(Operation::Chat, body).unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], "par");
        assert!(v["choices"][0]["finish_reason"].is_null());
    }
}
