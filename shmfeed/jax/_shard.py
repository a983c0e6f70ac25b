"""Where each batch leaf goes: the target devices, and which rows of the host-local
batch each of them receives.

Owns: turning `sharding=` into a `Placement` per leaf shape (the global shape of the
array to build and, per addressable device, the slice of the *host-local* leaf it
gets), and `host_shard()` for splitting the dataset between hosts.

Invariants:
- Every process passes its own rows (its `shard_index` of the data); the global
  array is those host-local batches laid side by side along every dimension the
  sharding splits across processes, in the order of the sharding's device indices.
  That is what `jax.make_array_from_process_local_data` does, so every transfer
  (host copy, XLA, CuPy) builds the same `jax.Array` from the same batch.
- A dimension split into `k` parts must have a size divisible by `k`; otherwise
  nothing is uploaded and a SpecError names the leaf and the fix.
- A loader of `shard_count=k > 1` host shards feeds a sharding that spans several
  processes only if that sharding gives every process rows of the batch axis of its
  own (no row held by two processes, which would be fed different rows for it: JAX
  does not check) and spans exactly `k` processes (else global batches of another
  size than the loader's, samples lost or repeated).  Checked before the first batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import jax
import numpy as np
from jax.sharding import Sharding, SingleDeviceSharding

from .._errors import SpecError


def host_shard() -> tuple[int, int]:
    """`(process_index, process_count)` of this JAX process, to pass to the Loader as
    `shard_index`/`shard_count` so that each host loads its own disjoint part of
    every epoch.

    After `jax.distributed.initialize()` this reads the process index without
    starting JAX's backend, so a Loader created next can still fork its workers.
    Without it, it asks JAX (which starts the backend).
    """
    try:
        from jax._src import distributed

        state = distributed.global_state
        if state.client is not None and state.num_processes is not None:
            return int(state.process_id), int(state.num_processes)
    except (ImportError, AttributeError):  # a JAX without this private module
        pass
    return jax.process_index(), jax.process_count()


def default_device() -> jax.Device:
    """The device an uncommitted `jax.device_put(x)` would use."""
    d = cast(Any, jax.config).jax_default_device  # an option, not in jax.config's type
    if isinstance(d, jax.Device):
        return d
    if isinstance(d, str):
        return jax.local_devices(backend=d)[0]
    return jax.local_devices()[0]


@dataclass(frozen=True)
class Placement:
    """How one host-local leaf of shape `local_shape` becomes a `jax.Array`."""

    sharding: Sharding | None  # None: the default device, uncommitted
    local_shape: tuple[int, ...]
    global_shape: tuple[int, ...]
    # (device, index into the host-local leaf) for every addressable device
    pieces: tuple[tuple[jax.Device, tuple[slice, ...]], ...]


class Target:
    """The devices a feed uploads to, with a cache of placements per leaf shape."""

    def __init__(self, sharding: Any):
        if sharding is None:
            self.sharding: Sharding | None = None
            self.devices: tuple[jax.Device, ...] = (default_device(),)
        elif isinstance(sharding, jax.Device):
            self.sharding = SingleDeviceSharding(sharding)
            self.devices = (sharding,)
        elif isinstance(sharding, Sharding):
            self.sharding = sharding
            self.devices = tuple(sorted(sharding.addressable_devices, key=lambda d: d.id))
            if not self.devices:
                raise SpecError(
                    f"`sharding` {sharding} has no device addressable by this process "
                    f"(process {jax.process_index()}); build it over a mesh that includes "
                    "this process's devices")
        else:
            raise SpecError(
                "`sharding` must be None (default device), a jax.Device or a "
                f"jax.sharding.Sharding such as NamedSharding(mesh, P('data')); got "
                f"{type(sharding).__name__}")
        self.platforms = {d.platform for d in self.devices}
        self._plans: dict[tuple[int, ...], Placement] = {}

    def placement(self, local_shape: tuple[int, ...], path: Any) -> Placement:
        """`path`: the leaf's name for errors, a string or a jax key path."""
        plan = self._plans.get(local_shape)
        if plan is None:
            if not isinstance(path, str):
                path = jax.tree_util.keystr(path) or "(root)"
            plan = self._plans[local_shape] = self._place(local_shape, path)
        return plan

    def check_spec(self, spec: Any, shard_count: int = 1) -> None:
        """Fail before the first batch when a full batch of the loader's `spec` cannot
        be placed (the last batch of an epoch may still be short: see `drop_last`), or
        when the loader's `shard_count` host shards cannot be the processes' parts of
        the global batch."""
        if self.sharding is not None:
            for leaf in spec.leaves:
                plan = self.placement((spec.rows,) + tuple(leaf.shape), leaf.path or "(root)")
                if shard_count > 1:
                    self._check_hosts(plan, shard_count, leaf.path or "(root)")

    def _check_hosts(self, plan: Placement, shard_count: int, path: str) -> None:
        s = cast(Sharding, self.sharding)
        rows_of: dict[int, set[int]] = {}  # process -> starts of its rows of the batch axis
        for d, idx in s.devices_indices_map(plan.global_shape).items():
            proc = cast(Any, d).process_index  # (not in jax.Device's type)
            rows_of.setdefault(proc, set()).add(_start(idx[0]) if idx else 0)
        if len(rows_of) <= 1:  # process-local arrays: each process keeps its own rows
            return
        holder: dict[int, int] = {}
        for proc in sorted(rows_of):
            for start in sorted(rows_of[proc]):
                if start in holder:
                    raise SpecError(
                        f"`sharding` {_describe(s)} puts the rows of leaf {path} from row {start} of "
                        f"the global batch on devices of processes {holder[start]} and {proc}, but "
                        f"each process loads rows of its own (`shard_count={shard_count}`): the "
                        "two copies would differ. Split the batch axis across the processes "
                        "(e.g. NamedSharding(Mesh(np.array(jax.devices()), ('data',)), "
                        "P('data'))), or give every process the same rows (`shard_count=1`).")
                holder[start] = proc
        if len(rows_of) != shard_count:
            raise SpecError(
                f"`sharding` {_describe(s)} builds each global batch from the rows of "
                f"{len(rows_of)} processes, but the loader splits it into `shard_count="
                f"{shard_count}` parts: the global batches would not be the loader's. Pass "
                "`shard_index, shard_count = shmfeed.jax.host_shard()` to the Loader, or a "
                "mesh over every process's devices.")

    # -- the index arithmetic ----------------------------------------------------------
    def _place(self, local_shape: tuple[int, ...], path: str) -> Placement:
        s = self.sharding
        if s is None:
            full = tuple(slice(None) for _ in local_shape)
            return Placement(None, local_shape, local_shape, ((self.devices[0], full),))
        ndim = len(local_shape)
        # Block counts per dimension, read off a probe shape that every block count
        # divides (a dimension is never split into more parts than there are devices).
        probe = (len(s.device_set),) * ndim
        try:
            probe_map = s.devices_indices_map(probe)
        except Exception as exc:
            raise SpecError(
                f"`sharding` {s} cannot place leaf {path} of rank {ndim}: {exc}") from exc
        mine = set(self.devices)
        global_shape, totals = [], []
        for i, n in enumerate(local_shape):
            total = len({_start(idx[i]) for idx in probe_map.values()})
            local = len({_start(idx[i]) for d, idx in probe_map.items() if d in mine})
            totals.append(total)
            if n % local:
                fix = (f"Use a `batch_size` divisible by {local} and `drop_last=True` so that "
                       "the last batch is full too." if i == 0 else
                       f"Give that dimension a size divisible by {local}, or do not split it.")
                raise SpecError(
                    f"leaf {path} has shape {local_shape}: its dimension {i} ({n}) cannot be "
                    f"split into the {local} part(s) this process's devices hold under "
                    f"`sharding` {_describe(s)}. {fix}")
            global_shape.append(n if total == local else n // local * total)
        gshape = tuple(global_shape)
        index_map: Any = s.addressable_devices_indices_map(gshape)  # (no None in it here)
        # The host-local leaf holds this process's blocks side by side, in the order of
        # their global position (as make_array_from_process_local_data expects).
        local_starts = [
            sorted({_start(index_map[d][i]) for d in self.devices}) for i in range(ndim)
        ]
        pieces = []
        for d in self.devices:
            idx = index_map[d]
            local_idx = []
            for i in range(ndim):
                if gshape[i] == local_shape[i]:
                    local_idx.append(idx[i])
                    continue
                block = gshape[i] // totals[i]
                lo = local_starts[i].index(_start(idx[i])) * block
                local_idx.append(slice(lo, lo + block))
            pieces.append((d, tuple(local_idx)))
        return Placement(s, local_shape, gshape, tuple(pieces))


def _start(sl: slice) -> int:
    return 0 if sl.start is None else int(sl.start)


def _describe(s: Sharding) -> str:
    spec = getattr(s, "spec", None)
    return f"{type(s).__name__}(spec={spec})" if spec is not None else repr(s)


def host_slice(leaf: np.ndarray, index: tuple[slice, ...]) -> np.ndarray:
    """The rows of `leaf` a device receives (a view, no copy)."""
    return leaf[index] if index else leaf
