//! The review console over a large trail: how long a filtered search page and a record
//! page take to answer, end to end (HTTP, authorization, the trail read, the HTML, and
//! the access event fsynced before the answer leaves). Sequential requests from one
//! client; prints p50 and p95 per page.
//!
//! Write the trail first with the trail bench's generator, then point this at it:
//! `cargo bench -p custody-audit --bench trail -- --keep /tmp/trail1m` (1,000,000 records),
//! `cargo bench -p custody-tests --bench console -- --dir /tmp/trail1m`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{ops::ControlFlow, path::PathBuf, time::Instant};

use bytes::Bytes;
use custody_config::{Console, Reviewer, Role};
use custody_tests::{client, send};
use http_body_util::Full;
use sha2::Digest;

const TOKEN: &str = "bench-reviewer-token";

fn ms(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

#[tokio::main]
async fn main() {
    let dir = std::env::args()
        .skip_while(|a| a != "--dir")
        .nth(1)
        .map(PathBuf::from)
        .expect("--dir TRAIL (write one with: cargo bench -p custody-audit --bench trail -- --keep DIR)");
    let rounds: usize = if std::env::args().any(|a| a == "--quick") {
        10
    } else {
        50
    };
    // Records to ask for: spread over the trail, read once here (not timed).
    let mut picks = Vec::new();
    let mut count = 0u64;
    custody_audit::review::reader::for_each_line(&dir, |_, l| {
        count += 1;
        if count.is_multiple_of(9973) {
            picks.push(serde_json::from_slice::<serde_json::Value>(l).unwrap());
        }
        ControlFlow::Continue(())
    })
    .unwrap();
    println!(
        "trail                    {count} lines in {}",
        dir.display()
    );

    let access = tempfile::tempdir().unwrap();
    let console = Console {
        listen: "127.0.0.1:0".parse().unwrap(),
        tls: None,
        dir: Some(dir.clone()),
        from: None,
        options: Default::default(),
        access_dir: access.path().join("access"),
        signing_key: None,
        trusted_key: None,
    };
    let reviewers = vec![Reviewer {
        id: "bench".into(),
        token_sha256: Some(hex::encode(sha2::Sha256::digest(TOKEN))),
        token_env: None,
        role: Role::Content,
        routes: None,
        teams: None,
        audit: true,
    }];
    let mut running = custody_tests::console::Running::start(console, reviewers).await;
    let addr = running.addr;
    let client = client();
    let get = |path: String| {
        let client = client.clone();
        async move {
            let req = http::Request::get(format!("http://{addr}{path}"))
                .header("authorization", format!("Bearer {TOKEN}"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            let t = Instant::now();
            let (parts, body) = send(&client, req).await;
            let took = t.elapsed().as_secs_f64() * 1e3;
            assert_eq!(
                parts.status,
                200,
                "{path}: {}",
                String::from_utf8_lossy(&body)
            );
            (took, body)
        }
    };
    let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let mut cases: Vec<(&str, Vec<String>)> = Vec::new();
    // Filtered searches: one caller's key within an hour around a record (the trail
    // bench's selective query), and a model and status over the whole trail.
    cases.push((
        "search page, key id + 1 h",
        picks
            .iter()
            .map(|r| {
                let at = humantime::parse_rfc3339(r["time"]["start"].as_str().unwrap()).unwrap();
                let fmt = |t| humantime::format_rfc3339_seconds(t).to_string();
                format!(
                    "/search?key_id={}&since={}&until={}",
                    enc(r["client"]["key_id"].as_str().unwrap()),
                    enc(&fmt(at - std::time::Duration::from_secs(1800))),
                    enc(&fmt(at + std::time::Duration::from_secs(1800)))
                )
            })
            .collect(),
    ));
    cases.push((
        "search page, model + 2xx",
        vec!["/search?model=gpt-4o&status=2xx".to_owned()],
    ));
    cases.push(("search page, no filter", vec!["/search".to_owned()]));
    cases.push((
        "record page",
        picks
            .iter()
            .map(|r| format!("/records/{}", r["id"].as_str().unwrap()))
            .collect(),
    ));
    cases.push((
        "record, API",
        picks
            .iter()
            .map(|r| format!("/api/records/{}", r["id"].as_str().unwrap()))
            .collect(),
    ));
    for (name, paths) in &cases {
        let mut took = Vec::new();
        for i in 0..rounds.max(paths.len()) {
            let (t, _) = get(paths[i % paths.len()].clone()).await;
            took.push(t);
        }
        took.sort_by(f64::total_cmp);
        println!(
            "{name:<26} p50 {:>7.1} ms  p95 {:>7.1} ms  ({} requests)",
            ms(&took, 0.5),
            ms(&took, 0.95),
            took.len()
        );
    }
    running.stop().await;
}
