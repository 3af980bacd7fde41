//! Hostile and careless input: methods and paths no provider uses, secrets in every
//! extracted field, bodies reviewers must still be able to read. Each test here failed
//! on the code before its fix.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use custody_tests::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends raw bytes on a fresh connection and reads until the server closes it.
async fn raw(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out))
        .await
        .expect("custody answered and closed")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn connect_trace_and_made_up_methods_get_405_and_a_record() {
    let mut up = chat_upstream().await;
    let custody = Custody::start(vec![openai_route(&up)]).await;
    for method in ["CONNECT", "TRACE", "BREW"] {
        let req = format!(
            "{method} /v1/chat/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
        );
        let resp = raw(custody.addr, req.as_bytes()).await;
        assert!(resp.starts_with("HTTP/1.1 405"), "{method}: {resp}");
        assert!(
            resp.to_ascii_lowercase()
                .contains("\r\nallow: get, head, post"),
            "{resp}"
        );
        assert!(resp.contains("method_not_allowed"), "{resp}");
    }
    let done = custody.stop().await;
    assert_eq!(done.records.len(), 3);
    for (r, m) in done.records.iter().zip(["CONNECT", "TRACE", "BREW"]) {
        assert_eq!(r["http"]["method"], m);
        assert_eq!(r["http"]["status"], 405);
        assert_eq!(r["outcome"], "rejected");
        assert_eq!(r["error"], "method_not_allowed");
    }
    assert!(
        up.requests.try_recv().is_err(),
        "nothing reached the upstream"
    );
}

#[tokio::test]
async fn dot_segments_cannot_climb_out_of_a_route() {
    let mut a = chat_upstream().await;
    let mut b = chat_upstream().await;
    let tenant_a = route(
        "tenant-a",
        "/a/",
        &format!("{}/tenant-a", a.url()),
        custody_config::Provider::Openai,
        true,
    );
    let tenant_b = route(
        "tenant-b",
        "/b/",
        &b.url(),
        custody_config::Provider::Openai,
        true,
    );
    let custody = Custody::start(vec![tenant_a, tenant_b]).await;
    let paths = [
        "/a/../../tenant-b/v1/chat/completions",
        "/a/%2e%2e/%2E%2E/tenant-b/v1/chat/completions",
        "/a/.%2e/x",
        "/a/./v1/chat/completions",
        "/a/..%2f..%2ftenant-b/v1/chat/completions",
    ];
    for path in paths {
        let req = format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 2\r\n\r\n{{}}"
        );
        let resp = raw(custody.addr, req.as_bytes()).await;
        assert!(resp.starts_with("HTTP/1.1 400"), "{path}: {resp}");
        assert!(resp.contains("ambiguous_path"), "{resp}");
    }
    // A normal path still goes through.
    let (parts, _) = send(
        &client(),
        post(&custody.url("/a/v1/chat/completions"), &[], "{}"),
    )
    .await;
    assert_eq!(parts.status, 200);
    assert_eq!(
        a.next().await.parts.uri.path(),
        "/tenant-a/v1/chat/completions"
    );
    let done = custody.stop().await;
    assert_eq!(done.records.len(), paths.len() + 1);
    for r in &done.records[..paths.len()] {
        assert_eq!(r["outcome"], "rejected");
        assert_eq!(r["http"]["status"], 400);
    }
    assert!(a.requests.try_recv().is_err());
    assert!(b.requests.try_recv().is_err());
}

