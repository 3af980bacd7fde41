use super::*;
use custody_config::{Alphabet, CustomRule};

fn redact(s: &str) -> String {
    Redactor::builtin()
        .redact_str(s, &mut Counts::new())
        .into_owned()
}

#[test]
fn every_rule_names_a_builtin_entity() {
    for (prefix, rule) in rules::builtin() {
        assert!(
            BUILTIN_ENTITIES.contains(&rule.entity),
            "{prefix}: {}",
            rule.entity
        );
        assert!(
            prefix.len() >= 3,
            "{prefix} would disable the SIMD prefilter"
        );
    }
}

#[test]
fn finds_each_entity() {
    let cases = [
        ("mail jane.doe+x@example.co.uk now", "mail [EMAIL_ADDRESS] now"),
        ("card 4111 1111 1111 1111.", "card [CREDIT_CARD]."),
        ("card 5555-5555-5555-4444", "card [CREDIT_CARD]"),
        ("amex 378282246310005, exp 12/27", "amex [CREDIT_CARD], exp 12/27"),
        ("pay 4111111111111111 12/25 123", "pay [CREDIT_CARD] 12/25 123"),
        ("ssn 123-45-6789", "ssn [US_SSN]"),
        ("SSN: 123456789", "SSN: [US_SSN]"),
        ("call (415) 555-2671 or 415.555.2671", "call [PHONE_NUMBER] or [PHONE_NUMBER]"),
        ("intl +44 20 7946 0958 and +1 (415) 555-2671", "intl [PHONE_NUMBER] and [PHONE_NUMBER]"),
        ("uk 020 7946 0958", "uk [PHONE_NUMBER]"),
        ("iban DE89 3704 0044 0532 0130 00 ok", "iban [IBAN_CODE] ok"),
        ("iban GB82WEST12345698765432", "iban [IBAN_CODE]"),
        ("from 192.168.1.20:8080", "from [IP_ADDRESS]:8080"),
        ("k=sk-proj-abcdefghijklmnopqrstuvwxyz012345", "k=[OPENAI_API_KEY]"),
        ("sk-ant-api03-abcdefghijklmnopqrstuvwxyz", "[ANTHROPIC_API_KEY]"),
        ("AKIAIOSFODNN7EXAMPLE", "[AWS_ACCESS_KEY]"),
        ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "aws_secret_access_key = [AWS_SECRET_KEY]"),
        ("ghp_abcdefghijklmnopqrstuvwxyz0123456789", "[GITHUB_TOKEN]"),
        ("xoxb-1234567890-abcdefghij", "[SLACK_TOKEN]"),
        ("AIzaSyA1234567890abcdefghijklmnopqrstuv", "[GOOGLE_API_KEY]"),
        ("SG.abcdefghijklmnopqrstuv.abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG", "[SENDGRID_API_KEY]"),
        (
            "t eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U x",
            "t [JWT] x",
        ),
        (
            "a\n-----BEGIN RSA PRIVATE KEY-----\nMIIE\nabc\n-----END RSA PRIVATE KEY-----\nb",
            "a\n[PRIVATE_KEY]\nb",
        ),
    ];
    for (input, want) in cases {
        assert_eq!(redact(input), want, "{input}");
    }
}

#[test]
fn leaves_lookalikes_alone() {
    for s in [
        "risk-free and task-based work, sk-learn-pipeline",
        "order 4111111111111111 shipped",
        "4111 1111 1111 1112",
        "uuid 123e4567-e89b-12d3-a456-426614174000",
        "date 2026-11-29, time 14:05:33, version 1.2.3 and 10.0.19041.1, price $1,299.99",
        "sha 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        "ssn-like 000-12-3456 and 666-12-3456, bare 123456789",
        "user@localhost and @handle and a@b",
        "sk-short",
        "call 555-0100 or 1234567890",
        "ip-ish 1.2.3.4.5 and 256.1.1.1 and 01.2.3.4",
        "DE00 0000 0000 0000 0000 00",
    ] {
        assert_eq!(redact(s), s);
    }
}

