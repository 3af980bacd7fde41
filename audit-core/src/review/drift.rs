//! Distribution drift between two windows of a trail, per route and requested model:
//! what changed in latency, time to first token, tokens, finish reasons (refusals and
//! content filters among them), errors, rate limits, tool calls, the served model,
//! redactions per entity and policy decisions per rule. Each dimension gets a
//! population stability index (PSI) and, for numbers, the shift in median and p95;
//! the report is sorted by how far each moved, after the `drift` events the writer
//! recorded in the window (a served model changing is named first).
//!
//! Memory: at most [`MAX_GROUPS`] route and model pairs, each number kept for at most
//! [`RESERVOIR`] records per window (a uniform sample beyond).

use std::{
    collections::{BTreeMap, BTreeSet},
    ops::ControlFlow,
};

use serde::{Deserialize, Serialize};

use super::{
    reader::{self, TrailSource},
    tally::start_ms,
};
use crate::AuditError;

/// Route and model pairs compared; more are counted under model `other`.
pub const MAX_GROUPS: usize = 256;
/// Values kept per number, group and window.
pub const RESERVOIR: usize = 10_000;
/// Categories per dimension (served models an upstream names); more count as `other`.
pub const MAX_CATEGORIES: usize = 64;
/// PSI at or above which a dimension has shifted, and has moved.
pub const SHIFTED: f64 = 0.25;
pub const MOVED: f64 = 0.1;

/// What to compare.
#[derive(Debug, Clone)]
pub struct DriftQuery {
    /// `[since, until)`, Unix ms.
    pub baseline: (i64, i64),
    pub window: (i64, i64),
    pub route: Option<String>,
    pub model: Option<String>,
    /// Fewer records on either side than this: too few to judge.
    pub min_records: usize,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DriftReport {
    /// `drift` events recorded in the window, as stored.
    pub changes: Vec<serde_json::Value>,
    /// Every dimension of every route and model, most moved first.
    pub dimensions: Vec<Dimension>,
    pub baseline_records: u64,
    pub window_records: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Dimension {
    pub route: String,
    pub model: String,
    pub name: String,
    pub psi: f64,
    /// `shifted`, `moved`, `stable` or `too_few`.
    pub verdict: &'static str,
    pub baseline_n: usize,
    pub window_n: usize,
    /// Numbers: median and p95 on each side.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub median: Option<(f64, f64)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p95: Option<(f64, f64)>,
    /// Categories: the share of each on each side.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub shares: BTreeMap<String, (f64, f64)>,
}

#[derive(Deserialize)]
struct Line<'a> {
    #[serde(borrow, default)]
    schema: Option<&'a str>,
    #[serde(borrow, default)]
    route: Option<&'a str>,
    #[serde(borrow, default)]
    outcome: Option<&'a str>,
    #[serde(borrow, default)]
    time: Option<Time<'a>>,
    #[serde(default)]
    http: Http,
    #[serde(borrow, default)]
    gen_ai: Option<GenAi<'a>>,
    #[serde(default)]
    redactions: BTreeMap<String, u64>,
    #[serde(borrow, default)]
    policy: Option<Policy<'a>>,
    #[serde(borrow, default)]
    event: Option<Event<'a>>,
}

#[derive(Deserialize)]
struct Time<'a> {
    #[serde(borrow)]
    start: &'a str,
    #[serde(default)]
    duration_ms: Option<f64>,
    #[serde(default)]
    first_chunk_ms: Option<f64>,
}

#[derive(Deserialize, Default)]
struct Http {
    status: Option<u16>,
}

#[derive(Deserialize)]
struct GenAi<'a> {
    #[serde(borrow, default)]
    request: Option<Model<'a>>,
    #[serde(borrow, default)]
    response: Option<Response<'a>>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Model<'a> {
    #[serde(borrow, default)]
    model: Option<&'a str>,
}

#[derive(Deserialize)]
struct Response<'a> {
    #[serde(borrow, default)]
    model: Option<&'a str>,
    #[serde(default)]
    finish_reasons: Vec<String>,
}

