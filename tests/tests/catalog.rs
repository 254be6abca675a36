//! The catalog and the admin functions against a real fleet (a coordinator and two
//! workers): distributing tables (rows moved into real shard tables on the workers, in
//! the shard Postgres's own hash function says), colocation, reference tables, DDL on
//! every shard all or nothing, bad input leaving the catalog unchanged, the catalog
//! surviving a restart and shared by two routers.

use shardgate_tests::tokio_postgres::{Client, Error, SimpleQueryMessage};
use shardgate_tests::{EnvOptions, TestEnv};
use std::time::{Duration, Instant};

async fn fleet(workers: usize) -> TestEnv {
    TestEnv::with(EnvOptions {
        workers,
        ..Default::default()
    })
    .await
}

fn code(e: &Error) -> String {
    e.as_db_error()
        .map(|d| d.code().code().to_owned())
        .unwrap_or_else(|| format!("not a db error: {e}"))
}

/// Runs one statement in the simple protocol; the first column of the first row.
async fn one(c: &Client, sql: &str) -> Result<Option<String>, Error> {
    for m in c.simple_query(sql).await? {
        if let SimpleQueryMessage::Row(r) = m {
            return Ok(r.get(0).map(str::to_owned));
        }
    }
    Ok(None)
}

/// Runs each `;`-separated statement on its own (admin calls must be statements of
/// their own; psql sends a script's statements one by one as well).
async fn script(c: &Client, sql: &str) -> Result<(), Error> {
    for stmt in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        c.batch_execute(stmt).await?;
    }
    Ok(())
}

