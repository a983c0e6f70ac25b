"""A simulated CUDA runtime with the slice of CuPy's API that shmfeed.jax._gpu calls,
so that the CuPy transfer's own logic runs in CI, where there is no GPU.

What it models, because the GPU feed's correctness rests on it:
- a stream runs its work later, in order, on its own thread, and can be paused (a
  paused stream is a copy still queued behind other work);
- an event recorded on a stream is done when the work queued before it has run;
- `memcpyAsync` reads the host memory when it runs, not when it is queued;
- CuPy's `__dlpack__` orders the consumer after the stream that is *current* when it
  is called, so a buffer exported while another stream is current may be read by
  JAX before its copy lands;
- `hostUnregister` must not run while a queued copy may still read the range.

Device buffers are 64-byte-aligned host arrays exported through numpy's DLPack as
CPU memory, so JAX's CPU backend adopts them without a copy (like the CUDA backend
adopts CuPy's).  Misuse is recorded in `violations` instead of raised, because
shmfeed swallows some CUDA errors on purpose (unregistering at exit); a test checks
that the list is empty.  Nothing here says that real CUDA behaves as modelled; the
tests in tests/gpu check that on a GPU.
"""

from __future__ import annotations

import ctypes
import functools
import queue
import threading
import types
from contextlib import contextmanager

import numpy as np

WAIT_S = 10.0  # the longest any simulated synchronisation may take before it is an error
KDL_CPU = 1  # DLPack device type of host memory


class CUDARuntimeError(RuntimeError):
    pass


class SimStream:
    def __init__(self, sim: SimCuda, non_blocking: bool = False):
        self.sim = sim
        self.device = sim.current_device()
        self.non_blocking = non_blocking
        self.ptr = id(self)
        self.queued = 0  # operations enqueued so far
        self.ran = 0  # operations that have run
        self._reads: list[tuple[int, int, int]] = []  # (src, nbytes, op number) of copies
        self._work: queue.Queue = queue.Queue()
        self._changed = threading.Condition()
        self.running = threading.Event()
        self.running.set()
        self._thread = threading.Thread(target=self._run, name=f"simcuda-stream-{self.ptr:x}",
                                        daemon=True)
        self._thread.start()
        sim.streams[self.ptr] = self

    def _run(self) -> None:
        while True:
            op = self._work.get()
            if op is None:
                return
            if not self.running.wait(WAIT_S):
                self.sim.violations.append("a paused stream was never resumed")
            try:
                op()
            except Exception as exc:
                self.sim.violations.append(f"queued work failed: {exc!r}")
            with self._changed:
                self.ran += 1
                self._changed.notify_all()

    def enqueue(self, op) -> int:
        with self._changed:
            self.queued += 1
            self._work.put(op)
            return self.queued

    def enqueue_copy(self, dst: int, src: int, nbytes: int) -> None:
        with self._changed:  # an RLock: the op number and the queueing are one step
            self._reads = [r for r in self._reads if r[2] > self.ran]
            op = self.enqueue(lambda: ctypes.memmove(dst, src, nbytes))
            self._reads.append((src, nbytes, op))

    def may_read(self, lo: int, nbytes: int) -> bool:
        """Whether a copy still queued here reads host memory in [lo, lo + nbytes)."""
        with self._changed:
            return any(op > self.ran and src < lo + nbytes and lo < src + n
                       for src, n, op in self._reads)

    def wait_for(self, count: int) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: self.ran >= count, WAIT_S):
                self.sim.violations.append(f"stream work {count} did not finish in {WAIT_S} s")
                raise CUDARuntimeError("simulated stream timed out")

    def synchronize(self) -> None:
        self.wait_for(self.queued)

    def close(self) -> None:
        self.running.set()
        self._work.put(None)
        self._thread.join(WAIT_S)

    def __enter__(self):
        self.sim._local_stack("streams").append(self)
        return self

    def __exit__(self, *exc):
        self.sim._local_stack("streams").pop()


class SimEvent:
    def __init__(self, sim: SimCuda, block: bool = False, disable_timing: bool = False):
        self.sim = sim
        self._stream: SimStream | None = None
        self._mark = 0

    def record(self, stream: SimStream | None = None) -> None:
        self._stream = stream or self.sim.current_stream()
        self._mark = self._stream.queued

    @property
    def done(self) -> bool:
        return self._stream is None or self._stream.ran >= self._mark

    def synchronize(self) -> None:
        if self._stream is not None:
            self._stream.wait_for(self._mark)


class SimBuffer:
    """A device buffer: host memory that JAX's CPU backend can adopt through DLPack."""

    def __init__(self, sim: SimCuda, shape, dtype):
        self.sim = sim
        self.device = sim.current_device()
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        raw = np.zeros(nbytes + 64, np.uint8)
        off = (-raw.ctypes.data) % 64
        self.array = raw[off : off + nbytes].view(dtype).reshape(shape)
        self.data = types.SimpleNamespace(ptr=int(self.array.ctypes.data))
        self.copied_on: SimStream | None = None  # the stream of the last copy into it
        # What the consumer waits for before reading: the work queued on the stream that
        # was current at export (CuPy records an event there for the consumer's stream).
        self.consumer_waits_for: tuple[SimStream, int] | None = None
        sim.buffers[self.data.ptr] = self
        sim.made.append(self.data.ptr)

    def __dlpack_device__(self):
        return (KDL_CPU, self.device)  # CPU device i stands for GPU i

    def __dlpack__(self, stream=None, **_kw):
        current = self.sim.current_stream()
        if self.copied_on is not None and current is not self.copied_on:
            self.sim.violations.append(
                "a buffer was exported through DLPack while a stream other than its copy's "
                "was current: JAX would not wait for the copy")
        if current is not None:
            self.consumer_waits_for = (current, current.queued)
        return self.array.__dlpack__()


