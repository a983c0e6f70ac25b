#!/usr/bin/env bash
# Kept for the commands that name it: benchmarks/ab_trees.py does the work (every
# workload, the same harness on both trees, ABBA rounds, median new/old per workload).
#   benchmarks/ab_trees.sh OLD_TREE NEW_TREE [--workloads all] [--rounds 7] [...]
exec python "$(dirname "$0")/ab_trees.py" "$@"
