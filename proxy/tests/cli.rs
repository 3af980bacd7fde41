//! The `custody` binary as users run it: config commands, `serve` with SIGTERM, and the
//! review commands on the trail it leaves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    path::Path,
    process::{Child, Command, Output, Stdio},
};

const BIN: &str = env!("CARGO_BIN_EXE_custody");

fn custody(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A child process killed when dropped: a failing test leaves no server behind.
struct Proc(Child);

impl std::ops::Deref for Proc {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Proc {
    /// SIGTERM; the process must drain and exit 0.
    fn terminate(&mut self) {
        let term = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status()
            .unwrap();
        assert!(term.success());
        assert!(self.0.wait().unwrap().success(), "exits 0 on SIGTERM");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a long-running subcommand and reads the address it prints on its first line.
fn spawn_listening(args: &[&str]) -> (Proc, String) {
    spawn_with(args, Stdio::null(), &[])
}

fn spawn_with(args: &[&str], stderr: Stdio, env: &[(&str, &str)]) -> (Proc, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line.trim().rsplit("http://").next().unwrap().to_owned();
    (Proc(child), addr)
}

/// Writes a `serve` configuration to `path`: both listeners on free ports, the trail in
/// `audit` with `audit_extra` lines under `[audit]`, an `openai` route to the mock
/// provider, then `tail`.
fn write_serve_config(path: &Path, audit: &Path, mock_addr: &str, audit_extra: &str, tail: &str) {
    std::fs::write(
        path,
        format!(
            "[listen]\naddr = \"127.0.0.1:0\"\n[admin]\naddr = \"127.0.0.1:0\"\n[audit]\ndir = \"{}\"\n{audit_extra}\n[[route]]\nname = \"openai\"\nprefix = \"/v1/\"\nupstream = \"http://{mock_addr}\"\nprovider = \"openai\"\n{tail}",
            audit.display()
        ),
    )
    .unwrap();
}

/// A mock provider and a fresh directory naming a trail and a config file in it.
struct Setup {
    mock: Proc,
    mock_addr: String,
    dir: tempfile::TempDir,
    audit: std::path::PathBuf,
    config: std::path::PathBuf,
}

fn setup() -> Setup {
    let (mock, mock_addr) = spawn_listening(&["mock-provider"]);
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit");
    let config = dir.path().join("custody.toml");
    Setup {
        mock,
        mock_addr,
        dir,
        audit,
        config,
    }
}

/// A GET over a plain socket; returns the raw response.
fn http_get_with(addr: &str, path: &str, headers: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\n{headers}connection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// A minimal HTTP/1.1 exchange over a plain socket; returns the raw response.
fn http_post(addr: &str, path: &str, headers: &str, body: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(s, "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n{headers}content-length: {}\r\nconnection: close\r\n\r\n{body}", body.len()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn help_names_every_command_a_user_can_run() {
    let help = stdout(&custody(&["--help"]));
    for command in [
        "serve",
        "demo",
        "console",
        "mock-provider",
        "log",
        "policy",
        "redact",
        "keygen",
    ] {
        assert!(
            help.contains(command),
            "{command} missing from --help:\n{help}"
        );
    }
}

#[test]
fn config_default_is_the_embedded_file_and_check_names_the_line() {
    let o = custody(&["config", "default"]);
    assert!(o.status.success());
    assert_eq!(stdout(&o), custody_config::DEFAULT_TOML);

    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, custody_config::DEFAULT_TOML).unwrap();
    let o = custody(&["config", "check", good.to_str().unwrap()]);
    assert!(o.status.success(), "{o:?}");

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[listen]\naddr = \"127.0.0.1:1\"\n\n[audit]\nsegment_max_byte = 5\n",
    )
    .unwrap();
    let o = custody(&["config", "check", bad.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("line 5") && err.contains("segment_max_byte"),
        "{err}"
    );
}

/// `custody ARGS` with `input` on standard input.
fn with_stdin(args: &[&str], input: &[u8]) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

/// `custody policy test --config RULES` with `input` on standard input.
fn policy_test(rules: &Path, input: &[u8]) -> Output {
    with_stdin(
        &["policy", "test", "--config", rules.to_str().unwrap()],
        input,
    )
}

#[test]
fn policy_check_names_every_bad_rule_and_policy_test_replays_exported_records() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    let good = r#"
[policy_terms]
codenames = ["Project Nightingale"]

[[policy]]
name = "codename"
when = "request.text.containsAny(terms.codenames)"
action = "flag"
severity = "medium"

[[policy]]
name = "cards"
when = "request.entities.CREDIT_CARD > 0"
action = "block"
severity = "critical"
"#;
    let bad = format!(
        "{good}{}",
        r#"
[[policy]]
name = "typo"
when = """
route == 'openai' &&
  reqest.text == ''"""
action = "flag"
severity = "low"

[[policy]]
name = "syntax"
when = "model == 'a' &&"
action = "flag"
severity = "low"
"#
    );
    std::fs::write(&rules, &bad).unwrap();
    let o = custody(&["policy", "check", rules.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("policy `typo`: `when` line 2, column 3: unknown variable `reqest`"),
        "{err}"
    );
    assert!(err.contains("policy `syntax`: `when` line 1"), "{err}");
    assert!(err.contains("2 of 4 rules do not compile"), "{err}");

    std::fs::write(&rules, good).unwrap();
    let o = custody(&["policy", "check", rules.to_str().unwrap()]);
    assert!(o.status.success(), "{o:?}");
    assert!(
        stdout(&o).contains("2 rules, 1 term lists"),
        "{}",
        stdout(&o)
    );

    let record = |id: &str, text: &str, cards: u64| {
        serde_json::json!({
            "schema": "custody.record/v1", "id": id, "route": "openai", "outcome": "ok",
            "gen_ai": {"provider": {"name": "openai"}, "request": {"model": "gpt-4o"}},
            "request": {"body": {"messages": [{"role": "user", "content": text}]},
                        "redactions": {"CREDIT_CARD": cards}},
            "response": {},
        })
        .to_string()
    };
    let input = [
        record("r1", "news on project nightingale?", 0),
        record("r2", "pay with [CREDIT_CARD]", 1),
        record("r3", "hello", 0),
        r#"{"schema":"custody.event/v1","event":{"type":"config"}}"#.to_owned(),
    ]
    .join("\n");
    let o = policy_test(&rules, input.as_bytes());
    assert!(o.status.success(), "{o:?}");
    let out = stdout(&o);
    assert!(
        out.contains("r1  codename") && out.contains("flagged"),
        "{out}"
    );
    assert!(
        out.contains("r2  cards") && out.contains("blocked"),
        "{out}"
    );
    assert!(!out.contains("r3"), "{out}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("3 records, 2 matched"), "{err}");

    let o = policy_test(&rules, b"not json\n");
    assert!(
        !o.status.success(),
        "an unreadable input line fails the replay"
    );
}

#[test]
fn serve_records_then_sigterm_exits_cleanly_and_the_log_commands_read_the_trail() {
    let (mut mock, mock_addr) = spawn_listening(&["mock-provider"]);
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit");
    let config = dir.path().join("custody.toml");
    write_serve_config(&config, &audit, &mock_addr, "", "");
    let (mut serve, addr) = spawn_listening(&["serve", "--config", config.to_str().unwrap()]);

    let plain = http_post(
        &addr,
        "/v1/chat/completions",
        "authorization: Bearer sk-cli-test-0000000000000000\r\n",
        r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello there"}]}"#,
    );
    assert!(plain.starts_with("HTTP/1.1 200"), "{plain}");
    let streamed = http_post(
        &addr,
        "/v1/chat/completions",
        "",
        r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"stream please"}]}"#,
    );
    assert!(streamed.contains("data: [DONE]"), "{streamed}");
    let limited = http_post(
        &addr,
        "/v1/chat/completions",
        "",
        r#"{"model":"rate-limited","messages":[]}"#,
    );
    assert!(
        limited.starts_with("HTTP/1.1 429")
            && limited.to_ascii_lowercase().contains("retry-after: 1"),
        "{limited}"
    );

    serve.terminate();
    mock.kill().unwrap();
    let _ = mock.wait();

    let d = audit.to_str().unwrap();
    let o = custody(&["log", "export", "--dir", d]);
    assert!(o.status.success());
    let lines: Vec<serde_json::Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // Export is the whole trail: the start's config event, then the three records.
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[0]["event"]["type"], "config");
    assert_eq!(lines[1]["seq"], 2);
    assert_eq!(lines[2]["response"]["streamed"], true);
    assert_eq!(
        lines[2]["response"]["body"]["choices"][0]["message"]["content"]
            .as_str()
            .unwrap(),
        "Hello from the mock provider. You said: stream please"
    );

    let o = custody(&["log", "verify", "--dir", d]);
    assert!(o.status.success());
    let out = stdout(&o);
    assert!(
        out.contains("records: 3 (+1 events) in 1 segments") && out.ends_with("ok\n"),
        "{out}"
    );

    let o = custody(&["log", "search", "--dir", d, "--status", "4xx", "--json"]);
    let found: Vec<String> = stdout(&o).lines().map(str::to_owned).collect();
    assert_eq!(found.len(), 1);
    assert!(found[0].contains("rate-limited"));
    let o = custody(&[
        "log",
        "search",
        "--dir",
        d,
        "--model",
        "gpt-4o-mini",
        "--since",
        "1h",
        "--text",
        "STREAM PLEASE",
        "--json",
    ]);
    assert_eq!(stdout(&o).lines().count(), 1);
    let o = custody(&[
        "log",
        "search",
        "--dir",
        d,
        "--key-id",
        lines[1]["client"]["key_id"].as_str().unwrap(),
    ]);
    assert_eq!(stdout(&o).lines().count(), 1);
    let o = custody(&["log", "search", "--dir", d, "--limit", "2", "--json"]);
    let newest: Vec<serde_json::Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        newest
            .iter()
            .map(|r| r["seq"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        vec![4, 3],
        "newest first"
    );

    let id = lines[3]["id"].as_str().unwrap();
    let o = custody(&["log", "show", id, "--dir", d]);
    assert!(o.status.success());
    assert!(stdout(&o).contains("\"rate-limited\""));
    assert!(!custody(&["log", "show", "no-such-id", "--dir", d])
        .status
        .success());

    // Drift over the last hour against the hour before: the three records are counted
    // in the window, too few to judge; a window that is not one is refused, by name.
    let o = custody(&[
        "log",
        "drift",
        "--dir",
        d,
        "--baseline",
        "2h..1h",
        "--window",
        "1h..0s",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(
        (r["baseline_records"].as_u64(), r["window_records"].as_u64()),
        (Some(0), Some(3))
    );
    assert!(r["dimensions"]
        .as_array()
        .unwrap()
        .iter()
        .all(|d| d["verdict"] == "too_few"));
    let o = custody(&[
        "log",
        "drift",
        "--dir",
        d,
        "--baseline",
        "2h",
        "--window",
        "1h..0s",
    ]);
    assert_eq!(o.status.code(), Some(2), "a usage error");
    assert!(String::from_utf8_lossy(&o.stderr).contains("--baseline"));

    // The graph: GraphML on stdout holds the three exchanges; CSV needs a new directory.
    let o = custody(&["log", "graph", "--dir", d, "--format", "graphml"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        stdout(&o)
            .matches("<data key=\"node_label\">Exchange<")
            .count(),
        3
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("3 exchanges"));
    let graph = dir.path().join("graph");
    let o = custody(&[
        "log",
        "graph",
        "--dir",
        d,
        "--format",
        "csv",
        "--out",
        graph.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let exchanges = std::fs::read_to_string(graph.join("nodes/Exchange.csv")).unwrap();
    assert_eq!(exchanges.lines().count(), 4, "a header and three rows");
    let again = custody(&[
        "log",
        "graph",
        "--dir",
        d,
        "--format",
        "csv",
        "--out",
        graph.to_str().unwrap(),
    ]);
    assert!(
        !again.status.success(),
        "an existing export is not overwritten"
    );
    let o = custody(&["log", "graph", "--dir", d, "--format", "csv"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--out"));

    // An edited trail: verify exits 1 and names the segment.
    let seg = std::fs::read_dir(&audit)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "seg"))
        .unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    let n = bytes.len();
    bytes[n - 5] ^= 0xff;
    std::fs::write(&seg, bytes).unwrap();
    let o = custody(&["log", "verify", "--dir", d]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains(".seg"));
}

#[test]
fn a_fleet_is_reviewed_from_the_bucket_and_exported_as_parquet() {
    let (_mock, mock_addr) = spawn_listening(&["mock-provider"]);
    let dir = tempfile::tempdir().unwrap();
    let bucket = dir.path().join("bucket");
    std::fs::create_dir(&bucket).unwrap();
    let url = format!("file://{}", bucket.display());
    for pod in ["pod-a", "pod-b"] {
        let config = dir.path().join(format!("{pod}.toml"));
        write_serve_config(
            &config,
            &dir.path().join(pod),
            &mock_addr,
            "segment_max_bytes = 1",
            &format!("[ship]\nurl = \"{url}\"\nsource = \"{pod}\"\ninterval_secs = 1\n"),
        );
        let (mut serve, addr) = spawn_listening(&["serve", "--config", config.to_str().unwrap()]);
        for n in 0..2 {
            let body = format!(
                r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"{pod} turn {n}"}}]}}"#
            );
            assert!(http_post(&addr, "/v1/chat/completions", "", &body).starts_with("HTTP/1.1 200"));
        }
        // The final shipping pass at SIGTERM uploads the last, now sealed, segment.
        serve.terminate();
    }

    let o = custody(&["log", "ls", "--from", &url]);
    let out = stdout(&o);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(out.lines().count(), 2, "{out}");
    assert!(
        out.contains("/pod-a  ") && out.contains("/pod-b  "),
        "{out}"
    );

    let o = custody(&["log", "verify", "--from", &url]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(stdout(&o).matches("records: 2 (+1 events)").count(), 2);

    // Search merges the pods' trails, newest first across them.
    let o = custody(&["log", "search", "--from", &url, "--json"]);
    let found: Vec<serde_json::Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(found.len(), 4, "{o:?}");
    let times: Vec<&str> = found
        .iter()
        .map(|r| r["time"]["start"].as_str().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "{times:?}");
    assert!(found[0].to_string().contains("pod-b turn 1"));
    let o = custody(&[
        "log", "search", "--from", &url, "--source", "pod-a", "--text", "turn", "--json",
    ]);
    assert_eq!(stdout(&o).lines().count(), 2);
    assert!(!stdout(&o).contains("pod-b"));

    let id = found[3]["id"].as_str().unwrap();
    let o = custody(&["log", "show", id, "--from", &url]);
    assert!(o.status.success(), "{o:?}");
    assert!(stdout(&o).contains("pod-a turn 0"));

    let o = custody(&["log", "export", "--from", &url]);
    assert_eq!(
        stdout(&o).lines().count(),
        6,
        "two config events, four records"
    );

    let parquet = dir.path().join("fleet.parquet");
    let o = custody(&[
        "log",
        "export",
        "--from",
        &url,
        "--format",
        "parquet",
        "-o",
        parquet.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("6 row(s)"));
    let bytes = std::fs::read(&parquet).unwrap();
    assert!(bytes.starts_with(b"PAR1") && bytes.ends_with(b"PAR1"));
    let o = custody(&["log", "export", "--from", &url, "--format", "parquet"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--output"));
}

#[test]
fn demo_runs_without_a_key_verifies_and_opens_the_console() {
    let mut child = Proc(
        Command::new(BIN)
            .args(["demo", "--console-listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // The tour, up to the console's line (the demo then serves until stopped).
    let mut out = String::new();
    let mut lines = BufReader::new(child.stdout.take().unwrap());
    while !out.contains("Ctrl-C stops it.") {
        let mut line = String::new();
        assert!(
            lines.read_line(&mut line).unwrap() > 0,
            "demo ended early:\n{out}"
        );
        out.push_str(&line);
    }
    let console = out.rsplit("http://").next().unwrap();
    let addr = console.split('/').next().unwrap().to_owned();
    let token = console
        .split("the token ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    // The newcomer's token reads the two records; no token, nothing.
    let read = http_get_with(
        &addr,
        "/api/records",
        &format!("authorization: Bearer {token}\r\n"),
    );
    assert!(read.starts_with("HTTP/1.1 200"), "{read}");
    assert_eq!(
        read.matches("\"schema\":\"custody.record/v1\"").count(),
        2,
        "{read}"
    );
    assert!(http_get(&addr, "/api/records").starts_with("HTTP/1.1 401"));
    child.terminate();
    assert!(
        out.contains(
            ": ok, 2 records in 1 segment(s), 1 seal(s) and 1 checkpoint(s) signed by that key"
        ),
        "{out}"
    );
    assert!(
        out.contains("[EMAIL_ADDRESS]") && !out.contains("jane.doe@example.com"),
        "{out}"
    );
    // The embedded default policies decide in the tour, and the token stays out.
    assert!(
        out.contains("policy `card-number-in-prompt` (critical block, observe mode): would_block"),
        "{out}"
    );
    assert!(
        out.contains("policy `secret-in-prompt` (high flag, enforce mode): flagged"),
        "{out}"
    );
    assert!(!out.contains("ghp_0123456789"), "{out}");
}

#[test]
fn console_serves_a_trail_and_log_search_says_who_read_a_record() {
    let Setup {
        mut mock,
        mock_addr,
        dir,
        audit,
        config,
    } = setup();
    write_serve_config(&config, &audit, &mock_addr, "", "");
    let (mut serve, addr) = spawn_listening(&["serve", "--config", config.to_str().unwrap()]);
    let chat = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello"}]}"#;
    assert!(http_post(&addr, "/v1/chat/completions", "", chat).starts_with("HTTP/1.1 200"));
    serve.terminate();
    mock.kill().unwrap();
    let d = audit.to_str().unwrap();
    let o = custody(&["log", "search", "--dir", d, "--json"]);
    let id = stdout(&o)
        .lines()
        .next()
        .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .and_then(|r| r["id"].as_str().map(str::to_owned))
        .unwrap();

    // A console-only file; the token comes from the environment.
    let access = dir.path().join("access");
    let console = dir.path().join("console.toml");
    std::fs::write(
        &console,
        format!(
            "[console]\nlisten = \"127.0.0.1:0\"\ndir = \"{d}\"\naccess_dir = \"{}\"\n\n[[reviewer]]\nid = \"alice\"\ntoken_env = \"ALICE_TOKEN\"\nrole = \"content\"\n",
            access.display()
        ),
    )
    .unwrap();
    let c = console.to_str().unwrap();
    // Without the variable: a clear error naming it, and no console.
    let o = custody(&["console", "--config", c]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("`ALICE_TOKEN` is unset or empty"),
        "{o:?}"
    );
    let (mut console_proc, console_addr) = spawn_with(
        &["console", "--config", c],
        Stdio::null(),
        &[("ALICE_TOKEN", "s3cret-alice-token")],
    );
    let read = http_get_with(
        &console_addr,
        &format!("/api/records/{id}"),
        "authorization: Bearer s3cret-alice-token\r\n",
    );
    assert!(read.starts_with("HTTP/1.1 200"), "{read}");
    assert!(read.contains("hello"), "{read}");
    console_proc.terminate();

    let a = access.to_str().unwrap();
    let o = custody(&["log", "search", "--dir", a, "--record", &id]);
    let out = stdout(&o);
    assert!(o.status.success());
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(
        out.contains("access  alice record 200 127.0.0.1:")
            && out.contains(&format!("GET /api/records/{id}")),
        "{out}"
    );
    assert!(custody(&["log", "verify", "--dir", a]).status.success());
    // The console never wrote to the trail it read.
    assert!(custody(&["log", "verify", "--dir", d]).status.success());
    let o = custody(&["log", "search", "--dir", d, "--events", "--json"]);
    assert!(!stdout(&o).contains("\"access\""));
}

#[test]
fn redact_keeps_lines_and_reports_counts() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "[audit]\ndir = \"{}\"\n[redaction]\nallow = [\"help@example.com\"]\n[redaction.entities]\nPHONE_NUMBER = \"drop\"\n[[redaction.custom]]\nname = \"CODENAME\"\nterms = [\"bluebird\"]\ncase_insensitive = true\n[[route]]\nname = \"a\"\nprefix = \"/\"\nupstream = \"http://127.0.0.1:9\"\n",
            dir.path().join("audit").display()
        ),
    )
    .unwrap();
    let input = b"mail bob@example.com or help@example.com\r\n{\"b\": 1,  \"a\":\"call 415-555-2671 re BlueBird\"}\n\xff\xfe not utf-8 4111 1111 1111 1111\nlast line without newline";
    let o = with_stdin(
        &["redact", "--report", "--config", config.to_str().unwrap()],
        input,
    );
    assert!(o.status.success());
    let out = String::from_utf8(o.stdout).expect("output is UTF-8");
    let lines: Vec<&str> = out.split_inclusive('\n').collect();
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[0], "mail [EMAIL_ADDRESS] or help@example.com\r\n");
    assert_eq!(lines[1], "{\"b\": 1,  \"a\":\"call  re [CODENAME]\"}\n");
    assert!(
        lines[2].ends_with(" not utf-8 [CREDIT_CARD]\n"),
        "{}",
        lines[2]
    );
    assert_eq!(lines[3], "last line without newline");
    let report: serde_json::Value = serde_json::from_slice(&o.stderr).unwrap();
    assert_eq!(
        report,
        serde_json::json!({"CODENAME": 1, "CREDIT_CARD": 1, "EMAIL_ADDRESS": 1, "PHONE_NUMBER": 1})
    );
}

#[test]
fn kill_9_under_load_loses_nothing_on_disk_and_verifies_after_restart() {
    use std::sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    };
    let (mut mock, mock_addr) = spawn_listening(&["mock-provider"]);
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit");
    let keys = dir.path().join("keys");
    assert!(custody(&["keygen", "--out", keys.to_str().unwrap()])
        .status
        .success());
    let config = dir.path().join("custody.toml");
    write_serve_config(
        &config,
        &audit,
        &mock_addr,
        &format!(
            "fsync = \"always\"\nsigning_key = \"{}\"",
            keys.join("custody.key").display()
        ),
        "",
    );
    let (mut serve, addr) = spawn_listening(&["serve", "--config", config.to_str().unwrap()]);

    // Load from four clients until the trail holds at least 40 records, then kill -9.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (stop, done, addr) = (stop.clone(), done.clone(), addr.clone());
            std::thread::spawn(move || {
                for _ in 0..5_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(mut s) = TcpStream::connect(&addr) else { break };
                    let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"load"}]}"#;
                    let req = format!("POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
                    if s.write_all(req.as_bytes()).is_err() {
                        break;
                    }
                    let mut out = String::new();
                    if s.read_to_string(&mut out).is_ok() && out.starts_with("HTTP/1.1 200") {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let d = audit.to_str().unwrap();
    let mut polls = 0;
    let before: Vec<serde_json::Value> = loop {
        polls += 1;
        assert!(polls < 20_000, "the trail never reached 40 records");
        let o = custody(&["log", "export", "--dir", d]);
        let lines: Vec<serde_json::Value> = stdout(&o)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if lines.len() >= 40 {
            break lines;
        }
    };
    assert!(Command::new("kill")
        .args(["-KILL", &serve.id().to_string()])
        .status()
        .unwrap()
        .success());
    let _ = serve.wait();
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }

    // Restart: the crash is repaired and recorded; then a clean stop.
    let (mut serve, addr) = spawn_listening(&["serve", "--config", config.to_str().unwrap()]);
    assert!(http_post(
        &addr,
        "/v1/chat/completions",
        "",
        r#"{"model":"after","messages":[]}"#
    )
    .starts_with("HTTP/1.1 200"));
    serve.terminate();
    mock.kill().unwrap();
    let _ = mock.wait();

    let after: Vec<serde_json::Value> = stdout(&custody(&["log", "export", "--dir", d]))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ids: std::collections::HashSet<&str> =
        after.iter().map(|r| r["id"].as_str().unwrap()).collect();
    for r in &before {
        assert!(
            ids.contains(r["id"].as_str().unwrap()),
            "record seq {} was on disk before the kill and is gone",
            r["seq"]
        );
    }
    let seqs: Vec<u64> = after.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=after.len() as u64).collect::<Vec<_>>());
    assert!(after.iter().any(|r| r["event"]["type"] == "recovery"));
    assert_eq!(after.last().unwrap()["gen_ai"]["request"]["model"], "after");
    let pubkey = keys.join("custody.pub");
    let o = custody(&[
        "log",
        "verify",
        "--dir",
        d,
        "--pubkey",
        pubkey.to_str().unwrap(),
    ]);
    let out = stdout(&o);
    assert!(
        o.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("recoveries: 1 crash(es) repaired"), "{out}");
    let o = custody(&[
        "log",
        "verify",
        "--dir",
        d,
        "--pubkey",
        pubkey.to_str().unwrap(),
        "--fast",
    ]);
    assert!(
        o.status.success() && stdout(&o).contains("mode: fast"),
        "{}",
        stdout(&o)
    );
    assert!(
        !custody(&["log", "verify", "--dir", d, "--fast"])
            .status
            .success(),
        "--fast needs --pubkey"
    );
}

#[test]
fn sighup_reloads_the_config_and_log_chain_tells_the_conversation() {
    let (mut mock, mock_addr) = spawn_listening(&["mock-provider"]);
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit");
    let config = dir.path().join("custody.toml");
    let write_config = |tail: &str| write_serve_config(&config, &audit, &mock_addr, "", tail);
    // JSON logs with a line per exchange (both survive the reload below).
    let logs = "\n[log]\nformat = \"json\"\nexchanges = true\n";
    write_config(logs);
    // The environment the Kubernetes downward API would set.
    let (mut serve, addr) = spawn_with(
        &["serve", "--config", config.to_str().unwrap()],
        Stdio::piped(),
        &[("POD_NAME", "custody-test-pod"), ("POD_NAMESPACE", "audit")],
    );
    // The server's log, line by line, to learn when the reload is done.
    let (log_tx, log) = std::sync::mpsc::channel();
    let stderr = serve.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = log_tx.send(l);
        }
    });

    // Two turns of one conversation: the second sends the first answer back.
    let turn = |messages: &str| {
        let resp = http_post(
            &addr,
            "/v1/chat/completions",
            "",
            &format!(r#"{{"model":"gpt-4o-mini","messages":[{messages}]}}"#),
        );
        let body = resp.split("\r\n\r\n").nth(1).unwrap().to_owned();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let mut history = r#"{"role":"user","content":"What is custody?"}"#.to_owned();
    for next in ["And why?", "Thanks."] {
        let answer = serde_json::Value::String(turn(&history));
        history = format!(
            r#"{history},{{"role":"assistant","content":{answer}}},{{"role":"user","content":"{next}"}}"#
        );
    }
    turn(&history);

    // A new route and a source tag, applied on SIGHUP without a restart.
    write_config(&format!(
        "{logs}\n[source]\nservice = \"cli-test\"\n\n[[route]]\nname = \"second\"\nprefix = \"/second/\"\nstrip_prefix = true\nupstream = \"http://{mock_addr}\"\nprovider = \"openai\"\n"
    ));
    let hup = Command::new("kill")
        .args(["-HUP", &serve.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let deadline = std::time::Duration::from_secs(30);
    let mut lines = Vec::new();
    loop {
        let l = log.recv_timeout(deadline).expect("no reload logged");
        assert!(!l.contains("reload refused"), "{l}");
        let done = l.contains("configuration reloaded");
        lines.push(l);
        if done {
            break;
        }
    }
    let third = http_post(
        &addr,
        "/second/v1/chat/completions",
        "",
        r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"via the new route"}]}"#,
    );
    assert!(third.starts_with("HTTP/1.1 200"), "{third}");

    serve.terminate();
    mock.kill().unwrap();
    let _ = mock.wait();
    reader.join().unwrap();
    lines.extend(log.try_iter());
    let exchange_lines: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("every log line is JSON"))
        .filter(|v| v["target"] == "custody::exchange")
        .collect();
    assert_eq!(exchange_lines.len(), 4, "{lines:#?}");
    assert_eq!(exchange_lines[0]["fields"]["status"], 200);
    assert_eq!(exchange_lines[0]["fields"]["outcome"], "ok");
    assert!(
        !lines.iter().any(|l| l.contains("What is custody")),
        "no bodies in the log"
    );

    let d = audit.to_str().unwrap();
    let o = custody(&["log", "search", "--dir", d, "--events", "--json"]);
    let events: Vec<serde_json::Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let reasons: Vec<&str> = events
        .iter()
        .map(|e| e["event"]["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons, vec!["reload", "start"], "newest first");
    let o = custody(&["log", "search", "--dir", d, "--json"]);
    let records: Vec<serde_json::Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records[0]["route"], "second");
    assert_eq!(records[0]["source"]["service"], "cli-test");
    assert_eq!(
        records[0]["config"]["version"],
        events[0]["event"]["version"]
    );

    assert_eq!(records[0]["source"]["k8s.pod.name"], "custody-test-pod");
    assert_eq!(records[0]["source"]["k8s.namespace.name"], "audit");

    // `log chain` from the middle turn: all three turns, oldest first.
    let middle = records[2]["id"].as_str().unwrap();
    let o = custody(&["log", "chain", middle, "--dir", d]);
    assert!(o.status.success(), "{o:?}");
    let out = stdout(&o);
    let turns: Vec<&str> = out.lines().filter(|l| l.starts_with("turn ")).collect();
    assert_eq!(turns.len(), 3, "{out}");
    assert!(turns[1].ends_with("<-"), "{out}");
    for asked in ["What is custody?", "And why?", "Thanks."] {
        assert!(out.contains(&format!("asked:    {asked}")), "{out}");
    }
    assert!(
        out.contains("answered: Hello from the mock provider. You said: Thanks."),
        "{out}"
    );
    let o = custody(&["log", "chain", middle, "--dir", d, "--json"]);
    assert_eq!(stdout(&o).lines().count(), 3);
}

fn http_get(addr: &str, path: &str) -> String {
    http_get_with(addr, path, "")
}

/// Polls `cond` until it holds (a condition, not a fixed delay); fails after 30 s.
fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "never: {what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Custody serving `config` in its own mount namespace, its audit dir `audit` a 1 MiB
/// tmpfs; when it exits, the shell copies the trail into `copy` (for verification).
struct OnTmpfs {
    shell: Child,
    addr: String,
    admin: String,
    pid: String,
    log: std::path::PathBuf,
    audit: std::path::PathBuf,
}

impl OnTmpfs {
    fn start(dir: &Path, audit: &Path, copy: &Path, config: &Path) -> Self {
        let pidfile = dir.join("custody.pid");
        let log = dir.join("stderr.log");
        let script = format!(
            "mount -t tmpfs -o size=1m tmpfs '{a}' || exit 97; '{BIN}' serve --config '{c}' & echo $! > '{p}'; wait $!; code=$?; cp -a '{a}/.' '{o}/'; exit $code",
            a = audit.display(),
            c = config.display(),
            p = pidfile.display(),
            o = copy.display(),
        );
        let mut shell = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(shell.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert!(
            line.contains("listening"),
            "custody did not start under unshare: {line:?}"
        );
        let addr = line.trim().rsplit("http://").next().unwrap().to_owned();
        line.clear();
        out.read_line(&mut line).unwrap();
        let admin = line.trim().rsplit("http://").next().unwrap().to_owned();
        until("the pid file", || {
            std::fs::read_to_string(&pidfile).is_ok_and(|p| p.ends_with('\n'))
        });
        let pid = std::fs::read_to_string(&pidfile).unwrap().trim().to_owned();
        // Ready first: custody creates its key and first segment at start.
        until("ready", || {
            http_get(&admin, "/readyz").starts_with("HTTP/1.1 200")
        });
        Self {
            shell,
            addr,
            admin,
            pid,
            log,
            audit: audit.to_owned(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fills the tmpfs from outside, through the process's view of its mounts; returns
    /// the filler's path.
    fn fill(&self) -> String {
        let filler = format!("/proc/{}/root{}/filler", self.pid, self.audit.display());
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 16 * 1024];
        while f.write_all(&chunk).is_ok() {}
        filler
    }

    /// SIGTERM, and the shell's exit status once the trail is copied out.
    fn terminate(mut self) -> std::process::ExitStatus {
        Command::new("kill")
            .args(["-TERM", &self.pid])
            .status()
            .unwrap();
        self.shell.wait().unwrap()
    }
}

#[test]
fn a_full_disk_holds_traffic_back_and_custody_resumes_when_space_returns() {
    let (mut mock, mock_addr) = spawn_listening(&["mock-provider"]);
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit");
    let copy = dir.path().join("copy");
    std::fs::create_dir_all(&audit).unwrap();
    std::fs::create_dir_all(&copy).unwrap();
    let config = dir.path().join("custody.toml");
    write_serve_config(
        &config,
        &audit,
        &mock_addr,
        "on_full = \"reject\"\nqueue_capacity = 2\nfsync = \"always\"",
        "",
    );
    let served = OnTmpfs::start(dir.path(), &audit, &copy, &config);
    let (addr, admin) = (served.addr.clone(), served.admin.clone());
    let log = || served.log();
    let filler = served.fill();
    let chat = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"while the disk is full"}]}"#;
    let first = http_post(&addr, "/v1/chat/completions", "", chat);
    assert!(first.starts_with("HTTP/1.1 200"), "{first}\n{}", log());
    until("not ready: writer failing", || {
        http_get(&admin, "/readyz").contains("audit_writer_failing")
    });
    assert!(http_get(&admin, "/metrics").contains("custody_audit_writer_failing 1"));
    // The writer takes nothing more: the queue (two slots, counting what the writer
    // holds unwritten) fills, then 503s.
    let mut refused = false;
    let mut admitted = 1;
    for _ in 0..4 {
        let r = http_post(&addr, "/v1/chat/completions", "", chat);
        if r.starts_with("HTTP/1.1 200") {
            admitted += 1;
        }
        if r.starts_with("HTTP/1.1 503") {
            assert!(r.contains("audit_queue_full"), "{r}");
            refused = true;
            break;
        }
    }
    assert!(
        refused,
        "a full disk must not let unaudited traffic through under reject"
    );

    // Space returns: custody resumes on its own.
    std::fs::remove_file(&filler).unwrap();
    until("ready again", || {
        http_get(&admin, "/readyz").starts_with("HTTP/1.1 200")
    });
    assert!(http_post(&addr, "/v1/chat/completions", "", chat).starts_with("HTTP/1.1 200"));
    admitted += 1;

    assert!(served.terminate().success());
    mock.kill().unwrap();
    let _ = mock.wait();
    let d = copy.to_str().unwrap();
    let o = custody(&["log", "verify", "--dir", d]);
    assert!(
        o.status.success(),
        "{}{}",
        stdout(&o),
        String::from_utf8_lossy(&o.stderr)
    );
    let o = custody(&["log", "search", "--dir", d, "--json"]);
    assert!(
        admitted >= 3,
        "the queue took at least one exchange while failing"
    );
    assert_eq!(
        stdout(&o).lines().count(),
        admitted,
        "every admitted exchange was written"
    );
    let o = custody(&["log", "search", "--dir", d, "--events", "--json"]);
    assert!(
        stdout(&o).contains("\"type\":\"gap\""),
        "the refusal is told in the chain"
    );
}

#[test]
fn durable_mode_kill_9_keeps_every_exchange_a_client_saw_complete() {
    use std::sync::{Arc, Mutex};
    let (mut mock, mock_addr) = spawn_listening(&["mock-provider"]);
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit");
    let config = dir.path().join("custody.toml");
    write_serve_config(
        &config,
        &audit,
        &mock_addr,
        "durability = \"durable\"\nfsync_interval_ms = 60000",
        "",
    );
    let (mut serve, addr) = spawn_listening(&["serve", "--config", config.to_str().unwrap()]);

    // Four clients; each remembers the requests whose response it read to the end.
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let clients: Vec<_> = (0..4)
        .map(|t| {
            let (seen, addr) = (seen.clone(), addr.clone());
            std::thread::spawn(move || {
                for i in 0..100_000 {
                    let Ok(mut s) = TcpStream::connect(&addr) else { break };
                    let marker = format!("durable-{t}-{i}");
                    let body = format!(r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"{marker}"}}]}}"#);
                    let req = format!("POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
                    if s.write_all(req.as_bytes()).is_err() {
                        break;
                    }
                    let mut out = String::new();
                    match s.read_to_string(&mut out) {
                        Ok(_) if out.starts_with("HTTP/1.1 200") && out.ends_with('}') => {
                            seen.lock().unwrap().push(marker)
                        }
                        _ => break,
                    }
                }
            })
        })
        .collect();
    until("60 exchanges seen complete", || {
        seen.lock().unwrap().len() >= 60
    });
    assert!(Command::new("kill")
        .args(["-KILL", &serve.id().to_string()])
        .status()
        .unwrap()
        .success());
    let _ = serve.wait();
    for c in clients {
        c.join().unwrap();
    }
    let completed = seen.lock().unwrap().clone();

    // Restart repairs the tail; then a clean stop, and every completed one is there.
    let (mut serve, _) = spawn_listening(&["serve", "--config", config.to_str().unwrap()]);
    serve.terminate();
    mock.kill().unwrap();
    let _ = mock.wait();
    let d = audit.to_str().unwrap();
    let trail = stdout(&custody(&["log", "export", "--dir", d]));
    let missing: Vec<&String> = completed
        .iter()
        .filter(|m| !trail.contains(&format!("\"{m}\"")))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} completed exchanges missing: {missing:?}",
        missing.len(),
        completed.len()
    );
    assert!(custody(&["log", "verify", "--dir", d]).status.success());
}

