"""The training process's handle on a worker pool, and the shutdown protocol.

Owns: starting the supervisor (forked from this process, from the fork server of
_processes/forkserver.py, or a fresh interpreter: see _processes/supervisor.py),
asking it how it is, sending it a source whose state changed (`update_source`: the
supervisor re-forks only the workers, so an epoch hook costs no interpreter start and
no import), and stopping it; holding Ctrl-C back while a pool process is created,
updated or stopped.

The update exchange, over a SOCK_SEQPACKET socket pair that only this handle and the
supervisor hold: the training process sends `UPDATE` with the source's parcel (a memfd
and the files it maps, see _interpreter.Parcel: never blocks, whatever its size), then waits for `UPDATED` (new workers are
running; no worker of the old source is left) or `UPDATE_FAILED` + reason, checking
that the supervisor lives.  It only ever does so between epochs, when no generation is
open: the old workers' half-built batches are of abandoned or finished epochs.

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
from .supervisor import UPDATE, UPDATE_FAILED, UPDATED, fork_child, fork_main, hold_fds

# Popen arguments that start a spawned supervisor in a process group of its own.
_NEW_GROUP: dict = {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}
STOP_TIMEOUT_S = 2.0  # the supervisor gets this long to finish the shutdown protocol
UPDATE_TIMEOUT_S = 120.0  # the supervisor gets this long to rebuild a source and re-fork
UPDATE_POLL_S = 0.05  # how often the training process checks the supervisor meanwhile


class Pool:
    """The training process's handle on a running supervisor."""

    def __init__(self, ring: Ring, source: Any, cfg: Config, start_method: str,
                 parcel: _interpreter.Parcel | None = None):
        self.ring = ring
        self.cfg = cfg
        self.start_method = start_method
        self._popen: subprocess.Popen | None = None
        self._status_fd: int | None = None  # a fork server's supervisor: its exit status
        self._status: int | None = None
        me = os.getpid()
        # PR_SET_PDEATHSIG fires when the *thread* that forked exits, so it is set only
        # when that thread is the main one; otherwise the supervisor watches our pidfd.
        pdeathsig = threading.current_thread() is threading.main_thread()
        self._chan, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        hold_fds(self)  # pools forked later (by any loader) close our channel
        try:
            if start_method == "fork":
                self.pid = fork_child(lambda: fork_main(ring.fd, theirs.fileno(), source, cfg, me,
                                                        pdeathsig, ring.max_workers))
            else:
                assert parcel is not None
                payload = self._payload(cfg)
                if start_method == "forkserver" and not self._from_server(payload, theirs.fileno(), parcel):
                    self.start_method = "spawn"
                if self.start_method == "spawn":
                    self._spawn(payload, theirs.fileno(), me, pdeathsig, parcel)
        except BaseException:
            self._chan.close()
            if self._status_fd is not None:
                os.close(self._status_fd)
            raise
        finally:
            theirs.close()

    def own_fds(self) -> set[int]:
        """Our descriptors, which no other pool process may keep (see child_setup)."""
        fds = {self._chan.fileno()} | ({self._status_fd} if self._status_fd is not None else set())
        return {fd for fd in fds if fd >= 0}

    def _payload(self, cfg: Config) -> bytes:
        """What a supervisor that does not share our memory starts from (with the
        source's parcel, which travels as descriptors)."""
        geometry = (cfg.n_slots, self.ring.max_workers, self.ring.slot_bytes)
        # Not multiprocessing's spawn: it would import the user's __main__ there (and run
        # an unguarded script a second time).  What __main__ defines travels by value.
        return _interpreter.dumps((_interpreter.parent_sys_path(), geometry, _interpreter.dumps(cfg)))

    def _from_server(self, payload: bytes, chan_fd: int, parcel: _interpreter.Parcel) -> bool:
        """Have the fork server fork the supervisor; False if there is none."""
        pfd = _memfd_with(payload)
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            pid = _forkserver.request(pfd, self.ring.fd, chan_fd, write_fd, parcel.fds())
        finally:
            os.close(pfd)
            os.close(write_fd)
        if pid is None:
            os.close(read_fd)
            return False
        self.pid = pid
        self._status_fd = read_fd
        return True

    def _spawn(self, payload: bytes, chan_fd: int, me: int, pdeathsig: bool,
               parcel: _interpreter.Parcel) -> None:
        ring = self.ring
        # The payload goes through a memfd, not a pipe: writing it can never block.
        pfd = _memfd_with(payload)
        try:
            self._popen = subprocess.Popen(
                _interpreter.python_command("from shmfeed._processes.supervisor import spawn_main; spawn_main()")
                + [str(pfd), str(ring.fd), str(chan_fd), str(me), str(int(pdeathsig)),
                   ",".join(str(fd) for fd in parcel.fds())],
                pass_fds=(pfd, ring.fd, chan_fd, *parcel.fds()), stdin=subprocess.DEVNULL,
                # Its own process group: the terminal's Ctrl-C (sent to the foreground
                # group) would otherwise hit the new interpreter while it starts, before
                # it can ignore SIGINT, and print a traceback.
                **_NEW_GROUP)
        finally:
            os.close(pfd)
        self.pid = self._popen.pid

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
                socket.send_fds(self._chan, [UPDATE], parcel.fds())
                deadline = time.monotonic() + UPDATE_TIMEOUT_S
                while not select.select([self._chan], [], [], UPDATE_POLL_S)[0]:
                    ended = self.poll()
                    if ended is not None or time.monotonic() > deadline:
                        raise failed(f"{ended}" if ended is not None
                                     else f"did not answer within {UPDATE_TIMEOUT_S:.0f} s")
                answer = self._chan.recv(4096)
            except OSError as exc:  # it died meanwhile: its end of the channel is gone
                raise failed(f"closed its channel ({type(exc).__name__}: {exc})") from None
        if answer != UPDATED:
            reason = answer[len(UPDATE_FAILED):].decode(errors="replace") if answer else "no answer"
            raise WorkerError(
                f"the worker pool could not rebuild the source's new state (after an epoch hook): "
                f"{reason}", pid=self.pid)

    def poll(self) -> str | None:
        """None while the supervisor runs; otherwise how it ended."""
        if self._status is None:
            if self._status_fd is not None:
                try:
                    data = os.read(self._status_fd, 32)
                except BlockingIOError:
                    return None
                # EOF without a status: the fork server died, and the supervisor with it.
                self._status = int(data) if data else signal.SIGKILL
                os.close(self._status_fd)
                self._status_fd = None
            elif self._popen is not None:
                rc = self._popen.poll()
                if rc is None:
                    return None
                self._status = (-rc & 0x7F) if rc < 0 else (rc << 8)
            else:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid == 0:
                    return None
                self._status = status
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
                if self._status_fd is not None:  # the fork server never told: killed
                    os.close(self._status_fd)
                    self._status_fd = None
                    self._status = signal.SIGKILL

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
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        if self.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while self.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
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
