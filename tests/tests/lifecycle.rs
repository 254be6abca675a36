//! The router as a process: graceful shutdown on SIGTERM (open transactions may
//! finish, idle clients get 57P01, new clients are refused, exit status 0), the
//! shutdown timeout (unfinished transactions roll back, nothing left idle in
//! transaction), `shardgate dev` end to end (start, psql, stop, restart on the same
//! data), and the Prometheus endpoint (names, values, `promtool check metrics`).

use shardgate::dev::fleet::{free_port, is_root, prepare_dir};
use shardgate_tests::{TestEnv, cluster, connect, pg_tool, tokio_postgres};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_shardgate-under-test");

fn sqlstate(e: &tokio_postgres::Error) -> Option<String> {
    e.code().map(|c| c.code().to_owned())
}

fn sigterm(child: &Child) {
    let pid = child.id().expect("router process still running") as i32;
    // SAFETY: kill(2) on the pid of our own child process.
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(rc, 0, "kill(SIGTERM)");
}

async fn wait_exit(child: &mut Child, within: Duration) -> ExitStatus {
    match tokio::time::timeout(within, child.wait()).await {
        Ok(s) => s.expect("wait for the router"),
        Err(_) => panic!("the router process did not exit within {within:?}"),
    }
}

/// A database of its own on the shared server.
fn new_db() -> String {
    let db = format!("l_{:016x}", rand::random::<u64>());
    cluster()
        .node
        .psql("postgres", &format!("CREATE DATABASE {db}"))
        .expect("create database");
    db
}

fn direct_str(db: &str) -> String {
    format!(
        "host=127.0.0.1 port={} user=postgres dbname={db} sslmode=disable",
        cluster().node.port
    )
}

