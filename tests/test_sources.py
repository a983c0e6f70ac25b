"""Array sources (issue 13): `shmfeed.sources.Arrays` / `Windows` and the Loader's
reading of arrays, dicts and tuples of arrays.  Batches are gathered by index in the
workers, exactly once, in the Order's order (shuffle, sharding, resume), equal to the
per-sample path and to `x[idx]`; bad input gets a SpecError that names the field."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from _trees import copy_tree

import shmfeed
from shmfeed import _kernels
from shmfeed.sources import Arrays, Windows


def _epoch(loader):
    return [copy_tree(b) for b in loader]


def _ids(batches, key="x"):
    """Row ids: column 0 of every row holds its row number (see _table)."""
    return np.concatenate([b[key][:, 0] if key is not None else b[:, 0] for b in batches])


def _table(n=103, width=5, dtype=np.int32):
    x = np.arange(n * width, dtype=dtype).reshape(n, width)
    x[:, 0] = np.arange(n)
    return x


class PerSample:
    """The same rows through the per-sample path (a plain `__getitem__`)."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data["x"])

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.data.items()}


def _assert_same(a, b):
    assert len(a) == len(b)
    for p, q in zip(a, b):
        assert p.keys() == q.keys()
        for k in p:
            assert p[k].dtype == q[k].dtype and np.array_equal(p[k], q[k]), k


# -- the same batches as any other source ----------------------------------------------

@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("shard", [(0, 1), (1, 3)])
@pytest.mark.parametrize("shuffle", [True, "block"])
def test_arrays_batches_equal_the_per_sample_path_and_x_of_idx(num_workers, shard, shuffle):
    x = _table()
    y = (np.arange(len(x)) * 3).astype(np.int64)
    data = {"x": x, "y": y}
    opts = dict(batch_size=8, shuffle=shuffle, shuffle_block=5, seed=5, shard_index=shard[0],
                shard_count=shard[1])
    with shmfeed.Loader(Arrays(data), num_workers=num_workers, **opts) as fast, \
            shmfeed.Loader(PerSample(data), num_workers=0, **opts) as reference:
        for _ in range(2):
            got, want = _epoch(fast), _epoch(reference)
            _assert_same(got, want)
            for b in got:
                ids = b["x"][:, 0]
                assert np.array_equal(b["x"], x[ids]) and np.array_equal(b["y"], y[ids])
            ids = _ids(got)
            per_shard = len(x) // shard[1]
            assert len(ids) == per_shard and len(set(ids.tolist())) == per_shard  # exactly once
            if shard[1] == 1:
                assert sorted(ids.tolist()) == list(range(len(x)))


@pytest.mark.parametrize("shuffle", [False, True, "block"])
def test_the_workers_c_loop_builds_what_the_python_path_builds(shuffle):
    """Control.gather_batches (csrc/gather.h), driven by hand on a loader's ring: it
    builds every batch that has a slot, the epoch's first included (its key comes with
    the generation), byte for byte what Builder.fill writes, the short last batch of
    this host's shard included; at the epoch's end it says so."""
    from shmfeed._engine.control import SlotState

    x = _table(n=211, width=7)
    y = (np.arange(len(x)) * 3).astype(np.int64)
    opts = dict(batch_size=8, shuffle=shuffle, shuffle_block=6, seed=9, shard_index=1,
                shard_count=2, num_slots=4)
    with shmfeed.Loader(Arrays({"x": x, "y": y}), num_workers=0, **opts) as loader:
        ring, builder = loader._consumer.ring, loader._consumer.builder
        ctl, order, epoch = ring.ctl, builder.order, 3
        plan = builder.gather_plan()
        assert plan is not None
        gen = ctl.start_epoch(epoch, 0, order.n_batches, 0, order.epoch_key(epoch))
        assert ctl.gen_info(gen).key == order.epoch_key(epoch)
        seen = []
        for b in range(order.n_batches):
            # Builds every batch that has a slot, then finds nothing to claim.
            assert ctl.gather_batches(0, 0.0, plan) in (None, (gen, None))
            state, rows, slot, ref = ctl.take(gen, b, 1.0)
            assert state == SlotState.READY
            got_x, got_y = ring.views(ref, rows)
            idx = order.batch_items(epoch, b)
            assert rows == len(idx) and np.array_equal(got_x, x[idx]) and np.array_equal(got_y, y[idx])
            seen += idx.tolist()
            del got_x, got_y, ref  # gives the slot back: the next batch gets it
        assert len(seen) == len(set(seen)) == order.items_per_shard
        assert order.n_batches * 8 > order.items_per_shard  # the last batch was short
        assert ctl.gather_batches(0, 0.0, plan) == (gen, None)
        assert ctl.worker(0)["batches"] == order.n_batches


