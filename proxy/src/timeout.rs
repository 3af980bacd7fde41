//! Limits on a body in flight: the longest silence between two frames, a deadline for
//! the whole exchange, and (for request bodies) a size cap.
//!
//! The timer is lazy: a body that is ready whenever it is polled (a small chat body
//! arrives with its head) never creates one, and a frame only notes the time. The
//! timer is armed at the first wait; when it fires early because frames came since,
//! it is moved to the real deadline. So a streamed response costs one timer, not a
//! timer-wheel update per chunk.

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
        // The last frame (or the start): idle time counts from here.
        last: Instant,
        timer: Option<Pin<Box<Sleep>>>,
    }
}

impl<B> Limited<B> {
    pub fn new(inner: B, limits: Limits) -> Self {
        Self {
            inner,
            limits,
            seen: 0,
            last: Instant::now(),
            timer: None,
        }
    }
}

/// When the body must have sent its next frame (or ended).
fn due(l: &Limits, last: Instant) -> Option<Instant> {
    let idle = l.idle.map(|d| last + d);
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
                if this.limits.idle.is_some() {
                    *this.last = Instant::now();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(LimitError::Inner(e.into())))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let Some(at) = due(this.limits, *this.last) else {
                    return Poll::Pending;
                };
                let t = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
                if t.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                if at > Instant::now() {
                    // Fired at an older deadline: frames came since. Wait for the real one.
                    t.as_mut().reset(at);
                    if t.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    /// A body whose frames come from `rx`, limited to `idle` between frames.
    fn limited(
        idle: Duration,
    ) -> (
        tokio::sync::mpsc::Sender<Bytes>,
        Limited<impl Body<Data = Bytes, Error = std::convert::Infallible>>,
    ) {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(4);
        let frames = futures_util::stream::poll_fn(move |cx| {
            rx.poll_recv(cx)
                .map(|b| b.map(|b| Ok::<_, std::convert::Infallible>(Frame::data(b))))
        });
        let limits = Limits {
            side: "upstream",
            idle: Some(idle),
            deadline: None,
            total_secs: 0,
            max_bytes: None,
        };
        (tx, Limited::new(StreamBody::new(frames), limits))
    }

    #[tokio::test(start_paused = true)]
    async fn frames_keep_a_body_alive_past_its_first_idle_deadline_and_silence_ends_it() {
        let (tx, mut body) = limited(Duration::from_secs(1));
        let sender = tokio::spawn(async move {
            // Five frames 600 ms apart: three seconds, never a second of silence.
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_millis(600)).await;
                tx.send(Bytes::from_static(b"x")).await.unwrap();
            }
            // Then silence, with the sender kept open.
            tokio::time::sleep(Duration::from_secs(10)).await;
            drop(tx);
        });
        for _ in 0..5 {
            let frame = body.frame().await.unwrap().unwrap();
            assert_eq!(frame.into_data().unwrap(), "x");
        }
        let started = Instant::now();
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(matches!(err, LimitError::Idle { secs: 1, .. }), "{err}");
        assert_eq!(started.elapsed(), Duration::from_secs(1));
        sender.abort();
    }
}
