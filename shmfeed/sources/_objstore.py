"""`ObjectCache`: objects of `s3://` (or any fsspec URL) read through a local cache of
bounded size, shared by every worker and loader on the machine.

Owns: where an object lives on disk (`<cache_dir>/<hash of URL and version>-<name>`),
downloading it whole (with retries), the byte budget and LRU eviction, and the locks
that make all of it safe between processes.

How the locks work (fcntl.flock: released by the kernel when a process dies):
- Each object has `<entry>.lock`.  A downloader holds it exclusively; a reader holds it
  shared for as long as it reads the file (`CachedObject` open), so a file in use is
  never evicted, and an object is downloaded once per machine: the others wait on the
  lock and then find the file.
- `.budget.lock` (exclusive) covers the budget check: the bytes of every file in the
  directory (finished, and downloads in progress, reserved at full size before the
  first byte) plus the new object must fit `max_bytes`; if not, the least recently
  used files nobody reads (and downloads whose process died) are deleted first.
- A download is written to `<entry>.part` and renamed when complete and of the
  expected size, so no reader ever sees a partial file; a `.part` whose lock is free
  was left by a dead process and is deleted.

Prefetch (`prefetch` objects ahead): opening an object also hands the cache the next
objects in the order the source will need them (`ahead`); up to `prefetch` of them are
downloaded at once by threads of this process, through the same locks (a reader that
needs one waits on its lock and finds it whole).  Threads run only in worker processes
(`allow_prefetch`, called when a worker starts, after the fork): a process that forks
must hold no download lock, or its child would inherit it.  A prefetch takes only room
that is free or held by stale objects (nobody has opened them since this `ObjectCache`
was made): it never evicts what this run fetched, nor waits, nor fails; it is skipped,
and any error is met again, and reported, by the read that needs the object.  A read
that finds the cache full while downloads are in progress waits for them (a finished
prefetch is evictable) before it reports the cache full.

Invariants:
- The bytes in the cache directory never exceed `max_bytes` (files still open by a
  reader after eviction are impossible: a read holds the lock).
- fsspec is imported lazily (the extra `shmfeed[s3]`), and each process makes its own
  filesystem objects (an async one is not fork-safe).
- At most `prefetch` background downloads per process; none in a process that forks.
- Every failure is a `SourceFileError` naming the URL and the remedy: no object, no
  access, a server that keeps failing (after `retries`), a cache too small or full, a
  cache directory that cannot be written.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .._errors import SpecError
from ._sourcefiles import PerProcess, SourceFileError, require

BLOCK_BYTES = 4 << 20  # bytes a download reads at a time
BUDGET_LOCK = ".budget.lock"
FULL_WAIT_S = 0.05  # a read that finds the cache full rechecks this often while downloads run

_prefetch_pid: int | None = None  # the process where prefetch threads may run


def allow_prefetch() -> None:
    """Let this process (a worker, which never forks) run prefetch threads."""
    global _prefetch_pid
    _prefetch_pid = os.getpid()


class _NoRoom(Exception):
    """A prefetch found no free or stale room: skipped."""


def is_url(path: Any) -> bool:
    """Whether `path` names a remote object (a URL other than file://)."""
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def _flock(path: str, mode: int) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _try_flock(path: str) -> int | None:
    """An exclusive lock on `path` if nobody holds one, else None."""
    try:
        return _flock(path, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return None


def _unlock(fd: int) -> None:
    os.close(fd)  # closing the only fd of the open file releases its flock


def _version(info: dict) -> tuple[int, str]:
    """(size, version tag) from an fsspec info dict."""
    tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
    return int(info["size"]), str(tag).strip('"')


class CachedObject:
    """A cached object open for reading: `path` stays valid (never evicted) until
    `close()` (or the end of the `with` block, or the process)."""

    def __init__(self, path: str, lock_fd: int):
        self.path = path
        self._lock_fd: int | None = lock_fd

    def close(self) -> None:
        if self._lock_fd is not None:
            _unlock(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> CachedObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


class ObjectCache:
    """Objects at `s3://...` (or any fsspec URL: `gs://`, `az://`, `http://`) read through
    a local directory of at most `max_bytes`, shared by every process that uses the same
    `cache_dir` (workers, several loaders, several runs).

    An object is downloaded whole, once per machine, into a temporary name and renamed
    when complete; the least recently used objects nobody is reading are deleted to make
    room.  `storage_options` go to fsspec (e.g. `{"key": ..., "secret": ...,
    "client_kwargs": {"endpoint_url": ...}}` for s3fs); `retries` more tries, `retry_wait_s`
    apart (doubling), before an error that is not "no such object" or "access denied"
    becomes a `SourceFileError`.  Give it to a source: `TarShards("s3://b/train-*.tar",
    decode, cache=cache)`, `Parquet("s3://b/*.parquet", cache=cache)`.  Needs
    `pip install 'shmfeed[s3]'` (s3fs; other protocols their fsspec package).

    `prefetch`: how many objects ahead of the one being read (in the order the source
    needs them: a worker's next shards, the next files) each worker downloads at once,
    in the background, within `max_bytes` (0: each object when first read).
    `timeout_s`: how long a request may wait for the server (to connect, and for each
    read) before the try fails; for s3:// it is botocore's `connect_timeout` and
    `read_timeout` unless `storage_options["config_kwargs"]` sets them, and the tries
    are only these `retries` (botocore's and s3fs's own are turned off), so a server
    that stalls is an error after about (`retries` + 1) x `timeout_s`.
    """

    def __init__(self, cache_dir: str | os.PathLike, max_bytes: int, *, storage_options: dict | None = None,
                 retries: int = 3, retry_wait_s: float = 0.5, block_bytes: int = BLOCK_BYTES,
                 prefetch: int = 2, timeout_s: float = 60.0):
        require("fsspec", "s3", "ObjectCache")
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise SpecError(f"ObjectCache: `max_bytes` must be an integer >= 1, got {max_bytes!r}")
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
            raise SpecError(f"ObjectCache: `prefetch` must be an integer >= 0 (objects downloaded ahead), "
                            f"got {prefetch!r}")
        self.prefetch = prefetch
        self.timeout_s = float(timeout_s)
        self._born_ns = time.time_ns()  # objects last used before this are stale: a prefetch may evict them
        self.cache_dir = os.path.abspath(os.fspath(cache_dir))
        self.max_bytes = max_bytes
        self.storage_options = dict(storage_options or {})
        self.retries = max(int(retries), 0)
        self.retry_wait_s = float(retry_wait_s)
        self.block_bytes = int(block_bytes)
        try:
            os.makedirs(self.cache_dir, exist_ok=True)
            probe = os.path.join(self.cache_dir, f".probe-{os.getpid()}")
            with open(probe, "wb"):
                pass
            os.unlink(probe)
        except OSError as exc:
            raise SpecError(
                f"ObjectCache: cannot write to `cache_dir` {self.cache_dir!r} ({type(exc).__name__}: "
                f"{exc}); give a directory on a writable local disk with room for `max_bytes`="
                f"{max_bytes}.") from exc
        self._fs = PerProcess()
        self._listed: dict[str, tuple[int, str]] = {}
        self._ahead = PerProcess()  # this process's prefetch threads and counts

    # -- the remote side -----------------------------------------------------------
    def _filesystem(self, url: str) -> tuple[Any, str]:
        fsspec = require("fsspec", "s3", "ObjectCache")
        protocol = url.split("://", 1)[0]
        try:
            fs = self._fs.get(protocol, lambda: self._make_filesystem(fsspec, protocol))
        except ImportError as exc:
            raise SourceFileError(f"ObjectCache: no fsspec filesystem for {protocol}:// ({exc}). Install "
                                  f"it: `pip install 'shmfeed[s3]'` for s3://, or the package fsspec "
                                  "names for this protocol.") from exc
        return fs, fs._strip_protocol(url)

    def _make_filesystem(self, fsspec: Any, protocol: str) -> Any:
        options = dict(self.storage_options)
        s3 = protocol in ("s3", "s3a")
        if s3:  # `timeout_s` and `retries` are the whole story: no tries multiplied below ours
            config = dict(options.get("config_kwargs") or {})
            config.setdefault("connect_timeout", self.timeout_s)
            config.setdefault("read_timeout", self.timeout_s)
            config.setdefault("retries", {"total_max_attempts": 1})
            options["config_kwargs"] = config
        fs = fsspec.filesystem(protocol, skip_instance_cache=True, **options)
        if s3 and isinstance(getattr(fs, "retries", None), int):
            fs.retries = 1  # s3fs tries each call 5 times (a class attribute, no argument)
        return fs

    def _remote(self, url: str, what: str, call: Any) -> Any:
        """`call(fs, path)` with retries; errors named."""
        last: BaseException | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.retry_wait_s * 2 ** (attempt - 1))
            try:
                fs, path = self._filesystem(url)
                return call(fs, path)
            except FileNotFoundError as exc:
                raise SourceFileError(f"{url!r}: no such object ({what}); check the bucket and key "
                                      "(`paths`).") from exc
            except PermissionError as exc:
                raise SourceFileError(
                    f"{url!r}: access denied ({what}: {exc}); check the credentials (`storage_options` "
                    "key/secret, or the environment's, e.g. AWS_ACCESS_KEY_ID / AWS_PROFILE) and that "
                    "they may read this bucket, and the endpoint.") from exc
            except (SourceFileError, SpecError):
                raise
            except TypeError as exc:  # an argument the filesystem does not take: no retry mends it
                raise SourceFileError(f"{url!r}: {what} failed ({exc}); check `storage_options`: they go to "
                                      f"fsspec's {url.split('://', 1)[0]}:// filesystem.") from exc
            except Exception as exc:  # network, server and client errors: retried
                last = exc
        raise SourceFileError(
            f"{url!r}: {what} failed {self.retries + 1} times, last with {type(last).__name__}: "
            f"{' '.join(str(last).split())[:300]}. Check that the server is up and reachable, or "
            "raise `retries` / `retry_wait_s` for a flaky one.") from last

    def info(self, url: str) -> tuple[int, str]:
        """(size in bytes, version tag) of the object at `url` (as listed by the last
        `glob` that found it, else asked of the store)."""
        known = self._listed.pop(url, None)
        if known is not None:
            return known
        return self._remote(url, "reading its size", lambda fs, path: _version(fs.info(path)))

    def glob(self, pattern: str) -> list[str]:
        """The URLs that match `pattern` (sorted)."""
        def call(fs: Any, path: str) -> list[str]:
            found = {fs.unstrip_protocol(p): _version(i) for p, i in fs.glob(path, detail=True).items()
                     if i.get("type", "file") == "file"}
            self._listed.update(found)  # one listing instead of a request per object
            return sorted(found)
        return self._remote(pattern, "listing", call)

    def read_remote(self, url: str, what: str, read: Any) -> Any:
        """`read(file)` of the object read directly, uncached (e.g. a Parquet footer),
        opening and reading both under the retries and `timeout_s`: a server that stalls
        or fails midway is named as such.  `read` raises SourceFileError for what no
        retry mends (a corrupt file)."""
        def call(fs: Any, path: str) -> Any:
            with fs.open(path, "rb") as f:
                return read(f)
        return self._remote(url, what, call)

    # -- the local side ------------------------------------------------------------
    def _entry(self, url: str, version: str) -> str:
        digest = hashlib.sha256(f"{url}\0{version}".encode()).hexdigest()[:24]
        name = url.rstrip("/").rsplit("/", 1)[-1][-80:]
        return os.path.join(self.cache_dir, f"{digest}-{name}")

    def open(self, url: str, expect: tuple[int, str] | None = None,
             ahead: Sequence[tuple[str, Any]] = ()) -> CachedObject:
        """The object at `url` as a local file, downloaded unless cached; `expect`: its
        (size, version) from `info()` (then a cached copy is used with no remote call,
        and a changed object is an error, not other data).  `ahead`: (url, expect) of
        the objects needed next, in order; the first `prefetch` are downloaded in the
        background (in a worker process)."""
        if expect is None:
            expect = self.info(url)
        self._prefetch(list(ahead)[: self.prefetch])
        size, version = expect
        entry = self._entry(url, version)
        lock = entry + ".lock"
        if size > self.max_bytes:
            raise SourceFileError(
                f"{url!r} is {size} bytes, more than the whole cache (`max_bytes`={self.max_bytes}): "
                "raise `max_bytes`, or split the data into smaller files.")
        pending = self._prefetching().futures.get(entry)
        if pending is not None:  # this process downloads it already: once, and its error is ours
            if not pending.done():  # still downloading: the read waits for it
                self._prefetching().count("waited")
            failed = pending.exception()
            if isinstance(failed, SourceFileError):
                raise failed
        for _ in range(3):
            try:
                fd = _flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # another process downloads it: wait
                self._prefetching().count("waited")
                fd = _flock(lock, fcntl.LOCK_SH)
            if os.path.exists(entry):
                os.utime(entry)  # most recently used
                return CachedObject(entry, fd)
            _unlock(fd)
            fd = _flock(lock, fcntl.LOCK_EX)
            try:
                if not os.path.exists(entry):
                    self._download(url, entry, size, version)
                    self._prefetching().count("read")
                # Downgrade; the conversion is not atomic, so check the file is still there.
                fcntl.flock(fd, fcntl.LOCK_SH)
            except BaseException:
                _unlock(fd)
                raise
            if os.path.exists(entry):
                os.utime(entry)
                return CachedObject(entry, fd)
            _unlock(fd)
        raise SourceFileError(f"{url!r}: evicted from the cache as soon as it was downloaded, three times; "
                              f"raise `max_bytes` (now {self.max_bytes}).")

    def downloads(self) -> dict[str, int]:
        """Objects this process downloaded so far: `read` (when a read needed them) and
        `prefetched` (ahead of the read); and `waited`: reads that found their object's
        lock taken (a download in progress, by a prefetch thread or another process) and
        waited for it.  A prefetch that pays leaves both `read` and `waited` at 0."""
        return dict(self._prefetching().counts)

    def _prefetching(self) -> _Prefetcher:
        return self._ahead.get("state", lambda: _Prefetcher(self.prefetch))

    def _prefetch(self, ahead: Sequence[tuple[str, Any]]) -> None:
        if not ahead or _prefetch_pid != os.getpid():
            return
        state = self._prefetching()
        for url, (size, version) in ahead:
            entry = self._entry(url, version)
            if size <= self.max_bytes and not os.path.exists(entry):
                state.submit(entry, lambda u=url, e=entry, n=size, v=version: self._fetch_ahead(u, e, n, v))

    def _fetch_ahead(self, url: str, entry: str, size: int, version: str) -> None:
        fd = _try_flock(entry + ".lock")
        if fd is None:  # being read (so there) or downloaded by another process
            return
        try:
            if not os.path.exists(entry):
                self._download(url, entry, size, version, ahead=True)
                self._prefetching().count("prefetched")
        except _NoRoom:
            pass
        finally:
            _unlock(fd)

    def _reserve(self, part: str, size: int, url: str, ahead: bool = False) -> None:
        """Make room for `size` bytes and create `part` at that size (holds the budget
        lock).  A read waits while downloads in progress fill the cache; a prefetch
        (`ahead`) evicts only stale objects, and gives up (`_NoRoom`) rather than wait."""
        while True:
            fd = _flock(os.path.join(self.cache_dir, BUDGET_LOCK), fcntl.LOCK_EX)
            try:
                if os.path.exists(part):
                    os.unlink(part)  # a dead process's (we hold this object's lock)
                entries = []
                for e in os.scandir(self.cache_dir):
                    if e.name.endswith(".lock") or e.name.startswith(".") or not e.is_file():
                        continue
                    st = e.stat()
                    entries.append((st.st_mtime_ns, e.path, st.st_size))
                used = sum(s for _, _, s in entries)
                busy = downloading = 0
                for mtime, path, nbytes in sorted(entries):
                    if used + size <= self.max_bytes:
                        break
                    is_part = path.endswith(".part")
                    if ahead and not is_part and mtime >= self._born_ns:
                        continue  # used in this run: maybe about to be read again
                    base = path[: -len(".part")] if is_part else path
                    held = _try_flock(base + ".lock")
                    if held is None:  # being read or downloaded
                        busy += nbytes
                        downloading += nbytes if is_part else 0
                        continue
                    try:
                        os.unlink(path)
                        used -= nbytes
                    except FileNotFoundError:
                        used -= nbytes
                    finally:
                        _unlock(held)
                if used + size <= self.max_bytes:
                    with open(part, "wb") as f:
                        f.truncate(size)  # reserved at full size: counted by every other budget check
                    return
                if ahead:
                    raise _NoRoom
                if not downloading:
                    raise SourceFileError(
                        f"the object cache {self.cache_dir!r} is full: {url!r} needs {size} bytes, "
                        f"{used} of `max_bytes`={self.max_bytes} are taken ({busy} by objects being read "
                        "or downloaded right now). Raise `max_bytes`, or read fewer files at once (fewer "
                        "workers or loaders on this cache).")
            finally:
                _unlock(fd)
            time.sleep(FULL_WAIT_S)  # a download finishing (a prefetch's then evictable) makes room

    def _download(self, url: str, entry: str, size: int, version: str, ahead: bool = False) -> None:
        part = entry + ".part"
        self._reserve(part, size, url, ahead)

        def call(fs: Any, path: str) -> None:
            with fs.open(path, "rb", block_size=self.block_bytes) as src, open(part, "r+b") as dst:
                got = 0
                while True:
                    block = src.read(self.block_bytes)
                    if not block:
                        break
                    dst.write(block)
                    got += len(block)
                if got != size:
                    raise OSError(f"read {got} bytes, expected {size}")
        try:
            self._remote(url, "downloading it", call)
            os.rename(part, entry)
        except BaseException:
            try:
                os.unlink(part)
            except FileNotFoundError:
                pass
            raise

    def __repr__(self) -> str:
        return f"shmfeed.sources.ObjectCache({self.cache_dir!r}, max_bytes={self.max_bytes})"


class _Prefetcher:
    """One process's prefetch: at most `limit` downloads queued or running, by entry."""

    def __init__(self, limit: int):
        self.limit = limit
        self.futures: dict[str, Future] = {}
        self.counts = {"read": 0, "prefetched": 0, "waited": 0}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def submit(self, entry: str, job: Any) -> None:
        with self._lock:
            self.futures = {e: f for e, f in self.futures.items() if not f.done()}
            if entry in self.futures or len(self.futures) >= self.limit:
                return
            if self._pool is None:  # started on first use: in the worker, after the fork
                self._pool = ThreadPoolExecutor(self.limit, thread_name_prefix="shmfeed-prefetch")
            self.futures[entry] = self._pool.submit(job)

    def count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1


def source_paths(paths: Any, cache: ObjectCache | None, what: str) -> list[str]:
    """`paths` (files, URLs, glob patterns of either) as a list; URLs need `cache`."""
    from ._sourcefiles import file_list
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not any(is_url(p) for p in items):
        return file_list(items, what)
    if cache is None:
        url = next(p for p in items if is_url(p))
        raise SpecError(f"{what}: {url!r} is remote: give a local cache for it, `cache=shmfeed.sources."
                        "ObjectCache(cache_dir, max_bytes=...)`")
    out: list[str] = []
    for p in items:
        if not is_url(p):
            out += file_list([p], what)
            continue
        url = str(p)
        if any(c in url for c in "*?["):
            matches = cache.glob(url)
            if not matches:
                raise SpecError(f"{what}: the pattern {url!r} matches no object")
            out += matches
        else:
            out.append(url)
    return out


def stamp(path: str, cache: ObjectCache | None) -> tuple:
    """What identifies this version of a file: (size, mtime) or, for a URL, (size, version tag)."""
    if is_url(path):
        assert cache is not None
        return cache.info(path)
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def files_after(paths: list[str], stamps: list, f: int, cache: ObjectCache | None) -> list[tuple[str, tuple]]:
    """(URL, version) of the remote files after file f, as many as `cache` fetches ahead:
    a per-sample source's order (unshuffled) reads its files in turn."""
    if cache is None:
        return []
    return [(p, v) for p, v in zip(paths[f + 1: f + 1 + cache.prefetch], stamps[f + 1:]) if is_url(p)]


def readable_path(path: str, version: tuple, cache: ObjectCache | None, handles: PerProcess, key: Any,
                  what: str, index: str, ahead: Sequence[tuple[str, tuple]] = ()) -> str:
    """The local file to read `path` from in this process: a URL's cached copy (held
    open, never evicted, while this process reads it: `handles` under `key`; `ahead`:
    the (URL, version) of the files after it, which the cache may fetch ahead), or the
    file itself once checked to be the `version` (`stamp`) the source was made from.
    `what` names the format ("Parquet"), `index` what the source built on it ("row")."""
    if is_url(path):
        assert cache is not None
        return handles.get(("cached", key), lambda: cache.open(path, version, ahead)).path
    try:
        st = os.stat(path)
    except OSError as exc:
        raise SourceFileError(f"{what} file {path!r} is gone ({exc}); it was there when the source "
                              "was made. Restore it, or make a new source without it.") from exc
    if (st.st_size, st.st_mtime_ns) != version:
        raise SourceFileError(
            f"{what} file {path!r} changed since the source was made (size {version[0]} -> "
            f"{st.st_size} bytes); its {index} index no longer holds. Make a new source (and Loader) "
            "after rewriting files.")
    return path
