//! Segment indexes: a small `<segment>.idx` beside each sealed segment, holding its time
//! range, a seek table of its blocks, and the distinct values of the fields searches
//! filter on. Search uses them to skip segments and blocks that cannot match; they are
//! an accelerator only, never evidence (verify does not read them, and a missing or
//! unreadable index just means a full scan).

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{record::Record, segment::ParsedSegment, AuditError};

/// The distinct values of the searchable fields in a set of records.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Facts {
    pub models: BTreeSet<String>,
    pub routes: BTreeSet<String>,
    pub key_ids: BTreeSet<String>,
    pub statuses: BTreeSet<u16>,
    pub outcomes: BTreeSet<String>,
    pub entities: BTreeSet<String>,
    /// `client.user` and `client.end_user` (absent in indexes written before them).
    #[serde(default)]
    pub users: BTreeSet<String>,
    /// Policies with a decision on some record (none before policies existed).
    #[serde(default)]
    pub policies: BTreeSet<String>,
}

impl Facts {
    pub fn add_record(&mut self, r: &Record) {
        if let Some(g) = &r.gen_ai {
            self.models.extend(g.request.model.iter().cloned());
            self.models
                .extend(g.response.as_ref().and_then(|x| x.model.clone()));
        }
        self.routes.extend(r.route.iter().cloned());
        self.key_ids.extend(r.client.key_id.iter().cloned());
        self.statuses.extend(r.http.status);
        self.outcomes.insert(r.outcome.clone());
        self.entities.extend(r.redactions.keys().cloned());
        self.users.extend(r.client.user.iter().cloned());
        self.users.extend(r.client.end_user.iter().cloned());
        if let Some(p) = &r.policy {
            for d in &p.decisions {
                // Most records repeat a known name: no copy for those.
                if !self.policies.contains(&d.name) {
                    self.policies.insert(d.name.clone());
                }
            }
        }
    }

    /// The same from a stored record (for segments indexed after the fact).
    pub fn add_value(&mut self, v: &Value) {
        let s = |v: &Value| v.as_str().map(str::to_owned);
        self.models.extend(s(&v["gen_ai"]["request"]["model"]));
        self.models.extend(s(&v["gen_ai"]["response"]["model"]));
        self.routes.extend(s(&v["route"]));
        self.key_ids.extend(s(&v["client"]["key_id"]));
        self.statuses.extend(
            v["http"]["status"]
                .as_u64()
                .and_then(|x| u16::try_from(x).ok()),
        );
        self.outcomes.extend(s(&v["outcome"]));
        if let Some(m) = v["redactions"].as_object() {
            self.entities.extend(m.keys().cloned());
        }
        self.users.extend(s(&v["client"]["user"]));
        self.users.extend(s(&v["client"]["end_user"]));
        for d in v["policy"]["decisions"].as_array().into_iter().flatten() {
            self.policies.extend(s(&d["name"]));
        }
    }

    pub fn merge(&mut self, o: &Facts) {
        self.models.extend(o.models.iter().cloned());
        self.routes.extend(o.routes.iter().cloned());
        self.key_ids.extend(o.key_ids.iter().cloned());
        self.statuses.extend(o.statuses.iter().copied());
        self.outcomes.extend(o.outcomes.iter().cloned());
        self.entities.extend(o.entities.iter().cloned());
        self.users.extend(o.users.iter().cloned());
        self.policies.extend(o.policies.iter().cloned());
    }
}

/// One block in the seek table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockEntry {
    /// Byte offset of the block header frame, and length of header and zstd frame.
    pub offset: u64,
    pub len: u64,
    pub first_seq: u64,
    pub count: u32,
    pub first_ms: i64,
    pub last_ms: i64,
}

