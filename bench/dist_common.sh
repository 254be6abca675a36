# Helpers of the distributed benchmarks (sourced after common.sh): Postgres servers for
# a coordinator and workers, a router in front of them, and small query/metric helpers.
# Everything started here is stopped by dist_cleanup (installed as the EXIT trap).

# The distributed setup's servers and router, stopped here; the passthrough's Postgres
# and router are common.sh's (PG_DATA, SG_PID) and stopped by bench_cleanup.
DIST_DIRS=()
SGD_PID=""
dist_cleanup() {
    local rc=$?
    set +e
    if [[ -n "$SGD_PID" ]] && kill -0 "$SGD_PID" 2>/dev/null; then
        kill -TERM "$SGD_PID"; for _ in $(seq 50); do kill -0 "$SGD_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$SGD_PID" 2>/dev/null
    fi
    for d in "${DIST_DIRS[@]}"; do
        as_pg "$PG_BIN/pg_ctl" -D "$d" -m immediate -w stop >/dev/null 2>&1
    done
    (exit $rc)
    bench_cleanup
}
trap dist_cleanup EXIT

# start_node NAME: initdb + start a Postgres for the distributed setup; sets NODE_PORT.
# Same settings as common.sh's start_postgres, plus what shardgate needs of its nodes.
start_node() {
    local name="$1" dir="$WORK/$1"
    NODE_PORT="$(free_port)"
    mkdir -p "$dir"
    chown -R postgres:postgres "$WORK"
    as_pg "$PG_BIN/initdb" -D "$dir" -U postgres --auth=trust -E UTF8 --locale=C >"$WORK/initdb-$name.log" 2>&1
    cat >>"$dir/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $NODE_PORT
unix_socket_directories = '$WORK'
max_connections = 200
max_prepared_transactions = 200
wal_level = logical
shared_buffers = 512MB
fsync = off
synchronous_commit = off
full_page_writes = off
logging_collector = off
${PG_EXTRA_CONF:-}
CONF
    as_pg "$PG_BIN/pg_ctl" -D "$dir" -l "$WORK/$name.log" -w -t 60 start >/dev/null
    DIST_DIRS+=("$dir")
    log "$name listening on 127.0.0.1:$NODE_PORT"
}

start_distributed_router() {
    SGD_PORT="$(free_port)"
    SGD_METRICS_PORT="$(free_port)"
    cat >"$WORK/shardgate-dist.toml" <<CONF
[server]
listen = "127.0.0.1:$SGD_PORT"
metrics_listen = "127.0.0.1:$SGD_METRICS_PORT"
auth_method = "trust"
pool_size = ${DIST_POOL_SIZE:-$POOL_SIZE}
pool_mode = "transaction"
max_client_connections = 20000
worker_threads = ${SG_WORKER_THREADS:-0}
[coordinator]
host = "127.0.0.1"
port = $COORD_PORT
[[workers]]
name = "worker1"
host = "127.0.0.1"
port = $W1_PORT
[[workers]]
name = "worker2"
host = "127.0.0.1"
port = $W2_PORT
[[users]]
name = "postgres"
[planner]
promote_simple_queries = ${PROMOTE:-true}
CONF
    "$SHARDGATE" serve --config "$WORK/shardgate-dist.toml" >"$WORK/shardgate-dist.log" 2>&1 &
    SGD_PID=$!
    wait_port 127.0.0.1 "$SGD_PORT" "shardgate (distributed)"
    log "shardgate distributed (pid $SGD_PID) listening on 127.0.0.1:$SGD_PORT"
}

sql_at() { # port sql...: psql -At against 127.0.0.1:port, database postgres
    local port="$1"; shift
    local args=()
    for s in "$@"; do args+=(-c "$s"); done
    psql -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d postgres "${args[@]}"
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; } # utime+stime of a pid (all threads)
metric() { # metrics-port name: the sum of the samples of one metric
    curl -fsS "http://127.0.0.1:$1/metrics" 2>/dev/null | awk -v n="$2" '$1 == n || index($1, n"{") == 1 {s += $2} END {printf "%d", s}'
}
