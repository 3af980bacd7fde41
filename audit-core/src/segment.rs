//! The segment file format: the single source of truth, mirrored in `docs/segment-format.md`.
//!
//! # Files
//! A trail is a directory of segment files named `{n:020}.seg` (n = 1, 2, ...), so names
//! sort in write order. Only the newest segment is ever appended to; a restart always
//! starts a new one.
//!
//! # Framing
//! A segment is a sequence of frames, every one a valid zstd frame, so `zstd -dc` on a
//! segment prints its records as JSON Lines and ignores the metadata:
//! - first, a **segment header**: a zstd *skippable* frame with magic `0x184D2A50`;
//! - then **blocks**: each a skippable frame with magic `0x184D2A51` (the block header)
//!   followed by one ordinary zstd frame (content checksum and size on) whose content is
//!   one or more records, each a JSON object on one line ending in `\n`.
//!
//! - last, once the segment is closed, a **seal**: a skippable frame with magic
//!   `0x184D2A52` whose content is the seal statement, one line of JSON (see
//!   [`crate::signing`]).
//!
//! A skippable frame is `magic: u32 LE | length: u32 LE | length bytes`. All integers
//! in the headers are little-endian.
//!
//! Segment header content (72 bytes):
//! `b"CUSTODY\0" | version: u16 (=1) | reserved: u16 (=0) | segment: u64 | created_ms: i64 |
//! first_seq: u64 | prev_hash: [u8; 32] | crc32: u32` where `prev_hash` is the chain
//! hash of the last record before this segment (zeros for the first) and `crc32` (IEEE)
//! covers the 68 bytes before it.
//!
//! Block header content (48 bytes):
//! `b"CSTB" | first_seq: u64 | count: u32 | first_ms: i64 | last_ms: i64 | raw_len: u32 |
//! frame_len: u32 | frame_crc: u32 | crc32: u32`: the block's first record `seq`, its
//! number of records, the record start times' range (Unix ms), the decompressed and
//! compressed lengths, the CRC-32 of the compressed frame, and the CRC-32 of the 44
//! header bytes before it.
//!
//! # Hash chain
//! Every record line ends in `"prev":"P","hash":"H"}}`, the end of `chain` (the last member,
//! `hash` the last in it). `H` is the lowercase hex SHA-256 of the line (without its
//! `\n`) in which `H` is written as 64 `0` characters; `P` is the previous record's `H`
//! (64 zeros for the first record of a trail). `seq` rises by one from record to record,
//! across segments. A segment header's `prev_hash` is the `H` of the record before its
//! first.
//!
//! # Recovery
//! A crash can leave the newest segment with a torn last frame. On start, the writer
//! scans it, keeps the longest prefix of whole, checksummed frames, moves the rest into
//! `<name>.torn-<unix ms>` beside it, and truncates the segment there.

use sha2::{Digest, Sha256};

pub const SEGMENT_MAGIC: u32 = 0x184D_2A50;
pub const BLOCK_MAGIC: u32 = 0x184D_2A51;
pub const SEAL_MAGIC: u32 = 0x184D_2A52;
pub const SEGMENT_HEADER_LEN: usize = 72;
pub const BLOCK_HEADER_LEN: usize = 48;
pub const FORMAT_VERSION: u16 = 1;
const HASH_SUFFIX_TAIL: &[u8] = b"\"}}";
const HASH_KEY: &[u8] = b"\"hash\":\"";

/// A problem with the bytes of a segment, with the byte offset where it was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("at byte {offset}: {what}")]
pub struct FormatError {
    pub offset: u64,
    pub what: String,
}

impl FormatError {
    /// The file ended inside a frame: what a live writer's segment looks like while a
    /// block is being appended (as opposed to damage: a checksum, a forged length).
    pub fn is_torn(&self) -> bool {
        self.what.contains("torn")
    }
}

