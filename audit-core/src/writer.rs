//! The writer: a dedicated OS thread that takes exchanges off a bounded crossbeam
//! channel, assembles and redacts their records, chains them, and appends blocks.
//!
//! Blocks are cut when the buffer reaches [`BLOCK_TARGET`] or when traffic pauses.
//! fsync runs at most every `fsync_interval_ms` and at close.
//!
//! When the queue runs empty right after the writer took something, it naps [`NAP`]
//! instead of parking on the channel, and writes the block only if nothing came
//! meanwhile. Parking after every record made each sender pay a futex wake-up and a
//! context switch, which on a small machine cost more than the record, and cut one tiny
//! block per record. Under load the naps gather records into full blocks; when traffic
//! is sparse the first empty nap writes the block and the writer parks, so an idle
//! sidecar costs nothing. A durable response waiting for its fsync skips the nap.

use std::{
    panic::{catch_unwind, AssertUnwindSafe},
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant, UNIX_EPOCH},
};

use crossbeam_channel::{bounded, select, unbounded, Receiver, Sender, TryRecvError, TrySendError};

use crate::{
    assemble::Assembler,
    config_event::Snapshot,
    exchange::Exchange,
    fingerprint::Fingerprinter,
    index::Facts,
    lineage::ConversationIndex,
    metrics::AuditStats,
    policy::PolicySet,
    purge::{self, Selector},
    record::{self, Chain, EventRecord, EventTime},
    segment,
    signing::SignerKey,
    store::{ChainHead, Recovery, SegmentStore, StoreOptions},
    AuditError,
};

pub use crate::fingerprint::redactor_for;

/// Uncompressed bytes per block before it is cut.
pub const BLOCK_TARGET: usize = 256 * 1024;

/// The nap between polls of an empty queue while traffic flows.
pub const NAP: Duration = Duration::from_micros(500);

/// The proxy's handle on the queue: never blocks.
#[derive(Clone)]
pub struct AuditSender {
    tx: Sender<Exchange>,
    stats: Arc<AuditStats>,
}

impl AuditSender {
    /// Hands an exchange to the writer without blocking; a full or closed queue
    /// drops it, counts it and logs it.
    pub fn submit(&self, ex: Exchange) -> bool {
        match self.send(ex) {
            None => true,
            Some(TrySendError::Full(ex)) => {
                let n = self.stats.dropped_full.inc() + 1;
                tracing::warn!(dropped_total = n, path = %ex.uri.path(), "audit queue full: exchange dropped unaudited");
                false
            }
            Some(TrySendError::Disconnected(ex)) => {
                let n = self.stats.dropped_closed.inc() + 1;
                tracing::warn!(dropped_total = n, path = %ex.uri.path(), "audit writer stopped: exchange dropped unaudited");
                false
            }
        }
    }

    pub fn stats(&self) -> &Arc<AuditStats> {
        &self.stats
    }

    /// Hands an exchange over if there is room, giving it back otherwise; nothing is
    /// counted as dropped. For callers with their own policy for a full queue.
    pub fn try_submit(&self, ex: Exchange) -> Option<Exchange> {
        match self.send(ex) {
            None => None,
            Some(TrySendError::Full(ex)) | Some(TrySendError::Disconnected(ex)) => Some(ex),
        }
    }

    /// Waits for room in the queue. For tools and benchmarks on their own threads;
    /// never on the proxy's runtime, which must not block.
    pub fn submit_blocking(&self, ex: Exchange) -> bool {
        let bytes = queued_bytes(&ex);
        let ok = self.tx.send(ex).is_ok();
        if ok {
            self.count_in(bytes);
        }
        ok
    }

    /// Queues `ex`; on failure hands it back (by value: nothing is allocated for it).
    fn send(&self, ex: Exchange) -> Option<TrySendError<Exchange>> {
        let bytes = queued_bytes(&ex);
        if let Err(e) = self.tx.try_send(ex) {
            return Some(e);
        }
        self.count_in(bytes);
        None
    }

    fn count_in(&self, bytes: i64) {
        self.stats.submitted.inc();
        let depth = self.stats.queue_depth.inc() + 1;
        self.stats
            .queue_high_water
            .inner()
            .fetch_max(depth, std::sync::atomic::Ordering::Relaxed);
        self.stats.queue_bytes.inc_by(bytes);
    }

    /// Exchanges waiting for the writer.
    pub fn queued(&self) -> usize {
        self.tx.len()
    }

    /// Room in the queue.
    pub fn capacity(&self) -> usize {
        self.tx.capacity().unwrap_or(usize::MAX)
    }
}

/// The captured body bytes an exchange holds while it waits for the writer.
fn queued_bytes(ex: &Exchange) -> i64 {
    (ex.request.captured + ex.response.captured) as i64
}

/// What the writer did over its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriterSummary {
    pub head: ChainHead,
    pub written: u64,
    /// Records (and events) held at the stop that the disk would not take; the next
    /// start writes a `gap` event for them (see [`crate::unwritten`]).
    pub unwritten: u64,
    /// Nanoseconds of CPU the writer thread used, where the kernel tells it (Linux
    /// `schedstat`): what the benchmarks divide by the records written.
    pub cpu_nanos: Option<u64>,
    /// Nanoseconds of it the policies took (their metric's `record` phase, summed).
    pub policy_nanos: u64,
}

/// Settings the writer needs (from `[audit]`).
#[derive(Debug, Clone)]
pub struct WriterConfig {
    pub segment_max_bytes: u64,
    pub segment_max_age: Duration,
    pub queue_capacity: usize,
    pub decode_limit: usize,
    pub fsync_interval: Duration,
    pub checkpoint_interval: Duration,
    pub retention_days: Option<u32>,
    pub content_retention_days: Option<u32>,
    /// How long a stop keeps retrying records the disk refuses before it gives up and
    /// leaves a note for the next start.
    pub shutdown_hold: Duration,
    /// Served-model tracking and the live drift metrics.
    pub drift: bool,
}

impl From<&custody_config::Audit> for WriterConfig {
    fn from(a: &custody_config::Audit) -> Self {
        Self {
            shutdown_hold: Duration::from_secs(5),
            segment_max_bytes: a.segment_max_bytes,
            segment_max_age: Duration::from_secs(a.segment_max_age_secs),
            queue_capacity: a.queue_capacity,
            decode_limit: a.decoded_max_bytes,
            fsync_interval: Duration::from_millis(a.fsync_interval_ms.max(1)),
            checkpoint_interval: Duration::from_secs(a.checkpoint_interval_secs.max(1)),
            retention_days: a.retention_days,
            content_retention_days: a.content_retention_days,
            drift: a.drift,
        }
    }
}

/// The running writer thread.
pub struct AuditWriter {
    sender: AuditSender,
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<Result<WriterSummary, AuditError>>>,
    recovery: Recovery,
    config: ConfigHandle,
}

