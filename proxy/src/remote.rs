//! Reading shipped trails where they lie: an object-store prefix as a
//! [`TrailSource`], one source (pod) per sub-prefix.

use std::{
    collections::HashMap,
    ops::Range,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use custody_audit::{
    index::SegmentIndex,
    review::reader::{SegmentRef, TrailSource},
    AuditError,
};
use futures_util::TryStreamExt;
use object_store::{path::Path as ObjectPath, ObjectStore};

use crate::ProxyError;

/// One shipped trail: `<prefix>/<source>/`.
pub struct ObjectSource {
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    label: String,
    runtime: tokio::runtime::Handle,
    /// Indexes already fetched (a search, or `show`'s ordering, asks more than once).
    indexes: Mutex<HashMap<u64, Option<SegmentIndex>>>,
}

fn remote_err(what: impl std::fmt::Display) -> AuditError {
    AuditError::Io {
        path: PathBuf::from("<object store>"),
        source: std::io::Error::other(what.to_string()),
    }
}

impl ObjectSource {
    pub fn new(
        store: Arc<dyn ObjectStore>,
        prefix: ObjectPath,
        label: String,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        Self {
            store,
            prefix,
            label,
            runtime,
            indexes: Mutex::default(),
        }
    }

    fn get(&self, name: &str) -> object_store::Result<bytes::Bytes> {
        let location = self.prefix.child(name);
        self.runtime
            .block_on(async { self.store.get(&location).await?.bytes().await })
    }
}

impl TrailSource for ObjectSource {
    fn describe(&self) -> String {
        self.label.clone()
    }

    fn segments(&self) -> Result<Vec<SegmentRef>, AuditError> {
        let listed: Vec<_> = self
            .runtime
            .block_on(self.store.list(Some(&self.prefix)).try_collect::<Vec<_>>())
            .map_err(remote_err)?;
        let mut out: Vec<SegmentRef> = listed
            .iter()
            .filter_map(|m| {
                let name = m.location.filename()?;
                let number = custody_audit::segment::parse_segment_file_name(name)?;
                Some(SegmentRef {
                    number,
                    path: PathBuf::from(format!("{}/{name}", self.label)),
                    len: Some(m.size),
                })
            })
            .collect();
        out.sort_by_key(|s| s.number);
        // A local trail that does not exist is an error; so is a prefix holding none
        // (a mistyped source must not verify as an empty trail).
        if out.is_empty() {
            return Err(remote_err(format!("no segments under {}", self.label)));
        }
        Ok(out)
    }

    fn read(&self, seg: &SegmentRef) -> Result<Vec<u8>, AuditError> {
        self.get(&seg.name())
            .map(|b| b.to_vec())
            .map_err(|e| remote_err(format!("{}: {e}", seg.path.display())))
    }

    fn open(&self, seg: &SegmentRef) -> Result<Box<dyn std::io::Read + '_>, AuditError> {
        let location = self.prefix.child(seg.name().as_str());
        let got = self
            .runtime
            .block_on(self.store.get(&location))
            .map_err(|e| remote_err(format!("{}: {e}", seg.path.display())))?;
        Ok(Box::new(StreamRead {
            stream: got.into_stream(),
            runtime: &self.runtime,
            buf: bytes::Bytes::new(),
        }))
    }

    fn checkpoints(&self) -> Result<Option<Vec<u8>>, AuditError> {
        match self.get(custody_audit::store::CHECKPOINTS) {
            Ok(b) => Ok(Some(b.to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(remote_err(e)),
        }
    }

    fn index(&self, seg: &SegmentRef) -> Option<SegmentIndex> {
        let mut cache = self.indexes.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .entry(seg.number)
            .or_insert_with(|| {
                let name = custody_audit::index::index_path(std::path::Path::new(&seg.name()));
                // A missing or stale index only means a full read of the segment.
                let bytes = self.get(&name.to_string_lossy()).ok()?;
                let idx: SegmentIndex = serde_json::from_slice(&bytes).ok()?;
                (Some(idx.segment_bytes) == seg.len).then_some(idx)
            })
            .clone()
    }

    fn read_range(&self, seg: &SegmentRef, range: Range<u64>) -> Result<Vec<u8>, AuditError> {
        let location = self.prefix.child(seg.name().as_str());
        self.runtime
            .block_on(self.store.get_range(&location, range))
            .map(|b| b.to_vec())
            .map_err(|e| remote_err(format!("{}: {e}", seg.path.display())))
    }
}

/// An object's body as a blocking reader, one chunk of the stream in memory at a time.
struct StreamRead<'a> {
    stream: futures_util::stream::BoxStream<'static, object_store::Result<bytes::Bytes>>,
    runtime: &'a tokio::runtime::Handle,
    buf: bytes::Bytes,
}

impl std::io::Read for StreamRead<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.buf.is_empty() {
            match self.runtime.block_on(self.stream.try_next()) {
                Ok(Some(b)) => self.buf = b,
                Ok(None) => return Ok(0),
                Err(e) => return Err(std::io::Error::other(e)),
            }
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf.split_to(n));
        Ok(n)
    }
}

/// The sources (pods) under a shipping URL, each as a trail.
pub fn sources(
    url: &str,
    options: &std::collections::BTreeMap<String, String>,
    only: Option<&str>,
    runtime: &tokio::runtime::Handle,
) -> Result<Vec<ObjectSource>, ProxyError> {
    let (store, base) = crate::ship::open_store(url, options)?;
    let names: Vec<String> = match only {
        Some(s) => vec![s.to_owned()],
        None => {
            let listed = runtime
                .block_on(store.list_with_delimiter(Some(&base)))
                .map_err(|e| ProxyError::Ship(format!("listing {url}: {e}")))?;
            listed
                .common_prefixes
                .iter()
                .filter_map(|p| p.filename().map(str::to_owned))
                .collect()
        }
    };
    Ok(names
        .into_iter()
        .map(|n| {
            let label = format!("{}/{n}", url.trim_end_matches('/'));
            ObjectSource::new(
                store.clone(),
                base.child(n.as_str()),
                label,
                runtime.clone(),
            )
        })
        .collect())
}
