//! What a rule can see of one exchange ([`Facts`]), and how it is read from a body or
//! a record. Absent values are empty strings, `0` and empty lists, so that a rule about
//! a field the exchange lacks is false rather than an error.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use cel::{
    common::{
        types::{CelInt, CelList, CelMap, CelMapKey, CelString},
        value::{CowVal, Val},
    },
    context::VariableResolver,
    Context, Env, Value,
};
use serde_json::Value as Json;

/// The variables of a rule, read before redaction (on the writer, or on the request
/// path for `block` and `sanitize`). Never written anywhere.
#[derive(Debug, Default, Clone)]
pub struct Facts {
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
    pub request: SideFacts,
    pub response: SideFacts,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub finish_reasons: Vec<String>,
}

/// One body's share: its text, the entities found in it, and the tools it names
/// (offered in a request, called in a response).
#[derive(Debug, Default, Clone)]
pub struct SideFacts {
    pub text: String,
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

    pub fn all() -> Self {
        Self((1 << (TEXT_BITS + 3)) - 1)
    }

    pub fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    pub fn has(self, name: &str) -> bool {
        self.0 & Self::of(name).0 != 0
    }

    /// A use of `var` (with `field` selected on it): the text of a body is extracted
    /// only for rules that read `request.text` or `response.text` (or the whole map).
    pub fn of_use(var: &str, field: Option<&str>) -> Self {
        let text = match (var, field) {
            ("request", None) => Self(1 << TEXT_BITS | 1 << (TEXT_BITS + 2)),
            ("request", Some("text")) => Self(1 << TEXT_BITS),
            ("request", Some("entities")) => Self(1 << (TEXT_BITS + 2)),
            ("response", Some("text") | None) => Self(1 << (TEXT_BITS + 1)),
            _ => Self(0),
        };
        Self::of(var).union(text)
    }

    /// Whether a rule reads `request.entities` (the request path then scans for them).
    pub fn request_entities(self) -> bool {
        self.0 & (1 << (TEXT_BITS + 2)) != 0
    }

    /// Whether a rule reads the text of `side` (`request` or `response`).
    pub fn text(self, side: &str) -> bool {
        let bit = if side == "request" {
            TEXT_BITS
        } else {
            TEXT_BITS + 1
        };
        self.0 & (1 << bit) != 0
    }
}

/// The bits past the variables': `request.text`, `response.text`, `request.entities`.
const TEXT_BITS: usize = VARIABLES.len();

