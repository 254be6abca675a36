//! `planner-fastpath`: the first planner tier. It takes a statement only when it is one
//! statement touching exactly one `distributed` table, with the distribution column
//! pinned by equality to a literal or a `$n` parameter, so the whole statement runs on
//! one shard:
//!
//! - `SELECT ... FROM t [alias] WHERE dist = <lit|$n> [AND ...]` (either side of the
//!   `=`; GROUP BY, ORDER BY, LIMIT, window functions, FOR UPDATE: all on one shard);
//! - `UPDATE t SET ... WHERE dist = ...` (setting `dist` is an error),
//!   `DELETE FROM t WHERE dist = ...`, both with RETURNING;
//! - `INSERT INTO t [(cols)] VALUES (row) [, (row) ...] [ON CONFLICT ...] [RETURNING ...]`,
//!   the key from the rows' value of `dist` (missing or NULL: an error; several rows must
//!   all carry the same literal or parameter — rows of several tenants are not split per
//!   shard yet). Without a column list, the catalog view's column order tells where
//!   `dist` is.
//!
//! The equality must be a conjunct of the top-level AND of WHERE: an equality inside an
//! OR branch, an `IN (...)`, or `dist` compared with another expression does not pin
//! the key. Everything else is `not-mine`, with a short reason.
//!
//! The template is the statement re-serialised from its AST with the table reference
//! replaced by `{t0}` (schema left out: the router fills in a qualified shard name). A
//! table without an alias gets its own name as alias, so `t.col` and whole-row `t`
//! references still resolve against the shard table.

wit_bindgen::generate!({ world: "planner-tier", path: "../../wit/planner" });

use exports::shardgate::planner::planner::{
    CatalogView, Guest, Literal, MergeKind, PlanResult, PlanTemplate, ShardKey, Statement, Table,
    TableKind, Target,
};
use sqlparser::ast::{
    self, AssignmentTarget, BinaryOperator, Expr, FromTable, Ident, ObjectName, ObjectNamePart,
    OnConflictAction, OnInsert, SetExpr, TableFactor, TableObject, TableWithJoins, UnaryOperator,
    Value,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use std::ops::ControlFlow;

struct Fastpath;

impl Guest for Fastpath {
    fn name() -> String {
        "planner-fastpath".into()
    }

    fn plan(stmt: Statement, catalog: CatalogView) -> Result<PlanResult, String> {
        match plan(&stmt.sql, &catalog.tables) {
            Ok(t) => Ok(PlanResult::Plan(t)),
            Err(Stop::NotMine(reason)) => Ok(PlanResult::NotMine(reason)),
            Err(Stop::Refuse(message)) => Err(message),
        }
    }
}

export!(Fastpath);

/// Why no plan: not this tier's statement, or this tier's but it cannot run.
enum Stop {
    NotMine(String),
    Refuse(String),
}

fn not_mine<T>(reason: impl Into<String>) -> Result<T, Stop> {
    Err(Stop::NotMine(reason.into()))
}

fn refuse<T>(message: impl Into<String>) -> Result<T, Stop> {
    Err(Stop::Refuse(message.into()))
}

/// The table a statement targets, and how the rest of the statement may name it.
struct Ctx<'a> {
    index: u32,
    table: &'a Table,
    dist: &'a str,
    /// The alias, if the statement gives one (then only it qualifies columns).
    alias: Option<String>,
}

impl Ctx<'_> {
    /// Whether `e` is the distribution column: `dist`, `q.dist` with `q` the alias (or
    /// the table's name when there is none), or `schema.table.dist`.
    fn is_dist(&self, e: &Expr) -> bool {
        match e {
            Expr::Nested(inner) => self.is_dist(inner),
            Expr::Identifier(id) => fold(id) == self.dist,
            Expr::CompoundIdentifier(parts) => {
                let Some((col, quals)) = parts.split_last() else {
                    return false;
                };
                if fold(col) != self.dist {
                    return false;
                }
                match (quals, &self.alias) {
                    ([q], Some(a)) => fold(q) == *a,
                    ([q], None) => fold(q) == self.table.name,
                    ([s, q], None) => fold(s) == self.table.schema && fold(q) == self.table.name,
                    _ => false,
                }
            }
            _ => false,
        }
    }
}

