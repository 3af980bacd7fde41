//! Reading a trail: segments in order, blocks, record lines.

use std::{
    fs,
    ops::{ControlFlow, Range},
    path::{Path, PathBuf},
};

use crate::{index::SegmentIndex, segment, store::list_segments, AuditError};

/// A segment file of a trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentRef {
    pub number: u64,
    pub path: PathBuf,
    /// Its length, when the listing said (object stores do; local files are asked).
    pub len: Option<u64>,
}

impl SegmentRef {
    pub fn name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// Where a trail's files are: a local directory, or (in the CLI) an object-store
/// prefix. Verify, search, show and export read through it, one segment at a time, so
/// a shipped trail is read where it lies.
pub trait TrailSource: Sync {
    /// What the source is, for messages.
    fn describe(&self) -> String;
    /// The segments, oldest first.
    fn segments(&self) -> Result<Vec<SegmentRef>, AuditError>;
    /// A segment's bytes, whole (small reads only: review commands stream [`Self::open`]).
    fn read(&self, seg: &SegmentRef) -> Result<Vec<u8>, AuditError>;
    /// A segment as a stream, read frame by frame with bounded memory.
    fn open(&self, seg: &SegmentRef) -> Result<Box<dyn std::io::Read + '_>, AuditError> {
        Ok(Box::new(std::io::Cursor::new(self.read(seg)?)))
    }
    /// The checkpoint log, if there is one.
    fn checkpoints(&self) -> Result<Option<Vec<u8>>, AuditError>;
    /// The segment's index, if it has one that matches the segment's length.
    fn index(&self, _seg: &SegmentRef) -> Option<SegmentIndex> {
        None
    }
    /// Bytes `range` of a segment (the blocks a search needs).
    fn read_range(&self, seg: &SegmentRef, range: Range<u64>) -> Result<Vec<u8>, AuditError> {
        let all = self.read(seg)?;
        usize::try_from(range.start)
            .ok()
            .zip(usize::try_from(range.end).ok())
            .and_then(|(a, b)| all.get(a..b))
            .map(<[u8]>::to_vec)
            .ok_or_else(|| AuditError::Io {
                path: seg.path.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the index points past the segment's end",
                ),
            })
    }
}

/// A trail in a local directory (`DirSource(&dir)` or an owned `DirSource(dir)`).
pub struct DirSource<P>(pub P);

impl<P: AsRef<Path> + Sync> TrailSource for DirSource<P> {
    fn describe(&self) -> String {
        self.0.as_ref().display().to_string()
    }

    fn segments(&self) -> Result<Vec<SegmentRef>, AuditError> {
        segments(self.0.as_ref())
    }

    fn read(&self, seg: &SegmentRef) -> Result<Vec<u8>, AuditError> {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut self.open(seg)?, &mut out).map_err(|source| {
            AuditError::Io {
                path: seg.path.clone(),
                source,
            }
        })?;
        Ok(out)
    }

    fn open(&self, seg: &SegmentRef) -> Result<Box<dyn std::io::Read + '_>, AuditError> {
        Ok(Box::new(std::io::BufReader::with_capacity(
            256 * 1024,
            open_regular(&seg.path)?,
        )))
    }

    fn checkpoints(&self) -> Result<Option<Vec<u8>>, AuditError> {
        let path = self.0.as_ref().join(crate::store::CHECKPOINTS);
        match fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(AuditError::Io { path, source }),
        }
    }

    fn index(&self, seg: &SegmentRef) -> Option<SegmentIndex> {
        crate::index::load(&seg.path)
    }

    fn read_range(&self, seg: &SegmentRef, range: Range<u64>) -> Result<Vec<u8>, AuditError> {
        use std::io::{Read, Seek, SeekFrom};
        let io = |source| AuditError::Io {
            path: seg.path.clone(),
            source,
        };
        let mut f = open_regular(&seg.path)?;
        let len = range.end.saturating_sub(range.start);
        if len > u64::from(segment::MAX_BLOCK_FRAME) + 64 {
            return Err(io(std::io::Error::other(format!(
                "a read of {len} bytes is larger than any block (the index is damaged)"
            ))));
        }
        let mut buf = vec![0u8; len as usize];
        f.seek(SeekFrom::Start(range.start)).map_err(io)?;
        f.read_exact(&mut buf).map_err(io)?;
        Ok(buf)
    }
}

