//! `[console]` and `[[reviewer]]`: the review console (`custody console`), a separate
//! read-only process over a trail, and who may read what through it (`docs/console.md`).

use std::{collections::HashSet, net::SocketAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

use crate::{ConfigError, ListenTls};

/// `[console]`: where the console listens, the trail it reads and the access trail it
/// writes (every read, on the record).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Console {
    /// Socket address the console serves on.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Serve TLS, with the same options as `[listen.tls]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ListenTls>,
    /// The trail read, where it lies: a local audit directory...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// ... or the shipped trails under `s3://bucket/prefix` (`gs://`, `az://`,
    /// `file://`), every source under it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Options for the object store under `from` (`endpoint`, `region`...);
    /// credentials come from each cloud's standard environment.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub options: std::collections::BTreeMap<String, String>,
    /// The console's own trail: an `access` event per page, search, record, export
    /// and failed login, hash-chained and signed like the audit trail.
    pub access_dir: PathBuf,
    /// Ed25519 key (`custody keygen`) that signs the access trail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_key: Option<PathBuf>,
    /// Hex public key the integrity page verifies the read trail's signatures against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trusted_key: Option<String>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9444))
}

/// What a reviewer may see of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Every field but the request and response bodies, which it sees only as their
    /// lengths, hashes and redaction counts.
    Metadata,
    /// The redacted bodies too.
    Content,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Metadata => "metadata",
            Role::Content => "content",
        }
    }
}

/// `[[reviewer]]`: one person or service that may read through the console.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reviewer {
    /// Names the reviewer in the access trail.
    pub id: String,
    /// Hex SHA-256 of the reviewer's token (the token itself is never configured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_sha256: Option<String>,
    /// Or: the environment variable holding the token (hashed at start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_env: Option<String>,
    pub role: Role,
    /// Set: the reviewer sees only records of these routes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes: Option<Vec<String>>,
    /// Set: the reviewer sees only records of these teams (a record without a team is
    /// not among them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teams: Option<Vec<String>>,
    /// May read the console's own access trail (`content` reviewers only).
    #[serde(default)]
    pub audit: bool,
}

/// The configuration the console's access trail is written under (and recorded in
/// its `config` events): the console, its reviewers, and an `[audit]` that writes to
/// `access_dir`, signed with `signing_key`. No route, no admin listener.
pub fn access_config(console: &Console, reviewers: &[Reviewer]) -> crate::Config {
    let mut c = crate::Config::for_test(&console.access_dir, Vec::new());
    c.listen.addr = console.listen;
    c.listen.tls = console.tls.clone();
    c.admin.addr = None;
    c.audit.signing_key = console.signing_key.clone();
    c.console = Some(console.clone());
    c.reviewers = reviewers.to_vec();
    c
}

