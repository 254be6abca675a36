//! Planning statements on distributed and reference tables: normalise (literals become
//! parameters), look the plan up in the plan cache, on a miss ask the planner tiers
//! (Wasm plugins) in the configured order, validate, and cache; then bind a plan to a
//! statement's values: hash the key with the table's distribution plugin, pick the
//! shard and its node, and write the shard SQL.
//!
//! A plan is keyed by the normalised text, the client's parameter types, the catalog
//! version and the planner set's generation: a catalog change or a planner swap makes
//! every older plan a miss. A statement already bound keeps what it was bound with.

pub mod cache;
pub mod normalize;

use crate::catalog::{Method, Snapshot, TableMeta, value_type_for};
use crate::plugin::{
    Literal, MergeKind, PlanOutcome, PlanTemplate, PlannerTable, PlannerTableKind, ShardKey,
};
use crate::plugin::{PluginError, PluginSet, Value, ValueType};
use cache::PlanCache;
pub use normalize::{Normalized, normalize};
use normalize::{Tok, literal_text, tokens};
use parking_lot::Mutex;
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Why a statement cannot run.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// No tier takes it (0A000).
    #[error("{0}")]
    NotPlannable(String),
    /// A planner or distribution plugin failed.
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// The distribution value does not convert to the column's type (22P02).
    #[error("{0}")]
    InvalidValue(String),
    /// NULL in the distribution column of a write (22004).
    #[error("{0}")]
    NullKey(String),
    /// The catalog has no usable placement (55000).
    #[error("{0}")]
    NoPlacement(String),
    /// Not supported yet (0A000).
    #[error("{0}")]
    NotSupported(String),
}

/// A piece of a compiled shard SQL template.
#[derive(Debug, Clone)]
enum Seg {
    Text(String),
    /// `{tN}`: the shard table of target N.
    Table(usize),
    /// A normalised literal (index into the statement's literals).
    Literal(usize),
}

/// A validated plan, ready to bind.
#[derive(Debug)]
pub struct Planned {
    /// The tier that made it.
    pub tier: String,
    /// The tables, in target order, with their shard choice.
    targets: Vec<(Arc<TableMeta>, ShardKey)>,
    segments: Vec<Seg>,
    /// The statement only reads.
    pub read_only: bool,
    /// `$n` up to this are the client's; above, the normalised literals.
    client_params: u32,
    /// Whether the plan was made from the normalised text (literals as `$k`).
    normalized: bool,
}

/// A plan bound to a statement's values: where to run what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bound {
    /// The node (its group id) the SQL runs on.
    pub group: i32,
    pub sql: String,
    pub read_only: bool,
    /// A write of a reference table: the other placements' groups, which must run the
    /// same SQL in the same (distributed) transaction.
    pub also: Vec<i32>,
}