fn ferr(offset: usize, what: impl Into<String>) -> FormatError {
    FormatError {
        offset: offset as u64,
        what: what.into(),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentHeader {
    pub segment: u64,
    pub created_ms: i64,
    pub first_seq: u64,
    pub prev_hash: [u8; 32],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockHeader {
    pub first_seq: u64,
    pub count: u32,
    pub first_ms: i64,
    pub last_ms: i64,
    pub raw_len: u32,
    pub frame_len: u32,
    pub frame_crc: u32,
}

/// A seal frame around a seal line.
pub fn encode_seal(line: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + line.len());
    skippable(SEAL_MAGIC, line, &mut out);
    out
}

pub fn segment_file_name(segment: u64) -> String {
    format!("{segment:020}.seg")
}

/// The segment number of a file name, if it is a segment's.
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(".seg")?;
    (stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit()))
        .then(|| stem.parse().ok())
        .flatten()
}

fn skippable(magic: u32, content: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&magic.to_le_bytes());
    out.extend_from_slice(&(content.len() as u32).to_le_bytes());
    out.extend_from_slice(content);
}

impl SegmentHeader {
    pub fn encode(&self) -> Vec<u8> {
        let mut c = Vec::with_capacity(SEGMENT_HEADER_LEN);
        c.extend_from_slice(b"CUSTODY\0");
        c.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        c.extend_from_slice(&0u16.to_le_bytes());
        c.extend_from_slice(&self.segment.to_le_bytes());
        c.extend_from_slice(&self.created_ms.to_le_bytes());
        c.extend_from_slice(&self.first_seq.to_le_bytes());
        c.extend_from_slice(&self.prev_hash);
        let crc = crc32fast::hash(&c);
        c.extend_from_slice(&crc.to_le_bytes());
        let mut out = Vec::with_capacity(8 + c.len());
        skippable(SEGMENT_MAGIC, &c, &mut out);
        out
    }

    fn decode(c: &[u8]) -> Result<Self, String> {
        if c.len() != SEGMENT_HEADER_LEN || &c[..8] != b"CUSTODY\0" {
            return Err("not a custody segment header".into());
        }
        if crc32fast::hash(&c[..68]) != u32_at(c, 68) {
            return Err("segment header checksum mismatch".into());
        }
        let version = u16::from_le_bytes([c[8], c[9]]);
        if version != FORMAT_VERSION {
            return Err(format!("unsupported segment format version {version}"));
        }
        let mut prev_hash = [0u8; 32];
        prev_hash.copy_from_slice(&c[36..68]);
        Ok(Self {
            segment: u64_at(c, 12),
            created_ms: u64_at(c, 20) as i64,
            first_seq: u64_at(c, 28),
            prev_hash,
        })
    }
}

impl BlockHeader {
    /// Compresses `records` (JSON lines, each ending in `\n`) into a header and frame.
    pub fn encode_block(
        first_seq: u64,
        count: u32,
        first_ms: i64,
        last_ms: i64,
        records: &[u8],
        compressor: &mut zstd::bulk::Compressor<'_>,
    ) -> std::io::Result<Vec<u8>> {
        let frame = compressor.compress(records)?;
        let h = BlockHeader {
            first_seq,
            count,
            first_ms,
            last_ms,
            raw_len: records.len() as u32,
            frame_len: frame.len() as u32,
            frame_crc: crc32fast::hash(&frame),
        };
        let mut c = Vec::with_capacity(BLOCK_HEADER_LEN);
        c.extend_from_slice(b"CSTB");
        c.extend_from_slice(&h.first_seq.to_le_bytes());
        c.extend_from_slice(&h.count.to_le_bytes());
        c.extend_from_slice(&h.first_ms.to_le_bytes());
        c.extend_from_slice(&h.last_ms.to_le_bytes());
        c.extend_from_slice(&h.raw_len.to_le_bytes());
        c.extend_from_slice(&h.frame_len.to_le_bytes());
        c.extend_from_slice(&h.frame_crc.to_le_bytes());
        let crc = crc32fast::hash(&c);
        c.extend_from_slice(&crc.to_le_bytes());
        let mut out = Vec::with_capacity(8 + c.len() + frame.len());
        skippable(BLOCK_MAGIC, &c, &mut out);
        out.extend_from_slice(&frame);
        Ok(out)
    }

