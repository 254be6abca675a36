#!/usr/bin/env bash
# Routed single-shard statements vs plain pooled pass-through, side by side (issue 4;
# DESIGN.md budget: a single-tenant query on a distributed table within 10 % of plain
# pooled pass-through).
#
#   bench/pgbench_distributed.sh                                # ROUNDS=3 DURATION=20
#   ROUNDS=1 DURATION=5 bench/pgbench_distributed.sh            # smoke run
#   MODES="simple extended prepared" bench/pgbench_distributed.sh
#   PERF=1 ROUNDS=1 bench/pgbench_distributed.sh               # + perf profile of the router
#   STRACE=1 ROUNDS=1 bench/pgbench_distributed.sh             # + syscalls per transaction
#   PROMOTE=false bench/pgbench_distributed.sh                  # simple queries as text on workers
#
# Self-contained (temp dirs, free ports on 127.0.0.1, trust auth, torn down on exit):
#  (a) passthrough: shardgate in front of ONE plain Postgres; `pgbench -i -s SCALE`
#      directly against it, then VACUUM ANALYZE + CHECKPOINT;
#  (b) distributed: shardgate in front of a coordinator and 2 worker Postgres servers
#      (`[[workers]]`, max_prepared_transactions > 0 and wal_level = logical as
#      `shardgate dev` sets them); `pgbench -i -s SCALE` THROUGH the router, then
#      `SELECT create_distributed_table('pgbench_accounts', 'aid', shard_count => SHARDS)`
#      through the router, then VACUUM ANALYZE + CHECKPOINT on every node.
# Both routers use the same pool_size (POOL_SIZE, default 8; in (b) that is per node,
# so 16 worker backends against 8; DIST_POOL_SIZE sets (b)'s alone, e.g. 4 for the same
# total number of backends).
# For each round and each mode: `pgbench -n -S -M MODE -c CLIENTS -j THREADS -T DURATION`
# against both, the order alternating from round to round. Prints raw tps per run, the
# router's CPU time (user+sys from /proc) per transaction, the same for the Postgres
# servers behind it (every process of each postmaster; for (b) also split by server in
# the log), per-mode medians and the ratio
# distributed/passthrough (target >= 0.9), then checks correctness: 0 failed
# transactions in every run, a row for `aid = 12345` through the distributed router,
# all SCALE*100000 rows in the shards on the workers, and plan-cache hits in the
# router's metrics. Stops at the first failing run and prints pgbench's output and the
# router's log.

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ROUNDS="${ROUNDS:-3}"
DURATION="${DURATION:-20}"
CLIENTS="${CLIENTS:-16}"
THREADS="${THREADS:-2}"
SCALE="${SCALE:-10}"
SHARDS="${SHARDS:-32}"
MODES="${MODES:-simple prepared}"
CLK_TCK="$(getconf CLK_TCK)"

source "$(dirname "${BASH_SOURCE[0]}")/dist_common.sh"

raise_nofile
ensure_shardgate

# (a) passthrough
start_postgres
start_shardgate
log "passthrough: pgbench -i -s $SCALE (direct)"
pgbench -i -q -s "$SCALE" -h 127.0.0.1 -p "$PG_PORT" -U postgres postgres >"$WORK/pgbench-init-pass.log" 2>&1
sql_at "$PG_PORT" 'VACUUM ANALYZE' 'CHECKPOINT' >/dev/null

# (b) distributed
start_node coordinator; COORD_PORT="$NODE_PORT"
start_node worker1; W1_PORT="$NODE_PORT"
start_node worker2; W2_PORT="$NODE_PORT"
start_distributed_router
log "distributed: pgbench -i -s $SCALE (through the router)"
if ! pgbench -i -q -s "$SCALE" -h 127.0.0.1 -p "$SGD_PORT" -U postgres postgres >"$WORK/pgbench-init-dist.log" 2>&1; then
    log "FAILED: pgbench -i through the distributed router"
    cat "$WORK/pgbench-init-dist.log"; tail -50 "$WORK/shardgate-dist.log"; exit 1
