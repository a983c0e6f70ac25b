"""Every option of `shmfeed.Loader`, declared once: its name, type, default, check and
doc, as a field of `LoaderOptions`.

`Loader.__init__` spells the same keyword parameters out, so that `help()` and type
checkers see each with its type and default, and hands them over in one
`LoaderOptions` (`options_of(locals())`); `_config.build` reads the checked options;
the Loader's docstring lists them from here (`describe`).  tests/test_options.py keeps
the signature and the declarations from drifting apart.

A check here looks at its option alone and returns the value as the loader uses it.
What depends on several options or on the source (`shard_index < shard_count`,
`token_budget` with buckets, `num_slots` with `memory_budget_bytes`, `max_batch_rows`
against the batch, the shuffle modes, padding, streams) is checked where it is used;
each such option's declaration names where (`checked_by`).

Invariant: checks run in declaration order, which is the signature's order.
"""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from ._errors import SpecError
from ._order import rng as _rng
from ._order.order import DEFAULT_SHUFFLE_BLOCK

START_METHODS = ("auto", "fork", "forkserver", "spawn")
MAX_NICE = 19
MAX_SLOTS = 0xFFFFFFFE  # slot numbers are 32-bit, and 0xFFFFFFFF means "no slot"
AUTO = "auto"  # `num_workers` and `num_slots` chosen (and the workers adjusted) by _autotune.py


