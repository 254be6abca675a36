//! `planner-router`: the second planner tier (after `planner-fastpath`). It takes one
//! statement whose distributed tables are all *pinned*, those of one colocation group
//! to the same distribution value, so that the whole statement runs unchanged (but for
//! the table names) on the one node that holds the chosen shards: joins,
//! subqueries in FROM / WHERE / the SELECT list, CTEs (recursive and data-modifying
//! ones too), window functions, aggregates, set operations, joins with reference
//! tables; UPDATE / DELETE (with FROM / USING), INSERT ... VALUES (every row with the
//! same key) and INSERT ... SELECT, with ON CONFLICT and RETURNING. A statement that
//! touches only reference tables is this tier's too (every target `all-shards`).
//! Everything else is `not-mine` with a short reason.
//!
//! # When an occurrence of a table is pinned
//!
//! Running the statement on one shard instead of on the whole table means deleting,
//! for every occurrence of a distributed table, the rows of the other shards. An
//! occurrence `o` is *pinned to v* when deleting its rows whose distribution column is
//! not `v` cannot change the statement's result. We only ever conclude that from these
//! facts ("restricting" facts), applied one occurrence at a time, each step in the world
//! where the previous occurrences are already cut down:
//!
//! 1. A top-level AND-conjunct `o.dist = v` (`v` a literal or a `$n`; `IN (v)` with one
//!    value counts) of the WHERE of the block whose FROM holds `o`. Rows of `o` with
//!    another value only reach the WHERE in combinations the conjunct rejects, and
//!    whatever outer join produced a combination, a NULL-extended `o` fails the
//!    conjunct too (`=` is strict). Removing them can only turn such combinations into
//!    NULL-extended ones, which the same conjunct rejects.
//! 2. `o.dist = x` where `x` is already pinned (another occurrence's distribution column,
//!    in this block or an outer one, or a column of a derived table / CTE known to hold
//!    only `v` or NULL, see below): with `x` cut down, `o`'s other rows have no partner
//!    that makes the conjunct true. Transitively, this is a closure over the facts.
//! 3. The same two kinds of conjunct in the ON of a join, restricting only the sides
//!    whose unmatched rows the join drops: both sides of an inner join, the right side
//!    of a LEFT JOIN, the left side of a RIGHT JOIN, neither side of a FULL JOIN. A
//!    preserved side keeps all its rows (NULL-extended) whatever the ON says, so an ON
//!    never pins it; but `x LEFT JOIN o ON o.dist = x.dist` with `x` pinned pins `o`:
//!    the rows of `o` with another value match nothing and a LEFT JOIN drops them.
//!    `USING (dist)` is an equality like the ON one.
//! 4. `o.dist IN (subquery)` / `o.dist = (subquery)` where the subquery's only column
//!    holds only `v` (or NULL): a semi-join, restricting like rule 2.
//!
//! Nothing else pins: an OR, an IN list of several values, `<>`, ranges, `dist` compared
//! with any other expression, conditions in HAVING, pins "pushed into" a derived table
//! from outside. A column of a derived table, CTE or VALUES list is known to hold only
//! `v` (or NULL) when the select-list item is a pinned distribution column (or such a
//! column of a deeper derived table), or the literal / parameter `v` itself; a set
//! operation's column when it is so in every branch; a recursive CTE's column when it is
//! so in the non-recursive branch and, assuming it for the CTE, in every recursive one
//! (induction over the iterations); otherwise it is checked again without the
//! assumption.
//!
//! Every occurrence of every distributed table (in subqueries, CTEs, every branch of a
//! set operation, UPDATE / DELETE targets and their FROM / USING) must be pinned, those
//! of one colocation group all to the same `v` (the same `$n`, or the same literal). An
//! occurrence of a table of one shard needs no pin (all its rows are on that shard).
//! Tables of different colocation groups may be pinned to different values: their
//! shards need not be on one node, and the router refuses the plan at run time when no
//! node holds all of them. A key may be an integer expression of literals (`1 + 1`),
//! folded as Postgres folds it (an overflow is not folded). A statement the SQL parser
//! rejects only for `position(a IN b)` (in FROM) is planned as Postgres's grammar
//! reads it, `pg_catalog.position(b, a)` (see `position.rs`). An
//! occurrence pinned to two different values is refused too: its key is not known
//! until the parameters are bound. A local table, or a name that is neither a table of
//! the catalog view nor a CTE (a view, a local table the view does not list), is
//! `not-mine`. Writing a reference table in a statement that also touches a distributed
//! table is `not-mine` (it must be written on every node). Functions that read tables
//! are not seen.
//!
//! # Names
//!
//! Column references are resolved as Postgres does, innermost block first, but we do
//! not know the columns of the tables (only their distribution column), so a reference
//! is resolved only when that is certain: `q.col` by the FROM item named `q` (alias, or
//! the table's own name); an unqualified `col` by the one item of the innermost block
//! that surely has it, provided no item of that block or of any inner block might have
//! it (if another item of the same block also has it, Postgres refuses the statement as
//! ambiguous). Columns merged by `USING` and three-part names are not resolved (a
//! three-part column name is `not-mine`: the template renames the table). Unquoted
//! identifiers fold to lower case. A table name resolves as in `planner-fastpath`: the
//! schema-qualified name, or the one table of that name, or the one in `public` when
//! several schemas have it.
//!
//! # Template
//!
//! The statement re-serialised from its AST, each reference to a catalog table replaced
//! by `{tN}` (one target per distinct table, in order of first appearance), keeping its
//! alias or given its own name as alias. Distributed targets are keyed by the pinned
//! value, reference targets `all-shards`; the merge is `single-shard`.

