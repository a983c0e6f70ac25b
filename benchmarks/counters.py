"""The per-batch counters of every workload shape, checked against a committed baseline:
the guard a 4x regression cannot hide behind this noisy machine's wall-clock times
(issue 24: large per-sample batches fell from 577 to 138 batches/s unseen, while their
workers' minor page faults went from ~2 to ~2,400 a batch).

For each `shmfeed bench` workload shape (on small data files made in a temporary folder,
so it needs no benchmark cache), per batch:

- built in this process (`num_workers=0`, the workers' very code): `build_minflt`, minor
  page faults, `build_cpu_ms`, and `peak_alloc_kb`, the peak of memory allocated while a
  batch is built (tracemalloc, which numpy reports its arrays to);
- with 2 workers: `worker_cpu_ms` and `loop_cpu_ms`, CPU time of the workers (from each
  thread's schedstat) and of the training loop.

Faults and allocations are near-deterministic; CPU times move with the machine's load by
tens of percent, not by 4x.  Each shape is measured `REPEATS` times and each counter keeps
its least value: noise (a CPU shared with the workers, a wake-up that comes late) only
ever adds, and a regression raises every repeat.  (One run was not enough: the loop's CPU
for `compute`, 20 batches, ranged 0.06-0.12 ms on one tree, and the 0.12 failed CI.)  A
counter fails when it exceeds both `RATIO` x its baseline and its baseline plus a small
absolute slack.

    python benchmarks/counters.py              # check against benchmarks/counters_baseline.json
    python benchmarks/counters.py --update     # measure and write the baseline (commit it)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import shmfeed
from shmfeed._cli.bench import workloads
from shmfeed.sources import Stream

BASELINE = Path(__file__).with_name("counters_baseline.json")
ROWS = {"images": 256, "features": 256, "tokens": 4096, "tokenstream": 4_000_000, "shards": 8192}
# Workloads left out: images-jpeg (Pillow's decode: its counters are Pillow's) and
# disk-images (arrays-images with the page cache dropped: the disk's counters).
SHAPES = {"transport": 120, "samples-large": 120, "samples-large-flip": 30, "images": 20, "compute": 20,
          "tokens": 300, "batchlevel": 300, "arrays-tokens": 300, "arrays-images": 120, "windows": 300,
          "stream-shards": 150}
WARM_BATCHES = 30
ALLOC_BATCHES = 5
REPEATS = 3
# counter: (ratio, absolute slack): fails above max(ratio * baseline, baseline + slack)
LIMITS = {"build_minflt": (2.0, 20.0), "build_cpu_ms": (2.0, 0.05), "peak_alloc_kb": (1.5, 256.0),
          "worker_cpu_ms": (2.0, 0.05), "loop_cpu_ms": (2.0, 0.05)}


def _proc_cpu(pid: int) -> float:
    """CPU seconds of process `pid`, in nanoseconds from each thread's schedstat
    (/proc/PID/stat counts 10 ms ticks, too coarse for a worker at 20 us a batch)."""
    cpu_ns = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            cpu_ns += int(f.read().split()[0])
    return cpu_ns / 1e9


def _loader(name: str, data_dir: Path, workers: int) -> shmfeed.Loader:
    w = workloads.WORKLOADS[name]
    path, _ = workloads.ensure_file(w.data, data_dir, ROWS[w.data.kind])
    source = workloads.make_source(w, str(path), batch_size=w.batch_size, length=None, seed=0)
    if w.stream:
        source = Stream(source, num_shards=len(source.paths))
    return shmfeed.Loader(source, batch_size=None if w.batch_level else w.batch_size, num_workers=workers,
                          shuffle=not w.stream, seed=0, drop_last=bool(w.arrays))


def _batches(loader: shmfeed.Loader):
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def measure(name: str, data_dir: Path) -> dict:
    n = SHAPES[name]
    # Built here (`num_workers=0`, the workers' very code): faults and allocations of
    # building a batch, once every slot of the ring has been written (a worker's first
    # write to a slot faults its pages in, and which worker first writes which slot
    # depends on timing: with workers, those one-time faults blurred the counts).
    with _loader(name, data_dir, 0) as loader:
        it = _batches(loader)
        for _ in range(loader.num_slots + 2):
            next(it)
        f0, c0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.thread_time()
        for _ in range(n):
            next(it)
        c1, f1 = time.thread_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        tracemalloc.start()
        try:
            peak = 0
            for _ in range(ALLOC_BATCHES):
                tracemalloc.reset_peak()
                base = tracemalloc.get_traced_memory()[0]
                next(it)
                peak = max(peak, tracemalloc.get_traced_memory()[1] - base)
        finally:
            tracemalloc.stop()
            it.close()
    with _loader(name, data_dir, 2) as loader:
        it = _batches(loader)
        for _ in range(WARM_BATCHES):
            next(it)
        pids = loader.worker_pids
        w0, l0 = [_proc_cpu(p) for p in pids], time.thread_time()
        for _ in range(n):
            next(it)
        l1, w1 = time.thread_time(), [_proc_cpu(p) for p in pids]
        it.close()
    return {"build_minflt": (f1 - f0) / n, "build_cpu_ms": 1e3 * (c1 - c0) / n,
            "peak_alloc_kb": peak / 1024,
            "worker_cpu_ms": 1e3 * sum(b - a for a, b in zip(w0, w1)) / n,
            "loop_cpu_ms": 1e3 * (l1 - l0) / n}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update", action="store_true", help="write the baseline instead of checking")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    args = parser.parse_args()
    baseline = {} if args.update else json.loads(BASELINE.read_text())["shapes"]
    failures, measured = [], {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="shmfeed-counters-") as tmp:
        for name in args.shapes.split(","):
            runs = [measure(name, Path(tmp)) for _ in range(REPEATS)]
            got = {key: min(run[key] for run in runs) for key in runs[0]}
            measured[name] = {k: round(v, 3) for k, v in got.items()}
            row = []
            for key, value in got.items():
                base = baseline.get(name, {}).get(key)
                if base is None:
                    row.append(f"{key} {value:.2f}")
                    continue
                ratio, slack = LIMITS[key]
                bad = value > max(ratio * base, base + slack)
                row.append(f"{key} {value:.2f} (baseline {base:.2f}){' FAIL' if bad else ''}")
                if bad:
                    failures.append(f"{name}: {key} {value:.2f} a batch, baseline {base:.2f} "
                                    f"(limit {max(ratio * base, base + slack):.2f})")
            print(f"{name:19s} " + ", ".join(row), flush=True)
    print(f"({time.perf_counter() - t0:.0f} s)")
    if args.update:
        BASELINE.write_text(json.dumps({"command": "python benchmarks/counters.py --update",
                                        "limits": LIMITS, "shapes": measured}, indent=1) + "\n")
        print(f"wrote {BASELINE}")
        return 0
    for f in failures:
        print(f"REGRESSION {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