/// Checks `[console]` and `[[reviewer]]` together; `(key, reason)` on the first fault.
pub fn check(console: &Console, reviewers: &[Reviewer]) -> Result<(), (String, String)> {
    let fault = |key: &str, reason: &str| Err((key.to_owned(), reason.to_owned()));
    match (&console.dir, &console.from) {
        (Some(_), None) | (None, Some(_)) => {}
        _ => return fault("console.dir", "exactly one of `dir` and `from` is needed"),
    }
    if let Some(url) = &console.from {
        if crate::secret::url_password(url).is_some() {
            return fault(
                "console.from",
                "must not carry credentials (`user:password@`); use the store's environment",
            );
        }
    }
    if console.access_dir.as_os_str().is_empty() {
        return fault("console.access_dir", "must not be empty");
    }
    if console.dir.as_ref() == Some(&console.access_dir) {
        return fault(
            "console.access_dir",
            "must not be the trail it reads: the console never writes there",
        );
    }
    if let Some(k) = &console.trusted_key {
        if k.len() != 64 || !k.bytes().all(|b| b.is_ascii_hexdigit()) {
            return fault("console.trusted_key", "must be 64 hex digits");
        }
    }
    if reviewers.is_empty() {
        return fault("reviewer", "at least one [[reviewer]] is needed");
    }
    let mut ids = HashSet::new();
    let mut hashes = HashSet::new();
    for (i, r) in reviewers.iter().enumerate() {
        let key = |field: &str| format!("reviewer[{i}].{field} (reviewer `{}`)", r.id);
        if !crate::policy::is_name(&r.id, b"_-.@") {
            return Err((
                key("id"),
                "must be 1 to 64 letters, digits or `_-.@`".into(),
            ));
        }
        if !ids.insert(r.id.as_str()) {
            return Err((key("id"), "is used by another reviewer".into()));
        }
        match (&r.token_sha256, &r.token_env) {
            (Some(h), None) => {
                if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err((key("token_sha256"), "must be 64 hex digits".into()));
                }
                if !hashes.insert(h.to_ascii_lowercase()) {
                    return Err((
                        key("token_sha256"),
                        "is another reviewer's token: every reviewer needs their own".into(),
                    ));
                }
            }
            (None, Some(name)) => {
                if name.is_empty() || name.contains('=') {
                    return Err((
                        key("token_env"),
                        "is not an environment variable name".into(),
                    ));
                }
            }
            _ => {
                return Err((
                    key("token_sha256"),
                    "exactly one of `token_sha256` and `token_env` is needed".into(),
                ))
            }
        }
        for (field, list) in [("routes", &r.routes), ("teams", &r.teams)] {
            if list.as_ref().is_some_and(|l| l.is_empty()) {
                return Err((
                    key(field),
                    "is empty: the reviewer would see nothing (leave it out to see all)".into(),
                ));
            }
        }
        if r.audit && r.role != Role::Content {
            return Err((
                key("audit"),
                "is for `content` reviewers only: the access trail names what was read".into(),
            ));
        }
    }
    Ok(())
}

