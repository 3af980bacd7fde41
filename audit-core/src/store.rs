//! The append side of a trail: opening (with torn-tail recovery and sealing of a
//! crashed segment), appending blocks, rotation with seals, checkpoints, fsync.
//! Single-threaded, owned by the writer thread.

use std::{
    fs::{self, File, OpenOptions},
    io::Write,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use custody_config::Fsync;
use sha2::{Digest, Sha256};

use crate::{
    index::{self, BlockEntry, Facts, SegmentIndex},
    merkle::{self, Range},
    segment::{self, BlockHeader, ParsedSegment, SealFrame, SegmentHeader},
    signing::{self, Checkpoint, Seal, SignerKey, TreeHead, ZERO_HEX},
    AuditError,
};

/// The checkpoint log beside the segments.
pub const CHECKPOINTS: &str = "checkpoints.log";

/// Where the chain stands: the next `seq` and the previous record's hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainHead {
    pub next_seq: u64,
    pub prev_hash: [u8; 32],
}

/// Bytes cut from a torn segment at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    pub segment: PathBuf,
    pub bytes: u64,
    pub quarantine: PathBuf,
    pub reason: String,
}

/// What start-up recovery found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    pub cut: Option<Cut>,
    /// A segment left unsealed by a crash, sealed at start-up.
    pub sealed: Option<PathBuf>,
}

/// A sealed segment past retention.
#[derive(Debug, Clone)]
pub struct Retired {
    pub path: PathBuf,
    pub seal: Seal,
    pub seal_hash: String,
}

/// How the store writes.
pub struct StoreOptions {
    pub max_bytes: u64,
    pub max_age: Duration,
    pub fsync: Fsync,
    pub signer: Option<SignerKey>,
}

pub struct SegmentStore {
    dir: PathBuf,
    opts: StoreOptions,
    next_segment: u64,
    head: ChainHead,
    open: Option<OpenSegment>,
    /// The newest segment, open or closed: number, length, SHA-256 of its bytes.
    newest: Option<(u64, u64, String)>,
    /// Hash of the newest seal line (zeros before the first).
    prev_seal: String,
    /// Hash of the newest checkpoint line, and what it covered (seq, newest length).
    last_checkpoint: String,
    covered: (u64, u64),
    /// The Merkle tree over every record so far (`None`: the trail's start was deleted
    /// before trees were written, so no head can be signed).
    tree: Option<Range>,
    compressor: zstd::bulk::Compressor<'static>,
    /// Held while the store is open: a trail has one writer.
    _lock: File,
}

