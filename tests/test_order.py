"""The epoch order (issue 10): a keyed bijection on [0, n) computed per position, for any
n up to 2**40; plain and block shuffles; elastic sharding (global batch g is the same
for any host count); a loader over 10**9 samples whose memory does not depend on n;
`shmfeed.build_sample` reproducing a worker's draws.

The statistical checks use fixed seeds: their outcome is decided, they cannot flake,
and a structured order (identity, a rotation, a Feistel with too few rounds on small
domains) fails them by a wide margin.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from _orders import epoch_items
from hypothesis import given, settings
from hypothesis import strategies as st

import shmfeed
from shmfeed import _kernels
from shmfeed._order.order import MAX_SHUFFLED_ITEMS, Order

AWKWARD_N = [1, 2, 3, 5, 7, 31, 97, 127, 128, 129, 1000, 4096, 65537]
MODES = [True, "block"]
SCRIPT_TIMEOUT_S = 90


def order_of(n: int, shuffle, seed: int = 0, epoch: int = 0, block: int = 16) -> np.ndarray:
    """The whole epoch's position -> item map (tests only: it is O(n))."""
    return Order(n, 1, shuffle, seed, False, shuffle_block=block).indices(epoch, np.arange(n, dtype=np.int64))


def chi2_limit(dof: int, z: float = 4.75) -> float:
    """The chi-square value exceeded with probability ~1e-6 (Wilson-Hilferty)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def chi2(counts: np.ndarray, expected: float) -> float:
    return float(((counts - expected) ** 2 / expected).sum())


# -- a bijection for every n ----------------------------------------------------------

@pytest.mark.parametrize("shuffle", MODES)
@pytest.mark.parametrize("n", AWKWARD_N)
def test_order_is_a_bijection_for_awkward_lengths(n, shuffle):
    blocks = [16] if shuffle is True else [1, 3, 16, 256, n, n + 5]
    for seed, epoch in [(0, 0), (0, 1), (1, 0), (2**70 + 3, 9)]:
        for block in blocks:
            perm = order_of(n, shuffle, seed, epoch, block)
            assert np.array_equal(np.sort(perm), np.arange(n)), (n, shuffle, seed, epoch, block)


@pytest.mark.parametrize("shuffle", MODES)
def test_spot_positions_near_2_40_map_into_range_and_distinct(shuffle):
    n = 2**40 - 3
    rng = np.random.default_rng(0)
    positions = np.unique(np.concatenate([
        np.arange(4096), np.arange(n - 4096, n), rng.integers(0, n, 200_000)])).astype(np.int64)
    for epoch in range(2):
        got = Order(n, 64, shuffle, 11, False).indices(epoch, positions.copy())
        assert got.min() >= 0 and got.max() < n
        assert len(np.unique(got)) == len(positions)
        # Not the identity, nor a shift of it.
        assert (got == positions).mean() < 0.01 and len(np.unique(got - positions)) > 1000


def test_shuffle_beyond_2_40_or_an_unknown_mode_is_refused_by_name():
    with pytest.raises(shmfeed.SpecError, match=r"`shuffle=True` orders at most 2\*\*40"):
        Order(MAX_SHUFFLED_ITEMS + 1, 8, True, 0, False)
    assert Order(MAX_SHUFFLED_ITEMS + 1, 8, False, 0, False).n_batches > 0  # unshuffled: any n
    with pytest.raises(shmfeed.SpecError, match="`shuffle` must be True, False or 'block', got 'blocks'"):
        Order(10, 2, "blocks", 0, False)
    with pytest.raises(shmfeed.SpecError, match="`shuffle_block` must be an integer >= 1"):
        Order(10, 2, "block", 0, False, shuffle_block=0)


def test_unshuffled_batches_are_aranges_of_positions():
    order = Order(10**12, 64, False, 0, False)
    assert np.array_equal(order.batch_items(3, 10**9), np.arange(64 * 10**9, 64 * 10**9 + 64))


# -- quality -------------------------------------------------------------------------

def test_seeds_and_epochs_give_unrelated_orders():
    n = 1000
    orders = {key: order_of(n, True, *key) for key in [(0, 0), (0, 1), (1, 0), (2**64, 0), (2**65, 0)]}
    keys = list(orders)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            x, y = orders[a], orders[b]
            assert np.sum(x == y) <= 8, (a, b)  # Poisson(1) for unrelated orders
            assert abs(np.corrcoef(x, y)[0, 1]) < 0.15, (a, b)  # sd 1/sqrt(n) ~ 0.03
            # The order of one relative to the other has no fixed structure either.
            rel = y[np.argsort(x)]
            assert np.sum(rel == np.arange(n)) <= 8, (a, b)
    for x in orders.values():
        assert np.sum(x == np.arange(n)) <= 8
        assert abs(np.corrcoef(x, np.arange(n))[0, 1]) < 0.15


@pytest.mark.parametrize("n", [97, 128])  # cycle walking, and none
def test_where_a_position_lands_is_uniform_over_seeds(n):
    per_bin = 50
    firsts, lasts = np.zeros(n), np.zeros(n)
    pos = np.array([0, n - 1], dtype=np.int64)
    for seed in range(n * per_bin):
        a, b = Order(n, 1, True, seed, False).indices(0, pos.copy())
        firsts[a] += 1
        lasts[b] += 1
    assert chi2(firsts, per_bin) < chi2_limit(n - 1)
    assert chi2(lasts, per_bin) < chi2_limit(n - 1)


@pytest.mark.parametrize("n", [3, 4, 5, 7])
def test_every_order_of_a_tiny_epoch_is_about_equally_likely(n):
    # 7 items make a Feistel domain of 3 x 3, and rounds modulo 3 are even
    # permutations: without the kernel's keyed transposition, the orders of 7 items
    # come out of a walk on the even permutations of 9 and are far from uniform.
    per_order = 20
    n_orders = math.factorial(n)
    counts: dict = {}
    positions, out = np.arange(n, dtype=np.int64), np.empty(n, np.int64)
    for key in np.random.default_rng(n).integers(0, 2**63, n_orders * per_order).tolist():
        _kernels.permute(n, key, positions, out)
        counts[tuple(out.tolist())] = counts.get(tuple(out.tolist()), 0) + 1
    seen = np.array(list(counts.values()))
    stat = chi2(seen, per_order) + (n_orders - len(seen)) * per_order  # unseen orders count too
    assert stat < chi2_limit(n_orders - 1)


def test_positions_and_items_are_independent_in_bins():
    # Position decile vs item decile: a local or banded order fills the diagonal.
    n = 100_000
    perm = order_of(n, True, seed=3)
    table = np.histogram2d(np.arange(n) * 10 // n, perm * 10 // n, bins=10)[0]
    assert chi2(table, n / 100) < chi2_limit(81)


@pytest.mark.parametrize("n", [2**16, 3**10])
def test_neighbouring_positions_hold_unrelated_items(n):
    # The low bits of the items at positions p and p+1: a Feistel with weak rounds shows here.
    perm = order_of(n, True, seed=5)
    cells = (perm[:-1] % 16) * 16 + perm[1:] % 16
    assert chi2(np.bincount(cells, minlength=256), (n - 1) / 256) < chi2_limit(255)


def test_block_shuffle_keeps_runs_together_and_moves_blocks_uniformly():
    n, block = 100_003, 256  # a short last block of 163 samples
    perm = order_of(n, "block", seed=1, block=block)
    # Any run of `block` positions reads from at most two runs of the source, three
    # where it also takes in the short one.
    short = n // block
    for start in range(0, n - block, 97):
        runs = np.unique(perm[start:start + block] // block)
        assert len(runs) <= (3 if short in runs else 2), (start, runs)
    # Blocks are shuffled: where the first position's block lands, over seeds.
    n_blocks = -(-n // block)
    lands = np.zeros(n_blocks)
    for seed in range(n_blocks * 20):
        lands[Order(n, 1, "block", seed, False).indices(0, np.zeros(1, np.int64))[0] // block] += 1
    assert chi2(lands, 20 * n_blocks / n_blocks) < chi2_limit(n_blocks - 1)


# -- elastic sharding ------------------------------------------------------------------

@pytest.mark.parametrize("shuffle", [False, True, "block"])
@pytest.mark.parametrize("n", [1000, 1003, 7 * 6 + 5])
@pytest.mark.parametrize("drop_last", [False, True])
def test_global_batch_is_the_same_for_any_host_count(shuffle, n, drop_last):
    global_bs = 6
    reference = Order(n, global_bs, shuffle, 4, drop_last, shuffle_block=5)
    full = n // global_bs
    for k in (1, 2, 3):
        hosts = [Order(n, global_bs // k, shuffle, 4, drop_last, h, k, shuffle_block=5) for h in range(k)]
        assert len({o.n_batches for o in hosts}) == 1  # lockstep
        for epoch in (0, 1):
            for g in range(full):
                union = np.concatenate([o.batch_items(epoch, g) for o in hosts])
                assert np.array_equal(union, reference.batch_items(epoch, g)), (k, g)
            if hosts[0].n_batches > full:  # the split last global batch
                m, q = n % global_bs, n % global_bs // k
                tail = Order(n, 1, shuffle, 4, False, shuffle_block=5).indices(
                    epoch, np.arange(n - m, n - m + k * q, dtype=np.int64))
                union = np.concatenate([o.batch_items(epoch, full) for o in hosts])
                assert np.array_equal(union, tail)
                assert all(len(o.batch_items(epoch, full)) == q for o in hosts)
        expect = full + (0 if drop_last or n % global_bs < k else 1)
        assert hosts[0].n_batches == expect


def test_batch_level_hosts_take_interleaved_positions():
    n, k = 23, 3
    whole = Order(n, None, True, 2, False)
    for h in range(k):
        host = Order(n, None, True, 2, False, h, k)
        assert host.n_batches == n // k
        for g in range(host.n_batches):
            assert host.source_batch(1, g) == whole.source_batch(1, g * k + h)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 400), batch_size=st.one_of(st.none(), st.integers(1, 12)),
       k=st.integers(1, 4), drop_last=st.booleans(), shuffle=st.sampled_from([False, True, "block"]),
       block=st.integers(1, 40), seed=st.integers(0, 2**64), epoch=st.integers(0, 10**6))
def test_an_epoch_over_all_hosts_holds_each_item_at_most_once(n, batch_size, k, drop_last, shuffle,
                                                             block, seed, epoch):
    hosts = [Order(n, batch_size, shuffle, seed, drop_last, h, k, block) for h in range(k)]
    counts = {o.n_batches for o in hosts}
    assert len(counts) == 1
    if batch_size is None:
        items = [o.source_batch(epoch, g) for o in hosts for g in range(o.n_batches)]
        want = n // k * k
    else:
        items = [i for o in hosts for g in range(o.n_batches) for i in o.batch_items(epoch, g).tolist()]
        gbs = k * batch_size
        want = n // gbs * gbs + (0 if drop_last else n % gbs // k * k)
        assert sum(o.items_per_shard for o in hosts) == want
    assert len(items) == len(set(items)) == want
    assert all(0 <= i < n for i in items)
    if k == 1 and not drop_last:
        assert sorted(items) == list(range(n))


# -- the loader at scale -----------------------------------------------------------------

_SCALE_SCRIPT = """
import json, sys, time
import numpy as np, psutil, shmfeed
from shmfeed._cli.bench.runner import non_file_pss_bytes
from shmfeed._order.order import Order

