//! The planner tiers (world `shardgate:planner@0.1.0`) through the plugin host: which
//! statements the fast path (`planner-fastpath`) and the router tier (`planner-router`)
//! plan (keys and SQL templates), which they leave to other tiers, which they refuse;
//! the host's validation of plans; that Postgres accepts the fast path's templates once
//! `{t0}` is a real table; and the router tier over `../shared/citus_corpus` (what it
//! plans of the single-shard queries, and that it never plans a multi-shard one).

use shardgate::plugin::{
    Combiner, LimitMerge, Limits, Literal, LoadedPlugin, MergeKind, PlanOutcome, PlanTarget,
    PlanTemplate, PlannerPlugin, PlannerTable, PlannerTableKind, PluginError, PluginHost, ShardKey,
    SortKey, builtin, validate_plan,
};
use shardgate_tests::TestEnv;
use std::sync::{Arc, OnceLock};

/// One host and one loaded planner for the whole file (compiling the component is the
/// slow part).
fn planner() -> &'static PlannerPlugin {
    static P: OnceLock<(PluginHost, Arc<PlannerPlugin>)> = OnceLock::new();
    let (_, p) = P.get_or_init(|| {
        let host = PluginHost::new(None, Limits::default()).expect("plugin host");
        let p = match host.load("planner-fastpath", builtin::PLANNER_FASTPATH) {
            Ok(LoadedPlugin::Planner(p)) => p,
            other => panic!("planner-fastpath loads as a planner: {other:?}"),
        };
        (host, p)
    });
    p
}

/// The router tier, loaded once like [`planner`].
fn router() -> &'static PlannerPlugin {
    static P: OnceLock<(PluginHost, Arc<PlannerPlugin>)> = OnceLock::new();
    let (_, p) = P.get_or_init(|| {
        let host = PluginHost::new(None, Limits::default()).expect("plugin host");
        let p = match host.load("planner-router", builtin::PLANNER_ROUTER) {
            Ok(LoadedPlugin::Planner(p)) => p,
            other => panic!("planner-router loads as a planner: {other:?}"),
        };
        (host, p)
    });
    p
}

fn table(
    schema: &str,
    name: &str,
    kind: PlannerTableKind,
    dist: Option<&str>,
    colocation_id: i32,
    shard_count: u32,
) -> PlannerTable {
    PlannerTable {
        name: name.into(),
        schema: schema.into(),
        kind,
        distribution_column: dist.map(Into::into),
        colocation_id,
        shard_count,
        columns: Vec::new(),
    }
}

/// The catalog view of every case.
fn catalog() -> Vec<PlannerTable> {
    use PlannerTableKind::*;
    vec![
        table("public", "orders", Distributed, Some("tenant_id"), 1, 4),
        table("public", "countries", Reference, None, 0, 1),
        table("app", "items", Distributed, Some("id"), 1, 4),
        table("public", "Events", Distributed, Some("Tenant"), 2, 8),
        table("public", "settings", Local, None, 0, 1),
        table("public", "users", Distributed, Some("id"), 1, 4),
    ]
}

fn plan(sql: &str) -> Result<PlanOutcome, PluginError> {
    planner().plan(sql, &[], &catalog())
}

fn int(v: i64) -> ShardKey {
    ShardKey::Value(Literal::Int8(v))
}

fn text(v: &str) -> ShardKey {
    ShardKey::Value(Literal::Text(v.into()))
}

