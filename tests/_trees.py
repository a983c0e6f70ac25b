"""Helpers for comparing batches (pytrees of arrays) in tests."""

from __future__ import annotations

import numpy as np


def copy_tree(batch):
    """A deep copy of a batch that owns its memory (releases nothing, pins nothing)."""
    if isinstance(batch, dict):
        return {k: copy_tree(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(copy_tree(v) for v in batch)
    return np.array(batch)
