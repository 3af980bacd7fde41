//! The trail on disk: rotation, chaining across segments, torn-tail recovery after a
//! crash, and verify catching edits.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{fs, path::Path};

use custody_audit::{
    review::verify::{verify_dir, VerifyError},
    segment::{self, BlockHeader},
};
use custody_config::Provider;
use custody_tests::*;

/// A trail of `requests` records. With `restart_each`, custody is restarted before every
/// request, and a restart always opens a new segment: one segment per record.
async fn trail_with(requests: usize, restart_each: bool) -> Stopped {
    let up = chat_upstream().await;
    let routes = || vec![openai_route(&up)];
    let mut custody = Custody::start(routes()).await;
    let c = client();
    for i in 0..requests {
        if restart_each && i > 0 {
            let stopped = custody.stop().await;
            custody = Custody::start_in(stopped.dir, routes(), |_| {}).await;
        }
        send(
            &c,
            post(
                &custody.url("/v1/chat/completions"),
                &[],
                format!("{{\"model\":\"m\",\"n\":{i}}}"),
            ),
        )
        .await;
    }
    custody.stop().await
}

fn segments(dir: &Path) -> Vec<std::path::PathBuf> {
    custody_audit::review::reader::segments(dir)
        .unwrap()
        .into_iter()
        .map(|s| s.path)
        .collect()
}

fn broken(dir: &Path) -> String {
    match verify_dir(dir, None, |_, _, _| {}) {
        Err(VerifyError::Broken(b)) => b.to_string(),
        other => panic!("verify should fail, got {other:?}"),
    }
}

/// Rewrites a segment's records through `edit`, with fresh, valid checksums and framing:
/// what an attacker with write access and the format spec can do.
fn rewrite(path: &Path, edit: impl FnOnce(&mut Vec<Vec<u8>>)) {
    let (parsed, mut lines) = segment_lines(path);
    edit(&mut lines);
    let mut out = parsed.header.encode();
    let mut raw = Vec::new();
    for l in &lines {
        raw.extend_from_slice(l);
        raw.push(b'\n');
    }
    let mut c = zstd::bulk::Compressor::new(3).unwrap();
    out.extend(
        BlockHeader::encode_block(
            parsed.header.first_seq,
            lines.len() as u32,
            0,
            0,
            &raw,
            &mut c,
        )
        .unwrap(),
    );
    fs::write(path, out).unwrap();
}

#[tokio::test]
async fn the_chain_runs_across_segments_and_restarts() {
    let done = trail_with(4, true).await;
    let dir = done.audit_dir();
    assert_eq!(segments(&dir).len(), 4);
    let report = verify_dir(&dir, None, |_, _, _| {}).unwrap();
    assert_eq!((report.records, report.segments), (4, 4));
    for pair in done.trail.windows(2) {
        assert_eq!(pair[1]["chain"]["prev"], pair[0]["chain"]["hash"]);
        assert_eq!(
            pair[1]["seq"].as_u64().unwrap(),
            pair[0]["seq"].as_u64().unwrap() + 1
        );
    }
    // Each segment on its own is a plain zstd stream of JSON lines.
    let first = zstd::stream::decode_all(&fs::read(&segments(&dir)[0]).unwrap()[..]).unwrap();
    // The start's config event and the record.
    assert_eq!(first.iter().filter(|&&b| b == b'\n').count(), 2);
}

