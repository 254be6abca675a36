//! The router's errors as clients see them. SQLSTATE is assigned here and only here: one
//! exhaustive mapping from every layer's error enum to (severity, SQLSTATE, message,
//! detail, hint). Errors that a backend sent are forwarded as the backend sent them.
//! What a client may see is an allowlist: addresses, paths and internals stay in the log.

use crate::admin::AdminError;
use crate::backend::{BackendError, PoolError};
use crate::frontend::AuthError;
use crate::plugin::PluginError;
use crate::protocol::{Frame, ProtocolError, btag, encode_error_fields};
use bytes::BytesMut;

/// A five-character SQLSTATE code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SqlState(&'static str);

impl SqlState {
    pub fn code(&self) -> &'static str {
        self.0
    }
}

/// The codes the router itself uses (names as in the Postgres docs, Appendix A).
pub mod sqlstate {
    use super::SqlState;
    pub const PROTOCOL_VIOLATION: SqlState = SqlState("08P01");
    pub const CONNECTION_FAILURE: SqlState = SqlState("08006");
    pub const UNABLE_TO_CONNECT: SqlState = SqlState("08001");
    pub const INVALID_AUTHORIZATION: SqlState = SqlState("28000");
    pub const INVALID_PASSWORD: SqlState = SqlState("28P01");
    pub const TOO_MANY_CONNECTIONS: SqlState = SqlState("53300");
    pub const ADMIN_SHUTDOWN: SqlState = SqlState("57P01");
    pub const CANNOT_CONNECT_NOW: SqlState = SqlState("57P03");
    pub const FEATURE_NOT_SUPPORTED: SqlState = SqlState("0A000");
    pub const PROGRAM_LIMIT_EXCEEDED: SqlState = SqlState("54000");
    pub const DUPLICATE_PREPARED_STATEMENT: SqlState = SqlState("42P05");
    pub const INVALID_SQL_STATEMENT_NAME: SqlState = SqlState("26000");
    pub const RESERVED_NAME: SqlState = SqlState("42939");
    pub const INTERNAL_ERROR: SqlState = SqlState("XX000");
    pub const UNDEFINED_TABLE: SqlState = SqlState("42P01");
    pub const UNDEFINED_COLUMN: SqlState = SqlState("42703");
    pub const UNDEFINED_FUNCTION: SqlState = SqlState("42883");
    pub const UNDEFINED_OBJECT: SqlState = SqlState("42704");
    pub const INVALID_PARAMETER_VALUE: SqlState = SqlState("22023");
    pub const INVALID_TABLE_DEFINITION: SqlState = SqlState("42P16");
    pub const ACTIVE_SQL_TRANSACTION: SqlState = SqlState("25001");
    pub const OBJECT_NOT_IN_PREREQUISITE_STATE: SqlState = SqlState("55000");
    pub const NULL_VALUE_NOT_ALLOWED: SqlState = SqlState("22004");
    pub const INVALID_TEXT_REPRESENTATION: SqlState = SqlState("22P02");
    pub const NUMERIC_VALUE_OUT_OF_RANGE: SqlState = SqlState("22003");
    pub const SYNTAX_ERROR: SqlState = SqlState("42601");
    pub const EXTERNAL_ROUTINE_EXCEPTION: SqlState = SqlState("39000");
    pub const QUERY_CANCELED: SqlState = SqlState("57014");
    pub const OUT_OF_MEMORY: SqlState = SqlState("53200");
    pub const TRANSACTION_RESOLUTION_UNKNOWN: SqlState = SqlState("08007");
    pub const DEADLOCK_DETECTED: SqlState = SqlState("40P01");
    pub const TRANSACTION_ROLLBACK: SqlState = SqlState("40000");
    pub const CARDINALITY_VIOLATION: SqlState = SqlState("21000");
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

/// Whose fault an error is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorSource {
    Client,
    Backend,
    Router,
}

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("the router is shutting down")]
    Shutdown,
    #[error("too many client connections")]
    TooManyClients,
    #[error("the router only accepts TLS connections")]
    TlsRequired,
    #[error("client connection failed: {0}")]
    ClientIo(std::io::Error),
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error(transparent)]
    Plan(#[from] crate::plan::PlanError),
    #[error(transparent)]
    Commit(#[from] crate::txn::CommitError),
}

/// What the client is told.
#[derive(Debug, Clone)]
pub struct UserFacing {
    pub severity: Severity,
    pub code: SqlState,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
    /// A node's own SQLSTATE, forwarded as it was (overrides `code` on the wire).
    pub raw_code: Option<String>,
}

impl UserFacing {
    fn new(severity: Severity, code: SqlState, message: impl Into<String>) -> Self {
        UserFacing {
            severity,
            code,
            message: message.into(),
            detail: None,
            hint: None,
            raw_code: None,
        }
    }

    /// The error of a transaction cancelled to break a distributed deadlock.
    pub fn deadlock(message: String, detail: String) -> Self {
        let mut u = UserFacing::new(Severity::Error, sqlstate::DEADLOCK_DETECTED, message)
            .hint("Retry the transaction.");
        u.detail = Some(detail);
        u
    }

    fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Appends the ErrorResponse to `buf`.
    pub fn encode(&self, buf: &mut BytesMut) {
        let sev = match self.severity {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        };
        let mut fields: Vec<(u8, &str)> = vec![
            (b'S', sev),
            (b'V', sev),
            (b'C', self.raw_code.as_deref().unwrap_or(self.code.code())),
            (b'M', &self.message),
        ];
        if let Some(d) = &self.detail {
            fields.push((b'D', d));
        }
        if let Some(h) = &self.hint {
            fields.push((b'H', h));
        }
        encode_error_fields(buf, btag::ERROR_RESPONSE, &fields);
    }
}

impl RouterError {
    /// The backend's own ErrorResponse, to forward untouched.
    pub fn backend_frame(&self) -> Option<&Frame> {
        match self {
            RouterError::Backend(BackendError::Rejected(f) | BackendError::Statement(f))
            | RouterError::Pool(PoolError::Backend(
                BackendError::Rejected(f) | BackendError::Statement(f),
            )) => Some(f),
            _ => None,
        }
    }

    /// What the client is told; `None` when the client cannot be told anything (its
    /// socket is gone) or the backend's own message is forwarded instead.
    pub fn user_facing(&self) -> Option<UserFacing> {
        use Severity::*;
        use sqlstate::*;
        Some(match self {
            RouterError::Protocol(e) => match e {
                ProtocolError::MessageTooLarge { .. } => {
                    UserFacing::new(Fatal, PROTOCOL_VIOLATION, format!("invalid message: {e}"))
                        .hint("raise server.max_message_bytes if such messages are expected")
                }
                ProtocolError::UnsupportedVersion { .. } => {
                    UserFacing::new(Fatal, FEATURE_NOT_SUPPORTED, e.to_string())
                }
                _ => UserFacing::new(Fatal, PROTOCOL_VIOLATION, e.to_string()),
            },
            RouterError::Auth(e) => match e {
                AuthError::PasswordFailed { .. } => {
                    UserFacing::new(Fatal, INVALID_PASSWORD, e.to_string())
                }
                AuthError::NoUser => UserFacing::new(Fatal, INVALID_AUTHORIZATION, e.to_string()),
                AuthError::Malformed(_) | AuthError::UnsupportedMechanism => {
                    UserFacing::new(Fatal, PROTOCOL_VIOLATION, e.to_string())
                }
            },
            RouterError::Backend(e) => backend_facing(e)?,
            RouterError::Pool(e) => match e {
                PoolError::Timeout { waited_ms, .. } => UserFacing::new(
                    Error,
                    TOO_MANY_CONNECTIONS,
                    format!("no backend connection became free within {waited_ms} ms"),
                )
                .hint("raise pool_size or pool_acquire_timeout_ms, or shorten transactions"),
                PoolError::Closed => {
                    UserFacing::new(Fatal, ADMIN_SHUTDOWN, "the router is shutting down")
                }
                PoolError::Backend(e) => backend_facing(e)?,
            },
            RouterError::Shutdown => UserFacing::new(
                Fatal,
                ADMIN_SHUTDOWN,
                "terminating connection due to administrator command",
            ),
            RouterError::TooManyClients => UserFacing::new(
                Fatal,
                TOO_MANY_CONNECTIONS,
                "sorry, too many clients already",
            ),
            RouterError::TlsRequired => UserFacing::new(
                Fatal,
                INVALID_AUTHORIZATION,
                "the router requires an SSL/TLS connection",
            )
            .hint("connect with sslmode=require"),
            RouterError::ClientIo(_) => return None,
            RouterError::Admin(e) => admin_facing(e),
            RouterError::Plan(e) => plan_facing(e),
            RouterError::Commit(e) => UserFacing {
                severity: Error,
                code: TRANSACTION_ROLLBACK,
                message: e.message.clone(),
                detail: e.detail.clone(),
                hint: e.hint.clone(),
                raw_code: Some(e.code.clone()),
            },
        })
    }

    /// Whose fault it is.
    pub fn source(&self) -> ErrorSource {
        match self {
            RouterError::Protocol(_) | RouterError::Auth(_) | RouterError::TlsRequired => {
                ErrorSource::Client
            }
            RouterError::ClientIo(_) => ErrorSource::Client,
            RouterError::Admin(AdminError::Db { .. } | AdminError::Connect { .. }) => {
                ErrorSource::Backend
            }
            RouterError::Admin(AdminError::Plugin(_) | AdminError::InDoubt { .. }) => {
                ErrorSource::Router
            }
            RouterError::Admin(_) => ErrorSource::Client,
            RouterError::Plan(crate::plan::PlanError::Plugin(_)) => ErrorSource::Router,
            RouterError::Plan(_) => ErrorSource::Client,
            RouterError::Commit(_) => ErrorSource::Backend,
            RouterError::Backend(_) | RouterError::Pool(PoolError::Backend(_)) => {
                ErrorSource::Backend
            }
            RouterError::Pool(_) | RouterError::Shutdown | RouterError::TooManyClients => {
                ErrorSource::Router
            }
        }
    }

    /// Whether the client may simply try again.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            RouterError::Pool(PoolError::Timeout { .. })
                | RouterError::TooManyClients
                | RouterError::Backend(
                    BackendError::Connect { .. } | BackendError::ConnectTimeout { .. }
                )
                | RouterError::Pool(PoolError::Backend(
                    BackendError::Connect { .. } | BackendError::ConnectTimeout { .. }
                ))
        )
    }
}

