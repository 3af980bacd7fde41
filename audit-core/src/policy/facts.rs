//! What a rule can see of one exchange ([`Facts`]), and how it is read from a body or
//! a record. Absent values are empty strings, `0` and empty lists, so that a rule about
//! a field the exchange lacks is false rather than an error.

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap},
    sync::{Arc, OnceLock},
};

use cel::{
    common::{
        types::{CelInt, CelList, CelMap, CelMapKey, CelString},
        value::{CowVal, Val},
    },
    context::VariableResolver,
    Context, Env,
};
use serde_json::Value as Json;

use super::terms::Terms;

/// The variables of a rule, read before redaction (on the writer, or on the request
/// path for `block` and `sanitize`). Never written anywhere.
#[derive(Debug, Default, Clone)]
pub struct Facts<'a> {
    pub route: String,
    pub provider: String,
    pub operation: String,
    /// The model the request asked for.
    pub model: String,
    /// The model the response says served it.
    pub served_model: String,
    pub user: String,
    pub team: String,
    pub key_id: String,
    pub session: String,
    pub source: BTreeMap<String, String>,
    /// HTTP status; 0 before (or without) a response.
    pub status: i64,
    pub outcome: String,
    pub request: SideFacts<'a>,
    pub response: SideFacts<'a>,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub finish_reasons: Vec<String>,
}

/// One body's share: its text, the entities found in it, and the tools it names
/// (offered in a request, called in a response).
#[derive(Debug, Default, Clone)]
pub struct SideFacts<'a> {
    /// Borrowed from the body where it is one string of it (the request path).
    pub text: Cow<'a, str>,
    pub entities: BTreeMap<String, u64>,
    pub tools: Vec<String>,
}

/// Every variable a rule may name, with the fields of the maps.
pub const VARIABLES: &[(&str, &[&str])] = &[
    ("route", &[]),
    ("provider", &[]),
    ("operation", &[]),
    ("model", &[]),
    ("served_model", &[]),
    ("user", &[]),
    ("team", &[]),
    ("key_id", &[]),
    ("session", &[]),
    ("source", &[]),
    ("status", &[]),
    ("outcome", &[]),
    ("request", &["text", "entities", "tools"]),
    (
        "response",
        &["text", "entities", "tool_calls", "finish_reasons"],
    ),
    ("usage", &["input_tokens", "output_tokens"]),
    ("terms", &[]),
];

/// Variables unknown until a response exists: a rule that acts on the request
/// (`block`, `sanitize`) cannot name them.
pub const RESPONSE_VARIABLES: &[&str] = &["served_model", "status", "outcome", "response", "usage"];

/// Which variables the rules evaluated together name; the others are not built.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Needs(u32);

impl Needs {
    pub fn of(name: &str) -> Self {
        VARIABLES
            .iter()
            .position(|(v, _)| *v == name)
            .map_or(Self(0), |i| Self(1 << i))
    }

    pub fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    pub fn has(self, name: &str) -> bool {
        self.0 & Self::of(name).0 != 0
    }

    /// A use of `var` (with `field` selected on it): a body's text, entities and tool
    /// calls are extracted only for rules that read them (or the whole map).
    pub fn of_use(var: &str, field: Option<&str>) -> Self {
        let bit = |b: usize| 1 << (EXTRA_BITS + b);
        let extra = match (var, field) {
            ("request", None) => bit(REQUEST_TEXT) | bit(REQUEST_ENTITIES),
            ("request", Some("text")) => bit(REQUEST_TEXT),
            ("request", Some("entities")) => bit(REQUEST_ENTITIES),
            ("response", None) => {
                bit(RESPONSE_TEXT) | bit(TOOL_CALLS) | bit(RESPONSE_ENTITIES) | bit(FINISH_REASONS)
            }
            ("response", Some("text")) => bit(RESPONSE_TEXT),
            ("response", Some("tool_calls")) => bit(TOOL_CALLS),
            ("response", Some("entities")) => bit(RESPONSE_ENTITIES),
            ("response", Some("finish_reasons")) => bit(FINISH_REASONS),
            _ => 0,
        };
        Self::of(var).union(Self(extra))
    }

    /// Whether a rule reads `request.entities` (the request path then scans for them).
    pub fn request_entities(self) -> bool {
        self.extra(REQUEST_ENTITIES)
    }