/// A bound parameter of the extended protocol.
pub enum ParamValue<'a> {
    Null,
    Text(&'a [u8]),
    /// Binary format, with the parameter's type oid (0: unknown).
    Binary(&'a [u8], u32),
}

struct Metrics {
    hits: IntCounter,
    misses: IntCounter,
    plans: IntCounterVec,
    refusals: IntCounter,
}

/// The catalog as planner tiers see it, rebuilt when the catalog version changes.
struct View {
    version: i64,
    tables: Vec<PlannerTable>,
    metas: Vec<Arc<TableMeta>>,
}

/// Plans statements; shared by all sessions.
pub struct Planner {
    tiers: Vec<String>,
    cache: PlanCache<Entry>,
    view: Mutex<Option<Arc<View>>>,
    metrics: Metrics,
    /// Round-robin over reference placements.
    next_reference: AtomicUsize,
}

/// What the cache keeps for a statement.
#[derive(Clone)]
enum Entry {
    Plan(Arc<Planned>),
    /// No tier takes the normalised text: plan the original text.
    Raw,
    /// No tier takes the statement (the message).
    Refused(String),
}

impl Planner {
    pub fn new(
        tiers: Vec<String>,
        capacity: usize,
        registry: &Registry,
    ) -> Result<Planner, prometheus::Error> {
        let hits = IntCounter::new(
            "shardgate_plan_cache_hits_total",
            "Statements whose plan came from the plan cache",
        )?;
        let misses = IntCounter::new(
            "shardgate_plan_cache_misses_total",
            "Statements planned by the planner tiers (plan cache misses)",
        )?;
        let plans = IntCounterVec::new(
            Opts::new(
                "shardgate_plans_total",
                "Plans made, by the tier that made them",
            ),
            &["tier"],
        )?;
        let refusals = IntCounter::new(
            "shardgate_plan_refusals_total",
            "Statements on distributed tables that no planner tier could plan",
        )?;
        registry.register(Box::new(hits.clone()))?;
        registry.register(Box::new(misses.clone()))?;
        registry.register(Box::new(plans.clone()))?;
        registry.register(Box::new(refusals.clone()))?;
        Ok(Planner {
            tiers,
            cache: PlanCache::new(capacity),
            view: Mutex::new(None),
            metrics: Metrics {
                hits,
                misses,
                plans,
                refusals,
            },
            next_reference: AtomicUsize::new(0),
        })
    }

    /// Plans in the cache now.
    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    /// The plan for `sql` (normalised as `norm`), from the cache or the tiers.
    pub fn plan(
        &self,
        sql: &str,
        norm: &Normalized,
        param_types: &[u32],
        snap: &Snapshot,
        plugins: &PluginSet,
    ) -> Result<Arc<Planned>, PlanError> {
        if norm.multi {
            return Err(PlanError::NotSupported(
                "a query string with several statements cannot touch distributed or reference tables; send them one at a time"
                    .into(),
            ));
        }
        let stamp = (snap.version, plugins.generation());
        // `$1` of the normalised text is a literal or the client's own parameter: the
        // count of the client's parameters is part of the key.
        let mut key_types = Vec::with_capacity(param_types.len() + 1);
        key_types.push(norm.client_params);
        key_types.extend_from_slice(param_types);
        match self.lookup(&norm.text, &key_types, stamp, || {
            self.plan_text(&norm.text, norm, true, param_types, snap, plugins)
        })? {
            Entry::Plan(p) => Ok(p),
            Entry::Refused(e) => Err(PlanError::NotPlannable(e)),
            Entry::Raw => match self.lookup(sql, &key_types, stamp, || {
                self.plan_text(sql, norm, false, param_types, snap, plugins)
            })? {
                Entry::Plan(p) => Ok(p),
                Entry::Refused(e) => Err(PlanError::NotPlannable(e)),
                Entry::Raw => Err(PlanError::NotPlannable(
                    "shardgate cannot plan this statement on distributed tables".into(),
                )),
            },
        }
    }

    fn lookup(
        &self,
        text: &str,
        param_types: &[u32],
        stamp: (i64, u64),
        make: impl FnOnce() -> Result<Entry, PlanError>,
    ) -> Result<Entry, PlanError> {
        if let Some(e) = self.cache.get(text, param_types, stamp) {
            self.metrics.hits.inc();
            return Ok(e);
        }
        self.metrics.misses.inc();
        let entry = make()?;
        self.cache.put(text, param_types, stamp, entry.clone());
        Ok(entry)
    }

    fn catalog_view(&self, snap: &Snapshot) -> Arc<View> {
        let mut slot = self.view.lock();
        if let Some(v) = slot.as_ref()
            && v.version == snap.version
        {
            return v.clone();
        }
        let mut metas: Vec<Arc<TableMeta>> = snap.tables.values().cloned().collect();
        metas.sort_by(|a, b| (&a.schema, &a.name).cmp(&(&b.schema, &b.name)));
        let tables = metas
            .iter()
            .map(|t| PlannerTable {
                name: t.name.clone(),
                schema: t.schema.clone(),
                kind: match t.method {
                    Method::Hash => PlannerTableKind::Distributed,
                    Method::Reference => PlannerTableKind::Reference,
                },
                distribution_column: t.column.clone(),
                colocation_id: if t.method == Method::Hash {
                    t.colocation_id
                } else {
                    0
                },
                shard_count: t.shards.len() as u32,
                columns: t.columns.clone(),
            })
            .collect();
        let v = Arc::new(View {
            version: snap.version,
            tables,
            metas,
        });
        *slot = Some(v.clone());
        v
    }

    /// Asks the tiers in order. A tier's own refusal fails the statement; `not-mine`
    /// from every tier: the normalised text falls back to the original text once, the
    /// original text is refused with every tier's reason.
    fn plan_text(
        &self,
        text: &str,
        norm: &Normalized,
        normalized: bool,
        param_types: &[u32],
        snap: &Snapshot,
        plugins: &PluginSet,
    ) -> Result<Entry, PlanError> {
        let view = self.catalog_view(snap);
        let mut types = param_types.to_vec();
        if normalized {
            types.resize(norm.client_params as usize + norm.literals.len(), 0);
        }
        let mut reasons = Vec::new();
        for tier in &self.tiers {
            let Some(planner) = plugins.planner(tier) else {
                continue;
            };
            match planner.plan(text, &types, &view.tables)? {
                PlanOutcome::NotMine(reason) => {
                    tracing::debug!(tier, reason, "not this tier's statement");
                    reasons.push(format!("{tier}: {reason}"));
                }
                PlanOutcome::Plan(t) => {
                    self.metrics.plans.with_label_values(&[tier]).inc();
                    return Ok(Entry::Plan(Arc::new(
                        self.compile(tier, t, &view, norm, normalized)?,
                    )));
                }
            }
        }
        if normalized && !norm.literals.is_empty() {
            return Ok(Entry::Raw);
        }
        self.metrics.refusals.inc();
        if reasons.is_empty() {
            reasons.push(format!(
                "none of the planner tiers {:?} is loaded",
                self.tiers
            ));
        }
        Ok(Entry::Refused(format!(
            "shardgate cannot plan this statement on distributed tables: it is not pinned to one distribution value (multi-shard statements need the pushdown tier, not available yet) [{}]",
            reasons.join("; ")
        )))
    }

    fn compile(
        &self,
        tier: &str,
        t: PlanTemplate,
        view: &View,
        norm: &Normalized,
        normalized: bool,
    ) -> Result<Planned, PlanError> {
        if t.merge != MergeKind::SingleShard {
            return Err(PlanError::NotSupported(format!(
                "{tier} planned a multi-shard statement ({:?}); merging results of several shards is not available yet",
                t.merge
            )));
        }
        let targets = t
            .targets
            .iter()
            .map(|x| (view.metas[x.table as usize].clone(), x.key.clone()))
            .collect::<Vec<_>>();
        let client_params = norm.client_params;
        let sql = &t.sql_template;
        let mut segments = Vec::new();
        let mut text = String::new();
        for (kind, s, e) in tokens(sql) {
            let tok = &sql[s..e];
            match kind {
                Tok::Placeholder => {
                    let n: usize = tok[2..tok.len() - 1].parse().unwrap_or(usize::MAX);
                    segments.push(Seg::Text(std::mem::take(&mut text)));
                    segments.push(Seg::Table(n));
                }
                Tok::Param if normalized => {
                    let n: u32 = tok[1..].parse().unwrap_or(0);
                    if n > client_params {
                        segments.push(Seg::Text(std::mem::take(&mut text)));
                        segments.push(Seg::Literal((n - client_params - 1) as usize));
                    } else {
                        text.push_str(tok);
                    }
                }
                _ => text.push_str(tok),
            }
        }
        segments.push(Seg::Text(text));
        segments.retain(|s| !matches!(s, Seg::Text(t) if t.is_empty()));
        Ok(Planned {
            tier: tier.to_owned(),
            targets,
            segments,
            read_only: norm.read_only,
            client_params,
            normalized,
        })
    }

    /// Binds a plan: the node and the shard SQL. `param(i)` gives the client's bound
    /// parameter `$i+1` (extended protocol); `prefer` is a node the session already
    /// holds (reference reads go there when it has a placement).
    pub fn bind<'a>(
        &self,
        plan: &Planned,
        literals: &[String],
        param: &dyn Fn(usize) -> Option<ParamValue<'a>>,
        snap: &Snapshot,
        plugins: &PluginSet,
        prefer: Option<i32>,
    ) -> Result<Bound, PlanError> {
        // The shard index shared by the distributed targets (colocated: same index).
        let mut index: Option<u32> = None;
        for (table, key) in &plan.targets {
            if table.method != Method::Hash {
                continue;
            }
            let i = self.shard_index(plan, table, key, literals, param, plugins)?;
            match index {
                None => index = Some(i),
                Some(j) if j != i => {
                    return Err(PlanError::NotPlannable(format!(
                        "the statement's tables resolve to different shards ({} and {})",
                        j, i
                    )));
                }
                _ => {}
            }
        }
        // The node: the distributed targets' shard's first placement, or for
        // reference-only plans one of the reference placements.
        let mut also = Vec::new();
        let group = if let Some(i) = index {
            let (table, _) = plan
                .targets
                .iter()
                .find(|(t, _)| t.method == Method::Hash)
                .expect("a distributed target");
            let shard = table.shards.get(i as usize).ok_or_else(|| {
                PlanError::NoPlacement(format!(
                    "table {} has no shard {i} in the catalog",
                    table.name
                ))
            })?;
            *shard.placements.first().ok_or_else(|| {
                PlanError::NoPlacement(format!("shard {} has no placement", shard.id))
            })?
        } else {
            let (table, _) = &plan.targets[0];
            let placements = &table
                .shards
                .first()
                .ok_or_else(|| {
                    PlanError::NoPlacement(format!("table {} has no shard", table.name))
                })?
                .placements;
            let usable = |g: &i32| {
                plan.targets
                    .iter()
                    .all(|(t, _)| t.shards.first().is_some_and(|s| s.placements.contains(g)))
            };
            if !plan.read_only && placements.len() > 1 {
                // A write (or a locking read) reaches every placement.
                if !placements.iter().all(usable) {
                    return Err(PlanError::NotSupported(
                        "a write of reference tables whose placements are on different nodes cannot reach every copy of each table".into(),
                    ));
                }
                for g in placements {
                    if snap.node_by_group(*g).is_none() {
                        return Err(PlanError::NoPlacement(format!(
                            "a write of reference table {} must reach every placement, and the node of group {g} is not active",
                            table.name
                        )));
                    }
                }
                also = placements[1..].to_vec();
                placements[0]
            } else {
                match prefer.filter(|g| placements.contains(g) && usable(g)) {
                    Some(g) => g,
                    None => {
                        let candidates: Vec<i32> =
                            placements.iter().copied().filter(usable).collect();
                        if candidates.is_empty() {
                            return Err(PlanError::NoPlacement(
                            "no node holds a placement of every reference table of the statement"
                                .into(),
                        ));
                        }
                        candidates
                            [self.next_reference.fetch_add(1, Ordering::Relaxed) % candidates.len()]
                    }
                }
            }
        };
        if snap.node_by_group(group).is_none() {
            return Err(PlanError::NoPlacement(format!(
                "no active node for group {group}"
            )));
        }
        let mut sql = String::with_capacity(128);
        for s in &plan.segments {
            match s {
                Seg::Text(t) => sql.push_str(t),
                Seg::Table(n) => {
                    let (table, _) = &plan.targets[*n];
                    let shard = match table.method {
                        Method::Hash => &table.shards[index.unwrap_or(0) as usize],
                        Method::Reference => &table.shards[0],
                    };
                    sql.push_str(&quote_ident(&table.schema));
                    sql.push('.');
                    sql.push_str(&quote_ident(&table.shard_name(shard.id)));
                }
                Seg::Literal(k) => match literals.get(*k) {
                    Some(l) => sql.push_str(l),
                    None => {
                        return Err(PlanError::NotSupported(
                            "the plan names a literal the statement does not have".into(),
                        ));
                    }
                },
            }
        }
        Ok(Bound {
            group,
            sql,
            read_only: plan.read_only,
            also,
        })
    }

    fn shard_index<'a>(
        &self,
        plan: &Planned,
        table: &TableMeta,
        key: &ShardKey,
        literals: &[String],
        param: &dyn Fn(usize) -> Option<ParamValue<'a>>,
        plugins: &PluginSet,
    ) -> Result<u32, PlanError> {
        let column = table.column.as_deref().unwrap_or("?");
        let vt = value_type_for(table.column_type).ok_or_else(|| {
            PlanError::NotSupported(format!(
                "the distribution column of {} has a type the router cannot hash",
                table.name
            ))
        })?;
        let value = match key {
            ShardKey::AllShards => {
                return Err(PlanError::NotPlannable(format!(
                    "the plan runs on every shard of {}; merging results of several shards is not available yet",
                    table.name
                )));
            }
            ShardKey::Value(l) => Some(literal_value(l, vt)?),
            ShardKey::Param(i) => {
                let i = *i as usize;
                if plan.normalized && i >= plan.client_params as usize {
                    let tok = literals
                        .get(i - plan.client_params as usize)
                        .ok_or_else(|| {
                            PlanError::NotSupported(
                                "the plan names a literal the statement does not have".into(),
                            )
                        })?;
                    Some(parse(&literal_text(tok), vt)?)
                } else {
                    match param(i) {
                        None => {
                            return Err(PlanError::NotSupported(format!(
                                "the plan is keyed on ${}, which the statement does not bind",
                                i + 1
                            )));
                        }
                        Some(ParamValue::Null) => None,
                        Some(ParamValue::Text(b)) => Some(parse(
                            std::str::from_utf8(b).map_err(|_| {
                                PlanError::InvalidValue("parameter is not valid UTF-8".into())
                            })?,
                            vt,
                        )?),
                        Some(ParamValue::Binary(b, oid)) => Some(binary_value(b, oid, vt)?),
                    }
                }
            }
        };
        let Some(value) = value else {
            if plan.read_only {
                // `dist = NULL` matches no row on any shard: any shard answers right.
                return Ok(0);
            }
            return Err(PlanError::NullKey(format!(
                "cannot write a row with NULL in the distribution column \"{column}\" of {}",
                table.name
            )));
        };
        let name = table.plugin.as_deref().unwrap_or("hash-citus");
        let plugin = plugins.distribution(name).ok_or_else(|| {
            PlanError::Plugin(PluginError::Refused {
                name: name.to_owned(),
                reason: "the distribution plugin of this table is not loaded".into(),
            })
        })?;
        Ok(plugin.shard_index(&value, table.shards.len() as u32)?)
    }
}

