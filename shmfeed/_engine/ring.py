"""The ring: one anonymous shared mapping (a memfd, no name in /dev/shm) holding the
control block, per-slot error reports and `n_slots` slots of `slot_bytes` each.

Owns: allocation, mapping in each process, the per-slot leaf views workers write
into, and the views of a delivered batch (of the `SlotRef` that ties them to its
slot).

Invariants:
- Memory is fixed at construction: `nbytes = data_offset + n_slots * slot_bytes`.
- `close()` gives up this object's hold on the mapping and on its descriptor: the
  memory goes at once, or, when a caller kept batches, when the last of them dies.
- A process the training process forks inherits its rings, so a batch handed to a
  child (an async logger, a checkpoint writer) can be read there.  Pool processes
  unmap every inherited ring first (`forget_inherited`), so the pool of one loader
  never keeps another loader's memory alive; each maps its own ring afresh.
- A slot is released only when the last array of its batch dies (its `SlotRef` is
  deallocated, in C), and only by the process that took it.
"""

from __future__ import annotations

import errno
import mmap
import os
import weakref
from typing import TYPE_CHECKING

import numpy as np

from .._errors import LoaderClosedError, RingMemoryError
from . import control as _control
from . import report as _report
from .control import Control

if TYPE_CHECKING:  # the ring lays slots out from a spec, and needs nothing else of _batch
    from .._batch.spec import Spec

_mapped: weakref.WeakSet = weakref.WeakSet()  # rings mapped in this process


def forget_inherited(keep: Ring | None = None) -> None:
    """In a pool process just forked: unmap every ring inherited from the parent but
    `keep` (they belong to the parent; a supervisor maps its own ring again from its
    descriptor, a worker keeps the supervisor's)."""
    for ring in list(_mapped):
        mm = ring._mm
        if mm is not None and ring is not keep:
            _control.unmap(_control.address(mm), len(mm))
            _mapped.discard(ring)


def mapped_fds() -> set[int]:
    """The descriptors of the rings mapped in this process."""
    return {r.fd for r in list(_mapped) if r.fd >= 0}


def ring_bytes(n_slots: int, max_workers: int, slot_bytes: int) -> int:
    """Everything a ring of this geometry allocates: control block, report areas, slots.
    Arithmetic only (O(1) time and memory), so that any size is checked before it is made."""
    return _control.data_offset(n_slots, max_workers) + n_slots * slot_bytes


