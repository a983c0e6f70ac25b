"""Writing the samples of a batch into a slot: the per-sample path's last step, after
`__getitem__` gave each sample and the spec's flattener its leaves.

A batch of small samples is written a leaf at a time (`write_samples`); one of large
samples a sample at a time, as each is made (`write_row`; see _batch/build.py for why).  Rows that are C-contiguous ndarrays (or memmaps) of
the leaf's exact format and shape (the usual case) are checked and copied in one C loop
(`_kernels.stack_rows`); otherwise the leaf's rows are checked together (types, dtypes
and shapes compared as sets) and copied with one numpy call, so a batch costs a few
Python calls per leaf rather than per sample.  A row that fails the quick
check gets the full check (`check_sample_leaf`), which converts what numpy converts in
one step (a torch tensor, a PIL image) or names the sample index, the field and what
was expected; nothing of the batch is published on an error.
"""

from __future__ import annotations

import functools
from operator import attrgetter

import numpy as np

from .._kernels import stack_rows as _stack_rows
from .spec import Leaf, Spec, check_sample_leaf, text_too_long, text_width

_dtype_of = attrgetter("dtype")
_shape_of = attrgetter("shape")


@functools.cache
def _buffer_format(dtype: np.dtype) -> str:
    """The struct format numpy's buffers of `dtype` carry (what stack_rows compares)."""
    return np.empty(0, dtype).data.format


def _arrays_ok(col: tuple, leaf: Leaf) -> bool:
    """Whether every row is a numpy array or scalar of the leaf's exact dtype and shape."""
    if not all(issubclass(t, (np.ndarray, np.generic)) for t in set(map(type, col))):
        return False
    return set(map(_dtype_of, col)) == {leaf.dtype} and set(map(_shape_of, col)) == {leaf.shape}


def write_leaf(view: np.ndarray, col: tuple, leaf: Leaf, items: list[int], stream: bool = False) -> None:
    """Write rows `col` (source indices `items`) into `view`'s first rows; `stream`: with
    non-temporal stores (see csrc/kernels.h SHMF_STREAM_MIN_BYTES)."""
    n = len(col)
    if leaf.pytype is not None and set(map(type, col)) == {leaf.pytype}:
        if leaf.dtype.kind in "SU" and max(map(len, col)) > text_width(leaf.dtype):
            # numpy would cut the text to the slot's width without a word
            row = next(r for r, x in enumerate(col) if len(x) > text_width(leaf.dtype))
            raise text_too_long(f"sample {items[row]}", leaf, len(col[row]))
        view[:n] = col  # Python scalars: converted in one C call
        return
    if (leaf.shape and not leaf.dtype.hasobject
            and _stack_rows(view, col, np.ndarray, _buffer_format(leaf.dtype), leaf.shape, stream) < 0):
        return  # every row an ndarray of the leaf's exact layout: copied in one C loop
    if not _arrays_ok(col, leaf):
        # Raises, naming the sample, unless x fits as is or converts (a tensor, an image).
        col = tuple(check_sample_leaf(x, leaf, index) for x, index in zip(col, items))
    if leaf.shape:
        # Rows stacked along the leaf's first axis: one numpy call, a copy per row in C.
        target = view[:n].reshape((n * leaf.shape[0],) + leaf.shape[1:])
        # Text narrower than the slot's widens ("safe"); wider was refused above.
        np.concatenate(col, axis=0, out=target, casting="safe" if leaf.dtype.kind in "SU" else "no")
    else:
        view[:n] = col


def write_row(spec: Spec, views: list[np.ndarray], row: int, leaves: list, index: int,
              stream: bool) -> None:
    """Write one sample (its flattened `leaves`; `index` names it in an error) into row
    `row` of `views`: the path of large samples, written while they are still in cache."""
    for view, x, leaf in zip(views, leaves, spec.leaves):
        write_leaf(view[row : row + 1], (x,), leaf, [index], stream)


def write_samples(spec: Spec, views: list[np.ndarray], samples: list[list], items: list[int]) -> None:
    """Write `samples` (each the flattened leaves of source[items[row]]) into `views`."""
    if not samples:
        return
    for view, col, leaf in zip(views, zip(*samples), spec.leaves):
        write_leaf(view, col, leaf, items)