fn admin_facing(e: &AdminError) -> UserFacing {
    use Severity::*;
    use sqlstate::*;
    let plain = |code| UserFacing::new(Error, code, e.to_string());
    match e {
        AdminError::Db {
            node,
            code,
            message,
            detail,
            hint,
        } => {
            // Postgres's own SQLSTATE, kept; the node is named in the detail.
            let mut u = UserFacing::new(Error, INTERNAL_ERROR, message.clone());
            u.raw_code = Some(code.clone());
            u.detail = Some(match detail {
                Some(d) => format!("{d} (on node {node})"),
                None => format!("on node {node}"),
            });
            u.hint = hint.clone();
            u
        }
        AdminError::Connect { .. } => plain(CONNECTION_FAILURE),
        AdminError::UndefinedTable(_) => plain(UNDEFINED_TABLE),
        AdminError::UndefinedColumn { .. } => plain(UNDEFINED_COLUMN),
        AdminError::UndefinedFunction(_) => plain(UNDEFINED_FUNCTION),
        AdminError::UndefinedObject(_) => plain(UNDEFINED_OBJECT),
        AdminError::InvalidParameter(_) => plain(INVALID_PARAMETER_VALUE),
        AdminError::InvalidDefinition { detail, .. } => {
            let mut u = plain(INVALID_TABLE_DEFINITION);
            u.detail = detail.clone();
            u
        }
        AdminError::NotSupported(_) => plain(FEATURE_NOT_SUPPORTED),
        AdminError::InTransaction(_) => plain(ACTIVE_SQL_TRANSACTION),
        AdminError::Prerequisite { hint, .. } => {
            let mut u = plain(OBJECT_NOT_IN_PREREQUISITE_STATE);
            u.hint = hint.clone();
            u
        }
        AdminError::NullValue(_) => plain(NULL_VALUE_NOT_ALLOWED),
        AdminError::InvalidText(_) => plain(INVALID_TEXT_REPRESENTATION),
        AdminError::OutOfRange(_) => plain(NUMERIC_VALUE_OUT_OF_RANGE),
        AdminError::Syntax(_) => plain(SYNTAX_ERROR),
        AdminError::InDoubt { .. } => plain(TRANSACTION_RESOLUTION_UNKNOWN)
            .hint("the change is committed in the catalog; the node finishes it when it is back"),
        AdminError::Plugin(p) => plugin_facing(p),
    }
}

