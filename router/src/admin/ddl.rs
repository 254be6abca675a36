//! DDL on distributed and reference tables: `CREATE INDEX`, `ALTER TABLE`, `DROP
//! TABLE`, `TRUNCATE` run on the coordinator's table and on every shard placement, in
//! one change that commits everywhere or nowhere. The statement for a shard is the
//! client's statement (parsed) with the table, index and constraint names replaced by
//! the shard's (`<name>_<shardid>`, as Citus names them).
//!
//! GRANT, REVOKE and CREATE / ALTER / DROP POLICY on such a table (or on all tables
//! of its schema) run on the coordinator as the client wrote them; then every shard
//! gets the table's privileges and policies as they now are (`privileges.rs`).

use super::privileges::Scope;
use super::shape::{qualified, resolve};
use super::{AdminCtx, AdminError, Reply, in_change};
use crate::admin::fleet::Fleet;
use crate::catalog::{Method, Snapshot, TableMeta};
use sqlparser::ast::{
    AlterColumnOperation, AlterTableOperation, GrantObjects, Ident, ObjectName, ObjectNamePart,
    ObjectType, Statement, TableConstraint,
};
use std::sync::Arc;

/// A DDL statement that touches at least one distributed or reference table.
#[derive(Debug)]
pub struct Ddl {
    stmt: Statement,
    sql: String,
}

impl Ddl {
    pub fn tag(&self) -> &'static str {
        match &self.stmt {
            Statement::CreateIndex(_) => "CREATE INDEX",
            Statement::AlterTable { .. } => "ALTER TABLE",
            Statement::Drop {
                object_type: ObjectType::Index,
                ..
            } => "DROP INDEX",
            Statement::Drop { .. } => "DROP TABLE",
            Statement::Truncate { .. } => "TRUNCATE TABLE",
            Statement::Grant { .. } => "GRANT",
            Statement::Revoke { .. } => "REVOKE",
            Statement::CreatePolicy { .. } => "CREATE POLICY",
            Statement::AlterPolicy { .. } => "ALTER POLICY",
            Statement::DropPolicy { .. } => "DROP POLICY",
            _ => "DDL",
        }
    }
}

/// Cheap test: does the text start like a statement this module handles?
pub fn may_be_ddl(sql: &str) -> bool {
    let s = sql.trim_start();
    let first = s.split(|c: char| c.is_whitespace()).next().unwrap_or("");
    ["create", "alter", "drop", "truncate", "grant", "revoke"]
        .iter()
        .any(|k| first.eq_ignore_ascii_case(k))
}

fn names_of(stmt: &Statement) -> Vec<&ObjectName> {
    match stmt {
        Statement::CreateIndex(ci) => vec![&ci.table_name],
        Statement::AlterTable { name, .. } => vec![name],
        Statement::Drop {
            object_type: ObjectType::Table,
            names,
            ..
        } => names.iter().collect(),
        Statement::Truncate { table_names, .. } => table_names.iter().map(|t| &t.name).collect(),
        Statement::Grant {
            objects: Some(GrantObjects::Tables(names)),
            ..
        }
        | Statement::Revoke {
            objects: Some(GrantObjects::Tables(names)),
            ..
        } => names.iter().collect(),
        Statement::CreatePolicy { table_name, .. }
        | Statement::AlterPolicy { table_name, .. }
        | Statement::DropPolicy { table_name, .. } => vec![table_name],
        _ => Vec::new(),
    }
}

/// The schemas of `GRANT / REVOKE ... ON ALL TABLES IN SCHEMA`, as Postgres folds them.
fn schemas_of(stmt: &Statement) -> Vec<String> {
    match stmt {
        Statement::Grant {
            objects: Some(GrantObjects::AllTablesInSchema { schemas }),
            ..
        }
        | Statement::Revoke {
            objects: Some(GrantObjects::AllTablesInSchema { schemas }),
            ..
        } => schemas.iter().filter_map(last_ident).collect(),
        _ => Vec::new(),
    }
}

