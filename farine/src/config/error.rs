use std::path::PathBuf;

/// What can be wrong with farine's configuration. Each error names the file, and where it
/// applies the section and the option, and says what was expected. Values of secret options
/// and passwords in URIs are masked (never shown in full).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error(
        "cannot read config file {path}: {source} (the path comes from --config, else FARINE_INI, else /etc/farine.ini)"
    )]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{file}, line {line}: {message}")]
    Syntax {
        file: String,
        line: usize,
        message: String,
    },

    #[error(
        "{file} has no section [{section}] for service `{section}`: add one (it may be empty, [DEFAULT] values are inherited)"
    )]
    MissingSection { file: String, section: String },

    #[error("{file}, section [{section}]: option `{key}` is missing; expected {expected}")]
    MissingKey {
        file: String,
        section: String,
        key: String,
        expected: &'static str,
    },

    #[error(transparent)]
    InvalidValue(Box<InvalidValue>),

    #[error("{file}, section [{section}]: option `{key}`: {message}")]
    Interpolation {
        file: String,
        section: String,
        key: String,
        message: String,
    },

    #[error("environment overrides (FARINE__<SECTION>__<KEY>): {0}")]
    Environment(String),
}

/// An option whose value is not what was expected.
#[derive(Debug, thiserror::Error)]
#[error("{file}, section [{section}]: option `{key}` is {value:?}{origin}; expected {expected}")]
#[non_exhaustive]
pub struct InvalidValue {
    pub file: String,
    pub section: String,
    pub key: String,
    /// The value as given, with secrets masked.
    pub value: String,
    pub expected: String,
    /// Where the value came from when it was not the file (an environment variable).
    pub origin: String,
}
