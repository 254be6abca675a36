//! Admin functions and distributed DDL inside a session: recognised in the client's
//! simple queries, run by `crate::admin` after every earlier reply has been sent, and
//! answered like a Postgres query (notices, rows, command tag, ReadyForQuery).

use super::Session;
use crate::admin::{AdminError, Reply, Request, classify};
use crate::catalog::Snapshot;
use crate::error::RouterError;
use crate::protocol::{self, Frame, TxnStatus};
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};

/// The catalog of databases that hold no distributed tables.
static EMPTY: std::sync::LazyLock<Snapshot> = std::sync::LazyLock::new(Snapshot::default);

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// Whether the router runs this simple query itself (or refuses it).
    pub(super) fn intercept(&self, frame: &Frame) -> Option<Result<Request, AdminError>> {
        let body = frame.body();
        let sql = std::str::from_utf8(&body[..body.len().saturating_sub(1)]).ok()?;
        self.admin_check(sql)
    }

    /// Admin calls and DDL on distributed tables: the router runs them (other
    /// statements on distributed tables are routed, see `route.rs`).
    pub(super) fn admin_check(&self, sql: &str) -> Option<Result<Request, AdminError>> {
        if !(crate::admin::may_be_call(sql) || crate::admin::may_be_ddl(sql)) {
            return None;
        }
        let in_catalog_db = self.database == self.ctx.catalog.database;
        let guard = self.ctx.catalog.peek();
        let snap: &Snapshot = if in_catalog_db { &guard } else { &EMPTY };
        classify(snap, sql).transpose()
    }

    /// Admin functions and DDL on distributed tables are run by the router for simple
    /// queries only; through the extended protocol they would reach the coordinator
    /// alone, so they are refused there (by the backend, so the transaction state is
    /// Postgres's own).
    pub(super) fn refuse_extended_admin(&mut self, query: &[u8]) -> bool {
        let Ok(sql) = std::str::from_utf8(query) else {
            return false;
        };
        let message = match self.admin_check(sql.trim_end_matches('\0')) {
            None => return false,
            Some(Ok(r)) => format!(
                "{}: shardgate runs admin functions and DDL on distributed tables for simple queries only; send it without parameters through the simple query protocol",
                r.describe()
            ),
            Some(Err(e)) => e.to_string(),
        };
        self.raise_on_backend(
            crate::error::sqlstate::FEATURE_NOT_SUPPORTED.code(),
            &message,
        );
        true
    }

    /// Whether `sql` sets the session authorization in a database with distributed
    /// tables, where the workers would not follow it (`settings::sets_session_authorization`).
    /// A byte scan for `z` keeps it off the path of other statements.
    pub(super) fn refuses_session_authorization(&self, sql: &str) -> bool {
        memchr::memchr2(b'z', b'Z', sql.as_bytes()).is_some()
            && self.database == self.ctx.catalog.database
            && !self.ctx.catalog.peek().tables.is_empty()
            && super::settings::sets_session_authorization(sql)
    }

    /// Runs an intercepted request once every earlier reply has been sent.
    pub(super) async fn run_admin(
        &mut self,
        req: Result<Request, AdminError>,
    ) -> Result<(), RouterError> {
        let req = match req {
            Ok(r) => r,
            Err(e) => return self.admin_refuse(e).await,
        };
        // Extended messages without a Sync: the request would run inside their
        // implicit transaction block, which admin requests refuse as Postgres's
        // transaction-block commands do.
        if self.status != TxnStatus::Idle || self.lease_in_transaction() || self.needs_sync {
            return self
                .admin_refuse(AdminError::InTransaction(req.describe()))
                .await;
        }
        self.flush_client().await?;
        let result = self.run_admin_request(req).await;
        match result {
            Ok(reply) => {
                encode_reply(&mut self.out, &reply);
                protocol::encode_ready_for_query(&mut self.out, self.status);
                Ok(())
            }
            Err(e) => self.admin_refuse(e).await,
        }
    }

    fn lease_in_transaction(&self) -> bool {
        self.lease.is_some() && self.mode == crate::backend::PoolMode::Transaction
    }

    /// The request fails. Outside a transaction the router answers; inside one the
    /// backend raises the error itself so that the transaction is aborted exactly as
    /// Postgres would abort it.
    async fn admin_refuse(&mut self, e: AdminError) -> Result<(), RouterError> {
        self.refuse_in_session(RouterError::Admin(e)).await
    }
}

/// NoticeResponses, RowDescription, DataRows, CommandComplete (text format).
fn encode_reply(out: &mut BytesMut, r: &Reply) {
    super::admin_ext::encode_notices(out, r);
    if !r.columns.is_empty() {
        super::admin_ext::encode_row_description(out, &r.columns, &[]);
    }
    super::admin_ext::encode_rows(out, r, &r.columns, &[]);
}
