//! The command line: `shardgate serve --config FILE` and `shardgate dev`.

use crate::config::Config;
use crate::dev::{DevFleet, DevOptions};
use crate::server::Server;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "shardgate",
    version,
    about = "A sharding query router for PostgreSQL"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the router with a configuration file.
    Serve {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Start a local fleet (coordinator + workers) and a router in front of it.
    Dev {
        /// Number of worker servers.
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Address the router listens on.
        #[arg(long, default_value = "127.0.0.1:6432")]
        listen: String,
        /// Where the servers keep their data (reused on the next run).
        #[arg(long, default_value = ".shardgate-dev")]
        data_dir: PathBuf,
        /// Address of the Prometheus endpoint.
        #[arg(long, default_value = "127.0.0.1:9930")]
        metrics: String,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SHARDGATE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,tokio_postgres=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = |threads: usize| {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if threads > 0 {
            b.worker_threads(threads);
        }
        b.enable_all().build().map_err(|e| {
            eprintln!("cannot start the runtime: {e}");
            ExitCode::FAILURE
        })
    };
    match cli.command {
        Cmd::Serve { config } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            let rt = match runtime(config.worker_threads) {
                Ok(rt) => rt,
                Err(code) => return code,
            };
            rt.block_on(serve(config, None))
        }
        Cmd::Dev {
            workers,
            listen,
            data_dir,
            metrics,
        } => {
            let opts = DevOptions {
                workers,
                listen,
                data_dir,
                metrics,
            };
            let fleet = match DevFleet::up(&opts) {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            let config = match fleet.write_config(&opts.listen, &opts.metrics) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    fleet.down();
                    return ExitCode::FAILURE;
                }
            };
            let rt = match runtime(config.worker_threads) {
                Ok(rt) => rt,
                Err(code) => {
                    fleet.down();
                    return code;
                }
            };
            let code = rt.block_on(serve(config, Some(&fleet)));
            fleet.down();
            code
        }
    }
}

async fn serve(config: Config, fleet: Option<&DevFleet>) -> ExitCode {
    let server = match Server::start(config).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(f) = fleet {
        let addr = server.local_addr();
        println!(
            "shardgate is up: coordinator on port {}, {} worker(s)",
            f.coordinator.port,
            f.workers.len()
        );
        println!("config: {}", f.config_path.display());
        if let Some(m) = server.metrics_addr() {
            println!("metrics: http://{m}/metrics");
        }
        println!(
            "connect with:\n  psql \"host={} port={} user=postgres dbname=postgres\"",
            addr.ip(),
            addr.port()
        );
        println!("Ctrl-C stops the router and the servers.");
    }
    wait_for_signal().await;
    tracing::info!("shutting down");
    server.shutdown().await;
    ExitCode::SUCCESS
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
