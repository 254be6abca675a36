//! Distribution plugins (`shardgate:distribution@0.1.0`): value -> hash -> shard.

use super::instances::{InstancePool, impl_instantiate};
use super::{PluginError, PluginHost};
use wasmtime::component::InstancePre;

mod bindings {
    wasmtime::component::bindgen!({
        world: "distribution",
        path: "../wit/distribution",
        additional_derives: [PartialEq],
    });
}

use bindings::exports::shardgate::distribution::hasher;
pub use hasher::{ShardScheme, Value, ValueType};

/// The interface a component of this world exports.
pub(super) const INTERFACE: &str = "shardgate:distribution/hasher@0.1.0";

/// The world this module loads.
pub const WORLD: &str = "shardgate:distribution@0.1.0";

impl_instantiate!(
    bindings::DistributionPre<super::HostState>,
    bindings::Distribution
);

/// A loaded distribution plugin. Calls take a pooled instance; an instance that
/// trapped or timed out is thrown away.
pub struct DistributionPlugin {
    content_hash: String,
    pool: InstancePool<bindings::DistributionPre<super::HostState>>,
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
        let instance_pre =
            host.linker()
                .instantiate_pre(&component)
                .map_err(|e| PluginError::Refused {
                    name: name.to_owned(),
                    reason: format!("{e:#}"),
                })?;
        Self::from_pre(host, name, bytes, instance_pre)
    }

    /// Loads from a pre-instantiated component; refused if it does not export the
    /// distribution world's interface.
    pub(super) fn from_pre(
        host: &PluginHost,
        name: &str,
        bytes: &[u8],
        instance_pre: InstancePre<super::HostState>,
    ) -> Result<Self, PluginError> {
        let pre =
            bindings::DistributionPre::new(instance_pre).map_err(|e| PluginError::Refused {
                name: name.to_owned(),
                reason: format!("not a {WORLD} component: {e:#}"),
            })?;
        let mut plugin = DistributionPlugin {
            content_hash: super::content_hash(bytes),
            pool: InstancePool::new(host, pre),
            scheme: ShardScheme::HashRanges,
            supported: Vec::new(),
            plugin_name: String::new(),
        };
        // Ask the plugin who it is; this also proves it instantiates and answers.
        let (plugin_name, scheme, supported) = plugin.pool.call(name, |store, inst| {
            let h = inst.shardgate_distribution_hasher();
            Ok((
                h.call_name(&mut *store)?,
                h.call_scheme(&mut *store)?,
                h.call_supported_types(&mut *store)?,
            ))
        })?;
        if plugin_name.is_empty() {
            return Err(PluginError::Refused {
                name: name.to_owned(),
                reason: "the plugin names itself \"\"".into(),
            });
        }
        plugin
            .pool
            .set_metrics(host.metrics().map(|m| m.for_plugin(&plugin_name)));
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

    /// The column types the plugin hashes.
    pub fn supported_types(&self) -> &[ValueType] {
        &self.supported
    }

    /// The hash of one value.
    pub fn hash(&self, v: &Value) -> Result<i64, PluginError> {
        match self.pool.call(&self.plugin_name, |store, inst| {
            inst.shardgate_distribution_hasher().call_hash(store, v)
        })? {
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
                let h = i32::try_from(h).map_err(|_| {
                    if let Some(m) = self.pool.metrics() {
                        m.invalid_answer();
                    }
                    PluginError::Invalid {
                        name: self.plugin_name.clone(),
                        reason: format!("hash {h} is outside int32 for the hash-ranges scheme"),
                    }
                })?;
                let increment = (1u64 << 32) / shard_count as u64;
                let offset = (h as i64 - i32::MIN as i64) as u64;
                ((offset / increment) as u32).min(shard_count - 1)
            }
            ShardScheme::Modulo => ((h as u64) % shard_count as u64) as u32,
        })
    }
}
