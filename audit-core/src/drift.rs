//! Served-model drift: what a provider serves behind a requested model, and when that
//! changes. Providers move an alias to a new dated version, or fall back to another
//! model, without a word; the writer sees every answer and says so in the chain.
//!
//! Per route and requested model the tracker keeps the served model
//! (`gen_ai.response.model`) and the `system_fingerprint`s seen lately. A change is a
//! `drift` event: `kind` is `version` (same family, another version: `gpt-4o-2024-05-13`
//! to `gpt-4o-2024-08-06`), `model` (another family: a silent fallback) or
//! `fingerprint` (same model, a backend configuration not seen lately).

use std::collections::{HashMap, VecDeque};

use serde_json::json;

/// Routes times requested models tracked; past it the least recently seen is forgotten
/// (clients name any model they like).
const MAX_KEYS: usize = 1024;
/// Fingerprints remembered per key: providers serve from several backends at once, and
/// one seen lately coming back is not news.
const RECENT_FINGERPRINTS: usize = 16;
/// Longer is not a model name or a fingerprint (the memory bound is in operations.md).
const MAX_NAME: usize = 256;

/// One answered record, as the tracker reads it.
#[derive(Debug, Clone, Copy)]
pub struct Observation<'a> {
    pub route: &'a str,
    pub requested: &'a str,
    pub served: &'a str,
    pub fingerprint: Option<&'a str>,
    pub id: &'a str,
    pub seq: u64,
    pub time: &'a str,
}

/// A change, for the event and the metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub kind: &'static str,
    pub route: String,
    pub requested: String,
    pub from: String,
    pub to: String,
    pub event: serde_json::Value,
}

/// What an observation was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    /// The first answer for its route and requested model (since start, or since it
    /// was forgotten).
    First,
    Same,
    Changed(Box<Change>),
}

