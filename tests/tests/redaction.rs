//! Redaction accuracy on the labeled corpus (`tests/redaction/corpus.jsonl`, made by
//! `make_corpus.py`): recall and precision per entity, with floors set from measurement.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use custody_audit::redact::{Counts, Redactor};
use serde_json::Value;

#[derive(Default, Debug)]
struct Score {
    tp: u64,
    fp: u64,
    fn_: u64,
}

impl Score {
    fn recall(&self) -> f64 {
        self.tp as f64 / (self.tp + self.fn_).max(1) as f64
    }
    fn precision(&self) -> f64 {
        self.tp as f64 / (self.tp + self.fp).max(1) as f64
    }
}

fn corpus() -> Vec<(String, Vec<(String, String)>)> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/redaction/corpus.jsonl"
    ))
    .unwrap();
    text.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let ents = v["entities"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| {
                    (
                        e[0].as_str().unwrap().to_owned(),
                        e[1].as_str().unwrap().to_owned(),
                    )
                })
                .collect();
            (v["text"].as_str().unwrap().to_owned(), ents)
        })
        .collect()
}

#[test]
fn recall_and_precision_meet_the_floors() {
    let corpus = corpus();
    assert!(corpus.len() >= 1000, "corpus has {} lines", corpus.len());
    let r = Redactor::builtin();
    let mut scores: BTreeMap<String, Score> = BTreeMap::new();
    let mut misses = Vec::new();
    for (text, expected) in &corpus {
        let mut want = expected.clone();
        for sp in r.find(text) {
            let found = (
                r.name(sp.entity).to_owned(),
                text[sp.start..sp.end].to_owned(),
            );
            match want.iter().position(|w| *w == found) {
                Some(i) => {
                    want.remove(i);
                    scores.entry(found.0).or_default().tp += 1;
                }
                None => {
                    misses.push(format!("FP {} {:?} in {text}", found.0, found.1));
                    scores.entry(found.0).or_default().fp += 1;
                }
            }
        }
        for (e, v) in want {
            misses.push(format!("FN {e} {v:?} in {text}"));
            scores.entry(e).or_default().fn_ += 1;
        }
        // Whatever the spans, no labeled value survives redaction of the line.
        let out = r.redact_line(text, &mut Counts::new());
        for (e, v) in expected {
            assert!(!out.contains(v.as_str()), "{e} {v:?} survived: {out}");
        }
    }
    let mut total = Score::default();
    println!(
        "{:<20} {:>6} {:>4} {:>4} {:>8} {:>9}",
        "entity", "tp", "fp", "fn", "recall", "precision"
    );
    for (e, s) in &scores {
        println!(
            "{e:<20} {:>6} {:>4} {:>4} {:>8.4} {:>9.4}",
            s.tp,
            s.fp,
            s.fn_,
            s.recall(),
            s.precision()
        );
        total.tp += s.tp;
        total.fp += s.fp;
        total.fn_ += s.fn_;
    }
    println!(
        "{:<20} {:>6} {:>4} {:>4} {:>8.4} {:>9.4}",
        "ALL",
        total.tp,
        total.fp,
        total.fn_,
        total.recall(),
        total.precision()
    );
    for m in misses.iter().take(40) {
        println!("{m}");
    }
    assert!(
        total.recall() >= 0.99 && total.precision() >= 0.99,
        "overall below the floor"
    );
    for (e, s) in &scores {
        assert!(
            s.recall() >= 0.95 && s.precision() >= 0.95,
            "{e} below the floor: {s:?}"
        );
    }
}
