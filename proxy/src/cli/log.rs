//! `custody log ...`: export, show, search, verify.

use std::{
    io::{BufWriter, Write},
    ops::ControlFlow,
    path::PathBuf,
    process::ExitCode,
};

use anyhow::Context;
use clap::{Args, Subcommand};
use custody_audit::{
    review::reader::{self, TrailSource},
    review::search::{self, Query, StatusFilter},
    review::verify::{self, VerifyError},
    signing,
};

use super::trail::{when, TrailArgs};

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ExportFormat {
    Jsonl,
    Parquet,
}

#[derive(Subcommand)]
pub enum LogCommand {
    /// Write every record as JSON Lines, oldest first (the stored bytes, verifiable);
    /// with `--from`, each shipped trail in turn.
    Export {
        #[command(flatten)]
        trail: TrailArgs,
        /// Write here instead of standard output (required for Parquet).
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// `jsonl`: the stored lines. `parquet`: one row per line, typed columns for the
        /// fields reviewers filter on, and the whole line in `record` (docs/scaling.md).
        #[arg(long, value_enum, default_value_t = ExportFormat::Jsonl)]
        format: ExportFormat,
    },
    /// Print one record by id.
    Show {
        id: String,
        #[command(flatten)]
        trail: TrailArgs,
    },
    /// Find records, newest first.
    Search(Box<SearchArgs>),
    /// Print the conversation a record belongs to, turn by turn, oldest first.
    Chain {
        id: String,
        #[command(flatten)]
        trail: TrailArgs,
        /// Whole records as JSON Lines.
        #[arg(long)]
        json: bool,
    },
    /// Print inclusion proofs for records (to the newest checkpoint's signed tree head),
    /// or a consistency proof since an earlier checkpoint: checked by `verify --proof`
    /// with the public key alone.
    Prove(Box<super::evidence::ProveArgs>),
    /// Write an evidence bundle: the records one filter selects over one window, their
    /// proofs, the signed heads, the configuration in force, the public key, a manifest
    /// and an HTML report, in one zstd-compressed tar; checked by `verify --bundle`.
    Bundle(Box<super::evidence::BundleArgs>),
    /// Check every checksum, record hash, chain link, sequence number, seal, checkpoint
    /// and tree head; or, with --proof, proofs from `log prove`.
    Verify {
        #[command(flatten)]
        trail: TrailArgs,
        /// The trusted public key (`custody keygen`): every seal and checkpoint must be signed by it.
        #[arg(long)]
        pubkey: Option<PathBuf>,
        /// Accept records written after the newest checkpoint (a live trail between checkpoints).
        #[arg(long)]
        allow_uncovered_tail: bool,
        /// Check sealed segments through their signed SHA-256 instead of re-hashing every
        /// record: disk speed. Needs --pubkey.
        #[arg(long, requires = "pubkey")]
        fast: bool,
        /// Check the proofs in this file (from `log prove`) instead of a trail: needs
        /// only --pubkey.
        #[arg(long, value_name = "FILE", conflicts_with = "bundle")]
        proof: Option<PathBuf>,
        /// Check this evidence bundle (from `log bundle`) instead of a trail: needs only
        /// --pubkey.
        #[arg(long, value_name = "FILE")]
        bundle: Option<PathBuf>,
    },
    /// Purge one person's request and response bodies from every segment (a data
    /// subject's request): every other field, the chain, the seals and the tree heads
    /// stay verifiable, and the purge is recorded as an event. Run it where custody
    /// writes the trail, with custody stopped (the trail has one writer).
    Purge {
        /// The configuration custody runs with (its `[audit]`: directory, keys).
        #[arg(long)]
        config: Option<PathBuf>,
        /// The person, as applications send it (`user`, `metadata.user_id`, a virtual
        /// key's user); an e-mail address is matched in its stored, pseudonymized form.
        #[arg(
            long,
            required_unless_present = "pseudonym",
            conflicts_with = "pseudonym"
        )]
        user: Option<String>,
        /// A pseudonym as redaction wrote it (`[EMAIL:1a2b3c4d]`): every record that
        /// carries it, anywhere.
        #[arg(long)]
        pseudonym: Option<String>,
    },
    /// Compare two windows per route and model: served-model changes first, then every
    /// dimension that moved (latency, time to first token, tokens, finish reasons and
    /// refusals, errors, rate limits, tool calls, served model, redactions per entity,
    /// policy decisions per rule), with its PSI, median and p95 shift, and a verdict.
    Drift(Box<DriftArgs>),
    /// Export the trail as a property graph: users, teams, keys, sessions,
    /// conversations, prompts and completions (by hash), served models, routes,
    /// configuration versions and policies, linked through each exchange. CSV (a
    /// directory of node and edge files, with `kuzu.cypher` to load them) or GraphML.
    Graph(Box<GraphArgs>),
    /// List a trail's segments; with `--from`, every trail shipped there, one per source (pod).
    Ls {
        #[command(flatten)]
        trail: TrailArgs,
    },
}

