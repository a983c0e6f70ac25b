"""Length bucketing: batches of samples of similar length, each padded to the smallest
of a few `bucket_boundaries` that holds all of its samples.

Owns the grouping of an epoch's samples into batches by length, the bucket of each
batch, and how a slot tells the consumer its batch's bucket.

Grouping.  The lengths (`bucket_lengths`: one int per source index, or a function of
the index, computed once at construction) give each sample its bucket: the smallest
boundary >= its length.  An epoch takes the order _order/order.py gives it; the positions
that make full global batches are cut into windows of `WINDOW_BATCHES` global
batches, each window's samples are stably sorted by bucket (so samples of one bucket
stay in their shuffled order), and the full global batches are then shuffled
(`shuffle=True`, keyed by (seed, epoch)).  The positions of a last, partial global
batch keep their order.  So the grouping is a pure function of (seed, epoch, lengths,
global batch size): every sample exactly once, the same with any `num_workers`, any
host count at the same global batch size, and after a resume at any batch.

A batch is computed from its window alone (`Grouping`: O(window) work and memory, the
last window kept), never from the whole epoch; the batches' shuffle is numpy's
permutation of the epoch's full global batches (one int64 per global batch, once per
epoch and process), kept because a keyed bijection would change every stream so far.

Token budgets (`token_budget=T`, `BudgetOrder`): bucket k's batches have
`T // boundaries[k]` rows each, a finite set of shapes.  Each bucket is an order of its
own over its samples (csrc/order.h, keyed by (seed, epoch, k)), cut into global batches
of `shard_count` host batches; the samples left over after its last full global batch
move up to the next bucket (padded longer, they still fit), so only the largest bucket
can end with a partial global batch, which goes last and, like Order's, is split
evenly between hosts unless `drop_last`.  The full batches of all buckets are
interleaved by a keyed bijection (`shuffle`).  Every sample exactly once per epoch
(with one host and `drop_last=False`); the number of batches is the same every epoch.
Resolving a bucket's k-th sample needs the source indices sorted by bucket: one array
of n indices, made once at construction (like the lengths themselves), nothing per
epoch.

A global batch's bucket is the largest bucket of the samples it delivers (all hosts'
rows: every host of an SPMD step gets the same shapes); with a token budget, the
bucket whose order it comes from.

The bucket of a built batch travels in the slot's published `rows` word, above the
row count (`pack`/`unpack`): the consumer needs it to shape the batch's views and
computes nothing itself.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _kernels
from .._errors import SpecError, internal
from .order import _C_SHUFFLE, Order

WINDOW_BATCHES = 64  # global batches grouped by length together: more pads less, mixes less
BUCKET_STREAM = 0x42554B54  # "BUKT": the batches' shuffle, apart from every other stream
BUDGET_STREAM = 0x54424754  # "TBGT": token budgets' bucket orders and their interleaving
_ROWS_BITS = 32
_ROWS_MASK = (1 << _ROWS_BITS) - 1


def pack(rows: int, bucket: int | None) -> int:
    """The slot's published word: `rows`, and `bucket` + 1 above it (0: no bucket)."""
    return rows if bucket is None else rows | ((bucket + 1) << _ROWS_BITS)


def unpack(word: int) -> tuple[int, int | None]:
    high = word >> _ROWS_BITS
    return word & _ROWS_MASK, (high - 1 if high else None)


