//! Who is asking: a bearer token (the API), or a session cookie set by the login form
//! (pages). Tokens are checked by [`custody_audit::review::access::Reviewers`] in
//! constant time; sessions are random, held in memory by their SHA-256, and end after
//! [`SESSION_LIFETIME`], at logout, or when the console restarts.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    extract::State,
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Redirect, Response},
    Extension, Form,
};
use custody_config::Reviewer;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{html, ConsoleState, Shown, Who};

/// How long a login lasts.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(8 * 3600);
/// Sessions held at once; a login past it is refused until some expire.
const MAX_SESSIONS: usize = 10_000;
pub const SESSION_COOKIE: &str = "custody_session";
const CSRF_COOKIE: &str = "custody_csrf";

struct Session {
    reviewer: Arc<Reviewer>,
    expires: Instant,
    /// Asked back by the logout form.
    csrf: String,
}

#[derive(Default)]
pub struct Sessions(Mutex<HashMap<[u8; 32], Session>>);

impl Sessions {
    fn get(&self, id: &str) -> Option<(Arc<Reviewer>, String)> {
        let key: [u8; 32] = Sha256::digest(id.as_bytes()).into();
        let map = self.0.lock().ok()?;
        map.get(&key)
            .filter(|s| s.expires > Instant::now())
            .map(|s| (s.reviewer.clone(), s.csrf.clone()))
    }

    /// A new session for `reviewer`: its cookie value, or `None` when full.
    fn start(&self, reviewer: Arc<Reviewer>) -> Option<String> {
        let id = random_token()?;
        let csrf = random_token()?;
        let mut map = self.0.lock().ok()?;
        if map.len() >= MAX_SESSIONS {
            let now = Instant::now();
            map.retain(|_, s| s.expires > now);
            if map.len() >= MAX_SESSIONS {
                return None;
            }
        }
        map.insert(
            Sha256::digest(id.as_bytes()).into(),
            Session {
                reviewer,
                expires: Instant::now() + SESSION_LIFETIME,
                csrf,
            },
        );
        Some(id)
    }

    fn end(&self, id: &str) {
        let key: [u8; 32] = Sha256::digest(id.as_bytes()).into();
        if let Ok(mut map) = self.0.lock() {
            map.remove(&key);
        }
    }
}

fn random_token() -> Option<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).ok()?;
    Some(hex::encode(bytes))
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The reviewer a request is from: its bearer token, else its session. A request that
/// sends a token that is not valid is refused, whatever cookie it also holds.
pub fn authenticate(state: &ConsoleState, headers: &HeaderMap) -> Option<Who> {
    if let Some(auth) = headers.get(header::AUTHORIZATION) {
        let token = auth.to_str().ok()?.strip_prefix("Bearer ")?.trim();
        let r = state.reviewers.authenticate(token)?;
        return Some(Who {
            reviewer: Arc::new(r.clone()),
            csrf: None,
        });
    }
    let (reviewer, csrf) = state.sessions.get(cookie(headers, SESSION_COOKIE)?)?;
    Some(Who {
        reviewer,
        csrf: Some(csrf),
    })
}

fn set_cookie(state: &ConsoleState, name: &str, value: &str, path: &str, max_age: u64) -> String {
    format!(
        "{name}={value}; Path={path}; Max-Age={max_age}; HttpOnly; SameSite=Strict{}",
        if state.secure { "; Secure" } else { "" }
    )
}

/// The login form, with a CSRF token in it and in a cookie (double submit). A token the
/// browser already holds is kept: another tab, or a request for an icon, must not
/// invalidate the form on screen.
pub fn login_page(
    state: &ConsoleState,
    headers: &HeaderMap,
    status: StatusCode,
    problem: Option<&str>,
) -> Response {
    let held = cookie(headers, CSRF_COOKIE)
        .filter(|c| c.len() == 64 && c.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_owned);
    let Some(csrf) = held.or_else(random_token) else {
        return (StatusCode::SERVICE_UNAVAILABLE, "no randomness").into_response();
    };
    (
        status,
        [(
            header::SET_COOKIE,
            set_cookie(state, CSRF_COOKIE, &csrf, "/login", 3600),
        )],
        html::login(&csrf, problem),
    )
        .into_response()
}

pub async fn login_form(State(state): State<Arc<ConsoleState>>, headers: HeaderMap) -> Response {
    login_page(&state, &headers, StatusCode::OK, None)
}

#[derive(serde::Deserialize)]
pub struct LoginForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    csrf: String,
}

pub async fn login(
    State(state): State<Arc<ConsoleState>>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    let expected = cookie(&headers, CSRF_COOKIE).unwrap_or("");
    let csrf_ok =
        !expected.is_empty() && bool::from(expected.as_bytes().ct_eq(form.csrf.as_bytes()));
    let mut response = if !csrf_ok {
        login_page(
            &state,
            &headers,
            StatusCode::FORBIDDEN,
            Some("The form had expired or did not come from this console. Try again."),
        )
    } else {
        match state.reviewers.authenticate(form.token.trim()) {
            None => login_page(
                &state,
                &headers,
                StatusCode::UNAUTHORIZED,
                Some("That token is not valid."),
            ),
            Some(r) => match state.sessions.start(Arc::new(r.clone())) {
                None => login_page(
                    &state,
                    &headers,
                    StatusCode::SERVICE_UNAVAILABLE,
                    Some("Too many sessions are open; try again later."),
                ),
                Some(id) => {
                    let mut ok = Redirect::to("/").into_response();
                    let h = ok.headers_mut();
                    let lifetime = SESSION_LIFETIME.as_secs();
                    for c in [
                        set_cookie(&state, SESSION_COOKIE, &id, "/", lifetime),
                        set_cookie(&state, CSRF_COOKIE, "", "/login", 0),
                    ] {
                        if let Ok(v) = c.parse() {
                            h.append(header::SET_COOKIE, v);
                        }
                    }
                    ok.extensions_mut().insert(Shown {
                        action: "login",
                        login: Some(Some(r.id.clone())),
                        ..Shown::default()
                    });
                    return ok;
                }
            },
        }
    };
    response.extensions_mut().insert(Shown {
        action: "login_failed",
        login: Some(None),
        ..Shown::default()
    });
    response
}

#[derive(serde::Deserialize)]
pub struct LogoutForm {
    #[serde(default)]
    csrf: String,
}

pub async fn logout(
    State(state): State<Arc<ConsoleState>>,
    Extension(who): Extension<Who>,
    headers: HeaderMap,
    Form(form): Form<LogoutForm>,
) -> Response {
    let ok = who
        .csrf
        .as_deref()
        .is_some_and(|c| bool::from(c.as_bytes().ct_eq(form.csrf.as_bytes())));
    if !ok {
        let mut r = super::Refusal::forbidden("the logout form did not come from this console")
            .into_response();
        r.extensions_mut().insert(Shown {
            action: "logout",
            ..Shown::default()
        });
        return r;
    }
    if let Some(id) = cookie(&headers, SESSION_COOKIE) {
        state.sessions.end(id);
    }
    let mut r = Redirect::to("/login").into_response();
    if let Ok(v) = set_cookie(&state, SESSION_COOKIE, "", "/", 0).parse() {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r.extensions_mut().insert(Shown {
        action: "logout",
        ..Shown::default()
    });
    r
}