use planner_sql::fold;

fn plan(sql: &str, tables: &[Table]) -> Result<PlanTemplate, Stop> {
    if sql.contains("{t") {
        return not_mine("the text contains `{t`, which plan templates reserve");
    }
    let mut statements = match Parser::parse_sql(&PostgreSqlDialect {}, sql) {
        Ok(s) => s,
        Err(e) => return not_mine(format!("does not parse: {e}")),
    };
    if statements.len() != 1 {
        return not_mine(format!("{} statements, not one", statements.len()));
    }
    let mut stmt = statements.pop().expect("one statement");
    // `schema.table.column`: the template names the table by an alias (its shard has
    // another name), which such a column reference would not find.
    let three_part = ast::visit_expressions(&stmt, |e| match e {
        Expr::CompoundIdentifier(p) if p.len() > 2 => ControlFlow::Break(()),
        _ => ControlFlow::Continue(()),
    });
    if three_part.is_break() {
        return not_mine("a column named with its schema (schema.table.column)");
    }

    // Exactly one table reference in the whole statement (subqueries, CTEs, joins,
    // USING/FROM lists and table functions all count).
    let mut relations: Vec<ObjectName> = Vec::new();
    let _ = ast::visit_relations(&stmt, |r| {
        relations.push(r.clone());
        ControlFlow::<()>::Continue(())
    });
    if relations.len() != 1 {
        return not_mine(format!(
            "touches {} table references, the fast path takes one",
            relations.len()
        ));
    }
    let (index, table) = resolve(&relations[0], tables)?;
    let dist = match (&table.kind, &table.distribution_column) {
        (TableKind::Distributed, Some(d)) => d.as_str(),
        (TableKind::Distributed, None) => {
            return not_mine(format!(
                "{} has no distribution column in the catalog view",
                table.name
            ));
        }
        (TableKind::Reference, _) => {
            return not_mine(format!("{} is a reference table", table.name));
        }
        (TableKind::Local, _) => return not_mine(format!("{} is a local table", table.name)),
    };
    let mut ctx = Ctx {
        index,
        table,
        dist,
        alias: None,
    };

    // An UPDATE's new value of the distribution column, when it sets one.
    let mut new_key = None;
    let key = match &mut stmt {
        ast::Statement::Query(q) => {
            let relation = select_relation(q)?;
            ctx.alias = table_alias(relation);
            let ast::SetExpr::Select(select) = &*q.body else {
                unreachable!("select_relation checked the body")
            };
            pinned(&ctx, select.selection.as_ref())?
        }
        ast::Statement::Update {
            table: t,
            assignments,
            from,
            selection,
            or,
            limit,
            ..
        } => {
            if from.is_some() || or.is_some() || limit.is_some() {
                return not_mine("UPDATE with FROM, OR or LIMIT");
            }
            ctx.alias = table_alias(single_relation(t)?);
            new_key = new_dist_value(&ctx, assignments)?;
            pinned(&ctx, selection.as_ref())?
        }
        ast::Statement::Delete(d) => {
            if !d.tables.is_empty()
                || d.using.is_some()
                || !d.order_by.is_empty()
                || d.limit.is_some()
            {
                return not_mine("DELETE with USING, ORDER BY or LIMIT");
            }
            let from = match &mut d.from {
                FromTable::WithFromKeyword(f) | FromTable::WithoutKeyword(f) => f,
            };
            let [t] = from.as_mut_slice() else {
                return not_mine("DELETE from several tables");
            };
            ctx.alias = table_alias(single_relation(t)?);
            pinned(&ctx, d.selection.as_ref())?
        }
        ast::Statement::Insert(ins) => insert_key(&mut ctx, ins)?,
        _ => return not_mine("not a SELECT, INSERT, UPDATE or DELETE"),
    };

    let sql_template = template(sql, &mut stmt)?;
    let mut targets = vec![Target {
        table: ctx.index,
        key,
    }];
    // The new value is an extra key of the table (it repeats the table and is not in
    // the template): the router runs the statement only if it chooses the row's own
    // shard, so that no row moves to a shard it does not belong to.
    targets.extend(new_key.map(|key| Target {
        table: ctx.index,
        key,
    }));
    Ok(PlanTemplate {
        targets,
        sql_template,
        merge: MergeKind::SingleShard,
    })
}

