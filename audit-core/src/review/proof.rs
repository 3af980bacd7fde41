//! Evidence about single records and about the trail's history, checked with a public
//! key alone: an inclusion proof shows that a record is leaf `seq - 1` of the Merkle
//! tree whose head a checkpoint signed; a consistency proof shows that a later
//! checkpoint's tree extends an earlier one's without rewriting it (RFC 6962/9162).
//!
//! Proofs are computed in one pass over the records after the newest checkpoint that
//! precedes everything asked for (its frontier is where the pass starts), holding only
//! the subtree heads the proofs need: memory does not grow with the trail.

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};

use super::reader::{self, TrailSource};
use crate::{
    merkle::{self, Hash, Prover, Range},
    segment,
    signing::{self, Checkpoint, Seal, SigCheck, TreeHead},
    AuditError,
};

pub const INCLUSION_KIND: &str = "custody.inclusion/v1";
pub const CONSISTENCY_KIND: &str = "custody.consistency/v1";

/// That a record is in the trail, as `custody log prove` prints it (one JSON line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InclusionProof {
    pub kind: String,
    /// The record's `seq`: it is leaf `seq - 1`.
    pub seq: u64,
    /// The record line exactly as stored.
    pub record: String,
    /// Leaves of the tree the proof leads to.
    pub tree_size: u64,
    /// Subtree heads from the leaf up (hex).
    pub path: Vec<String>,
    /// The signed statement (a checkpoint line) whose tree head the path leads to.
    pub head: String,
}

/// That the trail at one checkpoint is a prefix of the trail at a later one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsistencyProof {
    pub kind: String,
    /// The earlier checkpoint line, the later one, and the subtree heads between them.
    pub first: String,
    pub second: String,
    pub path: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProofError {
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// The trail cannot give the proof asked for; the text says why.
    #[error("{0}")]
    Cannot(String),
    /// A proof that does not hold; the text says which check failed.
    #[error("proof does not hold: {0}")]
    Invalid(String),
}

fn cannot(what: impl Into<String>) -> ProofError {
    ProofError::Cannot(what.into())
}

fn invalid(what: impl Into<String>) -> ProofError {
    ProofError::Invalid(what.into())
}

/// A checkpoint of the trail's log with its line as stored.
#[derive(Debug, Clone)]
pub struct SignedCheckpoint {
    pub line: Vec<u8>,
    pub checkpoint: Checkpoint,
}

impl SignedCheckpoint {
    fn tree(&self) -> Option<&TreeHead> {
        self.checkpoint.tree.as_ref()
    }
}

/// The trail's checkpoints that carry a tree head, oldest first (unchecked: proofs are
/// checked against the key, and `verify` checks the log).
pub fn checkpoints(source: &dyn TrailSource) -> Result<Vec<SignedCheckpoint>, ProofError> {
    let Some(bytes) = source.checkpoints()? else {
        return Ok(Vec::new());
    };
    Ok(bytes
        .split(|&b| b == b'\n')
        .filter_map(|line| {
            let checkpoint: Checkpoint = serde_json::from_slice(line).ok()?;
            checkpoint.tree.as_ref()?;
            Some(SignedCheckpoint {
                line: line.to_vec(),
                checkpoint,
            })
        })
        .collect())
}

fn newest_head(cps: &[SignedCheckpoint]) -> Result<&SignedCheckpoint, ProofError> {
    cps.last().ok_or_else(|| {
        cannot("no seal or checkpoint carries a tree head yet (a trail written before tree heads, or none written)")
    })
}

/// The frontier to start a pass from: the newest checkpoint at or before `at` leaves.
fn start_at(cps: &[SignedCheckpoint], at: u64) -> Range {
    cps.iter()
        .rev()
        .filter_map(SignedCheckpoint::tree)
        .filter(|t| t.size <= at)
        .find_map(TreeHead::range)
        .unwrap_or_default()
}

/// The trail's segments with the seq each starts at (from their headers).
struct Layout {
    segs: Vec<reader::SegmentRef>,
    starts: Vec<u64>,
}

impl Layout {
    fn read(source: &dyn TrailSource) -> Result<Self, ProofError> {
        let segs = source.segments()?;
        let mut starts = Vec::with_capacity(segs.len());
        for seg in &segs {
            let frames = segment::FrameReader::new(source.open(seg)?, false).map_err(|e| {
                AuditError::Format {
                    path: seg.path.clone(),
                    source: e,
                }
            })?;
            starts.push(frames.header().first_seq);
        }
        Ok(Self { segs, starts })
    }

    /// The segment holding `seq`.
    fn holding(&self, seq: u64) -> Option<usize> {
        self.starts.iter().rposition(|&s| s <= seq)
    }

