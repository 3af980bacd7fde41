//! Running custody in production: what happens when the writer falls behind (each
//! `on_full` policy, with a writer held still), metrics, health and readiness, the admin
//! reload, and a burst cut by shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use custody_config::OnFull;
use custody_tests::*;
use serde_json::Value;

async fn get(url: &str) -> (u16, String) {
    let req = http::Request::get(url)
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let (parts, body) = send(&client(), req).await;
    (
        parts.status.as_u16(),
        String::from_utf8_lossy(&body).into_owned(),
    )
}

const CHAT: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;

/// Custody with a two-slot queue and `policy`, its writer held still.
async fn held(
    policy: OnFull,
    tweak: impl FnOnce(&mut custody_config::Config),
) -> (Custody, MockUpstream) {
    let up = chat_upstream().await;
    let custody = Custody::start_with(vec![openai_route(&up)], |c| {
        c.audit.queue_capacity = 2;
        c.audit.on_full = policy;
        tweak(c);
    })
    .await;
    custody.gate.close();
    (custody, up)
}

/// Fills both slots: two requests that complete but whose records wait.
async fn fill(custody: &Custody) {
    for _ in 0..2 {
        let (parts, _) = send(
            &client(),
            post(&custody.url("/v1/chat/completions"), &[], CHAT),
        )
        .await;
        assert_eq!(parts.status, 200);
    }
    custody
        .until_metric("custody_audit_queue_depth", |v| v == 2.0)
        .await;
}

#[tokio::test]
async fn reject_refuses_with_503_until_the_writer_catches_up() {
    let (custody, _up) = held(OnFull::Reject, |_| {}).await;
    fill(&custody).await;
    let (parts, body) = send(
        &client(),
        post(&custody.url("/v1/chat/completions"), &[], CHAT),
    )
    .await;
    assert_eq!(parts.status, 503);
    assert_eq!(parts.headers["retry-after"], "1");
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["code"], "audit_queue_full");
    let (ready, why) = get(&custody.admin_url("/readyz")).await;
    assert_eq!(ready, 503);
    assert!(why.contains("audit_queue_high_water"), "{why}");
    assert_eq!(custody.metric("custody_audit_rejected_total").await, 1.0);

    custody.gate.open();
    custody
        .until_metric("custody_audit_queue_depth", |v| v == 0.0)
        .await;
    let (parts, _) = send(
        &client(),
        post(&custody.url("/v1/chat/completions"), &[], CHAT),
    )
    .await;
    assert_eq!(parts.status, 200, "room again");
    assert_eq!(get(&custody.admin_url("/readyz")).await.0, 200);
    let done = custody.stop().await;
    assert_eq!(done.records.len(), 3);
    let gap = done.event("gap");
    assert_eq!(gap["event"]["refused"], 1);
    assert_eq!(gap["event"]["unaudited"], 0);
}

#[tokio::test]
async fn drop_lets_traffic_through_and_records_the_gap() {
    let (custody, mut up) = held(OnFull::Drop, |_| {}).await;
    fill(&custody).await;
    for _ in 0..2 {
        up.next().await;
    }
    let (parts, _) = send(
        &client(),
        post(&custody.url("/v1/chat/completions"), &[], CHAT),
    )
    .await;
    assert_eq!(parts.status, 200, "fail open");
    up.next().await;
    assert_eq!(
        custody
            .metric("custody_audit_dropped_total{reason=\"queue_full\"}")
            .await,
        1.0
    );
    custody.gate.open();
    let done = custody.stop().await;
    assert_eq!(done.records.len(), 2, "the third went through unaudited");
    let gap = done.event("gap");
    assert_eq!(gap["event"]["unaudited"], 1);
    assert!(gap["event"]["from"].as_str().unwrap().ends_with('Z'));
    // The gap is in the chain: verify passes and counts it as an event.
    custody_audit::review::verify::verify_dir(&done.audit_dir(), None, |_, _, _| {}).unwrap();
}

#[tokio::test]
async fn backpressure_waits_for_room_then_proceeds() {
    let (custody, _up) = held(OnFull::Backpressure, |c| {
        c.audit.admission_timeout_ms = 60_000
    })
    .await;
    fill(&custody).await;
    let url = custody.url("/v1/chat/completions");
    let waiting = tokio::spawn(async move { send(&client(), post(&url, &[], CHAT)).await });
    custody
        .until_metric("custody_audit_admission_waiting", |v| v == 1.0)
        .await;
    assert!(!waiting.is_finished(), "it waits while the writer is held");
    custody.gate.open();
    let (parts, _) = waiting.await.unwrap();
    assert_eq!(parts.status, 200);
    let done = custody.stop().await;
    assert_eq!(done.records.len(), 3, "nothing lost");
    assert!(done.events.iter().all(|e| e["event"]["type"] != "gap"));
}

