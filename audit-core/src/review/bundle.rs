//! Evidence bundles: one file an auditor takes away, holding the records one filter
//! selects over one window, each with its inclusion proof, the signed heads they lead
//! to, the configuration in force, the public key, a manifest and a report; checked
//! offline with the public key alone. A zstd-compressed tar: any tool opens it.
//!
//! Nothing in it is read from outside its own files: verification needs the bundle and
//! the key the auditor trusts.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    time::SystemTime,
};

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::{
    proof::{self, InclusionProof, ProofError},
    reader::TrailSource,
    search::{self, Query},
};
use crate::{record::EVENT_SCHEMA, AuditError};

pub const KIND: &str = "custody.bundle/v1";
pub const MANIFEST: &str = "manifest.json";
pub const RECORDS: &str = "records.jsonl";
pub const CONFIG: &str = "config-events.jsonl";
pub const PROOFS: &str = "proofs.jsonl";
pub const HEADS: &str = "heads.jsonl";
pub const KEY: &str = "custody.pub";
pub const REPORT: &str = "report.html";
const FILES: [&str; 7] = [MANIFEST, RECORDS, CONFIG, PROOFS, HEADS, KEY, REPORT];

/// A bundle opened for checking is held in memory: these bound what a hostile file can
/// make the checker hold.
pub const MAX_FILE_BYTES: u64 = 1 << 30;
pub const MAX_TOTAL_BYTES: u64 = 2 << 30;

/// What the bundle was asked for: a window and a filter (values as stored: a user that
/// holds an entity is named by its pseudonym).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selection {
    /// RFC 3339; records that started at or after `since` and before `until`.
    pub since: String,
    pub until: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// Every record of the conversation this record belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation: Option<String>,
}