    fn decode(c: &[u8]) -> Result<Self, String> {
        if c.len() != BLOCK_HEADER_LEN || &c[..4] != b"CSTB" {
            return Err("not a block header".into());
        }
        if crc32fast::hash(&c[..44]) != u32_at(c, 44) {
            return Err("block header checksum mismatch".into());
        }
        Ok(Self {
            first_seq: u64_at(c, 4),
            count: u32_at(c, 12),
            first_ms: u64_at(c, 16) as i64,
            last_ms: u64_at(c, 24) as i64,
            raw_len: u32_at(c, 32),
            frame_len: u32_at(c, 36),
            frame_crc: u32_at(c, 40),
        })
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// One decoded block: its header, where it starts, and its record lines.
#[derive(Debug)]
pub struct Block {
    pub header: BlockHeader,
    pub offset: u64,
    pub records: Vec<u8>,
}

impl Block {
    /// The record lines, without their `\n`.
    pub fn lines(&self) -> impl Iterator<Item = &[u8]> {
        self.records
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
    }
}

/// A segment's seal frame: the statement line as stored, parsed, and where it starts.
#[derive(Debug)]
pub struct SealFrame {
    pub line: Vec<u8>,
    pub seal: crate::signing::Seal,
    pub offset: u64,
}

/// A segment read as far as it is whole.
#[derive(Debug)]
pub struct ParsedSegment {
    pub header: SegmentHeader,
    pub blocks: Vec<Block>,
    /// The seal, when the segment was closed (it is then the last frame).
    pub seal: Option<SealFrame>,
    /// Bytes from the start that form whole, checked frames.
    pub valid_len: u64,
    /// What stopped the scan before the end of the file, if anything did.
    pub tail_error: Option<FormatError>,
}

/// Parses a whole segment held in memory (recovery, tests): the [`FrameReader`] over
/// its bytes. A bad header is an error; a bad or torn frame after it ends the scan and
/// is reported in `tail_error`, with everything before it kept.
pub fn parse_segment(bytes: &[u8]) -> Result<ParsedSegment, FormatError> {
    let mut frames = FrameReader::new(bytes, true)?;
    let mut blocks = Vec::new();
    let mut seal = None;
    let mut tail_error = None;
    let valid_len = loop {
        let at = frames.offset();
        match frames.next_frame() {
            Ok(Some((_, Frame::Block(block)))) => blocks.push(block),
            Ok(Some((_, Frame::Seal(s, _)))) => seal = Some(*s),
            Ok(None) => break at,
            Err(e) => {
                tail_error = Some(e);
                break at;
            }
        }
    };
    Ok(ParsedSegment {
        header: frames.header().clone(),
        blocks,
        seal,
        valid_len,
        tail_error,
    })
}

// === impl FrameReader ===

/// The largest segment header or seal frame a reader accepts.
pub const MAX_META_FRAME: u32 = 1024 * 1024;
/// The largest compressed block frame a reader accepts.
pub const MAX_BLOCK_FRAME: u32 = 256 * 1024 * 1024;
/// The largest decompressed block a reader accepts. A block is cut at 256 KiB, so
/// only one holding a single large record (two bodies of at most `capture_max_bytes`,
/// escaped) comes near it.
pub const MAX_BLOCK_RAW: u32 = 512 * 1024 * 1024;

/// A frame read by a [`FrameReader`].
#[derive(Debug)]
pub enum Frame {
    /// A block, its records decompressed (empty when the reader does not decode).
    Block(Block),
    /// The seal, with the SHA-256 of every byte before it.
    Seal(Box<SealFrame>, [u8; 32]),
}

/// Reads a segment one frame at a time from any reader, so that a reviewer's memory is
/// one block at most whatever the file holds (a `/dev/zero`, a sparse file, a forged
/// length). Every byte read is hashed as it passes.
pub struct FrameReader<R> {
    r: R,
    at: u64,
    hasher: Sha256,
    header: SegmentHeader,
    decode: bool,
    sealed: bool,
    mark: Option<(u64, Option<[u8; 32]>)>,
}

impl<R: std::io::Read> FrameReader<R> {
    /// Reads and checks the segment header. `decode`: decompress blocks (records are
    /// needed); without it, block frames are read and hashed but not decompressed.
    pub fn new(mut r: R, decode: bool) -> Result<Self, FormatError> {
        let mut hasher = Sha256::new();
        let (magic, content) = read_meta(&mut r, 0, &mut hasher)?
            .ok_or_else(|| ferr(0, "segment header is missing or torn"))?;
        if magic != SEGMENT_MAGIC {
            return Err(ferr(0, "segment does not start with a segment header"));
        }
        let header = SegmentHeader::decode(&content).map_err(|w| ferr(8, w))?;
        Ok(Self {
            r,
            at: 8 + content.len() as u64,
            hasher,
            header,
            decode,
            sealed: false,
            mark: None,
        })
    }

    pub fn header(&self) -> &SegmentHeader {
        &self.header
    }

    /// Bytes read so far: where the next frame starts.
    pub fn offset(&self) -> u64 {
        self.at
    }

    /// Asks for the SHA-256 of the first `n` bytes, taken as the reader passes byte `n`
    /// at a frame boundary (a checkpoint covers a prefix of whole frames).
    pub fn mark_prefix(&mut self, n: u64) {
        self.mark = Some((n, None));
        self.take_mark();
    }

    /// The digest [`Self::mark_prefix`] asked for, once the reader passed it.
    pub fn prefix_digest(&self) -> Option<[u8; 32]> {
        self.mark.and_then(|(_, d)| d)
    }

    fn take_mark(&mut self) {
        if let Some((n, None)) = self.mark {
            if n == self.at {
                self.mark = Some((n, Some(self.hasher.clone().finalize().into())));
            }
        }
    }

    /// The next frame and its offset; `None` at a clean end of the file.
    pub fn next_frame(&mut self) -> Result<Option<(u64, Frame)>, FormatError> {
        use std::io::Read;
        let at = self.at;
        if self.sealed {
            let mut one = [0u8; 1];
            return match self.r.read(&mut one) {
                Ok(0) => Ok(None),
                Ok(_) => Err(ferr(at as usize, "data after the seal")),
                Err(e) => Err(ferr(at as usize, format!("read failed: {e}"))),
            };
        }
        let before: [u8; 32] = self.hasher.clone().finalize().into();
        let Some((magic, content)) = read_meta(&mut self.r, at, &mut self.hasher)? else {
            return Ok(None);
        };
        self.at += 8 + content.len() as u64;
        let frame = match magic {
            SEAL_MAGIC => {
                let seal = serde_json::from_slice::<crate::signing::Seal>(&content)
                    .map_err(|e| ferr(at as usize + 8, format!("seal is not readable: {e}")))?;
                self.sealed = true;
                Frame::Seal(
                    Box::new(SealFrame {
                        line: content,
                        seal,
                        offset: at,
                    }),
                    before,
                )
            }
            BLOCK_MAGIC => {
                let header = BlockHeader::decode(&content).map_err(|w| ferr(at as usize + 8, w))?;
                if header.frame_len > MAX_BLOCK_FRAME || header.raw_len > MAX_BLOCK_RAW {
                    return Err(ferr(
                        at as usize,
                        format!(
                            "block of {} compressed / {} bytes is larger than a reader accepts ({MAX_BLOCK_FRAME} / {MAX_BLOCK_RAW})",
                            header.frame_len, header.raw_len
                        ),
                    ));
                }
                let frame_at = self.at as usize;
                let mut frame = Vec::new();
                let got = (&mut self.r)
                    .take(u64::from(header.frame_len))
                    .read_to_end(&mut frame)
                    .map_err(|e| ferr(frame_at, format!("read failed: {e}")))?;
                if got != header.frame_len as usize {
                    return Err(ferr(frame_at, "block frame is torn"));
                }
                self.hasher.update(&frame);
                self.at += frame.len() as u64;
                if crc32fast::hash(&frame) != header.frame_crc {
                    return Err(ferr(frame_at, "block frame checksum mismatch"));
                }
                let records = if self.decode {
                    decode_frame(&frame, header.raw_len, frame_at)?
                } else {
                    Vec::new()
                };
                Frame::Block(Block {
                    header,
                    offset: at,
                    records,
                })
            }
            other => {
                return Err(ferr(
                    at as usize,
                    format!("unexpected frame magic {other:#010x}"),
                ))
            }
        };
        self.take_mark();
        Ok(Some((at, frame)))
    }
}

/// A block's zstd frame decompressed, growing with its content (never trusting the
/// header's length for an allocation) and refusing more than it states.
fn decode_frame(frame: &[u8], raw_len: u32, at: usize) -> Result<Vec<u8>, FormatError> {
    use std::io::Read;
    let mut records = Vec::new();
    zstd::stream::read::Decoder::new(frame)
        .and_then(|d| d.take(u64::from(raw_len) + 1).read_to_end(&mut records))
        .map_err(|e| ferr(at, format!("block frame does not decompress: {e}")))?;
    if records.len() != raw_len as usize || !records.ends_with(b"\n") {
        return Err(ferr(at, "block content has the wrong length or framing"));
    }
    Ok(records)
}

/// A skippable frame of at most [`MAX_META_FRAME`] bytes read from a stream (hashed);
/// `None` at a clean end of the stream.
fn read_meta(
    r: &mut impl std::io::Read,
    at: u64,
    hasher: &mut Sha256,
) -> Result<Option<(u32, Vec<u8>)>, FormatError> {
    use std::io::Read;
    let at = at as usize;
    let mut head = [0u8; 8];
    let mut got = 0;
    while got < 8 {
        match r.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ferr(at, format!("read failed: {e}"))),
        }
    }
    match got {
        0 => return Ok(None),
        8 => {}
        _ => return Err(ferr(at, "frame header is torn")),
    }
    let magic = u32_at(&head, 0);
    let len = u32_at(&head, 4);
    // Blocks carry a 48-byte header here; only a seal or segment header may be longer.
    if len > MAX_META_FRAME {
        return Err(ferr(
            at,
            format!("frame of {len} bytes is larger than a reader accepts ({MAX_META_FRAME})"),
        ));
    }
    let mut content = Vec::new();
    r.take(u64::from(len))
        .read_to_end(&mut content)
        .map_err(|e| ferr(at, format!("read failed: {e}")))?;
    if content.len() != len as usize {
        return Err(ferr(at + 8, "frame is torn"));
    }
    hasher.update(head);
    hasher.update(&content);
    Ok(Some((magic, content)))
}

