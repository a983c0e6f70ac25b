"""Where a workload's time goes: for `arrays-images` or `arrays-tokens` (`Arrays` over
the `shmfeed bench` workloads' cached file) or `samples-large(-flip)` (fresh per-sample
arrays over the same images file), a loop with 1 and then 2 workers, alternating for
`--rounds` rounds, reporting batches/s, GB/s, each worker's busy fraction (`loader.stats()`: time in building batches over the wall time) and the
loop's input-wait fraction.

    python benchmarks/bench_worker_busy.py [--workload arrays-images] [--seconds 3] [--rounds 3]

Workers near 1.0 busy while the loop waits near 1.0: the copy itself is the bound, and
two workers' GB/s over one's is what the memory system gives two copiers at once
(compare `python benchmarks/bench_gather.py`).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import shmfeed
from shmfeed._cli.bench import workloads


def run(workload: workloads.Workload, path: str, batch_size: int, workers: int, seconds: float) -> dict:
    source = workloads.make_source(workload, path, batch_size=batch_size, length=None, seed=0)
    row_bytes = np.load(path, mmap_mode="r")[0].nbytes
    with shmfeed.Loader(source, batch_size=batch_size, num_workers=workers, shuffle=True,
                        drop_last=True) as loader:
        for _ in loader:  # start the pool, fill the ring once
            break
        before, t0, n, epoch = loader.stats(), time.perf_counter(), 0, 1
        while time.perf_counter() - t0 < seconds:
            loader.set_epoch(epoch)
            epoch += 1
            for batch in loader:
                n += 1
                x = batch["x"] if isinstance(batch, dict) else batch
                x.flat[0], x.flat[-1]  # touched, as `shmfeed bench` does
        wall = time.perf_counter() - t0
        after = loader.stats()
    busy = [(b["busy_s"] - a["busy_s"]) / wall for a, b in zip(before.workers, after.workers)]
    return {"batches_s": n / wall, "gb_s": n * batch_size * row_bytes / wall / 1e9, "busy": busy,
            "wait": (after.wait_s - before.wait_s) / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="arrays-images", choices=["arrays-images", "arrays-tokens", "samples-large", "samples-large-flip"])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    workload = workloads.WORKLOADS[args.workload]
    path, _ = workloads.ensure_file(workload.data, workloads.default_data_dir())
    workloads.warm_page_cache(path)
    results: dict[int, list] = {1: [], 2: []}
    for _ in range(args.rounds):
        for workers in results:
            r = run(workload, str(path), workload.batch_size, workers, args.seconds)
            results[workers].append(r)
            print(f"{workers} worker(s): {r['batches_s']:8,.0f} batches/s {r['gb_s']:6.1f} GB/s  busy "
                  f"{' '.join(f'{b:.2f}' for b in r['busy'])}  loop waits {r['wait']:.2f}")
    one = statistics.median(r["gb_s"] for r in results[1])
    two = statistics.median(r["gb_s"] for r in results[2])
    print(f"median GB/s: 1 worker {one:.1f}, 2 workers {two:.1f} ({two / one:.2f}x)")


if __name__ == "__main__":
    main()
