//! The Wasm plugin host with the shipped plugins: hashes and shard choice through the
//! distribution plugins against a real Postgres, placement through placement-default,
//! plugins that misbehave (loop, allocate without bound, trap, answer nonsense) failing
//! only their own call, components of unknown worlds refused, the plugin set's reload
//! (the swap rule for distribution plugins in use) and the per-plugin metrics.

use shardgate::plugin::{
    DistributionPlugin, Limits, LoadedPlugin, NodeStats, PlacementNode, PlacementPlugin,
    PluginError, PluginHost, PluginMetrics, PluginRegistry, ReloadOutcome, ShardPlacement,
    ShardScheme, Value, builtin, short_hash,
};
use shardgate_tests::TestEnv;
use std::collections::HashMap;
use std::path::Path;
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

// ---------------------------------------------------------------------------------
// Placement, unknown worlds, the plugin set's reload, metrics.

/// Compiled components shared by the tests of this file (keyed by content hash).
fn cache_dir() -> std::path::PathBuf {
    std::env::temp_dir().join("shardgate-test-plugin-cache")
}

fn cached_host() -> Arc<PluginHost> {
    Arc::new(PluginHost::new(Some(cache_dir()), Limits::default()).expect("plugin host"))
}

fn placement_default(host: &PluginHost) -> Arc<PlacementPlugin> {
    match host.load("placement-default", builtin::PLACEMENT_DEFAULT) {
        Ok(LoadedPlugin::Placement(p)) => p,
        other => panic!("placement-default is a placement plugin: {other:?}"),
    }
}

fn node(group_id: i32, active: bool, should_have_shards: bool) -> PlacementNode {
    PlacementNode {
        node_id: group_id + 100,
        group_id,
        name: format!("worker-{group_id}"),
        port: 5432,
        is_active: active,
        should_have_shards,
    }
}

fn stats(group_id: i32, shard_count: u32, capacity: f64) -> NodeStats {
    NodeStats {
        group_id,
        shard_count,
        size_bytes: 0,
        capacity,
    }
}

/// The same component with a custom section appended: another build (content hash)
/// that behaves identically.
fn rebuilt(bytes: &[u8], tag: &str) -> Vec<u8> {
    fn leb(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let b = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }
    let name = b"shardgate-test";
    let mut body = Vec::new();
    leb(name.len(), &mut body);
    body.extend_from_slice(name);
    body.extend_from_slice(tag.as_bytes());
    let mut out = bytes.to_vec();
    out.push(0); // custom section
    leb(body.len(), &mut out);
    out.extend_from_slice(&body);
    out
}

#[test]
fn placement_default_places_round_robin_from_the_colocation_id() {
    let host = cached_host();
    let p = placement_default(&host);
    assert_eq!(p.name(), "placement-default");
    // Unsorted, with an inactive node and one that should not have shards.
    let nodes = [
        node(3, true, true),
        node(1, true, true),
        node(4, false, true),
        node(2, true, true),
        node(5, true, false),
    ];
    assert_eq!(
        p.place_shards(0, 4, 1, &nodes).unwrap(),
        vec![vec![1], vec![2], vec![3], vec![1]]
    );
    // Another colocation group starts elsewhere.
    assert_eq!(
        p.place_shards(1, 4, 1, &nodes).unwrap(),
        vec![vec![2], vec![3], vec![1], vec![2]]
    );
    // Replication: r distinct consecutive nodes.
    assert_eq!(
        p.place_shards(0, 4, 2, &nodes).unwrap(),
        vec![vec![1, 2], vec![2, 3], vec![3, 1], vec![1, 2]]
    );
    assert_eq!(
        p.place_shards(7, 0, 1, &nodes).unwrap(),
        Vec::<Vec<i32>>::new()
    );
    // Too few eligible nodes, or none: the plugin's own error.
    let e = p.place_shards(0, 4, 4, &nodes).unwrap_err();
    assert!(
        matches!(&e, PluginError::Rejected { name, message } if name == "placement-default" && message.contains("replication factor 4")),
        "{e:?}"
    );
    let e = p
        .place_shards(0, 4, 1, &[node(1, false, true), node(2, true, false)])
        .unwrap_err();
    assert!(matches!(e, PluginError::Rejected { .. }), "{e:?}");
}

