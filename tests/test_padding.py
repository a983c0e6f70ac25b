"""Variable-size samples (issue 14): `padded_shapes` / `padding_values` / `with_lengths`.

A padded field's row holds the sample at its start and the padding value everywhere
else, the same with any `num_workers`; a sample that does not fit is a SpecError
naming the sample, the field and both shapes, raised in batch order."""

from __future__ import annotations

import numpy as np
import pytest
from _sources import ShiftingTokens, TokenBatches, Tokens, token_generator, token_records
from _trees import copy_tree
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shmfeed
from shmfeed import SpecError, WorkerError
from shmfeed.sources import Stream


def _expected_row(i: int, width: int, pad) -> np.ndarray:
    n = Tokens(1).length(i)
    row = np.full(width, pad, np.int32)
    row[:n] = np.arange(i, i + n)
    return row


@pytest.mark.parametrize("num_workers", [0, 2])
def test_padded_values_pad_values_and_lengths_are_exact(num_workers):
    src = Tokens(50)
    with shmfeed.Loader(src, batch_size=8, num_workers=num_workers, shuffle=True, seed=3,
                        padded_shapes={"tokens": (48,)}, padding_values={"tokens": -7},
                        with_lengths=True) as loader:
        seen = []
        for batch in loader:
            assert batch["tokens"].shape == (len(batch["label"]), 48)
            assert batch["lengths"]["tokens"].dtype == np.int32
            for row, i in enumerate(batch["label"].tolist()):
                np.testing.assert_array_equal(batch["tokens"][row], _expected_row(i, 48, -7))
                assert batch["lengths"]["tokens"][row] == src.length(i)
            seen += batch["label"].tolist()
    assert sorted(seen) == list(range(50))


def test_zero_and_two_workers_give_the_same_batches():
    kw = dict(batch_size=6, shuffle=True, seed=11, padded_shapes={"tokens": (40,)}, with_lengths=True)
    runs = []
    for num_workers in (0, 2):
        with shmfeed.Loader(Tokens(40), num_workers=num_workers, **kw) as loader:
            runs.append([copy_tree(b) for _ in range(2) for b in loader])
    assert len(runs[0]) == len(runs[1]) == 14
    for a, b in zip(*runs):
        for key in ("tokens", "label"):
            np.testing.assert_array_equal(a[key], b[key])
        np.testing.assert_array_equal(a["lengths"]["tokens"], b["lengths"]["tokens"])


def test_first_sample_may_be_the_shortest_and_unpadded_fields_keep_their_shape():
    class Growing:
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return (np.ones((i + 1, 2), np.float32), np.arange(3, dtype=np.uint8))

    with shmfeed.Loader(Growing(), batch_size=5, num_workers=0,
                        padded_shapes=((5, 2), None), padding_values=(np.nan, None)) as loader:
        (x, y), = list(loader)
    assert x.shape == (5, 5, 2) and y.shape == (5, 3)
    for i in range(5):
        assert (x[i, : i + 1] == 1).all() and np.isnan(x[i, i + 1 :]).all()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_sample_larger_than_its_padded_shape_is_raised_in_batch_order(num_workers):
    with shmfeed.Loader(Tokens(30, oversize=13), batch_size=4, num_workers=num_workers,
                        padded_shapes={"tokens": (40,)}) as loader:
        got = []
        with pytest.raises(SpecError) as info:
            for batch in loader:
                got.append(batch["label"].tolist())
    assert got == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]  # every batch before the bad one
    msg = str(info.value)
    n = Tokens(1).length(13) + 43
    assert "sample 13" in msg and "['tokens']" in msg and f"({n},)" in msg and "(40,)" in msg


def test_an_oversize_first_sample_is_reported_at_construction():
    with pytest.raises(SpecError, match=r"sample 0, field \['tokens'\]: shape \(44,\) does not fit the padded shape \(40,\)"):
        shmfeed.Loader(Tokens(5, oversize=0, extra=3), batch_size=2, num_workers=0,
                       padded_shapes={"tokens": (40,)})


