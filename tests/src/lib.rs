//! The test harness: real Postgres servers started from the installed server binaries
//! (initdb into a temporary directory, free ports on 127.0.0.1, run as `postgres` when
//! root), and routers in front of them. One server per test binary, one database per
//! test, so tests run in parallel; the server is stopped and its directory removed when
//! the test binary exits.

use shardgate::config::Config;
use shardgate::dev::fleet::{self, NodeOptions, PgBinaries, PgNode};
use shardgate::server::Server;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

pub use tokio_postgres;

pub mod raw;

/// The Postgres server of this test binary.
pub struct PgCluster {
    pub node: PgNode,
    pub dir: PathBuf,
}

static CLUSTER: OnceLock<PgCluster> = OnceLock::new();
static STARTED: Mutex<Vec<(PgNode, PathBuf)>> = Mutex::new(Vec::new());

extern "C" fn stop_all() {
    let started = std::mem::take(&mut *STARTED.lock().unwrap_or_else(|e| e.into_inner()));
    for (node, dir) in started {
        let _ = node.stop("immediate");
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Starts a fresh Postgres server in a temporary directory. It is stopped and removed
/// when the test process exits (or by `stop_node`).
pub fn start_node(opts: &NodeOptions) -> (PgNode, PathBuf) {
    let bin = PgBinaries::find().expect("PostgreSQL server binaries");
    let dir = tempfile::Builder::new()
        .prefix("shardgate-test-")
        .tempdir()
        .expect("tempdir")
        .keep();
    fleet::prepare_dir(&dir).expect("prepare dir");
    let data = dir.join("data");
    let mut last_err = None;
    for _ in 0..5 {
        let port = fleet::free_port().expect("free port");
        let mut node = PgNode::new(bin.clone(), data.clone(), port);
        if !node.is_initialized() {
            node.init(opts).expect("initdb");
        } else {
            node.set_port(port).expect("set port");
        }
        match node.start() {
            Ok(()) => {
                let mut started = STARTED.lock().unwrap();
                if started.is_empty() {
                    // SAFETY: registering a plain extern "C" function.
                    unsafe {
                        libc::atexit(stop_all);
                    }
                }
                started.push((node.clone(), dir.clone()));
                return (node, dir);
            }
            Err(e) => last_err = Some(e), // port taken in the meantime: try another
        }
    }
    panic!("could not start Postgres: {last_err:?}");
}

/// The shared server of this test binary, started on first use.
pub fn cluster() -> &'static PgCluster {
    CLUSTER.get_or_init(|| {
        let (node, dir) = start_node(&NodeOptions {
            max_connections: 300,
            fsync: false,
        });
        // Password logins for the auth tests (trust stays for `postgres`).
        let hba = dir.join("data").join("pg_hba.conf");
        let text = std::fs::read_to_string(&hba).expect("pg_hba.conf");
        std::fs::write(
            &hba,
            format!("host all sg_scram 127.0.0.1/32 scram-sha-256\nhost all sg_md5 127.0.0.1/32 md5\n{text}"),
        )
        .expect("pg_hba.conf");
        node.psql("postgres", "SELECT pg_reload_conf()").expect("reload");
        PgCluster { node, dir }
    })
}

static WORKERS: OnceLock<Vec<PgCluster>> = OnceLock::new();

/// Worker servers of this test binary (started on first use), for distributed tables.
pub fn workers() -> &'static [PgCluster] {
    WORKERS.get_or_init(|| {
        (0..2)
            .map(|_| {
                let (node, dir) = start_node(&NodeOptions {
                    max_connections: 300,
                    fsync: false,
                });
                PgCluster { node, dir }
            })
            .collect()
    })
}

/// How a test's router is set up.
#[derive(Clone)]
pub struct EnvOptions {
    /// Extra `[server]` keys, as TOML lines.
    pub server: String,
    /// `[[users]]` entries, as TOML. Default: `postgres` with trust.
    pub users: String,
    pub auth_method: &'static str,
    pub pool_size: usize,
    pub pool_mode: &'static str,
    /// Worker servers registered in the catalog (0..=2); the test's database is created
    /// on each.
    pub workers: usize,
    /// Extra TOML sections (`[plugins]`...).
    pub extra: String,
    /// Worker servers of the test's own (to kill and restart), used instead of the
    /// shared ones when not empty; the test's database is created on each.
    pub own_workers: Vec<PgNode>,
}

