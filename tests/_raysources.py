"""Sources for tests/test_ray.py.  Shipped to the Ray actors by value (the actors do not
have tests/ on their path), and with faults that strike once per marker file, so that a
batch's second build (on a replacement actor) succeeds: "rebuilt once"."""

from __future__ import annotations

import os
import threading
import time

import numpy as np

import shmfeed


def first_time(marker: str) -> bool:
    """True for exactly one caller across every process of the machine."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


class Noisy:
    """Sample i: keyed noise from shmfeed.rng() and the global RNG, and i; with `fault`,
    the first build of sample `at` (per `marker`) kills its process ("die") or hangs
    ("stall"); `delay_s` per sample keeps requests in flight."""

    def __init__(self, n: int, fault: str | None = None, at: int = -1, marker: str = "",
                 delay_s: float = 0.0):
        self.n, self.fault, self.at, self.marker, self.delay_s = n, fault, at, marker, delay_s

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i == self.at and self.fault and first_time(self.marker):
            if self.fault == "die":
                os._exit(1)
            if self.fault == "stall":
                time.sleep(3600)
            if self.fault == "raise":
                raise KeyError(f"sample {i} is broken")
        if self.delay_s:
            time.sleep(self.delay_s)
        r = shmfeed.rng()
        return {"x": r.normal(size=(3, 2)).astype(np.float32), "g": np.random.rand(), "i": np.int64(i)}


class Locked(Noisy):
    """A source holding what cannot be pickled."""

    def __init__(self, n: int):
        super().__init__(n)
        self.guard = {"lock": threading.Lock()}


def ragged(i: int) -> dict:
    return {"tokens": np.arange(i, i + 1 + i % 7, dtype=np.int32), "label": i}



class Ragged:
    """Samples of varying length (padded by the loader)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return ragged(i)


def mixup(batch: dict) -> dict:
    """A batch transform drawing from the batch's keyed RNG."""
    r = shmfeed.rng()
    lam = np.float32(r.beta(0.4, 0.4))
    perm = r.permutation(len(batch["i"]))
    return {"x": lam * batch["x"] + (1 - lam) * batch["x"][perm], "i": batch["i"][perm]}


def ragged_length(i: int) -> int:
    return 1 + i % 7