/// Changes the writer takes between records.
enum Control {
    Reload {
        assembler: Box<Assembler>,
        conversation_index_size: usize,
        event: serde_json::Value,
        /// Told once the event is queued: records assembled from then on use the
        /// new configuration.
        applied: Sender<()>,
    },
    /// An event from outside the proxy (the console's `access` events), chained like
    /// any other; `durable` is told once it is fsynced.
    Event {
        event: serde_json::Value,
        durable: tokio::sync::oneshot::Sender<()>,
    },
    /// A data subject's request: their records' bodies purged, the purge recorded.
    Purge {
        selector: Selector,
        done: Sender<Result<PurgeSummary, String>>,
    },
    /// From the purger: segments rewritten for `job`, to be recorded and put in place.
    /// `ack` is dropped once they are (the purger reads no segment meanwhile).
    CommitPurge {
        job: PurgeJob,
        rewritten: Vec<purge::Rewritten>,
        ack: Sender<()>,
    },
}

/// A purge pass for the purger thread: rewriting segments is the slow part (every line
/// re-hashed, blocks recompressed), so it runs beside the writer, never in its way.
struct PurgeJob {
    selector: Selector,
    event: serde_json::Value,
    /// Write the event even when nothing was purged (a data subject is answered).
    always: bool,
    /// The newest segment it may rewrite (all sealed).
    through: u64,
    /// Content retention passes over segments up to this one.
    clean_through: u64,
    done: Option<Sender<Result<PurgeSummary, String>>>,
}

/// The purger thread and how to stop it.
struct Purger {
    jobs: Sender<PurgeJob>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    /// Disconnected when the thread has ended.
    ended: Receiver<()>,
    thread: JoinHandle<()>,
}

impl Purger {
    fn spawn(dir: std::path::PathBuf, control: Sender<Control>) -> Result<Self, AuditError> {
        let (jobs, rx) = bounded::<PurgeJob>(8);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ended_tx, ended) = bounded::<()>(0);
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("custody-purger".into())
            .spawn(move || {
                let _ended = ended_tx;
                purger(&dir, &rx, &control, &flag);
            })
            .map_err(|e| AuditError::Writer(format!("cannot start the purger thread: {e}")))?;
        Ok(Self {
            jobs,
            stop,
            ended,
            thread,
        })
    }
}

fn purger(
    dir: &std::path::Path,
    jobs: &Receiver<PurgeJob>,
    control: &Sender<Control>,
    stop: &std::sync::atomic::AtomicBool,
) {
    use std::sync::atomic::Ordering;
    let mut compressor = match crate::store::compressor() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "the purger cannot compress; purges are refused");
            return;
        }
    };
    for mut job in jobs {
        let retention = matches!(job.selector, Selector::Before(_));
        let mut rewritten = Vec::new();
        let mut skipped = Vec::new();
        let segments = crate::store::list_segments(dir).unwrap_or_else(|e| {
            tracing::error!(error = %e, "the purger cannot list the trail");
            Vec::new()
        });
        for (number, path) in segments {
            if number > job.through || stop.load(Ordering::Relaxed) {
                break;
            }
            if retention && (number <= job.clean_through || purge::known_clean(&path)) {
                continue;
            }
            match purge::rewrite(&path, number, &job.selector, &mut compressor, stop) {
                Ok(Some(r)) => rewritten.push(r),
                Ok(None) => {}
                // A segment that does not verify is not rewritten (that would launder
                // it); the others still are.
                Err(e) if !stop.load(Ordering::Relaxed) => {
                    tracing::error!(error = %e, "purge skipped a segment it could not read");
                    skipped.push(crate::segment::segment_file_name(number));
                }
                Err(_) => break,
            }
        }
        if stop.load(Ordering::Relaxed) {
            // Rewrites are dropped, and their files with them; retention tries again.
            if let Some(done) = job.done {
                let _ = done.send(Err("custody is stopping; nothing was purged".into()));
            }
            return;
        }
        if !skipped.is_empty() {
            // The answer and the chain say the purge is incomplete, and where.
            job.event["skipped"] = skipped.into();
        }
        let (ack, acked) = bounded(0);
        if control
            .send(Control::CommitPurge {
                job,
                rewritten,
                ack,
            })
            .is_err()
        {
            return;
        }
        // Until the writer has put them in place: the next job must read those bytes.
        let _ = acked.recv();
    }
}

/// What a purge did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PurgeSummary {
    /// Segments rewritten, records that lost their bodies, bodies purged.
    pub segments: u64,
    pub records: u64,
    pub bodies: u64,
    /// The `seq` of the `purge` event, when one was written.
    pub event_seq: Option<u64>,
    /// Segments that could not be read (see the log and `custody log verify`): what
    /// they hold was not purged.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
}

/// Applies configuration reloads to the writer; cheap to clone.
#[derive(Clone)]
pub struct ConfigHandle {
    control: Sender<Control>,
    fingerprinter: Fingerprinter,
    current: Arc<Mutex<(Snapshot, custody_config::Config)>>,
}

impl ConfigHandle {
    /// [`AuditWriter::event`], from a handle that outlives no writer: once the writer
    /// stops, the event is refused.
    pub fn event(
        &self,
        event: serde_json::Value,
    ) -> Result<tokio::sync::oneshot::Receiver<()>, AuditError> {
        let (durable, written) = tokio::sync::oneshot::channel();
        self.control
            .send(Control::Event { event, durable })
            .map_err(|_| AuditError::Writer("the writer has stopped".into()))?;
        Ok(written)
    }

    /// Purges the bodies of one person's records (`client.user` / `client.end_user`,
    /// given in the clear or as stored; or a pseudonym), every segment so far, and
    /// records the purge in the chain. Blocks until done.
    pub fn purge(&self, selector: Selector) -> Result<PurgeSummary, AuditError> {
        let selector = match selector {
            Selector::User(u) => {
                Selector::User(crate::assemble::identity_token(&self.fingerprinter, &u))
            }
            other => other,
        };
        let (done, result) = bounded(1);
        let stopped = || AuditError::Writer("the writer has stopped".into());
        self.control
            .send(Control::Purge { selector, done })
            .map_err(|_| stopped())?;
        result
            .recv()
            .map_err(|_| stopped())?
            .map_err(AuditError::Writer)
    }

    /// The version of the configuration in force.
    pub fn version(&self) -> String {
        self.current
            .lock()
            .map(|c| c.0.version.clone())
            .unwrap_or_default()
    }

