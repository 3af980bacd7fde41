//! `custody console`: the review console, a separate read-only process over a trail.
//! Every request passes one gate ([`guard`]): it is authenticated (a bearer token or a
//! login session), answered, and written as an `access` event to the console's own
//! trail, and only once that event is on disk does the answer leave. The reading is
//! the review side of `custody_audit` ([`custody_audit::review`]); this module is HTTP.
//!
//! [`api`] serves JSON, [`pages`] HTML (drawn by [`html`]); [`auth`] holds sessions and
//! the login form.

mod api;
mod auth;
mod html;
mod pages;
pub mod report;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use axum::{
    extract::{Request, State},
    http::{header, HeaderValue, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
    Router,
};
use custody_audit::{
    review::{
        access::Reviewers,
        reader::{DirSource, TrailSource},
        search::{Query, StatusFilter},
    },
    writer::ConfigHandle,
};
use custody_config::{Console, Reviewer, Role};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::ProxyError;

/// How long a read waits for its access event to reach the disk before it is refused:
/// a console whose access trail cannot be written serves nothing.
const ACCESS_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections open at once; more are closed.
const MAX_CONNECTIONS: usize = 256;
/// Reads of the trail at once: each holds up to [`MAX_RESULTS`] records in memory.
const MAX_READS: usize = 4;
/// The most records one search holds (page depth times page size): `docs/console.md`.
pub const MAX_RESULTS: usize = 1000;
/// Records on one page of results.
pub const PAGE_SIZE: usize = 50;

/// A trail as the console reads it (shipped sources block on the runtime: they are
/// read on blocking threads).
pub type Trail = Arc<dyn TrailSource + Send + Sync>;

/// What every handler reads.
pub struct ConsoleState {
    trails: Vec<Trail>,
    access_dir: PathBuf,
    reviewers: Reviewers,
    access: ConfigHandle,
    sessions: auth::Sessions,
    trusted_key: Option<custody_audit::signing::VerifyingKey>,
    /// Cookies carry `Secure` when the console serves TLS.
    secure: bool,
    reads: tokio::sync::Semaphore,
    /// Redacts what a reviewer asked before it goes into the access trail (a search
    /// for an e-mail address must not put it there in clear).
    redactor: custody_audit::redact::Redactor,
    /// The trail's fingerprint key, when the console can read it (`dir/fingerprint.key`):
    /// a user searched by a clear value holding an entity is found by its stored form,
    /// as `log search --user` does.
    identities: Option<custody_audit::fingerprint::Fingerprinter>,
}

impl ConsoleState {
    /// The state for `console`: its trail (a directory, or every source under `from`,
    /// read on `runtime`), its reviewers and keys. Everything that can fail on a bad
    /// configuration fails here, before the access trail is written to.
    fn prepare(
        console: &Console,
        reviewers: &[Reviewer],
        runtime: &tokio::runtime::Handle,
    ) -> Result<impl FnOnce(ConfigHandle) -> Self + Send + 'static, ProxyError> {
        let trails: Vec<Trail> = match (&console.dir, &console.from) {
            (Some(dir), _) => vec![Arc::new(DirSource(dir.clone()))],
            (None, Some(url)) => crate::remote::sources(url, &console.options, None, runtime)?
                .into_iter()
                .map(|s| Arc::new(s) as Trail)
                .collect(),
            (None, None) => {
                return Err(ProxyError::Key {
                    what: "[console]".into(),
                    reason: "needs `dir` or `from`".into(),
                })
            }
        };
        let trusted_key = console
            .trusted_key
            .as_deref()
            .map(|k| {
                custody_audit::signing::parse_public(k).ok_or_else(|| ProxyError::Key {
                    what: "console.trusted_key".into(),
                    reason: "is not an Ed25519 public key".into(),
                })
            })
            .transpose()?;
        let reviewers = Reviewers::new(reviewers).map_err(|e| ProxyError::Key {
            what: "[[reviewer]]".into(),
            reason: e.to_string(),
        })?;
        let (access_dir, secure) = (console.access_dir.clone(), console.tls.is_some());
        // Read, never created: the console writes nothing into the trail it reads.
        let identities = console
            .dir
            .as_ref()
            .map(|d| d.join("fingerprint.key"))
            .filter(|k| k.exists())
            .and_then(|k| match custody_audit::fingerprint::load_key(&k) {
                Ok(key) => Some(custody_audit::fingerprint::Fingerprinter::new(key)),
                Err(e) => {
                    tracing::warn!(error = %e, "the trail's fingerprint key does not load; users are searched by their stored form");
                    None
                }
            });
        Ok(move |access| Self {
            trails,
            access_dir,
            reviewers,
            access,
            sessions: auth::Sessions::default(),
            trusted_key,
            secure,
            reads: tokio::sync::Semaphore::new(MAX_READS),
            redactor: custody_audit::redact::Redactor::builtin(),
            identities,
        })
    }

