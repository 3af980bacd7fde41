//! Tamper evidence with signing on: verify holding only the public key catches every
//! edit an attacker with write access to the audit directory can make, and tells a
//! repaired crash apart from tampering.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    fs,
    path::{Path, PathBuf},
};

use custody_audit::{
    review::verify::{verify_dir, VerifyError, VerifyReport},
    segment,
    signing::{self, keygen},
};
use custody_tests::*;
use ed25519_dalek::VerifyingKey;

struct Trail {
    done: Stopped,
    keys: tempfile::TempDir,
    public: VerifyingKey,
}

impl Trail {
    /// Starts custody again on this trail, signing with its key.
    async fn restart(
        self,
        up: &MockUpstream,
        tweak: impl FnOnce(&mut custody_config::Config),
    ) -> (Custody, tempfile::TempDir, VerifyingKey) {
        let key = self.keys.path().join("test.key");
        let custody = Custody::start_in(self.done.dir, vec![openai_route(up)], |c| {
            c.audit.signing_key = Some(key);
            tweak(c);
        })
        .await;
        (custody, self.keys, self.public)
    }

    fn dir(&self) -> PathBuf {
        self.done.audit_dir()
    }
    fn segments(&self) -> Vec<PathBuf> {
        custody_audit::review::reader::segments(&self.dir())
            .unwrap()
            .into_iter()
            .map(|s| s.path)
            .collect()
    }
    fn verify(&self) -> Result<VerifyReport, VerifyError> {
        verify_dir(&self.dir(), Some(&self.public), |_, _, _| {})
    }
    fn broken(&self) -> String {
        match self.verify() {
            Err(VerifyError::Broken(b)) => {
                eprintln!("verify: {b}");
                b.to_string()
            }
            other => panic!("verify should fail, got {other:?}"),
        }
    }
}

/// A signed trail of `segments` segments with two records each (custody restarted
/// between them: every clean stop seals its segment).
async fn signed_trail(segments: usize) -> Trail {
    let keys = tempfile::tempdir().unwrap();
    let (private, public) = keygen(keys.path(), "test").unwrap();
    let up = chat_upstream().await;
    let routes = || vec![openai_route(&up)];
    let sign = |c: &mut custody_config::Config| c.audit.signing_key = Some(private.clone());
    let mut custody = Custody::start_with(routes(), sign).await;
    let c = client();
    for s in 0..segments {
        if s > 0 {
            let stopped = custody.stop().await;
            custody = Custody::start_in(stopped.dir, routes(), sign).await;
        }
        for r in 0..2 {
            send(
                &c,
                post(
                    &custody.url("/v1/chat/completions"),
                    &[],
                    format!("{{\"model\":\"m\",\"n\":\"{s}-{r}\"}}"),
                ),
            )
            .await;
        }
    }
    let done = custody.stop().await;
    let public = signing::load_public(&public).unwrap();
    Trail { done, keys, public }
}

