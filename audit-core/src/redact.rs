//! Finding and replacing PII and secrets in captured bodies (first version; the full
//! engine with configuration is its own piece of work).
//!
//! Shape: cheap anchors first, validation in a small window around each hit.
//! - Secret prefixes (3+ bytes) in one Aho-Corasick automaton, `LeftmostFirst` so its
//!   SIMD prefilter stays on; each hit is extended over the key's alphabet and checked
//!   for length.
//! - `@` found with memchr, then the e-mail address around it is extended and checked.
//! - Digit runs found by a byte scan, then checked: Luhn and issuer digit for cards,
//!   area/group/serial rules for US SSNs.
//!
//! Every detector anchors on ASCII and extends over ASCII, so spans never split a
//! UTF-8 sequence. Overlapping spans keep the one that starts first.

use std::{borrow::Cow, collections::BTreeMap};

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use serde_json::Value;

/// Entity name -> how many were replaced.
pub type Counts = BTreeMap<&'static str, u64>;

/// A found entity: byte range and name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub start: usize,
    pub end: usize,
    pub entity: &'static str,
}

#[derive(Clone, Copy)]
enum Alphabet {
    /// `[A-Za-z0-9]`
    Alnum,
    /// `[A-Za-z0-9_-]`
    Token,
    /// `[A-Z0-9]`
    Upper,
}

impl Alphabet {
    fn accepts(self, b: u8) -> bool {
        match self {
            Alphabet::Alnum => b.is_ascii_alphanumeric(),
            Alphabet::Token => b.is_ascii_alphanumeric() || b == b'_' || b == b'-',
            Alphabet::Upper => b.is_ascii_uppercase() || b.is_ascii_digit(),
        }
    }
}

enum Rule {
    /// A key: prefix, then `min..=max` characters of `alphabet`.
    Key {
        entity: &'static str,
        alphabet: Alphabet,
        min: usize,
        max: usize,
    },
    /// `-----BEGIN ... PRIVATE KEY-----` through its END line.
    PrivateKey,
    /// `eyJ...` header.payload.signature
    Jwt,
}

