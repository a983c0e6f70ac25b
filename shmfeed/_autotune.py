"""`num_workers="auto"` and `num_slots="auto"`: what the loader starts with, and how
the worker count follows what the loop measures.

Owns: the start (`start_workers`: one worker per CPU this process may use, at most
START_MAX; the ring for `num_slots="auto"` is `_config.auto_slots`, beside the default it
starts from) and `WorkerTuner`, which turns the facts of each finished epoch (the
loop's wait, the workers' busy time, batches per second) into the worker count of
the next one, each change a `Decision` with its reason, which `stats()` reports.

When it changes what: the worker count only between epochs; nothing mid-epoch.  A new
count is a new pool (the Loader marks the running one stale and `PoolKeeper` starts
one of the new size before the next epoch's first batch: tens of milliseconds by
fork, an interpreter start by spawn), paid at most once per epoch and rarely once the
count settles.  Adding a worker mid-epoch would be safe (claims are dynamic);
removing one would have to hand its claimed batch to another, so neither is done.
The ring (`num_slots`) is sized once, at construction, for the most workers: a new
ring mid-run would invalidate the batches the loop still holds.

Invariants:
- never more workers than the CPUs this process may use (affinity and cgroup quota,
  `_sysinfo.usable_cpus`), never fewer than one; the ring never past
  `memory_budget_bytes`;
- which batches come out never depends on any of this: the order is a keyed function
  of (seed, epoch, position), the same for any worker count (DESIGN.md, invariant 2);
- a change that did not pay (the loop no faster with one more worker, or waiting
  more with fewer) is undone at the next boundary, and the count it came from becomes
  a bound not crossed again: the count settles instead of oscillating.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from . import _sysinfo

# An epoch shorter than this (or with fewer batches) is measured together with the
# next: a few milliseconds of batches say more about the scheduler than the loader.
MIN_WINDOW_S = 0.25
MIN_WINDOW_BATCHES = 16
# The loop waited at least this fraction of the epoch, and the workers were busy at
# least BUSY_MORE of theirs: one more worker can help.
WAIT_MORE = 0.10
BUSY_MORE = 0.70
# Workers busy less than this of their time are more than the loop needs, whether it
# waited (then for a wake-up, not for building) or not: as many as would be busy
# BUSY_TARGET do it (a drop that makes the loop slower is undone).
BUSY_FEWER = 0.50
BUSY_TARGET = 0.75
# One more worker must make the loop at least this much faster to be kept.
GAIN = 1.05
# Workers an auto loader starts with, at most (one per usable CPU up to this); more only
# where the tuner measures that they pay.
START_MAX = 8


def start_workers() -> tuple[int, int, str]:
    """(workers to start with, the most the tuner may run, why): one per usable CPU, at
    most START_MAX, as `shmfeed bench` runs by default.

    Why not one CPU left to the loop: the tuner changes the count only between epochs,
    and an epoch may be the whole run, so the start must already be right for the
    common loop, one that waits on an accelerator (or on a light step) and leaves its
    CPU free.  Measured on 2 CPUs (benchmarks/bench_auto.py): starting at one worker
    ran every workload at about half the best fixed count.  A loop that keeps its CPU
    busy leaves the workers idle part of the time, and the tuner then drops those it
    does not need at the first epoch's end."""
    cpus = _sysinfo.usable_cpus()
    start = min(max(cpus.value, 1), START_MAX)
    return start, max(cpus.value, 1), f"{cpus.value} usable CPU(s) ({cpus.source})"


@dataclass(frozen=True)
class Window:
    """What one or more finished epochs measured, with `workers` workers."""

    workers: int
    seconds: float  # from the first batch taken to the last
    wait_s: float  # of them, waiting in next()
    batches: int
    busy_s: float  # the workers' building time, all together

    @property
    def wait_fraction(self) -> float:
        return self.wait_s / self.seconds if self.seconds > 0 else 0.0

    @property
    def busy_fraction(self) -> float:
        """Each worker's share of the window spent building, on average."""
        return self.busy_s / (self.workers * self.seconds) if self.seconds > 0 else 0.0

    @property
    def batches_per_s(self) -> float:
        return self.batches / self.seconds if self.seconds > 0 else 0.0

    def plus(self, other: Window) -> Window:
        return Window(self.workers, self.seconds + other.seconds, self.wait_s + other.wait_s,
                      self.batches + other.batches, self.busy_s + other.busy_s)


