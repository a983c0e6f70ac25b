"""The body of a worker process (forked by the supervisor, see _supervisor.py).

A worker loops: claim the next batch number of the current generation once it has a
slot (asleep meanwhile, holding no claim), build it into that slot (`build_batch`,
_build.py), and, once every batch of the generation is claimed, sleep until the next
one starts.  It leaves when the loader shuts down or its parent, the supervisor, is
gone; it never decides anything else on its own.  For array sources the loop runs in
C (`Control.gather_batches`, csrc/gather.h), which hands back only the batches this
code builds: the first of each epoch, and anything unusual.
"""

from __future__ import annotations

import os

from ._build import WAIT_SLICE_S, Builder, LeaveBuild, build_batch
from ._control import PoolShutdown, untag
from ._ring import Ring

NO_EPOCH = 2**64 - 1  # the epoch C has no key for (yet)


def worker_loop(ring: Ring, builder: Builder, worker: int, pending: int | None, parent_pid: int) -> None:
    """Run until the loader shuts down or the parent (the supervisor) is gone."""
    own_loop = getattr(builder, "worker_loop", None)  # sharded streams choose their batches
    if own_loop is not None:
        return own_loop(ring, worker, pending, parent_pid)
    ctl = ring.ctl
    # Array sources: C builds the batches of the epoch it has the key of (`epoch`),
    # and hands back the first batch of each epoch (and anything unusual) to build here.
    plan = builder.gather_plan()
    epoch, key = NO_EPOCH, 0
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
                claimed = ctl.gather_batches(worker, WAIT_SLICE_S, plan, epoch, key)
            if claimed is None:  # the next batch has no slot yet (the ring is full)
                if os.getppid() != parent_pid:
                    return
                continue
            gen, batch = claimed
            if batch is not None:
                build_batch(ring, builder, worker, gen, batch, parent_pid)
                if plan is not None:
                    epoch = ctl.gen_info(gen).epoch
                    key = builder.order.epoch_key(epoch)
            elif not ctl.wait_gen(gen, WAIT_SLICE_S) and os.getppid() != parent_pid:
                return
    except (LeaveBuild, PoolShutdown):
        return
