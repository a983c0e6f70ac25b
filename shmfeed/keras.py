"""shmfeed.keras: feed Keras 3's `model.fit` / `evaluate` / `predict` from a shmfeed Loader.

    train = shmfeed.keras.feed(DataGenerator(ids, labels), num_workers=2)
    model.fit(train, validation_data=shmfeed.keras.feed(val, num_workers=1), epochs=10)

Owns `Feed`, the `keras.utils.PyDataset` that Keras iterates, and what makes it behave
exactly like the `Sequence` it wraps under Keras's own in-process loading.  This is the
only module of shmfeed that imports keras.

How Keras 3 drives a PyDataset (keras.src.trainers.epoch_iterator, data_adapters/
py_dataset_adapter.py; read for keras 3.15), and what the Feed does about it:

- Per epoch it calls `on_epoch_begin()`, then `__getitem__` for the epoch's indices,
  then `on_epoch_end()`, all in the training process; with `workers=0` (the Feed's, and
  read-only) from a single thread, with no enqueuer of Keras's own.  The Feed runs the
  Sequence's own hooks there, at those very moments, and nowhere else.
- `fit(shuffle=True)`, the default, reorders the batch indices of every pass with
  Python's global `random.shuffle(list(range(n)))`, as the pass's first batch is asked.
  A Sequence's batches then come in that order, as under Keras: at `on_epoch_begin` the
  Feed keeps `random`'s state; at the first `__getitem__` it recognises the shuffle by
  the state it leaves (it replays it on a copy of the state; the user's stream is never
  drawn from), and the workers build the batches in Keras's order.  A Loader or a
  per-sample source keeps the Loader's own order (its `shuffle`), Keras's index is then
  only a position, and a warning says once that fit's `shuffle` does not apply.
- `steps_per_epoch` smaller than a pass continues the same pass in the next epoch (no
  reshuffle until it is used up), with the hooks still run at every epoch's end.  So a
  pass can be cut by hooks: after a hook the rest of the pass is built from the updated
  Sequence, as Keras would.  `fit` also reads one batch to build an unbuilt model, then
  ends that epoch early (the hooks run once more, as under Keras).
- Any other index than the one expected (threads, random access, something drawing
  from `random` between `on_epoch_begin` and the first batch) raises a ShmfeedError
  instead of silently handing out another batch.

Invariants:
1. Batch k of a pass is the Sequence's batch at Keras's k-th index, built from the
   Sequence as it is after every hook Keras has called so far.
2. The user's `random` and `np.random` streams are drawn from only by the user's code
   and by Keras (the Loader leaves the training process's RNGs as it found them).
3. A batch handed to Keras never points into the ring unless `copy=False` was asked:
   Keras keeps batches (and JAX on CPU aliases aligned numpy arrays) for as long as it
   likes, which would pin ring slots.
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import keras
import numpy as np

from ._errors import ShmfeedError, SpecError
from ._forkserver import start as _start_fork_server
from ._loader import Loader

__all__ = ["Feed", "feed"]


def _is_keras_hook(source: Any, name: str) -> bool:
    """Whether `source.<name>` is missing or Keras's own no-op."""
    method = getattr(type(source), name, None)
    return method is None or (getattr(method, "__module__", "") or "").startswith("keras")


class _InKerasOrder:
    """The Loader's source for a Sequence: loader batch j is the Sequence's batch
    `order[j]` (or j while `order` is None).  It has no epoch hooks of its own: the
    Feed runs the Sequence's, when Keras calls them."""

    def __init__(self, sequence: Any):
        self.sequence = sequence
        self.order: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.sequence)

    def __getitem__(self, j: int) -> Any:
        return self.sequence[int(j) if self.order is None else int(self.order[j])]


def _host_copier(copy: bool):
    """How a batch leaves the ring: into memory of its own (for the JAX backend, the
    aligned, recycled buffers XLA:CPU adopts without a second copy), or not at all."""
    if not copy:
        return None
    if keras.backend.backend() == "jax":
        from .jax._transfer import aligned_copy

        return aligned_copy
    return np.array


