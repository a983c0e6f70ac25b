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


# -- the C loop for rows of the leaf's exact layout (shmfeed._kernels.stack_rows) -------------
def _stack(out, rows, fmt="i", shape=(4,)):
    from shmfeed._kernels import stack_rows

    return stack_rows(out, tuple(rows), np.ndarray, fmt, shape)


def test_stack_rows_copies_rows_of_the_exact_layout_and_stops_at_the_first_other():
    x = np.arange(24, dtype=np.int32).reshape(6, 4)
    out = np.full((6, 4), -1, np.int32)
    assert _stack(out, list(x)) == -1
    np.testing.assert_array_equal(out, x)

    class Sub(np.ndarray):  # a memmap's rows are a subclass too: copied like any array
        pass

    out[:] = -1
    assert _stack(out, [r.view(Sub) for r in x]) == -1
    np.testing.assert_array_equal(out, x)
    others = [x[0].astype(np.int64), x[0, :2], x[:, 0][:4], x[0].tobytes(), x[0].reshape(2, 2),
              x[0].tolist(), memoryview(x[0])]
    for other in others:  # another dtype or shape, a non-contiguous row, bytes, a list, a buffer
        out[:] = -1
        assert _stack(out, [x[1], x[2], other, x[3]]) == 2, other
        np.testing.assert_array_equal(out[:2], x[1:3])  # the rows before it are written
        assert (out[2:] == -1).all()  # nothing after it


def test_stack_rows_never_writes_past_its_output():
    x = np.ones((5, 4), np.int32)
    out = np.zeros((3, 4), np.int32)
    assert _stack(out, list(x)) == 3
    assert _stack(np.zeros((0, 4), np.int32), list(x)) == 0


@pytest.mark.parametrize("num_workers", [0, 2])
def test_per_sample_rows_of_mixed_layouts_come_out_right(num_workers):
    class Mixed:  # the C loop for most rows, the checked numpy path for a few
        def __len__(self):
            return 40

        def __getitem__(self, i):
            row = np.arange(i, i + 6, dtype=np.float32)
            if i % 7 == 3:
                return np.arange(i, i + 12, dtype=np.float32)[::2]  # not contiguous
            return row

    with shmfeed.Loader(Mixed(), batch_size=8, num_workers=num_workers) as loader:
        got = np.concatenate([b.copy() for b in loader])
    want = np.stack([Mixed()[i] for i in range(40)])
    np.testing.assert_array_equal(got, want)


# -- large samples: written a sample at a time, as each is made (_build.ROW_AT_A_TIME_MIN_BYTES) --
class Large:
    """Fresh ~150 KB samples (as a decoder or `np.array(mm[r])` gives them), one in seven
    of them not contiguous, every tenth label a numpy scalar: the row path's checks."""

    def __len__(self):
        return 40

    def __getitem__(self, i):
        x = np.full((100, 128, 3), i % 251, np.uint32)
        x[0, 0, 0] = i
        if i % 7 == 3:
            x = np.ascontiguousarray(x)[:, ::-1]
        return {"x": x, "y": np.int64(i) if i % 10 == 5 else i}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_large_samples_written_as_they_are_made_come_out_as_stacked(num_workers):
    from shmfeed._batch import build as _build

    x = Large()[0]["x"]  # the row path runs:
    assert 16 * x.nbytes >= _build.ROW_AT_A_TIME_MIN_BYTES and x.nbytes >= _build.ROW_AT_A_TIME_MIN_ROW_BYTES
    with shmfeed.Loader(Large(), batch_size=16, num_workers=num_workers, shuffle=True, seed=3) as loader:
        for _ in range(2):
            seen = []
            for b in loader:
                want = [Large()[int(i)] for i in b["y"]]
                np.testing.assert_array_equal(b["x"], np.stack([w["x"] for w in want]))
                seen += b["y"].tolist()
            assert sorted(seen) == list(range(40))


