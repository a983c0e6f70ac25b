"""The control block as Python sees it, and the one place where its status codes are
interpreted.

Owns: `Control`, a wrapper around the C extension's `_core.Control` whose methods
return values or raise; the slot states and status codes, built from the constants
the extension exports (never retyped); batch tags.  The C side
(csrc/shmfeed_ctl.h) is the source of truth for the layout and the transitions.

Invariants:
- No raw status int leaves this module.  Every status a call can return is either
  turned into a value (a slot, a claim, "not yet"), or into one of the exceptions
  below, or, when it can only mean that shmfeed itself is wrong, into an
  "[INTERNAL ERROR]" `ShmfeedError`.
- Every write to the control block is one call into csrc/ctl.c (so
  csrc/test_ctl.c exercises it); this module and the binding only read.
"""

from __future__ import annotations

import enum
from typing import Any, NamedTuple

from .._errors import internal

try:
    from .. import _core
except ImportError as exc:
    raise ImportError(
        f"shmfeed's C core (shmfeed._core) is not built or not importable here: {exc}. Build it: "
        "`pip install -e .` in the checkout, or `python setup.py build_ext --inplace`; "
        "then `shmfeed doctor` checks the rest") from exc

NO_CLAIM: int = _core.SHMF_NO_CLAIM
REPORT_BYTES: int = _core.SHMF_REPORT_BYTES
layout = _core.layout
# What a worker's C loop builds array batches with: the order (`Order.c_order`) and the
# leaves' sources, checked and held once per worker (csrc/gather.h).
GatherPlan = _core.GatherPlan
data_offset = _core.data_offset
set_pdeathsig = _core.set_pdeathsig
address = _core.address
unmap = _core.unmap


class SlotState(enum.IntEnum):
    FREE = _core.SHMF_FREE
    FILLING = _core.SHMF_FILLING
    READY = _core.SHMF_READY
    HELD = _core.SHMF_HELD
    ERROR = _core.SHMF_ERROR
    ASSIGNED = _core.SHMF_ASSIGNED
    ASSIGNING = _core.SHMF_ASSIGNING


class Status(enum.IntEnum):
    OK = _core.SHMF_OK
    TIMEOUT = _core.SHMF_TIMEOUT
    STALE = _core.SHMF_STALE
    SHUTDOWN = _core.SHMF_SHUTDOWN
    EPOCH_DONE = _core.SHMF_EPOCH_DONE
    BLOCKED = _core.SHMF_BLOCKED
    INTERRUPTED = _core.SHMF_INTERRUPTED
    EINVAL = _core.SHMF_EINVAL


_OK = Status.OK
_TIMEOUT = Status.TIMEOUT
_INTERRUPTED = Status.INTERRUPTED


class PoolShutdown(Exception):
    """The loader is closing, or the pool gave up (then `Control.fatal` is set)."""


class BatchStale(Exception):
    """The batch is no longer wanted: a newer epoch started or the consumer passed it."""


class RingBlocked(Exception):
    """Every slot is held by the consumer: no slot can be given to the next batch."""


# A taken slot: (state, rows word, slot, its SlotRef), state SlotState.READY or
# SlotState.ERROR.  A plain tuple: the training loop takes one per batch.
Taken = tuple[int, int, int, Any]


class GenInfo(NamedTuple):
    epoch: int
    first_batch: int  # batch b of the generation is batch first_batch + b of the epoch
    n_batches: int
    key: int  # of the epoch's order (Order.epoch_key)


def _claimed(st: int, gen: int, _epoch: int, batch: int, call: str) -> tuple[int, int | None]:
    """A claim's result: (gen, batch), or (gen, None) once the epoch is all claimed."""
    if st == _OK:
        return gen, batch
    if st == Status.EPOCH_DONE:
        return gen, None
    if st == Status.SHUTDOWN:
        raise PoolShutdown()
    raise _fail(call, st)


def tag(gen: int, batch: int) -> int:
    return (gen << 32) | batch


