//! `custody log search`: filters over a trail, newest first.

use std::{ops::ControlFlow, time::SystemTime};

use serde_json::Value;

use super::reader::{self, TrailSource};
use crate::{
    index::{BlockEntry, SegmentIndex},
    AuditError,
};

/// A status filter: an exact code (`429`) or a class (`5xx`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusFilter {
    Exact(u16),
    Class(u16),
}

impl std::str::FromStr for StatusFilter {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not a status (use e.g. 429 or 5xx)");
        let lower = s.to_ascii_lowercase();
        if let Some(c) = lower.strip_suffix("xx") {
            let c: u16 = c.parse().map_err(|_| bad())?;
            return (1..=5)
                .contains(&c)
                .then_some(Self::Class(c))
                .ok_or_else(bad);
        }
        let code: u16 = s.parse().map_err(|_| bad())?;
        (100..=599)
            .contains(&code)
            .then_some(Self::Exact(code))
            .ok_or_else(bad)
    }
}

/// What to look for; every set field must match.
#[derive(Debug, Clone, Default)]
pub struct Query {
    pub since: Option<SystemTime>,
    pub until: Option<SystemTime>,
    /// Matches the requested or the served model, by prefix (`gpt-4o` finds `gpt-4o-2024-08-06`).
    pub model: Option<String>,
    pub route: Option<String>,
    pub status: Option<StatusFilter>,
    pub key_id: Option<String>,
    /// Case-insensitive substring of the stored (redacted) record.
    pub text: Option<String>,
    pub outcome: Option<String>,
    /// A redaction entity that fired in the record (`EMAIL_ADDRESS`...).
    pub entity: Option<String>,
    /// `client.user` or `client.end_user`.
    pub user: Option<String>,
    pub team: Option<String>,
    /// `prompt.hash`: every output produced from one prompt.
    pub prompt_hash: Option<String>,
    pub session: Option<String>,
    /// `trace.id`.
    pub trace: Option<String>,
    /// A policy that decided on the record (matched, or failed to evaluate).
    pub policy: Option<String>,
    /// Records with a policy decision of this severity or above.
    pub severity: Option<custody_config::Severity>,
    /// Search the trail's events (config, recovery, retention) instead of its records.
    pub events: bool,
    /// The record with this id, and the events that name it (an access trail's reads
    /// of it): records and events alike.
    pub record: Option<String>,
    /// A reviewer's bounds: only records of these routes...
    pub routes_in: Option<Vec<String>>,
    /// ... and of these teams (a record without a team is outside).
    pub teams_in: Option<Vec<String>>,
    /// Most records returned (the newest ones).
    pub limit: usize,
}

impl Query {
    /// Whether a parsed record matches (the text filter is applied on the raw line).
    pub fn matches(&self, r: &Value) -> bool {
        let s = |v: &Value| v.as_str().map(str::to_owned);
        let is_event = r["schema"].as_str() == Some(crate::record::EVENT_SCHEMA);
        if let Some(id) = &self.record {
            let named = r["id"].as_str() == Some(id)
                || r["event"]["records"]
                    .as_array()
                    .is_some_and(|ids| ids.iter().any(|i| i.as_str() == Some(id)));
            if !named {
                return false;
            }
        } else if is_event != self.events {
            return false;
        }
        let within = |allowed: &Option<Vec<String>>, v: &Value| {
            allowed
                .as_ref()
                .is_none_or(|list| v.as_str().is_some_and(|v| list.iter().any(|a| a == v)))
        };
        if !within(&self.routes_in, &r["route"]) || !within(&self.teams_in, &r["client"]["team"]) {
            return false;
        }
        let eq = |v: &Value, want: &Option<String>| {
            want.as_deref().is_none_or(|w| v.as_str() == Some(w))
        };
        if !eq(&r["prompt"]["hash"], &self.prompt_hash)
            || !eq(&r["session"]["id"], &self.session)
            || !eq(&r["trace"]["id"], &self.trace)
            || !eq(&r["client"]["team"], &self.team)
        {
            return false;
        }
        if let Some(want) = &self.user {
            if r["client"]["user"].as_str() != Some(want)
                && r["client"]["end_user"].as_str() != Some(want)
            {
                return false;
            }
        }
        if let Some(want) = &self.route {
            if r["route"].as_str() != Some(want) {
                return false;
            }
        }
        if let Some(want) = &self.key_id {
            if r["client"]["key_id"].as_str() != Some(want) {
                return false;
            }
        }
        if let Some(want) = &self.entity {
            if r["redactions"].get(want).is_none() {
                return false;
            }
        }
        if let Some(want) = &self.outcome {
            if r["outcome"].as_str() != Some(want) {
                return false;
            }
        }
        if self.policy.is_some() || self.severity.is_some() {
            let decided = r["policy"]["decisions"].as_array().into_iter().flatten();
            let mut any = decided.filter(|d| {
                self.policy
                    .as_deref()
                    .is_none_or(|p| d["name"].as_str() == Some(p))
                    && self.severity.is_none_or(|min| {
                        serde_json::from_value::<custody_config::Severity>(d["severity"].clone())
                            .is_ok_and(|s| s >= min)
                    })
            });
            if any.next().is_none() {
                return false;
            }
        }
        if let Some(want) = &self.model {
            let models = [
                s(&r["gen_ai"]["request"]["model"]),
                s(&r["gen_ai"]["response"]["model"]),
            ];
            if !models
                .iter()
                .flatten()
                .any(|m| m.starts_with(want.as_str()))
            {
                return false;
            }
        }
        if let Some(want) = self.status {
            let Some(code) = r["http"]["status"].as_u64() else {
                return false;
            };
            let ok = match want {
                StatusFilter::Exact(c) => code == u64::from(c),
                StatusFilter::Class(c) => code / 100 == u64::from(c),
            };
            if !ok {
                return false;
            }
        }
        if self.since.is_some() || self.until.is_some() {
            let Some(t) = r["time"]["start"]
                .as_str()
                .and_then(|t| humantime::parse_rfc3339(t).ok())
            else {
                return false;
            };
            if self.since.is_some_and(|s| t < s) || self.until.is_some_and(|u| t >= u) {
                return false;
            }
        }
        true
    }
}

