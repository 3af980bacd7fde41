//! Policies: CEL rules over each exchange that flag, block or sanitize it, and the
//! decisions every record carries (`policy.version`, `policy.decisions`).
//!
//! - [`PolicySet::compile`] checks every rule at load and at reload: syntax, variable
//!   names and fields, term lists, what a request-path rule may see, and a dry run on
//!   an empty exchange that catches type errors. A set that does not compile is never
//!   put in force.
//! - [`Phase::Request`]: enforcing `block` and `sanitize` rules, evaluated by the proxy
//!   before anything goes upstream ([`request`]).
//! - [`Phase::Record`]: everything else (`flag`, and `observe` rules), evaluated by the
//!   writer before redaction.
//! - [`facts`]: what a rule sees; [`terms`]: `[policy_terms]` automata.

pub mod facts;
mod memo;
pub mod request;
pub mod terms;

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use cel::{
    common::ast::{EntryExpr, Expr, IdedExpr},
    Env, ExecutionError, Program, Value,
};
use custody_config::{Action, OnError, Policy, PolicyMode};
use sha2::{Digest, Sha256};

pub use crate::record::{Decision, Effect, PolicyRecord};
pub use facts::{Facts, Needs, SideFacts};
pub use terms::Terms;

/// A rule that cannot be put in force; always names the rule, and where it can, the
/// line and column in its `when`.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("policy `{name}`: `when` line {line}, column {column}: {message}")]
    At {
        name: String,
        line: u32,
        column: u32,
        message: String,
    },
    #[error("policy `{name}`: {message}")]
    Rule { name: String, message: String },
    #[error("policy_terms.{list}: {message}")]
    Terms { list: String, message: String },
    #[error("policy engine: {0}")]
    Engine(String),
}

/// When a rule is evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// On the request path, before the upstream: enforcing `block` and `sanitize`.
    Request,
    /// On the writer, with the whole exchange: every other rule.
    Record,
    /// Every rule (`custody policy test`).
    Replay,
}

/// A compiled rule.
pub struct Rule {
    pub policy: Policy,
    program: Program,
    /// What its result depends on, when that can be remembered ([`memo`]).
    inputs: Option<Vec<memo::Input>>,
}

impl Rule {
    fn in_phase(&self, phase: Phase) -> bool {
        let request = self.policy.mode == PolicyMode::Enforce && self.policy.action.on_request();
        match phase {
            Phase::Request => request,
            Phase::Record => !request,
            Phase::Replay => true,
        }
    }

    fn applies_to(&self, route: &str) -> bool {
        self.policy
            .routes
            .as_ref()
            .is_none_or(|r| r.iter().any(|n| n == route))
    }

    /// Runs the rule: matched or not, or why it failed (value-free).
    fn run(&self, ctx: &cel::Context<'_, '_>) -> memo::Outcome {
        match self.program.execute(ctx) {
            Ok(Value::Bool(m)) => Ok(m),
            Ok(_) => Err("`when` did not evaluate to a bool".into()),
            Err(e) => Err(describe(&e)),
        }
    }

    fn effect(&self, matched: bool) -> Option<Effect> {
        if !matched {
            return None;
        }
        let enforce = self.policy.mode == PolicyMode::Enforce;
        Some(match (self.policy.action, enforce) {
            (Action::Flag, true) => Effect::Flagged,
            (Action::Block, true) => Effect::Blocked,
            (Action::Sanitize, true) => Effect::Sanitized,
            (Action::Flag, false) => Effect::WouldFlag,
            (Action::Block, false) => Effect::WouldBlock,
            (Action::Sanitize, false) => Effect::WouldSanitize,
        })
    }
}

/// The outcome of evaluating one phase's rules on one exchange.
#[derive(Debug, Default)]
pub struct Verdict {
    pub decisions: Vec<Decision>,
    /// The first enforcing rule that blocks (by match, or by `on_error = "block"`).
    pub block: Option<usize>,
    /// Enforcing sanitize rules that matched, by index.
    pub sanitize: Vec<usize>,
    /// Time spent evaluating (zero when no rule applied).
    pub seconds: f64,
}

