//! One client session after login: its transaction state, prepared statements and
//! settings; the loop that reads client messages, sends them over a borrowed backend
//! connection and forwards the answers (row data untouched).
//!
//! Protocol phases: `run` (startup answer) -> `serve` loop: `on_frame` per client
//! message (simple query, extended batch, function call, terminate) -> `exchange`
//! (send, then `pump` answers until every expected reply came) -> release the backend
//! when the transaction is over (transaction pooling).

mod admin;
mod admin_ext;
mod commit;
mod multi;
mod prepared;
mod pull;
mod route;
mod savepoint;
mod settings;

pub use prepared::{Prepared, PreparedRegistry, ReservedUse, reserved_use};
pub use settings::{SessionStmt, Settings, classify};

use crate::backend::{BackendConn, BackendError, Lease, Pool, PoolMode};
use crate::config::User;
use crate::error::{RouterError, sqlstate};
use crate::frontend::CancelSlot;
use crate::protocol::{
    self, Frame, FrameRef, ProtocolError, TxnStatus, btag, decode_frame, peek_header, tag,
};
use crate::server::ServerCtx;
use bytes::{Bytes, BytesMut};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Extended-protocol messages buffered without a Sync or Flush beyond this size are
/// sent to the backend anyway, so a long pipeline does not pile up in the router.
const BATCH_LIMIT: usize = 1 << 20;

/// While waiting for a backend, at most this much of what the client sends next is
/// read ahead (to notice a client that goes away).
const CLIENT_READAHEAD: usize = 64 * 1024;

/// Statements the router prepares on backends are named `sg_<n>`; sessions may not
/// reach such names except through their own statements.
const ROUTER_STMT_PREFIX: &[u8] = prepared::NAME_PREFIX.as_bytes();

/// Buffers that grew past this for one large message are given back afterwards.
const SHRINK_ABOVE: usize = 1 << 20;

/// What the router expects back from the backend, in order.
#[derive(Debug)]
enum Expect {
    /// A simple Query or FunctionCall: everything is forwarded until ReadyForQuery.
    Query {
        tracked: Option<SessionStmt>,
        ok: bool,
        /// The string holds a COMMIT or ROLLBACK (sent in a transaction): if it leaves
        /// another transaction open, the first one's settings end at its ReadyForQuery.
        /// Kept with its request, as the client may pipeline the next one.
        ends: Option<Ends>,
    },
    /// A statement of the router's own (settings): everything swallowed until ReadyForQuery.
    Internal,
    /// One extended-protocol message, answered by one terminal message. Not forwarded
    /// when the router injected it; `prepares` records a statement on success.
    Msg {
        forward: bool,
        prepares: Option<Arc<Prepared>>,
        undo: Option<Undo>,
        /// A Describe of this statement: its ParameterDescription is kept.
        describes: Option<Arc<Prepared>>,
        /// An Execute of a SET / RESET / DISCARD ALL: noted when it completes, recorded
        /// at ReadyForQuery if nothing in its batch failed.
        tracks: Option<SessionStmt>,
    },
    /// A reply the router makes itself, sent when every earlier reply has been.
    Synth { tag: u8, undo: Option<Undo> },
    /// A whole message the router answers with itself (a RowDescription it keeps),
    /// sent when every earlier reply has been.
    SynthFrame(Bytes),
    /// The Describe of the portal of a simple query run as a prepared statement
    /// (`route::send_promoted`): its RowDescription is forwarded, a NoData is not
    /// (a simple query that returns no rows has no RowDescription).
    Described,
    /// Sync: ends with ReadyForQuery.
    Sync,
}

/// A request that ends a transaction (`Expect::Query::ends`).
#[derive(Debug)]
struct Ends {
    /// The BEGIN that string opens the next transaction with (`begin_sql` then).
    next_begin: Option<String>,
    /// It also holds a ROLLBACK TO, which answers with a ROLLBACK tag: a string that
    /// then fails is not taken for one that ended.
    rolls_back_to: bool,
    /// It ends with `AND CHAIN`: the next transaction keeps the modes of the one that
    /// ended (its BEGIN and SET TRANSACTION), not its other settings.
    chain: bool,
}

/// How to take back a change to the session's statement names when Postgres skips the
/// message that made it (an earlier error in the batch): the name's previous mapping.
#[derive(Debug)]
struct Undo {
    name: Bytes,
    previous: Option<Arc<Prepared>>,
}

/// `SELECT set_config('name', $n, false)` bound with a value (the form applications
/// use where SET cannot take a parameter), or several such calls, transaction-local
/// ones among them: tracked as SETs of those values, so that they follow the session
/// (`inspected` is the statement's; `types` its Parse's raw parameter types).
fn bound_set_config(
    inspected: &settings::Inspected,
    query: &[u8],
    types: &[u8],
    rest: &[u8],
) -> Option<settings::Inspected> {
    if !inspected.untracked {
        return None;
    }
    let calls = settings::set_config_calls(std::str::from_utf8(query).ok()?)?;
    let params = route::bind_params(rest, &route::param_oids(types)).ok()?;
    let text = |a: &settings::ConfigValue| -> Option<String> {
        let v = match a {
            settings::ConfigValue::Text(v) => return Some(v.clone()),
            settings::ConfigValue::Param(i) => match params.get(*i)? {
                crate::plan::ParamValue::Text(v) => v,
                // The binary form of a string type is its text (unspecified or
                // `unknown`: Postgres takes it as text, set_config's argument type).
                crate::plan::ParamValue::Binary(v, 0 | 25 | 1043 | 19 | 705) => v,
                _ => return None,
            },
        };
        String::from_utf8(v.to_vec()).ok()
    };
    let mut all = Vec::with_capacity(calls.len());
    for call in &calls {
        all.push(call.tracked(&text(&call.name)?, &text(&call.value)?)?);
    }
    Some(settings::Inspected {
        tracked: settings::set_config_tracked(all),
        // Marked too: an Execute with a row limit answers PortalSuspended, not the
        // `SELECT 1` that records it, and the setting must not reach another client.
        // Recorded, it still follows the session to its other connections.
        untracked: true,
    })
}

/// Whether an ErrorResponse is Postgres refusing a prepared statement whose tables
/// changed under it ("cached plan must not change result type"): found by the routine
/// that raises it too, since the message is translated when the node's lc_messages is
/// not English.
fn changed_result_type(body: &[u8]) -> bool {
    protocol::error_sqlstate(body) == Some(sqlstate::FEATURE_NOT_SUPPORTED.code().as_bytes())
        && (protocol::error_field(body, b'R') == Some(b"RevalidateCachedQuery".as_slice())
            || protocol::error_field(body, b'M')
                .is_some_and(|m| m.starts_with(b"cached plan must not change result type")))
}

fn msg(forward: bool) -> Expect {
    Expect::Msg {
        forward,
        prepares: None,
        undo: None,
        describes: None,
        tracks: None,
    }
}

