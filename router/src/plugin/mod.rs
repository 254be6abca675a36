//! The plugin host: one wasmtime `Engine` per process, components compiled once
//! (precompiled artifacts cached on disk by content hash), one `InstancePre` per plugin
//! version, instances reused across calls. Every call runs under a CPU deadline (epoch
//! interruption, a ticker thread that stops on `Drop`) and a memory cap (`StoreLimits`);
//! a trap, a timeout or too much memory fails that call, never the router.
//!
//! Plugin ABI (WIT, in `wit/`): `shardgate:distribution@0.1.0` (world `distribution`),
//! `shardgate:placement@0.1.0` (world `placement`) and `shardgate:planner@0.1.0` (world
//! `planner-tier`). A component whose world the host
//! does not know is refused by name. The loaded set of plugins, and its reload, live in
//! [`registry`]; see `README.md` beside this file.

mod distribution;
mod error;
mod instances;
mod metrics;
mod placement;
mod planner;
mod registry;

pub use distribution::{DistributionPlugin, ShardScheme, Value, ValueType};
pub use error::PluginError;
pub use metrics::{PluginMetrics, TIMING_SAMPLE, short_hash};
pub use placement::{
    NodeStats, PlacementNode, PlacementPlugin, ShardMove, ShardPlacement, validate_isolation,
    validate_moves, validate_placement,
};
pub use planner::{
    Combiner, LimitMerge, Literal, MergeKind, PlanOutcome, PlanTarget, PlanTemplate, PlannerPlugin,
    PlannerTable, PlannerTableKind, ShardKey, SortKey, validate_plan,
};
pub use registry::{
    Loaded, PluginRegistry, PluginSet, PluginSource, ReloadEntry, ReloadLine, ReloadOutcome,
    ReloadReport,
};

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
    /// `placement-default`, the default placement plugin.
    pub const PLACEMENT_DEFAULT: &[u8] = include_bytes!(env!("SHARDGATE_PLUGIN_PLACEMENT_DEFAULT"));
    /// `planner-fastpath`, the fast-path planner tier (one statement, one distributed
    /// table, the shard pinned by equality on the distribution column).
    pub const PLANNER_FASTPATH: &[u8] = include_bytes!(env!("SHARDGATE_PLUGIN_PLANNER_FASTPATH"));
    /// `planner-router`, the router planner tier (one statement, its distributed tables
    /// colocated and all pinned to one distribution value; or reference tables only).
    pub const PLANNER_ROUTER: &[u8] = include_bytes!(env!("SHARDGATE_PLUGIN_PLANNER_ROUTER"));
    /// `planner-pushdown`, the logical pushdown tier (for now: a row-by-row read of
    /// every shard of one distributed table, rows concatenated).
    pub const PLANNER_PUSHDOWN: &[u8] = include_bytes!(env!("SHARDGATE_PLUGIN_PLANNER_PUSHDOWN"));
    /// A plugin that misbehaves on request, for the host's tests (not embedded).
    pub const TEST_MISBEHAVE_PATH: &str = env!("SHARDGATE_PLUGIN_TEST_MISBEHAVE");
    /// A distribution plugin that calls itself `hash-citus` but hashes text
    /// lower-cased, for the reload tests (not embedded).
    pub const TEST_HASH_VARIANT_PATH: &str = env!("SHARDGATE_PLUGIN_TEST_HASH_VARIANT");

    /// The embedded plugins, by the name they give themselves.
    pub const ALL: &[(&str, &[u8])] = &[
        ("hash-citus", HASH_CITUS),
        ("hash-pg-partition", HASH_PG_PARTITION),
        ("placement-default", PLACEMENT_DEFAULT),
        ("planner-fastpath", PLANNER_FASTPATH),
        ("planner-router", PLANNER_ROUTER),
        ("planner-pushdown", PLANNER_PUSHDOWN),
    ];
}

/// The worlds the host loads, for refusals.
pub const KNOWN_WORLDS: &[&str] = &[distribution::WORLD, placement::WORLD, planner::WORLD];

/// A plugin of any world the host knows.
#[derive(Clone, Debug)]
pub enum LoadedPlugin {
    Distribution(Arc<DistributionPlugin>),
    Placement(Arc<PlacementPlugin>),
    Planner(Arc<PlannerPlugin>),
}

