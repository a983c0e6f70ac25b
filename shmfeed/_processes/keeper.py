"""A Loader's pool over its life: what `close()` releases (`Resources`), and when and
how a pool starts (`PoolKeeper`): the start-method policy, a new pool in place of one
whose supervisor died or that must be replaced, and the source's new state shipped to
a running pool after an epoch hook (or `source_changed`).  The pool itself, its
processes and its shutdown protocol are in _processes/pool.py.

Invariant: at most one pool runs per loader; `Resources.pool` is it (None with
`num_workers=0`, or while none runs), and the consumer (_consumer.py) reads it there.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from .. import _sysinfo
from .._config import Config
from .._engine.ring import Ring
from .._errors import SourcePickleError, SpecError, WorkerError
from ..sources._stream import GeneratorSource
from . import forkserver as _forkserver
from . import interpreter as _interpreter
from .interrupts import sigint_deferred
from .pool import Pool

log = logging.getLogger("shmfeed")

_said_spawn = False


class Resources:
    """Everything `close()` must release, kept apart from the Loader so that the
    finalizer holds no reference to it."""

    def __init__(self, ring: Ring):
        self.ring = ring
        self.pool: Pool | None = None
        self.pool_stale = False  # the pool must be replaced (its supervisor died, or auto changed its size)
        self.source_stale = False  # the workers' copy of the source is out of date
        self.owner_pid = os.getpid()
        self.callbacks: list = []  # run once at close, before the ring goes
        self.files = _interpreter.FileTable()  # the files the source maps, sent to pools

    def stop_pool(self) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.stop()

    def close(self) -> None:
        """Stop the pool, run the callbacks, release the ring: each step runs even if
        one before it failed, and the first failure is raised after the last step."""
        if os.getpid() != self.owner_pid:  # a forked copy owns nothing
            return
        failures: list[BaseException] = []
        try:
            if not self.ring.closed:
                self.ring.ctl.shutdown()  # wakes a thread waiting in the ring, pool or not
            self.stop_pool()
        except BaseException as exc:  # noqa: B036 - reported once the rest is released
            failures.append(exc)
        callbacks, self.callbacks = self.callbacks, []
        for fn in reversed(callbacks):
            try:
                fn()
            except Exception:  # one failing callback must not keep the rest from running
                log.exception("shmfeed: a close callback raised")
        try:
            self.ring.close()
        except BaseException as exc:  # noqa: B036
            failures.append(exc)
        self.files.close()
        if failures:
            raise failures[0]


class PoolKeeper:
    """Starts and replaces the pool of one Loader (with `num_workers > 0`)."""

    def __init__(self, res: Resources, ring: Ring, cfg: Config, source: Any):
        self.res, self.ring, self.cfg, self.source = res, ring, cfg, source

    def before_epoch(self) -> None:
        """Have a pool that can run the next epoch: a new one in place of one that died
        or must be replaced, else the source's new state sent to the running one."""
        if self.res.pool_stale or self.died():
            self.res.stop_pool()
            self.start()
        elif self.res.source_stale:
            self.send_source()

    def start(self) -> None:
        """Start a pool by the start method the loader asked for, or, for "auto", the
        one this process allows now (fork unless an accelerator runtime runs here)."""
        method = self.cfg.start_method
        why = _sysinfo.accelerator_in_use()
        if method == "auto":
            method = "fork" if not why else "forkserver" if _forkserver.running() else "spawn"
            global _said_spawn
            if method == "spawn" and not _said_spawn:
                _said_spawn = True
                log.warning(
                    "shmfeed: %s is running in this process and fork() would copy its locks; "
                    "starting workers from a fresh interpreter instead (the source is pickled once, "
                    "and the interpreter imports what it needs). Create the Loader before the first "
                    "JAX computation to fork directly, or `import shmfeed.jax` (or `shmfeed.keras`, "
                    "or call `shmfeed.start_fork_server()`) before it to start workers from a copy "
                    "of this process taken then, in milliseconds.", why)
        elif method == "forkserver" and not _forkserver.start():
            raise SpecError(
                "`start_method='forkserver'` needs a fork server, and none runs in this process or "
                f"can start now: {_forkserver.cannot_start()}. Call `shmfeed.start_fork_server()` "
                "(or `import shmfeed.jax` / `shmfeed.keras`) before JAX starts, or use "
                "`start_method='auto'`.")
        parcel = None
        if method != "fork":
            asked = f"`start_method={method!r}` was asked"
            if isinstance(self.source, GeneratorSource):
                self.source.check_sendable(why or asked)
            parcel = _interpreter.dump_source(
                self.source, f"{why} is running in this process" if why else asked, self.res.files)
        try:
            self.ring.ctl.reopen()
            with sigint_deferred():  # a Ctrl-C meanwhile is raised once the pool is registered
                self.res.pool = Pool(self.ring, self.source, self.cfg, method, parcel)
                self.res.pool_stale = self.res.source_stale = False
        finally:
            if parcel is not None:  # the pool's supervisor has its own hold on it now
                parcel.close()

    def died(self) -> bool:
        """Whether the pool's supervisor died since the last epoch (nothing waited on
        it meanwhile to notice): said once, and the next epoch starts a new pool.  Not a
        pool that gave up (`max_restarts`): that one ends every epoch with its report,
        whether its supervisor has exited yet or not; a new pool would quietly reset
        the restart budget."""
        pool = self.res.pool
        ended = pool.poll() if pool is not None else None
        if ended is not None and self.ring.ctl.fatal:
            return False
        if pool is not None and ended is not None:
            log.warning("shmfeed: the worker pool's supervisor (pid %d) %s between epochs; "
                        "starting a new pool", pool.pid, ended)
        return ended is not None

    def send_source(self) -> None:
        """Give the running pool the source's new state: its supervisor re-forks the
        workers (no interpreter start, no import), in any start mode."""
        pool = self.res.pool
        assert pool is not None
        try:
            parcel = _interpreter.dump_source(self.source, f"its state changed (an epoch hook ran) "
                                              f"and the pool was started by {pool.start_method}",
                                              self.res.files)
        except SourcePickleError:
            if pool.start_method != "fork":
                raise
            # A source that does not pickle can still be forked: a new pool, from here.
            self.res.stop_pool()
            self.start()
            return
        try:
            pool.update_source(parcel)
        except WorkerError:
            self.res.pool_stale = True
            raise
        finally:
            parcel.close()
        self.res.source_stale = False
