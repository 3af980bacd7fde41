//! Limits on a body in flight: the longest silence between two frames, a deadline for
//! the whole exchange, and (for request bodies) a size cap. One timer per body, reset
//! per frame without allocating.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

/// Why a limited body stopped.
#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error("{side} idle for more than {secs}s: timed out")]
    Idle { side: &'static str, secs: u64 },
    #[error("exchange took longer than {secs}s: timed out")]
    Total { secs: u64 },
    #[error("request body exceeds {limit} bytes")]
    TooLarge { limit: u64 },
    #[error(transparent)]
    Inner(Box<dyn std::error::Error + Send + Sync>),
}

/// What a body may do.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub side: &'static str,
    pub idle: Option<Duration>,
    /// When the whole exchange must be over, and its length (for the message).
    pub deadline: Option<Instant>,
    pub total_secs: u64,
    pub max_bytes: Option<u64>,
}

pin_project! {
    pub struct Limited<B> {
        #[pin]
        inner: B,
        limits: Limits,
        seen: u64,
        timer: Option<Pin<Box<Sleep>>>,
    }
}

impl<B> Limited<B> {
    pub fn new(inner: B, limits: Limits) -> Self {
        let timer = next_deadline(&limits).map(|at| Box::pin(tokio::time::sleep_until(at)));
        Self {
            inner,
            limits,
            seen: 0,
            timer,
        }
    }
}

fn next_deadline(l: &Limits) -> Option<Instant> {
    let idle = l.idle.map(|d| Instant::now() + d);
    match (idle, l.deadline) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl<B> Body for Limited<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = LimitError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, LimitError>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    *this.seen += data.len() as u64;
                    if let Some(limit) = this.limits.max_bytes.filter(|l| *this.seen > *l) {
                        return Poll::Ready(Some(Err(LimitError::TooLarge { limit })));
                    }
                }
                if let (Some(t), Some(at)) = (this.timer.as_mut(), next_deadline(this.limits)) {
                    t.as_mut().reset(at);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(LimitError::Inner(e.into())))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let Some(t) = this.timer.as_mut() else {
                    return Poll::Pending;
                };
                if t.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                let over = this.limits.deadline.is_some_and(|d| Instant::now() >= d);
                let e = match (over, this.limits.deadline, this.limits.idle) {
                    (true, Some(_), _) | (_, Some(_), None) => LimitError::Total {
                        secs: this.limits.total_secs,
                    },
                    _ => LimitError::Idle {
                        side: this.limits.side,
                        secs: this.limits.idle.map_or(0, |d| d.as_secs()),
                    },
                };
                // Once: a body that errs is not polled again.
                *this.timer = None;
                Poll::Ready(Some(Err(e)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
