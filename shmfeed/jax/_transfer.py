"""The transfer interface of the device feed, and the two host-side transfers.

Owns: `Transfer` (moves one batch's host leaves to their devices) and `Pending` (the
host memory an upload may still be reading, and how to wait for it), which the feed
(_feed.py) schedules and every transfer implements: "copy" and "xla" here, "cupy" in
_gpu.py; `DeviceFeedError`; the aligned host buffers of the "copy" transfer.  Which
transfer a feed uses is decided in one place, `_feed.make_transfer`.  The guarantees
each transfer gives are written down in _feed.py.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import jax
import numpy as np

from .._errors import ShmfeedError
from ._shard import Placement, Target, host_slice

HOST_ALIGN_BYTES = 64  # XLA:CPU adopts host buffers aligned to this without a copy


class DeviceFeedError(ShmfeedError):
    """A device refused something the feed needs (page-locking, a copy, DLPack)."""


class Pending:
    """Host memory of one batch that a transfer may still be reading."""

    __slots__ = ("host", "ready", "wait")

    def __init__(self, host: list, ready: Callable[[], bool], wait: Callable[[], None]):
        self.host = host  # the ring leaves: their last reference releases the slot
        self.ready = ready
        self.wait = wait


class Transfer:
    """Moves one batch's host leaves to their devices.  Subclasses say how: `upload`
    (one leaf) and `pending`, or all of `upload_leaves` (one that schedules the batch
    as a whole, like CuPy's)."""

    name = "?"

    def __init__(self, target: Target):
        self.target = target

    def upload_leaves(self, leaves: list[np.ndarray], plans: list[Placement]) -> tuple[list, Pending | None]:
        out = [self.upload(leaf, plan) for leaf, plan in zip(leaves, plans)]
        return out, self.pending(leaves, out)

    def upload(self, leaf: np.ndarray, plan: Placement) -> jax.Array:
        raise NotImplementedError

    def pending(self, leaves: list[np.ndarray], out: list) -> Pending | None:
        """What of `leaves` the uploads to `out` may still read (None: nothing)."""
        return None

    def close(self) -> None:
        """The feed is done with this transfer (every upload has completed)."""


class HostCopyTransfer(Transfer):
    """One private, aligned host copy per device piece, then `jax.device_put`."""

    name = "copy"

    def upload(self, leaf, plan):
        if plan.sharding is None:
            return jax.device_put(aligned_copy(leaf))
        copies: dict[str, np.ndarray] = {}  # devices that hold the same rows share a copy
        shards = []
        for d, idx in plan.pieces:
            key = repr(idx)
            if key not in copies:
                copies[key] = aligned_copy(host_slice(leaf, idx))
            shards.append(jax.device_put(copies[key], d))
        return jax.make_array_from_single_device_arrays(plan.global_shape, plan.sharding, shards)

    # `pending`: None, the ring is not read any more.


class XlaTransfer(Transfer):
    """XLA's own transfer straight from the ring."""

    name = "xla"

    def upload(self, leaf, plan):
        if plan.sharding is None:
            return jax.device_put(leaf)
        return jax.make_array_from_process_local_data(plan.sharding, leaf, plan.global_shape)

    def pending(self, leaves, out):
        return Pending(list(leaves), lambda: all(a.is_ready() for a in out),
                       lambda: jax.block_until_ready(out))


class HostPool:
    """Aligned host buffers for the "copy" transfer, reused instead of freed.

    Fresh memory costs a page fault per page on first touch (here ~16 ms for 8 MiB,
    20x the copy itself), and with async dispatch several batches are alive at once,
    so the allocator keeps handing out fresh pages.  A buffer is reused only when no
    array made from it is left, i.e. when JAX no longer reads it, so reuse is as safe
    as the ring's own slots: every such array has the buffer's owner as its numpy
    base, so the owner's reference count says whether one lives (for an array XLA:CPU
    adopted, until JAX lets go of it).  That is checked when a buffer is asked for,
    not by a `__del__` run as each array dies: a Ctrl-C that lands in Python code run
    as a finalizer is printed and dropped.  Memory kept is bounded: `IDLE_PER_SIZE`
    buffers of each of at most `MAX_SIZES` sizes.
    """

    IDLE_PER_SIZE = 8
    MAX_SIZES = 16

    def __init__(self) -> None:
        self._owners: dict[int, list[np.ndarray]] = {}  # nbytes -> buffers handed out

    def take(self, nbytes: int) -> np.ndarray:
        """A HOST_ALIGN_BYTES-aligned uint8 array of `nbytes` that nothing uses."""
        owners = self._owners.get(nbytes)
        if owners is None and len(self._owners) < self.MAX_SIZES:
            owners = self._owners.setdefault(nbytes, [])
        if owners is not None:
            for i in range(len(owners)):
                if sys.getrefcount(owners[i]) == _UNUSED_REFS:
                    return _aligned(owners[i], nbytes)
        raw = np.empty(nbytes + HOST_ALIGN_BYTES, np.uint8)
        if owners is not None and len(owners) < self.IDLE_PER_SIZE:
            owners.append(raw)
        return _aligned(raw, nbytes)

    def copy(self, x: np.ndarray) -> np.ndarray:
        """A C-contiguous, HOST_ALIGN_BYTES-aligned copy of `x` in the dtype JAX keeps
        (64-bit types become 32-bit unless `jax_enable_x64`), so that `jax.device_put`
        adopts it instead of converting it in a second copy."""
        dtype = np.dtype(jax.dtypes.canonicalize_dtype(x.dtype))
        out = self.take(x.size * dtype.itemsize).view(dtype).reshape(x.shape)
        np.copyto(out, x, casting="unsafe")  # what JAX's own conversion would do
        return out


def _aligned(raw: np.ndarray, nbytes: int) -> np.ndarray:
    # A view of `raw`, which owns the memory: numpy makes `raw` the base of every
    # array derived from it, whatever the chain of views.
    off = (-raw.ctypes.data) % HOST_ALIGN_BYTES
    return raw[off : off + nbytes]


# `sys.getrefcount(owners[i])` of a buffer nothing else refers to: the list's reference
# and the call's argument (CPython; tests/test_jax.py checks reuse and its absence).
_UNUSED_REFS = 2


_host_pool = HostPool()


def aligned_copy(x: np.ndarray) -> np.ndarray:
    """See HostPool.copy (the process-wide pool)."""
    return _host_pool.copy(x)


