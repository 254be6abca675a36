//! Real clients through the router: psql (meta-commands, `\copy`, transactions, error
//! handling), pgbench (initialisation and the built-in scripts in every query mode, with
//! more clients than backend connections) and psycopg 3 (a libpq-based driver from the
//! Python ecosystem, `tests/python/driver_check.py`). Outputs are compared exactly and
//! the backend is checked afterwards.

use shardgate_tests::{EnvOptions, TestEnv, pg_tool};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs `cmd` on a blocking thread (the router lives on this runtime), killing it after
/// `limit` (the output then ends with a note saying so, and the status shows the
/// signal). Locale and libpq environment are pinned so the output is comparable.
async fn run(mut cmd: Command, limit: Duration) -> Output {
    cmd.env("LC_ALL", "C")
        .env("LANG", "C")
        .env("PGSSLMODE", "disable")
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGOPTIONS")
        .env_remove("PGSERVICE")
        .env_remove("PGPASSWORD")
        .env_remove("PGDATABASE")
        .env_remove("PGHOST")
        .env_remove("PGPORT")
        .env_remove("PGUSER")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let what = format!("{cmd:?}");
    tokio::task::spawn_blocking(move || {
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        // Drain the pipes on their own threads so a chatty child cannot block.
        let mut out = child.stdout.take().unwrap();
        let mut err = child.stderr.take().unwrap();
        let t_out = std::thread::spawn(move || {
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut out, &mut v).ok();
            v
        });
        let t_err = std::thread::spawn(move || {
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut err, &mut v).ok();
            v
        });
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait") {
                break s;
            }
            if Instant::now() > deadline {
                // Our own child, by its handle: the exit status then shows the kill.
                let _ = child.kill();
                let status = child.wait().expect("wait");
                let mut stderr = t_err.join().unwrap();
                stderr.extend_from_slice(
                    format!("\n[killed: did not finish within {limit:?}]\n").as_bytes(),
                );
                return Output {
                    status,
                    stdout: t_out.join().unwrap(),
                    stderr,
                };
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Output {
            status,
            stdout: t_out.join().unwrap(),
            stderr: t_err.join().unwrap(),
        }
    })
    .await
    .expect("runner thread")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn show(o: &Output) -> String {
    format!(
        "exit: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        o.status,
        text(&o.stdout),
        text(&o.stderr)
    )
}

/// Backends of this test's database that are inside a transaction (they must not be:
/// every client finished and the pool got its connections back clean).
async fn assert_no_idle_in_transaction(env: &TestEnv, after: &str) {
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' \
         AND state LIKE 'idle in transaction%'",
        env.db
    );
    let n = env.eventually(&sql, 0).await;
    if n != 0 {
        let direct = env.direct().await;
        let rows = direct
            .query(
                "SELECT pid, state, query FROM pg_stat_activity WHERE datname = $1",
                &[&env.db],
            )
            .await
            .unwrap();
        let detail: Vec<String> = rows
            .iter()
            .map(|r| {
                format!(
                    "{} {:?} {:?}",
                    r.get::<_, i32>(0),
                    r.get::<_, Option<&str>>(1),
                    r.get::<_, Option<&str>>(2)
                )
            })
            .collect();
        panic!(
            "after {after}: {n} backend(s) left idle in transaction:\n{}",
            detail.join("\n")
        );
    }
}

// ---------------------------------------------------------------------------------
// psql
// ---------------------------------------------------------------------------------