    /// Hands a new configuration to the writer: new redaction rules, lineage headers and
    /// source from the next record on, and a `config` event in the chain naming what
    /// changed. `[audit]` cannot change without a restart. Returns the new version.
    pub fn reload(&self, config: &custody_config::Config) -> Result<String, AuditError> {
        let mut current = self
            .current
            .lock()
            .map_err(|_| AuditError::Writer("configuration state poisoned".into()))?;
        if current.1.audit != config.audit {
            return Err(AuditError::Writer(
                "[audit] cannot change on reload; restart custody to apply it".into(),
            ));
        }
        let wc = WriterConfig::from(&config.audit);
        let assembler = Assembler::new(
            redactor_for(config)?,
            self.fingerprinter.clone(),
            wc.decode_limit,
            config,
            Arc::new(PolicySet::from_config(config)?),
        );
        let snapshot = Snapshot::of(config, &self.fingerprinter);
        let event = snapshot.event("reload", Some(&current.0));
        let (applied, done) = bounded(1);
        let stopped = || AuditError::Writer("the writer has stopped".into());
        self.control
            .send(Control::Reload {
                assembler: Box::new(assembler),
                conversation_index_size: config.lineage.conversation_index_size,
                event,
                applied,
            })
            .map_err(|_| stopped())?;
        // The caller admits traffic under the new version only after this.
        done.recv_timeout(Duration::from_secs(30))
            .map_err(|_| stopped())?;
        snapshot.store_last(&config.audit.dir);
        let version = snapshot.version.clone();
        *current = (snapshot, config.clone());
        Ok(version)
    }
}

impl AuditWriter {
    /// Opens (and if needed repairs) the trail in `[audit] dir` and starts the thread.
    pub fn start(config: &custody_config::Config) -> Result<Self, AuditError> {
        Self::start_gated(config, None)
    }

    /// [`AuditWriter::start`] with a gate that can hold the writer still.
    pub fn start_gated(
        config: &custody_config::Config,
        gate: Option<WriterGate>,
    ) -> Result<Self, AuditError> {
        let audit = &config.audit;
        let wc = WriterConfig::from(audit);
        let signer = audit
            .signing_key
            .as_deref()
            .map(SignerKey::load)
            .transpose()?;
        match &signer {
            Some(k) => tracing::info!(public_key = k.public_hex(), "seals and checkpoints are signed"),
            None => tracing::warn!(
                "[audit] signing_key is not set: seals and checkpoints are NOT signed; the trail is a hash chain only, which an attacker with write access can recompute"
            ),
        }
        let options = StoreOptions {
            max_bytes: wc.segment_max_bytes,
            max_age: wc.segment_max_age,
            fsync: audit.fsync,
            signer,
        };
        let (store, recovery) = SegmentStore::open(&audit.dir, options)?;
        let unwritten = crate::unwritten::Reserve::open(&audit.dir);
        let key_path = audit
            .fingerprint_key_file
            .clone()
            .unwrap_or_else(|| audit.dir.join("fingerprint.key"));
        let fingerprinter = Fingerprinter::load_or_create(&key_path)?;
        let redactor = redactor_for(config)?;
        let policy = Arc::new(PolicySet::from_config(config)?);
        let assembler = Assembler::new(
            redactor,
            fingerprinter.clone(),
            wc.decode_limit,
            config,
            policy,
        );
        let snapshot = Snapshot::of(config, &fingerprinter);
        let start_event = snapshot.event("start", Snapshot::load_last(&audit.dir).as_ref());
        snapshot.store_last(&audit.dir);
        let (control_tx, control_rx) = unbounded();
        let handle = ConfigHandle {
            control: control_tx,
            fingerprinter,
            current: Arc::new(Mutex::new((snapshot, config.clone()))),
        };
        let wc = WriterConfig {
            shutdown_hold: Duration::from_secs(config.listen.shutdown_grace_secs.min(30)),
            ..wc
        };
        let stats = Arc::new(AuditStats::default());
        let otel = crate::otel::Otel::start(&config.otel, stats.clone())?;
        Self::start_with(
            (store, recovery, unwritten),
            (assembler, otel, stats),
            wc,
            config.lineage.conversation_index_size,
            start_event,
            (handle, control_rx),
            gate,
        )
    }

    fn start_with(
        (store, recovery, (reserve, note)): (SegmentStore, Recovery, Unwritten),
        (assembler, otel, stats): (Assembler, Option<crate::otel::Otel>, Arc<AuditStats>),
        wc: WriterConfig,
        conversation_index_size: usize,
        start_event: serde_json::Value,
        (config, control): (ConfigHandle, Receiver<Control>),
        gate: Option<WriterGate>,
    ) -> Result<Self, AuditError> {
        let (tx, rx) = bounded(wc.queue_capacity);
        let (stop_tx, stop_rx) = bounded(1);
        let conversations = crate::lineage::rebuild(store.dir(), conversation_index_size);
        let (dir, purge_control) = (store.dir().to_owned(), config.control.clone());
        purge::remove_leftovers(&dir);
        let mut worker = Worker {
            gate,
            batch: Batch::new(store.head()),
            store,
            assembler,
            conversations,
            stats: stats.clone(),
            fsync_interval: wc.fsync_interval,
            last_sync: Instant::now(),
            checkpoint_interval: wc.checkpoint_interval,
            last_checkpoint: Instant::now(),
            retention: wc.retention_days,
            content_retention: wc.content_retention_days,
            content_clean_through: 0,
            content_purge_running: false,
            drift: if wc.drift {
                crate::drift::rebuild(&dir)
            } else {
                crate::drift::DriftTracker::default()
            },
            drift_on: wc.drift,
            purger: Some(Purger::spawn(dir, purge_control)?),
            last_retention: Instant::now(),
            retry_at: None,
            reserve,
            shutdown_hold: wc.shutdown_hold,
            policy_nanos: 0,
            otel,
        };
        for (route, requested, served) in worker.drift.served() {
            let labels = crate::metrics::ServedLabels {
                route: route.to_owned(),
                requested_model: worker.stats.model_label(requested),
                served_model: worker.stats.model_label(served),
            };
            worker.stats.served_model.get_or_create(&labels).set(1);
        }
        if let Some(event) = recovery_event(&recovery) {
            worker.add_event(event);
        }
        if let Some(mut note) = note {
            note["type"] = "gap".into();
            note["reason"] = "unwritten_at_shutdown".into();
            worker.add_event(note);
        }
        worker.add_event(start_event);
        worker.stats.measure_disk(worker.store.dir());
        worker.apply_retention();
        let thread = std::thread::Builder::new()
            .name("custody-writer".into())
            .spawn(move || worker.run(rx, stop_rx, control))
            .map_err(|e| AuditError::Writer(format!("cannot start thread: {e}")))?;
        Ok(Self {
            sender: AuditSender { tx, stats },
            stop: Some(stop_tx),
            thread: Some(thread),
            recovery,
            config,
        })
    }

    /// Reloads and the version in force.
    /// Chains `event` (a JSON object with its `type`) into the trail; the receiver is
    /// told once it is fsynced, so that what it records is on disk before the caller
    /// acts (the console serves a read only then).
    pub fn event(
        &self,
        event: serde_json::Value,
    ) -> Result<tokio::sync::oneshot::Receiver<()>, AuditError> {
        self.config.event(event)
    }

    pub fn config(&self) -> ConfigHandle {
        self.config.clone()
    }

    pub fn sender(&self) -> AuditSender {
        self.sender.clone()
    }

    pub fn stats(&self) -> Arc<AuditStats> {
        self.sender.stats.clone()
    }

