"""Device-side measurements of the feed: the numbers behind `shmfeed bench --device`
and benchmarks/bench_jax.py --device.

Owns `run_device_benchmark(seconds)`:
- H2D bandwidth (GB/s) of one 64 MiB copy from (a) a slot of the page-locked
  ring with cudaMemcpyAsync, (b) CuPy's own pinned memory (the peak to compare
  with), (c) `jax.device_put` from the registered ring (XLA's transfer), and
  (d) `jax.device_put` from ordinary pageable numpy memory;
- overlap: a jitted step whose compute time is about one transfer, run on a batch
  already in device memory ("resident") and fed by `prefetch_to_device` with each
  GPU transfer; the goal is fed >= 0.95 x resident;
- which GPU transfer is faster, so that `GPU_DEFAULT_TRANSFER` can follow it.

Without a CUDA GPU usable by JAX and CuPy it returns `{"skipped": reason}` and
touches nothing else.  Medians over repeats, never single runs.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np

BANDWIDTH_BYTES = 64 * 2**20  # one copy when measuring bandwidth: reaches the peak
FED_BATCH_BYTES = 32 * 2**20  # one batch in the overlap run: big enough that per-batch Python costs are small
FED_ROWS = 256
OVERLAP_GOAL = 0.95  # fed / resident step rate the feed should reach
REPEATS = 3  # each overlap mode is run this many times, in turn; medians reported


class _Blob:
    """A batch-level source of float32 (rows, row_elems) batches.  Building one is a
    single copy of a cached array (made once per process, never pickled), so that
    workers outpace the GPU and the overlap run measures the feed, not the source."""

    def __init__(self, n_batches: int, rows: int, row_elems: int):
        self.n, self.rows, self.row_elems = n_batches, rows, row_elems
        self._cache: np.ndarray | None = None

    def __getstate__(self):
        return {**self.__dict__, "_cache": None}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, b: int):
        if self._cache is None:
            self._cache = np.ones((self.rows, self.row_elems), np.float32)
        return {"x": self._cache}


def run_device_benchmark(seconds: float) -> dict[str, Any]:
    """Measure the GPU feed for about `seconds` in all; `{"skipped": why}` without a GPU."""
    import jax

    from . import _gpu

    why = _gpu.available()
    if why is not None:
        return {"skipped": why}
    import os

    import shmfeed

    from ._feed import prefetch_to_device

    device = jax.local_devices(backend="gpu")[0]
    ordinal = device.local_hardware_id
    budget = max(float(seconds), 2.0) / 10  # per measurement
    out: dict[str, Any] = {"device": f"{device.device_kind} (jax {jax.__version__})",
                           "bandwidth_copy_bytes": BANDWIDTH_BYTES, "fed_batch_bytes": FED_BATCH_BYTES}

    # -- bandwidth --------------------------------------------------------------------
    rows = FED_ROWS
    with shmfeed.Loader(_Blob(4, rows, BANDWIDTH_BYTES // 4 // rows), batch_size=None,
                        num_workers=0, num_slots=2) as loader:
        batch = next(iter(loader))
        leaf = batch["x"]
        pin = _gpu.pin_ring(loader)
        gbps: dict[str, float] = {}
        gbps["cupy_from_pinned_ring"] = h2d_gbps(leaf, ordinal, budget)
        peak = pinned_host_array(BANDWIDTH_BYTES)
        peak[:] = 1
        gbps["cupy_pinned_peak"] = h2d_gbps(peak, ordinal, budget)
        gbps["xla_device_put_from_registered_ring"] = _device_put_gbps(jax, leaf, device, budget)
        pageable = np.array(leaf)
        gbps["xla_device_put_from_pageable_numpy"] = _device_put_gbps(jax, pageable, device, budget)
        out["h2d_gbps"] = {k: round(v, 2) for k, v in gbps.items()}
        out["ring_pinned"] = pin is not None
        del batch, leaf, peak, pageable
        _gpu.unpin_ring(loader)

    # -- overlap ----------------------------------------------------------------------
    row_elems = FED_BATCH_BYTES // 4 // rows
    transfer_s = FED_BATCH_BYTES / (gbps["cupy_from_pinned_ring"] * 1e9)
    step, n_inner = _calibrated_step(jax, device, (rows, row_elems), transfer_s)
    n_batches = int(min(400, max(32, budget / max(transfer_s, 1e-4))))
    workers = max(2, min(8, (os.cpu_count() or 4) - 2))
    resident_x = jax.device_put(np.ones((rows, row_elems), np.float32), device)
    rates: dict[str, list[float]] = {"resident": [], "cupy": [], "xla": []}
    with shmfeed.Loader(_Blob(n_batches, rows, row_elems), batch_size=None, num_workers=workers) as loader:
        for _ in range(REPEATS):
            rates["resident"].append(_resident_rate(jax, step, resident_x, n_batches))
            for mode in ("cupy", "xla"):
                feed = prefetch_to_device(loader, size=2, transfer=mode)
                rates[mode].append(_fed_rate(jax, step, feed))
    med = {k: statistics.median(v) for k, v in rates.items()}
    out["overlap"] = {
        "transfer_ms": round(transfer_s * 1e3, 3),
        "step_ms": round(1e3 / med["resident"], 3),
        "inner_iterations": n_inner,
        "workers": workers,
        "batches_per_run": n_batches,
        "steps_per_s": {k: round(v, 2) for k, v in med.items()},
        "fed_over_resident": {m: round(med[m] / med["resident"], 3) for m in ("cupy", "xla")},
        "goal": OVERLAP_GOAL,
    }
    out["faster_transfer"] = "cupy" if med["cupy"] >= med["xla"] else "xla"
    return out


def _device_put_gbps(jax: Any, host: np.ndarray, device: Any, seconds: float) -> float:
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 200):
        t0 = time.perf_counter()
        jax.device_put(host, device).block_until_ready()
        times.append(time.perf_counter() - t0)
    return host.nbytes / statistics.median(times) / 1e9


def _calibrated_step(jax: Any, device: Any, shape: tuple[int, int], target_s: float):
    """A jitted step of about `target_s` on `device`: `n` rounds of a (rows x rows)
    matmul and tanh over the batch, in a loop whose trip count is an argument, so
    calibrating it compiles once."""
    import jax.numpy as jnp
    from jax import lax

    w = jax.device_put(np.eye(shape[0], dtype=np.float32) * 0.5, device)

    @jax.jit
    def inner(x, n):
        return lax.fori_loop(0, n, lambda _, a: jnp.tanh(w @ a), x).sum()

    x = jax.device_put(np.ones(shape, np.float32), device)
    n = 1
    while True:
        n_dev = jax.device_put(np.int32(n), device)
        inner(x, n_dev).block_until_ready()
        t0 = time.perf_counter()
        for _ in range(5):
            r = inner(x, n_dev)
        r.block_until_ready()
        per = (time.perf_counter() - t0) / 5
        if per >= target_s or n >= 1 << 16:
            return (lambda batch, n_dev=n_dev: inner(batch, n_dev)), n
        n = max(n + 1, int(n * target_s / max(per, 1e-6)))


def _resident_rate(jax: Any, step: Any, x: Any, n: int) -> float:
    step(x).block_until_ready()
    t0 = time.perf_counter()
    r = None
    for _ in range(n):
        r = step(x)
    jax.block_until_ready(r)
    return n / (time.perf_counter() - t0)


def _fed_rate(jax: Any, step: Any, feed: Any) -> float:
    it = iter(feed)
    step(next(it)["x"]).block_until_ready()  # compiled, pipeline primed
    t0 = time.perf_counter()
    count, r = 0, None
    for batch in it:
        r = step(batch["x"])
        count += 1
    jax.block_until_ready(r)
    return count / (time.perf_counter() - t0)


def pinned_host_array(nbytes: int) -> np.ndarray:
    """Host memory CuPy allocated page-locked (the reference for peak H2D speed)."""
    import cupyx

    return cupyx.empty_pinned((nbytes,), np.uint8)


def h2d_gbps(src: np.ndarray, ordinal: int, seconds: float) -> float:
    """Median H2D bandwidth in GB/s of cudaMemcpyAsync from `src`, timed with events."""
    from ._gpu import CUDA_MEMCPY_HOST_TO_DEVICE, _cupy, copy_stream

    cp = _cupy()
    stream = copy_stream(ordinal)
    with cp.cuda.Device(ordinal), stream:
        dst = cp.empty(src.nbytes, np.uint8)
        times: list[float] = []
        deadline = time.perf_counter() + seconds
        while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 1000):
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record(stream)
            cp.cuda.runtime.memcpyAsync(dst.data.ptr, src.ctypes.data, src.nbytes,
                                        CUDA_MEMCPY_HOST_TO_DEVICE, stream.ptr)
            end.record(stream)
            end.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, end) / 1e3)
    return src.nbytes / float(np.median(times)) / 1e9
