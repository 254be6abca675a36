//! The plan cache: bounded, least recently used out first. Keyed by statement text
//! and parameter types; every entry carries the (catalog version, planner generation)
//! it was made under, and an entry made under another stamp is a miss.
//!
//! One lock for all sessions: a hit is a hash of the text, one probe and a clone of an
//! `Arc`. Eviction, when full, drops the least recently used eighth in one go, so its
//! cost is spread over many inserts.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};

struct Slot<V> {
    text: Box<str>,
    types: Box<[u32]>,
    stamp: (i64, u64),
    value: V,
    used: u64,
}

struct Inner<V> {
    /// Hash of (text, types) -> the entries with that hash.
    map: HashMap<u64, Vec<Slot<V>>>,
    len: usize,
    clock: u64,
}

pub struct PlanCache<V> {
    capacity: usize,
    hasher: std::collections::hash_map::RandomState,
    inner: Mutex<Inner<V>>,
}

impl<V: Clone> PlanCache<V> {
    pub fn new(capacity: usize) -> Self {
        PlanCache {
            capacity: capacity.max(1),
            hasher: Default::default(),
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                len: 0,
                clock: 0,
            }),
        }
    }

    fn key(&self, text: &str, types: &[u32]) -> u64 {
        let mut h = self.hasher.build_hasher();
        h.write(text.as_bytes());
        for t in types {
            h.write_u32(*t);
        }
        h.finish()
    }

    pub fn len(&self) -> usize {
        self.inner.lock().len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The value for (text, types) made under `stamp`.
    pub fn get(&self, text: &str, types: &[u32], stamp: (i64, u64)) -> Option<V> {
        let k = self.key(text, types);
        let mut inner = self.inner.lock();
        inner.clock += 1;
        let now = inner.clock;
        let slot = inner
            .map
            .get_mut(&k)?
            .iter_mut()
            .find(|s| &*s.text == text && &*s.types == types && s.stamp == stamp)?;
        slot.used = now;
        Some(slot.value.clone())
    }

    /// Keeps `value` for (text, types) under `stamp`, replacing an older stamp's.
    pub fn put(&self, text: &str, types: &[u32], stamp: (i64, u64), value: V) {
        let k = self.key(text, types);
        let mut inner = self.inner.lock();
        inner.clock += 1;
        let now = inner.clock;
        let bucket = inner.map.entry(k).or_default();
        if let Some(s) = bucket
            .iter_mut()
            .find(|s| &*s.text == text && &*s.types == types)
        {
            s.stamp = stamp;
            s.value = value;
            s.used = now;
            return;
        }
        bucket.push(Slot {
            text: text.into(),
            types: types.into(),
            stamp,
            value,
            used: now,
        });
        inner.len += 1;
        if inner.len > self.capacity {
            self.evict(&mut inner);
        }
    }

    /// Drops the least recently used eighth (at least one entry).
    fn evict(&self, inner: &mut Inner<V>) {
        let drop_n = (self.capacity / 8).max(1);
        let mut ages: Vec<u64> = inner
            .map
            .values()
            .flat_map(|b| b.iter().map(|s| s.used))
            .collect();
        let cut_at = drop_n.min(ages.len()) - 1;
        let (_, cut, _) = ages.select_nth_unstable(cut_at);
        let cut = *cut;
        let mut removed = 0;
        inner.map.retain(|_, b| {
            let before = b.len();
            b.retain(|s| s.used > cut);
            removed += before - b.len();
            !b.is_empty()
        });
        inner.len -= removed;
    }
}

#[cfg(test)]
mod tests {
    use super::PlanCache;

    #[test]
    fn hits_misses_stamps_and_eviction() {
        let c = PlanCache::new(16);
        assert_eq!(c.get("a", &[], (1, 1)), None::<u32>);
        c.put("a", &[], (1, 1), 7);
        assert_eq!(c.get("a", &[], (1, 1)), Some(7));
        assert_eq!(c.get("a", &[23], (1, 1)), None);
        assert_eq!(c.get("a", &[], (2, 1)), None, "another catalog version");
        assert_eq!(c.get("a", &[], (1, 2)), None, "another planner generation");
        c.put("a", &[], (2, 1), 8);
        assert_eq!(c.len(), 1);
        for i in 0..100 {
            c.put(&format!("s{i}"), &[], (2, 1), i);
            // "a" stays hot.
            assert_eq!(c.get("a", &[], (2, 1)), Some(8));
        }
        assert!(c.len() <= 16, "{}", c.len());
        assert_eq!(c.get("s99", &[], (2, 1)), Some(99));
        assert_eq!(c.get("s0", &[], (2, 1)), None);
    }
}
