//! A trail with two teams' conversations and a review console over it, in process on
//! `127.0.0.1:0`, with three reviewers: `alice` (content, may read the access trail),
//! `mo` (metadata) and `pat` (content, team `payments` only).

use std::{net::SocketAddr, path::PathBuf};

use bytes::Bytes;
use custody_config::{Console, Reviewer, Role, VirtualKey};
use http::Request;
use http_body_util::Full;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::{sync::oneshot, task::JoinHandle};

use crate::{client, openai_route, post, respond, send, Custody, MockUpstream, Stopped};

pub const ALICE: &str = "tok-alice-content-0123456789";
pub const MO: &str = "tok-mo-metadata-0123456789";
pub const PAT: &str = "tok-pat-payments-0123456789";

/// Words that appear only in bodies: a `metadata` reviewer must never receive them.
pub const PROMPT_WORDS: &str = "what is my balance";
pub const ANSWER_WORDS: &str = "Your balance is fine";
/// Only in the `growth` team's prompt: `pat` must never receive it.
pub const GROWTH_WORDS: &str = "growth plan for next quarter";

/// The end user the growth request names.
pub const END_USER: &str = "sam.lee@example.com";

const PAYMENTS_KEY: &str = "vk-payments-0123456789abcdef";
const GROWTH_KEY: &str = "vk-growth-0123456789abcdef";

fn reviewer(id: &str, token: &str, role: Role) -> Reviewer {
    Reviewer {
        id: id.into(),
        token_sha256: Some(hex::encode(Sha256::digest(token.as_bytes()))),
        token_env: None,
        role,
        routes: None,
        teams: None,
        audit: false,
    }
}

fn vkey(id: &str, key: &str, team: &str) -> VirtualKey {
    VirtualKey {
        id: id.into(),
        user: Some(format!("{id}-user")),
        team: Some(team.into()),
        key_sha256: Some(hex::encode(Sha256::digest(key.as_bytes()))),
        key_env: None,
        routes: None,
        models: None,
        upstream_key_env: Some("CARGO_PKG_NAME".into()),
    }
}

/// The records the trail holds.
pub struct Ids {
    /// `payments`: the first turn of a conversation, and its continuation.
    pub first: String,
    pub second: String,
    /// `growth`: one exchange.
    pub growth: String,
}

pub struct Reviewed {
    pub console: Running,
    pub ids: Ids,
    pub trail: Stopped,
    pub access_dir: PathBuf,
    /// The public key that signs the access trail (hex).
    pub access_key: String,
    _keys: tempfile::TempDir,
}

/// Records a trail through custody, then starts a console over it.
pub async fn reviewed_trail() -> Reviewed {
    reviewed_trail_with(|_| {}).await
}