/// `<segment>.idx`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentIndex {
    pub v: u32,
    pub segment: u64,
    /// Length of the segment file this index describes (a quick staleness check).
    pub segment_bytes: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub first_ms: i64,
    pub last_ms: i64,
    pub blocks: Vec<BlockEntry>,
    pub facts: Facts,
    /// Where the seal frame starts; the seal holds this index's [`digest`]. Absent in
    /// indexes written before seals vouched for them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seal_at: Option<u64>,
    /// The `purge` event that rewrote the segment: its seal no longer holds this index's
    /// digest, the event does (see [`crate::purge`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purged_by: Option<EventRef>,
    /// A hint for content retention: no body is left in the segment to purge.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub content_purged: bool,
}

/// Where an event lies: its segment and `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRef {
    pub segment: u64,
    pub seq: u64,
}

/// The hex SHA-256 a seal holds for its index: of the index's JSON with
/// `segment_bytes` as 0 (the file's length includes the seal, written after it) and
/// without what a purge adds.
pub fn digest(index: &SegmentIndex) -> String {
    use sha2::{Digest, Sha256};
    let mut canonical = index.clone();
    canonical.segment_bytes = 0;
    // Written after the digest was stated, by the purge that stated it.
    canonical.purged_by = None;
    canonical.content_purged = false;
    hex::encode(Sha256::digest(
        serde_json::to_vec(&canonical).unwrap_or_default(),
    ))
}

pub fn index_path(segment: &Path) -> PathBuf {
    segment.with_extension("idx")
}

/// Writes an index beside its segment (through a temporary file and a rename).
pub fn write(segment: &Path, index: &SegmentIndex) -> Result<(), AuditError> {
    let path = index_path(segment);
    let tmp = path.with_extension("idx.tmp");
    let io = |source| AuditError::Io {
        path: path.clone(),
        source,
    };
    let body = serde_json::to_vec(index).map_err(|e| io(std::io::Error::other(e)))?;
    write_private(&tmp, &body).map_err(io)?;
    fs::rename(&tmp, &path).map_err(io)
}

/// Writes a file readable by custody's user only (0600), as every file of the trail.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    opts.open(path)?.write_all(bytes)
}

/// The index of a segment, if it has a readable one that matches the file's length.
pub fn load(segment: &Path) -> Option<SegmentIndex> {
    let idx: SegmentIndex = serde_json::from_slice(&fs::read(index_path(segment)).ok()?).ok()?;
    let len = fs::metadata(segment).ok()?.len();
    (idx.segment_bytes == len).then_some(idx)
}

/// An index built from a parsed segment (for a segment sealed at recovery).
pub fn from_parsed(number: u64, parsed: &ParsedSegment, segment_bytes: u64) -> SegmentIndex {
    let mut facts = Facts::default();
    let mut blocks = Vec::new();
    let ends: Vec<u64> = parsed
        .blocks
        .iter()
        .skip(1)
        .map(|b| b.offset)
        .chain(std::iter::once(
            parsed.seal.as_ref().map_or(parsed.valid_len, |s| s.offset),
        ))
        .collect();
    for (b, end) in parsed.blocks.iter().zip(ends) {
        for line in b.lines() {
            if let Ok(v) = serde_json::from_slice::<Value>(line) {
                facts.add_value(&v);
            }
        }
        blocks.push(BlockEntry {
            offset: b.offset,
            len: end - b.offset,
            first_seq: b.header.first_seq,
            count: b.header.count,
            first_ms: b.header.first_ms,
            last_ms: b.header.last_ms,
        });
    }
    let count: u64 = blocks.iter().map(|b| u64::from(b.count)).sum();
    SegmentIndex {
        v: 1,
        segment: number,
        segment_bytes,
        first_seq: parsed.header.first_seq,
        last_seq: parsed.header.first_seq + count - 1,
        first_ms: blocks.iter().map(|b| b.first_ms).min().unwrap_or(0),
        last_ms: blocks.iter().map(|b| b.last_ms).max().unwrap_or(0),
        blocks,
        facts,
        seal_at: None,
        purged_by: None,
        content_purged: false,
    }
}