/// Opens a trail file after checking it is a regular file: a FIFO would block the
/// reader forever and a device (`/dev/zero`) never ends.
pub fn open_regular(path: &Path) -> Result<fs::File, AuditError> {
    let io = |source| AuditError::Io {
        path: path.to_owned(),
        source,
    };
    let meta = fs::metadata(path).map_err(io)?;
    if !meta.is_file() {
        return Err(io(std::io::Error::other(
            "not a regular file; a trail holds only regular files",
        )));
    }
    fs::File::open(path).map_err(io)
}

/// The segments of the trail in `dir`, oldest first.
pub fn segments(dir: &Path) -> Result<Vec<SegmentRef>, AuditError> {
    if !dir.is_dir() {
        return Err(AuditError::Io {
            path: dir.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no audit directory here"),
        });
    }
    Ok(list_segments(dir)?
        .into_iter()
        .map(|(number, path)| SegmentRef {
            number,
            path,
            len: None,
        })
        .collect())
}

/// Calls `f` with every record line of the trail in `dir` (without `\n`), oldest first.
/// See [`for_each_line_of`].
pub fn for_each_line(
    dir: &Path,
    f: impl FnMut(&SegmentRef, &[u8]) -> ControlFlow<()>,
) -> Result<(), AuditError> {
    for_each_line_of(&DirSource(dir), f)
}

/// Calls `f` with every record line (without `\n`), oldest first. Stops early when
/// `f` breaks. A damaged frame is an error naming the segment and offset, except at the
/// end of the newest, unsealed segment (a live trail). Use [`crate::review::verify`] for a full check.
pub fn for_each_line_of(
    source: &dyn TrailSource,
    mut f: impl FnMut(&SegmentRef, &[u8]) -> ControlFlow<()>,
) -> Result<(), AuditError> {
    let segs = source.segments()?;
    let count = segs.len();
    for (i, seg) in segs.iter().enumerate() {
        if scan_segment(source, seg, i + 1 == count, |line| f(seg, line))?.is_break() {
            break;
        }
    }
    Ok(())
}

/// Calls `f` with every record line of one segment. `newest`: the trail's newest
/// segment, whose unsealed tail may be a block still being written.
pub fn for_each_line_in(
    source: &dyn TrailSource,
    seg: &SegmentRef,
    newest: bool,
    f: impl FnMut(&[u8]) -> ControlFlow<()>,
) -> Result<(), AuditError> {
    scan_segment(source, seg, newest, f).map(|_| ())
}

/// Calls `f` with every record line of the segments whose time may overlap
/// `[since, until)` (Unix ms): those whose index says otherwise are not read. Lines are
/// not filtered: a block holds records a little out of start order.
pub fn for_each_line_overlapping(
    source: &dyn TrailSource,
    (since, until): (i64, i64),
    mut f: impl FnMut(&[u8]) -> ControlFlow<()>,
) -> Result<(), AuditError> {
    let segs = source.segments()?;
    let newest = segs.iter().map(|s| s.number).max();
    for seg in &segs {
        if source
            .index(seg)
            .is_some_and(|i| i.last_ms < since || i.first_ms >= until)
        {
            continue;
        }
        if scan_segment(source, seg, Some(seg.number) == newest, &mut f)?.is_break() {
            break;
        }
    }
    Ok(())
}