impl Query {
    /// Byte strings a matching line must hold: each exact filter's value as the
    /// record's JSON writes it (the model, a prefix, without its closing quote).
    fn literals(&self) -> Vec<Vec<u8>> {
        let json = |v: &str| serde_json::to_vec(v).unwrap_or_default();
        let mut out: Vec<Vec<u8>> = [
            &self.route,
            &self.key_id,
            &self.outcome,
            &self.entity,
            &self.user,
            &self.team,
            &self.prompt_hash,
            &self.session,
            &self.trace,
            &self.policy,
            &self.record,
        ]
        .into_iter()
        .flatten()
        .map(|v| json(v))
        .collect();
        if let Some(m) = &self.model {
            let mut prefix = json(m);
            prefix.pop();
            out.push(prefix);
        }
        // Events are few among records: only lines naming their schema are parsed.
        if self.events && self.record.is_none() {
            out.push(json(crate::record::EVENT_SCHEMA));
        }
        out
    }

    /// Whether a segment with this index can hold a match (false skips it unread).
    pub fn may_match(&self, idx: &SegmentIndex) -> bool {
        let f = &idx.facts;
        let ms = |t: SystemTime| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64)
        };
        if idx.first_seq > idx.last_seq && self.text.is_none() {
            return false;
        }
        if self.since.is_some_and(|t| idx.last_ms < ms(t))
            || self.until.is_some_and(|t| idx.first_ms >= ms(t))
        {
            return false;
        }
        let has = |set: &std::collections::BTreeSet<String>, want: &Option<String>| {
            want.as_ref().is_none_or(|w| set.contains(w))
        };
        if let Some(routes) = &self.routes_in {
            if !routes.iter().any(|r| f.routes.contains(r)) {
                return false;
            }
        }
        if !has(&f.routes, &self.route)
            || !has(&f.key_ids, &self.key_id)
            || !has(&f.outcomes, &self.outcome)
            || !has(&f.entities, &self.entity)
            || !has(&f.users, &self.user)
            || !has(&f.policies, &self.policy)
        {
            return false;
        }
        if let Some(m) = &self.model {
            if !f.models.iter().any(|x| x.starts_with(m.as_str())) {
                return false;
            }
        }
        match self.status {
            Some(StatusFilter::Exact(c)) => f.statuses.contains(&c),
            Some(StatusFilter::Class(c)) => f.statuses.iter().any(|s| s / 100 == c),
            None => true,
        }
    }

    /// Whether a block (by its time range) can hold a match.
    fn block_may_match(&self, b: &BlockEntry) -> bool {
        let ms = |t: SystemTime| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64)
        };
        !(self.since.is_some_and(|t| b.last_ms < ms(t))
            || self.until.is_some_and(|t| b.first_ms >= ms(t)))
    }
}

/// What a search found, and what it could not rely on.
#[derive(Debug, Default)]
pub struct Found {
    /// The newest `limit` matching records, newest first, as stored: kept as text, not
    /// parsed trees, so that `limit` large records cost their size and no more.
    pub records: Vec<Box<serde_json::value::RawValue>>,
    /// Record lines that are not JSON a reader can parse: a search that skipped them
    /// must not look complete.
    pub unreadable: u64,
    /// Segments whose index did not match what their seal vouches for: each was read
    /// in full instead, and the index should be rebuilt (or investigated).
    pub untrusted_indexes: Vec<String>,
}

