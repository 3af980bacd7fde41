//! `custody policy`: check rules before they are put in force, and try them on
//! exported records.

use std::{
    collections::BTreeMap,
    io::{BufRead, Write},
    path::PathBuf,
    process::ExitCode,
};

use anyhow::Context;
use clap::Subcommand;
use custody_audit::policy::{Facts, Phase, PolicySet};

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Compile every rule of FILE (a configuration, or a file of only `[[policy]]`,
    /// `[policy_terms]` and `[redaction]`); each fault names its rule and position.
    Check { file: PathBuf },
    /// Replay exported records (JSON Lines on standard input, as `custody log search
    /// --json` writes them) against the rules of --config, and print what would have
    /// matched: a rule is tried on last week's traffic before it is put in force.
    /// Records hold redacted text: a rule on an entity's value sees its marker.
    Test {
        #[arg(long)]
        config: PathBuf,
        /// One JSON object per matching record instead of a table.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(command: PolicyCommand) -> anyhow::Result<ExitCode> {
    match command {
        PolicyCommand::Check { file } => check(&file),
        PolicyCommand::Test { config, json } => test(&config, json),
    }
}

fn check(file: &std::path::Path) -> anyhow::Result<ExitCode> {
    let config = custody_config::policy::load_rules(file)?;
    let faults = PolicySet::faults(&config);
    for f in &faults {
        eprintln!("{}: {f}", file.display());
    }
    if !faults.is_empty() {
        eprintln!(
            "{}: {} of {} rules do not compile",
            file.display(),
            faults.len(),
            config.policies.len()
        );
        return Ok(ExitCode::FAILURE);
    }
    let set = PolicySet::from_config(&config)?;
    for r in set.rules() {
        let p = &r.policy;
        println!(
            "ok  {:<24} {:<9} {:<8} {:<8} {}",
            p.name,
            p.action.as_str(),
            p.severity.as_str(),
            p.mode.as_str(),
            p.routes
                .as_ref()
                .map_or_else(|| "every route".to_owned(), |r| r.join(","))
        );
    }
    println!(
        "{}: {} rules, {} term lists, policy version {}",
        file.display(),
        set.rules().len(),
        config.policy_terms.len(),
        set.version()
    );
    Ok(ExitCode::SUCCESS)
}

fn test(config: &std::path::Path, json: bool) -> anyhow::Result<ExitCode> {
    let config = custody_config::policy::load_rules(config)?;
    let set = PolicySet::from_config(&config)?;
    let mut stdin = std::io::stdin().lock();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let (mut records, mut matched, mut unreadable) = (0u64, 0u64, 0u64);
    let mut by_rule: BTreeMap<String, u64> = BTreeMap::new();
    let mut line = Vec::new();
    for n in 1.. {
        match bounded_line(&mut stdin, &mut line, MAX_RECORD_LINE)
            .context("reading standard input")?
        {
            Line::End => break,
            Line::TooLong => {
                eprintln!("line {n}: longer than {MAX_RECORD_LINE} bytes; skipped");
                unreadable += 1;
                continue;
            }
            Line::Read => {}
        }
        if line.trim_ascii().is_empty() {
            continue;
        }
        let Ok(record) = serde_json::from_slice::<serde_json::Value>(&line) else {
            eprintln!("line {n}: not a JSON record");
            unreadable += 1;
            continue;
        };
        if record["schema"].as_str() == Some(custody_audit::record::EVENT_SCHEMA) {
            continue;
        }
        records += 1;
        let verdict = set.evaluate(&Facts::from_record(&record), Phase::Replay);
        if verdict.decisions.is_empty() {
            continue;
        }
        matched += 1;
        for d in &verdict.decisions {
            *by_rule.entry(d.name.clone()).or_default() += 1;
        }
        let id = record["id"].as_str().unwrap_or("-");
        if json {
            let v = serde_json::json!({
                "id": id,
                "time": record["time"]["start"],
                "route": record["route"],
                "decisions": verdict.decisions,
            });
            writeln!(out, "{v}")?;
        } else {
            for d in &verdict.decisions {
                let effect = serde_json::to_value(d.effect)?;
                writeln!(
                    out,
                    "{id}  {:<24} {:<9} {:<8} {}{}",
                    d.name,
                    d.action.as_str(),
                    d.severity.as_str(),
                    effect.as_str().unwrap_or("-"),
                    d.error
                        .as_deref()
                        .map(|e| format!(" ({e})"))
                        .unwrap_or_default()
                )?;
            }
        }
    }
    out.flush()?;
    eprintln!(
        "{records} records, {matched} matched (policy version {})",
        set.version()
    );
    for (rule, n) in &by_rule {
        eprintln!("  {rule}: {n}");
    }
    if unreadable > 0 {
        anyhow::bail!("{unreadable} input line(s) are not JSON records");
    }
    Ok(ExitCode::SUCCESS)
}

/// Longest exported record `policy test` reads: two bodies at the largest
/// `decoded_max_bytes` anyone sets, escaped, with room to spare.
const MAX_RECORD_LINE: u64 = 256 * 1024 * 1024;

enum Line {
    Read,
    TooLong,
    End,
}

/// Reads one line into `buf` (without its newline), holding at most `max` bytes of
/// it: a longer line is consumed and reported, never held.
fn bounded_line<R: BufRead>(input: &mut R, buf: &mut Vec<u8>, max: u64) -> std::io::Result<Line> {
    buf.clear();
    let n = <&mut R as std::io::Read>::take(input, max + 1).read_until(b'\n', buf)?;
    if n == 0 {
        return Ok(Line::End);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        return Ok(Line::Read);
    }
    if (buf.len() as u64) <= max {
        // The last line, without a newline.
        return Ok(Line::Read);
    }
    // Past the limit: drop the rest of the line as it streams by.
    buf.clear();
    loop {
        let chunk = input.fill_buf()?;
        if chunk.is_empty() {
            return Ok(Line::TooLong);
        }
        match memchr::memchr(b'\n', chunk) {
            Some(i) => {
                input.consume(i + 1);
                return Ok(Line::TooLong);
            }
            None => {
                let len = chunk.len();
                input.consume(len);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_past_the_limit_is_skipped_without_being_held() {
        let input = b"short\nthis one is too long\n{\"x\":1}\nlast";
        let mut r = std::io::BufReader::with_capacity(4, &input[..]);
        let mut buf = Vec::new();
        let mut seen = Vec::new();
        loop {
            match bounded_line(&mut r, &mut buf, 8).unwrap() {
                Line::End => break,
                Line::TooLong => seen.push("(too long)".to_owned()),
                Line::Read => seen.push(String::from_utf8(buf.clone()).unwrap()),
            }
            assert!(buf.len() <= 9);
        }
        assert_eq!(seen, ["short", "(too long)", "{\"x\":1}", "last"]);
    }
}
