#!/usr/bin/env bash
# Distributed transactions (two-phase commit) vs one Postgres through pass-through,
# side by side (issue 5): pgbench's tpcb-like script.
#
#   bench/pgbench_tpcb_distributed.sh                         # ROUNDS=3 DURATION=20
#   ROUNDS=1 DURATION=5 bench/pgbench_tpcb_distributed.sh     # smoke run
#   MODES="simple prepared" CLIENTS=8 bench/pgbench_tpcb_distributed.sh
#
# Self-contained (temp dirs, free ports on 127.0.0.1, trust auth, torn down on exit):
#  (a) passthrough: shardgate in front of ONE plain Postgres; `pgbench -i -s SCALE`
#      directly against it;
#  (b) distributed: shardgate in front of a coordinator and 2 workers; `pgbench -i`
#      through the router, then every pgbench table distributed through the router:
#      accounts by aid, tellers by tid, branches by bid, history by aid (SHARDS each).
#      A tpcb-like transaction touches the shards of its aid, tid and bid: most
#      transactions write on both workers and commit with two-phase commit.
# For each round and mode: `pgbench -n -f tpcb-like.sql -s SCALE -M MODE -c CLIENTS -j THREADS -T
# DURATION` against both, the order alternating. Prints tps and latency per run, the
# ratio distributed/passthrough, the two-phase commits and the mean time of each 2PC
# step (from the router's shardgate_2pc_phase_seconds) with its share of the mean
# transaction latency. Then checks: 0 failed transactions, sum(abalance) =
# sum(tbalance) = sum(bbalance) = sum(history.delta) through the router, and no
# prepared transaction left on any node.
# Note: the servers run with fsync = off and synchronous_commit = off (as the other
# benchmarks here): this measures the router and the round trips of 2PC, not disk
# flushes, which a real deployment adds to PREPARE, the commit record and COMMIT
# PREPARED alike.

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
source "$(dirname "${BASH_SOURCE[0]}")/dist_common.sh"

ROUNDS="${ROUNDS:-3}"
DURATION="${DURATION:-20}"
CLIENTS="${CLIENTS:-8}"
THREADS="${THREADS:-2}"
SCALE="${SCALE:-10}"
SHARDS="${SHARDS:-16}"
MODES="${MODES:-simple prepared}"

raise_nofile
ensure_shardgate

start_postgres
start_shardgate
log "passthrough: pgbench -i -s $SCALE (direct)"
pgbench -i -q -s "$SCALE" -h 127.0.0.1 -p "$PG_PORT" -U postgres postgres >"$WORK/pgbench-init-pass.log" 2>&1
sql_at "$PG_PORT" 'VACUUM ANALYZE' 'CHECKPOINT' >/dev/null

start_node coordinator; COORD_PORT="$NODE_PORT"
start_node worker1; W1_PORT="$NODE_PORT"
start_node worker2; W2_PORT="$NODE_PORT"
start_distributed_router
log "distributed: pgbench -i -s $SCALE (through the router)"
if ! pgbench -i -q -s "$SCALE" -h 127.0.0.1 -p "$SGD_PORT" -U postgres postgres >"$WORK/pgbench-init-dist.log" 2>&1; then
    log "FAILED: pgbench -i through the distributed router"
    cat "$WORK/pgbench-init-dist.log"; tail -50 "$WORK/shardgate-dist.log"; exit 1
fi
for t in "pgbench_accounts aid" "pgbench_tellers tid" "pgbench_branches bid" "pgbench_history aid"; do
    set -- $t
    log "distributed: create_distributed_table('$1', '$2', shard_count => $SHARDS)"
    sql_at "$SGD_PORT" "SELECT create_distributed_table('$1', '$2', shard_count => $SHARDS)" >/dev/null
done
for p in "$COORD_PORT" "$W1_PORT" "$W2_PORT"; do
    sql_at "$p" 'VACUUM ANALYZE' 'CHECKPOINT' >/dev/null
done

port_of() { case "$1" in passthrough) echo "$SG_PORT";; distributed) echo "$SGD_PORT";; esac; }
log_of()  { case "$1" in passthrough) echo "$WORK/shardgate.log";; distributed) echo "$WORK/shardgate-dist.log";; esac; }
phase_sum() { # phase: seconds spent in that 2PC step so far
    curl -fsS "http://127.0.0.1:$SGD_METRICS_PORT/metrics" | awk -v p="$1" 'index($1, "shardgate_2pc_phase_seconds_sum{phase=\"" p "\"}") == 1 {printf "%.6f", $2}'
}

# pgbench's built-in tpcb-like script counts pgbench_branches first (a multi-shard
# statement, not routed yet): the same script as a file, with the scale given.
TPCB="$WORK/tpcb-like.sql"
cat >"$TPCB" <<'SQL'
\set aid random(1, 100000 * :scale)
\set bid random(1, 1 * :scale)
\set tid random(1, 10 * :scale)
\set delta random(-5000, 5000)
BEGIN;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;
UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = :bid;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP);
END;
SQL

