//! Every provider custody understands, through the real proxy: Azure OpenAI, Gemini
//! (JSON, SSE and JSON-array streams), legacy completions, moderations, images, audio,
//! and OpenAI-compatible servers (vLLM, Ollama). Transcripts are in
//! `tests/fixtures/providers`; error bodies and streams cut mid-way included.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use custody_config::Provider;
use custody_tests::*;
use serde_json::Value;

fn fixture(name: &str) -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/providers/");
    std::fs::read_to_string(format!("{path}{name}")).unwrap()
}

/// One exchange through custody to an upstream answering `status` with `body`:
/// what the client got, what the upstream saw, and the record.
async fn exchange(
    provider: Provider,
    path: &str,
    request: impl Into<Bytes>,
    req_headers: &[(&str, &str)],
    status: u16,
    resp_headers: &'static [(&'static str, &'static str)],
    body: impl Into<Bytes>,
) -> (http::response::Parts, Bytes, Recorded, Value) {
    let body: Bytes = body.into();
    let mut up = MockUpstream::start(move |_, _| respond(status, resp_headers, body.clone())).await;
    let custody = Custody::start(vec![route("p", "/", &up.url(), provider, false)]).await;
    let (parts, got) = send(&client(), post(&custody.url(path), req_headers, request)).await;
    let seen = up.next().await;
    let done = custody.stop().await;
    (parts, got, seen, done.one().clone())
}

/// A stream that delivers `prefix` and then breaks (the upstream's connection dies
/// mid-way), after the client has received what was sent; returns the record.
async fn cut_stream(
    provider: Provider,
    path: &str,
    request: &str,
    headers: &'static [(&'static str, &'static str)],
    prefix: String,
) -> Value {
    use http_body_util::BodyExt;
    let (tx, handler) = one_stream(headers);
    let up = MockUpstream::start(handler).await;
    let custody = Custody::start(vec![route("p", "/", &up.url(), provider, false)]).await;
    let resp = client()
        .request(post(&custody.url(path), &[], request.to_owned()))
        .await
        .unwrap();
    let mut body = resp.into_body();
    tx.send(Ok(Bytes::from(prefix))).await.unwrap();
    assert!(body.frame().await.unwrap().is_ok());
    tx.send(Err(std::io::Error::other("connection reset")))
        .await
        .unwrap();
    while let Some(Ok(_)) = body.frame().await {}
    custody.stop().await.one().clone()
}

const JSON: &[(&str, &str)] = &[("content-type", "application/json")];
const SSE: &[(&str, &str)] = &[("content-type", "text/event-stream")];

#[tokio::test]
async fn azure_chat_records_the_deployment_and_the_served_model() {
    let path = "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21";
    let (parts, body, seen, r) = exchange(
        Provider::Azure,
        path,
        fixture("azure-chat.req.json"),
        &[("api-key", "azure-key-0123456789abcdef")],
        200,
        JSON,
        fixture("azure-chat.json"),
    )
    .await;
    assert_eq!(parts.status, 200);
    assert_eq!(body, fixture("azure-chat.json").as_bytes());
    assert_eq!(seen.parts.uri.query(), Some("api-version=2024-10-21"));
    let g = &r["gen_ai"];
    assert_eq!(g["provider"]["name"], "azure.ai.openai");
    assert_eq!(g["operation"]["name"], "chat");
    assert_eq!(g["request"]["model"], "gpt4o-prod", "the deployment");
    assert_eq!(g["request"]["seed"], 7);
    assert_eq!(g["request"]["max_tokens"], 64);
    assert_eq!(g["response"]["model"], "gpt-4o-2024-11-20");
    assert_eq!(g["response"]["system_fingerprint"], "fp_ee1d74bde0");
    assert_eq!(g["usage"]["input_tokens"], 24);
    assert_eq!(g["usage"]["cache_read"]["input_tokens"], 16);
    assert_eq!(g["usage"]["reasoning"]["output_tokens"], 0);
    assert_eq!(r["client"]["user"], "employee-4711");
    assert!(r["prompt"]["hash"].as_str().unwrap().len() == 64);
    assert!(r["completion"]["hash"].as_str().unwrap().len() == 64);
}

