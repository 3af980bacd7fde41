//! Routing by path prefix to configured upstreams; nothing else is ever proxied.

use std::sync::Arc;

use custody_config::{Provider, Route};
use http::{uri::PathAndQuery, Uri};

use crate::{keys::Secret, ProxyError};

/// The methods provider APIs use; anything else (CONNECT, TRACE, made-up methods) is
/// refused before routing.
pub const ALLOWED_METHODS: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

pub fn method_allowed(m: &http::Method) -> bool {
    use http::Method;
    [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
        Method::OPTIONS,
    ]
    .contains(m)
}

/// Whether a path could mean something else once an upstream normalizes it: a `.` or
/// `..` segment (also as `%2e`), an encoded slash or backslash, or a backslash. Such a
/// path could climb out of a route's base path (`/a/../../tenant-b/...`), so custody
/// refuses it rather than guess how the upstream resolves it.
pub fn ambiguous_path(path: &str) -> bool {
    let b = path.as_bytes();
    if b.contains(&b'\\') {
        return true;
    }
    // Measured in place: no allocation for the common path.
    let encoded_separator = b.windows(3).any(|w| {
        w[0] == b'%'
            && matches!(
                (w[1], w[2].to_ascii_lowercase()),
                (b'2', b'f') | (b'5', b'c')
            )
    });
    encoded_separator || b.split(|&c| c == b'/').any(is_dot_segment)
}

/// `.` or `..`, each dot possibly written `%2e`.
fn is_dot_segment(seg: &[u8]) -> bool {
    let (mut dots, mut i) = (0, 0);
    while i < seg.len() {
        if seg[i] == b'.' {
            i += 1;
        } else if seg.len() >= i + 3
            && seg[i] == b'%'
            && seg[i + 1] == b'2'
            && seg[i + 2].eq_ignore_ascii_case(&b'e')
        {
            i += 3;
        } else {
            return false;
        }
        dots += 1;
    }
    dots == 1 || dots == 2
}

/// One route, ready for the hot path.
#[derive(Debug)]
pub struct Target {
    pub name: Arc<str>,
    pub prefix: String,
    pub provider: Provider,
    strip_prefix: bool,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    base_path: String,
    /// Provider key for virtual-key clients whose key names none.
    pub upstream_key: Option<Secret>,
}

impl Target {
    /// The upstream URI for a client request path and query, and the path as forwarded.
    /// `drop_key` removes a `key` query parameter (a virtual key must not travel on).
    pub fn upstream_uri(&self, uri: &Uri, drop_key: bool) -> Result<(Uri, String), http::Error> {
        let path = uri.path();
        let rest = if self.strip_prefix {
            path.get(self.prefix.len()..).unwrap_or("")
        } else {
            path
        };
        // Keep the slash that separates: "/anthropic/v1/x" with prefix "/anthropic/" -> "/v1/x".
        let slash = if rest.starts_with('/') { "" } else { "/" };
        let mut forwarded = String::with_capacity(self.base_path.len() + slash.len() + rest.len());
        forwarded.push_str(&self.base_path);
        forwarded.push_str(slash);
        forwarded.push_str(rest);
        let pq = match (uri.path_and_query(), uri.query()) {
            // Forwarded as it came (the common case): share the client's bytes.
            (Some(pq), q)
                if forwarded == path
                    && pq.as_str().starts_with('/')
                    && !(drop_key && q.is_some()) =>
            {
                pq.clone()
            }
            (_, Some(q)) => {
                let q = if drop_key {
                    crate::keys::query_without_key(q).map(std::borrow::Cow::Owned)
                } else {
                    Some(std::borrow::Cow::Borrowed(q))
                };
                match q {
                    Some(q) => PathAndQuery::try_from(format!("{forwarded}?{q}"))?,
                    None => PathAndQuery::try_from(forwarded.as_str())?,
                }
            }
            (_, None) => PathAndQuery::try_from(forwarded.as_str())?,
        };
        let uri = Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()?;
        Ok((uri, forwarded))
    }
}