#[test]
fn records_a_full_disk_refused_at_sigterm_become_a_gap_event_at_the_next_start() {
    let Setup {
        mut mock,
        mock_addr,
        dir,
        audit,
        config,
    } = setup();
    let copy = dir.path().join("copy");
    std::fs::create_dir_all(&audit).unwrap();
    std::fs::create_dir_all(&copy).unwrap();
    let write_config = |dir: &Path| {
        std::fs::write(
            &config,
            format!(
                "[listen]\naddr = \"127.0.0.1:0\"\nshutdown_grace_secs = 1\n[admin]\naddr = \"127.0.0.1:0\"\n[audit]\ndir = \"{}\"\nfsync = \"always\"\nqueue_capacity = 8\non_full = \"reject\"\n[[route]]\nname = \"openai\"\nprefix = \"/v1/\"\nupstream = \"http://{mock_addr}\"\nprovider = \"openai\"\n",
                dir.display()
            ),
        )
        .unwrap();
    };
    write_config(&audit);
    let served = OnTmpfs::start(dir.path(), &audit, &copy, &config);
    let (addr, admin) = (served.addr.clone(), served.admin.clone());
    let log = || std::fs::read_to_string(dir.path().join("stderr.log")).unwrap_or_default();
    served.fill();
    let chat = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"while the disk is full"}]}"#;
    let mut admitted = 0;
    for _ in 0..3 {
        let r = http_post(&addr, "/v1/chat/completions", "", chat);
        assert!(r.starts_with("HTTP/1.1 200"), "{r}\n{}", log());
        admitted += 1;
    }
    until("the writer fails", || {
        http_get(&admin, "/readyz").contains("audit_writer_failing")
    });
    // SIGTERM with the disk still full: the records cannot be written.
    let _ = served.terminate();
    let note = std::fs::read_to_string(copy.join("unwritten.json")).unwrap();
    let note: serde_json::Value =
        serde_json::from_str(note.trim()).unwrap_or_else(|e| panic!("{e}: {note:?}\n{}", log()));
    assert!(note["records"].as_u64().unwrap() >= admitted, "{note}");
    assert!(
        log().contains("the next start writes a gap event"),
        "{}",
        log()
    );

    // The next start, with space, tells the loss in the chain.
    std::fs::remove_file(copy.join("filler")).unwrap();
    write_config(&copy);
    let (mut serve, _) = spawn_listening(&["serve", "--config", config.to_str().unwrap()]);
    serve.terminate();
    mock.kill().unwrap();
    let _ = mock.wait();
    let d = copy.to_str().unwrap();
    let o = custody(&["log", "search", "--dir", d, "--events", "--json"]);
    let gap = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|e| e["event"]["reason"] == "unwritten_at_shutdown")
        .unwrap_or_else(|| panic!("no gap event: {}", stdout(&o)));
    assert_eq!(gap["event"]["type"], "gap");
    assert_eq!(gap["event"]["records"], note["records"]);
    assert!(gap["event"]["from"].is_string() && gap["event"]["to"].is_string());
    let o = custody(&["log", "verify", "--dir", d]);
    assert!(
        o.status.success(),
        "{}{}",
        stdout(&o),
        String::from_utf8_lossy(&o.stderr)
    );
    // Told once: a later start does not repeat it.
    let (mut serve, _) = spawn_listening(&["serve", "--config", config.to_str().unwrap()]);
    serve.terminate();
    let o = custody(&["log", "search", "--dir", d, "--events", "--json"]);
    assert_eq!(stdout(&o).matches("unwritten_at_shutdown").count(), 1);
}

