"""`Loader`: the public object.  Owns the ring and the worker pool for its lifetime,
hands out epochs in order, and turns everything that goes wrong into shmfeed errors.

Invariants (see ../DESIGN.md):
1. each batch of an epoch is delivered exactly once, in batch order;
2. the stream is a function of (source, seed, epoch, options) only;
3. memory is fixed at construction (`ring_bytes`);
4. batch data is written once, by the process that builds it, and read in place;
5. nothing outlives the loader: `close()`, garbage collection, `with`, and the exit
   of the interpreter all run the pool's shutdown protocol (see _pool.py).
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import pickle
import random
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psutil

from . import _order
from ._control import NO_CLAIM, SlotState, Status, tag
from ._errors import (
    LoaderClosedError,
    RingFullError,
    ShmfeedError,
    SpecError,
    WorkerError,
    internal,
)
from ._order import Order
from ._pool import Pool, PoolConfig, sigint_deferred
from ._ring import Ring
from ._spec import Spec, infer, unflatten, with_rows
from ._worker import Builder, build_one

log = logging.getLogger("shmfeed")

TAKE_SLICE_S = 0.1  # how often a waiting consumer checks the pool's health
START_METHODS = ("auto", "fork", "spawn")
# Batch numbers no real batch has, to key the global RNGs for the epoch hooks.
_HOOK_BATCH = {"on_epoch_begin": 0xFFFFFFFE, "on_epoch_end": 0xFFFFFFFF}
_said_spawn = False


@dataclass
class Stats:
    """What the loader has done so far; `input_wait_fraction` near 0 means the
    training loop never waited for data, near 1 that it is input-bound."""

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

    @property
    def input_wait_fraction(self) -> float:
        return self.wait_s / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["input_wait_fraction"] = self.input_wait_fraction
        return d


def _accelerator_in_use() -> str | None:
    """What makes forking this process unsafe, if anything."""
    if "jax" in sys.modules:
        try:
            from jax._src import xla_bridge

            if getattr(xla_bridge, "_backends", None):
                return "JAX's backend"
        except Exception:
            pass
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_initialized():
                return "CUDA (PyTorch)"
        except Exception:
            pass
    if "cupy" in sys.modules:
        return "CuPy"
    return None


def _epoch_hook(source: Any, name: str) -> Any:
    """The source's `on_epoch_end`/`on_epoch_begin`, unless it is Keras's no-op."""
    method = getattr(type(source), name, None)
    if method is None:
        return None
    if (getattr(method, "__module__", "") or "").startswith("keras"):
        return None
    return getattr(source, name)


class _Resources:
    """Everything `close()` must release, kept apart from the Loader so that the
    finalizer holds no reference to it."""

    def __init__(self, ring: Ring):
        self.ring = ring
        self.pool: Pool | None = None
        self.owner_pid = os.getpid()
        self.callbacks: list = []  # run once at close, before the ring goes

    def stop_pool(self) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.stop()

    def close(self) -> None:
        if os.getpid() != self.owner_pid:  # a forked copy owns nothing
            return
        self.stop_pool()
        callbacks, self.callbacks = self.callbacks, []
        for fn in reversed(callbacks):
            try:
                fn()
            except Exception:  # one failing callback must not keep the rest from running
                log.exception("shmfeed: a close callback raised")
        self.ring.close()


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise SpecError(f"`{name}` must be an integer >= {minimum}, got {value!r}")
    return int(value)


class Loader:
    """Feed batches from `source` through a ring of shared-memory slots.

    `source` has `__len__` and `__getitem__`.  With a `batch_size`, `source[i]` is one
    sample (an array, a number, or a dict/tuple/list of them) and a batch stacks
    `batch_size` samples; with `batch_size=None`, `source[b]` is a whole batch (the
    Keras `Sequence` way) and `on_epoch_end()` is called between epochs.

    Iterating yields one epoch of batches: numpy arrays that are views into the ring
    (no copy).  A batch's slot is reused only once every array of it is gone.  Random
    augmentation should use `shmfeed.rng()` inside `__getitem__`.

    Faults (RELIABILITY.md has the details and measured times):

    - An exception in `__getitem__` (or a bad sample: `SpecError`) is raised in batch
      order, as a `WorkerError` chained from an exception of the original type, after
      every earlier batch.  So is one from `on_epoch_end`, after the whole epoch.  The
      epoch ends there; iterating again starts the next epoch, and `close()` is clean.
    - A worker that dies (signal, `os._exit`, segfault, OOM killer) is replaced and its
      batch rebuilt: the epoch still comes out exactly once, in order.  After
      `max_restarts` replacements over the loader's life, a `WorkerError` names the
      worker, pid, signal and batch; the loader then raises it on every iteration and
      only `close()` is left.  If the pool's supervisor dies, a `WorkerError` says so
      and iterating again starts a new pool.
    - A batch not ready after `timeout_s` raises a `WorkerError` naming it and the
      wait; the worker stuck on it is killed and replaced; iterating again starts the
      next epoch.
    - Ctrl-C raises `KeyboardInterrupt` in the loop (workers ignore SIGINT); the loader
      stays usable.  If the training process dies, the pool follows it.
    """

    def __init__(
        self,
        source: Any,
        *,
        batch_size: int | None,
        num_workers: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        num_slots: int | None = None,
        memory_budget_bytes: int | None = None,
        max_batch_rows: int | None = None,
        timeout_s: float | None = 300.0,
        max_restarts: int = 3,
        start_method: str = "auto",
        seed_global_rngs: bool = True,
        shard_index: int = 0,
        shard_count: int = 1,
    ):
        if not (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
            raise SpecError(f"`source` must have __len__ and __getitem__; got {type(source).__name__}")
        if batch_size is not None:
            batch_size = _check_int("batch_size", batch_size, 1)
        num_workers = _check_int("num_workers", num_workers, 0)
        seed = _check_int("seed", seed, 0)
        max_restarts = _check_int("max_restarts", max_restarts, 0)
        shard_count = _check_int("shard_count", shard_count, 1)
        shard_index = _check_int("shard_index", shard_index, 0)
        if shard_index >= shard_count:
            raise SpecError(f"`shard_index` must be < `shard_count` ({shard_count}), got {shard_index}")
        if timeout_s is not None and not timeout_s > 0:
            raise SpecError(f"`timeout_s` must be > 0 seconds or None, got {timeout_s!r}")
        if start_method not in START_METHODS:
            raise SpecError(f"`start_method` must be one of {START_METHODS}, got {start_method!r}")
        n_items = len(source)
        order = Order(n_items, batch_size, bool(shuffle), seed, bool(drop_last), shard_index, shard_count)
        if n_items == 0:
            raise SpecError("the source is empty (len(source) == 0): there is nothing to load")
        if order.n_batches == 0:
            raise SpecError(
                f"no batch to load: {order.items_per_shard} samples per shard with `batch_size={batch_size}` "
                "and `drop_last=True`. Lower `batch_size` or set `drop_last=False`."
            )
        spec = self._probe(source, order, seed_global_rngs)
        if max_batch_rows is not None:
            if not spec.batch_level:
                raise SpecError("`max_batch_rows` is for batch-level sources (`batch_size=None`)")
            spec = with_rows(spec, _check_int("max_batch_rows", max_batch_rows, spec.rows))

        if num_slots is not None and memory_budget_bytes is not None:
            raise SpecError("give `num_slots` or `memory_budget_bytes`, not both")
        if memory_budget_bytes is not None:
            num_slots = int(memory_budget_bytes) // spec.slot_bytes
            if num_slots < 2:
                raise SpecError(
                    f"`memory_budget_bytes={memory_budget_bytes}` holds {num_slots} slot(s) of "
                    f"{spec.slot_bytes} bytes; at least 2 are needed. Raise it to >= {2 * spec.slot_bytes}."
                )
        elif num_slots is None:
            # Each worker one slot in progress and one ready, plus the batch the loop
            # still holds and two for a device prefetch.
            num_slots = 2 * num_workers + 4
        num_slots = _check_int("num_slots", num_slots, 2)

        self._source = source
        self._order = order
        self._spec = spec
        self._num_workers = num_workers
        self._timeout_s = timeout_s
        self._start_method = start_method
        self._seed_global_rngs = seed_global_rngs
        self._cfg = PoolConfig(spec, order, num_slots, num_workers, max_restarts, seed_global_rngs)
        self._ring = Ring(spec, num_slots, max(num_workers, 1))
        self._res = _Resources(self._ring)
        self._finalizer = weakref.finalize(self, _Resources.close, self._res)
        self._epoch = 0
        self._gen = 0
        self._next_slot = 0
        self._closed = False
        self._pool_stale = False
        self._builder = Builder(source, spec, order, self._ring, seed_global_rngs) if num_workers == 0 else None
        self._stats = Stats(n_slots=num_slots, slot_bytes=spec.slot_bytes, ring_bytes=self._ring.nbytes)
        self._t_first: float | None = None
        self._lock = threading.Lock()
        if num_workers:
            self._start_pool()

    # -- construction helpers --------------------------------------------------------
    @staticmethod
    def _probe(source: Any, order: Order, seed_global: bool) -> Spec:
        """Infer the spec from the first item of epoch 0, leaving global RNGs as they were."""
        index = int(order.permutation(0)[0])
        saved = (np.random.get_state(), random.getstate()) if seed_global else None
        try:
            if seed_global:
                _order.seed_global_rngs(order.seed, 0, 0)
            _order.set_item(order.seed, 0, index)
            first = source[index]
        finally:
            _order.clear_item()
            if saved is not None:
                np.random.set_state(saved[0])
                random.setstate(saved[1])
        return infer(first, rows=order.batch_size, index=index)

    def _start_pool(self) -> None:
        method = self._start_method
        why = _accelerator_in_use()
        if method == "auto":
            method = "spawn" if why else "fork"
            global _said_spawn
            if why and not _said_spawn:
                _said_spawn = True
                log.warning(
                    "shmfeed: %s is running in this process and fork() would copy its locks; "
                    "starting workers from a fresh interpreter instead (the source is pickled once). "
                    "Create the Loader before the first JAX computation to fork directly.", why)
        source_bytes = None
        if method == "spawn":
            try:
                source_bytes = pickle.dumps(self._source)
            except Exception as exc:
                raise SpecError(
                    f"the source ({type(self._source).__name__}) cannot be pickled, and workers must "
                    f"start in a fresh interpreter because {why or 'start_method=spawn was asked'}: {exc}. "
                    "Create the Loader before JAX/CUDA starts, make the source picklable, or pass "
                    "`start_method='fork'` to fork anyway."
                ) from exc
        self._ring.ctl.reopen()
        with sigint_deferred():  # a Ctrl-C meanwhile is raised once the pool is registered
            self._res.pool = Pool(self._ring, self._source, self._cfg, method, source_bytes)
            self._pool_stale = False

    # -- public surface ----------------------------------------------------------------
    def __len__(self) -> int:
        return self._order.n_batches

    @property
    def epoch(self) -> int:
        """The epoch the next iteration will produce."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch the next iteration produces (to resume a run)."""
        self._epoch = _check_int("epoch", epoch, 0)

    @property
    def spec(self) -> Spec:
        return self._spec

    @property
    def num_slots(self) -> int:
        return self._cfg.n_slots

    @property
    def slot_bytes(self) -> int:
        return self._spec.slot_bytes

    @property
    def ring_bytes(self) -> int:
        """Shared memory held by this loader, fixed at construction."""
        return self._ring.nbytes

    @property
    def ring_address(self) -> int:
        return self._ring.address

    def ring_data(self) -> np.ndarray:
        """The slot region as a uint8 array (e.g. to page-lock it once on a GPU)."""
        self._check_open()
        return self._ring.data_view()

    @property
    def worker_pids(self) -> list[int]:
        pool = self._res.pool
        return [] if pool is None else pool.worker_pids()

    @property
    def pool_pid(self) -> int | None:
        pool = self._res.pool
        return None if pool is None else pool.pid

    def stats(self) -> Stats:
        s = self._stats
        s.elapsed_s = (time.perf_counter() - self._t_first) if self._t_first is not None else 0.0
        ctl = self._ring.ctl
        if not self._closed:
            s.restarts = ctl.header()["restarts"]
            s.workers = [
                {"worker": w, "pid": info["pid"], "batches": info["batches"], "busy_s": info["busy_ns"] / 1e9}
                for w in range(self._ring.max_workers) for info in [ctl.worker(w)]
            ]
        return Stats(**{k: (list(v) if isinstance(v, list) else v) for k, v in s.__dict__.items()})

    def __repr__(self) -> str:
        mib = self._ring.nbytes / 2**20
        return (f"shmfeed.Loader(batches={len(self)}, batch_size={self._order.batch_size}, "
                f"num_workers={self._num_workers}, num_slots={self.num_slots}, slot_bytes={self.slot_bytes}, "
                f"ring_bytes={self._ring.nbytes} ({mib:.1f} MiB), spec=[{self._spec.describe()}]"
                f"{', closed' if self._closed else ''})")

    def close(self) -> None:
        """Stop the workers and release the ring.  Batches still referenced stay
        readable; the memory goes when the last of them does."""
        self._closed = True
        self._finalizer()

    def add_close_callback(self, fn) -> None:
        """Run `fn()` once when the loader closes (by `close()`, `with`, or garbage
        collection), after its workers stop and before its ring is released; e.g. to
        unregister a page-locked ring.  Callbacks run last-added first."""
        self._check_open()
        self._res.callbacks.append(fn)

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __iter__(self):
        self._check_open()
        epoch = self._epoch
        self._epoch += 1
        self._call_hook("on_epoch_begin", epoch)
        if self._num_workers and self._pool_stale:
            self._res.stop_pool()
            self._start_pool()
        # Free slots go to the new epoch's first batches in ring order from the one
        # after the last slot taken (warm caches); slots still held are skipped.
        gen = self._ring.ctl.start_epoch(epoch, len(self), self._next_slot)
        self._gen = gen
        self._stats.epochs_started += 1
        return self._epoch_batches(gen, epoch)

    # -- the epoch ------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise LoaderClosedError("this Loader is closed; create a new one")

    def _epoch_batches(self, gen: int, epoch: int):
        # Ending the epoch early gives it up (shmf_abandon): workers stop building it,
        # its unread slots go back, and a dead worker's batch of it is not rebuilt.  On
        # an exception, at once; when the loop is left (`break`, the iterator dropped),
        # as the guard is freed, in C: a Python `finally` would run in the generator's
        # finalizer, where a Ctrl-C is raised and then dropped by the interpreter.
        # (GeneratorExit does not match the `except`, which runs no call to check it.)
        guard = self._ring.ctl.epoch_guard(gen)
        try:
            for b in range(len(self)):
                if self._gen != gen:
                    raise ShmfeedError(
                        f"epoch {epoch}'s iterator was used after a newer epoch started; "
                        "iterate one epoch at a time")
                yield self._next_batch(gen, epoch, b)
        except (Exception, KeyboardInterrupt):
            guard.abandon()
            raise
        guard.disarm()
        self._call_hook("on_epoch_end", epoch)

    def _call_hook(self, name: str, epoch: int) -> None:
        """Run the source's epoch hook here, in the training process, as Keras does;
        the pool is then restarted so the workers see what it changed."""
        hook = _epoch_hook(self._source, name)
        if hook is None:
            return
        if self._seed_global_rngs:
            # Tutorial hooks reshuffle with np.random: key it so that the result does
            # not depend on how many batches were built in this process.
            _order.seed_global_rngs(self._order.seed, epoch, _HOOK_BATCH[name])
        self._pool_stale = True  # even if it raises halfway, the workers' copy is stale
        try:
            hook()
        except Exception as exc:
            when = "after" if name == "on_epoch_end" else "before"
            raise WorkerError(
                f"the source's {name}() raised {type(exc).__name__}: {exc} ({when} epoch {epoch}). "
                "Every batch of the epoch before it was delivered; iterating again starts "
                "the next epoch (with a fresh pool), or close the loader.",
                epoch=epoch) from exc

    def _next_batch(self, gen: int, epoch: int, batch: int) -> Any:
        self._check_open()
        ring, ctl = self._ring, self._ring.ctl
        t0 = time.perf_counter()
        if self._t_first is None:
            self._t_first = t0
        if self._builder is not None:
            self._build_here(gen, epoch, batch)
        st, state, rows, slot = ctl.take(gen, batch, TAKE_SLICE_S)
        if st != Status.OK:
            state, rows, slot = self._slow_take(st, gen, epoch, batch, t0)
        self._stats.wait_s += time.perf_counter() - t0
        self._next_slot = (slot + 1) % ring.n_slots
        if state == SlotState.ERROR:
            report = ring.read_report(slot)
            ctl.release(slot, tag(gen, batch))
            raise_worker_error(report)
        leaves = ring.lease(slot, tag(gen, batch), rows)
        self._stats.batches += 1
        self._stats.bytes += sum(x.nbytes for x in leaves)
        return unflatten(self._spec.tree, leaves)

    def _build_here(self, gen: int, epoch: int, batch: int) -> None:
        """num_workers=0: build the batch in this process with the workers' code."""
        ctl = self._ring.ctl
        st, g, e, b = ctl.claim(0)
        if st != Status.OK or (g, b) != (gen, batch):
            raise internal(f"in-process claim gave {Status(st).name} {(g, b)} for {(gen, batch)}")
        if self._ring.slot_of(gen, batch) < 0:
            self._raise_if_full(gen, batch)
            if self._ring.slot_of(gen, batch) < 0:
                raise internal(f"batch {batch} has no slot although not every slot is held")
        # With `seed_global_rngs`, np.random and random are re-seeded per batch here
        # exactly as in a worker (saving and restoring them would cost more than
        # building a small batch); that is what keeps this mode the reference.
        build_one(self._ring, self._builder, 0, gen, epoch, batch, None)

    def _raise_if_full(self, gen: int, batch: int) -> None:
        """Batch `batch` has no slot: unless a garbage collection frees one, every
        slot is pinned by a batch the caller still references."""
        ctl, n = self._ring.ctl, self._ring.n_slots
        gc.collect()  # batches caught in reference cycles
        self._ring.release_orphans()  # releases lost to a Ctrl-C
        ctl.assign_free()
        if self._ring.slot_of(gen, batch) >= 0:
            return
        held = sum(ctl.slot(s)["state"] == SlotState.HELD for s in range(n))
        if held < n:
            return  # a slot is on its way back (a worker is finishing a stale batch)
        raise RingFullError(
            f"batch {batch} has no ring slot: all {n} slots hold batches that are still "
            "referenced (e.g. appended to a list, or held by in-flight device transfers). "
            "Copy what you keep (`np.array(x)`, or `jax.device_put`), drop references "
            f"sooner, or give the loader more slots (`num_slots`, now {n})."
        )

    def _slow_take(self, st: int, gen: int, epoch: int, batch: int, t0: float) -> tuple[int, int, int]:
        ctl = self._ring.ctl
        while True:
            if st == Status.OK:
                return state, rows, slot  # noqa: F821 - set by the take below
            if st == Status.BLOCKED:
                self._raise_if_full(gen, batch)
            elif st == Status.SHUTDOWN:
                if ctl.header()["fatal"]:
                    raise _fatal_error(self._ring.read_report(None))
                raise LoaderClosedError("the loader was closed while waiting for a batch")
            elif st == Status.EINVAL:
                raise internal(f"take({gen}, {batch}) returned EINVAL")
            elif st == Status.TIMEOUT:
                self._check_health(epoch, batch, t0)
            st, state, rows, slot = ctl.take(gen, batch, TAKE_SLICE_S)

    def _check_health(self, epoch: int, batch: int, t0: float) -> None:
        pool = self._res.pool
        if pool is not None:
            ended = pool.poll()
            if ended is not None:
                self._pool_stale = True
                raise WorkerError(
                    f"the worker pool's supervisor (pid {pool.pid}) {ended} while batch {batch} of "
                    f"epoch {epoch} was awaited; iterate again to start a new pool, or close the loader",
                    batch=batch, epoch=epoch, pid=pool.pid)
        waited = time.perf_counter() - t0
        if self._timeout_s is not None and waited > self._timeout_s:
            # First give the epoch up, so that the worker about to be killed is
            # replaced without rebuilding a batch nobody waits for any more.
            self._ring.ctl.abandon(self._gen)
            culprit = self._kill_builder_of(self._gen, batch)
            raise WorkerError(
                f"batch {batch} of epoch {epoch} was not ready after waiting {waited:.1f} s "
                f"(`timeout_s={self._timeout_s}`){culprit}. Raise `timeout_s` if batches are "
                "legitimately this slow; iterating again starts the next epoch.",
                batch=batch, epoch=epoch, waited_s=waited)

    def _kill_builder_of(self, gen: int, batch: int) -> str:
        """SIGKILL the worker stuck on `batch` (the supervisor replaces it), or, when no
        worker has it, those stuck on batches of an earlier epoch."""
        ctl, pool = self._ring.ctl, self._res.pool
        if pool is None:
            return ""
        slot = self._ring.slot_of(gen, batch)
        owner = ctl.slot(slot)["owner"] if slot >= 0 else -1
        building, stale = [], []
        for w in range(self._num_workers):
            info = ctl.worker(w)
            if w == owner or info["claim"] == tag(gen, batch):
                building.append((w, info["pid"]))
            elif info["claim"] != NO_CLAIM and info["claim"] < tag(gen, 0):
                stale.append((w, info["pid"]))
        victims = building or stale
        for _, pid in victims:
            try:  # only a child of our supervisor: never a stranger that reused the pid
                proc = psutil.Process(pid)
                if proc.ppid() == pool.pid:
                    proc.kill()
            except psutil.Error:
                pass
        names = ", ".join(f"worker {w} (pid {pid})" for w, pid in victims)
        if building:
            return f"; {names} was still building it and has been killed"
        if stale:
            return (f"; no worker had claimed it, and {names} were stuck on batches of an "
                    "earlier epoch and have been killed")
        return "; no worker had claimed it"