/// `shardgate serve --config` in front of the shared server, trust auth, with its
/// stderr in `dir/router.log`. Returns once it accepts logins.
struct RouterProcess {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl RouterProcess {
    async fn start(dir: &Path, extra_server: &str, db: &str) -> RouterProcess {
        let port = free_port().unwrap();
        let config = dir.join("shardgate.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:{port}\"\nauth_method = \"trust\"\npool_size = 4\npool_mode = \"transaction\"\n{extra_server}\n\n[coordinator]\nhost = \"127.0.0.1\"\nport = {}\n\n[[users]]\nname = \"postgres\"\n",
                cluster().node.port
            ),
        )
        .unwrap();
        let log = dir.join("router.log");
        let child = Command::new(BIN)
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .env("SHARDGATE_LOG", "shardgate=debug,info")
            .stdin(Stdio::null())
            .stdout(Stdio::from(
                std::fs::File::create(dir.join("router.out")).unwrap(),
            ))
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .kill_on_drop(true)
            .spawn()
            .expect("start shardgate-under-test");
        let mut r = RouterProcess { child, port, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(c) = connect(&r.conn_str(db)).await
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

    fn conn_str(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={db} sslmode=disable connect_timeout=10",
            self.port
        )
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Connects and keeps the connection task's handle: its result says how the server
/// ended the connection (an unsolicited FATAL comes out as a db error).
async fn connect_watched(
    conn_str: &str,
) -> (
    tokio_postgres::Client,
    tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
) {
    let (client, conn) = tokio_postgres::connect(conn_str, tokio_postgres::NoTls)
        .await
        .expect("connect through the router");
    (client, tokio::spawn(conn))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_lets_open_transactions_finish() {
    let db = new_db();
    let dir = tempfile::tempdir().unwrap();
    let mut r = RouterProcess::start(dir.path(), "shutdown_timeout_ms = 10000\n", &db).await;

    let (a, _a_conn) = connect_watched(&r.conn_str(&db)).await;
    a.batch_execute("CREATE TABLE t (id int)").await.unwrap();
    a.batch_execute("BEGIN; INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let (b, b_conn) = connect_watched(&r.conn_str(&db)).await;
    b.simple_query("SELECT 1").await.unwrap();
    // A third client is in the middle of a statement outside a transaction block when
    // the signal comes: its answer must still arrive.
    let (c, _c_conn) = connect_watched(&r.conn_str(&db)).await;
    let running = tokio::spawn(async move {
        let r = c
            .query_one("SELECT 7::int FROM pg_sleep(1.5)", &[])
            .await
            .map(|row| row.get::<_, i32>(0));
        (c, r)
    });
    let direct = connect(&direct_str(&db)).await.unwrap();
    let sleeping = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND query LIKE '%pg_sleep(1.5)%' AND state = 'active' AND pid <> pg_backend_pid()"
    );
    assert_eq!(poll_count(&direct, &sleeping, 1).await, 1);

    let signalled = Instant::now();
    sigterm(&r.child);

    // The idle client is told at once (57P01) and disconnected.
    let b_end = tokio::time::timeout(Duration::from_secs(5), b_conn)
        .await
        .unwrap_or_else(|_| panic!("the idle client was not disconnected: {}", r.logs()))
        .unwrap();
    match &b_end {
        Err(e) if e.as_db_error().is_some() => {
            assert_eq!(sqlstate(e).as_deref(), Some("57P01"), "{e:?}")
        }
        // A plain close is acceptable; a FATAL with another code is not.
        other => eprintln!("idle client's connection ended without an error frame: {other:?}"),
    }
    assert!(b.is_closed());
    assert!(b.simple_query("SELECT 1").await.is_err());

    // No new clients.
    match connect(&r.conn_str(&db)).await {
        Ok(c) => panic!(
            "a new client got in during shutdown: {:?}",
            c.simple_query("SELECT 1").await
        ),
        Err(e) => eprintln!("new client refused as expected: {e}"),
    }
    // The process waits for the open transaction.
    assert!(
        r.child.try_wait().unwrap().is_none(),
        "the router exited with a transaction open: {}",
        r.logs()
    );

    // The statement that was running finishes with its result.
    let (c, res) = tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("the running statement hung")
        .unwrap();
    assert_eq!(
        res.as_ref().ok(),
        Some(&7),
        "a statement running at SIGTERM lost its answer: {res:?}\n{}",
        r.logs()
    );
    drop(c);

    // The client in the transaction can keep working and commit.
    a.batch_execute("INSERT INTO t VALUES (2)")
        .await
        .unwrap_or_else(|e| panic!("statement in an open transaction during shutdown: {e:?}"));
    a.batch_execute("COMMIT")
        .await
        .unwrap_or_else(|e| panic!("COMMIT during shutdown: {e:?}\n{}", r.logs()));

    // Then the process ends, well before the grace period is over, with status 0.
    let status = wait_exit(&mut r.child, Duration::from_secs(8)).await;
    assert!(status.success(), "exit status {status}: {}", r.logs());
    assert!(
        signalled.elapsed() < Duration::from_secs(9),
        "exit took {:?}: it should not wait for the whole shutdown_timeout once the transaction ended",
        signalled.elapsed()
    );
    assert!(a.simple_query("SELECT 1").await.is_err());

    let n: i64 = direct
        .query_one("SELECT count(*) FROM t WHERE id IN (1, 2)", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2, "the committed rows are on Postgres");
    // The router's backends are gone.
    let left = poll_count(
        &direct,
        &format!("SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND pid <> pg_backend_pid()"),
        0,
    )
    .await;
    assert_eq!(left, 0, "router backends still connected after exit");
}

async fn poll_count(c: &tokio_postgres::Client, sql: &str, want: i64) -> i64 {
    let mut last = -1;
    for _ in 0..100 {
        last = c.query_one(sql, &[]).await.unwrap().get(0);
        if last == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_timeout_rolls_back_open_transactions() {
    let db = new_db();
    let dir = tempfile::tempdir().unwrap();
    let mut r = RouterProcess::start(dir.path(), "shutdown_timeout_ms = 1000\n", &db).await;
    let (a, a_conn) = connect_watched(&r.conn_str(&db)).await;
    a.batch_execute("CREATE TABLE t (id int)").await.unwrap();
    a.batch_execute("BEGIN; INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let direct = connect(&direct_str(&db)).await.unwrap();
    let idle_in_tx = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND state LIKE 'idle in transaction%'"
    );
    assert_eq!(poll_count(&direct, &idle_in_tx, 1).await, 1);

    let signalled = Instant::now();
    sigterm(&r.child);
    let status = wait_exit(&mut r.child, Duration::from_secs(10)).await;
    let took = signalled.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "exited after {took:?}, before the 1 s grace period for the open transaction: {}",
        r.logs()
    );
    assert!(took < Duration::from_secs(7), "exit took {took:?}");
    assert!(status.success(), "exit status {status}: {}", r.logs());

    // The client's connection is gone and the transaction did not commit.
    let _ = tokio::time::timeout(Duration::from_secs(5), a_conn)
        .await
        .expect("client connection closed");
    assert!(a.batch_execute("COMMIT").await.is_err());
    assert_eq!(
        poll_count(&direct, &idle_in_tx, 0).await,
        0,
        "idle in transaction left"
    );
    let n: i64 = direct
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "the uncommitted row must not be visible");
}

/// Stops whatever `dev` servers are still running in a data directory when a test
/// fails half-way.
struct DevDirGuard(PathBuf);

impl Drop for DevDirGuard {
    fn drop(&mut self) {
        for node in ["coordinator", "worker1"] {
            let d = self.0.join(node);
            if d.join("postmaster.pid").exists() {
                let _ = pg_ctl(&["stop", "-m", "immediate", "-w", "-D"], &d);
            }
        }
    }
}

/// pg_ctl as the server user (runuser when root, as the servers run as `postgres`).
fn pg_ctl(args: &[&str], data: &Path) -> std::process::Output {
    let tool = pg_tool("pg_ctl");
    let mut c = if is_root() {
        let mut c = std::process::Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(tool);
        c
    } else {
        std::process::Command::new(tool)
    };
    c.args(args)
        .arg(data)
        .stdin(Stdio::null())
        .output()
        .expect("run pg_ctl")
}

struct DevProcess {
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl DevProcess {
    fn start(data: &Path) -> (DevProcess, u16) {
        let port = free_port().unwrap();
        let metrics = free_port().unwrap();
        let mut child = Command::new(BIN)
            .args(["dev", "--workers", "1", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(data)
            .arg("--metrics")
            .arg(format!("127.0.0.1:{metrics}"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start shardgate-under-test dev");
        let collect = |pipe: Box<dyn tokio::io::AsyncRead + Unpin + Send>| {
            let buf = Arc::new(Mutex::new(String::new()));
            let b = buf.clone();
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(pipe).lines();
                while let Ok(Some(l)) = lines.next_line().await {
                    let mut b = b.lock().unwrap();
                    b.push_str(&l);
                    b.push('\n');
                }
            });
            buf
        };
        let stdout = collect(Box::new(child.stdout.take().unwrap()));
        let stderr = collect(Box::new(child.stderr.take().unwrap()));
        (
            DevProcess {
                child,
                stdout,
                stderr,
            },
            port,
        )
    }

    fn output(&self) -> String {
        format!(
            "stdout:\n{}\nstderr:\n{}",
            self.stdout.lock().unwrap(),
            self.stderr.lock().unwrap()
        )
    }

    /// Polls until `sql` works through the router with psql (initdb takes a while).
    async fn wait_ready(&mut self, port: u16) {
        let conn = format!(
            "host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=disable connect_timeout=5"
        );
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let o = psql(&conn, "SELECT 1").await;
            if o.status.success() {
                return;
            }
            if let Ok(Some(s)) = self.child.try_wait() {
                panic!("dev exited with {s}: {}", self.output());
            }
            assert!(
                Instant::now() < deadline,
                "dev did not come up: {}\n{}",
                String::from_utf8_lossy(&o.stderr),
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The connection string of the `psql "..."` line dev printed.
    fn printed_conn_str(&self) -> String {
        let out = self.stdout.lock().unwrap().clone();
        let line = out
            .lines()
            .find(|l| l.trim_start().starts_with("psql \""))
            .unwrap_or_else(|| panic!("no psql command line on stdout: {}", self.output()));
        let start = line.find('"').unwrap() + 1;
        let end = line.rfind('"').unwrap();
        assert!(end > start, "unbalanced quotes in {line:?}");
        line[start..end].to_owned()
    }

    async fn stop(&mut self) {
        sigterm(&self.child);
        let status = wait_exit(&mut self.child, Duration::from_secs(90)).await;
        assert!(
            status.success(),
            "dev exit status {status}: {}",
            self.output()
        );
    }
}

async fn psql(conn: &str, sql: &str) -> std::process::Output {
    let mut c = Command::new(pg_tool("psql"));
    c.args([
        "-X",
        "-A",
        "-t",
        "-v",
        "ON_ERROR_STOP=1",
        "-d",
        conn,
        "-c",
        sql,
    ])
    .env_remove("PGPASSWORD")
    .stdin(Stdio::null())
    .kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(60), c.output())
        .await
        .expect("psql hung")
        .expect("run psql")
}

fn assert_stopped(data: &Path, what: &str) {
    for node in ["coordinator", "worker1"] {
        let d = data.join(node);
        let o = pg_ctl(&["status", "-D"], &d);
        assert!(
            !o.status.success(),
            "{what}: the {node} server still runs: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        assert!(
            !d.join("postmaster.pid").exists(),
            "{what}: {node}/postmaster.pid still there"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_command_end_to_end() {
    let tmp = tempfile::Builder::new()
        .prefix("shardgate-dev-test-")
        .tempdir()
        .unwrap();
    let data = tmp.path().join("fleet");
    prepare_dir(tmp.path()).unwrap(); // the servers run as `postgres` when root
    let _guard = DevDirGuard(data.clone());

    // First run: initdb, start, serve.
    let (mut dev, port) = DevProcess::start(&data);
    dev.wait_ready(port).await;
    let printed = dev.printed_conn_str();
    assert!(
        printed.contains(&format!("port={port}")),
        "printed {printed:?}"
    );
    for node in ["coordinator", "worker1"] {
        let o = pg_ctl(&["status", "-D"], &data.join(node));
        assert!(o.status.success(), "{node} should run: {}", dev.output());
    }
    // The printed metrics address serves.
    let metrics_line = dev
        .stdout
        .lock()
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("metrics: http://").map(str::to_owned))
        .unwrap_or_else(|| panic!("no metrics line: {}", dev.output()));
    let maddr: std::net::SocketAddr = metrics_line
        .trim_end_matches("/metrics")
        .parse()
        .unwrap_or_else(|e| panic!("metrics line {metrics_line:?}: {e}"));
    let (status, body) = http_get(maddr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        body.contains("shardgate_frontend_client_connections_total"),
        "{body}"
    );
    // The printed command line works as printed.
    let o = psql(
        &printed,
        "CREATE TABLE dev_persist (id int, v text); INSERT INTO dev_persist VALUES (42, 'kept')",
    )
    .await;
    assert!(
        o.status.success(),
        "psql with the printed line: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        dev.output()
    );
    dev.stop().await;
    assert_stopped(&data, "after the first run");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the router port still accepts connections"
    );

    // Second run on the same data directory: no initdb, the data is still there.
    let (mut dev, port) = DevProcess::start(&data);
    dev.wait_ready(port).await;
    let o = psql(
        &dev.printed_conn_str(),
        "SELECT v FROM dev_persist WHERE id = 42",
    )
    .await;
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stderr),
        dev.output()
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "kept");
    assert!(
        !dev.stderr.lock().unwrap().contains("initdb"),
        "second run ran initdb again: {}",
        dev.output()
    );
    // This time as Ctrl-C does it: SIGINT.
    let pid = dev.child.id().unwrap() as i32;
    // SAFETY: kill(2) on the pid of our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    let status = wait_exit(&mut dev.child, Duration::from_secs(90)).await;
    assert!(
        status.success(),
        "dev exit status after SIGINT {status}: {}",
        dev.output()
    );
    assert_stopped(&data, "after the second run (SIGINT)");
}

/// `GET path` with a raw HTTP/1.1 request; (status code, body).
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .expect("metrics response")
        .unwrap();
    let raw = String::from_utf8(raw).expect("UTF-8 response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("HTTP head");
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {head}"));
    if let Some(len) = head.lines().find_map(|l| {
        l.to_ascii_lowercase()
            .strip_prefix("content-length:")
            .map(|v| v.trim().to_owned())
    }) {
        assert_eq!(len.parse::<usize>().unwrap(), body.len(), "Content-Length");
    }
    (status, body.to_owned())
}

/// The value of the sample whose name-and-labels text is exactly `series`.
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == series).then(|| v.parse().ok()).flatten()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_and_promtool() {
    let env = TestEnv::new().await;
    let addr = env.router.metrics_addr().expect("metrics_listen is set");
    let c = env.client().await;
    c.batch_execute("CREATE TABLE m (id int); INSERT INTO m VALUES (1), (2)")
        .await
        .unwrap();
    for i in 0..3 {
        c.query("SELECT id FROM m WHERE id > $1", &[&i])
            .await
            .unwrap();
    }
    let e = c
        .simple_query("SELECT * FROM no_such_table")
        .await
        .expect_err("42P01");
    assert_eq!(sqlstate(&e).as_deref(), Some("42P01"));

    let (status, body) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    for name in [
        "shardgate_session_statements_total",
        "shardgate_frontend_client_connections",
        "shardgate_pool_backend_connections",
        "shardgate_session_request_duration_seconds_bucket",
        "shardgate_session_errors_total{class=\"42\"}",
    ] {
        assert!(body.contains(name), "{name} missing from:\n{body}");
    }
    assert!(
        sample(&body, "shardgate_session_errors_total{class=\"42\"}").unwrap_or(0.0) >= 1.0,
        "{body}"
    );
    assert!(
        sample(&body, "shardgate_frontend_client_connections").unwrap_or(0.0) >= 1.0,
        "the open client is counted: {body}"
    );
    let statements: f64 = body
        .lines()
        .filter(|l| l.starts_with("shardgate_session_statements_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    assert!(statements >= 5.0, "statements {statements}: {body}");
    assert!(
        body.lines()
            .any(|l| l.starts_with("shardgate_pool_backend_connections{")),
        "{body}"
    );

    // Gauges come back down when clients leave, also after failed logins.
    for _ in 0..3 {
        let Err(e) = connect(&env.conn_str("not_configured")).await else {
            panic!("a user not in [[users]] got in");
        };
        assert_eq!(sqlstate(&e).as_deref(), Some("28P01"));
    }
    let others: Vec<_> = futures::future::join_all((0..3).map(|_| env.client())).await;
    for o in &others {
        o.simple_query("SELECT 1").await.unwrap();
    }
    // One client in a transaction holds a backend connection: "active".
    others[0].batch_execute("BEGIN; SELECT 1").await.unwrap();
    let (_, body) = http_get(addr, "/metrics").await;
    assert!(
        sample(&body, "shardgate_frontend_client_connections").unwrap_or(0.0) >= 4.0,
        "{body}"
    );
    assert!(
        sample(
            &body,
            "shardgate_pool_backend_connections{node=\"coordinator\",state=\"active\"}"
        )
        .unwrap_or(0.0)
            >= 1.0,
        "a backend lent to a client in a transaction is active: {body}"
    );
    drop(others);
    drop(c);
    let mut body = String::new();
    for _ in 0..100 {
        body = http_get(addr, "/metrics").await.1;
        if sample(&body, "shardgate_frontend_client_connections") == Some(0.0)
            && sample(
                &body,
                "shardgate_pool_backend_connections{node=\"coordinator\",state=\"active\"}",
            ) == Some(0.0)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        sample(&body, "shardgate_frontend_client_connections"),
        Some(0.0),
        "all clients left: {body}"
    );
    assert_eq!(
        sample(
            &body,
            "shardgate_pool_backend_connections{node=\"coordinator\",state=\"active\"}"
        ),
        Some(0.0),
        "no backend connection lent out: {body}"
    );
    assert!(
        sample(&body, "shardgate_frontend_auth_failures_total").unwrap_or(0.0) >= 3.0,
        "{body}"
    );

    // Unknown paths are 404s.
    assert_eq!(http_get(addr, "/nope").await.0, 404);

    // promtool accepts the exposition, lint included.
    let out = tokio::task::spawn_blocking(move || {
        let mut p = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("promtool is needed for this test (Debian: apt-get install prometheus): {e}")
            });
        p.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
        let out = p.wait_with_output().unwrap();
        (out, body)
    })
    .await
    .unwrap();
    let (out, body) = out;
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- body ---\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `serve` with a config it cannot use stops at once with a non-zero status and says
/// why on stderr (and does not hang or listen).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_unusable_configs() {
    let dir = tempfile::tempdir().unwrap();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port();
    let pg = cluster().node.port;
    let users = "[[users]]\nname = \"postgres\"\n";
    let cases = [
        (
            "missing certificate",
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\nauth_method = \"trust\"\ntls_cert = \"{0}/nope.pem\"\ntls_key = \"{0}/nope.key\"\n[coordinator]\nhost = \"127.0.0.1\"\nport = {pg}\n{users}",
                dir.path().display()
            ),
            "nope.pem",
        ),
        (
            "listen address in use",
            format!(
                "[server]\nlisten = \"127.0.0.1:{busy_port}\"\nauth_method = \"trust\"\n[coordinator]\nhost = \"127.0.0.1\"\nport = {pg}\n{users}"
            ),
            &*format!("127.0.0.1:{busy_port}"),
        ),
        (
            "unknown key",
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\nlisten_typo = 1\n[coordinator]\nhost = \"127.0.0.1\"\nport = {pg}\n{users}"
            ),
            "listen_typo",
        ),
        (
            "missing password_env",
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\n[coordinator]\nhost = \"127.0.0.1\"\nport = {pg}\n[[users]]\nname = \"app\"\npassword_env = \"SHARDGATE_TEST_SURELY_UNSET_VAR\"\n"
            ),
            "SHARDGATE_TEST_SURELY_UNSET_VAR",
        ),
    ];
    for (what, config, must_mention) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, &config).unwrap();
        let out = Command::new(BIN)
            .arg("serve")
            .arg("--config")
            .arg(&path)
            .env_remove("SHARDGATE_TEST_SURELY_UNSET_VAR")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(20), out)
            .await
            .unwrap_or_else(|_| panic!("{what}: serve did not stop"))
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{what}: exit {}; {stderr}",
            out.status
        );
        assert!(
            stderr.contains(must_mention),
            "{what}: stderr should mention {must_mention:?}: {stderr}"
        );
    }
    drop(busy);
}

