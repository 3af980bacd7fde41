//! `[policy_terms]`: named phrase lists compiled into one Aho-Corasick automaton, so
//! that `request.text.containsAny(terms.NAME)` costs one pass over the text however
//! long the lists, and however many rules ask.

use std::{collections::BTreeMap, fmt, sync::Arc};

use aho_corasick::AhoCorasick;
use cel::{
    common::{
        types::{CelBool, CelString, Type, LIST_TYPE, STRING_TYPE},
        value::{CowVal, Val},
    },
    objects::{Map, Opaque},
    DeclarationError, Env, ExecutionError, Value,
};

/// The CEL type name of a term list (`terms.NAME`).
pub const TERMS_TYPE: &str = "custody.terms";

/// Every term of every list in one automaton: the text a rule reads is scanned once
/// per evaluation however many lists and rules ask about it.
struct TermIndex {
    automaton: AhoCorasick,
    /// The list of each pattern.
    list_of: Vec<usize>,
    lists: usize,
}

impl TermIndex {
    /// Which lists have a term in `text`, into `found` (one flag per list): one
    /// overlapping pass (a term inside another list's term still counts).
    fn scan(&self, text: &str, found: &mut Vec<bool>) {
        found.clear();
        found.resize(self.lists, false);
        let mut left = self.lists;
        for m in self.automaton.find_overlapping_iter(text) {
            let list = self.list_of[m.pattern().as_usize()];
            if !found[list] {
                found[list] = true;
                left -= 1;
                if left == 0 {
                    break;
                }
            }
        }
    }
}

/// One list, as `terms.NAME` holds it. Compares and prints by name only: the terms
/// are not shown anywhere (an error message, a debug print) once compiled.
pub struct TermSet {
    name: String,
    list: usize,
    index: Arc<TermIndex>,
}

impl TermSet {
    pub fn is_match(&self, text: &str) -> bool {
        let mut found = Vec::new();
        self.index.scan(text, &mut found);
        found[self.list]
    }

    /// [`Self::is_match`] for text that stays put during one evaluation (a field of
    /// the exchange): scanned once for every list, the answer kept until
    /// [`begin_evaluation`].
    fn is_match_stable(&self, text: &str) -> bool {
        self.index.scanned(text, |found| found[self.list])
    }
}

impl TermIndex {
    /// [`Self::scan`], remembered for this evaluation by text address and length.
    fn scanned<R>(self: &Arc<Self>, text: &str, f: impl FnOnce(&[bool]) -> R) -> R {
        let key = (
            text.as_ptr() as usize,
            text.len(),
            Arc::as_ptr(self) as usize,
        );
        SCANS.with(|scans| {
            let scans = &mut *scans.borrow_mut();
            if let Some((_, found)) = scans.done().iter().find(|(k, _)| *k == key) {
                return f(found);
            }
            // The flags of an earlier evaluation are reused: no allocation per scan.
            if scans.used == scans.entries.len() {
                scans.entries.push((key, Vec::new()));
            }
            let (k, found) = &mut scans.entries[scans.used];
            *k = key;
            self.scan(text, found);
            scans.used += 1;
            f(found)
        })
    }
}

type ScanKey = (usize, usize, usize);

/// This thread's scans in the evaluation under way (the first `used` entries), by text
/// address, length and index: the texts are the facts', borrowed and unmoved until the
/// evaluation ends.
struct Scans {
    entries: Vec<(ScanKey, Vec<bool>)>,
    used: usize,
}

impl Scans {
    fn done(&self) -> &[(ScanKey, Vec<bool>)] {
        &self.entries[..self.used]
    }
}

thread_local! {
    static SCANS: std::cell::RefCell<Scans> = const {
        std::cell::RefCell::new(Scans { entries: Vec::new(), used: 0 })
    };
}

/// Forgets the scans of the previous evaluation on this thread: its texts are gone.
pub fn begin_evaluation() {
    SCANS.with(|s| s.borrow_mut().used = 0);
}

impl fmt::Debug for TermSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "terms.{}", self.name)
    }
}

impl PartialEq for TermSet {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl Eq for TermSet {}

impl Opaque for TermSet {
    fn runtime_type_name(&self) -> &str {
        TERMS_TYPE
    }
}

/// The `terms` variable: the set's term lists, built once, lent to every context;
/// each list also by its qualified name (`terms.NAME`).
pub struct Terms {
    all: Box<dyn Val>,
    lists: Vec<(String, Box<dyn Val>)>,
    index: Arc<TermIndex>,
}

impl Terms {
    /// `terms`: a map from list name to its list, all lists in one automaton (ASCII
    /// case-insensitive).
    pub fn compile(lists: &BTreeMap<String, Vec<String>>) -> Result<Self, (String, String)> {
        let (map, index) = compile(lists)?;
        let boxed =
            |v: Value| Box::<dyn Val>::try_from(v).map_err(|e| ("*".to_owned(), e.to_string()));
        let mut named = Vec::new();
        for (k, v) in map.map.iter() {
            if let cel::objects::Key::String(name) = k {
                named.push((name.to_string(), boxed(v.clone())?));
            }
        }
        Ok(Self {
            all: boxed(Value::Map(map))?,
            lists: named,
            index,
        })
    }

