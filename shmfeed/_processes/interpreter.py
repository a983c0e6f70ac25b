"""Fresh interpreters that shmfeed starts (a spawned pool's supervisor, the benchmark's
children), and what crosses into them.

Owns: the command line of such an interpreter, which imports this very shmfeed (the
directory this package was imported from comes first on its `sys.path`, so a checkout
in the working directory cannot shadow an installed copy, nor the reverse); the
`sys.path` it adopts from the training process; and turning the source into a
`Parcel` that a pool process (fresh, or forked by the fork server) rebuilds it from
(`dump_source`, `load_source`), checked in the training process at once.

Invariants:
- The user's `__main__` is never imported or run again: classes, functions and lambdas
  defined there (a script, a notebook, `python -c`, stdin) travel by value with
  cloudpickle; everything importable travels by reference and is imported from the
  training process's `sys.path`.
- A source that cannot make the trip fails in the training process, with a
  `SourcePickleError` naming the attribute to blame, never later in a worker.
- Large arrays never travel as pickled bytes: out of band, through the parcel's memfd,
  which the training process's own pages move into where they safely can
  (_processes/sharepages.py).  Memory-mapped files travel as the open file the loader checked
  (`FileTable`), never by name.  The training process closes a parcel once sent; the
  receiver closes the descriptors it got once the source is rebuilt.
"""

from __future__ import annotations

import io
import mmap
import os
import pickle
import socket
import sys
from typing import Any

import cloudpickle
import numpy as np

from .. import _sysinfo
from .._errors import SourcePickleError
from ..sources._arrays import MappedFile, _file_ref
from . import sharepages as _sharepages

# The directory holding the imported `shmfeed` package (this file is shmfeed/_processes/).
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_CULPRIT_DEPTH = 6  # how deep the search for an unpicklable attribute goes
MAX_FILES = 248  # a message carries 253 descriptors (SCM_MAX_FD), 5 of them not the source's
INBAND_BYTES = 64 << 10  # smaller arrays stay inside the pickle (a page each would cost more)
PAGE_BYTES = mmap.PAGESIZE
WRITE_CHUNK_BYTES = 1 << 30
_BIG_FIX = ("Memory-map large arrays from files (np.load(path, mmap_mode='r'): only the file "
            "travels), free memory, or create the Loader before JAX/CUDA starts (a fork shares "
            "the arrays without a copy).")


def python_command(code: str) -> list[str]:
    """`python -c <code>` that imports the same shmfeed as this process."""
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {PACKAGE_PARENT!r}); {code}"]


def parent_sys_path() -> list[str]:
    """This process's `sys.path`, with the working directory ('') made absolute."""
    return [PACKAGE_PARENT] + [os.path.abspath(p or os.getcwd()) for p in sys.path]


def adopt_sys_path(paths: list[str]) -> None:
    """Take the training process's `sys.path` (see `parent_sys_path`)."""
    sys.path[:] = list(dict.fromkeys(paths))


def parent_process_state() -> tuple[str, tuple[tuple[str, str], ...]]:
    """This process's working directory and environment, as `adopt_process_state` takes
    them: what a forked worker would have inherited."""
    return os.fsdecode(os.getcwd()), tuple((os.fsdecode(k), os.fsdecode(v)) for k, v in os.environb.items())


def adopt_process_state(cwd: str, environ: tuple[tuple[str, str], ...]) -> None:
    """Take the training process's working directory and environment (see
    `parent_process_state`): a pool forked by the fork server would otherwise see the
    server's, as they were when JAX's import started it, not the credentials or the
    `chdir` the script made since.  A working directory gone since stays the server's."""
    wanted = {os.fsencode(k): os.fsencode(v) for k, v in environ}
    for k in [k for k in os.environb if k not in wanted]:
        del os.environb[k]
    os.environb.update(wanted)
    try:
        os.chdir(cwd)
    except OSError:
        pass


def dumps(obj: Any) -> bytes:
    return cloudpickle.dumps(obj)


def loads(data: bytes) -> Any:
    return cloudpickle.loads(data)


