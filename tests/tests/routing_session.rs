//! Sessions over several nodes: transactions touching the coordinator and two workers in
//! both pool modes, failed transactions, key conversions (binary and text parameters,
//! NULL), and the plan cache's metrics. Real Postgres: a coordinator and 2 workers.

use shardgate_tests::raw::{self, Raw};
use shardgate_tests::tokio_postgres::{Client, Error};
use shardgate_tests::{EnvOptions, TestEnv, connect, metric_sum, two_node_table};
use std::time::Duration;

fn code(e: &Error) -> String {
    e.as_db_error()
        .map(|d| d.code().code().to_owned())
        .unwrap_or_else(|| format!("not a db error: {e}"))
}

async fn fleet(pool_mode: &'static str) -> TestEnv {
    TestEnv::with(EnvOptions {
        workers: 2,
        pool_mode,
        ..Default::default()
    })
    .await
}

/// Two workers, transaction pooling, one backend connection per node: consecutive
/// statements on one node share a connection, whichever client sends them.
async fn one_connection_per_node() -> TestEnv {
    TestEnv::with(EnvOptions {
        workers: 2,
        pool_size: 1,
        pool_mode: "transaction",
        ..Default::default()
    })
    .await
}

async fn v(c: &Client, id: i64) -> i32 {
    c.query_one("SELECT v FROM t WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0)
}

/// What `sql` (`{t}` standing for the shard table) gives on each worker's copy of the
/// reference table `kinds`.
async fn kinds_copies(env: &TestEnv, sql: &str) -> Vec<i64> {
    let mut out = Vec::new();
    for i in 0..2 {
        let w = env.worker(i).await;
        let t: String = w
            .query_one(
                "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables WHERE tablename ~ '^kinds_[0-9]+$'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        let v: i64 = w
            .query_one(&sql.replace("{t}", &t), &[])
            .await
            .unwrap()
            .get(0);
        out.push(v);
    }
    out
}

/// Open transactions left on any node by the router (none once clients are done).
async fn open_transactions(env: &TestEnv) -> i64 {
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' AND state LIKE 'idle in transaction%'",
        env.db
    );
    let mut n = 0;
    for _ in 0..50 {
        n = 0;
        for c in [env.direct().await, env.worker(0).await, env.worker(1).await] {
            n += c.query_one(&sql, &[]).await.unwrap().get::<_, i64>(0);
        }
        if n == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_over_the_coordinator_and_two_workers() {
    for mode in ["transaction", "session"] {
        let env = fleet(mode).await;
        let c = env.client().await;
        let (a, b) = two_node_table(&c, true).await;

        // One node writes, the others (a worker, the coordinator) read: it commits.
        c.batch_execute("BEGIN").await.unwrap();
        c.execute("UPDATE t SET v = 1 WHERE id = $1", &[&a])
            .await
            .unwrap();
        assert_eq!(v(&c, b).await, 0, "{mode}: read on the other worker");
        assert_eq!(
            v(&c, a).await,
            1,
            "{mode}: own write visible in the transaction"
        );
        c.batch_execute("SELECT count(*) FROM local_log")
            .await
            .unwrap();
        c.batch_execute("COMMIT").await.unwrap();
        let other = env.client().await;
        assert_eq!(v(&other, a).await, 1, "{mode}: committed");

        // Two writer nodes: two-phase commit; both writes stay.
        c.batch_execute("BEGIN").await.unwrap();
        c.execute("UPDATE t SET v = 2 WHERE id = $1", &[&a])
            .await
            .unwrap();
        c.execute("UPDATE t SET v = 2 WHERE id = $1", &[&b])
            .await
            .unwrap();
        c.batch_execute("COMMIT").await.unwrap();
        assert_eq!(v(&other, a).await, 2, "{mode}: committed on both nodes");
        assert_eq!(v(&other, b).await, 2, "{mode}");
        assert_eq!(
            env.prepared_anywhere().await,
            0,
            "{mode}: nothing left prepared"
        );

        // Two writer nodes rolled back: nothing of it stays.
        c.batch_execute("BEGIN").await.unwrap();
        c.execute("UPDATE t SET v = 3 WHERE id = $1", &[&a])
            .await
            .unwrap();
        c.execute("UPDATE t SET v = 3 WHERE id = $1", &[&b])
            .await
            .unwrap();
        c.batch_execute("ROLLBACK").await.unwrap();
        assert_eq!(v(&other, a).await, 2, "{mode}: rolled back");
        assert_eq!(v(&other, b).await, 2, "{mode}");

        // A statement failing after writes on two nodes: the failed node answers, and
        // COMMIT rolls everything back (as Postgres would).
        c.batch_execute("BEGIN").await.unwrap();
        c.execute("UPDATE t SET v = 4 WHERE id = $1", &[&a])
            .await
            .unwrap();
        let e = c
            .execute("UPDATE t SET v = 1 / 0 WHERE id = $1", &[&b])
            .await
            .unwrap_err();
        assert_eq!(code(&e), "22012", "{mode}: {e:?}");
        let e = c.batch_execute("SELECT 1").await.unwrap_err();
        assert_eq!(code(&e), "25P02", "{mode}");
        let e = c
            .query("SELECT v FROM t WHERE id = $1", &[&a])
            .await
            .unwrap_err();
        assert_eq!(code(&e), "25P02", "{mode}: the failed node answers");
        c.batch_execute("COMMIT").await.unwrap();
        assert_eq!(v(&c, a).await, 2, "{mode}: rolled back");
        assert_eq!(v(&c, b).await, 2, "{mode}");

        // The coordinator writing and a worker writing: two-phase commit too.
        c.batch_execute("BEGIN; INSERT INTO local_log VALUES (1)")
            .await
            .unwrap();
        c.batch_execute(&format!("UPDATE t SET v = 1 WHERE id = {a}"))
            .await
            .unwrap();
        c.batch_execute("COMMIT").await.unwrap();
        let n: i64 = other
            .query_one("SELECT count(*) FROM local_log", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1, "{mode}: the coordinator's part committed");
        assert_eq!(v(&other, a).await, 1, "{mode}: the worker's part committed");
        assert_eq!(
            env.prepared_anywhere().await,
            0,
            "{mode}: nothing left prepared"
        );

        // An error on a worker inside a transaction: ROLLBACK ends every node's part.
        c.batch_execute("BEGIN").await.unwrap();
        c.batch_execute("SELECT count(*) FROM local_log")
            .await
            .unwrap();
        let e = c
            .batch_execute(&format!("UPDATE t SET v = 1 / 0 WHERE id = {a}"))
            .await
            .unwrap_err();
        assert_eq!(code(&e), "22012", "{mode}");
        let e = c.batch_execute("SELECT 1").await.unwrap_err();
        assert_eq!(code(&e), "25P02", "{mode}");
        c.batch_execute("COMMIT").await.unwrap();
        assert_eq!(v(&c, a).await, 1, "{mode}");

        // Isolation level of the client's BEGIN reaches a node joining later.
        c.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            .await
            .unwrap();
        let _ = v(&c, a).await;
        let level: String = c
            .query_one(
                &format!("SELECT current_setting('transaction_isolation') FROM t WHERE id = {b}"),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(level, "repeatable read", "{mode}");
        c.batch_execute("COMMIT").await.unwrap();

        drop(c);
        drop(other);
        assert_eq!(
            open_transactions(&env).await,
            0,
            "{mode}: nothing left open"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_convert_from_every_parameter_form() {
    let env = fleet("transaction").await;
    let c = env.client().await;
    let (a, _) = two_node_table(&c, true).await;
    // An int4 parameter (binary, 4 bytes) for an int8 column.
    let rows = c
        .query("SELECT id FROM t WHERE id = $1::int4", &[&(a as i32)])
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    // A text parameter.
    let rows = c
        .query(
            "SELECT id FROM t WHERE id = $1::text::int8",
            &[&a.to_string()],
        )
        .await;
    // Either routed by the text value or refused as not pinned; never wrong.
    match rows {
        Ok(r) => assert_eq!(r.len(), 1),
        Err(e) => assert_eq!(code(&e), "0A000", "{e:?}"),
    }
    // A quoted literal for an int8 column.
    let rows = c
        .simple_query(&format!("SELECT id FROM t WHERE id = '{a}'"))
        .await
        .unwrap();
    assert_eq!(rows.len(), 3, "description, one row, command tag: {rows:?}");
    // NULL: no row matches on any shard; writing a NULL key is refused.
    let none: Option<i64> = None;
    let rows = c
        .query("SELECT id FROM t WHERE id = $1", &[&none])
        .await
        .unwrap();
    assert!(rows.is_empty());
    let e = c
        .execute("INSERT INTO t (id, v) VALUES ($1, 1)", &[&none])
        .await
        .unwrap_err();
    assert_eq!(code(&e), "22004", "{e:?}");
    // A value that is not a bigint.
    let e = c
        .batch_execute("SELECT * FROM t WHERE id = 'abc'")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "22P02", "{e:?}");
    // The session goes on.
    assert_eq!(v(&c, a).await, 0);
}

/// A key outside the range of an integer distribution column (`int4 = 2147483648`):
/// Postgres compares it as a bigint, so it matches no row; a row holding it fails with
/// 22003, and so does a quoted one (`'2147483648'`). Through the router: the same,
/// not an error of the router's own (it gave 22P02 for all of them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_outside_an_integer_column_match_no_row() {
    let env = fleet("transaction").await;
    let c = env.client().await;
    for sql in [
        "CREATE TABLE n4 (k int PRIMARY KEY, v int)",
        "SELECT create_distributed_table('n4', 'k')",
        "INSERT INTO n4 VALUES (1, 1), (2, 2), (2147483647, 3), (-2147483648, 4)",
    ] {
        c.batch_execute(sql).await.unwrap();
    }
    for (sql, want) in [
        ("SELECT k FROM n4 WHERE k = 2147483648", "SELECT 0"),
        ("SELECT k FROM n4 WHERE k = -2147483649", "SELECT 0"),
        (
            "SELECT k FROM n4 WHERE k = 99999999999999999999",
            "SELECT 0",
        ),
        ("SELECT count(*) FROM n4 WHERE k = 2147483648", "SELECT 1"),
        ("UPDATE n4 SET v = 0 WHERE k = 2147483648", "UPDATE 0"),
        (
            "DELETE FROM n4 WHERE k = 4294967297 RETURNING k",
            "DELETE 0",
        ),
        // In range, the same statements still find their rows.
        ("SELECT k FROM n4 WHERE k = 2147483647", "SELECT 1"),
        ("SELECT k FROM n4 WHERE k = -2147483648", "SELECT 1"),
    ] {
        let msgs = c.simple_query(sql).await.unwrap();
        let tag = msgs
            .iter()
            .find_map(|m| match m {
                shardgate_tests::tokio_postgres::SimpleQueryMessage::CommandComplete(n) => Some(*n),
                _ => None,
            })
            .unwrap();
        let verb = sql.split_whitespace().next().unwrap();
        assert_eq!(format!("{verb} {tag}"), want, "{sql}");
    }
    let one: i64 = c
        .query_one("SELECT count(*) FROM n4 WHERE k = 2147483648", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(one, 0);
    // A bigint parameter (binary) compared with the int column.
    let rows = c
        .query("SELECT k FROM n4 WHERE k = $1::int8", &[&2147483648i64])
        .await
        .unwrap();
    assert!(rows.is_empty());
    let rows = c
        .query("SELECT k FROM n4 WHERE k = $1::int8", &[&2147483647i64])
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    for (sql, msg) in [
        (
            "INSERT INTO n4 VALUES (2147483648, 5)",
            "integer out of range",
        ),
        (
            "SELECT k FROM n4 WHERE k = '2147483648'",
            "value \"2147483648\" is out of range for type integer",
        ),
        (
            "SELECT k FROM n4 WHERE k = 'abc'",
            "invalid input syntax for type integer: \"abc\"",
        ),
    ] {
        let e = c.batch_execute(sql).await.unwrap_err();
        let db = e.as_db_error().unwrap();
        let want = if msg.starts_with("invalid") {
            "22P02"
        } else {
            "22003"
        };
        assert_eq!((db.code().code(), db.message()), (want, msg), "{sql}");
    }
    let e = c
        .execute("INSERT INTO n4 VALUES ($1::int8, 5)", &[&2147483648i64])
        .await
        .unwrap_err();
    assert_eq!(code(&e), "22003", "{e:?}");
    // Written as a bigint, a quoted value is compared as one: no row, not 22003.
    assert!(
        c.query("SELECT k FROM n4 WHERE k = '2147483648'::bigint", &[])
            .await
            .unwrap()
            .is_empty()
    );
    // Text parameters: of type bigint, no row; of the column's type, 22003 (as
    // Postgres reads them); in range, the row.
    let mut r = Raw::login(env.port(), &env.db).await;
    for (oid, value, want) in [
        (20, "2147483648", "rows 0"),
        (23, "2147483648", "22003"),
        (20, "2147483647", "rows 1"),
    ] {
        r.send(&raw::cat(&[
            raw::parse("", "SELECT k FROM n4 WHERE k = $1", &[oid]),
            raw::bind("", "", &[Some(value)]),
            raw::execute("", 0),
            raw::sync(),
        ]))
        .await;
        let m = r.until_ready().await;
        let got = match raw::errors(&m).first() {
            Some(e) => e.sqlstate(),
            None => format!("rows {}", raw::rows(&m).len()),
        };
        assert_eq!(got, want, "type oid {oid}, {value}: {m:?}");
    }
    // Nothing changed; the session goes on.
    for (k, v) in [(1, 1), (2, 2), (2147483647, 3), (-2147483648, 4)] {
        let got: i32 = c
            .query_one("SELECT v FROM n4 WHERE k = $1", &[&k])
            .await
            .unwrap()
            .get(0);
        assert_eq!(got, v, "row {k}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_plan_serves_every_literal() {
    let env = fleet("transaction").await;
    let c = env.client().await;
    let _ = two_node_table(&c, true).await;
    let before = env.metrics().await;
    let (h0, m0) = (
        metric_sum(&before, "shardgate_plan_cache_hits_total"),
        metric_sum(&before, "shardgate_plan_cache_misses_total"),
    );
    for id in 1..=40 {
        let rows = c
            .simple_query(&format!("SELECT v FROM t WHERE id = {id}"))
            .await
            .unwrap();
        assert_eq!(rows.len(), 3, "id {id}: {rows:?}");
    }
    let after = env.metrics().await;
    let (h1, m1) = (
        metric_sum(&after, "shardgate_plan_cache_hits_total"),
        metric_sum(&after, "shardgate_plan_cache_misses_total"),
    );
    assert_eq!(m1 - m0, 1.0, "one miss for 40 literals");
    assert_eq!(h1 - h0, 39.0);
    assert!(metric_sum(&after, "shardgate_plans_total{tier=\"planner-fastpath\"}") >= 1.0);
}

/// Writes of a reference table reach every placement (both workers) in one distributed
/// transaction: autocommit and inside the client's transaction, with RETURNING, and an
/// error on the way leaves no copy changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_writes_reach_every_placement() {
    for mode in ["transaction", "session"] {
        let env = fleet(mode).await;
        let c = env.client().await;
        c.batch_execute("CREATE TABLE kinds (id int PRIMARY KEY, name text NOT NULL)")
            .await
            .unwrap();
        c.batch_execute("SELECT create_reference_table('kinds')")
            .await
            .unwrap();
        // Autocommit, with RETURNING: the client gets one answer.
        let rows = c
            .simple_query("INSERT INTO kinds VALUES (1, 'a'), (2, 'b') RETURNING id")
            .await
            .unwrap();
        let returned = rows
            .iter()
            .filter(|m| {
                matches!(
                    m,
                    shardgate_tests::tokio_postgres::SimpleQueryMessage::Row(_)
                )
            })
            .count();
        assert_eq!(returned, 2, "{mode}: RETURNING rows of one placement");
        assert_eq!(
            kinds_copies(&env, "SELECT count(*) FROM {t}").await,
            vec![2, 2],
            "{mode}"
        );
        // Autocommit writes right after a statement on either worker (the session is
        // then already on one of the placements' nodes): every copy changes, together.
        let (a, b) = two_node_table(&c, true).await;
        for (i, id) in [(10, a), (11, b), (12, a), (13, b)] {
            c.batch_execute(&format!("SELECT v FROM t WHERE id = {id}"))
                .await
                .unwrap();
            c.batch_execute(&format!("INSERT INTO kinds VALUES ({i}, 'n')"))
                .await
                .unwrap_or_else(|e| panic!("{mode}: {e:?}"));
            c.batch_execute(&format!("DELETE FROM kinds WHERE id = {i}"))
                .await
                .unwrap_or_else(|e| panic!("{mode}: {e:?}"));
        }
        assert_eq!(
            kinds_copies(&env, "SELECT count(*) FROM {t}").await,
            vec![2, 2],
            "{mode}: copies equal"
        );
        // Inside a transaction with a distributed write, then rolled back: no copy changes.
        c.batch_execute("BEGIN").await.unwrap();
        c.batch_execute("UPDATE kinds SET name = 'x' WHERE id = 1")
            .await
            .unwrap();
        c.batch_execute(&format!("UPDATE t SET v = 9 WHERE id = {a}"))
            .await
            .unwrap();
        c.batch_execute("ROLLBACK").await.unwrap();
        assert_eq!(
            kinds_copies(&env, "SELECT count(*) FROM {t} WHERE name = 'x'").await,
            vec![0, 0],
            "{mode}: rolled back on every copy"
        );
        // Committed: every copy changes.
        c.batch_execute("BEGIN").await.unwrap();
        c.batch_execute("UPDATE kinds SET name = 'y' WHERE id = 1")
            .await
            .unwrap();
        c.batch_execute(&format!("UPDATE t SET v = 9 WHERE id = {a}"))
            .await
            .unwrap();
        c.batch_execute("COMMIT").await.unwrap();
        assert_eq!(
            kinds_copies(&env, "SELECT count(*) FROM {t} WHERE name = 'y'").await,
            vec![1, 1],
            "{mode}: committed on every copy"
        );
        assert_eq!(v(&c, a).await, 9, "{mode}");
        // A duplicate key: the client gets 23505, no copy changes, the session goes on.
        let e = c
            .batch_execute("INSERT INTO kinds VALUES (3, 'c'), (1, 'dup')")
            .await
            .unwrap_err();
        assert_eq!(code(&e), "23505", "{mode}: {e:?}");
        assert_eq!(
            kinds_copies(&env, "SELECT count(*) FROM {t}").await,
            vec![2, 2],
            "{mode}"
        );
        // Reads still go to one placement; FOR UPDATE locks every copy.
        let n: i64 = c
            .query_one("SELECT count(*) FROM kinds", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 2, "{mode}");
        c.batch_execute("BEGIN; SELECT 1").await.unwrap();
        c.batch_execute("SELECT * FROM kinds WHERE id = 1 FOR UPDATE")
            .await
            .unwrap();
        c.batch_execute("COMMIT").await.unwrap();
        assert_eq!(
            env.prepared_anywhere().await,
            0,
            "{mode}: nothing left prepared"
        );
        drop(c);
        assert_eq!(
            open_transactions(&env).await,
            0,
            "{mode}: nothing left open"
        );
    }
}

/// A multi-row INSERT whose rows belong to different shards (and nodes) is split row by
/// row and runs in one distributed transaction: all rows or none, RETURNING rows in the
/// VALUES order, one `INSERT 0 n` tag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_row_inserts_across_shards() {
    use shardgate_tests::tokio_postgres::SimpleQueryMessage;
    for mode in ["transaction", "session"] {
        let env = fleet(mode).await;
        let c = env.client().await;
        let _ = two_node_table(&c, true).await; // t: ids 1..=40
        let ids: Vec<i64> = (101..=112).collect();
        let values: Vec<String> = ids.iter().map(|i| format!("({i}, {})", i * 10)).collect();
        let msgs = c
            .simple_query(&format!(
                "INSERT INTO t (id, v) VALUES {} RETURNING id, v",
                values.join(", ")
            ))
            .await
            .unwrap_or_else(|e| panic!("{mode}: {e:?}"));
        let mut returned = Vec::new();
        let mut tag = None;
        for m in &msgs {
            match m {
                SimpleQueryMessage::Row(r) => {
                    returned.push(r.get(0).unwrap().parse::<i64>().unwrap())
                }
                SimpleQueryMessage::CommandComplete(n) => tag = Some(*n),
                _ => {}
            }
        }
        assert_eq!(returned, ids, "{mode}: RETURNING in VALUES order");
        assert_eq!(tag, Some(12), "{mode}: one tag with the total");
        for i in &ids {
            assert_eq!(v(&c, *i).await, (*i * 10) as i32, "{mode}: row {i}");
        }
        // Rows on both workers, and the coordinator's shell table stays empty.
        let direct = env.direct().await;
        let n: i64 = direct
            .query_one("SELECT count(*) FROM ONLY t", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "{mode}: nothing on the coordinator");
        // A duplicate key in the last row: no row of the statement stays.
        let e = c
            .batch_execute("INSERT INTO t (id, v) VALUES (201, 1), (202, 1), (203, 1), (101, 1)")
            .await
            .unwrap_err();
        assert_eq!(code(&e), "23505", "{mode}: {e:?}");
        for i in [201i64, 202, 203] {
            let n = c
                .query("SELECT v FROM t WHERE id = $1", &[&i])
                .await
                .unwrap()
                .len();
            assert_eq!(n, 0, "{mode}: row {i} rolled back");
        }
        // ON CONFLICT DO UPDATE with a key twice: 21000 as on one Postgres (split into
        // rows, the second would update the first's row), simple and extended, and
        // nothing stays. Distinct keys upsert across nodes.
        let keys: Vec<String> = (401..=408).map(|i| format!("({i}, 1)")).collect();
        let upsert = |rows: &str| {
            format!(
                "INSERT INTO t (id, v) VALUES {rows} ON CONFLICT (id) DO UPDATE SET v = excluded.v + 1"
            )
        };
        let e = c
            .batch_execute(&upsert(&format!("{}, (401, 2)", keys.join(", "))))
            .await
            .unwrap_err();
        assert_eq!(code(&e), "21000", "{mode}: {e:?}");
        let e = c
            .execute(
                &upsert("($1, 1), ($2, 1), ($3, 1), ($4, 1), ($2, 2)"),
                &[&401i64, &402i64, &403i64, &404i64],
            )
            .await
            .unwrap_err();
        assert_eq!(code(&e), "21000", "{mode}: {e:?}");
        for i in 401..=408i64 {
            let n = c
                .query("SELECT v FROM t WHERE id = $1", &[&i])
                .await
                .unwrap()
                .len();
            assert_eq!(n, 0, "{mode}: row {i} of a failed upsert stays");
        }
        c.batch_execute(&upsert(&keys.join(", "))).await.unwrap();
        c.batch_execute(&upsert(&keys.join(", "))).await.unwrap();
        assert_eq!(v(&c, 401).await, 2, "{mode}: updated once");
        // Inside a transaction: rolled back with it.
        c.batch_execute("BEGIN").await.unwrap();
        c.batch_execute("INSERT INTO t (id, v) VALUES (301, 1), (302, 1), (303, 1), (304, 1)")
            .await
            .unwrap();
        c.batch_execute("ROLLBACK").await.unwrap();
        for i in [301i64, 302, 303, 304] {
            let n = c
                .query("SELECT v FROM t WHERE id = $1", &[&i])
                .await
                .unwrap()
                .len();
            assert_eq!(n, 0, "{mode}: row {i} rolled back with the transaction");
        }
        assert_eq!(
            env.prepared_anywhere().await,
            0,
            "{mode}: nothing left prepared"
        );
        drop(c);
        assert_eq!(
            open_transactions(&env).await,
            0,
            "{mode}: nothing left open"
        );
    }
}

/// A view over a distributed table would read the coordinator's empty shell: queries on
/// it are refused (0A000, naming the view), never answered empty, also when the view is
/// created after the table was distributed. Other views work, and views can be dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_over_distributed_tables_are_refused_not_answered_empty() {
    let env = fleet("transaction").await;
    let c = env.client().await;
    let _ = two_node_table(&c, true).await;
    // Made on the coordinator directly (through the router, a CREATE VIEW naming a
    // distributed table is refused like any statement no tier plans).
    env.direct()
        .await
        .batch_execute(
            "CREATE VIEW t_view AS SELECT id, v FROM t;
             CREATE VIEW t_view2 AS SELECT count(*) AS n FROM t_view;
             CREATE VIEW plain_view AS SELECT n FROM local_log",
        )
        .await
        .unwrap();
    // Within the catalog's poll (1 s), the router knows the views.
    let mut last = None;
    for _ in 0..50 {
        match c.simple_query("SELECT * FROM t_view2").await {
            Err(e) => {
                last = Some(e);
                break;
            }
            Ok(rows) => {
                last = None;
                drop(rows);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let e = last.expect("a view over a distributed table is refused, not answered");
    assert_eq!(code(&e), "0A000", "{e:?}");
    let msg = e
        .as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_default();
    assert!(msg.contains("t_view2"), "{msg}");
    let e = c
        .query("SELECT v FROM t_view WHERE id = $1", &[&1i64])
        .await
        .unwrap_err();
    assert_eq!(code(&e), "0A000", "{e:?}");
    // A view of local tables only is answered by the coordinator.
    let n = c
        .query("SELECT * FROM plain_view", &[])
        .await
        .unwrap()
        .len();
    assert_eq!(n, 0);
    c.batch_execute("DROP VIEW t_view2; DROP VIEW t_view; DROP VIEW plain_view")
        .await
        .unwrap();
}

/// Statements the router tier plans since the corpus work: a one-shard table needs no
/// key; tables of two colocation groups run where both chosen shards are (and are
/// refused, not half answered, when no node has both); an integer expression of
/// literals is a key; `position(a IN b)` in FROM (which the tiers' parser rejects as
/// written) is planned as Postgres's grammar reads it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shard_tables_constant_keys_and_position_in_from() {
    let env = fleet("transaction").await;
    let c = env.client().await;
    let (a, b) = two_node_table(&c, false).await; // t: ids 1..=40, a and b on two workers
    for sql in [
        "CREATE TABLE one (id int8, note text)",
        "SELECT create_distributed_table('one', 'id', shard_count => 1)",
        "UPDATE t SET v = 7 WHERE id = 2",
    ] {
        c.batch_execute(sql).await.unwrap();
    }
    for id in [a, b, 2] {
        c.execute("INSERT INTO one VALUES ($1, $2)", &[&id, &format!("n{id}")])
            .await
            .unwrap();
    }
    let n: i64 = c
        .query_one("SELECT count(*) FROM one", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 3, "a one-shard table read without a key");
    // `1 + 1` is the key 2, in both protocols.
    let simple = c
        .simple_query("SELECT v FROM t WHERE id = 1 + 1")
        .await
        .unwrap();
    let row = simple.iter().find_map(|m| match m {
        shardgate_tests::tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
        _ => None,
    });
    assert_eq!(row.as_deref(), Some("7"));
    let v: i32 = c
        .query_one("SELECT v FROM t WHERE id = (3 - 2) * 2", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, 7);
    // position() in FROM keeps its column name.
    let r = c
        .query_one(
            "SELECT id, position FROM t, position('om' in 'Thomas') WHERE id = 3",
            &[],
        )
        .await
        .unwrap();
    assert_eq!((r.get::<_, i64>(0), r.get::<_, i32>(1)), (3, 3));
    // The join of t (8 shards) and one (1 shard, another colocation group) runs on the
    // node holding both shards; for keys whose t shard is elsewhere, one's shard is
    // copied to that node first (in both protocols). A write or a locking read across
    // nodes is refused.
    let one_group: i32 = env
        .direct()
        .await
        .query_one(
            "SELECT p.groupid FROM shardgate.pg_dist_placement p JOIN shardgate.pg_dist_shard s USING (shardid) WHERE s.logicalrelid = 'one'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let join = "SELECT t.id, one.note FROM t JOIN one ON one.id = t.id WHERE t.id = $1";
    let mut t_groups = Vec::new();
    let pulled = || async {
        metric_sum(
            &env.metrics().await,
            "shardgate_session_pulled_shards_total",
        )
    };
    for id in [a, b] {
        let shard = shard_of(&c, id).await;
        let t_group: i32 = c
            .query_one(
                "SELECT groupid FROM shardgate.pg_dist_placement WHERE shardid = $1",
                &[&shard],
            )
            .await
            .unwrap()
            .get(0);
        t_groups.push(t_group);
        let before = pulled().await;
        let rows = c.query(join, &[&id]).await.unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].get::<_, String>(1), format!("n{id}"));
        let simple = c
            .simple_query(&join.replace("$1", &id.to_string()))
            .await
            .unwrap();
        let note = simple.iter().find_map(|m| match m {
            shardgate_tests::tokio_postgres::SimpleQueryMessage::Row(r) => {
                r.get(1).map(str::to_owned)
            }
            _ => None,
        });
        assert_eq!(note, Some(format!("n{id}")));
        let copies = pulled().await - before;
        if t_group == one_group {
            assert_eq!(copies, 0.0, "both shards on one node: nothing copied");
        } else {
            assert_eq!(copies, 2.0, "one's shard copied once per protocol");
            let e = c
                .query(&format!("{join} FOR UPDATE OF t"), &[&id])
                .await
                .unwrap_err();
            assert_eq!(code(&e), "0A000", "a locking read: {e:?}");
            let e = c
                .execute(
                    "INSERT INTO t (id, v) SELECT one.id, 1 FROM one WHERE one.id = $1 ON CONFLICT DO NOTHING",
                    &[&id],
                )
                .await
                .unwrap_err();
            assert_eq!(code(&e), "0A000", "a write: {e:?}");
            // In a transaction, the copy is read on the transaction's own connection:
            // it sees the transaction's writes.
            c.batch_execute("BEGIN").await.unwrap();
            c.execute("UPDATE one SET note = 'changed' WHERE id = $1", &[&id])
                .await
                .unwrap();
            let rows = c.query(join, &[&id]).await.unwrap();
            assert_eq!(rows[0].get::<_, String>(1), "changed");
            c.batch_execute("ROLLBACK").await.unwrap();
            let rows = c.query(join, &[&id]).await.unwrap();
            assert_eq!(rows[0].get::<_, String>(1), format!("n{id}"));
        }
    }
    assert_ne!(t_groups[0], t_groups[1], "a and b are on different workers");
    let far = if t_groups[0] == one_group { b } else { a };
    // A shard too large to copy: refused, and in a transaction the transaction fails
    // as Postgres would after an error.
    c.batch_execute("INSERT INTO one SELECT g, 'bulk' FROM generate_series(1000, 11000) g")
        .await
        .unwrap();
    let e = c.query(join, &[&far]).await.unwrap_err();
    assert_eq!(code(&e), "0A000", "{e:?}");
    assert!(
        e.as_db_error()
            .unwrap()
            .message()
            .contains("more than 10000 rows"),
        "{e:?}"
    );
    let simple_join = join.replace("$1", &far.to_string());
    for simple in [false, true] {
        c.batch_execute("BEGIN").await.unwrap();
        let e = if simple {
            c.simple_query(&simple_join).await.map(|_| ()).unwrap_err()
        } else {
            c.query(join, &[&far]).await.map(|_| ()).unwrap_err()
        };
        assert_eq!(code(&e), "0A000", "{e:?}");
        let e = c.query("SELECT 1", &[]).await.unwrap_err();
        assert_eq!(code(&e), "25P02", "{e:?}");
        c.batch_execute("ROLLBACK").await.unwrap();
    }
    // A refused copy after a savepoint: ROLLBACK TO undoes the failure, and COMMIT
    // keeps the transaction's writes, as on one Postgres.
    let v_far = || async {
        c.query_one("SELECT v FROM t WHERE id = $1", &[&far])
            .await
            .unwrap()
            .get::<_, i32>(0)
    };
    let v_before = v_far().await;
    for simple in [false, true] {
        c.batch_execute("BEGIN").await.unwrap();
        c.execute("UPDATE t SET v = v + 1 WHERE id = $1", &[&far])
            .await
            .unwrap();
        c.batch_execute("SAVEPOINT s").await.unwrap();
        let e = if simple {
            c.simple_query(&simple_join).await.map(|_| ()).unwrap_err()
        } else {
            c.query(join, &[&far]).await.map(|_| ()).unwrap_err()
        };
        assert_eq!(code(&e), "0A000", "{e:?}");
        c.batch_execute("ROLLBACK TO SAVEPOINT s").await.unwrap();
        c.batch_execute("COMMIT").await.unwrap();
    }
    assert_eq!(v_far().await, v_before + 2, "both transactions committed");
    c.batch_execute("DELETE FROM one WHERE note = 'bulk'")
        .await
        .unwrap();
    // Tables of another group with a distribution column of another type are not
    // pinned together (a key converts differently for each).
    for sql in [
        "CREATE TABLE tk (k text, n int8)",
        "SELECT create_distributed_table('tk', 'k', shard_count => 4)",
    ] {
        c.batch_execute(sql).await.unwrap();
    }
    let e = c
        .query(
            "SELECT t.v FROM t JOIN tk ON tk.n = t.id WHERE t.id = $1 AND tk.k = $2",
            &[&a, &"x"],
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), "0A000", "{e:?}");
    let msg = e.as_db_error().unwrap().message().to_owned();
    assert!(msg.contains("different types"), "{msg}");
    // The session goes on after the refusal.
    let n: i64 = c
        .query_one("SELECT count(*) FROM one WHERE id = $1", &[&a])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

/// Extended-protocol statements that run on several nodes: a write of a reference table
/// (every placement) and a multi-row INSERT with parameters whose rows span shards (one
/// INSERT per row, parameters renumbered), from tokio-postgres (Bind, Execute, Sync after
/// a prepare) and psycopg (Parse, Bind, Describe, Execute, Sync; and prepared), in both
/// pool modes: every copy changes together, an error leaves nothing, and the client gets
/// one answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_writes_on_several_nodes() {
    for mode in ["transaction", "session"] {
        let env = fleet(mode).await;
        let c = env.client().await;
        for sql in [
            "CREATE TABLE kinds (id int PRIMARY KEY, name text NOT NULL)",
            "SELECT create_reference_table('kinds')",
        ] {
            c.batch_execute(sql).await.unwrap();
        }
        let (a, b) = two_node_table(&c, false).await;
        // A reference write: every placement, one answer.
        let n = c
            .execute("INSERT INTO kinds VALUES ($1, $2)", &[&1i32, &"a"])
            .await
            .unwrap_or_else(|e| panic!("{mode}: {e:?}"));
        assert_eq!(n, 1, "{mode}");
        let rows = c
            .query(
                "UPDATE kinds SET name = $2 WHERE id = $1 RETURNING name",
                &[&1i32, &"b"],
            )
            .await
            .unwrap();
        assert_eq!(rows.len(), 1, "{mode}");
        assert_eq!(rows[0].get::<_, String>(0), "b");
        assert_eq!(
            kinds_copies(&env, "SELECT count(*) FROM {t} WHERE name = 'b'").await,
            vec![1, 1],
            "{mode}"
        );
        let e = c
            .execute("INSERT INTO kinds VALUES ($1, $2)", &[&1i32, &"dup"])
            .await
            .unwrap_err();
        assert_eq!(code(&e), "23505", "{mode}: {e:?}");
        c.batch_execute("BEGIN").await.unwrap();
        c.execute("INSERT INTO kinds VALUES ($1, $2)", &[&2i32, &"x"])
            .await
            .unwrap();
        assert_eq!(v(&c, a).await, 0, "{mode}: a read in the same transaction");
        c.batch_execute("ROLLBACK").await.unwrap();
        assert_eq!(
            kinds_copies(&env, "SELECT count(*) FROM {t}").await,
            vec![1, 1],
            "{mode}"
        );
        // A multi-row INSERT over two workers, a parameter used twice.
        let upsert = "INSERT INTO t (id, v) VALUES ($1, $2), ($3, $4), ($5, $2) ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v RETURNING id, v";
        let rows = c
            .query(upsert, &[&a, &5i32, &b, &6i32, &5000i64])
            .await
            .unwrap_or_else(|e| panic!("{mode}: {e:?}"));
        let got: Vec<(i64, i32)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        assert_eq!(
            got,
            vec![(a, 5), (b, 6), (5000, 5)],
            "{mode}: in VALUES order"
        );
        assert_eq!((v(&c, a).await, v(&c, b).await), (5, 6), "{mode}");
        let n = c
            .execute(
                "INSERT INTO t (id, v) VALUES ($1, $2), ($3, $2) ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v",
                &[&a, &7i32, &b],
            )
            .await
            .unwrap();
        assert_eq!(n, 2, "{mode}: one summed tag");
        // The second row fails (NOT NULL): the first is not kept.
        let e = c
            .execute(
                "INSERT INTO t (id, v) VALUES ($1, $2), ($3, $4) ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v",
                &[&a, &8i32, &b, &None::<i32>],
            )
            .await
            .unwrap_err();
        assert_eq!(code(&e), "23502", "{mode}: {e:?}");
        assert_eq!((v(&c, a).await, v(&c, b).await), (7, 7), "{mode}");

        // psycopg: Parse, Bind, Describe, Execute, Sync in one go; then prepared.
        let have = std::process::Command::new("python3")
            .args(["-c", "import psycopg"])
            .output();
        if !matches!(&have, Ok(o) if o.status.success()) {
            eprintln!("SKIPPED (psycopg part): python3 with psycopg 3 is not available");
            continue;
        }
        let script = r#"
import sys, psycopg
a, b = int(sys.argv[2]), int(sys.argv[3])
with psycopg.connect(sys.argv[1], autocommit=True) as conn:
    cur = conn.cursor()
    cur.execute("INSERT INTO kinds VALUES (%s, %s) RETURNING id", (10, "p"))
    assert cur.fetchall() == [(10,)], "reference RETURNING"
    for prepare in (False, True):
        for k in range(3):
            cur.execute(
                "INSERT INTO t (id, v) VALUES (%s, %s), (%s, %s) ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v RETURNING id, v",
                (a, 100 + k, b, 200 + k), prepare=prepare)
            assert cur.fetchall() == [(a, 100 + k), (b, 200 + k)], (prepare, k)
            assert cur.rowcount == 2, cur.rowcount
            cur.execute("UPDATE kinds SET name = %s WHERE id = %s", ("q%d" % k, 10), prepare=prepare)
            assert cur.rowcount == 1
    with conn.transaction():
        cur.execute("INSERT INTO kinds VALUES (%s, %s)", (11, "in-txn"))
        cur.execute("SELECT v FROM t WHERE id = %s", (a,))
        assert cur.fetchall() == [(102,)]
    try:
        cur.execute("INSERT INTO kinds VALUES (%s, %s)", (11, "dup"))
        raise SystemExit("duplicate accepted")
    except psycopg.errors.UniqueViolation:
        pass
print("OK")
"#;
        let out = tokio::process::Command::new("python3")
            .args(["-c", script])
            .arg(env.conn_str("postgres"))
            .arg(a.to_string())
            .arg(b.to_string())
            .output()
            .await
            .expect("python3");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.trim() == "OK",
            "{mode}: psycopg ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            kinds_copies(
                &env,
                "SELECT count(*) FROM {t} WHERE id = 10 AND name = 'q2' OR id = 11"
            )
            .await,
            vec![2, 2],
            "{mode}"
        );
        assert_eq!((v(&c, a).await, v(&c, b).await), (102, 202), "{mode}");
        assert_eq!(env.prepared_anywhere().await, 0, "{mode}");
        drop(c);
        assert_eq!(
            open_transactions(&env).await,
            0,
            "{mode}: nothing left open"
        );
    }
}

/// A statement prepared while its table was local keeps answering right once the table
/// is distributed (what a statement routes to is worked out per catalog version, not
/// once per statement), and the same statement reaches every shard it is bound to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_follow_a_table_being_distributed() {
    let env = fleet("transaction").await;
    let c = env.client().await;
    c.batch_execute(
        "CREATE TABLE late (id int8 PRIMARY KEY, v int NOT NULL);
         INSERT INTO late SELECT g, g * 10 FROM generate_series(1, 50) g",
    )
    .await
    .unwrap();
    let st = c.prepare("SELECT v FROM late WHERE id = $1").await.unwrap();
    let v: i32 = c.query_one(&st, &[&7i64]).await.unwrap().get(0);
    assert_eq!(v, 70, "local table");
    c.batch_execute("SELECT create_distributed_table('late', 'id', shard_count => 8)")
        .await
        .unwrap();
    // The coordinator's table is an empty shell now: the rows come from the shards.
    for _ in 0..3 {
        for id in 1..=50i64 {
            let rows = c.query(&st, &[&id]).await.unwrap();
            assert_eq!(rows.len(), 1, "row {id} after distribution");
            assert_eq!(rows[0].get::<_, i32>(0), (id * 10) as i32);
        }
    }
    let n: i64 = env
        .direct()
        .await
        .query_one("SELECT count(*) FROM ONLY late", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "the rows are in the shards");
    // A view that comes to read a distributed table (no catalog version change): a
    // statement prepared on it while it was local is refused from then on, not
    // answered from the coordinator's empty shell.
    c.batch_execute(
        "CREATE TABLE loc (id int8, v int);
         INSERT INTO loc VALUES (1, 1);
         CREATE VIEW vv AS SELECT id, v FROM loc",
    )
    .await
    .unwrap();
    let on_view = c.prepare("SELECT v FROM vv WHERE id = $1").await.unwrap();
    assert_eq!(c.query(&on_view, &[&1i64]).await.unwrap().len(), 1);
    env.direct()
        .await
        .batch_execute("CREATE OR REPLACE VIEW vv AS SELECT id, v FROM late")
        .await
        .unwrap();
    let mut refused = None;
    for _ in 0..50 {
        match c.query(&on_view, &[&1i64]).await {
            Err(e) => {
                refused = Some(e);
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let e = refused.expect("the view over a distributed table is refused");
    assert_eq!(code(&e), "0A000", "{e:?}");
}

/// Savepoints in a transaction over two workers behave as on one Postgres: a ROLLBACK
/// TO undoes what every node did since the savepoint (also a node that joined after it,
/// and after an error on one of them), RELEASE keeps it; in both pool modes and both
/// protocols.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn savepoints_span_every_node_of_the_transaction() {
    for mode in ["transaction", "session"] {
        let env = fleet(mode).await;
        let c = env.client().await;
        let (a, b) = two_node_table(&c, false).await; // v = 0 everywhere
        for extended in [false, true] {
            let run = |sql: String| {
                let c = &c;
                async move {
                    if extended {
                        c.execute(sql.as_str(), &[]).await.map(|_| ())
                    } else {
                        c.batch_execute(&sql).await
                    }
                }
            };
            let what = format!("{mode}, extended {extended}");
            // b's node joins after the savepoint; the rollback reaches it.
            run("BEGIN".into()).await.unwrap();
            run(format!("UPDATE t SET v = 1 WHERE id = {a}"))
                .await
                .unwrap();
            run("SAVEPOINT s".into()).await.unwrap();
            run(format!("UPDATE t SET v = 2 WHERE id = {b}"))
                .await
                .unwrap();
            run(format!("UPDATE t SET v = 3 WHERE id = {a}"))
                .await
                .unwrap();
            run("ROLLBACK TO SAVEPOINT s".into()).await.unwrap();
            run("COMMIT".into()).await.unwrap();
            assert_eq!((v(&c, a).await, v(&c, b).await), (1, 0), "{what}");
            // An error on b's node, then ROLLBACK TO, then more work: committed.
            run("BEGIN".into()).await.unwrap();
            run(format!("UPDATE t SET v = 5 WHERE id = {a}"))
                .await
                .unwrap();
            run("SAVEPOINT s1".into()).await.unwrap();
            run(format!("UPDATE t SET v = 6 WHERE id = {b}"))
                .await
                .unwrap();
            let e = run(format!("INSERT INTO t (id, v) VALUES ({b}, 1)"))
                .await
                .unwrap_err();
            assert_eq!(code(&e), "23505", "{what}: {e:?}");
            run("ROLLBACK TO s1".into()).await.unwrap();
            run(format!("UPDATE t SET v = 7 WHERE id = {a}"))
                .await
                .unwrap();
            run("COMMIT".into()).await.unwrap();
            assert_eq!((v(&c, a).await, v(&c, b).await), (7, 0), "{what}");
            // RELEASE keeps the work of both nodes.
            run("BEGIN".into()).await.unwrap();
            run("SAVEPOINT s2".into()).await.unwrap();
            run(format!("UPDATE t SET v = 8 WHERE id = {a}"))
                .await
                .unwrap();
            run(format!("UPDATE t SET v = 9 WHERE id = {b}"))
                .await
                .unwrap();
            run("RELEASE SAVEPOINT s2".into()).await.unwrap();
            run("COMMIT".into()).await.unwrap();
            assert_eq!((v(&c, a).await, v(&c, b).await), (8, 9), "{what}");
            c.batch_execute(&format!("UPDATE t SET v = 0 WHERE id = {a}"))
                .await
                .unwrap();
            c.batch_execute(&format!("UPDATE t SET v = 0 WHERE id = {b}"))
                .await
                .unwrap();
        }
        // A comment after the name is fine; a savepoint command inside a string of
        // several statements is refused (it could not reach every node); an unknown
        // savepoint fails the transaction as on one Postgres, and the session goes on.
        c.batch_execute("BEGIN").await.unwrap();
        c.batch_execute(&format!("UPDATE t SET v = 1 WHERE id = {a}"))
            .await
            .unwrap();
        c.batch_execute("SAVEPOINT s3").await.unwrap();
        c.batch_execute(&format!("UPDATE t SET v = 2 WHERE id = {b}"))
            .await
            .unwrap();
        c.batch_execute("ROLLBACK TO SAVEPOINT s3 /* retry */")
            .await
            .unwrap();
        assert_eq!(
            (v(&c, a).await, v(&c, b).await),
            (1, 0),
            "{mode}: in the transaction"
        );
        let e = c.batch_execute("SAVEPOINT s4; SELECT 1").await.unwrap_err();
        assert_eq!(code(&e), "0A000", "{mode}: {e:?}");
        c.batch_execute("ROLLBACK").await.unwrap();
        c.batch_execute("BEGIN").await.unwrap();
        c.batch_execute(&format!("UPDATE t SET v = 1 WHERE id = {a}"))
            .await
            .unwrap();
        c.batch_execute(&format!("UPDATE t SET v = 2 WHERE id = {b}"))
            .await
            .unwrap();
        let e = c
            .batch_execute("RELEASE SAVEPOINT nosuch")
            .await
            .unwrap_err();
        assert_eq!(code(&e), "3B001", "{mode}: {e:?}");
        c.batch_execute("ROLLBACK").await.unwrap();
        assert_eq!((v(&c, a).await, v(&c, b).await), (0, 0), "{mode}");
        assert_eq!(env.prepared_anywhere().await, 0, "{mode}");
        drop(c);
        assert_eq!(
            open_transactions(&env).await,
            0,
            "{mode}: nothing left open"
        );
    }
}

/// The rows of a simple query as text (NULL as `None`).
async fn text_rows(c: &Client, sql: &str) -> Vec<Vec<Option<String>>> {
    c.simple_query(sql)
        .await
        .unwrap()
        .iter()
        .filter_map(|m| match m {
            shardgate_tests::tokio_postgres::SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect())
            }
            _ => None,
        })
        .collect()
}

/// A shard copied to another node for a join keeps every value exactly: types whose
/// text depends on the session's settings (DateStyle, IntervalStyle,
/// extra_float_digits), char(n) padding, a NOT NULL domain, a nondeterministic
/// collation, quotes, backslashes, NULLs, arrays, json, bytea, a column name that needs
/// quoting; and the session's settings are back on the copy's node afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copied_shards_keep_every_value() {
    let env = fleet("transaction").await;
    let c = env.client().await;
    let (a, b) = two_node_table(&c, false).await;
    // Types and collations are not propagated by the router: every server gets them.
    let setup = "CREATE DOMAIN posint AS int NOT NULL CHECK (VALUE > 0); \
                 CREATE COLLATION ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false)";
    env.direct().await.batch_execute(setup).await.unwrap();
    for w in 0..2 {
        env.worker(w).await.batch_execute(setup).await.unwrap();
    }
    for sql in [
        "CREATE TABLE typed (k int8, \"Mixed Name\" text, n numeric(12,4), f float8, ts timestamptz, d date, i interval, by bytea, j jsonb, arr int[], ok bool, u uuid, ch char(5), p posint, nm text COLLATE ci)",
        "SELECT create_distributed_table('typed', 'k', shard_count => 1)",
        "INSERT INTO typed VALUES (1, 'it''s \\ \"q\" ü', 12.5, 0.1::float8 + 0.2::float8, '2024-02-29 23:59:59.123456+05:30', '2024-12-31', '1 day 02:03:04.5', '\\x00ff27', '{\"a\": [1, \"x''y\"]}', '{1,NULL,3}', true, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'ab', 7, 'abc')",
        "INSERT INTO typed VALUES (2, NULL, NULL, 'NaN', '-infinity', NULL, NULL, NULL, 'null', '{}', NULL, NULL, NULL, 1, NULL)",
        "INSERT INTO typed VALUES (3, '', -0.0001, 1e300, 'epoch', '0001-01-01 BC', '-3 years', '', '[]', NULL, false, NULL, '', 2, 'x')",
    ] {
        c.batch_execute(sql).await.unwrap();
    }
    // SETs in one string of several statements reach the workers too.
    for set in [
        "SET datestyle = 'SQL, DMY'; SET intervalstyle = 'sql_standard'",
        "SET extra_float_digits = 0",
    ] {
        c.batch_execute(set).await.unwrap();
    }
    // A string that fails rolls its SETs back (on the coordinator and for the workers).
    c.batch_execute("SET datestyle = 'German'; SELECT 1/0")
        .await
        .unwrap_err();
    let expected = text_rows(&c, "SELECT *, octet_length(ch) FROM typed ORDER BY k").await;
    assert_eq!(expected.len(), 3);
    assert_eq!(
        expected[0][12].as_deref(),
        Some("ab   "),
        "char(5) is padded"
    );
    assert_eq!(
        expected[0][5].as_deref(),
        Some("31/12/2024"),
        "the session's DateStyle"
    );
    let before = metric_sum(
        &env.metrics().await,
        "shardgate_session_pulled_shards_total",
    );
    for id in [a, b] {
        // `t.ctid` exists only on t itself: t is never the one copied.
        let got = text_rows(
            &c,
            &format!(
                "SELECT typed.*, octet_length(typed.ch) FROM t JOIN typed ON true WHERE t.id = {id} AND t.ctid IS NOT NULL ORDER BY typed.k"
            ),
        )
        .await;
        assert_eq!(got, expected, "joined through key {id}");
        // Filters on the copy's columns read its values typed, with their collation.
        let got = text_rows(
            &c,
            &format!(
                "SELECT x.k FROM t, typed x WHERE t.id = {id} AND x.ts < '2000-01-01'::timestamptz AND x.\"Mixed Name\" IS NOT NULL \
                 UNION ALL SELECT x.k FROM t, typed x WHERE t.id = {id} AND x.nm = 'ABC' AND x.f = 0.1::float8 + 0.2::float8 ORDER BY 1"
            ),
        )
        .await;
        assert_eq!(
            got,
            vec![vec![Some("1".to_owned())], vec![Some("3".to_owned())]],
            "key {id}"
        );
    }
    let after = metric_sum(
        &env.metrics().await,
        "shardgate_session_pulled_shards_total",
    );
    assert_eq!(
        after - before,
        2.0,
        "one of the two keys reads a copy, twice"
    );
    // The copy's node has the session's settings again.
    for _ in 0..3 {
        let d = text_rows(&c, "SELECT d, i FROM typed WHERE k = 1").await;
        assert_eq!(d[0][0].as_deref(), Some("31/12/2024"));
        assert_eq!(d[0][1].as_deref(), Some("1 2:03:04.5"));
    }
}

/// Rows, or the SQLSTATE of the error, of a simple query.
async fn outcome(c: &Client, sql: &str) -> Result<Vec<Vec<Option<String>>>, String> {
    match c.simple_query(sql).await {
        Ok(msgs) => Ok(msgs
            .iter()
            .filter_map(|m| match m {
                shardgate_tests::tokio_postgres::SimpleQueryMessage::Row(r) => {
                    Some((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect())
                }
                _ => None,
            })
            .collect()),
        Err(e) => Err(code(&e)),
    }
}

/// Routed simple queries whose literals are numeric and stand after a comparison or in
/// LIMIT/OFFSET run as statements prepared on the worker (literals bound as typed
/// parameters). Every statement gives what plain Postgres gives for the same table:
/// promoted or not (positions in ORDER BY, casts with a type modifier, unary minus,
/// strings stay text), with every literal type (int4, int8, numeric), errors, in a
/// transaction, and after a column is added (no stale prepared statement).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_queries_run_prepared_on_workers_mean_what_the_text_means() {
    let env = fleet("transaction").await;
    let c = env.client().await;
    let plain = env.direct().await;
    let create = "CREATE TABLE {t} (id int8 PRIMARY KEY, s int2, i int4, n numeric(10,2), f float8, txt text, j jsonb)";
    c.batch_execute(&create.replace("{t}", "pd")).await.unwrap();
    c.batch_execute("SELECT create_distributed_table('pd', 'id', shard_count => 8)")
        .await
        .unwrap();
    plain
        .batch_execute(&create.replace("{t}", "pl"))
        .await
        .unwrap();
    for g in 1..=20 {
        // Row by row: each is routed to its shard.
        let row = format!(
            "INSERT INTO {{t}} VALUES ({g}, {g}, {g} * 10, {g} / 4.0, {g} * 1.5, 'x{g}', jsonb_build_array({g}, 'a{g}'))"
        );
        c.batch_execute(&row.replace("{t}", "pd")).await.unwrap();
        plain
            .batch_execute(&row.replace("{t}", "pl"))
            .await
            .unwrap();
    }

    // (statement, promoted?)
    let cases: &[(&str, bool)] = &[
        ("SELECT id, s, i, n, f FROM {t} WHERE id = 7", true),
        ("SELECT id FROM {t} WHERE id = 7 AND s = 100000", true),
        ("SELECT id FROM {t} WHERE id = 7 AND s = 32768", true),
        ("SELECT id FROM {t} WHERE id = 7 AND i < 3000000000", true),
        ("SELECT id, n FROM {t} WHERE id = 7 AND n = 1.75", true),
        ("SELECT id FROM {t} WHERE id = 7 AND f > 1e1", true),
        (
            "SELECT id FROM {t} WHERE id = 7 AND n <= 123456789012345678901234567890",
            true,
        ),
        (
            "SELECT id, i <> 70, i != 71, pg_typeof(i >= 70) FROM {t} WHERE id = 7",
            true,
        ),
        ("SELECT j -> 0, j ->> 1 FROM {t} WHERE id = 7", true),
        (
            "SELECT id FROM {t} WHERE id = 7 AND i < 7 LIMIT 1 OFFSET 0",
            true,
        ),
        (
            "WITH x AS (SELECT * FROM {t} WHERE id = 7) SELECT id, i FROM x WHERE i > 0",
            true,
        ),
        ("SELECT id, i FROM {t} WHERE id = 7 ORDER BY 2", false),
        ("SELECT id, n::numeric(10,1) FROM {t} WHERE id = 7", false),
        (
            "SELECT id, i - 5, -s, i * 2 FROM {t} WHERE id = 7 AND i >= -5",
            true,
        ),
        // A literal whose left neighbour across an operator is a literal stays text
        // (here `(i * 2) % 7`: conservative).
        ("SELECT id, i * 2 % 7 FROM {t} WHERE id = 7", false),
        // Constants Postgres folds when it plans the text: errors every time.
        (
            "SELECT id FROM {t} WHERE id = 7 AND i = 2147483647 + 1",
            false,
        ),
        ("SELECT id FROM {t} WHERE id = 7 AND n = 1 / 0.0", false),
        (
            "SELECT id FROM {t} WHERE id = 7 AND s = 100000::int2",
            false,
        ),
        // Prefix operators on prefix operators (re-serialised with parentheses).
        // (`-(-1)`: a sign after a parenthesis stays text).
        ("SELECT - -1, - -i, @ -s FROM {t} WHERE id = 7", false),
        (
            "WITH d AS (SELECT id FROM {t} WHERE id = 7) SELECT - -1 FROM d",
            false,
        ),
        ("SELECT id, - -i, |/ -f FROM {t} WHERE id = 7", true),
        ("SELECT id, -2147483648 < i FROM {t} WHERE id = 7", false),
        (
            "SELECT pg_typeof(-02147483648), i FROM {t} WHERE id = 7",
            false,
        ),
        // A signed constant where the grammar wants a constant stays one.
        ("SELECT id, i FROM {t} WHERE id = 7 ORDER BY -1", false),
        ("SELECT id, i FROM {t} WHERE id = 7 GROUP BY id, -1", false),
        ("SELECT id FROM {t} WHERE id = 7 LIMIT +3", true),
        ("SELECT id FROM {t} WHERE id = 7 OFFSET +0 ROWS", false),
        (
            "SELECT id, i - 1, 2 - -i FROM {t} WHERE id = 7 ORDER BY i - 1",
            false,
        ),
        (
            "SELECT id, i - 1 FROM {t} WHERE id = 7 AND i * -1 < 0",
            true,
        ),
        (
            "SELECT id, i > -2147483648, pg_typeof(-9223372036854775808 + 0) FROM {t} WHERE id = 7",
            false,
        ),
        (
            "SELECT pg_typeof(i + -2147483647), pg_typeof(n / 2), i / 3 FROM {t} WHERE id = 7",
            true,
        ),
        (
            "SELECT count(*) FROM {t} WHERE id = 7 AND txt = 'x7'",
            false,
        ),
        ("SELECT id FROM {t} WHERE id = 7 AND i / (i - i) = 1", true),
        ("UPDATE {t} SET i = i + 1 WHERE id = 7 RETURNING i", true),
        (
            "UPDATE {t} SET i = i + -3, n = n * 1.5 WHERE id = 7 RETURNING i, n",
            true,
        ),
        // Assigned to a column: coerced when Postgres plans the text.
        (
            "UPDATE {t} SET s = 7, n = 2.5 WHERE id = 8 RETURNING s, n",
            false,
        ),
        ("DELETE FROM {t} WHERE id = 9 RETURNING id, txt", true),
        ("SELECT id FROM {t} WHERE id = 9", true),
        // One literal written twice stays one expression (GROUP BY, DISTINCT).
        (
            "SELECT i > 5, count(*) FROM {t} WHERE id = 7 GROUP BY i > 5",
            true,
        ),
        (
            "SELECT DISTINCT j -> 0 FROM {t} WHERE id = 7 ORDER BY j -> 0",
            true,
        ),
        ("SELECT id FROM {t} WHERE id = 7 AND i > 70 AND s < 8", true),
        // No rows and no RowDescription: NoData is not forwarded.
        ("UPDATE {t} SET i = i + 9 WHERE id = 12", true),
    ];
    let promoted = |m: &str| metric_sum(m, "shardgate_session_promoted_statements_total");
    for (sql, expect_promoted) in cases {
        let before = promoted(&env.metrics().await);
        let got = outcome(&c, &sql.replace("{t}", "pd")).await;
        let after = promoted(&env.metrics().await);
        let want = outcome(&plain, &sql.replace("{t}", "pl")).await;
        assert_eq!(got, want, "{sql}");
        assert_eq!(
            after - before,
            if *expect_promoted { 1.0 } else { 0.0 },
            "promoted: {sql}"
        );
    }
    // A statement run often enough for Postgres to plan it generically, then with a
    // value whose constant folding fails when the text is planned: the error comes
    // every time, as on Postgres, though no row qualifies.
    for (warm, bad) in [
        (
            "UPDATE {t} SET s = 5 WHERE id = 99999",
            "UPDATE {t} SET s = 100000 WHERE id = 99999",
        ),
        (
            "SELECT id FROM {t} WHERE id = 99999 AND i = 2147483647 + 0",
            "SELECT id FROM {t} WHERE id = 99999 AND i = 2147483647 + 1",
        ),
        (
            "SELECT id FROM {t} WHERE id = 99999 AND n = 1 / 1.0",
            "SELECT id FROM {t} WHERE id = 99999 AND n = 1 / 0.0",
        ),
        (
            "SELECT id FROM {t} WHERE id = 99999 AND f > 1e308 * 1",
            "SELECT id FROM {t} WHERE id = 99999 AND f > 1e308 * 10",
        ),
        (
            "SELECT id FROM {t} WHERE id = 99999 AND s = 5::int2",
            "SELECT id FROM {t} WHERE id = 99999 AND s = 100000::int2",
        ),
    ] {
        for _ in 0..8 {
            outcome(&c, &warm.replace("{t}", "pd")).await.unwrap();
        }
        for _ in 0..2 {
            let want = outcome(&plain, &bad.replace("{t}", "pl")).await;
            assert!(want.is_err(), "{bad}");
            assert_eq!(outcome(&c, &bad.replace("{t}", "pd")).await, want, "{bad}");
        }
    }
    // Twice more: the statement prepared on a worker is reused, with other values.
    for id in [3, 4, 3] {
        let sql = format!("SELECT id, s, i, n, f FROM {{t}} WHERE id = {id}");
        assert_eq!(
            outcome(&c, &sql.replace("{t}", "pd")).await,
            outcome(&plain, &sql.replace("{t}", "pl")).await
        );
    }

    // In a transaction: the joining statement goes as text, the next ones prepared;
    // an error aborts the transaction as on one Postgres.
    for db in [&c, &plain] {
        let t = if std::ptr::eq(db, &c) { "pd" } else { "pl" };
        let q = |s: &str| s.replace("{t}", t);
        db.batch_execute("BEGIN").await.unwrap();
        assert_eq!(
            outcome(db, &q("UPDATE {t} SET i = 500 WHERE id = 10 RETURNING i")).await,
            Ok(vec![vec![Some("500".into())]])
        );
        assert_eq!(
            outcome(db, &q("SELECT i FROM {t} WHERE id = 10")).await,
            Ok(vec![vec![Some("500".into())]])
        );
        assert_eq!(
            outcome(
                db,
                &q("SELECT id FROM {t} WHERE id = 10 AND i / (i - i) = 1")
            )
            .await,
            Err("22012".into())
        );
        assert_eq!(
            outcome(db, &q("SELECT i FROM {t} WHERE id = 10")).await,
            Err("25P02".into())
        );
        db.batch_execute("ROLLBACK").await.unwrap();
        assert_eq!(
            outcome(db, &q("SELECT i FROM {t} WHERE id = 10")).await,
            Ok(vec![vec![Some("100".into())]])
        );
    }

    // A schema change: the statement prepared before it is not reused (its result
    // type changed: Postgres would refuse it with "cached plan must not change result
    // type").
    let star = "SELECT * FROM {t} WHERE id = 11";
    assert_eq!(
        outcome(&c, &star.replace("{t}", "pd")).await,
        outcome(&plain, &star.replace("{t}", "pl")).await
    );
    c.batch_execute("ALTER TABLE pd ADD COLUMN extra int DEFAULT 42")
        .await
        .unwrap();
    plain
        .batch_execute("ALTER TABLE pl ADD COLUMN extra int DEFAULT 42")
        .await
        .unwrap();
    // The router learns of the change from the catalog (at once for its own DDL).
    let got = outcome(&c, &star.replace("{t}", "pd")).await;
    assert_eq!(got, outcome(&plain, &star.replace("{t}", "pl")).await);
    assert_eq!(got.unwrap()[0].len(), 8, "the new column is there");
}

/// `set_config(..., false)` in a statement on a distributed table, in either protocol,
/// changes the worker connection's settings where the router cannot follow: the next
/// client of that connection does not get them, the client itself keeps them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_config_on_a_shard_stays_with_its_session() {
    let env = one_connection_per_node().await;
    let a = env.client().await;
    let b = env.client().await;
    let _ = two_node_table(&a, false).await;
    let read = "SELECT current_setting('application_name') FROM t WHERE id = $1";
    let got = |rows: Vec<shardgate_tests::tokio_postgres::Row>| rows[0].get::<_, String>(0);
    // Extended protocol (a prepared statement, then the unnamed one).
    a.query(
        "SELECT set_config('application_name', 'leak_ext', false) FROM t WHERE id = $1",
        &[&5i64],
    )
    .await
    .unwrap();
    assert_eq!(got(a.query(read, &[&5i64]).await.unwrap()), "leak_ext");
    assert_ne!(got(b.query(read, &[&5i64]).await.unwrap()), "leak_ext");
    // Simple protocol.
    a.batch_execute(
        "SELECT set_config('application_name', 'leak_simple', false) FROM t WHERE id = 6",
    )
    .await
    .unwrap();
    assert_ne!(got(b.query(read, &[&6i64]).await.unwrap()), "leak_simple");
}

