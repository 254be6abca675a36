#!/usr/bin/env bash
# Compare pooled pass-through throughput: direct Postgres vs PgBouncer vs shardgate.
#
#   bench/pgbench_compare.sh                      # ROUNDS=3 DURATION=20
#   ROUNDS=3 DURATION=5 bench/pgbench_compare.sh  # smoke run
#
# Self-contained: creates a temp Postgres 15 cluster (trust auth, 127.0.0.1, free port,
# max_connections 200), PgBouncer (transaction mode, default_pool_size = POOL_SIZE) and
# shardgate (transaction mode, pool_size = POOL_SIZE), runs `pgbench -i -s SCALE` directly
# against Postgres, then for each round and each mode (simple, prepared) runs
# `pgbench -n -S -M MODE -c CLIENTS -j THREADS -T DURATION` against each target, with the
# target order rotated every round. Prints raw per-run tps, medians and ratios.
# Everything is torn down on exit. Stops at the first failing run (non-zero pgbench exit,
# failed or aborted transactions) and prints the pgbench output and the proxy's log.

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ROUNDS="${ROUNDS:-3}"
DURATION="${DURATION:-20}"
CLIENTS="${CLIENTS:-16}"
THREADS="${THREADS:-2}"
SCALE="${SCALE:-10}"
MODES="${MODES:-simple prepared}"
CLK_TCK="$(getconf CLK_TCK)"

raise_nofile
ensure_shardgate

PGB_VERSION="$("$PGBOUNCER" --version | head -1)"
if pgbouncer_supports_prepared; then
    PGB_PREPARED=1
    PGB_MAX_PREPARED="${PGB_MAX_PREPARED:-200}"
else
    PGB_PREPARED=0
    log "$PGB_VERSION < 1.21: no max_prepared_statements, so PgBouncer cannot run -M prepared" \
        "in transaction mode; its prepared results are reported as N/A"
fi

start_postgres
start_pgbouncer
start_shardgate

log "pgbench -i -s $SCALE (direct)"
pgbench -i -q -s "$SCALE" -h 127.0.0.1 -p "$PG_PORT" -U postgres postgres >"$WORK/pgbench-init.log" 2>&1
psql -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -c 'VACUUM ANALYZE' -c 'CHECKPOINT' >/dev/null

port_of() { case "$1" in direct) echo "$PG_PORT";; pgbouncer) echo "$PGB_PORT";; shardgate) echo "$SG_PORT";; esac; }
pid_of()  { case "$1" in pgbouncer) echo "$PGB_PID";; shardgate) echo "$SG_PID";; *) echo "";; esac; }
cpu_ticks() { # utime+stime of a pid (all threads)
    [[ -n "$1" ]] || { echo 0; return; }
    awk '{print $14 + $15}' "/proc/$1/stat"
}

RAW="$WORK/raw.tsv"
printf 'round\tmode\ttarget\ttps\tfailed\tlat_ms\tproxy_cpu_s\tproxy_us_per_txn\tload1_before\n' >"$RAW"
TARGETS=(direct pgbouncer shardgate)