#[derive(Args)]
pub struct DriftArgs {
    #[command(flatten)]
    trail: TrailArgs,
    /// The reference window, `SINCE..UNTIL`: RFC 3339 times or ages (`14d..7d`).
    #[arg(long)]
    baseline: String,
    /// The window compared with it, `SINCE..UNTIL` (`7d..0s` for the last week).
    #[arg(long)]
    window: String,
    #[arg(long)]
    route: Option<String>,
    /// The requested model.
    #[arg(long)]
    model: Option<String>,
    /// Fewer records than this on either side: `too_few` rather than a verdict.
    #[arg(long, default_value_t = 30)]
    min_records: usize,
    /// Every dimension, the stable ones too.
    #[arg(long)]
    all: bool,
    /// The report as JSON.
    #[arg(long)]
    json: bool,
}

/// An RFC 3339 time or an age, as Unix ms.
fn unix_ms(t: &str) -> anyhow::Result<i64> {
    let d = when(t)?
        .duration_since(std::time::UNIX_EPOCH)
        .context("a time before 1970")?;
    Ok(i64::try_from(d.as_millis())?)
}

/// `SINCE..UNTIL` as Unix ms.
fn window(s: &str) -> anyhow::Result<(i64, i64)> {
    let (since, until) = s
        .split_once("..")
        .with_context(|| format!("`{s}` is not a window: SINCE..UNTIL"))?;
    let (since, until) = (unix_ms(since)?, unix_ms(until)?);
    anyhow::ensure!(since < until, "`{s}`: the window ends before it starts");
    Ok((since, until))
}

fn drift(a: DriftArgs) -> anyhow::Result<ExitCode> {
    use custody_audit::review::drift::{compare, render, DriftQuery};
    let q = DriftQuery {
        baseline: window(&a.baseline).context("--baseline")?,
        window: window(&a.window).context("--window")?,
        route: a.route,
        model: a.model,
        min_records: a.min_records,
    };
    let trails = a.trail.open()?;
    let sources: Vec<&dyn TrailSource> = trails.sources.iter().map(|s| s.as_ref()).collect();
    let report = compare(&sources, &q)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report, a.all));
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum GraphFormat {
    Csv,
    Graphml,
}

