//! Accepting connections and shutting down in order: stop accepting, let in-flight
//! exchanges finish (bounded), then drain the audit queue and close the segment.

use std::{
    future::Future,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use custody_audit::{
    writer::{WriterGate, WriterSummary},
    AuditWriter, ConfigHandle,
};
use custody_config::Config;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
};
use tokio::{net::TcpListener, sync::mpsc};

use crate::{
    admin::{self, AdminState, ReloadSource},
    connection::{
        serve_unless_silent, Cap, Seen, Slot, OVERFLOW_CONNECTIONS, OVERFLOW_FIRST_REQUEST,
    },
    metrics::ProxyMetrics,
    service::{Active, ProxyService, Shared},
    ProxyError,
};

/// How a run ended.
#[derive(Debug)]
pub struct RunSummary {
    pub writer: WriterSummary,
    /// Exchanges lost because the queue was full or the writer had stopped, and records
    /// the disk would not take at the stop (a `gap` event at the next start tells them).
    pub dropped: u64,
}

pub use crate::admin::ReloadRequest;

/// What a caller can add to [`run`].
#[derive(Default)]
pub struct RunOptions {
    /// Configurations to apply (SIGHUP; tests).
    pub reloads: Option<mpsc::UnboundedReceiver<ReloadRequest>>,
    /// The admin listener, bound by the caller; else `[admin] addr` is bound here.
    pub admin: Option<TcpListener>,
    /// Reads the configuration anew for `POST /admin/reload`.
    pub reload_source: Option<ReloadSource>,
    /// Holds the writer still (tests make a slow writer with it).
    pub writer_gate: Option<WriterGate>,
}

/// Serves `listener` with `config` until `shutdown` completes, then shuts down in order.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<RunSummary, ProxyError> {
    run_with(listener, config, shutdown, RunOptions::default()).await
}