    /// Whether a rule reads `response.entities`.
    pub fn response_entities(self) -> bool {
        self.extra(RESPONSE_ENTITIES)
    }

    /// Whether a rule reads `response.finish_reasons`.
    pub fn finish_reasons(self) -> bool {
        self.extra(FINISH_REASONS)
    }

    /// Whether a rule reads `response.tool_calls`.
    pub fn tool_calls(self) -> bool {
        self.extra(TOOL_CALLS)
    }

    /// Whether a rule reads the text of `side` (`request` or `response`).
    pub fn text(self, side: &str) -> bool {
        self.extra(if side == "request" {
            REQUEST_TEXT
        } else {
            RESPONSE_TEXT
        })
    }

    fn extra(self, bit: usize) -> bool {
        self.0 & (1 << (EXTRA_BITS + bit)) != 0
    }
}

/// The bits past the variables': the parts of a body that cost an extraction.
const EXTRA_BITS: usize = VARIABLES.len();
const REQUEST_TEXT: usize = 0;
const RESPONSE_TEXT: usize = 1;
const REQUEST_ENTITIES: usize = 2;
const TOOL_CALLS: usize = 3;
const RESPONSE_ENTITIES: usize = 4;
const FINISH_REASONS: usize = 5;
const _: () = assert!(EXTRA_BITS + FINISH_REASONS < 32, "Needs is a u32");

impl Facts<'_> {
    /// The variables of a CEL evaluation of these facts, built as the rules ask for
    /// them: every string borrowed, not copied (a record's text is evaluated where it
    /// lies), and a qualified name (`request.text`, `terms.NAME`) answered directly,
    /// without building the map it selects from. `terms` are the set's prebuilt
    /// automata.
    pub fn variables<'v>(&'v self, terms: &'v Terms, entity_names: &'v [String]) -> Variables<'v> {
        Variables {
            facts: self,
            terms,
            entity_names,
            built: Default::default(),
        }
    }

    /// The facts of an exported record (`custody policy test`): what the record holds,
    /// after redaction. Entity counts are each body's `redactions`.
    pub fn from_record(r: &Json) -> Facts<'static> {
        let s = |v: &Json| v.as_str().unwrap_or_default().to_owned();
        let body = |side: &str| -> SideFacts<'static> {
            let b = &r[side];
            SideFacts {
                text: b.get("body").map(text_of).unwrap_or_default().into(),
                entities: b
                    .get("redactions")
                    .and_then(Json::as_object)
                    .map(|m| {
                        m.iter()
                            .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
                            .collect()
                    })
                    .unwrap_or_default(),
                tools: Vec::new(),
            }
        };
        let g = &r["gen_ai"];
        let mut request = body("request");
        request.tools = list(&g["request"]["tool_names"]);
        let mut response = body("response");
        response.tools = r["response"]
            .get("body")
            .map(tool_calls_of)
            .unwrap_or_default();
        Facts {
            route: s(&r["route"]),
            provider: s(&g["provider"]["name"]),
            operation: s(&g["operation"]["name"]),
            model: s(&g["request"]["model"]),
            served_model: s(&g["response"]["model"]),
            user: s(&r["client"]["user"]),
            team: s(&r["client"]["team"]),
            key_id: s(&r["client"]["key_id"]),
            session: s(&r["session"]["id"]),
            source: r["source"]
                .as_object()
                .map(|m| m.iter().map(|(k, v)| (k.clone(), s(v))).collect())
                .unwrap_or_default(),
            status: r["http"]["status"].as_i64().unwrap_or(0),
            outcome: s(&r["outcome"]),
            request,
            response,
            input_tokens: g["usage"]["input_tokens"].as_i64().unwrap_or(0),
            output_tokens: g["usage"]["output_tokens"].as_i64().unwrap_or(0),
            finish_reasons: list(&g["response"]["finish_reasons"]),
        }
    }
}

fn list(v: &Json) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(str::to_owned))
        .collect()
}

fn string(s: &str) -> Box<dyn Val + '_> {
    Box::new(CelString::from(s))
}

fn int<'v>(n: i64) -> Box<dyn Val + 'v> {
    Box::new(CelInt::from(n))
}

fn strings(v: &[String]) -> Box<dyn Val + '_> {
    let items: Vec<Box<dyn Val + '_>> = v.iter().map(|s| string(s)).collect();
    Box::new(CelList::from(items))
}