impl Default for EnvOptions {
    fn default() -> Self {
        EnvOptions {
            server: String::new(),
            users: "[[users]]\nname = \"postgres\"\n".into(),
            auth_method: "trust",
            pool_size: 4,
            pool_mode: "transaction",
            workers: 0,
            extra: String::new(),
            own_workers: Vec::new(),
        }
    }
}

/// One test's database on the shared server and a router in front of it.
pub struct TestEnv {
    pub db: String,
    pub router: Server,
    pub pg_port: u16,
    /// Ports of the workers this test's catalog knows.
    pub worker_ports: Vec<u16>,
    pub opts: EnvOptions,
}

impl TestEnv {
    pub async fn new() -> TestEnv {
        Self::with(EnvOptions::default()).await
    }

    pub async fn with(opts: EnvOptions) -> TestEnv {
        init_logging();
        let c = cluster();
        let db = format!("t_{:016x}", rand::random::<u64>());
        c.node
            .psql("postgres", &format!("CREATE DATABASE {db}"))
            .expect("create database");
        let worker_ports: Vec<u16> = if !opts.own_workers.is_empty() {
            opts.own_workers
                .iter()
                .map(|w| {
                    w.psql("postgres", &format!("CREATE DATABASE {db}"))
                        .expect("create database on worker");
                    w.port
                })
                .collect()
        } else if opts.workers > 0 {
            workers()
                .iter()
                .take(opts.workers)
                .map(|w| {
                    w.node
                        .psql("postgres", &format!("CREATE DATABASE {db}"))
                        .expect("create database on worker");
                    w.node.port
                })
                .collect()
        } else {
            Vec::new()
        };
        let router = start_router(&env_config(&opts, &db, c.node.port, &worker_ports)).await;
        TestEnv {
            db,
            router,
            pg_port: c.node.port,
            worker_ports,
            opts,
        }
    }

    /// Another router over the same coordinator and catalog (as a second deployment).
    pub async fn second_router(&self) -> Server {
        start_router(&env_config(
            &self.opts,
            &self.db,
            self.pg_port,
            &self.worker_ports,
        ))
        .await
    }

    /// The config this test's routers run with.
    pub fn config(&self) -> Config {
        env_config(&self.opts, &self.db, self.pg_port, &self.worker_ports)
    }

    /// A client straight to worker `i`'s copy of the test database.
    pub async fn worker(&self, i: usize) -> tokio_postgres::Client {
        connect(&format!(
            "host=127.0.0.1 port={} user=postgres dbname={} sslmode=disable",
            self.worker_ports[i], self.db
        ))
        .await
        .expect("connect to worker")
    }

    pub fn port(&self) -> u16 {
        self.router.local_addr().port()
    }

    /// libpq connection string through the router.
    pub fn conn_str(&self, user: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} dbname={} sslmode=disable",
            self.port(),
            self.db
        )
    }

    /// libpq connection string straight to Postgres (as `postgres`).
    pub fn direct_str(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={} sslmode=disable",
            self.pg_port, self.db
        )
    }

    /// A tokio-postgres client through the router, as `postgres`.
    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.conn_str("postgres"))
            .await
            .expect("connect through the router")
    }

    /// A tokio-postgres client straight to Postgres.
    pub async fn direct(&self) -> tokio_postgres::Client {
        connect(&self.direct_str())
            .await
            .expect("connect to Postgres")
    }

    /// Waits until `cond` holds on a direct connection (checking backend state after a
    /// client misbehaved), polling instead of sleeping a fixed time.
    pub async fn eventually(&self, sql: &str, want: i64) -> i64 {
        let direct = self.direct().await;
        let mut last = -1;
        for _ in 0..100 {
            last = direct
                .query_one(sql, &[])
                .await
                .expect("poll query")
                .get::<_, i64>(0);
            if last == want {
                return last;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        last
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        self.router.abort();
    }
}

/// A router config for one test: its database holds the catalog; workers are seeded
/// into the catalog when it is created.
pub fn env_config(opts: &EnvOptions, db: &str, pg_port: u16, workers: &[u16]) -> Config {
    let mut text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\nauth_method = \"{}\"\npool_size = {}\npool_mode = \"{}\"\npool_acquire_timeout_ms = 20000\n{}\n\n[coordinator]\nhost = \"127.0.0.1\"\nport = {}\n\n[catalog]\ndatabase = \"{db}\"\n\n{}\n{}\n",
        opts.auth_method,
        opts.pool_size,
        opts.pool_mode,
        opts.server,
        pg_port,
        opts.extra,
        opts.users
    );
    for p in workers {
        text.push_str(&format!(
            "\n[[workers]]\nhost = \"127.0.0.1\"\nport = {p}\n"
        ));
    }
    Config::from_toml(&text).unwrap_or_else(|e| panic!("test config: {e}\n{text}"))
}

