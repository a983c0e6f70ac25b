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
import pickle
import struct
import weakref

import numpy as np

from . import _core
from ._control import REPORT_BYTES, Control, SlotState, Status
from ._errors import internal
from ._spec import Spec

_LEN = struct.Struct("<I")


class Ring:
    def __init__(self, spec: Spec | None, n_slots: int, max_workers: int, fd: int | None = None,
                 slot_bytes: int | None = None):
        # spec may come later (a spawned pool maps the ring before it can unpickle the
        # spec); only the geometry is needed to map it and to write reports.
        self.spec = spec
        self.n_slots = n_slots
        self.max_workers = max_workers
        self.slot_bytes = spec.slot_bytes if spec is not None else slot_bytes
        offsets = _core.layout(n_slots, max_workers)
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
            st = self.ctl.init_block(n_slots, max_workers, self.slot_bytes)
            if st != Status.OK:
                raise internal(f"control block init failed ({Status(st).name})")
        elif self.ctl.check() != Status.OK:
            raise internal("the ring handed to this process has a bad control block")
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
        return _core.address(self.mm)

    def data_view(self) -> np.ndarray:
        """The slot data region as one uint8 array (for page-locking on a GPU)."""
        return np.frombuffer(self.mm, np.uint8, count=self.n_slots * self.slot_bytes, offset=self.data_offset)

    def slot_of(self, gen: int, batch: int) -> int:
        """The slot assigned to batch `batch` of generation `gen`, or -1."""
        return self.ctl.slot_of(gen, batch)

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

    def write_report(self, slot: int | None, payload: bytes) -> None:
        off = self.fatal_offset if slot is None else self.report_offsets[slot]
        payload = payload[: REPORT_BYTES - _LEN.size]
        self.mm[off : off + _LEN.size] = _LEN.pack(len(payload))
        self.mm[off + _LEN.size : off + _LEN.size + len(payload)] = payload

    def read_report(self, slot: int | None) -> object:
        off = self.fatal_offset if slot is None else self.report_offsets[slot]
        (n,) = _LEN.unpack(self.mm[off : off + _LEN.size])
        return pickle.loads(self.mm[off + _LEN.size : off + _LEN.size + n])

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
            freed += self.ctl.release(slot, info["tag"]) == Status.OK
        return freed

    def close(self) -> None:
        """Drop this object's hold on the mapping; it is unmapped once no batch a
        caller kept still points into it."""
        self._write_views = None
        self.slot_raw = []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
