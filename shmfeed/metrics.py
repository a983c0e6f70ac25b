"""shmfeed.metrics: a Loader's counters for a dashboard, and an opt-in periodic log line.

    import shmfeed.metrics                     # pip install "shmfeed[metrics]"
    shmfeed.metrics.register(loader, name="train")
    port = shmfeed.metrics.serve(9400)         # http://127.0.0.1:9400/metrics, for Prometheus
    shmfeed.metrics.log_every(loader, 60.0)    # "shmfeed[train]: input-bound 43% of the last 60 s ..."

Owns the mapping from `Loader.stats()` (and the ring's slot states) to Prometheus
metric families, read at scrape time: nothing is counted twice, no thread runs per
loader for Prometheus, and a scrape costs one `stats()` per registered loader.

Invariants:
1. A registered loader is held weakly: registering keeps nothing alive, and a loader
   that closes (or is collected) leaves the exported families at its next scrape.
2. Importing this module needs no prometheus-client; `register`/`serve` do, and say how
   to install it.  `log_every` needs nothing beyond the standard library.
3. Every thread this module starts stops on its own: the log thread when its loader
   closes (a close callback) or `stop()` is called, the HTTP server at `stop()` of the
   handle `serve` returns or at interpreter exit (a daemon thread).
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any

from ._engine.control import SlotState
from ._errors import ShmfeedError, SpecError
from ._loader import Loader

log = logging.getLogger("shmfeed")

__all__ = ["LogHandle", "MetricsServer", "register", "serve", "log_every", "unregister"]

_PREFIX = "shmfeed_"
_lock = threading.Lock()
_loaders: weakref.WeakValueDictionary[str, Loader] = weakref.WeakValueDictionary()
_collectors: dict[int, Any] = {}  # id(registry) -> our collector in it


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError as exc:
        raise ShmfeedError("shmfeed.metrics needs prometheus-client: `pip install \"shmfeed[metrics]\"` "
                           "(or `pip install prometheus-client`)") from exc
    return prometheus_client


def _slot_states(loader: Loader) -> dict[str, int]:
    """How many of the ring's slots are in each state right now (empty once closed)."""
    ring = loader._ring
    if ring.closed:
        return {}
    counts = {s.name.lower(): 0 for s in SlotState}
    for s in range(ring.n_slots):
        counts[SlotState(ring.ctl.slot(s)["state"]).name.lower()] += 1
    return counts


class _Collector:
    """Reads every registered loader at scrape time (prometheus_client's custom collector)."""

    def __init__(self, prometheus: Any):
        self.p = prometheus

    def describe(self) -> list:
        return []  # the families depend on the loaders registered: no fixed description

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        with _lock:
            loaders = list(_loaders.items())
        fam = {
            "batches": CounterMetricFamily(_PREFIX + "batches", "Batches the training loop took",
                                           labels=["loader"]),
            "bytes": CounterMetricFamily(_PREFIX + "bytes", "Bytes of the batches taken", labels=["loader"]),
            "wait": CounterMetricFamily(_PREFIX + "input_wait_seconds",
                                        "Time the training loop waited for batches", labels=["loader"]),
            "elapsed": GaugeMetricFamily(_PREFIX + "elapsed_seconds", "Time since the loop's first batch",
                                         labels=["loader"]),
            "fraction": GaugeMetricFamily(_PREFIX + "input_wait_fraction",
                                          "input_wait_seconds over elapsed_seconds (near 1: input-bound)",
                                          labels=["loader"]),
            "restarts": CounterMetricFamily(_PREFIX + "restarts", "Dead workers replaced", labels=["loader"]),
            "busy": CounterMetricFamily(_PREFIX + "worker_busy_seconds", "Time each worker spent building batches",
                                        labels=["loader", "worker"]),
            "built": CounterMetricFamily(_PREFIX + "worker_batches", "Batches each worker built",
                                         labels=["loader", "worker"]),
            "slots": GaugeMetricFamily(_PREFIX + "ring_slots", "Ring slots by state (ring occupancy)",
                                       labels=["loader", "state"]),
            "ring": GaugeMetricFamily(_PREFIX + "ring_bytes", "Shared memory held by the ring",
                                      labels=["loader"]),
        }
        for name, loader in loaders:
            s = loader.stats()
            fam["batches"].add_metric([name], s.batches)
            fam["bytes"].add_metric([name], s.bytes)
            fam["wait"].add_metric([name], s.wait_s)
            fam["elapsed"].add_metric([name], s.elapsed_s)
            fam["fraction"].add_metric([name], s.input_wait_fraction)
            fam["restarts"].add_metric([name], s.restarts)
            for w in s.workers:
                fam["busy"].add_metric([name, str(w["worker"])], w["busy_s"])
                fam["built"].add_metric([name, str(w["worker"])], w["batches"])
            for state, n in _slot_states(loader).items():
                fam["slots"].add_metric([name, state], n)
            fam["ring"].add_metric([name], s.ring_bytes)
        yield from fam.values()


