//! Who, what model, which conversation: virtual keys, trace context, sessions and prompt
//! templates, configuration versions and reloads, and prompt-response chains.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use custody_audit::{
    review::reader::DirSource,
    review::search::{conversation, search, Query},
};
use custody_config::{Provider, VirtualKey};
use custody_tests::*;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// A virtual key entry for `key`, whose provider key is the test process's
/// `CARGO_PKG_NAME` (cargo sets it; tests cannot set variables safely in parallel).
fn vkey(id: &str, key: &str, routes: Option<&[&str]>, models: Option<&[&str]>) -> VirtualKey {
    VirtualKey {
        id: id.into(),
        user: Some(format!("{id}-user")),
        team: Some("search".into()),
        key_sha256: Some(hex::encode(Sha256::digest(key.as_bytes()))),
        key_env: None,
        routes: routes.map(|r| r.iter().map(|s| s.to_string()).collect()),
        models: models.map(|m| m.iter().map(|s| s.to_string()).collect()),
        upstream_key_env: Some("CARGO_PKG_NAME".into()),
    }
}

const REAL_KEY: &str = env!("CARGO_PKG_NAME");

#[tokio::test]
async fn virtual_keys_authenticate_inject_and_refuse() {
    let mut up = chat_upstream().await;
    let anthropic_up = chat_upstream().await;
    let custody = Custody::start_with(
        vec![
            openai_route(&up),
            route(
                "anthropic",
                "/anthropic/",
                &anthropic_up.url(),
                Provider::Anthropic,
                true,
            ),
        ],
        |c| {
            c.keys = vec![
                vkey("app-1", "ck-good-key-1", Some(&["openai"]), None),
                vkey("app-2", "ck-good-key-2", None, Some(&["gpt-4o-mini"])),
            ]
        },
    )
    .await;
    let c = client();
    let chat = custody.url("/v1/chat/completions");
    let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;

    // Good key: the upstream gets the real key, never the virtual one.
    let (parts, _) = send(
        &c,
        post(&chat, &[("authorization", "Bearer ck-good-key-1")], body),
    )
    .await;
    assert_eq!(parts.status, 200);
    let seen = up.next().await;
    assert_eq!(
        seen.parts.headers["authorization"],
        format!("Bearer {REAL_KEY}").as_str()
    );

    // Unknown key: 401 in OpenAI's shape; in Anthropic's on its route.
    let (parts, got) = send(
        &c,
        post(&chat, &[("authorization", "Bearer ck-nope")], body),
    )
    .await;
    assert_eq!(parts.status, 401);
    let v: Value = serde_json::from_slice(&got).unwrap();
    assert_eq!(v["error"]["code"], "invalid_api_key");
    let (parts, got) = send(
        &c,
        post(
            &custody.url("/anthropic/v1/messages"),
            &[("x-api-key", "ck-nope")],
            "{}",
        ),
    )
    .await;
    assert_eq!(parts.status, 401);
    let v: Value = serde_json::from_slice(&got).unwrap();
    assert_eq!(v["error"]["type"], "authentication_error");
    // No key at all.
    let (parts, _) = send(&c, post(&chat, &[], body)).await;
    assert_eq!(parts.status, 401);

    // Disallowed route, then disallowed and allowed models.
    let (parts, got) = send(
        &c,
        post(
            &custody.url("/anthropic/v1/messages"),
            &[("x-api-key", "ck-good-key-1")],
            "{}",
        ),
    )
    .await;
    assert_eq!(parts.status, 403);
    assert_eq!(
        serde_json::from_slice::<Value>(&got).unwrap()["error"]["type"],
        "permission_error"
    );
    let key2 = [("authorization", "Bearer ck-good-key-2")];
    let (parts, _) = send(&c, post(&chat, &key2, body)).await;
    assert_eq!(parts.status, 403, "gpt-4o is not in app-2's models");
    let mini = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
    let (parts, _) = send(&c, post(&chat, &key2, mini)).await;
    assert_eq!(parts.status, 200);
    let seen = up.next().await;
    assert_eq!(
        seen.body,
        mini.as_bytes(),
        "a body read for the check is forwarded whole"
    );

    let done = custody.stop().await;
    let r = &done.records;
    assert_eq!(r.len(), 7);
    assert_eq!(r[0]["outcome"], "ok");
    assert_eq!(r[0]["client"]["key_id"], "app-1");
    assert_eq!(r[0]["client"]["user"], "app-1-user");
    assert_eq!(r[0]["client"]["team"], "search");
    let statuses: Vec<u64> = r
        .iter()
        .map(|x| x["http"]["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, vec![200, 401, 401, 401, 403, 403, 200]);
    for rejected in &r[1..6] {
        assert_eq!(rejected["outcome"], "rejected");
    }
    assert!(r[5]["error"]
        .as_str()
        .unwrap()
        .contains("may not use model `gpt-4o`"));
    assert_eq!(r[5]["client"]["key_id"], "app-2");
    assert!(r[4]["error"]
        .as_str()
        .unwrap()
        .contains("may not use route"));
    assert!(r[1].get("client").unwrap().get("user").is_none());
    let bytes = all_audit_bytes(&done.audit_dir());
    for secret in ["ck-good-key-1", "ck-good-key-2", "ck-nope"] {
        assert!(!contains(&bytes, secret), "{secret} reached the audit dir");
    }
}

#[tokio::test]
async fn trace_context_is_kept_or_started_and_recorded() {
    let mut up = chat_upstream().await;
    let custody = Custody::start(vec![openai_route(&up)]).await;
    let c = client();
    let url = custody.url("/v1/chat/completions");
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    send(
        &c,
        post(
            &url,
            &[("traceparent", parent), ("tracestate", "congo=t61rcWkgMzE")],
            "{}",
        ),
    )
    .await;
    let first = up.next().await;
    assert_eq!(first.parts.headers["traceparent"], parent);
    assert_eq!(first.parts.headers["tracestate"], "congo=t61rcWkgMzE");
    send(&c, post(&url, &[], "{}")).await;
    let second = up.next().await;
    let sent = second.parts.headers["traceparent"]
        .to_str()
        .unwrap()
        .to_owned();

    let done = custody.stop().await;
    let (a, b) = (&done.records[0], &done.records[1]);
    assert_eq!(a["trace"]["id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(a["trace"]["span_id"], "00f067aa0ba902b7");
    assert!(a["trace"].get("generated").is_none());
    assert_eq!(b["trace"]["generated"], true);
    assert_eq!(
        sent,
        format!(
            "00-{}-{}-01",
            b["trace"]["id"].as_str().unwrap(),
            b["trace"]["span_id"].as_str().unwrap()
        )
    );
    let q = Query {
        trace: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
        limit: 10,
        ..Query::default()
    };
    assert_eq!(
        search(&DirSource(&done.audit_dir()), &q)
            .unwrap()
            .records
            .len(),
        1
    );
}

/// A provider that answers each chat request with `Answer N`, N its message count.
async fn echo_upstream() -> MockUpstream {
    MockUpstream::start(|_, body| {
        let req: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let n = req["messages"].as_array().map_or(0, Vec::len);
        let resp = json!({
            "id": format!("chatcmpl-{n}"), "object": "chat.completion", "model": "gpt-4o-2024-08-06",
            "choices": [{"index": 0, "finish_reason": "stop",
                "message": {"role": "assistant", "content": format!("Answer {n}"), "refusal": null}}],
            "usage": {"prompt_tokens": n, "completion_tokens": 2, "total_tokens": n + 2}
        });
        respond(200, &[("content-type", "application/json")], resp.to_string())
    })
    .await
}

#[tokio::test]
async fn a_three_turn_conversation_is_linked_and_told_turn_by_turn() {
    let up = echo_upstream().await;
    let custody = Custody::start(vec![openai_route(&up)]).await;
    let c = client();
    let url = custody.url("/v1/chat/completions");
    let headers = [
        ("x-session-id", "sess-42"),
        ("x-prompt-id", "support-bot"),
        ("x-prompt-version", "7"),
    ];
    let mut messages = vec![
        json!({"role": "system", "content": "You are helpful."}),
        json!({"role": "user", "content": "My e-mail is jane.doe@example.com"}),
    ];
    for turn in 0..3 {
        let body = json!({"model": "gpt-4o", "messages": messages}).to_string();
        let (_, got) = send(&c, post(&url, &headers, body)).await;
        let answer: Value = serde_json::from_slice(&got).unwrap();
        // The client sends the answer back as history, as chat clients do.
        messages.push(answer["choices"][0]["message"].clone());
        messages.push(json!({"role": "user", "content": format!("Question {}", turn + 2)}));
    }
    // An unrelated request with the same first prompt starts a conversation of its own.
    let first = json!({"model": "gpt-4o", "messages": &messages[..2]}).to_string();
    send(&c, post(&url, &[], first)).await;
    let done = custody.stop().await;
    let r = &done.records;
    assert_eq!(r.len(), 4);
    assert!(r[0]["chain"].get("conversation_parent").is_none());
    assert_eq!(r[1]["chain"]["conversation_parent"], r[0]["id"]);
    assert_eq!(r[2]["chain"]["conversation_parent"], r[1]["id"]);
    assert!(r[3]["chain"].get("conversation_parent").is_none());
    assert_eq!(
        r[0]["prompt"]["hash"], r[3]["prompt"]["hash"],
        "same prompt, same hash"
    );
    assert_ne!(r[0]["prompt"]["hash"], r[1]["prompt"]["hash"]);
    assert_eq!(r[0]["session"]["id"], "sess-42");
    assert_eq!(r[0]["prompt"]["template"]["id"], "support-bot");
    assert_eq!(r[0]["prompt"]["template"]["version"], "7");
    // The hash is over the prompt before redaction, keyed: no e-mail, no plain digest.
    let text = r[0].to_string();
    assert!(!text.contains("jane.doe@example.com"));

    // `log chain` on the middle turn tells the whole conversation, oldest first.
    let chain = conversation(&DirSource(&done.audit_dir()), r[1]["id"].as_str().unwrap()).unwrap();
    let ids: Vec<&Value> = chain.iter().map(|t| &t["id"]).collect();
    assert_eq!(ids, vec![&r[0]["id"], &r[1]["id"], &r[2]["id"]]);

    // Every output produced from one prompt.
    let q = Query {
        prompt_hash: r[0]["prompt"]["hash"].as_str().map(str::to_owned),
        limit: 10,
        ..Query::default()
    };
    let found = search(&DirSource(&done.audit_dir()), &q).unwrap().values();
    assert_eq!(found.len(), 2);
    assert_eq!(found[0]["id"], r[3]["id"], "newest first");
}

#[tokio::test]
async fn conversations_stay_linked_across_a_restart() {
    let up = echo_upstream().await;
    let custody = Custody::start(vec![openai_route(&up)]).await;
    let url = custody.url("/v1/chat/completions");
    let first = json!([{"role": "user", "content": "Hello"}]);
    let body = json!({"model": "gpt-4o", "messages": first}).to_string();
    let (_, got) = send(&client(), post(&url, &[], body)).await;
    let answer: Value = serde_json::from_slice(&got).unwrap();
    let stopped = custody.stop().await;
    let first_id = stopped.records[0]["id"].clone();

    // A rolling restart: the writer rebuilds its index from the trail.
    let custody = Custody::start_in(stopped.dir, vec![openai_route(&up)], |_| {}).await;
    let messages =
        json!([first[0], answer["choices"][0]["message"], {"role": "user", "content": "Again"}]);
    let body = json!({"model": "gpt-4o", "messages": messages}).to_string();
    send(
        &client(),
        post(&custody.url("/v1/chat/completions"), &[], body),
    )
    .await;
    let done = custody.stop().await;
    assert_eq!(done.records[1]["chain"]["conversation_parent"], first_id);
}

#[tokio::test]
async fn a_reload_writes_a_config_event_and_new_records_carry_the_new_version() {
    let mut up = chat_upstream().await;
    let custody = Custody::start_with(vec![openai_route(&up)], |c| {
        c.source.insert("service".into(), "checkout".into());
    })
    .await;
    let c = client();
    send(&c, post(&custody.url("/v1/chat/completions"), &[], "{}")).await;
    up.next().await;

    let mut next = custody.config.clone();
    next.keys = vec![vkey("app-1", "ck-after-reload", None, None)];
    next.source.insert("service".into(), "checkout-v2".into());
    let version = custody.reload(next.clone()).await.unwrap();
    // In force at once: a request without a key is now refused.
    let (parts, _) = send(&c, post(&custody.url("/v1/chat/completions"), &[], "{}")).await;
    assert_eq!(parts.status, 401);
    let headers = [("authorization", "Bearer ck-after-reload")];
    let (parts, _) = send(
        &c,
        post(&custody.url("/v1/chat/completions"), &headers, "{}"),
    )
    .await;
    assert_eq!(parts.status, 200);

    // What cannot change on reload is refused, and nothing changes.
    let mut bad = next.clone();
    bad.audit.segment_max_bytes += 1;
    assert!(custody.reload(bad).await.unwrap_err().contains("[audit]"));
    let mut bad = next.clone();
    bad.otel.endpoint = Some("http://127.0.0.1:1".into());
    assert!(custody.reload(bad).await.unwrap_err().contains("[otel]"));

    let done = custody.stop().await;
    let configs: Vec<&Value> = done
        .events
        .iter()
        .filter(|e| e["event"]["type"] == "config")
        .collect();
    assert_eq!(configs.len(), 2);
    assert_eq!(configs[0]["event"]["reason"], "start");
    let reload = &configs[1]["event"];
    assert_eq!(reload["reason"], "reload");
    assert_eq!(reload["version"], version.as_str());
    assert_eq!(reload["previous_version"], configs[0]["event"]["version"]);
    let changed: Vec<&str> = reload["changed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["key"].as_str().unwrap())
        .collect();
    assert!(changed.contains(&"source.service"), "{changed:?}");
    assert!(changed.iter().any(|k| k.starts_with("key")), "{changed:?}");
    // Secrets appear as fingerprints only.
    let hash = hex::encode(Sha256::digest(b"ck-after-reload"));
    assert!(!reload.to_string().contains(&hash));
    assert!(!reload.to_string().contains(REAL_KEY));

    let r = &done.records;
    assert_eq!(r[0]["config"]["version"], configs[0]["event"]["version"]);
    assert_eq!(r[0]["source"]["service"], "checkout");
    assert_eq!(r[2]["config"]["version"], version.as_str());
    assert_eq!(r[2]["source"]["service"], "checkout-v2");
    assert_eq!(r[2]["client"]["key_id"], "app-1");
    // The reload event sits in the chain before the records it governs.
    let seq = |v: &Value| v["seq"].as_u64().unwrap();
    assert!(seq(&r[0]) < seq(configs[1]) && seq(configs[1]) < seq(&r[1]));
    custody_audit::review::verify::verify_dir(&done.audit_dir(), None, |_, _, _| {}).unwrap();
}

#[tokio::test]
async fn search_answers_who_asked_what() {
    let up = echo_upstream().await;
    let custody = Custody::start_with(vec![openai_route(&up)], |c| {
        c.keys = vec![vkey("app-1", "ck-k1", None, None)];
    })
    .await;
    let c = client();
    let url = custody.url("/v1/chat/completions");
    for user in ["alice", "bob", "alice"] {
        let body = json!({"model": "gpt-4o", "user": user,
            "messages": [{"role": "user", "content": format!("hello from {user}")}]});
        send(
            &c,
            post(&url, &[("authorization", "Bearer ck-k1")], body.to_string()),
        )
        .await;
    }
    let done = custody.stop().await;
    assert_eq!(done.records[0]["client"]["user"], "app-1-user");
    assert_eq!(done.records[0]["client"]["end_user"], "alice");
    let q = Query {
        user: Some("alice".into()),
        since: Some(std::time::SystemTime::now() - std::time::Duration::from_secs(86_400)),
        limit: 10,
        ..Query::default()
    };
    assert_eq!(
        search(&DirSource(&done.audit_dir()), &q)
            .unwrap()
            .records
            .len(),
        2
    );
}
