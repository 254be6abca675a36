//! The pinning analysis (see the crate doc for the rules): walks the statement block by
//! block, registers every table occurrence, turns the restricting conjuncts into a
//! small graph of "holds only the value of" edges, and solves it.

use crate::{Key, Stop, Table, TableKind, fold, key_of, not_mine, resolve, tag_index};
use sqlparser::ast::{
    self, Assignment, AssignmentTarget, BinaryOperator, Expr, FromTable, JoinConstraint,
    JoinOperator, ObjectName, ObjectNamePart, OnConflictAction, OnInsert, Query, Select,
    SelectItem, SelectItemQualifiedWildcardKind, SetExpr, TableAlias, TableFactor, TableObject,
    TableWithJoins, UpdateTableFromKind, Visit, Visitor,
};
use std::ops::ControlFlow;

/// What a tagged relation name turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// A table of the catalog view (its index).
    Catalog(usize),
    /// A CTE reference or a table function: left as written.
    Keep,
}

pub(crate) struct Found {
    /// Per tagged relation.
    pub roles: Vec<Role>,
    /// Per colocation group of the distributed occurrences, the value they are all
    /// pinned to (`None` for a group of one-shard tables: any value is on its shard).
    /// Tables of different groups may be pinned to different values; the router runs
    /// the statement only on a node that holds every chosen shard.
    pub keys: Vec<(i32, Option<Key>)>,
    /// The other values occurrences of a group are pinned to (`a.tenant = $1 AND
    /// e.tenant = $2`, with `$1` in `keys`): the router runs the statement only if they
    /// choose the same shard (when the values differ, rows of both are on that shard).
    pub extra: Vec<(i32, Key)>,
}

/// Analyses a statement whose relation names carry tags (`rels[i]` is the original of
/// tag `i`).
pub(crate) fn analyze(
    stmt: &ast::Statement,
    tables: &[Table],
    rels: &[ObjectName],
    tag: &str,
) -> Result<Found, Stop> {
    let mut a = Analysis {
        tables,
        rels,
        tag,
        roles: vec![None; rels.len()],
        nodes: Vec::new(),
        occs: Vec::new(),
        blocks: Vec::new(),
        ctes: Vec::new(),
        writes_reference: false,
        refusal: None,
    };
    match stmt {
        ast::Statement::Query(q) => {
            a.query(q)?;
        }
        _ => {
            a.dml(stmt)?;
        }
    }
    a.finish()
}

/// A node of the graph: a distributed occurrence's distribution column (`and` false:
/// any fact pins it) or a column of a set operation (`and` true: pinned when every
/// branch is).
#[derive(Default)]
struct Node {
    and: bool,
    /// A set-operation column some branch does not pin.
    dead: bool,
    /// A recursive CTE's column, assumed from its non-recursive branch (checked after).
    optimistic: bool,
    facts: Vec<Key>,
    /// (source node, from a recursive branch).
    inputs: Vec<(usize, bool)>,
    value: Option<Key>,
}

/// One occurrence of a catalog table.
struct Occ {
    table: usize,
    /// Distributed tables only.
    node: Option<usize>,
}

/// An output column of a block: its name (None: not certain) and the node that says
/// which value it holds.
#[derive(Clone, Debug)]
struct Col {
    name: Option<String>,
    node: Option<usize>,
}

/// The output columns of a block, a derived table or a CTE.
#[derive(Clone, Debug)]
struct Out {
    cols: Vec<Col>,
    /// Every column is listed, in order.
    positional: bool,
    /// Every column's name is listed (else another column may have any name).
    names_complete: bool,
}

impl Out {
    fn opaque() -> Out {
        Out {
            cols: Vec::new(),
            positional: false,
            names_complete: false,
        }
    }
}

/// Whether a FROM item has a column.
enum Has {
    Surely(Option<usize>),
    Maybe,
    No,
}

#[derive(Clone)]
enum ItemKind {
    /// A catalog table; `dist` is the name its distribution column goes by (None: not a
    /// distributed table, or its columns are renamed and their order is not known);
    /// `columns` its column names (after renames), when the catalog view has them.
    Occ {
        occ: usize,
        dist: Option<String>,
        columns: Option<Vec<String>>,
    },
    /// A derived table, CTE reference or table function.
    Derived(Out),
}

#[derive(Clone)]
struct Item {
    /// The alias, or the table's own name.
    name: String,
    kind: ItemKind,
}

/// One query block: its FROM items, for name resolution.
#[derive(Clone, Default)]
struct Block {
    items: Vec<Item>,
    /// Columns merged by `JOIN ... USING`: not resolved unqualified.
    using: Vec<String>,
    /// The outputs of the block's subqueries in expressions, by address.
    subqueries: Vec<(usize, Out)>,
}

/// What an expression is, as far as pinning goes.
enum Term {
    /// A column of an item of `blocks[level]`.
    Col {
        level: usize,
        item: usize,
        node: Option<usize>,
    },
    Node(usize),
    Value(Key),
    Other,
}

/// A join condition waiting for its block: the condition and the items it restricts.
enum JoinFact<'s> {
    On(&'s Expr, Vec<usize>),
    Using {
        left: (usize, Option<usize>),
        right: (usize, Option<usize>),
        restricted: Vec<usize>,
    },
}

struct Analysis<'a> {
    tables: &'a [Table],
    rels: &'a [ObjectName],
    tag: &'a str,
    roles: Vec<Option<Role>>,
    nodes: Vec<Node>,
    occs: Vec<Occ>,
    /// Innermost last.
    blocks: Vec<Block>,
    /// CTE frames, innermost last; None: a CTE of a WITH RECURSIVE not analysed yet.
    ctes: Vec<Vec<(String, Option<Out>)>>,
    /// A reference table is written (it must be written on every node).
    writes_reference: bool,
    /// A reason to refuse the statement if it is otherwise this tier's.
    refusal: Option<String>,
}

/// Collects the immediate subqueries of an AST fragment (not the ones nested in them).
#[derive(Default)]
struct Subqueries {
    depth: usize,
    found: Vec<(usize, Query)>,
}

impl Visitor for Subqueries {
    type Break = ();

    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
        if self.depth == 0 {
            self.found.push((q as *const Query as usize, q.clone()));
        }
        self.depth += 1;
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, _: &Query) -> ControlFlow<()> {
        self.depth -= 1;
        ControlFlow::Continue(())
    }
}

