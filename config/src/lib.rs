//! Custody's configuration: the TOML schema, the embedded default, loading and validation.
//!
//! # Layout
//! - [`schema`]: the configuration types, one doc comment per key (the TOML keys are a contract).
//! - [`redaction`]: the `[redaction]` section and the built-in entity names.
//! - [`policy`]: `[[policy]]` rules and `[policy_terms]`, checked before the audit crate
//!   compiles them.
//! - [`load`]: parsing a file or string, then [`Config::validate`].
//! - [`secret`]: keeping operator secrets out of errors, logs and snapshots.
//! - [`error`]: [`ConfigError`], which always names the file, and the key or line at fault.
#![forbid(unsafe_code)]

pub mod console;
pub mod env;
pub mod error;
pub mod load;
pub mod policy;
pub mod redaction;
pub mod schema;
pub mod secret;

pub use console::{Console, Reviewer, Role};
pub use error::ConfigError;
pub use policy::{Action, OnError, Policy, PolicyMode, Severity};
pub use redaction::{Alphabet, CustomRule, Mode, Redaction, BUILTIN_ENTITIES};
pub use schema::{
    Admin, Audit, Config, Durability, Fsync, Limits, Lineage, Listen, ListenTls, Log, LogFormat,
    OnFull, Otel, Provider, Route, Ship, Upstream, UpstreamUrl, VirtualKey,
};

/// The embedded default configuration, printed by `custody config default`.
pub const DEFAULT_TOML: &str = include_str!("../default.toml");
