//! Evidence: each record proves on its own to a signed tree head with only the public
//! key; a later checkpoint proves it extends an earlier one; trails written before tree
//! heads still verify, and gain them when custody next starts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{fs, path::Path};

use custody_audit::{
    review::{
        proof::{self, InclusionProof, Proven},
        reader::DirSource,
        verify::verify_dir,
    },
    signing::{self, Checkpoint, SignerKey},
};
use custody_tests::{evidence::*, *};

fn ids(t: &Trail) -> Vec<String> {
    records(&t.dir())
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect()
}

fn checkpoint_lines(dir: &Path) -> Vec<String> {
    fs::read_to_string(dir.join("checkpoints.log"))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Flips one character of `s` at `at` (a hex digit to another one, else a letter).
fn flip(s: &str, at: usize) -> String {
    let mut b = s.as_bytes().to_vec();
    b[at] = match b[at] {
        b'0' => b'1',
        b'a'..=b'f' | b'1'..=b'9' => b'0',
        b'x' => b'y',
        _ => b'x',
    };
    String::from_utf8(b).unwrap()
}

#[tokio::test]
async fn every_record_proves_alone_and_any_change_to_record_proof_or_head_fails() {
    let t = signed_trail(3, 4).await;
    let report = verify_dir(&t.dir(), Some(&t.public), |_, _, _| {}).unwrap();
    // Every seal and checkpoint's tree head was recomputed from the records.
    assert!(report.tree_heads >= report.seals + 3, "{report:?}");

    let ids = ids(&t);
    assert_eq!(ids.len(), 12);
    let proofs = proof::prove(&DirSource(t.dir()), &ids).unwrap();
    // Records of a sealed segment prove to its seal: three heads for three segments.
    let heads: std::collections::BTreeSet<&str> = proofs.iter().map(|p| p.head.as_str()).collect();
    assert_eq!(heads.len(), 3);
    assert!(heads.iter().all(|h| h.starts_with("{\"kind\":\"seal\"")));
    for (p, id) in proofs.iter().zip(&ids) {
        // Through JSON, as a reviewer receives it.
        let json = serde_json::to_vec(p).unwrap();
        match proof::check(&json, &t.public).unwrap() {
            Proven::Inclusion {
                id: got, tree_size, ..
            } => {
                assert_eq!(got.as_deref(), Some(id.as_str()));
                assert!(tree_size >= p.seq);
            }
            other => panic!("{other:?}"),
        }
    }

    let p = &proofs[5];
    let fails = |q: &InclusionProof| {
        let err = proof::check_inclusion(q, &t.public).unwrap_err();
        eprintln!("refused: {err}");
    };
    // The record: one content byte changed (its own hash no longer holds) ...
    let at = p.record.find("turn").unwrap();
    fails(&InclusionProof {
        record: flip(&p.record, at),
        ..p.clone()
    });
    // ... or a record swapped in whole from elsewhere in the trail.
    fails(&InclusionProof {
        record: proofs[6].record.clone(),
        ..p.clone()
    });
    // The proof: a path entry, a cut path, another leaf's path, another size.
    fails(&InclusionProof {
        path: {
            let mut path = p.path.clone();
            path[1] = flip(&path[1], 3);
            path
        },
        ..p.clone()
    });
    fails(&InclusionProof {
        path: p.path[..p.path.len() - 1].to_vec(),
        ..p.clone()
    });
    fails(&InclusionProof {
        path: proofs[4].path.clone(),
        ..p.clone()
    });
    fails(&InclusionProof {
        tree_size: p.tree_size + 1,
        ..p.clone()
    });
    // The head: its root edited (the signature no longer holds), or re-signed by a
    // key that is not the trail's.
    let root_at = p.head.find("\"root\":\"").unwrap() + 8;
    fails(&InclusionProof {
        head: flip(&p.head, root_at),
        ..p.clone()
    });
    let mut seal: signing::Seal = serde_json::from_str(&p.head).unwrap();
    let other = SignerKey::from_seed([9; 32]);
    seal.key = Some(other.public_hex().to_owned());
    fails(&InclusionProof {
        head: String::from_utf8(signing::sign_line(&seal, Some(&other)).unwrap()).unwrap(),
        ..p.clone()
    });
    // A proof file that is not one.
    assert!(proof::check(b"{\"kind\":\"custody.inclusion/v1\"}", &t.public).is_err());
    assert!(proof::check(b"not json", &t.public).is_err());
}

#[tokio::test]
async fn a_later_checkpoint_proves_it_extends_an_earlier_one_and_a_rewritten_trail_cannot() {
    let t = signed_trail(2, 3).await;
    let dir = t.dir();
    let kept = checkpoint_lines(&dir);
    let earlier = kept[kept.len() / 2].clone();

    // More traffic after the auditor kept that line.
    let t = t.grow(|_| {}).await;
    let dir = t.dir();
    let key = t.private();
    let up = chat_upstream().await;
    let p = proof::prove_consistency(&DirSource(&dir), earlier.as_bytes()).unwrap();
    match proof::check_consistency(&p, &t.public).unwrap() {
        Proven::Consistency {
            first_size,
            second_size,
            ..
        } => assert!(first_size < second_size),
        other => panic!("{other:?}"),
    }
    // From the very first checkpoint too.
    let first = proof::prove_consistency(&DirSource(&dir), kept[0].as_bytes()).unwrap();
    proof::check_consistency(&first, &t.public).unwrap();

    // Someone holding the key rewrites the trail from the start: a new trail, same
    // key, one early record different. Its own checkpoints are signed and consistent
    // with each other, but it cannot prove it extends what the auditor kept.
    let keys = tempfile::tempdir().unwrap();
    fs::copy(&key, keys.path().join("test.key")).unwrap();
    let key = keys.path().join("test.key");
    let mut forged = Custody::start_with(vec![openai_route(&up)], |c| {
        c.audit.signing_key = Some(key.clone())
    })
    .await;
    for i in 0..12 {
        if i == 4 {
            let stopped = forged.stop().await;
            forged = Custody::start_in(stopped.dir, vec![openai_route(&up)], |c| {
                c.audit.signing_key = Some(key.clone())
            })
            .await;
        }
        send(
            &client(),
            post(
                &forged.url("/v1/chat/completions"),
                &[],
                format!("{{\"model\":\"m\",\"n\":{i}}}"),
            ),
        )
        .await;
    }
    let forged = forged.stop().await;
    let fdir = forged.audit_dir();
    verify_dir(&fdir, Some(&t.public), |_, _, _| {}).unwrap();
    let q = proof::prove_consistency(&DirSource(&fdir), earlier.as_bytes()).unwrap();
    let err = proof::check_consistency(&q, &t.public).unwrap_err();
    assert!(err.to_string().contains("does not extend"), "{err}");
    // Nor can the genuine proof be reused with the forged trail's head.
    let spliced = proof::ConsistencyProof {
        second: q.second.clone(),
        ..p.clone()
    };
    assert!(proof::check_consistency(&spliced, &t.public).is_err());
}

/// Strips tree heads from every seal and checkpoint and signs them again (relinking
/// seals, and checkpoints to the bytes they cover): a trail as custody wrote it before
/// tree heads existed.
fn strip_tree_heads(dir: &Path, key: &SignerKey) {
    use sha2::{Digest, Sha256};
    // Old seal hash -> new one; segment -> (old length, new length, new SHA-256).
    let mut seals = std::collections::HashMap::new();
    let mut lengths = std::collections::HashMap::new();
    let mut prev_seal = signing::ZERO_HEX.to_owned();
    for seg in custody_audit::review::reader::segments(dir).unwrap() {
        let bytes = fs::read(&seg.path).unwrap();
        let parsed = custody_audit::segment::parse_segment(&bytes).unwrap();
        let Some(s) = parsed.seal else { continue };
        let at = bytes.len() - custody_audit::segment::encode_seal(&s.line).len();
        let mut seal = s.seal;
        seal.tree = None;
        seal.prev_seal = prev_seal;
        let line = signing::sign_line(&seal, Some(key)).unwrap();
        prev_seal = signing::line_hash(&line);
        seals.insert(signing::line_hash(&s.line), prev_seal.clone());
        let mut out = bytes[..at].to_vec();
        out.extend(custody_audit::segment::encode_seal(&line));
        lengths.insert(
            seg.number,
            (
                bytes.len() as u64,
                out.len() as u64,
                hex::encode(Sha256::digest(&out)),
            ),
        );
        fs::write(&seg.path, out).unwrap();
    }
    rewrite_checkpoints(dir, key, |cp, _| {
        cp.tree = None;
        if let Some(new) = seals.get(&cp.seal) {
            cp.seal = new.clone();
        }
        if let Some((old_len, len, sha)) = lengths.get(&cp.segment) {
            if cp.segment_bytes == *old_len {
                cp.segment_bytes = *len;
                cp.segment_sha256 = sha.clone();
            }
        }
    });
}

/// Rewrites every checkpoint through `edit` (with its index), signed again with `key`
/// and relinked: what someone holding the key can do to the log.
fn rewrite_checkpoints(dir: &Path, key: &SignerKey, mut edit: impl FnMut(&mut Checkpoint, usize)) {
    let mut prev = signing::ZERO_HEX.to_owned();
    let mut log = Vec::new();
    for (i, line) in checkpoint_lines(dir).iter().enumerate() {
        let mut cp: Checkpoint = serde_json::from_str(line).unwrap();
        cp.prev = prev;
        edit(&mut cp, i);
        let line = signing::sign_line(&cp, Some(key)).unwrap();
        prev = signing::line_hash(&line);
        log.extend(line);
        log.push(b'\n');
    }
    fs::write(dir.join("checkpoints.log"), log).unwrap();
}

#[tokio::test]
async fn a_trail_written_before_tree_heads_verifies_and_gains_them_at_the_next_start() {
    let t = signed_trail(2, 2).await;
    let dir = t.dir();
    strip_tree_heads(&dir, &t.signer());
    assert!(!contains(&all_audit_bytes(&dir), "\"tree\":"));
    let old = verify_dir(&dir, Some(&t.public), |_, _, _| {}).unwrap();
    assert_eq!(old.tree_heads, 0);
    let ids = ids(&t);
    let err = proof::prove(&DirSource(&dir), &ids[..1]).unwrap_err();
    assert!(err.to_string().contains("carries a tree head yet"), "{err}");

    // The next start builds the tree from the records; what it signs then covers the
    // old records too, and they prove.
    let t = t.grow(|_| {}).await;
    let dir = t.dir();
    let r = verify_dir(&dir, Some(&t.public), |_, _, _| {}).unwrap();
    assert!(r.tree_heads >= 2, "{r:?}");
    for p in proof::prove(&DirSource(&dir), &ids).unwrap() {
        proof::check_inclusion(&p, &t.public).unwrap();
    }
}

#[tokio::test]
async fn after_retention_the_remaining_records_still_prove_and_verify() {
    let t = signed_trail(3, 2)
        .await
        .grow(|c| c.audit.retention_days = Some(0))
        .await;
    let dir = t.dir();
    let r = verify_dir(&dir, Some(&t.public), |_, _, _| {}).unwrap();
    assert_eq!(r.retired, 2);
    // The kept segments' tree heads are still recomputed: the retention event carries
    // the tree's start.
    assert!(r.tree_heads >= 2, "{r:?}");
    let kept: Vec<String> = records(&dir)
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect();
    assert!(!kept.is_empty());
    for p in proof::prove(&DirSource(&dir), &kept).unwrap() {
        proof::check_inclusion(&p, &t.public).unwrap();
    }

    // A seal's tree head that does not match its records is a break.
    let seg = custody_audit::review::reader::segments(&dir).unwrap()[0]
        .path
        .clone();
    let bytes = fs::read(&seg).unwrap();
    let parsed = custody_audit::segment::parse_segment(&bytes).unwrap();
    let s = parsed.seal.unwrap();
    let at = bytes.len() - custody_audit::segment::encode_seal(&s.line).len();
    let mut seal = s.seal;
    let tree = seal.tree.as_mut().unwrap();
    tree.root = flip(&tree.root, 0);
    let mut out = bytes[..at].to_vec();
    out.extend(custody_audit::segment::encode_seal(
        &signing::sign_line(&seal, Some(&t.signer())).unwrap(),
    ));
    fs::write(&seg, out).unwrap();
    let err = verify_dir(&dir, Some(&t.public), |_, _, _| {}).unwrap_err();
    assert!(err.to_string().contains("tree head"), "{err}");
}

fn user_of(v: &serde_json::Value) -> &str {
    v["client"]["user"]
        .as_str()
        .or(v["client"]["end_user"].as_str())
        .unwrap_or("")
}

#[tokio::test]
async fn a_bundle_holds_one_users_records_checks_offline_and_no_byte_of_it_can_change() {
    use custody_audit::review::bundle::{self, Contents, Manifest};
    let t = signed_trail(3, 6).await;
    let made = bundle_of(&t, "alice");

    // Checked in a fresh directory holding the bundle and the public key only.
    let fresh = tempfile::tempdir().unwrap();
    fs::write(fresh.path().join("alice.tar.zst"), &made).unwrap();
    fs::write(
        fresh.path().join("custody.pub"),
        hex::encode(t.public.as_bytes()),
    )
    .unwrap();
    let key = signing::load_public(&fresh.path().join("custody.pub")).unwrap();
    let bytes = fs::read(fresh.path().join("alice.tar.zst")).unwrap();
    let files = bundle::open(&bytes).unwrap();
    let checked = bundle::check(&files, &key).unwrap();
    let m = &checked.manifest;

    // Alice's records only, and every one of them: bob's traffic was interleaved in
    // every segment.
    let held: Vec<serde_json::Value> = files[bundle::RECORDS]
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    assert!(held.iter().all(|r| user_of(r) == "alice"));
    let alice: Vec<String> = records(&t.dir())
        .iter()
        .filter(|r| user_of(r) == "alice")
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect();
    let ids: Vec<&str> = held.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, alice);
    assert_eq!(
        (m.records, m.config_events),
        (9, 3),
        "one config event per start"
    );
    assert!(m.complete, "{}", m.completeness);
    assert_eq!(checked.heads, 3, "one seal per segment");
    let report = String::from_utf8(files[bundle::REPORT].clone()).unwrap();
    assert!(report.matches("<tr><td>").count() >= 9);
    assert!(report.contains(&m.key.fingerprint));

    // Any one byte changed, anywhere in the file, and it no longer checks.
    for at in 0..bytes.len() {
        let mut changed = bytes.clone();
        changed[at] ^= 0x01;
        assert!(
            bundle::open(&changed)
                .and_then(|f| bundle::check(&f, &key))
                .is_err(),
            "byte {at} of {}",
            bytes.len()
        );
    }
    assert!(bundle::open(&bytes[..bytes.len() - 1]).is_err());

    // Re-packed by someone who recomputes every digest: a record of bob's, with its
    // genuine proof, is not part of alice's selection; an edited record loses its proof;
    // another key is not the one trusted.
    let repack = |edit: &dyn Fn(&mut Contents)| {
        let lines = |name: &str| -> Vec<Vec<u8>> {
            files[name]
                .split(|&b| b == b'\n')
                .filter(|l| !l.is_empty())
                .map(<[u8]>::to_vec)
                .collect()
        };
        let mut c = Contents {
            manifest: serde_json::from_slice::<Manifest>(&files[bundle::MANIFEST]).unwrap(),
            records: lines(bundle::RECORDS),
            config: lines(bundle::CONFIG),
            proofs: lines(bundle::PROOFS)
                .iter()
                .map(|l| serde_json::from_slice(l).unwrap())
                .collect(),
            heads: lines(bundle::HEADS),
        };
        edit(&mut c);
        let mut out = Vec::new();
        bundle::write(&mut out, c, "<p>report</p>").unwrap();
        let err = bundle::check(&bundle::open(&out).unwrap(), &key).unwrap_err();
        eprintln!("refused: {err}");
        err.to_string()
    };
    let bob = records(&t.dir())
        .into_iter()
        .find(|r| user_of(r) == "bob")
        .unwrap();
    let bob_proof = proof::prove(
        &DirSource(t.dir()),
        &[bob["id"].as_str().unwrap().to_owned()],
    )
    .unwrap()
    .remove(0);
    let why = repack(&|c| {
        c.records.push(bob_proof.record.clone().into_bytes());
        c.proofs.push(bob_proof.clone());
        c.heads.push(bob_proof.head.clone().into_bytes());
        c.manifest.records += 1;
    });
    assert!(
        why.contains("does not match the bundle's selection"),
        "{why}"
    );
    let why = repack(&|c| {
        let text = String::from_utf8(c.records[0].clone()).unwrap();
        c.records[0] = text.replacen("turn", "tUrn", 1).into_bytes();
    });
    assert!(why.contains("without a proof"), "{why}");
    let why = repack(&|c| {
        c.manifest.key = bundle::KeyInfo::of(
            &signing::parse_public(SignerKey::from_seed([3; 32]).public_hex()).unwrap(),
        );
    });
    assert!(why.contains("not the one trusted"), "{why}");
    let why = repack(&|c| {
        c.records.pop();
    });
    assert!(why.contains("counts do not agree"), "{why}");
}

