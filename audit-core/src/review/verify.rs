//! Verifying a trail: every frame checksum, record hash and chain link; `seq` and
//! segment-number continuity; every seal (its fields, the segment's SHA-256, its link to
//! the previous seal, its signature); every checkpoint (its link, its signature) and that
//! the newest checkpoint matches the trail's bytes and chain. The first break is named.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use ed25519_dalek::VerifyingKey;
use serde::Deserialize;

use super::reader;
use crate::{
    merkle::{self, Hash, Range},
    segment,
    signing::{self, Checkpoint, SigCheck, TreeHead, ZERO_HEX},
    store::CHECKPOINTS,
    AuditError,
};

/// A trail that holds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VerifyReport {
    pub segments: usize,
    /// Exchange records (events not included).
    pub records: u64,
    /// Event records (recovery and the like).
    pub events: u64,
    pub bytes: u64,
    /// Hex hash of the newest record, if any.
    pub head: Option<String>,
    pub last_seq: Option<u64>,
    pub seals: usize,
    pub checkpoints: usize,
    /// Public keys that signed seals or checkpoints.
    pub keys: BTreeSet<String>,
    /// Seals and checkpoints without a signature.
    pub unsigned: usize,
    /// Whether signatures were checked against a trusted key (`--pubkey`).
    pub trusted: bool,
    /// Records after the newest checkpoint: intact, but not yet covered by one (a live
    /// trail between checkpoints, or a crash not yet followed by a restart).
    pub uncovered: u64,
    /// Recovery events in the chain (crashes repaired at start-up).
    pub recoveries: u64,
    /// Segments deleted by retention, as accounted for by retention events.
    pub retired: u64,
    /// `purge` events in the chain (content retention, data subjects' requests).
    pub purges: u64,
    /// Segments whose bytes a purge event accounts for (rewritten with bodies purged),
    /// and the bodies found purged in them: content purged by policy.
    pub purged_segments: u64,
    pub purged_bodies: u64,
    /// Segments a purge event names that still hold their original bytes: the purge
    /// was recorded but not applied (a crash in between; the next pass applies it).
    pub purges_pending: Vec<String>,
    /// Sealed segments were checked through their signed SHA-256 (`Depth::Fast`); their
    /// records (and events) are counted together in `records`.
    pub fast: bool,
    /// The newest checkpoint: when it was written, the newest record it covers, and the
    /// key that signed it (`None`: unsigned).
    pub newest_checkpoint: Option<(String, u64, Option<String>)>,
    /// Seals and checkpoints whose signed Merkle tree head was recomputed from the
    /// records and matched.
    pub tree_heads: usize,
}

/// Where and how the trail breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{segment}{}: {what}", seq.map(|s| format!(", record seq {s}")).unwrap_or_default())]
pub struct Break {
    /// File name of the segment (or of the checkpoint log).
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
    #[serde(default)]
    schema: String,
    #[serde(default)]
    event: Option<EventKind>,
    chain: LinkChain,
}

#[derive(Deserialize)]
struct EventKind {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    removed: Vec<Removed>,
    /// A purge's rewritten segments (other events' `segments` mean something else).
    #[serde(default)]
    segments: serde_json::Value,
}

/// A segment rewritten by a purge, as its event states it.
#[derive(Deserialize, Clone)]
struct PurgeStatement {
    segment: String,
    /// The hash of the seal it was rewritten under, and the bytes it had and has.
    seal: String,
    before: String,
    after: String,
}

/// A segment deleted by retention, as its event names it.
#[derive(Deserialize)]
struct Removed {
    segment: String,
    seal: String,
    last_seq: u64,
    head: String,
    /// The tree head of its seal: where the remaining trail's tree starts.
    #[serde(default)]
    tree: Option<TreeHead>,
}

#[derive(Deserialize)]
struct LinkChain {
    prev: String,
}

/// `seq`, `chain.prev` and whether it is an event, read by position from a line as
/// custody writes it (`{"schema":...,"id":...,"seq":N,...,"chain":{"prev":P,"hash":H}}`)
/// without parsing the JSON; `None` sends the line to the full parser.
fn fast_link(line: &[u8]) -> Option<(u64, [u8; 32], bool)> {
    const HASH_SEP: &[u8] = b"\",\"hash\":\"";
    const PREV_KEY: &[u8] = b"\"prev\":\"";
    let n = line.len();
    let h = n.checked_sub(67)?;
    let p = h.checked_sub(HASH_SEP.len() + 64)?;
    if &line[h - HASH_SEP.len()..h] != HASH_SEP
        || &line[p.checked_sub(PREV_KEY.len())?..p] != PREV_KEY
    {
        return None;
    }
    let mut prev = [0u8; 32];
    hex::decode_to_slice(&line[p..p + 64], &mut prev).ok()?;
    let head = &line[..n.min(200)];
    let at = memchr::memmem::find(head, b",\"seq\":")? + 7;
    let digits = head[at..].iter().take_while(|c| c.is_ascii_digit()).count();
    let seq = std::str::from_utf8(&head[at..at + digits])
        .ok()?
        .parse()
        .ok()?;
    let is_event = line.starts_with(b"{\"schema\":\"custody.event/v1\"");
    Some((seq, prev, is_event))
}