impl Observed {
    pub fn change(self) -> Option<Change> {
        match self {
            Self::Changed(c) => Some(*c),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
struct Served {
    model: String,
    fingerprints: VecDeque<String>,
    last_id: String,
    last_seq: u64,
    last_time: String,
    /// When it was last seen (a counter), to forget the stalest key first.
    touched: u64,
}

#[derive(Debug, Default)]
pub struct DriftTracker {
    /// By `route \0 requested model`: one string, looked up without allocating.
    by_key: HashMap<String, Served>,
    key: String,
    clock: u64,
}

impl DriftTracker {
    /// Notes what served `o`.
    pub fn observe(&mut self, o: &Observation<'_>) -> Observed {
        if o.requested.len() > MAX_NAME || o.served.len() > MAX_NAME {
            return Observed::Same;
        }
        let o = &Observation {
            fingerprint: o.fingerprint.filter(|f| f.len() <= MAX_NAME),
            ..*o
        };
        self.clock += 1;
        self.key.clear();
        self.key.push_str(o.route);
        self.key.push('\0');
        self.key.push_str(o.requested);
        let Some(s) = self.by_key.get_mut(self.key.as_str()) else {
            self.forget_if_full();
            self.by_key.insert(
                self.key.clone(),
                Served {
                    model: o.served.to_owned(),
                    fingerprints: o.fingerprint.map(str::to_owned).into_iter().collect(),
                    last_id: o.id.to_owned(),
                    last_seq: o.seq,
                    last_time: o.time.to_owned(),
                    touched: self.clock,
                },
            );
            return Observed::First;
        };
        let kind = if s.model != o.served {
            Some(if family(&s.model) == family(o.served) {
                "version"
            } else {
                "model"
            })
        } else {
            o.fingerprint
                .filter(|f| !s.fingerprints.iter().any(|seen| seen == f))
                .filter(|_| !s.fingerprints.is_empty())
                .map(|_| "fingerprint")
        };
        let change = kind.map(|kind| {
            let event = json!({
                "type": "drift",
                "kind": kind,
                "route": o.route,
                "requested_model": o.requested,
                "from": {"model": s.model, "system_fingerprint": s.fingerprints.back()},
                "to": {"model": o.served, "system_fingerprint": o.fingerprint},
                "last_before": {"id": s.last_id, "seq": s.last_seq, "time": s.last_time},
                "first_after": {"id": o.id, "seq": o.seq, "time": o.time},
            });
            Change {
                kind,
                route: o.route.to_owned(),
                requested: o.requested.to_owned(),
                from: s.model.clone(),
                to: o.served.to_owned(),
                event,
            }
        });
        if s.model != o.served {
            s.model = o.served.to_owned();
            s.fingerprints.clear();
        }
        if let Some(f) = o.fingerprint {
            if !s.fingerprints.iter().any(|seen| seen == f) {
                if s.fingerprints.len() == RECENT_FINGERPRINTS {
                    s.fingerprints.pop_front();
                }
                s.fingerprints.push_back(f.to_owned());
            }
        }
        // Reusing the strings: no allocation for an answer like the last.
        s.last_id.clear();
        s.last_id.push_str(o.id);
        s.last_seq = o.seq;
        s.last_time.clear();
        s.last_time.push_str(o.time);
        s.touched = self.clock;
        change.map_or(Observed::Same, |c| Observed::Changed(Box::new(c)))
    }

    fn forget_if_full(&mut self) {
        if self.by_key.len() < MAX_KEYS {
            return;
        }
        if let Some(stalest) = self
            .by_key
            .iter()
            .min_by_key(|(_, s)| s.touched)
            .map(|(k, _)| k.clone())
        {
            self.by_key.remove(&stalest);
        }
    }

    /// What is served now, per route and requested model (for the info metric).
    pub fn served(&self) -> impl Iterator<Item = (&str, &str, &str)> {
        self.by_key.iter().map(|(k, s)| {
            let (r, m) = k.split_once('\0').unwrap_or((k.as_str(), ""));
            (r, m, s.model.as_str())
        })
    }
}

/// The tracker as it stood before a restart, from the newest two segments of the trail:
/// a change across a restart (a rolling deploy as the provider moves an alias) is still
/// told. Older history is not read; a route quiet for longer starts afresh.
pub fn rebuild(dir: &std::path::Path) -> DriftTracker {
    #[derive(serde::Deserialize)]
    struct Model {
        model: Option<String>,
        system_fingerprint: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct GenAi {
        request: Model,
        response: Option<Model>,
    }
    #[derive(serde::Deserialize)]
    struct Http {
        status: Option<u16>,
    }
    #[derive(serde::Deserialize)]
    struct Time {
        start: String,
    }
    #[derive(serde::Deserialize)]
    struct Answered {
        id: String,
        seq: u64,
        route: Option<String>,
        time: Time,
        http: Http,
        gen_ai: Option<GenAi>,
    }
    let mut tracker = DriftTracker::default();
    let source = crate::review::reader::DirSource(dir);
    let Ok(segments) = crate::review::reader::segments(dir) else {
        return tracker;
    };
    let newest = segments.last().map(|s| s.number);
    for seg in segments.iter().rev().take(2).rev() {
        let read = crate::review::reader::for_each_line_in(
            &source,
            seg,
            Some(seg.number) == newest,
            |line| {
                if memchr::memmem::find(line, b"\"response\":{\"model\":").is_some() {
                    if let Ok(a) = serde_json::from_slice::<Answered>(line) {
                        let served = a.gen_ai.as_ref().and_then(|g| {
                            let r = g.response.as_ref()?;
                            Some((g.request.model.as_deref()?, r))
                        });
                        if let (Some((requested, r)), Some(200..=299)) = (served, a.http.status) {
                            if let Some(model) = r.model.as_deref() {
                                tracker.observe(&Observation {
                                    route: a.route.as_deref().unwrap_or(""),
                                    requested,
                                    served: model,
                                    fingerprint: r.system_fingerprint.as_deref(),
                                    id: &a.id,
                                    seq: a.seq,
                                    time: &a.time.start,
                                });
                            }
                        }
                    }
                }
                std::ops::ControlFlow::Continue(())
            },
        );
        if let Err(e) = read {
            tracing::warn!(segment = %seg.name(), error = %e, "served models: segment not read");
        }
    }
    tracker
}

/// A model's family: its name without a provider path, a `@version`, or trailing
/// version numbers of two digits or more (`-2024-08-06`, `-20241022`, `-0613`, `-002`).
/// `gpt-4o-2024-08-06` is `gpt-4o`; `gpt-4` stays `gpt-4`.
pub fn family(model: &str) -> String {
    let name = model.rsplit('/').next().unwrap_or(model);
    let name = name.split('@').next().unwrap_or(name).to_ascii_lowercase();
    let mut parts: Vec<&str> = name.split('-').collect();
    while parts.len() > 1 {
        match parts.last() {
            Some(p) if p.len() >= 2 && p.bytes().all(|b| b.is_ascii_digit()) => {
                parts.pop();
            }
            _ => break,
        }
    }
    parts.join("-")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs<'a>(served: &'a str, fp: Option<&'a str>, seq: u64) -> Observation<'a> {
        Observation {
            route: "openai",
            requested: "gpt-4o",
            served,
            fingerprint: fp,
            id: "id",
            seq,
            time: "t",
        }
    }

    #[test]
    fn families_drop_dates_and_version_codes_only() {
        assert_eq!(family("gpt-4o-2024-08-06"), "gpt-4o");
        assert_eq!(family("gpt-4o"), "gpt-4o");
        assert_eq!(family("gpt-4"), "gpt-4");
        assert_eq!(family("gpt-4-0613"), "gpt-4");
        assert_eq!(family("claude-3-5-sonnet-20241022"), "claude-3-5-sonnet");
        assert_eq!(family("claude-3-5-sonnet@20240620"), "claude-3-5-sonnet");
        assert_eq!(family("models/gemini-1.5-pro-002"), "gemini-1.5-pro");
        assert_ne!(
            family("gpt-4o-mini-2024-07-18"),
            family("gpt-4o-2024-08-06")
        );
    }

    #[test]
    fn a_version_a_fallback_and_a_new_fingerprint_are_changes_and_nothing_else_is() {
        let mut t = DriftTracker::default();
        assert_eq!(
            t.observe(&obs("gpt-4o-2024-05-13", Some("fp_a"), 1)),
            Observed::First
        );
        assert_eq!(
            t.observe(&obs("gpt-4o-2024-05-13", Some("fp_a"), 2)),
            Observed::Same
        );
        // Two backends alternating: the second is news once, then not.
        assert_eq!(
            t.observe(&obs("gpt-4o-2024-05-13", Some("fp_b"), 3))
                .change()
                .map(|c| c.kind),
            Some("fingerprint")
        );
        assert_eq!(
            t.observe(&obs("gpt-4o-2024-05-13", Some("fp_a"), 4)),
            Observed::Same
        );
        assert_eq!(
            t.observe(&obs("gpt-4o-2024-05-13", None, 5)),
            Observed::Same
        );
        let v = t
            .observe(&obs("gpt-4o-2024-08-06", Some("fp_c"), 6))
            .change()
            .unwrap();
        assert_eq!(v.kind, "version");
        assert_eq!(v.event["last_before"]["seq"], 5);
        assert_eq!(v.event["first_after"]["seq"], 6);
        assert_eq!(v.event["from"]["model"], "gpt-4o-2024-05-13");
        let m = t
            .observe(&obs("gpt-4o-mini-2024-07-18", None, 7))
            .change()
            .unwrap();
        assert_eq!((m.kind, m.to.as_str()), ("model", "gpt-4o-mini-2024-07-18"));
        assert_eq!(
            t.observe(&obs("gpt-4o-mini-2024-07-18", None, 8)),
            Observed::Same
        );
    }

    #[test]
    fn keys_stay_bounded_whatever_clients_request() {
        let mut t = DriftTracker::default();
        let names: Vec<String> = (0..MAX_KEYS * 3).map(|i| format!("m{i}")).collect();
        for (i, n) in names.iter().enumerate() {
            let o = Observation {
                requested: n,
                ..obs("x", None, i as u64)
            };
            t.observe(&o);
        }
        assert_eq!(t.served().count(), MAX_KEYS);
        let long = "m".repeat(MAX_NAME + 1);
        let o = Observation {
            requested: &long,
            ..obs("x", None, 0)
        };
        assert_eq!(t.observe(&o), Observed::Same);
        assert!(t.served().all(|(_, m, _)| m.len() <= MAX_NAME));
    }
}