/// Runs a review command that must end on its own, with an error; returns its stderr.
fn fails_promptly(args: &[&str]) -> String {
    let mut child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("{args:?} did not end");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!status.success(), "{args:?} exited 0: {err}");
    err
}

/// A segment file: a header, then one block holding `lines` (chained from zeros).
fn segment_with(lines: &[String]) -> Vec<u8> {
    use custody_audit::segment::{seal_line, BlockHeader, SegmentHeader};
    let mut out = SegmentHeader {
        segment: 1,
        created_ms: 1_700_000_000_000,
        first_seq: 1,
        prev_hash: [0; 32],
    }
    .encode();
    let mut prev = [0u8; 32];
    let mut raw = Vec::new();
    for l in lines {
        let mut line = format!(
            "{l},\"chain\":{{\"prev\":\"{}\",\"hash\":\"{}\"}}}}",
            hex::encode(prev),
            "0".repeat(64)
        )
        .into_bytes();
        prev = seal_line(&mut line).unwrap();
        raw.extend_from_slice(&line);
        raw.push(b'\n');
    }
    let mut c = zstd::bulk::Compressor::new(1).unwrap();
    out.extend(
        BlockHeader::encode_block(
            1,
            lines.len() as u32,
            1_700_000_000_000,
            1_700_000_000_000,
            &raw,
            &mut c,
        )
        .unwrap(),
    );
    out
}