fn map<'v>(entries: impl IntoIterator<Item = (&'v str, Box<dyn Val + 'v>)>) -> Box<dyn Val + 'v> {
    let m: HashMap<CelMapKey<'v>, Box<dyn Val + 'v>> = entries
        .into_iter()
        .map(|(k, v)| (CelMapKey::from(k), v))
        .collect();
    Box::new(CelMap::from(m))
}

/// Every entity the rules name, found or not (a rule about one never fails on a
/// missing key), and every entity found.
fn entities<'v>(found: &'v BTreeMap<String, u64>, names: &'v [String]) -> Box<dyn Val + 'v> {
    let count = |n: u64| int(i64::try_from(n).unwrap_or(i64::MAX));
    let mut m: HashMap<CelMapKey<'v>, Box<dyn Val + 'v>> = names
        .iter()
        .map(|n| (CelMapKey::from(n.as_str()), int(0)))
        .collect();
    for (k, n) in found {
        m.insert(CelMapKey::from(k.as_str()), count(*n));
    }
    Box::new(CelMap::from(m))
}

/// The variables of one evaluation. Lists and maps are built on first use and kept
/// for the other rules; strings and numbers are lent as they are asked for.
pub struct Variables<'v> {
    facts: &'v Facts<'v>,
    terms: &'v Terms,
    entity_names: &'v [String],
    built: [OnceLock<Box<dyn Val + 'v>>; Built::COUNT],
}

/// The values [`Variables`] builds once per evaluation.
#[derive(Clone, Copy)]
enum Built {
    Source,
    Request,
    RequestEntities,
    RequestTools,
    Response,
    ResponseEntities,
    ResponseToolCalls,
    FinishReasons,
    Usage,
}

impl Built {
    const COUNT: usize = 9;
}

impl<'v> Variables<'v> {
    /// A CEL context reading these variables.
    pub fn context<'c>(&'c self, env: &Arc<Env>) -> Context<'c, 'c> {
        let mut ctx = Context::with_env(env.clone());
        ctx.set_variable_resolver(self);
        ctx
    }

    fn built(&self, which: Built) -> CowVal<'_, 'v> {
        let f = self.facts;
        let value = self.built[which as usize].get_or_init(|| match which {
            Built::Source => map(f.source.iter().map(|(k, v)| (k.as_str(), string(v)))),
            Built::Request => map([
                ("text", string(&f.request.text)),
                ("entities", entities(&f.request.entities, self.entity_names)),
                ("tools", strings(&f.request.tools)),
            ]),
            Built::RequestEntities => entities(&f.request.entities, self.entity_names),
            Built::RequestTools => strings(&f.request.tools),
            Built::Response => map([
                ("text", string(&f.response.text)),
                (
                    "entities",
                    entities(&f.response.entities, self.entity_names),
                ),
                ("tool_calls", strings(&f.response.tools)),
                ("finish_reasons", strings(&f.finish_reasons)),
            ]),
            Built::ResponseEntities => entities(&f.response.entities, self.entity_names),
            Built::ResponseToolCalls => strings(&f.response.tools),
            Built::FinishReasons => strings(&f.finish_reasons),
            Built::Usage => map([
                ("input_tokens", int(f.input_tokens)),
                ("output_tokens", int(f.output_tokens)),
            ]),
        });
        CowVal::Borrowed(&**value)
    }

    /// `request.entities.NAME`: the count, or 0 for an entity a rule names.
    fn entity(&self, found: &BTreeMap<String, u64>, name: &str) -> Option<CowVal<'_, 'v>> {
        let n = match found.get(name) {
            Some(n) => *n,
            None if self.entity_names.iter().any(|e| e == name) => 0,
            // Not a name the rules know: the map says so, as for any missing key.
            None => return None,
        };
        Some(CowVal::owned(CelInt::from(
            i64::try_from(n).unwrap_or(i64::MAX),
        )))
    }
}

