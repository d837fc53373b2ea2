#!/bin/bash
# The side-by-side matrix: Gyre (this checkout, 1 shard), Gyre at the
# baseline build $BASE (a gyre binary; skipped if unset) and Redis, in turn.
cd "$(dirname "$0")" || exit 1
run() { ./run2.sh "$@"; }
for w in "1.0 never" "0.0 never" "0.5 never" "0.0 always"; do
  for i in 1 2; do
    run gyre $w --shards 1
    [ -n "$BASE" ] && GYRE=$BASE run gyre $w --shards 1
    run redis $w
  done
done
