//! Helpers for custody's integration tests: a recording mock upstream, a harness that
//! runs custody in-process on `127.0.0.1:0`, an HTTP client, and trail readers.
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod console;
pub mod evidence;

use std::{
    convert::Infallible,
    net::SocketAddr,
    ops::ControlFlow,
    path::Path,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use custody_config::{Config, Provider, Route};
use http::{request::Parts, Request, Response};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use serde_json::Value;
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot},
    task::JoinHandle,
};

pub type MockBody = BoxBody<Bytes, std::io::Error>;
/// Feeds a streamed mock response; an `Err` breaks the stream.
pub type ChunkSender = mpsc::Sender<Result<Bytes, std::io::Error>>;
type Handler = Arc<dyn Fn(&Parts, &Bytes) -> Response<MockBody> + Send + Sync>;

/// What the upstream received: the head and the whole body.
#[derive(Debug)]
pub struct Recorded {
    pub parts: Parts,
    pub body: Bytes,
}

/// A mock upstream on loopback that records every request into a channel and answers
/// with a handler.
pub struct MockUpstream {
    pub addr: SocketAddr,
    pub requests: mpsc::UnboundedReceiver<Recorded>,
}

impl MockUpstream {
    pub async fn start(
        handler: impl Fn(&Parts, &Bytes) -> Response<MockBody> + Send + Sync + 'static,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, requests) = mpsc::unbounded_channel();
        let handler: Handler = Arc::new(handler);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (tx, handler) = (tx.clone(), handler.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (tx, handler) = (tx.clone(), handler.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|c| c.to_bytes())
                                .unwrap_or_default();
                            let resp = handler(&parts, &body);
                            let _ = tx.send(Recorded { parts, body });
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self { addr, requests }
    }

    /// The next request the upstream received.
    pub async fn next(&mut self) -> Recorded {
        self.requests.recv().await.expect("mock upstream stopped")
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// A full response with these headers and body.
pub fn respond(
    status: u16,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Response<MockBody> {
    let mut r = Response::new(
        Full::new(body.into())
            .map_err(|e: Infallible| match e {})
            .boxed(),
    );
    *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
    for (k, v) in headers {
        r.headers_mut().append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    r
}

/// A streamed response whose chunks the test sends (an `Err` breaks the stream).
pub fn respond_stream(
    status: u16,
    headers: &[(&str, &str)],
    chunks: mpsc::Receiver<Result<Bytes, std::io::Error>>,
) -> Response<MockBody> {
    let stream = futures_util::stream::unfold(chunks, |mut rx| async move {
        rx.recv().await.map(|c| (c.map(Frame::data), rx))
    });
    let mut r = Response::new(StreamBody::new(stream).boxed());
    *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
    for (k, v) in headers {
        r.headers_mut().append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    r
}

/// A handler answering once with a stream fed by the returned sender.
pub fn one_stream(
    headers: &'static [(&'static str, &'static str)],
) -> (ChunkSender, impl Fn(&Parts, &Bytes) -> Response<MockBody>) {
    let (tx, rx) = mpsc::channel(64);
    let slot = Mutex::new(Some(rx));
    let handler = move |_: &Parts, _: &Bytes| {
        let rx = slot
            .lock()
            .unwrap()
            .take()
            .expect("one_stream answers once");
        respond_stream(200, headers, rx)
    };
    (tx, handler)
}

/// What [`answering_upstream`] answers now: the model it names, the finish reason, and
/// how long its body takes after the head (the provider's latency).
#[derive(Debug, Clone)]
pub struct Answer {
    pub model: String,
    pub finish: String,
    pub delay: std::time::Duration,
}

impl Answer {
    pub fn model(model: &str) -> Arc<Mutex<Answer>> {
        Arc::new(Mutex::new(Answer {
            model: model.into(),
            finish: "stop".into(),
            delay: std::time::Duration::ZERO,
        }))
    }
}

/// An OpenAI-shaped chat upstream answering as `answer` says at each request, with
/// fixed usage and fingerprint.
pub async fn answering_upstream(answer: Arc<Mutex<Answer>>) -> MockUpstream {
    MockUpstream::start(move |_, _| {
        let a = answer.lock().unwrap().clone();
        let body = Bytes::from(format!(
            r#"{{"id":"x","model":"{}","system_fingerprint":"fp_1","choices":[{{"index":0,"message":{{"role":"assistant","content":"ok"}},"finish_reason":"{}"}}],"usage":{{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}}}"#,
            a.model, a.finish
        ));
        if a.delay.is_zero() {
            return respond(200, &[("content-type", "application/json")], body);
        }
        let delayed = futures_util::stream::once(async move {
            tokio::time::sleep(a.delay).await;
            Ok::<_, std::io::Error>(Frame::data(body))
        });
        let mut r = Response::new(StreamBody::new(delayed).boxed());
        r.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        r
    })
    .await
}

/// An upstream that answers every request with a small chat completion.
pub async fn chat_upstream() -> MockUpstream {
    MockUpstream::start(|_, _| {
        respond(
            200,
            &[("content-type", "application/json")],
            r#"{"id":"x","model":"m","choices":[]}"#,
        )
    })
    .await
}

/// The `openai` route on `/v1/` to this upstream.
pub fn openai_route(up: &MockUpstream) -> Route {
    route("openai", "/v1/", &up.url(), Provider::Openai, false)
}

pub fn route(
    name: &str,
    prefix: &str,
    upstream: &str,
    provider: Provider,
    strip_prefix: bool,
) -> Route {
    Route {
        name: name.into(),
        prefix: prefix.into(),
        upstream: upstream.parse().unwrap(),
        provider,
        strip_prefix,
        upstream_key_env: None,
    }
}

/// The writer's gate, opened again when dropped: a failing test must not leave the
/// writer held still.
pub struct Gate(pub custody_audit::writer::WriterGate);

impl std::ops::Deref for Gate {
    type Target = custody_audit::writer::WriterGate;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.0.open();
    }
}

/// Custody running in-process on `127.0.0.1:0` with a fresh audit directory.
pub struct Custody {
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    reloads: mpsc::UnboundedSender<custody_proxy::ReloadRequest>,
    /// The configuration custody was started with.
    pub config: Config,
    /// The admin listener (`/metrics`, `/readyz`, `/admin/reload`).
    pub admin_addr: SocketAddr,
    /// Closing it holds the writer still: a deliberately slow writer.
    pub gate: Gate,
    /// What `POST /admin/reload` reads as "the file".
    pub reload_file: Arc<Mutex<Option<Config>>>,
    task: JoinHandle<Result<custody_proxy::RunSummary, custody_proxy::ProxyError>>,
}

impl Custody {
    pub async fn start(routes: Vec<Route>) -> Self {
        Self::start_with(routes, |_| {}).await
    }

    pub async fn start_with(routes: Vec<Route>, tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, routes, tweak).await
    }

    /// Starts on an existing audit directory (a restart).
    pub async fn start_in(
        dir: tempfile::TempDir,
        routes: Vec<Route>,
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        Self::start_gated(dir, routes, tweak, Default::default()).await
    }

    /// [`Custody::start_in`] with a writer gate made beforehand (one whose clock runs
    /// ahead, for retention).
    pub async fn start_gated(
        dir: tempfile::TempDir,
        routes: Vec<Route>,
        tweak: impl FnOnce(&mut Config),
        gate: custody_audit::writer::WriterGate,
    ) -> Self {
        let mut config = Config::for_test(dir.path().join("audit"), routes);
        tweak(&mut config);
        let config = config.validate("test").unwrap();
        let listener = TcpListener::bind(config.listen.addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let (reloads, reload_rx) = mpsc::unbounded_channel();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let reload_file: Arc<Mutex<Option<Config>>> = Arc::default();
        let file = reload_file.clone();
        let opts = custody_proxy::RunOptions {
            reloads: Some(reload_rx),
            admin: Some(admin),
            reload_source: Some(Arc::new(move || {
                file.lock()
                    .unwrap()
                    .clone()
                    .ok_or_else(|| "no configuration file".to_owned())
            })),
            writer_gate: Some(gate.clone()),
        };
        let task = tokio::spawn(custody_proxy::run_with(
            listener,
            config.clone(),
            async {
                let _ = stopped.await;
            },
            opts,
        ));
        Self {
            addr,
            dir,
            stop: Some(stop),
            reloads,
            config,
            admin_addr,
            gate: Gate(gate),
            reload_file,
            task,
        }
    }

    /// Applies a new configuration as SIGHUP does; the new version, or why not.
    pub async fn reload(&self, config: Config) -> Result<String, String> {
        let (tx, rx) = oneshot::channel();
        self.reloads
            .send((config, tx))
            .map_err(|_| "custody has stopped".to_owned())?;
        rx.await.map_err(|_| "custody has stopped".to_owned())?
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin_addr, path)
    }

    /// The value of one sample line of `/metrics` (`name{labels}`), 0 when absent.
    pub async fn metric(&self, sample: &str) -> f64 {
        let req = Request::get(self.admin_url("/metrics"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let (_, body) = send(&client(), req).await;
        String::from_utf8_lossy(&body)
            .lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    /// Waits until `/metrics` shows `sample` with a value that is `ok` (a condition,
    /// not a fixed delay); fails after 30 s naming the last value.
    pub async fn until_metric(&self, sample: &str, ok: impl Fn(f64) -> bool) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let v = self.metric(sample).await;
            if ok(v) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{sample} stuck at {v}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    pub fn audit_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("audit")
    }

    /// Signals shutdown (as SIGTERM does) without waiting for it.
    pub fn signal_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Shuts down in order (in-flight exchanges finish, the queue drains, the segment
    /// closes) and returns the records written, oldest first.
    pub async fn stop(mut self) -> Stopped {
        self.signal_stop();
        let summary = self.task.await.unwrap().unwrap();
        let all = trail(&self.dir.path().join("audit"));
        let (records, events) = all
            .iter()
            .cloned()
            .partition(|l| l["schema"] == custody_audit::record::SCHEMA);
        Stopped {
            summary,
            records,
            events,
            trail: all,
            dir: self.dir,
        }
    }
}

pub struct Stopped {
    pub summary: custody_proxy::RunSummary,
    /// Exchange records, oldest first.
    pub records: Vec<Value>,
    /// Event records (config, recovery, retention), oldest first.
    pub events: Vec<Value>,
    /// Both, in chain order.
    pub trail: Vec<Value>,
    pub dir: tempfile::TempDir,
}

impl Stopped {
    pub fn audit_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("audit")
    }

    /// The `seq` of every record, in trail order.
    pub fn seqs(&self) -> Vec<u64> {
        self.records
            .iter()
            .map(|r| r["seq"].as_u64().unwrap())
            .collect()
    }

    /// The first event of `kind` (`gap`, `config`, `recovery`...); fails if there is none.
    pub fn event(&self, kind: &str) -> &Value {
        self.events
            .iter()
            .find(|e| e["event"]["type"] == kind)
            .unwrap_or_else(|| panic!("no {kind} event in {:#?}", self.events))
    }

    /// The only record; fails if there is not exactly one.
    pub fn one(&self) -> &Value {
        assert_eq!(self.records.len(), 1, "records: {:#?}", self.records);
        &self.records[0]
    }
}

/// Every exchange record in the trail, oldest first.
pub fn records(dir: &Path) -> Vec<Value> {
    trail(dir)
        .into_iter()
        .filter(|l| l["schema"] == custody_audit::record::SCHEMA)
        .collect()
}

/// Every line of the trail (records and events), oldest first.
pub fn trail(dir: &Path) -> Vec<Value> {
    let mut out = Vec::new();
    custody_audit::review::reader::for_each_line(dir, |_, line| {
        out.push(serde_json::from_slice(line).unwrap());
        ControlFlow::Continue(())
    })
    .unwrap();
    out
}

/// Every byte under the audit directory, as stored and with every zstd frame decoded,
/// for "this secret appears nowhere" assertions.
pub fn all_audit_bytes(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for entry in walk(dir) {
        let bytes = std::fs::read(&entry).unwrap();
        if entry.extension().is_some_and(|e| e == "seg") {
            out.extend(zstd::stream::decode_all(&bytes[..]).unwrap());
        }
        out.extend(bytes);
    }
    out
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// A segment file parsed, with its record lines (for tests that tamper with it).
pub fn segment_lines(path: &Path) -> (custody_audit::segment::ParsedSegment, Vec<Vec<u8>>) {
    let bytes = std::fs::read(path).unwrap();
    let parsed = custody_audit::segment::parse_segment(&bytes).unwrap();
    let lines = parsed
        .blocks
        .iter()
        .flat_map(|b| b.lines().map(<[u8]>::to_vec).collect::<Vec<_>>())
        .collect();
    (parsed, lines)
}

pub fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

pub type TestClient = Client<HttpConnector, Full<Bytes>>;

/// An HTTP/1.1 client.
pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// An HTTP/2 cleartext (prior knowledge) client.
pub fn h2_client() -> TestClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// Sends a request and collects the whole response.
pub async fn send(
    client: &TestClient,
    req: Request<Full<Bytes>>,
) -> (http::response::Parts, Bytes) {
    let resp = client.request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    (parts, body.collect().await.unwrap().to_bytes())
}

pub fn post(url: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    let mut b = Request::post(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(body.into())).unwrap()
}

/// The Python of `.venv-tools` (opentelemetry-proto, kuzu, networkx: installed by
/// `tests/run.sh`), or `CUSTODY_TOOLS_PYTHON`.
pub fn tools_python() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("CUSTODY_TOOLS_PYTHON") {
        return p.into();
    }
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv-tools/bin/python");
    assert!(
        local.exists(),
        "the tools venv is missing: run tests/run.sh (it installs tests/requirements-tools.txt into .venv-tools) or set CUSTODY_TOOLS_PYTHON"
    );
    local
}
