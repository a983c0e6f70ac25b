"""`num_workers="auto"` and `num_slots="auto"`: what the loader starts with, and how
the worker count follows what the loop measures.

Owns: the start (`start_workers`: one worker per CPU this process may use, at most
START_MAX; the ring for `num_slots="auto"` is `_config.auto_slots`: the default ring of
the workers it starts with, so that an auto loader starts exactly where one with that
`num_workers` does) and `WorkerTuner`, which turns the facts of each finished epoch
(the loop's wait, the workers' busy time, batches per second, and the workers' time
on a CPU and waiting for one, read from /proc at a window's ends: `sched_times`) into the
worker count of the next one, each change a `Decision` with its reason, which
`stats()` reports.  Nothing of it runs per batch.

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
  `_sysinfo.usable_cpus`) for building that needs a CPU: one more than that only
  where the workers were blocked part of their building time (neither on a CPU nor
  waiting for one) so that one more, as busy, needs no more CPUs than there are, and
  never more than BLOCKED_WORKERS_PER_CPU per CPU; never fewer than one; the ring
  never past `memory_budget_bytes`;
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
# Workers busy less than this of their time (not counting their wait for a CPU), while
# the loop hardly waited (less than WAIT_MORE), are more than the loop needs: as many
# as would be busy BUSY_TARGET do it (a drop that makes the loop slower is undone).
# A loop that waits on idle workers (busy less than BUSY_FEWER) waits for a wake-up, not
# for building: one worker fewer may make it wait longer (measured on `windows`, 2 CPUs,
# batches of microseconds: the loop waited 32 % of its time with 2 workers busy 28 %,
# 58 % with 1), or leave it a CPU of its own and deliver more (the same workload and
# arrays-tokens, runs of 3 s: 1 worker 5-15 % more batches/s than 2).  So it is tried
# once, and taken back at the next verdict unless the loop got batches at least as fast.
BUSY_FEWER = 0.50
BUSY_TARGET = 0.75
# One more worker must make the loop at least this much faster to be kept.
GAIN = 1.05
# Workers an auto loader starts with, at most (one per usable CPU up to this); more only
# where the tuner measures that they pay.
START_MAX = 8
# Past the usable CPUs, a worker is added only where the workers spend part of their
# building time off a CPU without waiting for one (blocked: a disk, page faults, a
# lock), so that one more of them, as busy, would still need no more CPUs than there
# are; at most this many per usable CPU (the ring has a worker record for each).
BLOCKED_WORKERS_PER_CPU = 2


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


def most_workers(cpus: int) -> int:
    """The most workers an auto loader may ever run with `cpus` usable CPUs, the
    blocked ones included (the ring's worker records)."""
    return BLOCKED_WORKERS_PER_CPU * max(cpus, 1)


def sched_times(pids: list[int]) -> dict[int, tuple[float, float]]:
    """pid -> (seconds on a CPU, seconds runnable but waiting for one) since it started,
    from /proc/<pid>/schedstat (nanoseconds); a pid that cannot be read is left out.
    Read at a tuner window's two ends only: never a cost per batch."""
    out = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/schedstat") as f:
                on_cpu, queued = f.read().split()[:2]
        except (OSError, ValueError):
            continue
        out[pid] = (int(on_cpu) / 1e9, int(queued) / 1e9)
    return out


@dataclass(frozen=True)
class Window:
    """What one or more finished epochs measured, with `workers` workers."""

    workers: int
    seconds: float  # from the first batch taken to the last
    wait_s: float  # of them, waiting in next()
    batches: int
    busy_s: float  # the workers' building time, all together
    # Of the workers' time, all together: on a CPU, and runnable but waiting for one
    # (None: not known, e.g. no /proc/<pid>/schedstat).  Read at a window's two ends
    # only (`WorkerTuner.window_starts`, `judges`): the last epoch of a window that adds
    # up several carries the account of them all.
    cpu_s: float | None = None
    queued_s: float | None = None

    @property
    def blocked_fraction(self) -> float | None:
        """Of the workers' building time, the share spent neither on a CPU nor waiting
        for one: blocked on something one more worker could overlap."""
        if self.cpu_s is None or self.queued_s is None or self.busy_s <= 0:
            return None
        return min(max(1.0 - (self.cpu_s + self.queued_s) / self.busy_s, 0.0), 1.0)

    @property
    def queued_fraction(self) -> float | None:
        """Of the workers' building time, the share spent runnable but waiting for a CPU
        (a machine busy with other work stretching the builds)."""
        if self.queued_s is None or self.busy_s <= 0:
            return None
        return min(self.queued_s / self.busy_s, 1.0)

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
                      self.batches + other.batches, self.busy_s + other.busy_s,
                      other.cpu_s, other.queued_s)


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
    blocked_fraction: float | None = None  # of the workers' building time (Window.blocked_fraction)
    queued_fraction: float | None = None  # of it, waiting for a CPU (Window.queued_fraction)

    def as_dict(self) -> dict:
        return asdict(self)


def _pct(f: float) -> str:
    return f"{100 * f:.0f} %"


