//! `create_distributed_table`, `create_reference_table`, `undistribute_table` and
//! `get_shard_id_for_distribution_column`.

use super::call::Call;
use super::data::{self, ShardDest};
use super::fleet::Fleet;
use super::shape::{ShardTarget, TableShape, qualified, resolve};
use super::{AdminCtx, AdminError, Reply, in_change};
use crate::catalog::{Method, NodeRow, Snapshot, shard_name, value_type_for};
use crate::plugin::ShardScheme;
use tokio_postgres::Client;

/// Citus's default `citus.shard_count`.
pub const DEFAULT_SHARD_COUNT: i32 = 32;
const MAX_SHARD_COUNT: i32 = 64000;

fn db(e: tokio_postgres::Error) -> AdminError {
    AdminError::on("coordinator", e)
}

/// The next value of one of the catalog's sequences.
pub(super) async fn nextval(c: &Client, sequence: &str) -> Result<i64, AdminError> {
    Ok(
        c.query_one(&format!("SELECT nextval('shardgate.{sequence}')"), &[])
            .await
            .map_err(db)?
            .get(0),
    )
}

/// Resolves the table argument to a plain table on the coordinator.
async fn table_arg(c: &Client, name: &str) -> Result<(u32, String, String), AdminError> {
    let (oid, schema, rel, kind) = resolve(c, name)
        .await
        .map_err(db)?
        .ok_or_else(|| AdminError::UndefinedTable(name.to_owned()))?;
    if kind != "r" {
        return Err(AdminError::NotSupported(format!(
            "\"{rel}\" is not a regular table: only plain tables can be distributed"
        )));
    }
    Ok((oid, schema, rel))
}

fn eligible_nodes(snap: &Snapshot) -> Vec<&NodeRow> {
    snap.nodes
        .iter()
        .filter(|n| n.is_active && n.role == "primary" && n.should_have_shards)
        .collect()
}

fn no_workers() -> AdminError {
    AdminError::Prerequisite {
        message: "couldn't find any worker nodes".into(),
        hint: Some("add a worker with SELECT citus_add_node('host', port)".into()),
    }
}

/// The nodes of the given groups, or an error naming a group without a node.
fn nodes_of<'s>(snap: &'s Snapshot, groups: &[i32]) -> Result<Vec<&'s NodeRow>, AdminError> {
    groups
        .iter()
        .map(|g| {
            snap.node_by_group(*g)
                .ok_or_else(|| AdminError::Prerequisite {
                    message: format!("no primary node in group {g}"),
                    hint: None,
                })
        })
        .collect()
}

fn distinct(groups: impl IntoIterator<Item = i32>) -> Vec<i32> {
    let mut v: Vec<i32> = groups.into_iter().collect();
    v.sort_unstable();
    v.dedup();
    v
}

