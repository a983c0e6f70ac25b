"""`SharedChunks`: decoded Parquet row groups shared by the workers of one pool, so that
a row group is decoded once however many workers read from it.

Why: batches go to the workers in turn, and an ordered batch is a slice of one row group
(16 batches of 256 rows in a row group of 4,096), so without it every worker decoded
every row group (2 workers: 2x the decoding, which is all the work for numeric columns).

The cache is one memfd made by the pool's supervisor when it unpickles the source (no
name anywhere: it goes with the last process that maps it), inherited by every worker it
forks: a header page, then `n` slots of one decoded row group each (every fixed-shape
column, one after the other).  Coordination is by POSIX record locks on that memfd
(`fcntl.lockf`), which the kernel releases when their process dies, however it dies:
- byte 0, the table lock, held for microseconds while a process reads or changes the
  header (which slot holds which row group, its state, when it was last used);
- byte 1 + s, slot s's lock: exclusive while a process decodes a row group into it,
  shared while one copies rows out of it.

Invariants:
- A process reads a slot only while it holds the slot's lock shared and the header says
  READY with the row group it wants: a slot is overwritten only under its exclusive lock,
  so rows are never read torn or from another row group.
- A slot in state LOADING has its exclusive lock held by a live process: the loader takes
  it (non-blocking, under the table lock) before it marks the slot LOADING.  A LOADING slot
  whose lock is free was left by a process that died mid-decode: the next process to see
  it empties it and decodes the row group itself.
- A process waiting for a row group another is decoding waits on that slot's lock: the
  loader never waits for a lock while it holds one exclusively, so waits form no cycle, and
  a loader's death ends the wait.
- When every slot is in use (held, or being decoded), a process decodes the row group for
  itself (its own copy, as before this cache): never a wait for room.
- The data are row groups of the source's files, a pure function of them: which process
  decoded one, or whether it was decoded twice, changes no batch.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
from collections.abc import Callable

import numpy as np

HEADER_BYTES = 4096
EMPTY, LOADING, READY = 0, 1, 2
TABLE = -1  # the table lock's "slot"


class SharedChunks:
    """`n` slots of `rows` rows of every column (`kinds`: (kind, dtype, row shape)), at
    most `cache_bytes` (at least two slots), in a memfd this process made."""

    def __init__(self, kinds: list[tuple[str, np.dtype, tuple]], starts: np.ndarray, cache_bytes: int):
        self.rows = int(np.diff(starts).max())
        row_bytes = [np.dtype(dtype).itemsize * int(np.prod(shape)) for _, dtype, shape in kinds]
        col_bytes = [-(-self.rows * b // 64) * 64 for b in row_bytes]  # each column 64-byte aligned
        self.slot_bytes = sum(col_bytes)
        chunks = len(starts) - 1
        self.n = int(max(2, min(chunks, cache_bytes // max(1, self.slot_bytes), (HEADER_BYTES - 64) // 24)))
        self.kinds = kinds
        self._col_offsets = np.cumsum([0] + col_bytes[:-1]).tolist()
        fd = os.memfd_create("shmfeed-parquet-row-groups", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, HEADER_BYTES + self.n * self.slot_bytes)
            self._mm = mmap.mmap(fd, HEADER_BYTES + self.n * self.slot_bytes)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        header = np.frombuffer(self._mm, np.int64, 3 * self.n + 2)
        self.state, self.chunk, self.used = header[:self.n], header[self.n:2 * self.n], header[2 * self.n:3 * self.n]
        self.counters = header[3 * self.n:]  # [tick, row groups decoded into a slot]
        self.chunk[:] = -1
        self._views: dict[int, list[np.ndarray]] = {}
        self._last: dict[int, int] = {}  # row group -> the slot this process last found it in

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            self._views.clear()
            del self.state, self.chunk, self.used, self.counters
            self._mm.close()
            os.close(fd)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __getstate__(self) -> dict:
        raise TypeError("SharedChunks belongs to one pool's processes and is never pickled")

    def _lock(self, cmd: int, slot: int) -> None:
        fcntl.lockf(self._fd, cmd, 1, 1 + slot)

    def _try(self, cmd: int, slot: int) -> bool:
        try:
            fcntl.lockf(self._fd, cmd | fcntl.LOCK_NB, 1, 1 + slot)
        except OSError:  # EACCES or EAGAIN: another process holds it
            return False
        return True

    def _slot_views(self, s: int) -> list[np.ndarray]:
        views = self._views.get(s)
        if views is None:
            base = HEADER_BYTES + s * self.slot_bytes
            views = self._views[s] = [
                np.ndarray((self.rows,) + tuple(shape), dtype, self._mm, base + off)
                for (_, dtype, shape), off in zip(self.kinds, self._col_offsets)]
        return views

    def acquire(self, k: int, convert: Callable[[int], tuple[list, int]]) -> int:
        """The slot holding row group k, its lock held shared (decoded into it here by
        `convert(k)` if need be) until `release(slot)`, or -1: every slot in use (the
        caller then decodes k for itself)."""
        s = self._last.get(k, -1)
        if s >= 0 and self._try(fcntl.LOCK_SH, s):
            # Where this process last found k, with no table lock: a slot is refilled only
            # under its exclusive lock, so while this holds it shared, what the header
            # says of it stays true.
            if self.chunk[s] == k and self.state[s] == READY:
                self.used[s] = self.counters[0]  # for the LRU choice only: a stale tick is harmless
                return s
            self._lock(fcntl.LOCK_UN, s)
        s = self._acquire(k, convert)
        if s >= 0:
            if len(self._last) > 2 * self.n:
                self._last.clear()
            self._last[k] = s
        return s

    def release(self, s: int) -> None:
        self._lock(fcntl.LOCK_UN, s)

    def columns(self, s: int, rows: int) -> list[np.ndarray]:
        """The first `rows` rows of every column in slot s (read them only while holding it)."""
        return [v[:rows] for v in self._slot_views(s)]

    def _acquire(self, k: int, convert: Callable[[int], tuple[list, int]]) -> int:
        while True:
            action, s = self._decided(k)
            if action == "wait":  # another process decodes k into s: until it is done (or dead)
                self._lock(fcntl.LOCK_SH, s)
                self._lock(fcntl.LOCK_UN, s)
                continue
            if action == "load":
                self._load(k, s, convert)
            return s

    def _decided(self, k: int, ahead: bool = False) -> tuple[str, int]:
        """`_decide` under the table lock, which stays held only for a 'load'."""
        self._lock(fcntl.LOCK_EX, TABLE)
        action = "error"
        try:
            action, s = self._decide(k, ahead)
        finally:
            if action != "load":
                self._lock(fcntl.LOCK_UN, TABLE)
        return action, s

    def _decide(self, k: int, ahead: bool = False) -> tuple[str, int]:
        """Under the table lock: what to do for row group k.  'hit' (its slot's lock now
        held shared), 'wait' for slot s, 'load' into slot s (its lock now held
        exclusively, marked LOADING; the table lock stays held for `_load` to release),
        or 'own' (every slot in use).  `ahead` (a prefetch): 'hit' and 'wait' hold nothing."""
        found = np.flatnonzero((self.chunk == k) & (self.state != EMPTY))
        tick = int(self.counters[0]) + 1
        self.counters[0] = tick
        for s in found.tolist():
            if self.state[s] == READY:
                if not ahead:
                    self._lock(fcntl.LOCK_SH, s)  # never blocks: READY slots have no exclusive holder
                self.used[s] = tick
                return "hit", s
            if not self._try(fcntl.LOCK_SH, s):
                return "wait", s  # its loader is alive and decoding
            self._lock(fcntl.LOCK_UN, s)  # its loader died mid-decode: the slot is free
            self.state[s], self.chunk[s] = EMPTY, -1
        for s in np.argsort(self.used, kind="stable").tolist():  # least recently used first
            if self.state[s] != LOADING and self._try(fcntl.LOCK_EX, s):
                self.state[s], self.chunk[s], self.used[s] = LOADING, k, tick
                return "load", s
        return "own", -1

    def prefetch(self, k: int, convert: Callable[[int], tuple[list, int]]) -> str:
        """Row group k decoded into a slot now, unless a slot holds it or is being
        decoded into ('there'), or every slot is in use ('full'); 'loaded' if it was.
        What a worker does between batches that run in order, so that the next row
        groups are decoded, by several workers at once, before a batch needs them."""
        action, s = self._decided(k, ahead=True)
        if action == "own":
            return "full"
        if action != "load":
            return "there"
        self._load(k, s, convert)
        self._lock(fcntl.LOCK_UN, s)
        return "loaded"

    def _load(self, k: int, s: int, convert: Callable[[int], tuple[list, int]]) -> None:
        """Row group k decoded into slot s (whose lock this holds exclusively, the table
        lock too, which this releases first); then the slot READY and its lock shared."""
        self._lock(fcntl.LOCK_UN, TABLE)
        try:
            cols, _ = convert(k)
            for view, col in zip(self._slot_views(s), cols):
                view[:len(col)] = col
        except BaseException:
            self._lock(fcntl.LOCK_EX, TABLE)
            self.state[s], self.chunk[s] = EMPTY, -1
            self._lock(fcntl.LOCK_UN, s)
            self._lock(fcntl.LOCK_UN, TABLE)
            raise
        self._lock(fcntl.LOCK_EX, TABLE)
        self.state[s] = READY
        self.counters[1] += 1
        self._lock(fcntl.LOCK_SH, s)  # exclusive -> shared, atomically: no loader can slip in
        self._lock(fcntl.LOCK_UN, TABLE)

    def decoded(self) -> int:
        """Row groups decoded into a slot so far, by every process of the pool."""
        return int(self.counters[1])
