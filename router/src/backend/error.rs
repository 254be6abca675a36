//! Errors on the router's side of the wire: connecting to, logging in to, and talking
//! with a Postgres node, and waiting for a pooled connection.

use crate::protocol::{Frame, ProtocolError};

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("could not connect to node {node}: {source}")]
    Connect {
        node: String,
        source: std::io::Error,
    },
    #[error("timed out connecting to node {node}")]
    ConnectTimeout { node: String },
    /// The node refused the login or the startup (unknown database, role, too many
    /// connections...). The ErrorResponse is kept raw so the client sees exactly what
    /// Postgres said.
    #[error("node rejected the connection")]
    Rejected(Frame),
    #[error("node {node} asked for an authentication method the router cannot answer: {method}")]
    UnsupportedAuth { node: String, method: String },
    #[error("no password configured for user {user} to log in to node {node}")]
    MissingPassword { node: String, user: String },
    #[error("lost the connection to the node: {0}")]
    Io(#[from] std::io::Error),
    #[error("the node closed the connection")]
    Closed,
    #[error("the node sent bytes the router does not understand: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("the node's answer does not match what was asked: {0}")]
    Desync(&'static str),
    /// A statement the router ran for itself (settings, reset) failed on the node.
    #[error("a router-issued statement failed on the node")]
    Statement(Frame),
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("no connection to node {node} became free within {waited_ms} ms")]
    Timeout { node: String, waited_ms: u64 },
    #[error("the pool is closed because the router is shutting down")]
    Closed,
    #[error(transparent)]
    Backend(#[from] BackendError),
}
