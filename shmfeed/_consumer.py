"""The consumer's epoch protocol: taking one epoch's batches from the ring, in order,
in the training process.

Owns: opening a generation for an epoch (or the rest of one, on resume), the fast
take and the slow take (health checks of the pool while waiting, the ring-full
check, which first waits for what lets go of batches by itself: JAX's steps in
flight and its deferred release, _jaxrefs.py; the timeout and the worker it kills),
turning a slot into the batch's
arrays (views of the `SlotRef` that the take returns, which gives the slot back
when they all die), and, with `num_workers=0`, building each batch here just
before taking it.

Invariants (see DESIGN.md):
1. each batch of an epoch is delivered exactly once, in batch order;
2. an epoch the loop leaves early (break, an exception, the iterator dropped) is
   given up at once, in C (`EpochGuard`), so its slots come back;
3. every wait is a slice of `TAKE_SLICE_S` followed by a liveness check;
4. `timeout_s` counts from when the pool's first worker runs (`STARTUP_TIMEOUT_S`
   bounds the start before it).
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil

from . import _jaxrefs
from ._batch.build import LeaveBuild, build_batch, builder_for
from ._batch.spec import unflatten
from ._config import Config
from ._engine.control import NO_CLAIM, PoolShutdown, RingBlocked, SlotState, Taken, tag, untag
from ._engine.report import STOPPED_STATES, proc_state
from ._engine.ring import Ring
from ._errors import LoaderClosedError, RingFullError, ShmfeedError, WorkerError, internal
from ._order import bucket as _bucket
from ._order import rng as _rng

TAKE_SLICE_S = 0.1  # how often a waiting consumer checks the pool's health
# Every slot held: how often to look again while JAX computes (doubling up to the max),
# and how long a finished computation's arguments may take to be released.
RELEASE_POLL_S = 0.0005
MAX_RELEASE_POLL_S = 0.004
JAX_RELEASE_S = 0.05
QUICK_RELEASE_S = 0.1  # looking again only, before asking JAX what it still computes
MAX_SLICE_S = 2 * TAKE_SLICE_S  # a slice counts this much at most towards `timeout_s`
# A pool starting in a fresh interpreter imports the training process's modules and
# unpickles the source (a big in-memory dataset: seconds to minutes) before any worker
# exists; that is not a stuck worker, so it does not count towards `timeout_s`, only
# towards this much longer bound.
STARTUP_TIMEOUT_S = 600.0
_NO_DATA = object()  # a sharded stream's batch of a shard that has ended


class Consumer:
    """Takes batches from the ring for one Loader.  `resources.pool` is the running
    pool (None with `num_workers=0`, or while none runs)."""

    def __init__(self, ring: Ring, cfg: Config, resources: Any, source: Any, stats: Any,
                 build_here: bool = True):
        self.ring = ring
        self.cfg = cfg
        self.res = resources
        self.stats = stats
        self.gen = 0
        self.first_batch = 0  # of the current generation, in its epoch
        self.next_slot = 0
        self.delivered = 0  # batches of the current epoch handed to the loop
        # With `num_workers=0` batches are built here, unless remote builders do.
        self.builder = builder_for(source, cfg, ring) if cfg.num_workers == 0 and build_here else None
        self.row_bytes = cfg.spec.row_bytes  # a batch without a bucket: rows x this
        self.t_first: float | None = None
        # (time, stats' wait_s, stats' batches, the workers' busy seconds) once the
        # current epoch's first batch is taken: what an auto loader measures from.
        self.epoch_mark: tuple[float, float, int, float] | None = None
        self.on_mark: Callable[[], None] | None = None  # called as the mark is taken (auto: _loader.py)
        self.thread: int | None = None  # the thread iterating the current generation
        self.started_pool: Any = None  # the pool last seen with a worker running
        # A sharded stream says per epoch which batches hold data and when it ends.
        self.new_cut = getattr(source, "_shmfeed_epoch_cut", None)
        self.cut: Any = None

    def iterating_elsewhere(self) -> int | None:
        """The thread iterating an epoch that is still open, if it is not this one."""
        if self.thread is None or self.thread == threading.get_ident() or self.gen == 0:
            return None
        consumer_gen, next_batch = untag(self.ring.ctl.header()["consumer_tag"])
        if consumer_gen != self.gen or next_batch == 0xFFFFFFFF:  # over, or given up
            return None
        return self.thread

    def start(self, epoch: int, first_batch: int) -> int:
        """Open a generation for batches first_batch.. of `epoch`; return it."""
        n = self.cfg.order.n_batches - first_batch
        if self.builder is not None:
            # Built here, nothing else writes slots: one the in-process builder still
            # owns was left half-written by an epoch a Ctrl-C (or another exception
            # between its acquire and its publish) ended.  Put it back, as the supervisor
            # does for a dead worker; else the epoch would run a slot short ("no slot
            # although not every slot is held", once in ~200 Ctrl-Cs of a storm).
            self.ring.ctl.reclaim(0)
        # Free slots go to the new epoch's first batches in ring order from the one
        # after the last slot taken (warm caches); slots still held are skipped.
        self.gen = self.ring.ctl.start_epoch(epoch, first_batch, n, self.next_slot,
                                             self.cfg.order.epoch_key(epoch))
        self.first_batch = self.delivered = first_batch
        self.epoch_mark = None
        self.cut = None if self.new_cut is None else self.new_cut(epoch, first_batch)
        return self.gen

    def batches(self, gen: int, epoch: int, first_batch: int, closed: Callable[[], bool],
                on_complete: Callable[[], None]) -> Iterator[Any]:
        """The batches of generation `gen`; `on_complete()` runs after the last one."""
        # Ending the epoch early gives it up (shmf_abandon): workers stop building it,
        # its unread slots go back, and a dead worker's batch of it is not rebuilt.  On
        # an exception, at once; when the loop is left (`break`, the iterator dropped),
        # as the guard is freed, in C: a Python `finally` would run in the generator's
        # finalizer, where a Ctrl-C is raised and then dropped by the interpreter.
        # (GeneratorExit does not match the `except`, which runs no call to check it.)
        guard = self.ring.ctl.epoch_guard(gen)
        owner = self.thread = threading.get_ident()
        try:
            if self.cut is not None:
                yield from self._stream_batches(gen, epoch, owner, closed)
                # The stream ended before the generation's bound: stop its builders.
                self.ring.ctl.abandon(gen)
            else:
                for b in range(self.cfg.order.n_batches - first_batch):
                    self._check_current(gen, epoch, owner, closed)
                    # Not bound to a local: the generator's frame, which the traceback of
                    # a later error refers to, would keep the previous batch's slot.
                    yield self._next_batch(gen, epoch, b, first_batch + b)
        except (Exception, KeyboardInterrupt):
            guard.abandon()
            raise
        guard.disarm()
        on_complete()

    def _check_current(self, gen: int, epoch: int, owner: int, closed: Callable[[], bool]) -> None:
        if self.gen != gen:
            raise ShmfeedError(
                f"epoch {epoch}'s iterator was used after a newer epoch started; "
                "iterate one epoch at a time")
        if threading.get_ident() != owner:
            raise ShmfeedError(
                f"epoch {epoch}'s iterator was started in thread {owner} and advanced in "
                f"thread {threading.get_ident()}: one loader feeds one loop in one thread. "
                "Give each thread its own Loader.")
        if closed():
            raise LoaderClosedError("this Loader is closed; create a new one")

    def _stream_batches(self, gen: int, epoch: int, owner: int,
                        closed: Callable[[], bool]) -> Iterator[Any]:
        """A sharded stream's epoch: its batches with data, until every shard ended."""
        # Epoch batch numbers: a resumed generation starts at first_batch, its shards that
        # had ended already marked in the cut.
        first = self.first_batch
        b = first if self.builder is not None else self.cut.after(first - 1)
        while not self.cut.done:
            self._check_current(gen, epoch, owner, closed)
            batch = self._next_batch(gen, epoch, b - first, b)
            # Workers never build the batches of ended shards: skip them.  Built here,
            # one of them costs nothing, and the claims must stay in order.
            b = self.cut.after(b) if self.builder is None else b + 1
            if batch is not _NO_DATA:
                yield batch
            del batch  # before the next take: a kept reference would pin its slot

    def _next_batch(self, gen: int, epoch: int, b: int, epoch_batch: int) -> Any:
        ring, ctl = self.ring, self.ring.ctl
        t0 = time.perf_counter()
        if self.t_first is None:
            self.t_first = t0
        if self.builder is not None:
            self._build_here(gen, b)
        try:
            taken = ctl.take(gen, b, TAKE_SLICE_S)
        except (RingBlocked, PoolShutdown):
            taken = None  # the slow take finds out which, again, and acts on it
        if taken is None:
            taken = self._slow_take(gen, epoch, b, epoch_batch, t0)
        state, word, slot, ref = taken
        del taken
        stats = self.stats
        stats.wait_s += time.perf_counter() - t0
        self.next_slot = (slot + 1) % ring.n_slots
        if state == SlotState.ERROR:
            report = ring.read_report(slot)
            del ref  # gives the slot back (the traceback would keep it otherwise)
            raise report.to_exception()
        rows, bucket = _bucket.unpack(word)
        if self.cut is not None and not self.cut.keep(epoch_batch, rows):
            return _NO_DATA  # the slot goes back with `ref`
        if bucket is None:
            leaves = ring.views(ref, rows)
        else:
            padding = self.cfg.padding
            assert padding is not None  # a bucket comes only with padding
            leaves = ring.views(ref, rows, padding.shapes(bucket), padding.offsets(bucket))
        stats.batches += 1
        stats.bytes += rows * self.row_bytes if bucket is None else sum([x.nbytes for x in leaves])
        self.delivered = epoch_batch + 1
        if self.epoch_mark is None:
            self.epoch_mark = (time.perf_counter(), stats.wait_s, stats.batches, self.busy_s())
            if self.on_mark is not None:
                self.on_mark()
        return unflatten(self.cfg.spec.tree, leaves)

    def _build_here(self, gen: int, b: int) -> None:
        """num_workers=0: build the batch in this process with the workers' code.  A
        `close()` from another thread meanwhile is a LoaderClosedError, wherever it
        lands (the shutdown word makes the claim and the slot's wait leave)."""
        try:
            self._claim_and_build(gen, b)
        except (LeaveBuild, PoolShutdown):
            if self.ring.closed or self.ring.ctl.shutting_down:
                raise LoaderClosedError("the loader was closed while a batch was being built") from None
            raise

    def _claim_and_build(self, gen: int, b: int) -> None:
        ctl = self.ring.ctl
        g, claimed = ctl.claim(0)
        if (g, claimed) != (gen, b):
            raise internal(f"in-process claim gave {(g, claimed)} for {(gen, b)}")
        if ctl.slot_of(gen, b) < 0:
            self._raise_if_full(gen, b, self.first_batch + b)
            if ctl.slot_of(gen, b) < 0:
                if ctl.shutting_down:
                    raise PoolShutdown()
                raise internal(f"batch {b} has no slot although not every slot is held")
        # With `seed_global_rngs`, the global RNGs are keyed per batch here exactly as
        # in a worker (that is what keeps this mode the reference), and then put back:
        # the training process's streams are the user's.
        assert self.builder is not None
        if self.builder.seed_global_rngs:  # array sources, gathered, leave them alone
            with _rng.kept_global_rngs():
                build_batch(self.ring, self.builder, 0, gen, b, None)
        else:
            build_batch(self.ring, self.builder, 0, gen, b, None)

    def _raise_if_full(self, gen: int, b: int, epoch_batch: int) -> None:
        """Batch `b` has no slot and every slot holds a batch this process took.  Return
        once one is free (or on its way back), after what lets go of batches by itself
        has done so: JAX's computations in flight, which hold their numpy arguments,
        and its deferred release of them (see _jaxrefs.py), then reference cycles.
        Otherwise the caller keeps every slot's batch: RingFullError.

        The wait is bounded by the JAX work in flight once it has lasted
        `QUICK_RELEASE_S` (never by work dispatched later, e.g. by another thread), plus
        `JAX_RELEASE_S`; without jax, it raises at once."""
        if self._slot_back(gen, b):
            return
        if _jaxrefs.loaded():
            self._await_jax(gen, b)
            if self._slot_back(gen, b):
                return
        gc.collect()  # batches caught in reference cycles
        if self._slot_back(gen, b):
            return
        raise RingFullError(self._full_message(epoch_batch))

    def _await_jax(self, gen: int, b: int) -> None:
        """Wait while JAX may still let go of batches: first only looking again (most
        waits end within a step: the oldest queued one finishes), then, after
        `QUICK_RELEASE_S`, until the computations in flight at that moment are done
        (listing JAX's live arrays costs ~0.5 us each, so not on every wait), and
        `JAX_RELEASE_S` more for their arguments to be released."""
        t0 = time.perf_counter()
        pause_s = RELEASE_POLL_S
        in_flight: list | None = None
        settle_until = None
        while True:
            time.sleep(pause_s)
            pause_s = min(2 * pause_s, MAX_RELEASE_POLL_S)
            if self._slot_back(gen, b):
                return
            now = time.perf_counter()
            if now - t0 < QUICK_RELEASE_S:
                continue
            if in_flight is None:
                in_flight = _jaxrefs.computing()
            in_flight = [a for a in in_flight if not _jaxrefs.ready(a)]
            if in_flight:
                settle_until = None
            elif settle_until is None:
                # A computation's arguments are released just after its results are
                # ready (measured: within one more collection).
                settle_until = now + JAX_RELEASE_S
            elif now >= settle_until:
                return

    def _slot_back(self, gen: int, b: int) -> bool:
        """Whether batch `b` has a slot, or one is on its way back (a worker finishing a
        stale batch), or the loader is shutting down (the next take says so), after
        letting JAX drop what its finished computations held."""
        ctl, n = self.ring.ctl, self.ring.n_slots
        _jaxrefs.collect()
        ctl.assign_free()
        if ctl.slot_of(gen, b) >= 0 or ctl.shutting_down:
            return True
        return sum(ctl.slot(s)["state"] == SlotState.HELD for s in range(n)) < n

    def _full_message(self, epoch_batch: int) -> str:
        ctl, n = self.ring.ctl, self.ring.n_slots
        held: dict[int, list[int]] = {}  # epoch -> its batches still referenced
        for s in range(n):
            gen, batch = untag(ctl.slot(s)["tag"])
            try:
                info = ctl.gen_info(gen)
            except Exception:  # a generation too old for the table: its epoch is unknown
                held.setdefault(-1, []).append(batch)
                continue
            held.setdefault(info.epoch, []).append(info.first_batch + batch)
        names = "; ".join(
            ("epoch ?" if e < 0 else f"epoch {e}") + ": batch" + ("es " if len(bs) > 1 else " ")
            + ", ".join(map(str, sorted(bs))) for e, bs in sorted(held.items()))
        jax = (", with no computation of JAX in flight that could release them"
               if _jaxrefs.loaded() else "")
        return (
            f"batch {epoch_batch} has no ring slot: all {n} slots hold batches that this process "
            f"still references ({names}){jax}. The arrays of those batches are kept somewhere: "
            "e.g. appended to a list, or as a view (`x[0]`, `x.reshape(...)`), or as a "
            "`jax.Array` made from one on CPU (there `jnp.asarray`, `jax.device_put` and jitted "
            "calls alias an aligned view instead of copying it; on a GPU they copy it to the "
            "device, and keeping that array pins nothing). Keep a copy instead (`np.array(x)`), "
            f"drop them sooner, or give the loader more slots (`num_slots`, now {n}); "
            "`shmfeed.jax.prefetch_to_device(loader)` hands JAX copies it owns.")

    def _slow_take(self, gen: int, epoch: int, b: int, epoch_batch: int, t0: float) -> Taken:
        """Wait for batch b slice by slice, checking the pool between slices.  The
        timeout counts only time this process ran (a slice that took far longer than
        asked was a stop: SIGSTOP, Ctrl-Z, a debugger) in which no worker published
        anything: slow is not stuck while other batches keep coming."""
        ctl = self.ring.ctl
        stalled_s, last, published = 0.0, t0, self._published()
        while True:
            try:
                taken = ctl.take(gen, b, TAKE_SLICE_S)
            except RingBlocked:
                self._raise_if_full(gen, b, epoch_batch)
                continue
            except PoolShutdown:
                if ctl.fatal:
                    raise self.ring.read_report(None).to_exception() from None
                raise LoaderClosedError("the loader was closed while waiting for a batch") from None
            if taken is not None:
                return taken
            now = time.perf_counter()
            stalled_s += min(now - last, MAX_SLICE_S)
            last = now
            now_published = self._published()
            if now_published != published:
                published, stalled_s = now_published, 0.0
            if not self._pool_started():
                stalled_s = 0.0
                self._check_startup(epoch, epoch_batch, now - t0)
            self._check_health(epoch, epoch_batch, b, stalled_s, now - t0)

    def busy_s(self) -> float:
        """The workers' building time so far, all together."""
        ctl = self.ring.ctl
        return sum(ctl.worker(w)["busy_ns"] for w in range(self.ring.max_workers)) / 1e9

    def _published(self) -> int:
        ctl = self.ring.ctl
        return sum(ctl.worker(w)["batches"] for w in range(self.ring.max_workers))

    def _pool_started(self) -> bool:
        """Whether a worker of the current pool runs (a worker records its pid first
        thing; a pid left by an earlier pool on this ring is not one of ours)."""
        pool = self.res.pool
        if pool is None or pool is self.started_pool:
            return True
        for pid in pool.worker_pids():
            try:
                if psutil.Process(pid).ppid() == pool.pid:
                    self.started_pool = pool
                    return True
            except psutil.Error:
                pass
        return False

    def _check_startup(self, epoch: int, epoch_batch: int, waited_s: float) -> None:
        if waited_s <= STARTUP_TIMEOUT_S:
            return
        pool = self.res.pool
        raise WorkerError(
            f"batch {epoch_batch} of epoch {epoch} was not ready after waiting {waited_s:.0f} s: the "
            f"worker pool (supervisor pid {pool.pid}) is still starting, with no worker running yet "
            f"(it imports your modules and unpickles the source; `timeout_s` counts only after). "
            "Make the source cheaper to pickle (open big files lazily in `__getitem__`), or use "
            "`start_method='fork'`.",
            batch=epoch_batch, epoch=epoch, pid=pool.pid, waited_s=waited_s)

    def _check_health(self, epoch: int, epoch_batch: int, b: int, stalled_s: float,
                      waited_s: float) -> None:
        pool = self.res.pool
        if pool is not None:
            ended = pool.poll()
            if ended is not None:
                self.res.pool_stale = True
                raise WorkerError(
                    f"the worker pool's supervisor (pid {pool.pid}) {ended} while batch {epoch_batch} of "
                    f"epoch {epoch} was awaited; iterate again to start a new pool, or close the loader",
                    batch=epoch_batch, epoch=epoch, pid=pool.pid)
        timeout_s = self.cfg.timeout_s
        if timeout_s is not None and stalled_s > timeout_s:
            # First give the epoch up, so that the worker about to be killed is
            # replaced without rebuilding a batch nobody waits for any more.
            self.ring.ctl.abandon(self.gen)
            culprit = self._stopped_supervisor() or self._kill_builder_of(self.gen, b)
            raise WorkerError(
                f"batch {epoch_batch} of epoch {epoch} was not ready after waiting {waited_s:.1f} s, "
                f"{stalled_s:.1f} s of them with no batch published (`timeout_s={timeout_s}`){culprit}. "
                "Raise `timeout_s` if batches are legitimately this slow; iterating again starts "
                "the next epoch.",
                batch=epoch_batch, epoch=epoch, waited_s=waited_s)

    def _stopped_supervisor(self) -> str:
        """Why nobody can replace a dead or stuck worker, if the supervisor is stopped."""
        pool = self.res.pool
        state = proc_state(pool.pid) if pool is not None else None
        if state not in STOPPED_STATES:
            return ""
        return (f"; the pool's supervisor (pid {pool.pid}) is {STOPPED_STATES[state]}, so no "
                f"dead or stuck worker can be replaced: `kill -CONT {pool.pid}` to resume it")

    def _kill_builder_of(self, gen: int, b: int) -> str:
        """SIGKILL the worker stuck on batch `b` (the supervisor replaces it), or, when no
        worker has it, those stuck on batches of an earlier epoch."""
        ctl, pool = self.ring.ctl, self.res.pool
        if pool is None:
            return ""
        slot = ctl.slot_of(gen, b)
        owner = ctl.slot(slot)["owner"] if slot >= 0 else -1
        building, stale = [], []
        for w in range(self.cfg.num_workers):
            info = ctl.worker(w)
            if w == owner or info["claim"] == tag(gen, b):
                building.append((w, info["pid"], proc_state(info["pid"])))
            elif info["claim"] != NO_CLAIM and info["claim"] < tag(gen, 0):
                stale.append((w, info["pid"], proc_state(info["pid"])))
        victims = building or stale
        for _, pid, _ in victims:
            try:  # only a child of our supervisor: never a stranger that reused the pid
                proc = psutil.Process(pid)
                if proc.ppid() == pool.pid:
                    proc.kill()
            except psutil.Error:
                pass
        names = ", ".join(f"worker {w} (pid {pid}" + (f", {STOPPED_STATES[st]}" if st in STOPPED_STATES else "")
                          + ")" for w, pid, st in victims)
        if building:
            return f"; {names} was still building it and has been killed"
        if stale:
            return (f"; no worker had claimed it, and {names} were stuck on batches of an "
                    "earlier epoch and have been killed")
        return "; no worker had claimed it"
