//! Which trail a review command reads: a local directory, or every trail shipped to
//! object storage; and the values its filters take (times, users as stored).

use std::{path::PathBuf, time::SystemTime};

use anyhow::Context;
use clap::Args;
use custody_audit::review::reader::{self, DirSource, TrailSource};

/// Where the trail is: `--dir`, else `[audit] dir` of `--config`, else the default's;
/// or every trail shipped under `--from`, read where it lies.
#[derive(Args, Clone)]
pub struct TrailArgs {
    /// The audit directory.
    #[arg(long, conflicts_with = "from")]
    dir: Option<PathBuf>,
    /// Take the audit directory from this config file.
    #[arg(long, conflicts_with = "from")]
    config: Option<PathBuf>,
    /// Read the trails shipped under this URL (`s3://bucket/prefix`, `gs://`, `az://`,
    /// `file://`) instead of a local directory; credentials from the cloud's environment.
    #[arg(long)]
    from: Option<String>,
    /// Only this source (pod) under `--from`; default: every one.
    #[arg(long, requires = "from")]
    source: Option<String>,
    /// An object-store option, `key=value` (`endpoint=...`, `region=...`); repeatable.
    #[arg(long = "option", value_parser = key_value, requires = "from")]
    options: Vec<(String, String)>,
}

fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("`{s}` is not key=value"))
}

/// The trails a command reads: the local one, or one per source under `--from`.
pub(super) struct Trails {
    pub(super) sources: Vec<Box<dyn TrailSource>>,
    // The object-store sources block on it; dropped after them.
    _runtime: Option<tokio::runtime::Runtime>,
}

impl TrailArgs {
    pub(super) fn open(&self) -> anyhow::Result<Trails> {
        let Some(url) = &self.from else {
            let dir = match &self.dir {
                Some(d) => d.clone(),
                None => super::load_config(self.config.as_ref())?.audit.dir,
            };
            return Ok(Trails {
                sources: vec![Box::new(DirSource(dir))],
                _runtime: None,
            });
        };
        let runtime = super::runtime()?;
        let options = self.options.iter().cloned().collect();
        let sources = custody_proxy::remote::sources(
            url,
            &options,
            self.source.as_deref(),
            runtime.handle(),
        )?;
        anyhow::ensure!(!sources.is_empty(), "no trails under {url}");
        Ok(Trails {
            sources: sources
                .into_iter()
                .map(|s| Box::new(s) as Box<dyn TrailSource>)
                .collect(),
            _runtime: Some(runtime),
        })
    }
}

impl TrailArgs {
    /// How `user` is stored: itself, or (holding an entity) its pseudonym under the
    /// deployment's fingerprint key.
    pub(super) fn user_token(
        &self,
        user: &str,
        key_file: Option<&std::path::Path>,
    ) -> anyhow::Result<String> {
        let plain = custody_audit::redact::Redactor::builtin()
            .find(user)
            .is_empty();
        if plain {
            return Ok(user.to_owned());
        }
        let path = match (key_file, &self.dir, &self.from) {
            (Some(k), _, _) => k.to_owned(),
            (None, Some(d), _) => d.join("fingerprint.key"),
            (None, None, None) => {
                let audit = super::load_config(self.config.as_ref())?.audit;
                audit
                    .fingerprint_key_file
                    .unwrap_or_else(|| audit.dir.join("fingerprint.key"))
            }
            (None, None, Some(_)) => anyhow::bail!(
                "--user `…` holds an entity (an e-mail address...), stored pseudonymized: pass --key-file with the deployment's fingerprint key to search for it"
            ),
        };
        let key = custody_audit::fingerprint::load_key(&path).with_context(|| {
            "--user holds an entity, stored pseudonymized: its form needs the deployment's fingerprint key (--key-file)"
        })?;
        Ok(custody_audit::assemble::identity_token(
            &custody_audit::fingerprint::Fingerprinter::new(key),
            user,
        ))
    }
}

impl Trails {
    /// The trail holding record `id`, and its line.
    pub(super) fn find(&self, id: &str) -> anyhow::Result<(&dyn TrailSource, Vec<u8>)> {
        for source in &self.sources {
            match reader::find_by_id(source.as_ref(), id) {
                Ok(line) => return Ok((source.as_ref(), line)),
                Err(custody_audit::AuditError::NotFound(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(custody_audit::AuditError::NotFound(id.to_owned()).into())
    }
}

pub(super) fn when(s: &str) -> anyhow::Result<SystemTime> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(t);
    }
    let age = humantime::parse_duration(s)
        .with_context(|| format!("`{s}` is neither an RFC 3339 time nor an age like 1h"))?;
    SystemTime::now()
        .checked_sub(age)
        .context("age reaches before 1970")
}
