//! Prompt-response lineage: keyed hashes of what was asked and answered, and the index
//! that links a stateless multi-turn request to the record whose turn it continues.
//!
//! Each message is reduced to a canonical form, `role FF text FF (tool FE arguments FF)*`
//! (bytes `FE` and `FF` never occur in UTF-8, so the fields cannot run together), so that an answer and the same answer sent back as history hash alike (a
//! string content and a list of text parts are the same text; OpenAI's `refusal: null`
//! or Anthropic's thinking blocks do not count). With `h(m)` the HMAC-SHA-256 of a
//! message's canonical form under the deployment key:
//!
//! - `P0 = HMAC(key, "custody.prompt/v1")`, `Pj = SHA-256(P(j-1) || h(mj))`;
//! - `prompt.hash = Pn` over the prompt's messages (system first);
//! - `completion.hash = h(c)` for the answer `c`;
//! - a record is indexed under `SHA-256(Pn || h(c))`, which is exactly `P(n+1)` of a
//!   later request that sends this prompt and answer back as history. A request's
//!   parent is the record indexed under its longest such prefix.
//!
//! Keyed, so that a short prompt cannot be recovered by hashing guesses.

use std::{
    collections::{HashMap, VecDeque},
    hash::{BuildHasherDefault, Hasher},
};

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::genai::Operation;

pub type Hash = [u8; 32];

/// What the writer learns about one exchange's lineage.
#[derive(Debug, Default, Clone)]
pub struct Lineage {
    /// `P1..Pn`.
    pub prefixes: Vec<Hash>,
    pub completion: Option<Hash>,
}

impl Lineage {
    pub fn prompt_hash(&self) -> Option<Hash> {
        self.prefixes.last().copied()
    }

    /// The key this record is indexed under, when it has a prompt and an answer.
    pub fn turn_key(&self) -> Option<Hash> {
        Some(step(&self.prompt_hash()?, &self.completion?))
    }
}

/// Hashes messages under the deployment key.
#[derive(Clone)]
pub struct LineageHasher {
    /// Keyed once; cloned per message (re-keying would cost two more compressions).
    keyed: Hmac<Sha256>,
}

impl LineageHasher {
    pub fn new(key: &[u8]) -> Self {
        // HMAC takes a key of any length; an empty one still gives a valid (weak) MAC.
        let keyed = <Hmac<Sha256> as Mac>::new_from_slice(key)
            .or_else(|_| <Hmac<Sha256> as Mac>::new_from_slice(b"custody"))
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        Self { keyed }
    }

    fn mac(&self, bytes: &[u8]) -> Hash {
        let mut m = self.keyed.clone();
        m.update(bytes);
        m.finalize().into_bytes().into()
    }

    /// `P1..Pn` for canonical messages.
    pub fn prefixes(&self, messages: &[Vec<u8>]) -> Vec<Hash> {
        let mut p = self.mac(b"custody.prompt/v1");
        messages
            .iter()
            .map(|m| {
                p = step(&p, &self.mac(m));
                p
            })
            .collect()
    }

    pub fn message(&self, canonical: &[u8]) -> Hash {
        self.mac(canonical)
    }
}

/// The caller a conversation belongs to: links never cross from one caller to another.
/// A caller is its key (`client.key_id`) and its user (`client.user`), as recorded.
pub fn caller_scope(key_id: Option<&str>, user: Option<&str>) -> Hash {
    let mut h = Sha256::new();
    h.update(b"custody.caller/v1\0");
    h.update(key_id.unwrap_or_default().as_bytes());
    h.update([0]);
    h.update(user.unwrap_or_default().as_bytes());
    h.finalize().into()
}

fn step(prev: &Hash, next: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(next);
    h.finalize().into()
}

