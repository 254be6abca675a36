//! The configuration: one TOML file, read once at start into an immutable `Config`.
//! Every key is documented in README.md ("Configuration").

mod error;

pub use error::ConfigError;

use crate::backend::PoolMode;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// How clients prove who they are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum AuthMethod {
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    #[serde(rename = "md5")]
    Md5,
    /// No password at all. Only when the config says so.
    #[serde(rename = "trust")]
    Trust,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    coordinator: RawNode,
    #[serde(default)]
    workers: Vec<RawNode>,
    #[serde(default)]
    users: Vec<RawUser>,
    #[serde(default)]
    catalog: RawCatalog,
    #[serde(default)]
    plugins: RawPlugins,
    #[serde(default)]
    planner: RawPlanner,
    #[serde(default)]
    transactions: RawTransactions,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawTransactions {
    router_id: Option<String>,
    recovery_interval_ms: u64,
    deadlock_interval_ms: u64,
}

impl Default for RawTransactions {
    fn default() -> Self {
        RawTransactions {
            router_id: None,
            recovery_interval_ms: 5_000,
            deadlock_interval_ms: 2_000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawCatalog {
    database: String,
    user: Option<String>,
}

impl Default for RawCatalog {
    fn default() -> Self {
        RawCatalog {
            database: "postgres".into(),
            user: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawPlanner {
    tiers: Vec<String>,
    plan_cache_size: usize,
    promote_simple_queries: bool,
}

impl Default for RawPlanner {
    fn default() -> Self {
        RawPlanner {
            tiers: vec![
                "planner-fastpath".into(),
                "planner-router".into(),
                "planner-pushdown".into(),
            ],
            plan_cache_size: 10_000,
            promote_simple_queries: true,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawPlugins {
    dir: Option<String>,
    cache_dir: Option<String>,
    placement: String,
    call_timeout_ms: u64,
    memory_bytes: usize,
}

impl Default for RawPlugins {
    fn default() -> Self {
        RawPlugins {
            dir: None,
            cache_dir: None,
            placement: "placement-default".into(),
            call_timeout_ms: 50,
            memory_bytes: 16 << 20,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawServer {
    listen: String,
    metrics_listen: Option<String>,
    auth_method: AuthMethod,
    pool_mode: PoolMode,
    pool_size: usize,
    pool_acquire_timeout_ms: u64,
    idle_timeout_ms: u64,
    max_lifetime_ms: u64,
    max_prepared_statements: usize,
    connect_timeout_ms: u64,
    shutdown_timeout_ms: u64,
    max_client_connections: usize,
    max_message_bytes: usize,
    tls_cert: Option<String>,
    tls_key: Option<String>,
    tls_required: bool,
    worker_threads: usize,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            listen: "127.0.0.1:6432".into(),
            metrics_listen: None,
            auth_method: AuthMethod::ScramSha256,
            pool_mode: PoolMode::Transaction,
            pool_size: 20,
            pool_acquire_timeout_ms: 5_000,
            idle_timeout_ms: 600_000,
            max_lifetime_ms: 3_600_000,
            max_prepared_statements: 500,
            connect_timeout_ms: 5_000,
            shutdown_timeout_ms: 30_000,
            max_client_connections: 50_000,
            max_message_bytes: 256 << 20,
            tls_cert: None,
            tls_key: None,
            tls_required: false,
            worker_threads: 0,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    #[serde(default)]
    name: Option<String>,
    host: String,
    port: u16,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUser {
    name: String,
    password: Option<String>,
    password_env: Option<String>,
    scram_verifier: Option<String>,
    server_password: Option<String>,
    server_password_env: Option<String>,
    pool_size: Option<usize>,
    pool_mode: Option<PoolMode>,
}

#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    pub host: String,
    pub port: u16,
}

impl Node {
    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// What the router knows to check a client's SCRAM proof.
#[derive(Clone)]
pub enum ScramCreds {
    Salted {
        salt: Vec<u8>,
        salted_password: Vec<u8>,
    },
    Verifier {
        salt: Vec<u8>,
        iterations: usize,
        stored_key: Vec<u8>,
        server_key: Vec<u8>,
    },
}

#[derive(Clone)]
pub struct User {
    pub name: String,
    /// Plaintext password (needed for md5; also the default password to the nodes).
    pub password: Option<String>,
    pub scram: Option<ScramCreds>,
    /// Password the router uses to log in to the nodes as this user.
    pub server_password: Option<String>,
    pub pool_size: usize,
    pub pool_mode: PoolMode,
}

impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User")
            .field("name", &self.name)
            .field("pool_size", &self.pool_size)
            .field("pool_mode", &self.pool_mode)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    pub auth_method: AuthMethod,
    pub pool_acquire_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_lifetime: Duration,
    /// Client statements kept prepared on one backend connection (0: no bound); the
    /// least recently used are deallocated beyond it, between transactions.
    pub max_prepared_statements: usize,
    pub connect_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub max_client_connections: usize,
    pub max_message_bytes: usize,
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
    pub tls_required: bool,
    /// Threads of the async runtime; 0: one per CPU.
    pub worker_threads: usize,
    pub coordinator: Node,
    pub workers: Vec<Node>,
    pub users: Vec<User>,
    /// The database (on the coordinator, and of the same name on the workers) whose
    /// tables can be distributed; it holds the catalog (schema `shardgate`).
    pub catalog_database: String,
    /// The user the router reads the catalog as (default: the first `[[users]]`).
    pub catalog_user: String,
    /// Directory of plugin components (`*.wasm`), watched for changes.
    pub plugin_dir: Option<std::path::PathBuf>,
    /// Where compiled plugins are cached between runs.
    pub plugin_cache_dir: Option<std::path::PathBuf>,
    /// The placement plugin new colocation groups are placed by.
    pub placement_plugin: String,
    pub plugin_call_timeout: Duration,
    pub plugin_memory_bytes: usize,
    /// Planner tiers (plugin names), asked in this order.
    pub planner_tiers: Vec<String>,
    /// Plans kept in the plan cache.
    pub plan_cache_size: usize,
    /// Routed simple queries whose literals are all numeric and in places where a
    /// typed parameter means the same run as statements prepared on the node.
    pub promote_simple_queries: bool,
    /// Names this router in the gids of its prepared transactions (each router recovers
    /// its own); `None`: derived from the host name and the bound listen port.
    pub router_id: Option<String>,
    /// How often prepared transactions left by a crash are looked for.
    pub recovery_interval: Duration,
    /// How often the distributed deadlock detector runs.
    pub deadlock_interval: Duration,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.display().to_string(),
                source,
            },
            other => other,
        })
    }

    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "<inline>".into(),
            source: Box::new(e),
        })?;
        let s = raw.server;
        let listen = parse_addr("server.listen", &s.listen)?;
        let metrics_listen = s
            .metrics_listen
            .as_deref()
            .map(|a| parse_addr("server.metrics_listen", a))
            .transpose()?;
        if s.pool_size == 0 {
            return Err(ConfigError::Invalid(
                "server.pool_size must be at least 1".into(),
            ));
        }
        if s.tls_cert.is_some() != s.tls_key.is_some() {
            return Err(ConfigError::Invalid(
                "server.tls_cert and server.tls_key go together".into(),
            ));
        }
        if s.tls_required && s.tls_cert.is_none() {
            return Err(ConfigError::Invalid(
                "server.tls_required needs server.tls_cert and server.tls_key".into(),
            ));
        }
        if s.max_message_bytes < 1024 {
            return Err(ConfigError::Invalid(
                "server.max_message_bytes is too small".into(),
            ));
        }
        let node = |n: RawNode, default: String| Node {
            name: n.name.unwrap_or(default),
            host: n.host,
            port: n.port,
        };
        let coordinator = node(raw.coordinator, "coordinator".into());
        let workers: Vec<Node> = raw
            .workers
            .into_iter()
            .enumerate()
            .map(|(i, n)| node(n, format!("worker{}", i + 1)))
            .collect();
        let mut names: Vec<&str> = workers.iter().map(|w| w.name.as_str()).collect();
        names.push(&coordinator.name);
        names.sort_unstable();
        if names.windows(2).any(|w| w[0] == w[1]) {
            return Err(ConfigError::Invalid("node names must be unique".into()));
        }
        let mut users = Vec::new();
        for u in raw.users {
            users.push(build_user(u, &s)?);
        }
        if users.is_empty() {
            return Err(ConfigError::Invalid(
                "at least one [[users]] entry is needed".into(),
            ));
        }
        let catalog_user = match raw.catalog.user {
            Some(u) => {
                if !users.iter().any(|x| x.name == u) {
                    return Err(ConfigError::Invalid(format!(
                        "catalog.user = {u:?} is not one of the [[users]]"
                    )));
                }
                u
            }
            None => users[0].name.clone(),
        };
        if raw.catalog.database.is_empty() {
            return Err(ConfigError::Invalid(
                "catalog.database must not be empty".into(),
            ));
        }
        let p = raw.plugins;
        if p.call_timeout_ms == 0 || p.memory_bytes < (1 << 20) {
            return Err(ConfigError::Invalid(
                "plugins.call_timeout_ms must be > 0 and plugins.memory_bytes at least 1 MiB"
                    .into(),
            ));
        }
        if raw.planner.tiers.is_empty() || raw.planner.plan_cache_size == 0 {
            return Err(ConfigError::Invalid(
                "planner.tiers must name at least one tier and planner.plan_cache_size must be > 0"
                    .into(),
            ));
        }
        let t = raw.transactions;
        if let Some(id) = &t.router_id
            && !crate::txn::valid_router_id(id)
        {
            return Err(ConfigError::Invalid(format!(
                "transactions.router_id '{id}' must be 1 to 40 letters, digits or '-'"
            )));
        }
        if t.recovery_interval_ms == 0 || t.deadlock_interval_ms == 0 {
            return Err(ConfigError::Invalid(
                "transactions.recovery_interval_ms and transactions.deadlock_interval_ms must be > 0"
                    .into(),
            ));
        }
        Ok(Config {
            router_id: t.router_id,
            recovery_interval: Duration::from_millis(t.recovery_interval_ms),
            deadlock_interval: Duration::from_millis(t.deadlock_interval_ms),
            planner_tiers: raw.planner.tiers,
            plan_cache_size: raw.planner.plan_cache_size,
            promote_simple_queries: raw.planner.promote_simple_queries,
            catalog_database: raw.catalog.database,
            catalog_user,
            plugin_dir: p.dir.map(Into::into),
            plugin_cache_dir: p.cache_dir.map(Into::into),
            placement_plugin: p.placement,
            plugin_call_timeout: Duration::from_millis(p.call_timeout_ms),
            plugin_memory_bytes: p.memory_bytes,
            listen,
            metrics_listen,
            auth_method: s.auth_method,
            pool_acquire_timeout: Duration::from_millis(s.pool_acquire_timeout_ms),
            idle_timeout: Duration::from_millis(s.idle_timeout_ms),
            max_lifetime: Duration::from_millis(s.max_lifetime_ms),
            max_prepared_statements: s.max_prepared_statements,
            connect_timeout: Duration::from_millis(s.connect_timeout_ms),
            shutdown_timeout: Duration::from_millis(s.shutdown_timeout_ms),
            max_client_connections: s.max_client_connections,
            max_message_bytes: s.max_message_bytes,
            tls_cert: s.tls_cert,
            tls_key: s.tls_key,
            tls_required: s.tls_required,
            worker_threads: s.worker_threads,
            coordinator,
            workers,
            users,
        })
    }

    pub fn user(&self, name: &str) -> Option<&User> {
        self.users.iter().find(|u| u.name == name)
    }
}

fn parse_addr(key: &str, v: &str) -> Result<SocketAddr, ConfigError> {
    v.parse().map_err(|_| {
        ConfigError::Invalid(format!(
            "{key} = {v:?} is not an address like 127.0.0.1:6432"
        ))
    })
}

fn env_secret(key: String, var: Option<String>) -> Result<Option<String>, ConfigError> {
    match var {
        None => Ok(None),
        Some(var) => std::env::var(&var)
            .map(Some)
            .map_err(|_| ConfigError::MissingEnv { var, key }),
    }
}

fn build_user(u: RawUser, s: &RawServer) -> Result<User, ConfigError> {
    let key = |k: &str| format!("users[{}].{k}", u.name);
    if u.password.is_some() && u.password_env.is_some() {
        return Err(ConfigError::Invalid(format!(
            "{} and {} exclude each other",
            key("password"),
            key("password_env")
        )));
    }
    let password = match u.password {
        Some(p) => Some(p),
        None => env_secret(key("password_env"), u.password_env)?,
    };
    let server_password = match u.server_password {
        Some(p) => Some(p),
        None => env_secret(key("server_password_env"), u.server_password_env)?,
    }
    .or_else(|| password.clone());
    let scram = match (&u.scram_verifier, &password) {
        (Some(v), _) => Some(parse_verifier(v).ok_or_else(|| {
            ConfigError::Invalid(format!(
                "{} is not of the form SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>",
                key("scram_verifier")
            ))
        })?),
        (None, Some(p)) => Some(salt_password(p)),
        (None, None) => None,
    };
    match s.auth_method {
        AuthMethod::ScramSha256 if scram.is_none() => {
            return Err(ConfigError::Invalid(format!(
                "user {} needs password, password_env or scram_verifier for scram-sha-256",
                u.name
            )));
        }
        AuthMethod::Md5 if password.is_none() => {
            return Err(ConfigError::Invalid(format!(
                "user {} needs password or password_env for md5",
                u.name
            )));
        }
        _ => {}
    }
    Ok(User {
        name: u.name,
        password,
        scram,
        server_password,
        pool_size: u.pool_size.unwrap_or(s.pool_size).max(1),
        pool_mode: u.pool_mode.unwrap_or(s.pool_mode),
    })
}

/// Salts a plaintext password once at load, as Postgres does when it stores one.
fn salt_password(password: &str) -> ScramCreds {
    let salt: [u8; 16] = rand::random();
    let salted = pgwire::api::auth::sasl::scram::gen_salted_password(
        password,
        &salt,
        pgwire::api::auth::sasl::scram::SCRAM_ITERATIONS,
    );
    ScramCreds::Salted {
        salt: salt.to_vec(),
        salted_password: salted,
    }
}

/// Parses Postgres's stored form (`pg_authid.rolpassword`):
/// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
pub fn parse_verifier(v: &str) -> Option<ScramCreds> {
    let rest = v.strip_prefix("SCRAM-SHA-256$")?;
    let (iter_salt, keys) = rest.split_once('$')?;
    let (iters, salt) = iter_salt.split_once(':')?;
    let (stored, server) = keys.split_once(':')?;
    let iterations: usize = iters.parse().ok().filter(|&n| n > 0)?;
    let salt = B64.decode(salt).ok()?;
    let stored_key = B64.decode(stored).ok()?;
    let server_key = B64.decode(server).ok()?;
    if stored_key.len() != 32 || server_key.len() != 32 {
        return None;
    }
    Some(ScramCreds::Verifier {
        salt,
        iterations,
        stored_key,
        server_key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
[coordinator]
host = "127.0.0.1"
port = 5432
[[users]]
name = "app"
password = "secret"
"#;

    #[test]
    fn defaults() {
        let c = Config::from_toml(MIN).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:6432");
        assert_eq!(c.auth_method, AuthMethod::ScramSha256);
        assert_eq!(c.users[0].pool_size, 20);
        assert_eq!(c.users[0].server_password.as_deref(), Some("secret"));
        assert_eq!(c.coordinator.name, "coordinator");
    }

    #[test]
    fn rejects_bad_configs() {
        assert!(Config::from_toml("[coordinator]\nhost='x'\nport=1\n").is_err());
        let unknown = format!("{MIN}\n[server]\nlisten_typo = 1\n");
        assert!(Config::from_toml(&unknown).is_err());
        let bad_addr = format!("[server]\nlisten = 'nope'\n{MIN}");
        assert!(Config::from_toml(&bad_addr).is_err());
        let no_pw = "[coordinator]\nhost='x'\nport=1\n[[users]]\nname='a'\n";
        assert!(Config::from_toml(no_pw).is_err());
        let missing_env = "[coordinator]\nhost='x'\nport=1\n[[users]]\nname='a'\npassword_env='SHARDGATE_TEST_SURELY_UNSET'\n";
        assert!(matches!(
            Config::from_toml(missing_env),
            Err(ConfigError::MissingEnv { .. })
        ));
    }

    #[test]
    fn verifier_parsing() {
        // Well-formed shape with synthetic keys; the integration tests use a verifier
        // read from a real pg_authid.
        let v = "SCRAM-SHA-256$4096:c2FsdHNhbHRzYWx0c2FsdA==$QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE=:QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkI=";
        assert!(parse_verifier(v).is_some());
        assert!(parse_verifier("SCRAM-SHA-256$x:abc$d:e").is_none());
        assert!(parse_verifier("md5abc").is_none());
    }
}
