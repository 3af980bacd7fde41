//! Counts over a window of a trail, for the console's overview: exchanges, errors,
//! blocked and flagged requests and redactions per time bucket, and the newest events.
//! Streams the blocks whose time overlaps the window; each line is read for the few
//! fields counted, never held.

use std::{collections::BTreeMap, ops::ControlFlow};

use serde::Deserialize;

use super::reader::{self, TrailSource};
use crate::AuditError;

/// What a window holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    /// From `since`, `width_ms` apart.
    pub buckets: Vec<Bucket>,
    pub since_ms: i64,
    pub width_ms: i64,
    /// Redactions in the window, per entity.
    pub entities: BTreeMap<String, u64>,
    /// The newest events of the window (config, gap, recovery, retention), newest
    /// first, as stored.
    pub events: Vec<String>,
    /// Lines that did not parse.
    pub unreadable: u64,
    /// The scan stopped at `max_lines`: the counts cover only the newest part.
    pub partial: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bucket {
    pub exchanges: u64,
    /// 5xx, upstream errors and timeouts.
    pub errors: u64,
    pub blocked: u64,
    /// Records with an enforced or observed flag.
    pub flagged: u64,
    pub redactions: u64,
}

/// Which records count: a reviewer's bounds.
pub struct Bounds<'a> {
    pub routes: Option<&'a [String]>,
    pub teams: Option<&'a [String]>,
}

#[derive(Deserialize)]
struct Line<'a> {
    #[serde(borrow, default)]
    schema: Option<&'a str>,
    #[serde(borrow, default)]
    route: Option<&'a str>,
    #[serde(borrow, default)]
    outcome: Option<&'a str>,
    #[serde(default)]
    http: Http,
    #[serde(borrow, default)]
    client: Client<'a>,
    #[serde(default)]
    redactions: BTreeMap<String, u64>,
    #[serde(borrow, default)]
    policy: Option<Policy<'a>>,
    #[serde(borrow, default)]
    time: Option<Start<'a>>,
    #[serde(borrow, default)]
    event: Option<Kind<'a>>,
}

#[derive(Deserialize)]
struct Start<'a> {
    #[serde(borrow)]
    start: &'a str,
}

#[derive(Deserialize)]
struct Kind<'a> {
    #[serde(borrow, rename = "type", default)]
    kind: &'a str,
}

#[derive(Deserialize, Default)]
struct Http {
    status: Option<u16>,
}

#[derive(Deserialize, Default)]
struct Client<'a> {
    #[serde(borrow, default)]
    team: Option<&'a str>,
}

#[derive(Deserialize)]
struct Policy<'a> {
    #[serde(borrow, default)]
    decisions: Vec<Decision<'a>>,
}

#[derive(Deserialize)]
struct Decision<'a> {
    #[serde(borrow, default)]
    effect: Option<&'a str>,
}

/// Events the overview lists.
const LISTED_EVENTS: [&str; 4] = ["config", "gap", "recovery", "retention"];
/// Events kept for the list.
const NEWEST_EVENTS: usize = 10;

/// Counts records of `sources` in `[since_ms, until_ms)` into `buckets` buckets, at most
/// `max_lines` lines read (newest segments first). Records outside `bounds` are not
/// counted, and a bounded reviewer is shown no events.
pub fn tally(
    sources: &[&dyn TrailSource],
    (since_ms, until_ms): (i64, i64),
    buckets: usize,
    bounds: &Bounds<'_>,
    max_lines: u64,
) -> Result<Tally, AuditError> {
    let buckets = buckets.max(1);
    let width_ms = ((until_ms - since_ms) / buckets as i64).max(1);
    let mut t = Tally {
        buckets: vec![Bucket::default(); buckets],
        since_ms,
        width_ms,
        ..Tally::default()
    };
    let bounded = bounds.routes.is_some() || bounds.teams.is_some();
    let within = |allowed: Option<&[String]>, v: Option<&str>| {
        allowed.is_none_or(|list| v.is_some_and(|v| list.iter().any(|a| a == v)))
    };
    let mut read = 0u64;
    let mut events: Vec<(i64, String)> = Vec::new();
    'sources: for source in sources {
        let segs = source.segments()?;
        let newest = segs.iter().map(|s| s.number).max();
        for seg in segs.iter().rev() {
            let idx = source.index(seg);
            if idx
                .as_ref()
                .is_some_and(|i| i.last_ms < since_ms || i.first_ms >= until_ms)
            {
                continue;
            }
            let mut count = |line: &[u8]| {
                read += 1;
                let Ok(l) = serde_json::from_slice::<Line>(line) else {
                    t.unreadable += 1;
                    return;
                };
                let Some(ms) = l.time.as_ref().and_then(|t| start_ms(t.start)) else {
                    return;
                };
                if ms < since_ms || ms >= until_ms {
                    return;
                }
                if l.schema == Some(crate::record::EVENT_SCHEMA) {
                    if !bounded && l.event.is_some_and(|e| LISTED_EVENTS.contains(&e.kind)) {
                        events.push((ms, String::from_utf8_lossy(line).into_owned()));
                        if events.len() > 4 * NEWEST_EVENTS {
                            events.sort_by_key(|e| std::cmp::Reverse(e.0));
                            events.truncate(NEWEST_EVENTS);
                        }
                    }
                    return;
                }
                if !within(bounds.routes, l.route) || !within(bounds.teams, l.client.team) {
                    return;
                }
                let b = &mut t.buckets[(((ms - since_ms) / width_ms) as usize).min(buckets - 1)];
                b.exchanges += 1;
                if l.http.status.is_some_and(|s| s >= 500)
                    || matches!(l.outcome, Some("upstream_error" | "upstream_timeout"))
                {
                    b.errors += 1;
                }
                if l.outcome == Some("blocked") {
                    b.blocked += 1;
                }
                if l.policy.is_some_and(|p| {
                    p.decisions
                        .iter()
                        .any(|d| matches!(d.effect, Some("flagged" | "would_flag")))
                }) {
                    b.flagged += 1;
                }
                for (entity, n) in l.redactions {
                    b.redactions += n;
                    *t.entities.entry(entity).or_default() += n;
                }
            };
            match &idx {
                Some(i) => {
                    let blocks: Vec<_> = i
                        .blocks
                        .iter()
                        .filter(|b| b.last_ms >= since_ms && b.first_ms < until_ms)
                        .collect();
                    for b in blocks {
                        for block in reader::read_blocks(*source, seg, &[b])? {
                            block.lines().for_each(&mut count);
                        }
                    }
                }
                None => {
                    reader::for_each_line_in(*source, seg, Some(seg.number) == newest, |l| {
                        count(l);
                        ControlFlow::Continue(())
                    })?;
                }
            }
            if read >= max_lines {
                t.partial = true;
                break 'sources;
            }
        }
    }
    events.sort_by_key(|e| std::cmp::Reverse(e.0));
    events.truncate(NEWEST_EVENTS);
    t.events = events.into_iter().map(|e| e.1).collect();
    Ok(t)
}

/// An RFC 3339 time in milliseconds.
pub(crate) fn start_ms(start: &str) -> Option<i64> {
    let at = humantime::parse_rfc3339(start).ok()?;
    at.duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_millis() as i64)
}
