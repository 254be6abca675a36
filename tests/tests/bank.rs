//! The bank test: pgbench's tables distributed through the router over two workers of
//! the test's own (accounts by `aid`, tellers by `tid`, branches by `bid`, history by
//! `aid`; scale 1, 8 shards each), so every tpcb-like transaction writes on several
//! nodes and commits with two-phase commit.
//!
//! 1. pgbench's built-in tpcb-like script through the router in the simple, extended
//!    and prepared protocols: no failed transaction; TPS reported.
//! 2. Clients of our own run the same five statements in a loop (retrying on error)
//!    while one worker is killed with SIGKILL and restarted a few seconds later.
//! 3. After `recover_prepared_transactions()` and the recovery loop (every 1 s):
//!    nothing prepared on any node, and money is conserved, every transaction all or
//!    nothing: sum(abalance) = sum(tbalance) = sum(bbalance) = sum(history.delta), and
//!    history has one row per committed transaction at least.
//! 4. pgbench runs again, without failures, after the crash.

use shardgate::dev::fleet::{NodeOptions, PgNode};
use shardgate_tests::tokio_postgres::{Client, Error};
use shardgate_tests::{EnvOptions, TestEnv, connect, metric_sum, pg_tool, start_node};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const SHARDS: i32 = 8;
const PGBENCH_SECS: u32 = 8;
const CHAOS: Duration = Duration::from_secs(60);
const KILL_AT: Duration = Duration::from_secs(25);
const DOWN_FOR: Duration = Duration::from_secs(5);
const CLIENTS: usize = 4;

fn code(e: &Error) -> String {
    e.code()
        .map(|c| c.code().to_owned())
        .unwrap_or_else(|| "(no sqlstate)".into())
}

/// What one pgbench run reported.
#[derive(Debug)]
struct Bench {
    ok: bool,
    tps: f64,
    processed: u64,
    failed: u64,
    #[allow(dead_code)] // shown in failure messages (Debug)
    output: String,
}

/// pgbench's built-in tpcb-like script, verbatim (`pgbench --show-script=tpcb-like`).
/// `-b tpcb-like` itself cannot run through the router: pgbench first counts
/// `pgbench_branches` for the scale, a multi-shard statement the router refuses; with
/// `-f` the scale is `-s`.
const TPCB_LIKE: &str = "\\set aid random(1, 100000 * :scale)
\\set bid random(1, 1 * :scale)
\\set tid random(1, 10 * :scale)
\\set delta random(-5000, 5000)
BEGIN;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;
UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = :bid;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP);
END;
";

/// `pgbench -n -f tpcb-like.sql -s 1 -M mode -c 4 -j 2 -T secs` through the router.
async fn pgbench(env: &TestEnv, mode: &str, secs: u32) -> Bench {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("tpcb-like.sql");
    std::fs::write(&script, TPCB_LIKE).unwrap();
    let out = tokio::process::Command::new(pg_tool("pgbench"))
        .args(["-n", "-s", "1", "-M", mode, "-c", "4", "-j", "2"])
        .arg("-f")
        .arg(&script)
        .args(["-T", &secs.to_string()])
        .args(["-h", "127.0.0.1", "-p", &env.port().to_string()])
        .args(["-U", "postgres", &env.db])
        .output()
        .await
        .expect("run pgbench");
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |prefix: &str| -> Option<String> {
        output
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .map(|r| r.split_whitespace().next().unwrap_or("").to_owned())
    };
    Bench {
        ok: out.status.success(),
        tps: field("tps = ").and_then(|s| s.parse().ok()).unwrap_or(0.0),
        processed: field("number of transactions actually processed: ")
            .and_then(|s| s.split('/').next()?.parse().ok())
            .unwrap_or(0),
        failed: field("number of failed transactions: ")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        output,
    }
}

/// One tpcb-like transaction (pgbench's five statements), extended protocol.
async fn tpcb(c: &Client, scale: i32) -> Result<(), Error> {
    let (aid, bid, tid, delta) = {
        let mut r = rand::rng();
        use rand::Rng;
        (
            r.random_range(1..=100_000 * scale),
            r.random_range(1..=scale),
            r.random_range(1..=10 * scale),
            r.random_range(-5000..=5000i32),
        )
    };
    c.batch_execute("BEGIN").await?;
    c.execute(
        "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2",
        &[&delta, &aid],
    )
    .await?;
    c.query_one(
        "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
        &[&aid],
    )
    .await?;
    c.execute(
        "UPDATE pgbench_tellers SET tbalance = tbalance + $1 WHERE tid = $2",
        &[&delta, &tid],
    )
    .await?;
    c.execute(
        "UPDATE pgbench_branches SET bbalance = bbalance + $1 WHERE bid = $2",
        &[&delta, &bid],
    )
    .await?;
    c.execute(
        "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP)",
        &[&tid, &bid, &aid, &delta],
    )
    .await?;
    c.batch_execute("END").await
}