def feed(source: Any, *, copy: bool = True, **loader_options: Any) -> Feed:
    """What `model.fit(x=...)`, `validation_data=`, `evaluate` and `predict` take.

    `source` is a `keras.utils.Sequence`/`PyDataset` (or any batch-level source:
    `source[b]` is a whole batch), a per-sample source (give `batch_size`), or a
    `shmfeed.Loader` (then give no loader options; the Feed does not close it).
    `loader_options` are the Loader's (`num_workers`, `seed`, `num_slots`, ...).
    With `copy=False` batches are handed to Keras as views into the ring: no copy, but
    each batch Keras or JAX still holds pins a slot (give `num_slots` room for that).
    """
    if isinstance(source, Loader):
        if loader_options:
            raise SpecError(
                f"`source` is already a shmfeed.Loader; the loader options "
                f"{sorted(loader_options)} belong to its constructor, not to feed()")
        return Feed(source, None, copy=copy, owns_loader=False)
    if "num_workers" not in loader_options:
        raise SpecError("feed() needs `num_workers` (e.g. `num_workers=2`; 0 builds batches in "
                        "this process)")
    if loader_options.get("batch_size") is not None:
        return Feed(Loader(source, **loader_options), None, copy=copy, owns_loader=True)
    if loader_options.get("shuffle"):
        raise SpecError(
            "`shuffle=True` was given for a batch-level source (a Sequence): its batch order is "
            "Keras's, set by `model.fit(shuffle=...)` (True by default), and its samples are "
            "shuffled by its own on_epoch_end; drop `shuffle` from feed()")
    loader_options["batch_size"] = None
    wrapper = _InKerasOrder(source)
    return Feed(Loader(wrapper, **loader_options), wrapper, copy=copy, owns_loader=True)