RAW="$WORK/raw.tsv"
printf 'round\tmode\ttarget\ttps\tfailed\tlat_ms\tcommits_2pc\tprepare_ms\trecord_ms\tcommit_ms\n' >"$RAW"
TARGETS=(passthrough distributed)
for ((r = 1; r <= ROUNDS; r++)); do
    for mode in $MODES; do
        for ((k = 0; k < 2; k++)); do
            t="${TARGETS[$(( (k + r - 1) % 2 ))]}"
            out="$WORK/pgbench-r$r-$mode-$t.log"
            n0="$(metric "$SGD_METRICS_PORT" shardgate_2pc_commits_total)"
            p0="$(phase_sum prepare)"; q0="$(phase_sum record)"; c0="$(phase_sum commit)"
            set +e
            pgbench -n -f "$TPCB" -s "$SCALE" -M "$mode" -c "$CLIENTS" -j "$THREADS" -T "$DURATION" \
                -h 127.0.0.1 -p "$(port_of "$t")" -U postgres postgres >"$out" 2>&1
            rc=$?
            set -e
            n1="$(metric "$SGD_METRICS_PORT" shardgate_2pc_commits_total)"
            p1="$(phase_sum prepare)"; q1="$(phase_sum record)"; c1="$(phase_sum commit)"
            tps="$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time)/\1/p' "$out")"
            failed="$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$out")"
            lat="$(sed -n 's/^latency average = \([0-9.]*\) ms/\1/p' "$out")"
            if [[ $rc -ne 0 || -z "$tps" || "${failed:-0}" != 0 ]] || grep -qiE 'aborted|error' "$out"; then
                log "FAILED: round $r mode $mode target $t (exit $rc)"
                echo "---- pgbench output:"; cat "$out"
                echo "---- router log (tail):"; tail -50 "$(log_of "$t")"
                exit 1
            fi
            n=$(( n1 - n0 ))
            per() { awk -v a="$1" -v b="$2" -v n="$n" 'BEGIN{ if (n > 0) printf "%.3f", (b-a)*1000/n; else printf "0" }'; }
            printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$r" "$mode" "$t" "$tps" "${failed:-0}" "$lat" "$n" \
                "$(per "$p0" "$p1")" "$(per "$q0" "$q1")" "$(per "$c0" "$c1")" >>"$RAW"
            log "round $r $mode $t: tps=$tps lat=${lat}ms 2pc_commits=$n"
        done
    done
done

# Correctness of the distributed setup after the runs.
CHECK_FAIL=0
# Multi-shard aggregates are not routed yet: sum on every worker's shards directly.
shard_sum() { # table column
    local total=0 p v
    for p in "$W1_PORT" "$W2_PORT"; do
        v="$(sql_at "$p" "SELECT coalesce(sum((xpath('/row/s/text()', query_to_xml(format('SELECT coalesce(sum($2), 0) AS s FROM %I.%I', schemaname, tablename), false, true, '')))[1]::text::bigint), 0)
                          FROM pg_tables WHERE tablename ~ '^$1_[0-9]+\$'")"
        total=$(( total + v ))
    done
    echo "$total"
}
A="$(shard_sum pgbench_accounts abalance)"
T="$(shard_sum pgbench_tellers tbalance)"
B="$(shard_sum pgbench_branches bbalance)"
H="$(shard_sum pgbench_history delta)"
[[ "$A" == "$T" && "$T" == "$B" && "$B" == "$H" ]] || CHECK_FAIL=1
PREPARED=0
for p in "$COORD_PORT" "$W1_PORT" "$W2_PORT"; do
    PREPARED=$(( PREPARED + $(sql_at "$p" 'SELECT count(*) FROM pg_prepared_xacts') ))
done
[[ "$PREPARED" == 0 ]] || CHECK_FAIL=1
PASS_SUMS="$(sql_at "$PG_PORT" 'SELECT (SELECT sum(abalance) FROM pgbench_accounts) = (SELECT sum(delta) FROM pgbench_history)')"

echo
echo "# pgbench -n -f tpcb-like.sql (the built-in script's statements) -s $SCALE -c $CLIENTS -j $THREADS -T $DURATION, scale $SCALE, $ROUNDS rounds, pool size $POOL_SIZE (per node), $SHARDS shards per table, 2 workers"
echo "# $("$SHARDGATE" --version 2>/dev/null || echo shardgate); $("$PG_BIN/postgres" --version); nproc $(nproc)"
echo
echo "## raw runs (prepare/record/commit: mean ms per two-phase commit in that run)"
column -t -s $'\t' "$RAW"
echo
python3 - "$RAW" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
modes = list(dict.fromkeys(r["mode"] for r in rows))
def med(m, t, k):
    return statistics.median(float(x[k]) for x in rows if x["mode"] == m and x["target"] == t)
print("## medians")
print(f"{'mode':<10}{'pass tps':>10}{'dist tps':>10}{'dist/pass':>11}{'pass ms':>9}{'dist ms':>9}{'prepare':>9}{'record':>9}{'commit':>9}")
for m in modes:
    p, d = med(m, "passthrough", "tps"), med(m, "distributed", "tps")
    lat = med(m, "distributed", "lat_ms")
    share = lambda k: f"{med(m, 'distributed', k):.2f}ms/{100 * med(m, 'distributed', k) / lat:.0f}%"
    print(f"{m:<10}{p:>10.0f}{d:>10.0f}{d / p:>11.3f}{med(m, 'passthrough', 'lat_ms'):>9.2f}{lat:>9.2f}"
          f"  {share('prepare_ms')}  {share('record_ms')}  {share('commit_ms')}")
print()
print("(prepare / record / commit: mean time of that 2PC step per two-phase commit, and its share of the")
print(" mean distributed transaction latency)")
PY
echo
echo "## correctness (distributed setup)"
echo "sum(abalance) $A, sum(tbalance) $T, sum(bbalance) $B, sum(history.delta) $H"
echo "prepared transactions left on the coordinator and workers: $PREPARED"
echo "passthrough: sum(abalance) = sum(history.delta): $PASS_SUMS"
if [[ "$CHECK_FAIL" != 0 ]]; then
    log "CORRECTNESS CHECK FAILED"
    exit 1
fi
