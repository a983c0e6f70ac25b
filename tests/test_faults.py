"""Fault injection (issue 3): user code that raises, workers that die or hang, a
killed supervisor, a killed training process, Ctrl-C, and the leak fixture itself.

Real processes and real signals throughout.  Every test that waits has a deadline,
and times the fault's detection: detection and recovery under DETECT_S, pool
processes gone under GONE_S.  Measured times go to tests/reliability.py, which
renders the table of RELIABILITY.md; the last test checks that table against the
tests.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import re
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import reliability
from _orders import epoch_items
from _procs import exited_after

import shmfeed
from shmfeed._batch.spec import infer
from shmfeed._engine.control import NO_CLAIM, SlotState, tag, untag
from shmfeed._engine.ring import Ring
from shmfeed._order.order import Order

DETECT_S = 1.0  # a fault must be noticed (and a dead worker's batch rebuilt) within this
REPLACE_WAIT_S = 30.0  # an off-the-critical-path replacement, on a loaded machine
GONE_S = 2.0  # processes of a pool must have exited within this
SCRIPT_TIMEOUT_S = 30.0  # a subprocess scenario that takes longer has hung
TESTS = Path(__file__).resolve().parent


# -- sources (module level: a spawned pool unpickles them) -----------------------------


def _sample(i: int) -> dict:
    return {"x": np.full((3,), i, np.int64), "i": np.int64(i)}


def _fail_here(i: int) -> None:
    raise ValueError(f"cannot decode sample {i}")


class Raising:
    """Sample `at` raises ValueError in the epochs listed (all when None)."""

    def __init__(self, n: int, at: int, epochs: tuple | None = None):
        self.n, self.at, self.epochs = n, at, epochs

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i == self.at and (self.epochs is None or shmfeed.rng_key()[1] in self.epochs):
            _fail_here(i)
        return _sample(i)


class TransformError(Exception):
    """Needs two arguments and holds a lock: it survives neither pickling nor a
    one-argument rebuild."""

    def __init__(self, msg: str, lock):
        super().__init__(msg)
        self.lock = lock


def _augment(x: np.ndarray) -> np.ndarray:
    if x[0] == 13:
        raise TransformError("augmentation failed on a 13", threading.Lock())
    return x[::-1].copy()


class Transforming:
    def __len__(self):
        return 40

    def __getitem__(self, i):
        return {"x": _augment(np.full((3,), i, np.int64)), "i": np.int64(i)}


class BatchLevel:
    """Batch-level source (`batch_size=None`); batch `at` raises KeyError."""

    def __init__(self, n: int, at: int):
        self.n, self.at = n, at

    def __len__(self):
        return self.n

    def __getitem__(self, b):
        if b == self.at:
            raise KeyError(f"shard-{b}")
        return np.full((4, 2), b, np.int32)


class FailingEpochEnd:
    """Keras-style: `on_epoch_end` raises the first time."""

    def __init__(self):
        self.calls = 0

    def __len__(self):
        return 6

    def __getitem__(self, b):
        return np.full((2, 3), b, np.int64)

    def on_epoch_end(self):
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("could not reshuffle the index")


class Exiting:
    """Sample `at` calls sys.exit(4) in epoch 0."""

    def __len__(self):
        return 40

    def __getitem__(self, i):
        if i == 9 and shmfeed.rng_key()[1] == 0:
            sys.exit(4)
        return _sample(i)


class Interrupting:
    """Sample 9 raises KeyboardInterrupt in epoch 0 (a Ctrl-C inside __getitem__)."""

    def __len__(self):
        return 40

    def __getitem__(self, i):
        if i == 9 and shmfeed.rng_key()[1] == 0:
            raise KeyboardInterrupt
        return _sample(i)


class Dying:
    """Sample `at` misbehaves in the epochs listed: `how` is "os_exit", "segfault",
    "sigkill" (kills itself), "wait_kill" (waits to be killed from outside) or "hang".

    With `once`, only the first process to reach it does (an O_EXCL marker file,
    shared by every process); each time, `pid monotonic_time` is appended to the
    log, for the test to time the detection (CLOCK_MONOTONIC is system-wide).
    """

    def __init__(self, n, at, how, log, once=True, epochs=(0,), delay_s=0.0):
        self.n, self.at, self.how, self.log = n, at, how, str(log)
        self.once, self.epochs, self.delay_s = once, epochs, delay_s

    def __len__(self):
        return self.n

    def _first(self, epoch: int) -> bool:
        if not self.once:
            return True
        try:
            os.close(os.open(f"{self.log}.{epoch}.once", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            return False

    def __getitem__(self, i):
        epoch = shmfeed.rng_key()[1]
        if self.delay_s:
            time.sleep(self.delay_s)
        if i == self.at and epoch in self.epochs and self._first(epoch):
            with open(self.log, "a") as f:
                f.write(f"{os.getpid()} {time.monotonic()!r}\n")
            if self.how == "os_exit":
                os._exit(3)
            if self.how == "segfault":
                ctypes.string_at(0)
            if self.how == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            if self.how in ("wait_kill", "hang"):
                time.sleep(3600)
        return _sample(i)


class DyingWithEpochHook(Dying):
    def on_epoch_end(self):  # makes every epoch re-fork the workers
        pass


def _replaced(loader: shmfeed.Loader, pid: int, num_workers: int, timeout_s: float) -> bool:
    """Whether the worker `pid` had its replacement started within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pids = loader.worker_pids
        if pid not in pids and len(pids) == num_workers:
            return True
        time.sleep(0.01)
    return False


