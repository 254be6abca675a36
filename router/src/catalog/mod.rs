//! The catalog: shardgate's metadata on the coordinator (schema `shardgate`, Citus's
//! table and column names), created and upgraded by versioned migrations, and the
//! immutable in-memory `Snapshot` of it that sessions read. The snapshot lives behind an
//! `ArcSwap`; a background task LISTENs on `shardgate_catalog` (every catalog change
//! bumps `catalog_state.version` and NOTIFYs in the same transaction) and also polls the
//! version every second, so several routers over one coordinator agree within a second.

mod migrations;
mod snapshot;

pub use snapshot::{
    Colocation, Method, NodeRow, Shard, Snapshot, TableMeta, shard_name, value_type_for,
};

use crate::backend::control::{ControlLogin, control_connect};
use arc_swap::ArcSwap;
use futures_util::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The advisory lock (on the coordinator) that serialises catalog changes between
/// routers: migrations and every admin function take it for their transaction.
pub const CATALOG_LOCK: i64 = 0x5348_4152_4447_4154; // "SHARDGAT"

/// The NOTIFY channel of catalog changes.
pub const CHANNEL: &str = "shardgate_catalog";

/// How often the version is polled besides LISTEN (a lost notification, a reconnect).
const POLL_EVERY: Duration = Duration::from_secs(1);

pub struct Catalog {
    /// The database on the coordinator that holds the catalog (and the tables it
    /// describes; workers hold shards in a database of the same name).
    pub database: String,
    login: ControlLogin,
    snap: ArcSwap<Snapshot>,
    /// Asks the background task to reload now (after this router changed the catalog).
    reload: Notify,
    /// Signalled after every load, and after every failed attempt.
    loaded: Notify,
}

impl Catalog {
    pub fn new(database: String, login: ControlLogin) -> Arc<Catalog> {
        Arc::new(Catalog {
            database,
            login,
            snap: ArcSwap::from_pointee(Snapshot::default()),
            reload: Notify::new(),
            loaded: Notify::new(),
        })
    }

    /// The current snapshot (cheap; in-flight work keeps its `Arc`).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snap.load_full()
    }

    /// The current snapshot without taking a reference (for a quick look).
    pub fn peek(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.snap.load()
    }

    pub fn login(&self) -> &ControlLogin {
        &self.login
    }

    /// Installs a snapshot read by an admin function right after its commit, so that
    /// the client's next statement sees its own change; older versions never replace
    /// newer ones.
    pub fn install(&self, snap: Snapshot) {
        self.store_if_newer(Arc::new(snap));
        self.reload.notify_one();
    }

    /// Stores `snap` unless a newer one is there already (loads race: the background
    /// task and admin functions both install).
    fn store_if_newer(&self, snap: Arc<Snapshot>) {
        self.snap.rcu(|cur| {
            if snap.version >= cur.version {
                snap.clone()
            } else {
                cur.clone()
            }
        });
    }

    /// Connects, migrates and loads once (used at start so the router begins with a
    /// current catalog), then keeps it current until `stop`.
    pub async fn run(self: Arc<Self>, seed_workers: Vec<(String, u16)>, stop: CancellationToken) {
        let mut backoff = Duration::from_millis(200);
        let mut seed = Some(seed_workers);
        loop {
            let r = tokio::select! {
                _ = stop.cancelled() => return,
                r = self.follow(&mut seed, &stop) => r,
            };
            if let Err(e) = r {
                let detail = e
                    .as_db_error()
                    .map(|d| d.message().to_owned())
                    .unwrap_or_default();
                tracing::warn!(error = %e, detail, database = %self.database, "catalog connection failed; retrying");
            }
            // A start waiting for the first load learns that it failed.
            self.loaded.notify_waiters();
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// Waits until a snapshot has been loaded (or `timeout`).
    pub async fn wait_loaded(&self, timeout: Duration) -> bool {
        let notified = self.loaded.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.snap.load().version > 0 {
            return true;
        }
        let _ = tokio::time::timeout(timeout, notified).await;
        self.snap.load().version > 0
    }

    async fn follow(
        &self,
        seed: &mut Option<Vec<(String, u16)>>,
        stop: &CancellationToken,
    ) -> Result<(), tokio_postgres::Error> {
        let (client, mut conn) = control_connect(&self.login, &self.database).await?;
        // The connection's messages: notifications go to a channel, the task ends with it.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let conn_task = tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
            while let Some(m) = messages.next().await {
                match m {
                    Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                        let _ = tx.send(n.payload().to_owned());
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "catalog connection closed");
                        break;
                    }
                }
            }
        });
        let result = async {
            migrate(&client, seed.as_deref().unwrap_or(&[])).await?;
            *seed = None;
            client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
            let mut version = self.load(&client).await?;
            let mut tick = tokio::time::interval(POLL_EVERY);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    n = rx.recv() => if n.is_none() { return Ok(()) },
                    _ = self.reload.notified() => {}
                    _ = tick.tick() => {
                        let v: i64 = client
                            .query_one("SELECT version FROM shardgate.catalog_state", &[])
                            .await?
                            .get(0);
                        // Views over distributed tables come and go without a catalog
                        // change: compared on every poll too.
                        let views: Vec<String> = client
                            .query_one(snapshot::VIEWS_SQL, &[])
                            .await?
                            .get(0);
                        let same_views = {
                            let cur = self.peek();
                            cur.views.len() == views.len()
                                && views.iter().all(|w| cur.views.contains(w))
                        };
                        if v == version && same_views {
                            continue;
                        }
                    }
                }
                version = self.load(&client).await?;
            }
        }
        .await;
        conn_task.abort();
        result
    }

    async fn load(&self, client: &tokio_postgres::Client) -> Result<i64, tokio_postgres::Error> {
        let snap = Snapshot::load(client).await?;
        let v = snap.version;
        tracing::debug!(version = v, tables = snap.tables.len(), "catalog loaded");
        self.store_if_newer(Arc::new(snap));
        self.loaded.notify_waiters();
        Ok(v)
    }
}