#[derive(Deserialize)]
struct Usage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct Policy<'a> {
    #[serde(borrow, default)]
    decisions: Vec<Decision<'a>>,
}

#[derive(Deserialize)]
struct Decision<'a> {
    #[serde(borrow, default)]
    name: Option<&'a str>,
    #[serde(borrow, default)]
    effect: Option<&'a str>,
}

#[derive(Deserialize)]
struct Event<'a> {
    #[serde(borrow, rename = "type", default)]
    kind: &'a str,
}

/// A finish reason as one word across providers: OpenAI `content_filter`, Anthropic
/// `refusal`, Gemini `SAFETY`/`RECITATION`/`BLOCKLIST`/`PROHIBITED_CONTENT`/`SPII` are
/// refusals; `tool_calls`, `tool_use`, `function_call` are tool calls.
pub(crate) fn finish(reason: &str) -> &'static str {
    match reason.to_ascii_lowercase().as_str() {
        "stop" | "end_turn" | "stop_sequence" | "completed" => "stop",
        "length" | "max_tokens" | "max_output_tokens" => "length",
        "tool_calls" | "tool_use" | "function_call" => "tool_calls",
        "content_filter" => "content_filter",
        "refusal" | "safety" | "recitation" | "blocklist" | "prohibited_content" | "spii"
        | "image_safety" => "refusal",
        "" => "none",
        _ => "other",
    }
}

/// One side's samples for a group.
#[derive(Default)]
struct Side {
    records: usize,
    numbers: BTreeMap<&'static str, Reservoir>,
    /// Dimension -> category -> count.
    categories: BTreeMap<String, BTreeMap<String, u64>>,
}

#[derive(Default)]
struct Reservoir {
    seen: u64,
    values: Vec<f64>,
}

impl Reservoir {
    fn push(&mut self, v: f64) {
        self.seen += 1;
        if self.values.len() < RESERVOIR {
            self.values.push(v);
        } else {
            let at = fastrand::u64(0..self.seen) as usize;
            if at < RESERVOIR {
                self.values[at] = v;
            }
        }
    }
}

impl Side {
    fn add(&mut self, l: &Line<'_>) {
        self.records += 1;
        let t = l.time.as_ref();
        let g = l.gen_ai.as_ref();
        let usage = g.and_then(|g| g.usage.as_ref());
        for (name, v) in [
            ("latency_ms", t.and_then(|t| t.duration_ms)),
            ("ttft_ms", t.and_then(|t| t.first_chunk_ms)),
            (
                "input_tokens",
                usage.and_then(|u| u.input_tokens).map(|n| n as f64),
            ),
            (
                "output_tokens",
                usage.and_then(|u| u.output_tokens).map(|n| n as f64),
            ),
        ] {
            if let Some(v) = v {
                self.numbers.entry(name).or_default().push(v);
            }
        }
        let status = l.http.status.unwrap_or(0);
        let error =
            status >= 500 || matches!(l.outcome, Some("upstream_error" | "upstream_timeout"));
        let response = g.and_then(|g| g.response.as_ref());
        let reasons: Vec<&str> = response
            .map(|r| r.finish_reasons.iter().map(|f| finish(f)).collect())
            .unwrap_or_default();
        let mut count = |dim: &str, cat: &str| {
            let cats = self.categories.entry(dim.to_owned()).or_default();
            let full = cats.len() >= MAX_CATEGORIES && !cats.contains_key(cat);
            let cat = if full || cat.len() > 256 {
                "other"
            } else {
                cat
            };
            *cats.entry(cat.to_owned()).or_default() += 1;
        };
        let yes = |b: bool| if b { "yes" } else { "no" };
        count("errors", yes(error));
        count("rate_limited", yes(status == 429));
        if response.is_some() {
            count("finish_reason", reasons.first().copied().unwrap_or("none"));
            count(
                "refusals",
                yes(reasons
                    .iter()
                    .any(|r| matches!(*r, "refusal" | "content_filter"))),
            );
            count("tool_calls", yes(reasons.contains(&"tool_calls")));
            count(
                "served_model",
                response.and_then(|r| r.model).unwrap_or("none"),
            );
        }
        let decided: BTreeSet<(&str, &str)> = l
            .policy
            .iter()
            .flat_map(|p| &p.decisions)
            .filter_map(|d| Some((d.name?, d.effect?)))
            .collect();
        for (entity, n) in &l.redactions {
            if *n > 0 {
                count(&format!("redactions:{entity}"), "yes");
            }
        }
        for (name, effect) in decided {
            count(&format!("policy:{name}"), effect);
        }
    }
}

