"""Stress (issue 3, items 7 and 8): the control plane hammered by several processes,
the C stress test with random kills, and a soak of 100,000 batches.

Every wait has a deadline: a wake-up that is lost shows up as a wait that runs out,
which fails the test instead of slowing it down.
"""

from __future__ import annotations

import mmap
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import reliability

import shmfeed
from shmfeed._batch.spec import infer
from shmfeed._engine.control import BatchStale, PoolShutdown, SlotState, tag
from shmfeed._engine.ring import Ring

ROOT = Path(__file__).resolve().parent.parent
LONG_WAIT_S = 5.0  # no wait of a healthy ring comes anywhere near this: one that runs out was lost
REAP_S = 10.0


def _shared_int64(*shape: int) -> np.ndarray:
    """A zeroed int64 array in an anonymous MAP_SHARED mapping: shared with forked
    children (unlike the ring's own mapping, which is MADV_DONTFORK)."""
    buf = mmap.mmap(-1, int(np.prod(shape)) * 8)
    return np.frombuffer(buf, np.int64).reshape(shape)


def _hammer(ring_fd: int, spec, n_slots: int, n_workers: int, w: int, claims: np.ndarray,
            counts: np.ndarray) -> int:
    """A worker: claim, acquire, write the batch's tag, publish, until shutdown.
    counts[w] = [operations, waits that ran out, unexpected statuses]."""
    ring = Ring(spec, n_slots, n_workers, fd=ring_fd)  # the parent's mapping is not inherited
    ctl = ring.ctl
    try:
        while True:
            gen, b = ctl.claim(w)
            counts[w, 0] += 1
            if b is None:
                counts[w, 1] += not ctl.wait_gen(gen, LONG_WAIT_S)
                continue
            claims[w, gen, b] += 1  # this row is written by this worker only
            while True:
                try:
                    slot = ctl.acquire(w, gen, b, LONG_WAIT_S)
                except BatchStale:
                    counts[w, 2] += 1
                    continue
                counts[w, 0] += 1
                if slot is not None:
                    break
                counts[w, 1] += 1
            ring.write_views(slot)[0][0] = tag(gen, b)
            ctl.publish(w, slot, gen, b, 1, SlotState.READY, 0)  # raises unless OK
            counts[w, 0] += 1
    except PoolShutdown:
        return 0


def test_control_plane_hammered_by_processes_claims_each_batch_once():
    n_workers, n_slots, epochs, batches = 4, 6, 10, 5000  # about 250,000 operations
    spec = infer(np.zeros((), np.int64), rows=1, index=0)
    ring = Ring(spec, n_slots, n_workers)
    ctl = ring.ctl
    claims = _shared_int64(n_workers, epochs + 1, batches)
    counts = _shared_int64(n_workers, 3)
    pids = []
    try:
        for w in range(n_workers):
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    code = _hammer(ring.fd, spec, n_slots, n_workers, w, claims, counts)
                finally:
                    os._exit(code)
            pids.append(pid)
        t0 = time.perf_counter()
        ops = 0
        for epoch in range(epochs):
            gen = ctl.start_epoch(epoch, 0, batches, 0)
            assert gen == epoch + 1
            for b in range(batches):
                taken = ctl.take(gen, b, LONG_WAIT_S)
                assert taken is not None, f"take({b}) timed out: a lost wake-up"
                state, rows, slot, ref = taken
                del taken
                assert (state, rows) == (SlotState.READY, 1)
                assert ring.views(ref, 1)[0][0] == tag(gen, b), "a batch from the wrong slot"
                if b % 2:
                    assert ctl.release(slot, tag(gen, b))
                    del ref  # its own release finds the slot already given back: a no-op
                else:
                    del ref  # gives the slot back
                ops += 2
        elapsed = time.perf_counter() - t0
    finally:
        ctl.shutdown()
        deadline = time.monotonic() + REAP_S
        codes = {}
        while len(codes) < len(pids) and time.monotonic() < deadline:
            for pid in pids:
                if pid not in codes:
                    done, status = os.waitpid(pid, os.WNOHANG)
                    if done:
                        codes[pid] = os.waitstatus_to_exitcode(status)
            time.sleep(0.005)
        for pid in set(pids) - set(codes):
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        ring.close()
    assert list(codes.values()) == [0] * n_workers, codes
    per_batch = claims.sum(axis=0)[1:]
    assert (per_batch == 1).all(), f"batches claimed {per_batch.min()}..{per_batch.max()} times"
    ops += int(counts[:, 0].sum())
    assert ops >= 100_000
    assert counts[:, 1].sum() == 0, "a worker's wait ran out: a lost wake-up"
    assert counts[:, 2].sum() == 0, "unexpected statuses from acquire/publish"
    reliability.record("ctl_stress_py", elapsed)


