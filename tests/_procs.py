"""Waiting for processes to go, as the tests that kill pools need it."""

from __future__ import annotations

import time

import psutil


def exited_after(pids: list[int], timeout_s: float, since: float | None = None) -> float | None:
    """Seconds from `since` (default: now) until every pid has exited (a zombie has:
    only its parent, possibly init, still has to reap it), or None past the timeout."""
    t0 = time.monotonic() if since is None else since
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    while time.monotonic() - t0 < timeout_s:
        alive = []
        for p in procs:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        if not alive:
            return time.monotonic() - t0
        procs = alive
        time.sleep(0.005)
    return None
