"""The ring: one anonymous shared mapping (a memfd, no name in /dev/shm) holding the
control block, per-slot error reports and `n_slots` slots of `slot_bytes` each.

Owns: allocation, mapping in each process, the per-slot leaf views workers write
into, and the leases that tie a delivered batch's arrays to its slot.

Invariants:
- Memory is fixed at construction: `nbytes = data_offset + n_slots * slot_bytes`.
- The training process's mapping is MADV_DONTFORK: forked processes of *other*
  loaders never inherit it, so closing a loader really frees its memory.  Our own
  pool maps the memfd afresh.
- A slot is released only when the last array of its batch dies (the lease's
  `__del__`), and only by the process that took it.
"""

from __future__ import annotations

import mmap
import os
import pickle
import struct

import numpy as np

from . import _core
from ._control import REPORT_BYTES, Control, Status
from ._errors import internal
from ._spec import Spec

_LEN = struct.Struct("<I")


class Lease(np.ndarray):
    """The bytes of one delivered batch; every array of the batch is a view of it.

    When the last view dies, `__del__` gives the slot back to the ring.
    """

    def __del__(self) -> None:
        rel = self.__dict__.get("_shmfeed_release")
        if rel is None:
            return
        pid, ctl, slot, tag = rel
        if pid != os.getpid():  # a forked copy of a lease must not free the parent's slot
            return
        try:
            ctl.release(slot, tag)
        except Exception:  # interpreter shutdown: nothing left to protect
            pass


class Ring:
    def __init__(self, spec: Spec, n_slots: int, max_workers: int, fd: int | None = None):
        self.spec = spec
        self.n_slots = n_slots
        self.max_workers = max_workers
        self.slot_bytes = spec.slot_bytes
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
        """Arrays of one taken batch; the slot is released when they all die."""
        lease = self.slot_raw[slot].view(Lease)
        lease._shmfeed_release = (os.getpid(), self.ctl, slot, tag)
        out = []
        for lf in self.spec.leaves:
            n = rows * (lf.capacity_bytes // self.spec.rows) if self.spec.rows else 0
            out.append(lease[lf.offset : lf.offset + n].view(np.ndarray).view(lf.dtype).reshape((rows,) + lf.shape))
        return out

    def close(self) -> None:
        """Drop this object's hold on the mapping; it is unmapped once no batch a
        caller kept still points into it."""
        self._write_views = None
        self.slot_raw = []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
