#!/usr/bin/env bash
# Compare two checkouts of shmfeed (e.g. a commit and its parent, each a `git worktree`
# with its extension built) on one `shmfeed bench` workload, alternating between them
# run by run, so that both see the same drift of this VM's speed.  Each run measures
# shmfeed and in-process loading side by side; the ratio is what to compare.
#
#   benchmarks/ab_trees.sh WORKLOAD ROUNDS TREE_A TREE_B [extra `shmfeed bench` args]
#   e.g. git worktree add /tmp/before HEAD~1 && (cd /tmp/before && python setup.py -q build_ext --inplace)
#        benchmarks/ab_trees.sh arrays-tokens 4 /tmp/before . --slots 8
#
# Prints one line per run, then the medians per tree.
set -euo pipefail
workload=$1; rounds=$2; tree_a=$(cd "$3" && pwd); tree_b=$(cd "$4" && pwd); shift 4
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for _ in $(seq "$rounds"); do
  for tree in "$tree_a" "$tree_b"; do
    table=$(cd "$tree" && PYTHONPATH="$tree" python -m shmfeed bench --workload "$workload" \
            --compare inline --workers 2 --seconds 2 --repeat 1 --no-progress "$@" 2>&1 | grep "^| $workload ")
    shm=$(echo "$table" | awk -F'|' '$3 ~ /shmfeed/ {gsub(/[ ,]/, "", $4); print $4}')
    inp=$(echo "$table" | awk -F'|' '$3 ~ /in-process/ {gsub(/[ ,]/, "", $4); print $4}')
    echo "$tree $shm $inp" | tee -a "$out"
  done
done
python - "$out" <<'PY'
import collections, statistics, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    tree, shm, inp = line.split()
    runs[tree].append((float(shm), float(inp)))
for tree, rs in runs.items():
    ratios = [s / i for s, i in rs]
    print(f"{tree}: shmfeed {statistics.median(s for s, _ in rs):,.0f} batches/s, in-process "
          f"{statistics.median(i for _, i in rs):,.0f}, ratio median {statistics.median(ratios):.2f} "
          f"(runs: {', '.join(f'{r:.2f}' for r in ratios)})")
PY
