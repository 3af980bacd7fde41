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
    sync::atomic::{AtomicBool, Ordering},
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
    /// Renamed into place (else dropping it removes the file).
    installed: bool,
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
        self.installed = true;
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
    pub fn discard(self) {}
}

impl Drop for Rewritten {
    fn drop(&mut self) {
        if !self.installed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AuditError + '_ {
    move |source| AuditError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Rewrites the sealed segment at `path` with the bodies `selector` chooses purged, into
/// a file beside it, one block at a time: memory is a block whatever the segment holds,
/// blocks without a purged record are copied as they are, and nothing is written until
/// a block changes. `None` when the segment is not sealed, not eligible, or has nothing
/// to purge (then, if nothing at all is left to purge, its index says so, so that
/// content retention does not read it again). `stop` abandons it between blocks.
pub fn rewrite(
    path: &Path,
    number: u64,
    selector: &Selector,
    compressor: &mut zstd::bulk::Compressor<'_>,
    stop: &AtomicBool,
) -> Result<Option<Rewritten>, AuditError> {
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    if let Selector::Before(cutoff) = selector {
        // A hint, to pass over recent segments without reading them; the seal decides.
        if index::load(path).is_some_and(|i| i.last_ms >= *cutoff) {
            return Ok(None);
        }
    }
    let fmt = |source| AuditError::Format {
        path: path.to_owned(),
        source,
    };
    if !matches!(selector, Selector::Before(_)) && !selects_any(path, selector, stop)? {
        // Most segments do not hold the person: read, not re-hashed nor rewritten.
        return Ok(None);
    }
    let file = crate::review::reader::open_regular(path)?;
    let raw = file.try_clone().map_err(io(path))?;
    let mut frames = segment::FrameReader::new(std::io::BufReader::new(file), true).map_err(fmt)?;
    let header = frames.header().clone();
    let tmp = path.with_extension("seg.purge");
    let mut out = Output {
        tmp: tmp.clone(),
        created: false,
        file: None,
        hasher: Sha256::new(),
        len: frames.offset(),
    };
    let (mut records, mut bodies, mut left) = (0u64, 0u64, 0u64);
    let mut facts = index::Facts::default();
    let mut blocks = Vec::new();
    let mut block_raw = Vec::new();
    let (before, seal) = loop {
        if stop.load(Ordering::Relaxed) {
            return Err(AuditError::Writer(
                "custody is stopping; the purge was left".into(),
            ));
        }
        let Some((at, frame)) = frames.next_frame().map_err(fmt)? else {
            return Ok(None);
        };
        let block = match frame {
            segment::Frame::Seal(seal, before) => break (before, seal),
            segment::Frame::Block(b) => b,
        };
        let next = frames.offset();
        block_raw.clear();
        let mut changed = false;
        for line in block.lines() {
            let (_, found) = segment::check_line(line).map_err(|w| format_err(path, at, w))?;
            let purged = if selector.selects(line) {
                segment::purge_line(line).map_err(|w| format_err(path, at, w))?
            } else {
                None
            };
            let kept = match &purged {
                Some(p) => {
                    records += 1;
                    bodies += u64::from(found.present);
                    changed = true;
                    p.as_slice()
                }
                None => {
                    left += u64::from(found.present);
                    line
                }
            };
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(kept) {
                facts.add_value(&v);
            }
            block_raw.extend_from_slice(kept);
            block_raw.push(b'\n');
        }
        let h = &block.header;
        if matches!(selector, Selector::Before(cutoff) if h.last_ms >= *cutoff) {
            // Not eligible after all (the seal would say so too): stop reading.
            return Ok(None);
        }
        let offset = out.len;
        if changed {
            if out.file.is_none() {
                // The first change: what came before is copied as it is.
                out.start(&raw, at).map_err(io(&tmp))?;
            }
            let frame = BlockHeader::encode_block(
                h.first_seq,
                h.count,
                h.first_ms,
                h.last_ms,
                &block_raw,
                compressor,
            )
            .map_err(io(path))?;
            out.write(&frame).map_err(io(&tmp))?;
        } else if out.file.is_some() {
            let mut frame = vec![0u8; (next - at) as usize];
            raw.read_exact_at(&mut frame, at).map_err(io(path))?;
            out.write(&frame).map_err(io(&tmp))?;
        } else {
            out.len += next - at;
        }
        blocks.push(index::BlockEntry {
            offset,
            len: out.len - offset,
            first_seq: h.first_seq,
            count: h.count,
            first_ms: h.first_ms,
            last_ms: h.last_ms,
        });
    };
    let count: u64 = blocks.iter().map(|b| u64::from(b.count)).sum();
    let mut idx = SegmentIndex {
        v: 1,
        segment: number,
        segment_bytes: 0,
        first_seq: header.first_seq,
        last_seq: (header.first_seq + count).saturating_sub(1),
        first_ms: blocks.iter().map(|b| b.first_ms).min().unwrap_or(0),
        last_ms: blocks.iter().map(|b| b.last_ms).max().unwrap_or(0),
        blocks,
        facts,
        seal_at: Some(out.len),
        purged_by: None,
        content_purged: false,
    };
    if !selector.segment_eligible(&seal.seal) || records == 0 {
        if left == 0 && records == 0 {
            idx.segment_bytes = idx.seal_at.unwrap_or(0) + 8 + seal.line.len() as u64;
            mark_clean(path, idx);
        }
        return Ok(None);
    }
    let after = hex::encode(out.hasher.clone().finalize());
    out.write(&segment::encode_seal(&seal.line))
        .map_err(io(&tmp))?;
    let Some(mut file) = out.file.take() else {
        return Ok(None);
    };
    file.flush()
        .and_then(|()| file.get_ref().sync_all())
        .map_err(io(&tmp))?;
    // From here the rewrite owns the file.
    out.created = false;
    idx.segment_bytes = out.len;
    Ok(Some(Rewritten {
        number,
        path: path.to_owned(),
        tmp,
        installed: false,
        seal: signing::line_hash(&seal.line),
        before: hex::encode(before),
        after,
        index_sha256: index::digest(&idx),
        index: idx,
        records,
        bodies,
        complete: left == 0,
    }))
}

/// Whether any record of the segment is one `selector` chooses.
fn selects_any(path: &Path, selector: &Selector, stop: &AtomicBool) -> Result<bool, AuditError> {
    let file = crate::review::reader::open_regular(path)?;
    let fmt = |source| AuditError::Format {
        path: path.to_owned(),
        source,
    };
    let mut frames = segment::FrameReader::new(std::io::BufReader::new(file), true).map_err(fmt)?;
    while let Some((_, frame)) = frames.next_frame().map_err(fmt)? {
        if stop.load(Ordering::Relaxed) {
            return Err(AuditError::Writer(
                "custody is stopping; the purge was left".into(),
            ));
        }
        if let segment::Frame::Block(b) = frame {
            if b.lines().any(|l| selector.selects(l)) {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// The rewritten file as it is written: opened at the first change, hashed as it goes,
/// removed if the rewrite stops short (an error, a stop, a segment not eligible).
struct Output {
    tmp: PathBuf,
    created: bool,
    file: Option<std::io::BufWriter<fs::File>>,
    hasher: Sha256,
    len: u64,
}

impl Drop for Output {
    fn drop(&mut self) {
        if self.created {
            drop(self.file.take());
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

impl Output {
    /// Opens the file and copies the original's first `upto` bytes into it.
    fn start(&mut self, original: &fs::File, upto: u64) -> std::io::Result<()> {
        use std::os::unix::fs::{FileExt, OpenOptionsExt};
        let f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&self.tmp)?;
        self.created = true;
        self.file = Some(std::io::BufWriter::with_capacity(1 << 20, f));
        self.len = 0;
        let mut buf = vec![0u8; 1 << 20];
        let mut at = 0;
        while at < upto {
            let n = (upto - at).min(buf.len() as u64) as usize;
            original.read_exact_at(&mut buf[..n], at)?;
            self.write(&buf[..n])?;
            at += n as u64;
        }
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        if let Some(f) = self.file.as_mut() {
            f.write_all(bytes)?;
        }
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
        Ok(())
    }
}

/// Removes rewrites a crash left half done (the writer holds the trail's lock, so no
/// purge is under way): their segments are as they were, and retention redoes them.
pub fn remove_leftovers(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().ends_with(".seg.purge") {
            if let Err(err) = fs::remove_file(e.path()) {
                tracing::warn!(file = %e.path().display(), error = %err, "an unfinished purge file could not be removed");
            }
        }
    }
}

/// Notes in a segment's index that no body is left in it to purge.
fn mark_clean(path: &Path, built: SegmentIndex) {
    let mut idx = index::load(path).unwrap_or(built);
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
