use std::path::Path;

use crate::{Config, ConfigError, DEFAULT_TOML};

/// The largest configuration file custody reads (1 MiB: hundreds of routes and keys).
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

impl Config {
    /// The embedded default, parsed and validated.
    pub fn embedded_default() -> Result<Self, ConfigError> {
        Self::from_toml_str(DEFAULT_TOML, "<embedded default>")
    }

    /// Reads, parses and validates a TOML file of at most [`MAX_CONFIG_BYTES`]; a FIFO,
    /// a device or `/dev/zero` given by mistake is refused, not read forever.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = read_bounded(path)?;
        Self::from_toml_str(&text, &path.display().to_string())
    }

    /// Parses and validates TOML text; `origin` names it in errors (a path, usually).
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_owned(),
            message: crate::secret::parse_message(&e, text),
        })?;
        config.validate(origin)
    }
}

/// A file's text, of at most [`MAX_CONFIG_BYTES`], from a regular file only.
pub fn read_bounded(path: &Path) -> Result<String, ConfigError> {
    let read = |source| ConfigError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read)?;
    let meta = file.metadata().map_err(read)?;
    if !meta.is_file() {
        return Err(read(std::io::Error::other("not a regular file")));
    }
    let mut text = String::new();
    use std::io::Read;
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(read)?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(read(std::io::Error::other(format!(
            "larger than {MAX_CONFIG_BYTES} bytes"
        ))));
    }
    Ok(text)
}