wit_bindgen::generate!({ world: "planner-tier", path: "../../wit/planner" });

mod analysis;
mod position;

use exports::shardgate::planner::planner::{
    CatalogView, Guest, Literal, MergeKind, PlanResult, PlanTemplate, ShardKey, Statement, Table,
    TableKind, Target,
};
use sqlparser::ast::{
    self, BinaryOperator, Expr, Ident, ObjectName, ObjectNamePart, TableFactor, TableObject,
    UnaryOperator, Value, VisitMut, VisitorMut,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use std::ops::ControlFlow;

struct Router;

impl Guest for Router {
    fn name() -> String {
        "planner-router".into()
    }

    fn plan(stmt: Statement, catalog: CatalogView) -> Result<PlanResult, String> {
        match plan(&stmt.sql, &catalog.tables) {
            Ok(t) => Ok(PlanResult::Plan(t)),
            Err(Stop::NotMine(reason)) => Ok(PlanResult::NotMine(reason)),
            Err(Stop::Refuse(message)) => Err(message),
        }
    }
}

export!(Router);

/// Why no plan: not this tier's statement, or this tier's but it cannot run.
#[derive(Debug)]
enum Stop {
    NotMine(String),
    Refuse(String),
}

fn not_mine<T>(reason: impl Into<String>) -> Result<T, Stop> {
    Err(Stop::NotMine(reason.into()))
}

/// A distribution value as written: a parameter or a literal (compared by syntax: `1`
/// and `'1'` are different values here).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Key {
    /// `$n+1`.
    Param(u32),
    Int(i64),
    Text(String),
    Bool(bool),
}

impl Key {
    fn shard_key(&self) -> ShardKey {
        match self {
            Key::Param(i) => ShardKey::Param(*i),
            Key::Int(v) => ShardKey::Value(Literal::Int8(*v)),
            Key::Text(v) => ShardKey::Value(Literal::Text(v.clone())),
            Key::Bool(v) => ShardKey::Value(Literal::Boolean(*v)),
        }
    }
}

use planner_sql::fold;

/// A key written in the SQL: a `$n` parameter or a literal (possibly cast,
/// parenthesised or negated). `Ok(None)`: NULL. `Err(())`: anything else.
fn key_of(e: &Expr) -> Result<Option<Key>, ()> {
    match e {
        Expr::Nested(inner) => key_of(inner),
        Expr::Cast {
            expr, data_type, ..
        } if planner_sql::value_preserving_cast(data_type) => match key_of(expr)? {
            // A string read as an integer is that integer: `'007'::int` is 7 (and '7'
            // in a text column), not the text '007'.
            Some(Key::Text(s)) if planner_sql::integer_type(data_type) => {
                planner_sql::integer_text(&s)
                    .map(|v| Some(Key::Int(v)))
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
                    .map(|x| Some(Key::Int(x)))
                    .ok_or(()),
                _ => Err(()),
            },
            _ => Err(()),
        },
        // Integer arithmetic on literals (`1 + 1`), folded as Postgres would; an
        // overflow is not folded (Postgres fails the statement on any shard).
        Expr::BinaryOp { left, op, right } => match (key_of(left)?, key_of(right)?) {
            (Some(Key::Int(a)), Some(Key::Int(b))) => match op {
                BinaryOperator::Plus => a.checked_add(b),
                BinaryOperator::Minus => a.checked_sub(b),
                BinaryOperator::Multiply => a.checked_mul(b),
                _ => None,
            }
            .map(|v| Some(Key::Int(v)))
            .ok_or(()),
            _ => Err(()),
        },
        Expr::Value(v) => match &v.value {
            Value::Placeholder(p) => match p.strip_prefix('$').map(str::parse::<u32>) {
                Some(Ok(n)) if n >= 1 => Ok(Some(Key::Param(n - 1))),
                _ => Err(()),
            },
            Value::Number(n, _) => n.parse::<i64>().map(|x| Some(Key::Int(x))).map_err(|_| ()),
            Value::SingleQuotedString(s)
            | Value::EscapedStringLiteral(s)
            | Value::UnicodeStringLiteral(s)
            | Value::NationalStringLiteral(s) => Ok(Some(Key::Text(s.clone()))),
            Value::DollarQuotedString(d) => Ok(Some(Key::Text(d.value.clone()))),
            Value::Boolean(b) => Ok(Some(Key::Bool(*b))),
            Value::Null => Ok(None),
            _ => Err(()),
        },
        _ => Err(()),
    }
}