    /// What start-up recovery did.
    pub fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    /// Drains what is queued, writes it, syncs and closes the segment. Blocks: call it
    /// from a blocking context. Exchanges submitted afterwards are counted as dropped.
    pub fn shutdown(mut self) -> Result<WriterSummary, AuditError> {
        self.stop.take();
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| AuditError::Writer("writer thread panicked".into()))?,
            None => Err(AuditError::Writer("already shut down".into())),
        }
    }
}

impl Drop for AuditWriter {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The note reservation, and what a previous stop left in it.
type Unwritten = (crate::unwritten::Reserve, Option<serde_json::Value>);

/// Records sealed but not yet written.
struct Batch {
    buf: Vec<u8>,
    first_seq: u64,
    count: u32,
    first_ms: i64,
    last_ms: i64,
    /// The chain head after the records in `buf`.
    head: ChainHead,
    /// Searchable values of the records in `buf`, for the segment index.
    facts: Facts,
    /// Responses held until these records are fsynced (`durability = "durable"`).
    waiters: Vec<tokio::sync::oneshot::Sender<()>>,
    /// Exchanges told lost by the loss events in `buf`: (unaudited, refused).
    losses: (u64, u64),
}

impl Batch {
    fn new(head: ChainHead) -> Self {
        Self {
            buf: Vec::with_capacity(BLOCK_TARGET + 64 * 1024),
            first_seq: head.next_seq,
            count: 0,
            first_ms: i64::MAX,
            last_ms: i64::MIN,
            head,
            facts: Facts::default(),
            waiters: Vec::new(),
            losses: (0, 0),
        }
    }
}

struct Worker {
    gate: Option<WriterGate>,
    store: SegmentStore,
    assembler: Assembler,
    conversations: ConversationIndex,
    batch: Batch,
    stats: Arc<AuditStats>,
    fsync_interval: Duration,
    last_sync: Instant,
    checkpoint_interval: Duration,
    last_checkpoint: Instant,
    retention: Option<u32>,
    content_retention: Option<u32>,
    /// Segments up to this one hold no body left to purge.
    content_clean_through: u64,
    /// A content retention pass is with the purger.
    content_purge_running: bool,
    /// What serves each route and requested model, for `drift` events.
    drift: crate::drift::DriftTracker,
    /// `[audit] drift`: the tracker and the live drift metrics are kept.
    drift_on: bool,
    purger: Option<Purger>,
    last_retention: Instant,
    retry_at: Option<Instant>,
    /// Where a stop that cannot write tells the next start.
    reserve: crate::unwritten::Reserve,
    shutdown_hold: Duration,
    policy_nanos: u64,
    /// `[otel]`: each record as a span.
    otel: Option<crate::otel::Otel>,
}

/// Declares where the record's bodies lie in its line, so that content retention can
/// purge them later without breaking the chain (see [`crate::content`]). Everything
/// before `request` is custody's own structure (strings escape their quotes), so the
/// first `"request":{"body":` is the request's; the response's follows the request body.
fn declare_bodies(line: &mut Vec<u8>, record: &record::Record) {
    let mut spans = Vec::with_capacity(2);
    let mut from = 0;
    for (key, body) in [
        (&b"\"request\":{\"body\":"[..], &record.request),
        (&b"\"response\":{\"body\":"[..], &record.response),
    ] {
        let Some(value) = body.body.as_ref().map(|b| b.get().as_bytes()) else {
            continue;
        };
        let at = memchr::memmem::find(&line[from..], key).map(|i| from + i + key.len() - 7);
        let v = at.map_or(0, |a| a + 7);
        match at {
            Some(at) if line.get(v..v + value.len()) == Some(value) => {
                spans.push((at, value.len()));
                from = v + value.len();
            }
            _ => {
                spans.clear();
                break;
            }
        }
    }
    let wanted = record.request.body.is_some() || record.response.body.is_some();
    if wanted && (spans.is_empty() || !segment::declare_bodies(line, &spans)) {
        tracing::warn!(
            seq = record.seq,
            "record bodies could not be declared; they cannot be purged"
        );
    }
}

/// How often retention looks for expired segments.
const RETENTION_EVERY: Duration = Duration::from_secs(60);

/// Unix ms as RFC 3339.
fn rfc3339_ms(ms: i64) -> Option<String> {
    let ms = u64::try_from(ms).ok()?;
    Some(humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string())
}

/// The event that tells traffic the trail does not hold: unaudited (`on_full = "drop"`)
/// or refused at admission, while the queue was full.
fn loss_event(l: &crate::metrics::Losses) -> serde_json::Value {
    let time = |ms: Option<i64>| ms.and_then(rfc3339_ms);
    serde_json::json!({
        "type": "gap",
        "reason": "audit_queue_full",
        "unaudited": l.unaudited,
        "refused": l.refused,
        "from": time(l.first_ms),
        "to": time(l.last_ms),
    })
}

/// Holds the writer still (tests make a deliberately slow writer with it), and moves
/// its clock (tests run retention without waiting days).
#[derive(Clone, Default)]
pub struct WriterGate(Arc<GateState>);

#[derive(Default)]
struct GateState {
    closed: Mutex<bool>,
    opened: std::sync::Condvar,
    clock_offset_ms: std::sync::atomic::AtomicI64,
}

impl WriterGate {
    /// The writer stops before its next exchange.
    pub fn close(&self) {
        if let Ok(mut closed) = self.0.closed.lock() {
            *closed = true;
        }
    }

    pub fn open(&self) {
        if let Ok(mut closed) = self.0.closed.lock() {
            *closed = false;
        }
        self.0.opened.notify_all();
    }

    /// The writer's clock runs this far ahead of the system's.
    pub fn advance_clock(&self, by: Duration) {
        let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        self.0
            .clock_offset_ms
            .fetch_add(ms, std::sync::atomic::Ordering::Relaxed);
    }

