//! Local Postgres servers for `shardgate dev` and for the test harness: find the server
//! binaries, initdb, start, stop. When running as root the servers run as `postgres`
//! (initdb refuses root).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl) not found in $SHARDGATE_PG_BIN, PATH, `pg_config --bindir` or /usr/lib/postgresql/*/bin; install them (Debian/Ubuntu: apt-get install postgresql) or set SHARDGATE_PG_BIN"
    )]
    NoBinaries,
    #[error(
        "running as root but there is no `postgres` user to run the servers as; create it (Debian: apt-get install postgresql creates it)"
    )]
    NoPostgresUser,
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// The directory holding initdb, pg_ctl and postgres.
#[derive(Clone, Debug)]
pub struct PgBinaries {
    pub bindir: PathBuf,
}

impl PgBinaries {
    pub fn find() -> Result<PgBinaries, FleetError> {
        let ok = |d: &Path| d.join("initdb").is_file() && d.join("pg_ctl").is_file();
        if let Some(d) = std::env::var_os("SHARDGATE_PG_BIN").map(PathBuf::from)
            && ok(&d)
        {
            return Ok(PgBinaries { bindir: d });
        }
        if let Some(path) = std::env::var_os("PATH") {
            for d in std::env::split_paths(&path) {
                if ok(&d) {
                    return Ok(PgBinaries { bindir: d });
                }
            }
        }
        if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
            && out.status.success()
        {
            let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if ok(&d) {
                return Ok(PgBinaries { bindir: d });
            }
        }
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let v: u32 = e.file_name().to_str()?.parse().ok()?;
                let d = e.path().join("bin");
                ok(&d).then_some((v, d))
            })
            .collect();
        versions.sort();
        versions
            .pop()
            .map(|(_, bindir)| PgBinaries { bindir })
            .ok_or(FleetError::NoBinaries)
    }

    /// A tool next to the server binaries, else the one on PATH (Debian puts psql and
    /// pgbench in /usr/bin through wrappers).
    pub fn tool(&self, name: &str) -> PathBuf {
        let p = self.bindir.join(name);
        if p.is_file() { p } else { PathBuf::from(name) }
    }
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// uid and gid of the `postgres` user.
fn postgres_ids() -> Result<(u32, u32), FleetError> {
    let name = std::ffi::CString::new("postgres").expect("no NUL");
    // SAFETY: getpwnam takes a valid C string; the result is read before any other
    // call that could overwrite its static buffer.
    unsafe {
        let pw = libc::getpwnam(name.as_ptr());
        if pw.is_null() {
            return Err(FleetError::NoPostgresUser);
        }
        Ok(((*pw).pw_uid, (*pw).pw_gid))
    }
}

/// Makes `dir` (created if missing) usable by the user the servers run as.
pub fn prepare_dir(dir: &Path) -> Result<(), FleetError> {
    let io = |source| FleetError::Io {
        path: dir.display().to_string(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    if is_root() {
        let (uid, gid) = postgres_ids()?;
        std::os::unix::fs::chown(dir, Some(uid), Some(gid)).map_err(io)?;
    }
    Ok(())
}

/// A command run as the server user.
fn as_server_user(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn run(mut cmd: Command, what: &str) -> Result<(), FleetError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| FleetError::Command {
            what: what.to_owned(),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(FleetError::Command {
            what: what.to_owned(),
            detail: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        });
    }
    Ok(())
}

/// Options for a node's postgresql.conf.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    pub max_connections: u32,
    /// Off only for throwaway test servers.
    pub fsync: bool,
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            max_connections: 200,
            fsync: true,
        }
    }
}

/// One local Postgres server.
#[derive(Clone, Debug)]
pub struct PgNode {
    pub bin: PgBinaries,
    pub dir: PathBuf,
    pub port: u16,
}

impl PgNode {
    pub fn new(bin: PgBinaries, dir: PathBuf, port: u16) -> PgNode {
        PgNode { bin, dir, port }
    }

    pub fn is_initialized(&self) -> bool {
        self.dir.join("PG_VERSION").is_file()
    }

