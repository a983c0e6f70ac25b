"""Worker processes: a supervisor that forks the workers, replaces the ones that die,
and takes them all down when the loader closes.

Why a supervisor: workers must never be forked from a process whose JAX/CUDA runtime
is running (fork copies its locks, not its threads).  The supervisor is forked from
the training process when that is still clean, or started as a fresh interpreter
(`spawn`) that receives the ring's memfd and the pickled source when it is not.
Either way it is single-threaded, so it can fork workers and replacements at any
time safely.

Shutdown protocol (the only one; everything that ends a pool goes through it):
1. The training process sets the control block's shutdown word (`Control.shutdown`),
   which wakes every futex waiter.
2. Workers see it at their next wait and exit; the supervisor gives them
   `WORKER_GRACE_S`, SIGKILLs the rest, reaps them all, reclaims their slots, exits.
3. The training process reaps the supervisor within `STOP_TIMEOUT_S`, else SIGKILLs
   it; the workers then die by PR_SET_PDEATHSIG, and we wait for their pids to go.
If the training process dies instead, PR_SET_PDEATHSIG kills the supervisor and, in
turn, the workers; the ring is a memfd, so no file or name is left anywhere.
"""

from __future__ import annotations

import contextlib
import faulthandler
import gc
import multiprocessing.spawn
import os
import pickle
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

# NumPy >= 2 imports numpy.random on first use, and a Ctrl-C that lands inside that
# import can be lost (raised and cleared in its C initialisation: 28 of 374 SIGINTs
# aimed at it).  Loader() touches np.random, so it is imported here, with shmfeed.
import numpy.random  # noqa: F401
import psutil

from . import _core
from ._control import NO_CLAIM, untag
from ._order import Order
from ._ring import Ring
from ._spec import Spec
from ._worker import Builder, worker_loop

# Popen arguments that start a spawned supervisor in a process group of its own.
_NEW_GROUP: dict = {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}
WORKER_GRACE_S = 0.3  # workers get this long to leave on their own at shutdown
STOP_TIMEOUT_S = 2.0  # the supervisor gets this long to finish the shutdown protocol
POLL_S = 0.05  # supervisor's loop period: how soon it notices shutdown


@dataclass(frozen=True)
class PoolConfig:
    spec: Spec
    order: Order
    n_slots: int
    num_workers: int
    max_restarts: int
    seed_global_rngs: bool


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


class sigint_deferred:
    """Hold Ctrl-C back while a pool process is created or stopped: meanwhile SIGINT
    only sets a flag, and is handed to the previous handler on the way out (a
    KeyboardInterrupt, by default).

    Why: a SIGINT that lands inside os.fork() is raised in an at-fork hook, where
    Python prints and drops it; one that lands in a forked child before it ignores
    SIGINT prints a traceback from the child (which inherits this handler instead);
    one that interrupts the shutdown protocol halfway leaves the pool running.  Not a
    signal mask: the kernel would then give the SIGINT to another thread (OpenBLAS's,
    JAX's), where CPython 3.11 may not raise it for a long time, and an exception
    raised before the mask is restored would leave Ctrl-C blocked for good.  Python
    runs handlers in the main thread only, so elsewhere this does nothing (and is not
    needed: the at-fork hooks of another thread cannot be interrupted).
    """

    def __enter__(self) -> sigint_deferred:
        self._previous: Any = None
        self._caught = False
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            if previous is not None:  # None: a handler installed outside Python; leave it
                self._previous = signal.signal(signal.SIGINT, self._record)
        return self

    def _record(self, signum: int, frame: Any) -> None:
        self._caught = True

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            if self._caught:
                signal.raise_signal(signal.SIGINT)


def _say(text: str) -> None:
    """Write to fd 2 itself: in a pool process, sys.stderr may be an object of the
    training process (pytest's capture, a notebook's stream) whose descriptor is gone."""
    try:
        os.write(2, (text.rstrip("\n") + "\n").encode(errors="backslashreplace"))
    except OSError:
        pass


