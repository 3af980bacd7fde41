//! The console's HTML: server-rendered with maud (escaped by construction), no script,
//! one stylesheet served from the binary, charts drawn here as SVG.

use custody_audit::review::turns::{self, Part, Turn};
use custody_config::{Reviewer, Role};
use maud::{html, Markup, PreEscaped, DOCTYPE};
use serde_json::Value;

use super::Who;

const STYLE: &str = include_str!("style.css");

pub async fn stylesheet() -> impl axum::response::IntoResponse {
    (
        [
            (axum::http::header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (axum::http::header::CACHE_CONTROL, "max-age=3600"),
        ],
        STYLE,
    )
}

/// A query string from pairs, each value encoded.
pub fn query(pairs: &[(&str, &str)]) -> String {
    let mut s = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    s.finish()
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

fn show(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " · custody console" }
            link rel="stylesheet" href="/style.css";
        }
    }
}

/// A page with the console's frame: navigation, who is reading, logout.
pub fn page(who: &Who, title: &str, body: Markup) -> Markup {
    let r = &who.reviewer;
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body {
                header {
                    nav {
                        strong.brand { "custody" }
                        a href="/" { "Overview" }
                        a href="/search" { "Search" }
                        a href="/integrity" { "Integrity" }
                        @if r.role == Role::Content && r.audit { a href="/access" { "Access trail" } }
                        span.who {
                            (r.id) " · " (r.role.as_str())
                            @if let Some(t) = &r.teams { " · teams " (t.join(", ")) }
                            @if let Some(t) = &r.routes { " · routes " (t.join(", ")) }
                        }
                        @if let Some(csrf) = &who.csrf {
                            form.logout method="post" action="/logout" {
                                input type="hidden" name="csrf" value=(csrf);
                                button type="submit" { "Log out" }
                            }
                        }
                    }
                    p.notice { "Every page you open here is written to the console's access trail." }
                }
                main { h1 { (title) } (body) }
            }
        }
    }
}

pub fn login(csrf: &str, problem: Option<&str>) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head("Log in"))
            body.login {
                main {
                    h1 { "custody console" }
                    p { "Log in with your reviewer token. Every read is written to the access trail." }
                    @if let Some(p) = problem { p.problem role="alert" { (p) } }
                    form method="post" action="/login" {
                        input type="hidden" name="csrf" value=(csrf);
                        label for="token" { "Token" }
                        input #token type="password" name="token" autocomplete="current-password" required autofocus;
                        button type="submit" { "Log in" }
                    }
                }
            }
        }
    }
}

/// A refusal as a page.
pub fn problem(who: &Who, status: u16, message: &str) -> Markup {
    page(who, &format!("{status}"), html! { p.problem { (message) } })
}

/// Text with redaction markers (`[EMAIL_ADDRESS]`, `[EMAIL_ADDRESS:1a2b3c4d]`)
/// highlighted.
pub fn marked(text: &str) -> Markup {
    let mut out = String::with_capacity(text.len() + 32);
    let mut rest = text;
    while let Some(open) = rest.find('[') {
        let (before, from) = rest.split_at(open);
        out.push_str(&esc(before));
        match marker_len(from) {
            Some(n) => {
                out.push_str("<mark class=\"redacted\">");
                out.push_str(&esc(&from[..n]));
                out.push_str("</mark>");
                rest = &from[n..];
            }
            None => {
                out.push('[');
                rest = &from[1..];
            }
        }
    }
    out.push_str(&esc(rest));
    PreEscaped(out)
}

fn esc(s: &str) -> String {
    html! { (s) }.into_string()
}

/// The length of a redaction marker at the start of `s`: `[` an entity name
/// (`A-Z`, digits, `_`), an optional `:` and hex digits, `]`.
fn marker_len(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    let mut i = 1;
    while i < b.len() && (b[i].is_ascii_uppercase() || b[i].is_ascii_digit() || b[i] == b'_') {
        i += 1;
    }
    if i < 3 || !b[1].is_ascii_uppercase() {
        return None;
    }
    if b.get(i) == Some(&b':') {
        let start = i + 1;
        i = start;
        while i < b.len() && b[i].is_ascii_hexdigit() {
            i += 1;
        }
        if i == start {
            return None;
        }
    }
    (b.get(i) == Some(&b']')).then_some(i + 1)
}