    /// A segment's seal, when it has one that carries a tree head.
    fn seal(&self, source: &dyn TrailSource, i: usize) -> Result<Option<SignedHead>, ProofError> {
        let seg = &self.segs[i];
        let format = |e| AuditError::Format {
            path: seg.path.clone(),
            source: e,
        };
        let mut frames = segment::FrameReader::new(source.open(seg)?, false).map_err(format)?;
        loop {
            match frames.next_frame() {
                Ok(Some((_, segment::Frame::Seal(s, _)))) => {
                    return Ok(s.seal.tree.clone().map(|tree| SignedHead {
                        line: s.line.clone(),
                        tree,
                    }))
                }
                Ok(Some(_)) => {}
                // Unsealed, or a live tail: no seal to prove to.
                Ok(None) | Err(_) => return Ok(None),
            }
        }
    }

    /// Pushes the trail's leaves from where `prover` stands until it is full.
    fn feed(&self, source: &dyn TrailSource, prover: &mut Prover) -> Result<(), ProofError> {
        let newest = self.segs.last().map(|s| s.number);
        for (i, seg) in self.segs.iter().enumerate() {
            if prover.is_full() {
                break;
            }
            // Segments wholly before the pass are skipped.
            let next_start = self.starts.get(i + 1).copied().unwrap_or(u64::MAX);
            if next_start <= prover.position() + 1 {
                continue;
            }
            let mut seq = self.starts[i];
            let mut broken = None;
            reader::for_each_line_in(source, seg, Some(seg.number) == newest, |line| {
                if seq > prover.position() {
                    match segment::stated_hash(line) {
                        Some(h) if seq == prover.position() + 1 => {
                            prover.push(merkle::leaf_hash(&h))
                        }
                        _ => {
                            broken = Some(seq);
                            return std::ops::ControlFlow::Break(());
                        }
                    }
                }
                seq += 1;
                if prover.is_full() {
                    std::ops::ControlFlow::Break(())
                } else {
                    std::ops::ControlFlow::Continue(())
                }
            })?;
            if let Some(at) = broken {
                return Err(cannot(format!(
                    "{}: the records do not run on at seq {at} (run custody log verify)",
                    seg.name()
                )));
            }
        }
        Ok(())
    }
}

/// A signed statement (seal or checkpoint line, as stored) and the tree head it signs.
#[derive(Debug, Clone)]
struct SignedHead {
    line: Vec<u8>,
    tree: TreeHead,
}

fn hexes(hashes: &[Hash]) -> Vec<String> {
    hashes.iter().map(hex::encode).collect()
}

/// The `seq` a record line states.
fn seq_of(line: &[u8]) -> Option<u64> {
    #[derive(Deserialize)]
    struct Seq {
        seq: u64,
    }
    serde_json::from_slice::<Seq>(line).ok().map(|s| s.seq)
}

/// Inclusion proofs for record lines (as stored): each to the tree head its segment's
/// seal signs, so that proving reads that segment only; a record of the open segment
/// to the newest checkpoint's.
pub fn prove_lines(
    source: &dyn TrailSource,
    lines: &[Vec<u8>],
) -> Result<Vec<InclusionProof>, ProofError> {
    let cps = checkpoints(source)?;
    let layout = Layout::read(source)?;
    let newest = cps.last().and_then(|c| {
        c.tree().map(|t| SignedHead {
            line: c.line.clone(),
            tree: t.clone(),
        })
    });
    // Which head each record proves to, and the records per head.
    let mut seals: std::collections::HashMap<usize, Option<SignedHead>> = Default::default();
    let mut seal_of = |k: usize| -> Result<Option<SignedHead>, ProofError> {
        if let Some(s) = seals.get(&k) {
            return Ok(s.clone());
        }
        let s = layout.seal(source, k)?;
        seals.insert(k, s.clone());
        Ok(s)
    };
    let mut groups: Vec<(SignedHead, Vec<usize>)> = Vec::new();
    let mut seqs = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        let seq = seq_of(line)
            .filter(|&s| s > 0)
            .ok_or_else(|| cannot("a record without a seq"))?;
        seqs.push(seq);
        let sealed = match layout.holding(seq) {
            Some(k) => seal_of(k)?,
            None => None,
        };
        let head = match sealed.filter(|s| s.tree.size >= seq) {
            Some(s) => s,
            None => match &newest {
                Some(n) if n.tree.size >= seq => n.clone(),
                Some(n) => {
                    return Err(cannot(format!(
                        "record seq {seq} was written after the newest checkpoint (seq {}): prove it once the next checkpoint is written",
                        n.tree.size
                    )))
                }
                None => return Err(cannot(
                    "no seal or checkpoint carries a tree head yet (a trail written before tree heads, or none written)",
                )),
            },
        };
        match groups.iter_mut().find(|(h, _)| h.line == head.line) {
            Some((_, members)) => members.push(i),
            None => groups.push((head, vec![i])),
        }
    }
    let mut out: Vec<Option<InclusionProof>> = vec![None; lines.len()];
    for (head, members) in groups {
        let size = head.tree.size;
        let wanted = members
            .iter()
            .flat_map(|&i| merkle::inclusion_ranges(seqs[i] - 1, size).unwrap_or_default());
        let first = members.iter().map(|&i| seqs[i] - 1).min().unwrap_or(0);
        // Start where the segment before the first record ends (its seal's frontier),
        // or at a later checkpoint: one segment read per seal proven to.
        let mut start = start_at(&cps, first);
        if let Some(k) = layout.holding(first + 1).and_then(|k| k.checked_sub(1)) {
            if let Some(r) = seal_of(k)?
                .and_then(|s| s.tree.range())
                .filter(|r| r.end() > start.end() && r.end() <= first)
            {
                start = r;
            }
        }
        let mut prover = Prover::new(size, wanted, start);
        layout.feed(source, &mut prover)?;
        let (heads, root) = finish(prover)?;
        if Some(root) != head.tree.root_hash() {
            return Err(cannot(
                "the records do not give the tree head that was signed (run custody log verify)",
            ));
        }
        let head_line = String::from_utf8_lossy(&head.line).into_owned();
        for i in members {
            let seq = seqs[i];
            let path: Vec<Hash> = merkle::inclusion_ranges(seq - 1, size)
                .unwrap_or_default()
                .iter()
                .map(|r| heads.get(r).copied())
                .collect::<Option<_>>()
                .ok_or_else(|| cannot("a subtree head is missing"))?;
            out[i] = Some(InclusionProof {
                kind: INCLUSION_KIND.into(),
                seq,
                record: String::from_utf8(lines[i].clone())
                    .map_err(|_| cannot("a record line is not UTF-8"))?,
                tree_size: size,
                path: hexes(&path),
                head: head_line.clone(),
            });
        }
    }
    Ok(out.into_iter().flatten().collect())
}

