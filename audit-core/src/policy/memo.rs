//! Rules are pure: CEL here has no clock and no randomness, so a rule given the same
//! inputs decides the same. Each thread remembers each rule's result per distinct
//! input, and a rule is run only for inputs it has not seen: the writer's cost per
//! record then hardly grows with the number of rules, since most records repeat
//! the model, the status, the team, and carry no listed term.
//!
//! A rule's input is the values of the variables it reads. A text is not an input
//! when the rule only asks `TEXT.containsAny(terms.NAME)` of it: then the input is
//! which lists the text holds a term of (one automaton pass, shared with the rule's
//! own). A rule that reads a text any other way is always run.
//!
//! Memory: per thread, at most [`MAX_ENTRIES`] results of keys at most [`MAX_KEY`]
//! bytes (about 2.5 MiB); the table is emptied when full.

use std::{cell::RefCell, collections::HashMap};

use super::{facts::Facts, terms::Terms};

/// Longest input remembered; a longer one (a long user name, many tools) is run.
pub const MAX_KEY: usize = 512;
/// Results remembered per thread before the table starts over.
pub const MAX_ENTRIES: usize = 4096;

/// One thing a rule's result depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Input {
    Route,
    Provider,
    Operation,
    Model,
    ServedModel,
    User,
    Team,
    KeyId,
    Session,
    Source,
    Status,
    Outcome,
    /// Which term lists the request text holds a term of.
    RequestTerms,
    RequestEntities,
    RequestTools,
    ResponseTerms,
    ResponseEntities,
    ResponseToolCalls,
    FinishReasons,
    UsageIn,
    UsageOut,
}

/// What one rule reads; `None` when it reads something too large to remember by
/// (a text other than through `containsAny(terms.NAME)`).
pub fn inputs(uses: &[super::Use]) -> Option<Vec<Input>> {
    let mut out = Vec::new();
    for u in uses {
        let field = u.field.as_deref();
        let found: &[Input] = match (u.var.as_str(), field) {
            ("terms", _) => &[],
            ("route", _) => &[Input::Route],
            ("provider", _) => &[Input::Provider],
            ("operation", _) => &[Input::Operation],
            ("model", _) => &[Input::Model],
            ("served_model", _) => &[Input::ServedModel],
            ("user", _) => &[Input::User],
            ("team", _) => &[Input::Team],
            ("key_id", _) => &[Input::KeyId],
            ("session", _) => &[Input::Session],
            ("source", _) => &[Input::Source],
            ("status", _) => &[Input::Status],
            ("outcome", _) => &[Input::Outcome],
            ("request", Some("text")) if u.scanned => &[Input::RequestTerms],
            ("request", Some("entities")) => &[Input::RequestEntities],
            ("request", Some("tools")) => &[Input::RequestTools],
            ("response", Some("text")) if u.scanned => &[Input::ResponseTerms],
            ("response", Some("entities")) => &[Input::ResponseEntities],
            ("response", Some("tool_calls")) => &[Input::ResponseToolCalls],
            ("response", Some("finish_reasons")) => &[Input::FinishReasons],
            ("usage", Some("input_tokens")) => &[Input::UsageIn],
            ("usage", Some("output_tokens")) => &[Input::UsageOut],
            ("usage", _) => &[Input::UsageIn, Input::UsageOut],
            _ => return None,
        };
        out.extend_from_slice(found);
    }
    out.sort_unstable();
    out.dedup();
    Some(out)
}

/// A rule's result: matched or not, or the error it failed with.
pub type Outcome = Result<bool, String>;

/// This thread's remembered results for one set.
pub struct Memo {
    /// The set whose results these are (a reload compiles a new one).
    set: u64,
    /// Bounded, so a flood of colliding keys costs at most a full table per lookup.
    results: HashMap<Box<[u8]>, Outcome, foldhash::quality::RandomState>,
    key: Vec<u8>,
}

thread_local! {
    static MEMO: RefCell<Memo> = RefCell::new(Memo {
        set: 0,
        results: HashMap::default(),
        key: Vec::with_capacity(MAX_KEY),
    });
}

