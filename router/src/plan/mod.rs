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
    /// The distribution value is a number outside the column's integer type (22003).
    #[error("{0}")]
    OutOfRange(String),
    /// NULL in the distribution column of a write (22004).
    #[error("{0}")]
    NullKey(String),
    /// The catalog has no usable placement (55000).
    #[error("{0}")]
    NoPlacement(String),
    /// Not supported yet (0A000).
    #[error("{0}")]
    NotSupported(String),
    /// A statement would affect one row twice (21000), as Postgres says of an
    /// `INSERT ... ON CONFLICT DO UPDATE` with duplicate keys.
    #[error("{0}")]
    Cardinality(String),
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
    /// A read whose shards may be copied to the node that runs it (a query with no
    /// lock: see [`Bound::pulls`]).
    pullable: bool,
    /// `$n` up to this are the client's; above, the normalised literals.
    client_params: u32,
    /// Whether the plan was made from the normalised text (literals as `$k`).
    normalized: bool,
    /// Every literal of the template stands where a typed parameter means exactly
    /// what the literal does (see [`promotable_after`]), and the statement has no
    /// parameters of the client's: a simple query of this plan with numeric literals
    /// can run as a statement prepared on the node ([`Bound::promoted`]).
    promote: bool,
    /// A `concat` plan: a read of every shard of its one table ([`Bound::fanout`]).
    fanout: bool,
}

impl Planned {
    /// Whether it was planned from the normalised text with literals in it (made
    /// parameters): the same statement may plan differently as written.
    pub fn from_literals(&self) -> bool {
        self.normalized && self.segments.iter().any(|s| matches!(s, Seg::Literal(_)))
    }

    /// Whether normalised literal `k` is cast where the template uses it (`$k::int`,
    /// `CAST($k AS int)`): its value is then not its text.
    fn cast_follows(&self, k: usize) -> bool {
        self.segments.windows(2).any(|w| match w {
            [Seg::Literal(x), Seg::Text(t)] if *x == k => t.trim_start().starts_with("::"),
            [Seg::Text(t), Seg::Literal(x)] if *x == k => {
                t.trim_end().to_ascii_lowercase().ends_with("cast(")
            }
            _ => false,
        })
    }

    /// Whether the template is an UPDATE (its first word).
    fn is_update(&self) -> bool {
        matches!(self.segments.first(), Some(Seg::Text(t))
            if t.trim_start().get(..6).is_some_and(|w| w.eq_ignore_ascii_case("update")))
    }

    /// A name prefix for copies of shards that no identifier of the statement starts
    /// with (`sg_pull_`, else `sg_pull1_`, ...).
    fn copy_prefix(&self) -> String {
        let text: String = self
            .segments
            .iter()
            .filter_map(|s| match s {
                Seg::Text(t) => Some(t.to_ascii_lowercase()),
                _ => None,
            })
            .collect();
        (0..)
            .map(|n| match n {
                0 => "sg_pull_".to_owned(),
                n => format!("sg_pull{n}_"),
            })
            .find(|p| !text.contains(p.as_str()))
            .expect("some prefix is free")
    }
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
    /// A read whose shards no one node holds: the shards copied from their nodes
    /// first. `sql` reads each by its `name`, which the executor defines in a WITH
    /// clause holding the copied rows ([`with_pulled`]).
    pub pulls: Vec<Pull>,
    /// The same statement with its literals as typed parameters, when that means
    /// exactly the same (see [`Planned`]`::promote`): the executor may prepare it on
    /// the node once and bind the values, so the node does not parse and plan the
    /// text again for every value.
    pub promoted: Option<Promoted>,
    /// A read of every shard whose rows the client gets together (a `concat` plan):
    /// each shard's node (group) and SQL, in shard order. `group` and `sql` are then
    /// the first shard's.
    pub fanout: Vec<(i32, String)>,
}

/// A shard statement whose numeric literals became parameters, typed as Postgres
/// types the literal constants (`int4` if it fits, else `int8`, else `numeric`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Promoted {
    /// The text, with `$1`, `$2`, ... for the literals.
    pub sql: String,
    /// A Parse message's parameter types, raw: an i16 count and the type oids.
    pub param_types: Vec<u8>,
    /// A Bind message after the statement name, raw: no parameter formats (text),
    /// the values, no result formats (text).
    pub bind: Vec<u8>,
    /// The catalog version it was planned under: a statement prepared before a schema
    /// change is not reused after it (its result type may have changed).
    pub version: u64,
}

/// Whether a numeric literal right after the token `prev` (the previous non-space
/// token of the template) may become a parameter of the literal's own type without
/// changing the statement's meaning: as the operand of an operator (a comparison,
/// `->`, arithmetic: whatever ends in `=`, `<`, `>`, `+`, `-`, `*`, `/` or `%`), whose
/// resolution is the same for a typed parameter as for a typed constant, and after
/// LIMIT or OFFSET. Anywhere else a literal can be a position (`ORDER BY 1`,
/// `GROUP BY 2`) or a type modifier (`numeric(10, 2)`), so it stays text.
///
/// After a unary minus Postgres folds the sign into the constant (`-5` is the int4
/// constant -5) where the promoted text applies `-` to the parameter: the same value
/// and type, except for `-2147483648` (an int4 constant; `-` of an int8 parameter)
/// and `-9223372036854775808`, which [`PromotedBuilder::literal`] leaves as text.
/// But a signed constant is still a constant where the grammar wants one: a position
/// (`ORDER BY -1`, `GROUP BY a, -1`, `DISTINCT ON (-1)`) or `FETCH FIRST +3 ROWS`,
/// `OFFSET +2 ROWS`. So after a sign, `before` (the token before the sign) must make
/// it an operator in an expression: an operand (binary `x - 5`), another operator
/// (`x + -5`), or a word other than BY, FIRST, NEXT and OFFSET (`SELECT -5`,
/// `THEN -1`, `v - 1`).
fn promotable_after(before: Option<(Tok, &str)>, prev: Option<(Tok, &str)>) -> bool {
    match prev {
        Some((Tok::Punct, "+" | "-")) => match before {
            Some((Tok::Quoted | Tok::Number | Tok::Param, _)) => true,
            Some((Tok::Punct, p)) => {
                matches!(p, ")" | "]" | "=" | "<" | ">" | "+" | "-" | "*" | "/" | "%")
            }
            Some((Tok::Word, w)) => !["by", "first", "next", "offset"]
                .iter()
                .any(|k| w.eq_ignore_ascii_case(k)),
            _ => false,
        },
        Some((Tok::Punct, p)) => matches!(p, "=" | "<" | ">" | "*" | "/" | "%"),
        Some((Tok::Word, w)) => w.eq_ignore_ascii_case("limit") || w.eq_ignore_ascii_case("offset"),
        _ => false,
    }
}

