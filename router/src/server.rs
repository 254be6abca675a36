//! One running router: its shared state (`ServerCtx`), the accept loop, the metrics
//! endpoint, and graceful shutdown (stop accepting, let open transactions finish up
//! to `shutdown_timeout`, then close what is left).

use crate::backend::control::ControlLogin;
use crate::backend::{Login, Pool, PoolKey, PoolSettings, Pools};
use crate::catalog::Catalog;
use crate::config::{Config, User};
use crate::error::{RouterError, StartError};
use crate::frontend::{CancelRegistry, handle_connection, load_tls};
use crate::metrics::{Metrics, serve_metrics};
use crate::plugin::{Limits, PluginHost, PluginMetrics, PluginRegistry};
use crate::session::PreparedRegistry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What every session of one router shares.
pub struct ServerCtx {
    pub config: Arc<Config>,
    pub metrics: Arc<Metrics>,
    pub pools: Pools,
    pub cancels: CancelRegistry,
    pub prepared: PreparedRegistry,
    /// Cancelled when shutdown begins: sessions leave at their next idle moment.
    pub shutdown: CancellationToken,
    pub tls: Option<TlsAcceptor>,
    /// SCRAM with channel binding to the TLS certificate (SCRAM-SHA-256-PLUS).
    pub scram_plus: Option<pgwire::api::auth::sasl::scram::ScramServerAuth>,
    /// The catalog snapshot (distributed tables, shards, nodes).
    pub catalog: Arc<Catalog>,
    /// The loaded plugins (swapped whole on reload).
    pub plugins: Arc<PluginRegistry>,
    /// Plans statements on distributed and reference tables (plan cache, tiers).
    pub planner: crate::plan::Planner,
    /// Two-phase commit and its recovery.
    pub txns: Arc<crate::txn::Transactions>,
    /// Transactions on several nodes, for the deadlock detector.
    pub dist_txns: Arc<crate::deadlock::Registry>,
}

impl ServerCtx {
    /// The coordinator pool for (database, user).
    pub fn pool_for(&self, database: &str, user: &User) -> Arc<Pool> {
        let node = &self.config.coordinator;
        self.pool_at(&node.name, node.addr(), database, user)
    }

    /// The pool of a catalog node (a worker) for (database, user): the client's own
    /// credentials, as on the coordinator.
    pub fn node_pool(
        &self,
        node: &crate::catalog::NodeRow,
        database: &str,
        user: &User,
    ) -> Arc<Pool> {
        let addr = node.addr();
        self.pool_at(&addr, addr.clone(), database, user)
    }

    fn pool_at(&self, name: &str, addr: String, database: &str, user: &User) -> Arc<Pool> {
        let key = PoolKey {
            node: name.to_owned(),
            database: database.to_owned(),
            user: user.name.clone(),
        };
        self.pools.get_or_create(key, || {
            Pool::new(
                Login {
                    node: name.to_owned(),
                    addr,
                    user: user.name.clone(),
                    database: database.to_owned(),
                    password: user.server_password.clone(),
                    connect_timeout: self.config.connect_timeout,
                },
                PoolSettings {
                    size: user.pool_size,
                    acquire_timeout: self.config.pool_acquire_timeout,
                    idle_timeout: self.config.idle_timeout,
                    max_lifetime: self.config.max_lifetime,
                },
                self.metrics.clone(),
            )
        })
    }
}

pub struct Server {
    ctx: Arc<ServerCtx>,
    local_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    tracker: TaskTracker,
    /// Cancelled when the shutdown grace period is over: remaining sessions are dropped.
    hard_stop: CancellationToken,
    background: CancellationToken,
}

