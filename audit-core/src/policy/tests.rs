use super::*;
use custody_config::{Action, OnError, Policy, PolicyMode, Severity};

fn rule(name: &str, when: &str, action: Action) -> Policy {
    Policy::new(name, when, action, Severity::High)
}

fn set(rules: Vec<Policy>) -> Result<PolicySet, PolicyError> {
    let terms = BTreeMap::from([(
        "secrets".to_owned(),
        vec!["Project Nightingale".to_owned(), "blue falcon".to_owned()],
    )]);
    PolicySet::compile(&rules, &terms, vec!["CREDIT_CARD".into(), "JWT".into()])
}

fn facts(text: &str) -> Facts<'_> {
    Facts {
        route: "openai".into(),
        model: "gpt-4o".into(),
        request: SideFacts {
            text: text.into(),
            ..SideFacts::default()
        },
        ..Facts::default()
    }
}

#[test]
fn term_lists_match_case_insensitively_in_one_pass() {
    let s = set(vec![rule(
        "leak",
        "request.text.containsAny(terms.secrets)",
        Action::Flag,
    )])
    .unwrap();
    let v = s.evaluate(&facts("about PROJECT nightingale"), Phase::Record);
    assert_eq!(v.decisions.len(), 1);
    assert_eq!(v.decisions[0].effect, Effect::Flagged);
    assert!(s
        .evaluate(&facts("nothing here"), Phase::Record)
        .decisions
        .is_empty());
}

#[test]
fn entities_are_all_present_so_a_rule_on_one_never_fails() {
    let s = set(vec![rule(
        "card",
        "request.entities.CREDIT_CARD > 0",
        Action::Flag,
    )])
    .unwrap();
    let mut f = facts("x");
    assert!(s.evaluate(&f, Phase::Record).decisions.is_empty());
    f.request.entities.insert("CREDIT_CARD".into(), 2);
    assert_eq!(s.evaluate(&f, Phase::Record).decisions.len(), 1);
}

#[test]
fn phases_split_enforcing_request_rules_from_the_rest() {
    let mut observe = rule(
        "card_observe",
        "request.entities.CREDIT_CARD > 0",
        Action::Block,
    );
    observe.mode = PolicyMode::Observe;
    let s = set(vec![
        rule("blocker", "model == 'gpt-4o'", Action::Block),
        observe,
        rule("flagger", "model == 'gpt-4o'", Action::Flag),
    ])
    .unwrap();
    let mut f = facts("x");
    f.request.entities.insert("CREDIT_CARD".into(), 1);
    let req = s.evaluate(&f, Phase::Request);
    assert_eq!(req.block, Some(0));
    assert_eq!(req.decisions.len(), 1);
    let rec = s.evaluate(&f, Phase::Record);
    let effects: Vec<Effect> = rec.decisions.iter().map(|d| d.effect).collect();
    assert_eq!(effects, vec![Effect::WouldBlock, Effect::Flagged]);
    assert_eq!(rec.block, None);
}

#[test]
fn routes_limit_where_a_rule_applies() {
    let mut r = rule("only_anthropic", "true", Action::Block);
    r.routes = Some(vec!["anthropic".into()]);
    let s = set(vec![r]).unwrap();
    assert!(!s.applies(Phase::Request, "openai"));
    assert!(s.applies(Phase::Request, "anthropic"));
    assert!(s.evaluate(&facts("x"), Phase::Request).decisions.is_empty());
}

