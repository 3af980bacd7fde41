//! Reading shipped trails where they lie: an object-store prefix as a
//! [`TrailSource`], one source (pod) per sub-prefix.

use std::{path::PathBuf, sync::Arc};

use custody_audit::{
    reader::{SegmentRef, TrailSource},
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
        }
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
        let location = self.prefix.child(seg.name().as_str());
        self.runtime
            .block_on(async { self.store.get(&location).await?.bytes().await })
            .map(|b| b.to_vec())
            .map_err(|e| remote_err(format!("{}: {e}", seg.path.display())))
    }

    fn checkpoints(&self) -> Result<Option<Vec<u8>>, AuditError> {
        let location = self.prefix.child(custody_audit::store::CHECKPOINTS);
        match self
            .runtime
            .block_on(async { self.store.get(&location).await?.bytes().await })
        {
            Ok(b) => Ok(Some(b.to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(remote_err(e)),
        }
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
