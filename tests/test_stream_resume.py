"""Streams resume (issue 28): `state_dict()` of a loader over a `Stream` and
`load_state_dict()` continue mid-epoch with exactly the batches an uninterrupted run
delivers, for any `num_workers`, skipping the shards that had ended; a `make` with a
`start` parameter is asked to start there (nothing delivered is read again), others
are replayed up to where they stopped."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import shmfeed
from shmfeed.sources import Stream

SHARDS = 5
BATCH = 3
LENGTHS = [7, 0, 3, 11, 6]  # unequal, one empty: shards end at different batches


def records(s, num_shards, start=0):
    for i in range(start, LENGTHS[s]):
        yield {"s": s, "i": i, "noise": shmfeed.rng().integers(1 << 30)}


def replayed(s, num_shards):
    """`records` without `start`: a resume replays it."""
    return records(s, num_shards)


class Logged:
    """`records`, logging each (shard, position) read to `log` (one line per sample;
    appends from several processes are whole lines); `seek`: takes `start`."""

    def __init__(self, log: Path, seek: bool):
        self.log, self.seek = str(log), seek

    def __call__(self, s, num_shards, start=0):
        for i, item in enumerate(records(s, num_shards, start), start):
            with open(self.log, "a") as f:
                f.write(f"{s} {i}\n")
            yield item


def seeking(log: Path):
    m = Logged(log, True)
    return lambda s, n, start=0: m(s, n, start)


def replaying(log: Path):
    m = Logged(log, False)
    return lambda s, n: m(s, n)  # no `start`: replayed


def _rows(batch) -> list[tuple]:
    return [(int(s), int(i), int(x)) for s, i, x in zip(batch["s"], batch["i"], batch["noise"])]


def _epochs(loader, n: int) -> list[list]:
    return [[_rows(b) for b in loader] for _ in range(n)]


@pytest.mark.parametrize("make", [records, replayed])
@pytest.mark.parametrize(("before", "after", "k"), [(2, 0, 4), (0, 2, 5), (1, 2, 6), (2, 1, 1)])
def test_stream_resumes_mid_epoch_with_the_batches_of_an_uninterrupted_run(make, before, after, k):
    kw = dict(batch_size=BATCH, seed=9)
    with shmfeed.Loader(Stream(make, SHARDS), num_workers=0, **kw) as ref:
        reference = _epochs(ref, 2)
    with shmfeed.Loader(Stream(make, SHARDS), num_workers=before, **kw) as first:
        for _ in first:
            pass
        got = []
        for i, b in enumerate(first):
            got.append(_rows(b))
            if i == k - 1:
                state = json.loads(json.dumps(first.state_dict()))
                break
    assert state["epoch"] == 1
    with shmfeed.Loader(Stream(make, SHARDS), num_workers=after, **kw) as second:
        second.load_state_dict(state)
        got += [_rows(b) for b in second]
        assert got == reference[1]
    rows = [r for batch in got for r in batch]
    assert sorted((s, i) for s, i, _ in rows) == sorted((s, i) for s in range(SHARDS) for i in range(LENGTHS[s]))


def test_stream_state_after_shards_ended_skips_them_on_resume():
    """After 6 batches, shards 2 (3 samples) and 0 (7) have ended: the state says so,
    and the resumed epoch has only the batches of shards 3 and 4."""
    kw = dict(batch_size=BATCH, seed=1)
    with shmfeed.Loader(Stream(records, SHARDS), num_workers=0, **kw) as ref:
        reference = _epochs(ref, 1)[0]
    with shmfeed.Loader(Stream(records, SHARDS), num_workers=2, **kw) as first:
        got = []
        for i, b in enumerate(first):
            got.append(_rows(b))
            if i == 6:
                state = json.loads(json.dumps(first.state_dict()))
                break
    assert {s for s, _ in state["stream"]["ended"]} >= {1, 2}
    with shmfeed.Loader(Stream(records, SHARDS), num_workers=2, **kw) as second:
        second.load_state_dict(state)
        rest = [_rows(b) for b in second]
    assert got + rest == reference
    assert {r[0] for batch in rest for r in batch} <= {0, 3, 4}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_make_that_takes_start_is_not_read_again_from_the_beginning(tmp_path, num_workers):
    kw = dict(batch_size=BATCH, seed=2)
    before, after = tmp_path / "before.log", tmp_path / "after.log"
    with shmfeed.Loader(Stream(seeking(before), SHARDS), num_workers=0, **kw) as first:
        got = []
        for i, b in enumerate(first):
            got.append(_rows(b))
            if i == 4:
                state = first.state_dict()
                break
    delivered = {(s, i) for batch in got for s, i, _ in batch}
    with shmfeed.Loader(Stream(seeking(after), SHARDS), num_workers=num_workers, **kw) as second:
        after.write_text("")  # what construction read (the spec's first sample, a shard check)
        second.load_state_dict(state)
        rest = [_rows(b) for b in second]
    read_again = {tuple(map(int, line.split())) for line in after.read_text().split("\n") if line}
    assert not read_again & delivered
    with shmfeed.Loader(Stream(records, SHARDS), num_workers=0, **kw) as ref:
        assert got + rest == _epochs(ref, 1)[0]


def test_a_make_without_start_is_replayed_to_where_it_stopped(tmp_path):
    kw = dict(batch_size=BATCH, seed=2)
    with shmfeed.Loader(Stream(replaying(tmp_path / "a.log"), SHARDS), num_workers=0, **kw) as first:
        for i, _ in enumerate(first):
            if i == 4:
                state = first.state_dict()
                break
    log = tmp_path / "b.log"
    with shmfeed.Loader(Stream(replaying(log), SHARDS), num_workers=1, **kw) as second:
        log.write_text("")  # what construction read
        second.load_state_dict(state)
        for _ in second:
            pass
    assert "0 0\n" in log.read_text()  # shard 0 was read again from its start


def test_a_stream_state_of_other_shards_or_hosts_is_refused_naming_the_field():
    with shmfeed.Loader(Stream(records, SHARDS), batch_size=BATCH, num_workers=0) as first:
        next(iter(first))
        state = first.state_dict()
    with shmfeed.Loader(Stream(lambda s, n: records(s, SHARDS), 6), batch_size=BATCH, num_workers=0) as other:
        with pytest.raises(shmfeed.SpecError, match=r"num_shards=5 \(`stream.num_shards`\), this loader has "
                                                   r"num_shards=6"):
            other.load_state_dict(state)
    bad = {**state, "stream": {**state["stream"], "ended": [[0, 99]]}}
    with shmfeed.Loader(Stream(records, SHARDS), batch_size=BATCH, num_workers=0) as again:
        with pytest.raises(shmfeed.SpecError, match=r"`stream.ended` has \[0, 99\]"):
            again.load_state_dict(bad)


class DiesOnceSeeking:
    """A seekable `records` whose reader of item `at` of `shard` dies, the first time."""

    def __init__(self, marker: Path, shard: int, at: int):
        self.marker, self.shard, self.at = str(marker), shard, at

    def __call__(self, s, num_shards, start=0):
        for i, item in enumerate(records(s, num_shards, start), start):
            if (s, i) == (self.shard, self.at) and not os.path.exists(self.marker):
                Path(self.marker).write_text(str(os.getpid()))
                os._exit(3)
            yield item


def test_a_worker_killed_mid_shard_is_replaced_by_one_that_seeks(tmp_path):
    kw = dict(batch_size=BATCH, seed=5)
    with shmfeed.Loader(Stream(records, SHARDS), num_workers=0, **kw) as ref:
        reference = _epochs(ref, 1)[0]
    with shmfeed.Loader(Stream(DiesOnceSeeking(tmp_path / "died", 3, 7), SHARDS), num_workers=2, **kw) as loader:
        assert _epochs(loader, 1)[0] == reference
        assert loader.stats().restarts == 1
