//! The shipped dashboard and alerting rules name only metrics custody exposes: a rename
//! in the code that would leave a panel empty or an alert silent fails here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use custody_config::{Action, Policy, Provider, Severity};
use custody_tests::*;

/// Every `custody_*` and `gen_ai_*` name in a text.
fn metric_names(text: &str) -> BTreeSet<String> {
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let bytes = text.as_bytes();
    let mut out = BTreeSet::new();
    let mut i = 0;
    while i < bytes.len() {
        let starts = (i == 0 || !ident(bytes[i - 1]))
            && (text[i..].starts_with("custody_") || text[i..].starts_with("gen_ai_"));
        if starts {
            let end = (i..bytes.len())
                .find(|&j| !ident(bytes[j]))
                .unwrap_or(bytes.len());
            out.insert(text[i..end].to_owned());
            i = end;
        } else {
            i += 1;
        }
    }
    out
}

#[tokio::test]
async fn every_metric_the_dashboard_and_the_alerts_name_is_exposed() {
    // Traffic that gives every family a sample (families appear with their first one):
    // tokens, a redaction, a policy decision, an unreachable upstream, a model change.
    let answer = Answer::model("gpt-4o-2024-05-13");
    let up = answering_upstream(answer.clone()).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let down = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let routes = vec![
        openai_route(&up),
        route("down", "/down/", &down, Provider::Openai, true),
    ];
    let custody = Custody::start_with(routes, |c| {
        c.policies = vec![Policy::new(
            "flag-it",
            "request.text.contains('flag me')",
            Action::Flag,
            Severity::Low,
        )];
    })
    .await;
    let c = client();
    let chat = |path: &str, text: &str| {
        post(
            &custody.url(path),
            &[("content-type", "application/json")],
            serde_json::json!({"model": "gpt-4o", "messages": [{"role": "user", "content": text}]})
                .to_string(),
        )
    };
    send(&c, chat("/v1/chat/completions", "flag me, ann@example.com")).await;
    send(&c, chat("/down/v1/chat/completions", "hello")).await;
    answer.lock().unwrap().model = "gpt-4o-2024-08-06".into();
    send(&c, chat("/v1/chat/completions", "again")).await;
    custody
        .until_metric(
            "custody_served_model_changes_total{route=\"openai\",requested_model=\"gpt-4o\",kind=\"version\"}",
            |v| v == 1.0,
        )
        .await;
    let req = http::Request::get(custody.admin_url("/metrics"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let (_, body) = send(&c, req).await;
    let exposition = String::from_utf8(body.to_vec()).unwrap();
    let exposed: BTreeSet<String> = exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/monitoring");
    let mut checked = 0;
    for file in ["custody-alerts.yaml", "custody-dashboard.json"] {
        let text = std::fs::read_to_string(format!("{dir}/{file}")).unwrap();
        let named = metric_names(&text);
        assert!(named.len() >= 8, "{file} names {named:?}");
        for name in named {
            let base = ["_total", "_bucket", "_sum", "_count", "_created"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(&name);
            assert!(
                exposed.contains(base) || exposed.contains(&name),
                "{file} names {name}, which custody does not expose:\n{exposition}"
            );
            checked += 1;
        }
    }
    assert!(checked > 20);
    custody.stop().await;
}

#[test]
fn names_are_found_in_expressions_and_nothing_else() {
    let found = metric_names(
        "rate(custody_requests_total{route=\"x\"}[5m]) / gen_ai_client_token_usage_total; custody log; my_custody_x",
    );
    assert_eq!(
        found.into_iter().collect::<Vec<_>>(),
        ["custody_requests_total", "gen_ai_client_token_usage_total"]
    );
}
