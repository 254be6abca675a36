# Shared helpers for the shardgate benchmark scripts. Sourced, not executed.
# Creates everything under a temp dir and tears it down on exit (see bench_cleanup).

set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PG_BIN="${PG_BIN:-/usr/lib/postgresql/15/bin}"
PGBOUNCER="${PGBOUNCER:-/usr/sbin/pgbouncer}"
SHARDGATE="${SHARDGATE:-$REPO_ROOT/target/release/shardgate}"
POOL_SIZE="${POOL_SIZE:-8}"

WORK="$(mktemp -d /tmp/shardgate-bench.XXXXXX)"
chmod 755 "$WORK"
PG_DATA="$WORK/pgdata"
SG_PID=""
PGB_PID=""
PG_STARTED=0

log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

as_pg() { runuser -u postgres -- "$@"; }

bench_cleanup() {
    local rc=$?
    set +e
    if [[ -n "$SG_PID" ]] && kill -0 "$SG_PID" 2>/dev/null; then
        kill -TERM "$SG_PID"; for _ in $(seq 50); do kill -0 "$SG_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$SG_PID" 2>/dev/null
    fi
    if [[ -n "$PGB_PID" ]] && kill -0 "$PGB_PID" 2>/dev/null; then
        kill -TERM "$PGB_PID"; for _ in $(seq 50); do kill -0 "$PGB_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$PGB_PID" 2>/dev/null
    fi
    if [[ "$PG_STARTED" == 1 ]]; then
        as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m immediate -w stop >/dev/null 2>&1
    fi
    if [[ "${KEEP_WORKDIR:-0}" == 1 || $rc -ne 0 ]]; then
        log "work dir kept for inspection: $WORK (logs: pg.log, shardgate.log, pgbouncer/pgbouncer.log)"
    else
        rm -rf "$WORK"
    fi
    exit $rc
}
trap bench_cleanup EXIT
trap 'exit 130' INT TERM

# Raise the fd limit for this shell and its children (shardgate, python client).
raise_nofile() {
    ulimit -Hn 65536 2>/dev/null || true
    ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
}

ensure_shardgate() {
    if [[ ! -x "$SHARDGATE" ]]; then
        log "building shardgate (release)"
        (cd "$REPO_ROOT" && cargo build --release -p shardgate)
    fi
}

# PG_EXTRA_CONF: more postgresql.conf lines for every server of a run, the pass-through
# one and the distributed nodes alike (e.g. `huge_pages = on`), or the distributed
# nodes' wal_level and max_prepared_transactions here alone, to rule settings out as
# the cause of a difference.
start_postgres() {
    PG_PORT="$(free_port)"
    mkdir -p "$PG_DATA"
    chown -R postgres:postgres "$WORK"
    as_pg "$PG_BIN/initdb" -D "$PG_DATA" -U postgres --auth=trust -E UTF8 --locale=C >"$WORK/initdb.log" 2>&1
    cat >>"$PG_DATA/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$WORK'
max_connections = 200
shared_buffers = 512MB
fsync = off
synchronous_commit = off
full_page_writes = off
logging_collector = off
${PG_EXTRA_CONF:-}
CONF
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$WORK/pg.log" -w -t 60 start >/dev/null
    PG_STARTED=1
    log "postgres listening on 127.0.0.1:$PG_PORT"
}

wait_port() { # host port what
    for _ in $(seq 200); do
        if timeout 1 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    log "$3 did not start listening on $1:$2"; return 1
}

start_shardgate() {
    SG_PORT="$(free_port)"
    SG_METRICS_PORT="$(free_port)"
    cat >"$WORK/shardgate.toml" <<CONF
[server]
listen = "127.0.0.1:$SG_PORT"
metrics_listen = "127.0.0.1:$SG_METRICS_PORT"
auth_method = "trust"
pool_size = $POOL_SIZE
pool_mode = "transaction"
max_client_connections = 20000
worker_threads = ${SG_WORKER_THREADS:-0}
[coordinator]
host = "127.0.0.1"
port = $PG_PORT
[[users]]
name = "postgres"
CONF
    "$SHARDGATE" serve --config "$WORK/shardgate.toml" >"$WORK/shardgate.log" 2>&1 &
    SG_PID=$!
    wait_port 127.0.0.1 "$SG_PORT" shardgate
    log "shardgate (pid $SG_PID) listening on 127.0.0.1:$SG_PORT"
}

start_pgbouncer() {
    PGB_PORT="$(free_port)"
    local d="$WORK/pgbouncer"
    mkdir -p "$d"
    echo '"postgres" ""' >"$d/userlist.txt"
    local prepared_line=""
    if [[ -n "${PGB_MAX_PREPARED:-}" ]]; then
        prepared_line="max_prepared_statements = $PGB_MAX_PREPARED"
    fi
    cat >"$d/pgbouncer.ini" <<CONF
[databases]
postgres = host=127.0.0.1 port=$PG_PORT dbname=postgres

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGB_PORT
unix_socket_dir =
auth_type = trust
auth_file = $d/userlist.txt
pool_mode = transaction
default_pool_size = $POOL_SIZE
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = 20000
max_db_connections = 0
ignore_startup_parameters = extra_float_digits,options
logfile = $d/pgbouncer.log
pidfile = $d/pgbouncer.pid
log_connections = 0
log_disconnections = 0
$prepared_line
CONF
    chown -R postgres:postgres "$d"
    as_pg "$PGBOUNCER" "$d/pgbouncer.ini" >"$WORK/pgbouncer.out" 2>&1 &
    PGB_PID=$!   # runuser's pid until pgbouncer has written its pid file
    wait_port 127.0.0.1 "$PGB_PORT" pgbouncer
    [[ -s "$d/pgbouncer.pid" ]] && PGB_PID="$(cat "$d/pgbouncer.pid")"
    log "pgbouncer (pid $PGB_PID) listening on 127.0.0.1:$PGB_PORT"
}

# Minor version >= 1.21 supports max_prepared_statements (prepared statements in transaction mode).
pgbouncer_supports_prepared() {
    local v
    v="$("$PGBOUNCER" --version | head -1 | awk '{print $2}')"
    local major minor
    major="${v%%.*}"; minor="$(echo "$v" | cut -d. -f2)"
    (( major > 1 || (major == 1 && minor >= 21) ))
}
