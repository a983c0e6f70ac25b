"""Ready-made sources for `shmfeed.Loader`.

    Arrays(data)                        rows of an array / memmap, or of a dict / tuple / list of them
    Windows(tokens, length, stride)     fixed-length windows over a 1-D token array or memmap
    ImageFolder(root, size=(H, W))      the root/<class>/<image> layout, decoded with Pillow
                                        (`pip install 'shmfeed[images]'`)
    Stream(make, num_shards)            a stream read in shards by several workers, the same
                                        for any `num_workers`
    Packed(docs, length)                variable-length token sequences packed into rows of
                                        `length` tokens, with segment ids and positions
    Mix(sources, weights)               several sources in fixed proportions
    Sampled(source, weights)            weighted draws with replacement

`Packed`, `Mix` and `Sampled` (shmfeed/_pipelines.py) read the Loader's seed and epoch
from the sample being built: use them with the Loader's `shuffle=False` (they order
their items themselves) and any `num_workers`; `state_dict()` resumes them exactly.

A Loader fills batches from `Arrays` and `Windows` by index, straight into its ring
slots (numpy's `take`, in C with the GIL released), with no Python per sample.
`Loader(x)` with an array, a dict of arrays or a tuple `(X, y)` wraps it in `Arrays` by
itself.
"""

from ._arrays import Arrays, Windows
from ._errors import ImageDecodeError
from ._images import ImageFolder
from ._pipelines import Mix, Packed, Sampled
from ._shards import Stream
from ._stream import StreamEndedError

__all__ = ["Arrays", "ImageDecodeError", "ImageFolder", "Mix", "Packed", "Sampled", "Stream", "StreamEndedError",
           "Windows"]
