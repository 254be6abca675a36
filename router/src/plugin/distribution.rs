//! Distribution plugins (`shardgate:distribution@0.1.0`): value -> hash -> shard.

use super::{HostState, PluginError, PluginHost};
use parking_lot::Mutex;
use wasmtime::Store;

mod bindings {
    wasmtime::component::bindgen!({
        world: "distribution",
        path: "../wit/distribution",
    });
}

use bindings::exports::shardgate::distribution::hasher;
pub use hasher::{ShardScheme, Value, ValueType};

/// Instances kept for reuse (more are created under concurrency, then dropped).
const MAX_IDLE_INSTANCES: usize = 32;

struct Slot {
    store: Store<HostState>,
    instance: bindings::Distribution,
}

/// A loaded distribution plugin. Calls take a pooled instance; an instance that
/// trapped or timed out is thrown away.
pub struct DistributionPlugin {
    /// The name it was loaded under (file name), for errors before it names itself.
    load_name: String,
    content_hash: String,
    limits: super::Limits,
    engine: wasmtime::Engine,
    deadline_ticks: u64,
    pre: bindings::DistributionPre<HostState>,
    idle: Mutex<Vec<Slot>>,
    scheme: ShardScheme,
    supported: Vec<ValueType>,
    plugin_name: String,
}

impl std::fmt::Debug for DistributionPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DistributionPlugin")
            .field("name", &self.plugin_name)
            .field("content_hash", &self.content_hash)
            .field("scheme", &self.scheme)
            .finish_non_exhaustive()
    }
}

impl DistributionPlugin {
    pub(super) fn load(host: &PluginHost, name: &str, bytes: &[u8]) -> Result<Self, PluginError> {
        let component = host.compile(name, bytes)?;
        let refused = |e: wasmtime::Error| PluginError::Refused {
            name: name.to_owned(),
            reason: format!("{e:#}"),
        };
        let instance_pre = host.linker().instantiate_pre(&component).map_err(refused)?;
        // Checks that the component exports the distribution world's interface.
        let pre =
            bindings::DistributionPre::new(instance_pre).map_err(|e| PluginError::Refused {
                name: name.to_owned(),
                reason: format!("not a shardgate:distribution@0.1.0 component: {e:#}"),
            })?;
        let mut plugin = DistributionPlugin {
            load_name: name.to_owned(),
            content_hash: super::content_hash(bytes),
            limits: host.limits().clone(),
            engine: host.engine().clone(),
            deadline_ticks: host.deadline_ticks(),
            pre,
            idle: Mutex::new(Vec::new()),
            scheme: ShardScheme::HashRanges,
            supported: Vec::new(),
            plugin_name: String::new(),
        };
        // Ask the plugin who it is; this also proves it instantiates and answers.
        let (plugin_name, scheme, supported) = plugin.with_instance(|store, inst| {
            let h = inst.shardgate_distribution_hasher();
            Ok((
                h.call_name(&mut *store)?,
                h.call_scheme(&mut *store)?,
                h.call_supported_types(&mut *store)?,
            ))
        })?;
        plugin.plugin_name = plugin_name;
        plugin.scheme = scheme;
        plugin.supported = supported;
        Ok(plugin)
    }

    /// The name the plugin gives itself (`hash-citus`, ...).
    pub fn name(&self) -> &str {
        &self.plugin_name
    }

    /// SHA-256 of the component's bytes.
    pub fn content_hash(&self) -> &str {
        &self.content_hash
    }

    pub fn scheme(&self) -> ShardScheme {
        self.scheme
    }

    pub fn supports(&self, t: ValueType) -> bool {
        self.supported.contains(&t)
    }

    /// The hash of one value.
    pub fn hash(&self, v: &Value) -> Result<i64, PluginError> {
        match self
            .with_instance(|store, inst| inst.shardgate_distribution_hasher().call_hash(store, v))?
        {
            Ok(h) => Ok(h),
            Err(hasher::HashError::Unsupported(m) | hasher::HashError::Invalid(m)) => {
                Err(PluginError::Rejected {
                    name: self.plugin_name.clone(),
                    message: m,
                })
            }
        }
    }

    /// The shard (0-based) a value belongs to among `shard_count`.
    pub fn shard_index(&self, v: &Value, shard_count: u32) -> Result<u32, PluginError> {
        if shard_count == 0 {
            return Err(PluginError::Invalid {
                name: self.plugin_name.clone(),
                reason: "shard count 0".into(),
            });
        }
        let h = self.hash(v)?;
        Ok(match self.scheme {
            ShardScheme::HashRanges => {
                let h = i32::try_from(h).map_err(|_| PluginError::Invalid {
                    name: self.plugin_name.clone(),
                    reason: format!("hash {h} is outside int32 for the hash-ranges scheme"),
                })?;
                let increment = (1u64 << 32) / shard_count as u64;
                let offset = (h as i64 - i32::MIN as i64) as u64;
                ((offset / increment) as u32).min(shard_count - 1)
            }
            ShardScheme::Modulo => ((h as u64) % shard_count as u64) as u32,
        })
    }

    /// Runs `f` on a pooled instance under the deadline and memory cap.
    fn with_instance<R>(
        &self,
        f: impl FnOnce(&mut Store<HostState>, &bindings::Distribution) -> wasmtime::Result<R>,
    ) -> Result<R, PluginError> {
        let slot = self.idle.lock().pop();
        let mut slot = match slot {
            Some(s) => s,
            None => {
                let mut store = super::new_store(&self.engine, &self.limits);
                store.set_epoch_deadline(self.deadline_ticks);
                let instance = self
                    .pre
                    .instantiate(&mut store)
                    .map_err(|e| self.classify(e))?;
                Slot { store, instance }
            }
        };
        slot.store.set_epoch_deadline(self.deadline_ticks);
        match f(&mut slot.store, &slot.instance) {
            Ok(r) => {
                let mut idle = self.idle.lock();
                if idle.len() < MAX_IDLE_INSTANCES {
                    idle.push(slot);
                }
                Ok(r)
            }
            // The instance's state is unknown after a trap: it is dropped.
            Err(e) => Err(self.classify(e)),
        }
    }

    fn classify(&self, e: wasmtime::Error) -> PluginError {
        let name = if self.plugin_name.is_empty() {
            self.load_name.clone()
        } else {
            self.plugin_name.clone()
        };
        match e.downcast_ref::<wasmtime::Trap>() {
            Some(wasmtime::Trap::Interrupt) => PluginError::Timeout {
                name,
                limit_ms: self.limits.call_timeout.as_millis() as u64,
            },
            _ if format!("{e:#}").contains("memory") && format!("{e:#}").contains("limit") => {
                PluginError::OutOfMemory {
                    name,
                    limit_bytes: self.limits.memory_bytes,
                }
            }
            _ => PluginError::Trap {
                name,
                detail: format!("{e:#}"),
            },
        }
    }
}
