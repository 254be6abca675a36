//! Errors of admin functions and distributed DDL. Each variant says what kind of
//! mistake it is; `crate::error` turns them into SQLSTATEs (Citus's where Citus has one).

use crate::plugin::PluginError;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// A node answered a statement with an error: forwarded with its own SQLSTATE.
    #[error("{message}")]
    Db {
        node: String,
        code: String,
        message: String,
        detail: Option<String>,
        hint: Option<String>,
    },
    /// A node could not be reached (or the connection broke).
    #[error("connection to the remote node {node} failed: {reason}")]
    Connect { node: String, reason: String },
    #[error("relation \"{0}\" does not exist")]
    UndefinedTable(String),
    #[error("column \"{column}\" of relation \"{table}\" does not exist")]
    UndefinedColumn { column: String, table: String },
    #[error("{0}")]
    UndefinedFunction(String),
    #[error("{0}")]
    UndefinedObject(String),
    #[error("{0}")]
    InvalidParameter(String),
    #[error("{message}")]
    InvalidDefinition {
        message: String,
        detail: Option<String>,
    },
    #[error("{0}")]
    NotSupported(String),
    #[error("{0} cannot run inside a transaction block")]
    InTransaction(String),
    #[error("{message}")]
    Prerequisite {
        message: String,
        hint: Option<String>,
    },
    #[error("{0}")]
    NullValue(String),
    #[error("{0}")]
    InvalidText(String),
    /// A number too large for its type (22003).
    #[error("{0}")]
    OutOfRange(String),
    #[error("{0}")]
    Syntax(String),
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// A commit reached some nodes and not others (a crash or lost connection between
    /// the coordinator's commit and COMMIT PREPARED); recovery finishes it.
    #[error("the change committed, but node {node} has not confirmed it yet: {reason}")]
    InDoubt { node: String, reason: String },
}

impl AdminError {
    /// An error of a statement on `node`.
    pub fn on(node: &str, e: tokio_postgres::Error) -> AdminError {
        if let Some(db) = e.as_db_error() {
            return AdminError::Db {
                node: node.to_owned(),
                code: db.code().code().to_owned(),
                message: db.message().to_owned(),
                detail: db.detail().map(str::to_owned),
                hint: db.hint().map(str::to_owned),
            };
        }
        AdminError::Connect {
            node: node.to_owned(),
            reason: e.to_string(),
        }
    }
}
