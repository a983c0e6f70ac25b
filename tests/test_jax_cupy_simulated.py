"""The CuPy transfer's own logic, run in CI against a simulated CUDA runtime
(tests/_simcuda.py) with JAX's CPU device standing for the GPU.

It checks what shmfeed decides, not what CUDA does (tests/gpu does that on a GPU):
the ring is page-locked once and unlocked at close only after the copies reading it
have run; every copy reads the page-locked ring; a batch's slot stays taken while
its copy is queued and goes back once the event after it has completed; the device
buffer is exported to JAX with the copy's stream current and adopted without a
copy; leaving early or a failed copy leaves nothing queued and no slot taken.
"""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
import pytest
from _lazy import Lazy
from _ring import held_slots
from _simcuda import SimCuda
from _sources import Stamped

import shmfeed

# jax is imported when this module's first test runs, not when pytest collects it: the
# fork tests run first, faster without it (tests/_lazy.py).
jax, sj, _gpu = Lazy("jax"), Lazy("shmfeed.jax"), Lazy("shmfeed.jax._gpu")


pytestmark = pytest.mark.usefixtures("shmfeed_jax_imported")  # conftest.py

CUDA_HOST_REGISTER_PORTABLE = 1



def first_ids(sim: SimCuda, feed) -> list[int]:
    return [int(sim.read_as_jax_would([b["id"]])[0][0]) for b in feed]


def host(sim: SimCuda, batch):
    leaves, tree = jax.tree.flatten(batch)
    return jax.tree.unflatten(tree, sim.read_as_jax_would(leaves))