#[tokio::test]
async fn backpressure_gives_up_after_its_bound() {
    let (custody, _up) = held(OnFull::Backpressure, |c| c.audit.admission_timeout_ms = 50).await;
    fill(&custody).await;
    let (parts, _) = send(
        &client(),
        post(&custody.url("/v1/chat/completions"), &[], CHAT),
    )
    .await;
    assert_eq!(parts.status, 503);
    custody.gate.open();
    let done = custody.stop().await;
    assert_eq!(done.records.len(), 2);
    let gap = done.event("gap");
    assert_eq!(gap["event"]["refused"], 1);
}

#[tokio::test]
async fn the_queue_is_bounded_in_bytes_too() {
    let up = chat_upstream().await;
    let custody = Custody::start_with(vec![openai_route(&up)], |c| {
        c.audit.queue_max_bytes = 1000;
        c.audit.on_full = OnFull::Reject;
    })
    .await;
    custody.gate.close();
    let big = format!(
        r#"{{"model":"m","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(2000)
    );
    let (parts, _) = send(
        &client(),
        post(&custody.url("/v1/chat/completions"), &[], big),
    )
    .await;
    assert_eq!(parts.status, 200);
    custody
        .until_metric("custody_audit_queue_depth", |v| v == 1.0)
        .await;
    let (parts, _) = send(
        &client(),
        post(&custody.url("/v1/chat/completions"), &[], CHAT),
    )
    .await;
    assert_eq!(
        parts.status, 503,
        "one slot used of many, but the bytes are over"
    );
    custody.gate.open();
    custody.stop().await;
}

#[tokio::test]
async fn metrics_health_and_readiness() {
    let up = MockUpstream::start(|_, _| {
        respond(
            200,
            &[("content-type", "application/json")],
            r#"{"id":"c1","model":"gpt-4o-mini-2024-07-18","choices":[],"usage":{"prompt_tokens":11,"completion_tokens":5}}"#,
        )
    })
    .await;
    let custody = Custody::start(vec![openai_route(&up)]).await;
    assert_eq!(
        get(&custody.admin_url("/healthz")).await,
        (200, "ok\n".into())
    );
    let (status, body) = get(&custody.admin_url("/readyz")).await;
    assert_eq!(status, 200, "{body}");
    let body =
        r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"mail jane@example.com"}]}"#;
    send(
        &client(),
        post(&custody.url("/v1/chat/completions"), &[], body),
    )
    .await;
    send(&client(), post(&custody.url("/nowhere"), &[], "{}")).await;
    // Records are counted by the writer: wait until both are written.
    custody
        .until_metric("custody_audit_records_written_total", |v| v == 3.0)
        .await;
    let (_, text) = get(&custody.admin_url("/metrics")).await;
    for want in [
        "custody_requests_total{route=\"openai\",status_class=\"2xx\",outcome=\"ok\"} 1",
        "custody_requests_total{route=\"none\",status_class=\"4xx\",outcome=\"rejected\"} 1",
        "gen_ai_client_token_usage_total{route=\"openai\",model=\"gpt-4o-mini-2024-07-18\",token_type=\"input\"} 11",
        "gen_ai_client_token_usage_total{route=\"openai\",model=\"gpt-4o-mini-2024-07-18\",token_type=\"output\"} 5",
        "custody_redactions_total{entity=\"EMAIL_ADDRESS\"} 1",
        "custody_audit_queue_depth 0",
        "custody_audit_writer_failing 0",
        "custody_overhead_seconds_count{route=\"openai\"} 1",
        "custody_request_duration_seconds_count{route=\"openai\"} 1",
        "custody_time_to_first_byte_seconds_count{route=\"openai\"} 1",
    ] {
        assert!(text.contains(want), "missing `{want}` in\n{text}");
    }
    assert!(text.contains("# TYPE custody_audit_fsync_seconds histogram"));
    assert!(text.contains("custody_audit_segments"));
    assert!(!text.contains("jane"), "no user data in labels");
    assert_eq!(get(&custody.admin_url("/nope")).await.0, 404);
    custody.stop().await;
}