impl LoadedPlugin {
    /// The name the plugin gives itself.
    pub fn name(&self) -> &str {
        match self {
            LoadedPlugin::Distribution(p) => p.name(),
            LoadedPlugin::Placement(p) => p.name(),
            LoadedPlugin::Planner(p) => p.name(),
        }
    }

    /// SHA-256 of the component's bytes (hex).
    pub fn content_hash(&self) -> &str {
        match self {
            LoadedPlugin::Distribution(p) => p.content_hash(),
            LoadedPlugin::Placement(p) => p.content_hash(),
            LoadedPlugin::Planner(p) => p.content_hash(),
        }
    }

    /// `distribution`, `placement` or `planner` (the `kind` metric label).
    pub fn kind(&self) -> &'static str {
        match self {
            LoadedPlugin::Distribution(_) => "distribution",
            LoadedPlugin::Placement(_) => "placement",
            LoadedPlugin::Planner(_) => "planner",
        }
    }
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
    /// Where plugins count their calls (None: no metrics, calls do not read the clock).
    metrics: Option<Arc<PluginMetrics>>,
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
            metrics: None,
            _ticker: Ticker {
                stop,
                thread: Some(thread),
            },
        })
    }

    /// Plugins loaded from now on count their calls in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<PluginMetrics>) -> PluginHost {
        self.metrics = Some(metrics);
        self
    }

    pub fn metrics(&self) -> Option<&Arc<PluginMetrics>> {
        self.metrics.as_ref()
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
        // Unique per writer: tests (and routers) may share a cache directory.
        static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let tmp = path.with_extension(format!(
            "{}.{}.tmp",
            std::process::id(),
            WRITES.fetch_add(1, Ordering::Relaxed)
        ));
        if std::fs::write(&tmp, &compiled).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
        // SAFETY: bytes just produced by `precompile_component` of this engine.
        unsafe { Component::deserialize(&self.engine, &compiled) }.map_err(refused)
    }

    pub(crate) fn linker(&self) -> &Linker<HostState> {
        &self.linker
    }

    /// Loads a plugin of any world the host knows from a component's bytes; `name`
    /// (a file name) names it in errors until it names itself. A component that
    /// exports none of the known worlds is refused, with the list of those worlds.
    pub fn load(&self, name: &str, bytes: &[u8]) -> Result<LoadedPlugin, PluginError> {
        let worlds = KNOWN_WORLDS.join(", ");
        let not_ours = |reason: &str| PluginError::Refused {
            name: name.to_owned(),
            reason: format!(
                "not a WebAssembly component of a world the host knows ({worlds}): {}",
                // One line, for a NOTICE or a log line.
                reason.split_whitespace().collect::<Vec<_>>().join(" ")
            ),
        };
        // (wasmtime would also take the text format, and explain at length why junk
        // is not valid text.)
        if !bytes.starts_with(b"\0asm") {
            return Err(not_ours("no WebAssembly header"));
        }
        let component = self.compile(name, bytes).map_err(|e| match e {
            PluginError::Refused { reason, .. } => not_ours(&reason),
            e => e,
        })?;
        let instance_pre =
            self.linker
                .instantiate_pre(&component)
                .map_err(|e| PluginError::Refused {
                    name: name.to_owned(),
                    reason: format!("{e:#}"),
                })?;
        // Which world: by the interface the component exports (then the world's
        // bindings check the types).
        let exports = |interface: &str| component.get_export_index(None, interface).is_some();
        if exports(distribution::INTERFACE) {
            return DistributionPlugin::from_pre(self, name, bytes, instance_pre)
                .map(|p| LoadedPlugin::Distribution(Arc::new(p)));
        }
        if exports(placement::INTERFACE) {
            return PlacementPlugin::from_pre(self, name, bytes, instance_pre)
                .map(|p| LoadedPlugin::Placement(Arc::new(p)));
        }
        if exports(planner::INTERFACE) {
            return PlannerPlugin::from_pre(self, name, bytes, instance_pre)
                .map(|p| LoadedPlugin::Planner(Arc::new(p)));
        }
        Err(PluginError::Refused {
            name: name.to_owned(),
            reason: format!("the component exports none of the worlds the host knows ({worlds})"),
        })
    }

    /// Loads a plugin of any known world from a file (named by its file name until it
    /// names itself).
    pub fn load_file(&self, path: &Path) -> Result<LoadedPlugin, PluginError> {
        let bytes = std::fs::read(path).map_err(|source| PluginError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let name = path
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.load(&name, &bytes)
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