def wait_until(cond, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@pytest.fixture
def sim(monkeypatch):
    s = SimCuda(device_count=len(jax.local_devices()))
    monkeypatch.setitem(sys.modules, "cupy", s.module)
    monkeypatch.setattr(_gpu.module(), "CUDA_PLATFORMS", ("cpu",))  # the CPU device stands in
    monkeypatch.setattr(_gpu.module(), "_streams", {})
    yield s
    s.close()
    assert s.violations == []


def test_values_are_right_every_copy_reads_the_pinned_ring_and_jax_adopts_the_buffer(sim):
    with shmfeed.Loader(Stamped(48), batch_size=4, num_workers=0, num_slots=4, shuffle=True) as loader:
        kept, snaps = [], []
        for _ in range(4):
            for batch in sj.prefetch_to_device(loader, size=2, transfer="cupy"):
                kept.append(batch)
                snaps.append(host(sim, batch))
        ring = loader._ring_data()
        assert [c for c in sim.calls if c[0] == "hostRegister"] == [
            ("hostRegister", ring.ctypes.data, ring.nbytes, CUDA_HOST_REGISTER_PORTABLE)]
        assert sim.copies and all(pinned for _src, _n, pinned in sim.copies)
        assert held_slots(loader) == 0
    assert len(kept) == 48
    assert len({float(s["x"][0, 0, 0]) for s in snaps}) == len(snaps)
    with shmfeed.Loader(Stamped(48), batch_size=4, num_workers=0, shuffle=True) as ref:
        for epoch in range(4):
            ref.set_epoch(epoch)
            for i, b in enumerate(ref):
                np.testing.assert_array_equal(snaps[epoch * 12 + i]["x"], b["x"])
                np.testing.assert_array_equal(snaps[epoch * 12 + i]["id"], b["id"])
    for b, s in zip(kept, snaps):  # kept arrays never pointed into the ring
        np.testing.assert_array_equal(np.asarray(b["x"]), s["x"])
    adopted = {a.unsafe_buffer_pointer() for b in kept for a in jax.tree.leaves(b)}
    assert adopted <= set(sim.made)  # JAX uses the device buffers themselves: no copy


def test_a_slot_stays_taken_while_its_copy_is_queued_and_returns_after_its_event(sim):
    """A paused copy stream is a copy waiting behind other work on the device."""
    with shmfeed.Loader(Stamped(16), batch_size=4, num_workers=0, num_slots=4) as loader:
        stream = _gpu.copy_stream(jax.local_devices()[0].local_hardware_id)
        with sim.paused(stream):
            feed = sj.prefetch_to_device(loader, size=1, transfer="cupy")
            first = next(feed)  # batch 0 and batch 1 are queued, neither copied
            assert stream.ran == 0 and stream.queued >= 2
            assert held_slots(loader) == 2, "a slot was released while its copy was queued"
        assert wait_until(lambda: stream.ran == stream.queued)
        np.testing.assert_array_equal(host(sim, first)["id"], [0, 1, 2, 3])
        rest = [host(sim, b)["id"].tolist() for b in feed]
        assert rest == [[4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
        assert held_slots(loader) == 0


def test_the_feed_waits_for_the_oldest_copy_instead_of_running_out_of_slots(sim):
    with shmfeed.Loader(Stamped(32), batch_size=4, num_workers=0, num_slots=4) as loader:
        stream = _gpu.copy_stream(jax.local_devices()[0].local_hardware_id)
        resumed_at = []

        def resume_later():
            time.sleep(0.3)
            resumed_at.append(time.monotonic())
            stream.running.set()

        stream.running.clear()
        threading.Thread(target=resume_later, daemon=True).start()
        ids = first_ids(sim, sj.prefetch_to_device(loader, size=4, transfer="cupy"))
        assert ids == list(range(0, 32, 4))  # no RingFullError: at most num_slots - 1 queued
        assert resumed_at


def test_leaving_the_loop_early_waits_for_queued_copies_then_frees_their_slots(sim):
    with shmfeed.Loader(Stamped(40), batch_size=4, num_workers=0, num_slots=6) as loader:
        stream = _gpu.copy_stream(jax.local_devices()[0].local_hardware_id)
        for _ in range(2):
            feed = sj.prefetch_to_device(loader, size=3, transfer="cupy")
            next(feed)
            assert wait_until(lambda: stream.ran == stream.queued)
            stream.running.clear()
            next(feed)  # one more batch's copies are queued behind the pause
            assert stream.ran < stream.queued
            started = time.monotonic()
            timer = threading.Timer(0.2, stream.running.set)
            timer.start()
            feed.close()  # leaving the loop
            assert time.monotonic() - started >= 0.2, "closed without waiting for the copies"
            assert stream.ran == stream.queued
            timer.join(5)
            assert held_slots(loader) == 0
        ids = first_ids(sim, sj.prefetch_to_device(loader, transfer="cupy"))
        assert ids == list(range(0, 40, 4))


def test_a_failed_copy_is_a_device_feed_error_after_the_batches_before_it(sim):
    with shmfeed.Loader(Stamped(24), batch_size=4, num_workers=0, num_slots=6) as loader:
        feed = sj.prefetch_to_device(loader, size=2, transfer="cupy")
        seen = first_ids(sim, [next(feed)])
        sim.fail_copies = 1  # batch 3's first leaf: started while batch 1 is yielded
        with pytest.raises(_gpu.DeviceFeedError, match="XLA_PYTHON_CLIENT_MEM_FRACTION") as info:
            for b in feed:
                seen += first_ids(sim, [b])
        assert "injected" in str(info.value.__cause__)
        assert seen == [0, 4, 8]
        assert all(s.ran == s.queued for s in sim.streams.values())
        assert held_slots(loader) == 0


def test_the_ring_is_unlocked_at_close_only_after_its_queued_copies_have_run(sim):
    loader = shmfeed.Loader(Stamped(16), batch_size=4, num_workers=0, num_slots=4)
    ring = loader._ring_data()
    ptr, nbytes = ring.ctypes.data, ring.nbytes
    del ring
    stream = _gpu.copy_stream(jax.local_devices()[0].local_hardware_id)
    feed = sj.prefetch_to_device(loader, size=2, transfer="cupy")
    stream.running.clear()
    batch = next(feed)  # three batches' copies queued behind the pause
    assert _gpu.pinned_bytes(loader) == nbytes and stream.queued > stream.ran
    timer = threading.Timer(0.2, stream.running.set)
    timer.start()
    loader.close()  # the user closes the loader without finishing the loop
    timer.join(5)
    assert stream.ran == stream.queued  # unlocking waited for them (else: a violation)
    assert sim.calls[-1] == ("hostUnregister", ptr, nbytes)
    assert [c[0] for c in sim.calls].count("hostUnregister") == 1
    assert _gpu.pinned_bytes(loader) == 0
    feed.close()
    np.testing.assert_array_equal(host(sim, batch)["id"], [0, 1, 2, 3])  # not in the ring