/// An AST fragment whose subqueries are collected (`Visit` is not dyn-compatible).
trait Part {
    fn collect(&self, v: &mut Subqueries);
}

impl<T: Visit> Part for T {
    fn collect(&self, v: &mut Subqueries) {
        let _ = self.visit(v);
    }
}

/// The top-level AND-conjuncts of a condition (`(c) IS TRUE` is `c`).
fn conjuncts<'e>(e: &'e Expr, out: &mut Vec<&'e Expr>) {
    match e {
        Expr::Nested(inner) | Expr::IsTrue(inner) => conjuncts(inner, out),
        Expr::BinaryOp {
            left,
            op: BinaryOperator::Eq,
            right,
        } if matches!(&**right, Expr::Value(v) if v.value == ast::Value::Boolean(true)) => {
            conjuncts(left, out)
        }
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

/// The name Postgres gives an output column, when certain.
fn col_name(e: &Expr) -> Option<String> {
    match e {
        Expr::Identifier(id) => Some(fold(id)),
        Expr::CompoundIdentifier(p) => p.last().map(fold),
        Expr::Nested(inner) => col_name(inner),
        Expr::Cast { expr, .. }
            if matches!(**expr, Expr::Identifier(_) | Expr::CompoundIdentifier(_)) =>
        {
            col_name(expr)
        }
        _ => None,
    }
}

/// The names a table occurrence's distribution column and columns go by, given the
/// column aliases of its FROM item.
fn occ_names(
    table: &Table,
    aliases: &[ast::TableAliasColumnDef],
) -> (Option<String>, Option<Vec<String>>) {
    let dist = table
        .distribution_column
        .clone()
        .filter(|_| table.kind == TableKind::Distributed);
    if table.columns.is_empty() {
        // Columns not known: renamed ones cannot be followed.
        return (dist.filter(|_| aliases.is_empty()), None);
    }
    if aliases.len() > table.columns.len() {
        return (None, None);
    }
    let mut cols = table.columns.clone();
    for (c, a) in cols.iter_mut().zip(aliases) {
        *c = fold(&a.name);
    }
    let dist = dist.and_then(|d| {
        let p = table.columns.iter().position(|c| *c == d)?;
        Some(cols[p].clone())
    });
    (dist, Some(cols))
}

/// Renames columns by a `name(a, b, ...)` alias.
fn renamed(out: Out, alias: Option<&TableAlias>) -> Out {
    let Some(alias) = alias.filter(|a| !a.columns.is_empty()) else {
        return out;
    };
    if !out.positional || alias.columns.len() > out.cols.len() {
        return Out::opaque();
    }
    let mut out = out;
    for (c, a) in out.cols.iter_mut().zip(&alias.columns) {
        c.name = Some(fold(&a.name));
    }
    out.names_complete = out.cols.iter().all(|c| c.name.is_some());
    out
}

/// The leaves of a set operation.
fn branches<'q>(e: &'q SetExpr, out: &mut Vec<&'q SetExpr>) {
    match e {
        SetExpr::SetOperation { left, right, .. } => {
            branches(left, out);
            branches(right, out);
        }
        other => out.push(other),
    }
}

fn assigns(assignments: &[Assignment], col: &str) -> bool {
    let is = |n: &ObjectName| {
        n.0.last()
            .and_then(ObjectNamePart::as_ident)
            .is_some_and(|i| fold(i) == col)
    };
    assignments.iter().any(|a| match &a.target {
        AssignmentTarget::ColumnName(n) => is(n),
        AssignmentTarget::Tuple(ns) => ns.iter().any(is),
    })
}

impl<'a> Analysis<'a> {
    fn node(&mut self, n: Node) -> usize {
        self.nodes.push(n);
        self.nodes.len() - 1
    }

    fn value_node(&mut self, k: Key) -> usize {
        self.node(Node {
            facts: vec![k],
            ..Node::default()
        })
    }

    fn claim(&mut self, rel: usize, role: Role) -> Result<(), Stop> {
        match self.roles.get_mut(rel) {
            Some(slot @ None) => {
                *slot = Some(role);
                Ok(())
            }
            _ => not_mine("a table reference seen twice"),
        }
    }

    fn rel_index(&self, name: &ObjectName) -> Result<usize, Stop> {
        match tag_index(name, self.tag) {
            Some(i) if i < self.rels.len() => Ok(i),
            _ => not_mine("a table reference in an unexpected place"),
        }
    }

    fn cte(&self, name: &str) -> Option<Out> {
        for frame in self.ctes.iter().rev() {
            if let Some((_, out)) = frame.iter().rev().find(|(n, _)| n == name) {
                return Some(out.clone().unwrap_or_else(Out::opaque));
            }
        }
        None
    }

    /// Registers a catalog table occurrence (a local or unknown table is not-mine).
    fn occurrence(&mut self, rel: usize) -> Result<(usize, &'a Table), Stop> {
        let name = &self.rels[rel];
        let Some(t) = resolve(name, self.tables)? else {
            return not_mine(format!(
                "{name} is not in the catalog view (a local table or a view?)"
            ));
        };
        let table = &self.tables[t];
        let node = match table.kind {
            TableKind::Local => return not_mine(format!("{} is a local table", table.name)),
            TableKind::Reference => None,
            TableKind::Distributed => {
                if table.distribution_column.is_none() {
                    return not_mine(format!("{} has no distribution column", table.name));
                }
                Some(self.node(Node::default()))
            }
        };
        self.claim(rel, Role::Catalog(t))?;
        self.occs.push(Occ { table: t, node });
        Ok((self.occs.len() - 1, table))
    }

    /// A `FROM name [alias]` item: a CTE or a catalog table.
    fn relation(&mut self, rel: usize, alias: Option<&TableAlias>) -> Result<Item, Stop> {
        let name = &self.rels[rel];
        let own = match name.0.last().and_then(ObjectNamePart::as_ident) {
            Some(id) => fold(id),
            None => return not_mine(format!("unusual table name {name}")),
        };
        let item_name = alias.map(|a| fold(&a.name)).unwrap_or_else(|| own.clone());
        if name.0.len() == 1
            && let Some(out) = self.cte(&own)
        {
            self.claim(rel, Role::Keep)?;
            return Ok(Item {
                name: item_name,
                kind: ItemKind::Derived(renamed(out, alias)),
            });
        }
        let (occ, table) = self.occurrence(rel)?;
        let (dist, columns) = occ_names(
            table,
            alias.map(|a| a.columns.as_slice()).unwrap_or_default(),
        );
        Ok(Item {
            name: item_name,
            kind: ItemKind::Occ { occ, dist, columns },
        })
    }