    fn sources(&self) -> Vec<&dyn TrailSource> {
        self.trails
            .iter()
            .map(|t| t.as_ref() as &dyn TrailSource)
            .collect()
    }

    /// Runs `f` over the trails on a blocking thread, within the read limit.
    async fn read<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&ConsoleState) -> T + Send + 'static,
    ) -> Result<T, Refusal> {
        let _permit = self
            .reads
            .acquire()
            .await
            .map_err(|_| Refusal::unavailable("the console is stopping"))?;
        let state = self.clone();
        tokio::task::spawn_blocking(move || f(&state))
            .await
            .map_err(|_| Refusal::unavailable("the read failed"))
    }
}

/// The reviewer a request was authenticated as (a request extension).
#[derive(Clone)]
pub struct Who {
    pub reviewer: Arc<Reviewer>,
    /// A login session's CSRF token, asked back by its logout form.
    pub csrf: Option<String>,
}

/// What a response showed, for its access event (a response extension set by the
/// handler; absent: a page that showed no record).
#[derive(Clone, Default)]
pub struct Shown {
    pub action: &'static str,
    pub records: Vec<String>,
    /// A login: the reviewer it named, if the token was good.
    pub login: Option<Option<String>>,
}

/// A request refused, with why (never anything from the trail).
#[derive(Debug)]
pub struct Refusal {
    status: StatusCode,
    message: String,
}

impl Refusal {
    fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }
    fn not_found() -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: "no such record among those you may see".into(),
        }
    }
    fn forbidden(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::FORBIDDEN,
            message: message.into(),
        }
    }
    fn unavailable(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
        }
    }
    fn trail(e: custody_audit::AuditError) -> Self {
        match e {
            custody_audit::AuditError::NotFound(_) => Self::not_found(),
            other => {
                tracing::warn!(error = %other, "console read failed");
                Self {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    message: format!("the trail could not be read: {other}"),
                }
            }
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (self.status, axum::Json(json!({"error": self.message}))).into_response()
    }
}

/// The search filters of `custody log search`, as query parameters (`docs/console.md`).
#[derive(Debug, Default, Clone, serde::Deserialize, serde::Serialize)]
#[serde(default)]
pub struct Filters {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub severity: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entity: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub team: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_hash: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events: Option<String>,
    /// From 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub page: Option<String>,
}

impl Filters {
    /// Empty form fields are no filter.
    fn field(v: &Option<String>) -> Option<String> {
        v.as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    }

    /// The page asked for, from 1.
    fn page(&self) -> Result<usize, Refusal> {
        let Some(p) = Self::field(&self.page) else {
            return Ok(1);
        };
        let p: usize = p
            .parse()
            .ok()
            .filter(|p| *p >= 1)
            .ok_or_else(|| Refusal::bad_request("page: a whole number from 1"))?;
        if p * PAGE_SIZE > MAX_RESULTS {
            return Err(Refusal::bad_request(format!(
                "page: at most {} pages of {PAGE_SIZE}; narrow the search (since, until) to go further",
                MAX_RESULTS / PAGE_SIZE
            )));
        }
        Ok(p)
    }

    /// The query these filters ask, within `reviewer`'s bounds, holding the newest
    /// `limit` matches.
    fn query(
        &self,
        state: &ConsoleState,
        reviewer: &Reviewer,
        limit: usize,
    ) -> Result<Query, Refusal> {
        let f = Self::field;
        let when = |name: &str, v: &Option<String>| -> Result<Option<SystemTime>, Refusal> {
            f(v).map(|s| {
                humantime::parse_rfc3339_weak(&s)
                    .ok()
                    .or_else(|| {
                        humantime::parse_duration(&s)
                            .ok()
                            .and_then(|age| SystemTime::now().checked_sub(age))
                    })
                    .ok_or_else(|| {
                        Refusal::bad_request(format!(
                            "{name}: an RFC 3339 time (2026-11-29T10:00:00Z) or an age (1h, 2days)"
                        ))
                    })
            })
            .transpose()
        };
        let text = f(&self.text);
        if text.is_some() && reviewer.role == Role::Metadata {
            return Err(Refusal::forbidden(
                "text search reads the bodies: it is for content reviewers",
            ));
        }
        let events = f(&self.events).is_some_and(|e| e != "0" && e != "false");
        if events && (reviewer.routes.is_some() || reviewer.teams.is_some()) {
            return Err(Refusal::forbidden(
                "the trail's events are for reviewers not bound to routes or teams",
            ));
        }
        Ok(Query {
            since: when("since", &self.since)?,
            until: when("until", &self.until)?,
            model: f(&self.model),
            route: f(&self.route),
            status: f(&self.status)
                .map(|s| s.parse::<StatusFilter>().map_err(Refusal::bad_request))
                .transpose()?,
            key_id: f(&self.key_id),
            text,
            outcome: f(&self.outcome),
            policy: f(&self.policy),
            severity: f(&self.severity)
                .map(|s| {
                    serde_json::from_value(Value::String(s.to_ascii_lowercase())).map_err(|_| {
                        Refusal::bad_request("severity: low, medium, high or critical")
                    })
                })
                .transpose()?,
            entity: f(&self.entity),
            user: f(&self.user).map(|u| match &state.identities {
                // Stored pseudonymized when it holds an entity (an e-mail address).
                Some(fp) if !state.redactor.find(&u).is_empty() => {
                    custody_audit::assemble::identity_token(fp, &u)
                }
                _ => u,
            }),
            team: f(&self.team),
            prompt_hash: f(&self.prompt_hash),
            session: f(&self.session),
            trace: f(&self.trace_id),
            events,
            record: None,
            routes_in: reviewer.routes.clone(),
            teams_in: reviewer.teams.clone(),
            limit,
        })
    }
}

