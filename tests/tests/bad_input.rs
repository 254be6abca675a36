//! Bad input through the router with a raw-message client: malformed and oversized
//! messages, bad startup packets, abrupt disconnects (mid-transaction, mid-extended,
//! mid-COPY, mid-query), partial writes, extended-protocol errors, stray COPY messages.
//! After each misbehaviour the backend state is checked (`pg_stat_activity`) and the
//! router must still serve other clients.

use shardgate_tests::{EnvOptions, TestEnv, tokio_postgres};
use std::time::{Duration, Instant};

use shardgate_tests::raw::{self, Raw, Read, cat, errors, rows, tags};

const IDLE_IN_TXN: &str = "SELECT count(*) FROM pg_stat_activity \
     WHERE datname = current_database() AND state LIKE 'idle in transaction%'";

/// A session ends with an error: the router sends an ErrorResponse with `code` and
/// closes the connection (no hang, nothing else after the error but possibly a
/// ReadyForQuery when the session goes on).
async fn expect_fatal(r: &mut Raw, code: &str, what: &str) {
    let msgs = r.until_closed().await;
    let errs = errors(&msgs);
    assert!(
        !errs.is_empty(),
        "{what}: no ErrorResponse before the close; got {msgs:?}"
    );
    assert_eq!(errs[0].sqlstate(), code, "{what}: got {msgs:?}");
}

/// The router still answers a fresh tokio-postgres client.
async fn still_serves(env: &TestEnv) {
    let c = tokio::time::timeout(Duration::from_secs(20), env.client())
        .await
        .expect("a new client connects in time");
    let v: i32 = tokio::time::timeout(Duration::from_secs(20), c.query_one("SELECT 41 + 1", &[]))
        .await
        .expect("a new client is served in time")
        .unwrap()
        .get(0);
    assert_eq!(v, 42);
}

async fn count(env: &TestEnv, sql: &str) -> i64 {
    env.direct()
        .await
        .query_one(sql, &[])
        .await
        .unwrap()
        .get::<_, i64>(0)
}

fn small_limit() -> EnvOptions {
    EnvOptions {
        server: "max_message_bytes = 4096".into(),
        pool_size: 1,
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------
// 1. Malformed and oversized messages after login.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_are_refused_with_protocol_violation() {
    let env = TestEnv::with(small_limit()).await;
    let port = env.port();
    let db = env.db.clone();

    // Length field below 4 (it counts itself).
    let mut r = Raw::login(port, &db).await;
    r.send(&[b'Q', 0, 0, 0, 3]).await;
    expect_fatal(&mut r, "08P01", "length 3").await;

    // Negative length.
    let mut r = Raw::login(port, &db).await;
    r.send(&[b'Q', 0xff, 0xff, 0xff, 0xf0]).await;
    expect_fatal(&mut r, "08P01", "negative length").await;

    // Larger than max_message_bytes (4096): refused from the header alone.
    let mut r = Raw::login(port, &db).await;
    let mut big = vec![b'Q'];
    big.extend_from_slice(&100_000i32.to_be_bytes());
    big.extend_from_slice(b"SELECT ");
    r.send(&big).await;
    expect_fatal(&mut r, "08P01", "oversized message").await;

    // Larger than the limit, and actually sent in full.
    let mut r = Raw::login(port, &db).await;
    let sql = format!("SELECT '{}'", "x".repeat(8000));
    r.send_lossy(&raw::query(&sql)).await;
    // The router closes with our bytes unread, so TCP may reset before its error
    // arrives; if an error arrives, it is 08P01.
    let msgs = r.until_closed().await;
    for e in errors(&msgs) {
        assert_eq!(
            e.sqlstate(),
            "08P01",
            "oversized message sent in full: {msgs:?}"
        );
    }

    // Just under the limit still works.
    let mut r = Raw::login(port, &db).await;
    let sql = format!("SELECT length('{}')", "x".repeat(3000));
    let msgs = r.simple(&sql).await;
    assert_eq!(
        rows(&msgs),
        vec![vec![Some("3000".to_string())]],
        "{msgs:?}"
    );

    // An unknown message type.
    let mut r = Raw::login(port, &db).await;
    r.send(&raw::msg(b'y', b"hello")).await;
    expect_fatal(&mut r, "08P01", "unknown message type").await;

    // A frontend message type that only the backend sends.
    let mut r = Raw::login(port, &db).await;
    r.send(&raw::msg(b'Z', b"I")).await;
    expect_fatal(&mut r, "08P01", "ReadyForQuery from the client").await;

    // Parse whose parameter-type count does not match the bytes that follow.
    let mut r = Raw::login(port, &db).await;
    let mut body = b"\0SELECT $1\0".to_vec();
    body.extend_from_slice(&5i16.to_be_bytes()); // 5 types announced, one sent
    body.extend_from_slice(&23u32.to_be_bytes());
    r.send(&cat(&[raw::msg(b'P', &body), raw::sync()])).await;
    expect_fatal(&mut r, "08P01", "Parse with a bad type count").await;

    // Parse with a negative parameter-type count.
    let mut r = Raw::login(port, &db).await;
    let mut body = b"\0SELECT 1\0".to_vec();
    body.extend_from_slice(&(-1i16).to_be_bytes());
    r.send(&cat(&[raw::msg(b'P', &body), raw::sync()])).await;
    expect_fatal(&mut r, "08P01", "Parse with a negative type count").await;

    // Parse without string terminators.
    let mut r = Raw::login(port, &db).await;
    r.send(&cat(&[raw::msg(b'P', b"stmt"), raw::sync()])).await;
    expect_fatal(&mut r, "08P01", "Parse without terminators").await;

    // Describe of something that is neither a statement nor a portal.
    let mut r = Raw::login(port, &db).await;
    r.send(&cat(&[raw::describe(b'X', ""), raw::sync()])).await;
    expect_fatal(&mut r, "08P01", "Describe 'X'").await;

    // Nothing was left behind on the backend, and the (single) pooled connection
    // still serves.
    assert_eq!(env.eventually(IDLE_IN_TXN, 0).await, 0);
    still_serves(&env).await;
}

/// Malformed messages the router passes through to Postgres: the backend complains
/// (and may drop its connection); the client gets 08P01 and the pool recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_the_backend_rejects_do_not_break_the_pool() {
    let env = TestEnv::with(EnvOptions {
        pool_size: 1,
        ..Default::default()
    })
    .await;
    let port = env.port();
    let db = env.db.clone();

    // Query without its NUL terminator.
    let mut r = Raw::login(port, &db).await;
    r.send(&raw::msg(b'Q', b"SELECT 1")).await;
    let first = match r.read().await {
        Read::Msg(m) => m,
        Read::Closed => panic!("closed without an error"),
    };
    assert_eq!(first.tag, b'E', "{first:?}");
    assert_eq!(first.sqlstate(), "08P01", "{first:?}");
    drop(r);
    still_serves(&env).await;

    // Bind announcing two parameter values but carrying one.
    let mut r = Raw::login(port, &db).await;
    let mut body = b"\0\0".to_vec();
    body.extend_from_slice(&0i16.to_be_bytes());
    body.extend_from_slice(&2i16.to_be_bytes());
    body.extend_from_slice(&1i32.to_be_bytes());
    body.push(b'1');
    r.send(&cat(&[
        raw::parse("", "SELECT $1::int + $2::int", &[]),
        raw::msg(b'B', &body),
        raw::execute("", 0),
        raw::sync(),
    ]))
    .await;
    let first = loop {
        match r.read().await {
            Read::Msg(m) if m.tag == b'1' => continue, // ParseComplete
            Read::Msg(m) => break m,
            Read::Closed => panic!("closed without an error"),
        }
    };
    assert_eq!(first.tag, b'E', "{first:?}");
    assert_eq!(first.sqlstate(), "08P01", "{first:?}");
    drop(r);
    still_serves(&env).await;
    assert_eq!(env.eventually(IDLE_IN_TXN, 0).await, 0);
}