/// Colocated tables each pinned by a parameter of its own (`t.id = $1 AND u.id = $2`,
/// as ORMs write them) run on one shard when the values are on one shard, with the
/// rows Postgres gives; values on different shards are refused (0A000), never run on
/// one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn colocated_tables_pinned_by_separate_parameters_run_on_their_shard() {
    let env = one_connection_per_node().await;
    let c = env.client().await;
    let (x, y) = two_node_table(&c, false).await;
    c.batch_execute("CREATE TABLE u (id int8 PRIMARY KEY, w int NOT NULL)")
        .await
        .unwrap();
    c.batch_execute("SELECT create_distributed_table('u', 'id', colocate_with => 't')")
        .await
        .unwrap();
    for id in 1..=40i64 {
        c.execute("INSERT INTO u VALUES ($1, $2)", &[&id, &(id as i32 * 100)])
            .await
            .unwrap();
    }
    // Another id on x's shard.
    let shard = |id: i64| {
        let c = &c;
        async move {
            text_rows(
                c,
                &format!("SELECT get_shard_id_for_distribution_column('t', {id})"),
            )
            .await[0][0]
                .clone()
        }
    };
    let sx = shard(x).await;
    let mut z = None;
    for id in 1..=40i64 {
        if id != x && shard(id).await == sx {
            z = Some(id);
            break;
        }
    }
    let z = z.expect("8 shards over 40 ids: another id on x's shard");
    let joined = "SELECT t.id, u.w FROM t JOIN u ON u.id = t.id WHERE t.id = $1 AND u.id = $2";
    let cross = "SELECT t.id, u.w FROM t, u WHERE t.id = $1 AND u.id = $2";
    let rows = |r: Vec<shardgate_tests::tokio_postgres::Row>| {
        r.iter()
            .map(|r| (r.get::<_, i64>(0), r.get::<_, i32>(1)))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        rows(c.query(joined, &[&x, &x]).await.unwrap()),
        [(x, x as i32 * 100)]
    );
    assert_eq!(
        rows(c.query(cross, &[&x, &x]).await.unwrap()),
        [(x, x as i32 * 100)]
    );
    // Different values on one shard: the rows of both are there.
    assert_eq!(
        rows(c.query(cross, &[&x, &z]).await.unwrap()),
        [(x, z as i32 * 100)]
    );
    assert!(c.query(joined, &[&x, &z]).await.unwrap().is_empty());
    // On different shards: refused.
    for sql in [joined, cross] {
        let e = c.query(sql, &[&x, &y]).await.unwrap_err();
        assert_eq!(
            e.as_db_error().map(|d| d.code().code()),
            Some("0A000"),
            "{sql}: {e:?}"
        );
    }
    // The simple protocol too (each literal its own parameter once normalised).
    assert_eq!(
        outcome(
            &c,
            &format!("SELECT t.id, u.w FROM t, u WHERE t.id = {x} AND u.id = {z}")
        )
        .await,
        Ok(vec![vec![Some(x.to_string()), Some((z * 100).to_string())]])
    );
    assert_eq!(
        outcome(
            &c,
            &format!("SELECT t.id, u.w FROM t, u WHERE t.id = {x} AND u.id = {y}")
        )
        .await,
        Err("0A000".into())
    );
    // The session goes on.
    assert_eq!(
        rows(c.query(joined, &[&y, &y]).await.unwrap()),
        [(y, y as i32 * 100)]
    );
}