/// The prompt of a request as canonical messages, system instructions first.
pub fn prompt_messages(op: Operation, body: &Value) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    match op {
        Operation::Chat => {
            for m in items(body.get("messages")) {
                out.push(message(m));
            }
        }
        Operation::Messages => {
            if let Some(s) = body.get("system") {
                out.push(canonical("system", s, &[]));
            }
            for m in items(body.get("messages")) {
                out.push(message(m));
            }
        }
        Operation::GenerateContent => {
            if let Some(s) = body.get("systemInstruction") {
                out.push(gemini_content(s, "system"));
            }
            for c in items(body.get("contents")) {
                out.push(gemini_content(c, "user"));
            }
        }
        Operation::Responses => {
            if let Some(s) = body.get("instructions") {
                out.push(canonical("system", s, &[]));
            }
            match body.get("input") {
                Some(Value::Array(items)) => {
                    for i in items {
                        if i.get("role").is_some() {
                            out.push(message(i));
                        } else {
                            out.push(canonical("item", &Value::String(i.to_string()), &[]));
                        }
                    }
                }
                Some(v) => out.push(canonical("user", v, &[])),
                None => {}
            }
        }
        Operation::TextCompletion | Operation::Embeddings | Operation::Moderations => {
            let field = match op {
                Operation::TextCompletion => "prompt",
                _ => "input",
            };
            if let Some(v) = body.get(field) {
                out.push(canonical("user", v, &[]));
            }
        }
        Operation::Images => {
            if let Some(v) = body.get("prompt") {
                out.push(canonical("user", v, &[]));
            }
        }
        Operation::Audio => {
            if let Some(v) = body.get("input") {
                out.push(canonical("user", v, &[]));
            }
        }
    }
    out
}

/// The answer of a response (its first choice or candidate) in canonical form.
pub fn completion_message(op: Operation, body: &Value) -> Option<Vec<u8>> {
    match op {
        Operation::Chat => body.get("choices")?.get(0)?.get("message").map(message),
        Operation::TextCompletion => {
            let text = body.get("choices")?.get(0)?.get("text")?;
            Some(canonical("assistant", text, &[]))
        }
        Operation::Messages => body.get("content").map(|_| message(body)),
        Operation::GenerateContent => body
            .get("candidates")?
            .get(0)?
            .get("content")
            .map(|c| gemini_content(c, "model")),
        Operation::Responses => {
            let of_type = |t: &'static str| {
                items(body.get("output"))
                    .filter(move |o| o.get("type").and_then(Value::as_str) == Some(t))
            };
            let texts: Vec<&Value> = of_type("message")
                .flat_map(|o| items(o.get("content")))
                .collect();
            // An answer that is only tool calls is an answer too.
            let calls: Vec<(String, String)> = of_type("function_call")
                .map(|c| (text_of(c.get("name")), text_of(c.get("arguments"))))
                .collect();
            (!texts.is_empty() || !calls.is_empty()).then(|| {
                canonical(
                    "assistant",
                    &Value::Array(texts.into_iter().cloned().collect()),
                    &calls,
                )
            })
        }
        Operation::Embeddings | Operation::Moderations | Operation::Images | Operation::Audio => {
            None
        }
    }
}

fn items(v: Option<&Value>) -> impl Iterator<Item = &Value> {
    v.and_then(Value::as_array).into_iter().flatten()
}

/// An OpenAI or Anthropic message.
fn message(m: &Value) -> Vec<u8> {
    let role = m.get("role").and_then(Value::as_str).unwrap_or("");
    let mut calls: Vec<(String, String)> = items(m.get("tool_calls"))
        .map(|c| {
            let f = c.get("function").unwrap_or(&Value::Null);
            (text_of(f.get("name")), text_of(f.get("arguments")))
        })
        .collect();
    // Anthropic tool calls are content blocks.
    for b in items(m.get("content")) {
        if b.get("type").and_then(Value::as_str) == Some("tool_use") {
            calls.push((
                text_of(b.get("name")),
                b.get("input").map(sorted_json).unwrap_or_default(),
            ));
        }
    }
    canonical(role, m.get("content").unwrap_or(&Value::Null), &calls)
}

