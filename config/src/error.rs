use std::path::PathBuf;

/// Everything that can be wrong with a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The TOML is malformed, has an unknown key, or a value of the wrong type.
    /// `message` carries the line and column from the TOML parser.
    #[error("{origin}: {message}")]
    Parse { origin: String, message: String },
    /// The TOML is well formed but a value breaks a rule; `key` is the dotted key at fault.
    #[error("{origin}: invalid `{key}`: {reason}")]
    Invalid {
        origin: String,
        key: String,
        reason: String,
    },
}
