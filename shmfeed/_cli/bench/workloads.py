"""The benchmark's workloads: what data, what per-sample work, what batch size.

Owns the synthetic data files and the datasets every loader reads them through.

Invariants:
- Data files are a pure function of (kind, shape, dtype, rows, `DATA_VERSION`): they
  are generated once, deterministically, into the cache directory, written under a
  temporary name and renamed, so a reader never sees half a file and concurrent runs
  can share the cache.
- Every loader reads the very same dataset object type: a per-sample source
  `ds[i] -> {"x": array, "y": int}` over `np.load(path, mmap_mode="r")` (opened lazily
  in the process that reads, so forked workers each map the file themselves), or,
  for `batchlevel`, a batch-level source `ds[b] -> int32[rows, 512]` slicing an
  in-memory array.  Adapters add no work of their own beyond their loader's.
- The array workloads (`Workload.arrays`) read the file itself through
  `shmfeed.sources.Arrays` (rows) or `Windows` (token windows), whose length is the
  file's; shmfeed gathers their batches by index, the in-process reference reads the
  same indices with `x[idx]` (or slices), and the other peers do not apply.  Both
  drop the last partial batch, so every batch is whole.
- `images-jpeg` reads a folder of real JPEG files instead (`root/<class>/<n>.jpg`,
  written once, the same way, under a temporary name and renamed) through
  `shmfeed.sources.ImageFolder`: every loader pays the same Pillow decode and resize.
- `stream-shards` reads NUM_SHARDS `.npy` files of token rows of unequal lengths
  (`root/shard-NN.npy`, written once into a temporary folder and renamed) through
  `ShardFiles`: shmfeed as `shmfeed.sources.Stream(files, num_shards=NUM_SHARDS)`,
  torch as an `IterableDataset` that deals the files out to its workers, in-process
  round-robin over the shards as shmfeed orders them.  Its epoch is the files, read
  once each: every loader delivers every row once per epoch, none twice.
- A headspace run reads `replay(source)`: the source's first sample (or batch, or
  row) built once and handed out for every index, through the same type the
  adapters recognise, so a loader does all its own work and the source none.  The
  array workloads have none: their source is already a gather from memory, which is
  the loader's own work.
- A per-sample dataset is longer than its file: sample `i` reads row `i % rows`.  Epochs are
  then long enough that a few-seconds measurement is not dominated by epoch ends,
  while the file stays small enough to live in the page cache.
"""

from __future__ import annotations

import itertools
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import shmfeed
from shmfeed.sources import Arrays, ImageFolder, Windows

DATA_VERSION = 1  # bump when the generator changes: old files are then ignored
DATA_SEED = 20240605
WARM_CHUNK_BYTES = 16 << 20  # page-cache warming reads the file in pieces this big
GENERATE_CHUNK_BYTES = 64 << 20  # the generator fills the file in pieces this big
SAMPLES_PER_EPOCH = 1 << 20  # per-sample workloads: samples in one epoch
BATCHES_PER_EPOCH = 1 << 17  # batch-level workload: batches in one epoch
N_CLASSES = 1000  # labels `y` are in [0, N_CLASSES)

# The `images` augmentation: a random CROP x CROP window, a random horizontal flip,
# per-channel normalisation to float32.
CROP = 192
MEAN = np.array([123.7, 116.3, 103.5], np.float32)
INV_STD = (1.0 / np.array([58.4, 57.1, 57.4], np.float32)).astype(np.float32)
# The `compute` work: this many rounds of y = tanh(1.5 y + 0.25) on a 64x64x3 float32
# sample, about 1 ms on a 2020s x86 core (the JSON reports what it cost in the run).
COMPUTE_ROUNDS = 100
_PEER_RNG_STREAM = 0x42454E43  # "BENC": keys the generator peers get (see sample_rng)
VOCABULARY = 50_257  # token ids of the token stream are below this (GPT-2's vocabulary)
WINDOW_BLOCK = 1024  # `windows`: nanoGPT windows of WINDOW_BLOCK + 1 tokens, stride WINDOW_BLOCK
DISK_STEP_MS = 20.0  # `disk-images`: the simulated training step
NUM_SHARDS = 8  # `stream-shards`: files of the stream
SHARD_WEIGHT_BASE = 8  # shard k holds a share of the rows proportional to BASE + k: unequal


