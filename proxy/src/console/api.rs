//! What the console reads, and the JSON API over it (`/api/...`). The pages call the
//! same reads: one authorization, one access record, two renderings.

use std::sync::Arc;

use axum::{
    extract::{Path, Query, State},
    http::header,
    response::{IntoResponse, Response},
    Extension, Json,
};
use custody_audit::review::{
    access::{may_see, view},
    reader::{self, DirSource},
    search,
    verify::{self, Depth},
};
use custody_config::{Reviewer, Role};
use serde_json::{json, Value};

use super::{ConsoleState, Filters, Refusal, Shown, Who, PAGE_SIZE};

/// One page of search results, as the reviewer may see them.
pub struct Page {
    pub records: Vec<Value>,
    pub page: usize,
    /// More matches past this page.
    pub more: bool,
    /// Lines that did not parse: the results may be incomplete.
    pub unreadable: u64,
    pub untrusted_indexes: Vec<String>,
}

impl Page {
    fn ids(&self) -> Vec<String> {
        ids(&self.records)
    }
}

pub(super) fn ids(records: &[Value]) -> Vec<String> {
    records
        .iter()
        .filter_map(|r| r["id"].as_str().map(str::to_owned))
        .collect()
}

/// Record ids are UUIDs; anything else is refused before the trail is read.
fn check_id(id: &str) -> Result<(), Refusal> {
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
        return Err(Refusal::bad_request("not a record id"));
    }
    Ok(())
}

/// The newest records matching `filters` within the reviewer's bounds, one page.
pub async fn search_page(
    state: &Arc<ConsoleState>,
    reviewer: &Arc<Reviewer>,
    filters: &Filters,
) -> Result<Page, Refusal> {
    let page = filters.page()?;
    let query = filters.query(state, reviewer, page * PAGE_SIZE)?;
    let mut p = search_query(state, reviewer, query, (page - 1) * PAGE_SIZE).await?;
    p.page = page;
    Ok(p)
}

/// The matches of `query` past the newest `skip`, as the reviewer may see them.
async fn search_query(
    state: &Arc<ConsoleState>,
    reviewer: &Arc<Reviewer>,
    query: search::Query,
    skip: usize,
) -> Result<Page, Refusal> {
    let who = reviewer.clone();
    state
        .read(move |s| {
            let found = search::search_all(&s.sources(), &query).map_err(Refusal::trail)?;
            let total = found.records.len();
            let records = found
                .records
                .iter()
                .skip(skip)
                .filter_map(|raw| serde_json::from_str::<Value>(raw.get()).ok())
                // Bounds are filters of the query; checked again on what is shown.
                .filter(|r| query.events || may_see(&who, r))
                .map(|r| view(&who, r))
                .collect();
            Ok(Page {
                records,
                page: 1,
                more: total == query.limit,
                unreadable: found.unreadable,
                untrusted_indexes: found.untrusted_indexes,
            })
        })
        .await?
}

/// One record as the reviewer may see it; one they may not see is not found.
pub async fn one_record(
    state: &Arc<ConsoleState>,
    reviewer: &Arc<Reviewer>,
    id: String,
) -> Result<Value, Refusal> {
    check_id(&id)?;
    let who = reviewer.clone();
    state
        .read(move |s| {
            let r = find(s, &id)?.1;
            if r["schema"].as_str() == Some(custody_audit::record::EVENT_SCHEMA)
                && (who.routes.is_some() || who.teams.is_some())
            {
                return Err(Refusal::not_found());
            }
            if !may_see(&who, &r)
                && r["schema"].as_str() != Some(custody_audit::record::EVENT_SCHEMA)
            {
                return Err(Refusal::not_found());
            }
            Ok(view(&who, r))
        })
        .await?
}

/// The trail holding record `id` (its index among the trails) and the record.
fn find(s: &ConsoleState, id: &str) -> Result<(usize, Value), Refusal> {
    for (i, trail) in s.trails.iter().enumerate() {
        match reader::find_by_id(trail.as_ref(), id) {
            Ok(line) => {
                let v = serde_json::from_slice(&line).map_err(|e| {
                    Refusal::trail(custody_audit::AuditError::Writer(format!(
                        "record {id} is not JSON: {e}"
                    )))
                })?;
                return Ok((i, v));
            }
            Err(custody_audit::AuditError::NotFound(_)) => continue,
            Err(e) => return Err(Refusal::trail(e)),
        }
    }
    Err(Refusal::not_found())
}