/// Anchors in priority order: a longer prefix must come before any prefix of it.
const RULES: &[(&str, Rule)] = &[
    (
        "sk-ant-",
        Rule::Key {
            entity: "ANTHROPIC_API_KEY",
            alphabet: Alphabet::Token,
            min: 20,
            max: 200,
        },
    ),
    (
        "sk-proj-",
        Rule::Key {
            entity: "OPENAI_API_KEY",
            alphabet: Alphabet::Token,
            min: 20,
            max: 300,
        },
    ),
    (
        "sk-svcacct-",
        Rule::Key {
            entity: "OPENAI_API_KEY",
            alphabet: Alphabet::Token,
            min: 20,
            max: 300,
        },
    ),
    (
        "sk-admin-",
        Rule::Key {
            entity: "OPENAI_API_KEY",
            alphabet: Alphabet::Token,
            min: 20,
            max: 300,
        },
    ),
    (
        "sk-",
        Rule::Key {
            entity: "OPENAI_API_KEY",
            alphabet: Alphabet::Token,
            min: 20,
            max: 300,
        },
    ),
    (
        "AKIA",
        Rule::Key {
            entity: "AWS_ACCESS_KEY",
            alphabet: Alphabet::Upper,
            min: 16,
            max: 16,
        },
    ),
    (
        "ASIA",
        Rule::Key {
            entity: "AWS_ACCESS_KEY",
            alphabet: Alphabet::Upper,
            min: 16,
            max: 16,
        },
    ),
    (
        "ghp_",
        Rule::Key {
            entity: "GITHUB_TOKEN",
            alphabet: Alphabet::Alnum,
            min: 36,
            max: 36,
        },
    ),
    (
        "gho_",
        Rule::Key {
            entity: "GITHUB_TOKEN",
            alphabet: Alphabet::Alnum,
            min: 36,
            max: 36,
        },
    ),
    (
        "ghu_",
        Rule::Key {
            entity: "GITHUB_TOKEN",
            alphabet: Alphabet::Alnum,
            min: 36,
            max: 36,
        },
    ),
    (
        "ghs_",
        Rule::Key {
            entity: "GITHUB_TOKEN",
            alphabet: Alphabet::Alnum,
            min: 36,
            max: 36,
        },
    ),
    (
        "ghr_",
        Rule::Key {
            entity: "GITHUB_TOKEN",
            alphabet: Alphabet::Alnum,
            min: 36,
            max: 36,
        },
    ),
    (
        "github_pat_",
        Rule::Key {
            entity: "GITHUB_TOKEN",
            alphabet: Alphabet::Token,
            min: 22,
            max: 255,
        },
    ),
    (
        "xoxb-",
        Rule::Key {
            entity: "SLACK_TOKEN",
            alphabet: Alphabet::Token,
            min: 10,
            max: 255,
        },
    ),
    (
        "xoxp-",
        Rule::Key {
            entity: "SLACK_TOKEN",
            alphabet: Alphabet::Token,
            min: 10,
            max: 255,
        },
    ),
    (
        "xoxa-",
        Rule::Key {
            entity: "SLACK_TOKEN",
            alphabet: Alphabet::Token,
            min: 10,
            max: 255,
        },
    ),
    (
        "sk_live_",
        Rule::Key {
            entity: "STRIPE_KEY",
            alphabet: Alphabet::Alnum,
            min: 16,
            max: 255,
        },
    ),
    (
        "rk_live_",
        Rule::Key {
            entity: "STRIPE_KEY",
            alphabet: Alphabet::Alnum,
            min: 16,
            max: 255,
        },
    ),
    (
        "sk_test_",
        Rule::Key {
            entity: "STRIPE_KEY",
            alphabet: Alphabet::Alnum,
            min: 16,
            max: 255,
        },
    ),
    (
        "AIza",
        Rule::Key {
            entity: "GOOGLE_API_KEY",
            alphabet: Alphabet::Token,
            min: 35,
            max: 35,
        },
    ),
    (
        "hf_",
        Rule::Key {
            entity: "HUGGINGFACE_TOKEN",
            alphabet: Alphabet::Alnum,
            min: 30,
            max: 60,
        },
    ),
    (
        "glpat-",
        Rule::Key {
            entity: "GITLAB_TOKEN",
            alphabet: Alphabet::Token,
            min: 20,
            max: 60,
        },
    ),
    ("-----BEGIN", Rule::PrivateKey),
    ("eyJ", Rule::Jwt),
];

/// The detectors, built once and shared by the writer.
pub struct Redactor {
    anchors: AhoCorasick,
}

impl Redactor {
    pub fn new() -> Self {
        let anchors = AhoCorasickBuilder::new()
            .match_kind(MatchKind::LeftmostFirst)
            .build(RULES.iter().map(|(p, _)| p))
            // The patterns are constants; failure here is a bug caught by the tests.
            .unwrap_or_else(|e| panic!("redaction anchors: {e}"));
        Self { anchors }
    }

    /// All entities in `s`, sorted, non-overlapping.
    pub fn find(&self, s: &str) -> Vec<Span> {
        let b = s.as_bytes();
        let mut spans = Vec::new();
        for m in self.anchors.find_iter(b) {
            let (_, rule) = &RULES[m.pattern().as_usize()];
            if let Some(span) = check_anchor(b, m.start(), m.end(), rule) {
                spans.push(span);
            }
        }
        for at in memchr::memchr_iter(b'@', b) {
            if let Some(span) = check_email(b, at) {
                spans.push(span);
            }
        }
        scan_digits(b, &mut spans);
        if spans.is_empty() {
            return spans;
        }
        spans.sort_by_key(|s| (s.start, std::cmp::Reverse(s.end)));
        let mut kept: Vec<Span> = Vec::with_capacity(spans.len());
        for s in spans {
            match kept.last() {
                Some(last) if s.start < last.end => {}
                _ => kept.push(s),
            }
        }
        kept
    }

