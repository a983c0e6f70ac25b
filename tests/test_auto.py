"""`num_workers="auto"` and `num_slots="auto"` (shmfeed/_autotune.py, issue 31): the
start within the CPUs this process may use and the memory budget, the tuner's
decisions, and that no change of the worker count changes a batch or a resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

import shmfeed
from shmfeed._autotune import MIN_WINDOW_S, Window, WorkerTuner, most_workers
from shmfeed._errors import SpecError

ROOT = Path(__file__).resolve().parents[1]
CHILD_TIMEOUT_S = 60


class Busy:
    """Items that each keep a CPU busy for `cost_s` (a spin, not a sleep: busy time)."""

    def __init__(self, n: int = 400, cost_s: float = 0.001):
        self.n, self.cost_s = n, cost_s

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        t = time.perf_counter()
        while time.perf_counter() - t < self.cost_s:
            pass
        return np.full(3, i, np.int64) + shmfeed.rng().integers(0, 1000, 3)


def _epochs(loader, epochs: int, step_s: float = 0.0, stop_after: int | None = None) -> list[np.ndarray]:
    out = []
    for e in range(epochs):
        for b, batch in enumerate(loader):
            out.append(batch.copy())
            if step_s:
                time.sleep(step_s)
            if stop_after is not None and e == epochs - 1 and b + 1 == stop_after:
                break
    return out


def _usable_cpus() -> int:
    return shmfeed._sysinfo.usable_cpus().value


# -- options ----------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "value", "expected"), [
    ("num_workers", "fast", r'`num_workers` must be an integer >= 0 or "auto", got \'fast\''),
    ("num_workers", "Auto", r'`num_workers` must be an integer >= 0 or "auto", got \'Auto\''),
    ("num_slots", "many", r'`num_slots` must be an integer >= 2 or "auto", got \'many\''),
])
def test_a_misspelt_auto_names_the_option_and_the_values_it_takes(name, value, expected):
    options = {"num_workers": 0, name: value}
    with pytest.raises(SpecError, match=expected):
        shmfeed.Loader(np.zeros((8, 2)), batch_size=2, **options)


def test_an_auto_ring_stays_within_memory_budget_bytes():
    x = np.zeros((4096, 1024), np.uint8)  # 64 KiB batches: the default ring would be 8 MiB
    budget = 600_000
    with shmfeed.Loader(x, batch_size=64, num_workers="auto", num_slots="auto",
                        memory_budget_bytes=budget) as loader:
        assert loader.ring_bytes <= budget
        # As many slots as fit, with the control block of every worker it may run.
        one_more = shmfeed._engine.ring.ring_bytes(loader.num_slots + 1, loader._ring.max_workers, loader.slot_bytes)
        assert one_more > budget and loader._ring.max_workers == most_workers(_usable_cpus())
        assert sum(1 for _ in loader) == 64
    with pytest.raises(SpecError, match=r"`memory_budget_bytes=100000` cannot hold 2 slots"):
        shmfeed.Loader(x, batch_size=64, num_workers="auto", num_slots="auto", memory_budget_bytes=100_000)


def test_an_explicit_worker_count_keeps_todays_ring_and_no_tuner():
    with shmfeed.Loader(np.zeros((64, 4)), batch_size=4, num_workers=2) as loader:
        assert loader.num_slots == shmfeed._config.default_num_slots(2, loader.slot_bytes)
        assert loader.stats().auto == "" and loader.stats().auto_decisions == []
        assert "auto" not in str(loader.stats())


@pytest.mark.parametrize("row_bytes", [2 * 1025, 224 * 224 * 3])  # windows' rows; images'
@pytest.mark.parametrize("num_slots", ["auto", None])
def test_an_auto_loader_starts_with_the_workers_and_ring_of_the_default_on_this_machine(row_bytes, num_slots):
    # What `shmfeed bench` runs by default: the usable CPUs (at most 8), the default ring.
    x = np.zeros((256, row_bytes), np.uint8)
    start = min(_usable_cpus(), shmfeed._autotune.START_MAX)
    with shmfeed.Loader(x, batch_size=32, num_workers=start) as default, \
            shmfeed.Loader(x, batch_size=32, num_workers="auto", num_slots=num_slots) as auto:
        assert (auto.stats().num_workers, auto.num_slots, auto.slot_bytes) == \
            (default.stats().num_workers, default.num_slots, default.slot_bytes)
        deadline = time.monotonic() + 10  # each worker records its pid as it starts
        while {len(auto.worker_pids), len(default.worker_pids)} != {start} and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(auto.worker_pids) == len(default.worker_pids) == start


class _Counter:
    """Python and C calls made in this thread while it is on."""

    def __init__(self):
        self.calls = 0

    def __call__(self, frame, event, arg):
        if event in ("call", "c_call"):
            self.calls += 1

    def count(self, it, n: int) -> int:
        self.calls = 0
        sys.setprofile(self)
        try:
            for _ in range(n):
                next(it)
        finally:
            sys.setprofile(None)
        return self.calls


def test_an_auto_loader_makes_no_more_calls_per_batch_than_a_fixed_one():
    # Tiny batches (as `windows`): anything the tuner measured per batch would show here.
    # Its work is per epoch (`_tune`), and the slow take's calls are few and rare.
    x = np.zeros((4096, 8), np.uint8)
    n = 400
    calls = {}
    for workers in (2, "auto"):
        with shmfeed.Loader(x, batch_size=4, num_workers=workers) as loader:
            it = iter(loader)
            next(it)  # the start, and the first take, outside the count
            calls[workers] = _Counter().count(it, n)
            del it
    assert calls["auto"] <= calls[2] + n // 2, calls


# -- the start, within this process's CPUs ------------------------------------------------
_CHILD = """
import json, os, sys, time
sys.path.insert(0, {root!r})
{setup}
import numpy as np, shmfeed
sys.path.insert(0, {tests!r})
from test_auto import Busy, _epochs
with shmfeed.Loader(Busy(), batch_size=4, num_workers="auto", num_slots="auto") as loader:
    _epochs(loader, 3)
    s = loader.stats()
    print(json.dumps({{"most": loader._cfg.auto_workers, "workers": s.num_workers, "auto": s.auto,
                      "counts": [d["workers"] for d in s.auto_decisions]}}))
