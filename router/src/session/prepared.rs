//! Prepared statements under transaction pooling. A client's named statement is mapped
//! to a router-wide statement (same query text and parameter types -> same statement,
//! named `sg_<id>`), prepared lazily on whichever backend connection the client borrows.
//! Backends remember which router statements they hold, so a statement is parsed once
//! per backend connection, not once per client.

use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug)]
pub struct Prepared {
    pub id: u64,
    /// The name on backends: `sg_<id>`.
    pub name: Bytes,
    pub query: Bytes,
    /// Parameter count and type OIDs, raw from the client's Parse.
    pub param_types: Bytes,
}

#[derive(Default)]
pub struct PreparedRegistry {
    by_text: Mutex<HashMap<(Bytes, Bytes), Arc<Prepared>>>,
    next: AtomicU64,
}

/// Beyond this many distinct statements the registry stops sharing new ones (each gets
/// a fresh id) so that memory stays bounded by what sessions hold.
const MAX_SHARED: usize = 100_000;

impl PreparedRegistry {
    pub fn intern(&self, query: &[u8], param_types: &[u8]) -> Arc<Prepared> {
        let key = (
            Bytes::copy_from_slice(query),
            Bytes::copy_from_slice(param_types),
        );
        let mut map = self.by_text.lock();
        if let Some(p) = map.get(&key) {
            return p.clone();
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let p = Arc::new(Prepared {
            id,
            name: Bytes::from(format!("sg_{id}")),
            query: key.0.clone(),
            param_types: key.1.clone(),
        });
        if map.len() < MAX_SHARED {
            map.insert(key, p.clone());
        }
        p
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn same_text_same_statement() {
        let r = super::PreparedRegistry::default();
        let a = r.intern(b"select $1", &[0, 0]);
        let b = r.intern(b"select $1", &[0, 0]);
        let c = r.intern(b"select $1", &[0, 1, 0, 0, 0, 23]);
        assert_eq!(a.id, b.id);
        assert_ne!(a.id, c.id);
        assert_eq!(&a.name[..], format!("sg_{}", a.id).as_bytes());
    }
}