impl Verdict {
    /// Adds rule `i`'s decision on `outcome`.
    fn add(&mut self, i: usize, rule: &Rule, outcome: memo::Outcome, phase: Phase) {
        let p = &rule.policy;
        let (effect, error) = match outcome {
            Ok(m) => (rule.effect(m), None),
            Err(why) => (Some(Effect::Error), Some(why)),
        };
        let Some(mut effect) = effect else { return };
        let enforcing = p.mode == PolicyMode::Enforce && phase != Phase::Replay;
        if effect == Effect::Error && enforcing && p.on_error == OnError::Block {
            effect = Effect::Blocked;
        }
        if enforcing {
            match effect {
                Effect::Blocked if self.block.is_none() => self.block = Some(i),
                Effect::Sanitized => self.sanitize.push(i),
                _ => {}
            }
        }
        self.decisions.push(Decision {
            name: p.name.clone(),
            action: p.action,
            severity: p.severity,
            mode: p.mode,
            effect,
            error,
        });
    }
}

/// Every rule of a configuration, compiled, with the `terms` automata.
pub struct PolicySet {
    /// Unique per compiled set: what remembered results belong to.
    id: u64,
    version: Arc<str>,
    rules: Vec<Rule>,
    env: Arc<Env>,
    terms: Terms,
    entity_names: Vec<String>,
    needs: [Needs; 3],
}

impl std::fmt::Debug for PolicySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicySet")
            .field("version", &self.version)
            .field("rules", &self.rules.len())
            .finish()
    }
}

impl PolicySet {
    /// Compiles the `[[policy]]` rules and `[policy_terms]` of a configuration.
    pub fn from_config(config: &custody_config::Config) -> Result<Self, PolicyError> {
        Self::compile(&config.policies, &config.policy_terms, entity_names(config))
    }

    /// Every fault of a configuration's rules, at most one per rule (`policy check`
    /// reports them all, where loading stops at the first).
    pub fn faults(config: &custody_config::Config) -> Vec<PolicyError> {
        let entities = entity_names(config);
        if let Err((list, message)) = Terms::compile(&config.policy_terms) {
            return vec![PolicyError::Terms { list, message }];
        }
        config
            .policies
            .iter()
            .filter_map(|p| {
                Self::compile(
                    std::slice::from_ref(p),
                    &config.policy_terms,
                    entities.clone(),
                )
                .err()
            })
            .collect()
    }

    /// Compiles rules; `entity_names` are the keys of `request.entities`.
    pub fn compile(
        policies: &[Policy],
        terms: &BTreeMap<String, Vec<String>>,
        entity_names: Vec<String>,
    ) -> Result<Self, PolicyError> {
        // CEL's parser recurses per level of nesting before its own depth limit
        // applies: parse on a stack known to be deep enough, whichever thread asks (a
        // runtime worker on reload has 2 MiB).
        std::thread::scope(|s| {
            std::thread::Builder::new()
                .name("custody-policy".into())
                .stack_size(COMPILE_STACK)
                .spawn_scoped(s, || Self::compile_here(policies, terms, entity_names))
                .map_err(|e| PolicyError::Engine(format!("cannot start the compiler: {e}")))?
                .join()
                .map_err(|_| PolicyError::Engine("the rule compiler failed".into()))?
        })
    }