def test_batch_level_source_pads_trailing_dimensions():
    with shmfeed.Loader(TokenBatches(), batch_size=None, num_workers=2, max_batch_rows=4,
                        padded_shapes=((8, 2), None), padding_values=(-1, None),
                        with_lengths=False) as loader:
        batches = [copy_tree(b) for b in loader]
    assert len(batches) == 6
    for b, (x, labels) in enumerate(batches):
        rows = 3 + b % 2
        assert x.shape == (rows, 8, 2) and labels.shape == (rows,)
        assert (x[:, : 2 + b] == b).all() and (x[:, 2 + b :] == -1).all()


@pytest.mark.parametrize(("kwargs", "pattern"), [
    (dict(padded_shapes={"tokens": (None,)}), r"has None, which needs `bucket_boundaries`"),
    (dict(padded_shapes={"tokens": (40, 2)}), r"has 2 dimension\(s\), the field has 1"),
    (dict(padded_shapes=(40,)), r"the sample has a dict here, got tuple: give a dict"),
    (dict(padded_shapes={"words": (40,)}), r"keys \['words'\] are not in the sample"),
    (dict(padded_shapes={"tokens": "40"}), r"expected a shape"),
    (dict(padded_shapes={"tokens": (-1,)}), r"field \['tokens'\]: expected a shape \(a tuple of ints >= 0\).*got \(-1,\)"),
    (dict(padded_shapes={"tokens": (40,)}, padding_values={"tokens": 0.5}), r"0.5 is not a number that dtype int32 holds"),
    (dict(padded_shapes={"tokens": (40,)}, padding_values={"label": 1}), r"gives values for \[\"\['label'\]\"\]"),
    (dict(padding_values={"tokens": 1}), r"`padding_values` need `padded_shapes`"),
    (dict(padded_shapes={"tokens": (40,)}, bucket_boundaries=[8, 8]), r"increasing lengths"),
])
def test_bad_padding_arguments_are_spec_errors(kwargs, pattern):
    with pytest.raises(SpecError, match=pattern):
        shmfeed.Loader(Tokens(10), batch_size=2, num_workers=0, **kwargs)


def test_with_lengths_needs_a_dict_sample_without_a_lengths_key():
    class Pairs:
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return np.ones(i + 1, np.int8), i

    with pytest.raises(SpecError, match="adds a 'lengths' entry to dict samples"):
        shmfeed.Loader(Pairs(), batch_size=2, num_workers=0, padded_shapes=((4,), None), with_lengths=True)


def test_padded_batch_is_a_view_into_the_ring():
    with shmfeed.Loader(Tokens(8), batch_size=4, num_workers=0, padded_shapes={"tokens": (40,)}) as loader:
        ring = loader._ring_data()
        for batch in loader:
            assert np.shares_memory(batch["tokens"], ring) and batch["tokens"].flags.c_contiguous
            del batch
        del ring


def test_worker_error_in_padded_source_is_still_a_worker_error():
    class Raising(Tokens):
        def __getitem__(self, i):
            if i == 5:
                raise KeyError("no sample 5")
            return super().__getitem__(i)

    with shmfeed.Loader(Raising(12), batch_size=4, num_workers=0, padded_shapes={"tokens": (40,)}) as loader:
        with pytest.raises(WorkerError, match="sample index 5"):
            list(loader)


class _Shapes:
    """Sample i: a `dtype` array of shape shapes[i] holding i + its flat position."""

    def __init__(self, shapes, dtype):
        self.shapes, self.dtype = shapes, dtype

    def __len__(self):
        return len(self.shapes)

    def __getitem__(self, i):
        n = int(np.prod(self.shapes[i]))
        return {"x": (np.arange(n) + i).reshape(self.shapes[i]).astype(self.dtype), "i": i}