fn read_skippable(bytes: &[u8], at: usize) -> Option<(u32, &[u8], usize)> {
    let head = bytes.get(at..at + 8)?;
    let magic = u32_at(head, 0);
    let len = u32_at(head, 4) as usize;
    let content = bytes.get(at + 8..at + 8 + len)?;
    Some((magic, content, at + 8 + len))
}

pub fn read_block(bytes: &[u8], at: usize) -> Result<(Block, usize), FormatError> {
    let (magic, content, frame_at) =
        read_skippable(bytes, at).ok_or_else(|| ferr(at, "block header is torn"))?;
    if magic != BLOCK_MAGIC {
        return Err(ferr(
            at,
            format!("expected a block header, found magic {magic:#010x}"),
        ));
    }
    let header = BlockHeader::decode(content).map_err(|w| ferr(at + 8, w))?;
    let end = frame_at + header.frame_len as usize;
    let frame = bytes
        .get(frame_at..end)
        .ok_or_else(|| ferr(frame_at, "block frame is torn"))?;
    if crc32fast::hash(frame) != header.frame_crc {
        return Err(ferr(frame_at, "block frame checksum mismatch"));
    }
    let records = zstd::bulk::decompress(frame, header.raw_len as usize)
        .map_err(|e| ferr(frame_at, format!("block frame does not decompress: {e}")))?;
    if records.len() != header.raw_len as usize || !records.ends_with(b"\n") {
        return Err(ferr(
            frame_at,
            "block content has the wrong length or framing",
        ));
    }
    Ok((
        Block {
            header,
            offset: at as u64,
            records,
        },
        end,
    ))
}