#[tokio::test]
async fn a_signed_trail_verifies_with_the_public_key_alone() {
    let t = signed_trail(3).await;
    let r = t.verify().unwrap();
    assert_eq!(
        (r.records, r.segments, r.seals, r.uncovered, r.unsigned),
        (6, 3, 3, 0, 0)
    );
    assert!(r.checkpoints >= 3);
    assert!(r.trusted);
    // Another key: every statement is refused.
    let (_, other) = keygen(t.keys.path(), "other").unwrap();
    let other = signing::load_public(&other).unwrap();
    match verify_dir(&t.dir(), Some(&other), |_, _, _| {}) {
        Err(VerifyError::Broken(b)) => assert!(b.what.contains("another key"), "{b}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn deleting_the_first_middle_or_last_segment_is_caught() {
    for victim in [0, 1, 2] {
        let t = signed_trail(3).await;
        let segs = t.segments();
        fs::remove_file(&segs[victim]).unwrap();
        let msg = t.broken();
        let want = [
            "segment 1 is missing",
            "segment 2 is missing",
            "segments or records were deleted",
        ][victim];
        assert!(msg.contains(want), "victim {victim}: {msg}");
    }
}

#[tokio::test]
async fn truncating_the_newest_segment_is_caught() {
    let t = signed_trail(2).await;
    let seg = t.segments()[1].clone();
    let bytes = fs::read(&seg).unwrap();
    let parsed = segment::parse_segment(&bytes).unwrap();
    // Cut the seal and the last block: what remains is whole and well-formed.
    let last_block = parsed.blocks.last().unwrap().offset as usize;
    fs::write(&seg, &bytes[..last_block]).unwrap();
    let msg = t.broken();
    assert!(
        msg.contains("truncated") || msg.contains("deleted"),
        "{msg}"
    );
}

#[tokio::test]
async fn swapping_two_segments_is_caught() {
    let t = signed_trail(3).await;
    let segs = t.segments();
    let tmp = segs[0].with_extension("tmp");
    fs::rename(&segs[0], &tmp).unwrap();
    fs::rename(&segs[1], &segs[0]).unwrap();
    fs::rename(&tmp, &segs[1]).unwrap();
    let msg = t.broken();
    assert!(msg.contains("00000000000000000001.seg"), "{msg}");
}

/// Rewrites a segment's records through `edit` with valid checksums, framing, record
/// hashes and chain links, and a new seal that is consistent but unsigned (the attacker
/// has no private key): the best an attacker with write access can do.
fn forge(path: &Path, edit: impl FnOnce(&mut Vec<Vec<u8>>)) {
    let (parsed, mut lines) = segment_lines(path);
    edit(&mut lines);
    // Re-chain from the header's previous hash.
    let mut prev = parsed.header.prev_hash;
    let mut raw = Vec::new();
    for (i, l) in lines.iter_mut().enumerate() {
        let mut v: serde_json::Value = serde_json::from_slice(l).unwrap();
        v["seq"] = (parsed.header.first_seq + i as u64).into();
        let text = String::from_utf8(l.clone()).unwrap();
        let start = text.find("\"chain\":").unwrap();
        let seq_fixed = {
            let s = &text[..start];
            let re_seq = s.find("\"seq\":").unwrap();
            let end = re_seq + 6 + s[re_seq + 6..].find(',').unwrap();
            format!(
                "{}\"seq\":{}{}",
                &s[..re_seq],
                parsed.header.first_seq + i as u64,
                &s[end..]
            )
        };
        let mut line = format!(
            "{seq_fixed}\"chain\":{{\"prev\":\"{}\",\"hash\":\"{}\"}}}}",
            hex::encode(prev),
            "0".repeat(64)
        )
        .into_bytes();
        prev = segment::seal_line(&mut line).unwrap();
        raw.extend_from_slice(&line);
        raw.push(b'\n');
        *l = line;
    }
    let mut out = parsed.header.encode();
    let mut c = zstd::bulk::Compressor::new(3).unwrap();
    out.extend(
        segment::BlockHeader::encode_block(
            parsed.header.first_seq,
            lines.len() as u32,
            0,
            0,
            &raw,
            &mut c,
        )
        .unwrap(),
    );
    if let Some(s) = parsed.seal {
        let mut seal = s.seal;
        seal.records = lines.len() as u64;
        seal.last_seq = parsed.header.first_seq + lines.len() as u64 - 1;
        seal.head = hex::encode(prev);
        seal.segment_sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&out));
        seal.key = None;
        out.extend(segment::encode_seal(
            &signing::sign_line(&seal, None).unwrap(),
        ));
    }
    fs::write(path, out).unwrap();
}

#[tokio::test]
async fn removed_inserted_or_edited_records_are_caught_even_when_everything_is_recomputed() {
    // Removed from the middle segment, chain recomputed within it.
    let t = signed_trail(3).await;
    forge(&t.segments()[1], |lines| {
        lines.remove(0);
    });
    let msg = t.broken();
    assert!(msg.contains("00000000000000000002.seg"), "{msg}");

    // Edited in the newest segment, re-chained and re-sealed (unsigned).
    let t = signed_trail(2).await;
    forge(&t.segments()[1], |lines| {
        let l = String::from_utf8(lines[1].clone())
            .unwrap()
            .replace("1-1", "1-X");
        lines[1] = l.into_bytes();
    });
    let msg = t.broken();
    assert!(
        msg.contains("not signed") || msg.contains("checkpoint"),
        "{msg}"
    );

    // Inserted: a duplicate of a record, re-chained.
    let t = signed_trail(2).await;
    forge(&t.segments()[0], |lines| {
        let copy = lines[0].clone();
        lines.insert(1, copy);
    });
    assert!(t.broken().contains(".seg"));
}

#[tokio::test]
async fn forged_or_deleted_checkpoints_are_caught() {
    let t = signed_trail(1).await;
    let log = t.dir().join("checkpoints.log");
    let text = fs::read_to_string(&log).unwrap();
    // Seq 1 is the start's config event, then two records.
    fs::write(&log, text.replacen("\"last_seq\":3", "\"last_seq\":2", 1)).unwrap();
    assert!(t.broken().contains("bad signature"), "{}", t.broken());
    fs::remove_file(&log).unwrap();
    assert!(t.broken().contains("no checkpoint"), "{}", t.broken());
}

