"""A loader's configuration: every option validated once, into one frozen object that
the training process, the supervisor and the builders all read.

Owns: the checks of options that go together (each option is declared, with its own
check, in _options.py; each error names the parameter, what it got and what it
needs), the probe of the source's first item that infers the batch spec, and the
ring's geometry (`n_slots`), including `memory_budget_bytes`, which bounds
everything the ring allocates (slots, report areas and control block), and what
`num_workers="auto"`/`num_slots="auto"` start with (the tuning is _autotune.py's).

Invariants:
- A `Config` is immutable and picklable; nothing derived from it is stored twice.
- Building one leaves the training process's global RNGs as they were.
"""

from __future__ import annotations

import logging
import os
import resource
from dataclasses import dataclass
from typing import Any

from . import _autotune, _sysinfo
from ._batch import build as _build
from ._batch.pad import Padding
from ._batch.pad import plan as plan_padding
from ._batch.spec import Spec, infer, with_rows
from ._engine.ring import ring_bytes
from ._errors import RingMemoryError, SpecError
from ._options import AUTO, MAX_SLOTS, LoaderOptions, check_int
from ._order import rng as _rng
from ._order.bucket import BucketedOrder, BudgetOrder, item_buckets
from ._order.order import Order

log = logging.getLogger("shmfeed")

MAX_BATCHES = 0xFFFFFFFF  # batch numbers are the low 32 bits of a tag; this one is reserved


@dataclass(frozen=True)
class Config:
    order: Order
    spec: Spec
    n_slots: int
    num_workers: int
    max_restarts: int
    seed_global_rngs: bool
    timeout_s: float | None
    start_method: str
    padding: Padding | None = None  # padded_shapes and what goes with them (_batch/pad.py)
    worker_nice: int = 0  # added to the workers' nice value
    # fn(batch) -> batch, run by the builder; `spec` is then its result's (probed on
    # batch 0) and `built_spec` the batch's before it (a builder's scratch slot).
    batch_transform: Any = None
    built_spec: Spec | None = None
    # `num_workers="auto"`: the most workers the loader may run on CPU-bound building
    # (the usable CPUs; 0: `num_workers` is fixed; blocked workers may go past it, up to
    # `_autotune.most_workers`), and why it starts with `num_workers` (_autotune.py).
    auto_workers: int = 0
    auto_why: str = ""

    @property
    def max_workers(self) -> int:
        """Worker records in the control block (the in-process builder uses one; an
        auto loader one for each worker it may run)."""
        return worker_records(self.num_workers, self.auto_workers)

    @property
    def ring_bytes(self) -> int:
        return ring_bytes(self.n_slots, self.max_workers, self.spec.slot_bytes)


def check_token_budget(value: Any, batch_size: Any, boundaries: tuple[int, ...] | None) -> int:
    """`token_budget`: an int >= the largest bucket length, with buckets and no `batch_size`."""
    budget = check_int("token_budget", value, 1)
    if boundaries is None:
        raise SpecError("`token_budget` sizes each length bucket's batches (`token_budget // boundary` rows): "
                        "give `bucket_boundaries` and `bucket_lengths` too")
    if batch_size is not None:
        raise SpecError(f"`token_budget={budget}` sets each bucket's batch size (`token_budget // boundary` "
                        f"rows): give `batch_size=None` instead of `batch_size={batch_size}`")
    if budget < boundaries[-1]:
        raise SpecError(f"`token_budget={budget}` is smaller than the bucket length {boundaries[-1]} (the "
                        "largest of `bucket_boundaries`): a batch of that bucket would have no row. Raise "
                        f"`token_budget` to >= {boundaries[-1]}, or lower the largest boundary.")
    return budget


def worker_records(num_workers: int, auto_workers: int) -> int:
    """Worker records the control block needs (`Config.max_workers`): one for the
    in-process builder at least, and for an auto loader every worker it may ever run."""
    return max(num_workers, _autotune.most_workers(auto_workers) if auto_workers else 0, 1)