def dump_source(source: Any, why: str, files: FileTable) -> Parcel:
    """The source as a `Parcel` a pool process rebuilds it from (`load_source`), after
    checking here that it loads back.  `why` says why it must travel (for the error);
    `files` holds the files its memmaps map, opened once for the loader's life.

    Its large contiguous numpy arrays travel out of band (pickle protocol 5): each is
    written once, straight from its memory, into the parcel's memfd, which the pool
    process maps copy-on-write, and its pages here then move into that memfd where
    they safely can (_processes/sharepages.py); so neither side ever holds pickled bytes of them,
    and the check here rebuilds views of the source's own arrays (no copy)."""
    buffers: list[pickle.PickleBuffer] = []

    def out_of_band(buf: pickle.PickleBuffer) -> bool:
        with buf.raw() as raw:
            if raw.nbytes < INBAND_BYTES:
                return True
        buffers.append(buf)
        return False

    out = io.BytesIO()
    pickler = _SourcePickler(out, files, out_of_band)
    try:
        pickler.dump(source)
        data = out.getvalue()
    except SourcePickleError:
        raise
    except Exception as exc:
        found = unpicklable_part(source, "source", 0)
        path, part, cause = found if found is not None else (None, source, exc)
        what = f"its attribute `{path}` ({type(part).__name__})" if path else type(source).__name__
        held = _held_resource(part)
        raise SourcePickleError(
            f"the source ({type(source).__name__}) cannot be sent to the worker processes: "
            f"{what} cannot be pickled ({type(cause).__name__}: {cause})"
            + (f"; it is {held} of this process, which a process started apart cannot share"
               if held else "")
            + f". They rebuild the source from bytes (in a fresh interpreter, or the fork server's "
            f"copy of this process) because {why}. Open such resources lazily in `__getitem__` "
            "(and leave them out of `__getstate__`), create the Loader before JAX/CUDA starts, or "
            "pass `start_method='fork'` to fork anyway (unsafe once JAX/CUDA threads run).",
            path) from exc
    try:
        _loads(data, buffers, [files.fds[i] for i in pickler.sent])
    except Exception as exc:
        raise SourcePickleError(
            f"the source ({type(source).__name__}) pickles but does not load back "
            f"({type(exc).__name__}: {exc}), so the worker processes could not rebuild it. "
            "Check its `__getstate__`/`__setstate__` or `__reduce__`.") from exc
    return Parcel(_pack(source, data, buffers), [files.fds[i] for i in pickler.sent])


