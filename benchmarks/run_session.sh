#!/bin/bash
# The benchmark runs recorded in RESULTS.md ("The run of 2026-11-29"), one after the
# other on an otherwise idle machine.  BEFORE: a checkout of fe234c3 (the last commit
# before the boundaries refactor) with its C core built in place; without it the
# before/after pair is skipped.  Outputs go to the current directory.
set -x
here=$(cd "$(dirname "$0")/.." && pwd)
if [ -n "${BEFORE:-}" ]; then
  PYTHONPATH=$BEFORE python -m shmfeed bench --workload transport,tokens,compute,batchlevel --compare inline --workers 2 --seconds 3 --repeat 3 --json before.json > before.txt 2>&1
fi
PYTHONPATH=$here python -m shmfeed bench --workload transport,tokens,compute,batchlevel --compare inline --workers 2 --seconds 3 --repeat 3 --no-progress --json after.json > after.txt 2>&1
PYTHONPATH=$here python -m shmfeed bench --workload transport,tokens,compute,batchlevel,images-jpeg,stream-shards --compare all --workers 2 --seconds 3 --repeat 3 --no-progress --json peers.json --plot peers.png > peers.txt 2>&1
PYTHONPATH=$here python -m shmfeed bench --workload tokens,arrays-tokens,arrays-images,windows,disk-images --compare inline --workers 2 --seconds 3 --repeat 3 --no-progress --json arrays.json > arrays.txt 2>&1
PYTHONPATH=$here python "$here/benchmarks/bench_order.py" > order.txt 2>&1
PYTHONPATH=$here python "$here/benchmarks/bench_padding.py" --seconds 3 > padding.txt 2>&1
PYTHONPATH=$here python "$here/benchmarks/bench_padding.py" --seconds 3 --step-ns-per-token 50 >> padding.txt 2>&1
PYTHONPATH=$here python -m shmfeed bench --workload keras-sequence --workers 2 --no-progress --json keras.json > keras.txt 2>&1
