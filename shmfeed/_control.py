"""The control block as Python sees it: slot states and status codes, built from the
constants the C extension exports (never retyped), and helpers that turn statuses
into shmfeed's exceptions.  The C side (csrc/shmfeed_ctl.h) is the source of truth."""

from __future__ import annotations

import enum

from . import _core
from ._errors import internal

Control = _core.Control
NO_CLAIM: int = _core.SHMF_NO_CLAIM
REPORT_BYTES: int = _core.SHMF_REPORT_BYTES
DATA_ALIGN: int = _core.SHMF_DATA_ALIGN


class SlotState(enum.IntEnum):
    FREE = _core.SHMF_FREE
    FILLING = _core.SHMF_FILLING
    READY = _core.SHMF_READY
    HELD = _core.SHMF_HELD
    ERROR = _core.SHMF_ERROR
    ASSIGNED = _core.SHMF_ASSIGNED
    ASSIGNING = _core.SHMF_ASSIGNING


class Status(enum.IntEnum):
    OK = _core.SHMF_OK
    TIMEOUT = _core.SHMF_TIMEOUT
    STALE = _core.SHMF_STALE
    SHUTDOWN = _core.SHMF_SHUTDOWN
    EPOCH_DONE = _core.SHMF_EPOCH_DONE
    BLOCKED = _core.SHMF_BLOCKED
    INTERRUPTED = _core.SHMF_INTERRUPTED
    EINVAL = _core.SHMF_EINVAL


def tag(gen: int, batch: int) -> int:
    return (gen << 32) | batch


def untag(t: int) -> tuple[int, int]:
    return t >> 32, t & 0xFFFFFFFF


def expect_ok(status: int, what: str) -> None:
    if status != Status.OK:
        raise internal(f"{what} returned {Status(status).name}")
