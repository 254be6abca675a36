//! Placement plugins (`shardgate:placement@0.1.0`): where the shards of a new
//! colocation group go, rebalance moves, where an isolated tenant goes. The host
//! validates every answer before anyone acts on it.

use super::instances::{InstancePool, impl_instantiate};
use super::{PluginError, PluginHost};
use std::collections::{HashMap, HashSet};
use wasmtime::component::InstancePre;

mod bindings {
    wasmtime::component::bindgen!({
        world: "placement",
        path: "../wit/placement",
    });
}

use bindings::exports::shardgate::placement::placer;

/// The interface a component of this world exports.
pub(super) const INTERFACE: &str = "shardgate:placement/placer@0.1.0";

/// The world this module loads.
pub const WORLD: &str = "shardgate:placement@0.1.0";

impl_instantiate!(
    bindings::PlacementPre<super::HostState>,
    bindings::Placement
);

/// A worker node, as `pg_dist_node` describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlacementNode {
    pub node_id: i32,
    /// Placements are made on groups.
    pub group_id: i32,
    pub name: String,
    pub port: i32,
    /// An inactive node gets no new placements.
    pub is_active: bool,
    /// False for a node being drained (or for reference tables only).
    pub should_have_shards: bool,
}

impl PlacementNode {
    /// Whether new placements may go here.
    pub fn eligible(&self) -> bool {
        self.is_active && self.should_have_shards
    }
}

/// One existing shard placement (input to a rebalance).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardPlacement {
    pub shard_id: i64,
    /// Index within its colocation group (0-based).
    pub shard_index: u32,
    pub colocation_id: i32,
    /// The group holding this placement.
    pub group_id: i32,
    /// Size on disk, bytes (0 if unknown).
    pub size_bytes: i64,
}

/// Load of one worker group (input to a rebalance or an isolation).
#[derive(Clone, Debug, PartialEq)]
pub struct NodeStats {
    pub group_id: i32,
    pub shard_count: u32,
    pub size_bytes: i64,
    /// Relative capacity (1.0 ordinary); 0 means it must not receive shards.
    pub capacity: f64,
}

/// Move the placement of `shard_id` from one group to another (the caller moves the
/// whole colocated shard-index group along).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardMove {
    pub shard_id: i64,
    pub from_group: i32,
    pub to_group: i32,
}

/// A loaded placement plugin.
pub struct PlacementPlugin {
    content_hash: String,
    pool: InstancePool<bindings::PlacementPre<super::HostState>>,
    plugin_name: String,
}

impl std::fmt::Debug for PlacementPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlacementPlugin")
            .field("name", &self.plugin_name)
            .field("content_hash", &self.content_hash)
            .finish_non_exhaustive()
    }
}

impl PlacementPlugin {
    /// Loads from a pre-instantiated component; refused if it does not export the
    /// placement world's interface.
    pub(super) fn from_pre(
        host: &PluginHost,
        name: &str,
        bytes: &[u8],
        instance_pre: InstancePre<super::HostState>,
    ) -> Result<Self, PluginError> {
        let pre = bindings::PlacementPre::new(instance_pre).map_err(|e| PluginError::Refused {
            name: name.to_owned(),
            reason: format!("not a {WORLD} component: {e:#}"),
        })?;
        let mut plugin = PlacementPlugin {
            content_hash: super::content_hash(bytes),
            pool: InstancePool::new(host, pre),
            plugin_name: String::new(),
        };
        let plugin_name = plugin.pool.call(name, |store, inst| {
            inst.shardgate_placement_placer().call_name(store)
        })?;
        if plugin_name.is_empty() {
            return Err(PluginError::Refused {
                name: name.to_owned(),
                reason: "the plugin names itself \"\"".into(),
            });
        }
        plugin
            .pool
            .set_metrics(host.metrics().map(|m| m.for_plugin(&plugin_name)));
        plugin.plugin_name = plugin_name;
        Ok(plugin)
    }

    /// The name the plugin gives itself (`placement-default`, ...).
    pub fn name(&self) -> &str {
        &self.plugin_name
    }

    /// SHA-256 of the component's bytes.
    pub fn content_hash(&self) -> &str {
        &self.content_hash
    }

    /// For each shard index 0..`shard_count`, the `replication_factor` distinct
    /// groups (among the eligible `nodes`) that get a placement.
    pub fn place_shards(
        &self,
        colocation_id: i32,
        shard_count: u32,
        replication_factor: u32,
        nodes: &[PlacementNode],
    ) -> Result<Vec<Vec<i32>>, PluginError> {
        let group = placer::NewGroup {
            colocation_id,
            shard_count,
            replication_factor,
        };
        let wit_nodes: Vec<placer::Node> = nodes
            .iter()
            .map(|n| placer::Node {
                node_id: n.node_id,
                group_id: n.group_id,
                name: n.name.clone(),
                port: n.port,
                is_active: n.is_active,
                should_have_shards: n.should_have_shards,
            })
            .collect();
        let answer = self.pool.call(&self.plugin_name, |store, inst| {
            inst.shardgate_placement_placer()
                .call_place_shards(store, group, &wit_nodes)
        })?;
        let answer = self.answered(answer)?;
        self.validated(validate_placement(
            &answer,
            shard_count,
            replication_factor,
            nodes,
        ))?;
        Ok(answer)
    }