/// After a column is added through the router, a client that prepares `SELECT *` gets
/// the new column (its statement is prepared afresh on the workers, though the workers
/// still hold the one prepared before), while a statement prepared before the change
/// fails as on Postgres ("cached plan must not change result type").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_prepared_after_ddl_sees_the_new_columns() {
    let env = one_connection_per_node().await;
    let a = env.client().await;
    let (x, _) = two_node_table(&a, false).await;
    let star = "SELECT * FROM t WHERE id = $1";
    let old = a.prepare(star).await.unwrap();
    assert_eq!(a.query(&old, &[&x]).await.unwrap()[0].len(), 2);
    a.batch_execute("ALTER TABLE t ADD COLUMN extra int DEFAULT 7")
        .await
        .unwrap();
    for _ in 0..2 {
        let b = env.client().await;
        let st = b.prepare(star).await.unwrap();
        assert_eq!(st.columns().len(), 3);
        let rows = b.query(&st, &[&x]).await.unwrap();
        assert_eq!(rows[0].len(), 3);
        assert_eq!(rows[0].get::<_, i32>(2), 7);
        // The unnamed statement too.
        let rows = b.query(star, &[&x]).await.unwrap();
        assert_eq!(rows[0].len(), 3);
    }
    let e = a.query(&old, &[&x]).await.unwrap_err();
    assert_eq!(
        e.as_db_error().map(|d| d.code().code()),
        Some("0A000"),
        "{e:?}"
    );
}