fn broken(segment: &str, seq: Option<u64>, what: impl Into<String>) -> VerifyError {
    VerifyError::Broken(Break {
        segment: segment.to_owned(),
        seq,
        what: what.into(),
    })
}

/// Checks a seal's or checkpoint's signature under the policy; records keys seen.
fn check_sig(
    where_: &str,
    what: &str,
    line: &[u8],
    key: Option<&str>,
    trusted: Option<&VerifyingKey>,
    report: &mut VerifyReport,
) -> Result<(), VerifyError> {
    match signing::check_line(line, key, trusted) {
        SigCheck::Valid => {
            if let Some(k) = key {
                report.keys.insert(k.to_owned());
            }
            Ok(())
        }
        SigCheck::Unsigned if trusted.is_none() => {
            report.unsigned += 1;
            Ok(())
        }
        SigCheck::Unsigned => Err(broken(where_, None, format!("{what} is not signed"))),
        SigCheck::OtherKey(k) => Err(broken(
            where_,
            None,
            format!("{what} is signed by another key ({k})"),
        )),
        SigCheck::Invalid => Err(broken(where_, None, format!("{what} has a bad signature"))),
    }
}

/// What one segment says about itself, checked on its own (in parallel with others).
struct SegmentCheck {
    name: String,
    bytes: u64,
    /// From the header: the hash and seq the segment claims to follow on from.
    prev_hash: [u8; 32],
    first_seq: u64,
    /// The last record's hash and the seq after it.
    head: [u8; 32],
    next_seq: u64,
    records: u64,
    events: u64,
    recoveries: u64,
    removed: Vec<Removed>,
    purges: u64,
    purged: Vec<PurgeStatement>,
    /// Bodies found in their purged form.
    purged_bodies: u64,
    /// The SHA-256 of the bytes before the seal, when it is not the one the seal holds
    /// (which is the second): only a purge event can account for it.
    rewritten: Option<(String, String)>,
    /// The seal: its `prev_seal` and its own hash.
    seal: Option<(String, String)>,
    /// Hashes of the records whose seq a checkpoint names.
    heads: BTreeMap<u64, [u8; 32]>,
    /// The tree over the segment's leaves (`None` when not re-hashed): from 0 when it
    /// started from the previous seal's tree head (`tree_from`: that seal's hash), with
    /// the roots at each record a checkpoint names; else the segment's own range, and
    /// that range as it stood at those records (the first segment after retention).
    tree: Option<Range>,
    tree_from: Option<String>,
    cp_roots: BTreeMap<u64, Hash>,
    cp_trees: BTreeMap<u64, Range>,
    /// The tree head its seal signs.
    seal_tree: Option<TreeHead>,
    keys: BTreeSet<String>,
    unsigned: usize,
}

/// What every segment's check shares.
#[derive(Clone, Copy)]
struct Ctx<'a> {
    trusted: Option<&'a VerifyingKey>,
    cp_seqs: &'a BTreeSet<u64>,
    newest_cp: Option<&'a Checkpoint>,
    fast: bool,
}