#[derive(Args)]
pub struct GraphArgs {
    #[command(flatten)]
    trail: TrailArgs,
    /// Records that started at or after: RFC 3339 or an age (`7d`). Default: the first.
    #[arg(long)]
    since: Option<String>,
    /// Records that started before: RFC 3339 or an age. Default: now.
    #[arg(long)]
    until: Option<String>,
    #[arg(long, value_enum)]
    format: GraphFormat,
    /// Where: a new directory for CSV; a file for GraphML (default: standard output).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

fn graph(a: GraphArgs) -> anyhow::Result<ExitCode> {
    use custody_audit::review::graph::{export, CsvDir, GraphMl, GraphSink};
    let since = a
        .since
        .as_deref()
        .map(unix_ms)
        .transpose()
        .context("--since")?;
    let until = a
        .until
        .as_deref()
        .map(unix_ms)
        .transpose()
        .context("--until")?;
    let bounds = (since.unwrap_or(i64::MIN), until.unwrap_or(i64::MAX));
    anyhow::ensure!(bounds.0 < bounds.1, "--until is not after --since");
    let trails = a.trail.open()?;
    let sources: Vec<&dyn TrailSource> = trails.sources.iter().map(|s| s.as_ref()).collect();
    let sink: Box<dyn GraphSink> = match (a.format, &a.out) {
        (GraphFormat::Csv, Some(dir)) => Box::new(CsvDir::create(dir)?),
        (GraphFormat::Csv, None) => {
            anyhow::bail!("--format csv writes a directory: name it with --out")
        }
        (GraphFormat::Graphml, Some(file)) => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(file)
                .with_context(|| format!("{}", file.display()))?;
            Box::new(GraphMl::new(std::io::BufWriter::new(f))?)
        }
        (GraphFormat::Graphml, None) => Box::new(GraphMl::new(std::io::BufWriter::new(
            std::io::stdout().lock(),
        ))?),
    };
    let s = export(&sources, bounds, sink)?;
    eprintln!(
        "{} exchanges, {} nodes, {} edges",
        s.exchanges, s.nodes, s.edges
    );
    if s.unreadable > 0 {
        eprintln!(
            "warning: {} record line(s) did not parse and are not in the graph",
            s.unreadable
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct SearchArgs {
    #[command(flatten)]
    trail: TrailArgs,
    /// Records that started at or after: RFC 3339 (`2026-11-29T10:00:00Z`) or an age (`1h`, `2days`).
    #[arg(long)]
    since: Option<String>,
    /// Records that started before: RFC 3339 or an age.
    #[arg(long)]
    until: Option<String>,
    /// Requested or served model, by prefix.
    #[arg(long)]
    model: Option<String>,
    #[arg(long)]
    route: Option<String>,
    /// An HTTP status (`429`) or class (`5xx`).
    #[arg(long)]
    status: Option<StatusFilter>,
    #[arg(long)]
    key_id: Option<String>,
    /// `ok`, `client_cancelled`, `upstream_error`, `upstream_timeout`, `rejected` or
    /// `blocked` (by a policy).
    #[arg(long)]
    outcome: Option<String>,
    /// Records a policy decided on (matched, or failed to evaluate).
    #[arg(long)]
    policy: Option<String>,
    /// Records with a policy decision of this severity or above (`low`, `medium`,
    /// `high`, `critical`).
    #[arg(long, value_parser = severity)]
    severity: Option<custody_config::Severity>,
    /// Records where this redaction entity fired (`EMAIL_ADDRESS`, `OPENAI_API_KEY`...).
    #[arg(long)]
    entity: Option<String>,
    /// Case-insensitive text anywhere in the (redacted) record.
    #[arg(long)]
    text: Option<String>,
    /// `client.user` (the virtual key's user) or the end user the request named, as the
    /// client sent it: a value holding an e-mail address or another entity is stored
    /// pseudonymized, and its stored form is derived with the deployment's fingerprint
    /// key (`<dir>/fingerprint.key`, or `--key-file`).
    #[arg(long)]
    user: Option<String>,
    /// The deployment's fingerprint key, for `--user` values stored pseudonymized
    /// (default: `fingerprint.key` in the audit directory).
    #[arg(long)]
    key_file: Option<PathBuf>,
    #[arg(long)]
    team: Option<String>,
    /// Every output produced from one prompt (`prompt.hash`).
    #[arg(long)]
    prompt_hash: Option<String>,
    /// `session.id`.
    #[arg(long)]
    session: Option<String>,
    /// W3C trace id (`trace.id`).
    #[arg(long)]
    trace_id: Option<String>,
    /// The trail's events (config, recovery, retention) instead of its records.
    #[arg(long)]
    events: bool,
    /// The record with this id and every event naming it: in a console's access trail
    /// (`--dir ACCESS_DIR`), who read it, when, from where.
    #[arg(long)]
    record: Option<String>,
    #[arg(long, default_value_t = 50)]
    limit: usize,
    /// Whole records as JSON Lines instead of a table.
    #[arg(long)]
    json: bool,
}

fn severity(s: &str) -> Result<custody_config::Severity, String> {
    serde_json::from_value(serde_json::Value::String(s.to_ascii_lowercase()))
        .map_err(|_| format!("`{s}` is not low, medium, high or critical"))
}

pub fn run(command: LogCommand) -> anyhow::Result<ExitCode> {
    match command {
        LogCommand::Export {
            trail,
            output,
            format: ExportFormat::Parquet,
        } => {
            let path = output.context("Parquet needs a file: pass --output FILE")?;
            let trails = trail.open()?;
            let file = std::fs::File::create(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            let mut export =
                custody_audit::review::export::ParquetExport::new(BufWriter::new(file))?;
            for source in &trails.sources {
                let name = source.describe();
                let mut failed = None;
                reader::for_each_line_of(source.as_ref(), |_, line| {
                    match export.push(&name, line) {
                        Ok(()) => ControlFlow::Continue(()),
                        Err(e) => {
                            failed = Some(e);
                            ControlFlow::Break(())
                        }
                    }
                })?;
                if let Some(e) = failed {
                    return Err(e.into());
                }
            }
            let rows = export.finish()?;
            eprintln!("{rows} row(s) written to {}", path.display());
            Ok(ExitCode::SUCCESS)
        }
        LogCommand::Export {
            trail,
            output,
            format: ExportFormat::Jsonl,
        } => {
            let trails = trail.open()?;
            let out: Box<dyn Write> = match &output {
                Some(p) => Box::new(
                    std::fs::File::create(p)
                        .with_context(|| format!("creating {}", p.display()))?,
                ),
                None => Box::new(std::io::stdout().lock()),
            };
            let mut out = BufWriter::new(out);
            let mut io_err = None;
            for source in &trails.sources {
                reader::for_each_line_of(source.as_ref(), |_, line| {
                    if let Err(e) = out.write_all(line).and_then(|()| out.write_all(b"\n")) {
                        io_err = Some(e);
                        return ControlFlow::Break(());
                    }
                    ControlFlow::Continue(())
                })?;
                if io_err.is_some() {
                    break;
                }
            }
            if let Some(e) = io_err {
                // A closed pipe (`| head`) is not an error worth a message.
                if e.kind() != std::io::ErrorKind::BrokenPipe {
                    return Err(e.into());
                }
            }
            out.flush().ok();
            Ok(ExitCode::SUCCESS)
        }
        LogCommand::Show { id, trail } => {
            let (_, line) = trail.open()?.find(&id)?;
            let v: serde_json::Value = serde_json::from_slice(&line)?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(ExitCode::SUCCESS)
        }
        LogCommand::Search(a) => {
            let query = Query {
                since: a.since.as_deref().map(when).transpose()?,
                until: a.until.as_deref().map(when).transpose()?,
                model: a.model,
                route: a.route,
                status: a.status,
                key_id: a.key_id,
                text: a.text,
                outcome: a.outcome,
                policy: a.policy,
                severity: a.severity,
                entity: a.entity,
                user: a
                    .user
                    .as_deref()
                    .map(|u| a.trail.user_token(u, a.key_file.as_deref()))
                    .transpose()?,
                team: a.team,
                prompt_hash: a.prompt_hash,
                session: a.session,
                trace: a.trace_id,
                events: a.events,
                record: a.record,
                routes_in: None,
                teams_in: None,
                limit: a.limit,
            };
            let trails = a.trail.open()?;
            let sources: Vec<&dyn TrailSource> =
                trails.sources.iter().map(|s| s.as_ref()).collect();
            let f = search::search_all(&sources, &query)?;
            for why in &f.untrusted_indexes {
                eprintln!("warning: index not trusted, segment read in full: {why}");
            }
            let (found, unreadable) = (f.records, f.unreadable);
            let mut out = BufWriter::new(std::io::stdout().lock());
            for raw in &found {
                if a.json {
                    writeln!(out, "{}", raw.get())?;
                    continue;
                }
                // One record parsed at a time.
                let r: serde_json::Value = serde_json::from_str(raw.get())?;
                if r["schema"].as_str() == Some(custody_audit::record::EVENT_SCHEMA) {
                    let e = &r["event"];
                    // An access event says who did what from where; others their type.
                    let who = match e["type"].as_str() {
                        Some("access") => format!(
                            "  {} {} {} {} {}",
                            e["reviewer"].as_str().unwrap_or("(none)"),
                            e["action"].as_str().unwrap_or("-"),
                            e["status"],
                            e["client"].as_str().unwrap_or("-"),
                            e["asked"].as_str().unwrap_or("-"),
                        ),
                        _ => String::new(),
                    };
                    writeln!(
                        out,
                        "{}  {}  seq {}  {}{who}",
                        r["time"]["start"].as_str().unwrap_or("-"),
                        r["id"].as_str().unwrap_or("-"),
                        r["seq"],
                        e["type"].as_str().unwrap_or("-"),
                    )?;
                } else {
                    let model = r["gen_ai"]["response"]["model"]
                        .as_str()
                        .or(r["gen_ai"]["request"]["model"].as_str())
                        .unwrap_or("-");
                    writeln!(
                        out,
                        "{}  {}  {:<10} {:>3}  {:<16} {:<28} {:<12} {:>9.1} ms  {}",
                        r["time"]["start"].as_str().unwrap_or("-"),
                        r["id"].as_str().unwrap_or("-"),
                        r["route"].as_str().unwrap_or("-"),
                        r["http"]["status"]
                            .as_u64()
                            .map_or("-".into(), |s| s.to_string()),
                        r["outcome"].as_str().unwrap_or("-"),
                        model,
                        r["client"]["user"].as_str().unwrap_or("-"),
                        r["time"]["duration_ms"].as_f64().unwrap_or(0.0),
                        r["http"]["path"].as_str().unwrap_or("-"),
                    )?;
                }
            }
            out.flush()?;
            if !a.json {
                eprintln!("{} record(s)", found.len());
            }
            // A search that skipped records must not look complete.
            if unreadable > 0 {
                eprintln!(
                    "error: {unreadable} record line(s) are not readable JSON and were not searched; run `custody log verify`"
                );
                return Ok(ExitCode::FAILURE);
            }
            Ok(ExitCode::SUCCESS)
        }
        LogCommand::Chain { id, trail, json } => {
            let trails = trail.open()?;
            let (source, _) = trails.find(&id)?;
            let turns = search::conversation(source, &id)?;
            let mut out = BufWriter::new(std::io::stdout().lock());
            for (n, r) in turns.iter().enumerate() {
                if json {
                    writeln!(out, "{r}")?;
                    continue;
                }
                let mark = if r["id"] == id.as_str() { "  <-" } else { "" };
                writeln!(
                    out,
                    "turn {}  {}  {}  {}  parent {}{mark}",
                    n + 1,
                    r["time"]["start"].as_str().unwrap_or("-"),
                    r["id"].as_str().unwrap_or("-"),
                    r["gen_ai"]["response"]["model"]
                        .as_str()
                        .or(r["gen_ai"]["request"]["model"].as_str())
                        .unwrap_or("-"),
                    r["chain"]["conversation_parent"].as_str().unwrap_or("-"),
                )?;
                writeln!(out, "  asked:    {}", one_line(&last_prompt(r)))?;
                writeln!(out, "  answered: {}", one_line(&answer(r)))?;
            }
            out.flush()?;
            Ok(ExitCode::SUCCESS)
        }
        LogCommand::Purge {
            config,
            user,
            pseudonym,
        } => purge(config.as_ref(), user, pseudonym),
        LogCommand::Prove(args) => super::evidence::prove(*args),
        LogCommand::Bundle(args) => super::evidence::bundle(*args),
        LogCommand::Drift(args) => drift(*args),
        LogCommand::Graph(args) => graph(*args),
        LogCommand::Ls { trail } => {
            for source in &trail.open()?.sources {
                let segs = source.segments()?;
                println!(
                    "{}  {} segments ({} to {})",
                    source.describe(),
                    segs.len(),
                    segs.first().map_or("-".into(), |s| s.name()),
                    segs.last().map_or("-".into(), |s| s.name()),
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        LogCommand::Verify {
            trail,
            pubkey,
            allow_uncovered_tail,
            fast,
            proof,
            bundle,
        } => {
            if let Some(file) = bundle {
                return super::evidence::verify_bundle(&file, pubkey.as_deref());
            }
            if let Some(file) = proof {
                return super::evidence::verify_proofs(&file, pubkey.as_deref());
            }
            let trusted = pubkey.as_deref().map(signing::load_public).transpose()?;
            let depth = if fast {
                verify::Depth::Fast
            } else {
                verify::Depth::Full
            };
            let progress = |done: usize, all: usize, bytes: u64| {
                if all >= 10 {
                    eprintln!("verified {done}/{all} segments ({} MiB)", bytes >> 20);
                }
            };
            // Every trail on its own: each pod has its own chain.
            let mut code = ExitCode::SUCCESS;
            for source in &trail.open()?.sources {
                let name = source.describe();
                let result =
                    verify::verify_source(source.as_ref(), trusted.as_ref(), depth, progress);
                let outcome = report(&name, result, pubkey.as_deref(), allow_uncovered_tail)?;
                if outcome != ExitCode::SUCCESS {
                    code = outcome;
                }
            }
            Ok(code)
        }
    }
}

/// `log purge`: a writer on the trail for the time of the purge.
fn purge(
    config: Option<&PathBuf>,
    user: Option<String>,
    pseudonym: Option<String>,
) -> anyhow::Result<ExitCode> {
    use custody_audit::purge::Selector;
    let selector = match (user, pseudonym) {
        (Some(u), _) if !u.trim().is_empty() => Selector::User(u),
        (_, Some(p)) => Selector::pseudonym(&p).with_context(|| {
            "--pseudonym takes a pseudonym as redaction writes it: `[NAME:` 8 hex digits `]`"
        })?,
        _ => anyhow::bail!("--user must not be empty"),
    };
    let config = super::load_config(config)?.validate("purge")?;
    let writer = custody_audit::AuditWriter::start(&config)
        .with_context(|| format!("opening the trail in {}", config.audit.dir.display()))?;
    let result = writer.config().purge(selector);
    let stopped = writer.shutdown();
    let done = result.context("purge failed")?;
    stopped.context("closing the trail after the purge")?;
    println!(
        "purged {} bodies of {} record(s) in {} segment(s); recorded as event seq {}",
        done.bodies,
        done.records,
        done.segments,
        done.event_seq.map_or_else(|| "-".into(), |s| s.to_string())
    );
    if !done.skipped.is_empty() {
        eprintln!(
            "custody: NOT purged: {} could not be read (run `custody log verify`); what they hold is untouched",
            done.skipped.join(", ")
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints what verify found in `what`; exit 1 on a break.
fn report(
    what: &str,
    result: Result<verify::VerifyReport, VerifyError>,
    pubkey: Option<&std::path::Path>,
    allow_uncovered_tail: bool,
) -> anyhow::Result<ExitCode> {
    let r = match result {
        Ok(r) => r,
        Err(VerifyError::Broken(b)) => {
            eprintln!("custody: verify FAILED in {what}: {b}");
            return Ok(ExitCode::from(1));
        }
        Err(VerifyError::Audit(e)) => return Err(e.into()),
    };
    println!("{what}:");
    println!(
        "records: {} (+{} events) in {} segments, {} bytes; chain head {}",
        r.records,
        r.events,
        r.segments,
        r.bytes,
        r.head.as_deref().unwrap_or("(empty trail)")
    );
    println!(
        "seals: {}, checkpoints: {}, unsigned: {}",
        r.seals, r.checkpoints, r.unsigned
    );
    if r.tree_heads > 0 {
        println!(
            "tree heads: {} signed Merkle tree heads recomputed from the records and matched (records can be proven one by one: custody log prove)",
            r.tree_heads
        );
    }
    if r.fast {
        println!("mode: fast (sealed segments checked through their signed SHA-256; records not re-hashed one by one)");
    }
    match (pubkey, r.keys.is_empty()) {
                (Some(p), _) => println!("signatures: all checked against {}", p.display()),
                (None, true) => println!("signatures: none (signing is off: the trail is a hash chain only)"),
                (None, false) => println!(
                    "signatures: valid under the key(s) they name ({}), not checked against a trusted key: pass --pubkey",
                    r.keys.iter().cloned().collect::<Vec<_>>().join(", ")
                ),
            }
    if r.retired > 0 {
        println!("retention: segments 1 to {} were deleted under the retention policy, as the chain records", r.retired);
    }
    if r.purges > 0 {
        println!(
            "content: {} purge event(s); {} bodies in {} segment(s) purged by policy (content retention, data subjects' requests), as the chain records; every other field verified",
            r.purges, r.purged_bodies, r.purged_segments
        );
    }
    for s in &r.purges_pending {
        println!("content: a purge of {s} is recorded but not applied yet (interrupted); the next retention pass or purge applies it");
    }
    if r.recoveries > 0 {
        println!(
            "recoveries: {} crash(es) repaired at start-up, recorded in the chain",
            r.recoveries
        );
    }
    if r.uncovered > 0 && !allow_uncovered_tail {
        eprintln!(
                    "custody: verify FAILED in {what}: {} record(s) after the newest checkpoint are not covered by it (a live trail? verify after the next checkpoint, or pass --allow-uncovered-tail)",
                    r.uncovered
                );
        return Ok(ExitCode::from(1));
    }
    println!("ok");
    Ok(ExitCode::SUCCESS)
}

/// The newest message of a request, as text (redacted, as stored).
fn last_prompt(r: &serde_json::Value) -> String {
    let b = &r["request"]["body"];
    let last = |v: &serde_json::Value| v.as_array().and_then(|a| a.last()).cloned();
    if let Some(m) = last(&b["messages"]) {
        return text(&m["content"]);
    }
    if let Some(c) = last(&b["contents"]) {
        return text(&c["parts"]);
    }
    match &b["input"] {
        serde_json::Value::Array(_) => {
            last(&b["input"]).map_or_else(String::new, |m| text(&m["content"]))
        }
        v => text(v),
    }
}

/// The answer of a response (first choice or candidate), as text.
fn answer(r: &serde_json::Value) -> String {
    let b = &r["response"]["body"];
    for v in [
        &b["choices"][0]["message"]["content"],
        &b["choices"][0]["text"],
        &b["content"],
        &b["candidates"][0]["content"]["parts"],
        &b["output"],
    ] {
        let t = text(v);
        if !t.is_empty() {
            return t;
        }
    }
    // An answer of tool calls: name them with their arguments.
    let calls: Vec<String> = b["choices"][0]["message"]["tool_calls"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| call(&c["function"]["name"], &c["function"]["arguments"]))
        .chain(
            items(&b["content"])
                .filter(|c| c["type"] == "tool_use")
                .map(|c| call(&c["name"], &c["input"])),
        )
        .chain(
            items(&b["output"])
                .filter(|c| c["type"] == "function_call")
                .map(|c| call(&c["name"], &c["arguments"])),
        )
        .chain(
            items(&b["candidates"][0]["content"]["parts"])
                .filter_map(|p| p.get("functionCall"))
                .map(|f| call(&f["name"], &f["args"])),
        )
        .collect();
    if !calls.is_empty() {
        return format!("[tool calls] {}", calls.join(", "));
    }
    match r["outcome"].as_str() {
        Some("ok") | None => "(no text)".into(),
        Some(other) => format!("({other})"),
    }
}

fn items(v: &serde_json::Value) -> impl Iterator<Item = &serde_json::Value> {
    v.as_array().into_iter().flatten()
}

/// `name(arguments)`, the arguments as sent (a JSON string or an object).
fn call(name: &serde_json::Value, args: &serde_json::Value) -> String {
    let args = match args {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    };
    format!("{}({args})", name.as_str().unwrap_or("?"))
}

fn text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(parts) => parts.iter().map(text).collect::<Vec<_>>().join(""),
        serde_json::Value::Object(o) => o
            .get("text")
            .map(text)
            .or_else(|| o.get("content").map(text))
            .unwrap_or_default(),
        _ => String::new(),
    }
}

fn one_line(s: &str) -> String {
    let flat: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() > 160 {
        format!("{}...", flat.chars().take(160).collect::<String>())
    } else {
        flat
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn a_turn_answered_with_tool_calls_says_so() {
        let chat = json!({"outcome":"ok","response":{"body":{"choices":[{"message":{"content":null,"tool_calls":[{"function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}}]}}]}}});
        assert_eq!(
            super::answer(&chat),
            r#"[tool calls] get_weather({"city":"Paris"})"#
        );
        let anthropic = json!({"outcome":"ok","response":{"body":{"content":[{"type":"tool_use","name":"f","input":{"a":1}}]}}});
        assert_eq!(super::answer(&anthropic), r#"[tool calls] f({"a":1})"#);
        let responses = json!({"outcome":"ok","response":{"body":{"output":[{"type":"function_call","name":"g","arguments":"{}"}]}}});
        assert_eq!(super::answer(&responses), "[tool calls] g({})");
        let failed = json!({"outcome":"upstream_error","response":{}});
        assert_eq!(super::answer(&failed), "(upstream_error)");
    }
}