/// Computes the chain hash of a record line whose `chain.hash` is still 64 zeros,
/// and writes it in place. `None` if the line does not end in the chain member.
pub fn seal_line(line: &mut [u8]) -> Option<[u8; 32]> {
    let at = hash_position(line)?;
    let digest = crate::content::line_digest(line, at).ok()?.digest;
    hex::encode_to_slice(digest, &mut line[at..at + 64]).ok()?;
    Some(digest)
}

/// Declares a record line's bodies (see [`crate::content`]) before it is sealed:
/// `spans` are the offsets of its `"body":` members and their values' lengths. `false`
/// when they do not match the line (it is then hashed whole, its bodies not purgeable).
pub fn declare_bodies(line: &mut Vec<u8>, spans: &[(usize, usize)]) -> bool {
    hash_position(line).is_some_and(|at| crate::content::declare(line, at, spans))
}

/// Checks a line's own hash; returns its `chain.hash` as bytes when it is right.
pub fn check_line_hash(line: &[u8]) -> Result<[u8; 32], &'static str> {
    check_line(line).map(|(h, _)| h)
}

/// [`check_line_hash`], with what it found of the line's declared bodies.
pub fn check_line(line: &[u8]) -> Result<([u8; 32], crate::content::Hashed), &'static str> {
    let at = hash_position(line).ok_or("the record does not end with its chain member")?;
    let mut stated = [0u8; 32];
    hex::decode_to_slice(&line[at..at + 64], &mut stated).map_err(|_| "chain.hash is not hex")?;
    let hashed = crate::content::line_digest(line, at)?;
    if hashed.digest != stated {
        return Err("chain.hash does not match the record's content");
    }
    Ok((stated, hashed))
}

