"""`ImageFolder`: a per-sample source over the `root/<class>/<image>` layout that Keras
`image_dataset_from_directory` and torchvision's `ImageFolder` read.

Owns: finding the images (once, at construction: class folders sorted by name, the
files under each walked in sorted order, so labels and sample indices are a function
of the folder's contents only), and decoding one (Pillow, in the process that builds
the batch: RGB, resized to `size`).

Invariants:
- Sample i is `{"image": uint8[H, W, 3], "label": int}`; label k is `class_names[k]`.
- Pillow is imported lazily (it is the optional extra `shmfeed[images]`): importing
  shmfeed never needs it, and a missing Pillow is a `ShmfeedError` at construction.
- A file Pillow cannot decode raises `ImageDecodeError` naming the file; the Loader
  raises it in batch order, after every earlier batch.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .._config import check_int
from .._errors import ImageDecodeError, ShmfeedError, SpecError

# What Keras's image_dataset_from_directory and torchvision's ImageFolder accept.
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")


def _pillow() -> Any:
    try:
        from PIL import Image
    except ImportError as exc:
        raise ShmfeedError(
            f"ImageFolder decodes images with Pillow, which cannot be imported ({exc}). "
            "Install it: `pip install 'shmfeed[images]'` (or `pip install pillow`).") from exc
    return Image


def _image_files(folder: str, extensions: tuple[str, ...]) -> list[str]:
    """Image files under `folder` (any depth), sorted by path, following links."""
    found = []
    for here, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        found += [os.path.join(here, f) for f in sorted(files) if f.lower().endswith(extensions)]
    return found


class ImageFolder:
    """Images in `root/<class name>/...` as samples `{"image": uint8[H, W, 3], "label": int}`.

    Labels number the class folders in sorted order (`class_names[label]` is the
    folder's name).  Each image is decoded with Pillow where the batch is built (in a
    worker), converted to RGB (grayscale, palette and RGBA images too) and resized to
    `size=(height, width)` with `interpolation`: "bilinear" by default, as Keras's
    `image_dataset_from_directory` (Pillow's own default is "bicubic"), or one of
    "nearest", "bicubic", "lanczos", "box", "hamming".
    Use `shmfeed.rng()` in a subclass's `__getitem__` for random augmentation.
    """

    def __init__(self, root: str | os.PathLike, size: tuple[int, int], *,
                 interpolation: str = "bilinear", extensions: tuple[str, ...] = IMAGE_EXTENSIONS):
        image = _pillow()
        if not (isinstance(size, (tuple, list)) and len(size) == 2):
            raise SpecError(f"`size` must be (height, width), got {size!r}")
        self.size = (check_int("size[0] (height)", size[0], 1), check_int("size[1] (width)", size[1], 1))
        if interpolation not in INTERPOLATIONS:
            raise SpecError(f"`interpolation` must be one of {INTERPOLATIONS}, got {interpolation!r}")
        self.interpolation = interpolation
        self._resample = int(getattr(image.Resampling, interpolation.upper()))
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise SpecError(f"`root` {self.root!r} is not a directory; expected root/<class name>/<image files>")
        self.class_names = sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith("."))
        if not self.class_names:
            raise SpecError(f"`root` {self.root!r} has no class folders; expected root/<class name>/<image files>")
        exts = tuple(e.lower() for e in extensions)
        self.samples: list[tuple[str, int]] = [
            (path, label) for label, name in enumerate(self.class_names)
            for path in _image_files(os.path.join(self.root, name), exts)]
        if not self.samples:
            raise SpecError(
                f"no image files under the {len(self.class_names)} class folder(s) of {self.root!r} "
                f"(looked for {', '.join(exts)}); pass `extensions` for other names")

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> np.ndarray:
        """The label of every sample, in sample order (e.g. for class weights)."""
        return np.array([label for _, label in self.samples], np.int64)

    def load(self, i: int) -> np.ndarray:
        """Sample i's image as uint8[H, W, 3]."""
        path, label = self.samples[i]
        height, width = self.size
        try:
            with _pillow().open(path) as img:
                rgb = img.convert("RGB")
            if rgb.size != (width, height):
                rgb = rgb.resize((width, height), self._resample)
            return np.asarray(rgb)
        except Exception as exc:  # Pillow raises many kinds for a broken file
            raise ImageDecodeError(
                f"cannot decode image {path!r} (sample {i}, class {self.class_names[label]!r}): "
                f"{type(exc).__name__}: {exc}. Replace or remove the file; ImageFolder reads the "
                "folder once, so create a new one (and a new Loader) afterwards.") from exc

    def __getitem__(self, i: int) -> dict:
        return {"image": self.load(i), "label": self.samples[i][1]}

    def __repr__(self) -> str:
        return (f"ImageFolder({self.root!r}, size={self.size}, {len(self)} images, "
                f"{len(self.class_names)} classes)")
