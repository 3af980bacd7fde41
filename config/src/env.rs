//! `CUSTODY_*` environment overrides, applied over the file (or the embedded default)
//! before validation, so that a container image can be configured without a file.

use std::str::FromStr;

use crate::{Config, ConfigError};

/// Every override: the variable and the key it sets.
pub const OVERRIDES: &[(&str, &str)] = &[
    ("CUSTODY_LISTEN_ADDR", "listen.addr"),
    ("CUSTODY_ADMIN_ADDR", "admin.addr"),
    ("CUSTODY_ADMIN_TOKEN_ENV", "admin.token_env"),
    ("CUSTODY_AUDIT_DIR", "audit.dir"),
    ("CUSTODY_SIGNING_KEY", "audit.signing_key"),
    ("CUSTODY_FINGERPRINT_KEY_FILE", "audit.fingerprint_key_file"),
    ("CUSTODY_ON_FULL", "audit.on_full"),
    ("CUSTODY_DURABILITY", "audit.durability"),
    ("CUSTODY_FSYNC", "audit.fsync"),
    ("CUSTODY_RETENTION_DAYS", "audit.retention_days"),
    (
        "CUSTODY_CONTENT_RETENTION_DAYS",
        "audit.content_retention_days",
    ),
    ("CUSTODY_QUEUE_CAPACITY", "audit.queue_capacity"),
    ("CUSTODY_QUEUE_MAX_BYTES", "audit.queue_max_bytes"),
    ("CUSTODY_LOG_FORMAT", "log.format"),
];

impl Config {
    /// Applies the `CUSTODY_*` variables `var` returns, then validates again. Errors
    /// name the variable.
    pub fn with_env(mut self, var: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut any = false;
        for (name, key) in OVERRIDES {
            let Some(value) = var(name).filter(|v| !v.is_empty()) else {
                continue;
            };
            any = true;
            let bad = |reason: String| ConfigError::Invalid {
                origin: format!("environment variable {name}"),
                key: (*key).to_owned(),
                reason,
            };
            let word = |v: &str| toml::Value::String(v.to_owned());
            match *key {
                "listen.addr" => self.listen.addr = parse(&value).map_err(bad)?,
                "admin.addr" => {
                    self.admin.addr = if value == "off" {
                        None
                    } else {
                        Some(parse(&value).map_err(bad)?)
                    }
                }
                "admin.token_env" => self.admin.token_env = Some(value),
                "audit.dir" => self.audit.dir = value.into(),
                "audit.signing_key" => self.audit.signing_key = Some(value.into()),
                "audit.fingerprint_key_file" => {
                    self.audit.fingerprint_key_file = Some(value.into())
                }
                "audit.on_full" => self.audit.on_full = from_word(word(&value)).map_err(bad)?,
                "audit.durability" => {
                    self.audit.durability = from_word(word(&value)).map_err(bad)?
                }
                "audit.fsync" => self.audit.fsync = from_word(word(&value)).map_err(bad)?,
                "audit.retention_days" => {
                    self.audit.retention_days = Some(parse(&value).map_err(bad)?)
                }
                "audit.content_retention_days" => {
                    self.audit.content_retention_days = Some(parse(&value).map_err(bad)?)
                }
                "audit.queue_capacity" => self.audit.queue_capacity = parse(&value).map_err(bad)?,
                "audit.queue_max_bytes" => {
                    self.audit.queue_max_bytes = parse(&value).map_err(bad)?
                }
                "log.format" => self.log.format = from_word(word(&value)).map_err(bad)?,
                _ => {}
            }
        }
        if any {
            self.validate("environment")
        } else {
            Ok(self)
        }
    }
}

fn parse<T: FromStr>(v: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    v.parse().map_err(|e: T::Err| format!("`{v}`: {e}"))
}

/// An enum from its configuration word (`"reject"`...), through serde as in the file.
fn from_word<T: serde::de::DeserializeOwned>(v: toml::Value) -> Result<T, String> {
    let shown = v.to_string();
    T::deserialize(v).map_err(|e| format!("{shown}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{OnFull, DEFAULT_TOML};

    #[test]
    fn overrides_apply_and_errors_name_the_variable() {
        let env = |k: &str| match k {
            "CUSTODY_LISTEN_ADDR" => Some("0.0.0.0:8443".to_owned()),
            "CUSTODY_AUDIT_DIR" => Some("/var/lib/custody".to_owned()),
            "CUSTODY_ON_FULL" => Some("reject".to_owned()),
            "CUSTODY_ADMIN_ADDR" => Some("off".to_owned()),
            "CUSTODY_QUEUE_CAPACITY" => Some("1024".to_owned()),
            _ => None,
        };
        let c = Config::from_toml_str(DEFAULT_TOML, "x")
            .unwrap()
            .with_env(env)
            .unwrap();
        assert_eq!(c.listen.addr.to_string(), "0.0.0.0:8443");
        assert_eq!(c.audit.dir, std::path::PathBuf::from("/var/lib/custody"));
        assert_eq!(c.audit.on_full, OnFull::Reject);
        assert_eq!(c.admin.addr, None);
        assert_eq!(c.audit.queue_capacity, 1024);
        let err = Config::embedded_default()
            .unwrap()
            .with_env(|k| (k == "CUSTODY_QUEUE_CAPACITY").then(|| "0".to_owned()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("queue_capacity"), "{err}");
        let err = Config::embedded_default()
            .unwrap()
            .with_env(|k| (k == "CUSTODY_ON_FULL").then(|| "sometimes".to_owned()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("CUSTODY_ON_FULL") && err.contains("audit.on_full"),
            "{err}"
        );
    }
}
