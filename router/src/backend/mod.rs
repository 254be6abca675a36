//! Connections to Postgres nodes and the pools that lend them to sessions.

mod conn;
pub mod control;
mod error;
mod pool;

pub use conn::{BackendConn, Login, MAX_BACKEND_MESSAGE, cancel_backend, stored_md5};
pub use error::{BackendError, PoolError};
pub use pool::{Lease, Pool, PoolKey, PoolMode, PoolSettings, Pools};
