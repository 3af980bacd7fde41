//! Bounds on client connections, for the proxy and the admin listener alike: how many
//! may be open, and how long one may stay silent before its first request. Without
//! them, connections that never send a byte hold file descriptors until the process
//! runs out and real clients time out.

use std::{
    future::Future,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Connections beyond the cap that are still served (every request a recorded 503
/// saying why), so that a client learns it should retry; beyond these, a connection
/// is closed as soon as it is accepted.
pub const OVERFLOW_CONNECTIONS: usize = 64;

/// How long an over-capacity connection may wait before its first request.
pub const OVERFLOW_FIRST_REQUEST: Duration = Duration::from_secs(2);

/// File descriptors kept back from the connection cap for segments, indexes, logs and
/// the listeners themselves.
const RESERVED_FDS: u64 = 64;

/// A connection's place under the cap.
pub enum Slot {
    /// Within the cap: served normally.
    Within(OwnedSemaphorePermit),
    /// Over the cap: served with 503s.
    Over(OwnedSemaphorePermit),
}

/// The connection cap of one listener.
#[derive(Clone)]
pub struct Cap {
    within: Arc<Semaphore>,
    over: Arc<Semaphore>,
}

impl Cap {
    pub fn new(max: usize, overflow: usize) -> Self {
        Self {
            within: Arc::new(Semaphore::new(max)),
            over: Arc::new(Semaphore::new(overflow)),
        }
    }

    /// A slot for a connection just accepted; `None`: close it now.
    pub fn admit(&self) -> Option<Slot> {
        if let Ok(p) = self.within.clone().try_acquire_owned() {
            return Some(Slot::Within(p));
        }
        self.over.clone().try_acquire_owned().ok().map(Slot::Over)
    }
}

/// `max_connections`, lowered to what the process's file descriptor limit can hold:
/// each client connection may need a second descriptor for its upstream connection.
pub fn effective_max(configured: usize) -> usize {
    match fd_limit() {
        Some(limit) => {
            let fit = limit.saturating_sub(RESERVED_FDS + OVERFLOW_CONNECTIONS as u64) / 2;
            let fit = usize::try_from(fit).unwrap_or(usize::MAX).max(1);
            if fit < configured {
                tracing::warn!(
                    configured,
                    effective = fit,
                    fd_limit = limit,
                    "[limits] max_connections is more than the file descriptor limit can hold; lowered"
                );
            }
            configured.min(fit)
        }
        None => configured,
    }
}

fn fd_limit() -> Option<u64> {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    limit.current
}

/// Set by the connection's service when a request arrives.
#[derive(Clone, Default)]
pub struct Seen(Arc<AtomicBool>);

impl Seen {
    pub fn mark(&self) {
        // Relaxed: the only reader is the deadline below, and a late read only means the
        // connection is kept, as it should be.
        if !self.0.load(Ordering::Relaxed) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
}

/// Drives a connection, but ends it when no request has arrived within `wait` (a
/// client that connects and says nothing). Once a request arrived, `conn` alone
/// decides; hyper's header-read timeout then bounds each later request head.
pub async fn serve_unless_silent<F, E>(conn: F, seen: Seen, wait: Duration) -> Result<(), BoxError>
where
    F: Future<Output = Result<(), E>>,
    E: Into<BoxError>,
{
    let silent = async {
        tokio::time::sleep(wait).await;
        if seen.0.load(Ordering::Relaxed) {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        r = conn => r.map_err(Into::into),
        () = silent => Err("no request before the first-request deadline; closed".into()),
    }
}
