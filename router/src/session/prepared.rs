//! Prepared statements under transaction pooling. A client's named statement is mapped
//! to a router-wide statement (same query text and parameter types -> same statement,
//! named `sg_<id>`), prepared lazily on whichever backend connection the client borrows.
//! Backends remember which router statements they hold, so a statement is parsed once
//! per backend connection, not once per client.

use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

#[derive(Debug)]
pub struct Prepared {
    pub id: u64,
    /// The name on backends: `sg_<id>`.
    pub name: Bytes,
    pub query: Bytes,
    /// Parameter count and type OIDs, raw from the client's Parse.
    pub param_types: Bytes,
    /// The namespace of texts it was made in (see [`PreparedRegistry::intern_in`]).
    pub epoch: u64,
    /// Some backend accepted this Parse once (the text is valid SQL for its types).
    pub validated: AtomicBool,
    /// The parameter types a backend described (ParameterDescription): how binary
    /// parameters of unspecified type are read when a distribution key is bound.
    pub described: std::sync::OnceLock<Vec<u32>>,
    /// What every Bind of a routed statement would otherwise work out again from the
    /// text (see `Routing`).
    pub routing: Routing,
    /// What its text does to session settings (`settings::inspect`), worked out at
    /// its first Bind.
    pub settings: std::sync::OnceLock<super::settings::Inspected>,
}

/// Per-statement routing facts, kept with the statement so that a Bind does not lex
/// its text again: the normalised text (it depends on the text only), whether the
/// text names a distributed or reference table (for one catalog snapshot), and the
/// router statements of the shard SQL its Binds ran (a few per statement: one per
/// shard it reached).
#[derive(Debug, Default)]
pub struct Routing {
    normalized: std::sync::OnceLock<crate::plan::Normalized>,
    routed: Mutex<Option<(u64, bool)>>,
    shards: Mutex<Vec<Arc<Prepared>>>,
}

/// Shard statements remembered per client statement (a statement keyed on its
/// distribution column reaches at most one per shard).
const MAX_SHARD_STATEMENTS: usize = 256;

impl Routing {
    /// `normalize(text)`, computed once.
    pub fn normalized(&self, text: &str) -> &crate::plan::Normalized {
        self.normalized.get_or_init(|| crate::plan::normalize(text))
    }

    /// Whether the text is routed under the catalog snapshot `generation`, from
    /// `decide` on a miss.
    pub fn routed(&self, generation: u64, decide: impl FnOnce() -> bool) -> bool {
        let mut slot = self.routed.lock();
        match *slot {
            Some((g, r)) if g == generation => r,
            _ => {
                let r = decide();
                *slot = Some((generation, r));
                r
            }
        }
    }

    /// The router statement for the shard SQL `sql` (with the statement's parameter
    /// types), from `registry` the first time, in `epoch` (the client statement's:
    /// a statement the client prepared after a schema change gets shard statements
    /// of its own, prepared afresh on the workers).
    pub fn shard_statement(
        &self,
        sql: &str,
        param_types: &[u8],
        registry: &PreparedRegistry,
        epoch: u64,
    ) -> Arc<Prepared> {
        let mut shards = self.shards.lock();
        if let Some(p) = shards
            .iter()
            .find(|p| p.query == sql.as_bytes() && p.param_types == param_types)
        {
            return p.clone();
        }
        let p = registry.intern_in(sql.as_bytes(), param_types, epoch);
        if shards.len() < MAX_SHARD_STATEMENTS {
            shards.push(p.clone());
        }
        p
    }
}

/// Router statements by (text, raw parameter types, epoch). Client statements (and
/// the shard statements of routed ones) use [`client_epoch`] of the catalog version
/// they were prepared under, promoted simple queries (`plan::Promoted`) that version
/// plus one: a catalog change gives statements prepared after it new names, which the
/// backends parse afresh (a backend holding the old one would answer "cached plan must
/// not change result type").
#[derive(Default)]
pub struct PreparedRegistry {
    by_text: Mutex<HashMap<(Bytes, Bytes, u64), Arc<Prepared>>>,
    next: AtomicU64,
}

/// Statements prepared on backends are named this and their id.
pub const NAME_PREFIX: &str = "sg_";

/// The epoch of client statements prepared under catalog `version`
/// (`catalog_state.version`, bumped by every catalog change, DDL through the router
/// included; not the snapshot's generation, which every reload changes): apart from
/// the promoted statements' `version + 1`.
pub fn client_epoch(version: i64) -> u64 {
    (version.max(0) as u64).wrapping_add(1) | 1 << 63
}

