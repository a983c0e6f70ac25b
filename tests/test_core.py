"""The core engine's promises (issue 2): exactly once and in order, determinism across
worker counts, zero copy, kept batches stay intact, fixed memory, spec errors, clean
life cycle, and fork safety once JAX is running."""

from __future__ import annotations

import gc
import importlib.util
import inspect
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import psutil
import pytest
from _procs import exited_after
from _sources import Augmenting, Bad, Counting, DataGenerator, Slices
from _trees import copy_tree as _copy

import shmfeed
from shmfeed._order.order import Order

WORKERS_GONE_S = 2.0


def _epochs(loader, n):
    return [[_copy(b) for b in loader] for _ in range(n)]


def _equal(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _gone(pids, timeout_s=WORKERS_GONE_S):
    return exited_after(pids, timeout_s) is not None


# -- 1. exactly once, in order ------------------------------------------------------

@pytest.mark.parametrize("num_workers", [0, 1, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_every_sample_once_in_batch_order_with_short_last_batch(num_workers, drop_last):
    n, bs = 23, 5
    with shmfeed.Loader(Counting(n), batch_size=bs, num_workers=num_workers, shuffle=True,
                        seed=7, drop_last=drop_last) as loader:
        assert len(loader) == (4 if drop_last else 5)
        for epoch in range(2):
            batches = [b["y"].copy() for b in loader]
            order = Order(n, bs, True, 7, drop_last)
            expect = [order.batch_items(epoch, i) for i in range(len(loader))]
            assert [b.tolist() for b in batches] == [e.tolist() for e in expect]
            sizes = [len(b) for b in batches]
            assert sizes == ([5] * 4 if drop_last else [5, 5, 5, 5, 3])
            seen = np.concatenate(batches)
            assert len(set(seen.tolist())) == len(seen)  # no duplicate within the epoch


def test_epochs_reshuffle_and_unshuffled_is_identity():
    with shmfeed.Loader(Counting(40), batch_size=8, num_workers=2, shuffle=True) as loader:
        e0 = np.concatenate([b["y"].copy() for b in loader])
        e1 = np.concatenate([b["y"].copy() for b in loader])
    assert sorted(e0.tolist()) == sorted(e1.tolist()) == list(range(40))
    assert e0.tolist() != e1.tolist()
    with shmfeed.Loader(Counting(40), batch_size=8, num_workers=2) as loader:
        assert np.concatenate([b["y"].copy() for b in loader]).tolist() == list(range(40))


# -- 2. determinism -----------------------------------------------------------------

def test_augmented_stream_is_bit_identical_for_0_1_2_4_workers_and_across_runs():
    runs = {}
    for nw in (0, 1, 2, 4, 2):
        with shmfeed.Loader(Augmenting(45), batch_size=6, num_workers=nw, shuffle=True, seed=11) as loader:
            runs.setdefault(nw, []).append(_epochs(loader, 2))
    reference = runs[0][0]
    for nw, results in runs.items():
        for r in results:
            assert _equal(r, reference), f"num_workers={nw} differs from num_workers=0"
    # and the draws really are per sample and per epoch, not repeated
    e0, e1 = reference
    noise0 = np.concatenate([b[0] for b in e0])
    assert len({row.tobytes() for row in noise0}) == len(noise0)
    assert not _equal(e0, e1)


TORCH_GLOBAL_RNG = textwrap.dedent("""
    import numpy as np, torch, shmfeed

    class TorchAugmenting:  # tutorial code: torch's global generator, no shmfeed.rng()
        def __len__(self):
            return 24

        def __getitem__(self, i):
            return {"noise": torch.rand(3).numpy(), "i": np.int32(i)}

    def stream(nw):
        with shmfeed.Loader(TorchAugmenting(), batch_size=4, num_workers=nw, shuffle=True, seed=3) as loader:
            return [np.concatenate([b["noise"].copy() for b in loader]) for epoch in range(2)]

    torch.manual_seed(1234)
    mine = torch.get_rng_state()
    runs = {nw: stream(nw) for nw in (0, 1, 2)}
    assert torch.equal(torch.get_rng_state(), mine), "the training process's generator moved"
    for nw in (1, 2):
        assert all(np.array_equal(a, b) for a, b in zip(runs[nw], runs[0])), nw
    rows = np.concatenate(runs[0])
    assert len({r.tobytes() for r in rows}) == len(rows), "draws repeated across batches or epochs"
    print("ok")
""")


def test_torch_global_generator_is_keyed_per_batch_like_numpy_and_random():
    """A source drawing from torch's global generator (torch imported by the script)
    gets the same keyed stream for any `num_workers`, never repeated across batches,
    and the training process's generator is left alone.  In a fresh interpreter: torch
    imported here would change what later tests see."""
    if importlib.util.find_spec("torch") is None:  # not importorskip: that imports it here
        pytest.skip("torch is not installed")
    run = subprocess.run([sys.executable, "-c", TORCH_GLOBAL_RNG], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


def test_seed_changes_the_stream():
    with shmfeed.Loader(Augmenting(12), batch_size=4, num_workers=1, seed=1) as a, \
            shmfeed.Loader(Augmenting(12), batch_size=4, num_workers=1, seed=2) as b:
        assert not _equal(_epochs(a, 1), _epochs(b, 1))


def test_rng_outside_a_build_is_an_error():
    with pytest.raises(shmfeed.ShmfeedError, match="outside a sample"):
        shmfeed.rng()


def test_set_epoch_resumes_the_same_stream():
    with shmfeed.Loader(Augmenting(20), batch_size=4, num_workers=2, shuffle=True, seed=5) as loader:
        epochs = _epochs(loader, 3)
        loader.set_epoch(2)
        assert _equal(_epochs(loader, 1)[0], epochs[2])


# -- batch-level sources (Keras Sequence) -----------------------------------------------

def test_keras_tutorial_sequence_runs_unchanged_and_on_epoch_end_reaches_workers():
    ids = list(range(30))
    labels = {i: i % 5 for i in ids}
    results = {}
    for nw in (0, 2):
        np.random.seed(0)
        gen = DataGenerator(ids, labels, batch_size=4)
        with shmfeed.Loader(gen, batch_size=None, num_workers=nw) as loader:
            assert len(loader) == 7
            epochs = []
            for _ in range(3):
                order_in_trainer = gen.indexes.copy()
                batches = [_copy(b) for b in loader]
                xs = np.concatenate([x[:, 0, 0] for x, _ in batches]).astype(int)
                # the workers used the indexes as they were in the training process
                assert xs.tolist() == order_in_trainer[:28].tolist()
                epochs.append(batches)
            results[nw] = epochs
        x, y = results[nw][0][0]
        assert x.shape == (4, 2, 3) and y.shape == (4, 5) and y.dtype == np.float32
    assert _equal(results[0], results[2])
    first = [b[0][:, 0, 0].tolist() for b in results[0][0]]
    second = [b[0][:, 0, 0].tolist() for b in results[0][1]]
    assert first != second  # on_epoch_end reshuffled between epochs


@pytest.mark.imports_big
def test_real_keras_sequence_subclass_if_keras_is_installed():
    # keras's numpy backend: no tensorflow needed, and JAX's backend is not started
    os.environ.setdefault("KERAS_BACKEND", "numpy")
    keras = pytest.importorskip("keras")

    class Gen(keras.utils.Sequence):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def __len__(self):
            return 5

        def __getitem__(self, b):
            return np.full((3, 2), b, np.float32), np.arange(3) + b

    with shmfeed.Loader(Gen(), batch_size=None, num_workers=2) as loader:
        got = [int(x[0, 0]) for x, _ in loader]
    assert got == [0, 1, 2, 3, 4]


def test_batch_level_short_last_batch_and_shuffle():
    class Uneven:
        def __len__(self):
            return 4

        def __getitem__(self, b):
            n = 3 if b == 3 else 5
            return {"a": np.full((n, 2), b, np.int64)}

    # Seed 0 puts the short batch third (slots are sized from the first one).
    with shmfeed.Loader(Uneven(), batch_size=None, num_workers=2, shuffle=True, seed=0) as loader:
        batches = [_copy(b) for b in loader]
    assert sorted(int(b["a"][0, 0]) for b in batches) == [0, 1, 2, 3]
    assert {int(b["a"][0, 0]): len(b["a"]) for b in batches}[3] == 3


def test_batch_level_slices_arrive_intact():
    src = Slices(20)
    with shmfeed.Loader(src, batch_size=None, num_workers=2) as loader:
        for b, batch in enumerate(loader):
            assert np.array_equal(batch, src.data[b * 32:(b + 1) * 32])


# -- 3. zero copy, no pickling -------------------------------------------------------

def test_batches_are_views_into_the_ring():
    with shmfeed.Loader(Counting(20, shape=(64,)), batch_size=4, num_workers=2) as loader:
        lo = loader._ring_address
        hi = lo + loader.ring_bytes
        for batch in loader:
            for leaf in (batch["x"], batch["y"]):
                addr = leaf.__array_interface__["data"][0]
                assert lo <= addr and addr + leaf.nbytes <= hi
                assert not leaf.flags.owndata


def test_unpicklable_source_and_samples_work_with_workers():
    lock = threading.Lock()

    class Unpicklable:
        def __init__(self):
            self.lock = lock  # a lock cannot be pickled
            self.fn = lambda i: i * 2

        def __len__(self):
            return 10

        def __getitem__(self, i):
            return np.float32(self.fn(i))

    with pytest.raises((TypeError, AttributeError, pickle.PicklingError)):
        pickle.dumps(Unpicklable())
    with shmfeed.Loader(Unpicklable(), batch_size=3, num_workers=2, start_method="fork") as loader:
        got = np.concatenate([b.copy() for b in loader])
    assert got.tolist() == [i * 2 for i in range(10)]


# -- 4. kept batches are safe ----------------------------------------------------------

def test_kept_batches_are_never_overwritten():
    with shmfeed.Loader(Counting(200), batch_size=2, num_workers=2, num_slots=6) as loader:
        kept = {}
        for epoch in range(3):
            for i, batch in enumerate(loader):
                if epoch == 0 and i % 25 == 0 and len(kept) < 3:
                    kept[i] = batch  # keep the arrays themselves, not copies
                for j, k in kept.items():
                    assert k["y"].tolist() == [2 * j, 2 * j + 1], "a kept batch was overwritten"
                    assert k["x"][:, 0].tolist() == [2 * j, 2 * j + 1]
        assert len(kept) == 3
        del kept, batch


def test_holding_every_slot_raises_ring_full_instead_of_hanging():
    with shmfeed.Loader(Counting(50), batch_size=2, num_workers=2, num_slots=4) as loader:
        kept = []
        t0 = time.monotonic()
        with pytest.raises(shmfeed.RingFullError, match=r"all 4 slots.*`num_slots`, now 4") as err:
            for batch in loader:
                kept.append(batch)
        assert time.monotonic() - t0 < 5
        assert len(kept) == 4
        assert "np.array" in str(err.value)
        del kept, batch
        # after letting go, the next epoch runs normally
        assert sum(len(b["y"]) for b in loader) == 50


def test_slot_is_released_when_the_last_view_dies():
    with shmfeed.Loader(Counting(8), batch_size=2, num_workers=0, num_slots=3) as loader:
        it = iter(loader)
        first = next(it)
        view = first["x"][1:]  # a view of a view still pins the slot
        del first
        second, third = next(it), next(it)
        with pytest.raises(shmfeed.RingFullError, match="all 3 slots"):
            next(it)  # batch 3 has no slot: `view`, `second` and `third` pin them all
        del second, third, it
        # the error ended that epoch; the next runs in the two slots given back,
        # while `view` still pins its own
        assert [b["y"].tolist() for b in loader] == [[0, 1], [2, 3], [4, 5], [6, 7]]
        assert view.tolist() == [[1, 1, 1]]


# -- 5. fixed memory ---------------------------------------------------------------

def test_ring_size_is_fixed_reported_and_not_in_dev_shm():
    dev_shm = os.statvfs("/dev/shm")
    with shmfeed.Loader(Counting(64, shape=(256, 1024)), batch_size=32, num_workers=2,
                        num_slots=4) as loader:
        slot = loader.slot_bytes
        assert slot >= 32 * 256 * 1024 * 4
        assert loader.ring_bytes >= 4 * slot
        assert loader.ring_bytes < 4 * slot + (1 << 20)
        assert f"ring_bytes={loader.ring_bytes}" in repr(loader)
        for _ in range(2):
            for _ in loader:
                pass
        # 128 MiB of ring touched, yet /dev/shm did not move: the ring is a memfd.
        after = os.statvfs("/dev/shm")
        assert abs(after.f_bfree - dev_shm.f_bfree) * after.f_frsize < (1 << 20)
        assert not [f for f in os.listdir("/dev/shm") if "shmfeed" in f]


def test_memory_budget_sets_slot_count_and_bounds_everything_the_ring_allocates():
    with shmfeed.Loader(Counting(10, shape=(1024,)), batch_size=4, num_workers=1, num_slots=5) as probe:
        five_slots = probe.ring_bytes
    for budget, slots in ((five_slots, 5), (five_slots - 1, 4), (five_slots + 100, 5)):
        with shmfeed.Loader(Counting(10, shape=(1024,)), batch_size=4, num_workers=1,
                            memory_budget_bytes=budget) as loader:
            assert loader.num_slots == slots
            assert loader.ring_bytes <= budget


def test_default_ring_is_deeper_for_small_batches_and_bounded():
    # 4x4-byte rows: a one-page slot; 2 workers get 4 x (2*2 + 4) slots, not 8.
    with shmfeed.Loader(Counting(100), batch_size=4, num_workers=2) as small:
        assert (small.slot_bytes, small.num_slots) == (4096, 32)
    # 1 MiB slots: 8 MiB holds 8 of them, the usual 2*2 + 4.
    with shmfeed.Loader(Counting(16, shape=(65536,)), batch_size=4, num_workers=2) as large:
        assert large.slot_bytes >= 1 << 20 and large.num_slots == 8
    # ~260 KiB slots: 8 MiB holds 31 -> capped at 4 x (2*1 + 4) = 24 for one worker.
    with shmfeed.Loader(Counting(16, shape=(16384,)), batch_size=4, num_workers=1) as mid:
        assert 256 << 10 < mid.slot_bytes < 300 << 10 and mid.num_slots == 24
    with shmfeed.Loader(Counting(100), batch_size=4, num_workers=0) as here:
        assert here.num_slots == 4  # built in this process: nothing to prefetch
    with shmfeed.Loader(Counting(100), batch_size=4, num_workers=2, num_slots=5) as asked:
        assert asked.num_slots == 5


def test_memory_budget_with_small_slots_counts_report_areas():
    """512 MiB with one-page slots used to give a 1.5 GiB ring: the report area of
    each slot (8 KiB) was not counted, only the slots."""
    budget = 512 << 20
    with shmfeed.Loader(Counting(10), batch_size=4, num_workers=0,
                        memory_budget_bytes=budget) as loader:
        assert loader.slot_bytes == 4096
        assert budget - 64 * 1024 < loader.ring_bytes <= budget
    with pytest.raises(shmfeed.SpecError, match="memory_budget_bytes"):
        shmfeed.Loader(Counting(10, shape=(1024,)), batch_size=4, num_workers=1, memory_budget_bytes=100)


def test_rss_of_training_process_is_flat_over_50_epochs():
    me = psutil.Process()
    with shmfeed.Loader(Counting(64, shape=(512,)), batch_size=8, num_workers=2, shuffle=True) as loader:
        for _ in range(5):
            for _ in loader:
                pass
        base = me.memory_info().rss
        for _ in range(50):
            for _ in loader:
                pass
        grown = me.memory_info().rss - base
    assert grown < 2 * (1 << 20), f"RSS grew by {grown} bytes over 50 epochs"


# -- 6. spec checks ----------------------------------------------------------------

@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("bad, pattern", [
    (np.zeros((2, 3), np.float32), r"sample 5, field \['x'\]: got shape \(2, 3\), expected dtype float32 with shape \(2, 2\)"),
    (np.zeros((2, 2), np.float64), r"sample 5, field \['x'\]: got dtype float64, expected dtype float32"),
    (np.array([None, 1], dtype=object), r"sample 5, field \['x'\]: got dtype object"),
    ("text", r"sample 5, field \['x'\]: got dtype <U4, expected dtype float32"),
    (None, r"sample 5, field \['x'\]: got a value of type NoneType"),
])
def test_bad_sample_names_index_field_and_expectation(num_workers, bad, pattern):
    with shmfeed.Loader(Bad(12, 5, bad), batch_size=4, num_workers=num_workers) as loader:
        with pytest.raises(shmfeed.SpecError, match=pattern):
            for _ in loader:
                pass


def test_bad_first_sample_is_reported_at_construction():
    with pytest.raises(shmfeed.SpecError, match=r"sample 0, field \['x'\]: dtype object is not supported"):
        shmfeed.Loader(Bad(4, 0, np.array([None], dtype=object)), batch_size=2, num_workers=0)
    with pytest.raises(shmfeed.SpecError, match=r"sample 0, field \['x'\]: got a value of type NoneType"):
        shmfeed.Loader(Bad(4, 0, None), batch_size=2, num_workers=0)


def test_batch_larger_than_the_slot_is_an_error():
    class Growing:
        def __len__(self):
            return 3

        def __getitem__(self, b):
            return np.zeros((4 + b, 2), np.float32)

    with shmfeed.Loader(Growing(), batch_size=None, num_workers=1) as loader:
        with pytest.raises(shmfeed.SpecError, match=r"batch 1: has 5 rows, more than the 4 a ring slot holds.*max_batch_rows"):
            for _ in loader:
                pass
    with shmfeed.Loader(Growing(), batch_size=None, num_workers=1, max_batch_rows=6) as loader:
        assert [len(b) for b in loader] == [4, 5, 6]


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(batch_size=0, num_workers=1), r"`batch_size` must be an integer >= 1, got 0"),
    (dict(batch_size=-3, num_workers=1), r"`batch_size` must be an integer >= 1, got -3"),
    (dict(batch_size=2, num_workers=-1), r"`num_workers` must be an integer >= 0, got -1"),
    (dict(batch_size=2.5, num_workers=1), r"`batch_size` must be an integer"),
    (dict(batch_size=2, num_workers=1, num_slots=1), r"`num_slots` must be an integer >= 2"),
    (dict(batch_size=20, num_workers=1, drop_last=True), r"no batch to load"),
    (dict(batch_size=4, num_workers=1, shuffle="yes"), r"`shuffle` must be True, False or 'block', got 'yes'"),
    (dict(batch_size=4, num_workers=1, drop_last="no"), r"`drop_last` must be True or False, got 'no'"),
    (dict(batch_size=4, num_workers=1, seed_global_rngs=1), r"`seed_global_rngs` must be True or False"),
    (dict(batch_size=4, num_workers=1, timeout_s="5"), r"`timeout_s` must be > 0 seconds or None"),
    (dict(batch_size=4, num_workers=1, worker_nice=-1), r"`worker_nice` must be an integer >= 0, got -1"),
    (dict(batch_size=4, num_workers=1, worker_nice=20), r"`worker_nice` must be <= 19 \(the largest"),
])
def test_bad_arguments_are_spec_errors(kwargs, pattern):
    with pytest.raises(shmfeed.SpecError, match=pattern):
        shmfeed.Loader(Counting(10), **kwargs)


@pytest.mark.parametrize("kwargs, missing", [(dict(num_workers=1), "batch_size"),
                                             (dict(batch_size=4), "num_workers")])
def test_a_required_option_left_out_is_named_and_shows_as_required_in_help(kwargs, missing):
    with pytest.raises(TypeError, match=f"missing 1 required keyword-only argument: '{missing}'"):
        shmfeed.Loader(Counting(10), **kwargs)
    param = inspect.signature(shmfeed.Loader).parameters[missing]
    assert param.kind is param.KEYWORD_ONLY and param.default is param.empty  # not <object ...>


def test_more_workers_than_usable_cpus_is_warned_about(caplog):
    many = len(os.sched_getaffinity(0)) + 2
    with caplog.at_level("WARNING", logger="shmfeed"):
        with shmfeed.Loader(Counting(8), batch_size=2, num_workers=many) as loader:
            assert sum(1 for _ in loader) == 4
    assert f"num_workers={many} is more than the" in caplog.text and "Use at most" in caplog.text


def test_empty_dataset_is_an_error():
    with pytest.raises(shmfeed.SpecError, match=r"empty"):
        shmfeed.Loader(Counting(0), batch_size=2, num_workers=1)


# -- 7. clean life cycle -----------------------------------------------------------

def _pids(loader):
    return [loader.pool_pid] + loader.worker_pids


def test_close_stops_every_worker_within_2s():
    loader = shmfeed.Loader(Counting(100), batch_size=4, num_workers=3)
    next(iter(loader))
    deadline = time.monotonic() + 2
    while len(_pids(loader)) < 4 and time.monotonic() < deadline:  # the pool forks them one by one
        time.sleep(0.01)
    pids = _pids(loader)
    assert len(pids) == 4 and all(psutil.pid_exists(p) for p in pids)
    t0 = time.monotonic()
    loader.close()
    assert _gone(pids) and time.monotonic() - t0 < WORKERS_GONE_S
    with pytest.raises(shmfeed.LoaderClosedError):
        iter(loader)


def test_break_out_of_a_loop_over_a_temporary_loader_stops_workers():
    pids = []
    before = {p.pid for p in psutil.Process().children()}  # e.g. a fork server
    for _batch in shmfeed.Loader(Counting(100), batch_size=4, num_workers=2):
        pids = [p for p in psutil.Process().children() if p.pid not in before]
        break
    assert pids
    del _batch
    gc.collect()
    assert _gone([p.pid for p in pids])


def test_break_inside_with_block_stops_workers():
    with shmfeed.Loader(Counting(100), batch_size=4, num_workers=2) as loader:
        pids = _pids(loader)
        for _ in loader:
            break
    assert _gone(pids)


def test_garbage_collected_unclosed_loader_stops_workers():
    loader = shmfeed.Loader(Counting(100), batch_size=4, num_workers=2)
    next(iter(loader))
    pids = _pids(loader)
    del loader
    gc.collect()
    assert _gone(pids)


def test_exception_in_training_loop_stops_workers():
    pids = []
    with pytest.raises(ZeroDivisionError):
        with shmfeed.Loader(Counting(100), batch_size=4, num_workers=2) as loader:
            pids = _pids(loader)
            for _ in loader:
                raise ZeroDivisionError("the training step failed")
    assert _gone(pids)


def test_break_then_next_epoch_is_complete_and_in_order():
    with shmfeed.Loader(Counting(50), batch_size=5, num_workers=2, num_slots=4) as loader:
        for i, _ in enumerate(loader):
            if i == 2:
                break
        assert np.concatenate([b["y"].copy() for b in loader]).tolist() == list(range(50))


def test_close_callbacks_run_once_after_workers_stop_and_before_the_ring_goes():
    calls = []
    loader = shmfeed.Loader(Counting(10), batch_size=2, num_workers=2)
    pids = _pids(loader)
    loader.add_close_callback(lambda: calls.append(("first", _gone(pids, 0.01))))
    loader.add_close_callback(lambda: calls.append(("second", loader._ring.fd >= 0)))
    loader.close()
    loader.close()
    assert calls == [("second", True), ("first", True)]


# -- 8. fork safety with JAX ---------------------------------------------------------

def test_loader_after_jitted_jax_computation_uses_a_clean_parent():
    if importlib.util.find_spec("jax") is None:  # not importorskip: jax would stay here
        pytest.skip("jax is not installed")
    script = textwrap.dedent("""
        import logging, sys
        import numpy as np
        import jax, jax.numpy as jnp
        sys.path.insert(0, sys.argv[1])
        from _sources import Augmenting, Pair, Pairs
        import shmfeed
        logging.basicConfig(level=logging.WARNING)
        print(float(jax.jit(lambda x: (x * 2).sum())(jnp.arange(4.0))))
        with shmfeed.Loader(Augmenting(30), batch_size=4, num_workers=2, shuffle=True) as loader:
            assert loader._res.pool.start_method == "spawn"
            fed = [[np.array(b[0]) for b in loader] for _ in range(3)]
        with shmfeed.Loader(Augmenting(30), batch_size=4, num_workers=0, shuffle=True) as ref:
            want = [[np.array(b[0]) for b in ref] for _ in range(3)]
        assert all(np.array_equal(a, b) for e1, e2 in zip(fed, want) for a, b in zip(e1, e2))
        # a batch spec naming the script's own classes (a namedtuple) reaches the pool too
        with shmfeed.Loader(Pairs(), batch_size=4, num_workers=1) as loader:
            got = [b for b in loader]
            assert type(got[0]) is Pair and got[2].label.tolist() == [8, 9]
            del got
        print("ok", len(fed))
    """)
    out = subprocess.run([sys.executable, "-c", script, os.path.dirname(__file__)],
                         capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    assert "ok 3" in out.stdout
    assert out.stderr.count("starting workers from a fresh interpreter") == 1


def test_unpicklable_source_after_jax_started_gets_a_clear_error():
    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed")
    script = textwrap.dedent("""
        import threading, numpy as np, jax, jax.numpy as jnp, shmfeed
        jnp.zeros(3).block_until_ready()
        class S:
            lock = None
            def __init__(self): self.lock = threading.Lock()
            def __len__(self): return 4
            def __getitem__(self, i): return np.float32(i)
        try:
            shmfeed.Loader(S(), batch_size=2, num_workers=1)
        except shmfeed.SourcePickleError as e:
            print("SourcePickleError:", e.path, e)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "SourcePickleError: source.lock " in out.stdout, out.stdout + out.stderr
    assert "`source.lock` (lock)" in out.stdout and "start_method='fork'" in out.stdout


@pytest.mark.parametrize("worker_nice", [0, 5])
def test_workers_run_as_nice_as_asked_and_the_training_process_keeps_its_priority(worker_nice):
    own = psutil.Process().nice()
    want = [min(own + worker_nice, 19)] * 2

    def nices(ctl):
        try:  # a worker records its pid first thing, and renices before its loop starts
            return [psutil.Process(ctl.worker(w)["pid"]).nice() for w in range(2)]
        except (psutil.Error, ValueError):
            return None

    with shmfeed.Loader(np.zeros((64, 4)), batch_size=8, num_workers=2, worker_nice=worker_nice) as loader:
        assert len(list(loader)) == 8
        ctl = loader._ring.ctl
        deadline = time.monotonic() + 10
        while nices(ctl) != want and time.monotonic() < deadline:
            time.sleep(0.01)
        assert nices(ctl) == want
    assert psutil.Process().nice() == own  # the training process keeps its own
