//! The client's COMMIT of a transaction that wrote on several nodes: two-phase commit
//! over the session's own leases (`crate::txn` has the gids, the commit records and
//! recovery).
//!
//! 1. Nodes that only read: plain COMMIT; the coordinator's stays open when the
//!    client's COMMIT follows (it answers it). The coordinator connection that will
//!    answer is taken here, before anything is decided.
//! 2. Every writer: `PREPARE TRANSACTION`, all at once. Any failure: every writer rolls
//!    back (prepared ones with ROLLBACK PREPARED) and the client gets the error.
//! 3. The commit records, durably on the coordinator: the commit point.
//! 4. `COMMIT PREPARED` on every writer, all at once; a failure there is left to
//!    recovery (the record says commit).
//! 5. The client's own COMMIT then goes to the coordinator: into its open read-only
//!    transaction, or a fresh empty one, so the client gets Postgres's own answer in
//!    whichever protocol it used.

use super::Session;
use super::route::node_label;
use crate::backend::{BackendConn, BackendError, Lease, PoolMode};
use crate::error::{RouterError, sqlstate};
use crate::protocol::{self, TxnStatus};
use crate::txn::{CommitError, Failpoint, RecordError};
use futures_util::future::join_all;
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncWrite};

/// The coordinator's group in commit records.
const COORDINATOR_GROUP: i32 = 0;

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// Commits the open transaction on every node. `for_client`: the client's own
    /// COMMIT follows (it gets a fresh transaction on the coordinator to answer);
    /// otherwise the router ends an implicit transaction of its own.
    pub(super) async fn commit_two_phase(&mut self, for_client: bool) -> Result<(), RouterError> {
        if !self.expect.is_empty() {
            self.write_backend().await?;
            self.pump().await?;
        }
        let txns = self.ctx.txns.clone();
        let mut leases: Vec<(Option<i32>, Lease)> = std::mem::take(&mut self.parked);
        if let Some(l) = self.lease.take() {
            self.cancel.set(None);
            self.batch_prepared.clear();
            leases.push((self.node, l));
        }
        let writers = std::mem::take(&mut self.writers);
        let (mut wl, rl): (Vec<_>, Vec<_>) =
            leases.into_iter().partition(|(n, _)| writers.contains(n));
        let mut done: Vec<(Option<i32>, Lease)> = Vec::new();
        self.node = None;
        // 1. Readers. The coordinator's stays open when the client's COMMIT follows:
        // that COMMIT ends it (and answers the client) once the writers committed.
        for (n, mut l) in rl {
            if l.conn().status == TxnStatus::Idle {
                done.push((n, l));
                continue;
            }
            if for_client && n.is_none() && l.conn().status == TxnStatus::InTransaction {
                let c = l.conn();
                self.cancel.set(Some((c.addr, c.pid, c.secret)));
                self.lease = Some(l);
                continue;
            }
            match l.conn().run_internal("COMMIT").await {
                Ok(()) => done.push((n, l)),
                Err(e) => tracing::warn!(error = %e, "COMMIT of a node that only read failed"),
            }
        }
        // The connection that will answer the client's COMMIT, taken before anything
        // is decided: once the commit point is passed, the client must hear COMMIT.
        if for_client
            && self.lease.is_none()
            && let Err(e) = self.ensure_lease().await
        {
            for (_, l) in &mut wl {
                let _ = l.conn().run_internal("ROLLBACK").await;
            }
            done.extend(wl);
            txns.metrics.aborts.inc();
            let reason = e
                .user_facing()
                .map(|u| u.message)
                .unwrap_or_else(|| e.to_string());
            return self
                .commit_failed(
                    done,
                    CommitError::new(
                        sqlstate::TRANSACTION_ROLLBACK.code(),
                        format!("the transaction was rolled back: no connection to the coordinator to finish the commit: {reason}"),
                    ),
                )
                .await;
        }
        // A writer whose lease is gone (its connection broke) lost its work.
        let missing: Vec<Option<i32>> = writers
            .iter()
            .filter(|w| !wl.iter().any(|(n, _)| n == *w))
            .copied()
            .collect();
        let unusable = wl
            .iter_mut()
            .any(|(_, l)| l.conn().status != TxnStatus::InTransaction);
        if !missing.is_empty() || unusable {
            for (_, l) in &mut wl {
                let _ = l.conn().run_internal("ROLLBACK").await;
            }
            done.extend(wl);
            txns.metrics.aborts.inc();
            return self.commit_failed(
                done,
                CommitError::new(
                    sqlstate::TRANSACTION_ROLLBACK.code(),
                    "the transaction was rolled back: a node it wrote on lost its part of it before COMMIT",
                ),
            )
            .await;
        }
        // 2. PREPARE.
        let flight = txns.begin_commit();
        let seq = flight.seq;
        let gids: Vec<String> = wl.iter().map(|(n, _)| txns.gid(seq, *n)).collect();
        let t = Instant::now();
        let results = join_all(wl.iter_mut().zip(&gids).map(|((_, l), gid)| async move {
            l.conn()
                .run_internal(&format!("PREPARE TRANSACTION '{gid}'"))
                .await
        }))
        .await;
        txns.metrics
            .prepare_seconds
            .observe(t.elapsed().as_secs_f64());
        let mut failure: Option<CommitError> = None;
        let mut prepared = vec![false; wl.len()];
        let mut broken = vec![false; wl.len()];
        for (i, r) in results.into_iter().enumerate() {
            match r {
                Ok(()) => prepared[i] = true,
                Err(BackendError::Statement(f)) => {
                    let mut e = CommitError::from_backend(f.body());
                    if e.code == sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE.code()
                        && e.message.contains("max_prepared_transactions")
                    {
                        e.hint = Some("a transaction that writes on several nodes commits with two-phase commit: set max_prepared_transactions above 0 on every node".into());
                    }
                    failure.get_or_insert(e);
                }
                Err(e) => {
                    broken[i] = true;
                    failure.get_or_insert(CommitError::new(
                        sqlstate::TRANSACTION_ROLLBACK.code(),
                        format!("the transaction was rolled back: PREPARE TRANSACTION failed on {}: {e}", node_label(wl[i].0)),
                    ));
                }
            }
        }
        if let Some(e) = failure {
            // A broken connection's PREPARE may have happened: no record, so recovery
            // rolls it back.
            self.rollback_prepared(&mut wl, &gids, &prepared).await;
            flight.end(false);
            txns.metrics.aborts.inc();
            done.extend(
                wl.into_iter()
                    .zip(broken)
                    .filter_map(|(l, b)| (!b).then_some(l)),
            );
            return self.commit_failed(done, e).await;
        }
        txns.failpoint(Failpoint::AfterPrepare).await;
        // 3. The commit point.
        let t = Instant::now();
        let records: Vec<(i32, String)> = wl
            .iter()
            .zip(&gids)
            .map(|((n, _), g)| (n.unwrap_or(COORDINATOR_GROUP), g.clone()))
            .collect();
        let recorded = txns.write_records(seq, &records).await;
        txns.metrics
            .record_seconds
            .observe(t.elapsed().as_secs_f64());
        match recorded {
            Ok(()) => {}
            Err(RecordError::Refused(e)) => {
                self.rollback_prepared(&mut wl, &gids, &prepared).await;
                flight.end(false);
                txns.metrics.aborts.inc();
                done.extend(wl);
                return self
                    .commit_failed(
                        done,
                        CommitError::new(
                            sqlstate::TRANSACTION_ROLLBACK.code(),
                            format!("the transaction was rolled back: its commit record could not be written on the coordinator: {e}"),
                        ),
                    )
                    .await;
            }
            Err(RecordError::Ambiguous(reason)) => {
                flight.end(true);
                txns.metrics.in_doubt.inc();
                done.extend(wl);
                let mut e = CommitError::new(
                    sqlstate::TRANSACTION_RESOLUTION_UNKNOWN.code(),
                    format!(
                        "the outcome of this transaction is unknown: the connection to the coordinator broke while its commit record was written ({reason})"
                    ),
                );
                e.hint = Some("recovery finishes it on every node the same way, within a minute; check whether its changes are there before retrying".into());
                return self.commit_failed(done, e).await;
            }
        }
        txns.failpoint(Failpoint::AfterRecord).await;
        // 4. COMMIT PREPARED.
        let t = Instant::now();
        let settings = &self.settings;
        let results = join_all(
            wl.iter_mut()
                .zip(&gids)
                .map(|((_, l), gid)| finish_prepared(l.conn(), "COMMIT", gid, settings)),
        )
        .await;
        txns.metrics
            .commit_seconds
            .observe(t.elapsed().as_secs_f64());
        for ((n, l), r) in wl.into_iter().zip(results) {
            match r {
                Ok(()) => done.push((n, l)),
                Err(e) => {
                    tracing::error!(node = %node_label(n), error = %e, "COMMIT PREPARED failed; recovery commits it (the commit record is there)");
                    if matches!(e, BackendError::Statement(_)) {
                        done.push((n, l));
                    }
                }
            }
        }
        flight.end(false);
        txns.metrics.commits.inc();
        // 5. The client's COMMIT gets its answer from the coordinator's open
        // transaction, or else from a fresh one (its BEGIN goes out with the COMMIT).
        self.keep_leases(done);
        let open = self
            .lease
            .as_mut()
            .is_some_and(|l| l.conn().status != TxnStatus::Idle);
        if !for_client || open {
            return Ok(());
        }
        protocol::encode_simple_query(&mut self.bout, "BEGIN");
        self.expect.push_back(super::Expect::Internal);
        Ok(())
    }

    async fn rollback_prepared(
        &mut self,
        wl: &mut [(Option<i32>, Lease)],
        gids: &[String],
        prepared: &[bool],
    ) {
        for (((n, l), gid), p) in wl.iter_mut().zip(gids).zip(prepared) {
            let c = l.conn();
            let r = if *p {
                finish_prepared(c, "ROLLBACK", gid, &self.settings).await
            } else if c.status != TxnStatus::Idle {
                c.run_internal("ROLLBACK").await
            } else {
                continue;
            };
            if let Err(e) = r {
                tracing::warn!(node = %node_label(*n), error = %e, "rolling back a node's part of a failed commit failed; recovery rolls it back");
            }
        }
    }

    /// The transaction is over on every node (rolled back, or left to recovery): the
    /// client hears `e` instead of COMMIT, and the session is outside a transaction.
    async fn commit_failed(
        &mut self,
        leases: Vec<(Option<i32>, Lease)>,
        e: CommitError,
    ) -> Result<(), RouterError> {
        // The coordinator's open transaction kept for the client's COMMIT.
        if let Some(l) = self.lease.as_mut()
            && l.conn().status != TxnStatus::Idle
        {
            let _ = l.conn().run_internal("ROLLBACK").await;
        }
        self.keep_leases(leases);
        self.status = TxnStatus::Idle;
        self.txn_settings.clear();
        self.txn_applied.clear();
        self.dist = None;
        self.maybe_release();
        Err(RouterError::Commit(e))
    }

    /// Leases of a finished transaction: the coordinator's becomes the session's
    /// current one; the others go back to their pools (or stay, with session pooling).
    fn keep_leases(&mut self, leases: Vec<(Option<i32>, Lease)>) {
        self.node = None;
        let dirty = self.txn_session_sets || self.txn_settings.iter().any(|t| !t.is_local());
        for (n, mut l) in leases {
            if dirty {
                // SETs of the transaction (see `end_parked`).
                l.conn().settings_fp = super::settings::DIRTY_FP;
            }
            if l.conn().status != TxnStatus::Idle {
                // Not expected: never hand out a backend inside a transaction.
                tracing::warn!(node = %node_label(n), "a backend is still in a transaction after commit; closing it");
                drop(l);
                continue;
            }
            if n.is_none() && self.lease.is_none() {
                let c = l.conn();
                self.cancel.set(Some((c.addr, c.pid, c.secret)));
                self.lease = Some(l);
            } else if self.mode == PoolMode::Session {
                self.parked.push((n, l));
            } else {
                l.release();
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// COMMIT of a transaction that lost part of its work (a deadlock victim that
    /// rolled back to a savepoint afterwards): everything rolls back and the client
    /// gets an error instead of COMMIT.
    pub(super) async fn commit_doomed(&mut self) -> Result<(), RouterError> {
        if !self.expect.is_empty() {
            self.write_backend().await?;
            self.pump().await?;
        }
        let kept = self.rollback_everywhere().await;
        self.writers.clear();
        self.doomed = false;
        let error = if std::mem::take(&mut self.doomed_by_deadlock) {
            CommitError::new(
                sqlstate::DEADLOCK_DETECTED.code(),
                "the transaction was rolled back: it was cancelled to break a distributed deadlock, and its work on other nodes is gone",
            )
        } else {
            CommitError::new(
                sqlstate::TRANSACTION_ROLLBACK.code(),
                "the transaction was rolled back: part of its work failed on one of its nodes after other nodes had done theirs, so it cannot commit as a whole",
            )
        };
        self.commit_failed(kept, error).await
    }

    /// Rolls back the open transaction on every node; the leases that are still usable.
    async fn rollback_everywhere(&mut self) -> Vec<(Option<i32>, Lease)> {
        let mut leases = std::mem::take(&mut self.parked);
        if let Some(l) = self.lease.take() {
            self.cancel.set(None);
            leases.push((self.node, l));
        }
        let mut kept = Vec::new();
        for (n, mut l) in leases {
            let c = l.conn();
            if c.status == TxnStatus::Idle || c.run_internal("ROLLBACK").await.is_ok() {
                kept.push((n, l));
            }
        }
        kept
    }

    /// Ends the router's implicit transaction on every node without committing.
    pub(super) async fn rollback_implicit(&mut self) {
        let kept = self.rollback_everywhere().await;
        self.writers.clear();
        self.status = TxnStatus::Idle;
        self.keep_leases(kept);
    }
}

/// `COMMIT PREPARED` or `ROLLBACK PREPARED` (`verb`) of `gid` on `c`. A transaction that
/// changed its role for itself is owned by that role, which the connection no longer
/// has after the PREPARE: refused with 42501, it is finished as its owner, and the
/// connection is put back into the session's `settings` at once (the same request may
/// go on with it: its role must not be the owner's).
async fn finish_prepared(
    c: &mut BackendConn,
    verb: &str,
    gid: &str,
    settings: &super::settings::Settings,
) -> Result<(), BackendError> {
    let sql = format!("{verb} PREPARED '{gid}'");
    match c.run_internal(&sql).await {
        Err(BackendError::Statement(f))
            if protocol::error_sqlstate(f.body()) == Some(b"42501".as_slice()) =>
        {
            c.settings_fp = super::settings::DIRTY_FP;
            c.run_internal(&crate::txn::as_owner_sql(gid)).await?;
            let r = c.run_internal(&sql).await;
            if c.run_internal(&settings.apply_sql()).await.is_ok() {
                c.settings_fp = settings.fingerprint();
            }
            r
        }
        r => r,
    }
}