impl Found {
    /// The records parsed (for callers that want to look inside them all at once).
    pub fn values(&self) -> Vec<Value> {
        self.records
            .iter()
            .filter_map(|r| serde_json::from_str(r.get()).ok())
            .collect()
    }
}

/// The newest `query.limit` matching records, newest first. Segments are read newest
/// first and skipped when their index rules them out; within an indexed segment, only
/// the blocks whose time range overlaps the query are read. An index is used only when
/// its seal vouches for it. Memory: the `limit` newest matches and one block.
pub fn search(source: &dyn TrailSource, query: &Query) -> Result<Found, AuditError> {
    let needle = query.text.as_ref().map(|t| t.to_lowercase());
    let literals = query.literals();
    let limit = query.limit.max(1);
    let mut found = Found::default();
    let segs = source.segments()?;
    let newest = segs.iter().map(|s| s.number).max();
    for seg in segs.iter().rev() {
        let room = limit - found.records.len();
        let idx = source
            .index(seg)
            .and_then(|i| match reader::check_index(source, seg, &i) {
                Ok(()) => Some(i),
                // Written before seals vouched for indexes: read in full, silently.
                Err(_) if i.seal_at.is_none() => None,
                Err(why) => {
                    found
                        .untrusted_indexes
                        .push(format!("{}: {why}", seg.name()));
                    None
                }
            });
        if idx.as_ref().is_some_and(|i| !query.may_match(i)) {
            continue;
        }
        let mut unreadable = 0u64;
        let mut matching = |line: &[u8]| -> Option<Box<serde_json::value::RawValue>> {
            // Cheap tests on the raw line before it is parsed.
            if !literals
                .iter()
                .all(|l| memchr::memmem::find(line, l).is_some())
            {
                return None;
            }
            if let Some(n) = &needle {
                // JSON escapes make this approximate for non-ASCII.
                if !String::from_utf8_lossy(line)
                    .to_lowercase()
                    .contains(n.as_str())
                {
                    return None;
                }
            }
            match serde_json::from_slice::<Value>(line) {
                Ok(v) if query.matches(&v) => {
                    drop(v);
                    let text = String::from_utf8_lossy(line).into_owned();
                    serde_json::value::RawValue::from_string(text).ok()
                }
                Ok(_) => None,
                Err(_) => {
                    unreadable += 1;
                    None
                }
            }
        };
        match &idx {
            // Later blocks hold later records: newest block first, and stop once full.
            Some(i) => {
                let mut newest_first = Vec::new();
                for b in i.blocks.iter().filter(|b| query.block_may_match(b)).rev() {
                    let mut in_block = Vec::new();
                    for block in reader::read_blocks(source, seg, &[b])? {
                        in_block.extend(block.lines().filter_map(&mut matching));
                    }
                    let take = room - newest_first.len();
                    newest_first.extend(in_block.into_iter().rev().take(take));
                    if newest_first.len() == room {
                        break;
                    }
                }
                found.records.extend(newest_first);
            }
            // Unindexed (the live segment): read oldest first, keep the newest `room`.
            None => {
                let mut hits = std::collections::VecDeque::with_capacity(room.min(1024));
                reader::for_each_line_in(source, seg, Some(seg.number) == newest, |line| {
                    if let Some(hit) = matching(line) {
                        if hits.len() == room {
                            hits.pop_front();
                        }
                        hits.push_back(hit);
                    }
                    ControlFlow::Continue(())
                })?;
                found.records.extend(hits.into_iter().rev());
            }
        }
        found.unreadable += unreadable;
        if found.records.len() == limit {
            break;
        }
    }
    Ok(found)
}

/// [`search`] over many trails (one per pod under `from`), merged: the newest
/// `query.limit` across them, newest first.
pub fn search_all(sources: &[&dyn TrailSource], query: &Query) -> Result<Found, AuditError> {
    let mut all = Found::default();
    for source in sources {
        let f = search(*source, query)?;
        all.unreadable += f.unreadable;
        all.untrusted_indexes.extend(
            f.untrusted_indexes
                .into_iter()
                .map(|why| format!("{}: {why}", source.describe())),
        );
        all.records.extend(f.records);
    }
    if sources.len() > 1 {
        #[derive(serde::Deserialize)]
        struct Start {
            time: StartTime,
        }
        #[derive(serde::Deserialize)]
        struct StartTime {
            start: String,
        }
        let start = |r: &serde_json::value::RawValue| {
            serde_json::from_str::<Start>(r.get())
                .map(|s| s.time.start)
                .unwrap_or_default()
        };
        all.records
            .sort_by_cached_key(|r| std::cmp::Reverse(start(r)));
        all.records.truncate(query.limit.max(1));
    }
    Ok(all)
}