def untag(t: int) -> tuple[int, int]:
    return t >> 32, t & 0xFFFFFFFF


def _fail(what: str, status: int) -> Exception:
    return internal(f"{what} returned {Status(status).name}")


class Control:
    """The control block at the start of a writable buffer (the ring's mapping)."""

    __slots__ = ("_c", "_gen_info")

    def __init__(self, buffer) -> None:
        self._c = _core.Control(buffer)
        self._gen_info: tuple[int, GenInfo] | None = None  # the last one read

    # -- set-up ----------------------------------------------------------------------
    def init_block(self, n_slots: int, max_workers: int, slot_bytes: int) -> None:
        st = self._c.init_block(n_slots, max_workers, slot_bytes)
        if st != _OK:
            raise _fail("control block init", st)

    def check(self) -> None:
        st = self._c.check()
        if st != _OK:
            raise internal("the ring handed to this process has a bad control block")

    # -- consumer --------------------------------------------------------------------
    def start_epoch(self, epoch: int, first_batch: int, n_batches: int, slot_base: int,
                    key: int = 0) -> int:
        """Open a generation for batches first_batch.. of `epoch`, whose order has `key`
        (`Order.epoch_key`: the workers' C loop reads it there); return it."""
        return self._c.start_epoch(epoch, key, first_batch, n_batches, slot_base)

    def take(self, gen: int, batch: int, timeout_s: float) -> Taken | None:
        """The slot of `batch`, now HELD by the consumer, with the `SlotRef` (a buffer
        over the slot's bytes) that gives it back when freed; None if it was not ready
        within `timeout_s` (or a signal arrived).  Raises RingBlocked or PoolShutdown."""
        st, state, rows, slot, ref = self._c.take(gen, batch, timeout_s)
        if st == _OK:
            return state, rows, slot, ref
        if st == _TIMEOUT or st == _INTERRUPTED:
            return None
        if st == Status.BLOCKED:
            raise RingBlocked()
        if st == Status.SHUTDOWN:
            raise PoolShutdown()
        raise _fail(f"take({gen}, {batch})", st)

    def release(self, slot: int, tag_: int) -> bool:
        """Give a HELD slot back; False when it no longer holds that batch."""
        st = self._c.release(slot, tag_)
        if st == _OK:
            return True
        if st == Status.STALE:
            return False
        raise _fail(f"release({slot})", st)

    def abandon(self, gen: int) -> None:
        self._c.abandon(gen)

    def assign_free(self) -> None:
        self._c.assign_free()

    def epoch_guard(self, gen: int):
        return self._c.epoch_guard(gen)

    def shutdown(self) -> None:
        self._c.shutdown()

    def reopen(self) -> None:
        self._c.reopen()

    # -- workers -----------------------------------------------------------------------
    def claim(self, worker: int) -> tuple[int, int | None]:
        """(gen, batch) of the batch this worker now builds, or (gen, None) when every
        batch of generation `gen` is claimed.  Raises PoolShutdown."""
        return _claimed(*self._c.claim(worker), f"claim({worker})")

    def claim_wait(self, worker: int, timeout_s: float) -> tuple[int, int | None] | None:
        """What a worker claims with: like `claim`, but only a batch that already has a
        slot, waiting up to `timeout_s` for one; None when the wait ran out with nothing
        claimed (the epoch still has batches).  Raises PoolShutdown."""
        st, gen, epoch, batch = self._c.claim_wait(worker, timeout_s)
        if st == _TIMEOUT or st == _INTERRUPTED:
            return None
        return _claimed(st, gen, epoch, batch, f"claim_wait({worker})")

    def gather_batches(self, worker: int, timeout_s: float,
                       plan: GatherPlan) -> tuple[int, int | None] | None:
        """Like `claim_wait`, but the batches claimed meanwhile, of any epoch, are
        built and published in C (array sources; `plan` is `Builder.gather_plan()`, the
        order's key comes with each generation; csrc/gather.h).  Returns only what the
        caller must act on: a claim it builds itself (one C left: its slot not there
        yet, or a batch outside the plan's order), the end of the epoch, or None when
        the wait ran out.  Raises PoolShutdown."""
        st, gen, claimed_epoch, batch = self._c.gather_batches(worker, timeout_s, plan)
        if st == _TIMEOUT or st == _INTERRUPTED:
            return None
        return _claimed(st, gen, claimed_epoch, batch, f"gather_batches({worker})")

    def wait_gen(self, gen: int, timeout_s: float) -> bool:
        """Wait for a generation after `gen`; False if none came within `timeout_s`."""
        st = self._c.wait_gen(gen, timeout_s)
        if st == _OK:
            return True
        if st == _TIMEOUT or st == _INTERRUPTED:
            return False
        if st == Status.SHUTDOWN:
            raise PoolShutdown()
        raise _fail("wait_gen", st)

    def acquire(self, worker: int, gen: int, batch: int, timeout_s: float) -> int | None:
        """The slot of `batch`, now FILLING and owned by `worker`; None if it had none
        within `timeout_s`.  Raises BatchStale or PoolShutdown."""
        st, slot = self._c.acquire(worker, gen, batch, timeout_s)
        if st == _OK:
            return slot
        if st == _TIMEOUT or st == _INTERRUPTED:
            return None
        if st == Status.STALE:
            raise BatchStale()
        if st == Status.SHUTDOWN:
            raise PoolShutdown()
        raise _fail(f"acquire({worker}, {gen}, {batch})", st)

    def publish(self, worker: int, slot: int, gen: int, batch: int, rows: int,
                state: SlotState, busy_ns: int) -> None:
        st = self._c.publish(worker, slot, gen, batch, rows, state, busy_ns)
        if st != _OK:
            raise _fail(f"publish(worker {worker}, slot {slot}, batch {batch})", st)

    # -- supervisor ----------------------------------------------------------------------
    def reclaim(self, worker: int) -> int | None:
        """Put back what a dead worker left half done; return the tag it had claimed
        and not published (to be rebuilt), or None."""
        st, pending = self._c.reclaim(worker)
        if st != _OK:
            raise _fail(f"reclaim({worker})", st)
        return None if pending == NO_CLAIM else pending

    def set_claim(self, worker: int, tag_: int | None) -> None:
        st = self._c.set_claim(worker, NO_CLAIM if tag_ is None else tag_)
        if st != _OK:
            raise _fail(f"set_claim({worker})", st)

    def set_worker_pid(self, worker: int, pid: int) -> None:
        st = self._c.set_worker_pid(worker, pid)
        if st != _OK:
            raise _fail(f"set_worker_pid({worker})", st)

    def add_restart(self) -> int:
        st, restarts = self._c.add_restart()
        if st != _OK:
            raise _fail("add_restart", st)
        return restarts

    def set_fatal(self) -> None:
        self._c.set_fatal()

    # -- read-only snapshots -------------------------------------------------------------
    def gen_info(self, gen: int) -> GenInfo:
        # A generation's parameters are written before it starts and never change
        # (its table entry is reused only SHMF_GEN_TABLE generations later): a worker
        # asks for every batch, so the last answer is kept.
        last = self._gen_info
        if last is not None and last[0] == gen:
            return last[1]
        info = GenInfo(*self._c.gen_info(gen))
        self._gen_info = (gen, info)
        return info

    def slot_of(self, gen: int, batch: int) -> int:
        """The slot assigned to batch `batch` of generation `gen`, or -1."""
        return self._c.slot_of(gen, batch)

    def header(self) -> dict:
        return self._c.header()

    def worker(self, w: int) -> dict:
        return self._c.worker(w)

    def slot(self, s: int) -> dict:
        return self._c.slot(s)

    @property
    def fatal(self) -> bool:
        return bool(self._c.header()["fatal"])

    @property
    def shutting_down(self) -> bool:
        return bool(self._c.header()["shutdown"])
