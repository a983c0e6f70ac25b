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

import gc
import multiprocessing.spawn
import os
import pickle
import select
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any

import psutil

from . import _core
from ._control import NO_CLAIM, untag
from ._order import Order
from ._ring import Ring
from ._spec import Spec
from ._worker import Builder, worker_loop

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
        hint = " (the kernel's OOM killer sends SIGKILL; see `dmesg`)" if sig == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {os.waitstatus_to_exitcode(status)}"


def _child_setup(parent_pid: int, keep_fds: set[int]) -> None:
    """First thing in every process we fork or spawn."""
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
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _child_setup(me, {ring.fd})
                worker_loop(ring, builder, w, pending, me)
            except BaseException:
                traceback.print_exc()
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

    deaths = 0
    while not ctl.header()["shutdown"] and os.getppid() == parent_pid:
        if pidfds:
            select.select(list(pidfds.values()), [], [], POLL_S)
        else:
            time.sleep(POLL_S)
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
            _, pending = ctl.reclaim(w)
            if pending != NO_CLAIM:
                gen, batch = untag(pending)
                epoch = ctl.gen_info(gen)[0]
                doing = f"while building batch {batch} of epoch {epoch}"
            else:
                doing = "while waiting for work"
            what = f"worker {w} (pid {pid}) {describe_exit(status)} {doing}"
            deaths += 1
            if deaths > cfg.max_restarts:
                ring.write_report(None, pickle.dumps({
                    "message": f"{what}; restarted {cfg.max_restarts} times, giving up "
                               f"(`max_restarts={cfg.max_restarts}`).",
                }))
                ctl.set_fatal()
                ctl.shutdown()
                break
            ctl.add_restart()
            print(f"shmfeed: {what}; replacing it ({deaths} of `max_restarts={cfg.max_restarts}`)"
                  + (", the batch will be rebuilt" if pending != NO_CLAIM else ""),
                  file=sys.stderr, flush=True)
            start(w, pending)

    # Shutdown: workers leave at their next wait; the rest are killed.
    deadline = time.monotonic() + WORKER_GRACE_S
    while workers and time.monotonic() < deadline:
        pid, _ = os.waitpid(-1, os.WNOHANG)
        if pid:
            workers.pop(pid, None)
        else:
            time.sleep(0.005)
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in list(workers):
        os.waitpid(pid, 0)  # SIGKILLed: returns at once
    for w in range(cfg.num_workers):
        ctl.reclaim(w)


def _fork_main(ring_fd: int, source: Any, cfg: PoolConfig, parent_pid: int) -> None:
    _child_setup(parent_pid, {ring_fd})
    ring = Ring(cfg.spec, cfg.n_slots, cfg.num_workers, fd=ring_fd)
    supervise(ring, source, cfg, parent_pid)


def spawn_main() -> None:
    """Entry point of a spawned supervisor: `python -c ... <payload fd> <ring fd>`."""
    payload_fd, ring_fd, parent_pid = (int(a) for a in sys.argv[1:4])
    with os.fdopen(payload_fd, "rb") as f:
        prep, cfg, source_bytes = pickle.load(f)
    _child_setup(parent_pid, {ring_fd})
    ring = Ring(cfg.spec, cfg.n_slots, cfg.num_workers, fd=ring_fd)
    try:
        # Make the parent's __main__ importable as multiprocessing's spawn does, so
        # that sources defined in the training script unpickle.
        multiprocessing.spawn.prepare(prep)
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
        if start_method == "fork":
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    _fork_main(ring.fd, source, cfg, me)
                except BaseException:
                    traceback.print_exc()
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
            payload = pickle.dumps((prep, cfg, source_bytes))
            # The payload goes through a memfd, not a pipe: writing it can never block.
            pfd = os.memfd_create("shmfeed-payload", os.MFD_CLOEXEC)
            try:
                with os.fdopen(os.dup(pfd), "wb") as f:
                    f.write(payload)
                os.lseek(pfd, 0, os.SEEK_SET)
                self._popen = subprocess.Popen(
                    [sys.executable, "-c", "from shmfeed._pool import spawn_main; spawn_main()",
                     str(pfd), str(ring.fd), str(me)],
                    pass_fds=(pfd, ring.fd), stdin=subprocess.DEVNULL)
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
        """Run the shutdown protocol; return when no process of the pool is left."""
        pids = [p for p in self.worker_pids() if p > 0]
        self.ring.ctl.shutdown()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        if self.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if self._popen is not None:
                self._popen.wait(timeout=STOP_TIMEOUT_S)
            else:
                os.waitpid(self.pid, 0)
            self._status = self._status if self._status is not None else 0
            # Orphaned workers die by PR_SET_PDEATHSIG; make sure before returning.
            procs = []
            for p in pids:
                try:
                    procs.append(psutil.Process(p))
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(procs, timeout=STOP_TIMEOUT_S)
