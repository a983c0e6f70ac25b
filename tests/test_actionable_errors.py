"""Errors and stats a user can act on (issue 23.6): a worker's exception is caught by
its own type, `stats()` works after `close()`, the worker-count advice of `stats()` and
the constructor's warning follow one rule, and a ragged list of samples is pointed at
`padded_shapes`."""

from __future__ import annotations

import pickle
import threading

import numpy as np
import pytest

import shmfeed


class TwoArgs(Exception):
    """A user exception whose __init__ wants other arguments than a message."""

    def __init__(self, code, what):
        super().__init__(code, what)


class Unpicklable(Exception):
    def __init__(self, msg):
        super().__init__(msg)
        self.lock = threading.Lock()


class Raises:
    """Sample `at` raises `make()`: a new exception each time (a shared instance would
    keep the traceback of the frames that raised it, and the batch they built)."""

    def __init__(self, make, at=9):
        self.make, self.at = make, at

    def __len__(self):
        return 16

    def __getitem__(self, i):
        if i == self.at:
            raise self.make()
        return np.float32(i)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("make, caught_as", [
    (lambda: ValueError("bad sample"), ValueError),
    (lambda: KeyError("k9"), KeyError),
    (lambda: TwoArgs(3, "x"), TwoArgs),
    (lambda: Unpicklable("holds a lock"), Unpicklable),
    (lambda: FileNotFoundError(2, "No such file", "/data/9.png"), OSError),
], ids=["ValueError", "KeyError", "two-argument-init", "unpicklable", "FileNotFoundError"])
def test_a_workers_exception_is_caught_by_its_own_type_with_its_context(num_workers, make, caught_as):
    exc_type = type(make())
    with shmfeed.Loader(Raises(make), batch_size=4, num_workers=num_workers) as loader:
        with pytest.raises(caught_as) as info:
            for _ in loader:
                pass
    err = info.value
    assert isinstance(err, shmfeed.WorkerError)
    assert (err.batch, err.epoch, err.item) == (2, 0, 9)
    assert f"raised {exc_type.__name__}" in str(err) and "sample index 9" in str(err)
    assert "Worker traceback" in str(err) and "raise self.make()" in err.worker_traceback
    assert type(err.__cause__) is exc_type
    again = pickle.loads(pickle.dumps(err))  # e.g. sent back by a multiprocessing pool
    assert type(again) is type(err) and again.batch == 2 and str(again) == str(err)


def test_a_workers_sys_exit_is_a_worker_error_and_never_a_system_exit():
    with shmfeed.Loader(Raises(lambda: SystemExit(4)), batch_size=4, num_workers=1) as loader:
        with pytest.raises(shmfeed.WorkerError) as info:
            for _ in loader:
                pass
    assert not isinstance(info.value, SystemExit)
    assert type(info.value.__cause__) is SystemExit


class HookRaises(Raises):
    def on_epoch_end(self):
        raise ValueError("cannot reshuffle")


def test_an_epoch_hooks_exception_is_caught_by_its_own_type():
    with shmfeed.Loader(HookRaises(None, at=-1), batch_size=4, num_workers=1) as loader:
        with pytest.raises(ValueError, match=r"on_epoch_end\(\) raised ValueError: cannot reshuffle") as info:
            for _ in loader:
                pass
    assert isinstance(info.value, shmfeed.WorkerError) and info.value.epoch == 0