#[test]
fn review_commands_refuse_devices_fifos_sparse_files_and_forged_lengths() {
    let dir = tempfile::tempdir().unwrap();
    let seg = "00000000000000000001.seg";
    type Make = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Make, &str)> = vec![
        (
            "dev-zero",
            Box::new(|p: &Path| std::os::unix::fs::symlink("/dev/zero", p).unwrap()),
            "not a regular file",
        ),
        (
            "fifo",
            Box::new(|p: &Path| assert!(Command::new("mkfifo").arg(p).status().unwrap().success())),
            "not a regular file",
        ),
        (
            "sparse",
            Box::new(|p: &Path| std::fs::File::create(p).unwrap().set_len(4 << 30).unwrap()),
            "segment header",
        ),
        (
            "forged-length",
            Box::new(|p: &Path| {
                // A valid header, then a block header claiming a 2 GiB frame.
                let mut bytes = segment_with(&[]);
                let block_at = custody_audit::segment::SEGMENT_HEADER_LEN + 8;
                bytes.truncate(block_at);
                let mut head = Vec::new();
                head.extend_from_slice(&custody_audit::segment::BLOCK_MAGIC.to_le_bytes());
                head.extend_from_slice(&48u32.to_le_bytes());
                let mut content = b"CSTB".to_vec();
                content.extend_from_slice(&1u64.to_le_bytes());
                content.extend_from_slice(&1u32.to_le_bytes());
                content.extend_from_slice(&0i64.to_le_bytes());
                content.extend_from_slice(&0i64.to_le_bytes());
                content.extend_from_slice(&(2u32 << 30).to_le_bytes());
                content.extend_from_slice(&(2u32 << 30).to_le_bytes());
                content.extend_from_slice(&0u32.to_le_bytes());
                let crc = crc32fast::hash(&content);
                content.extend_from_slice(&crc.to_le_bytes());
                head.extend(content);
                bytes.extend(head);
                std::fs::write(p, bytes).unwrap();
            }),
            "larger than a reader accepts",
        ),
    ];
    for (name, make, want) in cases {
        let trail = dir.path().join(name);
        std::fs::create_dir_all(&trail).unwrap();
        make(&trail.join(seg));
        let d = trail.to_str().unwrap();
        for args in [
            vec!["log", "verify", "--dir", d],
            vec!["log", "export", "--dir", d],
            vec!["log", "search", "--dir", d, "--text", "x"],
        ] {
            let err = fails_promptly(&args);
            assert!(err.contains(want), "{name} {args:?}: {err}");
        }
    }
}

