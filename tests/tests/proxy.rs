//! End to end through custody: forwarding is byte-identical, streams are not buffered,
//! every exchange becomes a record, and failures are answered and recorded.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;

use bytes::Bytes;
use custody_config::Provider;
use custody_tests::*;
use http_body_util::BodyExt;
use serde_json::{json, Value};

const CHAT_RESPONSE: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_1","choices":[{"index":0,"message":{"role":"assistant","content":"Paris."},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}"#;

fn openai(up: &MockUpstream) -> custody_config::Route {
    route("openai", "/v1/", &up.url(), Provider::Openai, false)
}

#[tokio::test]
async fn plain_json_is_forwarded_byte_for_byte_and_recorded() {
    let mut up = MockUpstream::start(|_, _| {
        respond(
            200,
            &[
                ("content-type", "application/json"),
                ("x-request-id", "req_123"),
                ("x-ratelimit-remaining-requests", "99"),
                ("openai-processing-ms", "7"),
            ],
            CHAT_RESPONSE,
        )
    })
    .await;
    let custody = Custody::start(vec![openai(&up)]).await;
    // Odd spacing and key order must survive: custody never re-serializes.
    let body = r#"{"model": "gpt-4o",   "temperature":0.2,"max_tokens":64,"top_p":0.9,"messages":[{"role":"user","content":"Capital of France?"}]}"#;
    let req = post(
        &custody.url("/v1/chat/completions?trace=1&x=%20y"),
        &[
            ("content-type", "application/json"),
            (
                "authorization",
                "Bearer sk-test-credential-0123456789abcdef",
            ),
            ("x-custom", "kept"),
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "dropped"),
            ("x-forwarded-for", "203.0.113.9"),
        ],
        body,
    );
    let (parts, got) = send(&client(), req).await;

    assert_eq!(parts.status, 200);
    assert_eq!(got, CHAT_RESPONSE.as_bytes());
    assert_eq!(parts.headers["x-request-id"], "req_123");
    assert_eq!(parts.headers["x-ratelimit-remaining-requests"], "99");
    assert_eq!(parts.headers["openai-processing-ms"], "7");

    let seen = up.next().await;
    assert_eq!(seen.parts.method, "POST");
    assert_eq!(
        seen.parts.uri.path_and_query().unwrap().as_str(),
        "/v1/chat/completions?trace=1&x=%20y"
    );
    assert_eq!(seen.body, body.as_bytes());
    let h = &seen.parts.headers;
    assert_eq!(
        h["authorization"],
        "Bearer sk-test-credential-0123456789abcdef"
    );
    assert_eq!(h["x-custom"], "kept");
    assert_eq!(h["host"], up.addr.to_string());
    assert_eq!(h["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert!(h.get("x-hop").is_none());
    assert!(h
        .get("connection")
        .is_none_or(|v| !v.to_str().unwrap().contains("x-hop")));

    let done = custody.stop().await;
    let r = done.one();
    assert_eq!(r["schema"], "custody.record/v1");
    assert_eq!(r["seq"], 2, "seq 1 is the start config event");
    assert_eq!(r["route"], "openai");
    assert_eq!(r["outcome"], "ok");
    assert_eq!(r["http"]["method"], "POST");
    assert_eq!(r["http"]["path"], "/v1/chat/completions");
    assert_eq!(r["http"]["status"], 200);
    assert_eq!(r["http"]["request_bytes"], body.len());
    assert_eq!(r["http"]["response_bytes"], CHAT_RESPONSE.len());
    assert_eq!(r["http"]["request_id"], "req_123");
    assert_eq!(r["gen_ai"]["provider"]["name"], "openai");
    assert_eq!(r["gen_ai"]["operation"]["name"], "chat");
    assert_eq!(r["gen_ai"]["request"]["model"], "gpt-4o");
    assert_eq!(r["gen_ai"]["request"]["temperature"], 0.2);
    assert_eq!(r["gen_ai"]["request"]["max_tokens"], 64);
    assert_eq!(r["gen_ai"]["request"]["top_p"], 0.9);
    assert_eq!(r["gen_ai"]["response"]["model"], "gpt-4o-2024-08-06");
    assert_eq!(r["gen_ai"]["response"]["id"], "chatcmpl-1");
    assert_eq!(r["gen_ai"]["response"]["finish_reasons"], json!(["stop"]));
    assert_eq!(r["gen_ai"]["usage"]["input_tokens"], 9);
    assert_eq!(r["gen_ai"]["usage"]["output_tokens"], 2);
    assert_eq!(
        r["request"]["body"]["messages"][0]["content"],
        "Capital of France?"
    );
    assert_eq!(
        r["response"]["body"]["choices"][0]["message"]["content"],
        "Paris."
    );
    assert!(r["client"]["key_id"].as_str().unwrap().starts_with("key_"));
    assert!(r["client"]["addr"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    assert!(r["time"]["start"].as_str().unwrap().ends_with('Z'));
    assert!(r["time"]["duration_ms"].as_f64().unwrap() >= r["time"]["ttfb_ms"].as_f64().unwrap());
    // The trail starts with the config event; the record links to it.
    assert_eq!(done.trail[0]["event"]["type"], "config");
    assert_eq!(done.trail[0]["chain"]["prev"], "0".repeat(64));
    assert_eq!(r["chain"]["prev"], done.trail[0]["chain"]["hash"]);
    assert_eq!(r["chain"]["hash"].as_str().unwrap().len(), 64);
    let bytes = all_audit_bytes(&done.audit_dir());
    assert!(!contains(&bytes, "sk-test-credential-0123456789abcdef"));
    custody_audit::review::verify::verify_dir(&done.audit_dir(), None, |_, _, _| {}).unwrap();
}

#[tokio::test]
async fn the_same_credential_gets_the_same_key_id_and_others_differ() {
    let up =
        MockUpstream::start(|_, _| respond(200, &[("content-type", "application/json")], "{}"))
            .await;
    let custody = Custody::start(vec![openai(&up)]).await;
    let c = client();
    for key in [
        "sk-alpha-000000000000000000",
        "sk-alpha-000000000000000000",
        "sk-beta-1111111111111111111",
    ] {
        let auth = format!("Bearer {key}");
        send(
            &c,
            post(
                &custody.url("/v1/embeddings"),
                &[("authorization", &auth)],
                "{}",
            ),
        )
        .await;
    }
    send(
        &c,
        post(
            &custody.url("/v1/embeddings"),
            &[("x-api-key", "sk-alpha-000000000000000000")],
            "{}",
        ),
    )
    .await;
    let done = custody.stop().await;
    let ids: Vec<&str> = done
        .records
        .iter()
        .map(|r| r["client"]["key_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids[0], ids[1]);
    assert_ne!(ids[0], ids[2]);
    assert_eq!(ids[0], ids[3]);
    assert_eq!(
        done.seqs(),
        vec![2, 3, 4, 5],
        "seq 1 is the start config event"
    );
}

fn sse_body(events: &[(&str, &str)]) -> String {
    events
        .iter()
        .map(|(e, d)| {
            if e.is_empty() {
                format!("data: {d}\n\n")
            } else {
                format!("event: {e}\ndata: {d}\n\n")
            }
        })
        .collect()
}

/// Streams `body` from the upstream in three-event chunks and returns what the client got.
async fn stream_through(
    path: &str,
    routes_for: impl Fn(&MockUpstream) -> custody_config::Route,
    body: String,
) -> (Bytes, Stopped) {
    let chunks: Vec<Bytes> = body
        .split_inclusive("\n\n")
        .map(|s| Bytes::from(s.to_owned()))
        .collect();
    let (tx, handler) = one_stream(&[("content-type", "text/event-stream")]);
    let up = MockUpstream::start(handler).await;
    let custody = Custody::start(vec![routes_for(&up)]).await;
    let feeder = tokio::spawn(async move {
        for c in chunks {
            tx.send(Ok(c)).await.unwrap();
        }
    });
    let (parts, got) = send(
        &client(),
        post(
            &custody.url(path),
            &[("content-type", "application/json")],
            r#"{"model":"m","stream":true}"#,
        ),
    )
    .await;
    feeder.await.unwrap();
    assert_eq!(parts.status, 200);
    assert_eq!(parts.headers["content-type"], "text/event-stream");
    (got, custody.stop().await)
}

#[tokio::test]
async fn openai_chat_stream_is_reassembled_with_tool_calls_and_usage() {
    let body = sse_body(&[
        (
            "",
            r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-2024-08-06","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#,
        ),
        (
            "",
            r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-2024-08-06","choices":[{"index":0,"delta":{"content":"Let me check."},"finish_reason":null}]}"#,
        ),
        (
            "",
            r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-2024-08-06","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_9","type":"function","function":{"name":"get_weather","arguments":""}}]},"finish_reason":null}]}"#,
        ),
        (
            "",
            r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-2024-08-06","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"city\":"}}]},"finish_reason":null}]}"#,
        ),
        (
            "",
            r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-2024-08-06","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\"Oslo\"}"}}]},"finish_reason":"tool_calls"}]}"#,
        ),
        (
            "",
            r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-2024-08-06","choices":[],"usage":{"prompt_tokens":20,"completion_tokens":9,"total_tokens":29}}"#,
        ),
        ("", "[DONE]"),
    ]);
    let (got, done) = stream_through(
        "/v1/chat/completions",
        |u| route("openai", "/v1/", &u.url(), Provider::Openai, false),
        body.clone(),
    )
    .await;
    assert_eq!(got, body.as_bytes());
    let r = done.one();
    assert_eq!(r["response"]["streamed"], true);
    let msg = &r["response"]["body"]["choices"][0]["message"];
    assert_eq!(msg["content"], "Let me check.");
    assert_eq!(msg["tool_calls"][0]["id"], "call_9");
    assert_eq!(msg["tool_calls"][0]["function"]["name"], "get_weather");
    assert_eq!(
        msg["tool_calls"][0]["function"]["arguments"],
        r#"{"city":"Oslo"}"#
    );
    assert_eq!(r["gen_ai"]["request"]["stream"], true);
    assert_eq!(
        r["gen_ai"]["response"]["finish_reasons"],
        json!(["tool_calls"])
    );
    assert_eq!(r["gen_ai"]["usage"]["output_tokens"], 9);
    assert!(r["time"]["first_chunk_ms"].as_f64().is_some());
}