/// The conversation a record belongs to, oldest first: its ancestors (each record's
/// `chain.conversation_parent`, found by id) and every later record that descends from
/// any of them (a forward scan from the first turn's time; regenerated answers branch).
pub fn conversation(source: &dyn TrailSource, id: &str) -> Result<Vec<Value>, AuditError> {
    let parse = |line: &[u8]| {
        serde_json::from_slice::<Value>(line)
            .map_err(|e| AuditError::Writer(format!("record {id} is not JSON: {e}")))
    };
    let mut turn = parse(&reader::find_by_id(source, id)?)?;
    let mut ancestors = Vec::new();
    // Parents are older records; the bound only guards against a forged cycle.
    for _ in 0..100_000 {
        let parent = turn["chain"]["conversation_parent"]
            .as_str()
            .map(str::to_owned);
        ancestors.push(turn);
        let Some(p) = parent else { break };
        match reader::find_by_id(source, &p) {
            Ok(line) => turn = parse(&line)?,
            // Retention may have removed the start of a long conversation.
            Err(AuditError::NotFound(_)) => break,
            Err(e) => return Err(e),
        }
    }
    ancestors.reverse();
    let root = ancestors[0].clone();
    let mut members: std::collections::HashSet<String> = ancestors
        .iter()
        .filter_map(|r| r["id"].as_str().map(str::to_owned))
        .collect();
    let root_ms = root["id"].as_str().and_then(crate::record::id_time_ms);
    let mut out = Vec::new();
    let mut unreadable = 0u64;
    let segs = source.segments()?;
    let newest = segs.iter().map(|s| s.number).max();
    for seg in segs {
        if let (Some(t), Some(i)) = (root_ms, source.index(&seg)) {
            if i.last_ms < t {
                continue;
            }
        }
        reader::for_each_line_in(source, &seg, Some(seg.number) == newest, |line| {
            if memchr::memmem::find(line, b"\"conversation_parent\":").is_none()
                && memchr::memmem::find(line, root["id"].to_string().as_bytes()).is_none()
            {
                return ControlFlow::Continue(());
            }
            let Ok(v) = serde_json::from_slice::<Value>(line) else {
                unreadable += 1;
                return ControlFlow::Continue(());
            };
            let id = v["id"].as_str().unwrap_or_default().to_owned();
            let parent = v["chain"]["conversation_parent"].as_str();
            if members.contains(&id) || parent.is_some_and(|p| members.contains(p)) {
                members.insert(id);
                out.push(v);
            }
            ControlFlow::Continue(())
        })?;
    }
    if unreadable > 0 {
        return Err(AuditError::Unreadable {
            count: unreadable,
            context: "the conversation may be incomplete".into(),
        });
    }
    // Ancestors older than the first segment read (or behind an unindexed one) first.
    let seen: std::collections::HashSet<&str> =
        out.iter().filter_map(|r| r["id"].as_str()).collect();
    let mut all: Vec<Value> = ancestors
        .iter()
        .filter(|a| !a["id"].as_str().is_some_and(|i| seen.contains(i)))
        .cloned()
        .collect();
    all.extend(out);
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_filters_parse() {
        assert_eq!("5xx".parse::<StatusFilter>(), Ok(StatusFilter::Class(5)));
        assert_eq!("429".parse::<StatusFilter>(), Ok(StatusFilter::Exact(429)));
        assert!("9xx".parse::<StatusFilter>().is_err());
        assert!("abc".parse::<StatusFilter>().is_err());
    }

    #[test]
    fn query_matches_fields() {
        let r: Value = serde_json::json!({"route": "openai", "outcome": "ok", "http": {"status": 503},
            "time": {"start": "2026-11-29T10:00:00.000Z"}, "client": {"key_id": "key_1"},
            "gen_ai": {"request": {"model": "gpt-4o"}, "response": {"model": "gpt-4o-2024-08-06"}}});
        let q = Query {
            model: Some("gpt-4o-2024".into()),
            status: Some(StatusFilter::Class(5)),
            ..Query::default()
        };
        assert!(q.matches(&r));
        let q = Query {
            since: humantime::parse_rfc3339("2026-11-29T11:00:00Z").ok(),
            ..Query::default()
        };
        assert!(!q.matches(&r));
        let q = Query {
            key_id: Some("key_2".into()),
            ..Query::default()
        };
        assert!(!q.matches(&r));
        let q = Query {
            entity: Some("EMAIL_ADDRESS".into()),
            ..Query::default()
        };
        assert!(!q.matches(&r));
        let mut with = r.clone();
        with["redactions"] = serde_json::json!({"EMAIL_ADDRESS": 2});
        assert!(q.matches(&with));
    }
}