#[test]
fn json_strings_keys_and_numbers_counted_and_formatting_kept() {
    let r = Redactor::builtin();
    let mut v: Value = serde_json::from_str(
        r#"{"a@b.com":"write to bob@example.com or bob@example.com","n":4111111111111111}"#,
    )
    .unwrap();
    let mut counts = Counts::new();
    r.redact_json(&mut v, &mut counts);
    assert_eq!(
        v["[EMAIL_ADDRESS]"],
        "write to [EMAIL_ADDRESS] or [EMAIL_ADDRESS]"
    );
    assert_eq!(v["n"], "[CREDIT_CARD]");
    assert_eq!(counts.get("EMAIL_ADDRESS"), 3);

    let text = "{ \"to\" :  \"bob@example.com\", \"n\": 4111111111111111,\n \"pem\": \"-----BEGIN PRIVATE KEY-----\\nMIIE\\n-----END PRIVATE KEY-----\", \"é\": \"caf\\u00e9\" }";
    let out = r.redact_json_text(text, &mut Counts::new()).unwrap();
    assert_eq!(out, "{ \"to\" :  \"[EMAIL_ADDRESS]\", \"n\": \"[CREDIT_CARD]\",\n \"pem\": \"[PRIVATE_KEY]\", \"é\": \"caf\\u00e9\" }");
    assert!(r
        .redact_json_text("plain text", &mut Counts::new())
        .is_none());
    assert!(r.redact_json_text("{broken", &mut Counts::new()).is_none());
}

#[test]
fn never_splits_utf8() {
    // Found by cargo fuzz: a long non-ASCII local part cut by the 64-byte cap.
    let s = format!("-¬{}@W.WWWW", "\u{fffd}".repeat(25));
    for sp in Redactor::builtin().find(&s) {
        assert!(s.is_char_boundary(sp.start) && s.is_char_boundary(sp.end));
    }
    let out = redact("é4111111111111111é — ü@ü.de bob@exämple.com 名前 jane@example.jp");
    assert!(
        out.contains("[CREDIT_CARD]") && out.contains("[EMAIL_ADDRESS]"),
        "{out}"
    );
}

#[test]
fn modes_allow_list_and_custom_rules() {
    let mut cfg = Redaction {
        allow: vec!["Support@Example.com".into()],
        ..Redaction::default()
    };
    cfg.entities
        .insert("EMAIL_ADDRESS".into(), Mode::Pseudonymize);
    cfg.entities.insert("IP_ADDRESS".into(), Mode::Off);
    cfg.entities.insert("US_SSN".into(), Mode::Drop);
    cfg.custom.push(CustomRule {
        name: "CODENAME".into(),
        terms: vec!["bluebird".into()],
        case_insensitive: true,
        prefix: None,
        min_len: 16,
        max_len: 128,
        alphabet: Alphabet::Token,
        mode: None,
    });
    cfg.custom.push(CustomRule {
        name: "ACME_TOKEN".into(),
        terms: vec![],
        case_insensitive: false,
        prefix: Some("acme_".into()),
        min_len: 8,
        max_len: 12,
        alphabet: Alphabet::Hex,
        mode: Some(Mode::Mask),
    });
    assert!(matches!(
        Redactor::new(&cfg, None),
        Err(RedactError::NoPseudonymKey)
    ));
    let r = Redactor::new(&cfg, Some(b"0123456789abcdef".to_vec())).unwrap();
    let mut counts = Counts::new();
    let out = r.redact_str(
        "a@x.com, A@x.com, a@x.com, support@example.com; 10.0.0.1; ssn 123-45-6789; Project BlueBird, bluebirds; acme_deadbeef acme_xyz12345",
        &mut counts,
    );
    let p1 = out.split(", ").next().unwrap().to_owned();
    assert!(
        p1.starts_with("[EMAIL_ADDRESS:") && p1.len() == "[EMAIL_ADDRESS:12345678]".len(),
        "{out}"
    );
    assert_eq!(
        out.matches(&p1).count(),
        2,
        "same value, same pseudonym: {out}"
    );
    assert!(
        out.contains("support@example.com; 10.0.0.1; ssn ;"),
        "{out}"
    );
    assert!(out.contains("Project [CODENAME], bluebirds"), "{out}");
    assert!(out.contains("[ACME_TOKEN] acme_xyz12345"), "{out}");
    assert_eq!(counts.get("EMAIL_ADDRESS"), 3);
    assert_eq!(counts.get("US_SSN"), 1);
}

