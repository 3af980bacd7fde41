//! Signed statements about the trail: segment seals and checkpoints.
//!
//! Both are one line of compact JSON that ends in `"sig":"<128 hex>"}`: an Ed25519
//! signature over the line with those 128 hex digits written as `0`s. An unsigned
//! statement (signing off) carries 128 zeros and `"key":null`. The hash of a statement
//! (what the next one links to as `prev`) is the SHA-256 of the whole line as stored.
//! See `docs/segment-format.md` for the fields.

use std::{fs, path::Path};

pub use ed25519_dalek::VerifyingKey;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{
    merkle::{Hash, Range},
    AuditError,
};

const SIG_HEX: usize = 128;
const SIG_TAIL: &[u8] = b"\"}";
const SIG_KEY: &[u8] = b"\"sig\":\"";

/// A segment's seal, written as its last frame when it is closed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seal {
    pub kind: String,
    pub v: u32,
    pub segment: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub records: u64,
    pub first_ms: i64,
    pub last_ms: i64,
    /// Chain hash of the segment's last record (hex).
    pub head: String,
    /// SHA-256 of every byte of the segment before the seal frame (hex).
    pub segment_sha256: String,
    /// Hash of the previous segment's seal line (hex; zeros for the first).
    pub prev_seal: String,
    /// The segment was sealed at start-up after a crash, not at rotation or shutdown.
    pub recovered: bool,
    pub time: String,
    /// SHA-256 (hex) of the segment's index as [`crate::index::digest`] computes it:
    /// search trusts an index only when its seal vouches for it. Absent in seals written
    /// before it was added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_sha256: Option<String>,
    /// The Merkle tree over every record's chain hash up to this statement's last
    /// record. Absent in statements written before it was added, and in trails whose
    /// start was deleted before it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tree: Option<TreeHead>,
    /// Public key (hex) that signed it, or null when unsigned.
    pub key: Option<String>,
    pub sig: String,
}

/// A checkpoint: the state of the whole trail at a moment, appended to `checkpoints.log`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub kind: String,
    pub v: u32,
    pub time: String,
    /// The newest segment and how many of its bytes this checkpoint covers.
    pub segment: u64,
    pub segment_bytes: u64,
    pub segment_sha256: String,
    /// The newest record covered (0 for none) and its chain hash.
    pub last_seq: u64,
    pub head: String,
    /// Hash of the newest seal line so far (zeros for none).
    pub seal: String,
    /// Hash of the previous checkpoint line (zeros for the first).
    pub prev: String,
    /// The Merkle tree over every record's chain hash up to this statement's last
    /// record. Absent in statements written before it was added, and in trails whose
    /// start was deleted before it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tree: Option<TreeHead>,
    pub key: Option<String>,
    pub sig: String,
}

/// A signed tree head (RFC 6962): leaf `seq - 1` of the tree is
/// `SHA-256(0x00 || chain hash of record seq)`, for every record from seq 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeHead {
    /// Leaves: the records covered.
    pub size: u64,
    /// The tree head (hex).
    pub root: String,
    /// Heads of the perfect subtrees that make up the tree, largest first (hex): what a
    /// writer needs to grow it after a restart, and a verifier to start after retention.
    pub frontier: Vec<String>,
}

impl TreeHead {
    pub fn of(range: &Range) -> Option<Self> {
        Some(Self {
            size: range.end(),
            root: hex::encode(range.root()?),
            frontier: range.frontier().iter().map(hex::encode).collect(),
        })
    }

    /// The tree as a range that grows, when the frontier is well formed and gives the root.
    pub fn range(&self) -> Option<Range> {
        let heads = self
            .frontier
            .iter()
            .map(|h| parse_hash(h))
            .collect::<Option<Vec<_>>>()?;
        let range = Range::from_frontier(self.size, &heads)?;
        (range.root().map(hex::encode).as_deref() == Some(self.root.as_str())).then_some(range)
    }

