"""Stress (issue 3, items 7 and 8): the control plane hammered by several processes,
the C stress test with random kills, and a soak of 100,000 batches.

Every wait has a deadline: a wake-up that is lost shows up as a wait that runs out,
which fails the test instead of slowing it down.
"""

from __future__ import annotations

import mmap
import os
import shutil
import subprocess
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
