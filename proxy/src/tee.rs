//! The tee: a body wrapper that forwards every frame untouched, keeps `Bytes` clones
//! for the record, and reports its end exactly once: end of stream, trailers,
//! `is_end_stream()` after a data frame, an error, or drop (abandoned).
//!
//! Both bodies of an exchange and the request's service future share one [`InFlight`];
//! whichever lets go of it last hands the finished [`Exchange`] to the audit queue, so
//! an exchange is submitted once, when nothing more can be learned about it.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{ready, Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use custody_audit::{AuditSender, Capture, Exchange, Outcome};

use crate::metrics::ProxyMetrics;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::sync::oneshot;

/// Where ended exchanges go: the metrics, the optional exchange log line, the audit queue.
pub struct Reporter {
    pub audit: AuditSender,
    pub metrics: Arc<ProxyMetrics>,
    pub log_exchanges: bool,
}

impl Reporter {
    /// Counts the exchange and, when it holds an audit permit, queues it. One without a
    /// permit was admitted unaudited (`on_full = "drop"`) and is already counted as lost.
    fn report(&self, ex: Exchange) {
        self.metrics.observe(&ex);
        if self.log_exchanges {
            let ms = |t: Option<Instant>| {
                t.map_or(-1.0, |t| {
                    t.saturating_duration_since(ex.started).as_secs_f64() * 1e3
                })
            };
            tracing::info!(
                target: "custody::exchange",
                route = ex.route.as_deref().unwrap_or("-"),
                method = %ex.method,
                path = ex.upstream_path.as_deref().unwrap_or("-"),
                status = ex.status.map_or(0, |s| s.as_u16()),
                outcome = ex.outcome.as_str(),
                duration_ms = ms(ex.ended_at),
                ttfb_ms = ms(ex.response_head_at),
                request_bytes = ex.request.total,
                response_bytes = ex.response.total,
                key_id = ex.identity.as_ref().map(|i| &*i.key_id),
                audited = ex.permit.is_some(),
            );
        }
        if ex.permit.is_some() {
            self.audit.submit(ex);
        }
    }
}

/// One exchange while it is in flight.
pub struct InFlight {
    exchange: Mutex<Option<Exchange>>,
    reporter: Arc<Reporter>,
}

impl InFlight {
    pub fn new(exchange: Exchange, reporter: Arc<Reporter>) -> Arc<Self> {
        Arc::new(Self {
            exchange: Mutex::new(Some(exchange)),
            reporter,
        })
    }

    /// Edits the exchange. Uncontended in practice: each side locks once, at its end.
    pub fn update(&self, f: impl FnOnce(&mut Exchange)) {
        let mut guard = self.exchange.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(ex) = guard.as_mut() {
            f(ex);
        }
    }
}

impl InFlight {
    /// Hands the exchange over now, with a channel the writer answers once its record
    /// is fsynced; `None` when it is not audited (nothing to wait for).
    fn submit_durable(&self) -> Option<oneshot::Receiver<()>> {
        let mut guard = self.exchange.lock().unwrap_or_else(PoisonError::into_inner);
        let mut ex = guard.take()?;
        if ex.permit.is_none() {
            *guard = Some(ex);
            return None;
        }
        drop(guard);
        let (tx, rx) = oneshot::channel();
        ex.durable = Some(tx);
        self.reporter.report(ex);
        Some(rx)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let slot = self
            .exchange
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(ex) = slot.take() {
            self.reporter.report(ex);
        }
    }
}

/// Which body of the exchange a tee wraps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Request,
    Response,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Complete,
    Error,
    Dropped,
}

pin_project! {
    /// See the module doc.
    pub struct TeeBody<B: Body> {
        #[pin]
        inner: B,
        side: Side,
        cap: usize,
        capture: Capture,
        first_chunk_at: Option<Instant>,
        inflight: Option<Arc<InFlight>>,
        // `durability = "durable"` (response side): the end waits for the record's fsync.
        durable: bool,
        waiting: Option<oneshot::Receiver<()>>,
        held: Option<Option<Result<Frame<Bytes>, B::Error>>>,
    }

    impl<B: Body> PinnedDrop for TeeBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            // An empty body (204, HEAD, GET) may be dropped without a poll: that is its end.
            let end = if this.inner.is_end_stream() { End::Complete } else { End::Dropped };
            let _ = finish(this.inflight, *this.side, this.capture, *this.first_chunk_at, end, None);
        }
    }
}

impl<B: Body> TeeBody<B> {
    pub fn new(inner: B, side: Side, cap: usize, inflight: Arc<InFlight>) -> Self {
        Self {
            inner,
            side,
            cap,
            capture: Capture::default(),
            first_chunk_at: None,
            inflight: Some(inflight),
            durable: false,
            waiting: None,
            held: None,
        }
    }

    /// Holds the end of the body until the exchange's record is fsynced.
    pub fn durable(mut self, on: bool) -> Self {
        self.durable = on;
        self
    }
}

