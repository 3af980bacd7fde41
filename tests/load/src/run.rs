//! The load generator.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{header, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;

#[derive(clap::Args, Clone)]
pub struct Args {
    /// The chat completions URL (`http://127.0.0.1:8080/v1/chat/completions`).
    #[arg(long)]
    url: Uri,
    /// TCP connections.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Concurrent requests per connection (HTTP/2 only).
    #[arg(long, default_value_t = 1)]
    streams: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Requests per second in all (open loop); absent: as fast as answers come.
    #[arg(long)]
    rate: Option<f64>,
    /// HTTP/2 with prior knowledge instead of HTTP/1.1.
    #[arg(long)]
    http2: bool,
    /// Ask for a streamed (SSE) answer.
    #[arg(long)]
    stream: bool,
    /// Bytes of the user message in the prompt.
    #[arg(long, default_value_t = 1024)]
    prompt_bytes: usize,
    /// Runtime worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

/// A chat request whose user message is `n` bytes of prose with an e-mail address in
/// it, so redaction has something to do.
fn prompt_body(n: usize, stream: bool) -> Bytes {
    const PROSE: &str = "Our order did not arrive and the tracking page has not changed for a week. Please look into it and write back to jane.doe@example.com with what you find. ";
    let mut text = String::with_capacity(n + PROSE.len());
    while text.len() < n {
        text.push_str(PROSE);
    }
    text.truncate(n);
    Bytes::from(
        json!({
            "model": "gpt-4o-mini",
            "temperature": 0.2,
            "stream": stream,
            "messages": [
                {"role": "system", "content": "You are a helpful support assistant."},
                {"role": "user", "content": text},
            ],
        })
        .to_string(),
    )
}

#[derive(Clone)]
struct Hists {
    latency: Histogram<u64>,
    ttfb: Histogram<u64>,
    gap: Histogram<u64>,
    ok: u64,
    errors: u64,
    /// Every completed request, warm-up included (what the trail must hold).
    completed_all: u64,
    first_error: Option<String>,
}

impl Hists {
    fn new() -> Self {
        let h = || Histogram::new_with_bounds(1, 600_000_000, 3).unwrap_or_else(|_| unreachable!());
        Self {
            latency: h(),
            ttfb: h(),
            gap: h(),
            ok: 0,
            errors: 0,
            completed_all: 0,
            first_error: None,
        }
    }

