#!/bin/bash
# SET only for DUR seconds (default 20) of VSIZE-byte values (default 100)
# over 100,000 keys, 50 connections, against a fresh one-shard Gyre node
# (fsync never unless FSYNC= says, on CPU 0), then the shard's disk use from STATS.
# GYRE=path/to/gyre picks the build (default: this checkout's release build).
# Prints: build ops_per_sec p999_us server_cpu_us_per_op, the bytes of
# segments on disk and of live records (MiB), segments compacted, records moved,
# and (builds that have them) write stalls and the writes that waited.
# DIR=path puts the node's data there (default /tmp), e.g. on a small tmpfs;
# FSYNC= sets the policy (default never); NOLOAD=1 skips the load phase (whose errors stop the run). Also prints the
# writes refused (errors) and, where STATS has it, the refusals for space.
cd "$(dirname "$0")/../../.." || exit 1
GYRE=${GYRE:-./target/release/gyre}; W=$(mktemp -d -p "${DIR:-/tmp}")
taskset -c 0 "$GYRE" node --data-dir "$W/data" --listen 127.0.0.1:7700 --fsync "${FSYNC:-never}" --shards 1 > "$W/node.log" 2>&1 & P=$!; sleep 1
./target/release/gyre-bench net --target gyre://127.0.0.1:7700 --connections 50 --depth 1 --keys 100000 \
    --value-size "${VSIZE:-100}" --duration "${DUR:-20}" --warmup 2 $([ -n "$NOLOAD" ] || echo --load) --read-ratio 0 --server-pid $P 2>/dev/null > "$W/run.json"
./target/release/gyre stats --node 127.0.0.1:7700 > "$W/stats.json" 2>&1
kill $P; wait $P 2>/dev/null
python3 - "$GYRE" "$W" <<'PY'
import json, sys
w = sys.argv[2]
d = json.load(open(w + "/run.json"))
s = json.load(open(w + "/stats.json"))
st = (s[0] if isinstance(s, list) else s)["storage"]
print(sys.argv[1], round(d["ops_per_sec"]), round(d["p999_us"]), round(d["server_cpu_us_per_op"], 1),
      "disk_total_MiB", st["disk_total_bytes"] >> 20, "live_MiB", st["disk_live_bytes"] >> 20,
      "compacted", st["segments_compacted"], "moved", st["records_moved"],
      "stalls", st.get("compaction_stalls", st.get("write_stalls", "-")),
      "stalled_writes", st.get("compaction_stalled_writes", st.get("writes_stalled", "-")),
      "errors", d["errors"], "low_space_refusals", st.get("low_space_refusals", "-"))
PY
[ -n "$KEEP" ] && cp "$W/node.log" "$KEEP"; rm -rf "$W"