def _deaths(log: Path) -> list[tuple[int, float]]:
    """(pid, time) of each complete line of a Dying log."""
    if not log.exists():
        return []
    lines = log.read_text().split("\n")[:-1]  # the last piece may be half written
    return [(int(p), float(t)) for p, t in (ln.split() for ln in lines)]


def _started(loader) -> list[int]:
    """The worker pids, once the supervisor has forked every worker."""
    deadline = time.monotonic() + GONE_S
    n = loader._cfg.num_workers
    while len(loader.worker_pids) < n and time.monotonic() < deadline:
        time.sleep(0.002)
    assert len(loader.worker_pids) == n, "the pool did not start its workers"
    return loader.worker_pids


def _check_epoch(batches: list, n: int, order=None) -> None:
    """Every sample exactly once, in order, with its own content."""
    ids = np.concatenate([b["i"] for b in batches])
    want = np.arange(n) if order is None else order
    assert ids.tolist() == list(want)
    xs = np.concatenate([b["x"] for b in batches])
    assert (xs == ids[:, None]).all()


def _copy(batch):
    return {k: np.array(v) for k, v in batch.items()} if isinstance(batch, dict) else np.array(batch)


# -- 1. exceptions in user code ------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
def test_exception_in_getitem_raises_worker_error_in_batch_order(num_workers):
    with shmfeed.Loader(Raising(40, at=17, epochs=(0,)), batch_size=4,
                        num_workers=num_workers) as loader:
        got = []
        t0 = time.monotonic()
        with pytest.raises(shmfeed.WorkerError) as info:
            for b in loader:
                got.append(_copy(b))
                t0 = time.monotonic()
        reliability.record("getitem_raises", time.monotonic() - t0)
        _check_epoch(got, 16)  # batches 0-3, intact
        err = info.value
        assert isinstance(err, ValueError)  # `except ValueError` catches it, as without workers
        assert type(err.__cause__) is ValueError
        assert str(err.__cause__) == "cannot decode sample 17"
        msg = str(err)
        assert "raised ValueError: cannot decode sample 17 while building batch 4 of epoch 0" in msg
        assert "at sample index 17" in msg
        assert "Worker traceback:" in msg and "_fail_here" in msg
        assert (err.batch, err.epoch, err.item) == (4, 0, 17)
        # The loader carries on with the next epoch.
        _check_epoch([_copy(b) for b in loader], 40)


def test_exception_in_a_transform_keeps_its_type_message_and_traceback():
    with shmfeed.Loader(Transforming(), batch_size=4, num_workers=2) as loader:
        with pytest.raises(shmfeed.WorkerError) as info:
            for _ in loader:
                pass
    cause = info.value.__cause__
    assert type(cause) is TransformError
    assert str(cause) == "augmentation failed on a 13"
    assert "_augment" in info.value.worker_traceback
    assert info.value.item == 13 and info.value.batch == 3


