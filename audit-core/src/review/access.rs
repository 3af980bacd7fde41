//! Who may read a trail through the console, and what of each record they see:
//! tokens checked in constant time against every reviewer, routes and teams that
//! bound what a reviewer sees at all, and the `metadata` role's view of a record,
//! which never holds a body.

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use custody_config::{Reviewer, Role};

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// The variable's value is never shown.
    #[error("reviewer `{id}`: `{var}` is unset or empty")]
    TokenEnv { id: String, var: String },
}

/// The configured reviewers, each with the SHA-256 of their token.
#[derive(Debug)]
pub struct Reviewers {
    known: Vec<(Reviewer, [u8; 32])>,
}

impl Reviewers {
    /// Hashes the tokens held in `token_env` variables (read once, at start).
    pub fn new(reviewers: &[Reviewer]) -> Result<Self, AccessError> {
        Self::with_env(reviewers, |name| std::env::var(name).ok())
    }

    /// [`Self::new`], reading variables through `env`.
    pub fn with_env(
        reviewers: &[Reviewer],
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, AccessError> {
        let mut known = Vec::with_capacity(reviewers.len());
        for r in reviewers {
            let mut hash = [0u8; 32];
            match (&r.token_sha256, &r.token_env) {
                (Some(h), _) => {
                    // Checked at load: 64 hex digits.
                    if hex::decode_to_slice(h, &mut hash).is_err() {
                        continue;
                    }
                }
                (None, Some(var)) => {
                    let token = env(var).filter(|t| !t.is_empty()).ok_or_else(|| {
                        AccessError::TokenEnv {
                            id: r.id.clone(),
                            var: var.clone(),
                        }
                    })?;
                    hash = Sha256::digest(token.as_bytes()).into();
                }
                (None, None) => continue,
            }
            known.push((r.clone(), hash));
        }
        Ok(Self { known })
    }

    /// The reviewer with this id.
    pub fn by_id(&self, id: &str) -> Option<&Reviewer> {
        self.known.iter().map(|(r, _)| r).find(|r| r.id == id)
    }

    /// The reviewer whose token this is. Every reviewer's hash is compared, in
    /// constant time, whichever matches: how long a guess takes tells nothing.
    pub fn authenticate(&self, token: &str) -> Option<&Reviewer> {
        if token.is_empty() {
            return None;
        }
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for (r, h) in &self.known {
            if bool::from(h.ct_eq(&hash)) {
                found = Some(r);
            }
        }
        found
    }
}

/// Whether `reviewer` may see `record` at all: its route and team are among theirs
/// (a record without a team is not among a team-bound reviewer's).
pub fn may_see(reviewer: &Reviewer, record: &Value) -> bool {
    let within = |allowed: &Option<Vec<String>>, value: &Value| match allowed {
        None => true,
        Some(list) => value.as_str().is_some_and(|v| list.iter().any(|a| a == v)),
    };
    within(&reviewer.routes, &record["route"]) && within(&reviewer.teams, &record["client"]["team"])
}

/// `record` as `reviewer` may read it. A `metadata` reviewer's view holds each body
/// only as its stored length, SHA-256 and redaction counts; `content` sees the
/// (redacted) bodies as stored.
pub fn view(reviewer: &Reviewer, mut record: Value) -> Value {
    if reviewer.role == Role::Content {
        return record;
    }
    for side in ["request", "response"] {
        let Some(body) = record.get_mut(side).and_then(Value::as_object_mut) else {
            continue;
        };
        if let Some(stored) = body.remove("body") {
            let text = stored.to_string();
            body.insert(
                "body_withheld".into(),
                json!({
                    "bytes": text.len(),
                    "sha256": hex::encode(Sha256::digest(text.as_bytes())),
                }),
            );
        }
    }
    record
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reviewer(id: &str, role: Role) -> Reviewer {
        Reviewer {
            id: id.into(),
            token_sha256: Some(hex::encode(Sha256::digest(format!("token-{id}")))),
            token_env: None,
            role,
            routes: None,
            teams: None,
            audit: false,
        }
    }

    #[test]
    fn tokens_name_their_reviewer_and_nothing_else_passes() {
        let mut env_bound = reviewer("svc", Role::Metadata);
        env_bound.token_sha256 = None;
        env_bound.token_env = Some("SVC_TOKEN".into());
        let all = [reviewer("alice", Role::Content), env_bound];
        let r = Reviewers::with_env(&all, |v| (v == "SVC_TOKEN").then(|| "s3cr3t".into())).unwrap();
        assert_eq!(r.authenticate("token-alice").unwrap().id, "alice");
        assert_eq!(r.authenticate("s3cr3t").unwrap().id, "svc");
        for wrong in ["", "token-alic", "token-alice ", "TOKEN-ALICE", "token-svc"] {
            assert!(r.authenticate(wrong).is_none(), "{wrong:?}");
        }
        let e = Reviewers::with_env(&all, |_| Some(String::new())).unwrap_err();
        assert_eq!(
            e.to_string(),
            "reviewer `svc`: `SVC_TOKEN` is unset or empty"
        );
    }

    #[test]
    fn routes_and_teams_bound_what_a_reviewer_sees() {
        let mut r = reviewer("payments", Role::Content);
        r.teams = Some(vec!["payments".into()]);
        let rec = |route: &str, team: Value| json!({"route": route, "client": {"team": team}});
        assert!(may_see(&r, &rec("openai", json!("payments"))));
        assert!(!may_see(&r, &rec("openai", json!("growth"))));
        assert!(!may_see(&r, &rec("openai", Value::Null)));
        r.routes = Some(vec!["anthropic".into()]);
        assert!(!may_see(&r, &rec("openai", json!("payments"))));
        assert!(may_see(&r, &rec("anthropic", json!("payments"))));
        assert!(may_see(
            &reviewer("all", Role::Metadata),
            &rec("x", Value::Null)
        ));
    }

    #[test]
    fn a_metadata_view_holds_no_body() {
        let record = json!({
            "id": "r1",
            "request": {"body": {"messages": [{"role": "user", "content": "the prompt"}]}, "redactions": {"EMAIL_ADDRESS": 1}},
            "response": {"body": "plain text answer", "truncated": true},
            "http": {"request_bytes": 55},
        });
        let seen = view(&reviewer("m", Role::Metadata), record.clone());
        let text = seen.to_string();
        assert!(
            !text.contains("the prompt") && !text.contains("plain text answer"),
            "{text}"
        );
        assert_eq!(seen["request"]["redactions"]["EMAIL_ADDRESS"], 1);
        assert_eq!(seen["response"]["truncated"], true);
        let stored = record["request"]["body"].to_string();
        assert_eq!(seen["request"]["body_withheld"]["bytes"], stored.len());
        assert_eq!(
            seen["request"]["body_withheld"]["sha256"],
            hex::encode(Sha256::digest(stored.as_bytes()))
        );
        assert_eq!(view(&reviewer("c", Role::Content), record.clone()), record);
    }
}
