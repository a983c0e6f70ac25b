"""Messages between shmfeed's processes, other than the failure reports written into
the ring (_report.py): each a frozen dataclass that `encode()`s to what its transport
carries and `decode()`s from it, refusing anything else with a `MessageError` that
names the message and what was expected.

| message           | from -> to                           | carried by                               |
|-------------------|--------------------------------------|------------------------------------------|
| `Update`          | training process -> supervisor       | the pool's channel, with the parcel's fds |
| `Updated`         | supervisor -> training process       | the pool's channel                        |
| `UpdateFailed`    | supervisor -> training process       | the pool's channel                        |
| `SpawnRequest`    | training process -> fork server      | the server's socket, with 5+ fds          |
| `SpawnReply`      | fork server -> training process      | the server's socket                       |
| `ExitStatus`      | fork server -> training process      | a supervisor's status pipe                |
| `SupervisorStart` | training process -> supervisor       | a memfd (fork server and fresh interpreter) |
| `SpawnArgs`       | training process -> fresh interpreter | its command line                          |
| `Built`           | Ray actor -> delivery thread          | Ray's object store (shmfeed/ray.py)       |

The exchanges themselves are written down where they are done: the update exchange
and the shutdown protocol in pool.py, the fork server's in forkserver.py.  Messages
over a socket are one SOCK_SEQPACKET record each (the kernel keeps the boundaries), so
none carries its own length; descriptors travel beside the bytes (SCM_RIGHTS), and a
message that carries some `encode()`s to `(bytes, fds)`.

Invariants: `decode(encode(m)) == m` for every message m (tests/test_messages.py), and
`decode` of anything that is not such an encoding raises `MessageError`, never another
exception and never a message.  Nothing here unpickles: a config that must cross as
pickle bytes (`SupervisorStart.cfg`) stays opaque bytes here.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .._errors import ShmfeedError

SHOWN_BYTES = 60  # of a refused message, shown in the error
MAX_FDS = 253  # the most descriptors one message carries (the kernel's SCM_MAX_FD)
_WORD = np.dtype("<u8")  # a Built's word


class MessageError(ShmfeedError):
    """A message between shmfeed's processes that is not what its exchange expects:
    a bug in shmfeed, or another program writing to its descriptors."""


def _refuse(kind: str, expected: str, got: object) -> MessageError:
    if isinstance(got, (bytes, bytearray, memoryview)):
        got = bytes(got[:SHOWN_BYTES])
    return MessageError(f"[INTERNAL ERROR] a `{kind}` message must be {expected}; got {got!r}")


def _decimal(kind: str, expected: str, data: bytes, low: int, high: int) -> int:
    """The decimal number `data` is, within [low, high]."""
    if not data or not data.isdigit() or len(data) > 20:
        raise _refuse(kind, expected, data)
    value = int(data)
    if not low <= value <= high:
        raise _refuse(kind, expected, data)
    return value


# -- the update exchange (pool.py) ------------------------------------------------------

@dataclass(frozen=True)
class Update:
    """The source's new state: its parcel (_interpreter.Parcel), as descriptors."""

    source_fds: tuple[int, ...]
    TAG: ClassVar[bytes] = b"update"

    def encode(self) -> tuple[bytes, list[int]]:
        return self.TAG, list(self.source_fds)

    @classmethod
    def decode(cls, data: bytes, fds: list[int]) -> Update:
        if data != cls.TAG or not fds:
            raise _refuse("Update", f"{cls.TAG!r} with the source parcel's descriptors "
                          f"(got {len(fds)} descriptors)", data)
        return cls(tuple(fds))


@dataclass(frozen=True)
class Updated:
    """The new workers run; none of the old source is left."""

    TAG: ClassVar[bytes] = b"updated"

    def encode(self) -> bytes:
        return self.TAG

    @classmethod
    def decode(cls, data: bytes) -> Updated:
        if data != cls.TAG:
            raise _refuse("Updated", repr(cls.TAG), data)
        return cls()


@dataclass(frozen=True)
class UpdateFailed:
    """The supervisor could not rebuild the new state; the old workers still run."""

    reason: str
    TAG: ClassVar[bytes] = b"update-failed:"
    REASON_BYTES: ClassVar[int] = 3000  # of the reason's UTF-8, at most: one record

    def encode(self) -> bytes:
        return self.TAG + self.reason.encode(errors="replace")[:self.REASON_BYTES]

    @classmethod
    def decode(cls, data: bytes) -> UpdateFailed:
        if not data.startswith(cls.TAG):
            raise _refuse("UpdateFailed", f"{cls.TAG!r} followed by the reason", data)
        # A reason cut at REASON_BYTES may end inside a character.
        return cls(data[len(cls.TAG):].decode(errors="replace"))


def decode_update_reply(data: bytes) -> Updated | UpdateFailed:
    """The supervisor's answer to an `Update`."""
    if data.startswith(UpdateFailed.TAG):
        return UpdateFailed.decode(data)
    if data == Updated.TAG:
        return Updated()
    raise _refuse("Updated or UpdateFailed", f"{Updated.TAG!r} or {UpdateFailed.TAG!r} followed "
                  "by the reason", data)


