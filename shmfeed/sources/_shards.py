"""Sharded streams: `Stream(make, num_shards)`, a stream several workers read apart,
the same for any `num_workers`.

Owns `Stream` (public), `ShardedSource` (one host's view of it, what the engine
sees), `ShardBuilder` (builds a batch from one shard's iterator, and runs the worker
loop of a sharded stream) and `_EpochCut` (the consumer's view of where an epoch ends).

How it maps onto the engine: batch b of an epoch is round b // S of local shard
b % S (S: this host's shards), so the batch numbers are fixed before any shard is
read.  Worker w of W serves the local shards j with j % W == w, building their
batches in increasing order with its own loop instead of the shared claim counter
(slots are given to batch numbers in order, so this cannot deadlock).  A shard that
has ended is skipped on both sides: the batch in which a shard's iterator ends is
shorter than `batch_size` (possibly empty, then not delivered), so the worker and
the consumer learn the end from the same batch; later batch numbers of that shard
are neither built nor taken (shmf_assign_free gives no slot to a number the
consumer passed).  The epoch ends once every shard has ended; the consumer then
gives the rest of the generation up, which sends the workers to the next one.
The generation is opened with `STREAM_BATCH_BOUND` batches, a bound no epoch reaches.
Before a worker opens a shard, a stream that has `_shmfeed_upcoming` is told the
worker's shards after it (TarShards has an ObjectCache download them ahead).

Resuming (`Loader.state_dict()`): batch numbers are fixed, so a state is the epoch, the
next batch number, and the local shards that had ended before it (with the batch each
ended in, so that a device feed reading ahead does not count ends the loop has not
seen).  The generation of a resumed epoch starts at that batch (`first_batch`); workers
and consumer deal shards by epoch batch numbers and skip the shards that had ended
(`ShardedSource.resume`, sent to the workers like any source state).  A shard asked for
round r > 0 is read by `make(shard, num_shards, start=r * batch_size)` when `make` has a
`start` parameter (`Stream.seekable`), otherwise replayed from its start.

Invariants:
- The stream is a function of (make, num_shards, batch_size, seed, epoch, hosts):
  not of `num_workers`, nor of which worker built what, nor of a worker's death.
- Every sample of an epoch is delivered once: a shard asked for another round than
  its iterator is at (a new epoch, a replacement worker) is read afresh from `make`
  up to that round, which is why `make` must give the same samples when called again.
- `shmfeed.rng()` inside `make` is keyed by (seed, epoch, shard << 32 | position).

A `make` that breaks its contract is caught, not left to lose or repeat samples
silently: one that ignores `shard_index` (the first samples of this host's first two
shards are equal, checked at construction), and one that gives other samples when called again
(checked when a replacement worker re-reads a shard: each worker records, per shard,
a running fingerprint of the batches it built, CRC32 of a strided sample of each
batch's bytes in its slot, in a small table shared with its replacement; the re-read
batches must give the same one).  Either is a `SpecError` that arrives in batch order.
"""

from __future__ import annotations

import inspect
import mmap
import os
import struct
import zlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from .._batch.build import WAIT_SLICE_S, Builder, LeaveBuild, build_batch
from .._batch.rows import write_samples
from .._config import check_int
from .._engine.control import PoolShutdown, SlotState, tag, untag
from .._errors import SpecError, internal
from .._order import rng as _rng

if TYPE_CHECKING:
    from .._options import LoaderOptions

STREAM_BATCH_BOUND = 1 << 31  # batch numbers a sharded epoch may use (tags hold 32 bits)
PRINT_ELEMENTS = 256  # elements of each leaf of a batch its fingerprint reads, at most
SAME_START_SAMPLES = 2  # samples of shards 0 and 1 compared at construction
UPCOMING_SHARDS = 16  # a worker's next shards told to a stream that fetches ahead


