//! A mock model provider on loopback, speaking enough of the OpenAI and Anthropic APIs
//! for `custody demo` and the SDK conformance tests: chat (plain, streamed, tool calls,
//! usage), legacy completions, embeddings, the Responses API, Anthropic messages (plain
//! and streamed). Some model names ask for trouble: `rate-limited` (429 with
//! `Retry-After`), `bad-request` (400), `unauthorized` (401), `server-error` (500), and
//! `slow` (a two-second answer, or a stream paced at 100 ms per event).
//! The assistant echoes the start of the last user message, so PII sent in a prompt
//! comes back in the answer, as it does with real models.
//!
//! It records what it receives: `GET /mock/requests` returns the last
//! [`RECORDED_MAX`] requests (path and body as received), so a test can prove what
//! reached the upstream, and what did not.

use std::{
    collections::VecDeque,
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use futures_util::StreamExt;
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use serde_json::{json, Value};
use tokio::net::TcpListener;

type MockBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// Requests the mock keeps for `GET /mock/requests`; older ones are forgotten.
pub const RECORDED_MAX: usize = 1000;

type Recorded = Arc<Mutex<VecDeque<Value>>>;

/// Serves the mock provider on `listener` until `shutdown` completes.
pub async fn serve(listener: TcpListener, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    let recorded: Recorded = Arc::default();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let recorded = recorded.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| handle(req, recorded.clone()));
                    let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), svc).await;
                });
            }
            () = &mut shutdown => break,
        }
    }
}

/// Binds `addr` and serves in a background task; returns the bound address.
pub async fn spawn(addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(serve(listener, std::future::pending()));
    Ok(bound)
}

async fn handle(
    req: Request<Incoming>,
    recorded: Recorded,
) -> Result<Response<MockBody>, Infallible> {
    let path = req.uri().path().trim_end_matches('/').to_owned();
    if req.method() == http::Method::GET && path == "/mock/requests" {
        let list: Vec<Value> = recorded
            .lock()
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default();
        return Ok(json_response(StatusCode::OK, &json!({ "requests": list })));
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    if let Ok(mut r) = recorded.lock() {
        if r.len() == RECORDED_MAX {
            r.pop_front();
        }
        r.push_back(json!({"path": path, "body": String::from_utf8_lossy(&body)}));
    }
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return Ok(json_response(
            StatusCode::BAD_REQUEST,
            &json!({"error": {"message": "body is not JSON", "type": "invalid_request_error"}}),
        ));
    };
    let model = body["model"].as_str().unwrap_or("mock-model").to_owned();
    let anthropic = path.ends_with("/messages");
    let failure = match model.as_str() {
        "bad-request" => Some((StatusCode::BAD_REQUEST, "invalid_request_error")),
        "unauthorized" => Some((StatusCode::UNAUTHORIZED, "authentication_error")),
        "server-error" => Some((StatusCode::INTERNAL_SERVER_ERROR, "api_error")),
        _ => None,
    };
    if let Some((status, kind)) = failure {
        let message = format!("mock: {model}");
        let v = if anthropic {
            json!({"type": "error", "error": {"type": kind, "message": message}})
        } else {
            json!({"error": {"message": message, "type": kind, "param": null, "code": null}})
        };
        return Ok(json_response(status, &v));
    }
    // `slow`: the answer takes two seconds; a streamed one comes 100 ms per event.
    let slow = model == "slow";
    let stream = body["stream"].as_bool().unwrap_or(false);
    if slow && !stream {
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
    if model == "rate-limited" {
        let mut r = json_response(
            StatusCode::TOO_MANY_REQUESTS,
            &json!({"error": {"message": "Rate limit reached", "type": "rate_limit_error", "code": "rate_limit_exceeded"}}),
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        r.headers_mut().insert(
            "x-ratelimit-remaining-requests",
            header::HeaderValue::from_static("0"),
        );
        return Ok(r);
    }
    let pace = slow && stream;
    let input_tokens = (serde_json::to_string(&body).map_or(0, |s| s.len()) / 4) as u64;
    let resp = if path.ends_with("/chat/completions") {
        chat(&body, &model, stream, input_tokens)
    } else if path.ends_with("/completions") {
        completion(&model, input_tokens)
    } else if path.ends_with("/embeddings") {
        embeddings(&body, &model, input_tokens)
    } else if path.ends_with("/responses") {
        responses(&body, &model, stream, input_tokens)
    } else if path.ends_with("/messages") {
        messages(&body, &model, stream, input_tokens)
    } else {
        json_response(
            StatusCode::NOT_FOUND,
            &json!({"error": {"message": format!("mock: unknown path {path}"), "type": "invalid_request_error"}}),
        )
    };
    if pace {
        let (parts, body) = resp.into_parts();
        let events = http_body_util::BodyStream::new(body).then(|frame| async move {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            frame
        });
        return Ok(Response::from_parts(
            parts,
            BodyExt::boxed(StreamBody::new(events)),
        ));
    }
    Ok(resp)
}

fn json_response(status: StatusCode, v: &Value) -> Response<MockBody> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r.headers_mut().insert(
        "x-request-id",
        header::HeaderValue::from_static("req_mock_0001"),
    );
    r
}

fn sse_response(events: Vec<String>) -> Response<MockBody> {
    let frames = events
        .into_iter()
        .map(|e| Ok::<_, Infallible>(Frame::data(Bytes::from(e))));
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(futures_util::stream::iter(
        frames,
    ))));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream"),
    );
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-cache"),
    );
    r
}

