"""The messages between shmfeed's processes (shmfeed/_processes/messages.py): each one decodes to
what was encoded, and anything else (cut short, garbage, another message) is refused
with a MessageError that names the message, never read as something it is not."""

from __future__ import annotations

import os

import numpy as np
import pytest

from shmfeed._errors import ShmfeedError
from shmfeed._processes import messages as _messages
from shmfeed._processes.messages import (
    Built,
    ExitStatus,
    MessageError,
    SpawnArgs,
    SpawnReply,
    SpawnRequest,
    SupervisorStart,
    Update,
    Updated,
    UpdateFailed,
    decode_update_reply,
)

FDS = [7, 8, 9, 10, 11, 12]


def test_update_round_trips_with_its_descriptors():
    msg, fds = Update((7, 8, 9)).encode()
    assert Update.decode(msg, fds) == Update((7, 8, 9))


def test_an_update_without_the_parcel_or_with_another_tag_is_refused():
    with pytest.raises(MessageError, match=r"`Update` message must be b'update' .*got 0 descriptors"):
        Update.decode(b"update", [])
    with pytest.raises(MessageError, match="`Update` message"):
        Update.decode(b"updat", [7])


def test_update_replies_round_trip_and_a_reason_keeps_any_text():
    assert decode_update_reply(Updated().encode()) == Updated()
    assert Updated.decode(Updated().encode()) == Updated()
    failed = UpdateFailed("ModuleNotFoundError: No module named 'é' \u2603")
    assert decode_update_reply(failed.encode()) == failed
    assert UpdateFailed.decode(failed.encode()) == failed


def test_an_update_failed_reason_is_cut_to_one_record():
    long = UpdateFailed("x" * 10_000)
    data = long.encode()
    assert len(data) == len(UpdateFailed.TAG) + UpdateFailed.REASON_BYTES
    assert decode_update_reply(data).reason == "x" * UpdateFailed.REASON_BYTES
    # Cut inside a character: decoded with a replacement, never refused.
    wide = UpdateFailed("a" + "\u2603" * 2000).encode()  # 1 + 3k bytes: cut after 2 of 3
    assert decode_update_reply(wide).reason.endswith("\ufffd")


def test_an_update_reply_that_is_neither_is_refused_naming_both():
    for garbage in (b"", b"update", b"updated!", b"\x00" * 100):
        with pytest.raises(MessageError, match="`Updated or UpdateFailed` message must be b'updated' or"):
            decode_update_reply(garbage)


def test_spawn_request_round_trips_with_its_descriptors_in_order():
    req = SpawnRequest(3, 4, 5, 6, (7, 8))
    msg, fds = req.encode()
    assert fds == [3, 4, 5, 6, 7, 8]
    assert SpawnRequest.decode(msg, fds) == req


def test_a_spawn_request_with_too_few_descriptors_is_refused():
    with pytest.raises(MessageError, match=r"`SpawnRequest` .*at least 5 descriptors .*got 4"):
        SpawnRequest.decode(b"spawn", FDS[:4])
    with pytest.raises(MessageError, match="`SpawnRequest`"):
        SpawnRequest.decode(b"spawned", FDS)


def test_spawn_reply_round_trips():
    assert SpawnReply.decode(SpawnReply(4121).encode()) == SpawnReply(4121)


@pytest.mark.parametrize("garbage", [b"", b"pid ", b"pid", b"pid -3", b"pid 0", b"pid 12x", b"PID 12",
                                     b"pid 99999999999999999999999", b"pid \xff"])
def test_a_spawn_reply_without_a_pid_is_refused(garbage):
    with pytest.raises(MessageError, match=r"`SpawnReply` message must be b'pid ' followed by a pid"):
        SpawnReply.decode(garbage)


@pytest.mark.parametrize("status", [0, 1 << 8, 3 << 8, 9, 0x7F | (19 << 8), 0xFFFF])
def test_exit_status_round_trips_every_kind_of_wait_status(status):
    assert ExitStatus.decode(ExitStatus(status).encode()) == ExitStatus(status)


def test_a_real_wait_status_round_trips():
    pid = os.fork()
    if pid == 0:
        os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(ExitStatus.decode(ExitStatus(status).encode()).status) == 3


@pytest.mark.parametrize("garbage", [b"", b"-1", b"65536", b"1 2", b"abc", b"\x00"])
def test_an_exit_status_that_is_not_one_is_refused(garbage):
    with pytest.raises(MessageError, match=r"`ExitStatus` message must be a wait status in decimal"):
        ExitStatus.decode(garbage)


def _start() -> SupervisorStart:
    return SupervisorStart(("/opt/pkgs", "/home/u/proj", "/tmp/\udcff-undecodable"), 8, 5,
                           1 << 20, b"\x80\x05cloudpickled config\x00", "/home/u/\udcfe-run",
                           (("AWS_ACCESS_KEY_ID", "k\u00e9y"), ("RAW", "\udc80\n=x"), ("EMPTY", "")))


