//! The anchored rules: literal prefixes found by the automaton, then extended and checked.

use custody_config::Alphabet;

use super::validate::is_b64url;

/// What to do after an anchor matched.
#[derive(Debug, Clone)]
pub(crate) enum Check {
    /// A key: the anchor, then `min..=max` characters of `alphabet`. With `mixed`, the
    /// body must hold both a digit and a letter (keeps `sk-learn-pipeline` out).
    Key {
        alphabet: Alphabet,
        min: usize,
        max: usize,
        mixed: bool,
    },
    /// `-----BEGIN ... PRIVATE KEY-----` through its END line.
    PrivateKey,
    /// `eyJ...` header.payload.signature, base64url.
    Jwt,
    /// `SG.` 22 `.` 43
    SendGrid,
    /// A key name (`aws_secret_access_key`), then `=`/`:`/quotes, then 40 base64 chars:
    /// the value alone is the span.
    AssignedValue { len: usize },
    /// The anchor itself is the entity (custom terms).
    Literal,
}

/// An anchor and what it means.
#[derive(Debug, Clone)]
pub(crate) struct Rule {
    pub entity: &'static str,
    pub check: Check,
}

const fn key(entity: &'static str, alphabet: Alphabet, min: usize, max: usize) -> Rule {
    Rule {
        entity,
        check: Check::Key {
            alphabet,
            min,
            max,
            mixed: false,
        },
    }
}

const fn openai(prefix_is_generic: bool) -> Rule {
    Rule {
        entity: "OPENAI_API_KEY",
        check: Check::Key {
            alphabet: Alphabet::Token,
            min: 20,
            max: 300,
            mixed: prefix_is_generic,
        },
    }
}

/// Built-in anchors, in priority order: a longer prefix before any prefix of it.
/// Formats and lengths follow the issuers' documentation and gitleaks' rule list.
pub(crate) fn builtin() -> Vec<(&'static str, Rule)> {
    use Alphabet::*;
    vec![
        ("sk-ant-", key("ANTHROPIC_API_KEY", Token, 20, 200)),
        ("sk-proj-", openai(false)),
        ("sk-svcacct-", openai(false)),
        ("sk-admin-", openai(false)),
        ("sk-", openai(true)),
        ("AKIA", key("AWS_ACCESS_KEY", Upper, 16, 16)),
        ("ASIA", key("AWS_ACCESS_KEY", Upper, 16, 16)),
        ("AIDA", key("AWS_ACCESS_KEY", Upper, 16, 16)),
        ("AROA", key("AWS_ACCESS_KEY", Upper, 16, 16)),
        ("AGPA", key("AWS_ACCESS_KEY", Upper, 16, 16)),
        (
            "aws_secret_access_key",
            Rule {
                entity: "AWS_SECRET_KEY",
                check: Check::AssignedValue { len: 40 },
            },
        ),
        (
            "AWS_SECRET_ACCESS_KEY",
            Rule {
                entity: "AWS_SECRET_KEY",
                check: Check::AssignedValue { len: 40 },
            },
        ),
        (
            "SecretAccessKey",
            Rule {
                entity: "AWS_SECRET_KEY",
                check: Check::AssignedValue { len: 40 },
            },
        ),
        ("ghp_", key("GITHUB_TOKEN", Alnum, 36, 36)),
        ("gho_", key("GITHUB_TOKEN", Alnum, 36, 36)),
        ("ghu_", key("GITHUB_TOKEN", Alnum, 36, 36)),
        ("ghs_", key("GITHUB_TOKEN", Alnum, 36, 36)),
        ("ghr_", key("GITHUB_TOKEN", Alnum, 36, 36)),
        ("github_pat_", key("GITHUB_TOKEN", Token, 22, 255)),
        ("glpat-", key("GITLAB_TOKEN", Token, 20, 64)),
        ("xoxb-", key("SLACK_TOKEN", Token, 10, 255)),
        ("xoxp-", key("SLACK_TOKEN", Token, 10, 255)),
        ("xoxa-", key("SLACK_TOKEN", Token, 10, 255)),
        ("xoxr-", key("SLACK_TOKEN", Token, 10, 255)),
        ("xoxe-", key("SLACK_TOKEN", Token, 10, 255)),
        ("xapp-", key("SLACK_TOKEN", Token, 10, 255)),
        ("sk_live_", key("STRIPE_KEY", Alnum, 16, 255)),
        ("rk_live_", key("STRIPE_KEY", Alnum, 16, 255)),
        ("sk_test_", key("STRIPE_KEY", Alnum, 16, 255)),
        ("rk_test_", key("STRIPE_KEY", Alnum, 16, 255)),
        ("whsec_", key("STRIPE_KEY", Alnum, 24, 64)),
        ("AIza", key("GOOGLE_API_KEY", Token, 35, 35)),
        ("hf_", key("HUGGINGFACE_TOKEN", Alnum, 30, 40)),
        ("npm_", key("NPM_TOKEN", Alnum, 36, 36)),
        (
            "SG.",
            Rule {
                entity: "SENDGRID_API_KEY",
                check: Check::SendGrid,
            },
        ),
        (
            "-----BEGIN",
            Rule {
                entity: "PRIVATE_KEY",
                check: Check::PrivateKey,
            },
        ),
        (
            "eyJ",
            Rule {
                entity: "JWT",
                check: Check::Jwt,
            },
        ),
    ]
}

