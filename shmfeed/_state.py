"""A loader's resumable state: what `Loader.state_dict()` returns and
`Loader.load_state_dict()` accepts.

Owns the format (a small JSON-serialisable dict), the fingerprint of everything the
stream depends on, and the check that a state fits the loader it is loaded into.

The state of a run is a few integers, because the stream is a pure function of
`(source, seed, epoch, options)` (see _order.py): the epoch in progress and the
number of its batches the training loop has received (`next_batch`, a *global*
batch index, so the same for any number of hosts at the same global batch size).
Resuming builds nothing to skip anything.

Sources with epoch hooks (a Keras `Sequence` whose `on_epoch_end` reshuffles): their
next batches also depend on what the hooks did to them, so the state carries the
source's own state as of the start of the epoch in progress: `source.state_dict()`
when the source has one (and `load_state_dict` to restore it), otherwise the
source's attributes, pickled (cloudpickle) and base64-encoded.  A hook that draws
from the global `np.random` continues from whatever state the training script gives
it after the resume (checkpoint and restore `np.random.get_state()` with the model
for a bit-identical continuation: exactly what an uninterrupted run would need).
"""

from __future__ import annotations

import base64
import pickle
from typing import Any

import cloudpickle

from ._errors import SpecError
from ._interpreter import unpicklable_part
from ._order import Order

FORMAT = 1


def fingerprint(order: Order) -> dict:
    """What a stream depends on besides the epoch: a state from a loader whose
    fingerprint differs cannot continue this one."""
    batch_level = order.batch_size is None
    return {
        "n_items": order.n_items,
        "batch_level": batch_level,
        # Global, so that a state taken with k hosts loads with k' at the same k*B;
        # batch-level sources deal whole source batches to hosts, so k itself counts.
        "global_batch_size": None if order.batch_size is None else order.batch_size * order.shard_count,
        "shard_count": order.shard_count if batch_level else None,
        "shuffle": order.shuffle,
        "shuffle_block": order.shuffle_block if order.shuffle == "block" else None,
        "seed": order.seed,
        "drop_last": order.drop_last,
        **(order.fingerprint_extra() if hasattr(order, "fingerprint_extra") else {}),
    }


def make(order: Order, epoch: int, next_batch: int, source_state: str | dict | None) -> dict:
    state: dict[str, Any] = {"format": FORMAT, "epoch": epoch, "next_batch": next_batch,
                             "fingerprint": fingerprint(order)}
    if source_state is not None:
        state["source"] = source_state
    return state


def check(state: Any, order: Order, n_batches: int) -> tuple[int, int]:
    """(epoch, next_batch) of a state made by `make` for a loader like this one."""
    if not isinstance(state, dict):
        raise SpecError(f"a loader state is a dict from `Loader.state_dict()`, got {type(state).__name__}")
    missing = [k for k in ("format", "epoch", "next_batch", "fingerprint") if k not in state]
    if missing:
        raise SpecError(f"the loader state lacks {missing}: pass what `Loader.state_dict()` returned")
    if state["format"] != FORMAT:
        raise SpecError(f"the loader state has format {state['format']!r}; this shmfeed reads format {FORMAT}")
    ours, theirs = fingerprint(order), state["fingerprint"]
    for key, value in ours.items():
        if theirs.get(key) != value:
            raise SpecError(
                f"the loader state was saved with {key}={theirs.get(key)!r}, this loader has "
                f"{key}={value!r}: its stream would differ. Resume with the same dataset and "
                "options (for several hosts: the same global batch size, `batch_size * shard_count`).")
    epoch, nxt = state["epoch"], state["next_batch"]
    for name, v in (("epoch", epoch), ("next_batch", nxt)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise SpecError(f"the loader state's `{name}` must be an integer >= 0, got {v!r}")
    if nxt > n_batches:
        raise SpecError(f"the loader state's `next_batch` ({nxt}) is past the epoch's {n_batches} batches")
    return epoch, nxt


def source_snapshot(source: Any) -> str | dict:
    """The source's own state (see the module docstring)."""
    own = getattr(source, "state_dict", None)
    if callable(own):
        return {"state_dict": own()}
    attributes = dict(vars(source))
    try:
        data = cloudpickle.dumps(attributes)
    except Exception as exc:
        found = unpicklable_part(source, "source", 0)  # names the attribute, as a spawned pool does
        what = f"`{found[0]}` ({type(found[1]).__name__})" if found else "they"
        raise SpecError(
            f"the source ({type(source).__name__}) has epoch hooks, so the loader's state must carry "
            f"its attributes, and {what} cannot be pickled: {type(exc).__name__}: {exc}. Give the "
            "source `state_dict()` and `load_state_dict(state)` methods instead.") from exc
    return base64.b64encode(data).decode("ascii")


def restore_source(source: Any, snapshot: str | dict) -> None:
    if isinstance(snapshot, dict):
        load = getattr(source, "load_state_dict", None)
        if not callable(load):
            raise SpecError(
                f"the loader state carries the source's `state_dict()`, but this source "
                f"({type(source).__name__}) has no `load_state_dict(state)` to take it")
        load(snapshot["state_dict"])
        return
    vars(source).update(pickle.loads(base64.b64decode(snapshot)))