class Indices:
    def __init__(self, n):
        self.n = n
    def __len__(self):
        return self.n
    def __getitem__(self, i):
        return np.int64(i)

n, workers = int(sys.argv[1]), int(sys.argv[2])
t0 = time.perf_counter()
with shmfeed.Loader(Indices(n), batch_size=64, num_workers=workers, shuffle=True, seed=1) as loader:
    it = iter(loader)
    first = next(it).copy()
    first_batch_s = time.perf_counter() - t0
    rest = [next(it).copy() for _ in range(3)]
    me = psutil.Process()
    deadline = time.monotonic() + 20  # the supervisor may still be forking a worker
    while len(me.children(recursive=True)) < (workers and workers + 1) and time.monotonic() < deadline:
        time.sleep(0.01)
    # Non-file PSS: the tree's own memory, each page counted once however many forked
    # processes share it (RSS counts a shared page in every process that touched it).
    pss = [non_file_pss_bytes(p) for p in [me, *me.children(recursive=True)]]
    order = Order(n, 64, True, 1, False)
    ok = all(np.array_equal(b, order.batch_items(0, i)) for i, b in enumerate([first, *rest]))
    del it
print(json.dumps({"pss": pss, "first_batch_s": first_batch_s, "ok": ok}))
"""


def _run_scale(n: int, workers: int) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(_SCALE_SCRIPT), str(n), str(workers)],
                         capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_over_a_billion_samples_starts_with_the_memory_of_a_thousand(workers):
    small = _run_scale(10**3, workers)
    huge = _run_scale(10**9, workers)
    assert small["ok"] and huge["ok"]
    assert len(small["pss"]) == len(huge["pss"]) == (1 if workers == 0 else 2 + workers)
    # A materialised order of 10**9 would be 8 GB; the whole process tree stays within MBs.
    grown_mb = (sum(huge["pss"]) - sum(small["pss"])) / 2**20
    assert grown_mb < 6, f"the process tree grew by {grown_mb:.1f} MB from n=10**3 to n=10**9: {small} {huge}"


def test_block_shuffled_loader_delivers_the_order():
    from _sources import Counting

    with shmfeed.Loader(Counting(301), batch_size=8, num_workers=2, shuffle="block",
                        shuffle_block=32, seed=3) as loader:
        for epoch in range(2):
            got = np.concatenate([b["y"].copy() for b in loader])
            want = epoch_items(Order(301, 8, "block", 3, False, shuffle_block=32), epoch)
            assert np.array_equal(got, want)
            assert sorted(got.tolist()) == list(range(301))


# -- building a sample by hand ---------------------------------------------------------------

class Drawing:
    """Draws from shmfeed.rng() and from the global np.random, as tutorial code does."""

    def __len__(self):
        return 40

    def __getitem__(self, i):
        return {"r": shmfeed.rng().integers(1 << 62), "g": np.random.randint(1 << 30)}


def test_build_sample_draws_what_a_worker_draws():
    source = Drawing()
    order = Order(40, 4, True, 5, False)
    with shmfeed.Loader(source, batch_size=4, num_workers=2, shuffle=True, seed=5) as loader:
        for epoch in range(2):
            for b, batch in enumerate(loader):
                items = order.batch_items(epoch, b).tolist()
                for row, i in enumerate(items):
                    want = shmfeed.build_sample(source, i, seed=5, epoch=epoch)
                    assert batch["r"][row] == want["r"]
                # np.random is seeded per batch: the first row's draw is the first after it.
                state = np.random.get_state()
                want = shmfeed.build_sample(source, items[0], seed=5, epoch=epoch, batch=b)
                assert batch["g"][0] == want["g"]
                assert np.array_equal(np.random.get_state()[1], state[1])  # restored
    assert shmfeed.rng_key() is None


def test_rng_outside_a_build_names_build_sample():
    with pytest.raises(shmfeed.ShmfeedError, match=r"shmfeed\.build_sample\(source, i, seed=\.\.\., epoch=\.\.\.\)"):
        shmfeed.rng()
    with pytest.raises(shmfeed.ShmfeedError):
        Drawing()[0]
