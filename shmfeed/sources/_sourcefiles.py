"""What the file-format sources (sources/_parquet.py, sources/_arrayrecord.py, sources/_tarshards.py) share:
importing an optional extra lazily, a list of paths, per-process file handles, and
`SourceFileError`.

Invariants:
- An optional package (pyarrow, array_record) is imported only when a source that
  needs it is made; missing, it is a `ShmfeedError` naming the extra to install.
- Handles opened by one process are never used by another: `PerProcess` drops what it
  holds when it finds itself in a new pid (a forked worker), without closing it (the
  parent still owns it), and opens afresh.  pyarrow in particular is not fork-safe
  once it runs threads.
"""

from __future__ import annotations

import glob
import importlib
import os
from typing import Any

from .._errors import ShmfeedError, SpecError


class SourceFileError(ShmfeedError, OSError):
    """A data file of a source (Parquet, ArrayRecord, tar shard) cannot be read: missing,
    truncated, corrupt, or not what the source expects.  The message names the file and
    where in it (row group, row, column, record, member)."""


def require(module: str, extra: str, what: str) -> Any:
    """`import module`, or a ShmfeedError saying which extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ShmfeedError(
            f"{what} needs the `{module.split('.')[0]}` package, which cannot be imported ({exc}). "
            f"Install it: `pip install 'shmfeed[{extra}]'`.") from exc


def file_list(paths: Any, what: str) -> list[str]:
    """`paths` (one path, a glob pattern, or a list of them) as a list of existing files,
    sorted within each pattern, in the order given."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    try:
        items = [os.fspath(p) for p in paths]
    except TypeError as exc:
        raise SpecError(f"{what}: `paths` must be a path, a glob pattern or a list of them, "
                        f"got {type(paths).__name__}") from exc
    found: list[str] = []
    for p in items:
        if any(c in p for c in "*?["):
            matches = sorted(glob.glob(p))
            if not matches:
                raise SpecError(f"{what}: the pattern {p!r} matches no file")
            found += matches
        elif not os.path.isfile(p):
            raise SpecError(f"{what}: {p!r} is not a file; check `paths`")
        else:
            found.append(p)
    if not found:
        raise SpecError(f"{what}: `paths` is empty; give at least one file")
    return found


class PerProcess:
    """Handles (open files, readers) of this process, by key; a forked child starts
    with none.  `get(key, open_fn)` opens on first use in each process."""

    def __init__(self) -> None:
        self._pid = os.getpid()
        self._items: dict = {}
        self._inherited: list = []

    def get(self, key: Any, open_fn: Any) -> Any:
        if self._pid != os.getpid():
            # A forked copy: the parent's handles are the parent's (kept, never closed
            # or used here), ours are opened afresh.
            self._inherited.append(self._items)
            self._items, self._pid = {}, os.getpid()
        h = self._items.get(key)
        if h is None:
            h = self._items[key] = open_fn()
        return h

    def __getstate__(self) -> dict:
        return {}  # handles never travel: the other process opens its own

    def __setstate__(self, state: dict) -> None:
        PerProcess.__init__(self)
