//! `[otel]`: each exchange reaches a real OTLP/HTTP receiver (the official protobuf
//! messages, in Python) as a GenAI span, joined to the caller's trace, content redacted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};

use custody_tests::*;
use serde_json::Value;

/// `tests/otlp/receiver.py`, killed when dropped.
struct Receiver {
    child: Child,
    port: u16,
}

impl Receiver {
    fn start() -> Self {
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("otlp/receiver.py");
        let mut child = Command::new(tools_python())
            .arg(script)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut first)
            .unwrap();
        let port = first.trim().strip_prefix("port ").unwrap().parse().unwrap();
        Self { child, port }
    }

    /// Every span received, once custody has stopped (its shutdown flushes the export,
    /// and the receiver prints a span before it answers).
    fn spans(mut self) -> Vec<Value> {
        self.child.kill().unwrap();
        let mut out = String::new();
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        self.child.wait().unwrap();
        out.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

#[tokio::test]
async fn exchanges_reach_an_otlp_receiver_as_genai_spans_in_the_callers_trace() {
    let receiver = Receiver::start();
    let up = answering_upstream(Answer::model("gpt-4o-2024-08-06")).await;
    let port = receiver.port;
    let custody = Custody::start_with(vec![openai_route(&up)], |c| {
        c.otel.endpoint = Some(format!("http://127.0.0.1:{port}"));
        c.otel.content = true;
    })
    .await;
    let c = client();
    let body = r#"{"model":"gpt-4o","max_tokens":50,"temperature":0.5,"messages":[{"role":"system","content":"be brief"},{"role":"user","content":"mail alice.smith@example.com please"}]}"#;
    let traceparent = format!("00-{TRACE}-{PARENT}-01");
    let (parts, _) = send(
        &c,
        post(
            &custody.url("/v1/chat/completions"),
            &[("traceparent", &traceparent)],
            body,
        ),
    )
    .await;
    assert_eq!(parts.status, 200);
    let (parts, _) = send(&c, post(&custody.url("/v1/chat/completions"), &[], body)).await;
    assert_eq!(parts.status, 200);
    let stopped = custody.stop().await;
    let spans = receiver.spans();
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let raw = serde_json::to_string(&spans).unwrap();
    assert!(!raw.contains("alice.smith@example.com"), "{raw}");

    let joined = spans.iter().find(|s| s["trace_id"] == TRACE).unwrap();
    assert_eq!(
        joined["parent_span_id"], PARENT,
        "a child of the caller's span"
    );
    assert_eq!(joined["name"], "chat gpt-4o");
    assert_eq!(joined["kind"], 3, "SPAN_KIND_CLIENT");
    assert_eq!(joined["resource"]["service.name"], "custody");
    assert_eq!(joined["status"], 0, "STATUS_CODE_UNSET: a success");
    assert!(joined["attributes"].get("error.type").is_none());
    let a = &joined["attributes"];
    assert_eq!(a["gen_ai.operation.name"], "chat");
    assert_eq!(a["gen_ai.provider.name"], "openai");
    assert_eq!(a["gen_ai.request.model"], "gpt-4o");
    assert_eq!(a["gen_ai.request.max_tokens"], 50);
    assert_eq!(a["gen_ai.request.temperature"], 0.5);
    assert_eq!(a["gen_ai.response.model"], "gpt-4o-2024-08-06");
    assert_eq!(
        a["gen_ai.response.finish_reasons"],
        serde_json::json!(["stop"])
    );
    assert_eq!(a["gen_ai.usage.input_tokens"], 3);
    assert_eq!(a["gen_ai.usage.output_tokens"], 1);
    let record = stopped
        .records
        .iter()
        .find(|r| r["trace"]["id"] == TRACE)
        .unwrap();
    assert_eq!(a["custody.record.id"], record["id"]);
    assert_eq!(
        a["gen_ai.conversation.id"],
        record["gen_ai"]["conversation"]["id"]
    );
    let start_ns = joined["start_ns"].as_u64().unwrap();
    let end_ns = joined["end_ns"].as_u64().unwrap();
    let ms = record["time"]["duration_ms"].as_f64().unwrap();
    assert!(((end_ns - start_ns) as f64 / 1e6 - ms).abs() < 1.0);

    let details = &joined["events"][0];
    assert_eq!(details["name"], "gen_ai.client.inference.operation.details");
    let input: Value = serde_json::from_str(
        details["attributes"]["gen_ai.input.messages"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(input[0]["role"], "user");
    assert_eq!(input[0]["parts"][0]["type"], "text");
    let text = input[0]["parts"][0]["content"].as_str().unwrap();
    assert!(
        text.starts_with("mail ") && text.ends_with(" please"),
        "{text}"
    );
    let system: Value = serde_json::from_str(
        details["attributes"]["gen_ai.system_instructions"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        system,
        serde_json::json!([{"type":"text","content":"be brief"}])
    );
    let output: Value = serde_json::from_str(
        details["attributes"]["gen_ai.output.messages"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        output,
        serde_json::json!([{"role":"assistant","parts":[{"type":"text","content":"ok"}],"finish_reason":"stop"}])
    );

    // Custody started the other trace: its span is the one custody sent upstream.
    let own = spans.iter().find(|s| s["trace_id"] != TRACE).unwrap();
    let record = stopped
        .records
        .iter()
        .find(|r| r["trace"]["id"] != TRACE)
        .unwrap();
    assert_eq!(record["trace"]["generated"], true);
    assert_eq!(own["trace_id"], record["trace"]["id"]);
    assert_eq!(own["span_id"], record["trace"]["span_id"]);
    assert_eq!(own["parent_span_id"], "");
}

#[tokio::test]
async fn spans_stay_metadata_only_unless_content_is_asked_for() {
    let receiver = Receiver::start();
    let up = answering_upstream(Answer::model("gpt-4o-2024-08-06")).await;
    let port = receiver.port;
    let custody = Custody::start_with(vec![openai_route(&up)], |c| {
        c.otel.endpoint = Some(format!("http://127.0.0.1:{port}/v1/traces"));
        c.policies = vec![custody_config::Policy::new(
            "no-plans",
            "request.text.contains('forbidden plan')",
            custody_config::Action::Block,
            custody_config::Severity::High,
        )];
    })
    .await;
    let url = custody.url("/v1/chat/completions");
    let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"a secret plan"}]}"#;
    let (parts, _) = send(&client(), post(&url, &[], body)).await;
    assert_eq!(parts.status, 200);
    let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"a forbidden plan"}]}"#;
    let (parts, _) = send(&client(), post(&url, &[], body)).await;
    assert_eq!(parts.status, 403);
    custody.stop().await;
    let spans = receiver.spans();
    assert_eq!(spans.len(), 2);
    assert!(spans.iter().all(|s| s["events"] == serde_json::json!([])));
    let raw = serde_json::to_string(&spans).unwrap();
    assert!(!raw.contains("secret plan") && !raw.contains("forbidden plan"));
    // The blocked one is an error span that names the outcome and the rule.
    let blocked = spans
        .iter()
        .find(|s| s["attributes"]["custody.outcome"] == "blocked")
        .unwrap();
    assert_eq!(blocked["status"], 2, "STATUS_CODE_ERROR");
    assert_eq!(blocked["attributes"]["error.type"], "blocked");
    assert_eq!(
        blocked["attributes"]["custody.policy.decisions"],
        serde_json::json!(["no-plans:blocked"])
    );
}

