#!/bin/bash
# The benchmark runs recorded in RESULTS.md ("The run of 2026-11-29, second session"),
# one after the other on an otherwise idle machine.  Outputs go to the current
# directory.  (The first session's script, for "The run of 2026-11-29", is in git
# history: git show 905558a:benchmarks/run_session.sh.)
set -x
here=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH=$here
python -m shmfeed bench --workload tokens,arrays-tokens,arrays-images,windows --compare inline --workers 2 --seconds 3 --repeat 3 --no-progress --json arrays.json > arrays.txt 2>&1
python -m shmfeed bench --workload keras-sequence --workers 2 --repeat 3 --no-progress --json keras.json > keras.txt 2>&1
python "$here/benchmarks/bench_startup.py" --repeats 5 > startup.txt 2>&1
python -m shmfeed bench --workload transport,tokens,compute,batchlevel,images-jpeg,stream-shards --compare all --workers 2 --seconds 3 --repeat 3 --no-progress --json peers.json --plot peers.png > peers.txt 2>&1