// ---------------------------------------------------------------------------------
// 2. Bad startup packets and logins.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_startup_packets() {
    let env = TestEnv::new().await;
    let port = env.port();
    let db = env.db.clone();

    // Startup packet above 10000 bytes.
    let mut r = Raw::connect(port).await;
    let long = "x".repeat(11_000);
    r.send_lossy(&raw::startup(&[
        ("user", "postgres"),
        ("application_name", &long),
    ]))
    .await;
    expect_fatal(&mut r, "08P01", "startup packet > 10000 bytes").await;

    // Only the length of a huge startup packet.
    let mut r = Raw::connect(port).await;
    r.send(&[0x00, 0x10, 0x00, 0x00, 0x00, 0x03, 0x00, 0x00])
        .await;
    expect_fatal(&mut r, "08P01", "startup length 1 MiB").await;

    // Length below 8.
    let mut r = Raw::connect(port).await;
    r.send(&[0, 0, 0, 4, 0, 3, 0, 0]).await;
    expect_fatal(&mut r, "08P01", "startup length 4").await;

    // Protocol 2.0.
    let mut r = Raw::connect(port).await;
    r.send(&raw::startup_version(
        2 << 16,
        &[("user", "postgres"), ("database", &db)],
    ))
    .await;
    expect_fatal(&mut r, "0A000", "protocol 2.0").await;

    // Protocol 4.0.
    let mut r = Raw::connect(port).await;
    r.send(&raw::startup_version(
        4 << 16,
        &[("user", "postgres"), ("database", &db)],
    ))
    .await;
    expect_fatal(&mut r, "0A000", "protocol 4.0").await;

    // Unterminated parameter list.
    let mut r = Raw::connect(port).await;
    let mut p = Vec::new();
    p.extend_from_slice(&16i32.to_be_bytes());
    p.extend_from_slice(&196608i32.to_be_bytes());
    p.extend_from_slice(b"user\0pos");
    r.send(&p).await;
    expect_fatal(&mut r, "08P01", "unterminated startup parameters").await;

    // No user.
    let mut r = Raw::connect(port).await;
    r.send(&raw::startup(&[("database", &db)])).await;
    expect_fatal(&mut r, "28000", "startup without user").await;

    // Empty user.
    let mut r = Raw::connect(port).await;
    r.send(&raw::startup(&[("user", ""), ("database", &db)]))
        .await;
    expect_fatal(&mut r, "28000", "startup with an empty user").await;

    // Unknown user (trust auth, but not a configured user).
    let mut r = Raw::connect(port).await;
    r.send(&raw::startup(&[("user", "nobody_here"), ("database", &db)]))
        .await;
    expect_fatal(&mut r, "28P01", "unknown user").await;

    // Unknown database: the backend's 3D000 is forwarded.
    let mut r = Raw::connect(port).await;
    r.send(&raw::startup(&[
        ("user", "postgres"),
        ("database", "no_such_db_sg"),
    ]))
    .await;
    let msgs = r.until_closed().await;
    let errs = errors(&msgs);
    assert_eq!(errs.len(), 1, "{msgs:?}");
    assert_eq!(errs[0].sqlstate(), "3D000", "{msgs:?}");
    assert!(
        errs[0]
            .field(b'M')
            .unwrap_or_default()
            .contains("no_such_db_sg"),
        "{msgs:?}"
    );

    // A client that connects and says nothing does not disturb the others, nor does
    // one that leaves halfway through its startup packet.
    let _silent = Raw::connect(port).await;
    let mut half = Raw::connect(port).await;
    let full = raw::startup(&[("user", "postgres"), ("database", &db)]);
    half.send(&full[..full.len() / 2]).await;
    half.reset();

    // The startup packet and a query, one byte per write.
    let mut r = Raw::connect(port).await;
    for b in full.iter() {
        r.send(&[*b]).await;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let msgs = r.until_ready().await;
    assert!(errors(&msgs).is_empty(), "{msgs:?}");
    let msgs = r.simple("SELECT 'ok'").await;
    assert_eq!(rows(&msgs), vec![vec![Some("ok".to_string())]]);

    still_serves(&env).await;
}