#[tokio::test]
async fn responses_api_stream_records_the_completed_response() {
    let body = sse_body(&[
        (
            "response.created",
            r#"{"type":"response.created","response":{"id":"resp_1","status":"in_progress","model":"gpt-4.1-2025-04-14","output":[]}}"#,
        ),
        (
            "response.output_text.delta",
            r#"{"type":"response.output_text.delta","item_id":"m1","output_index":0,"content_index":0,"delta":"Hi"}"#,
        ),
        (
            "response.completed",
            r#"{"type":"response.completed","response":{"id":"resp_1","status":"completed","model":"gpt-4.1-2025-04-14","output":[{"type":"message","role":"assistant","content":[{"type":"output_text","text":"Hi"}]}],"usage":{"input_tokens":4,"output_tokens":1,"total_tokens":5}}}"#,
        ),
    ]);
    let (got, done) = stream_through(
        "/v1/responses",
        |u| route("openai", "/v1/", &u.url(), Provider::Openai, false),
        body.clone(),
    )
    .await;
    assert_eq!(got, body.as_bytes());
    let r = done.one();
    assert_eq!(r["gen_ai"]["operation"]["name"], "responses");
    assert_eq!(r["response"]["body"]["status"], "completed");
    assert_eq!(
        r["response"]["body"]["output"][0]["content"][0]["text"],
        "Hi"
    );
    assert_eq!(r["gen_ai"]["response"]["model"], "gpt-4.1-2025-04-14");
    assert_eq!(r["gen_ai"]["usage"]["input_tokens"], 4);
}

