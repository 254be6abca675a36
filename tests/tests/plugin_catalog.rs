//! Plugins on the admin path, through SQL: a distribution plugin that loops, allocates,
//! traps or answers nonsense fails only its own statement; placement plugins hot-swap
//! under concurrent `create_distributed_table`; a new build of a distribution plugin in
//! use is accepted only when it hashes like the loaded one.

use shardgate::plugin::builtin;
use shardgate_tests::tokio_postgres::{Client, Error, SimpleQueryMessage};
use shardgate_tests::{EnvOptions, TestEnv};
use std::path::Path;
use std::sync::Arc;

fn code(e: &Error) -> String {
    e.as_db_error()
        .map(|d| d.code().code().to_owned())
        .unwrap_or_else(|| format!("not a db error: {e}"))
}

async fn with_plugin_dir(dir: &Path, timeout_ms: u64) -> TestEnv {
    TestEnv::with(EnvOptions {
        workers: 2,
        pool_size: 8,
        extra: format!(
            "[plugins]\ndir = \"{}\"\ncall_timeout_ms = {timeout_ms}\nmemory_bytes = 33554432\n",
            dir.display()
        ),
        ..Default::default()
    })
    .await
}

/// Rows of a simple query as text.
async fn rows(c: &Client, sql: &str) -> Result<Vec<Vec<Option<String>>>, Error> {
    Ok(c.simple_query(sql)
        .await?
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect())
            }
            _ => None,
        })
        .collect())
}

/// The same component with a custom section appended: another build (content hash),
/// the same behaviour.
fn rebuilt(bytes: &[u8], tag: u32) -> Vec<u8> {
    let name = b"shardgate-test-build";
    let payload = tag.to_le_bytes();
    let mut content = vec![name.len() as u8];
    content.extend_from_slice(name);
    content.extend_from_slice(&payload);
    let mut out = bytes.to_vec();
    out.push(0); // custom section
    out.push(content.len() as u8); // LEB128, < 128
    out.extend_from_slice(&content);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misbehaving_distribution_plugin_fails_only_its_statement() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        builtin::TEST_MISBEHAVE_PATH,
        dir.path().join("test_misbehave.wasm"),
    )
    .unwrap();
    let env = with_plugin_dir(dir.path(), 100).await;
    let c = env.client().await;
    let other = env.client().await;
    c.batch_execute("CREATE TABLE good (k text)").await.unwrap();
    c.batch_execute("INSERT INTO good SELECT 'k' || g FROM generate_series(1, 100) g")
        .await
        .unwrap();
    c.batch_execute(
        "SELECT create_distributed_table('good', 'k', shard_count => 4, distribution_plugin => 'test-misbehave')",
    )
    .await
    .unwrap();
    for (value, want) in [
        ("loop", "57014"),
        ("alloc", "53200"),
        ("trap", "39000"),
        ("nonsense", "39000"),
        ("reject", "22023"),
    ] {
        // Distributing a table with that value in it.
        let t = format!("bad_{value}");
        c.batch_execute(&format!(
            "CREATE TABLE {t} (k text); INSERT INTO {t} VALUES ('a'), ('{value}'), ('b')"
        ))
        .await
        .unwrap();
        let e = c
            .batch_execute(&format!(
                "SELECT create_distributed_table('{t}', 'k', shard_count => 4, distribution_plugin => 'test-misbehave')"
            ))
            .await
            .unwrap_err();
        assert_eq!(code(&e), want, "{value}: {e:?}");
        assert!(
            e.as_db_error()
                .unwrap()
                .message()
                .contains("test-misbehave"),
            "the error names the plugin: {e:?}"
        );
        // Nothing changed, the rows are where they were, other sessions go on.
        let n: i64 = env
            .direct()
            .await
            .query_one(&format!("SELECT count(*) FROM {t}"), &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 3);
        let r = rows(&other, "SELECT count(*) FROM shardgate.pg_dist_partition")
            .await
            .unwrap();
        assert_eq!(r[0][0].as_deref(), Some("1"));
        // Hashing one value through the admin function.
        let e = c
            .batch_execute(&format!(
                "SELECT get_shard_id_for_distribution_column('good', '{value}')"
            ))
            .await
            .unwrap_err();
        assert_eq!(code(&e), want, "{value}");
        // The same session carries on.
        assert_eq!(
            rows(&c, "SELECT 1").await.unwrap()[0][0].as_deref(),
            Some("1")
        );
    }
    // The plugin works for good values after all that.
    rows(
        &c,
        "SELECT get_shard_id_for_distribution_column('good', 'k1')",
    )
    .await
    .unwrap();
    let metrics = reqwest_like_get(env.router.metrics_addr().unwrap()).await;
    for m in [
        "shardgate_plugin_timeouts_total{plugin=\"test-misbehave\"}",
        "shardgate_plugin_traps_total{plugin=\"test-misbehave\"}",
        "shardgate_plugin_out_of_memory_total{plugin=\"test-misbehave\"}",
        "shardgate_plugin_invalid_answers_total{plugin=\"test-misbehave\"}",
    ] {
        let line = metrics
            .lines()
            .find(|l| l.starts_with(m))
            .unwrap_or_else(|| panic!("{m} missing:\n{metrics}"));
        let v: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(v >= 1.0, "{line}");
    }
}

