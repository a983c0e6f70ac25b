"""The batch spec: the pytree structure of a batch and, per leaf, its dtype, its shape
and where it lives in a slot.

The spec is inferred from the first sample (or first batch, for batch-level sources)
and every later sample or batch is checked against it before a byte is written.
Errors name the sample or batch index, the field path (`['image']`, `[0]`) and what
was expected.  Plain numeric dtypes are allowed (bool, signed and unsigned integers,
floats, complex): they are what can be shared as raw bytes and handed to JAX without
conversion.  So are strings (file names, captions, ids): a `str` or `bytes` leaf, or a
numpy `U`/`S` array, rides along as a fixed-width numpy unicode/bytes array, its width
(characters, or bytes) given by `padded_shapes` (an int for the field) or probed from
the first sample and rounded up to a power of two, at least MIN_TEXT_WIDTH; a longer
one is a SpecError naming the sample and field (never cut silently).  numpy's `S`
drops trailing NUL bytes.

A leaf that numpy converts in one step (it has `__array__`, `__array_interface__` or
`__array_struct__`: a PyTorch CPU tensor, a PIL image, a JAX array on the CPU) is
converted with `np.asarray` and then checked like an array; shmfeed imports none of
those libraries.  The conversion runs only for such leaves: an ndarray or a Python
number never pays for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import numpy as np

from .._errors import SpecError, internal

LEAF_ALIGN_BYTES = 128  # every leaf starts on this boundary inside a slot
SLOT_ALIGN_BYTES = 4096  # slots are whole pages: page-lockable and DMA friendly
_NUMERIC_KINDS = "biufc"
_PY_SCALARS = (bool, int, float, complex)
_ARRAY_PROTOCOLS = ("__array__", "__array_interface__", "__array_struct__")
_TEXT_TYPES = (str, bytes, bytearray, memoryview)
_TEXT_KINDS = "SU"  # numpy's fixed-width bytes and unicode
MIN_TEXT_WIDTH = 16  # characters (bytes) a probed text field holds at least

# Tree nodes: ("leaf", index) | ("dict", keys, children) | ("seq", type, children),
# and, in a batch's tree only, ("none",): a None in the batch.
Node = tuple


@dataclass(frozen=True)
class Leaf:
    path: str  # e.g. "['image']", "[0]", or "" for a batch that is a single array
    shape: tuple[int, ...]  # shape of one row (a sample; or a batch without its leading axis)
    dtype: np.dtype
    offset: int  # byte offset inside a slot
    pytype: type | None  # the Python scalar type when the first sample gave one


@dataclass(frozen=True)
class Spec:
    tree: Node
    leaves: tuple[Leaf, ...]
    rows: int  # rows a slot holds: batch_size, or the first batch's length
    batch_level: bool
    slot_bytes: int

    @property
    def row_bytes(self) -> int:
        """Bytes of one row of every leaf together."""
        return sum(math.prod(lf.shape) * lf.dtype.itemsize for lf in self.leaves)

    @property
    def batch_bytes(self) -> int:
        return self.rows * self.row_bytes

    def describe(self) -> str:
        parts = [f"{lf.path or 'batch'}: {lf.dtype}{list((self.rows,) + lf.shape)}" for lf in self.leaves]
        return ", ".join(parts)


def _path_str(path: tuple) -> str:
    return "".join(f"[{k!r}]" for k in path)


def _where(kind: str, index: int | None) -> str:
    return f"{kind} {index}" if index is not None else kind


def build_tree(obj: Any, path: tuple, leaves: list, where: str, leaf=None) -> Node:
    """The tree of `obj` (dicts, tuples, lists, namedtuples), appending `(path, value)`
    to `leaves` for each leaf, where value is `leaf(obj, path, where)` (by default the
    leaf as an array and its Python scalar type, checked)."""
    leaf = leaf or _as_leaf_array
    if isinstance(obj, dict):
        keys = tuple(obj.keys())
        return ("dict", keys, tuple(build_tree(obj[k], path + (k,), leaves, where, leaf) for k in keys))
    if isinstance(obj, (tuple, list)):
        cls = type(obj) if hasattr(obj, "_fields") else (list if isinstance(obj, list) else tuple)
        return ("seq", cls, tuple(build_tree(v, path + (i,), leaves, where, leaf) for i, v in enumerate(obj)))
    leaves.append((path, leaf(obj, path, where)))
    return ("leaf", len(leaves) - 1)


def _convertible(obj: Any) -> bool:
    cls = type(obj)
    return any(hasattr(cls, name) for name in _ARRAY_PROTOCOLS)


def _convert(obj: Any, where: str, path: str) -> np.ndarray:
    """np.asarray(obj) for an object that implements numpy's array protocols."""
    try:
        return np.asarray(obj)
    except Exception as exc:
        # e.g. a CUDA tensor or one that requires grad: torch refuses the conversion.
        raise SpecError(
            f"{where}, field {path}: a {type(obj).__name__} could not be converted to a numpy "
            f"array ({type(exc).__name__}: {exc}). Return host memory from `__getitem__`, e.g. "
            "`tensor.detach().cpu().numpy()`.") from exc


