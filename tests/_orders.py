"""The loader's order written out for tests: a whole epoch as one array."""

from __future__ import annotations

import numpy as np

from shmfeed._order.order import Order


def epoch_items(order: Order, epoch: int) -> np.ndarray:
    """This host's source indices of `epoch`, batch after batch (per-sample sources)."""
    return np.concatenate([order.batch_items(epoch, b) for b in range(order.n_batches)])
