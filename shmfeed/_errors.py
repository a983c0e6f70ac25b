"""shmfeed's exceptions: one base, a few specific kinds.

Messages say what failed with the numbers observed, then the remedy, naming the
parameter to change in backticks.
"""

from __future__ import annotations

from typing import cast


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
        # Not super(): in a WorkerError that is also the user's type (worker_error_as),
        # that type's __init__ may want other arguments.
        BaseException.__init__(self, message)
        unknown = set(fields) - set(self.FIELDS)
        if unknown:
            raise TypeError(f"unknown WorkerError fields: {sorted(unknown)}")
        for name in self.FIELDS:
            setattr(self, name, fields.get(name))


_AS_CAUGHT: dict[type | None, type | None] = {}  # user exception type -> WorkerError that is also one


def _rebuild_worker_error(original: type, message: str, fields: dict) -> WorkerError:
    return worker_error_as(original, message, **fields)


def worker_error_as(original: type | None, message: str, **fields: object) -> WorkerError:
    """A WorkerError that is also an `original` (so `except ValueError` catches a worker's
    ValueError, as it would in a loop without workers), when that type can be
    subclassed; a plain WorkerError otherwise (`BaseException`s such as `SystemExit`
    are never mimicked: a worker's `sys.exit()` must not end the training loop)."""
    if original not in _AS_CAUGHT:
        both = None
        if isinstance(original, type) and issubclass(original, Exception) \
                and not issubclass(original, ShmfeedError) and original is not Exception:
            try:
                both = type(f"WorkerError[{original.__name__}]", (WorkerError, original), {
                    "__module__": __name__,
                    # The original's own __init__ and __str__ may want other arguments or
                    # print differently (KeyError quotes): this one is a WorkerError's.
                    "__init__": WorkerError.__init__,
                    "__str__": BaseException.__str__,
                    "__reduce__": lambda self: (_rebuild_worker_error, (
                        original, self.args[0] if self.args else "",
                        {f: getattr(self, f) for f in WorkerError.FIELDS})),
                })
            except TypeError:  # a final class, or a layout no subclass can mix
                both = None
        _AS_CAUGHT[original] = both
    cls = _AS_CAUGHT[original]
    if cls is None:
        return WorkerError(message, **fields)
    try:
        err = cast(WorkerError, cls.__new__(cls, message))
    except Exception:  # a __new__ that wants other arguments
        return WorkerError(message, **fields)
    WorkerError.__init__(err, message, **fields)
    return err


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
