"""The CUDA feed (CuPy path and XLA from the registered ring).  Skipped, without
importing CuPy, unless JAX sees a GPU and CuPy is installed: importing CuPy makes
every later Loader of the test session start its workers by spawn.

Covers: the ring is page-locked once per loader and unregistered when the loader
goes; values are right, also for arrays kept while the ring turns; a slot is not
given back before the event after its copy has completed; JAX adopts the CuPy
buffer through DLPack without a copy; sharding over local GPUs; the benchmark.
"""

from __future__ import annotations

import gc
import importlib.util
import time

import numpy as np
import pytest


def _why_skip() -> str | None:
    if importlib.util.find_spec("cupy") is None:
        return "CuPy is not installed"
    try:
        import jax

        if not jax.devices("gpu"):
            return "JAX sees no GPU"
    except Exception as exc:  # no GPU backend in this jaxlib
        return f"JAX has no GPU backend ({type(exc).__name__})"
    return None


_SKIP = _why_skip()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=f"needs CUDA: {_SKIP}")

if _SKIP is None:
    import cupy
    import jax
    from _ring import held_slots
    from _sources import Stamped

    import shmfeed
    import shmfeed.jax as sj
    from shmfeed.jax import _gpu

SAMPLE_SHAPE = (256, 64)  # 64 KiB per sample: copies long enough to overlap

SPIN_KERNEL = r"""
extern "C" __global__ void spin(long long cycles) {
    long long start = clock64();
    while (clock64() - start < cycles) { }
}
"""


def host(tree):
    return jax.tree.map(lambda a: np.array(a), tree)



def _registered(ptr: int) -> bool:
    try:
        attrs = cupy.cuda.runtime.pointerGetAttributes(ptr)
    except cupy.cuda.runtime.CUDARuntimeError:
        return False
    return attrs.type == 1  # cudaMemoryTypeHost: page-locked host memory


@pytest.mark.parametrize("transfer", ["cupy", "xla"])
def test_values_are_right_and_kept_arrays_survive_the_ring_turning(transfer):
    # num_workers=0: a spawned pool would import this module, and with it CuPy and JAX's GPU.
    with shmfeed.Loader(Stamped(48, shape=SAMPLE_SHAPE), batch_size=4, num_workers=0, num_slots=4, shuffle=True) as loader:
        kept, snaps = [], []
        for _ in range(6):
            for batch in sj.prefetch_to_device(loader, size=2, transfer=transfer):
                assert batch["x"].devices() == {jax.local_devices()[0]}
                kept.append(batch)
                snaps.append(host(batch))
        assert len({float(s["x"][0, 0, 0]) for s in snaps}) == len(snaps)
        for b, s in zip(kept, snaps):
            np.testing.assert_array_equal(np.asarray(b["x"]), s["x"])
        assert held_slots(loader) == 0


def test_the_ring_is_page_locked_once_and_unregistered_with_the_loader():
    loader = shmfeed.Loader(Stamped(16, shape=SAMPLE_SHAPE), batch_size=4, num_workers=0)
    ptr, key = loader._ring_data().ctypes.data, id(loader)
    pins = []
    for _ in range(3):
        for _b in sj.prefetch_to_device(loader, transfer="cupy"):
            pass
        assert _gpu.pinned_bytes(loader) == loader._ring_data().nbytes
        pins.append(_gpu._pins[key])
    assert pins[0] is pins[1] is pins[2] and _registered(ptr)  # registered once
    loader.close()
    del loader, _b, pins
    gc.collect()
    assert key not in _gpu._pins
    assert not _registered(ptr)


def test_a_slot_is_not_given_back_before_its_copy_has_completed():
    """A kernel spinning on the copy stream delays the copy; meanwhile the batch's
    slot must stay held, and be released once the event has completed."""
    spin = cupy.RawKernel(SPIN_KERNEL, "spin")
    with shmfeed.Loader(Stamped(16, shape=SAMPLE_SHAPE), batch_size=4, num_workers=0, num_slots=4) as loader:
        dev = jax.local_devices()[0]
        stream = _gpu.copy_stream(dev.local_hardware_id)
        with cupy.cuda.Device(dev.local_hardware_id), stream:
            spin((1,), (1,), (np.int64(2_000_000_000),))  # ~1 s on current GPUs
        feed = sj.prefetch_to_device(loader, size=1, transfer="cupy")
        first = next(feed)  # its copy waits behind the kernel
        assert held_slots(loader) >= 1, "the slot was released while DMA was still queued"
        np.testing.assert_array_equal(np.asarray(first["id"]), [0, 1, 2, 3])  # waits on the copy
        deadline = time.monotonic() + 10
        rest = list(feed)
        while held_slots(loader) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert held_slots(loader) == 0 and len(rest) == 3


def test_jax_adopts_the_cupy_buffer_without_a_device_copy():
    made = []

    class Recording:
        def __getattr__(self, name):
            return getattr(cupy, name)

        def empty(self, *a, **k):
            buf = cupy.empty(*a, **k)
            made.append(buf.data.ptr)
            return buf

    with shmfeed.Loader(Stamped(8, shape=SAMPLE_SHAPE), batch_size=4, num_workers=0) as loader:
        target = sj._shard.Target(None)
        transfer = _gpu.CupyTransfer(target, loader)
        transfer.cp = Recording()
        batch = next(iter(loader))
        leaves = [batch["x"], batch["id"]]
        plans = [target.placement(a.shape, "x") for a in leaves]
        arrays, pending = transfer.upload_leaves(leaves, plans)
        pending.wait()
        assert [a.unsafe_buffer_pointer() for a in arrays] == made
        np.testing.assert_array_equal(np.asarray(arrays[0]), batch["x"])


@pytest.mark.skipif(_SKIP is None and len(jax.local_devices()) < 2, reason="needs 2 GPUs")
def test_batches_split_over_local_gpus():
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    devices = jax.local_devices()
    n = len(devices)
    sharding = NamedSharding(Mesh(np.array(devices), ("data",)), P("data"))
    with shmfeed.Loader(Stamped(8 * n), batch_size=2 * n, num_workers=0, drop_last=True) as loader:
        for transfer in ("cupy", "xla"):
            for batch in sj.prefetch_to_device(loader, sharding=sharding, transfer=transfer):
                full = np.asarray(batch["x"])
                assert batch["x"].sharding == sharding
                for shard in batch["x"].addressable_shards:
                    np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index])


def test_device_benchmark_measures_both_transfers():
    from shmfeed.jax._bench import run_device_benchmark

    out = run_device_benchmark(8.0)
    assert "skipped" not in out, out
    assert all(v > 0 for v in out["h2d_gbps"].values()), out
    assert out["faster_transfer"] in ("cupy", "xla")
    assert set(out["overlap"]["fed_over_resident"]) == {"cupy", "xla"}