/// Creates schema `shardgate` and applies the migrations this router knows that the
/// coordinator lacks, all in one transaction under the catalog lock. `seed_workers` are
/// registered when the catalog is first created (the config's `[[workers]]`).
pub async fn migrate(
    client: &tokio_postgres::Client,
    seed_workers: &[(String, u16)],
) -> Result<(), tokio_postgres::Error> {
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('shardgate.schema_migrations') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    let have: Option<i32> = if exists {
        client
            .query_one("SELECT max(version) FROM shardgate.schema_migrations", &[])
            .await?
            .get(0)
    } else {
        None
    };
    let newest = migrations::MIGRATIONS.last().map(|m| m.0).unwrap_or(0);
    if let Some(h) = have
        && h >= newest
    {
        if h > newest {
            tracing::warn!(
                catalog = h,
                known = newest,
                "the catalog was created by a newer shardgate; this router does not migrate it"
            );
        }
        return Ok(());
    }
    client.batch_execute("BEGIN").await?;
    let r = async {
        client
            .execute("SELECT pg_advisory_xact_lock($1)", &[&CATALOG_LOCK])
            .await?;
        client
            .batch_execute(
                "CREATE SCHEMA IF NOT EXISTS shardgate;
                 CREATE TABLE IF NOT EXISTS shardgate.schema_migrations (
                     version integer PRIMARY KEY,
                     name text NOT NULL,
                     applied_at timestamptz NOT NULL DEFAULT now())",
            )
            .await?;
        let have: i32 = client
            .query_one(
                "SELECT coalesce(max(version), 0) FROM shardgate.schema_migrations",
                &[],
            )
            .await?
            .get(0);
        for (version, name, sql) in migrations::MIGRATIONS {
            if *version <= have {
                continue;
            }
            tracing::info!(version, name, "applying catalog migration");
            client.batch_execute(sql).await?;
            client
                .execute(
                    "INSERT INTO shardgate.schema_migrations (version, name) VALUES ($1, $2)",
                    &[version, name],
                )
                .await?;
        }
        if have == 0 {
            for (host, port) in seed_workers {
                client
                    .execute(
                        "INSERT INTO shardgate.pg_dist_node (groupid, nodename, nodeport)
                         VALUES (nextval('shardgate.pg_dist_groupid_seq'), $1, $2)
                         ON CONFLICT (nodename, nodeport) DO NOTHING",
                        &[host, &(*port as i32)],
                    )
                    .await?;
            }
        }
        Ok::<_, tokio_postgres::Error>(())
    }
    .await;
    match r {
        Ok(()) => client.batch_execute("COMMIT").await,
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(e)
        }
    }
}

/// Waits for the catalog's first load at start, without failing the start when the
/// coordinator is down (the task keeps retrying).
pub async fn start(
    catalog: &Arc<Catalog>,
    seed_workers: Vec<(String, u16)>,
    stop: CancellationToken,
    wait: Duration,
) {
    tokio::spawn(catalog.clone().run(seed_workers, stop));
    if !catalog.wait_loaded(wait).await {
        tracing::warn!(database = %catalog.database, "catalog not loaded yet; distributed tables are unknown until it is");
    }
}
