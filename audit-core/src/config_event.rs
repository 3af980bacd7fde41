//! The configuration as the trail knows it: a canonical, secret-free snapshot, its
//! version (`config.version` on every record) and the `config` event written into the
//! chain at each start and reload, naming what changed.

use std::path::Path;

use custody_config::Config;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::fingerprint::Fingerprinter;

/// A configuration as recorded: secrets replaced by their fingerprints.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// First 16 hex digits of the SHA-256 of `canonical`.
    pub version: String,
    pub canonical: Value,
    /// The policy set's version (`policy.version` on records).
    pub policy_version: String,
}

impl Snapshot {
    /// Secrets (virtual key hashes, and the values of every `*_env` variable) appear only
    /// as keyed fingerprints, so that a rotated secret changes the version without
    /// being written anywhere.
    pub fn of(config: &Config, fp: &Fingerprinter) -> Self {
        let mut canonical = serde_json::to_value(config).unwrap_or(Value::Null);
        let mut secrets = Map::new();
        let env_fp = |name: &str| match std::env::var_os(name) {
            Some(v) => fp.key_id(v.as_encoded_bytes()),
            None => "unset".to_owned(),
        };
        if let Some(keys) = canonical.get_mut("key").and_then(Value::as_array_mut) {
            for k in keys {
                let id = k.get("id").and_then(Value::as_str).unwrap_or("").to_owned();
                if let Some(h) = k.get("key_sha256").and_then(Value::as_str) {
                    let f = fp.key_id(h.as_bytes());
                    k["key_sha256"] = Value::String(f);
                }
                for field in ["key_env", "upstream_key_env"] {
                    if let Some(env) = k.get(field).and_then(Value::as_str) {
                        secrets.insert(format!("key[{id}].{field}"), json!(env_fp(env)));
                    }
                }
            }
        }
        // Redaction terms and allow-listed values are what the trail must not hold in
        // clear: an event that listed them would undo their redaction.
        let fingerprint_all = |v: Option<&mut Value>| {
            for item in v.and_then(Value::as_array_mut).into_iter().flatten() {
                *item = json!(fp.key_id(item.as_str().unwrap_or("").as_bytes()));
            }
        };
        if let Some(t) = canonical
            .get_mut("admin")
            .and_then(|a| a.get_mut("token"))
            .filter(|t| t.is_string())
        {
            *t = json!(fp.key_id(t.as_str().unwrap_or("").as_bytes()));
        }
        if let Some(env) = &config.admin.token_env {
            secrets.insert("admin.token_env".into(), json!(env_fp(env)));
        }
        // Reviewers' token hashes, like the virtual keys': a weak token must not be
        // found offline from the trail.
        if let Some(reviewers) = canonical.get_mut("reviewer").and_then(Value::as_array_mut) {
            for r in reviewers {
                let id = r.get("id").and_then(Value::as_str).unwrap_or("").to_owned();
                if let Some(h) = r.get("token_sha256").and_then(Value::as_str) {
                    let f = fp.key_id(h.as_bytes());
                    r["token_sha256"] = Value::String(f);
                }
                if let Some(env) = r.get("token_env").and_then(Value::as_str) {
                    secrets.insert(format!("reviewer[{id}].token_env"), json!(env_fp(env)));
                }
            }
        }
        // The console's object store options, like the shipper's.
        for section in ["ship", "console"] {
            if let Some(opts) = canonical
                .get_mut(section)
                .and_then(|s| s.get_mut("options"))
                .and_then(Value::as_object_mut)
            {
                mask_options(opts, fp);
            }
        }
        if let Some(r) = canonical.get_mut("redaction") {
            fingerprint_all(r.get_mut("allow"));
            for rule in r
                .get_mut("custom")
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                fingerprint_all(rule.get_mut("terms"));
            }
        }
        // Policy term lists are what the rules look for (project code names, customer
        // names): fingerprinted like redaction terms, the version still follows them.
        if let Some(lists) = canonical
            .get_mut("policy_terms")
            .and_then(Value::as_object_mut)
        {
            for list in lists.values_mut() {
                fingerprint_all(Some(list));
            }
        }
        for r in &config.routes {
            if let Some(env) = &r.upstream_key_env {
                secrets.insert(
                    format!("route[{}].upstream_key_env", r.name),
                    json!(env_fp(env)),
                );
            }
        }
        if let Value::Object(m) = &mut canonical {
            m.insert("secrets".into(), Value::Object(secrets));
        }
        let digest = Sha256::digest(canonical.to_string().as_bytes());
        Self {
            version: hex::encode(&digest[..8]),
            canonical,
            policy_version: crate::policy::version(&config.policies, &config.policy_terms),
        }
    }

    /// The chain event for this snapshot replacing `previous` (`None` when unknown).
    pub fn event(&self, reason: &str, previous: Option<&Snapshot>) -> Value {
        let changed: Vec<Value> = match previous {
            Some(p) => changes(&p.canonical, &self.canonical)
                .into_iter()
                .map(|(key, from, to)| json!({"key": key, "from": from, "to": to}))
                .collect(),
            None => Vec::new(),
        };
        json!({
            "type": "config",
            "reason": reason,
            "version": self.version,
            "previous_version": previous.map(|p| p.version.clone()),
            "policy_version": self.policy_version,
            "changed": changed,
            "config": self.canonical,
        })
    }

    /// The snapshot written at the previous start or reload, kept beside the trail so
    /// that a start can say what changed since.
    pub fn load_last(dir: &Path) -> Option<Self> {
        let text = std::fs::read_to_string(dir.join(LAST_FILE)).ok()?;
        let canonical: Value = serde_json::from_str(&text).ok()?;
        let digest = Sha256::digest(canonical.to_string().as_bytes());
        // Only compared against: the policy version of the new snapshot is the one told.
        Some(Self {
            version: hex::encode(&digest[..8]),
            canonical,
            policy_version: String::new(),
        })
    }

    pub fn store_last(&self, dir: &Path) {
        let tmp = dir.join(format!("{LAST_FILE}.tmp"));
        let result = crate::index::write_private(&tmp, self.canonical.to_string().as_bytes())
            .and_then(|()| std::fs::rename(&tmp, dir.join(LAST_FILE)));
        if let Err(e) = result {
            tracing::warn!(error = %e, "could not keep the configuration snapshot; the next start will not list changes");
        }
    }
}