/// Custody exporting to a collector on `port` with `timeout_secs`, after three
/// exchanges answered.
async fn three_exchanges_exported_to(port: u16, timeout_secs: u64) -> Custody {
    let up = answering_upstream(Answer::model("gpt-4o-2024-08-06")).await;
    let custody = Custody::start_with(vec![openai_route(&up)], |c| {
        c.otel.endpoint = Some(format!("http://127.0.0.1:{port}"));
        c.otel.timeout_secs = timeout_secs;
    })
    .await;
    let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;
    for _ in 0..3 {
        let url = custody.url("/v1/chat/completions");
        let (parts, _) = send(&client(), post(&url, &[], body)).await;
        assert_eq!(parts.status, 200);
    }
    custody
}

#[tokio::test]
async fn a_collector_that_is_down_costs_the_clients_and_the_trail_nothing() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let custody = three_exchanges_exported_to(port, 2).await;
    custody
        .until_metric("custody_otel_spans_total{result=\"queued\"}", |v| v == 3.0)
        .await;
    let stopped = custody.stop().await;
    assert_eq!(stopped.records.len(), 3, "every exchange is in the trail");
}

#[tokio::test]
async fn a_collector_that_never_answers_delays_nothing_but_its_own_spans() {
    // Accepts connections and reads nothing back: each export waits out its timeout.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let custody = three_exchanges_exported_to(port, 1).await;
    // The stop waits at most the export timeout for the collector, then goes on.
    let stopped = custody.stop().await;
    assert_eq!(stopped.records.len(), 3);
    drop(silent);
}