/// Statements that change who may do what on a table: the shards get the result.
fn is_privilege(stmt: &Statement) -> bool {
    matches!(
        stmt,
        Statement::Grant { .. }
            | Statement::Revoke { .. }
            | Statement::CreatePolicy { .. }
            | Statement::AlterPolicy { .. }
            | Statement::DropPolicy { .. }
    )
}

/// The relation part of a name, as Postgres folds it.
fn last_ident(n: &ObjectName) -> Option<String> {
    let id = n.0.last()?.as_ident()?;
    Some(if id.quote_style.is_some() {
        id.value.clone()
    } else {
        id.value.to_lowercase()
    })
}

/// `Some` when the statement names a table whose name is a distributed or reference
/// table's (the exact resolution, search_path included, happens on the coordinator).
pub fn classify(
    snap: &Snapshot,
    stmts: Vec<Statement>,
    text: &str,
) -> Result<Option<Ddl>, AdminError> {
    let touches = |s: &Statement| {
        // An index's name says nothing about its table: every DROP INDEX is looked at.
        matches!(
            s,
            Statement::Drop {
                object_type: ObjectType::Index,
                ..
            }
        ) || names_of(s)
            .iter()
            .any(|n| last_ident(n).is_some_and(|r| snap.names.contains_key(&r)))
            || schemas_of(s)
                .iter()
                .any(|sch| snap.tables.values().any(|t| &t.schema == sch))
    };
    if stmts.len() != 1 {
        if stmts.iter().any(touches) {
            return Err(AdminError::NotSupported(
                "DDL on a distributed table must be sent as a statement of its own".into(),
            ));
        }
        return Ok(None);
    }
    let stmt = stmts.into_iter().next().expect("one statement");
    if !touches(&stmt) {
        return Ok(None);
    }
    // The coordinator runs a privilege statement as the client wrote it (its shards get
    // the outcome, not the statement): policy expressions stay as they were written.
    let sql = if is_privilege(&stmt) {
        text.trim().trim_end_matches(';').to_owned()
    } else {
        stmt.to_string()
    };
    Ok(Some(Ddl { stmt, sql }))
}

fn shard_object(t: &TableMeta, shard_id: i64) -> ObjectName {
    ObjectName(vec![
        ObjectNamePart::Identifier(Ident::with_quote('"', t.schema.clone())),
        ObjectNamePart::Identifier(Ident::with_quote('"', t.shard_name(shard_id))),
    ])
}

fn suffixed(id: &Ident, shard_id: i64) -> Ident {
    Ident::with_quote('"', crate::catalog::shard_name(&fold(id), shard_id))
}

fn fold(id: &Ident) -> String {
    if id.quote_style.is_some() {
        id.value.clone()
    } else {
        id.value.to_lowercase()
    }
}

fn db(e: tokio_postgres::Error) -> AdminError {
    AdminError::on("coordinator", e)
}