def register(loader: Loader, name: str | None = None, registry: Any = None) -> str:
    """Export `loader`'s counters (label `loader=name`, default "loader0", "loader1", ...)
    in `registry` (default: prometheus_client's global REGISTRY), read at each scrape.
    Returns the name.  The loader leaves the metrics when it closes."""
    prometheus = _prometheus()
    if not isinstance(loader, Loader):
        raise SpecError(f"`loader` must be a shmfeed.Loader, got {type(loader).__name__}")
    loader._check_open()
    registry = prometheus.REGISTRY if registry is None else registry
    with _lock:
        if name is None:
            name = next(f"loader{i}" for i in range(len(_loaders) + 1) if f"loader{i}" not in _loaders)
        elif not isinstance(name, str) or not name:
            raise SpecError(f"`name` must be a non-empty string, got {name!r}")
        if _loaders.get(name) is not None and _loaders[name] is not loader:
            raise SpecError(f"a loader named {name!r} is already registered: give another `name`")
        _loaders[name] = loader
        if id(registry) not in _collectors:
            collector = _Collector(prometheus)
            registry.register(collector)
            _collectors[id(registry)] = collector
    loader.add_close_callback(lambda: unregister(name))
    return name


def unregister(name: str) -> None:
    """Stop exporting the loader registered as `name` (closing it does this too)."""
    with _lock:
        _loaders.pop(name, None)


class MetricsServer:
    """The HTTP endpoint `serve` started; `stop()` shuts it down and closes its socket."""

    def __init__(self, server: Any, thread: threading.Thread):
        self._server, self._thread = server, thread
        self.port: int = server.server_address[1]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def serve(port: int = 0, addr: str = "127.0.0.1", registry: Any = None) -> MetricsServer:
    """Serve `registry` (default: the global one, where `register` puts loaders) at
    http://addr:port/metrics from a daemon thread; port 0 picks a free one
    (`.port`).  Listens on loopback unless `addr` says otherwise."""
    prometheus = _prometheus()
    server, thread = prometheus.start_http_server(
        port, addr=addr, registry=prometheus.REGISTRY if registry is None else registry)
    return MetricsServer(server, thread)


class LogHandle:
    """The thread `log_every` started; `stop()` ends it (closing the loader does too)."""

    def __init__(self, loader: Loader, seconds: float, name: str, logger: logging.Logger):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(weakref.ref(loader), seconds, name, logger),
                                        name=f"shmfeed-log-{name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)

    def _run(self, ref: Any, seconds: float, name: str, logger: logging.Logger) -> None:
        loader = ref()
        last = loader.stats() if loader is not None else None
        del loader
        while not self._stop.wait(seconds):
            loader = ref()
            if loader is None or loader._closed:
                return
            now = loader.stats()
            del loader
            logger.info("%s", window_line(name, last, now))
            last = now


def window_line(name: str, before: Any, after: Any) -> str:
    """One line on the window between two `stats()`: how input-bound the loop was in it."""
    elapsed = after.elapsed_s - before.elapsed_s
    batches = after.batches - before.batches
    if elapsed <= 0 or batches <= 0:
        return f"shmfeed[{name}]: no batch taken in the last window"
    wait = (after.wait_s - before.wait_s) / elapsed
    busy = [(w1["busy_s"] - w0["busy_s"]) / elapsed for w0, w1 in zip(before.workers, after.workers)
            if w1.get("pid")]
    verdict = ("input-bound" if wait >= 0.5 else "partly input-bound" if wait > 0.1 else "keeping up")
    workers = f", workers busy {sum(busy) / len(busy):.0%} on average" if busy else ""
    restarts = after.restarts - before.restarts
    return (f"shmfeed[{name}]: {verdict}: the loop waited {wait:.0%} of the last {elapsed:.0f} s, "
            f"{batches / elapsed:,.1f} batches/s{workers}"
            + (f", {restarts} worker(s) replaced" if restarts else ""))


def log_every(loader: Loader, seconds: float = 60.0, *, name: str = "loader",
              logger: logging.Logger | None = None) -> LogHandle:
    """Log one line every `seconds` (at INFO, logger "shmfeed") saying how input-bound the
    loop was in that window, until the loader closes or `stop()` is called."""
    if not isinstance(loader, Loader):
        raise SpecError(f"`loader` must be a shmfeed.Loader, got {type(loader).__name__}")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise SpecError(f"`seconds` must be a number > 0, got {seconds!r}")
    loader._check_open()
    handle = LogHandle(loader, float(seconds), name, logger or log)
    loader.add_close_callback(handle.stop)
    return handle