/// The catalog table a name refers to: `t` (when exactly one catalog table has that
/// name: the catalog view carries no search_path) or `schema.t`.
fn resolve<'a>(name: &ObjectName, tables: &'a [Table]) -> Result<(u32, &'a Table), Stop> {
    let found = planner_sql::matching_tables(
        name,
        tables.iter().map(|t| (t.schema.as_str(), t.name.as_str())),
    )
    .map_err(Stop::NotMine)?;
    match found.as_slice() {
        [i] => Ok((*i as u32, &tables[*i])),
        [] => not_mine(format!("{name} is not in the catalog view")),
        _ => not_mine(format!("{name} names tables of several schemas")),
    }
}

/// The relation of a plain `SELECT ... FROM t [alias] ...` (no CTE, no set operation,
/// no join, no SELECT INTO).
fn select_relation(q: &mut ast::Query) -> Result<&mut TableFactor, Stop> {
    if q.with.is_some() {
        return not_mine("a WITH query");
    }
    if !q.pipe_operators.is_empty() || q.for_clause.is_some() || q.settings.is_some() {
        return not_mine("a query clause the fast path does not know");
    }
    let select = match &mut *q.body {
        SetExpr::Select(s) => s,
        SetExpr::SetOperation { .. } => {
            return not_mine("a set operation (UNION/INTERSECT/EXCEPT)");
        }
        _ => return not_mine("not a plain SELECT"),
    };
    if select.into.is_some() {
        return not_mine("SELECT INTO creates a table");
    }
    let n = select.from.len();
    let [t] = select.from.as_mut_slice() else {
        return not_mine(format!("{n} FROM items, the fast path takes one"));
    };
    single_relation(t)
}

/// `t [alias]` without joins, as a plain table (not a table function).
fn single_relation(t: &mut TableWithJoins) -> Result<&mut TableFactor, Stop> {
    if !t.joins.is_empty() {
        return not_mine("a join");
    }
    match &t.relation {
        TableFactor::Table {
            args: None,
            version: None,
            sample: None,
            ..
        } => Ok(&mut t.relation),
        _ => not_mine("not a plain table reference"),
    }
}

/// The alias of a table reference, folded.
fn table_alias(t: &TableFactor) -> Option<String> {
    match t {
        TableFactor::Table { alias, .. } => alias.as_ref().map(|a| fold(&a.name)),
        _ => None,
    }
}

/// Whether an `ON CONFLICT DO UPDATE` sets the distribution column to anything but
/// itself or `EXCLUDED.<column>` (the inserted row's value, which chose this shard:
/// upserts that write every column do that).
fn sets_dist_elsewhere(ctx: &Ctx, assignments: &[ast::Assignment]) -> bool {
    let is_dist = |n: &ObjectName| {
        n.0.last()
            .and_then(ObjectNamePart::as_ident)
            .is_some_and(|i| fold(i) == ctx.dist)
    };
    let excluded = |e: &Expr| {
        matches!(e, Expr::CompoundIdentifier(p)
            if p.len() == 2 && fold(&p[0]) == "excluded" && fold(&p[1]) == ctx.dist)
    };
    assignments.iter().any(|a| match &a.target {
        AssignmentTarget::ColumnName(n) => {
            is_dist(n) && !ctx.is_dist(&a.value) && !excluded(&a.value)
        }
        AssignmentTarget::Tuple(ns) => ns.iter().any(is_dist),
    })
}

