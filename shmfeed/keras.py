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
  Sequence, as Keras would.  `fit` and `evaluate` also read one batch to build an
  unbuilt model (`Trainer._symbolic_build`, recognised on the stack at the epoch's
  start), then end that epoch early: the hooks run once more, as under Keras, and the
  batch is zeros shaped like the spec, so no loader epoch starts and nothing is
  consumed.
- Position: what the model acknowledged (`on_train_batch_end`, through an attached
  `BackupAndRestore`; without one, each batch handed out: Keras on CPU reads a batch
  only to train on it).  `state_dict()`, `stats()` and the Loader's own count that.
- Resume (`load_state_dict`, `BackupAndRestore`, or a Loader resumed by hand before
  `feed()`): applied as Keras starts its next epoch; Keras reads `num_batches` as a
  pass's batches begin, so the resumed epoch asks only for the rest of the pass, and its
  "ran out of data" warning at the end is silenced.  Keras's indices in a resumed pass
  are positions only.  `BackupAndRestore` finds fit's training Feed as the first Feed
  to start a (non-build) epoch after its `on_epoch_begin`, epoch by epoch.
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

import json
import os
import random
import sys
import warnings
from typing import Any, cast

import keras
import numpy as np

from ._batch.spec import unflatten
from ._engine.stats import Stats
from ._errors import ShmfeedError, SpecError
from ._loader import Loader
from ._order import state as _state
from ._processes.forkserver import start as _start_fork_server

__all__ = ["BackupAndRestore", "Feed", "InputWait", "feed"]

FEED_STATE_FORMAT = 1
# Keras's methods that read one batch only to build an unbuilt model (fit, evaluate).
_PEEKERS = frozenset({"_symbolic_build", "_maybe_symbolic_build"})
_PEEK_DEPTH = 12  # frames between Feed.on_epoch_begin and the trainer: 4-5 in Keras 3.15
# The BackupAndRestore waiting for fit's training Feed (module docstring).
_waiting: list[BackupAndRestore] = []


def _called_to_peek() -> bool:
    """Whether Keras is starting an epoch only to read one batch and build the model."""
    try:
        frame: Any = sys._getframe(2)  # the caller of Feed.on_epoch_begin
    except ValueError:  # no such frame
        return False
    for _ in range(_PEEK_DEPTH):
        if frame is None:
            return False
        if frame.f_code.co_name in _PEEKERS and \
                (frame.f_globals.get("__name__") or "").startswith("keras"):
            return True
        frame = frame.f_back
    return False


def _rng_states() -> dict:
    """`random`'s and `np.random`'s states, as JSON."""
    kind, keys, pos, has_gauss, gauss = cast(tuple, np.random.get_state())
    version, internal, gauss_next = random.getstate()
    return {"random": [version, list(internal), gauss_next],
            "np_random": [kind, keys.tolist(), pos, has_gauss, gauss]}