    /// Moves that even out the cluster.
    pub fn rebalance(
        &self,
        placements: &[ShardPlacement],
        nodes: &[NodeStats],
    ) -> Result<Vec<ShardMove>, PluginError> {
        let wit_placements: Vec<placer::Placement> = placements
            .iter()
            .map(|p| placer::Placement {
                shard_id: p.shard_id,
                shard_index: p.shard_index,
                colocation_id: p.colocation_id,
                group_id: p.group_id,
                size_bytes: p.size_bytes,
            })
            .collect();
        let wit_nodes = wit_stats(nodes);
        let answer = self.pool.call(&self.plugin_name, |store, inst| {
            inst.shardgate_placement_placer()
                .call_rebalance(store, &wit_placements, &wit_nodes)
        })?;
        let moves: Vec<ShardMove> = self
            .answered(answer)?
            .into_iter()
            .map(|m| ShardMove {
                shard_id: m.shard_id,
                from_group: m.from_group,
                to_group: m.to_group,
            })
            .collect();
        self.validated(validate_moves(&moves, placements, nodes))?;
        Ok(moves)
    }

    /// The group that should hold a tenant isolated from colocation group
    /// `colocation_id`, now on `current_group`.
    pub fn isolate_tenant(
        &self,
        colocation_id: i32,
        current_group: i32,
        nodes: &[NodeStats],
    ) -> Result<i32, PluginError> {
        let wit_nodes = wit_stats(nodes);
        let answer = self.pool.call(&self.plugin_name, |store, inst| {
            inst.shardgate_placement_placer().call_isolate_tenant(
                store,
                colocation_id,
                current_group,
                &wit_nodes,
            )
        })?;
        let group = self.answered(answer)?;
        self.validated(validate_isolation(group, current_group, nodes))?;
        Ok(group)
    }

    /// The plugin's own error is `Rejected`.
    fn answered<T>(&self, answer: Result<T, String>) -> Result<T, PluginError> {
        answer.map_err(|message| PluginError::Rejected {
            name: self.plugin_name.clone(),
            message,
        })
    }

    /// A validation failure is `Invalid`, and counted.
    fn validated(&self, check: Result<(), String>) -> Result<(), PluginError> {
        check.map_err(|reason| {
            if let Some(m) = self.pool.metrics() {
                m.invalid_answer();
            }
            PluginError::Invalid {
                name: self.plugin_name.clone(),
                reason,
            }
        })
    }
}

fn wit_stats(nodes: &[NodeStats]) -> Vec<placer::NodeStats> {
    nodes
        .iter()
        .map(|n| placer::NodeStats {
            group_id: n.group_id,
            shard_count: n.shard_count,
            size_bytes: n.size_bytes,
            capacity: n.capacity,
        })
        .collect()
}

/// A placement answer: exactly `shard_count` lists of exactly `replication_factor`
/// distinct groups, each of an eligible node (active, should have shards).
pub fn validate_placement(
    answer: &[Vec<i32>],
    shard_count: u32,
    replication_factor: u32,
    nodes: &[PlacementNode],
) -> Result<(), String> {
    if answer.len() != shard_count as usize {
        return Err(format!(
            "{} shard lists for {shard_count} shards",
            answer.len()
        ));
    }
    let eligible: HashSet<i32> = nodes
        .iter()
        .filter(|n| n.eligible())
        .map(|n| n.group_id)
        .collect();
    for (i, groups) in answer.iter().enumerate() {
        if groups.len() != replication_factor as usize {
            return Err(format!(
                "shard {i} has {} placements, the replication factor is {replication_factor}",
                groups.len()
            ));
        }
        for (k, g) in groups.iter().enumerate() {
            if !eligible.contains(g) {
                return Err(format!(
                    "shard {i} is placed on group {g}, which is not an active node that should have shards"
                ));
            }
            if groups[..k].contains(g) {
                return Err(format!("shard {i} is placed twice on group {g}"));
            }
        }
    }
    Ok(())
}

