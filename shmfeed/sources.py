"""Ready-made sources for data that already is arrays.

    Arrays(data)                        rows of an array / memmap, or of a dict / tuple / list of them
    Windows(tokens, length, stride)     fixed-length windows over a 1-D token array or memmap

A Loader fills batches from these by index, straight into its ring slots (numpy's
`take`, in C with the GIL released), with no Python per sample.  `Loader(x)` with an
array, a dict of arrays or a tuple `(X, y)` wraps it in `Arrays` by itself.
"""

from ._arrays import Arrays, Windows

__all__ = ["Arrays", "Windows"]