/// The line with its declared bodies in their purged form (same chain hash); `None`
/// when it has none left to purge.
pub fn purge_line(line: &[u8]) -> Result<Option<Vec<u8>>, &'static str> {
    let at = hash_position(line).ok_or("the record does not end with its chain member")?;
    crate::content::purge(line, at)
}

/// The `chain.hash` a line states, unchecked (for lines this process just sealed, or
/// whose hash is checked elsewhere).
pub fn stated_hash(line: &[u8]) -> Option<[u8; 32]> {
    let at = hash_position(line)?;
    let mut stated = [0u8; 32];
    hex::decode_to_slice(&line[at..at + 64], &mut stated).ok()?;
    Some(stated)
}

/// Offset of the 64 hex digits of `chain.hash` in a record line.
fn hash_position(line: &[u8]) -> Option<usize> {
    let n = line.len();
    if n < 64 + HASH_KEY.len() + HASH_SUFFIX_TAIL.len() || !line.ends_with(HASH_SUFFIX_TAIL) {
        return None;
    }
    let at = n - HASH_SUFFIX_TAIL.len() - 64;
    (&line[at - HASH_KEY.len()..at] == HASH_KEY).then_some(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_torn_tails_are_found() {
        let h = SegmentHeader {
            segment: 7,
            created_ms: 1_700_000_000_000,
            first_seq: 42,
            prev_hash: [9; 32],
        };
        let mut file = h.encode();
        let mut c = zstd::bulk::Compressor::new(3).unwrap();
        c.include_checksum(true).unwrap();
        let rec = b"{\"a\":1}\n{\"a\":2}\n";
        file.extend(BlockHeader::encode_block(42, 2, 1, 2, rec, &mut c).unwrap());
        let whole = file.len();
        file.extend(BlockHeader::encode_block(44, 1, 3, 3, b"{\"a\":3}\n", &mut c).unwrap());
        let p = parse_segment(&file).unwrap();
        assert_eq!(p.header, h);
        assert_eq!(p.blocks.len(), 2);
        assert_eq!(p.blocks[0].lines().count(), 2);
        assert!(p.tail_error.is_none());

        // A whole segment is a valid zstd stream of the records.
        let all = zstd::stream::decode_all(&file[..]).unwrap();
        assert_eq!(all, b"{\"a\":1}\n{\"a\":2}\n{\"a\":3}\n");

        let torn = &file[..file.len() - 3];
        let p = parse_segment(torn).unwrap();
        assert_eq!(p.blocks.len(), 1);
        assert_eq!(p.valid_len, whole as u64);
        assert!(p.tail_error.is_some());
    }

    #[test]
    fn line_hash_round_trip() {
        let mut line = format!(
            "{{\"seq\":1,\"chain\":{{\"prev\":\"{}\",\"hash\":\"{}\"}}}}",
            "0".repeat(64),
            "0".repeat(64)
        )
        .into_bytes();
        let h = seal_line(&mut line).unwrap();
        assert_eq!(check_line_hash(&line).unwrap(), h);
        line[3] = b'x';
        assert!(check_line_hash(&line).is_err());
    }
}