/// The value an UPDATE's SET gives the distribution column, as a key: `None` when it
/// does not set it or sets it to itself (`SET tenant = tenant`, as ORMs that write every
/// column do). A parameter or literal is allowed (the router checks that it chooses the
/// row's shard: `SET tenant = $1 ... WHERE tenant = $1`); anything else is refused, as
/// a row cannot move to another shard.
fn new_dist_value(ctx: &Ctx, assignments: &[ast::Assignment]) -> Result<Option<ShardKey>, Stop> {
    let is_dist = |n: &ObjectName| {
        n.0.last()
            .and_then(ObjectNamePart::as_ident)
            .is_some_and(|i| fold(i) == ctx.dist)
    };
    let cannot = || {
        refuse(format!(
            "cannot UPDATE the distribution column {} of {} to anything but a parameter or a literal of the row's own shard: a row cannot move to another shard",
            ctx.dist, ctx.table.name
        ))
    };
    let mut key = None;
    for a in assignments {
        match &a.target {
            AssignmentTarget::ColumnName(n) if is_dist(n) => {
                if ctx.is_dist(&a.value) {
                    continue;
                }
                match key_of(&a.value) {
                    Ok(Some(k)) => key = Some(k),
                    _ => return cannot(),
                }
            }
            AssignmentTarget::ColumnName(_) => {}
            AssignmentTarget::Tuple(ns) => {
                if ns.iter().any(is_dist) {
                    return cannot();
                }
            }
        }
    }
    Ok(key)
}

/// Whether two keys are the same parameter or the same literal.
fn same_key(a: &ShardKey, b: &ShardKey) -> bool {
    match (a, b) {
        (ShardKey::Param(x), ShardKey::Param(y)) => x == y,
        (ShardKey::Value(x), ShardKey::Value(y)) => match (x, y) {
            (Literal::Int8(x), Literal::Int8(y)) => x == y,
            (Literal::Text(x), Literal::Text(y)) => x == y,
            (Literal::Boolean(x), Literal::Boolean(y)) => x == y,
            _ => false,
        },
        _ => false,
    }
}

/// A shard key written in the SQL: a `$n` parameter or a literal (possibly cast,
/// parenthesised or negated). `Ok(None)`: NULL. `Err(())`: anything else.
fn key_of(e: &Expr) -> Result<Option<ShardKey>, ()> {
    match e {
        Expr::Nested(inner) => key_of(inner),
        Expr::Cast {
            expr, data_type, ..
        } if planner_sql::value_preserving_cast(data_type) => match key_of(expr)? {
            // A string read as an integer is that integer: `'007'::int` is 7 (and '7'
            // in a text column), not the text '007'.
            Some(ShardKey::Value(Literal::Text(s))) if planner_sql::integer_type(data_type) => {
                planner_sql::integer_text(&s)
                    .map(|v| Some(ShardKey::Value(Literal::Int8(v))))
                    .ok_or(())
            }
            k => Ok(k),
        },
        Expr::UnaryOp {
            op: UnaryOperator::Minus,
            expr,
        } => match &**expr {
            Expr::Value(v) => match &v.value {
                Value::Number(n, _) => n
                    .parse::<i128>()
                    .ok()
                    .and_then(|x| i64::try_from(-x).ok())
                    .map(|x| Some(ShardKey::Value(Literal::Int8(x))))
                    .ok_or(()),
                _ => Err(()),
            },
            _ => Err(()),
        },
        Expr::Value(v) => match &v.value {
            Value::Placeholder(p) => match p.strip_prefix('$').map(str::parse::<u32>) {
                Some(Ok(n)) if n >= 1 => Ok(Some(ShardKey::Param(n - 1))),
                _ => Err(()),
            },
            Value::Number(n, _) => n
                .parse::<i64>()
                .map(|x| Some(ShardKey::Value(Literal::Int8(x))))
                .map_err(|_| ()),
            Value::SingleQuotedString(s)
            | Value::EscapedStringLiteral(s)
            | Value::UnicodeStringLiteral(s)
            | Value::NationalStringLiteral(s) => {
                Ok(Some(ShardKey::Value(Literal::Text(s.clone()))))
            }
            Value::DollarQuotedString(d) => {
                Ok(Some(ShardKey::Value(Literal::Text(d.value.clone()))))
            }
            Value::Boolean(b) => Ok(Some(ShardKey::Value(Literal::Boolean(*b)))),
            Value::Null => Ok(None),
            _ => Err(()),
        },
        _ => Err(()),
    }
}

