"""The CUDA side of the device feed, through CuPy.  The only module that imports
cupy, and only when a CUDA device is the target (a CPU run never loads it: the
Loader would otherwise start its workers by spawn, since CuPy may hold CUDA state).

Owns:
- page-locking a loader's ring: once per loader (`cudaHostRegister`, portable, so
  every GPU context sees it pinned), undone when the loader is closed or collected,
  after every copy stream has drained;
- one non-blocking copy stream per GPU (also timed by the device benchmark,
  _bench.py);
- the upload of one leaf piece: a fresh device buffer, `cudaMemcpyAsync` from the
  ring on the copy stream, and the buffer handed to JAX through DLPack;

Invariants:
- The numpy leaves of a batch (whose last reference frees its ring slot) are held
  until the event recorded on each copy stream after the batch's copies has
  completed: a slot is never given back while DMA may still read it (feed
  invariant 1, _feed.py).
- JAX reads a buffer only after its copy: CuPy's `__dlpack__(stream=s)` makes the
  consumer stream `s` (JAX passes its own) wait on an event of CuPy's *current*
  stream, so the export happens with the copy stream current.  No host
  synchronisation, and `copy=False` makes JAX adopt the buffer or fail, never copy.
- A device buffer returns to CuPy's pool only when JAX calls the DLPack deleter,
  i.e. when JAX no longer uses it; the pool reuses it for later copies on the same
  copy stream, which are ordered after everything recorded before.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import jax
import numpy as np

from ._shard import Target, host_slice
from ._transfer import DeviceFeedError, Pending, Transfer

log = logging.getLogger("shmfeed")

CUDA_HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable
CUDA_MEMCPY_HOST_TO_DEVICE = 1  # cudaMemcpyHostToDevice
CUDA_PLATFORMS = ("gpu", "cuda")


def _cupy():
    import cupy

    return cupy


def unusable_reason(devices: tuple) -> str | None:
    """Why the CuPy path cannot feed `devices`, or None when it can."""
    for d in devices:
        if d.platform not in CUDA_PLATFORMS:
            return f"device {d} is a {d.platform} device, not a CUDA GPU"
    version = str(getattr(devices[0].client, "platform_version", "")).lower()
    if "rocm" in version:
        return "JAX runs on ROCm; the CuPy path is written for CUDA"
    try:
        cupy = _cupy()
    except ImportError as exc:
        return f"CuPy is not installed ({exc})"
    try:
        if cupy.cuda.runtime.is_hip:
            return "this CuPy is built for ROCm/HIP; the CuPy path is written for CUDA"
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # no driver, no device
        return f"CuPy cannot reach CUDA ({type(exc).__name__}: {exc})"
    for d in devices:
        if d.local_hardware_id is None or d.local_hardware_id >= count:
            return f"JAX device {d} has no CUDA ordinal CuPy can see ({count} visible)"
    return None


def available() -> str | None:
    """None when a CUDA GPU is usable by both JAX and CuPy, else why not."""
    try:
        gpus = jax.devices("gpu")
    except RuntimeError as exc:
        return f"JAX has no GPU backend ({exc})"
    if not gpus:
        return "JAX sees no GPU"
    return unusable_reason(tuple(jax.local_devices(backend="gpu")))


# -- page-locking the ring -------------------------------------------------------------
class PinnedRing:
    """A loader's slot region, page-locked for DMA until `release()`."""

    def __init__(self, data: np.ndarray):
        self.ptr = int(data.ctypes.data)
        self.nbytes = int(data.nbytes)
        cupy = _cupy()
        cupy.cuda.runtime.hostRegister(self.ptr, self.nbytes, CUDA_HOST_REGISTER_PORTABLE)
        self._data: np.ndarray | None = data  # keeps the mapping alive while registered
        self.streams: set = set()  # copy streams that may read it
        self.ordinals: set[int] = set()  # GPUs that may DMA from it

    @property
    def active(self) -> bool:
        return self._data is not None

    def release(self) -> None:
        if self._data is None:
            return
        try:
            cupy = _cupy()
            for s in list(self.streams):
                s.synchronize()  # no DMA of ours may read pages being unlocked
            for ordinal in sorted(self.ordinals):
                with cupy.cuda.Device(ordinal):  # nor one XLA started from the ring
                    cupy.cuda.runtime.deviceSynchronize()
            cupy.cuda.runtime.hostUnregister(self.ptr)
        except Exception as exc:  # CUDA already torn down at interpreter exit
            log.debug("shmfeed: unregistering the ring failed: %s", exc)
        self.streams.clear()
        self._data = None


_pins: dict[int, PinnedRing] = {}  # id(loader) -> its registration (removed at collection)