/// The tree head the seal of `prev` (the segment before) signs, as a range to grow
/// from, with the seal's hash: phase 2 checks that it is the previous segment's seal.
fn tree_start(
    source: &dyn reader::TrailSource,
    prev: &reader::SegmentRef,
) -> Option<(String, Range)> {
    let mut frames = segment::FrameReader::new(source.open(prev).ok()?, false).ok()?;
    loop {
        match frames.next_frame() {
            Ok(Some((_, segment::Frame::Seal(s, _)))) => {
                let range = s.seal.tree.as_ref()?.range()?;
                return Some((signing::line_hash(&s.line), range));
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return None,
        }
    }
}

/// Checks a segment against itself: frames, record hashes, chain links and `seq` within
/// it, the seal's fields and signature, and the newest checkpoint's prefix if it is the
/// checkpoint's segment. Links to other segments are checked by the caller.
fn check_segment(
    source: &dyn reader::TrailSource,
    seg: &reader::SegmentRef,
    newest: bool,
    start: Option<(String, Range)>,
    ctx: &Ctx<'_>,
) -> Result<SegmentCheck, VerifyError> {
    let Ctx {
        trusted,
        cp_seqs,
        newest_cp,
        fast,
    } = *ctx;
    let name = seg.name();
    // Streamed frame by frame: memory is one block, whatever the file holds.
    let open = |decode| -> Result<Frames<'_>, VerifyError> {
        let mut frames = segment::FrameReader::new(source.open(seg)?, decode)
            .map_err(|e| broken(&name, None, e.to_string()))?;
        if let Some(cp) = newest_cp.filter(|c| c.segment == seg.number) {
            frames.mark_prefix(cp.segment_bytes);
        }
        Ok(frames)
    };
    if fast {
        if let Some(c) = check_sealed_fast(seg, &name, open(false)?, trusted, newest_cp)? {
            return Ok(c);
        }
    }
    let mut frames = open(true)?;
    let h = frames.header().clone();
    if h.segment != seg.number {
        return Err(broken(
            &name,
            None,
            format!(
                "header says segment {} but the file is named for {}",
                h.segment, seg.number
            ),
        ));
    }
    let mut sink = VerifyReport::default();
    let mut c = SegmentCheck {
        name: name.clone(),
        bytes: 0,
        prev_hash: h.prev_hash,
        first_seq: h.first_seq,
        head: h.prev_hash,
        next_seq: h.first_seq,
        records: 0,
        events: 0,
        recoveries: 0,
        removed: Vec::new(),
        purges: 0,
        purged: Vec::new(),
        purged_bodies: 0,
        rewritten: None,
        seal: None,
        heads: BTreeMap::new(),
        tree: None,
        tree_from: None,
        cp_roots: BTreeMap::new(),
        cp_trees: BTreeMap::new(),
        seal_tree: None,
        keys: BTreeSet::new(),
        unsigned: 0,
    };
    match start.filter(|(_, r)| r.end() + 1 == h.first_seq) {
        Some((from, range)) => {
            c.tree = Some(range);
            c.tree_from = Some(from);
        }
        None => c.tree = Some(Range::new(h.first_seq.saturating_sub(1))),
    }
    let mut sealed = None;
    loop {
        let block = match frames.next_frame() {
            Ok(Some((_, segment::Frame::Block(block)))) => block,
            Ok(Some((_, segment::Frame::Seal(s, covered)))) => {
                sealed = Some((s, covered));
                continue;
            }
            Ok(None) => break,
            Err(e) => {
                return Err(broken(
                    &name,
                    Some(c.next_seq),
                    format!("{e} (the segment is damaged or truncated)"),
                ))
            }
        };
        check_block(&name, &block, cp_seqs, &mut c)?;
    }
    c.bytes = frames.offset();
    match &sealed {
        Some((s, covered)) => {
            let seal = &s.seal;
            let mismatch = if seal.segment != seg.number {
                Some("names another segment")
            } else if seal.first_seq != h.first_seq
                || seal.last_seq + 1 != c.next_seq
                || seal.records != c.records + c.events
            {
                Some("does not match the segment's records")
            } else if seal.head != hex::encode(c.head) {
                Some("names a different chain head")
            } else {
                None
            };
            if seal.segment_sha256 != hex::encode(covered) {
                // Rewritten by a purge, or edited: the purge events decide (phase 2).
                c.rewritten = Some((hex::encode(covered), seal.segment_sha256.clone()));
            }
            if let Some(m) = mismatch {
                return Err(broken(&name, None, format!("seal {m}")));
            }
            check_sig(
                &name,
                "seal",
                &s.line,
                seal.key.as_deref(),
                trusted,
                &mut sink,
            )?;
            c.seal = Some((seal.prev_seal.clone(), signing::line_hash(&s.line)));
            c.seal_tree = seal.tree.clone();
        }
        None if !newest => {
            return Err(broken(&name, None, "segment has no seal but is not the newest (it was truncated, or a newer segment was added)"));
        }
        None if c.purged_bodies > 0 => {
            return Err(broken(&name, None, format!("content missing: {} bod{} removed from the live segment, which no purge may touch", c.purged_bodies, if c.purged_bodies == 1 { "y" } else { "ies" })));
        }
        None => {}
    }
    check_newest_checkpoint(&name, seg.number, &frames, newest_cp)?;
    c.keys = sink.keys;
    c.unsigned = sink.unsigned;
    Ok(c)
}

/// The deepest nesting every review command reads (serde_json's default limit).
const READABLE_DEPTH: usize = 127;

type Frames<'a> = segment::FrameReader<Box<dyn std::io::Read + 'a>>;

