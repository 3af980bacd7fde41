//! Whatever a client sends, custody records it in a form every review command reads:
//! randomly nested, randomly encoded, invalid UTF-8 and huge bodies all end up in the
//! trail, each readable as `log show` reads it, found by search, and the trail verifies.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;

use custody_audit::{
    review::reader::{self, DirSource},
    review::search::{search, Query},
    review::verify::verify_dir,
};
use custody_tests::*;
use proptest::prelude::*;

/// One hostile body: its bytes (as encoded) and the `Content-Encoding` it goes with.
#[derive(Debug, Clone)]
struct Case {
    body: Vec<u8>,
    encoding: Option<&'static str>,
}

/// JSON-like text nested `depth` levels (objects and arrays mixed), with a payload.
fn nested(depth: usize, kinds: &[bool], payload: &str) -> String {
    let mut open = String::new();
    let mut close = String::new();
    for i in 0..depth {
        if kinds[i % kinds.len()] {
            open.push_str("{\"k\":");
            close.insert(0, '}');
        } else {
            open.push('[');
            close.insert(0, ']');
        }
    }
    format!("{open}\"{payload}\"{close}")
}

fn encode(body: &[u8], encoding: Option<&'static str>) -> Vec<u8> {
    match encoding {
        None => body.to_vec(),
        Some("gzip") => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(body).unwrap();
            e.finish().unwrap()
        }
        Some("br") => {
            let mut out = Vec::new();
            let mut w = brotli::CompressorWriter::new(&mut out, 4096, 4, 22);
            w.write_all(body).unwrap();
            drop(w);
            out
        }
        Some("zstd") => zstd::bulk::compress(body, 1).unwrap(),
        Some(other) => panic!("{other}"),
    }
}

fn case() -> impl Strategy<Value = Case> {
    (
        0usize..400,
        prop::collection::vec(any::<bool>(), 1..4),
        prop::sample::select(vec![
            "hi",
            "mail bob@example.com",
            "card 4111 1111 1111 1111",
            "\\u00e9\\ud83d\\ude00",
        ]),
        0usize..200_000,
        prop::collection::vec(any::<u8>(), 0..4),
        prop::sample::select(vec![None, Some("gzip"), Some("br"), Some("zstd")]),
        any::<bool>(),
    )
        .prop_map(
            |(depth, kinds, payload, pad, junk, encoding, truncate_json)| {
                let mut text = nested(depth, &kinds, payload).into_bytes();
                // A huge string somewhere, and a few arbitrary (often invalid UTF-8) bytes.
                if pad > 0 {
                    let at = text.len() / 2;
                    let filler = "x".repeat(pad);
                    text.splice(at..at, filler.bytes());
                }
                let at = text.len() / 3;
                text.splice(at..at, junk);
                if truncate_json {
                    text.truncate(text.len() * 2 / 3);
                }
                Case {
                    body: encode(&text, encoding),
                    encoding,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn every_body_is_recorded_readable_searchable_and_verified(cases in prop::collection::vec(case(), 1..12)) {
        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let up = MockUpstream::start(|_, body| {
                respond(200, &[("content-type", "application/json")], body.clone())
            })
            .await;
            let custody = Custody::start(vec![openai_route(&up)]).await;
            for c in &cases {
                let mut headers = vec![("content-type", "application/json")];
                if let Some(e) = c.encoding {
                    headers.push(("content-encoding", e));
                }
                let (parts, got) = send(
                    &client(),
                    post(&custody.url("/v1/chat/completions"), &headers, c.body.clone()),
                )
                .await;
                assert_eq!(parts.status, 200);
                assert_eq!(got, c.body, "forwarded untouched");
            }
            // `stop` parses every line of the trail as serde_json does for `log show`.
            let done = custody.stop().await;
            assert_eq!(done.records.len(), cases.len(), "every exchange is in the trail");
            let dir = done.audit_dir();
            let source = DirSource(&dir);
            for r in &done.records {
                let id = r["id"].as_str().unwrap();
                let line = reader::find_by_id(&source, id).unwrap();
                serde_json::from_slice::<serde_json::Value>(&line).unwrap();
                let q = Query { text: Some(id.to_owned()), limit: 2, ..Query::default() };
                let found = search(&source, &q).unwrap();
                assert_eq!(found.unreadable, 0);
                assert_eq!(found.records.len(), 1, "search finds {id}");
                let body = &r["request"];
                assert!(
                    body.get("body").is_some() || body.get("omitted").is_some(),
                    "the record holds the body or says why not: {body}"
                );
            }
            let all = all_audit_bytes(&dir);
            assert!(!contains(&all, "bob@example.com"));
            verify_dir(&dir, None, |_, _, _| {}).unwrap();
        });
    }
}