fi
log "distributed: create_distributed_table('pgbench_accounts', 'aid', shard_count => $SHARDS)"
t0="$(date +%s.%N)"
sql_at "$SGD_PORT" "SELECT create_distributed_table('pgbench_accounts', 'aid', shard_count => $SHARDS)" >/dev/null
log "distributed: done in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s"
for p in "$COORD_PORT" "$W1_PORT" "$W2_PORT"; do
    sql_at "$p" 'VACUUM ANALYZE' 'CHECKPOINT' >/dev/null
done

# Rows per node after distribution (the shards are pgbench_accounts_<shardid>).
count_shard_rows() { # port
    sql_at "$1" "SELECT coalesce(sum((xpath('/row/c/text()', query_to_xml(format('SELECT count(*) AS c FROM %I.%I', schemaname, tablename), false, true, '')))[1]::text::bigint), 0)
                 FROM pg_tables WHERE tablename ~ '^pgbench_accounts_[0-9]+\$'"
}
W1_ROWS="$(count_shard_rows "$W1_PORT")"
W2_ROWS="$(count_shard_rows "$W2_PORT")"
W1_SHARDS="$(sql_at "$W1_PORT" "SELECT count(*) FROM pg_tables WHERE tablename ~ '^pgbench_accounts_[0-9]+\$'")"
W2_SHARDS="$(sql_at "$W2_PORT" "SELECT count(*) FROM pg_tables WHERE tablename ~ '^pgbench_accounts_[0-9]+\$'")"
log "shards: worker1 $W1_SHARDS shards / $W1_ROWS rows, worker2 $W2_SHARDS shards / $W2_ROWS rows"

port_of() { case "$1" in passthrough) echo "$SG_PORT";; distributed) echo "$SGD_PORT";; esac; }
pid_of()  { case "$1" in passthrough) echo "$SG_PID";; distributed) echo "$SGD_PID";; esac; }
log_of()  { case "$1" in passthrough) echo "$WORK/shardgate.log";; distributed) echo "$WORK/shardgate-dist.log";; esac; }

RAW="$WORK/raw.tsv"
printf 'round\tmode\ttarget\ttps\tfailed\tlat_ms\trouter_cpu_s\trouter_us_per_txn\tpg_us_per_txn\tpg_cs_per_txn\tload1_before\n' >"$RAW"
TARGETS=(passthrough distributed)
# The Postgres servers behind each target: their processes' CPU per transaction tells
# the router's share of a gap from the servers'.
pg_dirs_of() { case "$1" in passthrough) echo "$PG_DATA";; distributed) echo "${DIST_DIRS[*]}";; esac; }
pg_cpu_ticks() { # data dirs...: utime+stime of every postmaster and its children
    local total=0 pm pid
    for d in "$@"; do
        pm="$(head -1 "$d/postmaster.pid")"
        for pid in "$pm" $(pgrep -P "$pm"); do
            total=$(( total + $(cpu_ticks "$pid" 2>/dev/null || echo 0) ))
        done
    done
    echo "$total"
}

pg_ctx_switches() { # data dirs...: voluntary + involuntary context switches of every postmaster and its children
    local total=0 pm pid n
    for d in "$@"; do
        pm="$(head -1 "$d/postmaster.pid")"
        for pid in "$pm" $(pgrep -P "$pm"); do
            n="$(awk '/^(non)?voluntary_ctxt_switches/ {s += $2} END {print s + 0}' "/proc/$pid/status" 2>/dev/null || echo 0)"
            total=$(( total + n ))
        done
    done
    echo "$total"
}