    fn compile_here(
        policies: &[Policy],
        terms: &BTreeMap<String, Vec<String>>,
        entity_names: Vec<String>,
    ) -> Result<Self, PolicyError> {
        let mut env = Env::stdlib();
        env.add_extension(cel::extensions::strings)
            .and_then(|()| env.add_extension(terms::declare))
            .map_err(|e| PolicyError::Engine(e.to_string()))?;
        let env = Arc::new(env);
        let terms_value = Terms::compile(terms)
            .map_err(|(list, message)| PolicyError::Terms { list, message })?;
        let mut rules = Vec::with_capacity(policies.len());
        let mut needs = [Needs::default(); 3];
        for p in policies {
            let (program, rule_needs, inputs) = compile_rule(&env, p, terms)?;
            let rule = Rule {
                policy: p.clone(),
                program,
                inputs,
            };
            for (i, phase) in [Phase::Request, Phase::Record, Phase::Replay]
                .into_iter()
                .enumerate()
            {
                if rule.in_phase(phase) {
                    needs[i] = needs[i].union(rule_needs);
                }
            }
            rules.push(rule);
        }
        // `request.entities` holds the entities the rules name (by field or in a
        // string), and those found: twenty zeros per record would cost more than
        // every rule.
        let mut named = Vec::new();
        for r in &rules {
            words(r.program.expression(), &mut named);
        }
        let entity_names: Vec<String> = entity_names
            .into_iter()
            .filter(|e| named.contains(e))
            .collect();
        let version = version(policies, terms).into();
        static SETS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let set = Self {
            id: SETS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            version,
            rules,
            env,
            terms: terms_value,
            entity_names,
            needs,
        };
        set.dry_run()?;
        Ok(set)
    }