/// The console's settings from a file: a whole configuration with `[console]`, or a
/// file of only `[console]` and `[[reviewer]]`.
pub fn load(path: &std::path::Path) -> Result<(Console, Vec<Reviewer>), ConfigError> {
    let text = crate::load::read_bounded(path)?;
    let origin = path.display().to_string();
    let parse = |e: toml::de::Error| ConfigError::Parse {
        origin: origin.clone(),
        message: crate::secret::parse_message(&e, &text),
    };
    let table: toml::Table = toml::from_str(&text).map_err(parse)?;
    let (console, reviewers) = if table.contains_key("route") {
        let c = crate::Config::from_toml_str(&text, &origin)?;
        (c.console, c.reviewers)
    } else {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct ConsoleOnly {
            console: Option<Console>,
            #[serde(default)]
            reviewer: Vec<Reviewer>,
        }
        let only: ConsoleOnly = toml::from_str(&text).map_err(parse)?;
        (only.console, only.reviewer)
    };
    let invalid = |(key, reason): (String, String)| ConfigError::Invalid {
        origin: origin.clone(),
        key,
        reason,
    };
    let console = console.ok_or_else(|| {
        invalid((
            "console".into(),
            "a [console] section is needed (its `dir` or `from`, and `access_dir`)".into(),
        ))
    })?;
    check(&console, &reviewers).map_err(invalid)?;
    Ok((console, reviewers))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn file(text: &str) -> Result<(Console, Vec<Reviewer>), String> {
        let dir = std::env::temp_dir().join(format!(
            "custody-console-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let path = dir.join("console.toml");
        std::fs::write(&path, text).map_err(|e| e.to_string())?;
        let out = load(&path).map_err(|e| e.to_string());
        let _ = std::fs::remove_dir_all(&dir);
        out
    }

    fn reviewer(extra: &str) -> String {
        format!(
            "[[reviewer]]\nid = \"alice\"\ntoken_sha256 = \"{HASH}\"\nrole = \"content\"\n{extra}"
        )
    }

    #[test]
    fn a_console_file_or_a_whole_configuration_loads() {
        let console = "[console]\ndir = \"/var/lib/custody/audit\"\naccess_dir = \"/var/lib/custody/access\"\n";
        let (c, r) = file(&format!("{console}{}", reviewer("teams = [\"payments\"]"))).unwrap();
        assert_eq!(c.listen, default_listen());
        assert_eq!(r[0].role, Role::Content);
        assert_eq!(r[0].teams.as_deref(), Some(&["payments".to_owned()][..]));
        let routes =
            "[[route]]\nname = \"a\"\nprefix = \"/v1/\"\nupstream = \"http://127.0.0.1:9\"\n";
        let (_, r) = file(&format!("{routes}{console}{}", reviewer(""))).unwrap();
        assert_eq!(r[0].id, "alice");
        let e = crate::Config::from_toml_str(&format!("{routes}{}", reviewer("")), "x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("need a [console]"), "{e}");
    }

    #[test]
    fn careless_console_settings_are_refused_by_key() {
        let ok = "dir = \"/t\"\naccess_dir = \"/a\"";
        let other = "[[reviewer]]\nid = \"bob\"\ntoken_env = \"BOB_TOKEN\"\nrole = \"metadata\"\n";
        let cases = [
            (format!("[console]\n{ok}\n"), "reviewer", "at least one"),
            (reviewer(""), "console", "[console] section"),
            (
                format!(
                    "[console]\ndir = \"/t\"\nfrom = \"s3://b/p\"\naccess_dir = \"/a\"\n{}",
                    reviewer("")
                ),
                "console.dir",
                "exactly one",
            ),
            (
                format!("[console]\naccess_dir = \"/a\"\n{}", reviewer("")),
                "console.dir",
                "exactly one",
            ),
            (
                format!(
                    "[console]\ndir = \"/t\"\naccess_dir = \"/t\"\n{}",
                    reviewer("")
                ),
                "console.access_dir",
                "never writes",
            ),
            (
                format!(
                    "[console]\nfrom = \"s3://k:s3cr3t@b/p\"\naccess_dir = \"/a\"\n{}",
                    reviewer("")
                ),
                "console.from",
                "credentials",
            ),
            (
                format!("[console]\n{ok}\n{}{}", reviewer(""), reviewer("")),
                "reviewer[1].id",
                "another reviewer",
            ),
            (
                format!("[console]\n{ok}\n{}", reviewer("").replace(HASH, "abc")),
                "reviewer[0].token_sha256",
                "64 hex",
            ),
            (
                format!("[console]\n{ok}\n{}", reviewer("token_env = \"T\"")),
                "reviewer[0].token_sha256",
                "exactly one",
            ),
            (
                format!("[console]\n{ok}\n{}", reviewer("teams = []")),
                "reviewer[0].teams",
                "would see nothing",
            ),
            (
                format!("[console]\n{ok}\n{other}audit = true\n"),
                "reviewer[0].audit",
                "content",
            ),
            (
                format!(
                    "[console]\n{ok}\n{}{}",
                    reviewer(""),
                    reviewer("").replace("alice", "carol")
                ),
                "reviewer[1].token_sha256",
                "own",
            ),
            (
                format!("[console]\n{ok}\nlisten_addr = \"x\"\n{}", reviewer("")),
                "listen_addr",
                "",
            ),
        ];
        for (text, key, reason) in cases {
            let e = file(&text).unwrap_err();
            assert!(e.contains(key) && e.contains(reason), "{text}\n=> {e}");
            assert!(!e.contains("s3cr3t"), "{e}");
        }
        let (_, r) = file(&format!("[console]\n{ok}\n{other}")).unwrap();
        assert_eq!(r[0].token_env.as_deref(), Some("BOB_TOKEN"));
    }
}
