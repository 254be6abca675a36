//! The distributed deadlock detector against real Postgres (a coordinator and 2
//! workers, detector every 500 ms):
//!
//! - Two sessions updating two rows on two different workers in opposite order: no
//!   single Postgres sees the cycle; the router's detector breaks it. Exactly one
//!   session gets SQLSTATE 40P01 "deadlock detected" (with a detail naming the
//!   transactions) within 5 s of the deadlock forming, it rolls back, the other one
//!   commits, the rows hold the survivor's values, nothing stays prepared, and
//!   `shardgate_deadlocks_detected_total` / `shardgate_deadlock_cancellations_total`
//!   count it. Both pool modes, simple and extended protocol.
//! - High contention without a cycle (8 sessions updating the same two rows on two
//!   workers in the same order for ~10 s): many lock waits, the detector runs, but no
//!   session is cancelled, no 40P01, the detector's metrics stay 0, every transaction
//!   commits and both rows equal the number of commits.

use shardgate_tests::tokio_postgres::{Client, Error};
use shardgate_tests::{EnvOptions, TestEnv, metric_sum, two_node_table};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

fn code(e: &Error) -> String {
    e.as_db_error()
        .map(|d| d.code().code().to_owned())
        .unwrap_or_else(|| format!("not a db error: {e}"))
}