    pub(super) fn all(&self) -> CowVal<'_, '_> {
        CowVal::Borrowed(&*self.all)
    }

    pub(super) fn list(&self, name: &str) -> Option<CowVal<'_, '_>> {
        self.lists
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| CowVal::Borrowed(&**v))
    }

    /// Which lists have a term in `text` (a field of the facts, unmoved until the
    /// evaluation ends), one flag per list, passed to `f`: the scan `containsAny`
    /// makes, made once per text and evaluation.
    pub(super) fn scanned<R>(&self, text: &str, f: impl FnOnce(&[bool]) -> R) -> R {
        self.index.scanned(text, f)
    }
}

impl fmt::Debug for Terms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Terms")
    }
}

fn compile(
    lists: &BTreeMap<String, Vec<String>>,
) -> Result<(Map, Arc<TermIndex>), (String, String)> {
    let mut patterns = Vec::new();
    let mut list_of = Vec::new();
    for (i, terms) in lists.values().enumerate() {
        for t in terms {
            patterns.push(t.as_str());
            list_of.push(i);
        }
    }
    let automaton = AhoCorasick::builder()
        .ascii_case_insensitive(true)
        .build(&patterns)
        .map_err(|e| ("*".to_owned(), e.to_string()))?;
    let index = Arc::new(TermIndex {
        automaton,
        list_of,
        lists: lists.len(),
    });
    let mut map = std::collections::HashMap::new();
    for (list, name) in lists.keys().enumerate() {
        let set = TermSet {
            name: name.clone(),
            list,
            index: index.clone(),
        };
        let opaque: Arc<dyn Opaque> = Arc::new(set);
        map.insert(
            cel::objects::Key::from(name.as_str()),
            Value::Opaque(opaque),
        );
    }
    Ok((Map { map: Arc::new(map) }, index))
}

/// Declares `containsAny` on `env`: `string.containsAny(terms.NAME)`,
/// `list.containsAny(terms.NAME)` (any element matches), and
/// `string.containsAny(['a', 'b'])` for a short list written in the rule.
pub fn declare(env: &mut Env) -> Result<(), DeclarationError> {
    let terms = || Type::new_opaque_type(TERMS_TYPE);
    env.add_member_overload(
        "containsAny",
        "string.containsAny(terms)",
        STRING_TYPE,
        vec![terms()],
        contains_any,
    )?;
    env.add_member_overload(
        "containsAny",
        "list.containsAny(terms)",
        LIST_TYPE,
        vec![terms()],
        contains_any,
    )?;
    env.add_member_overload(
        "containsAny",
        "string.containsAny(list)",
        STRING_TYPE,
        vec![LIST_TYPE],
        contains_any,
    )
}

fn contains_any<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    let [this, needles] = args.as_slice() else {
        return Err(ExecutionError::invalid_argument_count(2, args.len()));
    };
    let found = match Value::try_from(needles.as_ref())? {
        Value::Opaque(o) => {
            let set = o.downcast_ref::<TermSet>().ok_or_else(not_terms)?;
            match this.as_ref().downcast_ref::<CelString>() {
                Some(s) => match s.as_borrowed() {
                    Some(stable) => set.is_match_stable(stable),
                    None => set.is_match(s.inner()),
                },
                None => match Value::try_from(this.as_ref())? {
                    Value::List(items) => items.iter().any(|i| match i {
                        Value::String(s) => set.is_match(s),
                        _ => false,
                    }),
                    _ => return Err(not_terms()),
                },
            }
        }
        Value::List(items) => {
            let s = this
                .as_ref()
                .downcast_ref::<CelString>()
                .ok_or_else(not_terms)?;
            let haystack = s.inner().to_lowercase();
            items.iter().any(|i| match i {
                Value::String(n) => !n.is_empty() && haystack.contains(&n.to_lowercase()),
                _ => false,
            })
        }
        _ => return Err(not_terms()),
    };
    Ok(CowVal::owned(CelBool::from(found)))
}

fn not_terms() -> ExecutionError {
    ExecutionError::function_error(
        "containsAny",
        "takes a string or list of strings, and terms.NAME or a list of strings",
    )
}
