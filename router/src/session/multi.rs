//! Simple queries that run as several statements on several nodes, in one distributed
//! transaction (the client's, or an implicit one the router commits, with two-phase
//! commit when more than one node wrote):
//! - a write of a reference table: the same SQL on every placement; the client gets
//!   one placement's answer;
//! - a multi-row `INSERT ... VALUES` whose rows belong to different shards: one
//!   single-row INSERT per row, each planned and bound as usual, run in the rows'
//!   order (consecutive rows on one node go in one message); the client gets one
//!   answer: the first RowDescription, every row of RETURNING, and `INSERT 0 <total>`.

use super::Session;
use crate::backend::BackendError;
use crate::error::RouterError;
use crate::plan::PlanError;
use crate::protocol::{self, TxnStatus, btag};
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};

/// What the client gets of the steps' answers.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Merge {
    /// The last step's answer (every step did the same thing on another copy).
    Last,
    /// All rows of every step, one RowDescription, one summed INSERT tag.
    Insert,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// A write of a reference table: the same SQL on every placement.
    pub(super) async fn run_on_every_placement(
        &mut self,
        bound: crate::plan::Bound,
    ) -> Result<(), RouterError> {
        let mut steps = vec![(bound.group, bound.sql.clone())];
        steps.extend(bound.also.iter().map(|g| (*g, bound.sql.clone())));
        self.run_steps(steps, Merge::Last).await
    }

    /// A multi-row INSERT the tiers did not take (its rows span shards): split into
    /// single-row INSERTs when each of them can be planned. `Ok(None)`: not such an
    /// INSERT (the caller reports the original refusal).
    pub(super) fn split_insert(&self, sql: &str) -> Result<Option<Vec<(i32, String)>>, PlanError> {
        let Some(rows) = single_row_inserts(sql) else {
            return Ok(None);
        };
        let mut steps: Vec<(i32, String)> = Vec::new();
        for row in rows {
            let b = self.bind_statement(&row, &[], &[])?;
            if !b.also.is_empty() {
                return Ok(None);
            }
            match steps.last_mut() {
                // Consecutive rows on one node: one message, several statements.
                Some((g, text)) if *g == b.group => {
                    text.push_str(";\n");
                    text.push_str(&b.sql);
                }
                _ => steps.push((b.group, b.sql)),
            }
        }
        Ok(Some(steps))
    }

    /// Runs `steps` (node group, SQL) in order inside one transaction and answers the
    /// client as `merge` says.
    pub(super) async fn run_steps(
        &mut self,
        steps: Vec<(i32, String)>,
        merge: Merge,
    ) -> Result<(), RouterError> {
        let implicit = self.status == TxnStatus::Idle;
        if implicit {
            // Nodes joining get BEGIN: the session counts as in a transaction until
            // it ends here.
            self.begin_sql = None;
            self.status = TxnStatus::InTransaction;
        }
        let mut answers: Vec<BytesMut> = Vec::new();
        let mut failed = None;
        for (g, sql) in steps {
            if !self.writers.contains(&Some(g)) {
                self.writers.push(Some(g));
            }
            if let Err(e) = self.switch_to(Some(g)).await {
                failed = Some(Err(e));
                break;
            }
            if let Err(e) = self.ensure_lease().await {
                failed = Some(Err(e));
                break;
            }
            let conn = self.lease.as_mut().expect("lease").conn();
            match conn.run_capture(&sql).await {
                Ok(out) => answers.push(out),
                Err(BackendError::Statement(f)) => {
                    failed = Some(Ok(f));
                    break;
                }
                Err(e) => {
                    failed = Some(Err(e.into()));
                    break;
                }
            }
        }
        self.ctx.metrics.statements_simple.inc();
        match failed {
            None => {
                if implicit {
                    let done = if self.writers.len() > 1 {
                        self.commit_two_phase(false).await
                    } else {
                        self.commit_one_writer().await
                    };
                    match done {
                        Ok(()) => self.status = TxnStatus::Idle,
                        Err(e) => return self.refuse_request(e),
                    }
                }
                match merge {
                    Merge::Last => {
                        if let Some(a) = answers.last() {
                            self.out.extend_from_slice(a);
                        }
                    }
                    Merge::Insert => merge_inserts(&answers, &mut self.out),
                }
                protocol::encode_ready_for_query(&mut self.out, self.status);
            }
            Some(f) => {
                if implicit {
                    self.rollback_implicit().await;
                } else {
                    // The transaction lost part of its work: it can only roll back
                    // (the failed node answers until then).
                    self.status = TxnStatus::Failed;
                }
                match f {
                    Ok(frame) => self.forward_error(frame.as_ref()),
                    Err(e) => self.client_error(&e),
                }
                protocol::encode_ready_for_query(&mut self.out, self.status);
            }
        }
        self.after_request().await;
        Ok(())
    }

    /// Commits the router's implicit transaction that wrote on one node: that node
    /// commits, the others (which only got BEGIN) end too.
    async fn commit_one_writer(&mut self) -> Result<(), RouterError> {
        let w = self.writers.first().copied().flatten();
        self.switch_to(w).await?;
        let conn = self.lease.as_mut().expect("the writer's lease").conn();
        if let Err(e) = conn.run_internal("COMMIT").await {
            self.rollback_implicit().await;
            return Err(match e {
                BackendError::Statement(f) => {
                    RouterError::Commit(crate::txn::CommitError::from_backend(f.body()))
                }
                e => e.into(),
            });
        }
        self.end_parked(super::route::TxnEnd::Rollback).await;
        self.writers.clear();
        Ok(())
    }
}

