//! A bare reverse proxy on custody's own stack (hyper-util's auto server, its pooled
//! legacy client, tokio's multi-thread runtime) with nothing else: no tee, no record,
//! no limits. Benchmarked beside custody, it shows what the stack costs on its own, so
//! the numbers separate the price of HTTP in Rust from the price of the audit.
//!
//! `--affine` tries the other shape of the request path: each client connection gets
//! its own upstream connection, polled on the client's task (HTTP/1.1 only), so no
//! request or answer crosses tasks. It measures what pooling's hand-off costs.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use http::{uri::PathAndQuery, Request, Response, Uri};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The upstream's `HOST:PORT`.
    #[arg(long)]
    upstream: String,
    /// One upstream connection per client connection, on the client's task (HTTP/1.1).
    #[arg(long)]
    affine: bool,
}

type Body = BoxBody<bytes::Bytes, hyper::Error>;

async fn forward(
    client: Arc<Client<HttpConnector, Incoming>>,
    upstream: Arc<str>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let (mut parts, body) = req.into_parts();
    let pq = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let uri = Uri::builder()
        .scheme("http")
        .authority(&*upstream)
        .path_and_query(pq)
        .build();
    let Ok(uri) = uri else {
        return Ok(bad_gateway());
    };
    parts.uri = uri;
    parts.version = http::Version::HTTP_11;
    Ok(
        match client.request(Request::from_parts(parts, body)).await {
            Ok(resp) => resp.map(BodyExt::boxed),
            Err(_) => bad_gateway(),
        },
    )
}

fn bad_gateway() -> Response<Body> {
    let mut r = Response::new(Full::default().map_err(|e| match e {}).boxed());
    *r.status_mut() = http::StatusCode::BAD_GATEWAY;
    r
}

/// `--affine`: each client connection gets its own upstream connection, driven on the
/// same task as the client's, so a request and its answer never cross tasks.
async fn serve_affine(stream: tokio::net::TcpStream, upstream: Arc<str>) -> anyhow::Result<()> {
    let up = tokio::net::TcpStream::connect(&*upstream).await?;
    let _ = up.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(up)).await?;
    let sender = Arc::new(tokio::sync::Mutex::new(sender));
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let sender = sender.clone();
        let upstream = upstream.clone();
        async move {
            let (mut parts, body) = req.into_parts();
            parts.version = http::Version::HTTP_11;
            if let Ok(host) = http::HeaderValue::from_str(&upstream) {
                parts.headers.insert(http::header::HOST, host);
            }
            let sent = {
                let mut s = sender.lock().await;
                if s.ready().await.is_err() {
                    return Ok::<_, Infallible>(bad_gateway());
                }
                s.send_request(Request::from_parts(parts, body))
            };
            Ok(match sent.await {
                Ok(resp) => resp.map(BodyExt::boxed),
                Err(_) => bad_gateway(),
            })
        }
    });
    let server =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(server, conn);
    tokio::select! {
        _ = &mut server => {}
        _ = &mut conn => {}
    }
    Ok(())
}

pub fn main(a: Args) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        // As custody's connector does: no Nagle delay on the upstream connection.
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Arc::new(Client::builder(TokioExecutor::new()).build(connector));
        let upstream: Arc<str> = Arc::from(a.upstream.as_str());
        let listener = tokio::net::TcpListener::bind(a.listen).await?;
        println!("proxy on http://{}", listener.local_addr()?);
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let (client, upstream) = (client.clone(), upstream.clone());
            if a.affine {
                tokio::spawn(serve_affine(stream, upstream));
                continue;
            }
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |r| {
                    forward(client.clone(), upstream.clone(), r)
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    })
}