// ---------------------------------------------------------------------------------
// 3. Abrupt disconnects.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_in_the_middle_of_a_transaction() {
    let env = TestEnv::with(EnvOptions {
        pool_size: 1,
        ..Default::default()
    })
    .await;
    env.client()
        .await
        .batch_execute("CREATE TABLE t (id int)")
        .await
        .unwrap();

    for how in ["close", "reset", "terminate", "extended"] {
        let mut r = Raw::login(env.port(), &env.db).await;
        let msgs = r.simple("BEGIN").await;
        assert_eq!(msgs.last().unwrap().body[..], *b"T");
        let msgs = r.simple("INSERT INTO t VALUES (1)").await;
        assert!(errors(&msgs).is_empty(), "{msgs:?}");
        assert_eq!(msgs.last().unwrap().body[..], *b"T");
        match how {
            "close" => drop(r),
            "reset" => r.reset(),
            "terminate" => {
                r.send(&raw::terminate()).await;
                assert!(r.until_closed().await.is_empty());
            }
            _ => {
                // A complete extended INSERT in the transaction, then Parse+Bind only.
                r.send(&cat(&[
                    raw::parse("", "INSERT INTO t VALUES (2)", &[]),
                    raw::bind("", "", &[]),
                    raw::execute("", 0),
                    raw::sync(),
                    raw::parse("", "INSERT INTO t VALUES (3)", &[]),
                    raw::bind("", "", &[]),
                ]))
                .await;
                let msgs = r.until_ready().await;
                assert_eq!(tags(&msgs), "12CZ", "{msgs:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                r.reset();
            }
        }
        assert_eq!(
            env.eventually(IDLE_IN_TXN, 0).await,
            0,
            "a backend is left idle in transaction ({how})"
        );
        // The next client (same single pooled connection) does not see the insert.
        let c = env.client().await;
        let n: i64 = c
            .query_one("SELECT count(*) FROM t", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "{how}");
        assert_eq!(count(&env, "SELECT count(*) FROM t").await, 0);
        // And it is not inside someone else's transaction.
        let fresh = c
            .simple_query("SELECT now() = statement_timestamp()")
            .await
            .unwrap();
        let fresh = match &fresh[1] {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            fresh.as_deref(),
            Some("t"),
            "the next client inherited a transaction"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_in_the_middle_of_an_extended_sequence() {
    let env = TestEnv::with(EnvOptions {
        pool_size: 1,
        ..Default::default()
    })
    .await;
    env.client()
        .await
        .batch_execute("CREATE TABLE t (id int)")
        .await
        .unwrap();

    // (b) Parse + Bind, no Sync, then gone.
    let mut r = Raw::login(env.port(), &env.db).await;
    r.send(&cat(&[
        raw::parse("ins", "INSERT INTO t VALUES ($1::int)", &[]),
        raw::bind("", "ins", &[Some("1")]),
    ]))
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    r.reset();
    still_serves(&env).await;

    // Parse + Bind + Execute + Flush inside BEGIN: the INSERT ran on the backend, the
    // client saw its CommandComplete, then left without Sync.
    let mut r = Raw::login(env.port(), &env.db).await;
    r.simple("BEGIN").await;
    r.send(&cat(&[
        raw::parse("ins", "INSERT INTO t VALUES ($1::int)", &[]),
        raw::bind("", "ins", &[Some("2")]),
        raw::execute("", 0),
        raw::flush(),
    ]))
    .await;
    let mut got = Vec::new();
    loop {
        let m = r.next().await;
        let done = m.tag == b'C' || m.tag == b'E';
        got.push(m);
        if done {
            break;
        }
    }
    assert_eq!(tags(&got), "12C", "{got:?}");
    r.reset();

    // Parse + Bind + Execute + Flush outside a transaction (implicit transaction open
    // on the backend until Sync), then gone.
    let mut r = Raw::login(env.port(), &env.db).await;
    r.send(&cat(&[
        raw::parse("", "INSERT INTO t VALUES (3)", &[]),
        raw::bind("", "", &[]),
        raw::execute("", 0),
        raw::flush(),
    ]))
    .await;
    let mut got = Vec::new();
    loop {
        let m = r.next().await;
        let done = m.tag == b'C' || m.tag == b'E';
        got.push(m);
        if done {
            break;
        }
    }
    assert_eq!(tags(&got), "12C", "{got:?}");
    drop(r);

    assert_eq!(env.eventually(IDLE_IN_TXN, 0).await, 0);
    assert_eq!(
        env.eventually("SELECT count(*) FROM t", 0).await,
        0,
        "rows of unsynced extended sequences became visible"
    );
    still_serves(&env).await;
    let c = env.client().await;
    let n: i64 = c
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_in_the_middle_of_copy_in() {
    let env = TestEnv::with(EnvOptions {
        pool_size: 1,
        ..Default::default()
    })
    .await;
    env.client()
        .await
        .batch_execute("CREATE TABLE t (id int, name text)")
        .await
        .unwrap();

    for (abrupt, in_txn, extended) in [
        (false, false, false),
        (true, false, false),
        (true, true, false),
        (true, false, true),
        (false, true, true),
    ] {
        let mut r = Raw::login(env.port(), &env.db).await;
        if in_txn {
            r.simple("BEGIN").await;
        }
        if extended {
            r.send(&cat(&[
                raw::parse("", "COPY t FROM STDIN", &[]),
                raw::bind("", "", &[]),
                raw::execute("", 0),
                raw::sync(),
            ]))
            .await;
            let m = r.next().await;
            assert_eq!(m.tag, b'1', "{m:?}");
            let m = r.next().await;
            assert_eq!(m.tag, b'2', "{m:?}");
        } else {
            r.send(&raw::query("COPY t FROM STDIN")).await;
        }
        let m = r.next().await;
        assert_eq!(m.tag, b'G', "expected CopyInResponse, got {m:?}");
        for i in 0..100 {
            r.send(&raw::copy_data(format!("{i}\tname {i}\n").as_bytes()))
                .await;
        }
        // Half a CopyData message, then gone.
        let partial = raw::copy_data(b"100\tlast\n");
        r.send(&partial[..7]).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        if abrupt {
            r.reset();
        } else {
            drop(r);
        }
        assert_eq!(
            env.eventually(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND query LIKE 'COPY t FROM STDIN%' AND state <> 'idle'",
                0
            )
            .await,
            0,
            "the COPY is still running on a backend (abrupt={abrupt}, in_txn={in_txn}, extended={extended})"
        );
        assert_eq!(env.eventually(IDLE_IN_TXN, 0).await, 0);
        assert_eq!(count(&env, "SELECT count(*) FROM t").await, 0);
        still_serves(&env).await;
    }

    // A COPY that completes still works after all that.
    let mut r = Raw::login(env.port(), &env.db).await;
    r.send(&raw::query("COPY t FROM STDIN")).await;
    assert_eq!(r.next().await.tag, b'G');
    r.send(&cat(&[raw::copy_data(b"1\ta\n2\tb\n"), raw::copy_done()]))
        .await;
    let msgs = r.until_ready().await;
    assert!(errors(&msgs).is_empty(), "{msgs:?}");
    assert_eq!(count(&env, "SELECT count(*) FROM t").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_while_a_long_query_runs() {
    let env = TestEnv::with(EnvOptions {
        pool_size: 1,
        ..Default::default()
    })
    .await;
    env.client()
        .await
        .batch_execute("CREATE TABLE t (id int)")
        .await
        .unwrap();

    let mut r = Raw::login(env.port(), &env.db).await;
    r.simple("BEGIN").await;
    r.simple("INSERT INTO t VALUES (1)").await;
    r.send(&raw::query("SELECT pg_sleep(5)")).await;
    // Wait until the sleep runs on the backend.
    let running = env
        .eventually(
            "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(5)' AND state = 'active'",
            1,
        )
        .await;
    assert_eq!(running, 1);
    let start = Instant::now();
    r.reset();

    // The next client on the single pooled connection is served (at the latest when
    // the sleep is over), without the abandoned transaction.
    let c = tokio::time::timeout(Duration::from_secs(20), env.client())
        .await
        .expect("next client connects in time");
    let n: i64 = tokio::time::timeout(
        Duration::from_secs(20),
        c.query_one("SELECT count(*) FROM t", &[]),
    )
    .await
    .expect("next client served in time")
    .unwrap()
    .get(0);
    assert_eq!(n, 0);
    let waited = start.elapsed();
    assert_eq!(env.eventually(IDLE_IN_TXN, 0).await, 0);
    assert_eq!(count(&env, "SELECT count(*) FROM t").await, 0);
    eprintln!("next client served {waited:?} after the sleeping client left");
}

// ---------------------------------------------------------------------------------
// 4. One bad session never hurts another.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_one_client_does_not_disturb_another() {
    let env = TestEnv::with(EnvOptions {
        pool_size: 2,
        server: "max_message_bytes = 4096".into(),
        ..Default::default()
    })
    .await;
    let good = env.client().await;
    let worker = tokio::spawn(async move {
        for i in 0..100i32 {
            let v: i32 = good
                .query_one("SELECT $1::int * 2", &[&i])
                .await
                .unwrap_or_else(|e| panic!("query {i} failed: {e}"))
                .get(0);
            assert_eq!(v, i * 2);
            let msgs = good.simple_query("SELECT 1; SELECT 2").await.unwrap();
            let n = msgs
                .iter()
                .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
                .count();
            assert_eq!(n, 2, "query {i}");
        }
    });

    let port = env.port();
    let db = env.db.clone();
    let garbage: Vec<Vec<u8>> = vec![
        vec![b'Q', 0, 0, 0, 1],
        raw::msg(b'?', b"junk"),
        vec![b'Q', 0x7f, 0xff, 0xff, 0xff],
        cat(&[raw::msg(b'P', b"\0\0\x00\x09"), raw::sync()]),
        cat(&[
            raw::query("BEGIN"),
            raw::query("INSERT INTO nowhere VALUES (1)"),
            vec![0xff; 64],
        ]),
        raw::msg(b'Q', b"SELECT 1"),
        {
            // Random bytes, but with a length field that is certainly invalid (a
            // plausible one would make the router wait for the rest, as Postgres does).
            let mut g = rand::random::<[u8; 32]>().to_vec();
            g[0] = 0x7f;
            g[1] = 0x7f;
            g
        },
    ];
    let mut round = 0;
    while !worker.is_finished() || round < garbage.len() {
        // Each piece of garbage ends with Terminate, so that a session the garbage did
        // not end (Postgres answers some of it with a plain ERROR) ends anyway.
        let g = &cat(&[garbage[round % garbage.len()].clone(), raw::terminate()]);
        let mut r = Raw::login(port, &db).await;
        r.send_lossy(g).await;
        let _ = r.until_closed().await; // must not hang
        // Garbage before login, too.
        let mut r = Raw::connect(port).await;
        r.send_lossy(g).await;
        let _ = r.until_closed().await;
        round += 1;
    }
    worker.await.expect("the good client never saw an error");
    still_serves(&env).await;
}

// ---------------------------------------------------------------------------------
// 5. Partial messages.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_sent_one_byte_at_a_time() {
    let env = TestEnv::new().await;
    let mut r = Raw::login(env.port(), &env.db).await;
    let q = cat(&[
        raw::query("SELECT 'split' || 'ting', 40 + 2"),
        raw::parse("", "SELECT $1::int + 1", &[]),
        raw::bind("", "", &[Some("41")]),
        raw::execute("", 0),
        raw::sync(),
    ]);
    for b in q.iter() {
        r.send(&[*b]).await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let msgs = r.until_ready().await;
    assert_eq!(
        rows(&msgs),
        vec![vec![Some("splitting".to_string()), Some("42".to_string())]],
        "{msgs:?}"
    );
    let msgs = r.until_ready().await;
    assert_eq!(tags(&msgs), "12DCZ", "{msgs:?}");
    assert_eq!(rows(&msgs), vec![vec![Some("42".to_string())]]);
    r.send(&raw::terminate()).await;
    assert!(r.until_closed().await.is_empty());
}

// ---------------------------------------------------------------------------------
// 6. Extended-protocol error handling.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_errors() {
    let env = TestEnv::new().await;
    let mut r = Raw::login(env.port(), &env.db).await;

    // Invalid SQL: exactly one error, then ReadyForQuery idle.
    r.send(&cat(&[
        raw::parse("", "SELEKT 1", &[]),
        raw::bind("", "", &[]),
        raw::execute("", 0),
        raw::sync(),
    ]))
    .await;
    let msgs = r.until_ready().await;
    assert_eq!(tags(&msgs), "EZ", "{msgs:?}");
    assert_eq!(msgs[0].sqlstate(), "42601");
    assert_eq!(msgs[1].body[..], *b"I");
    let msgs = r.simple("SELECT 5").await;
    assert_eq!(rows(&msgs), vec![vec![Some("5".to_string())]]);

    // The same with a named statement.
    r.send(&cat(&[
        raw::parse("bad", "SELEKT 1", &[]),
        raw::bind("", "bad", &[]),
        raw::execute("", 0),
        raw::sync(),
    ]))
    .await;
    let msgs = r.until_ready().await;
    assert_eq!(tags(&msgs), "EZ", "{msgs:?}");
    assert_eq!(msgs[0].sqlstate(), "42601");

    // Bind to an unknown statement: 26000.
    r.send(&cat(&[
        raw::bind("", "never_prepared", &[]),
        raw::execute("", 0),
        raw::sync(),
    ]))
    .await;
    let msgs = r.until_ready().await;
    assert_eq!(tags(&msgs), "EZ", "{msgs:?}");
    assert_eq!(msgs[0].sqlstate(), "26000");

    // Execute of an unknown portal: 34000.
    r.send(&cat(&[raw::execute("no_portal", 0), raw::sync()]))
        .await;
    let msgs = r.until_ready().await;
    assert_eq!(tags(&msgs), "EZ", "{msgs:?}");
    assert_eq!(msgs[0].sqlstate(), "34000");

    // Describe of an unknown statement: 26000.
    r.send(&cat(&[raw::describe(b'S', "never_prepared"), raw::sync()]))
        .await;
    let msgs = r.until_ready().await;
    assert_eq!(tags(&msgs), "EZ", "{msgs:?}");
    assert_eq!(msgs[0].sqlstate(), "26000");

    // The same named statement parsed twice: 42P05 on the second, the rest of the
    // batch skipped, the first one still usable.
    r.send(&cat(&[
        raw::parse("dup", "SELECT 1", &[]),
        raw::parse("dup", "SELECT 2", &[]),
        raw::bind("", "dup", &[]),
        raw::execute("", 0),
        raw::sync(),
    ]))
    .await;
    let msgs = r.until_ready().await;
    assert_eq!(tags(&msgs), "1EZ", "{msgs:?}");
    assert_eq!(msgs[1].sqlstate(), "42P05");
    assert_eq!(msgs[2].body[..], *b"I");
    r.send(&cat(&[raw::parse("dup", "SELECT 3", &[]), raw::sync()]))
        .await;
    let msgs = r.until_ready().await;
    assert_eq!(tags(&msgs), "EZ", "{msgs:?}");
    assert_eq!(msgs[0].sqlstate(), "42P05");
    r.send(&cat(&[
        raw::bind("", "dup", &[]),
        raw::execute("", 0),
        raw::sync(),
    ]))
    .await;
    let msgs = r.until_ready().await;
    assert_eq!(rows(&msgs), vec![vec![Some("1".to_string())]], "{msgs:?}");

    // An error inside an explicit transaction aborts it (25P02 afterwards) until
    // ROLLBACK, as with Postgres.
    r.simple("BEGIN").await;
    r.send(&cat(&[
        // Volatile, so the division happens at Execute (1/0 would fold at Bind).
        raw::parse("", "SELECT 1/(random() * 0)::int", &[]),
        raw::bind("", "", &[]),
        raw::execute("", 0),
        raw::sync(),
    ]))
    .await;
    let msgs = r.until_ready().await;
    assert_eq!(tags(&msgs), "12EZ", "{msgs:?}");
    assert_eq!(msgs[2].sqlstate(), "22012");
    assert_eq!(msgs[3].body[..], *b"E");
    let msgs = r.simple("SELECT 1").await;
    assert_eq!(errors(&msgs)[0].sqlstate(), "25P02", "{msgs:?}");
    let msgs = r.simple("ROLLBACK").await;
    assert_eq!(msgs.last().unwrap().body[..], *b"I");
    let msgs = r.simple("SELECT 6").await;
    assert_eq!(rows(&msgs), vec![vec![Some("6".to_string())]]);
    assert_eq!(env.eventually(IDLE_IN_TXN, 0).await, 0);
}

/// Runs Parse/Bind/Execute/Sync of a named statement and returns the messages.
async fn parse_bind_execute(r: &mut Raw, name: &str, sql: &str) -> Vec<raw::Msg> {
    r.send(&cat(&[
        raw::parse(name, sql, &[]),
        raw::bind("", name, &[]),
        raw::execute("", 0),
        raw::sync(),
    ]))
    .await;
    r.until_ready().await
}

/// A named Parse that Postgres rejected creates no statement: binding the name is
/// 26000 (not a re-run of the bad Parse).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_after_failed_parse_is_26000() {
    let env = TestEnv::new().await;
    // Postgres itself first (the expectation holds there), then the router.
    for (port, via) in [(env.pg_port, "postgres"), (env.port(), "router")] {
        eprintln!("{via}");
        let mut r = Raw::login(port, &env.db).await;
        r.send(&cat(&[raw::parse("s1", "SELEKT 1", &[]), raw::sync()]))
            .await;
        let msgs = r.until_ready().await;
        assert_eq!(tags(&msgs), "EZ", "{msgs:?}");
        assert_eq!(msgs[0].sqlstate(), "42601");
        r.send(&cat(&[
            raw::bind("", "s1", &[]),
            raw::execute("", 0),
            raw::sync(),
        ]))
        .await;
        let msgs = r.until_ready().await;
        assert_eq!(tags(&msgs), "EZ", "{msgs:?}");
        assert_eq!(
            msgs[0].sqlstate(),
            "26000",
            "Bind of a statement whose Parse failed: {msgs:?}"
        );
    }
}

/// ... and the name can be parsed again (Postgres allows it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn name_of_failed_parse_can_be_reused() {
    let env = TestEnv::new().await;
    // Postgres itself first (the expectation holds there), then the router.
    for (port, via) in [(env.pg_port, "postgres"), (env.port(), "router")] {
        eprintln!("{via}");
        let mut r = Raw::login(port, &env.db).await;
        r.send(&cat(&[raw::parse("s1", "SELEKT 1", &[]), raw::sync()]))
            .await;
        let msgs = r.until_ready().await;
        assert_eq!(msgs[0].sqlstate(), "42601", "{msgs:?}");
        let msgs = parse_bind_execute(&mut r, "s1", "SELECT 11").await;
        assert!(
            errors(&msgs).is_empty(),
            "re-Parse of a name whose Parse failed: {msgs:?}"
        );
        assert_eq!(rows(&msgs), vec![vec![Some("11".to_string())]]);
    }
}

/// A named Parse that Postgres skipped (an earlier message of the batch failed)
/// creates no statement either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn name_of_skipped_parse_can_be_reused() {
    let env = TestEnv::new().await;
    // Postgres itself first (the expectation holds there), then the router.
    for (port, via) in [(env.pg_port, "postgres"), (env.port(), "router")] {
        eprintln!("{via}");
        let mut r = Raw::login(port, &env.db).await;
        r.send(&cat(&[
            raw::parse("", "SELEKT 1", &[]),
            raw::parse("s2", "SELECT 22", &[]),
            raw::sync(),
        ]))
        .await;
        let msgs = r.until_ready().await;
        assert_eq!(tags(&msgs), "EZ", "{msgs:?}");
        let msgs = parse_bind_execute(&mut r, "s2", "SELECT 23").await;
        assert!(
            errors(&msgs).is_empty(),
            "re-Parse of a skipped name: {msgs:?}"
        );
        assert_eq!(rows(&msgs), vec![vec![Some("23".to_string())]]);
    }
}

/// A named Parse in an aborted transaction is refused (25P02) and creates nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn name_of_parse_in_aborted_transaction_can_be_reused() {
    let env = TestEnv::new().await;
    // Postgres itself first (the expectation holds there), then the router.
    for (port, via) in [(env.pg_port, "postgres"), (env.port(), "router")] {
        eprintln!("{via}");
        let mut r = Raw::login(port, &env.db).await;
        r.simple("BEGIN").await;
        r.simple("SELECT 1/0").await;
        r.send(&cat(&[raw::parse("s3", "SELECT 33", &[]), raw::sync()]))
            .await;
        let msgs = r.until_ready().await;
        assert_eq!(tags(&msgs), "EZ", "{msgs:?}");
        assert_eq!(msgs[0].sqlstate(), "25P02");
        r.simple("ROLLBACK").await;
        let msgs = parse_bind_execute(&mut r, "s3", "SELECT 34").await;
        assert!(
            errors(&msgs).is_empty(),
            "re-Parse after an aborted transaction: {msgs:?}"
        );
        assert_eq!(rows(&msgs), vec![vec![Some("34".to_string())]]);
    }
}

