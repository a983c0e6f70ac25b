"""Length bucketing: batches of samples of similar length, each padded to the smallest
of a few `bucket_boundaries` that holds all of its samples.

Owns the grouping of an epoch's samples into batches by length, the bucket of each
batch, and how a slot tells the consumer its batch's bucket.

Grouping.  The lengths (`bucket_lengths`: one int per source index, or a function of
the index, computed once at construction) give each sample its bucket: the smallest
boundary >= its length.  An epoch takes the order _order.py gives it; the positions
that make full global batches are cut into windows of `WINDOW_BATCHES` global
batches, each window's samples are stably sorted by bucket (so samples of one bucket
stay in their shuffled order), and the full global batches are then shuffled
(`shuffle=True`, keyed by (seed, epoch)).  The positions of a last, partial global
batch keep their order.  So the grouping is a pure function of (seed, epoch, lengths,
global batch size): every sample exactly once, the same with any `num_workers`, any
host count at the same global batch size, and after a resume at any batch.

A global batch's bucket is the largest bucket of the samples it delivers (all hosts'
rows: every host of an SPMD step gets the same shapes).

The bucket of a built batch travels in the slot's published `rows` word, above the
row count (`pack`/`unpack`): the consumer needs it to shape the batch's views and
computes nothing itself.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._errors import SpecError
from ._order import Order

WINDOW_BATCHES = 64  # global batches grouped by length together: more pads less, mixes less
BUCKET_STREAM = 0x42554B54  # "BUKT": the batches' shuffle, apart from every other stream
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
    """Per epoch: the bucketed order of positions, and each global batch's bucket."""

    def __init__(self, buckets: np.ndarray, global_batch: int, full_batches: int, tail_rows: int,
                 shuffle: bool, seed: int):
        self.buckets = buckets
        self.global_batch = global_batch
        self.full_batches = full_batches
        self.tail_rows = tail_rows  # positions of the partial global batch that are delivered
        self.shuffle = shuffle
        self.seed = seed
        self._epoch: int | None = None
        self._order: np.ndarray | None = None
        self._batch_buckets: np.ndarray | None = None

    def __getstate__(self) -> dict:
        # A process that receives the order computes its epochs itself (O(n) to send).
        return {**self.__dict__, "_epoch": None, "_order": None, "_batch_buckets": None}

    def epoch(self, epoch: int, items: Callable[[], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(source index at each position, bucket of each global batch) of `epoch`,
        from `items()`, the epoch's order before grouping; cached for the last epoch."""
        if self._epoch != epoch:
            self._order, self._batch_buckets = self._group(epoch, items())
            self._epoch = epoch
        assert self._order is not None and self._batch_buckets is not None
        return self._order, self._batch_buckets

    def _group(self, epoch: int, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        gbs, nb = self.global_batch, self.full_batches
        full = nb * gbs
        head = items[:full]
        b = self.buckets[head].astype(np.int64)
        window = np.arange(full, dtype=np.int64) // (WINDOW_BATCHES * gbs)
        head = head[np.argsort(window * 256 + b, kind="stable")]
        if self.shuffle and nb > 1:
            ss = np.random.SeedSequence([self.seed, epoch, BUCKET_STREAM])
            head = head.reshape(nb, gbs)[np.random.default_rng(ss).permutation(nb)].reshape(-1)
        order = np.concatenate([head, items[full:]])
        batch_buckets = self.buckets[head].reshape(nb, gbs).max(axis=1) if nb else np.zeros(0, np.uint8)
        if self.tail_rows:
            tail = self.buckets[order[full : full + self.tail_rows]].max()
            batch_buckets = np.append(batch_buckets, tail)
        return order, batch_buckets.astype(np.int64)


@dataclass(frozen=True, eq=False)
class BucketedOrder(Order):
    """An Order whose epochs are grouped by length (see the module docstring): the
    same global batches and host rows (Order's arithmetic), over the grouped order of
    positions."""

    boundaries: tuple[int, ...] = ()
    buckets: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8), repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        grouping = Grouping(self.buckets, self.global_batch_size, self._full_batches,
                            self._tail_rows * self.shard_count, bool(self.shuffle), self.seed)
        object.__setattr__(self, "_grouping", grouping)

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        grouping: Grouping = self._grouping  # type: ignore[attr-defined]
        return grouping.epoch(epoch, lambda: Order.indices(self, epoch, np.arange(self.n_items, dtype=np.int64)))

    def indices(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        """Source indices at `positions` of `epoch`'s grouped order; overwrites
        `positions` and returns it, as Order.indices does."""
        positions[:] = self._epoch(epoch)[0][positions]
        return positions

    def bucket(self, epoch: int, batch: int) -> int:
        """The bucket of `batch` of `epoch` (every host's batch `batch` has the same)."""
        return int(self._epoch(epoch)[1][batch])

    def fingerprint_extra(self) -> dict:
        """What the grouping adds to the stream's fingerprint (_state.fingerprint)."""
        return {"bucket_boundaries": list(self.boundaries), "bucket_lengths_crc32": lengths_digest(self.buckets)}
