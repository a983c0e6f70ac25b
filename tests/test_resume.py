"""Exact mid-epoch resume (issue 10): `state_dict()` / `load_state_dict()`.

A resumed loader must continue with exactly the batch after the last one the loop
received, bit-identical (samples and their random draws) to an uninterrupted run, and
the epochs after it too; with another `num_workers`, another host count at the same
global batch size; without building the batches it skips; and refuse a state that
does not fit, naming the field."""

from __future__ import annotations

import base64
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from _sources import Augmenting, DataGenerator, Stamped
from hypothesis import given, settings
from hypothesis import strategies as st

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


def test_state_of_a_hooked_source_that_is_not_data_names_the_attribute():
    with shmfeed.Loader(HookedWithLock(), batch_size=None, num_workers=0) as loader:
        next(iter(loader))
        with pytest.raises(shmfeed.SpecError, match=r"`source\.lock` \(lock\) cannot be written"):
            loader.state_dict()


class _Attributes:
    """A hooked batch-level source whose attributes are every kind a state writes."""

    def __init__(self):
        self.things = {"ints": [1, 2], (3, "a"): (np.float32(0.5), None, True, "text"), 7: 2.5}
        self.table = np.arange(12, dtype=np.uint16).reshape(3, 4)
        self.empty = np.zeros((0, 3), "<U4")
        self.folder = Path("/data/shards")

    def __len__(self):
        return 2

    def __getitem__(self, b):
        return np.full((2,), b, np.int32)

    def on_epoch_end(self):
        self.table = self.table[::-1] + 1


def test_source_attributes_of_every_kind_round_trip_through_json():
    with shmfeed.Loader(_Attributes(), batch_size=None, num_workers=0) as loader:
        _run(loader, 2)
        state = _roundtrip(loader.state_dict())
        source = loader._source
        saved = (source.things, source.table.copy(), source.empty)
    with shmfeed.Loader(_Attributes(), batch_size=None, num_workers=0) as other:
        other.load_state_dict(state)
        got = other._source
        assert got.things == saved[0] and type(got.things[(3, "a")][0]) is np.float32
        assert got.table.dtype == np.uint16 and (got.table == saved[1]).all()
        assert got.empty.shape == (0, 3) and got.empty.dtype == saved[2].dtype
        assert got.folder == Path("/data/shards")
        got.table += 1  # writable, as the source had it


class _Payload:
    """What an attacker pickles: loading it creates `path` (any code could run)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_an_edited_checkpoint_with_a_pickle_payload_runs_no_code(tmp_path):
    marker = str(tmp_path / "ran")
    payload = base64.b64encode(pickle.dumps(_Payload(marker))).decode("ascii")
    with shmfeed.Loader(_generator(), batch_size=None, num_workers=0) as loader:
        state = _roundtrip(loader.state_dict())
        raw = base64.b64encode(pickle.dumps(_Payload(marker))).decode("ascii")
        attributes = state["source"]["attributes"]
        for source in (payload,  # what shmfeed itself wrote there before
                       {"attributes": {**attributes, "indexes": {"ndarray": {"dtype": "|O", "shape": [1],
                                                                             "data": raw}}}},
                       {"attributes": {**attributes, "indexes": {"scalar": {"dtype": "O", "data": raw}}}}):
            with pytest.raises(shmfeed.SpecError, match="`source"):
                loader.load_state_dict({**state, "source": source})
            assert not os.path.exists(marker)
        loader.load_state_dict({**state, "source": {"attributes": {**attributes, "note": payload}}})
        assert loader._source.note == payload and not os.path.exists(marker)  # a string stays one


def test_numpy_integers_are_taken_where_a_state_has_ints():
    with shmfeed.Loader(Augmenting(45), batch_size=4, num_workers=0) as loader:
        state = loader.state_dict()
        loader.load_state_dict({**state, "format": np.int64(1), "epoch": np.int64(2),
                                "next_batch": np.int32(3),
                                "fingerprint": {k: np.int64(v) if type(v) is int else v
                                                for k, v in state["fingerprint"].items()}})
        assert (loader.epoch, loader.state_dict()["next_batch"]) == (2, 3)


def _paths(node, path=()):
    """Every place in a state, as the keys or indexes that lead there."""
    yield path
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        if len(path) < 7 and not (isinstance(key, int) and key > 2):  # a few list items are enough
            yield from _paths(child, path + (key,))


_ODD = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True), st.text(max_size=8),
    st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.integers(-5, 5).map(np.int64), st.just(np.arange(3)), st.just({"tuple": 5}), st.just({"dict": [[1]]}),
    st.just({"ndarray": {"dtype": "<i8", "shape": [2**62, 2**62], "data": ""}}),
    st.just({"ndarray": {"dtype": "V0", "shape": [1], "data": ""}}),
    st.just({"ndarray": {"dtype": "<i8", "shape": [1], "data": "!!"}}),
    st.just({"scalar": {"dtype": "(2,)i4", "data": "AAAAAAAAAAA="}}),
    st.sampled_from(["DELETE"]))


def _edit(state, path, value):
    node = state = json.loads(json.dumps(state))
    for key in path[:-1]:
        node = node[key]
    delete = isinstance(value, str) and value == "DELETE"
    if delete and isinstance(node, dict):
        del node[path[-1]]
    elif not delete:
        node[path[-1]] = value
    return state


@pytest.fixture(scope="module")
def hooked_state():
    with shmfeed.Loader(_generator(), batch_size=None, num_workers=0) as loader:
        _run(loader, 1)
        next(iter(loader))
        return _roundtrip(loader.state_dict())


# 100 odd states in the default tier, 300 in `integration`.
@pytest.mark.parametrize("n_examples", [100, pytest.param(300, marks=pytest.mark.integration)])
def test_a_malformed_state_is_a_shmfeed_error_naming_the_field(hooked_state, n_examples):
    """Any field of a real state (the tutorial generator's, with its source attributes),
    replaced by an odd value or deleted: the state loads, or the error is shmfeed's and
    names the field; never another exception, never a half-restored source."""
    settings(max_examples=n_examples, deadline=None)(given(data=st.data())(
        lambda data: _load_a_malformed_state(hooked_state, data)))()


def _load_a_malformed_state(hooked_state, data):
    path = data.draw(st.sampled_from([p for p in _paths(hooked_state) if p]))
    value = data.draw(_ODD)
    state = _edit(hooked_state, path, value)
    with shmfeed.Loader(_generator(), batch_size=None, num_workers=0) as loader:
        before = dict(vars(loader._source))
        try:
            loader.load_state_dict(state)
        except shmfeed.ShmfeedError as exc:
            named = path[0]
            if path[0] == "fingerprint" and len(path) > 1:
                named = path[1]
            elif path[:2] == ("source", "attributes") and len(path) > 2:
                named = f"source.attributes.{path[2]}"
            assert str(named) in str(exc), (path, value, str(exc))
            assert vars(loader._source).keys() == before.keys()
            assert all(vars(loader._source)[k] is v for k, v in before.items())