def pin_ring(loader: Any) -> PinnedRing | None:
    """Page-lock `loader`'s ring once; None (and a warning) if CUDA refuses."""
    key = id(loader)
    pin = _pins.get(key)
    if pin is not None and pin.active:
        return pin
    data = loader._ring_data()
    try:
        pin = PinnedRing(data)
    except Exception as exc:
        log.warning(
            "shmfeed: could not page-lock the ring (%d bytes): %s; uploads will read pageable "
            "memory and be slower. Check `ulimit -l` and free host memory.", data.nbytes, exc)
        return None
    _pins[key] = pin

    def unpin(key: int = key, pin: PinnedRing = pin) -> None:
        pin.release()
        if _pins.get(key) is pin:
            del _pins[key]

    # Unregister at close when the Loader offers a hook, at collection in any case.
    add_close_callback = getattr(loader, "add_close_callback", None)
    if add_close_callback is not None:
        add_close_callback(unpin)
    weakref.finalize(loader, unpin)
    return pin


def unpin_ring(loader: Any) -> None:
    """Unregister `loader`'s ring now (waits for the copies still reading it)."""
    pin = _pins.pop(id(loader), None)
    if pin is not None:
        pin.release()


def pinned_bytes(loader: Any) -> int:
    """How many bytes of `loader`'s ring are page-locked now (0 when none)."""
    pin = _pins.get(id(loader))
    return pin.nbytes if pin is not None and pin.active else 0


# -- copy streams ----------------------------------------------------------------------
_streams: dict[int, Any] = {}  # CUDA ordinal -> the copy stream (lives as long as the process)


def copy_stream(ordinal: int):
    s = _streams.get(ordinal)
    if s is None:
        cupy = _cupy()
        with cupy.cuda.Device(ordinal):
            s = _streams[ordinal] = cupy.cuda.Stream(non_blocking=True)
    return s


class CupyTransfer(Transfer):
    """cudaMemcpyAsync from the page-locked ring on a dedicated stream, DLPack to JAX."""

    name = "cupy"

    def __init__(self, target: Target, loader: Any | None):
        super().__init__(target)
        self.cp = _cupy()
        self.pin = pin_ring(loader) if loader is not None else None

    def upload_leaves(self, leaves, plans):
        cp = self.cp
        runtime = cp.cuda.runtime
        out = []
        keep: list[np.ndarray] = []  # staging copies of non-contiguous pieces
        used: dict[int, Any] = {}  # ordinal -> stream that got copies of this batch
        for leaf, plan in zip(leaves, plans):
            shards = []
            for dev, idx in plan.pieces:
                src = host_slice(leaf, idx)
                if not src.flags.c_contiguous:  # a split along a later axis
                    src = np.ascontiguousarray(src)
                    keep.append(src)
                if src.nbytes == 0:  # DLPack has no buffer to share
                    shards.append(jax.device_put(np.empty(src.shape, src.dtype), dev))
                    continue
                ordinal = dev.local_hardware_id
                stream = copy_stream(ordinal)
                try:
                    with cp.cuda.Device(ordinal), stream:
                        buf = cp.empty(src.shape, src.dtype)
                        runtime.memcpyAsync(buf.data.ptr, src.ctypes.data, src.nbytes,
                                            CUDA_MEMCPY_HOST_TO_DEVICE, stream.ptr)
                        # With the copy stream current, CuPy makes JAX's stream wait for it.
                        shards.append(jax.dlpack.from_dlpack(buf, device=dev, copy=False))
                except Exception as exc:
                    # Whatever was queued must finish before the caller drops the leaves.
                    for queued in {*used.values(), stream}:
                        queued.synchronize()
                    remedy = ("If device memory is short, JAX may have preallocated it: set "
                              "XLA_PYTHON_CLIENT_MEM_FRACTION lower, or use `transfer='xla'`."
                              if "memory" in str(exc).lower() else
                              "Use `transfer='xla'` to let XLA upload from the ring instead.")
                    raise DeviceFeedError(
                        f"uploading {src.nbytes} bytes to {dev} failed: {type(exc).__name__}: "
                        f"{exc}. {remedy}") from exc
                used[ordinal] = stream
                if self.pin is not None:
                    self.pin.streams.add(stream)
                    self.pin.ordinals.add(ordinal)
            if plan.sharding is None:
                out.append(shards[0])
            else:
                out.append(jax.make_array_from_single_device_arrays(plan.global_shape, plan.sharding, shards))
        events = []
        for ordinal, stream in used.items():
            with cp.cuda.Device(ordinal):
                ev = cp.cuda.Event(block=False, disable_timing=True)
                ev.record(stream)
            events.append(ev)

        def ready() -> bool:
            return all(e.done for e in events)

        def wait() -> None:
            for e in events:
                e.synchronize()

        return out, Pending(list(leaves) + keep, ready, wait)