def test_exception_in_batch_level_source_names_the_batch():
    with shmfeed.Loader(BatchLevel(8, at=3), batch_size=None, num_workers=2) as loader:
        got = []
        with pytest.raises(shmfeed.WorkerError, match="at source batch index 3") as info:
            for b in loader:
                got.append(np.array(b))
    assert [int(b[0, 0]) for b in got] == [0, 1, 2]
    assert type(info.value.__cause__) is KeyError
    assert info.value.__cause__.args == ("shard-3",)
    assert (info.value.batch, info.value.item) == (3, 3)


def test_exception_in_on_epoch_end_is_a_worker_error_after_the_epoch():
    source = FailingEpochEnd()
    with shmfeed.Loader(source, batch_size=None, num_workers=2) as loader:
        got = []
        with pytest.raises(shmfeed.WorkerError, match=r"on_epoch_end\(\) raised RuntimeError") as info:
            for b in loader:
                got.append(int(b[0, 0]))
        assert got == list(range(6))  # the whole epoch first
        assert type(info.value.__cause__) is RuntimeError
        assert str(info.value.__cause__) == "could not reshuffle the index"
        assert [int(b[0, 0]) for b in loader] == list(range(6))
    assert source.calls == 2


def test_sys_exit_in_a_worker_is_a_worker_error_not_a_dead_worker():
    with shmfeed.Loader(Exiting(), batch_size=4, num_workers=2) as loader:
        pids = _started(loader)
        with pytest.raises(shmfeed.WorkerError, match="raised SystemExit") as info:
            for _ in loader:
                pass
        assert type(info.value.__cause__) is SystemExit
        _check_epoch([_copy(b) for b in loader], 40)
        assert loader.worker_pids == pids and loader.stats().restarts == 0


def test_keyboard_interrupt_while_building_in_process_reaches_the_user():
    with shmfeed.Loader(Interrupting(), batch_size=4, num_workers=0) as loader:
        got = []
        with pytest.raises(KeyboardInterrupt):
            for b in loader:
                got.append(_copy(b))
        _check_epoch(got, 8)
        _check_epoch([_copy(b) for b in loader], 40)


# -- 2. worker death -------------------------------------------------------------------


def _kill_when_logged(log: Path, killed: list, stop: threading.Event) -> None:
    """Watcher thread: SIGKILL the process that logs itself, like the OOM killer."""
    while not stop.is_set():
        deaths = _deaths(log)
        if deaths:
            pid = deaths[0][0]
            killed.append((pid, time.monotonic()))
            os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.002)


@pytest.mark.parametrize("how", ["sigkill", "os_exit", "segfault"])
def test_worker_death_is_replaced_and_epoch_completes_in_order(how, tmp_path, capfd):
    log = tmp_path / "deaths"
    source = Dying(200, at=70, how="wait_kill" if how == "sigkill" else how, log=log)
    killed: list = []
    stop = threading.Event()
    watcher = threading.Thread(target=_kill_when_logged, args=(log, killed, stop), daemon=True)
    if how == "sigkill":
        watcher.start()
    try:
        with shmfeed.Loader(source, batch_size=4, num_workers=2) as loader:
            got, arrived = [], None
            for b in loader:
                got.append(_copy(b))
                if len(got) == 18:  # batch 17 holds sample 70
                    arrived = time.monotonic()
            _check_epoch(got, 200)
            assert loader.stats().restarts == 1
            pid, t_death = killed[0] if how == "sigkill" else _deaths(log)[0]
            assert pid not in loader.worker_pids
            recovery = arrived - t_death
            assert recovery < DETECT_S, f"batch 17 came {recovery:.3f} s after the death"
            reliability.record({"sigkill": "worker_sigkill", "os_exit": "worker_os_exit",
                                "segfault": "worker_segfault"}[how], recovery)
            _check_epoch([_copy(b) for b in loader], 200)  # and the next epoch
    finally:
        stop.set()
        if watcher.is_alive():
            watcher.join(timeout=5)
    err = capfd.readouterr().err
    death = {"sigkill": "was killed by SIGKILL", "os_exit": "exited with code 3",
             "segfault": "was killed by SIGSEGV"}[how]
    assert re.search(rf"shmfeed: worker \d \(pid {pid}\) {death} while building batch 17 of "
                     r"epoch 0; replacing it \(1 of `max_restarts=3`\), the batch will be rebuilt", err)
    if how == "segfault":
        assert "Fatal Python error: Segmentation fault" in err and "__getitem__" in err