    fn clock_offset_ms(&self) -> i64 {
        self.0
            .clock_offset_ms
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn wait_open(&self) {
        let Ok(mut closed) = self.0.closed.lock() else {
            return;
        };
        while *closed {
            match self.0.opened.wait(closed) {
                Ok(c) => closed = c,
                Err(_) => return,
            }
        }
    }
}

/// The event that tells a repaired crash apart from tampering.
fn recovery_event(r: &Recovery) -> Option<serde_json::Value> {
    let name = |p: &std::path::Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
    if r.cut.is_none() && r.sealed.is_none() {
        return None;
    }
    Some(serde_json::json!({
        "type": "recovery",
        "cut": r.cut.as_ref().map(|c| serde_json::json!({
            "segment": name(&c.segment),
            "bytes": c.bytes,
            "quarantine": name(&c.quarantine),
            "reason": c.reason,
        })),
        "sealed_segment": r.sealed.as_deref().and_then(name),
    }))
}

impl Worker {
    fn run(
        &mut self,
        rx: Receiver<Exchange>,
        stop: Receiver<()>,
        control: Receiver<Control>,
    ) -> Result<WriterSummary, AuditError> {
        let tick = self.fsync_interval;
        let mut taken = 0u32;
        // Took an exchange since the last nap.
        let mut busy = false;
        loop {
            // While blocks cannot be written (disk full, read-only), take nothing more:
            // what is admitted stays queued, the queue fills, and `on_full` decides what
            // new requests meet. Only a stop, a reload or the retry time wakes the writer.
            if let Some(at) = self.retry_at {
                let wait = at.saturating_duration_since(Instant::now());
                select! {
                    recv(stop) -> _ => break,
                    recv(control) -> c => if let Ok(c) = c { self.apply(c) },
                    default(wait) => {},
                }
                self.flush();
                continue;
            }
            // Take what is queued without the cost of a select; wait only when empty.
            match rx.try_recv() {
                Ok(ex) => {
                    self.add(ex);
                    busy = true;
                    taken = taken.wrapping_add(1);
                    // Under sustained load the queue never empties: look for a stop and
                    // reloads now and then.
                    if taken.is_multiple_of(256) && self.stopping(&rx, &control, &stop) {
                        break;
                    }
                }
                Err(TryRecvError::Disconnected) => break,
                // Traffic is flowing: nap, and let senders enqueue without waking anyone.
                Err(TryRecvError::Empty) if busy && self.batch.waiters.is_empty() => {
                    busy = false;
                    std::thread::sleep(NAP);
                    if self.stopping(&rx, &control, &stop) {
                        break;
                    }
                }
                Err(TryRecvError::Empty) => select! {
                    recv(rx) -> msg => match msg {
                        Ok(ex) => {
                            self.add(ex);
                            busy = true;
                        }
                        Err(_) => break,
                    },
                    recv(control) -> c => if let Ok(c) = c { self.apply(c) },
                    recv(stop) -> _ => {
                        self.drain(&rx);
                        break;
                    },
                    default(tick) => {},
                },
            }
            // Room was made: wake admissions waiting under backpressure.
            self.stats.room.notify_waiters();
            self.add_losses();
            let idle = rx.is_empty();
            if self.batch.count > 0
                && (self.batch.buf.len() >= BLOCK_TARGET
                    || (idle && (!busy || !self.batch.waiters.is_empty())))
            {
                self.flush();
            }
            if self.last_sync.elapsed() >= self.fsync_interval {
                self.sync();
            }
            if self.last_checkpoint.elapsed() >= self.checkpoint_interval && self.batch.count == 0 {
                if let Err(e) = self.store.checkpoint() {
                    tracing::error!(error = %e, "checkpoint failed");
                }
                self.last_checkpoint = Instant::now();
                self.stats.measure_disk(self.store.dir());
            }
            if let Err(e) = self.store.rotate_if_old() {
                tracing::error!(error = %e, "segment rotation failed");
            }
            if (self.retention.is_some() || self.content_retention.is_some())
                && self.last_retention.elapsed() >= RETENTION_EVERY
            {
                self.apply_retention();
            }
        }
        self.stop_purger(&control);
        // A stop while the disk was failing left exchanges queued: one last try.
        self.drain(&rx);
        self.add_losses();
        self.retry_at = None;
        self.flush();
        // The disk may come back within the hold (space freed, a volume remounted).
        let hold_until = Instant::now() + self.shutdown_hold;
        while self.batch.count > 0 && Instant::now() < hold_until {
            std::thread::sleep(Duration::from_millis(100));
            self.retry_at = None;
            self.flush();
        }
        let unwritten = u64::from(self.batch.count);
        if unwritten > 0 {
            self.leave_note();
        }
        if let Some(otel) = &self.otel {
            otel.shutdown();
        }
        self.store.close()?;
        Ok(WriterSummary {
            head: self.store.head(),
            written: self.stats.written.get(),
            unwritten,
            cpu_nanos: thread_cpu_nanos(),
            policy_nanos: self.policy_nanos,
        })
    }

    /// Applies waiting reloads; on a stop, takes what is queued and says so. For the
    /// loop's stretches without a `select`.
    fn stopping(
        &mut self,
        rx: &Receiver<Exchange>,
        control: &Receiver<Control>,
        stop: &Receiver<()>,
    ) -> bool {
        while let Ok(c) = control.try_recv() {
            self.apply(c);
        }
        if matches!(stop.try_recv(), Err(TryRecvError::Empty)) {
            return false;
        }
        self.drain(rx);
        true
    }

    /// Turns losses counted since the last call into a `gap` event.
    fn add_losses(&mut self) {
        if let Some(l) = self.stats.take_losses() {
            self.batch.losses.0 += l.unaudited;
            self.batch.losses.1 += l.refused;
            self.add_event(loss_event(&l));
        }
    }

    /// Writes what the stop could not into the reserved note, for the next start.
    fn leave_note(&mut self) {
        let b = &self.batch;
        let time = |ms: i64| {
            u64::try_from(ms).ok().map(|m| {
                humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(m)).to_string()
            })
        };
        let note = serde_json::json!({
            "records": b.count,
            "first_seq": b.first_seq,
            "from": time(b.first_ms),
            "to": time(b.last_ms),
            "unaudited": b.losses.0,
            "refused": b.losses.1,
            "written_at": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        });
        match self.reserve.record(&note) {
            Ok(()) => tracing::error!(
                records = b.count,
                "audit writer stopping with records the disk would not take; the next start writes a gap event for them"
            ),
            Err(e) => tracing::error!(
                records = b.count,
                refused = b.losses.1,
                error = %e,
                "audit writer stopping with records it could not write, and no note of them could be left: the chain will not tell this loss"
            ),
        }
    }

    /// Takes everything queued.
    /// Takes everything queued (at a stop), cut into blocks of the usual size: a full
    /// queue drained into one block would make a block readers must hold whole.
    fn drain(&mut self, rx: &Receiver<Exchange>) {
        while let Ok(ex) = rx.try_recv() {
            self.add(ex);
            if self.batch.buf.len() >= BLOCK_TARGET {
                self.flush();
            }
        }
    }

    fn apply(&mut self, control: Control) {
        match control {
            Control::Reload {
                assembler,
                conversation_index_size,
                event,
                applied,
            } => {
                self.assembler = *assembler;
                self.conversations.set_capacity(conversation_index_size);
                self.add_event(event);
                let _ = applied.send(());
            }
            Control::Event { event, durable } => {
                self.add_event(event);
                self.batch.waiters.push(durable);
            }
            Control::Purge { selector, done } => {
                if let Err((e, done)) = self.purge_subject(selector, done) {
                    let _ = done.send(Err(e.to_string()));
                }
            }
            Control::CommitPurge {
                job,
                rewritten,
                ack,
            } => {
                self.commit_purge(job, rewritten);
                // The purger goes on to its next pass.
                drop(ack);
            }
        }
    }