/// GET /metrics with a plain socket.
async fn reqwest_like_get(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_swaps_while_tables_are_being_distributed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("placement_default.wasm");
    std::fs::write(&file, rebuilt(builtin::PLACEMENT_DEFAULT, 0)).unwrap();
    let env = Arc::new(with_plugin_dir(dir.path(), 1000).await);
    let admin = env.client().await;
    let mut tasks = Vec::new();
    for w in 0..4 {
        let env = env.clone();
        tasks.push(tokio::spawn(async move {
            let c = env.client().await;
            for i in 0..4 {
                let t = format!("swap_{w}_{i}");
                c.batch_execute(&format!("CREATE TABLE {t} (id int8, v text)")).await?;
                c.batch_execute(&format!("INSERT INTO {t} SELECT g, 'x' FROM generate_series(1, 50) g"))
                    .await?;
                c.batch_execute(&format!(
                    "SELECT create_distributed_table('{t}', 'id', shard_count => 4, colocate_with => 'none')"
                ))
                .await?;
            }
            Ok::<_, Error>(())
        }));
    }
    let mut swaps = 0;
    let mut build = None;
    while !tasks.iter().all(|t| t.is_finished()) {
        swaps += 1;
        std::fs::write(&file, rebuilt(builtin::PLACEMENT_DEFAULT, swaps)).unwrap();
        let report = rows(&admin, "SELECT * FROM shardgate_reload_plugins()")
            .await
            .unwrap();
        let line = report
            .iter()
            .find(|r| r[0].as_deref() == Some("placement-default"))
            .expect("placement-default in the report");
        // Replaced by this reload, or already by the router's file watcher: either
        // way the build is the new one.
        assert!(
            matches!(line[2].as_deref(), Some("replaced" | "unchanged")),
            "{report:?}"
        );
        assert_ne!(line[3], build, "the new build is loaded: {report:?}");
        build = line[3].clone();
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    }
    for t in tasks {
        t.await
            .unwrap()
            .expect("every create_distributed_table succeeds during swaps");
    }
    assert!(swaps >= 2, "swapped during the load ({swaps})");
    // Every table is complete: 4 shards with one placement each, rows all moved.
    let r = rows(
        &admin,
        "SELECT count(DISTINCT s.logicalrelid), count(*) FROM shardgate.pg_dist_shard s
         JOIN shardgate.pg_dist_placement p USING (shardid)",
    )
    .await
    .unwrap();
    assert_eq!(r[0][0].as_deref(), Some("16"));
    assert_eq!(r[0][1].as_deref(), Some("64"));
    let d = env.direct().await;
    let mut left = 0i64;
    for w in 0..4 {
        for i in 0..4 {
            left += d
                .query_one(&format!("SELECT count(*) FROM swap_{w}_{i}"), &[])
                .await
                .unwrap()
                .get::<_, i64>(0);
        }
    }
    assert_eq!(left, 0, "coordinator shells are empty");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_distribution_plugin_in_use_is_swapped_only_for_an_identical_function() {
    let dir = tempfile::tempdir().unwrap();
    let env = with_plugin_dir(dir.path(), 1000).await;
    let c = env.client().await;
    c.batch_execute("CREATE TABLE t (id int8)").await.unwrap();
    c.batch_execute("SELECT create_distributed_table('t', 'id', shard_count => 16)")
        .await
        .unwrap();
    let shard_of = |v: i64| {
        let c = &c;
        async move {
            rows(
                c,
                &format!("SELECT get_shard_id_for_distribution_column('t', {v})"),
            )
            .await
            .unwrap()[0][0]
                .clone()
                .unwrap()
        }
    };
    let before: Vec<String> = futures_join((1..50).map(shard_of)).await;

    // A build that calls itself hash-citus but hashes differently: refused, kept old.
    std::fs::copy(
        builtin::TEST_HASH_VARIANT_PATH,
        dir.path().join("hash_citus.wasm"),
    )
    .unwrap();
    let report = rows(&c, "SELECT * FROM shardgate_reload_plugins()")
        .await
        .unwrap();
    let line = report
        .iter()
        .find(|r| r[0].as_deref() == Some("hash-citus"))
        .unwrap_or_else(|| panic!("{report:?}"));
    assert_eq!(line[2].as_deref(), Some("refused"), "{report:?}");
    assert!(
        line[3].as_deref().unwrap_or("").contains("rebalance"),
        "the reason says why: {line:?}"
    );
    assert_eq!(futures_join((1..50).map(shard_of)).await, before);

    // Another build of the same function: accepted.
    std::fs::write(
        dir.path().join("hash_citus.wasm"),
        rebuilt(builtin::HASH_CITUS, 7),
    )
    .unwrap();
    let report = rows(&c, "SELECT * FROM shardgate_reload_plugins()")
        .await
        .unwrap();
    let line = report
        .iter()
        .find(|r| r[0].as_deref() == Some("hash-citus"))
        .unwrap_or_else(|| panic!("{report:?}"));
    // Replaced by this call or already by the router's file watcher: either way the
    // loaded build is the file's (the refused one left the builtin in place).
    assert!(
        matches!(line[2].as_deref(), Some("replaced" | "unchanged")),
        "{report:?}"
    );
    assert!(
        line[3]
            .as_deref()
            .unwrap_or("")
            .ends_with("from hash_citus.wasm"),
        "the file's build is loaded: {report:?}"
    );
    assert_eq!(futures_join((1..50).map(shard_of)).await, before);
}

async fn futures_join<F: std::future::Future<Output = String>>(
    it: impl Iterator<Item = F>,
) -> Vec<String> {
    let mut out = Vec::new();
    for f in it {
        out.push(f.await);
    }
    out
}
