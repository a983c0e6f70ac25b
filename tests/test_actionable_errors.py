"""Errors and stats a user can act on (issue 23.6): a worker's exception is caught by
its own type, `stats()` works after `close()`, the worker-count advice of `stats()` and
the constructor's warning follow one rule, and a ragged list of samples is pointed at
`padded_shapes`."""

from __future__ import annotations

import logging
import pickle
import threading

import numpy as np
import pytest

import shmfeed
from shmfeed._engine.stats import Stats
from shmfeed._sysinfo import most_useful_workers, usable_cpus


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


@pytest.mark.parametrize("num_workers", [0, 1])
def test_stats_after_close_are_the_final_numbers(num_workers):
    with shmfeed.Loader(np.arange(40.0).reshape(20, 2), batch_size=4, num_workers=num_workers) as loader:
        for _ in loader:
            pass
        before = loader.stats()
    after = loader.stats()  # the natural print(loader.stats()) after the with block
    assert after.batches == before.batches == 5 and after.epochs_started == 1
    assert after.elapsed_s >= before.elapsed_s > 0
    assert [w["batches"] for w in after.workers] == [w["batches"] for w in before.workers]
    assert "5 batches" in str(after)
    assert loader.stats().elapsed_s == after.elapsed_s  # frozen at close


@pytest.mark.parametrize("cpus, num_workers, more", [(2, 2, False), (2, 1, False), (8, 2, True),
                                                     (8, 7, False), (1, 1, False)])
def test_stats_advise_more_workers_only_below_the_rule_the_constructor_warns_with(cpus, num_workers, more):
    """2 CPUs running 2 workers were told 'a few more workers' while the constructor said
    'Use at most 1'."""
    most = most_useful_workers(cpus)
    for wait_s in (3.0, 9.0):  # partly and fully input-bound
        advice = Stats(batches=10, wait_s=wait_s, elapsed_s=10.0, num_workers=num_workers,
                       cpus=cpus).input_wait_verdict()
        if more:
            assert f"more workers may help (`num_workers={num_workers}`, at most {most} on {cpus} CPUs" in advice
        else:
            assert "more workers would not help" in advice and "make __getitem__ cheaper" in advice


def test_the_constructors_warning_names_the_same_most_useful_workers(caplog):
    cpus = usable_cpus().value
    with caplog.at_level(logging.WARNING, logger="shmfeed"):
        with shmfeed.Loader(np.zeros((8, 2)), batch_size=4, num_workers=cpus + 1) as loader:
            s = loader.stats()
    assert f"Use at most {most_useful_workers(cpus)}." in caplog.text
    assert (s.num_workers, s.cpus) == (cpus + 1, cpus)
    s.batches, s.wait_s, s.elapsed_s = 10, 9.0, 10.0
    assert "more workers would not help" in s.input_wait_verdict()


@pytest.mark.parametrize("samples, example", [
    ([np.zeros(3), np.zeros(5)], "`padded_shapes=(5,)`"),
    ([{"tokens": np.zeros(3, np.int32)}, {"tokens": np.zeros(7, np.int32)}], "`padded_shapes={'tokens': (7,)}`"),
    ([(np.zeros(3), 1), (np.zeros(4), 2)], "a tuple with `(4,)` at position 0 and None"),
])
def test_ragged_samples_from_a_list_point_at_padded_shapes(samples, example):
    with pytest.raises(shmfeed.SpecError) as info:
        list(shmfeed.Loader(samples, batch_size=2, num_workers=0))
    msg = str(info.value)
    assert "got shape" in msg and example in msg
    assert "or in the list or arrays you give the Loader" in msg  # a list has no __getitem__


def test_samples_of_another_rank_are_not_sent_to_padded_shapes():
    with pytest.raises(shmfeed.SpecError) as info:
        list(shmfeed.Loader([np.zeros(3), np.zeros((2, 2))], batch_size=2, num_workers=0))
    assert "padded_shapes" not in str(info.value) and "same shape and dtype per field" in str(info.value)
