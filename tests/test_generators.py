"""Plain generators and iterables as sources (issue 15.2, the Keras `fit_generator`
way): one process reads the stream, `steps_per_epoch` cuts it into epochs, the next
epoch continues it; several workers, a lost position and pickling are clear errors."""

from __future__ import annotations

import functools
import os
import signal
import time

import numpy as np
import psutil
import pytest

import shmfeed
from shmfeed._engine.control import SlotState

STEPS = 3
BATCH = 4
GONE_S = 5.0
PREFETCH_WAIT_S = 20.0  # five tiny batches: milliseconds idle, allow for a loaded machine


# -- streams (module level: a spawned pool unpickles them) --------------------------------
def counting():
    """Endless: item n is {'n': n, 'pid': the reading process, 'noise': from shmfeed.rng()}."""
    n = 0
    while True:
        yield {"n": n, "pid": os.getpid(), "noise": shmfeed.rng().integers(1 << 30)}
        n += 1


def keras_style_batches():
    """Endless (x, y) batches, as fit_generator generators yield them."""
    b = 0
    while True:
        yield np.full((BATCH, 2), b, np.float32), np.arange(b * BATCH, (b + 1) * BATCH)
        b += 1


def finite(n):
    def make():
        return iter(range(n))
    return make


def _ns(loader, epochs):
    """The items' n of each epoch, and the pid that read each item."""
    out, pids = [], []
    for _ in range(epochs):
        ns = []
        for b in loader:
            ns += b["n"].tolist()
            pids += b["pid"].tolist()
        out.append(ns)
    return out, pids


@pytest.mark.parametrize("how", ["function", "generator", "iterator"])
@pytest.mark.parametrize("num_workers", [0, 1])
def test_each_epoch_continues_the_stream_where_the_last_stopped(how, num_workers):
    source = {"function": counting, "generator": counting(), "iterator": iter(counting())}[how]
    with shmfeed.Loader(source, batch_size=BATCH, num_workers=num_workers, steps_per_epoch=STEPS) as loader:
        assert len(loader) == STEPS
        epochs, pids = _ns(loader, 3)
    n = STEPS * BATCH
    assert epochs == [list(range(e * n, (e + 1) * n)) for e in range(3)]
    # The first item is read here, at construction, for the batch spec; with a worker,
    # it reads all the others.
    assert pids[0] == os.getpid()
    assert len(set(pids[1:])) == 1 and (pids[1] != os.getpid()) == bool(num_workers)


def test_the_stream_and_its_random_draws_are_the_same_with_0_and_1_workers():
    streams = []
    for num_workers in (0, 1):
        with shmfeed.Loader(counting, batch_size=BATCH, num_workers=num_workers, steps_per_epoch=STEPS,
                            seed=7) as loader:
            streams.append([(b["n"].tolist(), b["noise"].tolist()) for _ in range(2) for b in loader])
    assert streams[0] == streams[1]
    assert len({x for _, noise in streams[0] for x in noise}) == 2 * STEPS * BATCH


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_generator_of_whole_batches_with_batch_size_none(num_workers):
    with shmfeed.Loader(keras_style_batches, batch_size=None, num_workers=num_workers,
                        steps_per_epoch=2) as loader:
        got = [(x[:, 0].tolist(), y.tolist()) for _ in range(2) for x, y in loader]
    assert got == [([b] * BATCH, list(range(b * BATCH, (b + 1) * BATCH))) for b in range(4)]


def test_the_worker_prefetches_while_the_loop_works():
    with shmfeed.Loader(counting, batch_size=BATCH, num_workers=1, steps_per_epoch=6, num_slots=8) as loader:
        it = iter(loader)
        next(it)

        def ready() -> int:
            return sum(loader._ring.ctl.slot(s)["state"] == SlotState.READY for s in range(8))

        # The training step: every other batch of the epoch gets built meanwhile, without
        # the loop asking (waited for, not slept for: a loaded machine may take longer).
        deadline = time.monotonic() + PREFETCH_WAIT_S
        while ready() < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ready() == 5
        assert [b["n"][0] for b in it] == [4, 8, 12, 16, 20]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_generator_that_ends_early_fails_in_batch_order(num_workers):
    with shmfeed.Loader(finite(10), batch_size=BATCH, num_workers=num_workers, steps_per_epoch=2) as loader:
        assert [b.tolist() for b in loader] == [[0, 1, 2, 3], [4, 5, 6, 7]]
        got = []
        with pytest.raises(shmfeed.ShmfeedError, match=r"ended at item 2 of an epoch of 8 \(`steps_per_epoch=2`.*"
                           r"must not end. Make it endless \(`while True:`\), or lower `steps_per_epoch`"):
            for b in loader:
                got.append(b.tolist())
        assert got == []  # batch 0 of epoch 1 had 8, 9 and then the end


