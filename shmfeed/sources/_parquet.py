"""`Parquet` and `Arrow`: sources over Arrow data, read by row — Parquet files (random
access through a row-group index) and an Arrow table in memory (a Hugging Face
`datasets.Dataset` is one).

Owns: the chunk index (the first row of every row group / record batch: built once,
at construction, O(chunks) memory), the mapping of Arrow column types to sample
fields, decoding one chunk into numpy (in the process that builds the batch), and the
batch-gather hook (`__shmfeed_gather__`, see sources/_arrays.py) that fills a batch from the
decoded chunks with one numpy take per column and chunk, no Python per row.

Column types: integer, float and bool scalars -> numpy scalars; fixed-size lists
(nested too) of numbers -> arrays of that shape; variable-length lists of numbers ->
1-D arrays (give the Loader `padded_shapes` when their lengths differ).  Anything else
(strings, binary, structs such as a Hugging Face `Image`, ...) is refused at
construction, unless the source has a `decode`: then such a column's value is its
Python object (`bytes`, `str`, a dict...; None for a null), converted a chunk at a time,
and sample i is `decode({column: value})`, run per row in the process that builds the
batch (no batch-gather hook then: the Builder stacks what `decode` returns).

Invariants:
- Sample i is `{column: value}` for the chosen columns, in `columns` order (passed
  through `decode` when there is one); a pure function of i (the chunk index and the
  files' contents) and `decode`.
- pyarrow is imported lazily (the extra `shmfeed[parquet]`).  Files are opened per
  process (_sourcefiles.PerProcess): a forked worker never uses its parent's reader,
  and reads with `use_threads=False` (one worker, one core).
- Each process keeps decoded chunks up to `cache_bytes` (least recently used dropped,
  the last one always kept), so a batch inside one row group decodes it once: as
  decoded, or, in a Parquet source of fixed-shape columns once a batch spans several
  chunks (shuffled), copied into a `_ChunkPool` (one block per column, gathered with
  one numpy call per column).
- In a pool, a Parquet source of fixed-shape columns (no `decode`) given to the Loader
  itself has, besides, a cache of `cache_bytes` shared by the workers
  (sources/_chunkshare.py: made by the supervisor, `__shmfeed_pool__`, inherited by the
  workers it forks), which batches in fewer than POOL_MIN_CHUNKS row groups read from:
  batches go to the workers in turn and pyarrow decodes no less than a row group's
  column chunk, so without it every worker decoded every row group.  Inside a pipeline
  (`Sampled`, `Mix`), rows are read one by one from each process's own chunks.
- A file changed since construction (size or mtime), one that cannot be decoded, a
  null value, or a row whose length differs from the batch's without padding raise
  `SourceFileError` / `SpecError` naming the file, row group, row and column; in a
  worker it arrives in batch order.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np

from .._errors import SpecError
from ._chunkshare import SharedChunks
from ._objstore import ObjectCache, files_after, is_url, readable_path, source_paths, stamp
from ._sourcefiles import PerProcess, SourceFileError, require

# Decoded chunks a process keeps (least recently used dropped; at least the last one):
# enough for every row group of a shuffled epoch of a small dataset, a few of a large one.
CACHE_BYTES = 64 << 20
ARROW_CHUNK_ROWS = 1 << 16  # rows per chunk of an in-memory table split for reading
# A batch over this many chunks moves its process's chunks to a _ChunkPool: an ordered
# batch spans one or two, a shuffled one of a few hundred rows dozens.
POOL_MIN_CHUNKS = 4
# In order, a worker decodes ahead the first of this many next row groups that no
# worker has decoded or decodes (one per row group it reads from, between batches).
PREFETCH_ROW_GROUPS = 4


def _pyarrow(what: str) -> Any:
    require("pyarrow", "parquet", what)
    import pyarrow as pa
    return pa


def _column_kind(pa: Any, name: str, typ: Any, what: str, objects: bool = False) -> tuple[str, np.dtype, tuple]:
    """("scalar" | "fixed" | "var" | "object", dtype, row shape) of a column of Arrow
    type `typ`; "object" (Python values, for a `decode`) only with `objects`."""
    def numeric(t: Any) -> bool:
        return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)

    def dtype(t: Any) -> np.dtype:
        return np.dtype(bool) if pa.types.is_boolean(t) else np.dtype(t.to_pandas_dtype())

    if numeric(typ):
        return "scalar", dtype(typ), ()
    shape, t = [], typ
    while pa.types.is_fixed_size_list(t):
        shape.append(t.list_size)
        t = t.value_type
    if shape and numeric(t):
        return "fixed", dtype(t), tuple(shape)
    if (pa.types.is_list(typ) or pa.types.is_large_list(typ)) and numeric(typ.value_type):
        return "var", dtype(typ.value_type), (None,)
    if objects:
        return "object", np.dtype(object), ()
    raise SpecError(
        f"{what}: column {name!r} has Arrow type {typ}, which shmfeed cannot put in a batch "
        "(it reads integer, float and bool scalars, fixed-size lists of them, and lists of "
        "numbers). Give a `decode=` function that makes arrays of the row (e.g. decodes "
        "image bytes), leave the column out with `columns=[...]`, or encode it as numbers "
        "first (e.g. token ids).")


def _check_decode(decode: Any, what: str) -> None:
    if decode is not None and not callable(decode):
        raise SpecError(f"{what}: `decode` must be a function decode(row: dict) -> sample, "
                        f"got {type(decode).__name__}")


def _flat_values(arr: Any) -> Any:
    """The innermost values of a (nested) fixed-size list array, respecting its slice."""
    while hasattr(arr, "flatten") and hasattr(arr.type, "list_size"):
        arr = arr.flatten()
    return arr


def _one_slice(indices: np.ndarray, ks: np.ndarray) -> bool:
    """Whether a batch's rows `indices` (in chunks `ks`) are consecutive rows of one
    chunk: an ordered batch, copied as one slice."""
    return bool(ks[0] == ks[-1] and (np.diff(indices) == 1).all())


class _ArrowRows:
    """Rows of Arrow chunks (row groups, record batches) by index.  Subclasses set
    `columns`, `_kinds` (per column), `_starts` (first row of every chunk, then the
    total) and implement `_read_chunk(k)` and `_where(k)`."""

    columns: list[str]
    _kinds: list[tuple[str, np.dtype, tuple]]
    _starts: np.ndarray
    cache_bytes: int
    decode: Any = None
    _pooled = False  # whether chunks are decoded copies, which a _ChunkPool may hold instead
    _shared: SharedChunks | None = None  # in a pool's processes (Parquet): their shared row groups
    _ahead: int | None = None  # the row group to decode into `_shared` after this batch
    _ahead_of = -1  # the row group whose successor this process last asked for

    def _where(self, k: int) -> str:
        """How an error names chunk k (a Parquet row group, an Arrow record batch)."""
        raise NotImplementedError

    def _read_chunk(self, k: int) -> Any:
        raise NotImplementedError

    def _init_cache(self) -> None:
        self._handles = PerProcess()
        self._var_len: dict[int, int] = {}
        # A process may move its chunks to a _ChunkPool (see `__shmfeed_gather__`): when
        # every column has a fixed shape, and the chunks are decoded copies (Parquet's;
        # an Arrow table's are views of memory it holds anyway).
        self._use_pool = self._pooled and self.decode is None and all(
            kind in ("scalar", "fixed") for kind, _, _ in self._kinds)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _chunk_of(self, i: int) -> int:
        return int(np.searchsorted(self._starts, i, side="right")) - 1

    def _decoded(self, k: int) -> list:
        """Chunk k's columns as numpy: an array per scalar / fixed column, (offsets,
        values) per variable-length one; cached per process."""
        pool = self._pool()
        if pool is not None:
            return pool.chunk(self, k)
        cache = self._handles.get("decoded", OrderedDict)
        cols = cache.get(k)
        if cols is not None:
            cache.move_to_end(k)
            return cols
        cols, size = self._convert(k)
        cache[k] = cols
        sizes = self._handles.get("sizes", dict)
        sizes[k] = size
        while len(cache) > 1 and sum(sizes[j] for j in cache) > self.cache_bytes:
            del sizes[cache.popitem(last=False)[0]]
        return cols

    def _pool(self, start: bool = False) -> _ChunkPool | None:
        """This process's `_ChunkPool` if it has one (or, with `start`, one made now,
        its chunks leaving the per-chunk cache), else None."""
        if not self._use_pool:
            return None
        holder = self._handles.get("pool", lambda: [None])
        if holder[0] is None and start:
            holder[0] = _ChunkPool(self._kinds, self._starts, self.cache_bytes)
            self._handles.get("decoded", OrderedDict).clear()
            self._handles.get("sizes", dict).clear()
        return holder[0]

    def _convert(self, k: int) -> tuple[list, int]:
        """Chunk k read and converted (`_decoded`'s columns), and its bytes."""
        table = self._read_chunk(k)
        cols: list = []
        size = 0
        for name, (kind, dtype, shape) in zip(self.columns, self._kinds):
            arr = table.column(name)
            arr = arr.combine_chunks() if hasattr(arr, "combine_chunks") else arr
            if kind == "object":  # for `decode`: a null is its None
                cols.append(arr.to_pylist())
                size += arr.nbytes
                continue
            if arr.null_count:
                valid = np.asarray(arr.is_valid().to_numpy(zero_copy_only=False))
                row = int(self._starts[k]) + int(np.argmin(valid))
                raise SourceFileError(
                    f"{self._where(k)}, column {name!r}: row {row} is null ({arr.null_count} null "
                    "rows in this chunk); shmfeed cannot put a null in a batch. Fill them "
                    "(e.g. pyarrow.compute.fill_null) or filter them out, and write the data again.")
            flat = arr.flatten() if kind == "var" else _flat_values(arr)
            if kind != "scalar" and flat.null_count:
                raise SourceFileError(
                    f"{self._where(k)}, column {name!r}: {flat.null_count} null value(s) inside its lists; "
                    "shmfeed cannot put a null in a batch. Fill them (e.g. with 0 or NaN) and write the "
                    "data again.")
            if kind == "var":
                off = arr.offsets.to_numpy().astype(np.int64)
                vals = arr.values.to_numpy(zero_copy_only=False)
                if vals.dtype != dtype:
                    vals = vals.astype(dtype)
                cols.append((off, vals))
                size += off.nbytes + vals.nbytes
            else:
                cols.append(flat.to_numpy(zero_copy_only=False).reshape((len(arr),) + shape))
                size += cols[-1].nbytes
        return cols, size

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"row {i} out of range: {n} rows")
        k = self._chunk_of(i)
        r = i - int(self._starts[k])
        out = {}
        for name, (kind, _, _), col in zip(self.columns, self._kinds, self._decoded(k)):
            if kind == "var":
                off, vals = col
                out[name] = vals[off[r]:off[r + 1]]
            else:
                out[name] = col[r]
        if self._pool() is not None:  # views of a pool slot, which a later chunk reuses: copies
            out = {name: v.copy() if isinstance(v, np.ndarray) else v for name, v in out.items()}
        if self.decode is None:
            return out
        try:
            return self.decode(out)
        except Exception as exc:
            if hasattr(exc, "add_note"):  # Python 3.11+; 3.10 keeps the exception as it is
                exc.add_note(f"(shmfeed: in `decode` of row {i}, {self._where(k)})")
            raise

    def __shmfeed_gather__(self, indices: np.ndarray, out: list[np.ndarray]) -> None:
        ks = np.searchsorted(self._starts, indices, side="right") - 1
        pool = self._pool()
        if pool is None and self._use_pool and ks[0] != ks[-1]:
            # A batch over many chunks (shuffled) from then on takes one numpy call per
            # column from a pool rather than a Python step per chunk; ordered batches,
            # in one or two chunks, keep the chunks as decoded, with no copy.
            pool = self._pool(start=len(np.unique(ks)) >= POOL_MIN_CHUNKS)
        if pool is not None:
            pool.gather(self, indices, ks, out)
            return
        if _one_slice(indices, ks):
            # An ordered batch inside one chunk (most of them, unshuffled): its rows are
            # a slice, copied as one (into the first rows of `out`: a last, short batch
            # has fewer than the slot).
            k = int(ks[0])
            r0 = int(indices[0] - self._starts[k])
            self._gather_chunk(k, indices, slice(0, len(indices)), slice(r0, r0 + len(indices)), out)
            if self._shared is not None and k != self._ahead_of and k + 1 < len(self._starts) - 1:
                # In order: the next row group, once this batch is out (once per row group)
                self._ahead, self._ahead_of = k + 1, k
            return
        # Otherwise the batch's rows sorted by chunk (stable), so that each chunk's are a
        # run (variable-length columns, an Arrow table): a batch of 256 shuffled rows over
        # ~50 chunks cost ~370 us (CPU, 2 columns) with a mask and a fancy index per chunk,
        # ~240 us this way (~50 us from a _ChunkPool); an ordered one ~30 us, ~10 us as a slice.
        by_chunk = np.argsort(ks, kind="stable")
        sk = ks[by_chunk]
        cuts = np.flatnonzero(sk[1:] != sk[:-1]) + 1
        rows = indices[by_chunk] - self._starts[sk]
        for lo, hi in zip(np.r_[0, cuts].tolist(), np.r_[cuts, len(sk)].tolist()):
            self._gather_chunk(int(sk[lo]), indices, by_chunk[lo:hi], rows[lo:hi], out)

    def _gather_chunk(self, k: int, indices: np.ndarray, at: Any, rows: Any, out: list[np.ndarray]) -> None:
        """Rows `rows` of chunk k (a slice or an array) into rows `at` of the batch's
        leaves `out`."""
        shared = self._shared
        if shared is not None:  # fixed-shape columns only: a slot of the pool's shared cache
            s = shared.acquire(k, self._convert)
            if s >= 0:
                try:
                    for col, view in zip(shared.columns(s, int(self._starts[k + 1] - self._starts[k])), out):
                        view[at] = col[rows]
                finally:
                    shared.release(s)
                return
        for c, (col, view) in enumerate(zip(self._decoded(k), out)):
            if self._kinds[c][0] != "var":
                view[at] = col[rows]
                continue
            off, vals = col
            r = np.arange(rows.start, rows.stop) if isinstance(rows, slice) else rows
            lengths = off[r + 1] - off[r]
            width = view.shape[1]
            bad = np.flatnonzero(lengths != width)
            if bad.size:
                row = int(indices[at][bad[0]])
                raise SpecError(
                    f"{self._where(k)}, column {self.columns[c]!r}: row {row} holds "
                    f"{int(lengths[bad[0]])} values where the batch has room for {width} (the "
                    "length of the first row). Rows of this column differ in length: give the "
                    f"Loader `padded_shapes` (e.g. {{{self.columns[c]!r}: [{max(width, int(lengths.max()))}]}}"
                    ", or None for a bucketed length).")
            view[at] = vals[off[r][:, None] + np.arange(width)]

    def _row_copies(self) -> list[None]:
        return [None] * len(self.columns)  # decoded per chunk: no fixed memory for C to copy from

    def _leaf_rows(self) -> list[tuple[np.dtype, tuple]]:
        if self.decode is not None:
            return []  # a sample is what `decode` returns: built row by row, never gathered
        rows = []
        for c, (kind, dtype, shape) in enumerate(self._kinds):
            if kind == "var":
                if c not in self._var_len:
                    self._var_len[c] = len(self[0][self.columns[c]])
                shape = (self._var_len[c],)
            rows.append((dtype, shape))
        return rows


