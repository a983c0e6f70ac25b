"""shmfeed: feed JAX/Flax training loops from worker processes through a ring of
shared-memory slots: zero copy, no pickling, deterministic order, fixed memory.

    loader = shmfeed.Loader(dataset, batch_size=64, num_workers=4, shuffle=True)
    for epoch in range(3):
        for batch in loader:          # numpy views into the ring
            ...

`shmfeed.rng()` inside `__getitem__` gives the random generator of the sample being
built, keyed by (seed, epoch, index).  `shmfeed.jax.prefetch_to_device` turns batches
into `jax.Array`s.
"""

import sys as _sys

if not _sys.platform.startswith("linux"):
    # memfd, futex waits, /proc and PR_SET_PDEATHSIG are Linux's; nothing else would work.
    raise ImportError(f"shmfeed runs on Linux only (this is {_sys.platform}): its shared-memory "
                      "ring uses memfd_create and futex waits. Use a Linux machine or container.")

# First: the C core, whose absence this import names with how to build it (any other
# module would fail on it less clearly: _kernels imports it too).
from ._engine import control as _control  # noqa: F401

# isort: split
from . import sources
from ._errors import (
    LoaderClosedError,
    RingFullError,
    RingMemoryError,
    ShmfeedError,
    SourcePickleError,
    SpecError,
    WorkerError,
)
from ._loader import Loader, Stats
from ._order.rng import build_sample, rng, rng_key
from ._processes.forkserver import start as _start_fork_server


def start_fork_server() -> bool:
    """Keep a copy of this process, taken now, to start worker pools from once JAX's
    backend (or CUDA) runs here and forking this process is no longer safe: a pool then
    starts in milliseconds instead of a fresh interpreter's seconds of imports.  Call it
    before the first JAX computation, after the imports your dataset needs (`import
    shmfeed.jax` and `import shmfeed.keras` call it for you).  Returns whether a fork
    server runs; where none can start (JAX already runs, not the main thread), logs why."""
    return _start_fork_server()


__all__ = [
    "Loader",
    "LoaderClosedError",
    "RingFullError",
    "RingMemoryError",
    "ShmfeedError",
    "SourcePickleError",
    "SpecError",
    "Stats",
    "WorkerError",
    "build_sample",
    "rng",
    "rng_key",
    "sources",
    "start_fork_server",
]
__version__ = "0.1.0"
