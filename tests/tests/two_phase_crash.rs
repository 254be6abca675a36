//! Two-phase commit under real crashes: the router as a separate process (its
//! `SHARDGATE_FAILPOINTS` stop it between PREPARE and the commit record, or between the
//! commit record and COMMIT PREPARED), real `kill -9`s of the router and of a worker,
//! and clients that vanish mid-commit. Checked each time, on the coordinator and every
//! worker: a crash before the commit record rolls the whole transaction back, one after
//! it commits all of it; recovery (by a new router with the same `router_id`, by its
//! timer, or by `SELECT recover_prepared_transactions()`) leaves nothing prepared and
//! no commit records behind; `recover_prepared_transactions()` counts what it finished;
//! a second live router cannot take a router id that is in use. Real Postgres: a
//! coordinator and 2 workers (shared ones, or the test's own to kill).

use shardgate::dev::fleet::{NodeOptions, PgNode, free_port};
use shardgate_tests::tokio_postgres::{self, Client, NoTls};
use shardgate_tests::{EnvOptions, TestEnv, connect, start_node, two_node_table};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_shardgate-under-test");

/// Compiled plugins shared by the router processes (compiling them takes seconds in a
/// debug build).
const PLUGIN_CACHE: &str = concat!(env!("CARGO_TARGET_TMPDIR"), "/two-phase-crash-plugins");

/// The `[plugins]` section of every router here, in-process ones too.
fn plugin_cache() -> String {
    format!("[plugins]\ncache_dir = \"{PLUGIN_CACHE}\"\n")
}

/// A router id of its own for each test (ids are per coordinator cluster, and the
/// coordinator server is shared by the tests of this binary).
fn router_id(what: &str) -> String {
    format!("{what}-{:08x}", rand::random::<u32>())
}

/// `shardgate serve` as a child process in front of the test's coordinator and workers.
struct RouterProcess {
    child: Child,
    port: u16,
    metrics_port: u16,
    log: PathBuf,
    db: String,
    _dir: tempfile::TempDir,
}