const PSQL_SCRIPT: &str = r#"CREATE TABLE fruit (id int PRIMARY KEY, name text NOT NULL, qty int);
INSERT INTO fruit VALUES (1, 'apple', 3), (2, 'banana', 5);
SELECT id, name, qty FROM fruit ORDER BY id;
\copy fruit FROM '@IN@'
\copy (SELECT id, name, qty FROM fruit WHERE id >= 2 ORDER BY id) TO '@OUT@' WITH (FORMAT csv, HEADER)
\copy (SELECT id, name FROM fruit ORDER BY id DESC LIMIT 2) TO STDOUT
BEGIN;
INSERT INTO fruit VALUES (3, 'grape', 1);
UPDATE fruit SET qty = 0;
SELECT count(*) AS in_tx, sum(qty) AS qty_in_tx FROM fruit;
ROLLBACK;
SELECT count(*) AS after_rollback, sum(qty) AS qty_after FROM fruit;
\set wanted 11
\set label 'qty of ' :wanted
SELECT :'label' AS label, coalesce(qty, -1) AS qty FROM fruit WHERE id = :wanted;
SELECT name AS first_name FROM fruit ORDER BY id LIMIT 1 \gset
\echo first is :first_name
\pset format unaligned
\pset tuples_only on
SELECT id || ':' || name FROM fruit ORDER BY id;
\pset format aligned
\pset tuples_only off
\set ON_ERROR_STOP 0
SELECT 1/0;
SELECT * FROM no_such_table;
SELECT 'recovered' AS status;
BEGIN;
INSERT INTO fruit VALUES (20, 'kiwi', 2);
INSERT INTO fruit VALUES (1, 'duplicate', 0);
SELECT 'in aborted transaction';
ROLLBACK;
\set ON_ERROR_ROLLBACK on
BEGIN;
INSERT INTO fruit VALUES (21, 'lime', 4);
INSERT INTO fruit VALUES (1, 'duplicate', 0);
INSERT INTO fruit VALUES (22, 'mango', 6);
COMMIT;
\set ON_ERROR_ROLLBACK off
SELECT id, name, qty FROM fruit ORDER BY id;
"#;

const PSQL_IN: &str = "10\tcherry\t7\n11\tdate\t\\N\n12\tfig, \"dried\"\t0\n";

const PSQL_STDOUT: &str = r#"CREATE TABLE
INSERT 0 2
 id |  name  | qty 
----+--------+-----
  1 | apple  |   3
  2 | banana |   5
(2 rows)

COPY 3
COPY 4
12	fig, "dried"
11	date
BEGIN
INSERT 0 1
UPDATE 6
 in_tx | qty_in_tx 
-------+-----------
     6 |         0
(1 row)

ROLLBACK
 after_rollback | qty_after 
----------------+-----------
              5 |        15
(1 row)

   label   | qty 
-----------+-----
 qty of 11 |  -1
(1 row)

first is apple
Output format is unaligned.
1:apple
2:banana
10:cherry
11:date
12:fig, "dried"
Output format is aligned.
  status   
-----------
 recovered
(1 row)

BEGIN
INSERT 0 1
ROLLBACK
BEGIN
INSERT 0 1
INSERT 0 1
COMMIT
 id |     name     | qty 
----+--------------+-----
  1 | apple        |   3
  2 | banana       |   5
 10 | cherry       |   7
 11 | date         |    
 12 | fig, "dried" |   0
 21 | lime         |   4
 22 | mango        |   6
(7 rows)

"#;

const PSQL_STDERR: &str = r#"psql:@SCRIPT@:24: ERROR:  division by zero
psql:@SCRIPT@:25: ERROR:  relation "no_such_table" does not exist
LINE 1: SELECT * FROM no_such_table;
                      ^
psql:@SCRIPT@:29: ERROR:  duplicate key value violates unique constraint "fruit_pkey"
DETAIL:  Key (id)=(1) already exists.
psql:@SCRIPT@:30: ERROR:  current transaction is aborted, commands ignored until end of transaction block
psql:@SCRIPT@:35: ERROR:  duplicate key value violates unique constraint "fruit_pkey"
DETAIL:  Key (id)=(1) already exists.
"#;

const PSQL_CSV: &str =
    "id,name,qty\n2,banana,5\n10,cherry,7\n11,date,\n12,\"fig, \"\"dried\"\"\",0\n";

