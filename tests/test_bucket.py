"""Length bucketing (issue 14): `bucket_boundaries` + `bucket_lengths`.

Every sample exactly once per epoch, each batch padded to the smallest boundary that
holds all of its samples (so at most len(bucket_boundaries) shapes per field), the
same batches with any `num_workers` and after a mid-epoch resume."""

from __future__ import annotations

import numpy as np
import pytest
from _sources import TokenBatches, Tokens
from _trees import check_resume_mid_epoch, copy_tree

import shmfeed
from shmfeed import SpecError

BOUNDARIES = [4, 8, 16, 40]


def _loader(src, num_workers, **kw):
    lengths = [src.length(i) for i in range(len(src))]
    opts = dict(batch_size=8, shuffle=True, seed=5, padded_shapes={"tokens": (None,)},
                padding_values={"tokens": -1}, bucket_boundaries=BOUNDARIES, bucket_lengths=lengths,
                with_lengths=True)
    opts.update(kw)
    return shmfeed.Loader(src, num_workers=num_workers, **opts)


def _smallest_boundary(n: int) -> int:
    return next(b for b in BOUNDARIES if b >= n)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_sample_once_each_batch_at_its_smallest_boundary(num_workers):
    src = Tokens(203)
    with _loader(src, num_workers) as loader:
        for _ in range(2):
            seen, shapes = [], set()
            for batch in loader:
                labels = batch["label"].tolist()
                width = batch["tokens"].shape[1]
                assert width == _smallest_boundary(max(src.length(i) for i in labels))
                shapes.add(batch["tokens"].shape[1:])
                for row, i in enumerate(labels):
                    n = src.length(i)
                    assert batch["lengths"]["tokens"][row] == n
                    np.testing.assert_array_equal(batch["tokens"][row, :n], np.arange(i, i + n))
                    assert (batch["tokens"][row, n:] == -1).all()
                assert batch["tokens"].flags.c_contiguous
                seen += labels
            assert sorted(seen) == list(range(203))
            assert len(shapes) <= len(BOUNDARIES)


def test_bucketing_pads_less_than_the_largest_boundary():
    src = Tokens(400)
    with _loader(src, 0) as loader:
        tokens = padded = 0
        for batch in loader:
            tokens += int(batch["lengths"]["tokens"].sum())
            padded += batch["tokens"].size
    everything_at_40 = 400 * 40
    assert padded < everything_at_40 / 2, (padded, tokens)


def test_zero_and_two_workers_give_the_same_batches_and_epochs_differ():
    runs = []
    for num_workers in (0, 2):
        with _loader(Tokens(120), num_workers) as loader:
            runs.append([[copy_tree(b) for b in loader] for _ in range(2)])
    for epoch_a, epoch_b in zip(*runs):
        assert len(epoch_a) == len(epoch_b) == 15
        for a, b in zip(epoch_a, epoch_b):
            np.testing.assert_array_equal(a["tokens"], b["tokens"])
            np.testing.assert_array_equal(a["label"], b["label"])
    first, second = ([b["label"].tolist() for b in epoch] for epoch in runs[0])
    assert first != second


@pytest.mark.parametrize(("before", "after"), [(0, 2), (2, 0)])
def test_resume_mid_epoch_with_bucketing(before, after):
    check_resume_mid_epoch(lambda workers: _loader(Tokens(150), workers), before, after, ("tokens", "label"))


def test_a_state_of_other_lengths_or_boundaries_is_refused():
    with _loader(Tokens(60), 0) as loader:
        state = loader.state_dict()
    other = [Tokens(60).length(i) for i in range(60)]
    other[0] = 40  # another bucket for one sample: another grouping
    with _loader(Tokens(60), 0, bucket_lengths=other) as loader:
        with pytest.raises(SpecError, match="bucket_lengths_crc32"):
            loader.load_state_dict(state)
    with _loader(Tokens(60), 0, bucket_boundaries=[8, 16, 40]) as loader:
        with pytest.raises(SpecError, match="bucket_boundaries"):
            loader.load_state_dict(state)


def test_lengths_from_a_function_equal_lengths_from_an_array():
    src = Tokens(64)
    with _loader(src, 0) as a, _loader(src, 0, bucket_lengths=src.length) as b:
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x["tokens"], y["tokens"])