def _set_rng_states(states: dict) -> None:
    version, internal, gauss_next = states["random"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, gauss = states["np_random"]
    np.random.set_state((kind, np.asarray(keys, np.uint32), pos, has_gauss, gauss))


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
        # position, and the loader epoch serving it, whose batch 0 is position `_base`.
        self._pass_order: list[int] | None = None
        self._pos = self._n  # no pass yet: the first batch starts one
        self._it: Any = None
        self._base = 0
        self._loader_epoch = 0
        self._sequence_stale = False  # a hook ran since the workers got the Sequence
        self._random_at_begin: Any = None  # `random`'s state at on_epoch_begin
        self._said_shuffle = False
        # Acknowledged: the pass position after the last batch the training step took,
        # from `on_train_batch_end` when a shmfeed callback is attached, otherwise every
        # batch handed out (Keras on CPU reads a batch only to train on it).
        self._acked = self._n
        self._epoch_start = 0  # the pass position at which the Keras epoch began
        self._callback: BackupAndRestore | None = None
        self._peeking = False  # the Keras epoch in progress only builds the model
        self._keras_epochs = 0
        self._pending: dict | None = None  # a resume, applied as the next epoch starts
        self._rest: int | None = None  # a resumed pass: positions Keras has left to ask
        self._resumed_pass = False  # Keras's indices of this pass are positions only
        self._quiet: Any = None  # silences Keras's "ran out of data" for a resumed pass

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

    @property
    def num_batches(self) -> int:
        # Keras reads this as each pass's batches begin: a resumed pass has fewer.
        return self._n if self._rest is None else self._rest

    def __repr__(self) -> str:
        return f"shmfeed.keras.Feed({self.loader!r})"

    def close(self) -> None:
        """End the epoch in progress and close the Loader (unless it was given to feed())."""
        self._unquiet()
        self._end_loader_epoch()
        if self._owns_loader:
            self.loader.close()

    def __enter__(self) -> Feed:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- position, state, stats -----------------------------------------------------------
    def stats(self) -> Stats:
        """The Loader's stats, counting the batches the model trained on (acknowledged),
        not those read ahead or read by Keras only to build the model; `epochs_started`
        counts Keras's epochs.  Works after `close()`."""
        s = self.loader.stats()
        s.epochs_started = self._keras_epochs
        return s

    def state_dict(self) -> dict:
        """Where training is, as JSON: the pass in progress (Keras's order of it), the
        position after the last batch the model trained on, the Loader's state there and
        the Sequence's.  `load_state_dict` in a new Feed over the same data continues
        with the next batch; `shmfeed.keras.BackupAndRestore` saves it with the model."""
        acked = self._acked
        sequence = None
        if self._sequence is not None and not all(_is_keras_hook(self._sequence, h)
                                                  for h in ("on_epoch_begin", "on_epoch_end")):
            sequence = _state.source_snapshot(self._sequence)
        return {"feed_format": FEED_STATE_FORMAT, "n": self._n, "position": acked, "base": self._base,
                "order": self._pass_order, "loader": self.loader.state_dict(),
                "sequence": sequence}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (from `state_dict()`) when Keras next starts an epoch:
        its first batch is the one after the last the saved run trained on, and Keras's
        epoch then asks only for the rest of the pass.  Load it before `fit`."""
        if not isinstance(state, dict) or state.get("feed_format") != FEED_STATE_FORMAT:
            raise SpecError(
                "a Feed's state is the dict `Feed.state_dict()` returns (format "
                f"{FEED_STATE_FORMAT}); for a Loader's own `state_dict()`, load it into the "
                "Loader (`loader.load_state_dict`) before making the feed")
        if state["n"] != self._n:
            raise SpecError(f"the feed state was saved for {state['n']} batches a pass, this feed "
                            f"has {self._n}: resume with the same data and options")
        if self._it is not None or self._pos < self._n:
            raise ShmfeedError(
                f"this Feed is at position {self._pos} of a pass already: load a state into a new "
                "Feed, before `fit` (or let `shmfeed.keras.BackupAndRestore` do it)")
        self._pending = dict(state)

    def _acknowledge(self, end_step: int) -> None:
        """`on_train_batch_end(end_step)`: the Keras epoch's steps up to `end_step` were
        trained (with `steps_per_execution`, fewer where the pass ran out)."""
        if self._peeking:
            return
        self._ack_to(min(self._epoch_start + end_step + 1, self._pos))

    def _ack_to(self, pos: int) -> None:
        if pos <= self._acked:
            return
        batches, self._acked = pos - self._acked, pos
        self.loader._note_received((self._loader_epoch, pos - self._base), batches)

    # -- Keras's calls -------------------------------------------------------------------
    def on_epoch_begin(self) -> None:
        self._peeking = _called_to_peek()
        if not self._peeking:
            self._keras_epochs += 1
            # Attached for this epoch only: a fit that raised never says it ended.
            self._callback = None
            if _waiting:
                _waiting.pop()._attach(self)
            if self._pending is None and self._pos >= self._n and self._wrapper is None \
                    and self.loader._first_batch > 0:
                # A Loader resumed by hand (`load_state_dict`) before feed(): its epoch
                # goes on where it was, and Keras's epoch asks for what is left of it.
                self._pending = {"position": self.loader._first_batch, "base": 0, "order": None,
                                 "loader": None, "sequence": None}
            if self._pending is not None and self._begin_resume():
                self._random_at_begin = random.getstate()
                return  # the Sequence's on_epoch_begin ran before the state was saved
        self._run_hook("on_epoch_begin")
        self._random_at_begin = random.getstate()

    def on_epoch_end(self) -> None:
        self._random_at_begin = None
        if self._pos == self._n:
            self._end_loader_epoch()
        self._run_hook("on_epoch_end")
        self._peeking = False
        self._unquiet()

    def __getitem__(self, index: int) -> Any:
        index = int(index)
        if self._peeking:
            return self._peek_batch()
        if self._random_at_begin is not None:
            if self._rest is not None:
                self._continue_resume()
            else:
                self._first_of_epoch(index)
            self._random_at_begin = None
            self._epoch_start = self._pos
        elif self._pos >= self._n or (not self._resumed_pass and index != self._keras_index(self._pos)):
            self._wrong_index(index)
        if self._it is None:
            self._start_loader_epoch()
        try:
            batch = next(self._it)
        except StopIteration:
            raise ShmfeedError(f"[INTERNAL ERROR] the loader epoch ended before position {self._pos}; "
                               "please report it with this message") from None
        self._pos += 1
        if self._callback is None:
            self._ack_to(self._pos)
        if self._resumed_pass and self._pos == self._n and self._quiet is None:
            # Keras's epoch asked for all of the pass it knew; the next ask ends it with
            # "Your input ran out of data", which here is the resume working as meant.
            self._quiet = warnings.catch_warnings()
            self._quiet.__enter__()
            warnings.filterwarnings("ignore", message="Your input ran out of data")
        if self._copy is None:
            return batch
        return keras.tree.map_structure(self._copy, batch)

    # -- resume ----------------------------------------------------------------------------
    def _begin_resume(self) -> bool:
        """Apply the pending state as Keras starts an epoch; True: the Sequence's
        on_epoch_begin already ran in the saved run and is not run again.  A state saved
        inside a Keras epoch: the Sequence and the RNGs go back to where they were, and
        Keras's epoch asks only for the rest of the pass.  Saved between epochs (at
        `on_epoch_end`): restored, then the epoch starts as usual."""
        state, self._pending = self._pending, None
        assert state is not None  # the caller checked
        if state.get("sequence") is not None:
            _state.restore_source(self._sequence, state["sequence"])
            self._sequence_stale = True
        position = state["position"]
        between = state.get("between_epochs", False) or position >= self._n
        if between and state.get("rngs") is not None:
            _set_rng_states(state["rngs"])
            state["rngs"] = None
        if position >= self._n:
            if state.get("loader") is not None:
                self.loader.load_state_dict(state["loader"])
            self._pos = self._acked = self._n
            return False
        self._rest = self._n - position
        self._resume = state
        return not between

    def _continue_resume(self) -> None:
        """The resumed epoch's first batch: the pass goes on at the saved position."""
        state: dict = self._resume
        del self._resume
        self._rest = None
        if state.get("rngs") is not None:
            _set_rng_states(state["rngs"])  # after Keras's shuffle of the rest, as it was
        self._end_loader_epoch()
        self._pass_order = state["order"]
        self._pos = self._acked = state["position"]
        self._base = state["base"]
        self._resumed_pass = True
        if state.get("loader") is not None:
            self.loader.load_state_dict(state["loader"])
        self._start_loader_epoch(resume=True)

    # -- the pass --------------------------------------------------------------------------
    def _peek_batch(self) -> Any:
        """What Keras reads only to build the model: zeros shaped like a batch, so that
        no batch is consumed (Keras looks only at shapes and dtypes)."""
        spec = self.loader.spec
        return unflatten(spec.tree, [np.zeros((spec.rows, *leaf.shape), leaf.dtype)
                                     for leaf in spec.leaves])

    def _unquiet(self) -> None:
        quiet, self._quiet = self._quiet, None
        if quiet is not None:
            quiet.__exit__(None, None, None)

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
        if self._pos < self._n and (self._resumed_pass or index == self._keras_index(self._pos)):
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
        self._pos = self._acked = 0
        self._resumed_pass = False

    def _start_loader_epoch(self, resume: bool = False) -> None:
        """A loader epoch for the rest of the pass (from position `_pos` on; resumed: the
        saved one, whose batch 0 is position `_base`)."""
        wrapper = self._wrapper
        if not resume:
            self._base = self._pos
        if wrapper is not None:
            base = self._base
            if self._pass_order is None and base == 0:
                order = None
            else:
                rest = self._pass_order[base:] if self._pass_order is not None \
                    else list(range(base, self._n))
                # A loader epoch has n batches: positions past the pass repeat it; the
                # epoch is left as soon as the pass is done.
                order = np.resize(np.asarray(rest, np.int64), self._n)
            if order is not None or wrapper.order is not None:
                self._sequence_stale = True
            wrapper.order = order
            if self._sequence_stale:
                self.loader.source_changed()
                self._sequence_stale = False
        self._it = iter(self.loader)
        self._loader_epoch = cast(int, self.loader._active)  # iter() just opened it
        self.loader._note_received((self._loader_epoch, self._acked - self._base), 0)

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


