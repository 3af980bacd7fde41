//! Custody's audit records, from captured exchange to verified trail.
//!
//! # Layout
//! Data flows one way, top to bottom:
//! - [`exchange`]: what the proxy hands over (heads, `Bytes` clones, timings).
//! - [`writer`]: the bounded queue and the writer thread.
//! - [`assemble`]: exchange -> [`record::Record`]: [`decode`], [`genai`] (with [`sse`]), [`redact`], [`fingerprint`].
//! - [`policy`]: `[[policy]]` rules, evaluated on the request path (block, sanitize)
//!   and by the writer (flag, observe), their decisions in every record.
//! - [`store`]: appending blocks to segments, rotation, fsync, torn-tail recovery;
//!   [`unwritten`]: what a stop could not write, told by the next start.
//! - [`segment`]: the on-disk format (its module doc is the spec).
//!
//! The review side reads what the write side left, and never writes to it:
//! - [`review`]: reading ([`review::reader`]), searching, verifying and exporting a trail.
#![forbid(unsafe_code)]

pub mod assemble;
pub mod config_event;
pub mod content;
pub mod decode;
pub mod drift;
pub mod error;
pub mod exchange;
pub mod fingerprint;
pub mod genai;
pub mod index;
pub mod lineage;
pub mod merkle;
pub mod metrics;
pub mod otel;
pub mod policy;
pub mod purge;
pub mod record;
pub mod redact;
pub mod review;
pub mod segment;
pub mod signing;
pub mod sse;
pub mod store;
pub mod unwritten;
pub mod writer;

pub use error::AuditError;
pub use exchange::{Capture, Exchange, Identity, Outcome, TraceContext};
pub use metrics::AuditStats;
pub use writer::{AuditSender, AuditWriter, ConfigHandle};