async fn count(c: &Client, sql: &str) -> i64 {
    c.query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// (shardid, shardindex, min, max, groupid) of a table, from the catalog through the router.
async fn shards(c: &Client, table: &str) -> Vec<(i64, i32, Option<String>, Option<String>, i32)> {
    c.query(
        "SELECT s.shardid, s.shardindex, s.shardminvalue, s.shardmaxvalue, p.groupid
         FROM shardgate.pg_dist_shard s JOIN shardgate.pg_dist_placement p USING (shardid)
         WHERE s.logicalrelid = $1::text::regclass ORDER BY s.shardindex, p.groupid",
        &[&table],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
    .collect()
}

/// groupid -> worker index (by port).
async fn worker_of_group(env: &TestEnv, c: &Client, group: i32) -> usize {
    let port: i32 = c
        .query_one(
            "SELECT nodeport FROM shardgate.pg_dist_node WHERE groupid = $1",
            &[&group],
        )
        .await
        .unwrap()
        .get(0);
    env.worker_ports
        .iter()
        .position(|p| *p as i32 == port)
        .expect("group is one of the test's workers")
}

async fn prepared_left(env: &TestEnv) -> i64 {
    let d = env.direct().await;
    let mut n = count(
        &d,
        "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()",
    )
    .await;
    // Commit records are deleted once every worker committed.
    n += count(&d, "SELECT count(*) FROM shardgate.pg_dist_transaction").await;
    for i in 0..env.worker_ports.len() {
        n += count(
            &env.worker(i).await,
            "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()",
        )
        .await;
    }
    n
}

/// Shard tables of `table` on every worker.
async fn shard_tables(env: &TestEnv, table: &str) -> i64 {
    let mut n = 0;
    for i in 0..env.worker_ports.len() {
        n += env
            .worker(i)
            .await
            .query_one(
                "SELECT count(*) FROM pg_tables WHERE tablename ~ ('^' || $1 || '_[0-9]+$')",
                &[&table],
            )
            .await
            .unwrap()
            .get::<_, i64>(0);
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributing_a_table_moves_its_rows_into_shards_where_postgres_hashes_them() {
    let env = fleet(2).await;
    let c = env.client().await;
    script(
        &c,
        "CREATE TABLE companies (
             id bigint PRIMARY KEY,
             name text NOT NULL DEFAULT 'unnamed',
             score int CHECK (score >= 0),
             created date DEFAULT current_date,
             doubled bigint GENERATED ALWAYS AS (id * 2) STORED,
             UNIQUE (id, name));
         CREATE INDEX companies_name ON companies (name);
         INSERT INTO companies (id, name, score)
             SELECT g, 'c' || g || E'\\t\\n\\\\x', g % 7 FROM generate_series(1, 2000) g;",
    )
    .await
    .unwrap();
    let r = one(
        &c,
        "SELECT create_distributed_table('companies', 'id', shard_count => 8)",
    )
    .await
    .unwrap();
    assert_eq!(r.as_deref(), Some(""));

    // The catalog, read with plain SELECTs through the router.
    let part = c
        .query_one(
            "SELECT partmethod::text, partkey, distplugin, length(distpluginhash), colocationid
             FROM shardgate.pg_dist_partition WHERE logicalrelid = 'companies'::regclass",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(part.get::<_, String>(0), "h");
    assert_eq!(part.get::<_, String>(1), "id");
    assert_eq!(part.get::<_, String>(2), "hash-citus");
    assert_eq!(part.get::<_, i32>(3), 64);
    let s = shards(&c, "companies").await;
    assert_eq!(s.len(), 8);
    assert_eq!(s[0].2.as_deref(), Some("-2147483648"));
    assert_eq!(s[7].3.as_deref(), Some("2147483647"));
    let groups: std::collections::HashSet<i32> = s.iter().map(|x| x.4).collect();
    assert_eq!(groups.len(), 2, "round-robin over both workers: {s:?}");

    // The coordinator's table is now an empty shell; every row is in exactly the shard
    // whose hash range holds Postgres's own hashint8(id), with its columns intact.
    assert_eq!(
        count(&env.direct().await, "SELECT count(*) FROM companies").await,
        0
    );
    let mut total = 0;
    for (id, _idx, min, max, group) in &s {
        let w = env.worker(worker_of_group(&env, &c, *group).await).await;
        let t = format!("companies_{id}");
        total += count(&w, &format!("SELECT count(*) FROM {t}")).await;
        let (min, max): (i32, i32) = (
            min.as_ref().unwrap().parse().unwrap(),
            max.as_ref().unwrap().parse().unwrap(),
        );
        let misplaced = count(
            &w,
            &format!("SELECT count(*) FROM {t} WHERE hashint8(id) NOT BETWEEN {min} AND {max}"),
        )
        .await;
        assert_eq!(misplaced, 0, "rows of {t} outside its hash range");
        let bad = count(
            &w,
            &format!(
                "SELECT count(*) FROM {t} WHERE name <> 'c' || id || E'\\t\\n\\\\x' OR doubled <> id * 2 OR score <> id % 7"
            ),
        )
        .await;
        assert_eq!(bad, 0, "column values survived the move");
        // Constraints, defaults and indexes came along, with shard-suffixed names.
        let idx = count(
            &w,
            &format!("SELECT count(*) FROM pg_indexes WHERE tablename = '{t}' AND indexname IN ('companies_name_{id}', 'companies_pkey_{id}', 'companies_id_name_key_{id}')"),
        )
        .await;
        assert_eq!(idx, 3, "indexes of {t}");
        let err = w
            .batch_execute(&format!("INSERT INTO {t} (id, score) VALUES (-5, -1)"))
            .await
            .unwrap_err();
        assert_eq!(code(&err), "23514", "CHECK constraint on the shard");
        w.batch_execute(&format!(
            "INSERT INTO {t} (id) VALUES (-7); DELETE FROM {t} WHERE id = -7"
        ))
        .await
        .expect("defaults on the shard");
    }
    assert_eq!(total, 2000);
    assert_eq!(prepared_left(&env).await, 0);

    // The coordinator's table refuses rows from anyone but shardgate's admin work.
    let e = env
        .direct()
        .await
        .batch_execute("INSERT INTO companies (id, name) VALUES (-1, 'stray')")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "0A000", "{e:?}");

    // A statement no planner tier takes (a multi-shard read the router would have to
    // sort: the pushdown tier only concatenates rows) is refused
    // rather than answered from the empty shell, in both protocols, and the session
    // goes on; a statement pinned to one company is routed to its shard.
    let e = c
        .batch_execute("SELECT count(*) FROM Companies")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "0A000", "{e:?}");
    let e = c
        .query(
            "SELECT * FROM companies WHERE id > $1 ORDER BY id",
            &[&1i64],
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), "0A000", "{e:?}");
    let msg = |e: &Error| {
        e.as_db_error()
            .map(|d| d.message().to_owned())
            .unwrap_or_default()
    };
    assert!(
        msg(&e).contains("not pinned to one distribution value"),
        "{e:?}"
    );
    // Syntax Postgres takes and the tiers' parser does not is refused as such, not
    // as a statement that is not pinned.
    let e = c
        .batch_execute("SELECT id FROM companies WHERE id = 42 FETCH FIRST +1 ROWS ONLY")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "0A000", "{e:?}");
    assert!(
        msg(&e).contains("parser does not accept its syntax"),
        "{e:?}"
    );
    // A column named with its schema: refused by every tier (the shard's name differs),
    // never sent to a worker that would not find `public.companies`.
    let e = c
        .batch_execute("SELECT id FROM companies WHERE public.companies.id = 42")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "0A000", "{e:?}");
    assert!(msg(&e).contains("schema.table.column"), "{e:?}");
    let rows = c
        .query("SELECT id FROM companies WHERE id = $1", &[&42i64])
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, i64>(0), 42);
    c.batch_execute("BEGIN").await.unwrap();
    let e = c.batch_execute("DELETE FROM companies").await.unwrap_err();
    assert_eq!(code(&e), "0A000");
    let e = c.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(
        code(&e),
        "25P02",
        "the transaction is aborted as Postgres would abort it"
    );
    c.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(
        one(&c, "SELECT 'companies'").await.unwrap().as_deref(),
        Some("companies")
    );

    // get_shard_id_for_distribution_column agrees with where the row is.
    let sid: i64 = one(
        &c,
        "SELECT get_shard_id_for_distribution_column('companies', 42)",
    )
    .await
    .unwrap()
    .unwrap()
    .parse()
    .unwrap();
    let (_, _, _, _, group) = s.iter().find(|x| x.0 == sid).unwrap();
    let w = env.worker(worker_of_group(&env, &c, *group).await).await;
    assert_eq!(
        count(
            &w,
            &format!("SELECT count(*) FROM companies_{sid} WHERE id = 42")
        )
        .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn colocated_tables_share_nodes_and_reference_tables_are_everywhere() {
    let env = fleet(2).await;
    let c = env.client().await;
    script(
        &c,
        "CREATE TABLE a (id int8 PRIMARY KEY);
         CREATE TABLE b (aid int8, x int);
         CREATE TABLE d (k int8);
         CREATE TABLE i4 (k int4);
         CREATE TABLE countries (code text PRIMARY KEY, name text);
         INSERT INTO countries SELECT 'c' || g, 'country ' || g FROM generate_series(1, 50) g;
         SELECT create_distributed_table('a', 'id', shard_count => 6);
         SELECT create_distributed_table('b', 'aid', colocate_with => 'a');
         SELECT create_distributed_table('d', 'k', shard_count => 6);
         SELECT create_reference_table('countries');",
    )
    .await
    .unwrap();
    let coloc = |t: &'static str| {
        let c = &c;
        async move {
            count(
                c,
                &format!("SELECT colocationid::int8 FROM shardgate.pg_dist_partition WHERE logicalrelid = '{t}'::regclass"),
            )
            .await
        }
    };
    assert_eq!(coloc("a").await, coloc("b").await);
    assert_eq!(
        coloc("a").await,
        coloc("d").await,
        "default colocation: same type and count"
    );
    let (sa, sb) = (shards(&c, "a").await, shards(&c, "b").await);
    assert_eq!(sa.len(), 6);
    for (x, y) in sa.iter().zip(&sb) {
        assert_eq!(
            (x.1, x.4),
            (y.1, y.4),
            "shard index {} on the same node",
            x.1
        );
    }
    // An int4 column goes to another group.
    c.batch_execute("SELECT create_distributed_table('i4', 'k', shard_count => 6)")
        .await
        .unwrap();
    assert_ne!(coloc("i4").await, coloc("a").await);
    // The reference table: one shard, a full copy on each worker.
    let sr = shards(&c, "countries").await;
    assert_eq!(sr.len(), 2);
    assert_eq!(sr[0].0, sr[1].0);
    for i in 0..2 {
        let w = env.worker(i).await;
        assert_eq!(
            count(&w, &format!("SELECT count(*) FROM countries_{}", sr[0].0)).await,
            50
        );
    }
    assert_eq!(
        one(
            &c,
            "SELECT get_shard_id_for_distribution_column('countries')"
        )
        .await
        .unwrap(),
        Some(sr[0].0.to_string())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_pg_partition_places_rows_as_native_hash_partitions_would() {
    let env = fleet(2).await;
    let c = env.client().await;
    script(
        &c,
        "CREATE TABLE events (tenant text, n int);
         INSERT INTO events SELECT 'tenant-' || g, g FROM generate_series(1, 500) g;
         SELECT create_distributed_table('events', 'tenant', shard_count => 5,
                                         distribution_plugin => 'hash-pg-partition');",
    )
    .await
    .unwrap();
    let s = shards(&c, "events").await;
    assert_eq!(s.len(), 5);
    let mut total = 0;
    for (id, idx, _, _, group) in &s {
        let w = env.worker(worker_of_group(&env, &c, *group).await).await;
        script(
            &w,
            "CREATE TABLE IF NOT EXISTS hp_parent (tenant text) PARTITION BY HASH (tenant)",
        )
        .await
        .unwrap();
        total += count(&w, &format!("SELECT count(*) FROM events_{id}")).await;
        let wrong = count(
            &w,
            &format!(
                "SELECT count(*) FROM events_{id}
                 WHERE NOT satisfies_hash_partition('hp_parent'::regclass, 5, {idx}, tenant)"
            ),
        )
        .await;
        assert_eq!(
            wrong, 0,
            "shard index {idx} holds what remainder {idx} would"
        );
    }
    assert_eq!(total, 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_error_and_leaves_the_catalog_unchanged() {
    let env = fleet(2).await;
    let c = env.client().await;
    script(
        &c,
        "CREATE TABLE t (id int8 PRIMARY KEY, amount numeric, email text, UNIQUE (email));
         CREATE TABLE ok (id int8);
         CREATE TABLE other (k int4);
         SELECT create_distributed_table('ok', 'id', shard_count => 4);
         SELECT create_distributed_table('other', 'k', shard_count => 4);",
    )
    .await
    .unwrap();
    let before = (
        count(&c, "SELECT count(*) FROM shardgate.pg_dist_partition").await,
        count(&c, "SELECT count(*) FROM shardgate.pg_dist_shard").await,
        count(&c, "SELECT count(*) FROM shardgate.pg_dist_colocation").await,
        count(&c, "SELECT count(*) FROM shardgate.pg_dist_node").await,
    );
    let cases: &[(&str, &str)] = &[
        ("SELECT create_distributed_table('nope', 'id')", "42P01"),
        ("SELECT create_distributed_table('ok2', 'id')", "42P01"),
        ("SELECT create_distributed_table('t', 'nope')", "42703"),
        ("SELECT create_distributed_table('t', 'amount')", "42883"),
        ("SELECT create_distributed_table('t', 'id')", "42P16"), // UNIQUE (email) lacks id
        ("SELECT create_distributed_table('ok', 'id')", "42P16"), // already distributed
        ("SELECT create_distributed_table('other', 'k')", "42P16"),
        (
            "SELECT create_distributed_table('ok', 'id', colocate_with => 'other')",
            "42P16",
        ),
        (
            "SELECT create_distributed_table('t', 'id', shard_count => 0)",
            "22023",
        ),
        (
            "SELECT create_distributed_table('t', 'id', distribution_plugin => 'nope')",
            "42704",
        ),
        (
            "SELECT create_distributed_table('t', 'id', distribution_type => 'range')",
            "0A000",
        ),
        ("SELECT create_distributed_table('t')", "42883"),
        (
            "SELECT create_distributed_table('t', 'id', bogus => 1)",
            "42883",
        ),
        (
            "SELECT create_distributed_table(now()::text, 'id')",
            "0A000",
        ),
        (
            "SELECT get_shard_id_for_distribution_column('ok', 'abc')",
            "22P02",
        ),
        (
            "SELECT get_shard_id_for_distribution_column('t', 1)",
            "22023",
        ),
        ("SELECT undistribute_table('t')", "22023"),
        ("SELECT citus_remove_node('127.0.0.1', 1)", "42704"),
        ("SELECT create_reference_table('nope')", "42P01"),
        ("SELECT 1; SELECT create_reference_table('t')", "0A000"),
    ];
    for (sql, want) in cases {
        let e = c.batch_execute(sql).await.expect_err(sql);
        assert_eq!(&code(&e), want, "{sql}: {e:?}");
    }
    // A column of another type than the group's, and a different shard count.
    c.batch_execute("CREATE TABLE t2 (k int8)").await.unwrap();
    let e = c
        .batch_execute("SELECT create_distributed_table('t2', 'k', colocate_with => 'other')")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "22023");
    let msg = e.as_db_error().unwrap().message();
    assert!(msg.contains("types don't match"), "{msg}");
    c.batch_execute("CREATE TABLE t3 (k int4)").await.unwrap();
    let e = c
        .batch_execute("SELECT create_distributed_table('t3', 'k', colocate_with => 'other', shard_count => 8)")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "22023");
    // A node that is down.
    let dead = shardgate::dev::fleet::free_port().unwrap();
    let e = c
        .batch_execute(&format!("SELECT citus_add_node('127.0.0.1', {dead})"))
        .await
        .unwrap_err();
    assert_eq!(code(&e), "08006", "{e:?}");
    let after = (
        count(&c, "SELECT count(*) FROM shardgate.pg_dist_partition").await,
        count(&c, "SELECT count(*) FROM shardgate.pg_dist_shard").await,
        count(&c, "SELECT count(*) FROM shardgate.pg_dist_colocation").await,
        count(&c, "SELECT count(*) FROM shardgate.pg_dist_node").await,
    );
    assert_eq!(before, after, "catalog unchanged by failed calls");
    assert_eq!(shard_tables(&env, "t").await, 0);
    assert_eq!(shard_tables(&env, "t2").await, 0);
    assert_eq!(prepared_left(&env).await, 0);
    // The session is fine afterwards.
    assert_eq!(one(&c, "SELECT 7").await.unwrap().as_deref(), Some("7"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_is_down_fails_the_call_and_changes_nothing() {
    let env = fleet(2).await;
    let c = env.client().await;
    // A third node that existed when registered and is gone now.
    let (node, _dir) = shardgate_tests::start_node(&Default::default());
    node.psql("postgres", &format!("CREATE DATABASE {}", env.db))
        .unwrap();
    one(
        &c,
        &format!("SELECT citus_add_node('127.0.0.1', {})", node.port),
    )
    .await
    .unwrap();
    node.stop("immediate").unwrap();
    c.batch_execute("CREATE TABLE t (id int8); INSERT INTO t VALUES (1), (2), (3)")
        .await
        .unwrap();
    let e = c
        .batch_execute("SELECT create_distributed_table('t', 'id', shard_count => 6)")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "08006", "{e:?}");
    assert_eq!(
        count(&c, "SELECT count(*) FROM shardgate.pg_dist_partition").await,
        0
    );
    assert_eq!(shard_tables(&env, "t").await, 0);
    assert_eq!(
        count(&env.direct().await, "SELECT count(*) FROM t").await,
        3,
        "rows stay"
    );
    assert_eq!(prepared_left(&env).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_reaches_every_shard_all_or_nothing() {
    let env = fleet(2).await;
    let c = env.client().await;
    script(
        &c,
        "CREATE TABLE t (id int8 PRIMARY KEY, v text);
         INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 100) g;
         SELECT create_distributed_table('t', 'id', shard_count => 4);
         CREATE TABLE r (k text PRIMARY KEY);
         SELECT create_reference_table('r');",
    )
    .await
    .unwrap();
    let s = shards(&c, "t").await;
    let on_every_shard = |sql: String| {
        let env = &env;
        let s = s.clone();
        let c = &c;
        async move {
            let mut n = 0;
            for (id, _, _, _, g) in &s {
                let w = env.worker(worker_of_group(env, c, *g).await).await;
                n += count(
                    &w,
                    &sql.replace("{shard}", &format!("t_{id}"))
                        .replace("{id}", &id.to_string()),
                )
                .await;
            }
            n
        }
    };
    let col = |name: &'static str| {
        format!(
            "SELECT count(*) FROM information_schema.columns WHERE table_name = '{{shard}}' AND column_name = '{name}'"
        )
    };

    c.batch_execute("ALTER TABLE t ADD COLUMN extra int DEFAULT 5")
        .await
        .unwrap();
    assert_eq!(on_every_shard(col("extra")).await, 4);
    assert_eq!(
        on_every_shard("SELECT count(*) FROM {shard} WHERE extra <> 5".into()).await,
        0
    );
    c.batch_execute("CREATE INDEX t_v_idx ON t (v)")
        .await
        .unwrap();
    assert_eq!(
        on_every_shard("SELECT count(*) FROM pg_indexes WHERE tablename = '{shard}' AND indexname = 't_v_idx_{id}'".into()).await,
        4
    );
    c.batch_execute("CREATE INDEX ON t (extra)").await.unwrap();
    assert_eq!(
        on_every_shard("SELECT count(*) FROM pg_indexes WHERE tablename = '{shard}' AND indexname = 't_extra_idx_{id}'".into()).await,
        4
    );
    c.batch_execute("ALTER TABLE t ADD CONSTRAINT v_not_empty CHECK (v <> '')")
        .await
        .unwrap();
    assert_eq!(
        on_every_shard(
            "SELECT count(*) FROM pg_constraint WHERE conname = 'v_not_empty_{id}'".into()
        )
        .await,
        4
    );
    c.batch_execute("ALTER TABLE t DROP CONSTRAINT v_not_empty")
        .await
        .unwrap();
    assert_eq!(
        on_every_shard(
            "SELECT count(*) FROM pg_constraint WHERE conname = 'v_not_empty_{id}'".into()
        )
        .await,
        0
    );
    c.batch_execute("ALTER TABLE t ALTER COLUMN extra TYPE bigint")
        .await
        .unwrap();
    assert_eq!(
        on_every_shard("SELECT count(*) FROM information_schema.columns WHERE table_name = '{shard}' AND column_name = 'extra' AND data_type = 'bigint'".into()).await,
        4
    );
    // DROP INDEX reaches the shards' copies of the index.
    c.batch_execute("DROP INDEX t_v_idx").await.unwrap();
    assert_eq!(
        on_every_shard("SELECT count(*) FROM pg_indexes WHERE tablename = '{shard}' AND indexname = 't_v_idx_{id}'".into()).await,
        0
    );
    // Names longer than Postgres's 63 bytes once suffixed stay distinct per shard.
    c.batch_execute(
        "CREATE INDEX an_index_name_that_is_long_enough_to_need_cutting_down_x ON t (v)",
    )
    .await
    .unwrap();
    assert_eq!(
        on_every_shard("SELECT count(*) FROM pg_indexes WHERE tablename = '{shard}' AND indexname LIKE 'an\\_index\\_name%'".into()).await,
        4
    );
    // Column-level uniqueness would escape the checks: refused.
    let e = c
        .batch_execute("ALTER TABLE t ADD COLUMN u int UNIQUE")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "0A000");
    // The distribution column cannot change.
    let e = c
        .batch_execute("ALTER TABLE t DROP COLUMN id")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "0A000");
    // A unique index without the distribution column is refused.
    let e = c
        .batch_execute("CREATE UNIQUE INDEX ON t (v)")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "42P16");

    // All or nothing: one shard already has the column, so the ALTER fails there and
    // nowhere else changes (nor the coordinator).
    let (first, _, _, _, g) = s[2].clone();
    let w = env.worker(worker_of_group(&env, &c, g).await).await;
    w.batch_execute(&format!("ALTER TABLE t_{first} ADD COLUMN clash int"))
        .await
        .unwrap();
    let e = c
        .batch_execute("ALTER TABLE t ADD COLUMN clash int")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "42701", "{e:?}");
    assert!(
        e.as_db_error()
            .unwrap()
            .detail()
            .unwrap_or("")
            .contains("node"),
        "names the node"
    );
    assert_eq!(
        on_every_shard(col("clash")).await,
        1,
        "only the diverged shard"
    );
    assert_eq!(
        count(&env.direct().await, "SELECT count(*) FROM information_schema.columns WHERE table_name = 't' AND column_name = 'clash'").await,
        0
    );
    assert_eq!(prepared_left(&env).await, 0);

    // DDL inside a transaction block: refused, and the transaction is aborted as
    // Postgres would abort it.
    c.batch_execute("BEGIN").await.unwrap();
    let e = c
        .batch_execute("ALTER TABLE t ADD COLUMN later int")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "25001");
    let e = c.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(code(&e), "25P02");
    c.batch_execute("ROLLBACK").await.unwrap();

    // TRUNCATE reaches the shards and the reference table's copies.
    c.batch_execute("TRUNCATE t, r").await.unwrap();
    assert_eq!(
        on_every_shard("SELECT count(*) FROM {shard}".into()).await,
        0
    );
    // DROP TABLE removes the shards and the catalog rows.
    c.batch_execute("DROP TABLE t").await.unwrap();
    assert_eq!(shard_tables(&env, "t").await, 0);
    assert_eq!(
        count(&c, "SELECT count(*) FROM shardgate.pg_dist_partition").await,
        1
    );
    c.batch_execute("DROP TABLE r").await.unwrap();
    assert_eq!(shard_tables(&env, "r").await, 0);
    assert_eq!(
        count(&c, "SELECT count(*) FROM shardgate.pg_dist_shard").await,
        0
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM shardgate.pg_dist_colocation").await,
        0
    );
    assert_eq!(prepared_left(&env).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undistribute_brings_the_rows_back() {
    let env = fleet(2).await;
    let c = env.client().await;
    script(
        &c,
        "CREATE TABLE t (id int8, v text);
         INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 300) g;
         SELECT create_distributed_table('t', 'id', shard_count => 4);",
    )
    .await
    .unwrap();
    assert_eq!(
        count(&env.direct().await, "SELECT count(*) FROM t").await,
        0
    );
    c.batch_execute("SELECT undistribute_table('t')")
        .await
        .unwrap();
    let d = env.direct().await;
    assert_eq!(count(&d, "SELECT count(*) FROM t").await, 300);
    assert_eq!(
        count(&d, "SELECT count(*) FROM t WHERE v <> 'v' || id").await,
        0
    );
    d.batch_execute("INSERT INTO t VALUES (0, 'v0'); DELETE FROM t WHERE id = 0")
        .await
        .expect("a local table again: writable");
    assert_eq!(shard_tables(&env, "t").await, 0);
    assert_eq!(
        count(&c, "SELECT count(*) FROM shardgate.pg_dist_partition").await,
        0
    );
    // And it can be distributed again.
    c.batch_execute("SELECT create_distributed_table('t', 'id', shard_count => 2)")
        .await
        .unwrap();
    assert_eq!(shard_tables(&env, "t").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_are_added_and_removed_with_their_reference_tables() {
    let env = fleet(1).await;
    let c = env.client().await;
    script(
        &c,
        "CREATE TABLE r (k int PRIMARY KEY, v text);
         INSERT INTO r SELECT g, 'x' FROM generate_series(1, 20) g;
         SELECT create_reference_table('r');
         CREATE TABLE h (k int8);
         CREATE TABLE a1 (x int);
         CREATE TABLE b1 (x int PRIMARY KEY);
         ALTER TABLE a1 ADD CONSTRAINT a1_b1 FOREIGN KEY (x) REFERENCES b1 (x);
         SELECT create_reference_table('b1');
         SELECT create_reference_table('a1');
         SELECT citus_set_coordinator_host('127.0.0.1');",
    )
    .await
    .unwrap();
    // The second worker of the harness, with the test database.
    let port = shardgate_tests::workers()[1].node.port;
    shardgate_tests::workers()[1]
        .node
        .psql("postgres", &format!("CREATE DATABASE {}", env.db))
        .unwrap();
    let id = one(&c, &format!("SELECT citus_add_node('127.0.0.1', {port})"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        one(&c, &format!("SELECT citus_add_node('127.0.0.1', {port})"))
            .await
            .unwrap()
            .unwrap(),
        id,
        "adding twice returns the same node"
    );
    let shard = count(
        &c,
        "SELECT shardid FROM shardgate.pg_dist_shard WHERE logicalrelid = 'r'::regclass",
    )
    .await;
    let w = shardgate_tests::connect(&format!(
        "host=127.0.0.1 port={port} user=postgres dbname={} sslmode=disable",
        env.db
    ))
    .await
    .unwrap();
    assert_eq!(
        count(&w, &format!("SELECT count(*) FROM r_{shard}")).await,
        20
    );
    // Reference tables whose foreign keys point at later ones were copied too.
    assert_eq!(
        count(
            &w,
            "SELECT count(*) FROM pg_constraint WHERE conname LIKE 'a1\\_b1\\_%'"
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM shardgate.pg_dist_node WHERE groupid = 0 AND NOT shouldhaveshards"
        )
        .await,
        1,
        "the coordinator is registered in group 0 without shards"
    );
    // A node with hash shards cannot go.
    c.batch_execute("SELECT create_distributed_table('h', 'k', shard_count => 4)")
        .await
        .unwrap();
    let e = c
        .batch_execute(&format!("SELECT citus_remove_node('127.0.0.1', {port})"))
        .await
        .unwrap_err();
    assert_eq!(code(&e), "55000");
    c.batch_execute("SELECT undistribute_table('h')")
        .await
        .unwrap();
    c.batch_execute(&format!("SELECT citus_remove_node('127.0.0.1', {port})"))
        .await
        .unwrap();
    assert_eq!(
        count(
            &w,
            "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'r\\_%'"
        )
        .await,
        0
    );
    // The last copy of a reference table cannot go with its node.
    let e = c
        .batch_execute(&format!(
            "SELECT citus_remove_node('127.0.0.1', {})",
            env.worker_ports[0]
        ))
        .await
        .unwrap_err();
    assert_eq!(code(&e), "55000", "{e:?}");
    assert_eq!(
        count(
            &c,
            &format!("SELECT count(*) FROM shardgate.pg_dist_node WHERE nodeport = {port}")
        )
        .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_catalog_survives_a_restart_and_two_routers_agree_within_a_second() {
    let env = fleet(2).await;
    let other = env.second_router().await;
    let c = env.client().await;
    script(
        &c,
        "CREATE TABLE t (id int8); SELECT create_distributed_table('t', 'id', shard_count => 3)",
    )
    .await
    .unwrap();
    // The router that made the change knows at once; the other within a second.
    assert_eq!(env.router.ctx().catalog.snapshot().tables.len(), 1);
    let start = Instant::now();
    while other.ctx().catalog.snapshot().tables.len() != 1 {
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "second router did not see the change"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A change made through the second router reaches the first.
    let c2 = shardgate_tests::connect(&format!(
        "host=127.0.0.1 port={} user=postgres dbname={} sslmode=disable",
        other.local_addr().port(),
        env.db
    ))
    .await
    .unwrap();
    script(&c2, "CREATE TABLE u (id int8); SELECT create_distributed_table('u', 'id', colocate_with => 't')")
        .await
        .unwrap();
    let start = Instant::now();
    while env.router.ctx().catalog.snapshot().tables.len() != 2 {
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "first router did not see the change"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // DDL through the first router on the table the second one distributed.
    c.batch_execute("ALTER TABLE u ADD COLUMN x int")
        .await
        .unwrap();
    other.abort();
    // A fresh router reads the same catalog.
    let third = env.second_router().await;
    let snap = third.ctx().catalog.snapshot();
    assert_eq!(snap.tables.len(), 2);
    let t = snap.tables.values().find(|t| t.name == "u").unwrap();
    assert_eq!(t.shards.len(), 3);
    assert_eq!(t.column.as_deref(), Some("id"));
    third.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_functions_work_through_the_extended_protocol() {
    let env = fleet(2).await;
    let c = env.client().await;
    c.batch_execute("CREATE TABLE t (id int8, v text)")
        .await
        .unwrap();
    c.batch_execute("INSERT INTO t SELECT g, 'x' FROM generate_series(1, 40) g")
        .await
        .unwrap();
    // tokio-postgres: prepare (Parse + Describe) then Bind/Execute with binary values.
    let n = c
        .execute(
            "SELECT create_distributed_table($1, $2, shard_count => $3)",
            &[&"t", &"id", &4i32],
        )
        .await
        .unwrap();
    assert_eq!(n, 1);
    let sid: i64 = c
        .query_one(
            "SELECT get_shard_id_for_distribution_column($1, $2)",
            &[&"t", &"7"],
        )
        .await
        .unwrap()
        .get(0);
    let simple = one(&c, "SELECT get_shard_id_for_distribution_column('t', 7)")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sid.to_string(), simple);
    let rows = c
        .query("SELECT * FROM shardgate_reload_plugins()", &[])
        .await
        .unwrap();
    assert!(rows.iter().any(|r| r.get::<_, String>(0) == "hash-citus"));
    // Errors keep their SQLSTATE and the session goes on.
    let e = c
        .execute("SELECT create_distributed_table($1, $2)", &[&"nope", &"id"])
        .await
        .unwrap_err();
    assert_eq!(code(&e), "42P01");
    // A driver: psycopg 3 (text-format parameters, one batch per call).
    let script = format!(
        r#"
import psycopg
with psycopg.connect("host=127.0.0.1 port={port} user=postgres dbname={db}", autocommit=True) as conn:
    conn.execute("CREATE TABLE p (k text, n int)")
    conn.execute("INSERT INTO p SELECT 'k' || g, g FROM generate_series(1, 30) g")
    conn.execute("SELECT create_distributed_table(%s, %s, shard_count => %s)", ("p", "k", 3))
    (sid,) = conn.execute("SELECT get_shard_id_for_distribution_column(%s, %s)", ("p", "k5")).fetchone()
    print(sid)
"#,
        port = env.port(),
        db = env.db
    );
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(&script)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sid = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let simple = one(&c, "SELECT get_shard_id_for_distribution_column('p', 'k5')")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sid, simple);
    assert_eq!(shard_tables(&env, "p").await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_keys_point_at_the_shard_beside_them() {
    let env = fleet(2).await;
    let c = env.client().await;
    script(
        &c,
        "CREATE TABLE countries (code text PRIMARY KEY);
         CREATE TABLE accounts (id int8 PRIMARY KEY, country text REFERENCES countries (code));
         CREATE TABLE orders (account_id int8 REFERENCES accounts (id), n int);
         CREATE TABLE loose (id int8 REFERENCES accounts (id));
         SELECT create_reference_table('countries');
         SELECT create_distributed_table('accounts', 'id', shard_count => 4);
         SELECT create_distributed_table('orders', 'account_id', colocate_with => 'accounts')",
    )
    .await
    .unwrap();
    // Not colocated: refused.
    let e = c
        .batch_execute("SELECT create_distributed_table('loose', 'id', colocate_with => 'none')")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "0A000", "{e:?}");
    let country = shards(&c, "countries").await[0].0;
    let (sa, so) = (shards(&c, "accounts").await, shards(&c, "orders").await);
    for (a, o) in sa.iter().zip(&so) {
        let w = env.worker(worker_of_group(&env, &c, a.4).await).await;
        let refs: Vec<String> = w
            .query(
                "SELECT confrelid::regclass::text FROM pg_constraint WHERE contype = 'f' AND conrelid = $1::text::regclass",
                &[&format!("accounts_{}", a.0)],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(refs, vec![format!("countries_{country}")]);
        let refs: Vec<String> = w
            .query(
                "SELECT confrelid::regclass::text FROM pg_constraint WHERE contype = 'f' AND conrelid = $1::text::regclass",
                &[&format!("orders_{}", o.0)],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(refs, vec![format!("accounts_{}", a.0)], "same shard index");
        let e = w
            .batch_execute(&format!("INSERT INTO orders_{} VALUES (12345, 1)", o.0))
            .await
            .unwrap_err();
        assert_eq!(code(&e), "23503", "enforced on the shard");
    }
    // A foreign key added later goes the same way.
    c.batch_execute("CREATE TABLE items (account_id int8, sku text)")
        .await
        .unwrap();
    c.batch_execute(
        "SELECT create_distributed_table('items', 'account_id', colocate_with => 'accounts')",
    )
    .await
    .unwrap();
    c.batch_execute("ALTER TABLE items ADD CONSTRAINT items_account_fk FOREIGN KEY (account_id) REFERENCES accounts (id)")
        .await
        .unwrap();
    let si = shards(&c, "items").await;
    let w = env.worker(worker_of_group(&env, &c, si[1].4).await).await;
    let r: String = w
        .query_one(
            "SELECT confrelid::regclass::text FROM pg_constraint WHERE conname = $1",
            &[&format!("items_account_fk_{}", si[1].0)],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(r, format!("accounts_{}", sa[1].0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_finishes_admin_transactions_a_crash_left_prepared() {
    let env = fleet(2).await;
    let w = env.worker(0).await;
    w.batch_execute("CREATE TABLE landed (x int)")
        .await
        .unwrap();
    // A change whose coordinator committed (a commit record) and one that never did.
    // Set up under the catalog lock, as a coordinator does: the router's own recovery
    // pass must not see the first one prepared before its record exists (it would
    // rightly roll it back as abandoned).
    let coord = env.direct().await;
    coord
        .batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock({})",
            shardgate::catalog::CATALOG_LOCK
        ))
        .await
        .unwrap();
    w.batch_execute(
        "BEGIN; INSERT INTO landed VALUES (1); PREPARE TRANSACTION 'sg_admin_00000000000000aa_1'",
    )
    .await
    .unwrap();
    w.batch_execute(
        "BEGIN; INSERT INTO landed VALUES (2); PREPARE TRANSACTION 'sg_admin_00000000000000bb_1'",
    )
    .await
    .unwrap();
    coord
        .batch_execute(
            "INSERT INTO shardgate.pg_dist_transaction VALUES (1, 'sg_admin_00000000000000aa_1'); COMMIT",
        )
        .await
        .unwrap();
    let catalog = &env.router.ctx().catalog;
    let r = shardgate::admin::recover(catalog.login(), &env.db, Duration::ZERO)
        .await
        .unwrap();
    // The router's own passes (at start, then every 30 s) may have taken either one
    // already: the unrecorded one needs no grace period, the recorded one 30 s (a slow,
    // loaded machine gets there). What matters is the end state below.
    assert!(r.committed <= 1 && r.rolled_back <= 1, "{r:?}");
    let rows: Vec<i32> = w
        .query("SELECT x FROM landed ORDER BY x", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        rows,
        vec![1],
        "the recorded change committed, the other rolled back"
    );
    assert_eq!(
        prepared_left(&env).await,
        0,
        "nothing prepared, no record left"
    );
}
