"""Ctrl-C around the creation and the stop of shmfeed's processes, and the mark of a
process that shmfeed forked.

Own module so that the pool, the supervisor and the fork server, which all fork, import
it and not each other.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

_in_pool_process = False  # set in every process shmfeed forks: they never start a fork server


def mark_pool_process() -> None:
    """In one of shmfeed's pool processes: no fork server starts here (the one of the
    process we were forked from was dropped at the fork)."""
    global _in_pool_process
    _in_pool_process = True


def in_pool_process() -> bool:
    return _in_pool_process


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

    def __init__(self, past: Any = None):
        # `past`: the code object of the finalizer (`__del__`) this runs in, where a
        # KeyboardInterrupt would be printed and dropped: a Ctrl-C caught meanwhile is
        # raised in the code that runs after that finalizer returns instead.
        self._past = past

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
                if self._past is not None:
                    raise_sigint_after(self._past)
                else:
                    signal.raise_signal(signal.SIGINT)


RETRIP_S = 0.001  # how soon a Ctrl-C held past a finalizer is looked at again


def raise_sigint_after(code: Any) -> None:
    """Deliver a Ctrl-C, caught while a finalizer ran `code`, to the code that runs
    after that finalizer: the SIGINT handler becomes `_PastFinalizer` and another
    thread sends the signal again a moment later (from the main thread it would be
    raised at once, inside the finalizer: `signal.raise_signal`,
    `signal.pthread_kill` and `_thread.interrupt_main` all check for it at once)."""
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is None:
        return
    signal.signal(signal.SIGINT, _PastFinalizer(previous, code))
    _trip_soon()


def _trip_soon() -> None:
    main = threading.main_thread().ident
    assert main is not None

    def trip() -> None:
        time.sleep(RETRIP_S)
        # A real signal, not `_thread.interrupt_main()`: it also wakes a main thread
        # blocked in a system call (a sleep, a wait for a batch).
        signal.pthread_kill(main, signal.SIGINT)

    threading.Thread(target=trip, name="shmfeed-ctrl-c", daemon=True).start()


class _PastFinalizer:
    """A SIGINT handler that hands the signal to `previous` (a KeyboardInterrupt, by
    default) once no frame of `code` is running any more, and meanwhile has it come
    back a moment later."""

    def __init__(self, previous: Any, code: Any):
        self.previous, self.code = previous, code

    def __call__(self, signum: int, frame: Any) -> None:
        f = frame
        while f is not None:
            if f.f_code is self.code:
                _trip_soon()
                return
            f = f.f_back
        signal.signal(signal.SIGINT, self.previous)
        if callable(self.previous):
            self.previous(signum, frame)
        elif self.previous == signal.SIG_DFL:
            signal.raise_signal(signal.SIGINT)