/// A results table: one row per record, linking to it.
pub fn records_table(records: &[Value]) -> Markup {
    html! {
        table.records {
            thead { tr {
                th { "started" } th { "route" } th { "status" } th { "outcome" } th { "model" }
                th { "user" } th { "team" } th.num { "ms" } th { "policy" } th { "record" }
            } }
            tbody {
                @for r in records {
                    @let id = r["id"].as_str().unwrap_or("-");
                    @let model = str_at(r, &["gen_ai", "response", "model"]).or(str_at(r, &["gen_ai", "request", "model"])).unwrap_or("-");
                    tr.(r["outcome"].as_str().unwrap_or("")) {
                        td { (r["time"]["start"].as_str().unwrap_or("-")) }
                        td { (r["route"].as_str().unwrap_or("-")) }
                        td { (show(&r["http"]["status"])) }
                        td { (r["outcome"].as_str().unwrap_or("-")) }
                        td { (model) }
                        td { (marked(r["client"]["user"].as_str().unwrap_or("-"))) }
                        td { (r["client"]["team"].as_str().unwrap_or("-")) }
                        td.num { (r["time"]["duration_ms"].as_f64().map_or("-".into(), |d| format!("{d:.1}"))) }
                        td { @for d in r["policy"]["decisions"].as_array().into_iter().flatten() {
                            span.(format!("decision {}", d["severity"].as_str().unwrap_or(""))) { (d["name"].as_str().unwrap_or("?")) " " }
                        } }
                        td { a href=(format!("/records/{id}")) { (id) } }
                    }
                }
            }
        }
    }
}

/// Events as rows: time, type, and what they say.
pub fn events_table(events: &[Value]) -> Markup {
    html! {
        table.records {
            thead { tr { th { "time" } th { "event" } th { "seq" } th { "details" } } }
            tbody {
                @for e in events {
                    tr {
                        td { (e["time"]["start"].as_str().unwrap_or("-")) }
                        td { (e["event"]["type"].as_str().unwrap_or("-")) }
                        td { (show(&e["seq"])) }
                        td { code { (event_summary(&e["event"])) } }
                    }
                }
            }
        }
    }
}

fn event_summary(e: &Value) -> String {
    match e["type"].as_str() {
        Some("config") => format!(
            "{} version {} (was {}), {} change(s)",
            show(&e["reason"]),
            show(&e["version"]),
            show(&e["previous_version"]),
            e["changed"].as_array().map_or(0, Vec::len)
        ),
        Some("gap") => format!("{}: {}", show(&e["reason"]), e),
        Some("access") => format!(
            "{} {} {} → {} from {}",
            show(&e["reviewer"]),
            show(&e["action"]),
            show(&e["asked"]),
            show(&e["status"]),
            show(&e["client"])
        ),
        _ => {
            let mut t = e.to_string();
            if t.len() > 300 {
                let mut cut = 300;
                while !t.is_char_boundary(cut) {
                    cut -= 1;
                }
                t.truncate(cut);
                t.push('…');
            }
            t
        }
    }
}

fn turn_markup(t: &Turn) -> Markup {
    html! {
        div.(format!("turn {}", t.role)) {
            div.role { (t.role) }
            @for p in &t.parts {
                @match p {
                    Part::Text(s) => div.text { (marked(s)) },
                    Part::Reasoning(s) => details.reasoning { summary { "reasoning" } div.text { (marked(s)) } },
                    Part::ToolCall { name, arguments } => div.call {
                        span.label { "calls " code { (marked(name)) } }
                        pre { (marked(arguments)) }
                    },
                    Part::ToolResult { of, content } => div.result {
                        span.label { "result of " code { (marked(of)) } }
                        pre { (marked(content)) }
                    },
                    Part::Other(s) => pre.other { (marked(s)) },
                }
            }
        }
    }
}

/// A body as turns, or as it is stored when its shape is not a conversation; for a
/// `metadata` reviewer, what stands in for it.
fn body(side: &str, part: &Value, turns_of: fn(&Value) -> Vec<Turn>) -> Markup {
    if let Some(w) = part.get("body_withheld") {
        return html! {
            p.withheld { "The " (side) " body is withheld from metadata reviewers: "
                (show(&w["bytes"])) " bytes, SHA-256 " code { (show(&w["sha256"])) } "." }
        };
    }
    let Some(b) = part.get("body") else {
        return html! { p.muted { "No " (side) " body" @if let Some(o) = part["omitted"].as_str() { " (" (o) ")" } "." } };
    };
    let turns = turns_of(b);
    html! {
        @if turns.is_empty() {
            pre.other { (marked(&match b { Value::String(s) => s.clone(), other => serde_json::to_string_pretty(other).unwrap_or_default() })) }
        } @else {
            @for t in &turns { (turn_markup(t)) }
        }
    }
}

