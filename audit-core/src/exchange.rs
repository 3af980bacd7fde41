//! The hand-over type: what the proxy captured of one exchange, sent to the writer.
//!
//! Built on the hot path, so it holds only what was already there: the request and
//! response heads, `Bytes` clones of the body frames, and `Instant`s. All parsing,
//! decoding and redaction happen on the writer thread.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Instant, SystemTime},
};

use bytes::Bytes;
use custody_config::Provider;
use http::{HeaderMap, Method, StatusCode, Uri};

/// How an exchange ended. Serialized as the record's `outcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The response was delivered to the client in full.
    Ok,
    /// The client went away before the response ended.
    ClientCancelled,
    /// The upstream could not be reached or broke the response.
    UpstreamError,
    /// The upstream did not answer in time.
    UpstreamTimeout,
    /// Custody refused the request (no route).
    Rejected,
    /// A policy blocked the request; nothing went upstream.
    Blocked,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::ClientCancelled => "client_cancelled",
            Outcome::UpstreamError => "upstream_error",
            Outcome::UpstreamTimeout => "upstream_timeout",
            Outcome::Rejected => "rejected",
            Outcome::Blocked => "blocked",
        }
    }
}

/// One body as captured: `Bytes` clones of its frames up to a cap.
#[derive(Debug, Default, Clone)]
pub struct Capture {
    /// The captured frames, in order (no copy: clones of the frames forwarded).
    pub chunks: Vec<Bytes>,
    /// Bytes held in `chunks`.
    pub captured: usize,
    /// Bytes seen in all (captured or not).
    pub total: u64,
    /// Bytes were seen beyond the cap and not kept.
    pub truncated: bool,
    /// The body reached its end (false when it was cut or abandoned).
    pub complete: bool,
}

impl Capture {
    /// Keeps `data` if it fits under `cap`; always counts it.
    #[inline]
    pub fn push(&mut self, data: &Bytes, cap: usize) {
        self.total += data.len() as u64;
        if self.truncated || data.is_empty() {
            return;
        }
        if self.captured + data.len() <= cap {
            self.captured += data.len();
            self.chunks.push(data.clone());
        } else {
            // Keep what fits so the record holds a prefix, not nothing.
            let room = cap - self.captured;
            if room > 0 {
                self.chunks.push(data.slice(..room));
                self.captured += room;
            }
            self.truncated = true;
        }
    }

    /// The captured bytes as one contiguous buffer (on the writer thread); borrowed when
    /// the body arrived in one chunk, as most unstreamed bodies do.
    pub fn contiguous(&self) -> std::borrow::Cow<'_, [u8]> {
        match self.chunks.as_slice() {
            [] => std::borrow::Cow::Borrowed(&[]),
            [one] => std::borrow::Cow::Borrowed(one),
            _ => std::borrow::Cow::Owned(self.to_vec()),
        }
    }

    /// The last `n` captured bytes (or all, if fewer), copied.
    pub fn tail(&self, n: usize) -> Vec<u8> {
        let mut need = n.min(self.captured);
        let mut parts = Vec::new();
        for c in self.chunks.iter().rev() {
            if need == 0 {
                break;
            }
            let take = need.min(c.len());
            parts.push(&c[c.len() - take..]);
            need -= take;
        }
        parts.iter().rev().flat_map(|p| p.iter().copied()).collect()
    }

    /// The captured bytes, copied into one buffer.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.captured);
        for c in &self.chunks {
            out.extend_from_slice(c);
        }
        out
    }
}

/// Everything known about one exchange when it ends.
#[derive(Debug)]
pub struct Exchange {
    /// Route name; `None` when no route matched.
    pub route: Option<Arc<str>>,
    pub provider: Provider,
    pub method: Method,
    /// The path and query as the client sent them.
    pub uri: Uri,
    /// The path as forwarded upstream (after `strip_prefix`).
    pub upstream_path: Option<String>,
    pub request_headers: HeaderMap,
    pub client_addr: Option<SocketAddr>,
    pub started_at: SystemTime,
    pub started: Instant,
    pub status: Option<StatusCode>,
    pub response_headers: HeaderMap,
    /// When the upstream's response head arrived.
    pub response_head_at: Option<Instant>,
    /// When the first response body byte arrived.
    pub first_chunk_at: Option<Instant>,
    pub ended_at: Option<Instant>,
    pub request: Capture,
    pub response: Capture,
    pub outcome: Outcome,
    /// A short, secret-free description of what went wrong, if anything did.
    pub error: Option<String>,
    /// Who the virtual key says the client is.
    pub identity: Option<Arc<Identity>>,
    pub trace: Option<TraceContext>,
    /// The configuration version in force at admission.
    pub config_version: Option<Arc<str>>,
    /// When custody sent the request upstream, and when it handed the response head back:
    /// with `started` and `response_head_at`, custody's own share of the time.
    pub upstream_sent_at: Option<Instant>,
    pub response_returned_at: Option<Instant>,
    /// The audit queue slot taken at admission; the writer frees it with the exchange.
    pub permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// Under `durability = "durable"`: told once the record is fsynced, so that the
    /// response's last frame can be released.
    pub durable: Option<tokio::sync::oneshot::Sender<()>>,
    /// What the request-path rules (block, sanitize) decided, when any applied.
    pub policy: Option<Box<RequestDecided>>,
}

/// The request path's policy decisions, carried to the record.
#[derive(Debug, Clone, Default)]
pub struct RequestDecided {
    pub decisions: Vec<crate::record::Decision>,
    /// Entities replaced in the body sent upstream.
    pub sanitized: std::collections::BTreeMap<String, u64>,
}

/// A client authenticated by a virtual key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub key_id: Arc<str>,
    pub user: Option<Arc<str>>,
    pub team: Option<Arc<str>>,
}

/// The W3C trace context custody sent upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    /// The parent span of the upstream request.
    pub span_id: [u8; 8],
    /// Custody started the trace.
    pub generated: bool,
}

impl Exchange {
    /// A fresh exchange at admission; the outcome stays `ClientCancelled` unless
    /// something later says otherwise, so an abandoned exchange is recorded as such.
    pub fn begin(
        method: Method,
        uri: Uri,
        request_headers: HeaderMap,
        client_addr: Option<SocketAddr>,
    ) -> Self {
        Self {
            route: None,
            provider: Provider::Generic,
            method,
            uri,
            upstream_path: None,
            request_headers,
            client_addr,
            started_at: SystemTime::now(),
            started: Instant::now(),
            status: None,
            response_headers: HeaderMap::new(),
            response_head_at: None,
            first_chunk_at: None,
            ended_at: None,
            request: Capture::default(),
            response: Capture::default(),
            outcome: Outcome::ClientCancelled,
            error: None,
            identity: None,
            trace: None,
            config_version: None,
            upstream_sent_at: None,
            response_returned_at: None,
            permit: None,
            durable: None,
            policy: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_keeps_a_prefix_and_counts_everything() {
        let mut c = Capture::default();
        c.push(&Bytes::from_static(b"hello "), 8);
        c.push(&Bytes::from_static(b"world"), 8);
        c.push(&Bytes::from_static(b"!!"), 8);
        assert_eq!(c.to_vec(), b"hello wo");
        assert_eq!(c.total, 13);
        assert!(c.truncated);
    }
}
