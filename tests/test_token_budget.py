"""Token budgets (issue 28): `token_budget=T` with length buckets gives bucket k's
batches `T // bucket_boundaries[k]` rows, a finite set of shapes; every sample exactly
once per epoch, the same batches with any `num_workers`, hosts in lockstep, and a
mid-epoch resume exact."""

from __future__ import annotations

import numpy as np
import pytest
from _sources import Tokens
from _trees import check_resume_mid_epoch, copy_tree

import shmfeed
from shmfeed import SpecError

BOUNDARIES = [4, 8, 16, 40]
BUDGET = 80  # rows per bucket: 20, 10, 5, 2


def _loader(src, num_workers=0, **kw):
    opts = dict(batch_size=None, token_budget=BUDGET, shuffle=True, seed=5, padded_shapes={"tokens": (None,)},
                padding_values={"tokens": -1}, bucket_boundaries=BOUNDARIES,
                bucket_lengths=[src.length(i) for i in range(len(src))], with_lengths=True)
    opts.update(kw)
    return shmfeed.Loader(src, num_workers=num_workers, **opts)


def _rows_of(width: int) -> int:
    return BUDGET // width


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_sample_once_in_batches_of_the_budgets_rows(num_workers):
    src = Tokens(203)
    with _loader(src, num_workers) as loader:
        epochs = []
        for _ in range(2):
            seen, shapes, batches = [], set(), [copy_tree(b) for b in loader]
            assert len(batches) == len(loader)  # the same count every epoch
            for i, batch in enumerate(batches):
                labels = batch["label"].tolist()
                rows, width = batch["tokens"].shape
                assert width in BOUNDARIES
                if i < len(batches) - 1:
                    assert rows == _rows_of(width)  # only the last batch may be partial
                else:
                    assert rows <= _rows_of(width) and width == BOUNDARIES[-1]
                for row, item in enumerate(labels):
                    n = src.length(item)
                    assert n <= width and batch["lengths"]["tokens"][row] == n
                    np.testing.assert_array_equal(batch["tokens"][row, :n], np.arange(item, item + n))
                    assert (batch["tokens"][row, n:] == -1).all()
                shapes.add(batch["tokens"].shape)
                seen += labels
            assert sorted(seen) == list(range(203))
            assert len(shapes) <= len(BOUNDARIES) + 1  # one per bucket, and the partial batch
            epochs.append([b["label"].tolist() for b in batches])
    assert epochs[0] != epochs[1]  # shuffled anew each epoch


def test_zero_and_two_workers_give_the_same_batches():
    runs = []
    for num_workers in (0, 2):
        with _loader(Tokens(150), num_workers) as loader:
            runs.append([copy_tree(b) for b in loader])
    for a, b in zip(*runs, strict=True):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
        np.testing.assert_array_equal(a["label"], b["label"])


@pytest.mark.parametrize(("before", "after"), [(0, 2), (2, 0)])
def test_resume_mid_epoch_with_a_token_budget_is_exact(before, after):
    check_resume_mid_epoch(lambda workers: _loader(Tokens(150), workers), before, after, ("tokens", "label"))


def test_a_state_of_another_budget_is_refused():
    with _loader(Tokens(60)) as loader:
        state = loader.state_dict()
    with _loader(Tokens(60), token_budget=120) as loader:
        with pytest.raises(SpecError, match="its stream would differ"):
            loader.load_state_dict(state)
    with _loader(Tokens(60), token_budget=83) as loader:  # the same rows in every bucket
        loader.load_state_dict(state)


@pytest.mark.parametrize("drop_last", [False, True])
def test_hosts_get_disjoint_rows_of_the_same_shape_at_every_step(drop_last):
    src, hosts = Tokens(215), 3
    per_host = []
    for h in range(hosts):
        with _loader(src, shard_index=h, shard_count=hosts, drop_last=drop_last) as loader:
            per_host.append([copy_tree(b) for b in loader])
    assert len({len(batches) for batches in per_host}) == 1
    seen = []
    for step in zip(*per_host):
        assert len({b["tokens"].shape for b in step}) == 1  # SPMD: one shape per step
        seen += [i for b in step for i in b["label"].tolist()]
    assert len(seen) == len(set(seen))
    assert len(seen) >= 215 - (hosts * _rows_of(BOUNDARIES[-1]) if drop_last else hosts)


def test_the_slot_holds_the_largest_batch_of_any_bucket_not_the_most_rows_at_the_longest_length():
    src = Tokens(64, longest=4000)
    lengths = [src.length(i) for i in range(len(src))]
    with _loader(src, bucket_boundaries=[16, 4000], bucket_lengths=lengths, token_budget=4096,
                 with_lengths=False) as loader:
        # bucket 0: 256 rows x 16 int32; bucket 1: 1 row x 4000 int32 (16 KB either way),
        # where 256 rows of 4000 would be 4 MB.
        assert loader.slot_bytes <= 32 << 10
        seen = []
        for batch in loader:
            rows, width = batch["tokens"].shape
            assert rows <= 4096 // width
            seen += batch["label"].tolist()
        assert sorted(seen) == list(range(64))


def test_token_budget_argument_errors():
    src = Tokens(10)
    with pytest.raises(SpecError, match=r"`token_budget` must be an integer >= 1, got 0"):
        _loader(src, token_budget=0)
    with pytest.raises(SpecError, match=r"`token_budget` must be an integer >= 1, got -5"):
        _loader(src, token_budget=-5)
    with pytest.raises(SpecError, match=r"`token_budget=39` is smaller than the bucket length 40"):
        _loader(src, token_budget=39)
    with pytest.raises(SpecError, match=r"give `batch_size=None` instead of `batch_size=8`"):
        _loader(src, batch_size=8)
    with pytest.raises(SpecError, match=r"give `bucket_boundaries` and `bucket_lengths` too"):
        shmfeed.Loader(src, batch_size=None, num_workers=0, token_budget=80)
    with pytest.raises(SpecError, match=r"no batch to load.*`token_budget=80`.*drop_last=True"):
        _loader(Tokens(1), token_budget=80, drop_last=True, bucket_lengths=[40])
    with pytest.raises(SpecError, match=r"`token_budget` must be an integer >= 1, got 2.5"):
        _loader(src, token_budget=2.5)
    with pytest.raises(SpecError, match=r"`bucket_boundaries` must be an integer >= 1, got 0"):
        _loader(src, bucket_boundaries=[0, 40])