def _random_killer(loader, stop: threading.Event, kills: list) -> None:
    rng = np.random.default_rng(7)
    pool = loader.pool_pid
    while not stop.wait(rng.uniform(0.01, 0.05)):
        pids = [p for p in loader.worker_pids if p > 0]
        if not pids:
            continue
        pid = int(rng.choice(pids))
        try:
            proc = psutil.Process(pid)
            if proc.ppid() == pool:  # never a stranger that reused a dead worker's pid
                proc.kill()
                kills.append(pid)
        except psutil.Error:
            pass


class Tiny:
    def __len__(self):
        return 600

    def __getitem__(self, i):
        time.sleep(0.002)  # 0.4 s of work per epoch for 3 workers: room for ~15 kills
        return _sample(i)


@contextlib.contextmanager
def _killing_workers(loader):
    """A thread SIGKILLs a random worker of `loader` every 10-50 ms meanwhile; yields
    the pids killed so far, and checks on the way out that there were enough."""
    kills: list = []
    stop = threading.Event()
    killer = threading.Thread(target=_random_killer, args=(loader, stop, kills), daemon=True)
    killer.start()
    try:
        yield kills
    finally:
        stop.set()
        killer.join(timeout=5)
    assert len(set(kills)) >= 10, f"only {len(set(kills))} kills: the test proved little"
    assert loader.stats().restarts >= 10


def test_workers_killed_at_random_instants_never_lose_or_repeat_a_batch():
    with shmfeed.Loader(Tiny(), batch_size=2, num_workers=3, shuffle=True, seed=5,
                        max_restarts=100_000) as loader, _killing_workers(loader):
        for epoch in range(2):
            order = epoch_items(Order(600, 2, True, 5, False), epoch)
            _check_epoch([_copy(b) for b in loader], 600, order)


def test_workers_killed_inside_the_c_loop_of_an_array_source_never_lose_or_repeat_a_batch():
    """The same with an `Arrays` source, whose workers build in C (csrc/gather.c): a
    kill lands in the middle of a copy, a claim or a publish, and the batch is rebuilt."""
    from shmfeed.sources import Arrays

    n, width = 3000, 8192  # 64 KB rows, 1 MB batches: a copy is long enough to be hit
    x = np.zeros((n, width), np.int64)
    x[:, 0] = x[:, -1] = np.arange(n)
    with shmfeed.Loader(Arrays(x), batch_size=16, num_workers=2, shuffle=True, seed=3,
                        max_restarts=100_000) as loader, _killing_workers(loader) as kills:
        epoch, t0 = 0, time.monotonic()
        while epoch < 3 or (len(set(kills)) < 10 and time.monotonic() - t0 < 20):
            loader.set_epoch(epoch)
            rows = np.concatenate([np.array(b) for b in loader])
            assert rows[:, 0].tolist() == epoch_items(Order(n, 16, True, 3, False), epoch).tolist()
            assert (rows[:, -1] == rows[:, 0]).all() and not rows[:, 1:-1].any()
            epoch += 1


@pytest.mark.parametrize("max_restarts", [0, 2])
def test_deaths_beyond_max_restarts_raise_worker_error_naming_worker_pid_signal_batch(
        max_restarts, tmp_path, capfd):
    log = tmp_path / "deaths"
    source = Dying(200, at=70, how="sigkill", log=log, once=False)
    with shmfeed.Loader(source, batch_size=4, num_workers=2, max_restarts=max_restarts) as loader:
        got = []
        with pytest.raises(shmfeed.WorkerError) as info:
            for b in loader:
                got.append(_copy(b))
        t_err = time.monotonic()
        _check_epoch(got, 68)  # batches 0-16
        deaths = _deaths(log)
        assert len(deaths) == max_restarts + 1
        pid, t_last = deaths[-1]
        err = info.value
        assert re.match(
            rf"worker (\d) \(pid {pid}\) was killed by SIGKILL while building batch 17 of epoch 0; "
            rf"restarted {max_restarts} time\(s\) already, giving up \(`max_restarts={max_restarts}`\)\.",
            str(err)), str(err)
        assert (err.pid, err.signal, err.batch, err.epoch) == (pid, signal.SIGKILL, 17, 0)
        assert t_err - t_last < DETECT_S
        reliability.record("max_restarts", t_err - t_last)
        # The pool gave up for good: the next epoch says so at once, also once its
        # supervisor has exited (it is not taken for one that died between epochs and
        # replaced, which would quietly reset the restart budget).
        gave_up = loader.pool_pid
        assert exited_after([gave_up], 10) is not None
        t0 = time.monotonic()
        with pytest.raises(shmfeed.WorkerError, match="giving up"):
            next(iter(loader))
        assert time.monotonic() - t0 < DETECT_S
        assert loader.pool_pid == gave_up, "a new pool was started"
    assert capfd.readouterr().err.count("replacing it") == max_restarts


