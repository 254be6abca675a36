//! The instance pool shared by every plugin kind: instances of one `InstancePre`
//! reused across calls, each call under the CPU deadline and the memory cap, failures
//! classified (timeout, out of memory, trap), and the per-plugin call metrics.

use super::metrics::CallMetrics;
use super::{HostState, Limits, PluginError, PluginHost};
use parking_lot::Mutex;
use std::time::Instant;
use wasmtime::{Engine, Store};

/// Instances kept for reuse (more are created under concurrency, then dropped).
const MAX_IDLE_INSTANCES: usize = 32;

/// A world's pre-instantiated component (`XxxPre<HostState>` of a `bindgen!`).
pub(super) trait Instantiate: Send + Sync + 'static {
    type Instance: Send + 'static;
    fn instantiate(&self, store: &mut Store<HostState>) -> wasmtime::Result<Self::Instance>;
}

/// Implements [`Instantiate`] for a `bindgen!`-generated `XxxPre`.
macro_rules! impl_instantiate {
    ($pre:ty, $instance:ty) => {
        impl $crate::plugin::instances::Instantiate for $pre {
            type Instance = $instance;
            fn instantiate(
                &self,
                store: &mut ::wasmtime::Store<$crate::plugin::HostState>,
            ) -> ::wasmtime::Result<$instance> {
                <$pre>::instantiate(self, store)
            }
        }
    };
}
pub(super) use impl_instantiate;

struct Slot<T> {
    store: Store<HostState>,
    instance: T,
}

/// Pooled instances of one plugin build.
pub(super) struct InstancePool<P: Instantiate> {
    pre: P,
    engine: Engine,
    limits: Limits,
    deadline_ticks: u64,
    idle: Mutex<Vec<Slot<P::Instance>>>,
    /// Per-plugin counters, resolved once when the plugin has named itself (None: the
    /// host has no metrics, and calls do not read the clock; with metrics, one call in
    /// `TIMING_SAMPLE` reads it).
    metrics: Option<CallMetrics>,
}

impl<P: Instantiate> InstancePool<P> {
    pub(super) fn new(host: &PluginHost, pre: P) -> Self {
        InstancePool {
            pre,
            engine: host.engine().clone(),
            limits: host.limits().clone(),
            deadline_ticks: host.deadline_ticks(),
            idle: Mutex::new(Vec::new()),
            metrics: None,
        }
    }

    pub(super) fn set_metrics(&mut self, metrics: Option<CallMetrics>) {
        self.metrics = metrics;
    }

    pub(super) fn metrics(&self) -> Option<&CallMetrics> {
        self.metrics.as_ref()
    }

    /// Runs `f` on a pooled instance under the deadline and memory cap. `name` names
    /// the plugin in errors. An instance whose call failed is dropped (its state is
    /// unknown after a trap).
    #[inline]
    pub(super) fn call<R>(
        &self,
        name: &str,
        f: impl FnOnce(&mut Store<HostState>, &P::Instance) -> wasmtime::Result<R>,
    ) -> Result<R, PluginError> {
        match &self.metrics {
            None => self.call_inner(name, f),
            Some(m) if m.timed() => {
                let start = Instant::now();
                let r = self.call_inner(name, f);
                m.record_timed(start.elapsed(), r.as_ref().err());
                r
            }
            Some(m) => {
                let r = self.call_inner(name, f);
                m.record(r.as_ref().err());
                r
            }
        }
    }

    fn call_inner<R>(
        &self,
        name: &str,
        f: impl FnOnce(&mut Store<HostState>, &P::Instance) -> wasmtime::Result<R>,
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
                    .map_err(|e| self.classify(name, e))?;
                Slot { store, instance }
            }
        };
        slot.store.set_epoch_deadline(self.deadline_ticks);
        // A host function that panics (WASI I/O such as a write to stderr needs a
        // runtime it may not block on here) fails the call, not the router's task.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            f(&mut slot.store, &slot.instance)
        }))
        .unwrap_or_else(|_| {
            Err(wasmtime::Error::msg(
                "the plugin called a host interface that plugins cannot use here (WASI I/O)",
            ))
        });
        match r {
            Ok(r) => {
                let mut idle = self.idle.lock();
                if idle.len() < MAX_IDLE_INSTANCES {
                    idle.push(slot);
                }
                Ok(r)
            }
            Err(e) => Err(self.classify(name, e)),
        }
    }

    fn classify(&self, name: &str, e: wasmtime::Error) -> PluginError {
        let name = name.to_owned();
        if let Some(wasmtime::Trap::Interrupt) = e.downcast_ref::<wasmtime::Trap>() {
            return PluginError::Timeout {
                name,
                limit_ms: self.limits.call_timeout.as_millis() as u64,
            };
        }
        let detail = format!("{e:#}");
        // StoreLimits with trap_on_grow_failure: "forcing trap when growing memory".
        if detail.contains("growing memory")
            || (detail.contains("memory") && detail.contains("limit"))
        {
            PluginError::OutOfMemory {
                name,
                limit_bytes: self.limits.memory_bytes,
            }
        } else {
            PluginError::Trap { name, detail }
        }
    }
}