#[tokio::test]
async fn a_torn_tail_is_cut_aside_and_the_chain_continues() {
    let done = trail_with(3, false).await;
    let dir = done.audit_dir();
    let seg = segments(&dir)[0].clone();
    let good = fs::read(&seg).unwrap();
    // Bytes half-written after the seal (a crash while a newer writer appended).
    let block = &good[good.len() - 60..];
    let mut torn = good.clone();
    torn.extend_from_slice(&block[..30]);
    fs::write(&seg, &torn).unwrap();
    assert!(broken(&dir).contains("after the seal"));

    let up = MockUpstream::start(|_, _| respond(200, &[], "{}")).await;
    let custody = Custody::start_in(
        done.dir,
        vec![route("openai", "/v1/", &up.url(), Provider::Openai, false)],
        |_| {},
    )
    .await;
    send(&client(), post(&custody.url("/v1/embeddings"), &[], "{}")).await;
    let done = custody.stop().await;
    let dir = done.audit_dir();

    assert_eq!(
        fs::read(&seg).unwrap(),
        good,
        "the torn segment is cut back to its whole frames"
    );
    let aside: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains(".torn-"))
        .collect();
    assert_eq!(aside.len(), 1);
    assert_eq!(fs::read(&aside[0]).unwrap(), &block[..30]);
    // The cut is itself recorded in the chain, before the restart's config event and
    // the new record.
    let seqs: Vec<u64> = done
        .trail
        .iter()
        .map(|l| l["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=7).collect::<Vec<_>>());
    assert_eq!(done.trail[4]["event"]["cut"]["bytes"], 30);
    assert_eq!(done.trail[5]["event"]["type"], "config");
    let r = verify_dir(&dir, None, |_, _, _| {}).unwrap();
    assert_eq!((r.records, r.events, r.recoveries), (4, 3, 1));
}

#[tokio::test]
async fn verify_names_a_flipped_byte() {
    let done = trail_with(3, false).await;
    let dir = done.audit_dir();
    let seg = segments(&dir)[0].clone();
    let mut bytes = fs::read(&seg).unwrap();
    let at = bytes.len() - 10;
    bytes[at] ^= 0x01;
    fs::write(&seg, bytes).unwrap();
    let msg = broken(&dir);
    assert!(msg.contains("00000000000000000001.seg"), "{msg}");
}

#[tokio::test]
async fn verify_catches_an_edit_even_with_checksums_recomputed() {
    let done = trail_with(3, false).await;
    let dir = done.audit_dir();
    let seg = segments(&dir)[0].clone();
    rewrite(&seg, |lines| {
        // Line 0 is the start's config event.
        let text = String::from_utf8(lines[2].clone())
            .unwrap()
            .replace("\"n\":1", "\"n\":7");
        lines[2] = text.into_bytes();
    });
    let msg = broken(&dir);
    assert!(msg.contains("seq 3") && msg.contains("chain.hash"), "{msg}");

    // Re-sealing the edited record's own hash breaks the next link instead.
    rewrite(&seg, |lines| {
        let mut l = lines[2].clone();
        let n = l.len();
        l[n - 67..n - 3].copy_from_slice(&[b'0'; 64]);
        segment::seal_line(&mut l).unwrap();
        lines[2] = l;
    });
    let msg = broken(&dir);
    assert!(msg.contains("seq 4") && msg.contains("chain.prev"), "{msg}");
}

#[tokio::test]
async fn verify_catches_removed_and_reordered_records_and_missing_segments() {
    let done = trail_with(3, false).await;
    let dir = done.audit_dir();
    let seg = segments(&dir)[0].clone();
    let original = fs::read(&seg).unwrap();
    rewrite(&seg, |lines| {
        lines.remove(1);
    });
    assert!(broken(&dir).contains("seq 2"));
    fs::write(&seg, &original).unwrap();
    rewrite(&seg, |lines| lines.swap(0, 1));
    assert!(broken(&dir).contains("seq 1"));
    fs::write(&seg, &original).unwrap();
    verify_dir(&dir, None, |_, _, _| {}).unwrap();

    let done = trail_with(3, true).await;
    let dir = done.audit_dir();
    fs::remove_file(&segments(&dir)[1]).unwrap();
    let msg = broken(&dir);
    assert!(msg.contains("segment 2 is missing"), "{msg}");
}

#[tokio::test]
async fn sealed_segments_are_indexed_and_search_reads_newest_first() {
    use custody_audit::{
        review::reader::DirSource,
        review::search::{search, Query},
    };
    let done = trail_with(4, true).await;
    let dir = done.audit_dir();
    for seg in segments(&dir) {
        let idx = custody_audit::index::load(&seg).expect("every sealed segment has an index");
        assert_eq!(
            idx.blocks.iter().map(|b| u64::from(b.count)).sum::<u64>(),
            idx.last_seq - idx.first_seq + 1
        );
        assert!(idx.facts.routes.contains("openai"));
    }
    let q = |tweak: &dyn Fn(&mut Query)| {
        let mut q = Query {
            limit: 3,
            ..Query::default()
        };
        tweak(&mut q);
        search(&DirSource(&dir), &q)
            .unwrap()
            .values()
            .iter()
            .map(|r| r["seq"].as_u64().unwrap())
            .collect::<Vec<_>>()
    };
    // Each restart writes a config event first: records are the even seqs.
    assert_eq!(q(&|_| {}), vec![8, 6, 4]);
    assert_eq!(
        q(
            &|q| q.since =
                Some(std::time::SystemTime::now() - std::time::Duration::from_secs(3600))
        ),
        vec![8, 6, 4]
    );
    assert_eq!(q(&|q| q.events = true), vec![7, 5, 3]);
    assert_eq!(
        q(
            &|q| q.since =
                Some(std::time::SystemTime::now() + std::time::Duration::from_secs(3600))
        ),
        Vec::<u64>::new()
    );
    assert_eq!(q(&|q| q.route = Some("other".into())), Vec::<u64>::new());
    assert_eq!(q(&|q| q.text = Some("\"n\":1".into())), vec![4]);
    // `show` by id finds a record in an old segment.
    let first = &done.records[0];
    let line = custody_audit::review::reader::find_by_id(
        &custody_audit::review::reader::DirSource(&dir),
        first["id"].as_str().unwrap(),
    )
    .unwrap();
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&line).unwrap()["seq"],
        2
    );
}

