"""shmfeed.jax on the JAX CPU backend: values, ring safety, in-flight depth, errors,
sharding over 4 fake devices and two hosts (in subprocesses, since the device count
and jax.distributed must be set before JAX starts), and the Flax example.

Run as a script, this file is the body of those subprocesses:
`python tests/test_jax.py sharded` or `python tests/test_jax.py host <rank> <port>`.
"""

from __future__ import annotations

import gc
import json
import os
import re
import socket
import subprocess
import sys
import time
import weakref
from collections import namedtuple
from pathlib import Path

import _lazy
import numpy as np
import pytest
from _lazy import Lazy
from _ring import held_slots

import shmfeed
from shmfeed import _jaxrefs

# jax is imported when this module's first test runs, not when pytest collects it: the
# fork tests run first, faster without it (tests/_lazy.py).
jax, jnp, sj = Lazy("jax"), Lazy("jax.numpy"), Lazy("shmfeed.jax")


pytestmark = pytest.mark.usefixtures("shmfeed_jax_imported")  # conftest.py

ROOT = Path(__file__).resolve().parent.parent
SUBPROCESS_TIMEOUT_S = 90.0  # for each helper process; they take a few seconds
Meta = namedtuple("Meta", ["id", "weight"])


class Stamped:
    """Sample i: a float32 image whose every value is unique to (i, epoch), plus its id.

    float32/int32 on purpose: JAX keeps these dtypes, so XLA:CPU *can* alias them.
    `meta` is a namedtuple only with `named=True`: a spawned pool cannot yet rebuild a
    spec that names a class of the test module (see the report on _pool.spawn_main)."""

    def __init__(self, n: int, shape: tuple = (4, 3), named: bool = False):
        self.n, self.shape, self.named = n, shape, named

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        stamp = float(i * 1000 + int(shmfeed.rng().integers(1000)))
        meta = (np.int32(i), np.float32(0.5))
        return {"image": np.full(self.shape, stamp, np.float32),
                "meta": Meta(*meta) if self.named else meta}


class ImageOnly(Stamped):
    """Stamped's image alone: batches are single arrays, so any rank-3 layout fits."""

    def __getitem__(self, i: int):
        return super().__getitem__(i)["image"]


class FailsAt(Stamped):
    def __init__(self, n: int, bad: int):
        super().__init__(n)
        self.bad = bad

    def __getitem__(self, i: int):
        if i == self.bad:
            raise ValueError(f"sample {i} is corrupt")
        return super().__getitem__(i)


def host_values(tree):
    return jax.tree.map(lambda a: np.array(a), tree)



def points_into_ring(arr: jax.Array, loader: shmfeed.Loader) -> bool:
    ring = loader._ring_data()
    lo = ring.ctypes.data
    return any(lo <= s.data.unsafe_buffer_pointer() < lo + ring.nbytes for s in arr.addressable_shards)


# -- values and structure ----------------------------------------------------------------
@pytest.mark.contract
def test_batches_arrive_as_jax_arrays_equal_to_the_loaders():
    kw = dict(batch_size=4, num_workers=0, shuffle=True, seed=3)
    with shmfeed.Loader(Stamped(18, named=True), **kw) as ref:
        expected = [host_values(b) for b in ref]
    with shmfeed.Loader(Stamped(18, named=True), **kw) as loader:
        got = list(sj.prefetch_to_device(loader, size=2))
    assert len(got) == len(expected) == 5
    for g, e in zip(got, expected):
        assert isinstance(g["image"], jax.Array) and isinstance(g["meta"], Meta)
        assert g["image"].dtype == np.float32 and g["meta"][0].dtype == np.int32
        np.testing.assert_array_equal(np.asarray(g["image"]), e["image"])
        np.testing.assert_array_equal(np.asarray(g["meta"].id), e["meta"].id)
    assert got[-1]["image"].shape == (2, 4, 3)  # the short last batch too


