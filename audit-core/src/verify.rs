//! Verifying a trail: every frame checksum, every record hash, every chain link, and
//! `seq` and segment-number continuity. The first break is reported precisely.

use std::{fs, path::Path};

use serde::Deserialize;

use crate::{reader, segment, AuditError};

/// A trail that holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub segments: usize,
    pub records: u64,
    pub bytes: u64,
    /// Hex hash of the newest record, if any.
    pub head: Option<String>,
    pub last_seq: Option<u64>,
}

/// Where and how the trail breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("segment {segment}{}: {what}", seq.map(|s| format!(", record seq {s}")).unwrap_or_default())]
pub struct Break {
    /// File name of the segment.
    pub segment: String,
    /// The record at fault (or the one expected there).
    pub seq: Option<u64>,
    pub what: String,
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("trail is broken: {0}")]
    Broken(Break),
    #[error(transparent)]
    Audit(#[from] AuditError),
}

#[derive(Deserialize)]
struct Link {
    seq: u64,
    chain: LinkChain,
}

#[derive(Deserialize)]
struct LinkChain {
    prev: String,
}

/// Verifies the trail in `dir`. `progress` is called after each segment with
/// (segments done, segments in all, bytes so far).
pub fn verify_dir(
    dir: &Path,
    mut progress: impl FnMut(usize, usize, u64),
) -> Result<VerifyReport, VerifyError> {
    let segs = reader::segments(dir)?;
    let mut prev = [0u8; 32];
    let mut expected_seq = 1u64;
    let mut records = 0u64;
    let mut bytes_total = 0u64;
    for (i, seg) in segs.iter().enumerate() {
        let expected_segment = i as u64 + 1;
        let name = seg.name();
        let broken = |seq: Option<u64>, what: String| {
            VerifyError::Broken(Break {
                segment: name.clone(),
                seq,
                what,
            })
        };
        if seg.number != expected_segment {
            return Err(broken(
                None,
                format!(
                    "segment {} is missing (the trail jumps from {} to {})",
                    expected_segment,
                    expected_segment.saturating_sub(1),
                    seg.number
                ),
            ));
        }
        let bytes = fs::read(&seg.path).map_err(|source| AuditError::Io {
            path: seg.path.clone(),
            source,
        })?;
        bytes_total += bytes.len() as u64;
        let parsed = segment::parse_segment(&bytes).map_err(|e| broken(None, e.to_string()))?;
        let h = &parsed.header;
        if h.segment != seg.number {
            return Err(broken(
                None,
                format!(
                    "header says segment {} but the file is named for {}",
                    h.segment, seg.number
                ),
            ));
        }
        if h.prev_hash != prev {
            return Err(broken(
                None,
                "header's previous hash does not match the end of the previous segment".into(),
            ));
        }
        if h.first_seq != expected_seq {
            return Err(broken(
                Some(expected_seq),
                format!("header says the segment starts at seq {}", h.first_seq),
            ));
        }
        for block in &parsed.blocks {
            if block.header.first_seq != expected_seq {
                return Err(broken(
                    Some(expected_seq),
                    format!(
                        "block at byte {} says it starts at seq {}",
                        block.offset, block.header.first_seq
                    ),
                ));
            }
            let mut n = 0u32;
            for line in block.lines() {
                n += 1;
                let hash = segment::check_line_hash(line)
                    .map_err(|w| broken(Some(expected_seq), w.to_owned()))?;
                let link: Link = serde_json::from_slice(line).map_err(|e| {
                    broken(Some(expected_seq), format!("record is not valid JSON: {e}"))
                })?;
                if link.seq != expected_seq {
                    return Err(broken(Some(expected_seq), format!("found seq {} where seq {} belongs (a record was removed, inserted or reordered)", link.seq, expected_seq)));
                }
                if link.chain.prev != hex::encode(prev) {
                    return Err(broken(
                        Some(expected_seq),
                        "chain.prev does not match the previous record's hash".into(),
                    ));
                }
                prev = hash;
                expected_seq += 1;
                records += 1;
            }
            if n != block.header.count {
                return Err(broken(
                    Some(expected_seq),
                    format!(
                        "block at byte {} says it holds {} records but holds {n}",
                        block.offset, block.header.count
                    ),
                ));
            }
        }
        if let Some(e) = parsed.tail_error {
            return Err(broken(Some(expected_seq), e.to_string()));
        }
        progress(i + 1, segs.len(), bytes_total);
    }
    Ok(VerifyReport {
        segments: segs.len(),
        records,
        bytes: bytes_total,
        head: (records > 0).then(|| hex::encode(prev)),
        last_seq: (records > 0).then(|| expected_seq - 1),
    })
}
