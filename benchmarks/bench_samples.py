"""Large per-sample batches, measured with only shmfeed's public API, so that the same
script runs against any tree (`PYTHONPATH=TREE python benchmarks/bench_samples.py`):
the shape that regressed 4x unseen (issue 24).

A per-sample source returns a FRESH `uint8[224, 224, 3]` array read from a memmap
(`np.array(mm[r])`) and an int label; `--work flip` adds a random horizontal flip (a
second fresh array, half the time).  Batches of 64 (9.6 MB), `shuffle=False`, the
training loop touches every page of every batch.  Side by side in one run, alternating
`--rounds` times:

- shmfeed with `--workers` workers: batches/s, the loop's CPU ms per batch, and per
  batch the workers' CPU ms and minor page faults (from /proc: stable on a busy machine
  where a few % of wall-clock time is not);
- in-process: the same source, samples stacked with `np.stack` in the loop;
- memcpy, two references, as GB/s (and as batches/s):
  - cache: one 9.6 MB buffer copied into another, again and again (both stay in a
    32 MB L3: the copy's ceiling, which no loader moving data between processes
    reaches);
  - memory: 64 rows at a time from the dataset's memmap (154 MB, in the page cache)
    into a ring of 8 batch buffers (77 MB): the one copy a loader must make, at the
    speed of memory.  Issue 24's figure for fe234c3 (73-75 % of memcpy at 5.6 GB/s)
    matches this reference, not the first.

    python benchmarks/bench_samples.py [--work none|flip] [--seconds 2] [--rounds 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time

import numpy as np

import shmfeed

SHAPE = (224, 224, 3)
ROWS = 1024  # 154 MB: lives in the page cache
PAGE = 4096
_CLK = os.sysconf("SC_CLK_TCK")


class FreshSamples:
    """`ds[i] -> {"x": uint8[224, 224, 3] (a fresh array), "y": int}` over a memmap."""

    def __init__(self, path: str, length: int, work: str):
        self.path, self.length, self.work = path, length, work
        self._pid: int | None = None
        self._data: np.ndarray | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pid": None, "_data": None}

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        if self._pid != os.getpid():
            self._data, self._pid = np.load(self.path, mmap_mode="r"), os.getpid()
        x = np.array(self._data[int(i) % ROWS])
        if self.work == "flip":
            g = np.random.default_rng([int(i), 7])
            if g.random() < 0.5:
                x = np.ascontiguousarray(x[:, ::-1])
        return {"x": x, "y": int(i) % 1000}


def _touch(x: np.ndarray) -> int:
    return int(x.reshape(-1)[::PAGE].sum())


def _proc(pid: int) -> tuple[float, int]:
    """(CPU seconds, minor faults) of process `pid`, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK, int(fields[7])


def _loop_cpu() -> float:
    return resource.getrusage(resource.RUSAGE_THREAD).ru_utime + resource.getrusage(
        resource.RUSAGE_THREAD).ru_stime


def run_shmfeed(path: str, work: str, workers: int, seconds: float) -> dict:
    ds = FreshSamples(path, 1 << 20, work)
    with shmfeed.Loader(ds, batch_size=64, num_workers=workers, shuffle=False) as loader:
        it = iter(loader)
        for _ in range(2 * loader.num_slots):  # start the pool, fill the ring
            _touch(next(it)["x"])
        pids = loader.worker_pids
        w0 = [_proc(p) for p in pids]
        c0, t0, n = _loop_cpu(), time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            _touch(next(it)["x"])
            n += 1
        wall, cpu = time.perf_counter() - t0, _loop_cpu() - c0
        w1 = [_proc(p) for p in pids]
        del it
    return {"batches_s": n / wall, "loop_cpu_ms": 1e3 * cpu / n,
            "worker_cpu_ms": 1e3 * sum(b[0] - a[0] for a, b in zip(w0, w1)) / n,
            "worker_minflt": sum(b[1] - a[1] for a, b in zip(w0, w1)) / n}


def run_inline(path: str, work: str, seconds: float) -> dict:
    ds = FreshSamples(path, 1 << 20, work)
    c0, t0, n, i = _loop_cpu(), time.perf_counter(), 0, 0
    while time.perf_counter() - t0 < seconds:
        samples = [ds[j] for j in range(i, i + 64)]
        batch = {"x": np.stack([s["x"] for s in samples]),
                 "y": np.array([s["y"] for s in samples], np.int64)}
        _touch(batch["x"])
        i, n = i + 64, n + 1
    wall = time.perf_counter() - t0
    return {"batches_s": n / wall, "loop_cpu_ms": 1e3 * (_loop_cpu() - c0) / n}


