//! Distributed transactions: two-phase commit of transactions that wrote on several
//! nodes, and the recovery of what a crash left prepared.
//!
//! Commit (driven by the session, `session/commit.rs`): the nodes that only read get a
//! plain COMMIT; every writer gets `PREPARE TRANSACTION '<gid>'`; one commit record per
//! prepared transaction goes into `shardgate.pg_dist_transaction` on the coordinator
//! (autocommit, durable before the client hears COMMIT); then `COMMIT PREPARED` on each
//! writer. The commit record is the commit point: a prepared transaction with a record
//! is committed, one without is rolled back.
//!
//! Global transaction ids: `sg_t_<router id>_<epoch>_<seq>_<node>`. The router id is
//! configured (`[transactions] router_id`) and held by an advisory lock on the
//! coordinator while the router runs, so two live routers never share one; the epoch is
//! new each start; `seq` counts commits. Each router recovers only its own ids. While a
//! commit is in flight its seq is in `in_flight`, and recovery leaves its prepared
//! transactions alone; ids of earlier epochs are never in flight.
//!
//! Records are not deleted by the commit itself (that would be a second coordinator
//! write per commit): recovery drops the records of transactions no longer prepared
//! anywhere.

mod metrics;
mod recover;

pub use metrics::TxnMetrics;
pub use recover::Recovered;

use crate::backend::control::{ControlLogin, connect_node};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// Commit records of one commit go into one of this many coordinator connections, so
/// concurrent commits share fsyncs instead of queueing behind one connection.
const RECORD_CONNECTIONS: usize = 4;

/// An ambiguous commit-record write (the connection broke before the answer) keeps its
/// transaction away from recovery this long, so the coordinator has finished (or
/// dropped) the write before recovery looks for the record.
const AMBIGUOUS_HOLD: Duration = Duration::from_secs(30);

/// Named points of a distributed commit where a test can stop the router
/// (`SHARDGATE_FAILPOINTS="after-prepare=abort,after-record=sleep:3000"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Failpoint {
    /// Every writer prepared, no commit record yet.
    AfterPrepare,
    /// The commit records are durable, no COMMIT PREPARED sent yet.
    AfterRecord,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FailAction {
    /// The process ends at once, as under kill -9 (its sockets close, nothing is
    /// cleaned up).
    Abort,
    Sleep(Duration),
}

fn parse_failpoints(spec: &str) -> HashMap<Failpoint, FailAction> {
    let mut out = HashMap::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let Some((name, action)) = item.split_once('=') else {
            tracing::warn!(item, "ignoring a failpoint without '='");
            continue;
        };
        let point = match name.trim() {
            "after-prepare" => Failpoint::AfterPrepare,
            "after-record" => Failpoint::AfterRecord,
            other => {
                tracing::warn!(failpoint = other, "ignoring an unknown failpoint");
                continue;
            }
        };
        let action = match action.trim() {
            "abort" => FailAction::Abort,
            a => match a.strip_prefix("sleep:").and_then(|ms| ms.parse().ok()) {
                Some(ms) => FailAction::Sleep(Duration::from_millis(ms)),
                None => {
                    tracing::warn!(action = a, "ignoring a failpoint with an unknown action");
                    continue;
                }
            },
        };
        out.insert(point, action);
    }
    out
}

/// Why a commit-record write failed.
pub enum RecordError {
    /// The coordinator refused it: the records are not there.
    Refused(tokio_postgres::Error),
    /// The connection broke: the records may or may not be there.
    Ambiguous(String),
}