class BackupAndRestore(keras.callbacks.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` that also saves and restores the position of
    fit's training Feed, so that a fit killed mid-epoch and run again continues at the
    exact batch: every batch trained once, the final weights those of an uninterrupted
    run.  A drop-in: `model.fit(feed, callbacks=[shmfeed.keras.BackupAndRestore(dir,
    save_freq=N)])`.

    With it, the Feed's position is what the model acknowledged (`on_train_batch_end`),
    never a batch read ahead.  Each checkpoint is written whole or not at all: the
    weights to a file of their own, then the metadata that names them (the model's
    epoch and batch, the Feed's state, `random`'s and `np.random`'s states), replaced
    atomically; a kill at any moment leaves the previous checkpoint usable, so
    `double_checkpoint` is not needed (accepted, and ignored).  `backup_dir` is a local
    directory.  A checkpoint due at a pass's last batch is taken at `on_epoch_end`,
    after the Sequence's hooks, so that a resume neither repeats nor skips them.
    """

    _METADATA = "training_metadata.json"
    _WEIGHTS = ("a.weights.h5", "b.weights.h5")

    def __init__(self, backup_dir: str, save_freq: Any = "epoch", double_checkpoint: bool = False,
                 delete_checkpoint: bool = True):
        super().__init__(backup_dir, save_freq=save_freq, double_checkpoint=double_checkpoint,
                         delete_checkpoint=delete_checkpoint)
        self._feed: Feed | None = None
        self._restored: dict | None = None  # the Feed's state from the checkpoint
        self._weights_name: str | None = None  # the weights file the checkpoint names
        self._save_at_epoch_end = False
        self._between_epochs = False

    def on_train_begin(self, logs: Any = None) -> None:
        self._feed, self._restored = None, None
        self._load_model()

    def _attach(self, feed: Feed) -> None:
        self._feed = feed
        feed._callback = self
        restored, self._restored = self._restored, None
        if restored is not None:
            feed.load_state_dict(restored)

    def _load_model(self) -> None:
        if not self.model.built:
            raise ValueError(f"To use the BackupAndRestore callback, your model must be built before "
                             f"you call `fit()`. Model {self.model} is unbuilt.")
        path = os.path.join(self.backup_dir, self._METADATA)
        if not os.path.exists(path):
            return
        with open(path) as f:
            metadata = json.load(f)
        self._weights_name = metadata.get("weights", "latest.weights.h5")  # Keras's own layout
        weights = os.path.join(self.backup_dir, self._weights_name)
        if os.path.exists(weights):
            if self.model.optimizer is not None and not self.model.optimizer.built:
                self.model.optimizer.build(self.model.trainable_variables)
            self.model.load_weights(weights)
        self.model._initial_epoch = metadata["epoch"]
        self._restored = metadata.get("shmfeed")

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        # Keras's own counts epochs only at their end, so a resumed run's checkpoints
        # inside its first epoch would name epoch 0.
        self._current_epoch = epoch
        self._feed = None
        _waiting[:] = [self]  # the next Feed to start an epoch is fit's training data

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        if self in _waiting:  # no Feed started the epoch: fit's data is something else
            _waiting.remove(self)
            if self._restored is not None:
                raise ShmfeedError(
                    f"the checkpoint in {self.backup_dir} holds the position of a shmfeed Feed, "
                    "but this fit's training data is not one: resume with the same data, or "
                    "remove the directory to start over")

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        feed = self._feed
        if feed is not None:
            feed._acknowledge(batch)
        if self._should_save_on_batch(batch):
            if feed is not None and feed._acked >= feed._n:
                self._save_at_epoch_end = True  # after the Sequence's on_epoch_end
            else:
                self._save_model()

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self._between_epochs = True
        try:
            super().on_epoch_end(epoch, logs)  # saves with `save_freq="epoch"`
            if self._save_at_epoch_end and self.save_freq != "epoch":
                self._save_model()
        finally:
            self._save_at_epoch_end = self._between_epochs = False

    def on_train_end(self, logs: Any = None) -> None:
        if self._feed is not None:
            self._feed._callback = None
        self._feed = None
        super().on_train_end(logs)

    def _save_model(self) -> None:
        os.makedirs(self.backup_dir, exist_ok=True)
        name = self._WEIGHTS[1] if self._weights_name == self._WEIGHTS[0] else self._WEIGHTS[0]
        self.model.save_weights(os.path.join(self.backup_dir, name), overwrite=True)
        metadata: dict[str, Any] = {"epoch": self._current_epoch, "batch": self._last_batch_seen,
                                    "weights": name}
        if self._feed is not None:
            metadata["shmfeed"] = {**self._feed.state_dict(), "rngs": _rng_states(),
                                   "between_epochs": self._between_epochs}
        path = os.path.join(self.backup_dir, self._METADATA)
        with open(path + ".tmp", "w") as f:
            json.dump(metadata, f)
        os.replace(path + ".tmp", path)  # the commit: the checkpoint is this file
        self._weights_name = name


class InputWait(keras.callbacks.Callback):
    """Puts how input-bound each epoch was into `fit`'s logs, so History, TensorBoard
    and the progress bar show it: `input_wait` (the fraction of the epoch's time the
    training step waited for the feed's batches) and `input_batches_per_s`.

        model.fit(train, epochs=10, callbacks=[shmfeed.keras.InputWait(train),
                                               keras.callbacks.TensorBoard(log_dir)])

    Put it before the callbacks that read the logs (Keras calls them in list order)."""

    def __init__(self, feed: Feed):
        super().__init__()
        if not isinstance(feed, Feed):
            raise SpecError(f"InputWait needs the shmfeed Feed that fit trains on, got {type(feed).__name__}")
        self.feed = feed
        self._start: Stats | None = None

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._start = self.feed.loader.stats()

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if logs is None or self._start is None:
            return
        now, start = self.feed.loader.stats(), self._start
        elapsed = now.elapsed_s - start.elapsed_s
        if elapsed > 0:
            logs["input_wait"] = (now.wait_s - start.wait_s) / elapsed
            logs["input_batches_per_s"] = (now.batches - start.batches) / elapsed


# Keras (and JAX under it) are imported, their backend not started yet in a script
# that imports this at its top: keep a copy of this process to start worker pools from
# once it has (see shmfeed.start_fork_server), with keras already imported there.
_start_fork_server(automatic=True)