/// The epoch of promoted simple queries planned under catalog `version`.
pub fn promoted_epoch(version: u64) -> u64 {
    version.wrapping_add(1).max(1)
}

/// Beyond this many distinct statements the registry stops sharing new ones (each gets
/// a fresh id) so that memory stays bounded by what sessions hold.
const MAX_SHARED: usize = 100_000;

impl PreparedRegistry {
    /// The router statement for this text in `epoch`, if there is one.
    pub fn lookup(&self, query: &[u8], param_types: &[u8], epoch: u64) -> Option<Arc<Prepared>> {
        let key = (
            Bytes::copy_from_slice(query),
            Bytes::copy_from_slice(param_types),
            epoch,
        );
        self.by_text.lock().get(&key).cloned()
    }

    /// The router statement for this text in `epoch`'s own namespace of texts, made
    /// the first time.
    pub fn intern_in(&self, query: &[u8], param_types: &[u8], epoch: u64) -> Arc<Prepared> {
        let key = (
            Bytes::copy_from_slice(query),
            Bytes::copy_from_slice(param_types),
            epoch,
        );
        let mut map = self.by_text.lock();
        if let Some(p) = map.get(&key) {
            return p.clone();
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let p = Arc::new(Prepared {
            id,
            name: Bytes::from(format!("{NAME_PREFIX}{id}")),
            query: key.0.clone(),
            param_types: key.1.clone(),
            epoch,
            validated: AtomicBool::new(false),
            described: std::sync::OnceLock::new(),
            routing: Routing::default(),
            settings: std::sync::OnceLock::new(),
        });
        if map.len() < MAX_SHARED {
            map.insert(key, p.clone());
        }
        p
    }
}

/// How a simple-protocol statement touches the router's statement namespace (`sg_...`).
#[derive(Debug, PartialEq, Eq)]
pub enum ReservedUse {
    /// `PREPARE sg_...`: the name would collide with the router's.
    Prepare(String),
    /// `EXECUTE sg_...` or `DEALLOCATE sg_...`: another session's statement.
    Reference(String),
}

/// Recognizes SQL-level PREPARE/EXECUTE/DEALLOCATE of a name in the router's namespace
/// (a single statement; case-insensitive as unquoted SQL names are).
pub fn reserved_use(sql: &str) -> Option<ReservedUse> {
    // Fast exit without allocating unless the statement can be one of the three.
    let first = sql.trim_start().as_bytes().first()?.to_ascii_lowercase();
    if !matches!(first, b'p' | b'e' | b'd') {
        return None;
    }
    let s = sql.trim().trim_end_matches(';').trim();
    let mut words = s.split(|c: char| c.is_whitespace() || c == '(');
    let first = words.next()?.to_ascii_lowercase();
    let mut name = words.find(|w| !w.is_empty())?;
    if first == "deallocate" && name.eq_ignore_ascii_case("prepare") {
        name = words.find(|w| !w.is_empty())?;
    }
    let bare = name.trim_matches('"');
    if !bare.to_ascii_lowercase().starts_with("sg_") {
        return None;
    }
    match first.as_str() {
        "prepare" => Some(ReservedUse::Prepare(bare.to_owned())),
        "execute" | "deallocate" => Some(ReservedUse::Reference(bare.to_owned())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::{ReservedUse, reserved_use};

    #[test]
    fn reserved_names() {
        assert_eq!(
            reserved_use("PREPARE sg_1(int) AS SELECT $1"),
            Some(ReservedUse::Prepare("sg_1".into()))
        );
        assert_eq!(
            reserved_use("execute SG_7"),
            Some(ReservedUse::Reference("SG_7".into()))
        );
        assert_eq!(
            reserved_use("DEALLOCATE PREPARE sg_2;"),
            Some(ReservedUse::Reference("sg_2".into()))
        );
        assert_eq!(reserved_use("PREPARE mine AS SELECT 1"), None);
        assert_eq!(reserved_use("SELECT 'sg_1'"), None);
    }

    #[test]
    fn same_text_same_statement() {
        let r = super::PreparedRegistry::default();
        let a = r.intern_in(b"select $1", &[0, 0], 0);
        let b = r.intern_in(b"select $1", &[0, 0], 0);
        let c = r.intern_in(b"select $1", &[0, 1, 0, 0, 0, 23], 0);
        assert_eq!(a.id, b.id);
        assert_ne!(a.id, c.id);
        assert_eq!(&a.name[..], format!("sg_{}", a.id).as_bytes());
    }
}