class Ring:
    def __init__(self, spec: Spec | None, n_slots: int, max_workers: int, fd: int | None = None,
                 slot_bytes: int | None = None):
        # spec may come later (a spawned pool maps the ring before it can unpickle the
        # spec); only the geometry is needed to map it and to write reports.
        self.spec = spec
        self.n_slots = n_slots
        self.max_workers = max_workers
        slot_bytes = spec.slot_bytes if spec is not None else slot_bytes
        assert slot_bytes is not None, "a Ring needs its spec or its slot_bytes"
        self.slot_bytes = slot_bytes
        offsets = _control.layout(n_slots, max_workers)
        self.report_offsets: list[int] = offsets["reports"]
        self.fatal_offset: int = offsets["fatal"]
        self.data_offset: int = offsets["data"]
        self.nbytes = self.data_offset + n_slots * self.slot_bytes
        create = fd is None
        if create:
            fd = os.memfd_create("shmfeed-ring", os.MFD_CLOEXEC)
        assert fd is not None
        try:
            if create:
                os.ftruncate(fd, self.nbytes)
            self._mm: mmap.mmap | None = mmap.mmap(fd, self.nbytes, mmap.MAP_SHARED,
                                                   mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            if create:
                os.close(fd)
            if exc.errno in (errno.ENOMEM, errno.ENOSPC, errno.EFBIG):
                raise RingMemoryError(
                    f"the ring of {self.nbytes} bytes ({self.nbytes / 2**20:.1f} MiB: "
                    f"{n_slots} slots of {self.slot_bytes} bytes) could not be mapped: "
                    f"{os.strerror(exc.errno)}. Lower `num_slots` or pass a smaller "
                    "`memory_budget_bytes`, or raise the limit that refused it "
                    "(`ulimit -v`, the container's memory).") from exc
            raise
        self.fd = fd
        _mapped.add(self)
        self._ctl: Control | None = Control(self._mm)
        if create:
            self._ctl.init_block(n_slots, max_workers, self.slot_bytes)
        else:
            self._ctl.check()
        raw = np.frombuffer(self._mm, np.uint8)
        d, sb = self.data_offset, self.slot_bytes
        self.slot_raw = [raw[d + i * sb : d + (i + 1) * sb] for i in range(n_slots)]
        del raw
        self._write_views: list[list[np.ndarray]] | None = None
        self._layout_spec: Spec | None = None  # the spec `_layout` was made for
        self._layout: list[tuple[np.dtype, tuple[int, ...], int]] = []

    @property
    def mm(self) -> mmap.mmap:
        if self._mm is None:
            raise LoaderClosedError("this Loader is closed; create a new one")
        return self._mm

    @property
    def ctl(self) -> Control:
        if self._ctl is None:
            raise LoaderClosedError("this Loader is closed; create a new one")
        return self._ctl

    @property
    def closed(self) -> bool:
        return self._mm is None

    # -- addresses, for tests and for page-locking ------------------------------------
    @property
    def address(self) -> int:
        return _control.address(self.mm)

    def data_view(self) -> np.ndarray:
        """The slot data region as one uint8 array (for page-locking on a GPU)."""
        return np.frombuffer(self.mm, np.uint8, count=self.n_slots * self.slot_bytes, offset=self.data_offset)

    # -- worker side ------------------------------------------------------------------
    def _views(self, buffer, rows: int, shapes: list[tuple[int, ...]] | None,
               offsets: tuple[int, ...] | None = None) -> list[np.ndarray]:
        """Each leaf of a slot as `rows` rows of its shape (`shapes`: a bucket's, packed
        contiguously from the leaf's offset, or from `offsets`, the bucket's own layout
        with token budgets, so that the views stay plain arrays); `buffer` is the slot's
        bytes, and each view's base."""
        if shapes is None:
            # One constructor call per leaf: the consumer makes these for every batch.
            layout = self._layout if self._layout_spec is self.spec else self._lay_out()
            return [np.ndarray((rows,) + shape, dtype, buffer, offset) for dtype, shape, offset in layout]
        leaves = self._known_spec().leaves
        return [np.ndarray((rows,) + tuple(shape), lf.dtype, buffer, lf.offset if offsets is None else offsets[j])
                for j, (lf, shape) in enumerate(zip(leaves, shapes))]

    def _known_spec(self) -> Spec:
        """The spec, which a spawned pool's ring learns after mapping (see __init__)."""
        assert self.spec is not None, "the ring's spec is not known yet"
        return self.spec

    def _lay_out(self) -> list[tuple[np.dtype, tuple[int, ...], int]]:
        """(dtype, row shape, offset) of each leaf of the spec (which a spawned pool
        learns after mapping the ring)."""
        self._layout = [(lf.dtype, tuple(lf.shape), lf.offset) for lf in self._known_spec().leaves]
        self._layout_spec = self.spec
        return self._layout

    def write_views(self, slot: int, shapes: list[tuple[int, ...]] | None = None, rows: int | None = None,
                    offsets: tuple[int, ...] | None = None) -> list[np.ndarray]:
        """Full-capacity arrays of each leaf in `slot`, for the worker to write into
        (with `shapes`: of those row shapes, for a bucket; `rows` and `offsets`: the
        bucket's own layout, with token budgets)."""
        if shapes is not None:
            return self._views(self.slot_raw[slot], self._known_spec().rows if rows is None else rows, shapes,
                               offsets)
        if self._write_views is None:
            rows = self._known_spec().rows
            self._write_views = [self._views(raw, rows, None) for raw in self.slot_raw]
        return self._write_views[slot]

    def write_report(self, slot: int | None, report: _report._Report) -> None:
        """Write a report into `slot`'s area (None: the fatal area)."""
        _report.write(self.mm, self.fatal_offset if slot is None else self.report_offsets[slot], report)

    def read_report(self, slot: int | None) -> _report._Report:
        return _report.read(self.mm, self.fatal_offset if slot is None else self.report_offsets[slot])

    # -- consumer side ----------------------------------------------------------------
    def views(self, ref, rows: int, shapes: list[tuple[int, ...]] | None = None,
              offsets: tuple[int, ...] | None = None) -> list[np.ndarray]:
        """Arrays of one taken batch, views of its `SlotRef` (`Control.take` returns it):
        each array's base is the ref, whose deallocation (in C, so that no Ctrl-C can
        interrupt it) releases the slot when the last of them dies."""
        return self._views(ref, rows, shapes, offsets)

    def close(self) -> None:
        """Drop this object's hold on the mapping and its descriptor.  The memory is
        unmapped now, or, when batches a caller kept still point into it, when the last
        of them dies (each holds the control object, which holds the mapping)."""
        self._write_views = None
        self.slot_raw = []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        mm, self._mm, self._ctl = self._mm, None, None
        _mapped.discard(self)
        if mm is not None:
            try:
                mm.close()  # also closes the descriptor mmap duplicated for itself
            except BufferError:
                pass  # kept batches export it: unmapped with the last of them
