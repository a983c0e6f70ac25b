"""The supervisor: the pool process that forks the workers, replaces the ones that die,
and takes them all down when the loader closes.  Everything here runs in the
supervisor (or, for `child_setup`, first thing in any process we start).

Why a supervisor: workers must never be forked from a process whose JAX/CUDA runtime
is running (fork copies its locks, not its threads).  The supervisor is forked from
the training process when that is still clean; when it is not, it is forked by the
fork server (_processes/forkserver.py: a copy of the training process taken while it was
clean) or started as a fresh interpreter (`spawn`), and receives the ring's memfd and
the source's parcel (_interpreter.Parcel: a memfd, and the files its memmaps map).
Either way it is single-threaded, so it can fork workers and replacements at any
time safely, and it keeps its imports: when an epoch hook changes the source, the
supervisor receives the new state and re-forks only the workers (the update exchange;
its training-process side, the shutdown protocol and the protocol itself are in
_processes/pool.py).
"""

from __future__ import annotations

import contextlib
import faulthandler
import functools
import gc
import os
import select
import signal
import socket
import sys
import time
import traceback
import weakref
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from .._batch.build import builder_for
from .._config import Config
from .._engine import control as _control
from .._engine.report import STOPPED_STATES, StartupFailure, exit_hint, proc_state, worker_death
from .._engine.ring import Ring, forget_inherited, mapped_fds
from . import interpreter as _interpreter
from .interrupts import mark_pool_process
from .messages import (
    MAX_FDS,
    MessageError,
    SpawnArgs,
    SupervisorStart,
    Update,
    Updated,
    UpdateFailed,
)
from .worker import worker_loop

# Workers get this long to leave on their own at shutdown: an idle one leaves within
# microseconds (the shutdown word wakes it); one busy in a sample is SIGKILLed after it,
# which keeps `close()` within ~100 ms (the ring is reclaimed either way).
WORKER_GRACE_S = 0.05
REAP_TIMEOUT_S = 2.0  # SIGKILLed workers are reaped within this long
REAP_POLL_S = 0.002  # how often the supervisor reaps meanwhile
KILL_LANDS_S = 0.001  # a SIGKILL reaches a worker running on another CPU within this (an IPI)
POLL_S = 0.05  # supervisor's loop period: how soon it notices shutdown
STOPPED_REPLACE_S = 2.0  # a worker stopped this long is replaced
GIVE_UP_DRAIN_S = 30.0  # a pool giving up waits this long at most for the batches before it
DRAIN_POLL_S = 0.005


def say(text: str) -> None:
    """Write to fd 2 itself: in a pool process, sys.stderr may be an object of the
    training process (pytest's capture, a notebook's stream) whose descriptor is gone."""
    try:
        os.write(2, (text.rstrip("\n") + "\n").encode(errors="backslashreplace"))
    except OSError:
        pass


# Objects of this process that hold descriptors shmfeed opened for its own use (a pool's
# channel and status pipe), listed by their `own_fds()`; rings are found in _engine/ring.py.
_fd_holders: weakref.WeakSet = weakref.WeakSet()


def hold_fds(obj: Any) -> None:
    """Have forked pool processes close `obj.own_fds()` (see `child_setup`)."""
    _fd_holders.add(obj)


def _own_fds() -> set[int]:
    """Descriptors shmfeed opened in this process for its own use: every ring's, and
    those of the objects given to `hold_fds`."""
    fds = mapped_fds()
    for holder in list(_fd_holders):
        fds.update(holder.own_fds())
    return fds


def _same_files(fds: set[int]) -> set[int]:
    """Every descriptor of this process open on the same file as one of `fds` (memfds,
    sockets, pipes: each its own inode): a mapped ring also holds a dup that mmap made
    for itself and does not show."""
    files = set()
    for fd in fds:
        with contextlib.suppress(OSError):
            st = os.fstat(fd)
            files.add((st.st_dev, st.st_ino))
    found = set(fds)
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError, ValueError):
            st = os.fstat(int(name))
            if (st.st_dev, st.st_ino) in files:
                found.add(int(name))
    return found


