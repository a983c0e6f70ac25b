"""The references to batches that JAX holds and lets go of by itself, seen from the
core without importing jax (it is looked up in `sys.modules`, never imported here).

On CPU, XLA aliases a 64-byte-aligned numpy argument of a jitted call (or of
`jax.device_put`) whose dtype it keeps, instead of copying it: the computation reads
the ring slot in place, and JAX holds the numpy object (so the slot) until the
computation is done with it.  Then it does not drop the reference at once but hands
it to its collector of deferred references (jaxlib's PythonRefManager), which lets
go at a later JAX call, or at any Python garbage collection (`import jax` adds that
collector to `gc.callbacks`).  On a GPU the host buffer of a transfer is held the
same way until the transfer is done.  (jax 0.10.2; tests/test_jax.py pins all of it.)

So a training loop that hands the views of the ring straight to an asynchronously
dispatched step has its slots held by the steps still queued, and by finished steps
until the next collection, which nothing triggers while the loop waits for a slot.

Owns: `collect()`, which triggers that collection, and `computing()`, the JAX arrays
not computed yet: the work in flight whose arguments may still hold slots.
"""

from __future__ import annotations

import gc
import sys
from typing import Any


def collect() -> None:
    """Let JAX drop the arguments of the computations that are done: a collection of
    the youngest generation (tens of microseconds) runs the callback JAX registered.
    Without jax, it only collects young reference cycles."""
    gc.collect(0)


def computing() -> list[Any]:
    """The live JAX arrays (of every backend started) not computed yet; [] when jax
    is not imported or its backends never started (nothing of it can hold a slot)."""
    if "jax" not in sys.modules:
        return []
    xla_bridge = sys.modules.get("jax._src.xla_bridge")
    backends = getattr(xla_bridge, "_backends", None)
    if not backends:
        return []
    pending: list = []
    for backend in list(backends.values()):
        try:
            arrays = backend.live_arrays()
        except Exception:  # a backend that cannot list them holds nothing we can wait for
            continue
        pending.extend(a for a in arrays if not ready(a))
    return pending


def ready(array: Any) -> bool:
    """Whether the computation of `array` is done (an array deleted meanwhile is)."""
    try:
        return bool(array.is_ready())
    except Exception:
        return True


def loaded() -> bool:
    return "jax" in sys.modules
