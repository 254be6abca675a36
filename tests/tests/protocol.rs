//! Through the router with tokio-postgres: simple and extended protocol, pipelining,
//! COPY, cancel, prepared statements under transaction pooling, transactions, error
//! recovery, settings across pooled connections.

use bytes::Bytes;
use futures::{SinkExt, StreamExt, future::join_all};
use shardgate_tests::{EnvOptions, TestEnv, connect, tokio_postgres};
use std::time::{Duration, Instant};
use tokio_postgres::SimpleQueryMessage;

fn rows(msgs: Vec<SimpleQueryMessage>) -> Vec<Vec<Option<String>>> {
    msgs.into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect())
            }
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_and_extended_protocol() {
    let env = TestEnv::new().await;
    let c = env.client().await;
    c.batch_execute(
        "CREATE TABLE kv (k int PRIMARY KEY, v text); INSERT INTO kv VALUES (1, 'a'), (2, NULL)",
    )
    .await
    .unwrap();
    let r = rows(
        c.simple_query("SELECT k, v FROM kv ORDER BY k")
            .await
            .unwrap(),
    );
    assert_eq!(
        r,
        vec![
            vec![Some("1".into()), Some("a".into())],
            vec![Some("2".into()), None]
        ]
    );
    let row = c
        .query_one(
            "SELECT v, k * $1::int FROM kv WHERE k = $2",
            &[&10i32, &1i32],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, &str>(0), "a");
    assert_eq!(row.get::<_, i32>(1), 10);
    assert_eq!(
        rows(c.simple_query("SELECT 1; SELECT 2").await.unwrap()).len(),
        2
    );
    c.simple_query("").await.unwrap();
    // A large result streams through intact.
    let big: i64 = c
        .query(
            "SELECT g, repeat('x', 1000) FROM generate_series(1, 20000) g",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, i32>(0) as i64 + r.get::<_, &str>(1).len() as i64)
        .sum();
    assert_eq!(big, (1..=20000i64).sum::<i64>() + 20000 * 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_extended_queries() {
    let env = TestEnv::new().await;
    let c = env.client().await;
    let stmt = c.prepare("SELECT $1::int + 1").await.unwrap();
    // tokio-postgres pipelines concurrent queries on one connection.
    let got = join_all((0..300).map(|i| {
        let c = &c;
        let stmt = &stmt;
        async move { c.query_one(stmt, &[&i]).await.unwrap().get::<_, i32>(0) }
    }))
    .await;
    assert_eq!(got, (1..=300).collect::<Vec<i32>>());
    // An error in the middle of a pipeline fails only its own query.
    let results = join_all((0..20).map(|i| {
        let c = &c;
        async move {
            if i == 10 {
                c.query_one("SELECT 1/0", &[]).await.map(|_| 0)
            } else {
                c.query_one("SELECT $1::int", &[&i])
                    .await
                    .map(|r| r.get::<_, i32>(0))
            }
        }
    }))
    .await;
    for (i, r) in results.into_iter().enumerate() {
        if i == 10 {
            assert_eq!(r.unwrap_err().code().unwrap().code(), "22012");
        } else {
            assert_eq!(r.unwrap(), i as i32);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out() {
    let env = TestEnv::new().await;
    let c = env.client().await;
    c.batch_execute("CREATE TABLE items (id int, name text)")
        .await
        .unwrap();
    let mut data = String::new();
    for i in 0..5000 {
        data.push_str(&format!("{i}\tname {i}\n"));
    }
    let sink = c.copy_in("COPY items FROM STDIN").await.unwrap();
    futures::pin_mut!(sink);
    for chunk in data.as_bytes().chunks(8192) {
        sink.send(Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    assert_eq!(sink.finish().await.unwrap(), 5000);
    let total: i64 = c
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(total, 5000);

    let stream = c
        .copy_out("COPY (SELECT id, name FROM items ORDER BY id) TO STDOUT")
        .await
        .unwrap();
    futures::pin_mut!(stream);
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(String::from_utf8(out).unwrap(), data);

    // Bad data fails the COPY; nothing of it lands and the session goes on.
    let sink = c.copy_in("COPY items FROM STDIN").await.unwrap();
    futures::pin_mut!(sink);
    sink.send(Bytes::from_static(b"1\tok\nnot-a-number\tbad\n"))
        .await
        .unwrap();
    let err = sink.finish().await.unwrap_err();
    assert_eq!(err.code().unwrap().code(), "22P02");
    let total: i64 = c
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(total, 5000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_the_running_query() {
    let env = TestEnv::new().await;
    let c = env.client().await;
    let token = c.cancel_token();
    let start = Instant::now();
    let sleeper = tokio::spawn(async move {
        let r = c.simple_query("SELECT pg_sleep(30)").await;
        (r.map(|_| ()), c)
    });
    // Wait until the sleep runs on the backend, then cancel.
    let direct = env.direct().await;
    for _ in 0..200 {
        let n: i64 = direct
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if n == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let (r, c) = sleeper.await.unwrap();
    assert_eq!(r.unwrap_err().code().unwrap().code(), "57014");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
    // The session still works.
    assert_eq!(
        c.query_one("SELECT 7", &[]).await.unwrap().get::<_, i32>(0),
        7
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_with_more_clients_than_connections() {
    let env = TestEnv::with(EnvOptions {
        pool_size: 2,
        ..Default::default()
    })
    .await;
    let setup = env.client().await;
    setup
        .batch_execute("CREATE TABLE acct (id int PRIMARY KEY, bal int); INSERT INTO acct SELECT g, 0 FROM generate_series(1, 8) g")
        .await
        .unwrap();
    // 8 clients (4x the pool), each with its own prepared statements, interleaved.
    let mut tasks = Vec::new();
    for id in 1..=8i32 {
        let cs = env.conn_str("postgres");
        tasks.push(tokio::spawn(async move {
            let c = connect(&cs).await.unwrap();
            let upd = c
                .prepare("UPDATE acct SET bal = bal + $1 WHERE id = $2")
                .await
                .unwrap();
            let sel = c
                .prepare("SELECT bal FROM acct WHERE id = $1")
                .await
                .unwrap();
            for _ in 0..50 {
                c.execute(&upd, &[&1i32, &id]).await.unwrap();
                tokio::task::yield_now().await;
            }
            c.query_one(&sel, &[&id]).await.unwrap().get::<_, i32>(0)
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 50);
    }
    // At most the pool size of backend connections served them.
    let direct = env.direct().await;
    let n: i64 = direct
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() AND application_name <> 'shardgate'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(n <= 2, "{n} backend connections for a pool of 2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_commit_and_roll_back() {
    let env = TestEnv::with(EnvOptions {
        pool_size: 1,
        ..Default::default()
    })
    .await;
    let mut a = env.client().await;
    let b = env.client().await;
    a.batch_execute("CREATE TABLE t (x int)").await.unwrap();
    let tx = a.transaction().await.unwrap();
    tx.execute("INSERT INTO t VALUES (1)", &[]).await.unwrap();
    tx.rollback().await.unwrap();
    let tx = a.transaction().await.unwrap();
    tx.execute("INSERT INTO t VALUES (2)", &[]).await.unwrap();
    tx.commit().await.unwrap();
    // With a pool of one, b only gets the connection once a's transaction is over.
    let got: Vec<i32> = b
        .query("SELECT x FROM t", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(got, vec![2]);
    // An error inside a transaction aborts it, as on Postgres.
    a.batch_execute("BEGIN").await.unwrap();
    let e = a.batch_execute("SELECT 1/0").await.unwrap_err();
    assert_eq!(e.code().unwrap().code(), "22012");
    let e = a.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(e.code().unwrap().code(), "25P02");
    a.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(
        a.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_keep_sqlstate_and_session() {
    let env = TestEnv::new().await;
    let c = env.client().await;
    let e = c
        .query("SELECT * FROM no_such_table", &[])
        .await
        .unwrap_err();
    assert_eq!(e.code().unwrap().code(), "42P01");
    let e = c.simple_query("SELEC 1").await.unwrap_err();
    assert_eq!(e.code().unwrap().code(), "42601");
    let e = c.query_one("SELECT $1::int", &[&"x"]).await;
    assert!(e.is_err());
    assert_eq!(
        c.query_one("SELECT 2", &[]).await.unwrap().get::<_, i32>(0),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_survive_transaction_pooling() {
    let env = TestEnv::with(EnvOptions {
        pool_size: 1,
        ..Default::default()
    })
    .await;
    let a = env.client().await;
    let b = env.client().await;
    a.batch_execute("SET statement_timeout = '1234ms'")
        .await
        .unwrap();
    a.batch_execute("SET application_name = 'client_a'")
        .await
        .unwrap();
    // b shares the one backend connection but must not see a's settings.
    assert_eq!(show(&b, "statement_timeout").await, "0");
    assert_eq!(show(&a, "statement_timeout").await, "1234ms");
    assert_eq!(show(&b, "application_name").await, "");
    assert_eq!(show(&a, "application_name").await, "client_a");
    // SET inside a rolled-back transaction does not stick; inside a committed one it does.
    a.batch_execute("BEGIN; SET search_path = nowhere; ROLLBACK")
        .await
        .unwrap();
    assert_eq!(show(&b, "search_path").await, "\"$user\", public");
    assert_eq!(show(&a, "search_path").await, "\"$user\", public");
    a.batch_execute("BEGIN").await.unwrap();
    a.batch_execute("SET search_path = elsewhere")
        .await
        .unwrap();
    a.batch_execute("COMMIT").await.unwrap();
    assert_eq!(show(&b, "search_path").await, "\"$user\", public");
    assert_eq!(show(&a, "search_path").await, "elsewhere");
    a.batch_execute("RESET ALL").await.unwrap();
    assert_eq!(show(&a, "statement_timeout").await, "0");
    // Startup parameters (options=-c ...) count as settings too.
    let c = connect(&format!(
        "{} options='-c work_mem=3MB'",
        env.conn_str("postgres")
    ))
    .await
    .unwrap();
    assert_eq!(show(&c, "work_mem").await, "3MB");
    assert_eq!(show(&b, "work_mem").await, "4MB");
    // RESET ALL brings them back, as in Postgres (they are the session's defaults).
    c.batch_execute("SET work_mem = '9MB'").await.unwrap();
    c.batch_execute("RESET ALL").await.unwrap();
    assert_eq!(show(&c, "work_mem").await, "3MB");
}

/// Session state a client changes where the router cannot follow it (`set_config`, a
/// SET behind a comment, SETs in a string with transaction control, SET SESSION
/// AUTHORIZATION) and roles never reach another client of the same backend
/// connection; SETs of the extended protocol follow the session as simple ones do; a
/// ROLLBACK TO SAVEPOINT undoes the SETs since the savepoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_state_never_leaks_between_clients() {
    let env = TestEnv::with(EnvOptions {
        pool_size: 1,
        ..Default::default()
    })
    .await;
    let a = env.client().await;
    let b = env.client().await;
    let login = show(&b, "session_authorization").await;

    // Extended protocol (tokio-postgres's `execute`: Parse, Bind, Execute).
    a.execute("SET statement_timeout = '2345ms'", &[])
        .await
        .unwrap();
    assert_eq!(show(&b, "statement_timeout").await, "0");
    assert_eq!(show(&a, "statement_timeout").await, "2345ms");
    a.execute("SET work_mem = '5MB'", &[]).await.unwrap();
    a.execute("DISCARD ALL", &[]).await.unwrap();
    assert_eq!(show(&b, "work_mem").await, "4MB");
    assert_eq!(show(&a, "work_mem").await, "4MB", "DISCARD ALL is kept");
    assert_eq!(show(&a, "statement_timeout").await, "0");

    // What the router does not follow: the client keeps it on its connection, the
    // next client of that connection does not get it.
    for (sql, name, value) in [
        (
            "SELECT set_config('application_name', 'by_set_config', false)",
            "application_name",
            "by_set_config",
        ),
        ("SET work_mem = '7MB' -- c", "work_mem", "7MB"),
        (
            "BEGIN; SET search_path = leaked; COMMIT",
            "search_path",
            "leaked",
        ),
    ] {
        a.batch_execute(sql).await.unwrap();
        assert_eq!(show(&a, name).await, value, "{sql}");
        assert_ne!(show(&b, name).await, value, "{sql} reached another client");
    }
    // Extended protocol too; a SET behind a comment is tracked.
    a.query("SELECT set_config('search_path', 'leaked2', false)", &[])
        .await
        .unwrap();
    assert_ne!(show(&b, "search_path").await, "leaked2");
    a.execute("/* c */ SET work_mem = '6MB'", &[])
        .await
        .unwrap();
    assert_eq!(show(&a, "work_mem").await, "6MB");
    assert_eq!(show(&b, "work_mem").await, "4MB");
    assert_eq!(show(&a, "work_mem").await, "6MB", "replayed");
    a.batch_execute("RESET work_mem").await.unwrap();

    // Roles: RESET ALL keeps SET ROLE (as in Postgres); neither reaches b.
    a.batch_execute("DROP ROLE IF EXISTS sg_leak_role; CREATE ROLE sg_leak_role")
        .await
        .unwrap();
    a.batch_execute("SET ROLE sg_leak_role").await.unwrap();
    assert_eq!(current_user(&b).await, login);
    assert_eq!(current_user(&a).await, "sg_leak_role");
    a.batch_execute("RESET ALL").await.unwrap();
    assert_eq!(current_user(&b).await, login);
    assert_eq!(current_user(&a).await, "sg_leak_role");
    a.batch_execute("RESET ROLE").await.unwrap();
    a.batch_execute("SET SESSION AUTHORIZATION sg_leak_role")
        .await
        .unwrap();
    assert_eq!(show(&a, "session_authorization").await, "sg_leak_role");
    assert_eq!(show(&b, "session_authorization").await, login);
    assert_eq!(current_user(&b).await, login);

    // ROLLBACK TO SAVEPOINT undoes the SETs since.
    a.batch_execute("BEGIN").await.unwrap();
    a.batch_execute("SET search_path = kept").await.unwrap();
    a.batch_execute("SAVEPOINT p").await.unwrap();
    a.batch_execute("SET work_mem = '9MB'").await.unwrap();
    a.batch_execute("ROLLBACK TO SAVEPOINT p").await.unwrap();
    a.batch_execute("COMMIT").await.unwrap();
    assert_eq!(show(&b, "work_mem").await, "4MB");
    assert_eq!(show(&a, "search_path").await, "kept");
    assert_eq!(show(&a, "work_mem").await, "4MB");

    // COMMIT with another statement after it in the string: the SETs count.
    a.batch_execute("BEGIN").await.unwrap();
    a.batch_execute("SET work_mem = '11MB'").await.unwrap();
    a.batch_execute("COMMIT; SELECT 1").await.unwrap();
    assert_eq!(show(&b, "work_mem").await, "4MB");
    assert_eq!(show(&a, "work_mem").await, "11MB");
}

async fn current_user(c: &tokio_postgres::Client) -> String {
    rows(c.simple_query("SELECT current_user").await.unwrap())[0][0]
        .clone()
        .unwrap()
}

async fn show(c: &tokio_postgres::Client, what: &str) -> String {
    rows(c.simple_query(&format!("SHOW {what}")).await.unwrap())[0][0]
        .clone()
        .unwrap()
}

/// A client whose connection's async messages (notices, notifications) are collected.
async fn client_with_messages(
    conn_str: &str,
) -> (
    tokio_postgres::Client,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let (client, mut conn) = tokio_postgres::connect(conn_str, tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(m) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
            let text = match m {
                Ok(tokio_postgres::AsyncMessage::Notice(n)) => format!("notice:{}", n.message()),
                Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                    format!("notify:{}:{}", n.channel(), n.payload())
                }
                Ok(_) => continue,
                Err(_) => break,
            };
            let _ = tx.send(text);
        }
    });
    (client, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notices_and_notifications_are_forwarded() {
    let env = TestEnv::with(EnvOptions {
        pool_mode: "session",
        ..Default::default()
    })
    .await;
    let (a, mut a_msgs) = client_with_messages(&env.conn_str("postgres")).await;
    a.batch_execute("DO $$BEGIN RAISE NOTICE 'hello %', 42; END$$")
        .await
        .unwrap();
    assert_eq!(a_msgs.recv().await.unwrap(), "notice:hello 42");
    // LISTEN needs session pooling; the notification arrives while `a` is idle.
    a.batch_execute("LISTEN chan").await.unwrap();
    let b = env.client().await;
    b.batch_execute("NOTIFY chan, 'payload'").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), a_msgs.recv())
        .await
        .expect("notification within 5 s")
        .unwrap();
    assert_eq!(got, "notify:chan:payload");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_backend_connections_are_replaced() {
    let env = TestEnv::with(EnvOptions {
        pool_size: 1,
        ..Default::default()
    })
    .await;
    let a = env.client().await;
    a.batch_execute("CREATE TABLE t (x int)").await.unwrap();
    let direct = env.direct().await;
    let kill = "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                WHERE datname = current_database() AND pid <> pg_backend_pid() AND application_name <> 'shardgate'";
    // The pooled connection dies while idle in the pool: the next query gets a new one.
    let killed: i64 = direct.query_one(kill, &[]).await.unwrap().get(0);
    assert_eq!(killed, 1);
    env.eventually(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() AND application_name <> 'shardgate'",
        0,
    )
    .await;
    assert_eq!(
        a.query_one("SELECT 2", &[]).await.unwrap().get::<_, i32>(0),
        2
    );
    // It dies inside a transaction: the client gets an error, not a hang, and the
    // uncommitted row is gone; other clients are served.
    a.batch_execute("BEGIN; INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let killed: i64 = direct.query_one(kill, &[]).await.unwrap().get(0);
    assert_eq!(killed, 1);
    let r = tokio::time::timeout(Duration::from_secs(10), a.batch_execute("COMMIT")).await;
    assert!(r.expect("an answer, not a hang").is_err());
    let b = env.client().await;
    let n: i64 = b
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}