fn row(name: &str, value: Markup) -> Markup {
    html! { tr { th { (name) } td { (value) } } }
}

fn link_search(label: &str, key: &str, value: &str) -> Markup {
    html! { a href=(format!("/search?{}", query(&[(key, value)]))) title=(label) { (marked(value)) } }
}

/// The record page: who, when, what was asked and served, what it cost, what the
/// policies decided, the conversation, and the record as stored.
pub fn record(who: &Who, r: &Value) -> Markup {
    let id = r["id"].as_str().unwrap_or("-");
    let is_event = r["schema"].as_str() == Some(custody_audit::record::EVENT_SCHEMA);
    let g = &r["gen_ai"];
    let params: Vec<(String, String)> = g["request"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| *k != "model")
        .map(|(k, v)| (k.clone(), show(v)))
        .collect();
    let usage: Vec<(String, String)> = flatten(&g["usage"], "");
    let body_markup = html! {
        @if is_event {
            pre.other { (serde_json::to_string_pretty(&r["event"]).unwrap_or_default()) }
        } @else {
            table.facts {
                (row("started", html! { (show(&r["time"]["start"])) }))
                (row("duration", html! { (show(&r["time"]["duration_ms"])) " ms (head after " (show(&r["time"]["ttfb_ms"])) " ms, first byte " (show(&r["time"]["first_chunk_ms"])) " ms)" }))
                (row("route", html! { (show(&r["route"])) " · " (show(&g["provider"]["name"])) " · " (show(&g["operation"]["name"])) }))
                (row("request", html! { (show(&r["http"]["method"])) " " code { (marked(&show(&r["http"]["path"]))) } }))
                (row("model asked", html! { (show(&g["request"]["model"])) }))
                (row("model served", html! { (show(&g["response"]["model"])) @if let Some(f) = g["response"]["system_fingerprint"].as_str() { " (" (f) ")" } }))
                (row("outcome", html! { (show(&r["outcome"])) " · HTTP " (show(&r["http"]["status"])) @if let Some(e) = r["error"].as_str() { " · " (marked(e)) } }))
                (row("user", html! { @if let Some(u) = r["client"]["user"].as_str() { (link_search("records of this user", "user", u)) } @else { "-" } }))
                (row("team", html! { @if let Some(t) = r["client"]["team"].as_str() { (link_search("records of this team", "team", t)) } @else { "-" } }))
                (row("key", html! { @if let Some(k) = r["client"]["key_id"].as_str() { (link_search("records of this key", "key_id", k)) } @else { "-" } " from " (show(&r["client"]["addr"])) }))
                (row("parameters", html! { @for (k, v) in &params { span.param { (k) " = " (marked(v)) } " " } }))
                (row("usage", html! { @for (k, v) in &usage { span.param { (k) " = " (v) } " " } }))
                (row("finish", html! { (show(&g["response"]["finish_reasons"])) }))
                (row("trace", html! { @if let Some(t) = r["trace"]["id"].as_str() { (link_search("records of this trace", "trace_id", t)) } @else { "-" } }))
                (row("session", html! { @if let Some(s) = r["session"]["id"].as_str() { (link_search("records of this session", "session", s)) } @else { "-" } }))
                (row("prompt", html! { @if let Some(p) = r["prompt"]["hash"].as_str() { (link_search("every output of this prompt", "prompt_hash", p)) } @else { "-" } }))
                (row("conversation", html! {
                    a href=(format!("/conversations/{id}")) { "the whole conversation" }
                    @if let Some(p) = r["chain"]["conversation_parent"].as_str() { " · continues " a href=(format!("/records/{p}")) { (p) } }
                }))
                (row("config version", html! { @if let Some(v) = r["config"]["version"].as_str() {
                    @if who.reviewer.routes.is_none() && who.reviewer.teams.is_none() {
                        a href=(format!("/search?{}", query(&[("events", "1")]))) title="the trail's config events" { (v) }
                    } @else { (v) }
                } @else { "-" } }))
                (row("redactions", html! { @for (k, v) in r["redactions"].as_object().into_iter().flatten() { span.param { mark.redacted { (k) } " × " (show(v)) } " " } }))
            }
            @if let Some(d) = r["policy"]["decisions"].as_array().filter(|d| !d.is_empty()) {
                h2 { "Policy decisions" }
                table.records {
                    thead { tr { th { "rule" } th { "action" } th { "severity" } th { "mode" } th { "effect" } th { "error" } } }
                    tbody { @for x in d { tr {
                        td { (show(&x["name"])) } td { (show(&x["action"])) } td.(x["severity"].as_str().unwrap_or("")) { (show(&x["severity"])) }
                        td { (show(&x["mode"])) } td { (show(&x["effect"])) } td { (show(&x["error"])) }
                    } } }
                }
                p.muted { "Policy set " (show(&r["policy"]["version"])) }
            }
            h2 { "Conversation" }
            section.conversation {
                (body("request", &r["request"], turns::of_request))
                (body("response", &r["response"], turns::of_response))
            }
        }
        details.raw {
            summary { "The record as " (if who.reviewer.role == Role::Metadata { "you may see it (bodies withheld)" } else { "stored" }) }
            pre { (marked(&serde_json::to_string_pretty(r).unwrap_or_default())) }
        }
    };
    page(who, &format!("Record {id}"), body_markup)
}