def _unsupported(obj: Any, where: str, path: str, expected: str) -> SpecError:
    """The error for a leaf that is neither an array, a number nor convertible."""
    head = f"{where}, field {path}: got a value of type {type(obj).__name__}, expected {expected}."
    if isinstance(obj, memoryview):
        return SpecError(
            f"{head} Text and bytes cannot travel as fixed-size raw memory: encode them as numbers "
            "in `__getitem__` (token or class ids; bytes as a fixed-length uint8 array, e.g. "
            "np.frombuffer(data.ljust(n, b'\\0'), np.uint8), with the length in another field), or "
            "keep them out of the sample and look them up by index.")
    return SpecError(f"{head} Convert it in `__getitem__`, e.g. with np.asarray.")


def _as_leaf_array(obj: Any, path: tuple, where: str) -> tuple[np.ndarray | np.generic, type | None]:
    here = _path_str(path) or "(root)"
    if isinstance(obj, np.ndarray | np.generic):
        arr = obj
        pytype = None
    elif type(obj) in _PY_SCALARS:
        arr = np.asarray(obj)
        pytype = type(obj)
    elif type(obj) in (str, bytes, bytearray):
        arr = np.str_(obj) if type(obj) is str else np.bytes_(bytes(obj))
        pytype = str if type(obj) is str else bytes
    elif _convertible(obj):
        arr = _convert(obj, where, here)
        pytype = None
    else:
        raise _unsupported(obj, where, here, "a numpy array or a number (a dict, tuple or list of them)")
    if arr.dtype.kind not in _NUMERIC_KINDS + _TEXT_KINDS:
        raise SpecError(
            f"{where}, field {here}: dtype {arr.dtype} is not supported, "
            "expected bool, integer, float, complex or fixed-width text (str, bytes, numpy U/S). "
            "Encode objects as numbers or text in `__getitem__`."
        )
    return arr, pytype


def text_width(dtype: np.dtype) -> int:
    """Characters (`U`) or bytes (`S`) a text dtype holds."""
    return dtype.itemsize // 4 if dtype.kind == "U" else dtype.itemsize


def _probed(dtype: np.dtype) -> np.dtype:
    """A text leaf's slot dtype from the first sample's: room for longer ones."""
    if dtype.kind not in _TEXT_KINDS:
        return dtype
    width = max(MIN_TEXT_WIDTH, 1 << max(text_width(dtype) - 1, 0).bit_length())
    return np.dtype(f"{dtype.byteorder if dtype.kind == 'U' else '|'}{dtype.kind}{width}")


def _text_fits(x: Any, leaf: Leaf) -> bool:
    """Whether text array/scalar `x` fits `leaf`'s text dtype (same kind, not wider)."""
    return x.dtype.kind == leaf.dtype.kind and text_width(x.dtype) <= text_width(leaf.dtype)


def text_too_long(where: str, leaf: Leaf, got: int) -> SpecError:
    unit = "characters" if leaf.dtype.kind == "U" else "bytes"
    return SpecError(
        f"{where}, field {leaf.path or '(root)'}: text of {got} {unit}, wider than the "
        f"{text_width(leaf.dtype)} its slot holds ({leaf.dtype}, from `padded_shapes` or probed from the first "
        f"sample). Give the field its largest width in `padded_shapes`, e.g. "
        f"{{{leaf.path[1:-1] or 'field'}: {2 * got}}}, or cut it in `__getitem__`.")


