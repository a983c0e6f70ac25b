"""Grain's `grain.python.DataLoader(worker_count=N)` with a `Batch` operation (none for
the batch-level workload, whose records are whole batches).

Grain's idiom is one iterator for the whole run (the sampler's `num_epochs`), with
worker processes started when the iterator is made; so the sampler repeats forever
and an "epoch" here is the next `len(source) / batch_size` batches of that stream.

Reading uses `ReadOptions(num_threads=0)`, what Grain's documentation recommends
for data already in memory (the data file is in the page cache): its default, 16
reading threads per worker with a 500-element buffer, is several times slower here.
"""

from __future__ import annotations

import itertools
from typing import Any

import grain.python as grain
from absl import flags

from .. import workloads
from . import Job


class Adapter:
    def __init__(self, source: Any, job: Job):
        if not flags.FLAGS.is_parsed():
            # Grain reads absl flags, which a program started without `absl.app.run`
            # has not parsed; their defaults are what we want.
            flags.FLAGS.mark_as_parsed()
        batch_level = isinstance(source, workloads.BatchSource)
        ops = [] if batch_level else [grain.Batch(batch_size=job.batch_size, drop_remainder=False)]
        sampler = grain.IndexSampler(
            num_records=len(source),
            shard_options=grain.NoSharding(),
            shuffle=job.shuffle,
            num_epochs=None,
            seed=job.seed,
        )
        self.loader = grain.DataLoader(data_source=source, sampler=sampler, operations=ops,
                                       worker_count=job.workers,
                                       read_options=grain.ReadOptions(num_threads=0))
        self.per_epoch = len(source) if batch_level else -(-len(source) // job.batch_size)
        self.iterator: Any = None

    def epoch(self, epoch: int):
        if self.iterator is None:
            self.iterator = iter(self.loader)
        return itertools.islice(self.iterator, self.per_epoch)

    def stats(self) -> None:
        return None

    def close(self) -> None:
        inner = getattr(self.iterator, "_iterator", None)
        if inner is not None and hasattr(inner, "close"):
            inner.close()
        self.iterator = None
