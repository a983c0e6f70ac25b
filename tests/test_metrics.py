"""shmfeed.metrics: a real Prometheus endpoint on loopback, scraped over HTTP, says what
`stats()` says; the periodic log line; nothing outlives the loader or the server."""

from __future__ import annotations

import logging
import urllib.request

import numpy as np
import pytest

import shmfeed
import shmfeed.metrics  # needs no prometheus-client to import; register and serve do

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402


class Squares:
    def __len__(self):
        return 64

    def __getitem__(self, i):
        return {"x": np.full(8, i, np.float32), "y": i}


def _scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_a_scrape_of_the_endpoint_reports_what_stats_says_and_forgets_a_closed_loader():
    registry = prometheus_client.CollectorRegistry()
    with shmfeed.metrics.serve(0, registry=registry) as server, \
            shmfeed.Loader(Squares(), batch_size=8, num_workers=2, num_slots=6) as loader:
        name = shmfeed.metrics.register(loader, name="train", registry=registry)
        assert name == "train"
        it = iter(loader)
        held = [next(it) for _ in range(3)]  # three batches still referenced: three slots held
        s = loader.stats()
        m = _scrape(server.port)
        lab = (("loader", "train"),)
        assert m[("shmfeed_batches_total", lab)] == s.batches == 3
        assert m[("shmfeed_bytes_total", lab)] == s.bytes
        assert m[("shmfeed_ring_bytes", lab)] == loader.ring_bytes
        slots = {dict(k[1])["state"]: v for k, v in m.items() if k[0] == "shmfeed_ring_slots"}
        assert sum(slots.values()) == 6 and slots["held"] == 3
        workers = {dict(k[1])["worker"] for k in m if k[0] == "shmfeed_worker_busy_seconds_total"}
        assert workers == {"0", "1"}
        built = sum(v for k, v in m.items() if k[0] == "shmfeed_worker_batches_total")
        assert built >= 3  # what the workers built, read-ahead included
        with pytest.raises(shmfeed.SpecError, match="already registered"):
            other = shmfeed.Loader(Squares(), batch_size=8, num_workers=0)
            try:
                shmfeed.metrics.register(other, name="train", registry=registry)
            finally:
                other.close()
        del held
        it.close()
        loader.close()
        assert not [k for k in _scrape(server.port) if k[0].startswith("shmfeed_")]


def test_the_periodic_log_line_says_how_input_bound_the_window_was(caplog):
    class Slow(Squares):
        def __getitem__(self, i):
            import time

            time.sleep(0.004)
            return super().__getitem__(i)

    caplog.set_level(logging.INFO, logger="shmfeed")
    with shmfeed.Loader(Slow(), batch_size=8, num_workers=1) as loader:
        handle = shmfeed.metrics.log_every(loader, 0.3, name="train")
        loader.set_epoch(0)
        for _ in range(4):
            for _ in loader:  # the loop does nothing: it waits for the slow source
                pass
        import time

        deadline = time.monotonic() + 10
        while not any("shmfeed[train]" in r.message for r in caplog.records) and time.monotonic() < deadline:
            time.sleep(0.05)
    handle.stop()  # already stopped by close(): a second stop is harmless
    lines = [r.message for r in caplog.records if r.message.startswith("shmfeed[train]")]
    assert lines, "no log line in 10 s"
    assert any("input-bound: the loop waited" in line for line in lines), lines


def test_bad_arguments_are_named():
    with shmfeed.Loader(Squares(), batch_size=8, num_workers=0) as loader:
        with pytest.raises(shmfeed.SpecError, match="`seconds` must be a number > 0"):
            shmfeed.metrics.log_every(loader, 0)
        with pytest.raises(shmfeed.SpecError, match="`loader` must be a shmfeed.Loader"):
            shmfeed.metrics.register(object())
