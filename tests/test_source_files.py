"""Files, sockets and memory maps a source holds (issue 23.2, 26.3): under fork the
workers use the very descriptors the source opened; a start method that rebuilds the
source in another interpreter either carries the file (a memmap: the same open file,
never reopened by a name that may now point elsewhere) or refuses at construction,
naming the attribute."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import numpy as np
import pytest

import shmfeed

N = 64
JOIN_S = 5.0


@pytest.fixture
def fork_server():
    assert shmfeed.start_fork_server()
    yield
    shmfeed._processes.forkserver.stop()


def _echo(sock: socket.socket) -> None:
    """Answers each 8-byte number with its double, until the peer closes."""
    while (data := sock.recv(8, socket.MSG_WAITALL)) and len(data) == 8:
        sock.sendall(np.int64(2 * int(np.frombuffer(data, np.int64)[0])).tobytes())


class Held:
    """A source whose samples come through an open file, a socket and a memmap it
    opened itself (in the training process, before the Loader)."""

    def __init__(self, path, sock=None):
        self.f = open(path, "rb")
        self.sock = sock
        self.tokens = np.memmap(path, np.int64, mode="r")

    def __len__(self):
        return N

    def __getitem__(self, i):
        from_file = np.frombuffer(os.pread(self.f.fileno(), 8, 8 * i), np.int64)[0]
        self.sock.sendall(np.int64(i).tobytes())
        echoed = np.frombuffer(self.sock.recv(8, socket.MSG_WAITALL), np.int64)[0]
        return np.array([from_file, echoed, self.tokens[i]], np.int64)

    def close(self):
        self.f.close()
        self.sock.close()


def test_forked_workers_keep_the_sources_open_file_socket_and_memmap(tmp_path):
    path = tmp_path / "values.bin"
    (np.arange(N, dtype=np.int64) * 3).tofile(path)
    ours, theirs = socket.socketpair()
    echo = threading.Thread(target=_echo, args=(theirs,), daemon=True)
    echo.start()
    source = Held(path, ours)
    try:
        # One worker: the socket is one conversation, in order.
        with shmfeed.Loader(source, batch_size=8, num_workers=1, start_method="fork") as loader:
            got = np.concatenate([b for b in loader])
    finally:
        source.close()
        echo.join(JOIN_S)
        theirs.close()
    i = np.arange(N)
    assert got.tolist() == np.stack([3 * i, 2 * i, 3 * i], 1).tolist()


class Holding:
    """A source with one open resource as its attribute `name`, which it never uses."""

    def __init__(self, name, resource):
        setattr(self, name, resource)

    def __len__(self):
        return N

    def __getitem__(self, i):
        return np.int64(i)


@pytest.mark.parametrize("attr", ["f", "sock"])
@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_an_open_file_or_socket_that_cannot_travel_is_refused_at_construction(tmp_path, attr, method,
                                                                              request):
    if method == "forkserver":
        request.getfixturevalue("fork_server")
    path = tmp_path / "values.bin"
    np.arange(N, dtype=np.int64).tofile(path)
    resource = open(path, "rb") if attr == "f" else socket.socket()
    try:
        with pytest.raises(shmfeed.SourcePickleError, match=rf"its attribute `source\.{attr}` .*an open "
                           r".*Open such resources lazily in `__getitem__`"):
            shmfeed.Loader(Holding(attr, resource), batch_size=8, num_workers=1, start_method=method)
    finally:
        resource.close()


# -- one file, one identity (issue 26.3) -----------------------------------------------------
GONE_S = 5.0


class Mapped:
    """A source of its own class holding a memmap (not `shmfeed.sources.Arrays`)."""

    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return np.asarray(self.x[i])


def _write_rows(path, first):
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        np.save(f, np.arange(first, first + N * 4, dtype=np.int64).reshape(N, 4))
    os.replace(tmp, path)  # as a job that refreshes a dataset does: renamed over


def _wait_pool_ended(loader):
    pool = loader._res.pool
    os.kill(loader.pool_pid, signal.SIGKILL)
    deadline = time.monotonic() + GONE_S
    while pool.poll() is None:
        assert time.monotonic() < deadline, "the killed supervisor was never reported"
        time.sleep(0.01)


@pytest.mark.parametrize("kind", ["arrays", "own class"])
@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_workers_of_a_restarted_pool_read_the_mapped_file_not_the_one_renamed_over_it(
        tmp_path, method, kind, request, caplog):
    if method == "forkserver":
        request.getfixturevalue("fork_server")
    path = tmp_path / "rows.npy"
    _write_rows(path, 0)
    x = np.load(path, mmap_mode="r")
    source = x if kind == "arrays" else Mapped(x)
    with shmfeed.Loader(source, batch_size=8, num_workers=2, start_method=method) as loader:
        first = np.concatenate([b for b in loader])
        _write_rows(path, 10_000)  # the name now leads to other data
        old_pool = loader.pool_pid
        _wait_pool_ended(loader)
        second = np.concatenate([b for b in loader])  # on a new pool
        assert loader.pool_pid != old_pool and loader.start_method == method
    assert first.tolist() == np.asarray(x).tolist() == np.arange(N * 4).reshape(N, 4).tolist()
    assert second.tolist() == first.tolist()  # was: rows 10000.. with spawn and the fork server


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_a_memmap_whose_file_was_replaced_before_the_loader_is_refused(tmp_path, method, request):
    if method == "forkserver":
        request.getfixturevalue("fork_server")
    path = tmp_path / "rows.npy"
    _write_rows(path, 0)
    x = np.load(path, mmap_mode="r")
    _write_rows(path, 10_000)
    with pytest.raises(shmfeed.SourcePickleError, match=r"the source maps the file '.*rows\.npy' \(inode \d+\), "
                       r"but that name now leads to another file .*Keep a file in place"):
        shmfeed.Loader(Mapped(x), batch_size=8, num_workers=2, start_method=method)