/// One segment's lines. With `may_be_live`, an unsealed segment may end in a block
/// still being written (the file ends inside a frame): what is whole is read and the
/// rest ignored. Any other damaged frame is an error.
fn scan_segment(
    source: &dyn TrailSource,
    seg: &SegmentRef,
    may_be_live: bool,
    mut f: impl FnMut(&[u8]) -> ControlFlow<()>,
) -> Result<ControlFlow<()>, AuditError> {
    let format = |source| AuditError::Format {
        path: seg.path.clone(),
        source,
    };
    let mut frames = segment::FrameReader::new(source.open(seg)?, true).map_err(format)?;
    let mut sealed = false;
    loop {
        match frames.next_frame() {
            Ok(Some((_, segment::Frame::Block(block)))) => {
                for line in block.lines() {
                    if f(line).is_break() {
                        return Ok(ControlFlow::Break(()));
                    }
                }
            }
            Ok(Some((_, segment::Frame::Seal(..)))) => sealed = true,
            Ok(None) => return Ok(ControlFlow::Continue(())),
            // A live segment may end in a block still being written (it has no seal
            // yet: a seal is always the last frame).
            Err(e) if may_be_live && !sealed && e.is_torn() => {
                return Ok(ControlFlow::Continue(()))
            }
            Err(e) => return Err(format(e)),
        }
    }
}

/// Reads only the given blocks of a segment (from its index's seek table).
pub fn read_blocks(
    source: &dyn TrailSource,
    seg: &SegmentRef,
    blocks: &[&crate::index::BlockEntry],
) -> Result<Vec<segment::Block>, AuditError> {
    let mut out = Vec::with_capacity(blocks.len());
    for b in blocks {
        let buf = source.read_range(seg, b.offset..b.offset + b.len)?;
        let (mut block, _) = segment::read_block(&buf, 0).map_err(|e| AuditError::Format {
            path: seg.path.clone(),
            source: e,
        })?;
        block.offset = b.offset;
        out.push(block);
    }
    Ok(out)
}

/// Whether a segment's index may be used: its seal (the signed statement `verify`
/// checks) must hold the index's digest. `Err` says why not.
pub fn check_index(
    source: &dyn TrailSource,
    seg: &SegmentRef,
    idx: &SegmentIndex,
) -> Result<(), String> {
    let at = idx
        .seal_at
        .ok_or("written before seals vouched for indexes")?;
    let len = idx.segment_bytes.saturating_sub(at);
    if len < 8 || len > u64::from(segment::MAX_META_FRAME) + 8 {
        return Err("its seal position is out of range".into());
    }
    let bytes = source
        .read_range(seg, at..idx.segment_bytes)
        .map_err(|e| e.to_string())?;
    let magic = bytes
        .get(..4)
        .map(|m| u32::from_le_bytes([m[0], m[1], m[2], m[3]]));
    if magic != Some(segment::SEAL_MAGIC) {
        return Err("no seal where it says the seal is".into());
    }
    let seal: crate::signing::Seal =
        serde_json::from_slice(&bytes[8..]).map_err(|e| format!("its seal does not parse: {e}"))?;
    let digest = crate::index::digest(idx);
    if seal.index_sha256.as_deref() == Some(digest.as_str()) {
        return Ok(());
    }
    match idx.purged_by {
        Some(event) => purge_vouches(source, seg, &digest, event),
        None => Err("it does not match the digest its seal holds (edited?)".into()),
    }
}

/// A segment rewritten by a purge: the purge event, not the seal, holds its index's
/// digest. Events are remembered (one purge rewrites many segments).
fn purge_vouches(
    source: &dyn TrailSource,
    seg: &SegmentRef,
    digest: &str,
    event: crate::index::EventRef,
) -> Result<(), String> {
    use std::sync::Mutex;
    type Statements = Vec<(String, String)>;
    static SEEN: Mutex<Vec<((String, u64), Statements)>> = Mutex::new(Vec::new());
    let key = (source.describe(), event.seq);
    let cached = SEEN
        .lock()
        .ok()
        .and_then(|s| s.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone()));
    let statements = match cached {
        Some(s) => s,
        None => {
            let s = purge_statements(source, event)?;
            if let Ok(mut seen) = SEEN.lock() {
                if seen.len() >= 64 {
                    seen.remove(0);
                }
                seen.push((key, s.clone()));
            }
            s
        }
    };
    let name = seg.name();
    if statements.iter().any(|(s, d)| *s == name && d == digest) {
        Ok(())
    } else {
        Err("it matches neither its seal nor the purge event it names (edited?)".into())
    }
}

