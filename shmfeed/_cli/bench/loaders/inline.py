"""In-process assembly, the reference: the training process reads its samples and
stacks them itself (`workloads.collate`), with no worker at all.  For the
batch-level workload it returns `source[b]` as is; for the array workloads, the rows
of each batch's indices read at once (`workloads.in_process_batch`); for the stream
workload, the shard files in shmfeed's round-robin order (`ShardFiles.round_robin`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import workloads
from . import Job


class Adapter:
    def __init__(self, source: Any, job: Job):
        self.source = source
        self.job = job
        self.batch_level = isinstance(source, workloads.BatchSource)
        self.workload = workloads.WORKLOADS[job.workload]
        self.data = np.load(job.data_path, mmap_mode="r") if self.workload.arrays else None

    def epoch(self, epoch: int):
        job, source = self.job, self.source
        if isinstance(source, workloads.ShardFiles):
            yield from source.round_robin(job.batch_size)
            return
        order = workloads.epoch_order(len(source), job.shuffle, job.seed, epoch)
        if self.batch_level:
            for b in order:
                yield source[b]
            return
        bs = job.batch_size
        if self.data is not None:
            for start in range(0, len(order) - bs + 1, bs):  # whole batches, as shmfeed's drop_last
                yield workloads.in_process_batch(self.workload, self.data, order[start : start + bs])
            return
        for start in range(0, len(order), bs):
            yield workloads.collate([source[i] for i in order[start : start + bs]])

    def stats(self) -> None:
        return None

    def close(self) -> None:
        pass
