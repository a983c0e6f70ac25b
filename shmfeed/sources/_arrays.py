"""Array sources (`shmfeed.sources.Arrays`, `shmfeed.sources.Windows`), how the Loader
reads an array (or a dict / tuple of arrays) given as its source, and the batch-gather
protocol that lets a worker fill a whole batch with no per-sample Python.

The gather protocol (shmfeed's own sources only, for now: these two and `Parquet` /
`Arrow` of sources/_parquet.py): `__shmfeed_gather__(indices,
out)` writes the rows `indices` (an int64 array, the Order's source indices of one
batch) into `out`, the slot's leaf views in spec order, each with room for at least
`len(indices)` rows.  `source[i]` still returns sample i (the spec is inferred from it,
and a plain loop may use it), and the two agree: the Builder (`_batch/build.py: gatherer`) takes the
gather path only for an `Arrays` or `Windows` whose leaves have the spec's dtypes and
row shapes, and only when `__getitem__` is the class's own (a subclass that augments
in `__getitem__` keeps the per-sample path).

Invariants:
- A batch gathered is byte for byte the batch `__getitem__` would give for the same
  indices: the order (shuffle, sharding, resume) is the Order's, as for any source.
- No copy of a whole array is ever made: rows are copied by index (`gather_rows` of
  csrc/kernels.c, one memcpy per row, GIL released for large batches, or, for a
  non-contiguous array, fancy indexing), and a memory-mapped file is read only where
  a batch needs it.
- In a worker, when every leaf is contiguous (`_row_copies`), the whole loop (claim,
  order, copy, publish) runs in C (csrc/gather.h; `Builder.gather_plan`), with the
  same `_row_copy` description of each leaf as the Python path.
- Pickling (workers started from a fresh interpreter) sends a memory-mapped file, not
  its content: shmfeed's pickler sends the open file itself (_processes/interpreter.py), a plain
  pickle its name.
"""

from __future__ import annotations

import math
import mmap
from typing import Any

import numpy as np

from .. import _kernels
from .._batch.spec import _NUMERIC_KINDS as NUMERIC_KINDS
from .._batch.spec import _path_str as path_str
from .._batch.spec import build_tree, unflatten
from .._errors import SpecError

# A list longer than this is a sequence of samples, never columns: nobody has this many
# aligned arrays, and the check stays O(1) for long lists of samples.
MAX_LIST_COLUMNS = 64


def _row_array(obj: Any, path: tuple, what: str) -> np.ndarray:
    """`obj` if it can be a column of rows (an array of numbers with a first axis)."""
    field = path_str(path) or "(root)"
    if not isinstance(obj, np.ndarray):
        raise SpecError(
            f"{what}, field {field}: got a value of type {type(obj).__name__}, expected a numpy "
            "array or memmap (a dict, tuple or list of them). Convert it with np.asarray, or open "
            "a file with np.load(path, mmap_mode='r').")
    if obj.ndim == 0:
        raise SpecError(f"{what}, field {field}: got a 0-d array, expected an array whose first "
                        "axis is the sample axis")
    if obj.dtype.kind not in NUMERIC_KINDS:
        raise SpecError(
            f"{what}, field {field}: dtype {obj.dtype} is not supported, expected bool, integer, "
            "float or complex. Encode strings/objects as numbers (e.g. token ids) first.")
    return obj


def _file_ref(arr: np.ndarray) -> tuple | None:
    """How to reopen `arr` in another process, if it is a whole memory-mapped file
    region (np.memmap / np.load(mmap_mode=...)) whose memory is the file's; None for
    anything else: a slice of a memmap keeps the parent's `offset`, and a copy-on-write
    map (mode "c") may hold changes the file does not, so those are sent by content."""
    if (isinstance(arr, np.memmap) and isinstance(arr.base, mmap.mmap) and arr.filename
            and arr.mode != "c"):
        order = "F" if arr.flags.f_contiguous and not arr.flags.c_contiguous else "C"
        return (arr.filename, arr.dtype.str, arr.shape, int(arr.offset), order)
    return None


class MappedFile:
    """A memory-mapped file in a source's pickled state (`ref`: see `_file_ref`).  A
    plain pickle reopens it by name; shmfeed's own (_interpreter.dump_source) sends the
    very file this process maps, as a descriptor, so that a name that now points
    elsewhere is never read."""

    def __init__(self, array: np.ndarray, ref: tuple):
        self.array = array
        self.ref = ref

    def __reduce__(self) -> tuple:
        return _reopen, self.ref


def _reopen(filename: str, dtype: str, shape: tuple, offset: int, order: str) -> np.memmap:
    return np.memmap(filename, dtype=np.dtype(dtype), mode="r", offset=offset, shape=shape, order=order)  # type: ignore[call-overload]


def _pickle_arrays(arrays: list[np.ndarray]) -> list:
    return [MappedFile(a, ref) if (ref := _file_ref(a)) is not None else a for a in arrays]


