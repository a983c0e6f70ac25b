"""`torch.utils.data.DataLoader(num_workers=N, persistent_workers=True)` with its
default collation (numpy samples become torch tensors, stacked in the worker and
sent to the training process through shared memory).  Everything else is left at
torch's defaults (`prefetch_factor=2`, no pinning: there is no GPU to pin for).

For the stream workload the dataset is an `IterableDataset` over the shard files that
deals them out to the workers with `get_worker_info()` (torch's recipe: worker w of W
reads files w, w + W, ...), so no two workers repeat each other; each worker batches
its own files' rows, one after the other."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .. import workloads
from . import Job


def _quiet_worker(_worker_id: int) -> None:
    # default_collate wraps the read-only memory-mapped samples with torch.as_tensor,
    # which warns once per worker that the tensor is not writable; the batch it
    # stacks is a fresh, writable tensor, so the warning says nothing about this run.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable",
                            category=UserWarning)


class _ShardStream(IterableDataset):
    def __init__(self, files: workloads.ShardFiles):
        self.files = files

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        n = len(self.files.paths)
        for s in range(worker, n, workers):
            yield from self.files(s, n)


class Adapter:
    def __init__(self, source: Any, job: Job):
        batch_level = isinstance(source, workloads.BatchSource)
        stream = isinstance(source, workloads.ShardFiles)
        shuffle = job.shuffle and not stream  # an IterableDataset is not reordered
        self.loader: Any = DataLoader(
            _ShardStream(source) if stream else source,
            batch_size=None if batch_level else job.batch_size,
            shuffle=shuffle,
            generator=torch.Generator().manual_seed(job.seed) if shuffle else None,
            num_workers=int(job.workers),  # "auto" is shmfeed's only: runner._workers_of
            persistent_workers=True,
            worker_init_fn=_quiet_worker,
        )

    def epoch(self, epoch: int):
        return iter(self.loader)

    def stats(self) -> None:
        return None

    def close(self) -> None:
        it = getattr(self.loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.loader = None