/// Statements the fast path plans: (SQL, target table index, key, template).
fn planned_cases() -> Vec<(&'static str, u32, ShardKey, &'static str)> {
    vec![
        // SELECT: literal and parameter keys, either side, extra conditions.
        (
            "SELECT * FROM orders WHERE tenant_id = 42",
            0,
            int(42),
            "SELECT * FROM {t0} AS orders WHERE tenant_id = 42",
        ),
        (
            "select id, note from orders where tenant_id = $1 and id > $2",
            0,
            ShardKey::Param(0),
            "SELECT id, note FROM {t0} AS orders WHERE tenant_id = $1 AND id > $2",
        ),
        (
            "SELECT * FROM orders WHERE id > $1 AND $2 = tenant_id",
            0,
            ShardKey::Param(1),
            "SELECT * FROM {t0} AS orders WHERE id > $1 AND $2 = tenant_id",
        ),
        (
            "SELECT * FROM orders WHERE (tenant_id = -7 AND (id = 1 OR id = 2))",
            0,
            int(-7),
            "SELECT * FROM {t0} AS orders WHERE (tenant_id = -7 AND (id = 1 OR id = 2))",
        ),
        // An alias, qualified columns, GROUP BY / ORDER BY / LIMIT.
        (
            "SELECT o.id, count(*) FROM orders o WHERE o.tenant_id = 5 GROUP BY o.id ORDER BY 2 DESC LIMIT 10",
            0,
            int(5),
            "SELECT o.id, count(*) FROM {t0} AS o WHERE o.tenant_id = 5 GROUP BY o.id ORDER BY 2 DESC LIMIT 10",
        ),
        (
            "SELECT orders.note FROM orders WHERE orders.tenant_id = $1 FOR UPDATE",
            0,
            ShardKey::Param(0),
            "SELECT orders.note FROM {t0} AS orders WHERE orders.tenant_id = $1 FOR UPDATE",
        ),
        // Schema-qualified; the schema is left out of the template.
        (
            "SELECT name FROM app.items WHERE id = '17'",
            2,
            text("17"),
            "SELECT name FROM {t0} AS items WHERE id = '17'",
        ),
        (
            "SELECT name FROM APP.Items i WHERE i.ID = 17::bigint",
            2,
            int(17),
            "SELECT name FROM {t0} AS i WHERE i.ID = 17::BIGINT",
        ),
        // Quoted identifiers keep their case; a uuid stays text.
        (
            r#"SELECT payload FROM "Events" WHERE "Tenant" = 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'"#,
            3,
            text("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            r#"SELECT payload FROM {t0} AS "Events" WHERE "Tenant" = 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'"#,
        ),
        // A string literal holding the table's name is untouched.
        (
            r#"SELECT 'Events', 'FROM "Events" Events' AS t FROM "Events" WHERE "Tenant" = 'Events'"#,
            3,
            text("Events"),
            r#"SELECT 'Events', 'FROM "Events" Events' AS t FROM {t0} AS "Events" WHERE "Tenant" = 'Events'"#,
        ),
        // A subquery without tables is fine.
        (
            "SELECT * FROM orders WHERE tenant_id = 1 AND id = (SELECT 2)",
            0,
            int(1),
            "SELECT * FROM {t0} AS orders WHERE tenant_id = 1 AND id = (SELECT 2)",
        ),
        // UPDATE and DELETE, with RETURNING.
        (
            "UPDATE orders SET note = 'x', amount = amount + $2 WHERE tenant_id = $1 AND id = 3 RETURNING id",
            0,
            ShardKey::Param(0),
            "UPDATE {t0} AS orders SET note = 'x', amount = amount + $2 WHERE tenant_id = $1 AND id = 3 RETURNING id",
        ),
        (
            "UPDATE public.orders AS o SET note = o.note || '!' WHERE o.tenant_id = 9",
            0,
            int(9),
            "UPDATE {t0} AS o SET note = o.note || '!' WHERE o.tenant_id = 9",
        ),
        (
            "DELETE FROM orders WHERE tenant_id = 3 RETURNING *",
            0,
            int(3),
            "DELETE FROM {t0} AS orders WHERE tenant_id = 3 RETURNING *",
        ),
        (
            "DELETE FROM app.items WHERE $1 = id",
            2,
            ShardKey::Param(0),
            "DELETE FROM {t0} AS items WHERE $1 = id",
        ),
        // INSERT of one row: the key from the row.
        (
            "INSERT INTO orders (tenant_id, id, note) VALUES (42, 1, 'a')",
            0,
            int(42),
            "INSERT INTO {t0} AS orders (tenant_id, id, note) VALUES (42, 1, 'a')",
        ),
        (
            "INSERT INTO orders (id, tenant_id) VALUES ($1, $2) RETURNING id",
            0,
            ShardKey::Param(1),
            "INSERT INTO {t0} AS orders (id, tenant_id) VALUES ($1, $2) RETURNING id",
        ),
        (
            "INSERT INTO orders (tenant_id, id, note) VALUES ($1, $2, $3) ON CONFLICT (tenant_id, id) DO UPDATE SET note = excluded.note || orders.note",
            0,
            ShardKey::Param(0),
            "INSERT INTO {t0} AS orders (tenant_id, id, note) VALUES ($1, $2, $3) ON CONFLICT(tenant_id, id) DO UPDATE SET note = excluded.note || orders.note",
        ),
        (
            "INSERT INTO app.items AS x (id, name) VALUES ('5', 'five') ON CONFLICT DO NOTHING",
            2,
            text("5"),
            "INSERT INTO {t0} AS x (id, name) VALUES ('5', 'five') ON CONFLICT DO NOTHING",
        ),
        (
            r#"INSERT INTO "Events" ("Tenant", payload) VALUES ('t1', 'Events')"#,
            3,
            text("t1"),
            r#"INSERT INTO {t0} AS "Events" ("Tenant", payload) VALUES ('t1', 'Events')"#,
        ),
    ]
}

#[test]
fn the_fast_path_plans_single_shard_statements() {
    assert_eq!(planner().name(), "planner-fastpath");
    for (sql, table, key, template) in planned_cases() {
        let got = plan(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        let want = PlanOutcome::Plan(PlanTemplate {
            targets: vec![PlanTarget { table, key }],
            sql_template: template.into(),
            merge: MergeKind::SingleShard,
        });
        assert_eq!(got, want, "{sql}");
    }
    // Booleans are literals too (the router converts by column type).
    let Ok(PlanOutcome::Plan(p)) = plan("DELETE FROM orders WHERE tenant_id = true") else {
        panic!("a boolean key");
    };
    assert_eq!(p.targets[0].key, ShardKey::Value(Literal::Boolean(true)));
}

#[test]
fn other_statements_are_not_mine() {
    let cases = [
        (
            "SELECT * FROM orders WHERE tenant_id = 1 OR tenant_id = 2",
            "OR",
        ),
        ("SELECT * FROM orders WHERE tenant_id IN (1, 2)", "IN"),
        ("SELECT * FROM orders WHERE tenant_id IN (1)", "IN"),
        ("SELECT * FROM orders WHERE id = 1", "no key"),
        ("SELECT * FROM orders", "no WHERE"),
        ("SELECT * FROM orders WHERE tenant_id = id", "no key"),
        ("SELECT * FROM orders WHERE tenant_id = 1 + 1", "no key"),
        ("SELECT * FROM orders WHERE tenant_id > 1", "no key"),
        ("SELECT * FROM orders WHERE tenant_id = NULL", "NULL"),
        ("SELECT * FROM orders WHERE (id = 1 OR tenant_id = 2)", "OR"),
        (
            "SELECT * FROM orders o WHERE orders.tenant_id = 1",
            "no key",
        ),
        (
            "SELECT * FROM orders o JOIN users u ON u.id = o.tenant_id WHERE o.tenant_id = 1",
            "2 table references",
        ),
        (
            "SELECT * FROM orders, users WHERE tenant_id = 1",
            "2 table references",
        ),
        (
            "SELECT * FROM orders WHERE tenant_id = 1 AND id IN (SELECT id FROM users)",
            "2 table references",
        ),
        (
            "SELECT * FROM orders WHERE tenant_id = 1 AND id = (SELECT max(id) FROM orders)",
            "2 table references",
        ),
        (
            "SELECT * FROM countries WHERE code = 'fr'",
            "reference table",
        ),
        ("SELECT * FROM settings WHERE k = 1", "local table"),
        (
            "SELECT * FROM nowhere WHERE tenant_id = 1",
            "not in the catalog",
        ),
        ("SELECT 1", "0 table references"),
        (
            "INSERT INTO orders (tenant_id, id) VALUES (1, 1), (2, 2)",
            "multi-row INSERT",
        ),
        ("INSERT INTO orders VALUES (1, 1)", "column list"),
        (
            "INSERT INTO orders (tenant_id, id) VALUES (nextval('s'), 1)",
            "not a literal",
        ),
        (
            "INSERT INTO orders (tenant_id, id) SELECT 1, 2",
            "INSERT ... SELECT",
        ),
        (
            "SELECT id FROM orders WHERE tenant_id = 1 UNION SELECT id FROM orders WHERE tenant_id = 2",
            "2 table references",
        ),
        ("SELECT 1 UNION SELECT 2", "0 table references"),
        (
            "WITH u AS (SELECT id FROM users) SELECT * FROM orders WHERE tenant_id = 1 AND id IN (SELECT id FROM u)",
            "table references",
        ),
        (
            "WITH o AS (SELECT * FROM orders WHERE tenant_id = 1) SELECT * FROM o",
            "2 table references",
        ),
        ("UPDATE orders SET note = 'x' WHERE id = 1", "no key"),
        ("UPDATE orders SET note = 'x'", "no WHERE"),
        (
            "UPDATE orders SET note = u.name FROM users u WHERE u.id = orders.tenant_id AND orders.tenant_id = 1",
            "2 table references",
        ),
        ("DELETE FROM orders WHERE tenant_id IN ($1, $2)", "IN"),
        (
            "DELETE FROM orders USING users WHERE orders.tenant_id = 1",
            "2 table references",
        ),
        (
            "SELECT * FROM orders WHERE tenant_id = 1; SELECT 2",
            "2 statements",
        ),
        ("SELEKT 1", "does not parse"),
        ("SELECT * FROM orders WHERE tenant_id = 1.5", "no key"),
        (
            "SELECT * FROM orders WHERE tenant_id = 99999999999999999999",
            "no key",
        ),
        ("SELECT '{t0}' FROM orders WHERE tenant_id = 1", "`{t`"),
        ("TRUNCATE orders", "not a SELECT"),
        (
            "SELECT * INTO copy FROM orders WHERE tenant_id = 1",
            "SELECT INTO",
        ),
    ];
    for (sql, want) in cases {
        match plan(sql) {
            Ok(PlanOutcome::NotMine(reason)) => {
                assert!(reason.contains(want), "{sql}: {reason:?} lacks {want:?}")
            }
            other => panic!("{sql}: not-mine expected, got {other:?}"),
        }
    }
}

#[test]
fn statements_that_cannot_run_are_refused() {
    let cases = [
        (
            "UPDATE orders SET tenant_id = tenant_id + 1 WHERE tenant_id = 1",
            "cannot UPDATE the distribution column tenant_id",
        ),
        (
            "UPDATE orders o SET (note, Tenant_Id) = ('x', 2) WHERE o.tenant_id = 1",
            "cannot UPDATE the distribution column tenant_id",
        ),
        (
            "INSERT INTO orders (id, note) VALUES (1, 'a')",
            "must give its distribution column tenant_id",
        ),
        (
            "INSERT INTO orders (tenant_id, id) VALUES (NULL, 1)",
            "cannot be NULL",
        ),
        (
            "INSERT INTO orders (tenant_id, id) VALUES (1, 1) ON CONFLICT (tenant_id, id) DO UPDATE SET tenant_id = 2",
            "ON CONFLICT DO UPDATE cannot set the distribution column",
        ),
    ];
    for (sql, want) in cases {
        match plan(sql) {
            Err(PluginError::Rejected { name, message }) => {
                assert_eq!(name, "planner-fastpath");
                assert!(message.contains(want), "{sql}: {message:?} lacks {want:?}");
            }
            other => panic!("{sql}: rejected expected, got {other:?}"),
        }
    }
}

/// `SET tenant_id = <the row's own value>`, as ORMs that write every column send it:
/// planned, the new value an extra key of the table that the router checks (one shard,
/// or refused); the column set to itself or to `EXCLUDED.tenant_id` needs no check.
#[test]
fn setting_the_distribution_column_to_a_key_is_planned_with_that_key() {
    let cases = [
        (
            "UPDATE orders SET tenant_id = $1, note = $2 WHERE tenant_id = $1",
            vec![ShardKey::Param(0), ShardKey::Param(0)],
        ),
        (
            "UPDATE orders o SET note = 'x', TENANT_ID = 2 WHERE o.tenant_id = 1",
            vec![int(1), int(2)],
        ),
        (
            "UPDATE orders SET tenant_id = orders.tenant_id WHERE tenant_id = 1",
            vec![int(1)],
        ),
        (
            "INSERT INTO orders (tenant_id, id) VALUES (1, 1) ON CONFLICT (tenant_id, id) DO UPDATE SET tenant_id = EXCLUDED.tenant_id, note = 'y'",
            vec![int(1)],
        ),
    ];
    for (sql, keys) in cases {
        match plan(sql) {
            Ok(PlanOutcome::Plan(p)) => {
                let got: Vec<(u32, ShardKey)> =
                    p.targets.iter().map(|t| (t.table, t.key.clone())).collect();
                let want: Vec<(u32, ShardKey)> = keys.into_iter().map(|k| (0, k)).collect();
                assert_eq!(got, want, "{sql}");
                assert_eq!(p.sql_template.matches("{t0}").count(), 1, "{sql}");
            }
            other => panic!("{sql}: a plan expected, got {other:?}"),
        }
    }
}

#[test]
fn the_host_validates_plans() {
    let tables = catalog();
    let target = |table: u32, key: ShardKey| PlanTarget { table, key };
    let plan = |targets: Vec<PlanTarget>, sql: &str, merge: MergeKind| PlanTemplate {
        targets,
        sql_template: sql.into(),
        merge,
    };
    let single = MergeKind::SingleShard;
    let good = plan(
        vec![target(0, ShardKey::Param(0))],
        "SELECT * FROM {t0} WHERE tenant_id = $1",
        single.clone(),
    );
    assert_eq!(validate_plan(&good, &tables), Ok(()));
    // Colocated tables with one key; a fan-out with a sort merge.
    let join = plan(
        vec![target(0, int(1)), target(5, int(1))],
        "SELECT * FROM {t0} o JOIN {t1} u ON u.id = o.tenant_id",
        single.clone(),
    );
    assert_eq!(validate_plan(&join, &tables), Ok(()));
    // Tables of two colocation groups choose their shards apart (the router then
    // needs a node holding both, checked when the plan is bound).
    let groups = plan(
        vec![target(0, int(1)), target(3, int(2))],
        "SELECT * FROM {t0}, {t1}",
        single.clone(),
    );
    assert_eq!(validate_plan(&groups, &tables), Ok(()));
    // Colocated tables with keys of their own, and an extra key of a table that
    // appears: valid, checked when bound (one shard, or the statement is refused).
    for p in [
        plan(
            vec![target(0, int(1)), target(5, int(2))],
            "SELECT * FROM {t0}, {t1}",
            single.clone(),
        ),
        plan(
            vec![target(0, int(1)), target(0, ShardKey::Param(0))],
            "SELECT * FROM {t0} WHERE $1",
            single.clone(),
        ),
    ] {
        assert_eq!(validate_plan(&p, &tables), Ok(()), "{p:?}");
    }
    let fan_out = plan(
        vec![target(0, ShardKey::AllShards)],
        "SELECT id FROM {t0} ORDER BY id LIMIT 5",
        MergeKind::Limit(LimitMerge {
            count: 5,
            offset: 0,
            order: vec![SortKey {
                column: 0,
                descending: false,
            }],
        }),
    );
    assert_eq!(validate_plan(&fan_out, &tables), Ok(()));

    let bad = [
        (
            plan(vec![target(0, int(1))], "  ", single.clone()),
            "template is empty",
        ),
        (plan(vec![], "SELECT 1", MergeKind::Concat), "no targets"),
        (
            plan(
                vec![target(6, int(1))],
                "SELECT * FROM {t0}",
                single.clone(),
            ),
            "names table 6 of a catalog view of 6",
        ),
        (
            plan(
                vec![target(0, int(1))],
                "SELECT * FROM {t0}, {t1}",
                single.clone(),
            ),
            "uses {t1}, there are 1 targets",
        ),
        (
            plan(
                vec![target(0, int(1))],
                "SELECT * FROM orders",
                single.clone(),
            ),
            "target 0 does not appear",
        ),
        (
            plan(
                vec![target(0, int(1)), target(5, int(1))],
                "SELECT * FROM {t0}",
                single.clone(),
            ),
            "target 1 does not appear",
        ),
        (
            plan(
                vec![target(0, ShardKey::Param(1))],
                "SELECT * FROM {t0} WHERE tenant_id = $1 AND note = '$2'",
                single.clone(),
            ),
            "keyed on $2, the template uses 1 parameters",
        ),
        (
            plan(
                vec![target(0, ShardKey::Param(0))],
                "SELECT * FROM {t0} WHERE tenant_id = 1",
                single.clone(),
            ),
            "keyed on $1, the template uses 0 parameters",
        ),
        (
            plan(
                vec![target(0, ShardKey::AllShards)],
                "SELECT * FROM {t0}",
                single.clone(),
            ),
            "single-shard plan on all shards of orders",
        ),
        (
            plan(
                vec![target(0, int(1)), target(4, int(2))],
                "SELECT * FROM {t0}",
                single.clone(),
            ),
            "target 1 does not appear in the template ({t1}) and repeats no table that does",
        ),
        (
            plan(
                vec![target(0, ShardKey::AllShards)],
                "SELECT sum(x), count(x) FROM {t0}",
                MergeKind::AggregateCombine(vec![Combiner::Sum, Combiner::AvgSumCount]),
            ),
            "avg-sum-count on the last column",
        ),
    ];
    for (p, want) in bad {
        let e = validate_plan(&p, &tables).expect_err(want);
        assert!(e.contains(want), "{p:?}: {e:?} lacks {want:?}");
    }
}

#[test]
fn bad_plans_and_errors_do_not_break_the_planner() {
    // A refusal and a not-mine leave the planner usable.
    assert!(matches!(
        plan("UPDATE orders SET tenant_id = tenant_id + 1 WHERE tenant_id = 2"),
        Err(PluginError::Rejected { .. })
    ));
    assert!(matches!(plan("SELEKT"), Ok(PlanOutcome::NotMine(_))));
    assert!(matches!(
        plan("SELECT * FROM orders WHERE tenant_id = 1"),
        Ok(PlanOutcome::Plan(_))
    ));
    // An empty catalog view: nothing is the fast path's.
    assert!(matches!(
        planner().plan("SELECT * FROM orders WHERE tenant_id = 1", &[], &[]),
        Ok(PlanOutcome::NotMine(_))
    ));
    // An unqualified name of tables in two schemas is ambiguous.
    let mut two = catalog();
    two.push(table(
        "other",
        "orders",
        PlannerTableKind::Distributed,
        Some("tenant_id"),
        1,
        4,
    ));
    match planner().plan("SELECT * FROM orders WHERE tenant_id = 1", &[], &two) {
        Ok(PlanOutcome::NotMine(r)) => assert!(r.contains("several schemas"), "{r}"),
        other => panic!("{other:?}"),
    }
    match planner().plan("SELECT * FROM other.orders WHERE tenant_id = 1", &[], &two) {
        Ok(PlanOutcome::Plan(p)) => assert_eq!(p.targets[0].table, 6),
        other => panic!("{other:?}"),
    }
    // Deeply nested input fails that call at worst, never the host.
    let deep = format!(
        "SELECT * FROM orders WHERE tenant_id = 1 AND {}1{} = 1",
        "(".repeat(5000),
        ")".repeat(5000)
    );
    let _ = plan(&deep);
    assert!(matches!(
        plan("SELECT * FROM orders WHERE tenant_id = 1"),
        Ok(PlanOutcome::Plan(_))
    ));
}

/// Postgres accepts every template once `{t0}` is a real (shard-like) table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_accepts_the_templates() {
    let env = TestEnv::new().await;
    let c = env.direct().await;
    let schema = format!("planner_check_{}", std::process::id());
    c.batch_execute(&format!(
        r#"CREATE SCHEMA {schema};
           CREATE TABLE {schema}.orders_101 (tenant_id bigint, id bigint, note text,
               amount numeric, PRIMARY KEY (tenant_id, id));
           CREATE TABLE {schema}.items_201 (id bigint PRIMARY KEY, name text);
           CREATE TABLE {schema}."Events_301" ("Tenant" text, payload text);"#
    ))
    .await
    .unwrap();
    let shard = ["orders_101", "", "items_201", "\"Events_301\""];
    for (sql, table, _, template) in planned_cases() {
        let sql_shard = template.replace("{t0}", &format!("{schema}.{}", shard[table as usize]));
        if let Err(e) = c.prepare(&sql_shard).await {
            panic!("{sql}\n -> {sql_shard}\n: {e:?}");
        }
    }
    c.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
}

// ---------------------------------------------------------------------------------
// planner-router

fn route(sql: &str) -> Result<PlanOutcome, PluginError> {
    router().plan(sql, &[], &catalog())
}

/// The router tier's plan of `sql`: (table, key) per target, and the template.
fn routed(sql: &str) -> (Vec<(u32, ShardKey)>, String) {
    match route(sql) {
        Ok(PlanOutcome::Plan(p)) => {
            assert_eq!(p.merge, MergeKind::SingleShard, "{sql}");
            (
                p.targets.into_iter().map(|t| (t.table, t.key)).collect(),
                p.sql_template,
            )
        }
        other => panic!("{sql}: a plan expected, got {other:?}"),
    }
}

#[test]
fn the_router_tier_plans_statements_pinned_to_one_value() {
    assert_eq!(router().name(), "planner-router");
    let p1 = ShardKey::Param(0);
    let all = ShardKey::AllShards;
    type Case = (&'static str, Vec<(u32, ShardKey)>, &'static str);
    let cases: Vec<Case> = vec![
        // A join pinned by literals, and by one parameter.
        (
            "SELECT o.id, u.name FROM orders o JOIN users u ON u.id = o.tenant_id WHERE o.tenant_id = 7 AND u.id = 7",
            vec![(0, int(7)), (5, int(7))],
            "SELECT o.id, u.name FROM {t0} AS o JOIN {t1} AS u ON u.id = o.tenant_id WHERE o.tenant_id = 7 AND u.id = 7",
        ),
        (
            "SELECT * FROM orders o, users u WHERE o.tenant_id = $1 AND u.id = $1 ORDER BY 1 LIMIT 3",
            vec![(0, p1.clone()), (5, p1.clone())],
            "SELECT * FROM {t0} AS o, {t1} AS u WHERE o.tenant_id = $1 AND u.id = $1 ORDER BY 1 LIMIT 3",
        ),
        // Transitive: users is pinned through the join equality.
        (
            "SELECT count(*) FROM orders JOIN users ON users.id = orders.tenant_id WHERE orders.tenant_id = $1",
            vec![(0, p1.clone()), (5, p1.clone())],
            "SELECT count(*) FROM {t0} AS orders JOIN {t1} AS users ON users.id = orders.tenant_id WHERE orders.tenant_id = $1",
        ),
        // A LEFT JOIN's nullable side, linked to a pinned preserved side.
        (
            "SELECT * FROM orders o LEFT JOIN app.items i ON i.id = o.tenant_id WHERE o.tenant_id = $1",
            vec![(0, p1.clone()), (2, p1.clone())],
            "SELECT * FROM {t0} AS o LEFT JOIN {t1} AS i ON i.id = o.tenant_id WHERE o.tenant_id = $1",
        ),
        // A CTE, whose pinned column pins what joins it.
        (
            "WITH mine AS (SELECT * FROM orders WHERE tenant_id = $1) SELECT u.name, mine.id FROM mine JOIN users u ON u.id = mine.tenant_id",
            vec![(0, p1.clone()), (5, p1.clone())],
            "WITH mine AS (SELECT * FROM {t0} AS orders WHERE tenant_id = $1) SELECT u.name, mine.id FROM mine JOIN {t1} AS u ON u.id = mine.tenant_id",
        ),
        // Subqueries in WHERE (correlated and not) and in the select list.
        (
            "SELECT * FROM orders o WHERE o.tenant_id = $1 AND EXISTS (SELECT 1 FROM users u WHERE u.id = o.tenant_id) AND o.id IN (SELECT id FROM app.items WHERE id = $1)",
            vec![(0, p1.clone()), (5, p1.clone()), (2, p1.clone())],
            "SELECT * FROM {t0} AS o WHERE o.tenant_id = $1 AND EXISTS (SELECT 1 FROM {t1} AS u WHERE u.id = o.tenant_id) AND o.id IN (SELECT id FROM {t2} AS items WHERE id = $1)",
        ),
        (
            "SELECT o.id, (SELECT max(u.id) FROM users u WHERE u.id = o.tenant_id) FROM orders o WHERE o.tenant_id = 3",
            vec![(5, int(3)), (0, int(3))],
            "SELECT o.id, (SELECT max(u.id) FROM {t0} AS u WHERE u.id = o.tenant_id) FROM {t1} AS o WHERE o.tenant_id = 3",
        ),
        // UNION: both branches pinned to the same value.
        (
            "SELECT id FROM orders WHERE tenant_id = $1 UNION SELECT id FROM users WHERE id = $1",
            vec![(0, p1.clone()), (5, p1.clone())],
            "SELECT id FROM {t0} AS orders WHERE tenant_id = $1 UNION SELECT id FROM {t1} AS users WHERE id = $1",
        ),
        // A join with a reference table, and reference tables only.
        (
            "SELECT o.id, c.name FROM orders o JOIN countries c ON c.code = o.country WHERE o.tenant_id = 5",
            vec![(0, int(5)), (1, all.clone())],
            "SELECT o.id, c.name FROM {t0} AS o JOIN {t1} AS c ON c.code = o.country WHERE o.tenant_id = 5",
        ),
        (
            "SELECT code, count(*) FROM countries GROUP BY code ORDER BY 2 DESC",
            vec![(1, all.clone())],
            "SELECT code, count(*) FROM {t0} AS countries GROUP BY code ORDER BY 2 DESC",
        ),
        // Writes: UPDATE ... FROM, INSERT ... SELECT, a data-modifying CTE.
        (
            "UPDATE orders SET note = u.name FROM users u WHERE u.id = orders.tenant_id AND orders.tenant_id = $1 RETURNING orders.id",
            vec![(0, p1.clone()), (5, p1.clone())],
            "UPDATE {t0} AS orders SET note = u.name FROM {t1} AS u WHERE u.id = orders.tenant_id AND orders.tenant_id = $1 RETURNING orders.id",
        ),
        (
            "INSERT INTO orders (tenant_id, id, note) SELECT id, 1, name FROM users WHERE id = $1 ON CONFLICT (tenant_id, id) DO UPDATE SET note = excluded.note",
            vec![(0, p1.clone()), (5, p1.clone())],
            "INSERT INTO {t0} AS orders (tenant_id, id, note) SELECT id, 1, name FROM {t1} AS users WHERE id = $1 ON CONFLICT(tenant_id, id) DO UPDATE SET note = excluded.note",
        ),
        // A recursive CTE: the join column keeps the pinned value in every iteration.
        (
            "WITH RECURSIVE h AS (SELECT id, tenant_id FROM orders WHERE tenant_id = $1 UNION SELECT o.id, o.tenant_id FROM h JOIN orders o ON o.tenant_id = h.tenant_id AND o.id = h.id + 1) SELECT * FROM h",
            vec![(0, p1.clone())],
            "WITH RECURSIVE h AS (SELECT id, tenant_id FROM {t0} AS orders WHERE tenant_id = $1 UNION SELECT o.id, o.tenant_id FROM h JOIN {t0} AS o ON o.tenant_id = h.tenant_id AND o.id = h.id + 1) SELECT * FROM h",
        ),
        (
            "WITH gone AS (DELETE FROM orders WHERE tenant_id = $1 RETURNING *) SELECT count(*) FROM gone",
            vec![(0, p1.clone())],
            "WITH gone AS (DELETE FROM {t0} AS orders WHERE tenant_id = $1 RETURNING *) SELECT count(*) FROM gone",
        ),
        // Tables of another colocation group are keyed on their own (the router runs
        // the plan where both shards are, or refuses it); a key of literal arithmetic.
        (
            r#"SELECT * FROM orders o JOIN "Events" e ON e."Tenant" = o.tenant_id WHERE o.tenant_id = 1 + 1"#,
            vec![(0, int(2)), (3, int(2))],
            r#"SELECT * FROM {t0} AS o JOIN {t1} AS e ON e."Tenant" = o.tenant_id WHERE o.tenant_id = 1 + 1"#,
        ),
    ];
    for (sql, targets, template) in cases {
        assert_eq!(routed(sql), (targets, template.to_owned()), "{sql}");
    }
}

#[test]
fn the_router_tier_leaves_what_may_span_shards() {
    let cases = [
        (
            "SELECT * FROM orders o JOIN users u ON u.id = o.tenant_id WHERE o.tenant_id = 1 OR o.tenant_id = 2",
            "not pinned",
        ),
        (
            "SELECT * FROM orders o JOIN users u ON u.id = o.tenant_id WHERE o.tenant_id IN (1, 2)",
            "not pinned",
        ),
        (
            "SELECT * FROM orders o JOIN users u ON u.id = o.id WHERE o.tenant_id = $1",
            "users is not pinned",
        ),
        (
            "SELECT * FROM orders WHERE tenant_id = $1 AND id IN (SELECT id FROM users)",
            "users is not pinned",
        ),
        (
            "SELECT id FROM orders WHERE tenant_id = 1 UNION ALL SELECT id FROM users",
            "users is not pinned",
        ),
        (
            r#"SELECT * FROM orders o JOIN "Events" e ON e."Tenant" = o.tenant_id WHERE e."Tenant" = 'a' AND o.tenant_id = 1"#,
            "pinned to different values",
        ),
        (
            "SELECT * FROM orders o JOIN settings s ON true WHERE o.tenant_id = 1",
            "local table",
        ),
        (
            "SELECT * FROM orders o JOIN nowhere n ON true WHERE o.tenant_id = 1",
            "not in the catalog view",
        ),
        // The preserved side of an outer join is not pinned by its ON.
        (
            "SELECT * FROM orders o LEFT JOIN users u ON u.id = o.tenant_id AND o.tenant_id = 1",
            "orders is not pinned",
        ),
        (
            "SELECT * FROM orders o FULL JOIN users u ON u.id = o.tenant_id WHERE o.tenant_id = 1",
            "users is not pinned",
        ),
        // A reference table written with a distributed one: every node must see it.
        (
            "INSERT INTO countries (code) SELECT note FROM orders WHERE tenant_id = 1",
            "reference table",
        ),
        // An unqualified column an inner table may also have (the catalog view has no
        // columns here) is not taken for the outer one.
        (
            "SELECT * FROM orders o WHERE o.tenant_id = 1 AND EXISTS (SELECT 1 FROM users u WHERE u.id = tenant_id)",
            "users is not pinned",
        ),
        // A pin outside a derived table is not pushed into it.
        (
            "SELECT * FROM (SELECT * FROM users) x WHERE x.id = 1",
            "users is not pinned",
        ),
        // A recursive CTE whose recursive branch does not keep the pinned column.
        (
            "WITH RECURSIVE h AS (SELECT id, tenant_id FROM orders WHERE tenant_id = 1 UNION SELECT o.id, o.id FROM h JOIN orders o ON o.tenant_id = h.tenant_id) SELECT * FROM h",
            "orders is not pinned",
        ),
        ("SELECT 1", "no table"),
        ("SELECT '{t0}' FROM countries", "`{t`"),
    ];
    for (sql, want) in cases {
        match route(sql) {
            Ok(PlanOutcome::NotMine(reason)) => {
                assert!(reason.contains(want), "{sql}: {reason:?} lacks {want:?}")
            }
            other => panic!("{sql}: not-mine expected, got {other:?}"),
        }
    }
    // Colocated occurrences pinned to values of their own: planned with every key,
    // which the router checks choose one shard when bound (a statement on two shards is
    // refused then).
    for (sql, keys) in [
        (
            "SELECT * FROM orders o, users u WHERE o.tenant_id = $1 AND u.id = $2",
            vec![ShardKey::Param(0), ShardKey::Param(1)],
        ),
        (
            "SELECT * FROM orders o, users u WHERE o.tenant_id = 1 AND u.id = 2",
            vec![int(1), int(2)],
        ),
        (
            "SELECT id FROM orders WHERE tenant_id = 1 UNION SELECT id FROM users WHERE id = 2",
            vec![int(1), int(2)],
        ),
        (
            "SELECT * FROM orders o JOIN users u ON u.id = o.tenant_id WHERE o.tenant_id = $1 AND u.id = $2",
            vec![ShardKey::Param(0), ShardKey::Param(1)],
        ),
    ] {
        match route(sql) {
            Ok(PlanOutcome::Plan(p)) => {
                for k in &keys {
                    assert!(
                        p.targets.iter().any(|t| t.key == *k),
                        "{sql}: no target keyed {k:?}: {p:?}"
                    );
                }
                assert_eq!(validate_plan(&p, &catalog()), Ok(()), "{sql}");
            }
            other => panic!("{sql}: a plan expected, got {other:?}"),
        }
    }
    match route(
        "UPDATE orders o SET tenant_id = 2 FROM users u WHERE u.id = o.tenant_id AND u.id = 1",
    ) {
        Err(PluginError::Rejected { name, message }) => {
            assert_eq!(name, "planner-router");
            assert!(
                message.contains("distribution column tenant_id"),
                "{message}"
            );
        }
        other => panic!("rejected expected, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------
// planner-router over ../shared/citus_corpus

fn corpus_dir() -> std::path::PathBuf {
    std::path::PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/citus_corpus"
    ))
}

/// The quoted arguments of a `create_..._table(...)` call, and its `name => 'value'`
/// options.
fn call_args(line: &str) -> (Vec<String>, Vec<(String, String)>) {
    let inner = &line[line.find('(').expect("(") + 1..line.rfind(')').expect(")")];
    let mut args = Vec::new();
    let mut opts = Vec::new();
    for part in inner.split(',') {
        let part = part.trim();
        let value = |s: &str| s.trim().trim_matches('\'').to_owned();
        match part.split_once("=>") {
            Some((k, v)) => opts.push((k.trim().to_owned(), value(v))),
            None => args.push(value(part)),
        }
    }
    (args, opts)
}

/// Columns (name, type) of each table of a schema.sql: `CREATE TABLE t (col type, ...)`
/// (also `LIKE other`) and `ALTER TABLE t ADD [COLUMN] col type`.
fn schema_columns(schema: &str) -> std::collections::HashMap<String, Vec<(String, String)>> {
    let mut tables: std::collections::HashMap<String, Vec<(String, String)>> =
        std::collections::HashMap::new();
    let split_top = |s: &str| -> Vec<String> {
        let (mut depth, mut cur, mut out) = (0, String::new(), Vec::new());
        for c in s.chars() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                ',' if depth == 0 => {
                    out.push(std::mem::take(&mut cur));
                    continue;
                }
                _ => {}
            }
            cur.push(c);
        }
        out.push(cur);
        out
    };
    let column = |def: &str| -> Option<(String, String)> {
        let mut words = def.split_whitespace();
        let name = words.next()?.trim_matches('"').to_lowercase();
        let keywords = [
            "primary",
            "unique",
            "constraint",
            "check",
            "foreign",
            "exclude",
            "like",
        ];
        if keywords.contains(&name.as_str()) {
            return None;
        }
        let ty = words.next().unwrap_or("").to_lowercase();
        let ty = ty.split('(').next().unwrap_or("").to_owned();
        Some((name, ty))
    };
    for line in schema.lines() {
        let line = line.trim().trim_end_matches(';');
        if let Some(rest) = line.strip_prefix("CREATE TABLE ") {
            let Some(open) = rest.find('(') else { continue };
            let name = rest[..open].trim().to_lowercase();
            let body = &rest[open + 1..rest.rfind(')').unwrap_or(rest.len())];
            let mut cols = Vec::new();
            for def in split_top(body) {
                let def = def.trim();
                if let Some(other) = def.strip_prefix("LIKE ") {
                    let other = other.split_whitespace().next().unwrap_or("").to_lowercase();
                    cols.extend(tables.get(&other).cloned().unwrap_or_default());
                } else if let Some(c) = column(def) {
                    cols.push(c);
                }
            }
            tables.insert(name, cols);
        } else if let Some(rest) = line.strip_prefix("ALTER TABLE ") {
            let mut words = rest.splitn(2, ' ');
            let name = words.next().unwrap_or("").to_lowercase();
            let rest = words.next().unwrap_or("");
            if let Some(def) = rest
                .strip_prefix("ADD COLUMN ")
                .or_else(|| rest.strip_prefix("ADD "))
                && let Some(c) = column(def)
                && let Some(cols) = tables.get_mut(&name)
            {
                cols.push(c);
            }
        }
    }
    tables
}