/// One block's records: hashes, links, `seq` continuity, the count its header states.
fn check_block(
    name: &str,
    block: &segment::Block,
    cp_seqs: &BTreeSet<u64>,
    c: &mut SegmentCheck,
) -> Result<(), VerifyError> {
    if block.header.first_seq != c.next_seq {
        return Err(broken(
            name,
            Some(c.next_seq),
            format!(
                "block at byte {} says it starts at seq {}",
                block.offset, block.header.first_seq
            ),
        ));
    }
    let mut n = 0u32;
    for line in block.lines() {
        n += 1;
        let expected = c.next_seq;
        let (hash, found) =
            segment::check_line(line).map_err(|w| broken(name, Some(expected), w))?;
        c.purged_bodies += u64::from(found.purged);
        // Intact but unreadable is still a trail a reviewer cannot use: a record nested
        // past what JSON readers parse would be skipped by every review command.
        if crate::record::nesting_exceeds(line, READABLE_DEPTH) {
            return Err(broken(
                name,
                Some(expected),
                format!("record is nested deeper than {READABLE_DEPTH} levels: review commands cannot read it"),
            ));
        }
        let (seq, stated_prev, is_event) = match fast_link(line) {
            Some(l) => l,
            None => {
                let link: Link = serde_json::from_slice(line).map_err(|e| {
                    broken(
                        name,
                        Some(expected),
                        format!("record is not valid JSON: {e}"),
                    )
                })?;
                let mut p = [0u8; 32];
                hex::decode_to_slice(&link.chain.prev, &mut p)
                    .map_err(|_| broken(name, Some(expected), "chain.prev is not hex"))?;
                (link.seq, p, link.schema == crate::record::EVENT_SCHEMA)
            }
        };
        if seq != expected {
            return Err(broken(name, Some(expected), format!("found seq {seq} where seq {expected} belongs (a record was removed, inserted or reordered)")));
        }
        if stated_prev != c.head {
            return Err(broken(
                name,
                Some(expected),
                "chain.prev does not match the previous record's hash",
            ));
        }
        if let Some(t) = c.tree.as_mut() {
            t.push(merkle::leaf_hash(&hash));
        }
        if cp_seqs.contains(&seq) {
            c.heads.insert(seq, hash);
            match (&c.tree, &c.tree_from) {
                (Some(t), Some(_)) => {
                    if let Some(root) = t.root() {
                        c.cp_roots.insert(seq, root);
                    }
                }
                (Some(t), None) => {
                    c.cp_trees.insert(seq, t.clone());
                }
                (None, _) => {}
            }
        }
        if is_event {
            c.events += 1;
            let link: Link = serde_json::from_slice(line).map_err(|e| {
                broken(
                    name,
                    Some(expected),
                    format!("event is not valid JSON: {e}"),
                )
            })?;
            if let Some(e) = link.event {
                match e.kind.as_str() {
                    "recovery" => c.recoveries += 1,
                    "retention" => c.removed.extend(e.removed),
                    "purge" => {
                        c.purges += 1;
                        c.purged.extend(
                            serde_json::from_value::<Vec<PurgeStatement>>(e.segments)
                                .unwrap_or_default(),
                        );
                    }
                    _ => {}
                }
            }
        } else {
            c.records += 1;
        }
        c.head = hash;
        c.next_seq += 1;
    }
    if n != block.header.count {
        return Err(broken(
            name,
            Some(c.next_seq),
            format!(
                "block at byte {} says it holds {} records but holds {n}",
                block.offset, block.header.count
            ),
        ));
    }
    Ok(())
}

/// If the newest checkpoint is about this segment, its first `segment_bytes` bytes must
/// hash to what the checkpoint says.
fn check_newest_checkpoint(
    name: &str,
    number: u64,
    frames: &Frames<'_>,
    newest_cp: Option<&Checkpoint>,
) -> Result<(), VerifyError> {
    let Some(cp) = newest_cp.filter(|c| c.segment == number) else {
        return Ok(());
    };
    if cp.segment_bytes > frames.offset() {
        return Err(broken(
            name,
            None,
            format!(
                "the newest checkpoint covers {} bytes of this segment but it holds {} (truncated)",
                cp.segment_bytes,
                frames.offset()
            ),
        ));
    }
    if frames.prefix_digest().map(hex::encode).as_deref() != Some(cp.segment_sha256.as_str()) {
        return Err(broken(
            name,
            None,
            "the newest checkpoint does not match this segment's bytes",
        ));
    }
    Ok(())
}