/// Compares the two windows of `sources`.
pub fn compare(sources: &[&dyn TrailSource], q: &DriftQuery) -> Result<DriftReport, AuditError> {
    type Groups = BTreeMap<(String, String), (Side, Side)>;
    let mut groups: Groups = BTreeMap::new();
    let mut changes: Vec<(i64, serde_json::Value)> = Vec::new();
    let (lo, hi) = (q.baseline.0.min(q.window.0), q.baseline.1.max(q.window.1));
    let mut report = DriftReport {
        changes: Vec::new(),
        dimensions: Vec::new(),
        baseline_records: 0,
        window_records: 0,
    };
    for source in sources {
        reader::for_each_line_overlapping(*source, (lo, hi), |line| {
            let Ok(l) = serde_json::from_slice::<Line>(line) else {
                return ControlFlow::Continue(());
            };
            if l.schema == Some(crate::record::EVENT_SCHEMA) {
                if l.event.as_ref().is_some_and(|e| e.kind == "drift") {
                    note_change(line, q, &mut changes);
                }
                return ControlFlow::Continue(());
            }
            let Some(ms) = l.time.as_ref().and_then(|t| start_ms(t.start)) else {
                return ControlFlow::Continue(());
            };
            let in_base = ms >= q.baseline.0 && ms < q.baseline.1;
            let in_window = ms >= q.window.0 && ms < q.window.1;
            if !in_base && !in_window {
                return ControlFlow::Continue(());
            }
            let route = l.route.unwrap_or("none");
            let g = l.gen_ai.as_ref();
            let model = g
                .and_then(|g| g.request.as_ref()?.model)
                .or_else(|| g.and_then(|g| g.response.as_ref()?.model))
                .unwrap_or("none");
            if q.route.as_deref().is_some_and(|r| r != route)
                || q.model.as_deref().is_some_and(|m| m != model)
            {
                return ControlFlow::Continue(());
            }
            let mut key = (route.to_owned(), model.to_owned());
            if model.len() > 256 || (!groups.contains_key(&key) && groups.len() >= MAX_GROUPS) {
                key.1 = "other".to_owned();
            }
            let (base, window) = groups.entry(key).or_default();
            if in_base {
                base.add(&l);
                report.baseline_records += 1;
            }
            if in_window {
                window.add(&l);
                report.window_records += 1;
            }
            ControlFlow::Continue(())
        })?;
    }
    changes.sort_by_key(|c| c.0);
    report.changes = changes.into_iter().map(|c| c.1).collect();
    for ((route, model), (base, window)) in groups {
        let too_few = base.records < q.min_records || window.records < q.min_records;
        let names: BTreeSet<&'static str> = base
            .numbers
            .keys()
            .chain(window.numbers.keys())
            .copied()
            .collect();
        for name in names {
            let empty = Reservoir::default();
            let a = base.numbers.get(name).unwrap_or(&empty);
            let b = window.numbers.get(name).unwrap_or(&empty);
            let mut a = a.values.clone();
            let mut b = b.values.clone();
            a.sort_by(f64::total_cmp);
            b.sort_by(f64::total_cmp);
            let psi = numeric_psi(&a, &b);
            report.dimensions.push(Dimension {
                route: route.clone(),
                model: model.clone(),
                name: name.to_owned(),
                psi,
                verdict: verdict(psi, too_few || a.is_empty() || b.is_empty()),
                baseline_n: a.len(),
                window_n: b.len(),
                median: Some((quantile(&a, 0.5), quantile(&b, 0.5))),
                p95: Some((quantile(&a, 0.95), quantile(&b, 0.95))),
                shares: BTreeMap::new(),
            });
        }
        let dims: BTreeSet<&String> = base
            .categories
            .keys()
            .chain(window.categories.keys())
            .collect();
        for dim in dims {
            let empty = BTreeMap::new();
            let a = base.categories.get(dim).unwrap_or(&empty);
            let b = window.categories.get(dim).unwrap_or(&empty);
            // A per-entity or per-rule dimension counts only records that had one: the
            // rest of the side's records are its `no`.
            let (na, nb) = if dim.starts_with("redactions:") || dim.starts_with("policy:") {
                (base.records as u64, window.records as u64)
            } else {
                (a.values().sum(), b.values().sum())
            };
            let mut shares = BTreeMap::new();
            let cats: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for c in cats {
                let share = |m: &BTreeMap<String, u64>, n: u64| {
                    if n == 0 {
                        0.0
                    } else {
                        m.get(c).copied().unwrap_or(0) as f64 / n as f64
                    }
                };
                shares.insert(c.clone(), (share(a, na), share(b, nb)));
            }
            let rest = |side: usize| {
                1.0 - shares
                    .values()
                    .map(|s| if side == 0 { s.0 } else { s.1 })
                    .sum::<f64>()
            };
            let (ra, rb) = (rest(0), rest(1));
            if ra > 1e-12 || rb > 1e-12 {
                shares.insert("(none)".into(), (ra.max(0.0), rb.max(0.0)));
            }
            let psi = psi(shares.values().copied());
            report.dimensions.push(Dimension {
                route: route.clone(),
                model: model.clone(),
                name: dim.clone(),
                psi,
                verdict: verdict(psi, too_few || na == 0 || nb == 0),
                baseline_n: na as usize,
                window_n: nb as usize,
                median: None,
                p95: None,
                shares,
            });
        }
    }
    report.dimensions.sort_by(|x, y| {
        (x.verdict == "too_few")
            .cmp(&(y.verdict == "too_few"))
            .then(y.psi.total_cmp(&x.psi))
            .then_with(|| (&x.route, &x.model, &x.name).cmp(&(&y.route, &y.model, &y.name)))
    });
    Ok(report)
}