#[test]
fn bad_rules_are_refused_with_name_and_position() {
    let cases = [
        ("model ==", "line 1"),
        ("reqest.text == ''", "unknown variable `reqest`"),
        ("request.txt == ''", "no field `txt`"),
        (
            "request.text.containsAny(terms.nope)",
            "no [policy_terms] list named `nope`",
        ),
        ("size(model) + 'x'", "does not apply to int and string"),
        ("model.size(1) > 0", "no matching overload"),
        ("model", "must evaluate to a bool"),
    ];
    for (when, want) in cases {
        let e = set(vec![rule("bad_rule", when, Action::Flag)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad_rule") && e.contains(want), "{when}: {e}");
    }
    let e = set(vec![rule("late", "response.text == ''", Action::Block)])
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot use `response`"), "{e}");
    assert!(e.contains("line 1, column 1"), "{e}");
}

#[test]
fn comprehension_variables_are_not_unknown_names() {
    let s = set(vec![rule(
        "shell",
        "request.tools.exists(t, t.startsWith('shell'))",
        Action::Flag,
    )])
    .unwrap();
    let mut f = facts("");
    f.request.tools = vec!["shell_exec".into()];
    assert_eq!(s.evaluate(&f, Phase::Record).decisions.len(), 1);
}

#[test]
fn a_failing_rule_is_a_decision_that_blocks_only_when_told() {
    let mut strict = rule("strict", "request.tools[0] == 'x'", Action::Block);
    strict.on_error = OnError::Block;
    let lenient = rule("lenient", "request.tools[0] == 'x'", Action::Block);
    let s = set(vec![lenient, strict]).unwrap();
    let v = s.evaluate(&facts(""), Phase::Request);
    assert_eq!(v.decisions[0].effect, Effect::Error);
    assert_eq!(v.decisions[0].error.as_deref(), Some("index out of bounds"));
    assert_eq!(v.decisions[1].effect, Effect::Blocked);
    assert_eq!(v.block, Some(1));
}

#[test]
fn errors_never_print_values_of_the_exchange() {
    let s = set(vec![rule("cmp", "request.text < 3", Action::Flag)]);
    // `<` between a string and an int fails the dry run: no value in the message.
    let e = s.unwrap_err().to_string();
    assert!(!e.contains("\"\""), "{e}");
}

#[test]
fn the_version_follows_rules_and_terms() {
    let a = set(vec![rule("a", "true", Action::Flag)]).unwrap();
    let b = set(vec![rule("a", "false", Action::Flag)]).unwrap();
    assert_ne!(a.version(), b.version());
    assert_eq!(a.version().len(), 16);
}

#[test]
fn ad_hoc_lists_and_lists_of_tools_work_with_contains_any() {
    let s = set(vec![
        rule(
            "adhoc",
            "request.text.containsAny(['Foo', 'bar'])",
            Action::Flag,
        ),
        rule(
            "tools",
            "request.tools.containsAny(terms.secrets)",
            Action::Flag,
        ),
    ])
    .unwrap();
    let mut f = facts("a FOO b");
    f.request.tools = vec!["blue falcon".into()];
    assert_eq!(s.evaluate(&f, Phase::Record).decisions.len(), 2);
}

/// Remembered results must follow every input a rule reads: each case evaluates the
/// same set again and again while one input changes back and forth.
#[test]
fn remembered_results_follow_every_input_the_rule_reads() {
    let flagged = |s: &PolicySet, f: &Facts| !s.evaluate(f, Phase::Record).decisions.is_empty();
    type Change = Box<dyn Fn(&mut Facts, bool)>;
    let cases: Vec<(&str, Change)> = vec![
        (
            "request.text.containsAny(terms.secrets)",
            Box::new(|f, on| f.request.text = if on { "blue FALCON" } else { "blue" }.into()),
        ),
        (
            "request.text.size() > 4",
            Box::new(|f, on| f.request.text = if on { "longer" } else { "x" }.into()),
        ),
        (
            "!request.text.containsAny(terms.secrets) && request.text != ''",
            Box::new(|f, on| f.request.text = if on { "plain" } else { "blue falcon" }.into()),
        ),
        (
            "usage.output_tokens > 300",
            Box::new(|f, on| f.output_tokens = if on { 301 } else { 300 }),
        ),
        (
            "usage.input_tokens + usage.output_tokens > 10",
            Box::new(|f, on| f.input_tokens = if on { 11 } else { 0 }),
        ),
        (
            "request.entities.CREDIT_CARD > 1",
            Box::new(|f, on| {
                f.request.entities =
                    BTreeMap::from([("CREDIT_CARD".into(), if on { 2 } else { 1 })]);
            }),
        ),
        (
            "request.tools.exists(t, t == 'shell')",
            Box::new(|f, on| f.request.tools = vec![if on { "shell" } else { "search" }.into()]),
        ),
        (
            "source.env == 'prod'",
            Box::new(|f, on| {
                f.source = BTreeMap::from([("env".into(), if on { "prod" } else { "dev" }.into())]);
            }),
        ),
        (
            "user == 'mallory' || team == 'contractors'",
            Box::new(|f, on| f.team = if on { "contractors" } else { "staff" }.into()),
        ),
        (
            "model.startsWith('gpt-4o')",
            Box::new(|f, on| f.model = if on { "gpt-4o-mini" } else { "o3" }.into()),
        ),
        (
            "response.tool_calls.size() > 0",
            Box::new(|f, on| f.response.tools = if on { vec!["x".into()] } else { vec![] }),
        ),
    ];
    for (when, set_input) in cases {
        let s = set(vec![rule("r", when, Action::Flag)]).unwrap();
        let mut f = facts("");
        for on in [false, true, false, true, true, false] {
            set_input(&mut f, on);
            assert_eq!(flagged(&s, &f), on, "{when} with the input {on}");
        }
    }
}

#[test]
fn a_reloaded_set_never_reads_the_old_sets_results() {
    let f = facts("blue falcon");
    let before = set(vec![rule(
        "r",
        "request.text.containsAny(terms.secrets)",
        Action::Flag,
    )])
    .unwrap();
    assert_eq!(before.evaluate(&f, Phase::Record).decisions.len(), 1);
    // Same rule name and text, other lists: the remembered "matched" must not apply.
    let terms = BTreeMap::from([("secrets".to_owned(), vec!["nightingale".to_owned()])]);
    let after = PolicySet::compile(
        &[rule(
            "r",
            "request.text.containsAny(terms.secrets)",
            Action::Flag,
        )],
        &terms,
        vec![],
    )
    .unwrap();
    assert!(after.evaluate(&f, Phase::Record).decisions.is_empty());
    assert_eq!(before.evaluate(&f, Phase::Record).decisions.len(), 1);
}

#[test]
fn an_input_too_long_to_remember_is_evaluated_every_time() {
    let s = set(vec![rule("r", "user.endsWith('!')", Action::Flag)]).unwrap();
    let mut f = facts("");
    for on in [true, false, true] {
        f.user = "u".repeat(memo::MAX_KEY) + if on { "!" } else { "?" };
        assert_eq!(
            s.evaluate(&f, Phase::Record).decisions.len(),
            usize::from(on)
        );
    }
}

#[test]
fn deep_or_long_rules_are_refused_with_a_reason_and_never_crash() {
    let refused = |when: String| match set(vec![rule("r", &when, Action::Flag)]) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("accepted: {}", &when[..when.len().min(60)]),
    };
    // Far past the parser's own limit: refused, not a stack overflow.
    let parens = format!("{}status > 1{}", "(".repeat(5000), ")".repeat(5000));
    assert!(refused(parens).contains("policy `r`"));
    let nots = format!(
        "{}status > 1{}",
        "!(".repeat(MAX_DEPTH),
        ")".repeat(MAX_DEPTH)
    );
    assert!(refused(nots).contains("nested"));
    let long = vec!["status == 1"; 400].join(" || ");
    assert!(refused(long).contains("at most 4096"));
}

#[test]
fn the_deepest_rule_allowed_evaluates_on_a_small_stack() {
    // `!` adds a level over `status > 1` (two levels).
    let k = MAX_DEPTH - 2;
    let when = format!("{}status > 1{}", "!(".repeat(k), ")".repeat(k));
    let s = set(vec![rule("deep", &when, Action::Flag)]).unwrap();
    let f = facts("");
    // Half the 2 MiB the writer and runtime threads have.
    let flagged = std::thread::scope(|scope| {
        std::thread::Builder::new()
            .stack_size(1024 * 1024)
            .spawn_scoped(scope, || s.evaluate(&f, Phase::Record).decisions.len())
            .unwrap()
            .join()
            .unwrap()
    });
    // status 0: `status > 1` is false, and an even number of `!` keeps it so.
    assert_eq!(flagged, usize::from(k % 2 == 1));
}
