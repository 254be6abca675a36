//! CancelRequest routing. Each client gets its own (pid, secret) pair; while it holds a
//! backend connection its slot names that backend, so a cancel reaches the query the
//! client is running — and nothing once the connection has gone back to the pool.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

/// Where a client's cancel should go right now: (node address, backend pid, secret).
#[derive(Default)]
pub struct CancelSlot {
    target: Mutex<Option<(SocketAddr, i32, i32)>>,
}

impl CancelSlot {
    pub fn set(&self, target: Option<(SocketAddr, i32, i32)>) {
        *self.target.lock() = target;
    }
    pub fn get(&self) -> Option<(SocketAddr, i32, i32)> {
        *self.target.lock()
    }
}

#[derive(Default)]
pub struct CancelRegistry {
    slots: Mutex<HashMap<i32, (i32, Arc<CancelSlot>)>>,
}

/// Unregisters the client's key when the session ends.
pub struct CancelGuard<'a> {
    registry: &'a CancelRegistry,
    pub pid: i32,
    pub secret: i32,
    pub slot: Arc<CancelSlot>,
}

impl Drop for CancelGuard<'_> {
    fn drop(&mut self) {
        self.registry.slots.lock().remove(&self.pid);
    }
}

impl CancelRegistry {
    pub fn register(&self) -> CancelGuard<'_> {
        let slot = Arc::new(CancelSlot::default());
        let mut slots = self.slots.lock();
        loop {
            let pid = rand::random::<i32>() & 0x7fff_ffff;
            if pid == 0 || slots.contains_key(&pid) {
                continue;
            }
            let secret = rand::random::<i32>();
            slots.insert(pid, (secret, slot.clone()));
            return CancelGuard {
                registry: self,
                pid,
                secret,
                slot,
            };
        }
    }

    /// Every backend a session is running something on right now (shutdown cancels
    /// them when the grace period is over).
    pub fn busy_backends(&self) -> Vec<(SocketAddr, i32, i32)> {
        self.slots
            .lock()
            .values()
            .filter_map(|(_, slot)| slot.get())
            .collect()
    }

    /// The backend to cancel for a client's (pid, secret), if the key is right and the
    /// client is running something.
    pub fn lookup(&self, pid: i32, secret: i32) -> Option<(SocketAddr, i32, i32)> {
        let slots = self.slots.lock();
        let (s, slot) = slots.get(&pid)?;
        if *s != secret {
            return None;
        }
        slot.get()
    }
}