/// With one pooled connection, client A's statement lives on the backend every client
/// borrows; returns A, its statement, and the backend names found there.
async fn statement_on_shared_backend(
    env: &TestEnv,
) -> (
    tokio_postgres::Client,
    tokio_postgres::Statement,
    Raw,
    Vec<String>,
) {
    let a = env.client().await;
    let stmt = a.prepare("SELECT 'secret of a'::text").await.unwrap();
    let v: String = a.query_one(&stmt, &[]).await.unwrap().get(0);
    assert_eq!(v, "secret of a");
    let mut b = Raw::login(env.port(), &env.db).await;
    let msgs = b
        .simple("SELECT coalesce(string_agg(name, ','), '') FROM pg_prepared_statements")
        .await;
    let names: Vec<String> = rows(&msgs)[0][0]
        .clone()
        .unwrap_or_default()
        .split(',')
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect();
    assert!(!names.is_empty(), "A's statement is not on the backend");
    (a, stmt, b, names)
}

/// Statement names are per session: a client cannot execute another client's prepared
/// statement by the name the router gave it on the shared backend connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_of_other_sessions_cannot_be_executed() {
    let env = TestEnv::with(EnvOptions {
        pool_size: 1,
        ..Default::default()
    })
    .await;
    let (_a, _stmt, mut b, names) = statement_on_shared_backend(&env).await;
    let mut leaked = Vec::new();
    for name in &names {
        b.send(&cat(&[
            raw::bind("", name, &[]),
            raw::execute("", 0),
            raw::sync(),
        ]))
        .await;
        let msgs = b.until_ready().await;
        if errors(&msgs).first().map(|e| e.sqlstate()) != Some("26000".into()) {
            leaked.push(format!("{name}: {msgs:?} rows {:?}", rows(&msgs)));
        }
    }
    assert!(
        leaked.is_empty(),
        "session B could execute statements it never prepared: {leaked:?}"
    );
}

