//! Served-model drift: a provider moving what serves a requested model is an event in
//! the chain, at the change, and a metric.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};

use custody_tests::*;
use serde_json::Value;

/// An OpenAI-shaped upstream answering with whatever model `served` holds now.
async fn switching_upstream(served: Arc<Mutex<String>>) -> MockUpstream {
    MockUpstream::start(move |_, _| {
        let m = served.lock().unwrap().clone();
        respond(
            200,
            &[("content-type", "application/json")],
            format!(
                r#"{{"id":"x","model":"{m}","system_fingerprint":"fp_1","choices":[{{"index":0,"message":{{"role":"assistant","content":"ok"}},"finish_reason":"stop"}}]}}"#
            ),
        )
    })
    .await
}

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
    let model = Arc::new(Mutex::new("gpt-4o-2024-05-13".to_owned()));
    let up = switching_upstream(model.clone()).await;
    let custody = Custody::start(vec![openai_route(&up)]).await;
    ask(&custody, 3).await;
    let old = "custody_served_model{route=\"openai\",requested_model=\"gpt-4o\",served_model=\"gpt-4o-2024-05-13\"}";
    custody.until_metric(old, |v| v == 1.0).await;
    *model.lock().unwrap() = "gpt-4o-2024-08-06".into();
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
    *model.lock().unwrap() = "gpt-4o-mini-2024-07-18".into();
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