    /// `s` with every entity replaced by `[ENTITY]`; borrowed when nothing was found.
    pub fn redact_str<'a>(&self, s: &'a str, counts: &mut Counts) -> Cow<'a, str> {
        let spans = self.find(s);
        if spans.is_empty() {
            return Cow::Borrowed(s);
        }
        let mut out = String::with_capacity(s.len());
        let mut at = 0;
        for span in spans {
            out.push_str(&s[at..span.start]);
            out.push('[');
            out.push_str(span.entity);
            out.push(']');
            *counts.entry(span.entity).or_default() += 1;
            at = span.end;
        }
        out.push_str(&s[at..]);
        Cow::Owned(out)
    }

    /// Redacts every string value (not keys) in a JSON document, in place.
    pub fn redact_json(&self, v: &mut Value, counts: &mut Counts) {
        match v {
            Value::String(s) => {
                if let Cow::Owned(r) = self.redact_str(s, counts) {
                    *s = r;
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|i| self.redact_json(i, counts)),
            Value::Object(map) => map.values_mut().for_each(|i| self.redact_json(i, counts)),
            _ => {}
        }
    }
}

impl Default for Redactor {
    fn default() -> Self {
        Self::new()
    }
}

/// Replaces each literal (a client credential seen in the headers) wherever it appears
/// in a string value; used in addition to the detectors, since a credential need not
/// look like any known key format.
pub fn scrub_literals(
    v: &mut Value,
    literals: &[String],
    entity: &'static str,
    counts: &mut Counts,
) {
    if literals.is_empty() {
        return;
    }
    match v {
        Value::String(s) => {
            for lit in literals {
                if s.contains(lit.as_str()) {
                    let n = s.matches(lit.as_str()).count() as u64;
                    *s = s.replace(lit.as_str(), &format!("[{entity}]"));
                    *counts.entry(entity).or_default() += n;
                }
            }
        }
        Value::Array(items) => items
            .iter_mut()
            .for_each(|i| scrub_literals(i, literals, entity, counts)),
        Value::Object(map) => map
            .values_mut()
            .for_each(|i| scrub_literals(i, literals, entity, counts)),
        _ => {}
    }
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

fn check_anchor(b: &[u8], start: usize, prefix_end: usize, rule: &Rule) -> Option<Span> {
    if start > 0 && is_word(b[start - 1]) && !matches!(rule, Rule::PrivateKey) {
        return None;
    }
    match *rule {
        Rule::Key {
            entity,
            alphabet,
            min,
            max,
        } => {
            let mut end = prefix_end;
            while end < b.len() && alphabet.accepts(b[end]) {
                end += 1;
            }
            let n = end - prefix_end;
            (n >= min && n <= max).then_some(Span { start, end, entity })
        }
        Rule::PrivateKey => {
            let head_end = find(b, prefix_end, b"-----", 80)?;
            let head = &b[prefix_end..head_end];
            if !head.ends_with(b"PRIVATE KEY") {
                return None;
            }
            // Through the END line if there is one, else to the end: never keep a partial key.
            let end = match find(b, head_end + 5, b"-----END", usize::MAX) {
                Some(e) => find(b, e + 8, b"-----", 80).map_or(b.len(), |t| t + 5),
                None => b.len(),
            };
            Some(Span {
                start,
                end,
                entity: "PRIVATE_KEY",
            })
        }
        Rule::Jwt => {
            let mut end = start;
            let mut dots = [0usize; 2];
            let mut n = 0;
            while end < b.len() {
                let c = b[end];
                if c == b'.' && n < 2 {
                    dots[n] = end;
                    n += 1;
                } else if !(c.is_ascii_alphanumeric() || c == b'_' || c == b'-') {
                    break;
                }
                end += 1;
            }
            if n < 2 {
                return None;
            }
            let (h, p, s) = (dots[0] - start, dots[1] - dots[0] - 1, end - dots[1] - 1);
            (h >= 10 && p >= 10 && s >= 10).then_some(Span {
                start,
                end,
                entity: "JWT",
            })
        }
    }
}

fn find(b: &[u8], from: usize, needle: &[u8], within: usize) -> Option<usize> {
    let hay = b.get(from..)?;
    let hay = &hay[..hay.len().min(within)];
    memchr::memmem::find(hay, needle).map(|i| from + i)
}

fn check_email(b: &[u8], at: usize) -> Option<Span> {
    let local_char = |c: u8| c.is_ascii_alphanumeric() || b"._%+-".contains(&c);
    let domain_char = |c: u8| c.is_ascii_alphanumeric() || c == b'.' || c == b'-';
    let mut start = at;
    while start > 0 && local_char(b[start - 1]) && at - start < 64 {
        start -= 1;
    }
    while start < at && b[start] == b'.' {
        start += 1;
    }
    if start == at || b[at - 1] == b'.' {
        return None;
    }
    let mut end = at + 1;
    while end < b.len() && domain_char(b[end]) && end - at < 255 {
        end += 1;
    }
    while end > at + 1 && matches!(b[end - 1], b'.' | b'-') {
        end -= 1;
    }
    let domain = &b[at + 1..end];
    let mut labels = domain.split(|&c| c == b'.');
    let mut count = 0;
    let mut last: &[u8] = &[];
    for l in labels.by_ref() {
        if l.is_empty() || l.starts_with(b"-") {
            return None;
        }
        count += 1;
        last = l;
    }
    let tld_ok = last.len() >= 2 && last.iter().all(|c| c.is_ascii_alphabetic());
    (count >= 2 && tld_ok).then_some(Span {
        start,
        end,
        entity: "EMAIL_ADDRESS",
    })
}

/// Finds digit runs (digits with single ` ` or `-` between them) and validates them.
fn scan_digits(b: &[u8], spans: &mut Vec<Span>) {
    let mut i = 0;
    while i < b.len() {
        if !b[i].is_ascii_digit()
            || (i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'.'))
        {
            i += 1;
            continue;
        }
        let start = i;
        let mut digits = [0u8; 19];
        let mut n = 0;
        let mut groups = [0u8; 8];
        let mut g = 0;
        let mut sep = None;
        let mut end = i;
        let mut overflow = false;
        while end < b.len() {
            let c = b[end];
            if c.is_ascii_digit() {
                if n == digits.len() {
                    overflow = true;
                    break;
                }
                digits[n] = c - b'0';
                n += 1;
                if g < groups.len() {
                    groups[g] += 1;
                }
                end += 1;
            } else if (c == b' ' || c == b'-')
                && end + 1 < b.len()
                && b[end + 1].is_ascii_digit()
                && sep.is_none_or(|s| s == c)
            {
                sep = Some(c);
                g += 1;
                end += 1;
            } else {
                break;
            }
        }
        // Skip the rest of an over-long number as a whole.
        if overflow {
            while end < b.len() && (b[end].is_ascii_digit() || b[end] == b' ' || b[end] == b'-') {
                end += 1;
            }
            i = end;
            continue;
        }
        let followed_ok = end >= b.len()
            || !(b[end].is_ascii_alphanumeric()
                || b[end] == b'.' && b.get(end + 1).is_some_and(u8::is_ascii_digit));
        if followed_ok {
            let d = &digits[..n];
            let groups = &groups[..=g.min(7)];
            if (13..=19).contains(&n) && matches!(d[0], 2..=6) && luhn(d) {
                spans.push(Span {
                    start,
                    end,
                    entity: "CREDIT_CARD",
                });
            } else if n == 9 && sep == Some(b'-') && groups == [3, 2, 4] && ssn_ok(d) {
                spans.push(Span {
                    start,
                    end,
                    entity: "US_SSN",
                });
            }
        }
        i = end.max(i + 1);
    }
}