class Parcel:
    """A source on its way to a pool process: one memfd holding, in order, the length
    of the head (8 bytes), the head (a pickle of the source's pickle and where each
    out-of-band buffer lies), then each buffer, at its own pages, at the same offset
    within a page as in the training process; and `files`, the
    descriptors of the files its memmaps map (the loader's: borrowed).  The sender
    closes it once sent (`close`); the receiver maps it (`load_source`)."""

    def __init__(self, fd: int, files: list[int]):
        self.fd = fd
        self.files = files

    def fds(self) -> list[int]:
        """What travels: the memfd, then the files."""
        return [self.fd, *self.files]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _pack(source: Any, data: bytes, buffers: list[pickle.PickleBuffer]) -> int:
    """The parcel's memfd for the pickle `data` and its out-of-band `buffers`; each
    buffer lies at the same offset within a page as in this process, so that its
    whole pages can be moved into the memfd (_processes/sharepages.py)."""
    table, end, places = [], 0, []
    for buf in buffers:
        with buf.raw() as raw:
            address = np.frombuffer(raw, np.uint8).ctypes.data if raw.nbytes else 0
            shift = address % PAGE_BYTES
            table.append((end + shift, raw.nbytes))
            places.append((address, _sharepages.movable(raw.obj, address, raw.nbytes)))
            end += -(-(shift + raw.nbytes) // PAGE_BYTES) * PAGE_BYTES
    head = pickle.dumps((data, table), protocol=5)
    start = -(-(8 + len(head)) // PAGE_BYTES) * PAGE_BYTES
    total = start + end
    # Moved pages are memory that changes hands, not more of it: a chunk at a time.
    copied = sum(n for (_, n), (_, move) in zip(table, places) if move is None)
    needed = start + copied + min(end - copied, _sharepages.CHUNK_BYTES)
    headroom = _sysinfo.memory_headroom_bytes()
    if end and headroom.value is not None and needed > headroom.value:
        raise SourcePickleError(
            f"the source ({type(source).__name__}) holds {end / 2**20:.1f} MiB of arrays that the "
            f"worker processes would share through memory, {needed / 2**20:.1f} MiB of it copied, "
            f"but only {headroom.value / 2**20:.1f} MiB can be allocated now ({headroom.source}). "
            f"{_BIG_FIX}")
    fd = os.memfd_create("shmfeed-source", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, total)
        _write_all(fd, len(head).to_bytes(8, "little") + head, 0)
        for buf, (offset, _), (address, move) in zip(buffers, table, places):
            with buf.raw() as raw:
                _write_moving(fd, raw, start + offset, address, move)
    except OSError as exc:
        os.close(fd)
        raise SourcePickleError(
            f"the source ({type(source).__name__})'s {end / 2**20:.1f} MiB of arrays could not be "
            f"placed in shared memory for the worker processes ({exc}). {_BIG_FIX}") from exc
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_moving(fd: int, raw: memoryview, offset: int, address: int,
                  move: tuple[int, int] | None) -> None:
    """Write buffer `raw` (at `address` here) at `offset` of memfd `fd`, chunk by
    chunk; with `move` (its movable pages), move each chunk's pages into the memfd
    right after writing them (_processes/sharepages.py), until the kernel refuses one."""
    if move is None:
        _write_all(fd, raw, offset)
        return
    lo, hi = move[0], move[0] + move[1]
    step = _sharepages.CHUNK_BYTES
    cut = address
    while cut < address + raw.nbytes:
        nxt = min(address + raw.nbytes, (cut // step + 1) * step)
        _write_all(fd, raw[cut - address : nxt - address], offset + cut - address)
        a = max(lo, -(-cut // PAGE_BYTES) * PAGE_BYTES)
        b = min(hi, nxt // PAGE_BYTES * PAGE_BYTES)
        if b > a and not _sharepages.move(fd, offset + a - address, a, b - a):
            lo = hi  # keep the rest as it is
        cut = nxt


def _write_all(fd: int, data: Any, offset: int) -> None:
    """Write the bytes-like `data` at `offset`, however many calls that takes (one
    write moves at most ~2 GiB)."""
    with memoryview(data) as view, view.cast("B") as flat:
        done = 0
        while done < len(flat):
            done += os.pwrite(fd, flat[done : done + WRITE_CHUNK_BYTES], offset + done)


def load_source(fds: list[int]) -> Any:
    """The source of the parcel whose descriptors are `fds` (see `Parcel`), its large
    arrays views of one private (copy-on-write) mapping of the memfd: pages nobody
    writes stay shared with every process that maps it, and a write stays in the
    process that made it, as after a fork.  `fds` are the caller's to close."""
    fd, files = fds[0], fds[1:]
    size = int.from_bytes(os.pread(fd, 8, 0), "little")
    data, table = pickle.loads(os.pread(fd, size, 8))
    if not table:
        return _loads(data, [], files)
    start = -(-(8 + size) // PAGE_BYTES) * PAGE_BYTES
    mm = mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
    whole = memoryview(mm)
    return _loads(data, [whole[start + off : start + off + n] for off, n in table], files)


_loading_files: list[int] = []  # the descriptors `_open_file` maps while a source loads


def _loads(data: bytes, buffers: list, files: list[int]) -> Any:
    global _loading_files
    _loading_files = files
    try:
        return cloudpickle.loads(data, buffers=buffers)
    finally:
        _loading_files = []


def _open_file(index: int, dtype: str, shape: tuple, offset: int, order: str) -> np.memmap:
    """A memmap of the `index`th file sent with the source (mmap keeps its own
    descriptor: the one received may be closed afterwards)."""
    with open(_loading_files[index], "rb", closefd=False) as f:
        return np.memmap(f, dtype=np.dtype(dtype), mode="r", offset=offset, shape=shape, order=order)  # type: ignore[call-overload]


class _SourcePickler(cloudpickle.Pickler):
    """cloudpickle, protocol 5, with memory-mapped files sent as open files: an
    `np.memmap` of a whole file (`_arrays.MappedFile`, or one anywhere in the source)
    unpickles as a memmap of the descriptor `FileTable` opened for it, never by name
    and never by content (a plain pickle would copy the whole file)."""

    def __init__(self, out: io.BytesIO, files: FileTable, buffer_callback: Any):
        super().__init__(out, protocol=5, buffer_callback=buffer_callback)
        self.files = files
        self.sent: list[int] = []  # indices into files.fds, in the order the pickle names them

    def reducer_override(self, obj: Any) -> Any:
        array = obj.array if isinstance(obj, MappedFile) else obj
        if isinstance(array, np.memmap):
            ref = _file_ref(array)
            if ref is not None:
                index = self.files.open(array, ref[0])
                if index not in self.sent:
                    self.sent.append(index)
                return _open_file, (self.sent.index(index), *ref[1:])
        return super().reducer_override(obj)


class FileTable:
    """The files a loader's source maps, each opened once, by name, after checking that
    the name still leads to the file the source maps (its inode, read from
    /proc/self/maps), then kept open for the loader's life and passed by descriptor:
    a pool started later (a restart, the next epoch's) reads the same file even if
    the name has since been given to another."""

    def __init__(self) -> None:
        self.fds: list[int] = []
        self._index: dict[Any, int] = {}

    def open(self, array: np.memmap, filename: str) -> int:
        """The index in `fds` of the file `array` maps."""
        mapped = _mapped_inode(array.ctypes.data)
        key = mapped if mapped is not None else filename
        if key in self._index:
            return self._index[key]
        if len(self.fds) >= MAX_FILES:
            raise SourcePickleError(
                f"the source maps more than {MAX_FILES} files, which is more than one message can "
                "send to the worker processes. Map fewer, larger files, or open them lazily in "
                "`__getitem__`.")
        fd = os.open(filename, os.O_RDONLY | os.O_CLOEXEC)
        ino = os.fstat(fd).st_ino
        # The inode alone: overlayfs shows the layer's device in /proc/self/maps.
        if mapped is not None and ino != mapped[1]:
            os.close(fd)
            raise SourcePickleError(
                f"the source maps the file {os.fspath(filename)!r} (inode {mapped[1]}), but that name now leads "
                f"to another file (inode {ino}): it was replaced after the memmap was made, and the "
                "worker processes would read different data. Keep a file in place while a loader "
                "maps it (write new data under a new name), or make the memmap again.")
        self._index[key] = len(self.fds)
        self.fds.append(fd)
        return self._index[key]

    def close(self) -> None:
        fds, self.fds, self._index = self.fds, [], {}
        for fd in fds:
            os.close(fd)


def _mapped_inode(address: int) -> tuple[str, int] | None:
    """(device, inode) of the file mapped at `address` in this process, from
    /proc/self/maps; None where that cannot be read."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                lo, hi = (int(a, 16) for a in fields[0].split("-"))
                if lo <= address < hi:
                    return (fields[3], int(fields[4])) if int(fields[4]) else None
    except (OSError, ValueError, IndexError):
        return None
    return None


def _held_resource(obj: Any) -> str | None:
    """'an open file ...' / 'an open socket' when `obj` is a descriptor's owner."""
    if isinstance(obj, io.IOBase):
        name = getattr(obj, "name", None)
        return "an open file" + (f" ({name!r})" if isinstance(name, str) else "")
    if isinstance(obj, socket.socket):
        return "an open socket"
    if isinstance(obj, mmap.mmap):
        return "an open memory map (wrap it in `np.memmap` to send it)"
    return None


def _children(obj: Any) -> list[tuple[str, Any]]:
    if isinstance(obj, dict):
        return [(f"[{k!r}]", v) for k, v in obj.items()]
    if isinstance(obj, (list, tuple)):
        return [(f"[{i}]", v) for i, v in enumerate(obj)]
    out = [(f".{k}", v) for k, v in getattr(obj, "__dict__", {}).items()]
    for cls in type(obj).__mro__:
        for name in getattr(cls, "__slots__", ()):
            if hasattr(obj, name):
                out.append((f".{name}", getattr(obj, name)))
    return out


def unpicklable_part(obj: Any, path: str, depth: int) -> tuple[str, Any, BaseException] | None:
    """The deepest part of `obj` that does not pickle: (path, part, error), or None."""
    for name, child in _children(obj):
        try:
            cloudpickle.dumps(child)
        except Exception as exc:
            deeper = unpicklable_part(child, path + name, depth + 1) if depth < _CULPRIT_DEPTH else None
            return deeper or (path + name, child, exc)
    return None