class _ChunkPool:
    """A process's decoded chunks when every column has a fixed row shape: one block
    per column of `n` slots of `rows` rows (the largest chunk), a chunk in a slot, so
    that a batch's rows, in any number of cached chunks, are one numpy take per column.
    A shuffled batch of 256 rows over ~50 row groups took a Python step per chunk
    (~240 us CPU a batch of 2 columns); this takes ~50 us.  Chunks are copied in (~0.1-0.25
    ms a 1 MB row group decoded in ~2 ms), which is why ordered batches, in one chunk,
    do without until a batch spans POOL_MIN_CHUNKS.  `n` slots hold at most `cache_bytes`
    (at least one); the slot used least recently is reused, never one the batch being
    built needs (a batch over more chunks than slots is built in parts)."""

    def __init__(self, kinds: list[tuple[str, np.dtype, tuple]], starts: np.ndarray, cache_bytes: int):
        self.rows = int(np.diff(starts).max())
        row_bytes = sum(dtype.itemsize * int(np.prod(shape)) for _, dtype, shape in kinds)
        self.n = int(max(1, min(len(starts) - 1, cache_bytes // max(1, self.rows * row_bytes))))
        self.blocks = [np.empty((self.n * self.rows,) + shape, dtype) for _, dtype, shape in kinds]
        self.slot_of = np.full(len(starts) - 1, -1, np.int64)  # per chunk: its slot, or -1
        self.chunk_in = np.full(self.n, -1, np.int64)  # per slot: its chunk, or -1
        self.used = np.zeros(self.n, np.int64)  # per slot: the tick it was last used
        self.tick = 0

    def _load(self, src: _ArrowRows, ks: np.ndarray) -> None:
        """Have the chunks `ks` (distinct, at most `n`) in slots, stamped with a new tick."""
        self.tick += 1
        slots = self.slot_of[ks]
        self.used[slots[slots >= 0]] = self.tick
        for k in ks[slots < 0].tolist():
            s = int(np.argmin(self.used))  # used longest ago: never this tick's
            if self.chunk_in[s] >= 0:
                self.slot_of[self.chunk_in[s]] = -1
                self.chunk_in[s] = -1
            cols, _ = src._convert(k)
            for block, col in zip(self.blocks, cols):
                block[s * self.rows: s * self.rows + len(col)] = col
            self.slot_of[k], self.chunk_in[s], self.used[s] = s, k, self.tick

    def _slot(self, src: _ArrowRows, k: int) -> int:
        """Chunk k's slot (`_load` for one chunk, with less numpy on the way)."""
        s = int(self.slot_of[k])
        if s < 0:
            self._load(src, np.array([k]))
            return int(self.slot_of[k])
        self.tick += 1
        self.used[s] = self.tick
        return s

    def chunk(self, src: _ArrowRows, k: int) -> list[np.ndarray]:
        """Chunk k's columns: views of its slot, valid until the slot is reused."""
        s, n = self._slot(src, k), int(src._starts[k + 1] - src._starts[k])
        return [block[s * self.rows: s * self.rows + n] for block in self.blocks]

    def gather(self, src: _ArrowRows, indices: np.ndarray, ks: np.ndarray, out: list[np.ndarray]) -> None:
        """Rows `indices` (in chunks `ks`) into the first rows of the leaves `out`."""
        if _one_slice(indices, ks):
            k = int(ks[0])
            r0 = self._slot(src, k) * self.rows + int(indices[0] - src._starts[k])
            for block, view in zip(self.blocks, out):
                view[:len(indices)] = block[r0: r0 + len(indices)]
            return
        uk = np.unique(ks)
        for part in range(0, len(uk), self.n):
            some = uk[part: part + self.n]
            self._load(src, some)
            at = slice(0, len(indices)) if len(some) == len(uk) else \
                np.flatnonzero((ks >= some[0]) & (ks <= some[-1]))
            row = self.slot_of[ks[at]] * self.rows + (indices[at] - src._starts[ks[at]])
            for block, view in zip(self.blocks, out):
                view[at] = block[row]


def _check_columns(available: list[str], columns: Any, where: str, what: str) -> list[str]:
    if columns is None:
        return list(available)
    if isinstance(columns, str):
        columns = [columns]
    columns = list(columns)
    if not columns:
        raise SpecError(f"{what}: `columns` is empty; name at least one column")
    missing = [c for c in columns if c not in available]
    if missing:
        raise SpecError(f"{what}: {where} has no column {missing[0]!r} (its columns: "
                        f"{', '.join(available)}); fix `columns`")
    return columns


class Parquet(_ArrowRows):
    """Rows of Parquet files as samples `{column: value}`, read by row in the workers.

    `paths`: a file, a glob pattern, or a list of them (rows numbered file after file,
    in the order given, each pattern's matches sorted).  `columns`: the columns to read
    (default: all; each must be a number, a fixed-size list of numbers, or a list of
    numbers, unless `decode` is given).  `decode(row) -> sample`, optional, runs per row
    in the worker that builds the batch, on `row = {column: value}`, where a column
    that is not numbers (binary, string, struct: a Hugging Face `Image` is
    `{"bytes": ..., "path": ...}`) is its Python value: e.g. decode image bytes with
    Pillow; `shmfeed.rng()` is keyed by the row there.  The row groups are indexed once,
    here (O(row groups) memory); pyarrow
    decodes a whole row group at a time: the workers share up to `cache_bytes` of them
    (each decoded once, by one worker), and shuffled, each keeps up to `cache_bytes` of
    its own (the least recently used dropped), so shuffled rows of data larger than that cost a
    row-group decode each: write files with small row groups (e.g.
    `row_group_size=1024`) when you shuffle.  Batches are filled by column, with no
    Python per row.  Remote files (`"s3://bucket/*.parquet"`, any fsspec URL) are read
    through `cache`, an `ObjectCache`: footers here, at construction, straight from the
    store; each file whole, once per machine, by the first worker that needs it.
    Needs `pip install 'shmfeed[parquet]'`.
    """

    def __init__(self, paths: Any, columns: Any = None, *, decode: Any = None, cache: ObjectCache | None = None,
                 cache_bytes: int = CACHE_BYTES):
        what = "Parquet"
        pa = _pyarrow(what)
        pq = require("pyarrow.parquet", "parquet", what)
        _check_decode(decode, what)
        self.decode = decode
        self.paths = source_paths(paths, cache, what)
        self.cache = cache
        self.cache_bytes = int(cache_bytes)
        starts, chunk_file, chunk_group, stamps = [0], [], [], []
        schema0 = None
        for f, path in enumerate(self.paths):
            def footer(file: Any, path: str = path, errors: tuple = (pa.ArrowInvalid,)) -> Any:
                try:
                    meta = pq.read_metadata(file)
                    return meta, meta.schema.to_arrow_schema()
                except errors as exc:
                    raise SourceFileError(
                        f"{what}: cannot read the Parquet footer of {path!r} ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())}); the file is truncated, corrupt or not Parquet. Write it "
                        "again, or leave it out of `paths`.") from exc

            if is_url(path):
                # A server that stalls or fails while the footer is read is retried and named
                # as such; only what pyarrow finds invalid is called corrupt.
                assert cache is not None
                meta, schema = cache.read_remote(path, "reading its Parquet footer", footer)
            else:
                meta, schema = footer(path, errors=(OSError, pa.ArrowException))
            if schema0 is None:
                self.columns = _check_columns(schema.names, columns, f"{path!r}", what)
                self._kinds = [_column_kind(pa, c, schema.field(c).type, what, decode is not None)
                               for c in self.columns]
                schema0 = (path, [schema.field(c).type for c in self.columns])
            else:
                _check_columns(schema.names, self.columns, f"{path!r}", what)
                types = [schema.field(c).type for c in self.columns]
                for c, t0, t in zip(self.columns, schema0[1], types):
                    if t != t0:
                        raise SpecError(
                            f"{what}: column {c!r} is {t} in {path!r} but {t0} in {schema0[0]!r}; "
                            "every file must have the same column types. Cast them when writing.")
            for g in range(meta.num_row_groups):
                starts.append(starts[-1] + meta.row_group(g).num_rows)
                chunk_file.append(f)
                chunk_group.append(g)
            stamps.append(stamp(path, cache))
        if starts[-1] == 0:
            raise SpecError(f"{what}: the {len(self.paths)} file(s) hold no rows")
        self._starts = np.asarray(starts, np.int64)
        self._chunk_file = np.asarray(chunk_file, np.int32)
        self._chunk_group = np.asarray(chunk_group, np.int32)
        self._stamps = stamps
        self._init_cache()

    _pooled = True

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_shared", None)  # the pool's own, never sent
        state.pop("_ahead", None)
        state.pop("_ahead_of", None)
        return state

    def __shmfeed_pool__(self) -> None:
        """In a pool's supervisor, before it forks the workers: the cache of decoded row
        groups they inherit and share, so that each is decoded once, not once per worker."""
        if self._use_pool and self._shared is None:
            self._shared = SharedChunks(self._kinds, self._starts, self.cache_bytes)

    def __shmfeed_idle__(self) -> None:
        """In a worker, between batches (the one just built is published): decode the
        row group after that batch's into the shared cache if no worker has, so that
        batches in order find it decoded instead of waiting on one worker's decode."""
        k, self._ahead = self._ahead, None
        if k is None or self._shared is None:
            return
        # The first of the next PREFETCH_ROW_GROUPS that no worker has or decodes: the
        # workers then decode different row groups at once (decoding is most of the work;
        # one decoding while the others wait on it would leave them idle).
        for j in range(k, min(k + PREFETCH_ROW_GROUPS, len(self._starts) - 1)):
            try:
                if self._shared.prefetch(j, self._convert) != "there":
                    return
            except Exception:  # noqa: BLE001 - a batch that needs j decodes it again, and reports it in order
                return

    @property
    def num_row_groups(self) -> int:
        return len(self._chunk_file)

    def _where(self, k: int) -> str:
        return f"Parquet file {self.paths[self._chunk_file[k]]!r}, row group {int(self._chunk_group[k])}"

    def _open(self, f: int) -> Any:
        pq = require("pyarrow.parquet", "parquet", "Parquet")
        return pq.ParquetFile(readable_path(self.paths[f], self._stamps[f], self.cache, self._handles, f,
                                            "Parquet", "row", files_after(self.paths, self._stamps, f, self.cache)))

    def _read_chunk(self, k: int) -> Any:
        pa = _pyarrow("Parquet")
        f, g = int(self._chunk_file[k]), int(self._chunk_group[k])
        pf = self._handles.get(("file", f), lambda: self._open(f))
        try:
            return pf.read_row_group(g, columns=self.columns, use_threads=False)
        except (OSError, pa.ArrowException) as exc:
            raise SourceFileError(
                f"{self._where(k)} (rows {int(self._starts[k])}..{int(self._starts[k + 1]) - 1}): cannot "
                f"decode it ({type(exc).__name__}: {' '.join(str(exc).split())}); the file is corrupt. Write it again, or "
                "leave it out of `paths`.") from exc

    def __repr__(self) -> str:
        return (f"shmfeed.sources.Parquet({len(self.paths)} file(s), {len(self)} rows in "
                f"{self.num_row_groups} row groups; columns {self.columns})")


class Arrow(_ArrowRows):
    """Rows of an Arrow table in memory as samples `{column: value}`: a `pyarrow.Table`,
    or a Hugging Face `datasets.Dataset` (its memory-mapped Arrow table, with no Python
    per row).  Column types and `columns` as for `Parquet`.  A Dataset after `shuffle`
    or `select` reads through an index mapping: call `ds.flatten_indices()` first, or
    leave the shuffling to the Loader (`shuffle=True`).  `decode` as for `Parquet`.

    With workers forked from this process the table is shared, not copied; a pool
    started from a fresh interpreter is sent the table by value (write large data to
    Parquet instead).  Needs `pip install 'shmfeed[parquet]'`.
    """

    def __init__(self, table: Any, columns: Any = None, *, decode: Any = None, chunk_rows: int = ARROW_CHUNK_ROWS,
                 cache_bytes: int = CACHE_BYTES):
        what = "Arrow"
        pa = _pyarrow(what)
        _check_decode(decode, what)
        self.decode = decode
        if getattr(table, "_indices", None) is not None:
            raise SpecError(f"{what}: this Dataset reads its rows through an index mapping (after "
                            "`shuffle`, `select`, `filter`...); call `ds = ds.flatten_indices()` first")
        inner = getattr(getattr(table, "data", None), "table", None)  # datasets.Dataset
        if isinstance(inner, pa.Table):
            table = inner
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        if not isinstance(table, pa.Table):
            raise SpecError(f"{what}: expected a pyarrow.Table or a datasets.Dataset, got "
                            f"{type(table).__name__}")
        self.columns = _check_columns(table.schema.names, columns, "the table", what)
        self._kinds = [_column_kind(pa, c, table.schema.field(c).type, what, decode is not None)
                       for c in self.columns]
        if table.num_rows == 0:
            raise SpecError(f"{what}: the table has no rows")
        self.table = table.select(self.columns)
        self._batches = self.table.to_batches(max_chunksize=max(int(chunk_rows), 1))
        self._starts = np.cumsum([0] + [b.num_rows for b in self._batches], dtype=np.int64)
        self.cache_bytes = int(cache_bytes)
        self._init_cache()

    def _where(self, k: int) -> str:
        return f"Arrow table, record batch {k}"

    def _read_chunk(self, k: int) -> Any:
        return self._batches[k]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_batches"]  # views of the table: rebuilt on the other side
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        sizes = np.diff(self._starts)
        self._batches, at = [], 0
        for n in sizes:
            self._batches += self.table.slice(at, int(n)).to_batches()
            at += int(n)
        self._starts = np.cumsum([0] + [b.num_rows for b in self._batches], dtype=np.int64)

    def __repr__(self) -> str:
        return f"shmfeed.sources.Arrow({len(self)} rows; columns {self.columns})"
