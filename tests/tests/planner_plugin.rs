//! The fast-path planner tier (`planner-fastpath`, world `shardgate:planner@0.1.0`)
//! through the plugin host: which statements it plans (key and SQL template), which it
//! leaves to other tiers, which it refuses; the host's validation of plans; and that
//! Postgres accepts the templates once `{t0}` is a real table.

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
            "UPDATE orders SET tenant_id = 2 WHERE tenant_id = 1",
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
                vec![target(0, int(1)), target(5, int(2))],
                "SELECT * FROM {t0}, {t1}",
                single.clone(),
            ),
            "different shard choices",
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
                vec![target(0, int(1)), target(3, int(1))],
                "SELECT * FROM {t0}, {t1}",
                single.clone(),
            ),
            "colocation groups 1 and 2",
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
        plan("UPDATE orders SET tenant_id = 1 WHERE tenant_id = 2"),
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
