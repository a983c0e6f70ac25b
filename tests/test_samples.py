"""Convertible samples (issue 15.3): a leaf numpy converts in one step (`__array__`,
`__array_interface__`: PyTorch CPU tensors, PIL images, JAX CPU arrays) is converted and
then checked like an array; text and bytes get an error that says what to do."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from _sources import Bad

import shmfeed


class FakeTensor:
    """Implements only `__array__`, like a torch tensor or a JAX array."""

    def __init__(self, value):
        self.value = value

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.value, dtype=dtype)


class FakeImage:
    """Exposes only `__array_interface__`, a property as on a PIL image."""

    def __init__(self, value):
        self._keep = np.ascontiguousarray(value)

    @property
    def __array_interface__(self):
        return self._keep.__array_interface__


class Wrapped:
    """Sample i: {'t': FakeTensor(float32[2, 3] of i), 'img': FakeImage(uint8[4, 4] of i), 'y': i}."""

    def __len__(self):
        return 10

    def __getitem__(self, i):
        return {"t": FakeTensor(np.full((2, 3), i, np.float32)),
                "img": FakeImage(np.full((4, 4), i, np.uint8)), "y": i}


class WrappedBatches:
    """Batch-level: batch b is (FakeTensor(float64[3, 2] of b), labels as int64[3])."""

    def __len__(self):
        return 4

    def __getitem__(self, b):
        return FakeTensor(np.full((3, 2), b, np.float64)), np.full(3, b, np.int64)


@pytest.mark.parametrize("num_workers", [0, 1, 2, 3])
def test_array_protocol_leaves_are_converted_and_arrive_as_arrays(num_workers):
    with shmfeed.Loader(Wrapped(), batch_size=4, num_workers=num_workers) as loader:
        assert loader.spec.describe() == "['t']: float32[4, 2, 3], ['img']: uint8[4, 4, 4], ['y']: int64[4]"
        got = [(b["t"][:, 0, 0].tolist(), b["img"][:, 1, 1].tolist(), b["y"].tolist()) for b in loader]
    assert got == [([0, 1, 2, 3],) * 3, ([4, 5, 6, 7],) * 3, ([8, 9],) * 3]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_batch_level_array_protocol_leaves_are_converted(num_workers):
    with shmfeed.Loader(WrappedBatches(), batch_size=None, num_workers=num_workers) as loader:
        got = [(x.dtype, x.shape, x[0, 0], y.tolist()) for x, y in loader]
    assert got == [(np.dtype(np.float64), (3, 2), b, [b] * 3) for b in range(4)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_converted_leaf_of_another_shape_names_sample_and_field(num_workers):
    bad = FakeTensor(np.zeros((3, 2), np.float32))
    with shmfeed.Loader(Bad(12, 5, bad), batch_size=4, num_workers=num_workers) as loader:
        with pytest.raises(shmfeed.SpecError, match=r"sample 5, field \['x'\]: got shape \(3, 2\), expected dtype float32 with shape \(2, 2\)"):
            for _ in loader:
                pass


class Refusing:
    """Like a CUDA tensor: has `__array__` but refuses to convert."""

    def __array__(self, dtype=None, copy=None):
        raise TypeError("can't convert cuda:0 device type tensor to numpy")


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_leaf_that_refuses_conversion_says_how_to_fix_it(num_workers):
    with shmfeed.Loader(Bad(8, 6, Refusing()), batch_size=4, num_workers=num_workers) as loader:
        with pytest.raises(shmfeed.SpecError, match=r"sample 6, field \['x'\]: a Refusing could not be converted to a numpy array \(TypeError: can't convert cuda.*detach\(\)\.cpu\(\)\.numpy\(\)"):
            for _ in loader:
                pass
    with pytest.raises(shmfeed.SpecError, match=r"sample 0, field \['x'\]: a Refusing could not be converted"):
        shmfeed.Loader(Bad(4, 0, Refusing()), batch_size=2, num_workers=0)


@pytest.mark.parametrize("value, kind", [("cat", "<U3"), (b"\x00\x01", "|S2")])
def test_text_where_the_first_sample_had_numbers_names_sample_and_field(value, kind):
    pattern = rf"sample 3, field \['x'\]: got dtype {kind}, expected dtype float32 with shape \(2, 2\)"
    with pytest.raises(shmfeed.SpecError, match=pattern):
        with shmfeed.Loader(Bad(8, 3, value), batch_size=4, num_workers=0) as loader:
            for _ in loader:
                pass


def test_pil_images_are_samples():
    Image = pytest.importorskip("PIL.Image")

    class Pictures:
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return Image.new("RGB", (5, 3), (i, 2 * i, 3 * i)), Image.new("L", (5, 3), i)

    with shmfeed.Loader(Pictures(), batch_size=3, num_workers=2) as loader:
        batches = [(rgb.copy(), gray.copy()) for rgb, gray in loader]
    assert [(rgb.dtype, rgb.shape, gray.shape) for rgb, gray in batches] == [(np.uint8, (3, 3, 5, 3), (3, 3, 5))] * 2
    rgb = np.concatenate([b[0] for b in batches])
    assert rgb[:, 1, 2].tolist() == [[i, 2 * i, 3 * i] for i in range(6)]
    assert np.concatenate([b[1] for b in batches])[:, 0, 0].tolist() == list(range(6))


def test_torch_cpu_tensors_are_samples_and_torch_is_not_imported_by_shmfeed():
    assert "torch" not in sys.modules or pytest.skip("torch was imported before this test")
    with shmfeed.Loader(Wrapped(), batch_size=4, num_workers=1) as loader:
        list(loader)
    assert "torch" not in sys.modules
    torch = pytest.importorskip("torch")

    class Tensors:
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {"x": torch.full((2, 2), float(i)), "y": torch.tensor(i)}

    with shmfeed.Loader(Tensors(), batch_size=4, num_workers=2) as loader:
        got = [(b["x"].dtype, b["x"][:, 0, 0].tolist(), b["y"].dtype, b["y"].tolist()) for b in loader]
    assert got == [(np.float32, [0, 1, 2, 3], np.int64, [0, 1, 2, 3]),
                   (np.float32, [4, 5, 6, 7], np.int64, [4, 5, 6, 7])]