/// The catalog view of one corpus directory, from its distribute.sql (and its
/// schema.sql for column names and types): colocation groups as Citus forms them by
/// default (same distribution column type and shard count; `colocate_with => 'x'`
/// joins x's group, `'none'` a group of its own); shard count 4 when not given (the
/// Citus regression harness's default).
fn corpus_catalog(dir: &std::path::Path) -> Vec<PlannerTable> {
    let schema = std::fs::read_to_string(dir.join("schema.sql")).expect("schema.sql");
    let columns = schema_columns(&schema);
    let distribute = std::fs::read_to_string(dir.join("distribute.sql")).expect("distribute.sql");
    let mut out: Vec<PlannerTable> = Vec::new();
    let mut groups: Vec<(String, u32)> = Vec::new();
    for line in distribute.lines().filter(|l| l.starts_with("SELECT ")) {
        let (args, opts) = call_args(line);
        let name = args[0].to_lowercase();
        let cols = columns.get(&name).cloned().unwrap_or_default();
        let names: Vec<String> = cols.iter().map(|c| c.0.clone()).collect();
        if line.contains("create_reference_table") {
            out.push(PlannerTable {
                name,
                schema: "public".into(),
                kind: PlannerTableKind::Reference,
                distribution_column: None,
                colocation_id: 0,
                shard_count: 1,
                columns: names,
            });
            continue;
        }
        let dist = args[1].to_lowercase();
        let opt = |k: &str| opts.iter().find(|o| o.0 == k).map(|o| o.1.clone());
        let shard_count = opt("shard_count").map_or(4, |v| v.parse().expect("shard count"));
        let ty = cols
            .iter()
            .find(|c| c.0 == dist)
            .map(|c| match c.1.as_str() {
                "integer" | "int" | "int4" => "int4".to_owned(),
                "bigint" | "int8" => "int8".to_owned(),
                other => other.to_owned(),
            })
            .unwrap_or_default();
        let colocation_id = match opt("colocate_with").as_deref() {
            Some("none") => {
                groups.push((format!("none:{name}"), shard_count));
                groups.len() as i32
            }
            Some(other) => {
                out.iter()
                    .find(|t| t.name == other)
                    .expect("colocate_with names an earlier table")
                    .colocation_id
            }
            None => match groups.iter().position(|g| *g == (ty.clone(), shard_count)) {
                Some(i) => i as i32 + 1,
                None => {
                    groups.push((ty, shard_count));
                    groups.len() as i32
                }
            },
        };
        out.push(PlannerTable {
            name,
            schema: "public".into(),
            kind: PlannerTableKind::Distributed,
            distribution_column: Some(dist),
            colocation_id,
            shard_count,
            columns: names,
        });
    }
    out
}