/// The catalog table a name refers to: `schema.t`, or `t` when one catalog table has
/// that name, or the one of schema `public` when several have. `Ok(None)`: no such
/// table.
fn resolve(name: &ObjectName, tables: &[Table]) -> Result<Option<usize>, Stop> {
    let mut found = planner_sql::matching_tables(
        name,
        tables.iter().map(|t| (t.schema.as_str(), t.name.as_str())),
    )
    .map_err(Stop::NotMine)?;
    if found.len() > 1 && name.0.len() == 1 {
        found.retain(|i| tables[*i].schema == "public");
    }
    match found.as_slice() {
        [i] => Ok(Some(*i)),
        [] => Ok(None),
        _ => not_mine(format!("{name} names tables of several schemas")),
    }
}

/// A prefix that occurs nowhere in the (lower-cased) SQL text.
fn free_prefix(lower: &str, base: &str) -> String {
    (0u32..)
        .map(|i| format!("{base}{i}_"))
        .find(|p| !lower.contains(p.as_str()))
        .expect("a free prefix")
}

/// The index a tagged relation name carries (`<tag><i>_`).
fn tag_index(name: &ObjectName, tag: &str) -> Option<usize> {
    let [ObjectNamePart::Identifier(id)] = name.0.as_slice() else {
        return None;
    };
    id.value.strip_prefix(tag)?.strip_suffix('_')?.parse().ok()
}

