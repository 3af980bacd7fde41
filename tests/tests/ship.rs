//! Shipping sealed segments to object storage, against a real S3-protocol server on
//! loopback: moto (`moto_server`, installed by `tests/run.sh` into `.venv-moto`; the
//! tests start their own instances on free ports).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{collections::BTreeMap, process::Child, sync::Arc, time::Duration};

use custody_tests::*;
use futures_util::TryStreamExt;
use object_store::{path::Path as ObjectPath, ObjectStore};

fn moto_bin() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("CUSTODY_MOTO_SERVER") {
        return p.into();
    }
    let local =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv-moto/bin/moto_server");
    assert!(
        local.exists(),
        "moto_server not found: run tests/run.sh (it installs moto[server] into .venv-moto) or set CUSTODY_MOTO_SERVER"
    );
    local
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A moto server on `port`, with bucket `trails`; killed when dropped.
struct Moto(Child);

impl Moto {
    async fn start(port: u16) -> Self {
        let child = std::process::Command::new(moto_bin())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let url = format!("http://127.0.0.1:{port}/trails");
        loop {
            let req = http::Request::put(&url)
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap();
            if let Ok(resp) = client().request(req).await {
                assert!(
                    resp.status().is_success(),
                    "creating the bucket: {}",
                    resp.status()
                );
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "moto did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Self(child)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn s3_options(port: u16) -> BTreeMap<String, String> {
    [
        ("endpoint", format!("http://127.0.0.1:{port}")),
        ("allow_http", "true".into()),
        ("region", "us-east-1".into()),
        ("access_key_id", "custody-test".into()),
        ("secret_access_key", "custody-test-secret".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

fn bucket(port: u16) -> Arc<dyn ObjectStore> {
    custody_proxy::ship::open_store("s3://trails/fleet", &s3_options(port))
        .unwrap()
        .0
}

/// The objects under `fleet/test-pod/`, by name, with their bytes.
async fn objects(port: u16) -> BTreeMap<String, Vec<u8>> {
    let store = bucket(port);
    let prefix = ObjectPath::from("fleet/test-pod");
    let metas: Vec<_> = store.list(Some(&prefix)).try_collect().await.unwrap();
    let mut out = BTreeMap::new();
    for m in metas {
        let bytes = store.get(&m.location).await.unwrap().bytes().await.unwrap();
        out.insert(m.location.filename().unwrap().to_owned(), bytes.to_vec());
    }
    out
}

/// Custody shipping to port `port`; every block seals its segment.
async fn shipping(
    dir: tempfile::TempDir,
    port: u16,
    tweak: impl FnOnce(&mut custody_config::Config),
) -> Custody {
    let up = chat_upstream().await;
    let route = openai_route(&up);
    std::mem::forget(up);
    Custody::start_in(dir, vec![route], |c| {
        c.audit.segment_max_bytes = 1;
        c.listen.shutdown_grace_secs = 2;
        c.ship.url = Some("s3://trails/fleet".into());
        c.ship.source = Some("test-pod".into());
        c.ship.interval_secs = Some(1);
        c.ship.options = s3_options(port);
        tweak(c);
    })
    .await
}

/// `n` requests, each written (hence sealed in a segment of its own) before the next.
async fn requests(custody: &Custody, n: usize) {
    for i in 0..n {
        let before = custody.metric("custody_audit_records_written_total").await;
        send(
            &client(),
            post(
                &custody.url("/v1/chat/completions"),
                &[],
                format!("{{\"n\":{i}}}"),
            ),
        )
        .await;
        custody
            .until_metric("custody_audit_records_written_total", |v| v > before)
            .await;
    }
}

fn local_segments(dir: &std::path::Path) -> BTreeMap<String, Vec<u8>> {
    custody_audit::review::reader::segments(dir)
        .unwrap()
        .into_iter()
        .map(|s| (s.name(), std::fs::read(&s.path).unwrap()))
        .collect()
}

#[tokio::test]
async fn sealed_segments_are_shipped_whole_with_index_and_checkpoints() {
    let port = free_port();
    let _moto = Moto::start(port).await;
    let custody = shipping(tempfile::tempdir().unwrap(), port, |_| {}).await;
    requests(&custody, 3).await;
    custody
        .until_metric("custody_ship_segments_total", |v| v >= 1.0)
        .await;
    let done = custody.stop().await;
    let shipped = objects(port).await;
    let local = local_segments(&done.audit_dir());
    assert!(local.len() >= 2, "{:?}", local.keys());
    for (name, bytes) in &local {
        assert_eq!(shipped.get(name), Some(bytes), "{name} shipped whole");
        assert!(shipped.contains_key(&name.replace(".seg", ".idx")));
        assert!(done.audit_dir().join(format!("{name}.shipped")).exists());
    }
    assert!(shipped.contains_key("checkpoints.log"));
    // What was shipped verifies as the local trail does.
    let copy = tempfile::tempdir().unwrap();
    for (name, bytes) in &shipped {
        std::fs::write(copy.path().join(name), bytes).unwrap();
    }
    custody_audit::review::verify::verify_dir(copy.path(), None, |_, _, _| {}).unwrap();
}

#[tokio::test]
async fn segments_wait_while_the_store_is_down_then_go() {
    let port = free_port();
    let custody = shipping(tempfile::tempdir().unwrap(), port, |_| {}).await;
    requests(&custody, 2).await;
    custody
        .until_metric("custody_ship_failures_total", |v| v >= 1.0)
        .await;
    custody
        .until_metric("custody_ship_pending_segments", |v| v >= 1.0)
        .await;
    // The requests themselves were never held up by it.
    let moto = Moto::start(port).await;
    custody
        .until_metric("custody_ship_pending_segments", |v| v == 0.0)
        .await;
    let done = custody.stop().await;
    let shipped = objects(port).await;
    for name in local_segments(&done.audit_dir()).keys() {
        assert!(
            shipped.contains_key(name),
            "{name} shipped after the store came back"
        );
    }
    drop(moto);
}

#[tokio::test]
async fn a_restart_mid_upload_neither_loses_nor_duplicates() {
    // A store that accepts connections and never answers: uploads hang.
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hole_port = hole.local_addr().unwrap().port();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((s, _)) = hole.accept().await {
            open.push(s);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let custody = shipping(dir, hole_port, |_| {}).await;
    requests(&custody, 2).await;
    custody
        .until_metric("custody_ship_uploading", |v| v == 1.0)
        .await;
    let stopped = custody.stop().await;
    held.abort();
    let unshipped: Vec<String> = local_segments(&stopped.audit_dir())
        .keys()
        .filter(|n| !stopped.audit_dir().join(format!("{n}.shipped")).exists())
        .cloned()
        .collect();
    assert!(
        !unshipped.is_empty(),
        "nothing was confirmed while the store hung"
    );

    // Restarted against a working store: every segment goes, each once, whole.
    let port = free_port();
    let _moto = Moto::start(port).await;
    let custody = shipping(stopped.dir, port, |_| {}).await;
    requests(&custody, 1).await;
    let done = custody.stop().await;
    let shipped = objects(port).await;
    let local = local_segments(&done.audit_dir());
    for (name, bytes) in &local {
        assert_eq!(shipped.get(name), Some(bytes), "{name}");
    }
    let seg_objects = shipped.keys().filter(|k| k.ends_with(".seg")).count();
    assert_eq!(
        seg_objects,
        local.len(),
        "no duplicates: {:?}",
        shipped.keys()
    );
}

#[tokio::test]
async fn delete_local_keeps_the_newest_segment() {
    let port = free_port();
    let _moto = Moto::start(port).await;
    let custody = shipping(tempfile::tempdir().unwrap(), port, |c| {
        c.ship.delete_local = true
    })
    .await;
    requests(&custody, 3).await;
    let done = custody.stop().await;
    let local = local_segments(&done.audit_dir());
    assert_eq!(local.len(), 1, "only the newest stays: {:?}", local.keys());
    let shipped = objects(port).await;
    assert!(
        shipped.keys().filter(|k| k.ends_with(".seg")).count() >= 2,
        "{:?} {:?}",
        shipped.keys(),
        local.keys()
    );
    // A restart continues the chain from the segment that stayed.
    let custody = shipping(done.dir, port, |c| c.ship.delete_local = true).await;
    requests(&custody, 1).await;
    custody.stop().await;
    let copy = tempfile::tempdir().unwrap();
    for (name, bytes) in objects(port).await {
        std::fs::write(copy.path().join(name), bytes).unwrap();
    }
    custody_audit::review::verify::verify_dir(copy.path(), None, |_, _, _| {}).unwrap();
}

#[tokio::test]
async fn verify_reads_shipped_trails_where_they_lie_and_catches_a_deleted_segment() {
    use custody_audit::{review::reader::TrailSource, review::verify};
    let port = free_port();
    let _moto = Moto::start(port).await;
    let custody = shipping(tempfile::tempdir().unwrap(), port, |_| {}).await;
    requests(&custody, 3).await;
    custody.stop().await;
    // A second pod's trail beside it.
    let custody = shipping(tempfile::tempdir().unwrap(), port, |c| {
        c.ship.source = Some("other-pod".into());
    })
    .await;
    requests(&custody, 1).await;
    custody.stop().await;

    let runtime = tokio::runtime::Handle::current();
    let check = move |only: Option<&'static str>| {
        let runtime = runtime.clone();
        tokio::task::spawn_blocking(move || {
            let sources = custody_proxy::remote::sources(
                "s3://trails/fleet",
                &s3_options(port),
                only,
                &runtime,
            )
            .unwrap();
            sources
                .iter()
                .map(|s| {
                    let r = verify::verify_source(s, None, verify::Depth::Full, |_, _, _| {});
                    (
                        s.describe(),
                        r.map(|r| r.records).map_err(|e| e.to_string()),
                    )
                })
                .collect::<Vec<_>>()
        })
    };
    let all = check(None).await.unwrap();
    assert_eq!(all.len(), 2, "{all:?}");
    assert!(all.iter().all(|(_, r)| r.is_ok()), "{all:?}");
    let ours = check(Some("test-pod")).await.unwrap();
    assert_eq!(ours[0].1, Ok(3));
    // A mistyped source is not an empty trail that verifies.
    let none = check(Some("no-such-pod")).await.unwrap();
    assert!(
        none[0].1.as_ref().unwrap_err().contains("no segments"),
        "{none:?}"
    );

    // Someone deletes a middle segment in the bucket: verify names it.
    bucket(port)
        .delete(&ObjectPath::from("fleet/test-pod/00000000000000000002.seg"))
        .await
        .unwrap();
    let after = check(Some("test-pod")).await.unwrap();
    let err = after[0].1.clone().unwrap_err();
    assert!(err.contains("segment 2 is missing"), "{err}");
}

#[tokio::test]
async fn search_show_and_export_read_shipped_trails_where_they_lie() {
    use custody_audit::{
        review::reader,
        review::reader::TrailSource,
        review::search::{search, Query},
    };
    let port = free_port();
    let _moto = Moto::start(port).await;
    let custody = shipping(tempfile::tempdir().unwrap(), port, |_| {}).await;
    requests(&custody, 3).await;
    let local = custody.stop().await;

    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let sources = custody_proxy::remote::sources(
            "s3://trails/fleet",
            &s3_options(port),
            Some("test-pod"),
            &runtime,
        )
        .unwrap();
        let source = &sources[0];

        // Export: the bucket's lines are the local trail's, byte for byte.
        let mut lines = Vec::new();
        reader::for_each_line_of(source, |_, l| {
            lines.push(serde_json::from_slice::<serde_json::Value>(l).unwrap());
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(lines, local.trail);

        // Sealed segments are searched through their shipped indexes: a time window
        // reads only the blocks it needs, with ranged reads.
        let segs = source.segments().unwrap();
        assert!(segs.iter().all(|s| source.index(s).is_some()), "{segs:?}");
        let since =
            humantime::parse_rfc3339(local.records[1]["time"]["start"].as_str().unwrap()).unwrap();
        let q = Query {
            since: Some(since),
            limit: 10,
            ..Query::default()
        };
        let found = search(source, &q).unwrap();
        assert!(
            found.untrusted_indexes.is_empty(),
            "{:?}",
            found.untrusted_indexes
        );
        let values = found.values();
        let ids: Vec<&serde_json::Value> = values.iter().map(|r| &r["id"]).collect();
        assert_eq!(ids, vec![&local.records[2]["id"], &local.records[1]["id"]]);
        let q = Query {
            route: Some("no-such-route".into()),
            limit: 10,
            ..Query::default()
        };
        assert!(search(source, &q).unwrap().records.is_empty());

        // Show: one record by id.
        let id = local.records[0]["id"].as_str().unwrap();
        let line = reader::find_by_id(source, id).unwrap();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&line).unwrap(),
            local.records[0]
        );
        assert!(matches!(
            reader::find_by_id(source, "0190c3a2-0000-7000-8000-000000000000"),
            Err(custody_audit::AuditError::NotFound(_))
        ));
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_serves_shipped_trails_where_they_lie() {
    use sha2::Digest;
    let port = free_port();
    let _moto = Moto::start(port).await;
    let custody = shipping(tempfile::tempdir().unwrap(), port, |_| {}).await;
    requests(&custody, 3).await;
    let local = custody.stop().await;
    let access = tempfile::tempdir().unwrap();
    let console = custody_config::Console {
        listen: "127.0.0.1:0".parse().unwrap(),
        tls: None,
        dir: None,
        from: Some("s3://trails/fleet".into()),
        options: s3_options(port),
        access_dir: access.path().join("access"),
        signing_key: None,
        trusted_key: None,
    };
    let reviewers = vec![custody_config::Reviewer {
        id: "alice".into(),
        token_sha256: Some(hex::encode(sha2::Sha256::digest(b"alice-token"))),
        token_env: None,
        role: custody_config::Role::Content,
        routes: None,
        teams: None,
        audit: false,
    }];
    let mut running = custody_tests::console::Running::start(console, reviewers).await;
    let addr = running.addr;
    let get = |path: String| async move {
        let req = http::Request::get(format!("http://{addr}{path}"))
            .header("authorization", "Bearer alice-token")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let (parts, body) = send(&client(), req).await;
        assert_eq!(
            parts.status,
            200,
            "{path}: {}",
            String::from_utf8_lossy(&body)
        );
        serde_json::from_slice::<serde_json::Value>(&body).unwrap()
    };
    let found = get("/api/records".into()).await;
    let ids: Vec<&serde_json::Value> = found["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| &r["id"])
        .collect();
    let want: Vec<&serde_json::Value> = local.records.iter().rev().map(|r| &r["id"]).collect();
    assert_eq!(ids, want, "newest first, from the bucket");
    let id = local.records[0]["id"].as_str().unwrap();
    assert_eq!(get(format!("/api/records/{id}")).await, local.records[0]);
    let verified = get("/api/verify".into()).await;
    let trails = verified["trails"].as_array().unwrap();
    assert_eq!(trails.len(), 1);
    assert_eq!(trails[0]["ok"], true, "{verified}");
    assert_eq!(trails[0]["source"], "s3://trails/fleet/test-pod");
    running.stop().await;
    // The reads are in the console's own trail, not in the bucket.
    let events = custody_tests::trail(&access.path().join("access"));
    assert_eq!(
        events
            .iter()
            .filter(|e| e["event"]["type"] == "access")
            .count(),
        3
    );
}