/// Whether every literal (`$n` of the normalised template) stands where a typed
/// parameter means exactly what the literal does, fed the template's tokens in order.
struct PromoteCheck<'a> {
    ok: bool,
    /// The last non-space tokens, latest first.
    hist: [Option<(Tok, &'a str)>; 3],
    /// Parenthesis depth.
    depth: usize,
    /// The depth of the SET list being read (`UPDATE ... SET`, `DO UPDATE SET`), whose
    /// `=` assigns (until WHERE, FROM or RETURNING at that depth).
    set_list: Option<usize>,
}

impl<'a> PromoteCheck<'a> {
    fn new(ok: bool) -> Self {
        PromoteCheck {
            ok,
            hist: [None; 3],
            depth: 0,
            set_list: None,
        }
    }

    fn token(&mut self, kind: Tok, tok: &'a str) {
        let h = self.hist;
        let assigns = self.set_list == Some(self.depth);
        if kind == Tok::Param && (!promotable_after(h[1], h[0]) || folds_with_constants(h, assigns))
        {
            self.ok = false;
        }
        match (kind, tok) {
            (Tok::Punct, "(") => self.depth += 1,
            (Tok::Punct, ")") => self.depth = self.depth.saturating_sub(1),
            (Tok::Word, w) if w.eq_ignore_ascii_case("set") => self.set_list = Some(self.depth),
            (Tok::Word, w)
                if assigns
                    && ["where", "from", "returning"]
                        .iter()
                        .any(|k| w.eq_ignore_ascii_case(k)) =>
            {
                self.set_list = None
            }
            _ => {}
        }
        if kind != Tok::Space {
            // A literal cast (`5::int2`) is folded when Postgres plans the text.
            if matches!(h[0], Some((Tok::Param, _))) && tok == ":" {
                self.ok = false;
            }
            self.hist = [Some((kind, tok)), h[0], h[1]];
        }
    }
}

/// Whether a literal at this place (`hist`: the tokens before it, latest first;
/// `assigns`: in a SET list, where `=` assigns) is folded with other constants, or
/// coerced to a column's type, when Postgres plans the text: `2147483647 + 1`,
/// `1 / 0.0`, `5 - -1`, `date '...' + 1`, `SET int2col = 100000`. A parameter there
/// is evaluated only when a row needs it, so once Postgres runs a generic plan the
/// error the text raises at every execution (22003, 22012) would go unseen when no row
/// qualifies. Such a literal keeps the statement as text.
fn folds_with_constants(hist: [Option<(Tok, &str)>; 3], assigns: bool) -> bool {
    let [p1, p2, p3] = hist;
    // A sign after an operator (or first) is unary: what applies is the operator before.
    let unary = matches!(p1, Some((Tok::Punct, "+" | "-")))
        && match p2 {
            None => true,
            Some((Tok::Punct, p)) => !matches!(p, ")" | "]"),
            _ => false,
        };
    let (op, left) = if unary { (p2, p3) } else { (p1, p2) };
    match op {
        Some((Tok::Punct, "+" | "-" | "*" | "/" | "%")) => matches!(
            left,
            Some((Tok::Param | Tok::Number | Tok::Str | Tok::OtherStr, _))
                | Some((Tok::Punct, ")" | "]"))
        ),
        // An assignment (`SET col = 5`, `SET comp.f = 5`, `SET arr[1] = 5`): coerced
        // to the column's type.
        Some((Tok::Punct, "=")) => assigns,
        _ => false,
    }
}

/// The type oid Postgres gives a numeric literal token as a constant, or `None` for
/// anything else (a string, a sign, a form this lexer does not know).
fn numeric_literal(tok: &str) -> Option<u32> {
    let b = tok.as_bytes();
    if !b.is_empty() && b.iter().all(u8::is_ascii_digit) {
        return Some(if tok.parse::<i32>().is_ok() {
            23
        } else if tok.parse::<i64>().is_ok() {
            20
        } else {
            1700
        });
    }
    // decimal: digits with one '.', optionally an exponent; at least one digit.
    let (mant, exp) = match tok.find(['e', 'E']) {
        Some(i) => (&tok[..i], Some(&tok[i + 1..])),
        None => (tok, None),
    };
    let digits = mant.bytes().filter(u8::is_ascii_digit).count();
    let dots = mant.bytes().filter(|c| *c == b'.').count();
    let mant_ok = digits > 0 && dots <= 1 && digits + dots == mant.len();
    let exp_ok = exp.is_none_or(|e| {
        let e = e.strip_prefix(['+', '-']).unwrap_or(e);
        !e.is_empty() && e.bytes().all(|c| c.is_ascii_digit())
    });
    (mant_ok && exp_ok && (dots == 1 || exp.is_some())).then_some(1700)
}

/// A shard a read copies from the node holding it (see [`Bound::pulls`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pull {
    /// The node (group) it is copied from.
    pub group: i32,
    /// Its schema-qualified, quoted name on that node.
    pub shard: String,
    /// The table's name (for messages).
    pub table: String,
    /// The name the statement reads the copy by.
    pub name: String,
}