/// multi_shard.sql statements the tiers plan, each read and found to be single-shard
/// after all (the corpus's split is a static heuristic, its README says so): a
/// top-level `author_id = v` next to an OR, or a range on the same column (fast path);
/// `dist IN (SELECT dist FROM ... WHERE dist = v)`, a semi-join on a pinned column
/// (router tier).
const MULTI_SHARD_BUT_PINNED: &[&str] = &[
    r#"SELECT * FROM articles_hash WHERE (author_id = 1) and (id = 1 or id = 31) and title like '%s' ORDER BY 1, 2, 3, 4;"#,
    r#"SELECT * FROM articles_hash WHERE (id = 1 or id = 31) and title like '%s' and (author_id = 1) ORDER BY 1, 2, 3, 4;"#,
    r#"SELECT * FROM articles_hash WHERE (title like '%s' or title like 'a%') and (author_id = 1) ORDER BY 1, 2, 3, 4;"#,
    r#"SELECT * FROM articles_hash WHERE (title like '%s' or title like 'a%') and (author_id = 1) and (word_count < 3000 or word_count > 8000) ORDER BY 1, 2, 3, 4;"#,
    r#"SELECT * FROM articles_hash WHERE author_id = 1 and (id = 1 or id = 41) ORDER BY 1, 2, 3, 4;"#,
    r#"SELECT * FROM articles_hash WHERE author_id = 1 and author_id >= 1 ORDER BY 1, 2, 3, 4;"#,
    r#"SELECT * FROM articles_hash WHERE author_id IN (SELECT author_id FROM articles_hash WHERE author_id = 2) ORDER BY articles_hash.id;"#,
    r#"SELECT count(*) FROM articles_hash WHERE (author_id = 15) AND (id = 1 OR word_count > 5);"#,
    r#"SELECT count(*) FROM articles_hash WHERE (id = 15) AND (author_id = 1 AND (word_count > 5 OR id = 2));"#,
    r#"SELECT count(*) FROM articles_hash WHERE (id = 15) AND (title ilike 'a%' AND ((word_count > 5 OR title ilike 'b%') AND (author_id = 2 AND word_count > 50)));"#,
    r#"SELECT user_id FROM raw_events_first WHERE user_id IN (SELECT raw_events_second.user_id FROM raw_events_second, raw_events_first WHERE raw_events_second.user_id = raw_events_first.user_id AND raw_events_first.user_id = 200);"#,
    r#"SELECT user_id FROM raw_events_first WHERE user_id IN (SELECT user_id FROM raw_events_second WHERE user_id = 2);"#,
    // Tables of one shard: every statement on them is on that shard.
    r#"SELECT * FROM dist_source ORDER BY 1, 2, 3, 4, 5;"#,
    r#"SELECT * FROM dist_target ORDER BY 1, 2, 3, 4, 5;"#,
];