/// The console's routes, behind the gate.
pub fn router(state: Arc<ConsoleState>) -> Router {
    Router::new()
        .route("/", get(pages::overview))
        .route("/search", get(pages::search))
        .route("/records/{id}", get(pages::record))
        .route("/conversations/{id}", get(pages::conversation))
        .route("/integrity", get(pages::integrity))
        .route("/access", get(pages::access))
        .route("/export", get(api::export))
        .route("/login", get(auth::login_form).post(auth::login))
        .route("/logout", post(auth::logout))
        .route("/api/records", get(api::records))
        .route("/api/records/{id}", get(api::record))
        .route("/api/conversations/{id}", get(api::conversation))
        .route("/api/verify", get(api::verify))
        .route("/api/access", get(api::access))
        .fallback(|| async { Refusal::not_found() })
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .route("/style.css", get(html::stylesheet))
        // Browsers ask for it unprompted; it is not a read of anything.
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .layer(middleware::map_response(security_headers))
        .with_state(state)
}

/// Paths a request without a reviewer may reach (the login form); everything else
/// without one is refused.
fn public(path: &str) -> bool {
    path == "/login"
}

/// The gate: who is asking, the answer, and its access event on disk before it leaves.
async fn guard(State(state): State<Arc<ConsoleState>>, mut req: Request, next: Next) -> Response {
    let client = req
        .extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string());
    let asked = asked(&state, &req);
    let is_public = public(req.uri().path());
    let api = req.uri().path().starts_with("/api/");
    let who = auth::authenticate(&state, req.headers());
    let reviewer = who.as_ref().map(|w| w.reviewer.clone());
    let response = match who {
        Some(w) => {
            req.extensions_mut().insert(w);
            next.run(req).await
        }
        None if is_public => next.run(req).await,
        None if api => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            axum::Json(json!({"error": "a valid token is needed"})),
        )
            .into_response(),
        None => {
            let headers = req.headers().clone();
            auth::login_page(&state, &headers, StatusCode::UNAUTHORIZED, None)
        }
    };
    let shown = response.extensions().get::<Shown>().cloned();
    let (action, records, who) = match (&shown, &reviewer) {
        (
            Some(Shown {
                login: Some(named), ..
            }),
            _,
        ) => (
            if named.is_some() {
                "login"
            } else {
                "login_failed"
            },
            Vec::new(),
            named.clone(),
        ),
        (Some(s), Some(r)) => (s.action, s.records.clone(), Some(r.id.clone())),
        (None, Some(r)) => ("page", Vec::new(), Some(r.id.clone())),
        (_, None) if is_public => ("login_form", Vec::new(), None),
        (_, None) => ("refused", Vec::new(), None),
    };
    let event = json!({
        "type": "access",
        "reviewer": who,
        // A login names its reviewer only once it succeeds.
        "role": reviewer
            .as_ref()
            .map(|r| r.role)
            .or_else(|| who.as_deref().and_then(|id| state.reviewers.by_id(id)).map(|r| r.role))
            .map(|r| r.as_str()),
        "action": action,
        "asked": asked,
        "status": response.status().as_u16(),
        "records": records,
        "client": client,
    });
    let written = match state.access.event(event) {
        Ok(rx) => tokio::time::timeout(ACCESS_WRITE_TIMEOUT, rx).await,
        Err(e) => {
            tracing::error!(error = %e, "access trail stopped");
            return Refusal::unavailable("the access trail cannot be written; nothing is served")
                .into_response();
        }
    };
    if !matches!(written, Ok(Ok(()))) {
        tracing::error!("access event not written in time; the read is refused");
        return Refusal::unavailable("the access trail cannot be written; nothing is served")
            .into_response();
    }
    response
}