fn psql(conn: &str, script: &Path) -> Command {
    let mut cmd = Command::new(pg_tool("psql"));
    cmd.arg("-X")
        .arg("-v")
        .arg("ON_ERROR_STOP=1")
        .arg("-d")
        .arg(conn)
        .arg("-f")
        .arg(script);
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_script() {
    let env = TestEnv::new().await;
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.tsv");
    let out = dir.path().join("out.csv");
    let script = dir.path().join("script.sql");
    std::fs::write(&input, PSQL_IN).unwrap();
    std::fs::write(
        &script,
        PSQL_SCRIPT
            .replace("@IN@", input.to_str().unwrap())
            .replace("@OUT@", out.to_str().unwrap()),
    )
    .unwrap();

    let o = run(
        psql(&env.conn_str("postgres"), &script),
        Duration::from_secs(30),
    )
    .await;
    let ctx = show(&o);
    assert_eq!(o.status.code(), Some(0), "psql failed\n{ctx}");
    assert_eq!(text(&o.stdout), PSQL_STDOUT, "psql stdout differs\n{ctx}");
    assert_eq!(
        text(&o.stderr),
        PSQL_STDERR.replace("@SCRIPT@", script.to_str().unwrap()),
        "psql stderr differs\n{ctx}"
    );
    assert_eq!(
        std::fs::read_to_string(&out).expect("\\copy TO file written"),
        PSQL_CSV
    );

    // The table as Postgres sees it, straight from the backend.
    let direct = env.direct().await;
    let ids: Vec<i32> = direct
        .query("SELECT id FROM fruit ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, vec![1, 2, 10, 11, 12, 21, 22]);

    // ON_ERROR_STOP=1 stops at the first error: psql exits 3 and runs nothing after it.
    let stop = dir.path().join("stop.sql");
    std::fs::write(
        &stop,
        "SELECT 'before' AS a;\nSELECT 1/0;\nSELECT 'after' AS b;\n",
    )
    .unwrap();
    let o = run(
        psql(&env.conn_str("postgres"), &stop),
        Duration::from_secs(30),
    )
    .await;
    let ctx = show(&o);
    assert_eq!(o.status.code(), Some(3), "{ctx}");
    assert_eq!(
        text(&o.stdout),
        "   a    \n--------\n before\n(1 row)\n\n",
        "{ctx}"
    );
    assert_eq!(
        text(&o.stderr),
        format!("psql:{}:2: ERROR:  division by zero\n", stop.display()),
        "{ctx}"
    );

    assert_no_idle_in_transaction(&env, "psql").await;
}

// ---------------------------------------------------------------------------------
// pgbench
// ---------------------------------------------------------------------------------

const PGBENCH_CLIENTS: usize = 12;
const PGBENCH_TX: usize = 50;

fn pgbench(env: &TestEnv, args: &[&str]) -> Command {
    let mut cmd = Command::new(pg_tool("pgbench"));
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &env.port().to_string(),
        "-U",
        "postgres",
    ])
    .args(args)
    .arg(&env.db);
    cmd
}

/// sum(abalance), sum(tbalance), sum(bbalance), sum(delta), count(history).
async fn pgbench_sums(env: &TestEnv) -> [i64; 5] {
    let direct = env.direct().await;
    let r = direct
        .query_one(
            "SELECT (SELECT coalesce(sum(abalance), 0)::int8 FROM pgbench_accounts), \
                    (SELECT coalesce(sum(tbalance), 0)::int8 FROM pgbench_tellers), \
                    (SELECT coalesce(sum(bbalance), 0)::int8 FROM pgbench_branches), \
                    (SELECT coalesce(sum(delta), 0)::int8 FROM pgbench_history), \
                    (SELECT count(*) FROM pgbench_history)",
            &[],
        )
        .await
        .unwrap();
    [r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)]
}

