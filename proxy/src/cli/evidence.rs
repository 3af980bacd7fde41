//! `custody log prove` and `custody log verify --proof`: evidence about single records
//! and about the trail's history, checked with the public key alone.

use std::{
    io::{BufWriter, Write},
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context;
use clap::Args;
use custody_audit::{
    review::{
        bundle::{self, Selection},
        proof::{self, Proven},
    },
    signing,
};

use super::trail::TrailArgs;

#[derive(Args)]
pub struct ProveArgs {
    #[command(flatten)]
    trail: TrailArgs,
    /// Records to prove, by id: each gets an inclusion proof to the newest checkpoint's
    /// signed tree head.
    #[arg(required_unless_present = "since_checkpoint")]
    ids: Vec<String>,
    /// Instead: prove that the trail now extends the one this checkpoint line (kept
    /// from `checkpoints.log` earlier) signed, without rewriting it.
    #[arg(long, value_name = "FILE", conflicts_with = "ids")]
    since_checkpoint: Option<PathBuf>,
    /// Write the proofs here (JSON Lines) instead of standard output.
    #[arg(long, short)]
    output: Option<PathBuf>,
}

pub fn prove(args: ProveArgs) -> anyhow::Result<ExitCode> {
    let trails = args.trail.open()?;
    let mut lines: Vec<Vec<u8>> = Vec::new();
    if let Some(path) = &args.since_checkpoint {
        let [source] = &trails.sources[..] else {
            anyhow::bail!("a consistency proof is about one trail: pass --source");
        };
        let first = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let p = proof::prove_consistency(source.as_ref(), &first)?;
        lines.push(serde_json::to_vec(&p)?);
    } else {
        for id in &args.ids {
            let (source, line) = trails.find(id)?;
            for p in proof::prove_lines(source, &[line])? {
                lines.push(serde_json::to_vec(&p)?);
            }
        }
    }
    let mut out: Box<dyn Write> = match &args.output {
        Some(p) => Box::new(BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => Box::new(BufWriter::new(std::io::stdout().lock())),
    };
    for line in &lines {
        out.write_all(line)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    if let Some(p) = &args.output {
        eprintln!("{} proof(s) written to {}", lines.len(), p.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// Checks every proof in `file` against `pubkey`; exit 1 when one fails.
pub fn verify_proofs(file: &Path, pubkey: Option<&Path>) -> anyhow::Result<ExitCode> {
    let pubkey =
        pubkey.context("a proof is checked against the trail's public key: pass --pubkey")?;
    let key = signing::load_public(pubkey)?;
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let mut failed = 0usize;
    let mut proofs = 0usize;
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        if line.trim_ascii().is_empty() {
            continue;
        }
        proofs += 1;
        match proof::check(line, &key) {
            Ok(Proven::Inclusion {
                id,
                seq,
                tree_size,
                root,
                signed_at,
            }) => println!(
                "ok: record {} (seq {seq}) is leaf {} of the tree of {tree_size} records whose head {root} was signed at {signed_at}",
                id.as_deref().unwrap_or("(no id)"),
                seq - 1
            ),
            Ok(Proven::Consistency {
                first_size,
                second_size,
                first_at,
                second_at,
            }) => println!(
                "ok: the trail of {second_size} records signed at {second_at} extends the trail of {first_size} records signed at {first_at} without changing any of them"
            ),
            Err(e) => {
                failed += 1;
                println!("FAILED: line {}: {e}", i + 1);
            }
        }
    }
    anyhow::ensure!(proofs > 0, "{} holds no proof", file.display());
    println!("signatures: checked against {}", pubkey.display());
    println!(
        "proves: each record above is, byte for byte, the record the holder of that key had in its trail at that place when it signed the tree head; a consistency proof, that no record before the earlier head was changed, removed or reordered since"
    );
    println!(
        "does not prove: that a record's content is true, that the trail holds no other records about the same subject, or anything about records after the newest head"
    );
    if failed > 0 {
        eprintln!("custody: {failed} of {proofs} proof(s) FAILED");
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct BundleArgs {
    #[command(flatten)]
    trail: TrailArgs,
    /// Records that started at or after: RFC 3339 or an age (`30days`).
    #[arg(long)]
    since: String,
    /// Records that started before: RFC 3339 or an age.
    #[arg(long)]
    until: String,
    /// `client.user` or the end user, as the client sent it (one holding an entity is
    /// found by its pseudonym, derived with the fingerprint key).
    #[arg(long)]
    user: Option<String>,
    /// The deployment's fingerprint key, for `--user` values stored pseudonymized.
    #[arg(long)]
    key_file: Option<PathBuf>,
    #[arg(long)]
    team: Option<String>,
    #[arg(long)]
    session: Option<String>,
    #[arg(long)]
    key_id: Option<String>,
    #[arg(long)]
    trace_id: Option<String>,
    /// Every record of the conversation this record belongs to.
    #[arg(long, value_name = "ID")]
    conversation: Option<String>,
    /// The trail's public key: the trail is verified against it before anything is
    /// bundled, and the bundle carries it.
    #[arg(long)]
    pubkey: PathBuf,
    /// Who asks for the bundle, for the manifest (default: `$USER`).
    #[arg(long)]
    requested_by: Option<String>,
    /// The most records one bundle holds (they are held in memory while it is made).
    #[arg(long, default_value_t = 100_000)]
    max_records: usize,
    /// The bundle file to write (`.tar.zst`).
    #[arg(long, short)]
    out: PathBuf,
}

pub fn bundle(args: BundleArgs) -> anyhow::Result<ExitCode> {
    let trails = args.trail.open()?;
    let [source] = &trails.sources[..] else {
        anyhow::bail!("a bundle is made from one trail: pass --source");
    };
    let source = source.as_ref();
    let key = signing::load_public(&args.pubkey)?;
    let stamp = |s: &str| -> anyhow::Result<String> {
        Ok(humantime::format_rfc3339_millis(super::trail::when(s)?).to_string())
    };
    let user = args
        .user
        .as_deref()
        .map(|u| args.trail.user_token(u, args.key_file.as_deref()))
        .transpose()?;
    let selection = Selection {
        since: stamp(&args.since)?,
        until: stamp(&args.until)?,
        user,
        team: args.team,
        session: args.session,
        key_id: args.key_id,
        trace_id: args.trace_id,
        conversation: args.conversation,
    };
    anyhow::ensure!(
        selection.since < selection.until,
        "--since must be before --until"
    );
    let requested_by = args
        .requested_by
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "unknown".into());
    let file = std::fs::File::create(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let made = custody_proxy::console::report::make_bundle(
        source,
        &key,
        selection,
        requested_by,
        args.max_records,
        BufWriter::new(file),
    );
    let (sha, n) = match made {
        Ok(m) => m,
        Err(e) => {
            let _ = std::fs::remove_file(&args.out);
            return Err(e.into());
        }
    };
    eprintln!(
        "{n} record(s), with their proofs, written to {}",
        args.out.display()
    );
    println!("bundle SHA-256: {sha}");
    Ok(ExitCode::SUCCESS)
}

/// Checks an evidence bundle offline against `pubkey`; exit 1 when it does not hold.
pub fn verify_bundle(file: &Path, pubkey: Option<&Path>) -> anyhow::Result<ExitCode> {
    use sha2::Digest;
    let pubkey =
        pubkey.context("a bundle is checked against the trail's public key: pass --pubkey")?;
    let key = signing::load_public(pubkey)?;
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    println!(
        "bundle SHA-256: {}",
        hex::encode(sha2::Sha256::digest(&bytes))
    );
    let checked = bundle::open(&bytes[..]).and_then(|files| bundle::check(&files, &key));
    let c = match checked {
        Ok(c) => c,
        Err(e) => {
            println!("FAILED: {e}");
            eprintln!("custody: the bundle does not hold");
            return Ok(ExitCode::from(1));
        }
    };
    let m = &c.manifest;
    let s = &m.selection;
    println!("ok: {} record(s) and {} config event(s), each with an inclusion proof that holds, to {} signed head(s)", m.records, m.config_events, c.heads);
    println!("selection: {} to {}{}", s.since, s.until, describe(s));
    println!("made: {} by {} from {}", m.created, m.requested_by, m.trail);
    println!(
        "signatures: checked against {} (fingerprint {})",
        pubkey.display(),
        m.key.fingerprint
    );
    println!(
        "completeness (the bundler's statement): {}: {}",
        if m.complete {
            "complete"
        } else {
            "NOT complete"
        },
        m.completeness
    );
    println!("proves: every record here is, byte for byte, what the key holder's trail held at its place when it signed the head its proof leads to; every record started inside the window and matches the filter; every file is the one the manifest names");
    println!("does not prove: that nothing matching was left out (the bundle cannot show the records it does not hold: the completeness statement is the bundler's), who made the bundle (the manifest is not signed: compare its SHA-256 with the one recorded when it was made), or that a record's content is true");
    Ok(ExitCode::SUCCESS)
}

fn describe(s: &Selection) -> String {
    s.filters()
        .iter()
        .filter_map(|(n, v)| v.map(|v| format!(", {n} {v}")))
        .collect()
}
