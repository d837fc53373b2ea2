#!/bin/bash
# usage: run2.sh gyre|redis RATIO FSYNC(never|always) [extra node args]
cd /work/main
T=$1; R=$2; F=$3; shift 3
if [ $T = gyre ]; then
  rm -rf /tmp/gb/gd; ${GYRE:-./target/release/gyre} node --data-dir /tmp/gb/gd --listen 127.0.0.1:7700 --fsync $F "$@" >/tmp/gb/node.log 2>&1 &
  P=$!; sleep 1; TG=gyre://127.0.0.1:7700
else
  rm -rf /tmp/gb/rd; mkdir -p /tmp/gb/rd
  if [ $F = always ]; then A="--appendonly yes --appendfsync always"; else A="--appendonly no"; fi
  redis-server --port 6399 --save '' $A --dir /tmp/gb/rd --daemonize no >/dev/null 2>&1 & P=$!; sleep 0.5; TG=redis://127.0.0.1:6399
fi
./target/release/gyre-bench net --target $TG --connections 50 --depth 1 --keys 100000 --value-size 100 --duration ${DUR:-10} --warmup 2 --load --read-ratio $R --server-pid $P 2>/dev/null | python3 -c 'import json,sys; d=json.load(sys.stdin); print(sys.argv[1], " ".join(str(round(d[k],1)) for k in ("ops_per_sec","p50_us","p99_us","p999_us","max_us","errors","server_cpu_us_per_op")), d.get("verify_max_values"), d.get("max_siblings_seen"))' "$T $R $F $*"
kill -TERM $P; wait $P 2>/dev/null || true
