#!/bin/bash
# One side-by-side run: gyre-bench net against a fresh Gyre node or Redis.
# usage: run2.sh gyre|redis READ_RATIO never|always [gyre node args]
# GYRE=path/to/gyre picks another build (default: this checkout's release build).
# KEYS=N sets the key space (default 100000; 5000 fits the CPU caches).
# VSIZE=B sets the value size (default 100 bytes).
# PIN=S:G pins the server to CPU S and the generator to CPU G (taskset); a
# Gyre node pins its shard itself (shard 0 on the first allowed CPU), so S
# applies to Redis. Unset: nothing pinned but the Gyre shard.
# RATE=R offers R requests a second in all (open loop, latency from each
# request's scheduled send time); unset: closed loop.
# SRVPIN=S pins only the server to CPU S (Redis, or the whole Gyre node),
# leaving the generator where the scheduler puts it: both servers then sit
# where a Gyre shard pins itself, for a comparison with equal placement.
# Prints: target ratio fsync [args] ops_per_sec p50_us p99_us p999_us max_us
#         errors server_cpu_us_per_op max_values_per_verified_key max_siblings_seen
#         slower_than ([threshold µs, operations slower], per threshold)
cd "$(dirname "$0")/../../.." || exit 1
T=$1; R=$2; F=$3; shift 3
SRV=(); GEN=()
if [ -n "$PIN" ]; then SRV=(taskset -c "${PIN%%:*}"); GEN=(taskset -c "${PIN##*:}"); fi
NODE=()  # what runs the Gyre node: only SRVPIN places it (PIN is Redis's alone)
if [ -n "$SRVPIN" ]; then SRV=(taskset -c "$SRVPIN"); NODE=("${SRV[@]}"); fi
D=$(mktemp -d)
if [ "$T" = gyre ]; then
  "${NODE[@]}" ${GYRE:-./target/release/gyre} node --data-dir "$D/data" --listen 127.0.0.1:7700 --fsync "$F" "$@" > "$D/node.log" 2>&1 &
  P=$!; sleep 1; TG=gyre://127.0.0.1:7700
else
  if [ "$F" = always ]; then A="--appendonly yes --appendfsync always"; else A="--appendonly no"; fi
  "${SRV[@]}" redis-server --port 6399 --save '' $A --dir "$D" --daemonize no > /dev/null 2>&1 & P=$!; sleep 0.5; TG=redis://127.0.0.1:6399
fi
"${GEN[@]}" ./target/release/gyre-bench net --target $TG --connections ${CONNS:-50} --depth 1 --keys ${KEYS:-100000} --value-size ${VSIZE:-100} \
    --duration ${DUR:-10} --warmup 2 --load --read-ratio "$R" ${RATE:+--rate "$RATE"} --server-pid $P 2>/dev/null |
  python3 -c 'import json,sys; d=json.load(sys.stdin); print(sys.argv[1], " ".join(str(round(d[k],1)) for k in ("ops_per_sec","p50_us","p99_us","p999_us","max_us","errors","server_cpu_us_per_op")), d.get("verify_max_values"), d.get("max_siblings_seen"), d.get("slower_than"))' "$T $R $F${RATE:+ rate=$RATE} $*"
kill -TERM $P; wait $P 2>/dev/null
rm -rf "$D"