    /// The root as bytes.
    pub fn root_hash(&self) -> Option<Hash> {
        parse_hash(&self.root)
    }
}

/// 64 hex digits as a hash.
pub fn parse_hash(s: &str) -> Option<Hash> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

pub const ZERO_HEX: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The key that signs, if signing is on.
pub struct SignerKey {
    key: SigningKey,
    public_hex: String,
}

impl SignerKey {
    /// Reads a private key file (hex of the 32-byte seed).
    pub fn load(path: &Path) -> Result<Self, AuditError> {
        let text = fs::read_to_string(path).map_err(|source| AuditError::Io {
            path: path.to_owned(),
            source,
        })?;
        let bad = |reason| AuditError::BadKeyFile {
            path: path.to_owned(),
            reason,
        };
        let mut seed = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut seed).map_err(|_| bad("not 64 hex digits"))?;
        Ok(Self::from_seed(seed))
    }

    pub fn from_seed(seed: [u8; 32]) -> Self {
        let key = SigningKey::from_bytes(&seed);
        let public_hex = hex::encode(key.verifying_key().as_bytes());
        Self { key, public_hex }
    }

    pub fn public_hex(&self) -> &str {
        &self.public_hex
    }
}

/// Writes a new key pair: `<dir>/<name>.key` (0600, hex seed) and `<dir>/<name>.pub` (hex).
pub fn keygen(
    dir: &Path,
    name: &str,
) -> Result<(std::path::PathBuf, std::path::PathBuf), AuditError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| AuditError::Io { path, source }
    };
    fs::create_dir_all(dir).map_err(io(dir))?;
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| io(dir)(std::io::Error::other(e.to_string())))?;
    let k = SignerKey::from_seed(seed);
    let private = dir.join(format!("{name}.key"));
    let public = dir.join(format!("{name}.pub"));
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(&private).map_err(io(&private))?;
    std::io::Write::write_all(&mut f, format!("{}\n", hex::encode(seed)).as_bytes())
        .map_err(io(&private))?;
    fs::write(&public, format!("{}\n", k.public_hex)).map_err(io(&public))?;
    Ok((private, public))
}

/// Reads a public key file (hex).
pub fn load_public(path: &Path) -> Result<VerifyingKey, AuditError> {
    let text = fs::read_to_string(path).map_err(|source| AuditError::Io {
        path: path.to_owned(),
        source,
    })?;
    parse_public(text.trim()).ok_or_else(|| AuditError::BadKeyFile {
        path: path.to_owned(),
        reason: "not an Ed25519 public key in hex",
    })
}

pub fn parse_public(hex_key: &str) -> Option<VerifyingKey> {
    let mut b = [0u8; 32];
    hex::decode_to_slice(hex_key, &mut b).ok()?;
    VerifyingKey::from_bytes(&b).ok()
}

/// Serializes a statement (whose `sig` is ignored) and signs it in place.
pub fn sign_line<T: Serialize>(
    statement: &T,
    key: Option<&SignerKey>,
) -> Result<Vec<u8>, serde_json::Error> {
    let mut line = serde_json::to_vec(statement)?;
    let Some(at) = sig_position(&line) else {
        return Err(serde::ser::Error::custom(
            "statement does not end with its signature",
        ));
    };
    line[at..at + SIG_HEX].fill(b'0');
    if let Some(k) = key {
        let sig = k.key.sign(&line);
        line[at..at + SIG_HEX].copy_from_slice(hex::encode(sig.to_bytes()).as_bytes());
    }
    Ok(line)
}

/// Why a statement's signature does not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SigCheck {
    /// Signed by the key given, and valid.
    Valid,
    /// Unsigned (all zeros).
    Unsigned,
    /// Signed by a key other than the trusted one.
    OtherKey(String),
    /// The signature does not verify.
    Invalid,
}