#[test]
fn no_review_command_skips_an_unreadable_record_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let deep = format!("{}1{}", "[".repeat(140), "]".repeat(140));
    let lines = [
        "{\"schema\":\"custody.record/v1\",\"id\":\"0190f5a0-0000-7000-8000-000000000001\",\"seq\":1,\"outcome\":\"ok\"".to_owned(),
        format!("{{\"schema\":\"custody.record/v1\",\"id\":\"0190f5a0-0000-7000-8000-000000000002\",\"seq\":2,\"request\":{{\"body\":{deep}}}"),
    ];
    std::fs::write(
        dir.path().join("00000000000000000001.seg"),
        segment_with(&lines),
    )
    .unwrap();
    let d = dir.path().to_str().unwrap();
    let err = fails_promptly(&["log", "search", "--dir", d]);
    assert!(err.contains("not readable JSON"), "{err}");
    let err = fails_promptly(&["log", "verify", "--dir", d]);
    assert!(
        err.contains("nested deeper") || err.contains("cannot read"),
        "{err}"
    );
    let err = fails_promptly(&[
        "log",
        "show",
        "0190f5a0-0000-7000-8000-000000000002",
        "--dir",
        d,
    ]);
    assert!(err.contains("recursion") || err.contains("JSON"), "{err}");
}

