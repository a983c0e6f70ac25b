"""`shmfeed.sources.TarShards` (issue 29): WebDataset-style tar shards written by the
test, samples grouped by key and decoded in the workers, the same stream for any
`num_workers`, exactly once across a worker's death, a broken shard (truncated, or a bad
member header) named."""

from __future__ import annotations

import io
import json
import os
import signal
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

import shmfeed
from shmfeed.sources import SourceFileError, TarShards

LENGTHS = [7, 5, 0, 9]
BATCH = 2


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


@pytest.fixture
def shards(tmp_path):
    paths = []
    for s, n in enumerate(LENGTHS):
        p = tmp_path / f"train-{s:03d}.tar"
        with tarfile.open(p, "w") as tar:
            for i in range(n):
                key = f"{s}/{i:06d}"
                _add(tar, f"{key}.json", json.dumps({"s": s, "i": i}).encode())
                _add(tar, f"{key}.x.npy", _npy(np.full(3, 10 * s + i, np.int16)))
        paths.append(str(p))
    return paths


def decode(fields: dict) -> dict:
    meta = json.loads(fields["json"])
    assert fields["__key__"] == f"{meta['s']}/{meta['i']:06d}"
    return {"s": meta["s"], "i": meta["i"], "x": np.load(io.BytesIO(fields["x.npy"])),
            "noise": shmfeed.rng().integers(1 << 30)}


class DiesOnce:
    def __init__(self, marker: Path, shard: int, at: int):
        self.marker, self.shard, self.at = str(marker), shard, at

    def __call__(self, fields):
        sample = decode(fields)
        if (sample["s"], sample["i"]) == (self.shard, self.at) and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os._exit(3)
        return sample


def _epochs(loader, n=2):
    return [[(b["s"].tolist(), b["i"].tolist(), b["x"][:, 0].tolist(), b["noise"].tolist()) for b in loader]
            for _ in range(n)]


@pytest.fixture
def reference(shards):
    with shmfeed.Loader(TarShards(shards, decode), batch_size=BATCH, num_workers=0, seed=5) as loader:
        return _epochs(loader)


def test_samples_are_grouped_by_key_each_once_per_epoch(reference):
    for epoch in reference:
        items = sorted((s, i) for ss, ii, _, _ in epoch for s, i in zip(ss, ii))
        assert items == [(s, i) for s, n in enumerate(LENGTHS) for i in range(n)]
        for ss, ii, xs, _ in epoch:
            assert len(set(ss)) == 1 and xs == [10 * ss[0] + i for i in ii]
    assert reference[0][0][:2] == ([0, 0], [0, 1])


@pytest.mark.parametrize("num_workers,start_method", [(1, "fork"), (3, "fork"), (2, "spawn")])
def test_the_stream_is_the_same_for_any_num_workers(shards, reference, num_workers, start_method):
    with shmfeed.Loader(TarShards(shards, decode), batch_size=BATCH, num_workers=num_workers, seed=5,
                        start_method=start_method) as loader:
        assert _epochs(loader) == reference


def test_a_worker_that_dies_mid_shard_is_replaced_without_a_sample_lost_or_repeated(shards, reference,
                                                                                     tmp_path):
    marker = tmp_path / "died"
    with shmfeed.Loader(TarShards(shards, DiesOnce(marker, 3, 5)), batch_size=BATCH, num_workers=2,
                        seed=5) as loader:
        got = _epochs(loader)
        assert loader.stats().restarts == 1
    assert marker.exists() and got == reference


def test_a_worker_killed_while_the_loop_works_is_replaced_exactly_once(shards, reference):
    with shmfeed.Loader(TarShards(shards, decode), batch_size=BATCH, num_workers=2, seed=5,
                        num_slots=3) as loader:
        got = []
        for k, b in enumerate(loader):
            got.append((b["s"].tolist(), b["i"].tolist(), b["x"][:, 0].tolist(), b["noise"].tolist()))
            if k == 2:
                os.kill(loader.worker_pids[1], signal.SIGKILL)
                time.sleep(0.3)
        assert loader.stats().restarts == 1
    assert got == reference[0]


def test_a_truncated_shard_is_an_error_in_batch_order_naming_it(shards):
    with open(shards[3], "rb") as f:
        data = f.read()
    with open(shards[3], "wb") as f:
        f.write(data[: 512 * 9 + 100])  # inside the fifth member
    got = []
    with shmfeed.Loader(TarShards(shards, decode), batch_size=BATCH, num_workers=2) as loader:
        with pytest.raises(SourceFileError, match=r"train-003.tar': cannot read it at or just after member "
                           r"'3/000002.json'.*truncated"):
            for b in loader:
                got += [(s, i) for s, i in zip(b["s"].tolist(), b["i"].tolist())]
    assert (3, 0) in got and (3, 1) in got and all(s != 3 or i < 2 for s, i in got)


@pytest.mark.parametrize("damage", ["garbage", "cut"])
def test_a_bad_member_header_is_an_error_in_batch_order_not_the_end_of_the_shard(shards, damage):
    with open(shards[3], "rb") as f:
        data = bytearray(f.read())
    at = 4 * 1024  # the header of the fifth member (each is one header and one data block)
    if damage == "garbage":
        data[at + 100: at + 140] = b"\xff" * 40
    else:
        data = data[: at + 300]  # inside the header: tarfile alone ends the shard there, silently
    with open(shards[3], "wb") as f:
        f.write(data)
    got = []
    with shmfeed.Loader(TarShards(shards, decode), batch_size=BATCH, num_workers=2) as loader:
        with pytest.raises(SourceFileError, match=r"train-003.tar': cannot read it at or just after member "
                           r"'3/000001.x.npy' \(ReadError: bad member header at byte 4096"):
            for b in loader:
                got += [(s, i) for s, i in zip(b["s"].tolist(), b["i"].tolist())]
    # Batch 3 (shard 3's first) ends at sample 1, known only at the next member: the error.
    assert got == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_bad_arguments_are_spec_errors(shards, tmp_path):
    with pytest.raises(shmfeed.SpecError, match=r"`decode` must be a function"):
        TarShards(shards, None)
    with pytest.raises(shmfeed.SpecError, match=r"matches no file"):
        TarShards(str(tmp_path / "nothing-*.tar"), decode)
