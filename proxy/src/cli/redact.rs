//! `custody redact`: try the redaction rules on a sample. A line in is a line out,
//! line endings and all; JSON lines stay JSON with only string values changed.

use std::{
    io::{BufRead, BufWriter, Write},
    path::PathBuf,
    process::ExitCode,
};

use anyhow::Context;
use custody_audit::{redact::Counts, writer::redactor_for};

pub fn run(config: Option<&PathBuf>, report: bool) -> anyhow::Result<ExitCode> {
    let config = super::load_config(config)?;
    let redactor = redactor_for(&config).context("building the redaction rules")?;
    let mut counts = Counts::new();
    let stdin = std::io::stdin().lock();
    let mut input = std::io::BufReader::with_capacity(256 * 1024, stdin);
    let mut out = BufWriter::with_capacity(256 * 1024, std::io::stdout().lock());
    let mut line = Vec::new();
    loop {
        line.clear();
        if input
            .read_until(b'\n', &mut line)
            .context("reading standard input")?
            == 0
        {
            break;
        }
        let body_len = line.len()
            - line
                .iter()
                .rev()
                .take_while(|&&b| b == b'\n' || b == b'\r')
                .count();
        let (body, ending) = line.split_at(body_len);
        // Invalid UTF-8 is read as text with replacement characters: output is always UTF-8.
        let text = String::from_utf8_lossy(body);
        let red = redactor.redact_line(&text, &mut counts);
        let written = out
            .write_all(red.as_bytes())
            .and_then(|()| out.write_all(ending));
        if let Err(e) = written {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                break;
            }
            return Err(e.into());
        }
    }
    out.flush().ok();
    if report {
        let map: serde_json::Map<String, serde_json::Value> = counts
            .iter()
            .map(|(k, v)| (k.to_owned(), v.into()))
            .collect();
        eprintln!("{}", serde_json::Value::Object(map));
    }
    Ok(ExitCode::SUCCESS)
}