impl Server {
    /// Binds the listeners and starts serving.
    pub async fn start(config: Config) -> Result<Server, StartError> {
        let (tls, scram_plus) = match (&config.tls_cert, &config.tls_key) {
            (Some(c), Some(k)) => {
                let acceptor = load_tls(c, k)?;
                let pem = std::fs::read(c)
                    .map_err(|e| crate::config::ConfigError::Tls(format!("{c}: {e}")))?;
                let mut scram = pgwire::api::auth::sasl::scram::ScramServerAuth::new();
                scram
                    .configure_certificate(&pem)
                    .map_err(|e| crate::config::ConfigError::Tls(format!("{c}: {e}")))?;
                (Some(acceptor), Some(scram))
            }
            _ => (None, None),
        };
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let local_addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        let metrics = Arc::new(Metrics::new());
        let background = CancellationToken::new();
        let metrics_addr = match config.metrics_listen {
            Some(addr) => {
                let l = TcpListener::bind(addr)
                    .await
                    .map_err(|source| StartError::Bind { addr, source })?;
                let bound = l
                    .local_addr()
                    .map_err(|source| StartError::Bind { addr, source })?;
                tokio::spawn(serve_metrics(l, metrics.clone(), background.clone()));
                Some(bound)
            }
            None => None,
        };
        let client_slots = Arc::new(Semaphore::new(config.max_client_connections));
        let plugins = load_plugins(&config, &metrics).await?;
        let catalog = {
            let user = config
                .user(&config.catalog_user)
                .expect("config checks the catalog user");
            Catalog::new(
                config.catalog_database.clone(),
                ControlLogin {
                    user: user.name.clone(),
                    password: user.server_password.clone(),
                    connect_timeout: config.connect_timeout,
                    host: config.coordinator.host.clone(),
                    port: config.coordinator.port,
                },
            )
        };
        let seed: Vec<(String, u16)> = config
            .workers
            .iter()
            .map(|w| (w.host.clone(), w.port))
            .collect();
        crate::catalog::start(&catalog, seed, background.clone(), config.connect_timeout).await;
        tokio::spawn(recover_loop(catalog.clone(), background.clone()));
        {
            let catalog = catalog.clone();
            plugins.clone().spawn_watcher(
                Arc::new(move || catalog.snapshot().plugins_in_use()),
                background.clone(),
            );
        }
        let planner = crate::plan::Planner::new(
            config.planner_tiers.clone(),
            config.plan_cache_size,
            &metrics.registry,
        )
        .map_err(|e| StartError::Plugins(e.to_string()))?;
        let txns = {
            let id = config.router_id.clone().unwrap_or_else(|| {
                let id = crate::txn::default_router_id(local_addr.port());
                tracing::info!(
                    router_id = %id,
                    "router_id not configured: derived from the host name and port; set [transactions] router_id so that a router restarted elsewhere finds the prepared transactions it left"
                );
                id
            });
            Arc::new(
                crate::txn::Transactions::new(
                    id,
                    catalog.login().clone(),
                    catalog.database.clone(),
                    &metrics.registry,
                )
                .map_err(|e| StartError::Txn(e.to_string()))?,
            )
        };
        match txns.claim_router_id().await {
            Ok(()) => {}
            Err(e @ crate::txn::ClaimError::Conflict(_)) => {
                return Err(StartError::Txn(e.to_string()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "router id not claimed yet; recovery waits for the coordinator")
            }
        }
        tracing::info!(
            router_id = txns.router_id(),
            "distributed transactions enabled"
        );
        let dist_txns = Arc::new(crate::deadlock::Registry::default());
        tokio::spawn(crate::txn::recovery_loop(
            txns.clone(),
            catalog.clone(),
            config.recovery_interval,
            background.clone(),
        ));
        tokio::spawn(crate::deadlock::detector_loop(
            dist_txns.clone(),
            catalog.clone(),
            txns.clone(),
            config.deadlock_interval,
            background.clone(),
        ));
        let ctx = Arc::new(ServerCtx {
            txns,
            dist_txns,
            planner,
            catalog,
            plugins,
            config: Arc::new(config),
            metrics,
            pools: Pools::new(),
            cancels: CancelRegistry::default(),
            prepared: PreparedRegistry::default(),
            shutdown: CancellationToken::new(),
            tls,
            scram_plus,
        });
        let tracker = TaskTracker::new();
        let hard_stop = CancellationToken::new();
        tokio::spawn(accept_loop(
            listener,
            ctx.clone(),
            tracker.clone(),
            hard_stop.clone(),
            client_slots,
        ));
        tokio::spawn(reap_idle(ctx.clone(), background.clone()));
        tracing::info!(%local_addr, "shardgate listening");
        Ok(Server {
            ctx,
            local_addr,
            metrics_addr,
            tracker,
            hard_stop,
            background,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    pub fn ctx(&self) -> &Arc<ServerCtx> {
        &self.ctx
    }

    /// Stops at once without waiting (tests; dropped sessions roll back on their
    /// backends).
    pub fn abort(&self) {
        self.ctx.shutdown.cancel();
        self.hard_stop.cancel();
        self.background.cancel();
        for p in self.ctx.pools.all() {
            p.close();
        }
    }

    /// Graceful shutdown: no new clients; idle sessions get 57P01 at once; sessions in
    /// a transaction may finish it within `shutdown_timeout`; then the rest are closed
    /// (their backends roll back) and the pools are emptied.
    pub async fn shutdown(self) {
        self.ctx.shutdown.cancel();
        self.tracker.close();
        let grace = self.ctx.config.shutdown_timeout;
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = self.tracker.len(),
                "shutdown grace period over; closing remaining sessions"
            );
            // Statements still running would keep their transactions (and locks) open
            // on the nodes until they end on their own: cancel them first.
            let cancels: Vec<_> = self
                .ctx
                .cancels
                .busy_backends()
                .into_iter()
                .map(|(addr, pid, secret)| crate::backend::cancel_backend(addr, pid, secret))
                .collect();
            let _ = tokio::time::timeout(Duration::from_secs(2), futures_join(cancels)).await;
            self.hard_stop.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), self.tracker.wait()).await;
        }
        for p in self.ctx.pools.all() {
            p.close();
        }
        self.background.cancel();
        // Let the Terminate messages of closed connections go out.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Finishes admin changes a crash left prepared on workers, at start and then every
/// `RECOVER_EVERY`.
async fn recover_loop(catalog: Arc<Catalog>, stop: CancellationToken) {
    const RECOVER_EVERY: Duration = Duration::from_secs(30);
    let mut tick = tokio::time::interval(RECOVER_EVERY);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if catalog.peek().version == 0 {
            continue;
        }
        match crate::admin::recover(catalog.login(), &catalog.database, RECOVER_EVERY).await {
            Ok(r) if r != crate::admin::Recovered::default() => {
                tracing::info!(
                    committed = r.committed,
                    rolled_back = r.rolled_back,
                    "recovered prepared admin transactions"
                )
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "recovery of prepared admin transactions failed"),
        }
    }
}

/// The plugin host and the plugin set: built-ins, then the plugin directory.
async fn load_plugins(
    config: &Config,
    metrics: &Arc<Metrics>,
) -> Result<Arc<PluginRegistry>, StartError> {
    let limits = Limits {
        call_timeout: config.plugin_call_timeout,
        memory_bytes: config.plugin_memory_bytes,
    };
    let cache = config.plugin_cache_dir.clone();
    let dir = config.plugin_dir.clone();
    let pm = Arc::new(
        PluginMetrics::new(&metrics.registry).map_err(|e| StartError::Plugins(e.to_string()))?,
    );
    let registry = tokio::task::spawn_blocking(move || {
        let host = PluginHost::new(cache, limits)?.with_metrics(pm);
        PluginRegistry::new(Arc::new(host), dir)
    })
    .await
    .map_err(|e| StartError::Plugins(e.to_string()))?
    .map_err(|e| StartError::Plugins(e.to_string()))?;
    Ok(Arc::new(registry))
}

async fn accept_loop(
    listener: TcpListener,
    ctx: Arc<ServerCtx>,
    tracker: TaskTracker,
    hard_stop: CancellationToken,
    slots: Arc<Semaphore>,
) {
    loop {
        let accepted = tokio::select! {
            // Shutdown first: a connection that waits in the backlog when shutdown
            // begins is refused (the listener closes), never let in.
            biased;
            _ = ctx.shutdown.cancelled() => return,
            r = listener.accept() => r,
        };
        let (tcp, _peer) = match accepted {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        ctx.metrics.client_connections_total.inc();
        let ctx = ctx.clone();
        let hard_stop = hard_stop.clone();
        match slots.clone().try_acquire_owned() {
            Ok(permit) => {
                tracker.spawn(async move {
                    tokio::select! {
                        _ = handle_connection(ctx, tcp) => {}
                        _ = hard_stop.cancelled() => {}
                    }
                    drop(permit);
                });
            }
            Err(_) => {
                tracker.spawn(async move {
                    let mut tcp = tcp;
                    crate::frontend::reject_early(&mut tcp, &RouterError::TooManyClients).await;
                });
            }
        }
    }
}

async fn reap_idle(ctx: Arc<ServerCtx>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {
                for p in ctx.pools.all() {
                    p.reap_idle();
                }
            }
        }
    }
}

/// Runs the futures concurrently and waits for all of them.
async fn futures_join<F>(futs: Vec<F>)
where
    F: std::future::Future + Send + 'static,
    F::Output: Send,
{
    let mut set = tokio::task::JoinSet::new();
    for f in futs {
        set.spawn(async move {
            let _ = f.await;
        });
    }
    while set.join_next().await.is_some() {}
}
