"""Pipeline sources (issue 28): `Sampled`, `Mix`, `Packed`.  Each must give the same
batches for any `num_workers` and host count, resume exactly mid-epoch, keep its
semantics (weights, proportions, once per epoch) and refuse bad arguments by name."""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import shmfeed
from shmfeed.sources import Mix, Packed, Sampled
from shmfeed.sources._pipelines import MIX_PERIOD_MAX


class Ids:
    """Sample i is {'id': i, 'noise': a draw of shmfeed.rng()} (tags the source)."""

    def __init__(self, n: int, tag: int = 0):
        self.n, self.tag = n, tag

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"id": np.int64(self.tag * 1_000_000 + i), "noise": np.float32(shmfeed.rng().random())}


def _docs(n: int, seed: int = 0, mean: float = 300.0, max_len: int = 2048):
    """A flat token array and its n+1 boundaries: log-normal lengths (sigma 1, mean
    `mean`), clipped to [1, max_len]; document d's tokens are d*10000 + position."""
    r = np.random.default_rng(seed)
    lengths = np.clip(r.lognormal(np.log(mean) - 0.5, 1.0, n), 1, max_len).astype(np.int64)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    doc = np.repeat(np.arange(n, dtype=np.int64), lengths)
    tokens = doc * 10_000 + (np.arange(bounds[-1]) - bounds[doc]) + 1
    return tokens, bounds


def _flat(batch) -> bytes:
    return b"".join(np.ascontiguousarray(batch[k]).tobytes() for k in sorted(batch))


def _epochs(loader, n: int) -> list[list[bytes]]:
    return [[_flat(b) for b in loader] for _ in range(n)]


def _resumed(make, kw, before: int, after: int, k: int) -> list[bytes]:
    """Epoch 1 of a loader stopped after k batches (num_workers=before) and resumed
    from its state dict by another (num_workers=after)."""
    with shmfeed.Loader(make(), num_workers=before, **kw) as first:
        for _ in first:
            pass
        got = []
        for i, b in enumerate(first):
            got.append(_flat(b))
            if i == k - 1:
                state = json.loads(json.dumps(first.state_dict()))
                break
    with shmfeed.Loader(make(), num_workers=after, **kw) as second:
        second.load_state_dict(state)
        return got + [_flat(b) for b in second]


SOURCES = {
    "sampled": lambda: Sampled(Ids(50), np.arange(50) % 5, num_samples=60),
    "mix": lambda: Mix([Ids(30, 1), Ids(100, 2), Ids(7, 3)], [0.5, 0.3, 0.2], num_samples=70),
    "packed": lambda: Packed(*_docs(300, mean=60, max_len=200)[:1], 128,
                             boundaries=_docs(300, mean=60, max_len=200)[1], window=64),
}


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_pipeline_batches_do_not_depend_on_workers_and_resume_exactly(name):
    make = SOURCES[name]
    kw = dict(batch_size=8, seed=3)
    with shmfeed.Loader(make(), num_workers=0, **kw) as ref:
        reference = _epochs(ref, 2)
    assert reference[0] != reference[1]  # epochs differ: the source reads the loader's epoch
    with shmfeed.Loader(make(), num_workers=2, **kw) as two:
        assert _epochs(two, 2) == reference
    assert _resumed(make, kw, before=2, after=1, k=3) == reference[1]


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_pipeline_two_hosts_deliver_the_one_host_global_batches(name):
    make = SOURCES[name]
    with shmfeed.Loader(make(), num_workers=0, batch_size=8, seed=5, drop_last=True) as one:
        whole = [{k: np.asarray(v).copy() for k, v in b.items()} for b in one]
    halves = []
    for h in range(2):
        with shmfeed.Loader(make(), num_workers=1, batch_size=4, seed=5, drop_last=True,
                            shard_index=h, shard_count=2) as host:
            halves.append([{k: np.asarray(v).copy() for k, v in b.items()} for b in host])
    for g, batch in enumerate(whole):
        for key, value in batch.items():
            np.testing.assert_array_equal(np.concatenate([halves[0][g][key], halves[1][g][key]]), value)


# -- Sampled -------------------------------------------------------------------------------
def test_sampled_draws_in_proportion_to_weights_and_never_a_zero_weight():
    weights = np.array([0.0, 1.0, 2.0, 0.0, 7.0])
    s = Sampled(list(range(5)), weights, num_samples=20_000)
    counts = np.bincount([s.draw(i, seed=1, epoch=2) for i in range(20_000)], minlength=5)
    assert counts[0] == counts[3] == 0
    expected = 20_000 * weights / weights.sum()
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected + 1))  # 5 sigma
    assert [s.draw(i, seed=1, epoch=3) for i in range(50)] != [s.draw(i, seed=1, epoch=2) for i in range(50)]


