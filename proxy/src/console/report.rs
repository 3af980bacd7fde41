//! The human-readable report inside an evidence bundle: one self-contained HTML file
//! (the console's stylesheet inline, no script), opened in any browser from the
//! unpacked bundle.

use custody_audit::review::{
    bundle::{self, BundleError, Contents, KeyInfo, Manifest, Selection},
    reader::TrailSource,
    verify::{self, VerifyError},
};
use custody_audit::signing::VerifyingKey;
use maud::{html, Markup, PreEscaped, DOCTYPE};
use serde_json::Value;

const STYLE: &str = include_str!("style.css");

fn text(v: &Value) -> String {
    match v {
        Value::Null => "—".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn record_row(r: &Value, head_of: &dyn Fn(u64) -> usize) -> Markup {
    let g = &r["gen_ai"];
    let model = if g["response"]["model"].is_null() {
        &g["request"]["model"]
    } else {
        &g["response"]["model"]
    };
    let user = if r["client"]["user"].is_null() {
        &r["client"]["end_user"]
    } else {
        &r["client"]["user"]
    };
    let usage = &g["usage"];
    let seq = r["seq"].as_u64().unwrap_or(0);
    html! {
        tr {
            td { (text(&r["time"]["start"])) }
            td.mono { (text(&r["id"])) }
            td { (seq) }
            td { (text(&r["route"])) }
            td { (text(model)) }
            td { (text(user)) }
            td { (text(&r["client"]["team"])) }
            td { (text(&r["http"]["status"])) }
            td { (text(&r["outcome"])) }
            td { (text(&usage["input_tokens"])) " / " (text(&usage["output_tokens"])) }
            td { (r["policy"]["decisions"].as_array().map_or(0, Vec::len)) }
            td { "H" (head_of(seq)) }
        }
    }
}

/// The report for a bundle's contents (records and config events parsed from them).
pub fn bundle_report(c: &Contents) -> String {
    let m = &c.manifest;
    let parse = |l: &Vec<u8>| serde_json::from_slice::<Value>(l).unwrap_or(Value::Null);
    let records: Vec<Value> = c.records.iter().map(parse).collect();
    let config: Vec<Value> = c.config.iter().map(parse).collect();
    let heads: Vec<Value> = c.heads.iter().map(parse).collect();
    // Which head (numbered as listed) each record's proof leads to.
    let head_of = |seq: u64| {
        c.proofs
            .iter()
            .find(|p| p.seq == seq)
            .and_then(|p| c.heads.iter().position(|h| h == p.head.as_bytes()))
            .map_or(0, |i| i + 1)
    };
    let s = &m.selection;
    let page = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { "Custody evidence bundle" }
                style { (PreEscaped(STYLE)) }
            }
            body {
                main {
                    h1 { "Evidence bundle" }
                    p { "Made " (m.created) " by " (m.requested_by) " from " (m.trail) "." }
                    h2 { "Summary" }
                    table.summary {
                        tr { th { "window" } td { (s.since) " to " (s.until) } }
                        @for (name, value) in s.filters() {
                            @if let Some(v) = value { tr { th { (name) } td.mono { (v) } } }
                        }
                        tr { th { "records" } td { (m.records) } }
                        tr { th { "configuration events" } td { (m.config_events) } }
                        tr { th { "complete" } td { @if m.complete { "yes" } @else { strong { "no" } } ": " (m.completeness) } }
                        tr { th { "signing key" } td.mono { (m.key.public) } }
                        tr { th { "key fingerprint (SHA-256)" } td.mono { (m.key.fingerprint) } }
                        tr { th { "trail at bundling" } td { "verified up to seq " (m.trail_last_seq) @if let Some(cp) = &m.trail_newest_checkpoint { "; newest checkpoint " (cp) } } }
                    }
                    p {
                        "Check it offline, with nothing but this bundle and the public key you trust: "
                        code { "custody log verify --bundle FILE --pubkey KEY" }
                        ". Each record below comes with an inclusion proof to the signed tree head listed under "
                        em { "Signed heads" } "."
                    }
                    h2 { "Records" }
                    @if records.is_empty() {
                        p { "No record matches the selection in this window." }
                    } @else {
                        table.records {
                            thead { tr {
                                th { "started" } th { "id" } th { "seq" } th { "route" } th { "model" }
                                th { "user" } th { "team" } th { "status" } th { "outcome" }
                                th { "tokens in / out" } th { "policy decisions" } th { "head" }
                            } }
                            tbody { @for r in &records { (record_row(r, &head_of)) } }
                        }
                    }
                    h2 { "Configuration in force" }
                    @if config.is_empty() {
                        p { "No configuration event is held for this window." }
                    } @else {
                        table {
                            thead { tr { th { "written" } th { "seq" } th { "version" } th { "policy version" } } }
                            tbody { @for e in &config { tr {
                                td { (text(&e["time"]["start"])) }
                                td { (text(&e["seq"])) }
                                td.mono { (text(&e["event"]["version"])) }
                                td.mono { (text(&e["event"]["policy_version"])) }
                            } } }
                        }
                    }
                    h2 { "Signed heads" }
                    table {
                        thead { tr { th { "" } th { "kind" } th { "signed" } th { "records covered" } th { "tree head" } } }
                        tbody { @for (i, h) in heads.iter().enumerate() { tr {
                            td { "H" (i + 1) }
                            td { (text(&h["kind"])) @if let Some(n) = h["segment"].as_u64() { " of segment " (n) } }
                            td { (text(&h["time"])) }
                            td { (text(&h["tree"]["size"])) }
                            td.mono { (text(&h["tree"]["root"])) }
                        } } }
                    }
                    h2 { "What this bundle proves" }
                    ul {
                        li { "Each record is, byte for byte, the record the holder of the signing key had in its trail at that place when it signed the head its proof leads to." }
                        li { "The records match the selection above and started inside the window." }
                        li { "The configuration events are those the trail held for the window." }
                    }
                    h2 { "What it does not prove" }
                    ul {
                        li { "That a record's content is true: the trail shows what custody saw pass, redacted as configured." }
                        li { "Completeness on its own: the other records of the window are not in the bundle, so the statement above is the bundler's, made from the whole trail when the bundle was made." }
                        li { "Who made the bundle: the manifest is not signed; compare the bundle's SHA-256 with the one its maker recorded." }
                    }
                }
            }
        }
    };
    page.into_string()
}