def test_max_restarts_counts_over_the_loaders_life_across_worker_reforks(tmp_path):
    # One death per epoch; on_epoch_end makes every epoch re-fork the workers (from the
    # same supervisor, which receives the source's new state).
    source = DyingWithEpochHook(40, at=5, how="sigkill", log=tmp_path / "deaths", epochs=(0, 1, 2))
    with shmfeed.Loader(source, batch_size=4, num_workers=2, max_restarts=2) as loader:
        pools, workers = set(), []
        for _ in range(2):
            _check_epoch([_copy(b) for b in loader], 40)
            pools.add(loader.pool_pid)  # the pool this epoch ran on
            workers.append(set(loader.worker_pids))
        with pytest.raises(shmfeed.WorkerError, match=r"restarted 2 time\(s\) already, giving up"):
            for _ in loader:
                pass
        assert pools == {loader.pool_pid}
        assert not workers[0] & workers[1]


def test_supervisor_killed_raises_worker_error_and_next_epoch_recovers():
    source = Dying(200, at=-1, how="", log="/nonexistent", delay_s=0.002)
    with shmfeed.Loader(source, batch_size=4, num_workers=2) as loader:
        supervisor, workers = loader.pool_pid, _started(loader)
        with pytest.raises(shmfeed.WorkerError) as info:
            for k, _ in enumerate(loader):
                if k == 5:
                    os.kill(supervisor, signal.SIGKILL)
                    t_kill = time.monotonic()
        detected = time.monotonic() - t_kill
        assert f"supervisor (pid {supervisor}) was killed by SIGKILL" in str(info.value)
        assert detected < DETECT_S
        reliability.record("supervisor_sigkill", detected)
        assert exited_after(workers, GONE_S) is not None  # orphaned workers die with it
        _check_epoch([_copy(b) for b in loader], 200)
        assert loader.pool_pid != supervisor
        ctl = loader._ring.ctl
        for s in range(loader.num_slots):
            assert ctl.slot(s)["state"] != SlotState.FILLING


def test_slot_of_a_worker_killed_while_filling_is_reclaimed_and_rebuilt():
    """The control plane alone: a process dies holding a slot in FILLING; reclaim
    must free it and hand the claim to a replacement, with no lock left behind."""
    spec = infer(np.zeros(3, np.int64), rows=2, index=0)
    ring = Ring(spec, n_slots=3, max_workers=2)
    ctl = ring.ctl
    try:
        gen = ctl.start_epoch(0, 0, 5, 0)

        def child(worker: int, pending: int | None, hold: bool, w_fd: int) -> None:
            try:  # the parent's mapping is MADV_DONTFORK: map the memfd again
                mine = Ring(spec, 3, 2, fd=ring.fd)
                if pending is None:
                    g, b = mine.ctl.claim(worker)
                else:
                    g, b = untag(pending)
                slot = mine.ctl.acquire(worker, g, b, 5.0)
                assert slot is not None
                mine.write_views(slot)[0][:] = 100 + b
                if hold:
                    os.write(w_fd, b"x")
                    time.sleep(60)
                mine.ctl.publish(worker, slot, g, b, 2, SlotState.READY, 0)
            finally:
                os._exit(0)

        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            child(0, None, True, w)
        assert select.select([r], [], [], 10)[0], "the first child never acquired its slot"
        assert os.read(r, 1) == b"x"
        slot = ctl.slot_of(gen, 0)
        assert ctl.slot(slot)["state"] == SlotState.FILLING and ctl.slot(slot)["owner"] == 0
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pending = ctl.reclaim(0)
        assert pending == tag(gen, 0)
        info = ctl.slot(slot)
        assert info["state"] == SlotState.ASSIGNED and info["owner"] == -1
        ctl.set_claim(1, pending)
        pid = os.fork()
        if pid == 0:
            child(1, pending, False, w)
        os.waitpid(pid, 0)
        os.close(r)
        os.close(w)
        state, rows, taken_slot, ref = ctl.take(gen, 0, 5.0)
        assert (state, rows, taken_slot) == (SlotState.READY, 2, slot)
        assert (ring.views(ref, 2)[0] == 100).all()
        del ref
        gc.collect()
        assert ctl.slot(slot)["state"] != SlotState.HELD  # released with the views
        assert ctl.worker(1)["claim"] == NO_CLAIM
    finally:
        ring.close()