const LAST_FILE: &str = "config.last.json";

/// Object store options may carry credentials: fingerprinted by name, and a URL's
/// password masked.
fn mask_options(opts: &mut Map<String, Value>, fp: &Fingerprinter) {
    for (k, v) in opts.iter_mut() {
        let k = k.to_ascii_lowercase();
        if ["secret", "key", "token", "password", "credential", "sas"]
            .iter()
            .any(|s| k.contains(s))
        {
            *v = json!(fp.key_id(v.as_str().unwrap_or("").as_bytes()));
        } else if let Some(masked) = v
            .as_str()
            .filter(|u| custody_config::secret::url_password(u).is_some())
            .map(|u| custody_config::secret::mask_url(u).into_owned())
        {
            // An endpoint written as `http://user:password@host`.
            *v = json!(masked);
        }
    }
}

/// Every leaf that differs, as `(key, from, to)`, keys written `a.b[2].c`.
pub fn changes(old: &Value, new: &Value) -> Vec<(String, Value, Value)> {
    let mut out = Vec::new();
    diff("", old, new, &mut out);
    out
}

fn diff(path: &str, old: &Value, new: &Value, out: &mut Vec<(String, Value, Value)>) {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                diff(
                    &p,
                    a.get(k).unwrap_or(&Value::Null),
                    b.get(k).unwrap_or(&Value::Null),
                    out,
                );
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                diff(&format!("{path}[{i}]"), x, y, out);
            }
        }
        _ if old != new => out.push((path.to_owned(), old.clone(), new.clone())),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_follow_the_knobs_and_changes_name_them() {
        let fp = Fingerprinter::new(vec![7; 32]);
        let a = Config::embedded_default().unwrap();
        let mut b = a.clone();
        b.audit.fsync_interval_ms = 5;
        let (sa, sb) = (Snapshot::of(&a, &fp), Snapshot::of(&b, &fp));
        assert_eq!(sa, Snapshot::of(&a, &fp));
        assert_ne!(sa.version, sb.version);
        let ev = sb.event("reload", Some(&sa));
        assert_eq!(ev["changed"][0]["key"], "audit.fsync_interval_ms");
        assert_eq!(ev["changed"][0]["to"], 5);
        assert_eq!(ev["previous_version"], json!(sa.version));
    }

    #[test]
    fn secrets_appear_only_as_fingerprints() {
        let fp = Fingerprinter::new(vec![7; 32]);
        let mut c = Config::embedded_default().unwrap();
        let hash = "ab".repeat(32);
        c.keys.push(custody_config::VirtualKey {
            id: "app".into(),
            user: None,
            team: None,
            key_sha256: Some(hash.clone()),
            key_env: None,
            routes: None,
            models: None,
            upstream_key_env: Some("CUSTODY_TEST_NO_SUCH_VAR".into()),
        });
        c.redaction.allow = vec!["ceo@example.com".into()];
        c.redaction.custom.push(custody_config::CustomRule {
            name: "PROJECT".into(),
            terms: vec!["Falcon Nine".into()],
            case_insensitive: false,
            prefix: None,
            min_len: 16,
            max_len: 64,
            alphabet: Default::default(),
            mode: None,
        });
        c.ship.options.insert(
            "endpoint".into(),
            "http://minio:s3cr3t-pass@minio.local:9000".into(),
        );
        let reviewer_hash = "cd".repeat(32);
        c.console = Some(custody_config::Console {
            listen: "127.0.0.1:0".parse().unwrap(),
            tls: None,
            dir: None,
            from: Some("s3://trails/prod".into()),
            options: [("aws_secret_access_key".into(), "console-s3cr3t".into())].into(),
            access_dir: "/access".into(),
            signing_key: None,
            trusted_key: None,
        });
        c.reviewers.push(custody_config::Reviewer {
            id: "alice".into(),
            token_sha256: Some(reviewer_hash.clone()),
            token_env: None,
            role: custody_config::Role::Content,
            routes: None,
            teams: None,
            audit: false,
        });
        let s = Snapshot::of(&c, &fp);
        assert!(!s.canonical.to_string().contains(&reviewer_hash));
        assert!(!s.canonical.to_string().contains("console-s3cr3t"));
        let text = s.canonical.to_string();
        assert!(!text.contains("s3cr3t-pass"), "{text}");
        assert!(text.contains("http://minio:***@minio.local:9000"), "{text}");
        assert!(!text.contains(&hash), "{text}");
        assert!(!text.contains("ceo@example.com"), "{text}");
        assert!(!text.contains("Falcon Nine"), "{text}");
        assert_eq!(
            s.canonical["secrets"]["key[app].upstream_key_env"],
            json!("unset")
        );
    }
}