def test_the_c_loop_refuses_a_plan_that_does_not_fit_the_ring():
    from shmfeed._engine.control import GatherPlan

    x = _table(n=64, width=4)
    with shmfeed.Loader(Arrays(x), batch_size=8, num_workers=0) as loader:
        ring, builder = loader._consumer.ring, loader._consumer.builder
        (src, stride, row_bytes), offset = builder.source._row_copies()[0], builder.spec.leaves[0].offset
        order = builder.order.c_order
        with pytest.raises(ValueError, match="leaf 0 .*does not fit 64 items"):
            GatherPlan(order, [(src[:10], stride, row_bytes, offset)])
        past_the_slot = GatherPlan(order, [(src, stride, row_bytes, ring.slot_bytes)])
        with pytest.raises(ValueError, match="slots have"):
            ring.ctl.gather_batches(0, 0.0, past_the_slot)


def test_same_batches_with_0_and_2_workers_and_after_a_resume():
    x = _table(200)
    with shmfeed.Loader(x, batch_size=16, num_workers=0, shuffle=True, seed=1) as a, \
            shmfeed.Loader(x, batch_size=16, num_workers=2, shuffle=True, seed=1) as b:
        first = [_epoch(a) for _ in range(3)]
        assert all(np.array_equal(p, q) for e in range(3) for p, q in zip(first[e], _epoch(b)))
    with shmfeed.Loader(x, batch_size=16, num_workers=2, shuffle=True, seed=1) as resumed:
        resumed.set_epoch(2)
        assert all(np.array_equal(p, q) for p, q in zip(first[2], _epoch(resumed)))
    assert not np.array_equal(np.concatenate(first[0]), np.concatenate(first[1]))  # reshuffled


def test_mid_epoch_resume_gathers_the_remaining_batches():
    x = _table(90)
    kw = dict(batch_size=8, shuffle=True, seed=11)
    with shmfeed.Loader(x, num_workers=0, **kw) as ref:
        reference = _epoch(ref)
    with shmfeed.Loader(x, num_workers=2, **kw) as first:
        got = []
        for i, b in enumerate(first):
            got.append(np.array(b))
            if i == 3:
                state = first.state_dict()
                break
    with shmfeed.Loader(x, num_workers=2, **kw) as second:
        second.load_state_dict(state)
        got += _epoch(second)
    assert len(got) == len(reference) and all(np.array_equal(p, q) for p, q in zip(got, reference))


def test_memmap_nested_dict_tuple_and_list_columns(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, _table(64, 7, np.float32))
    x = np.load(path, mmap_mode="r")
    y = np.arange(64, dtype=np.uint8)
    mask = (np.arange(64) % 2 == 0)
    data = {"x": x, "meta": (y, [mask, y.astype(np.int16)])}
    src = Arrays(data)
    assert len(src) == 64
    s = src[5]
    assert np.array_equal(s["x"], x[5]) and s["meta"][0] == 5 and isinstance(s["meta"], tuple)
    assert isinstance(s["meta"][1], list) and s["meta"][1][0] == mask[5]
    with shmfeed.Loader(src, batch_size=10, num_workers=2, shuffle=True, seed=3) as loader:
        batches = _epoch(loader)
    ids = _ids(batches).astype(np.int64)
    assert sorted(ids.tolist()) == list(range(64))
    for b in batches:
        idx = b["x"][:, 0].astype(np.int64)
        assert b["x"].dtype == np.float32 and np.array_equal(b["x"], x[idx])
        assert np.array_equal(b["meta"][0], y[idx]) and b["meta"][1][0].dtype == np.bool_
        assert np.array_equal(b["meta"][1][0], mask[idx]) and np.array_equal(b["meta"][1][1], idx)