#[tokio::test]
async fn anthropic_stream_behind_a_stripped_prefix_is_reassembled() {
    let body = sse_body(&[
        (
            "message_start",
            r#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","content":[],"stop_reason":null,"usage":{"input_tokens":15,"output_tokens":1}}}"#,
        ),
        (
            "content_block_start",
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
        ),
        ("ping", r#"{"type":"ping"}"#),
        (
            "content_block_delta",
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Bonjour"}}"#,
        ),
        (
            "content_block_stop",
            r#"{"type":"content_block_stop","index":0}"#,
        ),
        (
            "content_block_start",
            r#"{"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_1","name":"lookup","input":{}}}"#,
        ),
        (
            "content_block_delta",
            r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"q\": \"x\"}"}}"#,
        ),
        (
            "content_block_stop",
            r#"{"type":"content_block_stop","index":1}"#,
        ),
        (
            "message_delta",
            r#"{"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":12}}"#,
        ),
        ("message_stop", r#"{"type":"message_stop"}"#),
    ]);
    let (got, done) = stream_through(
        "/anthropic/v1/messages",
        |u| {
            route(
                "anthropic",
                "/anthropic/",
                &u.url(),
                Provider::Anthropic,
                true,
            )
        },
        body.clone(),
    )
    .await;
    assert_eq!(got, body.as_bytes());
    let r = done.one();
    assert_eq!(r["http"]["path"], "/anthropic/v1/messages");
    assert_eq!(r["http"]["upstream_path"], "/v1/messages");
    assert_eq!(r["gen_ai"]["provider"]["name"], "anthropic");
    let m = &r["response"]["body"];
    assert_eq!(m["content"][0]["text"], "Bonjour");
    assert_eq!(m["content"][1]["input"], json!({"q": "x"}));
    assert_eq!(m["stop_reason"], "tool_use");
    assert_eq!(r["gen_ai"]["usage"]["input_tokens"], 15);
    assert_eq!(r["gen_ai"]["usage"]["output_tokens"], 12);
    assert_eq!(
        r["gen_ai"]["response"]["finish_reasons"],
        json!(["tool_use"])
    );
}

