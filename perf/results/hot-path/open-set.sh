#!/bin/bash
# Open-loop SET on one shard (the compaction-tail experiment): 100% updates,
# uniform over 100,000 records, 100-byte values, Poisson arrivals at
# 60,000 ops/s from 50 connections, 15 s measured (open-set.toml), against
# a fresh node with 16 MiB segments so that compaction runs several times.
# usage: open-set.sh [GYRE_BINARY]   (default: this checkout's release build)
# EXTRA_STORAGE='compaction_threshold = 1.0' adds lines to the node's
# [storage] section (that one turns compaction off).
# Prints gyre-bench's one-line summary.
cd "$(dirname "$0")/../../.." || exit 1
B=${1:-./target/release/gyre}
D=$(mktemp -d)
printf '[storage]\nsegment_size = 16777216\n%s\n' "$EXTRA_STORAGE" > "$D/node.toml"
$B node --data-dir "$D/data" --listen 127.0.0.1:7700 --fsync never --shards 1 --config "$D/node.toml" > "$D/node.log" 2>&1 &
P=$!; sleep 1
./target/release/gyre-bench sla perf/results/hot-path/open-set.toml --out "$D/out" --quiet 2>&1 | grep 'ops/s,'
kill -TERM $P; wait $P 2>/dev/null; rm -rf "$D"
