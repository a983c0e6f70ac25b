"""Compare two trees of shmfeed (e.g. main before a change and after it, each a
`git worktree` with its extension built) on every `shmfeed bench` workload, alternating
between them round by round, so that both see the same drift of this noisy VM's speed.

Both trees run the SAME harness: by default tree B's `shmfeed/_cli/bench` laid over a copy
of each tree's library (`--own-harness` runs each tree's own instead), so a workload that
only the newer harness has is measured on the old library too.  Each run measures
shmfeed and in-process loading side by side; shmfeed / in-process is the figure compared
(a ratio cancels most of the machine's drift), and the verdict is the median over rounds
of new / old of that ratio.

    git worktree add /tmp/before HEAD~1 && (cd /tmp/before && python setup.py -q build_ext --inplace)
    python benchmarks/ab_trees.py /tmp/before . --rounds 7            # every workload
    python benchmarks/ab_trees.py /tmp/before . --workloads tokens,samples-large --rounds 3
    python benchmarks/ab_trees.py /tmp/before . --own-harness    # where the new harness needs
                                                                 # the new library (then the
                                                                 # workloads both harnesses have)

Prints one line per run, then a table: per workload, each tree's median batches/s and
ratio, and new/old (>= 0.97 is "no slower" within this machine's noise) of the ratio and
of shmfeed's batches/s, each the median over rounds of the round's two runs.  With
`--own-harness` the latter is the verdict: each harness measures in-process its own way.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SKIP = {"keras-sequence"}  # trains a model and compares other loaders: not a tree A/B


def harness(tree: Path) -> Path:
    """Where `tree` keeps its benchmark harness: shmfeed/_cli/bench since the package
    was laid out in subpackages, shmfeed/_bench before."""
    new = tree / "shmfeed" / "_cli" / "bench"
    return new if new.is_dir() else tree / "shmfeed" / "_bench"


def overlay(tree: Path, harness_tree: Path, into: Path) -> Path:
    """A copy of `tree`'s package with `harness_tree`'s benchmark harness inside it."""
    if harness(tree).relative_to(tree) != harness(harness_tree).relative_to(harness_tree):
        sys.exit(f"{tree} and {harness_tree} lay out the package differently (one before the "
                 "move into subpackages): the harness of one cannot run the other's library; "
                 "use --own-harness")
    dst = into / tree.name
    shutil.copytree(tree / "shmfeed", dst / "shmfeed", ignore=shutil.ignore_patterns("__pycache__"))
    mine = dst / harness(tree).relative_to(tree)
    shutil.rmtree(mine)
    shutil.copytree(harness(harness_tree), mine, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def workloads_of(tree: Path) -> list[str]:
    module = ".".join(harness(tree).relative_to(tree).parts)
    code = f"from {module} import workloads; print(','.join(workloads.WORKLOADS))"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(tree)},
                         cwd=tree, capture_output=True, text=True, check=True, timeout=120)
    return [w for w in out.stdout.strip().split(",") if w not in SKIP]


def one_run(tree: Path, workload: str, seconds: float, extra: list[str]) -> tuple[float, float] | None:
    """(shmfeed batches/s, in-process batches/s) of one run, or None if it failed."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        # A harness from before the headspace runs has no flag to turn them off (nor them).
        headspace = "headspace" in (harness(tree) / "runner.py").read_text()
        cmd = [sys.executable, "-m", "shmfeed", "bench", "--workload", workload, "--compare", "inline",
               "--workers", "2", "--seconds", str(seconds), "--repeat", "1", "--no-progress",
               *(["--no-headspace"] if headspace else []), "--json", out.name, *extra]
        proc = subprocess.run(cmd, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)},
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            print(f"  {tree}: {workload} failed: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
            return None
        loaders = json.load(open(out.name))["workloads"][workload]["loaders"]
    rate = {name: statistics.median(r["batches_per_s"] for r in entry["runs"] if r["status"] == "ok")
            for name, entry in loaders.items()}
    return rate["shmfeed"], rate["inline"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--workloads", default="all", help="comma-separated, or all (default)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--own-harness", action="store_true",
                        help="run each tree's own harness (default: the new tree's in both)")
    parser.add_argument("--json", type=Path, help="write every run and the medians here")
    args, extra = parser.parse_known_args()
    old, new = args.old.resolve(), args.new.resolve()
    with tempfile.TemporaryDirectory(prefix="shmfeed-ab-") as tmp:
        trees = {"old": old, "new": new}
        if not args.own_harness:
            trees = {"old": overlay(old, new, Path(tmp) / "old"), "new": overlay(new, new, Path(tmp) / "new")}
        if args.workloads != "all":
            names = args.workloads.split(",")
        else:  # every workload both harnesses run
            old_names = set(workloads_of(trees["old"]))
            names = [w for w in workloads_of(trees["new"]) if w in old_names]
        runs: dict[str, dict[str, list]] = {w: {"old": [], "new": []} for w in names}
        for r in range(args.rounds):
            order = ("old", "new") if r % 2 == 0 else ("new", "old")  # ABBA: drift cancels
            for w in names:
                for side in order:
                    got = one_run(trees[side], w, args.seconds, extra)
                    if got is not None:
                        runs[w][side].append(got)
                        print(f"round {r + 1} {w:18s} {side}: shmfeed {got[0]:9,.1f}  in-process "
                              f"{got[1]:9,.1f}  ratio {got[0] / got[1]:.2f}", flush=True)
    print(f"\n{args.rounds} rounds, {args.seconds} s per loader; old = {old}, new = {new}")
    print("| workload | old shmfeed b/s | new shmfeed b/s | old ratio | new ratio | new/old of the ratio "
          "| new/old of shmfeed b/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    summary = {}
    for w, sides in runs.items():
        if not sides["old"] or not sides["new"]:
            print(f"| {w} | failed on a tree | | | | |")
            continue
        med = {s: (statistics.median(x[0] for x in v), statistics.median(x[0] / x[1] for x in v))
               for s, v in sides.items()}
        pairs = [n[0] / n[1] / (o[0] / o[1]) for o, n in zip(sides["old"], sides["new"])]
        # The same round's two runs, side by side in time: the verdict where the trees'
        # harnesses differ (--own-harness), since each then measures in-process its own way.
        direct = [n[0] / o[0] for o, n in zip(sides["old"], sides["new"])]
        summary[w] = {"old": med["old"], "new": med["new"], "new_over_old": statistics.median(pairs),
                      "shmfeed_new_over_old": statistics.median(direct)}
        print(f"| {w} | {med['old'][0]:,.1f} | {med['new'][0]:,.1f} | {med['old'][1]:.2f} | "
              f"{med['new'][1]:.2f} | {statistics.median(pairs):.2f} | {statistics.median(direct):.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "summary": summary, "old": str(old),
                                         "new": str(new), "rounds": args.rounds}, indent=1))


if __name__ == "__main__":
    main()
