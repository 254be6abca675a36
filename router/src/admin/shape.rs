//! A table's definition as the coordinator has it (columns, defaults, constraints,
//! indexes), read from the system catalogs, and the statements that build a shard of
//! it on a worker.
//!
//! Shards get the table's columns, types, collations, NOT NULL, defaults and generated
//! columns, its CHECK / PRIMARY KEY / UNIQUE / EXCLUDE constraints and indexes (names
//! suffixed with the shard id, as Citus does), and foreign keys to reference tables and
//! to colocated tables (pointing at the matching shard), and its owner, privileges and
//! row-level security (`privileges.rs`). Defaults that call `nextval` stay on the
//! coordinator: sequences are not copied to the workers.

use super::AdminError;
use crate::catalog::{Method, Snapshot, TableMeta};
use tokio_postgres::Client;

/// `"name"`, with quotes doubled.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

pub fn qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(name))
}

#[derive(Debug)]
pub struct Column {
    pub attnum: i16,
    pub name: String,
    pub type_sql: String,
    pub type_oid: u32,
    pub not_null: bool,
    pub default: Option<String>,
    pub generated: bool,
    pub collation: Option<String>,
}

#[derive(Debug)]
pub struct Constraint {
    pub name: String,
    pub kind: char,
    pub def: String,
    pub keys: Vec<i16>,
    pub references: Option<u32>,
}

#[derive(Debug)]
pub struct Index {
    pub name: String,
    pub quoted_name: String,
    pub def: String,
    pub unique: bool,
    pub keys: Vec<i16>,
}

#[derive(Debug)]
pub struct TableShape {
    /// Statements that create the user types (enums, composites) the columns use, on
    /// a worker that lacks them.
    pub types: Vec<String>,
    pub schema: String,
    pub name: String,
    pub columns: Vec<Column>,
    pub constraints: Vec<Constraint>,
    pub indexes: Vec<Index>,
    /// Owner, grants, row-level security and policies.
    pub privileges: super::privileges::Privileges,
}

/// Definitions are printed with every name qualified when pg_catalog alone is on the
/// path: the workers resolve them with search paths of their own. Sets that path for
/// the rest of the transaction and returns the one to restore (`restore_path`).
pub async fn catalog_path(c: &Client) -> Result<String, tokio_postgres::Error> {
    let saved: String = c
        .query_one("SELECT current_setting('search_path')", &[])
        .await?
        .get(0);
    c.batch_execute("SET LOCAL search_path = pg_catalog")
        .await?;
    Ok(saved)
}

pub async fn restore_path(c: &Client, saved: &str) -> Result<(), tokio_postgres::Error> {
    c.execute("SELECT set_config('search_path', $1, true)", &[&saved])
        .await?;
    Ok(())
}

/// Resolves a relation name the way the coordinator does (search_path included): oid,
/// schema, name, relkind.
pub async fn resolve(
    c: &Client,
    name: &str,
) -> Result<Option<(u32, String, String, String)>, tokio_postgres::Error> {
    let row = c
        .query_opt(
            "SELECT c.oid, n.nspname::text, c.relname::text, c.relkind::text
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.oid = to_regclass($1)",
            &[&name],
        )
        .await?;
    Ok(row.map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))))
}

impl TableShape {
    pub async fn read(
        c: &Client,
        oid: u32,
        schema: &str,
        name: &str,
    ) -> Result<TableShape, tokio_postgres::Error> {
        let saved = catalog_path(c).await?;
        let shape = Self::read_qualified(c, oid, schema, name).await;
        restore_path(c, &saved).await?;
        shape
    }