    fn has(&self, item: &Item, col: &str) -> Has {
        match &item.kind {
            ItemKind::Occ { occ, dist, columns } => match (dist, columns) {
                (Some(d), _) if d == col => Has::Surely(self.occs[*occ].node),
                (_, Some(cols)) if cols.iter().any(|c| c == col) => Has::Surely(None),
                (_, Some(_)) => Has::No,
                (_, None) => Has::Maybe,
            },
            ItemKind::Derived(out) => {
                let mut hits = out.cols.iter().filter(|c| c.name.as_deref() == Some(col));
                match (hits.next(), hits.next()) {
                    (Some(c), None) => Has::Surely(c.node),
                    // Ambiguous: Postgres refuses it.
                    (Some(_), Some(_)) => Has::Surely(None),
                    (None, _) if out.names_complete => Has::No,
                    (None, _) => Has::Maybe,
                }
            }
        }
    }

    /// The item (level, index) that has `col` among `items`, if exactly one surely has
    /// it; `Err(())` when it cannot be told.
    fn unqualified_in(
        &self,
        items: &[Item],
        col: &str,
    ) -> Result<Option<(usize, Option<usize>)>, ()> {
        let mut surely = Vec::new();
        let mut maybe = false;
        for (i, it) in items.iter().enumerate() {
            match self.has(it, col) {
                Has::Surely(n) => surely.push((i, n)),
                Has::Maybe => maybe = true,
                Has::No => {}
            }
        }
        match surely.as_slice() {
            [one] => Ok(Some(*one)),
            [] if !maybe => Ok(None),
            _ => Err(()),
        }
    }

    /// Resolves a column reference (see the crate doc, "Names").
    fn column(&self, e: &Expr) -> Option<(usize, usize, Option<usize>)> {
        match e {
            Expr::Nested(inner) => self.column(inner),
            Expr::Identifier(id) => {
                let col = fold(id);
                for level in (0..self.blocks.len()).rev() {
                    let b = &self.blocks[level];
                    if b.using.contains(&col) {
                        return None;
                    }
                    match self.unqualified_in(&b.items, &col) {
                        Ok(Some((i, n))) => return Some((level, i, n)),
                        Ok(None) => continue,
                        Err(()) => return None,
                    }
                }
                None
            }
            Expr::CompoundIdentifier(p) if p.len() == 2 => {
                let (q, col) = (fold(&p[0]), fold(&p[1]));
                for level in (0..self.blocks.len()).rev() {
                    let items = &self.blocks[level].items;
                    let mut named = items.iter().enumerate().filter(|(_, it)| it.name == q);
                    match (named.next(), named.next()) {
                        (Some((i, it)), None) => {
                            let node = match self.has(it, &col) {
                                Has::Surely(n) => n,
                                _ => None,
                            };
                            return Some((level, i, node));
                        }
                        (None, _) => continue,
                        _ => return None,
                    }
                }
                None
            }
            _ => None,
        }
    }

    fn term(&self, e: &Expr) -> Term {
        if let Some((level, item, node)) = self.column(e) {
            return Term::Col { level, item, node };
        }
        match e {
            Expr::Nested(inner) => return self.term(inner),
            Expr::Subquery(q) => return self.subquery_term(q),
            _ => {}
        }
        match key_of(e) {
            Ok(Some(k)) => Term::Value(k),
            _ => Term::Other,
        }
    }

    /// The single column of a subquery of the current block.
    fn subquery_term(&self, q: &Query) -> Term {
        let addr = q as *const Query as usize;
        let Some(block) = self.blocks.last() else {
            return Term::Other;
        };
        match block.subqueries.iter().find(|(a, _)| *a == addr) {
            Some((_, out)) if out.positional && out.cols.len() == 1 => match out.cols[0].node {
                Some(n) => Term::Node(n),
                None => Term::Other,
            },
            _ => Term::Other,
        }
    }

    /// The node an expression's value is known by (a new one for a literal).
    fn expr_node(&mut self, e: &Expr) -> Option<usize> {
        match self.term(e) {
            Term::Col { node, .. } => node,
            Term::Node(n) => Some(n),
            Term::Value(k) => Some(self.value_node(k)),
            Term::Other => None,
        }
    }

    /// Records that item `item` of the current block holds only `source`'s value, if
    /// it is a distributed occurrence the condition restricts.
    fn restrict(&mut self, target: &Term, source: &Term, restricted: &[usize]) {
        let Term::Col {
            level,
            item,
            node: Some(t),
        } = *target
        else {
            return;
        };
        if level + 1 != self.blocks.len() || !restricted.contains(&item) {
            return;
        }
        if !matches!(self.blocks[level].items[item].kind, ItemKind::Occ { .. }) {
            return;
        }
        match source {
            Term::Value(k) => self.nodes[t].facts.push(k.clone()),
            Term::Col { node: Some(n), .. } | Term::Node(n) => {
                self.nodes[t].inputs.push((*n, false))
            }
            _ => {}
        }
    }

    /// The restricting facts of a condition (WHERE, or a join's ON).
    fn facts(&mut self, cond: &Expr, restricted: &[usize]) {
        let mut cs = Vec::new();
        conjuncts(cond, &mut cs);
        for c in cs {
            let (a, b) = match c {
                Expr::BinaryOp {
                    left,
                    op: BinaryOperator::Eq,
                    right,
                } => (self.term(left), self.term(right)),
                Expr::InList {
                    expr,
                    list,
                    negated: false,
                } if list.len() == 1 => (self.term(expr), self.term(&list[0])),
                Expr::InSubquery {
                    expr,
                    subquery,
                    negated: false,
                } => (self.term(expr), self.subquery_term(subquery)),
                _ => continue,
            };
            self.restrict(&a, &b, restricted);
            self.restrict(&b, &a, restricted);
        }
    }

