"""Sharded streams (issue 15.1): `shmfeed.sources.Stream(make, num_shards)` gives the
same stream for any `num_workers` (round-robin over the shards still running, each
batch from one shard), every sample exactly once per epoch, shards of unequal length,
hosts splitting the shards, and a worker that dies mid-shard replaced without a
sample lost or repeated."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

import shmfeed
from shmfeed.sources import Stream

SHARDS = 5
BATCH = 3


def shard_length(s: int) -> int:
    return [7, 0, 3, 11, 6][s]  # unequal, one empty, some not a multiple of BATCH


# -- make functions (module level: a spawned pool unpickles them) -------------------------
def records(s, num_shards):
    """Shard s: its items i with a draw of shmfeed.rng() (keyed by seed, epoch, shard, i)."""
    assert num_shards == SHARDS
    for i in range(shard_length(s)):
        yield {"s": s, "i": i, "x": np.full(2, 100 * s + i, np.int32),
               "noise": shmfeed.rng().integers(1 << 30)}


class DiesOnce:
    """`records`, but the worker reading item `at` of shard `shard` dies, the first time."""

    def __init__(self, marker: Path, shard: int, at: int):
        self.marker, self.shard, self.at = str(marker), shard, at

    def __call__(self, s, num_shards):
        for i, item in enumerate(records(s, num_shards)):
            if (s, i) == (self.shard, self.at) and not os.path.exists(self.marker):
                Path(self.marker).write_text(str(os.getpid()))
                os._exit(3)
            yield item


def raising(s, num_shards):
    yield from records(s, num_shards) if s != 3 else _raise_after(records(s, num_shards), 4)


def _raise_after(items, n):
    for i, item in enumerate(items):
        if i == n:
            raise ValueError(f"bad record {i}")
        yield item


def _epochs(loader, n):
    out = []
    for _ in range(n):
        out.append([(b["s"].tolist(), b["i"].tolist(), b["x"][:, 0].tolist(), b["noise"].tolist())
                    for b in loader])
    return out


def _expected_order(shards=range(SHARDS), drop_last=False):
    """(shard, first item, rows) of each batch: round-robin over the shards still running."""
    out, k = [], 0
    while True:
        round_ = [(s, k * BATCH, min(BATCH, shard_length(s) - k * BATCH)) for s in shards
                  if shard_length(s) > k * BATCH]
        round_ = [r for r in round_ if r[2] == BATCH or not drop_last]
        if not any(shard_length(s) > k * BATCH for s in shards):
            return out
        out += round_
        k += 1


@pytest.fixture(scope="module")
def reference():
    with shmfeed.Loader(Stream(records, num_shards=SHARDS), batch_size=BATCH, num_workers=0, seed=4) as loader:
        return _epochs(loader, 2)


def test_round_robin_over_running_shards_every_sample_once(reference):
    for epoch in reference:
        got = [(s[0], i[0], len(s)) for s, i, _, _ in epoch]
        assert got == _expected_order()
        for s, i, x, _ in epoch:
            assert len(set(s)) == 1 and i == list(range(i[0], i[0] + len(i)))  # one shard, consecutive
            assert x == [100 * s[0] + k for k in i]
        items = sorted((s, i) for ss, ii, _, _ in epoch for s, i in zip(ss, ii))
        assert items == sorted((s, i) for s in range(SHARDS) for i in range(shard_length(s)))
    noise = [[n for *_, ns in epoch for n in ns] for epoch in reference]
    assert noise[0] != noise[1] and len(set(noise[0])) == len(noise[0])  # keyed per epoch and item


@pytest.mark.parametrize("num_workers", [1, 2, 3])
def test_the_stream_is_the_same_for_any_num_workers(reference, num_workers):
    with shmfeed.Loader(Stream(records, num_shards=SHARDS), batch_size=BATCH, num_workers=num_workers,
                        seed=4) as loader:
        assert _epochs(loader, 2) == reference


def test_a_worker_that_dies_mid_shard_is_replaced_and_the_shard_re_read(reference, tmp_path, capfd):
    marker = tmp_path / "died"
    with shmfeed.Loader(Stream(DiesOnce(marker, 3, 7), num_shards=SHARDS), batch_size=BATCH,
                        num_workers=2, seed=4) as loader:
        got = _epochs(loader, 2)
        assert loader.stats().restarts == 1
    assert marker.exists() and got == reference  # nothing lost, nothing repeated
    assert "replacing it" in capfd.readouterr().err


def test_a_spawned_pool_gives_the_same_stream(reference):
    with shmfeed.Loader(Stream(records, num_shards=SHARDS), batch_size=BATCH, num_workers=2, seed=4,
                        start_method="spawn") as loader:
        assert _epochs(loader, 2) == reference


@pytest.mark.parametrize("num_workers", [0, 2])
def test_hosts_split_the_shards(num_workers):
    seen = []
    for host in range(2):
        with shmfeed.Loader(Stream(records, num_shards=SHARDS), batch_size=BATCH, num_workers=num_workers,
                            shard_index=host, shard_count=2) as loader:
            batches = [(b["s"].tolist(), b["i"].tolist()) for b in loader]
        assert [(s[0], i[0], len(s)) for s, i in batches] == _expected_order(range(host, SHARDS, 2))
        seen += [(s, i) for ss, ii in batches for s, i in zip(ss, ii)]
    assert sorted(seen) == sorted((s, i) for s in range(SHARDS) for i in range(shard_length(s)))


def test_drop_last_drops_each_shards_short_batch():
    with shmfeed.Loader(Stream(records, num_shards=SHARDS), batch_size=BATCH, num_workers=2,
                        drop_last=True) as loader:
        got = [(b["s"][0], b["i"][0], len(b["s"])) for b in loader]
    assert got == _expected_order(drop_last=True)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_error_in_make_arrives_in_batch_order_and_the_next_epoch_is_whole(num_workers):
    order = _expected_order()
    bad = order.index((3, 3, BATCH))  # the batch holding item 4 of shard 3
    with shmfeed.Loader(Stream(raising, num_shards=SHARDS), batch_size=BATCH, num_workers=num_workers) as loader:
        got = []
        with pytest.raises(shmfeed.WorkerError, match=r"raised ValueError: bad record 4") as info:
            for b in loader:
                got.append((b["s"][0], b["i"][0], len(b["s"])))
        assert got == order[:bad]
        assert isinstance(info.value.__cause__, ValueError)


def test_leaving_an_epoch_early_then_the_next_is_whole(reference):
    with shmfeed.Loader(Stream(records, num_shards=SHARDS), batch_size=BATCH, num_workers=2, seed=4) as loader:
        for k, _ in enumerate(loader):
            if k == 2:
                break
        assert _epochs(loader, 1) == reference[1:]


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(batch_size=3, num_workers=5), r"`num_workers=5` is more than the 4 shard\(s\) this host reads"),
    (dict(batch_size=None, num_workers=1), r"a Stream yields samples: give `batch_size`"),
    (dict(batch_size=3, num_workers=1, shuffle=True), r"`shuffle=True` cannot reorder a Stream"),
    (dict(batch_size=3, num_workers=1, steps_per_epoch=4), r"`steps_per_epoch` is for generators"),
    (dict(batch_size=3, num_workers=1, shard_index=5, shard_count=6), r"host 5 of `shard_count=6` gets none"),
])
def test_bad_stream_arguments_are_spec_errors(kwargs, pattern):
    with pytest.raises(shmfeed.SpecError, match=pattern):
        shmfeed.Loader(Stream(records, num_shards=4 if "num_workers" in kwargs and kwargs["num_workers"] == 5
                              else SHARDS), **kwargs)


def test_bad_stream_definitions_are_spec_errors():
    with pytest.raises(shmfeed.SpecError, match=r"`make` must be a function make\(shard_index, num_shards\)"):
        Stream([1, 2], num_shards=2)
    with pytest.raises(shmfeed.SpecError, match=r"`num_shards` must be an integer >= 1, got 0"):
        Stream(records, num_shards=0)
    with pytest.raises(shmfeed.SpecError, match=r"every shard .* is empty"):
        shmfeed.Loader(Stream(lambda s, n: iter(()), num_shards=3), batch_size=2, num_workers=0)


def test_length_is_unknown_until_the_shards_are_read():
    with shmfeed.Loader(Stream(records, num_shards=SHARDS), batch_size=BATCH, num_workers=0) as loader:
        with pytest.raises(TypeError, match=r"known only once its shards are read"):
            len(loader)
        assert "batches=?" in repr(loader)


@pytest.mark.parametrize("victim", [0, 1])
def test_a_worker_killed_while_the_loop_works_is_replaced_exactly_once(reference, victim):
    with shmfeed.Loader(Stream(records, num_shards=SHARDS), batch_size=BATCH, num_workers=2, seed=4,
                        num_slots=3) as loader:
        got = []
        for k, b in enumerate(loader):
            got.append((b["s"].tolist(), b["i"].tolist(), b["x"][:, 0].tolist(), b["noise"].tolist()))
            if k == 3:
                pid = loader.worker_pids[victim]
                os.kill(pid, signal.SIGKILL)
                time.sleep(0.3)  # replaced meanwhile; its slots wait for it
        assert loader.stats().restarts == 1
        assert [got] == reference[:1]


def bad_shape(s, num_shards):
    for item in records(s, num_shards):
        if (s, item["i"]) == (3, 4):
            item["x"] = np.zeros(3, np.int32)
        yield item


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_bad_sample_names_its_position_and_shard(num_workers):
    with shmfeed.Loader(Stream(bad_shape, num_shards=SHARDS), batch_size=BATCH, num_workers=num_workers) as loader:
        with pytest.raises(shmfeed.SpecError, match=r"sample 4 of shard 3, field \['x'\]: got shape \(3,\), "
                           r"expected dtype int32 with shape \(2,\)"):
            for _ in loader:
                pass


# -- a `make` that breaks its contract ---------------------------------------------------
LONG = 12  # samples per shard of the contract tests: 4 batches of BATCH


def reshuffled_per_process(s, num_shards):
    """Shard s, in an order drawn from an unseeded RNG (here: the reading process's
    pid): a replacement worker re-reads other samples than its predecessor delivered."""
    order = np.random.default_rng(os.getpid()).permutation(LONG)
    for i in order:
        yield {"s": s, "i": int(i), "x": np.full(2, 100 * s + int(i), np.int32)}


def whole_stream(s, num_shards):
    """Ignores its shard index: every shard is the whole stream."""
    for i in range(LONG):
        yield {"i": i, "x": np.full(2, i, np.int32)}


def steady(s, num_shards):
    for i in range(LONG):
        yield {"s": s, "i": i, "x": np.full(2, 100 * s + i, np.int32)}


@pytest.mark.parametrize("make", [reshuffled_per_process, steady])
def test_a_make_that_gives_other_samples_when_called_again_is_caught_after_a_kill(make):
    """A replacement re-reads its shards up to where its predecessor stopped: with a
    `make` that reshuffles per process it used to lose and repeat samples silently."""
    with shmfeed.Loader(Stream(make, num_shards=4), batch_size=BATCH, num_workers=2, num_slots=3) as loader:
        got, error = [], None
        try:
            for k, b in enumerate(loader):
                got += list(zip(b["s"].tolist(), b["i"].tolist()))
                if k == 5:
                    os.kill(loader.worker_pids[0], signal.SIGKILL)
        except shmfeed.SpecError as exc:
            error = exc
        assert loader.stats().restarts == 1
    if make is steady:
        assert error is None and sorted(got) == [(s, i) for s in range(4) for i in range(LONG)]
    else:
        assert error is not None and "gave other samples when called again" in str(error)
        assert len(set(got)) == len(got)  # nothing repeated before the error


def test_a_make_that_ignores_its_shard_index_is_refused():
    with pytest.raises(shmfeed.SpecError, match=r"ignore `shard_index`.*come 4 times per epoch"):
        shmfeed.Loader(Stream(whole_stream, num_shards=4), batch_size=BATCH, num_workers=2)


def raising_at_7_of_2(s, num_shards):
    for item in steady(s, num_shards):
        if (s, item["i"]) == (2, 7):
            raise ValueError("bad record")
        yield item


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_error_in_a_shard_names_the_sample_and_shard_not_an_internal_key(num_workers):
    with shmfeed.Loader(Stream(raising_at_7_of_2, num_shards=4), batch_size=BATCH,
                        num_workers=num_workers) as loader:
        with pytest.raises(shmfeed.WorkerError, match=r"at sample 7 of shard 2\.") as info:
            for _ in loader:
                pass
    assert "index" not in str(info.value).split("Worker traceback")[0]
