//! Errors of the proxy crate, and the one place where failures become responses.

use bytes::Bytes;
use custody_config::Provider;
use http::{header, HeaderValue, StatusCode};

/// Errors that stop custody from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Config(#[from] custody_config::ConfigError),
    #[error("audit trail: {0}")]
    Audit(#[from] custody_audit::AuditError),
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("route table: {0}")]
    Route(#[from] http::Error),
    #[error("{what}: {reason}")]
    Key { what: String, reason: String },
    #[error("shipping: {0}")]
    Ship(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// Why custody answered instead of the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No route matches the path.
    NoRoute,
    /// The upstream could not be reached (connect, TLS, protocol).
    UpstreamUnreachable,
    /// The upstream did not connect or answer in time.
    UpstreamTimeout,
    /// The request could not be turned into an upstream request.
    BadRequest,
    /// Virtual keys are on and the client presented none that is configured.
    UnknownKey,
    /// The client's virtual key does not allow this route or model.
    KeyNotAllowed,
    /// The audit queue is full and `on_full` does not let unaudited traffic through.
    AuditQueueFull,
    /// The request body is larger than `[limits] max_request_body_bytes`.
    BodyTooLarge,
    /// The request head is larger than `[limits] max_header_bytes`.
    HeadersTooLarge,
    /// More client connections than `[limits] max_connections`.
    TooManyConnections,
    /// The client went silent while sending its body.
    ClientTimeout,
    /// A method no provider API uses (CONNECT, TRACE, made-up ones).
    MethodNotAllowed,
    /// The path has dot segments (`..`, `.`, percent-encoded or not) or an encoded
    /// slash: it could climb out of a route's base path.
    AmbiguousPath,
    /// An enforcing `block` policy matched; nothing went upstream.
    PolicyBlocked,
}

impl Refusal {
    pub fn status(self) -> StatusCode {
        match self {
            Refusal::NoRoute => StatusCode::NOT_FOUND,
            Refusal::UpstreamUnreachable => StatusCode::BAD_GATEWAY,
            Refusal::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Refusal::BadRequest => StatusCode::BAD_REQUEST,
            Refusal::UnknownKey => StatusCode::UNAUTHORIZED,
            Refusal::KeyNotAllowed => StatusCode::FORBIDDEN,
            Refusal::AuditQueueFull | Refusal::TooManyConnections => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Refusal::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Refusal::ClientTimeout => StatusCode::REQUEST_TIMEOUT,
            Refusal::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Refusal::AmbiguousPath => StatusCode::BAD_REQUEST,
            Refusal::PolicyBlocked => StatusCode::FORBIDDEN,
        }
    }

    pub fn code(self) -> &'static str {
        match self {
            Refusal::NoRoute => "no_route",
            Refusal::UpstreamUnreachable => "upstream_unreachable",
            Refusal::UpstreamTimeout => "upstream_timeout",
            Refusal::BadRequest => "bad_request",
            Refusal::UnknownKey => "invalid_api_key",
            Refusal::KeyNotAllowed => "key_not_allowed",
            Refusal::AuditQueueFull => "audit_queue_full",
            Refusal::BodyTooLarge => "request_too_large",
            Refusal::HeadersTooLarge => "headers_too_large",
            Refusal::TooManyConnections => "too_many_connections",
            Refusal::ClientTimeout => "client_timeout",
            Refusal::MethodNotAllowed => "method_not_allowed",
            Refusal::AmbiguousPath => "ambiguous_path",
            Refusal::PolicyBlocked => "policy_blocked",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Refusal::NoRoute => {
                "custody: no route for this path; only configured routes are proxied"
            }
            Refusal::UpstreamUnreachable => "custody: the upstream could not be reached",
            Refusal::UpstreamTimeout => "custody: the upstream did not answer in time",
            Refusal::BadRequest => "custody: the request could not be forwarded",
            Refusal::UnknownKey => "custody: missing or unknown API key",
            Refusal::KeyNotAllowed => "custody: this API key may not use this route or model",
            Refusal::AuditQueueFull => {
                "custody: the audit trail is behind; retry shortly (no unaudited traffic is let through)"
            }
            Refusal::BodyTooLarge => "custody: the request body is larger than this gateway accepts",
            Refusal::HeadersTooLarge => "custody: the request headers are larger than this gateway accepts",
            Refusal::TooManyConnections => "custody: too many connections; retry shortly",
            Refusal::ClientTimeout => "custody: the request body stopped arriving",
            Refusal::MethodNotAllowed => "custody: this method is not proxied",
            Refusal::AmbiguousPath => {
                "custody: the path has dot segments or encoded slashes; send it normalized"
            }
            Refusal::PolicyBlocked => custody_audit::policy::request::DEFAULT_BLOCK_MESSAGE,
        }
    }

    /// The JSON body, in the error shape of the route's provider so that SDKs parse it.
    pub fn body(self, provider: Provider) -> Bytes {
        self.body_saying(provider, self.message())
    }

    /// [`Self::body`] with another message (a blocking policy's own).
    pub fn body_saying(self, provider: Provider, message: &str) -> Bytes {
        let v = match provider {
            Provider::Anthropic => serde_json::json!({
                "type": "error",
                "error": {"type": self.anthropic_type(), "message": message},
            }),
            Provider::Gemini => serde_json::json!({
                "error": {"code": self.status().as_u16(), "message": message, "status": self.grpc_status()},
            }),
            _ => serde_json::json!({
                "error": {"message": message, "type": "custody_error", "param": null, "code": self.code()},
            }),
        };
        Bytes::from(v.to_string())
    }

    /// Anthropic's error `type` for the status.
    fn anthropic_type(self) -> &'static str {
        match self {
            Refusal::NoRoute => "not_found_error",
            Refusal::UnknownKey => "authentication_error",
            Refusal::KeyNotAllowed | Refusal::PolicyBlocked => "permission_error",
            Refusal::BadRequest => "invalid_request_error",
            Refusal::UpstreamUnreachable | Refusal::UpstreamTimeout => "api_error",
            Refusal::AuditQueueFull | Refusal::TooManyConnections => "overloaded_error",
            Refusal::BodyTooLarge => "request_too_large",
            Refusal::HeadersTooLarge
            | Refusal::ClientTimeout
            | Refusal::MethodNotAllowed
            | Refusal::AmbiguousPath => "invalid_request_error",
        }
    }

    /// Google's canonical status name for the status.
    fn grpc_status(self) -> &'static str {
        match self {
            Refusal::NoRoute => "NOT_FOUND",
            Refusal::UnknownKey => "UNAUTHENTICATED",
            Refusal::KeyNotAllowed | Refusal::PolicyBlocked => "PERMISSION_DENIED",
            Refusal::BadRequest => "INVALID_ARGUMENT",
            Refusal::UpstreamUnreachable => "UNAVAILABLE",
            Refusal::UpstreamTimeout => "DEADLINE_EXCEEDED",
            Refusal::AuditQueueFull | Refusal::TooManyConnections => "UNAVAILABLE",
            Refusal::BodyTooLarge | Refusal::HeadersTooLarge | Refusal::AmbiguousPath => {
                "INVALID_ARGUMENT"
            }
            Refusal::ClientTimeout => "DEADLINE_EXCEEDED",
            Refusal::MethodNotAllowed => "UNIMPLEMENTED",
        }
    }

    /// Response headers for the refusal; a full audit queue asks SDKs to retry.
    pub fn headers(self) -> Vec<(header::HeaderName, HeaderValue)> {
        let mut h = vec![
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (
                header::HeaderName::from_static("x-custody-error"),
                HeaderValue::from_static(self.code()),
            ),
        ];
        if matches!(self, Refusal::AuditQueueFull | Refusal::TooManyConnections) {
            h.push((header::RETRY_AFTER, HeaderValue::from_static("1")));
        }
        if self == Refusal::MethodNotAllowed {
            h.push((
                header::ALLOW,
                HeaderValue::from_static(crate::route::ALLOWED_METHODS),
            ));
        }
        h
    }
}
