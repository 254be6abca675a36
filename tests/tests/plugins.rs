//! The Wasm plugin host with the shipped distribution plugins: hashes and shard choice
//! through the plugins against a real Postgres, and plugins that misbehave (loop,
//! allocate without bound, trap, answer nonsense) failing only their own call.

use shardgate::plugin::{
    DistributionPlugin, Limits, PluginError, PluginHost, ShardScheme, Value, builtin,
};
use shardgate_tests::TestEnv;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn host() -> PluginHost {
    PluginHost::new(None, Limits::default()).expect("plugin host")
}

fn load(host: &PluginHost, name: &str, bytes: &[u8]) -> DistributionPlugin {
    host.load_distribution_bytes(name, bytes)
        .expect("plugin loads")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_citus_matches_postgres_through_the_plugin() {
    let host = host();
    let p = load(&host, "hash-citus", builtin::HASH_CITUS);
    assert_eq!(p.name(), "hash-citus");
    assert_eq!(p.scheme(), ShardScheme::HashRanges);
    assert_eq!(p.content_hash().len(), 64);
    let env = TestEnv::new().await;
    let c = env.direct().await;
    let ints: Vec<i64> = (0..2000)
        .map(|_| rand::random::<i64>())
        .chain([0, -1, i64::MIN, i64::MAX, i32::MIN as i64, i32::MAX as i64])
        .collect();
    let rows = c
        .query("SELECT v, hashint8(v) FROM unnest($1::int8[]) v", &[&ints])
        .await
        .unwrap();
    for r in &rows {
        let v: i64 = r.get(0);
        let pg: i32 = r.get(1);
        assert_eq!(p.hash(&Value::Int8(v)).unwrap(), pg as i64, "int8 {v}");
        // Shard choice: Citus's 32 equal ranges of the int32 space.
        let shard = p.shard_index(&Value::Int8(v), 32).unwrap();
        let (lo, hi) = pg_hash::citus_shard_range(shard, 32);
        assert!(
            lo <= pg && pg <= hi,
            "hash {pg} not in shard {shard} [{lo}, {hi}]"
        );
    }
    let texts: Vec<String> = (0..1000)
        .map(|i| format!("tenant-{i}-{}", "é".repeat(i % 7)))
        .collect();
    let rows = c
        .query("SELECT v, hashtext(v) FROM unnest($1::text[]) v", &[&texts])
        .await
        .unwrap();
    for r in &rows {
        let v: String = r.get(0);
        let pg: i32 = r.get(1);
        assert_eq!(
            p.hash(&Value::Text(v.clone())).unwrap(),
            pg as i64,
            "text {v:?}"
        );
    }
    let r = c
        .query_one(
            "SELECT hashint4(42), hashint2(7::int2), uuid_hash('a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(p.hash(&Value::Int4(42)).unwrap(), r.get::<_, i32>(0) as i64);
    assert_eq!(p.hash(&Value::Int2(7)).unwrap(), r.get::<_, i32>(1) as i64);
    let uuid = [
        0xa0, 0xee, 0xbc, 0x99, 0x9c, 0x0b, 0x4e, 0xf8, 0xbb, 0x6d, 0x6b, 0xb9, 0xbd, 0x38, 0x0a,
        0x11,
    ];
    assert_eq!(
        p.hash(&Value::Uuid(uuid.to_vec())).unwrap(),
        r.get::<_, i32>(2) as i64
    );
    // A malformed value is the plugin's error, not a trap.
    assert!(matches!(
        p.hash(&Value::Uuid(vec![1, 2, 3])),
        Err(PluginError::Rejected { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_pg_partition_matches_native_hash_partitions() {
    let host = host();
    let p = load(&host, "hash-pg-partition", builtin::HASH_PG_PARTITION);
    assert_eq!(p.scheme(), ShardScheme::Modulo);
    let env = TestEnv::new().await;
    let c = env.direct().await;
    c.batch_execute("CREATE TABLE parted (k int8, t text) PARTITION BY HASH (k)")
        .await
        .unwrap();
    c.batch_execute("CREATE TABLE parted_t (t text) PARTITION BY HASH (t)")
        .await
        .unwrap();
    for m in [4, 7] {
        let ints: Vec<i64> = (0..1000).map(|_| rand::random::<i64>() >> 3).collect();
        let rows = c
            .query(
                &format!(
                    "SELECT v, r FROM unnest($1::int8[]) v, generate_series(0, {}) r
                     WHERE satisfies_hash_partition('parted'::regclass, {m}, r, v)",
                    m - 1
                ),
                &[&ints],
            )
            .await
            .unwrap();
        assert_eq!(rows.len(), ints.len());
        for r in rows {
            let v: i64 = r.get(0);
            let rem: i32 = r.get(1);
            assert_eq!(
                p.shard_index(&Value::Int8(v), m).unwrap(),
                rem as u32,
                "int8 {v} mod {m}"
            );
        }
        let texts: Vec<String> = (0..500).map(|i| format!("k{i}")).collect();
        let rows = c
            .query(
                &format!(
                    "SELECT v, r FROM unnest($1::text[]) v, generate_series(0, {}) r
                     WHERE satisfies_hash_partition('parted_t'::regclass, {m}, r, v)",
                    m - 1
                ),
                &[&texts],
            )
            .await
            .unwrap();
        for r in rows {
            let v: String = r.get(0);
            let rem: i32 = r.get(1);
            assert_eq!(
                p.shard_index(&Value::Text(v.clone()), m).unwrap(),
                rem as u32,
                "text {v} mod {m}"
            );
        }
    }
}

#[test]
fn misbehaving_plugins_fail_only_their_call() {
    let host = PluginHost::new(
        None,
        Limits {
            call_timeout: Duration::from_millis(100),
            memory_bytes: 8 << 20,
        },
    )
    .unwrap();
    let bad = Arc::new(
        host.load_distribution(std::path::Path::new(builtin::TEST_MISBEHAVE_PATH))
            .expect("test plugin loads"),
    );
    let good = load(&host, "hash-citus", builtin::HASH_CITUS);
    let text = |s: &str| Value::Text(s.to_owned());

    let t = Instant::now();
    let e = bad.hash(&text("loop")).unwrap_err();
    assert!(matches!(e, PluginError::Timeout { .. }), "{e:?}");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "deadline took {:?}",
        t.elapsed()
    );

    let e = bad.hash(&text("alloc")).unwrap_err();
    assert!(
        matches!(
            e,
            PluginError::OutOfMemory { .. } | PluginError::Trap { .. }
        ),
        "{e:?}"
    );
    let e = bad.hash(&text("trap")).unwrap_err();
    assert!(matches!(e, PluginError::Trap { .. }), "{e:?}");
    let e = bad.hash(&text("reject")).unwrap_err();
    assert!(matches!(e, PluginError::Rejected { .. }), "{e:?}");
    // A hash outside int32 for the hash-ranges scheme is refused by the host.
    let e = bad.shard_index(&text("nonsense"), 8).unwrap_err();
    assert!(matches!(e, PluginError::Invalid { .. }), "{e:?}");

    // The same plugin still answers well-formed calls (a fresh instance replaced the
    // ones that trapped), and so does every other plugin, from other threads too.
    assert_eq!(
        bad.hash(&text("fine")).unwrap(),
        pg_hash::hashtext("fine") as i64
    );
    std::thread::scope(|s| {
        for t in 0..4 {
            let bad = bad.clone();
            let good = &good;
            s.spawn(move || {
                for i in 0..200i64 {
                    assert_eq!(
                        good.hash(&Value::Int8(i + t)).unwrap(),
                        pg_hash::hashint8(i + t) as i64
                    );
                    if i % 50 == 0 {
                        assert!(bad.hash(&Value::Text("trap".into())).is_err());
                    }
                    assert_eq!(
                        bad.hash(&Value::Int8(i)).unwrap(),
                        pg_hash::hashint8(i) as i64
                    );
                }
            });
        }
    });
}

#[test]
fn what_is_not_a_distribution_component_is_refused() {
    let host = host();
    // Not wasm at all.
    let e = host
        .load_distribution_bytes("junk", b"not a component")
        .unwrap_err();
    assert!(matches!(e, PluginError::Refused { .. }), "{e:?}");
    // A core module (wasm magic, version 1) is not a component.
    let core = [0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00];
    let e = host.load_distribution_bytes("core", &core).unwrap_err();
    assert!(matches!(e, PluginError::Refused { .. }), "{e:?}");
    assert!(
        e.to_string().contains("core"),
        "the error names the plugin: {e}"
    );
    // An empty component exports nothing of the distribution world.
    let empty_component = [0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00];
    let e = host
        .load_distribution_bytes("empty", &empty_component)
        .unwrap_err();
    assert!(matches!(e, PluginError::Refused { .. }), "{e:?}");
    assert!(
        e.to_string().contains("distribution"),
        "the error says which world was expected: {e}"
    );
}

#[test]
fn compiled_components_are_cached_by_content() {
    let dir = tempfile::tempdir().unwrap();
    let h = PluginHost::new(Some(dir.path().to_path_buf()), Limits::default()).unwrap();
    let t = Instant::now();
    let a = h
        .load_distribution_bytes("hash-citus", builtin::HASH_CITUS)
        .unwrap();
    let first = t.elapsed();
    let cached: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
    assert_eq!(cached.len(), 1, "one precompiled artifact");
    let t = Instant::now();
    let b = h
        .load_distribution_bytes("hash-citus", builtin::HASH_CITUS)
        .unwrap();
    let second = t.elapsed();
    assert_eq!(a.content_hash(), b.content_hash());
    assert_eq!(
        a.hash(&Value::Int4(1)).unwrap(),
        b.hash(&Value::Int4(1)).unwrap()
    );
    println!("compile {first:?}, from cache {second:?}");
}