/// `usage` as `input_tokens = 12` pairs, nested keys joined with dots.
fn flatten(v: &Value, prefix: &str) -> Vec<(String, String)> {
    match v {
        Value::Object(m) => m
            .iter()
            .flat_map(|(k, v)| {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(v, &key)
            })
            .collect(),
        Value::Null => Vec::new(),
        other => vec![(prefix.to_owned(), show(other))],
    }
}

/// The conversation page: each record's turns in order, the answer after its request.
pub fn conversation(who: &Who, id: &str, records: &[Value], hidden: usize) -> Markup {
    // Each request repeats the turns before it: show only those new since the exchange
    // before (its request and its answer).
    let mut seen = 0usize;
    let exchanges: Vec<(&Value, Vec<Turn>, Vec<Turn>)> = records
        .iter()
        .map(|r| {
            let mut request = r["request"]
                .get("body")
                .map(turns::of_request)
                .unwrap_or_default();
            let all = request.len();
            request.drain(..seen.min(all));
            seen = all + 1;
            let response = r["response"]
                .get("body")
                .map(turns::of_response)
                .unwrap_or_default();
            (r, request, response)
        })
        .collect();
    page(
        who,
        "Conversation",
        html! {
            p { "The conversation record " a href=(format!("/records/{id}")) { (id) } " belongs to: "
                (records.len()) " exchange(s), oldest first." }
            @if hidden > 0 { p.notice { (hidden) " exchange(s) of it are outside the routes or teams you may see and are not shown." } }
            @for (r, request, response) in &exchanges {
                @let rid = r["id"].as_str().unwrap_or("-");
                section.exchange {
                    h2 { a href=(format!("/records/{rid}")) { (r["time"]["start"].as_str().unwrap_or("-")) } " · " (show(&r["gen_ai"]["request"]["model"])) " · " (show(&r["outcome"])) }
                    @if let Some(w) = r["request"].get("body_withheld") {
                        p.withheld { "Bodies withheld: request " (show(&w["bytes"])) " bytes" @if let Some(x) = r["response"].get("body_withheld") { ", response " (show(&x["bytes"])) " bytes" } "." }
                    } @else {
                        @for t in request { (turn_markup(t)) }
                        @for t in response { (turn_markup(t)) }
                    }
                }
            }
        },
    )
}

