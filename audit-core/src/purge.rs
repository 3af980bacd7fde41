//! Purging content from sealed segments: content retention and data subjects' requests.
//!
//! A purge rewrites a sealed segment with the chosen records' bodies in their purged
//! form (see [`crate::content`]): every record's chain hash, every seal and every tree
//! head stay as they were; only the segment's bytes (and so the SHA-256 its seal holds)
//! change. The writer states each rewrite, old and new digests, in a `purge` event, and
//! covers it with a checkpoint, before the rewritten file replaces the old one: verify
//! then accepts the new bytes on the event's word, and a crash in between leaves the
//! content in place, never an unexplained change.

use std::{
    fs,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::{
    index::{self, EventRef, SegmentIndex},
    segment::{self, BlockHeader},
    signing, AuditError,
};

/// Which records lose their bodies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// Every record of a sealed segment whose newest record started before this (Unix ms).
    Before(i64),
    /// Records whose `client.user` or `client.end_user` is this.
    User(String),
    /// Records that carry this pseudonym (`[ENTITY:8 hex]`) anywhere.
    Pseudonym(String),
}

impl Selector {
    /// A pseudonym as redaction writes it: `[NAME:` 8 hex digits `]`.
    pub fn pseudonym(token: &str) -> Option<Self> {
        let inner = token.strip_prefix('[')?.strip_suffix(']')?;
        let (name, hex) = inner.rsplit_once(':')?;
        let ok = !name.is_empty()
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && hex.len() == 8
            && hex.bytes().all(|b| b.is_ascii_hexdigit());
        ok.then(|| Self::Pseudonym(token.to_owned()))
    }

    fn segment_eligible(&self, seal: &signing::Seal) -> bool {
        match self {
            Self::Before(cutoff) => seal.records > 0 && seal.last_ms < *cutoff,
            Self::User(_) | Self::Pseudonym(_) => true,
        }
    }

    fn selects(&self, line: &[u8]) -> bool {
        #[derive(Deserialize)]
        struct Who {
            #[serde(default)]
            client: Option<Client>,
        }
        #[derive(Deserialize)]
        struct Client {
            #[serde(default)]
            user: Option<String>,
            #[serde(default)]
            end_user: Option<String>,
        }
        match self {
            Self::Before(_) => true,
            Self::Pseudonym(p) => memchr::memmem::find(line, p.as_bytes()).is_some(),
            Self::User(u) => {
                // Most lines do not hold the name at all: no parse for those.
                let quoted = serde_json::to_string(u).unwrap_or_default();
                memchr::memmem::find(line, quoted.as_bytes()).is_some()
                    && serde_json::from_slice::<Who>(line).is_ok_and(|w| {
                        w.client.is_some_and(|c| {
                            c.user.as_deref() == Some(u) || c.end_user.as_deref() == Some(u)
                        })
                    })
            }
        }
    }
}

/// A sealed segment rewritten with bodies purged, waiting beside the original.
#[derive(Debug)]
pub struct Rewritten {
    pub number: u64,
    pub path: PathBuf,
    tmp: PathBuf,
    /// Hash of the segment's seal line (unchanged).
    pub seal: String,
    /// SHA-256 of the bytes before the seal, before and after the rewrite.
    pub before: String,
    pub after: String,
    /// The rewritten segment's index and its digest (as the seal would hold it).
    index: SegmentIndex,
    pub index_sha256: String,
    /// Records that lost bodies, and bodies purged.
    pub records: u64,
    pub bodies: u64,
    /// No body is left in the segment.
    pub complete: bool,
}

impl Rewritten {
    /// How the purge event names it.
    pub fn statement(&self) -> serde_json::Value {
        serde_json::json!({
            "segment": segment::segment_file_name(self.number),
            "seal": self.seal,
            "before": self.before,
            "after": self.after,
            "index_sha256": self.index_sha256,
            "records": self.records,
            "bodies": self.bodies,
        })
    }

