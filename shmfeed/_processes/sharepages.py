"""Moving a large array of the training process into the memfd of the parcel that
carries its source to a pool (_interpreter.Parcel), so that the dataset is in memory
once, not twice (issue 26.4).

A parcel's memfd holds a copy of each large array of the source.  Without more, the
training process keeps its own copy next to it: 2x the dataset for as long as the pool
lives.  So, once a stretch of an array has been written into the memfd, the whole
pages of that stretch in the training process are mapped again, at the same address,
from the memfd, privately (`mmap(MAP_FIXED | MAP_PRIVATE)`): the kernel drops the
anonymous pages, and reads see the same bytes, now the memfd's pages, shared with the
pool.  A later write by the training process copies the page it touches (copy on
write), as it would after a fork, and the pool never sees it.

Only where nothing can tell the difference: an array whose memory numpy's default
allocator got from glibc's `malloc` as a chunk of its own mapping (every allocation of
32 MiB or more, often smaller ones), which glibc gives back with `munmap` (and resizes
with `mremap`, which refuses a range of two mappings, so it copies instead).  Anything
else (another allocator preloaded, a custom numpy handler, an array from a heap arena,
a buffer not owned by numpy) is left as it is and costs its copy.  A thread that
writes into the array while its pages are moved could lose that write: the stretch is
moved right after it is written (`CHUNK_BYTES` at a time), and a pool starts, or an
epoch hook re-sends the source, from the training loop's own thread.
`SHMFEED_SHARE_PAGES=0` turns it off.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from typing import Any

import numpy as np

ENV_SWITCH = "SHMFEED_SHARE_PAGES"
PAGE_BYTES = mmap.PAGESIZE
CHUNK_BYTES = 8 << 20  # written, then moved: the most held twice at once
MIN_BYTES = 1 << 20  # smaller arrays keep their copy (each moved one costs up to 3 mappings)
_IS_MMAPPED = 0x2  # glibc: a chunk's size word has this bit when it has its own mapping
_HEADER_BYTES = 16  # glibc: prev_size and size words before the memory malloc returns
_MAP_FIXED = 0x10  # <sys/mman.h>, Linux (the mmap module does not export it)

_libc: Any = None


def _glibc() -> Any:
    """libc, when its malloc is the one in use (no jemalloc or tcmalloc preloaded)."""
    global _libc
    if _libc is None:
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.gnu_get_libc_version  # noqa: B018 - glibc, not musl
            here = ctypes.cast(ctypes.CDLL(None).malloc, ctypes.c_void_p).value
            ours = here == ctypes.cast(libc.malloc, ctypes.c_void_p).value
        except (OSError, AttributeError):
            ours, libc = False, None
        if ours and libc is not None:
            libc.mmap.restype = ctypes.c_void_p
            libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                                  ctypes.c_int, ctypes.c_long]
        _libc = libc if ours else False
    return _libc or None


def _owner(obj: Any) -> np.ndarray | None:
    """The numpy array that owns `obj`'s memory (following views), if numpy's default
    allocator made it."""
    while isinstance(obj, np.ndarray) and not obj.flags.owndata:
        obj = obj.base
    if not isinstance(obj, np.ndarray):  # bytes, an mmap (np.memmap), another exporter
        return None
    try:
        from numpy._core.multiarray import get_handler_name
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import get_handler_name  # type: ignore[no-redef]
    return obj if get_handler_name(obj) == "default_allocator" else None


def _mappings() -> list[tuple[int, int, str, str]]:
    """(start, end, permissions, path) of each mapping of this process."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            start, end = (int(a, 16) for a in fields[0].split("-"))
            out.append((start, end, fields[1], fields[5].strip() if len(fields) > 5 else ""))
    return out


def _anonymous(maps: list[tuple[int, int, str, str]], lo: int, hi: int) -> bool:
    """Whether [lo, hi) is covered by private writable mappings without a file, or of
    a parcel's memfd (pages moved by an earlier parcel)."""
    covered = lo
    for start, end, perms, path in maps:
        if end <= covered or start > covered:
            continue
        if not perms.startswith("rw") or perms[3] != "p":
            return False
        if path and not path.startswith("/memfd:shmfeed-source"):
            return False
        covered = end
        if covered >= hi:
            return True
    return False


def movable(exporter: Any, address: int, nbytes: int) -> tuple[int, int] | None:
    """(address, length) of the whole pages of the buffer at [address, address +
    nbytes), exported by `exporter` (an array), that may be moved (see the module's
    docstring), or None."""
    if nbytes < MIN_BYTES or os.environ.get(ENV_SWITCH, "1") == "0" or _glibc() is None:
        return None
    owner = _owner(exporter)
    if owner is None:
        return None
    base = owner.ctypes.data
    maps = _mappings()
    # Only read glibc's header words where they can be read: in the same memory.
    if not _anonymous(maps, base - _HEADER_BYTES, base + owner.nbytes):
        return None
    size_word = ctypes.c_size_t.from_address(base - 8).value
    pad = ctypes.c_size_t.from_address(base - _HEADER_BYTES).value
    chunk = base - _HEADER_BYTES - pad
    chunk_end = base - _HEADER_BYTES + (size_word & ~0x7)
    if (not size_word & _IS_MMAPPED or chunk % PAGE_BYTES or not base <= address
            or address + nbytes > base + owner.nbytes or chunk_end < base + owner.nbytes
            or not _anonymous(maps, chunk, chunk_end)):
        return None
    lo = -(-address // PAGE_BYTES) * PAGE_BYTES
    hi = (address + nbytes) // PAGE_BYTES * PAGE_BYTES
    return (lo, hi - lo) if hi > lo else None


def move(fd: int, file_offset: int, address: int, nbytes: int) -> bool:
    """Map the whole pages [address, address + nbytes) from memfd `fd` at `file_offset`
    (page-aligned, holding the same bytes), privately, in place of the anonymous pages
    there; False if the kernel refused (checked before it unmaps anything)."""
    libc = _glibc()
    got = libc.mmap(address, nbytes, mmap.PROT_READ | mmap.PROT_WRITE,
                    mmap.MAP_PRIVATE | _MAP_FIXED, fd, file_offset)
    return got == address