    async fn read_qualified(
        c: &Client,
        oid: u32,
        schema: &str,
        name: &str,
    ) -> Result<TableShape, tokio_postgres::Error> {
        let columns = c
            .query(
                "SELECT a.attnum, a.attname::text, format_type(a.atttypid, a.atttypmod), a.atttypid,
                        a.attnotnull, pg_get_expr(d.adbin, d.adrelid), a.attgenerated <> '',
                        CASE WHEN a.attcollation <> t.typcollation AND a.attcollation <> 0 THEN
                            (SELECT quote_ident(n.nspname) || '.' || quote_ident(co.collname)
                             FROM pg_collation co JOIN pg_namespace n ON n.oid = co.collnamespace
                             WHERE co.oid = a.attcollation) END
                 FROM pg_attribute a
                 JOIN pg_type t ON t.oid = a.atttypid
                 LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
                 WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
                 ORDER BY a.attnum",
                &[&oid],
            )
            .await?
            .iter()
            .map(|r| Column {
                attnum: r.get(0),
                name: r.get(1),
                type_sql: r.get(2),
                type_oid: r.get(3),
                not_null: r.get(4),
                default: r.get(5),
                generated: r.get(6),
                collation: r.get(7),
            })
            .collect();
        let constraints = c
            .query(
                "SELECT conname::text, contype::text, pg_get_constraintdef(oid),
                        coalesce(conkey, '{}'), nullif(confrelid, 0)
                 FROM pg_constraint
                 WHERE conrelid = $1 AND contype IN ('p', 'u', 'c', 'x', 'f')
                 ORDER BY contype = 'f', oid",
                &[&oid],
            )
            .await?
            .iter()
            .map(|r| Constraint {
                name: r.get(0),
                kind: r.get::<_, String>(1).chars().next().unwrap_or('c'),
                def: r.get(2),
                keys: r.get(3),
                references: r.get(4),
            })
            .collect();
        let indexes = c
            .query(
                "SELECT c.relname::text, quote_ident(c.relname), pg_get_indexdef(i.indexrelid),
                        i.indisunique, i.indkey::int2[]
                 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                 WHERE i.indrelid = $1
                   AND NOT EXISTS (SELECT 1 FROM pg_constraint k
                                   WHERE k.conindid = i.indexrelid AND k.conrelid = $1)
                 ORDER BY i.indexrelid",
                &[&oid],
            )
            .await?
            .iter()
            .map(|r| Index {
                name: r.get(0),
                quoted_name: r.get(1),
                def: r.get(2),
                unique: r.get(3),
                keys: r.get(4),
            })
            .collect();
        let mut types = Vec::new();
        for r in c
            .query(
                "SELECT DISTINCT t.oid, n.nspname::text, t.typname::text, t.typtype::text
                 FROM pg_attribute a
                 JOIN pg_type at ON at.oid = a.atttypid
                 JOIN pg_type t ON t.oid = CASE WHEN at.typcategory = 'A' AND at.typelem <> 0
                                               THEN at.typelem ELSE at.oid END
                 JOIN pg_namespace n ON n.oid = t.typnamespace
                 WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
                   AND (t.typtype = 'e' OR (t.typtype = 'c' AND
                        (SELECT relkind FROM pg_class WHERE oid = t.typrelid) = 'c'))
                 ORDER BY t.oid",
                &[&oid],
            )
            .await?
        {
            let (toid, ns, name, kind): (u32, String, String, String) =
                (r.get(0), r.get(1), r.get(2), r.get(3));
            let body: Option<String> = if kind == "e" {
                c.query_one(
                    "SELECT 'ENUM (' || coalesce(string_agg(quote_literal(enumlabel::text), ', ' ORDER BY enumsortorder), '') || ')'
                     FROM pg_enum WHERE enumtypid = $1",
                    &[&toid],
                )
                .await?
                .get(0)
            } else {
                c.query_one(
                    "SELECT '(' || string_agg(quote_ident(attname) || ' ' || format_type(atttypid, atttypmod), ', ' ORDER BY attnum) || ')'
                     FROM pg_attribute
                     WHERE attrelid = (SELECT typrelid FROM pg_type WHERE oid = $1)
                       AND attnum > 0 AND NOT attisdropped",
                    &[&toid],
                )
                .await?
                .get(0)
            };
            if let Some(body) = body {
                types.push(format!("CREATE SCHEMA IF NOT EXISTS {}", quote_ident(&ns)));
                types.push(format!(
                    "DO $sg$ BEGIN CREATE TYPE {} AS {body}; EXCEPTION WHEN duplicate_object THEN NULL; END $sg$",
                    qualified(&ns, &name)
                ));
            }
        }
        let privileges = super::privileges::Privileges::read(c, oid).await?;
        Ok(TableShape {
            types,
            schema: schema.to_owned(),
            name: name.to_owned(),
            columns,
            constraints,
            indexes,
            privileges,
        })
    }

