//! The trail at scale: write N realistic records through the real writer (assemble,
//! redact, chain, compress, append), then report writer records/s, bytes per record,
//! compression (and what a trained zstd dictionary would add), verify MB/s, and search
//! latency for a selective and a full-text query.
//!
//! `cargo bench -p custody-audit --bench trail` (1,000,000 records; `-- --quick` for 100,000;
//! `-- --keep DIR` to write the trail into DIR and stop there, for the console bench;
//! `-- --evidence DIR` for only the proof measurements on such a trail;
//! `-- --purge DIR` to run content retention over such a trail, half and then all of it;
//! `-- --single-turn` for short one-question chats instead of conversations with history;
//! `-- --writer-only` to stop after the writer, for profiling it; `-- --policies` to
//! run the writer with 10 flag rules over 1,000 terms; `-- --policy-cost` to measure
//! what those rules add: interleaved rounds with and without them, in one process;
//! `-- --drift-cost` the same for served-model tracking and the live drift metrics;
//! `-- --otel-cost` for OpenTelemetry spans, without and with content).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    net::SocketAddr,
    ops::ControlFlow,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use custody_audit::{
    exchange::{Capture, Exchange, Outcome},
    review::reader::{self, DirSource},
    review::search::{search, Query},
    review::verify::{verify_dir, verify_dir_with, Depth},
    AuditWriter,
};
use custody_config::{Config, Provider, Route};
use http::{HeaderMap, HeaderValue, Method, StatusCode};

const WORDS: &[&str] = &[
    "summarise",
    "the",
    "quarterly",
    "report",
    "please",
    "and",
    "list",
    "three",
    "risks",
    "for",
    "our",
    "team",
    "budget",
    "timeline",
    "customer",
    "invoice",
    "migration",
    "database",
    "latency",
    "deploy",
    "rollback",
    "policy",
    "contract",
    "draft",
    "email",
    "meeting",
    "explain",
    "why",
    "this",
    "function",
    "fails",
    "with",
    "error",
    "code",
    "rewrite",
    "shorter",
    "formal",
    "translate",
    "french",
];

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn words(&mut self, n: usize) -> String {
        (0..n)
            .map(|_| WORDS[(self.next() % WORDS.len() as u64) as usize])
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// A pool of multi-turn chat exchanges: each request carries the conversation so far.
fn pool(n: usize, max_turns: u64) -> Vec<(Bytes, Bytes)> {
    let mut r = Rng(0x5eed);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let mut messages = vec![
            serde_json::json!({"role": "system", "content": "You are a helpful assistant for the finance team. Answer briefly."}),
        ];
        for _ in 0..(1 + r.next() % max_turns) {
            let len = 12 + (r.next() % 40) as usize;
            let mut user = format!(
                "{} (ticket {}; contact jane.doe{}@example.com)",
                r.words(len),
                r.next() % 100_000,
                r.next() % 50
            );
            // One message in sixteen names a project the policy term lists hold.
            if r.next().is_multiple_of(16) {
                let (list, i) = (r.next() % 4, r.next() % 250);
                user.push_str(&format!(" re Codename-{list}-{i:03} internal"));
            }
            messages.push(serde_json::json!({"role": "user", "content": user}));
            let req = serde_json::json!({"model": "gpt-4o-mini", "temperature": 0.2, "messages": messages});
            let len = 30 + (r.next() % 120) as usize;
            let answer = r.words(len);
            let resp = serde_json::json!({"id": format!("chatcmpl-{}", r.next()), "object": "chat.completion", "created": 1_767_225_600u64, "model": "gpt-4o-mini-2024-07-18",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 40 + r.next() % 900, "completion_tokens": 20 + r.next() % 300, "total_tokens": 1000}});
            messages.push(serde_json::json!({"role": "assistant", "content": answer}));
            out.push((Bytes::from(req.to_string()), Bytes::from(resp.to_string())));
        }
    }
    out
}