fn gemini_content(c: &Value, default_role: &str) -> Vec<u8> {
    let role = c
        .get("role")
        .and_then(Value::as_str)
        .unwrap_or(default_role);
    let calls: Vec<(String, String)> = items(c.get("parts"))
        .filter_map(|p| p.get("functionCall"))
        .map(|f| {
            (
                text_of(f.get("name")),
                f.get("args").map(sorted_json).unwrap_or_default(),
            )
        })
        .collect();
    canonical(role, c.get("parts").unwrap_or(&Value::Null), &calls)
}

/// JSON with every object's keys sorted: tool inputs hash the same whatever order a
/// client sends their keys back in.
fn sorted_json(v: &Value) -> String {
    fn sort(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                Value::Object(keys.into_iter().map(|k| (k.clone(), sort(&m[k]))).collect())
            }
            Value::Array(a) => Value::Array(a.iter().map(sort).collect()),
            other => other.clone(),
        }
    }
    sort(v).to_string()
}

fn text_of(v: Option<&Value>) -> String {
    v.and_then(Value::as_str).unwrap_or("").to_owned()
}

/// `role FF text FF (name FE args FF)*`. Text parts are joined; other parts (images,
/// tool results) count by their JSON; tool calls and thinking are not text.
fn canonical(role: &str, content: &Value, calls: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(role.len() + 256);
    out.extend_from_slice(role.as_bytes());
    out.push(0xFF);
    collect_text(content, &mut out);
    out.push(0xFF);
    for (name, args) in calls {
        out.extend_from_slice(name.as_bytes());
        out.push(0xFE);
        out.extend_from_slice(args.as_bytes());
        out.push(0xFF);
    }
    out
}

fn collect_text(v: &Value, out: &mut Vec<u8>) {
    let mut push_str = |s: &str| out.extend_from_slice(s.as_bytes());
    match v {
        Value::String(s) => push_str(s),
        Value::Array(parts) => {
            for p in parts {
                collect_text(p, out);
            }
        }
        Value::Object(o) => {
            let kind = o.get("type").and_then(Value::as_str);
            match (kind, o.get("text")) {
                (_, Some(Value::String(t))) => push_str(t),
                (Some("tool_use" | "thinking" | "redacted_thinking"), _) => {}
                _ if o.contains_key("functionCall") || o.contains_key("thought") => {}
                _ => push_str(&v.to_string()),
            }
        }
        Value::Null => {}
        other => push_str(&other.to_string()),
    }
}

/// Recent turns by key, and recent response ids, each mapped to their record id.
/// Bounded: the oldest entries go first.
pub struct ConversationIndex {
    turns: HashMap<Hash, String, BuildHasherDefault<DigestHasher>>,
    /// Keyed by the caller's scope (its first eight bytes) and the response id.
    responses: HashMap<(u64, String), String>,
    order: VecDeque<Entry>,
    capacity: usize,
}

/// The keys are SHA-256 digests, already uniform: their first eight bytes are the hash
/// (SipHash over them cost more than the rest of the lookup).
#[derive(Default)]
struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for (i, b) in bytes.iter().take(8).enumerate() {
            self.0 ^= u64::from(*b) << (8 * i);
        }
    }
}

enum Entry {
    Turn(Hash),
    Response((u64, String)),
}

