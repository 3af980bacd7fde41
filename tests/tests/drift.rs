//! Served-model drift: a provider moving what serves a requested model is an event in
//! the chain, at the change, and a metric.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use custody_audit::review::drift::{compare, render, DriftQuery};
use custody_tests::*;
use serde_json::Value;

async fn ask(custody: &Custody, n: usize) {
    let c = client();
    for _ in 0..n {
        let (parts, _) = send(
            &c,
            post(
                &custody.url("/v1/chat/completions"),
                &[],
                r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#,
            ),
        )
        .await;
        assert_eq!(parts.status, 200);
    }
}

fn served(r: &Value) -> &str {
    r["gen_ai"]["response"]["model"].as_str().unwrap_or("")
}

const CHANGES: &str =
    "custody_served_model_changes_total{route=\"openai\",requested_model=\"gpt-4o\"";

#[tokio::test]
async fn a_provider_moving_an_alias_is_a_drift_event_at_the_change_and_a_metric() {
    let answer = Answer::model("gpt-4o-2024-05-13");
    let up = answering_upstream(answer.clone()).await;
    let custody = Custody::start(vec![openai_route(&up)]).await;
    ask(&custody, 3).await;
    let old = "custody_served_model{route=\"openai\",requested_model=\"gpt-4o\",served_model=\"gpt-4o-2024-05-13\"}";
    custody.until_metric(old, |v| v == 1.0).await;
    answer.lock().unwrap().model = "gpt-4o-2024-08-06".into();
    ask(&custody, 2).await;
    custody
        .until_metric(&format!("{CHANGES},kind=\"version\"}}"), |v| v == 1.0)
        .await;
    assert_eq!(
        custody.metric(old).await,
        0.0,
        "the old version is not served"
    );
    assert_eq!(
        custody
            .metric("custody_served_model{route=\"openai\",requested_model=\"gpt-4o\",served_model=\"gpt-4o-2024-08-06\"}")
            .await,
        1.0
    );
    let stopped = custody.stop().await;

    // The event follows the first record the new version answered, and names it and the
    // last one before.
    let trail = &stopped.trail;
    let at = trail
        .iter()
        .position(|r| r["event"]["type"] == "drift")
        .expect("a drift event");
    let first_after = &trail[at - 1];
    assert_eq!(served(first_after), "gpt-4o-2024-08-06");
    let last_before = trail[..at - 1]
        .iter()
        .rev()
        .find(|r| r["gen_ai"].is_object())
        .unwrap();
    assert_eq!(served(last_before), "gpt-4o-2024-05-13");
    let e = &trail[at]["event"];
    assert_eq!(e["kind"], "version");
    assert_eq!(e["route"], "openai");
    assert_eq!(e["requested_model"], "gpt-4o");
    assert_eq!(e["from"]["model"], "gpt-4o-2024-05-13");
    assert_eq!(e["to"]["model"], "gpt-4o-2024-08-06");
    assert_eq!(e["first_after"]["seq"], first_after["seq"]);
    assert_eq!(e["first_after"]["id"], first_after["id"]);
    assert_eq!(e["last_before"]["seq"], last_before["seq"]);
    assert_eq!(
        trail
            .iter()
            .filter(|r| r["event"]["type"] == "drift")
            .count(),
        1,
        "one change, one event"
    );

    // Across a restart the writer remembers what served the route: a silent fallback
    // to another model right after it is told.
    answer.lock().unwrap().model = "gpt-4o-mini-2024-07-18".into();
    let custody = Custody::start_in(stopped.dir, vec![openai_route(&up)], |_| {}).await;
    ask(&custody, 1).await;
    custody
        .until_metric(&format!("{CHANGES},kind=\"model\"}}"), |v| v == 1.0)
        .await;
    let stopped = custody.stop().await;
    let drifts: Vec<&Value> = stopped
        .trail
        .iter()
        .filter(|r| r["event"]["type"] == "drift")
        .collect();
    assert_eq!(drifts.len(), 2);
    assert_eq!(drifts[1]["event"]["kind"], "model");
    assert_eq!(drifts[1]["event"]["from"]["model"], "gpt-4o-2024-08-06");
    // The trail with its drift events verifies.
    custody_audit::review::verify::verify_dir(&stopped.audit_dir(), None, |_, _, _| {}).unwrap();
}