@pytest.mark.parametrize("bad_index", [16, 21])  # the first and a middle row of batch 1
def test_a_large_sample_that_does_not_fit_names_its_sample_and_field(bad_index):
    class Bad(Large):
        def __getitem__(self, i):
            s = super().__getitem__(i)
            if i == bad_index:
                s["x"] = s["x"][:50]
            return s

    with shmfeed.Loader(Bad(), batch_size=16, num_workers=0) as loader:
        with pytest.raises(shmfeed.SpecError, match=rf"sample {bad_index}, field \['x'\]: got shape \(50, 128, 3\)"):
            list(loader)


def test_a_large_sample_that_raises_is_named_with_its_index():
    class Raises(Large):
        def __getitem__(self, i):
            if i == 21:
                raise ValueError("unreadable record")
            return super().__getitem__(i)

    with shmfeed.Loader(Raises(), batch_size=16, num_workers=1) as loader:
        with pytest.raises(shmfeed.WorkerError, match=r"sample index 21") as info:
            list(loader)
    assert isinstance(info.value.__cause__, ValueError)


def test_large_fresh_samples_do_not_fault_in_every_batch():
    """The 4x regression of issue 24: 64 fresh 150 KB samples kept alive until the batch
    was written grew glibc's heap past its trim threshold, so every page of every batch
    faulted in again (~2,400 minor faults a batch).  Written as they are made, the
    same cache-hot memory is reused: a handful a batch."""
    import resource

    class Fresh:
        def __len__(self):
            return 64 * 40

        def __getitem__(self, i):
            return {"x": np.full((224, 224, 3), i % 256, np.uint8), "y": i}

    with shmfeed.Loader(Fresh(), batch_size=64, num_workers=0) as loader:
        it = iter(loader)
        for _ in range(5):  # warm: the ring's pages, the allocator
            next(it)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(30):
            next(it)
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 30
        del it
    assert faults < 200, f"{faults:.0f} minor page faults per 9.6 MB batch (a page is 4 KB: 2,352 a batch)"


def test_stack_rows_with_streaming_stores_copies_every_byte():
    from shmfeed._kernels import stack_rows

    rng = np.random.default_rng(0)
    for n in (1, 15, 16, 63, 64, 65, 1000, 150_531):  # around the 16-byte and 64-byte steps
        rows = [rng.integers(0, 256, n, dtype=np.uint8) for _ in range(3)]
        out = np.zeros(3 * n + 7, np.uint8)
        view = out[5 : 5 + 3 * n].reshape(3, n)  # a destination that is not 16-byte aligned
        assert stack_rows(view, tuple(rows), np.ndarray, "B", (n,), True) == -1
        np.testing.assert_array_equal(view, np.stack(rows))
        assert not out[:5].any() and not out[5 + 3 * n :].any()  # nothing around it


def test_workers_keep_the_memory_a_sample_frees_instead_of_faulting_it_in_again(tmp_path):
    """Pillow decoding a JPEG (a 750 KB RGBX image, then the resized one, both freed
    after the sample): glibc gave that memory back to the kernel past its trim threshold
    and every page faulted in again for the next sample (~470 faults a sample), unless
    the worker keeps what it frees (_worker.keep_freed_memory)."""
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    (tmp_path / "a").mkdir()
    for k in range(4):
        Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(tmp_path / "a" / f"{k}.jpg")
    folder = shmfeed.sources.ImageFolder(tmp_path, size=(224, 224))

    class Many:  # the 4 files, many times over
        def __len__(self):
            return 4096

        def __getitem__(self, i):
            return {"x": folder.load(i % 4), "y": i}

    with shmfeed.Loader(Many(), batch_size=16, num_workers=1) as loader:
        it = iter(loader)
        for _ in range(2 * loader.num_slots):
            next(it)
        (pid,) = loader.worker_pids
        before = _minor_faults(pid)
        for _ in range(20):
            next(it)
        faults = (_minor_faults(pid) - before) / 20 / 16
        del it
    assert faults < 150, f"{faults:.0f} minor faults per sample in the worker"


def _minor_faults(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])