/// Rows a read copies from another node's shard, at most; a larger shard refuses the
/// statement (running it across nodes needs the pushdown tier).
pub const PULL_MAX_ROWS: i64 = 10_000;
/// The copied rows as SQL text, at most (bytes).
pub const PULL_MAX_BYTES: usize = 16 << 20;

/// `sql` with `ctes` (name, query) defined in front: added to the statement's own
/// WITH clause (after `WITH [RECURSIVE]`), or as a new one.
pub fn with_pulled(sql: &str, ctes: &[(String, String)]) -> String {
    let list: Vec<String> = ctes
        .iter()
        .map(|(name, body)| format!("{name} AS ({body})"))
        .collect();
    let list = list.join(", ");
    let mut words = tokens(sql)
        .into_iter()
        .filter(|(k, _, _)| !matches!(k, Tok::Space));
    if let Some((Tok::Word, s, e)) = words.next()
        && sql[s..e].eq_ignore_ascii_case("with")
    {
        let at = match words.next() {
            Some((Tok::Word, s2, e2)) if sql[s2..e2].eq_ignore_ascii_case("recursive") => e2,
            _ => e,
        };
        return format!("{} {list}, {}", &sql[..at], &sql[at..]);
    }
    format!("WITH {list} {sql}")
}

/// The node a read whose shards no one node holds runs on: the active node holding
/// the most of them; among equals, the one whose shards belong to tables of more
/// shards (a table of one shard, often small, is the one copied), then `prefer` (the
/// session's node), then the first shard's placement order.
fn pull_host(
    needed: &[(&crate::catalog::Shard, usize)],
    snap: &Snapshot,
    prefer: Option<i32>,
) -> Option<i32> {
    let mut best: Option<((usize, usize, bool), i32)> = None;
    for (s, _) in needed {
        for g in &s.placements {
            if snap.node_by_group(*g).is_none() {
                continue;
            }
            let held = needed.iter().filter(|(x, _)| x.placements.contains(g));
            let score = (
                held.clone().count(),
                held.map(|(_, shards)| *shards).sum::<usize>(),
                prefer == Some(*g),
            );
            if best.is_none_or(|(b, _)| score > b) {
                best = Some((score, *g));
            }
        }
    }
    best.map(|(_, g)| g)
}

/// Whether a template is a query a WITH clause can be put in front of (SELECT, VALUES,
/// TABLE, WITH, or a parenthesised one).
/// Statements a promoted plan may be: plain DML and queries (not EXPLAIN, whose
/// output would show the parameters, nor utility statements).
fn is_promotable_kind(sql: &str) -> bool {
    tokens(sql)
        .into_iter()
        .find(|(k, _, _)| !matches!(k, Tok::Space))
        .is_some_and(|(k, s, e)| {
            k == Tok::Word
                && [
                    "select", "insert", "update", "delete", "with", "values", "table",
                ]
                .iter()
                .any(|x| sql[s..e].eq_ignore_ascii_case(x))
        })
}

/// A promoted statement being built beside the bound SQL (see [`Promoted`]).
struct PromotedBuilder {
    sql: String,
    types: Vec<u8>,
    bind: Vec<u8>,
    count: u16,
    /// The parameter number of each literal already written (by literal index): one
    /// literal written twice is one parameter, so that `GROUP BY i > 5` still equals
    /// the `i > 5` of the select list, as the two constants do.
    numbers: Vec<(usize, u16)>,
}

impl PromotedBuilder {
    fn new(capacity: usize, literals: usize) -> Self {
        let mut types = Vec::with_capacity(2 + 4 * literals);
        types.extend_from_slice(&[0, 0]);
        let mut bind = Vec::with_capacity(6 + 16 * literals);
        bind.extend_from_slice(&[0, 0, 0, 0]);
        PromotedBuilder {
            sql: String::with_capacity(capacity),
            types,
            bind,
            count: 0,
            numbers: Vec::new(),
        }
    }

    /// Literal `k` (the token `tok`) as a parameter: a new one the first time;
    /// `None` if it is not a numeric literal.
    fn literal(mut self, k: usize, tok: &str) -> Option<Self> {
        // (`02147483648` is the same number to Postgres.)
        let digits = tok.trim_start_matches('0');
        if digits == "2147483648" || digits == "9223372036854775808" {
            // After a unary minus, the constant would have the smaller type.
            return None;
        }
        let oid = numeric_literal(tok)?;
        if let Some((_, n)) = self.numbers.iter().find(|(j, _)| *j == k) {
            self.sql.push('$');
            self.sql.push_str(&n.to_string());
            return Some(self);
        }
        self.count = self.count.checked_add(1)?;
        self.numbers.push((k, self.count));
        self.sql.push('$');
        self.sql.push_str(&self.count.to_string());
        self.types.extend_from_slice(&oid.to_be_bytes());
        self.bind
            .extend_from_slice(&i32::try_from(tok.len()).ok()?.to_be_bytes());
        self.bind.extend_from_slice(tok.as_bytes());
        Some(self)
    }

    fn finish(mut self, version: u64) -> Promoted {
        self.types[..2].copy_from_slice(&self.count.to_be_bytes());
        self.bind[2..4].copy_from_slice(&self.count.to_be_bytes());
        self.bind.extend_from_slice(&[0, 0]);
        Promoted {
            sql: self.sql,
            param_types: self.types,
            bind: self.bind,
            version,
        }
    }
}

