#!/usr/bin/env bash
# Memory cost of idle client connections on shardgate.
#
#   bench/idle_connections.sh            # N=10000
#   N=20000 bench/idle_connections.sh
#
# Self-contained: temp Postgres 15 (trust) + shardgate (transaction mode, pool_size POOL_SIZE).
# Opens N client connections that complete startup (StartupMessage -> ReadyForQuery) and stay
# idle, then reports shardgate's VmRSS before/after and the per-connection cost.
# Target (DESIGN.md "Performance budgets"): <= 100 MB for 10k idle connections.

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

N="${N:-10000}"
CONCURRENCY="${CONCURRENCY:-200}"

raise_nofile
ensure_shardgate
start_postgres
start_shardgate

rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$SG_PID/status"; }
threads() { awk '/^Threads:/ {print $2}' "/proc/$SG_PID/status"; }
fds() { ls "/proc/$SG_PID/fd" | wc -l; }
backends() {
    psql -At -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres \
        -c "select count(*) from pg_stat_activity where backend_type = 'client backend' and pid <> pg_backend_pid()"
}

RSS_START="$(rss_kb)"
# Warm up: one query through the router so the pool and the per-user state exist.
psql -At -h 127.0.0.1 -p "$SG_PORT" -U postgres -d postgres -c 'select 1' >/dev/null
sleep 1
RSS_BEFORE="$(rss_kb)"
log "shardgate VmRSS at start ${RSS_START} kB, after warm-up query ${RSS_BEFORE} kB"

READY="$WORK/idle.ready"
python3 "$(dirname "${BASH_SOURCE[0]}")/idle_clients.py" 127.0.0.1 "$SG_PORT" "$N" "$READY" "$CONCURRENCY" \
    >"$WORK/idle_clients.log" 2>&1 &
CLIENT_PID=$!
trap 'kill -TERM $CLIENT_PID 2>/dev/null || true; bench_cleanup' EXIT
for _ in $(seq 1200); do
    [[ -s "$READY" ]] && break
    kill -0 "$CLIENT_PID" 2>/dev/null || { cat "$WORK/idle_clients.log"; log "client died"; exit 1; }
    sleep 0.5
done
[[ -s "$READY" ]] || { log "clients did not finish within 600 s"; tail -50 "$WORK/shardgate.log"; exit 1; }
SUMMARY="$(cat "$READY")"
log "clients: $SUMMARY"
sleep 2
RSS_AFTER="$(rss_kb)"
THREADS_AFTER="$(threads)"
FDS_AFTER="$(fds)"
BACKENDS_AFTER="$(backends)"
# The router must still serve queries with N idle clients attached.
SANITY="$(psql -At -h 127.0.0.1 -p "$SG_PORT" -U postgres -d postgres -c 'select 42' 2>&1 || true)"

kill -TERM "$CLIENT_PID"; wait "$CLIENT_PID" 2>/dev/null || true
sleep 3
RSS_CLOSED="$(rss_kb)"

READY_N="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["ready"])' "$SUMMARY")"
ERRORS_N="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["errors"])' "$SUMMARY")"
DELTA=$(( RSS_AFTER - RSS_BEFORE ))
echo
echo "## shardgate idle connections ($N requested, pool_size $POOL_SIZE, transaction mode)"
echo "clients ready / errors          : $READY_N / $ERRORS_N   ($SUMMARY)"
echo "VmRSS at start                  : $RSS_START kB"
echo "VmRSS before (after warm-up)    : $RSS_BEFORE kB"
echo "VmRSS with $READY_N idle clients  : $RSS_AFTER kB  ($(awk -v k="$RSS_AFTER" 'BEGIN{printf "%.1f", k/1024}') MiB)"
echo "delta                           : $DELTA kB  ($(awk -v d="$DELTA" 'BEGIN{printf "%.1f", d/1024}') MiB)"
echo "per connection                  : $(awk -v d="$DELTA" -v n="$READY_N" 'BEGIN{ if (n>0) printf "%.0f bytes (%.2f KiB)", d*1024/n, d/n; else print "n/a"}')"
echo "VmRSS after clients closed      : $RSS_CLOSED kB"
echo "router threads / open fds       : $THREADS_AFTER / $FDS_AFTER"
echo "Postgres client backends        : $BACKENDS_AFTER (with the idle clients attached)"
echo "query through router while idle : $SANITY"
if (( READY_N < N || ERRORS_N > 0 )); then
    echo "NOT ALL CONNECTIONS COMPLETED STARTUP; shardgate log tail:"; tail -30 "$WORK/shardgate.log"
    exit 1
fi
if (( RSS_AFTER <= 100 * 1024 )); then
    echo "budget (<= 100 MB for 10k idle): PASS"
else
    echo "budget (<= 100 MB for 10k idle): FAIL"
fi