def test_a_tuple_is_aligned_columns_never_a_two_sample_dataset():
    x, y = _table(40), np.arange(40, dtype=np.int64)
    with shmfeed.Loader((x, y), batch_size=8, num_workers=2) as loader:
        assert len(loader) == 5  # 40 samples, not 2
        batches = _epoch(loader)
    assert all(isinstance(b, tuple) and len(b) == 2 for b in batches)
    assert np.array_equal(np.concatenate([b[0] for b in batches]), x)
    assert np.array_equal(np.concatenate([b[1] for b in batches]), y)


def test_a_dict_of_arrays_is_a_source_and_a_bare_array_its_rows():
    x = _table(30)
    with shmfeed.Loader({"x": x, "y": x[:, 0].copy()}, batch_size=7, num_workers=0) as loader:
        batches = _epoch(loader)  # was a raw KeyError: 0
    assert np.array_equal(np.concatenate([b["y"] for b in batches]), np.arange(30))
    with shmfeed.Loader(x, batch_size=7, num_workers=2, drop_last=True) as loader:
        assert np.array_equal(np.concatenate(_epoch(loader)), x[:28])


def test_a_list_of_samples_is_still_a_list_of_samples():
    samples = [{"x": np.full(3, i, np.int32), "y": i} for i in range(10)]
    with shmfeed.Loader(samples, batch_size=4, num_workers=2) as loader:
        batches = _epoch(loader)
    assert np.array_equal(np.concatenate([b["y"] for b in batches]), np.arange(10))
    same_shape = [np.full((2, 3), i, np.float32) for i in range(6)]  # 6 samples, not columns
    with shmfeed.Loader(same_shape, batch_size=3, num_workers=0) as loader:
        assert [b.shape for b in loader] == [(3, 2, 3), (3, 2, 3)]


def test_ambiguous_containers_get_an_error_pointing_at_arrays():
    x, y = _table(20), np.arange(20)
    with pytest.raises(shmfeed.SpecError, match=r"look like columns.*sources\.Arrays"):
        shmfeed.Loader([x, y], batch_size=4, num_workers=0)
    with pytest.raises(shmfeed.SpecError, match=r"integer keys.*sources\.Arrays"):
        shmfeed.Loader({0: x, 1: y}, batch_size=4, num_workers=0)
    with pytest.raises(shmfeed.SpecError, match=r"element 1 is a int.*Pass a list"):
        shmfeed.Loader((x, 3), batch_size=4, num_workers=0)


# -- the gather path is the one the workers take ----------------------------------------

class RowGuard(np.ndarray):
    """An array whose per-row reads raise outside the process that made it: a worker
    that read it sample by sample, instead of gathering, would fail the epoch."""

    owner_pid = os.getpid()

    def __getitem__(self, key):
        if os.getpid() != RowGuard.owner_pid:
            raise RuntimeError(f"per-row read {key!r} in a worker")
        return super().__getitem__(key)


def test_workers_gather_batches_and_never_read_rows_one_by_one():
    RowGuard.owner_pid = os.getpid()
    x = _table(96).view(RowGuard)
    y = np.arange(96, dtype=np.int64).view(RowGuard)
    with shmfeed.Loader(Arrays({"x": x, "y": y}), batch_size=12, num_workers=2, shuffle=True) as loader:
        batches = _epoch(loader)
    assert sorted(np.concatenate([b["y"] for b in batches]).tolist()) == list(range(96))
    with shmfeed.Loader(PerSample({"x": x, "y": y}), batch_size=12, num_workers=2) as loader:
        with pytest.raises(shmfeed.WorkerError, match="per-row read"):
            _epoch(loader)  # the guard does fire on the per-sample path


class PlusOne(Arrays):
    """A subclass that augments in `__getitem__`: its code must run for every sample."""

    def __getitem__(self, i):
        s = super().__getitem__(i)
        return {"x": s["x"] + 1}


def test_a_subclass_overriding_getitem_keeps_the_per_sample_path():
    x = _table(24)
    with shmfeed.Loader(PlusOne({"x": x}), batch_size=8, num_workers=2) as loader:
        got = np.concatenate([b["x"] for b in _epoch(loader)])
    assert np.array_equal(got, x + 1)