#[tokio::test]
async fn events_from_outside_are_chained_and_told_once_on_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("access");
    let config = custody_config::Config::for_test(&dir, vec![]);
    let writer = custody_audit::AuditWriter::start(&config).unwrap();
    for i in 0..3 {
        let event = serde_json::json!({"type": "access", "reviewer": "alice", "asked": format!("/records/{i}")});
        // Told only after the fsync: a read is on disk before it is served.
        writer.event(event).unwrap().await.unwrap();
        let mut on_disk = Vec::new();
        custody_audit::review::reader::for_each_line(&dir, |_, line| {
            on_disk.push(serde_json::from_slice::<serde_json::Value>(line).unwrap());
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
        let last = on_disk.last().unwrap();
        assert_eq!(
            last["event"]["asked"],
            format!("/records/{i}"),
            "{on_disk:?}"
        );
    }
    writer.shutdown().unwrap();
    let report = verify_dir(&dir, None, |_, _, _| {}).unwrap();
    assert_eq!(
        report.events, 4,
        "the start's config event and three access events"
    );
    assert_eq!(report.records, 0);
}

#[tokio::test]
async fn search_reads_a_segments_blocks_newest_first_and_stops_once_full() {
    use custody_audit::review::{
        reader::DirSource,
        search::{search, Query},
    };
    let up = chat_upstream().await;
    let custody = Custody::start(vec![openai_route(&up)]).await;
    // Each request written before the next: one block each, all in one segment.
    for i in 0..8 {
        let before = custody.metric("custody_audit_records_written_total").await;
        let path = if i % 2 == 0 {
            "/v1/chat/completions"
        } else {
            "/v1/embeddings"
        };
        send(
            &client(),
            post(&custody.url(path), &[], format!("{{\"n\":{i}}}")),
        )
        .await;
        custody
            .until_metric("custody_audit_records_written_total", |v| v > before)
            .await;
    }
    let done = custody.stop().await;
    let dir = done.audit_dir();
    let segs = segments(&dir);
    assert_eq!(segs.len(), 1);
    let idx = custody_audit::index::load(&segs[0]).unwrap();
    assert!(idx.blocks.len() >= 8, "{} blocks", idx.blocks.len());
    let seqs = |q: Query| {
        search(&DirSource(&dir), &q)
            .unwrap()
            .values()
            .iter()
            .map(|r| r["seq"].as_u64().unwrap())
            .collect::<Vec<_>>()
    };
    // The config event is seq 1; records 2..=9, newest first.
    assert_eq!(
        seqs(Query {
            limit: 3,
            ..Query::default()
        }),
        vec![9, 8, 7]
    );
    assert_eq!(
        seqs(Query {
            limit: 50,
            ..Query::default()
        }),
        vec![9, 8, 7, 6, 5, 4, 3, 2]
    );
    // A filter the raw line is tested for first: only the matching ones, in order.
    let embeddings = |limit| Query {
        model: None,
        text: Some("embeddings".into()),
        limit,
        ..Query::default()
    };
    assert_eq!(seqs(embeddings(2)), vec![9, 7]);
    assert_eq!(seqs(embeddings(10)), vec![9, 7, 5, 3]);
    let ok = Query {
        outcome: Some("ok".into()),
        limit: 5,
        ..Query::default()
    };
    assert_eq!(seqs(ok), vec![9, 8, 7, 6, 5]);
    let none = Query {
        key_id: Some("key_\"quoted".into()),
        limit: 5,
        ..Query::default()
    };
    assert!(seqs(none).is_empty());
}
