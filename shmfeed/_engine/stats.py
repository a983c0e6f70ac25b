"""`Stats`: what a Loader has done so far, for programs (fields, `as_dict()`) and for
people (`str(stats)`: a few lines that say what the numbers mean and what to do).

Owns the meaning of the derived numbers (`input_wait_fraction`, `batches_per_s`) and
of the verdict on input wait.  A Stats is a snapshot: the Loader fills a fresh one per
`stats()` call, and nothing here reads the ring.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .._sysinfo import human_bytes, most_useful_workers

# Input wait above this fraction of the loop's time: the loop is input-bound.
INPUT_BOUND_FRACTION = 0.5
# ... below this one: the loader keeps up (the little that is left is taking the batch).
KEEPS_UP_FRACTION = 0.1


def _seconds(s: float) -> str:
    return f"{s:.2f} s" if s < 10 else f"{s:,.1f} s"


@dataclass
class Stats:
    """What the loader has done so far; `input_wait_fraction` near 0 means the
    training loop never waited for data, near 1 that it is input-bound.
    `str(stats)` explains the numbers in a few lines."""

    batches: int = 0
    bytes: int = 0
    wait_s: float = 0.0
    elapsed_s: float = 0.0
    epochs_started: int = 0
    restarts: int = 0
    workers: list[dict] = field(default_factory=list)
    n_slots: int = 0
    slot_bytes: int = 0
    ring_bytes: int = 0
    num_workers: int | None = None  # None: unknown (advice then does not count CPUs)
    cpus: int | None = None  # CPUs this process may use
    # `num_workers="auto"`: the count now and why, in a sentence, and every change
    # (`_autotune.Decision.as_dict()`: epoch, workers, previous, action, why, facts).
    auto: str = ""
    auto_decisions: list[dict] = field(default_factory=list)

    @property
    def input_wait_fraction(self) -> float:
        """Time the loop spent waiting in `next()` over the time since its first batch."""
        return self.wait_s / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def batches_per_s(self) -> float:
        return self.batches / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["workers"] = [dict(w) for w in self.workers]
        d["auto_decisions"] = [dict(a) for a in self.auto_decisions]
        d["input_wait_fraction"] = self.input_wait_fraction
        d["batches_per_s"] = self.batches_per_s
        return d

    def input_wait_verdict(self) -> str:
        """What the input wait fraction means for this loop, and what to do about it."""
        f = self.input_wait_fraction
        if self.batches == 0:
            return "no batch taken yet"
        if f <= KEEPS_UP_FRACTION:
            return "the loader keeps up: more workers would not speed this loop up"
        what = "input-bound: the loop mostly waits for data" if f >= INPUT_BOUND_FRACTION \
            else "partly input-bound"
        if self.num_workers is None or self.cpus is None:
            more = "add workers (`num_workers`)" if f >= INPUT_BOUND_FRACTION \
                else "a few more workers (`num_workers`) may help"
            return f"{what}; {more} or make __getitem__ cheaper"
        most = most_useful_workers(self.cpus)
        if self.auto and self.num_workers < self.cpus:
            return (f"{what}; `num_workers=\"auto\"` adds a worker between epochs while that makes "
                    f"the loop faster (now {self.num_workers}, up to {self.cpus}: the usable CPUs), "
                    "or make __getitem__ cheaper")
        if self.num_workers < most:
            return (f"{what}; more workers may help (`num_workers={self.num_workers}`, at most "
                    f"{most} on {self.cpus} CPUs: one is the loop's), or make __getitem__ cheaper")
        return (f"{what}; the {self.cpus} CPUs are all in use (`num_workers={self.num_workers}` and "
                "the loop), so more workers would not help: make __getitem__ cheaper, or use a "
                "machine with more CPUs")

    def slowest_worker(self) -> dict | None:
        """The worker with the most busy time per batch it built (None before any)."""
        built = [w for w in self.workers if w.get("batches")]
        if not built:
            return None
        return max(built, key=lambda w: w["busy_s"] / w["batches"])

    def __str__(self) -> str:
        lines = [
            f"shmfeed loader: {self.batches:,} batches ({human_bytes(self.bytes)}) in "
            f"{_seconds(self.elapsed_s)} over {self.epochs_started} epoch(s): "
            f"{self.batches_per_s:,.1f} batches/s",
            f"  input wait {self.input_wait_fraction:.2f} of the loop's time "
            f"({_seconds(self.wait_s)}): {self.input_wait_verdict()}",
        ]
        slow = self.slowest_worker()
        if slow is not None and not slow["pid"]:  # num_workers=0: no worker process
            lines.append(f"  built in the training process (`num_workers=0`): "
                         f"{slow['busy_s'] / slow['batches'] * 1e3:.1f} ms per batch")
        elif slow is not None:
            total_busy_s = sum(w["busy_s"] for w in self.workers)
            lines.append(
                f"  workers: {len(self.workers)}, busy {_seconds(total_busy_s)} in all; slowest: worker "
                f"{slow['worker']} (pid {slow['pid']}), {slow['busy_s'] / slow['batches'] * 1e3:.1f} ms "
                f"per batch over {slow['batches']:,} batches")
        if self.auto:
            changes = len(self.auto_decisions) - 1
            lines.append(f"  num_workers=\"auto\": {self.auto} ({changes} change(s) since the start)")
        lines.append(f"  restarts: {self.restarts} dead worker(s) replaced")
        lines.append(f"  ring: {self.n_slots} slots x {human_bytes(self.slot_bytes)} = "
                     f"{human_bytes(self.ring_bytes)} (fixed at construction)")
        return "\n".join(lines)
