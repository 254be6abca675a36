//! `../shared/citus_corpus` (Citus's own regression schemas): every directory's schema
//! and data loaded through the router, then distributed as its `distribute.sql` says
//! (tables that already hold rows, as the corpus README allows), and every row found in
//! the shards afterwards: the admin functions on real Citus schemas (enum and composite
//! column types included). Distribution columns of types the shipped plugins cannot hash
//! are listed and must fail with 42883.

use shardgate_tests::tokio_postgres::Client;
use shardgate_tests::{EnvOptions, TestEnv};
use std::path::PathBuf;

fn corpus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/citus_corpus")
}

/// The statements of a corpus file (one per line; `--` lines are headers).
fn statements(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("--"))
        .map(|l| l.trim_end_matches(';').to_owned())
        .collect()
}

/// Rows of a table summed over its shards on both workers.
async fn rows_in_shards(env: &TestEnv, c: &Client, table: &str) -> i64 {
    let shards: Vec<(i64, String, i32)> = c
        .query(
            "SELECT s.shardid, n.nspname::text, min(p.groupid)
             FROM shardgate.pg_dist_shard s
             JOIN shardgate.pg_dist_placement p USING (shardid)
             JOIN pg_class r ON r.oid = s.logicalrelid
             JOIN pg_namespace n ON n.oid = r.relnamespace
             WHERE r.relname = $1 GROUP BY 1, 2",
            &[&table],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let mut total = 0;
    for (id, schema, group) in shards {
        let port: i32 = c
            .query_one(
                "SELECT nodeport FROM shardgate.pg_dist_node WHERE groupid = $1",
                &[&group],
            )
            .await
            .unwrap()
            .get(0);
        let w = env
            .worker_ports
            .iter()
            .position(|p| *p as i32 == port)
            .unwrap();
        let shard = shardgate::catalog::shard_name(table, id);
        total += env
            .worker(w)
            .await
            .query_one(
                &format!("SELECT count(*) FROM \"{schema}\".\"{shard}\""),
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0);
    }
    total
}

/// Distribution columns of types the shipped hash plugins do not hash (date, numeric,
/// timestamp, char(1)[]): refused with 42883, as expected; every other call succeeds.
const UNHASHABLE: &[(&str, &str)] = &[
    ("08_insert_select", "char_table"),
    ("08_insert_select", "raw_table"),
    ("08_insert_select", "summary_table"),
    ("17_subquery_in_where", "t22"),
    ("17_subquery_in_where", "t3"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_corpus_schema_distributes_with_its_rows() {
    let root = corpus();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("distribute.sql").is_file())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 20, "corpus directories: {}", dirs.len());
    let mut failures = Vec::new();
    for dir in &dirs {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let env = TestEnv::with(EnvOptions {
            workers: 2,
            ..Default::default()
        })
        .await;
        let c = env.client().await;
        let schema = std::fs::read_to_string(dir.join("schema.sql")).unwrap();
        for s in statements(&schema) {
            c.batch_execute(&s)
                .await
                .unwrap_or_else(|e| panic!("{name}: schema statement failed: {s}: {e:?}"));
        }
        // Rows per table before distribution (straight from Postgres).
        let direct = env.direct().await;
        let dist = std::fs::read_to_string(dir.join("distribute.sql")).unwrap();
        for s in statements(&dist) {
            let table = s
                .split('\'')
                .nth(1)
                .unwrap_or_else(|| panic!("{name}: table in {s}"))
                .to_owned();
            let before: i64 = direct
                .query_one(&format!("SELECT count(*) FROM {table}"), &[])
                .await
                .unwrap()
                .get(0);
            match c.batch_execute(&s).await {
                Ok(()) => {
                    // One placement of each shard is counted (a reference table's
                    // copies are all checked by tests/catalog.rs).
                    let after = rows_in_shards(&env, &c, &table).await;
                    if after != before {
                        failures.push(format!(
                            "{name}: {table}: {before} rows before, {after} in the shards"
                        ));
                    }
                }
                Err(e) => {
                    let code = e.as_db_error().map(|d| d.code().code().to_owned());
                    let expected = UNHASHABLE.iter().any(|(d, t)| *d == name && *t == table);
                    if !(expected && code.as_deref() == Some("42883")) {
                        failures.push(format!("{name}: {s}: {e:?}"));
                    }
                }
            }
        }
        eprintln!("{name}: distributed");
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