async fn fleet(pool_mode: &'static str, pool_size: usize) -> TestEnv {
    TestEnv::with(EnvOptions {
        workers: 2,
        pool_mode,
        pool_size,
        extra: "[transactions]\ndeadlock_interval_ms = 500\n".into(),
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

/// Backends of the test's database waiting for a lock, on both workers.
async fn lock_waiters(w: &[Client]) -> i64 {
    let mut n = 0;
    for c in w {
        n += c
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0);
    }
    n
}

/// One UPDATE of `t`, in the simple or the extended protocol.
async fn update(c: &Client, extended: bool, id: i64, val: i32) -> Result<(), Error> {
    if extended {
        c.execute("UPDATE t SET v = $1 WHERE id = $2", &[&val, &id])
            .await
            .map(|n| assert_eq!(n, 1, "one row updated"))
    } else {
        c.batch_execute(&format!("UPDATE t SET v = {val} WHERE id = {id}"))
            .await
    }
}

/// Session A (value 1) updates `a` then `b`; session B (value 2) updates `b` then `a`.
async fn opposite_order(env: &TestEnv, mode: &str, extended: bool, a: i64, b: i64) {
    let ctx = format!("{mode}/{}", if extended { "extended" } else { "simple" });
    let before = env.metrics().await;
    let workers = [env.worker(0).await, env.worker(1).await];
    let sa = Arc::new(env.client().await);
    let sb = Arc::new(env.client().await);
    sa.batch_execute("BEGIN").await.unwrap();
    sb.batch_execute("BEGIN").await.unwrap();
    update(&sa, extended, a, 1).await.unwrap();
    update(&sb, extended, b, 2).await.unwrap();
    assert_eq!(lock_waiters(&workers).await, 0, "{ctx}: nobody waits yet");

    // A's second update waits for B on b's worker.
    let ta = {
        let sa = sa.clone();
        tokio::spawn(async move {
            let r = update(&sa, extended, b, 1).await;
            (r, Instant::now())
        })
    };
    let t = Instant::now();
    while lock_waiters(&workers).await < 1 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{ctx}: A's update of b never waited"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!ta.is_finished(), "{ctx}: A's update of b waits");

    // B's second update waits for A on a's worker: the cycle is complete from here.
    let formed = Instant::now();
    let tb = {
        let sb = sb.clone();
        tokio::spawn(async move {
            let r = update(&sb, extended, a, 2).await;
            (r, Instant::now())
        })
    };
    // The first statement to finish must be the victim's, failing: the survivor's
    // waits on until the victim's transaction ends on the other worker too.
    let (mut ta, mut tb) = (ta, tb);
    let first = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::select! {
            r = &mut ta => ('A', r.unwrap()),
            r = &mut tb => ('B', r.unwrap()),
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!("{ctx}: both sessions still blocked after 30 s: the deadlock was not broken")
    });
    let (mut who, (mut result, mut err_at)) = first;
    let mut rest = if who == 'A' { tb } else { ta };
    let mut survivor_done = None;
    if result.is_ok() {
        // The survivor's answer raced ahead of the victim's error (the victim's locks
        // go when its error is raised): the other session must be the victim.
        let (r, t) = tokio::time::timeout(Duration::from_secs(10), &mut rest)
            .await
            .unwrap_or_else(|_| panic!("{ctx}: {who} finished, the other is still blocked"))
            .unwrap();
        survivor_done = Some(result);
        who = if who == 'A' { 'B' } else { 'A' };
        (result, err_at) = (r, t);
    }
    let err = match result {
        Err(e) => e,
        Ok(()) => panic!("{ctx}: both statements finished without an error"),
    };
    let (victim, survivor, survivor_val) = if who == 'A' {
        (&sa, &sb, 2)
    } else {
        (&sb, &sa, 1)
    };
    let took = err_at.saturating_duration_since(formed);
    assert_eq!(code(&err), "40P01", "{ctx}: {err:?}");
    let db = err.as_db_error().unwrap();
    assert!(
        db.message().contains("deadlock"),
        "{ctx}: message says deadlock: {db:?}"
    );
    let detail = db.detail().unwrap_or_default();
    assert!(
        detail.to_lowercase().contains("deadlock") && detail.contains("transaction"),
        "{ctx}: detail explains the cycle: {detail:?}"
    );
    assert!(
        took < Duration::from_secs(5),
        "{ctx}: deadlock broken after {took:?} (want < 5 s)"
    );
    // As on one Postgres, the victim's locks go when its error is raised, on every
    // node: the survivor goes on before the victim's client sends ROLLBACK.
    let r =
        match survivor_done {
            Some(r) => r,
            None => tokio::time::timeout(Duration::from_secs(10), &mut rest)
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "{ctx}: the survivor still blocked while the victim has not rolled back yet"
                    )
                })
                .unwrap()
                .0,
        };
    r.unwrap_or_else(|e| panic!("{ctx}: the survivor's statement failed too: {e:?}"));
    let e = victim.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(
        code(&e),
        "25P02",
        "{ctx}: the victim's transaction is aborted"
    );
    victim.batch_execute("ROLLBACK").await.unwrap();
    eprintln!("{ctx}: victim {who} got 40P01 {took:?} after the cycle formed; detail: {detail}");
    survivor.batch_execute("COMMIT").await.unwrap();

    let other = env.client().await;
    assert_eq!(
        v(&other, a).await,
        survivor_val,
        "{ctx}: a has the survivor's value"
    );
    assert_eq!(
        v(&other, b).await,
        survivor_val,
        "{ctx}: b has the survivor's value"
    );
    assert_eq!(
        env.prepared_anywhere().await,
        0,
        "{ctx}: nothing left prepared"
    );
    assert_eq!(
        lock_waiters(&workers).await,
        0,
        "{ctx}: nobody waits any more"
    );

    let after = env.metrics().await;
    let detected = metric_sum(&after, "shardgate_deadlocks_detected_total")
        - metric_sum(&before, "shardgate_deadlocks_detected_total");
    let cancels = metric_sum(&after, "shardgate_deadlock_cancellations_total")
        - metric_sum(&before, "shardgate_deadlock_cancellations_total");
    assert!(detected >= 1.0, "{ctx}: deadlocks detected: {detected}");
    assert_eq!(cancels, 1.0, "{ctx}: one cancellation for one deadlock");
    assert!(metric_sum(&after, "shardgate_deadlocks_detected_total") >= 1.0);

    // The victim's session goes on: a fresh two-node transaction commits, and a later
    // cancellation is not mistaken for a deadlock.
    victim.batch_execute("BEGIN").await.unwrap();
    update(victim, extended, a, 7).await.unwrap();
    update(victim, extended, b, 7).await.unwrap();
    victim.batch_execute("COMMIT").await.unwrap();
    assert_eq!(v(&other, a).await, 7, "{ctx}");
    assert_eq!(v(&other, b).await, 7, "{ctx}");
    victim.batch_execute("BEGIN").await.unwrap();
    update(victim, extended, a, 8).await.unwrap();
    let e = victim
        .batch_execute(&format!(
            "SELECT pg_cancel_backend(pg_backend_pid()), pg_sleep(1) FROM t WHERE id = {b}"
        ))
        .await
        .unwrap_err();
    assert_eq!(
        code(&e),
        "57014",
        "{ctx}: a plain cancellation stays a cancellation: {e:?}"
    );
    victim.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(v(&other, a).await, 7, "{ctx}");
}