@dataclass(frozen=True)
class DataFile:
    kind: str
    shape: tuple[int, ...]  # of one row
    dtype: str
    rows: int  # default number of rows; `--data-rows` overrides it

    @property
    def is_folder(self) -> bool:
        """A folder: of JPEG files (rows = files; `shape` is what they decode to), or of
        NUM_SHARDS shard files (rows = their rows together)."""
        return self.kind in ("jpeg", "shards")

    def file_name(self, rows: int) -> str:
        dims = "x".join(map(str, self.shape)) or "flat"
        suffix = "" if self.is_folder else ".npy"
        return f"{self.kind}-{dims}-{self.dtype}-r{rows}-v{DATA_VERSION}{suffix}"


IMAGES = DataFile("images", (224, 224, 3), "uint8", 1024)  # 154 MB
FEATURES = DataFile("features", (64, 64, 3), "float32", 1024)  # 50 MB
TOKENS = DataFile("tokens", (512,), "int32", 16384)  # 34 MB
TOKENS_LARGE = DataFile("tokens", (512,), "int32", 65536)  # 134 MB
IMAGES_LARGE = DataFile("images", (224, 224, 3), "uint8", 2048)  # 308 MB
TOKEN_STREAM = DataFile("tokenstream", (), "uint16", 100_000_000)  # 200 MB
JPEGS = DataFile("jpeg", (224, 224, 3), "uint8", 512)  # 512 files of JPEG_SIZE, ~25 MB
JPEG_SIZE = (375, 500)  # (height, width) of the files: the median ImageNet photo
JPEG_QUALITY = 90
JPEG_CLASSES = 8
SHARDS = DataFile("shards", (512,), "int32", 65536)  # NUM_SHARDS files, 134 MB together


@dataclass(frozen=True)
class Workload:
    name: str
    data: DataFile
    batch_size: int  # default; for `batchlevel`, the rows of each source batch
    work: str  # "none" | "copy" | "copy-flip" | "augment" | "compute" | "decode"
    batch_level: bool
    about: str
    arrays: str | None = None  # "rows": Arrays over the file; "windows": Windows over it
    cold: bool = False  # the file's pages are dropped from the page cache at every epoch start
    step_ms: float = 0.0  # a simulated training step after every batch
    stream: bool = False  # a sharded stream (`ShardFiles`), not an indexed source


WORKLOADS: dict[str, Workload] = {w.name: w for w in [
    Workload("transport", IMAGES, 64, "none", False,
             "224x224x3 uint8 samples from a memory-mapped file, no work (batch 64: 9.6 MB)"),
    Workload("images", IMAGES, 64, "augment", False,
             f"224x224x3 uint8 samples, random {CROP}x{CROP} crop, flip and normalise to float32 "
             "with the sample's keyed RNG"),
    Workload("samples-large", IMAGES, 64, "copy", False,
             "224x224x3 uint8 samples returned as FRESH arrays (`np.array(mm[r])`, as a decoder or "
             "a reader would), no other work (batch 64: 9.6 MB)"),
    Workload("samples-large-flip", IMAGES, 64, "copy-flip", False,
             "samples-large plus a random horizontal flip per sample (a second fresh array, half "
             "the time), drawn from the sample's keyed RNG"),
    Workload("compute", FEATURES, 32, "compute", False,
             "64x64x3 float32 samples with ~1 ms of numpy work each (batch 32)"),
    Workload("tokens", TOKENS, 32, "none", False, "512 int32 tokens per sample, no work (batch 32)"),
    Workload("images-jpeg", JPEGS, 64, "decode", False,
             f"real {JPEG_SIZE[1]}x{JPEG_SIZE[0]} JPEG files decoded with Pillow and resized to "
             "224x224x3 uint8 (shmfeed.sources.ImageFolder; every peer decodes the same way)"),
    Workload("batchlevel", TOKENS, 32, "none", True,
             "a batch-level source (`batch_size=None`): source[b] is a 32x512 int32 slice "
             "of an in-memory array"),
    Workload("arrays-tokens", TOKENS_LARGE, 32, "none", False,
             "shmfeed.sources.Arrays over a 65536x512 int32 memmap, 32 rows gathered by index; "
             "in-process: x[idx] on the same indices", arrays="rows"),
    Workload("arrays-images", IMAGES_LARGE, 64, "none", False,
             "shmfeed.sources.Arrays over a 2048x224x224x3 uint8 memmap, 64 rows gathered by index; "
             "in-process: x[idx]", arrays="rows"),
    Workload("windows", TOKEN_STREAM, 32, "none", False,
             f"shmfeed.sources.Windows over a 100M-token uint16 memmap, {WINDOW_BLOCK + 1}-token windows "
             f"with stride {WINDOW_BLOCK} (nanoGPT); in-process: slicing", arrays="windows"),
    Workload("disk-images", IMAGES_LARGE, 64, "none", False,
             "arrays-images with the file's pages dropped from the page cache at every epoch start "
             f"(posix_fadvise DONTNEED) and a {DISK_STEP_MS:.0f} ms simulated step per batch: "
             "workers read while the step runs", arrays="rows", cold=True, step_ms=DISK_STEP_MS),
    Workload("stream-shards", SHARDS, 32, "none", False,
             f"shmfeed.sources.Stream over {NUM_SHARDS} .npy files of 512 int32 tokens per row (unequal "
             "lengths), batches of 32 consecutive rows of one file; torch: an IterableDataset that deals the "
             "files out to its workers; in-process: the same round-robin; one epoch is every row once",
             stream=True),
]}
ARRAY_LOADERS = ("shmfeed", "inline")  # the loaders the array workloads apply to
STREAM_LOADERS = ("shmfeed", "inline", "torch")  # the loaders the stream workload applies to