class Feed(keras.utils.PyDataset):
    """A `keras.utils.PyDataset` whose batches a shmfeed Loader builds.  Made by `feed()`.

    Keras's own workers are off (`workers == 0`, read-only): the Loader's processes
    build the batches, in the order Keras asks for them (module docstring).
    """

    def __init__(self, loader: Loader, wrapper: _InKerasOrder | None, *, copy: bool,
                 owns_loader: bool):
        super().__init__(workers=0, use_multiprocessing=False)
        self.loader = loader
        self._wrapper = wrapper
        self._sequence = wrapper.sequence if wrapper is not None else None
        self._owns_loader = owns_loader
        self._copy = _host_copier(copy)
        self._n = len(loader)
        # The pass in progress: Keras's index of each position (None: 0..n-1), the next
        # position, and the loader epoch serving it, which began at position `_base`.
        self._pass_order: list[int] | None = None
        self._pos = self._n  # no pass yet: the first batch starts one
        self._it: Any = None
        self._base = 0
        self._sequence_stale = False  # a hook ran since the workers got the Sequence
        self._random_at_begin: Any = None  # `random`'s state at on_epoch_begin
        self._said_shuffle = False

    # Keras's own workers would call __getitem__ from threads or processes.
    @property
    def workers(self) -> int:
        return 0

    @workers.setter
    def workers(self, value: int) -> None:
        if value:
            raise SpecError(f"a shmfeed Feed builds batches in the Loader's workers; Keras's "
                            f"`workers={value}` cannot be set (give `num_workers` to feed())")

    @property
    def use_multiprocessing(self) -> bool:
        return False

    @use_multiprocessing.setter
    def use_multiprocessing(self, value: bool) -> None:
        if value:
            raise SpecError("a shmfeed Feed builds batches in the Loader's workers; Keras's "
                            "`use_multiprocessing` cannot be set (give `num_workers` to feed())")

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return f"shmfeed.keras.Feed({self.loader!r})"

    def close(self) -> None:
        """End the epoch in progress and close the Loader (unless it was given to feed())."""
        self._end_loader_epoch()
        if self._owns_loader:
            self.loader.close()

    def __enter__(self) -> Feed:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- Keras's calls -------------------------------------------------------------------
    def on_epoch_begin(self) -> None:
        self._run_hook("on_epoch_begin")
        self._random_at_begin = random.getstate()

    def on_epoch_end(self) -> None:
        self._random_at_begin = None
        if self._pos == self._n:
            self._end_loader_epoch()
        self._run_hook("on_epoch_end")

    def __getitem__(self, index: int) -> Any:
        index = int(index)
        if self._random_at_begin is not None:
            self._first_of_epoch(index)
            self._random_at_begin = None
        elif self._pos >= self._n or index != self._keras_index(self._pos):
            self._wrong_index(index)
        if self._it is None:
            self._start_loader_epoch()
        try:
            batch = next(self._it)
        except StopIteration:
            raise ShmfeedError(f"[INTERNAL ERROR] the loader epoch ended before position {self._pos}; "
                               "please report it with this message") from None
        self._pos += 1
        if self._copy is None:
            return batch
        return keras.tree.map_structure(self._copy, batch)

    # -- the pass --------------------------------------------------------------------------
    def _run_hook(self, name: str) -> None:
        if self._sequence is None or _is_keras_hook(self._sequence, name):
            return
        getattr(self._sequence, name)()
        self._sequence_stale = True
        # The rest of the pass must be built from the Sequence as the hook left it.
        self._end_loader_epoch()

    def _keras_index(self, pos: int) -> int:
        return pos if self._pass_order is None else self._pass_order[pos]

    def _first_of_epoch(self, index: int) -> None:
        """The first batch Keras asks for after `on_epoch_begin`: a new pass (shuffled
        or not) or the continuation of one (`steps_per_epoch`)."""
        before, now = self._random_at_begin, random.getstate()
        if now != before:
            order = self._replay_shuffle(before, now)
            if order is not None and order[0] == index:
                self._new_pass(order)
                return
        if self._pos < self._n and index == self._keras_index(self._pos):
            return  # the pass goes on
        if index == 0:
            self._new_pass(None)
            return
        self._wrong_index(index)

    def _replay_shuffle(self, before: Any, now: Any) -> list[int] | None:
        """Keras's `random.shuffle(list(range(n)))` from state `before`, if it leads to
        state `now`; `random` is left in state `now` either way."""
        order = list(range(self._n))
        try:
            random.setstate(before)
            random.shuffle(order)
            matches = random.getstate() == now
        finally:
            random.setstate(now)
        return order if matches else None

    def _new_pass(self, order: list[int] | None) -> None:
        self._end_loader_epoch()
        if order is not None and self._wrapper is None and not self._said_shuffle:
            self._said_shuffle = True
            warnings.warn(
                "model.fit(shuffle=True) shuffles the order of batches, but this feed's order is "
                "its Loader's: pass `shuffle=True` to the Loader (or feed()) to shuffle samples, "
                "and `shuffle=False` to fit() to silence this warning", stacklevel=3)
        self._pass_order = order
        self._pos = 0

    def _start_loader_epoch(self) -> None:
        """A loader epoch for the rest of the pass (from position `_pos` on)."""
        wrapper = self._wrapper
        if wrapper is not None:
            if self._pass_order is None and self._pos == 0:
                order = None
            else:
                rest = self._pass_order[self._pos:] if self._pass_order is not None \
                    else list(range(self._pos, self._n))
                # A loader epoch has n batches: positions past the pass repeat it; the
                # epoch is left as soon as the pass is done.
                order = np.resize(np.asarray(rest, np.int64), self._n)
            if order is not None or wrapper.order is not None:
                self._sequence_stale = True
            wrapper.order = order
            if self._sequence_stale:
                self.loader.source_changed()
                self._sequence_stale = False
        self._base = self._pos
        self._it = iter(self.loader)

    def _end_loader_epoch(self) -> None:
        it, self._it = self._it, None
        if it is None:
            return
        if self._pos - self._base == self._n:
            # Every batch was taken: let the epoch finish as usual (a Loader given to
            # feed() runs its own source's hooks there).
            next(it, None)
        it.close()  # otherwise gives the rest up: its unread slots go back

    def _wrong_index(self, index: int) -> None:
        if self._pos < self._n:
            expected = f"batch {self._keras_index(self._pos)} (position {self._pos} of {self._n})"
        else:
            expected = "the first batch of a new pass (0, or the first of Keras's shuffled order)"
        raise ShmfeedError(
            f"Keras asked for batch {index} where shmfeed expected {expected}. A shmfeed Feed "
            "hands out its batches in order: iterate it only through model.fit/evaluate/predict "
            "(or in order, calling on_epoch_begin/on_epoch_end around each pass), without Keras "
            "workers; with `model.fit(shuffle=True)` nothing else may draw from `random` between "
            "the epoch's start and its first batch (or pass `shuffle=False`).")


# Keras (and JAX under it) are imported, their backend not started yet in a script
# that imports this at its top: keep a copy of this process to start worker pools from
# once it has (see shmfeed.start_fork_server), with keras already imported there.
_start_fork_server(automatic=True)
