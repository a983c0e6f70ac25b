"""`multiprocessing.Pool.imap` with pickled batches: each worker assembles a whole
batch (`workloads.collate`) and the batch travels back pickled through a pipe.

The pool is forked once and kept across epochs.  `imap` alone would queue every
batch of the epoch as fast as the workers make them, so memory would grow without
bound whenever the training loop is the slower side; batches in flight are capped
at shmfeed's default ring size for the workload's batch (`default_num_slots`: `2 *
workers + 4`, more for small batches; or `--slots`), which is also what a careful user
of `Pool` writes.

Closing drains first: `Pool.terminate()` while a worker is writing a result larger
than the pipe's buffer (64 KiB; every batch here is) can deadlock, the result thread
having stopped reading while the worker holds the queue's write lock.  So the feeder
stops, the batches already asked for are received (at most `in_flight`), and only
then are the now idle workers terminated.
"""

from __future__ import annotations

import multiprocessing
import threading
from typing import Any

import numpy as np

from ...._config import default_num_slots
from .. import workloads
from . import Job

FEED_POLL_S = 0.05  # how often a blocked feeder checks that the pool is closing
DRAIN_TIMEOUT_S = 30.0  # closing waits this long for each batch still in flight

_source: Any = None  # the dataset, in each worker (inherited through fork)


def _init_worker(source: Any) -> None:
    global _source
    _source = source


def _build(item: Any) -> Any:
    if isinstance(item, int):  # batch-level source: a batch number
        return _source[item]
    return workloads.collate([_source[i] for i in item])


class Adapter:
    def __init__(self, source: Any, job: Job):
        self.source = source
        self.job = job
        self.batch_level = isinstance(source, workloads.BatchSource)
        assert isinstance(job.workers, int) and not isinstance(job.slots, str)  # "auto" is shmfeed's only
        self.in_flight = job.slots or default_num_slots(job.workers, self._batch_nbytes())
        self.closing = threading.Event()
        self.results: Any = None  # the running epoch's imap iterator
        ctx = multiprocessing.get_context("fork")
        self.pool = ctx.Pool(job.workers, initializer=_init_worker, initargs=(source,))

    def _batch_nbytes(self) -> int:
        """The size of one batch, from the first sample (or source batch)."""
        if self.batch_level:
            return int(np.asarray(self.source[0]).nbytes)
        first = workloads.collate([self.source[0]])
        return sum(int(v.nbytes) for v in first.values()) * self.job.batch_size

    def _items(self, epoch: int, credits: threading.Semaphore):
        """Task items for `imap`; runs in the pool's task-feeding thread, which it
        blocks (never forever) while `in_flight` batches are unconsumed."""
        job = self.job
        order = workloads.epoch_order(len(self.source), job.shuffle, job.seed, epoch)
        items: Any  # batch numbers, or arrays of sample indices
        if self.batch_level:
            items = (int(b) for b in order)
        else:
            items = (order[s : s + job.batch_size] for s in range(0, len(order), job.batch_size))
        for item in items:
            while not credits.acquire(timeout=FEED_POLL_S):
                if self.closing.is_set():
                    return
            if self.closing.is_set():
                return
            yield item

    def epoch(self, epoch: int):
        credits = threading.Semaphore(self.in_flight)
        self.results = self.pool.imap(_build, self._items(epoch, credits), chunksize=1)
        for batch in self.results:
            credits.release()
            yield batch

    def stats(self) -> None:
        return None

    def close(self) -> None:
        self.closing.set()
        while self.results is not None:
            try:
                self.results.next(timeout=DRAIN_TIMEOUT_S)
            except (StopIteration, multiprocessing.TimeoutError):
                break
            except Exception:  # a batch that failed: nothing left to wait for there
                continue
        self.pool.terminate()
        self.pool.join()