pub async fn create_distributed_table(a: &AdminCtx<'_>, call: &Call) -> Result<Reply, AdminError> {
    let table_name = call.required("table_name")?;
    let column = call.required("distribution_column")?;
    if let Some(t) = call.arg("distribution_type")
        && !t.eq_ignore_ascii_case("hash")
    {
        return Err(AdminError::NotSupported(format!(
            "distribution_type {t} is not supported: shardgate distributes by hash"
        )));
    }
    let colocate_with = call.arg("colocate_with").unwrap_or("default").to_owned();
    let shard_count = match call.arg("shard_count") {
        None => None,
        Some(s) => {
            let n: i32 = s.parse().map_err(|_| {
                AdminError::InvalidText(format!("invalid input syntax for type integer: \"{s}\""))
            })?;
            if !(1..=MAX_SHARD_COUNT).contains(&n) {
                return Err(AdminError::InvalidParameter(format!(
                    "shard_count must be between 1 and {MAX_SHARD_COUNT}"
                )));
            }
            Some(n)
        }
    };
    let plugin_name = call.arg("distribution_plugin").unwrap_or("hash-citus");
    let plugins = a.server.plugins.current();
    let plugin = plugins.distribution(plugin_name).ok_or_else(|| {
        AdminError::UndefinedObject(format!(
            "distribution plugin \"{plugin_name}\" is not loaded"
        ))
    })?;
    let placement = plugins
        .placement(&a.server.config.placement_plugin)
        .ok_or_else(|| {
            AdminError::UndefinedObject(format!(
                "placement plugin \"{}\" is not loaded",
                a.server.config.placement_plugin
            ))
        })?;

    let (coord, snap) = a.begin().await?;
    let mut rows_moved = 0;
    let result = in_change!(a, coord, fleet, {
        let (oid, schema, rel) = table_arg(&coord, table_name).await?;
        if snap.tables.contains_key(&oid) {
            return Err(AdminError::InvalidDefinition {
                message: format!("table \"{rel}\" is already distributed"),
                detail: None,
            });
        }
        // Writers wait until the rows are in the shards; readers go on.
        coord
            .batch_execute(&format!(
                "LOCK TABLE {} IN EXCLUSIVE MODE",
                qualified(&schema, &rel)
            ))
            .await
            .map_err(db)?;
        let shape = TableShape::read(&coord, oid, &schema, &rel)
            .await
            .map_err(db)?;
        let col = shape
            .column(column)
            .ok_or_else(|| AdminError::UndefinedColumn {
                column: column.to_owned(),
                table: rel.clone(),
            })?;
        let vt = value_type_for(col.type_oid)
            .filter(|t| plugin.supports(*t))
            .ok_or_else(|| {
                AdminError::UndefinedFunction(format!(
                    "could not identify a hash function for type {} (distribution plugin {})",
                    col.type_sql, plugin_name
                ))
            })?;
        shape.check_unique_includes(col)?;

        // The colocation group.
        let requested = shard_count.unwrap_or(DEFAULT_SHARD_COUNT);
        let group = match colocate_with.to_ascii_lowercase().as_str() {
            "none" => None,
            "default" => snap
                .colocations
                .values()
                .filter(|g| {
                    g.shard_count == requested
                        && g.column_type == col.type_oid
                        && g.replication_factor == 1
                        && g.plugin.as_deref() == Some(plugin_name)
                        && snap.tables.values().any(|t| t.colocation_id == g.id)
                })
                .min_by_key(|g| g.id)
                .cloned(),
            _ => {
                let (other_oid, _, other) = resolve(&coord, &colocate_with)
                    .await
                    .map_err(db)?
                    .map(|(o, s, r, _)| (o, s, r))
                    .ok_or_else(|| AdminError::UndefinedTable(colocate_with.clone()))?;
                let cannot = |detail: String| {
                    AdminError::InvalidParameter(format!(
                        "cannot colocate tables {rel} and {other}: {detail}"
                    ))
                };
                let t = snap
                    .tables
                    .get(&other_oid)
                    .filter(|t| t.method == Method::Hash)
                    .ok_or_else(|| cannot(format!("{other} is not a hash-distributed table")))?;
                let g = snap
                    .colocations
                    .get(&t.colocation_id)
                    .cloned()
                    .ok_or_else(|| cannot(format!("{other} has no colocation group")))?;
                if g.column_type != col.type_oid {
                    return Err(cannot(format!(
                        "distribution column types don't match for {rel} and {other}"
                    )));
                }
                if shard_count.is_some_and(|n| n != g.shard_count) {
                    return Err(cannot(format!(
                        "shard counts don't match for {rel} and {other}"
                    )));
                }
                if g.plugin.as_deref() != Some(plugin_name) {
                    return Err(cannot(format!(
                        "{other} is distributed by plugin {}, {rel} would be by {plugin_name}",
                        g.plugin.as_deref().unwrap_or("?")
                    )));
                }
                Some(g)
            }
        };
        let nodes = eligible_nodes(&snap);
        if nodes.is_empty() {
            return Err(no_workers());
        }
        let (colocation_id, count, placements): (i32, i32, Vec<Vec<i32>>) = match &group {
            Some(g) => {
                let peer = snap
                    .tables
                    .values()
                    .filter(|t| t.colocation_id == g.id)
                    .min_by_key(|t| t.oid)
                    .expect("default groups are picked with a table");
                (
                    g.id,
                    g.shard_count,
                    peer.shards.iter().map(|s| s.placements.clone()).collect(),
                )
            }
            None => {
                let id = nextval(&coord, "pg_dist_colocationid_seq").await?;
                let id = id as i32;
                let pnodes: Vec<crate::plugin::PlacementNode> = nodes
                    .iter()
                    .map(|n| crate::plugin::PlacementNode {
                        node_id: n.node_id,
                        group_id: n.group_id,
                        name: n.name.clone(),
                        port: n.port,
                        is_active: n.is_active,
                        should_have_shards: n.should_have_shards,
                    })
                    .collect();
                let placed = placement.place_shards(id, requested as u32, 1, &pnodes)?;
                coord
                    .execute(
                        "INSERT INTO shardgate.pg_dist_colocation
                           (colocationid, shardcount, replicationfactor, distributioncolumntype,
                            distributioncolumncollation, distplugin, distpluginhash)
                         VALUES ($1, $2, 1, $3, 0, $4, $5)",
                        &[
                            &id,
                            &requested,
                            &col.type_oid,
                            &plugin_name,
                            &plugin.content_hash(),
                        ],
                    )
                    .await
                    .map_err(db)?;
                (id, requested, placed)
            }
        };
        if placements.len() != count as usize {
            return Err(AdminError::Prerequisite {
                message: format!(
                    "colocation group {colocation_id} has {} shards, expected {count}",
                    placements.len()
                ),
                hint: None,
            });
        }
        let ids: Vec<i64> = coord
            .query(
                "SELECT nextval('shardgate.pg_dist_shardid_seq') FROM generate_series(1, $1)",
                &[&count],
            )
            .await
            .map_err(db)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let groups = distinct(placements.iter().flatten().copied());
        let f = Fleet::open(a.login_ref(), &a.database, &nodes_of(&snap, &groups)?).await?;
        let fleet = fleet.insert(f);
        let target = ShardTarget {
            method: Method::Hash,
            colocation_id,
        };
        let mut dests = Vec::new();
        for (i, (id, groups)) in ids.iter().zip(&placements).enumerate() {
            let ddl = shape.shard_ddl(&target, *id, i as i32, &snap)?.join(";\n");
            for g in groups {
                fleet.exec(*g, &ddl).await?;
            }
            dests.push(ShardDest {
                index: i as i32,
                schema: schema.clone(),
                table: qualified(&schema, &shard_name(&rel, *id)),
                groups: groups.clone(),
            });
        }
        let has_rows: bool = coord
            .query_one(
                &format!(
                    "SELECT EXISTS (SELECT 1 FROM ONLY {})",
                    qualified(&schema, &rel)
                ),
                &[],
            )
            .await
            .map_err(db)?
            .get(0);
        if has_rows {
            rows_moved = data::into_hash_shards(
                &coord,
                fleet,
                &qualified(&schema, &rel),
                column,
                vt,
                &shape.copy_columns(),
                plugin,
                &dests,
                &format!("sg_stage_{oid}"),
            )
            .await?;
            coord
                .batch_execute(&format!("DELETE FROM ONLY {}", qualified(&schema, &rel)))
                .await
                .map_err(db)?;
        }
        // Privileges once the rows are in.
        for (id, groups) in ids.iter().zip(&placements) {
            let sql = shape.privileges_sql(*id);
            for g in groups {
                fleet.exec(*g, &sql).await?;
            }
        }
        super::guard(&coord, &qualified(&schema, &rel)).await?;
        coord
            .execute(
                "INSERT INTO shardgate.pg_dist_partition
                   (logicalrelid, partmethod, partkey, colocationid, repmodel, distplugin, distpluginhash)
                 VALUES ($1::oid::regclass, 'h', $2, $3, 's', $4, $5)",
                &[&oid, &column, &colocation_id, &plugin_name, &plugin.content_hash()],
            )
            .await
            .map_err(db)?;
        for (i, (id, groups)) in ids.iter().zip(&placements).enumerate() {
            let (min, max) = match plugin.scheme() {
                ShardScheme::HashRanges => {
                    let (lo, hi) = hash_range(i as u32, count as u32);
                    (Some(lo.to_string()), Some(hi.to_string()))
                }
                ShardScheme::Modulo => (None, None),
            };
            insert_shard(&coord, oid, *id, i as i32, min, max, groups).await?;
        }
        Ok(())
    });
    result?;
    let mut reply = Reply::void(&call.column);
    if rows_moved > 0 {
        reply.notices.push(format!(
            "moved {rows_moved} rows from the local table into its shards"
        ));
    }
    Ok(reply)
}

