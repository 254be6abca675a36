#!/usr/bin/env bash
# Where the CPU goes during `pgbench -S` through each target (direct, PgBouncer, shardgate).
#
#   bench/cpu_split.sh                  # MODE=simple DURATION=20
#   MODE=prepared PERF=1 bench/cpu_split.sh
#
# Same setup as pgbench_compare.sh. For each target, runs pgbench for DURATION seconds and
# takes a `top -b` sample over the middle SAMPLE seconds, summing %CPU per command
# (pgbench / postgres / pgbouncer / shardgate / other). With PERF=1 also records
# `perf record -g` of shardgate during its run and prints the top symbols.

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
DURATION="${DURATION:-20}"
SAMPLE="${SAMPLE:-10}"
MODE="${MODE:-simple}"
SCALE="${SCALE:-10}"
raise_nofile
ensure_shardgate
start_postgres
start_pgbouncer
start_shardgate
pgbench -i -q -s "$SCALE" -h 127.0.0.1 -p "$PG_PORT" -U postgres postgres >"$WORK/pgbench-init.log" 2>&1

for t in direct pgbouncer shardgate; do
    [[ "$t" == pgbouncer && "$MODE" == prepared ]] && ! pgbouncer_supports_prepared && continue
    case "$t" in direct) port=$PG_PORT;; pgbouncer) port=$PGB_PORT;; shardgate) port=$SG_PORT;; esac
    pgbench -n -S -M "$MODE" -c 16 -j 2 -T "$DURATION" -h 127.0.0.1 -p "$port" -U postgres postgres \
        >"$WORK/cpu-$t.log" 2>&1 &
    bp=$!
    sleep $(( (DURATION - SAMPLE) / 2 ))
    if [[ "${PERF:-0}" == 1 && "$t" == shardgate ]]; then
        perf record -q -g -F 999 -p "$SG_PID" -o "$WORK/perf.data" -- sleep "$SAMPLE" 2>/dev/null &
        PERF_PID=$!
    fi
    STAT_PID=""
    if [[ "$t" != direct ]] && command -v perf >/dev/null; then
        case "$t" in pgbouncer) ppid=$PGB_PID;; shardgate) ppid=$SG_PID;; esac
        perf stat -x, -e raw_syscalls:sys_enter,context-switches,cpu-migrations,task-clock -p "$ppid" \
            -o "$WORK/stat-$t.csv" -- sleep "$SAMPLE" >/dev/null 2>&1 &
        STAT_PID=$!
    fi
    top -b -d "$SAMPLE" -n 2 -w 200 >"$WORK/top-$t.txt"
    [[ -n "$STAT_PID" ]] && wait "$STAT_PID"
    wait "$bp"
    tps="$(sed -n 's/^tps = \([0-9.]*\) (without.*/\1/p' "$WORK/cpu-$t.log")"
    echo "== $t ($MODE): tps=$tps; %CPU summed per command over ${SAMPLE}s (200% = both cores)"
    # Second top iteration only (the first is since-boot averages).
    awk '/^top -/{n++} n==2 && $1 ~ /^[0-9]+$/ {c=$12; sub(/:.*/,"",c); cpu[c]+=$9} n==2 && /^%Cpu/ {print "   " $0}
         END {for (k in cpu) if (cpu[k] >= 1) printf "   %-16s %6.1f%%\n", k, cpu[k]}' "$WORK/top-$t.txt" | sort -k2 -nr
    if [[ -s "$WORK/stat-$t.csv" ]]; then
        # Per transaction, assuming the sampled window ran at the run's average tps.
        awk -F, -v tps="$tps" -v s="$SAMPLE" '$3 ~ /sys_enter|context-switches|cpu-migrations|task-clock/ && $1 != "" {
            n = tps * s; printf "   %-28s %12s  = %.2f per txn\n", $3, $1, ($3 == "task-clock" ? $1 * 1000 : $1) / n }' \
            "$WORK/stat-$t.csv" | sed 's/task-clock \(.*\) per txn/task-clock (ms) \1 us per txn/'
    fi
done
[[ -n "${PERF_PID:-}" ]] && wait "$PERF_PID"
if [[ "${PERF:-0}" == 1 && -s "$WORK/perf.data" ]]; then
    echo "== perf: shardgate top symbols (self, children excluded)"
    perf report -i "$WORK/perf.data" --no-children --sort dso,symbol --stdio 2>/dev/null | grep -E '^ +[0-9]' | head -30 || true
fi