/// A statement that does not parse, sent right after BEGIN to a node joining the
/// transaction, aborts the transaction as on Postgres: what follows fails with 25P02
/// until ROLLBACK, and nothing of it is committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_syntax_error_on_a_joining_node_aborts_the_transaction() {
    let env = one_connection_per_node().await;
    let c = env.client().await;
    let (x, y) = two_node_table(&c, false).await;
    for bad in [
        format!("SELECT id, 10 ! FROM t WHERE id = {x}"),
        format!("SELECT id, 'a' 'b' FROM t WHERE id = {x}"),
    ] {
        c.batch_execute("BEGIN").await.unwrap();
        let e = c.simple_query(&bad).await.unwrap_err();
        let e = e.as_db_error().expect("a server error");
        assert_eq!(e.code().code(), "42601", "{bad}");
        // The worker ran the shard SQL, not this text: no cursor position into it.
        assert!(e.position().is_none(), "{bad}: {:?}", e.position());
        for next in [
            format!("UPDATE t SET v = 888 WHERE id = {x}"),
            format!("UPDATE t SET v = 889 WHERE id = {y}"),
            "SELECT 1".to_owned(),
        ] {
            assert_eq!(
                outcome(&c, &next).await,
                Err("25P02".into()),
                "{bad}; {next}"
            );
        }
        c.batch_execute("ROLLBACK").await.unwrap();
        for id in [x, y] {
            assert_eq!(
                outcome(&c, &format!("SELECT v FROM t WHERE id = {id}")).await,
                Ok(vec![vec![Some("0".into())]]),
                "{bad}: nothing committed"
            );
        }
    }
    // The joining BEGIN still travels with the statement: a transaction that reads a
    // node and then writes it commits as one.
    c.batch_execute("BEGIN").await.unwrap();
    c.batch_execute(&format!("UPDATE t SET v = 5 WHERE id = {x}"))
        .await
        .unwrap();
    c.batch_execute(&format!("UPDATE t SET v = 6 WHERE id = {x}"))
        .await
        .unwrap();
    c.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(
        outcome(&c, &format!("SELECT v FROM t WHERE id = {x}")).await,
        Ok(vec![vec![Some("0".into())]])
    );
}