/// Inclusion proofs for records by id.
pub fn prove(source: &dyn TrailSource, ids: &[String]) -> Result<Vec<InclusionProof>, ProofError> {
    let lines = ids
        .iter()
        .map(|id| reader::find_by_id(source, id))
        .collect::<Result<Vec<_>, _>>()?;
    prove_lines(source, &lines)
}

fn finish(prover: Prover) -> Result<(merkle::Heads, Hash), ProofError> {
    prover.finish().map_err(|(a, b)| {
        cannot(format!(
            "the trail no longer holds records {}..{} the proof needs (deleted by retention, or missing)",
            a + 1,
            b
        ))
    })
}

/// The proof that the trail at `first` (a checkpoint line kept from earlier) is a prefix
/// of the trail at its newest checkpoint.
pub fn prove_consistency(
    source: &dyn TrailSource,
    first: &[u8],
) -> Result<ConsistencyProof, ProofError> {
    let earlier: Checkpoint = serde_json::from_slice(first.trim_ascii())
        .map_err(|e| cannot(format!("not a checkpoint line: {e}")))?;
    let Some(from) = earlier.tree else {
        return Err(cannot("the earlier checkpoint has no tree head"));
    };
    let cps = checkpoints(source)?;
    let head = newest_head(&cps)?;
    let Some(to) = head.tree() else {
        return Err(cannot("the newest checkpoint has no tree head"));
    };
    if from.size == 0 || from.size > to.size {
        return Err(cannot(format!(
            "the earlier checkpoint covers {} records and the newest {}: nothing to prove",
            from.size, to.size
        )));
    }
    let ranges = merkle::consistency_ranges(from.size, to.size).unwrap_or_default();
    let mut prover = Prover::new(to.size, ranges.clone(), start_at(&cps, from.size));
    Layout::read(source)?.feed(source, &mut prover)?;
    let (heads, _) = finish(prover)?;
    let path: Vec<Hash> = ranges
        .iter()
        .map(|r| heads.get(r).copied())
        .collect::<Option<_>>()
        .ok_or_else(|| cannot("a subtree head is missing"))?;
    Ok(ConsistencyProof {
        kind: CONSISTENCY_KIND.into(),
        first: String::from_utf8_lossy(first.trim_ascii()).into_owned(),
        second: String::from_utf8_lossy(&head.line).into_owned(),
        path: hexes(&path),
    })
}

/// What a checked proof shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proven {
    Inclusion {
        id: Option<String>,
        seq: u64,
        tree_size: u64,
        root: String,
        signed_at: String,
    },
    Consistency {
        first_size: u64,
        second_size: u64,
        first_at: String,
        second_at: String,
    },
}