def test_plain_iterables_of_numpy_batches_work():
    batches = [(np.arange(6, dtype=np.int32).reshape(3, 2) + k, [np.float32(k)]) for k in range(4)]
    got = list(sj.prefetch_to_device(iter(batches), size=3))
    assert [int(g[0][0, 0]) for g in got] == [0, 1, 2, 3]
    assert isinstance(got[0], tuple) and isinstance(got[0][1], list)


def test_64bit_leaves_become_jax_dtypes_in_one_copy():
    batch = {"x": np.linspace(0, 1, 12).reshape(3, 4), "n": np.arange(3, dtype=np.int64)}
    (got,) = list(sj.prefetch_to_device([batch]))
    assert got["x"].dtype == jax.dtypes.canonicalize_dtype(np.float64)
    np.testing.assert_allclose(np.asarray(got["x"]), batch["x"], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(got["n"]), batch["n"])


# -- ring safety ---------------------------------------------------------------------------
@pytest.mark.contract
def test_kept_arrays_keep_their_values_while_the_ring_turns_many_times():
    """The default (copy) transfer: arrays kept from early batches must not change when
    their slots are rewritten, and must not pin the slots (3 slots, ~40 ring turns)."""
    with shmfeed.Loader(Stamped(40), batch_size=4, num_workers=2, num_slots=3, shuffle=True) as loader:
        kept, snapshots = [], []
        for _ in range(12):
            for batch in sj.prefetch_to_device(loader, size=1):
                kept.append(batch)
                snapshots.append(host_values(batch))
        assert len(kept) == 120 and held_slots(loader) == 0
        stamps = {float(s["image"][0, 0, 0]) for s in snapshots}
        assert len(stamps) == 120  # every batch differs, so a reused slot would show
        for batch, snap in zip(kept, snapshots):
            assert not points_into_ring(batch["image"], loader)
            np.testing.assert_array_equal(np.asarray(batch["image"]), snap["image"])
            np.testing.assert_array_equal(np.asarray(batch["meta"][0]), snap["meta"][0])


@pytest.mark.contract
def test_xla_device_put_on_cpu_aliases_the_ring_and_keeps_the_slot_alive():
    """Plain jax.device_put of a loader batch on CPU (jax 0.10.2): the jax.Array points
    into the ring, and JAX holds the numpy base, so the slot is not reused while the
    array lives, even after the numpy views are gone."""
    with shmfeed.Loader(Stamped(24), batch_size=4, num_workers=0, num_slots=4, shuffle=True) as loader:
        batch = next(iter(loader))
        arr = jax.device_put(batch["image"])
        want = np.array(batch["image"])
        del batch
        assert points_into_ring(arr, loader)
        for _ in range(6):  # 36 batches through the 3 other slots
            for b in loader:
                del b
        np.testing.assert_array_equal(np.asarray(arr), want)
        assert held_slots(loader) == 1
        del arr
        gc.collect()  # JAX drops its reference to host buffers lazily, at a collection
        assert held_slots(loader) == 0


@pytest.mark.contract
def test_xla_transfer_on_cpu_holds_slots_safely_and_says_when_they_run_out():
    with shmfeed.Loader(Stamped(40), batch_size=4, num_workers=0, num_slots=5, shuffle=True) as loader:
        first = []
        for b in sj.prefetch_to_device(loader, size=1, transfer="xla"):
            if len(first) < 2:
                first.append(b)
            del b
        want = [host_values(b) for b in first]
        assert points_into_ring(first[0]["image"], loader)
        for _ in range(5):
            for b in sj.prefetch_to_device(loader, size=1, transfer="xla"):
                del b
        for b, w in zip(first, want):
            np.testing.assert_array_equal(np.asarray(b["image"]), w["image"])
        with pytest.raises(shmfeed.RingFullError, match="num_slots"):
            list(sj.prefetch_to_device(loader, size=1, transfer="xla"))  # keeps all 10
        del first
        with pytest.raises(shmfeed.SpecError, match="transfer='copy'"):
            sj.prefetch_to_device(loader, size=4, transfer="xla")