async fn admin_reload(custody: &Custody, token: &str) -> u16 {
    let req = http::Request::post(custody.admin_url("/admin/reload"))
        .header("authorization", format!("Bearer {token}"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    send(&client(), req).await.0.status.as_u16()
}

#[tokio::test]
async fn a_reload_applies_a_new_admin_token_or_is_refused() {
    let up = chat_upstream().await;
    let custody = Custody::start_with(vec![openai_route(&up)], |c| {
        c.admin.token = Some("old-admin-token".into());
    })
    .await;
    let mut next = custody.config.clone();
    next.admin.token = Some("new-admin-token".into());
    *custody.reload_file.lock().unwrap() = Some(next.clone());
    assert_eq!(admin_reload(&custody, "old-admin-token").await, 200);
    // The new token is in force, the old one is not.
    assert_eq!(admin_reload(&custody, "old-admin-token").await, 401);
    assert_eq!(admin_reload(&custody, "new-admin-token").await, 200);
    // A token variable that is not set refuses the reload; the token in force stays.
    next.admin.token = None;
    next.admin.token_env = Some("CUSTODY_TEST_ADMIN_TOKEN_UNSET".into());
    let err = custody.reload(next).await.unwrap_err();
    assert!(err.contains("CUSTODY_TEST_ADMIN_TOKEN_UNSET"), "{err}");
    assert_eq!(admin_reload(&custody, "new-admin-token").await, 200);
    custody.stop().await;
}

/// Opens `n` connections that send nothing.
async fn silent(addr: std::net::SocketAddr, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    out
}

/// Waits until the server closes `s` (EOF or reset); fails after 30 s.
async fn closed_by_server(s: &mut tokio::net::TcpStream) {
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf))
        .await
        .expect("the server closed the connection");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}

#[tokio::test]
async fn silent_connections_are_closed_and_the_cap_refuses_beyond_its_overflow() {
    let up = chat_upstream().await;
    let custody = Custody::start_with(vec![openai_route(&up)], |c| {
        c.limits.max_connections = 2;
        c.limits.client_timeout_secs = 1;
    })
    .await;
    // Two within the cap and the overflow's 64: all held open until the first-request
    // deadline; one more is closed at once and counted.
    let mut held = silent(
        custody.addr,
        2 + custody_proxy::connection::OVERFLOW_CONNECTIONS,
    )
    .await;
    custody
        .until_metric("custody_connections", |v| v == held.len() as f64)
        .await;
    let mut beyond = silent(custody.addr, 1).await;
    closed_by_server(&mut beyond[0]).await;
    custody
        .until_metric("custody_connections_refused_total", |v| v == 1.0)
        .await;
    // Connections that never send a byte are closed by the deadline.
    for s in &mut held {
        closed_by_server(s).await;
    }
    custody
        .until_metric("custody_connections", |v| v == 0.0)
        .await;
    // And real clients are served again.
    let (parts, _) = send(
        &client(),
        post(&custody.url("/v1/chat/completions"), &[], "{}"),
    )
    .await;
    assert_eq!(parts.status, 200);
    custody.stop().await;
}