impl RouterProcess {
    /// Starts the process without waiting for it.
    fn spawn(env: &TestEnv, id: &str, failpoints: &str, recovery_ms: u64) -> RouterProcess {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port().unwrap();
        let metrics_port = free_port().unwrap();
        let mut text = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\nauth_method = \"trust\"\npool_size = 4\npool_mode = \"transaction\"\npool_acquire_timeout_ms = 20000\n\n[coordinator]\nhost = \"127.0.0.1\"\nport = {}\n\n[catalog]\ndatabase = \"{}\"\n\n[transactions]\nrouter_id = \"{id}\"\nrecovery_interval_ms = {recovery_ms}\n\n{}\n[[users]]\nname = \"postgres\"\n",
            env.pg_port,
            env.db,
            plugin_cache()
        );
        for p in &env.worker_ports {
            text.push_str(&format!(
                "\n[[workers]]\nhost = \"127.0.0.1\"\nport = {p}\n"
            ));
        }
        let config = dir.path().join("shardgate.toml");
        std::fs::write(&config, text).unwrap();
        let log = dir.path().join("router.log");
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .arg("--config")
            .arg(&config)
            .env("SHARDGATE_LOG", "shardgate=debug,info")
            .env_remove("SHARDGATE_FAILPOINTS")
            .stdin(Stdio::null())
            .stdout(Stdio::from(
                std::fs::File::create(dir.path().join("router.out")).unwrap(),
            ))
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .kill_on_drop(true);
        if !failpoints.is_empty() {
            cmd.env("SHARDGATE_FAILPOINTS", failpoints);
        }
        let child = cmd.spawn().expect("start shardgate-under-test");
        RouterProcess {
            child,
            port,
            metrics_port,
            log,
            db: env.db.clone(),
            _dir: dir,
        }
    }

    /// Starts the process and waits until it answers queries.
    async fn start(env: &TestEnv, id: &str, failpoints: &str, recovery_ms: u64) -> RouterProcess {
        let mut r = Self::spawn(env, id, failpoints, recovery_ms);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(c) = connect(&r.conn_str()).await
                && c.simple_query("SELECT 1").await.is_ok()
            {
                return r;
            }
            if let Ok(Some(status)) = r.child.try_wait() {
                panic!("the router exited with {status}: {}", r.logs());
            }
            assert!(
                Instant::now() < deadline,
                "the router did not come up: {}",
                r.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn conn_str(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={} sslmode=disable connect_timeout=10",
            self.port, self.db
        )
    }

    async fn client(&self) -> Client {
        connect(&self.conn_str())
            .await
            .unwrap_or_else(|e| panic!("connect through the router: {e}\n{}", self.logs()))
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(s) => s.expect("wait for the router"),
            Err(_) => panic!(
                "the router process did not exit within {within:?}: {}",
                self.logs()
            ),
        }
    }

    /// `kill -9` and wait for the process to be gone.
    async fn kill9(&mut self) {
        self.child.start_kill().expect("kill -9 the router");
        let _ = self.wait_exit(Duration::from_secs(10)).await;
    }

    /// The value of a metric (summed over its labels).
    async fn metric(&self, name: &str) -> f64 {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.metrics_port))
            .await
            .expect("metrics endpoint");
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out.lines()
            .filter(|l| l.split([' ', '{']).next() == Some(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// `SELECT recover_prepared_transactions()` through this router.
    async fn recover(&self) -> i32 {
        let c = self.client().await;
        c.query_one("SELECT recover_prepared_transactions()", &[])
            .await
            .unwrap_or_else(|e| panic!("recover_prepared_transactions(): {e:?}\n{}", self.logs()))
            .get(0)
    }
}

/// `v` of rows `a` and `b`, read through a router. Retried for a while on connection
/// errors: after a worker restart a pooled connection to it may be stale once.
async fn values(conn_str: &str, a: i64, b: i64) -> (i32, i32) {
    let mut last = None;
    for _ in 0..20 {
        let read = async {
            let c = connect(conn_str).await?;
            let mut out = Vec::new();
            for id in [a, b] {
                out.push(
                    c.query_one("SELECT v FROM t WHERE id = $1", &[&id])
                        .await?
                        .get::<_, i32>(0),
                );
            }
            Ok::<_, tokio_postgres::Error>((out[0], out[1]))
        };
        match read.await {
            Ok(v) => return v,
            Err(e) => {
                let transient = e
                    .code()
                    .is_none_or(|c| c.code().starts_with("08") || c.code().starts_with("57P"));
                assert!(transient, "read t: {e:?}");
                last = Some(format!("{e:?}"));
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("could not read t: {last:?}");
}

fn gid_like(id: &str) -> String {
    format!("sg\\_t\\_{id}\\_%")
}

/// Transactions of router `id` prepared on the coordinator and on each worker.
async fn prepared(env: &TestEnv, id: &str) -> Vec<i64> {
    let mut out = Vec::new();
    let mut clients = vec![env.direct().await];
    for i in 0..env.worker_ports.len() {
        clients.push(env.worker(i).await);
    }
    for c in clients {
        out.push(
            c.query_one(
                "SELECT count(*) FROM pg_prepared_xacts WHERE gid LIKE $1 AND database = current_database()",
                &[&gid_like(id)],
            )
            .await
            .unwrap()
            .get::<_, i64>(0),
        );
    }
    out
}

/// Commit records of router `id` on the coordinator.
async fn records(env: &TestEnv, id: &str) -> i64 {
    env.direct()
        .await
        .query_one(
            "SELECT count(*) FROM shardgate.pg_dist_transaction WHERE gid LIKE $1",
            &[&gid_like(id)],
        )
        .await
        .unwrap()
        .get(0)
}

/// Polls `f` until it returns `want` (or `within` passes); returns its last value.
async fn until<T, F, Fut>(within: Duration, want: T, mut f: F) -> T
where
    T: PartialEq,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let deadline = Instant::now() + within;
    loop {
        let v = f().await;
        if v == want || Instant::now() >= deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A client whose socket the test can cut: the COMMIT runs in a task of its own.
struct Doomed {
    conn: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
    commit: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
}

/// Opens a transaction writing `v` on rows `a` and `b` (two workers) and on the
/// coordinator's `local_log`, and sends COMMIT without waiting for it.
async fn commit_in_background(conn_str: &str, a: i64, b: i64, v: i32) -> Doomed {
    let (c, conn) = tokio_postgres::connect(conn_str, NoTls)
        .await
        .expect("connect through the router");
    let conn = tokio::spawn(conn);
    write_everywhere(&c, a, b, v).await;
    let commit = tokio::spawn(async move { c.batch_execute("COMMIT").await });
    Doomed { conn, commit }
}

async fn write_everywhere(c: &Client, a: i64, b: i64, v: i32) {
    c.batch_execute("BEGIN").await.unwrap();
    c.execute("UPDATE t SET v = $1 WHERE id = $2", &[&v, &a])
        .await
        .unwrap();
    c.execute("UPDATE t SET v = $1 WHERE id = $2", &[&v, &b])
        .await
        .unwrap();
    c.execute("INSERT INTO local_log VALUES ($1)", &[&v])
        .await
        .unwrap();
}

async fn local_log(env: &TestEnv, v: i32) -> i64 {
    env.direct()
        .await
        .query_one("SELECT count(*) FROM local_log WHERE n = $1", &[&v])
        .await
        .unwrap()
        .get(0)
}

async fn shared_fleet() -> (TestEnv, i64, i64) {
    let env = TestEnv::with(EnvOptions {
        workers: 2,
        extra: plugin_cache(),
        ..Default::default()
    })
    .await;
    let c = env.client().await;
    let (a, b) = two_node_table(&c, true).await;
    (env, a, b)
}

/// The router dies (kill -9 at the failpoint) after the commit record and before
/// COMMIT PREPARED; a new router process with the same id commits everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_killed_after_the_commit_record_commits_on_recovery() {
    let (env, a, b) = shared_fleet().await;
    let id = router_id("after-record");
    let mut r1 = RouterProcess::start(&env, &id, "after-record=abort", 500).await;
    let c = r1.client().await;
    write_everywhere(&c, a, b, 1).await;
    let e = c
        .batch_execute("COMMIT")
        .await
        .expect_err("the router aborts inside COMMIT");
    assert!(
        e.as_db_error().is_none(),
        "the connection breaks, no server answer: {e:?}"
    );
    let status = r1.wait_exit(Duration::from_secs(10)).await;
    assert!(!status.success(), "aborted: {status}");
    assert!(
        r1.logs().contains("failpoint"),
        "stopped by the failpoint: {}",
        r1.logs()
    );

    // The crash left: every writer prepared (coordinator and both workers), the
    // records durable, nothing visible yet.
    assert_eq!(
        prepared(&env, &id).await,
        vec![1, 1, 1],
        "prepared per node"
    );
    assert_eq!(records(&env, &id).await, 3, "one record per prepared part");
    assert_eq!(values(&env.conn_str("postgres"), a, b).await, (0, 0));
    assert_eq!(local_log(&env, 1).await, 0);

    // A new router with the same id: its recovery (at start, then every 500 ms)
    // commits every part and drops the records.
    let r2 = RouterProcess::start(&env, &id, "", 500).await;
    let left = until(Duration::from_secs(15), vec![0, 0, 0], || {
        prepared(&env, &id)
    })
    .await;
    assert_eq!(left, vec![0, 0, 0], "still prepared: {}", r2.logs());
    assert_eq!(
        values(&r2.conn_str(), a, b).await,
        (1, 1),
        "both rows committed"
    );
    assert_eq!(
        local_log(&env, 1).await,
        1,
        "the coordinator's part committed"
    );
    let recs = until(Duration::from_secs(15), 0, || records(&env, &id)).await;
    assert_eq!(recs, 0, "records left: {}", r2.logs());
    assert_eq!(
        r2.metric("shardgate_2pc_recovered_committed_total").await,
        3.0
    );
    assert_eq!(
        r2.metric("shardgate_2pc_recovered_rolled_back_total").await,
        0.0
    );
    assert_eq!(r2.recover().await, 0, "nothing pending any more");
    assert_eq!(env.prepared_anywhere().await, 0);
}

/// The router dies after every writer prepared and before the commit record; a new
/// router process with the same id rolls everything back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_killed_before_the_commit_record_rolls_back_on_recovery() {
    let (env, a, b) = shared_fleet().await;
    let id = router_id("after-prepare");
    let mut r1 = RouterProcess::start(&env, &id, "after-prepare=abort", 500).await;
    let c = r1.client().await;
    write_everywhere(&c, a, b, 1).await;
    let e = c
        .batch_execute("COMMIT")
        .await
        .expect_err("the router aborts inside COMMIT");
    assert!(e.as_db_error().is_none(), "{e:?}");
    let status = r1.wait_exit(Duration::from_secs(10)).await;
    assert!(!status.success(), "aborted: {status}");

    assert_eq!(
        prepared(&env, &id).await,
        vec![1, 1, 1],
        "prepared per node"
    );
    assert_eq!(records(&env, &id).await, 0, "no commit record");

    let r2 = RouterProcess::start(&env, &id, "", 500).await;
    let left = until(Duration::from_secs(15), vec![0, 0, 0], || {
        prepared(&env, &id)
    })
    .await;
    assert_eq!(left, vec![0, 0, 0], "still prepared: {}", r2.logs());
    assert_eq!(
        values(&r2.conn_str(), a, b).await,
        (0, 0),
        "nothing committed"
    );
    assert_eq!(local_log(&env, 1).await, 0, "the coordinator's part too");
    assert_eq!(records(&env, &id).await, 0);
    assert_eq!(
        r2.metric("shardgate_2pc_recovered_rolled_back_total").await,
        3.0
    );
    assert_eq!(
        r2.metric("shardgate_2pc_recovered_committed_total").await,
        0.0
    );
    assert_eq!(r2.recover().await, 0);
    assert_eq!(env.prepared_anywhere().await, 0);
    // The rows are usable (no lock left behind by a prepared transaction).
    let c = r2.client().await;
    for id in [a, b] {
        c.execute("UPDATE t SET v = 5 WHERE id = $1", &[&id])
            .await
            .unwrap();
    }
    assert_eq!(values(&r2.conn_str(), a, b).await, (5, 5));
}

/// Restarts a killed server; `start` fails while the old backends are still exiting.
fn restart(node: &PgNode) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match node.start() {
            Ok(()) => return,
            Err(e) => {
                assert!(Instant::now() < deadline, "restart the worker: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// A worker dies after PREPARE, while the commit pauses after the commit record: the
/// client still gets COMMIT (the record is the commit point); once the worker is back,
/// `recover_prepared_transactions()` commits its part (counting 1), and counts 0 when
/// there is nothing to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_before_commit_prepared_commits_on_recovery() {
    let opts = NodeOptions {
        max_connections: 60,
        fsync: false,
    };
    let own: Vec<PgNode> = (0..2).map(|_| start_node(&opts).0).collect();
    let env = TestEnv::with(EnvOptions {
        own_workers: own.clone(),
        extra: plugin_cache(),
        ..Default::default()
    })
    .await;
    let (a, b) = two_node_table(&env.client().await, true).await;
    let id = router_id("worker-kill");
    // Recovery by timer is out of the way (an hour): only the explicit calls recover,
    // so their counts are exact.
    let r = RouterProcess::start(&env, &id, "after-record=sleep:3000", 3_600_000).await;
    assert_eq!(r.recover().await, 0, "nothing pending");

    let doomed = commit_in_background(&r.conn_str(), a, b, 1).await;
    // In the pause after the record: kill worker 1.
    let recs = until(Duration::from_secs(10), 3, || records(&env, &id)).await;
    assert_eq!(recs, 3, "the records are written: {}", r.logs());
    own[1].kill9().expect("kill -9 worker 1");
    let committed = tokio::time::timeout(Duration::from_secs(20), doomed.commit)
        .await
        .expect("COMMIT answered")
        .unwrap();
    assert!(
        committed.is_ok(),
        "the client gets COMMIT once the record is durable: {committed:?}\n{}",
        r.logs()
    );
    drop(doomed.conn);
    assert_eq!(r.metric("shardgate_2pc_commits_total").await, 1.0);

    restart(&own[1]);
    // Worker 1's part is still prepared; the others committed.
    assert_eq!(
        prepared(&env, &id).await,
        vec![0, 0, 1],
        "only the killed worker's part is left prepared"
    );
    assert_eq!(
        r.recover().await,
        1,
        "recovery finished the one left: {}",
        r.logs()
    );
    assert_eq!(prepared(&env, &id).await, vec![0, 0, 0]);
    assert_eq!(
        values(&r.conn_str(), a, b).await,
        (1, 1),
        "both rows committed"
    );
    assert_eq!(local_log(&env, 1).await, 1);
    assert_eq!(
        r.metric("shardgate_2pc_recovered_committed_total").await,
        1.0
    );
    // The next pass drops the last record and has nothing to finish.
    assert_eq!(r.recover().await, 0);
    assert_eq!(records(&env, &id).await, 0, "records left");
    assert_eq!(env.prepared_anywhere().await, 0);
}

/// Clients that vanish while their COMMIT pauses at each failpoint, and one that stays
/// while recovery runs every 100 ms during the pauses: no transaction is left prepared,
/// each one is all there or not at all (all there once its record is written), and
/// recovery never touches a commit still in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_vanishing_mid_commit_leave_all_or_nothing() {
    let (env, a, b) = shared_fleet().await;
    let id = router_id("vanish");
    let r = RouterProcess::start(
        &env,
        &id,
        "after-prepare=sleep:1500,after-record=sleep:1500",
        100,
    )
    .await;

    // 1. Gone during the pause after PREPARE (everything prepared, no record yet).
    let doomed = commit_in_background(&r.conn_str(), a, b, 1).await;
    let p = until(Duration::from_secs(10), vec![1, 1, 1], || {
        prepared(&env, &id)
    })
    .await;
    assert_eq!(p, vec![1, 1, 1], "prepared: {}", r.logs());
    assert_eq!(records(&env, &id).await, 0, "still before the record");
    doomed.commit.abort();
    doomed.conn.abort();
    let p = until(Duration::from_secs(15), vec![0, 0, 0], || {
        prepared(&env, &id)
    })
    .await;
    assert_eq!(p, vec![0, 0, 0], "left prepared: {}", r.logs());
    let (va, vb) = values(&env.conn_str("postgres"), a, b).await;
    let logged = local_log(&env, 1).await;
    assert!(
        (va, vb, logged) == (0, 0, 0) || (va, vb, logged) == (1, 1, 1),
        "all or nothing: {va} {vb} {logged}"
    );
    let recs = until(Duration::from_secs(10), 0, || records(&env, &id)).await;
    assert_eq!(recs, 0, "records left: {}", r.logs());

    // 2. Gone during the pause after the record: it is committed.
    let doomed = commit_in_background(&r.conn_str(), a, b, 2).await;
    let recs = until(Duration::from_secs(10), 3, || records(&env, &id)).await;
    assert_eq!(recs, 3, "the records are written: {}", r.logs());
    doomed.commit.abort();
    doomed.conn.abort();
    let p = until(Duration::from_secs(15), vec![0, 0, 0], || {
        prepared(&env, &id)
    })
    .await;
    assert_eq!(p, vec![0, 0, 0], "left prepared: {}", r.logs());
    assert_eq!(values(&env.conn_str("postgres"), a, b).await, (2, 2));
    assert_eq!(local_log(&env, 2).await, 1);
    let recs = until(Duration::from_secs(10), 0, || records(&env, &id)).await;
    assert_eq!(recs, 0, "records left: {}", r.logs());

    // 3. A client that waits, with recovery passes all through both pauses.
    let c = r.client().await;
    write_everywhere(&c, a, b, 3).await;
    c.batch_execute("COMMIT")
        .await
        .unwrap_or_else(|e| panic!("COMMIT: {e:?}\n{}", r.logs()));
    assert_eq!(values(&r.conn_str(), a, b).await, (3, 3));
    assert_eq!(local_log(&env, 3).await, 1);
    assert_eq!(prepared(&env, &id).await, vec![0, 0, 0]);
    assert!(r.metric("shardgate_2pc_recovery_seconds_count").await >= 10.0);
    // Every commit finished in the router itself: recovery had nothing to decide.
    assert_eq!(
        r.metric("shardgate_2pc_recovered_rolled_back_total").await,
        0.0,
        "recovery rolled back a commit in flight: {}",
        r.logs()
    );
    assert_eq!(
        r.metric("shardgate_2pc_recovered_committed_total").await,
        0.0
    );
    assert_eq!(r.metric("shardgate_2pc_commits_total").await, 3.0);
    assert_eq!(env.prepared_anywhere().await, 0);
}

/// Two live routers never share a router id: the second one refuses to start; once
/// the first is killed, the id is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_router_with_the_same_id_refuses_to_start() {
    let env = TestEnv::with(EnvOptions {
        extra: plugin_cache(),
        ..Default::default()
    })
    .await;
    let id = router_id("twin");
    let mut first = RouterProcess::start(&env, &id, "", 500).await;
    let mut second = RouterProcess::spawn(&env, &id, "", 500);
    let status = second.wait_exit(Duration::from_secs(30)).await;
    assert!(
        !status.success(),
        "the second router must not run: {status}"
    );
    let log = second.logs();
    assert!(
        log.contains("router_id") && log.contains(&id),
        "the error names the router id: {log}"
    );
    // The first one is unaffected.
    first.client().await.simple_query("SELECT 1").await.unwrap();
    assert!(first.child.try_wait().unwrap().is_none());

    first.kill9().await;
    let third = RouterProcess::start(&env, &id, "", 500).await;
    third.client().await.simple_query("SELECT 1").await.unwrap();
}