/// The search form: every `custody log search` filter.
pub fn search_form(f: &super::Filters, reviewer: &Reviewer) -> Markup {
    let v = |o: &Option<String>| o.clone().unwrap_or_default();
    let field = |name: &'static str, label: &'static str, value: String, hint: &'static str| {
        html! { label { span { (label) } input type="text" name=(name) value=(value) placeholder=(hint); } }
    };
    html! {
        form.search method="get" action="/search" {
            (field("since", "since", v(&f.since), "1h, 2days or 2026-11-29T10:00:00Z"))
            (field("until", "until", v(&f.until), "RFC 3339 or an age"))
            (field("model", "model", v(&f.model), "prefix: gpt-4o"))
            (field("route", "route", v(&f.route), ""))
            (field("status", "status", v(&f.status), "429 or 5xx"))
            (field("outcome", "outcome", v(&f.outcome), "ok, blocked, upstream_error…"))
            (field("user", "user", v(&f.user), "as stored"))
            (field("team", "team", v(&f.team), ""))
            (field("key_id", "key id", v(&f.key_id), ""))
            (field("entity", "entity", v(&f.entity), "EMAIL_ADDRESS…"))
            (field("policy", "policy", v(&f.policy), "rule name"))
            (field("severity", "severity ≥", v(&f.severity), "low, medium, high, critical"))
            (field("session", "session", v(&f.session), ""))
            (field("trace_id", "trace id", v(&f.trace_id), ""))
            (field("prompt_hash", "prompt hash", v(&f.prompt_hash), ""))
            @if reviewer.role == Role::Content {
                (field("text", "text", v(&f.text), "in the redacted record"))
            }
            @if reviewer.routes.is_none() && reviewer.teams.is_none() {
                label.check { input type="checkbox" name="events" value="1" checked[f.events.is_some()]; span { "the trail's events instead" } }
            }
            button type="submit" { "Search" }
        }
    }
}

/// Links to the pages before and after.
pub fn pager(base: &super::Filters, page: usize, more: bool) -> Markup {
    let link = |p: usize| {
        let mut f = base.clone();
        f.page = Some(p.to_string());
        let pairs: Vec<(String, String)> = serde_json::to_value(&f)
            .ok()
            .and_then(|v| v.as_object().cloned())
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| v.as_str().map(|v| (k, v.to_owned())))
            .collect();
        let refs: Vec<(&str, &str)> = pairs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        format!("/search?{}", query(&refs))
    };
    html! {
        nav.pager {
            @if page > 1 { a rel="prev" href=(link(page - 1)) { "← newer" } }
            span { "page " (page) }
            @if more && (page + 1) * super::PAGE_SIZE <= super::MAX_RESULTS { a rel="next" href=(link(page + 1)) { "older →" } }
        }
    }
}

/// A bar chart of one series, as SVG (no script, no outside asset).
pub fn bars(title: &str, values: &[u64], labels: (&str, &str), class: &str) -> Markup {
    let (w, h) = (600.0_f64, 120.0_f64);
    let max = values.iter().copied().max().unwrap_or(0).max(1) as f64;
    let n = values.len().max(1) as f64;
    let bw = w / n;
    let total: u64 = values.iter().sum();
    html! {
        figure.chart {
            figcaption { (title) ": " strong { (total) } }
            svg viewBox=(format!("0 0 {w} {}", h + 16.0)) role="img" aria-label=(format!("{title}, {total} in all")) class=(class) {
                @for (i, v) in values.iter().enumerate() {
                    @let bh = (*v as f64 / max) * h;
                    rect x=(format!("{:.1}", i as f64 * bw + 0.5)) y=(format!("{:.1}", h - bh)) width=(format!("{:.1}", (bw - 1.0).max(0.5))) height=(format!("{bh:.1}")) {
                        title { (v) }
                    }
                }
                line x1="0" y1=(h) x2=(w) y2=(h) stroke="#999" {}
                text x="0" y=(h + 13.0) font-size="11" { (labels.0) }
                text x=(w) y=(h + 13.0) font-size="11" text-anchor="end" { (labels.1) }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_are_highlighted_and_everything_else_escaped() {
        let m = marked("mail [EMAIL_ADDRESS] or [EMAIL_ADDRESS:1a2b3c4d], not [x] nor [A] <b>")
            .into_string();
        assert_eq!(
            m,
            "mail <mark class=\"redacted\">[EMAIL_ADDRESS]</mark> or <mark class=\"redacted\">[EMAIL_ADDRESS:1a2b3c4d]</mark>, not [x] nor [A] &lt;b&gt;"
        );
        assert_eq!(
            marked("[[US_SSN]]").into_string(),
            "[<mark class=\"redacted\">[US_SSN]</mark>]"
        );
        assert_eq!(marked("[AB:]").into_string(), "[AB:]");
    }
}