/// The text of the last user message (string or content parts).
fn last_user_text(body: &Value) -> String {
    let from_content = |c: &Value| match c {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    };
    if let Some(msgs) = body["messages"].as_array() {
        if let Some(m) = msgs.iter().rev().find(|m| m["role"] == "user") {
            return from_content(&m["content"]);
        }
    }
    match &body["input"] {
        Value::String(s) => s.clone(),
        Value::Array(items) => items
            .iter()
            .rev()
            .find(|m| m["role"] == "user")
            .map(|m| from_content(&m["content"]))
            .unwrap_or_default(),
        _ => String::new(),
    }
}

fn answer(body: &Value) -> String {
    let said: String = last_user_text(body).chars().take(60).collect();
    format!("Hello from the mock provider. You said: {said}")
}

fn chunks(s: &str) -> Vec<String> {
    let chars: Vec<char> = s.chars().collect();
    chars.chunks(12).map(|c| c.iter().collect()).collect()
}

fn sse_data(v: &Value) -> String {
    format!("data: {v}\n\n")
}

fn chat(body: &Value, model: &str, stream: bool, input_tokens: u64) -> Response<MockBody> {
    let served = format!("{model}-2026-01-01");
    let wants_tool = body["tools"].as_array().is_some_and(|t| !t.is_empty());
    let text = answer(body);
    let output_tokens = (text.len() / 4) as u64;
    let usage = json!({"prompt_tokens": input_tokens, "completion_tokens": output_tokens, "total_tokens": input_tokens + output_tokens});
    let tool_name = body["tools"][0]["function"]["name"]
        .as_str()
        .unwrap_or("get_weather")
        .to_owned();
    if !stream {
        let message = if wants_tool {
            json!({"role": "assistant", "content": null, "tool_calls": [{"id": "call_mock_1", "type": "function", "function": {"name": tool_name, "arguments": "{\"city\":\"Paris\"}"}}]})
        } else {
            json!({"role": "assistant", "content": text})
        };
        let finish = if wants_tool { "tool_calls" } else { "stop" };
        return json_response(
            StatusCode::OK,
            &json!({
                "id": "chatcmpl-mock-1", "object": "chat.completion", "created": 1_767_225_600, "model": served,
                "system_fingerprint": "fp_mock",
                "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish}],
                "usage": usage,
            }),
        );
    }
    let chunk = |delta: Value, finish: Value| {
        sse_data(
            &json!({"id": "chatcmpl-mock-1", "object": "chat.completion.chunk", "created": 1_767_225_600, "model": served, "system_fingerprint": "fp_mock",
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]}),
        )
    };
    let mut events = vec![chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    )];
    if wants_tool {
        events.push(chunk(json!({"tool_calls": [{"index": 0, "id": "call_mock_1", "type": "function", "function": {"name": tool_name, "arguments": ""}}]}), Value::Null));
        for part in ["{\"ci", "ty\":\"Pa", "ris\"}"] {
            events.push(chunk(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": part}}]}),
                Value::Null,
            ));
        }
        events.push(chunk(json!({}), json!("tool_calls")));
    } else {
        for c in chunks(&text) {
            events.push(chunk(json!({"content": c}), Value::Null));
        }
        events.push(chunk(json!({}), json!("stop")));
    }
    if body["stream_options"]["include_usage"].as_bool() == Some(true) {
        events.push(sse_data(&json!({"id": "chatcmpl-mock-1", "object": "chat.completion.chunk", "created": 1_767_225_600, "model": served, "choices": [], "usage": usage})));
    }
    events.push("data: [DONE]\n\n".into());
    sse_response(events)
}

