//! `citus_add_node`, `citus_remove_node`, `citus_set_coordinator_host`.

use super::call::Call;
use super::data;
use super::fleet::Fleet;
use super::shape::{ShardTarget, TableShape, qualified};
use super::{AdminCtx, AdminError, Reply, in_change};
use crate::backend::control::connect_node;
use crate::catalog::{Method, NodeRow};

fn db(e: tokio_postgres::Error) -> AdminError {
    AdminError::on("coordinator", e)
}

fn port_arg(call: &Call, name: &str, default: u16) -> Result<i32, AdminError> {
    match call.arg(name) {
        None => Ok(default as i32),
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .map(|p| p as i32)
            .ok_or_else(|| AdminError::InvalidParameter(format!("invalid port \"{p}\""))),
    }
}

pub async fn add_node(a: &AdminCtx<'_>, call: &Call) -> Result<Reply, AdminError> {
    let host = call.required("nodename")?.to_owned();
    let port = port_arg(call, "nodeport", 5432)?;
    if let Some(role) = call.arg("noderole")
        && role != "primary"
    {
        return Err(AdminError::NotSupported(format!(
            "noderole {role} is not supported: shardgate adds primary nodes"
        )));
    }
    let groupid: i32 = match call.arg("groupid") {
        None => -1,
        Some(g) => g.parse().map_err(|_| {
            AdminError::InvalidText(format!("invalid input syntax for type integer: \"{g}\""))
        })?,
    };
    let (coord, snap) = a.begin().await?;
    if let Some(n) = snap.nodes.iter().find(|n| n.name == host && n.port == port) {
        let id = n.node_id;
        let _ = coord.batch_execute("ROLLBACK").await;
        return Ok(Reply::value(&call.column, 23, id.to_string()));
    }
    let result = in_change!(a, coord, fleet, {
        let group = if groupid < 0 {
            let g = super::distribute::nextval(&coord, "pg_dist_groupid_seq").await?;
            g as i32
        } else {
            if snap.node_by_group(groupid).is_some() {
                return Err(AdminError::InvalidParameter(format!(
                    "group {groupid} already has a primary node"
                )));
            }
            groupid
        };
        let node_id: i32 = coord
            .query_one(
                "INSERT INTO shardgate.pg_dist_node (groupid, nodename, nodeport, shouldhaveshards)
                 VALUES ($1, $2, $3, $4) RETURNING nodeid",
                &[&group, &host, &port, &(group != 0)],
            )
            .await
            .map_err(db)?
            .get(0);
        // The node must be reachable (and have the database) before it is added.
        let row = NodeRow {
            node_id,
            group_id: group,
            name: host.clone(),
            port,
            is_active: true,
            role: "primary".into(),
            should_have_shards: true,
        };
        let f = Fleet::open(a.login_ref(), &a.database, &[&row]).await?;
        let fleet = fleet.insert(f);
        // Reference tables get a placement on every node: copy them over.
        let mut refs: Vec<_> = snap
            .tables
            .values()
            .filter(|t| t.method == Method::Reference)
            .cloned()
            .collect();
        refs.sort_by_key(|t| t.oid);
        let mut fks: Vec<String> = Vec::new();
        for t in refs {
            let Some(shard) = t.shards.first() else {
                continue;
            };
            let shape = TableShape::read(&coord, t.oid, &t.schema, &t.name)
                .await
                .map_err(db)?;
            let target = ShardTarget {
                method: Method::Reference,
                colocation_id: t.colocation_id,
            };
            // Foreign keys between reference tables go on once all of them are copied.
            let (ddl, fk) = shape.shard_ddl_split(&target, shard.id, 0, &snap)?;
            fleet.exec(group, &ddl.join(";\n")).await?;
            fks.extend(fk);
            let src = shard
                .placements
                .iter()
                .find_map(|g| snap.node_by_group(*g))
                .ok_or_else(|| AdminError::Prerequisite {
                    message: format!(
                        "reference table \"{}\" has no placement to copy from",
                        t.name
                    ),
                    hint: None,
                })?;
            let from = connect_node(a.login_ref(), &src.name, src.port as u16, &a.database)
                .await
                .map_err(|e| AdminError::on(&src.addr(), e))?;
            let name = qualified(&t.schema, &t.shard_name(shard.id));
            data::copy_table(
                &from,
                &src.addr(),
                &name,
                &shape.copy_columns(),
                fleet,
                &[group],
                &name,
            )
            .await?;
            fleet.exec(group, &shape.privileges_sql(shard.id)).await?;
            coord
                .execute(
                    "INSERT INTO shardgate.pg_dist_placement (shardid, shardstate, shardlength, groupid)
                     VALUES ($1, 1, 0, $2)",
                    &[&shard.id, &group],
                )
                .await
                .map_err(db)?;
        }
        if !fks.is_empty() {
            fleet.exec(group, &fks.join(";\n")).await?;
        }
        Ok(node_id)
    });
    let node_id = result?;
    Ok(Reply::value(&call.column, 23, node_id.to_string()))
}