# -- 3. hung workers ------------------------------------------------------------------------


def test_hung_worker_times_out_naming_the_batch_and_the_wait(tmp_path, capfd):
    log = tmp_path / "hangs"
    with shmfeed.Loader(Dying(200, at=70, how="hang", log=log), batch_size=4, num_workers=2,
                        timeout_s=0.5) as loader:
        got = []
        t_wait = time.monotonic()
        with pytest.raises(shmfeed.WorkerError) as info:
            for b in loader:
                got.append(_copy(b))
                t_wait = time.monotonic()
        waited = time.monotonic() - t_wait
        _check_epoch(got, 68)
        (hung, _), = _deaths(log)
        assert re.match(rf"batch 17 of epoch 0 was not ready after waiting \d\.\d s, 0\.\d s of them with no "
                        rf"batch published \(`timeout_s=0\.5`\); "
                        rf"worker \d \(pid {hung}\) was still building it and has been killed", str(info.value))
        assert 0.5 <= waited < 0.5 + DETECT_S
        assert info.value.batch == 17 and info.value.waited_s >= 0.5
        reliability.record("hung_worker", waited - 0.5)
        assert exited_after([hung], DETECT_S) is not None
        _check_epoch([_copy(b) for b in loader], 200)
        # The supervisor says "replacing it" only before shutdown begins (it stays quiet
        # about the workers it stops): the next epoch needs no replacement, so under load
        # the `with` could end before the supervisor got to it.  Its replacement's pid is
        # published after the message.
        assert _replaced(loader, hung, 2, REPLACE_WAIT_S), f"worker (pid {hung}) not replaced"
    err = capfd.readouterr().err
    assert f"(pid {hung}) was killed by SIGKILL while building batch 17 of epoch 0; replacing it" in err
    assert "will be rebuilt" not in err  # the epoch was given up: nothing to rebuild


class Slow:
    def __len__(self):
        return 4

    def __getitem__(self, b):
        time.sleep(0.3)
        return np.full((2,), b, np.int64)


def test_slow_but_progressing_batches_do_not_time_out():
    # 1.2 s of work in all, 0.3 s per batch: the timeout is per batch, not cumulative.
    with shmfeed.Loader(Slow(), batch_size=None, num_workers=1, timeout_s=0.6) as loader:
        assert [int(b[0]) for b in loader] == [0, 1, 2, 3]


# -- 4. the training process killed, 5. Ctrl-C (real processes running a script) ----------

_SCRIPT_HEAD = """
import gc, os, signal, sys, threading, time
import numpy as np, psutil, shmfeed

class Slow:
    def __init__(self, delay_s):
        self.delay_s = delay_s
    def __len__(self):
        return 10**6
    def __getitem__(self, i):
        time.sleep(self.delay_s)
        return np.full((3,), i, np.int64)

def say(*a):
    print(*a, flush=True)
"""