/// The int32 hash range of shard `i` of `n` (Citus's split: equal ranges, the last
/// one up to int32 max).
pub fn hash_range(i: u32, n: u32) -> (i32, i32) {
    let inc = (1u64 << 32) / n as u64;
    let lo = i32::MIN as i64 + (i as u64 * inc) as i64;
    let hi = if i + 1 == n {
        i32::MAX as i64
    } else {
        lo + inc as i64 - 1
    };
    (lo as i32, hi as i32)
}

async fn insert_shard(
    coord: &Client,
    oid: u32,
    id: i64,
    index: i32,
    min: Option<String>,
    max: Option<String>,
    groups: &[i32],
) -> Result<(), AdminError> {
    coord
        .execute(
            "INSERT INTO shardgate.pg_dist_shard
               (logicalrelid, shardid, shardstorage, shardminvalue, shardmaxvalue, shardindex)
             VALUES ($1::oid::regclass, $2, 't', $3, $4, $5)",
            &[&oid, &id, &min, &max, &index],
        )
        .await
        .map_err(db)?;
    for g in groups {
        coord
            .execute(
                "INSERT INTO shardgate.pg_dist_placement (shardid, shardstate, shardlength, groupid)
                 VALUES ($1, 1, 0, $2)",
                &[&id, g],
            )
            .await
            .map_err(db)?;
    }
    Ok(())
}

