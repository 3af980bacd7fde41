//! The redaction engine never panics, never splits a character, and JSON in is JSON out.
//! `cargo fuzz run redact` from `audit-core/` (see docs/benchmarks.md for how it was run).
#![no_main]

use custody_audit::redact::{Counts, Redactor};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

static ENGINE: OnceLock<Redactor> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let r = ENGINE.get_or_init(Redactor::builtin);
    let text = String::from_utf8_lossy(data);
    for sp in r.find(&text) {
        assert!(text.is_char_boundary(sp.start) && text.is_char_boundary(sp.end));
        assert!(sp.start < sp.end);
    }
    let out = r.redact_line(&text, &mut Counts::new());
    if serde_json::from_str::<serde_json::Value>(&text).is_ok() {
        assert!(serde_json::from_str::<serde_json::Value>(&out).is_ok(), "JSON in, not JSON out");
    }
    // The same value as a JSON string must come out as valid JSON too.
    let wrapped = serde_json::to_string(&serde_json::json!({ "content": text.as_ref() })).unwrap();
    let out = r.redact_line(&wrapped, &mut Counts::new());
    assert!(serde_json::from_str::<serde_json::Value>(&out).is_ok());
});
