#!/bin/bash
# side-by-side matrix, alternating gyre (1 shard) and redis
cd /tmp/gb
for rr in 1.0 0.0; do for i in 1 2 3; do ./run2.sh gyre $rr never --shards 1; ./run2.sh redis $rr never; done; done
for i in 1 2; do ./run2.sh gyre 0.5 never --shards 1; ./run2.sh redis 0.5 never; done
for i in 1 2; do ./run2.sh gyre 0.0 always --shards 1; ./run2.sh redis 0.0 always; done
