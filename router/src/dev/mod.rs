//! `shardgate dev`: the embedded default. A local fleet (a coordinator and N workers)
//! created in a data directory on first run and reused after, a config written for it,
//! and a router in front; Ctrl-C or SIGTERM stops all of it.

pub mod fleet;

use crate::config::Config;
use fleet::{FleetError, NodeOptions, PgBinaries, PgNode};
use std::path::{Path, PathBuf};

pub struct DevOptions {
    pub workers: usize,
    pub listen: String,
    pub data_dir: PathBuf,
    pub metrics: String,
}

/// The fleet of one data directory: ports are chosen on first run and kept in
/// `fleet.toml` so that later runs (and psql command lines) stay the same.
pub struct DevFleet {
    pub coordinator: PgNode,
    pub workers: Vec<PgNode>,
    pub config_path: PathBuf,
}

#[derive(serde::Deserialize)]
struct FleetState {
    base_port: u16,
}

fn choose_base_port() -> u16 {
    // A block of free ports below the kernel's ephemeral range (32768 and up on Linux),
    // so that client sockets of other programs do not take them between runs.
    let mut base = 25432;
    while (0..9).any(|i| fleet::port_in_use(base + i)) && base < 32000 {
        base += 10;
    }
    base
}

impl DevFleet {
    /// Creates or reuses the fleet and starts whichever servers are not running.
    pub fn up(opts: &DevOptions) -> Result<DevFleet, FleetError> {
        let bin = PgBinaries::find()?;
        let dir = absolute(&opts.data_dir);
        fleet::prepare_dir(&dir)?;
        let state_path = dir.join("fleet.toml");
        let base_port = match std::fs::read_to_string(&state_path)
            .ok()
            .and_then(|t| toml::from_str::<FleetState>(&t).ok())
        {
            Some(s) => s.base_port,
            None => {
                let p = choose_base_port();
                std::fs::write(&state_path, format!("base_port = {p}\n")).map_err(|source| {
                    FleetError::Io {
                        path: state_path.display().to_string(),
                        source,
                    }
                })?;
                p
            }
        };
        let node = |name: &str, i: u16| PgNode::new(bin.clone(), dir.join(name), base_port + i);
        let coordinator = node("coordinator", 0);
        let workers: Vec<PgNode> = (1..=opts.workers)
            .map(|i| node(&format!("worker{i}"), i as u16))
            .collect();
        for n in std::iter::once(&coordinator).chain(&workers) {
            if !n.is_initialized() {
                eprintln!("initdb {}", n.dir.display());
                n.init(&NodeOptions::default())?;
            }
            if !n.is_running() {
                n.start()?;
            }
        }
        Ok(DevFleet {
            coordinator,
            workers,
            config_path: dir.join("shardgate.toml"),
        })
    }

    /// The router config for this fleet: trust logins for `postgres` (a local
    /// development fleet; the README says how to use passwords instead).
    pub fn config_text(&self, listen: &str, metrics: &str) -> String {
        let mut t = format!(
            "# Written by `shardgate dev`; rewritten on every run.\n[server]\nlisten = \"{listen}\"\nmetrics_listen = \"{metrics}\"\nauth_method = \"trust\"\npool_size = 20\n\n[coordinator]\nname = \"coordinator\"\nhost = \"127.0.0.1\"\nport = {}\n",
            self.coordinator.port
        );
        for (i, w) in self.workers.iter().enumerate() {
            t.push_str(&format!(
                "\n[[workers]]\nname = \"worker{}\"\nhost = \"127.0.0.1\"\nport = {}\n",
                i + 1,
                w.port
            ));
        }
        t.push_str("\n[[users]]\nname = \"postgres\"\n");
        t
    }

    pub fn write_config(&self, listen: &str, metrics: &str) -> Result<Config, String> {
        let text = self.config_text(listen, metrics);
        std::fs::write(&self.config_path, &text)
            .map_err(|e| format!("cannot write {}: {e}", self.config_path.display()))?;
        Config::from_toml(&text).map_err(|e| e.to_string())
    }

    pub fn down(&self) {
        for n in std::iter::once(&self.coordinator).chain(&self.workers) {
            if let Err(e) = n.stop("fast") {
                eprintln!("{e}");
            }
        }
    }
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_path_buf())
    }
}
