//! The loaded plugin set and its reload: an immutable [`PluginSet`] behind an
//! `ArcSwap`, rebuilt whole by a reload (statements already planned keep the `Arc` of
//! the set they started with). A reload applies DESIGN.md's rule: a distribution
//! plugin that placed rows may be replaced only by a build that hashes a probe set
//! identically; placement and planner plugins swap freely.

use super::metrics::short_hash;
use super::{
    DistributionPlugin, LoadedPlugin, PlacementPlugin, PlannerPlugin, PluginError, PluginHost,
};
use super::{ShardScheme, Value, ValueType, builtin};
use arc_swap::ArcSwap;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;

/// How often the watcher looks at the plugin directory.
const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Where a plugin came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PluginSource {
    /// Embedded in the router binary.
    Builtin,
    /// A `*.wasm` file of the plugin directory.
    File(PathBuf),
}

impl fmt::Display for PluginSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PluginSource::Builtin => f.write_str("builtin"),
            PluginSource::File(p) => match p.file_name() {
                Some(n) => write!(f, "{}", n.to_string_lossy()),
                None => write!(f, "{}", p.display()),
            },
        }
    }
}

/// One plugin of a set, with where it came from.
#[derive(Debug)]
pub struct Loaded<T> {
    pub plugin: Arc<T>,
    pub source: PluginSource,
    /// SHA-256 of the component (hex): the version the catalog records.
    pub content_hash: String,
}

impl<T> Clone for Loaded<T> {
    fn clone(&self) -> Self {
        Loaded {
            plugin: self.plugin.clone(),
            source: self.source.clone(),
            content_hash: self.content_hash.clone(),
        }
    }
}

/// The plugins in use: immutable, replaced whole by a reload.
#[derive(Debug)]
pub struct PluginSet {
    generation: u64,
    distribution: BTreeMap<String, Loaded<DistributionPlugin>>,
    placement: BTreeMap<String, Loaded<PlacementPlugin>>,
    planner: BTreeMap<String, Loaded<PlannerPlugin>>,
}

impl PluginSet {
    /// Bumped by every reload that changed something (plan caches key on it).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The distribution plugin that names itself `name`.
    pub fn distribution(&self, name: &str) -> Option<&Arc<DistributionPlugin>> {
        self.distribution.get(name).map(|l| &l.plugin)
    }

    /// The placement plugin that names itself `name`.
    pub fn placement(&self, name: &str) -> Option<&Arc<PlacementPlugin>> {
        self.placement.get(name).map(|l| &l.plugin)
    }

    /// The planner tier plugin that names itself `name`.
    pub fn planner(&self, name: &str) -> Option<&Arc<PlannerPlugin>> {
        self.planner.get(name).map(|l| &l.plugin)
    }

    /// Planner tier plugins by name.
    pub fn planners(&self) -> impl Iterator<Item = (&str, &Loaded<PlannerPlugin>)> {
        self.planner.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Distribution plugins by name.
    pub fn distributions(&self) -> impl Iterator<Item = (&str, &Loaded<DistributionPlugin>)> {
        self.distribution.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Placement plugins by name.
    pub fn placements(&self) -> impl Iterator<Item = (&str, &Loaded<PlacementPlugin>)> {
        self.placement.iter().map(|(k, v)| (k.as_str(), v))
    }
}

/// What a reload did with one plugin (or one file that did not load).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// New: no plugin of this name was loaded.
    Loaded {
        version: String,
    },
    /// A new build replaced the loaded one.
    Replaced {
        from: String,
        to: String,
    },
    Unchanged {
        version: String,
    },
    /// Not loaded, or not swapped in; whatever was loaded stays.
    Refused {
        reason: String,
    },
    /// Gone from the directory but in use: the loaded build stays.
    Kept {
        version: String,
        reason: String,
    },
    /// Gone from the directory and not in use: unloaded.
    Removed {
        version: String,
    },
}

/// One line of a reload report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReloadEntry {
    /// The plugin's name, or the file's name when it did not load far enough to say.
    pub plugin: String,
    /// `distribution`, `placement` or `planner` (None: unknown, the file did not load).
    pub kind: Option<&'static str>,
    /// Where the build this line is about comes from.
    pub source: PluginSource,
    pub outcome: ReloadOutcome,
}