/// Peak resident memory of a process (`VmHWM`), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

#[test]
fn memory_stays_bounded_under_bombs_and_endless_streams() {
    use std::io::Write as _;
    // An upstream answering every request with a stream naming 200,000 choices.
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let up_addr = upstream.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for s in upstream.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && s.read(&mut b).unwrap_or(0) == 1 {
                    head.push(b[0]);
                }
                let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let len: usize = text
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                let mut body = vec![0u8; len];
                let _ = s.read_exact(&mut body);
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n");
                let mut batch = String::new();
                for i in 0..200_000u32 {
                    batch.push_str(&format!("data: {{\"choices\":[{{\"index\":{i},\"delta\":{{\"content\":\"x\"}}}}]}}\n\n"));
                    if batch.len() > 64 * 1024 {
                        let _ = s.write_all(std::mem::take(&mut batch).as_bytes());
                    }
                }
                let _ = s.write_all(batch.as_bytes());
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit");
    let config = dir.path().join("custody.toml");
    // Durable: the response ends once its record is written, so the peak below
    // includes the writer's work on it.
    write_serve_config(&config, &audit, &up_addr, "durability = \"durable\"", "");
    let (mut serve, addr) = spawn_listening(&["serve", "--config", config.to_str().unwrap()]);
    let baseline = peak_rss(serve.id());
    // A gzip bomb: well under 1 MiB that decodes to 128 MiB of text (4x the limit).
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let chunk = b"{\"a\":\"bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\"},".repeat(4096);
    for _ in 0..(128 * 1024 * 1024 / chunk.len()) {
        gz.write_all(&chunk).unwrap();
    }
    let bomb = gz.finish().unwrap();
    let mut s = TcpStream::connect(&addr).unwrap();
    write!(s, "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-encoding: gzip\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", bomb.len()).unwrap();
    s.write_all(&bomb).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    assert!(out.starts_with(b"HTTP/1.1 200"));
    let peak = peak_rss(serve.id());
    serve.terminate();
    let o = custody(&["log", "search", "--dir", audit.to_str().unwrap(), "--json"]);
    let r: serde_json::Value = serde_json::from_str(stdout(&o).lines().next().unwrap()).unwrap();
    assert!(
        r["request"]["omitted"]
            .as_str()
            .unwrap()
            .contains("exceeds"),
        "{r}"
    );
    assert!(r["response"]["reassembly_stopped"].is_string(), "{r}");
    eprintln!(
        "peak RSS {} MiB (baseline {} MiB)",
        peak >> 20,
        baseline >> 20
    );
    assert!(peak < 256 << 20, "peak RSS {} MiB", peak >> 20);
}