def test_gather_rows_kernel_copies_rows_by_index_and_refuses_an_index_out_of_range():
    # Rows of an odd size leave every destination row unaligned; the large case goes
    # through the non-temporal path (STREAM_MIN_BYTES), the small one through memcpy.
    for rows, row_bytes in [(40, 37), (48, _kernels.STREAM_MIN_BYTES // 24 + 3)]:
        src = np.random.default_rng(0).integers(0, 256, (rows, row_bytes), dtype=np.uint8)
        idx = np.array([5, 0, rows - 1, 5, 17] * 7, dtype=np.int64)
        out = np.zeros((len(idx) + 2, row_bytes), np.uint8)
        _kernels.gather_rows(src, row_bytes, row_bytes, idx, out[1:-1])
        assert np.array_equal(out[1:-1], src[idx])
        assert not out[0].any() and not out[-1].any()  # nothing written beyond the rows
        bad = idx.copy()
        bad[9] = rows
        out[:] = 0
        with pytest.raises(IndexError, match=rf"indices\[9\] = {rows} is outside the source's {rows} rows"):
            _kernels.gather_rows(src, row_bytes, row_bytes, bad, out[:len(bad)])
        assert not out.any()  # checked before anything is written
    tokens = np.arange(1000, dtype=np.uint16)
    starts = np.array([0, 3, 990 // 3], dtype=np.int64)  # windows of 10 tokens, stride 3
    out = np.empty((3, 10), np.uint16)
    _kernels.gather_rows(tokens, 6, 20, starts, out)
    assert np.array_equal(out, np.stack([tokens[3 * s : 3 * s + 10] for s in starts]))
    with pytest.raises(IndexError, match="outside the source's 331 rows"):
        _kernels.gather_rows(tokens, 6, 20, np.array([331], np.int64), out)
    with pytest.raises(ValueError, match="out holds 3 rows of 20 bytes, 4 indices given"):
        _kernels.gather_rows(tokens, 6, 20, np.zeros(4, np.int64), out)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_batches_larger_than_the_streaming_threshold_are_gathered_exactly(num_workers):
    # 32 rows of 150001 bytes: 4.8 MB a batch, written around the cache, each row
    # starting unaligned; then published (the stores are fenced before the slot is).
    x = np.random.default_rng(1).integers(0, 256, (96, 150_001), dtype=np.uint8)
    assert 32 * x.shape[1] >= _kernels.STREAM_MIN_BYTES
    y = np.arange(96, dtype=np.int64)
    with shmfeed.Loader(Arrays((x, y)), batch_size=32, num_workers=num_workers, shuffle=True,
                        seed=3) as loader:
        for _ in range(2):
            seen = []
            for bx, by in loader:
                assert np.array_equal(bx, x[by])
                seen += by.tolist()
            assert sorted(seen) == list(range(96))


# -- Windows ------------------------------------------------------------------------------

def test_windows_default_stride_is_the_length_and_len_counts_whole_windows():
    t = np.arange(103, dtype=np.uint16)
    w = Windows(t, 10)
    assert len(w) == 10 and np.array_equal(w[3], t[30:40]) and np.array_equal(w[-1], t[90:100])
    with pytest.raises(IndexError):
        w[10]
    o = Windows(t, 9, stride=4)  # overlapping
    assert len(o) == (103 - 9) // 4 + 1 and np.array_equal(o[len(o) - 1], t[4 * (len(o) - 1):][:9])
    with shmfeed.Loader(w, batch_size=4, num_workers=2, shuffle=True) as loader:
        got = np.concatenate(_epoch(loader))
    assert np.array_equal(got[np.argsort(got[:, 0])], t[:100].reshape(10, 10))


def test_strided_and_fortran_columns_are_gathered_row_by_index():
    base = _table(50, 8)
    data = {"x": base[:, ::2], "f": np.asfortranarray(base.astype(np.float64))}
    assert not data["x"].flags.c_contiguous and not data["f"].flags.c_contiguous
    with shmfeed.Loader(Arrays(data), batch_size=8, num_workers=2, shuffle=True) as loader:
        for b in _epoch(loader):
            ids = b["x"][:, 0]
            assert np.array_equal(b["x"], base[ids, ::2]) and np.array_equal(b["f"], base[ids])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_windows_batches_are_the_slices_nanogpt_style(tmp_path, num_workers):
    block = 16
    path = tmp_path / "train.bin"
    np.arange(2000, dtype=np.uint16).tofile(path)
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    src = Windows(tokens, block + 1, stride=block)
    assert len(src) == (2000 - block - 1) // block + 1
    with shmfeed.Loader(src, batch_size=8, num_workers=num_workers, shuffle=True, seed=2) as loader:
        batches = _epoch(loader)
    starts = np.concatenate([b[:, 0] for b in batches]).astype(np.int64)
    assert sorted(starts.tolist()) == [i * block for i in range(len(src))]  # exactly once
    for w in batches:
        assert w.dtype == np.uint16 and w.shape[1] == block + 1
        assert np.array_equal(w, np.stack([tokens[s : s + block + 1] for s in w[:, 0].astype(np.int64)]))
        x, y = w[:, :-1], w[:, 1:]
        assert np.array_equal(y[:, :-1], x[:, 1:])  # y is x shifted by one token


# -- pickling (workers started from a fresh interpreter) ----------------------------------

def test_a_memmap_travels_by_name_and_a_window_view_is_not_sent(tmp_path):
    path = tmp_path / "big.npy"
    np.save(path, np.arange(1 << 18, dtype=np.int32).reshape(-1, 64))
    x = np.load(path, mmap_mode="r")
    a = pickle.loads(pickle.dumps(Arrays({"x": x})))
    assert len(pickle.dumps(Arrays({"x": x}))) < 2000  # not the 1 MB of data
    assert isinstance(a._arrays[0], np.memmap) and np.array_equal(a[77]["x"], x[77])
    flat = np.load(path, mmap_mode="r").reshape(-1)  # not a whole-file memmap: sent by content
    w = pickle.loads(pickle.dumps(Windows(flat[:1000], 65, stride=1)))
    assert len(w) == 936 and np.array_equal(w[100], np.arange(100, 165))


def test_spawned_workers_read_a_memmap_source(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, _table(48))
    x = np.load(path, mmap_mode="r")
    with shmfeed.Loader(x, batch_size=16, num_workers=2, start_method="spawn") as loader:
        got = np.concatenate(_epoch(loader))
    assert np.array_equal(got, np.asarray(x))


# -- errors ----------------------------------------------------------------------------------

def test_arrays_of_different_lengths_name_every_field_and_length():
    with pytest.raises(shmfeed.SpecError, match=r"\['x'\]: 10, \['y'\]\[0\]: 9"):
        Arrays({"x": np.zeros((10, 2)), "y": (np.zeros(9),)})


@pytest.mark.parametrize("data, match", [
    ({"s": np.array(["a", "b"])}, r"field \['s'\]: dtype <U1 is not supported"),
    ({"o": np.array([None, 1], dtype=object)}, r"field \['o'\]: dtype object"),
    ((np.zeros(3), [1, 2, 3]), r"field \[1\]\[0\]: got a value of type int, expected a numpy array"),
    ({"z": np.float32(1.0)}, r"field \['z'\]: got a value of type float32"),
    ({"z": np.zeros(())}, r"field \['z'\]: got a 0-d array"),
    ({}, "empty"),
])
def test_arrays_refuse_what_cannot_be_rows(data, match):
    with pytest.raises(shmfeed.SpecError, match=match):
        Arrays(data)


@pytest.mark.parametrize("args, match", [
    ((np.zeros((4, 4), np.uint16), 2), r"`tokens` must be 1-D, got shape \(4, 4\)"),
    (([1, 2, 3], 2), "`tokens` must be a 1-D numpy array or memmap, got list"),
    ((np.array(["a", "b"]), 1), "dtype <U1"),
    ((np.zeros(5, np.uint16), 6), r"`length=6` is longer than the 5 tokens"),
    ((np.zeros(5, np.uint16), 0), r"`length` must be an integer >= 1, got 0"),
    ((np.zeros(5, np.uint16), 2, 0), r"`stride` must be an integer >= 1, got 0"),
])
def test_windows_refuse_bad_arguments(args, match):
    with pytest.raises(shmfeed.SpecError, match=match):
        Windows(*args)


def test_gathered_batches_in_process_leave_the_users_rngs_alone():
    """num_workers=0 with an array source: no user code runs, so nothing is keyed,
    saved or restored, and the user's np.random stream is exactly as it was."""
    np.random.seed(7)
    expected = np.random.rand(3)
    np.random.seed(7)
    with shmfeed.Loader(np.arange(40, dtype=np.int64), batch_size=4, num_workers=0,
                        shuffle=True) as loader:
        assert sum(1 for _ in loader) == 10
    assert np.array_equal(np.random.rand(3), expected)
