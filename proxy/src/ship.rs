//! Shipping sealed segments to object storage (`[ship]`), through the `object_store`
//! crate: S3, GCS, Azure, or a local path.
//!
//! Each sealed segment goes to `<prefix>/<source>/<name>` with its index; the checkpoint
//! log follows each time. Names are the segment's own, so a retry or a restart in the
//! middle of an upload writes the same object again, never a second one. A segment is
//! marked shipped (`<name>.shipped`, holding its SHA-256) only once the store has
//! confirmed the upload (S3 checks a SHA-256 checksum header; every store is then asked
//! for the object's size), and only then may its local copy go. The newest segment always
//! stays: the writer continues its chain from it. Failures are retried with backoff; the
//! task runs beside the proxy and never holds a request.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use custody_config::Ship;
use object_store::{path::Path as ObjectPath, ObjectStore, PutPayload};
use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge},
    registry::Registry,
};
use sha2::{Digest, Sha256};

use crate::ProxyError;

/// What the shipper counts.
#[derive(Debug, Default, Clone)]
pub struct ShipMetrics {
    pub shipped: Counter,
    pub bytes: Counter,
    pub failures: Counter,
    /// Sealed segments not shipped yet.
    pub pending: Gauge,
    /// Age of the oldest sealed segment not shipped yet, in seconds.
    pub lag_seconds: Gauge,
    /// 1 while an upload is in progress.
    pub uploading: Gauge,
}

impl ShipMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "custody_ship_segments",
            "Segments uploaded to object storage",
            self.shipped.clone(),
        );
        r.register(
            "custody_ship_bytes",
            "Bytes uploaded to object storage",
            self.bytes.clone(),
        );
        r.register(
            "custody_ship_failures",
            "Failed upload attempts (each retried)",
            self.failures.clone(),
        );
        r.register(
            "custody_ship_pending_segments",
            "Sealed segments not shipped yet",
            self.pending.clone(),
        );
        r.register(
            "custody_ship_lag_seconds",
            "Age of the oldest sealed segment not shipped yet",
            self.lag_seconds.clone(),
        );
        r.register(
            "custody_ship_uploading",
            "1 while an upload is in progress",
            self.uploading.clone(),
        );
    }
}

/// A configured shipper.
pub struct Shipper {
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    dir: PathBuf,
    delete_local: bool,
    every: Duration,
    pub metrics: ShipMetrics,
    /// Length and time of the checkpoint log as last uploaded.
    checkpoints: std::sync::Mutex<Option<(u64, SystemTime)>>,
}

fn ship_err(what: impl std::fmt::Display) -> ProxyError {
    ProxyError::Ship(what.to_string())
}

/// The store and the path inside it for a URL, credentials from the environment.
pub fn open_store(
    url: &str,
    options: &std::collections::BTreeMap<String, String>,
) -> Result<(Arc<dyn ObjectStore>, ObjectPath), ProxyError> {
    let shown = custody_config::secret::mask_url(url);
    let parsed =
        url::Url::parse(url).map_err(|e| ship_err(format!("[ship] url `{shown}`: {e}")))?;
    let (scheme, path) = object_store::ObjectStoreScheme::parse(&parsed)
        .map_err(|e| ship_err(format!("[ship] url `{shown}`: {e}")))?;
    // The three cloud builders differ in type but not in shape: the environment first,
    // then the URL, then the options (unknown keys are left to the other clouds).
    macro_rules! configured {
        ($builder:expr) => {{
            let b = options
                .iter()
                .fold($builder.with_url(url), |b, (k, v)| match k.parse() {
                    Ok(key) => b.with_config(key, v),
                    Err(_) => b,
                });
            Arc::new(b.build().map_err(ship_err)?)
        }};
    }
    let store: Arc<dyn ObjectStore> = match scheme {
        object_store::ObjectStoreScheme::AmazonS3 => {
            configured!(object_store::aws::AmazonS3Builder::from_env()
                .with_checksum_algorithm(object_store::aws::Checksum::SHA256))
        }
        object_store::ObjectStoreScheme::GoogleCloudStorage => {
            configured!(object_store::gcp::GoogleCloudStorageBuilder::from_env())
        }
        object_store::ObjectStoreScheme::MicrosoftAzure => {
            configured!(object_store::azure::MicrosoftAzureBuilder::from_env())
        }
        object_store::ObjectStoreScheme::Local => {
            Arc::new(object_store::local::LocalFileSystem::new())
        }
        other => {
            return Err(ship_err(format!(
                "[ship] url `{shown}`: {other:?} is not supported"
            )))
        }
    };
    Ok((store, path))
}

/// This trail's name under the prefix.
pub fn source_name(ship: &Ship) -> String {
    ship.source
        .clone()
        .or_else(|| std::env::var("POD_NAME").ok())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "custody".into())
}

impl Shipper {
    pub fn new(ship: &Ship, dir: &Path) -> Result<Option<Self>, ProxyError> {
        let Some(url) = &ship.url else {
            return Ok(None);
        };
        let (store, base) = open_store(url, &ship.options)?;
        let prefix = base.child(source_name(ship));
        Ok(Some(Self {
            store,
            prefix,
            dir: dir.to_owned(),
            delete_local: ship.delete_local,
            every: Duration::from_secs(ship.interval_secs.unwrap_or(5).max(1)),
            metrics: ShipMetrics::default(),
            checkpoints: std::sync::Mutex::new(None),
        }))
    }

