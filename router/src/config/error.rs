//! Errors in loading and checking the configuration file.

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: String,
        source: Box<toml::de::Error>,
    },
    #[error("environment variable {var} (named by {key}) is not set")]
    MissingEnv { var: String, key: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error("cannot load TLS material: {0}")]
    Tls(String),
}