/// The nodes that hold reference tables: every active primary worker (the
/// coordinator's own table of a reference table is its definition, kept empty).
pub fn reference_nodes(snap: &Snapshot) -> Vec<&NodeRow> {
    snap.nodes
        .iter()
        .filter(|n| n.is_active && n.role == "primary" && n.group_id != 0)
        .collect()
}

pub async fn create_reference_table(a: &AdminCtx<'_>, call: &Call) -> Result<Reply, AdminError> {
    let table_name = call.required("table_name")?;
    let (coord, snap) = a.begin().await?;
    let result = in_change!(a, coord, fleet, {
        let (oid, schema, rel) = table_arg(&coord, table_name).await?;
        if snap.tables.contains_key(&oid) {
            return Err(AdminError::InvalidDefinition {
                message: format!("table \"{rel}\" is already distributed"),
                detail: None,
            });
        }
        coord
            .batch_execute(&format!(
                "LOCK TABLE {} IN EXCLUSIVE MODE",
                qualified(&schema, &rel)
            ))
            .await
            .map_err(db)?;
        let shape = TableShape::read(&coord, oid, &schema, &rel)
            .await
            .map_err(db)?;
        let nodes = reference_nodes(&snap);
        if nodes.is_empty() {
            return Err(no_workers());
        }
        // All reference tables share one colocation group.
        let colocation_id = match snap
            .colocations
            .values()
            .find(|g| g.shard_count == 1 && g.replication_factor == -1 && g.column_type == 0)
        {
            Some(g) => g.id,
            None => {
                let id = nextval(&coord, "pg_dist_colocationid_seq").await?;
                coord
                    .execute(
                        "INSERT INTO shardgate.pg_dist_colocation
                           (colocationid, shardcount, replicationfactor, distributioncolumntype)
                         VALUES ($1, 1, -1, 0)",
                        &[&(id as i32)],
                    )
                    .await
                    .map_err(db)?;
                id as i32
            }
        };
        let id = nextval(&coord, "pg_dist_shardid_seq").await?;
        let groups: Vec<i32> = nodes.iter().map(|n| n.group_id).collect();
        let f = Fleet::open(a.login_ref(), &a.database, &nodes).await?;
        let fleet = fleet.insert(f);
        let target = ShardTarget {
            method: Method::Reference,
            colocation_id,
        };
        let ddl = shape.shard_ddl(&target, id, 0, &snap)?.join(";\n");
        for g in &groups {
            fleet.exec(*g, &ddl).await?;
        }
        let shard = qualified(&schema, &shard_name(&rel, id));
        data::copy_table(
            &coord,
            "coordinator",
            &format!("ONLY {}", qualified(&schema, &rel)),
            &shape.copy_columns(),
            fleet,
            &groups,
            &shard,
        )
        .await?;
        let sql = shape.privileges_sql(id);
        for g in &groups {
            fleet.exec(*g, &sql).await?;
        }
        coord
            .batch_execute(&format!("DELETE FROM ONLY {}", qualified(&schema, &rel)))
            .await
            .map_err(db)?;
        super::guard(&coord, &qualified(&schema, &rel)).await?;
        coord
            .execute(
                "INSERT INTO shardgate.pg_dist_partition
                   (logicalrelid, partmethod, partkey, colocationid, repmodel)
                 VALUES ($1::oid::regclass, 'n', NULL, $2, 't')",
                &[&oid, &colocation_id],
            )
            .await
            .map_err(db)?;
        insert_shard(&coord, oid, id, 0, None, None, &groups).await?;
        Ok(())
    });
    result?;
    Ok(Reply::void(&call.column))
}

