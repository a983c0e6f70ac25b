"""The per-sample path writes a batch a leaf at a time (_rows.py): rows that are not
of the first sample's exact types but fit (a numpy scalar where the first sample had a
Python number, a 0-d array) are written as before, and a row that does not fit is a
SpecError naming its own sample, whatever row of the batch it is."""

from __future__ import annotations

import numpy as np
import pytest

import shmfeed


class Mixed:
    """Odd samples give numpy scalars / 0-d arrays where even ones give Python numbers."""

    def __len__(self):
        return 12

    def __getitem__(self, i):
        odd = i % 2 == 1
        return {"x": np.full((2, 3), i, np.int32),
                "y": np.int64(i) if odd else i,
                "w": np.asarray(i / 2) if odd else i / 2,
                "m": np.bool_(i > 5) if odd else bool(i > 5),
                "s": np.float32(i)}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_rows_that_fit_without_the_first_samples_exact_types_are_written(num_workers):
    with shmfeed.Loader(Mixed(), batch_size=5, num_workers=num_workers, shuffle=True, seed=4) as loader:
        batches = [{k: np.array(v) for k, v in b.items()} for b in loader]
    y = np.concatenate([b["y"] for b in batches])
    assert sorted(y.tolist()) == list(range(12))
    for b in batches:
        assert b["y"].dtype == np.int64 and b["w"].dtype == np.float64 and b["m"].dtype == np.bool_
        assert np.array_equal(b["x"], np.stack([np.full((2, 3), i, np.int32) for i in b["y"]]))
        assert np.array_equal(b["w"], b["y"] / 2) and np.array_equal(b["m"], b["y"] > 5)
        assert b["s"].dtype == np.float32 and np.array_equal(b["s"], b["y"].astype(np.float32))


class OneBad(Mixed):
    def __init__(self, bad_index, field, value):
        self.bad_index, self.field, self.value = bad_index, field, value

    def __getitem__(self, i):
        s = super().__getitem__(i)
        if i == self.bad_index:
            s[self.field] = self.value
        return s


@pytest.mark.parametrize("bad_index", [3, 4])  # a middle row and the last row of batch 0
@pytest.mark.parametrize("field, value, expected", [
    ("y", True, r"got a Python bool, expected a Python int"),
    ("x", np.zeros((2, 3), np.int64), r"got dtype int64, expected dtype int32 with shape \(2, 3\)"),
    ("x", np.zeros((3, 2), np.int32), r"got shape \(3, 2\)"),
    ("s", 1.0, r"got a Python float, expected dtype float32"),
])
def test_a_row_that_does_not_fit_names_its_sample_and_field(bad_index, field, value, expected):
    with shmfeed.Loader(OneBad(bad_index, field, value), batch_size=5, num_workers=0) as loader:
        with pytest.raises(shmfeed.SpecError, match=rf"sample {bad_index}, field \['{field}'\]: {expected}"):
            list(loader)
