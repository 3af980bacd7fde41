//! The redaction engine: finds PII and secrets in text and replaces them, in one pass
//! per detector family, before anything is written.
//!
//! Shape: cheap anchors first, validation in a small window around each hit.
//! - Literal anchors of 3+ bytes (secret prefixes, custom terms) in one Aho-Corasick
//!   automaton with `LeftmostFirst`, which keeps its SIMD (Teddy) prefilter; each hit is
//!   extended and checked by its rule ([`rules`]). Case-insensitive custom terms get a
//!   second automaton, built only if there are any.
//! - `@` found with memchr; the address around it is extended and checked.
//! - Digits found eight bytes at a time; each number is classified by its grouping and
//!   validated (Luhn, IBAN mod-97, SSN rules, NANP/E.164, IPv4 octets) ([`scan`], [`validate`]).
//!
//! Every detector anchors on ASCII and extends over ASCII, so spans never split a UTF-8
//! sequence. Overlapping spans keep the one that starts first (the longer on a tie).
//! JSON is redacted string by string, keys included, structure untouched; an integer
//! that is an entity (a card number sent as a number) becomes a string.

mod rules;
mod scan;
mod validate;

use std::{borrow::Cow, collections::BTreeMap, collections::HashSet};

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use custody_config::{Mode, Redaction, BUILTIN_ENTITIES};
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

use rules::{Check, Rule};
use scan::NumberEntities;

/// Index of an entity in the engine's name table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EntityId(u16);

/// A found entity: byte range and which entity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub start: usize,
    pub end: usize,
    pub entity: EntityId,
}

/// Entity name -> replacements made.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Counts(BTreeMap<String, u64>);

impl Counts {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, entity: &str, n: u64) {
        match self.0.get_mut(entity) {
            Some(c) => *c += n,
            None => {
                self.0.insert(entity.to_owned(), n);
            }
        }
    }

    pub fn get(&self, entity: &str) -> u64 {
        self.0.get(entity).copied().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn into_map(self) -> BTreeMap<String, u64> {
        self.0
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.0.iter().map(|(k, v)| (k.as_str(), *v))
    }
}

/// Rules that cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum RedactError {
    #[error("redaction rule `{rule}`: {reason}")]
    Rule { rule: String, reason: String },
    #[error("redaction mode `pseudonymize` is on but no pseudonym key was given")]
    NoPseudonymKey,
}

struct Automaton {
    ac: AhoCorasick,
    rules: Vec<(EntityId, Check)>,
}

/// The engine, built once and shared by the writer.
pub struct Redactor {
    names: Vec<String>,
    modes: Vec<Mode>,
    anchors: Option<Automaton>,
    anchors_ci: Option<Automaton>,
    email: Option<EntityId>,
    numbers: NumberEntities,
    allow: HashSet<String>,
    allow_ci: HashSet<String>,
    pseudonym_key: Option<Vec<u8>>,
    /// Custom rules exist (their terms and prefixes may match anything).
    custom: bool,
}

/// The shortest text a built-in prefix rule matches (`xoxb-` and ten characters).
const SHORTEST_TOKEN: usize = 15;

impl Redactor {
    /// Every built-in entity, masked.
    pub fn builtin() -> Self {
        match Self::new(&Redaction::default(), None) {
            Ok(r) => r,
            // The built-in rules are constants checked by the tests.
            Err(e) => panic!("built-in redaction rules: {e}"),
        }
    }

