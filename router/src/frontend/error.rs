//! Errors in a client's login.

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Wrong password, or a user the config does not know (the same answer for both,
    /// as Postgres gives, so that user names cannot be probed).
    #[error("password authentication failed for user \"{user}\"")]
    PasswordFailed { user: String },
    #[error("no PostgreSQL user name specified in startup packet")]
    NoUser,
    #[error("malformed authentication message: {0}")]
    Malformed(String),
    #[error("client chose an unsupported SASL mechanism")]
    UnsupportedMechanism,
}
