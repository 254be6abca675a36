//! Distributed deadlock detection. Each Postgres finds the deadlocks it can see; a
//! cycle whose waits are on different nodes is invisible to all of them. Every
//! `interval` the detector collects the wait-for edges of every node (`pg_locks` through
//! `pg_blocking_pids`), maps backend pids to the distributed transactions of this
//! router (`Registry`: a transaction registers once it holds backends on two nodes),
//! merges them into one graph, and looks for strongly connected components whose waits
//! span more than one node. A cycle found is confirmed by a second collection a moment
//! later (waits seen on different nodes at slightly different times could otherwise
//! join into a cycle that never existed); then the youngest transaction of the cycle is
//! cancelled. Its session turns the backend's 57014 into 40P01 with the cycle's story.

use crate::backend::control::{ControlLogin, connect_node};
use crate::catalog::Catalog;
use crate::txn::Transactions;
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// A transaction of this router that holds backends on more than one node.
pub struct DistTxn {
    pub id: u64,
    /// (node: `None` the coordinator, backend pid).
    backends: Mutex<Vec<(Option<i32>, i32)>>,
    /// Set when the detector cancels this transaction: what its client is told.
    victim: Mutex<Option<Victim>>,
}

#[derive(Clone, Debug)]
pub struct Victim {
    pub message: String,
    pub detail: String,
}

impl DistTxn {
    pub fn add_backend(&self, node: Option<i32>, pid: i32) {
        let mut b = self.backends.lock();
        if !b.contains(&(node, pid)) {
            b.push((node, pid));
        }
    }

    /// Whether the detector chose this transaction to break a deadlock.
    pub fn victim(&self) -> Option<Victim> {
        self.victim.lock().clone()
    }
}

/// The live distributed transactions of this router.
#[derive(Default)]
pub struct Registry {
    next: AtomicU64,
    live: Mutex<HashMap<u64, Arc<DistTxn>>>,
}

/// A session's registration; dropping it (the transaction ended) removes it.
pub struct Handle {
    txn: Arc<DistTxn>,
    registry: Arc<Registry>,
}

impl std::ops::Deref for Handle {
    type Target = DistTxn;
    fn deref(&self) -> &DistTxn {
        &self.txn
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.registry.live.lock().remove(&self.txn.id);
    }
}

impl Registry {
    pub fn register(self: &Arc<Self>) -> Handle {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let txn = Arc::new(DistTxn {
            id,
            backends: Mutex::new(Vec::new()),
            victim: Mutex::new(None),
        });
        self.live.lock().insert(id, txn.clone());
        Handle {
            txn,
            registry: self.clone(),
        }
    }

    /// (node, pid) -> transaction id.
    fn owners(&self) -> HashMap<(Option<i32>, i32), u64> {
        let live = self.live.lock();
        let mut out = HashMap::new();
        for t in live.values() {
            for b in t.backends.lock().iter() {
                out.insert(*b, t.id);
            }
        }
        out
    }

    fn get(&self, id: u64) -> Option<Arc<DistTxn>> {
        self.live.lock().get(&id).cloned()
    }
}

/// A vertex of the merged wait-for graph: a transaction of this router, or a backend
/// it does not own (another client's single-node transaction can close a cycle too).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Vertex {
    Txn(u64),
    Backend(Option<i32>, i32),
}

/// One wait: on `node`, `waiter` waits for `holder`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Wait {
    node: Option<i32>,
    waiter: i32,
    holder: i32,
}

/// A deadlock to break: the transaction to cancel, the waits to cancel it on, and the
/// story for its client.
#[derive(Debug, PartialEq, Eq)]
struct Cycle {
    victim: u64,
    members: Vec<u64>,
    nodes: Vec<Option<i32>>,
}

