//! Reading a trail: segments in order, blocks, record lines.

use std::{
    fs,
    ops::ControlFlow,
    path::{Path, PathBuf},
};

use crate::{segment, store::list_segments, AuditError};

/// A segment file of a trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentRef {
    pub number: u64,
    pub path: PathBuf,
}

impl SegmentRef {
    pub fn name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
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
        .map(|(number, path)| SegmentRef { number, path })
        .collect())
}

/// Calls `f` with every record line (without `\n`), oldest first. Stops early when
/// `f` breaks. A damaged frame is an error naming the segment and offset, except at the
/// end of the newest, unsealed segment (a live trail). Use [`crate::verify`] for a full check.
pub fn for_each_line(
    dir: &Path,
    mut f: impl FnMut(&SegmentRef, &[u8]) -> ControlFlow<()>,
) -> Result<(), AuditError> {
    let segs = segments(dir)?;
    let count = segs.len();
    for (i, seg) in segs.into_iter().enumerate() {
        let bytes = fs::read(&seg.path).map_err(|source| AuditError::Io {
            path: seg.path.clone(),
            source,
        })?;
        let parsed = segment::parse_segment(&bytes).map_err(|source| AuditError::Format {
            path: seg.path.clone(),
            source,
        })?;
        for block in &parsed.blocks {
            for line in block.lines() {
                if f(&seg, line).is_break() {
                    return Ok(());
                }
            }
        }
        // The newest segment of a live trail may end in a block being written: what is
        // whole has been read. Anywhere else a damaged frame is an error.
        let live_tail = parsed.seal.is_none() && i + 1 == count;
        if let Some(source) = parsed.tail_error.filter(|_| !live_tail) {
            return Err(AuditError::Format {
                path: seg.path.clone(),
                source,
            });
        }
    }
    Ok(())
}

/// The record line with this `id`.
pub fn find_by_id(dir: &Path, id: &str) -> Result<Vec<u8>, AuditError> {
    let needle = format!("\"id\":{}", serde_json::Value::String(id.to_owned()));
    let mut found = None;
    for_each_line(dir, |_, line| {
        if memchr::memmem::find(line, needle.as_bytes()).is_some() {
            found = Some(line.to_vec());
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    })?;
    found.ok_or_else(|| AuditError::NotFound(id.to_owned()))
}
