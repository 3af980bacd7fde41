//! The admin listener: `/metrics` (Prometheus text), `/healthz`, `/readyz`, and
//! `POST /admin/reload` and `POST /admin/purge` behind a bearer token. Separate from the proxy listener so
//! that it can stay on loopback or a pod-internal port.

use std::{
    convert::Infallible,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use subtle::ConstantTimeEq;
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot},
};

use crate::{
    connection::{serve_unless_silent, Cap, Seen},
    service::Shared,
};

/// A new configuration to apply, and where to say how it went (the new version, or
/// why it was refused).
pub type ReloadRequest = (
    custody_config::Config,
    oneshot::Sender<Result<String, String>>,
);

/// Reads the configuration anew for a reload (the file `serve` was started with).
pub type ReloadSource = Arc<dyn Fn() -> Result<custody_config::Config, String> + Send + Sync>;

pub struct AdminState {
    pub shared: Arc<Shared>,
    pub registry: Registry,
    /// Replaced on reload: the token of the configuration in force.
    pub token: arc_swap::ArcSwapOption<String>,
    pub queue_capacity: usize,
    pub reloads: mpsc::UnboundedSender<ReloadRequest>,
    pub reload_source: Option<ReloadSource>,
    /// The writer, for data subjects' purges.
    pub writer: custody_audit::writer::ConfigHandle,
    /// Set when shutdown begins: not ready any more.
    pub stopping: AtomicBool,
}

/// Admin connections open at once (scrapers, probes, an operator); more are closed.
pub const ADMIN_MAX_CONNECTIONS: usize = 64;
/// The longest an admin connection may take to send a request head, or stay idle
/// (`[limits] client_timeout_secs` when shorter).
const ADMIN_HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the admin endpoints until the task is aborted. Bounded like the proxy
/// listener: a connection cap and a deadline for each request head, the first included.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, head_timeout: Duration) {
    let head_timeout = head_timeout.min(ADMIN_HEAD_TIMEOUT);
    let cap = Cap::new(ADMIN_MAX_CONNECTIONS, 0);
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(head_timeout);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors and the like: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Some(slot) = cap.admit() else {
            state.shared.metrics().connections_refused.inc();
            continue;
        };
        let state = state.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let seen = Seen::default();
            let marker = seen.clone();
            let svc = hyper::service::service_fn(move |req| {
                marker.mark();
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, req).await) }
            });
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            let _ = serve_unless_silent(conn, seen, head_timeout).await;
        });
    }
}

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

fn json(status: StatusCode, v: serde_json::Value) -> Response<Full<Bytes>> {
    reply(status, "application/json", v.to_string())
}

async fn handle(state: &AdminState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, &state.registry) {
                Ok(()) => reply(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    text,
                ),
                Err(_) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    "encoding failed",
                ),
            }
        }
        (&Method::GET, "/healthz") => reply(StatusCode::OK, "text/plain", "ok\n"),
        (&Method::GET, "/readyz") => {
            let mut reasons = Vec::new();
            if state.stopping.load(Ordering::Relaxed) {
                reasons.push("shutting_down");
            }
            if state.shared.metrics().audit.failing.get() != 0 {
                reasons.push("audit_writer_failing");
            }
            if state.shared.admission.high_water(state.queue_capacity) {
                reasons.push("audit_queue_high_water");
            }
            let status = if reasons.is_empty() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json(
                status,
                serde_json::json!({"ready": reasons.is_empty(), "reasons": reasons}),
            )
        }
        (&Method::POST, "/admin/reload") => {
            if let Some(refusal) = unauthorized(state, &req) {
                return refusal;
            }
            let Some(source) = &state.reload_source else {
                return json(
                    StatusCode::NOT_IMPLEMENTED,
                    serde_json::json!({"error": "this custody has no configuration file to reload"}),
                );
            };
            let config = match source() {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "configuration reload refused; the previous one stays in force");
                    return json(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        serde_json::json!({"error": e}),
                    );
                }
            };
            let (tx, rx) = oneshot::channel();
            if state.reloads.send((config, tx)).is_err() {
                return json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    serde_json::json!({"error": "shutting down"}),
                );
            }
            match rx.await {
                Ok(Ok(version)) => json(StatusCode::OK, serde_json::json!({"version": version})),
                Ok(Err(e)) => json(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    serde_json::json!({"error": e}),
                ),
                Err(_) => json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    serde_json::json!({"error": "shutting down"}),
                ),
            }
        }
        (&Method::POST, "/admin/purge") => {
            if let Some(refusal) = unauthorized(state, &req) {
                return refusal;
            }
            purge(state, req).await
        }
        _ => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "no such admin endpoint"}),
        ),
    }
}

/// The longest `POST /admin/purge` body read: one user or pseudonym.
const PURGE_BODY_MAX: usize = 4096;

/// `POST /admin/purge` with `{"user": "..."}` or `{"pseudonym": "[NAME:8 hex]"}`: what
/// `custody log purge` does, on a running custody (the trail has one writer).
async fn purge(state: &AdminState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    use custody_audit::purge::Selector;
    use http_body_util::BodyExt;
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Ask {
        user: Option<String>,
        pseudonym: Option<String>,
    }
    let bad = |e: &str| json(StatusCode::BAD_REQUEST, serde_json::json!({"error": e}));
    let body = match http_body_util::Limited::new(req.into_body(), PURGE_BODY_MAX)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => return bad("the body is unreadable or longer than 4096 bytes"),
    };
    let selector = match serde_json::from_slice::<Ask>(&body) {
        Ok(Ask {
            user: Some(u),
            pseudonym: None,
        }) if !u.trim().is_empty() => Selector::User(u),
        Ok(Ask {
            user: None,
            pseudonym: Some(p),
        }) => match Selector::pseudonym(&p) {
            Some(s) => s,
            None => return bad("`pseudonym` must be one as redaction writes it: [NAME:8 hex]"),
        },
        _ => return bad("send {\"user\": \"...\"} or {\"pseudonym\": \"[NAME:8 hex]\"}"),
    };
    let writer = state.writer.clone();
    match tokio::task::spawn_blocking(move || writer.purge(selector)).await {
        Ok(Ok(done)) => json(StatusCode::OK, serde_json::json!(done)),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "purge failed");
            json(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"error": e.to_string()}),
            )
        }
        Err(_) => json(
            StatusCode::INTERNAL_SERVER_ERROR,
            serde_json::json!({"error": "the purge task failed"}),
        ),
    }
}

/// `/admin/*` needs `Authorization: Bearer <[admin] token>`; without a configured token
/// those endpoints are off. The refusal, if any.
fn unauthorized(state: &AdminState, req: &Request<Incoming>) -> Option<Response<Full<Bytes>>> {
    let token = state.token.load();
    let Some(token) = token.as_deref() else {
        return Some(json(
            StatusCode::FORBIDDEN,
            serde_json::json!({"error": "admin endpoints are off: set [admin] token_env"}),
        ));
    };
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .unwrap_or_default();
    if bool::from(presented.ct_eq(token.as_bytes())) {
        return None;
    }
    let mut r = json(
        StatusCode::UNAUTHORIZED,
        serde_json::json!({"error": "missing or wrong admin token"}),
    );
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    Some(r)
}
