"""Which samples each batch of an epoch holds: a pure function of `(seed, epoch,
batch)` and the options, computed per batch in O(1) memory, so that batch b is the
same whatever worker builds it, however many workers or hosts there are, and after a
resume.  (The random numbers a sample draws are _order/rng.py's.)

Positions.  An epoch orders the n source items: position p of epoch e holds item
`pi_e(p)`, where `pi_e` is the identity (`shuffle=False`), a keyed bijection on [0, n)
(`shuffle=True`), or the same over runs of `shuffle_block` consecutive items, shuffled
within each run too (`shuffle="block"`: a batch then reads from one or two runs, for
sequential reads from disk).  The bijections (csrc/kernels.h) are computed per
position from a 64-bit key derived from `(seed, epoch)`; nothing of size n is ever
built, and any n up to 2^40 works.

Described once, in C: csrc/order.h (`_kernels.EpochOrder`) holds the arithmetic below
and the map, and both `Order.batch_items` and the workers' C loop for array sources
(csrc/gather.c) call it.  The key is derived here (`epoch_key`) and published by the
training process with each epoch's generation, where the C loop reads it.

Global batches (elastic sharding).  With `shard_count=k` hosts and `batch_size=B`,
global batch g is positions [g*k*B, (g+1)*k*B), and host h's batch g is its rows
[h*B, (h+1)*B): positions g*k*B + h*B + r, r in [0, B).  So global batch g is the same
for any k at the same global batch size k*B, and a run can resume with another host
count.  Every host gets the same number of batches, so SPMD steps stay in lockstep:

- the m = n mod (k*B) positions after the last full global batch form a last, partial
  global batch only with `drop_last=False`; it is split evenly, host h taking the
  q = m // k positions from (n - m) + h*q, and the m - k*q < k positions left over are
  not delivered in that epoch (shuffled, they are other samples each epoch).  With
  k = 1 this is just the short last batch.  With q = 0 there is no partial batch.
- batch-level sources (`batch_size=None`): position p holds a source batch; host h's
  batch g is the one at position g*k + h, n // k batches per host.

Invariant: over an epoch, the hosts' batches hold distinct items (each at most once),
every item exactly once when k = 1 and `drop_last=False`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from .. import _kernels
from .._errors import ShmfeedError, SpecError
from .rng import PERMUTATION_STREAM

SHUFFLE_MODES = (False, True, "block")
# The C order's mode of each `shuffle` value (the codes are csrc/order.h's).
_C_SHUFFLE = {False: _kernels.SHUFFLE_NONE, True: _kernels.SHUFFLE_FULL, "block": _kernels.SHUFFLE_BLOCK}
DEFAULT_SHUFFLE_BLOCK = 256  # samples: a few MB of typical records, one sequential read
MAX_SHUFFLED_ITEMS = _kernels.ORDER_MAX_N


@lru_cache(maxsize=64)
def _epoch_key(seed: int, epoch: int) -> int:
    # SeedSequence takes any non-negative seed (even beyond 64 bits) and spreads it
    # well; cached because it costs ~10 us and every batch of the epoch needs it.
    ss = np.random.SeedSequence([seed, epoch, PERMUTATION_STREAM])
    return int(ss.generate_state(1, np.uint64)[0])


@dataclass(frozen=True)
class Order:
    """How an epoch is cut into batches (see the module docstring)."""

    n_items: int  # samples (per-sample source) or batches (batch-level source)
    batch_size: int | None  # None: the source is batch-level
    shuffle: bool | str  # one of SHUFFLE_MODES
    seed: int
    drop_last: bool
    shard_index: int = 0
    shard_count: int = 1
    shuffle_block: int = DEFAULT_SHUFFLE_BLOCK  # samples per run, for shuffle="block"
    if TYPE_CHECKING:  # set by __post_init__, not fields (not compared, not shown)
        _c: _kernels.EpochOrder = field(init=False, compare=False)
        _full_batches: int = field(init=False, compare=False)
        _tail_rows: int = field(init=False, compare=False)
        _n_batches: int = field(init=False, compare=False)

    def __post_init__(self) -> None:
        shuffle = self.shuffle
        if isinstance(shuffle, (bool, np.bool_)):
            object.__setattr__(self, "shuffle", bool(shuffle))
        elif not (isinstance(shuffle, str) and shuffle == "block"):
            raise SpecError(f"`shuffle` must be True, False or 'block', got {shuffle!r}")
        b = self.shuffle_block
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1:
            raise SpecError(f"`shuffle_block` must be an integer >= 1 (samples), got {b!r}")
        object.__setattr__(self, "shuffle_block", int(b))
        if self.shuffle and self.n_items > MAX_SHUFFLED_ITEMS:
            raise SpecError(
                f"`shuffle={self.shuffle!r}` orders at most 2**40 = {MAX_SHUFFLED_ITEMS} items, "
                f"the source has {self.n_items}. Set `shuffle=False`, or shuffle within parts "
                "of the source yourself.")
        # The order in C (csrc/order.h), with the arithmetic every batch needs, done
        # once there (not fields: not compared, not shown).  A batch-level source is
        # batches of one position, never partial.
        c = _kernels.EpochOrder(self.n_items, self.batch_size or 1, self.shard_count, self.shard_index,
                                self.drop_last or self.batch_size is None, _C_SHUFFLE[self.shuffle],
                                self.shuffle_block)
        object.__setattr__(self, "_c", c)
        object.__setattr__(self, "_full_batches", c.full_batches)
        object.__setattr__(self, "_tail_rows", c.tail_rows)
        object.__setattr__(self, "_n_batches", c.n_batches)

    # -- sizes -----------------------------------------------------------------------
    @property
    def global_batch_size(self) -> int:
        """Positions per global batch: `shard_count * batch_size` (`shard_count` source
        batches for a batch-level source)."""
        return self.shard_count * (self.batch_size or 1)

    @property
    def n_batches(self) -> int:
        """Batches per epoch, the same on every host."""
        return self._n_batches

    @property
    def items_per_shard(self) -> int:
        """Samples (source batches) this host gets per epoch."""
        return self._full_batches * (self.batch_size or 1) + self._tail_rows

    def check_not_empty(self) -> None:
        """Raise a SpecError saying why, if an epoch has no batch."""
        if self.n_batches:
            return
        n, k, bs = self.n_items, self.shard_count, self.batch_size
        if bs is None:
            raise SpecError(f"no batch to load: {n} source batches for `shard_count={k}` hosts, "
                            "each host needs one per step. Use fewer hosts.")
        if self.drop_last:
            raise SpecError(
                f"no batch to load: {n} samples make no full global batch of `shard_count` x "
                f"`batch_size` = {k} x {bs} = {k * bs} samples with `drop_last=True`. Lower "
                "`batch_size` or set `drop_last=False`.")
        raise SpecError(f"no batch to load: {n} samples cannot give each of `shard_count={k}` hosts "
                        "a row. Use fewer hosts.")

    # -- the map -----------------------------------------------------------------------
    def indices(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        """Source indices at `positions` (int64, in [0, n_items)) of `epoch`'s order.
        Overwrites `positions` and returns it."""
        self._c.indices(self.epoch_key(epoch), positions, positions)
        return positions

    def epoch_key(self, epoch: int) -> int:
        """The 64-bit key of `epoch`'s order (0 when unshuffled: unused).  The training
        process publishes it with each epoch (`Control.start_epoch`) for the workers'
        C loop."""
        return _epoch_key(self.seed, epoch) if self.shuffle else 0

    @property
    def c_order(self) -> _kernels.EpochOrder | None:
        """The order as csrc/order.h describes it, for the workers' C loop
        (`_core.GatherPlan`); None for an order C does not compute (a subclass's)."""
        return self._c if type(self) is Order else None

    def first_item(self) -> int:
        """The source index of the first item of epoch 0 (what the spec is inferred from)."""
        return self.source_batch(0, 0) if self.batch_size is None else int(self.batch_items(0, 0)[0])

    def _check_batch(self, batch: int) -> None:
        if not 0 <= batch < self._n_batches:
            raise ShmfeedError(f"batch {batch} is outside the epoch's {self._n_batches} batches")

    def batch_items(self, epoch: int, batch: int) -> np.ndarray:
        """Source indices (int64) of the samples of this host's `batch` of `epoch`."""
        self._check_batch(batch)
        assert self.batch_size is not None, "batch_items is for per-sample sources"
        out = np.empty(self.batch_size if batch < self._full_batches else self._tail_rows, np.int64)
        self._c.batch(self.epoch_key(epoch), batch, out)
        return out

    def source_batch(self, epoch: int, batch: int) -> int:
        """Source batch index of this host's `batch` of `epoch` (batch-level sources)."""
        self._check_batch(batch)
        assert self.batch_size is None, "source_batch is for batch-level sources"
        out = np.empty(1, np.int64)
        self._c.batch(self.epoch_key(epoch), batch, out)
        return int(out[0])
