"""Plain generators and iterables as sources (the Keras `fit_generator` way): one
stream of samples (or of whole batches), read by one process, cut into epochs of
`steps_per_epoch` batches.

Owns `stream_source`, which turns what the Loader was given into what its engine takes
(map-style sources unchanged, `Stream`s through sources/_shards.py), `GeneratorSource`, the
map-style face the engine sees for a generator (`len` is one epoch;
`source[i]` is the stream's next item, whatever `i`), and `GeneratorBuilder`, which
builds its batches and knows whether its process still holds the stream's position.

Why this fits the engine unchanged: one builder (the single worker, or the training
process with `num_workers=0`) claims batches one at a time in batch order, and a
batch's items are consecutive positions, so pulling the next item for each position
keeps the stream in order.  The iterator lives where the batches are built and stays
there across epochs, so epoch e+1 continues where epoch e stopped.

Invariants:
- Items are taken from the iterator only by the process that builds batches, in
  order; the first item, read at construction to infer the batch spec, is kept and
  is the first item of batch 0.
- A process whose iterator is not at the stream's position (a worker that replaced a
  dead one, or a new pool) builds nothing: every batch it is given fails with a
  `WorkerError` that says the position was lost.  The position is the number of
  batches worker 0 has published over the loader's life (counted in the ring).
- An epoch left early drops the batches prefetched for it: they were taken from the
  stream and are not delivered (at most `num_slots`).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .._batch.build import Builder
from .._errors import ShmfeedError, SourcePickleError, SpecError, WorkerError
from ._shards import Stream, sharded_source

if TYPE_CHECKING:
    from .._options import LoaderOptions


class StreamEndedError(ShmfeedError):
    """A generator ended before the epoch's `steps_per_epoch` batches were built."""


def _is_stream(source: Any) -> bool:
    if hasattr(source, "__len__") and hasattr(source, "__getitem__"):
        return False
    return callable(source) or hasattr(source, "__iter__") or hasattr(source, "__next__")


def _what(source: Any) -> str:
    if inspect.isgenerator(source):
        return "a generator"
    return f"a {type(source).__name__}"


def stream_source(source: Any, options: LoaderOptions) -> Any:
    """`source` as the Loader's engine takes it: unchanged when it is map-style, a
    `ShardedSource` for a `Stream`, a `GeneratorSource` when it is a generator, an
    iterable or a callable returning one.  `options` as given (not yet checked)."""
    if isinstance(source, Stream):
        return sharded_source(source, options)
    steps_per_epoch, batch_size, num_workers = options.steps_per_epoch, options.batch_size, options.num_workers
    shuffle, shard_count = options.shuffle, options.shard_count
    if not _is_stream(source):
        if steps_per_epoch is not None:
            raise SpecError(
                "`steps_per_epoch` is for generators and iterables; a source with __len__ and "
                "__getitem__ has len(source) / batch_size batches per epoch (pass a shorter "
                "source, or break out of the loop, for fewer)")
        return source
    what = _what(source)
    if steps_per_epoch is None:
        raise SpecError(
            f"the source is {what}, which has no length: pass `steps_per_epoch`, the number "
            "of batches one epoch takes from it (the next epoch continues the stream)")
    if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
        raise SpecError(f"`steps_per_epoch` must be an integer >= 1, got {steps_per_epoch!r}")
    if isinstance(num_workers, int) and not isinstance(num_workers, bool) and num_workers > 1:
        raise SpecError(
            f"the source is {what}: one stream that only one process can read. With "
            f"`num_workers={num_workers}` each worker would run its own copy and the model would see "
            f"every batch {num_workers} times. Use `num_workers=1` (the generator runs in one worker "
            "and prefetches while the loop trains) or 0, or split the data into shards that "
            "workers read apart, e.g. "
            "`shmfeed.Loader(shmfeed.sources.Stream(make_shard, num_shards=8), ...)`")
    if shuffle:
        raise SpecError(f"`shuffle={shuffle!r}` cannot reorder {what}: shuffle inside it (e.g. with a buffer)")
    if isinstance(shard_count, int) and shard_count > 1:
        raise SpecError(
            f"the source is {what}: every host reads its own; give each host a generator of "
            "its own data and leave `shard_count=1`")
    return GeneratorSource(source, steps_per_epoch, 1 if batch_size is None else batch_size)


