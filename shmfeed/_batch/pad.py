"""Padding: samples whose arrays vary in size, written into fixed-size slot rows.

Owns the meaning of `padded_shapes` / `padding_values` (tf.data's names) and
`with_lengths`, the slot layout they give (each padded leaf reserves its padded shape
per row), and writing a batch whose padded leaves are smaller than that shape.

- `padded_shapes` mirrors the sample's structure for the leaves that vary: a dict
  names only its padded keys, a tuple/list gives None for leaves kept as they are, an
  array sample gives its shape.  A shape has the leaf's number of dimensions; None in
  a dimension only with `bucket_boundaries` (the dimension then takes the bucket's
  length, see _order/bucket.py).  Batch-level sources give the trailing dimensions.
- A padded leaf's row holds the sample at the start of each dimension and the leaf's
  padding value (default 0) everywhere else, so every byte of a delivered row is
  defined and the same with any `num_workers`.
- `with_lengths=True` adds a `"lengths"` entry to a dict sample: the padded fields'
  true sizes, int32, shaped (rows,) for a 1-d field and (rows, ndim) otherwise,
  mirroring `padded_shapes`.
- With buckets, the slot holds each padded leaf contiguously at its bucket's shape
  (what `shapes(bucket)` gives), so the delivered arrays are plain views.  With token
  budgets a bucket's batch has its own row count too, so each bucket has its own
  layout (`rows(bucket)`, `offsets(bucket)`), and a slot is as large as the largest
  bucket's batch (not the largest rows at the largest shape).

Invariant: a sample that does not fit is a SpecError naming the sample (or batch)
index, the field and both shapes, raised before the batch is published.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, cast

import numpy as np

from .._errors import SpecError
from .rows import write_leaf
from .spec import LEAF_ALIGN_BYTES, SLOT_ALIGN_BYTES, Leaf, Node, Spec, check_batch_leaves, relayout

LENGTHS_KEY = "lengths"  # the batch entry `with_lengths=True` adds
LENGTHS_DTYPE = np.dtype(np.int32)
MAX_ARRAY_BYTES = np.iinfo(np.intp).max  # numpy's bound on an array's size


@dataclass(frozen=True)
class LeafPad:
    """How one sample leaf is padded."""

    shape: tuple[int, ...]  # reserved per row: padded shape, bucket dimensions at their largest
    value: Any  # numpy scalar of the leaf's dtype
    bucket_dims: tuple[int, ...]  # dimensions that take the bucket's length
    lengths_leaf: int | None  # index in the spec of this leaf's true sizes


@dataclass(frozen=True)
class Padding:
    """Everything a builder and the consumer need to pad (see the module docstring).
    The spec's first leaves are the sample's (one per `pads` entry); the lengths
    leaves, if any, follow."""

    sample_tree: Node
    pads: tuple[LeafPad | None, ...]  # per sample leaf; None: written as is
    boundaries: tuple[int, ...] | None  # bucket lengths, ascending

    bucket_shapes: tuple[tuple[tuple[int, ...], ...], ...] = ()  # per bucket: every spec leaf's row shape
    # Token budgets: per bucket, the rows a slot holds and every spec leaf's offset
    # (empty: the spec's rows and offsets, for every bucket).
    bucket_rows: tuple[int, ...] = ()
    bucket_offsets: tuple[tuple[int, ...], ...] = ()

    def shapes(self, bucket: int) -> list[tuple[int, ...]]:
        """Row shape of every spec leaf in a batch of `bucket`."""
        return list(self.bucket_shapes[bucket])

    def rows(self, bucket: int) -> int | None:
        """Rows a slot holds for a batch of `bucket` (None: the spec's)."""
        return self.bucket_rows[bucket] if self.bucket_rows else None

    def offsets(self, bucket: int) -> tuple[int, ...] | None:
        """Each spec leaf's offset in a slot of `bucket`'s batch (None: the spec's)."""
        return self.bucket_offsets[bucket] if self.bucket_offsets else None

    def bucket_for(self, need: int, where: str) -> int:
        """The smallest bucket whose length is at least `need`."""
        assert self.boundaries is not None
        bucket = int(np.searchsorted(self.boundaries, need))
        if bucket == len(self.boundaries):
            raise SpecError(
                f"{where}: a padded dimension has length {need}, longer than the largest of "
                f"`bucket_boundaries` ({self.boundaries[-1]}). Crop it in `__getitem__` or add a "
                "larger boundary.")
        return bucket

    def batch_need(self, leaves: list) -> int:
        """The longest bucket dimension of a batch-level source's batch (checked)."""
        return max((x.shape[1 + d] for x, pad in zip(leaves, self.pads) if pad is not None
                    for d in pad.bucket_dims), default=0)

    # -- writing ----------------------------------------------------------------------
    def write_samples(self, spec: Spec, views: list[np.ndarray], samples: list[list],
                      items: list[int]) -> None:
        """Write the flattened `samples` (source[items[row]]'s leaves) into `views`."""
        n = len(samples)
        if not n:
            return
        for j, (pad, col) in enumerate(zip(self.pads, zip(*samples))):
            view, leaf = views[j], spec.leaves[j]
            if pad is None:
                write_leaf(view, col, leaf, items)
                continue
            room = view.shape[1:]
            shapes: list[Any] = [x.shape if type(x) is np.ndarray and x.dtype == leaf.dtype else None
                                 for x in col]
            for row, shape in enumerate(shapes):
                if shape is None or len(shape) != len(room) or any(a > b for a, b in zip(shape, room)):
                    _check_row(col[row], leaf, room, pad.shape, items[row])  # raises, saying why
            view[:n] = pad.value
            if len(room) == 1:
                for row, x in enumerate(col):
                    view[row, : len(x)] = x
            else:
                for row, x in enumerate(col):
                    view[(row,) + tuple(slice(0, s) for s in x.shape)] = x
            if pad.lengths_leaf is not None:
                views[pad.lengths_leaf][:n] = [s[0] for s in shapes] if len(room) == 1 else shapes

    def write_batch(self, spec: Spec, views_for: Callable[[list | None], list[np.ndarray]], leaves: list,
                    index: int) -> tuple[int, int | None]:
        """Write a batch-level source's batch into the views `views_for(shapes)` gives
        (shapes: its bucket's, or None); return its rows and bucket.  A batch-level
        source's bucket is its own: the smallest that holds it."""
        rows = check_batch_leaves(leaves, spec, index, tuple(pad is not None for pad in self.pads))
        bucket = None
        if self.boundaries is not None:
            bucket = self.bucket_for(self.batch_need(leaves), f"batch {index}")
        views = views_for(None if bucket is None else self.shapes(bucket))
        for j, pad in enumerate(self.pads):
            if pad is not None:
                x = leaves[j]
                _check_fits(x.shape[1:], x.dtype, spec.leaves[j], views[j].shape[1:], pad.shape, f"batch {index}")
        for j, pad in enumerate(self.pads):
            x, view = leaves[j], views[j]
            if pad is None:
                view[:rows] = x
                continue
            view[:rows] = pad.value
            view[(slice(0, rows),) + tuple(slice(0, s) for s in x.shape[1:])] = x
            if pad.lengths_leaf is not None:
                views[pad.lengths_leaf][:rows] = x.shape[1] if x.ndim == 2 else x.shape[1:]
        return rows, bucket


def _check_fits(shape: tuple, dtype: np.dtype, leaf: Leaf, room: tuple[int, ...],
               full: tuple[int, ...], where: str) -> None:
    """Raise a SpecError unless rows of `shape` and `dtype` fit `room`, the padded
    shape of this batch (`full` unless a bucket made it smaller)."""
    field = leaf.path or "(root)"
    if dtype != leaf.dtype:
        raise SpecError(f"{where}, field {field}: got dtype {dtype}, expected {leaf.dtype} "
                        "like the first sample. Cast it in `__getitem__`.")
    if len(shape) == len(room) and all(a <= b for a, b in zip(shape, room)):
        return
    if room != full and len(shape) == len(full) and all(a <= b for a, b in zip(shape, full)):
        fix = ("Its entry in `bucket_lengths` is shorter than this sample: give the true length "
               "(the longest bucketed dimension).")
    else:
        fix = "Crop it in `__getitem__`, or raise its entry in `padded_shapes`."
    raise SpecError(f"{where}, field {field}: shape {tuple(shape)} does not fit the padded shape "
                    f"{tuple(room)}{' of its bucket' if room != full else ''}. {fix}")


def _check_row(x: Any, leaf: Leaf, room: tuple[int, ...], full: tuple[int, ...], index: int) -> None:
    if not isinstance(x, np.ndarray):
        raise SpecError(f"sample {index}, field {leaf.path or '(root)'}: got {type(x).__name__}, "
                        f"expected a numpy array of dtype {leaf.dtype} (a padded field)")
    _check_fits(x.shape, x.dtype, leaf, room, full, f"sample {index}")


# -- building the spec ---------------------------------------------------------------
def _is_shape(ps: Any) -> bool:
    return isinstance(ps, (tuple, list)) and all(
        d is None or (isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0) for d in ps)


def _match(node: Node, ps: Any, path: str, found: dict, what: str) -> Any:
    """Walk `ps` (a `padded_shapes` or `padding_values` structure) along the sample's
    tree; put leaf index -> entry in `found`; return the structure of what was
    matched, leaves replaced by their index (for the lengths entry)."""
    if ps is None:
        return None
    kind = node[0]
    here = path or "(root)"
    if kind == "leaf":
        if what == "padded_shapes" and isinstance(ps, (int, np.integer)) and not isinstance(ps, bool):
            found[node[1]] = int(ps)  # a text field's width, checked by plan()
            return None
        if what == "padded_shapes" and not _is_shape(ps):
            raise SpecError(f"`padded_shapes`, field {here}: expected a shape (a tuple of ints >= 0) for "
                            f"this array field, a width (an int) for a text field, or None to keep it "
                            f"as it is; got {ps!r}")
        found[node[1]] = ps
        return node[1]
    if kind == "dict":
        if not isinstance(ps, dict):
            raise SpecError(f"`{what}`, field {here}: the sample has a dict here, got {type(ps).__name__}: "
                            f"give a dict naming the keys to pad")
        unknown = [k for k in ps if k not in node[1]]
        if unknown:
            raise SpecError(f"`{what}`, field {here}: keys {unknown} are not in the sample "
                            f"(its keys: {list(node[1])})")
        return {k: _match(c, ps[k], f"{path}[{k!r}]", found, what) for k, c in zip(node[1], node[2]) if k in ps}
    if not isinstance(ps, (tuple, list)) or len(ps) != len(node[2]):
        raise SpecError(f"`{what}`, field {here}: the sample has a sequence of {len(node[2])} here, "
                        f"got {ps!r}: give one entry per element (None for those not padded)")
    return [_match(c, p, f"{path}[{i}]", found, what) for i, (c, p) in enumerate(zip(node[2], ps))]


def _pad_value(value: Any, leaf: Leaf) -> Any:
    try:
        arr = np.asarray(value)
        cast = arr.astype(leaf.dtype)
        exact = arr.ndim == 0 and arr.dtype.kind in "biufc" and (cast == arr or (np.isnan(arr) & np.isnan(cast)))
    except (TypeError, ValueError, OverflowError):
        exact = False
    if not exact:
        raise SpecError(f"`padding_values`, field {leaf.path or '(root)'}: {value!r} is not a number that "
                        f"dtype {leaf.dtype} holds exactly")
    return cast[()]


def _text_leaf(leaf: Leaf, width: Any) -> Leaf:
    """A text field's leaf at the width `padded_shapes` gives it."""
    here = leaf.path or "(root)"
    if leaf.dtype.kind not in "SU":
        raise SpecError(f"`padded_shapes`, field {here}: {width!r} is a width, for a text field; this "
                        f"field has dtype {leaf.dtype}: give it a shape (a tuple of ints)")
    if not isinstance(width, int) or width <= 0:
        raise SpecError(f"`padded_shapes`, field {here}: a text field's width must be an int > 0 "
                        f"(characters, or bytes), got {width!r}")
    order = leaf.dtype.byteorder if leaf.dtype.kind == "U" else "|"
    return Leaf(leaf.path, leaf.shape, np.dtype(f"{order}{leaf.dtype.kind}{width}"), 0, leaf.pytype)


def _lengths_node(matched: Any, n_leaves: int, order: list) -> Node:
    """The output tree of the lengths entry; appends the padded leaf of each of its
    leaves to `order`."""
    if matched is None:
        return ("none",)
    if isinstance(matched, int):
        order.append(matched)
        return ("leaf", n_leaves + len(order) - 1)
    if isinstance(matched, dict):
        keys = tuple(matched)
        return ("dict", keys, tuple(_lengths_node(matched[k], n_leaves, order) for k in keys))
    return ("seq", list, tuple(_lengths_node(m, n_leaves, order) for m in matched))


def plan(spec: Spec, padded_shapes: Any, padding_values: Any, with_lengths: bool,
         boundaries: tuple[int, ...] | None, index: int,
         bucket_rows: tuple[int, ...] | None = None) -> tuple[Spec, Padding | None]:
    """The spec of padded batches (from `spec`, inferred from the first sample, source
    index `index`) and how to pad; (spec, None) without padding.  `bucket_rows`: each
    bucket's batch size (token budgets), when they differ."""
    if padded_shapes is None:
        if padding_values is not None or with_lengths or boundaries is not None:
            given = [n for n, v in (("padding_values", padding_values), ("with_lengths", with_lengths),
                                    ("bucket_boundaries", boundaries)) if v not in (None, False)]
            raise SpecError(f"{', '.join(f'`{n}`' for n in given)} need `padded_shapes`: the fields "
                            "to pad and their largest shapes")
        return spec, None
    shapes: dict[int, Any] = {}
    matched = _match(spec.tree, padded_shapes, "", shapes, "padded_shapes")
    values: dict[int, Any] = {}
    if padding_values is not None and not (isinstance(padding_values, (dict, list, tuple))):
        values = {j: padding_values for j in shapes}
    elif padding_values is not None:
        _match(spec.tree, padding_values, "", values, "padding_values")
        extra = [spec.leaves[j].path for j in values if j not in shapes]
        if extra:
            raise SpecError(f"`padding_values` gives values for {extra}, which `padded_shapes` does not pad")
    where = f"{'batch' if spec.batch_level else 'sample'} {index}"
    top = max(boundaries) if boundaries else None
    lengths_order: list[int] = []
    tree = spec.tree
    if with_lengths:
        if tree[0] != "dict":
            raise SpecError("`with_lengths=True` adds a 'lengths' entry to dict samples; this sample is "
                            "not a dict. Return the length as a field of the sample instead.")
        if LENGTHS_KEY in tree[1]:
            raise SpecError("`with_lengths=True` adds a 'lengths' entry, and the sample has a key "
                            "'lengths' already: rename it")
        node = _lengths_node(matched, len(spec.leaves), lengths_order)
        tree = ("dict", tree[1] + (LENGTHS_KEY,), tree[2] + (node,))
    pads: list[LeafPad | None] = [None] * len(spec.leaves)
    protos = list(spec.leaves)
    for j, ps in shapes.items():
        leaf = spec.leaves[j]
        if isinstance(ps, int) or leaf.dtype.kind in "SU":
            protos[j] = _text_leaf(leaf, ps)
            continue
        if len(ps) != len(leaf.shape):
            raise SpecError(f"`padded_shapes`, field {leaf.path or '(root)'}: {tuple(ps)} has {len(ps)} "
                            f"dimension(s), the field has {len(leaf.shape)} ({where}: shape {leaf.shape})")
        if None in ps and top is None:
            raise SpecError(f"`padded_shapes`, field {leaf.path or '(root)'}: {tuple(ps)} has None, which "
                            "needs `bucket_boundaries` (a slot is sized once: give each dimension its "
                            "largest length)")
        full = tuple(cast(int, top) if d is None else int(d) for d in ps)
        batch_bytes = spec.rows * math.prod(full) * leaf.dtype.itemsize
        if batch_bytes > MAX_ARRAY_BYTES:
            raise SpecError(f"`padded_shapes`, field {leaf.path or '(root)'}: {full} makes a batch of "
                            f"{batch_bytes} bytes, and a numpy array holds at most {MAX_ARRAY_BYTES}: "
                            "give each dimension its real largest length")
        _check_fits(leaf.shape, leaf.dtype, leaf, full, full, where)
        lengths_leaf = len(spec.leaves) + lengths_order.index(j) if j in lengths_order else None
        pads[j] = LeafPad(full, _pad_value(values.get(j, 0), leaf),
                          tuple(d for d, s in enumerate(ps) if s is None), lengths_leaf)
        protos[j] = Leaf(leaf.path, full, leaf.dtype, 0, None)
    for j in lengths_order:
        nd = len(spec.leaves[j].shape)
        protos.append(Leaf(f"[{LENGTHS_KEY!r}]{spec.leaves[j].path}", () if nd == 1 else (nd,),
                           LENGTHS_DTYPE, 0, None))
    if boundaries is None and not lengths_order and all(p is None for p in pads):
        return relayout(spec, tree, protos), None  # only text widths: nothing to pad
    if boundaries is not None and not any(p is not None and p.bucket_dims for p in pads):
        raise SpecError("`bucket_boundaries` needs a dimension to bucket: give it as None in "
                        "`padded_shapes`, e.g. {'tokens': (None,)}")
    bucket_shapes = tuple(
        tuple(tuple(n if pad is not None and d in pad.bucket_dims else size for d, size in enumerate(lf.shape))
              for lf, pad in zip(protos, pads + [None] * len(lengths_order)))
        for n in boundaries or ())
    padded = relayout(spec, tree, protos)
    if bucket_rows is None:
        return padded, Padding(spec.tree, tuple(pads), boundaries, bucket_shapes)
    # Each bucket laid out at its own rows and shapes; the slot fits the largest.
    layouts = [bucket_layout(rows, shapes, [lf.dtype for lf in padded.leaves])
               for rows, shapes in zip(bucket_rows, bucket_shapes)]
    slot_bytes = max(nbytes for _, nbytes in layouts)
    return (replace(padded, slot_bytes=slot_bytes),
            Padding(spec.tree, tuple(pads), boundaries, bucket_shapes, tuple(bucket_rows),
                    tuple(offsets for offsets, _ in layouts)))


def bucket_layout(rows: int, shapes: tuple[tuple[int, ...], ...],
                  dtypes: list[np.dtype]) -> tuple[tuple[int, ...], int]:
    """Each leaf's offset, and the slot bytes, of a batch of `rows` rows of `shapes`
    (aligned as _spec lays out a slot)."""
    offsets, offset = [], 0
    for shape, dtype in zip(shapes, dtypes):
        offsets.append(offset)
        offset += -(-rows * math.prod(shape) * dtype.itemsize // LEAF_ALIGN_BYTES) * LEAF_ALIGN_BYTES
    return tuple(offsets), max(SLOT_ALIGN_BYTES, -(-offset // SLOT_ALIGN_BYTES) * SLOT_ALIGN_BYTES)
