"""A loader's resumable state: what `Loader.state_dict()` returns and
`Loader.load_state_dict()` accepts.

Owns the format (a small JSON-serialisable dict), the fingerprint of everything the
stream depends on, and the check that a state fits the loader it is loaded into.

The state of a run is a few integers, because the stream is a pure function of
`(source, seed, epoch, options)` (see _order/order.py): the epoch in progress and the
number of its batches the training loop has received (`next_batch`, a *global*
batch index, so the same for any number of hosts at the same global batch size).
Resuming builds nothing to skip anything.

Sources with epoch hooks (a Keras `Sequence` whose `on_epoch_end` reshuffles): their
next batches also depend on what the hooks did to them, so the state carries the
source's own state as of the start of the epoch in progress: `source.state_dict()`
when the source has one (and `load_state_dict` to restore it), otherwise the
source's attributes as data (`encode`).  A hook that draws
from the global `np.random` continues from whatever state the training script gives
it after the resume (checkpoint and restore `np.random.get_state()` with the model
for a bit-identical continuation: exactly what an uninterrupted run would need).

A state is data that people copy between machines: loading one never unpickles or
evaluates anything.  Attributes are written as JSON scalars and lists, with tagged
one-key dicts for the rest: `{"tuple": [...]}`, `{"dict": [[key, value], ...]}` (keys
of any of these kinds, e.g. the int IDs of a labels dict), `{"ndarray": {"dtype",
"shape", "data"}}` (base64 bytes, read back with `np.frombuffer`), `{"scalar":
{"dtype", "data"}}` for numpy scalars and `{"path": "..."}` for a `pathlib` path;
`state_dict()` refuses, naming the attribute, anything else.  Every field of a state is checked on loading, and a malformed one is a
`SpecError` naming it (numpy integers are taken where an int is expected).

A Stream's state (`stream_state`) adds what its host's batch numbers mean (its shards
and hosts, checked on loading) and the shards that had ended, with the batch each
ended in: a resumed Stream skips them.
"""

from __future__ import annotations

import base64
import binascii
import pathlib
import reprlib
from typing import TYPE_CHECKING, Any

import numpy as np

from .._errors import SpecError
from .order import Order

if TYPE_CHECKING:
    from ..sources._shards import ShardedSource

FORMAT = 1
MAX_EPOCH = 2**64 - 1  # the C order and control block hold the epoch in 64 bits
MAX_DEPTH = 64  # nesting of a source's attribute: deeper is a cycle or not state
_SCALARS = (type(None), bool, int, float, str)


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


def _short(value: Any) -> str:
    return reprlib.repr(value)


def _int(value: Any) -> int | None:
    """`value` as an int when it is one (a numpy integer too, not a bool), else None."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        return None
    return int(value)


def _same(theirs: Any, ours: Any) -> bool:
    """Whether a fingerprint field of a state equals ours, whatever type it has."""
    if isinstance(theirs, np.generic):
        theirs = theirs.item()
    if isinstance(theirs, (list, tuple)) and isinstance(ours, list):
        return len(theirs) == len(ours) and all(_same(a, b) for a, b in zip(theirs, ours))
    if not isinstance(theirs, _SCALARS) or isinstance(theirs, bool) != isinstance(ours, bool):
        return False
    return theirs == ours


def check(state: Any, order: Order, n_batches: int) -> tuple[int, int]:
    """(epoch, next_batch) of a state made by `make` for a loader like this one."""
    if not isinstance(state, dict):
        raise SpecError(f"a loader state is a dict from `Loader.state_dict()`, got {type(state).__name__}")
    missing = [k for k in ("format", "epoch", "next_batch", "fingerprint") if k not in state]
    if missing:
        raise SpecError(f"the loader state lacks {missing}: pass what `Loader.state_dict()` returned")
    if _int(state["format"]) != FORMAT:
        raise SpecError(f"the loader state has format {_short(state['format'])} (`format`); this shmfeed "
                        f"reads format {FORMAT}")
    ours, theirs = fingerprint(order), state["fingerprint"]
    if not isinstance(theirs, dict):
        raise SpecError(f"the loader state's `fingerprint` must be a dict, got {type(theirs).__name__}: "
                        "pass what `Loader.state_dict()` returned")
    for key, value in ours.items():
        if not _same(theirs.get(key), value):
            raise SpecError(
                f"the loader state was saved with {key}={_short(theirs.get(key))} (`fingerprint.{key}`), this loader has "
                f"{key}={value!r}: its stream would differ. Resume with the same dataset and "
                "options (for several hosts: the same global batch size, `batch_size * shard_count`).")
    checked = []
    for name in ("epoch", "next_batch"):
        v = _int(state[name])
        if v is None or v < 0:
            raise SpecError(f"the loader state's `{name}` must be an integer >= 0, got {_short(state[name])}")
        checked.append(v)
    epoch, nxt = checked
    if epoch > MAX_EPOCH:
        raise SpecError(f"the loader state's `epoch` must be <= {MAX_EPOCH} (epochs are 64-bit), got {epoch}")
    if nxt > n_batches:
        raise SpecError(f"the loader state's `next_batch` ({nxt}) is past the epoch's {n_batches} batches")
    return epoch, nxt


def source_snapshot(source: Any) -> dict:
    """The source's own state (see the module docstring)."""
    own = getattr(source, "state_dict", None)
    if callable(own):
        return {"state_dict": own()}
    return {"attributes": {name: encode(value, f"source.{name}", type(source).__name__)
                           for name, value in vars(source).items()}}