pub async fn start_router(config: &Config) -> Server {
    Server::start(config.clone()).await.expect("router starts")
}

/// Connects with tokio-postgres and drives the connection in the background.
pub async fn connect(conn_str: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(conn_str, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// Path of a Postgres client tool (psql, pgbench): next to the server binaries, else PATH.
pub fn pg_tool(name: &str) -> PathBuf {
    let bin = PgBinaries::find().expect("PostgreSQL binaries");
    let p = bin.tool(name);
    if p.is_file() { p } else { PathBuf::from(name) }
}

/// Router logs in test output when SHARDGATE_LOG is set (e.g. `SHARDGATE_LOG=debug`).
pub fn init_logging() {
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("SHARDGATE_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
}

// ---------------------------------------------------------------------------------
// Helpers of the distributed-transaction tests
// ---------------------------------------------------------------------------------

/// Creates `t(id int8, v int)` in 8 shards with ids 1..=40 (and, with `local_log`, a plain
/// coordinator table `local_log(n int)`), through `c` (a router client), and returns two
/// ids whose shards are on different workers.
pub async fn two_node_table(c: &tokio_postgres::Client, local_log: bool) -> (i64, i64) {
    c.batch_execute("CREATE TABLE t (id int8 PRIMARY KEY, v int NOT NULL DEFAULT 0)")
        .await
        .expect("create t");
    if local_log {
        c.batch_execute("CREATE TABLE local_log (n int)")
            .await
            .expect("create local_log");
    }
    c.batch_execute("SELECT create_distributed_table('t', 'id', shard_count => 8)")
        .await
        .expect("distribute t");
    for id in 1..=40i64 {
        c.execute("INSERT INTO t (id, v) VALUES ($1, 0)", &[&id])
            .await
            .expect("insert");
    }
    let mut by_group: std::collections::BTreeMap<i32, i64> = Default::default();
    for id in 1..=40i64 {
        let sid: i64 = c
            .simple_query(&format!(
                "SELECT get_shard_id_for_distribution_column('t', {id})"
            ))
            .await
            .expect("shard id")
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(|v| v.parse().unwrap()),
                _ => None,
            })
            .expect("a row");
        let g: i32 = c
            .query_one(
                "SELECT groupid FROM shardgate.pg_dist_placement WHERE shardid = $1",
                &[&sid],
            )
            .await
            .expect("placement")
            .get(0);
        by_group.entry(g).or_insert(id);
    }
    let ids: Vec<i64> = by_group.values().copied().collect();
    assert_eq!(ids.len(), 2, "rows on both workers: {by_group:?}");
    (ids[0], ids[1])
}

/// The sum of the samples of exactly the metric `name` (with or without labels) in a
/// Prometheus text body.
pub fn metric_sum(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

impl TestEnv {
    /// `GET /metrics` from the router.
    pub async fn metrics(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.router.metrics_addr().expect("metrics endpoint");
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            .await
            .expect("request");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("response");
        out
    }

    /// Prepared transactions of the test's database on the coordinator and every worker.
    pub async fn prepared_anywhere(&self) -> i64 {
        let mut clients = vec![self.direct().await];
        for i in 0..self.worker_ports.len() {
            clients.push(self.worker(i).await);
        }
        let mut n = 0;
        for c in clients {
            n += c
                .query_one(
                    "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()",
                    &[],
                )
                .await
                .expect("pg_prepared_xacts")
                .get::<_, i64>(0);
        }
        n
    }
}
