"""The body of a worker process (forked by the supervisor, see _processes/supervisor.py).

A worker loops: claim the next batch number of the current generation once it has a
slot (asleep meanwhile, holding no claim), build it into that slot (`build_batch`,
_batch/build.py), and, once every batch of the generation is claimed, sleep until the next
one starts.  It leaves when the loader shuts down or its parent, the supervisor, is
gone; it never decides anything else on its own.  For array sources the loop runs in
C (`Control.gather_batches`, csrc/gather.h), with the plan made once here and each
epoch's key read from its generation; it hands back only what is unusual (a batch
whose slot is not there yet), which this code builds.
"""

from __future__ import annotations

import ctypes
import os

from .._batch.build import WAIT_SLICE_S, Builder, LeaveBuild, build_batch
from .._engine.control import PoolShutdown, untag
from .._engine.ring import Ring
from ..sources._objstore import allow_prefetch

# A worker keeps the heap memory it frees, for the next batch (glibc's mallopt): freed
# memory above glibc's trim threshold (dynamic, ~2x the largest freed mapping) went back
# to the kernel after each sample, and every page of the next one faulted in again.  A
# JPEG decoded by Pillow (a 750 KB RGBX buffer, then the resized image) cost ~470 minor
# faults a sample against ~40: images-jpeg ran at 0.74x the batches/s of keeping them.
# Allocations above WORKER_MMAP_THRESHOLD_BYTES are still mapped and given back on free,
# and at most WORKER_TRIM_THRESHOLD_BYTES of free heap is kept.  The training process's
# allocator is the user's: only workers are tuned, and not where the user set
# MALLOC_TRIM_THRESHOLD_ / MALLOC_MMAP_THRESHOLD_ themselves.
WORKER_MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest (HEAP_MAX / 2 on 64-bit)
WORKER_TRIM_THRESHOLD_BYTES = 64 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


def keep_freed_memory() -> bool:
    """Tune this process's glibc malloc as above; False where it is not glibc's, or
    the user's environment already chose."""
    if "MALLOC_TRIM_THRESHOLD_" in os.environ or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl, or no glibc
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, WORKER_MMAP_THRESHOLD_BYTES)
                and mallopt(_M_TRIM_THRESHOLD, WORKER_TRIM_THRESHOLD_BYTES))


def worker_loop(ring: Ring, builder: Builder, worker: int, pending: int | None, parent_pid: int) -> None:
    """Run until the loader shuts down or the parent (the supervisor) is gone."""
    keep_freed_memory()
    allow_prefetch()  # a worker never forks: an ObjectCache may download ahead in threads here
    own_loop = getattr(builder, "worker_loop", None)  # sharded streams choose their batches
    if own_loop is not None:
        return own_loop(ring, worker, pending, parent_pid)
    ctl = ring.ctl
    # Array sources: C builds the batches, and hands back anything unusual to build here.
    plan = builder.gather_plan()
    # What the source does between batches, once the last one is out (Parquet: decode
    # the next row group ahead).
    idle = getattr(builder, "idle", None)
    batch: int | None
    try:
        if pending is not None:
            # A predecessor died building this batch: rebuild it first (the
            # supervisor has already recorded it as our claim).
            gen, batch = untag(pending)
            build_batch(ring, builder, worker, gen, batch, parent_pid)
        while True:
            if plan is None:
                claimed = ctl.claim_wait(worker, WAIT_SLICE_S)
            else:
                claimed = ctl.gather_batches(worker, WAIT_SLICE_S, plan)
            if claimed is None:  # the next batch has no slot yet (the ring is full)
                if os.getppid() != parent_pid:
                    return
                continue
            gen, batch = claimed
            if batch is not None:
                build_batch(ring, builder, worker, gen, batch, parent_pid)
                if idle is not None:
                    idle()
            elif not ctl.wait_gen(gen, WAIT_SLICE_S) and os.getppid() != parent_pid:
                return
    except (LeaveBuild, PoolShutdown):
        return