def not_applicable(workload: Workload, loader: str) -> str | None:
    """Why `loader` does not run `workload` (the table's n/a), or None when it does."""
    if workload.arrays and loader not in ARRAY_LOADERS:
        return "n/a: array workloads compare shmfeed with in-process only"
    if workload.stream and loader not in STREAM_LOADERS:
        return "n/a: the stream workload compares shmfeed with in-process and torch's IterableDataset only"
    return None


def no_headspace(workload: Workload) -> str | None:
    """Why `workload` has no headspace run (see `replay`), or None when it has one."""
    if workload.arrays:
        return "none: the source is a gather from memory already, the loader's own work"
    return None


def default_data_dir() -> Path:
    env = os.environ.get("SHMFEED_BENCH_DATA")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "shmfeed" / "bench"


def _matches(path: Path, data: DataFile, rows: int) -> bool:
    if data.kind == "shards":
        return path.is_dir() and [len(a) for a in _shard_arrays(path, data)] == shard_rows(rows)
    if data.is_folder:
        return path.is_dir() and sum(1 for _ in path.glob("*/*.jpg")) == rows
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return arr.shape == (rows,) + data.shape and arr.dtype == np.dtype(data.dtype)


def ensure_file(data: DataFile, data_dir: Path, rows: int | None = None) -> tuple[Path, bool]:
    """The path of `data`'s file in `data_dir`, generating it if missing; and whether
    it was generated now."""
    rows = rows or data.rows
    path = data_dir / data.file_name(rows)
    if path.exists() and _matches(path, data, rows):
        return path, False
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if data.is_folder:
        _write_folder(tmp, path, data, rows)
        return path, True
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=data.dtype, shape=(rows,) + data.shape)
        rng = _data_rng(data)
        step = max(1, GENERATE_CHUNK_BYTES // max(1, out[0].nbytes))
        for start in range(0, rows, step):
            _fill(out[start : start + step], rng)
        out.flush()
        del out
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path, True


def _data_rng(data: DataFile) -> np.random.Generator:
    return np.random.default_rng([DATA_SEED, DATA_VERSION, sum(map(ord, data.kind))])


def _fill(out: np.ndarray, rng: np.random.Generator) -> None:
    """Fill `out` with random values of its dtype's kind of data."""
    if out.dtype == np.uint8:
        out[...] = rng.integers(0, 256, out.shape, dtype=np.uint8)
    elif out.dtype == np.int32:
        out[...] = rng.integers(0, 50_000, out.shape, dtype=np.int32)  # a vocabulary
    elif out.dtype == np.uint16:
        out[...] = rng.integers(0, VOCABULARY, out.shape, dtype=np.uint16)
    else:
        out[...] = rng.random(out.shape, dtype=np.float32)


def _write_folder(tmp: Path, path: Path, data: DataFile, rows: int) -> None:
    """Write `data`'s folder into `tmp` and rename it to `path`."""
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if data.kind == "shards":
            _write_shards(tmp, data, rows)
        else:
            _write_jpegs(tmp, rows)
        try:
            os.rename(tmp, path)
        except OSError:  # a concurrent run renamed its copy first: use that one
            if not _matches(path, data, rows):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_jpegs(tmp: Path, rows: int) -> None:
    """`rows` photo-like JPEG files (smooth colour fields with fine noise, which
    compress and decode like photographs, unlike pure noise) in JPEG_CLASSES class
    folders under `tmp`."""
    from PIL import Image  # the bench's images-jpeg workload needs Pillow, like ImageFolder

    rng = _data_rng(JPEGS)
    height, width = JPEG_SIZE
    for i in range(rows):
        folder = tmp / f"class{i % JPEG_CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))
        noise = rng.integers(-12, 13, field.shape)
        pixels = np.clip(field.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=JPEG_QUALITY)


def shard_rows(rows: int) -> list[int]:
    """Rows of each of the NUM_SHARDS shard files, `rows` together: unequal, none empty."""
    weights = np.arange(NUM_SHARDS) + SHARD_WEIGHT_BASE
    bounds = [0] + (rows * np.cumsum(weights) // weights.sum()).tolist()
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    if min(lengths) < 1:
        raise ValueError(f"{rows} rows leave a shard file empty: give at least "
                         f"{-(-weights.sum() // SHARD_WEIGHT_BASE)} rows (`--data-rows`)")
    return lengths


def _shard_paths(folder: Path) -> list[Path]:
    return [folder / f"shard-{k:02d}.npy" for k in range(NUM_SHARDS)]


def _shard_arrays(folder: Path, data: DataFile) -> list[np.ndarray]:
    """The shard files of `folder`, memory-mapped; [] when one is missing or unlike `data`."""
    out = []
    for p in _shard_paths(folder):
        try:
            arr = np.load(p, mmap_mode="r")
        except (OSError, ValueError):
            return []
        if arr.shape[1:] != data.shape or arr.dtype != np.dtype(data.dtype):
            return []
        out.append(arr)
    return out


def _write_shards(tmp: Path, data: DataFile, rows: int) -> None:
    tmp.mkdir(parents=True)
    rng = _data_rng(data)
    for p, n in zip(_shard_paths(tmp), shard_rows(rows)):
        out = np.empty((n,) + data.shape, data.dtype)
        _fill(out, rng)
        np.save(p, out)


def warm_page_cache(path: Path) -> None:
    """Read the file (or every file of the folder) once so that every loader starts
    with it in the page cache."""
    buf = bytearray(WARM_CHUNK_BYTES)
    for file in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        with open(file, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def drop_page_cache(path: str | Path) -> None:
    """Ask the kernel to forget `path`'s cached pages, so that the next reads go to disk
    (clean pages only: the files here are written once and flushed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# -- per-sample work -----------------------------------------------------------------
def sample_rng(seed: int, index: int) -> np.random.Generator:
    """shmfeed's keyed generator when shmfeed builds the sample; for the peers (where
    `shmfeed.rng()` does not apply) a generator keyed the same way, at the same cost."""
    if shmfeed.rng_key() is not None:
        return shmfeed.rng()
    return np.random.default_rng(np.random.SeedSequence([seed, 0, index, _PEER_RNG_STREAM]))


def augment(x: np.ndarray, g: np.random.Generator) -> np.ndarray:
    top, left = g.integers(0, x.shape[0] - CROP + 1, 2)
    view = x[top : top + CROP, left : left + CROP]
    if g.random() < 0.5:
        view = view[:, ::-1]
    out = view.astype(np.float32)
    out -= MEAN
    out *= INV_STD
    return out


def compute(x: np.ndarray) -> np.ndarray:
    y = np.array(x, dtype=np.float32)
    for _ in range(COMPUTE_ROUNDS):
        np.multiply(y, 1.5, out=y)
        np.add(y, 0.25, out=y)
        np.tanh(y, out=y)
    return y


# -- the datasets ----------------------------------------------------------------------
class SampleSource:
    """`ds[i] -> {"x": array, "y": int}`, reading row `i % rows` of a memory-mapped file."""

    def __init__(self, path: str, length: int, work: str, seed: int):
        self.path = str(path)
        self.length = int(length)
        self.work = work
        self.seed = int(seed)
        self._pid: int | None = None
        self._data: np.ndarray | None = None
        self._rows = 0

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_pid"], state["_data"] = None, None  # each process maps the file itself
        return state

    def __len__(self) -> int:
        return self.length

    def _open(self) -> np.ndarray:
        self._data = np.load(self.path, mmap_mode="r")
        self._rows = len(self._data)
        self._pid = os.getpid()
        return self._data

    def __getitem__(self, i: int) -> dict:
        data = self._data if self._pid == os.getpid() and self._data is not None else self._open()
        i = int(i)
        if not 0 <= i < self.length:
            raise IndexError(f"sample {i} out of range [0, {self.length})")
        x = data[i % self._rows]
        if self.work.startswith("copy"):
            x = np.array(x)
            if self.work == "copy-flip" and sample_rng(self.seed, i).random() < 0.5:
                x = np.ascontiguousarray(x[:, ::-1])
        elif self.work == "augment":
            x = augment(x, sample_rng(self.seed, i))
        elif self.work == "compute":
            x = compute(x)
        return {"x": x, "y": i % N_CLASSES}


class JpegSource:
    """`ds[i] -> {"x": uint8[224, 224, 3], "y": int}`: file `i % files` of a JPEG folder,
    decoded and resized by `shmfeed.sources.ImageFolder`."""

    def __init__(self, path: str, length: int):
        self.folder = ImageFolder(path, size=(JPEGS.shape[0], JPEGS.shape[1]))
        self.length = int(length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not 0 <= i < self.length:
            raise IndexError(f"sample {i} out of range [0, {self.length})")
        j = i % len(self.folder)
        return {"x": self.folder.load(j), "y": self.folder.samples[j][1]}


class BatchSource:
    """A batch-level source: `ds[b]` is rows `[j*r, (j+1)*r)` of an in-memory array,
    `j = b % (rows // r)`.  The array is read from the file at construction."""

    def __init__(self, path: str, batch_rows: int, length: int):
        data = np.load(path)
        self.batch_rows = int(batch_rows)
        self.n_distinct = len(data) // self.batch_rows
        if self.n_distinct < 1:
            raise ValueError(f"{path} has {len(data)} rows, fewer than one batch of {batch_rows}")
        self.data = np.ascontiguousarray(data[: self.n_distinct * self.batch_rows])
        self.length = int(length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, b: int) -> np.ndarray:
        b = int(b)
        if not 0 <= b < self.length:
            raise IndexError(f"batch {b} out of range [0, {self.length})")
        j = b % self.n_distinct
        r = self.batch_rows
        return self.data[j * r : (j + 1) * r]


class ShardFiles:
    """The `stream-shards` data: `files(s, num_shards)` yields the rows of shard file `s`
    as samples `{"x": int32[512]}` (the `make` of `shmfeed.sources.Stream`); `files[i]`
    is row `i` of the files read one after the other (what the runner's in-process
    references read).  Each process maps the files itself."""

    def __init__(self, folder: str):
        self.paths = [str(p) for p in _shard_paths(Path(folder))]
        self.lengths = [len(np.load(p, mmap_mode="r")) for p in self.paths]
        self.starts = np.cumsum([0] + self.lengths)
        self._pid: int | None = None
        self._files: list[np.ndarray] = []

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_pid"], state["_files"] = None, []  # each process maps the files itself
        return state

    def __call__(self, shard_index: int, num_shards: int):
        for row in np.load(self.paths[shard_index], mmap_mode="r"):
            yield {"x": row}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> dict:
        if self._pid != os.getpid():
            self._files = [np.load(p, mmap_mode="r") for p in self.paths]
            self._pid = os.getpid()
        s = int(np.searchsorted(self.starts, i, side="right")) - 1
        return {"x": self._files[s][i - self.starts[s]]}

    def round_robin(self, batch_size: int):
        """One epoch of batches in shmfeed's Stream order: a batch is the next
        `batch_size` rows of one shard, the shards still running take turns, and the
        batch in which a shard ends is shorter (not delivered when empty)."""
        running = [iter(self(s, len(self.paths))) for s in range(len(self.paths))]
        while running:
            still = []
            for it in running:
                samples = list(itertools.islice(it, batch_size))
                if samples:
                    yield {"x": np.stack([s["x"] for s in samples])}
                if len(samples) == batch_size:
                    still.append(it)
            running = still


# -- the zero-cost sources of the headspace runs ----------------------------------------
class Replay:
    """Marks a zero-cost source: every item is one built at construction."""


class ReplaySamples(Replay):
    """`ds[i]`: sample 0 of a per-sample source, for every `i < len(source)`."""

    def __init__(self, source: SampleSource | JpegSource):
        first = source[0]
        self.x = np.array(first["x"])
        self.x.flags.writeable = False  # a loader that wrote into it would change every batch
        self.y = first["y"]
        self.length = len(source)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        if not 0 <= int(i) < self.length:
            raise IndexError(f"sample {i} out of range [0, {self.length})")
        return {"x": self.x, "y": self.y}


class ReplayBatches(BatchSource, Replay):
    """`ds[b]`: batch 0 of a batch-level source, for every `b < len(source)`."""

    def __init__(self, source: BatchSource):  # (not BatchSource's: no file is read)
        self.batch = np.array(source[0])
        self.batch.flags.writeable = False
        self.batch_rows, self.n_distinct, self.length = source.batch_rows, 1, source.length

    def __getitem__(self, b: int) -> np.ndarray:
        if not 0 <= int(b) < self.length:
            raise IndexError(f"batch {b} out of range [0, {self.length})")
        return self.batch


class ReplayShards(ShardFiles, Replay):
    """Each shard file's first row as every row of that shard (rows differ between
    shards, as Stream checks), as many rows as the files hold."""

    def __init__(self, source: ShardFiles):  # (not ShardFiles's: no file is read)
        self.paths, self.lengths, self.starts = source.paths, source.lengths, source.starts
        self._pid, self._files = None, []
        self.rows = [np.array(source[int(start)]["x"]) for start in self.starts[:-1]]
        for row in self.rows:
            row.flags.writeable = False

    def __call__(self, shard_index: int, num_shards: int):
        row = self.rows[shard_index]
        for _ in range(self.lengths[shard_index]):
            yield {"x": row}

    def __getitem__(self, i: int) -> dict:
        return {"x": self.rows[int(np.searchsorted(self.starts, i, side="right")) - 1]}


def replay(source):
    """The zero-cost twin of `source` for a headspace run (see the module docstring)."""
    if isinstance(source, BatchSource):
        return ReplayBatches(source)
    if isinstance(source, ShardFiles):
        return ReplayShards(source)
    if isinstance(source, (SampleSource, JpegSource)):
        return ReplaySamples(source)
    raise TypeError(f"no replay of a {type(source).__name__}: the array workloads have no headspace run")


def make_source(workload: Workload, path: str, *, batch_size: int, length: int | None, seed: int):
    if workload.stream:
        return ShardFiles(path)
    if workload.arrays == "rows":
        return Arrays(np.load(path, mmap_mode="r"))
    if workload.arrays == "windows":
        return Windows(np.load(path, mmap_mode="r"), WINDOW_BLOCK + 1, stride=WINDOW_BLOCK)
    if workload.batch_level:
        return BatchSource(path, batch_size, length or BATCHES_PER_EPOCH)
    if workload.data.is_folder:
        return JpegSource(path, length or SAMPLES_PER_EPOCH)
    return SampleSource(path, length or SAMPLES_PER_EPOCH, workload.work, seed)


# -- what the in-process, pickling and Keras adapters assemble -------------------------
def collate(samples: list[dict]) -> dict:
    """Stack samples `{"x": array, "y": int}` into `{"x": array[n, ...], "y": int64[n]}`
    (what shmfeed and torch's default_collate also produce)."""
    return {
        "x": np.stack([s["x"] for s in samples]),
        "y": np.array([s["y"] for s in samples], dtype=np.int64),
    }


def in_process_batch(workload: Workload, data: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """What the in-process reference reads for an array workload: `data[idx]`, or the
    windows starting at `idx * WINDOW_BLOCK` sliced and stacked."""
    if workload.arrays == "windows":
        n = WINDOW_BLOCK + 1
        return np.stack([data[s : s + n] for s in (idx * WINDOW_BLOCK).tolist()])
    return data[idx]


def epoch_order(length: int, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    """Sample (or batch) order of one epoch for the adapters that choose it themselves."""
    if shuffle:
        return np.random.default_rng([seed, epoch]).permutation(length)
    return np.arange(length)