    /// Analyses the immediate subqueries of AST fragments in the current scope and
    /// records their outputs in the current block.
    fn subqueries(&mut self, parts: &[&dyn Part]) -> Result<(), Stop> {
        let mut v = Subqueries::default();
        for p in parts {
            p.collect(&mut v);
        }
        for (addr, q) in v.found {
            let out = self.query(&q)?;
            if let Some(b) = self.blocks.last_mut() {
                b.subqueries.push((addr, out));
            }
        }
        Ok(())
    }

    /// A query (WITH, body, ORDER BY, LIMIT).
    fn query(&mut self, q: &Query) -> Result<Out, Stop> {
        if !q.pipe_operators.is_empty()
            || q.for_clause.is_some()
            || q.settings.is_some()
            || q.format_clause.is_some()
        {
            return not_mine("a query clause this tier does not know");
        }
        if let Some(with) = &q.with {
            self.with(with)?;
        }
        let out = match &*q.body {
            SetExpr::Select(s) => self.select(s, q.order_by.as_ref())?,
            other => {
                let out = self.set_expr(other)?;
                self.blocks.push(Block::default());
                self.subqueries(&[&q.order_by])?;
                self.blocks.pop();
                out
            }
        };
        self.blocks.push(Block::default());
        self.subqueries(&[&q.limit_clause, &q.fetch])?;
        self.blocks.pop();
        if q.with.is_some() {
            self.ctes.pop();
        }
        Ok(out)
    }

    fn with(&mut self, with: &ast::With) -> Result<(), Stop> {
        let mut frame: Vec<(String, Option<Out>)> = Vec::new();
        if with.recursive {
            for cte in &with.cte_tables {
                frame.push((fold(&cte.alias.name), None));
            }
        }
        self.ctes.push(frame);
        for (i, cte) in with.cte_tables.iter().enumerate() {
            if cte.from.is_some() {
                return not_mine("a CTE with FROM");
            }
            let name = fold(&cte.alias.name);
            let out = if with.recursive && matches!(*cte.query.body, SetExpr::SetOperation { .. }) {
                self.recursive_cte(i, cte)?
            } else {
                self.query(&cte.query)?
            };
            let out = renamed(out, Some(&cte.alias));
            let frame = self.ctes.last_mut().expect("the frame just pushed");
            if with.recursive {
                frame[i].1 = Some(out);
            } else {
                frame.push((name, Some(out)));
            }
        }
        Ok(())
    }

    /// `WITH RECURSIVE name AS (base UNION recursive ...)`: the columns are assumed to
    /// hold what the base branch's do while the other branches are analysed, and the
    /// assumption is checked when the graph is solved.
    fn recursive_cte(&mut self, i: usize, cte: &ast::Cte) -> Result<Out, Stop> {
        let q = &cte.query;
        if q.with.is_some() || q.order_by.is_some() || q.limit_clause.is_some() || q.fetch.is_some()
        {
            return not_mine("a recursive CTE with WITH, ORDER BY or LIMIT");
        }
        let mut leaves = Vec::new();
        branches(&q.body, &mut leaves);
        let base = self.set_expr(leaves[0])?;
        let out = if base.positional {
            let cols = base
                .cols
                .iter()
                .map(|c| {
                    let node = self.node(Node {
                        and: true,
                        optimistic: true,
                        dead: c.node.is_none(),
                        inputs: c.node.map(|n| (n, false)).into_iter().collect(),
                        ..Node::default()
                    });
                    Col {
                        name: c.name.clone(),
                        node: Some(node),
                    }
                })
                .collect();
            Out {
                cols,
                positional: true,
                names_complete: base.names_complete,
            }
        } else {
            Out::opaque()
        };
        self.ctes.last_mut().expect("the WITH frame")[i].1 =
            Some(renamed(out.clone(), Some(&cte.alias)));
        for leaf in &leaves[1..] {
            let o = self.set_expr(leaf)?;
            for (p, c) in out.cols.iter().enumerate() {
                let n = c.node.expect("every column has a node");
                match o.cols.get(p).and_then(|x| x.node) {
                    Some(src) if o.positional && o.cols.len() == out.cols.len() => {
                        self.nodes[n].inputs.push((src, true))
                    }
                    _ => self.nodes[n].dead = true,
                }
            }
        }
        Ok(out)
    }

    fn set_expr(&mut self, e: &SetExpr) -> Result<Out, Stop> {
        match e {
            SetExpr::Select(s) => self.select(s, None),
            SetExpr::Query(q) => self.query(q),
            SetExpr::SetOperation { .. } => {
                let mut leaves = Vec::new();
                branches(e, &mut leaves);
                let mut outs = Vec::new();
                for leaf in leaves {
                    outs.push(self.set_expr(leaf)?);
                }
                let first = &outs[0];
                if !outs
                    .iter()
                    .all(|o| o.positional && o.cols.len() == first.cols.len())
                {
                    return Ok(Out::opaque());
                }
                let mut cols = Vec::new();
                for p in 0..first.cols.len() {
                    let inputs: Vec<Option<usize>> = outs.iter().map(|o| o.cols[p].node).collect();
                    let node = self.node(Node {
                        and: true,
                        dead: inputs.iter().any(Option::is_none),
                        inputs: inputs.into_iter().flatten().map(|n| (n, false)).collect(),
                        ..Node::default()
                    });
                    cols.push(Col {
                        name: first.cols[p].name.clone(),
                        node: Some(node),
                    });
                }
                Ok(Out {
                    cols,
                    positional: true,
                    names_complete: first.names_complete,
                })
            }
            SetExpr::Values(v) => {
                self.blocks.push(Block::default());
                self.subqueries(&[&v.rows])?;
                self.blocks.pop();
                let width = v.rows.first().map_or(0, Vec::len);
                let mut cols = Vec::new();
                for p in 0..width {
                    let keys: Vec<Option<Key>> = v
                        .rows
                        .iter()
                        .map(|r| r.get(p).and_then(|e| key_of(e).ok().flatten()))
                        .collect();
                    let node = match keys.first() {
                        Some(Some(k)) if keys.iter().all(|x| x.as_ref() == Some(k)) => {
                            Some(self.value_node(k.clone()))
                        }
                        _ => None,
                    };
                    cols.push(Col {
                        name: Some(format!("column{}", p + 1)),
                        node,
                    });
                }
                Ok(Out {
                    cols,
                    positional: true,
                    names_complete: true,
                })
            }
            SetExpr::Insert(st) | SetExpr::Update(st) | SetExpr::Delete(st) => self.dml(st),
            SetExpr::Merge(_) => not_mine("MERGE"),
            SetExpr::Table(_) => not_mine("TABLE name (write SELECT * FROM name)"),
        }
    }