for ((r = 1; r <= ROUNDS; r++)); do
    for mode in $MODES; do
        for ((k = 0; k < 2; k++)); do
            t="${TARGETS[$(( (k + r - 1) % 2 ))]}"
            out="$WORK/pgbench-r$r-$mode-$t.log"
            pid="$(pid_of "$t")"
            load1="$(cut -d' ' -f1 /proc/loadavg)"
            c0="$(cpu_ticks "$pid")"
            # shellcheck disable=SC2046
            g0="$(pg_cpu_ticks $(pg_dirs_of "$t"))"
            # shellcheck disable=SC2046
            s0="$(pg_ctx_switches $(pg_dirs_of "$t"))"
            n0=()
            for d in "${DIST_DIRS[@]}"; do n0+=("$(pg_cpu_ticks "$d")"); done
            PERF_PID=""
            if [[ "${PERF:-0}" == 1 && "$t" == distributed && "$r" == 1 ]] && command -v perf >/dev/null; then
                # A profile of the distributed router in the middle of the run.
                (sleep $(( DURATION / 4 )); perf record -q -g -F 999 -p "$pid" -o "$WORK/perf-$mode.data" -- sleep $(( DURATION / 2 )) >/dev/null 2>&1) &
                PERF_PID=$!
            fi
            PGPERF_PID=""
            if [[ "${PGPERF:-0}" == 1 && "$r" == 1 ]] && command -v perf >/dev/null; then
                # A system-wide profile in the middle of the run, reported for the Postgres
                # processes alone: where the servers behind each target spend their time.
                (sleep $(( DURATION / 4 )); perf record -q -a -F 1999 -o "$WORK/pgperf-$mode-$t.data" -- sleep $(( DURATION / 2 )) >/dev/null 2>&1) &
                PGPERF_PID=$!
            fi
            STRACE_PID=""
            if [[ "${STRACE:-0}" == 1 && "$r" == 1 ]] && command -v strace >/dev/null; then
                # The router's syscalls in the middle of the run (strace slows it down:
                # these runs' tps are not comparable with the others).
                (sleep $(( DURATION / 4 )); timeout -s INT $(( DURATION / 2 )) strace -c -f -p "$pid" -o "$WORK/strace-$mode-$t.txt" >/dev/null 2>&1) &
                STRACE_PID=$!
            fi
            set +e
            pgbench -n -S -M "$mode" -c "$CLIENTS" -j "$THREADS" -T "$DURATION" \
                -h 127.0.0.1 -p "$(port_of "$t")" -U postgres postgres >"$out" 2>&1
            rc=$?
            set -e
            if [[ -n "$STRACE_PID" ]]; then
                wait "$STRACE_PID" || true
                log "strace: syscalls of the $t router ($mode) in $WORK/strace-$mode-$t.txt"
            fi
            if [[ -n "$PGPERF_PID" ]]; then
                wait "$PGPERF_PID"
                {
                    echo "# by command (samples)"
                    perf report -i "$WORK/pgperf-$mode-$t.data" -n --no-children --stdio --sort comm 2>/dev/null | grep -E '^ +[0-9]' | head -8
                    echo "# postgres processes by symbol (samples)"
                    perf report -i "$WORK/pgperf-$mode-$t.data" -n --no-children --stdio --comm postgres --sort dso,sym 2>/dev/null | grep -E '^ +[0-9]' | head -60
                } >"$WORK/pgperf-$mode-$t.txt" || true
                log "perf: the Postgres servers behind $t ($mode) in $WORK/pgperf-$mode-$t.txt"
            fi
            if [[ -n "$PERF_PID" ]]; then
                wait "$PERF_PID"
                {
                    echo "# by binary"
                    perf report -i "$WORK/perf-$mode.data" --no-children --stdio --sort dso 2>/dev/null | grep -E '^ +[0-9]' | head -8
                    echo "# shardgate's own symbols (share of all samples)"
                    perf report -i "$WORK/perf-$mode.data" --no-children --stdio --dso shardgate --sort sym 2>/dev/null | grep -E '^ +[0-9]' | head -30
                } >"$WORK/perf-$mode.txt" || true
                log "perf: top symbols of the distributed router ($mode) in $WORK/perf-$mode.txt"
            fi
            c1="$(cpu_ticks "$pid")"
            # shellcheck disable=SC2046
            g1="$(pg_cpu_ticks $(pg_dirs_of "$t"))"
            # shellcheck disable=SC2046
            s1="$(pg_ctx_switches $(pg_dirs_of "$t"))"
            if [[ "$t" == distributed ]]; then
                split=""
                for i in "${!DIST_DIRS[@]}"; do
                    split+=" $(basename "${DIST_DIRS[$i]}") $(awk -v a="${n0[$i]}" -v b="$(pg_cpu_ticks "${DIST_DIRS[$i]}")" -v h="$CLK_TCK" 'BEGIN{printf "%.2f", (b-a)/h}')s"
                done
                log "round $r $mode: Postgres CPU by server:$split"
            fi
            tps="$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time)/\1/p' "$out")"
            failed="$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$out")"
            lat="$(sed -n 's/^latency average = \([0-9.]*\) ms/\1/p' "$out")"
            if [[ $rc -ne 0 || -z "$tps" || "${failed:-0}" != 0 ]] || grep -qiE 'aborted|error' "$out"; then
                log "FAILED: round $r mode $mode target $t (exit $rc)"
                echo "---- command: pgbench -n -S -M $mode -c $CLIENTS -j $THREADS -T $DURATION -h 127.0.0.1 -p $(port_of "$t") -U postgres postgres"
                echo "---- pgbench output:"; cat "$out"
                echo "---- router log (tail):"; tail -50 "$(log_of "$t")"
                exit 1
            fi
            cpu_s="$(awk -v a="$c0" -v b="$c1" -v h="$CLK_TCK" 'BEGIN{printf "%.2f", (b-a)/h}')"
            us="$(awk -v c="$cpu_s" -v t="$tps" -v d="$DURATION" 'BEGIN{printf "%.1f", c*1e6/(t*d)}')"
            pg_us="$(awk -v a="$g0" -v b="$g1" -v h="$CLK_TCK" -v t="$tps" -v d="$DURATION" 'BEGIN{printf "%.1f", (b-a)/h*1e6/(t*d)}')"
            pg_cs="$(awk -v a="$s0" -v b="$s1" -v t="$tps" -v d="$DURATION" 'BEGIN{printf "%.2f", (b-a)/(t*d)}')"
            printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$r" "$mode" "$t" "$tps" "${failed:-0}" "$lat" "$cpu_s" "$us" "$pg_us" "$pg_cs" "$load1" >>"$RAW"
            log "round $r $mode $t: tps=$tps lat=${lat}ms router_cpu=${cpu_s}s (${us} us/txn) postgres ${pg_us} us/txn, ${pg_cs} context switches/txn"
        done
    done