fn completion(model: &str, input_tokens: u64) -> Response<MockBody> {
    json_response(
        StatusCode::OK,
        &json!({
            "id": "cmpl-mock-1", "object": "text_completion", "created": 1_767_225_600, "model": model,
            "choices": [{"index": 0, "text": " and that is all.", "logprobs": null, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": input_tokens, "completion_tokens": 5, "total_tokens": input_tokens + 5},
        }),
    )
}

fn embeddings(body: &Value, model: &str, input_tokens: u64) -> Response<MockBody> {
    let n = match &body["input"] {
        Value::Array(a) => a.len(),
        _ => 1,
    };
    let data: Vec<Value> = (0..n)
        .map(|i| json!({"object": "embedding", "index": i, "embedding": [0.1, -0.2, 0.3, 0.05, -0.4, 0.25, 0.0, 0.125]}))
        .collect();
    json_response(
        StatusCode::OK,
        &json!({"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": input_tokens, "total_tokens": input_tokens}}),
    )
}

fn responses(body: &Value, model: &str, stream: bool, input_tokens: u64) -> Response<MockBody> {
    let text = answer(body);
    let served = format!("{model}-2026-01-01");
    let output_tokens = (text.len() / 4) as u64;
    let item = |t: &str, status: &str| {
        json!({"id": "msg_mock_1", "type": "message", "status": status, "role": "assistant",
        "content": [{"type": "output_text", "text": t, "annotations": []}]})
    };
    let resp = |status: &str, output: Value, usage: Value| {
        json!({"id": "resp_mock_1", "object": "response", "created_at": 1_767_225_600, "status": status,
        "model": served, "output": output, "usage": usage, "parallel_tool_calls": true, "tool_choice": "auto", "tools": [], "error": null, "incomplete_details": null,
        "instructions": null, "metadata": {}, "temperature": 1.0, "top_p": 1.0, "text": {"format": {"type": "text"}}})
    };
    let usage = json!({"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": input_tokens + output_tokens});
    if !stream {
        return json_response(
            StatusCode::OK,
            &resp("completed", json!([item(&text, "completed")]), usage),
        );
    }
    let mut seq = 0;
    let mut ev = |kind: &str, mut v: Value| {
        v["type"] = json!(kind);
        v["sequence_number"] = json!(seq);
        seq += 1;
        format!("event: {kind}\ndata: {v}\n\n")
    };
    let mut events = vec![
        ev(
            "response.created",
            json!({"response": resp("in_progress", json!([]), Value::Null)}),
        ),
        ev(
            "response.in_progress",
            json!({"response": resp("in_progress", json!([]), Value::Null)}),
        ),
        ev(
            "response.output_item.added",
            json!({"output_index": 0, "item": {"id": "msg_mock_1", "type": "message", "status": "in_progress", "role": "assistant", "content": []}}),
        ),
        ev(
            "response.content_part.added",
            json!({"item_id": "msg_mock_1", "output_index": 0, "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}}),
        ),
    ];
    for c in chunks(&text) {
        events.push(ev("response.output_text.delta", json!({"item_id": "msg_mock_1", "output_index": 0, "content_index": 0, "delta": c, "logprobs": []})));
    }
    events.push(ev("response.output_text.done", json!({"item_id": "msg_mock_1", "output_index": 0, "content_index": 0, "text": text, "logprobs": []})));
    events.push(ev("response.content_part.done", json!({"item_id": "msg_mock_1", "output_index": 0, "content_index": 0, "part": {"type": "output_text", "text": text, "annotations": []}})));
    events.push(ev(
        "response.output_item.done",
        json!({"output_index": 0, "item": item(&text, "completed")}),
    ));
    events.push(ev(
        "response.completed",
        json!({"response": resp("completed", json!([item(&text, "completed")]), usage)}),
    ));
    sse_response(events)
}

fn messages(body: &Value, model: &str, stream: bool, input_tokens: u64) -> Response<MockBody> {
    let text = answer(body);
    let served = format!("{model}-20260101");
    let wants_tool = body["tools"].as_array().is_some_and(|t| !t.is_empty());
    let tool_name = body["tools"][0]["name"]
        .as_str()
        .unwrap_or("get_weather")
        .to_owned();
    let output_tokens = (text.len() / 4) as u64;
    let stop = if wants_tool { "tool_use" } else { "end_turn" };
    if !stream {
        let mut content = vec![json!({"type": "text", "text": text})];
        if wants_tool {
            content.push(json!({"type": "tool_use", "id": "toolu_mock_1", "name": tool_name, "input": {"city": "Paris"}}));
        }
        let mut r = json_response(
            StatusCode::OK,
            &json!({"id": "msg_mock_1", "type": "message", "role": "assistant", "model": served,
            "content": content, "stop_reason": stop, "stop_sequence": null,
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens}}),
        );
        r.headers_mut().insert(
            "request-id",
            header::HeaderValue::from_static("req_mock_anthropic_1"),
        );
        return r;
    }
    let ev = |kind: &str, v: Value| format!("event: {kind}\ndata: {v}\n\n");
    let mut events = vec![
        ev(
            "message_start",
            json!({"type": "message_start", "message": {"id": "msg_mock_1", "type": "message", "role": "assistant", "model": served,
            "content": [], "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": input_tokens, "output_tokens": 1}}}),
        ),
        ev(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        ev("ping", json!({"type": "ping"})),
    ];
    for c in chunks(&text) {
        events.push(ev("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": c}})));
    }
    events.push(ev(
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    ));
    if wants_tool {
        events.push(ev("content_block_start", json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_mock_1", "name": tool_name, "input": {}}})));
        for part in ["{\"city\":", " \"Paris\"}"] {
            events.push(ev("content_block_delta", json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": part}})));
        }
        events.push(ev(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 1}),
        ));
    }
    events.push(ev("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null}, "usage": {"output_tokens": output_tokens}})));
    events.push(ev("message_stop", json!({"type": "message_stop"})));
    sse_response(events)
}
