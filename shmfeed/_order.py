"""Which samples a batch holds and which random numbers it draws: pure functions of
`(seed, epoch, index)`, so that batch b is the same whatever worker builds it, however
many workers there are, and after a resume.

The RNG a dataset gets from `shmfeed.rng()` is keyed by the sample index (per-sample
sources) or the batch number (batch-level sources); nothing depends on the worker's
identity or on the state inherited through fork.
"""

from __future__ import annotations

import contextlib
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

# Stream identifiers, so that the permutation and the per-item streams never collide.
_PERMUTATION_STREAM = 0x5045524D  # "PERM"
_ITEM_STREAM = 0x4954454D  # "ITEM"
_GLOBAL_STREAM = 0x474C4F42  # "GLOB"


@dataclass(frozen=True)
class Order:
    """How an epoch is cut into batches."""

    n_items: int  # samples (per-sample source) or batches (batch-level source)
    batch_size: int | None  # None: the source is batch-level
    shuffle: bool
    seed: int
    drop_last: bool
    shard_index: int = 0
    shard_count: int = 1

    @property
    def items_per_shard(self) -> int:
        if self.shard_count == 1:
            return self.n_items
        # Every host gets the same count so that SPMD steps stay in lockstep.
        return self.n_items // self.shard_count

    @property
    def n_batches(self) -> int:
        m = self.items_per_shard
        if self.batch_size is None:
            return m
        return m // self.batch_size if self.drop_last else -(-m // self.batch_size)

    def permutation(self, epoch: int) -> np.ndarray:
        """This shard's item order for `epoch` (indices into the source)."""
        if self.shuffle:
            ss = np.random.SeedSequence([self.seed, epoch, _PERMUTATION_STREAM])
            perm = np.random.default_rng(ss).permutation(self.n_items)
        else:
            perm = np.arange(self.n_items)
        m = self.items_per_shard
        return perm[self.shard_index * m : (self.shard_index + 1) * m]

    def first_item(self) -> int:
        """The source index of the first item of epoch 0 (what the spec is inferred from)."""
        return int(self.permutation(0)[0])

    def batch_items(self, perm: np.ndarray, batch: int) -> np.ndarray:
        """Source indices of the samples of `batch` (per-sample sources)."""
        bs = self.batch_size
        assert bs is not None
        return perm[batch * bs : (batch + 1) * bs]


class _Context:
    """The (seed, epoch, index) of the item being built, and its lazily made RNG."""

    __slots__ = ("key", "gen")

    def __init__(self) -> None:
        self.key: tuple[int, int, int] | None = None
        self.gen: np.random.Generator | None = None


_ctx = _Context()


def set_item(seed: int, epoch: int, index: int) -> None:
    # Cheap on purpose: runs once per sample; the Generator is built only on demand.
    _ctx.key = (seed, epoch, index)
    _ctx.gen = None


def clear_item() -> None:
    _ctx.key = None
    _ctx.gen = None


def rng() -> np.random.Generator:
    """The random generator for the sample (or batch) being built right now.

    Call it inside `__getitem__`.  Its stream depends only on `(seed, epoch, index)`,
    so augmentations differ between samples and epochs, never repeat across forked
    workers, and are identical with any `num_workers`.  Repeated calls within one
    `__getitem__` continue the same stream.
    """
    if _ctx.key is None:
        from ._errors import ShmfeedError

        raise ShmfeedError(
            "shmfeed.rng() was called outside a sample being built by a shmfeed.Loader; "
            "call it from the source's `__getitem__`"
        )
    if _ctx.gen is None:
        seed, epoch, index = _ctx.key
        _ctx.gen = np.random.default_rng(np.random.SeedSequence([seed, epoch, index, _ITEM_STREAM]))
    return _ctx.gen


def rng_key() -> tuple[int, int, int] | None:
    """`(seed, epoch, index)` of the item being built, or None outside a build."""
    return _ctx.key


_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    # splitmix64's finaliser: a cheap, well-spread hash (this runs once per batch).
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
    return x ^ (x >> 31)


def global_seed(seed: int, epoch: int, batch: int) -> int:
    """A 32-bit seed for the legacy global RNGs (`np.random`, `random`) of one batch."""
    h = _mix64(_mix64(_mix64(seed ^ _GLOBAL_STREAM) ^ epoch) ^ batch)
    return h & 0xFFFFFFFF


def seed_global_rngs(seed: int, epoch: int, batch: int) -> None:
    """Key the global RNGs to the batch, for sources written against `np.random.*`,
    `random.*` or `torch.*` (tutorial code): forked workers then no longer repeat each
    other's draws, and the stream is the same with any `num_workers`.  torch's only
    where the source (or anything) has imported torch: shmfeed never imports it."""
    s = global_seed(seed, epoch, batch)
    np.random.seed(s)
    random.seed(s)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(s)


@contextlib.contextmanager
def kept_global_rngs() -> Iterator[None]:
    """Run the block, then put np.random, random (and torch's generator, if torch is
    imported) back as they were: the training process's global RNGs are the user's.
    About 20 us (torch's CUDA generators are left alone: a build never seeds them)."""
    torch = sys.modules.get("torch")
    saved = (np.random.get_state(), random.getstate(),
             torch.get_rng_state() if torch is not None else None)
    try:
        yield
    finally:
        np.random.set_state(saved[0])
        random.setstate(saved[1])
        if saved[2] is not None:
            torch.set_rng_state(saved[2])


def seed_of_user_rng() -> int:
    """A seed taken from the state of the user's `np.random` without drawing from it:
    after `np.random.seed(s)` it is a function of `s`, and the user's stream goes on
    exactly as if shmfeed were not there (what `seed=None` means)."""
    _, key, pos, *_ = np.random.get_state()
    entropy = np.random.SeedSequence([*key.tolist(), int(pos)]).generate_state(1, np.uint32)
    return int(entropy[0])
