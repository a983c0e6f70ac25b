"""Messages that cross a process boundary, and the errors they become.

Owns the three reports a pool process writes into the ring for the training process
to read (no batch data ever travels this way, only what went wrong):

- `BuildFailure`: a batch's builder raised (worker, or the training process itself
  with `num_workers=0`); written into that slot's report area, met in batch order.
- `WorkerDeath`: the supervisor gave up replacing dead workers (`max_restarts`);
  written into the fatal area.
- `StartupFailure`: a pool started in a fresh interpreter could not rebuild the
  source or the configuration; written into the fatal area.

Invariants:
- `encode()` always returns bytes that fit the area (`REPORT_BYTES` minus the length
  prefix), whatever the text holds: long messages and tracebacks, in any number of
  bytes per character, are shortened to fit (the traceback keeps its end, the message
  its start) and the report says it was shortened.  So a report always decodes.
- Building a report never raises, even for an exception whose `__str__`, traceback
  formatting or pickling raises: that is described as text instead.
- `to_exception()` is the only place a report becomes an exception.
"""

from __future__ import annotations

import importlib
import os
import pickle
import signal
import struct
import traceback
from dataclasses import dataclass, fields, replace
from typing import Any, cast

from .._errors import ShmfeedError, WorkerError, internal, worker_error_as
from .control import REPORT_BYTES

_LEN = struct.Struct("<I")
PAYLOAD_BYTES = REPORT_BYTES - _LEN.size  # what one report area holds after its length
MESSAGE_BYTES = 2048  # the most of an exception's message a shortened report keeps
SHORTENED = "[shortened to fit shmfeed's report area]"


def _cut_head(text: str, max_bytes: int) -> str:
    """The start of `text`, at most `max_bytes` of UTF-8 (never half a character)."""
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= max_bytes:
        return text
    return data[: max(max_bytes, 0)].decode("utf-8", "ignore")


def _cut_tail(text: str, max_bytes: int) -> str:
    """The end of `text`, at most `max_bytes` of UTF-8 (never half a character)."""
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= max_bytes:
        return text
    return data[len(data) - max(max_bytes, 0):].decode("utf-8", "ignore")


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except BaseException as e:  # noqa: B036 - a broken __str__ must not kill the worker
        return f"<str() of this {type(exc).__name__} raised {type(e).__name__}>"


def _safe_traceback(exc: BaseException) -> str:
    try:
        return "".join(traceback.format_exception(exc))
    except BaseException:  # noqa: B036 - e.g. the formatting itself calls a broken __str__
        try:
            frames = "".join(traceback.format_tb(exc.__traceback__))
        except BaseException:  # noqa: B036
            frames = ""
        return f"Traceback (most recent call last):\n{frames}{type(exc).__qualname__}: {_safe_str(exc)}\n"


def _safe_pickle(exc: BaseException) -> bytes | None:
    try:
        data = pickle.dumps(exc)
        pickle.loads(data)  # an exception that pickles but cannot be rebuilt is no use
        return data
    except BaseException:  # noqa: B036
        return None


class _Report:
    """Encoding shared by the reports: a tagged tuple of plain values, pickled."""

    KIND = ""

    def encode(self) -> bytes:
        data = self._pickle(self)
        if len(data) <= PAYLOAD_BYTES:
            return data
        data = self._pickle(self._shortened())
        if len(data) > PAYLOAD_BYTES:  # _shortened's budget makes this unreachable
            raise internal(f"a shortened {self.KIND} report of {len(data)} bytes does not fit "
                           f"{PAYLOAD_BYTES}")
        return data

    def _shortened(self) -> _Report:
        raise NotImplementedError

    @staticmethod
    def _pickle(report: _Report) -> bytes:
        values = tuple(getattr(report, f.name) for f in fields(cast(Any, report)))  # each kind is a dataclass
        return pickle.dumps((report.KIND, values), protocol=pickle.HIGHEST_PROTOCOL)

    def to_exception(self) -> BaseException:
        raise NotImplementedError


