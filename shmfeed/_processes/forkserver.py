"""The fork server: a copy of the training process taken while it is still clean
(before JAX's backend, CUDA or CuPy start), kept idle, which forks worker pools'
supervisors on request once forking the training process itself is no longer safe.

Why: after JAX starts, a pool otherwise starts from a fresh interpreter that has to
import again everything the source's classes need (keras and jax: seconds).  A
supervisor forked from the fork server has those imports already, and starts in
milliseconds.  The source still travels by cloudpickle (it may have been defined or
changed since the copy was taken), exactly as for a fresh interpreter, and the
user's `__main__` is never run again (the copy stops where `import shmfeed.jax` or
`import shmfeed.keras` was, and never runs a line of the script).

Owns: starting the server (`start`), asking it for a supervisor (`request`), and the
server's loop.  Started by `import shmfeed.jax`, `import shmfeed.keras` and
`shmfeed.start_fork_server()`, only from the main thread of a clean process that is
not itself one of shmfeed's pool processes; `SHMFEED_FORK_SERVER=0` turns the
automatic start off, and it is skipped (with a warning) in a process that already
holds more than `AUTO_MAX_PRIVATE_BYTES` of private memory, which the copy would pin.

The exchange, over a SOCK_SEQPACKET socket pair that only this process and the server
hold, one request at a time (a lock): the training process sends a `SpawnRequest`
(_processes/messages.py) with the descriptors of a memfd holding the `SupervisorStart` of
_processes/pool.py, the ring, the supervisor's end of its channel, the write end of a status
pipe, then the source's parcel (interpreter.Parcel: its memfd, then the files it
maps), the server forks the supervisor and answers a `SpawnReply` (its pid).  When
that supervisor exits, the server reaps it and writes its `ExitStatus` into the
status pipe, which the pool's handle reads; EOF without a status means the server
died first.

Invariants:
- The server is single-threaded, ignores SIGINT, and dies with the training process
  (PR_SET_PDEATHSIG, or at EOF on its socket).  Supervisors it forks die with it
  (PR_SET_PDEATHSIG), and with the training process (they watch its pidfd).
- Every wait of the training process on the server is bounded (`REPLY_TIMEOUT_S`)
  and checks that the server lives; a server that died or does not answer is dropped
  and the pool starts from a fresh interpreter instead.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import select
import socket
import sys
import threading
import time

import psutil

from .. import _sysinfo
from .interrupts import in_pool_process, sigint_deferred
from .messages import MAX_FDS, ExitStatus, MessageError, SpawnReply, SpawnRequest
from .supervisor import child_setup, fork_child, kill_and_reap, reaped, start_from_payload

log = logging.getLogger("shmfeed")

REPLY_TIMEOUT_S = 10.0  # the server forks a supervisor within this long, or is dropped
SERVER_POLL_S = 1.0  # how often the idle server checks that its parent lives
ENV_SWITCH = "SHMFEED_FORK_SERVER"  # "0": no automatic start
# The server keeps the memory the process had when it started (copy-on-write: pages
# the process later changes or frees stay the server's).  Imports are tens of MB; a
# process already holding more private memory than this (data loaded before `import
# shmfeed.jax`) gets no automatic server.  SHMFEED_FORK_SERVER_MAX_MB changes it.
AUTO_MAX_PRIVATE_BYTES = 1 << 30
ENV_MAX_MB = "SHMFEED_FORK_SERVER_MAX_MB"


class _Handle:
    """The training process's side of a running server."""

    def __init__(self, pid: int, sock: socket.socket):
        self.pid = pid
        self.sock = sock
        self.lock = threading.Lock()


_server: _Handle | None = None
def _after_fork_in_child() -> None:
    """A process forked from this one (by the user, or by shmfeed) does not share our
    server: the server serves only the process that started it."""
    global _server
    if _server is not None:
        _server.sock.close()
        _server = None


os.register_at_fork(after_in_child=_after_fork_in_child)


def running() -> bool:
    """Whether this process has a live fork server."""
    return _server is not None and _alive(_server.pid)


def _alive(pid: int) -> bool:
    """Whether our child `pid` runs (reaping it if it has exited)."""
    return not reaped(pid)


def cannot_start() -> str | None:
    """Why a fork server cannot be started here now, or None."""
    if threading.current_thread() is not threading.main_thread():
        return "only the main thread starts it (its parent-death signal follows the thread)"
    why = _sysinfo.accelerator_in_use()
    if why:
        return f"{why} already runs in this process, and a copy of it would hold its locks"
    return None


def _too_big() -> str | None:
    """Why an automatic server would cost too much memory, or None."""
    limit = AUTO_MAX_PRIVATE_BYTES
    if os.environ.get(ENV_MAX_MB):
        limit = int(float(os.environ[ENV_MAX_MB]) * 2**20)
    info = psutil.Process().memory_info()
    private = info.rss - info.shared
    if private <= limit:
        return None
    return (f"this process holds {private / 2**20:.0f} MiB of private memory (> {limit / 2**20:.0f} MiB), "
            "which a copy would keep for as long as it lives; import shmfeed.jax / shmfeed.keras "
            f"before loading data, call shmfeed.start_fork_server() to start one anyway, or raise "
            f"{ENV_MAX_MB}")