/// The conjuncts of the top-level AND of a condition.
fn conjuncts<'e>(e: &'e Expr, out: &mut Vec<&'e Expr>) {
    match e {
        Expr::Nested(inner) => conjuncts(inner, out),
        Expr::BinaryOp {
            left,
            op: BinaryOperator::And,
            right,
        } => {
            conjuncts(left, out);
            conjuncts(right, out);
        }
        _ => out.push(e),
    }
}

/// The key a WHERE clause pins: the first top-level conjunct `dist = <lit|$n>` (or
/// `<lit|$n> = dist`). Any pinning conjunct is correct: rows that pass live on the
/// shard of each of them.
fn pinned(ctx: &Ctx, selection: Option<&Expr>) -> Result<ShardKey, Stop> {
    let dist = ctx.dist;
    let Some(selection) = selection else {
        return not_mine(format!("no WHERE: every shard of {}", ctx.table.name));
    };
    let mut parts = Vec::new();
    conjuncts(selection, &mut parts);
    let mut null = false;
    for c in &parts {
        if let Expr::BinaryOp {
            left,
            op: BinaryOperator::Eq,
            right,
        } = c
        {
            let other = if ctx.is_dist(left) {
                right
            } else if ctx.is_dist(right) {
                left
            } else {
                continue;
            };
            match key_of(other) {
                Ok(Some(k)) => return Ok(k),
                Ok(None) => null = true,
                Err(()) => {}
            }
        }
    }
    if null {
        return not_mine(format!("{dist} = NULL is never true"));
    }
    // Say why, for the debug log.
    let why = parts
        .iter()
        .find_map(|c| match c {
            Expr::InList { expr, .. }
            | Expr::InSubquery { expr, .. }
            | Expr::InUnnest {
                array_expr: expr, ..
            } if ctx.is_dist(expr) => Some("IN (...) on it may span shards"),
            Expr::BinaryOp {
                op: BinaryOperator::Or,
                ..
            } => Some("an OR may span shards"),
            _ => None,
        })
        .unwrap_or("it is not compared by = with a literal or a parameter");
    not_mine(format!(
        "no key: the top-level AND of WHERE does not pin the distribution column {dist} ({why})"
    ))
}

