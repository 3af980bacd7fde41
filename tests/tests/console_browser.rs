//! The review console in a real browser: headless Chromium driven over WebDriver
//! (`chromium` and `chromium-driver` from Debian, installed by `tests/run.sh`). Each
//! role logs in with the form, searches, opens a record and a conversation; what each
//! is shown, and what never reaches it (not even in the page source), is checked, and
//! every read is found in the access trail, which verifies. Screenshots of each page go
//! to `target/tmp/console-screenshots/` for a person to look at.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use custody_tests::console::{
    reviewed_trail, Reviewed, ALICE, ANSWER_WORDS, GROWTH_WORDS, MO, PAT, PROMPT_WORDS,
};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

/// `chromedriver`, killed when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn driver_path() -> PathBuf {
    let path = std::env::var_os("CUSTODY_CHROMEDRIVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromedriver"));
    assert!(
        path.exists(),
        "no chromedriver at {}: run tests/run.sh (it installs Debian's chromium and chromium-driver), or set CUSTODY_CHROMEDRIVER",
        path.display()
    );
    path
}

/// Starts chromedriver on a free loopback port and waits until it answers `/status`.
async fn start_driver() -> Driver {
    // The port is picked by the kernel; chromedriver takes it a moment later.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(driver_path())
        .args([format!("--port={port}"), "--allowed-ips=127.0.0.1".into()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let driver = Driver {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return driver;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "chromedriver did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn browser(driver: &Driver) -> Client {
    let mut caps = serde_json::Map::new();
    let binary = std::env::var("CUSTODY_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": binary,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1366,900", "--no-first-run", "--disable-extensions",
                     "--disable-background-networking", "--disable-sync", "--disable-component-update"],
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("a Chromium session")
}

fn shots() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn shot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    std::fs::write(shots().join(format!("{name}.png")), png).unwrap();
}

/// The element, once the page shows it (a click's navigation may still be under way).
async fn element(c: &Client, at: Locator<'_>) -> fantoccini::elements::Element {
    c.wait()
        .at_most(Duration::from_secs(30))
        .for_element(at)
        .await
        .unwrap()
}

async fn click(c: &Client, at: Locator<'_>) {
    element(c, at).await.click().await.unwrap();
}

/// Waits until the page's heading is `want` (the page a click led to has loaded).
async fn heading_is(c: &Client, want: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(h) = c.find(Locator::Css("main h1")).await {
            if h.text().await.is_ok_and(|t| t == want) {
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never reached the page headed {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the address holds `part` (a form's GET has landed).
async fn url_has(c: &Client, part: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !c.current_url().await.unwrap().as_str().contains(part) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never reached {part}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn type_into(c: &Client, css: &str, text: &str) {
    element(c, Locator::Css(css))
        .await
        .send_keys(text)
        .await
        .unwrap();
}

async fn count(c: &Client, css: &str) -> usize {
    c.find_all(Locator::Css(css)).await.unwrap().len()
}

/// The text of the element, once the page shows it: after a click, the next page may
/// still be loading (seen on a loaded CI machine, with two browsers at once).
async fn text_of(c: &Client, css: &str) -> String {
    element(c, Locator::Css(css)).await.text().await.unwrap()
}

/// Logs in with the form; lands on the overview.
async fn log_in(c: &Client, r: &Reviewed, token: &str, who: &str) {
    c.goto(&r.url("/")).await.unwrap();
    // Not logged in: the login form, and nothing of the trail.
    let src = c.source().await.unwrap();
    assert!(!src.contains(&r.ids.first), "{src}");
    type_into(c, "input[name=token]", token).await;
    click(c, Locator::Css("form button[type=submit]")).await;
    heading_is(c, "Overview").await;
    assert!(text_of(c, ".who").await.starts_with(who));
    // The session cookie: HttpOnly, SameSite=Strict.
    let cookie = c.get_named_cookie("custody_session").await.unwrap();
    assert_eq!(cookie.http_only(), Some(true));
    assert_eq!(
        cookie.same_site().map(|s| s.to_string()).as_deref(),
        Some("Strict")
    );
}

async fn log_out(c: &Client, r: &Reviewed) {
    click(c, Locator::Css("form.logout button")).await;
    element(c, Locator::Css("input[name=token]")).await;
    // The session is over: the pages are closed again.
    c.goto(&r.url("/search")).await.unwrap();
    element(c, Locator::Css("input[name=token]")).await;
}

/// Every page a role reads, with what it must and must not show.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_reads_through_a_real_browser_and_every_read_is_on_the_record() {
    let r = reviewed_trail().await;
    let driver = start_driver().await;
    let client = browser(&driver).await;
    let c = &client;

    // A wrong token: the form again, with why.
    c.goto(&r.url("/login")).await.unwrap();
    type_into(c, "input[name=token]", "wrong-token").await;
    click(c, Locator::Css("form button[type=submit]")).await;
    assert_eq!(text_of(c, ".problem").await, "That token is not valid.");
    shot(c, "login").await;

    // alice: content, may read the access trail.
    log_in(c, &r, ALICE, "alice").await;
    shot(c, "overview-alice").await;
    let charts = count(c, "figure.chart svg").await;
    assert_eq!(charts, 5, "exchanges, errors, blocked, flagged, redactions");
    let overview = c.source().await.unwrap();
    assert!(overview.contains("EMAIL_ADDRESS"), "redactions by entity");
    assert!(overview.contains("Newest events"));

    c.goto(&r.url("/search")).await.unwrap();
    type_into(c, "input[name=team]", "payments").await;
    click(c, Locator::Css("form.search button")).await;
    url_has(c, "team=payments").await;
    let rows = count(c, "table.records tbody tr").await;
    assert_eq!(rows, 2, "the payments team's two exchanges");
    shot(c, "search-alice").await;
    // Newest first: the second turn; open it.
    click(c, Locator::LinkText(&r.ids.second)).await;
    heading_is(c, &format!("Record {}", r.ids.second)).await;
    let turns = count(c, ".turn").await;
    assert_eq!(turns, 5, "system, user, assistant, user, and the answer");
    let marks = text_of(c, ".turn.user mark.redacted").await;
    assert_eq!(
        marks, "[EMAIL_ADDRESS]",
        "the redaction marker is highlighted"
    );
    let page = c.source().await.unwrap();
    assert!(page.contains(PROMPT_WORDS) && page.contains(ANSWER_WORDS));
    assert!(!page.contains("jane.doe@example.com"));
    assert!(page.contains("gpt-4o-2024-08-06"), "the model served");
    shot(c, "record-alice").await;
    click(c, Locator::LinkText("the whole conversation")).await;
    heading_is(c, "Conversation").await;
    let exchanges = count(c, "section.exchange").await;
    assert_eq!(exchanges, 2);
    // Each turn once: the second exchange shows only what it added.
    let turns = count(c, ".turn").await;
    assert_eq!(turns, 5, "system, user, answer; user, answer");
    shot(c, "conversation-alice").await;
    c.goto(&r.url("/integrity")).await.unwrap();
    click(c, Locator::Css("main form button")).await;
    let verdict = text_of(c, "section.verified h2").await;
    assert!(verdict.ends_with("intact"), "{verdict}");
    let facts = text_of(c, "section.verified table.facts").await;
    assert!(facts.contains("the newest at"), "{facts}");
    shot(c, "integrity-alice").await;
    c.goto(&r.url(&format!("/access?record={}", r.ids.second)))
        .await
        .unwrap();
    let reads = count(c, "table.records tbody tr").await;
    assert!(reads >= 2, "the search and the record view named it");
    shot(c, "access-alice").await;
    log_out(c, &r).await;

    // mo: metadata; no body, not even in the source.
    log_in(c, &r, MO, "mo").await;
    c.goto(&r.url("/search")).await.unwrap();
    assert!(
        count(c, "input[name=text]").await == 0,
        "no text search for metadata"
    );
    c.goto(&r.url(&format!("/records/{}", r.ids.first)))
        .await
        .unwrap();
    let withheld = text_of(c, "p.withheld").await;
    assert!(
        withheld.contains("withheld from metadata reviewers"),
        "{withheld}"
    );
    shot(c, "record-mo").await;
    let mut seen = c.source().await.unwrap();
    c.goto(&r.url(&format!("/conversations/{}", r.ids.second)))
        .await
        .unwrap();
    shot(c, "conversation-mo").await;
    seen.push_str(&c.source().await.unwrap());
    for body in [PROMPT_WORDS, ANSWER_WORDS, GROWTH_WORDS, "bank assistant"] {
        assert!(!seen.contains(body), "{body} reached a metadata reviewer");
    }
    c.goto(&r.url("/access")).await.unwrap();
    assert!(text_of(c, ".problem").await.contains("audit = true"));
    log_out(c, &r).await;

    // pat: payments only; the growth record does not exist for them.
    log_in(c, &r, PAT, "pat").await;
    c.goto(&r.url("/search")).await.unwrap();
    let rows = count(c, "table.records tbody tr").await;
    assert_eq!(rows, 2);
    shot(c, "search-pat").await;
    c.goto(&r.url(&format!("/records/{}", r.ids.growth)))
        .await
        .unwrap();
    let src = c.source().await.unwrap();
    assert!(!src.contains(GROWTH_WORDS));
    assert!(text_of(c, ".problem").await.contains("no such record"));
    log_out(c, &r).await;
    client.close().await.unwrap();

    let (events, r) = r.stop().await;
    let of = |who: &str, action: &str| {
        events
            .iter()
            .filter(|e| e["event"]["reviewer"] == who && e["event"]["action"] == action)
            .count()
    };
    for who in ["alice", "mo", "pat"] {
        assert_eq!(of(who, "login"), 1, "{who} logged in once");
        assert_eq!(of(who, "logout"), 1, "{who} logged out once");
        assert!(of(who, "overview") >= 1);
    }
    assert_eq!(
        events
            .iter()
            .filter(|e| e["event"]["action"] == "login_failed")
            .count(),
        1
    );
    assert_eq!(of("alice", "record"), 1);
    assert_eq!(of("alice", "conversation"), 1);
    assert_eq!(of("alice", "verify"), 1);
    assert_eq!(of("mo", "record"), 1);
    let key = custody_audit::signing::parse_public(&r.access_key).unwrap();
    custody_audit::review::verify::verify_dir(&r.access_dir, Some(&key), |_, _, _| {})
        .expect("the access trail verifies");
}

/// The report inside an evidence bundle opens from the unpacked bundle, as a file,
/// with nothing else: one row per record, the summary, the signed heads.
#[tokio::test]
async fn a_bundles_report_opens_in_a_real_browser() {
    use custody_audit::review::bundle;
    let t = custody_tests::evidence::signed_trail(2, 4).await;
    let bytes = custody_tests::evidence::bundle_of(&t, "alice");
    let files = bundle::open(&bytes).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join(bundle::REPORT);
    std::fs::write(&report, &files[bundle::REPORT]).unwrap();

    let driver = start_driver().await;
    let client = browser(&driver).await;
    let c = &client;
    c.goto(&format!("file://{}", report.display()))
        .await
        .unwrap();
    heading_is(c, "Evidence bundle").await;
    assert_eq!(count(c, "table.records tbody tr").await, 4);
    let summary = text_of(c, "table.summary").await;
    assert!(summary.contains("complete"), "{summary}");
    assert!(summary.contains("records 4"), "{summary}");
    let page = c.source().await.unwrap();
    assert!(page.contains("What it does not prove"));
    shot(c, "bundle-report").await;
    client.close().await.unwrap();
}