class SimRuntime:
    is_hip = False

    def __init__(self, sim: SimCuda):
        self.sim = sim

    def getDeviceCount(self) -> int:  # noqa: N802 (CuPy's name)
        return self.sim.device_count

    def hostRegister(self, ptr: int, nbytes: int, flags: int) -> None:  # noqa: N802
        if any(lo <= ptr < lo + n for lo, n in self.sim.registered.items()):
            raise CUDARuntimeError("cudaErrorHostMemoryAlreadyRegistered")
        self.sim.registered[ptr] = nbytes
        self.sim.calls.append(("hostRegister", ptr, nbytes, flags))

    def hostUnregister(self, ptr: int) -> None:  # noqa: N802
        nbytes = self.sim.registered.pop(ptr, None)
        if nbytes is None:
            raise CUDARuntimeError("cudaErrorHostMemoryNotRegistered")
        for s in self.sim.streams.values():
            if s.may_read(ptr, nbytes):
                self.sim.violations.append("hostUnregister while a queued copy reads the range")
        self.sim.calls.append(("hostUnregister", ptr, nbytes))

    def deviceSynchronize(self) -> None:  # noqa: N802
        for s in list(self.sim.streams.values()):
            if s.device == self.sim.current_device():
                s.synchronize()

    def memcpyAsync(self, dst: int, src: int, nbytes: int, kind: int, stream_ptr: int) -> None:  # noqa: N802
        sim = self.sim
        if sim.fail_copies:
            sim.fail_copies -= 1
            raise CUDARuntimeError("cudaErrorMemoryAllocation (injected)")
        stream = sim.streams.get(stream_ptr)
        if stream is None:
            raise CUDARuntimeError(f"cudaErrorInvalidResourceHandle: stream {stream_ptr:#x}")
        buf = sim.buffers.get(dst)
        if kind != 1 or buf is None or buf.array.nbytes < nbytes:
            raise CUDARuntimeError("memcpyAsync: not a host-to-device copy into a device buffer")
        if stream.device != sim.current_device():
            sim.violations.append("a copy was queued on a stream of another device")
        pinned = any(lo <= src and src + nbytes <= lo + n for lo, n in sim.registered.items())
        sim.copies.append((src, nbytes, pinned))
        buf.copied_on = stream
        stream.enqueue_copy(dst, src, nbytes)


class SimCuda:
    """The `cupy` module stand-in: `sim.module` goes into sys.modules['cupy']."""

    def __init__(self, device_count: int = 1):
        self.device_count = device_count
        self.streams: dict[int, SimStream] = {}
        self.buffers: dict[int, SimBuffer] = {}
        self.registered: dict[int, int] = {}
        self.calls: list[tuple] = []
        self.copies: list[tuple[int, int, bool]] = []  # (src, nbytes, src page-locked?)
        self.made: list[int] = []  # device buffer addresses, in order
        self.violations: list[str] = []
        self.fail_copies = 0  # the next this-many memcpyAsync calls fail
        self._local = threading.local()
        runtime = SimRuntime(self)
        sim = self

        @contextmanager
        def device(ordinal: int):
            if not 0 <= ordinal < sim.device_count:
                raise CUDARuntimeError(f"cudaErrorInvalidDevice: {ordinal}")
            stack = sim._local_stack("devices")
            stack.append(ordinal)
            try:
                yield
            finally:
                stack.pop()

        self.module = types.ModuleType("cupy")
        self.module.cuda = types.SimpleNamespace(
            runtime=runtime, Device=device,
            Stream=functools.partial(SimStream, sim), Event=functools.partial(SimEvent, sim))
        self.module.empty = lambda shape, dtype=np.float64: SimBuffer(sim, shape, dtype)

    def _local_stack(self, name: str) -> list:
        stack = getattr(self._local, name, None)
        if stack is None:
            stack = []
            setattr(self._local, name, stack)
        return stack

    def current_device(self) -> int:
        stack = self._local_stack("devices")
        return stack[-1] if stack else 0

    def current_stream(self) -> SimStream | None:
        stack = self._local_stack("streams")
        return stack[-1] if stack else None

    @contextmanager
    def paused(self, stream: SimStream):
        """Hold `stream`'s queued work (as a long kernel ahead of the copies would)."""
        stream.running.clear()
        try:
            yield
        finally:
            stream.running.set()

    def read_as_jax_would(self, arrays) -> list[np.ndarray]:
        """Host copies of `arrays` (jax.Arrays), read after what a GPU's consumer stream
        would wait for: JAX's CPU backend has no stream to order its reads, so the test
        waits in its place, for exactly the work the DLPack export named."""
        out = []
        for a in arrays:
            buf = self.buffers.get(a.unsafe_buffer_pointer())
            if buf is not None and buf.consumer_waits_for is not None:
                stream, mark = buf.consumer_waits_for
                stream.wait_for(mark)
            out.append(np.array(a))
        return out

    def close(self) -> None:
        for s in self.streams.values():
            s.close()
