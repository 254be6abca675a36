//! `placement-default`: round-robin placement over the eligible nodes, rebalance by
//! shard count, isolated tenants on the least loaded node. Deterministic: the same
//! input gives the same answer.

wit_bindgen::generate!({ world: "placement", path: "../../wit/placement" });

use exports::shardgate::placement::placer::{
    Guest, NewGroup, Node, NodeStats, Placement, ShardMove,
};
use std::collections::BTreeMap;

struct PlacementDefault;

impl Guest for PlacementDefault {
    fn name() -> String {
        "placement-default".into()
    }

    /// Shard i goes to the eligible groups (sorted by group id) at positions
    /// `colocation-id + i`, `+ 1`, ... `+ r - 1` (mod n): consecutive, distinct, and
    /// starting elsewhere for each colocation group so groups spread.
    fn place_shards(group: NewGroup, nodes: Vec<Node>) -> Result<Vec<Vec<i32>>, String> {
        let mut eligible: Vec<i32> = nodes
            .iter()
            .filter(|n| n.is_active && n.should_have_shards)
            .map(|n| n.group_id)
            .collect();
        eligible.sort_unstable();
        eligible.dedup();
        let r = group.replication_factor as usize;
        if eligible.is_empty() {
            return Err("no active node that should have shards".into());
        }
        if r == 0 {
            return Err("replication factor 0".into());
        }
        if eligible.len() < r {
            return Err(format!(
                "replication factor {r} needs {r} active nodes that should have shards, there are {}",
                eligible.len()
            ));
        }
        let n = eligible.len();
        let start = group.colocation_id.rem_euclid(n as i32) as usize;
        Ok((0..group.shard_count as usize)
            .map(|i| (0..r).map(|k| eligible[(start + i + k) % n]).collect())
            .collect())
    }

    /// Moves one shard at a time from the group with the most placements to the group
    /// with the fewest (among groups with capacity > 0) until they differ by at most 1.
    /// Ties: the lowest group id. The moved shard is the one with the highest id on the
    /// source whose shard index the target does not already hold (a target never gets
    /// two placements of one colocated shard).
    fn rebalance(
        placements: Vec<Placement>,
        nodes: Vec<NodeStats>,
    ) -> Result<Vec<ShardMove>, String> {
        // group -> shard ids it holds (from the placements: they are the truth).
        let mut held: BTreeMap<i32, Vec<&Placement>> = BTreeMap::new();
        for n in &nodes {
            held.entry(n.group_id).or_default();
        }
        for p in &placements {
            held.entry(p.group_id).or_default().push(p);
        }
        let receivers: Vec<i32> = {
            let mut v: Vec<i32> = nodes
                .iter()
                .filter(|n| n.capacity > 0.0)
                .map(|n| n.group_id)
                .collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        if receivers.is_empty() {
            return Ok(Vec::new());
        }
        let mut moves = Vec::new();
        // Each move lowers the sum of squared differences; bounded anyway.
        for _ in 0..2 * placements.len() + 1 {
            // The source: most placements among all groups (a group without capacity
            // is drained first: it counts as fuller than any receiver).
            let Some((&from, _)) =
                held.iter()
                    .filter(|(_, v)| !v.is_empty())
                    .max_by(|(ga, a), (gb, b)| {
                        let fa = !receivers.contains(ga);
                        let fb = !receivers.contains(gb);
                        (fa, a.len()).cmp(&(fb, b.len())).then(gb.cmp(ga))
                    })
            else {
                break;
            };
            let Some(&to) = receivers
                .iter()
                .min_by(|a, b| held[a].len().cmp(&held[b].len()).then(a.cmp(b)))
            else {
                break;
            };
            let drain = !receivers.contains(&from);
            if from == to || (!drain && held[&from].len() <= held[&to].len() + 1) {
                break;
            }
            let target: Vec<(i32, u32)> = held[&to]
                .iter()
                .map(|p| (p.colocation_id, p.shard_index))
                .collect();
            let candidate = held[&from]
                .iter()
                .enumerate()
                .filter(|(_, p)| !target.contains(&(p.colocation_id, p.shard_index)))
                .max_by_key(|(_, p)| p.shard_id)
                .map(|(i, _)| i);
            let Some(i) = candidate else { break };
            let p = held.get_mut(&from).expect("source").remove(i);
            moves.push(ShardMove {
                shard_id: p.shard_id,
                from_group: from,
                to_group: to,
            });
            held.get_mut(&to).expect("target").push(p);
        }
        Ok(moves)
    }

    /// The group with the fewest shards (ties: the lowest group id); only groups with
    /// capacity > 0, plus the current group.
    fn isolate_tenant(
        _colocation_id: i32,
        current_group: i32,
        nodes: Vec<NodeStats>,
    ) -> Result<i32, String> {
        nodes
            .iter()
            .filter(|n| n.capacity > 0.0 || n.group_id == current_group)
            .min_by(|a, b| {
                a.shard_count
                    .cmp(&b.shard_count)
                    .then(a.group_id.cmp(&b.group_id))
            })
            .map(|n| n.group_id)
            .ok_or_else(|| "no node to hold the tenant".into())
    }
}

export!(PlacementDefault);