/// The single-row INSERTs of a multi-row `INSERT ... VALUES` (same target, columns,
/// ON CONFLICT and RETURNING), or `None` when `sql` is not one.
fn single_row_inserts(sql: &str) -> Option<Vec<String>> {
    use sqlparser::ast::{SetExpr, Statement};
    let head = sql.trim_start().get(..6)?;
    if !head.eq_ignore_ascii_case("insert") {
        return None;
    }
    let stmts =
        sqlparser::parser::Parser::parse_sql(&sqlparser::dialect::PostgreSqlDialect {}, sql)
            .ok()?;
    let [Statement::Insert(insert)] = stmts.as_slice() else {
        return None;
    };
    let source = insert.source.as_ref()?;
    if source.with.is_some() || source.order_by.is_some() || source.limit_clause.is_some() {
        return None;
    }
    let SetExpr::Values(values) = source.body.as_ref() else {
        return None;
    };
    if values.rows.len() < 2 {
        return None;
    }
    Some(
        values
            .rows
            .iter()
            .map(|row| {
                let mut one = insert.clone();
                let mut q = source.clone();
                let mut v = values.clone();
                v.rows = vec![row.clone()];
                q.body = Box::new(SetExpr::Values(v));
                one.source = Some(q);
                Statement::Insert(one).to_string()
            })
            .collect(),
    )
}

/// Appends the merged answer of several INSERTs: the first RowDescription, every
/// DataRow and notice, and one `INSERT 0 <total>`.
fn merge_inserts(answers: &[BytesMut], out: &mut BytesMut) {
    let mut total: u64 = 0;
    let mut described = false;
    for a in answers {
        let mut rest = &a[..];
        while rest.len() >= 5 {
            let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
            let Some(frame) = rest.get(..1 + len) else {
                break;
            };
            rest = &rest[1 + len..];
            match frame[0] {
                btag::ROW_DESCRIPTION if described => {}
                btag::ROW_DESCRIPTION => {
                    described = true;
                    out.extend_from_slice(frame);
                }
                btag::COMMAND_COMPLETE => {
                    let tag =
                        std::str::from_utf8(&frame[5..frame.len().saturating_sub(1)]).unwrap_or("");
                    total += tag
                        .rsplit(' ')
                        .next()
                        .and_then(|n| n.parse::<u64>().ok())
                        .unwrap_or(0);
                }
                _ => out.extend_from_slice(frame),
            }
        }
    }
    protocol::encode_command_complete(out, &format!("INSERT 0 {total}"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_row_inserts_split_into_rows() {
        let rows = single_row_inserts(
            "INSERT INTO t (id, v) VALUES (1, 'a'), (2, 'b') ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v RETURNING id",
        )
        .unwrap();
        assert_eq!(rows.len(), 2);
        assert!(
            rows[0].contains("VALUES (1, 'a') ON CONFLICT"),
            "{}",
            rows[0]
        );
        assert!(rows[1].contains("(2, 'b')") && rows[1].ends_with("RETURNING id"));
        assert!(single_row_inserts("INSERT INTO t VALUES (1)").is_none());
        assert!(single_row_inserts("INSERT INTO t SELECT * FROM u").is_none());
        assert!(single_row_inserts("SELECT 1").is_none());
    }

    #[test]
    fn insert_answers_merge() {
        let mut a = BytesMut::new();
        protocol::encode_command_complete(&mut a, "INSERT 0 2");
        let mut b = BytesMut::new();
        protocol::encode_command_complete(&mut b, "INSERT 0 1");
        let mut out = BytesMut::new();
        merge_inserts(&[a, b], &mut out);
        let mut want = BytesMut::new();
        protocol::encode_command_complete(&mut want, "INSERT 0 3");
        assert_eq!(out, want);
    }
}