#[tokio::test]
async fn gzip_answers_pass_compressed_and_are_recorded_decoded() {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(CHAT_RESPONSE.as_bytes()).unwrap();
    let compressed = Bytes::from(gz.finish().unwrap());
    let sent = compressed.clone();
    let up = MockUpstream::start(move |_, _| {
        respond(
            200,
            &[
                ("content-type", "application/json"),
                ("content-encoding", "gzip"),
            ],
            sent.clone(),
        )
    })
    .await;
    let custody = Custody::start(vec![openai(&up)]).await;
    let (parts, got) = send(
        &client(),
        post(
            &custody.url("/v1/chat/completions"),
            &[("accept-encoding", "gzip")],
            r#"{"model":"gpt-4o"}"#,
        ),
    )
    .await;
    assert_eq!(parts.headers["content-encoding"], "gzip");
    assert_eq!(got, compressed);
    let done = custody.stop().await;
    let r = done.one();
    assert_eq!(
        r["response"]["body"]["choices"][0]["message"]["content"],
        "Paris."
    );
    assert_eq!(r["http"]["response_bytes"], compressed.len());
    assert_eq!(r["gen_ai"]["usage"]["input_tokens"], 9);
}

/// Custody in front of an upstream whose one streamed answer the test feeds chunk by
/// chunk; returns the feeder, custody, and the response body as the client gets it.
async fn open_stream(
    tweak: impl FnOnce(&mut custody_config::Config),
) -> (ChunkSender, Custody, hyper::body::Incoming) {
    let (tx, handler) = one_stream(&[("content-type", "text/event-stream")]);
    let up = MockUpstream::start(handler).await;
    let custody = Custody::start_with(vec![openai(&up)], tweak).await;
    let req = post(
        &custody.url("/v1/chat/completions"),
        &[],
        r#"{"model":"gpt-4o","stream":true}"#,
    );
    let resp = client().request(req).await.unwrap();
    (tx, custody, resp.into_body())
}

#[tokio::test]
async fn streaming_is_not_buffered() {
    let (tx, custody, mut body) = open_stream(|_| {}).await;
    // Each chunk must reach the client while the upstream still holds the next one back.
    for i in 0..5 {
        let chunk = Bytes::from(format!("data: {{\"n\":{i}}}\n\n"));
        tx.send(Ok(chunk.clone())).await.unwrap();
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), chunk);
    }
    drop(tx);
    assert!(body.frame().await.is_none());
    let done = custody.stop().await;
    assert_eq!(done.one()["outcome"], "ok");
}

#[tokio::test]
async fn a_client_that_disconnects_mid_stream_is_recorded_as_cancelled() {
    let (tx, custody, mut body) = open_stream(|_| {}).await;
    let first = Bytes::from_static(
        b"data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"partial\"}}]}\n\n",
    );
    tx.send(Ok(first.clone())).await.unwrap();
    assert_eq!(
        body.frame().await.unwrap().unwrap().into_data().unwrap(),
        first
    );
    drop(body);
    // Custody lets go of the upstream once the client is gone: the feeder then fails.
    let mut sent = 0;
    while tx
        .send(Ok(Bytes::from_static(b"data: {}\n\n")))
        .await
        .is_ok()
    {
        sent += 1;
        assert!(
            sent < 100_000,
            "custody kept reading from the upstream after the client left"
        );
        tokio::task::yield_now().await;
    }
    let done = custody.stop().await;
    let r = done.one();
    assert_eq!(r["outcome"], "client_cancelled");
    assert_eq!(
        r["response"]["body"]["choices"][0]["message"]["content"],
        "partial"
    );
}