#[tokio::test]
async fn a_crash_is_repaired_recorded_and_told_apart_from_tampering() {
    let t = signed_trail(1).await;
    let dir = t.dir();
    let seg = t.segments()[0].clone();
    let bytes = fs::read(&seg).unwrap();
    let parsed = segment::parse_segment(&bytes).unwrap();
    // What a crash leaves: no seal, and half a block at the end.
    let seal_at = parsed.seal.as_ref().unwrap().offset as usize;
    let last_block = parsed.blocks.last().unwrap().offset as usize;
    let mut crashed = bytes[..seal_at].to_vec();
    crashed.extend_from_slice(&bytes[last_block..last_block + 30]);
    fs::write(&seg, &crashed).unwrap();
    assert!(t.broken().contains(".seg"));

    let up = chat_upstream().await;
    let (custody, _keys, public) = t.restart(&up, |_| {}).await;
    send(&client(), post(&custody.url("/v1/embeddings"), &[], "{}")).await;
    let done = custody.stop().await;
    let r = verify_dir(&dir, Some(&public), |_, _, _| {}).unwrap();
    // Events: the first start's config, the recovery, the restart's config.
    assert_eq!(
        (r.records, r.events, r.recoveries, r.uncovered),
        (3, 3, 1, 0)
    );
    let event = done
        .events
        .iter()
        .find(|e| e["event"]["type"] == "recovery")
        .unwrap();
    assert_eq!(event["schema"], "custody.event/v1");
    assert_eq!(event["event"]["type"], "recovery");
    assert_eq!(event["event"]["cut"]["bytes"], 30);
    assert_eq!(event["event"]["sealed_segment"], "00000000000000000001.seg");
    let sealed = segment::parse_segment(&fs::read(&seg).unwrap())
        .unwrap()
        .seal
        .unwrap();
    assert!(sealed.seal.recovered);
}

#[tokio::test]
async fn retention_deletes_old_segments_and_the_trail_still_verifies() {
    let t = signed_trail(3).await;
    let dir = t.dir();
    let up = chat_upstream().await;
    let public = t.public;
    let (custody, _keys, _) = t
        .restart(&up, |c| {
            c.audit.retention_days = Some(0);
        })
        .await;
    send(&client(), post(&custody.url("/v1/embeddings"), &[], "{}")).await;
    let done = custody.stop().await;
    let names: Vec<String> = custody_audit::review::reader::segments(&dir)
        .unwrap()
        .iter()
        .map(|s| s.name())
        .collect();
    assert_eq!(
        names,
        vec!["00000000000000000003.seg", "00000000000000000004.seg"]
    );
    let event = done
        .events
        .iter()
        .find(|r| r["event"]["type"] == "retention")
        .unwrap();
    assert_eq!(event["event"]["removed"].as_array().unwrap().len(), 2);
    assert_eq!(
        event["event"]["removed"][1]["segment"],
        "00000000000000000002.seg"
    );
    let r = verify_dir(&dir, Some(&public), |_, _, _| {}).unwrap();
    // Events kept: the config events of segments 3 and 4, and the retention event.
    assert_eq!((r.retired, r.records, r.events, r.uncovered), (2, 3, 3, 0));

    // Deleting what retention kept is still caught.
    fs::remove_file(dir.join("00000000000000000003.seg")).unwrap();
    match verify_dir(&dir, Some(&public), |_, _, _| {}) {
        Err(VerifyError::Broken(b)) => assert!(
            b.what
                .contains("segment 3 is missing and no retention event"),
            "{b}"
        ),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn fast_verify_checks_sealed_segments_through_their_signed_digest() {
    use custody_audit::review::verify::{verify_dir_with, Depth};
    let fast = |t: &Trail| verify_dir_with(&t.dir(), Some(&t.public), Depth::Fast, |_, _, _| {});
    let t = signed_trail(3).await;
    let r = fast(&t).unwrap();
    assert!(r.fast);
    // Sealed segments are counted from their seals: records and events together.
    assert_eq!((r.records, r.segments, r.seals), (9, 3, 3));
    // A flipped byte inside a compressed frame of a middle segment.
    let seg = t.segments()[1].clone();
    let mut bytes = fs::read(&seg).unwrap();
    let at = segment::parse_segment(&bytes).unwrap().blocks[0].offset as usize + 60;
    bytes[at] ^= 1;
    fs::write(&seg, &bytes).unwrap();
    // Found by the frame checksum as the frame streams past, or by the seal's digest.
    assert!(
        matches!(fast(&t), Err(VerifyError::Broken(b)) if b.what.contains("bytes") || b.what.contains("checksum"))
    );

    // A forged segment (re-chained, re-sealed without the key), and a deleted one.
    let t = signed_trail(3).await;
    forge(&t.segments()[0], |lines| {
        lines.remove(0);
    });
    assert!(
        matches!(fast(&t), Err(VerifyError::Broken(b)) if b.segment.contains("00000000000000000001"))
    );
    let t = signed_trail(3).await;
    fs::remove_file(&t.segments()[1]).unwrap();
    assert!(
        matches!(fast(&t), Err(VerifyError::Broken(b)) if b.what.contains("segment 2 is missing"))
    );
}