    /// The engine for a `[redaction]` section. `pseudonym_key` is needed when any
    /// entity's mode is `pseudonymize`.
    pub fn new(config: &Redaction, pseudonym_key: Option<Vec<u8>>) -> Result<Self, RedactError> {
        let mut names: Vec<String> = BUILTIN_ENTITIES.iter().map(|s| (*s).to_owned()).collect();
        names.extend(config.custom.iter().map(|c| c.name.clone()));
        let modes: Vec<Mode> = names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let custom_mode = i
                    .checked_sub(BUILTIN_ENTITIES.len())
                    .and_then(|c| config.custom[c].mode);
                config
                    .entities
                    .get(n)
                    .copied()
                    .or(custom_mode)
                    .unwrap_or(config.default_mode)
            })
            .collect();
        if modes.contains(&Mode::Pseudonymize) && pseudonym_key.is_none() {
            return Err(RedactError::NoPseudonymKey);
        }
        let id_of = |name: &str| -> Option<EntityId> {
            let i = names.iter().position(|n| n == name)?;
            (modes[i] != Mode::Off).then_some(EntityId(i as u16))
        };

        let mut literal: Vec<(String, EntityId, Check)> = Vec::new();
        for (prefix, Rule { entity, check }) in rules::builtin() {
            if let Some(id) = id_of(entity) {
                literal.push((prefix.to_owned(), id, check));
            }
        }
        let mut literal_ci = Vec::new();
        for c in &config.custom {
            let Some(id) = id_of(&c.name) else { continue };
            if let Some(p) = &c.prefix {
                let check = Check::Key {
                    alphabet: c.alphabet,
                    min: c.min_len,
                    max: c.max_len,
                    mixed: false,
                };
                literal.push((p.clone(), id, check));
            }
            for t in &c.terms {
                let target = if c.case_insensitive {
                    &mut literal_ci
                } else {
                    &mut literal
                };
                target.push((t.clone(), id, Check::Literal));
            }
        }
        // Longer patterns first, so that a prefix of another never shadows it.
        literal.sort_by_key(|(p, _, _)| std::cmp::Reverse(p.len()));
        literal_ci.sort_by_key(|(p, _, _)| std::cmp::Reverse(p.len()));
        let anchors = build(literal, false)?;
        let anchors_ci = build(literal_ci, true)?;
        Ok(Self {
            email: id_of("EMAIL_ADDRESS"),
            numbers: NumberEntities {
                card: id_of("CREDIT_CARD"),
                ssn: id_of("US_SSN"),
                phone: id_of("PHONE_NUMBER"),
                iban: id_of("IBAN_CODE"),
                ip: id_of("IP_ADDRESS"),
            },
            allow: config.allow.iter().cloned().collect(),
            allow_ci: config
                .allow
                .iter()
                .map(|a| a.to_ascii_lowercase())
                .collect(),
            anchors,
            anchors_ci,
            names,
            modes,
            pseudonym_key,
            custom: !config.custom.is_empty(),
        })
    }

    /// The name of an entity.
    pub fn name(&self, id: EntityId) -> &str {
        &self.names[id.0 as usize]
    }

    /// All entities in `s`, sorted and non-overlapping, allow-listed values removed.
    pub fn find(&self, s: &str) -> Vec<Span> {
        let b = s.as_bytes();
        // Most JSON keys and many values ("role", "user", "stop"): too short for any
        // built-in token, without the `@` or digit every other entity needs.
        if !self.custom
            && b.len() < SHORTEST_TOKEN
            && !b.iter().any(|&c| c == b'@' || c.is_ascii_digit())
        {
            return Vec::new();
        }
        let mut spans = Vec::new();
        for a in [&self.anchors, &self.anchors_ci].into_iter().flatten() {
            for m in a.ac.find_iter(b) {
                let (id, check) = &a.rules[m.pattern().as_usize()];
                if let Some((start, end)) = rules::check(b, m.start(), m.end(), check) {
                    spans.push(Span {
                        start,
                        end,
                        entity: *id,
                    });
                }
            }
        }
        if let Some(id) = self.email {
            scan::emails(b, id, &mut spans);
        }
        if self.numbers.any() {
            scan::numbers(b, &self.numbers, &mut spans);
        }
        if spans.is_empty() {
            return spans;
        }
        spans.sort_by_key(|s| (s.start, std::cmp::Reverse(s.end)));
        let mut kept: Vec<Span> = Vec::with_capacity(spans.len());
        for sp in spans {
            if kept.last().is_some_and(|last| sp.start < last.end) {
                continue;
            }
            let text = &s[sp.start..sp.end];
            if self.allow.contains(text)
                || (!self.allow_ci.is_empty() && self.allow_ci.contains(&text.to_ascii_lowercase()))
            {
                continue;
            }
            kept.push(sp);
        }
        kept
    }

    /// `s` with every entity replaced per its mode; borrowed when nothing was found.
    pub fn redact_str<'a>(&self, s: &'a str, counts: &mut Counts) -> Cow<'a, str> {
        self.rewrite(s, counts, |value, id, out| self.replace(value, id, out))
    }

    /// `s` with every entity replaced by `[ENTITY:8 hex]` keyed with `key`, whatever the
    /// entity's configured mode (an entity that is `off` stays): for identity fields,
    /// which must stay searchable and distinct without holding the value.
    pub fn pseudonymize_str<'a>(
        &self,
        s: &'a str,
        key: &[u8],
        counts: &mut Counts,
    ) -> Cow<'a, str> {
        self.rewrite(s, counts, |value, id, out| {
            let name = self.name(id);
            out.push('[');
            out.push_str(name);
            out.push(':');
            out.push_str(&keyed_pseudonym(key, name, value));
            out.push(']');
        })
    }

    /// `s` with each entity found written by `replace`, counted; borrowed when none.
    fn rewrite<'a>(
        &self,
        s: &'a str,
        counts: &mut Counts,
        replace: impl Fn(&str, EntityId, &mut String),
    ) -> Cow<'a, str> {
        let spans = self.find(s);
        if spans.is_empty() {
            return Cow::Borrowed(s);
        }
        let mut out = String::with_capacity(s.len());
        let mut at = 0;
        for sp in spans {
            out.push_str(&s[at..sp.start]);
            replace(&s[sp.start..sp.end], sp.entity, &mut out);
            counts.add(self.name(sp.entity), 1);
            at = sp.end;
        }
        out.push_str(&s[at..]);
        Cow::Owned(out)
    }

    fn replace(&self, value: &str, id: EntityId, out: &mut String) {
        let name = self.name(id);
        match self.modes[id.0 as usize] {
            Mode::Drop => {}
            Mode::Pseudonymize => {
                out.push('[');
                out.push_str(name);
                out.push(':');
                out.push_str(&self.pseudonym(name, value));
                out.push(']');
            }
            Mode::Mask | Mode::Off => {
                out.push('[');
                out.push_str(name);
                out.push(']');
            }
        }
    }

    /// First 8 hex digits of HMAC-SHA-256(key, entity || 0 || value).
    fn pseudonym(&self, entity: &str, value: &str) -> String {
        keyed_pseudonym(
            self.pseudonym_key.as_deref().unwrap_or_default(),
            entity,
            value,
        )
    }

    /// Redacts every string in a JSON document, object keys included, in place; a
    /// number that is an entity (a card number sent as a number) becomes a string.
    pub fn redact_json(&self, v: &mut Value, counts: &mut Counts) {
        match v {
            Value::String(s) => {
                if let Cow::Owned(r) = self.redact_str(s, counts) {
                    *s = r;
                }
            }
            Value::Number(n) if n.is_u64() || n.is_i64() => {
                let digits = n.to_string();
                if digits.len() >= MIN_ENTITY_DIGITS {
                    if let Cow::Owned(r) = self.redact_str(&digits, counts) {
                        *v = Value::String(r);
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|i| self.redact_json(i, counts)),
            Value::Object(map) => {
                map.values_mut().for_each(|i| self.redact_json(i, counts));
                if map.keys().any(|k| !self.find(k).is_empty()) {
                    let old = std::mem::take(map);
                    for (k, val) in old {
                        let k = self.redact_str(&k, counts).into_owned();
                        map.insert(k, val);
                    }
                }
            }
            _ => {}
        }
    }

    /// Redacts the string values of JSON text, leaving every other byte as it was
    /// (key order, spacing, numbers). `None` when `text` is not JSON. Any JSON value
    /// counts, a bare number too: JSON in must give JSON out.
    pub fn redact_json_text(&self, text: &str, counts: &mut Counts) -> Option<String> {
        serde_json::from_str::<serde::de::IgnoredAny>(text).ok()?;
        self.redact_valid_json_text(text, counts)
    }

    /// [`Self::redact_json_text`] for text already known to be valid JSON (skips the
    /// validating pass; `None` only if a string literal fails to decode). Keys are
    /// redacted like values; an integer that is an entity becomes a JSON string.
    pub fn redact_valid_json_text(&self, text: &str, counts: &mut Counts) -> Option<String> {
        let b = text.as_bytes();
        let mut out = String::new();
        let mut copied = 0;
        let mut i = 0;
        // In valid JSON a quote outside a string opens one; skip each string whole.
        loop {
            let q = memchr::memchr(b'"', &b[i..]);
            // Numbers live between strings: long digit runs there may be entities.
            let gap_end = q.map_or(b.len(), |q| i + q);
            self.redact_numbers(text, i, gap_end, &mut out, &mut copied, counts);
            let Some(q) = q else { break };
            let start = i + q;
            let mut j = start + 1;
            while j < b.len() && b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            let end = (j + 1).min(b.len());
            i = end;
            let literal = &text[start..end];
            let value: Cow<'_, str> = if literal.contains('\\') {
                Cow::Owned(serde_json::from_str::<String>(literal).ok()?)
            } else {
                Cow::Borrowed(&literal[1..literal.len() - 1])
            };
            if let Cow::Owned(red) = self.redact_str(&value, counts) {
                out.push_str(&text[copied..start]);
                out.push_str(&serde_json::to_string(&red).ok()?);
                copied = end;
            }
        }
        out.push_str(&text[copied..]);
        Some(out)
    }

    /// Replaces integers of `text[from..to]` (outside strings) that are entities by
    /// their redacted form, as JSON strings.
    fn redact_numbers(
        &self,
        text: &str,
        from: usize,
        to: usize,
        out: &mut String,
        copied: &mut usize,
        counts: &mut Counts,
    ) {
        let b = text.as_bytes();
        let mut k = from;
        while k < to {
            if !b[k].is_ascii_digit() {
                k += 1;
                continue;
            }
            let s = k;
            while k < to && b[k].is_ascii_digit() {
                k += 1;
            }
            let integer = (s == 0 || !matches!(b[s - 1], b'.' | b'e' | b'E' | b'+' | b'-'))
                && (k >= b.len() || !matches!(b[k], b'.' | b'e' | b'E'));
            if k - s < MIN_ENTITY_DIGITS || !integer {
                continue;
            }
            if let Cow::Owned(red) = self.redact_str(&text[s..k], counts) {
                out.push_str(&text[*copied..s]);
                out.push('"');
                out.push_str(&red);
                out.push('"');
                *copied = k;
            }
        }
    }

    /// One line of `custody redact`: JSON text string by string, anything else as text.
    pub fn redact_line<'a>(&self, line: &'a str, counts: &mut Counts) -> Cow<'a, str> {
        match self.redact_json_text(line, counts) {
            Some(s) => Cow::Owned(s),
            None => self.redact_str(line, counts),
        }
    }
}