/// A report line as plain strings (for an admin function's result rows).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReloadLine {
    pub plugin: String,
    pub kind: String,
    /// loaded, replaced, unchanged, refused, kept, removed
    pub result: String,
    pub detail: Option<String>,
}

/// What a reload did: one entry per plugin and per refused file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReloadReport {
    /// The set's generation after the reload.
    pub generation: u64,
    /// Whether a new set was stored.
    pub changed: bool,
    pub entries: Vec<ReloadEntry>,
}

impl ReloadReport {
    /// The entries as strings, in report order.
    pub fn lines(&self) -> Vec<ReloadLine> {
        self.entries
            .iter()
            .map(|e| {
                let (result, detail) = match &e.outcome {
                    ReloadOutcome::Loaded { version } => {
                        ("loaded", Some(format!("build {version} from {}", e.source)))
                    }
                    ReloadOutcome::Replaced { from, to } => (
                        "replaced",
                        Some(format!("build {from} -> {to} from {}", e.source)),
                    ),
                    ReloadOutcome::Unchanged { version } => (
                        "unchanged",
                        Some(format!("build {version} from {}", e.source)),
                    ),
                    ReloadOutcome::Refused { reason } => ("refused", Some(reason.clone())),
                    ReloadOutcome::Kept { version, reason } => {
                        ("kept", Some(format!("build {version}: {reason}")))
                    }
                    ReloadOutcome::Removed { version } => {
                        ("removed", Some(format!("build {version}")))
                    }
                };
                ReloadLine {
                    plugin: e.plugin.clone(),
                    kind: e.kind.unwrap_or("unknown").to_owned(),
                    result: result.to_owned(),
                    detail,
                }
            })
            .collect()
    }

    /// The outcome for a plugin (or file) name.
    pub fn outcome(&self, plugin: &str) -> Option<&ReloadOutcome> {
        self.entries
            .iter()
            .find(|e| e.plugin == plugin)
            .map(|e| &e.outcome)
    }

    /// The refused entries.
    pub fn refused(&self) -> impl Iterator<Item = &ReloadEntry> {
        self.entries
            .iter()
            .filter(|e| matches!(e.outcome, ReloadOutcome::Refused { .. }))
    }
}

impl fmt::Display for ReloadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "plugin reload: {} (generation {})",
            if self.changed {
                "new plugin set"
            } else {
                "nothing changed"
            },
            self.generation
        )?;
        for line in self.lines() {
            write!(f, "\n  {} ({}): {}", line.plugin, line.kind, line.result)?;
            if let Some(d) = line.detail {
                write!(f, ", {d}")?;
            }
        }
        Ok(())
    }
}

/// The plugin set, and how it is reloaded. Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct PluginRegistry {
    inner: Arc<Inner>,
}

struct Inner {
    host: Arc<PluginHost>,
    dir: Option<PathBuf>,
    /// The embedded plugins, loaded once: what a name falls back to when its file goes.
    builtins: Vec<LoadedPlugin>,
    current: ArcSwap<PluginSet>,
    /// One reload at a time (the watcher, SIGHUP and an admin call may race).
    reloading: Mutex<()>,
    /// What the last scan saw of the directory, so the watcher reloads on change only.
    seen: Mutex<Fingerprint>,
    initial: ReloadReport,
}

impl fmt::Debug for PluginRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PluginRegistry")
            .field("dir", &self.inner.dir)
            .field("current", &self.inner.current.load())
            .finish_non_exhaustive()
    }
}

/// Names, modification times and sizes of the directory's `*.wasm` files.
type Fingerprint = Vec<(PathBuf, Option<SystemTime>, u64)>;

