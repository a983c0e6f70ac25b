"""`Loader(batch_transform=fn)` (issue 28): fn runs where the batch is built, on the
built batch, keyed per batch; its result is what lands in the slot, the same for any
`num_workers` and after a resume; a result unlike batch 0's names the batch and leaf."""

from __future__ import annotations

import json

import numpy as np
import pytest

import shmfeed
from shmfeed.sources import Arrays


class Rows:
    """Sample i: {'x': float32[4] of i, 'y': i}; big=True: 16 KiB rows (written a row
    at a time, see _build.ROW_AT_A_TIME_MIN_BYTES)."""

    def __init__(self, n: int, big: bool = False):
        self.n, self.width = n, 4096 if big else 4

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"x": np.full(self.width, i + shmfeed.rng().random(), np.float32), "y": i}


def mixup(batch):
    """Mix each row with a shuffled partner, by a per-batch weight; ids become float."""
    r = shmfeed.rng()
    lam = np.float32(r.beta(0.4, 0.4))
    perm = r.permutation(len(batch["y"]))
    return {"x": lam * batch["x"] + (1 - lam) * batch["x"][perm],
            "y": np.stack([batch["y"], batch["y"][perm]], axis=1).astype(np.float32),
            "pid": np.full(len(batch["y"]), 0, np.int32)}


def _flat(batch) -> bytes:
    return b"".join(np.ascontiguousarray(batch[k]).tobytes() for k in sorted(batch))


def _run(loader, epochs: int) -> list[list[bytes]]:
    return [[_flat(b) for b in loader] for _ in range(epochs)]


@pytest.mark.parametrize("big", [False, True])
def test_transform_result_lands_in_the_slot_the_same_for_any_workers(big):
    kw = dict(batch_size=64 if big else 4, shuffle=True, seed=1, batch_transform=mixup)
    n = 64 * 5 + 3 if big else 23  # a short last batch: the transform sees its rows only
    with shmfeed.Loader(Rows(n, big), num_workers=0, **kw) as ref:
        assert ref.spec.describe().startswith("['x']: float32")
        reference = _run(ref, 2)
        assert [len(b["y"]) for b in ref] == [kw["batch_size"]] * (n // kw["batch_size"]) + [3]
    with shmfeed.Loader(Rows(n, big), num_workers=2, **kw) as two:
        assert _run(two, 2) == reference
    b0 = reference[0][0]
    with shmfeed.Loader(Rows(n, big), num_workers=0, **{**kw, "batch_transform": None}) as plain:
        assert _flat(next(iter(plain))) != b0  # the transform ran


def test_transform_resumes_mid_epoch_bit_identical():
    kw = dict(batch_size=4, shuffle=True, seed=2, batch_transform=mixup)
    with shmfeed.Loader(Rows(30), num_workers=0, **kw) as ref:
        reference = _run(ref, 2)
    with shmfeed.Loader(Rows(30), num_workers=2, **kw) as first:
        for _ in first:
            pass
        got = []
        for i, b in enumerate(first):
            got.append(_flat(b))
            if i == 2:
                state = json.loads(json.dumps(first.state_dict()))
                break
    with shmfeed.Loader(Rows(30), num_workers=1, **kw) as second:
        second.load_state_dict(state)
        assert got + [_flat(b) for b in second] == reference[1]


def test_transform_runs_on_gathered_array_batches_too():
    x = np.arange(40, dtype=np.int32).reshape(20, 2)
    with shmfeed.Loader(Arrays(x), batch_size=5, num_workers=1,
                        batch_transform=lambda b: (b * 2).astype(np.int64)) as loader:
        got = np.concatenate([np.asarray(b) for b in loader])
    np.testing.assert_array_equal(got, x.astype(np.int64) * 2)


def test_transform_rng_is_keyed_per_batch_apart_from_the_samples():
    seen = []

    def draw(batch):
        return {"u": np.full(len(batch["y"]), shmfeed.rng().random())}
    with shmfeed.Loader(Rows(12), batch_size=4, num_workers=0, seed=3, batch_transform=draw) as loader:
        for b in loader:
            seen.append(float(b["u"][0]))
    assert len(set(seen)) == 3


class _Flaky:
    def __init__(self, bad_batch: int, how: str):
        self.bad_batch, self.how, self.calls = bad_batch, how, 0

    def __call__(self, batch):
        y = batch["y"]
        bad = int(y[0]) // 4 == self.bad_batch
        if self.how == "dtype":
            return {"x": batch["x"].astype(np.float64 if bad else np.float32)}
        if self.how == "shape":
            return {"x": batch["x"][:, :3] if bad else batch["x"]}
        return {"x": batch["x"][:2] if bad else batch["x"]}  # rows


@pytest.mark.parametrize(("how", "needle"), [
    ("dtype", r"batch 2, field \['x'\]: got dtype float64"),
    ("shape", r"batch 2, field \['x'\]: got dtype float32 shape \(4, 3\)"),
    ("rows", r"batch 2, field \['x'\]: has 2 rows, the batch it was given has 4"),
])
def test_transform_changing_a_leaf_between_batches_names_the_batch_and_leaf(how, needle):
    with shmfeed.Loader(Rows(16), batch_size=4, num_workers=1, batch_transform=_Flaky(2, how)) as loader:
        got = []
        with pytest.raises(shmfeed.SpecError, match=needle) as info:
            for b in loader:
                got.append(b["x"].copy())
        assert "`batch_transform` returned a result unlike batch 0's" in str(info.value)
        assert len(got) == 2  # batches 0 and 1 delivered first, in order


def test_transform_bad_arguments_are_refused_at_construction():
    with pytest.raises(shmfeed.SpecError, match="`batch_transform` must be a function"):
        shmfeed.Loader(Rows(8), batch_size=4, num_workers=0, batch_transform=3)
    with pytest.raises(shmfeed.SpecError, match="`batch_transform` with `bucket_boundaries`"):
        shmfeed.Loader([np.arange(i + 1) for i in range(8)], batch_size=4, num_workers=0,
                       padded_shapes=(None,), bucket_boundaries=[4, 8], bucket_lengths=list(range(1, 9)),
                       batch_transform=lambda b: b)
    with pytest.raises(shmfeed.SpecError, match="cannot be a batch"):
        shmfeed.Loader(Rows(8), batch_size=4, num_workers=0, batch_transform=lambda b: "text")