class WorkerTuner:
    """The worker count of a `num_workers="auto"` loader, epoch after epoch."""

    def __init__(self, start: int, most: int, why: str, ceiling: int | None = None):
        self.workers = start
        self.cpus = most
        self.most = most  # never more (the CPUs this process may use), but for blocked workers
        self.ceiling = most if ceiling is None else max(ceiling, most)  # never more at all
        self.least = 1
        self.history: list[Decision] = [Decision(0, start, None, "start", why)]
        self.last: Decision = self.history[0]  # the latest verdict, a change or not
        self._pending: Window | None = None  # epochs too short to judge, added up
        self._rate: dict[int, float] = {}  # batches/s last measured with each count
        self._changed_from: int | None = None  # the count before the last change, until judged
        self._tried_fewer: int | None = None  # the count one fewer than which was tried (once)
        self._pending_from: int | None = None  # the first epoch of `_pending`
        self._most_why = f"the {most} CPU(s) this process may use"

    @property
    def window_starts(self) -> bool:
        """Whether the next epoch starts a window (no shorter epochs wait to be added to)."""
        return self._pending is None

    def judges(self, window: Window) -> bool:
        """Whether `observe(window)` decides (the window it closes is long enough)."""
        w = window if self._pending is None else self._pending.plus(window)
        return w.seconds >= MIN_WINDOW_S and w.batches >= MIN_WINDOW_BATCHES

    def observe(self, window: Window, next_epoch: int) -> int:
        """Take the facts of a finished epoch; the worker count for `next_epoch`."""
        if window.workers != self.workers or window.seconds <= 0:
            return self.workers  # a window of another pool (a resize raced it): not ours to judge
        w = window if self._pending is None else self._pending.plus(window)
        if not self.judges(window):
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
        facts = dict(wait_fraction=wait, busy_fraction=busy, batches_per_s=rate,
                     blocked_fraction=w.blocked_fraction, queued_fraction=w.queued_fraction)
        epochs = f"epoch {first}" if first == epoch - 1 else f"epochs {first}-{epoch - 1}"
        seen = f"the loop waited {_pct(wait)} of {epochs} with {n}, workers busy {_pct(busy)}"
        before, self._changed_from = self._changed_from, None
        self._rate[n] = rate
        # Judged while the loop still waits: one that stopped waiting was fed (its own
        # step may have grown meanwhile, which batches/s alone would take for no gain).
        if before is not None and before < n and wait >= WAIT_MORE and rate < GAIN * self._rate[before]:
            self.most, self._most_why = min(self.most, before), f"{n} made the loop no faster"
            self.ceiling = before
            return Decision(epoch, before, n, "back", f"{n} made the loop no faster than {before} "
                            f"({rate:,.1f} against {self._rate[before]:,.1f} batches/s)", **facts)
        if before is not None and before < n and rate >= GAIN * self._rate[before]:
            self.least = max(self.least, n)  # more paid: fewer would take it back
        tried = before is not None and before > n and self._tried_fewer == before
        if before is not None and before > n and (
                rate < self._rate[before] if tried else wait > WAIT_MORE and GAIN * rate < self._rate[before]):
            self.least = before  # fewer cost the loop: not again
            return Decision(epoch, before, n, "back", f"{seen}: slower than with {before} "
                            f"({rate:,.1f} against {self._rate[before]:,.1f} batches/s)", **facts)
        if wait >= WAIT_MORE and busy >= BUSY_MORE and n < self.most:
            self._changed_from = n
            return Decision(epoch, n + 1, n, "more", seen, **facts)
        beyond = self._beyond_cpus(w) if wait >= WAIT_MORE and busy >= BUSY_MORE else None
        if beyond is not None:
            self._changed_from = n
            return Decision(epoch, n + 1, n, "more", f"{seen}{beyond}", **facts)
        # Of the busy time, what the building took: not the time spent waiting for a CPU
        # (a machine busy with other work stretches a build without needing a worker more).
        work_s = max(w.busy_s - (w.queued_s or 0.0), 0.0)
        idle = work_s < BUSY_FEWER * n * w.seconds
        if wait >= WAIT_MORE and idle and n > self.least and self._tried_fewer is None:
            self._tried_fewer = self._changed_from = n
            return Decision(epoch, n - 1, n, "fewer", f"{seen}: the loop waits on idle workers, "
                            f"so {n - 1} is tried (taken back if the loop gets batches slower)", **facts)
        if idle and wait < WAIT_MORE and n > self.least:
            fewer = max(self.least, math.ceil(work_s / w.seconds / BUSY_TARGET))
            if fewer < n:
                queued = f" ({_pct(w.queued_fraction)} of it waiting for a CPU)" if w.queued_fraction else ""
                self._changed_from = n
                return Decision(epoch, fewer, n, "fewer", f"{seen}{queued}: {fewer} keep up", **facts)
        limit = ""
        if n >= self.most and wait >= WAIT_MORE and busy >= BUSY_MORE:
            blocked = w.blocked_fraction
            limit = f"; {n} is the most ({self._most_why}" + (
                ")" if blocked is None or n >= self.ceiling else
                f", and the workers were blocked only {_pct(blocked)} of their building time)")
        return Decision(epoch, n, n, "keep", f"{seen}{limit}", **facts)

    def _beyond_cpus(self, w: Window) -> str | None:
        """Why one more worker than the CPUs pays, if it does: the workers were blocked
        part of their building time (off a CPU, not waiting for one), and one more,
        as busy, would still need no more CPUs than this process may use."""
        n, blocked = w.workers, w.blocked_fraction
        if n < self.most or n >= self.ceiling or blocked is None:
            return None
        need = (n + 1) * w.busy_fraction * (1.0 - blocked)
        if need > self.cpus:
            return None
        return (f", blocked {_pct(blocked)} of their building time: {n + 1} would need {need:.1f} "
                f"of the {self.cpus} CPU(s)")

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
