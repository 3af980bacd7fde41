//! TLS: the client listener (TLS 1.2+, ALPN, mutual TLS, certificates reloaded when
//! their files change) and a private CA trusted for upstreams.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{path::Path, sync::Arc, time::Duration};

use custody_config::ListenTls;
use custody_tests::*;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        Self {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    /// A leaf for `name`, as (certificate PEM, key PEM, certificate DER).
    fn leaf(&self, name: &str) -> (String, String, CertificateDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(vec![name.to_owned()]).unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem(), cert.der().clone())
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }
}

fn write_leaf(dir: &Path, ca: &Ca) -> (ListenTls, CertificateDer<'static>) {
    let (cert, key, der) = ca.leaf("localhost");
    std::fs::write(dir.join("server.pem"), cert).unwrap();
    std::fs::write(dir.join("server.key"), key).unwrap();
    let tls = ListenTls {
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
        client_ca: None,
        reload_secs: 1,
    };
    (tls, der)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS client trusting `ca`, optionally presenting a client certificate.
fn connector(
    ca: &Ca,
    client: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
    alpn: &[u8],
) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der()).unwrap();
    let b = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match client {
        Some((cert, key)) => b.with_client_auth_cert(vec![cert], key).unwrap(),
        None => b.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// One HTTP/1.1 request over TLS; the raw response, and the certificate the server showed.
async fn https_post(
    addr: std::net::SocketAddr,
    connector: &tokio_rustls::TlsConnector,
) -> std::io::Result<(String, CertificateDer<'static>, rustls::ProtocolVersion)> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    let (_, session) = tls.get_ref();
    let shown = session.peer_certificates().unwrap()[0].clone();
    let version = session.protocol_version().unwrap();
    let body = "{\"model\":\"m\"}";
    tls.write_all(
        format!("POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len())
            .as_bytes(),
    )
    .await?;
    let mut out = String::new();
    tls.read_to_string(&mut out).await?;
    Ok((out, shown, version))
}

#[tokio::test]
async fn the_listener_serves_tls_and_reloads_its_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("custody test CA");
    let (tls, first) = write_leaf(dir.path(), &ca);
    let up = chat_upstream().await;
    let custody = Custody::start_with(vec![openai_route(&up)], |c| c.listen.tls = Some(tls)).await;
    let http1 = connector(&ca, None, b"http/1.1");
    let (resp, shown, version) = https_post(custody.addr, &http1).await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert_eq!(shown, first);
    assert!(
        version == rustls::ProtocolVersion::TLSv1_3 || version == rustls::ProtocolVersion::TLSv1_2
    );
    // Cleartext on the TLS port gets nothing.
    let plain = tokio::net::TcpStream::connect(custody.addr).await.unwrap();
    drop(plain);

    // A new certificate on disk is picked up for new connections, without a restart.
    let (_, second) = write_leaf(dir.path(), &ca);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, shown, _) = https_post(custody.addr, &http1).await.unwrap();
        if shown == second {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let done = custody.stop().await;
    assert!(done.records.len() >= 2);
    assert!(done.records.iter().all(|r| r["outcome"] == "ok"));
}

#[tokio::test]
async fn mutual_tls_refuses_clients_without_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("server CA");
    let clients = Ca::new("client CA");
    let (mut tls, _) = write_leaf(dir.path(), &ca);
    std::fs::write(dir.path().join("clients.pem"), clients.pem()).unwrap();
    tls.client_ca = Some(dir.path().join("clients.pem"));
    let up = chat_upstream().await;
    let custody = Custody::start_with(vec![openai_route(&up)], |c| c.listen.tls = Some(tls)).await;

    let anonymous = connector(&ca, None, b"http/1.1");
    assert!(https_post(custody.addr, &anonymous).await.is_err());
    let stranger = Ca::new("someone else");
    let (_, key, der) = stranger.leaf("app");
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let wrong = connector(&ca, Some((der, key)), b"http/1.1");
    assert!(https_post(custody.addr, &wrong).await.is_err());
    let (_, key, der) = clients.leaf("app");
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let known = connector(&ca, Some((der, key)), b"http/1.1");
    let (resp, _, _) = https_post(custody.addr, &known).await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let done = custody.stop().await;
    assert_eq!(
        done.records.len(),
        1,
        "refused handshakes never become exchanges"
    );
}

#[tokio::test]
async fn a_private_ca_can_be_trusted_for_upstreams() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("private upstream CA");
    let (_, key, der) = ca.leaf("localhost");
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let server = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(s).await else {
                    return;
                };
                let mut buf = vec![0u8; 4096];
                let _ = tls.read(&mut buf).await;
                let body = r#"{"id":"x","model":"private-model","choices":[]}"#;
                let _ = tls
                    .write_all(format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len()).as_bytes())
                    .await;
                let _ = tls.shutdown().await;
            });
        }
    });
    std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
    let upstream = format!("https://localhost:{port}");
    let routes = || {
        vec![route(
            "private",
            "/v1/",
            &upstream,
            custody_config::Provider::Openai,
            false,
        )]
    };
    // Without the CA: refused, as any unknown certificate.
    let custody = Custody::start(routes()).await;
    let (parts, _) = send(
        &client(),
        post(&custody.url("/v1/chat/completions"), &[], "{}"),
    )
    .await;
    assert_eq!(parts.status, 502);
    custody.stop().await;
    // With it: trusted.
    let ca_file = dir.path().join("ca.pem");
    let custody = Custody::start_with(routes(), |c| c.upstream.ca_file = Some(ca_file)).await;
    let (parts, _) = send(
        &client(),
        post(&custody.url("/v1/chat/completions"), &[], "{}"),
    )
    .await;
    assert_eq!(parts.status, 200);
    let done = custody.stop().await;
    assert_eq!(done.one()["gen_ai"]["response"]["model"], "private-model");
}

/// One GET over TLS; the raw response.
async fn https_get(
    addr: std::net::SocketAddr,
    connector: &tokio_rustls::TlsConnector,
    path: &str,
    headers: &str,
) -> std::io::Result<String> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n{headers}connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut out = String::new();
    tls.read_to_string(&mut out).await?;
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_serves_tls_with_the_listeners_options() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("custody test CA");
    let (tls, _) = write_leaf(dir.path(), &ca);
    let r = custody_tests::console::reviewed_trail_with(|c| c.tls = Some(tls)).await;
    let http1 = connector(&ca, None, b"http/1.1");
    let login = https_get(r.console.addr, &http1, "/login", "")
        .await
        .unwrap();
    assert!(login.starts_with("HTTP/1.1 200"), "{login}");
    // Under TLS the cookies are Secure.
    let cookie = login
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .unwrap();
    assert!(
        cookie.contains("; Secure") && cookie.contains("HttpOnly"),
        "{cookie}"
    );
    let auth = format!(
        "authorization: Bearer {}\r\n",
        custody_tests::console::ALICE
    );
    let read = https_get(r.console.addr, &http1, "/api/records", &auth)
        .await
        .unwrap();
    assert!(read.starts_with("HTTP/1.1 200"), "{read}");
    assert!(read.contains(&r.ids.growth));
    // Cleartext on the TLS port gets nothing.
    let mut plain = tokio::net::TcpStream::connect(r.console.addr)
        .await
        .unwrap();
    plain
        .write_all(b"GET /login HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = plain.read_to_end(&mut out).await;
    assert!(!String::from_utf8_lossy(&out).contains("HTTP/1.1 200"));
    r.stop().await;
}