struct OpenSegment {
    number: u64,
    path: PathBuf,
    file: File,
    len: u64,
    hasher: Sha256,
    opened: Instant,
    dirty: bool,
    first_seq: u64,
    records: u64,
    first_ms: i64,
    last_ms: i64,
    blocks: Vec<BlockEntry>,
    facts: Facts,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AuditError + '_ {
    move |source| AuditError::Io {
        path: path.to_owned(),
        source,
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// Segment files in `dir`, oldest first.
pub fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, AuditError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        if let Some(n) = entry
            .file_name()
            .to_str()
            .and_then(segment::parse_segment_file_name)
        {
            out.push((n, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

fn format_err(path: &Path, what: impl Into<String>) -> AuditError {
    AuditError::Format {
        path: path.to_owned(),
        source: segment::FormatError {
            offset: 0,
            what: what.into(),
        },
    }
}

/// The chain head after a parsed segment: its last record, else its header.
fn head_of(path: &Path, parsed: &ParsedSegment) -> Result<ChainHead, AuditError> {
    match parsed
        .blocks
        .last()
        .and_then(|b| b.lines().last().map(<[u8]>::to_vec))
    {
        Some(line) => {
            let hash = segment::check_line_hash(&line).map_err(|w| format_err(path, w))?;
            let next_seq = parsed
                .blocks
                .iter()
                .map(|b| b.header.first_seq + u64::from(b.header.count))
                .max()
                .unwrap_or(parsed.header.first_seq);
            Ok(ChainHead {
                next_seq,
                prev_hash: hash,
            })
        }
        None => Ok(ChainHead {
            next_seq: parsed.header.first_seq,
            prev_hash: parsed.header.prev_hash,
        }),
    }
}

impl SegmentStore {
    /// Opens the trail in `dir` (creating it 0700). A torn tail is cut and moved aside,
    /// and a segment left unsealed by a crash is sealed (`recovered: true`).
    pub fn open(dir: &Path, opts: StoreOptions) -> Result<(Self, Recovery), AuditError> {
        create_private_dir(dir)?;
        let lock = lock_writer(dir)?;
        let mut recovery = Recovery::default();
        let mut head = ChainHead {
            next_seq: 1,
            prev_hash: [0; 32],
        };
        let segments = list_segments(dir)?;
        let next_segment = segments.last().map_or(1, |(n, _)| n + 1);
        let mut newest = None;
        let mut prev_seal = ZERO_HEX.to_owned();
        let mut tree = Some(Range::new(0));
        for (i, (number, path)) in segments.iter().enumerate().rev() {
            let mut bytes = fs::read(path).map_err(io(path))?;
            let mut parsed = match segment::parse_segment(&bytes) {
                Ok(p) => p,
                Err(e) => {
                    // A header torn at creation: nothing in it was ever a record.
                    let aside = quarantine(path, &bytes)?;
                    fs::remove_file(path).map_err(io(path))?;
                    tracing::warn!(segment = %path.display(), error = %e, quarantine = %aside.display(), "segment header was torn; moved aside");
                    recovery.cut = Some(Cut {
                        segment: path.clone(),
                        bytes: bytes.len() as u64,
                        quarantine: aside,
                        reason: e.to_string(),
                    });
                    continue;
                }
            };
            if parsed.valid_len < bytes.len() as u64 {
                let cut = bytes.split_off(parsed.valid_len as usize);
                let aside = quarantine(path, &cut)?;
                let f = OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(io(path))?;
                f.set_len(parsed.valid_len).map_err(io(path))?;
                f.sync_all().map_err(io(path))?;
                let reason = parsed
                    .tail_error
                    .take()
                    .map(|e| e.to_string())
                    .unwrap_or_default();
                tracing::warn!(segment = %path.display(), cut_bytes = cut.len(), %reason, quarantine = %aside.display(), "recovered a torn segment tail");
                recovery.cut = Some(Cut {
                    segment: path.clone(),
                    bytes: cut.len() as u64,
                    quarantine: aside,
                    reason,
                });
            }
            head = head_of(path, &parsed)?;
            match &parsed.seal {
                Some(seal) => {
                    prev_seal = signing::line_hash(&seal.line);
                    tree = seal
                        .seal
                        .tree
                        .as_ref()
                        .and_then(TreeHead::range)
                        .filter(|t| t.end() + 1 == head.next_seq);
                    if tree.is_none() {
                        tree = tree_before(dir, &segments[..=i], head.next_seq)?;
                    }
                }
                None => {
                    let before = match i.checked_sub(1) {
                        Some(p) => previous_seal(&segments[p].1)?,
                        None => None,
                    };
                    tree = before
                        .as_ref()
                        .and_then(|s| s.seal.tree.as_ref())
                        .and_then(TreeHead::range)
                        .filter(|t| t.end() + 1 == parsed.header.first_seq);
                    if tree.is_none() {
                        tree = tree_before(dir, &segments[..i], parsed.header.first_seq)?;
                    }
                    if let Some(t) = tree.as_mut() {
                        push_leaves(t, &parsed);
                    }
                    let before =
                        before.map_or_else(|| ZERO_HEX.to_owned(), |s| signing::line_hash(&s.line));
                    let mut idx = index::from_parsed(*number, &parsed, 0);
                    idx.seal_at = Some(bytes.len() as u64);
                    let line = seal_line(
                        *number,
                        &parsed,
                        &bytes,
                        (head, &before, &index::digest(&idx)),
                        tree.as_ref(),
                        opts.signer.as_ref(),
                    )
                    .map_err(|e| format_err(path, e.to_string()))?;
                    let frame = segment::encode_seal(&line);
                    let mut f = OpenOptions::new()
                        .append(true)
                        .open(path)
                        .map_err(io(path))?;
                    f.write_all(&frame).map_err(io(path))?;
                    f.sync_all().map_err(io(path))?;
                    bytes.extend_from_slice(&frame);
                    prev_seal = signing::line_hash(&line);
                    idx.segment_bytes = bytes.len() as u64;
                    if let Err(e) = index::write(path, &idx) {
                        tracing::warn!(error = %e, "segment index not written");
                    }
                    tracing::warn!(segment = %path.display(), "sealed a segment left open by a crash");
                    recovery.sealed = Some(path.clone());
                }
            }
            newest = Some((
                *number,
                bytes.len() as u64,
                hex::encode(Sha256::digest(&bytes)),
            ));
            break;
        }
        let (last_checkpoint, covered) = recover_checkpoints(dir)?;
        let compressor = compressor().map_err(io(dir))?;
        Ok((
            Self {
                dir: dir.to_owned(),
                opts,
                next_segment,
                head,
                open: None,
                newest,
                prev_seal,
                last_checkpoint,
                covered,
                tree,
                compressor,
                _lock: lock,
            },
            recovery,
        ))
    }

    pub fn head(&self) -> ChainHead {
        self.head
    }

    /// The segment being appended to, if one is open.
    pub fn open_number(&self) -> Option<u64> {
        self.open.as_ref().map(|s| s.number)
    }

    /// The newest segment, open or sealed.
    pub fn newest_number(&self) -> Option<u64> {
        self.open_number().or(self.newest.as_ref().map(|n| n.0))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The tree head over every record written, when it can be signed.
    fn tree_head(&self) -> Option<TreeHead> {
        let tree = self.tree.as_ref()?;
        if tree.end() + 1 != self.head.next_seq {
            tracing::error!(
                tree = tree.end(),
                next_seq = self.head.next_seq,
                "the tree does not cover the chain; no tree head signed"
            );
            return None;
        }
        TreeHead::of(tree)
    }

    /// Whether seals and checkpoints are signed.
    pub fn signing(&self) -> bool {
        self.opts.signer.is_some()
    }

    /// Appends one block of sealed record lines. `head` is the chain state after them.
    /// On failure nothing of the block stays in the file, so it can be retried. Once the
    /// block is written it counts as appended: a failing fsync or rotation after it is
    /// logged, not returned, so that a retry cannot write the block twice. Returns the
    /// bytes appended.
    pub fn append(
        &mut self,
        first_seq: u64,
        count: u32,
        time_range: (i64, i64),
        records: &[u8],
        head: ChainHead,
        facts: &Facts,
    ) -> Result<u64, AuditError> {
        let block = BlockHeader::encode_block(
            first_seq,
            count,
            time_range.0,
            time_range.1,
            records,
            &mut self.compressor,
        )
        .map_err(io(&self.dir))?;
        if self.open.is_none() {
            self.start_segment(first_seq)?;
        }
        let Some(seg) = self.open.as_mut() else {
            return Err(AuditError::Writer("no open segment".into()));
        };
        if let Err(e) = seg.file.write_all(&block) {
            // Cut a partial write back so the segment stays whole.
            let _ = seg.file.set_len(seg.len);
            return Err(io(&seg.path)(e));
        }
        seg.hasher.update(&block);
        if let Some(tree) = self.tree.as_mut() {
            // memchr: this runs over every byte the trail holds.
            let mut from = 0;
            let lines = memchr::memchr_iter(b'\n', records)
                .chain(std::iter::once(records.len()))
                .map(|end| {
                    let line = &records[from..end];
                    from = end + 1;
                    line
                });
            for line in lines.filter(|l| !l.is_empty()) {
                match segment::stated_hash(line) {
                    Some(h) => tree.push(merkle::leaf_hash(&h)),
                    None => {
                        // Cannot happen for sealed lines; a tree with a hole must not be signed.
                        tracing::error!("a record without its chain hash; tree heads stop");
                        self.tree = None;
                        break;
                    }
                }
            }
        }
        seg.blocks.push(BlockEntry {
            offset: seg.len,
            len: block.len() as u64,
            first_seq,
            count,
            first_ms: time_range.0,
            last_ms: time_range.1,
        });
        seg.facts.merge(facts);
        seg.len += block.len() as u64;
        seg.dirty = true;
        seg.records += u64::from(count);
        seg.first_ms = seg.first_ms.min(time_range.0);
        seg.last_ms = seg.last_ms.max(time_range.1);
        self.head = head;
        if self.opts.fsync == Fsync::Always {
            if let Err(e) = self.sync() {
                tracing::error!(error = %e, "fsync after a block failed; it is retried with the next");
            }
        }
        if self
            .open
            .as_ref()
            .is_some_and(|s| s.len >= self.opts.max_bytes)
        {
            if let Err(e) = self.close_segment() {
                tracing::error!(error = %e, "sealing a full segment failed; it is retried at the next rotation");
            }
        }
        Ok(block.len() as u64)
    }

    /// Rotates the open segment if it is older than the age limit.
    pub fn rotate_if_old(&mut self) -> Result<(), AuditError> {
        if self
            .open
            .as_ref()
            .is_some_and(|s| s.opened.elapsed() >= self.opts.max_age)
        {
            self.close_segment()?;
        }
        Ok(())
    }

    /// fsyncs the open segment if anything was written since the last sync (except under
    /// `fsync = "never"`, where only seals and checkpoints force it).
    pub fn sync(&mut self) -> Result<(), AuditError> {
        if self.opts.fsync == Fsync::Never {
            return Ok(());
        }
        self.force_sync()
    }

    fn force_sync(&mut self) -> Result<(), AuditError> {
        if let Some(seg) = self.open.as_mut().filter(|s| s.dirty) {
            seg.file.sync_data().map_err(io(&seg.path))?;
            seg.dirty = false;
        }
        Ok(())
    }

    /// Seals, syncs and closes the open segment; the next append starts a new one.
    pub fn close_segment(&mut self) -> Result<(), AuditError> {
        let Some(mut seg) = self.open.take() else {
            return Ok(());
        };
        // The index first: the seal vouches for it.
        let mut idx = SegmentIndex {
            v: 1,
            segment: seg.number,
            segment_bytes: 0,
            first_seq: seg.first_seq,
            last_seq: self.head.next_seq - 1,
            first_ms: if seg.records > 0 { seg.first_ms } else { 0 },
            last_ms: if seg.records > 0 { seg.last_ms } else { 0 },
            blocks: std::mem::take(&mut seg.blocks),
            facts: std::mem::take(&mut seg.facts),
            seal_at: Some(seg.len),
            purged_by: None,
            content_purged: false,
        };
        let seal = Seal {
            kind: "seal".into(),
            v: 1,
            segment: seg.number,
            first_seq: seg.first_seq,
            last_seq: self.head.next_seq - 1,
            records: seg.records,
            first_ms: if seg.records > 0 { seg.first_ms } else { 0 },
            last_ms: if seg.records > 0 { seg.last_ms } else { 0 },
            head: hex::encode(self.head.prev_hash),
            segment_sha256: hex::encode(seg.hasher.clone().finalize()),
            prev_seal: self.prev_seal.clone(),
            recovered: false,
            time: now_rfc3339(),
            index_sha256: Some(index::digest(&idx)),
            tree: self.tree_head(),
            key: self.opts.signer.as_ref().map(|k| k.public_hex().to_owned()),
            sig: "0".repeat(128),
        };
        let line = signing::sign_line(&seal, self.opts.signer.as_ref())
            .map_err(|e| format_err(&seg.path, e.to_string()))?;
        let frame = segment::encode_seal(&line);
        if let Err(e) = seg
            .file
            .write_all(&frame)
            .and_then(|()| seg.file.sync_all())
        {
            // Disk full or read-only: cut the partial seal off and keep the segment open,
            // so that the next rotation seals it whole.
            let _ = seg.file.set_len(seg.len);
            let err = io(&seg.path)(e);
            seg.blocks = idx.blocks;
            seg.facts = idx.facts;
            self.open = Some(seg);
            return Err(err);
        }
        seg.hasher.update(&frame);
        seg.len += frame.len() as u64;
        self.prev_seal = signing::line_hash(&line);
        idx.segment_bytes = seg.len;
        // The index only speeds up search: failing to write it is not fatal.
        if let Err(e) = index::write(&seg.path, &idx) {
            tracing::warn!(error = %e, "segment index not written");
        }
        self.newest = Some((seg.number, seg.len, hex::encode(seg.hasher.finalize())));
        Ok(())
    }

    /// Appends a checkpoint covering everything written so far, if anything changed
    /// since the last one. The segment is synced first: a checkpoint never covers
    /// bytes that are not on disk.
    pub fn checkpoint(&mut self) -> Result<bool, AuditError> {
        self.force_sync()?;
        let (segment, len, sha) = match (&self.open, &self.newest) {
            (Some(s), _) => (s.number, s.len, hex::encode(s.hasher.clone().finalize())),
            (None, Some((n, l, h))) => (*n, *l, h.clone()),
            (None, None) => return Ok(false),
        };
        let last_seq = self.head.next_seq - 1;
        if self.covered == (last_seq, len) {
            return Ok(false);
        }
        let cp = Checkpoint {
            kind: "checkpoint".into(),
            v: 1,
            time: now_rfc3339(),
            segment,
            segment_bytes: len,
            segment_sha256: sha,
            last_seq,
            head: hex::encode(self.head.prev_hash),
            seal: self.prev_seal.clone(),
            prev: self.last_checkpoint.clone(),
            tree: self.tree_head(),
            key: self.opts.signer.as_ref().map(|k| k.public_hex().to_owned()),
            sig: "0".repeat(128),
        };
        let path = self.dir.join(CHECKPOINTS);
        let mut line = signing::sign_line(&cp, self.opts.signer.as_ref())
            .map_err(|e| format_err(&path, e.to_string()))?;
        let hash = signing::line_hash(&line);
        line.push(b'\n');
        let mut opts = OpenOptions::new();
        opts.append(true).create(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(&path).map_err(io(&path))?;
        let before = f.metadata().map_err(io(&path))?.len();
        if let Err(e) = f.write_all(&line).and_then(|()| f.sync_data()) {
            // Disk full: no half line, and the chain of checkpoints stays as it was.
            let _ = f.set_len(before);
            return Err(io(&path)(e));
        }
        self.last_checkpoint = hash;
        self.covered = (last_seq, len);
        Ok(true)
    }

    /// Sealed segments past retention, oldest first and contiguous from the oldest: all
    /// sealed, none the newest, each one's newest record older than `max_age_ms` at `now_ms`.
    pub fn retention_candidates(
        &self,
        now_ms: i64,
        max_age_ms: i64,
    ) -> Result<Vec<Retired>, AuditError> {
        let segments = list_segments(&self.dir)?;
        let newest = self
            .open
            .as_ref()
            .map(|s| s.number)
            .or(self.newest.as_ref().map(|n| n.0));
        let mut out = Vec::new();
        for (number, path) in segments {
            if Some(number) == newest {
                break;
            }
            let bytes = fs::read(&path).map_err(io(&path))?;
            let parsed = segment::parse_segment(&bytes).map_err(|source| AuditError::Format {
                path: path.clone(),
                source,
            })?;
            let Some(seal) = parsed.seal else { break };
            let newest_ms = if seal.seal.records > 0 {
                seal.seal.last_ms
            } else {
                parsed.header.created_ms
            };
            if now_ms - newest_ms < max_age_ms {
                break;
            }
            out.push(Retired {
                path,
                seal_hash: signing::line_hash(&seal.line),
                seal: seal.seal,
            });
        }
        Ok(out)
    }

    /// Deletes retired segments (after their retention event is written and covered).
    pub fn delete(&mut self, retired: &[Retired]) -> Result<(), AuditError> {
        for r in retired {
            fs::remove_file(&r.path).map_err(io(&r.path))?;
            let _ = fs::remove_file(index::index_path(&r.path));
        }
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))
    }

    /// Clean shutdown: seal the open segment and write the final checkpoint.
    pub fn close(&mut self) -> Result<(), AuditError> {
        self.close_segment()?;
        self.checkpoint()?;
        Ok(())
    }

    fn start_segment(&mut self, first_seq: u64) -> Result<(), AuditError> {
        let n = self.next_segment;
        let path = self.dir.join(segment::segment_file_name(n));
        let header = SegmentHeader {
            segment: n,
            created_ms: now_ms(),
            first_seq,
            prev_hash: self.head.prev_hash,
        }
        .encode();
        let mut opts = OpenOptions::new();
        opts.append(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut file = opts.open(&path).map_err(io(&path))?;
        let written = file
            .write_all(&header)
            .and_then(|()| file.sync_all())
            .and_then(|()| File::open(&self.dir)?.sync_all());
        if let Err(e) = written {
            // Disk full: a segment without its whole header holds nothing; remove it so
            // that the retry can create it again.
            drop(file);
            let _ = std::fs::remove_file(&path);
            return Err(io(&path)(e));
        }
        self.next_segment += 1;
        let mut hasher = Sha256::new();
        hasher.update(&header);
        self.open = Some(OpenSegment {
            number: n,
            path,
            file,
            len: header.len() as u64,
            hasher,
            opened: Instant::now(),
            dirty: false,
            first_seq,
            records: 0,
            first_ms: i64::MAX,
            last_ms: i64::MIN,
            blocks: Vec::new(),
            facts: Facts::default(),
        });
        Ok(())
    }
}

/// The seal line for a parsed segment left open by a crash whose bytes are `bytes`.
fn seal_line(
    number: u64,
    parsed: &ParsedSegment,
    bytes: &[u8],
    (head, prev_seal, index_sha256): (ChainHead, &str, &str),
    tree: Option<&Range>,
    signer: Option<&SignerKey>,
) -> Result<Vec<u8>, serde_json::Error> {
    let records: u64 = parsed
        .blocks
        .iter()
        .map(|b| u64::from(b.header.count))
        .sum();
    let seal = Seal {
        kind: "seal".into(),
        v: 1,
        segment: number,
        first_seq: parsed.header.first_seq,
        last_seq: head.next_seq - 1,
        records,
        first_ms: parsed
            .blocks
            .iter()
            .map(|b| b.header.first_ms)
            .min()
            .unwrap_or(0),
        last_ms: parsed
            .blocks
            .iter()
            .map(|b| b.header.last_ms)
            .max()
            .unwrap_or(0),
        head: hex::encode(head.prev_hash),
        segment_sha256: hex::encode(Sha256::digest(bytes)),
        prev_seal: prev_seal.to_owned(),
        recovered: true,
        time: now_rfc3339(),
        index_sha256: Some(index_sha256.to_owned()),
        tree: tree
            .filter(|t| t.end() + 1 == head.next_seq)
            .and_then(TreeHead::of),
        key: signer.map(|k| k.public_hex().to_owned()),
        sig: "0".repeat(128),
    };
    signing::sign_line(&seal, signer)
}

/// The block compressor: level 1, frames with their checksum and content size.
pub fn compressor() -> std::io::Result<zstd::bulk::Compressor<'static>> {
    let mut c = zstd::bulk::Compressor::new(1)?;
    c.include_checksum(true)?;
    c.include_contentsize(true)?;
    Ok(c)
}

fn read_parsed(path: &Path) -> Result<ParsedSegment, AuditError> {
    let bytes = fs::read(path).map_err(io(path))?;
    segment::parse_segment(&bytes).map_err(|source| AuditError::Format {
        path: path.to_owned(),
        source,
    })
}

fn previous_seal(path: &Path) -> Result<Option<SealFrame>, AuditError> {
    Ok(read_parsed(path)?.seal)
}

fn push_leaves(tree: &mut Range, parsed: &ParsedSegment) {
    for line in parsed.blocks.iter().flat_map(|b| b.lines()) {
        if let Some(h) = segment::stated_hash(line) {
            tree.push(merkle::leaf_hash(&h));
        }
    }
}

/// The tree over the records before `next_seq`, when no seal gave it: from a checkpoint
/// that covers exactly them, else built from the records of `segments` (once, when a
/// trail written before tree heads is opened). `None` when neither can give it.
fn tree_before(
    dir: &Path,
    segments: &[(u64, PathBuf)],
    next_seq: u64,
) -> Result<Option<Range>, AuditError> {
    let from_log = fs::read(dir.join(CHECKPOINTS)).ok().and_then(|log| {
        log.split(|&b| b == b'\n')
            .filter_map(|l| serde_json::from_slice::<Checkpoint>(l).ok())
            .filter_map(|c| c.tree)
            .filter(|t| t.size + 1 == next_seq)
            .find_map(|t| t.range())
    });
    if from_log.is_some() {
        return Ok(from_log);
    }
    Ok(rebuild_tree(segments)?.filter(|t| t.end() + 1 == next_seq))
}

/// The tree over `segments` read from their records. `None` when their start was
/// deleted (nothing to build from).
fn rebuild_tree(segments: &[(u64, PathBuf)]) -> Result<Option<Range>, AuditError> {
    let mut tree = Range::new(0);
    for (_, path) in segments {
        let parsed = read_parsed(path)?;
        if parsed.header.first_seq != tree.end() + 1 {
            tracing::warn!(segment = %path.display(), "the trail's start is gone: no tree heads can be signed");
            return Ok(None);
        }
        push_leaves(&mut tree, &parsed);
    }
    if !segments.is_empty() {
        tracing::info!(
            records = tree.end(),
            "built the Merkle tree of a trail written before tree heads"
        );
    }
    Ok(Some(tree))
}

/// Reads the checkpoint log: a torn last line (a crash mid-append) is cut off.
/// Returns the newest line's hash and what it covered.
fn recover_checkpoints(dir: &Path) -> Result<(String, (u64, u64)), AuditError> {
    let path = dir.join(CHECKPOINTS);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok((ZERO_HEX.to_owned(), (u64::MAX, 0)))
        }
        Err(e) => return Err(io(&path)(e)),
    };
    let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if whole < bytes.len() {
        let f = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        f.set_len(whole as u64).map_err(io(&path))?;
        tracing::warn!(path = %path.display(), cut_bytes = bytes.len() - whole, "cut a torn checkpoint line");
    }
    match bytes[..whole]
        .split(|&b| b == b'\n')
        .rfind(|l| !l.is_empty())
    {
        Some(line) => {
            let cp: Checkpoint =
                serde_json::from_slice(line).map_err(|e| format_err(&path, e.to_string()))?;
            Ok((signing::line_hash(line), (cp.last_seq, cp.segment_bytes)))
        }
        None => Ok((ZERO_HEX.to_owned(), (u64::MAX, 0))),
    }
}

/// The lock that keeps a second writer (another `custody serve`, a `log purge`) off a
/// trail: two writers would fork its chain. Released when the process ends, however.
fn lock_writer(dir: &Path) -> Result<File, AuditError> {
    let path = dir.join(WRITER_LOCK);
    let mut opts = OpenOptions::new();
    opts.write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let file = opts.open(&path).map_err(io(&path))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(AuditError::Writer(format!(
            "the trail in {} is being written by another custody process (stop it first, or ask it: POST /admin/purge)",
            dir.display()
        ))),
        Err(fs::TryLockError::Error(e)) => Err(io(&path)(e)),
    }
}

/// The writer's lock file, in the audit directory.
pub const WRITER_LOCK: &str = "writer.lock";

fn create_private_dir(dir: &Path) -> Result<(), AuditError> {
    let mut b = fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir).map_err(io(dir))
}

fn quarantine(path: &Path, bytes: &[u8]) -> Result<PathBuf, AuditError> {
    let aside = PathBuf::from(format!("{}.torn-{}", path.display(), now_ms()));
    fs::write(&aside, bytes).map_err(io(&aside))?;
    Ok(aside)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(max_bytes: u64, max_age: Duration) -> StoreOptions {
        StoreOptions {
            max_bytes,
            max_age,
            fsync: Fsync::Interval,
            signer: None,
        }
    }

    fn append_one(store: &mut SegmentStore, seq: u64) -> [u8; 32] {
        let prev = hex::encode(store.head().prev_hash);
        let mut line = format!(
            "{{\"seq\":{seq},\"chain\":{{\"prev\":\"{prev}\",\"hash\":\"{}\"}}}}",
            "0".repeat(64)
        )
        .into_bytes();
        let hash = segment::seal_line(&mut line).unwrap();
        line.push(b'\n');
        let head = ChainHead {
            next_seq: seq + 1,
            prev_hash: hash,
        };
        store
            .append(seq, 1, (0, 0), &line, head, &Facts::default())
            .unwrap();
        hash
    }

    #[test]
    fn rotates_by_size_and_age_and_reopens_at_the_head() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, _) =
            SegmentStore::open(dir.path(), opts(1, Duration::from_secs(3600))).unwrap();
        for seq in 1..=3 {
            append_one(&mut store, seq);
        }
        assert_eq!(list_segments(dir.path()).unwrap().len(), 3);
        // One writer at a time: a second store on the trail is refused.
        match SegmentStore::open(dir.path(), opts(1, Duration::ZERO)) {
            Err(AuditError::Writer(w)) => assert!(w.contains("another custody process"), "{w}"),
            other => panic!("{:?}", other.map(|_| ())),
        }
        drop(store);

        let (mut store, _) = SegmentStore::open(dir.path(), opts(1 << 20, Duration::ZERO)).unwrap();
        assert_eq!(store.head().next_seq, 4);
        let fourth = append_one(&mut store, 4);
        store.rotate_if_old().unwrap();
        append_one(&mut store, 5);
        store.close_segment().unwrap();
        let segs = list_segments(dir.path()).unwrap();
        assert_eq!(
            segs.iter().map(|s| s.0).collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5]
        );
        let p = segment::parse_segment(&fs::read(&segs[4].1).unwrap()).unwrap();
        assert_eq!(p.header.first_seq, 5);
        assert_eq!(p.header.prev_hash, fourth);
        // Every closed segment carries a seal linking to the one before.
        let seals: Vec<_> = segs
            .iter()
            .map(|(_, path)| {
                segment::parse_segment(&fs::read(path).unwrap())
                    .unwrap()
                    .seal
                    .unwrap()
            })
            .collect();
        assert_eq!(seals[0].seal.prev_seal, ZERO_HEX);
        for w in seals.windows(2) {
            assert_eq!(w[1].seal.prev_seal, signing::line_hash(&w[0].line));
        }
        assert_eq!(seals[3].seal.records, 1);
    }
}