# -- the fork server's exchange (forkserver.py) -----------------------------------------

@dataclass(frozen=True)
class SpawnRequest:
    """Fork a supervisor: from the `SupervisorStart` in memfd `payload_fd`, on the ring
    `ring_fd`, talking on `chan_fd`, its exit status to be written to `status_fd`
    (`ExitStatus`), its source the parcel `source_fds`."""

    payload_fd: int
    ring_fd: int
    chan_fd: int
    status_fd: int
    source_fds: tuple[int, ...]
    TAG: ClassVar[bytes] = b"spawn"

    def encode(self) -> tuple[bytes, list[int]]:
        return self.TAG, [self.payload_fd, self.ring_fd, self.chan_fd, self.status_fd, *self.source_fds]

    @classmethod
    def decode(cls, data: bytes, fds: list[int]) -> SpawnRequest:
        if data != cls.TAG or len(fds) < 5:
            raise _refuse("SpawnRequest", f"{cls.TAG!r} with at least 5 descriptors (payload, ring, "
                          f"channel, status pipe, source parcel; got {len(fds)})", data)
        payload_fd, ring_fd, chan_fd, status_fd, *source_fds = fds
        return cls(payload_fd, ring_fd, chan_fd, status_fd, tuple(source_fds))


@dataclass(frozen=True)
class SpawnReply:
    """The supervisor the server forked."""

    pid: int
    TAG: ClassVar[bytes] = b"pid "

    def encode(self) -> bytes:
        return self.TAG + str(self.pid).encode()

    @classmethod
    def decode(cls, data: bytes) -> SpawnReply:
        expected = f"{cls.TAG!r} followed by a pid in decimal"
        if not data.startswith(cls.TAG):
            raise _refuse("SpawnReply", expected, data)
        return cls(_decimal("SpawnReply", expected, data[len(cls.TAG):], 1, 2**31 - 1))


@dataclass(frozen=True)
class ExitStatus:
    """How a supervisor forked by the server ended: its wait status (os.waitpid's).
    The pipe's EOF without one means the server died first (the reader's business)."""

    status: int

    def encode(self) -> bytes:
        return str(self.status).encode()

    @classmethod
    def decode(cls, data: bytes) -> ExitStatus:
        return cls(_decimal("ExitStatus", "a wait status in decimal (0..65535)", data, 0, 0xFFFF))


# -- starting a supervisor that does not share our memory (pool.py, supervisor.py) ----

@dataclass(frozen=True)
class SupervisorStart:
    """What a supervisor forked by the server or started as a fresh interpreter starts
    from, besides the source's parcel: the training process's `sys.path` (to import its
    modules from), its working directory and environment as they are when the pool
    starts (the fork server was forked long before: a variable set or a `chdir` since
    must reach the workers as it would through a fork), the ring's geometry (mapped
    before anything of the user's is unpickled, so that a failure to do so can still be
    reported in it), and the loader's `Config`, pickled (it names the user's classes)."""

    sys_path: tuple[str, ...]
    n_slots: int
    max_workers: int
    slot_bytes: int
    cfg: bytes
    cwd: str = "/"
    environ: tuple[tuple[str, str], ...] = ()
    MAGIC: ClassVar[bytes] = b"shmfeed-start-2\n"
    _HEAD: ClassVar[struct.Struct] = struct.Struct("<QQQQ")  # geometry, then the process part's bytes

    def encode(self) -> bytes:
        # json escapes the lone surrogates of undecodable bytes (os.fsdecode) and gives them back.
        process = json.dumps({"sys_path": list(self.sys_path), "cwd": self.cwd,
                              "environ": dict(self.environ)}).encode()
        return (self.MAGIC + self._HEAD.pack(self.n_slots, self.max_workers, self.slot_bytes, len(process))
                + process + self.cfg)

    @classmethod
    def decode(cls, data: bytes) -> SupervisorStart:
        expected = (f"{cls.MAGIC!r}, then {cls._HEAD.size} bytes of geometry and length, the "
                    "process's sys.path (a list of strings), working directory (a string) and "
                    "environment (strings to strings) as a JSON object, then the pickled config")
        head_end = len(cls.MAGIC) + cls._HEAD.size
        if not data.startswith(cls.MAGIC) or len(data) < head_end:
            raise _refuse("SupervisorStart", expected, data)
        n_slots, max_workers, slot_bytes, process_bytes = cls._HEAD.unpack_from(data, len(cls.MAGIC))
        if len(data) < head_end + process_bytes:
            raise _refuse("SupervisorStart", f"{expected} ({process_bytes} bytes of the process's "
                          f"part announced, {len(data) - head_end} there)", data)
        try:
            process = json.loads(data[head_end:head_end + process_bytes])
        except ValueError:
            process = None
        if not (isinstance(process, dict) and set(process) == {"sys_path", "cwd", "environ"}
                and isinstance(process["sys_path"], list) and _all_str(process["sys_path"])
                and isinstance(process["cwd"], str)
                and isinstance(process["environ"], dict) and _all_str(process["environ"].values())):
            raise _refuse("SupervisorStart", expected, data)
        return cls(tuple(process["sys_path"]), n_slots, max_workers, slot_bytes,
                   data[head_end + process_bytes:], process["cwd"], tuple(process["environ"].items()))


