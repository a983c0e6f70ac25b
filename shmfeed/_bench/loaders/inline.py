"""In-process assembly, the reference: the training process reads its samples and
stacks them itself (`workloads.collate`), with no worker at all.  For the
batch-level workload it returns `source[b]` as is."""

from __future__ import annotations

from typing import Any

from .. import workloads
from . import Job


class Adapter:
    def __init__(self, source: Any, job: Job):
        self.source = source
        self.job = job
        self.batch_level = isinstance(source, workloads.BatchSource)

    def epoch(self, epoch: int):
        job, source = self.job, self.source
        order = workloads.epoch_order(len(source), job.shuffle, job.seed, epoch)
        if self.batch_level:
            for b in order:
                yield source[b]
            return
        bs = job.batch_size
        for start in range(0, len(order), bs):
            yield workloads.collate([source[i] for i in order[start : start + bs]])

    def stats(self) -> None:
        return None

    def close(self) -> None:
        pass
