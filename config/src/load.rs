use std::path::Path;

use crate::{Config, ConfigError, DEFAULT_TOML};

impl Config {
    /// The embedded default, parsed and validated.
    pub fn embedded_default() -> Result<Self, ConfigError> {
        Self::from_toml_str(DEFAULT_TOML, "<embedded default>")
    }

    /// Reads, parses and validates a TOML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml_str(&text, &path.display().to_string())
    }

    /// Parses and validates TOML text; `origin` names it in errors (a path, usually).
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        config.validate(origin)
    }
}