pub async fn remove_node(a: &AdminCtx<'_>, call: &Call) -> Result<Reply, AdminError> {
    let host = call.required("nodename")?.to_owned();
    let port = port_arg(call, "nodeport", 5432)?;
    let (coord, snap) = a.begin().await?;
    let result = in_change!(a, coord, fleet, {
        let node = snap
            .nodes
            .iter()
            .find(|n| n.name == host && n.port == port)
            .ok_or_else(|| {
                AdminError::UndefinedObject(format!("node at \"{host}:{port}\" does not exist"))
            })?;
        let group = node.group_id;
        let mut tables: Vec<_> = snap.tables.values().collect();
        tables.sort_by_key(|t| t.oid);
        for t in &tables {
            // A hash shard lives on one node; a reference table's last copy is data too.
            let only_here = |s: &&crate::catalog::Shard| {
                s.placements.contains(&group)
                    && (t.method == Method::Hash || s.placements.iter().all(|g| *g == group))
            };
            if let Some(s) = t.shards.iter().find(only_here) {
                return Err(AdminError::Prerequisite {
                    message: format!(
                        "cannot remove or disable the node {host}:{port} because it contains the only shard placement for shard {}",
                        s.id
                    ),
                    hint: Some(
                        "To proceed, either drop the distributed tables or use undistribute_table() function to convert them to local tables".into(),
                    ),
                });
            }
        }
        // Reference placements go with the node; their shard tables are dropped there
        // when it is reachable.
        let refs: Vec<_> = tables
            .iter()
            .filter(|t| t.method == Method::Reference)
            .filter_map(|t| {
                t.shards
                    .first()
                    .filter(|s| s.placements.contains(&group))
                    .map(|s| (qualified(&t.schema, &t.shard_name(s.id)), s.id))
            })
            .collect();
        if !refs.is_empty() {
            match Fleet::open(a.login_ref(), &a.database, &[node]).await {
                Ok(f) => {
                    let fleet = fleet.insert(f);
                    for (name, _) in &refs {
                        fleet
                            .exec(group, &format!("DROP TABLE IF EXISTS {name}"))
                            .await?;
                    }
                }
                Err(e) => {
                    tracing::warn!(node = %node.addr(), error = %e, "node unreachable; its reference table copies stay behind");
                }
            }
            for (_, id) in &refs {
                coord
                    .execute(
                        "DELETE FROM shardgate.pg_dist_placement WHERE shardid = $1 AND groupid = $2",
                        &[id, &group],
                    )
                    .await
                    .map_err(db)?;
            }
        }
        coord
            .execute(
                "DELETE FROM shardgate.pg_dist_node WHERE nodeid = $1",
                &[&node.node_id],
            )
            .await
            .map_err(db)?;
        Ok(())
    });
    result?;
    Ok(Reply::void(&call.column))
}

pub async fn set_coordinator_host(a: &AdminCtx<'_>, call: &Call) -> Result<Reply, AdminError> {
    let host = call.required("host")?.to_owned();
    let port = port_arg(call, "port", a.server.config.coordinator.port)?;
    if let Some(role) = call.arg("node_role")
        && role != "primary"
    {
        return Err(AdminError::NotSupported(format!(
            "node_role {role} is not supported"
        )));
    }
    let (coord, _snap) = a.begin().await?;
    let result = in_change!(a, coord, fleet, {
        let _ = &mut fleet;
        let updated = coord
            .execute(
                "UPDATE shardgate.pg_dist_node SET nodename = $1, nodeport = $2 WHERE groupid = 0",
                &[&host, &port],
            )
            .await
            .map_err(db)?;
        if updated == 0 {
            coord
                .execute(
                    "INSERT INTO shardgate.pg_dist_node (groupid, nodename, nodeport, shouldhaveshards)
                     VALUES (0, $1, $2, false)",
                    &[&host, &port],
                )
                .await
                .map_err(db)?;
        }
        Ok(())
    });
    result?;
    Ok(Reply::void(&call.column))
}