impl Selection {
    /// The filters, named for people, set or not.
    pub fn filters(&self) -> [(&'static str, Option<&str>); 6] {
        [
            ("user", self.user.as_deref()),
            ("team", self.team.as_deref()),
            ("session", self.session.as_deref()),
            ("key id", self.key_id.as_deref()),
            ("trace id", self.trace_id.as_deref()),
            ("conversation", self.conversation.as_deref()),
        ]
    }

    fn window(&self) -> Result<(SystemTime, SystemTime), BundleError> {
        let t = |s: &str| {
            humantime::parse_rfc3339_weak(s)
                .map_err(|_| BundleError::Invalid(format!("`{s}` is not an RFC 3339 time")))
        };
        Ok((t(&self.since)?, t(&self.until)?))
    }

    /// The search that finds the records (the conversation is matched apart).
    fn query(&self) -> Result<Query, BundleError> {
        let (since, until) = self.window()?;
        Ok(Query {
            since: Some(since),
            until: Some(until),
            user: self.user.clone(),
            team: self.team.clone(),
            session: self.session.clone(),
            key_id: self.key_id.clone(),
            trace: self.trace_id.clone(),
            ..Query::default()
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyInfo {
    /// The Ed25519 public key (hex), as in `custody.pub`.
    pub public: String,
    /// SHA-256 of the 32 key bytes (hex): what to compare over the phone.
    pub fingerprint: String,
}

impl KeyInfo {
    pub fn of(key: &VerifyingKey) -> Self {
        Self {
            public: hex::encode(key.as_bytes()),
            fingerprint: hex::encode(Sha256::digest(key.as_bytes())),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub kind: String,
    /// When and by whom the bundle was made, and from which trail.
    pub created: String,
    pub requested_by: String,
    pub trail: String,
    pub selection: Selection,
    pub records: u64,
    pub config_events: u64,
    pub key: KeyInfo,
    /// The trail as verified when the bundle was made: its newest record and checkpoint.
    pub trail_last_seq: u64,
    pub trail_newest_checkpoint: Option<String>,
    /// Whether the selection is complete for the filter over the window, and why (or
    /// why not).
    pub complete: bool,
    pub completeness: String,
    /// SHA-256 (hex) of every other file of the bundle.
    pub files: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error(transparent)]
    Proof(#[from] ProofError),
    #[error("{0}")]
    Invalid(String),
    #[error("bundle: {0}")]
    Io(#[from] std::io::Error),
}

fn invalid(what: impl Into<String>) -> BundleError {
    BundleError::Invalid(what.into())
}

/// What a bundle holds, before it is written or after it is read.
#[derive(Debug, Clone)]
pub struct Contents {
    pub manifest: Manifest,
    /// Record lines as stored, oldest first.
    pub records: Vec<Vec<u8>>,
    /// `config` events in force over the window, as stored, oldest first.
    pub config: Vec<Vec<u8>>,
    pub proofs: Vec<InclusionProof>,
    /// Seal and checkpoint lines the proofs lead to.
    pub heads: Vec<Vec<u8>>,
}

/// What a selection found, before it is proven.
#[derive(Debug, Clone)]
pub struct Selected {
    pub records: Vec<Vec<u8>>,
    pub config: Vec<Vec<u8>>,
    pub complete: bool,
    pub completeness: String,
}

/// Selects what a bundle holds. The trail must be verified by the caller
/// first (the manifest says what it found); `max` bounds the records held in memory.
pub fn collect(
    source: &dyn TrailSource,
    selection: &Selection,
    max: usize,
) -> Result<Selected, BundleError> {
    let (since, _) = selection.window()?;
    let mut query = selection.query()?;
    query.limit = max.saturating_add(1);
    let found = search::search(source, &query)?;
    if found.records.len() > max {
        return Err(invalid(format!(
            "more than {max} records match: narrow the window or the filter, or raise --max-records"
        )));
    }
    let mut records: Vec<Vec<u8>> = found
        .records
        .iter()
        .rev()
        .map(|r| r.get().as_bytes().to_vec())
        .collect();
    if let Some(root) = &selection.conversation {
        let members: std::collections::HashSet<String> = search::conversation(source, root)?
            .iter()
            .filter_map(|r| r["id"].as_str().map(str::to_owned))
            .collect();
        records.retain(|line| id_of(line).is_some_and(|id| members.contains(&id)));
    }
    // The configuration in force: the newest `config` event before the window, and
    // every one inside it.
    let events = search::search(
        source,
        &Query {
            events: true,
            until: query.until,
            limit: 1_000_000,
            ..Query::default()
        },
    )?;
    let mut config: Vec<(Vec<u8>, bool)> = Vec::new();
    for e in events.records.iter().rev() {
        let v: Value = serde_json::from_str(e.get()).map_err(|e| invalid(e.to_string()))?;
        if v["event"]["type"] != "config" {
            continue;
        }
        let before = start_of(&v).is_some_and(|t| t < since);
        if before {
            config.retain(|(_, b)| !b);
        }
        config.push((e.get().as_bytes().to_vec(), before));
    }
    let config = config.into_iter().map(|(l, _)| l).collect();
    let unreadable = found.unreadable + events.unreadable;
    let (complete, why) = if unreadable > 0 {
        (
            false,
            format!("{unreadable} record line(s) of the trail are not readable JSON and could not be matched against the filter"),
        )
    } else {
        (
            true,
            format!(
                "every record of the trail that started in the window was read ({} segment(s) read in full because their index was not vouched for by a seal; the others were skipped only where their signed index shows no record in the window), and all {} that match the filter are here",
                found.untrusted_indexes.len(),
                records.len()
            ),
        )
    };
    Ok(Selected {
        records,
        config,
        complete,
        completeness: why,
    })
}

fn id_of(line: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Id {
        id: String,
    }
    serde_json::from_slice::<Id>(line).ok().map(|i| i.id)
}

fn start_of(v: &Value) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(v["time"]["start"].as_str()?).ok()
}

/// Proves the selected records and config events, and fills in the manifest's counts.
pub fn prove(
    source: &dyn TrailSource,
    mut manifest: Manifest,
    selected: Selected,
) -> Result<Contents, BundleError> {
    let Selected {
        records,
        config,
        complete,
        completeness,
    } = selected;
    manifest.complete = complete;
    manifest.completeness = completeness;
    let mut lines = records.clone();
    lines.extend(config.iter().cloned());
    let proofs = proof::prove_lines(source, &lines)?;
    let mut heads: Vec<Vec<u8>> = Vec::new();
    for p in &proofs {
        if !heads.iter().any(|h| h == p.head.as_bytes()) {
            heads.push(p.head.as_bytes().to_vec());
        }
    }
    manifest.records = records.len() as u64;
    manifest.config_events = config.len() as u64;
    Ok(Contents {
        manifest,
        records,
        config,
        proofs,
        heads,
    })
}

fn jsonl<'a>(lines: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for l in lines {
        out.extend_from_slice(l);
        out.push(b'\n');
    }
    out
}

/// The skippable zstd frame that ends a bundle: the SHA-256 of every byte before it, so
/// that any changed byte is caught, even one a zstd decoder would not look at.
const SEAL_MAGIC: u32 = 0x184D_2A5E;
const SEAL_LEN: usize = 8 + 32;

/// Writes the bundle: every file's SHA-256 goes into the manifest, the manifest first,
/// then the SHA-256 of the compressed archive in a skippable frame. Returns the SHA-256
/// of the whole file (hex), for its maker to record.
pub fn write(
    mut out: impl Write,
    mut c: Contents,
    report_html: &str,
) -> Result<String, BundleError> {
    let proofs: Vec<Vec<u8>> = c
        .proofs
        .iter()
        .map(serde_json::to_vec)
        .collect::<Result<_, _>>()
        .map_err(|e| invalid(e.to_string()))?;
    let files: Vec<(&str, Vec<u8>)> = vec![
        (RECORDS, jsonl(c.records.iter().map(Vec::as_slice))),
        (CONFIG, jsonl(c.config.iter().map(Vec::as_slice))),
        (PROOFS, jsonl(proofs.iter().map(Vec::as_slice))),
        (HEADS, jsonl(c.heads.iter().map(Vec::as_slice))),
        (KEY, format!("{}\n", c.manifest.key.public).into_bytes()),
        (REPORT, report_html.as_bytes().to_vec()),
    ];
    c.manifest.files = files
        .iter()
        .map(|(n, b)| ((*n).to_owned(), hex::encode(Sha256::digest(b))))
        .collect();
    let manifest = serde_json::to_vec_pretty(&c.manifest).map_err(|e| invalid(e.to_string()))?;
    let mtime = humantime::parse_rfc3339_weak(&c.manifest.created)
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let mut z = zstd::stream::Encoder::new(Vec::new(), 3)?;
    z.include_checksum(true)?;
    let mut tar = tar::Builder::new(z);
    for (name, bytes) in
        std::iter::once((MANIFEST, &manifest)).chain(files.iter().map(|(n, b)| (*n, b)))
    {
        let mut h = tar::Header::new_ustar();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(mtime);
        h.set_cksum();
        tar.append_data(&mut h, name, &bytes[..])?;
    }
    let mut bytes = tar.into_inner()?.finish()?;
    let digest = Sha256::digest(&bytes);
    bytes.extend_from_slice(&SEAL_MAGIC.to_le_bytes());
    bytes.extend_from_slice(&32u32.to_le_bytes());
    bytes.extend_from_slice(&digest);
    out.write_all(&bytes)?;
    out.flush()?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

/// A bundle's files, read with bounds: no file over [`MAX_FILE_BYTES`], no more than
/// [`MAX_TOTAL_BYTES`] in all, no name but the bundle's own, nothing after the archive,
/// and the bytes must match the digest that ends them.
pub fn open(bytes: &[u8]) -> Result<BTreeMap<String, Vec<u8>>, BundleError> {
    let body_len = bytes
        .len()
        .checked_sub(SEAL_LEN)
        .ok_or_else(|| invalid("not a bundle: too short"))?;
    let (body, seal) = bytes.split_at(body_len);
    if seal[..4] != SEAL_MAGIC.to_le_bytes() || seal[4..8] != 32u32.to_le_bytes() {
        return Err(invalid(
            "not a bundle, or its end was changed: no digest frame",
        ));
    }
    if Sha256::digest(body)[..] != seal[8..] {
        return Err(invalid(
            "the bundle's bytes were changed: they do not match the digest that ends them",
        ));
    }
    let z = zstd::stream::Decoder::new(body)?;
    let mut archive = tar::Archive::new(z);
    let mut files = BTreeMap::new();
    let mut total = 0u64;
    for entry in archive
        .entries()
        .map_err(|e| invalid(format!("not a bundle (a zstd-compressed tar): {e}")))?
    {
        let entry = entry.map_err(|e| invalid(format!("damaged archive: {e}")))?;
        let name = entry
            .path()
            .map_err(|e| invalid(format!("damaged archive: {e}")))?
            .to_string_lossy()
            .into_owned();
        if !FILES.contains(&name.as_str()) || files.contains_key(&name) {
            return Err(invalid(format!("unexpected file `{name}` in the bundle")));
        }
        let size = entry.header().size().map_err(|e| invalid(e.to_string()))?;
        total += size;
        if size > MAX_FILE_BYTES || total > MAX_TOTAL_BYTES {
            return Err(invalid(format!(
                "`{name}` is larger than a checker accepts"
            )));
        }
        let mut bytes = Vec::new();
        entry.take(MAX_FILE_BYTES).read_to_end(&mut bytes)?;
        files.insert(name, bytes);
    }
    // The archive ends in zeros; anything else after it is not a bundle custody wrote.
    let mut z = archive.into_inner();
    let mut rest = Vec::new();
    (&mut z).take(1 << 20).read_to_end(&mut rest)?;
    if rest.iter().any(|&b| b != 0) {
        return Err(invalid("data after the archive"));
    }
    Ok(files)
}

/// What a checked bundle shows.
#[derive(Debug, Clone)]
pub struct Checked {
    pub manifest: Manifest,
    pub heads: usize,
}

fn lines(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty())
}

/// Checks a bundle's files against `key`: every file is the one the manifest names, the
/// key is the trusted one, every record and config event has a proof that holds and
/// leads to a head in the bundle, every record is inside the window and matches the
/// filter, and the counts agree.
pub fn check(
    files: &BTreeMap<String, Vec<u8>>,
    key: &VerifyingKey,
) -> Result<Checked, BundleError> {
    let file = |name: &str| {
        files
            .get(name)
            .ok_or_else(|| invalid(format!("the bundle has no `{name}`")))
    };
    let manifest: Manifest =
        serde_json::from_slice(file(MANIFEST)?).map_err(|e| invalid(format!("manifest: {e}")))?;
    if manifest.kind != KIND {
        return Err(invalid(format!("not a {KIND} manifest")));
    }
    for name in FILES.iter().filter(|n| **n != MANIFEST) {
        let want = manifest
            .files
            .get(*name)
            .ok_or_else(|| invalid(format!("the manifest does not name `{name}`")))?;
        if hex::encode(Sha256::digest(file(name)?)) != *want {
            return Err(invalid(format!(
                "`{name}` is not the file the manifest names"
            )));
        }
    }
    let trusted = KeyInfo::of(key);
    if manifest.key != trusted || file(KEY)?.trim_ascii() != trusted.public.as_bytes() {
        return Err(invalid(format!(
            "the bundle names key {} (fingerprint {}), not the one trusted here ({})",
            manifest.key.public, manifest.key.fingerprint, trusted.fingerprint
        )));
    }
    let heads: Vec<&[u8]> = lines(file(HEADS)?).collect();
    let mut proven: BTreeMap<&[u8], ()> = BTreeMap::new();
    let proofs: Vec<InclusionProof> = lines(file(PROOFS)?)
        .map(|l| serde_json::from_slice(l).map_err(|e| invalid(format!("a proof: {e}"))))
        .collect::<Result<_, _>>()?;
    for p in &proofs {
        proof::check_inclusion(p, key)
            .map_err(|e| invalid(format!("record seq {}: {e}", p.seq)))?;
        if !heads.contains(&p.head.as_bytes()) {
            return Err(invalid(format!(
                "record seq {}: its proof leads to a head the bundle does not hold",
                p.seq
            )));
        }
        proven.insert(p.record.as_bytes(), ());
    }
    let query = manifest.selection.query()?;
    let records: Vec<&[u8]> = lines(file(RECORDS)?).collect();
    for r in &records {
        if !proven.contains_key(r) {
            return Err(invalid("a record without a proof"));
        }
        let v: Value = serde_json::from_slice(r).map_err(|e| invalid(e.to_string()))?;
        if v["schema"] == EVENT_SCHEMA || !query.matches(&v) {
            return Err(invalid(format!(
                "record {} does not match the bundle's selection",
                v["id"].as_str().unwrap_or("?")
            )));
        }
    }
    let config: Vec<&[u8]> = lines(file(CONFIG)?).collect();
    for c in &config {
        if !proven.contains_key(c) {
            return Err(invalid("a config event without a proof"));
        }
        let v: Value = serde_json::from_slice(c).map_err(|e| invalid(e.to_string()))?;
        if v["event"]["type"] != "config" {
            return Err(invalid(
                "config-events.jsonl holds something that is not a config event",
            ));
        }
    }
    if records.len() as u64 != manifest.records
        || config.len() as u64 != manifest.config_events
        || proofs.len() != records.len() + config.len()
    {
        return Err(invalid("the counts do not agree with the manifest"));
    }
    Ok(Checked {
        heads: heads.len(),
        manifest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar.zst with the digest frame, holding `entries` (name, stated size, bytes).
    fn pack(entries: &[(&str, u64, &[u8])]) -> Vec<u8> {
        let mut tar = Vec::new();
        for (name, size, bytes) in entries {
            let mut h = tar::Header::new_ustar();
            // Written raw: `set_path` refuses `..`, which a hostile archive would not.
            h.as_mut_bytes()[..name.len()].copy_from_slice(name.as_bytes());
            h.set_size(*size);
            h.set_cksum();
            tar.extend_from_slice(h.as_bytes());
            tar.extend_from_slice(bytes);
            tar.resize(tar.len().div_ceil(512) * 512, 0);
        }
        tar.extend_from_slice(&[0; 1024]);
        let mut out = zstd::bulk::compress(&tar, 3).unwrap();
        let digest = Sha256::digest(&out);
        out.extend_from_slice(&SEAL_MAGIC.to_le_bytes());
        out.extend_from_slice(&32u32.to_le_bytes());
        out.extend_from_slice(&digest);
        out
    }

    fn refused(bytes: &[u8]) -> String {
        open(bytes).unwrap_err().to_string()
    }

    #[test]
    fn hostile_archives_are_refused_before_anything_is_held() {
        assert!(open(&pack(&[(MANIFEST, 2, b"{}")])).is_ok());
        // A path out of the bundle, a name it does not hold, the same file twice.
        assert!(refused(&pack(&[("../../etc/cron.d/x", 1, b"x")])).contains("unexpected file"));
        assert!(refused(&pack(&[("notes.txt", 1, b"x")])).contains("unexpected file"));
        assert!(
            refused(&pack(&[(RECORDS, 1, b"x"), (RECORDS, 1, b"y")])).contains("unexpected file")
        );
        // A file claiming more than a checker holds: refused from its header.
        assert!(refused(&pack(&[(RECORDS, MAX_FILE_BYTES + 1, b"")])).contains("larger than"));
        // A compression bomb, 64 MiB in a few KiB: its first block is no tar header,
        // and nothing past it is inflated.
        let bomb = {
            let mut z = zstd::stream::Encoder::new(Vec::new(), 19).unwrap();
            let chunk = vec![1u8; 1 << 20];
            for _ in 0..64 {
                std::io::Write::write_all(&mut z, &chunk).unwrap();
            }
            let mut out = z.finish().unwrap();
            let digest = Sha256::digest(&out);
            out.extend_from_slice(&SEAL_MAGIC.to_le_bytes());
            out.extend_from_slice(&32u32.to_le_bytes());
            out.extend_from_slice(&digest);
            out
        };
        assert!(bomb.len() < 64 * 1024);
        assert!(open(&bomb).is_err());
        // Not a bundle at all, or cut short.
        assert!(refused(b"").contains("too short"));
        assert!(refused(&[0u8; 100]).contains("no digest frame"));
    }
}