/// Ten flag rules as a security team would write them, over four term lists of 250
/// project code names each (1,000 in all), which one user message in sixteen names.
fn policies(config: &mut Config) {
    use custody_config::{Action, Policy, Severity};
    for list in 0..4 {
        let terms: Vec<String> = (0..250)
            .map(|i| format!("codename-{list}-{i:03} internal"))
            .collect();
        config.policy_terms.insert(format!("list{list}"), terms);
    }
    let rules = [
        "request.text.containsAny(terms.list0)",
        "request.text.containsAny(terms.list1)",
        "request.text.containsAny(terms.list2)",
        "request.text.containsAny(terms.list3)",
        "response.text.containsAny(terms.list0)",
        "request.entities.EMAIL_ADDRESS > 3",
        "model.startsWith('gpt-4o') && usage.output_tokens > 300",
        "request.tools.exists(t, t == 'shell')",
        "status >= 500",
        "user == 'mallory' || team == 'contractors'",
    ];
    config.policies = rules
        .iter()
        .enumerate()
        .map(|(i, when)| Policy::new(&format!("rule-{i}"), when, Action::Flag, Severity::Medium))
        .collect();
}

fn exchange(req: &Bytes, resp: &Bytes, key: &HeaderValue, start: SystemTime) -> Exchange {
    let mut headers = HeaderMap::new();
    headers.insert("authorization", key.clone());
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    let mut ex = Exchange::begin(
        Method::POST,
        "/v1/chat/completions".parse().unwrap(),
        headers,
        Some(SocketAddr::from(([10, 0, 0, 7], 41000))),
    );
    ex.route = Some(Arc::from("openai"));
    ex.provider = Provider::Openai;
    ex.upstream_path = Some("/v1/chat/completions".into());
    ex.started_at = start;
    ex.status = Some(StatusCode::OK);
    ex.response_headers
        .insert("content-type", HeaderValue::from_static("application/json"));
    ex.ended_at = Some(ex.started + Duration::from_millis(350));
    ex.outcome = Outcome::Ok;
    let cap = |b: &Bytes| Capture {
        chunks: vec![b.clone()],
        captured: b.len(),
        total: b.len() as u64,
        truncated: false,
        complete: true,
    };
    ex.request = cap(req);
    ex.response = cap(resp);
    ex
}

/// Writes `n` records of `pool` through a writer on `config`; its summary and the
/// wall time.
fn write(
    config: &Config,
    pool: &[(Bytes, Bytes)],
    keys: &[HeaderValue],
    n: u64,
) -> (custody_audit::writer::WriterSummary, f64) {
    // Records spread over 30 days, in order, as a month of traffic would be.
    let month = Duration::from_secs(30 * 86_400);
    let t0 = SystemTime::now() - month;
    let step = month / n as u32;
    let writer = AuditWriter::start(config).unwrap();
    let sender = writer.sender();
    let started = Instant::now();
    for i in 0..n {
        let (req, resp) = &pool[(i as usize) % pool.len()];
        // Spin rather than block on a full queue, as the proxy never blocks: a blocked
        // producer would cost the writer a wake-up per record.
        let mut ex = exchange(req, resp, &keys[(i % 200) as usize], t0 + step * i as u32);
        while let Some(back) = sender.try_submit(ex) {
            ex = back;
            std::thread::yield_now();
        }
    }
    drop(sender);
    let summary = writer.shutdown().unwrap();
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(
        summary.written,
        n + 1,
        "the records and the start's config event"
    );
    (summary, secs)
}