#[tokio::test]
async fn a_checkpoint_whose_tree_head_does_not_match_the_records_is_a_break() {
    let t = signed_trail(2, 3).await;
    let dir = t.dir();
    let n = checkpoint_lines(&dir).len();
    // Re-signed with the real key, so only the tree head itself can give it away.
    rewrite_checkpoints(&dir, &t.signer(), |cp, i| {
        if i == n / 2 {
            let tree = cp.tree.as_mut().unwrap();
            tree.root = flip(&tree.root, 5);
        }
    });
    let err = verify_dir(&dir, Some(&t.public), |_, _, _| {}).unwrap_err();
    assert!(
        err.to_string()
            .contains("checkpoint's tree head does not match the records"),
        "{err}"
    );
}

/// Every record line of the segments, decompressed as `zstd -dc` would print them.
fn decompressed(dir: &Path) -> String {
    custody_audit::review::reader::segments(dir)
        .unwrap()
        .iter()
        .map(|s| {
            String::from_utf8(zstd::stream::decode_all(&fs::read(&s.path).unwrap()[..]).unwrap())
                .unwrap()
        })
        .collect()
}

#[tokio::test]
async fn content_retention_purges_old_bodies_and_the_trail_still_verifies() {
    use custody_audit::review::{
        search::{search, Query},
        verify::{verify_dir_with, Depth},
    };
    let t = signed_trail(3, 4).await;
    let dir = t.dir();
    let before = ids(&t);
    assert!(decompressed(&dir).contains("turn 1-2"));
    // Custody starts 31 days later (by its clock) with bodies kept 30 days: the three
    // sealed segments lose their bodies; the new exchange keeps its own.
    let day = std::time::Duration::from_secs(86_400);
    let t = t
        .grow_at(31 * day, |c| {
            c.audit.content_retention_days = Some(30);
            c.audit.retention_days = Some(365);
        })
        .await;
    let text = decompressed(&dir);
    assert!(!text.contains("turn "), "a purged body is still on disk");
    assert!(
        text.contains("\"body\":{\"model\":\"m\"}"),
        "the new body is kept"
    );
    let leftovers: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".purge"))
        .collect();
    assert!(leftovers.is_empty());

    // The chain, the seals, the checkpoints and the tree heads all still hold, and
    // verify tells the purge apart: 12 records, a request and a response body each.
    let r = verify_dir(&dir, Some(&t.public), |_, _, _| {}).unwrap();
    assert_eq!(
        (r.purges, r.purged_segments, r.purged_bodies),
        (1, 3, 24),
        "{r:?}"
    );
    assert!(r.purges_pending.is_empty());
    let fast = verify_dir_with(&dir, Some(&t.public), Depth::Fast, |_, _, _| {}).unwrap();
    assert_eq!(fast.purged_segments, 3);
    let event = trail(&dir)
        .into_iter()
        .find(|r| r["event"]["type"] == "purge")
        .unwrap();
    assert_eq!(event["event"]["reason"], "content_retention");
    assert_eq!(event["event"]["records"], 12);
    assert_eq!(event["event"]["segments"].as_array().unwrap().len(), 3);

    // Metadata search still finds every record, through indexes the purge vouches for.
    let found = search(
        &DirSource(&dir),
        &Query {
            user: Some("alice".into()),
            limit: 100,
            ..Query::default()
        },
    )
    .unwrap();
    assert!(
        found.untrusted_indexes.is_empty(),
        "{:?}",
        found.untrusted_indexes
    );
    assert_eq!(found.records.len(), 6);
    for r in &found.records {
        let v: serde_json::Value = serde_json::from_str(r.get()).unwrap();
        assert!(v["request"]["body"].is_null() && v["request"]["body_sha256"].is_string());
        assert_eq!(v["gen_ai"]["request"]["model"], "m");
    }
    // A purged record still proves on its own.
    for p in proof::prove(&DirSource(&dir), &before[..2]).unwrap() {
        proof::check_inclusion(&p, &t.public).unwrap();
    }

    // Bodies removed without a purge event: content missing, not purged by policy.
    let t = t.grow(|_| {}).await;
    let dir = t.dir();
    let newest = custody_audit::review::reader::segments(&dir).unwrap()[3].clone();
    let mut c = custody_audit::store::compressor().unwrap();
    custody_audit::purge::rewrite(
        &newest.path,
        newest.number,
        &custody_audit::purge::Selector::Before(i64::MAX),
        &mut c,
        &std::sync::atomic::AtomicBool::new(false),
    )
    .unwrap()
    .unwrap()
    .install(custody_audit::index::EventRef { segment: 1, seq: 1 })
    .unwrap();
    let err = verify_dir(&dir, Some(&t.public), |_, _, _| {}).unwrap_err();
    assert!(err.to_string().contains("content missing"), "{err}");
}

