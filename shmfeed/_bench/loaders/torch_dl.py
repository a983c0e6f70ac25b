"""`torch.utils.data.DataLoader(num_workers=N, persistent_workers=True)` with its
default collation (numpy samples become torch tensors, stacked in the worker and
sent to the training process through shared memory).  Everything else is left at
torch's defaults (`prefetch_factor=2`, no pinning: there is no GPU to pin for)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch.utils.data import DataLoader

from .. import workloads
from . import Job


def _quiet_worker(_worker_id: int) -> None:
    # default_collate wraps the read-only memory-mapped samples with torch.as_tensor,
    # which warns once per worker that the tensor is not writable; the batch it
    # stacks is a fresh, writable tensor, so the warning says nothing about this run.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable",
                            category=UserWarning)


class Adapter:
    def __init__(self, source: Any, job: Job):
        batch_level = isinstance(source, workloads.BatchSource)
        self.loader = DataLoader(
            source,
            batch_size=None if batch_level else job.batch_size,
            shuffle=job.shuffle,
            generator=torch.Generator().manual_seed(job.seed) if job.shuffle else None,
            num_workers=job.workers,
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
