"""Ready-made sources for `shmfeed.Loader`.

    Arrays(data)                        rows of an array / memmap, or of a dict / tuple / list of them
    Windows(tokens, length, stride)     fixed-length windows over a 1-D token array or memmap
    ImageFolder(root, size=(H, W))      the root/<class>/<image> layout, decoded with Pillow
                                        (`pip install 'shmfeed[images]'`)
    Stream(make, num_shards)            a stream read in shards by several workers, the same
                                        for any `num_workers`
    Parquet(paths, columns=...)         rows of Parquet files, by row (`shmfeed[parquet]`)
    Arrow(table, columns=...)           rows of a pyarrow Table or a Hugging Face Dataset
    ArrayRecord(paths, decode=fn)       records of ArrayRecord files (`shmfeed[arrayrecord]`)
    TarShards(paths, decode=fn)         WebDataset-style .tar shards, a `Stream` of one shard a file
    ObjectCache(dir, max_bytes)         s3:// (any fsspec URL) files for the three above, through
                                        a bounded local cache (`shmfeed[s3]`)
    Packed(docs, length)                variable-length token sequences packed into rows of
                                        `length` tokens, with segment ids and positions
    Mix(sources, weights)               several sources in fixed proportions
    Sampled(source, weights)            weighted draws with replacement

`Packed`, `Mix` and `Sampled` (shmfeed/sources/_pipelines.py) read the Loader's seed and epoch
from the sample being built: use them with the Loader's `shuffle=False` (they order
their items themselves) and any `num_workers`; `state_dict()` resumes them exactly.

A Loader fills batches from `Arrays` and `Windows` by index, straight into its ring
slots (numpy's `take`, in C with the GIL released), with no Python per sample; from
`Parquet` and `Arrow` by column, from the row groups it decoded.
`Loader(x)` with an array, a dict of arrays or a tuple `(X, y)` wraps it in `Arrays` by
itself.
"""

from .._errors import ImageDecodeError
from ._arrayrecord import ArrayRecord
from ._arrays import Arrays, Windows
from ._images import ImageFolder
from ._objstore import ObjectCache
from ._parquet import Arrow, Parquet
from ._pipelines import Mix, Packed, Sampled
from ._shards import Stream
from ._sourcefiles import SourceFileError
from ._stream import StreamEndedError
from ._tarshards import TarShards

__all__ = ["ArrayRecord", "Arrays", "Arrow", "ImageDecodeError", "ImageFolder", "Mix", "ObjectCache", "Packed",
           "Parquet", "Sampled", "SourceFileError", "Stream", "StreamEndedError", "TarShards", "Windows"]
