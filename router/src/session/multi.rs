//! Statements that run as several statements on several nodes, in one distributed
//! transaction (the client's, or an implicit one the router commits, with two-phase
//! commit when more than one node wrote). Simple queries, and extended-protocol batches
//! of one statement (`[Parse] Bind [Describe] Execute Sync`), whose steps then run with
//! the client's parameters as the unnamed statement on each node, messages in the
//! client's order:
//! - a write of a reference table: the same SQL on every placement; the client gets
//!   one placement's answer;
//! - a multi-row `INSERT ... VALUES` whose rows belong to different shards: one
//!   single-row INSERT per row, each planned and bound as usual (in the extended
//!   protocol with its parameters renumbered from `$1`), run in the rows' order
//!   (simple protocol: consecutive rows on one node go in one message); the client gets one
//!   answer: the first RowDescription, every row of RETURNING, and `INSERT 0 <total>`.

use super::Session;
use crate::backend::BackendError;
use crate::error::RouterError;
use crate::plan::PlanError;
use crate::protocol::{self, TxnStatus, btag, tag};
use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};

/// What the client gets of the steps' answers.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Merge {
    /// The last step's answer (every step did the same thing on another copy).
    Last,
    /// All rows of every step, one RowDescription, one summed INSERT tag.
    Insert,
    /// All rows of every step, one RowDescription, one summed SELECT tag.
    Concat,
}

/// One statement of a multi-node run: the node (group) and the SQL.
pub(super) struct Step {
    pub group: i32,
    pub sql: String,
    /// Sent in the extended protocol with the client's parameters (else as a simple
    /// query).
    pub ext: Option<ExtStep>,
    /// Shards the step reads from copies (copied first: `pull.rs`).
    pub pulls: Vec<crate::plan::Pull>,
    /// Whether the step may write (a read is not a writer for two-phase commit,
    /// except as the one node an implicit transaction commits).
    pub writes: bool,
}

/// How a step runs in the extended protocol: the unnamed statement and portal, the
/// messages in the order the client sent its own.
#[derive(Clone)]
pub(super) struct ExtStep {
    /// The Parse's raw parameter types (count, then oids).
    pub types: Bytes,
    /// The Bind's body after the portal and statement names (formats, values, result
    /// formats).
    pub rest: Bytes,
    /// A Describe ('S' or 'P'), and whether it came before the Bind.
    pub describe: Option<(u8, bool)>,
}