#[tokio::test]
async fn admin_reload_needs_the_token_and_keeps_a_bad_config_out() {
    let up = chat_upstream().await;
    let custody = Custody::start_with(vec![openai_route(&up)], |c| {
        c.admin.token = Some("admin-secret-token".into());
    })
    .await;
    let reload = |token: Option<&str>| {
        let mut b = http::Request::post(custody.admin_url("/admin/reload"));
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        b.body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap()
    };
    let (parts, _) = send(&client(), reload(None)).await;
    assert_eq!(parts.status, 401);
    let (parts, _) = send(&client(), reload(Some("wrong"))).await;
    assert_eq!(parts.status, 401);
    // "The file" does not load: the running config stays.
    let (parts, body) = send(&client(), reload(Some("admin-secret-token"))).await;
    assert_eq!(parts.status, 422, "{body:?}");
    let mut next = custody.config.clone();
    next.source.insert("service".into(), "reloaded".into());
    *custody.reload_file.lock().unwrap() = Some(next);
    let (parts, body) = send(&client(), reload(Some("admin-secret-token"))).await;
    assert_eq!(parts.status, 200);
    let version: Value = serde_json::from_slice(&body).unwrap();
    send(
        &client(),
        post(&custody.url("/v1/chat/completions"), &[], CHAT),
    )
    .await;
    let done = custody.stop().await;
    assert_eq!(done.records[0]["config"]["version"], version["version"]);
    assert_eq!(done.records[0]["source"]["service"], "reloaded");
    let text = all_audit_bytes(&done.audit_dir());
    assert!(
        !contains(&text, "admin-secret-token"),
        "the token is a secret"
    );
}

#[tokio::test]
async fn without_a_token_admin_endpoints_are_off() {
    let up = chat_upstream().await;
    let custody = Custody::start(vec![openai_route(&up)]).await;
    let req = http::Request::post(custody.admin_url("/admin/reload"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let (parts, _) = send(&client(), req).await;
    assert_eq!(parts.status, 403);
    custody.stop().await;
}

#[tokio::test]
async fn a_burst_cut_by_shutdown_leaves_every_completed_exchange_in_the_trail() {
    let up = chat_upstream().await;
    let mut custody = Custody::start(vec![openai_route(&up)]).await;
    let url = custody.url("/v1/chat/completions");
    let burst: Vec<_> = (0..50)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                let body = format!(r#"{{"model":"m","n":{i}}}"#);
                client()
                    .request(post(&url, &[], body))
                    .await
                    .ok()
                    .map(|r| r.status())
            })
        })
        .collect();
    custody.signal_stop();
    let mut completed = 0;
    for b in burst {
        if b.await.unwrap() == Some(http::StatusCode::OK) {
            completed += 1;
        }
    }
    let done = custody.stop().await;
    let ok = done.records.iter().filter(|r| r["outcome"] == "ok").count();
    assert!(
        ok >= completed,
        "{ok} records for {completed} completed exchanges"
    );
    custody_audit::review::verify::verify_dir(&done.audit_dir(), None, |_, _, _| {}).unwrap();
}

