"""Helpers for comparing batches (pytrees of arrays) in tests."""

from __future__ import annotations

import json

import numpy as np


def copy_tree(batch):
    """A deep copy of a batch that owns its memory (releases nothing, pins nothing)."""
    if isinstance(batch, dict):
        return {k: copy_tree(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(copy_tree(v) for v in batch)
    return np.array(batch)


def check_resume_mid_epoch(make, before: int, after: int, keys: tuple[str, ...], stop_at: int = 6) -> None:
    """`make(num_workers)` gives a Loader: one with `before` workers stopped after batch
    `stop_at`, its state through JSON into one with `after` workers, must give the rest
    of that epoch and the next exactly as an uninterrupted loader (0 workers)."""
    with make(0) as ref:
        reference = [[copy_tree(b) for b in ref] for _ in range(2)]
    with make(before) as first:
        got = []
        for i, b in enumerate(first):
            got.append(copy_tree(b))
            if i == stop_at:
                state = json.loads(json.dumps(first.state_dict()))
                break
    with make(after) as second:
        second.load_state_dict(state)
        got += [copy_tree(b) for b in second]
        again = [copy_tree(b) for b in second]
    for a, b in zip(got + again, reference[0] + reference[1], strict=True):
        for k in keys:
            np.testing.assert_array_equal(a[k], b[k])