    /// A FROM list entry with its joins; join conditions are kept for when the block
    /// is complete.
    fn join_tree<'s>(
        &mut self,
        twj: &'s TableWithJoins,
        items: &mut Vec<Item>,
        joins: &mut Vec<JoinFact<'s>>,
        using: &mut Vec<String>,
    ) -> Result<(), Stop> {
        let start = items.len();
        self.factor(&twj.relation, items, joins, using)?;
        for j in &twj.joins {
            let left: Vec<usize> = (start..items.len()).collect();
            let right_start = items.len();
            self.factor(&j.relation, items, joins, using)?;
            let right: Vec<usize> = (right_start..items.len()).collect();
            let both = || left.iter().chain(&right).copied().collect::<Vec<_>>();
            let (constraint, restricted) = match &j.join_operator {
                JoinOperator::Join(c) | JoinOperator::Inner(c) | JoinOperator::CrossJoin(c) => {
                    (c, both())
                }
                JoinOperator::Left(c) | JoinOperator::LeftOuter(c) => (c, right.clone()),
                JoinOperator::Right(c) | JoinOperator::RightOuter(c) => (c, left.clone()),
                JoinOperator::FullOuter(c) => (c, Vec::new()),
                _ => return not_mine("a join kind Postgres does not have"),
            };
            match constraint {
                JoinConstraint::On(e) => joins.push(JoinFact::On(e, restricted)),
                JoinConstraint::Using(cols) => {
                    for c in cols {
                        let [ObjectNamePart::Identifier(id)] = c.0.as_slice() else {
                            return not_mine("an unusual USING column");
                        };
                        let col = fold(id);
                        let side = |range: &[usize]| -> Option<(usize, Option<usize>)> {
                            let its: Vec<Item> = range.iter().map(|i| items[*i].clone()).collect();
                            match self.unqualified_in(&its, &col) {
                                Ok(Some((k, n))) => Some((range[k], n)),
                                _ => None,
                            }
                        };
                        if let (Some(l), Some(r)) = (side(&left), side(&right)) {
                            joins.push(JoinFact::Using {
                                left: l,
                                right: r,
                                restricted: restricted.clone(),
                            });
                        }
                        using.push(col);
                    }
                }
                JoinConstraint::Natural => {
                    return not_mine("a NATURAL join (its columns are not known here)");
                }
                JoinConstraint::None => {}
            }
        }
        Ok(())
    }

    /// Analyses `parts` with `items` (the FROM items so far) visible, as for LATERAL.
    fn lateral<T>(
        &mut self,
        items: &[Item],
        f: impl FnOnce(&mut Self) -> Result<T, Stop>,
    ) -> Result<T, Stop> {
        self.blocks.push(Block {
            items: items.to_vec(),
            ..Block::default()
        });
        let r = f(self);
        self.blocks.pop();
        r
    }

    fn factor<'s>(
        &mut self,
        tf: &'s TableFactor,
        items: &mut Vec<Item>,
        joins: &mut Vec<JoinFact<'s>>,
        using: &mut Vec<String>,
    ) -> Result<(), Stop> {
        match tf {
            TableFactor::Table {
                name,
                alias,
                args,
                with_hints,
                version,
                with_ordinality: _,
                partitions,
                json_path,
                sample,
                index_hints,
            } => {
                // TABLESAMPLE keeps a subset of the rows: pins are unaffected. Postgres
                // writes it after the alias.
                if !with_hints.is_empty()
                    || version.is_some()
                    || !partitions.is_empty()
                    || json_path.is_some()
                    || !index_hints.is_empty()
                    || matches!(sample, Some(ast::TableSampleKind::BeforeTableAlias(_)))
                {
                    return not_mine("a table clause this tier does not know (TABLESAMPLE, ...)");
                }
                let rel = self.rel_index(name)?;
                let item = match args {
                    Some(args) => {
                        // A function in FROM: its arguments may refer to earlier items.
                        self.claim(rel, Role::Keep)?;
                        self.lateral(items, |a| a.subqueries(&[args]))?;
                        Item {
                            name: alias
                                .as_ref()
                                .map(|a| fold(&a.name))
                                .or_else(|| {
                                    self.rels[rel]
                                        .0
                                        .last()
                                        .and_then(ObjectNamePart::as_ident)
                                        .map(fold)
                                })
                                .unwrap_or_default(),
                            kind: ItemKind::Derived(Out::opaque()),
                        }
                    }
                    None => self.relation(rel, alias.as_ref())?,
                };
                items.push(item);
            }
            TableFactor::Derived {
                lateral,
                subquery,
                alias,
            } => {
                let out = if *lateral {
                    self.lateral(items, |a| a.query(subquery))?
                } else {
                    self.query(subquery)?
                };
                items.push(Item {
                    name: alias.as_ref().map(|a| fold(&a.name)).unwrap_or_default(),
                    kind: ItemKind::Derived(renamed(out, alias.as_ref())),
                });
            }
            TableFactor::NestedJoin {
                table_with_joins,
                alias,
            } => {
                if alias.is_some() {
                    return not_mine("an aliased join");
                }
                self.join_tree(table_with_joins, items, joins, using)?;
            }
            TableFactor::Function { args, alias, .. } => {
                self.lateral(items, |a| a.subqueries(&[args]))?;
                items.push(Item {
                    name: alias.as_ref().map(|a| fold(&a.name)).unwrap_or_default(),
                    kind: ItemKind::Derived(Out::opaque()),
                });
            }
            TableFactor::UNNEST {
                alias, array_exprs, ..
            } => {
                self.lateral(items, |a| a.subqueries(&[array_exprs]))?;
                items.push(Item {
                    name: alias.as_ref().map(|a| fold(&a.name)).unwrap_or_default(),
                    kind: ItemKind::Derived(Out::opaque()),
                });
            }
            _ => return not_mine("a FROM item this tier does not know"),
        }
        Ok(())
    }

    /// Pushes a block for `items`, analyses the subqueries of `parts`, applies the
    /// WHERE and join facts, computes `returning` (the output), pops the block.
    fn block(
        &mut self,
        items: Vec<Item>,
        using: Vec<String>,
        joins: &[JoinFact],
        selection: Option<&Expr>,
        parts: &[&dyn Part],
        output: &[SelectItem],
    ) -> Result<Out, Stop> {
        let all: Vec<usize> = (0..items.len()).collect();
        self.blocks.push(Block {
            items,
            using,
            subqueries: Vec::new(),
        });
        let r = (|| {
            let mut on_exprs: Vec<&dyn Part> = Vec::new();
            for j in joins {
                if let JoinFact::On(e, _) = j {
                    on_exprs.push(*e);
                }
            }
            self.subqueries(parts)?;
            self.subqueries(&on_exprs)?;
            if let Some(w) = selection {
                self.facts(w, &all);
            }
            for j in joins {
                match j {
                    JoinFact::On(e, restricted) => self.facts(e, restricted),
                    JoinFact::Using {
                        left,
                        right,
                        restricted,
                    } => {
                        let level = self.blocks.len() - 1;
                        let l = Term::Col {
                            level,
                            item: left.0,
                            node: left.1,
                        };
                        let r = Term::Col {
                            level,
                            item: right.0,
                            node: right.1,
                        };
                        self.restrict(&l, &r, restricted);
                        self.restrict(&r, &l, restricted);
                    }
                }
            }
            self.projection(output)
        })();
        self.blocks.pop();
        r
    }

    fn select(&mut self, s: &Select, order_by: Option<&ast::OrderBy>) -> Result<Out, Stop> {
        if s.into.is_some() {
            return not_mine("SELECT INTO creates a table");
        }
        if s.top.is_some()
            || s.exclude.is_some()
            || !s.lateral_views.is_empty()
            || s.prewhere.is_some()
            || s.value_table_mode.is_some()
            || s.connect_by.is_some()
            || !matches!(s.flavor, ast::SelectFlavor::Standard)
        {
            return not_mine("a SELECT clause Postgres does not have");
        }
        let mut items = Vec::new();
        let mut joins = Vec::new();
        let mut using = Vec::new();
        for twj in &s.from {
            self.join_tree(twj, &mut items, &mut joins, &mut using)?;
        }
        let mut parts: Vec<&dyn Part> = vec![
            &s.distinct,
            &s.projection,
            &s.selection,
            &s.group_by,
            &s.having,
            &s.named_window,
            &s.qualify,
            &s.sort_by,
            &s.cluster_by,
            &s.distribute_by,
        ];
        if let Some(o) = order_by {
            parts.push(o);
        }
        self.block(
            items,
            using,
            &joins,
            s.selection.as_ref(),
            &parts,
            &s.projection,
        )
    }

    fn expand(&self, item: &Item, using: &[String], out: &mut Out) {
        match &item.kind {
            ItemKind::Occ { occ, dist, columns } => match columns {
                Some(cols) => {
                    for c in cols {
                        let merged = using.contains(c);
                        out.cols.push(Col {
                            name: Some(c.clone()),
                            node: self.occs[*occ]
                                .node
                                .filter(|_| !merged && dist.as_ref() == Some(c)),
                        });
                    }
                }
                None => {
                    out.positional = false;
                    out.names_complete = false;
                    if let Some(d) = dist {
                        out.cols.push(Col {
                            name: Some(d.clone()),
                            node: self.occs[*occ].node,
                        });
                    }
                }
            },
            ItemKind::Derived(o) => {
                out.positional &= o.positional;
                out.names_complete &= o.names_complete;
                for c in &o.cols {
                    let merged = c.name.as_ref().is_some_and(|n| using.contains(n));
                    out.cols.push(Col {
                        name: c.name.clone(),
                        node: if merged { None } else { c.node },
                    });
                }
            }
        }
    }

    /// The output columns of a select list (or RETURNING list) in the current block.
    fn projection(&mut self, list: &[SelectItem]) -> Result<Out, Stop> {
        let mut out = Out {
            cols: Vec::new(),
            positional: true,
            names_complete: true,
        };
        for it in list {
            match it {
                SelectItem::UnnamedExpr(e) => {
                    let name = col_name(e);
                    out.names_complete &= name.is_some();
                    let node = self.expr_node(e);
                    out.cols.push(Col { name, node });
                }
                SelectItem::ExprWithAlias { expr, alias } => {
                    let node = self.expr_node(expr);
                    out.cols.push(Col {
                        name: Some(fold(alias)),
                        node,
                    });
                }
                SelectItem::Wildcard(opts) | SelectItem::QualifiedWildcard(_, opts) => {
                    let block = self.blocks.last().cloned().unwrap_or_default();
                    if opts.opt_ilike.is_some()
                        || opts.opt_exclude.is_some()
                        || opts.opt_except.is_some()
                        || opts.opt_replace.is_some()
                        || opts.opt_rename.is_some()
                    {
                        return Ok(Out::opaque());
                    }
                    if !block.using.is_empty() {
                        out.positional = false;
                    }
                    match it {
                        SelectItem::QualifiedWildcard(
                            SelectItemQualifiedWildcardKind::ObjectName(n),
                            _,
                        ) if n.0.len() == 1 => {
                            let q = n.0[0].as_ident().map(fold).unwrap_or_default();
                            match block.items.iter().find(|i| i.name == q) {
                                Some(item) => self.expand(item, &[], &mut out),
                                None => return Ok(Out::opaque()),
                            }
                        }
                        SelectItem::Wildcard(_) => {
                            for item in &block.items {
                                self.expand(item, &block.using, &mut out);
                            }
                        }
                        _ => return Ok(Out::opaque()),
                    }
                }
            }
        }
        Ok(out)
    }

    /// INSERT, UPDATE or DELETE (at the top or in a CTE); the output is RETURNING's.
    fn dml(&mut self, st: &ast::Statement) -> Result<Out, Stop> {
        match st {
            ast::Statement::Insert(ins) => self.insert(ins),
            ast::Statement::Update {
                table,
                assignments,
                from,
                selection,
                returning,
                or,
                limit,
            } => {
                if or.is_some() || limit.is_some() || !table.joins.is_empty() {
                    return not_mine("an UPDATE form Postgres does not have");
                }
                let mut items = Vec::new();
                let mut joins = Vec::new();
                let mut using = Vec::new();
                let (occ, dist) = self.target(&table.relation, &mut items)?;
                if let Some(d) = &dist
                    && assigns(assignments, d)
                {
                    self.refusal = Some(format!(
                        "cannot UPDATE the distribution column {d} of {}: a row cannot move to another shard",
                        self.tables[self.occs[occ].table].name
                    ));
                }
                if let Some(UpdateTableFromKind::BeforeSet(f) | UpdateTableFromKind::AfterSet(f)) =
                    from
                {
                    for twj in f {
                        self.join_tree(twj, &mut items, &mut joins, &mut using)?;
                    }
                }
                self.block(
                    items,
                    using,
                    &joins,
                    selection.as_ref(),
                    &[assignments, selection, returning],
                    returning.as_deref().unwrap_or_default(),
                )
            }
            ast::Statement::Delete(d) => {
                if !d.tables.is_empty() || !d.order_by.is_empty() || d.limit.is_some() {
                    return not_mine("a DELETE form Postgres does not have");
                }
                let from = match &d.from {
                    FromTable::WithFromKeyword(f) | FromTable::WithoutKeyword(f) => f,
                };
                let [t] = from.as_slice() else {
                    return not_mine("DELETE from several tables");
                };
                if !t.joins.is_empty() {
                    return not_mine("DELETE from a join");
                }
                let mut items = Vec::new();
                let mut joins = Vec::new();
                let mut using = Vec::new();
                self.target(&t.relation, &mut items)?;
                for twj in d.using.iter().flatten() {
                    self.join_tree(twj, &mut items, &mut joins, &mut using)?;
                }
                self.block(
                    items,
                    using,
                    &joins,
                    d.selection.as_ref(),
                    &[&d.selection, &d.returning],
                    d.returning.as_deref().unwrap_or_default(),
                )
            }
            _ => not_mine("not a SELECT, INSERT, UPDATE or DELETE"),
        }
    }

    /// The target of an UPDATE or DELETE: a catalog table (occurrence, its dist column).
    fn target(
        &mut self,
        tf: &TableFactor,
        items: &mut Vec<Item>,
    ) -> Result<(usize, Option<String>), Stop> {
        let TableFactor::Table {
            name,
            alias,
            args: None,
            ..
        } = tf
        else {
            return not_mine("the target is not a plain table");
        };
        let rel = self.rel_index(name)?;
        let item = self.relation(rel, alias.as_ref())?;
        let ItemKind::Occ { occ, .. } = item.kind else {
            return not_mine("the target is not a table");
        };
        let table = &self.tables[self.occs[occ].table];
        if table.kind == TableKind::Reference {
            self.writes_reference = true;
        }
        let dist = table
            .distribution_column
            .clone()
            .filter(|_| table.kind == TableKind::Distributed);
        items.push(item);
        Ok((occ, dist))
    }

    fn insert(&mut self, ins: &ast::Insert) -> Result<Out, Stop> {
        if ins.or.is_some()
            || ins.ignore
            || ins.overwrite
            || ins.replace_into
            || ins.partitioned.is_some()
            || !ins.assignments.is_empty()
            || !ins.after_columns.is_empty()
            || ins.insert_alias.is_some()
            || ins.settings.is_some()
            || ins.format_clause.is_some()
            || ins.priority.is_some()
        {
            return not_mine("an INSERT form Postgres does not have");
        }
        let TableObject::TableName(name) = &ins.table else {
            return not_mine("INSERT into a table function");
        };
        let rel = self.rel_index(name)?;
        let (occ, table) = self.occurrence(rel)?;
        let own = self.rels[rel]
            .0
            .last()
            .and_then(ObjectNamePart::as_ident)
            .map(fold)
            .unwrap_or_default();
        let (dist, columns) = occ_names(table, &[]);
        let item = Item {
            name: ins.table_alias.as_ref().map(fold).unwrap_or(own),
            kind: ItemKind::Occ { occ, dist, columns },
        };
        let node = self.occs[occ].node;
        if table.kind == TableKind::Reference {
            self.writes_reference = true;
        }
        // The inserted columns, and where the distribution column is among them.
        let inserted: Vec<String> = if ins.columns.is_empty() {
            table.columns.clone()
        } else {
            ins.columns.iter().map(fold).collect()
        };
        let pos = match (&table.distribution_column, node) {
            (Some(d), Some(_)) => {
                if inserted.is_empty() {
                    return not_mine(
                        "INSERT without a column list (the catalog view has no column order)",
                    );
                }
                match inserted.iter().position(|c| c == d) {
                    Some(p) => Some(p),
                    None => {
                        return Err(Stop::Refuse(format!(
                            "INSERT into {} must give its distribution column {d}",
                            table.name
                        )));
                    }
                }
            }
            _ => None,
        };
        match &ins.source {
            None => {
                if node.is_some() {
                    return not_mine("INSERT ... DEFAULT VALUES into a distributed table");
                }
            }
            Some(src) => match &*src.body {
                SetExpr::Values(values)
                    if src.with.is_none()
                        && src.order_by.is_none()
                        && src.limit_clause.is_none()
                        && src.fetch.is_none() =>
                {
                    self.blocks.push(Block::default());
                    let r = self.subqueries(&[&values.rows]);
                    self.blocks.pop();
                    r?;
                    if let (Some(p), Some(n)) = (pos, node) {
                        for row in &values.rows {
                            match row.get(p).map(key_of) {
                                Some(Ok(Some(k))) => self.nodes[n].facts.push(k),
                                Some(Ok(None)) => {
                                    return Err(Stop::Refuse(format!(
                                        "the distribution column of {} cannot be NULL",
                                        table.name
                                    )));
                                }
                                _ => {
                                    return not_mine(
                                        "a value of the distribution column is not a literal or a parameter",
                                    );
                                }
                            }
                        }
                    }
                }
                _ => {
                    let out = self.query(src)?;
                    if let (Some(p), Some(n)) = (pos, node) {
                        // Without a column list, the SELECT may give fewer columns.
                        let fits = out.cols.len() == inserted.len()
                            || (ins.columns.is_empty() && out.cols.len() > p);
                        if !out.positional || !fits {
                            return not_mine(
                                "INSERT ... SELECT whose distribution column value cannot be followed (SELECT *?)",
                            );
                        }
                        if let Some(src) = out.cols[p].node {
                            self.nodes[n].inputs.push((src, false));
                        }
                    }
                }
            },
        }
        let items = vec![item];
        if let Some(on) = &ins.on {
            let OnInsert::OnConflict(c) = on else {
                return not_mine("ON DUPLICATE KEY");
            };
            if let OnConflictAction::DoUpdate(u) = &c.action {
                if let (Some(d), Some(_)) = (&table.distribution_column, node)
                    && assigns(&u.assignments, d)
                {
                    self.refusal = Some(format!(
                        "ON CONFLICT DO UPDATE cannot set the distribution column {d} of {}",
                        table.name
                    ));
                }
                let mut excluded = items.clone();
                excluded.push(Item {
                    name: "excluded".into(),
                    kind: ItemKind::Derived(Out::opaque()),
                });
                self.lateral(&excluded, |a| a.subqueries(&[&u.assignments, &u.selection]))?;
            }
        }
        let returning = ins.returning.as_deref().unwrap_or_default();
        self.block(items, Vec::new(), &[], None, &[&ins.returning], returning)
    }

    /// Solves the graph and checks the statement as a whole.
    fn finish(mut self) -> Result<Found, Stop> {
        self.solve()?;
        // Per colocation group, the value its occurrences are pinned to (`None`: a
        // group of one-shard tables, which needs none).
        let mut keys: Vec<(i32, Option<Key>)> = Vec::new();
        let mut extra: Vec<(i32, Key)> = Vec::new();
        let mut any_reference = false;
        for o in &self.occs {
            let t = &self.tables[o.table];
            let Some(n) = o.node else {
                any_reference = true;
                continue;
            };
            if t.shard_count != 1 {
                // Every value the occurrence is pinned to besides the one it took.
                let node = &self.nodes[n];
                let others = node.facts.iter().chain(
                    node.inputs
                        .iter()
                        .filter_map(|(s, _)| self.nodes[*s].value.as_ref()),
                );
                for x in others {
                    if node.value.as_ref() != Some(x)
                        && !extra.iter().any(|(g, k)| *g == t.colocation_id && k == x)
                    {
                        extra.push((t.colocation_id, x.clone()));
                    }
                }
            }
            let v = match &self.nodes[n].value {
                // A table of one shard: every occurrence is on that shard.
                _ if t.shard_count == 1 => None,
                Some(v) => Some(v.clone()),
                None => {
                    return not_mine(format!(
                        "an occurrence of {} is not pinned to one distribution value",
                        t.name
                    ));
                }
            };
            match keys.iter().find(|(g, _)| *g == t.colocation_id) {
                None => keys.push((t.colocation_id, v)),
                Some((_, k)) if v.is_some() && *k != v => {
                    let v = v.expect("checked");
                    if !extra.iter().any(|(g, x)| *g == t.colocation_id && *x == v) {
                        extra.push((t.colocation_id, v));
                    }
                }
                _ => {}
            }
        }
        // The group's own key is not an extra one.
        extra.retain(|(g, x)| !keys.iter().any(|(h, k)| h == g && k.as_ref() == Some(x)));
        if keys.is_empty() && !any_reference {
            return not_mine("no table");
        }
        if !keys.is_empty() && self.writes_reference {
            return not_mine("writes a reference table (every node) with distributed tables");
        }
        let Some(roles) = self.roles.iter().copied().collect::<Option<Vec<Role>>>() else {
            return not_mine("a table reference in a place this tier does not follow");
        };
        if let Some(message) = self.refusal {
            return Err(Stop::Refuse(message));
        }
        Ok(Found { roles, keys, extra })
    }

    fn solve(&mut self) -> Result<(), Stop> {
        loop {
            for n in &mut self.nodes {
                n.value = None;
            }
            let mut changed = true;
            while changed {
                changed = false;
                for i in 0..self.nodes.len() {
                    if self.nodes[i].value.is_some() {
                        continue;
                    }
                    let n = &self.nodes[i];
                    let v = if !n.and {
                        n.facts.first().cloned().or_else(|| {
                            n.inputs
                                .iter()
                                .find_map(|(s, _)| self.nodes[*s].value.clone())
                        })
                    } else if n.dead {
                        None
                    } else {
                        let mut vals = n
                            .inputs
                            .iter()
                            .filter(|(_, rec)| !(n.optimistic && *rec))
                            .map(|(s, _)| self.nodes[*s].value.clone());
                        match vals.next() {
                            Some(Some(first)) if vals.all(|v| v.as_ref() == Some(&first)) => {
                                Some(first)
                            }
                            _ => None,
                        }
                    };
                    if v.is_some() {
                        self.nodes[i].value = v;
                        changed = true;
                    }
                }
            }
            // An occurrence pinned to several values holds rows only where they are
            // equal. Its own conditions, or an equality with an occurrence of its own
            // colocation group (a value of the same type): `finish` passes the others
            // on as extra keys, and the router runs the statement only when they all
            // choose its shard. Through anything else, refused.
            let mut group_of: Vec<Option<i32>> = vec![None; self.nodes.len()];
            for o in &self.occs {
                if let Some(n) = o.node {
                    group_of[n] = Some(self.tables[o.table].colocation_id);
                }
            }
            for (i, n) in self.nodes.iter().enumerate().filter(|(_, n)| !n.and) {
                if let Some(v) = &n.value {
                    let foreign = n.inputs.iter().any(|(s, _)| {
                        self.nodes[*s].value.as_ref().is_some_and(|x| x != v)
                            && (group_of[*s].is_none() || group_of[*s] != group_of[i])
                    });
                    if foreign {
                        return not_mine("an occurrence pinned to different values");
                    }
                }
            }
            // A recursive CTE's assumption must hold in its recursive branches.
            let mut wrong = None;
            for (i, n) in self.nodes.iter().enumerate() {
                if n.and && n.optimistic {
                    let holds = n.value.as_ref().is_none_or(|v| {
                        n.inputs
                            .iter()
                            .filter(|(_, rec)| *rec)
                            .all(|(s, _)| self.nodes[*s].value.as_ref() == Some(v))
                    });
                    if !holds {
                        wrong = Some(i);
                        break;
                    }
                }
            }
            match wrong {
                Some(i) => self.nodes[i].optimistic = false,
                None => return Ok(()),
            }
        }
    }
}