fn accepts(alphabet: Alphabet, b: u8) -> bool {
    match alphabet {
        Alphabet::Alnum => b.is_ascii_alphanumeric(),
        Alphabet::Token => b.is_ascii_alphanumeric() || b == b'_' || b == b'-',
        Alphabet::Hex => b.is_ascii_hexdigit(),
        Alphabet::Base64 => b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=',
        Alphabet::Upper => b.is_ascii_uppercase() || b.is_ascii_digit(),
    }
}

pub(crate) fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Whether `b[start..]` begins a word: nothing word-like right before it.
fn starts_word(b: &[u8], start: usize) -> bool {
    start == 0 || !is_word(b[start - 1])
}

/// The end of the span for an anchor match `[start, anchor_end)`, if the rule holds.
pub(crate) fn check(
    b: &[u8],
    start: usize,
    anchor_end: usize,
    check: &Check,
) -> Option<(usize, usize)> {
    match *check {
        Check::Key {
            alphabet,
            min,
            max,
            mixed,
        } => {
            if !starts_word(b, start) {
                return None;
            }
            let mut end = anchor_end;
            while end < b.len() && end - anchor_end <= max && accepts(alphabet, b[end]) {
                end += 1;
            }
            let body = &b[anchor_end..end];
            if body.len() < min || body.len() > max {
                return None;
            }
            if mixed
                && !(body.iter().any(u8::is_ascii_digit)
                    && body.iter().any(u8::is_ascii_alphabetic))
            {
                return None;
            }
            // `sk-...-` followed by more prose is a hyphenated phrase, not a key.
            if mixed && body.windows(2).any(|w| w == b"--") {
                return None;
            }
            Some((start, end))
        }
        Check::Literal => {
            let first_word = b.get(start).is_some_and(|&c| is_word(c));
            let last_word = anchor_end > 0 && is_word(b[anchor_end - 1]);
            let before_ok = !first_word || starts_word(b, start);
            let after_ok = !last_word || anchor_end >= b.len() || !is_word(b[anchor_end]);
            (before_ok && after_ok).then_some((start, anchor_end))
        }
        Check::PrivateKey => {
            let head_end = find(b, anchor_end, b"-----", 80)?;
            if !b[anchor_end..head_end].ends_with(b"PRIVATE KEY") {
                return None;
            }
            // Through the END line if there is one, else to the end: never keep part of a key.
            let end = match find(b, head_end + 5, b"-----END", 64 * 1024) {
                Some(e) => find(b, e + 8, b"-----", 80).map_or(b.len(), |t| t + 5),
                None => b.len(),
            };
            Some((start, end))
        }
        Check::Jwt => {
            if !starts_word(b, start) {
                return None;
            }
            let mut parts = [0usize; 3];
            let mut n = 0;
            let mut end = start;
            while end < b.len() {
                let c = b[end];
                if c == b'.' && n < 2 && end + 1 < b.len() && is_b64url(b[end + 1]) {
                    n += 1;
                } else if is_b64url(c) {
                    parts[n] += 1;
                } else {
                    break;
                }
                end += 1;
            }
            (n == 2 && parts[0] >= 10 && parts[1] >= 10 && parts[2] >= 16).then_some((start, end))
        }
        Check::SendGrid => {
            if !starts_word(b, start) {
                return None;
            }
            let mut end = anchor_end;
            let run = |from: usize| (from..b.len()).take_while(|&i| is_b64url(b[i])).count();
            let a = run(end);
            end += a;
            if a != 22 || b.get(end) != Some(&b'.') {
                return None;
            }
            let c = run(end + 1);
            (c == 43).then_some((start, end + 1 + c))
        }
        Check::AssignedValue { len } => {
            // key name, then up to 8 of `"' :=\` and whitespace (JSON-escaped quotes too), then the value.
            let mut v = anchor_end;
            while v < b.len()
                && v - anchor_end < 8
                && matches!(b[v], b'"' | b'\'' | b'\\' | b' ' | b'\t' | b'=' | b':')
            {
                v += 1;
            }
            let value = |c: u8| c.is_ascii_alphanumeric() || c == b'/' || c == b'+';
            let n = (v..b.len()).take_while(|&i| value(b[i])).count();
            (n == len).then_some((v, v + n))
        }
    }
}

fn find(b: &[u8], from: usize, needle: &[u8], within: usize) -> Option<usize> {
    let hay = b.get(from..)?;
    let hay = &hay[..hay.len().min(within)];
    memchr::memmem::find(hay, needle).map(|i| from + i)
}
