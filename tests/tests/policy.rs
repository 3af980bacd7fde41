//! Policies end to end, as an attacker and a careless operator would meet them:
//! provider error shapes, compressed and oversized bodies, rules that fail at run time,
//! bad reloads, secrets in term lists, and routes a rule does not apply to.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;

use custody_config::{Action, OnError, Policy, Provider, Severity};
use custody_tests::*;
use serde_json::Value;

fn rule(name: &str, when: &str, action: Action) -> Policy {
    Policy::new(name, when, action, Severity::High)
}

fn chat(text: &str) -> String {
    serde_json::json!({"model": "gpt-4o", "messages": [{"role": "user", "content": text}]})
        .to_string()
}

/// A gzip-encoded chat request through custody; the response head.
async fn post_gzip(custody: &Custody, gz: Vec<u8>) -> http::response::Parts {
    let headers = [
        ("content-type", "application/json"),
        ("content-encoding", "gzip"),
    ];
    let url = custody.url("/v1/chat/completions");
    send(&client(), post(&url, &headers, gz)).await.0
}

/// `body` posted as a chat to custody's OpenAI route, which the upstream receives;
/// then custody stopped, its trail read.
async fn forwarded_chat(custody: Custody, up: &mut MockUpstream, body: String) -> Stopped {
    let h = [("content-type", "application/json")];
    let url = custody.url("/v1/chat/completions");
    let (parts, _) = send(&client(), post(&url, &h, body)).await;
    assert_eq!(parts.status, 200);
    up.next().await;
    custody.stop().await
}