#[tokio::test]
async fn azure_stream_skips_the_content_filter_chunk_and_keeps_usage() {
    let (_, _, _, r) = exchange(
        Provider::Azure,
        "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21",
        r#"{"messages":[{"role":"user","content":"Capital of France?"}],"stream":true,"stream_options":{"include_usage":true}}"#,
        &[],
        200,
        SSE,
        fixture("azure-chat-stream.sse"),
    )
    .await;
    assert_eq!(r["response"]["streamed"], true);
    let b = &r["response"]["body"];
    assert_eq!(b["choices"][0]["message"]["content"], "Paris it is.");
    assert_eq!(
        b["model"], "gpt-4o-2024-11-20",
        "not the empty first chunk's"
    );
    assert_eq!(r["gen_ai"]["response"]["id"], "chatcmpl-AzS7c1");
    assert_eq!(r["gen_ai"]["usage"]["output_tokens"], 4);
    assert_eq!(r["gen_ai"]["response"]["finish_reasons"][0], "stop");
}

#[tokio::test]
async fn azure_rate_limit_passes_through_and_is_recorded() {
    let (parts, body, _, r) = exchange(
        Provider::Azure,
        "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21",
        r#"{"messages":[{"role":"user","content":"hi"}]}"#,
        &[],
        429,
        &[("content-type", "application/json"), ("retry-after", "6")],
        fixture("azure-429.json"),
    )
    .await;
    assert_eq!(parts.status, 429);
    assert_eq!(parts.headers["retry-after"], "6");
    assert_eq!(body, fixture("azure-429.json").as_bytes());
    assert_eq!(r["http"]["status"], 429);
    assert_eq!(r["response"]["body"]["error"]["code"], "429");
}

#[tokio::test]
async fn gemini_generate_content_reads_the_model_from_the_path() {
    let (_, body, seen, r) = exchange(
        Provider::Gemini,
        "/v1beta/models/gemini-2.5-flash:generateContent",
        fixture("gemini.req.json"),
        &[("x-goog-api-key", "AIzaSyA-test-key-0123456789abcdefghij")],
        200,
        JSON,
        fixture("gemini.json"),
    )
    .await;
    assert_eq!(body, fixture("gemini.json").as_bytes(), "bytes untouched");
    assert_eq!(
        seen.parts.headers["x-goog-api-key"],
        "AIzaSyA-test-key-0123456789abcdefghij"
    );
    let g = &r["gen_ai"];
    assert_eq!(g["provider"]["name"], "gcp.gemini");
    assert_eq!(g["operation"]["name"], "generate_content");
    assert_eq!(g["request"]["model"], "gemini-2.5-flash");
    assert_eq!(g["request"]["temperature"], 0.3);
    assert_eq!(g["request"]["max_tokens"], 128);
    assert_eq!(g["request"]["seed"], 42);
    assert_eq!(g["request"]["stop_sequences"][0], "END");
    assert_eq!(g["request"]["tool_names"][0], "lookup_city");
    assert_eq!(g["request"]["reasoning_effort"], "budget:256");
    assert_eq!(g["response"]["model"], "gemini-2.5-flash");
    assert_eq!(g["response"]["id"], "x2VbaKDVNp6qz7IPjtq-sAQ");
    assert_eq!(g["response"]["finish_reasons"][0], "STOP");
    assert_eq!(g["usage"]["input_tokens"], 15);
    assert_eq!(g["usage"]["output_tokens"], 2);
    assert_eq!(g["usage"]["cache_read"]["input_tokens"], 4);
    assert_eq!(g["usage"]["reasoning"]["output_tokens"], 44);
    assert!(r["prompt"]["hash"].is_string() && r["completion"]["hash"].is_string());
    // The key never reaches the record.
    assert!(!r.to_string().contains("AIzaSyA-test-key"));
}

#[tokio::test]
async fn gemini_sse_stream_is_reassembled() {
    let (_, _, _, r) = exchange(
        Provider::Gemini,
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
        fixture("gemini.req.json"),
        &[],
        200,
        SSE,
        fixture("gemini-stream.sse"),
    )
    .await;
    assert_eq!(r["response"]["streamed"], true);
    let c = &r["response"]["body"]["candidates"][0];
    assert_eq!(
        c["content"]["parts"][0]["text"],
        "Paris is the capital of France."
    );
    assert_eq!(c["finishReason"], "STOP");
    assert_eq!(r["gen_ai"]["usage"]["output_tokens"], 8);
    assert_eq!(r["gen_ai"]["response"]["id"], "r4ZbaNqIOpuhz7IP0r3bkA8");
}

