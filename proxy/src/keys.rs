//! Virtual keys: who a client is, what it may use, and the provider key custody sends
//! for it. Clients present a virtual key where they would put the provider's key; custody
//! compares its SHA-256 with every configured hash in constant time, so neither the
//! file nor a timing channel gives a key away.

use std::sync::Arc;

use custody_audit::Identity;
use custody_config::{Config, Provider, VirtualKey};
use http::{header, HeaderMap, HeaderName, HeaderValue};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::ProxyError;

/// Headers a client may put a key in, in the order they are looked at.
const KEY_HEADERS: [HeaderName; 4] = [
    header::AUTHORIZATION,
    HeaderName::from_static("x-api-key"),
    HeaderName::from_static("api-key"),
    HeaderName::from_static("x-goog-api-key"),
];

/// A provider key, read from the environment once, never logged.
#[derive(Clone)]
pub struct Secret(HeaderValue);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// The value of environment variable `var`; `what` names its use in errors.
    pub fn from_env(var: &str, what: &str) -> Result<Self, ProxyError> {
        let value = std::env::var(var).map_err(|_| ProxyError::Key {
            what: what.to_owned(),
            reason: format!("environment variable `{var}` is not set or not UTF-8"),
        })?;
        let mut v = HeaderValue::from_str(value.trim()).map_err(|_| ProxyError::Key {
            what: what.to_owned(),
            reason: format!("environment variable `{var}` holds characters a header cannot"),
        })?;
        v.set_sensitive(true);
        Ok(Self(v))
    }

    /// Replaces every client credential with this key, in the provider's own header.
    pub fn inject(&self, provider: Provider, headers: &mut HeaderMap) {
        strip_credentials(headers);
        match provider {
            Provider::Anthropic => {
                headers.insert(KEY_HEADERS[1].clone(), self.0.clone());
            }
            Provider::Azure => {
                headers.insert(KEY_HEADERS[2].clone(), self.0.clone());
            }
            Provider::Gemini => {
                headers.insert(KEY_HEADERS[3].clone(), self.0.clone());
            }
            Provider::Openai | Provider::Generic => {
                let mut bearer = Vec::with_capacity(self.0.len() + 7);
                bearer.extend_from_slice(b"Bearer ");
                bearer.extend_from_slice(self.0.as_bytes());
                if let Ok(mut v) = HeaderValue::from_bytes(&bearer) {
                    v.set_sensitive(true);
                    headers.insert(header::AUTHORIZATION, v);
                }
            }
        }
    }
}

/// Removes every header a client credential may travel in.
pub fn strip_credentials(headers: &mut HeaderMap) {
    for h in &KEY_HEADERS {
        headers.remove(h);
    }
}

/// One configured key, ready for the hot path.
#[derive(Debug)]
pub struct Key {
    pub identity: Arc<Identity>,
    hash: [u8; 32],
    routes: Option<Vec<String>>,
    models: Option<Vec<String>>,
    pub upstream: Option<Secret>,
}

impl Key {
    pub fn allows_route(&self, route: &str) -> bool {
        self.routes
            .as_ref()
            .is_none_or(|r| r.iter().any(|n| n == route))
    }

    /// Whether the request must be read to learn its model before it is forwarded.
    pub fn restricts_models(&self) -> bool {
        self.models.is_some()
    }

    pub fn allows_model(&self, model: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|m| m.iter().any(|n| n == model))
    }
}

/// The configured virtual keys; empty means pass-through.
#[derive(Debug, Default)]
pub struct KeyTable {
    keys: Vec<Key>,
}

impl KeyTable {
    /// Reads every key's secrets from the environment; a missing variable is an error
    /// that names it (never its value).
    pub fn from_config(config: &Config) -> Result<Self, ProxyError> {
        let keys = config.keys.iter().map(key).collect::<Result<Vec<_>, _>>()?;
        Ok(Self { keys })
    }

    pub fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The key whose hash matches `presented`. Every key is compared, in constant time.
    pub fn authenticate(&self, presented: &[u8]) -> Option<&Key> {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        let mut found = None;
        for k in &self.keys {
            if bool::from(k.hash.ct_eq(&digest)) {
                found = Some(k);
            }
        }
        found
    }
}