#[tokio::test]
async fn the_admin_listener_has_a_connection_cap_and_a_first_request_deadline() {
    let up = chat_upstream().await;
    let custody = Custody::start_with(vec![openai_route(&up)], |c| {
        c.limits.client_timeout_secs = 1;
    })
    .await;
    let mut held = silent(
        custody.admin_addr,
        custody_proxy::admin::ADMIN_MAX_CONNECTIONS,
    )
    .await;
    let mut beyond = silent(custody.admin_addr, 1).await;
    closed_by_server(&mut beyond[0]).await;
    // Connections that say nothing are closed; the listener serves again.
    for s in &mut held {
        closed_by_server(s).await;
    }
    let req = http::Request::get(custody.admin_url("/healthz"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    assert_eq!(send(&client(), req).await.0.status, 200);
    custody.stop().await;
}

#[tokio::test]
async fn invalid_utf8_is_recorded_replaced_redacted_and_flagged() {
    let (tx, handler) = one_stream(&[("content-type", "text/event-stream")]);
    let up = MockUpstream::start(handler).await;
    let custody = Custody::start(vec![openai_route(&up)]).await;
    let mut body =
        br#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"caf"#.to_vec();
    body.push(0xe9); // Latin-1 é: not UTF-8
    body.extend_from_slice(br#" mail bob@example.com"}]}"#);
    let chunks: Vec<Vec<u8>> = vec![
        b"data: {\"id\":\"c1\",\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"ol\"}}]}\n\n".to_vec(),
        [&b"data: {\"id\":\"c1\",\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\xe9 ok\"}}]}\n\n"[..]].concat(),
        b"data: {\"id\":\"c1\",\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n".to_vec(),
    ];
    for c in chunks {
        tx.send(Ok(c.into())).await.unwrap();
    }
    drop(tx);
    let (parts, _) = send(
        &client(),
        post(&custody.url("/v1/chat/completions"), &[], body),
    )
    .await;
    assert_eq!(parts.status, 200);
    let done = custody.stop().await;
    let r = done.one();
    assert_eq!(r["request"]["invalid_utf8"], true);
    assert_eq!(
        r["request"]["body"]["messages"][0]["content"],
        "caf\u{fffd} mail [EMAIL_ADDRESS]"
    );
    assert_eq!(r["response"]["invalid_utf8"], true);
    assert_eq!(
        r["response"]["body"]["choices"][0]["message"]["content"],
        "ol\u{fffd} ok"
    );
    assert_eq!(r["gen_ai"]["request"]["model"], "gpt-4o");
}

/// `{"a":{"a":...{"a":"bob@example.com"}...}}`, `depth` objects deep.
fn nested(depth: usize) -> String {
    format!(
        "{}\"bob@example.com\"{}",
        "{\"a\":".repeat(depth),
        "}".repeat(depth)
    )
}

#[tokio::test]
async fn deep_bodies_are_recorded_in_a_form_every_reader_parses() {
    let up = MockUpstream::start(|_, body| {
        respond(200, &[("content-type", "application/json")], body.clone())
    })
    .await;
    let custody = Custody::start(vec![openai_route(&up)]).await;
    for depth in [99, 127, 130, 5000] {
        let (parts, got) = send(
            &client(),
            post(&custody.url("/v1/chat/completions"), &[], nested(depth)),
        )
        .await;
        assert_eq!(parts.status, 200);
        assert_eq!(got, nested(depth), "forwarded untouched");
    }
    let done = custody.stop().await;
    // `trail` parsed every line with serde_json's default limit: each record reads back.
    assert_eq!(done.records.len(), 4);
    let shallow = &done.records[0];
    assert!(shallow["request"]["body"].is_object());
    for r in &done.records[1..] {
        let text = r["request"]["body"].as_str().unwrap();
        assert!(text.contains("[EMAIL_ADDRESS]") && !text.contains("bob@"));
        assert!(r["request"]["stored_as_text"]
            .as_str()
            .unwrap()
            .contains("deeper than"));
        assert!(r["response"]["body"].is_string());
    }
}

#[tokio::test]
async fn extracted_fields_get_the_same_redaction_as_bodies() {
    let mut up = MockUpstream::start(|parts, _| {
        // An upstream echoing the query key (a gateway's own format, which no detector
        // knows), and an e-mail address as the served model.
        let body = match parts.uri.query() {
            Some(_) => r#"{"error":{"message":"API key gw-QueryKey-0123456789abcdef not valid"}}"#,
            None => r#"{"id":"x","model":"carol@example.com","choices":[]}"#,
        };
        respond(400, &[("content-type", "application/json")], body)
    })
    .await;
    let custody = Custody::start(vec![openai_route(&up)]).await;
    let token = "tok-ClientToken0123456789abcdef";
    let body = format!(
        r#"{{"model":"{token}","user":"{token}","tools":[{{"type":"function","function":{{"name":"mail_dave@example.com"}}}}],"messages":[{{"role":"user","content":"hi"}}]}}"#
    );
    send(
        &client(),
        post(
            &custody.url("/v1/chat/completions"),
            &[("authorization", &format!("Bearer {token}"))],
            body,
        ),
    )
    .await;
    // A credential in the query (Gemini's `key=`) is the exchange's credential too.
    send(
        &client(),
        post(
            &custody.url("/v1/chat/completions?key=gw-QueryKey-0123456789abcdef"),
            &[],
            r#"{"model":"gpt-4o"}"#,
        ),
    )
    .await;
    up.next().await;
    let done = custody.stop().await;
    let bytes = all_audit_bytes(&done.audit_dir());
    for secret in [
        token,
        "dave@example.com",
        "carol@example.com",
        "QueryKey-0123456789",
    ] {
        assert!(!contains(&bytes, secret), "{secret} reached the audit dir");
    }
    let r = &done.records[0];
    assert_eq!(r["gen_ai"]["request"]["model"], "[CLIENT_CREDENTIAL]");
    assert_eq!(r["client"]["user"], "[CLIENT_CREDENTIAL]");
    assert_eq!(r["gen_ai"]["request"]["tool_names"][0], "[EMAIL_ADDRESS]");
    assert_eq!(r["gen_ai"]["response"]["model"], "[EMAIL_ADDRESS]");
    let q = &done.records[1];
    assert!(q["client"]["key_id"].as_str().unwrap().starts_with("key_"));
    assert_eq!(
        q["response"]["body"]["error"]["message"],
        "API key [CLIENT_CREDENTIAL] not valid"
    );
}

/// Custody in front of a route whose one streamed answer the test feeds.
async fn open_stream(
    provider: custody_config::Provider,
    path: &str,
) -> (ChunkSender, Custody, hyper::body::Incoming) {
    let (tx, handler) = one_stream(&[("content-type", "text/event-stream")]);
    let up = MockUpstream::start(handler).await;
    let custody = Custody::start(vec![route("r", "/", &up.url(), provider, false)]).await;
    let req = post(&custody.url(path), &[], r#"{"model":"m","stream":true}"#);
    let resp = client().request(req).await.unwrap();
    (tx, custody, resp.into_body())
}

#[tokio::test]
async fn a_client_that_closes_after_the_last_event_completed_its_stream() {
    use custody_config::Provider;
    use http_body_util::BodyExt;
    let cases = [
        (
            Provider::Openai,
            "/v1/chat/completions",
            "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"all of it\"},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n",
        ),
        (
            Provider::Anthropic,
            "/v1/messages",
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"content\":[]}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        ),
    ];
    for (provider, path, events) in cases {
        let (tx, custody, mut body) = open_stream(provider, path).await;
        tx.send(Ok(bytes::Bytes::from_static(events.as_bytes())))
            .await
            .unwrap();
        let mut got = Vec::new();
        while !got.ends_with(events.as_bytes()) {
            got.extend_from_slice(&body.frame().await.unwrap().unwrap().into_data().unwrap());
        }
        // The client has the last event and leaves; the upstream's end comes later.
        drop(body);
        custody
            .until_metric(
                "custody_requests_total{route=\"r\",status_class=\"2xx\",outcome=\"ok\"}",
                |v| v == 1.0,
            )
            .await;
        drop(tx);
        let done = custody.stop().await;
        assert_eq!(done.one()["outcome"], "ok", "{provider:?}");
    }
    // Cut before the last event: still cancelled.
    let (tx, custody, mut body) = open_stream(Provider::Openai, "/v1/chat/completions").await;
    tx.send(Ok(bytes::Bytes::from_static(
        b"data: {\"id\":\"c\",\"choices\":[]}\n\n",
    )))
    .await
    .unwrap();
    body.frame().await.unwrap().unwrap();
    drop(body);
    custody
        .until_metric(
            "custody_requests_total{route=\"r\",status_class=\"2xx\",outcome=\"client_cancelled\"}",
            |v| v == 1.0,
        )
        .await;
    drop(tx);
    assert_eq!(custody.stop().await.one()["outcome"], "client_cancelled");
}

#[tokio::test]
async fn a_provider_error_inside_a_stream_is_an_upstream_error() {
    use custody_config::Provider;
    let cases = [
        (
            Provider::Openai,
            "/v1/chat/completions",
            "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"par\"}}]}\n\ndata: {\"error\":{\"message\":\"The server had an error; write to ops@example.com\",\"type\":\"server_error\"}}\n\n",
        ),
        (
            Provider::Anthropic,
            "/v1/messages",
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"content\":[]}}\n\nevent: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n",
        ),
    ];
    for (provider, path, events) in cases {
        let (tx, custody, body) = open_stream(provider, path).await;
        tx.send(Ok(bytes::Bytes::from_static(events.as_bytes())))
            .await
            .unwrap();
        drop(tx);
        http_body_util::BodyExt::collect(body).await.unwrap();
        let done = custody.stop().await;
        let r = done.one();
        assert_eq!(r["outcome"], "upstream_error", "{provider:?}");
        let err = r["error"].as_str().unwrap();
        assert!(err.starts_with("upstream error in the stream: "), "{err}");
        assert!(!err.contains("ops@example.com"), "{err}");
        assert!(
            err.contains("Overloaded") || err.contains("[EMAIL_ADDRESS]"),
            "{err}"
        );
    }
}

#[tokio::test]
async fn an_edited_index_is_not_trusted_and_search_still_finds_every_record() {
    use custody_audit::{
        review::reader::DirSource,
        review::search::{search, Query},
    };
    let up = chat_upstream().await;
    let custody = Custody::start(vec![openai_route(&up)]).await;
    for user in ["alice", "bob"] {
        let body = format!(r#"{{"model":"gpt-4o","user":"{user}","messages":[]}}"#);
        send(
            &client(),
            post(&custody.url("/v1/chat/completions"), &[], body),
        )
        .await;
    }
    let done = custody.stop().await;
    let dir = done.audit_dir();
    let query = Query {
        user: Some("alice".into()),
        limit: 10,
        ..Query::default()
    };
    let found = search(&DirSource(&dir), &query).unwrap();
    assert_eq!(found.records.len(), 1);
    assert!(
        found.untrusted_indexes.is_empty(),
        "{:?}",
        found.untrusted_indexes
    );
    // Someone removes alice from the sealed segment's index to hide her exchanges.
    let idx_path = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "idx"))
        .unwrap();
    let mut idx: Value = serde_json::from_slice(&std::fs::read(&idx_path).unwrap()).unwrap();
    let users = idx["facts"]["users"].as_array_mut().unwrap();
    users.retain(|u| u != "alice");
    std::fs::write(&idx_path, serde_json::to_vec(&idx).unwrap()).unwrap();
    let found = search(&DirSource(&dir), &query).unwrap();
    assert_eq!(
        found.records.len(),
        1,
        "found by a full read of the segment"
    );
    assert_eq!(found.untrusted_indexes.len(), 1);
    assert!(
        found.untrusted_indexes[0].contains("does not match"),
        "{:?}",
        found.untrusted_indexes
    );
}

#[tokio::test]
async fn a_decompression_bomb_is_omitted_at_the_decoded_limit() {
    use std::io::Write;
    let up = chat_upstream().await;
    let custody = Custody::start_with(vec![openai_route(&up)], |c| {
        c.audit.decoded_max_bytes = 4 * 1024 * 1024;
    })
    .await;
    // 64 MiB of text in well under 1 MiB of gzip.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let chunk = br#"{"a":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"},"#.repeat(1024);
    for _ in 0..(64 * 1024 * 1024 / chunk.len()) {
        gz.write_all(&chunk).unwrap();
    }
    let bomb = gz.finish().unwrap();
    assert!(bomb.len() < 1024 * 1024);
    let (parts, _) = send(
        &client(),
        post(
            &custody.url("/v1/chat/completions"),
            &[
                ("content-encoding", "gzip"),
                ("content-type", "application/json"),
            ],
            bomb.clone(),
        ),
    )
    .await;
    assert_eq!(parts.status, 200);
    let done = custody.stop().await;
    let r = done.one();
    assert!(
        r["request"]["omitted"]
            .as_str()
            .unwrap()
            .contains("exceeds 4194304 bytes"),
        "{r}"
    );
    assert_eq!(r["request"]["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(r["http"]["request_bytes"], bomb.len());
}

#[tokio::test]
async fn a_stream_naming_endless_choices_is_reassembled_within_bounds() {
    let (tx, handler) = one_stream(&[("content-type", "text/event-stream")]);
    let up = MockUpstream::start(handler).await;
    let custody = Custody::start(vec![openai_route(&up)]).await;
    let feeder = tokio::spawn(async move {
        let mut batch = String::new();
        for i in 0..200_000u32 {
            batch.push_str(&format!(
                "data: {{\"id\":\"c\",\"choices\":[{{\"index\":{i},\"delta\":{{\"content\":\"x\"}}}}]}}\n\n"
            ));
            if batch.len() > 64 * 1024 {
                tx.send(Ok(std::mem::take(&mut batch).into()))
                    .await
                    .unwrap();
            }
        }
        batch.push_str("data: [DONE]\n\n");
        tx.send(Ok(batch.into())).await.unwrap();
    });
    let (parts, _) = send(
        &client(),
        post(
            &custody.url("/v1/chat/completions"),
            &[],
            r#"{"model":"m","stream":true}"#,
        ),
    )
    .await;
    feeder.await.unwrap();
    assert_eq!(parts.status, 200);
    let done = custody.stop().await;
    let r = done.one();
    assert_eq!(r["outcome"], "ok");
    let choices = r["response"]["body"]["choices"].as_array().unwrap();
    assert_eq!(choices.len() as u64, custody_audit::genai::MAX_STREAM_INDEX);
    assert!(r["response"]["reassembly_stopped"]
        .as_str()
        .unwrap()
        .contains("left out"));
}

#[tokio::test]
async fn metric_labels_take_only_well_formed_model_names() {
    let up = MockUpstream::start(|_, body| {
        let served = if body.starts_with(b"{\"model\":\"gpt") {
            "gpt-4o-2024-08-06"
        } else {
            "call me at bob@example.com\\n# TYPE injected counter"
        };
        respond(
            200,
            &[("content-type", "application/json")],
            format!(r#"{{"id":"x","model":"{served}","choices":[],"usage":{{"prompt_tokens":1,"completion_tokens":2}}}}"#),
        )
    })
    .await;
    let custody = Custody::start(vec![openai_route(&up)]).await;
    for model in ["gpt-4o", "something else"] {
        let body = format!(r#"{{"model":"{model}","messages":[]}}"#);
        send(
            &client(),
            post(&custody.url("/v1/chat/completions"), &[], body),
        )
        .await;
    }
    custody
        .until_metric(
            "gen_ai_client_token_usage_total{route=\"openai\",model=\"other\",token_type=\"input\"}",
            |v| v == 1.0,
        )
        .await;
    let text = {
        let req = http::Request::get(custody.admin_url("/metrics"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        String::from_utf8(send(&client(), req).await.1.to_vec()).unwrap()
    };
    assert!(text.contains("model=\"gpt-4o-2024-08-06\""), "{text}");
    assert!(
        !text.contains("injected") && !text.contains("model=\"[EMAIL"),
        "{text}"
    );
    custody.stop().await;
}

#[tokio::test]
async fn a_trickling_client_is_recorded_as_the_clients_fault() {
    // An upstream that reads the whole body before answering.
    let up = chat_upstream().await;
    let custody = Custody::start_with(vec![openai_route(&up)], |c| {
        c.upstream.response_timeout_secs = 1;
        c.limits.client_timeout_secs = 30;
    })
    .await;
    let mut s = tokio::net::TcpStream::connect(custody.addr).await.unwrap();
    s.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{\"model\":",
    )
    .await
    .unwrap();
    // The rest never comes (within the upstream's response timeout).
    let mut out = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut out))
        .await
        .expect("custody answered")
        .unwrap();
    let head = String::from_utf8_lossy(&out[..n]).into_owned();
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    drop(s);
    let done = custody.stop().await;
    let r = done.one();
    assert_eq!(r["outcome"], "client_cancelled");
    assert_eq!(r["http"]["status"], 408);
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("still arriving from the client"),
        "{r}"
    );
}

#[tokio::test]
async fn conversations_never_link_across_callers() {
    let up = MockUpstream::start(|_, _| {
        respond(
            200,
            &[("content-type", "application/json")],
            r#"{"id":"x","model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"Hello!"}}]}"#,
        )
    })
    .await;
    let custody = Custody::start(vec![openai_route(&up)]).await;
    let first = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
    let second = r#"{"model":"m","messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"Hello!"},{"role":"user","content":"and?"}]}"#;
    let call = |key: &'static str, body: &'static str| {
        let url = custody.url("/v1/chat/completions");
        async move {
            send(
                &client(),
                post(&url, &[("authorization", &format!("Bearer {key}"))], body),
            )
            .await
        }
    };
    call("sk-alice-000000000000000000", first).await;
    call("sk-bob-00000000000000000000", first).await;
    call("sk-bob-00000000000000000000", second).await;
    call("sk-carol-000000000000000000", second).await;
    let done = custody.stop().await;
    let r = &done.records;
    assert_ne!(r[0]["client"]["key_id"], r[1]["client"]["key_id"]);
    // Bob's second turn continues Bob's first, not Alice's identical opening.
    assert_eq!(r[2]["chain"]["conversation_parent"], r[1]["id"]);
    // Carol sends the same history but never had that first turn: no parent.
    assert!(
        r[3]["chain"].get("conversation_parent").is_none(),
        "{}",
        r[3]
    );
}