    /// initdb (superuser `postgres`, trust on loopback) and the settings shardgate needs:
    /// prepared transactions for 2PC, logical WAL for rebalancing.
    pub fn init(&self, opts: &NodeOptions) -> Result<(), FleetError> {
        prepare_dir(&self.dir)?;
        let mut c = as_server_user(&self.bin.tool("initdb"));
        c.arg("-D").arg(&self.dir).args([
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
        ]);
        if !opts.fsync {
            c.arg("--no-sync");
        }
        run(c, "initdb")?;
        let conf = format!(
            "\n# added by shardgate\nlisten_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = ''\nmax_connections = {}\nmax_prepared_transactions = {}\nwal_level = logical\nfsync = {}\nsynchronous_commit = {}\nfull_page_writes = {}\nlogging_collector = off\n",
            self.port,
            opts.max_connections,
            opts.max_connections,
            if opts.fsync { "on" } else { "off" },
            if opts.fsync { "on" } else { "off" },
            if opts.fsync { "on" } else { "off" },
        );
        let path = self.dir.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&path).map_err(|source| FleetError::Io {
            path: path.display().to_string(),
            source,
        })?;
        text.push_str(&conf);
        std::fs::write(&path, text).map_err(|source| FleetError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Ok(())
    }

    /// Sets the port in postgresql.conf (a later line wins).
    pub fn set_port(&mut self, port: u16) -> Result<(), FleetError> {
        self.port = port;
        let path = self.dir.join("postgresql.conf");
        let io = |source| FleetError::Io {
            path: path.display().to_string(),
            source,
        };
        let mut text = std::fs::read_to_string(&path).map_err(io)?;
        text.push_str(&format!("port = {port}\n"));
        std::fs::write(&path, text).map_err(|source| FleetError::Io {
            path: path.display().to_string(),
            source,
        })
    }

    /// Whether a postmaster runs on this data directory.
    pub fn is_running(&self) -> bool {
        let mut c = as_server_user(&self.bin.tool("pg_ctl"));
        c.arg("status").arg("-D").arg(&self.dir);
        c.stdout(Stdio::null())
            .stderr(Stdio::null())
            .stdin(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start(&self) -> Result<(), FleetError> {
        let log = self.dir.join("server.log");
        let mut c = as_server_user(&self.bin.tool("pg_ctl"));
        c.arg("start")
            .arg("-D")
            .arg(&self.dir)
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "120"])
            .stdout(Stdio::null());
        run(c, &format!("starting the server in {}", self.dir.display())).map_err(|e| {
            // pg_ctl only says "examine the log output": bring the log's end along.
            let tail = std::fs::read_to_string(&log)
                .map(|t| {
                    let lines: Vec<&str> = t.lines().collect();
                    lines[lines.len().saturating_sub(8)..].join("\n")
                })
                .unwrap_or_default();
            match e {
                FleetError::Command { what, detail } => FleetError::Command {
                    what,
                    detail: format!("{detail}\nserver log ({}):\n{tail}", log.display()),
                },
                other => other,
            }
        })
    }

    /// Stops the server: `fast` rolls back open transactions, `immediate` is a crash.
    pub fn stop(&self, mode: &str) -> Result<(), FleetError> {
        let mut c = as_server_user(&self.bin.tool("pg_ctl"));
        c.arg("stop")
            .arg("-D")
            .arg(&self.dir)
            .args(["-m", mode, "-w", "-t", "60"])
            .stdout(Stdio::null());
        run(c, &format!("stopping the server in {}", self.dir.display()))
    }

    /// `kill -9` of the postmaster (fault tests).
    pub fn kill9(&self) -> Result<(), FleetError> {
        let path = self.dir.join("postmaster.pid");
        let text = std::fs::read_to_string(&path).map_err(|source| FleetError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let pid: i32 = text
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .ok_or_else(|| FleetError::Command {
                what: "kill -9".into(),
                detail: "no pid in postmaster.pid".into(),
            })?;
        // SAFETY: kill(2) with a pid read from the server's own pid file.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
        Ok(())
    }

    /// Runs `psql -c sql` against this node as `postgres`.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, FleetError> {
        let out = Command::new(self.bin.tool("psql"))
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
            ])
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                db,
                "-c",
                sql,
            ])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| FleetError::Command {
                what: "psql".into(),
                detail: e.to_string(),
            })?;
        if !out.status.success() {
            return Err(FleetError::Command {
                what: format!("psql -c {sql:?}"),
                detail: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Whether something listens on 127.0.0.1:port.
pub fn port_in_use(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}
