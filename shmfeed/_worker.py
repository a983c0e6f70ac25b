"""The body of a worker process (forked by the supervisor, see _supervisor.py).

A worker loops: claim the next batch number of the current generation once it has a
slot (asleep meanwhile, holding no claim), build it into that slot (`build_batch`,
_build.py), and, once every batch of the generation is claimed, sleep until the next
one starts.  It leaves when the loader shuts down or its parent, the supervisor, is
gone; it never decides anything else on its own.  For array sources the loop runs in
C (`Control.gather_batches`, csrc/gather.h), with the plan made once here and each
epoch's key read from its generation; it hands back only what is unusual (a batch
whose slot is not there yet), which this code builds.
"""

from __future__ import annotations

import os

from ._build import WAIT_SLICE_S, Builder, LeaveBuild, build_batch
from ._control import PoolShutdown, untag
from ._ring import Ring


def worker_loop(ring: Ring, builder: Builder, worker: int, pending: int | None, parent_pid: int) -> None:
    """Run until the loader shuts down or the parent (the supervisor) is gone."""
    own_loop = getattr(builder, "worker_loop", None)  # sharded streams choose their batches
    if own_loop is not None:
        return own_loop(ring, worker, pending, parent_pid)
    ctl = ring.ctl
    # Array sources: C builds the batches, and hands back anything unusual to build here.
    plan = builder.gather_plan()
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
            elif not ctl.wait_gen(gen, WAIT_SLICE_S) and os.getppid() != parent_pid:
                return
    except (LeaveBuild, PoolShutdown):
        return