/// `pgbench -i -s 1` through the router, then the TPC-B-like and the select-only
/// scripts in one query mode with more clients than backend connections. Every run is
/// made and checked; the failures are reported together at the end.
async fn pgbench_mode(mode: &str) {
    let env = TestEnv::with(EnvOptions {
        pool_size: 4,
        ..Default::default()
    })
    .await;

    let o = run(pgbench(&env, &["-i", "-s", "1"]), Duration::from_secs(60)).await;
    let ctx = show(&o);
    assert_eq!(o.status.code(), Some(0), "pgbench -i failed\n{ctx}");
    let err = text(&o.stderr);
    assert!(
        err.contains("100000 of 100000 tuples (100%) done"),
        "pgbench -i did not load all rows\n{ctx}"
    );
    assert!(err.contains("\ndone in "), "{ctx}");
    assert!(!err.contains("error"), "{ctx}");
    {
        let direct = env.direct().await;
        let counts = direct
            .query_one(
                "SELECT (SELECT count(*) FROM pgbench_accounts), \
                        (SELECT count(*) FROM pgbench_tellers), \
                        (SELECT count(*) FROM pgbench_branches), \
                        (SELECT count(*) FROM pgbench_history)",
                &[],
            )
            .await
            .unwrap();
        let counts: [i64; 4] = [counts.get(0), counts.get(1), counts.get(2), counts.get(3)];
        assert_eq!(counts, [100000, 10, 1, 0]);
    }
    assert_eq!(pgbench_sums(&env).await, [0, 0, 0, 0, 0]);
    assert_no_idle_in_transaction(&env, "pgbench -i").await;

    let total = PGBENCH_CLIENTS * PGBENCH_TX;
    let mut tpcb_runs = 0i64;
    let mut failures = Vec::new();
    for select_only in [false, true] {
        let label = format!("pgbench -M {mode}{}", if select_only { " -S" } else { "" });
        let clients = PGBENCH_CLIENTS.to_string();
        let tx = PGBENCH_TX.to_string();
        // -n: no vacuum/truncate before the run, so pgbench_history accumulates and the
        // balance invariant holds across runs.
        let mut args = vec!["-n", "-c", &clients, "-j", "2", "-t", &tx, "-M", mode];
        if select_only {
            args.push("-S");
        }
        // A healthy run takes a second or two; the limit only bounds a stuck one.
        let o = run(pgbench(&env, &args), Duration::from_secs(25)).await;
        let ctx = format!("{label}\n{}", show(&o));
        let out = text(&o.stdout);
        let err = text(&o.stderr);
        let want_type = if select_only {
            "transaction type: <builtin: select only>"
        } else {
            "transaction type: <builtin: TPC-B (sort of)>"
        };
        let missing: Vec<String> = [
            want_type.to_string(),
            format!("query mode: {mode}"),
            format!("number of clients: {PGBENCH_CLIENTS}"),
            format!("number of transactions per client: {PGBENCH_TX}"),
            format!("number of transactions actually processed: {total}/{total}"),
            "number of failed transactions: 0 (0.000%)".to_string(),
        ]
        .into_iter()
        .filter(|line| !out.lines().any(|l| l == line))
        .collect();
        if o.status.code() != Some(0) || !missing.is_empty() || err.contains("error") {
            failures.push(format!("{label}: missing lines {missing:?}\n{ctx}"));
        }
        if !select_only {
            tpcb_runs += 1;
        }
        // Only committed transactions leave history rows, and every one of them moved
        // the same delta through account, teller and branch.
        let [a, t, b, d, n] = pgbench_sums(&env).await;
        if !select_only && o.status.code() == Some(0) && n != tpcb_runs * total as i64 {
            failures.push(format!(
                "{label}: {n} pgbench_history rows, want {}",
                tpcb_runs * total as i64
            ));
        }
        if !(a == t && t == b && b == d) {
            failures.push(format!(
                "{label}: balances diverged: sum(abalance)={a} sum(tbalance)={t} \
                 sum(bbalance)={b} sum(delta)={d}"
            ));
        }
        let sql = format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' \
             AND state LIKE 'idle in transaction%'",
            env.db
        );
        let idle_in_tx = env.eventually(&sql, 0).await;
        if idle_in_tx != 0 {
            failures.push(format!(
                "{label}: {idle_in_tx} backend(s) left idle in transaction"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_simple_protocol() {
    pgbench_mode("simple").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_extended_protocol() {
    pgbench_mode("extended").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_prepared_statements() {
    pgbench_mode("prepared").await;
}

// ---------------------------------------------------------------------------------
// psycopg 3
// ---------------------------------------------------------------------------------

const DRIVER_CHECK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/python/driver_check.py");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_driver() {
    // No skipping: a machine without the driver fails here, saying what to install.
    let probe = tokio::task::spawn_blocking(|| {
        Command::new("python3")
            .args([
                "-c",
                "import psycopg; print(psycopg.__version__, psycopg.pq.__impl__)",
            ])
            .output()
    })
    .await
    .unwrap();
    let o = probe.unwrap_or_else(|e| {
        panic!("python3 cannot be started ({e}): install CPython 3 and `pip install \"psycopg[binary]\"`")
    });
    assert!(
        o.status.success(),
        "psycopg 3 is not importable by python3: run `pip install \"psycopg[binary]\"`\n{}",
        show(&o)
    );

    let env = TestEnv::with(EnvOptions {
        pool_size: 4,
        ..Default::default()
    })
    .await;
    let mut cmd = Command::new("python3");
    cmd.arg(DRIVER_CHECK).arg(env.conn_str("postgres"));
    let o = run(cmd, Duration::from_secs(90)).await;
    let ctx = show(&o);
    assert_eq!(o.status.code(), Some(0), "driver_check.py failed\n{ctx}");
    assert_eq!(
        text(&o.stdout).lines().last(),
        Some("OK"),
        "driver_check.py did not finish\n{ctx}"
    );
    assert_no_idle_in_transaction(&env, "psycopg").await;
}