def _all_str(values: Iterable[object]) -> bool:
    return all(isinstance(v, str) for v in values)


@dataclass(frozen=True)
class SpawnArgs:
    """A fresh interpreter's command line after `-c <code>`: where its payload (a memfd
    holding a `SupervisorStart`), ring and channel are, the training process, whether to
    set a parent-death signal, and the source parcel's descriptors."""

    payload_fd: int
    ring_fd: int
    chan_fd: int
    parent_pid: int
    pdeathsig: bool
    source_fds: tuple[int, ...]

    def encode(self) -> list[str]:
        return [str(self.payload_fd), str(self.ring_fd), str(self.chan_fd), str(self.parent_pid),
                str(int(self.pdeathsig)), ",".join(str(fd) for fd in self.source_fds)]

    @classmethod
    def decode(cls, argv: list[str]) -> SpawnArgs:
        expected = ("6 arguments: payload fd, ring fd, channel fd, parent pid, pdeathsig (0/1), "
                    "the source parcel's fds comma-separated")
        numbers = [a.encode() for a in argv[:5]]
        fds = argv[5].split(",") if len(argv) == 6 else []
        if (len(argv) != 6 or not all(n.isascii() and n.isdigit() for n in numbers)
                or not all(f.isascii() and f.isdigit() for f in fds) or numbers[4] not in (b"0", b"1")):
            raise _refuse("SpawnArgs", expected, argv)
        payload_fd, ring_fd, chan_fd, parent_pid, pdeathsig = (int(n) for n in numbers)
        return cls(payload_fd, ring_fd, chan_fd, parent_pid, bool(pdeathsig), tuple(int(f) for f in fds))


# -- Ray builders (shmfeed/ray.py) -------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Built:
    """A batch an actor built: `word` (what its slot publishes: rows, and the bucket, see
    _bucket.pack) and `data`, the slot's bytes (uint8).

    Encoded as one uint8 array, the word (8 bytes, little endian) then the bytes, which
    Ray ships out of band; an actor builds into `Built.frame(...)[HEADER_BYTES:]`, so
    that encoding writes the word and copies nothing, and decoding is a view."""

    word: int
    data: np.ndarray
    HEADER_BYTES: ClassVar[int] = 8

    @classmethod
    def frame(cls, nbytes: int, align_bytes: int) -> np.ndarray:
        """A uint8 array of HEADER_BYTES + `nbytes`, whose last `nbytes` (what a batch is
        built into) start `align_bytes`-aligned."""
        backing = np.empty(cls.HEADER_BYTES + nbytes + align_bytes, np.uint8)
        start = -(backing.ctypes.data + cls.HEADER_BYTES) % align_bytes
        return backing[start:start + cls.HEADER_BYTES + nbytes]

    def encode(self, frame: np.ndarray | None = None) -> np.ndarray:
        """The message; in `frame` (from `frame()`) when given, whose tail `data` then
        is (copied in otherwise)."""
        if frame is None:
            frame = np.empty(self.HEADER_BYTES + self.data.nbytes, np.uint8)
        body = frame[self.HEADER_BYTES:]
        if body.nbytes != self.data.nbytes:
            raise ValueError(f"a frame of {body.nbytes} bytes for a batch of {self.data.nbytes}")
        frame[:self.HEADER_BYTES].view(_WORD)[0] = self.word
        if body.ctypes.data != self.data.ctypes.data:
            body[:] = self.data.view(np.uint8).reshape(-1)
        return frame

    @classmethod
    def decode(cls, msg: object, nbytes: int | None = None) -> Built:
        """`nbytes`: the slot's bytes the batch must have, when known."""
        expected = (f"a 1-d uint8 array of {cls.HEADER_BYTES} bytes of word then "
                    f"{'the batch' if nbytes is None else f'{nbytes} bytes'}")
        if (not isinstance(msg, np.ndarray) or msg.dtype != np.uint8 or msg.ndim != 1
                or msg.size < cls.HEADER_BYTES
                or (nbytes is not None and msg.size != cls.HEADER_BYTES + nbytes)):
            got = (f"<{msg.dtype} array of shape {msg.shape}>" if isinstance(msg, np.ndarray)
                   else f"<{type(msg).__name__}>")
            raise MessageError(f"[INTERNAL ERROR] a `Built` message must be {expected}; got {got}")
        return cls(int(msg[:cls.HEADER_BYTES].view(_WORD)[0]), msg[cls.HEADER_BYTES:])