impl VariableResolver for Variables<'_> {
    fn resolve<'b>(&'b self, variable: &str) -> Option<CowVal<'b, 'b>> {
        let f = self.facts;
        let text = |s: &'b str| Some(CowVal::owned(CelString::from(s)));
        let number = |n: i64| Some(CowVal::owned(CelInt::from(n)));
        match variable {
            "route" => text(&f.route),
            "provider" => text(&f.provider),
            "operation" => text(&f.operation),
            "model" => text(&f.model),
            "served_model" => text(&f.served_model),
            "user" => text(&f.user),
            "team" => text(&f.team),
            "key_id" => text(&f.key_id),
            "session" => text(&f.session),
            "status" => number(f.status),
            "outcome" => text(&f.outcome),
            "source" => Some(self.built(Built::Source)),
            "request" => Some(self.built(Built::Request)),
            "request.text" => text(&f.request.text),
            "request.entities" => Some(self.built(Built::RequestEntities)),
            "request.tools" => Some(self.built(Built::RequestTools)),
            "response" => Some(self.built(Built::Response)),
            "response.text" => text(&f.response.text),
            "response.entities" => Some(self.built(Built::ResponseEntities)),
            "response.tool_calls" => Some(self.built(Built::ResponseToolCalls)),
            "response.finish_reasons" => Some(self.built(Built::FinishReasons)),
            "usage" => Some(self.built(Built::Usage)),
            "usage.input_tokens" => number(f.input_tokens),
            "usage.output_tokens" => number(f.output_tokens),
            "terms" => Some(self.terms.all()),
            _ => {
                if let Some(name) = variable.strip_prefix("request.entities.") {
                    self.entity(&f.request.entities, name)
                } else if let Some(name) = variable.strip_prefix("response.entities.") {
                    self.entity(&f.response.entities, name)
                } else if let Some(name) = variable.strip_prefix("terms.") {
                    self.terms.list(name)
                } else {
                    None
                }
            }
        }
    }
}

/// Keys whose values are not text a person wrote or read: identifiers, settings,
/// tool declarations and inline binaries. (A `match`: this runs for every key of
/// every body a rule reads.)
fn not_text(key: &str) -> bool {
    matches!(
        key,
        "model"
            | "role"
            | "type"
            | "id"
            | "object"
            | "name"
            | "tools"
            | "tool_choice"
            | "response_format"
            | "format"
            | "metadata"
            | "user"
            | "stop"
            | "logit_bias"
            | "index"
            | "finish_reason"
            | "stop_reason"
            | "usage"
            | "usageMetadata"
            | "created"
            | "system_fingerprint"
            | "data"
            | "b64_json"
            | "image_url"
            | "url"
            | "file_id"
            | "mime_type"
            | "mimeType"
            | "media_type"
            | "inlineData"
            | "fileData"
            | "cache_control"
            | "generationConfig"
            | "safetySettings"
            | "stream_options"
            | "tool_call_id"
            | "tool_use_id"
            | "call_id"
            | "signature"
            | "encrypted_content"
            | "logprobs"
            | "service_tier"
            | "status"
    )
}

/// The user-visible text of a body: every string of it (message contents, tool
/// arguments and results, instructions) except identifiers, settings, tool
/// declarations and inline binaries; one per line.
pub fn text_of(body: &Json) -> String {
    let mut text = String::new();
    text_into(body, &mut text);
    text
}

/// [`text_of`] into `out`, cleared first: the writer reuses a buffer per body, so
/// reading a text costs no allocation.
pub fn text_into(body: &Json, out: &mut String) {
    out.clear();
    // As `joined`: leading empty pieces add no line.
    let mut first = true;
    each_piece(body, &mut |p: &str| {
        if first && p.is_empty() {
            return;
        }
        if !first {
            out.push('\n');
        }
        out.push_str(p);
        first = false;
    });
}

/// Each string [`text_of`] reads, in order.
fn each_piece<'a>(v: &'a Json, f: &mut impl FnMut(&'a str)) {
    match v {
        Json::String(s) => f(s),
        Json::Array(items) => items.iter().for_each(|i| each_piece(i, f)),
        Json::Object(m) => {
            for (k, v) in m {
                if !not_text(k) {
                    each_piece(v, f);
                }
            }
        }
        _ => {}
    }
}

/// Pieces of text, one per line (leading empty ones add no line): borrowed when there
/// is one.
fn joined(mut pieces: Vec<Cow<'_, str>>) -> Cow<'_, str> {
    let first = pieces
        .iter()
        .position(|p| !p.is_empty())
        .unwrap_or(pieces.len());
    match pieces.len() - first {
        0 => Cow::Borrowed(""),
        1 => pieces.swap_remove(first),
        _ => Cow::Owned(pieces[first..].join("\n")),
    }
}

/// A request body as the request path reads it: its text, borrowed from the body
/// where a string has no escapes, and its settings (every top-level field but the
/// conversation) as a value for [`crate::genai::request_facts`]. The conversation,
/// most of a large request, is never copied into a value.
pub struct RequestView<'a> {
    pub pieces: Vec<Cow<'a, str>>,
    pub settings: Json,
}

