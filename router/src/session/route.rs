//! Statements on distributed and reference tables: planned (`crate::plan`), bound to a
//! node, and sent there over that node's pool; the node's answers reach the client
//! untouched (same message path as pass-through).
//!
//! Nodes of a session: the lease the session sends on belongs to one node at a time
//! (`node`: `None` is the coordinator, `Some(group)` a worker). Between transactions a
//! lease goes back to its pool after every request, whichever node it came from.
//! Inside a transaction the session keeps one lease per node it touched (`parked`
//! holds the others), so a tenant's transaction is one Postgres transaction on its
//! node; a node that joins a transaction late gets the client's BEGIN first. COMMIT /
//! ROLLBACK end every node's transaction: the nodes that only read first, the one
//! that wrote last, with the client's own statement, so the client hears that node's
//! answer. A transaction that wrote on two nodes or more commits with two-phase commit
//! (`commit.rs`). Once the transaction failed, the node that failed answers everything
//! until it ends, as Postgres would.

use super::{Expect, Session, Undo, msg};
use crate::backend::PoolMode;
use crate::error::{RouterError, sqlstate};
use crate::plan::{Bound, ParamValue, PlanError, normalize};
use crate::protocol::{self, Frame, TxnStatus, tag};
use bytes::{BufMut, Bytes, BytesMut};
use std::collections::VecDeque;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};

/// What ends a transaction (and so every node's part of it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum TxnEnd {
    Commit,
    Rollback,
}

/// Statement kinds that do not move the session to the coordinator: they go to the
/// node the session is on (transaction control), or tell how a transaction ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Control {
    Begin,
    End(TxnEnd),
    /// SAVEPOINT, RELEASE, ROLLBACK TO, PREPARE TRANSACTION...
    Other,
}

/// The transaction-control kind of a statement, from its first words.
pub(super) fn control(sql: &str) -> Option<Control> {
    let mut words = sql
        .split(|c: char| c.is_whitespace() || c == ';' || c == '(')
        .filter(|w| !w.is_empty());
    let first = words.next()?;
    // Most statements are not transaction control: decided on the first letter,
    // without allocating.
    if !matches!(
        first.as_bytes()[0].to_ascii_lowercase(),
        b'b' | b's' | b'c' | b'e' | b'a' | b'r' | b'p'
    ) {
        return None;
    }
    let is = |w: &str, k: &str| w.eq_ignore_ascii_case(k);
    let second = words.next().unwrap_or("");
    Some(if is(first, "begin") || is(first, "start") {
        Control::Begin
    } else if (is(first, "commit") || is(first, "end")) && !is(second, "prepared") {
        Control::End(TxnEnd::Commit)
    } else if is(first, "abort") {
        Control::End(TxnEnd::Rollback)
    } else if is(first, "rollback") {
        // `ROLLBACK [WORK | TRANSACTION] TO [SAVEPOINT] name`.
        let third = if is(second, "work") || is(second, "transaction") {
            words.next().unwrap_or("")
        } else {
            second
        };
        if is(third, "to") || is(second, "prepared") {
            Control::Other
        } else {
            Control::End(TxnEnd::Rollback)
        }
    } else if is(first, "savepoint")
        || is(first, "release")
        || (is(first, "prepare") && is(second, "transaction"))
    {
        Control::Other
    } else {
        return None;
    })
}

/// A batch of the extended protocol whose statements run on one worker: the bound
/// shard SQL of each Bind of a routed statement, in order.
pub(super) struct RoutedBatch {
    pub binds: VecDeque<Bound>,
    /// Client statement name -> the shard statement its last Bind used (Describe 'S').
    pub described: Vec<(Bytes, Arc<super::Prepared>)>,
    /// A batch of one statement that runs on several nodes (`binds` is empty).
    pub multi: Option<MultiBatch>,
    /// The portal the last Bind made, its shard statement, and whether its results
    /// are all text (then a Describe of it is answered from the statement's
    /// RowDescription when the node described it before).
    pub portal: Option<(Bytes, Arc<super::Prepared>, bool)>,
}

/// A batch of one statement (`[Parse] Bind [Describe] Execute Sync`) that runs on
/// several nodes: a write of a reference table with several placements, or a
/// multi-row INSERT whose rows span shards.
pub(super) struct MultiBatch {
    /// The client's Parse: statement name, text and raw parameter types.
    pub parse: Option<(Bytes, Bytes, Bytes)>,
    pub steps: Vec<super::multi::Step>,
    pub merge: super::multi::Merge,
}

/// Promoted simple queries (`send_promoted`) one backend connection keeps prepared at
/// most: preparing one more closes the least recently used, so the memory they take
/// on the node is bounded whatever the number of distinct statements (and those of
/// earlier catalog versions age out).
pub(crate) const MAX_PROMOTED_PER_CONN: usize = 256;

/// The shape of a batch of one statement, up to its Sync.
struct OneStatement {
    /// The Parse (name, text, raw types), if the batch has one.
    parse: Option<(Bytes, Bytes, Bytes)>,
    /// A Describe ('S' or 'P') and whether it comes before the Bind.
    describe: Option<(u8, bool)>,
}

