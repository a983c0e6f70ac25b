"""Datasets shared by the tests.  Module level, so that they pickle (a loader created
after JAX has started sends its source to a fresh interpreter)."""

from __future__ import annotations

import random
from typing import NamedTuple

import numpy as np

import shmfeed


class Counting:
    """Sample i is {'x': int32[3] filled with i, 'y': i}."""

    def __init__(self, n: int, shape=(3,)):
        self.n = n
        self.shape = shape

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"x": np.full(self.shape, i, np.int32), "y": i}


class Augmenting:
    """Random augmentation through shmfeed.rng() and through the global RNGs, the way
    tutorial code does it."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        r = shmfeed.rng()
        noise = r.normal(size=(4,)).astype(np.float32)
        flip = bool(r.integers(2))
        return (
            np.arange(4, dtype=np.float32)[::-1 if flip else 1] + noise,
            np.float64(np.random.rand()),  # legacy global RNG
            random.random(),
            np.int16(i),
        )


class DataGenerator:
    """The Keras tutorial `Sequence` (batch-level, reshuffles in on_epoch_end with
    np.random), minus the keras import: keras is optional here."""

    def __init__(self, list_IDs, labels, batch_size=4, dim=(2, 3), n_classes=5, shuffle=True):
        self.dim = dim
        self.batch_size = batch_size
        self.labels = labels
        self.list_IDs = list_IDs
        self.n_classes = n_classes
        self.shuffle = shuffle
        self.on_epoch_end()

    def __len__(self):
        return int(np.floor(len(self.list_IDs) / self.batch_size))

    def __getitem__(self, index):
        indexes = self.indexes[index * self.batch_size : (index + 1) * self.batch_size]
        list_IDs_temp = [self.list_IDs[k] for k in indexes]
        X, y = self.__data_generation(list_IDs_temp)
        return X, y

    def on_epoch_end(self):
        self.indexes = np.arange(len(self.list_IDs))
        if self.shuffle:
            np.random.shuffle(self.indexes)

    def __data_generation(self, list_IDs_temp):
        X = np.empty((self.batch_size, *self.dim))
        y = np.empty((self.batch_size), dtype=int)
        for i, ID in enumerate(list_IDs_temp):
            X[i,] = np.full(self.dim, ID)
            y[i] = self.labels[ID]
        return X, np.eye(self.n_classes, dtype="float32")[y]


class Labelled:
    """Per-sample: sample i is (float32[6] of i/10, one-hot of i % n_classes)."""

    def __init__(self, n: int, n_classes: int = 5):
        self.n, self.n_classes = n, n_classes

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return np.full(6, i / 10, np.float32), np.eye(self.n_classes, dtype=np.float32)[i % self.n_classes]


class Slices:
    """Batch-level: batch b is rows [32b, 32b+32) of an in-memory array."""

    def __init__(self, n_batches: int, rows: int = 32, width: int = 512):
        self.data = np.arange(n_batches * rows * width, dtype=np.int32).reshape(n_batches * rows, width)
        self.rows = rows

    def __len__(self):
        return len(self.data) // self.rows

    def __getitem__(self, b):
        return self.data[b * self.rows : (b + 1) * self.rows]


class Bad:
    """Sample `bad_index` returns `bad_value` in place of field 'x'."""

    def __init__(self, n, bad_index, bad_value, shape=(2, 2), dtype=np.float32):
        self.n, self.bad_index, self.bad_value = n, bad_index, bad_value
        self.shape, self.dtype = shape, dtype

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i == self.bad_index:
            return {"x": self.bad_value, "y": i}
        return {"x": np.zeros(self.shape, self.dtype), "y": i}


class Pair(NamedTuple):
    image: np.ndarray
    label: int


class Pairs:
    """Samples are a namedtuple defined in this module."""

    def __len__(self):
        return 10

    def __getitem__(self, i):
        return Pair(np.full((2,), i, np.uint8), i)


class Stamped:
    """Sample i: {'x': float32 values unique to (i, epoch), 'id': int32 i}, so that any
    batch that arrives late, twice or overwritten shows in its values."""

    def __init__(self, n: int, shape: tuple = (16, 8)):
        self.n, self.shape = n, shape

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        stamp = float(i * 1000 + int(shmfeed.rng().integers(1000)))
        return {"x": np.full(self.shape, stamp, np.float32), "id": np.int32(i)}


def token_length(i: int, longest: int = 40) -> int:
    """A long-tailed length in 1..longest, a pure function of the index."""
    return 1 + (i * 7919 % 97) ** 3 * (longest - 1) // 96**3


class Tokens:
    """Sample i: {'tokens': int32[token_length(i)] counting up from i, 'label': i};
    with `oversize`, sample `oversize` is `extra` tokens longer than `longest`."""

    def __init__(self, n: int, longest: int = 40, oversize: int | None = None, extra: int = 3):
        self.n = n
        self.longest = longest
        self.oversize = oversize
        self.extra = extra

    def __len__(self):
        return self.n

    def length(self, i: int) -> int:
        return token_length(i, self.longest)

    def __getitem__(self, i):
        n = self.length(i) + (self.extra + self.longest if i == self.oversize else 0)
        return {"tokens": np.arange(i, i + n, dtype=np.int32), "label": i}


class TokenBatches:
    """Batch-level: batch b is int16[3 + b % 2, 2 + b, 2] filled with b, and labels."""

    def __len__(self):
        return 6

    def __getitem__(self, b):
        rows = 3 + b % 2
        return np.full((rows, 2 + b, 2), b, np.int16), np.arange(rows, dtype=np.int64) + 10 * b


class ShiftingTokens(Tokens):
    """Tokens whose values move by `shift`, which on_epoch_end raises by 1000 (an epoch
    hook the workers must see)."""

    def __init__(self, n: int):
        super().__init__(n)
        self.shift = 0

    def on_epoch_end(self):
        self.shift += 1000

    def __getitem__(self, i):
        sample = super().__getitem__(i)
        sample["tokens"] += self.shift
        return sample


def token_records(s: int, num_shards: int):
    """A sharded stream of Tokens: shard s holds samples s, s + num_shards, ... of Tokens(40)."""
    src = Tokens(40)
    for i in range(s, len(src), num_shards):
        yield src[i]


def token_generator():
    """A generator of Tokens samples, 0, 1, 2, ... (any number)."""
    src = Tokens(1 << 30)
    i = 0
    while True:
        yield src[i]
        i += 1


class SlowToUnpickle:
    """Sample i: int64[3] of i.  Unpickling it outside the process that made it (a
    spawned pool's supervisor) takes `delay_s`, like a big in-memory dataset."""

    def __init__(self, delay_s: float, n: int = 16):
        import os

        self.delay_s, self.n, self.maker = delay_s, n, os.getpid()

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return np.full(3, i, np.int64)

    def __setstate__(self, state):
        import os
        import time

        self.__dict__.update(state)
        if os.getpid() != self.maker:
            time.sleep(self.delay_s)