/// Checks a statement line's signature: against `trusted` if given, else against the
/// key it names (which proves only that the line is unchanged since that key signed).
pub fn check_line(
    line: &[u8],
    stated_key: Option<&str>,
    trusted: Option<&VerifyingKey>,
) -> SigCheck {
    let Some(at) = sig_position(line) else {
        return SigCheck::Invalid;
    };
    let sig_hex = &line[at..at + SIG_HEX];
    if sig_hex.iter().all(|&c| c == b'0') {
        return SigCheck::Unsigned;
    }
    let mut sig = [0u8; 64];
    if hex::decode_to_slice(sig_hex, &mut sig).is_err() {
        return SigCheck::Invalid;
    }
    let key = match (trusted, stated_key) {
        (Some(t), Some(s)) if hex::encode(t.as_bytes()) != s => {
            return SigCheck::OtherKey(s.to_owned())
        }
        (Some(t), _) => *t,
        (None, Some(s)) => match parse_public(s) {
            Some(k) => k,
            None => return SigCheck::Invalid,
        },
        (None, None) => return SigCheck::Invalid,
    };
    let mut msg = line.to_vec();
    msg[at..at + SIG_HEX].fill(b'0');
    match key.verify(&msg, &Signature::from_bytes(&sig)) {
        Ok(()) => SigCheck::Valid,
        Err(_) => SigCheck::Invalid,
    }
}

pub fn line_hash(line: &[u8]) -> String {
    hex::encode(Sha256::digest(line))
}

fn sig_position(line: &[u8]) -> Option<usize> {
    let n = line.len();
    if n < SIG_HEX + SIG_KEY.len() + SIG_TAIL.len() || !line.ends_with(SIG_TAIL) {
        return None;
    }
    let at = n - SIG_TAIL.len() - SIG_HEX;
    (&line[at - SIG_KEY.len()..at] == SIG_KEY).then_some(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint() -> Checkpoint {
        Checkpoint {
            kind: "checkpoint".into(),
            v: 1,
            time: "2026-11-29T00:00:00.000Z".into(),
            segment: 1,
            segment_bytes: 100,
            segment_sha256: ZERO_HEX.into(),
            last_seq: 3,
            head: ZERO_HEX.into(),
            seal: ZERO_HEX.into(),
            prev: ZERO_HEX.into(),
            tree: None,
            key: None,
            sig: "0".repeat(128),
        }
    }

    #[test]
    fn sign_and_check() {
        let k = SignerKey::from_seed([7; 32]);
        let other = SignerKey::from_seed([8; 32]);
        let mut c = checkpoint();
        c.key = Some(k.public_hex().to_owned());
        let line = sign_line(&c, Some(&k)).unwrap();
        let trusted = parse_public(k.public_hex()).unwrap();
        assert_eq!(
            check_line(&line, c.key.as_deref(), Some(&trusted)),
            SigCheck::Valid
        );
        assert_eq!(check_line(&line, c.key.as_deref(), None), SigCheck::Valid);
        let wrong = parse_public(other.public_hex()).unwrap();
        assert!(matches!(
            check_line(&line, c.key.as_deref(), Some(&wrong)),
            SigCheck::OtherKey(_)
        ));
        let mut tampered = line.clone();
        let i = tampered.iter().position(|&b| b == b'3').unwrap();
        tampered[i] = b'4';
        assert_eq!(
            check_line(&tampered, c.key.as_deref(), Some(&trusted)),
            SigCheck::Invalid
        );
        // Re-signed by another key but claiming the trusted one: invalid.
        let forged = sign_line(&c, Some(&other)).unwrap();
        assert_eq!(
            check_line(&forged, c.key.as_deref(), Some(&trusted)),
            SigCheck::Invalid
        );
        let unsigned = sign_line(&checkpoint(), None).unwrap();
        assert_eq!(
            check_line(&unsigned, None, Some(&trusted)),
            SigCheck::Unsigned
        );
    }
}