    /// Hands a pass to the purger; gives the answer channel back when it cannot.
    #[allow(clippy::result_large_err)]
    fn send_purge(&self, job: PurgeJob) -> Result<(), (AuditError, PurgeJob)> {
        let Some(p) = &self.purger else {
            return Err((AuditError::Writer("custody is stopping".into()), job));
        };
        p.jobs.try_send(job).map_err(|e| {
            let why = match e {
                TrySendError::Full(_) => "too many purges are waiting; try again later",
                TrySendError::Disconnected(_) => "the purger has stopped (see the log)",
            };
            (AuditError::Writer(why.into()), e.into_inner())
        })
    }

    /// Stops the purger: a pass under way is left (its files removed), and one waiting
    /// to be recorded is refused; content retention redoes them at the next start.
    fn stop_purger(&mut self, control: &Receiver<Control>) {
        let Some(p) = self.purger.take() else { return };
        p.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        drop(p.jobs);
        loop {
            select! {
                recv(control) -> c => match c {
                    Ok(Control::CommitPurge { job, .. }) => {
                        if let Some(done) = job.done {
                            let _ = done.send(Err("custody is stopping; nothing was purged".into()));
                        }
                    }
                    Ok(other) => self.apply(other),
                    Err(_) => break,
                },
                recv(p.ended) -> _ => break,
            }
        }
        let _ = p.thread.join();
    }

    /// A data subject's request, over every segment: the open one is sealed first so
    /// that it can be rewritten too. The answer goes to `done` once the purge is in
    /// place; on an error here, the error and `done` come back.
    #[allow(clippy::result_large_err)]
    fn purge_subject(
        &mut self,
        selector: Selector,
        done: Sender<Result<PurgeSummary, String>>,
    ) -> Result<(), (AuditError, Sender<Result<PurgeSummary, String>>)> {
        self.retry_at = None;
        self.flush();
        if self.batch.count > 0 {
            let e = "the trail cannot be written now (see the log); nothing was purged";
            return Err((AuditError::Writer(e.into()), done));
        }
        if let Err(e) = self.store.close_segment() {
            return Err((e, done));
        }
        let (who, value) = match &selector {
            Selector::User(u) => ("user", u.clone()),
            Selector::Pseudonym(p) => ("pseudonym", p.clone()),
            Selector::Before(_) => ("before", String::new()),
        };
        let mut event = serde_json::json!({"type": "purge", "reason": "data_subject"});
        event[who] = value.into();
        let job = PurgeJob {
            selector,
            event,
            always: true,
            through: self.store.newest_number().unwrap_or(0),
            clean_through: 0,
            done: Some(done),
        };
        self.send_purge(job)
            .map_err(|(e, job)| (e, job.done.unwrap_or_else(|| bounded(1).0)))
    }

    /// Content retention: bodies of sealed segments whose newest record is older than
    /// `content_retention_days`.
    fn apply_content_retention(&mut self) {
        let Some(days) = self.content_retention else {
            return;
        };
        if self.content_purge_running {
            return;
        }
        let cutoff = self.now_ms() - i64::from(days) * 86_400_000;
        let event = serde_json::json!({
            "type": "purge",
            "reason": "content_retention",
            "content_retention_days": days,
            "before": rfc3339_ms(cutoff),
        });
        let through = match self.store.open_number() {
            Some(open) => open.saturating_sub(1),
            None => self.store.newest_number().unwrap_or(0),
        };
        let job = PurgeJob {
            selector: Selector::Before(cutoff),
            event,
            always: false,
            through,
            clean_through: self.content_clean_through,
            done: None,
        };
        match self.send_purge(job) {
            Ok(()) => self.content_purge_running = true,
            Err((e, _)) => tracing::debug!(error = %e, "content retention waits"),
        }
    }

    /// A pass the purger finished: recorded and put in place, its answer sent.
    fn commit_purge(&mut self, job: PurgeJob, rewritten: Vec<purge::Rewritten>) {
        let retention = matches!(job.selector, Selector::Before(_));
        // Segment retention may have deleted a segment since the purger read it.
        let rewritten: Vec<_> = rewritten.into_iter().filter(|r| r.path.exists()).collect();
        let result = self.record_purge(rewritten, job.event, job.always);
        if retention {
            self.content_purge_running = false;
            match &result {
                Ok(s) if s.segments > 0 => tracing::info!(
                    segments = s.segments,
                    records = s.records,
                    bodies = s.bodies,
                    "content retention purged bodies"
                ),
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "content retention failed"),
            }
            self.note_clean();
        }
        if let Some(done) = job.done {
            let _ = done.send(result.map_err(|e| e.to_string()));
        }
    }

