"""Start-up and memory of a shuffled loader as the dataset grows (issue 10), and the
cost of the epoch order's kernel.

    python benchmarks/bench_order.py                      # n = 1e6, 1e8, 1e9; 3 repeats
    python benchmarks/bench_order.py --sizes 1e3 1e5 --repeats 1   # a quick sanity run

Method.  Every measurement runs in a fresh interpreter, so that nothing of an earlier
one stays resident.  It imports shmfeed and numpy, then times from `Loader(...)` to
the first batch (a source whose sample i is `np.int64(i)`; `batch_size=64`,
`shuffle=True`), takes 3 more batches, and reads the non-file PSS of itself and of
every process under it: Pss_Anon + Pss_Shmem of /proc/PID/smaps_rollup, so the ring
(a memfd) counts once, shared across processes, and the mapped code of Python and
its libraries does not count at all (USS where smaps_rollup is missing).  Modes:
"2 workers" (forked), "0 workers" (the loader builds in the training process), and
"inline", the in-process reference: no loader and no ring, the process builds its
batches itself from `Order.batch_items`.  Reported: the median over repeats.

Kernel: ns per index of `shmfeed._kernels.permute` / `block_permute` over 2**20
positions, and us per call of `Order.batch_items` for a 64-sample batch, the
per-batch cost a worker pays (process CPU time, best of 5).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import psutil

from shmfeed._cli.bench.runner import non_file_pss_bytes

MODES = ("2 workers", "0 workers", "inline")
BATCH_SIZE = 64
BATCHES = 4  # the first one timed, then 3 more


class Indices:
    """Sample i is np.int64(i): loading costs nothing, so what is measured is the loader."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.int64:
        return np.int64(i)


def child(mode: str, n: int) -> dict:
    """One measurement, in this (fresh) process."""
    import shmfeed
    from shmfeed._order.order import Order

    source = Indices(n)
    workers = 0 if mode == "inline" else int(mode.split()[0])
    t0 = time.perf_counter()
    if mode == "inline":
        order = Order(n, BATCH_SIZE, True, 0, False)
        batches = []
        for b in range(BATCHES):
            batches.append(np.stack([source[i] for i in order.batch_items(0, b).tolist()]))
            if b == 0:
                first_s = time.perf_counter() - t0
        loader = None
    else:
        loader = shmfeed.Loader(source, batch_size=BATCH_SIZE, num_workers=workers, shuffle=True)
        it = iter(loader)
        batches = [next(it).copy()]
        first_s = time.perf_counter() - t0
        batches += [next(it).copy() for _ in range(BATCHES - 1)]
    me = psutil.Process()
    deadline = time.monotonic() + 20  # the supervisor may still be forking a worker
    while len(me.children(recursive=True)) < (workers and workers + 1) and time.monotonic() < deadline:
        time.sleep(0.01)
    tree = [me, *me.children(recursive=True)]
    pss = sum(non_file_pss_bytes(p) for p in tree)
    if loader is not None:
        del it
        loader.close()
    return {"first_batch_s": first_s, "pss_bytes": pss, "processes": len(tree)}


def measure(mode: str, n: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(n)], capture_output=True,
                         text=True, timeout=600, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    if out.returncode != 0:
        raise RuntimeError(f"{mode} n={n} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def kernel_costs() -> dict:
    from shmfeed import _kernels
    from shmfeed._order.order import Order

    def best_cpu_s(fn, repeats: int = 5) -> float:
        best = float("inf")
        for _ in range(repeats):
            t = time.process_time()
            fn()
            best = min(best, time.process_time() - t)
        return best

    count = 2**20
    positions, out = np.arange(count, dtype=np.int64), np.empty(count, np.int64)
    n = 10**9
    plain = best_cpu_s(lambda: _kernels.permute(n, 12345, positions, out)) / count * 1e9
    block = best_cpu_s(lambda: _kernels.block_permute(n, 256, 12345, positions, out)) / count * 1e9
    calls = 20_000
    order = Order(n, BATCH_SIZE, True, 0, False)

    def batches():
        for b in range(calls):
            order.batch_items(0, b)

    per_batch = best_cpu_s(batches) / calls * 1e6
    return {"permute_ns_per_index": plain, "block_permute_ns_per_index": block,
            "batch_items_64_us": per_batch}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", type=float, default=[1e6, 1e8, 1e9])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return

    costs = kernel_costs()
    print(f"kernel: permute {costs['permute_ns_per_index']:.1f} ns/index, block_permute "
          f"{costs['block_permute_ns_per_index']:.1f} ns/index; Order.batch_items(64 samples) "
          f"{costs['batch_items_64_us']:.2f} us")
    print(f"\n{'n':>14} {'mode':>10} {'first batch s':>14} {'non-file PSS MB':>16} {'processes':>10}")
    results = []
    for size in args.sizes:
        n = int(size)
        for mode in MODES:
            runs = [measure(mode, n) for _ in range(args.repeats)]
            row = {"n": n, "mode": mode,
                   "first_batch_s": statistics.median(r["first_batch_s"] for r in runs),
                   "pss_MB": statistics.median(r["pss_bytes"] for r in runs) / 2**20,
                   "processes": runs[0]["processes"]}
            results.append(row)
            print(f"{n:>14,} {mode:>10} {row['first_batch_s']:>14.4f} {row['pss_MB']:>16.1f} "
                  f"{row['processes']:>10}")
    print(json.dumps({"kernel": costs, "loader": results}))


if __name__ == "__main__":
    main()