class GeneratorBuilder(Builder):
    """Builds a `GeneratorSource`'s batches, in the one process whose iterator is at
    the stream's position."""

    source: GeneratorSource

    def fill(self, slot: int, epoch: int, batch: int) -> int:
        built = self.ring.ctl.worker(0)["batches"]
        src = self.source
        if built != src.batches_started:
            raise WorkerError(
                f"the stream's position was lost: {built} batch(es) were built from {src.what} "
                f"by a process that is gone (a worker that died, was killed after `timeout_s`, or "
                "a pool that was restarted), and a new process cannot continue a stream where "
                f"another stopped. Batch {batch} of epoch {epoch} and every later one fail; close "
                "the loader and create a new one to start the stream again.",
                batch=batch, epoch=epoch)
        src.batches_started += 1  # before building: a batch that fails is published too
        return super().fill(slot, epoch, batch)


class GeneratorSource:
    """A stream of items as a source: `len()` is one epoch's items; `source[i]` is the
    stream's next item (the builder asks for positions in order).  `stream` is a
    zero-argument callable returning an iterator (called where the batches are
    built; needed when the pool starts in a fresh interpreter) or an iterable."""

    _shmfeed_builder = GeneratorBuilder  # see _build.builder_for

    def __init__(self, stream: Any, steps_per_epoch: int, rows: int):
        self.steps_per_epoch = steps_per_epoch
        self.rows = rows  # items per batch: the batch size, or 1 for a stream of batches
        self.make = stream if callable(stream) and not hasattr(stream, "__next__") else None
        self.what = _what(stream)
        self._iterator: Iterator | None = None if self.make is not None else iter(stream)
        self._first: list = []  # the item read ahead for the spec, not yet handed out
        self.batches_started = 0  # batches this process has started taking from the stream

    def __len__(self) -> int:
        return self.steps_per_epoch * self.rows

    def _next(self) -> Any:
        if self._first:
            return self._first.pop()
        it = self._iterator
        if it is None:
            assert self.make is not None  # (__init__: no iterator, then a make)
            it = self._iterator = iter(self.make())
        return next(it)

    def _shmfeed_peek(self) -> Any:
        """The stream's first item, kept to be handed out first (for the spec)."""
        if not self._first:
            self._first.append(self._next())
        return self._first[0]

    def __getitem__(self, i: int) -> Any:
        try:
            return self._next()
        except StopIteration:
            raise StreamEndedError(
                f"{self.what} ended at item {i} of an epoch of {len(self)} "
                f"(`steps_per_epoch={self.steps_per_epoch}`, {self.rows} item(s) per batch): the "
                "next epoch continues the same stream, so it must not end. Make it endless "
                "(`while True:`), or lower `steps_per_epoch`.") from None

    def check_sendable(self, why: str) -> None:
        """Raise SourcePickleError unless the stream can start in a fresh interpreter
        (which it must because of `why`): only a function that makes it can."""
        if self.make is None:
            raise SourcePickleError(
                f"the source is {self.what}, which cannot be sent to the worker process: it "
                f"starts in a fresh interpreter because {why}. Pass a zero-argument function "
                "that returns the generator instead (e.g. `Loader(make_gen, ...)`, not "
                "`Loader(make_gen(), ...)`): it is then called in the worker.", "source")

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_iterator"], state["_first"] = None, []  # the worker starts the stream afresh
        return state

    def __repr__(self) -> str:
        return f"GeneratorSource({self.what}, steps_per_epoch={self.steps_per_epoch})"