/// The conversation record `id` belongs to, oldest first, as the reviewer may see it;
/// and how many of its turns are outside their bounds (not shown).
pub async fn conversation_of(
    state: &Arc<ConsoleState>,
    reviewer: &Arc<Reviewer>,
    id: String,
) -> Result<(Vec<Value>, usize), Refusal> {
    check_id(&id)?;
    let who = reviewer.clone();
    state
        .read(move |s| {
            let (trail, first) = find(s, &id)?;
            if !may_see(&who, &first) {
                return Err(Refusal::not_found());
            }
            let all =
                search::conversation(s.trails[trail].as_ref(), &id).map_err(Refusal::trail)?;
            let count = all.len();
            let shown: Vec<Value> = all
                .into_iter()
                .filter(|r| may_see(&who, r))
                .map(|r| view(&who, r))
                .collect();
            let hidden = count - shown.len();
            Ok((shown, hidden))
        })
        .await?
}

/// Each trail's verification, as JSON: what holds, or where it breaks.
pub async fn verify_all(state: &Arc<ConsoleState>) -> Result<Vec<Value>, Refusal> {
    state
        .read(|s| {
            s.trails
                .iter()
                .map(|t| {
                    let depth = if s.trusted_key.is_some() {
                        Depth::Fast
                    } else {
                        Depth::Full
                    };
                    let started = std::time::Instant::now();
                    let result = verify::verify_source(
                        t.as_ref(),
                        s.trusted_key.as_ref(),
                        depth,
                        |_, _, _| {},
                    );
                    let mut v = match result {
                        Ok(r) => json!({
                            "ok": true,
                            "segments": r.segments,
                            "records": r.records,
                            "events": r.events,
                            "bytes": r.bytes,
                            "last_seq": r.last_seq,
                            "head": r.head,
                            "seals": r.seals,
                            "checkpoints": r.checkpoints,
                            "keys": r.keys,
                            "unsigned": r.unsigned,
                            "trusted": r.trusted,
                            "uncovered": r.uncovered,
                            "recoveries": r.recoveries,
                            "retired": r.retired,
                            "fast": r.fast,
                            "newest_checkpoint": r.newest_checkpoint.as_ref().map(|(time, seq, key)| json!({
                                "time": time, "last_seq": seq, "key": key,
                            })),
                        }),
                        Err(verify::VerifyError::Broken(b)) => json!({
                            "ok": false,
                            "broken": {"segment": b.segment, "seq": b.seq, "what": b.what},
                        }),
                        Err(verify::VerifyError::Audit(e)) => json!({
                            "ok": false,
                            "error": e.to_string(),
                        }),
                    };
                    v["source"] = json!(t.describe());
                    v["trusted_key"] = json!(s.trusted_key.map(|k| hex::encode(k.as_bytes())));
                    v["seconds"] = json!(started.elapsed().as_secs_f64());
                    v
                })
                .collect()
        })
        .await
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
pub struct AccessFilters {
    /// Reads of this record.
    pub record: Option<String>,
    pub page: Option<String>,
}

/// The console's own access trail, newest first: for `content` reviewers with `audit`.
pub async fn access_page(
    state: &Arc<ConsoleState>,
    reviewer: &Arc<Reviewer>,
    filters: &AccessFilters,
) -> Result<Page, Refusal> {
    if !(reviewer.role == Role::Content && reviewer.audit) {
        return Err(Refusal::forbidden(
            "the access trail is for content reviewers with audit = true",
        ));
    }
    let page = Filters {
        page: filters.page.clone(),
        ..Filters::default()
    }
    .page()?;
    let record = Filters::field(&filters.record);
    if let Some(id) = &record {
        check_id(id)?;
    }
    let query = search::Query {
        events: true,
        record,
        limit: page * PAGE_SIZE,
        ..search::Query::default()
    };
    state
        .read(move |s| {
            let found =
                search::search(&DirSource(&s.access_dir), &query).map_err(Refusal::trail)?;
            let total = found.records.len();
            Ok(Page {
                records: found
                    .records
                    .iter()
                    .skip((page - 1) * PAGE_SIZE)
                    .filter_map(|raw| serde_json::from_str(raw.get()).ok())
                    .collect(),
                page,
                more: total == query.limit,
                unreadable: found.unreadable,
                untrusted_indexes: found.untrusted_indexes,
            })
        })
        .await?
}

fn page_json(p: &Page) -> Value {
    json!({
        "records": p.records,
        "page": p.page,
        "more": p.more,
        "unreadable": p.unreadable,
        "untrusted_indexes": p.untrusted_indexes,
    })
}

pub(super) fn shown(
    mut response: Response,
    action: &'static str,
    records: Vec<String>,
) -> Response {
    response.extensions_mut().insert(Shown {
        action,
        records,
        login: None,
    });
    response
}

pub async fn records(
    State(state): State<Arc<ConsoleState>>,
    Extension(who): Extension<Who>,
    Query(filters): Query<Filters>,
) -> Response {
    match search_page(&state, &who.reviewer, &filters).await {
        Ok(p) => shown(Json(page_json(&p)).into_response(), "search", p.ids()),
        Err(e) => shown(e.into_response(), "search", Vec::new()),
    }
}

pub async fn record(
    State(state): State<Arc<ConsoleState>>,
    Extension(who): Extension<Who>,
    Path(id): Path<String>,
) -> Response {
    match one_record(&state, &who.reviewer, id).await {
        Ok(r) => {
            let ids = ids(std::slice::from_ref(&r));
            shown(Json(r).into_response(), "record", ids)
        }
        Err(e) => shown(e.into_response(), "record", Vec::new()),
    }
}

pub async fn conversation(
    State(state): State<Arc<ConsoleState>>,
    Extension(who): Extension<Who>,
    Path(id): Path<String>,
) -> Response {
    match conversation_of(&state, &who.reviewer, id).await {
        Ok((turns, hidden)) => {
            let ids = ids(&turns);
            shown(
                Json(json!({"records": turns, "hidden": hidden})).into_response(),
                "conversation",
                ids,
            )
        }
        Err(e) => shown(e.into_response(), "conversation", Vec::new()),
    }
}

pub async fn verify(State(state): State<Arc<ConsoleState>>) -> Response {
    let r = match verify_all(&state).await {
        Ok(trails) => Json(json!({"trails": trails})).into_response(),
        Err(e) => e.into_response(),
    };
    shown(r, "verify", Vec::new())
}

pub async fn access(
    State(state): State<Arc<ConsoleState>>,
    Extension(who): Extension<Who>,
    Query(filters): Query<AccessFilters>,
) -> Response {
    let r = match access_page(&state, &who.reviewer, &filters).await {
        Ok(p) => Json(page_json(&p)).into_response(),
        Err(e) => e.into_response(),
    };
    shown(r, "access", Vec::new())
}

/// The matching records as JSON Lines (the view the reviewer may see), up to
/// [`super::MAX_RESULTS`]: a search taken away is on the record as an export.
pub async fn export(
    State(state): State<Arc<ConsoleState>>,
    Extension(who): Extension<Who>,
    Query(filters): Query<Filters>,
) -> Response {
    let found = match filters.query(&state, &who.reviewer, super::MAX_RESULTS) {
        Ok(query) => search_query(&state, &who.reviewer, query, 0).await,
        Err(e) => Err(e),
    };
    let all = match found {
        Ok(p) => p.records,
        Err(e) => return shown(e.into_response(), "export", Vec::new()),
    };
    let mut body = String::new();
    for r in &all {
        body.push_str(&r.to_string());
        body.push('\n');
    }
    let ids = ids(&all);
    shown(
        (
            [
                (header::CONTENT_TYPE, "application/x-ndjson"),
                (
                    header::CONTENT_DISPOSITION,
                    "attachment; filename=\"custody-export.jsonl\"",
                ),
            ],
            body,
        )
            .into_response(),
        "export",
        ids,
    )
}