def build(source: Any, options: LoaderOptions) -> Config:
    """Check the Loader's options (each on its own: _options.py; here, those that go
    together), probe the source, size the ring."""
    if not (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
        raise SpecError(f"`source` must have __len__ and __getitem__, or be a generator, an iterable "
                        f"or a function returning one (with `steps_per_epoch`); got {type(source).__name__}")
    o = options.checked()
    batch_size, seed = o.batch_size, o.seed
    num_workers, auto_workers, auto_why = _start_workers(source, o.num_workers)
    assert seed is not None  # the check resolves None
    shard_index, shard_count, shuffle = o.shard_index, o.shard_count, o.shuffle
    boundaries: tuple[int, ...] | None = o.bucket_boundaries
    token_budget = o.token_budget
    if token_budget is not None:
        token_budget = check_token_budget(token_budget, batch_size, boundaries)
        assert boundaries is not None  # checked there
        batch_size = token_budget // boundaries[0]  # bucket 0's batches are the largest: a slot's rows
    if shard_index >= shard_count:
        raise SpecError(f"`shard_index` must be < `shard_count` ({shard_count}), got {shard_index}")
    cpus = _sysinfo.usable_cpus().value
    if num_workers > cpus:
        log.warning(
            "shmfeed: num_workers=%d is more than the %d CPUs this process may use: the workers "
            "will take turns on them and slow the training loop down. Use at most %d.",
            num_workers, cpus, _sysinfo.most_useful_workers(cpus))

    n_items = len(source)
    if n_items == 0:
        raise SpecError("the source is empty (len(source) == 0): there is nothing to load")
    if boundaries is not None and batch_size is not None:
        if o.bucket_lengths is None:
            raise SpecError("`bucket_boundaries` needs `bucket_lengths`: each sample's length (a sequence "
                            "of len(source) ints, or a function of the index), to group samples by it")
        if hasattr(type(source), "_shmfeed_builder"):
            raise SpecError("`bucket_boundaries` regroups samples by index, and a stream (a generator or "
                            "a `Stream`) is read in its own order: pad to fixed shapes (no None in "
                            "`padded_shapes`), or give a source read by index")
        buckets = item_buckets(o.bucket_lengths, n_items, boundaries)
        order: Order
        if token_budget is not None:
            order = BudgetOrder(n_items, batch_size, shuffle, seed, o.drop_last, shard_index, shard_count,
                                o.shuffle_block, boundaries=boundaries, buckets=buckets, token_budget=token_budget)
        else:
            order = BucketedOrder(n_items, batch_size, shuffle, seed, o.drop_last, shard_index,
                                  shard_count, o.shuffle_block, boundaries=boundaries, buckets=buckets)
    elif boundaries is not None and shard_count > 1:
        raise SpecError(
            f"`bucket_boundaries` with a batch-level source and `shard_count={shard_count}`: each host's "
            "batch would take its own bucket, and the hosts of one step need the same shapes. Pad to "
            "fixed shapes (no None in `padded_shapes`), or use a per-sample source with `bucket_lengths`.")
    elif o.bucket_lengths is not None:
        raise SpecError("`bucket_lengths` is for grouping samples by length: give `bucket_boundaries` "
                        "too" if boundaries is None else
                        "`bucket_lengths` is for per-sample sources: a batch-level source's batch "
                        "takes the smallest bucket that holds it")
    else:
        # Order checks `shuffle` and `shuffle_block` (it knows the modes).
        order = Order(n_items, batch_size, shuffle, seed, o.drop_last, shard_index, shard_count, o.shuffle_block)
    order.check_not_empty()
    if order.n_batches >= MAX_BATCHES:
        raise SpecError(
            f"an epoch of {order.n_batches} batches: batch numbers are 32-bit, so an epoch holds "
            f"fewer than {MAX_BATCHES}. Raise `batch_size` (now {batch_size}).")
    spec = probe(source, order, o.seed_global_rngs)
    spec, padding = plan_padding(spec, o.padded_shapes, o.padding_values, o.with_lengths, boundaries,
                                 order.first_item(),
                                 order.bucket_rows if isinstance(order, BudgetOrder) else None)
    if o.max_batch_rows is not None:
        if not spec.batch_level:
            raise SpecError("`max_batch_rows` is for batch-level sources (`batch_size=None`)")
        spec = with_rows(spec, check_int("max_batch_rows", o.max_batch_rows, spec.rows))
    built_spec = None
    if o.batch_transform is not None:
        if boundaries is not None:
            raise SpecError("`batch_transform` with `bucket_boundaries`: each bucket's batch has its own "
                            "shapes, and a transform's result is probed once. Pad to fixed shapes, or "
                            "transform inside `__getitem__`.")
        if hasattr(type(source), "_shmfeed_builder"):
            raise SpecError("`batch_transform` is not supported for a stream (a generator or a `Stream`) "
                            "yet: probing it would read the stream. Transform inside the stream.")
        pre = Config(order=order, spec=spec, n_slots=2, num_workers=0, max_restarts=0,
                     seed_global_rngs=o.seed_global_rngs, timeout_s=None, start_method="auto", padding=padding)
        built_spec, spec = spec, _build.probe_transform(source, pre, o.batch_transform)

    max_workers = worker_records(num_workers, auto_workers)
    num_slots: int
    if o.num_slots == AUTO:
        # The ring of the workers it starts with: an auto loader starts exactly where
        # one given that `num_workers` does (2 CPUs, `windows`: 32 slots either way).
        num_slots = auto_slots(num_workers, max_workers, spec.slot_bytes, o.memory_budget_bytes)
        if o.memory_budget_bytes is not None and ring_bytes(num_slots, max_workers, spec.slot_bytes) > \
                o.memory_budget_bytes:
            need = ring_bytes(2, max_workers, spec.slot_bytes)
            raise SpecError(
                f"`memory_budget_bytes={o.memory_budget_bytes}` cannot hold 2 slots of {spec.slot_bytes} "
                f"bytes with the control block of {max_workers} worker(s) (`num_slots=\"auto\"`). "
                f"Raise it to >= {need}.")
    elif o.num_slots is not None:
        if o.memory_budget_bytes is not None:
            raise SpecError("give `num_slots` or `memory_budget_bytes`, not both")
        assert isinstance(o.num_slots, int)
        num_slots = o.num_slots
    elif o.memory_budget_bytes is not None:
        budget = o.memory_budget_bytes
        num_slots = slots_within(budget, max_workers, spec.slot_bytes)
        if num_slots < 2:
            need = ring_bytes(2, max_workers, spec.slot_bytes)
            raise SpecError(
                f"`memory_budget_bytes={budget}` holds {num_slots} slot(s) of {spec.slot_bytes} "
                f"bytes with their control block; at least 2 are needed. Raise it to >= {need}.")
    else:
        num_slots = default_num_slots(num_workers, spec.slot_bytes)
    check_memory(ring_bytes(num_slots, max_workers, spec.slot_bytes), num_slots, spec.slot_bytes)
    return Config(order=order, spec=spec, n_slots=num_slots, num_workers=num_workers,
                  max_restarts=o.max_restarts, seed_global_rngs=o.seed_global_rngs,
                  timeout_s=o.timeout_s, start_method=o.start_method, padding=padding, worker_nice=o.worker_nice,
                  batch_transform=o.batch_transform, built_spec=built_spec,
                  auto_workers=auto_workers, auto_why=auto_why)


def _start_workers(source: Any, num_workers: int | str) -> tuple[int, int, str]:
    """(workers to start, the most an auto loader may run (0: fixed), why) for the
    `num_workers` asked.  A stream is read in order by one process per shard: "auto"
    is then a fixed count (1 for a generator; a `Stream`'s is resolved before its
    shards are dealt out, by the Loader)."""
    if num_workers != AUTO:
        assert isinstance(num_workers, int)
        return num_workers, 0, ""
    if hasattr(type(source), "_shmfeed_builder"):  # a generator: one process reads it
        return 1, 0, ""
    return _autotune.start_workers()


def check_memory(nbytes: int, n_slots: int, slot_bytes: int) -> None:
    """Refuse a ring this process could not map, or could not fill without being
    killed: over `RLIMIT_AS`, or over the memory the machine or its cgroup has left."""
    why = memory_shortfall(nbytes)
    if why is not None:
        raise RingMemoryError(
            f"the ring needs {nbytes} bytes ({nbytes / 2**20:.1f} MiB: {n_slots} slots of "
            f"{slot_bytes} bytes, with their control block), but {why}. Lower `num_slots` or pass "
            "a smaller `memory_budget_bytes` (or a smaller batch), or give the process more memory.")


def memory_shortfall(nbytes: int) -> str | None:
    """Why `nbytes` more cannot be allocated in this process now (the limit that refuses
    it, with its numbers), or None when they can.  Arithmetic and a few small reads."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        with open("/proc/self/statm") as f:
            vm_bytes = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        if vm_bytes + nbytes > soft:
            return (f"RLIMIT_AS (`ulimit -v`) is {soft} bytes and {vm_bytes} are already in use by "
                    "this process's address space")
    # The ring's pages are charged as they are first written, within the first epoch:
    # a ring beyond what is left would have the OOM killer end the run minutes later.
    headroom = _sysinfo.memory_headroom_bytes()
    if headroom.value is not None and nbytes > headroom.value:
        return (f"only {headroom.value} bytes ({headroom.value / 2**20:.1f} MiB) can be allocated now "
                f"({headroom.source})")
    return None


SMALL_RING_BYTES = 8 << 20  # a ring of small batches is given at least this much


def default_num_slots(num_workers: int, slot_bytes: int) -> int:
    """The ring's size when neither `num_slots` nor `memory_budget_bytes` is given.

    Each worker one slot in progress and one ready, plus the batch the loop still
    holds and two for a device prefetch: `2 * num_workers + 4`.  Small batches get
    more, up to 4x that while the slots fit in SMALL_RING_BYTES: a batch built in
    microseconds is consumed in microseconds too, and a sleeping worker is woken only
    once half the ring waits for it, so a deeper ring is what lets a worker's wake-up
    (tens of us on a busy machine) pass before the loop runs dry (2 workers on 2
    cores, medians of 4 alternating rounds, benchmarks/RESULTS.md: arrays of 32x512
    int32 rows 0.90x in-process `x[idx]` with 8 slots, 0.94x with 32; per-sample rows
    of the same size 1.70x -> 1.90x).  Building in the training process, the ring only
    holds what the loop keeps: no more."""
    base = 2 * num_workers + 4
    if num_workers == 0:
        return base
    return max(base, min(4 * base, SMALL_RING_BYTES // max(slot_bytes, 1)))


# At most this share of the memory free now goes to a ring sized by `num_slots="auto"`.
AUTO_HEADROOM_SHARE = 0.5


def auto_slots(workers: int, worker_records: int, slot_bytes: int, budget_bytes: int | None) -> int:
    """`num_slots="auto"`: the default for `workers` (`default_num_slots`), but no
    more than `budget_bytes` holds, nor than AUTO_HEADROOM_SHARE of the memory free
    now; at least 2 (the caller's checks then say what refuses even that)."""
    n = default_num_slots(workers, slot_bytes)
    if budget_bytes is not None:
        n = min(n, slots_within(budget_bytes, worker_records, slot_bytes))
    headroom = _sysinfo.memory_headroom_bytes().value
    if headroom is not None:
        n = min(n, slots_within(int(headroom * AUTO_HEADROOM_SHARE), worker_records, slot_bytes))
    return max(n, 2)


def slots_within(budget_bytes: int, max_workers: int, slot_bytes: int) -> int:
    """The most slots whose whole ring (see `ring_bytes`) fits `budget_bytes`."""
    hi = min(budget_bytes // slot_bytes, MAX_SLOTS)
    lo = 0
    while lo < hi:  # ring_bytes grows with n: bisect for the largest n that fits
        mid = (lo + hi + 1) // 2
        if ring_bytes(mid, max_workers, slot_bytes) <= budget_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo


class _Peeked:
    """A stream as the probe reads it: any index is its first item, which the stream
    keeps to hand out first."""

    def __init__(self, peek: Any):
        self._peek = peek

    def __getitem__(self, index: int) -> Any:
        return self._peek()


def probe(source: Any, order: Order, seed_global: bool) -> Spec:
    """Infer the spec from the first item of epoch 0, leaving global RNGs as they were."""
    peek = getattr(source, "_shmfeed_peek", None)  # a stream: its first item, kept
    index = 0 if peek is not None else order.first_item()
    item_of = source if peek is None else _Peeked(peek)
    first = _rng.build_sample(item_of, index, seed=order.seed, epoch=0, batch=0 if seed_global else None)
    return infer(first, rows=order.batch_size, index=index)