/// The tiers in the router's order: the fast path, then the router tier, on the
/// statement normalised as the router does (literals become parameters) or as written.
/// Some(plan) with the tier's name, or None (not-mine by both, or refused).
fn plan_with_tiers(
    sql: &str,
    tables: &[PlannerTable],
    normalised: bool,
) -> Option<(&'static str, PlanTemplate)> {
    let norm = shardgate::plan::normalize(sql);
    let text = if normalised { &norm.text } else { sql };
    let text = text.trim().trim_end_matches(';');
    for (name, tier) in [
        ("planner-fastpath", planner()),
        ("planner-router", router()),
    ] {
        match tier.plan(text, &[], tables) {
            Ok(PlanOutcome::Plan(p)) => return Some((name, p)),
            Ok(PlanOutcome::NotMine(_)) => continue,
            Err(_) => return None,
        }
    }
    None
}

#[test]
fn the_router_tier_over_the_citus_corpus() {
    let root = corpus_dir();
    let mut dirs: Vec<_> = std::fs::read_dir(&root)
        .expect("citus_corpus")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("distribute.sql").is_file())
        .collect();
    dirs.sort();
    let mut single = (0, 0, 0); // (statements, planned by the fast path, by the router)
    let mut multi_planned = Vec::new();
    let mut multi_total = 0;
    for dir in &dirs {
        let tables = corpus_catalog(dir);
        let dname = dir.file_name().unwrap().to_string_lossy().into_owned();
        for file in ["single_shard.sql", "multi_shard.sql", "writes.sql"] {
            let text = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| !l.is_empty() && !l.starts_with("--"))
                .collect();
            let (mut fast, mut routed, mut not_mine) = (0, 0, 0);
            for line in &lines {
                let planned = plan_with_tiers(line, &tables, true);
                match &planned {
                    Some(("planner-fastpath", _)) => fast += 1,
                    Some(_) => routed += 1,
                    None => not_mine += 1,
                }
                if file == "writes.sql" {
                    if let Some(("planner-router", p)) = &planned {
                        println!("  WRITE routed: [{dname}] {line}\n      {:?}", p.targets);
                    }
                    continue;
                }
                if file == "single_shard.sql" && planned.is_none() {
                    println!("  single not planned: [{dname}] {line}");
                }
                // The raw text too (literals, not parameters).
                let planned = match planned {
                    None if file == "multi_shard.sql" => plan_with_tiers(line, &tables, false),
                    other => other,
                };
                if file == "multi_shard.sql"
                    && let Some((tier, p)) = planned
                {
                    // Keys of one colocation group that differ are checked when the
                    // plan is bound: it runs only if they choose one shard.
                    let distributed = |t: &PlanTarget| {
                        let t = &tables[t.table as usize];
                        (t.kind == PlannerTableKind::Distributed && t.shard_count > 1)
                            .then_some(t.colocation_id)
                    };
                    let checked_when_bound = p.targets.iter().any(|a| {
                        p.targets.iter().any(|b| {
                            distributed(a).is_some()
                                && distributed(a) == distributed(b)
                                && a.key != b.key
                        })
                    });
                    println!(
                        "  MULTI PLANNED by {tier}{}: [{dname}] {line}\n      {:?}",
                        if checked_when_bound {
                            " (keys checked when bound)"
                        } else {
                            ""
                        },
                        p.targets
                    );
                    if !checked_when_bound {
                        multi_planned.push((dname.clone(), line.to_string()));
                    }
                }
            }
            println!(
                "{dname}/{file}: {} statements, fast path {fast}, router {routed}, not planned {not_mine}",
                lines.len()
            );
            if file == "writes.sql" {
                continue;
            }
            if file == "single_shard.sql" {
                single.0 += lines.len();
                single.1 += fast;
                single.2 += routed;
            } else {
                multi_total += lines.len();
            }
        }
    }
    // Most single-shard statements are planned (what is not: two reads of a 2-shard
    // table without a filter, misfiled by the corpus).
    assert!(
        single.1 + single.2 >= 240,
        "single_shard coverage fell: {single:?}"
    );
    println!(
        "single_shard: {} statements, {} planned ({} fast path, {} router); multi_shard: {} statements, {} planned",
        single.0,
        single.1 + single.2,
        single.1,
        single.2,
        multi_total,
        multi_planned.len()
    );
    let unexpected: Vec<_> = multi_planned
        .iter()
        .filter(|(_, l)| !MULTI_SHARD_BUT_PINNED.contains(&l.as_str()))
        .collect();
    assert!(
        unexpected.is_empty(),
        "multi_shard statements planned on one shard and not inspected: {unexpected:#?}"
    );
}