pub struct Session<S> {
    ctx: Arc<ServerCtx>,
    client: S,
    rbuf: BytesMut,
    /// Bytes for the client, written before every wait.
    out: BytesMut,
    /// Bytes for the backend, written at the end of each batch.
    bout: BytesMut,
    pool: Arc<Pool>,
    mode: PoolMode,
    lease: Option<Lease>,
    cancel: Arc<CancelSlot>,
    settings: Settings,
    /// Tracked statements run inside the open transaction (SET LOCAL included); the
    /// session-level ones are kept if it commits.
    txn_settings: Vec<SessionStmt>,
    /// How many of `txn_settings` each node of the open transaction has run (a node
    /// missing here has run none): the others are run on it before it is used again
    /// (`route::join`) and before a savepoint command reaches it.
    txn_applied: Vec<(Option<i32>, usize)>,
    /// The node answered a COMMIT or ROLLBACK in the request being answered
    /// (`Expect::Query::ends`).
    saw_end: bool,
    /// The open transaction ran session-level SETs (replayed on its other nodes):
    /// every connection it used is reset before its next user, however it ends (kept
    /// until the session is idle again, after `txn_settings` is cleared).
    txn_session_sets: bool,
    /// Extended protocol: the tracked statements bound to portals (by portal name),
    /// and the tracked statements of the current batch that completed.
    bound_tracked: Vec<(Bytes, SessionStmt)>,
    ext_tracked: Vec<SessionStmt>,
    /// Client statement name -> router statement.
    stmts: HashMap<Bytes, Arc<Prepared>>,
    /// Statements whose Parse was sent in the current batch (not yet confirmed).
    batch_prepared: HashSet<u64>,
    /// Extended messages waiting for Sync/Flush.
    batch: Vec<Frame>,
    batch_bytes: usize,
    expect: VecDeque<Expect>,
    /// Transaction status as the client last saw it.
    status: TxnStatus,
    /// Extended messages went to the backend without a Sync after them yet.
    needs_sync: bool,
    /// Extended messages went to the backend with neither Sync nor Flush after them:
    /// Postgres may hold their answers in its output buffer, so the router sends a
    /// Flush of its own before it waits for them (a simple Query pipelined after them
    /// must not wait forever).
    flush_due: bool,
    /// The router itself failed a message in this batch: skip until Sync.
    skip_until_sync: bool,
    copy_in: bool,
    /// The COPY in progress came from an extended-protocol Execute.
    copy_extended: bool,
    /// An extended COPY ended: the backend holds its answer until the client's Sync,
    /// so the exchange pauses for client messages.
    await_sync: bool,
    /// Whether the last command completed in the transaction was COMMIT.
    saw_commit: bool,
    timer: Option<(Instant, &'static str)>,
    max_msg: usize,
    /// Who the client is and where: admin functions run with the client's rights.
    user: User,
    database: String,
    /// Admin statements and portals of the extended protocol, kept by the router.
    admin_stmts: HashMap<Bytes, admin_ext::AdminStmt>,
    admin_portals: HashMap<Bytes, admin_ext::AdminPortal>,
    /// An admin request waiting for the replies queued before it.
    pending_admin: Option<Result<crate::admin::Request, crate::admin::AdminError>>,
    /// A routed simple query waiting for the replies queued before it.
    pending_route: Option<String>,
    /// The node the lease is (or the next one will be) on: `None` the coordinator,
    /// `Some(group)` a worker.
    node: Option<i32>,
    /// Leases on other nodes held for the open transaction (or the session).
    parked: Vec<(Option<i32>, Lease)>,
    /// The nodes that wrote in the open transaction (two or more: two-phase commit).
    writers: Vec<Option<i32>>,
    /// Savepoints open in the transaction, oldest first (`savepoint.rs`), each with
    /// the number of `txn_settings` before it (a ROLLBACK TO undoes the SETs since).
    savepoints: Vec<(String, usize)>,
    /// The open transaction's registration with the deadlock detector, once it holds
    /// backends on two nodes.
    dist: Option<crate::deadlock::Handle>,
    /// Part of the open transaction was rolled back (a deadlock victim's other nodes):
    /// it can no longer commit.
    doomed: bool,
    /// Why: cancelled to break a distributed deadlock (else part of its work failed
    /// on a node: a step of a multi-node statement, a setting, a savepoint command).
    doomed_by_deadlock: bool,
    /// The next routed simple query carries its node's BEGIN (a Query of its own, in
    /// the same write).
    join_begin: bool,
    /// The promoted simple query in flight (`route::send_promoted`).
    promoted_inflight: Option<Arc<Prepared>>,
    /// The promoted statement in flight was refused as stale before it ran, outside a
    /// transaction, and nothing of it reached the client: `route::send_promoted` runs
    /// the text instead.
    promoted_stale: bool,
    /// The statement that opened the transaction (replayed on nodes that join it).
    begin_sql: Option<String>,
    /// The routed statements of the extended batch being translated.
    routed: Option<route::RoutedBatch>,
    /// The unnamed statement's text and raw parameter types.
    unnamed: Option<(Bytes, Bytes)>,
    /// Worker pools this session used: (group, port, host, pool).
    node_pools: Vec<(i32, i32, String, Arc<Pool>)>,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// Finishes startup (a backend connection checks database and user and applies the
    /// client's startup parameters) and serves the client until it leaves.
    pub async fn run(
        ctx: Arc<ServerCtx>,
        client: S,
        rbuf: BytesMut,
        user: User,
        database: String,
        settings: Settings,
    ) {
        let pool = ctx.pool_for(&database, &user);
        let guard = ctx.cancels.register();
        let mode = user.pool_mode;
        let mut s = Session {
            user,
            database,
            pending_admin: None,
            pending_route: None,
            node: None,
            parked: Vec::new(),
            writers: Vec::new(),
            savepoints: Vec::new(),
            dist: None,
            doomed: false,
            doomed_by_deadlock: false,
            join_begin: false,
            promoted_inflight: None,
            promoted_stale: false,
            begin_sql: None,
            routed: None,
            unnamed: None,
            node_pools: Vec::new(),
            admin_stmts: HashMap::new(),
            admin_portals: HashMap::new(),
            max_msg: ctx.config.max_message_bytes,
            mode,
            ctx: ctx.clone(),
            client,
            rbuf,
            // Buffers grow on demand: an idle client costs little memory.
            out: BytesMut::new(),
            bout: BytesMut::new(),
            pool,
            lease: None,
            cancel: guard.slot.clone(),
            settings,
            txn_settings: Vec::new(),
            txn_applied: Vec::new(),
            saw_end: false,
            txn_session_sets: false,
            bound_tracked: Vec::new(),
            ext_tracked: Vec::new(),
            stmts: HashMap::new(),
            batch_prepared: HashSet::new(),
            batch: Vec::new(),
            batch_bytes: 0,
            expect: VecDeque::new(),
            status: TxnStatus::Idle,
            needs_sync: false,
            flush_due: false,
            skip_until_sync: false,
            copy_in: false,
            copy_extended: false,
            await_sync: false,
            saw_commit: false,
            timer: None,
        };
        ctx.metrics.client_connections.inc();
        let result = match Box::pin(s.greet(guard.pid, guard.secret)).await {
            Ok(()) => s.serve().await,
            Err(e) => Err(e),
        };
        if let Err(e) = &result {
            s.report_fatal(e).await;
        }
        s.finish();
        ctx.metrics.client_connections.dec();
        drop(guard);
    }

    /// AuthenticationOk was sent; now ParameterStatus, BackendKeyData, ReadyForQuery.
    async fn greet(&mut self, pid: i32, secret: i32) -> Result<(), RouterError> {
        self.ensure_lease().await?;
        let lease = self.lease.as_mut().expect("lease just acquired");
        let conn = lease.conn();
        if !self.settings.applied(conn.settings_fp) {
            conn.run_internal(&self.settings.apply_sql()).await?;
            conn.settings_fp = self.settings.fingerprint();
        }
        for (k, v) in &conn.reported {
            protocol::encode_parameter_status(&mut self.out, k, v);
        }
        protocol::encode_backend_key_data(&mut self.out, pid, secret);
        protocol::encode_ready_for_query(&mut self.out, TxnStatus::Idle);
        self.maybe_release();
        self.flush_client().await
    }

    async fn serve(&mut self) -> Result<(), RouterError> {
        loop {
            let mut must_pump = false;
            loop {
                // COPY data that follows a request belongs to the exchange (pump reads it).
                if must_pump
                    && matches!(
                        self.rbuf.first(),
                        Some(&(tag::COPY_DATA | tag::COPY_DONE | tag::COPY_FAIL))
                    )
                {
                    break;
                }
                if matches!(
                    self.rbuf.first(),
                    Some(&(tag::COPY_DATA | tag::COPY_DONE | tag::COPY_FAIL))
                ) && self.batch.iter().any(|f| f.tag == tag::EXECUTE)
                {
                    // Pipelined after an Execute that may start a COPY FROM STDIN (no
                    // Sync in between): the batch goes now, and the data is the COPY's
                    // if the backend asks for it (else dropped, as Postgres drops it).
                    self.send_batch(None).await?;
                    must_pump = true;
                    break;
                }
                let Some(frame) = self.next_client_frame()? else {
                    break;
                };
                if matches!(frame.tag, tag::QUERY | tag::FUNCTION_CALL) {
                    // Extended messages before it go first. If one of them failed with
                    // no Sync yet, Postgres ignores this message up to the Sync.
                    self.send_batch(None).await?;
                    if self.ignores_until_sync().await? {
                        must_pump = true;
                        continue;
                    }
                }
                match frame.tag {
                    tag::QUERY
                        if !self.copy_in
                            && let Some(req) = self.intercept(&frame) =>
                    {
                        self.pending_admin = Some(req);
                        must_pump = true;
                        break;
                    }
                    tag::QUERY
                        if !self.copy_in
                            && let Some(sql) = self.routed_query(&frame) =>
                    {
                        self.pending_route = Some(sql);
                        must_pump = true;
                        break;
                    }
                    tag::QUERY | tag::FUNCTION_CALL => {
                        self.queue_query(frame).await?;
                        must_pump = true;
                    }
                    tag::PARSE | tag::BIND | tag::DESCRIBE | tag::EXECUTE | tag::CLOSE => {
                        self.batch_bytes += frame.raw.len();
                        self.batch.push(frame);
                        if self.batch_bytes > BATCH_LIMIT {
                            self.send_batch(None).await?;
                        }
                    }
                    tag::SYNC | tag::FLUSH => {
                        self.send_batch(Some(frame)).await?;
                        must_pump = true;
                    }
                    tag::TERMINATE => return Ok(()),
                    // Outside COPY these are dropped, as Postgres does.
                    tag::COPY_DATA | tag::COPY_DONE | tag::COPY_FAIL => {}
                    other => return Err(ProtocolError::UnexpectedMessage(other).into()),
                }
            }
            if must_pump {
                self.write_backend().await?;
                self.pump().await?;
                self.after_request().await;
            }
            if let Some(req) = self.pending_admin.take() {
                self.run_admin(req).await?;
            }
            if let Some(sql) = self.pending_route.take() {
                self.run_routed(sql).await?;
            }
            if self.rbuf.is_empty() && self.rbuf.capacity() > SHRINK_ABOVE {
                self.rbuf = BytesMut::new();
            }
            let complete = matches!(peek_header(&self.rbuf, self.max_msg)?, Some((_, len)) if self.rbuf.len() >= len);
            if !complete {
                self.wait_for_client().await?;
            }
        }
    }

    /// Whether a simple Query (or FunctionCall) pipelined after extended messages with
    /// no Sync yet is ignored: if one of them failed, Postgres ignores everything up to
    /// the Sync (no answer at all). Their answers are collected first to know.
    async fn ignores_until_sync(&mut self) -> Result<bool, RouterError> {
        if self.needs_sync && !self.expect.is_empty() && self.lease.is_some() {
            self.write_backend().await?;
            self.pump().await?;
        }
        Ok(self.skip_until_sync)
    }

    fn next_client_frame(&mut self) -> Result<Option<Frame>, RouterError> {
        Ok(decode_frame(&mut self.rbuf, self.max_msg)?)
    }

    /// Queues a simple Query (or FunctionCall) for the backend.
    async fn queue_query(&mut self, frame: Frame) -> Result<(), RouterError> {
        let settings::Inspected { tracked, untracked } = if frame.tag == tag::QUERY {
            let body = frame.body();
            let sql = std::str::from_utf8(&body[..body.len().saturating_sub(1)])
                .map_err(|_| ProtocolError::InvalidUtf8)?;
            settings::inspect(sql)
        } else {
            // A FunctionCall: the function may be set_config.
            settings::Inspected {
                tracked: None,
                untracked: true,
            }
        };
        // DEALLOCATE of a statement the router renamed is answered here: on the backend
        // the statement has another name and may serve other clients.
        if let Some(SessionStmt::Deallocate { name }) = &tracked
            && self.status != TxnStatus::Failed
            && self.expect.is_empty()
            && self.stmts.remove(name.as_bytes()).is_some()
        {
            self.out.extend_from_slice(&command_complete(b"DEALLOCATE"));
            protocol::encode_ready_for_query(&mut self.out, self.status);
            return Ok(());
        }
        if untracked && frame.tag == tag::QUERY {
            let body = frame.body();
            let sql = std::str::from_utf8(&body[..body.len().saturating_sub(1)]).unwrap_or("");
            if self.refuses_session_authorization(sql) {
                // The workers would keep the login's identity, and its rights (row-level
                // security and grants of the new identity not applied there).
                return self
                    .refuse_in_session(
                        crate::plan::PlanError::NotSupported(
                            settings::SESSION_AUTHORIZATION_REFUSED.into(),
                        )
                        .into(),
                    )
                    .await;
            }
        }
        if let Err(e) = self.choose_node_simple(&frame).await {
            return match e {
                RouterError::Plan(_) => self.refuse_in_session(e).await,
                e => self.refuse_request(e),
            };
        }
        {
            // A transaction mode (`SET TRANSACTION ...`) runs on a worker that ran a
            // query in this transaction, if there is one: Postgres itself then accepts
            // it or refuses it (25001: another isolation level, DEFERRABLE or READ
            // WRITE after the first query), where the coordinator it would go to may
            // have run no query yet.
            if self.status == TxnStatus::InTransaction
                && tracked.as_ref().is_some_and(settings::is_transaction_mode)
                && let Some(g) = self.parked.iter_mut().find_map(|(n, l)| {
                    (n.is_some() && l.conn().status != TxnStatus::Idle).then_some(*n)
                })
                && let Err(e) = self.switch_to(g).await
            {
                return match e {
                    RouterError::Plan(_) => self.refuse_in_session(e).await,
                    e => self.refuse_request(e),
                };
            }
        }
        // `COMMIT; BEGIN` in one string, or `COMMIT AND CHAIN`: the transaction that
        // ends has its own settings, which the next one must not inherit (`on_ready`).
        // Only a string of several statements, or one that starts like an end, is
        // lexed (the OLTP path stays a byte scan). The status is the client's last one:
        // with requests still unanswered, a transaction may be open already.
        let ends = match frame.tag {
            tag::QUERY if self.status != TxnStatus::Idle || !self.expect.is_empty() => {
                let body = frame.body();
                let sql = std::str::from_utf8(&body[..body.len().saturating_sub(1)]).unwrap_or("");
                let lex = memchr::memchr(b';', sql.as_bytes()).is_some()
                    || matches!(
                        sql.trim_start().as_bytes().first(),
                        Some(b'c' | b'C' | b'r' | b'R' | b'e' | b'E' | b'a' | b'A')
                    );
                match lex.then(|| route::end_statements(sql)) {
                    Some((true, begin, rolls_back_to, chain)) => Some(Ends {
                        next_begin: begin.map(str::to_owned),
                        rolls_back_to,
                        chain,
                    }),
                    _ => None,
                }
            }
            _ => None,
        };
        if let Err(e) = self.ensure_lease().await {
            return self.refuse_request(e);
        }
        self.prepare_settings();
        if untracked {
            self.mark_untracked();
        }
        self.ctx.metrics.statements_simple.inc();
        self.start_timer("simple");
        let reserved = if frame.tag == tag::QUERY {
            let body = frame.body();
            std::str::from_utf8(&body[..body.len().saturating_sub(1)])
                .ok()
                .and_then(reserved_use)
                .filter(|u| !matches!(u, ReservedUse::Reference(n) if self.stmts.contains_key(n.as_bytes())))
        } else {
            None
        };
        match reserved {
            // Refused by the backend itself, so the transaction state is Postgres's own.
            Some(ReservedUse::Prepare(name)) => protocol::encode_simple_query(
                &mut self.bout,
                &raise_sql(
                    sqlstate::RESERVED_NAME.code(),
                    &format!(
                        "prepared statement name \"{name}\" is reserved: names beginning with sg_ belong to the router"
                    ),
                ),
            ),
            Some(ReservedUse::Reference(name)) => protocol::encode_simple_query(
                &mut self.bout,
                &raise_sql(
                    sqlstate::INVALID_SQL_STATEMENT_NAME.code(),
                    &format!("prepared statement \"{name}\" does not exist"),
                ),
            ),
            None => self.bout.extend_from_slice(&frame.raw),
        }
        self.expect.push_back(Expect::Query {
            tracked,
            ok: false,
            ends,
        });
        Ok(())
    }

    /// Translates the buffered extended messages (and `end`, a Sync or Flush) into what
    /// the backend gets.
    async fn send_batch(&mut self, end: Option<Frame>) -> Result<(), RouterError> {
        if self.batch.is_empty() && end.is_none() {
            return Ok(());
        }
        if self.try_admin_batch(end.as_ref()).await? {
            return Ok(());
        }
        self.forget_admin_names(end.as_ref());
        if self.answer_locally(end.as_ref()) {
            return Ok(());
        }
        let sync = end.as_ref().is_some_and(|f| f.tag == tag::SYNC);
        match self.choose_node_batch(sync).await {
            Ok(()) => {}
            Err(e) => {
                self.batch.clear();
                self.batch_bytes = 0;
                self.routed = None;
                return self.fail_batch(e, end).await;
            }
        }
        if let Some(m) = self.routed.as_mut().and_then(|r| r.multi.take()) {
            self.routed = None;
            self.batch.clear();
            self.batch_bytes = 0;
            return self.run_multi_batch(m).await;
        }
        if let Err(e) = self.ensure_lease().await {
            self.routed = None;
            // The client gets the error at its Sync; the batch is dropped.
            self.batch.clear();
            self.batch_bytes = 0;
            return match end {
                Some(f) if f.tag == tag::SYNC => {
                    self.skip_until_sync = false;
                    self.refuse_request(e)
                }
                _ => Err(e),
            };
        }
        if self.expect.is_empty() && !self.needs_sync {
            self.prepare_settings();
            self.start_timer("extended");
        }
        // The batch's Vec is handed back afterwards, so it keeps its allocation.
        let mut batch = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        if end.is_none() && !batch.is_empty() {
            self.flush_due = true;
        }
        let mut result = Ok(());
        for f in batch.drain(..).chain(end) {
            if let Err(e) = self.translate(f) {
                result = Err(e);
                break;
            }
        }
        batch.clear();
        self.batch = batch;
        self.routed = None;
        result
    }

    /// A client between transactions that only (re)declares statements Postgres has
    /// already accepted (Parse of a known text, Close of a statement) and then syncs
    /// needs no backend: the router answers, and prepares lazily at Bind. Without this,
    /// a client that prepares synchronously (pgbench -M prepared: one thread, many
    /// connections) would wait for a backend held by its own sibling connections.
    fn answer_locally(&mut self, end: Option<&Frame>) -> bool {
        let Some(end) = end else { return false };
        if self.lease.is_some()
            || !self.expect.is_empty()
            || self.needs_sync
            || self.skip_until_sync
            || self.status != TxnStatus::Idle
            || !(end.tag == tag::SYNC || end.tag == tag::FLUSH)
        {
            return false;
        }
        let mut plan = Vec::with_capacity(self.batch.len());
        let mut names: HashSet<&[u8]> = HashSet::new();
        for f in &self.batch {
            match f.tag {
                tag::PARSE => {
                    let Ok(p) = protocol::decode_parse(f.body()) else {
                        return false;
                    };
                    if p.name.is_empty() || self.stmts.contains_key(p.name) || !names.insert(p.name)
                    {
                        return false;
                    }
                    match self
                        .ctx
                        .prepared
                        .lookup(p.query, p.param_types, self.client_epoch())
                    {
                        Some(prep) if prep.validated.load(std::sync::atomic::Ordering::Relaxed) => {
                            plan.push((Bytes::copy_from_slice(p.name), Some(prep)))
                        }
                        _ => return false,
                    }
                }
                tag::CLOSE => match protocol::decode_target(f.body()) {
                    Ok((b'S', name)) if !name.is_empty() => {
                        names.remove(name);
                        plan.push((Bytes::copy_from_slice(name), None))
                    }
                    _ => return false,
                },
                _ => return false,
            }
        }
        for (name, prep) in plan {
            match prep {
                Some(p) => {
                    self.stmts.insert(name, p);
                    protocol::encode_parse_complete(&mut self.out);
                }
                None => {
                    self.stmts.remove(&name);
                    protocol::encode_close_complete(&mut self.out);
                }
            }
        }
        self.batch.clear();
        self.batch_bytes = 0;
        if end.tag == tag::SYNC {
            protocol::encode_ready_for_query(&mut self.out, self.status);
        }
        true
    }

    /// One extended message: renamed statements, injected Parses, router replies.
    fn translate(&mut self, f: Frame) -> Result<(), RouterError> {
        if self.skip_until_sync && f.tag != tag::SYNC {
            return Ok(());
        }
        if f.tag == tag::PARSE {
            let p = protocol::decode_parse(f.body())?;
            if p.name.is_empty() {
                self.unnamed = Some((
                    Bytes::copy_from_slice(p.query),
                    Bytes::copy_from_slice(p.param_types),
                ));
            }
        }
        if self.routed.is_some() && self.translate_routed(&f)? {
            return Ok(());
        }
        match f.tag {
            tag::PARSE => {
                let p = protocol::decode_parse(f.body())?;
                if self.refuse_extended_admin(p.query) {
                    self.needs_sync = true;
                } else if let Ok(sql) = std::str::from_utf8(p.query)
                    && self.refuses_session_authorization(sql.trim_end_matches('\0'))
                {
                    // At Parse only: a statement refused here is never bound (a Bind
                    // pays nothing for it).
                    self.raise_on_backend(
                        sqlstate::FEATURE_NOT_SUPPORTED.code(),
                        settings::SESSION_AUTHORIZATION_REFUSED,
                    );
                    self.needs_sync = true;
                } else if p.name.is_empty() {
                    self.bout.extend_from_slice(&f.raw);
                    self.expect.push_back(msg(true));
                } else if self.stmts.contains_key(p.name) {
                    let msg = format!(
                        "prepared statement \"{}\" already exists",
                        String::from_utf8_lossy(p.name)
                    );
                    self.raise_on_backend(sqlstate::DUPLICATE_PREPARED_STATEMENT.code(), &msg);
                } else {
                    let prep =
                        self.ctx
                            .prepared
                            .intern_in(p.query, p.param_types, self.client_epoch());
                    let name = Bytes::copy_from_slice(p.name);
                    self.stmts.insert(name.clone(), prep.clone());
                    let undo = Some(Undo {
                        name,
                        previous: None,
                    });
                    if self.status == TxnStatus::Failed {
                        // Postgres refuses a Parse in an aborted transaction (unless it
                        // is a transaction-control statement): let it decide, on the
                        // unnamed statement so nothing shared is touched.
                        protocol::encode_parse(&mut self.bout, b"", &prep.query, &prep.param_types);
                        self.expect.push_back(Expect::Msg {
                            forward: true,
                            prepares: None,
                            undo,
                            describes: None,
                            tracks: None,
                        });
                    } else if self.is_prepared(prep.id) {
                        self.expect.push_back(Expect::Synth {
                            tag: btag::PARSE_COMPLETE,
                            undo,
                        });
                    } else {
                        protocol::encode_parse(
                            &mut self.bout,
                            &prep.name,
                            &prep.query,
                            &prep.param_types,
                        );
                        self.batch_prepared.insert(prep.id);
                        self.expect.push_back(Expect::Msg {
                            forward: true,
                            prepares: Some(prep.clone()),
                            undo,
                            describes: None,
                            tracks: None,
                        });
                    }
                }
                self.needs_sync = true;
            }
            tag::BIND => {
                let b = protocol::decode_bind(f.body())?;
                match self.stmts.get(b.statement).cloned() {
                    Some(prep) if self.refuse_extended_admin(&prep.query) => {}
                    // A statement on distributed tables is bound in a routed batch only;
                    // never run it on the coordinator's empty table.
                    Some(prep) if self.is_routed_text(&prep.query) => self.raise_on_backend(
                        sqlstate::FEATURE_NOT_SUPPORTED.code(),
                        "a statement on distributed tables cannot run here (its batch was not routed)",
                    ),
                    None if b.statement.is_empty()
                        && self
                            .unnamed
                            .as_ref()
                            .is_some_and(|(q, _)| self.is_routed_text(q)) =>
                    {
                        self.raise_on_backend(
                            sqlstate::FEATURE_NOT_SUPPORTED.code(),
                            "a statement on distributed tables cannot run here (its batch was not routed)",
                        )
                    }
                    Some(prep) if !b.statement.is_empty() => {
                        self.ensure_prepared(&prep);
                        let i = prep.settings.get_or_init(|| inspect_text(&prep.query));
                        match bound_set_config(i, &prep.query, &prep.param_types, b.rest) {
                            Some(t) => self.bind_settings(b.portal, &t),
                            None => self.bind_settings(b.portal, i),
                        }
                        protocol::encode_bind(&mut self.bout, b.portal, &prep.name, b.rest);
                        self.expect.push_back(msg(true));
                    }
                    _ if b.statement.starts_with(ROUTER_STMT_PREFIX) => {
                        self.raise_unknown_statement(b.statement)
                    }
                    // Unnamed, or unknown: the backend answers (26000 for unknown).
                    _ => {
                        if b.statement.is_empty()
                            && let Some((q, types)) = &self.unnamed
                        {
                            let i = inspect_text(q);
                            let i = bound_set_config(&i, q, types, b.rest).unwrap_or(i);
                            self.bind_settings(b.portal, &i);
                        }
                        self.bout.extend_from_slice(&f.raw);
                        self.expect.push_back(msg(true));
                    }
                }
                self.needs_sync = true;
            }
            tag::DESCRIBE => {
                let (kind, name) = protocol::decode_target(f.body())?;
                match self.stmts.get(name).cloned() {
                    Some(prep) if kind == b'S' && !name.is_empty() => {
                        self.ensure_prepared(&prep);
                        protocol::encode_target(&mut self.bout, tag::DESCRIBE, b'S', &prep.name);
                        self.expect.push_back(Expect::Msg {
                            forward: true,
                            prepares: None,
                            undo: None,
                            describes: Some(prep),
                            tracks: None,
                        });
                    }
                    _ if kind == b'S' && name.starts_with(ROUTER_STMT_PREFIX) => {
                        self.raise_unknown_statement(name)
                    }
                    _ => {
                        self.bout.extend_from_slice(&f.raw);
                        self.expect.push_back(msg(true));
                    }
                }
                self.needs_sync = true;
            }
            tag::CLOSE => {
                let (kind, name) = protocol::decode_target(f.body())?;
                if kind == b'S' && !name.is_empty() {
                    // The backend's copy may serve other clients; it stays.
                    let previous = self.stmts.remove(name);
                    self.expect.push_back(Expect::Synth {
                        tag: btag::CLOSE_COMPLETE,
                        undo: Some(Undo {
                            name: Bytes::copy_from_slice(name),
                            previous,
                        }),
                    });
                } else {
                    self.bout.extend_from_slice(&f.raw);
                    self.expect.push_back(msg(true));
                    self.needs_sync = true;
                }
            }
            tag::EXECUTE => {
                self.ctx.metrics.statements_extended.inc();
                self.bout.extend_from_slice(&f.raw);
                // Execute: the portal's name, then a row limit.
                let body = f.body();
                let portal = body.iter().position(|&b| b == 0).map(|i| &body[..i]);
                let tracks = self
                    .bound_tracked
                    .iter()
                    .find(|(p, _)| Some(p.as_ref()) == portal)
                    .map(|(_, t)| t.clone());
                self.expect.push_back(Expect::Msg {
                    forward: true,
                    prepares: None,
                    undo: None,
                    describes: None,
                    tracks,
                });
                self.needs_sync = true;
            }
            tag::SYNC => {
                self.await_sync = false;
                self.bout.extend_from_slice(&f.raw);
                self.expect.push_back(Expect::Sync);
                self.needs_sync = false;
                self.flush_due = false;
                self.skip_until_sync = false;
            }
            tag::FLUSH => {
                self.await_sync = false;
                self.bout.extend_from_slice(&f.raw);
                self.flush_due = false;
            }
            other => return Err(ProtocolError::UnexpectedMessage(other).into()),
        }
        Ok(())
    }

    /// No backend could be had for a request: an ERROR and ReadyForQuery when the error
    /// allows the session to go on, else the error ends the session.
    fn refuse_request(&mut self, e: RouterError) -> Result<(), RouterError> {
        let recoverable = e.backend_frame().is_none()
            && e.user_facing()
                .is_some_and(|u| u.severity == crate::error::Severity::Error);
        if !recoverable {
            return Err(e);
        }
        self.client_error(&e);
        protocol::encode_ready_for_query(&mut self.out, self.status);
        Ok(())
    }

    fn is_prepared(&mut self, id: u64) -> bool {
        self.batch_prepared.contains(&id)
            || self
                .lease
                .as_mut()
                .is_some_and(|l| l.conn().uses_prepared(id))
    }

    /// Injects a Parse for `prep` when the borrowed backend does not have it yet.
    fn ensure_prepared(&mut self, prep: &Arc<Prepared>) {
        if !self.is_prepared(prep.id) {
            protocol::encode_parse(&mut self.bout, &prep.name, &prep.query, &prep.param_types);
            self.batch_prepared.insert(prep.id);
            self.expect.push_back(Expect::Msg {
                forward: false,
                prepares: Some(prep.clone()),
                undo: None,
                describes: None,
                tracks: None,
            });
        }
    }

    /// Makes the backend itself fail the batch with (sqlstate, message), so that its
    /// transaction state (aborted, skip until Sync) is exactly what Postgres would have.
    fn raise_on_backend(&mut self, sqlstate: &str, message: &str) {
        let sql = raise_sql(sqlstate, message);
        protocol::encode_parse(&mut self.bout, b"", sql.as_bytes(), &[0, 0]);
        protocol::encode_bind(&mut self.bout, b"", b"", &[0, 0, 0, 0, 0, 0]);
        protocol::encode_execute(&mut self.bout, b"", 0);
        for _ in 0..3 {
            self.expect.push_back(msg(false));
        }
        self.skip_until_sync = true;
    }

    /// Bind/Describe of a name in the router's own namespace that this session does not
    /// own: another session's statement, never reachable from here.
    fn raise_unknown_statement(&mut self, name: &[u8]) {
        let msg = format!(
            "prepared statement \"{}\" does not exist",
            String::from_utf8_lossy(name)
        );
        self.raise_on_backend(sqlstate::INVALID_SQL_STATEMENT_NAME.code(), &msg);
    }

    /// Before the first message of a request: put the backend into this session's
    /// settings if it is in another's.
    fn prepare_settings(&mut self) {
        if !self.expect.is_empty() || self.needs_sync {
            return;
        }
        let fp = self.settings.fingerprint();
        let conn = self.lease.as_mut().expect("lease held").conn();
        if !self.settings.applied(conn.settings_fp) {
            // The reset is a Query of its own (one implicit transaction): a replayed
            // SET that fails cannot undo it and leave another client's state.
            protocol::encode_simple_query(&mut self.bout, settings::RESET_SQL);
            self.expect.push_back(Expect::Internal);
            let replay = self.settings.replay_sql();
            if !replay.is_empty() {
                protocol::encode_simple_query(&mut self.bout, &replay);
                self.expect.push_back(Expect::Internal);
            }
            conn.settings_fp = fp;
        }
        // Between transactions only: a Close sent inside a failed one would still
        // work, but one behind a failed message of the same batch would be skipped.
        if conn.status == TxnStatus::Idle {
            let gone = conn.evict_prepared(self.ctx.config.max_prepared_statements);
            if !gone.is_empty() {
                // Closing a statement that is not there is no error.
                for id in &gone {
                    protocol::encode_target(
                        &mut self.bout,
                        tag::CLOSE,
                        b'S',
                        format!("{}{id}", prepared::NAME_PREFIX).as_bytes(),
                    );
                }
                protocol::encode_sync(&mut self.bout);
                self.expect.push_back(Expect::Internal);
                self.ctx
                    .metrics
                    .statements_evicted
                    .inc_by(gone.len() as u64);
            }
        }
    }

    /// The held connection may now have session state the router does not follow:
    /// this session goes on with it as it is, any other resets it before use.
    fn mark_untracked(&mut self) {
        let u = self.settings.untracked_fingerprint();
        if let Some(l) = self.lease.as_mut() {
            l.conn().settings_fp = u;
        }
    }

    /// The session state a statement of the extended protocol changes (its text
    /// `query`, bound to `portal`): an untracked change marks the connection now, a
    /// tracked one is noted for the portal's Execute.
    fn bind_settings(&mut self, portal: &[u8], i: &settings::Inspected) {
        if i.untracked {
            self.mark_untracked();
        }
        if !self.bound_tracked.is_empty() {
            self.bound_tracked.retain(|(p, _)| p.as_ref() != portal);
        }
        let t = match &i.tracked {
            // The extended protocol has one statement per Parse: a `Many` here is a
            // statement behind comments, or the SETs of `SET SESSION CHARACTERISTICS`
            // or of several set_config calls.
            Some(SessionStmt::Many(all)) if all.len() == 1 => all[0].clone(),
            Some(SessionStmt::Many(all))
                if all.iter().all(|t| {
                    matches!(
                        t,
                        SessionStmt::Set { .. }
                            | SessionStmt::SetConfig { .. }
                            | SessionStmt::SetLocal { .. }
                    )
                }) =>
            {
                SessionStmt::Many(all.clone())
            }
            Some(SessionStmt::Many(_)) => return self.mark_untracked(),
            Some(t) => t.clone(),
            None => return,
        };
        if matches!(
            t,
            SessionStmt::Many(_)
                | SessionStmt::Set { .. }
                | SessionStmt::SetConfig { .. }
                | SessionStmt::SetLocal { .. }
                | SessionStmt::Reset { .. }
                | SessionStmt::ResetAll
                | SessionStmt::DiscardAll
        ) {
            self.bound_tracked.push((Bytes::copy_from_slice(portal), t));
        }
    }

    /// Tracked statements of the batch that ran but will not be recorded (an error
    /// or a ROLLBACK after them, which may have undone them or not): the connection
    /// is this session's alone until reset.
    fn drop_ext_tracked(&mut self) {
        if !self.ext_tracked.is_empty() {
            self.ext_tracked.clear();
            self.mark_untracked();
        }
    }

    /// The epoch a client statement prepared now belongs to (`prepared::client_epoch`).
    fn client_epoch(&self) -> u64 {
        prepared::client_epoch(self.ctx.catalog.peek().version)
    }

    async fn ensure_lease(&mut self) -> Result<(), RouterError> {
        if self.lease.is_none() {
            let pool = match self.node {
                None => self.pool.clone(),
                Some(group) => {
                    let snap = self.ctx.catalog.peek();
                    let node = snap.node_by_group(group).ok_or_else(|| {
                        crate::plan::PlanError::NoPlacement(format!(
                            "the node of group {group} is no longer in the catalog"
                        ))
                    })?;
                    // The pool of (group, address), remembered by the session: the
                    // router-wide map is looked up once per node, not per statement.
                    match self.node_pools.iter().find(|(g, port, host, _)| {
                        *g == group && *port == node.port && *host == node.name
                    }) {
                        Some((.., p)) => p.clone(),
                        None => {
                            let p = self.ctx.node_pool(node, &self.database, &self.user);
                            self.node_pools.retain(|(g, ..)| *g != group);
                            self.node_pools
                                .push((group, node.port, node.name.clone(), p.clone()));
                            p
                        }
                    }
                }
            };
            let mut lease = pool.acquire().await?;
            let c = lease.conn();
            self.cancel.set(Some((c.addr, c.pid, c.secret)));
            self.lease = Some(lease);
        }
        Ok(())
    }

    async fn write_backend(&mut self) -> Result<(), RouterError> {
        if self.bout.is_empty() {
            return Ok(());
        }
        let lease = self.lease.as_mut().expect("lease held while writing");
        let r = lease.conn().write_all(&self.bout).await;
        self.bout.clear();
        if self.bout.capacity() > SHRINK_ABOVE {
            self.bout = BytesMut::new();
        }
        if let Err(e) = r {
            return self.backend_lost(e);
        }
        Ok(())
    }

    /// Forwards the backend's answers until every expected reply has come.
    async fn pump(&mut self) -> Result<(), RouterError> {
        loop {
            self.emit_synths();
            if self.expect.is_empty() {
                break;
            }
            // Answers already buffered, looked at in place.
            self.process_backend_buffer()?;
            if self.expect.is_empty() {
                break;
            }
            self.flush_client().await?;
            if self.await_sync {
                // Back to the client for its Sync; the exchange resumes after it.
                break;
            }
            if self.copy_in {
                Box::pin(self.copy_in_step()).await?;
            } else {
                if self.flush_due {
                    self.flush_due = false;
                    protocol::encode_flush(&mut self.bout);
                    self.write_backend().await?;
                }
                self.wait_backend().await?;
            }
        }
        self.flush_client().await
    }

    /// Handles every complete message in the backend's read buffer, in place, until
    /// nothing more is expected.
    fn process_backend_buffer(&mut self) -> Result<(), RouterError> {
        let Some(lease) = self.lease.as_mut() else {
            return Ok(());
        };
        let mut buf = std::mem::take(&mut lease.conn().rbuf);
        let mut used = 0;
        let result = loop {
            match peek_header(&buf[used..], crate::backend::MAX_BACKEND_MESSAGE) {
                Ok(Some((tag, len))) if buf.len() - used >= len => {
                    let raw = &buf[used..used + len];
                    used += len;
                    if let Err(e) = self.on_backend_frame(FrameRef { tag, raw }) {
                        break Err(e);
                    }
                    self.emit_synths();
                    if self.expect.is_empty() {
                        break Ok(());
                    }
                }
                Ok(Some((_, len))) => {
                    // Room for the whole message at once.
                    let have = buf.len() - used;
                    buf.reserve(len - have);
                    break Ok(());
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(BackendError::Protocol(e).into()),
            }
        };
        bytes::Buf::advance(&mut buf, used);
        // The lease may have been dropped while handling (desync): then nothing to give back.
        if let Some(lease) = self.lease.as_mut() {
            lease.conn().rbuf = buf;
        }
        match result {
            Err(RouterError::Backend(BackendError::Protocol(e))) => {
                self.backend_lost(BackendError::Protocol(e))
            }
            other => other,
        }
    }

    /// Waits for the backend's next bytes. Meanwhile the client's socket is watched
    /// (what it sends is kept for later): if the client goes away, its running query
    /// is cancelled instead of holding the backend connection until it finishes.
    async fn wait_backend(&mut self) -> Result<(), RouterError> {
        enum Woke {
            Backend(Result<usize, BackendError>),
            Client(std::io::Result<usize>),
        }
        let watch_client = self.rbuf.len() < CLIENT_READAHEAD;
        let conn = self
            .lease
            .as_mut()
            .expect("lease held while pumping")
            .conn();
        let woke = tokio::select! {
            r = conn.fill() => Woke::Backend(r),
            r = self.client.read_buf(&mut self.rbuf), if watch_client => Woke::Client(r),
        };
        match woke {
            Woke::Backend(Ok(_)) | Woke::Client(Ok(1..)) => Ok(()),
            Woke::Backend(Err(e)) => self.backend_lost(e),
            Woke::Client(r) => {
                if let Some((addr, pid, secret)) = self.cancel.get() {
                    tokio::spawn(async move {
                        let _ = crate::backend::cancel_backend(addr, pid, secret).await;
                    });
                }
                Err(RouterError::ClientIo(r.err().unwrap_or_else(|| {
                    std::io::ErrorKind::UnexpectedEof.into()
                })))
            }
        }
    }

    /// While the backend is in COPY FROM STDIN: pass the client's CopyData/CopyDone/
    /// CopyFail through, and keep forwarding what the backend says meanwhile.
    async fn copy_in_step(&mut self) -> Result<(), RouterError> {
        // Client messages already buffered first.
        loop {
            match peek_header(&self.rbuf, self.max_msg)? {
                Some((t, len)) if self.rbuf.len() >= len => match t {
                    tag::COPY_DATA | tag::COPY_DONE | tag::COPY_FAIL | tag::FLUSH | tag::SYNC => {
                        let f = self.rbuf.split_to(len);
                        self.bout.extend_from_slice(&f);
                        if t == tag::COPY_DONE || t == tag::COPY_FAIL {
                            self.copy_in = false;
                            self.await_sync = std::mem::take(&mut self.copy_extended);
                            // An Execute's COPY: its CommandComplete waits in the
                            // backend's output for a Sync or Flush.
                            self.flush_due |= self.needs_sync;
                            break;
                        }
                        if self.bout.len() >= 64 * 1024 {
                            self.write_backend().await?;
                        }
                    }
                    _ => {
                        // Anything else ends the COPY with a failure; the message is
                        // served after the backend has answered.
                        let mut f = BytesMut::new();
                        encode_copy_fail(&mut f, "unexpected message type during COPY from stdin");
                        self.bout.extend_from_slice(&f);
                        self.copy_in = false;
                        self.await_sync = std::mem::take(&mut self.copy_extended);
                        self.flush_due |= self.needs_sync;
                        break;
                    }
                },
                _ => break,
            }
        }
        self.write_backend().await?;
        if !self.copy_in {
            return Ok(());
        }
        enum Woke {
            Backend(Result<usize, BackendError>),
            Client(std::io::Result<usize>),
        }
        let conn = self.lease.as_mut().expect("lease held during COPY").conn();
        let woke = tokio::select! {
            r = conn.fill() => Woke::Backend(r),
            r = self.client.read_buf(&mut self.rbuf) => Woke::Client(r),
        };
        match woke {
            Woke::Backend(Err(e)) => self.backend_lost(e),
            Woke::Backend(Ok(_)) | Woke::Client(Ok(1..)) => Ok(()),
            Woke::Client(Ok(0)) => Err(RouterError::ClientIo(
                std::io::ErrorKind::UnexpectedEof.into(),
            )),
            Woke::Client(Err(e)) => Err(RouterError::ClientIo(e)),
        }
    }

    fn emit_synths(&mut self) {
        loop {
            match self.expect.front() {
                Some(Expect::Synth { tag, .. }) => {
                    let t = *tag;
                    self.expect.pop_front();
                    self.out.extend_from_slice(&[t, 0, 0, 0, 4]);
                }
                Some(Expect::SynthFrame(frame)) => {
                    self.out.extend_from_slice(frame);
                    self.expect.pop_front();
                }
                _ => break,
            }
        }
    }

    fn on_backend_frame(&mut self, f: FrameRef<'_>) -> Result<(), RouterError> {
        tracing::trace!(tag = %(f.tag as char), expect = ?self.expect.front(), "backend message");
        let internal = matches!(self.expect.front(), Some(Expect::Internal));
        match f.tag {
            btag::PARAMETER_STATUS => {
                let conn = self.lease.as_mut().expect("lease").conn();
                conn.note_parameter(f.body())?;
                if !internal {
                    self.out.extend_from_slice(f.raw);
                }
            }
            btag::NOTICE_RESPONSE | btag::NOTIFICATION_RESPONSE => {
                if !internal {
                    self.out.extend_from_slice(f.raw);
                }
            }
            btag::ERROR_RESPONSE => match self.expect.front() {
                Some(Expect::Internal) => {
                    // Its settings are not what they should be: nobody's.
                    if let Some(l) = self.lease.as_mut() {
                        l.conn().settings_fp = settings::DIRTY_FP;
                    }
                    tracing::warn!(
                        message = %String::from_utf8_lossy(protocol::error_field(f.body(), b'M').unwrap_or_default()),
                        "applying session settings on a backend failed"
                    );
                }
                Some(Expect::Query { .. }) => {
                    if let Some(Expect::Query { tracked, ok, .. }) = self.expect.front_mut()
                        && matches!(tracked, Some(SessionStmt::Many(_)))
                    {
                        *ok = false;
                    }
                    self.forward_error(f)
                }
                _ => {
                    let mut stale = false;
                    if let Some(p) = &self.promoted_inflight
                        && changed_result_type(f.body())
                    {
                        // Its tables changed under it (DDL the router did not see yet,
                        // or sent straight to the node): prepared again next time.
                        let id = p.id;
                        if let Some(l) = self.lease.as_mut() {
                            l.conn().prepared.remove(&id);
                            l.conn().described.remove(&id);
                        }
                        // Raised at Bind, before the statement ran: outside a
                        // transaction nothing is lost, and the text is sent instead
                        // (a simple query on plain Postgres never gets this error).
                        // Inside one, the node's transaction is aborted: the client
                        // gets the error, as with a prepared statement of its own.
                        stale = self.status == TxnStatus::Idle;
                    }
                    if !stale {
                        self.forward_error(f);
                    }
                    // The batch's implicit transaction (or the client's) is rolled
                    // back, and the SETs it ran with it (unless a COMMIT came first).
                    self.drop_ext_tracked();
                    // The backend now skips to Sync: so do the replies it will not send,
                    // a simple Query pipelined before that Sync's included (Postgres
                    // ignores it too).
                    while let Some(e) = self.expect.front() {
                        if matches!(e, Expect::Sync | Expect::Internal) {
                            break;
                        }
                        match self.expect.pop_front() {
                            Some(Expect::Msg { prepares, undo, .. }) => {
                                if let Some(p) = prepares {
                                    self.batch_prepared.remove(&p.id);
                                }
                                self.undo(undo);
                            }
                            Some(Expect::Synth { undo, .. }) => self.undo(undo),
                            _ => {}
                        }
                    }
                    if !matches!(self.expect.front(), Some(Expect::Sync)) {
                        // No Sync sent yet: what comes before it is ignored here too.
                        self.skip_until_sync = true;
                    }
                    if stale && let Some(e) = self.expect.front_mut() {
                        // Its ReadyForQuery is not the client's either.
                        *e = Expect::Internal;
                        self.promoted_stale = true;
                    }
                }
            },
            btag::READY_FOR_QUERY => {
                let status = TxnStatus::from_byte(*f.body().first().unwrap_or(&0))?;
                let conn = self.lease.as_mut().expect("lease").conn();
                conn.status = status;
                match self.expect.pop_front() {
                    Some(Expect::Internal) => {}
                    Some(Expect::Query { tracked, ok, ends }) => {
                        // SETs of extended messages before it with no Sync yet: the
                        // Query committed or rolled back their implicit transaction,
                        // which the router cannot tell apart here. Not followed; the
                        // connection is marked as carrying unknown settings.
                        self.drop_ext_tracked();
                        if self.needs_sync
                            && !self
                                .expect
                                .iter()
                                .any(|e| matches!(e, Expect::Msg { .. } | Expect::Synth { .. }))
                        {
                            // The Query ended the implicit transaction of the extended
                            // messages before it, and none were sent after it: the
                            // backend is back between requests, the session no longer
                            // tied to it (a later Sync just gets its ReadyForQuery).
                            self.needs_sync = false;
                            self.flush_due = false;
                        }
                        if let (Some(t), true) = (tracked, ok) {
                            self.on_tracked(t, status);
                        }
                        self.on_ready(status, f, ends);
                    }
                    Some(Expect::Sync) => {
                        for t in std::mem::take(&mut self.ext_tracked) {
                            self.on_tracked(t, status);
                        }
                        if status == TxnStatus::Idle {
                            // Portals end with the transaction.
                            self.bound_tracked.clear();
                        }
                        self.on_ready(status, f, None)
                    }
                    _ => return self.desync("ReadyForQuery out of turn"),
                }
            }
            btag::COPY_IN_RESPONSE => {
                self.copy_in = true;
                self.out.extend_from_slice(f.raw);
                if matches!(self.expect.front(), Some(Expect::Msg { .. }))
                    && let Some(i) = self.expect.iter().position(|e| matches!(e, Expect::Sync))
                {
                    // Extended-protocol COPY: the backend ignores a Sync that reaches it
                    // in copy-in mode (the one sent with the Execute); the client sends
                    // another after CopyDone, and that one is answered.
                    self.expect.remove(i);
                    self.needs_sync = true;
                    self.copy_extended = true;
                }
            }
            btag::COMMAND_COMPLETE => {
                let ctag = &f.body()[..f.body().len().saturating_sub(1)];
                // Whether the transaction committed: from the tags that end one (not
                // from the last tag: `COMMIT; SELECT 1` committed). Cleared between
                // requests (`after_request`).
                if ctag == b"COMMIT" {
                    self.saw_commit = true;
                } else if ctag == b"ROLLBACK" || ctag == b"PREPARE TRANSACTION" {
                    self.saw_commit = false;
                }
                self.saw_end |= ctag == b"COMMIT" || ctag == b"ROLLBACK";
                if ctag == b"DISCARD ALL" || ctag == b"DEALLOCATE ALL" {
                    let conn = self.lease.as_mut().expect("lease").conn();
                    conn.prepared.clear();
                    conn.described.clear();
                    conn.promoted.clear();
                    // Reset to defaults, unless the request goes on to change them in
                    // ways the router does not follow (it marked the connection).
                    if ctag == b"DISCARD ALL"
                        && conn.settings_fp != self.settings.untracked_fingerprint()
                    {
                        conn.settings_fp = 0;
                    }
                    self.stmts.clear();
                }
                match self.expect.front_mut() {
                    Some(Expect::Query { tracked, ok, .. }) => {
                        if tracked
                            .as_ref()
                            .is_some_and(|t| t.tag() == ctag || matches!(t, SessionStmt::Many(_)))
                        {
                            *ok = true;
                        }
                        self.out.extend_from_slice(f.raw);
                    }
                    Some(Expect::Internal) => {}
                    _ => self.end_msg(f)?,
                }
            }
            btag::PARSE_COMPLETE
            | btag::BIND_COMPLETE
            | btag::CLOSE_COMPLETE
            | btag::NO_DATA
            | btag::ROW_DESCRIPTION
            | btag::EMPTY_QUERY
            | btag::PORTAL_SUSPENDED => match self.expect.front() {
                Some(Expect::Query { .. }) => self.out.extend_from_slice(f.raw),
                Some(Expect::Internal) => {}
                Some(Expect::Described) => match f.tag {
                    btag::ROW_DESCRIPTION => {
                        self.expect.pop_front();
                        self.out.extend_from_slice(f.raw);
                    }
                    btag::NO_DATA => {
                        self.expect.pop_front();
                    }
                    _ => return self.desync("reply out of turn"),
                },
                Some(Expect::Msg {
                    describes: Some(p), ..
                }) if f.tag == btag::ROW_DESCRIPTION => {
                    let id = p.id;
                    if let Some(l) = self.lease.as_mut() {
                        let c = l.conn();
                        if c.prepared.contains_key(&id) || self.batch_prepared.contains(&id) {
                            c.described.insert(id, Bytes::copy_from_slice(f.raw));
                        }
                    }
                    self.end_msg(f)?
                }
                _ => self.end_msg(f)?,
            },
            _ => {
                // DataRow, ParameterDescription, copy messages, FunctionCallResponse...
                if self.expect.is_empty() {
                    return self.desync("message with nothing outstanding");
                }
                if f.tag == btag::PARAMETER_DESCRIPTION
                    && let Some(Expect::Msg {
                        describes: Some(p), ..
                    }) = self.expect.front()
                    && p.described.get().is_none()
                {
                    let _ = p.described.set(route::param_oids(f.body()));
                }
                if !internal {
                    self.out.extend_from_slice(f.raw);
                }
            }
        }
        Ok(())
    }

    /// The terminal reply of the extended message at the head.
    fn end_msg(&mut self, f: FrameRef<'_>) -> Result<(), RouterError> {
        match self.expect.pop_front() {
            Some(Expect::Msg {
                forward,
                prepares,
                tracks,
                ..
            }) => {
                if f.tag == btag::COMMAND_COMPLETE {
                    let ctag = &f.body()[..f.body().len().saturating_sub(1)];
                    match tracks {
                        // A `Many` of one statement: `SET SESSION CHARACTERISTICS`.
                        Some(t) if t.tag() == ctag || matches!(t, SessionStmt::Many(_)) => {
                            self.ext_tracked.push(t)
                        }
                        // ROLLBACK (or ROLLBACK TO) in the batch: what it undid is not
                        // known here.
                        _ if ctag == b"ROLLBACK" => self.drop_ext_tracked(),
                        _ => {}
                    }
                }
                if let Some(p) = prepares {
                    // Postgres accepted it: from now on a Parse of the same text can be
                    // answered without a backend (see `answer_locally`).
                    p.validated
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    self.batch_prepared.remove(&p.id);
                    self.lease
                        .as_mut()
                        .expect("lease")
                        .conn()
                        .add_prepared(p.id);
                }
                if forward {
                    self.out.extend_from_slice(f.raw);
                }
                Ok(())
            }
            _ => self.desync("reply out of turn"),
        }
    }

    /// Postgres skipped the message that changed a statement name: change it back.
    fn undo(&mut self, undo: Option<Undo>) {
        if let Some(Undo { name, previous }) = undo {
            match previous {
                Some(p) => {
                    self.stmts.insert(name, p);
                }
                None => {
                    self.stmts.remove(&name);
                }
            }
        }
    }

    fn forward_error(&mut self, f: FrameRef<'_>) {
        // A backend cancelled by the deadlock detector: the client hears why.
        if protocol::error_sqlstate(f.body()) == Some(sqlstate::QUERY_CANCELED.code().as_bytes())
            && let Some(v) = self.dist.as_ref().and_then(|d| d.victim())
        {
            let u = crate::error::UserFacing::deadlock(v.message, v.detail);
            self.ctx.metrics.error(u.code.code().as_bytes());
            u.encode(&mut self.out);
            return;
        }
        if let Some(code) = protocol::error_sqlstate(f.body()) {
            self.ctx.metrics.error(code);
        }
        // On a worker the statement is the shard SQL, not the client's text: a cursor
        // position (`LINE 1: ... ^`) would point at the wrong character.
        if self.node.is_some()
            && let Some(frame) = protocol::error_without_field(f.tag, f.body(), b'P')
        {
            self.out.extend_from_slice(&frame);
            return;
        }
        self.out.extend_from_slice(f.raw);
    }

    /// A tracked statement succeeded with the transaction now in `status`.
    fn on_tracked(&mut self, t: SessionStmt, status: TxnStatus) {
        if let SessionStmt::Many(all) = t {
            for t in all {
                self.on_tracked(t, status);
            }
            return;
        }
        if status == TxnStatus::Idle && self.status == TxnStatus::Idle {
            if t.is_local() {
                // Outside a transaction block SET LOCAL does nothing (Postgres warns).
                return;
            }
            let was = self.settings.untracked_fingerprint();
            self.settings.record(&t);
            if let Some(l) = self.lease.as_mut() {
                let c = l.conn();
                if c.settings_fp == settings::DIRTY_FP {
                    // Not what any session has (a replay failed, or startup parameters
                    // were reset): it stays so.
                } else if matches!(t, SessionStmt::ResetAll) && self.settings.has_startup() {
                    // Its startup parameters are gone from the connection.
                    c.settings_fp = settings::DIRTY_FP;
                } else if c.settings_fp == was {
                    // It keeps the changes the router does not follow.
                    c.settings_fp = self.settings.untracked_fingerprint();
                } else if c.settings_fp != 0 || !matches!(t, SessionStmt::DiscardAll) {
                    c.settings_fp = self.settings.fingerprint();
                }
            }
        } else {
            self.txn_session_sets |= !t.is_local();
            self.txn_settings.push(t);
            // The node it ran on has every one.
            let n = self.txn_settings.len();
            self.note_applied(self.node, n);
        }
    }

    /// Notes that `node` has run the first `n` of the transaction's settings.
    fn note_applied(&mut self, node: Option<i32>, n: usize) {
        match self.txn_applied.iter_mut().find(|(x, _)| *x == node) {
            Some((_, a)) => *a = n,
            None => self.txn_applied.push((node, n)),
        }
    }

    /// How many of the transaction's settings `node` has run.
    fn applied_on(&self, node: Option<i32>) -> usize {
        self.txn_applied
            .iter()
            .find(|(x, _)| *x == node)
            .map_or(0, |(_, a)| *a)
    }

    fn on_ready(&mut self, status: TxnStatus, f: FrameRef<'_>, ends: Option<Ends>) {
        // Ended, or ended and another begun in the same string (`ROLLBACK; BEGIN`).
        // (A string that failed after a ROLLBACK TO, whose tag is ROLLBACK too, leaves
        // the transaction failed: not taken for one that ended.)
        // The new transaction may have failed already (`ROLLBACK; BEGIN; <error>`).
        let saw_end = std::mem::take(&mut self.saw_end);
        let next = ends.filter(|e| {
            saw_end
                && self.status != TxnStatus::Idle
                && (status == TxnStatus::InTransaction
                    || (status == TxnStatus::Failed && !e.rolls_back_to))
        });
        let ended_inside = next.is_some();
        let chain = next.as_ref().is_some_and(|n| n.chain);
        if let Some(next) = next {
            // Nodes joining the new transaction begin it as the string did (a chained
            // one as the old one began), with none of the old one's savepoints. (Its
            // writers stay: at worst a node that wrote in the old one takes part in
            // the new one's two-phase commit.)
            if !next.chain {
                self.begin_sql = next.next_begin;
            }
            self.savepoints.clear();
            self.doomed = false;
            self.doomed_by_deadlock = false;
            // The other nodes ended before the string ran (`end_others_first`): the new
            // transaction holds one node, and registers with the deadlock detector
            // afresh (a new, younger id; no victim mark) when it holds two.
            self.dist = None;
        }
        if (status == TxnStatus::Idle && self.status != TxnStatus::Idle) || ended_inside {
            // The transaction ended: its session-level SETs stay only if it committed.
            let mut pending = std::mem::take(&mut self.txn_settings);
            // A chained transaction keeps the modes `SET TRANSACTION` gave the old one.
            let modes: Vec<SessionStmt> = if chain {
                pending
                    .iter()
                    .filter(|t| {
                        !matches!(t, SessionStmt::Many(_)) && settings::is_transaction_mode(t)
                    })
                    .cloned()
                    .collect()
            } else {
                Vec::new()
            };
            pending.retain(|t| !t.is_local());
            self.txn_applied.clear();
            if self.saw_commit {
                let was = self.settings.untracked_fingerprint();
                for t in &pending {
                    self.settings.record(t);
                }
                if !pending.is_empty()
                    && let Some(l) = self.lease.as_mut()
                {
                    // SETs run on the coordinator: only its connection has them all.
                    let c = l.conn();
                    let reset = self.settings.has_startup()
                        && pending.iter().any(|t| matches!(t, SessionStmt::ResetAll));
                    c.settings_fp =
                        if self.node.is_some() || reset || c.settings_fp == settings::DIRTY_FP {
                            settings::DIRTY_FP
                        } else if c.settings_fp == was {
                            self.settings.untracked_fingerprint()
                        } else {
                            self.settings.fingerprint()
                        };
                }
            } else if !pending.is_empty() {
                // Rolled back; but what the same request ran after its ROLLBACK (an
                // extended batch `ROLLBACK, SET`) is not known here.
                self.mark_untracked();
            }
            if ended_inside {
                // The new transaction has not committed.
                self.saw_commit = false;
            }
            if !modes.is_empty() {
                // The node that ran the string has them (Postgres chained them).
                let n = modes.len();
                self.txn_settings = modes;
                self.note_applied(self.node, n);
            }
        }
        self.status = status;
        self.out.extend_from_slice(f.raw);
        if let Some((start, proto)) = self.timer.take() {
            let h = if proto == "simple" {
                &self.ctx.metrics.request_seconds_simple
            } else {
                &self.ctx.metrics.request_seconds_extended
            };
            h.observe(start.elapsed().as_secs_f64());
        }
    }

    fn start_timer(&mut self, proto: &'static str) {
        if self.timer.is_none() {
            self.timer = Some((Instant::now(), proto));
        }
    }

    fn desync(&mut self, what: &'static str) -> Result<(), RouterError> {
        tracing::error!(
            what,
            "backend protocol desynchronised; dropping the connection"
        );
        self.drop_lease();
        Err(BackendError::Desync(what).into())
    }

    /// The backend connection broke mid-request. An idle client keeps its session and
    /// gets an error; a client inside a transaction loses it and is disconnected.
    fn backend_lost(&mut self, e: BackendError) -> Result<(), RouterError> {
        tracing::warn!(error = %e, "backend connection lost");
        self.drop_lease();
        let in_txn = self.status != TxnStatus::Idle || self.needs_sync;
        if in_txn {
            // The transaction's other nodes lose their part too.
            self.parked.clear();
        }
        self.expect.clear();
        self.batch.clear();
        self.batch_bytes = 0;
        self.copy_in = false;
        self.skip_until_sync = false;
        self.timer = None;
        if in_txn {
            return Err(e.into());
        }
        self.client_error(&e.into());
        protocol::encode_ready_for_query(&mut self.out, TxnStatus::Idle);
        Ok(())
    }

    fn drop_lease(&mut self) {
        if let Some(l) = self.lease.take() {
            self.cancel.set(None);
            drop(l);
        }
        self.ext_tracked.clear();
        self.bound_tracked.clear();
        self.batch_prepared.clear();
        self.needs_sync = false;
        self.flush_due = false;
    }

    fn client_error(&mut self, e: &RouterError) {
        if let Some(f) = e.backend_frame() {
            self.forward_error(f.as_ref());
        } else if let Some(u) = e.user_facing() {
            self.ctx.metrics.error(u.code.code().as_bytes());
            u.encode(&mut self.out);
        }
    }

    /// Gives the backend back when the transaction is over (transaction pooling).
    fn maybe_release(&mut self) {
        if self.mode == PoolMode::Transaction
            && self.status == TxnStatus::Idle
            && self.expect.is_empty()
            && !self.needs_sync
            && !self.copy_in
            && self.batch.is_empty()
            && let Some(lease) = self.lease.take()
        {
            self.cancel.set(None);
            self.batch_prepared.clear();
            lease.release();
        }
    }

    /// Waits for more client bytes; meanwhile forwards what a held backend says on its
    /// own (notifications, or its FATAL when it is terminated), and leaves at shutdown
    /// when the client is between transactions.
    async fn wait_for_client(&mut self) -> Result<(), RouterError> {
        self.flush_client().await?;
        loop {
            let can_stop =
                self.status == TxnStatus::Idle && self.expect.is_empty() && !self.needs_sync;
            enum Woke {
                Shutdown,
                Client(std::io::Result<usize>),
                Backend(Result<usize, BackendError>),
            }
            let lease = &mut self.lease;
            let backend = async {
                match lease {
                    Some(l) => l.conn().fill().await,
                    None => std::future::pending().await,
                }
            };
            let woke = tokio::select! {
                biased;
                _ = self.ctx.shutdown.cancelled(), if can_stop => Woke::Shutdown,
                r = self.client.read_buf(&mut self.rbuf) => Woke::Client(r),
                r = backend => Woke::Backend(r),
            };
            match woke {
                Woke::Shutdown => return Err(RouterError::Shutdown),
                Woke::Client(Ok(0)) => {
                    return Err(RouterError::ClientIo(
                        std::io::ErrorKind::UnexpectedEof.into(),
                    ));
                }
                Woke::Client(Ok(_)) => return Ok(()),
                Woke::Client(Err(e)) => return Err(RouterError::ClientIo(e)),
                Woke::Backend(Err(e)) => self.held_backend_gone(e)?,
                Woke::Backend(Ok(_)) => {
                    self.idle_backend_messages()?;
                    self.flush_client().await?;
                }
            }
        }
    }

    /// A backend held while the client is quiet went away. Between transactions the
    /// session just borrows another one next time; inside one, the transaction is lost
    /// and so is the session (as with Postgres itself).
    fn held_backend_gone(&mut self, e: BackendError) -> Result<(), RouterError> {
        let in_txn = self.status != TxnStatus::Idle || self.needs_sync;
        tracing::info!(error = %e, in_txn, "held backend connection went away");
        self.drop_lease();
        if in_txn { Err(e.into()) } else { Ok(()) }
    }

    fn idle_backend_messages(&mut self) -> Result<(), RouterError> {
        loop {
            let conn: &mut BackendConn = self.lease.as_mut().expect("lease").conn();
            let f = match decode_frame(&mut conn.rbuf, crate::backend::MAX_BACKEND_MESSAGE) {
                Ok(Some(f)) => f,
                Ok(None) => return Ok(()),
                Err(e) => return self.backend_lost(BackendError::Protocol(e)),
            };
            match f.tag {
                btag::PARAMETER_STATUS => {
                    conn.note_parameter(f.body())?;
                    self.out.extend_from_slice(&f.raw);
                }
                btag::NOTICE_RESPONSE | btag::NOTIFICATION_RESPONSE => {
                    self.out.extend_from_slice(&f.raw)
                }
                btag::ERROR_RESPONSE => {
                    // The backend is going away (terminated, or the server shuts down).
                    if self.status != TxnStatus::Idle || self.needs_sync {
                        self.forward_error(f.as_ref());
                    }
                    return self.held_backend_gone(BackendError::Closed);
                }
                _ => return self.desync("unsolicited message"),
            }
        }
    }

    async fn flush_client(&mut self) -> Result<(), RouterError> {
        if self.out.is_empty() {
            return Ok(());
        }
        let r = self.client.write_all(&self.out).await;
        self.out.clear();
        if self.out.capacity() > SHRINK_ABOVE {
            self.out = BytesMut::new();
        }
        r.map_err(RouterError::ClientIo)?;
        self.client.flush().await.map_err(RouterError::ClientIo)
    }

    /// Last words to a client whose session ends on an error.
    async fn report_fatal(&mut self, e: &RouterError) {
        match e {
            RouterError::ClientIo(_) => return,
            RouterError::Backend(BackendError::Closed) if self.out.is_empty() => {}
            _ => {}
        }
        tracing::debug!(error = %e, "session ends");
        if let Some(f) = e.backend_frame() {
            self.out.extend_from_slice(&f.raw);
        } else if let Some(mut u) = e.user_facing() {
            u.severity = crate::error::Severity::Fatal;
            self.ctx.metrics.error(u.code.code().as_bytes());
            u.encode(&mut self.out);
        }
        let _ = self.flush_client().await;
        let _ = self.client.shutdown().await;
    }

    /// The client is gone: a clean backend goes back to the pool, anything else closes.
    fn finish(&mut self) {
        self.cancel.set(None);
        for (_, lease) in std::mem::take(&mut self.parked) {
            if self.status == TxnStatus::Idle {
                lease.release();
            }
        }
        if let Some(lease) = self.lease.take() {
            let clean = self.status == TxnStatus::Idle
                && self.expect.is_empty()
                && !self.needs_sync
                && !self.copy_in;
            if clean {
                lease.release();
            } else {
                drop(lease);
            }
        }
    }
}

/// `settings::inspect` of a statement's text (not UTF-8: nothing to track).
fn inspect_text(query: &[u8]) -> settings::Inspected {
    std::str::from_utf8(query)
        .map(settings::inspect)
        .unwrap_or_default()
}

fn command_complete(ctag: &[u8]) -> Vec<u8> {
    let mut v = vec![btag::COMMAND_COMPLETE];
    v.extend_from_slice(&((4 + ctag.len() + 1) as i32).to_be_bytes());
    v.extend_from_slice(ctag);
    v.push(0);
    v
}

fn encode_copy_fail(buf: &mut BytesMut, msg: &str) {
    use bytes::BufMut;
    buf.put_u8(tag::COPY_FAIL);
    buf.put_i32((4 + msg.len() + 1) as i32);
    buf.put_slice(msg.as_bytes());
    buf.put_u8(0);
}

/// A statement that fails with (sqlstate, message) when the backend runs it.
fn raise_sql(sqlstate: &str, message: &str) -> String {
    format!(
        "DO $sg$BEGIN RAISE EXCEPTION USING ERRCODE = '{sqlstate}', MESSAGE = {}; END$sg$",
        quote_literal(message)
    )
}

/// A string literal for the router's own statements; `$` is dropped so that it cannot
/// end the dollar quote it sits in.
fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''").replace('$', ""))
}