def _unpickle_arrays(items: list) -> list[np.ndarray]:
    return list(items)  # a MappedFile unpickles as its memmap


def _row_copy(rows: np.ndarray, base: np.ndarray | None = None,
              stride: int | None = None) -> tuple[np.ndarray, int, int] | None:
    """How C copies row i of `rows`: (source, stride, row_bytes), row i being the
    row_bytes bytes at byte i * stride of the contiguous `source` (`rows` itself, or
    the `base` it is a view of, for overlapping windows); None when rows cannot be
    copied that way (not contiguous, or empty)."""
    src = rows if base is None else base
    row_bytes = rows.itemsize * math.prod(rows.shape[1:])
    if not row_bytes or not src.flags.c_contiguous:
        return None
    return src, row_bytes if stride is None else stride, row_bytes


def _take_rows(rows: np.ndarray, copy: tuple[np.ndarray, int, int] | None, indices: np.ndarray,
               out: np.ndarray) -> None:
    """Rows `indices` of `rows` into the first rows of `out` (a slot's leaf, contiguous);
    `copy`: `_row_copy(rows, ...)`."""
    if copy is not None:
        # In C: one memcpy per row (a large batch bypasses the cache, see
        # csrc/kernels.h), no temporary, the GIL released for large batches.
        _kernels.gather_rows(*copy, indices, out)
    else:
        # Fancy indexing reads only the rows asked for (np.take would first make the
        # whole array contiguous).
        out[: len(indices)] = rows[indices]


class Arrays:
    """A source over arrays whose rows are samples.

    `data` is a numpy array or memmap, or a dict / tuple / list (nested as you like) of
    them, all with the same length (rows aligned).  Sample `i` has the same structure
    with row `i` of each array: `Arrays({"x": X, "y": y})[i] == {"x": X[i], "y": y[i]}`.

    With a Loader, a batch is copied from the arrays straight into its ring slot by
    index (in C, GIL released, no Python per sample), in the Loader's order.  There is
    no per-sample code, so `shmfeed.rng()` does not apply: augment on the device, or
    subclass and override `__getitem__` (which then takes the per-sample path).
    """

    def __init__(self, data: Any):
        arrays: list = []
        self._tree = build_tree(data, (), arrays, "Arrays", leaf=_row_array)
        if not arrays:
            raise SpecError("Arrays: got an empty dict/tuple/list, expected at least one array")
        lengths = {len(a) for _, a in arrays}
        if len(lengths) != 1:
            detail = ", ".join(f"{path_str(p) or '(root)'}: {len(a)}" for p, a in arrays)
            raise SpecError(
                f"Arrays: the arrays have different lengths ({detail}); every array must have "
                "one row per sample. Trim them to a common length, or pass the arrays that "
                "belong together only.")
        self._paths = [path_str(p) or "(root)" for p, _ in arrays]
        self._arrays = [a for _, a in arrays]
        self._n = lengths.pop()

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> Any:
        return unflatten(self._tree, [a[i] for a in self._arrays])

    def __shmfeed_gather__(self, indices: np.ndarray, out: list[np.ndarray]) -> None:
        for arr, copy, view in zip(self._arrays, self._row_copies(), out):
            _take_rows(arr, copy, indices, view)

    def _row_copies(self) -> list[tuple | None]:
        return [_row_copy(a) for a in self._arrays]

    def _leaf_rows(self) -> list[tuple[np.dtype, tuple]]:
        return [(a.dtype, tuple(a.shape[1:])) for a in self._arrays]

    def __repr__(self) -> str:
        fields = ", ".join(f"{p}: {a.dtype}{list(a.shape)}" for p, a in zip(self._paths, self._arrays))
        return f"shmfeed.sources.Arrays({self._n} samples; {fields})"

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_arrays"] = _pickle_arrays(self._arrays)
        return state

    def __setstate__(self, state: dict) -> None:
        state["_arrays"] = _unpickle_arrays(state["_arrays"])
        self.__dict__.update(state)


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise SpecError(f"Windows: `{name}` must be an integer >= 1, got {value!r}")
    return int(value)