/// `SELECT set_config('name', value, false)` alone (the form applications use where
/// SET cannot take a parameter, e.g. a tenant id for row level security) follows the
/// session as a SET does: to every node it reads from, and back onto its connection
/// after another client used it; never to the other client. A list setting keeps its
/// elements (`SET search_path TO 'a, b'` would be one schema).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_config_follows_its_session_to_every_node() {
    let env = one_connection_per_node().await;
    let a = env.client().await;
    let b = env.client().await;
    let (x, y) = two_node_table(&a, false).await;
    let coord = "SELECT current_setting('app.tenant', true)";
    let shard =
        |id: i64| format!("SELECT current_setting('app.tenant', true) FROM t WHERE id = {id}");
    let one = |rows: Vec<Vec<Option<String>>>| rows[0][0].clone();
    let tenant = |v: &str| Some(v.to_owned());

    // Simple protocol; the client gets set_config's own answer.
    assert_eq!(
        one(text_rows(&a, "SELECT set_config('app.tenant', '42', false)").await),
        tenant("42")
    );
    assert_ne!(
        one(text_rows(&b, coord).await),
        tenant("42"),
        "b got a's setting"
    );
    assert_ne!(one(text_rows(&b, &shard(x)).await), tenant("42"));
    assert_ne!(one(text_rows(&b, &shard(y)).await), tenant("42"));
    // Both workers (x and y are on different nodes) and the coordinator, after b
    // used every connection.
    assert_eq!(one(text_rows(&a, coord).await), tenant("42"));
    assert_eq!(one(text_rows(&a, &shard(x)).await), tenant("42"));
    assert_eq!(one(text_rows(&a, &shard(y)).await), tenant("42"));

    // Extended protocol with the value as a parameter (tokio-postgres binds it in
    // binary), unnamed and prepared.
    a.query("SELECT set_config('app.tenant', $1, false)", &[&"7"])
        .await
        .unwrap();
    assert_ne!(one(text_rows(&b, &shard(x)).await), tenant("7"));
    assert_eq!(one(text_rows(&a, &shard(x)).await), tenant("7"));
    let st = a
        .prepare("SELECT pg_catalog.set_config('app.tenant', $1, false)")
        .await
        .unwrap();
    a.query(&st, &[&"8"]).await.unwrap();
    assert_ne!(one(text_rows(&b, &shard(y)).await), tenant("8"));
    assert_eq!(one(text_rows(&a, &shard(y)).await), tenant("8"));
    assert_eq!(one(text_rows(&a, coord).await), tenant("8"));

    // In a transaction: kept if it commits, not if it rolls back.
    a.batch_execute("BEGIN").await.unwrap();
    a.query(&st, &[&"9"]).await.unwrap();
    a.batch_execute("ROLLBACK").await.unwrap();
    text_rows(&b, coord).await;
    assert_eq!(
        one(text_rows(&a, &shard(x)).await),
        tenant("8"),
        "rolled back"
    );
    a.batch_execute("BEGIN").await.unwrap();
    text_rows(&a, "SELECT set_config('app.tenant', '10', false)").await;
    a.batch_execute("COMMIT").await.unwrap();
    assert_ne!(one(text_rows(&b, &shard(x)).await), tenant("10"));
    assert_eq!(
        one(text_rows(&a, &shard(x)).await),
        tenant("10"),
        "committed"
    );

    // A list setting keeps its elements.
    text_rows(
        &a,
        "SELECT set_config('search_path', 'sg_none, public', false)",
    )
    .await;
    assert_ne!(
        one(text_rows(&b, "SHOW search_path").await),
        tenant("sg_none, public")
    );
    assert_eq!(
        one(text_rows(&a, "SHOW search_path").await),
        tenant("sg_none, public")
    );
    // RESET ends it.
    a.batch_execute("RESET app.tenant").await.unwrap();
    text_rows(&b, coord).await;
    assert_ne!(one(text_rows(&a, &shard(x)).await), tenant("10"), "reset");
}

/// A backend connection keeps a bounded number of promoted simple queries: preparing
/// one more closes the least recently used, and a closed one is prepared again when
/// it comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promoted_statements_per_connection_are_bounded() {
    let env = one_connection_per_node().await;
    let c = env.client().await;
    let _ = two_node_table(&c, false).await;
    c.batch_execute("UPDATE t SET v = 77 WHERE id = 5")
        .await
        .unwrap();
    // What the worker connection holds, asked on it (functions made on the workers).
    for i in 0..2 {
        env.worker(i)
            .await
            .batch_execute(
                "CREATE FUNCTION sg_shapes_held() RETURNS bigint LANGUAGE sql AS \
                 $$ SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE '%sg\\_shape\\_%' $$; \
                 CREATE FUNCTION sg_when_prepared() RETURNS text LANGUAGE sql AS \
                 $$ SELECT max(prepare_time)::text FROM pg_prepared_statements WHERE statement LIKE '%AS sg\\_hot FROM%' $$",
            )
            .await
            .unwrap();
    }
    let hot = "SELECT v AS sg_hot FROM t WHERE id = 5 AND v > 1";
    let prepared_at = "SELECT sg_when_prepared() FROM t WHERE id = 5";
    assert_eq!(text_rows(&c, hot).await, vec![vec![Some("77".to_owned())]]);
    let first = text_rows(&c, prepared_at).await;
    assert!(first[0][0].is_some(), "the hot statement is prepared");
    // 300 statements (distinct aliases), all on the node of id 5, one connection; a
    // hot one in between, which the least-recently-used order keeps.
    for round in 0..2 {
        for k in 0..300 {
            if k % 50 == 0 {
                assert_eq!(text_rows(&c, hot).await, vec![vec![Some("77".to_owned())]]);
            }
            let rows = text_rows(
                &c,
                &format!("SELECT v AS sg_shape_{k} FROM t WHERE id = 5 AND v > {k}"),
            )
            .await;
            let want: Vec<Vec<Option<String>>> = if k < 77 {
                vec![vec![Some("77".into())]]
            } else {
                vec![]
            };
            assert_eq!(rows, want, "round {round}, statement {k}");
        }
    }
    assert_eq!(
        text_rows(&c, prepared_at).await,
        first,
        "the hot statement was never closed and prepared again"
    );
    let held = text_rows(&c, "SELECT sg_shapes_held() FROM t WHERE id = 5").await;
    let held: i64 = held[0][0].as_deref().unwrap().parse().unwrap();
    assert!(
        (200..=256).contains(&held),
        "promoted statements held by the worker connection: {held}"
    );
    let m = env.metrics().await;
    assert!(metric_sum(&m, "shardgate_session_promoted_statements_total") >= 600.0);
}

/// DDL sent straight to a worker (not through the router) changes a promoted
/// statement's result type under it: Postgres refuses the old statement once ("cached
/// plan must not change result type"), and the router prepares it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_statement_follows_ddl_sent_straight_to_a_worker() {
    let env = one_connection_per_node().await;
    let c = env.client().await;
    let _ = two_node_table(&c, false).await;
    let star = "SELECT * FROM t WHERE id = 5";
    assert_eq!(
        outcome(&c, star).await,
        Ok(vec![vec![Some("5".into()), Some("0".into())]])
    );
    let sid = text_rows(&c, "SELECT get_shard_id_for_distribution_column('t', 5)").await[0][0]
        .clone()
        .unwrap();
    let mut altered = 0;
    for i in 0..2 {
        let w = env.worker(i).await;
        let here: bool = w
            .query_one(
                &format!("SELECT to_regclass('public.t_{sid}') IS NOT NULL"),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if here {
            w.batch_execute(&format!(
                "ALTER TABLE t_{sid} ADD COLUMN extra int DEFAULT 1"
            ))
            .await
            .unwrap();
            altered += 1;
        }
    }
    assert_eq!(altered, 1, "the shard of id 5 is on one worker");
    let want = Ok(vec![vec![
        Some("5".into()),
        Some("0".into()),
        Some("1".into()),
    ]]);
    // Outside a transaction the stale statement is refused at Bind, before it runs:
    // the router sends the text instead, and the client never sees the error.
    assert_eq!(
        outcome(&c, star).await,
        want,
        "the first try after the change"
    );
    assert_eq!(outcome(&c, star).await, want, "prepared again");
    assert_eq!(outcome(&c, star).await, want);
    assert_eq!(
        outcome(&c, "SELECT id FROM t WHERE id = 5").await,
        Ok(vec![vec![Some("5".into())]])
    );
    // Inside a transaction the node's transaction is aborted by the refusal: the
    // client gets it (as with a prepared statement of its own), once.
    for i in 0..2 {
        let w = env.worker(i).await;
        w.batch_execute(&format!(
            "DO $$ BEGIN IF to_regclass('public.t_{sid}') IS NOT NULL THEN ALTER TABLE t_{sid} DROP COLUMN extra; END IF; END $$"
        ))
        .await
        .unwrap();
    }
    c.batch_execute("BEGIN").await.unwrap();
    let first = outcome(&c, star).await;
    assert!(
        first == want_before(&want) || first == Err("0A000".into()),
        "in a transaction: {first:?}"
    );
    c.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(
        outcome(&c, star).await,
        want_before(&want),
        "prepared again"
    );
    assert_eq!(
        outcome(&c, "SELECT id FROM t WHERE id = 5").await,
        Ok(vec![vec![Some("5".into())]]),
        "the session goes on"
    );
}

/// `want` without its last column.
fn want_before(
    want: &Result<Vec<Vec<Option<String>>>, String>,
) -> Result<Vec<Vec<Option<String>>>, String> {
    want.clone().map(|rows| {
        rows.into_iter()
            .map(|mut r| {
                r.pop();
                r
            })
            .collect()
    })
}

/// Settings made inside a transaction (SET LOCAL, and SETs, which run on the
/// coordinator) reach every node the transaction uses: a node joining later gets them
/// with its BEGIN, a node already in the transaction before its next statement, in
/// order with the savepoints, so a ROLLBACK TO undoes them on every node. After the
/// transaction, SET LOCAL is gone everywhere and a committed SET stays with the session
/// only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_made_in_a_transaction_reach_every_node_it_touches() {
    let env = one_connection_per_node().await;
    let a = env.client().await;
    let b = env.client().await;
    let (x, y) = two_node_table(&a, false).await;
    let on = |id: i64| format!("SELECT current_setting('app.t', true) FROM t WHERE id = {id}");
    let coord = "SELECT current_setting('app.t', true)";
    let everywhere = |want: &'static str| {
        let (a, on) = (&a, &on);
        async move {
            for (what, sql) in [("x", on(x)), ("y", on(y)), ("coordinator", coord.into())] {
                let got = text_rows(a, &sql).await[0][0].clone();
                assert_eq!(got.as_deref(), Some(want), "app.t on {what}");
            }
        }
    };

    a.batch_execute("BEGIN").await.unwrap();
    // Before any worker joined: each gets it with its BEGIN.
    a.batch_execute("SET LOCAL app.t = 'one'").await.unwrap();
    everywhere("one").await;
    // Both workers are in the transaction now: each catches up before its next read.
    a.batch_execute("SET LOCAL app.t = 'two'").await.unwrap();
    everywhere("two").await;
    // In the extended protocol too.
    a.execute("SET LOCAL app.t = 'ext'", &[]).await.unwrap();
    everywhere("ext").await;
    a.batch_execute("SET LOCAL app.t = 'two'").await.unwrap();
    // A savepoint: what is set after it is undone by ROLLBACK TO on every node, also
    // on a node that only learns of it with the savepoint command.
    a.batch_execute("SAVEPOINT s").await.unwrap();
    a.batch_execute("SET LOCAL app.t = 'three'").await.unwrap();
    assert_eq!(text_rows(&a, &on(x)).await[0][0].as_deref(), Some("three"));
    a.batch_execute("ROLLBACK TO SAVEPOINT s").await.unwrap();
    everywhere("two").await;
    // A session-level SET in the transaction, and a time zone the workers format with.
    a.batch_execute("SET app.s = 'kept'; SET LOCAL TIME ZONE 'Asia/Tokyo'")
        .await
        .unwrap();
    let tz = |id: i64| {
        format!(
            "SELECT current_setting('TimeZone'), current_setting('app.s', true) FROM t WHERE id = {id}"
        )
    };
    for id in [x, y] {
        assert_eq!(
            text_rows(&a, &tz(id)).await[0],
            vec![Some("Asia/Tokyo".into()), Some("kept".into())],
            "on the node of {id}"
        );
    }
    a.batch_execute("COMMIT").await.unwrap();

    // Committed: SET LOCAL is gone, the SET stays with a.
    for id in [x, y] {
        let row = text_rows(&a, &tz(id)).await[0].clone();
        assert_ne!(
            row[0].as_deref(),
            Some("Asia/Tokyo"),
            "SET LOCAL outlived its transaction"
        );
        assert_eq!(row[1].as_deref(), Some("kept"));
        assert_ne!(text_rows(&a, &on(id)).await[0][0].as_deref(), Some("two"));
    }
    // b (on the same connections: one per node) has none of it.
    for id in [x, y] {
        let row = text_rows(&b, &tz(id)).await[0].clone();
        assert_ne!(row[0].as_deref(), Some("Asia/Tokyo"));
        assert_ne!(row[1].as_deref(), Some("kept"), "b got a's SET");
        assert_ne!(text_rows(&b, &on(id)).await[0][0].as_deref(), Some("two"));
    }

    // Rolled back: a SET made in the transaction is undone everywhere.
    a.batch_execute("BEGIN").await.unwrap();
    let _ = text_rows(&a, &on(x)).await;
    a.batch_execute("SET app.s = 'gone'").await.unwrap();
    assert_eq!(text_rows(&a, &tz(x)).await[0][1].as_deref(), Some("gone"));
    a.batch_execute("ROLLBACK").await.unwrap();
    for id in [x, y] {
        assert_eq!(text_rows(&a, &tz(id)).await[0][1].as_deref(), Some("kept"));
    }
}

/// A text key written with escapes (`E'\u65e5'`, `E'\303\251'`) picks the shard of the
/// value Postgres reads, so its rows are found; `RESET TIME ZONE` reaches the workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escaped_text_keys_find_their_rows_and_reset_time_zone_reaches_workers() {
    let env = one_connection_per_node().await;
    let a = env.client().await;
    a.batch_execute("CREATE TABLE esc (k text, n int)")
        .await
        .unwrap();
    a.batch_execute("SELECT create_distributed_table('esc', 'k', shard_count => 8)")
        .await
        .unwrap();
    for (i, k) in ["日本", "été", "😀", "plain"].iter().enumerate() {
        a.execute("INSERT INTO esc VALUES ($1, $2)", &[k, &(i as i32)])
            .await
            .unwrap();
    }
    for (sql, want) in [
        (r"SELECT n FROM esc WHERE k = E'\u65e5\u672c'", "0"),
        (r"SELECT n FROM esc WHERE k = E'\U000065e5\u672c'", "0"),
        (r"SELECT n FROM esc WHERE k = E'\303\251t\xc3\xa9'", "1"),
        (r"SELECT n FROM esc WHERE k = E'\uD83D\uDE00'", "2"),
        (r"SELECT n FROM esc WHERE k = E'pl\141in'", "3"),
    ] {
        assert_eq!(
            text_rows(&a, sql).await,
            vec![vec![Some(want.to_owned())]],
            "{sql}"
        );
    }
    let tz = "SELECT current_setting('TimeZone') FROM esc WHERE k = 'plain'";
    let before = text_rows(&a, tz).await[0][0].clone();
    a.batch_execute("SET TIME ZONE 'Asia/Tokyo'").await.unwrap();
    assert_eq!(text_rows(&a, tz).await[0][0].as_deref(), Some("Asia/Tokyo"));
    a.batch_execute("RESET TIME ZONE").await.unwrap();
    assert_eq!(
        text_rows(&a, tz).await[0][0],
        before,
        "RESET TIME ZONE on the worker"
    );
}

