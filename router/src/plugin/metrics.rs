//! Per-plugin Prometheus metrics: calls, call latency, failures by class, invalid
//! answers, swaps, and which build of each plugin is loaded. The only label values are
//! plugin names (the small set an operator installed), plugin kinds and swap results.
//!
//! The call path resolves nothing by label: a plugin keeps its [`CallMetrics`] handles,
//! resolved once at load.

use super::PluginError;
use parking_lot::Mutex;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// One call in this many is timed: reading the clock twice costs ~70 ns on a VM, a
/// quarter of a call, while counting a call costs ~3 ns. The sample is per plugin.
pub const TIMING_SAMPLE: u32 = 8;

/// Buckets of `shardgate_plugin_call_seconds`: 100 ns to 100 ms (a call costs a few
/// hundred ns; the deadline is tens of ms).
const CALL_BUCKETS: &[f64] = &[
    1e-7, 2.5e-7, 5e-7, 1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 1e-3, 1e-2, 1e-1,
];

/// The plugin metrics, registered once per registry.
pub struct PluginMetrics {
    calls: IntCounterVec,
    call_seconds: HistogramVec,
    traps: IntCounterVec,
    timeouts: IntCounterVec,
    out_of_memory: IntCounterVec,
    invalid_answers: IntCounterVec,
    swaps: IntCounterVec,
    loaded_info: IntGaugeVec,
    /// The (kind, version) series of `loaded_info` set per plugin, so that a swap can
    /// remove the old version's series.
    loaded: Mutex<HashMap<String, (String, String)>>,
}

impl std::fmt::Debug for PluginMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginMetrics").finish_non_exhaustive()
    }
}

impl PluginMetrics {
    pub fn new(registry: &Registry) -> Result<PluginMetrics, prometheus::Error> {
        fn counter(
            registry: &Registry,
            name: &str,
            help: &str,
            labels: &[&str],
        ) -> Result<IntCounterVec, prometheus::Error> {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        }
        let call_seconds = HistogramVec::new(
            HistogramOpts::new(
                "shardgate_plugin_call_seconds",
                "Time of a call into a plugin (instance checkout, deadline, call, return); one call in 8 is timed",
            )
            .buckets(CALL_BUCKETS.to_vec()),
            &["plugin"],
        )?;
        registry.register(Box::new(call_seconds.clone()))?;
        let loaded_info = IntGaugeVec::new(
            Opts::new(
                "shardgate_plugin_loaded_info",
                "1 for the build of each plugin that is loaded (version: the first 12 hex digits of its SHA-256)",
            ),
            &["plugin", "kind", "version"],
        )?;
        registry.register(Box::new(loaded_info.clone()))?;
        Ok(PluginMetrics {
            calls: counter(
                registry,
                "shardgate_plugin_calls_total",
                "Calls into a plugin",
                &["plugin"],
            )?,
            call_seconds,
            traps: counter(
                registry,
                "shardgate_plugin_traps_total",
                "Plugin calls that trapped",
                &["plugin"],
            )?,
            timeouts: counter(
                registry,
                "shardgate_plugin_timeouts_total",
                "Plugin calls stopped at their CPU deadline",
                &["plugin"],
            )?,
            out_of_memory: counter(
                registry,
                "shardgate_plugin_out_of_memory_total",
                "Plugin calls stopped at their memory cap",
                &["plugin"],
            )?,
            invalid_answers: counter(
                registry,
                "shardgate_plugin_invalid_answers_total",
                "Plugin answers the host refused as invalid",
                &["plugin"],
            )?,
            swaps: counter(
                registry,
                "shardgate_plugin_swaps_total",
                "New builds of a plugin offered by a reload, by result (accepted, refused)",
                &["plugin", "result"],
            )?,
            loaded_info,
            loaded: Mutex::new(HashMap::new()),
        })
    }

    /// The call handles of one plugin (resolved once, kept by the plugin).
    pub(crate) fn for_plugin(&self, plugin: &str) -> CallMetrics {
        let l = &[plugin];
        CallMetrics {
            calls: self.calls.with_label_values(l),
            seconds: self.call_seconds.with_label_values(l),
            traps: self.traps.with_label_values(l),
            timeouts: self.timeouts.with_label_values(l),
            out_of_memory: self.out_of_memory.with_label_values(l),
            invalid_answers: self.invalid_answers.with_label_values(l),
            tick: Arc::new(AtomicU32::new(0)),
        }
    }

    /// Counts a new build offered for `plugin`: accepted (now loaded) or refused.
    pub fn count_swap(&self, plugin: &str, accepted: bool) {
        let result = if accepted { "accepted" } else { "refused" };
        self.swaps.with_label_values(&[plugin, result]).inc();
    }

    /// Marks `version` (a content hash; its first 12 hex digits are used) as the
    /// loaded build of `plugin`, removing the series of the build it replaces.
    pub fn set_loaded(&self, plugin: &str, kind: &str, content_hash: &str) {
        let version = short_hash(content_hash).to_owned();
        let mut loaded = self.loaded.lock();
        if let Some((k, v)) = loaded.get(plugin) {
            if k == kind && *v == version {
                return;
            }
            let _ = self.loaded_info.remove_label_values(&[plugin, k, v]);
        }
        self.loaded_info
            .with_label_values(&[plugin, kind, &version])
            .set(1);
        loaded.insert(plugin.to_owned(), (kind.to_owned(), version));
    }

    /// Removes the `loaded_info` series of a plugin that is no longer loaded.
    pub fn unset_loaded(&self, plugin: &str) {
        if let Some((k, v)) = self.loaded.lock().remove(plugin) {
            let _ = self.loaded_info.remove_label_values(&[plugin, &k, &v]);
        }
    }
}

/// The first 12 hex digits of a content hash: the `version` label, and how reports
/// name a build.
pub fn short_hash(content_hash: &str) -> &str {
    content_hash.get(..12).unwrap_or(content_hash)
}

/// One plugin's call metrics: label handles resolved at load.
#[derive(Clone)]
pub(crate) struct CallMetrics {
    calls: IntCounter,
    seconds: Histogram,
    traps: IntCounter,
    timeouts: IntCounter,
    out_of_memory: IntCounter,
    invalid_answers: IntCounter,
    /// Calls so far, modulo: which ones are timed.
    tick: Arc<AtomicU32>,
}

impl CallMetrics {
    /// Whether to time this call (one in [`TIMING_SAMPLE`]).
    #[inline]
    pub(crate) fn timed(&self) -> bool {
        self.tick
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(TIMING_SAMPLE)
    }

    /// One call that was timed.
    #[inline]
    pub(crate) fn record_timed(&self, elapsed: Duration, error: Option<&PluginError>) {
        self.seconds.observe(elapsed.as_secs_f64());
        self.record(error);
    }

    /// One call, and how it failed (if it did).
    #[inline]
    pub(crate) fn record(&self, error: Option<&PluginError>) {
        self.calls.inc();
        match error {
            None => {}
            Some(PluginError::Trap { .. }) => self.traps.inc(),
            Some(PluginError::Timeout { .. }) => self.timeouts.inc(),
            Some(PluginError::OutOfMemory { .. }) => self.out_of_memory.inc(),
            Some(_) => {}
        }
    }

    /// An answer the host refused.
    pub(crate) fn invalid_answer(&self) {
        self.invalid_answers.inc();
    }
}
