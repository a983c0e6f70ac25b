"""`shmfeed.sources.ArrayRecord` (issue 29) on ArrayRecord files written by the test:
records decoded in the workers, every record once, bad files named."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import shmfeed
from shmfeed.sources import ArrayRecord, SourceFileError

ar = pytest.importorskip("array_record.python.array_record_module")

COUNTS = [13, 20]


def _write(path, first, n):
    w = ar.ArrayRecordWriter(str(path), "group_size:1")
    for i in range(first, first + n):
        w.write(json.dumps({"i": i, "x": [i, -i]}).encode() + b" " * (i % 7) * 40)
    w.close()


@pytest.fixture
def files(tmp_path):
    paths, first = [], 0
    for k, n in enumerate(COUNTS):
        paths.append(str(tmp_path / f"part-{k}.array_record"))
        _write(paths[-1], first, n)
        first += n
    return paths


def decode(b: bytes) -> dict:
    d = json.loads(b)
    return {"i": d["i"], "x": np.asarray(d["x"], np.int32), "pid": os.getpid(),
            "noise": shmfeed.rng().integers(1 << 30)}


def test_records_are_numbered_file_after_file(files):
    src = ArrayRecord(files, decode=json.loads)
    assert len(src) == sum(COUNTS)
    assert [src[i]["i"] for i in (0, 12, 13, 32, -1)] == [0, 12, 13, 32, 32]
    assert ArrayRecord(files[1])[0].tobytes().startswith(b'{"i": 13')  # raw bytes by default


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_every_record_once_decoded_in_the_workers_and_the_same_for_any_num_workers(files, start_method):
    src = ArrayRecord(files, decode=decode)
    kw = dict(batch_size=5, shuffle=True, seed=2)
    with shmfeed.Loader(src, num_workers=2, start_method=start_method, **kw) as loader:
        got = [(b["i"].tolist(), b["x"].tolist(), b["noise"].tolist(), set(b["pid"].tolist())) for b in loader]
    with shmfeed.Loader(src, num_workers=0, **kw) as loader:
        ref = [(b["i"].tolist(), b["x"].tolist(), b["noise"].tolist()) for b in loader]
    assert [g[:3] for g in got] == ref
    assert sorted(i for g in got for i in g[0]) == list(range(sum(COUNTS)))
    assert all(os.getpid() not in g[3] for g in got)


def test_a_truncated_file_is_refused_at_construction_naming_it(files):
    with open(files[1], "rb") as f:
        data = f.read()
    with open(files[1], "wb") as f:
        f.write(data[:2000])
    with pytest.raises(SourceFileError, match=r"part-1.array_record' as an ArrayRecord file.*truncated"):
        ArrayRecord(files)


def test_a_corrupt_record_arrives_in_batch_order_naming_file_and_record(files):
    with open(files[0], "rb") as f:
        data = bytearray(f.read())
    at = data.find(b'{"i": 7,')
    data[at:at + 8] = b"\xff" * 8
    with open(files[0], "wb") as f:
        f.write(data)
    got = []
    with shmfeed.Loader(ArrayRecord(files, decode=decode), batch_size=4, num_workers=2) as loader:
        with pytest.raises(SourceFileError, match=r"part-0.array_record', record 7 \(sample 7\): cannot read "
                           r"it.*hash mismatch"):
            for b in loader:
                got.append(b["i"].tolist())
    assert got == [[0, 1, 2, 3]]


def bad_decode(b: bytes) -> dict:
    d = decode(b)
    if d["i"] == 15:
        raise KeyError("no field 'label'")
    return d


def test_an_error_in_decode_names_the_file_and_record(files):
    with shmfeed.Loader(ArrayRecord(files, decode=bad_decode), batch_size=4, num_workers=2) as loader:
        with pytest.raises(shmfeed.WorkerError, match=r"raised KeyError.*at sample index 15") as info:
            for _ in loader:
                pass
    assert "in `decode` of record 2 of ArrayRecord file" in info.value.worker_traceback
    assert "part-1.array_record" in info.value.worker_traceback