/// The fast path for a sealed segment: its frames are walked without decompressing, and
/// the seal (signed by the trusted key) vouches for every byte through its SHA-256. The
/// records are not re-hashed one by one. `None` when the segment has no seal.
fn check_sealed_fast(
    seg: &reader::SegmentRef,
    name: &str,
    mut frames: Frames<'_>,
    trusted: Option<&VerifyingKey>,
    newest_cp: Option<&Checkpoint>,
) -> Result<Option<SegmentCheck>, VerifyError> {
    let h = frames.header().clone();
    let mut blocks = Vec::new();
    let mut sealed = None;
    loop {
        match frames.next_frame() {
            Ok(Some((offset, segment::Frame::Block(b)))) => blocks.push((offset, b.header)),
            Ok(Some((_, segment::Frame::Seal(s, covered)))) => sealed = Some((s, covered)),
            Ok(None) => break,
            Err(e) => return Err(broken(name, None, e.to_string())),
        }
    }
    let Some((s, covered)) = sealed else {
        return Ok(None);
    };
    if h.segment != seg.number {
        return Err(broken(
            name,
            None,
            format!(
                "header says segment {} but the file is named for {}",
                h.segment, seg.number
            ),
        ));
    }
    let seal = &s.seal;
    if hex::encode(covered) != seal.segment_sha256 {
        // Rewritten by a purge (or edited): read in full, so purge events can decide.
        return Ok(None);
    }
    let mut sink = VerifyReport::default();
    check_sig(
        name,
        "seal",
        &s.line,
        seal.key.as_deref(),
        trusted,
        &mut sink,
    )?;
    let mut next = h.first_seq;
    for (offset, b) in &blocks {
        if b.first_seq != next {
            return Err(broken(
                name,
                Some(next),
                format!(
                    "block at byte {offset} says it starts at seq {}",
                    b.first_seq
                ),
            ));
        }
        next += u64::from(b.count);
    }
    if seal.segment != seg.number
        || seal.first_seq != h.first_seq
        || seal.last_seq + 1 != next
        || seal.records != next - h.first_seq
    {
        return Err(broken(
            name,
            None,
            "seal does not match the segment's blocks",
        ));
    }
    let mut head = [0u8; 32];
    hex::decode_to_slice(&seal.head, &mut head)
        .map_err(|_| broken(name, None, "seal head is not hex"))?;
    check_newest_checkpoint(name, seg.number, &frames, newest_cp)?;
    let mut heads = BTreeMap::new();
    heads.insert(seal.last_seq, head);
    Ok(Some(SegmentCheck {
        name: name.to_owned(),
        bytes: frames.offset(),
        prev_hash: h.prev_hash,
        first_seq: h.first_seq,
        head,
        next_seq: next,
        records: seal.records,
        events: 0,
        recoveries: 0,
        removed: Vec::new(),
        purges: 0,
        purged: Vec::new(),
        purged_bodies: 0,
        rewritten: None,
        seal: Some((seal.prev_seal.clone(), signing::line_hash(&s.line))),
        heads,
        tree: None,
        tree_from: None,
        cp_roots: BTreeMap::new(),
        cp_trees: BTreeMap::new(),
        seal_tree: seal.tree.clone(),
        keys: sink.keys,
        unsigned: sink.unsigned,
    }))
}

/// How thoroughly to verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// Every frame decompressed, every record re-hashed.
    Full,
    /// Sealed segments checked through their signed SHA-256 (needs a trusted key):
    /// at disk speed, without re-hashing records. Unsealed segments, and every segment of
    /// a trail that retention has shortened, are still checked in full.
    Fast,
}

/// Verifies the trail in `dir`. With `trusted`, every seal and checkpoint must be signed
/// by that key. Segments are checked on their own in parallel (one thread per core),
/// then linked in order; the first break in trail order is reported. `progress` is
/// called after each segment with (done, all, bytes so far).
pub fn verify_dir(
    dir: &Path,
    trusted: Option<&VerifyingKey>,
    progress: impl FnMut(usize, usize, u64),
) -> Result<VerifyReport, VerifyError> {
    verify_dir_with(dir, trusted, Depth::Full, progress)
}

/// [`verify_dir`] at a chosen depth; `Depth::Fast` without a trusted key is `Full`.
pub fn verify_dir_with(
    dir: &Path,
    trusted: Option<&VerifyingKey>,
    depth: Depth,
    progress: impl FnMut(usize, usize, u64),
) -> Result<VerifyReport, VerifyError> {
    verify_source(&reader::DirSource(dir), trusted, depth, progress)
}

/// [`verify_dir_with`] for a trail wherever it lies (a shipped one, read where it is).
pub fn verify_source(
    source: &dyn reader::TrailSource,
    trusted: Option<&VerifyingKey>,
    depth: Depth,
    mut progress: impl FnMut(usize, usize, u64),
) -> Result<VerifyReport, VerifyError> {
    match verify_pass(source, trusted, depth, &mut progress)? {
        Some(report) => Ok(report),
        // A purged segment's bytes are vouched for by an event inside the records.
        None => verify_pass(source, trusted, Depth::Full, &mut progress)?
            .ok_or_else(|| AuditError::Writer("verify could not finish".into()).into()),
    }
}