fn finish(
    inflight: &mut Option<Arc<InFlight>>,
    side: Side,
    capture: &mut Capture,
    first_chunk_at: Option<Instant>,
    end: End,
    error: Option<String>,
) -> Option<Arc<InFlight>> {
    let state = inflight.take()?;
    let mut capture = std::mem::take(capture);
    capture.complete = end == End::Complete;
    let now = Instant::now();
    state.update(|ex| match side {
        Side::Request => {
            ex.request = capture;
            if let Some(e) = error {
                ex.error = Some(format!("request body: {e}"));
            }
        }
        Side::Response => {
            ex.response = capture;
            ex.first_chunk_at = first_chunk_at;
            ex.ended_at = Some(now);
            match end {
                End::Complete => ex.outcome = Outcome::Ok,
                End::Error => {
                    // A stalled stream or an exchange past its total limit timed out.
                    let timed_out = error.as_deref().is_some_and(|e| e.contains("timed out"));
                    ex.outcome = if timed_out {
                        Outcome::UpstreamTimeout
                    } else {
                        Outcome::UpstreamError
                    };
                    ex.error = error.map(|e| format!("upstream body: {e}"));
                }
                // A client may close as soon as it read the stream's last event
                // (openai-python does, on `[DONE]`): it has the whole answer.
                End::Dropped if delivered_whole_stream(ex) => ex.outcome = Outcome::Ok,
                End::Dropped => ex.outcome = Outcome::ClientCancelled,
            }
        }
    });
    Some(state)
}

/// How much of a stream's end is read to find its last event (a Responses API
/// `response.completed` carries the whole response).
const TERMINAL_TAIL: usize = 64 * 1024;

/// Whether a response cut by its client is an event stream whose protocol-level end
/// was forwarded. Runs once, when a stream is dropped, never per frame.
fn delivered_whole_stream(ex: &Exchange) -> bool {
    let sse = ex
        .response_headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    sse && !ex.response.truncated
        && custody_audit::sse::ends_with_terminal_event(&ex.response.tail(TERMINAL_TAIL))
}

/// A tee's error: its body's, or (durable mode) a record that could not be fsynced, so
/// the response must not look complete.
#[derive(Debug, thiserror::Error)]
pub enum TeeError {
    #[error(transparent)]
    Inner(Box<dyn std::error::Error + Send + Sync>),
    #[error("the audit record of this exchange could not be made durable")]
    NotDurable,
}

fn inner<E: Into<Box<dyn std::error::Error + Send + Sync>>>(e: E) -> TeeError {
    TeeError::Inner(e.into())
}

impl<B> Body for TeeBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display + Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = TeeError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        // Durable mode: the end waits until its record is on disk.
        if let Some(rx) = this.waiting.as_mut() {
            let synced = ready!(Pin::new(rx).poll(cx));
            *this.waiting = None;
            let held = this.held.take().flatten();
            return Poll::Ready(match synced {
                Ok(()) => held.map(|r| r.map_err(inner)),
                Err(_) => Some(Err(TeeError::NotDurable)),
            });
        }
        let polled = ready!(this.inner.as_mut().poll_frame(cx));
        let end = match &polled {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    if this.first_chunk_at.is_none() && !data.is_empty() {
                        *this.first_chunk_at = Some(Instant::now());
                    }
                    this.capture.push(data, *this.cap);
                }
                // A consumer that knows the length may never poll again.
                (frame.is_trailers() || this.inner.is_end_stream()).then_some((End::Complete, None))
            }
            Some(Err(e)) => Some((End::Error, Some(e.to_string()))),
            None => Some((End::Complete, None)),
        };
        let Some((end, error)) = end else {
            return Poll::Ready(polled.map(|r| r.map_err(inner)));
        };
        let state = finish(
            this.inflight,
            *this.side,
            this.capture,
            *this.first_chunk_at,
            end,
            error,
        );
        if let (Some(state), true, Side::Response, End::Complete) =
            (state, *this.durable, *this.side, end)
        {
            if let Some(mut rx) = state.submit_durable() {
                if Pin::new(&mut rx).poll(cx).is_pending() {
                    *this.held = Some(polled);
                    *this.waiting = Some(rx);
                    return Poll::Pending;
                }
            }
        }
        Poll::Ready(polled.map(|r| r.map_err(inner)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The request body as the upstream client sees it, with a way back: when the upstream
/// cannot be reached, the client drops the request without reading its body, and the
/// record would lack the prompt. [`Handback::take`] recovers the body so custody can
/// read it into the record. One shared slot per request; a poll takes an uncontended lock.
pub struct Handoff<B> {
    slot: Arc<std::sync::Mutex<Slot<B>>>,
}

/// The service's side of a [`Handoff`].
pub struct Handback<B> {
    slot: Arc<std::sync::Mutex<Slot<B>>>,
}

struct Slot<B> {
    body: Option<B>,
    /// The upstream asked for more and the client had not sent it yet: a failure now
    /// is the client's (a trickling body), not the upstream's.
    waiting_on_client: bool,
}

impl<B> Handoff<B> {
    pub fn new(body: B) -> (Self, Handback<B>) {
        let slot = Arc::new(std::sync::Mutex::new(Slot {
            body: Some(body),
            waiting_on_client: false,
        }));
        (Self { slot: slot.clone() }, Handback { slot })
    }
}

impl<B> Handback<B> {
    /// The body, unless the upstream side has finished it; the upstream side then sees
    /// its end.
    pub fn take(&self) -> Option<B> {
        self.slot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .body
            .take()
    }

    /// Whether the request body was still arriving from the client, the upstream
    /// waiting for it, when this was asked.
    pub fn waiting_on_client(&self) -> bool {
        let slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        slot.body.is_some() && slot.waiting_on_client
    }
}

impl<B> Body for Handoff<B>
where
    B: Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        let Some(body) = slot.body.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(&mut *body).poll_frame(cx);
        slot.waiting_on_client = polled.is_pending();
        let polled = ready!(polled);
        if polled.is_none() {
            // Finished: nothing to hand back.
            slot.body = None;
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.slot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .body
            .as_ref()
            .is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.slot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}