#[tokio::test]
async fn gemini_json_array_stream_is_reassembled_even_when_cut() {
    let (_, _, _, r) = exchange(
        Provider::Gemini,
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
        fixture("gemini.req.json"),
        &[],
        200,
        JSON,
        fixture("gemini-stream-array.json"),
    )
    .await;
    assert_eq!(r["response"]["streamed"], true);
    assert_eq!(
        r["response"]["body"]["candidates"][0]["content"]["parts"][0]["text"],
        "Paris is the capital of France."
    );

    // The same stream cut inside its second chunk: the first chunk survives.
    let whole = fixture("gemini-stream-array.json");
    let cut = whole[..whole.find("is the capital").unwrap()].to_owned();
    let r = cut_stream(
        Provider::Gemini,
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
        &fixture("gemini.req.json"),
        JSON,
        cut,
    )
    .await;
    assert_eq!(r["outcome"], "upstream_error");
    assert_eq!(
        r["response"]["body"]["candidates"][0]["content"]["parts"][0]["text"],
        "Paris"
    );
}

#[tokio::test]
async fn gemini_errors_and_custody_refusals_use_googles_shape() {
    let (parts, _, _, r) = exchange(
        Provider::Gemini,
        "/v1beta/models/gemini-2.5-flash:generateContent?key=AIzaSyA-bad-key-000000000000000000",
        fixture("gemini.req.json"),
        &[],
        400,
        JSON,
        fixture("gemini-400.json"),
    )
    .await;
    assert_eq!(parts.status, 400);
    assert_eq!(r["response"]["body"]["error"]["status"], "INVALID_ARGUMENT");
    // The key in the query string is recorded as a credential, never in clear.
    assert!(!r.to_string().contains("AIzaSyA-bad-key"));
    assert!(r["http"]["query"]
        .as_str()
        .unwrap()
        .contains("[CLIENT_CREDENTIAL]"));
}

#[tokio::test]
async fn legacy_completion_stream_cut_midway_keeps_the_text_so_far() {
    let transcript = fixture("completions-stream.sse");
    let cut = transcript[..transcript.find(", there").unwrap()].to_owned();
    let r = cut_stream(
        Provider::Openai,
        "/v1/completions",
        r#"{"model":"gpt-3.5-turbo-instruct","prompt":"Tell me a story","stream":true,"max_tokens":20}"#,
        SSE,
        cut,
    )
    .await;
    assert_eq!(r["outcome"], "upstream_error");
    assert_eq!(r["gen_ai"]["operation"]["name"], "text_completion");
    assert_eq!(
        r["response"]["body"]["choices"][0]["text"],
        "Once upon a time"
    );
    assert_eq!(
        r["gen_ai"]["response"]["model"],
        "gpt-3.5-turbo-instruct:20230824-v2"
    );
    assert!(r["prompt"]["hash"].is_string());
}

#[tokio::test]
async fn moderations_are_recorded_with_their_model() {
    let (_, _, _, r) = exchange(
        Provider::Openai,
        "/v1/moderations",
        r#"{"model":"omni-moderation-latest","input":"Is this fine?"}"#,
        &[],
        200,
        JSON,
        fixture("moderations.json"),
    )
    .await;
    assert_eq!(r["gen_ai"]["operation"]["name"], "moderations");
    assert_eq!(r["gen_ai"]["response"]["model"], "omni-moderation-latest");
    assert_eq!(r["response"]["body"]["results"][0]["flagged"], false);
    assert!(r["prompt"]["hash"].is_string());
}

#[tokio::test]
async fn generated_images_are_recorded_as_length_and_hash() {
    let image = "iVBORw0KGgo".repeat(2000);
    let body = format!(
        r#"{{"created":1764403600,"data":[{{"b64_json":"{image}","revised_prompt":"a red fox"}}],"usage":{{"total_tokens":4170,"input_tokens":10,"output_tokens":4160,"input_tokens_details":{{"text_tokens":10,"image_tokens":0}}}}}}"#
    );
    let (_, got, _, r) = exchange(
        Provider::Openai,
        "/v1/images/generations",
        r#"{"model":"gpt-image-1","prompt":"a red fox","size":"1024x1024"}"#,
        &[],
        200,
        JSON,
        body.clone(),
    )
    .await;
    assert_eq!(got, body.as_bytes(), "the client gets the image");
    assert_eq!(r["gen_ai"]["operation"]["name"], "images");
    assert_eq!(r["gen_ai"]["request"]["model"], "gpt-image-1");
    assert_eq!(r["gen_ai"]["usage"]["output_tokens"], 4160);
    let stored = r["response"]["body"]["data"][0]["b64_json"]
        .as_str()
        .unwrap();
    assert!(
        stored.starts_with(&format!("[binary omitted: {} bytes, sha256 ", image.len())),
        "{stored}"
    );
    assert_eq!(
        r["response"]["body"]["data"][0]["revised_prompt"],
        "a red fox"
    );
}

