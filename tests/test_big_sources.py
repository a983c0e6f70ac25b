"""A large in-memory dataset is not kept twice (issue 26.4): with the fork server or a
fresh interpreter its large arrays reach the pool through one shared memfd that the
supervisor maps copy-on-write, never as pickled bytes; the workers read exactly the
training process's data, before and after an epoch hook re-sends the source."""

from __future__ import annotations

import os

import numpy as np
import pytest

import shmfeed

ROW_INTS = 512  # 4 KiB rows
ROWS = 128 * 2**20 // (8 * ROW_INTS)  # 128 MiB in all
BATCH = 256


class Big:
    """128 MiB of random rows, and a count of the epochs that ended (an epoch hook:
    after each epoch the source is sent to the pool again)."""

    def __init__(self, rows=ROWS):
        self.x = np.random.default_rng(7).integers(0, 2**62, (rows, ROW_INTS), dtype=np.int64)
        self.ended = 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], np.int64(self.ended)

    def on_epoch_end(self):
        self.ended += 1


def _anonymous_bytes(pid: int) -> int:
    """Process `pid`'s resident anonymous memory (shared with its forks or not): pickled
    bytes and unpickled copies count here; pages of a memfd it maps do not."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Anonymous:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no Anonymous in smaps_rollup")


def _parcels_mapped(pid: int) -> set[str]:
    """Inodes of the source parcels (memfds) that process `pid` maps."""
    with open(f"/proc/{pid}/maps") as f:
        return {line.split()[4] for line in f if "shmfeed-source" in line}


@pytest.fixture
def fork_server():
    assert shmfeed.start_fork_server()
    yield
    shmfeed._processes.forkserver.stop()


@pytest.fixture(params=["fork", "forkserver", "spawn"])
def start_method(request):
    if request.param == "forkserver":
        request.getfixturevalue("fork_server")
    return request.param


def test_a_big_dataset_reaches_the_pool_once_and_bit_identical(start_method):
    with shmfeed.Loader(Big(rows=64), batch_size=8, num_workers=1, start_method=start_method) as small:
        for _ in small:
            pass
        base = _anonymous_bytes(small.pool_pid)
    source = Big()
    dataset = source.x.nbytes
    # A forked supervisor maps the training process's own pages of the dataset (shared
    # until written): those are not a copy.
    inherited = dataset if start_method == "fork" else 0
    with shmfeed.Loader(source, batch_size=BATCH, num_workers=2, start_method=start_method) as loader:
        held = []
        for epoch in range(2):  # epoch 1 runs on the source sent again after the hook
            rows = 0
            for x, ended in loader:
                assert np.array_equal(x, source.x[rows : rows + len(x)]), f"epoch {epoch} rows {rows}"
                assert (ended == epoch).all()
                rows += len(x)
            assert rows == ROWS
            held.append(_anonymous_bytes(loader.pool_pid) - base - inherited)
            # The source the hook replaced is freed, with its parcel (was: kept for the pool's life).
            assert len(_parcels_mapped(loader.pool_pid)) <= 1
    # The supervisor holds no pickled copy, nor an unpickled one (was: 2x the dataset).
    assert max(held) < dataset // 10, f"the supervisor holds {[h >> 20 for h in held]} MiB more"


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_the_training_process_gives_its_copy_to_the_pool_and_keeps_its_writes_private(start_method, request):
    if start_method == "forkserver":
        request.getfixturevalue("fork_server")
    source = Big()
    dataset = source.x.nbytes
    expected = source.x.copy()
    before = _anonymous_bytes(os.getpid())
    with shmfeed.Loader(source, batch_size=BATCH, num_workers=2, start_method=start_method) as loader:
        # Its pages now come from the memfd the pool maps: not in memory twice (was: 2x).
        moved = before - _anonymous_bytes(os.getpid())
        assert moved > dataset * 0.9, f"only {moved >> 20} MiB of {dataset >> 20} MiB are shared"
        # A write here copies its page (as after a fork): the running pool never sees it.
        source.x[0] = -1
        first = next(iter(loader))[0]
        assert np.array_equal(first[0], expected[0])
        for _ in loader:  # the rest of epoch 0; the hook then re-sends the source, write included
            pass
        assert np.array_equal(next(iter(loader))[0][0], source.x[0])
    assert np.array_equal(source.x[1:], expected[1:]) and (source.x[0] == -1).all()
    del source  # its memory, now mapped from the memfd, goes back like any array's


class Mixed:
    """Arrays whose pages may not be moved (a view of bytes, an array 64 KiB-1 MiB that
    glibc may have put in its heap) next to one that may."""

    def __init__(self):
        rng = np.random.default_rng(3)
        self.from_bytes = np.frombuffer(rng.bytes(64 * 4096 * 8), np.int64).reshape(-1, 64)
        self.mid = rng.integers(0, 1 << 40, (4096, 32), dtype=np.int64)
        self.big = rng.integers(0, 1 << 40, (4096, 1024), dtype=np.int64)

    def __len__(self):
        return 4096

    def __getitem__(self, i):
        return self.from_bytes[i], self.mid[i], self.big[i]


def test_arrays_whose_pages_cannot_move_keep_their_copy_and_arrive_identical():
    source = Mixed()
    expected = [a.copy() for a in (source.from_bytes, source.mid, source.big)]
    with shmfeed.Loader(source, batch_size=512, num_workers=1, start_method="spawn") as loader:
        rows = 0
        for batch in loader:
            for got, want in zip(batch, expected):
                assert np.array_equal(got, want[rows : rows + len(got)])
            rows += len(batch[0])
    assert rows == 4096
    for have, want in zip((source.from_bytes, source.mid, source.big), expected):
        assert np.array_equal(have, want)