def item_buckets(lengths: Any, n_items: int, boundaries: tuple[int, ...]) -> np.ndarray:
    """Each source index's bucket (uint8), from `bucket_lengths` (a sequence of
    `n_items` ints or a function index -> int), checked."""
    if callable(lengths):
        fn: Callable[[int], Any] = lengths
        values = np.empty(n_items, np.int64)
        for i in range(n_items):
            v = fn(i)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise SpecError(f"`bucket_lengths({i})` returned {v!r}, expected an int (the sample's "
                                "length along its bucketed dimension)")
            values[i] = v
    else:
        try:
            values = np.asarray(lengths)
        except (TypeError, ValueError) as exc:
            raise SpecError(f"`bucket_lengths` must be a sequence of ints or a function of the "
                            f"index: {exc}") from exc
        if values.ndim != 1 or values.dtype.kind not in "iu":
            raise SpecError(f"`bucket_lengths` must be one int per sample (a 1-d integer array), "
                            f"got dtype {values.dtype} shape {values.shape}")
        if len(values) != n_items:
            raise SpecError(f"`bucket_lengths` has {len(values)} entries, the source {n_items} samples: "
                            "give one length per source index")
    bad = np.flatnonzero((values < 0) | (values > boundaries[-1]))
    if len(bad):
        i = int(bad[0])
        raise SpecError(
            f"`bucket_lengths`: sample {i} has length {int(values[i])}, outside 0..{boundaries[-1]} "
            f"(the largest of `bucket_boundaries`; {len(bad)} sample(s) in all). Crop those samples "
            "in `__getitem__` (and give their cropped length) or add a larger boundary.")
    return np.searchsorted(np.asarray(boundaries), values, side="left").astype(np.uint8)


def lengths_digest(buckets: np.ndarray) -> int:
    """What the grouping depends on of the lengths, as one int (for a loader's state)."""
    return zlib.crc32(np.ascontiguousarray(buckets).tobytes())