done

# Correctness of the distributed setup after the runs.
CHECK_FAIL=0
ROW="$(sql_at "$SGD_PORT" 'SELECT abalance FROM pgbench_accounts WHERE aid = 12345')" || CHECK_FAIL=1
[[ -n "$ROW" ]] || CHECK_FAIL=1
ROW_PASS="$(sql_at "$SG_PORT" 'SELECT abalance FROM pgbench_accounts WHERE aid = 12345')"
[[ "$ROW" == "$ROW_PASS" ]] || CHECK_FAIL=1
COORD_ROWS="$(sql_at "$COORD_PORT" 'SELECT count(*) FROM ONLY pgbench_accounts')"
(( W1_ROWS + W2_ROWS == SCALE * 100000 )) || CHECK_FAIL=1
HITS="$(metric "$SGD_METRICS_PORT" shardgate_plan_cache_hits_total)"
MISSES="$(metric "$SGD_METRICS_PORT" shardgate_plan_cache_misses_total)"
REFUSALS="$(metric "$SGD_METRICS_PORT" shardgate_plan_refusals_total)"
PROMOTED="$(metric "$SGD_METRICS_PORT" shardgate_session_promoted_statements_total)"
[[ "${HITS:-0}" -gt 0 ]] || CHECK_FAIL=1
W1_COMMITS="$(sql_at "$W1_PORT" "SELECT xact_commit FROM pg_stat_database WHERE datname = 'postgres'")"
W2_COMMITS="$(sql_at "$W2_PORT" "SELECT xact_commit FROM pg_stat_database WHERE datname = 'postgres'")"
COORD_COMMITS="$(sql_at "$COORD_PORT" "SELECT xact_commit FROM pg_stat_database WHERE datname = 'postgres'")"
DIST_ERRORS="$(sed 's/\x1b\[[0-9;]*m//g' "$WORK/shardgate-dist.log" | awk '$2 == "ERROR" || $2 == "WARN"' | wc -l)"

