//! `client.key_id`: a keyed fingerprint of the credential a client presented, so records
//! can be grouped by key without the key ever being stored.

use std::{
    fs::{self, OpenOptions},
    io::Write,
    path::Path,
};

use hmac::{Hmac, Mac};
use http::HeaderName;
use sha2::Sha256;

use crate::AuditError;

/// Request headers that carry client credentials; their values are never recorded.
pub const CREDENTIAL_HEADERS: [HeaderName; 4] = [
    http::header::AUTHORIZATION,
    HeaderName::from_static("x-api-key"),
    HeaderName::from_static("api-key"),
    HeaderName::from_static("x-goog-api-key"),
];

/// HMAC-SHA-256 keyed with the deployment secret.
#[derive(Clone)]
pub struct Fingerprinter {
    key: Vec<u8>,
}

impl Fingerprinter {
    pub fn new(key: Vec<u8>) -> Self {
        Self { key }
    }

    /// Loads the secret from `path` (hex), generating it (0600) if the file is missing.
    pub fn load_or_create(path: &Path) -> Result<Self, AuditError> {
        load_or_create_key(path).map(Self::new)
    }

    /// A key for another purpose, derived from the secret (HMAC of `label`).
    pub fn derive(&self, label: &str) -> Vec<u8> {
        let mut mac = match Hmac::<Sha256>::new_from_slice(&self.key) {
            Ok(m) => m,
            Err(_) => return Vec::new(),
        };
        mac.update(label.as_bytes());
        mac.finalize().into_bytes().to_vec()
    }

    /// `key_` and the first 16 hex digits of HMAC(secret, credential).
    pub fn key_id(&self, credential: &[u8]) -> String {
        // HMAC accepts keys of any length; this cannot fail.
        let mut mac = match Hmac::<Sha256>::new_from_slice(&self.key) {
            Ok(m) => m,
            Err(_) => return String::from("key_unavailable"),
        };
        mac.update(credential);
        let out = mac.finalize().into_bytes();
        format!("key_{}", hex::encode(&out[..8]))
    }
}

/// Reads an existing hex secret of at least 16 bytes (for reviewers: never creates one).
/// A key file is a few dozen bytes: a device or a huge file given by mistake is read no
/// further than 4 KiB, and is then not hex.
pub fn load_key(path: &Path) -> Result<Vec<u8>, AuditError> {
    use std::io::Read;
    let io = |source| AuditError::Io {
        path: path.to_owned(),
        source,
    };
    let mut text = String::new();
    crate::review::reader::open_regular(path)?
        .take(4096)
        .read_to_string(&mut text)
        .map_err(io)?;
    parse_key(path, &text)
}

fn parse_key(path: &Path, text: &str) -> Result<Vec<u8>, AuditError> {
    let key = hex::decode(text.trim()).map_err(|_| AuditError::BadKeyFile {
        path: path.to_owned(),
        reason: "not hex",
    })?;
    if key.len() < 16 {
        return Err(AuditError::BadKeyFile {
            path: path.to_owned(),
            reason: "shorter than 16 bytes",
        });
    }
    Ok(key)
}

/// Reads a hex secret of at least 16 bytes from `path`, or generates 32 random bytes
/// into it (mode 0600) if the file does not exist.
pub fn load_or_create_key(path: &Path) -> Result<Vec<u8>, AuditError> {
    let io = |source| AuditError::Io {
        path: path.to_owned(),
        source,
    };
    match fs::read_to_string(path) {
        Ok(text) => parse_key(path, &text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut key = vec![0u8; 32];
            getrandom::fill(&mut key).map_err(|e| io(std::io::Error::other(e.to_string())))?;
            let mut opts = OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            let mut f = opts.open(path).map_err(io)?;
            f.write_all(hex::encode(&key).as_bytes()).map_err(io)?;
            f.sync_all().map_err(io)?;
            tracing::info!(path = %path.display(), "generated a new key");
            Ok(key)
        }
        Err(e) => Err(io(e)),
    }
}

/// The credential token in a header value: what follows `Bearer `/`Basic `, or the value.
pub fn credential_token(value: &[u8]) -> &[u8] {
    for scheme in [&b"bearer "[..], b"basic "] {
        if value.len() > scheme.len() && value[..scheme.len()].eq_ignore_ascii_case(scheme) {
            return trim(&value[scheme.len()..]);
        }
    }
    trim(value)
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &v[start..end]
}

/// The redaction engine for a configuration, loading (or creating) the pseudonym key
/// only when some entity is pseudonymized.
pub fn redactor_for(
    config: &custody_config::Config,
) -> Result<crate::redact::Redactor, AuditError> {
    let r = &config.redaction;
    let pseudonymizes = r.default_mode == custody_config::Mode::Pseudonymize
        || r.entities
            .values()
            .any(|m| *m == custody_config::Mode::Pseudonymize)
        || r.custom
            .iter()
            .any(|c| c.mode == Some(custody_config::Mode::Pseudonymize));
    let key = if pseudonymizes {
        let path = r
            .pseudonym_key_file
            .clone()
            .unwrap_or_else(|| config.audit.dir.join("pseudonym.key"));
        Some(load_or_create_key(&path)?)
    } else {
        None
    };
    Ok(crate::redact::Redactor::new(r, key)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_key_same_id_and_file_is_reused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("fp.key");
        let a = Fingerprinter::load_or_create(&p).unwrap();
        let b = Fingerprinter::load_or_create(&p).unwrap();
        assert_eq!(a.key_id(b"sk-1"), b.key_id(b"sk-1"));
        assert_ne!(a.key_id(b"sk-1"), a.key_id(b"sk-2"));
        assert_eq!(credential_token(b"Bearer  sk-1 "), b"sk-1");
        assert_eq!(credential_token(b"sk-1"), b"sk-1");
    }
}