#[test]
fn users_named_by_email_stay_distinct_and_are_found_by_their_clear_value() {
    let Setup {
        mut mock,
        mock_addr,
        dir: _dir,
        audit,
        config,
    } = setup();
    write_serve_config(&config, &audit, &mock_addr, "", "");
    let (mut serve, addr) = spawn_listening(&["serve", "--config", config.to_str().unwrap()]);
    for user in ["alice@example.com", "bob@example.com", "alice@example.com"] {
        let body = format!(
            r#"{{"model":"gpt-4o-mini","user":"{user}","messages":[{{"role":"user","content":"hi"}}]}}"#
        );
        assert!(http_post(&addr, "/v1/chat/completions", "", &body).starts_with("HTTP/1.1 200"));
    }
    // A second writer on a live trail is refused: it would fork the chain.
    let cfg = config.to_str().unwrap();
    let purge = [
        "log",
        "purge",
        "--config",
        cfg,
        "--user",
        "alice@example.com",
    ];
    let o = custody(&purge);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("another custody process"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    serve.terminate();
    mock.kill().unwrap();
    let _ = mock.wait();
    let d = audit.to_str().unwrap();
    data_subject_purge(&purge, d);
    let all = stdout(&custody(&["log", "search", "--dir", d, "--json"]));
    assert!(!all.contains("alice@example.com") && !all.contains("bob@example.com"));
    let users: std::collections::BTreeSet<String> = all
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["client"]["user"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(users.len(), 2, "{users:?}");
    assert!(
        users.iter().all(|u| u.starts_with("[EMAIL_ADDRESS:")),
        "{users:?}"
    );
    let o = custody(&[
        "log",
        "search",
        "--dir",
        d,
        "--json",
        "--user",
        "alice@example.com",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(stdout(&o).lines().count(), 2);
    // `log show` keeps the record's own order: schema, id, seq first.
    let first: serde_json::Value = serde_json::from_str(all.lines().next().unwrap()).unwrap();
    let shown = stdout(&custody(&[
        "log",
        "show",
        "--dir",
        d,
        first["id"].as_str().unwrap(),
    ]));
    let keys: Vec<&str> = shown
        .lines()
        .filter_map(|l| l.strip_prefix("  \"")?.split('"').next())
        .take(3)
        .collect();
    assert_eq!(keys, ["schema", "id", "seq"], "{shown}");
    // An error says its cause once.
    let o = custody(&["log", "search", "--dir", "/nonexistent-custody-dir"]);
    assert_eq!(
        String::from_utf8_lossy(&o.stderr)
            .matches("no audit directory here")
            .count(),
        1
    );
    // Without the key, the clear value cannot be turned into its stored form.
    let o = custody(&[
        "log",
        "search",
        "--dir",
        d,
        "--user",
        "alice@example.com",
        "--key-file",
        "/nonexistent",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("fingerprint key"));
}

/// `log purge --user`: the person's bodies leave the disk, their records and everyone
/// else's stay, the trail verifies and says so, and the clear value is written nowhere.
fn data_subject_purge(purge: &[&str], d: &str) {
    let o = custody(purge);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout(&o).contains("of 2 record(s)"), "{}", stdout(&o));
    let o = custody(&["log", "verify", "--dir", d]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout(&o).contains("purged by policy"), "{}", stdout(&o));
    let all = stdout(&custody(&["log", "search", "--dir", d, "--json"]));
    let bodies: Vec<bool> = all
        .lines()
        .map(|l| {
            !serde_json::from_str::<serde_json::Value>(l).unwrap()["request"]["body"].is_null()
        })
        .collect();
    assert_eq!(bodies.iter().filter(|b| **b).count(), 1, "{all}");
    for entry in std::fs::read_dir(d).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        let text = zstd::stream::decode_all(&bytes[..]).unwrap_or(bytes);
        assert!(!contains(&text, "alice@example.com"));
    }
    let events = stdout(&custody(&[
        "log", "search", "--dir", d, "--json", "--events",
    ]));
    let event = events
        .lines()
        .find(|l| l.contains("\"type\":\"purge\""))
        .unwrap();
    assert!(event.contains("\"reason\":\"data_subject\""), "{event}");
    assert!(event.contains("\"user\":\"[EMAIL_ADDRESS:"), "{event}");
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[test]
fn silent_connections_cannot_exhaust_file_descriptors() {
    let Setup {
        mut mock,
        mock_addr,
        dir,
        audit,
        config,
    } = setup();
    write_serve_config(
        &config,
        &audit,
        &mock_addr,
        "",
        "[limits]\nclient_timeout_secs = 2\n",
    );
    // Custody with 256 file descriptors, against 300 connections that never speak.
    let mut child = Command::new("prlimit")
        .args([
            "--nofile=256:256",
            BIN,
            "serve",
            "--config",
            config.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.path().join("stderr.log")).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let mut serve = Proc(child);
    let addr = line.trim().rsplit("http://").next().unwrap().to_owned();
    let mut silent: Vec<TcpStream> = (0..300)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    // A real client in the middle of it gets an answer or a prompt close, never a hang.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let chat = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
    let mut out = String::new();
    // Closed at accept, the write itself may already fail.
    let sent = write!(s, "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{chat}", chat.len());
    match sent.and_then(|()| s.read_to_string(&mut out)) {
        // Served, refused with a 503, or closed at accept (past the cap's overflow).
        Ok(_) => assert!(
            out.is_empty() || out.starts_with("HTTP/1.1 200") || out.starts_with("HTTP/1.1 503"),
            "{out}"
        ),
        Err(e) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ),
            "the client hung: {e}"
        ),
    }
    // The silent ones are closed by the first-request deadline...
    for c in &mut silent {
        c.set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        let mut b = [0u8; 16];
        assert!(matches!(c.read(&mut b), Ok(0) | Err(_)));
    }
    // ...and real clients are served.
    let ok = http_post(&addr, "/v1/chat/completions", "", chat);
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    serve.terminate();
    mock.kill().unwrap();
    let _ = mock.wait();
    let log = std::fs::read_to_string(dir.path().join("stderr.log")).unwrap();
    assert!(!log.contains("accept failed"), "{log}");
    assert!(
        log.contains("lowered"),
        "the cap follows the descriptor limit: {log}"
    );
}

/// A key pair in `dir/keys` and a `serve` config that signs with it; the keys' folder.
fn signed_config(dir: &Path, config: &Path, audit: &Path, mock_addr: &str) -> std::path::PathBuf {
    let keys = dir.join("keys");
    assert!(custody(&["keygen", "--out", keys.to_str().unwrap()])
        .status
        .success());
    let sign = format!("signing_key = \"{}\"", keys.join("custody.key").display());
    write_serve_config(config, audit, mock_addr, &sign, "");
    keys
}

/// `log prove` and `log verify --proof`: a record's proof and a consistency proof are
/// checked in a directory holding nothing but them and the public key; one changed
/// byte fails it.
#[test]
fn proofs_are_checked_with_the_public_key_alone() {
    let Setup {
        mock: _mock,
        mock_addr,
        dir,
        audit,
        config,
    } = setup();
    let keys = signed_config(dir.path(), &config, &audit, &mock_addr);
    let cfg = config.to_str().unwrap();
    let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"prove me"}]}"#;
    let (mut serve, addr) = spawn_listening(&["serve", "--config", cfg]);
    for _ in 0..3 {
        let r = http_post(&addr, "/v1/chat/completions", "", body);
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    }
    serve.terminate();
    let kept = std::fs::read_to_string(audit.join("checkpoints.log")).unwrap();
    let kept = kept.lines().last().unwrap().to_owned();
    let (mut serve, addr) = spawn_listening(&["serve", "--config", cfg]);
    assert!(http_post(&addr, "/v1/chat/completions", "", body).starts_with("HTTP/1.1 200"));
    serve.terminate();

    let d = audit.to_str().unwrap();
    let o = custody(&["log", "search", "--dir", d, "--json"]);
    let ids: Vec<String> = stdout(&o)
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 4);
    let elsewhere = tempfile::tempdir().unwrap();
    let proofs = elsewhere.path().join("proofs.jsonl");
    let mut args = vec!["log", "prove", "--dir", d, "-o", proofs.to_str().unwrap()];
    args.extend(ids.iter().map(String::as_str));
    let o = custody(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let earlier = elsewhere.path().join("kept-checkpoint.json");
    std::fs::write(&earlier, &kept).unwrap();
    let grown = elsewhere.path().join("consistency.jsonl");
    let o = custody(&[
        "log",
        "prove",
        "--dir",
        d,
        "--since-checkpoint",
        earlier.to_str().unwrap(),
        "-o",
        grown.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let pubkey = elsewhere.path().join("custody.pub");
    std::fs::copy(keys.join("custody.pub"), &pubkey).unwrap();
    drop(dir);

    let check = |file: &Path| {
        Command::new(BIN)
            .args([
                "log",
                "verify",
                "--proof",
                file.to_str().unwrap(),
                "--pubkey",
                pubkey.to_str().unwrap(),
            ])
            .current_dir(elsewhere.path())
            .output()
            .unwrap()
    };
    let o = check(&proofs);
    assert!(
        o.status.success(),
        "{}{}",
        stdout(&o),
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        stdout(&o).matches("ok: record").count(),
        4,
        "{}",
        stdout(&o)
    );
    assert!(stdout(&o).contains("does not prove"));
    let o = check(&grown);
    assert!(o.status.success(), "{}", stdout(&o));
    assert!(
        stdout(&o).contains("extends the trail of 4 records"),
        "{}",
        stdout(&o)
    );

    // One changed character in the record content of the second proof.
    let text = std::fs::read_to_string(&proofs).unwrap();
    let tampered = text.replacen("prove me", "prove mE", 2);
    std::fs::write(&proofs, tampered).unwrap();
    let o = check(&proofs);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert_eq!(stdout(&o).matches("FAILED").count(), 1, "{}", stdout(&o));
}

/// `log bundle` for one end user (an e-mail address, found by its pseudonym) over a
/// window, with another user's traffic interleaved across a restart; `log verify
/// --bundle` in a directory holding only the bundle and the public key; the archive
/// opens with the system's tar.
#[test]
fn a_bundle_for_one_user_is_checked_offline_and_a_changed_byte_fails_it() {
    let Setup {
        mock: _mock,
        mock_addr,
        dir,
        audit,
        config,
    } = setup();
    let keys = signed_config(dir.path(), &config, &audit, &mock_addr);
    let cfg = config.to_str().unwrap();
    let ask = |addr: &str, user: &str| {
        let body = format!(
            r#"{{"model":"gpt-4o-mini","user":"{user}","messages":[{{"role":"user","content":"hello from {user}"}}]}}"#
        );
        let r = http_post(addr, "/v1/chat/completions", "", &body);
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    };
    for _ in 0..2 {
        let (mut serve, addr) = spawn_listening(&["serve", "--config", cfg]);
        for _ in 0..2 {
            ask(&addr, "sam.lee@example.com");
            ask(&addr, "kim");
        }
        serve.terminate();
    }

    let elsewhere = tempfile::tempdir().unwrap();
    let out = elsewhere.path().join("sam.tar.zst");
    let o = custody(&[
        "log",
        "bundle",
        "--dir",
        audit.to_str().unwrap(),
        "--pubkey",
        keys.join("custody.pub").to_str().unwrap(),
        "--since",
        "1h",
        "--until",
        "2100-01-01T00:00:00Z",
        "--user",
        "sam.lee@example.com",
        "--requested-by",
        "ticket SEC-1",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout(&o).contains("bundle SHA-256: "));
    std::fs::copy(
        keys.join("custody.pub"),
        elsewhere.path().join("custody.pub"),
    )
    .unwrap();
    drop(dir);

    let check = || {
        Command::new(BIN)
            .args([
                "log",
                "verify",
                "--bundle",
                "sam.tar.zst",
                "--pubkey",
                "custody.pub",
            ])
            .current_dir(elsewhere.path())
            .output()
            .unwrap()
    };
    let o = check();
    let said = stdout(&o);
    assert!(
        o.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        said.contains("ok: 4 record(s) and 2 config event(s)"),
        "{said}"
    );
    assert!(said.contains("does not prove"), "{said}");
    // The clear address is nowhere in what the bundle says of its selection.
    assert!(!said.contains("sam.lee@example.com"), "{said}");

    // Any tar opens it; the report is there.
    let x = Command::new("tar")
        .args(["--zstd", "-xf", "sam.tar.zst"])
        .current_dir(elsewhere.path())
        .status()
        .unwrap();
    assert!(x.success());
    let report = std::fs::read_to_string(elsewhere.path().join("report.html")).unwrap();
    assert!(report.contains("ticket SEC-1"));

    let mut bytes = std::fs::read(&out).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x20;
    std::fs::write(&out, &bytes).unwrap();
    let o = check();
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(stdout(&o).contains("FAILED"), "{}", stdout(&o));
}
