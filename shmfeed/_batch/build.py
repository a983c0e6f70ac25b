"""Building one batch into its slot: the code that runs wherever a batch is built, in a
worker process or, with `num_workers=0`, in the training process itself (which is what
makes that mode the reference).

Owns `Builder` (which samples, which random draws, written where), `build_batch`
(acquire the batch's slot, build it in place, publish it) and, with a
`batch_transform`, `TransformBuilder`: the batch is built into the worker's own scratch
slot (laid out by the spec of the batch before the transform), the transform runs on
it, and its result, checked against the spec probed from batch 0, is written into the
ring slot: still once (DESIGN.md invariant 4).  Which samples and which
random draws a batch gets depends only on `(seed, epoch, batch)` (see _order/order.py and
_order/rng.py).  An exception becomes a `BuildFailure` report in the slot's report area and
the slot is published as ERROR, so the training process meets it in batch order, after
every earlier batch.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from .._engine.control import BatchStale, GatherPlan, PoolShutdown, SlotState
from .._engine.report import BuildFailure
from .._engine.ring import Ring
from .._errors import LoaderClosedError, SpecError
from .._kernels import STREAM_MIN_BYTES
from .._order import bucket as _bucket
from .._order import rng as _rng
from .rows import write_row, write_samples
from .spec import (
    Spec,
    check_batch_leaves,
    flattener,
    infer,
    samples_flattener,
    unflatten,
    with_rows,
)

if TYPE_CHECKING:  # _config probes a transform with the code below
    from .._config import Config

WAIT_SLICE_S = 0.25  # how often a waiting builder checks that its parent is alive
# A batch whose samples together hold at least ROW_AT_A_TIME_MIN_BYTES, each at least
# ROW_AT_A_TIME_MIN_ROW_BYTES, is written a sample at a time, each into its row as soon as
# `__getitem__` returns it; others are collected and written a leaf at a time (a few
# Python calls per leaf instead of per sample).  Collecting large samples made a 9.6 MB
# batch of fresh 150 KB arrays 4x slower: 64 of them alive at once grow glibc's heap past
# its trim threshold, so it is handed back to the kernel after each batch and every page
# of the next one faults in again (~2,400 minor faults a batch against ~2), and the rows
# are cold by the time they are copied; one sample alive at a time reuses the same,
# cache-hot memory.  Measured per batch, in-process (CPU us, leaf / row): 8 KB x 128
# rows 621 / 647 (even), 16 KB x 64 578 / 403, 150 KB x 64 7459 / 878; but 4 KB x 256
# 895 / 1198 and 8 KB x 64 256 / 366, where the row path's per-sample calls cost more.
ROW_AT_A_TIME_MIN_BYTES = 1 << 20
ROW_AT_A_TIME_MIN_ROW_BYTES = 8 << 10


def gatherer(source: Any, spec: Spec):
    """`source.__shmfeed_gather__` when the Builder may fill batches with it: an array
    source, not overriding `__getitem__`, whose leaves are exactly the spec's."""
    if spec.batch_level:
        return None
    cls = type(source)
    # The shmfeed class that defines the hook (Arrays, Windows, the Arrow sources of
    # sources/_parquet.py): a user's subclass may not have changed what a sample is.
    base: Any = next((b for b in cls.__mro__ if "__shmfeed_gather__" in vars(b)
                      and b.__module__.startswith("shmfeed.")), None)
    if base is None or cls.__getitem__ is not base.__getitem__:
        return None
    rows = source._leaf_rows()
    if len(rows) != len(spec.leaves):
        return None
    if any(dt != lf.dtype or shape != lf.shape or lf.pytype is not None
           for (dt, shape), lf in zip(rows, spec.leaves)):
        return None
    return source.__shmfeed_gather__