fn luhn(d: &[u8]) -> bool {
    let sum: u32 = d
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &x)| {
            let x = u32::from(x);
            if i % 2 == 1 {
                let y = x * 2;
                if y > 9 {
                    y - 9
                } else {
                    y
                }
            } else {
                x
            }
        })
        .sum();
    sum % 10 == 0
}

fn ssn_ok(d: &[u8]) -> bool {
    let area = u32::from(d[0]) * 100 + u32::from(d[1]) * 10 + u32::from(d[2]);
    let group = d[3] * 10 + d[4];
    let serial = d[5..].iter().any(|&x| x != 0);
    area != 0 && area != 666 && area < 900 && group != 0 && serial
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redact(s: &str) -> String {
        Redactor::new()
            .redact_str(s, &mut Counts::new())
            .into_owned()
    }

    #[test]
    fn finds_each_entity() {
        assert_eq!(
            redact("mail jane.doe+x@example.co.uk now"),
            "mail [EMAIL_ADDRESS] now"
        );
        assert_eq!(redact("card 4111 1111 1111 1111."), "card [CREDIT_CARD].");
        assert_eq!(redact("card 5555-5555-5555-4444"), "card [CREDIT_CARD]");
        assert_eq!(redact("ssn 123-45-6789"), "ssn [US_SSN]");
        assert_eq!(
            redact("k=sk-proj-abcdefghijklmnopqrstuvwxyz012345"),
            "k=[OPENAI_API_KEY]"
        );
        assert_eq!(
            redact("sk-ant-api03-abcdefghijklmnopqrstuvwxyz"),
            "[ANTHROPIC_API_KEY]"
        );
        assert_eq!(redact("AKIAIOSFODNN7EXAMPLE"), "[AWS_ACCESS_KEY]");
        assert_eq!(
            redact("ghp_abcdefghijklmnopqrstuvwxyz0123456789"),
            "[GITHUB_TOKEN]"
        );
        assert_eq!(
            redact("t eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U x"),
            "t [JWT] x"
        );
        assert_eq!(
            redact(
                "a\n-----BEGIN RSA PRIVATE KEY-----\nMIIE\nabc\n-----END RSA PRIVATE KEY-----\nb"
            ),
            "a\n[PRIVATE_KEY]\nb"
        );
    }

    #[test]
    fn leaves_lookalikes_alone() {
        for s in [
            "risk-free and task-based work",
            "order 1234567812345678 shipped",
            "4111 1111 1111 1112",
            "uuid 123e4567-e89b-12d3-a456-426614174000",
            "date 2026-11-29, version 1.2.3, price $1,299.99",
            "sha 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
            "ssn-like 000-12-3456 and 666-12-3456",
            "user@localhost and @handle and a@b",
            "sk-short",
        ] {
            assert_eq!(redact(s), s);
        }
    }

    #[test]
    fn json_strings_only_and_counted() {
        let r = Redactor::new();
        let mut v: Value = serde_json::from_str(
            r#"{"a@b.com":"write to bob@example.com or bob@example.com","n":4111111111111111}"#,
        )
        .unwrap();
        let mut counts = Counts::new();
        r.redact_json(&mut v, &mut counts);
        assert_eq!(v["a@b.com"], "write to [EMAIL_ADDRESS] or [EMAIL_ADDRESS]");
        assert_eq!(v["n"], 4111111111111111u64);
        assert_eq!(counts["EMAIL_ADDRESS"], 2);
    }

    #[test]
    fn never_splits_utf8() {
        let s = "é4111111111111111é — ü@ü.de bob@exämple.com";
        let out = redact(s);
        assert!(out.contains("[CREDIT_CARD]"), "{out}");
    }
}
