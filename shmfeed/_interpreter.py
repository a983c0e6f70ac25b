"""Fresh interpreters that shmfeed starts (a spawned pool's supervisor, the benchmark's
children), and what crosses into them.

Owns: the command line of such an interpreter, which imports this very shmfeed (the
directory this package was imported from comes first on its `sys.path`, so a checkout
in the working directory cannot shadow an installed copy, nor the reverse); the
`sys.path` it adopts from the training process; and turning the source into bytes
that it can rebuild (`dump_source`), checked in the training process at once.

Invariants:
- The user's `__main__` is never imported or run again: classes, functions and lambdas
  defined there (a script, a notebook, `python -c`, stdin) travel by value with
  cloudpickle; everything importable travels by reference and is imported from the
  training process's `sys.path`.
- A source that cannot make the trip fails in the training process, with a
  `SourcePickleError` naming the attribute to blame, never later in a worker.
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

from . import _sysinfo
from ._errors import SourcePickleError

# The directory holding the imported `shmfeed` package.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CULPRIT_DEPTH = 6  # how deep the search for an unpicklable attribute goes
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


def dumps(obj: Any) -> bytes:
    return cloudpickle.dumps(obj)


def loads(data: bytes) -> Any:
    return cloudpickle.loads(data)


def dump_source(source: Any, why: str) -> Parcel:
    """The source as a `Parcel` a pool process rebuilds it from (`load_source`), after
    checking here that it loads back.  `why` says why it must travel (for the error).

    Its large contiguous numpy arrays travel out of band (pickle protocol 5): each is
    written once, straight from its memory, into the parcel's memfd, which the pool
    process maps copy-on-write; so neither side ever holds pickled bytes of them, and
    the check here rebuilds views of the source's own arrays (no copy)."""
    buffers: list[pickle.PickleBuffer] = []

    def out_of_band(buf: pickle.PickleBuffer) -> bool:
        with buf.raw() as raw:
            if raw.nbytes < INBAND_BYTES:
                return True
        buffers.append(buf)
        return False

    try:
        data = cloudpickle.dumps(source, protocol=5, buffer_callback=out_of_band)
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
        cloudpickle.loads(data, buffers=buffers)
    except Exception as exc:
        raise SourcePickleError(
            f"the source ({type(source).__name__}) pickles but does not load back "
            f"({type(exc).__name__}: {exc}), so the worker processes could not rebuild it. "
            "Check its `__getstate__`/`__setstate__` or `__reduce__`.") from exc
    return Parcel(_pack(source, data, buffers))


class Parcel:
    """A source on its way to a pool process: one memfd holding, in order, the length
    of the head (8 bytes), the head (a pickle of the source's pickle and where each
    out-of-band buffer lies), then each buffer at a page boundary.  The sender closes
    it once sent (`close`); the receiver maps it (`load_source`)."""

    def __init__(self, fd: int):
        self.fd = fd

    def fds(self) -> list[int]:
        """What travels: the memfd."""
        return [self.fd]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _pack(source: Any, data: bytes, buffers: list[pickle.PickleBuffer]) -> int:
    """The parcel's memfd for the pickle `data` and its out-of-band `buffers`."""
    table, end = [], 0
    for buf in buffers:
        with buf.raw() as raw:
            table.append((end, raw.nbytes))
            end += -(-raw.nbytes // PAGE_BYTES) * PAGE_BYTES
    head = pickle.dumps((data, table), protocol=5)
    start = -(-(8 + len(head)) // PAGE_BYTES) * PAGE_BYTES
    total = start + end
    headroom = _sysinfo.memory_headroom_bytes()
    if end and headroom.value is not None and total > headroom.value:
        raise SourcePickleError(
            f"the source ({type(source).__name__}) holds {end / 2**20:.1f} MiB of arrays that the "
            f"worker processes would share through memory, but only {headroom.value / 2**20:.1f} MiB "
            f"can be allocated now ({headroom.source}). {_BIG_FIX}")
    fd = os.memfd_create("shmfeed-source", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, total)
        _write_all(fd, len(head).to_bytes(8, "little") + head, 0)
        for buf, (offset, _) in zip(buffers, table):
            with buf.raw() as raw:
                _write_all(fd, raw, start + offset)
    except OSError as exc:
        os.close(fd)
        raise SourcePickleError(
            f"the source ({type(source).__name__})'s {end / 2**20:.1f} MiB of arrays could not be "
            f"placed in shared memory for the worker processes ({exc}). {_BIG_FIX}") from exc
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_all(fd: int, data: Any, offset: int) -> None:
    """Write the bytes-like `data` at `offset`, however many calls that takes (one
    write moves at most ~2 GiB)."""
    with memoryview(data) as view, view.cast("B") as flat:
        done = 0
        while done < len(flat):
            done += os.pwrite(fd, flat[done : done + WRITE_CHUNK_BYTES], offset + done)


def load_source(fd: int) -> Any:
    """The source of the parcel in memfd `fd` (see `Parcel`), its large arrays views
    of one private (copy-on-write) mapping of it: pages nobody writes stay shared
    with every process that maps it, and a write stays in the process that made it,
    as after a fork.  `fd` is the caller's to close."""
    size = int.from_bytes(os.pread(fd, 8, 0), "little")
    data, table = pickle.loads(os.pread(fd, size, 8))
    if not table:
        return cloudpickle.loads(data)
    start = -(-(8 + size) // PAGE_BYTES) * PAGE_BYTES
    mm = mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
    whole = memoryview(mm)
    return cloudpickle.loads(data, buffers=[whole[start + off : start + off + n] for off, n in table])


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