def test_control_plane_c_stress_with_random_kills(tmp_path):
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build csrc/test_ctl.c")
    exe = tmp_path / "test_ctl"
    subprocess.run([cc, "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'csrc'}",
                    str(ROOT / "csrc/ctl.c"), str(ROOT / "csrc/test_ctl.c"), "-o", str(exe)],
                   check=True, timeout=120)
    t0 = time.perf_counter()
    run = subprocess.run([str(exe), "10", "3000"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr + run.stdout
    assert "test_ctl: ok" in run.stdout
    reliability.record("ctl_stress_c", time.perf_counter() - t0)


# -- soak ------------------------------------------------------------------------------


class Tiny:
    def __len__(self):
        return 1000

    def __getitem__(self, i):
        return {"x": np.full((4,), i, np.float32), "y": np.int32(i)}


def _footprint(loader) -> dict:
    me = psutil.Process()
    workers = [psutil.Process(p) for p in loader.worker_pids]
    return {
        "rss": me.memory_info().rss,
        "worker_rss": [p.memory_info().rss for p in workers],
        "fds": me.num_fds(),
        "children": sorted(p.pid for p in me.children(recursive=True)),
    }


SOAK_BATCHES = int(os.environ.get("SHMFEED_SOAK_BATCHES", 100_000))
WARMUP_BATCHES = 10_000


def test_soak_memory_fds_and_children_stay_flat():
    """SOAK_BATCHES tiny batches over many epochs (100,000 by default: ~3 s here;
    set SHMFEED_SOAK_BATCHES for a longer run).  After WARMUP_BATCHES, the RSS of
    the training process and of each worker may grow by less than 5 %, and the fds
    and child processes must stay exactly the same."""
    with shmfeed.Loader(Tiny(), batch_size=4, num_workers=2, shuffle=True) as loader:
        n, warm, total = 0, None, 0.0
        t0 = time.perf_counter()
        while n < SOAK_BATCHES:
            for batch in loader:
                total += float(batch["x"][0, 0])  # touch the data
                n += 1
                if n == WARMUP_BATCHES:
                    warm = _footprint(loader)
                if n == SOAK_BATCHES:
                    break
        elapsed = time.perf_counter() - t0
        del batch
        end = _footprint(loader)
    assert end["children"] == warm["children"], "a process came or went"
    assert end["fds"] == warm["fds"]
    assert end["rss"] < warm["rss"] * 1.05, (warm["rss"], end["rss"])
    for before, after in zip(warm["worker_rss"], end["worker_rss"]):
        assert after < before * 1.05, (before, after)
    reliability.record("soak", elapsed)


# -- a worker's wait in C, woken or interrupted from another thread ----------------------------

WAKE_S = 0.1  # the second thread acts this long after the wait began


def _full_ring(loader) -> tuple:
    """Batches 0 and 1 of a 3-batch epoch built in C into the loader's 2 slots and held by
    the consumer: the next claim has no slot until one comes back.  (ctl, plan, gen,
    what `take` gave for batches 0 and 1)."""
    ring, builder = loader._consumer.ring, loader._consumer.builder
    ctl, plan = ring.ctl, builder.gather_plan()
    assert plan is not None
    gen = ctl.start_epoch(0, 0, 3, 0, loader._cfg.order.epoch_key(0))
    assert ctl.gather_batches(0, 0.0, plan) is None  # batch 2 has no slot
    taken = [ctl.take(gen, b, LONG_WAIT_S) for b in (0, 1)]
    assert all(t is not None for t in taken)
    return ctl, plan, gen, taken


def _wait_in_c(ctl, plan, loop: str, timeout_s: float):
    if loop == "claim_wait":
        return ctl.claim_wait(0, timeout_s)
    return ctl.gather_batches(0, timeout_s, plan)


def _x(n: int) -> np.ndarray:
    return np.arange(n * 2, dtype=np.int64).reshape(n, 2)


@pytest.mark.parametrize("loop", ["claim_wait", "gather_batches"])
def test_a_slot_released_by_another_thread_wakes_a_worker_waiting_in_c(loop):
    """The ring full of batches the consumer holds; a worker's loop waits in C for a
    slot (GIL released) while a second thread gives one back: the release must wake it
    at once (not at the end of its wait), with no deadlock, and batch 2 go there."""
    from shmfeed.sources import Arrays

    x = _x(6)
    with shmfeed.Loader(Arrays({"x": x}), batch_size=2, num_slots=2, num_workers=0) as loader:
        ctl, plan, gen, taken = _full_ring(loader)
        slot0 = taken[0][2]

        def give_back() -> None:
            time.sleep(WAKE_S)
            assert ctl.release(slot0, tag(gen, 0))

        releaser = threading.Thread(target=give_back)
        releaser.start()
        t0 = time.monotonic()
        try:
            got = _wait_in_c(ctl, plan, loop, LONG_WAIT_S)
        finally:
            releaser.join(LONG_WAIT_S)
        waited = time.monotonic() - t0
        assert not releaser.is_alive()
        assert waited < LONG_WAIT_S / 2, f"the release did not wake the wait ({waited:.2f} s)"
        if loop == "claim_wait":
            assert got == (gen, 2)  # claimed, for the caller to build
        else:
            assert got == (gen, None)  # built in C, and the epoch has no batch left
            state, rows, slot, ref = ctl.take(gen, 2, LONG_WAIT_S)
            assert (state, rows, slot) == (SlotState.READY, 2, slot0)
            np.testing.assert_array_equal(loader._consumer.ring.views(ref, rows)[0], x[4:6])
            del ref
        del taken


def _in_futex_wait(tid: int) -> bool:
    try:
        with open(f"/proc/self/task/{tid}/wchan") as f:
            return "futex" in f.read()
    except OSError:
        return False


@pytest.mark.parametrize("loop", ["claim_wait", "gather_batches"])
def test_ctrl_c_raises_from_inside_a_wait_in_c_even_when_c_called_it(loop):
    """Ctrl-C while the main thread waits in C for a slot: like every other wait of the
    control block, this one raises KeyboardInterrupt itself (PyErr_CheckSignals) rather
    than returning a status for the next bytecode to turn into it, so that the
    interrupt lands even when what called the wait is C: here `map`, which would start
    the second (long) wait at once."""
    from shmfeed.sources import Arrays

    main = threading.main_thread()
    if threading.current_thread() is not main:
        pytest.skip("signals are handled in the main thread only")
    with shmfeed.Loader(Arrays({"x": _x(6)}), batch_size=2, num_slots=2, num_workers=0) as loader:
        ctl, plan, gen, taken = _full_ring(loader)
        sent = threading.Event()

        def ctrl_c() -> None:
            time.sleep(WAKE_S)
            deadline = time.monotonic() + LONG_WAIT_S
            while not _in_futex_wait(os.getpid()) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert main.ident is not None
            signal.pthread_kill(main.ident, signal.SIGINT)
            sent.set()

        wait = getattr(ctl._c, loop)
        args = [[0, 0], [3 * LONG_WAIT_S] * 2] + ([[plan, plan]] if loop == "gather_batches" else [])
        sender = threading.Thread(target=ctrl_c)
        sender.start()
        t0 = time.monotonic()
        try:
            with pytest.raises(KeyboardInterrupt):
                list(map(wait, *args))
        finally:
            sender.join(LONG_WAIT_S)
        assert sent.is_set()
        waited = time.monotonic() - t0
        assert waited < LONG_WAIT_S, f"Ctrl-C surfaced only after {waited:.1f} s"
        del taken
