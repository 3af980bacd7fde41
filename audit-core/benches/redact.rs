//! Redaction throughput: custody's engine against a `regex::RegexSet` baseline doing
//! the same detection, on clean chat-like text and on PII-dense text, in one run.
//!
//! `cargo bench -p custody-audit --bench redact` (add `-- --quick` for a short run).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{hint::black_box, time::Instant};

use custody_audit::redact::{Counts, Redactor};
use regex::{Regex, RegexSet};

const CLEAN: &[&str] = &[
    "Sure! Here's a summary of the quarterly report you shared: revenue grew 12% year over year while operating costs fell slightly.",
    "Can you rewrite this paragraph so that it sounds more formal, but keep it under 120 words?",
    "The function returns a Result<Vec<u8>, io::Error>; call it with the path and handle the error case explicitly.",
    "In 2026 the team shipped version 3.4.1 on November 29, with 17 fixes and 4 new features.",
    "Step 1: install the package. Step 2: run the migration. Step 3: restart the service and check the logs.",
    "I think the main risk is the timeline: the vendor needs six to eight weeks, and we have five.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)",
    "The meeting moved to 3:30 pm in room 204; please bring the draft and the budget spreadsheet.",
    "Translate to French: the weather is lovely today and we should go for a walk by the river.",
    "Our latency p99 dropped from 240 ms to 95 ms after enabling connection pooling and HTTP/2.",
];

/// Chat traffic is not all ASCII: accents, CJK and emoji, mixed with the above.
const MULTILINGUAL: &[&str] = &[
    "Voilà le résumé : le café a ouvert à 8 h, et l'équipe a validé le budget 🎉.",
    "日本語で要約してください：売上は前年比12%増加し、コストはわずかに減少しました。",
    "¿Puedes traducir esto al español? Gracias — nos vemos el martes 👍",
    "Zusammenfassung: Die Lieferung verzögert sich um zwei Wochen; bitte Kunden informieren.",
];

const DENSE: &[&str] = &[
    "Contact jane.doe@example.com or call (415) 555-2671 about card 4111 1111 1111 1111.",
    "My SSN is 123-45-6789 and my IBAN is DE89 3704 0044 0532 0130 00, thanks.",
    "The server at 10.20.30.40 rejected key sk-proj-Q1w2E3r4T5y6U7i8O9p0AaSsDdFfGgHhJjKkLl.",
    "export AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE and GITHUB_TOKEN=ghp_0123456789abcdefghijABCDEFGHIJklmnop",
    "Reach me at +44 20 7946 0958 or raj.patel+work@mail.example.co.uk before Friday.",
];

fn build(lines: &[&str], bytes: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut n = 0;
    let mut i = 0;
    while n < bytes {
        let l = lines[i % lines.len()].to_owned();
        n += l.len() + 1;
        out.push(l);
        i += 1;
    }
    out
}

struct Baseline {
    set: RegexSet,
    each: Vec<Regex>,
}

impl Baseline {
    fn new() -> Self {
        let patterns = [
            r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}",
            r"\b(?:\d[ -]?){13,19}\b",
            r"\b\d{3}-\d{2}-\d{4}\b",
            r"(?:\+\d{1,3}[ .-]?)?\(?\d{3}\)?[ .-]?\d{3}[ .-]?\d{4}\b",
            r"\b(?:\d{1,3}\.){3}\d{1,3}\b",
            r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){3,7}(?: ?[A-Z0-9]{1,3})?\b",
            r"\b(?:sk-(?:ant-|proj-)?[A-Za-z0-9_-]{20,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{36}|xox[bpa]-[A-Za-z0-9-]{10,}|AIza[0-9A-Za-z_-]{35}|eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,})",
            r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
        ];
        Self {
            set: RegexSet::new(patterns).unwrap(),
            each: patterns.iter().map(|p| Regex::new(p).unwrap()).collect(),
        }
    }

    /// The same job as `Redactor::find`: which entities, and where.
    fn find(&self, s: &str) -> usize {
        let mut n = 0;
        for i in self.set.matches(s).iter() {
            n += self.each[i].find_iter(s).count();
        }
        n
    }
}