/// What a request asked, for its access event: method, path and query, decoded (so
/// that what a reviewer typed is what the trail says), bounded, and redacted (a search
/// term may be someone's e-mail address).
fn asked(state: &ConsoleState, req: &Request) -> String {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let uri = req.uri();
    let mut text = format!("{} {}", req.method(), decode(uri.path()));
    if let Some(q) = uri.query() {
        text.push('?');
        let pairs: Vec<String> = url::form_urlencoded::parse(q.as_bytes())
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        text.push_str(&pairs.join("&"));
    }
    let text: String = text.chars().take(2048).collect();
    let mut counts = custody_audit::redact::Counts::new();
    state.redactor.redact_str(&text, &mut counts).into_owned()
}

/// On every response: nothing inline runs, nothing frames the console, nothing leaks
/// where a reviewer came from, nothing is cached.
async fn security_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    let set = |h: &mut axum::http::HeaderMap, name, value: &'static str| {
        h.insert(name, HeaderValue::from_static(value));
    };
    set(
        h,
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    );
    set(h, header::REFERRER_POLICY, "no-referrer");
    set(h, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(h, header::X_FRAME_OPTIONS, "DENY");
    set(h, header::CACHE_CONTROL, "no-store");
    response
}

/// Serves the console on `listener` until `shutdown` completes. Bounded like the
/// proxy's listeners: a connection cap and a deadline for each request head.
pub async fn serve(
    listener: TcpListener,
    state: Arc<ConsoleState>,
    tls: Option<&custody_config::ListenTls>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ProxyError> {
    let tls = tls.map(crate::tls::TlsReloader::new).transpose()?;
    let watch = tls.clone().map(|t| tokio::spawn(t.watch()));
    let app = router(state);
    let cap = crate::connection::Cap::new(MAX_CONNECTIONS, 0);
    let head_timeout = Duration::from_secs(10);
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(head_timeout);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(_) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(slot) = cap.admit() else { continue };
        let app = app.clone();
        let builder = builder.clone();
        let acceptor = tls
            .as_ref()
            .map(|t| tokio_rustls::TlsAcceptor::from(t.current.load_full()));
        tokio::spawn(async move {
            let _slot = slot;
            let seen = crate::connection::Seen::default();
            let marker = seen.clone();
            let svc = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    marker.mark();
                    req.extensions_mut()
                        .insert(axum::extract::ConnectInfo(peer));
                    let app = app.clone();
                    async move {
                        use tower::ServiceExt;
                        app.oneshot(req.map(axum::body::Body::new)).await
                    }
                },
            );
            match acceptor {
                None => {
                    let conn = builder.serve_connection(TokioIo::new(stream), svc);
                    let _ = crate::connection::serve_unless_silent(conn, seen, head_timeout).await;
                }
                Some(acceptor) => {
                    let Ok(Ok(stream)) =
                        tokio::time::timeout(head_timeout, acceptor.accept(stream)).await
                    else {
                        return;
                    };
                    let conn = builder.serve_connection(TokioIo::new(stream), svc);
                    let _ = crate::connection::serve_unless_silent(conn, seen, head_timeout).await;
                }
            }
        });
    }
    if let Some(w) = watch {
        w.abort();
    }
    Ok(())
}

/// Runs a console on `listener` until `shutdown`: starts the access trail's writer,
/// serves, then closes the trail (sealed and signed) before returning.
pub async fn run(
    console: &Console,
    reviewers: &[Reviewer],
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ProxyError> {
    let joined = |e: tokio::task::JoinError| ProxyError::Io {
        what: "the console's start".into(),
        source: std::io::Error::other(e.to_string()),
    };
    // Listing shipped sources blocks on the runtime: not on one of its threads.
    let (c, r, runtime) = (
        console.clone(),
        reviewers.to_vec(),
        tokio::runtime::Handle::current(),
    );
    let build = tokio::task::spawn_blocking(move || ConsoleState::prepare(&c, &r, &runtime))
        .await
        .map_err(joined)??;
    let config = custody_config::console::access_config(console, reviewers);
    let writer = tokio::task::spawn_blocking(move || custody_audit::AuditWriter::start(&config))
        .await
        .map_err(joined)??;
    let state = Arc::new(build(writer.config()));
    let served = serve(listener, state, console.tls.as_ref(), shutdown).await;
    tokio::task::spawn_blocking(move || writer.shutdown())
        .await
        .map_err(joined)??;
    served
}