@given(ndim=st.integers(1, 3), data=st.data(), dtype=st.sampled_from([np.uint8, np.int16, np.float32, np.bool_]),
       batch_size=st.integers(1, 5), pad=st.integers(0, 1), shuffle=st.booleans())
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_padded_batches_equal_a_numpy_reference(ndim, data, dtype, batch_size, pad, shuffle):
    n = data.draw(st.integers(1, 9))
    shapes = [tuple(data.draw(st.lists(st.integers(0, 4), min_size=ndim, max_size=ndim))) for _ in range(n)]
    room = tuple(max(s[d] for s in shapes) + data.draw(st.integers(0, 2)) for d in range(ndim))
    src = _Shapes(shapes, dtype)
    with shmfeed.Loader(src, batch_size=batch_size, num_workers=0, shuffle=shuffle, seed=1,
                        padded_shapes={"x": room}, padding_values={"x": pad}, with_lengths=True) as loader:
        seen = []
        for batch in loader:
            for row, i in enumerate(batch["i"].tolist()):
                want = np.full(room, pad, dtype)
                want[tuple(slice(0, s) for s in shapes[i])] = src[i]["x"]
                np.testing.assert_array_equal(batch["x"][row], want)
                got = batch["lengths"]["x"][row]
                assert tuple(np.atleast_1d(got)) == shapes[i]
            seen += batch["i"].tolist()
    assert sorted(seen) == list(range(n))


def test_a_batch_level_batch_larger_than_its_padded_shape_is_raised_in_order():
    with shmfeed.Loader(TokenBatches(), batch_size=None, num_workers=2, max_batch_rows=4,
                        padded_shapes=((5, 2), None)) as loader:
        widths = []
        with pytest.raises(SpecError, match=r"batch 4, field \[0\]: shape \(6, 2\) does not fit the padded shape \(5, 2\)"):
            for x, _ in loader:
                widths.append(x.shape[1])
    assert widths == [5, 5, 5, 5]


def test_workers_rebuilt_after_an_epoch_hook_still_pad():
    src = ShiftingTokens(24)
    with shmfeed.Loader(src, batch_size=8, num_workers=2, padded_shapes={"tokens": (40,)},
                        padding_values={"tokens": -1}, with_lengths=True) as loader:
        for epoch in range(2):
            for batch in loader:
                for row, i in enumerate(batch["label"].tolist()):
                    want = _expected_row(i, 40, -1)
                    want[want >= 0] += 1000 * epoch
                    np.testing.assert_array_equal(batch["tokens"][row], want)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_sharded_stream_is_padded(num_workers):
    with shmfeed.Loader(Stream(token_records, num_shards=4), batch_size=4, num_workers=num_workers,
                        padded_shapes={"tokens": (40,)}, padding_values={"tokens": -1},
                        with_lengths=True) as loader:
        seen = []
        for batch in loader:
            for row, i in enumerate(batch["label"].tolist()):
                np.testing.assert_array_equal(batch["tokens"][row], _expected_row(i, 40, -1))
                assert batch["lengths"]["tokens"][row] == Tokens(1).length(i)
            seen += batch["label"].tolist()
    assert sorted(seen) == list(range(40))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_generator_is_padded(num_workers):
    with shmfeed.Loader(token_generator, batch_size=4, num_workers=num_workers, steps_per_epoch=3,
                        padded_shapes={"tokens": (40,)}, padding_values={"tokens": -1}) as loader:
        labels = []
        for batch in loader:
            for row, i in enumerate(batch["label"].tolist()):
                np.testing.assert_array_equal(batch["tokens"][row], _expected_row(i, 40, -1))
            labels += batch["label"].tolist()
    assert labels == list(range(12))


def test_bucketing_a_stream_is_refused():
    with pytest.raises(SpecError, match=r"a stream \(a generator or a `Stream`\) is read in its own order"):
        shmfeed.Loader(Stream(token_records, num_shards=4), batch_size=4, num_workers=0,
                       padded_shapes={"tokens": (None,)}, bucket_boundaries=[8, 40],
                       bucket_lengths=lambda i: 1)