/// Best of `runs`: MB/s of `f` over `lines`.
fn measure(lines: &[String], runs: usize, mut f: impl FnMut(&str) -> usize) -> (f64, usize) {
    let bytes: usize = lines.iter().map(|l| l.len()).sum();
    let mut best = f64::MAX;
    let mut found = 0;
    for _ in 0..runs {
        let t = Instant::now();
        found = 0;
        for l in lines {
            found += f(black_box(l));
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    (bytes as f64 / best / 1e6, found)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let size = if quick { 4 << 20 } else { 32 << 20 };
    let runs = if quick { 2 } else { 5 };
    let r = Redactor::builtin();
    let base = Baseline::new();
    let clean_lines = build(CLEAN, size);
    let mixed: Vec<&str> = CLEAN.iter().chain(MULTILINGUAL).copied().collect();
    let mixed_lines = build(&mixed, size);
    let dense_lines = build(DENSE, size / 4);
    let clean_whole = vec![clean_lines.join("\n")];
    let dense_whole = vec![dense_lines.join("\n")];

    {
        use custody_config::{Mode, Redaction, BUILTIN_ENTITIES};
        let only = |keep: &[&str]| {
            let mut c = Redaction::default();
            for e in BUILTIN_ENTITIES {
                if !keep.contains(e) {
                    c.entities.insert((*e).to_string(), Mode::Off);
                }
            }
            Redactor::new(&c, None).unwrap()
        };
        let nums = only(&[
            "CREDIT_CARD",
            "US_SSN",
            "PHONE_NUMBER",
            "IBAN_CODE",
            "IP_ADDRESS",
        ]);
        let email = only(&["EMAIL_ADDRESS"]);
        let numbers_and_email = [
            "CREDIT_CARD",
            "US_SSN",
            "PHONE_NUMBER",
            "IBAN_CODE",
            "IP_ADDRESS",
            "EMAIL_ADDRESS",
        ];
        let anchored: Vec<&str> = BUILTIN_ENTITIES
            .iter()
            .copied()
            .filter(|e| !numbers_and_email.contains(e))
            .collect();
        let keys = only(&anchored);
        for (n, e) in [("numbers", &nums), ("email", &email), ("anchors", &keys)] {
            let (whole, _) = measure(&clean_whole, runs, |s| e.find(s).len());
            let (per, _) = measure(&clean_lines, runs, |s| e.find(s).len());
            println!("detector family alone, clean: {n:<8} {whole:>6.0} MB/s one buffer, {per:>6.0} MB/s per message");
        }
    }
    println!(
        "{:<24} {:>10} {:>14} {:>14} {:>14} {:>9}",
        "input", "MiB", "custody find", "custody redact", "RegexSet", "speedup"
    );
    for (name, lines) in [
        ("clean, one buffer", &clean_whole),
        ("clean, per message", &clean_lines),
        ("multilingual, per msg", &mixed_lines),
        ("PII-dense, one buffer", &dense_whole),
        ("PII-dense, per message", &dense_lines),
    ] {
        let mib = lines.iter().map(|l| l.len()).sum::<usize>() as f64 / (1 << 20) as f64;
        let (find, n1) = measure(lines, runs, |s| r.find(s).len());
        let (redact, _) = measure(lines, runs, |s| r.redact_str(s, &mut Counts::new()).len());
        let (regex, n2) = measure(lines, runs.min(2), |s| base.find(s));
        println!(
            "{name:<24} {mib:>10.1} {:>9.0} MB/s {:>9.0} MB/s {:>9.0} MB/s {:>8.1}x   (found {n1} vs {n2})",
            find,
            redact,
            regex,
            find / regex
        );
    }
}
