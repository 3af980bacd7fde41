//! `custody demo`: the whole path on loopback, with no API key.

use std::{ops::ControlFlow, path::PathBuf, process::ExitCode};

use anyhow::Context;
use bytes::Bytes;
use custody_audit::{review::reader, review::verify};
use custody_config::{Config, Provider, Route};
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};

const PROMPT: &str = "My email is jane.doe@example.com, card 4111 1111 1111 1111, SSN 123-45-6789. Summarise my account.";
/// A prompt that leaks a credential: the default `secret-in-prompt` policy flags it.
const LEAKY_PROMPT: &str =
    "ghp_0123456789abcdefghijABCDEFGHIJ012345 is my token: why does git push fail?";

pub async fn run(
    dir: Option<PathBuf>,
    console: Option<std::net::SocketAddr>,
) -> anyhow::Result<ExitCode> {
    let (dir, _temp) = match dir {
        Some(d) => (d, None),
        None => {
            let t = tempfile::tempdir().context("creating a temporary audit directory")?;
            (t.path().join("audit"), Some(t))
        }
    };
    let mock = custody_proxy::mock::spawn(([127, 0, 0, 1], 0).into())
        .await
        .context("starting the mock provider")?;
    println!("1. A mock OpenAI/Anthropic provider is listening on http://{mock}");

    let upstream = format!("http://{mock}")
        .parse()
        .map_err(|e: String| anyhow::anyhow!(e))?;
    let keys = dir.with_extension("keys");
    let (private, public) = if keys.join("demo.key").exists() {
        (keys.join("demo.key"), keys.join("demo.pub"))
    } else {
        custody_audit::signing::keygen(&keys, "demo").context("making a signing key")?
    };
    let mut config = Config::for_test(
        &dir,
        vec![Route {
            name: "openai".into(),
            prefix: "/v1/".into(),
            upstream,
            provider: Provider::Openai,
            strip_prefix: false,
            upstream_key_env: None,
        }],
    );
    config.audit.signing_key = Some(private);
    // The embedded default's policies: a newcomer sees them decide.
    let defaults = Config::embedded_default()?;
    config.policies = defaults.policies;
    config.policy_terms = defaults.policy_terms;
    let listener = tokio::net::TcpListener::bind(config.listen.addr).await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(custody_proxy::run(listener, config, async {
        let _ = stopped.await;
    }));
    println!(
        "2. custody is listening on http://{addr}, auditing into {}",
        dir.display()
    );

    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    for (n, stream, prompt) in [(3, false, PROMPT), (4, true, LEAKY_PROMPT)] {
        let body = serde_json::json!({
            "model": "gpt-4o-mini",
            "stream": stream,
            "stream_options": if stream { serde_json::json!({"include_usage": true}) } else { serde_json::Value::Null },
            "messages": [{"role": "user", "content": prompt}],
        });
        let req = http::Request::post(format!("http://{addr}/v1/chat/completions"))
            .header("content-type", "application/json")
            .header("authorization", "Bearer sk-demo-0123456789abcdefghijklmnop")
            .body(Full::new(Bytes::from(body.to_string())))?;
        let resp = client
            .request(req)
            .await
            .context("sending through custody")?;
        let status = resp.status();
        let text = resp.into_body().collect().await?.to_bytes();
        let kind = if stream { "streamed" } else { "plain" };
        let what = if stream {
            "a GitHub token"
        } else {
            "an e-mail, a card number and an SSN"
        };
        println!(
            "{n}. A {kind} chat request with {what}: HTTP {status}, {} bytes back unchanged",
            text.len()
        );
    }

    let _ = stop.send(());
    let summary = server.await??;
    println!(
        "5. custody shut down cleanly: {} records written, chain head seq {}\n",
        summary.writer.written,
        summary.writer.head.next_seq - 1
    );

    println!("The records, as stored (PII and the API key redacted; the key kept only as a fingerprint):");
    let mut decided = Vec::new();
    reader::for_each_line(&dir, |_, line| {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            for d in v["policy"]["decisions"].as_array().into_iter().flatten() {
                decided.push(format!(
                    "  record {}: policy `{}` ({} {}, {} mode): {}",
                    v["id"].as_str().unwrap_or("-"),
                    d["name"].as_str().unwrap_or("-"),
                    d["severity"].as_str().unwrap_or("-"),
                    d["action"].as_str().unwrap_or("-"),
                    d["mode"].as_str().unwrap_or("-"),
                    d["effect"].as_str().unwrap_or("-"),
                ));
            }
        }
        ControlFlow::Continue(())
    })?;
    println!(
        "\nPolicy decisions (the embedded default's rules; custody config default shows them):"
    );
    for line in &decided {
        println!("{line}");
    }
    let trusted = custody_audit::signing::load_public(&public)?;
    match verify::verify_dir(&dir, Some(&trusted), |_, _, _| {}) {
        Ok(r) => println!(
            "\ncustody log verify --pubkey {}: ok, {} records in {} segment(s), {} seal(s) and {} checkpoint(s) signed by that key, chain head {}",
            public.display(),
            r.records,
            r.segments,
            r.seals,
            r.checkpoints,
            r.head.unwrap_or_default()
        ),
        Err(e) => {
            println!("\ncustody log verify: {e}");
            return Ok(ExitCode::from(1));
        }
    }
    if _temp.is_none() {
        println!(
            "Try: custody log search --dir {} --text account",
            dir.display()
        );
    }
    match console {
        Some(listen) => review(&dir, &public, listen).await,
        None => Ok(ExitCode::SUCCESS),
    }
}

/// Serves the review console over the demo's trail until Ctrl-C, with a token made for
/// this run: a reviewer who reads content and the console's own access trail.
async fn review(
    dir: &std::path::Path,
    public: &std::path::Path,
    listen: std::net::SocketAddr,
) -> anyhow::Result<ExitCode> {
    use sha2::Digest;
    let mut token = [0u8; 24];
    getrandom::fill(&mut token).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let token = format!("demo-{}", hex::encode(token));
    let trusted = custody_audit::signing::load_public(public)?;
    let console = custody_config::Console {
        listen,
        tls: None,
        dir: Some(dir.to_owned()),
        from: None,
        options: Default::default(),
        access_dir: dir.with_extension("access"),
        signing_key: None,
        trusted_key: Some(hex::encode(trusted.as_bytes())),
    };
    let reviewers = vec![custody_config::Reviewer {
        id: "demo".into(),
        token_sha256: Some(hex::encode(sha2::Sha256::digest(token.as_bytes()))),
        token_env: None,
        role: custody_config::Role::Content,
        routes: None,
        teams: None,
        audit: true,
    }];
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| {
            format!("binding the console on {listen} (another port: --console-listen)")
        })?;
    println!(
        "\n6. The review console is on http://{}/ : log in with the token {token}\n   (a content reviewer who may also read the console's access trail, in {}). Ctrl-C stops it.",
        listener.local_addr()?,
        console.access_dir.display()
    );
    custody_proxy::console::run(&console, &reviewers, listener, super::shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}