/// Runs the statement on the coordinator and on every placement of the distributed
/// tables it names.
pub async fn run(a: &AdminCtx<'_>, d: Ddl) -> Result<Reply, AdminError> {
    let tag = d.tag();
    let (coord, snap) = a.begin().await?;
    let result = in_change!(a, coord, fleet, {
        let mut shard_sql: Vec<(i32, String)> = Vec::new();
        if let Statement::Drop {
            object_type: ObjectType::Index,
            names,
            cascade,
            ..
        } = &d.stmt
        {
            for n in names {
                let row = coord
                    .query_opt(
                        "SELECT i.indrelid, c.relname::text FROM pg_index i
                         JOIN pg_class c ON c.oid = i.indexrelid
                         WHERE i.indexrelid = to_regclass($1)",
                        &[&n.to_string()],
                    )
                    .await
                    .map_err(db)?;
                let Some((table, index)) = row.map(|r| (r.get::<_, u32>(0), r.get::<_, String>(1)))
                else {
                    continue;
                };
                let Some(t) = snap.tables.get(&table) else {
                    continue;
                };
                for s in &t.shards {
                    for g in &s.placements {
                        shard_sql.push((
                            *g,
                            format!(
                                "DROP INDEX IF EXISTS {}{}",
                                qualified(&t.schema, &crate::catalog::shard_name(&index, s.id)),
                                if *cascade { " CASCADE" } else { "" }
                            ),
                        ));
                    }
                }
            }
            coord.batch_execute(&d.sql).await.map_err(db)?;
            return propagate(a, &snap, &mut fleet, shard_sql).await;
        }
        // Which named tables are distributed, resolved as the client would.
        let mut targets: Vec<Arc<TableMeta>> = Vec::new();
        for n in names_of(&d.stmt) {
            if let Some((oid, ..)) = resolve(&coord, &n.to_string()).await.map_err(db)?
                && let Some(t) = snap.tables.get(&oid)
            {
                targets.push(t.clone());
            }
        }
        for sch in schemas_of(&d.stmt) {
            for t in snap.tables.values() {
                if t.schema == sch && !targets.iter().any(|x| x.oid == t.oid) {
                    targets.push(t.clone());
                }
            }
        }
        if targets.is_empty() {
            // Not ours after all (another schema's table of the same name).
            coord.batch_execute(&d.sql).await.map_err(db)?;
            return Ok(());
        }
        match &d.stmt {
            s if is_privilege(s) => {
                let scope = match s {
                    Statement::Grant { .. } | Statement::Revoke { .. } => Scope::Grants,
                    _ => Scope::Policies,
                };
                coord.batch_execute(&d.sql).await.map_err(db)?;
                for t in &targets {
                    let p = super::privileges::Privileges::read_qualified(&coord, t.oid)
                        .await
                        .map_err(db)?;
                    for s in &t.shards {
                        let sql = p
                            .shard_sql(&qualified(&t.schema, &t.shard_name(s.id)), scope)
                            .join(";\n");
                        for g in &s.placements {
                            shard_sql.push((*g, sql.clone()));
                        }
                    }
                }
            }
            Statement::CreateIndex(ci) => {
                let t = &targets[0];
                if ci.concurrently {
                    return Err(AdminError::NotSupported(
                        "CREATE INDEX CONCURRENTLY on a distributed table is not supported yet"
                            .into(),
                    ));
                }
                if ci.unique && t.method == Method::Hash {
                    let col = t.column.clone().unwrap_or_default();
                    let has = ci.columns.iter().any(|c| {
                        matches!(&c.column.expr, sqlparser::ast::Expr::Identifier(i) if fold(i) == col)
                    });
                    if !has {
                        return Err(AdminError::InvalidDefinition {
                            message: format!("cannot create constraint on \"{}\"", t.name),
                            detail: Some(format!(
                                "Distributed relations cannot have UNIQUE, EXCLUDE, or PRIMARY KEY constraints that do not include the partition column (\"{col}\")."
                            )),
                        });
                    }
                }
                // The index's name on the coordinator (Postgres picks one when none is given).
                let before = index_names(&coord, t.oid).await?;
                coord.batch_execute(&d.sql).await.map_err(db)?;
                let name = match &ci.name {
                    Some(n) => last_ident(n).unwrap_or_default(),
                    None => {
                        let after = index_names(&coord, t.oid).await?;
                        after
                            .into_iter()
                            .find(|n| !before.contains(n))
                            .unwrap_or_default()
                    }
                };
                for s in &t.shards {
                    let mut ci2 = ci.clone();
                    ci2.table_name = shard_object(t, s.id);
                    ci2.name = Some(ObjectName(vec![ObjectNamePart::Identifier(
                        Ident::with_quote('"', crate::catalog::shard_name(&name, s.id)),
                    )]));
                    for g in &s.placements {
                        shard_sql.push((*g, Statement::CreateIndex(ci2.clone()).to_string()));
                    }
                }
            }
            Statement::AlterTable { operations, .. } => {
                let t = &targets[0];
                check_alter(t, operations)?;
                let before = constraint_names(&coord, t.oid).await?;
                coord.batch_execute(&d.sql).await.map_err(db)?;
                let after = constraint_names(&coord, t.oid).await?;
                let mut added: Vec<String> =
                    after.into_iter().filter(|n| !before.contains(n)).collect();
                let unnamed = operations
                    .iter()
                    .filter(|op| matches!(op, AlterTableOperation::AddConstraint { constraint, .. } if constraint_name(constraint).is_none()))
                    .count();
                if unnamed > 1 {
                    return Err(AdminError::NotSupported(
                        "name the constraints when adding several to a distributed table in one ALTER TABLE".into(),
                    ));
                }
                // The name Postgres gave an unnamed constraint (named ones are known).
                let named: Vec<String> = operations
                    .iter()
                    .filter_map(|op| match op {
                        AlterTableOperation::AddConstraint { constraint, .. } => {
                            constraint_name(constraint).map(fold)
                        }
                        _ => None,
                    })
                    .collect();
                added.retain(|n| !named.contains(n));
                let generated = added.into_iter().next();
                // A new owner or row-level security switch: the shards get the table's
                // privileges as they now are (a missing role skipped, as everywhere).
                let privileges = if operations.iter().any(|op| {
                    matches!(
                        op,
                        AlterTableOperation::OwnerTo { .. }
                            | AlterTableOperation::EnableRowLevelSecurity
                            | AlterTableOperation::DisableRowLevelSecurity
                    )
                }) {
                    Some(
                        super::privileges::Privileges::read_qualified(&coord, t.oid)
                            .await
                            .map_err(db)?,
                    )
                } else {
                    None
                };
                for s in &t.shards {
                    let mut ops = operations.clone();
                    ops.retain(|op| !matches!(op, AlterTableOperation::OwnerTo { .. }));
                    for op in &mut ops {
                        rename_in_op(op, s.id, s.index, generated.as_deref(), &snap, t)?;
                    }
                    let mut stmt = d.stmt.clone();
                    if let Statement::AlterTable {
                        name: n2,
                        operations: o2,
                        ..
                    } = &mut stmt
                    {
                        *n2 = shard_object(t, s.id);
                        *o2 = ops;
                    }
                    let shard = qualified(&t.schema, &t.shard_name(s.id));
                    for g in &s.placements {
                        if matches!(&stmt, Statement::AlterTable { operations, .. } if !operations.is_empty())
                        {
                            shard_sql.push((*g, stmt.to_string()));
                        }
                        // After the change: a column it adds may have grants.
                        if let Some(p) = &privileges {
                            let sql = p.shard_sql(&shard, Scope::OwnerAndSecurity);
                            shard_sql.push((*g, sql.join(";\n")));
                        }
                    }
                }
            }
            Statement::Drop { cascade, .. } => {
                for t in &targets {
                    super::distribute::delete_metadata(&coord, t.oid, t.colocation_id).await?;
                    for s in &t.shards {
                        for g in &s.placements {
                            shard_sql.push((
                                *g,
                                format!(
                                    "DROP TABLE IF EXISTS {}{}",
                                    qualified(&t.schema, &t.shard_name(s.id)),
                                    if *cascade { " CASCADE" } else { "" }
                                ),
                            ));
                        }
                    }
                }
                coord.batch_execute(&d.sql).await.map_err(db)?;
            }
            Statement::Truncate {
                cascade, identity, ..
            } => {
                coord.batch_execute(&d.sql).await.map_err(db)?;
                for t in &targets {
                    for s in &t.shards {
                        for g in &s.placements {
                            let mut sql = format!(
                                "TRUNCATE TABLE {}",
                                qualified(&t.schema, &t.shard_name(s.id))
                            );
                            match identity {
                                Some(sqlparser::ast::TruncateIdentityOption::Restart) => {
                                    sql.push_str(" RESTART IDENTITY")
                                }
                                Some(sqlparser::ast::TruncateIdentityOption::Continue) => {
                                    sql.push_str(" CONTINUE IDENTITY")
                                }
                                None => {}
                            }
                            if let Some(c) = cascade {
                                sql.push_str(&format!(" {c}"));
                            }
                            shard_sql.push((*g, sql));
                        }
                    }
                }
            }
            _ => unreachable!("classify only accepts these statements"),
        }
        propagate(a, &snap, &mut fleet, shard_sql).await
    });
    result?;
    Ok(Reply {
        tag: tag.to_owned(),
        ..Reply::default()
    })
}