fn unix_ms(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

#[tokio::test]
async fn two_windows_compared_flag_what_moved_and_only_that() {
    // Baseline: answers at once, always `stop`. Window: 100 ms slower, and every other
    // answer refused by the provider's content filter; tokens, errors, rate limits,
    // tool calls and the served model stay as they were.
    let answer = Answer::model("gpt-4o-2024-08-06");
    let up = answering_upstream(answer.clone()).await;
    let custody = Custody::start(vec![openai_route(&up)]).await;
    ask(&custody, 40).await;
    // The windows are told apart by time: the clock moves on a millisecond first.
    let last = unix_ms(std::time::SystemTime::now());
    while unix_ms(std::time::SystemTime::now()) <= last + 1 {
        tokio::task::yield_now().await;
    }
    answer.lock().unwrap().delay = std::time::Duration::from_millis(100);
    for i in 0..40 {
        answer.lock().unwrap().finish = if i % 2 == 0 { "content_filter" } else { "stop" }.into();
        ask(&custody, 1).await;
    }
    // And then the provider moves the alias: the report names it first.
    answer.lock().unwrap().model = "gpt-4o-2024-11-20".into();
    ask(&custody, 1).await;
    // The same dimensions, live, per route and requested model.
    let m = |s: &str| format!("{{route=\"openai\",model=\"gpt-4o\"{s}}}");
    custody
        .until_metric(
            &format!("custody_gen_ai_exchanges_total{}", m(",result=\"ok\"")),
            |v| v == 81.0,
        )
        .await;
    let finish = |f: &str| {
        format!(
            "custody_gen_ai_finish_reasons_total{}",
            m(&format!(",finish_reason=\"{f}\""))
        )
    };
    assert_eq!(custody.metric(&finish("content_filter")).await, 20.0);
    assert_eq!(custody.metric(&finish("stop")).await, 61.0);
    let seconds = |le: &str| {
        format!("gen_ai_client_operation_duration_seconds_bucket{{le=\"{le}\",route=\"openai\",model=\"gpt-4o\"}}")
    };
    let (fast, all) = (
        custody.metric(&seconds("0.08")).await,
        custody.metric(&seconds("+Inf")).await,
    );
    assert_eq!(all, 81.0);
    assert!(
        fast <= 40.0,
        "the window's 41 answers took 100 ms and more: {fast}"
    );
    assert_eq!(
        custody
            .metric(&format!("custody_gen_ai_response_tokens_count{}", m("")))
            .await,
        81.0
    );
    let stopped = custody.stop().await;
    // The windows, from the records' own times (custody's clock): the first 40, the rest.
    let at = |i: usize| {
        let t = stopped.records[i]["time"]["start"].as_str().unwrap();
        unix_ms(humantime::parse_rfc3339(t).unwrap())
    };
    let (t0, mid, end) = (at(0), at(40), at(80) + 1);
    assert!(at(39) < mid);
    let dir = stopped.audit_dir();
    let source = custody_audit::review::reader::DirSource(&dir);
    let q = DriftQuery {
        baseline: (t0, mid),
        window: (mid, end),
        route: None,
        model: Some("gpt-4o".into()),
        min_records: 20,
    };
    let r = compare(&[&source], &q).unwrap();
    assert_eq!((r.baseline_records, r.window_records), (40, 41));
    assert_eq!(r.changes.len(), 1);
    assert_eq!(r.changes[0]["event"]["to"]["model"], "gpt-4o-2024-11-20");
    let shifted: std::collections::BTreeSet<&str> = r
        .dimensions
        .iter()
        .filter(|d| d.verdict == "shifted")
        .map(|d| d.name.as_str())
        .collect();
    assert_eq!(
        shifted,
        ["finish_reason", "latency_ms", "refusals", "ttft_ms"].into(),
        "{r:#?}"
    );
    let stable: Vec<&str> = r
        .dimensions
        .iter()
        .filter(|d| d.verdict == "stable")
        .map(|d| d.name.as_str())
        .collect();
    for unchanged in [
        "input_tokens",
        "output_tokens",
        "errors",
        "rate_limited",
        "tool_calls",
    ] {
        assert!(stable.contains(&unchanged), "{unchanged}: {r:#?}");
    }
    let refusals = r.dimensions.iter().find(|d| d.name == "refusals").unwrap();
    assert_eq!(refusals.shares["yes"].0, 0.0);
    assert!((refusals.shares["yes"].1 - 20.0 / 41.0).abs() < 1e-9);
    let latency = r
        .dimensions
        .iter()
        .find(|d| d.name == "latency_ms")
        .unwrap();
    let (before, after) = latency.median.unwrap();
    assert!(after >= before + 90.0, "{before} -> {after}");
    // The text names the change on its first line, then the moved dimensions, most first.
    let text = render(&r, false);
    let first = text.lines().next().unwrap();
    assert!(
        first.starts_with("CHANGE") && first.contains("gpt-4o-2024-08-06 -> gpt-4o-2024-11-20"),
        "{text}"
    );
    assert!(
        !text.contains("input_tokens"),
        "stable dimensions are left out:\n{text}"
    );
}

#[tokio::test]
async fn drift_tracking_off_writes_no_drift_events_and_no_drift_metrics() {
    let answer = Answer::model("gpt-4o-2024-05-13");
    let up = answering_upstream(answer.clone()).await;
    let custody = Custody::start_with(vec![openai_route(&up)], |c| c.audit.drift = false).await;
    ask(&custody, 2).await;
    answer.lock().unwrap().model = "gpt-4o-2024-08-06".into();
    ask(&custody, 2).await;
    custody
        .until_metric("custody_audit_records_written_total", |v| v >= 5.0)
        .await;
    let metrics = {
        let req = http::Request::get(custody.admin_url("/metrics"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        String::from_utf8(send(&client(), req).await.1.to_vec()).unwrap()
    };
    assert!(
        !metrics.contains("custody_gen_ai_exchanges_total{"),
        "{metrics}"
    );
    assert!(!metrics.contains("custody_served_model{"), "{metrics}");
    let stopped = custody.stop().await;
    assert_eq!(stopped.records.len(), 4);
    assert!(stopped.events.iter().all(|e| e["event"]["type"] != "drift"));
}