impl Facts {
    /// The variables of a CEL evaluation of these facts: only those in `needs`, every
    /// string borrowed, not copied (a record's text is evaluated where it lies), no
    /// map of names built per evaluation. `terms` are the set's prebuilt automata.
    pub fn variables<'v>(
        &'v self,
        terms: &'v Terms,
        entity_names: &'v [String],
        needs: Needs,
    ) -> Variables<'v> {
        let mut vars = Variables {
            terms,
            values: Vec::with_capacity(8),
        };
        let mut add = |name: &'static str, v: Box<dyn Val + 'v>| {
            if needs.has(name) {
                vars.values.push((name, v));
            }
        };
        add("route", string(&self.route));
        add("provider", string(&self.provider));
        add("operation", string(&self.operation));
        add("model", string(&self.model));
        add("served_model", string(&self.served_model));
        add("user", string(&self.user));
        add("team", string(&self.team));
        add("key_id", string(&self.key_id));
        add("session", string(&self.session));
        add("status", Box::new(CelInt::from(self.status)));
        add("outcome", string(&self.outcome));
        if needs.has("source") {
            add(
                "source",
                map(self.source.iter().map(|(k, v)| (k.as_str(), string(v)))),
            );
        }
        if needs.has("request") {
            let r = &self.request;
            add(
                "request",
                map([
                    ("text", string(&r.text)),
                    ("entities", entities(&r.entities, entity_names)),
                    ("tools", strings(&r.tools)),
                ]),
            );
        }
        if needs.has("response") {
            let r = &self.response;
            add(
                "response",
                map([
                    ("text", string(&r.text)),
                    ("entities", entities(&r.entities, entity_names)),
                    ("tool_calls", strings(&r.tools)),
                    ("finish_reasons", strings(&self.finish_reasons)),
                ]),
            );
        }
        if needs.has("usage") {
            add(
                "usage",
                map([
                    ("input_tokens", int(self.input_tokens)),
                    ("output_tokens", int(self.output_tokens)),
                ]),
            );
        }
        vars
    }

    /// The facts of an exported record (`custody policy test`): what the record holds,
    /// after redaction. Entity counts are each body's `redactions`.
    pub fn from_record(r: &Json) -> Self {
        let s = |v: &Json| v.as_str().unwrap_or_default().to_owned();
        let body = |side: &str| -> SideFacts {
            let b = &r[side];
            SideFacts {
                text: b.get("body").map(text_of).unwrap_or_default(),
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
        Self {
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

/// The variables of one evaluation, found by name (a handful: a scan beats a map).
pub struct Variables<'v> {
    terms: &'v Terms,
    values: Vec<(&'static str, Box<dyn Val + 'v>)>,
}

impl Variables<'_> {
    /// A CEL context reading these variables.
    pub fn context<'c>(&'c self, env: &Arc<Env>) -> Context<'c, 'c> {
        let mut ctx = Context::with_env(env.clone());
        ctx.set_variable_resolver(self);
        ctx
    }
}

impl VariableResolver for Variables<'_> {
    fn resolve<'b>(&'b self, variable: &str) -> Option<CowVal<'b, 'b>> {
        if variable == "terms" {
            return Some(CowVal::Borrowed(&*self.terms.0));
        }
        self.values
            .iter()
            .find(|(n, _)| *n == variable)
            .map(|(_, v)| CowVal::Borrowed(&**v))
    }
}

/// The `terms` variable: the set's term lists, built once, lent to every context.
pub struct Terms(Box<dyn Val>);

impl Terms {
    pub fn new(map: Value) -> Result<Self, cel::ExecutionError> {
        Ok(Self(Box::<dyn Val>::try_from(map)?))
    }
}

impl std::fmt::Debug for Terms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Terms")
    }
}

/// Keys whose values are not text a person wrote or read: identifiers, settings,
/// tool declarations and inline binaries.
const NOT_TEXT: &[&str] = &[
    "model",
    "role",
    "type",
    "id",
    "object",
    "name",
    "tools",
    "tool_choice",
    "response_format",
    "format",
    "metadata",
    "user",
    "stop",
    "logit_bias",
    "index",
    "finish_reason",
    "stop_reason",
    "usage",
    "usageMetadata",
    "created",
    "system_fingerprint",
    "data",
    "b64_json",
    "image_url",
    "url",
    "file_id",
    "mime_type",
    "mimeType",
    "media_type",
    "inlineData",
    "fileData",
    "cache_control",
    "generationConfig",
    "safetySettings",
    "stream_options",
    "tool_call_id",
    "tool_use_id",
    "call_id",
    "signature",
    "encrypted_content",
    "logprobs",
    "service_tier",
    "status",
];

/// The user-visible text of a body: every string of it (message contents, tool
/// arguments and results, instructions) except identifiers, settings, tool
/// declarations and inline binaries; one per line.
pub fn text_of(body: &Json) -> String {
    fn walk(v: &Json, out: &mut String) {
        match v {
            Json::String(s) => {
                if !out.is_empty() {
                    out.push('\n');
                }
                out.push_str(s);
            }
            Json::Array(items) => items.iter().for_each(|i| walk(i, out)),
            Json::Object(m) => {
                for (k, v) in m {
                    if !NOT_TEXT.contains(&k.as_str()) {
                        walk(v, out);
                    }
                }
            }
            _ => {}
        }
    }
    let mut out = String::new();
    walk(body, &mut out);
    out
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