    /// Puts the rewritten segment in place of the original, and its index beside it
    /// pointing at the event that states the rewrite.
    pub fn install(mut self, event: EventRef) -> Result<(), AuditError> {
        let io = |p: &Path| {
            let p = p.to_owned();
            move |source| AuditError::Io { path: p, source }
        };
        fs::rename(&self.tmp, &self.path).map_err(io(&self.path))?;
        if let Some(dir) = self.path.parent() {
            fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io(dir))?;
        }
        self.index.purged_by = Some(event);
        self.index.content_purged = self.complete;
        if let Err(e) = index::write(&self.path, &self.index) {
            tracing::warn!(error = %e, "segment index not written after a purge");
        }
        Ok(())
    }

    /// Removes the rewritten file (the purge was not recorded).
    pub fn discard(self) {
        let _ = fs::remove_file(&self.tmp);
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AuditError + '_ {
    move |source| AuditError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Rewrites the sealed segment at `path` with the bodies `selector` chooses purged, into
/// a file beside it. `None` when the segment is not sealed, not eligible, or has nothing
/// to purge (then, if nothing at all is left to purge, its index says so, so that
/// content retention does not read it again).
pub fn rewrite(
    path: &Path,
    number: u64,
    selector: &Selector,
    compressor: &mut zstd::bulk::Compressor<'_>,
) -> Result<Option<Rewritten>, AuditError> {
    let bytes = fs::read(path).map_err(io(path))?;
    let parsed = segment::parse_segment(&bytes).map_err(|source| AuditError::Format {
        path: path.to_owned(),
        source,
    })?;
    let Some(seal) = parsed.seal.as_ref() else {
        return Ok(None);
    };
    if parsed.tail_error.is_some() || !selector.segment_eligible(&seal.seal) {
        return Ok(None);
    }
    let (mut records, mut bodies, mut left) = (0u64, 0u64, 0u64);
    let mut out =
        bytes[..parsed.blocks.first().map_or(seal.offset, |b| b.offset) as usize].to_vec();
    for block in &parsed.blocks {
        let mut raw = Vec::with_capacity(block.records.len());
        for line in block.lines() {
            let (_, found) =
                segment::check_line(line).map_err(|w| format_err(path, block.offset, w))?;
            match selector
                .selects(line)
                .then(|| segment::purge_line(line))
                .transpose()
                .map_err(|w| format_err(path, block.offset, w))?
                .flatten()
            {
                Some(purged) => {
                    records += 1;
                    bodies += u64::from(found.present);
                    raw.extend_from_slice(&purged);
                }
                None => {
                    left += u64::from(found.present);
                    raw.extend_from_slice(line);
                }
            }
            raw.push(b'\n');
        }
        let h = &block.header;
        let frame = BlockHeader::encode_block(
            h.first_seq,
            h.count,
            h.first_ms,
            h.last_ms,
            &raw,
            compressor,
        )
        .map_err(io(path))?;
        out.extend_from_slice(&frame);
    }
    if records == 0 {
        if left == 0 {
            mark_clean(path, number, &parsed, bytes.len() as u64);
        }
        return Ok(None);
    }
    let after = hex::encode(Sha256::digest(&out));
    let before = hex::encode(Sha256::digest(&bytes[..seal.offset as usize]));
    let seal_at = out.len() as u64;
    out.extend_from_slice(&bytes[seal.offset as usize..]);
    let reparsed = segment::parse_segment(&out).map_err(|source| AuditError::Format {
        path: path.to_owned(),
        source,
    })?;
    let mut idx = index::from_parsed(number, &reparsed, out.len() as u64);
    idx.seal_at = Some(seal_at);
    let tmp = path.with_extension("seg.purge");
    index::write_private(&tmp, &out)
        .and_then(|()| fs::File::open(&tmp)?.sync_all())
        .map_err(io(&tmp))?;
    Ok(Some(Rewritten {
        number,
        path: path.to_owned(),
        tmp,
        seal: signing::line_hash(&seal.line),
        before,
        after,
        index_sha256: index::digest(&idx),
        index: idx,
        records,
        bodies,
        complete: left == 0,
    }))
}

/// Notes in a segment's index that no body is left in it to purge.
fn mark_clean(path: &Path, number: u64, parsed: &segment::ParsedSegment, len: u64) {
    let mut idx = index::load(path).unwrap_or_else(|| {
        let mut i = index::from_parsed(number, parsed, len);
        i.seal_at = parsed.seal.as_ref().map(|s| s.offset);
        i
    });
    if !idx.content_purged {
        idx.content_purged = true;
        if let Err(e) = index::write(path, &idx) {
            tracing::warn!(error = %e, "segment index not written");
        }
    }
}

fn format_err(path: &Path, offset: u64, what: &str) -> AuditError {
    AuditError::Format {
        path: path.to_owned(),
        source: segment::FormatError {
            offset,
            what: what.to_owned(),
        },
    }
}

/// Whether content retention can pass over a segment without reading it: its index
/// (a hint only) says nothing is left to purge.
pub fn known_clean(path: &Path) -> bool {
    index::load(path).is_some_and(|i| i.content_purged)
}