class Grouping:
    """An epoch's grouped full global batches, computed one window at a time (see the
    module docstring): global batch g is batch s % WINDOW_BATCHES of window
    s // WINDOW_BATCHES grouped, s the batches' shuffle of g."""

    def __init__(self, order: Order, buckets: np.ndarray, global_batch: int, full_batches: int,
                 shuffle: bool, seed: int):
        self.plain = order  # the order before grouping: its `c_order` maps positions
        self.buckets = buckets
        self.global_batch = global_batch
        self.full_batches = full_batches
        self.shuffle = shuffle
        self.seed = seed
        self._perm: tuple[int, np.ndarray] | None = None  # (epoch, the batches' shuffle)
        self._window: tuple[int, int, np.ndarray] | None = None  # (epoch, window, its grouped items)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_perm": None, "_window": None}  # recomputed where needed

    def source_batch(self, epoch: int, g: int) -> int:
        """The window-ordered batch that is global batch g of `epoch`."""
        nb = self.full_batches
        if not (self.shuffle and nb > 1):
            return g
        if self._perm is None or self._perm[0] != epoch:
            # numpy's permutation keeps the batches of earlier versions bit for bit; it is
            # the one thing here of epoch size: one int64 per global batch.
            ss = np.random.SeedSequence([self.seed, epoch, BUCKET_STREAM])
            self._perm = (epoch, np.random.default_rng(ss).permutation(nb))
        return int(self._perm[1][g])

    def window(self, epoch: int, w: int) -> np.ndarray:
        """The source indices of window `w`'s full global batches, grouped: stably
        sorted by bucket, so samples of one bucket keep their order."""
        if self._window is None or self._window[:2] != (epoch, w):
            span = WINDOW_BATCHES * self.global_batch
            end = min((w + 1) * span, self.full_batches * self.global_batch)
            items = self.plain.indices(epoch, np.arange(w * span, end, dtype=np.int64))
            items = items[np.argsort(self.buckets[items], kind="stable")]
            self._window = (epoch, w, items)
        return self._window[2]

    def batch(self, epoch: int, g: int) -> np.ndarray:
        """Source indices of full global batch g of `epoch` (a view: do not write)."""
        s = self.source_batch(epoch, g)
        j = s % WINDOW_BATCHES
        return self.window(epoch, s // WINDOW_BATCHES)[j * self.global_batch : (j + 1) * self.global_batch]


@dataclass(frozen=True, eq=False)
class BucketedOrder(Order):
    """An Order whose epochs are grouped by length (see the module docstring): the
    same global batches and host rows (Order's arithmetic), over the grouped order of
    positions.  Not C's: `c_order` is None, so no worker's C loop builds it."""

    boundaries: tuple[int, ...] = ()
    buckets: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8), repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        plain = Order(self.n_items, self.batch_size, self.shuffle, self.seed, self.drop_last,
                      shuffle_block=self.shuffle_block)
        object.__setattr__(self, "_grouping", Grouping(plain, self.buckets, self.global_batch_size,
                                                       self._full_batches, bool(self.shuffle), self.seed))

    def indices(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        """Source indices at `positions` of `epoch`'s grouped order; overwrites
        `positions` and returns it, as Order.indices does."""
        grouping: Grouping = self._grouping  # type: ignore[attr-defined]
        gbs, full = self.global_batch_size, self._full_batches * self.global_batch_size
        out = positions.copy()
        tail = positions >= full
        if tail.any():
            out[tail] = Order.indices(self, epoch, positions[tail].copy())
        for i in np.flatnonzero(~tail):
            p = int(positions[i])
            out[i] = grouping.batch(epoch, p // gbs)[p % gbs]
        positions[:] = out
        return positions

    def batch_items(self, epoch: int, batch: int) -> np.ndarray:
        """Source indices (int64) of the samples of this host's `batch` of `epoch`."""
        if batch >= self._full_batches:  # the partial global batch keeps Order's positions
            return super().batch_items(epoch, batch)
        self._check_batch(batch)
        grouping: Grouping = self._grouping  # type: ignore[attr-defined]
        bs = self.batch_size
        assert bs is not None
        return grouping.batch(epoch, batch)[self.shard_index * bs : (self.shard_index + 1) * bs].copy()

    def bucket(self, epoch: int, batch: int) -> int:
        """The bucket of `batch` of `epoch` (every host's batch `batch` has the same)."""
        self._check_batch(batch)
        if batch < self._full_batches:
            grouping: Grouping = self._grouping  # type: ignore[attr-defined]
            return int(self.buckets[grouping.batch(epoch, batch)].max())
        first = self._full_batches * self.global_batch_size  # every host's rows of the partial batch
        tail = Order.indices(self, epoch, np.arange(first, first + self._tail_rows * self.shard_count,
                                                    dtype=np.int64))
        return int(self.buckets[tail].max())

    def fingerprint_extra(self) -> dict:
        """What the grouping adds to the stream's fingerprint (_state.fingerprint)."""
        return {"bucket_boundaries": list(self.boundaries), "bucket_lengths_crc32": lengths_digest(self.buckets)}


@lru_cache(maxsize=256)
def _budget_key(seed: int, epoch: int, part: int) -> int:
    """The key of bucket `part`'s order of `epoch` (part = the bucket count: of the
    interleaving of their batches)."""
    ss = np.random.SeedSequence([seed, epoch, BUDGET_STREAM, part])
    return int(ss.generate_state(1, np.uint64)[0])


@dataclass(frozen=True, eq=False)
class BudgetOrder(BucketedOrder):
    """Batches of `token_budget // boundaries[k]` rows for bucket k (see the module
    docstring); `batch_size` is the largest of them (bucket 0's), what a slot holds."""

    token_budget: int = 0
    if TYPE_CHECKING:  # set by __post_init__, not fields (not compared, not shown)
        bucket_rows: tuple[int, ...] = field(init=False, compare=False)  # each bucket's batch size
        _members: np.ndarray = field(init=False, compare=False)
        _starts: np.ndarray = field(init=False, compare=False)
        _orders: list[_kernels.EpochOrder] = field(init=False, compare=False)
        _moved: list[int] = field(init=False, compare=False)
        _first: np.ndarray = field(init=False, compare=False)

    def __post_init__(self) -> None:
        Order.__post_init__(self)  # checks the options; its batches are not these
        T, k, buckets = self.token_budget, self.shard_count, self.buckets
        n_buckets = len(self.boundaries)
        rows = tuple(T // b for b in self.boundaries)
        assert min(rows) >= 1 and rows[0] == self.batch_size, (rows, self.batch_size)
        counts = np.bincount(buckets, minlength=n_buckets)
        # Source indices sorted by bucket (stably: by index within one); bucket j's own
        # samples are members[starts[j]:starts[j + 1]].
        members = np.argsort(buckets, kind="stable").astype(np.uint32 if self.n_items <= 2**32 else np.int64)
        starts = np.concatenate([[0], np.cumsum(counts)])
        orders, moved, full = [], [0], []
        for j in range(n_buckets):
            m = int(counts[j]) + moved[-1]  # own samples, after those moved up from below
            top = j == n_buckets - 1
            c = _kernels.EpochOrder(m, rows[j], k, self.shard_index, self.drop_last if top else True,
                                    _C_SHUFFLE[self.shuffle], self.shuffle_block)
            orders.append(c)
            full.append(c.full_batches)
            moved.append(m - c.full_batches * k * rows[j])
        n_full = sum(full)
        set_ = object.__setattr__
        set_(self, "bucket_rows", rows)
        set_(self, "_members", members)
        set_(self, "_starts", starts)
        set_(self, "_orders", orders)
        set_(self, "_moved", moved)  # moved[j]: samples bucket j takes from bucket j - 1
        set_(self, "_first", np.concatenate([[0], np.cumsum(full)]))  # first batch of each bucket
        set_(self, "_full_batches", n_full)
        set_(self, "_tail_rows", orders[-1].tail_rows)
        set_(self, "_n_batches", n_full + (1 if orders[-1].tail_rows else 0))

    @property
    def items_per_shard(self) -> int:
        return sum(c.full_batches * c.batch_size for c in self._orders) + self._tail_rows

    def check_not_empty(self) -> None:
        if self.n_batches:
            return
        raise SpecError(
            f"no batch to load: {self.n_items} samples make no full global batch under "
            f"`token_budget={self.token_budget}` (`shard_count` x rows of the largest bucket = "
            f"{self.shard_count} x {self.bucket_rows[-1]}) with `drop_last=True`. Lower "
            "`token_budget` or set `drop_last=False`.")

    def _locate(self, epoch: int, batch: int) -> tuple[int, int]:
        """(bucket, batch of that bucket's order) of this epoch's `batch`."""
        self._check_batch(batch)
        if batch >= self._full_batches:  # the partial batch of the largest bucket goes last
            return len(self.boundaries) - 1, self._orders[-1].full_batches
        s = batch
        if self.shuffle and self._full_batches > 1:
            at = np.array([batch], np.int64)
            _kernels.permute(self._full_batches, _budget_key(self.seed, epoch, len(self.boundaries)), at, at)
            s = int(at[0])
        first = self._first
        j = int(np.searchsorted(first, s, side="right")) - 1
        return j, s - int(first[j])

    def _key(self, epoch: int, j: int) -> int:
        return _budget_key(self.seed, epoch, j) if self.shuffle else 0

    def _resolve(self, epoch: int, j: int, values: np.ndarray) -> np.ndarray:
        """Source indices of bucket j's values (its order's items, in [0, m_j)): the
        first moved[j] are the samples bucket j - 1 moved up, the rest its own."""
        moved = self._moved[j]
        out = np.empty(len(values), np.int64)
        own = values >= moved
        out[own] = self._members[self._starts[j] + values[own] - moved]
        if not own.all():
            below = self._orders[j - 1]
            # Moved-up sample u is at position (its full global batches' end) + u of bucket j - 1.
            positions = values[~own] + below.full_batches * self.shard_count * below.batch_size
            below.indices(self._key(epoch, j - 1), positions, positions)
            out[~own] = self._resolve(epoch, j - 1, positions)
        return out

    def batch_items(self, epoch: int, batch: int) -> np.ndarray:
        j, i = self._locate(epoch, batch)
        c = self._orders[j]
        values = np.empty(c.rows(i), np.int64)
        c.batch(self._key(epoch, j), i, values)
        return self._resolve(epoch, j, values)

    def indices(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        raise internal("a token-budget epoch has no single order of positions: use batch_items")

    def bucket(self, epoch: int, batch: int) -> int:
        return self._locate(epoch, batch)[0]

    def fingerprint_extra(self) -> dict:
        # Each bucket's global batch size decides the stream, not the budget itself (80
        # and 83 tokens give the same batches over boundaries 4, 8, 16, 40).
        return {**super().fingerprint_extra(),
                "bucket_global_batch_sizes": [self.shard_count * r for r in self.bucket_rows]}