    /// States the rewrites in a `purge` event covered by a checkpoint, then puts them in
    /// place (see [`crate::purge`]). `always`: write the event even when nothing was
    /// purged (a data subject's request is answered either way).
    fn record_purge(
        &mut self,
        rewritten: Vec<purge::Rewritten>,
        mut event: serde_json::Value,
        always: bool,
    ) -> Result<PurgeSummary, AuditError> {
        let summary = PurgeSummary {
            segments: rewritten.len() as u64,
            records: rewritten.iter().map(|r| r.records).sum(),
            bodies: rewritten.iter().map(|r| r.bodies).sum(),
            event_seq: None,
            skipped: event["skipped"]
                .as_array()
                .map(|s| {
                    s.iter()
                        .filter_map(|n| n.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default(),
        };
        if rewritten.is_empty() && !always {
            return Ok(summary);
        }
        event["records"] = summary.records.into();
        event["bodies"] = summary.bodies.into();
        event["segments"] = rewritten.iter().map(purge::Rewritten::statement).collect();
        let seq = self.batch.head.next_seq;
        self.add_event(event);
        self.retry_at = None;
        self.flush();
        let written = self.batch.count == 0;
        let covered = written && self.store.checkpoint().is_ok();
        let at = self.store.open_number().or(self.store.newest_number());
        let (true, Some(segment)) = (covered, at) else {
            rewritten.into_iter().for_each(purge::Rewritten::discard);
            return Err(AuditError::Writer(
                "the purge event could not be written; nothing was purged".into(),
            ));
        };
        for r in rewritten {
            let number = r.number;
            if let Err(e) = r.install(crate::index::EventRef { segment, seq }) {
                tracing::error!(segment = number, error = %e, "a purged segment could not replace the original; the purge will be retried");
            }
        }
        self.stats.purges.inc();
        self.stats.purged_bodies.inc_by(summary.bodies);
        Ok(PurgeSummary {
            event_seq: Some(seq),
            ..summary
        })
    }

    /// Remembers how far content retention found nothing left, so that its next pass
    /// does not read those segments again.
    fn note_clean(&mut self) {
        let Ok(segments) = crate::store::list_segments(self.store.dir()) else {
            return;
        };
        for (number, path) in segments {
            if number <= self.content_clean_through {
                continue;
            }
            if !purge::known_clean(&path) {
                break;
            }
            self.content_clean_through = number;
        }
    }

    /// Now, on the writer's clock (which tests can move).
    fn now_ms(&self) -> i64 {
        crate::store::now_ms() + self.gate.as_ref().map_or(0, WriterGate::clock_offset_ms)
    }

    fn add(&mut self, mut ex: Exchange) {
        if let Some(tx) = ex.durable.take() {
            self.batch.waiters.push(tx);
        }
        let ex = &ex;
        if let Some(gate) = &self.gate {
            gate.wait_open();
        }
        self.stats.queue_depth.dec();
        self.stats.queue_bytes.dec_by(queued_bytes(ex));
        if let Some(end) = ex.ended_at {
            self.stats
                .writer_lag_seconds
                .observe(end.elapsed().as_secs_f64());
        }
        let seq = self.batch.head.next_seq;
        let line = catch_unwind(AssertUnwindSafe(|| self.line(ex, seq))).unwrap_or_else(|_| {
            tracing::error!(seq, "record assembly panicked; writing a minimal record");
            self.fallback_line(ex, seq)
                .map(|(l, ms, f)| (l, ms, f, None))
        });
        if let Some((line, ms, facts, drift)) = line {
            self.push_line(line, seq, ms);
            self.batch.facts.merge(&facts);
            // Right after the first record the new model served.
            if let Some(event) = drift {
                self.add_event(event);
            }
        }
    }

    /// Retention: segments past `retention_days` deleted, then bodies past
    /// `content_retention_days` purged.
    fn apply_retention(&mut self) {
        self.last_retention = Instant::now();
        self.apply_segment_retention();
        self.apply_content_retention();
    }

    /// Deletes sealed segments past retention. The event naming them (with their seal
    /// hashes) is written, and covered by a checkpoint, before any file is removed, so a
    /// crash in between leaves extra segments, never an unexplained gap.
    fn apply_segment_retention(&mut self) {
        let Some(days) = self.retention else { return };
        let max_age = i64::from(days) * 86_400_000;
        let retired = match self.store.retention_candidates(self.now_ms(), max_age) {
            Ok(r) if r.is_empty() => return,
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "retention could not read the trail");
                return;
            }
        };
        let removed: Vec<serde_json::Value> = retired
            .iter()
            .map(|r| {
                serde_json::json!({
                    "segment": r.path.file_name().map(|n| n.to_string_lossy().into_owned()),
                    "seal": r.seal_hash,
                    "first_seq": r.seal.first_seq,
                    "last_seq": r.seal.last_seq,
                    "head": r.seal.head,
                    "last_ms": r.seal.last_ms,
                    // Where the remaining trail's tree starts: proofs and verify need it.
                    "tree": r.seal.tree,
                })
            })
            .collect();
        self.add_event(
            serde_json::json!({"type": "retention", "retention_days": days, "removed": removed}),
        );
        self.retry_at = None;
        self.flush();
        if self.batch.count > 0 {
            tracing::error!("retention postponed: its event could not be written");
            return;
        }
        if let Err(e) = self
            .store
            .checkpoint()
            .and_then(|_| self.store.delete(&retired))
        {
            tracing::error!(error = %e, "retention could not delete expired segments");
            return;
        }
        tracing::info!(
            segments = retired.len(),
            retention_days = days,
            "retention deleted expired segments"
        );
    }

    /// Chains an event into the trail, like a record.
    fn add_event(&mut self, event: serde_json::Value) {
        let seq = self.batch.head.next_seq;
        let e = EventRecord {
            schema: record::EVENT_SCHEMA.to_owned(),
            id: uuid::Uuid::now_v7().to_string(),
            seq,
            time: EventTime {
                start: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            },
            event,
            chain: Chain {
                conversation_parent: None,
                bodies: None,
                prev: hex::encode(self.batch.head.prev_hash),
                hash: "0".repeat(64),
            },
        };
        match serde_json::to_vec(&e) {
            Ok(line) => self.push_line(line, seq, crate::store::now_ms()),
            Err(err) => tracing::error!(error = %err, "event did not serialize"),
        }
    }

    fn push_line(&mut self, mut line: Vec<u8>, seq: u64, ms: i64) {
        let Some(hash) = segment::seal_line(&mut line) else {
            tracing::error!(seq, "record did not end with its chain member; skipped");
            return;
        };
        let b = &mut self.batch;
        if b.count == 0 {
            b.first_seq = seq;
        }
        b.buf.extend_from_slice(&line);
        b.buf.push(b'\n');
        b.count += 1;
        b.first_ms = b.first_ms.min(ms);
        b.last_ms = b.last_ms.max(ms);
        b.head = ChainHead {
            next_seq: seq + 1,
            prev_hash: hash,
        };
    }

    #[allow(clippy::type_complexity)]
    fn line(
        &mut self,
        ex: &Exchange,
        seq: u64,
    ) -> Option<(Vec<u8>, i64, Facts, Option<serde_json::Value>)> {
        let (mut record, learned) = self.assembler.assemble(ex, seq);
        // Conversations link within one caller: the same prompt from another key or
        // user is another conversation.
        let scope = crate::lineage::caller_scope(
            record.client.key_id.as_deref(),
            record.client.user.as_deref(),
        );
        record.chain.conversation_parent = self
            .conversations
            .parent(
                &scope,
                &learned.lineage,
                learned.previous_response_id.as_deref(),
            )
            .map(str::to_owned);
        self.conversations.insert(
            &scope,
            &learned.lineage,
            learned.response_id.as_deref(),
            &record.id,
        );
        self.count(&record);
        let drift = self
            .drift_on
            .then(|| self.observe_served(&record))
            .flatten();
        if let Some(p) = &record.policy {
            self.stats
                .count_policy("record", &p.decisions, learned.policy_seconds);
            self.policy_nanos += (learned.policy_seconds * 1e9) as u64;
        }
        let mut facts = Facts::default();
        facts.add_record(&record);
        record.chain.prev = hex::encode(self.batch.head.prev_hash);
        record.chain.hash = "0".repeat(64);
        let ms = ex
            .started_at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        if let Some(otel) = &self.otel {
            otel.export(&record, ex.started_at);
        }
        match serde_json::to_vec(&record) {
            Ok(mut v) => {
                declare_bodies(&mut v, &record);
                Some((v, ms, facts, drift))
            }
            Err(e) => {
                tracing::error!(seq, error = %e, "record did not serialize");
                None
            }
        }
    }

    /// Notes the model that answered (a success naming both models); the `drift` event
    /// when it is not the one that answered before.
    fn observe_served(&mut self, record: &record::Record) -> Option<serde_json::Value> {
        let g = record.gen_ai.as_ref()?;
        let response = g.response.as_ref()?;
        if !record.http.status.is_some_and(|s| (200..300).contains(&s)) {
            return None;
        }
        let route = record.route.as_deref().unwrap_or("");
        let o = crate::drift::Observation {
            route,
            requested: g.request.model.as_deref()?,
            served: response.model.as_deref()?,
            fingerprint: response.system_fingerprint.as_deref(),
            id: &record.id,
            seq: record.seq,
            time: &record.time.start,
        };
        let labels = |served: &str| crate::metrics::ServedLabels {
            route: route.to_owned(),
            requested_model: self.stats.model_label(o.requested),
            served_model: self.stats.model_label(served),
        };
        match self.drift.observe(&o) {
            crate::drift::Observed::Same => None,
            crate::drift::Observed::First => {
                self.stats
                    .served_model
                    .get_or_create(&labels(o.served))
                    .set(1);
                None
            }
            crate::drift::Observed::Changed(c) => {
                if c.from != c.to {
                    self.stats.served_model.remove(&labels(&c.from));
                    self.stats.served_model.get_or_create(&labels(&c.to)).set(1);
                }
                let changed = crate::metrics::ServedChangeLabels {
                    route: route.to_owned(),
                    requested_model: self.stats.model_label(o.requested),
                    kind: c.kind,
                };
                self.stats
                    .served_model_changes
                    .get_or_create(&changed)
                    .inc();
                tracing::warn!(
                    route,
                    kind = c.kind,
                    requested_model = %self.stats.model_label(o.requested),
                    from = %self.stats.model_label(&c.from),
                    to = %self.stats.model_label(&c.to),
                    "the model serving a route changed"
                );
                Some(c.event)
            }
        }
    }

    /// Redactions by entity and tokens by route and model, for the metrics.
    fn count(&self, record: &record::Record) {
        for (entity, n) in &record.redactions {
            let labels = crate::metrics::EntityLabels {
                entity: entity.clone(),
            };
            self.stats.redactions.get_or_create(&labels).inc_by(*n);
        }
        let Some(g) = &record.gen_ai else { return };
        let route = record.route.clone().unwrap_or_default();
        if self.drift_on {
            self.count_drift(record, g, &route);
        }
        let Some(usage) = &g.usage else { return };
        let model = g
            .response
            .as_ref()
            .and_then(|r| r.model.as_deref())
            .or(g.request.model.as_deref())
            .unwrap_or("unknown");
        let model = self.stats.model_label(model);
        for (token_type, n) in [
            ("input", usage.input_tokens),
            ("output", usage.output_tokens),
        ] {
            if let Some(n) = n {
                let labels = crate::metrics::TokenLabels {
                    route: route.clone(),
                    model: model.clone(),
                    token_type,
                };
                self.stats.tokens.get_or_create(&labels).inc_by(n);
            }
        }
    }

    /// The drift dimensions, live: per route and requested model, as `log drift` groups.
    fn count_drift(&self, record: &record::Record, g: &record::GenAi, route: &str) {
        use crate::metrics::{FinishLabels, ModelLabels, ModelResultLabels};
        let requested = g
            .request
            .model
            .as_deref()
            .or_else(|| g.response.as_ref()?.model.as_deref())
            .unwrap_or("unknown");
        let labels = ModelLabels {
            route: route.to_owned(),
            model: self.stats.model_label(requested),
        };
        let status = record.http.status.unwrap_or(0);
        let result = match (record.outcome.as_str(), status) {
            ("blocked", _) => "blocked",
            (_, 429) => "rate_limited",
            ("upstream_error" | "upstream_timeout", _) | (_, 500..) => "error",
            (_, 400..=499) => "client_error",
            _ => "ok",
        };
        let with = |result| ModelResultLabels {
            route: labels.route.clone(),
            model: labels.model.clone(),
            result,
        };
        self.stats.exchanges.get_or_create(&with(result)).inc();
        if result != "ok" {
            return;
        }
        let t = &record.time;
        let s = &self.stats;
        s.operation_seconds
            .get_or_create(&labels)
            .observe(t.duration_ms / 1000.0);
        if let Some(ms) = t.first_chunk_ms {
            s.first_chunk_seconds
                .get_or_create(&labels)
                .observe(ms / 1000.0);
        }
        if let Some(n) = g.usage.as_ref().and_then(|u| u.output_tokens) {
            s.response_tokens.get_or_create(&labels).observe(n as f64);
        }
        for reason in g.response.iter().flat_map(|r| &r.finish_reasons) {
            let finish_reason = crate::review::drift::finish(reason);
            s.finish_reasons
                .get_or_create(&FinishLabels {
                    route: labels.route.clone(),
                    model: labels.model.clone(),
                    finish_reason,
                })
                .inc();
        }
    }

    fn fallback_line(&self, ex: &Exchange, seq: u64) -> Option<(Vec<u8>, i64, Facts)> {
        // A struct, not `json!`: `chain` must stay the last member.
        #[derive(serde::Serialize)]
        struct Minimal<'a> {
            schema: &'static str,
            id: String,
            seq: u64,
            route: Option<&'a str>,
            outcome: &'static str,
            error: &'static str,
            chain: Chain,
        }
        let m = Minimal {
            schema: crate::record::SCHEMA,
            id: crate::assemble::record_id(ex.started_at),
            seq,
            route: ex.route.as_deref(),
            outcome: ex.outcome.as_str(),
            error: "record assembly failed; bodies not recorded",
            chain: Chain {
                conversation_parent: None,
                bodies: None,
                prev: hex::encode(self.batch.head.prev_hash),
                hash: "0".repeat(64),
            },
        };
        serde_json::to_vec(&m)
            .ok()
            .map(|l| (l, 0, Facts::default()))
    }