def run_memcpy(seconds: float) -> dict:
    src = np.random.default_rng(0).integers(0, 256, (64,) + SHAPE, dtype=np.uint8)
    dst = np.empty_like(src)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds / 4:
        np.copyto(dst, src)
        n += 1
    wall = time.perf_counter() - t0
    return {"batches_s": n / wall, "gb_s": n * src.nbytes / wall / 1e9}


RING = 8  # batch buffers the memory reference rotates through, as a ring would


def run_memcpy_memory(path: str, seconds: float) -> dict:
    src = np.load(path, mmap_mode="r")
    dst = np.empty((RING, 64) + SHAPE, np.uint8)
    dst.fill(1)  # faulted in, as a ring's slots are after the first pass
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds / 4:
        r = (n * 64) % (ROWS - 63)
        np.copyto(dst[n % RING], src[r:r + 64])
        n += 1
    wall = time.perf_counter() - t0
    return {"batches_s": n / wall, "gb_s": n * dst[0].nbytes / wall / 1e9}


def data_file() -> str:
    path = os.path.join(tempfile.gettempdir(), f"shmfeed-bench-samples-{ROWS}.npy")
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:  # a file object: np.save adds no ".npy" to its name
            np.save(f, np.random.default_rng(0).integers(0, 256, (ROWS,) + SHAPE, dtype=np.uint8))
        os.replace(tmp, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="none", choices=["none", "flip"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="also write the medians here")
    args = parser.parse_args()
    path = data_file()
    np.load(path).sum()  # into the page cache
    runs: dict[str, list[dict]] = {"shmfeed": [], "in-process": [], "memcpy": [], "memcpy-memory": []}
    for _ in range(args.rounds):
        runs["shmfeed"].append(run_shmfeed(path, args.work, args.workers, args.seconds))
        runs["in-process"].append(run_inline(path, args.work, args.seconds))
        runs["memcpy"].append(run_memcpy(args.seconds))
        runs["memcpy-memory"].append(run_memcpy_memory(path, args.seconds))
    med = {k: {f: statistics.median(r[f] for r in rs) for f in rs[0]} for k, rs in runs.items()}
    ratios = [s["batches_s"] / i["batches_s"] for s, i in zip(runs["shmfeed"], runs["in-process"])]
    of_memcpy = [s["batches_s"] / m["batches_s"] for s, m in zip(runs["shmfeed"], runs["memcpy"])]
    of_memory = [s["batches_s"] / m["batches_s"] for s, m in zip(runs["shmfeed"], runs["memcpy-memory"])]
    s = med["shmfeed"]
    print(f"work={args.work} workers={args.workers} rounds={args.rounds} ({shmfeed.__file__})")
    print(f"shmfeed    {s['batches_s']:7.1f} batches/s  loop {s['loop_cpu_ms']:6.2f} ms/batch  "
          f"workers {s['worker_cpu_ms']:6.2f} CPU ms/batch  {s['worker_minflt']:7.1f} minor faults/batch")
    print(f"in-process {med['in-process']['batches_s']:7.1f} batches/s  loop "
          f"{med['in-process']['loop_cpu_ms']:6.2f} ms/batch")
    print(f"memcpy     {med['memcpy']['batches_s']:7.1f} batches/s  ({med['memcpy']['gb_s']:.1f} GB/s, in cache)")
    print(f"memcpy     {med['memcpy-memory']['batches_s']:7.1f} batches/s  "
          f"({med['memcpy-memory']['gb_s']:.1f} GB/s, through memory)")
    print(f"shmfeed / in-process: median {statistics.median(ratios):.2f}x (runs "
          f"{', '.join(f'{r:.2f}' for r in ratios)}); of memcpy: {statistics.median(of_memcpy):.0%} in cache, "
          f"{statistics.median(of_memory):.0%} through memory")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"medians": med, "ratio": statistics.median(ratios),
                       "of_memcpy": statistics.median(of_memcpy),
                       "of_memcpy_memory": statistics.median(of_memory), "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