/// A `drift` event whose first record on the new model falls in the window (the event
/// is written just after it, when the writer gets to it).
fn note_change(line: &[u8], q: &DriftQuery, changes: &mut Vec<(i64, serde_json::Value)>) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else {
        return;
    };
    let e = &v["event"];
    let Some(ms) = e["first_after"]["time"].as_str().and_then(start_ms) else {
        return;
    };
    let wanted = ms >= q.window.0
        && ms < q.window.1
        && q.route.as_deref().is_none_or(|r| e["route"] == r)
        && q.model.as_deref().is_none_or(|m| e["requested_model"] == m);
    if wanted {
        changes.push((ms, v));
    }
}

fn verdict(psi: f64, too_few: bool) -> &'static str {
    if too_few {
        "too_few"
    } else if psi >= SHIFTED {
        "shifted"
    } else if psi >= MOVED {
        "moved"
    } else {
        "stable"
    }
}

/// PSI over paired shares, each floored so that a category one side lacks counts.
fn psi(pairs: impl Iterator<Item = (f64, f64)>) -> f64 {
    const FLOOR: f64 = 1e-4;
    pairs
        .map(|(a, b)| {
            let (a, b) = (a.max(FLOOR), b.max(FLOOR));
            (b - a) * (b / a).ln()
        })
        .sum()
}