impl ExtStep {
    fn encode(&self, sql: &str, out: &mut BytesMut) {
        protocol::encode_parse(out, b"", sql.as_bytes(), &self.types);
        if let Some((kind, true)) = self.describe {
            protocol::encode_target(out, tag::DESCRIBE, kind, b"");
        }
        protocol::encode_bind(out, b"", b"", &self.rest);
        if let Some((kind, false)) = self.describe {
            protocol::encode_target(out, tag::DESCRIBE, kind, b"");
        }
        protocol::encode_execute(out, b"", 0);
        protocol::encode_sync(out);
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// A write of a reference table: the same SQL on every placement.
    pub(super) async fn run_on_every_placement(
        &mut self,
        bound: crate::plan::Bound,
    ) -> Result<(), RouterError> {
        let steps = std::iter::once(bound.group)
            .chain(bound.also.iter().copied())
            .map(|group| Step {
                group,
                sql: bound.sql.clone(),
                ext: None,
                pulls: Vec::new(),
                writes: true,
            })
            .collect();
        self.run_steps(steps, Merge::Last, None).await.map(|_| ())
    }

    /// The steps of a read of every shard (`Bound::fanout`). A simple query reads all
    /// shards of one node in one message (one statement per shard); in the extended
    /// protocol each shard is a step of its own with the client's parameters (`ext`).
    pub(super) fn fanout_steps(bound: crate::plan::Bound, ext: Option<ExtStep>) -> Vec<Step> {
        let mut steps: Vec<Step> = Vec::new();
        for (group, sql) in bound.fanout {
            match (&ext, steps.iter_mut().find(|s| s.group == group)) {
                (None, Some(s)) => {
                    s.sql.push_str(";\n");
                    s.sql.push_str(&sql);
                }
                _ => steps.push(Step {
                    group,
                    sql,
                    ext: ext.clone(),
                    pulls: Vec::new(),
                    writes: false,
                }),
            }
        }
        steps
    }

    /// A multi-row INSERT the tiers did not take (its rows span shards): split into
    /// single-row INSERTs when each of them can be planned. `Ok(None)`: not such an
    /// INSERT (the caller reports the original refusal).
    pub(super) fn split_insert(&self, sql: &str) -> Result<Option<Vec<Step>>, PlanError> {
        let Some((rows, keys)) = single_row_inserts(sql) else {
            return Ok(None);
        };
        no_duplicate_keys(keys.iter().map(|k| {
            k.as_ref()?
                .iter()
                .map(|p| match p {
                    KeyPart::Literal(l) => Some(tagged(b'L', 0, 0, l.as_bytes())),
                    KeyPart::Param(_) => None,
                })
                .collect()
        }))?;
        let mut steps: Vec<Step> = Vec::new();
        for row in rows {
            let b = self.bind_statement(&row, &[], &[])?;
            if !b.also.is_empty() || !b.fanout.is_empty() {
                return Ok(None);
            }
            match steps.last_mut() {
                // Consecutive rows on one node: one message, several statements.
                Some(s) if s.group == b.group => {
                    s.sql.push_str(";\n");
                    s.sql.push_str(&b.sql);
                }
                _ => steps.push(Step {
                    group: b.group,
                    sql: b.sql,
                    ext: None,
                    pulls: Vec::new(),
                    writes: true,
                }),
            }
        }
        Ok(Some(steps))
    }

    /// The steps of a multi-row INSERT with parameters (extended protocol) whose rows
    /// span shards: one single-row INSERT per row, its parameters renumbered from `$1`
    /// and bound with just their values. `Ok(None)`: not such an INSERT.
    pub(super) fn split_insert_ext(
        &self,
        sql: &str,
        types: &[u8],
        rest: &[u8],
        describe: Option<(u8, bool)>,
    ) -> Result<Option<Vec<Step>>, PlanError> {
        let Some((rows, keys)) = single_row_inserts(sql) else {
            return Ok(None);
        };
        let bad = || PlanError::InvalidValue("malformed Bind message".into());
        let oids = super::route::param_oids(types);
        let bind = super::route::BindParts::parse(rest).ok_or_else(bad)?;
        // A parameter's value (in its format) stands for itself; a NULL one is no key.
        let format = |n: usize| match bind.formats.as_slice() {
            [] => 0,
            [f] => *f,
            all => all.get(n).copied().unwrap_or(0),
        };
        no_duplicate_keys(keys.iter().map(|k| {
            k.as_ref()?
                .iter()
                .map(|p| match p {
                    KeyPart::Literal(l) => Some(tagged(b'L', 0, 0, l.as_bytes())),
                    KeyPart::Param(n) => Some(tagged(
                        b'P',
                        oids.get(*n).copied().unwrap_or(0),
                        format(*n),
                        bind.values.get(*n).copied().flatten()?,
                    )),
                })
                .collect()
        }))?;
        let mut steps = Vec::with_capacity(rows.len());
        for row in rows {
            let (text, used) = renumber_params(&row);
            if used.iter().any(|n| *n >= bind.values.len()) {
                return Err(PlanError::InvalidValue(format!(
                    "bind message supplies {} parameters, but the statement uses more",
                    bind.values.len()
                )));
            }
            let row_oids: Vec<u32> = used
                .iter()
                .map(|n| oids.get(*n).copied().unwrap_or(0))
                .collect();
            let row_types = encode_types(&row_oids);
            let row_rest = bind.subset(&used);
            let params = super::route::bind_params(&row_rest, &row_oids).map_err(|_| bad())?;
            let b = self.bind_statement(&text, &row_oids, &params)?;
            if !b.also.is_empty() || !b.fanout.is_empty() {
                return Ok(None);
            }
            steps.push(Step {
                group: b.group,
                sql: b.sql,
                ext: Some(ExtStep {
                    types: row_types,
                    rest: row_rest,
                    describe,
                }),
                pulls: Vec::new(),
                writes: true,
            });
        }
        Ok(Some(steps))
    }

    /// Runs an extended batch of one statement on its nodes (the client's Parse, if
    /// any, declares the statement as a routed Parse does).
    pub(super) async fn run_multi_batch(
        &mut self,
        m: super::route::MultiBatch,
    ) -> Result<(), RouterError> {
        let parsed = m.parse.is_some();
        let accepted = self.run_steps(m.steps, m.merge, Some(parsed)).await?;
        if let Some((name, query, types)) = m.parse
            && accepted
        {
            // Declared as Postgres would have: once its Parse was accepted.
            if name.is_empty() {
                self.unnamed = Some((query, types));
            } else {
                let prep = self
                    .ctx
                    .prepared
                    .intern_in(&query, &types, self.client_epoch());
                self.stmts.insert(name, prep);
            }
        }
        Ok(())
    }

    /// Runs `steps` in order inside one transaction and answers the client as `merge`
    /// says. `ext`: the steps answer an extended-protocol batch, and whether the
    /// client's batch had a Parse (else the steps' own ParseComplete is not passed on).
    /// `Ok(true)` when the statement's Parse was accepted (a step ran, or the failing
    /// one got past its Parse).
    pub(super) async fn run_steps(
        &mut self,
        steps: Vec<Step>,
        merge: Merge,
        ext: Option<bool>,
    ) -> Result<bool, RouterError> {
        let implicit = self.status == TxnStatus::Idle;
        if implicit {
            // Nodes joining get BEGIN: the session counts as in a transaction until
            // it ends here. A read of every shard reads each node's shards in one
            // snapshot (REPEATABLE READ), as one statement on one Postgres would; the
            // nodes' snapshots are still taken one after the other.
            self.begin_sql =
                (merge == Merge::Concat).then(|| "BEGIN ISOLATION LEVEL REPEATABLE READ".into());
            self.status = TxnStatus::InTransaction;
        }
        let mut answers: Vec<BytesMut> = Vec::new();
        // A read of every shard goes to the client as it arrives (`stream_step`).
        let parsed = ext.unwrap_or(true);
        let mut streamed = (merge == Merge::Concat).then(Streamed::default);
        // Whether a step that completed may have written.
        let mut wrote = false;
        let mut failed = None;
        let mut message = BytesMut::new();
        for step in steps {
            let mut sql = step.sql;
            if !step.pulls.is_empty() {
                match self.fetch_pulls(&step.pulls).await {
                    Ok(ctes) => {
                        self.ctx.metrics.pulled_shards.inc_by(ctes.len() as u64);
                        sql = crate::plan::with_pulled(&sql, &ctes);
                    }
                    Err(super::pull::PullFailure::Node(f)) => {
                        failed = Some(Ok((BytesMut::new(), f)));
                        break;
                    }
                    Err(super::pull::PullFailure::Refused(e)) => {
                        failed = Some(Err(RouterError::Plan(e)));
                        break;
                    }
                    Err(super::pull::PullFailure::Router(e)) => {
                        failed = Some(Err(e));
                        break;
                    }
                }
            }
            if (step.writes || (implicit && self.writers.is_empty()))
                && !self.writers.contains(&Some(step.group))
            {
                self.writers.push(Some(step.group));
            }
            if let Err(e) = self.switch_to(Some(step.group)).await {
                failed = Some(Err(e));
                break;
            }
            if let Err(e) = self.ensure_lease().await {
                failed = Some(Err(e));
                break;
            }
            message.clear();
            // (A node joining gets the session's settings before its BEGIN: `join`.)
            let conn = self.lease.as_mut().expect("lease").conn();
            match &step.ext {
                None => protocol::encode_simple_query(&mut message, &sql),
                Some(x) => x.encode(&sql, &mut message),
            }
            let answer = match streamed.as_mut() {
                Some(st) => {
                    stream_step(conn, &message, parsed, st, &mut self.out, &mut self.client).await?
                }
                None => conn.run_capture_raw(&message).await,
            };
            match answer {
                Ok((out, None)) => {
                    wrote |= step.writes;
                    answers.push(out)
                }
                Ok((out, Some(f))) => {
                    failed = Some(Ok((out, f)));
                    break;
                }
                Err(e) => {
                    failed = Some(Err(e.into()));
                    break;
                }
            }
        }
        if !implicit && let Some(Err(RouterError::Plan(e))) = &failed {
            // A refusal of the router's inside the client's transaction: the current
            // node raises it, so the transaction is aborted there as Postgres would
            // abort it (later statements get 25P02 until ROLLBACK).
            let u = crate::error::plan_facing(e);
            let code = u.raw_code.unwrap_or_else(|| u.code.code().to_owned());
            let mut m = BytesMut::new();
            protocol::encode_simple_query(&mut m, &super::raise_sql(&code, &u.message));
            if self.ensure_lease().await.is_ok()
                && let Some(l) = self.lease.as_mut()
                && let Ok((_, Some(f))) = l.conn().run_capture_raw(&m).await
            {
                failed = Some(Ok((BytesMut::new(), f)));
            }
        }
        match ext {
            None => self.ctx.metrics.statements_simple.inc(),
            Some(_) => self.ctx.metrics.statements_extended.inc(),
        }
        let accepted = match &failed {
            None => true,
            Some(Ok((before, _))) => {
                !answers.is_empty()
                    || frames(before).any(|f| f[0] == btag::PARSE_COMPLETE)
                    || streamed
                        .as_ref()
                        .is_some_and(|s| s.seen.contains(&btag::PARSE_COMPLETE))
            }
            Some(Err(_)) => !answers.is_empty(),
        };
        match failed {
            None => {
                if implicit {
                    let done = if self.writers.len() > 1 {
                        self.commit_two_phase(false).await
                    } else {
                        self.commit_one_writer().await
                    };
                    self.begin_sql = None;
                    match done {
                        Ok(()) => self.status = TxnStatus::Idle,
                        Err(e) => return self.refuse_request(e).map(|()| accepted),
                    }
                }
                match merge {
                    Merge::Last => {
                        if let Some(a) = answers.last() {
                            pass_on(a, parsed, false, &mut self.out);
                        }
                    }
                    Merge::Insert => merge_rows(&answers, parsed, "INSERT 0", &mut self.out),
                    Merge::Concat => {
                        let total = streamed.as_ref().map_or(0, |s| s.rows);
                        protocol::encode_command_complete(
                            &mut self.out,
                            &format!("SELECT {total}"),
                        );
                    }
                }
                protocol::encode_ready_for_query(&mut self.out, self.status);
            }
            Some(f) => {
                if implicit {
                    self.rollback_implicit().await;
                } else {
                    // The transaction lost part of its work: it can only roll back
                    // (the failed node answers until then). Doomed too: a ROLLBACK TO
                    // SAVEPOINT on the failed node must not let a COMMIT keep the
                    // steps that ran on the other nodes.
                    self.status = TxnStatus::Failed;
                    // Unless no step that ran before wrote (reads of other shards
                    // leave nothing behind) and the failure is the statement's own on
                    // its node (which ROLLBACK TO undoes there, as on one Postgres).
                    if wrote || f.is_err() {
                        self.doomed = true;
                    }
                }
                match f {
                    Ok((before, frame)) => {
                        if let Some(parsed) = ext {
                            // What the failing step answered before its error
                            // (ParseComplete, BindComplete, descriptions).
                            pass_on(&before, parsed, true, &mut self.out);
                        }
                        self.forward_error(frame.as_ref())
                    }
                    Err(e) => self.client_error(&e),
                }
                protocol::encode_ready_for_query(&mut self.out, self.status);
            }
        }
        if implicit {
            // The next transaction's nodes begin as its BEGIN says.
            self.begin_sql = None;
        }
        self.after_request().await;
        Ok(accepted)
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
/// A column of an upsert's conflict target, in one row of its VALUES.
#[derive(Debug, PartialEq, Eq)]
enum KeyPart {
    /// A constant, as written.
    Literal(String),
    /// `$n`: parameter `n - 1`.
    Param(usize),
}

/// Postgres fails an `INSERT ... ON CONFLICT DO UPDATE` two of whose rows have the
/// same key (21000) rather than update a row twice; split into single-row INSERTs,
/// the second would update the first's row. `keys`: each row's key (`None`: not
/// known, or NULL, which conflicts with nothing). Keys written the same are equal; a
/// duplicate written differently (`1` and `'1'`) is not seen. (A BEFORE INSERT
/// trigger that changes the key could make two rows that look the same differ: such
/// a statement gets 21000 through the router.)
fn no_duplicate_keys(keys: impl Iterator<Item = Option<Vec<Vec<u8>>>>) -> Result<(), PlanError> {
    let mut seen = std::collections::HashSet::new();
    for key in keys.flatten() {
        if !seen.insert(key) {
            return Err(PlanError::Cardinality(
                "ON CONFLICT DO UPDATE command cannot affect row a second time".into(),
            ));
        }
    }
    Ok(())
}

/// A key column's value for comparison: what it is (`L`iteral, `P`arameter), its
/// declared type and format, its bytes.
fn tagged(kind: u8, oid: u32, format: u16, bytes: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(7 + bytes.len());
    v.push(kind);
    v.extend_from_slice(&oid.to_be_bytes());
    v.extend_from_slice(&format.to_be_bytes());
    v.extend_from_slice(bytes);
    v
}

/// The conflict key of each row of `INSERT INTO t (cols) VALUES ... ON CONFLICT
/// (keys) DO UPDATE`: constants and parameters in the key columns; `None` for a row
/// whose key is another expression or has a NULL. Empty for any other INSERT (no
/// column list, `ON CONSTRAINT`, DO NOTHING).
fn upsert_keys(insert: &sqlparser::ast::Insert, rows: &[Vec<sqlparser::ast::Expr>]) -> RowKeys {
    use sqlparser::ast::{
        ConflictTarget, DoUpdate, Expr, Ident, OnConflict, OnConflictAction, OnInsert,
        UnaryOperator, Value,
    };
    // With a WHERE, a second row whose update the WHERE skips is not an error.
    let Some(OnInsert::OnConflict(OnConflict {
        conflict_target: Some(ConflictTarget::Columns(target)),
        action: OnConflictAction::DoUpdate(DoUpdate {
            selection: None, ..
        }),
    })) = &insert.on
    else {
        return Vec::new();
    };
    let fold = |i: &Ident| match i.quote_style {
        Some(_) => i.value.clone(),
        None => i.value.to_lowercase(),
    };
    let Some(at): Option<Vec<usize>> = target
        .iter()
        .map(|t| insert.columns.iter().position(|c| fold(c) == fold(t)))
        .collect()
    else {
        return Vec::new();
    };
    fn part(e: &Expr) -> Option<KeyPart> {
        match e {
            Expr::Value(v) => match &v.value {
                Value::Null => None,
                Value::Placeholder(p) => {
                    let n: usize = p.strip_prefix('$')?.parse().ok()?;
                    Some(KeyPart::Param(n.checked_sub(1)?))
                }
                _ => Some(KeyPart::Literal(e.to_string())),
            },
            Expr::Cast { expr, .. } => match part(expr)? {
                KeyPart::Literal(_) => Some(KeyPart::Literal(e.to_string())),
                KeyPart::Param(_) => None,
            },
            Expr::UnaryOp {
                op: UnaryOperator::Minus | UnaryOperator::Plus,
                expr,
            } if matches!(part(expr)?, KeyPart::Literal(_)) => {
                Some(KeyPart::Literal(e.to_string()))
            }
            Expr::Nested(inner) => part(inner),
            _ => None,
        }
    }
    rows.iter()
        .map(|row| at.iter().map(|&i| part(row.get(i)?)).collect())
        .collect()
}

/// Each row's conflict key (see `upsert_keys`).
type RowKeys = Vec<Option<Vec<KeyPart>>>;

fn single_row_inserts(sql: &str) -> Option<(Vec<String>, RowKeys)> {
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
    let keys = upsert_keys(insert, &values.rows);
    let rows = values
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
        .collect();
    Some((rows, keys))
}

/// What the merged answer of several steps has passed on so far.
#[derive(Default)]
struct Streamed {
    /// Kinds of the description messages passed on (the first step's alone).
    seen: Vec<u8>,
    /// Rows counted from the steps' CommandCompletes.
    rows: u64,
}

impl Streamed {
    /// One frame of a step's answer (not an error or ReadyForQuery): the first
    /// description of each kind goes on (a ParseComplete only when the client sent a
    /// Parse: `parsed`), rows and notices all do, CommandCompletes are counted.
    fn merge(&mut self, frame: &[u8], parsed: bool, out: &mut BytesMut) {
        match frame[0] {
            btag::PARSE_COMPLETE if !parsed => {}
            t @ (btag::PARSE_COMPLETE
            | btag::BIND_COMPLETE
            | btag::PARAMETER_DESCRIPTION
            | btag::ROW_DESCRIPTION
            | btag::NO_DATA) => {
                if !self.seen.contains(&t) {
                    self.seen.push(t);
                    out.extend_from_slice(frame);
                }
            }
            btag::COMMAND_COMPLETE => {
                let tag =
                    std::str::from_utf8(&frame[5..frame.len().saturating_sub(1)]).unwrap_or("");
                self.rows += tag
                    .rsplit(' ')
                    .next()
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0);
            }
            _ => out.extend_from_slice(frame),
        }
    }
}

/// Client bytes gathered before they are written while a read streams.
const STREAM_FLUSH: usize = 64 * 1024;

/// Runs one step of a read of every shard, passing its answer on to the client as it
/// arrives: the router holds at most [`STREAM_FLUSH`] bytes of it, not the whole
/// result (a read of a large table would otherwise sit in the router's memory), merged
/// as [`Streamed::merge`] says; the caller sends the one CommandComplete. Answers like
/// `run_capture_raw` (the error apart; what came before it was passed on already),
/// except that a client that cannot be written to ends the session (`Err`).
async fn stream_step<W: AsyncWrite + Unpin>(
    conn: &mut crate::backend::BackendConn,
    message: &[u8],
    parsed: bool,
    st: &mut Streamed,
    out: &mut BytesMut,
    client: &mut W,
) -> Result<Result<(BytesMut, Option<protocol::Frame>), BackendError>, RouterError> {
    use tokio::io::AsyncWriteExt;
    if let Err(e) = conn.write_all(message).await {
        return Ok(Err(e));
    }
    let mut failed = None;
    loop {
        let f = match conn.next_answer(&mut failed).await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return Ok(Err(e)),
        };
        st.merge(&f.raw, parsed, out);
        if out.len() >= STREAM_FLUSH {
            client.write_all(out).await.map_err(RouterError::ClientIo)?;
            out.clear();
        }
    }
    if !out.is_empty() {
        // The step's rows reach the client before the next node is asked.
        client.write_all(out).await.map_err(RouterError::ClientIo)?;
        client.flush().await.map_err(RouterError::ClientIo)?;
        out.clear();
    }
    Ok(Ok((BytesMut::new(), failed)))
}

/// The frames of a captured answer, raw.
pub(super) fn frames(answer: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = answer;
    std::iter::from_fn(move || {
        if rest.len() < 5 {
            return None;
        }
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let frame = rest.get(..1 + len)?;
        rest = &rest[1 + len..];
        Some(frame)
    })
}

/// Appends one step's answer: without its ParseComplete when the client sent no Parse
/// (`parsed` false); with `head_only`, only what comes before the rows (ParseComplete,
/// BindComplete, descriptions).
fn pass_on(answer: &[u8], parsed: bool, head_only: bool, out: &mut BytesMut) {
    for f in frames(answer) {
        match f[0] {
            btag::PARSE_COMPLETE if !parsed => {}
            btag::PARSE_COMPLETE
            | btag::BIND_COMPLETE
            | btag::PARAMETER_DESCRIPTION
            | btag::ROW_DESCRIPTION
            | btag::NO_DATA => out.extend_from_slice(f),
            _ if head_only => {}
            _ => out.extend_from_slice(f),
        }
    }
}

/// Appends the merged answer of several INSERTs or reads: the first step's
/// ParseComplete (when the client sent a Parse), BindComplete and description, every
/// DataRow and notice, and one `<verb> <total>` (`INSERT 0 7`, `SELECT 7`).
fn merge_rows(answers: &[BytesMut], parsed: bool, verb: &str, out: &mut BytesMut) {
    let mut st = Streamed::default();
    for a in answers {
        for frame in frames(a) {
            st.merge(frame, parsed, out);
        }
    }
    protocol::encode_command_complete(out, &format!("{verb} {}", st.rows));
}

/// Raw Parse parameter types: count, then oids.
pub(super) fn encode_types(oids: &[u32]) -> Bytes {
    let mut out = BytesMut::with_capacity(2 + 4 * oids.len());
    out.put_u16(oids.len() as u16);
    for o in oids {
        out.put_u32(*o);
    }
    out.freeze()
}

/// `sql` with its `$n` parameters renumbered `$1`, `$2`... in order of first use, and
/// the original (0-based) index of each.
fn renumber_params(sql: &str) -> (String, Vec<usize>) {
    use crate::plan::normalize::{Tok, tokens};
    let mut used: Vec<usize> = Vec::new();
    let mut out = String::with_capacity(sql.len());
    for (kind, s, e) in tokens(sql) {
        let tok = &sql[s..e];
        let param = match kind {
            Tok::Param => tok[1..].parse::<usize>().ok().filter(|n| *n >= 1),
            _ => None,
        };
        match param {
            Some(n) => {
                let i = match used.iter().position(|u| *u == n - 1) {
                    Some(i) => i,
                    None => {
                        used.push(n - 1);
                        used.len() - 1
                    }
                };
                out.push('$');
                out.push_str(&(i + 1).to_string());
            }
            _ => out.push_str(tok),
        }
    }
    (out, used)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_row_inserts_split_into_rows() {
        let (rows, keys) = single_row_inserts(
            "INSERT INTO t (id, v) VALUES (1, 'a'), (2, 'b') ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v RETURNING id",
        )
        .unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(
            keys,
            vec![
                Some(vec![KeyPart::Literal("1".into())]),
                Some(vec![KeyPart::Literal("2".into())])
            ]
        );
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
    fn upsert_keys_are_the_conflict_columns() {
        let keys = |sql: &str| single_row_inserts(sql).unwrap().1;
        assert_eq!(
            keys(
                "INSERT INTO t (V, \"Id\", k) VALUES ('a', $2, -1::int), ('b', NULL, 2), ('c', now(), 2) ON CONFLICT (\"Id\", K) DO UPDATE SET v = 'x'"
            ),
            vec![
                Some(vec![KeyPart::Param(1), KeyPart::Literal("-1::INT".into())]),
                None,
                None
            ]
        );
        // Nothing to compare: DO NOTHING (Postgres skips the second row too), ON
        // CONSTRAINT, no column list.
        for sql in [
            "INSERT INTO t (id) VALUES (1), (1) ON CONFLICT (id) DO NOTHING",
            "INSERT INTO t (id) VALUES (1), (1) ON CONFLICT (id) DO UPDATE SET v = 1 WHERE t.v < 0",
            "INSERT INTO t (id) VALUES (1), (1) ON CONFLICT ON CONSTRAINT t_pkey DO UPDATE SET id = 2",
            "INSERT INTO t VALUES (1), (1) ON CONFLICT (id) DO UPDATE SET id = 2",
            "INSERT INTO t (id) VALUES (1), (1)",
        ] {
            assert!(keys(sql).is_empty(), "{sql}");
        }
        let k = |v: &[&str]| Some(v.iter().map(|s| s.as_bytes().to_vec()).collect());
        assert!(
            no_duplicate_keys([k(&["1", "a"]), None, k(&["1", "b"]), None].into_iter()).is_ok()
        );
        assert!(matches!(
            no_duplicate_keys([k(&["1", "a"]), k(&["2"]), k(&["1", "a"])].into_iter()),
            Err(PlanError::Cardinality(_))
        ));
    }

    #[test]
    fn parameters_renumber_in_order_of_use() {
        let (text, used) =
            renumber_params("INSERT INTO t (id, имя) VALUES ($3, '$1', $5, $3) -- $4");
        assert_eq!(
            text,
            "INSERT INTO t (id, имя) VALUES ($1, '$1', $2, $1) -- $4"
        );
        assert_eq!(used, vec![2, 4]);
        // A Bind body: 2 format codes, 3 values (one NULL), 1 result format.
        let mut rest = BytesMut::new();
        rest.put_u16(3);
        rest.put_u16(0);
        rest.put_u16(1);
        rest.put_u16(0);
        rest.put_u16(3);
        rest.put_i32(1);
        rest.put_slice(b"a");
        rest.put_i32(-1);
        rest.put_i32(2);
        rest.put_slice(b"cc");
        rest.put_u16(1);
        rest.put_u16(1);
        let parts = super::super::route::BindParts::parse(&rest).unwrap();
        let sub = parts.subset(&[2, 1]);
        let mut want = BytesMut::new();
        want.put_u16(2);
        want.put_u16(0);
        want.put_u16(1);
        want.put_u16(2);
        want.put_i32(2);
        want.put_slice(b"cc");
        want.put_i32(-1);
        want.put_u16(1);
        want.put_u16(1);
        assert_eq!(&sub[..], &want[..]);
        assert!(super::super::route::BindParts::parse(&rest[..rest.len() - 9]).is_none());
    }

    #[test]
    fn insert_answers_merge() {
        let mut a = BytesMut::new();
        protocol::encode_command_complete(&mut a, "INSERT 0 2");
        let mut b = BytesMut::new();
        protocol::encode_command_complete(&mut b, "INSERT 0 1");
        let mut out = BytesMut::new();
        merge_rows(&[a, b], true, "INSERT 0", &mut out);
        let mut want = BytesMut::new();
        protocol::encode_command_complete(&mut want, "INSERT 0 3");
        assert_eq!(out, want);
    }
}