    fn flush(&mut self) {
        if self.batch.count == 0 || self.retry_at.is_some_and(|t| Instant::now() < t) {
            return;
        }
        let b = &self.batch;
        match self.store.append(
            b.first_seq,
            b.count,
            (b.first_ms, b.last_ms),
            &b.buf,
            b.head,
            &b.facts,
        ) {
            Ok(appended) => {
                self.stats.written.inc_by(u64::from(b.count));
                self.stats.bytes_written.inc_by(appended);
                self.stats.failing.set(0);
                let head = self.batch.head;
                let done = std::mem::replace(&mut self.batch, Batch::new(head));
                self.retry_at = None;
                // Group commit: one fsync for every record of the block, then the
                // responses waiting for them are released. If the fsync fails they are
                // dropped, and their clients see the stream fail rather than complete.
                if !done.waiters.is_empty() && self.sync() {
                    for w in done.waiters {
                        let _ = w.send(());
                    }
                }
            }
            Err(e) => {
                self.stats.write_errors.inc();
                self.stats.failing.set(1);
                tracing::error!(error = %e, pending_records = b.count, "audit block write failed; will retry");
                self.retry_at = Some(Instant::now() + Duration::from_millis(500));
            }
        }
    }

    /// fsyncs the live segment; whether it worked.
    fn sync(&mut self) -> bool {
        let started = Instant::now();
        let result = self.store.sync();
        self.last_sync = Instant::now();
        self.stats
            .fsync_seconds
            .observe(self.last_sync.duration_since(started).as_secs_f64());
        match result {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, "audit fsync failed");
                false
            }
        }
    }
}

/// This thread's CPU time so far, in nanoseconds: the first field of
/// `/proc/thread-self/schedstat`; `None` off Linux.
fn thread_cpu_nanos() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    stat.split_whitespace().next()?.parse().ok()
}