echo
echo "# pgbench -n -S -c $CLIENTS -j $THREADS -T $DURATION, scale $SCALE, $ROUNDS rounds, pool size $POOL_SIZE (per node), $SHARDS shards"
echo "# $("$SHARDGATE" --version 2>/dev/null || echo shardgate); $("$PG_BIN/postgres" --version); nproc $(nproc)"
echo
echo "## raw runs"
column -t -s $'\t' "$RAW"
echo
python3 - "$RAW" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
modes = list(dict.fromkeys(r["mode"] for r in rows))
rounds = sorted({r["round"] for r in rows}, key=int)
def get(r, m, t, k="tps"):
    return next(float(x[k]) for x in rows if x["round"] == r and x["mode"] == m and x["target"] == t)
def med(m, t, k="tps"):
    return statistics.median(float(x[k]) for x in rows if x["mode"] == m and x["target"] == t)
print("## medians")
print(f"{'mode':<10}{'passthrough':>13}{'distributed':>13}{'dist/pass':>11}{'paired median':>15}{'pass us/txn':>13}{'dist us/txn':>13}{'pass pg us':>12}{'dist pg us':>12}  target")
for m in modes:
    p, d = med(m, "passthrough"), med(m, "distributed")
    paired = statistics.median(get(r, m, "distributed") / get(r, m, "passthrough") for r in rounds)
    ok = "met" if min(d / p, paired) >= 0.9 else ("NOT met" if max(d / p, paired) < 0.9 else "borderline")
    print(f"{m:<10}{p:>13.0f}{d:>13.0f}{d / p:>11.3f}{paired:>15.3f}"
          f"{med(m, 'passthrough', 'router_us_per_txn'):>13.1f}{med(m, 'distributed', 'router_us_per_txn'):>13.1f}"
          f"{med(m, 'passthrough', 'pg_us_per_txn'):>12.1f}{med(m, 'distributed', 'pg_us_per_txn'):>12.1f}  >= 0.9: {ok}")
print()
print("## per round distributed/passthrough (tps; router CPU per txn)")
for m in modes:
    print(f"{m}: tps " + " ".join(f"{get(r, m, 'distributed') / get(r, m, 'passthrough'):.3f}" for r in rounds)
          + "; CPU/txn " + " ".join(f"{get(r, m, 'distributed', 'router_us_per_txn') / get(r, m, 'passthrough', 'router_us_per_txn'):.2f}" for r in rounds))
print()
print("(us/txn = the router process's user+sys CPU time per pgbench transaction;")
print(" pg us = the same for every process of the Postgres servers behind the target)")
PY
echo
for f in "$WORK"/perf-*.txt; do
    [[ -s "$f" ]] || continue
    echo "## perf: $(basename "$f" .txt) (self time, top symbols of the distributed router)"
    cat "$f"
    echo
done
echo "## correctness (distributed setup)"
echo "SELECT abalance FROM pgbench_accounts WHERE aid = 12345 : distributed '${ROW}', passthrough '${ROW_PASS}'"
echo "rows in shards on the workers                           : $W1_ROWS + $W2_ROWS = $((W1_ROWS + W2_ROWS)) (expected $((SCALE * 100000))); shards $W1_SHARDS + $W2_SHARDS"
echo "rows left in the coordinator's pgbench_accounts        : $COORD_ROWS"
echo "router plan cache: hits $HITS, misses $MISSES, refusals $REFUSALS; simple queries run prepared on workers: $PROMOTED (PROMOTE=${PROMOTE:-true})"
echo "transactions committed (pg_stat_database)               : worker1 $W1_COMMITS, worker2 $W2_COMMITS, coordinator $COORD_COMMITS"
echo "failed transactions in every pgbench run                : 0 (a run with failures stops the script)"
echo "ERROR/WARN lines in the distributed router's log        : $DIST_ERRORS"
if [[ "$CHECK_FAIL" != 0 ]]; then
    log "CORRECTNESS CHECK FAILED"; tail -50 "$WORK/shardgate-dist.log"; exit 1
fi
if [[ -n "${RAW_OUT:-}" ]]; then cp "$RAW" "$RAW_OUT"; fi
