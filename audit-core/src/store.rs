//! The append side of a trail: opening (with torn-tail recovery), appending blocks,
//! rotation, fsync. Single-threaded, owned by the writer thread.

use std::{
    fs::{self, File, OpenOptions},
    io::Write,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crate::{
    segment::{self, BlockHeader, SegmentHeader},
    AuditError,
};

/// Where the chain stands: the next `seq` and the previous record's hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainHead {
    pub next_seq: u64,
    pub prev_hash: [u8; 32],
}

/// What start-up recovery found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Segment cut back, bytes cut, and where they were moved.
    pub cut: Option<(PathBuf, u64, PathBuf)>,
}

pub struct SegmentStore {
    dir: PathBuf,
    max_bytes: u64,
    max_age: Duration,
    next_segment: u64,
    head: ChainHead,
    open: Option<OpenSegment>,
    compressor: zstd::bulk::Compressor<'static>,
}

struct OpenSegment {
    path: PathBuf,
    file: File,
    len: u64,
    opened: Instant,
    dirty: bool,
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

impl SegmentStore {
    /// Opens the trail in `dir` (creating it 0700), repairing a torn tail.
    pub fn open(
        dir: &Path,
        max_bytes: u64,
        max_age: Duration,
    ) -> Result<(Self, Recovery), AuditError> {
        create_private_dir(dir)?;
        let mut recovery = Recovery::default();
        let mut head = ChainHead {
            next_seq: 1,
            prev_hash: [0; 32],
        };
        let segments = list_segments(dir)?;
        let next_segment = segments.last().map_or(1, |(n, _)| n + 1);
        // The chain head comes from the newest segment that holds a whole header.
        for (_, path) in segments.iter().rev() {
            let bytes = fs::read(path).map_err(io(path))?;
            let parsed = match segment::parse_segment(&bytes) {
                Ok(p) => p,
                Err(e) => {
                    // A header torn at creation: nothing in it was ever a record.
                    let aside = quarantine(path, &bytes)?;
                    fs::remove_file(path).map_err(io(path))?;
                    tracing::warn!(segment = %path.display(), error = %e, quarantine = %aside.display(), "segment header was torn; moved aside");
                    recovery.cut = Some((path.clone(), bytes.len() as u64, aside));
                    continue;
                }
            };
            if parsed.valid_len < bytes.len() as u64 {
                let cut = &bytes[parsed.valid_len as usize..];
                let aside = quarantine(path, cut)?;
                let f = OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(io(path))?;
                f.set_len(parsed.valid_len).map_err(io(path))?;
                f.sync_all().map_err(io(path))?;
                tracing::warn!(
                    segment = %path.display(),
                    cut_bytes = cut.len(),
                    reason = %parsed.tail_error.as_ref().map(|e| e.to_string()).unwrap_or_default(),
                    quarantine = %aside.display(),
                    "recovered a torn segment tail"
                );
                recovery.cut = Some((path.clone(), cut.len() as u64, aside));
            }
            head = match parsed
                .blocks
                .last()
                .and_then(|b| b.lines().last().map(<[u8]>::to_vec))
            {
                Some(line) => {
                    let hash = segment::check_line_hash(&line).map_err(|w| AuditError::Format {
                        path: path.clone(),
                        source: segment::FormatError {
                            offset: 0,
                            what: w.to_owned(),
                        },
                    })?;
                    let seq = parsed
                        .blocks
                        .iter()
                        .map(|b| b.header.first_seq + u64::from(b.header.count))
                        .max()
                        .unwrap_or(1);
                    ChainHead {
                        next_seq: seq,
                        prev_hash: hash,
                    }
                }
                None => ChainHead {
                    next_seq: parsed.header.first_seq,
                    prev_hash: parsed.header.prev_hash,
                },
            };
            break;
        }
        let mut compressor = zstd::bulk::Compressor::new(3).map_err(io(dir))?;
        compressor.include_checksum(true).map_err(io(dir))?;
        compressor.include_contentsize(true).map_err(io(dir))?;
        Ok((
            Self {
                dir: dir.to_owned(),
                max_bytes,
                max_age,
                next_segment,
                head,
                open: None,
                compressor,
            },
            recovery,
        ))
    }

    pub fn head(&self) -> ChainHead {
        self.head
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends one block of sealed record lines. `head` is the chain state after them.
    /// On failure nothing of the block stays in the file, so it can be retried.
    pub fn append(
        &mut self,
        first_seq: u64,
        count: u32,
        time_range: (i64, i64),
        records: &[u8],
        head: ChainHead,
    ) -> Result<(), AuditError> {
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
        seg.len += block.len() as u64;
        seg.dirty = true;
        self.head = head;
        if seg.len >= self.max_bytes {
            self.close_segment()?;
        }
        Ok(())
    }

    /// Rotates the open segment if it is older than the age limit.
    pub fn rotate_if_old(&mut self) -> Result<(), AuditError> {
        if self
            .open
            .as_ref()
            .is_some_and(|s| s.opened.elapsed() >= self.max_age)
        {
            self.close_segment()?;
        }
        Ok(())
    }

    /// fsyncs the open segment if anything was written since the last sync.
    pub fn sync(&mut self) -> Result<(), AuditError> {
        if let Some(seg) = self.open.as_mut().filter(|s| s.dirty) {
            seg.file.sync_data().map_err(io(&seg.path))?;
            seg.dirty = false;
        }
        Ok(())
    }

    /// Syncs and closes the open segment; the next append starts a new one.
    pub fn close_segment(&mut self) -> Result<(), AuditError> {
        self.sync()?;
        self.open = None;
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
        file.write_all(&header).map_err(io(&path))?;
        file.sync_all().map_err(io(&path))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        self.next_segment += 1;
        self.open = Some(OpenSegment {
            path,
            file,
            len: header.len() as u64,
            opened: Instant::now(),
            dirty: false,
        });
        Ok(())
    }
}

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
        store.append(seq, 1, (0, 0), &line, head).unwrap();
        hash
    }

    #[test]
    fn rotates_by_size_and_age_and_reopens_at_the_head() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, _) = SegmentStore::open(dir.path(), 1, Duration::from_secs(3600)).unwrap();
        for seq in 1..=3 {
            append_one(&mut store, seq);
        }
        assert_eq!(list_segments(dir.path()).unwrap().len(), 3);

        let (mut store, _) = SegmentStore::open(dir.path(), 1 << 20, Duration::ZERO).unwrap();
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
    }
}
