//! Planner tier plugins (`shardgate:planner@0.1.0`, world `planner-tier`): a pure
//! function from (statement, catalog view) to a plan template. The host validates every
//! plan before anyone runs it ([`validate_plan`]); a plugin's own `err(...)` is
//! [`PluginError::Rejected`], a plan the host does not accept [`PluginError::Invalid`].
//!
//! Not asked by sessions yet: this is the loading, calling and validating side.

use super::instances::{InstancePool, impl_instantiate};
use super::{PluginError, PluginHost};
use wasmtime::component::InstancePre;

mod bindings {
    wasmtime::component::bindgen!({
        world: "planner-tier",
        path: "../wit/planner",
    });
}

use bindings::exports::shardgate::planner::planner as wit;

/// The interface a component of this world exports.
pub(super) const INTERFACE: &str = "shardgate:planner/planner@0.1.0";

/// The world this module loads.
pub const WORLD: &str = "shardgate:planner@0.1.0";

impl_instantiate!(
    bindings::PlannerTierPre<super::HostState>,
    bindings::PlannerTier
);

/// How a table is laid out (WIT `table-kind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlannerTableKind {
    /// Hash-distributed over shards.
    Distributed,
    /// One copy on every worker.
    Reference,
    /// Only on the coordinator.
    Local,
}

/// One table of the catalog view a planner sees (WIT `table`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannerTable {
    /// Unquoted, as stored.
    pub name: String,
    /// Unquoted, as stored.
    pub schema: String,
    pub kind: PlannerTableKind,
    /// Distributed tables only.
    pub distribution_column: Option<String>,
    /// Distributed tables only (0 otherwise).
    pub colocation_id: i32,
    /// 1 for reference and local tables.
    pub shard_count: u32,
    /// Column names in table order.
    pub columns: Vec<String>,
}

/// A literal distribution value written in the SQL, by its syntax: the router converts
/// it to the distribution column's type (a uuid arrives as text).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Literal {
    Int8(i64),
    Text(String),
    Boolean(bool),
}

/// How the shard(s) of a target are chosen.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ShardKey {
    /// The bound value of parameter `$n+1` (0-based).
    Param(u32),
    /// This literal.
    Value(Literal),
    /// Every shard (a fan-out).
    AllShards,
}

/// A table a plan touches (an index into the catalog view), and its shard choice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanTarget {
    pub table: u32,
    pub key: ShardKey,
}

/// One sort column of a merge: 0-based output column, descending or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SortKey {
    pub column: u32,
    pub descending: bool,
}

/// How one output column of an aggregate is combined across shards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Combiner {
    Key,
    Sum,
    Count,
    Min,
    Max,
    /// This sum column and the next one (a count) become their quotient.
    AvgSumCount,
}

/// Concat (or sort-merge on `order`) and stop after `count` rows past `offset`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitMerge {
    pub count: u64,
    pub offset: u64,
    pub order: Vec<SortKey>,
}

/// How the rows of the shards become one result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MergeKind {
    /// Exactly one shard: rows pass through untouched.
    SingleShard,
    Concat,
    SortMerge(Vec<SortKey>),
    AggregateCombine(Vec<Combiner>),
    Limit(LimitMerge),
}

/// What runs on the shards: `sql_template` with `{t0}`, `{t1}`, ... standing for the
/// shard table names of `targets[0]`, `targets[1]`, ...
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanTemplate {
    pub targets: Vec<PlanTarget>,
    pub sql_template: String,
    pub merge: MergeKind,
}

/// A tier's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlanOutcome {
    /// Not this tier's statement (the reason is for the debug log).
    NotMine(String),
    /// A validated plan.
    Plan(PlanTemplate),
}

/// A loaded planner tier plugin.
pub struct PlannerPlugin {
    content_hash: String,
    pool: InstancePool<bindings::PlannerTierPre<super::HostState>>,
    plugin_name: String,
}