/// `SET TRANSACTION` after BEGIN gives every node of the transaction its isolation
/// level and access mode (a node joining later runs it right after its BEGIN), and
/// `SET SESSION CHARACTERISTICS` follows the session to every node as the defaults of
/// its later transactions, as on one Postgres.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_modes_reach_every_node_of_the_transaction() {
    let env = one_connection_per_node().await;
    let a = env.client().await;
    let b = env.client().await;
    let (x, y) = two_node_table(&a, false).await;
    let modes = |id: i64| {
        format!(
            "SELECT current_setting('transaction_isolation'), current_setting('transaction_read_only') FROM t WHERE id = {id}"
        )
    };
    let on_both = |want: [&'static str; 2], why: &'static str| {
        let (a, modes) = (&a, &modes);
        async move {
            for id in [x, y] {
                let got = text_rows(a, &modes(id)).await[0].clone();
                let got: Vec<_> = got.iter().map(|v| v.as_deref().unwrap_or("")).collect();
                assert_eq!(got, want, "{why}: the node of {id}");
            }
        }
    };

    // Simple protocol, several modes; no worker is in the transaction yet.
    a.batch_execute("BEGIN").await.unwrap();
    a.batch_execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .await
        .unwrap();
    on_both(["repeatable read", "on"], "SET TRANSACTION").await;
    // It is a snapshot: a change committed on the worker later is not seen by a's
    // reads (b cannot run here: a holds the one connection of each node).
    let v = format!("SELECT v FROM t WHERE id = {x}");
    let before = text_rows(&a, &v).await;
    let mut changed = 0;
    for i in 0..2 {
        let w = env.worker(i).await;
        for r in w
            .query(
                "SELECT tablename::text FROM pg_tables WHERE tablename ~ '^t_[0-9]+$'",
                &[],
            )
            .await
            .unwrap()
        {
            let shard: String = r.get(0);
            changed += w
                .execute(&format!("UPDATE {shard} SET v = v + 1 WHERE id = {x}"), &[])
                .await
                .unwrap();
        }
    }
    assert_eq!(changed, 1, "the row of {x} in one shard");
    let after = text_rows(&a, &v).await;
    assert_eq!(before, after, "a repeatable read saw a later commit");
    let e = a
        .batch_execute(&format!("UPDATE t SET v = 0 WHERE id = {y}"))
        .await
        .unwrap_err();
    assert_eq!(code(&e), "25006", "a write in a read-only transaction: {e}");
    a.batch_execute("ROLLBACK").await.unwrap();
    on_both(["read committed", "off"], "after the transaction").await;

    // Extended protocol; then a change of access mode after both workers read (each
    // catches up before its next statement).
    a.batch_execute("BEGIN").await.unwrap();
    a.execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", &[])
        .await
        .unwrap();
    on_both(["serializable", "off"], "SET TRANSACTION (extended)").await;
    a.execute("SET TRANSACTION READ ONLY", &[]).await.unwrap();
    on_both(["serializable", "on"], "a second SET TRANSACTION").await;
    a.batch_execute("COMMIT").await.unwrap();

    // Session characteristics: the defaults of a's later transactions on every node,
    // and of its statements outside a transaction; never b's.
    a.batch_execute("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .await
        .unwrap();
    on_both(["repeatable read", "off"], "session characteristics").await;
    a.batch_execute("BEGIN").await.unwrap();
    on_both(
        ["repeatable read", "off"],
        "session characteristics in a transaction",
    )
    .await;
    a.batch_execute("COMMIT").await.unwrap();
    for id in [x, y] {
        let got = text_rows(&b, &modes(id)).await[0][0].clone();
        assert_eq!(
            got.as_deref(),
            Some("read committed"),
            "b got a's characteristics"
        );
    }
    a.execute(
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY, ISOLATION LEVEL SERIALIZABLE",
        &[],
    )
    .await
    .unwrap();
    on_both(["serializable", "on"], "session characteristics (extended)").await;
    a.batch_execute("RESET default_transaction_read_only")
        .await
        .unwrap();
    on_both(["serializable", "off"], "after RESET").await;
    a.batch_execute("RESET ALL").await.unwrap();
    on_both(["read committed", "off"], "after RESET ALL").await;
    // In a string of several statements: followed too, and never b's.
    a.batch_execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY; SELECT 1")
        .await
        .unwrap();
    for id in [x, y] {
        let got = text_rows(&b, &modes(id)).await[0][1].clone();
        assert_eq!(got.as_deref(), Some("off"), "b got a's characteristics");
    }
    on_both(["read committed", "on"], "characteristics in a string").await;
    a.batch_execute("RESET ALL").await.unwrap();

    // After a query on a worker, a mode that must come first is refused as Postgres
    // refuses it (25001), although the coordinator it goes to ran no query yet.
    for (begin, set) in [
        ("BEGIN READ ONLY", "SET TRANSACTION READ WRITE"),
        ("BEGIN", "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"),
        ("BEGIN", "SET TRANSACTION DEFERRABLE"),
    ] {
        a.batch_execute(begin).await.unwrap();
        let _ = text_rows(&a, &modes(x)).await;
        let e = a.batch_execute(set).await.unwrap_err();
        assert_eq!(code(&e), "25001", "{begin}; <query>; {set}: {e}");
        let e = a
            .batch_execute(&format!("UPDATE t SET v = 0 WHERE id = {y}"))
            .await;
        assert_eq!(code(&e.unwrap_err()), "25P02", "the transaction is aborted");
        a.batch_execute("ROLLBACK").await.unwrap();
    }
    // No change is no error: read-write in a read-write transaction, the same
    // isolation level; and READ ONLY may come any time. As on Postgres.
    a.batch_execute("BEGIN").await.unwrap();
    let _ = text_rows(&a, &modes(x)).await;
    a.batch_execute("SET TRANSACTION READ WRITE").await.unwrap();
    a.batch_execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
        .await
        .unwrap();
    on_both(["read committed", "off"], "READ WRITE after a query").await;
    a.batch_execute("SET TRANSACTION READ ONLY").await.unwrap();
    on_both(["read committed", "on"], "READ ONLY after a query").await;
    a.batch_execute("COMMIT").await.unwrap();
    // The same after a worker ran a query in an earlier transaction only.
    let _ = text_rows(&a, &modes(y)).await;
    a.batch_execute("BEGIN").await.unwrap();
    a.batch_execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
        .await
        .unwrap();
    on_both(
        ["serializable", "off"],
        "SET TRANSACTION first in a transaction",
    )
    .await;
    a.batch_execute("COMMIT").await.unwrap();
    // A BEGIN with options and SETs in one string: the options reach joining nodes.
    a.batch_execute("BEGIN READ ONLY; SET LOCAL work_mem = '2MB'")
        .await
        .unwrap();
    on_both(
        ["read committed", "on"],
        "BEGIN READ ONLY; SET in one string",
    )
    .await;
    a.batch_execute("COMMIT").await.unwrap();

    // `BEGIN; SET TRANSACTION ...` in one string: the new transaction's nodes get it.
    a.batch_execute("BEGIN; SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
        .await
        .unwrap();
    on_both(
        ["serializable", "off"],
        "BEGIN; SET TRANSACTION in one string",
    )
    .await;
    // `ROLLBACK; BEGIN` in one string: the next transaction inherits none of it.
    a.batch_execute("ROLLBACK; BEGIN").await.unwrap();
    on_both(
        ["read committed", "off"],
        "the transaction after ROLLBACK; BEGIN",
    )
    .await;
    a.batch_execute("COMMIT").await.unwrap();
    a.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .await
        .unwrap();
    a.batch_execute("SET TRANSACTION READ ONLY").await.unwrap();
    let _ = text_rows(&a, &modes(x)).await;
    a.batch_execute("COMMIT; BEGIN READ ONLY").await.unwrap();
    // y joins the new transaction; x, the old one's node, is in it already.
    let got = text_rows(&a, &modes(y)).await[0].clone();
    assert_eq!(
        got,
        vec![Some("read committed".into()), Some("on".into())],
        "the transaction after COMMIT; BEGIN READ ONLY"
    );
    a.batch_execute("COMMIT").await.unwrap();

    // AND CHAIN: the next transaction keeps the modes (BEGIN's and SET TRANSACTION's),
    // and the SETs of the one that ended are kept or dropped as it ended.
    let name =
        |id: i64| format!("SELECT current_setting('application_name') FROM t WHERE id = {id}");
    a.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .await
        .unwrap();
    a.batch_execute("SET TRANSACTION READ ONLY").await.unwrap();
    a.batch_execute("SET application_name = 'rolled back'")
        .await
        .unwrap();
    a.batch_execute("ROLLBACK AND CHAIN").await.unwrap();
    on_both(["repeatable read", "on"], "ROLLBACK AND CHAIN").await;
    a.batch_execute("SET application_name = 'committed'")
        .await
        .unwrap();
    a.batch_execute("COMMIT AND CHAIN").await.unwrap();
    on_both(["repeatable read", "on"], "COMMIT AND CHAIN").await;
    a.batch_execute("ROLLBACK").await.unwrap();
    for id in [x, y] {
        let got = text_rows(&a, &name(id)).await[0][0].clone();
        assert_eq!(got.as_deref(), Some("committed"), "the node of {id}");
    }
    on_both(["read committed", "off"], "after the chain").await;
    a.batch_execute("RESET ALL").await.unwrap();
    drop(a);

    // The same with the next request pipelined, sent in the same write before the
    // `ROLLBACK; BEGIN` / `COMMIT; BEGIN READ ONLY` is answered; in a failed
    // transaction too (where the router sends on without waiting for the answer).
    let mut r = Raw::login(env.port(), &env.db).await;
    for (first, end, want, fail) in [
        (
            "BEGIN; SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "ROLLBACK; BEGIN",
            "read committed off",
            false,
        ),
        (
            "BEGIN ISOLATION LEVEL REPEATABLE READ",
            "COMMIT; BEGIN READ ONLY",
            "read committed on",
            false,
        ),
        (
            "BEGIN; SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "ROLLBACK; BEGIN",
            "read committed off",
            true,
        ),
        (
            "BEGIN ISOLATION LEVEL REPEATABLE READ",
            "ROLLBACK; BEGIN READ ONLY",
            "read committed on",
            true,
        ),
    ] {
        let m = r.simple(first).await;
        assert!(raw::errors(&m).is_empty(), "{first}: {m:?}");
        if fail {
            let m = r.simple("SELECT 1/0").await;
            assert_eq!(raw::errors(&m)[0].sqlstate(), "22012", "{m:?}");
        }
        r.send(&raw::cat(&[raw::query(end), raw::query("SELECT 1")]))
            .await;
        for sql in [end, "SELECT 1"] {
            let m = r.until_ready().await;
            assert!(raw::errors(&m).is_empty(), "{sql}: {m:?}");
        }
        for id in [x, y] {
            let row = raw::rows(&r.simple(&modes(id)).await).concat();
            let got: Vec<_> = row.iter().map(|v| v.as_deref().unwrap_or("")).collect();
            assert_eq!(got.join(" "), want, "{end} pipelined: the node of {id}");
        }
        let m = r.simple("COMMIT").await;
        assert!(raw::errors(&m).is_empty(), "COMMIT: {m:?}");
    }
    let modes_of = |m: &[raw::Msg]| {
        raw::rows(m)
            .concat()
            .iter()
            .map(|v| v.clone().unwrap_or_default())
            .collect::<Vec<_>>()
            .join(" ")
    };
    // A BEGIN with options, and the next request sent before it is answered; a BEGIN
    // after another statement of the same string.
    r.send(&raw::cat(&[
        raw::query("BEGIN READ ONLY"),
        raw::query("SELECT 1"),
    ]))
    .await;
    r.until_ready().await;
    r.until_ready().await;
    let m = r.simple(&modes(y)).await;
    assert_eq!(
        modes_of(&m),
        "read committed on",
        "pipelined BEGIN READ ONLY: {m:?}"
    );
    r.simple("COMMIT").await;
    // (An isolation level there is refused by Postgres: the string's first
    // statement ran in the transaction the BEGIN turns into a block.)
    let m = r.simple("SELECT 1; BEGIN READ ONLY").await;
    assert!(raw::errors(&m).is_empty(), "{m:?}");
    assert_eq!(m.last().unwrap().body[..], b"T"[..], "{m:?}");
    let m = r.simple(&modes(x)).await;
    assert_eq!(
        modes_of(&m),
        "read committed on",
        "SELECT 1; BEGIN READ ONLY: {m:?}"
    );
    r.simple("COMMIT").await;
    // The new transaction fails in the string that opened it: the old one's modes are
    // gone all the same (seen after ROLLBACK TO its savepoint).
    r.simple("BEGIN; SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
        .await;
    let m = r.simple("ROLLBACK; BEGIN; SAVEPOINT a; SELECT 1/0").await;
    assert_eq!(raw::errors(&m)[0].sqlstate(), "22012", "{m:?}");
    let m = r.simple("ROLLBACK TO a").await;
    assert!(raw::errors(&m).is_empty(), "{m:?}");
    let m = r.simple(&modes(y)).await;
    assert_eq!(
        modes_of(&m),
        "read committed off",
        "ROLLBACK; BEGIN; <error>: {m:?}"
    );
    r.simple("ROLLBACK").await;
}

/// `set_config(name, value, true)`, the way PostgREST and row-level-security
/// applications give one transaction its tenant and role, reaches every node of the
/// transaction, as `SET LOCAL ROLE` does; and a transaction that took a role for itself
/// commits on several nodes, although Postgres lets only that role (or a superuser)
/// finish its prepared parts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_local_set_config_and_roles_reach_every_node() {
    let env = TestEnv::with(EnvOptions {
        workers: 2,
        users: "[[users]]\nname = \"postgres\"\n\n[[users]]\nname = \"sg_rls_app\"\n".into(),
        ..Default::default()
    })
    .await;
    let a = env.client().await;
    let (x, y) = two_node_table(&a, true).await;
    for node in [env.direct().await, env.worker(0).await, env.worker(1).await] {
        node.batch_execute(
            "DO $$BEGIN CREATE ROLE sg_rls_app LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END$$;
             DO $$BEGIN CREATE ROLE sg_rls_tenant; EXCEPTION WHEN duplicate_object THEN NULL; END$$;
             GRANT sg_rls_tenant TO sg_rls_app;
             GRANT USAGE ON SCHEMA public TO sg_rls_tenant, sg_rls_app;
             GRANT ALL ON ALL TABLES IN SCHEMA public TO sg_rls_tenant, sg_rls_app;",
        )
        .await
        .unwrap();
    }
    let app = connect(&env.conn_str("sg_rls_app")).await.unwrap();
    let who = |id: i64| {
        format!("SELECT current_user::text, current_setting('app.t', true) FROM t WHERE id = {id}")
    };
    let on_both = |want: [&'static str; 2], why: &'static str| {
        let (app, who) = (&app, &who);
        async move {
            for id in [x, y] {
                let got = text_rows(app, &who(id)).await[0].clone();
                let got: Vec<_> = got.iter().map(|v| v.as_deref().unwrap_or("")).collect();
                assert_eq!(got, want, "{why}: the node of {id}");
            }
        }
    };
    let v = |id: i64| format!("SELECT v FROM t WHERE id = {id}");
    let values = || async {
        let mut out = Vec::new();
        for id in [x, y] {
            out.push(text_rows(&a, &v(id)).await[0][0].clone().unwrap());
        }
        out
    };
    let prepared_left = || async {
        let mut n = 0i64;
        for node in [env.direct().await, env.worker(0).await, env.worker(1).await] {
            n += node
                .query_one(
                    "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()",
                    &[],
                )
                .await
                .unwrap()
                .get::<_, i64>(0);
        }
        n
    };

    // Several calls in one simple query, before any worker joined.
    app.batch_execute("BEGIN").await.unwrap();
    app.batch_execute(
        "SELECT set_config('role', 'sg_rls_tenant', true), set_config('app.t', 'one', true)",
    )
    .await
    .unwrap();
    on_both(["sg_rls_tenant", "one"], "set_config(..., true)").await;
    // A parameter, in the extended protocol, after both workers joined.
    app.query("SELECT set_config('app.t', $1, true)", &[&"two"])
        .await
        .unwrap();
    on_both(["sg_rls_tenant", "two"], "set_config($1, true)").await;
    // The name a parameter too, and a value that ends like the router's quote tag.
    app.query("SELECT set_config($1, $2, true)", &[&"App.T", &"x$sg"])
        .await
        .unwrap();
    on_both(["sg_rls_tenant", "x$sg"], "set_config($1, $2, true)").await;
    // A `;` inside the value and a sqlcommenter comment after it.
    app.batch_execute("SET LOCAL app.t = 'a;b' /*controller='c',route='/x;y'*/")
        .await
        .unwrap();
    on_both(["sg_rls_tenant", "a;b"], "SET LOCAL with a comment").await;
    app.query("SELECT set_config('app.t', $1, true)", &[&"two"])
        .await
        .unwrap();
    // Writes on both nodes as that role: two-phase commit, finished as the role.
    for id in [x, y] {
        app.execute("UPDATE t SET v = v + 1 WHERE id = $1", &[&id])
            .await
            .unwrap();
    }
    app.batch_execute("COMMIT").await.unwrap();
    assert_eq!(prepared_left().await, 0, "prepared parts left after COMMIT");
    assert_eq!(values().await, ["1", "1"], "the commit's writes");
    // The transaction's role and setting are gone, on the connections that finished it.
    for id in [x, y] {
        let got = text_rows(&app, &who(id)).await[0].clone();
        assert_eq!(got[0].as_deref(), Some("sg_rls_app"), "role after COMMIT");
        assert_ne!(got[1].as_deref(), Some("two"), "setting after COMMIT");
    }

    // SET LOCAL ROLE, and a rollback through ROLLBACK TO.
    app.batch_execute("BEGIN").await.unwrap();
    app.batch_execute("SET LOCAL ROLE sg_rls_tenant")
        .await
        .unwrap();
    app.batch_execute("SAVEPOINT s").await.unwrap();
    app.batch_execute("SELECT set_config('app.t', 'three', true)")
        .await
        .unwrap();
    on_both(["sg_rls_tenant", "three"], "SET LOCAL ROLE").await;
    app.batch_execute("ROLLBACK TO SAVEPOINT s").await.unwrap();
    for id in [x, y] {
        let got = text_rows(&app, &who(id)).await[0].clone();
        assert_eq!(got[0].as_deref(), Some("sg_rls_tenant"));
        assert_ne!(got[1].as_deref(), Some("three"), "ROLLBACK TO kept it");
        app.execute("UPDATE t SET v = v + 10 WHERE id = $1", &[&id])
            .await
            .unwrap();
    }
    app.batch_execute("COMMIT").await.unwrap();
    assert_eq!(prepared_left().await, 0, "prepared parts left after COMMIT");
    assert_eq!(values().await, ["11", "11"]);
    on_both(["sg_rls_app", ""], "after the second transaction").await;

    // The coordinator writes too, and the same request goes on after the COMMIT: it
    // runs as the session's role again, not as the owner the COMMIT was finished as.
    app.batch_execute("BEGIN").await.unwrap();
    app.batch_execute("SET LOCAL ROLE sg_rls_tenant")
        .await
        .unwrap();
    app.batch_execute("INSERT INTO local_log VALUES (1)")
        .await
        .unwrap();
    for id in [x, y] {
        app.execute("UPDATE t SET v = v + 100 WHERE id = $1", &[&id])
            .await
            .unwrap();
    }
    let after = app
        .simple_query("COMMIT; SELECT current_user::text")
        .await
        .unwrap();
    let user = after.iter().find_map(|m| match m {
        shardgate_tests::tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
        _ => None,
    });
    assert_eq!(
        user.as_deref(),
        Some("sg_rls_app"),
        "the role after COMMIT in the same request"
    );
    assert_eq!(prepared_left().await, 0, "prepared parts left after COMMIT");
    assert_eq!(values().await, ["111", "111"]);
    let n = text_rows(&a, "SELECT count(*) FROM local_log").await;
    assert_eq!(n[0][0].as_deref(), Some("1"));
    on_both(["sg_rls_app", ""], "after the third transaction").await;
}

/// A distributed table's owner, grants, row-level security and policies reach its
/// shards: when it is distributed, and after GRANT / REVOKE / CREATE POLICY / DROP
/// POLICY through the router. A role a client logs in as (or takes) is checked on the
/// workers as on one Postgres: refused where it has no grant, and shown only the rows
/// its policy lets it see.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privileges_and_policies_reach_the_shards() {
    let env = TestEnv::with(EnvOptions {
        workers: 2,
        users: "[[users]]\nname = \"postgres\"\n\n[[users]]\nname = \"sg_priv_app\"\n".into(),
        ..Default::default()
    })
    .await;
    let a = env.client().await;
    let (x, y) = two_node_table(&a, false).await;
    // Roles are not propagated: they are made on every node.
    for node in [env.direct().await, env.worker(0).await, env.worker(1).await] {
        node.batch_execute(
            "DO $$BEGIN CREATE ROLE sg_priv_app LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END$$;
             DO $$BEGIN CREATE ROLE sg_priv_reader; EXCEPTION WHEN duplicate_object THEN NULL; END$$",
        )
        .await
        .unwrap();
    }
    // Privileges and a policy made before the table is distributed.
    for sql in [
        "CREATE TABLE pt (tenant int8, v text)",
        "GRANT SELECT ON pt TO sg_priv_app",
        "ALTER TABLE pt ENABLE ROW LEVEL SECURITY",
        "CREATE POLICY own_rows ON pt USING (tenant = current_setting('app.tenant')::int8)",
        "SELECT create_distributed_table('pt', 'tenant', shard_count => 8)",
    ] {
        a.batch_execute(sql).await.unwrap();
    }
    for id in [x, y] {
        a.execute("INSERT INTO pt VALUES ($1, 'row')", &[&id])
            .await
            .unwrap();
    }
    let app = connect(&env.conn_str("sg_priv_app")).await.unwrap();
    // What the app sees of `id`'s row as tenant `as_tenant`: Ok(rows) or the SQLSTATE.
    let sees = |as_tenant: i64, id: i64| {
        let app = &app;
        async move {
            app.batch_execute(&format!("BEGIN; SET LOCAL app.tenant = {as_tenant}"))
                .await
                .unwrap();
            let r = app
                .query("SELECT v FROM pt WHERE tenant = $1", &[&id])
                .await
                .map(|rows| rows.len())
                .map_err(|e| code(&e));
            app.batch_execute("ROLLBACK").await.unwrap();
            r
        }
    };
    for (me, other) in [(x, y), (y, x)] {
        assert_eq!(sees(me, me).await, Ok(1), "tenant {me} reads its row");
        assert_eq!(
            sees(me, other).await,
            Ok(0),
            "tenant {me} reads {other}'s row"
        );
    }
    let update = |id: i64| {
        let app = &app;
        async move {
            app.batch_execute(&format!("BEGIN; SET LOCAL app.tenant = {x}"))
                .await
                .unwrap();
            let r = app
                .execute("UPDATE pt SET v = 'changed' WHERE tenant = $1", &[&id])
                .await
                .map_err(|e| code(&e));
            app.batch_execute("ROLLBACK").await.unwrap();
            r
        }
    };
    assert_eq!(
        update(x).await,
        Err("42501".into()),
        "UPDATE without a grant"
    );
    // GRANT through the router reaches every shard; the policy still holds.
    a.batch_execute("GRANT UPDATE ON pt TO sg_priv_app")
        .await
        .unwrap();
    assert_eq!(update(x).await, Ok(1), "UPDATE of its own row after GRANT");
    assert_eq!(update(y).await, Ok(0), "UPDATE of another tenant's row");
    a.batch_execute("REVOKE ALL ON pt FROM sg_priv_app")
        .await
        .unwrap();
    assert_eq!(sees(x, x).await, Err("42501".into()), "SELECT after REVOKE");
    // Column privileges come and go too.
    a.batch_execute("GRANT SELECT (tenant, v) ON pt TO sg_priv_app")
        .await
        .unwrap();
    assert_eq!(sees(x, x).await, Ok(1), "column grants");
    a.batch_execute("REVOKE SELECT (tenant, v) ON pt FROM sg_priv_app")
        .await
        .unwrap();
    assert_eq!(
        sees(x, x).await,
        Err("42501".into()),
        "column grants revoked"
    );
    a.batch_execute("GRANT SELECT ON ALL TABLES IN SCHEMA public TO sg_priv_app")
        .await
        .unwrap();
    assert_eq!(sees(y, y).await, Ok(1), "GRANT ... ON ALL TABLES IN SCHEMA");
    // Policies: none left shows nothing; a new one applies at once.
    a.batch_execute("DROP POLICY own_rows ON pt").await.unwrap();
    assert_eq!(
        sees(y, y).await,
        Ok(0),
        "row-level security without a policy"
    );
    a.batch_execute("ALTER TABLE pt DISABLE ROW LEVEL SECURITY")
        .await
        .unwrap();
    assert_eq!(sees(x, y).await, Ok(1), "row-level security off");
    a.batch_execute("ALTER TABLE pt ENABLE ROW LEVEL SECURITY")
        .await
        .unwrap();
    assert_eq!(sees(y, y).await, Ok(0), "row-level security on again");
    a.batch_execute("CREATE POLICY every_row ON pt FOR SELECT TO sg_priv_app USING (true)")
        .await
        .unwrap();
    assert_eq!(sees(x, y).await, Ok(1), "a policy that shows every row");
    // A role the workers lack: a policy for it fails the statement everywhere
    // (skipped, a restrictive one would take no rights away, and a permissive one
    // would hide rows without a word).
    env.direct()
        .await
        .batch_execute(
            "DO $$BEGIN CREATE ROLE sg_priv_nowhere; EXCEPTION WHEN duplicate_object THEN NULL; END$$",
        )
        .await
        .unwrap();
    let e = a
        .batch_execute("CREATE POLICY for_nowhere ON pt FOR SELECT TO sg_priv_nowhere USING (true)")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "42704", "{e:?}");
    let e = a
        .batch_execute(
            "CREATE POLICY limit_app ON pt AS RESTRICTIVE TO sg_priv_app, sg_priv_nowhere USING (tenant = 0)",
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), "42704", "{e:?}");
    let policies: i64 = env
        .direct()
        .await
        .query_one(
            "SELECT count(*) FROM pg_policy WHERE polrelid = 'pt'::regclass AND polname IN ('limit_app', 'for_nowhere')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(policies, 0, "the refused policies are on no node");
    // SET SESSION AUTHORIZATION would not reach the workers (they would keep the
    // login's identity and rights): refused, in every spelling.
    for sql in [
        "SET SESSION AUTHORIZATION sg_priv_app",
        "SET session_authorization = 'sg_priv_app'",
        "SELECT set_config('session_authorization', 'sg_priv_app', false)",
    ] {
        let e = a.batch_execute(sql).await.unwrap_err();
        assert_eq!(code(&e), "0A000", "{sql}: {e:?}");
    }
    // The extended protocol too.
    let e = a
        .execute("SET SESSION AUTHORIZATION sg_priv_app", &[])
        .await
        .unwrap_err();
    assert_eq!(code(&e), "0A000", "{e:?}");
    let who: String = a
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(who, "postgres");
    a.batch_execute("SET SESSION AUTHORIZATION DEFAULT")
        .await
        .unwrap();
    assert_eq!(sees(x, y).await, Ok(1), "no restrictive policy anywhere");
    // FORCE ROW LEVEL SECURITY is not followed: refused, not run on the coordinator
    // alone.
    let e = a
        .batch_execute("ALTER TABLE pt FORCE ROW LEVEL SECURITY")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "0A000", "{e:?}");
    // The shards' ACLs are the table's, entry for entry.
    // A grant made by a grantee with the grant option (on the coordinator: DDL
    // through the router needs the catalog's rights, which the app lacks) reaches the
    // shards at the next sync with the same grantor.
    env.direct()
        .await
        .batch_execute(
            "GRANT SELECT ON pt TO sg_priv_app WITH GRANT OPTION;
             SET ROLE sg_priv_app; GRANT SELECT ON pt TO sg_priv_reader; RESET ROLE",
        )
        .await
        .unwrap();
    a.batch_execute("GRANT SELECT ON pt TO sg_priv_app WITH GRANT OPTION")
        .await
        .unwrap();
    let want = acl(&env.direct().await, "pt").await;
    assert!(
        want.iter().any(|e| e == "sg_priv_reader=r/sg_priv_app"),
        "{want:?}"
    );
    for i in 0..2 {
        let w = env.worker(i).await;
        let shard: String = w
            .query_one(
                "SELECT min(tablename::text) FROM pg_tables WHERE tablename ~ '^pt_[0-9]+$'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(acl(&w, &shard).await, want, "chained grant on {shard}");
    }
    // A new owner too (the ACL's entries move to it).
    a.batch_execute("ALTER TABLE pt OWNER TO sg_priv_app")
        .await
        .unwrap();
    let want = acl(&env.direct().await, "pt").await;
    assert!(
        want.iter().any(|e| e.starts_with("sg_priv_app=")),
        "{want:?}"
    );
    let mut shards = 0;
    for i in 0..2 {
        let w = env.worker(i).await;
        for r in w
            .query(
                "SELECT tablename::text FROM pg_tables WHERE tablename ~ '^pt_[0-9]+$'",
                &[],
            )
            .await
            .unwrap()
        {
            let shard: String = r.get(0);
            assert_eq!(acl(&w, &shard).await, want, "{shard}");
            let owner: String = w
                .query_one(
                    "SELECT relowner::regrole::text FROM pg_class WHERE oid = $1::text::regclass",
                    &[&shard],
                )
                .await
                .unwrap()
                .get(0);
            assert_eq!(owner, "sg_priv_app", "{shard}");
            shards += 1;
        }
    }
    assert_eq!(shards, 8);
    // Like other DDL on distributed tables, not inside a transaction block.
    a.batch_execute("BEGIN").await.unwrap();
    let e = a
        .batch_execute("GRANT INSERT ON pt TO sg_priv_app")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "25001", "{e:?}");
    a.batch_execute("ROLLBACK").await.unwrap();
}