class Builder:
    """Builds batch `b` of an epoch into a slot; remembers the item it is on, so that
    an error can name the sample."""

    def __init__(self, source: Any, cfg: Config, ring: Ring):
        self.source = source
        # What the source does in a worker between batches (Parquet: decode ahead), or None.
        self.idle = getattr(source, "__shmfeed_idle__", None)
        self.spec = spec = cfg.spec
        self.order = cfg.order
        self.ring = ring
        self.padding = padding = cfg.padding
        self.current_item: int | None = None
        sample_tree = padding.sample_tree if padding is not None else None
        self._flatten = flattener(spec, sample_tree)
        self._flatten_samples = samples_flattener(spec, sample_tree)
        # Array sources fill a batch by index, with no per-sample code (sources/_arrays.py);
        # padded samples are written by _batch/pad.py.
        self._gather = gatherer(source, spec) if padding is None else None
        # A gathered batch runs no user code: nothing draws from the global RNGs.
        self.seed_global_rngs = cfg.seed_global_rngs and self._gather is None
        batch_bytes = (cfg.order.batch_size or 0) * spec.row_bytes
        self._row_at_a_time = (padding is None and not spec.batch_level and batch_bytes >= ROW_AT_A_TIME_MIN_BYTES
                               and spec.row_bytes >= ROW_AT_A_TIME_MIN_ROW_BYTES)
        self._stream_rows = batch_bytes >= STREAM_MIN_BYTES  # written around the cache

    def gather_plan(self) -> GatherPlan | None:
        """What `Control.gather_batches` builds batches with in C (csrc/gather.h), made
        once per worker, when they are gathered, every leaf is contiguous and the order
        is C's (`Order.c_order`); else None."""
        c_order = self.order.c_order
        if self._gather is None or c_order is None:
            return None
        copies = self.source._row_copies()
        if any(c is None for c in copies):
            return None
        leaves = [(src, stride, row_bytes, lf.offset)
                  for (src, stride, row_bytes), lf in zip(copies, self.spec.leaves)]
        return GatherPlan(c_order, leaves)

    def fill(self, slot: int, epoch: int, batch: int) -> int:
        """Write batch `batch` of `epoch` into `slot`; return the word the slot
        publishes: its number of rows, and its bucket (see _bucket.pack)."""
        order, spec, seed = self.order, self.spec, self.order.seed
        if self._gather is not None:
            items = order.batch_items(epoch, batch)
            self._gather(items, self.ring.write_views(slot))
            return len(items)
        if self.seed_global_rngs:
            _rng.seed_global_rngs(seed, epoch, batch)
        try:
            if spec.batch_level:
                index = order.source_batch(epoch, batch)
                self.current_item = index
                _rng.set_item(seed, epoch, index)
                leaves = self._flatten(self.source[index], "batch", index)
                if self.padding is not None:
                    return self._fill_padded_batch(slot, leaves, index)
                rows = check_batch_leaves(leaves, spec, index)
                for view, x in zip(self.ring.write_views(slot), leaves):
                    view[:rows] = x
                return rows
            items = order.batch_items(epoch, batch).tolist()
            if self._row_at_a_time:
                return self._fill_rows(slot, epoch, items)
            try:
                samples = _rng.samples_of(self.source, seed, epoch, items)
            except BaseException:
                self.current_item = _rng.current_index()
                raise
            self.current_item = None  # a bad sample's SpecError names its own index
            bucket = order.bucket(epoch, batch) if isinstance(order, _bucket.BucketedOrder) else None
            return self.write_rows(slot, self._flatten_samples(samples, items), items, bucket)
        finally:
            _rng.clear_item()

    def _fill_rows(self, slot: int, epoch: int, items: list[int]) -> int:
        """Write each sample into its row as soon as it is made (see
        ROW_AT_A_TIME_MIN_BYTES); return the batch's rows."""
        views, source, flatten, spec, seed = self.ring.write_views(slot), self.source, self._flatten, \
            self.spec, self.order.seed
        for row, index in enumerate(items):
            _rng.set_item(seed, epoch, index)
            try:
                sample = source[index]
            except BaseException:
                self.current_item = index
                raise
            write_row(spec, views, row, flatten(sample, "sample", index), index, self._stream_rows)
            del sample  # before the next one is made: its memory is then reused, still in cache
        return len(items)

    def describe_item(self, item: int) -> str | None:
        """How an error names `current_item` when its index alone would not say it
        (a stream's sample: "sample 7 of shard 2"); None: by its index."""
        return None

    def write_rows(self, slot: int, flat: list, names: list, bucket: int | None = None) -> int:
        """Write a batch's flattened samples into `slot` (padded, at `bucket`'s shapes,
        when the loader pads); return the word the slot publishes.  `names`: how an
        error calls each sample (its index)."""
        if self.padding is None:
            write_samples(self.spec, self.ring.write_views(slot), flat, names)
            return len(flat)
        pad = self.padding
        views = (self.ring.write_views(slot) if bucket is None else
                 self.ring.write_views(slot, pad.shapes(bucket), pad.rows(bucket), pad.offsets(bucket)))
        self.padding.write_samples(self.spec, views, flat, names)
        return _bucket.pack(len(flat), bucket)

    def _fill_padded_batch(self, slot: int, leaves: list, index: int) -> int:
        assert self.padding is not None
        rows, bucket = self.padding.write_batch(self.spec, lambda shapes: self.ring.write_views(slot, shapes),
                                                leaves, index)
        return _bucket.pack(rows, bucket)