impl PluginRegistry {
    /// Loads the builtins, then every `*.wasm` of `dir` (a plugin that names itself
    /// like a builtin replaces it). A builtin that does not load is an error; a file
    /// that does not load is refused (see [`initial_report`](Self::initial_report)).
    pub fn new(host: Arc<PluginHost>, dir: Option<PathBuf>) -> Result<PluginRegistry, PluginError> {
        let builtins = builtin::ALL
            .iter()
            .map(|(name, bytes)| host.load(name, bytes))
            .collect::<Result<Vec<_>, _>>()?;
        let empty = PluginSet {
            generation: 0,
            distribution: BTreeMap::new(),
            placement: BTreeMap::new(),
            planner: BTreeMap::new(),
        };
        let mut inner = Inner {
            host,
            dir,
            builtins,
            current: ArcSwap::from_pointee(empty),
            reloading: Mutex::new(()),
            seen: Mutex::new(Vec::new()),
            initial: ReloadReport {
                generation: 0,
                changed: false,
                entries: Vec::new(),
            },
        };
        inner.initial = inner.reload(&HashMap::new());
        Ok(PluginRegistry {
            inner: Arc::new(inner),
        })
    }

    /// The set in use now. Keep the `Arc` for the length of a statement.
    pub fn current(&self) -> Arc<PluginSet> {
        self.inner.current.load_full()
    }

    /// The directory plugins are loaded from.
    pub fn dir(&self) -> Option<&Path> {
        self.inner.dir.as_deref()
    }

    /// What loading at startup did.
    pub fn initial_report(&self) -> &ReloadReport {
        &self.inner.initial
    }

    /// Rescans the directory and swaps in what changed, off the async threads
    /// (compiling is CPU work). `in_use`: distribution plugin name -> content hash the
    /// catalog recorded for it.
    pub async fn reload(&self, in_use: &HashMap<String, String>) -> ReloadReport {
        let inner = self.inner.clone();
        let in_use = in_use.clone();
        match tokio::task::spawn_blocking(move || inner.reload(&in_use)).await {
            Ok(r) => r,
            Err(e) => ReloadReport {
                generation: self.inner.current.load().generation,
                changed: false,
                entries: vec![ReloadEntry {
                    plugin: "<reload>".into(),
                    kind: None,
                    source: PluginSource::Builtin,
                    outcome: ReloadOutcome::Refused {
                        reason: format!("the reload failed: {e}"),
                    },
                }],
            },
        }
    }

    /// [`reload`](Self::reload) on the calling thread.
    pub fn reload_blocking(&self, in_use: &HashMap<String, String>) -> ReloadReport {
        self.inner.reload(in_use)
    }

    /// A task that reloads on SIGHUP and when the directory's `*.wasm` files change
    /// (polled every 500 ms), logging each report, until `stop`.
    pub fn spawn_watcher(
        &self,
        in_use: Arc<dyn Fn() -> HashMap<String, String> + Send + Sync>,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let mut hangup = match signal(SignalKind::hangup()) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!("plugin reload on SIGHUP is off: {e}");
                    None
                }
            };
            let mut tick = tokio::time::interval(POLL_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let why = tokio::select! {
                    _ = stop.cancelled() => break,
                    Some(()) = async {
                        match hangup.as_mut() {
                            Some(h) => h.recv().await,
                            None => std::future::pending().await,
                        }
                    } => "SIGHUP",
                    _ = tick.tick() => {
                        let Some(dir) = this.inner.dir.clone() else { continue };
                        let now = tokio::task::spawn_blocking(move || fingerprint(&dir))
                            .await
                            .ok()
                            .and_then(Result::ok);
                        match now {
                            Some(now) if now != *this.inner.seen.lock() => "the plugin directory changed",
                            _ => continue,
                        }
                    }
                };
                let report = this.reload(&in_use()).await;
                if report.refused().next().is_some() {
                    tracing::warn!("{why}: {report}");
                } else if report.changed {
                    tracing::info!("{why}: {report}");
                } else {
                    tracing::debug!("{why}: {report}");
                }
            }
        })
    }
}