/// A relation's ACL entries, sorted.
async fn acl(c: &Client, rel: &str) -> Vec<String> {
    c.query_one(
        "SELECT coalesce(array_agg(x::text ORDER BY x::text), '{}') FROM pg_class, unnest(relacl) x WHERE oid = $1::text::regclass",
        &[&rel],
    )
    .await
    .unwrap()
    .get(0)
}

/// The shard id of `t`'s row `id` (the router's admin function).
async fn shard_id_of(c: &Client, id: i64) -> i64 {
    let rows = text_rows(
        c,
        &format!("SELECT get_shard_id_for_distribution_column('t', {id})"),
    )
    .await;
    rows[0][0].as_deref().unwrap().parse().unwrap()
}

/// An UPDATE that sets the distribution column to the row's own value (ORMs that write
/// every column do) runs, as does one whose new value belongs to the same shard; one
/// that would move the row to another shard is refused (0A000) and changes nothing.
/// `ON CONFLICT DO UPDATE SET id = EXCLUDED.id` runs too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_may_set_the_distribution_column_within_its_shard() {
    let env = fleet("transaction").await;
    let c = env.client().await;
    let (x, y) = two_node_table(&c, false).await;
    assert_eq!(
        c.execute("UPDATE t SET id = $1, v = 7 WHERE id = $1", &[&x])
            .await
            .unwrap(),
        1
    );
    assert_eq!(v(&c, x).await, 7);
    c.batch_execute(&format!("UPDATE t SET v = 8, id = {x} WHERE id = {x}"))
        .await
        .unwrap();
    assert_eq!(v(&c, x).await, 8);
    c.batch_execute(&format!("UPDATE t SET id = t.id, v = 9 WHERE id = {x}"))
        .await
        .unwrap();
    assert_eq!(v(&c, x).await, 9);
    // Another shard (another node, even): refused, nothing changed.
    for sql in [
        format!("UPDATE t SET id = {y}, v = 0 WHERE id = {x}"),
        format!("UPDATE t SET id = {y} WHERE id = {x} RETURNING id"),
    ] {
        let e = c.batch_execute(&sql).await.unwrap_err();
        assert_eq!(code(&e), "0A000", "{sql}: {e:?}");
        assert!(
            e.as_db_error()
                .unwrap()
                .message()
                .contains("cannot move a row of t to another shard"),
            "{e:?}"
        );
    }
    let e = c
        .execute("UPDATE t SET id = $2 WHERE id = $1", &[&x, &y])
        .await
        .unwrap_err();
    assert_eq!(code(&e), "0A000", "{e:?}");
    assert_eq!(v(&c, x).await, 9);
    assert_eq!(v(&c, y).await, 0);
    // A new value of the same shard: the row takes it, and is found by it.
    let home = shard_id_of(&c, x).await;
    let mut to = 41;
    while shard_id_of(&c, to).await != home {
        to += 1;
    }
    let rows = c
        .query(
            "UPDATE t SET id = $2 WHERE id = $1 RETURNING id",
            &[&x, &to],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(v(&c, to).await, 9);
    // Upserts that write the key back.
    c.batch_execute(&format!(
        "INSERT INTO t (id, v) VALUES ({to}, 1) ON CONFLICT (id) DO UPDATE SET id = EXCLUDED.id, v = EXCLUDED.v + 100"
    ))
    .await
    .unwrap();
    assert_eq!(v(&c, to).await, 101);
}

/// `ROLLBACK WORK TO a` and `ROLLBACK TRANSACTION TO SAVEPOINT a` are savepoint
/// commands on every node of the transaction, not its end: the writes before the
/// savepoint commit on both nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_work_to_a_savepoint_keeps_the_transaction() {
    let env = fleet("transaction").await;
    let c = env.client().await;
    let (x, y) = two_node_table(&c, false).await;
    for (n, rollback_to) in [
        (1, "ROLLBACK WORK TO a"),
        (2, "rollback transaction to savepoint a"),
    ] {
        c.batch_execute("BEGIN").await.unwrap();
        c.execute("UPDATE t SET v = $2 WHERE id = $1", &[&x, &n])
            .await
            .unwrap();
        c.batch_execute("SAVEPOINT a").await.unwrap();
        c.execute("UPDATE t SET v = 100 WHERE id = $1", &[&x])
            .await
            .unwrap();
        c.execute("UPDATE t SET v = 100 WHERE id = $1", &[&y])
            .await
            .unwrap();
        c.batch_execute(rollback_to).await.unwrap();
        c.execute("UPDATE t SET v = $2 WHERE id = $1", &[&y, &(n + 10)])
            .await
            .unwrap();
        c.batch_execute("COMMIT").await.unwrap();
        assert_eq!(
            (v(&c, x).await, v(&c, y).await),
            (n, n + 10),
            "{rollback_to}"
        );
    }
}

