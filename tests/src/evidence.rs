//! A signed trail of several segments with two users' traffic interleaved, for the
//! evidence tests (proofs, bundles, the report in a browser).

use crate::{chat_upstream, client, openai_route, post, send, Custody, Stopped};
use std::time::{Duration, SystemTime};

use custody_audit::{
    review::{bundle::Selection, reader::DirSource},
    signing::{self, keygen, SignerKey},
};
use ed25519_dalek::VerifyingKey;

pub struct Trail {
    pub done: Stopped,
    pub keys: tempfile::TempDir,
    pub public: VerifyingKey,
}

impl Trail {
    pub fn dir(&self) -> std::path::PathBuf {
        self.done.audit_dir()
    }
    pub fn private(&self) -> std::path::PathBuf {
        self.keys.path().join("test.key")
    }

    /// The signing key itself, for tests that forge signed statements.
    pub fn signer(&self) -> SignerKey {
        SignerKey::load(&self.private()).unwrap()
    }

    /// Starts custody again on this trail (signing with its key, `tweak`ed), sends one
    /// exchange, and stops it.
    pub async fn grow(self, tweak: impl FnOnce(&mut custody_config::Config)) -> Trail {
        self.grow_at(Duration::ZERO, tweak).await
    }

    /// [`Trail::grow`] with the writer's clock `ahead` of the system's (retention).
    pub async fn grow_at(
        self,
        ahead: Duration,
        tweak: impl FnOnce(&mut custody_config::Config),
    ) -> Trail {
        let up = chat_upstream().await;
        let key = self.private();
        let gate = custody_audit::writer::WriterGate::default();
        gate.advance_clock(ahead);
        let mut content_retention = false;
        let custody = Custody::start_gated(
            self.done.dir,
            vec![openai_route(&up)],
            |c| {
                c.audit.signing_key = Some(key);
                tweak(c);
                content_retention = c.audit.content_retention_days.is_some();
            },
            gate,
        )
        .await;
        send(
            &client(),
            post(
                &custody.url("/v1/chat/completions"),
                &[],
                "{\"model\":\"m\"}",
            ),
        )
        .await;
        if content_retention {
            // Purges run beside the writer: the first pass is done when it says so.
            custody
                .until_metric("custody_audit_purges_total", |v| v >= 1.0)
                .await;
        }
        Trail {
            done: custody.stop().await,
            keys: self.keys,
            public: self.public,
        }
    }
}

/// A signed trail of `segments` segments (custody restarted between them), `per`
/// exchanges each, by users `alice` and `bob` in turn.
pub async fn signed_trail(segments: usize, per: usize) -> Trail {
    let keys = tempfile::tempdir().unwrap();
    let (private, public) = keygen(keys.path(), "test").unwrap();
    let up = chat_upstream().await;
    let sign = |c: &mut custody_config::Config| c.audit.signing_key = Some(private.clone());
    let mut custody = Custody::start_with(vec![openai_route(&up)], sign).await;
    let c = client();
    for s in 0..segments {
        if s > 0 {
            let stopped = custody.stop().await;
            custody = Custody::start_in(stopped.dir, vec![openai_route(&up)], sign).await;
        }
        for r in 0..per {
            let user = if r % 2 == 0 { "alice" } else { "bob" };
            send(
                &c,
                post(
                    &custody.url("/v1/chat/completions"),
                    &[],
                    format!("{{\"model\":\"m\",\"user\":\"{user}\",\"messages\":[{{\"role\":\"user\",\"content\":\"turn {s}-{r}\"}}]}}"),
                ),
            )
            .await;
        }
    }
    let done = custody.stop().await;
    let public = signing::load_public(&public).unwrap();
    Trail { done, keys, public }
}

/// A bundle of `user`'s records from an hour ago to a minute ahead, made as
/// `custody log bundle` makes it.
pub fn bundle_of(t: &Trail, user: &str) -> Vec<u8> {
    let now = SystemTime::now();
    let at = |t: SystemTime| humantime::format_rfc3339_millis(t).to_string();
    let selection = Selection {
        since: at(now - Duration::from_secs(3600)),
        until: at(now + Duration::from_secs(60)),
        user: Some(user.to_owned()),
        ..Selection::default()
    };
    let mut out = Vec::new();
    custody_proxy::console::report::make_bundle(
        &DirSource(t.dir()),
        &t.public,
        selection,
        "the evidence tests".into(),
        1000,
        &mut out,
    )
    .unwrap();
    out
}