/// What every plugin kind offers the reload.
trait Plugin {
    const KIND: &'static str;
    fn content_hash(&self) -> &str;
}

impl Plugin for DistributionPlugin {
    const KIND: &'static str = "distribution";
    fn content_hash(&self) -> &str {
        DistributionPlugin::content_hash(self)
    }
}

impl Plugin for PlacementPlugin {
    const KIND: &'static str = "placement";
    fn content_hash(&self) -> &str {
        PlacementPlugin::content_hash(self)
    }
}

impl Plugin for PlannerPlugin {
    const KIND: &'static str = "planner";
    fn content_hash(&self) -> &str {
        PlannerPlugin::content_hash(self)
    }
}

/// The plugins a reload would like to have, before the swap rule is applied.
struct Wanted {
    distribution: BTreeMap<String, Loaded<DistributionPlugin>>,
    placement: BTreeMap<String, Loaded<PlacementPlugin>>,
    planner: BTreeMap<String, Loaded<PlannerPlugin>>,
}

impl Wanted {
    /// Adds a plugin; a name already given by another file is refused.
    fn add(&mut self, p: LoadedPlugin, source: PluginSource, entries: &mut Vec<ReloadEntry>) {
        fn put<T: Plugin>(
            map: &mut BTreeMap<String, Loaded<T>>,
            name: &str,
            plugin: Arc<T>,
            source: PluginSource,
            entries: &mut Vec<ReloadEntry>,
        ) {
            if let Some(other) = map.get(name)
                && other.source != PluginSource::Builtin
                && source != PluginSource::Builtin
            {
                entries.push(ReloadEntry {
                    plugin: name.to_owned(),
                    kind: Some(T::KIND),
                    outcome: ReloadOutcome::Refused {
                        reason: format!(
                            "{source} names itself {name}, which {} already provides",
                            other.source
                        ),
                    },
                    source,
                });
                return;
            }
            let content_hash = plugin.content_hash().to_owned();
            map.insert(
                name.to_owned(),
                Loaded {
                    plugin,
                    source,
                    content_hash,
                },
            );
        }
        let name = p.name().to_owned();
        match p {
            LoadedPlugin::Distribution(d) => put(&mut self.distribution, &name, d, source, entries),
            LoadedPlugin::Placement(d) => put(&mut self.placement, &name, d, source, entries),
            LoadedPlugin::Planner(d) => put(&mut self.planner, &name, d, source, entries),
        }
    }
}

