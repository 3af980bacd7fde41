//! `[[policy]]` and `[policy_terms]`: rules over each exchange, written as CEL, whose
//! decisions every record carries. The rules are compiled by the audit crate; this
//! module checks what can be checked without compiling them.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::{Config, ConfigError};

/// What a matching rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Record the decision; nothing else changes. Evaluated by the writer.
    Flag,
    /// Answer 403 in the provider's error shape; nothing goes upstream.
    Block,
    /// Replace the rule's entities in the request before it goes upstream.
    Sanitize,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Flag => "flag",
            Action::Block => "block",
            Action::Sanitize => "sanitize",
        }
    }

    /// Acts on the request before it goes upstream.
    pub fn on_request(self) -> bool {
        matches!(self, Action::Block | Action::Sanitize)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }
}

/// `enforce` acts; `observe` evaluates and records what would have happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyMode {
    #[default]
    Enforce,
    Observe,
}

impl PolicyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyMode::Enforce => "enforce",
            PolicyMode::Observe => "observe",
        }
    }
}

/// What a rule that fails to evaluate does: recorded either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// The request goes on as if the rule had not matched.
    #[default]
    Ignore,
    /// The request is blocked (block and sanitize rules only).
    Block,
}

/// `[[policy]]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Names the rule in records, metrics and `log search --policy`: letters, digits and
    /// `_-.`, at most 64 characters.
    pub name: String,
    /// A CEL expression that is true when the rule matches (variables: `docs/policy.md`).
    pub when: String,
    pub action: Action,
    pub severity: Severity,
    /// What a blocked client is told (in the provider's error shape).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default)]
    pub mode: PolicyMode,
    #[serde(default)]
    pub on_error: OnError,
    /// Routes the rule applies to; unset: every route. A request on another route never
    /// pays for the rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes: Option<Vec<String>>,
    /// `sanitize`: the entities replaced (names of `[redaction]`); unset: every entity
    /// `[redaction]` looks for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entities: Option<Vec<String>>,
}

impl Policy {
    /// An enforcing rule with every option at its default.
    pub fn new(name: &str, when: &str, action: Action, severity: Severity) -> Self {
        Self {
            name: name.into(),
            when: when.into(),
            action,
            severity,
            message: None,
            mode: PolicyMode::Enforce,
            on_error: OnError::Ignore,
            routes: None,
            entities: None,
        }
    }
}

/// Longest `message` a rule may carry.
pub const MAX_MESSAGE: usize = 1024;

/// Checks the rules and term lists against each other and the routes; `(key, reason)`
/// on the first fault. The expressions themselves are compiled by the audit crate.
pub fn check(
    policies: &[Policy],
    terms: &BTreeMap<String, Vec<String>>,
    routes: &HashSet<&str>,
    entities: &HashSet<&str>,
) -> Result<(), (String, String)> {
    for (name, list) in terms {
        let key = format!("policy_terms.{name}");
        if !is_identifier(name) {
            return Err((
                key,
                "must be an identifier (letters, digits, `_`; not starting with a digit)".into(),
            ));
        }
        if list.iter().any(|t| t.trim().is_empty()) {
            return Err((key, "holds an empty term".into()));
        }
    }
    let mut names = HashSet::new();
    for (i, p) in policies.iter().enumerate() {
        let key = |field: &str| format!("policy[{i}].{field} (policy `{}`)", p.name);
        if !is_name(&p.name, b"_-.") {
            return Err((
                key("name"),
                "must be 1 to 64 letters, digits or `_-.`".into(),
            ));
        }
        if !names.insert(p.name.as_str()) {
            return Err((key("name"), "is used by another policy".into()));
        }
        if p.when.trim().is_empty() {
            return Err((key("when"), "must not be empty".into()));
        }
        if p.message.as_ref().is_some_and(|m| m.len() > MAX_MESSAGE) {
            return Err((
                key("message"),
                format!("is longer than {MAX_MESSAGE} bytes"),
            ));
        }
        if p.on_error == OnError::Block && !p.action.on_request() {
            return Err((
                key("on_error"),
                "`block` needs action `block` or `sanitize`: a flag acts on nothing".into(),
            ));
        }
        for r in p.routes.iter().flatten() {
            if !routes.contains(r.as_str()) {
                return Err((key("routes"), format!("names no route `{r}`")));
            }
        }
        if let Some(list) = &p.entities {
            if p.action != Action::Sanitize {
                return Err((key("entities"), "is for `sanitize` rules only".into()));
            }
            if list.is_empty() {
                return Err((key("entities"), "must name at least one entity".into()));
            }
            for e in list {
                if !entities.contains(e.as_str()) {
                    return Err((key("entities"), format!("names no entity `{e}`")));
                }
            }
        }
    }
    Ok(())
}

fn is_identifier(s: &str) -> bool {
    let mut b = s.bytes();
    b.next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

/// A name custody writes into records and metrics: 1 to 64 ASCII letters, digits or
/// bytes of `extra`.
pub(crate) fn is_name(s: &str, extra: &[u8]) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || extra.contains(&b))
}

/// The rules of a file for `custody policy check` and `policy test`: a whole
/// configuration, or a file of only `[[policy]]`, `[policy_terms]` and
/// `[redaction]` (then the routes rules name are not checked).
pub fn load_rules(path: &std::path::Path) -> Result<Config, ConfigError> {
    let text = crate::load::read_bounded(path)?;
    let origin = path.display().to_string();
    let table: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Parse {
        origin: origin.clone(),
        message: crate::secret::parse_message(&e, &text),
    })?;
    if table.contains_key("route") {
        return Config::from_toml_str(&text, &origin);
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct RulesOnly {
        #[serde(default)]
        policy: Vec<Policy>,
        #[serde(default)]
        policy_terms: BTreeMap<String, Vec<String>>,
        #[serde(default)]
        redaction: crate::Redaction,
    }
    let rules: RulesOnly = toml::from_str(&text).map_err(|e| ConfigError::Parse {
        origin: origin.clone(),
        message: crate::secret::parse_message(&e, &text),
    })?;
    let invalid = |(key, reason): (String, String)| ConfigError::Invalid {
        origin: origin.clone(),
        key,
        reason,
    };
    rules.redaction.check().map_err(invalid)?;
    let named: HashSet<&str> = rules
        .policy
        .iter()
        .flat_map(|p| p.routes.iter().flatten())
        .map(String::as_str)
        .collect();
    let entities: HashSet<&str> = crate::BUILTIN_ENTITIES
        .iter()
        .copied()
        .chain(rules.redaction.custom.iter().map(|c| c.name.as_str()))
        .collect();
    check(&rules.policy, &rules.policy_terms, &named, &entities).map_err(invalid)?;
    let mut config = Config::embedded_default()?;
    config.policies = rules.policy;
    config.policy_terms = rules.policy_terms;
    config.redaction = rules.redaction;
    Ok(config)
}
