"""Building batches: the code that runs in each worker process (and, for
`num_workers=0`, in the training process itself, which is what makes that mode the
reference).

A worker loops: claim the next batch number, wait for its slot, build the batch in
place, publish it.  Which samples and which random draws a batch gets depends only
on `(seed, epoch, batch)` (see _order.py).  An exception becomes an error report in
the slot's report area and the slot is published as ERROR, so the training process
meets it in batch order, after every earlier batch.
"""

from __future__ import annotations

import os
import pickle
import time
import traceback
from typing import Any

import numpy as np

from . import _order
from ._control import NO_CLAIM, REPORT_BYTES, SlotState, Status, untag
from ._order import Order
from ._ring import Ring
from ._spec import Spec, check_batch_leaves, check_sample_leaf, flattener

WAIT_SLICE_S = 0.25  # how often a waiting worker checks that its parent is alive
_TRACEBACK_CHARS = 5000  # what fits in a report with room for the message


class Builder:
    """Builds batch `b` of an epoch into a slot; remembers the item it is on, so that
    an error can name the sample."""

    def __init__(self, source: Any, spec: Spec, order: Order, ring: Ring, seed_global_rngs: bool):
        self.source = source
        self.spec = spec
        self.order = order
        self.ring = ring
        self.seed_global_rngs = seed_global_rngs
        self.current_item: int | None = None
        self._flatten = flattener(spec)
        self._perm_epoch: int | None = None
        self._perm: np.ndarray | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm = self.order.permutation(epoch)
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm

    def fill(self, slot: int, epoch: int, batch: int) -> int:
        """Write batch `batch` of `epoch` into `slot`; return its number of rows."""
        order, spec, seed = self.order, self.spec, self.order.seed
        perm = self.permutation(epoch)
        if self.seed_global_rngs:
            _order.seed_global_rngs(seed, epoch, batch)
        views = self.ring.write_views(slot)
        try:
            if spec.batch_level:
                index = int(perm[batch])
                self.current_item = index
                _order.set_item(seed, epoch, index)
                leaves = self._flatten(self.source[index], "batch", index)
                rows = check_batch_leaves(leaves, spec, index)
                for view, x in zip(views, leaves):
                    view[:rows] = x
                return rows
            items = order.batch_items(perm, batch).tolist()
            source, tree_leaves, flatten = self.source, spec.leaves, self._flatten
            for row, index in enumerate(items):
                self.current_item = index
                _order.set_item(seed, epoch, index)
                leaves = flatten(source[index], "sample", index)
                for view, x, leaf in zip(views, leaves, tree_leaves):
                    # Fast path first: the exact dtype and shape of the first sample.
                    if not (
                        (isinstance(x, np.ndarray) and x.dtype == leaf.dtype and x.shape == leaf.shape)
                        or (leaf.pytype is not None and type(x) is leaf.pytype)
                    ):
                        check_sample_leaf(x, leaf, index)
                    view[row] = x
            return len(items)
        finally:
            _order.clear_item()


def error_report(exc: BaseException, *, worker: int, batch: int, epoch: int, item: int | None,
                 batch_level: bool) -> bytes:
    """A pickled description of `exc` that fits the slot's report area."""
    tb = "".join(traceback.format_exception(exc))
    if len(tb) > _TRACEBACK_CHARS:
        tb = "...\n" + tb[-_TRACEBACK_CHARS:]
    report = {
        "type": (type(exc).__module__, type(exc).__qualname__),
        "message": str(exc)[:1000],
        "traceback": tb,
        "worker": worker,
        "pid": os.getpid(),
        "batch": batch,
        "epoch": epoch,
        "item": item,
        "batch_level": batch_level,
        "exception": None,
    }
    try:
        report["exception"] = pickle.dumps(exc)
    except Exception:
        pass
    data = pickle.dumps(report)
    if len(data) > REPORT_BYTES - 64:
        report["exception"] = None
        data = pickle.dumps(report)
    return data


class _Exit(Exception):
    """Leave the worker loop: the loader is closing or the parent is gone."""


def build_one(ring: Ring, builder: Builder, worker: int, gen: int, epoch: int, batch: int,
              parent_pid: int | None) -> None:
    """Acquire the slot of `batch`, build it, publish it (READY or ERROR)."""
    ctl = ring.ctl
    while True:
        st = ctl.acquire(worker, gen, batch, WAIT_SLICE_S)
        if st == Status.OK:
            break
        if st == Status.STALE:
            ctl.set_claim(worker, NO_CLAIM)
            return
        if st == Status.SHUTDOWN:
            raise _Exit()
        if parent_pid is not None and os.getppid() != parent_pid:
            raise _Exit()
    slot = ring.slot_of(gen, batch)  # ours while FILLING: it cannot change now
    t0 = time.perf_counter_ns()
    try:
        rows = builder.fill(slot, epoch, batch)
        state = SlotState.READY
    except BaseException as exc:  # noqa: B036 - user code may even call sys.exit
        ring.write_report(slot, error_report(exc, worker=worker, batch=batch, epoch=epoch,
                                             item=builder.current_item,
                                             batch_level=builder.spec.batch_level))
        rows, state = 0, SlotState.ERROR
        if parent_pid is None and not isinstance(exc, Exception):
            # Building in the training process (`num_workers=0`): Ctrl-C and
            # sys.exit() are the user's, not a broken sample.  The slot is published
            # (as ERROR) first, so the ring stays consistent.
            ctl.publish(worker, gen, batch, rows, state, time.perf_counter_ns() - t0)
            raise
    ctl.publish(worker, gen, batch, rows, state, time.perf_counter_ns() - t0)


def worker_loop(ring: Ring, builder: Builder, worker: int, pending: int, parent_pid: int) -> None:
    """The body of a worker process; returns when the loader shuts down or the parent
    (the supervisor) is gone."""
    ctl = ring.ctl
    try:
        if pending != NO_CLAIM:
            # A predecessor died building this batch: rebuild it first (the
            # supervisor has already recorded it as our claim).
            gen, batch = untag(pending)
            epoch = ctl.gen_info(gen)[0]
            build_one(ring, builder, worker, gen, epoch, batch, parent_pid)
        while True:
            st, gen, epoch, batch = ctl.claim(worker)
            if st == Status.OK:
                build_one(ring, builder, worker, gen, epoch, batch, parent_pid)
            elif st == Status.EPOCH_DONE:
                if ctl.wait_gen(gen, WAIT_SLICE_S) == Status.SHUTDOWN:
                    return
                if os.getppid() != parent_pid:
                    return
            else:
                return
    except _Exit:
        return