/// The routing table, longest prefix first.
#[derive(Debug)]
pub struct Router {
    targets: Vec<Target>,
}

impl Router {
    pub fn new(routes: &[Route]) -> Result<Self, ProxyError> {
        let mut targets = routes
            .iter()
            .map(|r| {
                Ok(Target {
                    name: Arc::from(r.name.as_str()),
                    prefix: r.prefix.clone(),
                    provider: r.provider,
                    strip_prefix: r.strip_prefix,
                    scheme: r
                        .upstream
                        .scheme()
                        .parse::<http::uri::Scheme>()
                        .map_err(http::Error::from)?,
                    authority: r
                        .upstream
                        .authority()
                        .parse::<http::uri::Authority>()
                        .map_err(http::Error::from)?,
                    base_path: r.upstream.base_path().to_owned(),
                    upstream_key: r
                        .upstream_key_env
                        .as_deref()
                        .map(|e| Secret::from_env(e, &format!("route `{}`", r.name)))
                        .transpose()?,
                })
            })
            .collect::<Result<Vec<_>, ProxyError>>()?;
        targets.sort_by_key(|t| std::cmp::Reverse(t.prefix.len()));
        Ok(Self { targets })
    }

    /// The route for a path: the longest matching prefix. A prefix ending in `/` also
    /// matches the path without it (`/anthropic` for `/anthropic/`).
    pub fn find(&self, path: &str) -> Option<&Target> {
        self.targets.iter().find(|t| {
            path.starts_with(&t.prefix)
                || (t.prefix.len() > 1
                    && t.prefix.ends_with('/')
                    && path == &t.prefix[..t.prefix.len() - 1])
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use custody_config::Config;

    #[test]
    fn longest_prefix_wins_and_strip_keeps_the_slash() {
        let c = Config::embedded_default().unwrap();
        let r = Router::new(&c.routes).unwrap();
        let t = r.find("/anthropic/v1/messages").unwrap();
        assert_eq!(&*t.name, "anthropic");
        let (u, fwd) = t
            .upstream_uri(&"/anthropic/v1/messages?beta=true".parse().unwrap(), false)
            .unwrap();
        assert_eq!(
            u.to_string(),
            "https://api.anthropic.com/v1/messages?beta=true"
        );
        assert_eq!(fwd, "/v1/messages");
        let t = r.find("/v1/chat/completions").unwrap();
        assert_eq!(&*t.name, "openai");
        // Forwarded as it came, query and all; a virtual key's `key` parameter is dropped.
        let client: Uri = "/v1/chat/completions?a=1&key=ck-x".parse().unwrap();
        let (u, fwd) = t.upstream_uri(&client, false).unwrap();
        assert_eq!(
            u.to_string(),
            "https://api.openai.com/v1/chat/completions?a=1&key=ck-x"
        );
        assert_eq!(fwd, "/v1/chat/completions");
        let (u, _) = t.upstream_uri(&client, true).unwrap();
        assert_eq!(
            u.to_string(),
            "https://api.openai.com/v1/chat/completions?a=1"
        );
        let only_key: Uri = "/v1/models?key=ck-x".parse().unwrap();
        let (u, _) = t.upstream_uri(&only_key, true).unwrap();
        assert_eq!(u.to_string(), "https://api.openai.com/v1/models");
        assert!(r.find("/admin").is_none());
        for bad in [
            "/v1/../admin",
            "/v1/./x",
            "/v1/%2e%2E/x",
            "/v1/.%2e",
            "/v1/a%2Fb",
            "/v1/a%5cb",
            "/v1\\x",
        ] {
            assert!(ambiguous_path(bad), "{bad}");
        }
        for good in [
            "/v1/chat/completions",
            "/v1/models/gpt-4.1",
            "/v1/a%20b",
            "/v1/..x",
        ] {
            assert!(!ambiguous_path(good), "{good}");
        }
        assert!(r.find("/v2/x").is_none());
    }
}