/// ... nor break it with DEALLOCATE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_of_other_sessions_cannot_be_deallocated() {
    let env = TestEnv::with(EnvOptions {
        pool_size: 1,
        ..Default::default()
    })
    .await;
    let (a, stmt, mut b, names) = statement_on_shared_backend(&env).await;
    for name in &names {
        let msgs = b.simple(&format!("DEALLOCATE {name}")).await;
        eprintln!("B: DEALLOCATE {name} -> {msgs:?}");
    }
    drop(b);
    let v: String = a
        .query_one(&stmt, &[])
        .await
        .expect("A's prepared statement after B sent DEALLOCATE with its backend name")
        .get(0);
    assert_eq!(v, "secret of a");
}

// ---------------------------------------------------------------------------------
// 7. COPY messages outside COPY.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_messages_outside_copy_are_ignored() {
    let env = TestEnv::new().await;
    env.client()
        .await
        .batch_execute("CREATE TABLE t (id int)")
        .await
        .unwrap();
    let mut r = Raw::login(env.port(), &env.db).await;

    // Before any query.
    r.send(&cat(&[
        raw::copy_data(b"1\n"),
        raw::copy_done(),
        raw::copy_fail("x"),
    ]))
    .await;
    let msgs = r.simple("SELECT 1").await;
    assert_eq!(tags(&msgs), "TDCZ", "{msgs:?}");

    // In the same write as a query, before and after it.
    r.send(&cat(&[
        raw::copy_data(b"2\n"),
        raw::query("SELECT 2"),
        raw::copy_data(b"3\n"),
        raw::copy_done(),
        raw::query("SELECT 3"),
    ]))
    .await;
    let msgs = r.until_ready().await;
    assert_eq!(rows(&msgs), vec![vec![Some("2".to_string())]], "{msgs:?}");
    let msgs = r.until_ready().await;
    assert_eq!(rows(&msgs), vec![vec![Some("3".to_string())]], "{msgs:?}");

    // Inside a transaction and inside an extended batch.
    r.simple("BEGIN").await;
    r.send(&cat(&[
        raw::parse("", "INSERT INTO t VALUES (7)", &[]),
        raw::copy_data(b"4\n"),
        raw::bind("", "", &[]),
        raw::copy_done(),
        raw::execute("", 0),
        raw::sync(),
    ]))
    .await;
    let msgs = r.until_ready().await;
    assert_eq!(tags(&msgs), "12CZ", "{msgs:?}");
    let msgs = r.simple("COMMIT").await;
    assert!(errors(&msgs).is_empty(), "{msgs:?}");

    // After a COPY that ended, stray COPY data is ignored too (nothing lands).
    r.send(&raw::query("COPY t FROM STDIN")).await;
    assert_eq!(r.next().await.tag, b'G');
    r.send(&cat(&[raw::copy_data(b"8\n"), raw::copy_done()]))
        .await;
    let msgs = r.until_ready().await;
    assert!(errors(&msgs).is_empty(), "{msgs:?}");
    r.send(&cat(&[raw::copy_data(b"9\n"), raw::copy_done()]))
        .await;
    let msgs = r
        .simple("SELECT string_agg(id::text, ',' ORDER BY id) FROM t")
        .await;
    assert_eq!(rows(&msgs), vec![vec![Some("7,8".to_string())]], "{msgs:?}");
    assert_eq!(count(&env, "SELECT count(*) FROM t").await, 2);
}