#[test]
fn placement_default_rebalances_by_shard_count_and_isolates_on_the_least_loaded() {
    let host = cached_host();
    let p = placement_default(&host);
    let placement = |shard_id: i64, group_id: i32| ShardPlacement {
        shard_id,
        shard_index: shard_id as u32,
        colocation_id: 1,
        group_id,
        size_bytes: 1000,
    };
    // Group 1 holds six shards, group 2 none, group 3 one; group 4 must not receive.
    let mut placements: Vec<ShardPlacement> = (1..=6).map(|s| placement(s, 1)).collect();
    placements.push(placement(7, 3));
    let nodes = [
        stats(1, 6, 1.0),
        stats(2, 0, 1.0),
        stats(3, 1, 1.0),
        stats(4, 0, 0.0),
    ];
    let moves = p.rebalance(&placements, &nodes).unwrap();
    let summary: Vec<(i64, i32, i32)> = moves
        .iter()
        .map(|m| (m.shard_id, m.from_group, m.to_group))
        .collect();
    assert_eq!(summary, vec![(6, 1, 2), (5, 1, 2), (4, 1, 3)]);
    // Deterministic, and balanced afterwards.
    assert_eq!(p.rebalance(&placements, &nodes).unwrap(), moves);
    let mut count: HashMap<i32, usize> = HashMap::new();
    for pl in &placements {
        let g = moves
            .iter()
            .find(|m| m.shard_id == pl.shard_id)
            .map_or(pl.group_id, |m| m.to_group);
        *count.entry(g).or_default() += 1;
    }
    assert_eq!(count.get(&4), None);
    let (min, max) = (count.values().min().unwrap(), count.values().max().unwrap());
    assert!(max - min <= 1, "{count:?}");
    // Balanced already: no moves.
    let even: Vec<ShardPlacement> = (1..=4).map(|s| placement(s, (s % 2) as i32 + 1)).collect();
    assert!(
        p.rebalance(&even, &[stats(1, 2, 1.0), stats(2, 2, 1.0)])
            .unwrap()
            .is_empty()
    );

    // Isolation: the fewest shards, ties to the lowest group id; may be the current one.
    let nodes = [stats(1, 5, 1.0), stats(3, 2, 1.0), stats(2, 2, 1.0)];
    assert_eq!(p.isolate_tenant(1, 1, &nodes).unwrap(), 2);
    assert_eq!(
        p.isolate_tenant(1, 1, &[stats(1, 1, 1.0), stats(2, 4, 1.0)])
            .unwrap(),
        1
    );
    let e = p.isolate_tenant(1, 1, &[]).unwrap_err();
    assert!(matches!(e, PluginError::Rejected { .. }), "{e:?}");
}

#[test]
fn components_of_unknown_worlds_are_refused_by_name() {
    let host = cached_host();
    assert!(matches!(
        host.load("hash-citus", builtin::HASH_CITUS),
        Ok(LoadedPlugin::Distribution(_))
    ));
    assert!(matches!(
        host.load("placement-default", builtin::PLACEMENT_DEFAULT),
        Ok(LoadedPlugin::Placement(_))
    ));
    let core = [0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00];
    let empty_component = [0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00];
    for (file, bytes) in [
        ("junk.wasm", &b"not wasm at all"[..]),
        ("core-module.wasm", &core[..]),
        ("empty-component.wasm", &empty_component[..]),
    ] {
        let e = host.load(file, bytes).unwrap_err();
        assert!(
            matches!(&e, PluginError::Refused { name, .. } if name == file),
            "{e:?}"
        );
        let text = e.to_string();
        assert!(text.contains(file), "the error names the file: {text}");
        for world in ["shardgate:distribution@0.1.0", "shardgate:placement@0.1.0"] {
            assert!(text.contains(world), "the error lists {world}: {text}");
        }
    }
    // From a file, the file's name.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nonsense.wasm");
    std::fs::write(&path, b"\0asm nonsense").unwrap();
    let e = host.load_file(&path).unwrap_err();
    assert!(e.to_string().contains("nonsense.wasm"), "{e}");
}

