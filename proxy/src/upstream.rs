//! The upstream client (pooled, HTTP/1.1 and HTTP/2 by ALPN, certificates verified
//! against the webpki roots) and the header rewriting for both directions.

use std::{fmt::Write as _, net::SocketAddr, sync::Arc, time::Duration};

use http::{header, HeaderMap, HeaderName, HeaderValue};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::{TokioExecutor, TokioTimer},
};

use crate::ProxyError;

pub type Connector = HttpsConnector<HttpConnector>;

/// Builds the pooled upstream client. Certificates are verified against the public
/// roots and the CAs in `ca_file`, if any.
pub fn client<B>(
    connect_timeout: Duration,
    idle_timeout: Duration,
    ca_file: Option<&std::path::Path>,
) -> Result<Client<Connector, B>, ProxyError>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| ProxyError::Tls(e.to_string()))?
        .with_root_certificates(crate::tls::upstream_roots(ca_file)?)
        .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(idle_timeout)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(https))
}

/// Hop-by-hop headers (RFC 9110 section 7.6.1, and the legacy ones proxies drop).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
];

/// Removes hop-by-hop headers, including those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for h in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(h);
    }
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Prepares request headers for the upstream: hop-by-hop and `Host` removed (the client
/// sets `Host` from the upstream URI), the client address appended to `X-Forwarded-For`.
/// `Expect: 100-continue` is answered by custody's own server when the body is read,
/// so it is not passed on (as nginx does).
pub fn rewrite_request_headers(headers: &mut HeaderMap, client: SocketAddr) {
    strip_hop_by_hop(headers);
    headers.remove(header::HOST);
    headers.remove(header::EXPECT);
    let mut value = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prior) => format!("{prior}, "),
        None => String::with_capacity(39),
    };
    let _ = write!(value, "{}", client.ip());
    // The header takes the string's buffer as it is: one allocation, no copy.
    if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(value)) {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_named_headers_go_credentials_stay() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, x-private".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::HOST, "custody".parse().unwrap());
        h.insert(header::AUTHORIZATION, "Bearer sk-x".parse().unwrap());
        h.insert("x-forwarded-for", "10.0.0.1".parse().unwrap());
        rewrite_request_headers(&mut h, "127.0.0.1:5".parse().unwrap());
        assert!(
            h.get("x-private").is_none()
                && h.get("keep-alive").is_none()
                && h.get("host").is_none()
        );
        assert_eq!(h["authorization"], "Bearer sk-x");
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
    }
}