pub async fn undistribute_table(a: &AdminCtx<'_>, call: &Call) -> Result<Reply, AdminError> {
    let table_name = call.required("table_name")?;
    let (coord, snap) = a.begin().await?;
    let result = in_change!(a, coord, fleet, {
        let (oid, schema, rel) = table_arg(&coord, table_name).await?;
        let Some(meta) = snap.tables.get(&oid).cloned() else {
            return Err(AdminError::InvalidParameter(format!(
                "cannot undistribute table \"{rel}\" because it is not distributed"
            )));
        };
        coord
            .batch_execute(&format!(
                "LOCK TABLE {} IN EXCLUSIVE MODE",
                qualified(&schema, &rel)
            ))
            .await
            .map_err(db)?;
        let shape = TableShape::read(&coord, oid, &schema, &rel)
            .await
            .map_err(db)?;
        let groups = distinct(meta.shards.iter().flat_map(|s| s.placements.clone()));
        let f = Fleet::open(a.login_ref(), &a.database, &nodes_of(&snap, &groups)?).await?;
        let fleet = fleet.insert(f);
        let cols = shape.copy_columns();
        // Reference tables: one copy is enough.
        let shards: Vec<_> = match meta.method {
            Method::Reference => meta.shards.iter().take(1).collect(),
            Method::Hash => meta.shards.iter().collect(),
        };
        for s in shards {
            let g = *s
                .placements
                .first()
                .ok_or_else(|| AdminError::Prerequisite {
                    message: format!("shard {} has no placement", s.id),
                    hint: None,
                })?;
            let n = fleet.node(g).expect("fleet holds every group");
            data::copy_back(
                &n.client,
                &n.addr,
                &qualified(&schema, &meta.shard_name(s.id)),
                &coord,
                &qualified(&schema, &rel),
                &cols,
            )
            .await?;
        }
        for s in &meta.shards {
            for g in &s.placements {
                fleet
                    .exec(
                        *g,
                        &format!(
                            "DROP TABLE IF EXISTS {}",
                            qualified(&schema, &meta.shard_name(s.id))
                        ),
                    )
                    .await?;
            }
        }
        delete_metadata(&coord, oid, meta.colocation_id).await?;
        coord
            .batch_execute(&format!(
                "DROP TRIGGER IF EXISTS shardgate_guard ON {}",
                qualified(&schema, &rel)
            ))
            .await
            .map_err(db)?;
        Ok(())
    });
    result?;
    Ok(Reply::void(&call.column))
}

