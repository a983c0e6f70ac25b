"""The random numbers a source draws: pure functions of `(seed, epoch, index)`, so that
a sample's augmentations are the same whatever worker builds it, however many workers
there are, and after a resume.

The RNG a source gets from `shmfeed.rng()` is keyed by the sample index (per-sample
sources) or the source batch index (batch-level sources); nothing depends on the
worker's identity or on the state inherited through fork.  The legacy global RNGs
(`np.random`, `random`) are keyed per loader batch (`seed_global_rngs`).
`build_sample` builds one item by hand with the keying a worker uses.

The stream constants below keep every keyed stream of shmfeed apart (the epoch order
in _order/order.py uses `PERMUTATION_STREAM`).
"""

from __future__ import annotations

import contextlib
import random
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

from .._errors import ShmfeedError

PERMUTATION_STREAM = 0x5045524D  # "PERM": the epoch order
ITEM_STREAM = 0x4954454D  # "ITEM": shmfeed.rng() of one sample or source batch
GLOBAL_STREAM = 0x474C4F42  # "GLOB": np.random / random of one loader batch
BATCH_STREAM = 0x42415443  # "BATC": shmfeed.rng() of a batch_transform


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


def set_batch(seed: int, epoch: int, batch: int) -> None:
    """Key `rng()` to loader batch `batch` (a batch transform runs), apart from its samples'."""
    _ctx.key = (seed, epoch, batch)
    _ctx.gen = np.random.default_rng(np.random.SeedSequence([seed, epoch, batch, BATCH_STREAM]))


def samples_of(source: Any, seed: int, epoch: int, items: list[int]) -> list:
    """`source[i]` for each `i` of `items`, each with its own `rng()` (set_item, inlined:
    this loop runs for every sample).  If one raises, `current_index()` names it."""
    ctx = _ctx
    samples: list = []
    append = samples.append
    for index in items:
        ctx.key = (seed, epoch, index)
        ctx.gen = None
        append(source[index])
    return samples


def current_index() -> int | None:
    """The index of the sample being built, if any."""
    return None if _ctx.key is None else _ctx.key[2]


def clear_item() -> None:
    _ctx.key = None
    _ctx.gen = None


def rng() -> np.random.Generator:
    """The random generator for the sample (or batch) being built right now.

    Call it inside `__getitem__`.  Its stream depends only on `(seed, epoch, index)`,
    so augmentations differ between samples and epochs, never repeat across forked
    workers, and are identical with any `num_workers`.  Repeated calls within one
    `__getitem__` continue the same stream.  To build an item by hand, outside a
    loader, use `shmfeed.build_sample`.
    """
    if _ctx.key is None:
        raise ShmfeedError(
            "shmfeed.rng() was called outside a sample being built by a shmfeed.Loader; "
            "call it from the source's `__getitem__`. To build sample i by hand (e.g. to debug "
            "the source), call `shmfeed.build_sample(source, i, seed=..., epoch=...)`: "
            "it draws what a worker of a Loader with that `seed` draws in that epoch."
        )
    if _ctx.gen is None:
        seed, epoch, index = _ctx.key
        _ctx.gen = np.random.default_rng(np.random.SeedSequence([seed, epoch, index, ITEM_STREAM]))
    return _ctx.gen


def rng_key() -> tuple[int, int, int] | None:
    """`(seed, epoch, index)` of the item being built, or None outside a build."""
    return _ctx.key


def build_sample(source: Any, index: int, *, seed: int = 0, epoch: int = 0,
                 batch: int | None = None) -> Any:
    """`source[index]` built as a worker of `Loader(source, seed=seed, ...)` builds it in
    `epoch`: `shmfeed.rng()` inside gives the same stream, so this reproduces a sample
    (or, with `batch_size=None`, a source batch) outside the loader, e.g. to debug it.

    `index` is the source's index (the loader's order maps batch positions to it).  With
    `batch`, the global RNGs `np.random` and `random` are also seeded as a worker seeds
    them for that loader batch (`seed_global_rngs=True`), and restored afterwards;
    without it they are left alone.
    """
    saved_key, saved_gen = _ctx.key, _ctx.gen
    with kept_global_rngs() if batch is not None else contextlib.nullcontext():
        try:
            if batch is not None:
                seed_global_rngs(seed, epoch, batch)
            set_item(seed, epoch, index)
            return source[index]
        finally:
            _ctx.key, _ctx.gen = saved_key, saved_gen


_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    # splitmix64's finaliser: a cheap, well-spread hash (this runs once per batch).
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
    return x ^ (x >> 31)


def global_seed(seed: int, epoch: int, batch: int) -> int:
    """A 32-bit seed for the legacy global RNGs (`np.random`, `random`) of one batch."""
    h = _mix64(_mix64(_mix64(seed ^ GLOBAL_STREAM) ^ epoch) ^ batch)
    return h & 0xFFFFFFFF


def seed_global_rngs(seed: int, epoch: int, batch: int) -> None:
    """Key the global RNGs to the batch, for sources written against `np.random.*`,
    `random.*` or `torch.*` (tutorial code): forked workers then no longer repeat each
    other's draws, and the stream is the same with any `num_workers`.  torch's only
    where the source (or anything) has imported torch: shmfeed never imports it.  Its
    CPU generator, the one `torch.rand` & co. draw from in a worker, seeded directly:
    `torch.manual_seed` also visits every accelerator backend, ~220 us a call, which
    made batches of a few small samples 8x slower once torch was imported."""
    s = global_seed(seed, epoch, batch)
    np.random.seed(s)
    random.seed(s)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.default_generator.manual_seed(s)


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
        if torch is not None and saved[2] is not None:
            torch.set_rng_state(saved[2])


def seed_of_user_rng() -> int:
    """A seed taken from the state of the user's `np.random` without drawing from it:
    after `np.random.seed(s)` it is a function of `s`, and the user's stream goes on
    exactly as if shmfeed were not there (what `seed=None` means)."""
    state: Any = np.random.get_state()  # (name, key, pos, ...): numpy's stub is a union with a dict
    _, key, pos, *_ = state
    entropy = np.random.SeedSequence([*key.tolist(), int(pos)]).generate_state(1, np.uint32)
    return int(entropy[0])