def builder_for(source: Any, cfg: Config, ring: Ring) -> Builder:
    """The builder of `source`: the kind it names (`_shmfeed_builder`: the stream
    sources of sources/_stream.py), else `Builder`; wrapped in a TransformBuilder when the
    loader has a `batch_transform`."""
    cls = getattr(type(source), "_shmfeed_builder", Builder)
    if cfg.batch_transform is None:
        return cls(source, cfg, ring)
    assert cfg.built_spec is not None
    inner = cls(source, replace(cfg, spec=cfg.built_spec, batch_transform=None, built_spec=None),
                ScratchSlot(ring, cfg.built_spec))  # type: ignore[arg-type]
    return TransformBuilder(inner, cfg, ring)  # type: ignore[return-value]


class ScratchSlot:
    """One private slot, laid out by `spec`, standing in for the ring (whose other
    attributes it passes through) for a builder whose batch goes through a transform."""

    def __init__(self, ring: Ring | None, spec: Spec):
        self._ring, self.spec = ring, spec
        self._buf = np.zeros(spec.slot_bytes, np.uint8)
        self._views = self.write_views(0, [lf.shape for lf in spec.leaves])

    def write_views(self, slot: int, shapes: list[tuple[int, ...]] | None = None) -> list[np.ndarray]:
        if shapes is None:
            return self._views
        return [np.ndarray((self.spec.rows,) + tuple(shape), lf.dtype, self._buf, lf.offset)
                for lf, shape in zip(self.spec.leaves, shapes)]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ring, name)


class TransformBuilder:
    """Builds a batch with `inner` into its scratch slot, runs the loader's
    `batch_transform` on it (`shmfeed.rng()` keyed by the batch) and writes the result
    into the ring slot; a result whose structure, dtypes, shapes or rows differ from
    batch 0's is a SpecError naming the batch and the leaf."""

    def __init__(self, inner: Builder, cfg: Config, ring: Ring):
        self.inner, self.ring, self.fn = inner, ring, cfg.batch_transform
        self.idle = inner.idle
        self.out_spec = cfg.spec
        self.order = inner.order
        self.seed_global_rngs = cfg.seed_global_rngs  # the transform is user code
        self._flatten = flattener(cfg.spec)

    spec = property(lambda self: self.inner.spec)
    current_item = property(lambda self: self.inner.current_item)

    def describe_item(self, item: int) -> str | None:
        return self.inner.describe_item(item)

    def gather_plan(self) -> None:
        return None  # C would write the slot before the transform

    def fill(self, slot: int, epoch: int, batch: int) -> int:
        inner = self.inner
        rows, bucket = _bucket.unpack(inner.fill(0, epoch, batch))
        assert bucket is None, "batch_transform with buckets is refused at construction"
        views = inner.ring.write_views(0)
        built = unflatten(inner.spec.tree, [v[:rows] for v in views])
        seed = self.order.seed
        if self.seed_global_rngs and not inner.seed_global_rngs:
            _rng.seed_global_rngs(seed, epoch, batch)
        _rng.set_batch(seed, epoch, batch)
        try:
            out = self.fn(built)
        finally:
            _rng.clear_item()
        del built
        write_transformed(self.out_spec, self._flatten, out, rows, batch, self.ring.write_views(slot))
        return rows


