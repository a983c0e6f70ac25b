"""`shmfeed.sources.ImageFolder` (issue 15.4) on a folder of small generated JPEG and PNG
files: RGB, grayscale, palette and RGBA images of several sizes, a file that is not an
image, and corrupt files."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import shmfeed
from shmfeed._order.order import Order
from shmfeed.sources import ImageDecodeError, ImageFolder

Image = pytest.importorskip("PIL.Image")

SIZE = (6, 8)  # (height, width) every image is resized to


def _color(label: int, k: int) -> tuple[int, int, int]:
    return (40 * label + 10 * k, 200 - 30 * k, 17 * label + 3)


def _write_folder(root, corrupt: bool = False):
    """Three classes (folder names out of order on purpose); returns the expected
    (relative path, label, rgb colour, exact) of every image in sample order."""
    expected = []
    for label, name in enumerate(["ant", "bee", "cow"]):
        d = root / name
        (d / "more").mkdir(parents=True)
        for k in range(4):
            color = _color(label, k)
            size = (8 + 3 * k, 5 + 2 * k)  # (width, height): most need a resize
            if k == 0:  # grayscale JPEG
                gray = color[0]
                Image.new("L", size, gray).save(d / f"{k}.jpg", quality=95)
                expected.append((f"{name}/{k}.jpg", label, (gray,) * 3, False))
            elif k == 1:  # RGB JPEG
                Image.new("RGB", size, color).save(d / f"{k}.jpeg", quality=95)
                expected.append((f"{name}/{k}.jpeg", label, color, False))
            elif k == 2:  # palette PNG
                Image.new("RGB", size, color).convert("P").save(d / f"{k}.PNG")
                expected.append((f"{name}/{k}.PNG", label, None, True))
            else:  # RGBA PNG, in a subfolder
                Image.new("RGBA", size, color + (255,)).save(d / "more" / f"{k}.png")
                expected.append((f"{name}/more/{k}.png", label, color, True))
        (d / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    Image.new("RGB", (4, 4)).save(root / ".hidden" / "x.png")
    if corrupt:
        (root / "bee" / "1a.jpg").write_bytes(b"this is not a JPEG")
        good = root / "cow" / "1.jpeg"
        (root / "cow" / "1b.jpg").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    return expected


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return root, _write_folder(root)


def test_layout_labels_and_class_names(folder):
    root, expected = folder
    ds = ImageFolder(root, size=SIZE)
    assert ds.class_names == ["ant", "bee", "cow"]
    assert len(ds) == 12
    assert [(os.path.relpath(p, root), lab) for p, lab in ds.samples] == [(rel, lab) for rel, lab, _, _ in expected]
    assert ds.labels.tolist() == [lab for _, lab, _, _ in expected]


def test_samples_are_rgb_resized_with_their_label(folder):
    root, expected = folder
    ds = ImageFolder(str(root), size=SIZE)
    for i, (_, label, color, exact) in enumerate(expected):
        s = ds[i]
        assert s["label"] == label and type(s["label"]) is int
        assert s["image"].dtype == np.uint8 and s["image"].shape == SIZE + (3,)
        if color is not None:
            err = np.abs(s["image"].astype(int) - np.array(color)).max()
            assert err <= (0 if exact else 3), (i, s["image"][0, 0], color)
    gray = ds[0]["image"]
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()


@pytest.mark.parametrize("num_workers", [0, 1, 2, 3])
def test_loader_stream_equals_the_source_for_0_to_3_workers(folder, num_workers):
    root, _ = folder
    ds = ImageFolder(root, size=SIZE)
    want_images = np.stack([ds[i]["image"] for i in range(len(ds))])
    with shmfeed.Loader(ds, batch_size=5, num_workers=num_workers, shuffle=True, seed=3) as loader:
        for epoch in range(2):
            batches = [(b["image"].copy(), b["label"].copy()) for b in loader]
            assert [len(x) for x, _ in batches] == [5, 5, 2]
            o = Order(len(ds), 5, True, 3, False)
            order = np.concatenate([o.batch_items(epoch, b) for b in range(o.n_batches)])
            images = np.concatenate([x for x, _ in batches])
            labels = np.concatenate([y for _, y in batches])
            assert images.dtype == np.uint8 and images.shape == (12,) + SIZE + (3,)
            assert (images == want_images[order]).all()
            assert labels.tolist() == ds.labels[order].tolist()


@pytest.mark.parametrize("num_workers", [0, 1, 2, 3])
def test_corrupt_files_raise_in_batch_order_naming_the_file(tmp_path, num_workers):
    _write_folder(tmp_path, corrupt=True)
    ds = ImageFolder(tmp_path, size=SIZE)
    bad = [i for i, (p, _) in enumerate(ds.samples) if "1a.jpg" in p or "1b.jpg" in p]
    assert len(ds) == 14 and len(bad) == 2
    with shmfeed.Loader(ds, batch_size=2, num_workers=num_workers) as loader:
        got = []
        with pytest.raises(ImageDecodeError, match=r"cannot decode image '.*bee/1a\.jpg' \(sample "
                           rf"{bad[0]}, class 'bee'\): UnidentifiedImageError") as info:
            for b in loader:
                got += b["label"].tolist()
        assert isinstance(info.value, shmfeed.ShmfeedError)
        assert len(got) == bad[0] // 2 * 2  # every batch before the broken one arrived
        # The loader goes on: the next epoch meets the same file first.
        with pytest.raises(ImageDecodeError, match=r"bee/1a\.jpg"):
            for _ in loader:
                pass
    truncated = ds.samples[bad[1]][0]
    with pytest.raises(ImageDecodeError, match=rf"cannot decode image '{truncated}' .*class 'cow'"):
        ds[bad[1]]


@pytest.mark.parametrize("args, kwargs, pattern", [
    (("nowhere",), dict(size=SIZE), r"`root` 'nowhere' is not a directory"),
    ((".",), dict(size=(4,)), r"`size` must be \(height, width\), got \(4,\)"),
    ((".",), dict(size=(0, 4)), r"`size\[0\] \(height\)` must be an integer >= 1, got 0"),
    ((".",), dict(size=SIZE, interpolation="cubic"), r"`interpolation` must be one of"),
])
def test_bad_arguments_are_spec_errors(args, kwargs, pattern):
    with pytest.raises(shmfeed.SpecError, match=pattern):
        ImageFolder(*args, **kwargs)


def test_folders_without_classes_or_images_are_spec_errors(tmp_path):
    with pytest.raises(shmfeed.SpecError, match=r"has no class folders"):
        ImageFolder(tmp_path, size=SIZE)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("x")
    with pytest.raises(shmfeed.SpecError, match=r"no image files under the 1 class folder\(s\)"):
        ImageFolder(tmp_path, size=SIZE)


def test_missing_pillow_is_a_clear_error_and_shmfeed_imports_without_it(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        sys.modules["PIL"] = None  # as if Pillow were not installed
        import shmfeed
        from shmfeed.sources import ImageFolder
        try:
            ImageFolder({str(tmp_path)!r}, size=(4, 4))
        except shmfeed.ShmfeedError as e:
            print("ERROR:", e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "ERROR: ImageFolder decodes images with Pillow, which cannot be imported" in out.stdout, out.stderr
    assert "pip install 'shmfeed[images]'" in out.stdout


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest", "lanczos"])
def test_images_are_resized_with_the_interpolation_asked_bilinear_by_default(tmp_path, interpolation):
    """Keras resizes bilinearly, Pillow bicubically by default: the choice is the user's,
    and a silent difference from the model's other pipeline would shift its inputs."""
    (tmp_path / "c").mkdir()
    ramp = np.add.outer(np.arange(20) * 12, np.arange(15) * 5).astype(np.uint8)
    Image.fromarray(np.stack([ramp, ramp[::-1], ramp.T[:, ::-1].T], -1)).save(tmp_path / "c" / "x.png")
    kwargs = {} if interpolation == "bilinear" else {"interpolation": interpolation}
    got = ImageFolder(str(tmp_path), size=SIZE, **kwargs)[0]["image"]
    with Image.open(tmp_path / "c" / "x.png") as img:
        resample = getattr(Image.Resampling, interpolation.upper())
        want = np.asarray(img.convert("RGB").resize(SIZE[::-1], resample))
        other = np.asarray(img.convert("RGB").resize(SIZE[::-1], Image.Resampling.BOX))
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, other)  # the ramp tells interpolations apart
