"""The device feed: `prefetch_to_device` and the host-side transfers behind it.

Owns: choosing a transfer for the target devices, starting each batch's upload
`size` batches ahead of the one the training step is using, and deciding when the
host memory an upload reads (a ring slot) may go back to the ring.

Transfers:
- "copy" (default on CPU): each device's rows are copied once into private,
  64-byte-aligned host memory (from HostPool) that XLA:CPU adopts without a second
  copy.  Needed because XLA:CPU's `device_put` *aliases* a 64-byte-aligned numpy
  array whose dtype it keeps, instead of copying it (jax 0.10.2; even with
  `may_alias=False`, which it ignores for numpy input): an array made straight from
  the ring would hold its slot for as long as JAX uses it.
- "xla": `jax.device_put` / `jax.make_array_from_process_local_data` straight from
  the ring (page-locked first on a CUDA GPU when CuPy is there).  On CPU the result
  aliases the ring.  That is safe, because JAX holds the batch's numpy base, and so
  its slot, until it is done with the array (it lets go lazily, at its next garbage
  collection, never early); but each batch a caller keeps, *and each step that
  async dispatch has queued*, holds a slot, so a loop that runs ahead of the device
  waits for its steps when the ring is full (the take drives JAX's release:
  _jaxrefs.py); batches kept exhaust it (RingFullError).  Zero copy on CPU is for
  loops that wait on their steps.
- "cupy" (default on a CUDA GPU with CuPy): see _gpu.py.

Invariants:
1. A ring slot is given back only when no transfer can still read it: the numpy
   leaves of a batch (whose last reference releases its slot) are held until its
   upload is complete ("copy": when the copy returns; "xla": when the arrays are
   ready; "cupy": when the events recorded after the copies have completed).
2. With "copy" and "cupy", a yielded jax.Array never points into the ring: the caller
   may keep it forever without stalling the loader.
3. Batches come out in the iterator's order.  An error of the iterator or of an
   upload is raised after the batches before it have been yielded.
4. At most `size + 1` uploads (and fewer than the loader's `num_slots`) hold ring
   slots at once; beyond that the feed waits for the oldest to complete rather than
   let the loader run out of slots.
5. Leaving the loop early waits for the uploads in flight, then releases their
   slots; nothing is left reading the ring.  So does dropping the feed (`Prefetch`)
   mid-epoch, closing it, or leaving its `with` block.
"""

from __future__ import annotations

import atexit
import traceback
import weakref
from collections import deque
from collections.abc import Generator, Iterable, Iterator
from typing import Any

import jax
import numpy as np

from .._errors import SpecError
from .._loader import Loader
from .._processes.interrupts import raise_sigint_after, sigint_deferred
from ._shard import Target
from ._transfer import HostCopyTransfer, Pending, Transfer, XlaTransfer

TRANSFERS = ("auto", "copy", "xla", "cupy")
# Which GPU transfer "auto" picks when CuPy is installed.  The CuPy path is the design
# (pinned ring, own stream, DLPack); benchmarks/bench_jax.py --device measures it
# against XLA's device_put from the registered ring, and this is where to flip it.
GPU_DEFAULT_TRANSFER = "cupy"


class Uploader:
    """Flattens a batch, places each leaf, and hands the leaves to the transfer."""

    def __init__(self, transfer: Transfer):
        self.transfer = transfer
        self.target = transfer.target

    def upload(self, batch: Any) -> tuple[Any, Pending | None]:
        flat, treedef = jax.tree_util.tree_flatten_with_path(batch)
        host, plans, host_pos = [], [], []
        out: list[Any] = [None] * len(flat)
        for i, (path, leaf) in enumerate(flat):
            if isinstance(leaf, jax.Array):  # already on a device: let XLA move it
                out[i] = jax.device_put(leaf, self.target.sharding or self.target.devices[0])
                continue
            arr = np.asarray(leaf)
            if arr.dtype.kind not in "biufc":
                raise SpecError(
                    f"batch leaf {jax.tree_util.keystr(path) or '(root)'} has dtype {arr.dtype}; "
                    "only bool, integer, float and complex arrays can be put on a device")
            host.append(arr)
            plans.append(self.target.placement(arr.shape, path))
            host_pos.append(i)
        arrays, pending = self.transfer.upload_leaves(host, plans) if host else ([], None)
        for i, a in zip(host_pos, arrays):
            out[i] = a
        return jax.tree_util.tree_unflatten(treedef, out), pending


