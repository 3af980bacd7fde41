//! The console's pages: the API's reads ([`super::api`]), drawn as HTML.

use std::{sync::Arc, time::SystemTime};

use axum::{
    extract::{Path, Query, State},
    response::{IntoResponse, Response},
    Extension,
};
use custody_audit::review::tally;
use maud::html;
use serde_json::Value;

use super::{
    api::{self, ids, shown, AccessFilters},
    html::{self, page},
    ConsoleState, Filters, Refusal, Who,
};

/// The most lines one overview reads; past it the counts cover the newest part and say
/// so.
const OVERVIEW_MAX_LINES: u64 = 2_000_000;
const OVERVIEW_BUCKETS: usize = 48;

fn refused(who: &Who, e: Refusal, action: &'static str) -> Response {
    shown(
        (e.status, html::problem(who, e.status.as_u16(), &e.message)).into_response(),
        action,
        Vec::new(),
    )
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
pub struct Window {
    window: Option<String>,
}

const WINDOWS: [(&str, u64); 4] = [
    ("1h", 3600),
    ("24h", 86_400),
    ("7d", 7 * 86_400),
    ("30d", 30 * 86_400),
];

pub async fn overview(
    State(state): State<Arc<ConsoleState>>,
    Extension(who): Extension<Who>,
    Query(w): Query<Window>,
) -> Response {
    let name = w.window.as_deref().unwrap_or("24h");
    let Some(&(name, secs)) = WINDOWS.iter().find(|(n, _)| *n == name) else {
        return refused(
            &who,
            Refusal::bad_request("window: 1h, 24h, 7d or 30d"),
            "overview",
        );
    };
    let now_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let since_ms = now_ms - secs as i64 * 1000;
    let reviewer = who.reviewer.clone();
    let counted = state
        .read(move |s| {
            let bounds = tally::Bounds {
                routes: reviewer.routes.as_deref(),
                teams: reviewer.teams.as_deref(),
            };
            tally::tally(
                &s.sources(),
                (since_ms, now_ms + 1),
                OVERVIEW_BUCKETS,
                &bounds,
                OVERVIEW_MAX_LINES,
            )
            .map_err(Refusal::trail)
        })
        .await
        .and_then(|r| r);
    let t = match counted {
        Ok(t) => t,
        Err(e) => return refused(&who, e, "overview"),
    };
    let series = |f: fn(&tally::Bucket) -> u64| t.buckets.iter().map(f).collect::<Vec<_>>();
    let labels = (format!("{name} ago"), "now".to_owned());
    let labels = (labels.0.as_str(), labels.1.as_str());
    let events: Vec<Value> = t
        .events
        .iter()
        .filter_map(|e| serde_json::from_str(e).ok())
        .collect();
    let body = html! {
        nav.windows { "Window: " @for (n, _) in WINDOWS {
            @if n == name { strong { (n) } } @else { a href=(format!("/?window={n}")) { (n) } } " "
        } }
        @if t.partial { p.notice { "The window holds more than " (OVERVIEW_MAX_LINES) " lines: these counts cover its newest part." } }
        @if t.unreadable > 0 { p.problem { (t.unreadable) " line(s) could not be read: run the integrity check." } }
        div.charts {
            (html::bars("Exchanges", &series(|b| b.exchanges), labels, "exchanges"))
            (html::bars("Errors", &series(|b| b.errors), labels, "errors"))
            (html::bars("Blocked", &series(|b| b.blocked), labels, "blocked"))
            (html::bars("Flagged", &series(|b| b.flagged), labels, "flagged"))
            (html::bars("Redactions", &series(|b| b.redactions), labels, "redactions"))
        }
        h2 { "Redactions by entity" }
        @if t.entities.is_empty() { p.muted { "None in this window." } } @else {
            table.records { thead { tr { th { "entity" } th.num { "replaced" } } } tbody {
                @for (e, n) in &t.entities { tr {
                    td { a href=(format!("/search?{}", html::query(&[("entity", e.as_str()), ("since", name)]))) { mark.redacted { (e) } } }
                    td.num { (n) }
                } }
            } }
        }
        @if who.reviewer.routes.is_none() && who.reviewer.teams.is_none() {
            h2 { "Newest events" }
            @if events.is_empty() { p.muted { "No configuration change, gap, crash repair or retention in this window." } }
            @else { (html::events_table(&events)) }
        }
    };
    shown(
        page(&who, "Overview", body).into_response(),
        "overview",
        Vec::new(),
    )
}

pub async fn search(
    State(state): State<Arc<ConsoleState>>,
    Extension(who): Extension<Who>,
    Query(filters): Query<Filters>,
) -> Response {
    let found = api::search_page(&state, &who.reviewer, &filters).await;
    let results = match &found {
        Ok(p) => html! {
            @if p.unreadable > 0 { p.problem { (p.unreadable) " line(s) could not be read and were not searched: run the integrity check." } }
            @for u in &p.untrusted_indexes { p.problem { "Index not trusted, read in full: " (u) } }
            p.muted { (p.records.len()) " record(s) on this page, newest first." }
            @if filters.events.is_some() { (html::events_table(&p.records)) } @else { (html::records_table(&p.records)) }
            (html::pager(&filters, p.page, p.more))
        },
        Err(e) => html! { p.problem { (e.message) } },
    };
    let status = found.as_ref().err().map(|e| e.status);
    let records = found.as_ref().map(|p| ids(&p.records)).unwrap_or_default();
    let body = html! {
        (html::search_form(&filters, &who.reviewer))
        (results)
    };
    let mut r = page(&who, "Search", body).into_response();
    if let Some(s) = status {
        *r.status_mut() = s;
    }
    shown(r, "search", records)
}

pub async fn record(
    State(state): State<Arc<ConsoleState>>,
    Extension(who): Extension<Who>,
    Path(id): Path<String>,
) -> Response {
    match api::one_record(&state, &who.reviewer, id).await {
        Ok(r) => {
            let ids = ids(std::slice::from_ref(&r));
            shown(html::record(&who, &r).into_response(), "record", ids)
        }
        Err(e) => refused(&who, e, "record"),
    }
}

pub async fn conversation(
    State(state): State<Arc<ConsoleState>>,
    Extension(who): Extension<Who>,
    Path(id): Path<String>,
) -> Response {
    match api::conversation_of(&state, &who.reviewer, id.clone()).await {
        Ok((records, hidden)) => {
            let ids = ids(&records);
            shown(
                html::conversation(&who, &id, &records, hidden).into_response(),
                "conversation",
                ids,
            )
        }
        Err(e) => refused(&who, e, "conversation"),
    }
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
pub struct Run {
    run: Option<String>,
}

pub async fn integrity(
    State(state): State<Arc<ConsoleState>>,
    Extension(who): Extension<Who>,
    Query(run): Query<Run>,
) -> Response {
    let key = state.trusted_key.map(|k| hex::encode(k.as_bytes()));
    let intro = html! {
        p { "Checks every checksum, record hash, chain link, sequence number, seal and checkpoint of the trail, as "
            code { "custody log verify" } " does." }
        p { "Trusted key: " @if let Some(k) = &key { code { (k) } " (sealed segments are checked through their signed digests)" }
            @else { "none configured (" code { "[console] trusted_key" } "): signatures are reported, not trusted" } }
        form method="get" action="/integrity" { input type="hidden" name="run" value="1"; button type="submit" { "Verify now" } }
    };
    if run.run.is_none() {
        return shown(
            page(&who, "Integrity", intro).into_response(),
            "integrity",
            Vec::new(),
        );
    }
    let trails = match api::verify_all(&state).await {
        Ok(t) => t,
        Err(e) => return refused(&who, e, "verify"),
    };
    let body = html! {
        (intro)
        @for t in &trails {
            section.(if t["ok"] == true { "verified ok" } else { "verified broken" }) {
                h2 { (t["source"].as_str().unwrap_or("-")) ": " @if t["ok"] == true { "intact" } @else { "BROKEN" } }
                @if let Some(b) = t.get("broken") {
                    p.problem { "Broken at " code { (b["segment"].as_str().unwrap_or("-")) }
                        @if let Some(seq) = b["seq"].as_u64() { ", record seq " (seq) } ": " (b["what"].as_str().unwrap_or("-")) }
                }
                @if let Some(e) = t["error"].as_str() { p.problem { (e) } }
                @if t["ok"] == true {
                    table.facts {
                        tr { th { "segments" } td { (t["segments"]) } }
                        tr { th { "records" } td { (t["records"]) @if t["fast"] == true { " (records and events of sealed segments counted together)" } } }
                        tr { th { "events" } td { (t["events"]) } }
                        tr { th { "seals" } td { (t["seals"]) } }
                        tr { th { "checkpoints" } td { (t["checkpoints"])
                            @if let Some(c) = t.get("newest_checkpoint").filter(|c| !c.is_null()) {
                                "; the newest at " (c["time"].as_str().unwrap_or("-")) ", covering up to seq " (c["last_seq"])
                                @if let Some(k) = c["key"].as_str() { ", signed by " code { (k) } } @else { ", unsigned" }
                            } } }
                        tr { th { "newest record" } td { "seq " (t["last_seq"]) ", hash " code { (t["head"].as_str().unwrap_or("-")) } } }
                        tr { th { "not yet under a checkpoint" } td { (t["uncovered"]) " record(s)" } }
                        tr { th { "signing keys" } td { @for k in t["keys"].as_array().into_iter().flatten() { code { (k.as_str().unwrap_or("-")) } " " } } }
                        tr { th { "unsigned seals or checkpoints" } td { (t["unsigned"]) } }
                        tr { th { "signatures" } td { @if t["trusted"] == true { "checked against the trusted key" } @else { "not checked against a trusted key" } } }
                        tr { th { "crash repairs" } td { (t["recoveries"]) } }
                        tr { th { "segments removed by retention" } td { (t["retired"]) } }
                        tr { th { "took" } td { (format!("{:.2}", t["seconds"].as_f64().unwrap_or(0.0))) " s" } }
                    }
                }
            }
        }
    };
    shown(
        page(&who, "Integrity", body).into_response(),
        "verify",
        Vec::new(),
    )
}

pub async fn access(
    State(state): State<Arc<ConsoleState>>,
    Extension(who): Extension<Who>,
    Query(filters): Query<AccessFilters>,
) -> Response {
    let p = match api::access_page(&state, &who.reviewer, &filters).await {
        Ok(p) => p,
        Err(e) => return refused(&who, e, "access"),
    };
    let record = filters.record.clone().unwrap_or_default();
    let body = html! {
        p { "Every request to this console, newest first: who, what, which records, from where. "
            "The same trail answers " code { "custody log search --dir ACCESS_DIR --record ID" } "." }
        form.search method="get" action="/access" {
            label { span { "reads of record" } input type="text" name="record" value=(record) placeholder="record id"; }
            button type="submit" { "Show" }
        }
        table.records {
            thead { tr { th { "time" } th { "reviewer" } th { "action" } th { "status" } th { "asked" } th { "records" } th { "client" } } }
            tbody { @for e in &p.records {
                @let ev = &e["event"];
                tr {
                    td { (e["time"]["start"].as_str().unwrap_or("-")) }
                    td { (ev["reviewer"].as_str().unwrap_or("(none)")) }
                    td { (ev["action"].as_str().unwrap_or(ev["type"].as_str().unwrap_or("-"))) }
                    td { (ev["status"]) }
                    td { code { (html::marked(ev["asked"].as_str().unwrap_or("-"))) } }
                    td { @for id in ev["records"].as_array().into_iter().flatten().take(5) {
                        @let id = id.as_str().unwrap_or("-");
                        a href=(format!("/records/{id}")) { (id) } " "
                    } @if ev["records"].as_array().is_some_and(|a| a.len() > 5) { "…" } }
                    td { (ev["client"].as_str().unwrap_or("-")) }
                }
            } }
        }
        nav.pager {
            @if p.page > 1 { a href=(format!("/access?{}", html::query(&[("record", &record), ("page", &(p.page - 1).to_string())]))) { "← newer" } }
            span { "page " (p.page) }
            @if p.more { a href=(format!("/access?{}", html::query(&[("record", &record), ("page", &(p.page + 1).to_string())]))) { "older →" } }
        }
    };
    shown(
        page(&who, "Access trail", body).into_response(),
        "access",
        Vec::new(),
    )
}
