"""The measuring loop, run in a fresh interpreter for one (workload, loader) pair:

    python -m shmfeed._cli.bench.child JOB.json RESULT.json

Owns what "a batch was delivered" means and how it is timed.

- Startup is construction of the loader to the first batch in hand.
- The rate is measured from the first batch for `seconds`: batches taken after it,
  bytes of their leaves, over the time they took.  Epochs follow one another as in
  training; the time a loader spends between epochs counts.
- Every delivered batch is touched (`touch`): the first and last element of every
  leaf are read, so a loader cannot win by handing out work it has not done, and the
  batch is dropped before the next is asked for, as a training step would.
- A training step of `step_ms` can follow each batch (`--step-ms`): a sleep, because
  the host thread of a GPU/TPU step waits for the device and leaves the CPU to the
  loader's workers (a CPU-bound step would compete with them instead).
- The input wait is the time spent inside `next()` over the measured time.  With no
  step it is near 1 for every loader (the loop does nothing else), so it only means
  something with `step_ms`: then near 0 says the loader keeps up with that step.
- The loop CPU is the CPU time of this process (all its threads) per batch, step
  excluded (a sleep takes none): what the loader costs the training process itself,
  e.g. every item for in-process loading, unpickling for a pickling loader.
- The tree CPU is the CPU time of the whole process tree of this run over the
  measured time: this process and every live descendant (workers, supervisor, a
  pool's processes), each with the CPU of the descendants it has reaped (the
  kernel's `children_user/system`, so a pool replaced every epoch still counts),
  read with psutil when the first batch is in hand and again at the end.  A process
  that left the tree (re-parented to init) is missed.  Over the bytes delivered it
  is the loader's cost: CPU-seconds per GB.
- A headspace run (`Job.replay`) reads `workloads.replay(source)` instead of the
  source: one sample (or batch) built once and handed out for every index, so that
  only the loader's own work remains, with no step and a warm page cache; its rate
  is the loader's ceiling.  `source_item_us` says what an item of the source read
  cost in this process (near nothing for a replay).
- A workload with a simulated step of its own (`Workload.step_ms`, unless `--step-ms`
  is given) sleeps the same way; one on a cold file (`cold`) drops the file's
  pages from the page cache before the loader starts and at every epoch start, so
  reads go to disk and a loader can only win by reading while the step runs.

The parent (runner.py) samples this process tree's memory from outside, so that the
measurement costs this process nothing.  The result is a JSON object:
`{"status": "ok", ...}`, `{"status": "skipped", "reason": ...}` or
`{"status": "error", "reason": ..., "traceback": ...}`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
from typing import Any

import numpy as np
import psutil

from . import workloads
from .loaders import LOADERS, Job, adapter_module

SOURCE_COST_ITEMS = 10  # items read to report what one item of the source costs


def touch(batch: Any) -> int:
    """Read the first and last element of every leaf of `batch`; its bytes."""
    if isinstance(batch, dict):
        return sum(touch(v) for v in batch.values())
    if isinstance(batch, (tuple, list)):
        return sum(touch(v) for v in batch)
    arr = batch if isinstance(batch, np.ndarray) else np.asarray(batch)  # torch: no copy
    if arr.size:
        flat = arr.reshape(-1)
        flat[0].item()
        flat[-1].item()
    return arr.nbytes


def tree_cpu_s() -> float:
    """CPU seconds of this process and its live descendants, reaped ones included.

    This process's own is `process_time` (nanoseconds); the rest is counted in the
    kernel's clock ticks (10 ms), so a short run of a cheap loader reads coarsely."""
    me = psutil.Process()
    own = os.times()
    total = time.process_time() + own.children_user + own.children_system
    with contextlib.suppress(psutil.Error):
        for p in me.children(recursive=True):
            with contextlib.suppress(psutil.Error):  # it just exited: its parent reaps it
                t = p.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
    return total


def source_item_us(source: Any) -> float | None:
    """Microseconds one item of `source` takes to read in this process."""
    source[0]
    t = time.perf_counter()
    for i in range(SOURCE_COST_ITEMS):
        source[i % len(source)]
    return (time.perf_counter() - t) / SOURCE_COST_ITEMS * 1e6


def measure(job: Job) -> dict:
    workload = workloads.WORKLOADS[job.workload]
    try:
        module = adapter_module(job.loader)
    except ImportError as exc:
        return {"status": "skipped", "reason": f"cannot import {LOADERS[job.loader].requires}: {exc}"}
    source = workloads.make_source(workload, job.data_path, batch_size=job.batch_size,
                                   length=job.length, seed=job.seed)
    item_us = None
    if job.replay:
        source = workloads.replay(source)
        item_us = source_item_us(source)
    rss_base = psutil.Process().memory_info().rss
    step_s = 0.0 if job.replay else (job.step_ms or workload.step_ms) / 1e3
    cold = workload.cold and not job.replay
    if cold:
        workloads.drop_page_cache(job.data_path)

    t_construct = time.perf_counter()
    adapter = module.Adapter(source, job)
    try:
        epoch = 0
        it = iter(adapter.epoch(epoch))
        batch = next(it)
        t_first = time.perf_counter()
        touch(batch)
        del batch
        deadline = t_first + job.seconds
        n = nbytes = 0
        wait_s = 0.0
        now = t_first
        tree0_s = tree_cpu_s()  # (first: reading /proc is not the loop's CPU)
        cpu0_s = time.process_time()
        while now < deadline:
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                epoch += 1
                if cold:
                    workloads.drop_page_cache(job.data_path)
                it = iter(adapter.epoch(epoch))
                now = time.perf_counter()
                wait_s += now - t
                continue
            now = time.perf_counter()
            wait_s += now - t
            nbytes += touch(batch)
            del batch
            n += 1
            if step_s:
                time.sleep(step_s)
                now = time.perf_counter()
        elapsed_s = now - t_first
        loop_cpu_s = time.process_time() - cpu0_s
        tree_s = tree_cpu_s() - tree0_s
        del it
        stats = adapter.stats()
    finally:
        t_close = time.perf_counter()
        adapter.close()
        close_s = time.perf_counter() - t_close
    return {
        "status": "ok",
        "batches": n,
        "bytes": nbytes,
        "elapsed_s": elapsed_s,
        "batches_per_s": n / elapsed_s,
        "MB_per_s": nbytes / elapsed_s / 1e6,
        "startup_s": t_first - t_construct,
        "input_wait_fraction": wait_s / elapsed_s,
        "loop_cpu_ms_per_batch": loop_cpu_s / max(n, 1) * 1e3,
        "tree_cpu_s": tree_s,
        "tree_cpu_cores": tree_s / elapsed_s,
        "cpu_s_per_GB": tree_s / (nbytes / 1e9) if nbytes else None,
        "replay": job.replay,
        "source": type(source).__name__,
        "source_item_us": item_us,
        "epochs_started": epoch + 1,
        "close_s": close_s,
        "rss_before_loader_MB": rss_base / 1e6,
        "loader_stats": stats,
    }


def main(argv: list[str]) -> int:
    job_path, result_path = argv
    with open(job_path) as f:
        job = Job(**json.load(f))
    try:
        result = measure(job)
    except BaseException as exc:  # noqa: B036 - any failure is a result to report
        result = {"status": "error", "reason": f"{type(exc).__name__}: {exc}",
                  "traceback": traceback.format_exc()}
    with open(result_path, "w") as f:
        json.dump(result, f, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