/// Top-level fields that hold the conversation, in every provider's shape.
fn conversation(key: &str) -> bool {
    matches!(
        key,
        "messages"
            | "input"
            | "contents"
            | "system"
            | "systemInstruction"
            | "prompt"
            | "instructions"
    )
}

impl<'a> RequestView<'a> {
    /// `None` when the body is not a JSON object.
    pub fn read(body: &'a str) -> Option<Self> {
        let mut view = Self {
            pieces: Vec::new(),
            settings: Json::Object(serde_json::Map::new()),
        };
        let mut de = serde_json::Deserializer::from_str(body);
        serde::Deserializer::deserialize_map(&mut de, Top(&mut view)).ok()?;
        de.end().ok()?;
        Some(view)
    }

    /// The text, as [`text_of`] gives it: borrowed when it is one string of the body.
    pub fn into_parts(self) -> (Cow<'a, str>, Json) {
        (joined(self.pieces), self.settings)
    }
}

/// The top-level object of a request.
struct Top<'v, 'a>(&'v mut RequestView<'a>);

impl<'de> serde::de::Visitor<'de> for Top<'_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<M: serde::de::MapAccess<'de>>(self, mut map: M) -> Result<(), M::Error> {
        let view = self.0;
        while let Some(key) = map.next_key::<String>()? {
            if conversation(&key) {
                map.next_value_seed(Pieces(&mut view.pieces))?;
                continue;
            }
            let value: Json = map.next_value()?;
            if !not_text(&key) {
                each_piece(&value, &mut |p| view.pieces.push(Cow::Owned(p.to_owned())));
            }
            if let Json::Object(settings) = &mut view.settings {
                settings.insert(key, value);
            }
        }
        Ok(())
    }
}

/// Collects the strings of a value, as [`text_of`] does, without building it.
struct Pieces<'v, 'a>(&'v mut Vec<Cow<'a, str>>);

impl<'de> serde::de::DeserializeSeed<'de> for Pieces<'_, 'de> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Pieces<'_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<(), E> {
        self.0.push(Cow::Borrowed(s));
        Ok(())
    }

    fn visit_str<E>(self, s: &str) -> Result<(), E> {
        self.0.push(Cow::Owned(s.to_owned()));
        Ok(())
    }

    fn visit_string<E>(self, s: String) -> Result<(), E> {
        self.0.push(Cow::Owned(s));
        Ok(())
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<S: serde::de::SeqAccess<'de>>(self, mut seq: S) -> Result<(), S::Error> {
        while seq.next_element_seed(Pieces(self.0))?.is_some() {}
        Ok(())
    }

    fn visit_map<M: serde::de::MapAccess<'de>>(self, mut map: M) -> Result<(), M::Error> {
        while let Some(skip) = map.next_key_seed(NotText)? {
            if skip {
                map.next_value::<serde::de::IgnoredAny>()?;
            } else {
                map.next_value_seed(Pieces(self.0))?;
            }
        }
        Ok(())
    }
}

/// A key, read only for whether its value is not text.
struct NotText;

impl<'de> serde::de::DeserializeSeed<'de> for NotText {
    type Value = bool;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl serde::de::Visitor<'_> for NotText {
    type Value = bool;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E>(self, s: &str) -> Result<bool, E> {
        Ok(not_text(s))
    }
}