/// [`reviewed_trail`], with the console's configuration changed by `tweak`.
pub async fn reviewed_trail_with(tweak: impl FnOnce(&mut Console)) -> Reviewed {
    let up = MockUpstream::start(|_, _| {
        let body = json!({"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-2024-08-06",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("{ANSWER_WORDS}, Jane.")}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 6, "total_tokens": 26}});
        respond(200, &[("content-type", "application/json")], body.to_string())
    })
    .await;
    let custody = Custody::start_with(vec![openai_route(&up)], |c| {
        c.keys = vec![
            vkey("payments-app", PAYMENTS_KEY, "payments"),
            vkey("growth-app", GROWTH_KEY, "growth"),
        ];
    })
    .await;
    let first_messages = json!([
        {"role": "system", "content": "You are a bank assistant."},
        {"role": "user", "content": format!("My email is jane.doe@example.com; {PROMPT_WORDS}?")},
    ]);
    let mut second_messages = first_messages.as_array().unwrap().clone();
    second_messages.push(json!({"role": "assistant", "content": format!("{ANSWER_WORDS}, Jane.")}));
    second_messages.push(json!({"role": "user", "content": "Thanks. Please call me back."}));
    let growth_messages =
        json!([{"role": "user", "content": format!("Draft our {GROWTH_WORDS}.")}]);
    for (key, messages) in [
        (PAYMENTS_KEY, first_messages),
        (PAYMENTS_KEY, Value::Array(second_messages)),
        (GROWTH_KEY, growth_messages),
    ] {
        let mut body = json!({"model": "gpt-4o", "messages": messages});
        if key == GROWTH_KEY {
            // An end user named by an e-mail address: stored pseudonymized.
            body["user"] = json!(END_USER);
        }
        let body = body.to_string();
        let auth = format!("Bearer {key}");
        let (parts, _) = send(
            &client(),
            post(
                &custody.url("/v1/chat/completions"),
                &[
                    ("authorization", &auth),
                    ("content-type", "application/json"),
                ],
                body,
            ),
        )
        .await;
        assert_eq!(parts.status, 200);
    }
    let trail = custody.stop().await;
    assert_eq!(trail.records.len(), 3);
    let id = |i: usize| trail.records[i]["id"].as_str().unwrap().to_owned();
    let ids = Ids {
        first: id(0),
        second: id(1),
        growth: id(2),
    };
    assert_eq!(
        trail.records[1]["chain"]["conversation_parent"], ids.first,
        "the second turn continues the first"
    );

    let keys = tempfile::tempdir().unwrap();
    let (private, public) = custody_audit::signing::keygen(keys.path(), "console").unwrap();
    let access_key = hex::encode(
        custody_audit::signing::load_public(&public)
            .unwrap()
            .as_bytes(),
    );
    let access_dir = trail.dir.path().join("access");
    let console = Console {
        listen: "127.0.0.1:0".parse().unwrap(),
        tls: None,
        dir: Some(trail.audit_dir()),
        from: None,
        options: Default::default(),
        access_dir: access_dir.clone(),
        signing_key: Some(private),
        trusted_key: None,
    };
    let mut console = console;
    tweak(&mut console);
    let mut alice = reviewer("alice", ALICE, Role::Content);
    alice.audit = true;
    let mut pat = reviewer("pat", PAT, Role::Content);
    pat.teams = Some(vec!["payments".into()]);
    let reviewers = vec![alice, reviewer("mo", MO, Role::Metadata), pat];
    custody_config::console::check(&console, &reviewers).unwrap();
    Reviewed {
        console: Running::start(console, reviewers).await,
        ids,
        trail,
        access_dir,
        access_key,
        _keys: keys,
    }
}

/// A console running in process on `127.0.0.1:0`.
pub struct Running {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), custody_proxy::ProxyError>>,
}

impl Running {
    pub async fn start(console: Console, reviewers: Vec<Reviewer>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            custody_proxy::console::run(&console, &reviewers, listener, async {
                let _ = stopped.await;
            })
            .await
        });
        Self {
            addr,
            stop: Some(stop),
            task,
        }
    }

    /// Stops it; its access trail is sealed and signed when this returns.
    pub async fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        (&mut self.task).await.unwrap().unwrap();
    }
}

impl Reviewed {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.console.addr, path)
    }

    /// GET `path` with these headers: status, headers, body as text.
    pub async fn get(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (http::response::Parts, String) {
        let mut b = Request::get(self.url(path));
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let (parts, body) = send(&client(), b.body(Full::new(Bytes::new())).unwrap()).await;
        (parts, String::from_utf8_lossy(&body).into_owned())
    }

    /// GET `path` as the reviewer holding `token` (the API's bearer form).
    pub async fn get_as(&self, token: &str, path: &str) -> (http::response::Parts, String) {
        let auth = format!("Bearer {token}");
        self.get(path, &[("authorization", &auth)]).await
    }

    /// [`Self::get_as`] on a JSON endpoint, expecting 200.
    pub async fn json_as(&self, token: &str, path: &str) -> Value {
        let (parts, body) = self.get_as(token, path).await;
        assert_eq!(parts.status, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    /// Stops the console (its access trail sealed and signed) and returns that trail's
    /// access events, oldest first.
    pub async fn stop(mut self) -> (Vec<Value>, Self) {
        self.console.stop().await;
        let events = crate::trail(&self.access_dir)
            .into_iter()
            .filter(|e| e["event"]["type"] == "access")
            .collect();
        (events, self)
    }
}