class Windows:
    """Fixed-length windows over a 1-D token array or memmap: sample `i` is
    `tokens[i*stride : i*stride + length]` (`stride` defaults to `length`: windows
    side by side); `len` is the number of whole windows.

    The nanoGPT recipe, where a model of context `block_size` learns to predict each
    next token: windows of `block_size + 1` tokens that overlap by one,

        loader = shmfeed.Loader(Windows(np.memmap("train.bin", np.uint16, mode="r"),
                                        block_size + 1, stride=block_size),
                                batch_size=64, num_workers=4, shuffle=True)
        for w in loader:
            x, y = w[:, :-1], w[:, 1:]   # inputs and next-token targets

    (or windows of `block_size + 1` with `stride=1` for every offset).  Batches are
    gathered by index as for `Arrays`: no per-sample Python.
    """

    def __init__(self, tokens: np.ndarray, length: int, stride: int | None = None):
        if not isinstance(tokens, np.ndarray):
            raise SpecError(
                f"Windows: `tokens` must be a 1-D numpy array or memmap, got {type(tokens).__name__}. "
                "Open a token file with np.memmap(path, dtype=np.uint16, mode='r').")
        if tokens.ndim != 1:
            raise SpecError(f"Windows: `tokens` must be 1-D, got shape {tuple(tokens.shape)}; "
                            "flatten it (tokens.reshape(-1)) or use `Arrays` for rows")
        if tokens.dtype.kind not in NUMERIC_KINDS:
            raise SpecError(f"Windows: `tokens` has dtype {tokens.dtype}, expected integers (token ids) "
                            "or another numeric dtype")
        length = _check_count("length", length)
        stride = length if stride is None else _check_count("stride", stride)
        if length > len(tokens):
            raise SpecError(f"Windows: `length={length}` is longer than the {len(tokens)} tokens; "
                            "pass a shorter `length` or more tokens")
        self.tokens = tokens
        self.length = length
        self.stride = stride
        self._n = (len(tokens) - length) // stride + 1
        self._windows = self._window_view()

    def _window_view(self) -> np.ndarray:
        """Every window as a row of a read-only strided view (no copy)."""
        t = self.tokens
        return np.lib.stride_tricks.as_strided(
            t, shape=(self._n, self.length), strides=(self.stride * t.strides[0], t.strides[0]),
            writeable=False)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(f"window {i} out of range: {self._n} windows of {self.length} tokens")
        start = i * self.stride
        return self.tokens[start : start + self.length]

    def __shmfeed_gather__(self, indices: np.ndarray, out: list[np.ndarray]) -> None:
        _take_rows(self._windows, self._row_copies()[0], indices, out[0])

    def _row_copies(self) -> list[tuple | None]:
        return [_row_copy(self._windows, self.tokens, self._windows.strides[0])]

    def _leaf_rows(self) -> list[tuple[np.dtype, tuple]]:
        return [(self.tokens.dtype, (self.length,))]

    def __repr__(self) -> str:
        return (f"shmfeed.sources.Windows({self._n} windows of {self.length} tokens, stride {self.stride}, "
                f"over {len(self.tokens)} {self.tokens.dtype} tokens)")

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_windows"]  # a view: rebuilt on the other side, never sent
        state["tokens"] = _pickle_arrays([self.tokens])[0]
        return state

    def __setstate__(self, state: dict) -> None:
        state["tokens"] = _unpickle_arrays([state["tokens"]])[0]
        self.__dict__.update(state)
        self._windows = self._window_view()


def _aligned_columns(items: list) -> bool:
    """Whether `items` look like columns: arrays of one length that cannot be samples
    of one spec (their shapes or dtypes differ)."""
    if not 2 <= len(items) <= MAX_LIST_COLUMNS:
        return False
    if not all(isinstance(a, np.ndarray) and a.ndim >= 1 for a in items):
        return False
    if len({len(a) for a in items}) != 1:
        return False
    return len({(a.shape, a.dtype) for a in items}) > 1


def as_source(source: Any) -> Any:
    """What the Loader reads for `source`.

    - a numpy array or memmap: its rows (`Arrays(x)`);
    - a dict of arrays (nested dicts/tuples/lists of arrays): aligned columns;
    - a tuple: aligned columns, `(X, y)` -> samples `(X[i], y[i])`, never a sequence of
      samples (pass a list for that);
    - a list: a sequence of samples, as before; one that can only be columns (arrays of
      one length but different shapes or dtypes) is refused with a pointer to `Arrays`;
    - anything else: itself.
    """
    if isinstance(source, (np.ndarray, dict, tuple)):
        if isinstance(source, dict) and source and all(isinstance(k, (int, np.integer)) for k in source):
            raise SpecError(
                f"a dict with integer keys ({len(source)} of them) is ambiguous as a source: a map "
                "from sample index to sample, or columns named by numbers? Pass a list of samples, "
                "or `shmfeed.sources.Arrays(...)` with the arrays (e.g. keyed by strings).")
        if isinstance(source, tuple):
            bad = [i for i, v in enumerate(source) if not isinstance(v, (np.ndarray, dict, tuple, list))]
            if bad:
                raise SpecError(
                    "a tuple source is read as aligned columns of arrays, like `(X, y)`, but its "
                    f"element {bad[0]} is a {type(source[bad[0]]).__name__}, not an array. Pass a list "
                    "for a sequence of samples, or `shmfeed.sources.Arrays(...)` with arrays.")
        return Arrays(source)
    if isinstance(source, list) and _aligned_columns(source):
        detail = ", ".join(f"{a.dtype}{list(a.shape)}" for a in source)
        raise SpecError(
            f"a list source is a sequence of samples, but this one holds {len(source)} arrays of "
            f"{len(source[0])} rows with different shapes or dtypes ({detail}), which look like "
            "columns. Pass a tuple `(X, y)` or `shmfeed.sources.Arrays([...])` to read them as "
            "aligned columns, or make every sample the same shape and dtype.")
    return source