def infer(first: Any, *, rows: int | None, index: int) -> Spec:
    """Spec of batches built from `first`: one sample when `rows` is the batch size,
    or a whole batch when `rows` is None (batch-level source)."""
    batch_level = rows is None
    where = _where("batch" if batch_level else "sample", index)
    found: list = []
    tree = build_tree(first, (), found, where)
    if not found:
        raise SpecError(f"{where}: contains no arrays (an empty dict/tuple/list)")
    if batch_level:
        lead = []
        for path, (arr, _) in found:
            if arr.ndim == 0:
                raise SpecError(
                    f"{where}, field {_path_str(path) or '(root)'}: a 0-d value in a batch-level "
                    "source, expected an array whose first axis is the batch axis"
                )
            lead.append(arr.shape[0])
        if len(set(lead)) != 1:
            detail = ", ".join(f"{_path_str(p) or '(root)'}: {n}" for (p, _), n in zip(found, lead))
            raise SpecError(f"{where}: fields disagree on the batch length ({detail})")
        rows = lead[0]
    assert rows is not None
    protos = [
        Leaf(_path_str(path), tuple(arr.shape[1:]) if batch_level else tuple(arr.shape), _probed(arr.dtype), 0,
             None if batch_level else pytype)
        for path, (arr, pytype) in found
    ]
    return _lay_out(tree, protos, rows, batch_level)