# -- batch views straight into a jitted step (the README's loop) ---------------------------
class _Owner(np.ndarray):
    """A numpy base whose death the tests can watch (a weakref.finalize on it)."""


def _watched_aligned_f32(n: int) -> tuple[np.ndarray, list]:
    raw = np.empty(4 * n + 64, np.uint8)
    off = (-raw.ctypes.data) % 64
    owner = raw[off:off + 4 * n].view(_Owner)
    alive = [True]
    weakref.finalize(owner, alive.__setitem__, 0, False)
    x = owner[:].view(np.ndarray).view(np.float32)  # numpy keeps `owner` in x's base chain
    x[:] = 1.0
    return x, alive


@_lazy.jit
def _slow_sum(x):
    y = x.reshape(128, -1)
    for _ in range(40):  # tens of milliseconds on CPU: still running when checked
        y = jnp.tanh(y @ y.T / 1e3) @ y
    return y.sum()


def test_jax_holds_an_aligned_numpy_argument_while_computing_and_lets_go_only_at_a_collection():
    """What shmfeed's take relies on (jax 0.10.2, _jaxrefs.py): a jitted call on CPU
    holds its 64-byte-aligned numpy argument (it reads it in place) while it computes,
    the pending result is among JAX's live arrays and not ready, and once it is ready
    the argument is still held until a garbage collection (JAX's gc callback), which
    releases it.  (That `jax.device_put` aliases such an array is pinned by
    test_xla_device_put_on_cpu_aliases_the_ring_and_keeps_the_slot_alive; for a jitted
    call, holding the argument until done is what keeps a slot from being reused under
    it.)  A JAX that changes any of this must fail here, not in a training loop."""
    _slow_sum(np.ones(128 * 128, np.float32)).block_until_ready()  # compiled
    x, alive = _watched_aligned_f32(128 * 128)
    result = _slow_sum(x)
    del x
    assert alive[0]
    computing = _jaxrefs.computing()
    assert any(a is result for a in computing), "the pending result is not listed as computing"
    del computing
    result.block_until_ready()
    time.sleep(0.05)
    assert alive[0], "JAX let go of the argument without a collection: _jaxrefs can be simpler"
    assert not any(a is result for a in _jaxrefs.computing())
    for _ in range(100):  # released at the collection, or right after (the callback races)
        _jaxrefs.collect()
        if not alive[0]:
            break
        time.sleep(0.001)
    assert not alive[0], "a garbage collection no longer makes JAX release its numpy arguments"