/// The (segment, index digest) pairs a purge event states, read from the trail.
fn purge_statements(
    source: &dyn TrailSource,
    event: crate::index::EventRef,
) -> Result<Vec<(String, String)>, String> {
    #[derive(serde::Deserialize)]
    struct Purge {
        event: Inner,
    }
    #[derive(serde::Deserialize)]
    struct Inner {
        #[serde(rename = "type")]
        kind: String,
        #[serde(default)]
        segments: Vec<Statement>,
    }
    #[derive(serde::Deserialize)]
    struct Statement {
        segment: String,
        index_sha256: String,
    }
    let segs = source.segments().map_err(|e| e.to_string())?;
    let seg = segs
        .iter()
        .find(|s| s.number == event.segment)
        .ok_or("the purge event it names is not in the trail")?;
    let needle = format!(",\"seq\":{},", event.seq);
    let mut found = None;
    scan_segment(source, seg, true, |line| {
        let head = &line[..line.len().min(200)];
        if memchr::memmem::find(head, needle.as_bytes()).is_some() {
            found = Some(line.to_vec());
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    })
    .map_err(|e| e.to_string())?
    .is_break();
    let line = found.ok_or("the purge event it names is not in the trail")?;
    segment::check_line_hash(&line).map_err(|e| format!("the purge event it names: {e}"))?;
    let p: Purge =
        serde_json::from_slice(&line).map_err(|_| "the event it names is not a purge")?;
    if p.event.kind != "purge" {
        return Err("the event it names is not a purge".into());
    }
    Ok(p.event
        .segments
        .into_iter()
        .map(|s| (s.segment, s.index_sha256))
        .collect())
}

/// The record line with this `id`: the segments whose time range holds the id's
/// timestamp (UUID v7) are read first.
pub fn find_by_id(source: &dyn TrailSource, id: &str) -> Result<Vec<u8>, AuditError> {
    let needle = format!("\"id\":{}", serde_json::Value::String(id.to_owned()));
    let mut segs = source.segments()?;
    if let Some(t) = crate::record::id_time_ms(id) {
        // Segments whose index covers the id's time first; unindexed (live) ones next.
        segs.sort_by_cached_key(|s| match source.index(s) {
            Some(i) if i.first_ms <= t && t <= i.last_ms => 0,
            Some(_) => 2,
            None => 1,
        });
    }
    // A sealed segment's vouched index says which blocks hold records of that
    // millisecond: one block read instead of the segment.
    if let Some(t) = crate::record::id_time_ms(id) {
        for seg in &segs {
            let Some(idx) = source.index(seg) else {
                continue;
            };
            if idx.first_ms > t || t > idx.last_ms {
                break;
            }
            if check_index(source, seg, &idx).is_err() {
                continue;
            }
            let blocks: Vec<&crate::index::BlockEntry> = idx
                .blocks
                .iter()
                .filter(|b| b.first_ms <= t && t <= b.last_ms)
                .collect();
            // A block that does not read is left to the full scan below, which names it.
            for block in read_blocks(source, seg, &blocks).unwrap_or_default() {
                if let Some(line) = block
                    .lines()
                    .find(|l| memchr::memmem::find(l, needle.as_bytes()).is_some())
                {
                    return Ok(line.to_vec());
                }
            }
        }
    }
    let newest = segs.iter().map(|s| s.number).max();
    for seg in &segs {
        let mut found = None;
        for_each_line_in(source, seg, Some(seg.number) == newest, |line| {
            if memchr::memmem::find(line, needle.as_bytes()).is_some() {
                found = Some(line.to_vec());
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        })?;
        if let Some(line) = found {
            return Ok(line);
        }
    }
    Err(AuditError::NotFound(id.to_owned()))
}
