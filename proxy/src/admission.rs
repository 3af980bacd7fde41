//! Admission: every exchange takes an audit queue slot before it goes upstream, so
//! that what happens when the writer falls behind is decided up front (`[audit]
//! on_full`), never by stalling a response that is already streaming.

use std::{sync::Arc, time::Duration};

use custody_audit::AuditStats;
use custody_config::OnFull;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The outcome of admission.
pub enum Admit {
    /// Audited: the slot travels with the exchange and the writer frees it.
    Audited(OwnedSemaphorePermit),
    /// `on_full = "drop"` with a full queue: proceeds unaudited, counted as a gap.
    Unaudited,
    /// The queue is full: answer 503 (`reject`, or `backpressure` past its wait).
    Refused,
}

pub struct Admission {
    slots: Arc<Semaphore>,
    policy: OnFull,
    wait: Duration,
    max_bytes: i64,
    stats: Arc<AuditStats>,
}

impl Admission {
    pub fn new(audit: &custody_config::Audit, stats: Arc<AuditStats>) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(audit.queue_capacity)),
            policy: audit.on_full,
            wait: Duration::from_millis(audit.admission_timeout_ms),
            max_bytes: i64::try_from(audit.queue_max_bytes).unwrap_or(i64::MAX),
            stats,
        }
    }

    /// Whether the captured bytes waiting for the writer leave room.
    fn bytes_room(&self) -> bool {
        self.stats.queue_bytes.get() < self.max_bytes
    }

    /// Above nine tenths of either bound: not ready for more traffic.
    pub fn high_water(&self, capacity: usize) -> bool {
        let used = capacity.saturating_sub(self.slots.available_permits());
        used * 10 >= capacity * 9 || self.stats.queue_bytes.get() * 10 >= self.max_bytes * 9
    }

    pub async fn admit(&self) -> Admit {
        if self.bytes_room() {
            if let Ok(p) = self.slots.clone().try_acquire_owned() {
                return Admit::Audited(p);
            }
        }
        match self.policy {
            OnFull::Reject => self.lost(true),
            OnFull::Drop => self.lost(false),
            OnFull::Backpressure => {
                // A guard, so that a client leaving while it waits is not counted forever.
                struct Waiting<'a>(&'a AuditStats);
                impl Drop for Waiting<'_> {
                    fn drop(&mut self) {
                        self.0.admission_waiting.dec();
                    }
                }
                self.stats.admission_waiting.inc();
                let waiting = Waiting(&self.stats);
                let waited = tokio::time::timeout(self.wait, self.wait_for_room()).await;
                drop(waiting);
                match waited {
                    Ok(Some(p)) => Admit::Audited(p),
                    _ => self.lost(true),
                }
            }
        }
    }

    /// Waits for a slot and for the bytes to fall under the bound; the writer wakes
    /// `room` each time it takes an exchange.
    async fn wait_for_room(&self) -> Option<OwnedSemaphorePermit> {
        loop {
            let room = self.stats.room.notified();
            if self.bytes_room() {
                return self.slots.clone().acquire_owned().await.ok();
            }
            room.await;
        }
    }

    fn lost(&self, refused: bool) -> Admit {
        if self.stats.lose(refused) {
            tracing::warn!(
                policy = ?self.policy,
                "audit queue full: {}; a gap event will say how many",
                if refused { "refusing requests with 503" } else { "letting requests through UNAUDITED" }
            );
        }
        if refused {
            Admit::Refused
        } else {
            Admit::Unaudited
        }
    }
}