/// Makes an evidence bundle of `selection` from a trail and writes it to `out`: the
/// trail is verified against `key` first (fast mode), and refused if it does not hold.
/// Returns the bundle's SHA-256 (hex) and how many records it holds.
pub fn make_bundle(
    source: &dyn TrailSource,
    key: &VerifyingKey,
    selection: Selection,
    requested_by: String,
    max_records: usize,
    out: impl std::io::Write,
) -> Result<(String, usize), BundleError> {
    let verified = match verify::verify_source(source, Some(key), verify::Depth::Fast, |_, _, _| {})
    {
        Ok(r) => r,
        Err(VerifyError::Broken(b)) => {
            return Err(BundleError::Invalid(format!(
                "the trail does not verify ({b}): no bundle made; run custody log verify"
            )))
        }
        Err(VerifyError::Audit(e)) => return Err(e.into()),
    };
    let selected = bundle::collect(source, &selection, max_records)?;
    let manifest = Manifest {
        kind: bundle::KIND.into(),
        created: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        requested_by,
        trail: source.describe(),
        selection,
        records: 0,
        config_events: 0,
        key: KeyInfo::of(key),
        trail_last_seq: verified.last_seq.unwrap_or(0),
        trail_newest_checkpoint: verified.newest_checkpoint.map(|c| c.0),
        complete: false,
        completeness: String::new(),
        files: Default::default(),
    };
    let contents = bundle::prove(source, manifest, selected)?;
    let report = bundle_report(&contents);
    let n = contents.records.len();
    Ok((bundle::write(out, contents, &report)?, n))
}
