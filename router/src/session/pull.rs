//! Reads whose shards no one node holds (a join of tables of different colocation
//! groups whose chosen shards are on different workers): each shard that is not on
//! the node running the statement is copied from its node first, as rows written
//! into the statement (a WITH clause of VALUES, typed as the shard's columns), as
//! Citus's recursive planning ships a subquery's result. Only small shards are
//! copied ([`PULL_MAX_ROWS`], [`PULL_MAX_BYTES`]); a larger one refuses the statement.
//!
//! The copy is read on the session's own connection to that node, with the session's
//! settings, so that a transaction sees its own writes there and the values' text
//! (dates, floats) reads back the same on the node running the statement. Outside a
//! transaction the copy and the statement are two snapshots, as with Citus.

use super::Session;
use crate::error::RouterError;
use crate::plan::{PULL_MAX_BYTES, PULL_MAX_ROWS, PlanError, Pull};
use crate::protocol::{self, TxnStatus, btag};
use tokio::io::{AsyncRead, AsyncWrite};

/// Why copying a shard failed.
pub(super) enum PullFailure {
    /// The router refuses (too large, a shard without columns).
    Refused(PlanError),
    /// The node answered with an error (the frame, raw).
    Node(crate::protocol::Frame),
    /// No connection to the node, or it broke.
    Router(RouterError),
}

