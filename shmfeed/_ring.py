"""The ring: one anonymous shared mapping (a memfd, no name in /dev/shm) holding the
control block, per-slot error reports and `n_slots` slots of `slot_bytes` each.

Owns: allocation, mapping in each process, the per-slot leaf views workers write
into, and the leases that tie a delivered batch's arrays to its slot.

Invariants:
- Memory is fixed at construction: `nbytes = data_offset + n_slots * slot_bytes`.
- The training process's mapping is MADV_DONTFORK: forked processes of *other*
  loaders never inherit it, so closing a loader really frees its memory.  Our own
  pool maps the memfd afresh.
- A slot is released only when the last array of its batch dies (its `SlotRef` is
  deallocated, in C), and only by the process that took it.
"""

from __future__ import annotations

import mmap
import os
import weakref

import numpy as np

from . import _control, _report
from ._control import Control, SlotState
from ._spec import Spec


def ring_bytes(n_slots: int, max_workers: int, slot_bytes: int) -> int:
    """Everything a ring of this geometry allocates: control block, report areas, slots."""
    return _control.layout(n_slots, max_workers)["data"] + n_slots * slot_bytes


class Ring:
    def __init__(self, spec: Spec | None, n_slots: int, max_workers: int, fd: int | None = None,
                 slot_bytes: int | None = None):
        # spec may come later (a spawned pool maps the ring before it can unpickle the
        # spec); only the geometry is needed to map it and to write reports.
        self.spec = spec
        self.n_slots = n_slots
        self.max_workers = max_workers
        self.slot_bytes = spec.slot_bytes if spec is not None else slot_bytes
        offsets = _control.layout(n_slots, max_workers)
        self.report_offsets: list[int] = offsets["reports"]
        self.fatal_offset: int = offsets["fatal"]
        self.data_offset: int = offsets["data"]
        self.nbytes = self.data_offset + n_slots * self.slot_bytes
        create = fd is None
        if create:
            fd = os.memfd_create("shmfeed-ring", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, self.nbytes)
            except OSError:
                os.close(fd)
                raise
        assert fd is not None
        self.fd = fd
        self.mm = mmap.mmap(fd, self.nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        if create:
            self.mm.madvise(mmap.MADV_DONTFORK)
        self.ctl = Control(self.mm)
        if create:
            self.ctl.init_block(n_slots, max_workers, self.slot_bytes)
        else:
            self.ctl.check()
        raw = np.frombuffer(self.mm, np.uint8)
        d, sb = self.data_offset, self.slot_bytes
        self.slot_raw = [raw[d + i * sb : d + (i + 1) * sb] for i in range(n_slots)]
        del raw
        self._write_views: list[list[np.ndarray]] | None = None
        # slot -> (tag, weak reference to its SlotRef), for release_orphans
        self._leases: dict[int, tuple[int, weakref.ref]] = {}

    # -- addresses, for tests and for page-locking ------------------------------------
    @property
    def address(self) -> int:
        return _control.address(self.mm)

    def data_view(self) -> np.ndarray:
        """The slot data region as one uint8 array (for page-locking on a GPU)."""
        return np.frombuffer(self.mm, np.uint8, count=self.n_slots * self.slot_bytes, offset=self.data_offset)

    # -- worker side ------------------------------------------------------------------
    def write_views(self, slot: int) -> list[np.ndarray]:
        """Full-capacity arrays of each leaf in `slot`, for the worker to write into."""
        if self._write_views is None:
            spec = self.spec
            self._write_views = [
                [
                    raw[lf.offset : lf.offset + lf.capacity_bytes].view(lf.dtype).reshape((spec.rows,) + lf.shape)
                    for lf in spec.leaves
                ]
                for raw in self.slot_raw
            ]
        return self._write_views[slot]

    def write_report(self, slot: int | None, report: _report._Report) -> None:
        """Write a report into `slot`'s area (None: the fatal area)."""
        _report.write(self.mm, self.fatal_offset if slot is None else self.report_offsets[slot], report)

    def read_report(self, slot: int | None) -> _report._Report:
        return _report.read(self.mm, self.fatal_offset if slot is None else self.report_offsets[slot])

    # -- consumer side ----------------------------------------------------------------
    def lease(self, slot: int, tag: int, rows: int) -> list[np.ndarray]:
        """Arrays of one taken batch; the slot is released when they all die.

        They are views of one uint8 array over a `SlotRef`, whose deallocation (in C,
        so that no Ctrl-C can interrupt it) releases the slot."""
        ref = self.ctl.slot_ref(slot, tag, self.data_offset + slot * self.slot_bytes, self.slot_bytes)
        raw = np.frombuffer(ref, np.uint8)
        self._leases[slot] = (tag, weakref.ref(ref))
        out = []
        for lf in self.spec.leaves:
            n = rows * (lf.capacity_bytes // self.spec.rows) if self.spec.rows else 0
            out.append(raw[lf.offset : lf.offset + n].view(lf.dtype).reshape((rows,) + lf.shape))
        return out

    def release_orphans(self) -> int:
        """Give back the slots the consumer holds for batches no array refers to any
        more; return how many.

        Their release was lost: a KeyboardInterrupt (or any exception) raised between
        taking a slot and leasing it.  Call only from the thread that iterates.
        """
        freed = 0
        for slot in range(self.n_slots):
            info = self.ctl.slot(slot)
            if info["state"] != SlotState.HELD:
                continue
            entry = self._leases.get(slot)
            if entry is not None and entry[0] == info["tag"] and entry[1]() is not None:
                continue
            freed += self.ctl.release(slot, info["tag"])
        return freed

    def close(self) -> None:
        """Drop this object's hold on the mapping; it is unmapped once no batch a
        caller kept still points into it."""
        self._write_views = None
        self.slot_raw = []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