/// [`run`] with reloads, an admin listener and a writer gate.
pub async fn run_with(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
    opts: RunOptions,
) -> Result<RunSummary, ProxyError> {
    let writer_config = config.clone();
    let gate = opts.writer_gate.clone();
    let writer =
        tokio::task::spawn_blocking(move || AuditWriter::start_gated(&writer_config, gate))
            .await
            .map_err(|e| ProxyError::Io {
                what: "starting the audit writer".into(),
                source: std::io::Error::other(e.to_string()),
            })??;
    let stats = writer.stats();
    let config_handle = writer.config();
    let metrics = Arc::new(ProxyMetrics::new(stats.clone()));
    let shared = Arc::new(Shared::new(
        &config,
        writer.sender(),
        metrics.clone(),
        &config_handle.version(),
    )?);

    // Reloads from the caller and from `POST /admin/reload` meet in one channel.
    let (reload_tx, mut reloads) = mpsc::unbounded_channel::<ReloadRequest>();
    if let Some(mut outside) = opts.reloads {
        let tx = reload_tx.clone();
        tokio::spawn(async move {
            while let Some(r) = outside.recv().await {
                if tx.send(r).is_err() {
                    return;
                }
            }
        });
    }
    let admin_listener = match (opts.admin, config.admin.addr) {
        (Some(l), _) => Some(l),
        (None, Some(addr)) => {
            Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| ProxyError::Io {
                        what: format!("binding the admin listener on {addr}"),
                        source,
                    })?,
            )
        }
        (None, None) => None,
    };
    let shipper = crate::ship::Shipper::new(&config.ship, &config.audit.dir)?.map(Arc::new);
    let mut registry = metrics.registry();
    if let Some(s) = &shipper {
        s.metrics.register(&mut registry);
    }
    let ship_task = shipper.clone().map(|s| tokio::spawn(s.run()));
    let admin_state = Arc::new(AdminState {
        shared: shared.clone(),
        registry,
        token: arc_swap::ArcSwapOption::from(admin_token(&config)?.map(Arc::new)),
        queue_capacity: config.audit.queue_capacity,
        reloads: reload_tx,
        reload_source: opts.reload_source,
        writer: config_handle.clone(),
        stopping: AtomicBool::new(false),
    });
    let admin_task = admin_listener.map(|l| {
        if let Ok(addr) = l.local_addr() {
            tracing::info!(%addr, "admin listener: /metrics /healthz /readyz /admin/reload");
        }
        let head_timeout = Duration::from_secs(config.limits.client_timeout_secs.max(1));
        tokio::spawn(admin::serve(l, admin_state.clone(), head_timeout))
    });

    let mut tls_watch = None;
    let tls = match &config.listen.tls {
        Some(t) => {
            let reloader = crate::tls::TlsReloader::new(t)?;
            tls_watch = Some(tokio::spawn(reloader.clone().watch()));
            tracing::info!(cert = %t.cert.display(), mtls = t.client_ca.is_some(), "serving TLS");
            Some(reloader)
        }
        None => None,
    };
    let limits = &config.limits;
    // A connection must send its first request within the client timeout (a TLS client
    // must also finish its handshake within it); an over-capacity one sooner.
    let first_request = Duration::from_secs(limits.client_timeout_secs.max(1));
    let cap = Cap::new(
        crate::connection::effective_max(limits.max_connections),
        OVERFLOW_CONNECTIONS,
    );
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(first_request);
    // Heads up to the limit reach the service, which answers a recorded 431 past it.
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes * 2).unwrap_or(u32::MAX));
    let graceful = GracefulShutdown::new();
    // Connection tasks, so that those still open when the grace period ends can be cut
    // (which ends their exchanges and submits their records) before the writer stops.
    let mut connections = tokio::task::JoinSet::new();
    let mut current = config.clone();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            Some((new, reply)) = reloads.recv() => {
                let result = reload(&shared, &config_handle, &admin_state, &current, new.clone()).await;
                match &result {
                    Ok(version) => {
                        tracing::info!(version = %version, "configuration reloaded");
                        current = new;
                    }
                    Err(e) => tracing::error!(error = %e, "configuration reload refused; the previous one stays in force"),
                }
                let _ = reply.send(result);
            }
            accepted = listener.accept() => {
                let (stream, remote) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Some(slot) = cap.admit() else {
                    // Past the cap and its overflow: closed at once, counted.
                    metrics.connections_refused.inc();
                    drop(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                // Just past the cap a connection is still served, with 503s that say
                // why and are recorded, rather than left hanging in the backlog.
                let over = matches!(slot, Slot::Over(_));
                let wait = if over { first_request.min(OVERFLOW_FIRST_REQUEST) } else { first_request };
                let seen = Seen::default();
                let svc = ProxyService {
                    shared: shared.clone(),
                    remote,
                    over_capacity: over,
                    seen: seen.clone(),
                };
                let open = metrics.connections.clone();
                open.inc();
                let watcher = graceful.watcher();
                let builder = builder.clone();
                let tls = tls
                    .as_ref()
                    .map(|t| tokio_rustls::TlsAcceptor::from(t.current.load_full()));
                connections.spawn(async move {
                    let _slot = slot;
                    let result = match tls {
                        None => {
                            let conn = builder.serve_connection(TokioIo::new(stream), svc);
                            serve_unless_silent(watcher.watch(conn.into_owned()), seen, wait).await
                        }
                        Some(acceptor) => {
                            let handshake = acceptor.accept(stream);
                            match tokio::time::timeout(wait, handshake).await {
                                Ok(Ok(stream)) => {
                                    let conn = builder.serve_connection(TokioIo::new(stream), svc);
                                    serve_unless_silent(watcher.watch(conn.into_owned()), seen, wait).await
                                }
                                Ok(Err(e)) => Err(e.into()),
                                Err(_) => Err("TLS handshake timed out".into()),
                            }
                        }
                    };
                    open.dec();
                    if let Err(e) = result {
                        tracing::debug!(error = %e, %remote, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    admin_state.stopping.store(true, Ordering::Relaxed);
    let grace = Duration::from_secs(config.listen.shutdown_grace_secs);
    tracing::info!(
        grace_secs = grace.as_secs(),
        "shutting down: no new connections; finishing in-flight exchanges"
    );
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            connections = connections.len(),
            "shutdown grace elapsed; cutting the remaining connections"
        );
        connections.abort_all();
    }
    while connections.join_next().await.is_some() {}
    for t in admin_task.into_iter().chain(tls_watch).chain(ship_task) {
        t.abort();
    }
    drop(admin_state);
    drop(shared);
    let writer = tokio::task::spawn_blocking(move || writer.shutdown())
        .await
        .map_err(|e| ProxyError::Io {
            what: "stopping the audit writer".into(),
            source: std::io::Error::other(e.to_string()),
        })??;
    // The segment sealed at shutdown goes now if it can, else at the next start.
    if let Some(s) = shipper {
        let bound = Duration::from_secs(config.listen.shutdown_grace_secs.clamp(1, 10));
        match tokio::time::timeout(bound, s.pass()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "the last segment is not shipped; it goes at the next start")
            }
            Err(_) => {
                tracing::warn!("shipping the last segment took too long; it goes at the next start")
            }
        }
    }
    let dropped = stats.dropped_full.get() + stats.dropped_closed.get() + writer.unwritten;
    tracing::info!(records = writer.written, dropped, "audit trail closed");
    Ok(RunSummary { writer, dropped })
}

/// Applies `new` in order: checked first (routes, keys and their environment), then
/// the writer records the `config` event, then requests admitted from now on use it.
async fn reload(
    shared: &Shared,
    writer: &ConfigHandle,
    admin: &AdminState,
    current: &Config,
    new: Config,
) -> Result<String, String> {
    if new.listen != current.listen {
        return Err("[listen] cannot change on reload; restart custody to apply it".into());
    }
    if new.admin.addr != current.admin.addr {
        return Err("[admin] addr cannot change on reload; restart custody to apply it".into());
    }
    if new.otel != current.otel {
        return Err("[otel] cannot change on reload; restart custody to apply it".into());
    }
    // Resolve keys and the admin token before anything changes, so a missing variable
    // refuses the reload instead of leaving the old token in force.
    Active::new(&new, "").map_err(|e| e.to_string())?;
    let token = admin_token(&new).map_err(|e| e.to_string())?;
    let handle = writer.clone();
    let for_writer = new.clone();
    let version = tokio::task::spawn_blocking(move || handle.reload(&for_writer))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let active = Active::new(&new, &version).map_err(|e| e.to_string())?;
    shared.swap(active);
    admin.token.store(token.map(Arc::new));
    Ok(version)
}

/// The `/admin/*` bearer token: `[admin] token_env`, else `[admin] token`.
fn admin_token(config: &Config) -> Result<Option<String>, ProxyError> {
    if let Some(var) = &config.admin.token_env {
        let token = std::env::var(var).map_err(|_| ProxyError::Key {
            what: "[admin] token_env".into(),
            reason: format!("environment variable `{var}` is not set"),
        })?;
        return Ok(Some(token).filter(|t| !t.is_empty()));
    }
    Ok(config.admin.token.clone().filter(|t| !t.is_empty()))
}
