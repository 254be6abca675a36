//! `planner-pushdown`: the logical pushdown tier, asked after the fast path and the
//! router tier. For now it takes the one kind of multi-shard statement whose answer is
//! exactly the rows of every shard put together: a plain read of one `distributed`
//! table, row by row,
//!
//! `SELECT <expressions> FROM t [alias] [WHERE <condition>]`
//!
//! with no GROUP BY, HAVING, DISTINCT, ORDER BY, LIMIT/OFFSET/FETCH, window, locking
//! clause, WITH, set operation or subquery, and no function but known row-by-row
//! (scalar) built-ins: an aggregate (`count(*)`, or a user-defined one, which the tier
//! cannot tell from a function by its name) would answer once per shard instead of
//! once. Each shard runs the statement on its own rows; the router concatenates the
//! rows (`concat`), in no particular order, as Postgres gives rows of a query without
//! ORDER BY. Everything else is `not-mine` with a short reason; the router then refuses
//! it as a multi-shard statement it cannot plan yet.
//!
//! The template is the statement re-serialised with the table replaced by `{t0}` (its
//! name as alias when it has none, so `t.col` still resolves), keyed `all-shards`.

wit_bindgen::generate!({ world: "planner-tier", path: "../../wit/planner" });

use exports::shardgate::planner::planner::{
    CatalogView, Guest, MergeKind, PlanResult, PlanTemplate, ShardKey, Statement, Table, TableKind,
    Target,
};
use sqlparser::ast::{
    self, Expr, FunctionArguments, GroupByExpr, Ident, ObjectName, ObjectNamePart, SetExpr,
    TableFactor,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use std::ops::ControlFlow;

struct Pushdown;

impl Guest for Pushdown {
    fn name() -> String {
        "planner-pushdown".into()
    }

    fn plan(stmt: Statement, catalog: CatalogView) -> Result<PlanResult, String> {
        match plan(&stmt.sql, &catalog.tables) {
            Ok(t) => Ok(PlanResult::Plan(t)),
            Err(reason) => Ok(PlanResult::NotMine(reason)),
        }
    }
}

export!(Pushdown);

/// Functions that compute one value from one row's values (Postgres built-ins, by the
/// name they are called with, unqualified or `pg_catalog.`): none is an aggregate, a
/// window function, volatile, or a set-returning function.
const ROW_FUNCTIONS: &[&str] = &[
    "abs",
    "ascii",
    "bit_length",
    "btrim",
    "cardinality",
    "ceil",
    "ceiling",
    "char_length",
    "character_length",
    "chr",
    "coalesce",
    "concat",
    "concat_ws",
    "date_part",
    "date_trunc",
    "div",
    "exp",
    "floor",
    "format",
    "greatest",
    "initcap",
    "least",
    "left",
    "length",
    "ln",
    "log",
    "lower",
    "lpad",
    "ltrim",
    "md5",
    "mod",
    "nullif",
    "num_nonnulls",
    "num_nulls",
    "octet_length",
    "power",
    "quote_ident",
    "quote_literal",
    "quote_nullable",
    "repeat",
    "replace",
    "reverse",
    "right",
    "round",
    "rpad",
    "rtrim",
    "sign",
    "split_part",
    "sqrt",
    "strpos",
    "substr",
    "to_char",
    "translate",
    "trunc",
    "upper",
];

fn plan(sql: &str, tables: &[Table]) -> Result<PlanTemplate, String> {
    if sql.contains("{t") {
        return Err("the text contains `{t`, which plan templates reserve".into());
    }
    let mut statements = Parser::parse_sql(&PostgreSqlDialect {}, sql)
        .map_err(|e| format!("does not parse: {e}"))?;
    if statements.len() != 1 {
        return Err(format!("{} statements, not one", statements.len()));
    }
    let mut stmt = statements.pop().expect("one statement");
    let ast::Statement::Query(query) = &mut stmt else {
        return Err("not a SELECT".into());
    };
    let (name, alias) = match row_wise_select(query)? {
        TableFactor::Table { name, alias, .. } => (name.clone(), alias.clone()),
        _ => unreachable!("row_wise_select returns a plain table"),
    };
    let found = planner_sql::matching_tables(
        &name,
        tables.iter().map(|t| (t.schema.as_str(), t.name.as_str())),
    )?;
    let index = match found.as_slice() {
        [i] => *i,
        [] => return Err(format!("{name} is not in the catalog view")),
        _ => return Err(format!("{name} names tables of several schemas")),
    };
    let table = &tables[index];
    if table.kind != TableKind::Distributed {
        return Err(format!("{} is not a distributed table", table.name));
    }
    if alias.as_ref().is_some_and(|a| !a.columns.is_empty()) {
        return Err("a table alias with a column list".into());
    }
    let qualifier = alias
        .as_ref()
        .map(|a| planner_sql::fold(&a.name))
        .unwrap_or_else(|| table.name.clone());
    only_columns(query, table, &qualifier)?;

    // The table by a placeholder name that occurs nowhere in the text, with its own
    // name as alias; the placeholder becomes `{t0}` after printing.
    let lower = sql.to_lowercase();
    let placeholder = (0u32..)
        .map(|i| format!("sg_shard_table_{i}"))
        .find(|p| !lower.contains(p.as_str()))
        .expect("a free placeholder");
    if let TableFactor::Table { name, alias, .. } = row_wise_select(query)? {
        let own = name.0.last().and_then(ObjectNamePart::as_ident).cloned();
        *name = ObjectName::from(vec![Ident::new(placeholder.clone())]);
        if alias.is_none()
            && let Some(own) = own
        {
            *alias = Some(ast::TableAlias {
                name: own,
                columns: Vec::new(),
            });
        }
    }
    qualify_functions(&mut stmt);
    planner_sql::parenthesize_prefix_operands(&mut stmt);
    let text = stmt.to_string();
    if text.matches(placeholder.as_str()).count() != 1 {
        return Err("the table reference could not be isolated in the re-serialised text".into());
    }
    Ok(PlanTemplate {
        targets: vec![Target {
            table: index as u32,
            key: ShardKey::AllShards,
        }],
        sql_template: text.replace(placeholder.as_str(), "{t0}"),
        merge: MergeKind::Concat,
    })
}

/// Every name in the query is a column of `table` (plain, or qualified by
/// `qualifier`: its alias, else its name), or the table's whole row. Postgres reads
/// `o.count` or `(o).count` as the aggregate `count(o)`, and a system column (`ctid`,
/// `tableoid`) differs per shard: neither is a row's own value.
fn only_columns(q: &ast::Query, table: &Table, qualifier: &str) -> Result<(), String> {
    let column = |id: &Ident| table.columns.contains(&planner_sql::fold(id));
    let mut why = None;
    let _ = ast::visit_expressions(q, |e| {
        why = match e {
            Expr::Identifier(id) if column(id) || planner_sql::fold(id) == qualifier => None,
            Expr::Identifier(id) => Some(format!("{id} is not a column of {}", table.name)),
            Expr::CompoundIdentifier(p)
                if p.len() == 2 && planner_sql::fold(&p[0]) == qualifier && column(&p[1]) =>
            {
                None
            }
            Expr::CompoundIdentifier(p) => Some(format!(
                "{} is not a column of {}",
                ObjectName::from(p.clone()),
                table.name
            )),
            Expr::CompoundFieldAccess { access_chain, .. }
                if access_chain
                    .iter()
                    .any(|a| matches!(a, ast::AccessExpr::Dot(_))) =>
            {
                Some("a field of a row or composite value (`(o).count` may be an aggregate)".into())
            }
            _ => None,
        };
        if why.is_some() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    match why {
        Some(w) => Err(w),
        None => Ok(()),
    }
}

/// SQL keywords sqlparser reads as function calls: not functions in pg_catalog.
const SYNTAX_FUNCTIONS: &[&str] = &["coalesce", "greatest", "least", "nullif"];

/// Every (allowed) function call names pg_catalog's: an overload of another schema
/// (`CREATE AGGREGATE public.length(jsonb)`) would otherwise be chosen for its
/// argument types, and aggregate each shard on its own.
fn qualify_functions(stmt: &mut ast::Statement) {
    let _ = ast::visit_expressions_mut(stmt, |e| {
        if let Expr::Function(f) = e
            && let [ObjectNamePart::Identifier(id)] = f.name.0.as_slice()
        {
            let name = planner_sql::fold(id);
            if !SYNTAX_FUNCTIONS.contains(&name.as_str()) {
                f.name = ObjectName::from(vec![Ident::new("pg_catalog"), Ident::new(name)]);
            }
        }
        ControlFlow::<()>::Continue(())
    });
}

/// The table of a query whose answer is the rows of each shard put together, or why
/// it is not one.
fn row_wise_select(q: &mut ast::Query) -> Result<&mut TableFactor, String> {
    if q.with.is_some() {
        return Err("a WITH query".into());
    }
    if q.order_by.is_some() || q.limit_clause.is_some() || q.fetch.is_some() {
        return Err("ORDER BY, LIMIT, OFFSET or FETCH across shards (not merged yet)".into());
    }
    if !q.locks.is_empty() {
        return Err("a locking read across shards".into());
    }
    if !q.pipe_operators.is_empty()
        || q.for_clause.is_some()
        || q.settings.is_some()
        || q.format_clause.is_some()
    {
        return Err("a query clause this tier does not know".into());
    }
    // Any function but a known row-by-row one may be an aggregate; a subquery may
    // aggregate the outer query's rows (`(SELECT sum(t.x))`) or read other tables.
    let mut why = None;
    let _ = ast::visit_expressions(&*q, |e| {
        why = match e {
            Expr::Subquery(_) | Expr::Exists { .. } | Expr::InSubquery { .. } => {
                Some("a subquery across shards".to_owned())
            }
            Expr::Function(f) => row_function(f).err(),
            _ => None,
        };
        if why.is_some() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    if let Some(why) = why {
        return Err(why);
    }
    // `schema.table.column`: the shard table has another name.
    let three_part = ast::visit_expressions(&*q, |e| match e {
        Expr::CompoundIdentifier(p) if p.len() > 2 => ControlFlow::Break(()),
        _ => ControlFlow::Continue(()),
    });
    if three_part.is_break() {
        return Err("a column named with its schema (schema.table.column)".into());
    }
    let mut relations = 0;
    let _ = ast::visit_relations(&*q, |_| {
        relations += 1;
        ControlFlow::<()>::Continue(())
    });
    if relations != 1 {
        return Err(format!(
            "touches {relations} table references, this tier takes one"
        ));
    }
    let select = match &mut *q.body {
        SetExpr::Select(s) => s,
        _ => return Err("not a plain SELECT (a set operation or VALUES)".into()),
    };
    if select.distinct.is_some() || select.top.is_some() {
        return Err("DISTINCT across shards (not merged yet)".into());
    }
    let grouped = match &select.group_by {
        GroupByExpr::All(_) => true,
        GroupByExpr::Expressions(e, m) => !e.is_empty() || !m.is_empty(),
    };
    if grouped || select.having.is_some() {
        return Err("GROUP BY or HAVING across shards (not merged yet)".into());
    }
    if !select.named_window.is_empty() || select.qualify.is_some() {
        return Err("a window across shards".into());
    }
    if select.into.is_some()
        || select.exclude.is_some()
        || !select.lateral_views.is_empty()
        || select.prewhere.is_some()
        || !select.cluster_by.is_empty()
        || !select.distribute_by.is_empty()
        || !select.sort_by.is_empty()
        || select.connect_by.is_some()
        || select.value_table_mode.is_some()
    {
        return Err("a SELECT clause this tier does not know".into());
    }
    let items = select.from.len();
    let [from] = select.from.as_mut_slice() else {
        return Err(format!("{items} FROM items, this tier takes one"));
    };
    if !from.joins.is_empty() {
        return Err("a join".into());
    }
    match &from.relation {
        TableFactor::Table {
            args: None,
            version: None,
            sample: None,
            with_hints,
            partitions,
            with_ordinality: false,
            json_path: None,
            index_hints,
            ..
        } if with_hints.is_empty() && partitions.is_empty() && index_hints.is_empty() => {
            Ok(&mut from.relation)
        }
        _ => Err("not a plain table reference".into()),
    }
}

/// Whether a function call computes one row's value: a known built-in, called plainly.
fn row_function(f: &ast::Function) -> Result<(), String> {
    let parts: Vec<String> = f
        .name
        .0
        .iter()
        .map(|p| p.as_ident().map(planner_sql::fold).unwrap_or_default())
        .collect();
    let name = match parts.as_slice() {
        [n] => n.as_str(),
        [s, n] if s == "pg_catalog" => n.as_str(),
        _ => {
            return Err(format!(
                "function {} is not a known row-by-row built-in",
                f.name
            ));
        }
    };
    if !ROW_FUNCTIONS.contains(&name) {
        return Err(format!(
            "function {} may aggregate rows across shards (only known row-by-row built-ins are pushed down)",
            f.name
        ));
    }
    let plain_args = match &f.args {
        FunctionArguments::None => true,
        FunctionArguments::Subquery(_) => false,
        FunctionArguments::List(l) => l.duplicate_treatment.is_none() && l.clauses.is_empty(),
    };
    if f.over.is_some()
        || f.filter.is_some()
        || !f.within_group.is_empty()
        || f.null_treatment.is_some()
        || !plain_args
        || !matches!(f.parameters, FunctionArguments::None)
    {
        return Err(format!(
            "function {} called as an aggregate or window",
            f.name
        ));
    }
    Ok(())
}