/// The plan cache's type key: `$1` of the normalised text is a literal or the client's
/// own parameter, so the count of the client's parameters comes first, then their types.
fn cache_key_types(norm: &Normalized, param_types: &[u32]) -> Vec<u32> {
    let mut key = Vec::with_capacity(param_types.len() + 1);
    key.push(norm.client_params);
    key.extend_from_slice(param_types);
    key
}

/// The first placement of `shard` (of table `table`) whose node is active.
fn active_placement(
    shard: &crate::catalog::Shard,
    table: &str,
    snap: &Snapshot,
) -> Result<i32, PlanError> {
    shard
        .placements
        .iter()
        .copied()
        .find(|g| snap.node_by_group(*g).is_some())
        .ok_or_else(|| {
            PlanError::NoPlacement(format!(
                "shard {} of {table} has no placement on an active node",
                shard.id
            ))
        })
}

fn is_query(sql: &str) -> bool {
    tokens(sql)
        .into_iter()
        .find(|(k, _, _)| !matches!(k, Tok::Space))
        .is_some_and(|(k, s, e)| {
            let w = &sql[s..e];
            (k == Tok::Word
                && ["select", "values", "table", "with"]
                    .iter()
                    .any(|x| w.eq_ignore_ascii_case(x)))
                || w == "("
        })
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
        let key_types = cache_key_types(norm, param_types);
        match self.lookup(&norm.text, &key_types, stamp, || {
            self.plan_text(&norm.text, norm, true, param_types, snap, plugins)
        })? {
            Entry::Plan(p) => Ok(p),
            Entry::Refused(e) => Err(PlanError::NotPlannable(e)),
            Entry::Raw => self.plan_raw(sql, norm, param_types, snap, plugins),
        }
    }

    /// The plan for `sql` as written (its literals not made parameters): for a
    /// statement whose normalised text no tier takes, and for one whose literal key
    /// (made a parameter) does not convert to the distribution column's type
    /// (`tenant = 3.0` for an int column: Postgres compares them as numbers, which a
    /// hashed key cannot, so the tiers see the literal and do not pin the shard).
    pub fn plan_raw(
        &self,
        sql: &str,
        norm: &Normalized,
        param_types: &[u32],
        snap: &Snapshot,
        plugins: &PluginSet,
    ) -> Result<Arc<Planned>, PlanError> {
        let stamp = (snap.version, plugins.generation());
        let key_types = cache_key_types(norm, param_types);
        match self.lookup(sql, &key_types, stamp, || {
            self.plan_text(sql, norm, false, param_types, snap, plugins)
        })? {
            Entry::Plan(p) => Ok(p),
            Entry::Refused(e) => Err(PlanError::NotPlannable(e)),
            Entry::Raw => Err(PlanError::NotPlannable(
                "shardgate cannot plan this statement on distributed tables".into(),
            )),
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
        // Every tier's parser refused it: saying it is not pinned would mislead.
        let why = if reasons.iter().all(|r| r.contains(": does not parse")) {
            "the planner tiers' SQL parser does not accept its syntax (Postgres may: the same statement written another way may run)"
        } else {
            "it is not pinned to one distribution value, and of multi-shard statements only a row-by-row read of one distributed table (no aggregate, GROUP BY, DISTINCT, ORDER BY, LIMIT, subquery or join) is run yet"
        };
        Ok(Entry::Refused(format!(
            "shardgate cannot plan this statement on distributed tables: {why} [{}]",
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
        let fanout = match &t.merge {
            MergeKind::SingleShard => false,
            // Rows of every shard of one distributed table, as they come: a read.
            MergeKind::Concat
                if norm.read_only
                    && is_query(&t.sql_template)
                    && matches!(t.targets.as_slice(), [x]
                        if x.key == ShardKey::AllShards
                            && view.metas[x.table as usize].method == Method::Hash) =>
            {
                true
            }
            MergeKind::Concat => {
                return Err(PlanError::NotSupported(format!(
                    "{tier} planned a concatenation that is not a read of every shard of one distributed table; only such a one is run"
                )));
            }
            other => {
                return Err(PlanError::NotSupported(format!(
                    "{tier} planned a multi-shard statement ({other:?}); merging results of several shards that way is not available yet"
                )));
            }
        };
        let targets = t
            .targets
            .iter()
            .map(|x| (view.metas[x.table as usize].clone(), x.key.clone()))
            .collect::<Vec<_>>();
        // Tables of different colocation groups pinned by keys must have distribution
        // columns of one type: a value written from one into the other is stored
        // converted ('007' read as int8 is stored as '7' in a text column), and would
        // be in another shard than its key says. (Colocated tables share the type.)
        let keyed: Vec<&TableMeta> = targets
            .iter()
            .filter(|(t, k)| t.method == Method::Hash && *k != ShardKey::AllShards)
            .map(|(t, _)| &**t)
            .collect();
        if let Some(first) = keyed.first()
            && let Some(other) = keyed.iter().find(|t| t.column_type != first.column_type)
        {
            return Err(PlanError::NotPlannable(format!(
                "{} and {} are in different colocation groups and their distribution columns have different types; such a statement is not routed to one node",
                first.name, other.name
            )));
        }
        let client_params = norm.client_params;
        let sql = &t.sql_template;
        let mut segments = Vec::new();
        let mut text = String::new();
        let mut promote =
            PromoteCheck::new(normalized && client_params == 0 && is_promotable_kind(sql));
        for (kind, s, e) in tokens(sql) {
            let tok = &sql[s..e];
            if kind == Tok::Space && (tok.contains("--") || tok.contains("/*")) {
                // Sessions send the template as it is: a comment would swallow the
                // rest of a line (a re-serialised `- -1` is `--1`).
                return Err(PlanError::NotSupported(format!(
                    "{tier} wrote a comment into the statement it planned ({:?}); a plan template must not hold comments",
                    tok.trim()
                )));
            }
            promote.token(kind, tok);
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
            pullable: norm.read_only && is_query(sql),
            client_params,
            normalized,
            promote: promote.ok && !fanout,
            fanout,
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
        if plan.fanout {
            return self.bind_fanout(plan, literals, snap);
        }
        // Each distributed target's shard index: colocated targets share one; a table
        // of one shard needs no key.
        let mut shard_of: Vec<u32> = vec![0; plan.targets.len()];
        let mut first_hash: Option<usize> = None;
        for (n, (table, key)) in plan.targets.iter().enumerate() {
            if table.method != Method::Hash {
                continue;
            }
            let i = if table.shards.len() == 1 && *key == ShardKey::AllShards {
                0
            } else {
                self.shard_index(plan, table, key, literals, param, plugins)?
            };
            if let Some((m, _)) = plan.targets[..n].iter().enumerate().find(|(m, (t, _))| {
                t.method == Method::Hash
                    && t.colocation_id == table.colocation_id
                    && shard_of[*m] != i
            }) {
                if plan.targets[m].0.oid == table.oid
                    && plan.is_update()
                    && !plan
                        .segments
                        .iter()
                        .any(|s| matches!(s, Seg::Table(x) if *x == n))
                {
                    // An extra key of the table an UPDATE names once: the new value of
                    // its distribution column.
                    return Err(PlanError::NotSupported(format!(
                        "cannot move a row of {} to another shard: the new value of its distribution column \"{}\" belongs to shard index {i}, the row to shard index {}",
                        table.name,
                        table.column.as_deref().unwrap_or_default(),
                        shard_of[m]
                    )));
                }
                return Err(PlanError::NotPlannable(format!(
                    "the statement's tables resolve to different shards ({} and {})",
                    shard_of[m], i
                )));
            }
            shard_of[n] = i;
            first_hash.get_or_insert(n);
        }
        let shard_of_target = |n: usize| {
            let (table, _) = &plan.targets[n];
            let i = shard_of[n] as usize;
            table.shards.get(i).ok_or_else(|| {
                PlanError::NoPlacement(format!(
                    "table {} has no shard {i} in the catalog",
                    table.name
                ))
            })
        };
        // The node: one that holds every chosen shard (and the reference tables), or
        // for reference-only plans one of the reference placements.
        let mut also = Vec::new();
        // Targets read from a copy (their shard is on another node than the one that
        // runs the statement).
        let mut pulled: Vec<Option<Pull>> = Vec::new();
        let group = if let Some(f) = first_hash {
            let mut needed = Vec::with_capacity(plan.targets.len());
            for n in 0..plan.targets.len() {
                needed.push(shard_of_target(n)?);
            }
            let first = needed[f];
            if first.placements.is_empty() {
                return Err(PlanError::NoPlacement(format!(
                    "shard {} has no placement",
                    first.id
                )));
            }
            match first
                .placements
                .iter()
                .find(|g| needed.iter().all(|s| s.placements.contains(g)))
            {
                Some(g) => *g,
                None if plan.pullable => {
                    let weighed: Vec<_> = needed
                        .iter()
                        .zip(&plan.targets)
                        .map(|(s, (t, _))| (*s, t.shards.len()))
                        .collect();
                    let prefix = plan.copy_prefix();
                    let host = pull_host(&weighed, snap, prefer).ok_or_else(|| {
                        PlanError::NoPlacement(
                            "no active node holds a shard the statement needs".into(),
                        )
                    })?;
                    for (n, s) in needed.iter().enumerate() {
                        if s.placements.contains(&host) {
                            pulled.push(None);
                            continue;
                        }
                        let (table, _) = &plan.targets[n];
                        let source = active_placement(s, &table.name, snap)?;
                        let index = match table.method {
                            Method::Hash => shard_of[n] as usize,
                            Method::Reference => 0,
                        };
                        let shard = table.qualified_shard(index).ok_or_else(|| {
                            PlanError::NoPlacement(format!(
                                "table {} has no shard {index} in the catalog",
                                table.name
                            ))
                        })?;
                        pulled.push(Some(Pull {
                            group: source,
                            shard: shard.to_owned(),
                            table: table.name.clone(),
                            name: format!("{prefix}{}", s.id),
                        }));
                    }
                    host
                }
                None => {
                    let shards: Vec<String> = plan
                        .targets
                        .iter()
                        .zip(&needed)
                        .map(|((t, _), s)| {
                            format!("{} shard {} on groups {:?}", t.name, s.id, s.placements)
                        })
                        .collect();
                    return Err(PlanError::NotPlannable(format!(
                        "no node holds every shard the statement needs ({}): its tables are not colocated; only a plain read (no write, lock or EXPLAIN) is run across nodes, by copying small shards, and anything else is not run across nodes yet",
                        shards.join(", ")
                    )));
                }
            }
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
        let mut promo = plan
            .promote
            .then(|| PromotedBuilder::new(128, literals.len()));
        for s in &plan.segments {
            let start = sql.len();
            match s {
                Seg::Text(t) => sql.push_str(t),
                Seg::Table(n) if pulled.get(*n).is_some_and(Option::is_some) => {
                    let p = pulled[*n].as_ref().expect("checked");
                    sql.push_str(&p.name);
                }
                Seg::Table(n) => {
                    let (table, _) = &plan.targets[*n];
                    let index = match table.method {
                        Method::Hash => shard_of[*n] as usize,
                        Method::Reference => 0,
                    };
                    let name = table.qualified_shard(index).ok_or_else(|| {
                        PlanError::NoPlacement(format!(
                            "table {} has no shard {index} in the catalog",
                            table.name
                        ))
                    })?;
                    sql.push_str(name);
                }
                Seg::Literal(k) => match literals.get(*k) {
                    Some(l) => {
                        sql.push_str(l);
                        promo = promo.and_then(|p| p.literal(*k, l));
                        continue;
                    }
                    None => {
                        return Err(PlanError::NotSupported(
                            "the plan names a literal the statement does not have".into(),
                        ));
                    }
                },
            }
            if let Some(p) = promo.as_mut() {
                p.sql.push_str(&sql[start..]);
            }
        }
        let mut pulls: Vec<Pull> = Vec::new();
        for p in pulled.into_iter().flatten() {
            if !pulls.iter().any(|q| q.name == p.name) {
                pulls.push(p);
            }
        }
        let promoted = match promo {
            // Keyed by the catalog version (bumped by every catalog change, DDL through
            // the router included), not the snapshot's generation (every reload).
            Some(p) if pulls.is_empty() && also.is_empty() => {
                Some(p.finish(snap.version.max(0) as u64))
            }
            _ => None,
        };
        Ok(Bound {
            group,
            sql,
            read_only: plan.read_only,
            also,
            pulls,
            promoted,
            fanout: Vec::new(),
        })
    }

    /// Binds a `concat` plan: the statement on every shard of its table, each on a node
    /// holding the shard.
    fn bind_fanout(
        &self,
        plan: &Planned,
        literals: &[String],
        snap: &Snapshot,
    ) -> Result<Bound, PlanError> {
        let (table, _) = &plan.targets[0];
        let mut fanout = Vec::with_capacity(table.shards.len());
        for (i, shard) in table.shards.iter().enumerate() {
            // The first active placement, as for a statement pinned to the shard
            // (where the transaction's own writes of it went).
            let group = active_placement(shard, &table.name, snap)?;
            let name = table.qualified_shard(i).ok_or_else(|| {
                PlanError::NoPlacement(format!(
                    "table {} has no shard {i} in the catalog",
                    table.name
                ))
            })?;
            let mut sql = String::with_capacity(128);
            for s in &plan.segments {
                match s {
                    Seg::Text(t) => sql.push_str(t),
                    Seg::Table(_) => sql.push_str(name),
                    Seg::Literal(k) => sql.push_str(literals.get(*k).ok_or_else(|| {
                        PlanError::NotSupported(
                            "the plan names a literal the statement does not have".into(),
                        )
                    })?),
                }
            }
            fanout.push((group, sql));
        }
        let (group, sql) = fanout
            .first()
            .cloned()
            .ok_or_else(|| PlanError::NoPlacement(format!("table {} has no shard", table.name)))?;
        Ok(Bound {
            group,
            sql,
            read_only: true,
            also: Vec::new(),
            pulls: Vec::new(),
            promoted: None,
            fanout,
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
            ShardKey::Value(l) => literal_value(l, vt)?,
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
                    if matches!(vt, ValueType::Text | ValueType::Varchar)
                        && tok.starts_with(['\'', 'e', 'E'])
                        && plan.cast_follows(i - plan.client_params as usize)
                    {
                        // `'0007'::int` for a text column is the text '7': the tiers
                        // read the cast from the statement as written (the caller
                        // plans it again so on this error).
                        return Err(PlanError::InvalidValue(
                            "a cast string as the value of a text distribution column".into(),
                        ));
                    }
                    text_key(&number_as_text(tok, vt)?, vt)?
                } else {
                    match param(i) {
                        None => {
                            return Err(PlanError::NotSupported(format!(
                                "the plan is keyed on ${}, which the statement does not bind",
                                i + 1
                            )));
                        }
                        Some(ParamValue::Null) => {
                            if plan.read_only {
                                // `dist = NULL` matches no row on any shard: any shard
                                // answers right.
                                return Ok(0);
                            }
                            return Err(PlanError::NullKey(format!(
                                "cannot write a row with NULL in the distribution column \"{column}\" of {}",
                                table.name
                            )));
                        }
                        Some(ParamValue::Text(b)) => text_key(
                            std::str::from_utf8(b).map_err(|_| {
                                PlanError::InvalidValue("parameter is not valid UTF-8".into())
                            })?,
                            vt,
                        )?,
                        Some(ParamValue::Binary(b, oid)) => binary_value(b, oid, vt)?,
                    }
                }
            }
        };
        let Some(value) = value else {
            // An integer outside the range of the column's type: no shard holds a row
            // with it, and any one shard answers the statement as Postgres would (no
            // row where it is compared as a bigint, 22003 where it is read as the
            // column's type: a parameter of that type, a row to insert).
            return Ok(0);
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
    crate::admin::data::parse_value(text, t).map_err(|e| match e {
        crate::admin::AdminError::OutOfRange(m) => PlanError::OutOfRange(m),
        e => PlanError::InvalidValue(e.to_string()),
    })
}

/// A key literal as a value of the column's type; `None` for an integer outside the
/// range of the column's integer type (`int4_column = 2147483648`, see `text_key`).
fn literal_value(l: &Literal, t: ValueType) -> Result<Option<Value>, PlanError> {
    match l {
        Literal::Int8(v) => match t {
            ValueType::Int2 => Ok(i16::try_from(*v).ok().map(Value::Int2)),
            ValueType::Int4 => Ok(i32::try_from(*v).ok().map(Value::Int4)),
            _ => text_key(&v.to_string(), t),
        },
        Literal::Text(s) => text_key(s, t),
        Literal::Boolean(b) => parse(if *b { "true" } else { "false" }, t).map(Some),
    }
}

/// A normalised literal's text. A number (not quoted) for a text column is stored as
/// the number's own text, which is not always the token: `007` is `'7'`. Integers are
/// written as Postgres writes them; other numbers (`1.50`, `1e3`) are not followed.
fn number_as_text(token: &str, t: ValueType) -> Result<String, PlanError> {
    let text = literal_text(token);
    if !matches!(t, ValueType::Text | ValueType::Varchar)
        || !token.starts_with(|c: char| c.is_ascii_digit() || c == '.')
    {
        return Ok(text);
    }
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(PlanError::NotSupported(format!(
            "the number {token} as the value of a text distribution column: write it as a string"
        )));
    }
    let digits = text.trim_start_matches('0');
    Ok(if digits.is_empty() { "0" } else { digits }.to_owned())
}

/// A key given as text (a literal, a text parameter) as a value of the column's type;
/// `None` for an integer too large for it. Whether that is an error or a value that
/// matches no row depends on what Postgres reads it as: 22003 for a parameter of the
/// column's type or `'2147483648'`, no row for `$1::int8` or `'2147483648'::bigint`.
/// No shard can hold a row with it, so any one shard answers as Postgres would.
fn text_key(text: &str, t: ValueType) -> Result<Option<Value>, PlanError> {
    match parse(text, t) {
        Ok(v) => Ok(Some(v)),
        Err(PlanError::OutOfRange(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// A parameter in binary format of type `oid` -> the plugin's value for a column of
/// type `t` (as Postgres would convert it for `column = $n`). A binary value of
/// unknown type is refused: guessing its type could route to the wrong shard. `None`
/// for an integer outside the range of an integer column's type: Postgres compares
/// the two types as they are, and no row of any shard matches.
fn binary_value(b: &[u8], oid: u32, t: ValueType) -> Result<Option<Value>, PlanError> {
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
            return Ok(match t {
                ValueType::Int2 => i16::try_from(v).ok().map(Value::Int2),
                ValueType::Int4 => i32::try_from(v).ok().map(Value::Int4),
                ValueType::Int8 => Some(Value::Int8(v)),
                _ => Some(parse(&v.to_string(), t)?),
            });
        }
        // text, varchar, bpchar, name, unknown-as-text
        25 | 1043 | 1042 | 19 | 705 => String::from_utf8(b.to_vec()).map_err(|_| bad())?,
        2950 if b.len() == 16 => {
            return match t {
                ValueType::Uuid => Ok(Some(Value::Uuid(b.to_vec()))),
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
    text_key(&text, t)
}

/// `"ident"`, quotes doubled.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::{
        PromoteCheck, PromotedBuilder, Tok, is_promotable_kind, is_query, numeric_literal,
        promotable_after, tokens, with_pulled,
    };

    #[test]
    fn numeric_literals_get_the_constants_type() {
        assert_eq!(numeric_literal("42"), Some(23));
        assert_eq!(numeric_literal("2147483647"), Some(23));
        assert_eq!(numeric_literal("2147483648"), Some(20));
        assert_eq!(numeric_literal("9223372036854775808"), Some(1700));
        assert_eq!(numeric_literal("1.5"), Some(1700));
        assert_eq!(numeric_literal(".5"), Some(1700));
        assert_eq!(numeric_literal("5."), Some(1700));
        assert_eq!(numeric_literal("1e3"), Some(1700));
        assert_eq!(numeric_literal("1.5E-3"), Some(1700));
        for not in [
            "'5'", "E'5'", "1e", "1.2.3", "1e+", "", ".", "0x1F", "-5", "1_000",
        ] {
            assert_eq!(numeric_literal(not), None, "{not}");
        }
    }

    #[test]
    fn literals_are_promoted_only_where_a_parameter_means_the_same() {
        let w = |x| Some((Tok::Word, x));
        let p = |x| Some((Tok::Punct, x));
        for op in ["=", "<", ">", "*", "/", "%"] {
            assert!(promotable_after(w("x"), p(op)), "{op}");
        }
        assert!(promotable_after(None, w("LIMIT")));
        assert!(promotable_after(None, w("offset")));
        // After a sign: binary, or unary in an expression.
        for before in [w("v"), w("SELECT"), w("THEN"), p(")"), p("+"), p("=")] {
            assert!(promotable_after(before, p("-")), "{before:?}");
            assert!(promotable_after(before, p("+")), "{before:?}");
        }
        // A signed constant where the grammar wants a constant.
        for before in [
            w("BY"),
            w("by"),
            w("FIRST"),
            w("NEXT"),
            w("OFFSET"),
            p(","),
            p("("),
            None,
        ] {
            assert!(!promotable_after(before, p("-")), "{before:?}");
            assert!(!promotable_after(before, p("+")), "{before:?}");
        }
        for (k, p) in [
            (Tok::Punct, "("),
            (Tok::Punct, ","),
            (Tok::Punct, "["),
            (Tok::Punct, ":"),
            (Tok::Word, "BY"),
            (Tok::Word, "AND"),
            (Tok::Word, "FIRST"),
        ] {
            assert!(!promotable_after(w("x"), Some((k, p))), "{p}");
        }
        assert!(!promotable_after(None, None));
        // Whole templates ($n: the normalised literals).
        let promotes = |sql: &str| {
            let mut c = PromoteCheck::new(true);
            for (k, s, e) in tokens(sql) {
                c.token(k, &sql[s..e]);
            }
            c.ok
        };
        for sql in [
            "SELECT v FROM t WHERE id = $1 AND x > -$2",
            "UPDATE t SET abalance = abalance + -$1 WHERE aid = $2",
            "UPDATE t SET v = v * $1, w = w - $2 WHERE id = $3",
            "SELECT x * $1 FROM t WHERE id = $2 AND y = $3 * z",
            "SELECT a FROM t WHERE id = $1 LIMIT $2 OFFSET $3",
            "UPDATE t SET a = (SELECT b FROM u WHERE c = $1) WHERE t.id = $2",
            "UPDATE t SET v = v + $1 FROM u WHERE u.x = $2 AND t.id = $3",
        ] {
            assert!(promotes(sql), "{sql}");
        }
        // Folded with another constant, cast, or assigned to a column when Postgres
        // plans the text: a plan-time error a generic plan would not raise.
        for sql in [
            "SELECT id FROM t WHERE id = $1 AND d = date '5874897-12-31' + $2",
            "UPDATE t SET comp.f = $1 WHERE id = $2",
            "UPDATE t SET arr[1] = $1 WHERE id = $2",
            "UPDATE t SET a = (SELECT b FROM u WHERE c = 5), d = $1 WHERE id = $2",
            "SELECT id FROM t WHERE id = $1 AND big = $2 + $3",
            "SELECT id FROM t WHERE id = $1 AND amount = $2 / $3",
            "SELECT id FROM t WHERE id = $1 AND f > $2 * $3",
            "SELECT id FROM t WHERE id = $1 AND x = $2 - -$3",
            "SELECT id FROM t WHERE id = $1 AND x = ($2) * $3",
            "SELECT id FROM t WHERE id = $1 AND small = $2::int2",
            "SELECT id FROM t WHERE id = $1 AND small = $2 :: int2",
            "UPDATE t SET small = $1 WHERE id = $2",
            "UPDATE t SET small = -$1 WHERE id = $2",
            "UPDATE t SET v = v + $1, small = $2 WHERE id = $3",
            "UPDATE t SET \"Small\" = $1 WHERE id = $2",
            "INSERT INTO t (id) SELECT $1 ON CONFLICT (id) DO UPDATE SET v = $2",
        ] {
            assert!(!promotes(sql), "{sql}");
        }
        assert!(is_promotable_kind("  select 1"));
        assert!(is_promotable_kind("WITH x AS (SELECT 1) SELECT 2"));
        assert!(!is_promotable_kind("EXPLAIN SELECT 1"));
        assert!(!is_promotable_kind("(SELECT 1)"));
    }

    #[test]
    fn promoted_statements_bind_text_values() {
        let mut b = PromotedBuilder::new(16, 2);
        b.sql.push_str("SELECT 1 WHERE a = ");
        let mut b = b.literal(0, "7").unwrap();
        b.sql.push_str(" AND b > ");
        let mut b = b.literal(1, "2.5").unwrap();
        b.sql.push_str(" AND c < ");
        let b = b.literal(0, "7").unwrap();
        let p = b.finish(9);
        assert_eq!(p.sql, "SELECT 1 WHERE a = $1 AND b > $2 AND c < $1");
        assert_eq!(p.param_types, [0, 2, 0, 0, 0, 23, 0, 0, 6, 164]);
        assert_eq!(
            p.bind,
            [
                0, 0, 0, 2, 0, 0, 0, 1, b'7', 0, 0, 0, 3, b'2', b'.', b'5', 0, 0
            ]
        );
        assert_eq!(p.version, 9);
        assert!(PromotedBuilder::new(16, 1).literal(0, "'x'").is_none());
        for boundary in ["2147483648", "002147483648", "09223372036854775808"] {
            assert!(PromotedBuilder::new(16, 1).literal(0, boundary).is_none());
        }
        assert!(
            PromotedBuilder::new(16, 1)
                .literal(0, "2147483648")
                .is_none()
        );
        assert!(
            PromotedBuilder::new(16, 1)
                .literal(0, "2147483649")
                .is_some()
        );
    }

    fn ctes() -> Vec<(String, String)> {
        vec![("sg_pull_7".into(), "SELECT 1".into())]
    }

    #[test]
    fn copies_go_in_front_or_into_the_statements_with_clause() {
        assert_eq!(
            with_pulled("SELECT * FROM sg_pull_7 b", &ctes()),
            "WITH sg_pull_7 AS (SELECT 1) SELECT * FROM sg_pull_7 b"
        );
        assert_eq!(
            with_pulled(
                "/* c */ with x AS (SELECT 2) SELECT * FROM x, sg_pull_7",
                &ctes()
            ),
            "/* c */ with sg_pull_7 AS (SELECT 1),  x AS (SELECT 2) SELECT * FROM x, sg_pull_7"
        );
        assert_eq!(
            with_pulled("WITH RECURSIVE r(n) AS (SELECT 1) SELECT 1", &ctes()),
            "WITH RECURSIVE sg_pull_7 AS (SELECT 1),  r(n) AS (SELECT 1) SELECT 1"
        );
        let two = vec![
            ("a".to_owned(), "SELECT 1".to_owned()),
            ("b".to_owned(), "SELECT 2".to_owned()),
        ];
        assert_eq!(
            with_pulled("(SELECT 1) UNION (SELECT 2)", &two),
            "WITH a AS (SELECT 1), b AS (SELECT 2) (SELECT 1) UNION (SELECT 2)"
        );
    }

    #[test]
    fn only_queries_take_copies() {
        assert!(is_query("  SELECT 1"));
        assert!(is_query("-- x\nwith a AS (SELECT 1) SELECT 1"));
        assert!(is_query("(SELECT 1)"));
        assert!(is_query("VALUES (1)"));
        assert!(!is_query("EXPLAIN SELECT 1"));
        assert!(!is_query("SHOW x"));
        assert!(!is_query(""));
    }
}