/// A statement on distributed tables cannot be planned or bound.
pub(crate) fn plan_facing(e: &crate::plan::PlanError) -> UserFacing {
    use crate::plan::PlanError as P;
    use Severity::*;
    use sqlstate::*;
    match e {
        P::Plugin(p) => plugin_facing(p),
        P::NotPlannable(_) | P::NotSupported(_) => {
            UserFacing::new(Error, FEATURE_NOT_SUPPORTED, e.to_string())
        }
        P::InvalidValue(_) => UserFacing::new(Error, INVALID_TEXT_REPRESENTATION, e.to_string()),
        P::OutOfRange(_) => UserFacing::new(Error, NUMERIC_VALUE_OUT_OF_RANGE, e.to_string()),
        P::NullKey(_) => UserFacing::new(Error, NULL_VALUE_NOT_ALLOWED, e.to_string()),
        P::NoPlacement(_) => {
            UserFacing::new(Error, OBJECT_NOT_IN_PREREQUISITE_STATE, e.to_string())
        }
        P::Cardinality(_) => UserFacing::new(Error, CARDINALITY_VIOLATION, e.to_string()).hint(
            "Ensure that no rows proposed for insertion within the same command have duplicate constrained values.",
        ),
    }
}

/// A plugin failed or misbehaved: the statement fails, the message names the plugin;
/// traps' details stay in the log.
pub fn plugin_facing(e: &PluginError) -> UserFacing {
    use Severity::*;
    use sqlstate::*;
    match e {
        PluginError::Timeout { .. } => UserFacing::new(Error, QUERY_CANCELED, e.to_string()),
        PluginError::OutOfMemory { .. } => UserFacing::new(Error, OUT_OF_MEMORY, e.to_string()),
        PluginError::Rejected { .. } => {
            UserFacing::new(Error, INVALID_PARAMETER_VALUE, e.to_string())
        }
        PluginError::Read { .. } | PluginError::Refused { .. } => UserFacing::new(
            Error,
            EXTERNAL_ROUTINE_EXCEPTION,
            "a plugin could not be loaded",
        ),
        PluginError::Trap { .. } | PluginError::Invalid { .. } => {
            UserFacing::new(Error, EXTERNAL_ROUTINE_EXCEPTION, e.to_string())
        }
    }
}