/// First 8 hex digits of HMAC-SHA-256(key, entity || 0 || value).
fn keyed_pseudonym(key: &[u8], entity: &str, value: &str) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return String::from("00000000");
    };
    mac.update(entity.as_bytes());
    mac.update(&[0]);
    mac.update(value.as_bytes());
    hex::encode(&mac.finalize().into_bytes()[..4])
}

/// The shortest integer that can be an entity held as a JSON number (a 13-digit card).
const MIN_ENTITY_DIGITS: usize = 13;

fn build(
    mut patterns: Vec<(String, EntityId, Check)>,
    case_insensitive: bool,
) -> Result<Option<Automaton>, RedactError> {
    if patterns.is_empty() {
        return Ok(None);
    }
    let mut seen = HashSet::new();
    patterns.retain(|p| seen.insert(p.0.clone()));
    let ac = AhoCorasickBuilder::new()
        .match_kind(MatchKind::LeftmostFirst)
        .ascii_case_insensitive(case_insensitive)
        .build(patterns.iter().map(|p| p.0.as_bytes()))
        .map_err(|e| RedactError::Rule {
            rule: "anchors".into(),
            reason: e.to_string(),
        })?;
    Ok(Some(Automaton {
        ac,
        rules: patterns.into_iter().map(|(_, id, c)| (id, c)).collect(),
    }))
}