/// A small deterministic fuzz: random mixes of tricky pieces never panic, output is
/// valid UTF-8 by construction, JSON stays JSON, and no span splits a character.
#[test]
fn random_inputs_keep_the_invariants() {
    let pieces = [
        "ééééééééééééééééééééééééééééééééééééé",
        "😀😀😀😀😀😀😀😀😀😀😀😀😀😀😀😀😀😀",
        "abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyz",
        "4111",
        " ",
        "-",
        "1111",
        "@",
        "example.com",
        "sk-",
        "proj-",
        "abcdEFGH1234",
        "\"",
        "\\",
        "\\n",
        "é",
        "名",
        "😀",
        "eyJ",
        ".",
        "+1",
        "(",
        ")",
        "415",
        "555",
        "2671",
        "DE89",
        "3704",
        "AKIA",
        "0",
        "9",
        "-----BEGIN ",
        "PRIVATE KEY-----",
        "{",
        "}",
        ":",
        ",",
        "[",
        "]",
    ];
    let r = Redactor::builtin();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..20_000 {
        let n = (next() % 24) as usize;
        let s: String = (0..n)
            .map(|_| pieces[(next() % pieces.len() as u64) as usize])
            .collect();
        for sp in r.find(&s) {
            assert!(
                s.is_char_boundary(sp.start) && s.is_char_boundary(sp.end),
                "{s:?}"
            );
        }
        let _ = r.redact_str(&s, &mut Counts::new());
        let json = serde_json::to_string(&serde_json::json!({"k": s, "a": [s]})).unwrap();
        let out = r.redact_line(&json, &mut Counts::new());
        assert!(
            serde_json::from_str::<Value>(&out).is_ok(),
            "{json} -> {out}"
        );
    }
}

#[test]
fn keys_and_numbers_that_are_entities_are_redacted_in_json_text_and_values() {
    let r = Redactor::builtin();
    let text = r#"{"grace.key@example.com": "x", "card": 4111111111111111, "created": 1733212345678, "n": 4111111111111111.5, "id": [5555555555554444]}"#;
    let mut counts = Counts::new();
    let out = r.redact_json_text(text, &mut counts).unwrap();
    assert_eq!(
        out,
        r#"{"[EMAIL_ADDRESS]": "x", "card": "[CREDIT_CARD]", "created": 1733212345678, "n": 4111111111111111.5, "id": ["[CREDIT_CARD]"]}"#
    );
    assert_eq!(counts.get("CREDIT_CARD"), 2);
    assert_eq!(counts.get("EMAIL_ADDRESS"), 1);
    let mut v: Value = serde_json::from_str(text).unwrap();
    r.redact_json(&mut v, &mut Counts::new());
    assert_eq!(v["[EMAIL_ADDRESS]"], "x");
    assert!(v.get("grace.key@example.com").is_none());
    assert_eq!(v["card"], "[CREDIT_CARD]");
    assert_eq!(v["created"], 1733212345678u64);
    assert_eq!(v["id"][0], "[CREDIT_CARD]");
}

#[test]
fn no_builtin_token_is_shorter_than_the_short_string_fast_path() {
    for (prefix, rule) in rules::builtin() {
        let shortest = match rule.check {
            rules::Check::Key { min, .. } => prefix.len() + min,
            rules::Check::AssignedValue { len } => len,
            // Multi-part formats, each far longer.
            _ => usize::MAX,
        };
        assert!(shortest >= SHORTEST_TOKEN, "{prefix}: {shortest}");
    }
    // And the fast path still finds what needs a digit or an `@`.
    assert_eq!(redact("a@b.io"), "[EMAIL_ADDRESS]");
    assert_eq!(redact("user"), "user");
}
