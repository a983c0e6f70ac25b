"""shmfeed's exceptions: one base, a few specific kinds.

Messages say what failed with the numbers observed, then the remedy, naming the
parameter to change in backticks.
"""

from __future__ import annotations


class ShmfeedError(Exception):
    """Base class of every error shmfeed raises on purpose."""


class SpecError(ShmfeedError, ValueError):
    """A sample or batch does not fit the batch spec (structure, shape, dtype, size),
    or an argument of the loader is invalid."""


class SourcePickleError(SpecError):
    """The source cannot be sent to a fresh interpreter: it does not pickle (with
    cloudpickle), or what it pickles to does not load back.  `path` names the part that
    fails, e.g. `source.reader._file` (None when no single attribute is to blame)."""

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path


class WorkerError(ShmfeedError):
    """A worker raised, died, hung, or the pool could not be kept alive.

    Attributes, None where they do not apply: `batch`, `epoch`, `item` (the sample or
    source-batch index), `worker`, `pid`, `signal`, `exit_code`, `waited_s` and
    `worker_traceback` (the worker's traceback text).
    """

    FIELDS = ("batch", "epoch", "item", "worker", "pid", "signal", "exit_code", "waited_s",
              "worker_traceback")

    def __init__(self, message: str, **fields: object):
        super().__init__(message)
        unknown = set(fields) - set(self.FIELDS)
        if unknown:
            raise TypeError(f"unknown WorkerError fields: {sorted(unknown)}")
        for name in self.FIELDS:
            setattr(self, name, fields.get(name))


class ImageDecodeError(ShmfeedError, OSError):
    """An image file of an `ImageFolder` could not be read or decoded."""


class RingFullError(ShmfeedError):
    """Every ring slot is held by batches the caller kept, so no new batch can be read."""


class RingMemoryError(ShmfeedError, MemoryError):
    """The ring does not fit the memory this process may use (a cgroup limit,
    `RLIMIT_AS`, the machine's available memory)."""


class LoaderClosedError(ShmfeedError):
    """The loader was used after `close()`."""


def internal(msg: str) -> ShmfeedError:
    """An error that means shmfeed itself is wrong, not the caller."""
    return ShmfeedError(f"[INTERNAL ERROR] {msg}; please report it with this message")