fn parse(text: &str, t: ValueType) -> Result<Value, PlanError> {
    crate::admin::data::parse_value(text, t).map_err(|e| PlanError::InvalidValue(e.to_string()))
}

fn literal_value(l: &Literal, t: ValueType) -> Result<Value, PlanError> {
    match l {
        Literal::Int8(v) => parse(&v.to_string(), t),
        Literal::Text(s) => parse(s, t),
        Literal::Boolean(b) => parse(if *b { "true" } else { "false" }, t),
    }
}

/// A parameter in binary format of type `oid` -> the plugin's value for a column of
/// type `t` (as Postgres would convert it for `column = $n`). A binary value of
/// unknown type is refused: guessing its type could route to the wrong shard.
fn binary_value(b: &[u8], oid: u32, t: ValueType) -> Result<Value, PlanError> {
    let bad = || {
        PlanError::InvalidValue(format!(
            "invalid binary value for a parameter of type oid {oid}"
        ))
    };
    let text = match oid {
        20 | 21 | 23 => {
            let v: i64 = match (oid, b.len()) {
                (20, 8) => i64::from_be_bytes(b.try_into().map_err(|_| bad())?),
                (23, 4) => i32::from_be_bytes(b.try_into().map_err(|_| bad())?) as i64,
                (21, 2) => i16::from_be_bytes([b[0], b[1]]) as i64,
                _ => return Err(bad()),
            };
            let range = || {
                PlanError::InvalidValue(format!(
                    "value {v} out of range for the distribution column"
                ))
            };
            return Ok(match t {
                ValueType::Int2 => Value::Int2(i16::try_from(v).map_err(|_| range())?),
                ValueType::Int4 => Value::Int4(i32::try_from(v).map_err(|_| range())?),
                ValueType::Int8 => Value::Int8(v),
                _ => parse(&v.to_string(), t)?,
            });
        }
        // text, varchar, bpchar, name, unknown-as-text
        25 | 1043 | 1042 | 19 | 705 => String::from_utf8(b.to_vec()).map_err(|_| bad())?,
        2950 if b.len() == 16 => {
            return match t {
                ValueType::Uuid => Ok(Value::Uuid(b.to_vec())),
                _ => Err(PlanError::InvalidValue(
                    "a uuid parameter for a distribution column of another type".into(),
                )),
            };
        }
        16 => match b {
            [0] => "false".into(),
            [1] => "true".into(),
            _ => return Err(bad()),
        },
        _ => {
            return Err(PlanError::NotSupported(format!(
                "a distribution value bound in binary format with {} type cannot be routed; let the driver describe the statement, or send the parameter as text",
                if oid == 0 {
                    "an unspecified".to_owned()
                } else {
                    format!("type oid {oid}, a")
                }
            )));
        }
    };
    parse(&text, t)
}

/// `"ident"`, quotes doubled.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}