def probe_transform(source: Any, cfg: Config, fn: Any) -> Spec:
    """The spec of `fn`'s result on batch 0 of epoch 0 (built here, as a worker builds
    it, with cfg's spec: the batch before the transform), with room for cfg's rows."""
    inner = Builder(source, cfg, ScratchSlot(None, cfg.spec))  # type: ignore[arg-type]
    with _rng.kept_global_rngs():
        rows, _ = _bucket.unpack(inner.fill(0, 0, 0))
        built = unflatten(cfg.spec.tree, [v[:rows] for v in inner.ring.write_views(0)])
        if cfg.seed_global_rngs:
            _rng.seed_global_rngs(cfg.order.seed, 0, 0)
        _rng.set_batch(cfg.order.seed, 0, 0)
        try:
            out = fn(built)
        finally:
            _rng.clear_item()
    try:
        spec = with_rows(infer(out, rows=None, index=0), cfg.spec.rows)
    except SpecError as exc:
        raise SpecError(f"`batch_transform` returned what cannot be a batch: {exc}") from exc
    write_transformed(spec, flattener(spec), out, rows, 0, None)
    return spec


def write_transformed(spec: Spec, flatten: Any, out: Any, rows: int, batch: int,
                      views: list[np.ndarray] | None) -> None:
    """Check `out` (batch `batch`'s transformed result, from a batch of `rows` rows)
    against `spec` and write it into `views` (None: only check it)."""
    try:
        leaves = list(flatten(out, "batch", batch))
        for leaf, x in zip(spec.leaves, leaves):
            n = getattr(x, "shape", (None,))[:1]
            if n and n[0] is not None and n[0] != rows:
                raise SpecError(f"batch {batch}, field {leaf.path or '(root)'}: has {n[0]} rows, the batch "
                                f"it was given has {rows}; every leaf keeps the batch's rows")
        check_batch_leaves(leaves, spec, batch)
    except SpecError as exc:
        raise SpecError(f"`batch_transform` returned a result unlike batch 0's: {exc}") from exc
    if views is not None:
        for view, x in zip(views, leaves):
            view[:rows] = x


class LeaveBuild(Exception):
    """Stop building: the loader is closing or the builder's parent is gone."""


def build_batch(ring: Ring, builder: Builder, worker: int, gen: int, batch: int,
                parent_pid: int | None) -> bool:
    """Acquire the slot of batch `batch` of generation `gen`, build it, publish it
    (READY or ERROR); False when nobody wants the batch any more (it is dropped,
    unbuilt).  Raises LeaveBuild."""
    ctl = ring.ctl
    try:
        while True:
            slot = ctl.acquire(worker, gen, batch, WAIT_SLICE_S)
            if slot is not None:
                break
            if parent_pid is not None and os.getppid() != parent_pid:
                raise LeaveBuild()
    except BatchStale:
        ctl.set_claim(worker, None)
        return False
    except PoolShutdown:
        raise LeaveBuild() from None
    info = ctl.gen_info(gen)
    epoch, epoch_batch = info.epoch, info.first_batch + batch
    t0 = time.perf_counter_ns()
    try:
        rows = builder.fill(slot, epoch, epoch_batch)
        state = SlotState.READY
    except BaseException as exc:  # noqa: B036 - user code may even call sys.exit
        if ring.closed:  # closed from another thread under our feet: not the source's fault
            raise LoaderClosedError("the loader was closed while a batch was being built") from None
        ring.write_report(slot, BuildFailure.of(exc, worker=worker, batch=epoch_batch, epoch=epoch,
                                                item=builder.current_item,
                                                item_name=None if builder.current_item is None
                                                else builder.describe_item(builder.current_item),
                                                batch_level=builder.spec.batch_level))
        rows, state = 0, SlotState.ERROR
        if parent_pid is None and not isinstance(exc, Exception):
            # Building in the training process (`num_workers=0`): Ctrl-C and
            # sys.exit() are the user's, not a broken sample.  The slot is published
            # (as ERROR) first, so the ring stays consistent.
            ctl.publish(worker, slot, gen, batch, rows, state, time.perf_counter_ns() - t0)
            raise
    ctl.publish(worker, slot, gen, batch, rows, state, time.perf_counter_ns() - t0)
    return True