/// A statement still running when the grace period ends must be cancelled on Postgres,
/// not left running (holding its locks and its transaction open) after the router is
/// gone: closing the socket is not enough, a backend busy in `pg_sleep` or a long scan
/// notices a closed client only when it next writes (CONVENTIONS: "shutdown drains with
/// a timeout, then cancels backend queries").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_timeout_cancels_running_statements() {
    let db = new_db();
    let dir = tempfile::tempdir().unwrap();
    let mut r = RouterProcess::start(dir.path(), "shutdown_timeout_ms = 1000\n", &db).await;
    let (a, _a_conn) = connect_watched(&r.conn_str(&db)).await;
    a.batch_execute("CREATE TABLE t (id int)").await.unwrap();
    a.batch_execute("BEGIN; INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let running = tokio::spawn(async move { a.simple_query("SELECT pg_sleep(60)").await });
    let direct = connect(&direct_str(&db)).await.unwrap();
    let sleeping = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND query LIKE '%pg_sleep(60)%' AND state = 'active' AND pid <> pg_backend_pid()"
    );
    assert_eq!(poll_count(&direct, &sleeping, 1).await, 1);

    sigterm(&r.child);
    let status = wait_exit(&mut r.child, Duration::from_secs(10)).await;
    assert!(status.success(), "exit status {status}: {}", r.logs());
    let res = tokio::time::timeout(Duration::from_secs(5), running)
        .await
        .expect("the client was not disconnected")
        .unwrap();
    assert!(res.is_err(), "{res:?}");
    // Within a few seconds of the router's exit nothing of it runs on Postgres.
    let left = poll_count(
        &direct,
        &format!("SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND pid <> pg_backend_pid()"),
        0,
    )
    .await;
    let detail = direct
        .query("SELECT state, query FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()", &[&db])
        .await
        .unwrap()
        .iter()
        .map(|row| format!("{:?}: {:?}", row.get::<_, Option<String>>(0), row.get::<_, Option<String>>(1)))
        .collect::<Vec<_>>();
    // Do not leave it running for the other tests either way.
    let _ = direct
        .batch_execute(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}' AND pid <> pg_backend_pid()"
        ))
        .await;
    assert_eq!(
        left,
        0,
        "backends still running on Postgres 5 s after the router exited: {detail:?}\n{}",
        r.logs()
    );
    let n: i64 = direct
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}