fn registry(dir: Option<&Path>) -> PluginRegistry {
    PluginRegistry::new(cached_host(), dir.map(Path::to_path_buf)).expect("registry")
}

#[test]
fn the_builtins_load_and_a_file_replaces_the_builtin_of_its_name() {
    let r = registry(None);
    let set = r.current();
    assert_eq!(set.generation(), 1);
    let names: Vec<&str> = set.distributions().map(|(n, _)| n).collect();
    assert_eq!(names, ["hash-citus", "hash-pg-partition"]);
    let names: Vec<&str> = set.placements().map(|(n, _)| n).collect();
    assert_eq!(names, ["placement-default"]);
    assert!(
        set.distributions()
            .all(|(_, l)| l.source.to_string() == "builtin")
    );
    assert_eq!(
        set.distribution("hash-citus").unwrap().content_hash(),
        shardgate::plugin::content_hash(builtin::HASH_CITUS)
    );
    // Nothing to reload without a directory.
    let report = r.reload_blocking(&HashMap::new());
    assert!(!report.changed, "{report}");
    assert_eq!(r.current().generation(), 1);

    // A directory with a rebuilt placement-default and a broken file.
    let dir = tempfile::tempdir().unwrap();
    let rebuilt_placement = rebuilt(builtin::PLACEMENT_DEFAULT, "v2");
    std::fs::write(dir.path().join("placement.wasm"), &rebuilt_placement).unwrap();
    std::fs::write(dir.path().join("broken.wasm"), b"broken").unwrap();
    let r = registry(Some(dir.path()));
    let report = r.initial_report();
    println!("{report}");
    let refused: Vec<&str> = report.refused().map(|e| e.plugin.as_str()).collect();
    assert_eq!(refused, ["broken.wasm"], "{report}");
    let set = r.current();
    let (_, pd) = set.placements().next().unwrap();
    assert_eq!(pd.source.to_string(), "placement.wasm");
    assert_eq!(
        pd.content_hash,
        shardgate::plugin::content_hash(&rebuilt_placement)
    );
    assert!(set.distribution("hash-citus").is_some());
}

