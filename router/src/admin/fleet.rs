//! A change that spans the coordinator and several workers, all or nothing: one open
//! transaction per node; at the end PREPARE TRANSACTION on every worker, COMMIT on the
//! coordinator (the catalog change is the commit point), then COMMIT PREPARED on the
//! workers. Any failure before the coordinator's commit rolls everything back.
//!
//! Before its COMMIT the coordinator writes one row per prepared transaction into
//! `shardgate.pg_dist_transaction` (the commit records), so whether a prepared
//! `sg_admin_...` transaction belongs to a committed change can always be decided: a
//! row means commit, no row means roll back. Rows are deleted once the worker
//! committed. A crash in between is finished by `recover` (every router, at start and
//! every 30 s); an ambiguous COMMIT (the connection broke) is
//! resolved by looking for the rows.

use super::AdminError;
use crate::backend::control::{ControlLogin, connect_node};
use crate::catalog::NodeRow;
use tokio_postgres::Client;

pub struct NodeTxn {
    pub group: i32,
    pub addr: String,
    pub client: Client,
    prepared: Option<String>,
}

/// Open transactions on a set of worker nodes.
pub struct Fleet {
    nodes: Vec<NodeTxn>,
}

impl Fleet {
    /// Connects to each node (in parallel) and opens a transaction. A node that cannot
    /// be reached fails the whole change before anything was done.
    pub async fn open(
        login: &ControlLogin,
        database: &str,
        nodes: &[&NodeRow],
    ) -> Result<Fleet, AdminError> {
        let conns = futures_util::future::join_all(nodes.iter().map(|n| async move {
            let addr = n.addr();
            let client = connect_node(login, &n.name, n.port as u16, database)
                .await
                .map_err(|e| match e.as_db_error() {
                    Some(_) => AdminError::on(&addr, e),
                    None => AdminError::Connect {
                        node: addr.clone(),
                        reason: e.to_string(),
                    },
                })?;
            client
                .batch_execute("BEGIN")
                .await
                .map_err(|e| AdminError::on(&addr, e))?;
            Ok::<_, AdminError>(NodeTxn {
                group: n.group_id,
                addr,
                client,
                prepared: None,
            })
        }))
        .await;
        let mut fleet = Fleet { nodes: Vec::new() };
        let mut first_err = None;
        for c in conns {
            match c {
                Ok(n) => fleet.nodes.push(n),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_err {
            fleet.rollback().await;
            return Err(e);
        }
        Ok(fleet)
    }

    pub fn node(&self, group: i32) -> Option<&NodeTxn> {
        self.nodes.iter().find(|n| n.group == group)
    }

    /// Runs `sql` (one or more statements) on node `group`.
    pub async fn exec(&self, group: i32, sql: &str) -> Result<(), AdminError> {
        let n = self.node(group).ok_or_else(|| AdminError::Connect {
            node: format!("group {group}"),
            reason: "no open transaction on that node".into(),
        })?;
        n.client
            .batch_execute(sql)
            .await
            .map_err(|e| AdminError::on(&n.addr, e))
    }

    /// Phase one on every node. On failure everything is rolled back.
    pub async fn prepare(&mut self) -> Result<(), AdminError> {
        let tag: u64 = rand::random();
        let mut err = None;
        for n in &mut self.nodes {
            let gid = format!("sg_admin_{tag:016x}_{}", n.group);
            match n
                .client
                .batch_execute(&format!("PREPARE TRANSACTION '{gid}'"))
                .await
            {
                Ok(()) => n.prepared = Some(gid),
                Err(e) => {
                    let e = AdminError::on(&n.addr, e);
                    err = Some(match e {
                        AdminError::Db { ref code, .. } if code == "55000" => {
                            AdminError::Prerequisite {
                                message: format!(
                                    "node {} cannot prepare transactions, which changes that span nodes need",
                                    n.addr
                                ),
                                hint: Some(
                                    "set max_prepared_transactions above 0 on every node".into(),
                                ),
                            }
                        }
                        e => e,
                    });
                    break;
                }
            }
        }
        match err {
            None => Ok(()),
            Some(e) => {
                self.rollback_in_place().await;
                Err(e)
            }
        }
    }

    /// The prepared transactions: (group, gid).
    pub fn prepared(&self) -> Vec<(i32, String)> {
        self.nodes
            .iter()
            .filter_map(|n| Some((n.group, n.prepared.clone()?)))
            .collect()
    }

    /// Phase two, after the coordinator committed: the gids committed, and the first
    /// failure (that node's transaction stays prepared until recovered).
    pub async fn commit(self) -> (Vec<String>, Option<AdminError>) {
        let mut err = None;
        let mut done = Vec::new();
        for n in &self.nodes {
            let Some(gid) = &n.prepared else { continue };
            match n
                .client
                .batch_execute(&format!("COMMIT PREPARED '{gid}'"))
                .await
            {
                Ok(()) => done.push(gid.clone()),
                // Recovery finished it already.
                Err(e) if e.as_db_error().is_some_and(|d| d.code().code() == "42704") => {
                    done.push(gid.clone())
                }
                Err(e) => {
                    tracing::error!(node = %n.addr, gid, error = %e, "COMMIT PREPARED failed; the transaction stays prepared until recovered");
                    err.get_or_insert(AdminError::InDoubt {
                        node: n.addr.clone(),
                        reason: e.to_string(),
                    });
                }
            }
        }
        (done, err)
    }

    pub async fn rollback(mut self) {
        self.rollback_in_place().await;
    }

    async fn rollback_in_place(&mut self) {
        for n in &mut self.nodes {
            let sql = match n.prepared.take() {
                Some(gid) => format!("ROLLBACK PREPARED '{gid}'"),
                None => "ROLLBACK".to_owned(),
            };
            if let Err(e) = n.client.batch_execute(&sql).await {
                tracing::warn!(node = %n.addr, error = %e, "rollback on node failed");
            }
        }
    }
}