@dataclass(frozen=True)
class BuildFailure(_Report):
    KIND = "build"

    worker: int
    pid: int
    batch: int
    epoch: int
    item: int | None  # the sample (or source batch) index being built
    batch_level: bool
    type_module: str
    type_name: str  # qualified name of the exception's class
    message: str
    traceback: str
    exception: bytes | None  # the exception pickled, when it pickles and fits
    shortened: bool = False
    item_name: str | None = None  # how the message names `item`, when not by its index

    @classmethod
    def of(cls, exc: BaseException, *, worker: int, batch: int, epoch: int, item: int | None,
           batch_level: bool, item_name: str | None = None) -> BuildFailure:
        return cls(worker=worker, pid=os.getpid(), batch=batch, epoch=epoch, item=item,
                   item_name=item_name, batch_level=batch_level, type_module=type(exc).__module__,
                   type_name=type(exc).__qualname__, message=_safe_str(exc),
                   traceback=_safe_traceback(exc), exception=_safe_pickle(exc))

    def _shortened(self) -> BuildFailure:
        # The pickled exception goes first (the type and message still say what it
        # was); then the message keeps its start and the traceback its end, each
        # within what is left, with room for the marks.
        fixed = len(self._pickle(replace(self, message="", traceback="", exception=None,
                                       shortened=True)))
        room = PAYLOAD_BYTES - fixed - 2 * len(SHORTENED) - 16
        message = _cut_head(self.message, min(MESSAGE_BYTES, room // 2))
        if message != self.message:
            message += " " + SHORTENED
        used = len(message.encode("utf-8", "surrogatepass"))
        tb = self.traceback
        # The traceback ends with the message again: shorten it there the same way, so
        # that the frames above it, the useful part, survive.
        at = tb.rfind(self.message) if self.message else -1
        if at >= 0 and at + len(self.message) >= len(tb) - 2:
            tb = tb[:at] + message + tb[at + len(self.message):]
        tb = _cut_tail(tb, room - 2 * used)
        if tb != self.traceback:
            tb = SHORTENED + "\n..." + tb
        return replace(self, message=message, traceback=tb, exception=None, shortened=True)

    def to_exception(self) -> BaseException:
        """The worker's SpecError as is; anything else as a WorkerError that is also of
        the original type where it can be (`except ValueError` catches it), chained
        from an exception of the original type and message."""
        original = self._original()
        if isinstance(original, ShmfeedError):
            return original
        where = ""
        if self.item_name is not None:
            where = f", at {self.item_name}"
        elif self.item is not None:
            where = f", at {'source batch' if self.batch_level else 'sample'} index {self.item}"
        # Caught as the original type only when that type itself came back.
        same = type(original).__qualname__ == self.type_name
        err = worker_error_as(
            type(original) if same else None,
            f"worker {self.worker} (pid {self.pid}) raised {self.type_name}: {self.message} "
            f"while building batch {self.batch} of epoch {self.epoch}{where}.\n\n"
            f"Worker traceback:\n{self.traceback}",
            batch=self.batch, epoch=self.epoch, item=self.item, worker=self.worker, pid=self.pid,
            worker_traceback=self.traceback)
        err.__cause__ = original  # as `raise err from original` would
        err.__suppress_context__ = True
        return err

    def _original(self) -> BaseException:
        if self.exception is not None:
            try:
                exc = pickle.loads(self.exception)
                if isinstance(exc, BaseException):
                    return exc
            except Exception:
                pass
        try:
            cls = importlib.import_module(self.type_module)
            for part in self.type_name.split("."):
                cls = getattr(cls, part)
            if not (isinstance(cls, type) and issubclass(cls, BaseException)):
                raise TypeError(self.type_name)
            try:
                return cls(self.message)
            except Exception:
                # An __init__ that wants other arguments: same type and message anyway.
                exc = cls.__new__(cls)
                exc.args = (self.message,)
                return exc
        except Exception:
            return RuntimeError(f"{self.type_module}.{self.type_name}: {self.message}")


@dataclass(frozen=True)
class WorkerDeath(_Report):
    KIND = "death"

    message: str
    worker: int
    pid: int
    batch: int | None = None
    epoch: int | None = None
    signal: int | None = None
    exit_code: int | None = None

    def _shortened(self) -> WorkerDeath:
        return replace(self, message=_cut_head(self.message, MESSAGE_BYTES) + " " + SHORTENED)

    def to_exception(self) -> WorkerError:
        return WorkerError(self.message, worker=self.worker, pid=self.pid, batch=self.batch,
                           epoch=self.epoch, signal=self.signal, exit_code=self.exit_code)


@dataclass(frozen=True)
class StartupFailure(_Report):
    KIND = "startup"

    message: str

    def _shortened(self) -> StartupFailure:
        return StartupFailure(_cut_head(self.message, MESSAGE_BYTES) + " " + SHORTENED)

    def to_exception(self) -> WorkerError:
        return WorkerError(self.message)


_KINDS: dict[str, type[_Report]] = {c.KIND: c for c in (BuildFailure, WorkerDeath, StartupFailure)}


def decode(data: bytes) -> _Report:
    try:
        kind, values = pickle.loads(data)
        return _KINDS[kind](*values)
    except Exception as exc:
        raise internal(f"an unreadable report of {len(data)} bytes ({type(exc).__name__}: {exc})") from exc


def write(buf, offset: int, report: _Report) -> None:
    """Write `report` into the area at `offset` of the mapping `buf`."""
    data = report.encode()
    buf[offset + _LEN.size: offset + _LEN.size + len(data)] = data
    buf[offset: offset + _LEN.size] = _LEN.pack(len(data))


def read(buf, offset: int) -> _Report:
    (n,) = _LEN.unpack(buf[offset: offset + _LEN.size])
    if n > PAYLOAD_BYTES:
        raise internal(f"a report claims {n} bytes, more than its area's {PAYLOAD_BYTES}")
    return decode(bytes(buf[offset + _LEN.size: offset + _LEN.size + n]))


# -- how a process ended, in words (worker deaths, a supervisor that ended) ------------

def describe_exit(status: int) -> str:
    """'was killed by SIGKILL' / 'exited with code 3' from a waitpid status."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"was killed by {name}"
    return f"exited with code {os.waitstatus_to_exitcode(status)}"


def exit_hint(status: int) -> str:
    """Where a death like this usually comes from, as a sentence (or '')."""
    if not os.WIFSIGNALED(status):
        return ""
    sig = os.WTERMSIG(status)
    if sig == signal.SIGKILL:
        return (" SIGKILL comes from the kernel's OOM killer (see `dmesg`), from another "
                "process, or from shmfeed itself after `timeout_s`.")
    if sig in (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT):
        return (" That is a crash in native code called by the source; the worker's Python "
                "stack is on stderr (faulthandler).")
    return ""


STOPPED_STATES = {"T": "stopped (SIGSTOP, Ctrl-Z, or SIGTSTP)", "t": "stopped by a debugger (traced)"}


def proc_state(pid: int) -> str | None:
    """The kernel's one-letter state of `pid` (R, S, D, T, t, Z, ...), None if gone or
    unreadable (no fd left, say): callers treat None as 'nothing to report'."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2:][:1].decode() or None


def worker_death(worker: int, pid: int, status: int, epoch: int | None, batch: int | None) -> WorkerDeath:
    """What the fatal report says about a worker that died (before any advice)."""
    doing = "while waiting for work" if batch is None else f"while building batch {batch} of epoch {epoch}"
    return WorkerDeath(
        message=f"worker {worker} (pid {pid}) {describe_exit(status)} {doing}", worker=worker,
        pid=pid, batch=batch, epoch=epoch,
        signal=os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        exit_code=None if os.WIFSIGNALED(status) else os.waitstatus_to_exitcode(status))