    /// The statements that give shard `shard_id` the table's owner, grants, row-level
    /// security and policies: run once its rows are in (with row-level security
    /// forced, a login that is not a superuser could not load them).
    pub fn privileges_sql(&self, shard_id: i64) -> String {
        let shard = qualified(
            &self.schema,
            &crate::catalog::shard_name(&self.name, shard_id),
        );
        self.privileges
            .shard_sql(&shard, super::privileges::Scope::All)
            .join(";\n")
    }

    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// The columns rows are copied through (generated columns are computed again).
    pub fn copy_columns(&self) -> String {
        self.columns
            .iter()
            .filter(|c| !c.generated)
            .map(|c| quote_ident(&c.name))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Citus's rule: on a hash-distributed table, uniqueness must include the
    /// distribution column (otherwise no shard could enforce it).
    pub fn check_unique_includes(&self, dist: &Column) -> Result<(), AdminError> {
        let bad = self
            .constraints
            .iter()
            .filter(|k| matches!(k.kind, 'p' | 'u' | 'x'))
            .find(|k| !k.keys.contains(&dist.attnum))
            .map(|k| k.name.clone())
            .or_else(|| {
                self.indexes
                    .iter()
                    .find(|i| i.unique && !i.keys.contains(&dist.attnum))
                    .map(|i| i.name.clone())
            });
        match bad {
            None => Ok(()),
            Some(name) => Err(AdminError::InvalidDefinition {
                message: format!("cannot create constraint on \"{}\"", self.name),
                detail: Some(format!(
                    "Distributed relations cannot have UNIQUE, EXCLUDE, or PRIMARY KEY constraints that do not include the partition column (\"{name}\" does not include \"{}\").",
                    dist.name
                )),
            }),
        }
    }

    /// The statements that create shard `shard_id` (index `shard_index`) of this table
    /// on a worker. `snap` resolves foreign keys to their target shards.
    pub fn shard_ddl(
        &self,
        meta: &ShardTarget,
        shard_id: i64,
        shard_index: i32,
        snap: &Snapshot,
    ) -> Result<Vec<String>, AdminError> {
        let (mut out, fks) = self.shard_ddl_split(meta, shard_id, shard_index, snap)?;
        out.extend(fks);
        Ok(out)
    }

    /// The same, with the foreign keys apart (to add once every referenced shard
    /// exists and holds its rows).
    pub fn shard_ddl_split(
        &self,
        meta: &ShardTarget,
        shard_id: i64,
        shard_index: i32,
        snap: &Snapshot,
    ) -> Result<(Vec<String>, Vec<String>), AdminError> {
        let mut fks = Vec::new();
        let shard = qualified(
            &self.schema,
            &crate::catalog::shard_name(&self.name, shard_id),
        );
        let mut out = self.types.clone();
        out.push(format!(
            "CREATE SCHEMA IF NOT EXISTS {}",
            quote_ident(&self.schema)
        ));
        let cols: Vec<String> = self
            .columns
            .iter()
            .map(|c| {
                let mut s = format!("{} {}", quote_ident(&c.name), c.type_sql);
                if let Some(coll) = &c.collation {
                    s.push_str(&format!(" COLLATE {coll}"));
                }
                match &c.default {
                    Some(d) if c.generated => {
                        s.push_str(&format!(" GENERATED ALWAYS AS ({d}) STORED"))
                    }
                    Some(d) if !d.contains("nextval(") => s.push_str(&format!(" DEFAULT {d}")),
                    _ => {}
                }
                if c.not_null {
                    s.push_str(" NOT NULL");
                }
                s
            })
            .collect();
        out.push(format!("CREATE TABLE {shard} ({})", cols.join(", ")));
        for k in &self.constraints {
            let name = quote_ident(&crate::catalog::shard_name(&k.name, shard_id));
            match k.references {
                Some(target) => {
                    let def = fk_to_shard(&k.def, target, meta, shard_index, snap)?;
                    fks.push(format!("ALTER TABLE {shard} ADD CONSTRAINT {name} {def}"));
                }
                None => out.push(format!(
                    "ALTER TABLE {shard} ADD CONSTRAINT {name} {}",
                    k.def
                )),
            }
        }
        for i in &self.indexes {
            out.push(index_on_shard(i, &shard, shard_id)?);
        }
        Ok((out, fks))
    }
}

/// What a shard belongs to, for foreign-key resolution.
pub struct ShardTarget {
    pub method: Method,
    pub colocation_id: i32,
}

/// Rewrites `FOREIGN KEY (..) REFERENCES <table>(..) ...` to point at the shard of the
/// referenced table that sits with this one.
fn fk_to_shard(
    def: &str,
    target: u32,
    me: &ShardTarget,
    shard_index: i32,
    snap: &Snapshot,
) -> Result<String, AdminError> {
    let unsupported = || {
        AdminError::NotSupported(
            "foreign keys from distributed tables may only reference reference tables or colocated distributed tables (on the distribution column)".into(),
        )
    };
    let t: &TableMeta = snap.tables.get(&target).ok_or_else(unsupported)?;
    let shard = match (me.method, t.method) {
        (_, Method::Reference) => t.shards.first(),
        (Method::Hash, Method::Hash) if t.colocation_id == me.colocation_id => {
            t.shards.iter().find(|s| s.index == shard_index)
        }
        _ => None,
    }
    .ok_or_else(unsupported)?;
    let start = def.find("REFERENCES ").ok_or_else(unsupported)? + "REFERENCES ".len();
    let end = start + def[start..].find('(').ok_or_else(unsupported)?;
    Ok(format!(
        "{}{}{}",
        &def[..start],
        qualified(&t.schema, &t.shard_name(shard.id)),
        &def[end..]
    ))
}

/// `CREATE [UNIQUE] INDEX name ON [ONLY] schema.table USING ...` -> the shard's.
fn index_on_shard(i: &Index, shard: &str, shard_id: i64) -> Result<String, AdminError> {
    let on = i.def.find(" ON ").ok_or_else(|| {
        AdminError::NotSupported(format!("cannot copy index \"{}\" to the shards", i.name))
    })?;
    let using = on
        + i.def[on..].find(" USING ").ok_or_else(|| {
            AdminError::NotSupported(format!("cannot copy index \"{}\" to the shards", i.name))
        })?;
    let head = &i.def[..on];
    let head = head
        .strip_suffix(&i.quoted_name)
        .map(|h| {
            format!(
                "{h}{}",
                quote_ident(&crate::catalog::shard_name(&i.name, shard_id))
            )
        })
        .ok_or_else(|| {
            AdminError::NotSupported(format!("cannot copy index \"{}\" to the shards", i.name))
        })?;
    Ok(format!("{head} ON {shard}{}", &i.def[using..]))
}