impl RoutedBatch {
    fn multi(
        parse: Option<(Bytes, Bytes, Bytes)>,
        steps: Vec<super::multi::Step>,
        merge: super::multi::Merge,
    ) -> RoutedBatch {
        RoutedBatch {
            binds: VecDeque::new(),
            described: Vec::new(),
            portal: None,
            multi: Some(MultiBatch {
                parse,
                steps,
                merge,
            }),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// Whether this simple query is routed (it names a distributed or reference table).
    pub(super) fn routed_query(&self, frame: &Frame) -> Option<String> {
        if self.database != self.ctx.catalog.database {
            return None;
        }
        let body = frame.body();
        let sql = std::str::from_utf8(&body[..body.len().saturating_sub(1)]).ok()?;
        if names_no_table(sql) {
            return None;
        }
        let snap = self.ctx.catalog.peek();
        crate::admin::touches_distributed(&snap, sql).map(|_| sql.to_owned())
    }

    /// Whether `query` names a distributed or reference table.
    pub(super) fn is_routed_text(&self, query: &[u8]) -> bool {
        if self.database != self.ctx.catalog.database {
            return false;
        }
        let Ok(sql) = std::str::from_utf8(query) else {
            return false;
        };
        if names_no_table(sql) {
            return false;
        }
        let snap = self.ctx.catalog.peek();
        crate::admin::touches_distributed(&snap, sql).is_some()
    }

    /// Whether the client statement `p` names a distributed or reference table
    /// (worked out once per catalog snapshot).
    pub(super) fn is_routed_statement(&self, p: &super::Prepared) -> bool {
        if self.database != self.ctx.catalog.database {
            return false;
        }
        let snap = self.ctx.catalog.peek();
        p.routing.routed(snap.generation, || {
            std::str::from_utf8(&p.query).is_ok_and(|sql| {
                !names_no_table(sql) && crate::admin::touches_distributed(&snap, sql).is_some()
            })
        })
    }

    /// Plans and binds `sql` with the client's parameters.
    pub(super) fn bind_statement(
        &self,
        sql: &str,
        param_types: &[u32],
        params: &[ParamValue<'_>],
    ) -> Result<Bound, PlanError> {
        self.bind_normalized(sql, None, param_types, params)
    }

    /// As `bind_statement`, with the text's normalised form when it is known already.
    pub(super) fn bind_normalized(
        &self,
        sql: &str,
        norm: Option<&crate::plan::Normalized>,
        param_types: &[u32],
        params: &[ParamValue<'_>],
    ) -> Result<Bound, PlanError> {
        let snap = self.ctx.catalog.peek();
        if let Some(v) = crate::admin::names_view(&snap, sql) {
            return Err(PlanError::NotSupported(format!(
                "view {v} reads distributed or reference tables, and queries on such views are not routed yet (the coordinator holds only their empty shells); query the tables directly"
            )));
        }
        let plugins = self.ctx.plugins.current();
        let owned;
        let norm = match norm {
            Some(n) => n,
            None => {
                owned = normalize(sql);
                &owned
            }
        };
        let plan = self
            .ctx
            .planner
            .plan(sql, norm, param_types, &snap, &plugins)?;
        let param = |i: usize| -> Option<ParamValue<'_>> {
            params.get(i).map(|p| match p {
                ParamValue::Null => ParamValue::Null,
                ParamValue::Text(b) => ParamValue::Text(b),
                ParamValue::Binary(b, oid) => ParamValue::Binary(b, *oid),
            })
        };
        let prefer = self
            .node
            .or_else(|| self.parked.iter().find_map(|(n, _)| *n));
        match self
            .ctx
            .planner
            .bind(&plan, &norm.literals, &param, &snap, &plugins, prefer)
        {
            // A literal key that is not a value of the column's type (`tenant = 3.0`
            // on an int column): Postgres compares it as a number, so the statement
            // is planned as written, where the tiers do not take it as a key.
            Err(PlanError::InvalidValue(_) | PlanError::OutOfRange(_)) if plan.from_literals() => {
                let raw = self
                    .ctx
                    .planner
                    .plan_raw(sql, norm, param_types, &snap, &plugins)?;
                self.ctx
                    .planner
                    .bind(&raw, &norm.literals, &param, &snap, &plugins, prefer)
            }
            other => other,
        }
    }

    /// Notes a write on `target` inside a transaction: a transaction that wrote on two
    /// nodes commits with two-phase commit.
    fn check_write(&mut self, target: Option<i32>, writes: bool) -> Result<(), PlanError> {
        // Also while idle: a BEGIN in the same extended batch opens the transaction.
        if writes && !self.writers.contains(&target) {
            self.writers.push(target);
        }
        Ok(())
    }

    /// Runs a routed simple query (every earlier reply has been sent).
    pub(super) async fn run_routed(&mut self, sql: String) -> Result<(), RouterError> {
        if self.status == TxnStatus::Failed {
            // The failed node answers (25P02), as Postgres would.
            return self.send_simple_here(&sql).await;
        }
        let bound = match self.bind_statement(&sql, &[], &[]) {
            Ok(b) => b,
            Err(PlanError::NotPlannable(reason)) => {
                // A multi-row INSERT whose rows span shards: row by row.
                return match self.split_insert(&sql) {
                    Ok(Some(_)) if self.needs_sync => {
                        self.refuse_in_session(unsynced_elsewhere()).await
                    }
                    Ok(Some(steps)) => self
                        .run_steps(steps, super::multi::Merge::Insert, None)
                        .await
                        .map(|_| ()),
                    Ok(None) => {
                        self.refuse_in_session(RouterError::Plan(PlanError::NotPlannable(reason)))
                            .await
                    }
                    Err(e) => self.refuse_in_session(RouterError::Plan(e)).await,
                };
            }
            Err(e) => return self.refuse_in_session(RouterError::Plan(e)).await,
        };
        if self.needs_sync
            && (!bound.also.is_empty()
                || !bound.fanout.is_empty()
                || !bound.pulls.is_empty()
                || self.node != Some(bound.group))
        {
            return self.refuse_in_session(unsynced_elsewhere()).await;
        }
        if !bound.also.is_empty() {
            return self.run_on_every_placement(bound).await;
        }
        if !bound.fanout.is_empty() {
            self.ctx
                .metrics
                .fanout_shards
                .inc_by(bound.fanout.len() as u64);
            let steps = Self::fanout_steps(bound, None);
            return self
                .run_steps(steps, super::multi::Merge::Concat, None)
                .await
                .map(|_| ());
        }
        if !bound.pulls.is_empty() {
            return self.run_pulled(bound).await;
        }
        if let Err(e) = self.check_write(Some(bound.group), !bound.read_only) {
            return self.refuse_in_session(RouterError::Plan(e)).await;
        }
        if let Err(e) = self.switch_to_lazy(Some(bound.group)).await {
            return self.refuse_request(e);
        }
        match &bound.promoted {
            Some(p) => self.send_promoted(&bound.sql, p).await,
            None => self.send_simple_here(&bound.sql).await,
        }
    }

    /// Runs a routed simple query as a statement prepared on the node (its numeric
    /// literals bound as parameters: `plan::Promoted`), so that the node parses and
    /// plans it once per connection instead of once per value. The client sees the
    /// answers of a simple query. Falls back to the text (`sql`) where that is not
    /// possible: a transaction being joined (its BEGIN travels with the text), a
    /// statement that changes settings the router does not follow, earlier extended
    /// messages not synced yet, or promotion turned off (`promote_simple_queries =
    /// false`). A connection keeps [`MAX_PROMOTED_PER_CONN`] of them, least recently
    /// used out first (closed in the same round trip).
    async fn send_promoted(
        &mut self,
        sql: &str,
        p: &crate::plan::Promoted,
    ) -> Result<(), RouterError> {
        if !self.ctx.config.promote_simple_queries
            || self.join_begin
            // Earlier extended messages not synced yet: the backend may be skipping to
            // a Sync after an error; the text answers as Postgres would.
            || self.needs_sync
            || !self.expect.is_empty()
            || super::settings::inspect(sql).untracked
        {
            return self.send_simple_here(sql).await;
        }
        if let Err(e) = self.ensure_lease().await {
            return self.refuse_request(e);
        }
        let prep = self.ctx.prepared.intern_in(
            p.sql.as_bytes(),
            &p.param_types,
            super::prepared::promoted_epoch(p.version),
        );
        let evict = {
            let conn = self.lease.as_mut().expect("lease").conn();
            match conn.promoted.iter().rposition(|(id, _)| *id == prep.id) {
                Some(i) => {
                    // Most recently used last.
                    if let Some(e) = conn.promoted.remove(i) {
                        conn.promoted.push_back(e);
                    }
                    None
                }
                None => {
                    let evict = if conn.promoted.len() >= MAX_PROMOTED_PER_CONN {
                        conn.promoted.pop_front()
                    } else {
                        None
                    };
                    if let Some((id, _)) = &evict {
                        conn.prepared.remove(id);
                        conn.described.remove(id);
                    }
                    conn.promoted.push_back((prep.id, prep.name.clone()));
                    evict
                }
            }
        };
        self.prepare_settings();
        if let Some((_, name)) = evict {
            protocol::encode_target(&mut self.bout, tag::CLOSE, b'S', &name);
            self.expect.push_back(msg(false));
        }
        if !self.is_prepared(prep.id) {
            // A statement of this name may be there still, found stale (see
            // `promoted_inflight`): closing a statement that does not exist is no error.
            protocol::encode_target(&mut self.bout, tag::CLOSE, b'S', &prep.name);
            self.expect.push_back(msg(false));
        }
        // Counted before the answers go out (a client may read the metrics next).
        self.ctx.metrics.statements_simple.inc();
        self.ctx.metrics.statements_promoted.inc();
        self.start_timer("simple");
        self.ensure_prepared(&prep);
        protocol::encode_bind(&mut self.bout, b"", &prep.name, &p.bind);
        self.expect.push_back(msg(false));
        protocol::encode_target(&mut self.bout, tag::DESCRIBE, b'P', b"");
        self.expect.push_back(Expect::Described);
        protocol::encode_execute(&mut self.bout, b"", 0);
        self.expect.push_back(msg(true));
        protocol::encode_sync(&mut self.bout);
        self.expect.push_back(Expect::Sync);
        self.promoted_inflight = Some(prep);
        let sent = self.write_backend().await;
        let pumped = match sent {
            Ok(()) => self.pump().await,
            Err(e) => Err(e),
        };
        self.promoted_inflight = None;
        let stale = std::mem::take(&mut self.promoted_stale);
        pumped?;
        if stale {
            // Refused as stale before it ran (DDL this router has not seen): prepared
            // again next time; this time the text (counted once, above).
            return self.send_text_here(sql).await;
        }
        self.after_request().await;
        Ok(())
    }

    /// Sends a simple query on the session's current node and forwards the answers.
    pub(super) async fn send_simple_here(&mut self, sql: &str) -> Result<(), RouterError> {
        self.ctx.metrics.statements_simple.inc();
        self.send_text_here(sql).await
    }

    /// `send_simple_here` without counting the statement.
    async fn send_text_here(&mut self, sql: &str) -> Result<(), RouterError> {
        if let Err(e) = self.ensure_lease().await {
            return self.refuse_request(e);
        }
        self.prepare_settings();
        if super::settings::inspect(sql).untracked {
            // `SELECT set_config(...) FROM dist WHERE ...` on a shard's connection.
            self.mark_untracked();
        }
        self.start_timer("simple");
        if std::mem::take(&mut self.join_begin) {
            // The joining node's BEGIN, not the client's: a Query of its own, so that a
            // statement that does not parse cannot take it along (in one string,
            // `BEGIN;<statement>` fails whole, and the node would run what follows
            // outside any transaction).
            protocol::encode_simple_query(&mut self.bout, "BEGIN");
            self.expect.push_back(Expect::Internal);
        }
        protocol::encode_simple_query(&mut self.bout, sql);
        self.expect.push_back(Expect::Query {
            tracked: None,
            ok: false,
            ends: None,
        });
        self.write_backend().await?;
        self.pump().await?;
        self.after_request().await;
        Ok(())
    }

    /// After a request: a transaction that ended on the current node ends on the
    /// others too (a safety net: COMMIT / ROLLBACK are normally seen before they go
    /// out), then the backend goes back to its pool when it may.
    pub(super) async fn after_request(&mut self) {
        let open_elsewhere = self.mode == PoolMode::Transaction
            || self
                .parked
                .iter_mut()
                .any(|(_, l)| l.conn().status != TxnStatus::Idle);
        if self.status == TxnStatus::Idle
            && !self.parked.is_empty()
            && self.expect.is_empty()
            && open_elsewhere
        {
            let end = if self.saw_commit {
                TxnEnd::Commit
            } else {
                TxnEnd::Rollback
            };
            tracing::warn!(
                ?end,
                "a transaction ended on one node without the router seeing it end: ending it on the others"
            );
            self.end_parked(end).await;
        }
        if self.status == TxnStatus::Failed
            && self.expect.is_empty()
            && !self.parked.is_empty()
            && self.dist.as_ref().is_some_and(|d| d.victim().is_some())
        {
            // Cancelled to break a deadlock: its other nodes' locks go now, as one
            // Postgres releases them when the error is raised (the transaction that
            // waited for them goes on without waiting for this client's ROLLBACK).
            self.end_parked(TxnEnd::Rollback).await;
            self.doomed = true;
            self.doomed_by_deadlock = true;
            // Its pids are given back: they must not stand for it in the wait graph.
            self.dist = None;
        }
        if self.status == TxnStatus::Idle {
            self.writers.clear();
            self.savepoints.clear();
            self.dist = None;
            self.txn_session_sets = false;
            self.doomed = false;
            self.doomed_by_deadlock = false;
            if self.expect.is_empty() {
                self.saw_commit = false;
            }
        }
        self.maybe_release();
    }

    /// The session's lease moves to `target`'s node. Replies still expected on the
    /// current lease are collected first. In a transaction (or with session pooling)
    /// the current lease is parked; a node joining a transaction gets its BEGIN.
    pub(super) async fn switch_to(&mut self, target: Option<i32>) -> Result<(), RouterError> {
        self.switch(target, false).await
    }

    /// `switch_to` for a routed simple query sent next by `send_simple_here`: a plain
    /// BEGIN of a node joining the transaction goes out in the same query string.
    pub(super) async fn switch_to_lazy(&mut self, target: Option<i32>) -> Result<(), RouterError> {
        self.switch(target, true).await
    }

    async fn switch(&mut self, target: Option<i32>, lazy: bool) -> Result<(), RouterError> {
        self.join_begin = false;
        if self.needs_sync && self.node != target {
            return Err(unsynced_elsewhere());
        }
        if !self.expect.is_empty() {
            // Replies still due on the current lease (and its status) come first.
            self.write_backend().await?;
            self.pump().await?;
            self.after_request().await;
        }
        if self.node == target {
            // Same node: it may still have to join the transaction (no lease held, or
            // an idle one: an implicit transaction of the router's, a lease given back).
            return self.join(lazy).await;
        }
        if let Some(lease) = self.lease.take() {
            self.cancel.set(None);
            self.batch_prepared.clear();
            if self.mode == PoolMode::Transaction && self.status == TxnStatus::Idle {
                lease.release();
            } else {
                self.parked.push((self.node, lease));
            }
        }
        self.node = target;
        if let Some(i) = self.parked.iter().position(|(n, _)| *n == target) {
            let (_, mut lease) = self.parked.swap_remove(i);
            let c = lease.conn();
            self.cancel.set(Some((c.addr, c.pid, c.secret)));
            self.lease = Some(lease);
        }
        self.join(lazy).await
    }

    /// A node joining an open transaction (new, or held idle with session pooling)
    /// gets its BEGIN first, then the transaction's settings (SET LOCAL and SETs run in
    /// it so far) and savepoints, in the order they were made, so that a ROLLBACK TO
    /// undoes the same settings everywhere. `lazy`: a plain BEGIN (nothing else to
    /// replay) goes out in the same write as the simple query the caller sends next (a
    /// Query of its own, before it), with no round trip of its own. A node already in
    /// the transaction first runs the settings made since it last ran (on another
    /// node: a SET runs on the coordinator).
    async fn join(&mut self, lazy: bool) -> Result<(), RouterError> {
        if self.status == TxnStatus::Idle {
            return Ok(());
        }
        let joins = self
            .lease
            .as_mut()
            .is_none_or(|l| l.conn().status == TxnStatus::Idle);
        if !joins {
            return self.catch_up_current().await;
        }
        self.ensure_lease().await?;
        let fp = self.settings.fingerprint();
        let apply = self.settings.apply_sql();
        let begin = self.begin_sql.clone().unwrap_or_else(|| "BEGIN".into());
        let conn = self.lease.as_mut().expect("lease just acquired").conn();
        if !self.settings.applied(conn.settings_fp) {
            conn.run_internal(&apply).await?;
            conn.settings_fp = fp;
        }
        if lazy && plain_begin(&begin) && self.savepoints.is_empty() && self.txn_settings.is_empty()
        {
            self.join_begin = true;
        } else {
            if let Err(e) = conn.run_internal(&begin).await {
                // The node refused the client's own BEGIN: plain BEGIN then.
                tracing::warn!(error = %e, "BEGIN on a node joining the transaction failed; using plain BEGIN");
                let _ = conn.run_internal("ROLLBACK").await;
                conn.run_internal("BEGIN").await?;
            }
            // The transaction's settings and savepoints, in the order they were made.
            let mut replay = String::new();
            let mut next = 0;
            for (name, upto) in &self.savepoints {
                self.replay_settings(next, *upto, &mut replay);
                next = *upto;
                push_statement(
                    &mut replay,
                    Some(super::savepoint::SavepointOp::Set(name.clone()).sql()),
                );
            }
            self.replay_settings(next, self.txn_settings.len(), &mut replay);
            // (A connection that ran session-level SETs is reset before its next user:
            // `txn_session_sets`.)
            if !replay.is_empty() {
                let conn = self.lease.as_mut().expect("lease just acquired").conn();
                if let Err(e) = conn.run_internal(&replay).await {
                    return Err(self.settings_failed(e));
                }
            }
        }
        let n = self.txn_settings.len();
        self.note_applied(self.node, n);
        self.note_distributed();
        Ok(())
    }

    /// The current node, in the open transaction, runs the transaction's settings it
    /// has not run yet.
    async fn catch_up_current(&mut self) -> Result<(), RouterError> {
        let from = self.applied_on(self.node);
        if from >= self.txn_settings.len() || self.status == TxnStatus::Failed {
            return Ok(());
        }
        let mut replay = String::new();
        self.replay_settings(from, self.txn_settings.len(), &mut replay);
        if !replay.is_empty() {
            let conn = self.lease.as_mut().expect("the current lease").conn();
            if let Err(e) = conn.run_internal(&replay).await {
                return Err(self.settings_failed(e));
            }
        }
        let n = self.txn_settings.len();
        self.note_applied(self.node, n);
        Ok(())
    }

    /// Appends the SQL that replays `txn_settings[from..to]` on another node of the
    /// transaction.
    pub(super) fn replay_settings(&self, from: usize, to: usize, sql: &mut String) {
        for t in self.txn_settings.get(from..to).unwrap_or_default() {
            push_statement(sql, self.replay_of(t));
        }
    }

    /// One tracked statement as replayed on another node: RESET ALL brings the
    /// session's startup parameters back, as Postgres's does.
    fn replay_of(&self, t: &super::settings::SessionStmt) -> Option<String> {
        use super::settings::SessionStmt;
        match t {
            SessionStmt::ResetAll => {
                let startup = self.settings.startup_sql();
                Some(if startup.is_empty() {
                    "RESET ALL".into()
                } else {
                    format!("RESET ALL; {startup}")
                })
            }
            SessionStmt::Many(all) => {
                let mut sql = String::new();
                for t in all {
                    push_statement(&mut sql, self.replay_of(t));
                }
                (!sql.is_empty()).then_some(sql)
            }
            t => t.replay_sql(),
        }
    }

    /// A node refused the transaction's settings: its part of the transaction is
    /// aborted, so the transaction can only roll back.
    pub(super) fn settings_failed(&mut self, e: crate::backend::BackendError) -> RouterError {
        self.doomed = true;
        PlanError::NotSupported(format!(
            "the settings made earlier in this transaction (SET LOCAL, SET) could not be applied on {} ({e}); the transaction can only be rolled back",
            node_label(self.node)
        ))
        .into()
    }

    /// A transaction holding backends on two nodes or more is made known to the
    /// deadlock detector (with every backend it holds).
    fn note_distributed(&mut self) {
        let mut open: Vec<(Option<i32>, i32)> = self
            .parked
            .iter_mut()
            .filter_map(|(n, l)| {
                let c = l.conn();
                (c.status != TxnStatus::Idle).then_some((*n, c.pid))
            })
            .collect();
        if let Some(l) = self.lease.as_mut() {
            open.push((self.node, l.conn().pid));
        }
        if open.len() < 2 {
            return;
        }
        let registry = self.ctx.dist_txns.clone();
        let h = self.dist.get_or_insert_with(|| registry.register());
        for (n, pid) in open {
            h.add_backend(n, pid);
        }
    }

    /// Before the client's COMMIT / ROLLBACK goes out: the node that wrote becomes the
    /// current one (it gets the client's statement), the others end now.
    pub(super) async fn end_others_first(&mut self, end: TxnEnd) -> Result<(), RouterError> {
        if !self.expect.is_empty() {
            // Pipelined statements before the COMMIT may still fail the transaction:
            // their answers decide how it ends.
            self.write_backend().await?;
            self.pump().await?;
            self.after_request().await;
        }
        if self.doomed && end == TxnEnd::Commit && self.status != TxnStatus::Failed {
            return self.commit_doomed().await;
        }
        if self.parked.is_empty() {
            return Ok(());
        }
        let end = if self.status == TxnStatus::Failed {
            TxnEnd::Rollback
        } else {
            end
        };
        if end == TxnEnd::Commit && self.doomed {
            return self.commit_doomed().await;
        }
        if end == TxnEnd::Commit && self.writers.len() > 1 {
            return self.commit_two_phase(true).await;
        }
        if end == TxnEnd::Commit
            && let Some(&w) = self.writers.first()
            && w != self.node
        {
            self.switch_to(w).await?;
        }
        self.end_parked(end).await;
        Ok(())
    }

    /// Ends the parked leases' transactions and gives them back (or closes them when
    /// that fails).
    pub(super) async fn end_parked(&mut self, end: TxnEnd) {
        let sql = match end {
            TxnEnd::Commit => "COMMIT",
            TxnEnd::Rollback => "ROLLBACK",
        };
        let keep = self.mode == PoolMode::Session;
        let dirty = self.txn_session_sets || self.txn_settings.iter().any(|t| !t.is_local());
        for (node, mut lease) in std::mem::take(&mut self.parked) {
            if dirty {
                // The transaction ran SETs (on the coordinator): whichever connection
                // has them, the next user re-applies its own settings.
                lease.conn().settings_fp = super::settings::DIRTY_FP;
            }
            let result = if lease.conn().status == TxnStatus::Idle {
                Ok(())
            } else {
                lease.conn().run_internal(sql).await
            };
            match result {
                Ok(()) if keep => self.parked.push((node, lease)),
                Ok(()) => lease.release(),
                Err(e) => {
                    tracing::warn!(error = %e, node = %node_label(node), "ending a node's part of a transaction failed");
                    drop(lease);
                }
            }
        }
    }

    /// Plans the extended batch: the worker its routed statements run on, if any.
    /// `Ok(None)`: nothing routed (the coordinator, or the current node for
    /// transaction control).
    pub(super) fn plan_batch(&self, sync: bool) -> Result<Option<RoutedBatch>, PlanError> {
        if self.database != self.ctx.catalog.database {
            return Ok(None);
        }
        let mut binds = VecDeque::new();
        let mut group: Option<i32> = None;
        let mut coordinator = false;
        let mut unnamed: Option<(Bytes, Vec<u32>)> = self
            .unnamed
            .as_ref()
            .map(|(q, t)| (q.clone(), param_oids(t)));
        // Statements parsed earlier in this batch (not in `stmts` yet).
        let mut named: Vec<(Bytes, (Bytes, Vec<u32>))> = Vec::new();
        for f in &self.batch {
            match f.tag {
                tag::PARSE => {
                    if let Ok(p) = protocol::decode_parse(f.body()) {
                        let parsed = (Bytes::copy_from_slice(p.query), param_oids(p.param_types));
                        if p.name.is_empty() {
                            unnamed = Some(parsed);
                        } else if !self.stmts.contains_key(p.name) {
                            named.push((Bytes::copy_from_slice(p.name), parsed));
                        }
                    }
                }
                tag::BIND => {
                    let Ok(b) = protocol::decode_bind(f.body()) else {
                        continue;
                    };
                    let mut client_stmt = None;
                    let (query, types) = if b.statement.is_empty() {
                        match &unnamed {
                            Some((q, t)) => (q.clone(), t.clone()),
                            None => continue,
                        }
                    } else if let Some(p) = self.stmts.get(b.statement) {
                        client_stmt = Some(p.clone());
                        // Unspecified types: as a backend described them.
                        let mut t = param_oids(&p.param_types);
                        if let Some(d) = p.described.get() {
                            t.resize(t.len().max(d.len()), 0);
                            for (x, y) in t.iter_mut().zip(d) {
                                if *x == 0 {
                                    *x = *y;
                                }
                            }
                        }
                        (p.query.clone(), t)
                    } else if let Some((_, (q, t))) =
                        named.iter().rev().find(|(n, _)| n == b.statement)
                    {
                        (q.clone(), t.clone())
                    } else {
                        continue;
                    };
                    let sql = std::str::from_utf8(&query).unwrap_or("");
                    let routed = match &client_stmt {
                        Some(p) => self.is_routed_statement(p),
                        None => self.is_routed_text(&query),
                    };
                    if !routed {
                        if control(sql).is_none() {
                            coordinator = true;
                        }
                        continue;
                    }
                    let params = bind_params(b.rest, &types)
                        .map_err(|_| PlanError::InvalidValue("malformed Bind message".into()))?;
                    let norm = client_stmt.as_ref().map(|p| p.routing.normalized(sql));
                    let bound = match self.bind_normalized(sql, norm, &types, &params) {
                        Ok(bound) => bound,
                        Err(PlanError::NotPlannable(reason)) => {
                            // A multi-row INSERT whose rows span shards: row by row, as
                            // one statement of its own batch.
                            if let Some(one) = self.one_statement_batch(sync)
                                && one.describe.is_none_or(|(k, _)| k == b'P')
                                && let Some(steps) = self.split_insert_ext(
                                    sql,
                                    &super::multi::encode_types(&types),
                                    b.rest,
                                    one.describe,
                                )?
                            {
                                return Ok(Some(RoutedBatch::multi(
                                    one.parse,
                                    steps,
                                    super::multi::Merge::Insert,
                                )));
                            }
                            return Err(PlanError::NotPlannable(reason));
                        }
                        Err(e) => return Err(e),
                    };
                    if !bound.also.is_empty() {
                        // A write of a reference table: on every placement.
                        let Some(one) = self.one_statement_batch(sync) else {
                            return Err(PlanError::NotSupported(
                                "a write of a reference table with several placements must reach every placement: send it in a batch of its own ([Parse] Bind [Describe] Execute Sync) or as a simple query".into(),
                            ));
                        };
                        let types = super::multi::encode_types(&types);
                        let rest = Bytes::copy_from_slice(b.rest);
                        let steps = std::iter::once(bound.group)
                            .chain(bound.also.iter().copied())
                            .map(|group| super::multi::Step {
                                group,
                                sql: bound.sql.clone(),
                                ext: Some(super::multi::ExtStep {
                                    types: types.clone(),
                                    rest: rest.clone(),
                                    describe: one.describe,
                                }),
                                pulls: Vec::new(),
                                writes: true,
                            })
                            .collect();
                        return Ok(Some(RoutedBatch::multi(
                            one.parse,
                            steps,
                            super::multi::Merge::Last,
                        )));
                    }
                    if !bound.fanout.is_empty() {
                        // A read of every shard: one step per shard.
                        let Some(one) = self.one_statement_batch(sync) else {
                            return Err(PlanError::NotSupported(
                                "this statement reads every shard of its table: send it in a batch of its own ([Parse] Bind [Describe] Execute Sync, all rows) or as a simple query".into(),
                            ));
                        };
                        self.ctx
                            .metrics
                            .fanout_shards
                            .inc_by(bound.fanout.len() as u64);
                        let ext = super::multi::ExtStep {
                            types: super::multi::encode_types(&types),
                            rest: Bytes::copy_from_slice(b.rest),
                            describe: one.describe,
                        };
                        return Ok(Some(RoutedBatch::multi(
                            one.parse,
                            Self::fanout_steps(bound, Some(ext)),
                            super::multi::Merge::Concat,
                        )));
                    }
                    if !bound.pulls.is_empty() {
                        // A read of copies of other nodes' shards: copied first, then
                        // run, as one statement of its own batch.
                        let Some(one) = self.one_statement_batch(sync) else {
                            return Err(PlanError::NotSupported(
                                "this statement joins tables that are not colocated and whose shards are on different nodes: send it in a batch of its own ([Parse] Bind [Describe] Execute Sync) or as a simple query".into(),
                            ));
                        };
                        let step = super::multi::Step {
                            group: bound.group,
                            sql: bound.sql,
                            ext: Some(super::multi::ExtStep {
                                types: super::multi::encode_types(&types),
                                rest: Bytes::copy_from_slice(b.rest),
                                describe: one.describe,
                            }),
                            pulls: bound.pulls,
                            writes: false,
                        };
                        return Ok(Some(RoutedBatch::multi(
                            one.parse,
                            vec![step],
                            super::multi::Merge::Last,
                        )));
                    }
                    match group {
                        Some(g) if g != bound.group => {
                            return Err(PlanError::NotSupported(
                                "an extended-protocol batch (up to Sync) runs statements on one node only: these statements are on different nodes; send a Sync between them".into(),
                            ));
                        }
                        _ => group = Some(bound.group),
                    }
                    binds.push_back(bound);
                }
                _ => {}
            }
        }
        if binds.is_empty() {
            return Ok(None);
        }
        if coordinator {
            return Err(PlanError::NotSupported(
                "an extended-protocol batch (up to Sync) runs statements on one node only: it mixes statements on distributed tables with other statements; send a Sync between them".into(),
            ));
        }
        Ok(Some(RoutedBatch {
            binds,
            described: Vec::new(),
            multi: None,
            portal: None,
        }))
    }

    /// The batch's shape when it runs exactly one statement and ends with `sync`:
    /// `[Parse] [Describe S] Bind [Describe] Execute` (all rows), with nothing still
    /// pending on the backend.
    fn one_statement_batch(&self, sync: bool) -> Option<OneStatement> {
        if !sync || self.needs_sync || !self.expect.is_empty() {
            return None;
        }
        let mut parse = None;
        let mut bind: Option<(Bytes, Bytes)> = None;
        let mut describe = None;
        let mut executed = false;
        for f in &self.batch {
            match f.tag {
                tag::PARSE if parse.is_none() && bind.is_none() => {
                    let p = protocol::decode_parse(f.body()).ok()?;
                    if !p.name.is_empty() && self.stmts.contains_key(p.name) {
                        return None;
                    }
                    parse = Some((
                        Bytes::copy_from_slice(p.name),
                        Bytes::copy_from_slice(p.query),
                        Bytes::copy_from_slice(p.param_types),
                    ));
                }
                tag::BIND if bind.is_none() => {
                    let b = protocol::decode_bind(f.body()).ok()?;
                    if let Some((name, _, _)) = &parse
                        && name[..] != *b.statement
                    {
                        return None;
                    }
                    bind = Some((
                        Bytes::copy_from_slice(b.portal),
                        Bytes::copy_from_slice(b.statement),
                    ));
                }
                tag::DESCRIBE if describe.is_none() && !executed => {
                    let (kind, name) = protocol::decode_target(f.body()).ok()?;
                    match (&bind, kind) {
                        (Some((portal, _)), b'P') if portal[..] == *name => {
                            describe = Some((kind, false))
                        }
                        (Some((_, stmt)), b'S') if stmt[..] == *name => {
                            describe = Some((kind, false))
                        }
                        (None, b'S') if parse.as_ref().is_some_and(|(n, _, _)| n[..] == *name) => {
                            describe = Some((kind, true))
                        }
                        _ => return None,
                    }
                }
                tag::EXECUTE if !executed => {
                    let body = f.body();
                    let (portal, _) = bind.as_ref()?;
                    let end = body.iter().position(|c| *c == 0)?;
                    let rows = body.get(end + 1..end + 5)?;
                    if body[..end] != portal[..] || rows != [0, 0, 0, 0] {
                        return None;
                    }
                    executed = true;
                }
                _ => return None,
            }
        }
        executed.then_some(OneStatement { parse, describe })
    }

    /// Translates one message of a routed batch; `false`: not a message this batch
    /// handles differently (translate it as usual).
    pub(super) fn translate_routed(&mut self, f: &Frame) -> Result<bool, RouterError> {
        if matches!(f.tag, tag::BIND | tag::CLOSE)
            && let Some(r) = self.routed.as_mut()
        {
            // A portal made or closed by anything but a routed Bind is not the one
            // the last routed Bind described (a routed Bind sets it again).
            r.portal = None;
        }
        match f.tag {
            tag::PARSE => {
                let p = protocol::decode_parse(f.body())?;
                if !self.is_routed_text(p.query) {
                    return Ok(false);
                }
                // Not parsed on the worker (it has no table of that name): the shard
                // statement is, at Bind.
                let prep = self
                    .ctx
                    .prepared
                    .intern_in(p.query, p.param_types, self.client_epoch());
                if p.name.is_empty() {
                    self.expect.push_back(Expect::Synth {
                        tag: crate::protocol::btag::PARSE_COMPLETE,
                        undo: None,
                    });
                } else if self.stmts.contains_key(p.name) {
                    return Ok(false);
                } else {
                    let name = Bytes::copy_from_slice(p.name);
                    self.stmts.insert(name.clone(), prep);
                    self.expect.push_back(Expect::Synth {
                        tag: crate::protocol::btag::PARSE_COMPLETE,
                        undo: Some(Undo {
                            name,
                            previous: None,
                        }),
                    });
                }
                self.needs_sync = true;
                Ok(true)
            }
            tag::BIND => {
                let b = protocol::decode_bind(f.body())?;
                let client_stmt = if b.statement.is_empty() {
                    None
                } else {
                    match self.stmts.get(b.statement) {
                        Some(p) => Some(p.clone()),
                        None => return Ok(false),
                    }
                };
                let routed = match &client_stmt {
                    Some(p) => self.is_routed_statement(p),
                    None => self
                        .unnamed
                        .as_ref()
                        .is_some_and(|(q, _)| self.is_routed_text(q)),
                };
                if !routed {
                    return Ok(false);
                }
                let Some(bound) = self.routed.as_mut().and_then(|r| r.binds.pop_front()) else {
                    return Ok(false);
                };
                let sprep = match &client_stmt {
                    // A named statement remembers its shard statements.
                    Some(p) => p.routing.shard_statement(
                        &bound.sql,
                        &p.param_types,
                        &self.ctx.prepared,
                        p.epoch,
                    ),
                    None => {
                        let types = self
                            .unnamed
                            .as_ref()
                            .map(|(_, t)| t.clone())
                            .unwrap_or_default();
                        self.ctx.prepared.intern_in(
                            bound.sql.as_bytes(),
                            &types,
                            self.client_epoch(),
                        )
                    }
                };
                // `SELECT set_config(...) FROM dist WHERE ...`: a change the router
                // does not follow stays with this session's connection.
                let untracked = match &client_stmt {
                    Some(p) => {
                        p.settings
                            .get_or_init(|| super::inspect_text(&p.query))
                            .untracked
                    }
                    None => self
                        .unnamed
                        .as_ref()
                        .is_some_and(|(q, _)| super::inspect_text(q).untracked),
                };
                if untracked {
                    self.mark_untracked();
                }
                self.ensure_prepared(&sprep);
                protocol::encode_bind(&mut self.bout, b.portal, &sprep.name, b.rest);
                self.expect.push_back(msg(true));
                if let Some(r) = self.routed.as_mut() {
                    let text = BindParts::parse(b.rest).is_some_and(|p| {
                        p.results
                            .get(2..)
                            .is_some_and(|c| c.iter().all(|x| *x == 0))
                    });
                    r.portal = Some((Bytes::copy_from_slice(b.portal), sprep.clone(), text));
                    let name = Bytes::copy_from_slice(b.statement);
                    r.described.retain(|(n, _)| *n != name);
                    r.described.push((name, sprep));
                }
                self.needs_sync = true;
                Ok(true)
            }
            tag::DESCRIBE => {
                let (kind, name) = protocol::decode_target(f.body())?;
                if kind == b'P' {
                    let Some((_, sprep, true)) = self
                        .routed
                        .as_ref()
                        .and_then(|r| r.portal.as_ref())
                        .filter(|(p, _, _)| p[..] == *name)
                    else {
                        return Ok(false);
                    };
                    let sprep = sprep.clone();
                    let known = self
                        .lease
                        .as_mut()
                        .and_then(|l| l.conn().described.get(&sprep.id).cloned());
                    match known {
                        // Described on this connection before: the same answer,
                        // without a round of the node's own work.
                        Some(frame) => self.expect.push_back(Expect::SynthFrame(frame)),
                        None => {
                            protocol::encode_target(&mut self.bout, tag::DESCRIBE, b'P', name);
                            self.expect.push_back(Expect::Msg {
                                forward: true,
                                prepares: None,
                                undo: None,
                                describes: Some(sprep),
                                tracks: None,
                            });
                        }
                    }
                    self.needs_sync = true;
                    return Ok(true);
                }
                if kind != b'S' {
                    return Ok(false);
                }
                let query = if name.is_empty() {
                    self.unnamed.as_ref().map(|(q, _)| q.clone())
                } else {
                    self.stmts.get(name).map(|p| p.query.clone())
                };
                if !query.is_some_and(|q| self.is_routed_text(&q)) {
                    return Ok(false);
                }
                let sprep = self.routed.as_ref().and_then(|r| {
                    r.described
                        .iter()
                        .find(|(n, _)| n == name)
                        .map(|(_, p)| p.clone())
                });
                match sprep {
                    Some(p) => {
                        self.ensure_prepared(&p);
                        protocol::encode_target(&mut self.bout, tag::DESCRIBE, b'S', &p.name);
                        self.expect.push_back(msg(true));
                    }
                    None => self.raise_on_backend(
                        sqlstate::FEATURE_NOT_SUPPORTED.code(),
                        "describe a statement on distributed tables in a batch of its own (Parse, Describe, Sync), or after its Bind",
                    ),
                }
                self.needs_sync = true;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Which node a simple query (or FunctionCall) that is not routed goes to: the
    /// coordinator, except transaction control inside a transaction (the current
    /// node) and anything in a failed transaction (the node that failed answers).
    pub(super) async fn choose_node_simple(&mut self, frame: &Frame) -> Result<(), RouterError> {
        let body = frame.body();
        let sql = if frame.tag == tag::QUERY {
            std::str::from_utf8(&body[..body.len().saturating_sub(1)]).ok()
        } else {
            None
        };
        let ctl = sql.and_then(control);
        if self.status == TxnStatus::Idle && !self.expect.is_empty() {
            // Requests before this one are still unanswered (pipelined): one of them
            // may have opened a transaction. Their answers first, so the status is
            // current (a switch of node would wait for them anyway).
            self.write_backend().await?;
            self.pump().await?;
            self.after_request().await;
        }
        if self.needs_sync
            && self.parked.is_empty()
            && (ctl.is_some() || sql.is_some_and(names_no_table))
        {
            // After extended messages with no Sync yet, on the one node of the session:
            // transaction control (`P BEGIN ... Q COMMIT`), SET and SHOW run there, in
            // their implicit transaction, as on Postgres.
            return Ok(());
        }
        if self.status == TxnStatus::Idle && ctl != Some(Control::Begin) {
            // A transaction this request opens (`BEGIN; ...` in one string, or none) is
            // joined with a plain BEGIN, not an earlier transaction's.
            self.begin_sql = None;
        }
        if self.status != TxnStatus::Idle
            && !matches!(ctl, Some(Control::End(_)))
            && !self.parked.is_empty()
            && sql.is_some_and(ends_transaction_inside)
        {
            // The string would end the transaction on this node alone (`SAVEPOINT a;
            // COMMIT`, `BEGIN; COMMIT`): a string that starts with the end is run
            // after the other nodes' part ends (`end_others_first`); others are
            // refused.
            return Err(PlanError::NotSupported(
                "this transaction spans several nodes: COMMIT / ROLLBACK / PREPARE TRANSACTION must be sent as a statement of its own, not inside a query string with other statements".into(),
            )
            .into());
        }
        match self.status {
            TxnStatus::Failed => {
                match ctl {
                    Some(Control::End(e)) => self.end_others_first(e).await?,
                    Some(Control::Other) => {
                        if let Some(sql) = sql {
                            self.savepoint_command(sql).await?;
                        }
                    }
                    _ => {}
                }
                Ok(())
            }
            TxnStatus::Idle => {
                if ctl == Some(Control::Begin)
                    && let Some(sql) = sql
                {
                    // `BEGIN; INSERT ...` in one query: the BEGIN alone is replayed on
                    // nodes joining later, and the coordinator has written.
                    if normalize(sql).multi {
                        // The BEGIN statement alone, with its options.
                        self.begin_sql = end_statements(sql).1.map(str::to_owned);
                        if self.writes_here(sql) {
                            self.writers = vec![None];
                        }
                    } else {
                        self.begin_sql = Some(sql.to_owned());
                    }
                } else if let Some(sql) = sql
                    && memchr::memchr(b';', sql.trim_end().trim_end_matches(';').as_bytes())
                        .is_some()
                    && let (_, Some(begin), _, _) = end_statements(sql)
                {
                    // `SELECT 1; BEGIN ISOLATION LEVEL ...`: a BEGIN after the first
                    // statement opens the transaction, with its options.
                    self.begin_sql = Some(begin.to_owned());
                    if self.writes_here(sql) {
                        self.writers = vec![None];
                    }
                }
                self.switch_to(None).await
            }
            TxnStatus::InTransaction => match ctl {
                Some(Control::End(e)) => self.end_others_first(e).await,
                Some(Control::Other) => match sql {
                    Some(sql) => self.savepoint_command(sql).await,
                    None => Ok(()),
                },
                Some(_) => Ok(()),
                None => {
                    let writes = sql.is_none_or(|s| self.writes_here(s));
                    self.check_write(None, writes)?;
                    self.switch_to(None).await
                }
            },
        }
    }

    /// Whether a pass-through statement counts as a write for the one-writer rule
    /// (only looked at inside transactions of the database with distributed tables).
    fn writes_here(&self, sql: &str) -> bool {
        if self.database != self.ctx.catalog.database || self.ctx.catalog.peek().tables.is_empty() {
            return false;
        }
        statement_writes(sql)
    }

    /// Picks the node of an extended batch and plans its routed statements.
    pub(super) async fn choose_node_batch(&mut self, sync: bool) -> Result<(), RouterError> {
        if self.skip_until_sync {
            return Ok(());
        }
        // Messages sent without a Sync after them tie the batch to the current node;
        // replies still expected from it are collected by `switch_to`.
        let pinned = self.needs_sync;
        if self.status == TxnStatus::Idle && !pinned {
            // A BEGIN inside this batch opens a plain transaction.
            self.begin_sql = None;
        }
        if self.status == TxnStatus::Failed && !pinned {
            match self.batch_control() {
                Some(Control::End(e)) => self.end_others_first(e).await?,
                Some(Control::Other) => self.batch_savepoint_command().await?,
                _ => {}
            }
            return Ok(());
        }
        let routed = if self.status == TxnStatus::Failed {
            None
        } else {
            self.plan_batch(sync)?
        };
        if let Some(r) = routed {
            if r.multi.is_some() {
                // Runs on its nodes by itself (`Session::run_multi_batch`).
                self.routed = Some(r);
                return Ok(());
            }
            let group = r.binds.front().map(|b| b.group);
            let writes = r.binds.iter().any(|b| !b.read_only);
            if pinned && self.node != group {
                return Err(PlanError::NotSupported(
                    "statements of one extended-protocol batch (up to Sync) must run on one node; send a Sync before a statement on another node".into(),
                )
                .into());
            }
            self.check_write(group, writes)?;
            self.switch_to(group).await?;
            self.routed = Some(r);
            return Ok(());
        }
        if pinned {
            return Ok(());
        }
        match (self.status, self.batch_control()) {
            (TxnStatus::Idle, ctl) => {
                if ctl == Some(Control::Begin) {
                    self.begin_sql = None;
                }
                self.switch_to(None).await
            }
            (_, Some(Control::End(e))) => self.end_others_first(e).await,
            (_, Some(Control::Other)) => self.batch_savepoint_command().await,
            (_, Some(_)) => Ok(()),
            (_, None) => {
                let writes = self.batch_writes();
                self.check_write(None, writes)?;
                self.switch_to(None).await
            }
        }
    }

    /// The texts of the statements the batch's Binds run.
    fn batch_bound_texts(&self) -> Vec<Bytes> {
        let mut unnamed = self.unnamed.as_ref().map(|(q, _)| q.clone());
        // Statements parsed earlier in this batch (not in `stmts` yet).
        let mut named: Vec<(Bytes, Bytes)> = Vec::new();
        let mut out = Vec::new();
        for f in &self.batch {
            match f.tag {
                tag::PARSE => {
                    if let Ok(p) = protocol::decode_parse(f.body()) {
                        let q = Bytes::copy_from_slice(p.query);
                        if p.name.is_empty() {
                            unnamed = Some(q);
                        } else {
                            named.push((Bytes::copy_from_slice(p.name), q));
                        }
                    }
                }
                tag::BIND => {
                    let Ok(b) = protocol::decode_bind(f.body()) else {
                        continue;
                    };
                    let q = if b.statement.is_empty() {
                        unnamed.clone()
                    } else if let Some((_, q)) =
                        named.iter().rev().find(|(n, _)| n[..] == *b.statement)
                    {
                        Some(q.clone())
                    } else {
                        self.stmts.get(b.statement).map(|p| p.query.clone())
                    };
                    out.extend(q);
                }
                _ => {}
            }
        }
        out
    }

    /// `Some(c)` when every Bind of the batch runs transaction control (the last
    /// one's kind); `None` when one runs anything else, or there is no Bind.
    fn batch_control(&self) -> Option<Control> {
        let texts = self.batch_bound_texts();
        let mut last = None;
        for q in &texts {
            last = Some(control(std::str::from_utf8(q).ok()?)?);
        }
        last
    }

    /// A savepoint command (simple query) in a transaction: run on the transaction's
    /// other nodes first. One the router cannot follow (inside a string of several
    /// statements) is refused in the database with distributed tables: on one node
    /// only, it would leave the nodes disagreeing about the savepoint.
    async fn savepoint_command(&mut self, sql: &str) -> Result<(), RouterError> {
        if !super::savepoint::is_savepoint_command(sql) {
            return Ok(());
        }
        match super::savepoint::savepoint_op(sql) {
            Some(op) => self.savepoint_elsewhere(&op).await,
            None if self.database == self.ctx.catalog.database => Err(PlanError::NotSupported(
                "SAVEPOINT, RELEASE and ROLLBACK TO must be sent as a statement of their own in a transaction (it may span several nodes)".into(),
            )
            .into()),
            None => Ok(()),
        }
    }

    /// The savepoint command of an extended batch of transaction control.
    async fn batch_savepoint_command(&mut self) -> Result<(), RouterError> {
        let texts = self.batch_bound_texts();
        let sqls: Vec<&str> = texts
            .iter()
            .filter_map(|q| std::str::from_utf8(q).ok())
            .filter(|q| super::savepoint::is_savepoint_command(q))
            .collect();
        match (texts.len(), sqls.as_slice()) {
            (_, []) => Ok(()),
            (1, [sql]) => {
                let sql = (*sql).to_owned();
                self.savepoint_command(&sql).await
            }
            _ if self.database == self.ctx.catalog.database => Err(PlanError::NotSupported(
                "SAVEPOINT, RELEASE and ROLLBACK TO must be sent in an extended-protocol batch of their own (up to Sync) in a transaction (it may span several nodes)".into(),
            )
            .into()),
            _ => Ok(()),
        }
    }

    fn batch_writes(&self) -> bool {
        self.batch_bound_texts()
            .iter()
            .any(|q| self.writes_here(std::str::from_utf8(q).unwrap_or("")))
    }

    /// The batch could not be planned: the client gets the error at the right place
    /// (inside a transaction the backend raises it, aborting the transaction as
    /// Postgres would), and the rest of the batch up to Sync is skipped.
    pub(super) async fn fail_batch(
        &mut self,
        e: RouterError,
        end: Option<Frame>,
    ) -> Result<(), RouterError> {
        if !self.expect.is_empty() {
            self.write_backend().await?;
            self.pump().await?;
        }
        let Some(u) = e.user_facing() else {
            return Err(e);
        };
        if self.skip_until_sync && self.needs_sync {
            // A message sent earlier without a Sync failed on the backend, and the
            // client has that error: the backend skips to the Sync, which alone goes
            // on (Postgres answers nothing else).
            if let Some(end) = end {
                self.translate(end)?;
            }
            return Ok(());
        }
        if self.status != TxnStatus::Idle || self.needs_sync {
            // In a transaction, or with messages unsynced on the backend (their
            // implicit transaction must roll back, their answers come first).
            if let Err(e) = self.ensure_lease().await {
                return self.refuse_request(e);
            }
            self.ctx.metrics.error(u.code.code().as_bytes());
            self.raise_on_backend(u.code.code(), &u.message);
            if let Some(end) = end {
                self.translate(end)?;
            }
            return Ok(());
        }
        self.client_error(&e);
        match end {
            Some(f) if f.tag == tag::SYNC => {
                self.skip_until_sync = false;
                protocol::encode_ready_for_query(&mut self.out, self.status);
            }
            _ => self.skip_until_sync = true,
        }
        Ok(())
    }

    /// Fails a request with `e`. Outside a transaction the router answers; inside one
    /// the backend raises it, so the transaction is aborted exactly as Postgres would.
    pub(super) async fn refuse_in_session(&mut self, e: RouterError) -> Result<(), RouterError> {
        // With extended messages unsynced on the backend, their answers come first:
        // the backend raises the error after them, as Postgres would answer.
        let in_txn = self.status != TxnStatus::Idle || self.needs_sync || !self.expect.is_empty();
        if !in_txn {
            self.client_error(&e);
            protocol::encode_ready_for_query(&mut self.out, self.status);
            return Ok(());
        }
        let u = e.user_facing().expect("refusals are user facing");
        self.ctx.metrics.error(u.code.code().as_bytes());
        if let Err(e) = self.ensure_lease().await {
            return self.refuse_request(e);
        }
        let code = u
            .raw_code
            .clone()
            .unwrap_or_else(|| u.code.code().to_owned());
        protocol::encode_simple_query(&mut self.bout, &super::raise_sql(&code, &u.message));
        self.expect.push_back(Expect::Query {
            tracked: None,
            ok: false,
            ends: None,
        });
        self.write_backend().await?;
        self.pump().await?;
        self.maybe_release();
        Ok(())
    }
}

/// A simple query pipelined after extended-protocol messages that have no Sync yet
/// joins their implicit transaction on their node (as on Postgres), so it cannot run
/// on another node or on several.
fn unsynced_elsewhere() -> RouterError {
    PlanError::NotSupported(
        "a simple query that follows extended-protocol messages without a Sync must run on the node of those messages; send a Sync before a query on another node".into(),
    )
    .into()
}

/// Whether a statement may write (for the one-writer rule): anything but reads and
/// session/transaction commands, and reads holding INSERT / UPDATE / DELETE / MERGE.
fn statement_writes(sql: &str) -> bool {
    use crate::plan::normalize::{Tok, tokens};
    let mut words = tokens(sql)
        .into_iter()
        .filter(|t| t.0 == Tok::Word)
        .map(|(_, s, e)| &sql[s..e]);
    let Some(first) = words.next() else {
        return false;
    };
    const READS: &[&str] = &[
        "select",
        "values",
        "table",
        "with",
        "show",
        "set",
        "reset",
        "explain",
        "declare",
        "fetch",
        "move",
        "close",
        "listen",
        "unlisten",
        "discard",
        "deallocate",
        "begin",
        "start",
        "commit",
        "end",
        "rollback",
        "abort",
        "savepoint",
        "release",
        "lock",
    ];
    if !READS.iter().any(|w| first.eq_ignore_ascii_case(w)) {
        return true;
    }
    words.any(|w| {
        ["insert", "update", "delete", "merge"]
            .iter()
            .any(|k| w.eq_ignore_ascii_case(k))
    })
}

/// What a string does to the transaction it runs in: whether it holds a statement
/// that ends it (COMMIT, END, ROLLBACK, ABORT; not ROLLBACK TO or PREPARE
/// TRANSACTION); the BEGIN statement after the last such one, if any (the transaction
/// the string leaves open); whether a ROLLBACK TO (which answers with the tag of a
/// ROLLBACK) comes before an end; and whether the last end is `AND CHAIN` (the next
/// transaction keeps the modes of the one that ended).
pub(super) fn end_statements(sql: &str) -> (bool, Option<&str>, bool, bool) {
    let mut ends = false;
    let mut begin = None;
    let mut rolls_back_to = false;
    let mut rollback_to_before = false;
    let mut chain = false;
    for stmt in crate::plan::normalize::statements(sql) {
        match control(stmt) {
            Some(Control::End(_)) => {
                ends = true;
                begin = None;
                chain = and_chain(stmt);
                // A ROLLBACK TO before it could answer with a ROLLBACK tag of its own
                // in a string that fails before this end runs (one after it runs
                // only if this end did).
                rolls_back_to |= rollback_to_before;
            }
            // After `... AND CHAIN`, Postgres ignores a BEGIN (a warning).
            Some(Control::Begin) if !chain => begin = Some(stmt.trim_end()),
            Some(Control::Other)
                if stmt
                    .trim_start()
                    .get(..8)
                    .is_some_and(|w| w.eq_ignore_ascii_case("rollback")) =>
            {
                rollback_to_before = true
            }
            _ => {}
        }
    }
    (ends, begin, rolls_back_to, chain)
}

/// `COMMIT AND CHAIN` / `ROLLBACK AND CHAIN` (not `AND NO CHAIN`).
fn and_chain(stmt: &str) -> bool {
    let words: Vec<&str> = stmt.split_whitespace().collect();
    words.windows(2).any(|w| {
        w[0].eq_ignore_ascii_case("and") && w[1].trim_end_matches(';').eq_ignore_ascii_case("chain")
    })
}

fn ends_transaction_inside(sql: &str) -> bool {
    use crate::plan::normalize::{Tok, tokens};
    let mut start = false;
    for (kind, s, e) in tokens(sql) {
        match kind {
            Tok::Semi => start = true,
            Tok::Space => {}
            Tok::Word if start => {
                let w = &sql[s..e];
                if ["commit", "end", "rollback", "abort", "prepare"]
                    .iter()
                    .any(|k| w.eq_ignore_ascii_case(k))
                {
                    return true;
                }
                start = false;
            }
            _ => start = false,
        }
    }
    false
}

/// Whether a BEGIN statement has no options (replayed as plain `BEGIN`).
fn plain_begin(sql: &str) -> bool {
    let words: Vec<&str> = sql
        .split(|c: char| c.is_whitespace() || c == ';')
        .filter(|w| !w.is_empty())
        .collect();
    let is = |i: usize, k: &str| words.get(i).is_some_and(|w| w.eq_ignore_ascii_case(k));
    match words.len() {
        1 => is(0, "begin"),
        2 => {
            (is(0, "begin") && (is(1, "transaction") || is(1, "work")))
                || (is(0, "start") && is(1, "transaction"))
        }
        _ => false,
    }
}

/// Whether `sql` is one SET, RESET or SHOW statement: it names settings, never tables
/// (`SET app.orders = 1` is not about a table `orders`).
fn names_no_table(sql: &str) -> bool {
    let s = sql.trim_start();
    let word = &s[..s
        .find(|c: char| !c.is_ascii_alphabetic())
        .unwrap_or(s.len())];
    ["set", "reset", "show"]
        .iter()
        .any(|k| word.eq_ignore_ascii_case(k))
        && (!s.contains(';') || {
            // One statement: no `;` outside strings and comments but trailing ones.
            use crate::plan::normalize::{Tok, tokens};
            let mut ended = false;
            tokens(s).iter().all(|(k, ..)| match k {
                Tok::Semi => {
                    ended = true;
                    true
                }
                Tok::Space => true,
                _ => !ended,
            })
        })
}

/// Appends a statement (if any) to a string of several.
pub(super) fn push_statement(sql: &mut String, stmt: Option<String>) {
    if let Some(stmt) = stmt {
        if !sql.is_empty() {
            sql.push_str("; ");
        }
        sql.push_str(&stmt);
    }
}

pub(super) fn node_label(node: Option<i32>) -> String {
    match node {
        None => "the coordinator".into(),
        Some(g) => format!("the node of group {g}"),
    }
}

/// Parameter type oids of a Parse message's raw parameter-type bytes.
pub(super) fn param_oids(raw: &[u8]) -> Vec<u32> {
    if raw.len() < 2 {
        return Vec::new();
    }
    let n = u16::from_be_bytes([raw[0], raw[1]]) as usize;
    raw[2..]
        .chunks_exact(4)
        .take(n)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// The parameter values of a Bind message (after portal and statement names).
pub(super) fn bind_params<'a>(rest: &'a [u8], oids: &[u32]) -> Result<Vec<ParamValue<'a>>, ()> {
    let parts = BindParts::parse(rest).ok_or(())?;
    parts
        .values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let Some(v) = v else {
                return Ok(ParamValue::Null);
            };
            let format = match parts.formats.as_slice() {
                [] => 0,
                [f] => *f,
                all => *all.get(i).ok_or(())?,
            };
            Ok(if format == 1 {
                ParamValue::Binary(v, oids.get(i).copied().unwrap_or(0))
            } else {
                ParamValue::Text(v)
            })
        })
        .collect()
}

/// A Bind body after the names: parameter format codes, values (None: NULL) and result
/// format codes.
pub(super) struct BindParts<'a> {
    pub formats: Vec<u16>,
    pub values: Vec<Option<&'a [u8]>>,
    pub results: &'a [u8],
}

impl<'a> BindParts<'a> {
    pub(super) fn parse(rest: &'a [u8]) -> Option<BindParts<'a>> {
        let mut at = 0usize;
        let u16_at = |at: &mut usize| -> Option<u16> {
            let v = rest.get(*at..*at + 2)?;
            *at += 2;
            Some(u16::from_be_bytes([v[0], v[1]]))
        };
        let n = u16_at(&mut at)? as usize;
        let mut formats = Vec::with_capacity(n);
        for _ in 0..n {
            formats.push(u16_at(&mut at)?);
        }
        let n = u16_at(&mut at)? as usize;
        let mut values = Vec::with_capacity(n);
        for _ in 0..n {
            let len = rest.get(at..at + 4)?;
            let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
            at += 4;
            if len < 0 {
                values.push(None);
            } else {
                values.push(Some(rest.get(at..at + len as usize)?));
                at += len as usize;
            }
        }
        Some(BindParts {
            formats,
            values,
            results: &rest[at..],
        })
    }

    /// The Bind body for the parameters `used` (0-based, in their new order).
    pub(super) fn subset(&self, used: &[usize]) -> Bytes {
        let mut out = BytesMut::new();
        match self.formats.len() {
            0 | 1 => {
                out.put_u16(self.formats.len() as u16);
                out.extend(self.formats.iter().flat_map(|f| f.to_be_bytes()));
            }
            _ => {
                out.put_u16(used.len() as u16);
                for n in used {
                    out.put_u16(self.formats.get(*n).copied().unwrap_or(0));
                }
            }
        }
        out.put_u16(used.len() as u16);
        for n in used {
            match self.values[*n] {
                None => out.put_i32(-1),
                Some(v) => {
                    out.put_i32(v.len() as i32);
                    out.extend_from_slice(v);
                }
            }
        }
        out.extend_from_slice(self.results);
        out.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transaction_control_is_recognised() {
        assert_eq!(control("BEGIN"), Some(Control::Begin));
        assert_eq!(
            control("start transaction isolation level serializable"),
            Some(Control::Begin)
        );
        assert_eq!(control("commit;"), Some(Control::End(TxnEnd::Commit)));
        assert_eq!(control("END"), Some(Control::End(TxnEnd::Commit)));
        assert_eq!(control("ROLLBACK"), Some(Control::End(TxnEnd::Rollback)));
        assert_eq!(control("abort"), Some(Control::End(TxnEnd::Rollback)));
        assert_eq!(control("ROLLBACK TO SAVEPOINT a"), Some(Control::Other));
        // The noise words: a savepoint command, not the end of the transaction.
        assert_eq!(control("rollback work to a"), Some(Control::Other));
        assert_eq!(
            control("ROLLBACK TRANSACTION TO SAVEPOINT a"),
            Some(Control::Other)
        );
        assert_eq!(
            control("ROLLBACK WORK"),
            Some(Control::End(TxnEnd::Rollback))
        );
        assert_eq!(control("savepoint a"), Some(Control::Other));
        assert_eq!(control("PREPARE TRANSACTION 'x'"), Some(Control::Other));
        assert_eq!(control("PREPARE q AS SELECT 1"), None);
        assert_eq!(control("COMMIT PREPARED 'x'"), None);
        assert_eq!(control("SELECT 1"), None);
    }

    #[test]
    fn transaction_ends_inside_a_query_string_are_found() {
        assert!(ends_transaction_inside("UPDATE t SET v = 1; COMMIT"));
        assert!(ends_transaction_inside("select 1;\n  end"));
        assert!(ends_transaction_inside("SELECT 1; PREPARE TRANSACTION 'x'"));
        assert!(!ends_transaction_inside(
            "SELECT CASE WHEN true THEN 1 END; SELECT 2"
        ));
        assert!(!ends_transaction_inside("COMMIT"));
        assert!(!ends_transaction_inside("SELECT 'a; commit'"));
    }

    #[test]
    fn one_set_names_no_table() {
        assert!(names_no_table("SET LOCAL app.t = 'a;b' /*route='/x;y'*/ ;"));
        assert!(names_no_table("set x = 1;"));
        assert!(names_no_table("SHOW app.t"));
        assert!(!names_no_table("SET x = 1; SELECT * FROM t"));
        assert!(!names_no_table("SELECT * FROM t"));
    }

    #[test]
    fn strings_that_end_a_transaction() {
        assert_eq!(
            end_statements("rollback and chain; begin read only"),
            (true, None, false, true)
        );
        assert_eq!(
            end_statements("COMMIT AND CHAIN; COMMIT; BEGIN"),
            (true, Some("BEGIN"), false, false)
        );
        assert_eq!(end_statements("COMMIT"), (true, None, false, false));
        assert_eq!(
            end_statements("ROLLBACK; BEGIN"),
            (true, Some("BEGIN"), false, false)
        );
        assert_eq!(
            end_statements("commit ; begin isolation level serializable ;"),
            (
                true,
                Some("begin isolation level serializable"),
                false,
                false
            )
        );
        assert_eq!(
            end_statements("BEGIN; SELECT 1; END"),
            (true, None, false, false)
        );
        assert_eq!(
            end_statements("SELECT 1; ROLLBACK TO s"),
            (false, None, false, false)
        );
        assert_eq!(
            end_statements("COMMIT AND CHAIN"),
            (true, None, false, true)
        );
        assert_eq!(
            end_statements("commit and no chain; begin"),
            (true, Some("begin"), false, false)
        );
        assert_eq!(
            end_statements("PREPARE TRANSACTION 'x'"),
            (false, None, false, false)
        );
        assert_eq!(
            end_statements("ROLLBACK; BEGIN; SAVEPOINT a; RELEASE a"),
            (true, Some("BEGIN"), false, false)
        );
        assert_eq!(
            end_statements("COMMIT; BEGIN; SAVEPOINT a; ROLLBACK TO a"),
            (true, Some("BEGIN"), false, false)
        );
        assert_eq!(
            end_statements("ROLLBACK WORK TO a; COMMIT; BEGIN"),
            (true, Some("BEGIN"), true, false)
        );
        assert_eq!(
            end_statements("SELECT 'commit'; /* rollback */ SELECT 2"),
            (false, None, false, false)
        );
    }

    #[test]
    fn plain_begins_are_recognised() {
        for s in [
            "BEGIN",
            "begin;",
            " BEGIN TRANSACTION ",
            "start transaction",
            "begin work;",
        ] {
            assert!(plain_begin(s), "{s}");
        }
        for s in [
            "BEGIN ISOLATION LEVEL SERIALIZABLE",
            "BEGIN READ ONLY",
            "START TRANSACTION READ WRITE",
            "BEGIN; INSERT INTO t VALUES (1)",
        ] {
            assert!(!plain_begin(s), "{s}");
        }
    }

    #[test]
    fn bind_parameters_are_read() {
        // 1 format (binary), 2 params: int4 7, NULL; 0 result formats.
        let mut m = vec![
            0, 1, 0, 1, 0, 2, 0, 0, 0, 4, 0, 0, 0, 7, 255, 255, 255, 255, 0, 0,
        ];
        let p = bind_params(&m, &[23]).unwrap();
        assert!(matches!(p[0], ParamValue::Binary([0, 0, 0, 7], 23)));
        assert!(matches!(p[1], ParamValue::Null));
        m.truncate(8);
        assert!(bind_params(&m, &[]).is_err());
    }
}