/// A routed batch's Describe of a portal with text results, once its node has described
/// the shard statement, is answered by the router with the node's RowDescription: the
/// same message every time. When the shard's table changes under the statement (DDL
/// straight on the worker), the Bind fails as Postgres fails it, and no description
/// goes out before the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_portal_descriptions_are_the_nodes_and_a_changed_table_fails_cleanly() {
    let env = TestEnv::with(EnvOptions {
        workers: 1,
        ..Default::default()
    })
    .await;
    let c = env.client().await;
    c.batch_execute("CREATE TABLE dsc (id int, v text)")
        .await
        .expect("create");
    c.batch_execute("SELECT create_distributed_table('dsc', 'id', shard_count => 1)")
        .await
        .expect("distribute");
    c.batch_execute("INSERT INTO dsc VALUES (1, 'one')")
        .await
        .expect("insert");
    let mut r = raw::Raw::login(env.port(), &env.db).await;
    r.send(&raw::cat(&[
        raw::parse("s", "SELECT v, id FROM dsc WHERE id = $1", &[]),
        raw::sync(),
    ]))
    .await;
    let parsed: Vec<u8> = r.until_ready().await.iter().map(|m| m.tag).collect();
    assert_eq!(parsed, b"1Z", "Parse");
    let round = || {
        raw::cat(&[
            raw::bind("", "s", &[Some("1")]),
            raw::describe(b'P', ""),
            raw::execute("", 0),
            raw::sync(),
        ])
    };
    let mut first: Option<bytes::Bytes> = None;
    for i in 0..4 {
        r.send(&round()).await;
        let msgs = r.until_ready().await;
        let tags: Vec<u8> = msgs.iter().map(|m| m.tag).collect();
        assert_eq!(tags, b"2TDCZ", "round {i}: {msgs:?}");
        assert_eq!(msgs[2].row(), vec![Some("one".into()), Some("1".into())]);
        let desc = msgs[1].body.clone();
        // Two columns, named as the statement names them.
        assert_eq!(&desc[..2], &[0, 2]);
        assert!(desc.starts_with(b"\0\x02v\0"), "{desc:?}");
        match &first {
            None => first = Some(desc),
            Some(f) => assert_eq!(*f, desc, "round {i}: the same description"),
        }
    }
    // The shard's column changes type straight on the worker: the statement's result
    // type changed, which Postgres refuses at Bind (0A000).
    let w = env.worker(0).await;
    let shard: String = w
        .query_one(
            "SELECT relname::text FROM pg_class WHERE relname LIKE 'dsc\\_%' AND relkind = 'r'",
            &[],
        )
        .await
        .expect("the shard")
        .get(0);
    w.batch_execute(&format!(
        "ALTER TABLE {shard} ALTER COLUMN v TYPE varchar(10)"
    ))
    .await
    .expect("alter the shard");
    r.send(&round()).await;
    let msgs = r.until_ready().await;
    let tags: Vec<u8> = msgs.iter().map(|m| m.tag).collect();
    assert_eq!(tags, b"EZ", "{msgs:?}");
    assert_eq!(msgs[0].sqlstate(), "0A000", "{msgs:?}");
    // The session goes on.
    let rows = r.simple("SELECT v FROM dsc WHERE id = 1").await;
    assert!(rows.iter().any(|m| m.tag == b'D'), "{rows:?}");
}
