//! Recovery of this router's prepared transactions: a commit record means COMMIT
//! PREPARED, no record (and the commit no longer deciding) means ROLLBACK PREPARED; then
//! the records of transactions prepared nowhere any more are deleted.

use super::{Transactions, parse_gid};
use crate::backend::control::connect_node;
use crate::catalog::Snapshot;
use std::collections::{HashMap, HashSet};
use std::time::Instant;

/// What a recovery pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Recovered {
    pub committed: usize,
    pub rolled_back: usize,
}

impl Transactions {
    /// Prepared transactions of a router id no live router holds wait for a router
    /// with that id (each router recovers only its own): say so, once per id.
    async fn warn_orphans(&self, coord: &tokio_postgres::Client, others: HashMap<String, usize>) {
        for (id, n) in others {
            if self.warned.lock().contains(&id) {
                continue;
            }
            let free = coord
                .query_one(
                    "SELECT pg_try_advisory_lock(hashtext('shardgate.router'), hashtext($1))",
                    &[&id],
                )
                .await
                .is_ok_and(|r| r.get::<_, bool>(0));
            if free {
                let _ = coord
                    .execute(
                        "SELECT pg_advisory_unlock(hashtext('shardgate.router'), hashtext($1))",
                        &[&id],
                    )
                    .await;
                tracing::warn!(
                    router_id = %id,
                    prepared = n,
                    "prepared transactions of a router that is not running wait (holding their locks): start a router with [transactions] router_id = \"{id}\" against this coordinator to finish them"
                );
                self.warned.lock().insert(id);
            }
        }
    }

