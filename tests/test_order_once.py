"""The epoch order is described once (issue 27 item 1), in C (csrc/order.h): the
workers' C loop for array sources (csrc/gather.c), the per-sample Python path and
`Order.batch_items` give the same batches for any order; the C loop builds every batch
itself, an epoch's first included (the training process publishes each epoch's key);
length-bucketed grouping is computed one window at a time, with the same batches as the
whole-epoch grouping it replaced."""

from __future__ import annotations

import mmap
import os

import numpy as np
import pytest
from _trees import copy_tree
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shmfeed
from shmfeed import _kernels
from shmfeed._batch.build import Builder
from shmfeed._order import bucket as _bucket
from shmfeed._order import state as _state
from shmfeed._order.bucket import WINDOW_BATCHES, BucketedOrder
from shmfeed._order.order import Order
from shmfeed.sources import Arrays

SETTINGS = settings(max_examples=int(os.environ.get("SHMFEED_PROPERTY_EXAMPLES", 60)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


class PerSample:
    """The same rows through the per-sample path (a plain `__getitem__`)."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data["x"])

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.data.items()}


@st.composite
def orders(draw):
    n = draw(st.integers(1, 300))
    batch_size = draw(st.integers(1, 24))
    shard_count = draw(st.integers(1, 4))
    shard_index = draw(st.integers(0, shard_count - 1))
    shuffle = draw(st.sampled_from([False, True, "block"]))
    block = draw(st.integers(1, 12))
    drop_last = draw(st.booleans())
    order = Order(n, batch_size, shuffle, 7, drop_last, shard_index, shard_count, shuffle_block=block)
    if order.n_batches == 0:
        drop_last = False  # a shard with no batch is refused at construction: give it the tail
        order = Order(n, batch_size, shuffle, 7, drop_last, shard_index, shard_count, shuffle_block=block)
    epoch = draw(st.integers(0, 2**63))
    first = draw(st.integers(0, max(order.n_batches - 1, 0)))
    return order, epoch, first


@SETTINGS
@given(orders())
def test_the_c_loop_the_per_sample_path_and_batch_items_give_the_same_batches(case):
    order, epoch, first = case
    if order.n_batches == 0:
        return  # n < shard_count: no host gets a row (refused by the Loader, tested elsewhere)
    n = order.n_items
    x = np.arange(n * 3, dtype=np.int32).reshape(n, 3)
    x[:, 0] = np.arange(n)
    data = {"x": x}
    opts = dict(batch_size=order.batch_size, shuffle=order.shuffle, shuffle_block=order.shuffle_block,
                seed=order.seed, drop_last=order.drop_last, shard_index=order.shard_index,
                shard_count=order.shard_count, num_workers=0)
    want = [order.batch_items(epoch, b) for b in range(first, order.n_batches)]
    # The per-sample path, resumed at (epoch, first).
    with shmfeed.Loader(PerSample(data), **opts) as loader:
        assert loader._cfg.order == order
        loader.load_state_dict(_state.make(loader._cfg.order, epoch, first, None))
        python = [b["x"].copy() for b in loader]
    assert len(python) == len(want)
    for got, idx in zip(python, want):
        np.testing.assert_array_equal(got, x[idx])
    # The C loop, driven by hand on an Arrays loader's ring: it builds every batch
    # that has a slot, from the key published with the generation.
    with shmfeed.Loader(Arrays(data), num_slots=3, **opts) as loader:
        ring, builder = loader._consumer.ring, loader._consumer.builder
        ctl, plan = ring.ctl, builder.gather_plan()
        assert plan is not None
        gen = ctl.start_epoch(epoch, first, order.n_batches - first, 0, order.epoch_key(epoch))
        for b, idx in enumerate(want):
            assert ctl.gather_batches(0, 0.0, plan) in (None, (gen, None))
            taken = ctl.take(gen, b, 1.0)
            assert taken is not None, f"batch {first + b} was not built in C"
            state, rows, slot, ref = taken
            (got,) = ring.views(ref, rows)
            np.testing.assert_array_equal(got, x[idx])
            del got, ref, taken
        assert ctl.gather_batches(0, 0.0, plan) == (gen, None)
        assert ctl.worker(0)["batches"] == len(want)


def test_the_order_travels_to_a_worker_whole():
    import pickle

    order = Order(1000, 16, "block", 3, False, 1, 3, shuffle_block=9)
    again = pickle.loads(pickle.dumps(order))
    assert again == order
    for b in (0, order.n_batches - 1):
        np.testing.assert_array_equal(again.batch_items(5, b), order.batch_items(5, b))


def test_shuffle_modes_are_the_c_headers_constants():
    from shmfeed._order.order import _C_SHUFFLE

    assert _C_SHUFFLE == {False: _kernels.SHUFFLE_NONE, True: _kernels.SHUFFLE_FULL,
                          "block": _kernels.SHUFFLE_BLOCK}
    assert len(set(_C_SHUFFLE.values())) == 3
    with pytest.raises(ValueError, match="outside what order.h accepts"):
        _kernels.EpochOrder(10, 2, 1, 0, False, 99, 1)


def test_a_gather_plan_refuses_leaves_that_cannot_hold_the_order():
    from shmfeed._engine.control import GatherPlan

    order = _kernels.EpochOrder(10, 2, 1, 0, False, _kernels.SHUFFLE_FULL, 1)
    rows = np.zeros((10, 4), np.uint8)
    assert GatherPlan(order, [(rows, 4, 4, 128)]).slot_extent == 128 + 2 * 4
    for stride, row_bytes in [(0, 4), (4, 0), (4, 5)]:
        with pytest.raises(ValueError, match="leaf 0 .*does not fit 10 items"):
            GatherPlan(order, [(rows, stride, row_bytes, 0)])
    with pytest.raises(IndexError, match="batch 5 is outside the epoch's 5 batches"):
        order.batch(0, 5, np.empty(2, np.int64))


def test_a_bucketed_order_is_never_handed_to_the_c_loop():
    buckets = np.zeros(50, np.uint8)
    order = BucketedOrder(50, 5, True, 1, False, boundaries=(4,), buckets=buckets)
    assert order.c_order is None
    assert Order(50, 5, True, 1, False).c_order is not None


# -- the C worker loop builds an epoch's first batch too -------------------------------

@pytest.fixture
def python_builds(monkeypatch):
    """How many batches `Builder.fill` (the Python path) built, in any process forked
    after this: a counter in shared memory (read by calling it)."""
    counter = mmap.mmap(-1, 8)
    fill = Builder.fill

    def counting_fill(self, slot, epoch, batch):
        # Not atomic: two workers at once could undercount, never count a batch not built.
        counter[:8] = (int.from_bytes(counter[:8], "little") + 1).to_bytes(8, "little")
        return fill(self, slot, epoch, batch)

    monkeypatch.setattr(Builder, "fill", counting_fill)
    yield lambda: int.from_bytes(counter[:8], "little")
    monkeypatch.undo()
    counter.close()


def test_the_c_worker_loop_hands_no_batch_back_to_python_across_epochs(python_builds):
    x = np.arange(96 * 4, dtype=np.int64).reshape(96, 4)
    opts = dict(batch_size=8, num_workers=2, shuffle=True, seed=3, start_method="fork")
    with shmfeed.Loader(Arrays(x), **opts) as loader:
        epochs = [[b.copy() for b in loader] for _ in range(3)]
        state = loader.state_dict()
        for i, _ in enumerate(loader):
            if i == 4:
                state = loader.state_dict()
                break
    with shmfeed.Loader(Arrays(x), **opts) as resumed:
        resumed.load_state_dict(state)  # a resume starts mid-epoch: that batch is C's too
        rest = [b.copy() for b in resumed]
    assert python_builds() == 0
    for epoch in epochs:
        assert sorted(np.concatenate(epoch)[:, 0].tolist()) == list(range(0, 96 * 4, 4))
    assert len(rest) == 12 - 5
    # The counter does count what workers build in Python: the per-sample path.
    with shmfeed.Loader(PerSample({"x": x}), **opts) as loader:
        for _ in loader:
            pass
    assert python_builds() >= 6  # 12 batches, by two workers at once


# -- bucketed grouping, one window at a time -------------------------------------------

def _whole_epoch_grouping(order: BucketedOrder, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """The grouping as it was computed before (the whole epoch at once): every position's
    source index, and each global batch's bucket."""
    n, gbs, nb = order.n_items, order.global_batch_size, order.n_items // order.global_batch_size
    items = Order.indices(order, epoch, np.arange(n, dtype=np.int64))
    full = nb * gbs
    head = items[:full]
    window = np.arange(full, dtype=np.int64) // (WINDOW_BATCHES * gbs)
    head = head[np.argsort(window * 256 + order.buckets[head].astype(np.int64), kind="stable")]
    if order.shuffle and nb > 1:
        ss = np.random.SeedSequence([order.seed, epoch, _bucket.BUCKET_STREAM])
        head = head.reshape(nb, gbs)[np.random.default_rng(ss).permutation(nb)].reshape(-1)
    return np.concatenate([head, items[full:]]), order.buckets[head].reshape(nb, gbs).max(axis=1)


@pytest.mark.parametrize("shuffle", [False, True, "block"])
@pytest.mark.parametrize(("n", "batch_size", "hosts"), [(5000, 4, 3), (4099, 8, 1), (30, 7, 2)])
def test_windowed_grouping_gives_the_whole_epoch_groupings_batches(shuffle, n, batch_size, hosts):
    buckets = np.random.default_rng(n).integers(0, 5, n).astype(np.uint8)
    for drop_last in (False, True):
        for epoch in (0, 7):
            whole = None
            seen = []
            for h in range(hosts):
                order = BucketedOrder(n, batch_size, shuffle, 2, drop_last, h, hosts, shuffle_block=5,
                                      boundaries=(1, 2, 3, 4, 5), buckets=buckets)
                whole = whole or _whole_epoch_grouping(order, epoch)
                items, batch_buckets = whole
                gbs = order.global_batch_size
                for b in range(order.n_batches):
                    got = order.batch_items(epoch, b)
                    seen += got.tolist()
                    if b < len(batch_buckets):
                        start = b * gbs + h * batch_size
                        np.testing.assert_array_equal(got, items[start : start + batch_size])
                        assert order.bucket(epoch, b) == batch_buckets[b]
            assert len(seen) == len(set(seen))  # each sample at most once, every host together
            if not drop_last and hosts == 1:
                assert sorted(seen) == list(range(n))


def test_windowed_grouping_never_maps_more_than_a_window_of_positions(monkeypatch):
    n, batch_size = 20_000, 4
    buckets = np.random.default_rng(0).integers(0, 3, n).astype(np.uint8)
    order = BucketedOrder(n, batch_size, True, 2, False, boundaries=(1, 2, 3), buckets=buckets)
    largest = []
    indices = Order.indices

    def recording(self, epoch, positions):
        largest.append(len(positions))
        return indices(self, epoch, positions)

    monkeypatch.setattr(Order, "indices", recording)
    for b in (0, 1, order.n_batches // 2, order.n_batches - 2):
        order.batch_items(1, b)
        order.bucket(1, b)
    assert largest and max(largest) <= WINDOW_BATCHES * batch_size


def test_bucketed_batches_survive_a_pickle_to_a_worker():
    import pickle

    buckets = np.random.default_rng(0).integers(0, 3, 3000).astype(np.uint8)
    order = BucketedOrder(3000, 4, True, 2, False, boundaries=(1, 2, 3), buckets=buckets)
    first = [copy_tree(order.batch_items(0, b)) for b in range(5)]
    again = pickle.loads(pickle.dumps(order))
    assert again._grouping._window is None  # no epoch's window travels
    for b, want in enumerate(first):
        np.testing.assert_array_equal(again.batch_items(0, b), want)