fn backend_facing(e: &BackendError) -> Option<UserFacing> {
    use Severity::*;
    use sqlstate::*;
    Some(match e {
        // Forwarded raw by the caller.
        BackendError::Rejected(_) | BackendError::Statement(_) => return None,
        BackendError::Connect { node, .. } | BackendError::ConnectTimeout { node } => {
            UserFacing::new(
                Error,
                UNABLE_TO_CONNECT,
                format!("could not connect to node \"{node}\""),
            )
        }
        BackendError::UnsupportedAuth { node, .. } | BackendError::MissingPassword { node, .. } => {
            UserFacing::new(
                Fatal,
                INVALID_AUTHORIZATION,
                format!("the router could not log in to node \"{node}\""),
            )
            .hint("check the users section of the router's configuration")
        }
        BackendError::Io(_) | BackendError::Closed => UserFacing::new(
            Error,
            CONNECTION_FAILURE,
            "lost the connection to the database server while running the statement",
        )
        .hint("the statement may or may not have run; the transaction, if any, was rolled back"),
        BackendError::Protocol(_) | BackendError::Desync(_) => UserFacing::new(
            Error,
            INTERNAL_ERROR,
            "the router and the database server disagreed about the protocol",
        ),
    })
}

/// Why a router could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot load the plugins: {0}")]
    Plugins(String),
    #[error("distributed transactions: {0}")]
    Txn(String),
}
