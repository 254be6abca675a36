//! Finishing admin changes that a crash left half done: transactions prepared on a
//! worker (`sg_admin_...`) whose change the coordinator committed (a commit record in
//! `shardgate.pg_dist_transaction`) are committed; those without a record are rolled
//! back. Holding the catalog lock while deciding means no change is between PREPARE
//! and its coordinator COMMIT at that moment, so "no record" really means "abandoned".

use super::AdminError;
use crate::backend::control::{ControlLogin, connect_node};
use crate::catalog::{CATALOG_LOCK, Snapshot};

/// What a recovery pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    pub committed: usize,
    pub rolled_back: usize,
}

/// One pass over every worker of the catalog. A transaction with a commit record is
/// committed only once it has been prepared for `grace` (its own router normally
/// finishes it within milliseconds).
pub async fn recover(
    login: &ControlLogin,
    database: &str,
    grace: std::time::Duration,
) -> Result<Recovered, AdminError> {
    let on = |e| AdminError::on("coordinator", e);
    let coord = connect_node(login, &login.host, login.port, database)
        .await
        .map_err(on)?;
    coord.batch_execute("BEGIN").await.map_err(on)?;
    coord
        .execute("SELECT pg_advisory_xact_lock($1)", &[&CATALOG_LOCK])
        .await
        .map_err(on)?;
    let snap = Snapshot::read(&coord).await.map_err(on)?;
    let mut done = Recovered::default();
    let mut settled: Vec<String> = Vec::new();
    for node in snap.nodes.iter().filter(|n| n.is_active) {
        let addr = node.addr();
        let Ok(w) = connect_node(login, &node.name, node.port as u16, database).await else {
            tracing::warn!(node = %addr, "recovery: node unreachable; its prepared transactions wait");
            continue;
        };
        let gids: Vec<(String, bool)> = w
            .query(
                "SELECT gid, prepared <= now() - make_interval(secs => $1) FROM pg_prepared_xacts
                 WHERE gid LIKE 'sg\\_admin\\_%' AND database = current_database()",
                &[&grace.as_secs_f64()],
            )
            .await
            .map_err(|e| AdminError::on(&addr, e))?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        for (gid, old) in gids {
            let recorded = coord
                .query_opt(
                    "SELECT 1 FROM shardgate.pg_dist_transaction WHERE gid = $1",
                    &[&gid],
                )
                .await
                .map_err(on)?
                .is_some();
            // A recorded one may be in its own router's last step right now: leave it
            // that router for a while.
            if recorded && !old {
                continue;
            }
            let sql = if recorded {
                format!("COMMIT PREPARED '{}'", gid.replace('\'', "''"))
            } else {
                format!("ROLLBACK PREPARED '{}'", gid.replace('\'', "''"))
            };
            match w.batch_execute(&sql).await {
                Ok(()) => {
                    tracing::info!(node = %addr, gid, recorded, "recovered a prepared admin transaction");
                    if recorded {
                        done.committed += 1;
                        settled.push(gid);
                    } else {
                        done.rolled_back += 1;
                    }
                }
                // Finished by its own router meanwhile.
                Err(e) if e.as_db_error().is_some_and(|d| d.code().code() == "42704") => {
                    if recorded {
                        settled.push(gid);
                    }
                }
                Err(e) => return Err(AdminError::on(&addr, e)),
            }
        }
    }
    // Records of transactions that are committed everywhere (no longer prepared on any
    // reachable node) are dropped only for the ones settled here; others belong to
    // changes still finishing.
    if !settled.is_empty() {
        coord
            .execute(
                "DELETE FROM shardgate.pg_dist_transaction WHERE gid = ANY($1)",
                &[&settled],
            )
            .await
            .map_err(on)?;
    }
    coord.batch_execute("COMMIT").await.map_err(on)?;
    Ok(done)
}