/// A distributed commit that did not commit: what its client is told (a node's own
/// error, or the router's).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CommitError {
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl CommitError {
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        CommitError {
            code: code.to_owned(),
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    /// A node's ErrorResponse, as it was.
    pub fn from_backend(body: &[u8]) -> Self {
        use crate::protocol::error_field;
        let field = |c| error_field(body, c).map(|v| String::from_utf8_lossy(v).into_owned());
        CommitError {
            code: field(b'C').unwrap_or_else(|| "XX000".into()),
            message: field(b'M').unwrap_or_default(),
            detail: field(b'D'),
            hint: field(b'H'),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error(
        "another router with router_id '{0}' is running against this coordinator; give each router its own [transactions] router_id"
    )]
    Conflict(String),
    #[error("could not reach the coordinator to claim the router id: {0}")]
    Unreachable(String),
}

/// A commit in flight (see `Transactions::begin_commit`).
pub struct InFlight {
    txns: Arc<Transactions>,
    pub seq: u64,
    ended: bool,
}

impl InFlight {
    /// The commit is over; `ambiguous`: whether its commit record exists is unknown.
    pub fn end(mut self, ambiguous: bool) {
        self.ended = true;
        self.txns.end_commit(self.seq, ambiguous);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.ended {
            self.txns.end_commit(self.seq, true);
        }
    }
}

/// The router's distributed-transaction state.
pub struct Transactions {
    router_id: String,
    epoch: u32,
    seq: AtomicU64,
    /// Commits between their first PREPARE and their last step: seq -> until when an
    /// ambiguous one stays held (`None`: held until the commit ends).
    in_flight: Mutex<HashMap<u64, Option<Instant>>>,
    login: ControlLogin,
    database: String,
    /// Connections for commit records, each with its prepared INSERT.
    records: Vec<tokio::sync::Mutex<Option<(Client, tokio_postgres::Statement)>>>,
    failpoints: HashMap<Failpoint, FailAction>,
    pub metrics: TxnMetrics,
    /// The coordinator connection holding the router id's advisory lock.
    guard: Mutex<Option<Client>>,
    /// Router ids whose orphaned prepared transactions were reported.
    warned: Mutex<std::collections::HashSet<String>>,
}

/// Postgres lets only a prepared transaction's owner (the role current at its
/// PREPARE: a client's `SET LOCAL ROLE` or `set_config('role', ..., true)` makes it that
/// role) or a superuser finish it. This makes the connection's role the owner of `gid`
/// (the session user may take it: it is the role the transaction took), for a COMMIT
/// or ROLLBACK PREPARED refused with 42501 to be run again; the role stays until reset.
/// (A gid finished meanwhile keeps the role as it is: the retry then answers 42704.)
pub fn as_owner_sql(gid: &str) -> String {
    format!(
        "DO $sg$BEGIN EXECUTE pg_catalog.format('SET ROLE %I', coalesce((SELECT owner::text FROM pg_catalog.pg_prepared_xacts WHERE gid = '{}'), current_user)); END $sg$",
        gid.replace('\'', "''")
    )
}

/// The node part of a gid: `c` for the coordinator, the group id for a worker.
pub fn node_tag(node: Option<i32>) -> String {
    match node {
        None => "c".into(),
        Some(g) => g.to_string(),
    }
}

/// What a gid of this router family says: (router id, epoch, seq, node tag).
pub fn parse_gid(gid: &str) -> Option<(&str, u32, u64, &str)> {
    let rest = gid.strip_prefix("sg_t_")?;
    let mut parts = rest.rsplitn(4, '_');
    let node = parts.next()?;
    let seq = parts.next()?.parse().ok()?;
    let epoch = u32::from_str_radix(parts.next()?, 16).ok()?;
    let router = parts.next()?;
    Some((router, epoch, seq, node))
}

/// The default router id: the host name and the port the router listens on.
pub fn default_router_id(port: u16) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(30)
        .collect();
    if host.is_empty() {
        format!("shardgate-{port}")
    } else {
        format!("{host}-{port}")
    }
}

/// A router id is letters, digits and `-` (it is part of gids and of LIKE patterns).
pub fn valid_router_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 40 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

impl Transactions {
    pub fn new(
        router_id: String,
        login: ControlLogin,
        database: String,
        registry: &prometheus::Registry,
    ) -> Result<Transactions, prometheus::Error> {
        let failpoints = std::env::var("SHARDGATE_FAILPOINTS")
            .map(|s| parse_failpoints(&s))
            .unwrap_or_default();
        if !failpoints.is_empty() {
            tracing::warn!(
                ?failpoints,
                "failpoints are set: this router stops on purpose (tests only)"
            );
        }
        Ok(Transactions {
            router_id,
            epoch: rand::random::<u32>() & 0x7fff_ffff,
            seq: AtomicU64::new(1),
            in_flight: Mutex::new(HashMap::new()),
            login,
            database,
            records: (0..RECORD_CONNECTIONS)
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
            failpoints,
            metrics: TxnMetrics::new(registry)?,
            guard: Mutex::new(None),
            warned: Mutex::new(Default::default()),
        })
    }

    pub fn router_id(&self) -> &str {
        &self.router_id
    }

    /// Takes the router id's advisory lock on the coordinator, held while the router
    /// runs (its connection ends with the process, so a crashed router's id is free
    /// at once). Recovery runs only while it is held: another live router with the same
    /// id would otherwise roll back this router's commits in flight.
    pub async fn claim_router_id(&self) -> Result<(), ClaimError> {
        if self.guard.lock().as_ref().is_some_and(|c| !c.is_closed()) {
            return Ok(());
        }
        let client = connect_node(
            &self.login,
            &self.login.host,
            self.login.port,
            &self.database,
        )
        .await
        .map_err(|e| ClaimError::Unreachable(e.to_string()))?;
        let row = client
            .query_one(
                "SELECT pg_try_advisory_lock(hashtext('shardgate.router'), hashtext($1))",
                &[&self.router_id],
            )
            .await
            .map_err(|e| ClaimError::Unreachable(e.to_string()))?;
        if !row.get::<_, bool>(0) {
            return Err(ClaimError::Conflict(self.router_id.clone()));
        }
        *self.guard.lock() = Some(client);
        Ok(())
    }

    /// A new commit: its seq, held in flight until the guard ends it. A guard dropped
    /// without `end` (the session went away mid-commit) ends it as ambiguous, so
    /// recovery decides from the record a little later.
    pub fn begin_commit(self: &Arc<Self>) -> InFlight {
        // Under the lock `deciding` reads `seq` under: recovery sees this seq either
        // not yet taken or in flight, never taken and missing from `in_flight`.
        let mut f = self.in_flight.lock();
        let seq = self.seq.fetch_add(1, Ordering::SeqCst);
        f.insert(seq, None);
        drop(f);
        InFlight {
            txns: self.clone(),
            seq,
            ended: false,
        }
    }

    /// The commit is over (decided and, as far as this router could, finished).
    /// `ambiguous`: whether its commit record exists is unknown; recovery waits a while.
    fn end_commit(&self, seq: u64, ambiguous: bool) {
        let mut f = self.in_flight.lock();
        if ambiguous {
            f.insert(seq, Some(Instant::now() + AMBIGUOUS_HOLD));
        } else {
            f.remove(&seq);
        }
    }

    pub fn gid(&self, seq: u64, node: Option<i32>) -> String {
        format!(
            "sg_t_{}_{:x}_{}_{}",
            self.router_id,
            self.epoch,
            seq,
            node_tag(node)
        )
    }

    /// The LIKE pattern of this router's gids.
    fn gid_pattern(&self) -> String {
        format!("sg\\_t\\_{}\\_%", self.router_id)
    }

    /// Writes the commit records of one commit, durably (autocommit).
    pub async fn write_records(
        &self,
        seq: u64,
        records: &[(i32, String)],
    ) -> Result<(), RecordError> {
        let slot = &self.records[(seq as usize) % self.records.len()];
        let mut conn = slot.lock().await;
        if conn.as_ref().is_none_or(|(c, _)| c.is_closed()) {
            // Not connected: nothing was written.
            let c = connect_node(
                &self.login,
                &self.login.host,
                self.login.port,
                &self.database,
            )
            .await
            .map_err(RecordError::Refused)?;
            // The commit point must be durable whatever the role's or database's default.
            c.batch_execute("SET synchronous_commit = on")
                .await
                .map_err(RecordError::Refused)?;
            let stmt = c
                .prepare(
                    "INSERT INTO shardgate.pg_dist_transaction (groupid, gid) SELECT * FROM unnest($1::int4[], $2::text[])",
                )
                .await
                .map_err(RecordError::Refused)?;
            *conn = Some((c, stmt));
        }
        let (client, stmt) = conn.as_ref().expect("connected above");
        let groups: Vec<i32> = records.iter().map(|r| r.0).collect();
        let gids: Vec<&str> = records.iter().map(|r| r.1.as_str()).collect();
        match client.execute(stmt, &[&groups, &gids]).await {
            Ok(_) => Ok(()),
            Err(e) if e.as_db_error().is_some() => Err(RecordError::Refused(e)),
            Err(e) => {
                *conn = None;
                Err(RecordError::Ambiguous(e.to_string()))
            }
        }
    }

    /// Stops here if a failpoint says so (tests).
    pub async fn failpoint(&self, point: Failpoint) {
        match self.failpoints.get(&point) {
            None => {}
            Some(FailAction::Abort) => {
                tracing::error!(?point, "failpoint: aborting the router");
                std::process::abort();
            }
            Some(FailAction::Sleep(d)) => {
                tracing::warn!(?point, ?d, "failpoint: pausing the commit");
                tokio::time::sleep(*d).await;
            }
        }
    }

    /// (the next seq, the seqs in flight): transactions of this epoch at or after the
    /// first, or in the second, may still be deciding.
    fn deciding(&self) -> (u64, Vec<u64>) {
        let now = Instant::now();
        let mut f = self.in_flight.lock();
        f.retain(|_, until| until.is_none_or(|u| u > now));
        let next = self.seq.load(Ordering::SeqCst);
        (next, f.keys().copied().collect())
    }

    pub fn login(&self) -> &ControlLogin {
        &self.login
    }

    pub fn database(&self) -> &str {
        &self.database
    }
}

/// Runs recovery at start and every `every` until `stop`.
pub async fn recovery_loop(
    txns: Arc<Transactions>,
    catalog: Arc<crate::catalog::Catalog>,
    every: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let snap = catalog.snapshot();
        if snap.version == 0 {
            continue;
        }
        if let Err(e) = txns.claim_router_id().await {
            tracing::warn!(error = %e, "recovery of prepared distributed transactions waits");
            continue;
        }
        match txns.recover(&snap).await {
            Ok(r) if r.committed + r.rolled_back > 0 => tracing::info!(
                committed = r.committed,
                rolled_back = r.rolled_back,
                "recovered prepared distributed transactions"
            ),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "recovery of prepared distributed transactions failed")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gids_round_trip() {
        assert_eq!(
            parse_gid("sg_t_router-1_1f_42_c"),
            Some(("router-1", 0x1f, 42, "c"))
        );
        assert_eq!(parse_gid("sg_t_a_b_ff_7_3"), Some(("a_b", 0xff, 7, "3")));
        assert_eq!(parse_gid("sg_admin_0001_3"), None);
        assert_eq!(parse_gid("sg_t_x_zz_1_c"), None);
        assert!(valid_router_id("shardgate-1"));
        assert!(!valid_router_id("a_b"));
        assert!(!valid_router_id(""));
        assert!(!valid_router_id("a'b"));
    }

    #[test]
    fn failpoints_parse() {
        let f = parse_failpoints("after-prepare=abort, after-record=sleep:250,bogus=abort");
        assert_eq!(f.get(&Failpoint::AfterPrepare), Some(&FailAction::Abort));
        assert_eq!(
            f.get(&Failpoint::AfterRecord),
            Some(&FailAction::Sleep(Duration::from_millis(250)))
        );
        assert_eq!(f.len(), 2);
    }
}
