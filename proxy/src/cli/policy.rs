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
    let stdin = std::io::stdin().lock();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let (mut records, mut matched, mut unreadable) = (0u64, 0u64, 0u64);
    let mut by_rule: BTreeMap<String, u64> = BTreeMap::new();
    for (n, line) in stdin.lines().enumerate() {
        let line = line.context("reading standard input")?;
        if line.trim().is_empty() {
            continue;
        }
        let Ok(record) = serde_json::from_str::<serde_json::Value>(&line) else {
            eprintln!("line {}: not a JSON record", n + 1);
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
