"""`Loader`: the public object.  Owns the epoch bookkeeping (which epoch, and from
which batch, the next iteration produces; the position a feed acknowledged), the
source's epoch hooks, and the public surface over the rest: its options are declared
in _options.py and checked into a `Config` by _config.py, its pool started and
replaced by _processes/keeper.py (which also holds what `close()` releases), its state
written and checked by _order/state.py, and each epoch taken from the ring by the consumer
(_consumer.py).

Invariants (see DESIGN.md):
1. each batch of an epoch is delivered exactly once, in batch order;
2. the stream is a function of (source, seed, epoch, options) only;
3. memory is fixed at construction (`ring_bytes`);
4. batch data is written once, by the process that builds it (or, for a remote
   builder, by the one copy from its transfer: shmfeed/ray.py), and read in place;
5. nothing outlives the loader: `close()`, garbage collection, `with`, and the exit
   of the interpreter all run the pool's shutdown protocol (see _processes/pool.py).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from . import _autotune, _sysinfo
from ._batch.spec import Spec
from ._config import build, check_memory, default_num_slots
from ._consumer import Consumer
from ._engine.ring import Ring, ring_bytes
from ._engine.stats import Stats
from ._errors import LoaderClosedError, ShmfeedError, SpecError, worker_error_as
from ._options import AUTO, DEFAULT_SHUFFLE_BLOCK, LoaderOptions, check_int, describe, options_of
from ._order import state as _state
from ._processes.keeper import PoolKeeper, Resources
from .sources._arrays import as_source
from .sources._shards import ShardedSource, Stream, sharded_source
from .sources._stream import GeneratorSource, stream_source

log = logging.getLogger("shmfeed")

_HOOKS = ("on_epoch_begin", "on_epoch_end")


def _epoch_hook(source: Any, name: str) -> Any:
    """The source's `on_epoch_end`/`on_epoch_begin`, unless it is Keras's no-op."""
    method = getattr(type(source), name, None)
    if method is None:
        return None
    if (getattr(method, "__module__", "") or "").startswith("keras"):
        return None
    return getattr(source, name)


def _check_remote(source: Any, builders: Any) -> None:
    """What remote builders (shmfeed.ray) cannot build yet: streams (read in one
    process, in order) and sources with epoch hooks (their state would have to follow
    them to every actor)."""
    if not hasattr(builders, "_start"):
        raise SpecError(f"`builders` must be a `shmfeed.ray.Builders`, got {type(builders).__name__}")
    if isinstance(source, (GeneratorSource, ShardedSource)):
        raise SpecError(f"`builders` build batches by index, and the source is {type(source).__name__}, a "
                        "stream read in order: use local workers for it (no `builders`)")
    if any(_epoch_hook(source, h) for h in _HOOKS):
        raise SpecError("`builders` cannot build from a source with epoch hooks (on_epoch_begin/"
                        "on_epoch_end) yet: its state would have to reach every actor. Use local "
                        "workers for it (no `builders`).")


def _stream_workers(source: Any, options: LoaderOptions) -> LoaderOptions:
    """`num_workers="auto"` for a `Stream`, whose shards are dealt out to the workers
    by their count: fixed at construction, at most one worker per shard of this host."""
    if options.num_workers != AUTO or not isinstance(source, Stream):
        return options
    probe = sharded_source(source, dataclasses.replace(options, num_workers=1))
    start, _, _ = _autotune.start_workers()
    return dataclasses.replace(options, num_workers=min(start, len(probe.shards)))


class Loader:
    """Feed batches from `source` through a ring of shared-memory slots.

    `source` has `__len__` and `__getitem__`.  With a `batch_size`, `source[i]` is one
    sample (an array, a number, or a dict/tuple/list of them) and a batch stacks
    `batch_size` samples.  An array or memmap, a dict of arrays, or a tuple `(X, y)` is
    read as aligned rows (`shmfeed.sources.Arrays`: batches gathered by index, no
    Python per sample); a list is a sequence of samples.  With `batch_size=None`,
    `source[b]` is a whole batch (the Keras `Sequence` way) and `on_epoch_end()` is
    called between epochs.

    `source` may instead be a generator (Keras `fit_generator` style), an iterable, or
    a zero-argument function returning one: it runs in one process (`num_workers=1`,
    or 0), yields samples (or whole batches with `batch_size=None`), and
    `steps_per_epoch` batches make an epoch; the next epoch continues the stream.  A
    function is needed when workers start in a fresh interpreter (once JAX runs).
    For several workers, split the stream into shards: `shmfeed.sources.Stream`.

    Iterating yields one epoch of batches: numpy arrays that are views into the ring
    (no copy).  A batch's slot is reused only once every array of it is gone.  Random
    augmentation should use `shmfeed.rng()` inside `__getitem__`.

    `shuffle=True` visits the source in a new order every epoch, computed per batch (no
    memory grows with `len(source)`, up to 2**40 items); `shuffle="block"` keeps runs of
    `shuffle_block` consecutive items together (shuffled within), for sequential reads
    from disk.  With `shard_count=k` hosts, host `shard_index` gets its `batch_size`
    rows of each global batch of `k * batch_size` (see _order/order.py for the last batch).

    Samples whose arrays vary in size are padded into fixed slots: `padded_shapes`
    (e.g. `{"tokens": (512,)}`, only the fields that vary), `padding_values` (default
    0), and `with_lengths=True` for their true sizes (`batch["lengths"]`).  With
    `bucket_boundaries` (e.g. `[64, 128, 256, 512]`, None in `padded_shapes` for the
    dimension they bound) and `bucket_lengths` (len(source) ints, or a function of the
    index), samples of similar length are batched together and each batch is padded
    to the smallest boundary that holds it: at most `len(bucket_boundaries)` shapes.
    `token_budget=T` (with `batch_size=None`) sizes each bucket's batches instead:
    `T // boundary` rows, so a batch holds about T tokens whatever its bucket.
    See shmfeed/_batch/pad.py and shmfeed/_order/bucket.py.

    `batch_transform=fn`: `fn(batch)` runs in the worker on each built batch (a pytree
    of numpy arrays; `shmfeed.rng()` inside is keyed by the batch) and its result is
    what the loop gets: mixup, cutmix, tokenizing a batch.  Its structure, dtypes and
    shapes are probed from batch 0 (built once at construction) and each leaf must keep
    the batch's rows; a later result that differs is an error naming the batch and
    leaf.  Each worker builds the batch in a private scratch slot first.

    `num_workers="auto"` starts with one worker per usable CPU (affinity and cgroup
    quota, at most 8), and between epochs adds one where the loop waited and the
    workers were busy (up to the usable CPUs; one past them only for workers blocked
    part of their building time, off a CPU), or drops those a loop that hardly waited
    did not need; a change that did not pay is undone and not tried again.  Never
    mid-epoch: a new worker count is a new pool, started before the next epoch's first
    batch.  The batches are the same for any count (and a state resumes under any).
    `num_slots="auto"` sizes the ring once, at construction: the default ring of the
    workers it starts with, within `memory_budget_bytes` and the memory free then.  `stats()` says what auto did and
    why (`auto`, `auto_decisions`).  See shmfeed/_autotune.py.

    `builders=shmfeed.ray.Builders(num_actors=...)` adds batch builders on a Ray cluster
    beside the `num_workers` local ones (or instead of them, with `num_workers=0`): the
    same batches, delivered into the ring in order (see shmfeed/ray.py).

    `worker_nice` (0-19) lowers the workers' CPU priority below the training loop's:
    where the loop itself is the bottleneck on a machine with as many workers as CPUs
    (tiny batches at memory speed, a GPU step), a woken worker then does not take its
    CPU.  Left at 0 where the training step needs the CPUs too (JAX or Keras on CPU):
    there it would starve the workers during the step.

    Faults (RELIABILITY.md has the details and measured times):

    - An exception in `__getitem__` (or a bad sample: `SpecError`) is raised in batch
      order, after every earlier batch, as a `WorkerError` that is also of the original
      type (`except ValueError` catches a worker's ValueError), chained from an
      exception of that type; it names the batch and sample and carries the worker's
      traceback.  So is one from `on_epoch_end`, after the whole epoch.  The
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
        batch_size: int | None,  # required, like num_workers (None: source[b] is a whole batch)
        num_workers: int | str,
        shuffle: bool | str = False,
        shuffle_block: int = DEFAULT_SHUFFLE_BLOCK,
        seed: int | None = 0,
        drop_last: bool = False,
        num_slots: int | str | None = None,
        memory_budget_bytes: int | None = None,
        max_batch_rows: int | None = None,
        timeout_s: float | None = 300.0,
        max_restarts: int = 3,
        start_method: str = "auto",
        seed_global_rngs: bool = True,
        shard_index: int = 0,
        shard_count: int = 1,
        steps_per_epoch: int | None = None,
        padded_shapes: Any = None,
        padding_values: Any = None,
        with_lengths: bool = False,
        bucket_boundaries: Any = None,
        bucket_lengths: Any = None,
        token_budget: int | None = None,
        worker_nice: int = 0,
        batch_transform: Callable[[Any], Any] | None = None,
        builders: Any = None,
    ):
        options = options_of(locals())  # every parameter but self and source: _options.py
        options = _stream_workers(source, options)
        # Arrays, dicts and tuples of arrays: shmfeed.sources.Arrays; generators: sources/_stream.py.
        source = stream_source(as_source(source), options)
        cfg = build(source, options)
        self._source = source
        self._cfg = cfg
        self.builders = builders  # shmfeed.ray.Builders, or None
        if builders is not None:
            _check_remote(source, builders)
            if num_slots is None and memory_budget_bytes is None:
                # A slot for each batch in flight to the builders, beside the usual ring.
                n_slots = default_num_slots(cfg.num_workers, cfg.spec.slot_bytes) + builders.window
                check_memory(ring_bytes(n_slots, cfg.max_workers + builders.window, cfg.spec.slot_bytes),
                             n_slots, cfg.spec.slot_bytes)
                cfg = dataclasses.replace(cfg, n_slots=n_slots)
                self._cfg = cfg
        # Remote builders' delivery threads each have a worker record, after the local ones.
        remote_workers = 0 if builders is None else builders.window
        self._ring = Ring(cfg.spec, cfg.n_slots, cfg.max_workers + remote_workers)
        self._res = Resources(self._ring)
        self._finalizer = weakref.finalize(self, Resources.close, self._res)
        self._pools = PoolKeeper(self._res, self._ring, cfg, source)
        self._epoch = 0  # the epoch the next iteration produces
        self._first_batch = 0  # and the batch it starts at (> 0 after a resume)
        self._active: int | None = None  # the epoch being iterated, until it completes
        # The position of the last batch the training step acknowledged, where a feed
        # between the loader and the step reads ahead (the device feed, the Keras feed);
        # None: every batch handed out counts.  `_acked` counts those batches.
        self._received: tuple[int, int] | None = None
        self._acked: int | None = None
        self._hooks = any(_epoch_hook(source, h) for h in _HOOKS)
        self._snapshot: tuple[int, Any] | None = None  # (epoch, source state at its start)
        self._closed = False
        self._tuner = (_autotune.WorkerTuner(cfg.num_workers, cfg.auto_workers, cfg.auto_why, cfg.max_workers)
                       if cfg.auto_workers else None)
        # An auto loader's workers' (CPU, waiting for a CPU) seconds at its window's first batch.
        self._sched: dict[int, tuple[float, float]] = {}
        self._stats = Stats(n_slots=cfg.n_slots, slot_bytes=cfg.spec.slot_bytes,
                            ring_bytes=self._ring.nbytes, num_workers=cfg.num_workers,
                            cpus=_sysinfo.usable_cpus().value)
        self._consumer = Consumer(self._ring, cfg, self._res, source, self._stats,
                                  build_here=builders is None)
        if self._tuner is not None:
            self._consumer.on_mark = self._mark_sched
        if cfg.num_workers:
            self._pools.start()
        if builders is not None:
            try:  # after the pool: it is forked before the delivery threads exist
                remote = builders._start(self._ring, source, cfg, first_worker=cfg.max_workers)
            except BaseException:
                self.close()
                raise
            self._res.callbacks.append(remote.stop)

    # -- public surface ----------------------------------------------------------------
    def __len__(self) -> int:
        if isinstance(self._source, ShardedSource):
            raise TypeError("a Stream's number of batches is known only once its shards are read")
        return self._cfg.order.n_batches

    @property
    def epoch(self) -> int:
        """The epoch the next iteration will produce."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch the next iteration produces, from its first batch."""
        epoch = check_int("epoch", epoch, 0)
        if epoch > _state.MAX_EPOCH:
            raise SpecError(f"`epoch` must be <= {_state.MAX_EPOCH} (epochs are 64-bit), got {epoch}")
        self._epoch = epoch
        self._first_batch = 0

    def state_dict(self) -> dict:
        """Where the run is: a small JSON-serialisable dict.  Loaded into a loader over
        the same data with the same options (`load_state_dict`), its next iteration
        continues with the batch after the last one the training loop received,
        bit-identical to an uninterrupted run, whatever `num_workers` (and, for several
        hosts, whatever their number at the same global batch size).  Inside
        `shmfeed.jax.prefetch_to_device(loader)`, "received" means yielded by the feed,
        not prefetched.  See shmfeed/_order/state.py for sources with epoch hooks, and
        shmfeed/sources/_shards.py for a `Stream` (the same shards and hosts, any `num_workers`)."""
        self._check_resumable()
        if self._received is not None:
            epoch, nxt = self._received
        elif self._active is not None:
            # Behind a feed that acknowledges, nothing of this epoch is acknowledged yet.
            epoch, nxt = self._active, (self._consumer.first_batch if self._acked is not None
                                        else self._consumer.delivered)
        else:
            epoch, nxt = self._epoch, self._first_batch
        if isinstance(self._source, ShardedSource):
            return self._stream_state(epoch, nxt)
        source_state = None
        if self._hooks:
            if self._snapshot is not None and self._snapshot[0] == epoch:
                source_state = self._snapshot[1]
                if isinstance(source_state, SpecError):
                    raise source_state
            else:
                source_state = _state.source_snapshot(self._source)
        return _state.make(self._cfg.order, epoch, nxt, source_state)

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (from `state_dict()`) at the next iteration; O(1):
        nothing is built to be skipped.  A state of another dataset length, seed,
        batch size or option is refused, naming the field that differs."""
        self._check_open()
        self._check_resumable()
        if isinstance(self._source, ShardedSource):
            epoch, nxt = _state.check(state, self._cfg.order, self._cfg.order.n_batches)
            self._source.resume = (epoch, nxt, _state.stream_ended(state, self._source, nxt))
            self.source_changed()  # the workers must skip the shards that had ended
            self._epoch, self._first_batch = epoch, nxt
            self._active = self._received = None
            return
        epoch, nxt = _state.check(state, self._cfg.order, len(self))
        if self._hooks:
            if "source" not in state:
                raise SpecError("this source has epoch hooks, and the loader state carries no "
                                "state of the source: pass a state from `state_dict()` of a "
                                "loader over the same kind of source")
            _state.restore_source(self._source, state["source"])
            self.source_changed()  # the workers' copy predates what was restored
        self._epoch, self._first_batch = epoch, nxt
        self._active = self._received = None

    def _stream_state(self, epoch: int, nxt: int) -> dict:
        """A Stream's state: besides (epoch, next batch), the shards of this host that
        ended before the next batch, and the batch each ended in."""
        src = self._source
        assert isinstance(src, ShardedSource)
        cut = self._consumer.cut
        if self._consumer.gen and cut is not None and self._position()[0] == epoch:
            ended = cut.ended_at
        else:  # not iterated since `load_state_dict`, or between epochs
            ended = src.ended_before(epoch, nxt)
        return _state.stream_state(self._cfg.order, src, epoch, nxt, ended)

    def _check_resumable(self) -> None:
        if isinstance(self._source, GeneratorSource):
            raise SpecError(
                f"the source is {self._source.what}: its position lives in the iterator, which a "
                "state dict cannot hold, so a run over it cannot be resumed exactly. Save your "
                "own position in the data, or use a source with __len__ and __getitem__.")

    def _note_received(self, position: tuple[int, int], batches: int = 1) -> None:
        """The training step acknowledged `batches` more batches (a device feed: the
        loop took the batch after them; the Keras feed: `on_train_batch_end`), the last
        of which ends at `position`: what `state_dict()` and `stats()` count from now on,
        instead of the batches read ahead."""
        self._received = position
        self._acked = (self._acked or 0) + batches

    def _position(self) -> tuple[int, int]:
        """(epoch, next batch) after the last batch the consumer handed out."""
        return (self._active if self._active is not None else self._epoch - 1,
                self._consumer.delivered)

    @property
    def spec(self) -> Spec:
        return self._cfg.spec

    @property
    def num_slots(self) -> int:
        return self._cfg.n_slots

    @property
    def slot_bytes(self) -> int:
        return self._cfg.spec.slot_bytes

    @property
    def ring_bytes(self) -> int:
        """Shared memory held by this loader, fixed at construction."""
        return self._ring.nbytes

    @property
    def _ring_address(self) -> int:
        return self._ring.address

    def _ring_data(self) -> np.ndarray:
        """The slot region as a uint8 array (shmfeed.jax page-locks it once on a GPU).
        Private: a user holding it would see slots being rewritten."""
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

    @property
    def start_method(self) -> str | None:
        """How the running pool started: "fork" (from this process), "forkserver" (from
        the copy of this process taken before JAX started) or "spawn" (a fresh
        interpreter); None without a pool."""
        pool = self._res.pool
        return None if pool is None else pool.start_method

    def stats(self) -> Stats:
        """What the loader has done so far (also after `close()`: the final numbers).
        Behind a feed that reads ahead (the device feed, the Keras feed), `batches` and
        `bytes` count the batches the training step acknowledged, not those read ahead."""
        s = self._stats
        t_first = self._consumer.t_first
        if not self._closed:
            s.elapsed_s = (time.perf_counter() - t_first) if t_first is not None else 0.0
            ctl = self._ring.ctl
            s.restarts = ctl.header()["restarts"]
            s.workers = [
                {"worker": w, "pid": info["pid"], "batches": info["batches"], "busy_s": info["busy_ns"] / 1e9}
                for w in self._worker_records() for info in [ctl.worker(w)]
            ]
        if self._tuner is not None:
            s.num_workers = self._cfg.num_workers
            s.auto = self._tuner.summary()
            s.auto_decisions = self._tuner.decisions()
        copied: dict[str, Any] = {k: (list(v) if isinstance(v, list) else v) for k, v in s.__dict__.items()}
        out = Stats(**copied)
        if self._acked is not None and out.batches:
            # Bytes per batch of those read (exact unless batches vary in size: buckets).
            out.bytes = round(out.bytes * min(self._acked, out.batches) / out.batches)
            out.batches = self._acked
        return out

    def _worker_records(self) -> range | list[int]:
        """The control block's worker records that `stats()` lists: every one, except
        that an auto loader's beyond its current count (workers it ran before a
        change) are left out."""
        if self._tuner is None:
            return range(self._ring.max_workers)
        cfg = self._cfg
        return list(range(cfg.num_workers)) + list(range(cfg.max_workers, self._ring.max_workers))

    def _worker_pids(self) -> list[int]:
        ctl = self._ring.ctl
        return [pid for w in range(self._cfg.num_workers) if (pid := ctl.worker(w)["pid"]) > 0]

    def _mark_sched(self) -> None:
        """An auto loader's epoch has taken its first batch: where its workers' time on a
        CPU and waiting for one is measured from, if the epoch starts a window (a read of
        /proc per worker: ~16 us each, at most once an epoch)."""
        if self._tuner is not None and self._tuner.window_starts:
            self._sched = _autotune.sched_times(self._worker_pids())

    def _tune(self, epoch: int) -> None:
        """An auto loader's epoch is over: its facts to the tuner, and a pool of the
        count it asks for before the next epoch (`before_epoch` replaces it)."""
        tuner, mark = self._tuner, self._consumer.epoch_mark
        if tuner is None or mark is None:
            return
        t0, wait0, batches0, busy0 = mark
        window = _autotune.Window(self._cfg.num_workers, time.perf_counter() - t0,
                                  self._stats.wait_s - wait0, self._stats.batches - batches0,
                                  self._consumer.busy_s() - busy0)
        pids = self._worker_pids() if tuner.judges(window) else []
        sched = _autotune.sched_times(pids)
        if pids and len(sched) == len(pids):
            # Since the window's first mark; a worker new since then (a restart) from its start.
            window = dataclasses.replace(
                window, cpu_s=sum(c - self._sched.get(pid, (0.0, 0.0))[0] for pid, (c, _) in sched.items()),
                queued_s=sum(q - self._sched.get(pid, (0.0, 0.0))[1] for pid, (_, q) in sched.items()))
        n = tuner.observe(window, epoch + 1)
        if n != self._cfg.num_workers:
            self._cfg = dataclasses.replace(self._cfg, num_workers=n)
            self._pools.cfg = self._consumer.cfg = self._cfg
            self._res.pool_stale = True

    def __repr__(self) -> str:
        mib = self._ring.nbytes / 2**20
        batches = "?" if isinstance(self._source, ShardedSource) else len(self)
        return (f"shmfeed.Loader(batches={batches}, batch_size={self._cfg.order.batch_size}, "
                f"num_workers={self._cfg.num_workers}, num_slots={self.num_slots}, slot_bytes={self.slot_bytes}, "
                f"ring_bytes={self._ring.nbytes} ({mib:.1f} MiB), spec=[{self._cfg.spec.describe()}]"
                f"{', closed' if self._closed else ''})")

    def close(self) -> None:
        """Stop the workers and release the ring.  Batches still referenced stay
        readable; the memory goes when the last of them does.  `stats()` still works."""
        try:
            if not self._closed and not self._ring.closed:
                self.stats()  # the final numbers, while the ring can still be read
        except Exception:  # closing must not fail for want of statistics
            log.debug("shmfeed: final stats unavailable", exc_info=True)
        finally:  # even on a Ctrl-C meanwhile
            self._closed = True
            self._finalizer()

    def add_close_callback(self, fn: Callable[[], object]) -> None:
        """Run `fn()` once when the loader closes (by `close()`, `with`, or garbage
        collection), after its workers stop and before its ring is released; e.g. to
        unregister a page-locked ring.  Callbacks run last-added first."""
        self._check_open()
        self._res.callbacks.append(fn)

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __iter__(self) -> Iterator[Any]:
        self._check_open()
        other = self._consumer.iterating_elsewhere() if self._active is not None else None
        if other is not None:
            raise ShmfeedError(
                f"this Loader is being iterated by thread {other} (epoch {self._active} is not "
                "over): one loader feeds one loop. Give each thread its own Loader.")
        epoch, first = self._epoch, self._first_batch
        self._active = self._received = None
        if first >= self._cfg.order.n_batches:
            # Resumed after the epoch's last batch but before its on_epoch_end ran.
            self._call_hook("on_epoch_end", epoch)
            epoch, first = epoch + 1, 0
        if epoch > _state.MAX_EPOCH:  # the C order would wrap it around to epoch 0's stream
            raise ShmfeedError(f"this loader has run its last epoch ({_state.MAX_EPOCH}, epochs are 64-bit); "
                               "`set_epoch` to an earlier one or create a new Loader")
        self._epoch, self._first_batch = epoch + 1, 0
        if first == 0:
            self._call_hook("on_epoch_begin", epoch)
        if self._hooks:
            try:  # only state_dict() needs it: a source that cannot be pickled fails there
                self._snapshot = (epoch, _state.source_snapshot(self._source))
            except SpecError as exc:
                self._snapshot = (epoch, exc)
        if self._cfg.num_workers:
            self._pools.before_epoch()
        gen = self._consumer.start(epoch, first)
        self._active = epoch
        self._stats.epochs_started += 1
        return self._consumer.batches(gen, epoch, first, lambda: self._closed,
                                      lambda: self._complete(epoch))

    def _complete(self, epoch: int) -> None:
        self._tune(epoch)
        self._call_hook("on_epoch_end", epoch)
        if self._active == epoch:
            self._active = None

    def source_changed(self) -> None:
        """Say that the source's state changed (e.g. code other than its own epoch hooks
        reshuffled it): the workers take the new state before the next epoch starts.
        The source is pickled each time and sent to the pool, whose workers are
        re-forked: tens of milliseconds, plus pickling the source's state."""
        self._check_open()
        if self.builders is not None:
            raise SpecError("this Loader's batches are also built by Ray actors (`builders`), whose "
                            "copies of the source cannot take a new state yet: create a new Loader "
                            "over the changed source")
        if self._cfg.num_workers == 0:
            return  # batches are built here, from the source itself
        self._res.source_stale = True

    def _check_open(self) -> None:
        if self._closed:
            raise LoaderClosedError("this Loader is closed; create a new one")

    def _call_hook(self, name: str, epoch: int) -> None:
        """Run the source's epoch hook here, in the training process, as Keras does,
        seeing the user's global RNG streams as they are; the workers then take the
        source's new state (see `source_changed`)."""
        hook = _epoch_hook(self._source, name)
        if hook is None:
            return
        if self._cfg.num_workers:
            self._res.source_stale = True  # even if it raises halfway, the workers' copy is stale
        try:
            hook()
        except Exception as exc:
            when = "after" if name == "on_epoch_end" else "before"
            raise worker_error_as(
                type(exc),
                f"the source's {name}() raised {type(exc).__name__}: {exc} ({when} epoch {epoch}). "
                "Every batch of the epoch before it was delivered; iterating again starts "
                "the next epoch, or close the loader.",
                epoch=epoch) from exc


if Loader.__doc__ is not None:  # None under `python -OO`
    Loader.__doc__ = f"{Loader.__doc__}\n{describe()}\n    "
