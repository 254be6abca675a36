//! The plugin host: one wasmtime `Engine` per process, components compiled once
//! (precompiled artifacts cached on disk by content hash), one `InstancePre` per plugin
//! version, instances reused across calls. Every call runs under a CPU deadline (epoch
//! interruption, a ticker thread that stops on `Drop`) and a memory cap (`StoreLimits`);
//! a trap, a timeout or too much memory fails that call, never the router.
//!
//! Plugin ABI (WIT, in `wit/`): `shardgate:distribution@0.1.0` (world `distribution`).
//! A component whose world the host does not know is refused by name.

mod distribution;
mod error;

pub use distribution::{DistributionPlugin, ShardScheme, Value, ValueType};
pub use error::PluginError;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Engine, Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

/// The plugins that ship with the router, built by `build.rs` from `plugins/`.
pub mod builtin {
    /// `hash-citus`, the default distribution function.
    pub const HASH_CITUS: &[u8] = include_bytes!(env!("SHARDGATE_PLUGIN_HASH_CITUS"));
    /// `hash-pg-partition`.
    pub const HASH_PG_PARTITION: &[u8] = include_bytes!(env!("SHARDGATE_PLUGIN_HASH_PG_PARTITION"));
    /// A plugin that misbehaves on request, for the host's tests (not embedded).
    pub const TEST_MISBEHAVE_PATH: &str = env!("SHARDGATE_PLUGIN_TEST_MISBEHAVE");
}

/// How often the epoch advances: the granularity of call deadlines.
const EPOCH_TICK: Duration = Duration::from_millis(1);

/// Limits for every call into a plugin.
#[derive(Clone, Debug)]
pub struct Limits {
    pub call_timeout: Duration,
    pub memory_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            call_timeout: Duration::from_millis(50),
            memory_bytes: 16 << 20,
        }
    }
}

/// What a plugin's store carries: a WASI context with no capabilities (no files, no
/// network, no environment) and the memory limits.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

pub struct PluginHost {
    engine: Engine,
    linker: Linker<HostState>,
    cache_dir: Option<PathBuf>,
    limits: Limits,
    /// Kept for its Drop: stops the epoch thread with the host.
    _ticker: Ticker,
}

/// Advances the engine's epoch; stops when dropped.
struct Ticker {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl PluginHost {
    /// `cache_dir`: where compiled components are kept between runs (None: compile
    /// on every load).
    pub fn new(cache_dir: Option<PathBuf>, limits: Limits) -> Result<PluginHost, PluginError> {
        let refused = |e: wasmtime::Error| PluginError::Refused {
            name: "<engine>".into(),
            reason: e.to_string(),
        };
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        // Plugin calls are short synchronous calls: without the component-model
        // concurrency machinery a call costs a fraction (measured in BENCHMARKS.md).
        config.concurrency_support(false);
        let engine = Engine::new(&config).map_err(refused)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(refused)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let engine = engine.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("shardgate-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        engine.increment_epoch();
                    }
                })
                .map_err(|e| PluginError::Refused {
                    name: "<engine>".into(),
                    reason: e.to_string(),
                })?
        };
        if let Some(d) = &cache_dir {
            let _ = std::fs::create_dir_all(d);
        }
        Ok(PluginHost {
            engine,
            linker,
            cache_dir,
            limits,
            _ticker: Ticker {
                stop,
                thread: Some(thread),
            },
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub(crate) fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Epoch ticks for one call.
    pub(crate) fn deadline_ticks(&self) -> u64 {
        (self.limits.call_timeout.as_micros() / EPOCH_TICK.as_micros()).max(1) as u64
    }

    /// Compiles a component, or loads it from the cache when this exact build (content
    /// hash) was compiled before by a compatible engine.
    pub(crate) fn compile(&self, name: &str, bytes: &[u8]) -> Result<Component, PluginError> {
        use std::hash::{Hash, Hasher};
        let refused = |e: wasmtime::Error| PluginError::Refused {
            name: name.to_owned(),
            reason: format!("{e:#}"),
        };
        let Some(dir) = &self.cache_dir else {
            return Component::new(&self.engine, bytes).map_err(refused);
        };
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut h);
        let path = dir.join(format!("{}-{:016x}.cwasm", content_hash(bytes), h.finish()));
        if path.is_file() {
            // SAFETY: the file was written by `precompile_component` of an engine with
            // the same compatibility hash, in a directory the router owns.
            if let Ok(c) = unsafe { Component::deserialize_file(&self.engine, &path) } {
                return Ok(c);
            }
        }
        let compiled = self.engine.precompile_component(bytes).map_err(refused)?;
        let tmp = path.with_extension("tmp");
        if std::fs::write(&tmp, &compiled).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
        // SAFETY: bytes just produced by `precompile_component` of this engine.
        unsafe { Component::deserialize(&self.engine, &compiled) }.map_err(refused)
    }

    pub(crate) fn linker(&self) -> &Linker<HostState> {
        &self.linker
    }

    /// Loads a distribution plugin from a component's bytes.
    pub fn load_distribution_bytes(
        &self,
        name: &str,
        bytes: &[u8],
    ) -> Result<DistributionPlugin, PluginError> {
        DistributionPlugin::load(self, name, bytes)
    }

    /// Loads a distribution plugin from a file.
    pub fn load_distribution(&self, path: &Path) -> Result<DistributionPlugin, PluginError> {
        let bytes = std::fs::read(path).map_err(|source| PluginError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().replace('_', "-"))
            .unwrap_or_default();
        DistributionPlugin::load(self, &name, &bytes)
    }
}

/// A fresh store for one instance: no WASI capabilities, memory capped, traps at the
/// epoch deadline.
pub(crate) fn new_store(engine: &Engine, limits: &Limits) -> Store<HostState> {
    let state = HostState {
        wasi: WasiCtx::builder().build(),
        table: ResourceTable::new(),
        limits: StoreLimitsBuilder::new()
            .memory_size(limits.memory_bytes)
            .instances(4)
            .tables(8)
            .memories(2)
            .trap_on_grow_failure(true)
            .build(),
    };
    let mut store = Store::new(engine, state);
    store.limiter(|s| &mut s.limits);
    store.epoch_deadline_trap();
    store
}

/// SHA-256 of a plugin's bytes, hex: the version a colocation group records.
pub fn content_hash(bytes: &[u8]) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(bytes);
    d.iter().map(|b| format!("{b:02x}")).collect()
}