    /// Ships forever; failures back off from one second to a minute.
    pub async fn run(self: Arc<Self>) {
        let mut backoff = Duration::from_secs(1);
        loop {
            match self.pass().await {
                Ok(()) => {
                    backoff = Duration::from_secs(1);
                    tokio::time::sleep(self.every).await;
                }
                Err(e) => {
                    self.metrics.failures.inc();
                    tracing::warn!(error = %e, retry_in_secs = backoff.as_secs(), "shipping failed; segments wait");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                }
            }
        }
    }

    /// One scan: every sealed, unshipped segment, oldest first.
    pub async fn pass(&self) -> Result<(), ProxyError> {
        let pending = self.pending().await?;
        self.metrics.pending.set(pending.len() as i64);
        let lag = pending
            .first()
            .and_then(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .map_or(0, |d| d.as_secs() as i64);
        self.metrics.lag_seconds.set(lag);
        for seg in pending {
            self.ship(&seg).await?;
            self.metrics.pending.dec();
        }
        self.metrics.lag_seconds.set(0);
        if self.delete_local {
            self.delete_shipped().await?;
        }
        self.ship_checkpoints().await
    }

    /// Deletes the local copies of shipped segments, except the newest (the writer
    /// continues its chain from it). A segment shipped while it was the newest goes once
    /// a newer one exists.
    async fn delete_shipped(&self) -> Result<(), ProxyError> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || {
            let segs = custody_audit::review::reader::segments(&dir).map_err(ship_err)?;
            let n = segs.len();
            for s in segs.iter().take(n.saturating_sub(1)) {
                let shipped = marker(&s.path);
                if shipped.exists() {
                    for p in [s.path.clone(), s.path.with_extension("idx"), shipped] {
                        let _ = std::fs::remove_file(&p);
                    }
                }
            }
            Ok(())
        })
        .await
        .map_err(ship_err)?
    }

    /// The checkpoint log, whenever it changed. Between segments its newest line covers
    /// the live segment, which is not shipped yet: a live trail. After a clean stop it
    /// covers exactly what was shipped.
    async fn ship_checkpoints(&self) -> Result<(), ProxyError> {
        let path = self.dir.join("checkpoints.log");
        let Ok(meta) = tokio::fs::metadata(&path).await else {
            return Ok(());
        };
        let stamp = (
            meta.len(),
            meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        );
        if self
            .checkpoints
            .lock()
            .map(|c| *c == Some(stamp))
            .unwrap_or(false)
        {
            return Ok(());
        }
        let bytes = tokio::fs::read(&path)
            .await
            .map_err(|e| ship_err(format!("{}: {e}", path.display())))?;
        self.store
            .put(
                &self.prefix.child("checkpoints.log"),
                PutPayload::from(bytes),
            )
            .await
            .map_err(|e| ship_err(format!("uploading checkpoints.log: {e}")))?;
        if let Ok(mut c) = self.checkpoints.lock() {
            *c = Some(stamp);
        }
        Ok(())
    }

    /// Sealed segments without a `.shipped` marker, oldest first.
    async fn pending(&self) -> Result<Vec<PathBuf>, ProxyError> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || {
            let mut segs = custody_audit::review::reader::segments(&dir).map_err(ship_err)?;
            segs.sort_by(|a, b| a.path.cmp(&b.path));
            let n = segs.len();
            Ok(segs
                .into_iter()
                .enumerate()
                // The newest segment is sealed once its index exists (written at seal).
                .filter(|(i, s)| *i + 1 < n || s.path.with_extension("idx").exists())
                .filter(|(_, s)| !marker(&s.path).exists())
                .map(|(_, s)| s.path)
                .collect())
        })
        .await
        .map_err(ship_err)?
    }

    /// Uploads one segment, its index and the checkpoint log, confirms, marks it.
    async fn ship(&self, seg: &Path) -> Result<(), ProxyError> {
        let name = seg
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.metrics.uploading.set(1);
        let result = async {
            let bytes = tokio::fs::read(seg)
                .await
                .map_err(|e| ship_err(format!("{}: {e}", seg.display())))?;
            let size = bytes.len();
            let digest = hex::encode(Sha256::digest(&bytes));
            let target = self.prefix.child(name.as_str());
            self.store
                .put(&target, PutPayload::from(bytes))
                .await
                .map_err(|e| ship_err(format!("uploading {name}: {e}")))?;
            let meta = self
                .store
                .head(&target)
                .await
                .map_err(|e| ship_err(format!("confirming {name}: {e}")))?;
            if meta.size as usize != size {
                return Err(ship_err(format!(
                    "{name}: the store holds {} bytes, not {size}",
                    meta.size
                )));
            }
            for side in [seg.with_extension("idx")] {
                if let Ok(b) = tokio::fs::read(&side).await {
                    let file = side
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    self.store
                        .put(&self.prefix.child(file.as_str()), PutPayload::from(b))
                        .await
                        .map_err(|e| ship_err(format!("uploading {file}: {e}")))?;
                }
            }
            custody_audit::index::write_private(
                &marker(seg),
                format!("{digest} {size}\n").as_bytes(),
            )
            .map_err(|e| ship_err(format!("marking {name} shipped: {e}")))?;
            self.metrics.shipped.inc();
            self.metrics.bytes.inc_by(size as u64);
            tracing::info!(segment = %name, bytes = size, "segment shipped");
            Ok(())
        }
        .await;
        self.metrics.uploading.set(0);
        result
    }
}

fn marker(seg: &Path) -> PathBuf {
    let mut p = seg.as_os_str().to_owned();
    p.push(".shipped");
    PathBuf::from(p)
}