/// Replaces each literal (a client credential seen in the headers) wherever it appears
/// in a string value; no detector need know a credential's format.
pub fn scrub_literals(v: &mut Value, literals: &[String], entity: &str, counts: &mut Counts) {
    if literals.is_empty() {
        return;
    }
    // Searchers built once per body, not once per string value.
    let finders: Vec<memchr::memmem::Finder<'_>> = literals
        .iter()
        .map(|l| memchr::memmem::Finder::new(l.as_bytes()))
        .collect();
    scrub(v, literals, &finders, entity, counts);
}

fn scrub(
    v: &mut Value,
    literals: &[String],
    finders: &[memchr::memmem::Finder<'_>],
    entity: &str,
    counts: &mut Counts,
) {
    match v {
        Value::String(s) => {
            for (lit, finder) in literals.iter().zip(finders) {
                if finder.find(s.as_bytes()).is_none() {
                    continue;
                }
                let n = finder.find_iter(s.as_bytes()).count() as u64;
                *s = s.replace(lit.as_str(), &format!("[{entity}]"));
                counts.add(entity, n);
            }
        }
        Value::Array(items) => items
            .iter_mut()
            .for_each(|i| scrub(i, literals, finders, entity, counts)),
        Value::Object(map) => map
            .values_mut()
            .for_each(|i| scrub(i, literals, finders, entity, counts)),
        _ => {}
    }
}

#[cfg(test)]
mod tests;