/// Cycles of the merged graph whose waits span at least two nodes and that contain a
/// transaction of this router; one victim each (the youngest: the highest id).
fn find_cycles(waits: &[Wait], owners: &HashMap<(Option<i32>, i32), u64>) -> Vec<Cycle> {
    let vertex = |node: Option<i32>, pid: i32| match owners.get(&(node, pid)) {
        Some(id) => Vertex::Txn(*id),
        None => Vertex::Backend(node, pid),
    };
    let mut edges: Vec<(Vertex, Vertex, Option<i32>)> = waits
        .iter()
        .map(|w| (vertex(w.node, w.waiter), vertex(w.node, w.holder), w.node))
        .filter(|(a, b, _)| a != b)
        .collect();
    edges.sort();
    edges.dedup();
    let mut out = Vec::new();
    let mut removed: HashSet<Vertex> = HashSet::new();
    // Each round cancels one victim per cycle found, then looks again without them.
    loop {
        let live: Vec<&(Vertex, Vertex, Option<i32>)> = edges
            .iter()
            .filter(|(a, b, _)| !removed.contains(a) && !removed.contains(b))
            .collect();
        let mut found = false;
        for scc in strongly_connected(&live) {
            let set: HashSet<Vertex> = scc.iter().copied().collect();
            let mut nodes: Vec<Option<i32>> = live
                .iter()
                .filter(|(a, b, _)| set.contains(a) && set.contains(b))
                .map(|(_, _, n)| *n)
                .collect();
            nodes.sort();
            nodes.dedup();
            if nodes.len() < 2 {
                continue; // one node's own deadlock detector handles it
            }
            let mut members: Vec<u64> = scc
                .iter()
                .filter_map(|v| match v {
                    Vertex::Txn(id) => Some(*id),
                    Vertex::Backend(..) => None,
                })
                .collect();
            members.sort();
            let Some(&victim) = members.last() else {
                continue; // nobody of this router is in it
            };
            removed.insert(Vertex::Txn(victim));
            out.push(Cycle {
                victim,
                members,
                nodes,
            });
            found = true;
        }
        if !found {
            return out;
        }
    }
}

/// Tarjan's algorithm; components of one vertex are left out (no self edges here).
fn strongly_connected(edges: &[&(Vertex, Vertex, Option<i32>)]) -> Vec<Vec<Vertex>> {
    let mut adj: HashMap<Vertex, Vec<Vertex>> = HashMap::new();
    for (a, b, _) in edges {
        adj.entry(*a).or_default().push(*b);
        adj.entry(*b).or_default();
    }
    let mut verts: Vec<Vertex> = adj.keys().copied().collect();
    verts.sort();
    struct St {
        index: HashMap<Vertex, usize>,
        low: HashMap<Vertex, usize>,
        on: HashSet<Vertex>,
        stack: Vec<Vertex>,
        next: usize,
        out: Vec<Vec<Vertex>>,
    }
    let mut st = St {
        index: HashMap::new(),
        low: HashMap::new(),
        on: HashSet::new(),
        stack: Vec::new(),
        next: 0,
        out: Vec::new(),
    };
    // Iterative DFS (a wait graph can be long; no recursion depth to worry about).
    for &root in &verts {
        if st.index.contains_key(&root) {
            continue;
        }
        let mut work: Vec<(Vertex, usize)> = vec![(root, 0)];
        st.index.insert(root, st.next);
        st.low.insert(root, st.next);
        st.next += 1;
        st.stack.push(root);
        st.on.insert(root);
        while let Some(&mut (v, ref mut i)) = work.last_mut() {
            let succ = &adj[&v];
            if *i < succ.len() {
                let w = succ[*i];
                *i += 1;
                if !st.index.contains_key(&w) {
                    st.index.insert(w, st.next);
                    st.low.insert(w, st.next);
                    st.next += 1;
                    st.stack.push(w);
                    st.on.insert(w);
                    work.push((w, 0));
                } else if st.on.contains(&w) {
                    let lw = st.index[&w];
                    let lv = st.low.get_mut(&v).expect("visited");
                    *lv = (*lv).min(lw);
                }
            } else {
                work.pop();
                if let Some(&(parent, _)) = work.last() {
                    let lv = st.low[&v];
                    let lp = st.low.get_mut(&parent).expect("visited");
                    *lp = (*lp).min(lv);
                }
                if st.low[&v] == st.index[&v] {
                    let mut comp = Vec::new();
                    while let Some(w) = st.stack.pop() {
                        st.on.remove(&w);
                        comp.push(w);
                        if w == v {
                            break;
                        }
                    }
                    if comp.len() > 1 {
                        st.out.push(comp);
                    }
                }
            }
        }
    }
    st.out
}

/// The detector's connections, one per node.
struct Collector {
    login: ControlLogin,
    database: String,
    clients: HashMap<Option<i32>, Client>,
}