class Stream:
    """A stream split into `num_shards` shards that workers read apart, the same for
    any `num_workers`: `make(shard_index, num_shards)` returns an iterable of the
    samples of one shard (e.g. the records of one file).

    A batch holds consecutive samples of one shard (the last of a shard may be
    shorter); an epoch takes batches round-robin over the shards still running, so
    every sample comes once per epoch and shards may differ in length.  `make` is
    called afresh each epoch, in the worker that serves the shard; inside it,
    `shmfeed.rng()` is keyed by (seed, epoch, shard, position).  It must give the same
    samples when called again: a worker that dies is replaced and re-reads its shards
    up to where it stopped (a `make` that gives other samples then is a `SpecError`, as
    is one whose first two shards start alike, i.e. that ignores `shard_index`).  With
    `shard_count` hosts, host h reads the shards `s % shard_count == h`.

    `Loader.state_dict()` resumes a Stream mid-epoch.  A `make` with a `start` parameter,
    `make(shard_index, num_shards, start=0)`, declares that it can seek: it yields the
    shard from sample `start`, and a resumed or replacement worker asks it to start
    where it stopped (nothing is read twice, and not fingerprinted); any other `make`
    is replayed from the start of the shard.
    """

    def __init__(self, make: Any, num_shards: int):
        if not callable(make):
            raise SpecError(f"`make` must be a function make(shard_index, num_shards) -> iterable, "
                            f"got {type(make).__name__}")
        if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
            raise SpecError(f"`num_shards` must be an integer >= 1, got {num_shards!r}")
        self.make = make
        self.num_shards = num_shards
        self.seekable = _takes_start(make)

    def __repr__(self) -> str:
        return f"shmfeed.sources.Stream({getattr(self.make, '__name__', self.make)!r}, num_shards={self.num_shards})"


def _takes_start(make: Any) -> bool:
    """Whether `make` declares it can seek: a `start` parameter (with a default)."""
    try:
        param = inspect.signature(make).parameters.get("start")
    except (TypeError, ValueError):  # a builtin or C callable without a signature
        return False
    return param is not None and param.default is not inspect.Parameter.empty


def _item_key(shard: int, position: int) -> int:
    """The index `shmfeed.rng()` is keyed by for item `position` of `shard`."""
    return (shard << 32) | position


def _describe_item(key: int) -> str:
    return f"sample {key & 0xFFFFFFFF} of shard {key >> 32}"


class _Shard:
    """One shard's iterator in this process, the round (batch of the shard) it is at,
    the fingerprint of the rounds before it, and what a predecessor recorded for this
    shard (rounds, fingerprint), still to be compared with ours."""

    __slots__ = ("epoch", "expect", "it", "print", "round")

    def __init__(self, epoch: int, it: Iterator | None, round_: int):
        self.epoch, self.it, self.round = epoch, it, round_
        self.print = 0
        self.expect: tuple[int, int] | None = None


class _Prints:
    """Per local shard, the (epoch, rounds, fingerprint) its worker built last: a table
    in an anonymous shared mapping made before the workers fork, so a replacement reads
    what its predecessor wrote.  A check word makes a record torn by a kill invalid."""

    RECORD = struct.Struct("<4Q")  # epoch, rounds, fingerprint, check
    FIELDS = struct.Struct("<3Q")

    def __init__(self, n_shards: int):
        self._mm = mmap.mmap(-1, max(n_shards, 1) * self.RECORD.size)  # MAP_SHARED: seen after fork

    def _check(self, epoch: int, rounds: int, fingerprint: int) -> int:
        return zlib.crc32(self.FIELDS.pack(epoch, rounds, fingerprint)) | 1 << 32

    def record(self, j: int, epoch: int, rounds: int, fingerprint: int) -> None:
        self.RECORD.pack_into(self._mm, j * self.RECORD.size, epoch, rounds, fingerprint,
                              self._check(epoch, rounds, fingerprint))

    def recorded(self, j: int, epoch: int) -> tuple[int, int] | None:
        e, rounds, fingerprint, check = self.RECORD.unpack_from(self._mm, j * self.RECORD.size)
        if e != epoch or check != self._check(e, rounds, fingerprint):
            return None
        return rounds, fingerprint