def test_a_sample_longer_than_its_declared_length_names_bucket_lengths():
    src = Tokens(40)
    lengths = [src.length(i) for i in range(40)]
    liar = next(i for i in range(40) if src.length(i) > 8)
    lengths[liar] = 1
    with _loader(src, 0, bucket_lengths=lengths, shuffle=False) as loader:
        with pytest.raises(SpecError, match=rf"sample {liar}, field \['tokens'\].*of its bucket.*`bucket_lengths`"):
            list(loader)


def test_bucketing_argument_errors():
    src = Tokens(10)
    with pytest.raises(SpecError, match=r"sample 3 has length 99, outside 0..40"):
        _loader(src, 0, bucket_lengths=[1, 2, 3, 99, 1, 1, 1, 1, 1, 1])
    with pytest.raises(SpecError, match=r"has 3 entries, the source 10 samples"):
        _loader(src, 0, bucket_lengths=[1, 2, 3])
    with pytest.raises(SpecError, match=r"`bucket_lengths\(0\)` returned 1.5, expected an int"):
        _loader(src, 0, bucket_lengths=lambda i: 1.5)
    with pytest.raises(SpecError, match=r"needs `bucket_lengths`"):
        _loader(src, 0, bucket_lengths=None)
    with pytest.raises(SpecError, match=r"give it as None in `padded_shapes`"):
        _loader(src, 0, padded_shapes={"tokens": (40,)})


def test_batch_level_source_takes_the_smallest_bucket_that_holds_each_batch():
    with shmfeed.Loader(TokenBatches(), batch_size=None, num_workers=0, max_batch_rows=4,
                        padded_shapes=((None, 2), None), bucket_boundaries=[3, 5, 8]) as loader:
        widths = [b[0].shape[1] for b in loader]
    assert widths == [3, 3, 5, 5, 8, 8]  # batch b is 2 + b wide


@pytest.mark.parametrize("drop_last", [False, True])
def test_hosts_get_disjoint_rows_of_the_same_shape_at_every_step(drop_last):
    src, hosts = Tokens(215), 3
    per_host = []
    for h in range(hosts):
        with _loader(src, 0, batch_size=4, shard_index=h, shard_count=hosts, drop_last=drop_last) as loader:
            per_host.append([copy_tree(b) for b in loader])
    steps = {len(batches) for batches in per_host}
    assert len(steps) == 1
    seen = []
    for step in zip(*per_host):
        assert len({b["tokens"].shape for b in step}) == 1  # SPMD: one shape per step
        labels = [i for b in step for i in b["label"].tolist()]
        assert step[0]["tokens"].shape[1] == _smallest_boundary(max(src.length(i) for i in labels))
        seen += labels
    assert len(seen) == len(set(seen))
    # 17 global batches of 3 x 4, and of the 11 positions left, 3 per host unless drop_last
    assert len(seen) == (204 if drop_last else 213)


def test_batch_level_bucketing_on_several_hosts_is_refused():
    with pytest.raises(SpecError, match=r"hosts of one step need the same shapes"):
        shmfeed.Loader(TokenBatches(), batch_size=None, num_workers=0, max_batch_rows=4, shard_count=2,
                       padded_shapes=((None, 2), None), bucket_boundaries=[3, 5, 8])


def test_global_batches_and_resume_are_the_same_for_one_or_two_hosts():
    src = Tokens(130)
    with _loader(src, 0, batch_size=8) as one:
        reference = [copy_tree(b) for b in one]
    hosts = []
    for h in range(2):
        with _loader(src, 0, batch_size=4, shard_index=h, shard_count=2) as loader:
            got = []
            for i, b in enumerate(loader):
                got.append(copy_tree(b))
                if i == 5:
                    state = loader.state_dict()
                    break
            hosts.append(got)
    for g, (a, b) in enumerate(zip(*hosts)):
        np.testing.assert_array_equal(np.concatenate([a["tokens"], b["tokens"]]), reference[g]["tokens"])
    with _loader(src, 2, batch_size=8) as one:  # two hosts' state, resumed on one at 2 x 4 = 8
        one.load_state_dict(state)
        rest = [copy_tree(b) for b in one]
    for a, b in zip(rest, reference[6:], strict=True):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
        np.testing.assert_array_equal(a["label"], b["label"])