/// The names of the tools a response calls, in every provider's shape: OpenAI's
/// `tool_calls[].function.name`, Anthropic's `tool_use`, the Responses API's
/// `function_call`, Gemini's `functionCall`.
pub fn tool_calls_of(body: &Json) -> Vec<String> {
    fn walk(v: &Json, out: &mut Vec<String>) {
        match v {
            Json::Array(items) => items.iter().for_each(|i| walk(i, out)),
            Json::Object(m) => {
                fn name(o: Option<&Json>) -> Option<&str> {
                    o.and_then(|f| f.get("name")).and_then(Json::as_str)
                }
                let typed = m
                    .get("type")
                    .and_then(Json::as_str)
                    .is_some_and(|t| matches!(t, "tool_use" | "function_call" | "server_tool_use"));
                if typed {
                    if let Some(n) = m.get("name").and_then(Json::as_str) {
                        out.push(n.to_owned());
                    }
                }
                if let Some(n) = name(m.get("functionCall")) {
                    out.push(n.to_owned());
                }
                if let Some(calls) = m.get("tool_calls").and_then(Json::as_array) {
                    for c in calls {
                        if let Some(n) = name(c.get("function")) {
                            out.push(n.to_owned());
                        }
                    }
                }
                for (k, v) in m {
                    if k != "tool_calls" && k != "functionCall" {
                        walk(v, out);
                    }
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(body, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn text_is_the_messages_and_tool_arguments_not_the_settings() {
        let chat = json!({"model":"gpt-4o","messages":[
            {"role":"system","content":"be brief"},
            {"role":"user","content":[{"type":"text","text":"hello"},{"type":"image_url","image_url":{"url":"data:..."}}]},
            {"role":"assistant","tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{\"q\":1}"}}]}],
            "tools":[{"type":"function","function":{"name":"f","description":"secret tool doc"}}]});
        assert_eq!(text_of(&chat), "be brief\nhello\n{\"q\":1}");
        // The writer's reused buffer holds this text only, whatever it held before.
        let mut buffer = "the previous record's text".to_owned();
        text_into(&chat, &mut buffer);
        assert_eq!(buffer, text_of(&chat));
        text_into(&json!({"messages": []}), &mut buffer);
        assert_eq!(buffer, "");
    }

    #[test]
    fn the_request_path_reads_the_same_text_without_building_the_conversation() {
        let bodies = [
            json!({"model":"gpt-4o","messages":[{"role":"user","content":"one message"}]}),
            json!({"model":"m","messages":[{"role":"system","content":""},{"role":"user","content":"a \"quoted\"\nline é"}],"user":"u1"}),
            json!({"system":[{"type":"text","text":"be brief"}],"messages":[{"role":"user","content":[{"type":"text","text":""},{"type":"text","text":"x"}]}],"metadata":{"user_id":"u"}}),
            json!({"contents":[{"parts":[{"text":"hi"},{"inlineData":{"data":"AAAA"}}]}],"generationConfig":{"temperature":0.2}}),
            json!({"input":"plain","instructions":"sys","text":{"format":{"type":"json_schema","description":"schema doc"}}}),
            json!({"model":"m","tools":[{"type":"function","function":{"name":"f","description":"d"}}],"messages":[]}),
            json!({}),
        ];
        for body in bodies {
            let raw = body.to_string();
            let (text, settings) = RequestView::read(&raw).unwrap().into_parts();
            assert_eq!(text, text_of(&body), "{raw}");
            // The settings are the body but its conversation.
            for (k, v) in body.as_object().unwrap() {
                if !conversation(k) {
                    assert_eq!(&settings[k], v, "{raw}");
                }
            }
        }
        let one = json!({"messages":[{"role":"user","content":"only this"}]}).to_string();
        let (text, _) = RequestView::read(&one).unwrap().into_parts();
        assert!(matches!(text, Cow::Borrowed(_)), "one string is not copied");
        for not_object in ["[1]", "\"s\"", "{", "{\"a\":1} trailing"] {
            assert!(RequestView::read(not_object).is_none(), "{not_object}");
        }
        // Nested past the parser's limit inside the conversation and inside a setting:
        // refused (the request path then reads the body as text), never a stack overflow.
        for key in ["messages", "tools"] {
            let deep = format!(
                "{{\"{key}\":{}1{}}}",
                "[".repeat(100_000),
                "]".repeat(100_000)
            );
            assert!(RequestView::read(&deep).is_none(), "{key}");
        }
    }

    #[test]
    fn tool_calls_are_found_in_every_shape() {
        let openai = json!({"choices":[{"message":{"tool_calls":[{"function":{"name":"a"}}]}}]});
        let anthropic = json!({"content":[{"type":"tool_use","name":"b","input":{}}]});
        let gemini = json!({"candidates":[{"content":{"parts":[{"functionCall":{"name":"c"}}]}}]});
        let responses = json!({"output":[{"type":"function_call","name":"d"}]});
        for (b, n) in [
            (openai, "a"),
            (anthropic, "b"),
            (gemini, "c"),
            (responses, "d"),
        ] {
            assert_eq!(tool_calls_of(&b), vec![n.to_owned()]);
        }
    }
}
