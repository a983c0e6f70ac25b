"""`shmfeed bench`: measure shmfeed against other ways of feeding a training loop.

Private; `shmfeed/_cli/main.py` is its only user.  One concept per module:

- `workloads`: the synthetic data (generated deterministically into a cache
  directory and reused) and the datasets every loader reads it through;
- `loaders/`: one adapter per loader (shmfeed itself and each peer), all with the
  same small interface, so that each is driven by the same loop;
- `child`: the measuring loop, run in a fresh interpreter per (workload, loader,
  repeat) so that one loader's imports, threads and leftovers never weigh on the next;
- `runner`: the parent side: data preparation, the memcpy bound, starting the
  children, sampling the memory of their process trees, progress on stderr;
- `report`: medians, the table, the JSON document and the plot.
"""

from .runner import BenchOptions, SetupError, run_bench

__all__ = ["BenchOptions", "SetupError", "run_bench"]