def test_supervisor_start_round_trips_any_path_and_config_bytes():
    start = _start()
    assert SupervisorStart.decode(start.encode()) == start
    empty = SupervisorStart((), 2, 1, 64, b"")
    assert SupervisorStart.decode(empty.encode()) == empty


def test_a_supervisor_start_cut_short_anywhere_is_refused():
    data = _start().encode()
    config_at = len(data) - len(_start().cfg)
    for cut in range(0, config_at, 7):  # a cut in the config itself leaves other bytes: see below
        with pytest.raises(MessageError, match="`SupervisorStart` message must be"):
            SupervisorStart.decode(data[:cut])


def test_a_supervisor_start_of_garbage_or_of_the_old_pickle_is_refused():
    import pickle

    for garbage in (b"", b"\x00" * 200, pickle.dumps((["/x"], (8, 5, 64), b"cfg")),
                    SupervisorStart.MAGIC + b"\xff" * 40):
        with pytest.raises(MessageError, match="`SupervisorStart` message must be"):
            SupervisorStart.decode(garbage)
    # The process's part is there but is not JSON, or not the object of strings it must be.
    for old, new in ((b'["/opt/pkgs"', b'[1234567890 '), (b'["/opt/pkgs"', b'[1234567890,'),
                     (b'"cwd": "', b'"cwd": 7, "x": "'), (b'"EMPTY": ""', b'"EMPTY": []'),
                     (b'"environ": {', b'"environ": [{')):
        bad = _start().encode().replace(old, new)
        assert bad != _start().encode()
        with pytest.raises(MessageError, match=r"environment \(strings to strings\) as a JSON object"):
            SupervisorStart.decode(bad)


def test_spawn_args_round_trip_as_a_command_line():
    args = SpawnArgs(3, 4, 5, 4121, True, (6, 7, 8))
    argv = args.encode()
    assert all(isinstance(a, str) for a in argv)
    assert SpawnArgs.decode(argv) == args
    assert SpawnArgs.decode(SpawnArgs(3, 4, 5, 1, False, (6,)).encode()).pdeathsig is False


@pytest.mark.parametrize("argv", [[], ["3", "4", "5", "4121", "1"], ["3", "4", "5", "4121", "2", "6"],
                                  ["3", "4", "x", "4121", "1", "6"], ["3", "4", "5", "4121", "1", ""],
                                  ["3", "4", "5", "4121", "1", "6,,7"], ["3", "4", "5", "-1", "1", "6"],
                                  ["3", "4", "5", "4121", "1", "6", "extra"]])
def test_a_command_line_that_is_not_spawn_args_is_refused(argv):
    with pytest.raises(MessageError, match="`SpawnArgs` message must be 6 arguments"):
        SpawnArgs.decode(argv)


def test_built_round_trips_in_place_in_its_frame():
    frame = Built.frame(100, 4096)
    body = frame[Built.HEADER_BYTES:]
    assert body.ctypes.data % 4096 == 0 and body.nbytes == 100
    body[:] = np.arange(100, dtype=np.uint8)
    word = (7 << 40) | 12345
    msg = Built(word, body).encode(frame)
    assert msg is frame  # nothing copied: the word was written before the bytes
    got = Built.decode(msg, 100)
    assert got.word == word
    np.testing.assert_array_equal(got.data, np.arange(100, dtype=np.uint8))
    assert got.data.ctypes.data == body.ctypes.data  # decoded as a view


def test_built_round_trips_without_a_frame_by_copying():
    data = np.arange(50, dtype=np.uint8)
    got = Built.decode(Built(2**64 - 1, data).encode())
    assert got.word == 2**64 - 1
    np.testing.assert_array_equal(got.data, data)


@pytest.mark.parametrize("garbage", [np.zeros(7, np.uint8), np.zeros(109, np.uint8), np.zeros(108, np.int8),
                                     np.zeros((2, 54), np.uint8), b"\x00" * 108, None])
def test_a_built_reply_of_another_size_or_type_is_refused(garbage):
    with pytest.raises(MessageError, match=r"`Built` message must be a 1-d uint8 array of 8 bytes of word "
                                           r"then 100 bytes; got <"):
        Built.decode(garbage, 100)


def test_refusals_are_shmfeed_errors_that_show_what_came_cut_short():
    with pytest.raises(ShmfeedError) as info:
        SpawnReply.decode(b"pid " + b"9" * 500)
    text = str(info.value)
    assert text.startswith("[INTERNAL ERROR]")
    assert len(text) < 300  # the bytes shown are cut at SHOWN_BYTES
    assert _messages.SHOWN_BYTES < 500
