"""The `stream-shards` workload of `shmfeed bench` through the public API only, for two
trees alternately, with the CPU each side spends per batch beside its batches/s
(issue 24: that workload's wall-clock rate spreads 8k-15k batches/s run to run in either
tree, too wide for a 3 % verdict; CPU per batch does not move with the machine's drift).

The data is the workload's: NUM_SHARDS `.npy` files of int32[512] rows, shard k holding
a share of ROWS proportional to 8 + k, read by `shmfeed.sources.Stream` with 2 workers,
batches of 32, every batch touched (its first byte).  A run is `--epochs` whole epochs
after one warm-up epoch, in a fresh interpreter per tree and round (ABBA order):

    python benchmarks/bench_stream_shards.py OLD_TREE NEW_TREE [--rounds 9] [--epochs 10]

Prints per run: batches/s, the loop's CPU per batch (process_time), the pool's CPU per
batch (every pool process, from /proc, read before the loader closes); then per tree the
medians and new/old of each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

NUM_SHARDS = 8
ROWS = 65536
WIDTH = 512
BATCH = 32

CHILD = r"""
import json, sys, time
import numpy as np, psutil
import shmfeed
from shmfeed.sources import Stream

folder, epochs, shards, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
paths = [f"{folder}/shard-{k:02d}.npy" for k in range(shards)]

def rows(shard, num_shards):
    for row in np.load(paths[shard], mmap_mode="r"):
        yield {"x": row}

loader = shmfeed.Loader(Stream(rows, num_shards=len(paths)), batch_size=batch, num_workers=2)
with loader:
    touch = 0
    for b in loader:  # warm-up epoch: the pool's start and the page cache
        touch += int(b["x"][0, 0])
    pool = [p for p in psutil.Process().children(recursive=True)]
    cpu0 = {p.pid: sum(p.cpu_times()[:2]) for p in pool}
    t0, c0, n = time.perf_counter(), time.process_time(), 0
    for _ in range(epochs):
        for b in loader:
            touch += int(b["x"][0, 0])
            n += 1
    wall, loop_cpu = time.perf_counter() - t0, time.process_time() - c0
    pool_cpu = sum(sum(p.cpu_times()[:2]) - cpu0.get(p.pid, 0.0) for p in psutil.Process().children(recursive=True))
print(json.dumps({"batches": n, "bps": n / wall, "loop_us": 1e6 * loop_cpu / n, "pool_us": 1e6 * pool_cpu / n}))
"""


def make_shards(folder: Path) -> None:
    weights = [8 + k for k in range(NUM_SHARDS)]
    counts = [ROWS * w // sum(weights) for w in weights]
    rng = np.random.default_rng(0)
    for k, n in enumerate(counts):
        np.save(folder / f"shard-{k:02d}.npy", rng.integers(0, 50_000, (n, WIDTH), dtype="int32"))


def one_run(tree: Path, folder: Path, epochs: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(epochs), str(NUM_SHARDS), str(BATCH)], cwd=tree,
                         env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True,
                         timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    trees = {"old": args.old.resolve(), "new": args.new.resolve()}
    runs: dict[str, list[dict]] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory(prefix="shmfeed-shards-") as tmp:
        make_shards(Path(tmp))
        for r in range(args.rounds):
            for side in (("old", "new") if r % 2 == 0 else ("new", "old")):
                got = one_run(trees[side], Path(tmp), args.epochs)
                runs[side].append(got)
                print(f"round {r + 1} {side}: {got['bps']:9,.0f} batches/s  loop {got['loop_us']:6.1f} us/batch  "
                      f"pool {got['pool_us']:6.1f} us/batch", flush=True)
    print(f"\n{args.rounds} rounds of {args.epochs} epochs; old = {trees['old']}, new = {trees['new']}")
    print("| | old | new | new/old |\n|---|---:|---:|---:|")
    for key, label in (("bps", "batches/s"), ("loop_us", "loop CPU us/batch"), ("pool_us", "pool CPU us/batch")):
        o, n = (statistics.median(x[key] for x in runs[s]) for s in ("old", "new"))
        print(f"| {label} (median) | {o:,.1f} | {n:,.1f} | {n / o:.2f} |")
    pairs = [n["bps"] / o["bps"] for o, n in zip(runs["old"], runs["new"])]
    print(f"| batches/s, median of the rounds' new/old | | | {statistics.median(pairs):.2f} |")


if __name__ == "__main__":
    main()
