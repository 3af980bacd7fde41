//! The review console over real HTTP: who gets in, what each role and bound sees, and
//! that every request, refused ones included, is in the console's signed access trail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use custody_tests::console::{
    reviewed_trail, Reviewed, ALICE, ANSWER_WORDS, GROWTH_WORDS, MO, PAT, PROMPT_WORDS,
};
use serde_json::Value;

fn ids_of(v: &Value) -> Vec<String> {
    v["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Asserts that nothing a refused request got back names or holds a record.
fn holds_nothing(r: &Reviewed, body: &str) {
    for secret in [
        r.ids.first.as_str(),
        r.ids.growth.as_str(),
        PROMPT_WORDS,
        ANSWER_WORDS,
        GROWTH_WORDS,
    ] {
        assert!(!body.contains(secret), "{secret} in {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_valid_token_only_401_and_every_try_is_on_the_record() {
    let r = reviewed_trail().await;
    let garbage_cookie = "custody_session=0123456789abcdef";
    let tries: [(&str, Vec<(&str, &str)>); 6] = [
        ("/api/records", vec![]),
        (
            "/api/records",
            vec![("authorization", "Bearer not-a-token")],
        ),
        // A valid token with a stray character, and the right token as a cookie.
        (
            "/api/records",
            vec![("authorization", "Bearer tok-alice-content-0123456789x")],
        ),
        ("/api/verify", vec![("cookie", garbage_cookie)]),
        ("/", vec![]),
        (
            "/records/00000000-0000-0000-0000-000000000000",
            vec![("authorization", "Basic YWxpY2U6eA==")],
        ),
    ];
    for (path, headers) in &tries {
        let (parts, body) = r.get(path, headers).await;
        assert_eq!(parts.status, 401, "{path}: {body}");
        holds_nothing(&r, &body);
        // Refused or not, the security headers are there.
        let csp = parts.headers["content-security-policy"].to_str().unwrap();
        assert!(
            csp.contains("frame-ancestors 'none'") && !csp.contains("unsafe-inline"),
            "{csp}"
        );
        assert_eq!(parts.headers["referrer-policy"], "no-referrer");
    }
    // A page asked without a token gets the login form, and nothing else.
    let (_, page) = r.get("/search?team=growth", &[]).await;
    assert!(page.contains("name=\"token\""), "{page}");
    let (events, r) = r.stop().await;
    let refused: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"]["action"] == "refused")
        .collect();
    assert_eq!(refused.len(), tries.len() + 1, "{events:#?}");
    for e in &refused {
        assert!(e["event"]["reviewer"].is_null());
        assert_eq!(e["event"]["status"], 401);
        assert!(e["event"]["client"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"));
    }
    assert_eq!(refused[0]["event"]["asked"], "GET /api/records");
    // No token reaches the access trail, not even a wrong one.
    let raw = custody_tests::all_audit_bytes(&r.access_dir);
    assert!(!custody_tests::contains(&raw, "not-a-token"));
    assert!(!custody_tests::contains(&raw, ALICE));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_team_bound_reviewer_never_sees_another_teams_record() {
    let r = reviewed_trail().await;
    let (first, second, growth) = (
        &r.ids.first.clone(),
        &r.ids.second.clone(),
        &r.ids.growth.clone(),
    );
    // Search: only their team, even asked for the other one by name or by page.
    let all = r.json_as(PAT, "/api/records").await;
    assert_eq!(ids_of(&all), vec![second.clone(), first.clone()]);
    assert!(ids_of(&r.json_as(PAT, "/api/records?team=growth").await).is_empty());
    assert!(ids_of(
        &r.json_as(PAT, &format!("/api/records?text={}", "growth%20plan"))
            .await
    )
    .is_empty());
    // Record, conversation, pages and export: another team's record does not exist.
    for path in [
        format!("/api/records/{growth}"),
        format!("/api/conversations/{growth}"),
        format!("/records/{growth}"),
        format!("/conversations/{growth}"),
    ] {
        let (parts, body) = r.get_as(PAT, &path).await;
        assert_eq!(parts.status, 404, "{path}: {body}");
        assert!(!body.contains(GROWTH_WORDS), "{path}: {body}");
    }
    let (parts, export) = r.get_as(PAT, "/export").await;
    assert_eq!(parts.status, 200);
    assert_eq!(export.lines().count(), 2, "{export}");
    assert!(!export.contains(growth.as_str()) && !export.contains(GROWTH_WORDS));
    let (_, page) = r.get_as(PAT, "/search").await;
    assert!(page.contains(first.as_str()) && !page.contains(growth.as_str()));
    let (_, overview) = r.get_as(PAT, "/").await;
    assert!(
        !overview.contains("Newest events"),
        "no trail-wide events for a bound reviewer"
    );
    // The trail's events are not theirs either.
    let (parts, _) = r.get_as(PAT, "/api/records?events=1").await;
    assert_eq!(parts.status, 403);
    // Their own team's conversation, whole; alice (unbound) sees all three records.
    let conv = r
        .json_as(PAT, &format!("/api/conversations/{second}"))
        .await;
    assert_eq!(ids_of(&conv), vec![first.clone(), second.clone()]);
    assert_eq!(ids_of(&r.json_as(ALICE, "/api/records").await).len(), 3);
    let rec = r.json_as(ALICE, &format!("/api/records/{growth}")).await;
    assert!(rec.to_string().contains(GROWTH_WORDS));
    let (events, _) = r.stop().await;
    // What pat was shown is what the trail says pat was shown.
    let shown_to_pat: Vec<String> = events
        .iter()
        .filter(|e| e["event"]["reviewer"] == "pat")
        .flat_map(|e| e["event"]["records"].as_array().unwrap().clone())
        .map(|id| id.as_str().unwrap().to_owned())
        .collect();
    assert!(!shown_to_pat.is_empty());
    assert!(!shown_to_pat.contains(growth), "{shown_to_pat:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metadata_reviewer_gets_lengths_and_hashes_never_a_body() {
    let r = reviewed_trail().await;
    let (first, second) = (&r.ids.first, &r.ids.second);
    let mut everything = String::new();
    for path in [
        "/api/records".to_owned(),
        format!("/api/records/{first}"),
        format!("/api/conversations/{second}"),
        "/search".to_owned(),
        format!("/records/{first}"),
        format!("/conversations/{second}"),
        "/export".to_owned(),
        "/".to_owned(),
    ] {
        let (parts, body) = r.get_as(MO, &path).await;
        assert_eq!(parts.status, 200, "{path}: {body}");
        everything.push_str(&body);
    }
    for body_text in [
        PROMPT_WORDS,
        ANSWER_WORDS,
        GROWTH_WORDS,
        "bank assistant",
        "[EMAIL_ADDRESS]",
    ] {
        assert!(
            !everything.contains(body_text),
            "{body_text} reached a metadata reviewer"
        );
    }
    let rec = r.json_as(MO, &format!("/api/records/{first}")).await;
    let withheld = &rec["request"]["body_withheld"];
    assert!(withheld["bytes"].as_u64().unwrap() > 50, "{rec}");
    assert_eq!(withheld["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(
        rec["request"]["redactions"]["EMAIL_ADDRESS"], 1,
        "counts stay"
    );
    assert_eq!(rec["gen_ai"]["response"]["model"], "gpt-4o-2024-08-06");
    // Text search reads bodies: refused, and the refusal is on the record.
    let (parts, _) = r.get_as(MO, "/api/records?text=balance").await;
    assert_eq!(parts.status, 403);
    // The access trail is not theirs.
    let (parts, _) = r.get_as(MO, "/api/access").await;
    assert_eq!(parts.status, 403);
    // A content reviewer reads the (redacted) bodies.
    let full = r
        .json_as(ALICE, &format!("/api/records/{first}"))
        .await
        .to_string();
    assert!(full.contains(PROMPT_WORDS) && full.contains("[EMAIL_ADDRESS]"));
    assert!(!full.contains("jane.doe@example.com"));
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_read_is_in_a_signed_access_trail_that_answers_who_read_a_record() {
    let r = reviewed_trail().await;
    let first = r.ids.first.clone();
    r.json_as(ALICE, &format!("/api/records/{first}")).await;
    r.json_as(MO, &format!("/api/conversations/{first}")).await;
    r.json_as(ALICE, "/api/records?user=payments-app-user")
        .await;
    let verified = r.json_as(ALICE, "/api/verify").await;
    let trail = &verified["trails"][0];
    assert_eq!(trail["ok"], true, "{verified}");
    assert_eq!(trail["records"], 3);
    assert_eq!(trail["newest_checkpoint"]["last_seq"], 4, "{verified}");
    // A search for someone's e-mail address is recorded, but not the address.
    r.json_as(ALICE, "/api/records?text=jane.doe%40example.com")
        .await;
    // An end user stored pseudonymized is found by the clear value, as log search does.
    let by_user = r
        .json_as(ALICE, "/api/records?user=sam.lee%40example.com")
        .await;
    assert_eq!(ids_of(&by_user), vec![r.ids.growth.clone()]);
    let stored = by_user["records"][0]["client"]["end_user"]
        .as_str()
        .unwrap();
    assert!(stored.starts_with("[EMAIL_ADDRESS:"), "{stored}");
    let access = r
        .json_as(ALICE, &format!("/api/access?record={first}"))
        .await;
    assert_eq!(access["records"].as_array().unwrap().len(), 3, "{access}");
    let (events, r) = r.stop().await;
    let asked: Vec<(&str, &str, &str)> = events
        .iter()
        .map(|e| {
            let e = &e["event"];
            (
                e["reviewer"].as_str().unwrap_or("-"),
                e["action"].as_str().unwrap(),
                e["asked"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        asked,
        vec![
            (
                "alice",
                "record",
                format!("GET /api/records/{first}").as_str()
            ),
            (
                "mo",
                "conversation",
                format!("GET /api/conversations/{first}").as_str()
            ),
            ("alice", "search", "GET /api/records?user=payments-app-user"),
            ("alice", "verify", "GET /api/verify"),
            ("alice", "search", "GET /api/records?text=[EMAIL_ADDRESS]"),
            ("alice", "search", "GET /api/records?user=[EMAIL_ADDRESS]"),
            (
                "alice",
                "access",
                format!("GET /api/access?record={first}").as_str()
            ),
        ]
    );
    assert!(events[0]["event"]["records"] == serde_json::json!([first]));
    // The trail verifies against the console's key, and log search --record finds the reads.
    let key = custody_audit::signing::parse_public(&r.access_key).unwrap();
    let report =
        custody_audit::review::verify::verify_dir(&r.access_dir, Some(&key), |_, _, _| {}).unwrap();
    assert_eq!(
        report.events,
        events.len() as u64 + 1,
        "and the start's config event"
    );
    // What `custody log search --dir ACCESS_DIR --record ID` asks.
    let q = custody_audit::review::search::Query {
        record: Some(first.clone()),
        limit: 50,
        ..Default::default()
    };
    let found = custody_audit::review::search::search(
        &custody_audit::review::reader::DirSource(&r.access_dir),
        &q,
    )
    .unwrap()
    .values();
    let who: Vec<&str> = found
        .iter()
        .map(|e| e["event"]["reviewer"].as_str().unwrap())
        .collect();
    assert_eq!(
        who,
        vec!["alice", "mo", "alice"],
        "newest first: {found:#?}"
    );
}

/// A request with a body, as a browser's form posts it.
async fn post_form(
    r: &Reviewed,
    path: &str,
    cookie: &str,
    form: &str,
) -> (http::response::Parts, String) {
    let mut headers = vec![("content-type", "application/x-www-form-urlencoded")];
    if !cookie.is_empty() {
        headers.push(("cookie", cookie));
    }
    let (parts, body) = custody_tests::send(
        &custody_tests::client(),
        custody_tests::post(&r.url(path), &headers, form.to_owned()),
    )
    .await;
    (parts, String::from_utf8_lossy(&body).into_owned())
}

fn set_cookie<'a>(parts: &'a http::response::Parts, name: &str) -> &'a str {
    parts
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap())
        .find(|v| v.starts_with(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name} cookie in {parts:?}"))
}

fn cookie_value(set: &str) -> &str {
    set.split(';').next().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_login_form_needs_its_csrf_token_and_sessions_end_at_logout() {
    let r = reviewed_trail().await;
    let (parts, form) = r.get("/login", &[]).await;
    assert_eq!(parts.status, 200);
    let csrf_cookie = set_cookie(&parts, "custody_csrf");
    assert!(
        csrf_cookie.contains("HttpOnly") && csrf_cookie.contains("SameSite=Strict"),
        "{csrf_cookie}"
    );
    let csrf = cookie_value(csrf_cookie)
        .trim_start_matches("custody_csrf=")
        .to_owned();
    assert!(form.contains(&format!("name=\"csrf\" value=\"{csrf}\"")));
    let jar = format!("custody_csrf={csrf}");
    // From another site: no cookie, or a token that does not match it.
    let good = format!("token={ALICE}&csrf={csrf}");
    let (parts, _) = post_form(&r, "/login", "", &good).await;
    assert_eq!(parts.status, 403);
    let forged = format!("token={ALICE}&csrf={}", "0".repeat(64));
    let (parts, _) = post_form(&r, "/login", &jar, &forged).await;
    assert_eq!(parts.status, 403);
    // A wrong token: 401, no session.
    let (parts, _) = post_form(&r, "/login", &jar, &format!("token=nope&csrf={csrf}")).await;
    assert_eq!(parts.status, 401);
    assert!(parts
        .headers
        .get_all("set-cookie")
        .iter()
        .all(|c| !c.to_str().unwrap().starts_with("custody_session=")));
    // The right one: a session cookie, then the pages open.
    let (parts, _) = post_form(&r, "/login", &jar, &good).await;
    assert_eq!(parts.status, 303);
    let session = set_cookie(&parts, "custody_session");
    assert!(
        session.contains("HttpOnly")
            && session.contains("SameSite=Strict")
            && session.contains("Path=/"),
        "{session}"
    );
    assert!(
        !session.contains("Secure"),
        "plain HTTP here; TLS adds Secure"
    );
    let session = cookie_value(session).to_owned();
    let (parts, page) = r.get("/", &[("cookie", &session)]).await;
    assert_eq!(parts.status, 200, "{page}");
    let logout_csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_owned();
    // Logout needs the session's own token; then the session is over.
    let (parts, _) = post_form(&r, "/logout", &session, "csrf=wrong").await;
    assert_eq!(parts.status, 403);
    let (parts, _) = post_form(&r, "/logout", &session, &format!("csrf={logout_csrf}")).await;
    assert_eq!(parts.status, 303);
    let (parts, _) = r.get("/", &[("cookie", &session)]).await;
    assert_eq!(parts.status, 401);
    let (events, _) = r.stop().await;
    let actions: Vec<&str> = events
        .iter()
        .map(|e| e["event"]["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        vec![
            "login_form",
            "login_failed",
            "login_failed",
            "login_failed",
            "login",
            "overview",
            "logout",
            "logout",
            "refused"
        ]
    );
    assert_eq!(events[4]["event"]["reviewer"], "alice");
    assert_eq!(events[4]["event"]["role"], "content");
    assert!(
        events[1]["event"]["role"].is_null(),
        "a failed login names no one"
    );
    assert_eq!(events[6]["event"]["status"], 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_clear_errors_and_nothing_else() {
    let r = reviewed_trail().await;
    for (path, status) in [
        ("/api/records/..%2F..%2Fetc%2Fpasswd", 400),
        ("/api/records/%00", 400),
        (&*format!("/api/records/{}", "a".repeat(5000)), 400),
        ("/api/records?page=0", 400),
        ("/api/records?page=21", 400),
        ("/api/records?page=-1", 400),
        ("/api/records?status=999", 400),
        ("/api/records?since=yesterday-ish", 400),
        ("/api/records?severity=apocalyptic", 400),
        ("/api/records/00000000-0000-7000-8000-000000000000", 404),
        (
            "/api/conversations/00000000-0000-7000-8000-000000000000",
            404,
        ),
        ("/no/such/page", 404),
        ("/?window=1y", 400),
    ] {
        let (parts, body) = r.get_as(ALICE, path).await;
        assert_eq!(parts.status, status, "{path}: {body}");
        holds_nothing(&r, &body);
    }
    // A page's bad filter is a page saying so, not a crash.
    let (parts, page) = r.get_as(ALICE, "/search?status=abc").await;
    assert_eq!(parts.status, 400);
    assert!(page.contains("is not a status"), "{page}");
    let (events, _) = r.stop().await;
    assert_eq!(events.len(), 14, "each one on the record");
}