#[tokio::test]
async fn a_broken_upstream_stream_is_recorded_as_upstream_error() {
    let (tx, custody, mut body) = open_stream(|_| {}).await;
    tx.send(Ok(Bytes::from_static(b"data: {\"id\":\"x\"}\n\n")))
        .await
        .unwrap();
    assert!(body.frame().await.unwrap().is_ok());
    tx.send(Err(std::io::Error::other("upstream broke")))
        .await
        .unwrap();
    // The client sees the stream end abnormally rather than a clean end.
    let mut errored = false;
    while let Some(f) = body.frame().await {
        if f.is_err() {
            errored = true;
            break;
        }
    }
    assert!(errored);
    let done = custody.stop().await;
    let r = done.one();
    assert_eq!(r["outcome"], "upstream_error");
    assert!(r["error"].as_str().unwrap().contains("upstream body"));
}

#[tokio::test]
async fn unknown_paths_get_404_and_are_never_relayed() {
    let mut up = MockUpstream::start(|_, _| respond(200, &[], "should not be reached")).await;
    let custody = Custody::start(vec![openai(&up)]).await;
    let (parts, body) = send(&client(), post(&custody.url("/admin/secrets"), &[], "{}")).await;
    assert_eq!(parts.status, 404);
    assert_eq!(parts.headers["content-type"], "application/json");
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["code"], "no_route");
    let done = custody.stop().await;
    let r = done.one();
    assert_eq!(r["outcome"], "rejected");
    assert_eq!(r["http"]["status"], 404);
    assert!(r.get("route").is_none());
    assert!(up.requests.try_recv().is_err());
}

#[tokio::test]
async fn unreachable_upstream_gets_502_and_a_record() {
    // A port that was just free: nothing listens there.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let custody = Custody::start(vec![route(
        "anthropic",
        "/anthropic/",
        &format!("http://{closed}"),
        Provider::Anthropic,
        true,
    )])
    .await;
    let (parts, body) = send(
        &client(),
        post(
            &custody.url("/anthropic/v1/messages"),
            &[],
            r#"{"model":"claude","messages":[{"role":"user","content":"is anyone there? mail me at bob@example.com"}]}"#,
        ),
    )
    .await;
    assert_eq!(parts.status, 502);
    let v: Value = serde_json::from_slice(&body).unwrap();
    // In Anthropic's error shape, so its SDK raises a proper error.
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "api_error");
    let done = custody.stop().await;
    let r = done.one();
    assert_eq!(r["outcome"], "upstream_error");
    assert_eq!(r["http"]["status"], 502);
    // Nothing upstream read the body; custody read it back, so the record holds the
    // prompt that was attempted (redacted like any other).
    assert_eq!(r["gen_ai"]["request"]["model"], "claude");
    assert_eq!(
        r["request"]["body"]["messages"][0]["content"],
        "is anyone there? mail me at [EMAIL_ADDRESS]"
    );
    assert_eq!(r["http"]["upstream_path"], "/v1/messages");
}

#[tokio::test]
async fn a_silent_upstream_gets_504_and_a_record() {
    // Accepts connections and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let custody = Custody::start_with(
        vec![route(
            "openai",
            "/v1/",
            &format!("http://{addr}"),
            Provider::Openai,
            false,
        )],
        |c| {
            c.upstream.response_timeout_secs = 1;
        },
    )
    .await;
    let (parts, _) = send(
        &client(),
        post(&custody.url("/v1/chat/completions"), &[], "{}"),
    )
    .await;
    assert_eq!(parts.status, 504);
    let done = custody.stop().await;
    assert_eq!(done.one()["outcome"], "upstream_timeout");
    holder.abort();
}