// ---------------------------------------------------------------------------
// planner-pushdown

/// The pushdown tier, loaded once like [`planner`].
fn pushdown() -> &'static PlannerPlugin {
    static P: OnceLock<(PluginHost, Arc<PlannerPlugin>)> = OnceLock::new();
    let (_, p) = P.get_or_init(|| {
        let host = PluginHost::new(None, Limits::default()).expect("plugin host");
        let p = match host.load("planner-pushdown", builtin::PLANNER_PUSHDOWN) {
            Ok(LoadedPlugin::Planner(p)) => p,
            other => panic!("planner-pushdown loads as a planner: {other:?}"),
        };
        (host, p)
    });
    p
}

/// The catalog with the columns of `orders` known.
fn catalog_with_columns() -> Vec<PlannerTable> {
    let mut c = catalog();
    c[0].columns = vec![
        "tenant_id".into(),
        "id".into(),
        "total".into(),
        "note".into(),
    ];
    c
}

#[test]
fn the_pushdown_tier_plans_row_by_row_reads_of_every_shard() {
    let p = pushdown();
    assert_eq!(p.name(), "planner-pushdown");
    let cases = [
        (
            "SELECT id, lower(note) FROM orders WHERE total > $1",
            "SELECT id, pg_catalog.lower(note) FROM {t0} AS orders WHERE total > $1",
        ),
        (
            "select o.id, coalesce(o.note, 'x') from orders o where o.tenant_id in (1, 2)",
            "SELECT o.id, coalesce(o.note, 'x') FROM {t0} AS o WHERE o.tenant_id IN (1, 2)",
        ),
        (
            "SELECT orders FROM orders",
            "SELECT orders FROM {t0} AS orders",
        ),
    ];
    for (sql, want) in cases {
        match p.plan(sql, &[], &catalog_with_columns()) {
            Ok(PlanOutcome::Plan(t)) => {
                assert_eq!(t.sql_template, want, "{sql}");
                assert_eq!(t.merge, MergeKind::Concat, "{sql}");
                assert_eq!(t.targets.len(), 1);
                assert_eq!(t.targets[0].table, 0);
                assert_eq!(t.targets[0].key, ShardKey::AllShards);
                validate_plan(&t, &catalog_with_columns()).expect("a valid plan");
            }
            other => panic!("{sql}: {other:?}"),
        }
    }
    // Whatever is not the rows of each shard put together is not its.
    for sql in [
        "SELECT count(*) FROM orders",
        "SELECT sum(total) FROM orders",
        "SELECT myagg(total) FROM orders",
        "SELECT o.count FROM orders o",
        "SELECT (o).count FROM orders o",
        "SELECT ctid FROM orders",
        "SELECT id FROM orders ORDER BY id",
        "SELECT id FROM orders LIMIT 1",
        "SELECT DISTINCT id FROM orders",
        "SELECT DISTINCT ON (id) id FROM orders",
        "SELECT id FROM orders GROUP BY id",
        "SELECT count(*) OVER () FROM orders",
        "SELECT id FROM orders WHERE total > (SELECT avg(total) FROM orders)",
        "SELECT (SELECT max(o.total)) FROM orders o",
        "SELECT id FROM orders WHERE EXISTS (SELECT 1)",
        "SELECT ARRAY(SELECT 1) FROM orders",
        "SELECT id FROM orders FOR UPDATE",
        "SELECT o.id FROM orders o JOIN users u ON u.id = o.tenant_id",
        "SELECT id FROM orders UNION ALL SELECT id FROM orders",
        "WITH x AS (SELECT id FROM orders) SELECT id FROM x",
        "SELECT x.a FROM orders AS x(a)",
        "SELECT now(), id FROM orders",
        "SELECT random() FROM orders",
        "SELECT * FROM countries",
        "UPDATE orders SET total = 0",
        "SELECT id FROM orders WHERE public.orders.id = 1",
    ] {
        match p.plan(sql, &[], &catalog_with_columns()) {
            Ok(PlanOutcome::NotMine(_)) => {}
            other => panic!("{sql}: expected not-mine, got {other:?}"),
        }
    }
}