    fn merge(&mut self, o: &Self) {
        let _ = self.latency.add(&o.latency);
        let _ = self.ttfb.add(&o.ttfb);
        let _ = self.gap.add(&o.gap);
        self.ok += o.ok;
        self.errors += o.errors;
        self.completed_all += o.completed_all;
        if self.first_error.is_none() {
            self.first_error.clone_from(&o.first_error);
        }
    }
}

fn summary(h: &Histogram<u64>) -> serde_json::Value {
    if h.is_empty() {
        return serde_json::Value::Null;
    }
    json!({
        "p50": h.value_at_quantile(0.50),
        "p90": h.value_at_quantile(0.90),
        "p99": h.value_at_quantile(0.99),
        "p999": h.value_at_quantile(0.999),
        "max": h.max(),
        "mean": (h.mean() * 10.0).round() / 10.0,
    })
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;
type Sender2 = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

enum Conn {
    H1(Sender),
    H2(Sender2),
}

impl Conn {
    async fn open(a: &Args) -> anyhow::Result<Self> {
        let host = a.url.host().unwrap_or("127.0.0.1");
        let port = a.url.port_u16().unwrap_or(80);
        let tcp = tokio::net::TcpStream::connect((host, port)).await?;
        tcp.set_nodelay(true)?;
        let io = TokioIo::new(tcp);
        if a.http2 {
            let (send, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(conn);
            Ok(Self::H2(send))
        } else {
            let (send, conn) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(conn);
            Ok(Self::H1(send))
        }
    }

    async fn send(
        &mut self,
        req: Request<Full<Bytes>>,
    ) -> Result<http::Response<hyper::body::Incoming>, hyper::Error> {
        match self {
            Self::H1(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
            Self::H2(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
        }
    }

    fn clone_h2(&self) -> Option<Self> {
        match self {
            Self::H2(s) => Some(Self::H2(s.clone())),
            Self::H1(_) => None,
        }
    }
}

/// One request: (latency, time to first body byte, gaps between body frames) in µs
/// from `from`, or an error.
async fn one(
    conn: &mut Conn,
    a: &Args,
    body: &Bytes,
    from: Instant,
    gaps: &mut Vec<u64>,
) -> anyhow::Result<(u64, u64)> {
    // HTTP/1.1 sends the path alone (origin form); HTTP/2 needs scheme and authority.
    let target = if a.http2 {
        a.url.clone()
    } else {
        a.url.path_and_query().map_or("/", |p| p.as_str()).parse()?
    };
    let mut req = Request::post(target)
        .header(header::CONTENT_TYPE, "application/json")
        .header(
            header::AUTHORIZATION,
            "Bearer sk-bench-00000000000000000000000000",
        )
        .body(Full::new(body.clone()))?;
    if !a.http2 {
        let host = a.url.authority().map(|x| x.as_str()).unwrap_or("127.0.0.1");
        req.headers_mut().insert(header::HOST, host.parse()?);
    }
    let resp = conn.send(req).await?;
    anyhow::ensure!(resp.status().is_success(), "status {}", resp.status());
    let mut body = resp.into_body();
    let mut first = None;
    let mut last = Instant::now();
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        if frame.data_ref().is_some_and(|d| !d.is_empty()) {
            let now = Instant::now();
            match first {
                None => first = Some(now),
                Some(_) => gaps.push(now.duration_since(last).as_micros() as u64),
            }
            last = now;
        }
    }
    let done = Instant::now();
    let us = |t: Instant| t.duration_since(from).as_micros() as u64;
    Ok((us(done), us(first.unwrap_or(done))))
}

const TIMER_SLACK: Duration = Duration::from_millis(2);

/// One connection's (or HTTP/2 stream's) loop until `end`.
async fn worker(
    mut conn: Conn,
    a: Arc<Args>,
    body: Bytes,
    measure_from: Instant,
    end: Instant,
    interval: Option<Duration>,
    offset: Duration,
) -> Hists {
    let mut h = Hists::new();
    let mut gaps = Vec::new();
    let mut next = Instant::now() + offset;
    while Instant::now() < end {
        let intended = match interval {
            Some(iv) => {
                tokio::time::sleep_until(next.into()).await;
                let t = next;
                next += iv;
                // Tokio's timer wakes up to a millisecond late. Lateness within that is
                // the timer's, and the request is timed from when it went; beyond it the
                // sender is behind (a slow answer held it), and the wait counts.
                let now = Instant::now();
                if now.duration_since(t) < TIMER_SLACK {
                    now
                } else {
                    t
                }
            }
            None => Instant::now(),
        };
        if intended >= end {
            break;
        }
        gaps.clear();
        match one(&mut conn, &a, &body, intended, &mut gaps).await {
            Ok((lat, ttfb)) => {
                h.completed_all += 1;
                if intended >= measure_from {
                    h.ok += 1;
                    let _ = h.latency.record(lat.max(1));
                    if a.stream {
                        let _ = h.ttfb.record(ttfb.max(1));
                        for g in &gaps {
                            let _ = h.gap.record((*g).max(1));
                        }
                    }
                }
            }
            Err(e) => {
                h.errors += 1;
                h.first_error.get_or_insert_with(|| format!("{e:#}"));
                match Conn::open(&a).await {
                    Ok(c) => conn = c,
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        }
    }
    h
}

pub fn main(a: Args) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(a.threads.max(1))
        .enable_all()
        .build()?;
    let body = prompt_body(a.prompt_bytes, a.stream);
    let a = Arc::new(a);
    let out = rt.block_on(async move {
        let mut conns = Vec::new();
        for _ in 0..a.connections {
            conns.push(Conn::open(&a).await?);
        }
        let workers_per_conn = if a.http2 { a.streams.max(1) } else { 1 };
        let n = a.connections * workers_per_conn;
        let interval = a
            .rate
            .map(|r| Duration::from_secs_f64(n as f64 / r.max(0.001)));
        let start = Instant::now();
        let measure_from = start + Duration::from_secs_f64(a.warmup);
        let end = measure_from + Duration::from_secs_f64(a.duration);
        let all = Arc::new(Mutex::new(Hists::new()));
        let mut tasks = Vec::new();
        let mut i = 0;
        for conn in conns {
            let mut conn = Some(conn);
            for _ in 0..workers_per_conn {
                let c = match conn.as_ref().and_then(Conn::clone_h2) {
                    Some(c) => c,
                    None => match conn.take() {
                        Some(c) => c,
                        None => break,
                    },
                };
                // Open-loop senders start staggered across one interval.
                let offset = interval.map_or(Duration::ZERO, |iv| iv.mul_f64(i as f64 / n as f64));
                i += 1;
                let (a, body, all) = (a.clone(), body.clone(), all.clone());
                tasks.push(tokio::spawn(async move {
                    let h = worker(c, a, body, measure_from, end, interval, offset).await;
                    all.lock().unwrap_or_else(|p| p.into_inner()).merge(&h);
                }));
            }
        }
        for t in tasks {
            t.await?;
        }
        let elapsed = Instant::now().duration_since(measure_from).as_secs_f64();
        let h = all.lock().unwrap_or_else(|p| p.into_inner()).clone();
        anyhow::Ok(json!({
            "requests": h.ok,
            "completed_all": h.completed_all,
            "errors": h.errors,
            "seconds": (elapsed * 1000.0).round() / 1000.0,
            "rps": ((h.ok as f64 / a.duration) * 10.0).round() / 10.0,
            "latency_us": summary(&h.latency),
            "ttfb_us": summary(&h.ttfb),
            "gap_us": summary(&h.gap),
            "first_error": h.first_error,
        }))
    })?;
    println!("{out}");
    Ok(())
}
