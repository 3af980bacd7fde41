use std::path::PathBuf;

/// Errors of the audit crate.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// A file or directory of the trail could not be used.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The fingerprint key file exists but is not usable.
    #[error("fingerprint key {path}: {reason}")]
    BadKeyFile { path: PathBuf, reason: &'static str },
    /// A segment is not in the custody format, past what recovery may cut.
    #[error("segment {path}: {source}")]
    Format {
        path: PathBuf,
        #[source]
        source: crate::segment::FormatError,
    },
    /// The `[redaction]` rules cannot be built.
    #[error(transparent)]
    Redact(#[from] crate::redact::RedactError),
    /// A `[[policy]]` rule does not compile.
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
    /// No record has this id.
    #[error("no record with id {0}")]
    NotFound(String),
    /// A Parquet export could not be written.
    #[error("parquet export: {0}")]
    Export(String),
    /// A graph export could not be written.
    #[error("graph export: {0}")]
    Graph(String),
    /// Record lines of a trail that no reader can parse: a review that skipped them
    /// would not be complete.
    #[error("{count} record line(s) are not readable JSON ({context})")]
    Unreadable { count: u64, context: String },
    /// The writer thread could not be started or ended abnormally.
    #[error("audit writer: {0}")]
    Writer(String),
}