impl Inner {
    fn reload(&self, in_use: &HashMap<String, String>) -> ReloadReport {
        let _one_at_a_time = self.reloading.lock();
        let old = self.current.load_full();
        let mut entries = Vec::new();
        let mut wanted = Wanted {
            distribution: BTreeMap::new(),
            placement: BTreeMap::new(),
            planner: BTreeMap::new(),
        };
        for b in &self.builtins {
            wanted.add(b.clone(), PluginSource::Builtin, &mut entries);
        }
        if let Some(dir) = &self.dir {
            let files = match fingerprint(dir) {
                Ok(f) => f,
                Err(e) => {
                    // An unreadable directory changes nothing (it may be transient).
                    return ReloadReport {
                        generation: old.generation,
                        changed: false,
                        entries: vec![ReloadEntry {
                            plugin: dir.display().to_string(),
                            kind: None,
                            source: PluginSource::File(dir.clone()),
                            outcome: ReloadOutcome::Refused {
                                reason: format!("cannot read the plugin directory: {e}"),
                            },
                        }],
                    };
                }
            };
            for (path, _, _) in &files {
                let source = PluginSource::File(path.clone());
                match self.load_file(&old, path) {
                    Ok(p) => wanted.add(p, source, &mut entries),
                    Err(e) => {
                        // What this file provided before stays.
                        let mut kept = Vec::new();
                        for (name, l) in &old.distribution {
                            if l.source == source {
                                kept.push(format!("{name} {}", short_hash(&l.content_hash)));
                                wanted.distribution.insert(name.clone(), l.clone());
                            }
                        }
                        for (name, l) in &old.placement {
                            if l.source == source {
                                kept.push(format!("{name} {}", short_hash(&l.content_hash)));
                                wanted.placement.insert(name.clone(), l.clone());
                            }
                        }
                        for (name, l) in &old.planner {
                            if l.source == source {
                                kept.push(format!("{name} {}", short_hash(&l.content_hash)));
                                wanted.planner.insert(name.clone(), l.clone());
                            }
                        }
                        let mut reason = e.to_string();
                        if !kept.is_empty() {
                            reason += &format!("; the loaded build stays ({})", kept.join(", "));
                        }
                        entries.push(ReloadEntry {
                            plugin: source.to_string(),
                            kind: None,
                            source,
                            outcome: ReloadOutcome::Refused { reason },
                        });
                    }
                }
            }
            *self.seen.lock() = files;
        }
        let metrics = self.host.metrics().map(|m| &**m);
        let mut changed = false;
        let distribution = reconcile(
            &old.distribution,
            wanted.distribution,
            |name, old, new| match in_use.get(name) {
                None => Ok(()),
                // The build that placed the rows is always welcome back.
                Some(recorded) if *recorded == new.content_hash => Ok(()),
                Some(_) => same_hashes(name, &old.plugin, &new.plugin),
            },
            |name| in_use.contains_key(name),
            metrics,
            &mut entries,
            &mut changed,
        );
        let placement = reconcile(
            &old.placement,
            wanted.placement,
            |_, _, _| Ok(()),
            |_| false,
            metrics,
            &mut entries,
            &mut changed,
        );
        let planner = reconcile(
            &old.planner,
            wanted.planner,
            |_, _, _| Ok(()),
            |_| false,
            metrics,
            &mut entries,
            &mut changed,
        );
        let generation = if changed {
            old.generation + 1
        } else {
            old.generation
        };
        if changed {
            if let Some(m) = metrics {
                for (name, l) in &distribution {
                    m.set_loaded(name, "distribution", &l.content_hash);
                }
                for (name, l) in &placement {
                    m.set_loaded(name, "placement", &l.content_hash);
                }
                for (name, l) in &planner {
                    m.set_loaded(name, "planner", &l.content_hash);
                }
            }
            self.current.store(Arc::new(PluginSet {
                generation,
                distribution,
                placement,
                planner,
            }));
        }
        ReloadReport {
            generation,
            changed,
            entries,
        }
    }