class ShardBuilder(Builder):
    """Builds a sharded stream's batches.  Batch b of an epoch is round b // S of
    local shard b % S (S: this host's shards); worker w of W serves the local shards
    j with j % W == w and builds its batches in increasing order (its own loop, not
    the shared claim counter).  A shard asked for a round its iterator is not at
    (a new epoch, or a replacement worker) is read afresh up to that round."""

    source: ShardedSource

    def __init__(self, *args: Any):
        super().__init__(*args)
        self._shards: dict[int, _Shard] = {}
        self._prints = _Prints(len(self.source.shards))
        self._scratch: list[np.ndarray] | None = None  # a slot's leaves, for re-read batches
        self._mine: list[int] | None = None  # the local shards this worker reads (in worker_loop)

    def describe_item(self, item: int) -> str:
        return _describe_item(item)

    def _shard_at(self, j: int, epoch: int, round_: int) -> _Shard:
        src, seed = self.source, self.order.seed
        sh = self._shards.get(j)
        if sh is not None and sh.epoch == epoch and sh.round == round_:
            return sh
        shard = src.shards[j]
        rows = src.batch_size
        self.current_item = _item_key(shard, round_ * rows)  # an error in `make` itself names the shard
        if round_ and src.stream.seekable:  # `make` starts where asked: nothing is re-read
            _rng.set_item(seed, epoch, self.current_item)
            self._tell_upcoming(j)
            it = iter(src.stream.make(shard, src.stream.num_shards, start=round_ * rows))
            sh = self._shards[j] = _Shard(epoch, it, round_)
            return sh
        self.current_item = _item_key(shard, 0)
        self._tell_upcoming(j)
        it = iter(src.stream.make(shard, src.stream.num_shards))
        sh = self._shards[j] = _Shard(epoch, it, 0)
        sh.expect = self._prints.recorded(j, epoch) if round_ else None
        for r in range(round_):  # re-read what was built before (exactly once)
            samples: list = []
            for pos in range(r * rows, (r + 1) * rows):
                self.current_item = key = _item_key(shard, pos)
                _rng.set_item(seed, epoch, key)
                sample = next(it, _END)
                if sample is _END:
                    sh.it = None
                    break
                samples.append(sample)
            if sh.expect is not None:
                names = [f"{r * rows + k} of shard {shard}" for k in range(len(samples))]  # as fill's
                sh.print = self._fingerprint(self._replayed(samples, names), len(samples), sh.print)
                self._compare(sh, shard, r + 1)
            if sh.it is None:
                break
        sh.round = round_
        return sh

    def _tell_upcoming(self, j: int) -> None:
        """Before local shard j is opened: tell a stream that downloads its shards
        (TarShards through an ObjectCache) which of this worker's shards come after
        it, so it can fetch them ahead."""
        upcoming = getattr(self.source.stream, "_shmfeed_upcoming", None)
        if upcoming is not None:
            mine = self._mine if self._mine is not None else range(len(self.source.shards))
            upcoming([self.source.shards[m] for m in mine if m > j][:UPCOMING_SHARDS])

    def _replayed(self, samples: list, names: list) -> list[np.ndarray]:
        """The leaves of a slot holding these samples, as a worker writes them (a
        scratch slot: only a replacement re-reading a shard needs one)."""
        if self._scratch is None:
            self._scratch = self.ring._views(np.zeros(self.spec.slot_bytes, np.uint8), self.spec.rows, None)
        flat = self._flatten_samples(samples, names)
        if self.padding is None:
            write_samples(self.spec, self._scratch, flat, names)
        else:
            self.padding.write_samples(self.spec, self._scratch, flat, names)
        return self._scratch

    @staticmethod
    def _fingerprint(leaves: list[np.ndarray], rows: int, previous: int) -> int:
        """`previous` extended by a batch of `rows` rows in `leaves`: CRC32 of up to
        PRINT_ELEMENTS elements of each leaf, spread over its rows (cheap, and any
        other sample or order almost surely changes it)."""
        h = (previous + rows) & 0xFFFFFFFF  # a batch of other rows, or a shorter one, differs
        for leaf in leaves:  # full-capacity slot leaves: contiguous, so reshape is a view
            flat = leaf.reshape(-1)
            n = rows * (flat.size // leaf.shape[0])
            h = zlib.crc32(flat[: n : n // PRINT_ELEMENTS or 1].tobytes(), h)
        return h

    def _compare(self, sh: _Shard, shard: int, rounds: int) -> None:
        """After `rounds` rounds of `sh`, compare with what the predecessor recorded."""
        if sh.expect is None or sh.expect[0] != rounds:
            return
        if sh.print != sh.expect[1]:
            stream, rows = self.source.stream, self.source.batch_size
            raise SpecError(
                f"shard {shard}: `make({shard}, {stream.num_shards})` gave other samples when called "
                f"again: its first {rounds} batch(es) ({rounds * rows} samples at most), re-read by a "
                "worker replacing one that died, differ from those already delivered, so samples would "
                "be lost or repeated. `make` must give the same samples every time it is called in an "
                "epoch: shuffle with `shmfeed.rng()` (not an unseeded RNG) and list files in a fixed "
                "(sorted) order.")
        sh.expect = None

    def fill(self, slot: int, epoch: int, batch: int) -> int:
        src, seed = self.source, self.order.seed
        n_local = len(src.shards)
        j, round_ = batch % n_local, batch // n_local
        shard, rows = src.shards[j], src.batch_size
        if self.seed_global_rngs:
            _rng.seed_global_rngs(seed, epoch, batch)
        try:
            sh = self._shard_at(j, epoch, round_)
            sh.round = round_ + 1
            samples: list = []
            keys = []
            while sh.it is not None and len(samples) < rows:
                key = _item_key(shard, round_ * rows + len(samples))
                self.current_item = key
                _rng.set_item(seed, epoch, key)
                sample = next(sh.it, _END)
                if sample is _END:
                    sh.it = None  # the shard has ended: this batch is its last (maybe empty)
                else:
                    samples.append(sample)
                    keys.append(key)
            self.current_item = None  # a bad sample's SpecError names it, as below
            names = [f"{key & 0xFFFFFFFF} of shard {shard}" for key in keys]  # "sample 7 of shard 3"
            word = self.write_rows(slot, self._flatten_samples(samples, names), names)
            sh.print = self._fingerprint(self.ring.write_views(slot), len(samples), sh.print)
            self._compare(sh, shard, round_ + 1)
            self._prints.record(j, epoch, round_ + 1, sh.print)
            return word
        finally:
            _rng.clear_item()

    def _live(self, mine: list[int], epoch: int, first: int) -> list[int]:
        """Those of the local shards `mine` not known to have ended in `epoch` (read here,
        or, in a generation resumed at batch `first`, before it)."""
        shards, before = self._shards, self.source.ended_before(epoch, first)
        return [j for j in mine if j not in before
                and not (j in shards and shards[j].epoch == epoch and shards[j].it is None)]

    def worker_loop(self, ring: Any, worker: int, pending: int | None, parent_pid: int) -> None:
        """A worker's life: per generation, build the batches of its shards in order,
        skipping the shards that ended (the consumer skips them too)."""
        ctl = ring.ctl
        n_local, n_workers = len(self.source.shards), self.source.num_workers
        mine = self._mine = [j for j in range(n_local) if j % n_workers == worker]
        done_gen = 0
        try:
            while True:
                gen = ctl.header()["gen"]
                if gen in (0, done_gen) or not mine:
                    if not ctl.wait_gen(gen, WAIT_SLICE_S) and os.getppid() != parent_pid:
                        return
                    continue
                # (A predecessor's claim is never handed over as `pending`: the shared
                # claim counter, which shmf_reclaim checks, is not used here.)
                # Shards are dealt by epoch batch numbers (a resumed generation starts at
                # `first`); the ring's are the generation's, from 0.
                info = ctl.gen_info(gen)
                first = info.first_batch
                live = self._live(mine, info.epoch, first)
                e = _resume_point(ctl, gen, live, n_local, first) if live else first
                while e - first < info.n_batches and live:
                    b = e - first
                    ctl.set_claim(worker, tag(gen, b))
                    if not build_batch(ring, self, worker, gen, b, parent_pid) and _epoch_over(ctl, gen):
                        break
                    live = self._live(mine, info.epoch, first)
                    e = _next_mine(e, live, n_local) if live else e
                done_gen = gen
        except (LeaveBuild, PoolShutdown):
            return


_END = object()
_TAG_BATCH_MASK = 0xFFFFFFFF


def _next_mine(b: int, mine: list[int], n_local: int) -> int:
    """The smallest batch number > b of the local shards `mine` (not empty)."""
    j, round_ = b % n_local, b // n_local
    later = [m for m in mine if m > j]
    return round_ * n_local + later[0] if later else (round_ + 1) * n_local + mine[0]


def _epoch_over(ctl: Any, gen: int) -> bool:
    """Generation `gen` is over (a newer one started, or it was given up) rather than
    one batch of it passed by the consumer."""
    h = ctl.header()
    consumer_gen, consumer_batch = untag(h["consumer_tag"])
    return h["gen"] != gen or (consumer_gen == gen and consumer_batch == _TAG_BATCH_MASK)


def _resume_point(ctl: Any, gen: int, mine: list[int], n_local: int, first: int) -> int:
    """The epoch batch number where a worker starting in generation `gen` (which starts
    at epoch batch `first`) begins: after every batch of `mine` already built, i.e.
    those the consumer has passed and those waiting in slots (its predecessor, if any,
    built them in increasing order)."""
    consumer_gen, consumer_batch = untag(ctl.header()["consumer_tag"])
    floor = first + (consumer_batch if consumer_gen == gen else 0)
    built = [first + untag(info["tag"])[1] for info in (ctl.slot(s) for s in range(ctl.header()["n_slots"]))
             if info["state"] in _BUILT and untag(info["tag"])[0] == gen]
    last = max([b for b in built if b % n_local in mine] + [floor - 1])
    return _next_mine(last, mine, n_local)  # from -1: mine[0]


_BUILT = (SlotState.READY, SlotState.HELD, SlotState.ERROR)


class _EpochCut:
    """The consumer's view of one epoch of a sharded stream: a batch shorter than
    `batch_size` is its shard's last; the epoch ends when every shard has ended."""

    def __init__(self, n_local: int, batch_size: int, drop_last: bool, ended_at: dict[int, int] | None = None):
        self.n_local, self.batch_size, self.drop_last = n_local, batch_size, drop_last
        self.ended_at: dict[int, int] = dict(ended_at or {})  # local shard -> batch it ended in

    @property
    def ended(self) -> set[int]:
        return set(self.ended_at)

    @property
    def done(self) -> bool:
        return len(self.ended_at) == self.n_local

    def after(self, batch: int) -> int:
        """The batch after `batch` that belongs to a shard still running."""
        batch += 1
        while not self.done and batch % self.n_local in self.ended_at:
            batch += 1
        return batch

    def keep(self, batch: int, rows: int) -> bool:
        """Whether batch `batch`, of `rows` rows, is delivered."""
        if rows < self.batch_size:
            self.ended_at.setdefault(batch % self.n_local, batch)
        return rows == self.batch_size if self.drop_last else rows > 0


class ShardedSource:
    """A `Stream` as the engine sees it, for one host: `shards` are the stream's shard
    indices it reads; `len()` is only the bound of batch numbers an epoch may use."""

    _shmfeed_builder = ShardBuilder  # see _build.builder_for

    def __init__(self, stream: Stream, batch_size: int, num_workers: int, drop_last: bool,
                 shard_index: int, shard_count: int):
        self.stream = stream
        self.batch_size = batch_size
        self.num_workers = max(num_workers, 1)
        self.drop_last = drop_last
        self.shards = list(range(shard_index, stream.num_shards, shard_count))
        self.shard_index, self.shard_count = shard_index, shard_count
        # (epoch, next batch, {local shard: batch it ended in}) of a loaded state: the
        # generation that resumes there skips the shards that had ended.
        self.resume: tuple[int, int, dict[int, int]] | None = None

    def ended_before(self, epoch: int, first: int) -> dict[int, int]:
        """The local shards that ended before batch `first` of `epoch`, when a loaded
        state resumes there (else none: a generation from 0 reads every shard)."""
        r = self.resume
        return r[2] if r is not None and first and (r[0], r[1]) == (epoch, first) else {}

    def __len__(self) -> int:
        return STREAM_BATCH_BOUND * self.batch_size

    def __getitem__(self, i: int) -> Any:
        raise internal("a sharded stream's items are read by its ShardBuilder, not by index")

    def _shmfeed_peek(self) -> Any:
        """The first sample of the first non-empty shard (for the batch spec only:
        workers call `make` afresh)."""
        for shard in self.shards:
            it = iter(self.stream.make(shard, self.stream.num_shards))
            first = next(it, _END)
            close = getattr(it, "close", None)
            if close is not None:
                close()
            if first is not _END:
                self._check_shards_differ()
                return first
        raise SpecError(f"every shard of {self.stream!r} read by this host is empty: there is nothing to load")

    def _check_shards_differ(self) -> None:
        """Refuse a `make` that ignores its shard index: two shards (this host's first
        two) starting with the same samples would deliver the whole stream `num_shards`
        times."""
        stream = self.stream
        if len(self.shards) < 2:
            return
        starts = []
        for shard in self.shards[:2]:  # this host's: another host's files may not be here
            it = iter(stream.make(shard, stream.num_shards))
            starts.append([x for x, _ in zip(it, range(SAME_START_SAMPLES))])
            close = getattr(it, "close", None)
            if close is not None:
                close()
        if starts[0] and len(starts[0]) == len(starts[1]) and all(
                _same_sample(a, b) for a, b in zip(*starts)):
            raise SpecError(
                f"{stream!r}: `make({self.shards[0]}, {stream.num_shards})` and "
                f"`make({self.shards[1]}, {stream.num_shards})` start "
                f"with the same {len(starts[0])} sample(s): `make` seems to ignore `shard_index` and "
                f"return the whole stream, which would then come {stream.num_shards} times per epoch. "
                "Return only shard `shard_index` of `num_shards` (e.g. `files[shard_index::num_shards]`).")

    def _shmfeed_epoch_cut(self, epoch: int, first: int) -> _EpochCut:
        return _EpochCut(len(self.shards), self.batch_size, self.drop_last, self.ended_before(epoch, first))

    def __repr__(self) -> str:
        return f"{self.stream!r} (shards {self.shards} on this host)"


def _same_sample(a: Any, b: Any) -> bool:
    """Whether two samples are equal: same structure, equal arrays and values."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_sample(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_sample(x, y) for x, y in zip(a, b))
    try:
        return bool(np.array_equal(np.asarray(a), np.asarray(b)))
    except Exception:
        return False


def sharded_source(stream: Stream, options: LoaderOptions) -> ShardedSource:
    """Check the Loader's options (as given) against `stream`; this host's `ShardedSource`."""
    o = options
    steps_per_epoch, batch_size, num_workers, shuffle = o.steps_per_epoch, o.batch_size, o.num_workers, o.shuffle
    drop_last, shard_index, shard_count = o.drop_last, o.shard_index, o.shard_count
    if steps_per_epoch is not None:
        raise SpecError("`steps_per_epoch` is for generators; an epoch of a Stream ends when every "
                        "shard has ended")
    if batch_size is None:
        raise SpecError("a Stream yields samples: give `batch_size` (a batch holds consecutive "
                        "samples of one shard)")
    if shuffle:
        raise SpecError(f"`shuffle={shuffle!r}` cannot reorder a Stream: shuffle inside `make` (e.g. the "
                        "order of records in a shard, with `shmfeed.rng()`)")
    batch_size = check_int("batch_size", batch_size, 1)
    num_workers = check_int("num_workers", num_workers, 0)
    shard_count = check_int("shard_count", shard_count, 1)
    shard_index = check_int("shard_index", shard_index, 0)
    if not isinstance(drop_last, bool):
        raise SpecError(f"`drop_last` must be True or False, got {drop_last!r}")
    # (shard_index >= shard_count is refused by _config.build, with the other options.)
    src = ShardedSource(stream, batch_size, num_workers, drop_last, shard_index % shard_count, shard_count)
    if not src.shards:
        raise SpecError(f"host {shard_index} of `shard_count={shard_count}` gets none of the "
                        f"{stream.num_shards} shards: use at least as many shards as hosts")
    if num_workers > len(src.shards):
        raise SpecError(
            f"`num_workers={num_workers}` is more than the {len(src.shards)} shard(s) this host reads: "
            "a shard is read by one worker, so the others would have nothing to do. Use "
            f"`num_workers<={len(src.shards)}`, or split the data into more shards (`num_shards`).")
    return src