def _lay_out(tree: Node, protos: list[Leaf], rows: int, batch_level: bool) -> Spec:
    """Place each leaf at an aligned offset with room for `rows` rows."""
    leaves = []
    offset = 0
    for lf in protos:
        cap = math.prod((rows,) + lf.shape) * lf.dtype.itemsize  # Python ints: no wrap-around
        leaves.append(Leaf(lf.path, lf.shape, lf.dtype, offset, lf.pytype))
        offset += -(-cap // LEAF_ALIGN_BYTES) * LEAF_ALIGN_BYTES
    slot_bytes = max(SLOT_ALIGN_BYTES, -(-offset // SLOT_ALIGN_BYTES) * SLOT_ALIGN_BYTES)
    return Spec(tree, tuple(leaves), rows, batch_level, slot_bytes)


def _flatten(obj: Any, node: Node, out: list) -> bool:
    """Append obj's leaves in spec order; False when the structure differs."""
    kind = node[0]
    if kind == "leaf":
        out.append(obj)
        return True
    if kind == "dict":
        if not isinstance(obj, dict) or len(obj) != len(node[1]):
            return False
        try:
            return all(_flatten(obj[k], child, out) for k, child in zip(node[1], node[2]))
        except KeyError:
            return False
    if not isinstance(obj, (tuple, list)) or len(obj) != len(node[2]):
        return False
    return all(_flatten(v, child, out) for v, child in zip(obj, node[2]))


def _structure(node: Node) -> str:
    kind = node[0]
    if kind == "leaf":
        return "array"
    if kind == "dict":
        return "{" + ", ".join(f"{k!r}: {_structure(c)}" for k, c in zip(node[1], node[2])) + "}"
    open_, close = ("[", "]") if node[1] is list else ("(", ")")
    return open_ + ", ".join(_structure(c) for c in node[2]) + close


def _structure_error(obj: Any, node: Node, path: tuple, where: str) -> SpecError:
    kind = node[0]
    here = _path_str(path) or "(root)"
    if kind == "dict":
        if not isinstance(obj, dict):
            return SpecError(f"{where}, field {here}: got {type(obj).__name__}, expected a dict with keys {list(node[1])} like the first sample")
        missing = [k for k in node[1] if k not in obj]
        extra = [k for k in obj if k not in node[1]]
        if missing or extra:
            return SpecError(f"{where}, field {here}: keys differ from the first sample's (missing {missing}, unexpected {extra})")
        for k, child in zip(node[1], node[2]):
            if not _flatten(obj[k], child, []):
                return _structure_error(obj[k], child, path + (k,), where)
    elif kind == "seq":
        if not isinstance(obj, (tuple, list)) or len(obj) != len(node[2]):
            got = f"{type(obj).__name__} of length {len(obj)}" if isinstance(obj, (tuple, list)) else type(obj).__name__
            return SpecError(f"{where}, field {here}: got {got}, expected {_structure(node)} like the first sample")
        for i, (v, child) in enumerate(zip(obj, node[2])):
            if not _flatten(v, child, []):
                return _structure_error(v, child, path + (i,), where)
    return SpecError(f"{where}, field {here}: structure differs from the first sample's {_structure(node)}")


class _Mismatch(Exception):
    pass


def _compile(node: Node):
    """A function obj -> sequence of leaves for this tree, raising _Mismatch (or a
    KeyError/TypeError) when obj's structure differs.  Built once per spec: the
    generic walk costs more than the copy for small samples."""
    kind = node[0]
    if kind == "leaf":
        return lambda obj: [obj]
    children = node[2]
    n = len(children)
    if kind == "dict":
        keys = node[1]
        if all(c[0] == "leaf" for c in children):
            get = itemgetter(*keys) if n > 1 else (lambda obj: (obj[keys[0]],))

            def flat_dict(obj):
                if not isinstance(obj, dict) or len(obj) != n:
                    raise _Mismatch
                return get(obj)  # a tuple, in one C call
            return flat_dict
        subs = [(k, _compile(c)) for k, c in zip(keys, children)]

        def nested_dict(obj):
            if not isinstance(obj, dict) or len(obj) != n:
                raise _Mismatch
            out = []
            for k, f in subs:
                out += f(obj[k])
            return out
        return nested_dict
    if all(c[0] == "leaf" for c in children):
        def flat_seq(obj):
            if not isinstance(obj, (tuple, list)) or len(obj) != n:
                raise _Mismatch
            return list(obj)
        return flat_seq
    fs = [_compile(c) for c in children]

    def nested_seq(obj):
        if not isinstance(obj, (tuple, list)) or len(obj) != n:
            raise _Mismatch
        out = []
        for f, v in zip(fs, obj):
            out += f(v)
        return out
    return nested_seq


def flattener(spec: Spec, tree: Node | None = None):
    """flatten(obj, kind, index) -> leaves, raising SpecError with the field path.
    `tree`: the samples' tree when it differs from the batch's (padding's lengths)."""
    tree = spec.tree if tree is None else tree
    fast = _compile(tree)

    def flatten(obj: Any, kind: str, index: int | None) -> list:
        try:
            return fast(obj)
        except (_Mismatch, KeyError, TypeError):
            raise _structure_error(obj, tree, (), _where(kind, index)) from None
    return flatten


def samples_flattener(spec: Spec, tree: Node | None = None):
    """flatten_all(samples, indices) -> the leaves of each sample (sequences), raising
    SpecError naming the first sample whose structure differs and its field path.
    `tree`: as for `flattener`."""
    fast, one = _compile(spec.tree if tree is None else tree), flattener(spec, tree)

    def flatten_all(samples: list, indices: list[int]) -> list:
        try:
            return list(map(fast, samples))
        except (_Mismatch, KeyError, TypeError):
            for obj, index in zip(samples, indices):
                one(obj, "sample", index)
            raise internal("a batch's structure check failed but no sample's did") from None
    return flatten_all


def check_sample_leaf(x: Any, leaf: Leaf, index: int | None) -> Any:
    """Return x as one row of `leaf` (converted when it implements numpy's array
    protocols), or raise SpecError."""
    where, here = f"sample {index}", leaf.path or "(root)"
    if type(x) in (str, bytes, bytearray):
        x = np.str_(x) if type(x) is str else np.bytes_(bytes(x))
    if not isinstance(x, np.ndarray | np.generic) and type(x) not in _PY_SCALARS:
        if not _convertible(x):
            raise _unsupported(x, where, here, _leaf_expect(leaf) + " like the first sample")
        x = _convert(x, where, here)
    if isinstance(x, np.ndarray | np.generic):
        if x.dtype == leaf.dtype and x.shape == leaf.shape:
            return x
        if leaf.dtype.kind in _TEXT_KINDS and x.dtype.kind == leaf.dtype.kind and x.shape == leaf.shape:
            if _text_fits(x, leaf):
                return x
            raise text_too_long(where, leaf, text_width(x.dtype))
        if x.dtype.kind not in _NUMERIC_KINDS + _TEXT_KINDS or (
                (x.dtype.kind in _TEXT_KINDS) != (leaf.dtype.kind in _TEXT_KINDS)):
            got = f"dtype {x.dtype}"
        elif x.shape != leaf.shape:
            got = f"shape {tuple(x.shape)}"
        else:
            got = f"dtype {x.dtype}"
    else:
        if leaf.pytype is type(x) and leaf.shape == ():
            return x
        got = f"a Python {type(x).__name__}"
    if got.startswith("shape") and isinstance(x, np.ndarray) and x.ndim == len(leaf.shape):
        # Ragged: the same field, another size.  Padding exists for exactly that, and a
        # list of samples has no __getitem__ to pad in.
        remedy = (f"Samples whose size varies are padded into fixed slots by the Loader: pass "
                  f"`padded_shapes` with the largest size this field can have (e.g. "
                  f"{_padded_example(leaf, x)}, or larger; `with_lengths=True` for the true sizes); "
                  "or make the samples one shape first (pad or crop them in `__getitem__`, or in "
                  "the list or arrays you give the Loader).")
    else:
        remedy = ("Every sample must have the same shape and dtype per field: convert the samples "
                  "(in `__getitem__`, or in the list or arrays you give the Loader).")
    raise SpecError(f"{where}, field {here}: got {got}, expected {_leaf_expect(leaf)} like the "
                    f"first sample. {remedy}")


def _padded_example(leaf: Leaf, x: np.ndarray) -> str:
    """`padded_shapes` for one varying leaf, as the user would write it (see _batch/pad.py)."""
    big = tuple(max(a, b) for a, b in zip(leaf.shape, x.shape))
    shape = repr(big)
    path = leaf.path
    if path.startswith("['") and path.endswith("']") and path.count("[") == 1:
        return "`padded_shapes={" + repr(path[2:-2]) + ": " + shape + "}`"
    if path.startswith("[") and path.endswith("]") and path[1:-1].isdigit() and path.count("[") == 1:
        return f"a tuple with `{shape}` at position {path[1:-1]} and None for the fields kept as they are"
    if path == "":
        return f"`padded_shapes={shape}`"
    return f"a structure like the sample's with `{shape}` at {path}"


def _leaf_expect(leaf: Leaf) -> str:
    if leaf.pytype is not None:
        return f"a Python {leaf.pytype.__name__} ({leaf.dtype})"
    return f"dtype {leaf.dtype} with shape {leaf.shape}"


def check_batch_leaves(leaves: list, spec: Spec, index: int, padded: tuple[bool, ...] = ()) -> int:
    """Check a whole batch from a batch-level source, converting in place the leaves
    that implement numpy's array protocols; return its length (rows).  Leaves marked
    in `padded` only need the right dtype and number of dimensions (the caller checks
    that they fit)."""
    rows = None
    for i, (x, leaf) in enumerate(zip(leaves, spec.leaves)):
        where = f"batch {index}, field {leaf.path or '(root)'}"
        if not isinstance(x, np.ndarray) and _convertible(x):
            x = leaves[i] = _convert(x, f"batch {index}", leaf.path or "(root)")
        if not isinstance(x, np.ndarray):
            if type(x) in _PY_SCALARS or isinstance(x, np.generic):
                raise SpecError(f"{where}: got a scalar, expected an array with a leading batch axis")
            raise _unsupported(x, f"batch {index}", leaf.path or "(root)", "a numpy array")
        if (leaf.dtype.kind in _TEXT_KINDS and x.dtype.kind == leaf.dtype.kind
                and text_width(x.dtype) > text_width(leaf.dtype)):
            raise text_too_long(f"batch {index}", leaf, text_width(x.dtype))
        if (x.dtype != leaf.dtype and not (leaf.dtype.kind in _TEXT_KINDS and _text_fits(x, leaf))) or x.ndim == 0 or (
                x.ndim != len(leaf.shape) + 1 if i < len(padded) and padded[i] else tuple(x.shape[1:]) != leaf.shape):
            raise SpecError(
                f"{where}: got dtype {x.dtype} shape {tuple(x.shape)}, expected dtype {leaf.dtype} "
                f"shape (n, {', '.join(map(str, leaf.shape))}) like batch 0"
                if leaf.shape else
                f"{where}: got dtype {x.dtype} shape {tuple(x.shape)}, expected dtype {leaf.dtype} shape (n,) like batch 0"
            )
        n = x.shape[0]
        if rows is None:
            rows = n
        elif n != rows:
            raise SpecError(f"{where}: has {n} rows while earlier fields have {rows}; every field of a batch needs the same length")
    assert rows is not None
    if rows > spec.rows:
        raise SpecError(
            f"batch {index}: has {rows} rows, more than the {spec.rows} a ring slot holds "
            "(slots are sized from batch 0). Make batch 0 the largest, or pass "
            "`max_batch_rows` to the Loader."
        )
    return rows


def unflatten(node: Node, leaves: list) -> Any:
    kind = node[0]
    if kind == "leaf":
        return leaves[node[1]]
    if kind == "none":  # a field the batch leaves out (padding's lengths of an unpadded leaf)
        return None
    if kind == "dict":
        return {k: unflatten(c, leaves) for k, c in zip(node[1], node[2])}
    cls = node[1]
    items = [unflatten(c, leaves) for c in node[2]]
    if cls is list:
        return items
    if cls is tuple:
        return tuple(items)
    return cls(*items)  # namedtuple


def with_rows(spec: Spec, rows: int) -> Spec:
    """The same spec with room for `rows` rows per slot (for `max_batch_rows`)."""
    return _lay_out(spec.tree, list(spec.leaves), rows, spec.batch_level)


def relayout(spec: Spec, tree: Node, protos: list[Leaf]) -> Spec:
    """A spec of the same rows whose batches have `tree` and leaves `protos` (their
    offsets recomputed): for padding, which changes leaf shapes and adds leaves."""
    return _lay_out(tree, protos, spec.rows, spec.batch_level)