fn key(k: &VirtualKey) -> Result<Key, ProxyError> {
    let what = format!("key `{}`", k.id);
    let hash = match (&k.key_sha256, &k.key_env) {
        (Some(h), _) => {
            let mut out = [0u8; 32];
            hex::decode_to_slice(h, &mut out).map_err(|_| ProxyError::Key {
                what: what.clone(),
                reason: "key_sha256 is not 64 hex digits".into(),
            })?;
            out
        }
        (None, Some(env)) => {
            let s = Secret::from_env(env, &what)?;
            Sha256::digest(s.0.as_bytes()).into()
        }
        (None, None) => {
            return Err(ProxyError::Key {
                what,
                reason: "needs key_sha256 or key_env".into(),
            })
        }
    };
    Ok(Key {
        identity: Arc::new(Identity {
            key_id: Arc::from(k.id.as_str()),
            user: k.user.as_deref().map(Arc::from),
            team: k.team.as_deref().map(Arc::from),
        }),
        hash,
        routes: k.routes.clone(),
        models: k.models.clone(),
        upstream: k
            .upstream_key_env
            .as_deref()
            .map(|e| Secret::from_env(e, &what))
            .transpose()?,
    })
}

/// The key a client presented: a bearer token, a key header, or Gemini's `key` query
/// parameter.
pub fn presented<'a>(headers: &'a HeaderMap, query: Option<&'a str>) -> Option<&'a [u8]> {
    for h in &KEY_HEADERS {
        if let Some(v) = headers.get(h) {
            let b = v.as_bytes();
            let token = match b.get(..7) {
                Some(p) if p.eq_ignore_ascii_case(b"bearer ") => &b[7..],
                _ => b,
            };
            return Some(token.trim_ascii());
        }
    }
    query?
        .split('&')
        .find_map(|kv| kv.strip_prefix("key="))
        .map(str::as_bytes)
}

/// A query string without its `key` parameter (`None` when nothing is left).
pub fn query_without_key(query: &str) -> Option<String> {
    let kept: Vec<&str> = query
        .split('&')
        .filter(|kv| !kv.starts_with("key=") && *kv != "key")
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

/// A new virtual key: 32 random bytes, `ck-` and hex.
pub fn generate() -> Result<(String, String), ProxyError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| ProxyError::Key {
        what: "a new key".into(),
        reason: format!("no randomness: {e}"),
    })?;
    let key = format!("ck-{}", hex::encode(bytes));
    let hash = hex::encode(Sha256::digest(key.as_bytes()));
    Ok((key, hash))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_key_wherever_the_sdk_put_it() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer ck-1".parse().unwrap());
        assert_eq!(presented(&h, None), Some(&b"ck-1"[..]));
        let mut h = HeaderMap::new();
        h.insert("x-api-key", "ck-2".parse().unwrap());
        assert_eq!(presented(&h, None), Some(&b"ck-2"[..]));
        assert_eq!(
            presented(&HeaderMap::new(), Some("alt=sse&key=ck-3")),
            Some(&b"ck-3"[..])
        );
        assert_eq!(
            query_without_key("alt=sse&key=x").as_deref(),
            Some("alt=sse")
        );
        assert_eq!(query_without_key("key=x"), None);
    }

    #[test]
    fn authenticates_by_hash_and_checks_routes_and_models() {
        let (key, hash) = generate().unwrap();
        let mut c = Config::embedded_default().unwrap();
        c.keys.push(VirtualKey {
            id: "app".into(),
            user: Some("alice".into()),
            team: None,
            key_sha256: Some(hash),
            key_env: None,
            routes: Some(vec!["openai".into()]),
            models: Some(vec!["gpt-4o".into()]),
            upstream_key_env: None,
        });
        let t = KeyTable::from_config(&c).unwrap();
        let k = t.authenticate(key.as_bytes()).unwrap();
        assert_eq!(&*k.identity.key_id, "app");
        assert!(k.allows_route("openai") && !k.allows_route("anthropic"));
        assert!(k.allows_model("gpt-4o") && !k.allows_model("gpt-5"));
        assert!(t.authenticate(b"ck-wrong").is_none());
    }
}