class Prefetch(Iterator):
    """What `prefetch_to_device` returns: an iterator over one pass of the batches,
    with `len()` so that progress bars (tqdm, Keras) know the total.

    It is closed, i.e. the uploads in flight are waited for, their ring slots
    released and the transfer closed (invariant 5), when it is exhausted, by
    `close()` or a `with` block, when it is dropped, even mid-epoch, and at the
    interpreter's exit if it is still referenced then (an atexit hook: in the
    teardown that follows, the modules the cleanup needs are gone).

    All of that is the `finally` of the generator behind it (`_feed`), which holds
    Ctrl-C back while it runs and raises it once its frame is gone: a Ctrl-C raised
    in a finalizer (a dropped feed's cleanup) would be printed and dropped by Python.
    No `__del__` here, for the same reason: Python checks for a pending Ctrl-C when
    such a method starts, and an exhausted feed has nothing left to clean up."""

    __slots__ = ("_batches", "_len", "_input", "__weakref__")

    def __init__(self, batches: Generator[Any, None, None], length: int | None, input_name: str):
        self._batches = batches
        self._len = length
        self._input = input_name
        # A weak reference with no callback: a callback would be Python code run as the
        # feed dies, where a Ctrl-C is lost (WeakSet's is).  Dead ones are pruned here.
        if len(_open) >= _PRUNE_AT:
            _open[:] = [r for r in _open if r() is not None]
        _open.append(weakref.ref(self))

    def __iter__(self) -> Prefetch:
        return self

    def __next__(self) -> Any:
        return next(self._batches)

    def __len__(self) -> int:
        if self._len is None:
            raise TypeError(
                f"len() of this prefetch_to_device(...) is unknown: its input ({self._input}) has "
                "no len(). Pass the shmfeed.Loader itself or a sized iterable (e.g. a list), or "
                "give the progress bar its total (`tqdm(feed, total=n)`)")
        return self._len

    def close(self) -> None:
        """Stop: wait for the uploads in flight and give their ring slots back."""
        self._batches.close()

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


_open: list[weakref.ref] = []  # the feeds made, some dead or closed already
_PRUNE_AT = 64


@atexit.register
def _close_open_feeds() -> None:
    """At exit, before the interpreter's teardown: close the feeds still referenced
    (before the loaders, whose finalizers' atexit hook was registered earlier)."""
    for ref in _open:
        feed = ref()
        if feed is not None:
            try:
                feed.close()
            except Exception:  # one feed's failure must not keep the others open
                pass