def check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise SpecError(f"`{name}` must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise SpecError(f"`{name}` must be True or False, got {value!r}")
    return bool(value)


def check_boundaries(value: Any) -> tuple[int, ...] | None:
    """`bucket_boundaries`: None, or ascending lengths >= 1."""
    if value is None:
        return None
    try:
        out = tuple(check_int("bucket_boundaries", b, 1) for b in value)
    except TypeError:
        raise SpecError(f"`bucket_boundaries` must be a list of lengths, got {value!r}") from None
    if not out or any(a >= b for a, b in zip(out, out[1:])):
        raise SpecError(f"`bucket_boundaries` must be a non-empty list of increasing lengths, got {list(out)}")
    return out


Check = Callable[[str, Any], Any]  # (option name, value) -> the value as the loader uses it


def _int(minimum: int, maximum: int | None = None, why: str = "") -> Check:
    def check(name: str, value: Any) -> int:
        value = check_int(name, value, minimum)
        if maximum is not None and value > maximum:
            raise SpecError(f"`{name}` must be <= {maximum}{why}, got {value}")
        return value
    return check


def _or_auto(check: Check, expected: str) -> Check:
    """`check`, or the string "auto" (shmfeed/_autotune.py picks the value)."""
    def checked(name: str, value: Any) -> Any:
        if isinstance(value, str):
            if value == AUTO:
                return value
            raise SpecError(f"`{name}` must be {expected} or \"auto\", got {value!r}")
        return check(name, value)
    return checked


def _or_none(check: Check) -> Check:
    return lambda name, value: None if value is None else check(name, value)


def _seed(name: str, value: Any) -> int:
    # None: follow the user's seeding of np.random (without drawing from it).
    return _rng.seed_of_user_rng() if value is None else check_int(name, value, 0)


def _timeout(name: str, value: Any) -> float | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
        raise SpecError(f"`{name}` must be > 0 seconds or None, got {value!r}")
    return None if value is None else float(value)


def _start_method(name: str, value: Any) -> str:
    if value not in START_METHODS:
        raise SpecError(f"`{name}` must be one of {START_METHODS}, got {value!r}")
    return value


def _function(name: str, value: Any) -> Any:
    if value is not None and not callable(value):
        raise SpecError(f"`{name}` must be a function batch -> batch, got {value!r:.80}")
    return value


def _option(default: Any, doc: str, check: Check | None = None, *, checked_by: str = "") -> Any:
    """A field: `check` checks the option alone; `checked_by` names where an option
    checked with others (or with the source) is."""
    return field(default=default, metadata={"doc": doc, "check": check, "checked_by": checked_by})


def _required(doc: str, check: Check) -> Any:
    return field(metadata={"doc": doc, "check": check, "checked_by": ""})


@dataclass(frozen=True, kw_only=True)
class LoaderOptions:
    """The Loader's options as given (`checked()`: as the loader uses them)."""

    batch_size: int | None = _required(
        "samples per batch, stacked; None: `source[b]` is a whole batch (the Keras `Sequence` "
        "way).", _or_none(_int(1)))
    num_workers: int | str = _required(
        "worker processes building batches; 0 builds them in the training process; \"auto\": "
        "one per usable CPU (at most 8) to start, then adjusted between epochs from what the loop waited and "
        "the workers' busy time (shmfeed/_autotune.py).",
        _or_auto(_int(0), "an integer >= 0"))
    shuffle: bool | str = _option(
        False, "True: a new order every epoch; \"block\": runs of `shuffle_block` consecutive items "
        "kept together (shuffled within).", checked_by="_order.order.Order")
    shuffle_block: int = _option(
        DEFAULT_SHUFFLE_BLOCK, "items per block with `shuffle=\"block\"`.", checked_by="_order.order.Order")
    seed: int | None = _option(
        0, "the stream's seed (order and `shmfeed.rng()`); None follows the user's seeding of "
        "np.random, without drawing from it.", _seed)
    drop_last: bool = _option(False, "drop a last batch that would be short.", check_bool)
    num_slots: int | str | None = _option(
        None, "slots in the ring (>= 2); None: sized from `memory_budget_bytes`, or "
        "`2 * num_workers + 4` (more for small batches); \"auto\": that default for the most "
        "workers the loader may run, within `memory_budget_bytes` and the memory free now "
        "(fixed at construction).",
        _or_none(_or_auto(_int(2, MAX_SLOTS, " (slot numbers are 32-bit)"), "an integer >= 2")))
    memory_budget_bytes: int | None = _option(
        None, "the most bytes the ring may take (slots, reports and control block); "
        "not with an integer `num_slots`.", _or_none(_int(1)))
    max_batch_rows: int | None = _option(
        None, "with `batch_size=None`: the most rows a batch may have (slots are sized from batch 0, "
        "and a larger batch is an error).", checked_by="_config.build (against batch 0)")
    timeout_s: float | None = _option(
        300.0, "seconds a batch may take before a `WorkerError` (its worker is replaced); "
        "None waits forever.", _timeout)
    max_restarts: int = _option(
        3, "worker replacements over the loader's life before it gives up.", _int(0))
    start_method: str = _option(
        "auto", "how workers start: \"fork\", \"forkserver\", \"spawn\", or \"auto\" (fork unless "
        "JAX or CUDA runs in this process).", _start_method)
    seed_global_rngs: bool = _option(
        True, "re-seed `random` and `np.random` (and torch's) from (seed, epoch, batch) before each "
        "batch, so code using them is keyed like `shmfeed.rng()`.", check_bool)
    shard_index: int = _option(
        0, "this host's index among `shard_count` hosts (< `shard_count`).", _int(0))
    shard_count: int = _option(
        1, "hosts sharing each global batch of `shard_count * batch_size` rows.", _int(1))
    steps_per_epoch: int | None = _option(
        None, "batches per epoch of a generator or iterable source.",
        checked_by="sources._stream.stream_source, sources._shards.sharded_source")
    padded_shapes: Any = _option(
        None, "shapes to pad varying sample fields to (None in a dimension bounded by "
        "`bucket_boundaries`).", checked_by="_batch.pad.plan")
    padding_values: Any = _option(None, "what padding holds (default 0).", checked_by="_batch.pad.plan")
    with_lengths: bool = _option(
        False, "add `batch[\"lengths\"]`, the padded fields' true sizes.", check_bool)
    bucket_boundaries: Any = _option(
        None, "increasing lengths: samples of similar `bucket_lengths` are batched together, "
        "each batch padded to the smallest boundary that holds it.",
        lambda name, value: check_boundaries(value))
    bucket_lengths: Any = _option(
        None, "each sample's length for bucketing: len(source) ints, or a function of the index.",
        checked_by="_config.build, _order.bucket.item_buckets")
    token_budget: int | None = _option(
        None, "with buckets and `batch_size=None`: `token_budget // boundary` rows per batch of "
        "each bucket.", checked_by="_config.check_token_budget")
    worker_nice: int = _option(
        0, f"added to the workers' nice value (0-{MAX_NICE}): lower their CPU priority below the "
        "training loop's.", _int(0, MAX_NICE, " (the largest nice value)"))
    batch_transform: Callable[[Any], Any] | None = _option(
        None, "`fn(batch) -> batch`, run in the worker on each built batch.", _function)
    builders: Any = _option(
        None, "`shmfeed.ray.Builders(...)`: batch builders on a Ray cluster, beside the local "
        "workers (shmfeed/ray.py).", checked_by="_loader._check_remote")

    def checked(self) -> LoaderOptions:
        """These options with each one checked on its own, as the loader uses them; the
        first bad one (in declaration order) raises a `SpecError` naming it."""
        values = {}
        for f in fields(self):
            check = f.metadata["check"]
            value = getattr(self, f.name)
            values[f.name] = value if check is None else check(f.name, value)
        return dataclasses.replace(self, **values)


def options_of(arguments: Mapping[str, Any]) -> LoaderOptions:
    """The options among `arguments` (e.g. `Loader.__init__`'s `locals()`)."""
    return LoaderOptions(**{f.name: arguments[f.name] for f in fields(LoaderOptions)})


def describe(indent: str = "    ") -> str:
    """The options section of the Loader's docstring."""
    lines = ["Options (each declared once, in shmfeed/_options.py):", ""]
    for f in fields(LoaderOptions):
        default = "required" if f.default is dataclasses.MISSING else f"default {f.default!r}"
        lines.append(f"- `{f.name}`: {f.type}, {default}.")
        # No line break inside a `code span`: the spaces in one are held back from wrap.
        spans = f.metadata["doc"].split("`")
        text = "`".join(p.replace(" ", "\0") if i % 2 else p for i, p in enumerate(spans))
        lines += [line.replace("\0", " ")
                  for line in textwrap.wrap(text, 84, initial_indent="  ", subsequent_indent="  ")]
    return textwrap.indent("\n".join(lines), indent)