async fn deadlock_is_broken(mode: &'static str) {
    let env = fleet(mode, 4).await;
    let c = env.client().await;
    let (a, b) = two_node_table(&c, false).await;
    for extended in [true, false] {
        c.execute("UPDATE t SET v = 0 WHERE id = $1", &[&a])
            .await
            .unwrap();
        c.execute("UPDATE t SET v = 0 WHERE id = $1", &[&b])
            .await
            .unwrap();
        opposite_order(&env, mode, extended, a, b).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opposite_order_deadlock_is_broken_transaction_pooling() {
    deadlock_is_broken("transaction").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opposite_order_deadlock_is_broken_session_pooling() {
    deadlock_is_broken("session").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contention_without_a_cycle_cancels_nothing() {
    const SESSIONS: usize = 8;
    const RUN: Duration = Duration::from_secs(10);
    let env = fleet("transaction", SESSIONS).await;
    let c = env.client().await;
    let (a, b) = two_node_table(&c, false).await;
    let before = env.metrics().await;

    let stop = Arc::new(AtomicBool::new(false));
    // Lock waits seen on the workers while the sessions run.
    let monitor = {
        let workers = [env.worker(0).await, env.worker(1).await];
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut polls, mut saw_waits, mut max) = (0u64, 0u64, 0i64);
            while !stop.load(Ordering::Relaxed) {
                let n = lock_waiters(&workers).await;
                polls += 1;
                if n > 0 {
                    saw_waits += 1;
                }
                max = max.max(n);
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            (polls, saw_waits, max)
        })
    };
    let commits = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..SESSIONS {
        let s = env.client().await;
        let commits = commits.clone();
        let extended = i % 2 == 0;
        tasks.push(tokio::spawn(async move {
            let mut errors: Vec<String> = Vec::new();
            let end = Instant::now() + RUN;
            while Instant::now() < end {
                let r: Result<(), Error> = async {
                    s.batch_execute("BEGIN").await?;
                    if extended {
                        s.execute("UPDATE t SET v = v + 1 WHERE id = $1", &[&a])
                            .await?;
                        s.execute("UPDATE t SET v = v + 1 WHERE id = $1", &[&b])
                            .await?;
                    } else {
                        s.batch_execute(&format!("UPDATE t SET v = v + 1 WHERE id = {a}"))
                            .await?;
                        s.batch_execute(&format!("UPDATE t SET v = v + 1 WHERE id = {b}"))
                            .await?;
                    }
                    s.batch_execute("COMMIT").await
                }
                .await;
                match r {
                    Ok(()) => {
                        commits.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        errors.push(format!("{}: {e:?}", code(&e)));
                        let _ = s.batch_execute("ROLLBACK").await;
                    }
                }
            }
            errors
        }));
    }
    let mut errors = Vec::new();
    for t in tasks {
        errors.extend(t.await.unwrap());
    }
    stop.store(true, Ordering::Relaxed);
    let (polls, saw_waits, max_waiters) = monitor.await.unwrap();
    let commits = commits.load(Ordering::Relaxed);
    let after = env.metrics().await;
    let detected = metric_sum(&after, "shardgate_deadlocks_detected_total")
        - metric_sum(&before, "shardgate_deadlocks_detected_total");
    let cancels = metric_sum(&after, "shardgate_deadlock_cancellations_total")
        - metric_sum(&before, "shardgate_deadlock_cancellations_total");
    let runs = metric_sum(&after, "shardgate_deadlock_detector_seconds_count")
        - metric_sum(&before, "shardgate_deadlock_detector_seconds_count");
    let two_pc = metric_sum(&after, "shardgate_2pc_commits_total")
        - metric_sum(&before, "shardgate_2pc_commits_total");
    eprintln!(
        "contention: {commits} commits in {RUN:?} by {SESSIONS} sessions; {} errors; \
         lock waits in {saw_waits}/{polls} polls (max {max_waiters} waiting); \
         detector runs {runs}, deadlocks detected {detected}, cancellations {cancels}; 2PC commits {two_pc}",
        errors.len()
    );

    assert!(errors.is_empty(), "no transaction fails: {errors:#?}");
    assert_eq!(detected, 0.0, "no deadlock detected without a cycle");
    assert_eq!(cancels, 0.0, "nobody cancelled without a cycle");
    assert!(commits > 0, "transactions committed");
    assert_eq!(
        two_pc, commits as f64,
        "every commit was a two-phase commit"
    );
    assert!(
        saw_waits > 0,
        "the sessions did wait for each other's locks"
    );
    assert!(
        runs > 0.0,
        "the detector ran while the transactions were live"
    );
    assert_eq!(v(&c, a).await as u64, commits, "a counts the commits");
    assert_eq!(v(&c, b).await as u64, commits, "b counts the commits");
    assert_eq!(env.prepared_anywhere().await, 0, "nothing left prepared");
}