#[tokio::test]
async fn rate_limits_pass_through_untouched() {
    let up = MockUpstream::start(|_, _| {
        respond(
            429,
            &[("content-type", "application/json"), ("retry-after", "17"), ("x-ratelimit-reset-requests", "17s")],
            r#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#,
        )
    })
    .await;
    let custody = Custody::start(vec![openai(&up)]).await;
    let (parts, body) = send(
        &client(),
        post(
            &custody.url("/v1/chat/completions"),
            &[],
            r#"{"model":"gpt-4o"}"#,
        ),
    )
    .await;
    assert_eq!(parts.status, 429);
    assert_eq!(parts.headers["retry-after"], "17");
    assert_eq!(parts.headers["x-ratelimit-reset-requests"], "17s");
    assert!(body.starts_with(b"{\"error\""));
    let done = custody.stop().await;
    let r = done.one();
    assert_eq!(r["http"]["status"], 429);
    assert_eq!(r["outcome"], "ok");
    assert_eq!(
        r["response"]["body"]["error"]["code"],
        "rate_limit_exceeded"
    );
}

#[tokio::test]
async fn http2_clients_are_served() {
    let mut up = MockUpstream::start(|_, _| {
        respond(200, &[("content-type", "application/json")], CHAT_RESPONSE)
    })
    .await;
    let custody = Custody::start(vec![openai(&up)]).await;
    let (parts, body) = send(
        &h2_client(),
        post(
            &custody.url("/v1/chat/completions"),
            &[],
            r#"{"model":"gpt-4o"}"#,
        ),
    )
    .await;
    assert_eq!(parts.status, 200);
    assert_eq!(parts.version, http::Version::HTTP_2);
    assert_eq!(body, CHAT_RESPONSE.as_bytes());
    assert_eq!(up.next().await.body, r#"{"model":"gpt-4o"}"#.as_bytes());
    let done = custody.stop().await;
    assert_eq!(done.one()["outcome"], "ok");
}

#[tokio::test]
async fn bodies_past_the_capture_cap_are_forwarded_whole_and_recorded_truncated() {
    let big = "x".repeat(100_000);
    let sent = big.clone();
    let mut up = MockUpstream::start(move |_, _| {
        respond(200, &[("content-type", "text/plain")], sent.clone())
    })
    .await;
    let custody =
        Custody::start_with(vec![openai(&up)], |c| c.audit.capture_max_bytes = 1024).await;
    let prompt = format!(
        "{{\"model\":\"gpt-4o\",\"input\":\"{}\"}}",
        "y".repeat(50_000)
    );
    let (_, body) = send(
        &client(),
        post(&custody.url("/v1/embeddings"), &[], prompt.clone()),
    )
    .await;
    assert_eq!(body.len(), big.len());
    assert_eq!(up.next().await.body.len(), prompt.len());
    let done = custody.stop().await;
    let r = done.one();
    assert_eq!(r["http"]["request_bytes"], prompt.len());
    assert_eq!(r["http"]["response_bytes"], big.len());
    assert_eq!(r["request"]["truncated"], true);
    assert_eq!(r["response"]["truncated"], true);
    assert_eq!(r["response"]["body"].as_str().unwrap().len(), 1024);
}

#[tokio::test]
async fn no_pii_or_secret_reaches_the_audit_dir() {
    let secrets = [
        "jane.doe@example.com",
        "4111 1111 1111 1111",
        "4111111111111111",
        "5555-5555-5555-4444",
        "123-45-6789",
        "sk-proj-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789",
        "sk-ant-api03-AbCdEfGhIjKlMnOpQrStUvWxYz0123",
        "AKIAIOSFODNN7EXAMPLE",
        "ghp_abcdefghijklmnopqrstuvwxyz0123456789",
        "client-credential-that-looks-like-nothing",
    ];
    let up = MockUpstream::start(|_, body| {
        // Echo the prompt back, as models do.
        let v: Value = serde_json::from_slice(body).unwrap();
        let text = v["messages"][0]["content"].as_str().unwrap().to_owned();
        let resp = json!({"id":"c","model":"gpt-4o","choices":[{"index":0,"message":{"role":"assistant","content":text},"finish_reason":"stop"}]});
        respond(200, &[("content-type", "application/json")], resp.to_string())
    })
    .await;
    let custody = Custody::start(vec![openai(&up)]).await;
    let prompt = format!(
        "Mail {} card {} or {} or {}, SSN {}. Keys: {} {} {} {}. Also {}.",
        secrets[0],
        secrets[1],
        secrets[2],
        secrets[3],
        secrets[4],
        secrets[5],
        secrets[6],
        secrets[7],
        secrets[8],
        secrets[9]
    );
    let body =
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": prompt}]}).to_string();
    let c = client();
    // The last secret is this request's own credential: no detector knows its format.
    send(
        &c,
        post(
            &custody.url("/v1/chat/completions?key=AIzaSyA1234567890abcdefghijklmnopqrstu"),
            &[(
                "authorization",
                "Bearer client-credential-that-looks-like-nothing",
            )],
            body,
        ),
    )
    .await;
    let second = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": format!("again {}", secrets[0])}]}).to_string();
    send(
        &c,
        post(
            &custody.url("/v1/chat/completions"),
            &[("x-api-key", "sk-ant-api03-AbCdEfGhIjKlMnOpQrStUvWxYz0123")],
            second,
        ),
    )
    .await;
    let done = custody.stop().await;
    let all = all_audit_bytes(&done.audit_dir());
    for s in secrets
        .iter()
        .chain(["AIzaSyA1234567890abcdefghijklmnopqrstu"].iter())
    {
        assert!(!contains(&all, s), "`{s}` reached the audit dir");
    }
    let r = &done.records[0];
    let red = &r["redactions"];
    assert!(red["EMAIL_ADDRESS"].as_u64().unwrap() >= 2, "{red}");
    assert!(red["CREDIT_CARD"].as_u64().unwrap() >= 6, "{red}");
    assert!(red["CLIENT_CREDENTIAL"].as_u64().unwrap() >= 1, "{red}");
    assert!(r["request"]["body"]["messages"][0]["content"]
        .as_str()
        .unwrap()
        .contains("[EMAIL_ADDRESS]"));
}

#[tokio::test]
async fn shutdown_lets_an_in_flight_stream_finish() {
    let (tx, mut custody, mut body) = open_stream(|_| {}).await;
    tx.send(Ok(Bytes::from_static(b"data: {\"n\":1}\n\n")))
        .await
        .unwrap();
    assert!(body.frame().await.unwrap().is_ok());
    custody.signal_stop();
    tx.send(Ok(Bytes::from_static(b"data: {\"n\":2}\n\n")))
        .await
        .unwrap();
    drop(tx);
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, Bytes::from_static(b"data: {\"n\":2}\n\n"));
    let done = custody.stop().await;
    let r = done.one();
    assert_eq!(r["outcome"], "ok");
    assert_eq!(r["http"]["response_bytes"], 30);
}

