"""`ArrayRecord`: a per-sample source over ArrayRecord files (the format Grain reads),
each record decoded by the user's function in the process that builds the batch.

Owns: the record index (the first record of every file, counted once at
construction: O(files) memory), and reading record i (a random-access reader per file
and per process, with no readahead threads).

Invariants:
- Sample i is `decode(bytes of record i)`, records numbered file after file in the
  order of `paths`: a pure function of i.
- `array_record` is imported lazily (the extra `shmfeed[arrayrecord]`); readers are
  opened per process (_sourcefiles.PerProcess), never inherited across a fork.
- A file that cannot be opened is a `SourceFileError` at construction; one that changed
  since, or a record that cannot be read, a `SourceFileError` naming the file and
  record, in batch order.  An exception of `decode` gets a note naming the file and
  record (in the worker's traceback).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._errors import SpecError
from ._objstore import ObjectCache, files_after, is_url, readable_path, source_paths, stamp
from ._sourcefiles import PerProcess, SourceFileError, require

# Random access: no readahead buffer, no reader threads (a worker is one core).
READER_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"


def _module() -> Any:
    return require("array_record.python.array_record_module", "arrayrecord", "ArrayRecord")


def raw_bytes(record: bytes) -> np.ndarray:
    """The default `decode`: the record's bytes as a uint8 array."""
    return np.frombuffer(record, np.uint8)


class ArrayRecord:
    """Records of ArrayRecord files as samples `decode(record_bytes)`.

    `paths`: a file, a glob pattern, or a list of them (records numbered file after
    file).  `decode(bytes) -> sample` runs in the worker that builds the batch (e.g.
    `lambda b: {k: np.asarray(v) for k, v in json.loads(b).items()}`, or parse a
    `tf.train.Example`); `shmfeed.rng()` is keyed by the record there, for
    augmentation.  The default gives the raw bytes as a uint8 array.  Remote files
    (`"s3://bucket/*.array_record"`, any fsspec URL) are read through `cache`, an
    `ObjectCache` (the records are counted here, so this process downloads each file
    once; the workers find them in the cache).  Needs `pip install 'shmfeed[arrayrecord]'`.
    """

    def __init__(self, paths: Any, decode: Any = raw_bytes, *, cache: ObjectCache | None = None):
        what = "ArrayRecord"
        ar = _module()
        if not callable(decode):
            raise SpecError(f"{what}: `decode` must be a function decode(record_bytes) -> sample, "
                            f"got {type(decode).__name__}")
        self.paths = source_paths(paths, cache, what)
        self.cache = cache
        self.decode = decode
        starts, stamps = [0], []
        for path in self.paths:
            stamps.append(stamp(path, cache))
            try:
                if is_url(path):
                    assert cache is not None
                    with cache.open(path, stamps[-1]) as obj:
                        reader = ar.ArrayRecordReader(obj.path, READER_OPTIONS)
                else:
                    reader = ar.ArrayRecordReader(path, READER_OPTIONS)
                try:
                    n, ok = reader.num_records(), reader.ok()
                finally:
                    reader.close()
                if not ok:  # a truncated file opens with 0 records and a reader not ok
                    raise ValueError("the reader is not ok (no readable footer / index)")
            except Exception as exc:  # the binding raises RuntimeError / ValueError
                raise SourceFileError(
                    f"{what}: cannot open {path!r} as an ArrayRecord file ({type(exc).__name__}: "
                    f"{' '.join(str(exc).split())[:300]}); it is truncated, corrupt or not ArrayRecord. "
                    "Write it again, or leave it out of `paths`.") from exc
            starts.append(starts[-1] + n)
        if starts[-1] == 0:
            raise SpecError(f"{what}: the {len(self.paths)} file(s) hold no records")
        self._starts = np.asarray(starts, np.int64)
        self._stamps = stamps
        self._readers = PerProcess()

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _open(self, f: int) -> Any:
        path = readable_path(self.paths[f], self._stamps[f], self.cache, self._readers, f, "ArrayRecord",
                             "record", files_after(self.paths, self._stamps, f, self.cache))
        return _module().ArrayRecordReader(path, READER_OPTIONS)

    def record(self, i: int) -> bytes:
        """The bytes of record i."""
        i = int(i)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"record {i} out of range: {n} records")
        f = int(np.searchsorted(self._starts, i, side="right")) - 1
        r = i - int(self._starts[f])
        reader = self._readers.get(f, lambda: self._open(f))
        try:
            # read(start, end), not read([r]): the list form goes through the reader's
            # parallel machinery, 15x the time for one record (47 against 3 us).
            return reader.read(r, r + 1)[0]
        except Exception as exc:
            raise SourceFileError(
                f"ArrayRecord file {self.paths[f]!r}, record {r} (sample {i}): cannot read it "
                f"({type(exc).__name__}: {' '.join(str(exc).split())[:300]}); the file is corrupt. "
                "Write it again, or leave it out of `paths`.") from exc

    def __getitem__(self, i: int) -> Any:
        data = self.record(i)
        try:
            return self.decode(data)
        except Exception as exc:
            f = int(np.searchsorted(self._starts, int(i) % len(self), side="right")) - 1
            note = (f"(shmfeed: in `decode` of record {int(i) % len(self) - int(self._starts[f])} "
                    f"of ArrayRecord file {self.paths[f]!r})")
            if hasattr(exc, "add_note"):  # Python 3.11+; 3.10 keeps the exception as it is
                exc.add_note(note)
            raise

    def __repr__(self) -> str:
        return (f"shmfeed.sources.ArrayRecord({len(self.paths)} file(s), {len(self)} records, "
                f"decode={getattr(self.decode, '__name__', self.decode)!r})")