    /// First 16 hex digits of the SHA-256 of the rules and term lists as configured.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// [`Self::version`], shared (each record carries it).
    pub fn version_shared(&self) -> Arc<str> {
        self.version.clone()
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The variables the rules of `phase` name: what is worth extracting.
    pub fn needs(&self, phase: Phase) -> Needs {
        self.needs[phase as usize]
    }

    /// Whether some rule of `phase` applies to `route`: the request path reads a body
    /// only then.
    pub fn applies(&self, phase: Phase, route: &str) -> bool {
        self.rules
            .iter()
            .any(|r| r.in_phase(phase) && r.applies_to(route))
    }

    /// Evaluates the rules of `phase` that apply to the facts' route. Facts are built
    /// into the CEL context once, for every rule.
    pub fn evaluate(&self, facts: &Facts, phase: Phase) -> Verdict {
        let mut verdict = Verdict::default();
        let route = facts.route.as_str();
        let mut applicable = self
            .rules
            .iter()
            .enumerate()
            .filter(|(_, r)| r.in_phase(phase) && r.applies_to(route))
            .peekable();
        if applicable.peek().is_none() {
            return verdict;
        }
        let started = Instant::now();
        terms::begin_evaluation();
        let vars = facts.variables(&self.terms, &self.entity_names);
        let ctx = vars.context(&self.env);
        memo::with(self.id, |memo| {
            for (i, rule) in applicable {
                let outcome = memo.recall(i, rule.inputs.as_deref(), facts, &self.terms, || {
                    rule.run(&ctx)
                });
                verdict.add(i, rule, outcome, phase);
            }
        });
        verdict.seconds = started.elapsed().as_secs_f64();
        verdict
    }

    /// The verdict when the rules of `phase` could not be evaluated (the request body
    /// was too long to read): an error decision for each, blocking per `on_error`.
    pub fn unevaluated(&self, phase: Phase, route: &str, why: &str) -> Verdict {
        let mut verdict = Verdict::default();
        for (i, rule) in self.rules.iter().enumerate() {
            if !rule.in_phase(phase) || !rule.applies_to(route) {
                continue;
            }
            let p = &rule.policy;
            let blocks = p.mode == PolicyMode::Enforce && p.on_error == OnError::Block;
            if blocks && verdict.block.is_none() {
                verdict.block = Some(i);
            }
            verdict.decisions.push(Decision {
                name: p.name.clone(),
                action: p.action,
                severity: p.severity,
                mode: p.mode,
                effect: if blocks {
                    Effect::Blocked
                } else {
                    Effect::Error
                },
                error: Some(why.to_owned()),
            });
        }
        verdict
    }

    /// Evaluates every rule on an empty exchange: a rule that cannot evaluate even
    /// there (a function applied to the wrong types, a name CEL does not know) would
    /// fail on every exchange, so it is refused now.
    fn dry_run(&self) -> Result<(), PolicyError> {
        terms::begin_evaluation();
        let empty = Facts::default();
        let vars = empty.variables(&self.terms, &self.entity_names);
        let ctx = vars.context(&self.env);
        for rule in &self.rules {
            let fail = |message: String| PolicyError::Rule {
                name: rule.policy.name.clone(),
                message,
            };
            match rule.program.execute(&ctx) {
                Ok(Value::Bool(_)) => {}
                Ok(v) => {
                    return Err(fail(format!(
                        "`when` must evaluate to a bool, not {}",
                        v.type_of()
                    )))
                }
                // Missing list items and keys depend on the exchange.
                Err(
                    ExecutionError::IndexOutOfBounds(_)
                    | ExecutionError::NoSuchKey(_)
                    | ExecutionError::DivisionByZero(_)
                    | ExecutionError::RemainderByZero(_),
                ) => {}
                Err(e) => return Err(fail(describe(&e))),
            }
        }
        Ok(())
    }
}

/// The keys of `request.entities`: built-in entities and `[[redaction.custom]]` names.
fn entity_names(config: &custody_config::Config) -> Vec<String> {
    custody_config::BUILTIN_ENTITIES
        .iter()
        .map(|s| (*s).to_owned())
        .chain(config.redaction.custom.iter().map(|c| c.name.clone()))
        .collect()
}

/// The stack rules are compiled on.
const COMPILE_STACK: usize = 64 * 1024 * 1024;

/// Longest `when`: rules are short; long lists belong in `[policy_terms]`.
pub const MAX_WHEN_BYTES: usize = 4096;

/// Deepest expression a rule may be: evaluation recurses once per level, on the
/// writer's and the runtime's threads (2 MiB stacks; a level takes up to 40 KiB of
/// it in a debug build). Rules people write are under 10.
pub const MAX_DEPTH: usize = 24;

/// Parses a rule and checks the names it uses; the variables it needs, and what its
/// result depends on.
fn compile_rule(
    env: &Env,
    p: &Policy,
    terms: &BTreeMap<String, Vec<String>>,
) -> Result<(Program, Needs, Option<Vec<memo::Input>>), PolicyError> {
    if p.when.len() > MAX_WHEN_BYTES {
        return Err(PolicyError::Rule {
            name: p.name.clone(),
            message: format!(
                "`when` is {} bytes; at most {MAX_WHEN_BYTES} (put long lists in [policy_terms])",
                p.when.len()
            ),
        });
    }
    let program = env.compile(&p.when).map_err(|errors| {
        let first = errors.errors.first();
        let (line, column) = first.map_or((1, 1), |e| {
            (
                u32::try_from(e.pos.0).unwrap_or(1).max(1),
                u32::try_from(e.pos.1).unwrap_or(1).max(1),
            )
        });
        PolicyError::At {
            name: p.name.clone(),
            line,
            column,
            message: first.map_or_else(|| "does not parse".into(), |e| e.msg.clone()),
        }
    })?;
    let depth = depth(program.expression());
    if depth > MAX_DEPTH {
        return Err(PolicyError::Rule {
            name: p.name.clone(),
            message: format!("`when` is nested {depth} levels deep; at most {MAX_DEPTH}"),
        });
    }
    let mut uses = Vec::new();
    free_names(program.expression(), &mut Vec::new(), &mut uses);
    let mut needs = Needs::default();
    for Use { var, field, id, .. } in uses.iter().cloned() {
        let at = |message: String| {
            let (line, column) = position(&p.when, program.source_info().offset_for(id));
            PolicyError::At {
                name: p.name.clone(),
                line,
                column,
                message,
            }
        };
        let Some((_, fields)) = facts::VARIABLES.iter().find(|(v, _)| *v == var) else {
            let known: Vec<&str> = facts::VARIABLES.iter().map(|(v, _)| *v).collect();
            return Err(at(format!(
                "unknown variable `{var}` (variables: {})",
                known.join(", ")
            )));
        };
        if let Some(f) = &field {
            if var == "terms" && !terms.contains_key(f) {
                return Err(at(format!("no [policy_terms] list named `{f}`")));
            }
            if !fields.is_empty() && !fields.contains(&f.as_str()) {
                return Err(at(format!(
                    "`{var}` has no field `{f}` (fields: {})",
                    fields.join(", ")
                )));
            }
        }
        if p.action.on_request() && facts::RESPONSE_VARIABLES.contains(&var.as_str()) {
            return Err(at(format!(
                "a {} rule acts before the request goes upstream and cannot use `{var}`",
                p.action.as_str()
            )));
        }
        needs = needs.union(Needs::of_use(&var, field.as_deref()));
    }
    Ok((program, needs, memo::inputs(&uses)))
}

/// How deep an expression is (the parser has bounded it already; this bounds evaluation).
fn depth(e: &IdedExpr) -> usize {
    let deepest = |xs: &mut dyn Iterator<Item = &IdedExpr>| xs.map(depth).max().unwrap_or(0);
    1 + match &e.expr {
        Expr::Select(s) => depth(&s.operand),
        Expr::Call(c) => deepest(&mut c.target.iter().map(|t| &**t).chain(c.args.iter())),
        Expr::List(l) => deepest(&mut l.elements.iter()),
        Expr::Map(m) => deepest(
            &mut m
                .entries
                .iter()
                .filter_map(|e| match &e.expr {
                    EntryExpr::MapEntry(me) => Some([&me.key, &me.value]),
                    EntryExpr::StructField(_) => None,
                })
                .flatten(),
        ),
        Expr::Struct(s) => deepest(&mut s.entries.iter().flat_map(|e| match &e.expr {
            EntryExpr::StructField(f) => vec![&f.value],
            EntryExpr::MapEntry(me) => vec![&me.key, &me.value],
        })),
        Expr::Comprehension(c) => deepest(
            &mut [
                &c.iter_range,
                &c.accu_init,
                &c.loop_cond,
                &c.loop_step,
                &c.result,
            ]
            .into_iter(),
        ),
        Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => 0,
    }
}

/// The string literals and selected field names of an expression.
fn words(e: &IdedExpr, out: &mut Vec<String>) {
    match &e.expr {
        Expr::Literal(cel::common::ast::LiteralValue::String(s)) => out.push(s.inner().to_owned()),
        Expr::Select(s) => {
            out.push(s.field.clone());
            words(&s.operand, out);
        }
        Expr::Call(c) => {
            c.target.iter().for_each(|t| words(t, out));
            c.args.iter().for_each(|a| words(a, out));
        }
        Expr::List(l) => l.elements.iter().for_each(|x| words(x, out)),
        Expr::Map(m) => {
            for entry in &m.entries {
                if let EntryExpr::MapEntry(me) = &entry.expr {
                    words(&me.key, out);
                    words(&me.value, out);
                }
            }
        }
        Expr::Struct(s) => {
            for entry in &s.entries {
                match &entry.expr {
                    EntryExpr::StructField(f) => words(&f.value, out),
                    EntryExpr::MapEntry(me) => {
                        words(&me.key, out);
                        words(&me.value, out);
                    }
                }
            }
        }
        Expr::Comprehension(c) => {
            for x in [
                &c.iter_range,
                &c.accu_init,
                &c.loop_cond,
                &c.loop_step,
                &c.result,
            ] {
                words(x, out);
            }
        }
        Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => {}
    }
}

/// Line and column (from 1) of a character offset in `source`.
fn position(source: &str, offset: Option<(u32, u32)>) -> (u32, u32) {
    let at = offset.map_or(0, |(start, _)| start as usize);
    let mut line = 1;
    let mut column = 1;
    for c in source.chars().take(at) {
        if c == '\n' {
            line += 1;
            column = 1;
        } else {
            column += 1;
        }
    }
    (line, column)
}

/// A variable an expression reads (outside the comprehension variables it binds).
#[derive(Debug, Clone)]
struct Use {
    var: String,
    /// The field selected on it.
    field: Option<String>,
    /// The expression id, for positions in errors.
    id: u64,
    /// Read only as `VAR.FIELD.containsAny(terms.NAME)`: only which lists match counts.
    scanned: bool,
}

/// The variables an expression reads, outside the comprehension variables it binds.
fn free_names(e: &IdedExpr, bound: &mut Vec<String>, out: &mut Vec<Use>) {
    let free = |n: &String, bound: &Vec<String>| !bound.contains(n);
    match &e.expr {
        Expr::Ident(n) => {
            if free(n, bound) {
                out.push(Use {
                    var: n.clone(),
                    field: None,
                    id: e.id,
                    scanned: false,
                });
            }
        }
        Expr::Select(s) => match &s.operand.expr {
            Expr::Ident(n) if free(n, bound) => out.push(Use {
                var: n.clone(),
                field: Some(s.field.clone()),
                id: s.operand.id,
                scanned: false,
            }),
            _ => free_names(&s.operand, bound, out),
        },
        Expr::Call(c) => {
            if let Some(t) = &c.target {
                let before = out.len();
                free_names(t, bound, out);
                // `X.containsAny(terms.NAME)` asks only which lists X holds a term of.
                let on_terms = c.func_name == "containsAny"
                    && matches!(c.args.as_slice(), [a] if matches!(&a.expr,
                        Expr::Select(s) if matches!(&s.operand.expr,
                            Expr::Ident(n) if n == "terms" && free(n, bound))));
                let direct = matches!(&t.expr, Expr::Select(s) if !s.test
                    && matches!(&s.operand.expr, Expr::Ident(_)));
                if on_terms && direct && out.len() == before + 1 {
                    out[before].scanned = true;
                }
            }
            for a in &c.args {
                free_names(a, bound, out);
            }
        }
        Expr::List(l) => {
            for x in &l.elements {
                free_names(x, bound, out);
            }
        }
        Expr::Map(m) => {
            for entry in &m.entries {
                if let EntryExpr::MapEntry(me) = &entry.expr {
                    free_names(&me.key, bound, out);
                    free_names(&me.value, bound, out);
                }
            }
        }
        Expr::Struct(s) => {
            for entry in &s.entries {
                match &entry.expr {
                    EntryExpr::StructField(f) => free_names(&f.value, bound, out),
                    EntryExpr::MapEntry(me) => {
                        free_names(&me.key, bound, out);
                        free_names(&me.value, bound, out);
                    }
                }
            }
        }
        Expr::Comprehension(c) => {
            free_names(&c.iter_range, bound, out);
            free_names(&c.accu_init, bound, out);
            let depth = bound.len();
            bound.push(c.iter_var.clone());
            bound.extend(c.iter_var2.clone());
            bound.push(c.accu_var.clone());
            free_names(&c.loop_cond, bound, out);
            free_names(&c.loop_step, bound, out);
            free_names(&c.result, bound, out);
            bound.truncate(depth);
        }
        Expr::Literal(_) | Expr::Unspecified => {}
    }
}

/// A run-time error as records and logs may show it: types and names from the rule,
/// never a value of the exchange (cel's own messages print values).
fn describe(e: &ExecutionError) -> String {
    match e {
        ExecutionError::NoSuchOverload(o) => o.to_string(),
        ExecutionError::UndeclaredReference(name) => format!("unknown name `{name}`"),
        ExecutionError::NoSuchKey(_) => "no such key".into(),
        ExecutionError::UnexpectedType { got, want } => {
            format!("unexpected type: got {got}, want {want}")
        }
        ExecutionError::ValuesNotComparable(a, b) => format!(
            "values of types {} and {} cannot be compared",
            a.type_of(),
            b.type_of()
        ),
        ExecutionError::UnsupportedBinaryOperator(op, a, b) => format!(
            "operator `{op}` does not apply to {} and {}",
            a.type_of(),
            b.type_of()
        ),
        ExecutionError::IndexOutOfBounds(_) => "index out of bounds".into(),
        ExecutionError::DivisionByZero(_) | ExecutionError::RemainderByZero(_) => {
            "division by zero".into()
        }
        ExecutionError::FunctionError { function, .. } => {
            format!("function `{function}` failed")
        }
        ExecutionError::InvalidArgumentCount { expected, actual } => {
            format!("expected {expected} arguments, got {actual}")
        }
        _ => "the expression failed to evaluate".into(),
    }
}

/// The policy set's fingerprint: rules and term lists as configured.
pub fn version(policies: &[Policy], terms: &BTreeMap<String, Vec<String>>) -> String {
    let canonical = serde_json::json!({"policies": policies, "terms": terms});
    hex::encode(&Sha256::digest(canonical.to_string().as_bytes())[..8])
}

#[cfg(test)]
mod tests;