#[tokio::test]
async fn speech_audio_is_recorded_as_length_and_hash() {
    let mut mp3 = vec![0xFF, 0xFB, 0x90, 0x64, 0x00];
    mp3.extend((0..4096u32).map(|i| (i * 7 % 251) as u8 | 0x80));
    let (_, got, _, r) = exchange(
        Provider::Openai,
        "/v1/audio/speech",
        r#"{"model":"gpt-4o-mini-tts","input":"Hello there","voice":"alloy"}"#,
        &[],
        200,
        &[("content-type", "audio/mpeg")],
        mp3.clone(),
    )
    .await;
    assert_eq!(got, mp3);
    assert_eq!(r["gen_ai"]["operation"]["name"], "audio");
    assert_eq!(r["gen_ai"]["request"]["model"], "gpt-4o-mini-tts");
    assert!(r["response"]["body"].is_null());
    assert_eq!(r["response"]["omitted"], "binary");
    assert_eq!(r["response"]["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(r["http"]["response_bytes"], mp3.len());
}

#[tokio::test]
async fn transcription_upload_keeps_its_model_but_not_the_audio() {
    let boundary = "----custody7MA4YWxkTrZu0gW";
    let mut form = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngpt-4o-transcribe\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"hello.wav\"\r\nContent-Type: audio/wav\r\n\r\n"
    )
    .into_bytes();
    form.extend([b'R', b'I', b'F', b'F', 0xFF, 0xFE, 0x00, 0x80]);
    form.extend(format!("\r\n--{boundary}--\r\n").into_bytes());
    let ct = format!("multipart/form-data; boundary={boundary}");
    let ct: &'static str = Box::leak(ct.into_boxed_str());
    let (_, _, seen, r) = exchange(
        Provider::Openai,
        "/v1/audio/transcriptions",
        form.clone(),
        &[("content-type", ct)],
        200,
        JSON,
        fixture("transcription.json"),
    )
    .await;
    assert_eq!(seen.body, form, "the upload reaches the upstream whole");
    assert_eq!(r["gen_ai"]["request"]["model"], "gpt-4o-transcribe");
    assert_eq!(r["request"]["omitted"], "multipart form upload");
    assert_eq!(r["request"]["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(
        r["response"]["body"]["text"],
        "Hello there, this is a test."
    );
    assert_eq!(r["gen_ai"]["usage"]["input_tokens"], 14);
}

#[tokio::test]
async fn openai_compatible_servers_work_under_provider_openai() {
    let req = r#"{"model":"meta-llama/Llama-3.1-8B-Instruct","messages":[{"role":"user","content":"Hi"}],"top_k":40}"#;
    let (_, _, _, r) = exchange(
        Provider::Openai,
        "/v1/chat/completions",
        req,
        &[],
        200,
        JSON,
        fixture("vllm-chat.json"),
    )
    .await;
    assert_eq!(
        r["gen_ai"]["response"]["model"],
        "meta-llama/Llama-3.1-8B-Instruct"
    );
    assert!(
        r["gen_ai"]["request"]["top_k"].is_u64(),
        "top_k stays an integer"
    );
    assert_eq!(r["gen_ai"]["request"]["top_k"], 40);
    assert_eq!(r["gen_ai"]["usage"]["output_tokens"], 7);
    assert!(r["completion"]["hash"].is_string());

    let (parts, _, _, r) = exchange(
        Provider::Openai,
        "/v1/chat/completions",
        r#"{"model":"gpt-4","messages":[{"role":"user","content":"Hi"}]}"#,
        &[],
        404,
        JSON,
        fixture("vllm-404.json"),
    )
    .await;
    assert_eq!(parts.status, 404);
    assert_eq!(r["response"]["body"]["type"], "NotFoundError");
    assert!(r.get("completion").is_none());

    let (_, _, _, r) = exchange(
        Provider::Openai,
        "/v1/chat/completions",
        r#"{"model":"llama3.2","messages":[{"role":"user","content":"Hi"}]}"#,
        &[],
        200,
        JSON,
        fixture("ollama-chat.json"),
    )
    .await;
    assert_eq!(r["gen_ai"]["response"]["system_fingerprint"], "fp_ollama");
    assert_eq!(r["gen_ai"]["usage"]["input_tokens"], 26);
}