/// PSI of two sorted samples over the baseline's deciles (ties merged, so a constant
/// baseline makes two bins: at it, and above).
fn numeric_psi(a: &[f64], b: &[f64]) -> f64 {
    if a.is_empty() || b.is_empty() {
        return 0.0;
    }
    let mut edges: Vec<f64> = (1..10).map(|i| quantile(a, f64::from(i) / 10.0)).collect();
    edges.dedup();
    let shares = |s: &[f64]| {
        let mut counts = vec![0u64; edges.len() + 1];
        for v in s {
            let bin = edges.partition_point(|e| e < v);
            counts[bin] += 1;
        }
        counts
            .into_iter()
            .map(|c| c as f64 / s.len() as f64)
            .collect::<Vec<_>>()
    };
    psi(shares(a).into_iter().zip(shares(b)))
}

/// The `q` quantile of a sorted sample (nearest rank); 0 for none.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let at = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[at]
}

/// The report as text: the recorded changes first, then every dimension that moved,
/// most first (`all`: the stable ones too).
pub fn render(r: &DriftReport, all: bool) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for c in &r.changes {
        let e = &c["event"];
        let _ = writeln!(
            out,
            "CHANGE  {} {}: {} -> {} ({}) at {} (seq {}; last before: seq {})",
            e["route"].as_str().unwrap_or("?"),
            e["requested_model"].as_str().unwrap_or("?"),
            e["from"]["model"].as_str().unwrap_or("?"),
            e["to"]["model"].as_str().unwrap_or("?"),
            e["kind"].as_str().unwrap_or("?"),
            e["first_after"]["time"].as_str().unwrap_or("?"),
            e["first_after"]["seq"],
            e["last_before"]["seq"],
        );
    }
    let _ = writeln!(
        out,
        "{} records in the baseline, {} in the window",
        r.baseline_records, r.window_records
    );
    let _ = writeln!(
        out,
        "{:<8} {:<16} {:<24} {:<24} {:>7}  {:<13} change",
        "verdict", "route", "model", "dimension", "psi", "records"
    );
    for d in r.dimensions.iter().filter(|d| all || d.verdict != "stable") {
        let change = match (d.median, d.p95) {
            (Some(m), Some(p)) => format!(
                "median {:.1} -> {:.1}, p95 {:.1} -> {:.1}",
                m.0, m.1, p.0, p.1
            ),
            _ => {
                let mut moved: Vec<(&String, &(f64, f64))> = d.shares.iter().collect();
                moved.sort_by(|x, y| (y.1 .1 - y.1 .0).abs().total_cmp(&(x.1 .1 - x.1 .0).abs()));
                moved
                    .iter()
                    .take(3)
                    .map(|(c, s)| format!("{c} {:.0}% -> {:.0}%", s.0 * 100.0, s.1 * 100.0))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        let _ = writeln!(
            out,
            "{:<8} {:<16} {:<24} {:<24} {:>7.3}  {:<13} {change}",
            d.verdict,
            d.route,
            d.model,
            d.name,
            d.psi,
            format!("{}/{}", d.baseline_n, d.window_n),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psi_is_zero_for_the_same_sample_and_large_for_a_shift() {
        let a: Vec<f64> = (0..1000).map(f64::from).collect();
        assert!(numeric_psi(&a, &a) < 1e-9);
        let b: Vec<f64> = (500..1500).map(f64::from).collect();
        assert!(numeric_psi(&a, &b) > SHIFTED);
        let constant = vec![3.0; 50];
        assert!(numeric_psi(&constant, &constant) < 1e-9);
    }

    #[test]
    fn finish_reasons_mean_the_same_across_providers() {
        assert_eq!(finish("content_filter"), "content_filter");
        assert_eq!(finish("refusal"), "refusal");
        assert_eq!(finish("SAFETY"), "refusal");
        assert_eq!(finish("tool_use"), "tool_calls");
        assert_eq!(finish("end_turn"), "stop");
        assert_eq!(finish("MAX_TOKENS"), "length");
    }

    #[test]
    fn quantiles_by_nearest_rank() {
        let s = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile(&s, 0.5), 2.0);
        assert_eq!(quantile(&s, 0.95), 4.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
    }
}