/// Rebalance moves, applied in order: each names a known shard, moves it from a group
/// that holds it (then) to a different known group with capacity that does not hold it.
pub fn validate_moves(
    moves: &[ShardMove],
    placements: &[ShardPlacement],
    nodes: &[NodeStats],
) -> Result<(), String> {
    let mut holders: HashMap<i64, Vec<i32>> = HashMap::new();
    for p in placements {
        holders.entry(p.shard_id).or_default().push(p.group_id);
    }
    let capacity: HashMap<i32, f64> = nodes.iter().map(|n| (n.group_id, n.capacity)).collect();
    for (i, m) in moves.iter().enumerate() {
        let Some(held) = holders.get_mut(&m.shard_id) else {
            return Err(format!("move {i}: unknown shard {}", m.shard_id));
        };
        if m.from_group == m.to_group {
            return Err(format!(
                "move {i}: shard {} from group {} to itself",
                m.shard_id, m.from_group
            ));
        }
        let Some(pos) = held.iter().position(|g| *g == m.from_group) else {
            return Err(format!(
                "move {i}: group {} does not hold shard {}",
                m.from_group, m.shard_id
            ));
        };
        match capacity.get(&m.to_group) {
            None => return Err(format!("move {i}: unknown group {}", m.to_group)),
            // NaN has no capacity either.
            Some(c) if c.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) => {
                return Err(format!(
                    "move {i}: group {} has no capacity for shards",
                    m.to_group
                ));
            }
            Some(_) => {}
        }
        if held.contains(&m.to_group) {
            return Err(format!(
                "move {i}: group {} already holds shard {}",
                m.to_group, m.shard_id
            ));
        }
        held[pos] = m.to_group;
    }
    Ok(())
}

/// The group for an isolated tenant: a known group (or the current one).
pub fn validate_isolation(
    group: i32,
    current_group: i32,
    nodes: &[NodeStats],
) -> Result<(), String> {
    if group == current_group || nodes.iter().any(|n| n.group_id == group) {
        Ok(())
    } else {
        Err(format!("unknown group {group}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(group_id: i32, active: bool, shards: bool) -> PlacementNode {
        PlacementNode {
            node_id: group_id,
            group_id,
            name: format!("w{group_id}"),
            port: 5432,
            is_active: active,
            should_have_shards: shards,
        }
    }

    fn stats(group_id: i32, capacity: f64) -> NodeStats {
        NodeStats {
            group_id,
            shard_count: 0,
            size_bytes: 0,
            capacity,
        }
    }

    fn placement(shard_id: i64, group_id: i32) -> ShardPlacement {
        ShardPlacement {
            shard_id,
            shard_index: shard_id as u32,
            colocation_id: 1,
            group_id,
            size_bytes: 0,
        }
    }

    fn mv(shard_id: i64, from_group: i32, to_group: i32) -> ShardMove {
        ShardMove {
            shard_id,
            from_group,
            to_group,
        }
    }

    #[test]
    fn placements_are_checked() {
        let nodes = [
            node(1, true, true),
            node(2, true, true),
            node(3, false, true),
            node(4, true, false),
        ];
        assert_eq!(
            validate_placement(&[vec![1, 2], vec![2, 1]], 2, 2, &nodes),
            Ok(())
        );
        let e = validate_placement(&[vec![1, 2]], 2, 2, &nodes).unwrap_err();
        assert!(e.contains("1 shard lists for 2 shards"), "{e}");
        let e = validate_placement(&[vec![1], vec![2]], 2, 2, &nodes).unwrap_err();
        assert!(e.contains("replication factor is 2"), "{e}");
        let e = validate_placement(&[vec![1, 1]], 1, 2, &nodes).unwrap_err();
        assert!(e.contains("twice on group 1"), "{e}");
        for bad in [3, 4, 99] {
            let e = validate_placement(&[vec![bad]], 1, 1, &nodes).unwrap_err();
            assert!(e.contains(&format!("group {bad}")), "{e}");
        }
    }

    #[test]
    fn moves_are_checked_in_order() {
        let placements = [placement(10, 1), placement(11, 1), placement(10, 2)];
        let nodes = [stats(1, 1.0), stats(2, 1.0), stats(3, 1.0), stats(4, 0.0)];
        assert_eq!(validate_moves(&[], &placements, &nodes), Ok(()));
        // Shard 11 from 1 to 3, then on from 3 to 2.
        assert_eq!(
            validate_moves(&[mv(11, 1, 3), mv(11, 3, 2)], &placements, &nodes),
            Ok(())
        );
        let cases = [
            (vec![mv(12, 1, 2)], "unknown shard 12"),
            (vec![mv(11, 2, 3)], "group 2 does not hold shard 11"),
            (vec![mv(11, 1, 1)], "to itself"),
            (vec![mv(11, 1, 9)], "unknown group 9"),
            (vec![mv(11, 1, 4)], "no capacity"),
            (vec![mv(10, 1, 2)], "group 2 already holds shard 10"),
            // The first move took shard 11 away from group 1.
            (
                vec![mv(11, 1, 3), mv(11, 1, 2)],
                "move 1: group 1 does not hold",
            ),
        ];
        for (moves, want) in cases {
            let e = validate_moves(&moves, &placements, &nodes).unwrap_err();
            assert!(e.contains(want), "{moves:?}: {e}");
        }
    }

    #[test]
    fn isolation_goes_to_a_known_group() {
        let nodes = [stats(1, 1.0), stats(2, 1.0)];
        assert_eq!(validate_isolation(2, 1, &nodes), Ok(()));
        assert_eq!(validate_isolation(7, 7, &nodes), Ok(()));
        assert!(validate_isolation(3, 1, &nodes).is_err());
    }
}