    /// Loads a file, reusing the loaded plugin of the same content hash (no compile).
    fn load_file(&self, old: &PluginSet, path: &Path) -> Result<LoadedPlugin, PluginError> {
        let bytes = std::fs::read(path).map_err(|source| PluginError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let hash = super::content_hash(&bytes);
        if let Some(l) = old.distribution.values().find(|l| l.content_hash == hash) {
            return Ok(LoadedPlugin::Distribution(l.plugin.clone()));
        }
        if let Some(l) = old.placement.values().find(|l| l.content_hash == hash) {
            return Ok(LoadedPlugin::Placement(l.plugin.clone()));
        }
        if let Some(l) = old.planner.values().find(|l| l.content_hash == hash) {
            return Ok(LoadedPlugin::Planner(l.plugin.clone()));
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.host.load(&name, &bytes)
    }
}

/// Applies the swap rule of one kind: what is wanted, against what is loaded.
/// `check(name, old, new)` may refuse a new build; `keep_if_gone(name)` keeps a
/// plugin that nothing provides any more.
fn reconcile<T: Plugin>(
    old: &BTreeMap<String, Loaded<T>>,
    mut wanted: BTreeMap<String, Loaded<T>>,
    check: impl Fn(&str, &Loaded<T>, &Loaded<T>) -> Result<(), String>,
    keep_if_gone: impl Fn(&str) -> bool,
    metrics: Option<&super::PluginMetrics>,
    entries: &mut Vec<ReloadEntry>,
    changed: &mut bool,
) -> BTreeMap<String, Loaded<T>> {
    let kind = Some(T::KIND);
    let mut names: Vec<String> = old.keys().chain(wanted.keys()).cloned().collect();
    names.sort();
    names.dedup();
    for name in names {
        let entry = |source: &PluginSource, outcome| ReloadEntry {
            plugin: name.clone(),
            kind,
            source: source.clone(),
            outcome,
        };
        match (old.get(&name), wanted.get(&name)) {
            (Some(o), Some(n)) if o.content_hash == n.content_hash => {
                if o.source != n.source {
                    *changed = true;
                }
                entries.push(entry(
                    &n.source,
                    ReloadOutcome::Unchanged {
                        version: short_hash(&n.content_hash).to_owned(),
                    },
                ));
            }
            (Some(o), Some(n)) => match check(&name, o, n) {
                Ok(()) => {
                    *changed = true;
                    if let Some(m) = metrics {
                        m.count_swap(&name, true);
                    }
                    entries.push(entry(
                        &n.source,
                        ReloadOutcome::Replaced {
                            from: short_hash(&o.content_hash).to_owned(),
                            to: short_hash(&n.content_hash).to_owned(),
                        },
                    ));
                }
                Err(reason) => {
                    if let Some(m) = metrics {
                        m.count_swap(&name, false);
                    }
                    entries.push(entry(&n.source, ReloadOutcome::Refused { reason }));
                    wanted.insert(name.clone(), o.clone());
                }
            },
            (None, Some(n)) => {
                *changed = true;
                entries.push(entry(
                    &n.source,
                    ReloadOutcome::Loaded {
                        version: short_hash(&n.content_hash).to_owned(),
                    },
                ));
            }
            (Some(o), None) if keep_if_gone(&name) => {
                entries.push(entry(
                    &o.source,
                    ReloadOutcome::Kept {
                        version: short_hash(&o.content_hash).to_owned(),
                        reason: format!(
                            "{} is gone, but tables use this plugin: the loaded build stays",
                            o.source
                        ),
                    },
                ));
                wanted.insert(name.clone(), o.clone());
            }
            (Some(o), None) => {
                *changed = true;
                if let Some(m) = metrics {
                    m.unset_loaded(&name);
                }
                entries.push(entry(
                    &o.source,
                    ReloadOutcome::Removed {
                        version: short_hash(&o.content_hash).to_owned(),
                    },
                ));
            }
            (None, None) => unreachable!("a name of one of the maps"),
        }
    }
    wanted
}

/// The `*.wasm` files of `dir`, sorted, with their modification times and sizes.
fn fingerprint(dir: &Path) -> std::io::Result<Fingerprint> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let path = e.path();
        if path.extension().is_some_and(|x| x == "wasm") {
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_file() {
                files.push((path, meta.modified().ok(), meta.len()));
            }
        }
    }
    files.sort();
    Ok(files)
}