@dataclass(frozen=True)
class Decision:
    """One choice of the worker count: from `epoch` on, `workers` (from `previous`),
    for `why`.  The facts are those of the window it was made from (None at the start)."""

    epoch: int
    workers: int
    previous: int | None
    action: str  # "start", "more", "fewer", "back" (a change undone), "keep"
    why: str
    wait_fraction: float | None = None
    busy_fraction: float | None = None
    batches_per_s: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _pct(f: float) -> str:
    return f"{100 * f:.0f} %"


class WorkerTuner:
    """The worker count of a `num_workers="auto"` loader, epoch after epoch."""

    def __init__(self, start: int, most: int, why: str):
        self.workers = start
        self.most = most  # never more (the CPUs this process may use)
        self.least = 1
        self.history: list[Decision] = [Decision(0, start, None, "start", why)]
        self.last: Decision = self.history[0]  # the latest verdict, a change or not
        self._pending: Window | None = None  # epochs too short to judge, added up
        self._rate: dict[int, float] = {}  # batches/s last measured with each count
        self._changed_from: int | None = None  # the count before the last change, until judged
        self._pending_from: int | None = None  # the first epoch of `_pending`
        self._most_why = f"the {most} CPU(s) this process may use"

    def observe(self, window: Window, next_epoch: int) -> int:
        """Take the facts of a finished epoch; the worker count for `next_epoch`."""
        if window.workers != self.workers or window.seconds <= 0:
            return self.workers  # a window of another pool (a resize raced it): not ours to judge
        w = window if self._pending is None else self._pending.plus(window)
        if w.seconds < MIN_WINDOW_S or w.batches < MIN_WINDOW_BATCHES:
            if self._pending is None:
                self._pending_from = next_epoch - 1
            self._pending = w
            return self.workers
        first = next_epoch - 1 if self._pending is None or self._pending_from is None else self._pending_from
        self._pending, self._pending_from = None, None
        self.last = decision = self._decide(w, next_epoch, first)
        if decision.workers != self.workers:
            self.history.append(decision)
            self.workers = decision.workers
        return self.workers

    def _decide(self, w: Window, epoch: int, first: int) -> Decision:
        n, wait, busy, rate = w.workers, w.wait_fraction, w.busy_fraction, w.batches_per_s
        facts = dict(wait_fraction=wait, busy_fraction=busy, batches_per_s=rate)
        epochs = f"epoch {first}" if first == epoch - 1 else f"epochs {first}-{epoch - 1}"
        seen = f"the loop waited {_pct(wait)} of {epochs} with {n}, workers busy {_pct(busy)}"
        before, self._changed_from = self._changed_from, None
        self._rate[n] = rate
        # Judged while the loop still waits: one that stopped waiting was fed (its own
        # step may have grown meanwhile, which batches/s alone would take for no gain).
        if before is not None and before < n and wait >= WAIT_MORE and rate < GAIN * self._rate[before]:
            self.most, self._most_why = before, f"{n} made the loop no faster"
            return Decision(epoch, before, n, "back", f"{n} made the loop no faster than {before} "
                            f"({rate:,.1f} against {self._rate[before]:,.1f} batches/s)", **facts)
        if before is not None and before < n and rate >= GAIN * self._rate[before]:
            self.least = max(self.least, n)  # more paid: fewer would take it back
        if before is not None and before > n and wait > WAIT_MORE and GAIN * rate < self._rate[before]:
            self.least = before  # fewer cost the loop: not again
            return Decision(epoch, before, n, "back", f"{seen}: slower than with {before} "
                            f"({rate:,.1f} against {self._rate[before]:,.1f} batches/s)", **facts)
        if wait >= WAIT_MORE and busy >= BUSY_MORE and n < self.most:
            self._changed_from = n
            return Decision(epoch, n + 1, n, "more", seen, **facts)
        if busy < BUSY_FEWER and n > self.least:
            fewer = max(self.least, math.ceil(w.busy_s / w.seconds / BUSY_TARGET))
            if fewer < n:
                self._changed_from = n
                return Decision(epoch, fewer, n, "fewer", f"{seen}: {fewer} keep up", **facts)
        limit = (f"; {n} is the most ({self._most_why})"
                 if n >= self.most and wait >= WAIT_MORE and busy >= BUSY_MORE else "")
        return Decision(epoch, n, n, "keep", f"{seen}{limit}", **facts)

    def summary(self) -> str:
        """The count now and why, in a sentence."""
        change = self.history[-1]
        s = f"{change.workers} worker(s)" + ("" if change.action == "start" else f" from epoch {change.epoch}")
        s += f": {change.why}"
        if self.last is not change:
            s += f"; then kept: {self.last.why}"
        return s

    def decisions(self) -> list[dict]:
        return [d.as_dict() for d in self.history]