for ((r = 1; r <= ROUNDS; r++)); do
    for mode in $MODES; do
        for ((k = 0; k < 3; k++)); do
            t="${TARGETS[$(( (k + r - 1) % 3 ))]}"
            if [[ "$t" == pgbouncer && "$mode" == prepared && "$PGB_PREPARED" == 0 ]]; then
                printf '%s\t%s\t%s\tN/A\t-\t-\t-\t-\t-\n' "$r" "$mode" "$t" >>"$RAW"
                log "round $r $mode $t: N/A ($PGB_VERSION)"
                continue
            fi
            out="$WORK/pgbench-r$r-$mode-$t.log"
            pid="$(pid_of "$t")"
            load1="$(cut -d' ' -f1 /proc/loadavg)"
            c0="$(cpu_ticks "$pid")"
            set +e
            pgbench -n -S -M "$mode" -c "$CLIENTS" -j "$THREADS" -T "$DURATION" \
                -h 127.0.0.1 -p "$(port_of "$t")" -U postgres postgres >"$out" 2>&1
            rc=$?
            set -e
            c1="$(cpu_ticks "$pid")"
            tps="$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time)/\1/p' "$out")"
            failed="$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$out")"
            lat="$(sed -n 's/^latency average = \([0-9.]*\) ms/\1/p' "$out")"
            if [[ $rc -ne 0 || -z "$tps" || "${failed:-0}" != 0 ]] || grep -qiE 'aborted|error' "$out"; then
                log "FAILED: round $r mode $mode target $t (exit $rc)"
                echo "---- command: pgbench -n -S -M $mode -c $CLIENTS -j $THREADS -T $DURATION -h 127.0.0.1 -p $(port_of "$t") -U postgres postgres"
                echo "---- pgbench output:"; cat "$out"
                echo "---- shardgate log (tail):"; tail -50 "$WORK/shardgate.log"
                echo "---- pgbouncer log (tail):"; tail -20 "$WORK/pgbouncer/pgbouncer.log"
                exit 1
            fi
            if [[ -n "$pid" ]]; then
                cpu_s="$(awk -v a="$c0" -v b="$c1" -v h="$CLK_TCK" 'BEGIN{printf "%.2f", (b-a)/h}')"
                us="$(awk -v c="$cpu_s" -v t="$tps" -v d="$DURATION" 'BEGIN{printf "%.1f", c*1e6/(t*d)}')"
            else
                cpu_s="-"; us="-"
            fi
            printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$r" "$mode" "$t" "$tps" "${failed:-0}" "$lat" "$cpu_s" "$us" "$load1" >>"$RAW"
            log "round $r $mode $t: tps=$tps lat=${lat}ms proxy_cpu=${cpu_s}s"
        done
    done
done

echo
echo "# pgbench -n -S -c $CLIENTS -j $THREADS -T $DURATION, scale $SCALE, $ROUNDS rounds, pool size $POOL_SIZE"
echo "# $PGB_VERSION; $("$SHARDGATE" --version 2>/dev/null || echo shardgate); $("$PG_BIN/postgres" --version)"
echo
echo "## raw runs"
column -t -s $'\t' "$RAW"
echo
python3 - "$RAW" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
modes = list(dict.fromkeys(r["mode"] for r in rows))
targets = ["direct", "pgbouncer", "shardgate"]
def med(mode, t, key="tps"):
    v = [float(r[key]) for r in rows if r["mode"] == mode and r["target"] == t and r[key] not in ("N/A", "-")]
    return statistics.median(v) if v else None
fmt = lambda x, p=0: "N/A" if x is None else f"{x:.{p}f}"
print("## medians (tps)")
print(f"{'mode':<10}{'direct':>10}{'pgbouncer':>11}{'shardgate':>11}{'sg/pgb':>9}{'sg/direct':>11}{'pgb/direct':>12}{'pgb us/txn':>12}{'sg us/txn':>11}")
for m in modes:
    d, p, s = (med(m, t) for t in targets)
    ratio = lambda a, b: None if a is None or b is None else a / b
    print(f"{m:<10}{fmt(d):>10}{fmt(p):>11}{fmt(s):>11}{fmt(ratio(s,p),3):>9}{fmt(ratio(s,d),3):>11}{fmt(ratio(p,d),3):>12}"
          f"{fmt(med(m,'pgbouncer','proxy_us_per_txn'),1):>12}{fmt(med(m,'shardgate','proxy_us_per_txn'),1):>11}")
print()
print("(us/txn = proxy process CPU time (user+sys) per pgbench transaction, median over rounds)")
print()
print("## per-round shardgate/pgbouncer (paired within a round)")
for m in modes:
    rs = []
    for r in sorted({x["round"] for x in rows}, key=int):
        get = lambda t, k="tps": next((x[k] for x in rows if x["round"] == r and x["mode"] == m and x["target"] == t), None)
        p, s = get("pgbouncer"), get("shardgate")
        if p not in (None, "N/A") and s not in (None, "N/A"):
            rs.append((float(s) / float(p), float(get("shardgate", "proxy_us_per_txn")) / float(get("pgbouncer", "proxy_us_per_txn"))))
    if rs:
        print(f"{m}: tps ratio per round " + " ".join(f"{a:.3f}" for a, _ in rs) + f"  (median {statistics.median(a for a, _ in rs):.3f})")
        print(f"{m}: proxy CPU/txn ratio per round " + " ".join(f"{b:.2f}" for _, b in rs) + f"  (median {statistics.median(b for _, b in rs):.2f})")
    else:
        print(f"{m}: N/A")
PY
if [[ -n "${RAW_OUT:-}" ]]; then cp "$RAW" "$RAW_OUT"; fi