/// Prepared transactions of the test's database on the coordinator and the workers.
async fn prepared(env: &TestEnv) -> Vec<i64> {
    let mut out = Vec::new();
    for c in [env.direct().await, env.worker(0).await, env.worker(1).await] {
        out.push(
            c.query_one(
                "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0),
        );
    }
    out
}

/// sum(column) and count(*) over every shard of `table` on both workers (straight to
/// the workers: the shards are `<table>_<shardid>`).
async fn shard_sums(env: &TestEnv, table: &str, column: &str) -> (i64, i64, usize) {
    let (mut sum, mut count, mut shards) = (0i64, 0i64, 0usize);
    for i in 0..2 {
        let w = env.worker(i).await;
        let names: Vec<String> = w
            .query(
                "SELECT tablename::text FROM pg_tables WHERE tablename ~ ('^' || $1 || '_[0-9]+$')",
                &[&table],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        for n in names {
            let r = w
                .query_one(
                    &format!("SELECT coalesce(sum({column}), 0)::int8, count(*) FROM {n}"),
                    &[],
                )
                .await
                .unwrap();
            sum += r.get::<_, i64>(0);
            count += r.get::<_, i64>(1);
            shards += 1;
        }
    }
    (sum, count, shards)
}

/// Restarts a killed server: its old backends may take a moment to exit.
fn restart(node: &PgNode) {
    let t = Instant::now();
    loop {
        match node.start() {
            Ok(()) => return,
            Err(e) if t.elapsed() < Duration::from_secs(30) => {
                eprintln!("restart: {e}; retrying");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => panic!("worker does not restart: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn money_is_conserved_across_a_worker_crash() {
    let opts = NodeOptions {
        max_connections: 300,
        fsync: false,
    };
    let (w0, _) = start_node(&opts);
    let (w1, _) = start_node(&opts);
    let env = TestEnv::with(EnvOptions {
        pool_mode: "transaction",
        pool_size: 8,
        own_workers: vec![w0.clone(), w1.clone()],
        extra: "[transactions]\nrecovery_interval_ms = 1000\ndeadlock_interval_ms = 500\n".into(),
        ..Default::default()
    })
    .await;

    // pgbench's tables and rows on the coordinator, through the router; then each
    // table distributed (its rows move into the shards).
    let init = tokio::process::Command::new(pg_tool("pgbench"))
        .args(["-i", "-q", "-s", "1", "-h", "127.0.0.1"])
        .args(["-p", &env.port().to_string(), "-U", "postgres", &env.db])
        .output()
        .await
        .expect("pgbench -i");
    assert!(
        init.status.success(),
        "pgbench -i through the router: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    let c = env.client().await;
    for (table, key) in [
        ("pgbench_accounts", "aid"),
        ("pgbench_tellers", "tid"),
        ("pgbench_branches", "bid"),
        ("pgbench_history", "aid"),
    ] {
        c.batch_execute(&format!(
            "SELECT create_distributed_table('{table}', '{key}', shard_count => {SHARDS})"
        ))
        .await
        .unwrap_or_else(|e| panic!("distributing {table}: {e:?}"));
    }
    let (_, accounts, shards) = shard_sums(&env, "pgbench_accounts", "abalance").await;
    assert_eq!(accounts, 100_000, "every account in a shard");
    assert_eq!(shards, SHARDS as usize);
    let (_, tellers, _) = shard_sums(&env, "pgbench_tellers", "tbalance").await;
    assert_eq!(tellers, 10);

    // 1. pgbench through the router, every protocol.
    let mut report = Vec::new();
    let m0 = env.metrics().await;
    for mode in ["simple", "extended", "prepared"] {
        let b = pgbench(&env, mode, PGBENCH_SECS).await;
        eprintln!(
            "pgbench -M {mode} -c 4 -j 2 -T {PGBENCH_SECS}: tps {:.1}, processed {}, failed {}",
            b.tps, b.processed, b.failed
        );
        assert!(
            b.ok && b.failed == 0 && b.processed > 0,
            "pgbench -M {mode}: {b:#?}"
        );
        report.push(format!("{mode} {:.1} tps", b.tps));
    }
    let m1 = env.metrics().await;
    let two_pc = metric_sum(&m1, "shardgate_2pc_commits_total")
        - metric_sum(&m0, "shardgate_2pc_commits_total");
    assert!(two_pc > 0.0, "tpcb-like commits with two-phase commit");

    // 2. Our own clients while a worker crashes and comes back.
    let stop = Arc::new(AtomicBool::new(false));
    let commits = Arc::new(AtomicU64::new(0));
    let conn_str = env.conn_str("postgres");
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (stop, commits, conn_str) = (stop.clone(), commits.clone(), conn_str.clone());
        tasks.push(tokio::spawn(async move {
            let mut failures: BTreeMap<String, u64> = BTreeMap::new();
            let mut client: Option<Client> = None;
            while !stop.load(Ordering::Relaxed) {
                let c = match &client {
                    Some(c) if !c.is_closed() => c,
                    _ => match connect(&conn_str).await {
                        Ok(c) => client.insert(c),
                        Err(e) => {
                            *failures.entry(format!("connect {}", code(&e))).or_default() += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                match tpcb(c, 1).await {
                    Ok(()) => {
                        commits.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        *failures.entry(code(&e)).or_default() += 1;
                        let _ = c.batch_execute("ROLLBACK").await;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            failures
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(KILL_AT).await;
    let before_kill = commits.load(Ordering::Relaxed);
    w1.kill9().expect("kill -9 worker 1");
    tokio::time::sleep(DOWN_FOR).await;
    let during_down = commits.load(Ordering::Relaxed) - before_kill;
    let w1c = w1.clone();
    tokio::task::spawn_blocking(move || restart(&w1c))
        .await
        .unwrap();
    let restarted = started.elapsed();
    let at_restart = commits.load(Ordering::Relaxed);
    tokio::time::sleep(CHAOS.saturating_sub(started.elapsed())).await;
    stop.store(true, Ordering::Relaxed);
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    for t in tasks {
        for (k, n) in t.await.unwrap() {
            *failures.entry(k).or_default() += n;
        }
    }
    let chaos_secs = started.elapsed().as_secs_f64();
    let committed = commits.load(Ordering::Relaxed);
    let failed: u64 = failures.values().sum();
    let after_restart = committed - at_restart;
    eprintln!(
        "chaos: {CLIENTS} clients for {chaos_secs:.1} s, worker 1 killed at {KILL_AT:?}, restarted at {restarted:?}: \
         {committed} committed ({:.1} tps; {during_down} while it was down, {after_restart} after the restart), \
         {failed} failed: {failures:?}",
        committed as f64 / chaos_secs
    );
    report.push(format!(
        "chaos {:.1} tps, {committed} committed, {failed} failed {failures:?}",
        committed as f64 / chaos_secs
    ));
    assert!(before_kill > 0, "transactions committed before the crash");
    assert!(failed > 0, "the crash was noticed by some transaction");
    assert!(
        after_restart > 0,
        "transactions commit again after the worker is back"
    );

    // 3. Recovery, then the books.
    let c = env.client().await;
    let t = Instant::now();
    let mut left = prepared(&env).await;
    while left.iter().sum::<i64>() > 0 && t.elapsed() < Duration::from_secs(30) {
        let _ = c
            .batch_execute("SELECT recover_prepared_transactions()")
            .await;
        tokio::time::sleep(Duration::from_millis(250)).await;
        left = prepared(&env).await;
    }
    eprintln!("recovery: prepared left {left:?} after {:?}", t.elapsed());
    assert_eq!(
        left,
        vec![0, 0, 0],
        "nothing prepared on the coordinator and the workers"
    );
    let (a, _, _) = shard_sums(&env, "pgbench_accounts", "abalance").await;
    let (t_, _, _) = shard_sums(&env, "pgbench_tellers", "tbalance").await;
    let (b, _, _) = shard_sums(&env, "pgbench_branches", "bbalance").await;
    let (h, hist_rows, _) = shard_sums(&env, "pgbench_history", "delta").await;
    eprintln!(
        "books: sum(abalance) {a}, sum(tbalance) {t_}, sum(bbalance) {b}, sum(delta) {h}, history rows {hist_rows}"
    );
    assert_eq!((a, t_, b), (h, h, h), "money is conserved");
    assert!(
        hist_rows as u64 >= committed,
        "every committed transaction left its history row: {hist_rows} < {committed}"
    );

    // 4. pgbench again after the crash.
    let b = pgbench(&env, "prepared", 5).await;
    eprintln!(
        "pgbench -M prepared after the crash: tps {:.1}, processed {}, failed {}",
        b.tps, b.processed, b.failed
    );
    assert!(
        b.ok && b.failed == 0 && b.processed > 0,
        "pgbench after the crash: {b:#?}"
    );
    report.push(format!("after the crash prepared {:.1} tps", b.tps));
    let m2 = env.metrics().await;
    eprintln!(
        "report: {report:?}; 2PC commits {}, aborts {}",
        metric_sum(&m2, "shardgate_2pc_commits_total"),
        metric_sum(&m2, "shardgate_2pc_aborts_total")
    );
    let (a2, _, _) = shard_sums(&env, "pgbench_accounts", "abalance").await;
    let (h2, _, _) = shard_sums(&env, "pgbench_history", "delta").await;
    assert_eq!(a2, h2, "money is conserved after the last run");
    assert_eq!(prepared(&env).await, vec![0, 0, 0]);
}