def encode(value: Any, path: str, owner: str, depth: int = 0) -> Any:
    """`value` as JSON data (see the module docstring); `path` names it in errors."""
    if type(value) in _SCALARS:
        return value
    if depth >= MAX_DEPTH:
        raise _unwritable(path, owner, value, f"it is nested more than {MAX_DEPTH} deep (a cycle?)")
    if type(value) is list:
        return [encode(v, f"{path}[{i}]", owner, depth + 1) for i, v in enumerate(value)]
    if type(value) is tuple:
        return {"tuple": [encode(v, f"{path}[{i}]", owner, depth + 1) for i, v in enumerate(value)]}
    if type(value) is dict:
        return {"dict": [[encode(k, f"{path} (a key)", owner, depth + 1),
                          encode(v, f"{path}[{k!r}]", owner, depth + 1)] for k, v in value.items()]}
    if isinstance(value, pathlib.PurePath):  # a data folder, say
        return {"path": str(value)}
    if type(value) is np.ndarray or isinstance(value, np.generic):
        dtype = value.dtype
        if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
            raise _unwritable(path, owner, value, f"its dtype {dtype} is not plain numbers or text")
        data = base64.b64encode(np.ascontiguousarray(value).tobytes()).decode("ascii")
        if isinstance(value, np.generic):
            return {"scalar": {"dtype": dtype.str, "data": data}}
        return {"ndarray": {"dtype": dtype.str, "shape": list(value.shape), "data": data}}
    raise _unwritable(path, owner, value, "it is not a number, string, list, tuple, dict, path or numpy array")


def _unwritable(path: str, owner: str, value: Any, why: str) -> SpecError:
    return SpecError(
        f"the source ({owner}) has epoch hooks, so the loader's state must carry its attributes as "
        f"data, and `{path}` ({type(value).__name__}) cannot be written that way: {why}. Give the "
        "source `state_dict()` and `load_state_dict(state)` methods that return and take its state "
        "as data.")