def test_several_workers_are_refused_with_the_reason_and_the_recipe():
    with pytest.raises(shmfeed.SpecError, match=r"the source is a generator: one stream that only one "
                       r"process can read. With `num_workers=3` each worker would run its own copy and "
                       r"the model would see every batch 3 times.*`num_workers=1`.*shmfeed.sources.Stream"):
        shmfeed.Loader(counting(), batch_size=BATCH, num_workers=3, steps_per_epoch=STEPS)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(batch_size=2, num_workers=1), r"the source is a function.*has no length: pass `steps_per_epoch`"),
    (dict(batch_size=2, num_workers=1, steps_per_epoch=0), r"`steps_per_epoch` must be an integer >= 1, got 0"),
    (dict(batch_size=2, num_workers=1, steps_per_epoch=2, shuffle=True), r"`shuffle=True` cannot reorder"),
    (dict(batch_size=2, num_workers=1, steps_per_epoch=2, shard_count=2), r"leave `shard_count=1`"),
])
def test_bad_stream_arguments_are_spec_errors(kwargs, pattern):
    with pytest.raises(shmfeed.SpecError, match=pattern):
        shmfeed.Loader(counting, **kwargs)


def test_steps_per_epoch_with_a_map_style_source_is_an_error():
    with pytest.raises(shmfeed.SpecError, match=r"`steps_per_epoch` is for generators and iterables"):
        shmfeed.Loader(np.zeros((8, 2)), batch_size=2, num_workers=0, steps_per_epoch=2)


def test_a_function_runs_in_a_spawned_pool_and_a_generator_object_says_to_pass_one():
    with shmfeed.Loader(counting, batch_size=BATCH, num_workers=1, steps_per_epoch=STEPS,
                        start_method="spawn") as loader:
        epochs, _ = _ns(loader, 2)
    assert epochs == [list(range(12)), list(range(12, 24))]
    with pytest.raises(shmfeed.SourcePickleError, match=r"the source is a generator, which cannot be sent to "
                       r"the worker process: it starts in a fresh interpreter because `start_method='spawn'` "
                       r"was asked. Pass a zero-argument function that returns the generator instead"):
        shmfeed.Loader(counting(), batch_size=BATCH, num_workers=1, steps_per_epoch=STEPS,
                       start_method="spawn")


def _wait_replaced(loader, old_pid):
    deadline = time.monotonic() + GONE_S
    while time.monotonic() < deadline:
        pids = loader.worker_pids
        if pids and pids[0] not in (0, old_pid):
            return
        time.sleep(0.01)
    raise AssertionError("the dead worker was not replaced")


@pytest.mark.parametrize("when", ["between epochs", "mid epoch"])
def test_a_dead_worker_loses_the_stream_position_with_a_clear_error(when):
    with shmfeed.Loader(counting, batch_size=BATCH, num_workers=1, steps_per_epoch=6, num_slots=3) as loader:
        first, _ = _ns(loader, 1)
        assert first == [list(range(24))]
        it = iter(loader)
        got = []
        if when == "mid epoch":
            got += next(it)["n"].tolist()
        pid = loader.worker_pids[0]
        os.kill(pid, signal.SIGKILL)
        psutil.Process(pid).wait(GONE_S) if psutil.pid_exists(pid) else None
        _wait_replaced(loader, pid)
        with pytest.raises(shmfeed.WorkerError, match=r"the stream's position was lost: \d+ batch\(es\) were "
                           r"built from a function by a process that is gone.*close the loader and create a "
                           r"new one") as info:
            for b in it:
                got += b["n"].tolist()
        # What was built before the death arrives first, exactly once and in order.
        assert got == list(range(24, 24 + len(got)))
        assert info.value.batch == len(got) // BATCH and info.value.epoch == 1
        with pytest.raises(shmfeed.WorkerError, match=r"position was lost"):
            for _ in loader:
                pass


def test_a_generator_cannot_be_resumed_from_a_state_dict():
    with shmfeed.Loader(counting, batch_size=BATCH, num_workers=0, steps_per_epoch=STEPS) as loader:
        with pytest.raises(shmfeed.SpecError, match=r"cannot be resumed exactly"):
            loader.state_dict()
        with pytest.raises(shmfeed.SpecError, match=r"cannot be resumed exactly"):
            loader.load_state_dict({})


# -- a generator that reads files (issue 23.2) ----------------------------------------------
LINES_PER_FILE = 1500  # ~7 KB a file: the worker reads past the buffer the probe filled


def read_lines(paths):
    """Yields each line of each file as a sample, the files opened as it goes."""
    for path in paths:
        with open(path) as f:
            for line in f:
                yield {"v": np.int64(int(line))}


@pytest.fixture(params=["fork", "forkserver", "spawn"])
def start_method(request):
    if request.param == "forkserver":
        assert shmfeed.start_fork_server()
        yield request.param
        shmfeed._processes.forkserver.stop()
    else:
        yield request.param


def test_a_generator_keeps_reading_the_file_it_opened_in_its_worker(tmp_path, start_method):
    paths = []
    for k in range(2):
        paths.append(tmp_path / f"part{k}.txt")
        paths[-1].write_text("".join(f"{k * LINES_PER_FILE + i}\n" for i in range(LINES_PER_FILE)))
    steps = 2 * LINES_PER_FILE // 32
    # Made before JAX starts, as the script: with fork, the worker continues the
    # generator the probe started, which holds the first file open.
    with shmfeed.Loader(functools.partial(read_lines, paths), batch_size=32, num_workers=1,
                        steps_per_epoch=steps, start_method=start_method) as loader:
        got = [v for b in loader for v in b["v"].tolist()]
        assert loader.start_method == start_method
    assert got == list(range(steps * 32))
