//! `[redaction]`: which entities are found and how each is replaced.

use std::{collections::BTreeMap, path::PathBuf};

use serde::{Deserialize, Serialize};

/// Every entity custody finds without configuration. Names follow Microsoft Presidio
/// where it has one; secret kinds are named for their issuer.
pub const BUILTIN_ENTITIES: &[&str] = &[
    "EMAIL_ADDRESS",
    "PHONE_NUMBER",
    "CREDIT_CARD",
    "US_SSN",
    "IBAN_CODE",
    "IP_ADDRESS",
    "OPENAI_API_KEY",
    "ANTHROPIC_API_KEY",
    "AWS_ACCESS_KEY",
    "AWS_SECRET_KEY",
    "GITHUB_TOKEN",
    "GITLAB_TOKEN",
    "SLACK_TOKEN",
    "STRIPE_KEY",
    "GOOGLE_API_KEY",
    "HUGGINGFACE_TOKEN",
    "NPM_TOKEN",
    "SENDGRID_API_KEY",
    "JWT",
    "PRIVATE_KEY",
];

/// How a found entity is replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// `[EMAIL_ADDRESS]`
    #[default]
    Mask,
    /// `[EMAIL_ADDRESS:3f9a1c2b]`: a keyed HMAC of the value, the same for the same value
    /// wherever the key is shared, so reviewers can correlate without seeing it.
    Pseudonymize,
    /// Removed without a marker.
    Drop,
    /// Not looked for.
    Off,
}

/// Characters a custom prefixed token may hold after its prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Alphabet {
    /// `[A-Za-z0-9]`
    Alnum,
    /// `[A-Za-z0-9_-]`
    #[default]
    Token,
    /// `[0-9a-fA-F]`
    Hex,
    /// `[A-Za-z0-9+/=]`
    Base64,
    /// `[A-Z0-9]`
    Upper,
}

/// `[redaction]`
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Redaction {
    /// Mode for every entity not named in `entities`.
    pub default_mode: Mode,
    /// Per-entity mode (`"off"` disables an entity), e.g. `IP_ADDRESS = "off"`.
    pub entities: BTreeMap<String, Mode>,
    /// Values never redacted, matched exactly (e-mail addresses without regard to case),
    /// e.g. a public support address.
    pub allow: Vec<String>,
    /// Secret for `pseudonymize`; hex. Unset: `<audit dir>/pseudonym.key`, generated on
    /// first use. Share the file between deployments to share pseudonyms.
    pub pseudonym_key_file: Option<PathBuf>,
    /// Rules of your own.
    pub custom: Vec<CustomRule>,
}

/// `[[redaction.custom]]`: literal `terms`, or a `prefix` followed by a token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomRule {
    /// Entity name, `UPPER_SNAKE_CASE`, not a built-in one.
    pub name: String,
    /// Literal terms (3 bytes or more each).
    #[serde(default)]
    pub terms: Vec<String>,
    /// Match `terms` without regard to ASCII case.
    #[serde(default)]
    pub case_insensitive: bool,
    /// A token prefix (3 bytes or more), e.g. `acme_live_`.
    #[serde(default)]
    pub prefix: Option<String>,
    /// Fewest characters of `alphabet` after the prefix.
    #[serde(default = "default_min_len")]
    pub min_len: usize,
    /// Most characters of `alphabet` after the prefix.
    #[serde(default = "default_max_len")]
    pub max_len: usize,
    #[serde(default)]
    pub alphabet: Alphabet,
    /// Mode for this rule (else `default_mode`).
    #[serde(default)]
    pub mode: Option<Mode>,
}

const fn default_min_len() -> usize {
    16
}

const fn default_max_len() -> usize {
    128
}

impl Redaction {
    /// The mode of an entity.
    pub fn mode_of(&self, entity: &str) -> Mode {
        self.entities
            .get(entity)
            .copied()
            .unwrap_or(self.default_mode)
    }

    /// Checks the rules; the error is `(key, reason)` with the rule named.
    pub(crate) fn check(&self) -> Result<(), (String, String)> {
        for name in self.entities.keys() {
            let custom = self.custom.iter().any(|c| &c.name == name);
            if !BUILTIN_ENTITIES.contains(&name.as_str()) && !custom {
                return Err((
                    format!("redaction.entities.{name}"),
                    format!(
                        "unknown entity; built-in ones are {}",
                        BUILTIN_ENTITIES.join(", ")
                    ),
                ));
            }
        }
        for a in &self.allow {
            if a.is_empty() {
                return Err(("redaction.allow".into(), "holds an empty value".into()));
            }
        }
        let mut names = std::collections::HashSet::new();
        for (i, c) in self.custom.iter().enumerate() {
            let key = |f: &str| format!("redaction.custom[{i}].{f} (rule `{}`)", c.name);
            let snake = !c.name.is_empty()
                && c.name
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
                && c.name.as_bytes()[0].is_ascii_uppercase();
            if !snake {
                return Err((key("name"), "must be UPPER_SNAKE_CASE".into()));
            }
            if BUILTIN_ENTITIES.contains(&c.name.as_str()) || !names.insert(c.name.as_str()) {
                return Err((key("name"), "is already an entity name".into()));
            }
            match (&c.prefix, c.terms.is_empty()) {
                (None, true) => {
                    return Err((key("terms"), "a rule needs `terms` or a `prefix`".into()))
                }
                (Some(_), false) => {
                    return Err((
                        key("prefix"),
                        "a rule has `terms` or a `prefix`, not both".into(),
                    ))
                }
                _ => {}
            }
            // Short literals would turn off the automaton's SIMD prefilter for everyone.
            if let Some(t) = c.terms.iter().find(|t| t.len() < 3) {
                return Err((key("terms"), format!("`{t}` is shorter than 3 bytes")));
            }
            if let Some(p) = &c.prefix {
                if p.len() < 3 {
                    return Err((key("prefix"), "must be 3 bytes or longer".into()));
                }
                if c.min_len == 0 || c.min_len > c.max_len {
                    return Err((
                        key("min_len"),
                        "must be at least 1 and at most max_len".into(),
                    ));
                }
            }
            if c.case_insensitive && c.prefix.is_some() {
                return Err((key("case_insensitive"), "applies to `terms` only".into()));
            }
        }
        Ok(())
    }
}
