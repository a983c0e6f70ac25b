"""Keras 3 `keras.utils.PyDataset(workers=N, use_multiprocessing=True)`, iterated the
way `Model.fit` iterates it (its `PyDatasetAdapter`): a `multiprocessing.Pool` of
forked workers, each returning a whole pickled batch, at most `max_queue_size` (10,
Keras's default) batches ahead; a new pool every epoch, as in `fit`.

Keras needs a backend only to be imported; the parent runs this child with
`KERAS_BACKEND=numpy` unless the environment chose one.
"""

from __future__ import annotations

import random
from typing import Any

import keras
from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter

from .. import workloads
from . import Job


class _Batches(keras.utils.PyDataset):
    """Batch b of the source: samples `order[b*bs : (b+1)*bs]` stacked, or `source[b]`
    for a batch-level source.  Keras shuffles the order of batches, not of samples."""

    def __init__(self, source: Any, job: Job):
        super().__init__(workers=job.workers, use_multiprocessing=True)
        self.source = source
        self.batch_size = job.batch_size
        self.batch_level = isinstance(source, workloads.BatchSource)
        self.order = None if self.batch_level else workloads.epoch_order(len(source), job.shuffle, job.seed, 0)

    def __len__(self) -> int:
        if self.batch_level:
            return len(self.source)
        return -(-len(self.source) // self.batch_size)

    def __getitem__(self, b: int) -> Any:
        if self.batch_level:
            return self.source[b]
        bs = self.batch_size
        assert self.order is not None  # (per-sample sources have one)
        return workloads.collate([self.source[i] for i in self.order[b * bs : (b + 1) * bs]])


class Adapter:
    def __init__(self, source: Any, job: Job):
        random.seed(job.seed)  # Keras shuffles batches with the `random` module
        self.adapter = PyDatasetAdapter(_Batches(source, job), shuffle=job.shuffle)

    def epoch(self, epoch: int):
        if epoch:
            self.adapter.on_epoch_end()
        self.adapter.on_epoch_begin()
        return self.adapter.get_numpy_iterator()

    def stats(self) -> None:
        return None

    def close(self) -> None:
        self.adapter.on_epoch_end()  # stops the enqueuer: its pool is closed and joined