/// Whether a new build of an in-use distribution plugin hashes like the loaded one:
/// the same scheme, every type the loaded build hashes, and the same hash for every
/// value of the probe set. The reason names the first difference.
fn same_hashes(
    name: &str,
    old: &DistributionPlugin,
    new: &DistributionPlugin,
) -> Result<(), String> {
    let (o, n) = (
        short_hash(old.content_hash()),
        short_hash(new.content_hash()),
    );
    let rebalance = "moving data to a new distribution function is a rebalance, not a swap";
    if old.scheme() != new.scheme() {
        return Err(format!(
            "plugin {name}: new build {n} maps hashes to shards by {}, the loaded build {o} by {}; {rebalance}",
            scheme_name(new.scheme()),
            scheme_name(old.scheme())
        ));
    }
    let mut types: Vec<ValueType> = Vec::new();
    for t in old.supported_types() {
        if !new.supports(*t) {
            return Err(format!(
                "plugin {name}: new build {n} does not hash {}, the loaded build {o} does; {rebalance}",
                type_name(*t)
            ));
        }
        // text and varchar are the same values.
        let t = if *t == ValueType::Varchar {
            ValueType::Text
        } else {
            *t
        };
        if !types.contains(&t) {
            types.push(t);
        }
    }
    for t in types {
        for v in probe_values(t) {
            let a = old.hash(&v);
            let b = new.hash(&v);
            let same = match (&a, &b) {
                (Ok(a), Ok(b)) => a == b,
                (Err(_), Err(_)) => true,
                _ => false,
            };
            if !same {
                let show = |r: &Result<i64, PluginError>| match r {
                    Ok(h) => h.to_string(),
                    Err(e) => format!("an error ({e})"),
                };
                return Err(format!(
                    "plugin {name}: new build {n} hashes {} to {}, the loaded build {o} to {}; {rebalance}",
                    show_value(&v),
                    show(&b),
                    show(&a)
                ));
            }
        }
    }
    Ok(())
}

fn scheme_name(s: ShardScheme) -> &'static str {
    match s {
        ShardScheme::HashRanges => "hash ranges",
        ShardScheme::Modulo => "modulo",
    }
}

fn type_name(t: ValueType) -> &'static str {
    match t {
        ValueType::Int2 => "int2",
        ValueType::Int4 => "int4",
        ValueType::Int8 => "int8",
        ValueType::Text => "text",
        ValueType::Varchar => "varchar",
        ValueType::Uuid => "uuid",
        ValueType::Boolean => "boolean",
    }
}

fn show_value(v: &Value) -> String {
    match v {
        Value::Int2(x) => format!("int2 {x}"),
        Value::Int4(x) => format!("int4 {x}"),
        Value::Int8(x) => format!("int8 {x}"),
        Value::Text(s) => format!("text {s:?}"),
        Value::Uuid(b) => {
            let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
            match hex.len() {
                32 => format!(
                    "uuid {}-{}-{}-{}-{}",
                    &hex[..8],
                    &hex[8..12],
                    &hex[12..16],
                    &hex[16..20],
                    &hex[20..]
                ),
                _ => format!("uuid bytes {hex}"),
            }
        }
        Value::Boolean(b) => format!("boolean {b}"),
    }
}

