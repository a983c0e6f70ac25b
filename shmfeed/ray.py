"""Batch builders on a Ray cluster: `Loader(..., builders=shmfeed.ray.Builders(...))`.

Owns the remote half of "who builds is separate from which batch" (DESIGN.md): Ray
actors anywhere in the cluster build batches with the workers' own code, and local
delivery threads put them into the ring in order.  The only module that imports ray
(`pip install shmfeed[ray]`); Ray is the engine for everything distributed (placement,
transport, the object store, actor death), none of it is ours.

How a batch travels:

- An actor (`_BuildActor`) holds the source, the loader's `Config` and a `Builder`
  (shmfeed/_batch/build.py) writing into one actor-local buffer laid out exactly like a ring
  slot (`_SlotBuffer` borrows `Ring`'s own view code): the same keyed order, keyed RNG,
  spec and padding as a local worker, so batch `(epoch, b)` is the same bytes wherever
  it is built.  It returns an encoded `Built` (_processes/messages.py: the word a slot publishes,
  rows and bucket, then the slot's bytes, built in place behind it), or the
  `BuildFailure` a worker would have written.
- A delivery thread in the training process is a worker as far as the control block
  knows (a worker record of its own, after the local workers'): it claims the next
  batch that has a slot (`claim_wait`), asks an actor for it, waits, acquires the slot,
  copies the transferred bytes into it (the one copy of invariant 4; a batch under
  Ray's inline limit, 100 KiB by default, is also copied once by Ray as it arrives)
  and publishes it.  `Loader.stats().workers` lists these records after the local
  workers' (pid 0: no process of their own).
  Local workers claim from the same word, so the two kinds mix freely, and the consumer
  takes batches in order whoever built them.
- `window` threads, each with at most one request in flight: at most `window` batches
  are requested from Ray at once, and the object store holds at most `window *
  slot_bytes` of ours (`stats()` reports both, and their peaks).  A thread that cannot
  claim (the ring is full of batches the loop has not taken) asks for nothing: that is
  the back-pressure.

Exactly once: a batch is claimed by one thread, which publishes its slot once.  If its
actor dies (killed, its node removed) the thread replaces the actor and asks again; if
the actor makes no answer within `timeout_s`, it is killed (a stalled build) and the
batch asked of another; results of abandoned requests are never read.  After
`max_retries` failed requests for one batch, the batch is published as an error that
the loop raises in batch order.  Nothing else changes: `state_dict()` and resume are
the loader's, independent of how many actors build.

Shutdown: the loader's close sets the shutdown word (every delivery thread leaves its
wait within `WAIT_SLICE_S`), then runs `_Remote.stop` (a close callback): join the
threads, kill the actors.  The Ray connection itself is the caller's.

Not yet: streams (generators, `Stream`: read in order, in one place) and sources with
epoch hooks or `source_changed()` (the actors' copies would have to take the new
state): refused at construction, naming what to use instead.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._batch.build import WAIT_SLICE_S, builder_for
from ._engine.control import BatchStale, PoolShutdown, SlotState, untag
from ._engine.report import BuildFailure
from ._engine.ring import Ring
from ._errors import LoaderClosedError, ShmfeedError, SourcePickleError, SpecError, WorkerError
from ._processes.messages import Built

try:
    import ray
    import ray.exceptions as _rex
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(f"shmfeed.ray needs Ray ({exc}): `pip install 'shmfeed[ray]'`") from exc

__all__ = ["Builders", "RayClusterError"]
log = logging.getLogger("shmfeed")

ALIGN_BYTES = 4096  # the actor's buffer starts page aligned, like a ring slot
READY_TIMEOUT_S = 60.0  # actors must start within this at construction
CONNECT_PROBE_S = 10.0  # an explicit `address` must accept a connection within this
CPU_WAIT_S = 5.0  # how long construction waits for CPUs that are being given back
KILL_WAIT_S = 5.0  # how long stop() waits for the delivery threads
NO_BATCH = 0xFFFFFFFF  # the consumer's tag once it gave an epoch up

# What a request may fail with when its actor (or the actor's node) is gone; the batch
# is then asked again of a replacement.
# (RayActorError covers ActorDiedError and ActorUnavailableError; OwnerDiedError is an
# ObjectLostError.)
_ACTOR_GONE = (_rex.RayActorError, _rex.ObjectLostError, _rex.WorkerCrashedError)


class RayClusterError(ShmfeedError):
    """The Ray cluster cannot run the builders: none reachable, or too few CPUs."""


class _SlotBuffer:
    """One slot's worth of memory in an actor, with the ring's view code: `Builder`
    writes into it exactly as into a ring slot (offsets, alignment, bucket shapes)."""

    _views = Ring._views
    _known_spec = Ring._known_spec
    _lay_out = Ring._lay_out
    write_views = Ring.write_views

    def __init__(self, spec: Any):
        self.spec = spec
        self.frame = Built.frame(spec.slot_bytes, ALIGN_BYTES)  # the reply, with the word before
        self.raw = self.frame[Built.HEADER_BYTES:]
        self.slot_raw = [self.raw]
        self._write_views: list | None = None
        self._layout_spec: Any = None
        self._layout: list = []


class _BuildActor:
    """Builds batches on a Ray node (made a Ray actor class in `_actor_class`)."""

    def __init__(self, parcel: tuple) -> None:
        source, cfg = parcel
        self.buffer = _SlotBuffer(cfg.spec)
        self.builder = builder_for(source, cfg, self.buffer)  # type: ignore[arg-type]

    def ready(self) -> str:
        """The id of the node it runs on (hex)."""
        return ray.get_runtime_context().get_node_id()

    def build(self, epoch: int, batch: int, worker: int) -> np.ndarray | BuildFailure:
        """The batch (an encoded `Built`), or the BuildFailure a worker would have written."""
        builder = self.builder
        try:
            word = builder.fill(0, epoch, batch)
        except BaseException as exc:  # noqa: B036 - user code may even call sys.exit
            item = builder.current_item
            return BuildFailure.of(exc, worker=worker, batch=batch, epoch=epoch, item=item,
                                   item_name=None if item is None else builder.describe_item(item),
                                   batch_level=builder.spec.batch_level)
        # Ray copies it into the object store as it returns.
        return Built(word, self.buffer.raw).encode(self.buffer.frame)


_actor_classes: dict[tuple, Any] = {}


def _actor_class(num_cpus: float, options: tuple) -> Any:
    key = (num_cpus, options)
    if key not in _actor_classes:
        # Restarts are ours (a replacement actor), so that a request never silently
        # waits for Ray to restart one on a node that may be gone.
        _actor_classes[key] = ray.remote(num_cpus=num_cpus, max_restarts=0, max_task_retries=0,
                                         **dict(options))(_BuildActor)
    return _actor_classes[key]


@dataclass
class _Counters:
    requests: int = 0  # Ray calls made
    batches: int = 0  # batches copied into the ring
    bytes: int = 0  # bytes copied into the ring from the object store
    rebuilt: int = 0  # batches asked again after an actor died or stalled
    actors_replaced: int = 0
    stalls: int = 0  # requests that hit `timeout_s`
    driver_s: float = 0.0  # this process's time per delivered batch: ray.get, the copy, publish
    in_flight: int = 0
    in_flight_max: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class Builders:
    """Ray actors that build a Loader's batches: `Loader(source, ...,
    builders=shmfeed.ray.Builders(num_actors=4))`, alone (`num_workers=0`) or beside
    local workers (`num_workers=2`): either way batch `(epoch, b)` is bit-identical to
    what local workers build from the same seed.

    - `num_actors`: Ray actors, each reserving `num_cpus` CPUs of the cluster.
    - `window`: batches requested from Ray at once (default `2 * num_actors`); it bounds
      the object-store bytes held: `window * slot_bytes`.  The ring gets `window` slots
      more than it would without builders (unless `num_slots` or `memory_budget_bytes`
      is given: a batch is asked for only once it has a slot, so a window larger than
      the free slots gains nothing).
    - `timeout_s`: an actor that has not answered a request within it is taken as stalled,
      killed and replaced, and the batch asked of another; keep it below the Loader's
      `timeout_s` and above the slowest batch's build time.
    - `max_retries`: requests per batch after the first (an actor died or stalled);
      beyond them the batch fails in order with a `WorkerError`.
    - `address`: the cluster to connect to when this process has not called
      `ray.init()` (default: `RAY_ADDRESS` or the cluster started by `ray start` on this
      machine); a new local cluster is never started implicitly.
    - `actor_options`: more `ray.remote` options for the actors (e.g. `{"resources":
      {"cpu_node": 1}}`, `{"runtime_env": ...}`).  shmfeed and the source's modules must
      be importable on every node.

    One `Builders` serves one Loader.  `stats()`: actors, requests, rebuilds, batches in
    flight and the object-store bytes they hold (now, peak and cap).
    """

    def __init__(self, num_actors: int = 2, *, window: int | None = None, timeout_s: float = 60.0,
                 max_retries: int = 3, num_cpus: float = 1.0, address: str | None = None,
                 actor_options: dict | None = None):
        if isinstance(num_actors, bool) or not isinstance(num_actors, int) or num_actors < 1:
            raise SpecError(f"`num_actors` must be an integer >= 1, got {num_actors!r}")
        window = 2 * num_actors if window is None else window
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise SpecError(f"`window` must be an integer >= 1, got {window!r}")
        if not timeout_s > 0:
            raise SpecError(f"`timeout_s` must be > 0 seconds, got {timeout_s!r}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise SpecError(f"`max_retries` must be an integer >= 0, got {max_retries!r}")
        if not num_cpus > 0:
            raise SpecError(f"`num_cpus` must be > 0, got {num_cpus!r}")
        self.num_actors = num_actors
        self.window = window
        self.timeout_s = float(timeout_s)
        self.max_retries = max_retries
        self.num_cpus = float(num_cpus)
        self.address = address
        self.actor_options = tuple(sorted((actor_options or {}).items()))
        self._remote: _Remote | None = None

    @property
    def actors(self) -> list:
        """The Ray actor handles building now (a replaced one is not in it)."""
        return [] if self._remote is None else list(self._remote.actors)

    def stats(self) -> dict:
        """What the builders did: actors, requests, batches and bytes delivered, batches
        rebuilt (an actor died or stalled), actors replaced, stalls, `driver_s` (time the
        delivery threads spent per batch here: ray.get, the copy, publish); batches in flight
        and their peak, the object-store bytes they hold (at most one slot each) and
        their cap (`window * slot_bytes`)."""
        r = self._remote
        if r is None:
            return {"actors": 0, "window": self.window}
        c, sb = r.counters, r.slot_bytes
        return {"actors": len(r.actors), "window": self.window, "requests": c.requests,
                "batches": c.batches, "bytes": c.bytes, "rebuilt": c.rebuilt,
                "actors_replaced": c.actors_replaced, "stalls": c.stalls, "driver_s": c.driver_s,
                "in_flight": c.in_flight, "in_flight_max": c.in_flight_max,
                "object_store_bytes": c.in_flight * sb, "object_store_bytes_max": c.in_flight_max * sb,
                "object_store_bytes_cap": self.window * sb}

    # -- called by the Loader ----------------------------------------------------------
    def _start(self, ring: Ring, source: Any, cfg: Any, first_worker: int) -> _Remote:
        if self._remote is not None:
            raise SpecError("this `shmfeed.ray.Builders` already serves a Loader; give each "
                            "Loader its own")
        _connect(self.address)
        parcel = _shippable(source, cfg)
        _check_cpus(self.num_actors, self.num_cpus)
        self._remote = _Remote(self, ring, parcel, cfg, first_worker)
        return self._remote


def _connect(address: str | None) -> None:
    if ray.is_initialized():
        return
    try:
        if address and "://" not in address:
            # Ray retries an unreachable GCS for minutes; a refused port is known at once.
            host, _, port = address.rpartition(":")
            socket.create_connection((host, int(port)), timeout=CONNECT_PROBE_S).close()
        ray.init(address=address or "auto", log_to_driver=False)
    except (OSError, RuntimeError, ValueError) as exc:
        raise RayClusterError(
            f"no Ray cluster is reachable at {address or 'auto (RAY_ADDRESS, or `ray start` here)'}: "
            f"{type(exc).__name__}: {exc}. Start one (`ray start --head`, or `ray.init()` in this "
            "process before creating the Loader), or pass its `address` to `Builders`.") from exc


def _shippable(source: Any, cfg: Any) -> Any:
    """The source and config in the object store, once; a source that does not pickle
    is refused here, naming the attribute to blame."""
    from ray import cloudpickle  # what Ray ships with

    from ._processes.interpreter import unpicklable_part
    try:
        cloudpickle.dumps(source)
    except Exception as exc:
        found = unpicklable_part(source, "source", 0)
        path, part, cause = found if found is not None else (None, source, exc)
        what = f"its attribute `{path}` ({type(part).__name__})" if path else type(source).__name__
        raise SourcePickleError(
            f"the source ({type(source).__name__}) cannot be shipped to the Ray actors: {what} "
            f"cannot be pickled ({type(cause).__name__}: {cause}). Open such resources lazily in "
            "`__getitem__` (and leave them out of `__getstate__`), or build with local workers "
            "only (no `builders`).", path) from exc
    return ray.put((source, cfg))


def _check_cpus(num_actors: int, num_cpus: float) -> None:
    need = num_actors * num_cpus
    # Actors just killed (a closed loader's) give their CPUs back a moment later.
    deadline = time.monotonic() + CPU_WAIT_S
    while True:
        total = ray.cluster_resources().get("CPU", 0.0)
        free = ray.available_resources().get("CPU", 0.0)
        if free >= need or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if free < need:
        raise RayClusterError(
            f"the Ray cluster has {free:g} of its {total:g} CPUs free, and `num_actors={num_actors}` "
            f"actors of `num_cpus={num_cpus:g}` need {need:g}. Lower `num_actors` or `num_cpus`, "
            "free CPUs held by other actors or tasks, or add nodes.")


class _Remote:
    """The running half: actors, delivery threads, counters."""

    def __init__(self, spec: Builders, ring: Ring, parcel: Any, cfg: Any, first_worker: int):
        self.spec = spec
        self.ring = ring
        self.cfg = cfg
        self.parcel = parcel
        self.slot_bytes = ring.slot_bytes
        self.counters = _Counters()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.next_actor = 0
        self.actors: list = []
        self.busy: list[int] = []  # requests in flight per actor
        # Per actor, its `ready()` call until it answered: a replacement's start (a new
        # process, the source unpickled) does not count towards `timeout_s`.
        self.starting: list[Any] = []
        try:
            for _ in range(spec.num_actors):
                self.actors.append(self._new_actor())
                self.busy.append(0)
                self.starting.append(None)
            self._wait_ready()
        except BaseException:
            self._kill_all()
            raise
        self.threads = [threading.Thread(target=self._deliver_loop, args=(first_worker + i,),
                                         name=f"shmfeed-ray-delivery-{i}", daemon=True)
                        for i in range(spec.window)]
        for t in self.threads:
            t.start()

    def _new_actor(self) -> Any:
        cls = _actor_class(self.spec.num_cpus, self.spec.actor_options)
        return cls.remote(self.parcel)

    def _wait_ready(self) -> None:
        refs = [a.ready.remote() for a in self.actors]
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=READY_TIMEOUT_S)
        if pending:
            raise RayClusterError(
                f"{len(pending)} of {len(refs)} Ray actors did not start within {READY_TIMEOUT_S:.0f} s "
                "(no node could place them, or the source failed to load there: see the Ray logs). "
                "Lower `num_actors`, or check that shmfeed and the source's modules import on every node.")
        try:
            ray.get(ready)
        except _rex.RayError as exc:
            raise RayClusterError(
                f"a Ray actor could not start: {exc}. Check that shmfeed and the source's modules "
                "import on every node (`actor_options={'runtime_env': ...}`).") from exc

    # -- actors --------------------------------------------------------------------------
    def _pick(self) -> int:
        with self.lock:
            n = len(self.actors)
            i = min(range(n), key=lambda k: (self.busy[k], (k - self.next_actor) % n))
            self.next_actor = (i + 1) % n
            self.busy[i] += 1
            return i

    def _replace(self, i: int, actor: Any) -> None:
        """Replace actor `i` if it is still `actor` (another thread may have already)."""
        with self.lock:
            if self.actors[i] is not actor:
                return
            self.actors[i] = self._new_actor()
            self.starting[i] = self.actors[i].ready.remote()
            self.counters.actors_replaced += 1
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # already gone, with its node
            pass

    def _kill_all(self) -> None:
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass

    # -- delivery ------------------------------------------------------------------------
    def _deliver_loop(self, worker: int) -> None:
        ctl = self.ring.ctl
        try:
            while not self.stopping.is_set():
                claimed = ctl.claim_wait(worker, WAIT_SLICE_S)
                if claimed is None:
                    continue
                gen, batch = claimed
                if batch is None:
                    ctl.wait_gen(gen, WAIT_SLICE_S)
                    continue
                try:
                    self._deliver(worker, gen, batch)
                except (PoolShutdown, LoaderClosedError):
                    raise
                except BatchStale:
                    pass
                except Exception:  # the loader's `timeout_s` then names the batch
                    log.exception("shmfeed: a Ray delivery thread failed on batch %d", batch)
        except (PoolShutdown, LoaderClosedError):
            return

    def _stale(self, gen: int) -> bool:
        """Whether nobody waits for batches of `gen` any more (a newer epoch, the loop
        gave this one up, or the loader closes)."""
        h = self.ring.ctl.header()
        return bool(h["shutdown"]) or h["gen"] != gen or untag(h["consumer_tag"]) == (gen, NO_BATCH)

    def _deliver(self, worker: int, gen: int, batch: int) -> None:
        ctl = self.ring.ctl
        info = ctl.gen_info(gen)
        epoch, epoch_batch = info.epoch, info.first_batch + batch
        t0 = time.perf_counter_ns()
        result = self._request(worker, gen, epoch, epoch_batch)
        try:
            while True:
                slot = ctl.acquire(worker, gen, batch, WAIT_SLICE_S)
                if slot is not None:
                    break
        except BatchStale:
            ctl.set_claim(worker, None)
            return
        if result is None:  # given up, yet the slot still wants it: say so in order
            result = BuildFailure.of(
                WorkerError(f"batch {epoch_batch} of epoch {epoch} was given up by its Ray delivery "
                            "thread (the loader is closing)", batch=epoch_batch, epoch=epoch),
                worker=worker, batch=epoch_batch, epoch=epoch, item=None, batch_level=False)
        if isinstance(result, BuildFailure):
            self.ring.write_report(slot, result)
            ctl.publish(worker, slot, gen, batch, 0, SlotState.ERROR, time.perf_counter_ns() - t0)
            return
        built = Built.decode(result, self.ring.slot_bytes)
        word, payload = built.word, built.data
        t_copy = time.perf_counter()
        self.ring.slot_raw[slot][:payload.nbytes] = payload  # the one copy into the ring
        c = self.counters
        nbytes = payload.nbytes
        del result, built, payload  # the object-store copy can go
        ctl.publish(worker, slot, gen, batch, word, SlotState.READY, time.perf_counter_ns() - t0)
        with c.lock:
            c.batches += 1
            c.bytes += nbytes
            c.driver_s += time.perf_counter() - t_copy

    def _request(self, worker: int, gen: int, epoch: int, epoch_batch: int) -> Any:
        """The actor's answer for the batch; None when nobody wants it any more."""
        c, spec = self.counters, self.spec
        failures: list[str] = []
        while True:
            why = ""
            i = self._pick()
            actor = self.actors[i]
            with c.lock:
                c.requests += 1
                c.in_flight += 1
                c.in_flight_max = max(c.in_flight_max, c.in_flight)
            try:
                ref = actor.build.remote(epoch, epoch_batch, worker)
                why = self._await(ref, gen, i)
                if why == "stale":
                    return None
                if why == "ready":
                    t_get = time.perf_counter()
                    try:
                        return ray.get(ref)
                    except _ACTOR_GONE as exc:
                        why = f"its actor died ({type(exc).__name__})"
                    except _rex.RayError as exc:  # e.g. the result did not deserialize here
                        return BuildFailure.of(exc, worker=worker, batch=epoch_batch, epoch=epoch,
                                               item=None, batch_level=False)
                else:
                    with c.lock:
                        c.stalls += 1
            finally:
                with c.lock:
                    c.in_flight -= 1
                    if why == "ready":
                        c.driver_s += time.perf_counter() - t_get
                with self.lock:
                    self.busy[i] -= 1
            self._replace(i, actor)
            failures.append(why)
            if len(failures) > spec.max_retries:
                return BuildFailure.of(
                    WorkerError(f"batch {epoch_batch} of epoch {epoch} failed on {len(failures)} Ray "
                                f"actors: {'; '.join(failures)} (`max_retries={spec.max_retries}`). Check "
                                "the cluster's nodes and the Ray logs, or raise `timeout_s` if batches "
                                "are legitimately this slow.", batch=epoch_batch, epoch=epoch),
                    worker=worker, batch=epoch_batch, epoch=epoch, item=None, batch_level=False)
            with c.lock:
                c.rebuilt += 1

    def _await(self, ref: Any, gen: int, i: int) -> str:
        """"ready", "stale", or why the request was given up (a stall) on actor `i`."""
        t0 = time.monotonic()
        deadline = t0 + self.spec.timeout_s
        while True:
            ready, _ = ray.wait([ref], timeout=WAIT_SLICE_S)
            if ready:
                return "ready"
            if self.stopping.is_set() or self._stale(gen):
                return "stale"  # the actor finishes it; nobody reads the result
            now = time.monotonic()
            starting = self.starting[i]
            if starting is not None:  # a replacement still starting: the clock waits
                if ray.wait([starting], timeout=0)[0]:
                    with self.lock:
                        if self.starting[i] is starting:
                            self.starting[i] = None
                elif now - t0 < READY_TIMEOUT_S:
                    deadline = now + self.spec.timeout_s
                    continue
                else:
                    return f"its actor did not start within {READY_TIMEOUT_S:.0f} s"
            if now > deadline:
                return f"its actor made no answer within `timeout_s={self.spec.timeout_s:g}`"

    def stop(self) -> None:
        """Join the delivery threads (the shutdown word already wakes them), kill the
        actors."""
        self.stopping.set()
        deadline = time.monotonic() + KILL_WAIT_S
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._kill_all()
