//! The canned upstream.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use futures_util::StreamExt;
use http::{header, HeaderValue, Request, Response};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Content chunks per streamed answer.
    #[arg(long, default_value_t = 20)]
    chunks: usize,
    /// Pause between streamed chunks, in milliseconds (0: all at once).
    #[arg(long, default_value_t = 0)]
    chunk_interval_ms: u64,
    /// Runtime worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

struct Canned {
    plain: Bytes,
    chunks: Vec<Bytes>,
    interval: Duration,
}

const PLAIN: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1767225600,"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_bench","choices":[{"index":0,"message":{"role":"assistant","content":"Here is a short answer from the benchmark upstream. It is about as long as a typical reply to a support question: a few sentences that restate the question, give the answer, and offer a next step if the first one does not help."},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":256,"completion_tokens":52,"total_tokens":308}}"#;

fn canned(a: &Args) -> Canned {
    let chunk = |delta: &str, finish: &str| {
        Bytes::from(format!(
            "data: {{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1767225600,\"model\":\"gpt-4o-mini-2024-07-18\",\"system_fingerprint\":\"fp_bench\",\"choices\":[{{\"index\":0,\"delta\":{delta},\"logprobs\":null,\"finish_reason\":{finish}}}]}}\n\n"
        ))
    };
    let mut chunks = vec![chunk(r#"{"role":"assistant","content":""}"#, "null")];
    for i in 0..a.chunks {
        chunks.push(chunk(&format!("{{\"content\":\"word{i} \"}}"), "null"));
    }
    chunks.push(chunk("{}", "\"stop\""));
    chunks.push(Bytes::from_static(b"data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1767225600,\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[],\"usage\":{\"prompt_tokens\":256,\"completion_tokens\":20,\"total_tokens\":276}}\n\n"));
    chunks.push(Bytes::from_static(b"data: [DONE]\n\n"));
    Canned {
        plain: Bytes::from_static(PLAIN.as_bytes()),
        chunks,
        interval: Duration::from_millis(a.chunk_interval_ms),
    }
}

type Body = BoxBody<Bytes, Infallible>;

async fn handle(canned: Arc<Canned>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    // The whole body is read (as a real provider would) but only searched, not parsed.
    let body = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let stream = memchr::memmem::find(&body, b"\"stream\":true").is_some();
    let mut resp = if stream {
        let chunks = canned.chunks.clone();
        let interval = canned.interval;
        let frames = futures_util::stream::iter(chunks.into_iter().enumerate()).then(
            move |(i, c)| async move {
                if i > 0 && !interval.is_zero() {
                    tokio::time::sleep(interval).await;
                }
                Ok::<_, Infallible>(Frame::data(c))
            },
        );
        let mut r = Response::new(BodyExt::boxed(StreamBody::new(frames)));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        r
    } else {
        let mut r = Response::new(Full::new(canned.plain.clone()).boxed());
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        r
    };
    resp.headers_mut()
        .insert("x-request-id", HeaderValue::from_static("req_bench"));
    Ok(resp)
}

pub fn main(a: Args) -> anyhow::Result<()> {
    let canned = Arc::new(canned(&a));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(a.threads.max(1))
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(a.listen).await?;
        println!("upstream on http://{}", listener.local_addr()?);
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let canned = canned.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |r| handle(canned.clone(), r));
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    })
}
