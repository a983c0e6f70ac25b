"""`loader.stats()`: the numbers programs read and the summary people read."""

from __future__ import annotations

import time

import numpy as np
import pytest

import shmfeed
from shmfeed._engine.stats import INPUT_BOUND_FRACTION, KEEPS_UP_FRACTION
from shmfeed._sysinfo import most_useful_workers

SLOW_SAMPLE_S = 0.01


class Slow:
    """Samples that take SLOW_SAMPLE_S each: one worker cannot keep up with a loop
    that does nothing."""

    def __len__(self):
        return 24

    def __getitem__(self, i):
        time.sleep(SLOW_SAMPLE_S)
        return np.full((4,), i, np.float32)


def test_summary_of_an_input_bound_loop_says_so_with_its_numbers():
    with shmfeed.Loader(Slow(), batch_size=4, num_workers=1) as loader:
        for _ in loader:
            pass
        s = loader.stats()
        pid = loader.worker_pids[0]
    d = s.as_dict()
    assert d["input_wait_fraction"] == s.input_wait_fraction > INPUT_BOUND_FRACTION
    assert d["batches_per_s"] == pytest.approx(6 / s.elapsed_s)
    text = str(s)
    assert text.startswith("shmfeed loader: 6 batches (384 B) in ")
    assert f"input wait {s.input_wait_fraction:.2f}" in text and "input-bound" in text
    if s.num_workers < most_useful_workers(s.cpus):
        assert "more workers may help (`num_workers=1`" in text
    else:  # e.g. 2 CPUs: the worker and the loop use them
        assert "more workers would not help" in text
    busy_ms = s.workers[0]["busy_s"] / 6 * 1e3
    assert busy_ms >= 4 * SLOW_SAMPLE_S * 1e3 * 0.9
    assert f"slowest: worker 0 (pid {pid}), {busy_ms:.1f} ms per batch over 6 batches" in text
    assert "restarts: 0" in text
    assert f"ring: {s.n_slots} slots x " in text


@pytest.mark.parametrize("wait_s, verdict", [
    (9.0, "input-bound"),
    (INPUT_BOUND_FRACTION * 10 - 0.5, "partly input-bound"),
    (KEEPS_UP_FRACTION * 10 - 0.5, "the loader keeps up"),
])
def test_input_wait_verdict(wait_s, verdict):
    s = shmfeed.Stats(batches=100, wait_s=wait_s, elapsed_s=10.0)
    assert s.input_wait_verdict().startswith(verdict)
    assert verdict in str(s)


def test_summary_before_any_batch():
    s = shmfeed.Stats(n_slots=4, slot_bytes=1024, ring_bytes=8192)
    text = str(s)
    assert "0 batches" in text and "no batch taken yet" in text and "slowest" not in text
    assert "ring: 4 slots x 1.0 KiB = 8.0 KiB" in text


def test_summary_of_batches_built_in_the_training_process():
    with shmfeed.Loader(Slow(), batch_size=4, num_workers=0) as loader:
        for _ in loader:
            pass
        text = str(loader.stats())
    assert "built in the training process (`num_workers=0`): " in text and "slowest" not in text


def test_bytes_are_those_of_the_arrays_delivered_with_and_without_buckets():
    """`stats().bytes` counts the arrays handed to the loop (a short last batch, a
    bucket's narrower shape), not whole slots."""
    from _sources import Counting, Tokens

    tokens = Tokens(50)
    bucketing = dict(padded_shapes={"tokens": (None,)}, bucket_boundaries=[4, 8, 16, 40],
                     bucket_lengths=[tokens.length(i) for i in range(len(tokens))])
    for source, opts in ((Counting(30, shape=(5,)), {}), (tokens, bucketing)):
        with shmfeed.Loader(source, batch_size=8, num_workers=1, **opts) as loader:
            delivered = 0
            for batch in loader:
                delivered += sum(np.asarray(v).nbytes for v in batch.values())
            assert loader.stats().bytes == delivered
