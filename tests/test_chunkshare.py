"""The row-group cache a Parquet pool's workers share (sources/_chunkshare.py), with real
forked processes, real POSIX locks and real SIGKILLs: a row group decoded once for all,
rows never read torn or from another row group, a decoder killed mid-decode replaced by
the next reader, and a full cache never waited on."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import numpy as np
import pytest

from shmfeed.sources._chunkshare import SharedChunks

pytestmark = pytest.mark.timeout(60)

ROWS = 100  # rows per row group
KINDS = [("fixed", np.dtype(np.float32), (3,)), ("scalar", np.dtype(np.int64), ())]
STARTS = np.arange(0, 6 * ROWS + 1, ROWS, dtype=np.int64)  # 6 row groups


def _rows(k: int) -> list[np.ndarray]:
    i = np.arange(k * ROWS, (k + 1) * ROWS)
    return [(i[:, None] * [1, 2, 3]).astype(np.float32), i.astype(np.int64)]


def _convert(k: int) -> tuple[list, int]:
    return _rows(k), 0


def _own(k: int) -> list:
    return _rows(k)


def _child(fn) -> int:
    """Fork a child that runs `fn` and exits 0, or 1 if it raised (or a check failed)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn()
            code = 0
        finally:
            os._exit(code)
    return pid


def _exit_code(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@contextlib.contextmanager
def _held(shared: SharedChunks, k: int, convert=_convert, own=_own):
    """Row group k's columns while this process holds its slot (the way Parquet reads them)."""
    s = shared.acquire(k, convert)
    if s < 0:
        yield own(k)
        return
    try:
        yield shared.columns(s, ROWS)
    finally:
        shared.release(s)


def _check(shared: SharedChunks, k: int) -> None:
    with _held(shared, k) as cols:
        for got, want in zip(cols, _rows(k)):
            np.testing.assert_array_equal(got, want)


@pytest.fixture
def shared():
    s = SharedChunks(KINDS, STARTS, cache_bytes=1 << 20)
    yield s
    s.close()


def test_processes_that_read_the_same_row_groups_decode_each_once(shared):
    def reader():
        for _ in range(3):
            for k in range(6):
                _check(shared, k)

    pids = [_child(reader) for _ in range(3)]
    assert [_exit_code(p) for p in pids] == [0, 0, 0]
    assert shared.decoded() == 6


def test_a_process_waiting_for_a_row_group_another_decodes_gets_it_whole_when_that_one_ends(shared, tmp_path):
    go = tmp_path / "go"

    def slow_convert(k):
        while not go.exists():  # decoding takes until the test says so
            time.sleep(0.005)
        return _convert(k)

    def decoder():
        with _held(shared, 2, slow_convert):
            pass

    first = _child(decoder)
    while shared.state[shared.chunk == 2].tolist() != [1]:  # LOADING
        time.sleep(0.005)
    second = _child(lambda: _check(shared, 2))
    time.sleep(0.2)
    assert shared.decoded() == 0  # the second waits, it does not decode it too
    go.write_text("")
    assert [_exit_code(first), _exit_code(second)] == [0, 0]
    assert shared.decoded() == 1


def test_a_decoder_killed_mid_decode_leaves_no_torn_rows_the_next_reader_decodes_them(shared):
    def stuck_convert(k):
        half = _rows(k)
        half[0][ROWS // 2:] = -1  # what a half-written slot would hold
        time.sleep(3600)
        return half, 0

    def decoder():
        with _held(shared, 4, stuck_convert):
            pass

    victim = _child(decoder)
    while shared.state[shared.chunk == 4].tolist() != [1]:
        time.sleep(0.005)
    waiter = _child(lambda: _check(shared, 4))  # waits on the decoder's lock
    time.sleep(0.2)
    os.kill(victim, signal.SIGKILL)
    assert _exit_code(victim) == -signal.SIGKILL
    assert _exit_code(waiter) == 0
    assert shared.decoded() == 1
    _check(shared, 4)  # and here too, from the slot the waiter filled


def test_a_failed_decode_frees_its_slot_and_the_error_reaches_the_caller(shared):
    def failing(k):
        raise ValueError(f"row group {k} is corrupt")

    with pytest.raises(ValueError, match="row group 1 is corrupt"):
        with _held(shared, 1, failing):
            pass
    assert (shared.state == 0).all()
    _check(shared, 1)
    assert shared.decoded() == 1


def test_with_every_slot_held_a_process_decodes_for_itself_rather_than_wait():
    shared = SharedChunks(KINDS, STARTS, cache_bytes=1)  # the least: two slots
    try:
        assert shared.n == 2
        release = os.pipe()

        def holder(k):
            def run():
                with _held(shared, k):
                    os.read(release[0], 1)  # until the test writes
            return run

        pids = [_child(holder(0)), _child(holder(1))]
        while shared.decoded() < 2:
            time.sleep(0.005)
        time.sleep(0.1)  # both hold their slots shared now
        own_calls = []
        t0 = time.monotonic()
        with _held(shared, 5, own=lambda k: own_calls.append(k) or _rows(k)) as cols:
            np.testing.assert_array_equal(cols[1], _rows(5)[1])
        assert own_calls == [5] and time.monotonic() - t0 < 5
        os.write(release[1], b"xx")
        assert [_exit_code(p) for p in pids] == [0, 0]
        os.close(release[0])
        os.close(release[1])
        _check(shared, 5)  # with the slots free again, 5 goes into one
        assert shared.decoded() == 3
    finally:
        shared.close()


def test_it_is_never_pickled(shared):
    import pickle

    with pytest.raises(TypeError, match="never pickled"):
        pickle.dumps(shared)