#[test]
fn an_in_use_distribution_plugin_is_swapped_only_for_a_build_that_hashes_alike() {
    let dir = tempfile::tempdir().unwrap();
    let r = registry(Some(dir.path()));
    let builtin_hash = shardgate::plugin::content_hash(builtin::HASH_CITUS);
    let in_use = HashMap::from([("hash-citus".to_owned(), builtin_hash.clone())]);

    // The same build in the directory: unchanged (only its source changes).
    std::fs::write(dir.path().join("hash-citus.wasm"), builtin::HASH_CITUS).unwrap();
    let report = r.reload_blocking(&in_use);
    assert!(
        matches!(
            report.outcome("hash-citus"),
            Some(ReloadOutcome::Unchanged { .. })
        ),
        "{report}"
    );

    // A build that calls itself hash-citus but hashes text lower-cased: refused.
    let generation = r.current().generation();
    std::fs::copy(
        builtin::TEST_HASH_VARIANT_PATH,
        dir.path().join("hash-citus.wasm"),
    )
    .unwrap();
    let report = r.reload_blocking(&in_use);
    println!("{report}");
    let Some(ReloadOutcome::Refused { reason }) = report.outcome("hash-citus") else {
        panic!("refused: {report}");
    };
    assert!(
        reason.starts_with("plugin hash-citus: new build "),
        "{reason}"
    );
    assert!(reason.contains("hashes text"), "{reason}");
    assert!(
        reason.ends_with("moving data to a new distribution function is a rebalance, not a swap"),
        "{reason}"
    );
    assert!(reason.contains(short_hash(&builtin_hash)), "{reason}");
    let set = r.current();
    assert_eq!(
        set.distribution("hash-citus").unwrap().content_hash(),
        builtin_hash,
        "the loaded build stays"
    );
    assert_eq!(
        set.distribution("hash-citus")
            .unwrap()
            .hash(&Value::Text("Tenant".into()))
            .unwrap(),
        pg_hash::hashtext("Tenant") as i64
    );
    assert_eq!(set.generation(), generation, "nothing changed");
    assert!(
        report
            .to_string()
            .contains("hash-citus (distribution): refused")
    );

    // A new build that hashes alike (same code, another content hash): replaced.
    let alike = rebuilt(builtin::HASH_CITUS, "alike");
    std::fs::write(dir.path().join("hash-citus.wasm"), &alike).unwrap();
    let report = r.reload_blocking(&in_use);
    assert!(
        matches!(
            report.outcome("hash-citus"),
            Some(ReloadOutcome::Replaced { .. })
        ),
        "{report}"
    );
    assert_eq!(r.current().generation(), generation + 1);
    assert_eq!(
        r.current()
            .distribution("hash-citus")
            .unwrap()
            .content_hash(),
        shardgate::plugin::content_hash(&alike)
    );

    // Not in use: any build swaps in.
    std::fs::copy(
        builtin::TEST_HASH_VARIANT_PATH,
        dir.path().join("hash-citus.wasm"),
    )
    .unwrap();
    let report = r.reload_blocking(&HashMap::new());
    assert!(
        matches!(
            report.outcome("hash-citus"),
            Some(ReloadOutcome::Replaced { .. })
        ),
        "{report}"
    );
    // ... and the build the catalog recorded is always welcome back, in use or not.
    let variant_hash = r
        .current()
        .distribution("hash-citus")
        .unwrap()
        .content_hash()
        .to_owned();
    std::fs::remove_file(dir.path().join("hash-citus.wasm")).unwrap();
    let recorded_builtin = HashMap::from([("hash-citus".to_owned(), builtin_hash.clone())]);
    let report = r.reload_blocking(&recorded_builtin);
    assert!(
        matches!(
            report.outcome("hash-citus"),
            Some(ReloadOutcome::Replaced { .. })
        ),
        "back to the builtin: {report}"
    );
    assert_ne!(variant_hash, builtin_hash);
}

#[test]
fn a_plugin_whose_file_is_gone_is_kept_while_in_use_and_removed_after() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("misbehave.wasm");
    std::fs::copy(builtin::TEST_MISBEHAVE_PATH, &file).unwrap();
    let r = registry(Some(dir.path()));
    let hash = r
        .current()
        .distribution("test-misbehave")
        .expect("loaded from the directory")
        .content_hash()
        .to_owned();
    std::fs::remove_file(&file).unwrap();
    let in_use = HashMap::from([("test-misbehave".to_owned(), hash)]);
    let report = r.reload_blocking(&in_use);
    assert!(
        matches!(
            report.outcome("test-misbehave"),
            Some(ReloadOutcome::Kept { .. })
        ),
        "{report}"
    );
    assert!(
        report.to_string().contains("misbehave.wasm is gone"),
        "{report}"
    );
    assert!(r.current().distribution("test-misbehave").is_some());
    let report = r.reload_blocking(&HashMap::new());
    assert!(
        matches!(
            report.outcome("test-misbehave"),
            Some(ReloadOutcome::Removed { .. })
        ),
        "{report}"
    );
    assert!(r.current().distribution("test-misbehave").is_none());
    assert!(report.changed);
}