impl From<RouterError> for PullFailure {
    fn from(e: RouterError) -> Self {
        PullFailure::Router(e)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// Runs a routed simple query that reads copies of shards of other nodes.
    pub(super) async fn run_pulled(
        &mut self,
        bound: crate::plan::Bound,
    ) -> Result<(), RouterError> {
        let ctes = match self.fetch_pulls(&bound.pulls).await {
            Ok(c) => c,
            Err(PullFailure::Refused(e)) => {
                self.refuse_in_session(RouterError::Plan(e)).await?;
                self.after_request().await;
                return Ok(());
            }
            Err(PullFailure::Node(f)) => {
                // Only a read failed: the node's part of a transaction is aborted
                // (it answers 25P02 until ROLLBACK or ROLLBACK TO), and nothing
                // written elsewhere is lost.
                if self.status != TxnStatus::Idle {
                    self.status = TxnStatus::Failed;
                }
                self.forward_error(f.as_ref());
                protocol::encode_ready_for_query(&mut self.out, self.status);
                self.after_request().await;
                return Ok(());
            }
            Err(PullFailure::Router(RouterError::Backend(e))) => return self.backend_lost(e),
            Err(PullFailure::Router(e)) => {
                let in_txn = self.status != TxnStatus::Idle;
                if in_txn && e.user_facing().is_some() && self.lease.is_some() {
                    self.refuse_in_session(e).await?;
                } else {
                    self.refuse_request(e)?;
                }
                self.after_request().await;
                return Ok(());
            }
        };
        self.ctx.metrics.pulled_shards.inc_by(ctes.len() as u64);
        let sql = crate::plan::with_pulled(&bound.sql, &ctes);
        if let Err(e) = self.switch_to_lazy(Some(bound.group)).await {
            return self.refuse_request(e);
        }
        self.send_simple_here(&sql).await
    }

    /// Copies each pulled shard from its node: (name, query giving its rows).
    pub(super) async fn fetch_pulls(
        &mut self,
        pulls: &[Pull],
    ) -> Result<Vec<(String, String)>, PullFailure> {
        let mut ctes = Vec::with_capacity(pulls.len());
        let mut total = 0usize;
        for p in pulls {
            self.switch_to(Some(p.group)).await?;
            self.ensure_lease().await?;
            let fp = self.settings.fingerprint();
            let apply = self.settings.apply_sql();
            let conn = self.lease.as_mut().expect("lease just acquired").conn();
            if !self.settings.applied(conn.settings_fp) {
                conn.run_internal(&apply).await.map_err(RouterError::from)?;
                conn.settings_fp = fp;
            }
            let encoding = conn
                .reported
                .iter()
                .find(|(n, _)| n == "client_encoding")
                .map(|(_, v)| v.as_str());
            if !encoding.is_some_and(|e| e.eq_ignore_ascii_case("UTF8")) {
                return Err(PullFailure::Refused(PlanError::NotSupported(format!(
                    "the statement joins tables that are not colocated and whose shards are on different nodes; copying shard {} of {} to the node running it needs client_encoding UTF8 (the session uses {})",
                    p.shard,
                    p.table,
                    encoding.unwrap_or("an unknown encoding")
                ))));
            }
            // Values are copied as text in formats every input style reads back the
            // same (ISO dates, postgres-style intervals, exact floats); the session's
            // own settings come back afterwards (the connection counts as changed
            // until they do).
            let before = conn.settings_fp;
            conn.settings_fp = super::settings::DIRTY_FP;
            let saved = capture_rows(
                conn,
                "SELECT pg_catalog.current_setting('DateStyle'), pg_catalog.current_setting('IntervalStyle'), \
                 pg_catalog.current_setting('extra_float_digits'), \
                 pg_catalog.set_config('DateStyle', 'ISO', false), \
                 pg_catalog.set_config('IntervalStyle', 'postgres', false), \
                 pg_catalog.set_config('extra_float_digits', '3', false)",
            )
            .await?;
            let restore = match saved.first().map(Vec::as_slice) {
                Some([Some(d), Some(i), Some(f), ..]) => format!(
                    "SELECT pg_catalog.set_config('DateStyle', {}, false), pg_catalog.set_config('IntervalStyle', {}, false), pg_catalog.set_config('extra_float_digits', {}, false)",
                    quote_literal(d),
                    quote_literal(i),
                    quote_literal(f)
                ),
                _ => return Err(unexpected(p)),
            };
            let columns = capture_rows(
                conn,
                &format!(
                    "SELECT pg_catalog.quote_ident(a.attname), pg_catalog.format_type(a.atttypid, a.atttypmod), \
                     CASE WHEN a.attcollation <> t.typcollation AND a.attcollation <> 0 \
                     THEN pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(c.collname) END \
                     FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t ON t.oid = a.atttypid \
                     LEFT JOIN pg_catalog.pg_collation c ON c.oid = a.attcollation \
                     LEFT JOIN pg_catalog.pg_namespace n ON n.oid = c.collnamespace \
                     WHERE a.attrelid = {}::pg_catalog.regclass AND a.attnum > 0 AND NOT a.attisdropped \
                     ORDER BY a.attnum",
                    quote_literal(&p.shard)
                ),
            )
            .await?;
            let columns: Vec<Column> = columns
                .into_iter()
                .filter_map(|mut r| {
                    let collation = r.pop()?;
                    let ty = r.pop()??;
                    let name = r.pop()??;
                    Some(Column {
                        name,
                        ty,
                        collation,
                    })
                })
                .collect();
            if columns.is_empty() {
                return Err(PullFailure::Refused(PlanError::NotSupported(format!(
                    "shard {} of {} has no columns to copy",
                    p.shard, p.table
                ))));
            }
            let too_large = || {
                PullFailure::Refused(PlanError::NotSupported(format!(
                    "the statement joins tables that are not colocated and whose shards are on different nodes; shard {} of {} would be copied to the node running it, and it holds more than {} rows or {} MiB (running such statements on large shards is not supported yet)",
                    p.shard,
                    p.table,
                    PULL_MAX_ROWS,
                    PULL_MAX_BYTES >> 20
                )))
            };
            let limited = format!("(SELECT * FROM {} LIMIT {}) s", p.shard, PULL_MAX_ROWS + 1);
            // The size first, so that a large shard is refused before it is read out.
            let size = capture_rows(
                conn,
                &format!(
                    "SELECT pg_catalog.count(*), pg_catalog.sum(pg_catalog.pg_column_size(s.*)) FROM {limited}"
                ),
            )
            .await?;
            let (rows, bytes) = match size.first().map(Vec::as_slice) {
                Some([Some(n), b]) => (
                    n.parse::<i64>().unwrap_or(i64::MAX),
                    b.as_deref()
                        .map_or(0, |b| b.parse::<u64>().unwrap_or(u64::MAX)),
                ),
                _ => return Err(unexpected(p)),
            };
            if rows > PULL_MAX_ROWS || bytes.saturating_add(total as u64) > PULL_MAX_BYTES as u64 {
                return Err(too_large());
            }
            // Each value by its type's output function (`%L`: NULL as NULL).
            let row = columns
                .iter()
                .map(|c| format!("pg_catalog.format('%L', s.{})", c.name))
                .collect::<Vec<_>>()
                .join(" || ',' || ");
            let data = capture_rows(
                conn,
                &format!(
                    "SELECT pg_catalog.count(*), pg_catalog.string_agg('(true,' || {row} || ')', ',') FROM {limited}"
                ),
            )
            .await?;
            let (count, values) = match data.into_iter().next().as_deref() {
                Some([Some(n), v]) => (n.parse::<i64>().unwrap_or(i64::MAX), v.clone()),
                _ => return Err(unexpected(p)),
            };
            capture_rows(conn, &restore).await?;
            conn.settings_fp = before;
            total += values.as_ref().map_or(0, String::len);
            if count > PULL_MAX_ROWS || total > PULL_MAX_BYTES {
                return Err(too_large());
            }
            ctes.push((p.name.clone(), copy_query(&columns, values.as_deref())));
        }
        Ok(ctes)
    }
}

/// A column of a copied shard, as SQL text: quoted name, type, collation when it is
/// not the type's own.
struct Column {
    name: String,
    ty: String,
    collation: Option<String>,
}

fn unexpected(p: &Pull) -> PullFailure {
    PullFailure::Router(RouterError::Plan(PlanError::NoPlacement(format!(
        "copying shard {} of {}: unexpected answer from its node",
        p.shard, p.table
    ))))
}

/// The query giving a copied shard's rows: VALUES of text (a first row of NULLs,
/// dropped by its marker column, keeps an empty shard valid), each value cast to its
/// column's type and collation after the marker filter (a NOT NULL domain never sees
/// the NULL row; `char(n)` is padded again).
fn copy_query(columns: &[Column], values: Option<&str>) -> String {
    let names: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
    let casts: Vec<String> = columns
        .iter()
        .map(|c| {
            let mut e = format!("CAST(sg_pulled.{} AS {})", c.name, c.ty);
            if let Some(coll) = &c.collation {
                e.push_str(" COLLATE ");
                e.push_str(coll);
            }
            e.push_str(" AS ");
            e.push_str(&c.name);
            e
        })
        .collect();
    let nulls = vec!["NULL"; columns.len()];
    let mut q = format!(
        "SELECT {} FROM (VALUES (false, {})",
        casts.join(", "),
        nulls.join(", ")
    );
    if let Some(v) = values {
        q.push_str(", ");
        q.push_str(v);
    }
    q.push_str(&format!(
        ") AS sg_pulled(\"?keep\", {}) WHERE sg_pulled.\"?keep\"",
        names.join(", ")
    ));
    q
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Runs a query of the router's own and returns its rows as text (NULL as `None`).
async fn capture_rows(
    conn: &mut crate::backend::BackendConn,
    sql: &str,
) -> Result<Vec<Vec<Option<String>>>, PullFailure> {
    let mut out = bytes::BytesMut::new();
    protocol::encode_simple_query(&mut out, sql);
    let (answer, failed) = conn
        .run_capture_raw(&out)
        .await
        .map_err(|e| PullFailure::Router(e.into()))?;
    if let Some(f) = failed {
        return Err(PullFailure::Node(f));
    }
    let mut rows = Vec::new();
    for f in super::multi::frames(&answer) {
        if f[0] != btag::DATA_ROW {
            continue;
        }
        rows.push(data_row(&f[5..]).ok_or_else(|| {
            PullFailure::Router(RouterError::Plan(PlanError::NoPlacement(
                "a node sent a malformed row".into(),
            )))
        })?);
    }
    Ok(rows)
}

/// The values of a DataRow's body.
fn data_row(body: &[u8]) -> Option<Vec<Option<String>>> {
    let n = u16::from_be_bytes([*body.first()?, *body.get(1)?]) as usize;
    let mut at = 2;
    let mut values = Vec::with_capacity(n);
    for _ in 0..n {
        let len = i32::from_be_bytes(body.get(at..at + 4)?.try_into().ok()?);
        at += 4;
        if len < 0 {
            values.push(None);
            continue;
        }
        let v = body.get(at..at + len as usize)?;
        at += len as usize;
        values.push(Some(String::from_utf8_lossy(v).into_owned()));
    }
    Some(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_is_cast_after_its_marker_filter() {
        let cols = vec![
            Column {
                name: "id".into(),
                ty: "bigint".into(),
                collation: None,
            },
            Column {
                name: "\"Name\"".into(),
                ty: "character(5)".into(),
                collation: Some("pg_catalog.\"C\"".into()),
            },
        ];
        assert_eq!(
            copy_query(&cols, Some("(true,'1','a'),(true,NULL,NULL)")),
            "SELECT CAST(sg_pulled.id AS bigint) AS id, CAST(sg_pulled.\"Name\" AS character(5)) COLLATE pg_catalog.\"C\" AS \"Name\" FROM (VALUES (false, NULL, NULL), (true,'1','a'),(true,NULL,NULL)) AS sg_pulled(\"?keep\", id, \"Name\") WHERE sg_pulled.\"?keep\""
        );
        assert_eq!(
            copy_query(&cols[..1], None),
            "SELECT CAST(sg_pulled.id AS bigint) AS id FROM (VALUES (false, NULL)) AS sg_pulled(\"?keep\", id) WHERE sg_pulled.\"?keep\""
        );
    }

    #[test]
    fn data_rows_are_read() {
        let body = [0, 2, 0, 0, 0, 1, b'7', 0xff, 0xff, 0xff, 0xff];
        assert_eq!(data_row(&body), Some(vec![Some("7".into()), None]));
        assert_eq!(data_row(&body[..8]), None);
    }
}