def prefetch_to_device(
    loader_or_iterator: Loader | Iterable,
    size: int = 2,
    sharding: Any = None,
    *,
    transfer: str = "auto",
) -> Prefetch:
    """Yield the batches of `loader_or_iterator` as pytrees of `jax.Array`s, keeping
    `size` batches uploading to the device while the current step runs.

    `loader_or_iterator`: a `shmfeed.Loader` (one epoch is read, as `for b in loader`
    would) or any iterable of pytrees (dict/tuple/list) of numpy arrays.  Pass the
    Loader itself, not `iter(loader)`, so that on a GPU its ring can be page-locked.

    `sharding`: None puts each batch on the default device; a
    `NamedSharding(mesh, P('data'))` splits the leading axis over the mesh's devices
    (each device gets only its rows).  With several processes, every process passes
    its own rows (see `host_shard`) and gets global arrays.

    `transfer`: "auto" (host copy on CPU; CuPy on a CUDA GPU when installed; XLA
    otherwise), "copy", "xla" or "cupy"; see the module docstring for what each
    guarantees.  The arrays yielded never point into the ring except with "xla" on
    CPU, where JAX adopts the ring memory and the batch's slot stays taken while
    the array lives.

    The result is an iterator with `len()` (the Loader's batches per epoch, or the
    iterable's length; a TypeError for an iterable without one) that waits for its
    uploads and frees their slots when closed, left, or dropped mid-epoch.
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise SpecError(f"`size` must be an integer >= 1 (batches in flight), got {size!r}")
    size = int(size)
    if not isinstance(loader_or_iterator, Iterable):
        raise SpecError(
            f"`loader_or_iterator` must be a shmfeed.Loader or an iterable of batches, got "
            f"{type(loader_or_iterator).__name__}")
    target = Target(sharding)
    loader = loader_or_iterator if isinstance(loader_or_iterator, Loader) else None
    limit = size + 1
    if loader is not None:
        target.check_spec(loader.spec, loader._cfg.order.shard_count)
    transfer_ = make_transfer(transfer, target, loader)
    if loader is not None:
        if transfer_.name == "xla" and "cpu" in target.platforms and size + 2 > loader.num_slots:
            transfer_.close()
            raise SpecError(
                f"`transfer='xla'` on CPU keeps each prefetched batch's ring slot until its "
                f"array dies: `size={size}` batches ahead plus the one in use and the one being "
                f"read need {size + 2} slots, the loader has {loader.num_slots}. Lower `size`, "
                "raise the Loader's `num_slots`, or use `transfer='copy'`.")
        limit = max(1, min(limit, loader.num_slots - 1))
    try:
        length = len(loader_or_iterator)  # type: ignore[arg-type]
    except TypeError:
        length = None
    batches = _feed(loader_or_iterator, loader, size, limit, transfer_)
    next(batches)  # to its first `yield`: from there, closing or dropping it runs its `finally`
    return Prefetch(batches, length, type(loader_or_iterator).__name__)


def make_transfer(transfer: str, target: Target, loader: Loader | None) -> Transfer:
    """The one place that decides how batches reach `target`: "auto" is a host copy on
    CPU, CuPy on CUDA GPUs when it is usable, XLA's own transfer otherwise (from the
    page-locked ring when CuPy can pin it)."""
    if transfer not in TRANSFERS:
        raise SpecError(f"`transfer` must be one of {TRANSFERS}, got {transfer!r}")
    on_cpu = target.platforms <= {"cpu"}
    if transfer == "copy" or (transfer == "auto" and on_cpu):
        return HostCopyTransfer(target)
    if transfer == "xla" and on_cpu:
        return XlaTransfer(target)
    from . import _gpu  # imports cupy only from here on: a CPU run never loads it

    reason = _gpu.unusable_reason(target.devices)
    if transfer == "cupy" and reason is not None:
        raise SpecError(
            f"`transfer='cupy'` cannot be used: {reason}. Use `transfer='auto'` (host copy on "
            "CPU, XLA on GPUs without CuPy) or install CuPy for your CUDA version.")
    if transfer == "cupy" or (transfer == "auto" and reason is None and GPU_DEFAULT_TRANSFER == "cupy"):
        return _gpu.CupyTransfer(target, loader)
    if reason is None and loader is not None:
        pin = _gpu.pin_ring(loader)  # XLA then reads page-locked memory
        if pin is not None:
            pin.ordinals.update(d.local_hardware_id for d in target.devices)
    return XlaTransfer(target)


def _feed(source: Iterable, loader: Loader | None, size: int, limit: int,
          transfer: Transfer) -> Generator[Any, None, None]:
    """The generator behind prefetch_to_device (see the invariants above).  A Loader
    is told which batch the loop has received (for its `state_dict`), not which ones
    were read ahead.  Its first `yield` (None, taken by prefetch_to_device) comes
    before any work, so that every way it ends runs its `finally`."""
    uploader = Uploader(transfer)
    batches: Iterator[Any] | None = None
    ahead: deque = deque()  # uploaded (or uploading) batches not yet yielded
    pending: deque[Pending] = deque()  # uploads that may still read host memory
    error: list[Exception] = []
    exhausted = False

    def reap() -> None:
        if pending:
            still = [p for p in pending if not p.ready()]
            if len(still) != len(pending):
                pending.clear()
                pending.extend(still)

    def start_one() -> None:
        nonlocal exhausted
        reap()
        while len(pending) >= limit:
            pending.popleft().wait()
        assert batches is not None  # made before the first start_one
        try:
            batch = next(batches)
        except StopIteration:
            exhausted = True
            return
        except Exception as exc:
            error.append(exc)
            exhausted = True
            return
        try:
            arrays, hold = uploader.upload(batch)
        except Exception as exc:
            # The frames of the failed upload hold the batch's ring leaves; the error
            # is kept until the batches before it are yielded (and then by the
            # caller), so its traceback must not keep the slot taken.
            traceback.clear_frames(exc.__traceback__)
            error.append(exc)
            exhausted = True
            return
        finally:
            del batch  # our reference to the ring leaves: the Pending holds them if needed
        if hold is not None:
            pending.append(hold)
        ahead.append((arrays, loader._position() if loader is not None else None))

    try:
        yield None
        batches = iter(source)
        while len(ahead) < size and not exhausted:
            start_one()
        while ahead:
            current, position = ahead.popleft()
            if not exhausted:
                start_one()  # keep `size` batches in flight during this step
            if loader is not None:
                loader._note_received(position)
            yield current
            del current
        if error:
            raise error[0]
    finally:
        _finish(ahead, pending, batches, transfer)


def _finish(ahead: deque, pending: deque, batches: Any, transfer: Transfer) -> None:
    """The feed's cleanup, never interrupted halfway (a slot given back while an upload
    still reads it, or an epoch left open, would outlive it): a Ctrl-C meanwhile is
    raised once the feed's frame is gone, in the loop (in a dropped feed's finalizer,
    Python would print and drop it).  Each step is idempotent, so a Ctrl-C that lands
    before it is held back is handled by running it again, held back."""
    try:
        with sigint_deferred(past=_FEED_CODE):
            _finish_steps(ahead, pending, batches, transfer)
    except KeyboardInterrupt:
        with sigint_deferred(past=_FEED_CODE):
            _finish_steps(ahead, pending, batches, transfer)
        raise_sigint_after(_FEED_CODE)


def _finish_steps(ahead: deque, pending: deque, batches: Any, transfer: Transfer) -> None:
    ahead.clear()
    while pending:
        pending[0].wait()
        pending.popleft()
    close = getattr(batches, "close", None)
    if close is not None:
        close()
    transfer.close()


_FEED_CODE = _feed.__code__