#[tokio::test]
async fn a_stream_still_open_when_the_grace_ends_is_cut_and_still_recorded() {
    let (tx, custody, mut body) = open_stream(|c| c.listen.shutdown_grace_secs = 1).await;
    tx.send(Ok(Bytes::from_static(b"data: {\"n\":1}\n\n")))
        .await
        .unwrap();
    assert!(body.frame().await.unwrap().is_ok());
    let done = custody.stop().await;
    let r = done.one();
    assert_eq!(r["outcome"], "client_cancelled");
    assert_eq!(r["http"]["response_bytes"], 15);
    assert_eq!(done.summary.dropped, 0);
    drop(tx);
}

#[tokio::test]
async fn upstream_certificates_are_verified() {
    // An HTTPS upstream with a self-signed certificate: custody must refuse to talk to it.
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der()).unwrap();
    let tls = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.cert.der().clone()], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (handshakes_tx, mut handshakes) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let _ = handshakes_tx.send(acceptor.accept(s).await.is_ok());
        }
    });
    let custody = Custody::start(vec![route(
        "openai",
        "/v1/",
        &format!("https://localhost:{port}"),
        Provider::Openai,
        false,
    )])
    .await;
    let (parts, _) = send(
        &client(),
        post(&custody.url("/v1/chat/completions"), &[], "{}"),
    )
    .await;
    assert_eq!(parts.status, 502);
    assert_eq!(
        handshakes.recv().await,
        Some(false),
        "the handshake must fail"
    );
    let done = custody.stop().await;
    let r = done.one();
    assert_eq!(r["outcome"], "upstream_error");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("certificate"),
        "{}",
        r["error"]
    );
}

