//! TLS for the client listener (rustls: TLS 1.2 and 1.3 only, HTTP/2 and HTTP/1.1 by
//! ALPN, optional client certificates), reloaded when its files change; and the trust
//! store for upstreams (the public roots, plus a CA file when one is configured).

use std::{path::Path, sync::Arc, time::SystemTime};

use arc_swap::ArcSwap;
use custody_config::ListenTls;
use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    server::WebPkiClientVerifier,
    RootCertStore, ServerConfig,
};

use crate::ProxyError;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_err(what: &Path, e: impl std::fmt::Display) -> ProxyError {
    ProxyError::Tls(format!("{}: {e}", what.display()))
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, ProxyError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| tls_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_err(path, e))?;
    if certs.is_empty() {
        return Err(tls_err(path, "no PEM certificate in it"));
    }
    Ok(certs)
}

/// The server configuration the files describe.
pub fn server_config(tls: &ListenTls) -> Result<Arc<ServerConfig>, ProxyError> {
    let chain = certs(&tls.cert)?;
    let key = PrivateKeyDer::from_pem_file(&tls.key).map_err(|e| tls_err(&tls.key, e))?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| ProxyError::Tls(e.to_string()))?;
    let builder = match &tls.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in certs(ca)? {
                roots.add(c).map_err(|e| tls_err(ca, e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| tls_err(ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| tls_err(&tls.cert, e))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The listener's TLS configuration, swapped when the files change.
pub struct TlsReloader {
    pub current: ArcSwap<ServerConfig>,
    tls: ListenTls,
}

fn mtimes(tls: &ListenTls) -> Vec<Option<SystemTime>> {
    [Some(&tls.cert), Some(&tls.key), tls.client_ca.as_ref()]
        .into_iter()
        .flatten()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

impl TlsReloader {
    pub fn new(tls: &ListenTls) -> Result<Arc<Self>, ProxyError> {
        Ok(Arc::new(Self {
            current: ArcSwap::new(server_config(tls)?),
            tls: tls.clone(),
        }))
    }

    /// Checks the files every `reload_secs`; a change that loads is used for new
    /// connections, one that does not is logged and the old certificate stays.
    pub async fn watch(self: Arc<Self>) {
        let every = std::time::Duration::from_secs(self.tls.reload_secs.max(1));
        let mut seen = mtimes(&self.tls);
        loop {
            tokio::time::sleep(every).await;
            let now = mtimes(&self.tls);
            if now == seen {
                continue;
            }
            seen = now;
            match server_config(&self.tls) {
                Ok(c) => {
                    self.current.store(c);
                    tracing::info!(cert = %self.tls.cert.display(), "TLS certificate reloaded");
                }
                Err(e) => {
                    tracing::error!(error = %e, "TLS files changed but do not load; the previous certificate stays")
                }
            }
        }
    }
}

/// The trust store for upstreams: the public web roots, plus `ca_file` if set.
pub fn upstream_roots(ca_file: Option<&Path>) -> Result<RootCertStore, ProxyError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        for c in certs(path)? {
            roots.add(c).map_err(|e| tls_err(path, e))?;
        }
    }
    Ok(roots)
}
