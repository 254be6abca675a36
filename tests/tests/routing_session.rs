//! Sessions over several nodes: transactions touching the coordinator and two workers in
//! both pool modes, failed transactions, key conversions (binary and text parameters,
//! NULL), and the plan cache's metrics. Real Postgres: a coordinator and 2 workers.

use shardgate_tests::tokio_postgres::{Client, Error};
use shardgate_tests::{EnvOptions, TestEnv, metric_sum, two_node_table};
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

async fn v(c: &Client, id: i64) -> i32 {
    c.query_one("SELECT v FROM t WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0)
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
        let copies = |sql: &'static str| {
            let env = &env;
            async move {
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
        };
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
            copies("SELECT count(*) FROM {t}").await,
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
            copies("SELECT count(*) FROM {t}").await,
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
            copies("SELECT count(*) FROM {t} WHERE name = 'x'").await,
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
            copies("SELECT count(*) FROM {t} WHERE name = 'y'").await,
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
            copies("SELECT count(*) FROM {t}").await,
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