#[tokio::test]
async fn binary_and_malformed_bodies_are_recorded_safely() {
    let up = MockUpstream::start(|_, body| {
        if body.starts_with(b"{") {
            respond(
                200,
                &[("content-type", "application/json")],
                "{not json at all",
            )
        } else {
            respond(
                200,
                &[("content-type", "application/octet-stream")],
                vec![0xff, 0xfe, 0x00, 0x80],
            )
        }
    })
    .await;
    let custody = Custody::start(vec![openai(&up)]).await;
    let c = client();
    let (_, got) = send(
        &c,
        post(
            &custody.url("/v1/audio/speech"),
            &[],
            vec![0xc3u8, 0x28, 0xa0, 0xa1],
        ),
    )
    .await;
    assert_eq!(got, vec![0xff, 0xfe, 0x00, 0x80]);
    let (_, got) = send(
        &c,
        post(
            &custody.url("/v1/chat/completions"),
            &[],
            "{\"model\": \"gpt-4o\", \"oops\"",
        ),
    )
    .await;
    assert_eq!(got, "{not json at all");
    let done = custody.stop().await;
    let bin = &done.records[0];
    assert_eq!(bin["request"]["omitted"], "binary");
    assert_eq!(bin["request"]["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(bin["response"]["omitted"], "binary");
    let bad = &done.records[1];
    assert_eq!(bad["request"]["body"], "{\"model\": \"gpt-4o\", \"oops\"");
    assert_eq!(bad["response"]["body"], "{not json at all");
    assert_eq!(bad["outcome"], "ok");
    assert!(bad["gen_ai"]["request"].get("model").is_none());
}

#[tokio::test]
async fn configured_redaction_reaches_the_records() {
    let up =
        MockUpstream::start(|_, _| respond(200, &[("content-type", "application/json")], "{}"))
            .await;
    let custody = Custody::start_with(vec![openai(&up)], |c| {
        c.redaction
            .entities
            .insert("EMAIL_ADDRESS".into(), custody_config::Mode::Pseudonymize);
        c.redaction
            .entities
            .insert("IP_ADDRESS".into(), custody_config::Mode::Off);
        c.redaction.allow.push("help@example.com".into());
    })
    .await;
    let c = client();
    for _ in 0..2 {
        let body = r#"{"messages":[{"role":"user","content":"I am jane@example.com at 10.1.2.3, cc help@example.com"}]}"#;
        send(&c, post(&custody.url("/v1/chat/completions"), &[], body)).await;
    }
    let done = custody.stop().await;
    let texts: Vec<&str> = done
        .records
        .iter()
        .map(|r| {
            r["request"]["body"]["messages"][0]["content"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_eq!(
        texts[0], texts[1],
        "the same address gets the same pseudonym"
    );
    assert!(
        texts[0].starts_with("I am [EMAIL_ADDRESS:")
            && texts[0].ends_with("] at 10.1.2.3, cc help@example.com"),
        "{}",
        texts[0]
    );
    assert!(done.audit_dir().join("pseudonym.key").exists());
    assert!(!contains(
        &all_audit_bytes(&done.audit_dir()),
        "jane@example.com"
    ));
}

#[tokio::test]
async fn pretty_printed_json_keeps_its_bytes_upstream_and_one_line_in_the_trail() {
    let mut up = MockUpstream::start(|_, _| {
        respond(
            200,
            &[("content-type", "application/json")],
            "{\n  \"id\": \"c\",\n  \"model\": \"m\"\n}\n",
        )
    })
    .await;
    let custody = Custody::start(vec![openai(&up)]).await;
    let body = "{\n  \"model\": \"gpt-4o\",\n  \"messages\": [\n    {\"role\": \"user\", \"content\": \"line one\\nmail bob@example.com\"}\n  ]\r\n}\n";
    let (_, got) = send(
        &client(),
        post(&custody.url("/v1/chat/completions"), &[], body),
    )
    .await;
    assert_eq!(got, "{\n  \"id\": \"c\",\n  \"model\": \"m\"\n}\n");
    assert_eq!(up.next().await.body, body.as_bytes());
    let done = custody.stop().await;
    let r = done.one();
    assert_eq!(
        r["request"]["body"]["messages"][0]["content"],
        "line one\nmail [EMAIL_ADDRESS]"
    );
    assert_eq!(r["gen_ai"]["request"]["model"], "gpt-4o");
    assert_eq!(r["response"]["body"]["id"], "c");
    custody_audit::review::verify::verify_dir(&done.audit_dir(), None, |_, _, _| {}).unwrap();
}