fn decisions(r: &Value) -> Vec<(String, String)> {
    r["policy"]["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["name"].as_str().unwrap().to_owned(),
                d["effect"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_gemini_block_is_google_shaped_and_the_record_keeps_the_blocked_prompt() {
    let mut up = chat_upstream().await;
    let gemini = route("gemini", "/gemini/", &up.url(), Provider::Gemini, true);
    let custody = Custody::start_with(vec![gemini], |c| {
        let mut r = rule(
            "forbidden",
            "request.text.contains('forbidden')",
            Action::Block,
        );
        r.message = Some("custody: not that".into());
        c.policies = vec![r];
    })
    .await;
    let body = r#"{"contents":[{"role":"user","parts":[{"text":"the forbidden words"}]}]}"#;
    let url = custody.url("/gemini/v1beta/models/gemini-2.0-flash:generateContent");
    let (parts, resp) = send(
        &client(),
        post(&url, &[("content-type", "application/json")], body),
    )
    .await;
    assert_eq!(parts.status, 403);
    let v: Value = serde_json::from_slice(&resp).unwrap();
    assert_eq!(v["error"]["status"], "PERMISSION_DENIED");
    assert_eq!(v["error"]["code"], 403);
    assert_eq!(v["error"]["message"], "custody: not that");
    assert_eq!(parts.headers["x-custody-error"], "policy_blocked");
    let done = custody.stop().await;
    let r = done.one();
    assert_eq!(r["outcome"], "blocked");
    assert_eq!(r["gen_ai"]["request"]["model"], "gemini-2.0-flash");
    assert!(r["request"]["body"]
        .to_string()
        .contains("the forbidden words"));
    assert_eq!(decisions(r), vec![("forbidden".into(), "blocked".into())]);
    assert!(
        up.requests.try_recv().is_err(),
        "nothing reached the upstream"
    );
}

#[tokio::test]
async fn a_compressed_request_is_sanitized_and_forwarded_decoded() {
    let mut up = chat_upstream().await;
    let custody = Custody::start_with(vec![openai_route(&up)], |c| {
        let mut r = rule(
            "cards",
            "request.entities.CREDIT_CARD > 0",
            Action::Sanitize,
        );
        r.entities = Some(vec!["CREDIT_CARD".into()]);
        c.policies = vec![r];
    })
    .await;
    let plain = chat("card 4111 1111 1111 1111, mail bob@example.com");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(plain.as_bytes()).unwrap();
    let gz = gz.finish().unwrap();
    let parts = post_gzip(&custody, gz).await;
    assert_eq!(parts.status, 200);
    let got = up.next().await;
    let text = String::from_utf8(got.body.to_vec()).unwrap();
    assert!(!text.contains("4111 1111 1111 1111"), "{text}");
    assert!(text.contains("[CREDIT_CARD]"), "{text}");
    // Only the rule's entities: the address was not the rule's to replace.
    assert!(text.contains("bob@example.com"), "{text}");
    assert!(got.parts.headers.get("content-encoding").is_none());
    assert_eq!(
        got.parts.headers["content-length"],
        text.len().to_string().as_str()
    );
    serde_json::from_str::<Value>(&text).unwrap();
    let done = custody.stop().await;
    let r = done.one();
    assert_eq!(r["policy"]["sanitized"]["CREDIT_CARD"], 1);
    assert_eq!(decisions(r), vec![("cards".into(), "sanitized".into())]);
}

#[tokio::test]
async fn a_body_too_long_to_evaluate_follows_on_error() {
    let mut up = chat_upstream().await;
    let lenient = route("lenient", "/lenient/", &up.url(), Provider::Openai, true);
    let strict = route("strict", "/strict/", &up.url(), Provider::Openai, true);
    let custody = Custody::start_with(vec![lenient, strict], |c| {
        c.audit.capture_max_bytes = 1024;
        let mut a = rule("lenient-rule", "request.text.contains('x')", Action::Block);
        a.routes = Some(vec!["lenient".into()]);
        let mut b = rule("strict-rule", "request.text.contains('x')", Action::Block);
        b.routes = Some(vec!["strict".into()]);
        b.on_error = OnError::Block;
        c.policies = vec![a, b];
    })
    .await;
    let big = chat(&"y".repeat(8 * 1024));
    let h = [("content-type", "application/json")];
    let url = custody.url("/lenient/v1/chat/completions");
    let (parts, _) = send(&client(), post(&url, &h, big.clone())).await;
    assert_eq!(parts.status, 200);
    // Forwarded whole: the prefix read for the rules, then the rest.
    assert_eq!(up.next().await.body, big.as_bytes());
    let url = custody.url("/strict/v1/chat/completions");
    let (parts, _) = send(&client(), post(&url, &h, big)).await;
    assert_eq!(parts.status, 403);
    let done = custody.stop().await;
    let [lenient, strict] = &done.records[..] else {
        panic!("{:#?}", done.records)
    };
    assert_eq!(
        decisions(lenient),
        vec![("lenient-rule".into(), "error".into())]
    );
    let why = lenient["policy"]["decisions"][0]["error"].as_str().unwrap();
    assert!(why.contains("longer than 1024 bytes"), "{why}");
    assert_eq!(strict["outcome"], "blocked");
    assert_eq!(
        decisions(strict),
        vec![("strict-rule".into(), "blocked".into())]
    );
    assert!(up.requests.try_recv().is_err());
}

#[tokio::test]
async fn unparseable_bodies_are_evaluated_as_text() {
    let mut up = chat_upstream().await;
    let custody = Custody::start_with(vec![openai_route(&up)], |c| {
        c.policies = vec![rule(
            "forbidden",
            "request.text.contains('forbidden')",
            Action::Block,
        )];
    })
    .await;
    let h = [("content-type", "application/json")];
    let url = custody.url("/v1/chat/completions");
    // Too deep for a JSON parser, with invalid UTF-8 beside the phrase: still read.
    let mut deep = "[".repeat(100_000).into_bytes();
    deep.extend_from_slice(b"\"forbidden\xff\"");
    let bomb_like = b"\x1f\x8b not really gzip".to_vec();
    let (parts, _) = send(&client(), post(&url, &h, deep)).await;
    assert_eq!(parts.status, 403);
    // A body whose encoding cannot be undone is not evaluated: recorded as such.
    let gz = [
        ("content-type", "application/json"),
        ("content-encoding", "gzip"),
    ];
    let sent = bomb_like.len();
    let (parts, _) = send(&client(), post(&url, &gz, bomb_like)).await;
    assert_eq!(parts.status, 200);
    let done = custody.stop().await;
    assert_eq!(done.records[0]["outcome"], "blocked");
    let why = done.records[1]["policy"]["decisions"][0]["error"]
        .as_str()
        .unwrap();
    assert!(why.contains("not evaluated"), "{why}");
    assert_eq!(up.next().await.body.len(), sent);
}

#[tokio::test]
async fn rules_that_fail_at_run_time_are_recorded_without_the_exchanges_values() {
    let mut up = chat_upstream().await;
    let custody = Custody::start_with(vec![openai_route(&up)], |c| {
        // The text is used as a regex: `(` makes it invalid at run time.
        c.policies = vec![rule(
            "self-match",
            "request.text.matches(request.text)",
            Action::Flag,
        )];
    })
    .await;
    let body = chat("secret-marker-((");
    let done = forwarded_chat(custody, &mut up, body).await;
    let d = &done.one()["policy"]["decisions"][0];
    assert_eq!(d["effect"], "error");
    let why = d["error"].as_str().unwrap();
    assert!(
        why.contains("matches") && !why.contains("secret-marker"),
        "{why}"
    );
}

#[tokio::test]
async fn a_bad_reload_is_refused_and_the_rules_in_force_stay() {
    let mut up = chat_upstream().await;
    let custody = Custody::start_with(vec![openai_route(&up)], |c| {
        c.policies = vec![rule(
            "no-x",
            "request.text.contains('xyzzy')",
            Action::Block,
        )];
    })
    .await;
    let mut bad = custody.config.clone();
    bad.policies
        .push(rule("typo", "reqest.text == ''", Action::Flag));
    let e = custody.reload(bad).await.unwrap_err();
    assert!(
        e.contains("policy `typo`") && e.contains("unknown variable `reqest`"),
        "{e}"
    );
    let mut wrong_type = custody.config.clone();
    wrong_type
        .policies
        .push(rule("typed", "size(model) > 'a'", Action::Flag));
    let e = custody.reload(wrong_type).await.unwrap_err();
    assert!(e.contains("policy `typed`"), "{e}");
    let h = [("content-type", "application/json")];
    let (parts, _) = send(
        &client(),
        post(&custody.url("/v1/chat/completions"), &h, chat("xyzzy")),
    )
    .await;
    assert_eq!(parts.status, 403);
    let done = custody.stop().await;
    assert!(up.requests.try_recv().is_err());
    assert!(done.events.iter().all(|e| e["event"]["reason"] != "reload"));
}

#[tokio::test]
async fn routes_a_request_rule_does_not_name_are_never_read_or_evaluated() {
    let mut up = chat_upstream().await;
    let other = route("other", "/other/", &up.url(), Provider::Openai, true);
    let custody = Custody::start_with(vec![openai_route(&up), other], |c| {
        let mut r = rule(
            "openai-only",
            "request.text.contains('xyzzy')",
            Action::Block,
        );
        r.routes = Some(vec!["openai".into()]);
        let mut flag = rule("flag-all", "request.text.contains('xyzzy')", Action::Flag);
        flag.severity = Severity::Low;
        c.policies = vec![r, flag];
    })
    .await;
    let h = [("content-type", "application/json")];
    let (parts, _) = send(
        &client(),
        post(
            &custody.url("/other/v1/chat/completions"),
            &h,
            chat("xyzzy"),
        ),
    )
    .await;
    assert_eq!(parts.status, 200);
    up.next().await;
    let seconds = "custody_policy_evaluation_seconds_count{phase=\"request\"}";
    assert_eq!(custody.metric(seconds).await, 0.0);
    let (parts, _) = send(
        &client(),
        post(&custody.url("/v1/chat/completions"), &h, chat("xyzzy")),
    )
    .await;
    assert_eq!(parts.status, 403);
    assert_eq!(custody.metric(seconds).await, 1.0);
    let blocked =
        "custody_policy_decisions_total{policy=\"openai-only\",action=\"block\",mode=\"enforce\"}";
    custody.until_metric(blocked, |v| v == 1.0).await;
    let flagged =
        "custody_policy_decisions_total{policy=\"flag-all\",action=\"flag\",mode=\"enforce\"}";
    custody.until_metric(flagged, |v| v == 2.0).await;
    let done = custody.stop().await;
    assert_eq!(
        decisions(&done.records[0]),
        vec![("flag-all".into(), "flagged".into())]
    );
    assert_eq!(
        decisions(&done.records[1]),
        vec![
            ("openai-only".into(), "blocked".into()),
            ("flag-all".into(), "flagged".into())
        ]
    );
}

#[tokio::test]
async fn term_lists_never_reach_the_trail_and_every_record_names_the_policy_version() {
    let mut up = chat_upstream().await;
    let custody = Custody::start_with(vec![openai_route(&up)], |c| {
        c.policy_terms
            .insert("codenames".into(), vec!["Operation Quiet Harbor".into()]);
        c.policies = vec![rule(
            "codename",
            "request.text.containsAny(terms.codenames)",
            Action::Flag,
        )];
    })
    .await;
    let done = forwarded_chat(custody, &mut up, chat("hello")).await;
    let r = done.one();
    assert_eq!(r["policy"]["decisions"], serde_json::json!([]));
    let version = r["policy"]["version"].as_str().unwrap();
    assert_eq!(done.event("config")["event"]["policy_version"], version);
    let bytes = all_audit_bytes(&done.audit_dir());
    assert!(
        !contains(&bytes, "Quiet Harbor"),
        "a term reached the audit directory"
    );
}

#[tokio::test]
async fn a_compression_bomb_is_not_evaluated_and_not_expanded_past_the_limit() {
    let mut up = chat_upstream().await;
    let custody = Custody::start_with(vec![openai_route(&up)], |c| {
        c.audit.decoded_max_bytes = 1024 * 1024;
        c.policies = vec![rule(
            "forbidden",
            "request.text.contains('forbidden')",
            Action::Block,
        )];
    })
    .await;
    // 64 MiB of a prompt naming the phrase, in about 64 KB of gzip.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let line = b"forbidden words forbidden words ";
    for _ in 0..(64 * 1024 * 1024 / line.len()) {
        gz.write_all(line).unwrap();
    }
    let gz = gz.finish().unwrap();
    let sent = gz.len();
    let parts = post_gzip(&custody, gz).await;
    // `on_error` is `ignore`: forwarded as sent, and the decision says why.
    assert_eq!(parts.status, 200);
    assert_eq!(up.next().await.body.len(), sent);
    let done = custody.stop().await;
    let why = done.records[0]["policy"]["decisions"][0]["error"]
        .as_str()
        .unwrap();
    assert!(why.contains("not evaluated"), "{why}");
}

#[tokio::test]
async fn writer_rules_see_each_part_of_the_response_they_name_and_only_those() {
    let mut up = MockUpstream::start(|_, _| {
        respond(
            200,
            &[("content-type", "application/json")],
            serde_json::json!({
                "id": "chatcmpl-1", "model": "gpt-4o-2024-08-06",
                "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                    "role": "assistant", "content": "write to ops@example.com",
                    "tool_calls": [{"id": "c1", "type": "function",
                        "function": {"name": "shell", "arguments": "{\"cmd\":\"ls\"}"}}]}}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 7}
            })
            .to_string(),
        )
    })
    .await;
    let custody = Custody::start_with(vec![openai_route(&up)], |c| {
        c.policies = vec![
            rule(
                "finish",
                "response.finish_reasons.exists(r, r == 'tool_calls')",
                Action::Flag,
            ),
            rule(
                "answer-email",
                "response.entities.EMAIL_ADDRESS > 0",
                Action::Flag,
            ),
            rule("shell", "'shell' in response.tool_calls", Action::Flag),
            rule("text", "response.text.contains('ops@')", Action::Flag),
            rule(
                "whole",
                "size(response.finish_reasons) == 1 && usage.output_tokens == 7",
                Action::Flag,
            ),
            // Read, but not matching: a miss must not be taken for a hit.
            rule(
                "question-email",
                "request.entities.EMAIL_ADDRESS > 0",
                Action::Flag,
            ),
        ];
    })
    .await;
    let done = forwarded_chat(custody, &mut up, chat("hello")).await;
    let names: Vec<String> = decisions(done.one()).into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        ["finish", "answer-email", "shell", "text", "whole"],
        "{}",
        done.one()["policy"]
    );
}