/// The key of a one-row `INSERT INTO t (cols) VALUES (...)`.
fn insert_key(ctx: &mut Ctx, ins: &mut ast::Insert) -> Result<ShardKey, Stop> {
    let table = ctx.table.name.clone();
    if !matches!(ins.table, TableObject::TableName(_))
        || ins.or.is_some()
        || ins.ignore
        || ins.overwrite
        || ins.replace_into
        || ins.partitioned.is_some()
        || !ins.assignments.is_empty()
        || ins.insert_alias.is_some()
        || ins.settings.is_some()
        || ins.format_clause.is_some()
    {
        return not_mine("an INSERT form the fast path does not know");
    }
    ctx.alias = ins.table_alias.as_ref().map(fold);
    let Some(source) = &ins.source else {
        return not_mine("INSERT without VALUES");
    };
    if source.with.is_some() || source.order_by.is_some() || source.limit_clause.is_some() {
        return not_mine("INSERT with a WITH, ORDER BY or LIMIT");
    }
    let SetExpr::Values(values) = &*source.body else {
        return not_mine("INSERT ... SELECT");
    };
    if ins.columns.is_empty() && ctx.table.columns.is_empty() {
        return not_mine("INSERT without a column list (the catalog view has no column order)");
    }
    let columns: Vec<String> = if ins.columns.is_empty() {
        ctx.table.columns.clone()
    } else {
        ins.columns.iter().map(fold).collect()
    };
    let Some(pos) = columns.iter().position(|c| *c == ctx.dist) else {
        return refuse(format!(
            "INSERT into {table} must give its distribution column {}",
            ctx.dist
        ));
    };
    for row in &values.rows {
        if row.len() != columns.len() && (!ins.columns.is_empty() || row.len() <= pos) {
            return not_mine("INSERT with as many values as columns expected");
        }
    }
    if let Some(OnInsert::OnConflict(c)) = &ins.on
        && let OnConflictAction::DoUpdate(u) = &c.action
        && sets_dist_elsewhere(ctx, &u.assignments)
    {
        return refuse(format!(
            "ON CONFLICT DO UPDATE cannot set the distribution column {} of {table}",
            ctx.dist
        ));
    }
    // Several rows: one shard when every row has the same key (the host's normaliser
    // gives identical literals one parameter); rows of several tenants would need
    // splitting per shard, which is not done yet.
    let first = key_of(&values.rows[0][pos]);
    let same = |k: &Result<Option<ShardKey>, ()>| match (k, &first) {
        (Ok(Some(a)), Ok(Some(b))) => same_key(a, b),
        _ => false,
    };
    if values.rows[1..].iter().any(|r| !same(&key_of(&r[pos]))) {
        return not_mine(format!(
            "a multi-row INSERT whose rows have different values of the distribution column {} (splitting per shard is not done yet)",
            ctx.dist
        ));
    }
    match first {
        Ok(Some(k)) => Ok(k),
        Ok(None) => refuse(format!(
            "the distribution column {} of {table} cannot be NULL",
            ctx.dist
        )),
        Err(()) => not_mine(format!(
            "the value of the distribution column {} is not a literal or a parameter",
            ctx.dist
        )),
    }
}

/// The statement with its table reference replaced by `{t0}` (its name as alias if
/// it had none). The name is first replaced by a placeholder identifier that does not
/// occur in the text, the AST re-serialised, then the placeholder (exactly one) becomes
/// `{t0}`: string literals and other identifiers are never touched.
fn template(sql: &str, stmt: &mut ast::Statement) -> Result<String, Stop> {
    let lower = sql.to_lowercase();
    let placeholder = (0u32..)
        .map(|i| format!("sg_shard_table_{i}"))
        .find(|p| !lower.contains(p.as_str()))
        .expect("a free placeholder");
    let mut replace = |name: &mut ObjectName, has_alias: bool| -> Option<Ident> {
        let own = name.0.last().and_then(ObjectNamePart::as_ident).cloned();
        *name = ObjectName::from(vec![Ident::new(placeholder.clone())]);
        if has_alias { None } else { own }
    };
    match stmt {
        ast::Statement::Query(q) => {
            let relation = select_relation(q)?;
            set_alias(relation, &mut replace);
        }
        ast::Statement::Update { table, .. } => set_alias(&mut table.relation, &mut replace),
        ast::Statement::Delete(d) => match &mut d.from {
            FromTable::WithFromKeyword(f) | FromTable::WithoutKeyword(f) => {
                set_alias(&mut f[0].relation, &mut replace)
            }
        },
        ast::Statement::Insert(ins) => {
            if let TableObject::TableName(name) = &mut ins.table {
                if let Some(own) = replace(name, ins.table_alias.is_some()) {
                    ins.table_alias = Some(own);
                }
            }
        }
        _ => return not_mine("not a SELECT, INSERT, UPDATE or DELETE"),
    }
    planner_sql::parenthesize_prefix_operands(stmt);
    let text = stmt.to_string();
    if text.matches(placeholder.as_str()).count() != 1 {
        return not_mine("the table reference could not be isolated in the re-serialised text");
    }
    Ok(text.replace(placeholder.as_str(), "{t0}"))
}

fn set_alias(
    relation: &mut TableFactor,
    replace: &mut impl FnMut(&mut ObjectName, bool) -> Option<Ident>,
) {
    if let TableFactor::Table { name, alias, .. } = relation
        && let Some(own) = replace(name, alias.is_some())
    {
        *alias = Some(ast::TableAlias {
            name: own,
            columns: Vec::new(),
        });
    }
}
