#!/bin/bash
# p99.9 against the offered rate, open loop: YCSB A (perf/sla/node-a.toml's
# workload, Poisson arrivals, 50 connections) on a fresh Gyre node (one
# shard, fsync never) and Redis (no persistence), side by side in each run.
# usage: curve.sh [gyre node args]
#   RATES="1000 2000 5000 10000 20000"  offered rates (ops/s)
#   REPS=3                              passes over the rates
#   DUR=8                               measured seconds per run
#   GYRE=path/to/gyre                   another build
#   GEN="taskset -c 0"                  a prefix for the generator
#   CAPACITY=1                          run `gyre-bench capacity` once instead
# Prints one line per target and run: RATE REP TARGET: ops/s, percentiles.
cd "$(dirname "$0")/../../.." || exit 1
D=$(mktemp -d)
sed 's/127.0.0.1:6379/127.0.0.1:6399/' perf/sla/node-a.toml > "$D/node-a.toml"
${GYRE:-./target/release/gyre} node --data-dir "$D/g" --listen 127.0.0.1:7700 --fsync never --shards 1 "$@" > "$D/node.log" 2>&1 & G=$!
redis-server --port 6399 --save '' --appendonly no --dir "$D" --daemonize no > /dev/null 2>&1 & RP=$!
sleep 1
if [ -n "$CAPACITY" ]; then
  $GEN ./target/release/gyre-bench capacity "$D/node-a.toml" --out "$D/out" --quiet 2>&1 | grep -E "capacity|: (pass|miss)"
else
  L=""
  for rep in $(seq "${REPS:-3}"); do for r in ${RATES:-1000 2000 5000 10000 20000}; do
    $GEN ./target/release/gyre-bench sla "$D/node-a.toml" --rate "$r" --duration "${DUR:-8}" $L --out "$D/out" --quiet 2>&1 |
      grep -E "ops/s," | sed "s/^/$r $rep /"
    L=--no-load
  done; done
fi
kill -TERM $G $RP; wait $G $RP 2>/dev/null
rm -rf "$D"
