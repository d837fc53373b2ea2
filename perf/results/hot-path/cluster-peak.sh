#!/bin/bash
# One cluster-peak run on a fresh local 3-node cluster, then stops it.
# usage: cluster-peak.sh [GYRE_BINARY] [gyre dev args, e.g. --no-secret]
# (a first argument that starts with - is a gyre dev argument)
# Prints gyre-bench's summary line for perf/sla/cluster-peak.toml (YCSB A,
# zipfian, N=3 R=2 W=2, client-driven, closed loop, 50 connections), and
# the cluster's secret file if it has one.
cd "$(dirname "$0")/../../.." || exit 1
G=./target/release/gyre
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then G=$1; shift; fi
D=$(mktemp -d)
$G dev "$@" --nodes 3 --data-dir "$D/dev" --port 7800 --fsync never > "$D/dev.out" 2> "$D/dev.err" &
P=$!
for _ in $(seq 100); do grep -q ready "$D/dev.out" && break; sleep 0.1; done
./target/release/gyre-bench sla perf/sla/cluster-peak.toml --out "$D/res" 2>/dev/null | grep -E 'ops/s' | head -1
ls "$D/dev/cluster.secret" 2>/dev/null
kill -TERM $P; wait $P 2>/dev/null
rm -rf "$D"