/// Removes a table's rows from the catalog (and its colocation group when it was the
/// last member).
pub async fn delete_metadata(
    coord: &Client,
    oid: u32,
    colocation_id: i32,
) -> Result<(), AdminError> {
    coord
        .execute(
            "DELETE FROM shardgate.pg_dist_shard WHERE logicalrelid = $1::oid::regclass",
            &[&oid],
        )
        .await
        .map_err(db)?;
    coord
        .execute(
            "DELETE FROM shardgate.pg_dist_partition WHERE logicalrelid = $1::oid::regclass",
            &[&oid],
        )
        .await
        .map_err(db)?;
    coord
        .execute(
            "DELETE FROM shardgate.pg_dist_colocation g WHERE colocationid = $1
               AND NOT EXISTS (SELECT 1 FROM shardgate.pg_dist_partition p WHERE p.colocationid = g.colocationid)",
            &[&colocation_id],
        )
        .await
        .map_err(db)?;
    Ok(())
}

pub async fn get_shard_id(a: &AdminCtx<'_>, call: &Call) -> Result<Reply, AdminError> {
    let table_name = call.required("table_name")?;
    let coord = a.coordinator().await?;
    let (oid, _, rel, _) = resolve(&coord, table_name)
        .await
        .map_err(db)?
        .ok_or_else(|| AdminError::UndefinedTable(table_name.to_owned()))?;
    let snap = Snapshot::load(&coord).await.map_err(db)?;
    let meta = snap.tables.get(&oid).ok_or_else(|| {
        AdminError::InvalidParameter(format!("relation \"{rel}\" is not distributed"))
    })?;
    let id = match meta.method {
        Method::Reference => meta.shards.first().map(|s| s.id),
        Method::Hash => {
            let text = call.arg("distribution_value").ok_or_else(|| {
                AdminError::InvalidParameter("distribution value cannot be NULL".into())
            })?;
            let vt = value_type_for(meta.column_type).ok_or_else(|| {
                AdminError::UndefinedFunction(format!(
                    "could not identify a hash function for the distribution column of \"{rel}\""
                ))
            })?;
            let value = data::parse_value(text, vt)?;
            let pname = meta.plugin.as_deref().unwrap_or("hash-citus");
            let plugins = a.server.plugins.current();
            let plugin = plugins.distribution(pname).ok_or_else(|| {
                AdminError::UndefinedObject(format!(
                    "distribution plugin \"{pname}\" is not loaded"
                ))
            })?;
            let idx = plugin.shard_index(&value, meta.shards.len() as u32)? as i32;
            meta.shards.iter().find(|s| s.index == idx).map(|s| s.id)
        }
    }
    .ok_or_else(|| AdminError::Prerequisite {
        message: format!("relation \"{rel}\" has no shards"),
        hint: None,
    })?;
    Ok(Reply::value(&call.column, 20, id.to_string()))
}

#[cfg(test)]
mod tests {
    use super::hash_range;

    #[test]
    fn citus_shard_ranges() {
        assert_eq!(hash_range(0, 4), (i32::MIN, -1073741825));
        assert_eq!(hash_range(3, 4), (1073741824, i32::MAX));
        assert_eq!(hash_range(0, 1), (i32::MIN, i32::MAX));
        // 3 shards: the last one takes the remainder.
        let (_, hi) = hash_range(1, 3);
        assert_eq!(hash_range(2, 3).0, hi + 1);
    }
}