def _child_setup(parent_pid: int, keep_fds: set[int], pdeathsig: bool = True) -> None:
    """First thing in every process we fork or spawn."""
    if pdeathsig:
        _core.set_pdeathsig(signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(0)
    # Ctrl-C is for the training loop: it goes to the whole foreground process group.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Objects inherited through fork are never collected here: their destructors
    # (closing fds, releasing slots) belong to the parent.
    gc.freeze()
    # Drop descriptors inherited from the parent (other loaders' rings among them),
    # so that closing those really frees them.
    fd = 3
    for keep in sorted(k for k in keep_fds if k >= 3):
        os.closerange(fd, keep)
        fd = keep + 1
    os.closerange(fd, _max_fd())
    # sys.stdout/sys.stderr may have written to a descriptor just closed: give the
    # source's print() the real fds 1 and 2 instead of an OSError per sample.
    for name, fileno in (("stdout", 1), ("stderr", 2)):
        try:
            same = getattr(sys, name).fileno() == fileno
        except Exception:
            same = False
        if not same:
            setattr(sys, name, open(fileno, "w", buffering=1, closefd=False, errors="backslashreplace"))


def _max_fd() -> int:
    try:
        return max(int(n) for n in os.listdir("/proc/self/fd")) + 1
    except (OSError, ValueError):
        return 1024


def supervise(ring: Ring, source: Any, cfg: PoolConfig, parent_pid: int) -> None:
    """The supervisor's main loop."""
    ctl = ring.ctl
    me = os.getpid()
    builder = Builder(source, cfg.spec, cfg.order, ring, cfg.seed_global_rngs)
    workers: dict[int, int] = {}  # pid -> worker index
    pidfds: dict[int, int] = {}  # pid -> pidfd

    def start(w: int, pending: int) -> None:
        # Recorded before the fork: a replacement that dies before running a line
        # (killed, or the OOM killer again) still leaves its predecessor's claim
        # where the next reclaim finds it, instead of losing the batch.
        ctl.set_claim(w, pending)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _child_setup(me, {ring.fd})
                # A segfault in native code then leaves the worker's Python stack on
                # stderr; the supervisor reports the signal.
                with contextlib.suppress(Exception):
                    faulthandler.enable(file=2)
                worker_loop(ring, builder, w, pending, me)
            except BaseException:
                _say(traceback.format_exc())
                code = 1
            finally:
                os._exit(code)
        workers[pid] = w
        ctl.set_worker_pid(w, pid)
        try:
            pidfds[pid] = os.pidfd_open(pid)
        except OSError:
            pass  # older kernels: the POLL_S loop still reaps it

    for w in range(cfg.num_workers):
        start(w, NO_CLAIM)

    # The training process's pidfd turns readable when it dies: noticed at once even
    # when no parent-death signal was set up (a Loader made in a thread).
    try:
        parent_fd = [os.pidfd_open(parent_pid)]
    except OSError:
        parent_fd = []
    while not ctl.header()["shutdown"] and os.getppid() == parent_pid:
        select.select(list(pidfds.values()) + parent_fd, [], [], POLL_S)
        while workers:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            w = workers.pop(pid, None)
            fd = pidfds.pop(pid, None)
            if fd is not None:
                os.close(fd)
            if w is None or ctl.header()["shutdown"]:
                continue
            held = ctl.worker(w)["claim"]  # what it was building, needed or not
            _, pending = ctl.reclaim(w)
            report = _death_report(ctl, w, pid, status, held)
            # Counted in the ring, so over the loader's whole life, across pools.
            restarts = ctl.header()["restarts"]
            if restarts >= cfg.max_restarts:
                report["message"] = (
                    f"{report['message']}; restarted {restarts} time(s) already, giving up "
                    f"(`max_restarts={cfg.max_restarts}`).{exit_hint(status)} Fix the crash, "
                    "or raise `max_restarts` if such deaths are expected.")
                ring.write_report(None, pickle.dumps(report))
                ctl.set_fatal()
                ctl.shutdown()
                break
            ctl.add_restart()
            _say(f"shmfeed: {report['message']}; replacing it ({restarts + 1} of "
                 f"`max_restarts={cfg.max_restarts}`)"
                 + (", the batch will be rebuilt." if pending != NO_CLAIM else ".")
                 + exit_hint(status))
            start(w, pending)

    if os.getppid() != parent_pid:
        ctl.shutdown()  # the training process is gone: workers leave at their next wait
    for fd in parent_fd:
        os.close(fd)

    # Shutdown: workers leave at their next wait; the rest are killed.
    _reap(workers, WORKER_GRACE_S)
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _reap(workers, STOP_TIMEOUT_S)  # SIGKILLed: gone within microseconds
    for fd in pidfds.values():
        os.close(fd)
    for w in range(cfg.num_workers):
        ctl.reclaim(w)


def _reap(workers: dict[int, int], timeout_s: float) -> None:
    """Reap exited children, dropping them from `workers`, until none is left or
    `timeout_s` has passed."""
    deadline = time.monotonic() + timeout_s
    while workers and time.monotonic() < deadline:
        pid, _ = os.waitpid(-1, os.WNOHANG)
        if pid:
            workers.pop(pid, None)
        else:
            time.sleep(0.002)


def _death_report(ctl: Any, w: int, pid: int, status: int, held: int) -> dict:
    """What the fatal report (and the WorkerError built from it) says about a death."""
    report: dict = {"worker": w, "pid": pid, "batch": None, "epoch": None,
                    "signal": None, "exit_code": None}
    if os.WIFSIGNALED(status):
        report["signal"] = os.WTERMSIG(status)
    else:
        report["exit_code"] = os.waitstatus_to_exitcode(status)
    doing = "while waiting for work"
    if held != NO_CLAIM:
        gen, batch = untag(held)
        report["epoch"], report["batch"] = ctl.gen_info(gen)[0], batch
        doing = f"while building batch {batch} of epoch {report['epoch']}"
    report["message"] = f"worker {w} (pid {pid}) {describe_exit(status)} {doing}"
    return report


def _fork_main(ring_fd: int, source: Any, cfg: PoolConfig, parent_pid: int,
               pdeathsig: bool) -> None:
    _child_setup(parent_pid, {ring_fd}, pdeathsig)
    ring = Ring(cfg.spec, cfg.n_slots, cfg.num_workers, fd=ring_fd)
    supervise(ring, source, cfg, parent_pid)


def spawn_main() -> None:
    """Entry point of a spawned supervisor: `python -c ... <payload fd> <ring fd>`."""
    payload_fd, ring_fd, parent_pid, pdeathsig = (int(a) for a in sys.argv[1:5])
    with os.fdopen(payload_fd, "rb") as f:
        prep, geometry, cfg_bytes, source_bytes = pickle.load(f)
    _child_setup(parent_pid, {ring_fd}, bool(pdeathsig))
    # Map the ring from its plain geometry first, so that a failure to rebuild the
    # config (which names the user's classes, e.g. a namedtuple in the batch spec) or
    # the source can still be reported to the training process.
    n_slots, max_workers, slot_bytes = geometry
    ring = Ring(None, n_slots, max_workers, fd=ring_fd, slot_bytes=slot_bytes)
    try:
        # Make the parent's __main__ importable as multiprocessing's spawn does, so
        # that sources defined in the training script unpickle.
        multiprocessing.spawn.prepare(prep)
        cfg = pickle.loads(cfg_bytes)
        ring.spec = cfg.spec
        source = pickle.loads(source_bytes)
    except BaseException as exc:
        ring.write_report(None, pickle.dumps({
            "message": "the worker pool could not rebuild the source in a fresh interpreter: "
                       f"{type(exc).__name__}: {exc}. Make the source importable (define its class "
                       "in a module, and guard the training script with "
                       "`if __name__ == '__main__':`), or create the Loader before JAX starts.",
        }))
        ring.ctl.set_fatal()
        return
    supervise(ring, source, cfg, parent_pid)


class Pool:
    """The training process's handle on a running supervisor."""

    def __init__(self, ring: Ring, source: Any, cfg: PoolConfig, start_method: str,
                 source_bytes: bytes | None = None):
        self.ring = ring
        self.cfg = cfg
        self.start_method = start_method
        self._popen: subprocess.Popen | None = None
        self._status: int | None = None
        me = os.getpid()
        # PR_SET_PDEATHSIG fires when the *thread* that forked exits, so it is set only
        # when that thread is the main one; otherwise the supervisor watches our pidfd.
        pdeathsig = threading.current_thread() is threading.main_thread()
        if start_method == "fork":
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    _fork_main(ring.fd, source, cfg, me, pdeathsig)
                except BaseException:
                    _say(traceback.format_exc())
                    code = 1
                finally:
                    os._exit(code)
            self.pid = pid
        else:
            assert source_bytes is not None
            prep = multiprocessing.spawn.get_preparation_data("shmfeed-pool")
            # The pool never talks to multiprocessing managers, so it needs no authkey
            # (an AuthenticationString refuses to be pickled outside multiprocessing).
            prep.pop("authkey", None)
            geometry = (cfg.n_slots, ring.max_workers, ring.slot_bytes)
            payload = pickle.dumps((prep, geometry, pickle.dumps(cfg), source_bytes))
            # The payload goes through a memfd, not a pipe: writing it can never block.
            pfd = os.memfd_create("shmfeed-payload", os.MFD_CLOEXEC)
            try:
                with os.fdopen(os.dup(pfd), "wb") as f:
                    f.write(payload)
                os.lseek(pfd, 0, os.SEEK_SET)
                self._popen = subprocess.Popen(
                    [sys.executable, "-c", "from shmfeed._pool import spawn_main; spawn_main()",
                     str(pfd), str(ring.fd), str(me), str(int(pdeathsig))],
                    pass_fds=(pfd, ring.fd), stdin=subprocess.DEVNULL,
                    # Its own process group: the terminal's Ctrl-C (sent to the
                    # foreground group) would otherwise hit the new interpreter while it
                    # starts, before it can ignore SIGINT, and print a traceback.
                    **_NEW_GROUP)
            finally:
                os.close(pfd)
            self.pid = self._popen.pid

    def poll(self) -> str | None:
        """None while the supervisor runs; otherwise how it ended."""
        if self._status is None:
            if self._popen is not None:
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
        return [self.ring.ctl.worker(w)["pid"] for w in range(self.cfg.num_workers)]

    def stop(self) -> None:
        """Run the shutdown protocol; return when no process of the pool is left.

        A Ctrl-C meanwhile is raised when it is done (in a few hundredths of a second
        usually, 3 * STOP_TIMEOUT_S at worst): interrupted halfway, it would leave the
        pool running."""
        with sigint_deferred():
            self._stop()

    def _stop(self) -> None:
        workers = self._worker_procs()
        self.ring.ctl.shutdown()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
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
        # Nothing of this pool touches the ring any more: put back what its workers
        # left half done (a killed supervisor could not), so that a new pool starts
        # from a consistent ring.
        for w in range(self.cfg.num_workers):
            self.ring.ctl.reclaim(w)

    def _worker_procs(self) -> list[psutil.Process]:
        """The live workers, as psutil handles (which survive pid reuse); only those
        still children of our supervisor can be told apart from strangers."""
        procs = []
        for pid in self.worker_pids():
            try:
                p = psutil.Process(pid) if pid > 0 else None
                if p is not None and p.ppid() == self.pid:
                    procs.append(p)
            except psutil.Error:
                pass
        return procs


def _wait_exited(procs: list[psutil.Process], timeout_s: float) -> None:
    """Wait until every process has exited (a zombie has: only its parent, possibly
    init, still has to reap it)."""
    deadline = time.monotonic() + timeout_s
    while procs and time.monotonic() < deadline:
        alive = []
        for p in procs:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.Error:
                pass
        procs = alive
        if procs:
            time.sleep(0.005)
