//! The request path's policy step: for a route an enforcing `block` or `sanitize`
//! rule applies to, read the request body (up to `[audit] capture_max_bytes`), let
//! the rules decide, and forward what they allow. Other routes never come here.

use std::{
    collections::VecDeque,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use custody_audit::policy::request::{Checked, RequestHead, RequestPolicy};
use http::HeaderValue;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use pin_project_lite::pin_project;

use crate::timeout::{LimitError, Limited};

pin_project! {
    /// A request body custody read before forwarding: the frames it read, then the
    /// rest as it streams (when it stopped reading at its limit).
    pub struct Replay {
        head: VecDeque<Bytes>,
        #[pin]
        rest: Option<Limited<Incoming>>,
    }
}

impl Replay {
    /// What was read, as a [`Read`] again (a body the model check read whole).
    pub fn into_read(self) -> Read {
        Read {
            chunks: self.head.into(),
            rest: self.rest,
        }
    }

    /// A body read whole (or replaced).
    pub fn whole(body: Bytes) -> Self {
        Self {
            head: VecDeque::from([body]),
            rest: None,
        }
    }
}

impl Body for Replay {
    type Data = Bytes;
    type Error = LimitError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, LimitError>>> {
        let this = self.project();
        if let Some(b) = this.head.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        match this.rest.as_pin_mut() {
            Some(rest) => rest.poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_empty() && self.rest.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let head: u64 = self.head.iter().map(|b| b.len() as u64).sum();
        match &self.rest {
            None => SizeHint::with_exact(head),
            Some(r) => {
                let rest = r.size_hint();
                let mut h = SizeHint::new();
                if let Some(u) = rest.upper() {
                    h.set_upper(u + head);
                }
                h.set_lower(rest.lower() + head);
                h
            }
        }
    }
}

/// What the body read for the rules turned into.
pub struct Read {
    /// The frames read, in order.
    pub chunks: Vec<Bytes>,
    /// The rest of the body, when it was longer than the limit.
    pub rest: Option<Limited<Incoming>>,
}

impl Read {
    pub fn complete(&self) -> bool {
        self.rest.is_none()
    }

    /// The bytes read, contiguous (copied only when they came in several frames).
    pub fn bytes(&self) -> Bytes {
        match self.chunks.as_slice() {
            [one] => one.clone(),
            many => {
                let mut v = Vec::with_capacity(many.iter().map(Bytes::len).sum());
                many.iter().for_each(|c| v.extend_from_slice(c));
                Bytes::from(v)
            }
        }
    }

    /// The body to forward unchanged.
    pub fn forward(self) -> Replay {
        Replay {
            head: self.chunks.into(),
            rest: self.rest,
        }
    }
}

/// Reads frames until the body ends or more than `limit` bytes came.
pub async fn read(mut body: Limited<Incoming>, limit: usize) -> Result<Read, LimitError> {
    let mut chunks = Vec::new();
    let mut n = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            n += data.len();
            chunks.push(data);
            if n > limit {
                return Ok(Read {
                    chunks,
                    rest: Some(body),
                });
            }
        }
    }
    Ok(Read { chunks, rest: None })
}

/// Evaluates the request rules on a body read whole; a body too long to read whole is
/// not evaluated, and each rule says so in its decision (and blocks if `on_error`
/// says to). Large bodies are evaluated off the runtime's threads.
pub async fn check(
    policy: &std::sync::Arc<RequestPolicy>,
    head: RequestHead<'_>,
    read: &Read,
    limit: usize,
) -> Checked {
    if !read.complete() {
        let why = format!(
            "request body longer than {limit} bytes ([audit] capture_max_bytes); not evaluated"
        );
        return policy.unread(head.route, &why);
    }
    let body = read.bytes();
    // A chat request of a few KiB takes microseconds; past this, a blocking thread.
    const INLINE_MAX: usize = 256 * 1024;
    if body.len() <= INLINE_MAX {
        return policy.check(&head, &body);
    }
    // One at a time: a parsed body is several times its size, and this keeps the
    // memory policies take bounded (docs/operations.md) whatever arrives at once.
    static LARGE: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);
    let _turn = LARGE.acquire().await;
    let owned = head.to_owned();
    let p = policy.clone();
    tokio::task::spawn_blocking(move || p.check(&owned.as_head(), &body))
        .await
        .unwrap_or_else(|_| policy.unread(head.route, "policy evaluation failed"))
}

/// Sets the headers of a request whose body the rules replaced.
pub fn replaced_body(headers: &mut http::HeaderMap, decoded: bool, len: usize) {
    headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(len));
    headers.remove(http::header::TRANSFER_ENCODING);
    if decoded {
        headers.remove(http::header::CONTENT_ENCODING);
    }
}