/// A number given for a text distribution column is stored as the number's text
/// (`007` is '7', `'0042'::int` is '42'): the row goes to the shard of that text, where
/// a query for it finds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbers_for_a_text_distribution_column_go_where_their_text_does() {
    let env = fleet("transaction").await;
    let c = env.client().await;
    for sql in [
        "CREATE TABLE tx (name text PRIMARY KEY, v int)",
        "SELECT create_distributed_table('tx', 'name', shard_count => 16)",
    ] {
        c.batch_execute(sql).await.unwrap();
    }
    let values = [
        "007", "0042", "000123", "0099", "0005", "00311", "08", "0000",
    ];
    for (i, n) in values.iter().enumerate() {
        c.batch_execute(&format!("INSERT INTO tx VALUES ({n}, {i})"))
            .await
            .unwrap();
        c.batch_execute(&format!(
            "INSERT INTO tx VALUES (' 1{n}'::int, {i}) ON CONFLICT (name) DO NOTHING"
        ))
        .await
        .unwrap();
    }
    for (i, n) in values.iter().enumerate() {
        let stored = n.trim_start_matches('0');
        let stored = if stored.is_empty() { "0" } else { stored };
        for name in [
            stored.to_owned(),
            format!("1{n}").parse::<i64>().unwrap().to_string(),
        ] {
            let rows = c
                .query("SELECT v FROM tx WHERE name = $1", &[&name])
                .await
                .unwrap();
            assert_eq!(rows.len(), 1, "{n} stored as {name}");
            assert_eq!(rows[0].get::<_, i32>(0), i as i32);
        }
    }
    // A new value written as a cast string: the row's shard is its text's.
    c.batch_execute("UPDATE tx SET name = '0007'::int, v = 70 WHERE name = '7'")
        .await
        .unwrap();
    c.batch_execute("INSERT INTO tx VALUES (CAST('+0051' AS bigint), 51)")
        .await
        .unwrap();
    let rows = c
        .query("SELECT v FROM tx WHERE name = '51'", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 1, "CAST('+0051' AS bigint) is '51'");
    let rows = c
        .query("SELECT v FROM tx WHERE name = '7'", &[])
        .await
        .unwrap();
    assert_eq!(rows[0].get::<_, i32>(0), 70);
    let e = c
        .batch_execute("INSERT INTO tx VALUES (1.50, 0)")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "0A000", "{e:?}");
}

/// A string that would end a transaction spanning several nodes on one of them
/// (`SAVEPOINT a; COMMIT`, `BEGIN; COMMIT`) is refused; the transaction then rolls back
/// whole: no node's part is committed alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_string_cannot_commit_one_node_of_several() {
    let env = fleet("transaction").await;
    let c = env.client().await;
    let (x, y) = two_node_table(&c, false).await;
    for end in ["SAVEPOINT a; COMMIT", "BEGIN; COMMIT", "SELECT 1; COMMIT"] {
        c.batch_execute("BEGIN").await.unwrap();
        for id in [x, y] {
            c.execute("UPDATE t SET v = v + 1 WHERE id = $1", &[&id])
                .await
                .unwrap();
        }
        let e = c.batch_execute(end).await.unwrap_err();
        assert_eq!(code(&e), "0A000", "{end}: {e:?}");
        c.batch_execute("ROLLBACK").await.unwrap();
        assert_eq!((v(&c, x).await, v(&c, y).await), (0, 0), "{end}");
    }
}

/// Parse, Bind and Execute of the unnamed statement, with text parameters.
fn pbe(sql: &str, params: &[Option<&str>]) -> Vec<u8> {
    raw::cat(&[
        raw::parse("", sql, &[]),
        raw::bind("", "", params),
        raw::execute("", 0),
    ])
}

/// A simple Query pipelined after extended-protocol messages that have no Sync yet
/// (no Flush either) runs after them in their implicit transaction, as on Postgres;
/// it used to hang the session, the router waiting for answers Postgres held back.
/// After a failed message Postgres ignores everything up to the Sync, that Query
/// included. A Query that needs another node than the messages' is refused (0A000)
/// after their answers. Pool size 1: a backend left mid-exchange would show in the
/// next client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_queries_pipelined_after_unsynced_extended_messages() {
    let env = one_connection_per_node().await;
    let a = env.client().await;
    let (x, _y) = two_node_table(&a, false).await;
    a.batch_execute("CREATE TABLE plain_local (n int)")
        .await
        .unwrap();
    let mut r = Raw::login(env.port(), &env.db).await;
    let xs = x.to_string();

    // Not distributed: the coordinator runs both.
    r.send(&raw::cat(&[pbe("SELECT 1", &[]), raw::query("SELECT 2")]))
        .await;
    let m = r.until_ready().await;
    assert!(raw::errors(&m).is_empty(), "{m:?}");
    assert_eq!(raw::tags(&m), "12DCTDCZ", "{m:?}");
    assert_eq!(raw::rows(&m), [[Some("1".into())], [Some("2".into())]]);
    r.send(&raw::sync()).await;
    assert_eq!(raw::tags(&r.until_ready().await), "Z");

    // A routed statement, then a query for the same node: both run there, in the
    // client's transaction.
    assert!(raw::errors(&r.simple("BEGIN").await).is_empty());
    r.send(&raw::cat(&[
        pbe("UPDATE t SET v = v + 1 WHERE id = $1", &[Some(&xs)]),
        raw::query(&format!("SELECT v FROM t WHERE id = {x}")),
    ]))
    .await;
    let m = r.until_ready().await;
    assert!(raw::errors(&m).is_empty(), "{m:?}");
    assert_eq!(raw::rows(&m), [[Some("1".into())]], "{m:?}");
    r.send(&raw::sync()).await;
    assert_eq!(raw::tags(&r.until_ready().await), "Z");
    assert!(raw::errors(&r.simple("COMMIT").await).is_empty());
    assert_eq!(v(&a, x).await, 1);

    // A routed statement, then a query for the coordinator or an admin function:
    // refused after the statement's answers; the implicit transaction is rolled back.
    for (q, code) in [
        ("SELECT count(*) FROM plain_local", "0A000"),
        ("SELECT create_reference_table('plain_local')", "25001"),
    ] {
        r.send(&raw::cat(&[
            pbe("UPDATE t SET v = v + 10 WHERE id = $1", &[Some(&xs)]),
            raw::query(q),
        ]))
        .await;
        let m = r.until_ready().await;
        assert_eq!(raw::tags(&m), "12CEZ", "{q}: {m:?}");
        assert_eq!(raw::errors(&m)[0].sqlstate(), code, "{q}: {m:?}");
        r.send(&raw::sync()).await;
        assert_eq!(raw::tags(&r.until_ready().await), "Z", "{q}");
        assert_eq!(v(&a, x).await, 1, "{q}: the update is rolled back");
    }

    // The refused Query ended the messages' implicit transaction: the session is no
    // longer tied to their node, before any Sync (a Sync later gets its own Z).
    r.send(&raw::cat(&[
        pbe("UPDATE t SET v = v + 10 WHERE id = $1", &[Some(&xs)]),
        raw::query("SELECT count(*) FROM plain_local"),
    ]))
    .await;
    assert_eq!(raw::tags(&r.until_ready().await), "12CEZ");
    let m = r.simple("SELECT count(*) FROM plain_local").await;
    assert_eq!(raw::rows(&m), [[Some("0".into())]], "{m:?}");
    r.send(&raw::sync()).await;
    assert_eq!(raw::tags(&r.until_ready().await), "Z");

    // BEGIN in the extended messages, COMMIT as a simple Query: one transaction on the
    // worker, committed (SET and SHOW run there too).
    r.send(&raw::cat(&[
        pbe("BEGIN", &[]),
        pbe("UPDATE t SET v = v + 1 WHERE id = $1", &[Some(&xs)]),
        raw::query("SET LOCAL lock_timeout = '7s'"),
        raw::query("SHOW lock_timeout"),
        raw::query("COMMIT"),
    ]))
    .await;
    let m = r.until_ready().await;
    assert!(raw::errors(&m).is_empty(), "{m:?}");
    let m2 = r.until_ready().await;
    assert_eq!(raw::rows(&m2), [[Some("7s".into())]], "{m2:?}");
    let m3 = r.until_ready().await;
    assert_eq!(raw::tags(&m3), "CZ", "{m3:?}");
    assert_eq!(&m3[0].body[..], b"COMMIT\0");
    r.send(&raw::sync()).await;
    assert_eq!(raw::tags(&r.until_ready().await), "Z");
    assert_eq!(v(&a, x).await, 2);

    // A failed message: the Query is ignored up to the Sync, as Postgres does.
    r.send(&raw::cat(&[
        pbe("SELEC 1", &[]),
        raw::query("INSERT INTO plain_local VALUES (1)"),
    ]))
    .await;
    let e = r.next().await;
    assert_eq!((e.tag, e.sqlstate()), (b'E', "42601".to_owned()), "{e:?}");
    r.send(&raw::sync()).await;
    assert_eq!(raw::tags(&r.until_ready().await), "Z");
    let m = r.simple("SELECT count(*) FROM plain_local").await;
    assert_eq!(
        raw::rows(&m),
        [[Some("0".into())]],
        "the ignored INSERT ran: {m:?}"
    );

    // Messages answered after a Flush, then a batch for another node and its Sync:
    // refused, and the first messages' implicit transaction rolls back with the
    // pipeline, as on Postgres (the router used to answer alone and leave it open).
    r.send(&raw::cat(&[
        pbe("INSERT INTO plain_local VALUES (5)", &[]),
        raw::flush(),
    ]))
    .await;
    let mut m = Vec::new();
    for _ in 0..3 {
        m.push(r.next().await);
    }
    assert_eq!(raw::tags(&m), "12C", "{m:?}");
    r.send(&raw::cat(&[
        pbe("UPDATE t SET v = v + 100 WHERE id = $1", &[Some(&xs)]),
        raw::sync(),
    ]))
    .await;
    let m = r.until_ready().await;
    assert_eq!(raw::tags(&m), "EZ", "{m:?}");
    assert_eq!(raw::errors(&m)[0].sqlstate(), "0A000", "{m:?}");
    let m = r
        .simple("SELECT count(*) FROM plain_local WHERE n = 5")
        .await;
    assert_eq!(
        raw::rows(&m),
        [[Some("0".into())]],
        "the INSERT was kept: {m:?}"
    );
    assert_eq!(v(&a, x).await, 2);

    // A SET among them, rolled back by the failing Query that follows: the router does
    // not take it for the session's (the worker's statement would run with it).
    r.send(&raw::cat(&[
        pbe("SET search_path TO nowhere_schema", &[]),
        raw::query("SELECT 1/0"),
        raw::sync(),
    ]))
    .await;
    let m = r.until_ready().await;
    assert_eq!(raw::tags(&m), "12CEZ", "{m:?}");
    assert_eq!(raw::tags(&r.until_ready().await), "Z");
    let m = r
        .simple(&format!(
            "SELECT current_setting('search_path') FROM t WHERE id = {x}"
        ))
        .await;
    assert!(raw::errors(&m).is_empty(), "{m:?}");
    assert_eq!(raw::rows(&m), [[Some("\"$user\", public".into())]], "{m:?}");

    // COPY FROM STDIN in the extended protocol, its data in the same write as the
    // Execute (the router used to drop the data as sent outside a COPY, and hang).
    r.send(&raw::cat(&[
        pbe("COPY plain_local FROM STDIN", &[]),
        raw::copy_data(b"42\n43\n"),
        raw::copy_done(),
        raw::sync(),
    ]))
    .await;
    let m = r.until_ready().await;
    assert_eq!(raw::tags(&m), "12GCZ", "{m:?}");
    let m = r
        .simple("SELECT count(*) FROM plain_local WHERE n IN (42, 43)")
        .await;
    assert_eq!(raw::rows(&m), [[Some("2".into())]], "{m:?}");

    // The one connection of each node is clean for the next client.
    drop(r);
    let b = env.client().await;
    assert_eq!(v(&b, x).await, 2);
    b.batch_execute("INSERT INTO plain_local VALUES (2)")
        .await
        .unwrap();
}

/// Client statements prepared on one backend connection are bounded
/// (`max_prepared_statements`): beyond it the least recently used are closed on the
/// node between transactions, and prepared again, unseen by the client, when used
/// next. Without the bound every backend kept every statement any client had
/// prepared, for the connection's whole life.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_per_backend_connection_are_bounded() {
    let env = TestEnv::with(EnvOptions {
        workers: 2,
        pool_size: 1,
        pool_mode: "transaction",
        server: "max_prepared_statements = 4".into(),
        ..Default::default()
    })
    .await;
    let a = env.client().await;
    let (x, _) = two_node_table(&a, false).await;
    a.batch_execute(&format!("UPDATE t SET v = 7 WHERE id = {x}"))
        .await
        .unwrap();
    let evicted = |m: &str| metric_sum(m, "shardgate_backend_prepared_evictions_total");
    let before = evicted(&env.metrics().await);

    // Twelve statements on the coordinator and twelve routed to a worker, from two
    // clients, used in turns: each is still right after being closed.
    let b = env.client().await;
    let mut local = Vec::new();
    let mut routed = Vec::new();
    for k in 0..12i32 {
        let c = if k % 2 == 0 { &a } else { &b };
        local.push(c.prepare(&format!("SELECT $1::int + {k}")).await.unwrap());
        routed.push(
            c.prepare(&format!("SELECT v + {k} FROM t WHERE id = $1"))
                .await
                .unwrap(),
        );
    }
    for round in 0..3 {
        for k in 0..12usize {
            let c = if k % 2 == 0 { &a } else { &b };
            let got: i32 = c.query_one(&local[k], &[&100i32]).await.unwrap().get(0);
            assert_eq!(got, 100 + k as i32, "round {round}, statement {k}");
            let got: i32 = c.query_one(&routed[k], &[&x]).await.unwrap().get(0);
            assert_eq!(got, 7 + k as i32, "round {round}, routed statement {k}");
        }
        let n = prepared_here(&a).await;
        assert!(n <= 4, "round {round}: {n} statements on the connection");
    }
    // Inside a transaction nothing is closed; at its end the bound holds again.
    a.batch_execute("BEGIN").await.unwrap();
    for k in (0..12usize).step_by(2) {
        let got: i32 = a.query_one(&local[k], &[&1i32]).await.unwrap().get(0);
        assert_eq!(got, 1 + k as i32);
    }
    let n = prepared_here(&a).await;
    assert!(
        n >= 6,
        "in the transaction: {n} statements on the connection"
    );
    a.batch_execute("COMMIT").await.unwrap();
    let n = prepared_here(&a).await;
    assert!(
        n <= 4,
        "after the transaction: {n} statements on the connection"
    );
    let after = evicted(&env.metrics().await);
    assert!(after - before >= 40.0, "evictions: {before} -> {after}");
}

/// The router's statements prepared on the connection this query runs on.
async fn prepared_here(c: &Client) -> i64 {
    c.query_one(
        "SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'sg\\_%'",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// A read of every shard reaches the client node by node as the rows arrive: the rows
/// of the first node's shards are there while a shard of the second is still locked.
/// (The router used to hold the whole result in memory until the last node answered.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_of_every_shard_stream_to_the_client() {
    let env = fleet("transaction").await;
    let a = env.client().await;
    let _ = two_node_table(&a, false).await;
    // The shards in the order the statement reads them, with their node's port.
    let shards: Vec<(i64, i32, i32)> = a
        .query(
            "SELECT s.shardid, p.groupid, n.nodeport
               FROM shardgate.pg_dist_shard s
               JOIN shardgate.pg_dist_placement p USING (shardid)
               JOIN shardgate.pg_dist_node n USING (groupid)
              WHERE s.logicalrelid = 't'::regclass
              ORDER BY s.shardindex",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let first_group = shards[0].1;
    let &(locked, _, port) = shards
        .iter()
        .find(|s| s.1 != first_group)
        .expect("a shard on the second node");
    // The rows the first node holds.
    let mut first_rows = 0usize;
    for id in 1..=40i64 {
        let sid = shard_of(&a, id).await;
        if shards.iter().any(|s| s.0 == sid && s.1 == first_group) {
            first_rows += 1;
        }
    }
    let locker = connect(&format!(
        "host=127.0.0.1 port={port} user=postgres dbname={}",
        env.db
    ))
    .await
    .unwrap();
    locker
        .batch_execute(&format!(
            "BEGIN; LOCK TABLE t_{locked} IN ACCESS EXCLUSIVE MODE"
        ))
        .await
        .unwrap();

    let mut r = Raw::login(env.port(), &env.db).await;
    r.send(&raw::query("SELECT id FROM t")).await;
    let mut early = Vec::new();
    while let Ok(m) = tokio::time::timeout(Duration::from_secs(3), r.next()).await {
        early.push(m);
    }
    let early_rows = early.iter().filter(|m| m.tag == b'D').count();
    assert_eq!(
        raw::tags(&early[..1.min(early.len())]),
        "T",
        "nothing came while the second node was locked: {early:?}"
    );
    assert!(
        early_rows > 0 && !early.iter().any(|m| m.tag == b'Z'),
        "{early:?}"
    );
    assert_eq!(early_rows, first_rows, "the first node's rows: {early:?}");
    locker.batch_execute("ROLLBACK").await.unwrap();
    let rest = r.until_ready().await;
    let all = early_rows + rest.iter().filter(|m| m.tag == b'D').count();
    assert_eq!(all, 40, "{rest:?}");
    let done = rest
        .iter()
        .find(|m| m.tag == b'C')
        .expect("CommandComplete");
    assert_eq!(&done.body[..], b"SELECT 40\0");
    assert_eq!(
        raw::tags(&rest).matches('T').count(),
        0,
        "one RowDescription: {rest:?}"
    );
}

/// The shard of `t` that holds `id`, as the router says.
async fn shard_of(c: &Client, id: i64) -> i64 {
    c.simple_query(&format!(
        "SELECT get_shard_id_for_distribution_column('t', {id})"
    ))
    .await
    .unwrap()
    .iter()
    .find_map(|m| match m {
        shardgate_tests::tokio_postgres::SimpleQueryMessage::Row(r) => {
            r.get(0).map(|v| v.parse().unwrap())
        }
        _ => None,
    })
    .expect("a shard id")
}
