"""shmfeed itself: `shmfeed.Loader` with the job's workers, slots and shuffle; for the
stream workload, over `shmfeed.sources.Stream(files, num_shards=NUM_SHARDS)` (a Stream
is not reordered: `shuffle` does not apply to it).

Batches are numpy views into the ring; the measuring loop drops each one before
taking the next, so a slot returns to the ring as soon as it has been read.
"""

from __future__ import annotations

from typing import Any

import psutil

import shmfeed
from shmfeed.sources import Stream

from .. import workloads
from . import Job


class Adapter:
    def __init__(self, source: Any, job: Job):
        batch_level = isinstance(source, workloads.BatchSource)
        stream = isinstance(source, workloads.ShardFiles)
        self.loader = shmfeed.Loader(
            Stream(source, num_shards=len(source.paths)) if stream else source,
            batch_size=None if batch_level else job.batch_size,
            num_workers=job.workers,
            shuffle=job.shuffle and not stream,
            seed=job.seed,
            num_slots=job.slots,
            worker_nice=job.worker_nice,
            drop_last=bool(workloads.WORKLOADS[job.workload].arrays),  # as in-process: whole batches
        )

    def epoch(self, epoch: int):
        self.loader.set_epoch(epoch)
        return iter(self.loader)

    def stats(self) -> dict:
        s = self.loader.stats().as_dict()
        s["repr"] = repr(self.loader)
        # How much nicer than this process its workers run, as read from the kernel.
        own = psutil.Process().nice()
        s["worker_nice"] = sorted({psutil.Process(pid).nice() - own for pid in self.loader.worker_pids})
        return s

    def close(self) -> None:
        self.loader.close()