/// One pass; `None` when a fast pass met a rewritten segment and must be redone in full.
fn verify_pass(
    source: &dyn reader::TrailSource,
    trusted: Option<&VerifyingKey>,
    depth: Depth,
    progress: &mut dyn FnMut(usize, usize, u64),
) -> Result<Option<VerifyReport>, VerifyError> {
    let segs = source.segments()?;
    // Retention events are inside the records: a shortened trail is read in full.
    let fast =
        depth == Depth::Fast && trusted.is_some() && segs.first().is_none_or(|s| s.number == 1);
    let mut report = VerifyReport {
        trusted: trusted.is_some(),
        ..VerifyReport::default()
    };
    let checkpoints = read_checkpoints(source, trusted, &mut report)?;
    let newest_cp = checkpoints.last().cloned();
    let cp_seqs: BTreeSet<u64> = checkpoints
        .iter()
        .filter(|c| c.last_seq > 0)
        .map(|c| c.last_seq)
        .collect();

    // Phase 1: every segment on its own, in parallel.
    let ctx = Ctx {
        trusted,
        cp_seqs: &cp_seqs,
        newest_cp: newest_cp.as_ref(),
        fast,
    };
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(segs.len().max(1));
    let mut results: Vec<Option<Result<SegmentCheck, VerifyError>>> =
        (0..segs.len()).map(|_| None).collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (segs, ctx) = (&segs, &ctx);
                scope.spawn(move || {
                    (t..segs.len())
                        .step_by(threads)
                        .map(|i| {
                            // Each segment's tree grows from the tree head the seal before
                            // it signs (checked when the segments are linked); the first
                            // of a whole trail from nothing.
                            let start = match i.checked_sub(1) {
                                Some(p) if !fast => tree_start(source, &segs[p]),
                                Some(_) => None,
                                None if segs[0].number == 1 => {
                                    Some((ZERO_HEX.to_owned(), Range::new(0)))
                                }
                                None => None,
                            };
                            (
                                i,
                                check_segment(source, &segs[i], i + 1 == segs.len(), start, ctx),
                            )
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            if let Ok(done) = h.join() {
                for (i, r) in done {
                    results[i] = Some(r);
                }
            }
        }
    });

    // Phase 2: link the segments in order.
    let first_number = segs.first().map_or(1, |s| s.number);
    let mut prev = [0u8; 32];
    let mut prev_seal = ZERO_HEX.to_owned();
    let mut expected_seq = 1u64;
    let mut heads: BTreeMap<u64, [u8; 32]> = BTreeMap::new();
    let mut removed: BTreeMap<u64, Removed> = BTreeMap::new();
    let mut gap: Option<(u64, [u8; 32], String)> = None;
    // The Merkle tree over every record so far; after retention it starts from the
    // tree head the retention event carries over from the last deleted seal.
    let mut tree: Option<Range> = if first_number == 1 {
        Some(Range::new(0))
    } else {
        results
            .iter()
            .flatten()
            .filter_map(|r| r.as_ref().ok())
            .flat_map(|c| &c.removed)
            .filter(|r| segment::parse_segment_file_name(&r.segment) == Some(first_number - 1))
            .find_map(|r| r.tree.as_ref().and_then(TreeHead::range))
    };
    let mut cp_roots: BTreeMap<u64, Hash> = BTreeMap::new();
    let mut content = ContentCheck::default();
    for (i, (seg, result)) in segs.iter().zip(results).enumerate() {
        let expected_segment = first_number + i as u64;
        if seg.number != expected_segment {
            return Err(broken(
                &seg.name(),
                None,
                format!(
                    "segment {expected_segment} is missing (the trail jumps from {} to {})",
                    expected_segment - 1,
                    seg.number
                ),
            ));
        }
        let c = result
            .unwrap_or_else(|| Err(AuditError::Writer("a verify thread died".into()).into()))?;
        if i == 0 && first_number > 1 {
            // Oldest segments deleted by retention: the start is taken on trust here and
            // must be accounted for by a retention event further on.
            prev = c.prev_hash;
            expected_seq = c.first_seq;
            prev_seal = c
                .seal
                .as_ref()
                .map_or_else(|| ZERO_HEX.to_owned(), |s| s.0.clone());
            gap = Some((c.first_seq, c.prev_hash, prev_seal.clone()));
        }
        if c.prev_hash != prev {
            return Err(broken(&c.name, None, "header's previous hash does not match the end of the previous segment (a segment was removed, swapped or replaced)"));
        }
        if c.first_seq != expected_seq {
            return Err(broken(
                &c.name,
                Some(expected_seq),
                format!("header says the segment starts at seq {}", c.first_seq),
            ));
        }
        if i == 0 && tree.as_ref().is_some_and(|t| t.end() + 1 != c.first_seq) {
            return Err(broken(
                &c.name,
                None,
                "the retention event's tree head does not end where the remaining trail begins",
            ));
        }
        link_tree(&mut tree, &c, &prev_seal, &mut cp_roots, &mut report)?;
        if let Some((seal_prev, seal_hash)) = &c.seal {
            if *seal_prev != prev_seal {
                return Err(broken(
                    &c.name,
                    None,
                    "seal does not link to the previous segment's seal",
                ));
            }
            prev_seal = seal_hash.clone();
            report.seals += 1;
        }
        prev = c.head;
        expected_seq = c.next_seq;
        report.bytes += c.bytes;
        report.records += c.records;
        report.events += c.events;
        report.recoveries += c.recoveries;
        report.purges += c.purges;
        content.add(&c);
        report.unsigned += c.unsigned;
        report.keys.extend(c.keys);
        heads.extend(c.heads);
        for r in c.removed {
            if let Some(n) = segment::parse_segment_file_name(&r.segment) {
                removed.insert(n, r);
            }
        }
        progress(i + 1, segs.len(), report.bytes);
    }
    if fast && content.found.iter().any(|f| f.rewritten.is_some()) {
        return Ok(None);
    }
    content.resolve(&mut report)?;
    let trail_start = gap.as_ref().map_or(1, |g| g.0);
    if let Some((first_seq, head, seal)) = gap {
        let name = segment::segment_file_name(first_number);
        if let Some(n) = (1..first_number).find(|n| !removed.contains_key(n)) {
            return Err(broken(
                &name,
                None,
                format!("segment {n} is missing and no retention event accounts for it"),
            ));
        }
        let last = &removed[&(first_number - 1)];
        if last.head != hex::encode(head) || last.last_seq + 1 != first_seq || last.seal != seal {
            return Err(broken(
                &name,
                None,
                "the retention event does not match where the remaining trail begins",
            ));
        }
        report.retired = first_number - 1;
    }
    for cp in &checkpoints {
        if cp.last_seq == 0 || cp.last_seq < trail_start || cp.last_seq >= expected_seq {
            continue;
        }
        if let Some(t) = &cp.tree {
            if t.size != cp.last_seq {
                return Err(broken(
                    CHECKPOINTS,
                    Some(cp.last_seq),
                    format!(
                        "a checkpoint's tree head covers {} records, not {}",
                        t.size, cp.last_seq
                    ),
                ));
            }
            if let Some(root) = cp_roots.get(&cp.last_seq) {
                if t.root_hash().as_ref() != Some(root) {
                    return Err(broken(
                        CHECKPOINTS,
                        Some(cp.last_seq),
                        "a checkpoint's tree head does not match the records",
                    ));
                }
                report.tree_heads += 1;
            }
        }
        let found = heads.get(&cp.last_seq);
        if fast && found.is_none() {
            // Inside a segment vouched for by its seal: not re-hashed in fast mode.
            continue;
        }
        if found.map(hex::encode).as_deref() != Some(cp.head.as_str()) {
            return Err(broken(
                CHECKPOINTS,
                Some(cp.last_seq),
                "a checkpoint names a different hash for this record",
            ));
        }
    }
    let last_seq = expected_seq - 1;
    if let Some(cp) = &newest_cp {
        let newest_segment = segs.last().map_or(0, |s| s.number);
        if cp.segment > newest_segment || cp.last_seq > last_seq {
            return Err(broken(
                CHECKPOINTS,
                None,
                format!(
                    "the newest checkpoint covers segment {} up to seq {}, but the trail ends at segment {newest_segment}, seq {last_seq} (segments or records were deleted)",
                    cp.segment, cp.last_seq
                ),
            ));
        }
        report.uncovered = last_seq - cp.last_seq;
    } else {
        if trusted.is_some() && !segs.is_empty() {
            return Err(broken(
                CHECKPOINTS,
                None,
                "there is no checkpoint (the log was deleted?)",
            ));
        }
        report.uncovered = last_seq;
    }
    report.segments = segs.len();
    report.fast = fast;
    report.head = (last_seq > 0).then(|| hex::encode(prev));
    report.last_seq = (last_seq > 0).then_some(last_seq);
    Ok(Some(report))
}

/// Content purged by policy, told from content missing: every segment whose bytes are
/// not those its seal holds, and every purged body, must be accounted for by a purge
/// event that states exactly those bytes.
#[derive(Default)]
struct ContentCheck {
    /// Per segment: what each purge event naming it states (seal, before, after), in order.
    stated: BTreeMap<String, Vec<PurgeStatement>>,
    found: Vec<Found>,
}

/// A segment as verify found it, for the purge events to account for.
struct Found {
    name: String,
    /// Its seal's hash.
    seal: Option<String>,
    /// Its bytes' digest and the sealed one, when they differ.
    rewritten: Option<(String, String)>,
    purged_bodies: u64,
}

impl ContentCheck {
    fn add(&mut self, c: &SegmentCheck) {
        for p in &c.purged {
            self.stated
                .entry(p.segment.clone())
                .or_default()
                .push(p.clone());
        }
        // Resolved once every event is read: a purge is written after what it rewrites.
        let seal = c.seal.as_ref().map(|(_, hash)| hash.clone());
        self.found.push(Found {
            name: c.name.clone(),
            seal,
            rewritten: c.rewritten.clone(),
            purged_bodies: c.purged_bodies,
        });
    }

    fn resolve(self, report: &mut VerifyReport) -> Result<(), VerifyError> {
        for Found {
            name,
            seal,
            rewritten,
            purged_bodies: bodies,
        } in self.found
        {
            // Only statements about this very seal count: a purge event cannot vouch for
            // a segment it did not rewrite.
            let stated: Option<Vec<&PurgeStatement>> = self.stated.get(&name).map(|all| {
                all.iter()
                    .filter(|p| seal.as_deref() == Some(p.seal.as_str()))
                    .collect()
            });
            let stated = stated.filter(|s| !s.is_empty());
            match (rewritten, stated) {
                (Some((now, sealed)), Some(st))
                    if rewrites(&sealed, &st).contains(&now.as_str()) =>
                {
                    report.purged_segments += 1;
                    report.purged_bodies += bodies;
                    if rewrites(&sealed, &st).last() != Some(&now.as_str()) {
                        report.purges_pending.push(name);
                    }
                }
                (Some(_), _) if bodies > 0 => {
                    return Err(broken(&name, None, format!("content missing: {bodies} bod{} removed, and no purge event accounts for the segment's bytes", if bodies == 1 { "y" } else { "ies" })));
                }
                (Some(_), _) => {
                    return Err(broken(
                        &name,
                        None,
                        "seal does not match the segment's bytes",
                    ));
                }
                (None, _) if bodies > 0 => {
                    return Err(broken(&name, None, format!("content missing: {bodies} bod{} removed, and no purge event accounts for it", if bodies == 1 { "y" } else { "ies" })));
                }
                (None, Some(_)) => report.purges_pending.push(name),
                (None, None) => {}
            }
        }
        Ok(())
    }
}

/// The bytes a segment may have, in order, from those it was sealed with: each purge
/// rewrites what the one before it left.
fn rewrites<'a>(sealed: &'a str, stated: &[&'a PurgeStatement]) -> Vec<&'a str> {
    let mut states = vec![sealed];
    for p in stated {
        if states.contains(&p.before.as_str()) {
            states.push(&p.after);
        }
    }
    states
}

/// Grows the trail's tree by a segment: its checkpoints' roots are noted, and its seal's
/// tree head must match. A segment whose tree grew from the previous seal's head must
/// follow that very seal (`prev_seal`). A segment not re-hashed (fast mode) takes its
/// signed seal's word for the tree.
fn link_tree(
    tree: &mut Option<Range>,
    c: &SegmentCheck,
    prev_seal: &str,
    cp_roots: &mut BTreeMap<u64, Hash>,
    report: &mut VerifyReport,
) -> Result<(), VerifyError> {
    let grown = match (&c.tree_from, c.tree.as_ref(), tree.as_mut()) {
        (Some(from), Some(whole), _) => {
            if from != prev_seal {
                return Err(broken(
                    &c.name,
                    None,
                    "the tree does not grow from the previous segment's seal",
                ));
            }
            cp_roots.extend(c.cp_roots.iter().map(|(s, r)| (*s, *r)));
            whole.clone()
        }
        (None, Some(leaves), Some(t)) => {
            for (seq, at) in &c.cp_trees {
                let mut whole = t.clone();
                if whole.extend(at) {
                    if let Some(root) = whole.root() {
                        cp_roots.insert(*seq, root);
                    }
                }
            }
            let mut whole = t.clone();
            if !whole.extend(leaves) {
                *tree = None;
                return Ok(());
            }
            whole
        }
        _ => {
            *tree = c.seal_tree.as_ref().and_then(TreeHead::range);
            return Ok(());
        }
    };
    if let Some(sealed) = &c.seal_tree {
        if TreeHead::of(&grown).as_ref() != Some(sealed) {
            return Err(broken(
                &c.name,
                None,
                "seal's tree head does not match the records",
            ));
        }
        report.tree_heads += 1;
    }
    *tree = Some(grown);
    Ok(())
}

fn read_checkpoints(
    source: &dyn reader::TrailSource,
    trusted: Option<&VerifyingKey>,
    report: &mut VerifyReport,
) -> Result<Vec<Checkpoint>, VerifyError> {
    let Some(bytes) = source.checkpoints()? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    let mut prev = ZERO_HEX.to_owned();
    for (i, line) in bytes
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .enumerate()
    {
        let at = format!("{CHECKPOINTS} line {}", i + 1);
        let cp: Checkpoint = serde_json::from_slice(line)
            .map_err(|e| broken(&at, None, format!("not a checkpoint: {e}")))?;
        if cp.prev != prev {
            return Err(broken(
                &at,
                None,
                "does not link to the previous checkpoint (a checkpoint was removed or edited)",
            ));
        }
        check_sig(&at, "checkpoint", line, cp.key.as_deref(), trusted, report)?;
        prev = signing::line_hash(line);
        out.push(cp);
    }
    report.checkpoints = out.len();
    report.newest_checkpoint = out
        .last()
        .map(|c: &Checkpoint| (c.time.clone(), c.last_seq, c.key.clone()));
    Ok(out)
}