#[tokio::test]
async fn a_running_custody_purges_one_person_on_request_and_keeps_serving() {
    let up = chat_upstream().await;
    let custody = Custody::start_with(vec![openai_route(&up)], |c| {
        c.admin.token = Some("admin-token".into());
    })
    .await;
    let c = client();
    let chat = |user: &str, text: &str| {
        post(
            &custody.url("/v1/chat/completions"),
            &[],
            format!(
                r#"{{"model":"m","user":"{user}","messages":[{{"role":"user","content":"{text}"}}]}}"#
            ),
        )
    };
    for i in 0..3 {
        send(&c, chat("carol", &format!("carol secret {i}"))).await;
        send(&c, chat("dave", &format!("dave note {i}"))).await;
    }
    let ask = |token: &str, body: &str| {
        let req = http::Request::post(custody.admin_url("/admin/purge"))
            .header("authorization", format!("Bearer {token}"))
            .body(http_body_util::Full::new(bytes::Bytes::from(
                body.to_owned(),
            )))
            .unwrap();
        send(&c, req)
    };
    assert_eq!(ask("wrong", r#"{"user":"carol"}"#).await.0.status, 401);
    assert_eq!(ask("admin-token", r#"{"user":""}"#).await.0.status, 400);
    assert_eq!(
        ask("admin-token", r#"{"pseudonym":"carol"}"#)
            .await
            .0
            .status,
        400
    );
    assert_eq!(ask("admin-token", &"x".repeat(10_000)).await.0.status, 400);
    let (parts, body) = ask("admin-token", r#"{"user":"carol"}"#).await;
    assert_eq!(parts.status, 200, "{body:?}");
    let done: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(done["records"], 3, "{done}");
    // Traffic goes on, into a new segment.
    send(&c, chat("carol", "carol later")).await;
    // A second request rewrites the segment the first one did: verify follows both.
    let (parts, body) = ask("admin-token", r#"{"user":"dave"}"#).await;
    assert_eq!(parts.status, 200, "{body:?}");
    let done: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(done["records"], 3, "{done}");
    let stopped = custody.stop().await;
    let dir = stopped.audit_dir();
    let text = decompressed(&dir);
    assert!(
        !text.contains("carol secret"),
        "carol's purged bodies are on disk"
    );
    assert!(!text.contains("dave note") && text.contains("carol later"));
    let r = verify_dir(&dir, None, |_, _, _| {}).unwrap();
    assert_eq!((r.purges, r.purged_segments), (2, 1), "{r:?}");
    assert!(r.purges_pending.is_empty(), "{r:?}");
    assert_eq!(
        records(&dir)
            .iter()
            .filter(|r| r["client"]["user"] == "carol")
            .count(),
        4
    );
}

#[tokio::test]
async fn a_stop_in_the_middle_of_content_retention_leaves_a_whole_trail() {
    let t = signed_trail(3, 4).await;
    let dir = t.dir();
    // A crash left a rewrite half written: the next start removes it.
    let leftover = dir.join("00000000000000000001.seg.purge");
    fs::write(&leftover, b"half a rewrite").unwrap();
    let mut config = custody_config::Config::for_test(&dir, vec![]);
    config.audit.signing_key = Some(t.private());
    config.audit.content_retention_days = Some(30);
    config.audit.retention_days = Some(365);
    let gate = custody_audit::writer::WriterGate::default();
    gate.advance_clock(std::time::Duration::from_secs(31 * 86_400));
    // Stopped at once: the purge, running beside the writer, is done or left whole.
    let w = custody_audit::AuditWriter::start_gated(&config, Some(gate)).unwrap();
    let purges = w.stats().purges.get();
    w.shutdown().unwrap();
    let names: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n.ends_with(".purge")),
        "{names:?} (purges: {purges})"
    );
    let r = verify_dir(&dir, Some(&t.public), |_, _, _| {}).unwrap();
    assert!(r.purges_pending.is_empty(), "{r:?}");
    let text = decompressed(&dir);
    match r.purges {
        0 => assert!(
            text.contains("turn 1-2"),
            "bodies gone without a purge event"
        ),
        1 => assert!(!text.contains("turn "), "a purged body is still on disk"),
        n => panic!("{n} purges"),
    }
}

#[tokio::test]
async fn a_purge_that_cannot_read_a_segment_says_so_and_purges_the_rest() {
    let t = signed_trail(3, 4).await;
    let dir = t.dir();
    // A damaged segment (a flipped byte in its first block's frame) is not rewritten.
    let second = dir.join("00000000000000000002.seg");
    let mut bytes = fs::read(&second).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x55;
    fs::write(&second, bytes).unwrap();
    let mut config = custody_config::Config::for_test(&dir, vec![]);
    config.audit.signing_key = Some(t.private());
    let w = custody_audit::AuditWriter::start(&config).unwrap();
    let done = w
        .config()
        .purge(custody_audit::purge::Selector::User("alice".into()))
        .unwrap();
    w.shutdown().unwrap();
    assert_eq!(done.skipped, ["00000000000000000002.seg"], "{done:?}");
    assert_eq!((done.segments, done.records), (2, 4), "{done:?}");
    // The event is in the newest segment (the damaged one cannot be read past).
    let segs = custody_audit::review::reader::segments(&dir).unwrap();
    let newest = segs.last().unwrap();
    let mut event = None;
    custody_audit::review::reader::for_each_line_in(&DirSource(&dir), newest, true, |line| {
        let v: serde_json::Value = serde_json::from_slice(line).unwrap();
        if v["event"]["type"] == "purge" {
            event = Some(v);
        }
        std::ops::ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(
        event.unwrap()["event"]["skipped"][0],
        "00000000000000000002.seg"
    );
}