"""


def _run_child(setup: str) -> dict:
    code = _CHILD.format(root=str(ROOT), tests=str(ROOT / "tests"), setup=textwrap.dedent(setup))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=CHILD_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_auto_never_runs_more_workers_than_the_cpus_its_affinity_allows():
    cpu = sorted(os.sched_getaffinity(0))[0]
    got = _run_child(f"os.sched_setaffinity(0, {{{cpu}}})")
    # The loop waited for a busy worker all along, and there is no CPU for another.
    assert got["most"] == 1 and got["counts"] == [1] and got["workers"] == 1, got
    assert "1 usable CPU(s) (sched_getaffinity)" in got["auto"], got


def test_auto_never_runs_more_workers_than_its_cgroup_cpu_quota_allows():
    cpu_root = Path("/sys/fs/cgroup/cpu")
    group = cpu_root / f"shmfeed-test-{uuid.uuid4().hex[:8]}"
    try:
        group.mkdir()
    except OSError as exc:
        pytest.skip(f"no cgroup v1 cpu controller to make a group in here: {exc}")
    try:
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text("50000")  # half a CPU: one worker at most
        got = _run_child(f"open({str(group / 'cgroup.procs')!r}, 'w').write(str(os.getpid()))")
    finally:
        deadline = time.monotonic() + 5
        while True:  # the child's processes leave the group as they are reaped
            try:
                group.rmdir()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    if _usable_cpus() > 1:
        assert got["most"] == 1 and got["counts"] == [1], got
        assert "cgroup CPU quota" in got["auto"], got


# -- the tuner ---------------------------------------------------------------------------
def _window(workers: int, wait: float, busy: float, batches_per_s: float = 100.0) -> Window:
    s = 1.0
    return Window(workers, s, wait * s, int(batches_per_s * s), busy * workers * s)


def test_a_waiting_loop_with_busy_workers_gets_one_more_worker_up_to_the_cpus():
    tuner = WorkerTuner(1, 2, "2 CPUs")
    assert tuner.observe(_window(1, wait=0.6, busy=0.95, batches_per_s=100), 1) == 2
    assert tuner.observe(_window(2, wait=0.3, busy=0.95, batches_per_s=180), 2) == 2  # paid: kept
    assert tuner.observe(_window(2, wait=0.3, busy=0.95, batches_per_s=180), 3) == 2  # no CPU left
    assert [d["action"] for d in tuner.decisions()] == ["start", "more"]
    assert tuner.summary().startswith("2 worker(s) from epoch 1: the loop waited 60 % of epoch 0 with 1, "
                                      "workers busy 95 %; then kept: ")
    assert "2 is the most (the 2 CPU(s) this process may use)" in tuner.summary()


def test_a_worker_that_paid_is_not_dropped_again_when_each_is_less_busy():
    tuner = WorkerTuner(1, 4, "4 CPUs")
    assert tuner.observe(_window(1, wait=0.5, busy=0.8, batches_per_s=100), 1) == 2
    # Two share the work (40 % each) and the loop is faster: no flip back to one.
    for epoch in range(2, 5):
        assert tuner.observe(_window(2, wait=0.05, busy=0.4, batches_per_s=190), epoch) == 2
    assert [d["workers"] for d in tuner.decisions()] == [1, 2]


def test_a_worker_that_did_not_speed_the_loop_up_is_taken_back_and_not_tried_again():
    tuner = WorkerTuner(2, 4, "4 CPUs")
    assert tuner.observe(_window(2, wait=0.5, busy=0.9, batches_per_s=100), 1) == 3
    assert tuner.observe(_window(3, wait=0.5, busy=0.9, batches_per_s=101), 2) == 2  # not 5 % faster
    for epoch in range(3, 6):  # the same facts again: no oscillation
        assert tuner.observe(_window(2, wait=0.5, busy=0.9, batches_per_s=100), epoch) == 2
    assert [d["workers"] for d in tuner.decisions()] == [2, 3, 2]
    assert tuner.decisions()[-1]["why"].startswith("3 made the loop no faster than 2")


def test_idle_workers_are_dropped_to_what_keeps_the_loop_fed_and_a_costly_drop_undone():
    tuner = WorkerTuner(4, 4, "4 CPUs")
    # 4 workers busy 20 % each: 0.8 CPUs of building, which 2 do at 40 % (< BUSY_TARGET).
    assert tuner.observe(_window(4, wait=0.0, busy=0.2, batches_per_s=50), 1) == 2
    # With 2 the loop waits and runs slower: back to 4, and never below it again.
    assert tuner.observe(_window(2, wait=0.3, busy=0.9, batches_per_s=30), 2) == 4
    assert tuner.observe(_window(4, wait=0.0, busy=0.2, batches_per_s=50), 3) == 4
    assert [d["action"] for d in tuner.decisions()] == ["start", "fewer", "back"]


def test_epochs_too_short_to_judge_are_added_up_before_a_decision():
    tuner = WorkerTuner(1, 2, "2 CPUs")
    short = Window(1, MIN_WINDOW_S / 3, MIN_WINDOW_S / 6, 40, MIN_WINDOW_S / 3)
    assert tuner.observe(short, 1) == 1
    assert tuner.observe(short, 2) == 1
    assert tuner.observe(short, 3) == 2
    assert "of epochs 0-2 with 1" in tuner.summary()


def test_a_window_of_another_worker_count_is_not_taken_for_this_one():
    tuner = WorkerTuner(2, 4, "4 CPUs")
    assert tuner.observe(_window(3, wait=0.9, busy=0.99), 1) == 2
    assert tuner.decisions() == [tuner.history[0].as_dict()]


def test_a_loop_waiting_on_idle_workers_tries_one_fewer_once_and_keeps_it_only_if_not_slower():
    # `windows` on 2 CPUs: batches of microseconds, the loop waits for a worker's wake-up,
    # not for building. One worker fewer made the loop wait longer there once (32 % -> 58 %),
    # and delivered 5-15 % more batches/s in runs of 3 s: it is tried, and judged by the rate.
    tuner = WorkerTuner(2, 2, "2 CPUs")
    assert tuner.observe(_window(2, wait=0.5, busy=0.2, batches_per_s=100_000), 1) == 1
    assert "the loop waits on idle workers, so 1 is tried" in tuner.decisions()[-1]["why"]
    # slower with 1 (even by less than GAIN): back to 2, and never tried again
    assert tuner.observe(_window(1, wait=0.6, busy=0.4, batches_per_s=99_000), 2) == 2
    assert [d["action"] for d in tuner.decisions()] == ["start", "fewer", "back"]
    for epoch in range(3, 6):
        assert tuner.observe(_window(2, wait=0.5, busy=0.2, batches_per_s=100_000), epoch) == 2
    assert len(tuner.decisions()) == 3

    # As fast or faster with 1: kept, and the loop's wait alone does not bring 2 back.
    tuner = WorkerTuner(2, 2, "2 CPUs")
    assert tuner.observe(_window(2, wait=0.3, busy=0.35, batches_per_s=100_000), 1) == 1
    for epoch in range(2, 5):
        assert tuner.observe(_window(1, wait=0.5, busy=0.45, batches_per_s=112_000), epoch) == 1
    assert [d["action"] for d in tuner.decisions()] == ["start", "fewer"]

    # Workers that are busy are not idle: a waiting loop keeps them (2 is the most here).
    tuner = WorkerTuner(2, 2, "2 CPUs")
    for epoch in range(1, 4):
        assert tuner.observe(_window(2, wait=0.5, busy=0.9, batches_per_s=100), epoch) == 2


def _sched_window(workers: int, wait: float, busy: float, on_cpu: float, queued: float,
                  batches_per_s: float = 100.0) -> Window:
    """A window of 1 s whose workers were each busy `busy`, on a CPU `on_cpu` and
    waiting for one `queued` of it."""
    return Window(workers, 1.0, wait, int(batches_per_s), busy * workers, on_cpu * workers, queued * workers)


def test_workers_blocked_off_a_cpu_get_one_more_than_the_cpus_and_cpu_bound_ones_do_not():
    # Busy all along, on a CPU 60 % of it: 3 such workers need 1.8 of the 2 CPUs.
    tuner = WorkerTuner(2, 2, "2 CPUs", ceiling=4)
    assert tuner.observe(_sched_window(2, wait=0.4, busy=0.98, on_cpu=0.6, queued=0.0), 1) == 3
    assert "blocked 39 % of their building time: 3 would need 1.8 of the 2 CPU(s)" in tuner.summary()
    # 3 did not make the loop faster: back to 2, and not tried again.
    assert tuner.observe(_sched_window(3, wait=0.4, busy=0.98, on_cpu=0.4, queued=0.0, batches_per_s=101), 2) == 2
    for epoch in range(3, 6):
        assert tuner.observe(_sched_window(2, wait=0.4, busy=0.98, on_cpu=0.6, queued=0.0), epoch) == 2
    assert [d["action"] for d in tuner.decisions()] == ["start", "more", "back"]
    # Building that needs a CPU all the time (on one, or waiting for one: a machine busy
    # with other work) gets no worker past the CPUs.
    for on_cpu, queued in [(0.97, 0.0), (0.5, 0.48)]:
        tuner = WorkerTuner(2, 2, "2 CPUs", ceiling=4)
        assert tuner.observe(_sched_window(2, wait=0.4, busy=0.98, on_cpu=on_cpu, queued=queued), 1) == 2
        assert "2 is the most (the 2 CPU(s) this process may use, and the workers were blocked only" \
            in tuner.summary()
    # Nor where nothing says what they did (no /proc/<pid>/schedstat).
    tuner = WorkerTuner(2, 2, "2 CPUs", ceiling=4)
    assert tuner.observe(_window(2, wait=0.4, busy=0.98), 1) == 2


def test_workers_stretched_by_waiting_for_a_cpu_are_not_taken_for_busy_ones():
    # 2 workers "busy" 60 % of the time, half of it queued behind other work on the
    # machine: 0.6 CPUs of building, which one does at 60 %. Dropped to one.
    tuner = WorkerTuner(2, 2, "2 CPUs")
    assert tuner.observe(_sched_window(2, wait=0.02, busy=0.6, on_cpu=0.3, queued=0.3), 1) == 1
    assert tuner.summary().endswith("workers busy 60 % (50 % of it waiting for a CPU): 1 keep up")
    # Without the kernel's account of it, the same workers look needed.
    tuner = WorkerTuner(2, 2, "2 CPUs")
    assert tuner.observe(_window(2, wait=0.02, busy=0.6), 1) == 2


class Sleepy:
    """Items that each wait `cost_s` off a CPU (a sleep: as a read from a slow disk)."""

    def __init__(self, n: int = 200, cost_s: float = 0.001):
        self.n, self.cost_s = n, cost_s

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        time.sleep(self.cost_s)
        return np.full(3, i, np.int64)


def test_a_source_that_blocks_gets_workers_past_the_cpus_but_never_past_two_per_cpu():
    cpus = _usable_cpus()
    with shmfeed.Loader(Sleepy(), batch_size=4, num_workers="auto", num_slots="auto") as loader:
        got = _epochs(loader, 16)
        s = loader.stats()
    counts = [d["workers"] for d in s.auto_decisions]
    assert max(counts) > cpus and max(counts) <= most_workers(cpus), s.auto_decisions
    assert "of their building time" in s.auto_decisions[1]["why"], s.auto_decisions
    assert [int(b[0, 0]) for b in got] == list(range(0, 200, 4)) * 16  # the same batches, in order


# -- the batches, across changes and resumes ----------------------------------------------
def _changing_run(loader) -> list[np.ndarray]:
    """Epoch 0 with a slow loop (the workers idle: the count goes down), epochs 1 and 2
    input-bound (the loop waits for the one worker: the count goes back up where a CPU
    is free)."""
    batches = _epochs(loader, 1, step_s=SLOW_STEP_S)
    batches += _epochs(loader, 2)
    return batches


needs_two_cpus = pytest.mark.skipif(_usable_cpus() < 2, reason="auto adds a worker only with a CPU free")
# A loop step four times a batch's build time: 2 workers each busy about 12 %, below
# BUSY_FEWER even where a loaded machine doubles the build's wall time (at twice the
# build time, 25 % read 41-59 % with 5 other jobs on 2 CPUs).
SLOW_STEP_S = 0.016


@needs_two_cpus
def test_a_change_of_worker_count_between_epochs_changes_no_batch():
    kw = dict(batch_size=4, shuffle=True, seed=7)
    source = Busy()  # 100 batches of 4 ms or more: 0.4 s for one worker
    with shmfeed.Loader(source, num_workers="auto", **kw) as loader:
        auto = _changing_run(loader)
        counts = [d["workers"] for d in loader.stats().auto_decisions]
    # Down between epochs 0 and 1 (idle workers), up again between 1 and 2 (the loop waited);
    # the verdict on 2 after the last epoch depends on what else the machine runs.
    assert counts[:3] == [2, 1, 2], counts
    with shmfeed.Loader(source, num_workers=1, **kw) as fixed:
        reference = _epochs(fixed, 3)
    assert len(auto) == len(reference) == 300
    for a, b in zip(auto, reference):
        np.testing.assert_array_equal(a, b)


@needs_two_cpus
def test_a_state_saved_after_a_change_of_worker_count_resumes_exactly_under_any_count():
    kw = dict(batch_size=4, shuffle=True, seed=3)
    with shmfeed.Loader(Busy(), num_workers=2, **kw) as fixed:
        reference = _epochs(fixed, 3)
    with shmfeed.Loader(Busy(), num_workers="auto", **kw) as loader:
        head = _epochs(loader, 1, step_s=SLOW_STEP_S)  # idle workers: one fewer from epoch 1
        head += _epochs(loader, 1, stop_after=30)  # 30 batches of epoch 1
        assert loader.stats().num_workers == 1
        state = json.loads(json.dumps(loader.state_dict()))
    for num_workers in ("auto", 1):
        with shmfeed.Loader(Busy(), num_workers=num_workers, **kw) as resumed:
            resumed.load_state_dict(state)
            tail = _epochs(resumed, 2)
        got = head + tail
        assert len(got) == len(reference)
        for a, b in zip(got, reference):
            np.testing.assert_array_equal(a, b)


@needs_two_cpus
def test_stats_say_what_auto_did_and_why_in_words_and_as_data():
    with shmfeed.Loader(Busy(), batch_size=4, num_workers="auto") as loader:
        _epochs(loader, 1, step_s=SLOW_STEP_S)  # the workers idle: the next epoch gets fewer
        s = loader.stats()
    assert s.num_workers == 1
    assert s.auto.startswith("1 worker(s) from epoch 1: the loop waited "), s.auto
    assert " of epoch 0 with 2, workers busy " in s.auto and s.auto.endswith(": 1 keep up")
    text = str(s)
    assert 'num_workers="auto": 1 worker(s) from epoch 1' in text and "(1 change(s) since the start)" in text
    d = json.loads(json.dumps(s.as_dict()))
    start, fewer = d["auto_decisions"]
    assert (start["action"], start["workers"], fewer["action"], fewer["workers"], fewer["previous"]) == \
        ("start", 2, "fewer", 1, 2)
    assert start["why"].startswith("2 usable CPU(s)")
    # Busy less than half the time, not counting the time a loaded machine kept them
    # waiting for a CPU (which stretches a build without calling for a worker more).
    work = fewer["busy_fraction"] * (1 - (fewer["queued_fraction"] or 0.0))
    assert work < 0.5 and fewer["epoch"] == 1, fewer
    assert [w["worker"] for w in d["workers"]] == [0]


def _count(i: int):
    while True:
        yield np.array([i], np.int64)
        i += 1


def _shard(s: int, num_shards: int):
    for i in range(s, 12, num_shards):
        yield np.array([i], np.int64)


def test_auto_over_a_stream_is_a_fixed_count_that_reads_each_shard_once():
    # A generator is one stream only one process can read: one worker, never more.
    with shmfeed.Loader(lambda: _count(0), batch_size=2, num_workers="auto", steps_per_epoch=3) as loader:
        got = [b.copy() for _ in range(2) for b in loader]
        assert loader.stats().num_workers == 1 and loader.stats().auto == ""
    assert np.concatenate(got).ravel().tolist() == list(range(12))
    # A Stream's shards are dealt out by the worker count: at most one worker per shard.
    with shmfeed.Loader(shmfeed.sources.Stream(_shard, num_shards=1), batch_size=2,
                        num_workers="auto") as loader:
        rows = sorted(np.concatenate([b.copy() for b in loader]).ravel().tolist())
        assert loader.stats().num_workers == 1
    assert rows == list(range(12))