impl ConversationIndex {
    pub fn new(capacity: usize) -> Self {
        Self {
            turns: HashMap::default(),
            responses: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity.max(1);
    }

    /// The record this request continues, among the same caller's (`scope`): the one
    /// answering a previous response id, else the one whose prompt and answer are the
    /// longest prefix of this prompt.
    pub fn parent(
        &self,
        scope: &Hash,
        lineage: &Lineage,
        previous_response_id: Option<&str>,
    ) -> Option<&str> {
        if let Some(id) =
            previous_response_id.and_then(|p| self.responses.get(&scoped_id(scope, p)))
        {
            return Some(id);
        }
        lineage
            .prefixes
            .iter()
            .rev()
            .find_map(|p| self.turns.get(&scoped(scope, p)))
            .map(String::as_str)
    }

    pub fn insert(
        &mut self,
        scope: &Hash,
        lineage: &Lineage,
        response_id: Option<&str>,
        record_id: &str,
    ) {
        if let Some(k) = lineage.turn_key() {
            let k = scoped(scope, &k);
            self.turns.insert(k, record_id.to_owned());
            self.order.push_back(Entry::Turn(k));
        }
        if let Some(r) = response_id {
            let r = scoped_id(scope, r);
            self.responses.insert(r.clone(), record_id.to_owned());
            self.order.push_back(Entry::Response(r));
        }
        while self.order.len() > self.capacity {
            match self.order.pop_front() {
                Some(Entry::Turn(k)) => {
                    self.turns.remove(&k);
                }
                Some(Entry::Response(r)) => {
                    self.responses.remove(&r);
                }
                None => break,
            }
        }
    }
}

/// A response id as the index keys it: within one caller.
fn scoped_id(scope: &Hash, id: &str) -> (u64, String) {
    let mut first = [0u8; 8];
    first.copy_from_slice(&scope[..8]);
    (u64::from_le_bytes(first), id.to_owned())
}

/// A turn key within one caller. Both are uniform digests, so XOR keeps keys of one
/// caller distinct and apart from every other caller's, at the cost of 32 byte
/// operations instead of a hash per prefix looked up.
fn scoped(scope: &Hash, key: &Hash) -> Hash {
    let mut out = *key;
    for (o, s) in out.iter_mut().zip(scope) {
        *o ^= s;
    }
    out
}

/// The index as it stood before a restart, rebuilt from the newest records of the trail
/// (their `prompt.hash`, `completion.hash` and `gen_ai.response.id`), so that a rolling
/// restart does not break the conversations in flight. Reads at most `capacity`
/// answered records, newest segments first.
pub fn rebuild(dir: &std::path::Path, capacity: usize) -> ConversationIndex {
    #[derive(serde::Deserialize)]
    struct Hashed {
        hash: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Response {
        id: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct GenAi {
        response: Option<Response>,
    }
    #[derive(serde::Deserialize)]
    struct Client {
        key_id: Option<String>,
        user: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Turn {
        id: String,
        prompt: Option<Hashed>,
        completion: Option<Hashed>,
        gen_ai: Option<GenAi>,
        client: Option<Client>,
    }
    let hash = |h: &Option<Hashed>| {
        let mut out = [0u8; 32];
        let hex = h.as_ref()?.hash.as_deref()?;
        hex::decode_to_slice(hex, &mut out).ok().map(|_| out)
    };
    let mut index = ConversationIndex::new(capacity);
    let source = crate::review::reader::DirSource(dir);
    let Ok(segments) = crate::review::reader::segments(dir) else {
        return index;
    };
    let mut newest_first: Vec<Vec<Turn>> = Vec::new();
    let mut taken = 0;
    for seg in segments.iter().rev() {
        let mut turns = Vec::new();
        let read = crate::review::reader::for_each_line_in(&source, seg, true, |line| {
            if memchr::memmem::find(line, b"\"completion\":{\"hash\"").is_some() {
                if let Ok(t) = serde_json::from_slice::<Turn>(line) {
                    turns.push(t);
                }
            }
            std::ops::ControlFlow::Continue(())
        });
        if let Err(e) = read {
            tracing::warn!(segment = %seg.name(), error = %e, "conversation index: segment not read");
        }
        taken += turns.len();
        newest_first.push(turns);
        if taken >= capacity {
            break;
        }
    }
    for t in newest_first.into_iter().rev().flatten() {
        let lineage = Lineage {
            prefixes: hash(&t.prompt).into_iter().collect(),
            completion: hash(&t.completion),
        };
        let response_id = t.gen_ai.and_then(|g| g.response).and_then(|r| r.id);
        let client = t.client.as_ref();
        let scope = caller_scope(
            client.and_then(|c| c.key_id.as_deref()),
            client.and_then(|c| c.user.as_deref()),
        );
        index.insert(&scope, &lineage, response_id.as_deref(), &t.id);
    }
    index
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn lineage(h: &LineageHasher, op: Operation, req: &Value, resp: Option<&Value>) -> Lineage {
        Lineage {
            prefixes: h.prefixes(&prompt_messages(op, req)),
            completion: resp
                .and_then(|r| completion_message(op, r))
                .map(|c| h.message(&c)),
        }
    }

    #[test]
    fn an_answer_sent_back_as_history_links_the_turns() {
        let h = LineageHasher::new(b"k");
        let mut idx = ConversationIndex::new(10);
        let alice = caller_scope(Some("key_alice"), None);
        let req1 = json!({"messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}]});
        let resp1 =
            json!({"choices":[{"message":{"role":"assistant","content":"Hello!","refusal":null}}]});
        let l1 = lineage(&h, Operation::Chat, &req1, Some(&resp1));
        assert!(idx.parent(&alice, &l1, None).is_none());
        idx.insert(&alice, &l1, Some("chatcmpl-1"), "r1");
        // The client sends the answer back as a list of text parts.
        let req2 = json!({"messages":[{"role":"system","content":"be brief"},{"role":"user","content":[{"type":"text","text":"hi"}]},{"role":"assistant","content":"Hello!"},{"role":"user","content":"and?"}]});
        let l2 = lineage(&h, Operation::Chat, &req2, None);
        assert_eq!(idx.parent(&alice, &l2, None), Some("r1"));
        // An edited history does not link.
        let req3 = json!({"messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"},{"role":"assistant","content":"Hello?"},{"role":"user","content":"and?"}]});
        assert!(idx
            .parent(&alice, &lineage(&h, Operation::Chat, &req3, None), None)
            .is_none());
        // Another key gives other hashes.
        let other = LineageHasher::new(b"other");
        assert_ne!(
            lineage(&other, Operation::Chat, &req1, None).prompt_hash(),
            l1.prompt_hash()
        );
        assert_eq!(
            idx.parent(&alice, &Lineage::default(), Some("chatcmpl-1")),
            Some("r1")
        );
        // Another caller with the same history is another conversation.
        let bob = caller_scope(Some("key_bob"), None);
        assert!(idx.parent(&bob, &l2, None).is_none());
        assert!(idx
            .parent(&bob, &Lineage::default(), Some("chatcmpl-1"))
            .is_none());
        let alice_other_user = caller_scope(Some("key_alice"), Some("carol"));
        assert!(idx.parent(&alice_other_user, &l2, None).is_none());
    }

    #[test]
    fn anthropic_blocks_and_strings_are_the_same_answer() {
        let h = LineageHasher::new(b"k");
        let resp = json!({"role":"assistant","content":[{"type":"thinking","thinking":"hmm"},{"type":"text","text":"Hi"},{"type":"tool_use","id":"t1","name":"f","input":{"a":1}}]});
        let back = json!({"role":"assistant","content":[{"type":"text","text":"Hi"},{"type":"tool_use","id":"t1","name":"f","input":{"a":1}}]});
        assert_eq!(
            completion_message(Operation::Messages, &resp),
            Some(message(&back))
        );
        let plain = json!({"role":"user","content":"Hi"});
        let parts = json!({"role":"user","content":[{"type":"text","text":"Hi"}]});
        assert_eq!(h.message(&message(&plain)), h.message(&message(&parts)));
    }

    #[test]
    fn a_responses_answer_of_only_tool_calls_has_a_completion() {
        let resp = json!({"output":[{"type":"function_call","name":"get_weather","arguments":"{\"city\":\"Paris\"}","call_id":"c1"}]});
        let c = completion_message(Operation::Responses, &resp).unwrap();
        assert!(c.windows(11).any(|w| w == b"get_weather"));
        // Tool inputs hash alike whatever their key order.
        assert_eq!(
            sorted_json(&json!({"b":1,"a":{"d":2,"c":3}})),
            r#"{"a":{"c":3,"d":2},"b":1}"#
        );
    }

    #[test]
    fn the_index_forgets_the_oldest() {
        let mut idx = ConversationIndex::new(2);
        for i in 0..3u8 {
            let l = Lineage {
                prefixes: vec![[i; 32]],
                completion: Some([9; 32]),
            };
            idx.insert(&caller_scope(None, None), &l, None, &format!("r{i}"));
        }
        assert_eq!(idx.turns.len(), 2);
    }
}
