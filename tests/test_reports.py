"""Reports that cross a process boundary (shmfeed/_engine/report.py): whatever a worker's
exception holds, it reaches the training loop as a WorkerError with its fields, in
batch order, epoch after epoch, and no slot is left held.

The bug these tests prevent: the report used to be cut to a number of characters and
its pickle then to the area's bytes, so text in multi-byte characters arrived as
`UnpicklingError: pickle data was truncated`.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from _ring import held_slots

import shmfeed
from shmfeed._engine.control import REPORT_BYTES
from shmfeed._engine.report import (
    PAYLOAD_BYTES,
    SHORTENED,
    BuildFailure,
    StartupFailure,
    WorkerDeath,
    decode,
)

# One character of each UTF-8 width: ASCII, Latin/Greek, CJK, and outside the BMP.
CHARS = {1: "a", 2: "é", 3: "画", 4: "𝔼"}
AT = 9  # the sample that raises


class Wordy:
    """Sample AT raises an exception whose message is `text` (every epoch)."""

    def __init__(self, text: str, exc: type = ValueError):
        self.text, self.exc = text, exc

    def __len__(self):
        return 24

    def __getitem__(self, i):
        if i == AT:
            raise self.exc(self.text)
        return np.full((2,), i, np.int64)


class BrokenStr(Exception):
    def __str__(self):
        raise RuntimeError("__str__ is broken too")


class Unpicklable(Exception):
    def __reduce__(self):
        raise TypeError("not today")


class Broken:
    """Sample AT raises an exception that cannot be printed, or cannot be pickled."""

    def __init__(self, exc: type):
        self.exc = exc

    def __len__(self):
        return 24

    def __getitem__(self, i):
        if i == AT:
            raise self.exc("the message")
        return np.full((2,), i, np.int64)


def _down_a(n: int) -> None:
    if n == 0:
        raise ValueError("bottom of a deep stack: 深い")
    _down_b(n - 1)


def _down_b(n: int) -> None:  # alternating frames: Python cannot fold them as repeats
    _down_a(n - 1)


class Deep:
    def __len__(self):
        return 24

    def __getitem__(self, i):
        if i == AT:
            limit = sys.getrecursionlimit()
            sys.setrecursionlimit(10_000)
            try:
                _down_a(3000)
            finally:
                sys.setrecursionlimit(limit)
        return np.full((2,), i, np.int64)


def _epochs_with_error(loader, epochs: int = 3) -> list[shmfeed.WorkerError]:
    """Run `epochs` epochs; each must deliver batches 0-1 (samples 0-7), then raise."""
    errors = []
    for _ in range(epochs):
        got = []
        with pytest.raises(shmfeed.WorkerError) as info:
            for b in loader:
                got.append(int(b[0, 0]))
                del b
        assert got == [0, 4], f"batches before the error: {got}"
        errors.append(info.value)
        assert held_slots(loader) == 0  # the error's traceback keeps no batch either
    return errors


@pytest.mark.parametrize("width", [1, 2, 3, 4])
@pytest.mark.parametrize("size", ["at", "past"])
def test_multibyte_message_arrives_as_worker_error_every_epoch(width, size):
    n = REPORT_BYTES // width + (0 if size == "at" else 3 * REPORT_BYTES // width)
    text = CHARS[width] * n
    with shmfeed.Loader(Wordy(text), batch_size=4, num_workers=2) as loader:
        for err in _epochs_with_error(loader):
            assert (err.batch, err.item, err.worker is not None) == (2, AT, True)
            assert type(err.__cause__) is ValueError
            assert "raised ValueError: " + CHARS[width] * 10 in str(err)
            assert SHORTENED in str(err)
            assert "Worker traceback:" in str(err) and "__getitem__" in err.worker_traceback


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_report_of_any_width_always_fits_and_decodes(width):
    """The encoder alone, just below, at and far past the area, message and traceback."""
    for n in (PAYLOAD_BYTES // width - 200, PAYLOAD_BYTES // width, 5 * PAYLOAD_BYTES // width):
        text = CHARS[width] * n
        report = BuildFailure(worker=1, pid=2, batch=3, epoch=4, item=5, batch_level=False,
                              type_module="builtins", type_name="ValueError", message=text,
                              traceback=text + "\nValueError: end", exception=None)
        data = report.encode()
        assert len(data) <= PAYLOAD_BYTES
        back = decode(data)
        assert (back.worker, back.batch, back.item) == (1, 3, 5)
        assert back.message.startswith(CHARS[width] * 50)
        assert back.traceback.endswith("ValueError: end") or not back.shortened
    for cls in (WorkerDeath, StartupFailure):
        kw = {"worker": 0, "pid": 1} if cls is WorkerDeath else {}
        data = cls(message=CHARS[width] * 5 * PAYLOAD_BYTES, **kw).encode()
        assert len(data) <= PAYLOAD_BYTES and decode(data).message.endswith(SHORTENED)


def test_exception_whose_str_raises_is_reported_not_a_dead_worker():
    with shmfeed.Loader(Broken(BrokenStr), batch_size=4, num_workers=2, max_restarts=0) as loader:
        for err in _epochs_with_error(loader):
            assert "raised BrokenStr: <str() of this BrokenStr raised RuntimeError>" in str(err)
            assert err.item == AT and err.signal is None
        assert loader.stats().restarts == 0


def test_exception_that_cannot_be_pickled_keeps_its_type_and_message():
    with shmfeed.Loader(Broken(Unpicklable), batch_size=4, num_workers=2) as loader:
        for err in _epochs_with_error(loader, epochs=2):
            assert type(err.__cause__) is Unpicklable
            assert str(err.__cause__) == "the message"


def test_traceback_thousands_of_frames_deep_keeps_its_end():
    with shmfeed.Loader(Deep(), batch_size=4, num_workers=2) as loader:
        for err in _epochs_with_error(loader, epochs=2):
            assert type(err.__cause__) is ValueError
            assert err.worker_traceback.rstrip().endswith("ValueError: bottom of a deep stack: 深い")
            assert err.worker_traceback.startswith(SHORTENED)
            assert err.worker_traceback.count("_down_b") > 20


def test_multibyte_report_from_the_in_process_builder():
    with shmfeed.Loader(Wordy("画" * 20000), batch_size=4, num_workers=0) as loader:
        for err in _epochs_with_error(loader, epochs=2):
            assert err.item == AT and SHORTENED in str(err)