fn plan(sql: &str, tables: &[Table]) -> Result<PlanTemplate, Stop> {
    if sql.contains("{t") {
        return not_mine("the text contains `{t`, which plan templates reserve");
    }
    let rewritten: Option<String>;
    let (mut statements, sql) = match Parser::parse_sql(&PostgreSqlDialect {}, sql) {
        Ok(s) => (s, sql),
        Err(e) => {
            rewritten = position::rewrite(sql);
            match rewritten.as_deref() {
                Some(text) => match Parser::parse_sql(&PostgreSqlDialect {}, text) {
                    Ok(s) => (s, text),
                    Err(_) => return not_mine(format!("does not parse: {e}")),
                },
                None => return not_mine(format!("does not parse: {e}")),
            }
        }
    };
    if statements.len() != 1 {
        return not_mine(format!("{} statements, not one", statements.len()));
    }
    let mut stmt = statements.pop().expect("one statement");
    if !matches!(
        stmt,
        ast::Statement::Query(_)
            | ast::Statement::Insert(_)
            | ast::Statement::Update { .. }
            | ast::Statement::Delete(_)
    ) {
        return not_mine("not a SELECT, INSERT, UPDATE or DELETE");
    }
    let three_part = ast::visit_expressions(&stmt, |e| match e {
        Expr::CompoundIdentifier(p) if p.len() > 2 => ControlFlow::Break(()),
        _ => ControlFlow::Continue(()),
    });
    if three_part.is_break() {
        return not_mine("a column named with its schema (schema.table.column)");
    }

    // Every relation name gets a tag carrying its index, so that the analysis (which
    // works on copies of subqueries) and the rewrite agree on which reference is which.
    let lower = sql.to_lowercase();
    let tag = free_prefix(&lower, "sg_rel_");
    let slot = free_prefix(&lower, "sg_table_");
    let mut rels: Vec<ObjectName> = Vec::new();
    let _ = ast::visit_relations_mut(&mut stmt, |name| {
        let i = rels.len();
        rels.push(name.clone());
        *name = ObjectName::from(vec![Ident::new(format!("{tag}{i}_"))]);
        ControlFlow::<()>::Continue(())
    });

    let found = analysis::analyze(&stmt, tables, &rels, &tag)?;

    // One target per distinct catalog table, in order of first appearance.
    let mut target_tables: Vec<usize> = Vec::new();
    let mut slot_of: Vec<Option<usize>> = vec![None; rels.len()];
    for (rel, role) in found.roles.iter().enumerate() {
        if let analysis::Role::Catalog(t) = role {
            let n = match target_tables.iter().position(|x| x == t) {
                Some(n) => n,
                None => {
                    target_tables.push(*t);
                    target_tables.len() - 1
                }
            };
            slot_of[rel] = Some(n);
        }
    }
    let mut rewrite = Rewrite {
        tag: &tag,
        slot: &slot,
        rels: &rels,
        slot_of: &slot_of,
    };
    let _ = stmt.visit(&mut rewrite);
    planner_sql::parenthesize_prefix_operands(&mut stmt);
    let mut text = stmt.to_string();
    if text.contains(tag.as_str()) {
        return not_mine("a table reference could not be isolated in the re-serialised text");
    }
    for n in 0..target_tables.len() {
        let placeholder = format!("{slot}{n}_");
        if !text.contains(placeholder.as_str()) {
            return not_mine("a table reference vanished from the re-serialised text");
        }
        text = text.replace(placeholder.as_str(), &format!("{{t{n}}}"));
    }
    if text.contains(slot.as_str()) {
        return not_mine("a table reference could not be isolated in the re-serialised text");
    }
    let mut targets: Vec<Target> = target_tables
        .iter()
        .map(|t| Target {
            table: *t as u32,
            key: match tables[*t].kind {
                TableKind::Distributed => found
                    .keys
                    .iter()
                    .find(|(g, _)| *g == tables[*t].colocation_id)
                    .and_then(|(_, k)| k.as_ref())
                    .map_or(ShardKey::AllShards, Key::shard_key),
                _ => ShardKey::AllShards,
            },
        })
        .collect();
    // Extra keys of a group: a target repeating one of its tables (not in the
    // template), which the router checks chooses the same shard.
    for (g, k) in &found.extra {
        if let Some(t) = target_tables
            .iter()
            .find(|t| tables[**t].kind == TableKind::Distributed && tables[**t].colocation_id == *g)
        {
            targets.push(Target {
                table: *t as u32,
                key: k.shard_key(),
            });
        }
    }
    Ok(PlanTemplate {
        targets,
        sql_template: text,
        merge: MergeKind::SingleShard,
    })
}

/// Puts the names back: `<slot>N_` for catalog tables (given their own name as alias
/// when they have none), the original name for CTE references and table functions.
struct Rewrite<'a> {
    tag: &'a str,
    slot: &'a str,
    rels: &'a [ObjectName],
    slot_of: &'a [Option<usize>],
}

impl Rewrite<'_> {
    /// The table's own name, as alias, if `name` is a catalog table reference.
    fn own_alias(&self, name: &ObjectName) -> Option<Ident> {
        let i = tag_index(name, self.tag)?;
        self.slot_of.get(i)?.as_ref()?;
        self.rels[i].0.last()?.as_ident().cloned()
    }
}

impl VisitorMut for Rewrite<'_> {
    type Break = ();

    fn pre_visit_table_factor(&mut self, tf: &mut TableFactor) -> ControlFlow<()> {
        if let TableFactor::Table {
            name,
            alias: alias @ None,
            args: None,
            ..
        } = tf
            && let Some(own) = self.own_alias(name)
        {
            *alias = Some(ast::TableAlias {
                name: own,
                columns: Vec::new(),
            });
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_statement(&mut self, st: &mut ast::Statement) -> ControlFlow<()> {
        if let ast::Statement::Insert(ins) = st
            && ins.table_alias.is_none()
            && let TableObject::TableName(name) = &ins.table
        {
            ins.table_alias = self.own_alias(name);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_relation(&mut self, name: &mut ObjectName) -> ControlFlow<()> {
        if let Some(i) = tag_index(name, self.tag) {
            *name = match self.slot_of[i] {
                Some(n) => ObjectName::from(vec![Ident::new(format!("{}{n}_", self.slot))]),
                None => self.rels[i].clone(),
            };
        }
        ControlFlow::Continue(())
    }
}