/// Writer CPU per record (µs) of `a` and `b`: rounds of each, interleaved, each in a
/// fresh directory, so that the machine's drift falls on both; the rounds' values, and
/// the median of the rounds' relative differences (b over a).
fn interleaved(
    (a_name, a): (&str, &Config),
    (b_name, b): (&str, &Config),
    pool: &[(Bytes, Bytes)],
    keys: &[HeaderValue],
    n: u64,
    mut each: impl FnMut(&Config, &custody_audit::writer::WriterSummary),
) -> f64 {
    const ROUNDS: usize = 11;
    let (mut xs, mut ys, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let mut cpu = |c: &Config| {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = c.clone();
        c.audit.dir = tmp.path().join("audit");
        let (summary, _) = write(&c, pool, keys, n);
        each(&c, &summary);
        summary.cpu_nanos.map_or(f64::NAN, |c| c as f64 / 1e3) / n as f64
    };
    for round in 0..ROUNDS {
        // Alternate which goes first, so that a drift within a round favours neither.
        let (x, y) = if round % 2 == 0 {
            let x = cpu(a);
            (x, cpu(b))
        } else {
            let y = cpu(b);
            (cpu(a), y)
        };
        xs.push(x);
        ys.push(y);
        ratios.push(y / x - 1.0);
    }
    let show = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.1}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!("writer CPU per record, {n} records per round, {ROUNDS} interleaved rounds");
    println!("{a_name:<28} {} µs", show(&xs));
    println!("{b_name:<28} {} µs", show(&ys));
    let base = median(&mut xs);
    println!(
        "median {:.1} µs against {base:.1} µs; median of the rounds' differences {:+.1}%",
        median(&mut ys),
        median(&mut ratios) * 100.0
    );
    base
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// What the policies add to the writer's CPU per record.
fn policy_cost(config: &Config, pool: &[(Bytes, Bytes)], keys: &[HeaderValue], n: u64) {
    let mut with = config.clone();
    policies(&mut with);
    let mut own = Vec::new();
    let base = interleaved(
        ("no policies", config),
        ("10 flag rules, 1,000 terms", &with),
        pool,
        keys,
        n,
        |c, summary| {
            if !c.policies.is_empty() {
                own.push(summary.policy_nanos as f64 / 1e3 / n as f64);
            }
        },
    );
    // The writer's own account of its policy work, free of the machine's drift between
    // rounds.
    let own = median(&mut own);
    println!(
        "policy work as the writer times it: {own:.2} µs per record, {:.1}% of the writer without policies",
        own / base * 100.0
    );
}

/// What served-model tracking and the live drift metrics add to the writer's CPU per
/// record (`[audit] drift`).
fn drift_cost(config: &Config, pool: &[(Bytes, Bytes)], keys: &[HeaderValue], n: u64) {
    let mut off = config.clone();
    off.audit.drift = false;
    let mut on = config.clone();
    on.audit.drift = true;
    interleaved(
        ("drift tracking off", &off),
        ("drift tracking on", &on),
        pool,
        keys,
        n,
        |_, _| {},
    );
}

/// What `[otel]` adds to the writer's CPU per record: building each span (and with
/// `content`, its messages) and handing it to the batch queue. The collector is a
/// closed loopback port: the export thread's own work is not the writer's.
fn otel_cost(config: &Config, pool: &[(Bytes, Bytes)], keys: &[HeaderValue], n: u64) {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let mut spans = config.clone();
    spans.otel.endpoint = Some(endpoint);
    let mut content = spans.clone();
    content.otel.content = true;
    interleaved(
        ("no export", config),
        ("spans", &spans),
        pool,
        keys,
        n,
        |_, _| {},
    );
    interleaved(
        ("no export", config),
        ("spans with content", &content),
        pool,
        keys,
        n,
        |_, _| {},
    );
}

fn main() {
    if let Some(dir) = std::env::args().skip_while(|a| a != "--purge").nth(1) {
        purge(std::path::Path::new(&dir));
        return;
    }
    // `--evidence DIR`: only the proof measurements, on a trail kept with `--keep DIR`.
    if let Some(dir) = std::env::args().skip_while(|a| a != "--evidence").nth(1) {
        let dir = std::path::PathBuf::from(dir);
        let t = Instant::now();
        let report = verify_dir(&dir, None, |_, _, _| {}).unwrap();
        let secs = t.elapsed().as_secs_f64();
        let bytes: u64 = reader::segments(&dir)
            .unwrap()
            .iter()
            .map(|s| std::fs::metadata(&s.path).unwrap().len())
            .sum();
        println!(
            "verify                   {:.0} MB/s of segment data ({secs:.1} s; {} tree heads recomputed)",
            bytes as f64 / 1e6 / secs,
            report.tree_heads
        );
        let key = report.keys.iter().next().expect("a signed trail").clone();
        let public = custody_audit::signing::parse_public(&key).unwrap();
        evidence(&dir, report.records, &public);
        return;
    }
    let quick = std::env::args().any(|a| a == "--quick");
    // `--single-turn`: short one-question chats instead of conversations with history.
    let max_turns = if std::env::args().any(|a| a == "--single-turn") {
        1
    } else {
        6
    };
    let n: u64 = if quick { 100_000 } else { 1_000_000 };
    let tmp = tempfile::tempdir().unwrap();
    // `--keep DIR`: write the trail there and stop (the console bench reads it).
    let keep = std::env::args()
        .skip_while(|a| a != "--keep")
        .nth(1)
        .map(std::path::PathBuf::from);
    let dir = keep.clone().unwrap_or_else(|| tmp.path().join("audit"));
    let mut config = Config::for_test(
        &dir,
        vec![Route {
            name: "openai".into(),
            prefix: "/v1/".into(),
            upstream: "https://api.openai.com".parse().unwrap(),
            provider: Provider::Openai,
            strip_prefix: false,
            upstream_key_env: None,
        }],
    );
    config.audit.segment_max_bytes = 32 << 20;
    let keys = tmp.path().join("keys");
    let (private, _) = custody_audit::signing::keygen(&keys, "bench").unwrap();
    let public_hex = custody_audit::signing::SignerKey::load(&private)
        .unwrap()
        .public_hex()
        .to_owned();
    config.audit.signing_key = Some(private);
    config.audit.queue_capacity = 16_384;
    let with_policies = std::env::args().any(|a| a == "--policies");
    if with_policies {
        policies(&mut config);
    }
    let pool = pool(4096, max_turns);
    let keys: Vec<HeaderValue> = (0..200)
        .map(|i| {
            HeaderValue::from_str(&format!("Bearer sk-bench-key-{i:06}-abcdefghijklmnop")).unwrap()
        })
        .collect();
    if std::env::args().any(|a| a == "--policy-cost") {
        policy_cost(&config, &pool, &keys, n / 4);
        return;
    }
    if std::env::args().any(|a| a == "--otel-cost") {
        otel_cost(&config, &pool, &keys, n / 4);
        return;
    }
    if std::env::args().any(|a| a == "--drift-cost") {
        drift_cost(&config, &pool, &keys, n / 4);
        return;
    }
    let (summary, write_secs) = write(&config, &pool, &keys, n);
    if let Some(dir) = keep {
        println!(
            "{n} records written to {} in {write_secs:.1} s; signed by {public_hex}",
            dir.display()
        );
        return;
    }
    let json_bytes: u64 = pool
        .iter()
        .map(|(a, b)| (a.len() + b.len()) as u64)
        .sum::<u64>()
        * n
        / pool.len() as u64;
    if std::env::args().any(|a| a == "--writer-only") {
        println!(
            "writer                   {:.0} records/s, {:.1} µs of writer CPU per record{}",
            n as f64 / write_secs,
            summary.cpu_nanos.map_or(f64::NAN, |c| c as f64 / 1e3) / n as f64,
            if with_policies {
                " (10 flag rules, 1,000 terms)"
            } else {
                ""
            }
        );
        return;
    }

    let segs = reader::segments(&dir).unwrap();
    let disk: u64 = segs
        .iter()
        .map(|s| std::fs::metadata(&s.path).unwrap().len())
        .sum();
    let mut record_bytes = 0u64;
    let mut sample = Vec::new();
    reader::for_each_line(&dir, |_, l| {
        record_bytes += l.len() as u64 + 1;
        if sample.len() < 20_000 {
            sample.push(l.to_vec());
        }
        ControlFlow::Continue(())
    })
    .unwrap();

    // What a dictionary trained on this traffic would give, per 256 KiB block.
    let dict = zstd::dict::from_samples(&sample[..10_000], 112 * 1024).unwrap();
    let test: Vec<u8> = sample[10_000..]
        .iter()
        .flat_map(|l| l.iter().copied().chain(std::iter::once(b'\n')))
        .collect();
    let (mut plain, mut with_dict) = (0usize, 0usize);
    for block in test.chunks(256 * 1024) {
        plain += zstd::bulk::compress(block, 3).unwrap().len();
        with_dict += zstd::bulk::Compressor::with_dictionary(3, &dict)
            .unwrap()
            .compress(block)
            .unwrap()
            .len();
    }

    let v0 = Instant::now();
    let report = verify_dir(&dir, None, |_, _, _| {}).unwrap();
    let verify_secs = v0.elapsed().as_secs_f64();
    assert_eq!(report.records, n);
    let public = custody_audit::signing::parse_public(&public_hex).unwrap();
    let v1 = Instant::now();
    let fast = verify_dir_with(&dir, Some(&public), Depth::Fast, |_, _, _| {}).unwrap();
    let fast_secs = v1.elapsed().as_secs_f64();
    assert!(fast.fast && fast.records == n + 1);

    // Selective: one key id within one hour of the month; full text: a rare string.
    let mut any = None;
    reader::for_each_line(&dir, |_, l| {
        let v: serde_json::Value = serde_json::from_slice(l).unwrap();
        if v["seq"].as_u64() == Some(n / 2) {
            any = Some(v);
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    })
    .unwrap();
    let mid = any.unwrap();
    let at = humantime::parse_rfc3339(mid["time"]["start"].as_str().unwrap()).unwrap();
    let selective = Query {
        key_id: mid["client"]["key_id"].as_str().map(str::to_owned),
        since: Some(at - Duration::from_secs(1800)),
        until: Some(at + Duration::from_secs(1800)),
        limit: 1000,
        ..Query::default()
    };
    let full_text = Query {
        text: Some(mid["response"]["body"]["id"].as_str().unwrap().to_owned()),
        limit: 10,
        ..Query::default()
    };
    let time = |q: &Query| {
        let mut best = f64::MAX;
        let mut hits = 0;
        for _ in 0..3 {
            let t = Instant::now();
            hits = search(&DirSource(&dir), q).unwrap().records.len();
            best = best.min(t.elapsed().as_secs_f64());
        }
        (best * 1000.0, hits)
    };
    let (sel_ms, sel_hits) = time(&selective);
    let (txt_ms, txt_hits) = time(&full_text);

    println!("records                  {n}");
    println!(
        "writer                   {:.0} records/s ({:.1} s, one writer thread)",
        n as f64 / write_secs,
        write_secs
    );
    println!("captured bodies (JSON)   {:.1} MB", json_bytes as f64 / 1e6);
    println!(
        "record lines             {:.1} MB ({:.0} bytes/record)",
        record_bytes as f64 / 1e6,
        record_bytes as f64 / n as f64
    );
    println!(
        "on disk                  {:.1} MB in {} segments ({:.0} bytes/record)",
        disk as f64 / 1e6,
        segs.len(),
        disk as f64 / n as f64
    );
    println!(
        "compression              {:.1}x vs record lines, {:.1}x vs captured bodies",
        record_bytes as f64 / disk as f64,
        json_bytes as f64 / disk as f64
    );
    println!("trained dictionary       {:.1}x vs {:.1}x without, per 256 KiB block (112 KiB dictionary, sample of 10,000 records)", test.len() as f64 / with_dict as f64, test.len() as f64 / plain as f64);
    println!(
        "verify                   {:.0} MB/s of segment data ({:.1} s; every record re-hashed, segments in parallel)",
        disk as f64 / 1e6 / verify_secs,
        verify_secs
    );
    println!(
        "verify --fast            {:.0} MB/s of segment data ({:.2} s; sealed segments through their signed SHA-256)",
        disk as f64 / 1e6 / fast_secs,
        fast_secs
    );
    println!("search, selective        {sel_ms:.1} ms ({sel_hits} records: one key id, one hour)");
    println!("search, full text        {txt_ms:.1} ms ({txt_hits} records)");
    evidence(&dir, n, &public);
}

/// What tree heads cost and what proofs take on this trail.
fn evidence(dir: &std::path::Path, n: u64, public: &custody_audit::signing::VerifyingKey) {
    use custody_audit::{merkle, review::proof};
    // The writer's added work per record: a leaf hash and the frontier's merges.
    let t = Instant::now();
    let mut range = merkle::Range::new(0);
    for i in 0..n {
        let h: [u8; 32] = sha2::Digest::finalize(sha2::Digest::chain_update(
            <sha2::Sha256 as sha2::Digest>::new(),
            i.to_le_bytes(),
        ))
        .into();
        range.push(merkle::leaf_hash(&h));
    }
    let push_ns = t.elapsed().as_nanos() as f64 / n as f64;
    let cps = std::fs::read(dir.join("checkpoints.log")).unwrap();
    let lines = cps.split(|&b| b == b'\n').filter(|l| !l.is_empty()).count();
    let source = DirSource(dir);
    let mut lines_at = Vec::new();
    let picks: Vec<u64> = (1..=1000).map(|i| i * (n / 1000)).collect();
    reader::for_each_line(dir, |_, l| {
        let v: serde_json::Value = serde_json::from_slice(l).unwrap();
        if v["seq"]
            .as_u64()
            .is_some_and(|s| picks.binary_search(&s).is_ok())
        {
            lines_at.push(l.to_vec());
        }
        ControlFlow::Continue(())
    })
    .unwrap();
    let t = Instant::now();
    let one = proof::prove_lines(&source, &lines_at[lines_at.len() / 2..][..1]).unwrap();
    let one_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let many = proof::prove_lines(&source, &lines_at).unwrap();
    let many_secs = t.elapsed().as_secs_f64();
    let one_json = serde_json::to_vec(&one[0]).unwrap();
    let t = Instant::now();
    proof::check_inclusion(&one[0], public).unwrap();
    let check_us = t.elapsed().as_secs_f64() * 1e6;
    let first = cps.split(|&b| b == b'\n').next().unwrap();
    let t = Instant::now();
    let grown = proof::prove_consistency(&source, first).unwrap();
    let grown_secs = t.elapsed().as_secs_f64();
    println!("tree head, writer's work {push_ns:.0} ns per record (leaf hash and frontier merges, {n} leaves)");
    println!(
        "checkpoints.log          {} bytes in {lines} checkpoints ({:.0} bytes each, frontier included)",
        cps.len(),
        cps.len() as f64 / lines as f64
    );
    println!(
        "prove one record         {:.2} s; proof {} bytes ({} path entries, {} bytes of it the record, {} the signed head)",
        one_secs,
        one_json.len(),
        one[0].path.len(),
        one[0].record.len(),
        one[0].head.len()
    );
    println!("prove 1,000 records      {many_secs:.2} s (spread over the trail, one pass)",);
    println!("check one proof          {check_us:.0} µs");
    println!(
        "consistency, first to newest checkpoint {grown_secs:.2} s; {} path entries",
        grown.path.len()
    );
    assert_eq!(many.len(), lines_at.len());

    // One caller's month: every record of one client key (of 200) over the 30 days.
    use custody_audit::review::bundle::{self, KeyInfo, Manifest, Selection};
    let key_id = lines_at
        .iter()
        .find_map(|l| {
            let v: serde_json::Value = serde_json::from_slice(l).ok()?;
            v["client"]["key_id"].as_str().map(str::to_owned)
        })
        .unwrap();
    let t = Instant::now();
    let selection = Selection {
        since: "2000-01-01T00:00:00Z".into(),
        until: "2100-01-01T00:00:00Z".into(),
        key_id: Some(key_id),
        ..Selection::default()
    };
    let selected = bundle::collect(&source, &selection, 1_000_000).unwrap();
    let collect_secs = t.elapsed().as_secs_f64();
    let manifest = Manifest {
        kind: bundle::KIND.into(),
        created: "2026-12-03T00:00:00Z".into(),
        requested_by: "bench".into(),
        trail: "bench".into(),
        selection,
        records: 0,
        config_events: 0,
        key: KeyInfo::of(public),
        trail_last_seq: n,
        trail_newest_checkpoint: None,
        complete: false,
        completeness: String::new(),
        files: Default::default(),
    };
    let contents = bundle::prove(&source, manifest, selected).unwrap();
    let held = contents.records.len();
    let mut out = Vec::new();
    bundle::write(&mut out, contents, "<p>report</p>").unwrap();
    let bundle_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let checked = bundle::check(&bundle::open(&out).unwrap(), public).unwrap();
    let check_secs = t.elapsed().as_secs_f64();
    assert_eq!(checked.manifest.records as usize, held);
    println!(
        "bundle one key's month   {bundle_secs:.1} s ({held} records; selecting {collect_secs:.1} s, the rest proving and packing); {:.1} MB; checked offline in {check_secs:.2} s",
        out.len() as f64 / 1e6
    );
}

/// Content retention on a kept trail (its records span the 30 days before it was
/// written): bodies older than 15 days, then all of them (the writer's clock moved 31
/// days on). Each round: how long the writer's start takes (the purge runs beside it),
/// how long until the purge is in place, bytes on disk, and verify before and after.
fn purge(dir: &std::path::Path) {
    let disk = || -> u64 {
        reader::segments(dir)
            .unwrap()
            .iter()
            .map(|s| std::fs::metadata(&s.path).unwrap().len())
            .sum()
    };
    let verify = |label: &str| {
        let t = Instant::now();
        let r = verify_dir(dir, None, |_, _, _| {}).unwrap();
        println!(
            "verify, {label:<22} {:.1} s ({} records; {} bodies purged in {} segments by {} purge events)",
            t.elapsed().as_secs_f64(),
            r.records,
            r.purged_bodies,
            r.purged_segments,
            r.purges
        );
    };
    // Hashing a line with its bodies committed, against hashing it whole (as before
    // commitments), over the same 20,000 lines, timed alone.
    let mut lines = Vec::new();
    reader::for_each_line(dir, |_, l| {
        lines.push(l.to_vec());
        if lines.len() == 20_000 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .unwrap();
    let per_line = |f: &dyn Fn(&[u8])| {
        let t = Instant::now();
        for _ in 0..5 {
            lines.iter().for_each(|l| f(l));
        }
        t.elapsed().as_nanos() as f64 / 1e3 / (5 * lines.len()) as f64
    };
    let whole = per_line(&|l| {
        std::hint::black_box(<sha2::Sha256 as sha2::Digest>::digest(l));
    });
    let committed = per_line(&|l| {
        std::hint::black_box(custody_audit::segment::check_line(l).unwrap());
    });
    println!(
        "hash a line              {committed:.2} µs with bodies committed, {whole:.2} µs whole ({} bytes a line)",
        lines.iter().map(Vec::len).sum::<usize>() / lines.len()
    );
    verify("before");
    let keys = tempfile::tempdir().unwrap();
    let (private, _) = custody_audit::signing::keygen(keys.path(), "purge").unwrap();
    // A data subject's request for someone the trail does not hold: every segment read.
    {
        let mut config = Config::for_test(dir, vec![]);
        config.audit.segment_max_bytes = 32 << 20;
        config.audit.signing_key = Some(private.clone());
        let w = AuditWriter::start(&config).unwrap();
        let t = Instant::now();
        let s = w
            .config()
            .purge(custody_audit::purge::Selector::User(
                "nobody@example.com".into(),
            ))
            .unwrap();
        println!(
            "purge one person (none)  {:.1} s ({} segments rewritten; every segment read)",
            t.elapsed().as_secs_f64(),
            s.segments
        );
        w.shutdown().unwrap();
    }
    let month = Duration::from_secs(31 * 86_400);
    for (label, ahead) in [("older than 15 days", Duration::ZERO), ("all", month)] {
        let bytes = disk();
        let mut config = Config::for_test(dir, vec![]);
        config.audit.segment_max_bytes = 32 << 20;
        config.audit.signing_key = Some(private.clone());
        config.audit.retention_days = Some(3650);
        config.audit.content_retention_days = Some(15);
        let gate = custody_audit::writer::WriterGate::default();
        gate.advance_clock(ahead);
        let t = Instant::now();
        let w = AuditWriter::start_gated(&config, Some(gate)).unwrap();
        let started = t.elapsed().as_secs_f64();
        let stats = w.stats();
        while stats.purges.get() == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
        let purged = t.elapsed().as_secs_f64();
        w.shutdown().unwrap();
        println!(
            "purge {label:<22} {purged:.1} s until in place ({started:.2} s the writer's start); {} bodies; on disk {:.1} -> {:.1} MB",
            stats.purged_bodies.get(),
            bytes as f64 / 1e6,
            disk() as f64 / 1e6
        );
        verify(&format!("purged {label}"));
    }
}
