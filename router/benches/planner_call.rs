//! `cargo bench -p shardgate --bench planner_call`: one planner miss through the Wasm
//! fast-path tier (planner-fastpath: parse with sqlparser inside the component, find the
//! key, re-serialise the template; plus the host's plan validation), against parsing the
//! same statement with sqlparser natively. This is what a plan-cache miss costs; a hit
//! does not call the planner.

use shardgate::plugin::{
    Limits, LoadedPlugin, PlanOutcome, PlannerTable, PlannerTableKind, PluginHost, builtin,
};
use std::hint::black_box;
use std::time::{Duration, Instant};

fn per_op(label: &str, iters: u32, mut f: impl FnMut(u32)) -> f64 {
    for i in 0..iters / 10 {
        f(i);
    }
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        for i in 0..iters {
            f(i);
        }
        best = best.min(t.elapsed().as_nanos() as f64 / iters as f64);
    }
    println!("{label:<52} {:>9.2} µs/op", best / 1000.0);
    best
}

fn main() {
    let host = PluginHost::new(
        None,
        Limits {
            call_timeout: Duration::from_secs(10),
            ..Limits::default()
        },
    )
    .expect("plugin host");
    let LoadedPlugin::Planner(planner) = host
        .load("planner-fastpath", builtin::PLANNER_FASTPATH)
        .expect("planner-fastpath loads")
    else {
        panic!("planner-fastpath is a planner");
    };
    let table = |name: &str, col: &str| PlannerTable {
        name: name.into(),
        schema: "public".into(),
        kind: PlannerTableKind::Distributed,
        distribution_column: Some(col.into()),
        colocation_id: 1,
        shard_count: 32,
        columns: Vec::new(),
    };
    let tables = vec![
        table("pgbench_accounts", "aid"),
        table("pgbench_tellers", "tid"),
        table("pgbench_branches", "bid"),
    ];
    let select = "SELECT abalance FROM pgbench_accounts WHERE aid = $1";
    let update = "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2";
    match planner.plan(select, &[23], &tables).expect("plans") {
        PlanOutcome::Plan(_) => {}
        PlanOutcome::NotMine(r) => panic!("not planned: {r}"),
    }
    let dialect = sqlparser::dialect::PostgreSqlDialect {};
    per_op("native sqlparser parse (pgbench -S select)", 20_000, |_| {
        black_box(sqlparser::parser::Parser::parse_sql(&dialect, black_box(select)).unwrap());
    });
    per_op("planner-fastpath miss (pgbench -S select)", 5_000, |_| {
        black_box(
            planner
                .plan(black_box(select), &[23], &tables)
                .expect("plans"),
        );
    });
    per_op("planner-fastpath miss (pgbench update)", 5_000, |_| {
        black_box(
            planner
                .plan(black_box(update), &[23, 23], &tables)
                .expect("plans"),
        );
    });
}
