//! The `custody` proxy: a transparent reverse proxy for LLM APIs whose every exchange
//! is teed to the audit writer.
//!
//! # Layout
//! The request path, in order: [`server`] (accept, shutdown; [`connection`] bounds how
//! many connections and how long a silent one lives) -> [`service`] (route,
//! forward) with [`route`] and [`upstream`] (and, for routes a
//! request policy applies to, [`policy`]) -> [`tee`] (bodies, hand-over to the audit
//! queue). [`error`] maps failures to responses in one place. [`mock`] is the loopback
//! mock provider used by `custody demo` and the SDK conformance tests.
#![forbid(unsafe_code)]

pub mod admin;
pub mod admission;
pub mod connection;
pub mod console;
pub mod error;
pub mod keys;
pub mod metrics;
pub mod mock;
pub mod policy;
pub mod remote;
pub mod route;
pub mod server;
pub mod service;
pub mod ship;
pub mod tee;
pub mod timeout;
pub mod tls;
pub mod trace;
pub mod upstream;

pub use error::ProxyError;
pub use server::{run, run_with, ReloadRequest, RunOptions, RunSummary};