def _fatal_error(report: dict) -> WorkerError:
    """The WorkerError for a pool that gave up (see _pool._death_report)."""
    fields = ("worker", "pid", "batch", "epoch", "signal", "exit_code")
    return WorkerError(report["message"], **{k: report.get(k) for k in fields})


def raise_worker_error(report: dict) -> None:
    """Re-raise what a worker reported: its SpecError as is, anything else as a
    WorkerError chained from an exception of the original type and message."""
    original: BaseException | None = None
    if report.get("exception"):
        try:
            original = pickle.loads(report["exception"])
        except Exception:
            original = None
    if original is None:
        module, qualname = report["type"]
        try:
            cls = importlib.import_module(module)
            for part in qualname.split("."):
                cls = getattr(cls, part)
            if not (isinstance(cls, type) and issubclass(cls, BaseException)):
                raise TypeError(qualname)
            try:
                original = cls(report["message"])
            except Exception:
                # An __init__ that wants other arguments: same type and message anyway.
                original = cls.__new__(cls)
                original.args = (report["message"],)
        except Exception:
            original = RuntimeError(f"{module}.{qualname}: {report['message']}")
    if isinstance(original, ShmfeedError):
        raise original
    item = report["item"]
    where = ""
    if item is not None:
        where = f", at {'source batch' if report['batch_level'] else 'sample'} index {item}"
    raise WorkerError(
        f"worker {report['worker']} (pid {report['pid']}) raised {report['type'][1]}: "
        f"{report['message']} while building batch {report['batch']} of epoch {report['epoch']}"
        f"{where}.\n\nWorker traceback:\n{report['traceback']}",
        batch=report["batch"], epoch=report["epoch"], item=item, worker=report["worker"],
        pid=report["pid"], worker_traceback=report["traceback"]) from original