@pytest.mark.parametrize(("weights", "needle"), [
    ([1.0, -1.0, 2.0], "`weights[1]` is -1.0"),
    ([1.0, float("nan"), 2.0], "`weights[1]` is nan"),
    ([0, 0, 0], "`weights` are all zero"),
    ([1, 2], "`weights` has 2 entries, the source has 3"),
])
def test_sampled_refuses_bad_weights_naming_them(weights, needle):
    with pytest.raises(shmfeed.SpecError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        Sampled([1, 2, 3], weights)


def test_sampled_refuses_an_empty_source_and_a_bad_num_samples():
    with pytest.raises(shmfeed.SpecError, match="`source` is empty"):
        Sampled([], [])
    with pytest.raises(shmfeed.SpecError, match="`num_samples` must be an integer > 0, got 0"):
        Sampled([1], [1], num_samples=0)


# -- Mix -------------------------------------------------------------------------------------
def _mix_errors(m: Mix, periods: int = 2) -> tuple[list[Fraction], list[Fraction]]:
    """Per source with weight > 0: the largest |draws - n * share| over every prefix, and
    over every window of consecutive positions, of `periods` periods of `m`'s schedule
    (the schedule repeats each period, so this covers every prefix and window)."""
    w, period = m._w, sum(m._w)
    n = periods * period
    sources = np.array([m.schedule(i)[0] for i in range(n)])
    prefix, window = [], []
    for k, wk in enumerate(w):
        if not wk:
            assert not (sources == k).any()
            continue
        counts = np.concatenate([[0], np.cumsum(sources == k)])
        scaled = counts * period - np.arange(n + 1) * wk  # period * (draws - n * share), exact
        prefix.append(Fraction(int(np.abs(scaled).max()), period))
        window.append(Fraction(int(scaled.max() - scaled.min()), period))  # worst window: max - min
    return prefix, window


@settings(max_examples=60, deadline=None)
@given(weights=st.lists(st.integers(0, 40), min_size=2, max_size=6).filter(lambda w: sum(w) > 0))
def test_mix_keeps_every_prefix_within_sigma_and_every_window_within_two_sigma(weights):
    m = Mix([Ids(10**6)] * len(weights), weights)
    live = sum(1 for x in weights if x)
    sigma = Fraction(2 * live - 3, 2 * live - 2) if live > 1 else Fraction(0)
    prefix, window = _mix_errors(m)
    assert max(prefix) <= sigma < 1
    assert max(window) <= 2 * sigma
    if live == 2:  # two sources: every window within less than one sample
        assert max(window) < 1
    for k in range(len(weights)):  # seats number each source's draws 0, 1, 2, ... across periods
        seats = [seat for src, seat in (m.schedule(i) for i in range(2 * sum(m._w))) if src == k]
        assert seats == list(range(len(seats)))


@pytest.mark.parametrize("weights", [[0.7, 0.3], [0.5, 0.3, 0.2], [0.6, 0.25, 0.1, 0.05], [1, 1, 1],
                                     [0.9, 0.05, 0.05], [3, 2, 2, 1, 1, 1], [11, 1, 7, 1, 1, 17]])
def test_mix_keeps_every_prefix_within_one_sample_of_its_share(weights):
    # [11, 1, 7, 1, 1, 17]: the Sainte-Lague seats used before ran 1.39 ahead of a share here
    prefix, window = _mix_errors(Mix([Ids(10**6)] * len(weights), weights))
    assert max(prefix) < 1 and max(window) < 2


def test_mix_rounds_weights_past_the_period_limit_to_shares_within_two_to_the_minus_16():
    weights = [1234567.0, 7654321.0, 3.0, 0.5]  # exact integers would repeat only after ~8.9e6 positions
    m = Mix([Ids(10**6)] * 4, weights)
    assert sum(m._w) <= MIX_PERIOD_MAX + len(weights)
    assert all(x > 0 for x in m._w)  # a tiny weight still draws
    exact = np.array(weights) / sum(weights)
    assert np.abs(np.array(m.proportions) - exact).max() < 2 / MIX_PERIOD_MAX
    prefix, window = _mix_errors(m, periods=1)
    assert max(prefix) <= Fraction(5, 6) and max(window) <= Fraction(5, 3)
    far = 10**12 + 17  # a pure function of the position: no replay to get there
    assert m.schedule(far)[0] == m.schedule(far % sum(m._w))[0]


def _longest_balanced(weights: list[int], strict: bool, limit: int) -> int:
    """The longest sequence (<= limit) of sources whose every window holds each source's
    share of it within 1 (strictly when `strict`), by exhaustive search."""
    total, k_count = sum(weights), len(weights)
    seq: list[int] = []
    prefix = [[0] * k_count]

    def fits() -> bool:
        n, last = len(seq), prefix[-1]
        for i in range(n):
            for k in range(k_count):
                off = abs((last[k] - prefix[i][k]) * total - (n - i) * weights[k])
                if off > total or (strict and off == total):
                    return False
        return True

    def extend() -> int:
        if len(seq) == limit:
            return limit
        best = len(seq)
        for k in range(k_count):
            seq.append(k)
            prefix.append([c + (j == k) for j, c in enumerate(prefix[-1])])
            if fits():
                best = max(best, extend())
            seq.pop()
            prefix.pop()
            if best == limit:
                break
        return best
    return extend()


def test_mix_within_one_on_every_window_is_impossible_for_some_three_source_weights():
    # 1:2:3: the third source must take every other position and the second one of every
    # three (windows of 2 and 3 hold exactly 1 of each), which collide by position 5.
    assert _longest_balanced([1, 2, 3], strict=True, limit=12) == 4
    # 1:2:8: not even |error| <= 1 holds past 9 positions.
    assert _longest_balanced([1, 2, 8], strict=False, limit=30) == 9
    # Two sources always can (the schedule does: see above), and so can 1:1:2.
    assert _longest_balanced([3, 5], strict=True, limit=30) == 30
    assert _longest_balanced([1, 1, 2], strict=True, limit=30) == 30


def test_mix_reads_each_source_without_repeats_until_exhausted_then_a_new_pass():
    m = Mix([Ids(7), Ids(5)], [0.5, 0.5], num_samples=10)  # 5 from each per epoch
    seen: dict[int, list[int]] = {0: [], 1: []}
    for epoch in range(3):
        for i in range(10):
            k, j = m.locate(i, seed=2, epoch=epoch)
            seen[k].append(j)
    a, b = seen[0], seen[1]  # 15 reads each: source 0 has 7 samples, source 1 has 5
    assert sorted(a[:7]) == sorted(a[7:14]) == list(range(7)) and a[:7] != a[7:14]
    assert sorted(b[:5]) == sorted(b[5:10]) == sorted(b[10:]) == list(range(5))
    assert len(Mix([Ids(30), Ids(100)], [0.5, 0.5])) == 60  # default epoch: the first source read once


@pytest.mark.parametrize(("weights", "needle"), [
    ([1.0, float("nan")], r"`weights\[1\]` is nan: weights must be finite and >= 0"),
    ([float("inf"), 1.0], r"`weights\[0\]` is inf"),
    ([0, 0], r"`weights` are all zero \(2 of them\)"),
    ([[1, 1]], r"`weights` must be 1-D, got shape \(1, 2\)"),
])
def test_mix_refuses_nan_infinite_all_zero_or_misshapen_weights_naming_them(weights, needle):
    with pytest.raises(shmfeed.SpecError, match=needle):
        Mix([Ids(3), Ids(3)], weights)


def test_mix_refuses_bad_weights_and_empty_sources_naming_them():
    with pytest.raises(shmfeed.SpecError, match="`weights` has 1 entries for 2 sources"):
        Mix([Ids(3), Ids(3)], [1])
    with pytest.raises(shmfeed.SpecError, match=r"`sources\[1\]` is empty"):
        Mix([Ids(3), []], [1, 1])
    with pytest.raises(shmfeed.SpecError, match=r"`weights\[0\]` is -0.5"):
        Mix([Ids(3), Ids(3)], [-0.5, 1])
    with pytest.raises(shmfeed.SpecError, match="`sources` is empty"):
        Mix([], [])


# -- Packed ----------------------------------------------------------------------------------
def _unpack(rows: list[dict]) -> dict[int, list[tuple[int, np.ndarray]]]:
    """doc -> [(first position, tokens)] of each piece, from packed rows."""
    pieces: dict[int, list] = {}
    for row in rows:
        seg, tok, pos = row["segment_ids"], row["tokens"], row["positions"]
        assert np.all(tok[seg == 0] == 0) and np.all(pos[seg == 0] == 0)
        assert np.all(np.diff(seg[seg > 0]) >= 0) and (seg[seg > 0][:1] == 1).all()
        for s in np.unique(seg[seg > 0]):
            t, p = tok[seg == s], pos[seg == s]
            assert np.array_equal(p, np.arange(p[0], p[0] + len(p)))  # positions count on
            pieces.setdefault(int(t[0] // 10_000), []).append((int(p[0]), t))
    return pieces


def test_packed_holds_every_document_once_per_epoch_with_long_ones_split():
    tokens, bounds = _docs(500, seed=1, mean=300, max_len=2048)
    p = Packed(tokens, 512, boundaries=bounds, window=100)
    for epoch in range(2):
        rows = [shmfeed.build_sample(p, i, seed=4, epoch=epoch) for i in range(len(p))]
        pieces = _unpack(rows)
        assert sorted(pieces) == list(range(500))
        for d, parts in pieces.items():
            parts.sort(key=lambda t: t[0])
            assert [start for start, _ in parts] == list(range(0, len(parts) * 512, 512))
            np.testing.assert_array_equal(np.concatenate([t for _, t in parts]), tokens[bounds[d]:bounds[d + 1]])


def test_packed_fills_at_least_95_percent_of_tokens_on_a_lognormal_mix():
    tokens, bounds = _docs(20_000, seed=0, mean=300, max_len=2048)
    p = Packed(tokens, 2048, boundaries=bounds)
    assert p.fill >= 0.95, p.fill
    assert p.n_tokens == len(tokens)


def test_packed_source_of_documents_matches_flat_tokens():
    tokens, bounds = _docs(200, seed=2, mean=50, max_len=300)
    docs = [tokens[bounds[d]:bounds[d + 1]] for d in range(200)]
    flat = Packed(tokens, 128, boundaries=bounds, window=32)
    listed = Packed(docs, 128, window=32)
    given = Packed(docs, 128, window=32, lengths=np.diff(bounds))
    assert len(flat) == len(listed) == len(given)
    for i in range(len(flat)):
        a, b = shmfeed.build_sample(flat, i, seed=1), shmfeed.build_sample(given, i, seed=1)
        assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("kwargs", "needle"), [
    (dict(length=0), "`length` must be an integer > 0, got 0"),
    (dict(length=16, window=-1), "`window` must be an integer > 0, got -1"),
    (dict(length=16, boundaries=[0, 3, 3, 6]), r"document 1 is empty \(`boundaries\[1\]`"),
    (dict(length=16, boundaries=[0, 3, 5]), "must start at 0 and end at len"),
])
def test_packed_refuses_bad_arguments_naming_them(kwargs, needle):
    with pytest.raises(shmfeed.SpecError, match=needle):
        Packed(np.arange(6), **kwargs)


def test_packed_refuses_an_empty_document_in_a_source_of_documents():
    with pytest.raises(shmfeed.SpecError, match="document 1 is empty"):
        Packed([np.arange(3), np.arange(0), np.arange(2)], 8)


def test_packed_refuses_no_documents_and_a_length_that_is_not_a_positive_integer():
    with pytest.raises(shmfeed.SpecError, match=r"`docs` is empty \(len 0\)"):
        Packed([], 8)
    with pytest.raises(shmfeed.SpecError, match=r"`boundaries` must be n\+1 >= 2 integer offsets .*shape \(1,\)"):
        Packed(np.arange(0), 8, boundaries=[0])
    with pytest.raises(shmfeed.SpecError, match=r"`length` must be an integer > 0, got -3"):
        Packed(np.arange(6), -3, boundaries=[0, 6])
    with pytest.raises(shmfeed.SpecError, match=r"`length` must be an integer > 0, got 2.5"):
        Packed(np.arange(6), 2.5, boundaries=[0, 6])


def test_mix_of_packed_sources_reads_each_in_its_own_order_every_document_once_per_pass():
    ta, ba = _docs(120, seed=3, mean=60, max_len=200)
    tb, bb = _docs(400, seed=4, mean=60, max_len=200)
    small, large = Packed(ta, 128, boundaries=ba, window=32), Packed(tb + 5_000_000, 128, boundaries=bb, window=32)
    m = Mix([small, large], [0.5, 0.5])  # an epoch reads `small` once: 2 * len(small) positions
    assert len(m) == 2 * len(small)
    for epoch in range(2):
        rows = [shmfeed.build_sample(m, i, seed=6, epoch=epoch) for i in range(len(m))]
        from_small = [r for r in rows if r["tokens"].max() < 5_000_000]
        assert len(from_small) == len(small)
        assert sorted(_unpack(from_small)) == list(range(120))
        if epoch == 0:
            first = [r["tokens"].tobytes() for r in from_small]
    assert [r["tokens"].tobytes() for r in from_small] != first  # the next pass: a new order


def test_pipeline_sources_travel_to_workers_started_in_a_fresh_interpreter():
    tokens, bounds = _docs(200, seed=5, mean=60, max_len=200)

    def make():
        packed = Packed(tokens, 128, boundaries=bounds, window=32)
        return Mix([packed, Sampled(packed, np.arange(len(packed)) % 3)], [0.6, 0.4], num_samples=40)
    with shmfeed.Loader(make(), batch_size=8, num_workers=0, seed=2) as ref:
        reference = _epochs(ref, 1)
    with shmfeed.Loader(make(), batch_size=8, num_workers=1, seed=2, start_method="spawn") as spawned:
        assert _epochs(spawned, 1) == reference