def _script(tmp_path: Path, body: str, *args: str, **popen) -> subprocess.Popen:
    path = tmp_path / "train.py"
    path.write_text(_SCRIPT_HEAD + "\nif __name__ == '__main__':\n" + textwrap.indent(textwrap.dedent(body), "    "))
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env = dict(os.environ, TMPDIR=str(tmp_path / "tmp"))
    return subprocess.Popen([sys.executable, str(path), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path, **popen)


def _read_pids(proc: subprocess.Popen) -> list[int]:
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise AssertionError(f"the script died: {proc.communicate(timeout=SCRIPT_TIMEOUT_S)[1]}")
    return [int(p) for p in line.split()]


def _shm() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_training_process_sigkill_leaves_no_process_or_file(start_method, tmp_path):
    shm_before = _shm()
    proc = _script(tmp_path, """
        loader = shmfeed.Loader(Slow(0.05), batch_size=2, num_workers=2, start_method=sys.argv[1])
        it = iter(loader)
        next(it)
        say(loader.pool_pid, *loader.worker_pids)
        for b in it:
            pass
    """, start_method)
    try:
        pids = _read_pids(proc)
        assert len(pids) == 3
        time.sleep(0.1)  # the workers are inside __getitem__ now
        t_kill = time.monotonic()
        proc.kill()
        proc.wait(timeout=SCRIPT_TIMEOUT_S)
        exited = exited_after(pids, GONE_S, since=t_kill)
    finally:
        proc.kill()
        proc.communicate(timeout=SCRIPT_TIMEOUT_S)
    assert exited is not None, f"pool processes still running {GONE_S} s after kill -9"
    reliability.record("training_sigkill", exited)
    # Orphans are reaped by init, which may take a moment: gone from the table too.
    deadline = time.monotonic() + 10
    while any(psutil.pid_exists(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(psutil.pid_exists(p) for p in pids)
    assert list((tmp_path / "tmp").iterdir()) == []
    assert not [n for n in _shm() - shm_before if "shmfeed" in n]


def test_loader_made_in_a_thread_outlives_it_and_dies_with_the_training_process(tmp_path):
    proc = _script(tmp_path, """
        box = []
        t = threading.Thread(target=lambda: box.append(
            shmfeed.Loader(Slow(0.0), batch_size=2, num_workers=2, timeout_s=10)))
        t.start()
        t.join()
        time.sleep(0.3)  # the thread that forked the pool is gone
        loader = box[0]
        assert sum(1 for _ in zip(loader, range(100))) == 100
        loader._source.delay_s = 0.05  # the pool has its own copy: still fast
        it = iter(loader)
        next(it)
        say(loader.pool_pid, *loader.worker_pids)
        for b in it:
            time.sleep(0.05)
    """)
    try:
        pids = _read_pids(proc)
        time.sleep(0.1)
        t_kill = time.monotonic()
        proc.kill()
        proc.wait(timeout=SCRIPT_TIMEOUT_S)
        exited = exited_after(pids, GONE_S, since=t_kill)
    finally:
        proc.kill()
        err = proc.communicate(timeout=SCRIPT_TIMEOUT_S)[1]
    assert exited is not None, err
    reliability.record("thread_loader", exited)


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
@pytest.mark.parametrize("where", ["waiting", "stepping"])
def test_ctrl_c_raises_keyboard_interrupt_promptly_and_workers_exit_quietly(start_method, where, tmp_path):
    delay, step = ("0.2", "0") if where == "waiting" else ("0", "2")
    proc = _script(tmp_path, """
        loader = shmfeed.Loader(Slow(float(sys.argv[2])), batch_size=2, num_workers=2,
                                start_method=sys.argv[1])
        it = iter(loader)
        next(it)
        say(loader.pool_pid, *loader.worker_pids)
        try:
            for b in it:
                time.sleep(float(sys.argv[3]))
        except KeyboardInterrupt:
            say("interrupted", repr(time.monotonic()))
            raise
    """, start_method, delay, step, start_new_session=True)
    try:
        pids = _read_pids(proc)
        time.sleep(0.3)
        t_int = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        out, err = proc.communicate(timeout=SCRIPT_TIMEOUT_S)
        exited = exited_after(pids, GONE_S, since=t_int)
    finally:
        proc.kill()
    caught = float(out.split()[1]) - t_int
    assert caught < DETECT_S, f"KeyboardInterrupt after {caught:.3f} s"
    reliability.record("ctrl_c", caught)
    assert exited is not None
    assert err.count("Traceback") == 1 and err.rstrip().endswith("KeyboardInterrupt"), err
    assert "shmfeed:" not in err and "Exception ignored" not in err, err


def test_ctrl_c_during_pool_fork_is_raised_not_swallowed(tmp_path):
    # A SIGINT raised in an at-fork hook is exactly what Python drops ("Exception
    # ignored in ...") unless shmfeed defers it around the fork.
    proc = _script(tmp_path, """
        os.register_at_fork(before=lambda: os.kill(os.getpid(), signal.SIGINT))
        caught = False
        try:
            loader = shmfeed.Loader(Slow(0.0), batch_size=2, num_workers=2, start_method="fork")
        except KeyboardInterrupt:
            caught = True
        gc.collect()
        deadline = time.monotonic() + 2
        while psutil.Process().children() and time.monotonic() < deadline:
            time.sleep(0.01)
        say(caught, len(psutil.Process().children()))
    """)
    out, err = proc.communicate(timeout=SCRIPT_TIMEOUT_S)
    assert out.split() == ["True", "0"], (out, err)
    assert "Exception ignored" not in err and "Traceback" not in err, err


def test_ctrl_c_while_a_spawned_pool_starts_prints_no_child_traceback(tmp_path):
    proc = _script(tmp_path, """
        loader = shmfeed.Loader(Slow(0.0), batch_size=2, num_workers=2, start_method="spawn")
        say(loader.pool_pid)
        os.killpg(os.getpgid(0), signal.SIGINT)  # Ctrl-C while the pool's interpreter starts
        time.sleep(10)
    """, start_new_session=True)
    try:
        (pool,) = _read_pids(proc)
        out, err = proc.communicate(timeout=SCRIPT_TIMEOUT_S)
    finally:
        proc.kill()
    assert exited_after([pool], GONE_S) is not None
    # One traceback: the script's own; none from the pool's new interpreter.
    assert err.count("Traceback") == 1 and err.rstrip().endswith("KeyboardInterrupt"), err
    assert "train.py" in err and "importlib" not in err, err


# -- the leak fixture -------------------------------------------------------------------------


def test_leak_fixture_fails_tests_that_leave_a_process_fd_or_shm_file(tmp_path):
    (tmp_path / "conftest.py").write_text((TESTS / "conftest.py").read_text())
    prefix = f"leak-check-{os.getpid()}-"  # not "shmfeed...": see conftest.SHM_PREFIX
    shm_file = f"/dev/shm/{prefix}file"
    (tmp_path / "test_leaky.py").write_text(textwrap.dedent(f"""
        import os, subprocess, sys
        import numpy as np, shmfeed
        kept = []
        class S:
            def __len__(self): return 10
            def __getitem__(self, i): return np.zeros(2)
        def test_clean():
            with shmfeed.Loader(S(), batch_size=2, num_workers=1) as loader:
                list(loader)
        def test_leaks_a_process_an_fd_and_a_shm_file():
            kept.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))
            kept.append(os.open(os.devnull, os.O_RDONLY))
            open({shm_file!r}, "w").close()
        def test_leaks_an_open_loader():
            kept.append(shmfeed.Loader(S(), batch_size=2, num_workers=1))
    """))
    try:
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              str(tmp_path)], cwd=tmp_path, env={**os.environ, "SHMFEED_TEST_SHM_PREFIX": prefix,
                                                    "SHMFEED_TEST_LEAK_WAIT_S": "0.5"},
                             capture_output=True, text=True, timeout=120)
    finally:
        if os.path.exists(shm_file):
            os.remove(shm_file)
    out = run.stdout
    assert run.returncode != 0, out
    assert "3 passed, 2 errors" in out, out  # the leaks fail at teardown
    assert "child processes left" in out and "fds left open" in out, out
    assert "/dev/shm entries left" in out and os.path.basename(shm_file) in out, out
    assert "mapping(s) of a shmfeed ring" in out, out


# -- the table of RELIABILITY.md -------------------------------------------------------------


def test_reliability_table_matches_the_fault_tests():
    doc = reliability.DOC.read_text()
    assert reliability.table_rows(doc) == [(f.fault, f.test) for f in reliability.FAULTS], (
        "RELIABILITY.md's table is out of date: run `python tests/reliability.py`")
    named = set()
    for f in reliability.FAULTS:
        file, name = f.test.split("::")
        name = name.split("[")[0]
        assert re.search(rf"^def {name}\(", (TESTS / file).read_text(), re.M), f.test
        named.add((file, name))
    here = re.findall(r"^def (test_\w+)\(", (TESTS / "test_faults.py").read_text(), re.M)
    untabled = [t for t in here if ("test_faults.py", t) not in named
                and t != "test_reliability_table_matches_the_fault_tests"]
    assert not untabled, f"fault tests missing from tests/reliability.py FAULTS: {untabled}"