def decode(data: Any, path: str, depth: int = 0) -> Any:
    """What `encode` wrote, checked field by field; only data is made, nothing run."""
    if type(data) in _SCALARS:
        return data
    if isinstance(data, np.generic) and not data.dtype.hasobject:  # a state never written as JSON
        return data
    if depth >= MAX_DEPTH:
        raise _malformed(path, f"it is nested more than {MAX_DEPTH} deep")
    if isinstance(data, list):
        return [decode(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(data)]
    if not isinstance(data, dict) or len(data) != 1:
        raise _malformed(path, f"expected a JSON scalar, a list or a one-key dict, got {_short(data)}")
    (tag, body), = data.items()
    if tag == "tuple" and isinstance(body, list):
        return tuple(decode(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(body))
    if tag == "dict" and isinstance(body, list):
        out = {}
        for i, pair in enumerate(body):
            if not (isinstance(pair, list) and len(pair) == 2):
                raise _malformed(f"{path}.dict[{i}]", f"expected a [key, value] pair, got {_short(pair)}")
            key = decode(pair[0], f"{path}.dict[{i}][0]", depth + 1)
            try:
                hash(key)
            except TypeError:
                raise _malformed(f"{path}.dict[{i}][0]", f"a key cannot be a {type(key).__name__}") from None
            out[key] = decode(pair[1], f"{path}.dict[{i}][1]", depth + 1)
        return out
    if tag == "path" and isinstance(body, str):
        return pathlib.Path(body)
    if tag in ("ndarray", "scalar") and isinstance(body, dict):
        return _array(body, f"{path}.{tag}", tag == "scalar")
    raise _malformed(path, f"unknown tag {_short(tag)} with {type(body).__name__}")


def _array(body: dict, path: str, scalar: bool) -> Any:
    fields = ("dtype", "data") if scalar else ("dtype", "shape", "data")
    if set(body) != set(fields):
        raise _malformed(path, f"expected the fields {list(fields)}, got {_short(sorted(map(str, body)))}")
    try:
        dtype = np.dtype(body["dtype"]) if isinstance(body["dtype"], str) else None
    except (TypeError, ValueError, SyntaxError):
        dtype = None
    if (dtype is None or dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None
            or dtype.itemsize == 0):
        raise _malformed(f"{path}.dtype", f"not a dtype of plain numbers or text: {_short(body['dtype'])}")
    shape = [] if scalar else body["shape"]
    if not isinstance(shape, list) or any(_int(n) is None or n < 0 for n in shape):
        raise _malformed(f"{path}.shape", f"expected a list of sizes >= 0, got {_short(shape)}")
    shape = [int(n) for n in shape]
    try:
        raw = base64.b64decode(body["data"], validate=True) if isinstance(body["data"], str) else None
    except (binascii.Error, ValueError):
        raw = None
    if raw is None:
        raise _malformed(f"{path}.data", "expected base64 text")
    count = int(np.prod(shape, dtype=object)) if shape else 1
    if len(raw) != count * dtype.itemsize:
        raise _malformed(f"{path}.data", f"{len(raw)} bytes for {count} items of {dtype} "
                                         f"({count * dtype.itemsize} bytes)")
    try:
        array = np.frombuffer(bytearray(raw), dtype).reshape(shape)  # writable, as the source had it
    except (ValueError, OverflowError) as exc:
        raise _malformed(f"{path}.shape", f"{shape}: {exc}") from None
    return array[()] if scalar else array


def _malformed(path: str, why: str) -> SpecError:
    return SpecError(f"the loader state's `{path}` is malformed: {why}. Pass what `Loader.state_dict()` "
                     "returned, unedited.")


def restore_source(source: Any, snapshot: Any) -> None:
    """Give `source` the state `source_snapshot` took, checked before anything changes."""
    load = getattr(source, "load_state_dict", None)
    if isinstance(snapshot, str):
        raise _malformed("source", "a string. Older shmfeed versions wrote a pickle of the source "
                         "there, which is never loaded (it could run code); take a new state")
    if not isinstance(snapshot, dict):
        raise _malformed("source", f"expected a dict, got {type(snapshot).__name__}")
    if callable(load):
        if "state_dict" not in snapshot:
            raise _malformed("source", f"the source ({type(source).__name__}) has `load_state_dict`, "
                             "and the state carries no `state_dict` of it")
        try:
            load(snapshot["state_dict"])
        except Exception as exc:
            raise SpecError(
                f"the source's `load_state_dict` refused the loader state's `source.state_dict`: "
                f"{type(exc).__name__}: {exc}. Pass what `Loader.state_dict()` returned.") from exc
        return
    attributes = snapshot.get("attributes")
    if "state_dict" in snapshot and attributes is None:
        raise SpecError(
            f"the loader state carries the source's `state_dict()`, but this source "
            f"({type(source).__name__}) has no `load_state_dict(state)` to take it")
    if not isinstance(attributes, dict) or not all(isinstance(k, str) for k in attributes):
        raise _malformed("source.attributes", f"expected a dict of attribute names, got {_short(attributes)}")
    values = {name: decode(v, f"source.attributes.{name}") for name, v in attributes.items()}
    vars(source).update(values)


# -- a Stream's state (shmfeed/sources/_shards.py): its batch numbers are its host's own ------------
def stream_state(order: Order, src: ShardedSource, epoch: int, nxt: int, ended: dict[int, int]) -> dict:
    """A Stream's state: besides (epoch, next batch), the shards of this host that
    ended before the next batch (of `ended`: local shard -> the batch it ended in)."""
    state = make(order, epoch, nxt, None)
    state["stream"] = {**stream_fingerprint(src), "ended": sorted([j, b] for j, b in ended.items() if b < nxt)}
    return state


def stream_fingerprint(src: ShardedSource) -> dict:
    """What a Stream's batch numbers mean on this host (they are the host's own)."""
    return {"num_shards": src.stream.num_shards, "shard_count": src.shard_count, "shard_index": src.shard_index}


def stream_ended(state: dict, src: ShardedSource, nxt: int) -> dict[int, int]:
    """The `ended` entries of a Stream's state, checked against `src`."""
    theirs = state.get("stream")
    if not isinstance(theirs, dict):
        raise SpecError("the loader state has no `stream` entry: pass a state from `state_dict()` of a "
                        "loader over a Stream")
    for key, value in stream_fingerprint(src).items():
        if theirs.get(key) != value:
            raise SpecError(
                f"the loader state was saved with {key}={theirs.get(key)!r} (`stream.{key}`), this loader "
                f"has {key}={value!r}: a Stream's batch numbers are its host's own, so it resumes with "
                "the same shards and hosts (each host loading its own state)")
    ended: dict[int, int] = {}
    for entry in theirs.get("ended", ()):
        ok = (isinstance(entry, (list, tuple)) and len(entry) == 2
              and all(isinstance(x, int) and not isinstance(x, bool) for x in entry))
        if not ok or not 0 <= entry[0] < len(src.shards) or not 0 <= entry[1] < nxt:
            raise SpecError(f"the loader state's `stream.ended` has {entry!r}: expected [local shard < "
                            f"{len(src.shards)}, batch < next_batch = {nxt}]")
        ended[entry[0]] = entry[1]
    return ended
