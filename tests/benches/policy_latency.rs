//! What an enforcing block rule adds to a request: 32 KB chat requests through custody
//! (in-process, loopback mock upstream), sequential, on a route the rule applies to, on a
//! route it does not, and with no policies at all. Prints p50 and p99 per case.
//!
//! `cargo bench -p custody-tests --bench policy_latency` (`-- --quick` for fewer requests).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use custody_config::{Action, Policy, Provider, Severity};
use custody_tests::*;

fn body() -> String {
    let words = "summarise the quarterly report and list three risks for our team ";
    let text = words.repeat(32 * 1024 / words.len());
    serde_json::json!({"model": "gpt-4o", "messages": [{"role": "user", "content": text}]})
        .to_string()
}

async fn latencies(custody: &Custody, path: &str, n: usize) -> Vec<f64> {
    let client = client();
    let body = body();
    let mut out = Vec::with_capacity(n);
    for i in 0..n + 50 {
        let req = post(
            &custody.url(path),
            &[("content-type", "application/json")],
            body.clone(),
        );
        let t = Instant::now();
        let (parts, _) = send(&client, req).await;
        let us = t.elapsed().as_secs_f64() * 1e6;
        assert_eq!(parts.status, 200);
        // The first requests warm the connection pools.
        if i >= 50 {
            out.push(us);
        }
    }
    out.sort_by(f64::total_cmp);
    out
}

fn pct(v: &[f64], p: f64) -> f64 {
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

#[tokio::main]
async fn main() {
    let n = if std::env::args().any(|a| a == "--quick") {
        500
    } else {
        3000
    };
    let up = chat_upstream().await;
    let routes = || {
        vec![
            route("guarded", "/guarded/", &up.url(), Provider::Openai, true),
            route("open", "/open/", &up.url(), Provider::Openai, true),
        ]
    };
    let plain = Custody::start(routes()).await;
    let guarded = Custody::start_with(routes(), |c| {
        c.policy_terms.insert(
            "codenames".into(),
            (0..1000)
                .map(|i| format!("codename-{i:04} internal"))
                .collect(),
        );
        let mut r = Policy::new(
            "codename-block",
            "request.text.containsAny(terms.codenames)",
            Action::Block,
            Severity::High,
        );
        r.routes = Some(vec!["guarded".into()]);
        c.policies = vec![r];
    })
    .await;
    // Interleaved rounds, so that machine noise falls on every case alike.
    let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..5 {
        a.extend(latencies(&plain, "/guarded/v1/chat/completions", n / 5).await);
        b.extend(latencies(&guarded, "/guarded/v1/chat/completions", n / 5).await);
        c.extend(latencies(&guarded, "/open/v1/chat/completions", n / 5).await);
    }
    for v in [&mut a, &mut b, &mut c] {
        v.sort_by(f64::total_cmp);
    }
    let line = |name: &str, v: &[f64]| {
        println!(
            "{name:<44} p50 {:>7.1} µs   p99 {:>7.1} µs",
            pct(v, 0.5),
            pct(v, 0.99)
        );
    };
    println!("32 KB chat requests, {n} per case, sequential, one connection");
    line("no policies", &a);
    line("enforcing block rule (1,000 terms), its route", &b);
    line("enforcing block rule, another route", &c);
    println!(
        "block rule adds {:.1} µs at p50; another route {:+.1} µs",
        pct(&b, 0.5) - pct(&a, 0.5),
        pct(&c, 0.5) - pct(&a, 0.5)
    );
    plain.stop().await;
    guarded.stop().await;
}
