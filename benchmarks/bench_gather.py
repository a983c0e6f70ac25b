"""How fast an array batch is copied: `gather_rows` (shmfeed's worker copy) of 64 rows of
a 2048x224x224x3 uint8 memmap into private memory and into a memfd (what the ring is),
a plain memcpy into a memfd, and numpy's `x[idx]` (in-process loading), in one process
and in two at once.

    python benchmarks/bench_gather.py [--batches 150]

Prints GB/s per copy kind: the median of 3 timed passes of `--batches` batches each.
What it shows on the project VM (benchmarks/RESULTS.md): two processes copying at once
move 1.2-1.8x the bytes of one, which bounds what two workers can gain over one
in-process copy of large batches.  Then the arrays-tokens batch's copy alone, in us.
"""

from __future__ import annotations

import argparse
import mmap
import multiprocessing
import os
import statistics
import tempfile
import time

import numpy as np

from shmfeed import _kernels

SHAPE = (2048, 224, 224, 3)
BATCH = 64


def _memfd_array(shape) -> np.ndarray:
    nbytes = int(np.prod(shape))
    fd = os.memfd_create("bench-gather")
    os.ftruncate(fd, nbytes)
    mm = mmap.mmap(fd, nbytes)
    os.close(fd)
    return np.frombuffer(mm, np.uint8).reshape(shape)


def measure(path: str, batches: int) -> dict[str, float]:
    x = np.load(path, mmap_mode="r")
    row = x[0].nbytes
    private = np.empty((BATCH,) + SHAPE[1:], np.uint8)
    shared = _memfd_array((BATCH,) + SHAPE[1:])
    private[:] = 1
    shared[:] = 1
    starts = len(x) - BATCH

    def idx(k):
        return np.arange(BATCH, dtype=np.int64) + (k * BATCH) % starts

    kinds = {
        "x[idx] (new array)": lambda k: x[idx(k)],
        "gather_rows -> private": lambda k: _kernels.gather_rows(x, row, row, idx(k), private),
        "gather_rows -> memfd": lambda k: _kernels.gather_rows(x, row, row, idx(k), shared),
        "memcpy -> memfd": lambda k: np.copyto(shared, x[(k * BATCH) % starts:][:BATCH]),
    }
    out = {}
    for name, fn in kinds.items():
        fn(0)
        out[name] = private.nbytes / _seconds_per_call(fn, batches) / 1e9
    return out


def _seconds_per_call(fn, calls: int) -> float:
    """The median over 3 passes of the time one `fn(k)` takes, k = 0..calls-1."""
    times = []
    for _ in range(3):
        t = time.perf_counter()
        for k in range(calls):
            fn(k)
        times.append((time.perf_counter() - t) / calls)
    return statistics.median(times)


def _write_npy(path: str, dtype, shape: tuple[int, ...], value: int) -> None:
    data = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    data[:] = value
    data.flush()


def _child(path: str, batches: int, queue) -> None:
    queue.put(measure(path, batches))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=150)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "images.npy")
        _write_npy(path, np.uint8, SHAPE, 7)
        one = measure(path, args.batches)
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        procs = [ctx.Process(target=_child, args=(path, args.batches, queue)) for _ in range(2)]
        for p in procs:
            p.start()
        both = [queue.get(timeout=600) for _ in procs]
        for p in procs:
            p.join(timeout=60)
    print(f"{'copy':<24} {'1 process GB/s':>15} {'2 at once, total GB/s':>22}")
    for name in one:
        print(f"{name:<24} {one[name]:>15.1f} {sum(b[name] for b in both):>22.1f}")
    small_batch_costs()


def small_batch_costs(batches: int = 20000) -> None:
    """The arrays-tokens batch (32 rows of 512 int32 from a 65536-row memmap): what the
    copy alone costs, by `x[idx]` and by `gather_rows`, in us per batch (median of 3)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tokens.npy")
        _write_npy(path, np.int32, (65536, 512), 3)
        x = np.load(path, mmap_mode="r")
        out = np.empty((32, 512), np.int32)
        starts = len(x) // 32

        def idx(k):
            return np.arange(32, dtype=np.int64) + (k % starts) * 32

        kinds = {"x[idx]": lambda k: x[idx(k)],
                 "gather_rows": lambda k: _kernels.gather_rows(x, 2048, 2048, idx(k), out)}
        print("arrays-tokens batch (32x512 int32), us a batch:")
        for name, fn in kinds.items():
            for k in range(starts):  # map every page of the file first
                fn(k)
            print(f"  {name:<12} {_seconds_per_call(fn, batches) * 1e6:.1f}")


if __name__ == "__main__":
    main()
