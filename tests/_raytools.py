"""What tests/test_ray.py and tests/test_ray_cluster.py share: the leak check adapted to
Ray, and bit-for-bit comparison of epochs with the in-process reference."""

from __future__ import annotations

import gc
import time

import conftest
import numpy as np
import psutil
import pytest

import shmfeed

OBJECT_STORE_BYTES = 80 * 2**20  # Ray's minimum is about 75 MiB
RAY_EXIT_S = 15.0  # Ray's processes must be gone this long after its shutdown
RAY_INIT = dict(include_dashboard=False, log_to_driver=False, object_store_memory=OBJECT_STORE_BYTES)


def children_now() -> set[int]:
    """This process's descendants now (e.g. a fork server an earlier test started):
    not Ray's, whatever ray_children_gone finds later."""
    return {p.pid for p in psutil.Process().children(recursive=True)}


def ray_children_gone(before: set[int] | frozenset[int] = frozenset()) -> None:
    """Fail unless Ray's raylet, GCS and workers (the descendants not in `before`, taken
    before Ray started) exit within RAY_EXIT_S of its shutdown."""
    me = psutil.Process()
    deadline = time.monotonic() + RAY_EXIT_S
    while True:
        left = [p for p in me.children(recursive=True) if p.pid not in before and p.is_running()
                and p.status() != psutil.STATUS_ZOMBIE]
        if not left:
            return
        if time.monotonic() > deadline:
            for p in left:
                p.kill()
            pytest.fail(f"Ray processes left after its shutdown: {[(p.pid, p.name()) for p in left]}")
        time.sleep(0.1)


def _ray_pool(p: psutil.Process) -> bool:
    """A worker process the raylet keeps ready for future tasks ("ray::IDLE"): Ray's,
    gone with its shutdown (ray_children_gone); an actor we left would show its class."""
    try:
        return p.name() == "ray::IDLE"
    except psutil.Error:
        return True


@pytest.fixture(autouse=True)
def no_leaks():
    """tests/conftest.py's check (no child process, fd or ring mapping left), except for
    Ray's idle worker processes and sockets (and fds closed while listed): Ray's driver keeps a gRPC channel to each actor and node it talked to until
    `ray.shutdown()`, which runs once per module (starting Ray takes seconds)."""
    me = psutil.Process()
    before_children = {p.pid for p in me.children(recursive=True)}
    before_fds, before_maps = conftest._fds(), conftest._ring_mappings()
    yield
    gc.collect()
    deadline = time.monotonic() + conftest.LEAK_WAIT_S
    while True:
        children = [p for p in me.children(recursive=True) if p.pid not in before_children
                    and p.is_running() and p.status() != psutil.STATUS_ZOMBIE and not _ray_pool(p)]
        fds = [fd for fd in conftest._fds() - before_fds
               if conftest._readlink(fd) != "?" and not conftest._readlink(fd).startswith("socket:")]
        maps = conftest._ring_mappings() - before_maps
        if not (children or fds or maps > 0) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
        gc.collect()
    assert not children, f"child processes left: {[(p.pid, p.name()) for p in children]}"
    assert not fds, f"fds left open: {[conftest._readlink(fd) for fd in fds]}"
    assert maps <= 0, f"{maps} mapping(s) of a shmfeed ring left"


def copy(batch: dict) -> dict:
    """The batch in memory of its own (its views would pin their slot)."""
    return {k: copy(v) if isinstance(v, dict) else np.array(v) for k, v in batch.items()}


def take(loader, epochs: int = 1, stop_after: int | None = None) -> list[list[dict]]:
    """Copies of every batch of `epochs` epochs (the last one cut after `stop_after`)."""
    out = []
    for e in range(epochs):
        got = []
        for batch in loader:
            got.append(copy(batch))
            if stop_after is not None and e == epochs - 1 and len(got) == stop_after:
                break
        out.append(got)
    return out


def reference(source, epochs: int = 1, **kw) -> list[list[dict]]:
    with shmfeed.Loader(source, num_workers=0, **kw) as loader:
        return take(loader, epochs)


def same_batch(x: dict, y: dict) -> bool:
    return x.keys() == y.keys() and all(
        same_batch(x[k], y[k]) if isinstance(x[k], dict) else
        x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]) for k in x)


def same(a: list, b: list) -> bool:
    """Epochs of batches, bit for bit."""
    return len(a) == len(b) and all(
        len(x) == len(y) and all(same_batch(p, q) for p, q in zip(x, y)) for x, y in zip(a, b))


OPTS = dict(batch_size=4, shuffle=True, seed=7)
