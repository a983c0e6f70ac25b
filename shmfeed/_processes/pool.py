"""The training process's handle on a worker pool, and the shutdown protocol.

Owns: starting the supervisor (forked from this process, from the fork server of
_processes/forkserver.py, or a fresh interpreter: see _processes/supervisor.py),
asking it how it is, sending it a source whose state changed (`update_source`: the
supervisor re-forks only the workers, so an epoch hook costs no interpreter start and
no import), and stopping it; holding Ctrl-C back while a pool process is created,
updated or stopped.

How the supervisor starts and how its end is seen depend on the start method, behind
one interface (`_SupervisorProcess`): forked here (`_Forked`: waitpid), forked by the
fork server (`_FromServer`: the server writes its `ExitStatus` into a pipe), or a
fresh interpreter (`_Spawned`: a Popen).  The last two start from a `SupervisorStart`
and a parcel.  Every message named here is a typed record of messages.py.

The update exchange, over a SOCK_SEQPACKET socket pair that only this handle and the
supervisor hold: the training process sends `Update` with the source's parcel (a memfd
and the files it maps, see _interpreter.Parcel: never blocks, whatever its size), then
waits for `Updated` (new workers are running; no worker of the old source is left) or
`UpdateFailed` with the reason, checking that the supervisor lives.  It only ever does
so between epochs, when no generation is open: the old workers' half-built batches
are of abandoned or finished epochs.

Shutdown protocol (the only one; everything that ends a pool goes through it):
1. The training process sets the control block's shutdown word (`Control.shutdown`),
   which wakes every futex waiter, and closes its end of the channel, which wakes the
   supervisor in its `select` at once.  A supervisor that has not forked a worker yet
   (a fresh interpreter still importing) has nothing to take down: it is SIGKILLed.
2. Workers see it at their next wait and exit; the supervisor gives them
   `WORKER_GRACE_S`, SIGKILLs the rest (one busy in a sample, or stuck in C code),
   reaps them all, reclaims their slots, exits.
3. The training process reaps the supervisor within `STOP_TIMEOUT_S`, else SIGKILLs
   it; the workers then die by PR_SET_PDEATHSIG, and we wait for their pids to go.
So `close()` takes a few milliseconds with idle workers and at most ~`WORKER_GRACE_S`
more with busy ones (a worker stuck in C code is SIGKILLed like any other); only a
process the kernel cannot kill at once (uninterruptible I/O) makes it wait longer,
3 * `STOP_TIMEOUT_S` at most (benchmarks/bench_close.py).
If the training process dies instead, PR_SET_PDEATHSIG kills the supervisor and, in
turn, the workers; the ring is a memfd, so no file or name is left anywhere.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

# NumPy >= 2 imports numpy.random on first use, and a Ctrl-C that lands inside that
# import can be lost (raised and cleared in its C initialisation: 28 of 374 SIGINTs
# aimed at it).  Loader() touches np.random, so it is imported here, with shmfeed.
import numpy.random  # noqa: F401
import psutil

from .._config import Config
from .._engine.report import describe_exit, proc_state
from .._engine.ring import Ring
from .._errors import WorkerError
from . import forkserver as _forkserver
from . import interpreter as _interpreter
from .interrupts import sigint_deferred
from .messages import (
    ExitStatus,
    MessageError,
    SpawnArgs,
    SupervisorStart,
    Update,
    UpdateFailed,
    decode_update_reply,
)
from .supervisor import fork_child, fork_main, hold_fds, kill_and_reap, sigkill, wait_until

# Popen arguments that start a spawned supervisor in a process group of its own.
_NEW_GROUP: dict = {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}
STOP_TIMEOUT_S = 2.0  # the supervisor gets this long to finish the shutdown protocol
UPDATE_TIMEOUT_S = 120.0  # the supervisor gets this long to rebuild a source and re-fork
UPDATE_POLL_S = 0.05  # how often the training process checks the supervisor meanwhile


@dataclass(frozen=True)
class _StartArgs:
    """What every start method gets: the pool's ring, source and config, the
    supervisor's end of the channel, the training process, whether the supervisor sets
    a parent-death signal, and (all but fork) the source's parcel and the
    `SupervisorStart` it starts from."""

    ring: Ring
    source: Any
    cfg: Config
    chan_fd: int
    parent_pid: int
    pdeathsig: bool
    parcel: _interpreter.Parcel | None
    start: bytes | None


class _SupervisorProcess(ABC):
    """A supervisor process as its start method lets the training process see it."""

    method: str
    pid: int

    @classmethod
    @abstractmethod
    def start(cls, args: _StartArgs) -> _SupervisorProcess | None:
        """Start one; None when this method cannot here and now (no fork server)."""

    @abstractmethod
    def exit_status(self) -> int | None:
        """Its wait status once it has exited (asked until it is not None), else None."""

    def own_fds(self) -> set[int]:
        """Descriptors held to watch it (see Pool.own_fds)."""
        return set()

    def close(self) -> int | None:
        """Let go of what watches it, the pool being stopped; the wait status to take
        if `exit_status` can no longer tell, else None."""
        return None


class _Forked(_SupervisorProcess):
    """Forked from this process: a child of ours."""

    method = "fork"

    def __init__(self, pid: int):
        self.pid = pid

    @classmethod
    def start(cls, args: _StartArgs) -> _Forked:
        return cls(fork_child(lambda: fork_main(args.ring.fd, args.chan_fd, args.source, args.cfg,
                                                args.parent_pid, args.pdeathsig, args.ring.max_workers)))

    def exit_status(self) -> int | None:
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        return None if pid == 0 else status


class _FromServer(_SupervisorProcess):
    """Forked by the fork server (the server's child, not ours): its exit status comes
    through a pipe, as an `ExitStatus`."""

    method = "forkserver"

    def __init__(self, pid: int, status_fd: int):
        self.pid = pid
        self.status_fd: int | None = status_fd

    @classmethod
    def start(cls, args: _StartArgs) -> _FromServer | None:
        assert args.parcel is not None and args.start is not None
        pfd = _memfd_with(args.start)
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            pid = _forkserver.request(pfd, args.ring.fd, args.chan_fd, write_fd, args.parcel.fds())
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(pfd)
            os.close(write_fd)
        if pid is None:
            os.close(read_fd)
            return None
        return cls(pid, read_fd)

    def exit_status(self) -> int | None:
        if self.status_fd is None:
            return None
        try:
            data = os.read(self.status_fd, 32)
        except BlockingIOError:
            return None
        os.close(self.status_fd)
        self.status_fd = None
        # EOF without a status: the fork server died, and the supervisor with it.
        return ExitStatus.decode(data).status if data else signal.SIGKILL

    def own_fds(self) -> set[int]:
        return {self.status_fd} if self.status_fd is not None else set()

    def close(self) -> int | None:
        if self.status_fd is None:
            return None
        os.close(self.status_fd)  # the fork server never told: killed
        self.status_fd = None
        return signal.SIGKILL


class _Spawned(_SupervisorProcess):
    """A fresh interpreter: a Popen of ours."""

    method = "spawn"

    def __init__(self, popen: subprocess.Popen):
        self.popen = popen
        self.pid = popen.pid

    @classmethod
    def start(cls, args: _StartArgs) -> _Spawned:
        assert args.parcel is not None and args.start is not None
        # The payload goes through a memfd, not a pipe: writing it can never block.
        pfd = _memfd_with(args.start)
        fds = args.parcel.fds()
        try:
            popen = subprocess.Popen(
                _interpreter.python_command("from shmfeed._processes.supervisor import spawn_main; spawn_main()")
                + SpawnArgs(pfd, args.ring.fd, args.chan_fd, args.parent_pid, args.pdeathsig,
                            tuple(fds)).encode(),
                pass_fds=(pfd, args.ring.fd, args.chan_fd, *fds), stdin=subprocess.DEVNULL,
                # Its own process group: the terminal's Ctrl-C (sent to the foreground
                # group) would otherwise hit the new interpreter while it starts, before
                # it can ignore SIGINT, and print a traceback.
                **_NEW_GROUP)
        finally:
            os.close(pfd)
        return cls(popen)

    def exit_status(self) -> int | None:
        rc = self.popen.poll()
        if rc is None:
            return None
        return (-rc & 0x7F) if rc < 0 else (rc << 8)


# The start methods a Pool tries, in order: a fork server that is gone falls back on a
# fresh interpreter.
_STARTS: dict[str, tuple[type[_SupervisorProcess], ...]] = {
    "fork": (_Forked,), "forkserver": (_FromServer, _Spawned), "spawn": (_Spawned,)}


class Pool:
    """The training process's handle on a running supervisor."""

    def __init__(self, ring: Ring, source: Any, cfg: Config, start_method: str,
                 parcel: _interpreter.Parcel | None = None):
        self.ring = ring
        self.cfg = cfg
        self._status: int | None = None
        # PR_SET_PDEATHSIG fires when the *thread* that forked exits, so it is set only
        # when that thread is the main one; otherwise the supervisor watches our pidfd.
        pdeathsig = threading.current_thread() is threading.main_thread()
        self._chan, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sup: _SupervisorProcess | None = None
        hold_fds(self)  # pools forked later (by any loader) close our channel
        try:
            start = None if start_method == "fork" else self._start_message(cfg)
            args = _StartArgs(ring, source, cfg, theirs.fileno(), os.getpid(), pdeathsig, parcel, start)
            for kind in _STARTS[start_method]:
                self._sup = kind.start(args)
                if self._sup is not None:
                    break
        except BaseException:
            self._chan.close()
            if self._sup is not None:
                self._sup.close()
            raise
        finally:
            theirs.close()
        assert self._sup is not None  # the last of each _STARTS entry always starts
        self.pid = self._sup.pid
        self.start_method = self._sup.method

    def own_fds(self) -> set[int]:
        """Our descriptors, which no other pool process may keep (see child_setup)."""
        fds = {self._chan.fileno()} | (self._sup.own_fds() if self._sup is not None else set())
        return {fd for fd in fds if fd >= 0}

    def _start_message(self, cfg: Config) -> bytes:
        """The `SupervisorStart` a supervisor that does not share our memory starts from
        (with the source's parcel, which travels as descriptors)."""
        # Not multiprocessing's spawn: it would import the user's __main__ there (and run
        # an unguarded script a second time).  What __main__ defines travels by value.
        return SupervisorStart(tuple(os.fsdecode(p) for p in _interpreter.parent_sys_path()),
                               cfg.n_slots, self.ring.max_workers, self.ring.slot_bytes,
                               _interpreter.dumps(cfg), *_interpreter.parent_process_state()).encode()

    def update_source(self, parcel: _interpreter.Parcel) -> None:
        """Have the supervisor replace every worker by one building from the source in
        `parcel` (see the update exchange above; the caller closes it).  Raises WorkerError."""
        def failed(why: str) -> WorkerError:
            return WorkerError(
                f"the worker pool's supervisor (pid {self.pid}) {why} while taking the "
                "source's new state (after an epoch hook); iterate again to start a new "
                "pool, or close the loader", pid=self.pid)

        with sigint_deferred():  # interrupted halfway, an answer would be left unread
            try:
                msg, fds = Update(tuple(parcel.fds())).encode()
                socket.send_fds(self._chan, [msg], fds)
                deadline = time.monotonic() + UPDATE_TIMEOUT_S
                while not select.select([self._chan], [], [], UPDATE_POLL_S)[0]:
                    ended = self.poll()
                    if ended is not None or time.monotonic() > deadline:
                        raise failed(f"{ended}" if ended is not None
                                     else f"did not answer within {UPDATE_TIMEOUT_S:.0f} s")
                answer = self._chan.recv(4096)
            except OSError as exc:  # it died meanwhile: its end of the channel is gone
                raise failed(f"closed its channel ({type(exc).__name__}: {exc})") from None
        try:
            reply = decode_update_reply(answer) if answer else UpdateFailed("no answer")
        except MessageError as exc:
            reply = UpdateFailed(str(exc))
        if isinstance(reply, UpdateFailed):
            raise WorkerError(
                f"the worker pool could not rebuild the source's new state (after an epoch hook): "
                f"{reply.reason}", pid=self.pid)

    def poll(self) -> str | None:
        """None while the supervisor runs; otherwise how it ended."""
        if self._status is None:
            assert self._sup is not None
            self._status = self._sup.exit_status()
            if self._status is None:
                return None
        return describe_exit(self._status)

    def worker_pids(self) -> list[int]:
        """Pids of the workers started so far (a worker not forked yet has none: never
        0, which `os.kill` would read as the whole process group)."""
        pids = (self.ring.ctl.worker(w)["pid"] for w in range(self.cfg.num_workers))
        return [p for p in pids if p > 0]

    def stop(self) -> None:
        """Run the shutdown protocol; return when no process of the pool is left.

        A Ctrl-C meanwhile is raised when it is done (in a few hundredths of a second
        usually, 3 * STOP_TIMEOUT_S at worst): interrupted halfway, it would leave the
        pool running."""
        with sigint_deferred():
            try:
                self._stop()
            finally:
                self._chan.close()
                assert self._sup is not None
                status = self._sup.close()
                if status is not None and self._status is None:
                    self._status = status

    def _stop(self) -> None:
        # Each step needs as little as it can (the shutdown word, waitpid and kill need
        # no descriptor), so that the pool stops even when this process has run out of
        # descriptors; a step that fails anyway does not keep the next from running.
        self.ring.ctl.shutdown()
        self._chan.close()  # wakes the supervisor now, not at its next POLL_S
        pids = self.worker_pids()
        workers = self._worker_procs(pids)
        if not pids and self.poll() is None:
            # Still starting (a fresh interpreter importing takes seconds): no worker
            # to take down, and a worker forked right now dies with it (pdeathsig) or
            # leaves at the shutdown word.
            sigkill([self.pid])
        ended = lambda: self.poll() is not None  # noqa: E731
        if not wait_until(ended, STOP_TIMEOUT_S, 0.001):
            kill_and_reap([self.pid], ended, STOP_TIMEOUT_S, 0.005)
        # A supervisor that was killed reaped nobody: its workers die by their
        # PR_SET_PDEATHSIG (or leave at the shutdown word).  Wait until they have.
        _wait_exited(workers, STOP_TIMEOUT_S)
        # Orphaned workers go to init, or to us when we are init (PID 1 in a container)
        # or a subreaper: reap those, and only those, that are now ours.
        for pid in pids:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        # Nothing of this pool touches the ring any more: put back what its workers
        # left half done (a killed supervisor could not), so that a new pool starts
        # from a consistent ring.
        for w in range(self.cfg.num_workers):
            self.ring.ctl.reclaim(w)

    def _worker_procs(self, pids: list[int]) -> list[psutil.Process | int]:
        """The live workers, as psutil handles (which survive pid reuse) when they can
        be read, else as bare pids; only children of our supervisor, never strangers."""
        procs: list[psutil.Process | int] = []
        for pid in pids:
            try:
                p = psutil.Process(pid)
                # Ours through the supervisor, or orphaned to us (PID 1, a subreaper).
                if p.ppid() in (self.pid, os.getpid()):
                    procs.append(p)
            except psutil.NoSuchProcess:
                pass
            except (psutil.Error, OSError):  # e.g. no descriptor left to read /proc
                procs.append(pid)
        return procs


def _memfd_with(data: bytes) -> int:
    """A memfd holding `data`, positioned at its start."""
    fd = os.memfd_create("shmfeed-payload", os.MFD_CLOEXEC)
    try:
        with os.fdopen(os.dup(fd), "wb") as f:
            f.write(data)
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _running(p: psutil.Process | int) -> bool:
    """Not exited (a zombie has: only its parent, possibly init, still has to reap it)."""
    if isinstance(p, int):
        state = proc_state(p)
        if state is None:  # unreadable: fall back on whether the pid exists at all
            try:
                os.kill(p, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
            return True
        return state != "Z"
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except (psutil.Error, OSError):
        return _running(p.pid)


def _wait_exited(procs: list, timeout_s: float) -> None:
    """Wait until every process has exited, at most `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while procs and time.monotonic() < deadline:
        procs = [p for p in procs if _running(p)]
        if procs:
            time.sleep(0.005)