/// Lends this thread's results for set `set` to one evaluation.
pub fn with<R>(set: u64, f: impl FnOnce(&mut Memo) -> R) -> R {
    MEMO.with(|m| {
        let m = &mut *m.borrow_mut();
        if m.set != set {
            m.set = set;
            m.results.clear();
        }
        f(m)
    })
}

impl Memo {
    /// The result of rule `rule` on `facts`: remembered, else `run` and remembered.
    /// (`run` must not evaluate rules itself: this thread's results are lent out.)
    pub fn recall(
        &mut self,
        rule: usize,
        inputs: Option<&[Input]>,
        facts: &Facts,
        terms: &Terms,
        run: impl FnOnce() -> Outcome,
    ) -> Outcome {
        let Some(inputs) = inputs else {
            return run();
        };
        self.key.clear();
        self.key.extend_from_slice(&(rule as u64).to_le_bytes());
        for i in inputs {
            write(&mut self.key, *i, facts, terms);
            if self.key.len() > MAX_KEY {
                // Too long to remember; and the buffer does not keep a huge input's size.
                if self.key.capacity() > 4 * MAX_KEY {
                    self.key = Vec::with_capacity(MAX_KEY);
                }
                return run();
            }
        }
        if let Some(known) = self.results.get(self.key.as_slice()) {
            return known.clone();
        }
        let outcome = run();
        if self.results.len() >= MAX_ENTRIES {
            self.results.clear();
        }
        self.results
            .insert(self.key.as_slice().into(), outcome.clone());
        outcome
    }
}

/// Appends one input's value to a key: every variable-length part is length-prefixed,
/// so that two different inputs never write the same bytes.
fn write(key: &mut Vec<u8>, input: Input, f: &Facts, terms: &Terms) {
    fn text(key: &mut Vec<u8>, s: &str) {
        key.extend_from_slice(&(s.len() as u64).to_le_bytes());
        key.extend_from_slice(s.as_bytes());
    }
    fn number(key: &mut Vec<u8>, n: i64) {
        key.extend_from_slice(&n.to_le_bytes());
    }
    fn texts<'a>(key: &mut Vec<u8>, items: impl ExactSizeIterator<Item = &'a str>) {
        key.extend_from_slice(&(items.len() as u64).to_le_bytes());
        items.for_each(|s| text(key, s));
    }
    fn counts(key: &mut Vec<u8>, m: &std::collections::BTreeMap<String, u64>) {
        key.extend_from_slice(&(m.len() as u64).to_le_bytes());
        for (k, v) in m {
            text(key, k);
            key.extend_from_slice(&v.to_le_bytes());
        }
    }
    fn scanned(key: &mut Vec<u8>, terms: &Terms, s: &str) {
        terms.scanned(s, |found| key.extend(found.iter().map(|b| u8::from(*b))));
    }
    key.push(input as u8);
    match input {
        Input::Route => text(key, &f.route),
        Input::Provider => text(key, &f.provider),
        Input::Operation => text(key, &f.operation),
        Input::Model => text(key, &f.model),
        Input::ServedModel => text(key, &f.served_model),
        Input::User => text(key, &f.user),
        Input::Team => text(key, &f.team),
        Input::KeyId => text(key, &f.key_id),
        Input::Session => text(key, &f.session),
        Input::Source => {
            key.extend_from_slice(&(f.source.len() as u64).to_le_bytes());
            for (k, v) in &f.source {
                text(key, k);
                text(key, v);
            }
        }
        Input::Status => number(key, f.status),
        Input::Outcome => text(key, &f.outcome),
        Input::RequestTerms => scanned(key, terms, &f.request.text),
        Input::RequestEntities => counts(key, &f.request.entities),
        Input::RequestTools => texts(key, f.request.tools.iter().map(String::as_str)),
        Input::ResponseTerms => scanned(key, terms, &f.response.text),
        Input::ResponseEntities => counts(key, &f.response.entities),
        Input::ResponseToolCalls => texts(key, f.response.tools.iter().map(String::as_str)),
        Input::FinishReasons => texts(key, f.finish_reasons.iter().map(String::as_str)),
        Input::UsageIn => number(key, f.input_tokens),
        Input::UsageOut => number(key, f.output_tokens),
    }
}