#[test]
fn placement_plugins_swap_while_calls_run() {
    let dir = tempfile::tempdir().unwrap();
    let r = registry(Some(dir.path()));
    let nodes = [
        node(1, true, true),
        node(2, true, true),
        node(3, true, true),
    ];
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let callers: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    let mut calls = 0u32;
                    let mut generations = std::collections::BTreeSet::new();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) || calls < 10 {
                        let set = r.current();
                        generations.insert(set.generation());
                        let placed = set
                            .placement("placement-default")
                            .expect("always a placement-default")
                            .place_shards(0, 6, 2, &nodes)
                            .expect("placement works during swaps");
                        assert_eq!(placed.len(), 6);
                        calls += 1;
                    }
                    generations
                })
            })
            .collect();
        let file = dir.path().join("placement-default.wasm");
        for i in 0..3 {
            std::fs::write(&file, rebuilt(builtin::PLACEMENT_DEFAULT, &format!("v{i}"))).unwrap();
            let report = r.reload_blocking(&HashMap::new());
            assert!(
                matches!(
                    report.outcome("placement-default"),
                    Some(ReloadOutcome::Replaced { .. })
                ),
                "{report}"
            );
        }
        std::fs::remove_file(&file).unwrap();
        let report = r.reload_blocking(&HashMap::new());
        assert!(
            matches!(
                report.outcome("placement-default"),
                Some(ReloadOutcome::Replaced { .. })
            ),
            "back to the builtin: {report}"
        );
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for c in callers {
            let generations = c.join().unwrap();
            assert!(!generations.is_empty());
        }
    });
    assert_eq!(r.current().generation(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watcher_reloads_when_the_directory_changes() {
    let dir = tempfile::tempdir().unwrap();
    let r = registry(Some(dir.path()));
    let stop = tokio_util::sync::CancellationToken::new();
    let task = r.spawn_watcher(Arc::new(HashMap::new), stop.clone());
    let generation = r.current().generation();
    std::fs::write(
        dir.path().join("placement.wasm"),
        rebuilt(builtin::PLACEMENT_DEFAULT, "watched"),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while r.current().generation() == generation {
        assert!(Instant::now() < deadline, "the watcher did not reload");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let set = r.current();
    let (_, pd) = set.placements().next().unwrap();
    assert_eq!(pd.source.to_string(), "placement.wasm");
    // The async reload (what an admin function calls) sees nothing new.
    let report = r.reload(&HashMap::new()).await;
    assert!(!report.changed, "{report}");
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the watcher stops")
        .unwrap();
}

/// The value of a sample in the text exposition format, by its exact label set.
fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .map(|v| v.parse().unwrap())
}

#[test]
fn plugins_count_calls_failures_and_swaps() {
    let metrics = shardgate::metrics::Metrics::new();
    let pm = Arc::new(PluginMetrics::new(&metrics.registry).unwrap());
    let host = Arc::new(
        PluginHost::new(
            Some(cache_dir()),
            Limits {
                call_timeout: Duration::from_millis(100),
                memory_bytes: 8 << 20,
            },
        )
        .unwrap()
        .with_metrics(pm.clone()),
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        builtin::TEST_MISBEHAVE_PATH,
        dir.path().join("misbehave.wasm"),
    )
    .unwrap();
    let r = PluginRegistry::new(host.clone(), Some(dir.path().to_path_buf())).unwrap();
    let set = r.current();
    let citus = set.distribution("hash-citus").unwrap();
    for i in 0..10 {
        citus.hash(&Value::Int8(i)).unwrap();
    }
    let bad = set.distribution("test-misbehave").unwrap();
    let text = |s: &str| Value::Text(s.to_owned());
    assert!(bad.hash(&text("trap")).is_err());
    assert!(bad.hash(&text("trap")).is_err());
    assert!(matches!(
        bad.hash(&text("loop")),
        Err(PluginError::Timeout { .. })
    ));
    let alloc = bad.hash(&text("alloc")).unwrap_err();
    assert!(matches!(
        bad.shard_index(&text("nonsense"), 4),
        Err(PluginError::Invalid { .. })
    ));
    bad.hash(&text("fine")).unwrap();
    let pd = set.placement("placement-default").unwrap();
    pd.place_shards(0, 4, 1, &[node(1, true, true)]).unwrap();

    let out = metrics.render();
    let get = |s: &str| sample(&out, s).unwrap_or_else(|| panic!("no {s} in\n{out}"));
    assert_eq!(
        get(r#"shardgate_plugin_calls_total{plugin="hash-citus"}"#),
        10.0
    );
    // One call in 8 is timed.
    assert_eq!(
        get(r#"shardgate_plugin_call_seconds_count{plugin="hash-citus"}"#),
        2.0
    );
    assert_eq!(
        get(r#"shardgate_plugin_calls_total{plugin="test-misbehave"}"#),
        6.0
    );
    assert_eq!(
        get(r#"shardgate_plugin_calls_total{plugin="placement-default"}"#),
        1.0
    );
    assert_eq!(
        get(r#"shardgate_plugin_timeouts_total{plugin="test-misbehave"}"#),
        1.0
    );
    let (traps, oom) = (
        get(r#"shardgate_plugin_traps_total{plugin="test-misbehave"}"#),
        get(r#"shardgate_plugin_out_of_memory_total{plugin="test-misbehave"}"#),
    );
    match alloc {
        PluginError::OutOfMemory { .. } => assert_eq!((traps, oom), (2.0, 1.0)),
        _ => assert_eq!((traps, oom), (3.0, 0.0)),
    }
    assert_eq!(
        get(r#"shardgate_plugin_invalid_answers_total{plugin="test-misbehave"}"#),
        1.0
    );
    let builtin_version = short_hash(citus.content_hash()).to_owned();
    let info = |plugin: &str, kind: &str, version: &str| {
        sample(
            &out,
            &format!(
                r#"shardgate_plugin_loaded_info{{kind="{kind}",plugin="{plugin}",version="{version}"}}"#
            ),
        )
    };
    assert_eq!(
        info("hash-citus", "distribution", &builtin_version),
        Some(1.0)
    );
    assert_eq!(
        info(
            "placement-default",
            "placement",
            short_hash(pd.content_hash())
        ),
        Some(1.0)
    );

    // A refused swap and an accepted one.
    let in_use = HashMap::from([("hash-citus".to_owned(), citus.content_hash().to_owned())]);
    std::fs::copy(builtin::TEST_HASH_VARIANT_PATH, dir.path().join("v.wasm")).unwrap();
    r.reload_blocking(&in_use);
    let alike = rebuilt(builtin::HASH_CITUS, "metrics");
    std::fs::write(dir.path().join("v.wasm"), &alike).unwrap();
    r.reload_blocking(&in_use);
    let out = metrics.render();
    let get = |s: &str| sample(&out, s).unwrap_or_else(|| panic!("no {s} in\n{out}"));
    assert_eq!(
        get(r#"shardgate_plugin_swaps_total{plugin="hash-citus",result="refused"}"#),
        1.0
    );
    assert_eq!(
        get(r#"shardgate_plugin_swaps_total{plugin="hash-citus",result="accepted"}"#),
        1.0
    );
    let new_version = short_hash(&shardgate::plugin::content_hash(&alike)).to_owned();
    assert_eq!(
        sample(
            &out,
            &format!(
                r#"shardgate_plugin_loaded_info{{kind="distribution",plugin="hash-citus",version="{new_version}"}}"#
            )
        ),
        Some(1.0)
    );
    assert!(
        !out.contains(&format!(r#"version="{builtin_version}""#)),
        "the old version's series is gone:\n{out}"
    );
    if let Ok(dump) = std::env::var("SHARDGATE_DUMP_METRICS") {
        std::fs::write(dump, &out).unwrap();
    }
}