#[tokio::test]
async fn limits_answer_with_clear_errors_and_are_recorded() {
    let up = chat_upstream().await;
    let custody = Custody::start_with(vec![openai_route(&up)], |c| {
        c.limits.max_request_body_bytes = 1000;
        c.limits.max_header_bytes = 2000;
    })
    .await;
    let url = custody.url("/v1/chat/completions");
    // A declared body over the limit.
    let (parts, body) = send(&client(), post(&url, &[], "x".repeat(5000))).await;
    assert_eq!(parts.status, 413);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["code"], "request_too_large");
    // A streamed (chunked) body that grows past it.
    let chunks = futures_util::stream::iter((0..10).map(|_| {
        Ok::<_, std::io::Error>(hyper::body::Frame::data(bytes::Bytes::from(vec![
            b'y';
            500
        ])))
    }));
    let req = http::Request::post(&url)
        .body(http_body_util::StreamBody::new(chunks))
        .unwrap();
    let resp = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http()
        .request(req)
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    // A head over the limit.
    let big = "h".repeat(3000);
    let (parts, _) = send(&client(), post(&url, &[("x-big", &big)], CHAT)).await;
    assert_eq!(parts.status, 431);
    let done = custody.stop().await;
    let codes: Vec<(u64, &str)> = done
        .records
        .iter()
        .map(|r| {
            (
                r["http"]["status"].as_u64().unwrap(),
                r["error"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(codes.len(), 3, "{codes:?}");
    assert_eq!(codes[0], (413, "request_too_large"));
    assert_eq!(codes[1].0, 413);
    assert!(
        codes[1].1.contains("request body exceeds 1000 bytes"),
        "{codes:?}"
    );
    assert_eq!(codes[2], (431, "headers_too_large"));
}

/// Custody in front of an SSE upstream the test feeds, and the open response.
async fn open_stream(
    tweak: impl FnOnce(&mut custody_config::Config),
) -> (ChunkSender, Custody, http::Response<hyper::body::Incoming>) {
    let (tx, handler) = one_stream(&[("content-type", "text/event-stream")]);
    let up = MockUpstream::start(handler).await;
    let custody = Custody::start_with(vec![openai_route(&up)], tweak).await;
    let resp = client()
        .request(post(&custody.url("/v1/chat/completions"), &[], CHAT))
        .await
        .unwrap();
    (tx, custody, resp)
}

#[tokio::test]
async fn a_stalled_upstream_stream_times_out_and_is_recorded() {
    let (tx, custody, resp) = open_stream(|c| c.upstream.idle_timeout_secs = 1).await;
    tx.send(Ok(bytes::Bytes::from_static(b"data: {\"id\":\"x\"}\n\n")))
        .await
        .unwrap();
    // Then silence: custody cuts the stream after a second of it.
    let collected = http_body_util::BodyExt::collect(resp.into_body()).await;
    assert!(
        collected.is_err(),
        "the client sees the stream end abnormally"
    );
    let done = custody.stop().await;
    let r = done.one();
    assert_eq!(r["outcome"], "upstream_timeout");
    assert!(r["error"]
        .as_str()
        .unwrap()
        .contains("upstream idle for more than 1s"));
    drop(tx);
}

#[tokio::test]
async fn connections_past_the_limit_get_503s_that_are_recorded() {
    let up = chat_upstream().await;
    let custody = Custody::start_with(vec![openai_route(&up)], |c| {
        c.limits.max_connections = 1;
    })
    .await;
    // One connection held open (HTTP/2 keeps it), a second one beyond the limit.
    let first = h2_client();
    let (parts, _) = send(
        &first,
        post(&custody.url("/v1/chat/completions"), &[], CHAT),
    )
    .await;
    assert_eq!(parts.status, 200);
    let second = h2_client();
    let (parts, body) = send(
        &second,
        post(&custody.url("/v1/chat/completions"), &[], CHAT),
    )
    .await;
    assert_eq!(parts.status, 503);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["code"], "too_many_connections");
    drop((first, second));
    let done = custody.stop().await;
    assert_eq!(done.records.len(), 2);
    assert_eq!(done.records[1]["error"], "too_many_connections");
}

#[tokio::test]
async fn durable_responses_end_only_once_their_record_is_fsynced() {
    let up = chat_upstream().await;
    let custody = Custody::start_with(vec![openai_route(&up)], |c| {
        c.audit.durability = custody_config::Durability::Durable;
    })
    .await;
    custody.gate.close();
    let url = custody.url("/v1/chat/completions");
    let pending = tokio::spawn(async move { send(&client(), post(&url, &[], CHAT)).await });
    // The exchange reached the writer, which is held: its record is not on disk yet.
    custody
        .until_metric("custody_audit_queue_depth", |v| v == 1.0)
        .await;
    assert!(
        !pending.is_finished(),
        "the response must wait for its record"
    );
    custody.gate.open();
    let (parts, body) = pending.await.unwrap();
    assert_eq!(parts.status, 200);
    assert!(
        body.ends_with(b"}"),
        "the whole body arrives once the record is durable"
    );
    let done = custody.stop().await;
    assert_eq!(done.one()["outcome"], "ok");
}

#[tokio::test]
async fn an_exchange_past_its_total_limit_is_cut_and_recorded() {
    let (tx, custody, resp) = open_stream(|c| c.upstream.total_timeout_secs = 1).await;
    // A stream that keeps trickling, never idle, never done.
    let feeder = tokio::spawn(async move {
        while tx
            .send(Ok(bytes::Bytes::from_static(b": keep-alive\n\n")))
            .await
            .is_ok()
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    assert!(http_body_util::BodyExt::collect(resp.into_body())
        .await
        .is_err());
    feeder.abort();
    let done = custody.stop().await;
    let r = done.one();
    assert_eq!(r["outcome"], "upstream_timeout");
    assert!(
        r["error"].as_str().unwrap().contains("longer than 1s"),
        "{r}"
    );
}

#[tokio::test]
async fn a_client_that_stops_sending_its_body_gets_408() {
    let up = chat_upstream().await;
    let custody = Custody::start_with(vec![openai_route(&up)], |c| {
        c.limits.client_timeout_secs = 1;
    })
    .await;
    let (body_tx, body_rx) =
        tokio::sync::mpsc::channel::<Result<hyper::body::Frame<bytes::Bytes>, std::io::Error>>(1);
    let stream = Box::pin(futures_util::stream::unfold(body_rx, |mut rx| async move {
        rx.recv().await.map(|f| (f, rx))
    }));
    let req = http::Request::post(custody.url("/v1/chat/completions"))
        .body(http_body_util::StreamBody::new(stream))
        .unwrap();
    body_tx
        .send(Ok(hyper::body::Frame::data(bytes::Bytes::from_static(
            b"{\"model\":",
        ))))
        .await
        .unwrap();
    // ...and then nothing more.
    let resp = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http()
        .request(req)
        .await
        .unwrap();
    assert_eq!(resp.status(), 408);
    drop(body_tx);
    let done = custody.stop().await;
    let r = done.one();
    assert_eq!(r["http"]["status"], 408);
    assert!(r["error"].as_str().unwrap().contains("client idle"), "{r}");
}

#[tokio::test]
async fn an_exchange_in_flight_during_a_reload_keeps_the_config_it_started_with() {
    let (tx, custody, resp) = open_stream(|_| {}).await;
    let mut next = custody.config.clone();
    next.source.insert("service".into(), "after".into());
    let new_version = custody.reload(next).await.unwrap();
    tx.send(Ok(bytes::Bytes::from_static(b"data: [DONE]\n\n")))
        .await
        .unwrap();
    drop(tx);
    let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
    let done = custody.stop().await;
    let r = done.one();
    assert_ne!(r["config"]["version"], new_version.as_str());
    let start = done
        .events
        .iter()
        .find(|e| e["event"]["reason"] == "start")
        .unwrap();
    assert_eq!(r["config"]["version"], start["event"]["version"]);
}

#[cfg(unix)]
#[tokio::test]
async fn audit_files_are_private_to_custody() {
    use std::os::unix::fs::PermissionsExt;
    let up = chat_upstream().await;
    let custody = Custody::start_with(vec![openai_route(&up)], |c| {
        c.audit.segment_max_bytes = 1;
    })
    .await;
    for _ in 0..2 {
        send(
            &client(),
            post(&custody.url("/v1/chat/completions"), &[], CHAT),
        )
        .await;
    }
    let done = custody.stop().await;
    let dir = done.audit_dir();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    let mut kinds = std::collections::BTreeSet::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        kinds.insert(
            p.extension()
                .map(|x| x.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        assert_eq!(mode(&p), 0o600, "{}", p.display());
    }
    for k in ["seg", "idx", "key", "log", "json"] {
        assert!(kinds.contains(k), "no .{k} file to check: {kinds:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_drained_at_shutdown_is_cut_into_blocks_of_the_usual_size() {
    let up = chat_upstream().await;
    let custody = Custody::start_with(vec![openai_route(&up)], |c| {
        c.audit.queue_capacity = 1000;
    })
    .await;
    custody.gate.close();
    let body = format!(
        "{{\"model\":\"m\",\"messages\":[{{\"role\":\"user\",\"content\":\"{}\"}}]}}",
        "words of a longer prompt ".repeat(80)
    );
    for _ in 0..600 {
        let (parts, _) = send(
            &client(),
            post(&custody.url("/v1/chat/completions"), &[], body.clone()),
        )
        .await;
        assert_eq!(parts.status, 200);
    }
    // Stop with the queue full: what is left when the stop is seen is drained at once.
    let mut custody = custody;
    custody.signal_stop();
    custody.gate.open();
    let done = custody.stop().await;
    assert_eq!(done.records.len(), 600);
    let mut blocks = 0;
    for entry in std::fs::read_dir(done.audit_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "seg") {
            let (parsed, _) = segment_lines(&path);
            for b in &parsed.blocks {
                blocks += 1;
                assert!(
                    (b.header.raw_len as usize) < custody_audit::writer::BLOCK_TARGET + 64 * 1024,
                    "a block of {} bytes ({} records)",
                    b.header.raw_len,
                    b.header.count
                );
            }
        }
    }
    assert!(blocks > 4, "{blocks} blocks");
}