impl Collector {
    async fn client(&mut self, node: Option<i32>, host: &str, port: u16) -> Option<&Client> {
        if self.clients.get(&node).is_none_or(|c| c.is_closed()) {
            match connect_node(&self.login, host, port, &self.database).await {
                Ok(c) => {
                    self.clients.insert(node, c);
                }
                Err(e) => {
                    tracing::debug!(node = %format!("{host}:{port}"), error = %e, "deadlock detector: node unreachable");
                    self.clients.remove(&node);
                    return None;
                }
            }
        }
        self.clients.get(&node)
    }

    /// Every node's current waits (nodes that do not answer contribute none).
    async fn waits(&mut self, nodes: &[(Option<i32>, String, u16)]) -> Vec<Wait> {
        let mut out = Vec::new();
        for (node, host, port) in nodes {
            let Some(c) = self.client(*node, host, *port).await else {
                continue;
            };
            let rows = c
                .query(
                    "SELECT pid, unnest(pg_blocking_pids(pid)) FROM pg_stat_activity
                     WHERE wait_event_type = 'Lock' AND datname = current_database()",
                    &[],
                )
                .await;
            match rows {
                Ok(rows) => out.extend(rows.iter().map(|r| Wait {
                    node: *node,
                    waiter: r.get(0),
                    holder: r.get(1),
                })),
                Err(e) => {
                    tracing::debug!(error = %e, "deadlock detector: collecting waits failed");
                    self.clients.remove(node);
                }
            }
        }
        out
    }

    /// Cancels a backend if it still waits for a lock; whether it did.
    async fn cancel(
        &mut self,
        nodes: &[(Option<i32>, String, u16)],
        node: Option<i32>,
        pid: i32,
    ) -> bool {
        let Some((_, host, port)) = nodes.iter().find(|n| n.0 == node) else {
            return false;
        };
        let Some(c) = self.client(node, host, *port).await else {
            return false;
        };
        // Only a backend still waiting for a lock: a cancel reaching one that moved on
        // would hit whatever it runs next.
        match c
            .query(
                "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE pid = $1 AND wait_event_type = 'Lock'",
                &[&pid],
            )
            .await
        {
            Ok(rows) => rows.first().is_some_and(|r| r.get::<_, bool>(0)),
            Err(e) => {
                tracing::warn!(error = %e, pid, "deadlock detector: cancelling a backend failed");
                false
            }
        }
    }
}

fn node_name(n: Option<i32>) -> String {
    match n {
        None => "the coordinator".into(),
        Some(g) => format!("group {g}"),
    }
}

