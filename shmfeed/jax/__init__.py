"""shmfeed.jax: turn a Loader's batches into `jax.Array`s, uploading ahead of the step.

    import shmfeed, shmfeed.jax
    loader = shmfeed.Loader(ds, batch_size=64, num_workers=4, shuffle=True, drop_last=True)
    for epoch in range(epochs):
        for batch in shmfeed.jax.prefetch_to_device(loader, size=2):
            state = train_step(state, batch)        # batch: pytree of jax.Array

- `sharding=NamedSharding(mesh, P('data'))` splits the leading axis over devices.
- Several hosts: `index, count = shmfeed.jax.host_shard()` (after
  `jax.distributed.initialize()`), `Loader(..., shard_index=index, shard_count=count)`;
  the feed then builds global arrays from each host's rows.

This is the only part of shmfeed that imports jax; only `_gpu.py` imports CuPy, and
only when a CUDA device is fed.  How slots are kept safe while a device may still
read them is written down in `_feed.py`; the transfer interface is `_transfer.py`.
"""

from .._processes.forkserver import start as _start_fork_server
from ._feed import GPU_DEFAULT_TRANSFER, TRANSFERS, Prefetch, prefetch_to_device
from ._shard import host_shard
from ._transfer import DeviceFeedError

# Before JAX's first computation this process can still be copied safely: keep such a
# copy to start worker pools from later (see shmfeed.start_fork_server).
_start_fork_server(automatic=True)

__all__ = ["GPU_DEFAULT_TRANSFER", "TRANSFERS", "DeviceFeedError", "Prefetch", "host_shard",
           "prefetch_to_device"]