/// A signed statement holding a tree head: a checkpoint or a seal line, with its
/// signature checked against `key`.
fn signed_tree(line: &[u8], key: &VerifyingKey) -> Result<(TreeHead, String), ProofError> {
    #[derive(Deserialize)]
    struct Kind {
        kind: String,
    }
    let kind: Kind =
        serde_json::from_slice(line).map_err(|e| invalid(format!("head is not JSON: {e}")))?;
    let (tree, stated_key, time) = match kind.kind.as_str() {
        "checkpoint" => {
            let c: Checkpoint = serde_json::from_slice(line)
                .map_err(|e| invalid(format!("head is not a checkpoint: {e}")))?;
            (c.tree, c.key, c.time)
        }
        "seal" => {
            let s: Seal = serde_json::from_slice(line)
                .map_err(|e| invalid(format!("head is not a seal: {e}")))?;
            (s.tree, s.key, s.time)
        }
        other => {
            return Err(invalid(format!(
                "head is a `{other}`, not a signed statement"
            )))
        }
    };
    match signing::check_line(line, stated_key.as_deref(), Some(key)) {
        SigCheck::Valid => {}
        SigCheck::Unsigned => return Err(invalid("the head is not signed")),
        SigCheck::OtherKey(k) => {
            return Err(invalid(format!("the head is signed by another key ({k})")))
        }
        SigCheck::Invalid => return Err(invalid("the head's signature is not valid for this key")),
    }
    let tree = tree.ok_or_else(|| invalid("the head carries no tree head"))?;
    Ok((tree, time))
}

fn parse_path(path: &[String]) -> Result<Vec<Hash>, ProofError> {
    path.iter()
        .map(|h| signing::parse_hash(h).ok_or_else(|| invalid("a path entry is not 64 hex digits")))
        .collect()
}

/// Checks one proof (a JSON line as `custody log prove` writes it) with only the
/// public key.
pub fn check(proof: &[u8], key: &VerifyingKey) -> Result<Proven, ProofError> {
    #[derive(Deserialize)]
    struct Kind {
        kind: String,
    }
    let kind: Kind =
        serde_json::from_slice(proof).map_err(|e| invalid(format!("not a proof: {e}")))?;
    match kind.kind.as_str() {
        INCLUSION_KIND => {
            let p: InclusionProof = serde_json::from_slice(proof)
                .map_err(|e| invalid(format!("not an inclusion proof: {e}")))?;
            check_inclusion(&p, key)
        }
        CONSISTENCY_KIND => {
            let p: ConsistencyProof = serde_json::from_slice(proof)
                .map_err(|e| invalid(format!("not a consistency proof: {e}")))?;
            check_consistency(&p, key)
        }
        other => Err(invalid(format!("unknown proof kind `{other}`"))),
    }
}

pub fn check_inclusion(p: &InclusionProof, key: &VerifyingKey) -> Result<Proven, ProofError> {
    let record = p.record.as_bytes();
    let hash = segment::check_line_hash(record)
        .map_err(|w| invalid(format!("the record's own hash: {w}")))?;
    if seq_of(record) != Some(p.seq) || p.seq == 0 {
        return Err(invalid("the record's seq is not the proof's"));
    }
    let (tree, signed_at) = signed_tree(p.head.as_bytes(), key)?;
    if tree.size != p.tree_size {
        return Err(invalid(
            "the proof is for another tree size than the head's",
        ));
    }
    let root = tree
        .root_hash()
        .ok_or_else(|| invalid("the head's tree root is not hex"))?;
    let path = parse_path(&p.path)?;
    if !merkle::verify_inclusion(
        p.seq - 1,
        tree.size,
        &merkle::leaf_hash(&hash),
        &path,
        &root,
    ) {
        return Err(invalid(
            "the path does not lead from the record to the signed tree head",
        ));
    }
    #[derive(Deserialize)]
    struct Id {
        id: Option<String>,
    }
    Ok(Proven::Inclusion {
        id: serde_json::from_slice::<Id>(record).ok().and_then(|i| i.id),
        seq: p.seq,
        tree_size: tree.size,
        root: tree.root,
        signed_at,
    })
}

pub fn check_consistency(p: &ConsistencyProof, key: &VerifyingKey) -> Result<Proven, ProofError> {
    let (first, first_at) = signed_tree(p.first.as_bytes(), key)?;
    let (second, second_at) = signed_tree(p.second.as_bytes(), key)?;
    let (Some(a), Some(b)) = (first.root_hash(), second.root_hash()) else {
        return Err(invalid("a tree root is not hex"));
    };
    let path = parse_path(&p.path)?;
    if !merkle::verify_consistency(first.size, second.size, &path, &a, &b) {
        return Err(invalid(
            "the later tree does not extend the earlier one (the trail was rewritten, or the proof is not for these heads)",
        ));
    }
    Ok(Proven::Consistency {
        first_size: first.size,
        second_size: second.size,
        first_at,
        second_at,
    })
}