/// A deterministic generator (splitmix64): the probe set is the same on every run.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// The probe set of one value type: edge values, small values and ~1000
/// pseudo-random ones (ints), strings of every length class and script (text).
pub(crate) fn probe_values(t: ValueType) -> Vec<Value> {
    let mut rng = SplitMix(0x5348_4152_4447_4154 ^ t as u64);
    let small = -100i64..=100;
    match t {
        ValueType::Int2 => [i16::MIN, i16::MIN + 1, -1, 0, 1, i16::MAX - 1, i16::MAX]
            .into_iter()
            .chain(small.map(|x| x as i16))
            .chain((0..800).map(|_| rng.next() as i16))
            .map(Value::Int2)
            .collect(),
        ValueType::Int4 => [i32::MIN, i32::MIN + 1, -1, 0, 1, i32::MAX - 1, i32::MAX]
            .into_iter()
            .chain([i16::MIN as i32, i16::MAX as i32, 1 << 16, -(1 << 16)])
            .chain(small.map(|x| x as i32))
            .chain((0..1000).map(|_| rng.next() as i32))
            .map(Value::Int4)
            .collect(),
        ValueType::Int8 => [i64::MIN, i64::MIN + 1, -1, 0, 1, 42, i64::MAX - 1, i64::MAX]
            .into_iter()
            .chain([
                i32::MIN as i64,
                i32::MAX as i64,
                1 << 32,
                -(1 << 32),
                u32::MAX as i64,
            ])
            .chain(small)
            // Large, then smaller (40 bits cleared) pseudo-random values.
            .chain((0..1200).map(|i| (rng.next() >> if i < 1000 { 0 } else { 40 }) as i64))
            .map(Value::Int8)
            .collect(),
        ValueType::Text | ValueType::Varchar => {
            let fixed = [
                "",
                " ",
                "a",
                "A",
                "0",
                "42",
                "tenant",
                "Tenant",
                "TENANT-42",
                "é",
                "É",
                "ß",
                "日本語",
                "Ελληνικά",
                "🦀",
                "a\u{0}b",
                "tab\there",
                "line\nbreak",
            ];
            let alphabet: Vec<char> = "abcXYZ019 -_.éÉüß日本🦀Ωω".chars().collect();
            let mut random = Vec::new();
            for _ in 0..800 {
                let len = (rng.next() % 40) as usize;
                let s: String = (0..len)
                    .map(|_| alphabet[(rng.next() % alphabet.len() as u64) as usize])
                    .collect();
                random.push(s);
            }
            fixed
                .iter()
                .map(|s| s.to_string())
                .chain((0..200).map(|i| format!("tenant-{i}")))
                .chain((0..10).map(|i| "x".repeat(1 << i)))
                .chain(random)
                .map(Value::Text)
                .collect()
        }
        ValueType::Uuid => [[0u8; 16], [0xff; 16]]
            .into_iter()
            .chain((0..400).map(|_| {
                let mut b = [0u8; 16];
                b[..8].copy_from_slice(&rng.next().to_be_bytes());
                b[8..].copy_from_slice(&rng.next().to_be_bytes());
                b
            }))
            .map(|b| Value::Uuid(b.to_vec()))
            .collect(),
        ValueType::Boolean => vec![Value::Boolean(false), Value::Boolean(true)],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_set_is_deterministic_and_covers_edges() {
        for t in [
            ValueType::Int2,
            ValueType::Int4,
            ValueType::Int8,
            ValueType::Text,
            ValueType::Uuid,
            ValueType::Boolean,
        ] {
            assert_eq!(probe_values(t), probe_values(t));
        }
        let total: usize = [
            ValueType::Int2,
            ValueType::Int4,
            ValueType::Int8,
            ValueType::Text,
            ValueType::Uuid,
            ValueType::Boolean,
        ]
        .into_iter()
        .map(|t| probe_values(t).len())
        .sum();
        assert!((3000..10_000).contains(&total), "{total} probe values");
        let ints = probe_values(ValueType::Int8);
        for edge in [i64::MIN, i64::MAX, 0, -1, i32::MIN as i64] {
            assert!(ints.contains(&Value::Int8(edge)));
        }
        let texts = probe_values(ValueType::Text);
        for s in ["", "Tenant", "日本語"] {
            assert!(texts.contains(&Value::Text(s.into())));
        }
    }

    #[test]
    fn a_report_reads_well() {
        let r = ReloadReport {
            generation: 3,
            changed: true,
            entries: vec![
                ReloadEntry {
                    plugin: "hash-citus".into(),
                    kind: Some("distribution"),
                    source: PluginSource::Builtin,
                    outcome: ReloadOutcome::Unchanged {
                        version: "0123456789ab".into(),
                    },
                },
                ReloadEntry {
                    plugin: "broken.wasm".into(),
                    kind: None,
                    source: PluginSource::File("/p/broken.wasm".into()),
                    outcome: ReloadOutcome::Refused {
                        reason: "plugin broken.wasm was refused: junk".into(),
                    },
                },
            ],
        };
        assert_eq!(
            r.to_string(),
            "plugin reload: new plugin set (generation 3)\n  \
             hash-citus (distribution): unchanged, build 0123456789ab from builtin\n  \
             broken.wasm (unknown): refused, plugin broken.wasm was refused: junk"
        );
        assert_eq!(r.lines()[1].result, "refused");
    }
}