def child_setup(parent_pid: int, keep_fds: set[int], pdeathsig: bool = True,
                 keep_ring: Ring | None = None, keep_source_fds: bool = False,
                 drop_fds: Iterable[int] = ()) -> None:
    """First thing in every process we fork or spawn.

    Descriptors: a process that rebuilds its source from bytes (the fork server, a
    supervisor it forks or a fresh interpreter) closes every one it inherited but
    `keep_fds`.  One that inherits the source itself (`keep_source_fds`: a supervisor
    forked from the training process, every worker) closes only shmfeed's own (other
    loaders' rings, so that closing those really frees them; other pools' channels)
    and `drop_fds`: whatever else is open may be the source's, and a file, socket or
    database it holds must keep working (a generator that opened a file, an lmdb
    environment: found by no walk of Python objects).  That is what fork itself
    promises, and what Keras's and PyTorch's forked workers do."""
    if pdeathsig:
        _control.set_pdeathsig(signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(0)
    # Ctrl-C is for the training loop: it goes to the whole foreground process group.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    mark_pool_process()
    drop = (_same_files(_own_fds()) | set(drop_fds)) - keep_fds if keep_source_fds else None
    # Objects inherited through fork are never collected here: their destructors
    # (closing fds, releasing slots) belong to the parent.
    gc.freeze()
    # Nor its rings' memory: a pool must not keep another loader's ring alive after
    # that loader closed.  Our own ring is mapped again from its descriptor.
    forget_inherited(keep_ring)
    if drop is not None:
        for fd in drop:
            with contextlib.suppress(OSError):
                os.close(fd)
    else:
        fd = 3
        for keep in sorted(k for k in keep_fds if k >= 3):
            os.closerange(fd, keep)
            fd = keep + 1
        os.closerange(fd, _max_fd())
    # The holders' descriptors were the parent's, closed just now: their numbers are free
    # here, and a descriptor this process opens next (a source's: Parquet's shared cache
    # in a supervisor) may get one, which its own children must not then close as ours.
    _fd_holders.clear()
    # sys.stdout/sys.stderr may have written to a descriptor just closed: give the
    # source's print() the real fds 1 and 2 instead of an OSError per sample.
    for name, fileno in (("stdout", 1), ("stderr", 2)):
        try:
            same = getattr(sys, name).fileno() == fileno
        except Exception:
            same = False
        if not same:
            setattr(sys, name, open(fileno, "w", buffering=1, closefd=False, errors="backslashreplace"))


def fork_child(main: Callable[[], None]) -> int:
    """Fork; the child runs `main` and exits: 0, or 1 with the traceback on fd 2 if it
    raised.  Never returns in the child.  The parent gets the child's pid."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            main()
        except BaseException:
            say(traceback.format_exc())
            code = 1
        finally:
            os._exit(code)
    return pid


def sigkill(pids: Iterable[int]) -> None:
    """SIGKILL each of `pids` that still exists."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def wait_until(done: Callable[[], bool], timeout_s: float, poll_s: float) -> bool:
    """Call `done` every `poll_s` until it says so, at most `timeout_s`; its last answer."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)
    return True


def kill_and_reap(pids: Iterable[int], reaped: Callable[[], bool], timeout_s: float,
                  poll_s: float) -> bool:
    """SIGKILL `pids`, then wait until `reaped()` (which reaps them: only the caller
    knows how its processes are waited for), at most `timeout_s`; whether they were."""
    sigkill(pids)
    return wait_until(reaped, timeout_s, poll_s)


def _max_fd() -> int:
    try:
        return max(int(n) for n in os.listdir("/proc/self/fd")) + 1
    except (OSError, ValueError):
        return 1024


def _before_workers(source: Any) -> Any:
    """`source`, once it has made what the workers forked from here share
    (`__shmfeed_pool__`: Parquet's cache of decoded row groups)."""
    prepare = getattr(source, "__shmfeed_pool__", None)
    if prepare is not None:
        prepare()
    return source


def supervise(ring: Ring, chan_fd: int, source: list, cfg: Config, parent_pid: int) -> None:
    """The supervisor's main loop.  `source`: a list holding the source, which this
    takes out, so that a source replaced by an update is freed (its parcel's memory with
    it), not kept by a caller's frame for the pool's life."""
    Supervisor(ring, chan_fd, source, cfg, parent_pid).run()


def _running(pid: int) -> bool:
    """Whether child `pid` has not exited (it is not reaped: the reap loop does that)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
    except ChildProcessError:
        return False


class Supervisor:
    """The supervisor's state and its steps: fork the workers, wait (on their pidfds,
    the training process's pidfd and the channel), replace the ones that die or stay
    stopped, take an update, and at shutdown take them all down."""

    def __init__(self, ring: Ring, chan_fd: int, source: list, cfg: Config, parent_pid: int):
        self.ring, self.ctl, self.cfg = ring, ring.ctl, cfg
        self.chan_fd = chan_fd
        self.chan = socket.socket(fileno=chan_fd)
        self.me = os.getpid()
        # The training process, or the fork server that forked us for it: we leave if it
        # goes (PR_SET_PDEATHSIG kills us unless the pool was made in another thread).
        self.ppid = os.getppid()
        self.parent_pid = parent_pid
        self.builder = builder_for(_before_workers(source.pop()), cfg, ring)
        self.workers: dict[int, int] = {}  # pid -> worker index
        self.pidfds: dict[int, int] = {}  # pid -> pidfd
        self.parent_fd: list[int] = []  # the training process's pidfd, once opened
        self.retired: dict[int, int] = {}  # pid -> worker index, of workers replaced by an update
        self.stopped_since: dict[int, float] = {}  # pid -> when it was first seen stopped
        self.replaced_stopped: dict[int, float] = {}  # pid -> how long it had been stopped

    def start(self, w: int, pending: int | None) -> None:
        """Fork worker `w`, which first rebuilds `pending` (a claim tag) if not None."""
        ctl, ring, me = self.ctl, self.ring, self.me
        # Recorded before the fork: a replacement that dies before running a line
        # (killed, or the OOM killer again) still leaves its predecessor's claim
        # where the next reclaim finds it, instead of losing the batch.
        ctl.set_claim(w, pending)
        builder, cfg = self.builder, self.cfg
        drop = {self.chan_fd, *self.pidfds.values(), *self.parent_fd}

        def worker() -> None:
            # First thing, so that a supervisor killed right after this fork still
            # leaves the pid where the training process finds (and, as PID 1, reaps) it.
            ctl.set_worker_pid(w, os.getpid())
            # The source's descriptors stay open; ours (the channel, pidfds) go.
            child_setup(me, {ring.fd}, keep_ring=ring, keep_source_fds=True, drop_fds=drop)
            # A segfault in native code then leaves the worker's Python stack on
            # stderr; the supervisor reports the signal.
            with contextlib.suppress(Exception):
                faulthandler.enable(file=2)
            if cfg.worker_nice:
                os.nice(cfg.worker_nice)
            worker_loop(ring, builder, w, pending, me)

        pid = fork_child(worker)
        self.workers[pid] = w
        ctl.set_worker_pid(w, pid)
        try:
            self.pidfds[pid] = os.pidfd_open(pid)
        except OSError:
            pass  # older kernels: the POLL_S loop still reaps it

    def run(self) -> None:
        ctl, chan = self.ctl, self.chan
        for w in range(self.cfg.num_workers):
            self.start(w, None)
        # The training process's pidfd turns readable when it dies: noticed at once even
        # when no parent-death signal was set up (a Loader made in a thread).
        with contextlib.suppress(OSError):
            self.parent_fd.append(os.pidfd_open(self.parent_pid))
        listen: list[Any] = [chan]  # select() takes fds and sockets alike
        orphaned = False
        while not ctl.shutting_down and not orphaned:
            ready = select.select(list(self.pidfds.values()) + self.parent_fd + listen, [], [], POLL_S)[0]
            orphaned = os.getppid() != self.ppid or bool(self.parent_fd and self.parent_fd[0] in ready)
            if chan in ready and not ctl.shutting_down and not self.update():
                listen = []
            _replace_stopped(self.workers, self.stopped_since, self.replaced_stopped)
            if not self.reap_and_replace():
                break
        if orphaned:
            ctl.shutdown()  # the training process is gone: workers leave at their next wait
        self.stop()

    def reap_and_replace(self) -> bool:
        """Reap the workers that exited and replace them; False once `max_restarts`
        is spent (the report is written and the pool shuts down)."""
        ctl, cfg = self.ctl, self.cfg
        while self.workers:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            w = self.workers.pop(pid, None)
            self.retired.pop(pid, None)
            pidfd = self.pidfds.pop(pid, None)
            if pidfd is not None:
                os.close(pidfd)
            if w is None or ctl.shutting_down:
                continue
            held = ctl.worker(w)["claim"]  # what it was building, needed or not
            pending = ctl.reclaim(w)
            stopped_s = self.replaced_stopped.pop(pid, None)
            self.stopped_since.pop(pid, None)
            if stopped_s is not None:  # not a crash: replaced, and not counted
                say(f"shmfeed: worker {w} (pid {pid}) had been stopped for {stopped_s:.1f} s "
                    "(SIGSTOP, Ctrl-Z of it alone, or a debugger); replaced it"
                    + (", the batch it held will be rebuilt." if pending is not None else "."))
                self.start(w, pending)
                continue
            death = _death(ctl, w, pid, status, held)
            # Counted in the ring, so over the loader's whole life, across pools.
            restarts = ctl.header()["restarts"]
            if restarts >= cfg.max_restarts:
                self.ring.write_report(None, replace(death, message=(
                    f"{death.message}; restarted {restarts} time(s) already, giving up "
                    f"(`max_restarts={cfg.max_restarts}`).{exit_hint(status)} Fix the crash, "
                    "or raise `max_restarts` if such deaths are expected.")))
                self.drain_before(held)
                ctl.set_fatal()
                ctl.shutdown()
                return False
            restarts = ctl.add_restart()
            say(f"shmfeed: {death.message}; replacing it ({restarts} of "
                f"`max_restarts={cfg.max_restarts}`)"
                + (", the batch will be rebuilt." if pending is not None else ".")
                + exit_hint(status))
            self.start(w, pending)
        return True

    def drain_before(self, failed: int) -> None:
        """Giving up on the batch claimed as `failed`: let the workers still alive finish
        the batches before it (bounded by GIVE_UP_DRAIN_S and by their deaths), so that
        the error comes after every earlier batch, in batch order, as a worker's
        exception does.  Nothing replaces the dead worker, so `failed` is never built."""
        if failed == _control.NO_CLAIM:
            return
        deadline = time.monotonic() + GIVE_UP_DRAIN_S
        while time.monotonic() < deadline and not self.ctl.shutting_down:
            earlier = [pid for pid, w in self.workers.items()
                       if self.ctl.worker(w)["claim"] < failed and _running(pid)]
            if not earlier:
                return
            time.sleep(DRAIN_POLL_S)

    def update(self) -> bool:
        """The update exchange: a new source, then every worker replaced.  False once
        the training process's end of the channel is closed."""
        ctl, chan, cfg, ring = self.ctl, self.chan, self.cfg, self.ring
        try:
            msg, fds, _, _ = socket.recv_fds(chan, 64, MAX_FDS)
        except OSError:
            msg, fds = b"", []
        if not msg:
            _close_all(fds)
            return False
        try:
            update = Update.decode(msg, fds)
        except MessageError:  # only our Pool writes here: ignored, as before typed messages
            _close_all(fds)
            return True
        try:
            new = builder_for(_before_workers(_interpreter.load_source(list(update.source_fds))), cfg, ring)
        except BaseException as exc:  # noqa: B036 - whatever the source's unpickling raises
            chan.send(UpdateFailed(f"{type(exc).__name__}: {exc}").encode())
            return True
        finally:
            _close_all(fds)
        self.builder = new
        # Between epochs no generation is open, so a worker without a claim is idle in
        # its wait and, SIGKILLed, never touches the ring again: its record is reused
        # at once and the process reaped by the loop below once it has died (a dying
        # process needs the CPU to tear its memory down: tens of ms on a busy machine).
        # One still building a batch of a finished epoch is waited for and reclaimed.
        old = dict(self.workers)
        sigkill(old)
        busy = {pid for pid, w in old.items() if ctl.worker(w)["claim"] != _control.NO_CLAIM}
        time.sleep(KILL_LANDS_S)
        for pid, w in old.items():
            del self.workers[pid]
            if pid in busy:
                # Bounded: a SIGKILLed process that is not reaped within REAP_TIMEOUT_S
                # runs no more code of ours (it is in the kernel); the reap loop takes it.
                wait_until(functools.partial(reaped, pid), REAP_TIMEOUT_S, REAP_POLL_S)
                pidfd = self.pidfds.pop(pid, None)
                if pidfd is not None:
                    os.close(pidfd)
            else:
                self.retired[pid] = w
        for w in range(cfg.num_workers):
            ctl.reclaim(w)
            self.start(w, None)
        chan.send(Updated().encode())
        return True

    def stop(self) -> None:
        """Shutdown: workers leave at their next wait; the rest are killed."""
        for fd in self.parent_fd:
            os.close(fd)
        workers = self.workers
        workers.update(self.retired)
        wait_until(lambda: _reaped_all(workers), WORKER_GRACE_S, REAP_POLL_S)
        # SIGKILLed: gone within microseconds
        kill_and_reap(list(workers), lambda: _reaped_all(workers), REAP_TIMEOUT_S, REAP_POLL_S)
        for fd in self.pidfds.values():
            os.close(fd)
        for w in range(self.cfg.num_workers):
            self.ctl.reclaim(w)
        self.chan.close()


def _replace_stopped(workers: dict[int, int], since: dict[int, float],
                     replaced: dict[int, float]) -> None:
    """SIGKILL workers stopped for longer than STOPPED_REPLACE_S (their death then
    replaces them): a stopped worker holds its batch and halves the pool silently.
    A stop of the whole process group stops us too, so it is never mistaken for one."""
    now = time.monotonic()
    for pid in workers:
        if pid in replaced:
            continue
        if proc_state(pid) not in STOPPED_STATES:
            since.pop(pid, None)
            continue
        first = since.setdefault(pid, now)
        if now - first >= STOPPED_REPLACE_S:
            replaced[pid] = now - first
            sigkill([pid])


def reaped(pid: int) -> bool:
    """Reap child `pid` if it has exited; whether it is gone (also the fork server's test)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done != 0


def _reaped_all(workers: dict[int, int]) -> bool:
    """Reap the children that exited, dropping them from `workers`; whether none is left."""
    while workers:
        pid, _ = os.waitpid(-1, os.WNOHANG)
        if not pid:
            return False
        workers.pop(pid, None)
    return True


def _death(ctl: _control.Control, w: int, pid: int, status: int, held: int):
    """The report of worker `w`'s death, naming the batch it held (if any)."""
    if held == _control.NO_CLAIM:
        return worker_death(w, pid, status, None, None)
    gen, batch = _control.untag(held)
    info = ctl.gen_info(gen)
    return worker_death(w, pid, status, info.epoch, info.first_batch + batch)


def fork_main(ring_fd: int, chan_fd: int, source: Any, cfg: Config, parent_pid: int,
              pdeathsig: bool, max_workers: int) -> None:
    """Entry point of a forked supervisor (the child side of Pool's fork);
    `max_workers`: the ring's worker records (more than `cfg.num_workers` for an auto
    loader, or with remote builders)."""
    # The source came with the fork: what it holds open stays open (see child_setup).
    child_setup(parent_pid, {ring_fd, chan_fd}, pdeathsig, keep_source_fds=True)
    ring = Ring(cfg.spec, cfg.n_slots, max_workers, fd=ring_fd)
    supervise(ring, chan_fd, [source], cfg, parent_pid)


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def spawn_main() -> None:
    """Entry point of a spawned supervisor (see _interpreter.python_command):
    `python -c ... <SpawnArgs>` (messages.py)."""
    args = SpawnArgs.decode(sys.argv[1:])
    start_from_payload(args.payload_fd, args.ring_fd, args.chan_fd, args.parent_pid, args.parent_pid,
                       args.pdeathsig, source_fds=list(args.source_fds))


def start_from_payload(payload_fd: int, ring_fd: int, chan_fd: int, parent_pid: int,
                       ppid: int, pdeathsig: bool = True, *, source_fds: list[int]) -> None:
    """A supervisor that receives its config as bytes (a `SupervisorStart`, from
    _processes/pool.py) and its source as a parcel (_interpreter.Parcel, descriptors
    `source_fds`): in a fresh interpreter, or forked by the fork server (`ppid`, its
    parent, is then the server; `parent_pid` is always the training process)."""
    with os.fdopen(payload_fd, "rb") as f:
        start = SupervisorStart.decode(f.read())
    child_setup(ppid, {ring_fd, chan_fd, *source_fds}, pdeathsig)
    # Map the ring from its plain geometry first, so that a failure to rebuild the
    # config (which names the user's classes, e.g. a namedtuple in the batch spec) or
    # the source can still be reported to the training process.
    ring = Ring(None, start.n_slots, start.max_workers, fd=ring_fd, slot_bytes=start.slot_bytes)
    try:
        # The training process's modules by reference, from its sys.path; what its
        # __main__ defines came by value (its __main__ is never imported here).
        _interpreter.adopt_process_state(start.cwd, start.environ)
        _interpreter.adopt_sys_path(list(start.sys_path))
        cfg = _interpreter.loads(start.cfg)
        ring.spec = cfg.spec
        source = _interpreter.load_source(source_fds)
    except BaseException as exc:
        ring.write_report(None, StartupFailure(
            "the worker pool could not rebuild the source in its supervisor (forked by the fork "
            f"server, or a fresh interpreter): {type(exc).__name__}: {exc}. It imports the "
            "training process's modules from its sys.path: check that they import there, or "
            "create the Loader before JAX starts."))
        ring.ctl.set_fatal()
        return
    finally:
        _close_all(source_fds)
    held = [source]
    del source
    supervise(ring, chan_fd, held, cfg, parent_pid)