impl std::fmt::Debug for PlannerPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlannerPlugin")
            .field("name", &self.plugin_name)
            .field("content_hash", &self.content_hash)
            .finish_non_exhaustive()
    }
}

impl PlannerPlugin {
    /// Loads from a pre-instantiated component; refused if it does not export the
    /// planner world's interface.
    pub(super) fn from_pre(
        host: &PluginHost,
        name: &str,
        bytes: &[u8],
        instance_pre: InstancePre<super::HostState>,
    ) -> Result<Self, PluginError> {
        let pre =
            bindings::PlannerTierPre::new(instance_pre).map_err(|e| PluginError::Refused {
                name: name.to_owned(),
                reason: format!("not a {WORLD} component: {e:#}"),
            })?;
        let mut plugin = PlannerPlugin {
            content_hash: super::content_hash(bytes),
            pool: InstancePool::new(host, pre),
            plugin_name: String::new(),
        };
        let plugin_name = plugin.pool.call(name, |store, inst| {
            inst.shardgate_planner_planner().call_name(store)
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

    /// The name the plugin gives itself (`planner-fastpath`, ...).
    pub fn name(&self) -> &str {
        &self.plugin_name
    }

    /// SHA-256 of the component's bytes.
    pub fn content_hash(&self) -> &str {
        &self.content_hash
    }

    /// Plans one statement (`sql` with `$n` parameters of types `param_types`, oids,
    /// 0 unspecified) against the catalog view `tables`. A plan is returned only if
    /// [`validate_plan`] accepts it.
    pub fn plan(
        &self,
        sql: &str,
        param_types: &[u32],
        tables: &[PlannerTable],
    ) -> Result<PlanOutcome, PluginError> {
        let stmt = wit::Statement {
            sql: sql.to_owned(),
            param_types: param_types.to_vec(),
        };
        let catalog = wit::CatalogView {
            tables: tables.iter().map(to_wit_table).collect(),
        };
        let answer = self.pool.call(&self.plugin_name, |store, inst| {
            inst.shardgate_planner_planner()
                .call_plan(store, &stmt, &catalog)
        })?;
        match self.answered(answer)? {
            wit::PlanResult::NotMine(reason) => Ok(PlanOutcome::NotMine(reason)),
            wit::PlanResult::Plan(t) => {
                let plan = from_wit_template(t);
                self.validated(validate_plan(&plan, tables))?;
                Ok(PlanOutcome::Plan(plan))
            }
        }
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

fn to_wit_table(t: &PlannerTable) -> wit::Table {
    wit::Table {
        name: t.name.clone(),
        schema: t.schema.clone(),
        kind: match t.kind {
            PlannerTableKind::Distributed => wit::TableKind::Distributed,
            PlannerTableKind::Reference => wit::TableKind::Reference,
            PlannerTableKind::Local => wit::TableKind::Local,
        },
        distribution_column: t.distribution_column.clone(),
        colocation_id: t.colocation_id,
        shard_count: t.shard_count,
        columns: t.columns.clone(),
    }
}

fn from_wit_template(t: wit::PlanTemplate) -> PlanTemplate {
    let sort = |v: Vec<(u32, bool)>| {
        v.into_iter()
            .map(|(column, descending)| SortKey { column, descending })
            .collect::<Vec<_>>()
    };
    PlanTemplate {
        targets: t
            .targets
            .into_iter()
            .map(|x| PlanTarget {
                table: x.table,
                key: match x.key {
                    wit::ShardKey::Param(i) => ShardKey::Param(i),
                    wit::ShardKey::Value(l) => ShardKey::Value(match l {
                        wit::Literal::Int8(v) => Literal::Int8(v),
                        wit::Literal::Text(v) => Literal::Text(v),
                        wit::Literal::Boolean(v) => Literal::Boolean(v),
                    }),
                    wit::ShardKey::AllShards => ShardKey::AllShards,
                },
            })
            .collect(),
        sql_template: t.sql_template,
        merge: match t.merge {
            wit::MergeKind::SingleShard => MergeKind::SingleShard,
            wit::MergeKind::Concat => MergeKind::Concat,
            wit::MergeKind::SortMerge(o) => MergeKind::SortMerge(sort(o)),
            wit::MergeKind::AggregateCombine(c) => MergeKind::AggregateCombine(
                c.into_iter()
                    .map(|c| match c {
                        wit::Combiner::Key => Combiner::Key,
                        wit::Combiner::Sum => Combiner::Sum,
                        wit::Combiner::Count => Combiner::Count,
                        wit::Combiner::Min => Combiner::Min,
                        wit::Combiner::Max => Combiner::Max,
                        wit::Combiner::AvgSumCount => Combiner::AvgSumCount,
                    })
                    .collect(),
            ),
            wit::MergeKind::Limit(l) => MergeKind::Limit(LimitMerge {
                count: l.count,
                offset: l.offset,
                order: sort(l.order),
            }),
        },
    }
}

/// Checks a plan against the catalog view it was made from:
/// - the template is not empty, and there is at least one target;
/// - every target's table index is in range;
/// - every `{tN}` of the template names a target, and every target appears, or
///   repeats the table of one that does (an extra key of that table: see below);
/// - a `Param(i)` key names a parameter the template uses (`$n` outside quotes and
///   comments, i < the highest n);
/// - `SingleShard`: the distributed targets of one colocation group are keyed, not
///   `AllShards` unless the group's tables have one shard; targets of one group with
///   different keys (`a.tenant = $1 AND e.tenant = $2`) must choose the same shard
///   index when bound, or the router refuses the statement then; targets of different
///   groups may choose differently (the router runs the plan on a node holding every
///   chosen shard, or refuses it when there is none); targets of reference tables (one
///   shard, a placement on every worker) are keyed `AllShards` and go with whichever
///   node the distributed targets choose; a plan of reference targets only is valid
///   too;
/// - `AggregateCombine`: an `AvgSumCount` is followed by its count column.
pub fn validate_plan(plan: &PlanTemplate, tables: &[PlannerTable]) -> Result<(), String> {
    if plan.sql_template.trim().is_empty() {
        return Err("the SQL template is empty".into());
    }
    if plan.targets.is_empty() {
        return Err("the plan has no targets".into());
    }
    for (i, t) in plan.targets.iter().enumerate() {
        if t.table as usize >= tables.len() {
            return Err(format!(
                "target {i} names table {} of a catalog view of {}",
                t.table,
                tables.len()
            ));
        }
    }
    let used = table_placeholders(&plan.sql_template);
    if let Some(n) = used.iter().find(|n| **n >= plan.targets.len()) {
        return Err(format!(
            "the template uses {{t{n}}}, there are {} targets",
            plan.targets.len()
        ));
    }
    let appears = |i: usize| {
        used.contains(&i)
            || (0..plan.targets.len())
                .any(|j| used.contains(&j) && plan.targets[j].table == plan.targets[i].table)
    };
    if let Some(i) = (0..plan.targets.len()).find(|i| !appears(*i)) {
        return Err(format!(
            "target {i} does not appear in the template ({{t{i}}}) and repeats no table that does"
        ));
    }
    let params = highest_param(&plan.sql_template);
    for (i, t) in plan.targets.iter().enumerate() {
        if let ShardKey::Param(p) = t.key
            && p >= params
        {
            return Err(format!(
                "target {i} is keyed on ${}, the template uses {params} parameters",
                p as u64 + 1
            ));
        }
    }
    match &plan.merge {
        MergeKind::SingleShard => {
            let table = |t: &PlanTarget| &tables[t.table as usize];
            let is_reference = |t: &PlanTarget| {
                table(t).kind == PlannerTableKind::Reference && table(t).shard_count == 1
            };
            if let Some((i, t)) = plan
                .targets
                .iter()
                .enumerate()
                .find(|(_, t)| is_reference(t) && t.key != ShardKey::AllShards)
            {
                return Err(format!(
                    "target {i}: the reference table {} must be keyed all-shards",
                    table(t).name
                ));
            }
            // All-shards only on one-shard tables. Different keys in one colocation
            // group are checked when bound (the router refuses the statement if they
            // choose different shards); groups may differ: the router then runs the
            // plan on a node that holds every chosen shard, or refuses it.
            for t in plan.targets.iter().filter(|t| !is_reference(t)) {
                if t.key == ShardKey::AllShards && table(t).shard_count != 1 {
                    return Err(format!(
                        "a single-shard plan on all shards of {} ({} shards)",
                        table(t).name,
                        table(t).shard_count
                    ));
                }
            }
        }
        MergeKind::AggregateCombine(c) => {
            if c.is_empty() {
                return Err("an aggregate merge without columns".into());
            }
            if c.last() == Some(&Combiner::AvgSumCount) {
                return Err("avg-sum-count on the last column (no count column follows)".into());
            }
        }
        MergeKind::Concat | MergeKind::SortMerge(_) | MergeKind::Limit(_) => {}
    }
    Ok(())
}

/// The `N` of every `{tN}` in a template (as the router substitutes them: textually).
fn table_placeholders(template: &str) -> Vec<usize> {
    let mut out = Vec::new();
    let mut rest = template;
    while let Some(at) = rest.find("{t") {
        rest = &rest[at + 2..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits > 0
            && rest.as_bytes().get(digits) == Some(&b'}')
            && let Ok(n) = rest[..digits].parse::<usize>()
        {
            out.push(n);
        }
    }
    out
}

/// The highest `$n` of SQL text, outside string literals, quoted identifiers,
/// dollar-quoted strings and comments (0: none).
fn highest_param(sql: &str) -> u32 {
    let b = sql.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80;
    let mut highest = 0u32;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\'' => {
                // E'...' strings escape with a backslash; all strings double quotes.
                let escapes =
                    i > 0 && (b[i - 1] == b'e' || b[i - 1] == b'E') && (i < 2 || !ident(b[i - 2]));
                i += 1;
                while i < b.len() {
                    if escapes && b[i] == b'\\' {
                        i += 2;
                        continue;
                    }
                    if b[i] == b'\'' {
                        if b.get(i + 1) == Some(&b'\'') {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
                i += 1;
            }
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += 1;
                }
                i += 1;
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let mut depth = 0;
                while i < b.len() {
                    if b[i..].starts_with(b"/*") {
                        depth += 1;
                        i += 2;
                    } else if b[i..].starts_with(b"*/") {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            b'$' if i > 0 && ident(b[i - 1]) => i += 1,
            b'$' => {
                let digits = b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
                if digits > 0 {
                    if let Ok(n) = sql[i + 1..i + 1 + digits].parse::<u32>() {
                        highest = highest.max(n);
                    }
                    i += 1 + digits;
                    continue;
                }
                // $tag$ ... $tag$ (the tag may be empty).
                let tag_len = b[i + 1..].iter().take_while(|c| ident(**c)).count();
                if b.get(i + 1 + tag_len) == Some(&b'$') {
                    let tag = &sql[i..i + 2 + tag_len];
                    match sql[i + tag.len()..].find(tag) {
                        Some(end) => i += tag.len() + end + tag.len(),
                        None => i = b.len(),
                    }
                } else {
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    highest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_counted_outside_quotes_and_comments() {
        assert_eq!(highest_param("SELECT 1"), 0);
        assert_eq!(highest_param("SELECT * FROM t WHERE a = $1 AND b = $3"), 3);
        assert_eq!(highest_param("SELECT '$9', \"$8\", $2 -- $7\n"), 2);
        assert_eq!(highest_param("SELECT /* $5 /* $6 */ */ $1"), 1);
        assert_eq!(highest_param("SELECT $$ $4 $$, $a$ $5 $a$, $2"), 2);
        assert_eq!(highest_param("SELECT E'\\' $4', $1"), 1);
        assert_eq!(highest_param("SELECT a$1 FROM t"), 0);
    }

    fn table(
        name: &str,
        kind: PlannerTableKind,
        colocation_id: i32,
        shard_count: u32,
    ) -> PlannerTable {
        PlannerTable {
            name: name.into(),
            schema: "public".into(),
            kind,
            distribution_column: (kind == PlannerTableKind::Distributed).then(|| "id".into()),
            colocation_id,
            shard_count,
            columns: Vec::new(),
        }
    }

    #[test]
    fn single_shard_plans_key_distributed_targets_and_reference_targets_all_shards() {
        use PlannerTableKind::*;
        let tables = [
            table("a", Distributed, 1, 4),
            table("b", Distributed, 1, 4),
            table("r", Reference, 0, 1),
            table("c", Distributed, 2, 4),
            table("one", Distributed, 3, 1),
        ];
        let plan = |targets: &[(u32, ShardKey)], sql: &str| PlanTemplate {
            targets: targets
                .iter()
                .map(|(table, key)| PlanTarget {
                    table: *table,
                    key: key.clone(),
                })
                .collect(),
            sql_template: sql.into(),
            merge: MergeKind::SingleShard,
        };
        let p1 = ShardKey::Param(0);
        let all = ShardKey::AllShards;
        let one = ShardKey::Value(Literal::Int8(1));
        let good = [
            plan(
                &[(0, p1.clone()), (1, p1.clone())],
                "SELECT FROM {t0}, {t1} WHERE $1",
            ),
            plan(
                &[(0, p1.clone()), (2, all.clone()), (1, p1.clone())],
                "SELECT FROM {t0}, {t1}, {t2} WHERE $1",
            ),
            plan(&[(2, all.clone())], "SELECT FROM {t0}"),
            plan(
                &[(4, all.clone()), (2, all.clone())],
                "SELECT FROM {t0}, {t1}",
            ),
            // Other colocation groups choose their own shard; a one-shard table needs
            // no key.
            plan(
                &[(0, one.clone()), (2, all.clone()), (3, p1.clone())],
                "SELECT FROM {t0}, {t1}, {t2} WHERE $1",
            ),
            plan(
                &[(0, one.clone()), (4, all.clone())],
                "SELECT FROM {t0}, {t1}",
            ),
            // Different keys in one group: checked when bound.
            plan(
                &[(0, p1.clone()), (1, one.clone())],
                "SELECT FROM {t0}, {t1} WHERE $1",
            ),
            // An extra key of a table that appears.
            plan(
                &[(0, p1.clone()), (1, p1.clone()), (0, one.clone())],
                "SELECT FROM {t0}, {t1} WHERE $1",
            ),
        ];
        for p in good {
            assert_eq!(validate_plan(&p, &tables), Ok(()), "{p:?}");
        }
        let bad = [
            (
                plan(
                    &[(0, p1.clone()), (3, one.clone())],
                    "SELECT FROM {t0} WHERE $1",
                ),
                "target 1 does not appear in the template ({t1}) and repeats no table that does",
            ),
            (
                plan(
                    &[(0, p1.clone()), (2, p1.clone())],
                    "SELECT FROM {t0}, {t1} WHERE $1",
                ),
                "reference table r must be keyed all-shards",
            ),
            (
                plan(
                    &[(0, all.clone()), (2, all.clone())],
                    "SELECT FROM {t0}, {t1}",
                ),
                "single-shard plan on all shards of a (4 shards)",
            ),
        ];
        for (p, want) in bad {
            let e = validate_plan(&p, &tables).expect_err(want);
            assert!(e.contains(want), "{p:?}: {e:?} lacks {want:?}");
        }
    }

    #[test]
    fn table_placeholders_are_found_textually() {
        assert_eq!(
            table_placeholders("SELECT * FROM {t0} JOIN {t12} ON {tx}"),
            [0, 12]
        );
        assert!(table_placeholders("SELECT '{t' || 'y}'").is_empty());
    }
}