    /// One pass over the coordinator and every active worker.
    pub async fn recover(&self, snap: &Snapshot) -> Result<Recovered, String> {
        let started = Instant::now();
        // Taken before anything is read: commits that may still be deciding.
        let (next, deciding) = self.deciding();
        let deciding: HashSet<u64> = deciding.into_iter().collect();
        let settled_commit =
            |epoch: u32, seq: u64| epoch != self.epoch || (seq < next && !deciding.contains(&seq));
        let login = self.login();
        let coord = connect_node(login, &login.host, login.port, self.database())
            .await
            .map_err(|e| format!("coordinator: {e}"))?;
        let pattern = self.gid_pattern();
        let mut nodes: Vec<(Option<i32>, String, u16)> =
            vec![(None, login.host.clone(), login.port)];
        for n in snap.nodes.iter().filter(|n| n.is_active) {
            nodes.push((Some(n.group_id), n.name.clone(), n.port as u16));
        }
        // Prepared transactions of other router ids: router id -> count.
        let mut others: HashMap<String, usize> = HashMap::new();
        // Prepared gids per node tag, of the nodes that answered.
        let mut prepared: HashMap<String, Vec<String>> = HashMap::new();
        let mut clients = Vec::new();
        for (group, host, port) in &nodes {
            let client = if group.is_none() {
                None
            } else {
                match connect_node(login, host, *port, self.database()).await {
                    Ok(c) => Some(c),
                    Err(e) => {
                        tracing::warn!(node = %format!("{host}:{port}"), error = %e, "recovery: node unreachable; its prepared transactions wait");
                        continue;
                    }
                }
            };
            let c = client.as_ref().unwrap_or(&coord);
            let rows = c
                .query(
                    "SELECT gid FROM pg_prepared_xacts WHERE gid LIKE $1 AND database = current_database()",
                    &[&pattern],
                )
                .await
                .map_err(|e| format!("{host}:{port}: {e}"))?;
            prepared.insert(
                super::node_tag(*group),
                rows.iter().map(|r| r.get(0)).collect(),
            );
            if let Ok(rows) = c
                .query(
                    "SELECT gid FROM pg_prepared_xacts WHERE gid LIKE 'sg\\_t\\_%' AND gid NOT LIKE $1 AND database = current_database()",
                    &[&pattern],
                )
                .await
            {
                for r in rows {
                    let gid: String = r.get(0);
                    if let Some((router, ..)) = parse_gid(&gid) {
                        *others.entry(router.to_owned()).or_insert(0usize) += 1;
                    }
                }
            }
            clients.push((super::node_tag(*group), format!("{host}:{port}"), client));
        }
        // Read after the prepared lists: a settled commit's records do not change.
        let records: HashSet<String> = coord
            .query(
                "SELECT gid FROM shardgate.pg_dist_transaction WHERE gid LIKE $1",
                &[&pattern],
            )
            .await
            .map_err(|e| format!("coordinator: {e}"))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut done = Recovered::default();
        for (tag, addr, client) in &clients {
            let c = client.as_ref().unwrap_or(&coord);
            for gid in prepared.get(tag).into_iter().flatten() {
                let Some((_, epoch, seq, _)) = parse_gid(gid) else {
                    continue;
                };
                if !settled_commit(epoch, seq) {
                    continue;
                }
                let commit = records.contains(gid);
                let quoted = gid.replace('\'', "''");
                let sql = if commit {
                    format!("COMMIT PREPARED '{quoted}'")
                } else {
                    format!("ROLLBACK PREPARED '{quoted}'")
                };
                let mut r = c.batch_execute(&sql).await;
                if let Err(e) = &r
                    && e.as_db_error().is_some_and(|d| d.code().code() == "42501")
                {
                    // Owned by a role the transaction took for itself: finished as it
                    // (see `as_owner_sql`), and this connection's role reset after.
                    r = match c.batch_execute(&super::as_owner_sql(gid)).await {
                        Ok(()) => {
                            let r = c.batch_execute(&sql).await;
                            let _ = c.batch_execute("RESET ROLE").await;
                            r
                        }
                        Err(e) => Err(e),
                    };
                }
                match r {
                    Ok(()) => {
                        tracing::info!(node = %addr, gid, commit, "recovered a prepared transaction");
                        if commit {
                            done.committed += 1;
                        } else {
                            done.rolled_back += 1;
                        }
                    }
                    // Finished meanwhile by someone else.
                    Err(e) if e.as_db_error().is_some_and(|d| d.code().code() == "42704") => {}
                    Err(e) => {
                        tracing::warn!(node = %addr, gid, error = %e, "recovery could not finish a prepared transaction");
                    }
                }
            }
        }
        // Records no longer needed: settled commits whose node answered and holds no
        // such prepared transaction any more (a node that did not answer may still
        // have it, and a node that left the catalog never will).
        let answered: HashSet<&str> = clients.iter().map(|(t, _, _)| t.as_str()).collect();
        // Every node of the catalog, active or not: an inactive node may come back with
        // its prepared transactions.
        let known: HashSet<String> = std::iter::once(super::node_tag(None))
            .chain(snap.nodes.iter().map(|n| super::node_tag(Some(n.group_id))))
            .collect();
        let still: HashSet<&str> = prepared.values().flatten().map(String::as_str).collect();
        let obsolete: Vec<&str> = records
            .iter()
            .filter(|gid| {
                let Some((_, epoch, seq, tag)) = parse_gid(gid) else {
                    return false;
                };
                settled_commit(epoch, seq)
                    && (answered.contains(tag) || !known.contains(tag))
                    && !still.contains(gid.as_str())
            })
            .map(String::as_str)
            .collect();
        if !obsolete.is_empty() {
            coord
                .execute(
                    "DELETE FROM shardgate.pg_dist_transaction WHERE gid = ANY($1)",
                    &[&obsolete],
                )
                .await
                .map_err(|e| format!("coordinator: {e}"))?;
        }
        self.warn_orphans(&coord, others).await;
        let m = &self.metrics;
        m.recovered_committed.inc_by(done.committed as u64);
        m.recovered_rolled_back.inc_by(done.rolled_back as u64);
        m.recovery_seconds.observe(started.elapsed().as_secs_f64());
        Ok(done)
    }
}