class Frames:
    """Sample i: a float32 frame of value i (aligned rows: XLA:CPU aliases the views)."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int):
        return np.full((64, 64), float(i), np.float32)


@_lazy.jit
def _train_step(state, batch):
    w = jnp.full((64, 1024), 1e-3, jnp.float32)
    y = batch.reshape(-1, 64)
    # ~40 ms on CPU: many times the loader's time per batch, and longer than the full
    # garbage collection that ran before RingFullError (which released finished steps).
    for _ in range(24):
        y = jnp.tanh(jnp.tanh(y @ w) @ w.T) + y
    return state + 1.0, batch.sum(), y.sum()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_jitted_step_slower_than_the_loader_takes_the_views_for_20_epochs(num_workers):
    """The README's loop with the views passed straight into a jitted step that async
    dispatch queues ahead: slots held by queued steps and by JAX's deferred release must
    come back (RingFullError here before), and never while a step still reads them
    (each step's sum of its batch is the batch's own), and without a full garbage
    collection per batch (~0.2 s each with jax loaded; what hid the error for shorter
    steps)."""
    epochs, n = 20, 3
    sums = []
    full_gcs = []  # a full collection takes ~0.2 s with jax loaded: once per batch was too many

    def count(phase: str, info: dict) -> None:
        if phase == "start" and info["generation"] == 2:
            full_gcs.append(1)

    with shmfeed.Loader(Frames(), batch_size=4, num_workers=num_workers, num_slots=3) as loader:
        state = jnp.zeros(())
        gc.callbacks.append(count)
        try:
            for _ in range(epochs):
                for batch in loader:
                    state, total, _ = _train_step(state, batch)
                    sums.append(total)
                    del batch
        finally:
            gc.callbacks.remove(count)
        assert float(state) == epochs * n
    assert len(full_gcs) < epochs * n // 4, f"{len(full_gcs)} full collections for {epochs * n} batches"
    got = np.array([float(t) for t in sums]).reshape(epochs, n)
    want = np.array([64 * 64 * sum(range(4 * k, 4 * k + 4)) for k in range(n)], np.float64)
    np.testing.assert_array_equal(got, np.broadcast_to(want, got.shape))


def test_keeping_every_batch_raises_ring_full_error_promptly_naming_them():
    """A loop that keeps its batches (and runs JAX steps on them) is told so, once the
    steps in flight are done: no hang, and the message names the batches held."""
    with shmfeed.Loader(Frames(), batch_size=2, num_workers=0, num_slots=4) as loader:
        kept, state = [], jnp.zeros(())
        t_last = time.perf_counter()
        with pytest.raises(shmfeed.RingFullError) as err:
            for batch in loader:
                state, _, _ = _train_step(state, batch)
                kept.append(batch)
                t_last = time.perf_counter()
        waited_s = time.perf_counter() - t_last
        message = str(err.value)
        del kept, batch
    assert "batch 4 has no ring slot" in message
    assert "epoch 0: batches 0, 1, 2, 3" in message
    assert "np.array(x)" in message and "`num_slots`, now 4" in message
    assert waited_s < 2.0, f"RingFullError took {waited_s:.2f} s"


def test_host_copies_are_reused_only_once_no_array_of_them_is_left():
    """The "copy" transfer's buffers (HostPool, reused by reference count, with no
    `__del__`): not while a copy, or a jax.Array that XLA:CPU made from it, lives."""
    from shmfeed.jax._transfer import HostPool

    pool = HostPool()
    x = np.arange(64, dtype=np.float32)
    a = pool.copy(x)
    first = a.ctypes.data
    assert pool.copy(x).ctypes.data != first  # `a` lives
    on_device = jax.device_put(a)
    del a
    gc.collect()
    assert pool.copy(x).ctypes.data != first  # JAX still holds it
    np.testing.assert_array_equal(np.asarray(on_device), x)
    del on_device
    gc.collect()  # JAX lets go at a collection
    assert pool.copy(x).ctypes.data == first


# -- the pipeline --------------------------------------------------------------------------
class CountingIterator:
    def __init__(self, n: int):
        self.n, self.pulled = n, 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.pulled == self.n:
            raise StopIteration
        self.pulled += 1
        return {"k": np.full((2,), self.pulled - 1, np.int32)}


def test_size_batches_are_in_flight_while_the_step_runs():
    source = CountingIterator(10)
    feed = sj.prefetch_to_device(source, size=3)
    first = next(feed)
    assert int(first["k"][0]) == 0
    assert source.pulled == 1 + 3  # the current batch and `size` more
    rest = [int(b["k"][0]) for b in feed]
    assert rest == list(range(1, 10))


@pytest.mark.parametrize("transfer", ["copy", "xla"])
def test_leaving_the_loop_early_releases_every_slot(transfer):
    with shmfeed.Loader(Stamped(40), batch_size=4, num_workers=0, num_slots=4) as loader:
        for _ in range(3):
            for i, b in enumerate(sj.prefetch_to_device(loader, size=2, transfer=transfer)):  # noqa: B007
                if i == 1:
                    break
            del b
            if transfer == "xla":
                gc.collect()  # the arrays alias the ring; JAX lets go of it at a collection
            assert held_slots(loader) == 0
        ids = [int(b["meta"][0][0]) for b in sj.prefetch_to_device(loader)]
        assert ids == list(range(0, 40, 4))


def test_state_dict_inside_the_feed_names_the_batch_the_loop_received():
    """The feed reads `size` batches ahead; the state must not count those."""
    kw = dict(batch_size=4, num_workers=0, shuffle=True, seed=5)
    with shmfeed.Loader(Stamped(40), **kw) as loader:
        reference = [np.asarray(b["image"]).copy() for b in loader]
    with shmfeed.Loader(Stamped(40), **kw) as loader:
        for i, b in enumerate(sj.prefetch_to_device(loader, size=3)):
            np.testing.assert_array_equal(np.asarray(b["image"]), reference[i])
            if i == 4:
                state = loader.state_dict()
                break
    assert (state["epoch"], state["next_batch"]) == (0, 5)
    with shmfeed.Loader(Stamped(40), **kw) as resumed:
        resumed.load_state_dict(state)
        rest = [np.asarray(b["image"]) for b in sj.prefetch_to_device(resumed, size=3)]
    assert len(rest) == len(reference) - 5
    for got, want in zip(rest, reference[5:]):
        np.testing.assert_array_equal(got, want)


def test_the_feed_has_the_length_progress_bars_ask_for():
    with shmfeed.Loader(Stamped(40), batch_size=4, num_workers=0, drop_last=True) as loader:
        feed = sj.prefetch_to_device(loader)
        assert len(feed) == len(loader) == 10
        assert sum(1 for _ in feed) == 10
    assert len(sj.prefetch_to_device([{"k": np.zeros(2)}] * 3)) == 3
    unsized = sj.prefetch_to_device(CountingIterator(5))
    with pytest.raises(TypeError, match=r"its input \(CountingIterator\) has no len\(\)"):
        len(unsized)
    assert sum(1 for _ in unsized) == 5  # it still iterates


@pytest.mark.parametrize("transfer", ["copy", "xla"])
def test_dropping_the_feed_mid_epoch_waits_for_its_uploads_and_frees_every_slot(transfer):
    with shmfeed.Loader(Stamped(48), batch_size=4, num_workers=2, num_slots=6) as loader:
        feed = sj.prefetch_to_device(loader, size=3, transfer=transfer)
        for _ in range(2):
            b = next(feed)
        del b
        if transfer == "xla":  # "copy" is done with the ring once an upload returns
            assert held_slots(loader) > 0  # batches uploaded ahead alias their slots
        del feed  # no close(), no break: the feed is just dropped
        gc.collect()  # "xla": JAX lets go of arrays that alias the ring at a collection
        assert held_slots(loader) == 0
        ids = [int(b["meta"][0][0]) for b in sj.prefetch_to_device(loader, transfer=transfer)]
        assert sorted(ids) == list(range(0, 48, 4))  # the next epoch, whole


def test_closing_the_feed_or_leaving_its_with_block_frees_every_slot():
    with shmfeed.Loader(Stamped(40), batch_size=4, num_workers=0, num_slots=5) as loader:
        with sj.prefetch_to_device(loader, size=2) as feed:
            next(feed)
        assert held_slots(loader) == 0
        feed = sj.prefetch_to_device(loader, size=2)
        next(feed)
        feed.close()
        assert held_slots(loader) == 0
        with pytest.raises(StopIteration):
            next(feed)


def test_an_error_comes_after_the_batches_before_it():
    with shmfeed.Loader(FailsAt(20, bad=9), batch_size=4, num_workers=0) as loader:
        seen = []
        with pytest.raises(shmfeed.WorkerError, match="sample 9 is corrupt"):
            for b in sj.prefetch_to_device(loader, size=3):
                seen.append(int(b["meta"][0][0]))
        assert seen == [0, 4]
        assert held_slots(loader) == 0


def test_arguments_are_checked_with_the_parameter_named():
    with pytest.raises(shmfeed.SpecError, match="`size`"):
        sj.prefetch_to_device([], size=0)
    with pytest.raises(shmfeed.SpecError, match="`size`"):
        sj.prefetch_to_device([], size=True)
    with pytest.raises(shmfeed.SpecError, match="`transfer`"):
        sj.prefetch_to_device([], transfer="dma")
    with pytest.raises(shmfeed.SpecError, match="`sharding`"):
        sj.prefetch_to_device([], sharding="data")
    with pytest.raises(shmfeed.SpecError, match="transfer='cupy'"):
        sj.prefetch_to_device([], transfer="cupy")
    with pytest.raises(shmfeed.SpecError, match="dtype"):
        list(sj.prefetch_to_device([{"s": np.array(["a"])}]))


def test_the_cpu_path_never_imports_cupy():
    # The Loader starts its workers by spawn whenever CuPy is loaded.
    if "cupy" in sys.modules:
        pytest.skip("CuPy was imported by an earlier test (tests/gpu on a GPU machine)")
    list(sj.prefetch_to_device([{"x": np.zeros(3, np.float32)}]))
    assert "cupy" not in sys.modules


def test_host_shard_is_one_host_without_jax_distributed():
    assert sj.host_shard() == (0, 1)


def test_device_benchmark_reports_why_it_is_skipped():
    from shmfeed.jax._bench import run_device_benchmark
    from shmfeed.jax._gpu import available

    if available() is None:
        pytest.skip("a GPU is present: tests/gpu covers the benchmark")
    out = run_device_benchmark(0.1)
    assert set(out) == {"skipped"} and out["skipped"]


# -- in subprocesses -----------------------------------------------------------------------
def _run(args: list[str], env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=SUBPROCESS_TIMEOUT_S)


@pytest.mark.integration
def test_sharding_over_four_cpu_devices():
    proc = _run([__file__, "sharded"], {"XLA_FLAGS": "--xla_force_host_platform_device_count=4",
                                        "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SHARDED OK" in proc.stdout, proc.stdout + proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
def test_two_hosts_each_load_their_own_part_and_build_global_batches():
    port = str(_free_port())
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, __file__, "host", str(r), port], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=SUBPROCESS_TIMEOUT_S)
            outs.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    for rc, out, err in outs:
        assert rc == 0, out + err
    views = [json.loads(next(line for line in out.splitlines() if line.startswith("{")))
             for _, out, _ in outs]
    assert views[0] == views[1]  # both hosts see the same global batches
    # Reference: each host's rows from an in-process Loader, laid side by side.
    n, bs = HOST_SAMPLES, HOST_BATCH
    for epoch in range(2):
        local = []
        for rank in range(2):
            with shmfeed.Loader(Stamped(n), batch_size=bs, num_workers=0, shuffle=True, seed=7,
                                drop_last=True, shard_index=rank, shard_count=2) as ref:
                ref.set_epoch(epoch)
                local.append([b["meta"][0].tolist() for b in ref])
        expected = [a + b for a, b in zip(*local)]
        for mode in ("copy", "xla"):
            assert views[0][mode][epoch] == expected
        flat = [i for batch in expected for i in batch]
        assert len(flat) == len(set(flat)) == (n // 2 // bs) * bs * 2  # disjoint hosts


EPOCH_LINE = re.compile(r"epoch (\d+)/\d+\s+loss ([\d.]+)\s+accuracy ([\d.]+)\s+"
                        r"val_accuracy ([\d.]+)\s+examples/s (\d+)")


@pytest.mark.integration
def test_the_flax_example_learns(tmp_path):
    proc = _run([str(ROOT / "examples" / "train_flax.py"), "--samples", "480", "--epochs", "3",
                 "--batch-size", "32", "--workers", "1", "--data-dir", str(tmp_path / "data")],
                {"JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    epochs = [m.groups() for m in map(EPOCH_LINE.search, proc.stdout.splitlines()) if m]
    assert len(epochs) == 3, proc.stdout
    losses = [float(e[1]) for e in epochs]
    assert losses[-1] < 0.5 * losses[0], proc.stdout
    assert float(epochs[-1][3]) > 0.5, proc.stdout  # validation accuracy; chance is 1/6
    assert all(int(e[4]) > 0 for e in epochs)


@pytest.mark.timeout(360)  # three runs of the example, each starting JAX and compiling
@pytest.mark.integration
def test_flax_example_killed_mid_epoch_resumes_with_the_uninterrupted_losses(tmp_path):
    """SIGKILL of the training script in the middle of its second epoch; started again,
    it restores model, optimiser and loader state from orbax, and every later step's
    loss equals the uninterrupted run's."""
    common = [str(ROOT / "examples" / "train_flax.py"), "--samples", "200", "--epochs", "2",
              "--batch-size", "16", "--workers", "1", "--data-dir", str(tmp_path / "data"),
              "--checkpoint-every", "4", "--log-steps"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
        [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))

    def losses(text: str) -> dict[int, str]:
        return {int(m[1]): m[2] for m in re.finditer(r"^step (\d+) loss (\S+)$", text, re.M)}

    whole = subprocess.run([sys.executable, *common, "--checkpoint-dir", str(tmp_path / "a")],
                           capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S, env=env)
    assert whole.returncode == 0, whole.stderr
    reference = losses(whole.stdout)
    assert len(reference) == 20  # 160 training samples / 16, two epochs
    run = [sys.executable, *common, "--checkpoint-dir", str(tmp_path / "b")]
    proc = subprocess.Popen(run, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        for line in proc.stdout:
            if line.startswith("step 15 "):  # epoch 2, batch 5 of 10; checkpoints at 4, 8, 12
                proc.kill()
                break
        proc.wait(SUBPROCESS_TIMEOUT_S)
    finally:
        proc.kill()
        proc.stdout.close()
    again = subprocess.run(run, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S, env=env)
    assert again.returncode == 0, again.stderr
    resumed = re.search(r"resumed at step (\d+): epoch (\d+), batch (\d+)", again.stdout)
    assert resumed, again.stdout
    start = int(resumed[1])  # 8 or 12 (saves are asynchronous: the last may not have finished)
    assert start in (8, 12) and (int(resumed[2]) - 1) * 10 + int(resumed[3]) == start
    after = losses(again.stdout)
    assert sorted(after) == list(range(start + 1, 21))
    assert {k: reference[k] for k in after} == after


# -- subprocess bodies ---------------------------------------------------------------------
HOST_SAMPLES, HOST_BATCH = 44, 4


def _sharded_main() -> None:
    """4 CPU devices: every transfer and mesh layout gives the right shards (the CuPy
    transfer on tests/_simcuda.py, each CPU device standing for a GPU)."""
    from _simcuda import SimCuda
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from shmfeed.jax import _gpu
    from shmfeed.jax._shard import Target

    # The Loader first, so that it forks before JAX starts.
    loader = shmfeed.Loader(Stamped(36, shape=(4, 6)), batch_size=8, num_workers=1,
                            shuffle=True, drop_last=True, num_slots=4)
    images = shmfeed.Loader(ImageOnly(24, shape=(4, 6)), batch_size=8, num_workers=0, shuffle=True)
    devices = np.array(jax.devices())
    assert devices.size == 4, devices
    mesh1 = Mesh(devices, ("data",))
    mesh2 = Mesh(devices.reshape(2, 2), ("data", "model"))
    layouts = {
        "data": NamedSharding(mesh1, P("data")),
        "data_x_model": NamedSharding(mesh2, P("data")),  # 'model' replicated
        "replicated": NamedSharding(mesh1, P()),
    }
    cols = NamedSharding(mesh2, P("data", None, "model"))  # also splits a later axis
    sim = SimCuda(device_count=4)  # "cupy": the CuPy path, on a simulated CUDA runtime
    sys.modules["cupy"], _gpu.CUDA_PLATFORMS = sim.module, ("cpu",)
    with loader, images:
        for name, sharding, source in [*((n, s, loader) for n, s in layouts.items()),
                                       ("rows_and_cols", cols, images)]:
            for mode in ("copy", "xla", "cupy"):
                for batch in sj.prefetch_to_device(source, size=2, sharding=sharding, transfer=mode):
                    if mode == "cupy":  # what JAX's stream would wait for on a GPU
                        sim.read_as_jax_would([s.data for leaf in jax.tree.leaves(batch)
                                               for s in leaf.addressable_shards])
                    if source is images:
                        batch = {"image": batch, "meta": (np.asarray(batch[:, 0, 0]) // 1000,)}
                    img = batch["image"]
                    assert img.sharding == sharding and img.shape == (8, 4, 6), (name, img.sharding)
                    full = np.asarray(img)
                    for shard in img.addressable_shards:
                        np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index])
                    # against JAX's own placement of the same host rows
                    ref = jax.make_array_from_process_local_data(sharding, full)
                    for a, b in zip(img.addressable_shards, ref.addressable_shards):
                        assert a.device == b.device and a.index == b.index
                        np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))
                    ids = np.asarray(batch["meta"][0])
                    np.testing.assert_array_equal(full[:, 0, 0] // 1000, ids)
                    total = jax.jit(lambda x: x.sum())(img)  # a step runs on the sharded batch
                    assert float(total) == float(full.sum())
                    if mode != "xla":
                        assert not points_into_ring(img, source)
        # A batch that cannot be split says how to fix it.
        try:
            Target(layouts["data"]).placement((6, 2), "['x']")
        except shmfeed.SpecError as exc:
            assert "batch_size" in str(exc) and "drop_last=True" in str(exc), exc
        else:
            raise AssertionError("6 rows over 4 devices was accepted")
        odd = shmfeed.Loader(Stamped(12), batch_size=6, num_workers=0)
        with odd:
            try:
                sj.prefetch_to_device(odd, sharding=layouts["data"])
            except shmfeed.SpecError:
                pass
            else:
                raise AssertionError("a loader of 6-row batches was accepted for 4 devices")
    sim.close()
    assert sim.violations == [], sim.violations
    assert {sim.buffers[p].device for p in sim.made} == {0, 1, 2, 3}
    print("SHARDED OK")


def _host_main(rank: int, port: str) -> None:
    """One of two JAX processes on localhost, 2 CPU devices each."""
    from jax._src import xla_bridge
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=rank,
                               coordinator_bind_address=f"127.0.0.1:{port}",  # not every interface
                               initialization_timeout=60)
    index, count = sj.host_shard()
    assert (index, count) == (rank, 2)
    assert not xla_bridge._backends, "host_shard() started JAX's backend"
    loader = shmfeed.Loader(Stamped(HOST_SAMPLES), batch_size=HOST_BATCH, num_workers=1,
                            shuffle=True, seed=7, drop_last=True, shard_index=index, shard_count=count)
    with loader:
        assert len(jax.devices()) == 4 and len(jax.local_devices()) == 2
        sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
        view: dict[str, list] = {}
        for mode in ("copy", "xla"):
            loader.set_epoch(0)
            epochs = []
            for _ in range(2):
                ids = []
                for batch in sj.prefetch_to_device(loader, sharding=sharding, transfer=mode):
                    gid = batch["meta"][0]
                    assert gid.shape == (2 * HOST_BATCH,) and not gid.is_fully_addressable
                    ids.append(np.asarray(multihost_utils.process_allgather(gid, tiled=True)).tolist())
                epochs.append(ids)
            view[mode] = epochs
    print(json.dumps(view), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    if sys.argv[1] == "sharded":
        _sharded_main()
    elif sys.argv[1] == "host":
        _host_main(int(sys.argv[2]), sys.argv[3])
    else:
        raise SystemExit(f"unknown helper {sys.argv[1]!r}")
