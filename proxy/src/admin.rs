//! The admin listener: `/metrics` (Prometheus text), `/healthz`, `/readyz`, and
//! `POST /admin/reload` behind a bearer token. Separate from the proxy listener so
//! that it can stay on loopback or a pod-internal port.

use std::{
    convert::Infallible,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::registry::Registry;
use subtle::ConstantTimeEq;
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot},
};

use crate::{server::ReloadRequest, service::Shared};

/// Reads the configuration anew for a reload (the file `serve` was started with).
pub type ReloadSource = Arc<dyn Fn() -> Result<custody_config::Config, String> + Send + Sync>;

pub struct AdminState {
    pub shared: Arc<Shared>,
    pub registry: Registry,
    pub token: Option<String>,
    pub queue_capacity: usize,
    pub reloads: mpsc::UnboundedSender<ReloadRequest>,
    pub reload_source: Option<ReloadSource>,
    /// Set when shutdown begins: not ready any more.
    pub stopping: AtomicBool,
}

/// Serves the admin endpoints until the task is aborted.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
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
        _ => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "no such admin endpoint"}),
        ),
    }
}

/// `/admin/*` needs `Authorization: Bearer <[admin] token>`; without a configured token
/// those endpoints are off. The refusal, if any.
fn unauthorized(state: &AdminState, req: &Request<Incoming>) -> Option<Response<Full<Bytes>>> {
    let Some(token) = &state.token else {
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
