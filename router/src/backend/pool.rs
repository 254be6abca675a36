//! Pools of backend connections, one per (node, database, user). A session borrows a
//! connection as a `Lease` for a transaction (transaction pooling) or for its whole
//! life (session pooling). A lease that is dropped without `release` closes its
//! connection: only a connection known to be clean goes back to the pool.

use super::{BackendConn, BackendError, Login, PoolError};
use crate::metrics::Metrics;
use crate::protocol::TxnStatus;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// A backend connection per transaction (default).
    Transaction,
    /// A backend connection per client connection.
    Session,
}

#[derive(Clone, Debug)]
pub struct PoolSettings {
    /// Most connections open at once to the node for this (database, user).
    pub size: usize,
    /// How long a session waits for a free connection before it gets an error.
    pub acquire_timeout: Duration,
    /// Idle connections older than this are closed instead of lent.
    pub idle_timeout: Duration,
    /// Connections are closed once this old, when they come back idle.
    pub max_lifetime: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub node: String,
    pub database: String,
    pub user: String,
}

pub struct Pool {
    login: Login,
    settings: PoolSettings,
    /// Idle connections, most recently used last (lent LIFO so the rest can age out).
    idle: Mutex<Vec<BackendConn>>,
    /// One permit per connection that may exist; a lease holds one.
    permits: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    /// Label-resolved gauges (idle, active) for this pool's node.
    idle_gauge: prometheus::IntGauge,
    active_gauge: prometheus::IntGauge,
}

impl Pool {
    pub fn new(login: Login, settings: PoolSettings, metrics: Arc<Metrics>) -> Arc<Pool> {
        Arc::new(Pool {
            idle_gauge: metrics
                .pool_connections
                .with_label_values(&[&login.node, "idle"]),
            active_gauge: metrics
                .pool_connections
                .with_label_values(&[&login.node, "active"]),
            permits: Arc::new(Semaphore::new(settings.size)),
            login,
            settings,
            idle: Mutex::new(Vec::new()),
            metrics,
        })
    }

    /// Borrows a connection: an idle one if any is healthy, else a new one, waiting at
    /// most `acquire_timeout` for a free slot. Cancel-safe: nothing is lost when the
    /// future is dropped (a connection being opened is closed).
    pub async fn acquire(self: &Arc<Self>) -> Result<Lease, PoolError> {
        let start = Instant::now();
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(tokio::sync::TryAcquireError::Closed) => return Err(PoolError::Closed),
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                let waited = tokio::time::timeout(
                    self.settings.acquire_timeout,
                    self.permits.clone().acquire_owned(),
                )
                .await;
                self.metrics
                    .pool_wait_seconds
                    .with_label_values(&[&self.login.node])
                    .observe(start.elapsed().as_secs_f64());
                match waited {
                    Ok(Ok(p)) => p,
                    Ok(Err(_)) => return Err(PoolError::Closed),
                    Err(_) => {
                        return Err(PoolError::Timeout {
                            node: self.login.node.clone(),
                            waited_ms: self.settings.acquire_timeout.as_millis() as u64,
                        });
                    }
                }
            }
        };
        loop {
            let candidate = self.idle.lock().pop();
            let Some(mut conn) = candidate else { break };
            self.idle_gauge.add(-1);
            if conn.last_used.elapsed() < self.settings.idle_timeout && conn.idle_healthy() {
                self.active_gauge.add(1);
                return Ok(Lease {
                    conn: Some(conn),
                    pool: self.clone(),
                    _permit: permit,
                });
            }
            tokio::spawn(conn.terminate());
        }
        // Boxed: opening a connection has a large state; an idle session should not carry it.
        let conn = Box::pin(BackendConn::connect(&self.login)).await.inspect_err(|e| {
            if !matches!(e, BackendError::Rejected(_)) {
                tracing::warn!(node = %self.login.node, error = %e, "backend connection failed");
            }
        })?;
        self.metrics
            .backend_connects
            .with_label_values(&[&self.login.node])
            .inc();
        self.active_gauge.add(1);
        Ok(Lease {
            conn: Some(conn),
            pool: self.clone(),
            _permit: permit,
        })
    }

    fn put_back(&self, mut conn: BackendConn) {
        conn.last_used = Instant::now();
        if conn.created.elapsed() >= self.settings.max_lifetime || self.permits.is_closed() {
            tokio::spawn(conn.terminate());
            return;
        }
        self.idle.lock().push(conn);
        self.idle_gauge.add(1);
    }

    /// Closes idle connections and refuses new leases (shutdown).
    pub fn close(&self) {
        self.permits.close();
        let idle: Vec<_> = std::mem::take(&mut *self.idle.lock());
        self.idle_gauge.add(-(idle.len() as i64));
        for c in idle {
            tokio::spawn(c.terminate());
        }
    }

    /// Closes idle connections that have sat longer than `idle_timeout`.
    pub fn reap_idle(&self) {
        let expired: Vec<_> = {
            let mut idle = self.idle.lock();
            let (keep, drop): (Vec<_>, Vec<_>) = std::mem::take(&mut *idle)
                .into_iter()
                .partition(|c| c.last_used.elapsed() < self.settings.idle_timeout);
            *idle = keep;
            drop
        };
        self.idle_gauge.add(-(expired.len() as i64));
        for c in expired {
            tokio::spawn(c.terminate());
        }
    }
}

/// A borrowed backend connection.
pub struct Lease {
    conn: Option<BackendConn>,
    pool: Arc<Pool>,
    _permit: OwnedSemaphorePermit,
}

impl Lease {
    pub fn conn(&mut self) -> &mut BackendConn {
        self.conn
            .as_mut()
            .expect("lease holds a connection until released")
    }

    /// Gives a clean connection back to the pool. A connection in a transaction or
    /// with unread bytes is closed instead: the next client must never inherit state.
    pub fn release(mut self) {
        let conn = self.conn.take().expect("lease holds a connection");
        self.pool.active_gauge.add(-1);
        let mut conn = conn;
        if conn.rbuf.is_empty() && conn.rbuf.capacity() > 1 << 20 {
            // Grown for one large message: give the memory back.
            conn.rbuf = bytes::BytesMut::with_capacity(16 * 1024);
        }
        if conn.status == TxnStatus::Idle && conn.rbuf.is_empty() {
            self.pool.put_back(conn);
        } else {
            tokio::spawn(conn.terminate());
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            // Dropped without release: its state is unknown, so it is not reused.
            self.pool.active_gauge.add(-1);
            self.pool
                .metrics
                .backend_discards
                .with_label_values(&[&self.pool.login.node])
                .inc();
            drop(conn);
        }
    }
}

/// All pools of one router, created on first use.
pub struct Pools {
    pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
}

impl Default for Pools {
    fn default() -> Self {
        Self::new()
    }
}

impl Pools {
    pub fn new() -> Self {
        Pools {
            pools: Mutex::new(HashMap::new()),
        }
    }

    pub fn get_or_create(&self, key: PoolKey, make: impl FnOnce() -> Arc<Pool>) -> Arc<Pool> {
        self.pools.lock().entry(key).or_insert_with(make).clone()
    }

    pub fn all(&self) -> Vec<Arc<Pool>> {
        self.pools.lock().values().cloned().collect()
    }
}