/// Runs the detector every `interval` until `stop`.
pub async fn detector_loop(
    registry: Arc<Registry>,
    catalog: Arc<Catalog>,
    txns: Arc<Transactions>,
    interval: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut collector = Collector {
        login: txns.login().clone(),
        database: txns.database().to_owned(),
        clients: HashMap::new(),
    };
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if registry.live.lock().len() < 2 {
            // A cycle this router can see needs two of its transactions: another client's
            // single-node transaction waits and holds on one node only.
            continue;
        }
        let started = Instant::now();
        let snap = catalog.snapshot();
        let login = txns.login();
        let mut nodes: Vec<(Option<i32>, String, u16)> =
            vec![(None, login.host.clone(), login.port)];
        nodes.extend(
            snap.nodes
                .iter()
                .filter(|n| n.is_active)
                .map(|n| (Some(n.group_id), n.name.clone(), n.port as u16)),
        );
        let first = find_cycles(&collector.waits(&nodes).await, &registry.owners());
        if first.is_empty() {
            txns.metrics
                .detector_seconds
                .observe(started.elapsed().as_secs_f64());
            continue;
        }
        // Confirm with a second look: the same victims must still be in a cycle.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let waits = collector.waits(&nodes).await;
        let owners = registry.owners();
        let second = find_cycles(&waits, &owners);
        txns.metrics
            .detector_seconds
            .observe(started.elapsed().as_secs_f64());
        for c in second
            .iter()
            .filter(|c| first.iter().any(|f| f.victim == c.victim))
        {
            let Some(victim) = registry.get(c.victim) else {
                continue;
            };
            txns.metrics.deadlocks_detected.inc();
            let others: Vec<String> = c
                .members
                .iter()
                .filter(|m| **m != c.victim)
                .map(|m| m.to_string())
                .collect();
            let nodes_s: Vec<String> = c.nodes.iter().map(|n| node_name(*n)).collect();
            *victim.victim.lock() = Some(Victim {
                message: "deadlock detected".into(),
                detail: format!(
                    "Distributed deadlock: transaction {} waits for {} in a cycle of waits on {}, which no single node can see; transaction {} (the youngest) was cancelled.",
                    c.victim,
                    if others.is_empty() {
                        "other sessions".to_string()
                    } else {
                        format!("transaction {}", others.join(", "))
                    },
                    nodes_s.join(" and "),
                    c.victim
                ),
            });
            tracing::warn!(victim = c.victim, members = ?c.members, nodes = ?c.nodes, "distributed deadlock: cancelling the youngest transaction");
            // Cancel the victim's waiting backends.
            let mine: Vec<(Option<i32>, i32)> = victim.backends.lock().clone();
            let mut cancelled = false;
            for w in waits.iter().filter(|w| mine.contains(&(w.node, w.waiter))) {
                cancelled |= collector.cancel(&nodes, w.node, w.waiter).await;
            }
            if cancelled {
                txns.metrics.deadlock_cancels.inc();
            } else {
                // It stopped waiting meanwhile: nothing was cancelled, nothing to tell.
                *victim.victim.lock() = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(node: i32, waiter: i32, holder: i32) -> Wait {
        Wait {
            node: Some(node),
            waiter,
            holder,
        }
    }

    /// (node, pid) -> transaction, from (transaction, pid on node 1, pid on node 2).
    fn owners(txns: &[(u64, i32, i32)]) -> HashMap<(Option<i32>, i32), u64> {
        txns.iter()
            .flat_map(|&(t, p1, p2)| [((Some(1), p1), t), ((Some(2), p2), t)])
            .collect()
    }

    #[test]
    fn a_cycle_across_two_nodes_cancels_the_youngest() {
        // txn 1 = pids 10 (node 1), 20 (node 2); txn 2 = pids 11 (node 1), 21 (node 2).
        let owners = owners(&[(1, 10, 20), (2, 11, 21)]);
        let waits = [w(1, 11, 10), w(2, 20, 21)];
        let c = find_cycles(&waits, &owners);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].victim, 2);
        assert_eq!(c[0].members, vec![1, 2]);
        assert_eq!(c[0].nodes, vec![Some(1), Some(2)]);
    }

    #[test]
    fn waits_without_a_cycle_cancel_nothing() {
        let owners: HashMap<_, _> = [((Some(1), 10), 1), ((Some(2), 20), 1), ((Some(1), 11), 2)]
            .into_iter()
            .collect();
        // A chain of waits, however long: 2 -> 1 on node 1, 1 -> a foreign backend on 2.
        let waits = [w(1, 11, 10), w(2, 20, 99), w(2, 98, 99)];
        assert!(find_cycles(&waits, &owners).is_empty());
    }

    #[test]
    fn a_cycle_on_one_node_is_left_to_postgres() {
        let owners: HashMap<_, _> = [((Some(1), 10), 1), ((Some(1), 11), 2)]
            .into_iter()
            .collect();
        assert!(find_cycles(&[w(1, 11, 10), w(1, 10, 11)], &owners).is_empty());
    }

    #[test]
    fn a_foreign_backend_can_close_a_cycle() {
        // txn 1 waits on node 2 for a foreign single-node transaction (pid 50), which
        // waits on node 2 for txn 2, which waits on node 1 for txn 1.
        let owners = owners(&[(1, 10, 20), (2, 11, 21)]);
        let waits = [w(2, 20, 50), w(2, 50, 21), w(1, 11, 10)];
        let c = find_cycles(&waits, &owners);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].victim, 2);
    }

    #[test]
    fn two_separate_cycles_get_one_victim_each() {
        let owners = owners(&[(1, 10, 20), (2, 11, 21), (3, 30, 40), (4, 31, 41)]);
        let waits = [w(1, 11, 10), w(2, 20, 21), w(1, 31, 30), w(2, 40, 41)];
        let mut v: Vec<u64> = find_cycles(&waits, &owners)
            .iter()
            .map(|c| c.victim)
            .collect();
        v.sort();
        assert_eq!(v, vec![2, 4]);
    }
}