def start(automatic: bool = False) -> bool:
    """Start the fork server unless one runs; True if one runs afterwards.  With
    `automatic` (at `import shmfeed.jax`/`shmfeed.keras`), quietly does nothing where
    it cannot start or `SHMFEED_FORK_SERVER=0`."""
    global _server
    if running():
        return True
    _drop()
    if in_pool_process():  # quietly: a module imported afresh in a pool process calls us too
        return False
    if automatic and os.environ.get(ENV_SWITCH, "1") == "0":
        return False
    why = cannot_start()
    if why:
        if not automatic:  # automatic: the pool's own message will say how it starts
            log.warning("shmfeed: no fork server started: %s", why)
        return False
    too_big = _too_big() if automatic else None
    if too_big:
        log.warning("shmfeed: no fork server started: %s", too_big)
        return False
    me = os.getpid()
    unfinished = _unfinished_imports()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    def serve() -> None:
        ours.close()  # the training process's end
        _serve(theirs, me, unfinished)

    try:
        with sigint_deferred():
            pid = fork_child(serve)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    _server = _Handle(pid, ours)
    # Most often after the loaders' finalizers (registered later, run first): a pool
    # still open then dies with the server (its processes' parent-death signals).
    atexit.register(stop)
    return True


def stop() -> None:
    """Stop the fork server, and wait for it to exit.  Pools it started die with it:
    stop it when no loader it served is open (it stops by itself at exit)."""
    server = _server
    _drop()
    if server is None:
        return
    deadline = time.monotonic() + REPLY_TIMEOUT_S
    while _alive(server.pid) and time.monotonic() < deadline:
        time.sleep(0.002)
    if _alive(server.pid):
        kill_and_reap([server.pid], functools.partial(reaped, server.pid), REPLY_TIMEOUT_S, 0.002)


def _drop() -> None:
    """Forget the server: closing our end makes it leave (at once, if idle)."""
    global _server
    if _server is not None:
        _server.sock.close()
        _server = None


def request(payload_fd: int, ring_fd: int, chan_fd: int, status_fd: int,
            source_fds: list[int]) -> int | None:
    """Have the server fork a supervisor from the spawn payload in `payload_fd` and
    the source's parcel in `source_fds`; its pid, or None when no server is running
    (or it no longer answers)."""
    server = _server
    if server is None:
        return None
    with server.lock:
        try:
            msg, fds = SpawnRequest(payload_fd, ring_fd, chan_fd, status_fd, tuple(source_fds)).encode()
            socket.send_fds(server.sock, [msg], fds)
            deadline = time.monotonic() + REPLY_TIMEOUT_S
            while not select.select([server.sock], [], [], 0.05)[0]:
                if not _alive(server.pid) or time.monotonic() > deadline:
                    raise OSError("the fork server did not answer")
            answer = server.sock.recv(64)
        except OSError as exc:
            log.warning("shmfeed: the fork server (pid %d) is gone (%s); starting workers "
                        "from a fresh interpreter instead", server.pid, exc)
            _drop()
            return None
    try:
        return SpawnReply.decode(answer).pid
    except MessageError as exc:
        log.warning("shmfeed: the fork server (pid %d) answered wrongly (%s); starting workers "
                    "from a fresh interpreter instead", server.pid, exc)
        _drop()
        return None


# -- the server ------------------------------------------------------------------------

def _unfinished_imports() -> list[str]:
    """Modules whose import is still running (the one that called us, the packages
    above it): a copy taken now would keep them half-defined."""
    return [name for name, m in list(sys.modules.items())
            if name != "__main__" and getattr(getattr(m, "__spec__", None), "_initializing", False)]


def _serve(sock: socket.socket, parent_pid: int, unfinished: list[str]) -> None:
    """The server's loop: fork a supervisor per request, report each one's exit."""
    child_setup(parent_pid, {sock.fileno()})
    # Half-imported modules (and their submodules) are imported afresh, in full, by the
    # supervisors that need them (when the source is unpickled), never run further here.
    prefixes = tuple(n + "." for n in unfinished)
    for name in [n for n in sys.modules if n in unfinished or n.startswith(prefixes)]:
        del sys.modules[name]
    me = os.getpid()
    children: dict[int, tuple[int, int]] = {}  # pid -> (its pidfd, status pipe)
    while os.getppid() == parent_pid:
        ready = select.select([sock] + [pfd for pfd, _ in children.values()], [], [], SERVER_POLL_S)[0]
        for pid, (pfd, status_fd) in list(children.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                try:
                    os.write(status_fd, ExitStatus(status).encode())
                except OSError:  # the pool's handle is gone: nobody to tell
                    pass
                os.close(pfd)
                os.close(status_fd)
                del children[pid]
        # Only when a request is there: Python 3.11's `socket.recv_fds` drops its
        # `flags` (MSG_DONTWAIT), and a receive that blocks leaves every supervisor
        # that exits meanwhile unreaped, its pool's `close()` waiting for its status.
        if sock not in ready:
            continue
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 64, MAX_FDS)
        except BlockingIOError:
            continue
        if not msg:  # the training process closed its end (it stopped us, or exited)
            return
        try:
            req = SpawnRequest.decode(msg, fds)
        except MessageError:  # only our training process writes here: ignored
            for fd in fds:
                os.close(fd)
            continue
        pid = fork_child(functools.partial(start_from_payload, req.payload_fd, req.ring_fd, req.chan_fd,
                                           parent_pid, me, source_fds=list(req.source_fds)))
        for fd in (req.payload_fd, req.ring_fd, req.chan_fd, *req.source_fds):
            os.close(fd)
        children[pid] = (os.pidfd_open(pid), req.status_fd)
        try:
            sock.send(SpawnReply(pid).encode())
        except OSError:  # the training process gave up waiting and dropped us
            return