/// Opens a transaction on every node that gets shard statements and runs them there.
async fn propagate(
    a: &AdminCtx<'_>,
    snap: &Snapshot,
    fleet: &mut Option<Fleet>,
    shard_sql: Vec<(i32, String)>,
) -> Result<(), AdminError> {
    let mut groups: Vec<i32> = shard_sql.iter().map(|(g, _)| *g).collect();
    groups.sort_unstable();
    groups.dedup();
    if groups.is_empty() {
        return Ok(());
    }
    let nodes = groups
        .iter()
        .map(|g| {
            snap.node_by_group(*g)
                .ok_or_else(|| AdminError::Prerequisite {
                    message: format!("no primary node in group {g}"),
                    hint: None,
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let f = Fleet::open(a.login_ref(), &a.database, &nodes).await?;
    let fleet = fleet.insert(f);
    for g in groups {
        let sql: Vec<&str> = shard_sql
            .iter()
            .filter(|(x, _)| *x == g)
            .map(|(_, s)| s.as_str())
            .collect();
        fleet.exec(g, &sql.join(";\n")).await?;
    }
    Ok(())
}

/// What Citus refuses too: changing the distribution column, renaming the table.
fn check_alter(t: &TableMeta, ops: &[AlterTableOperation]) -> Result<(), AdminError> {
    let col = t.column.as_deref();
    let on_dist = || {
        AdminError::NotSupported(
            "cannot execute ALTER TABLE command involving partition column".into(),
        )
    };
    for op in ops {
        match op {
            AlterTableOperation::RenameTable { .. } => {
                return Err(AdminError::NotSupported(
                    "renaming a distributed table is not supported yet".into(),
                ));
            }
            AlterTableOperation::DropColumn { column_names, .. }
                if column_names.iter().any(|c| Some(fold(c).as_str()) == col) =>
            {
                return Err(on_dist());
            }
            AlterTableOperation::AlterColumn {
                column_name,
                op: AlterColumnOperation::SetDataType { .. },
            } if Some(fold(column_name).as_str()) == col => return Err(on_dist()),
            AlterTableOperation::RenameColumn {
                old_column_name, ..
            } if Some(fold(old_column_name).as_str()) == col => return Err(on_dist()),
            // Column-level UNIQUE / PRIMARY KEY / REFERENCES would get names of
            // Postgres's choosing on each shard, and skip the checks above.
            AlterTableOperation::AddColumn { column_def, .. }
                if column_def.options.iter().any(|o| {
                    matches!(
                        o.option,
                        sqlparser::ast::ColumnOption::Unique { .. }
                            | sqlparser::ast::ColumnOption::ForeignKey { .. }
                    )
                }) =>
            {
                return Err(AdminError::NotSupported(
                    "add the column first, then its UNIQUE, PRIMARY KEY or REFERENCES constraint as a named table constraint (ALTER TABLE ... ADD CONSTRAINT name ...)".into(),
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

fn constraint_name(c: &TableConstraint) -> Option<&Ident> {
    match c {
        TableConstraint::Unique { name, .. }
        | TableConstraint::PrimaryKey { name, .. }
        | TableConstraint::ForeignKey { name, .. }
        | TableConstraint::Check { name, .. } => name.as_ref(),
        _ => None,
    }
}

fn set_constraint_name(c: &mut TableConstraint, id: Ident) {
    match c {
        TableConstraint::Unique { name, .. }
        | TableConstraint::PrimaryKey { name, .. }
        | TableConstraint::ForeignKey { name, .. }
        | TableConstraint::Check { name, .. } => *name = Some(id),
        _ => {}
    }
}

/// Shard names in one ALTER TABLE operation.
fn rename_in_op(
    op: &mut AlterTableOperation,
    shard_id: i64,
    shard_index: i32,
    generated: Option<&str>,
    snap: &Snapshot,
    me: &TableMeta,
) -> Result<(), AdminError> {
    match op {
        AlterTableOperation::AddConstraint { constraint, .. } => {
            let name = match constraint_name(constraint) {
                Some(n) => suffixed(n, shard_id),
                None => Ident::with_quote(
                    '"',
                    crate::catalog::shard_name(generated.unwrap_or("constraint"), shard_id),
                ),
            };
            if let TableConstraint::PrimaryKey { columns, .. }
            | TableConstraint::Unique { columns, .. } = &*constraint
                && me.method == Method::Hash
            {
                let col = me.column.clone().unwrap_or_default();
                let has = columns.iter().any(|c| {
                    matches!(&c.column.expr, sqlparser::ast::Expr::Identifier(i) if fold(i) == col)
                });
                if !has {
                    return Err(AdminError::InvalidDefinition {
                        message: format!("cannot create constraint on \"{}\"", me.name),
                        detail: Some(format!(
                            "Distributed relations cannot have UNIQUE, EXCLUDE, or PRIMARY KEY constraints that do not include the partition column (\"{col}\")."
                        )),
                    });
                }
            }
            if let TableConstraint::ForeignKey { foreign_table, .. } = constraint {
                *foreign_table = fk_target(foreign_table, snap, me, shard_index)?;
            }
            set_constraint_name(constraint, name);
        }
        AlterTableOperation::DropConstraint { name, .. } => *name = suffixed(name, shard_id),
        AlterTableOperation::RenameConstraint { old_name, new_name } => {
            *old_name = suffixed(old_name, shard_id);
            *new_name = suffixed(new_name, shard_id);
        }
        _ => {}
    }
    Ok(())
}

/// The shard a foreign key of shard `shard_index` points at.
fn fk_target(
    target: &ObjectName,
    snap: &Snapshot,
    me: &TableMeta,
    shard_index: i32,
) -> Result<ObjectName, AdminError> {
    let unsupported = || {
        AdminError::NotSupported(
            "foreign keys from distributed tables may only reference reference tables or colocated distributed tables".into(),
        )
    };
    let rel = last_ident(target).ok_or_else(unsupported)?;
    let schema = (target.0.len() > 1)
        .then(|| target.0[0].as_ident().map(fold))
        .flatten();
    let t = snap
        .names
        .get(&rel)
        .into_iter()
        .flatten()
        .filter_map(|oid| snap.tables.get(oid))
        .find(|t| schema.as_deref().is_none_or(|s| s == t.schema))
        .ok_or_else(unsupported)?;
    let shard = match (me.method, t.method) {
        (_, Method::Reference) => t.shards.first(),
        (Method::Hash, Method::Hash) if t.colocation_id == me.colocation_id => {
            t.shards.iter().find(|s| s.index == shard_index)
        }
        _ => None,
    }
    .ok_or_else(unsupported)?;
    Ok(shard_object(t, shard.id))
}

async fn index_names(c: &tokio_postgres::Client, oid: u32) -> Result<Vec<String>, AdminError> {
    Ok(c
        .query(
            "SELECT c.relname::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = $1",
            &[&oid],
        )
        .await
        .map_err(db)?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

async fn constraint_names(c: &tokio_postgres::Client, oid: u32) -> Result<Vec<String>, AdminError> {
    Ok(c.query(
        "SELECT conname::text FROM pg_constraint WHERE conrelid = $1",
        &[&oid],
    )
    .await
    .map_err(db)?
    .iter()
    .map(|r| r.get(0))
    .collect())
}
