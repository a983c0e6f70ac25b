"""Exact mid-epoch resume (issue 10): `state_dict()` / `load_state_dict()`.

A resumed loader must continue with exactly the batch after the last one the loop
received, bit-identical (samples and their random draws) to an uninterrupted run, and
the epochs after it too; with another `num_workers`, another host count at the same
global batch size; without building the batches it skips; and refuse a state that
does not fit, naming the field."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _sources import Augmenting, DataGenerator, Stamped

import shmfeed


def _flat(batch) -> bytes:
    leaves = batch if isinstance(batch, (tuple, list)) else list(batch.values()) if isinstance(batch, dict) else [batch]
    return b"".join(np.ascontiguousarray(x).tobytes() for x in leaves)


def _run(loader, epochs: int) -> list[list[bytes]]:
    return [[_flat(b) for b in loader] for _ in range(epochs)]


def _roundtrip(state: dict) -> dict:
    return json.loads(json.dumps(state))  # what a checkpoint writer would store


@pytest.mark.parametrize(("before", "after"), [(0, 3), (2, 0), (2, 1)])
def test_resume_mid_epoch_is_bit_identical_with_another_worker_count(before, after):
    kw = dict(batch_size=4, shuffle=True, seed=7)
    with shmfeed.Loader(Augmenting(45), num_workers=0, **kw) as ref:
        reference = _run(ref, 3)
    with shmfeed.Loader(Augmenting(45), num_workers=before, **kw) as first:
        for _ in first:  # epoch 0, whole
            pass
        got = []
        for i, b in enumerate(first):  # epoch 1: stop after 5 batches
            got.append(_flat(b))
            if i == 4:
                state = first.state_dict()
                break
    assert (state["epoch"], state["next_batch"]) == (1, 5)
    with shmfeed.Loader(Augmenting(45), num_workers=after, **kw) as second:
        second.load_state_dict(_roundtrip(state))
        got += [_flat(b) for b in second]
        assert got == reference[1]
        assert [_flat(b) for b in second] == reference[2]


def test_state_between_epochs_and_before_any_batch():
    with shmfeed.Loader(Augmenting(20), batch_size=4, num_workers=0, shuffle=True) as loader:
        assert (loader.state_dict()["epoch"], loader.state_dict()["next_batch"]) == (0, 0)
        for _ in loader:
            pass
        state = loader.state_dict()
        assert (state["epoch"], state["next_batch"]) == (1, 0)
        after = _run(loader, 1)
    with shmfeed.Loader(Augmenting(20), batch_size=4, num_workers=0, shuffle=True) as other:
        other.load_state_dict(state)
        assert _run(other, 1) == after


class CountingCalls:
    """Counts __getitem__ calls in this process (num_workers=0 builds here)."""

    calls = 0

    def __len__(self):
        return 10_000

    def __getitem__(self, i):
        CountingCalls.calls += 1
        return np.int64(i)


def test_resume_builds_nothing_to_skip():
    with shmfeed.Loader(CountingCalls(), batch_size=4, num_workers=0, shuffle=True) as loader:
        state = loader.state_dict()
        state["next_batch"] = len(loader) - 1
        loader.load_state_dict(state)
        CountingCalls.calls = 0
        assert len(list(loader)) == 1
        assert CountingCalls.calls == 4


@pytest.mark.parametrize(("field", "change"), [
    ("seed", dict(seed=8)),
    ("global_batch_size", dict(batch_size=5)),
    ("shuffle", dict(shuffle=False)),
    ("drop_last", dict(drop_last=True)),
    ("n_items", dict(n=44)),
])
def test_state_of_another_stream_is_refused_naming_the_field(field, change):
    kw = dict(batch_size=4, shuffle=True, seed=7, drop_last=False)
    with shmfeed.Loader(Augmenting(45), num_workers=0, **kw) as loader:
        state = loader.state_dict()
    n = change.pop("n", 45)
    kw.update(change)
    with shmfeed.Loader(Augmenting(n), num_workers=0, **kw) as other:
        with pytest.raises(shmfeed.SpecError, match=f"saved with {field}="):
            other.load_state_dict(state)


def test_malformed_state_is_refused():
    with shmfeed.Loader(Augmenting(45), batch_size=4, num_workers=0) as loader:
        state = loader.state_dict()
        for bad, pattern in (([1, 2], "is a dict"), ({"epoch": 1}, "lacks"),
                             ({**state, "format": 99}, "format 99"),
                             ({**state, "next_batch": 999}, "past the epoch"),
                             ({**state, "epoch": -1}, "`epoch` must be")):
            with pytest.raises(shmfeed.SpecError, match=pattern):
                loader.load_state_dict(bad)


def test_resume_across_host_counts_at_the_same_global_batch_size():
    """Two hosts of batch 4 stop after global batch 3; one host of batch 8 resumes
    and its batches are the two hosts' rows, concatenated, as before.  (Draws from
    shmfeed.rng() are keyed per sample, so they follow; the legacy global RNGs are
    keyed per batch, the same for any number of workers but not of hosts.)"""
    n, kw = 64, dict(shuffle=True, seed=2, drop_last=True)
    hosts = []
    for h in range(2):
        with shmfeed.Loader(Stamped(n, (3,)), batch_size=4, num_workers=0, shard_index=h,
                            shard_count=2, **kw) as loader:
            hosts.append([(np.array(b["x"]), np.array(b["id"])) for b in loader])
            for i, _ in enumerate(loader):
                if i == 2:
                    state = loader.state_dict()
                    break
    assert (state["epoch"], state["next_batch"]) == (1, 3)
    with shmfeed.Loader(Stamped(n, (3,)), batch_size=8, num_workers=0, **kw) as single:
        whole = [(np.array(b["x"]), np.array(b["id"])) for b in single]
        for g, b in enumerate(whole):
            for leaf in range(2):
                assert np.array_equal(b[leaf], np.concatenate([hosts[0][g][leaf], hosts[1][g][leaf]]))
        single.load_state_dict(state)
        rest = [_flat(b) for b in single]
    with shmfeed.Loader(Stamped(n, (3,)), batch_size=8, num_workers=0, **kw) as fresh:
        for _ in fresh:
            pass
        assert rest == [_flat(b) for b in fresh][3:]


def _generator(seed: int = 0) -> DataGenerator:
    np.random.seed(seed)
    return DataGenerator(list(range(40)), {i: i % 5 for i in range(40)}, batch_size=4)


def test_keras_sequence_with_reshuffling_on_epoch_end_resumes_to_the_same_batches():
    """The tutorial generator reshuffles its indexes with np.random in on_epoch_end:
    the state carries the generator's indexes; the script restores np.random, as it
    would for an uninterrupted continuation."""
    with shmfeed.Loader(_generator(), batch_size=None, num_workers=2) as loader:
        reference = _run(loader, 3)
    with shmfeed.Loader(_generator(), batch_size=None, num_workers=2) as loader:
        got = _run(loader, 1)
        part = []
        for i, b in enumerate(loader):
            part.append(_flat(b))
            if i == 3:
                state = _roundtrip(loader.state_dict())
                rng_state = np.random.get_state()
                break
    got.append(part)
    source = _generator(seed=99)  # a fresh process: another shuffle before the state
    with shmfeed.Loader(source, batch_size=None, num_workers=1) as resumed:
        np.random.set_state(rng_state)
        resumed.load_state_dict(state)
        got[1] += [_flat(b) for b in resumed]
        got += _run(resumed, 1)
    assert got == reference


def test_sequence_state_taken_after_the_last_batch_runs_on_epoch_end_once():
    with shmfeed.Loader(_generator(), batch_size=None, num_workers=0) as loader:
        reference = _run(loader, 2)
    with shmfeed.Loader(_generator(), batch_size=None, num_workers=0) as loader:
        got = []
        it = iter(loader)
        for _ in range(len(loader)):
            got.append(_flat(next(it)))
        state = loader.state_dict()  # inside the loop body of the last batch
        rng_state = np.random.get_state()
        del it
    assert state["next_batch"] == len(reference[0])
    with shmfeed.Loader(_generator(seed=5), batch_size=None, num_workers=0) as resumed:
        np.random.set_state(rng_state)
        resumed.load_state_dict(state)
        assert [got, _run(resumed, 1)[0]] == reference


class HookedWithLock:
    """A batch-level source with an epoch hook and an attribute that cannot be pickled."""

    def __init__(self):
        import threading

        self.lock = threading.Lock()

    def __len__(self):
        return 4

    def __getitem__(self, b):
        return np.full((2, 3), b, np.int32)

    def on_epoch_end(self):
        pass


def test_state_of_a_hooked_source_that_cannot_be_pickled_names_the_attribute():
    with shmfeed.Loader(HookedWithLock(), batch_size=None, num_workers=0) as loader:
        next(iter(loader))
        with pytest.raises(shmfeed.SpecError, match=r"`source\.lock` \(lock\) cannot be pickled"):
            loader.state_dict()
