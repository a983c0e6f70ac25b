"""`shmfeed.sources.ObjectCache` (issue 29) against a real S3-compatible server (moto's)
started on 127.0.0.1 by each test: tar shards and Parquet files read from s3:// through
a bounded local cache, once per machine, exactly once across a worker killed mid-
download, objects downloaded ahead of the read (prefetch) within the budget, and clear
errors for a server that is down, a missing object, a cache too small or full, and a
cache directory that cannot be written."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request

import numpy as np
import pytest
from _lazy import Lazy

import shmfeed
from shmfeed.sources import ArrayRecord, ObjectCache, Parquet, SourceFileError, TarShards

for _needed in ("moto", "s3fs"):  # not importorskip: that imports them while collecting
    if importlib.util.find_spec(_needed) is None:
        pytest.skip(f"needs {_needed}", allow_module_level=True)
s3fs = Lazy("s3fs")
IMPORTS_BIG = True  # fsspec and s3fs, in this process from its first test on

BUCKET = "data"
LENGTHS = [6, 4, 7]


@pytest.fixture(scope="module", autouse=True)
def fsspec_loop():
    """fsspec's one event loop thread (an epoll fd and a socket pair) lives as long as the
    process: start it before the per-test leak check looks."""
    import fsspec.asyn
    fsspec.asyn.get_loop()


class MotoServer:
    """`python -m moto.server` on a free port of 127.0.0.1, in its own process: the
    test process forks workers, and a server's threads in it could hold a lock the
    children inherit."""

    def __init__(self, env: dict | None = None):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                      str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.url + "/moto-api/", timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("the moto server did not start") from None
                time.sleep(0.1)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def s3_server():
    """One server for the module's tests (starting one takes ~1-2 s), emptied before each."""
    server = MotoServer()
    yield server
    server.stop()


def _s3(monkeypatch, server):
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    opts = {"client_kwargs": {"endpoint_url": server.url},
            "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 5}}
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
    fs.mkdir(BUCKET)
    return fs, opts, server


@pytest.fixture
def s3(monkeypatch, s3_server):
    """An empty S3 server on loopback: (filesystem to put objects with, storage_options, server)."""
    urllib.request.urlopen(urllib.request.Request(s3_server.url + "/moto-api/reset", method="POST"),
                           timeout=10).close()
    return _s3(monkeypatch, s3_server)


@pytest.fixture
def s3_of_its_own(monkeypatch):
    """`s3` on a server of the test's own, which it may stop."""
    server = MotoServer()
    try:
        yield _s3(monkeypatch, server)
    finally:
        server.stop()


def _tar_bytes(s: int, n: int, pad: int = 0) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(n):
            members = [(f"{s}-{i:04d}.json", json.dumps({"s": s, "i": i}).encode())]
            if pad and i == 0:
                members.append((f"{s}-{i:04d}.pad", os.urandom(pad)))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def decode(fields):
    meta = json.loads(fields["json"])
    return {"s": meta["s"], "i": meta["i"], "noise": shmfeed.rng().integers(1 << 30)}


def _put_shards(fs, pad: int = 0) -> list[int]:
    sizes = []
    for s, n in enumerate(LENGTHS):
        data = _tar_bytes(s, n, pad if s == 0 else 0)
        fs.pipe(f"{BUCKET}/shards/train-{s}.tar", data)
        sizes.append(len(data))
    return sizes


def _epoch(loader):
    return [(b["s"].tolist(), b["i"].tolist(), b["noise"].tolist()) for b in loader]


def _local_reference(tmp_path, pad: int = 0):
    paths = []
    for s, n in enumerate(LENGTHS):
        p = tmp_path / f"local-{s}.tar"
        p.write_bytes(_tar_bytes(s, n, pad if s == 0 else 0))
        paths.append(str(p))
    with shmfeed.Loader(TarShards(paths, decode), batch_size=2, num_workers=0, seed=1) as loader:
        return _epoch(loader)


def _cache_files(d) -> dict:
    return {e.name: e.stat().st_size for e in os.scandir(d) if not e.name.endswith(".lock")
            and not e.name.startswith(".")}


def test_tar_shards_from_s3_give_the_local_stream_each_downloaded_once(s3, tmp_path):
    fs, opts, _ = s3
    sizes = _put_shards(fs)
    cache = ObjectCache(tmp_path / "cache", max_bytes=10 << 20, storage_options=opts)
    src = TarShards(f"s3://{BUCKET}/shards/train-*.tar", decode, cache=cache)
    assert src.paths == [f"s3://{BUCKET}/shards/train-{s}.tar" for s in range(3)]
    ref = _local_reference(tmp_path)
    for _ in range(2):  # two loaders on one cache: the second downloads nothing
        with shmfeed.Loader(src, batch_size=2, num_workers=2, seed=1) as loader:
            assert _epoch(loader) == ref
        files = _cache_files(tmp_path / "cache")
        assert sorted(files.values()) == sorted(sizes)  # complete files, no .part
        stamps = {n: os.stat(tmp_path / "cache" / n).st_ino for n in files}
    assert stamps == {n: os.stat(tmp_path / "cache" / n).st_ino for n in _cache_files(tmp_path / "cache")}


def test_parquet_from_s3_reads_footers_remotely_and_rows_through_the_cache(s3, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    fs, opts, _ = s3
    for k in range(2):
        buf = io.BytesIO()
        pq.write_table(pa.table({"y": np.arange(30 * k, 30 * k + 30)}), buf, row_group_size=7)
        fs.pipe(f"{BUCKET}/pq/part-{k}.parquet", buf.getvalue())
    cache = ObjectCache(tmp_path / "cache", max_bytes=1 << 20, storage_options=opts)
    src = Parquet(f"s3://{BUCKET}/pq/*.parquet", cache=cache)
    assert len(src) == 60 and src.num_row_groups == 10
    with shmfeed.Loader(src, batch_size=8, num_workers=2, shuffle=True) as loader:
        assert sorted(int(y) for b in loader for y in b["y"]) == list(range(60))
    assert len(_cache_files(tmp_path / "cache")) == 2


def _holder(pids, suffix):
    """The pid among `pids` with a file ending in `suffix` open, if any."""
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}").endswith(suffix):
                    return pid
        except OSError:
            continue
    return None


@pytest.mark.integration
def test_a_worker_killed_mid_download_leaves_no_partial_file_and_every_sample_comes_once(s3, tmp_path):
    fs, opts, _ = s3
    pad = 24 << 20  # shard 0 downloads in 96 requests of 256 KiB: time to kill its reader
    sizes = _put_shards(fs, pad=pad)
    cache = ObjectCache(tmp_path / "cache", max_bytes=64 << 20, storage_options=opts,
                        block_bytes=256 << 10)
    ref = _local_reference(tmp_path, pad=pad)
    with shmfeed.Loader(TarShards(f"s3://{BUCKET}/shards/train-*.tar", decode, cache=cache),
                        batch_size=2, num_workers=2, seed=1, timeout_s=60) as loader:
        it = iter(loader)
        deadline = time.monotonic() + 30
        victim = None
        while victim is None and time.monotonic() < deadline:
            victim = _holder(loader.worker_pids, ".tar.part")
            time.sleep(0.002)
        assert victim is not None, "never saw the download in progress"
        os.kill(victim, signal.SIGKILL)
        got = _epoch(it)
        assert loader.stats().restarts == 1
    assert got == ref
    assert sorted(_cache_files(tmp_path / "cache").values()) == sorted(sizes)


@pytest.mark.integration
def test_a_server_that_is_down_is_an_error_after_retries(s3_of_its_own, tmp_path):
    fs, opts, server = s3_of_its_own
    _put_shards(fs)
    cache = ObjectCache(tmp_path / "cache", max_bytes=1 << 20, storage_options=opts, retries=1,
                        retry_wait_s=0.05)
    src = TarShards(f"s3://{BUCKET}/shards/train-*.tar", decode, cache=cache)
    server.stop()
    t0 = time.monotonic()
    with pytest.raises(SourceFileError, match=r"train-0.tar': downloading it failed 2 times, last with "
                       r"EndpointConnectionError.*Check that the server is up"):
        shmfeed.Loader(src, batch_size=2, num_workers=2)  # it reads the first sample for the spec
    assert time.monotonic() - t0 < 30
    assert _cache_files(tmp_path / "cache") == {}  # no partial file left


def test_an_object_gone_mid_run_is_an_error_in_batch_order_after_every_earlier_batch(s3, tmp_path):
    fs, opts, _ = s3
    _put_shards(fs)
    cache = ObjectCache(tmp_path / "cache", max_bytes=1 << 20, storage_options=opts, retries=1,
                        retry_wait_s=0.05)
    src = TarShards(f"s3://{BUCKET}/shards/train-*.tar", decode, cache=cache)
    fs.rm(f"{BUCKET}/shards/train-2.tar")
    got = []
    with shmfeed.Loader(src, batch_size=2, num_workers=2, seed=1) as loader:
        with pytest.raises(SourceFileError, match=r"'s3://data/shards/train-2.tar': no such object"):
            for b in loader:
                got.append(b["s"].tolist())
    assert got == [[0, 0], [1, 1]]  # batch 2 (shard 2's first) is the error


def test_a_missing_object_is_named(s3, tmp_path):
    _, opts, _ = s3
    cache = ObjectCache(tmp_path / "cache", max_bytes=1 << 20, storage_options=opts)
    with pytest.raises(SourceFileError, match=r"'s3://data/nope.tar': no such object"):
        TarShards(f"s3://{BUCKET}/nope.tar", decode, cache=cache)
    with pytest.raises(SourceFileError, match=r"'s3://no-bucket/a.tar': no such object .*check the bucket"):
        TarShards("s3://no-bucket/a.tar", decode, cache=cache)
    with pytest.raises(shmfeed.SpecError, match=r"matches no object"):
        TarShards(f"s3://{BUCKET}/nope-*.tar", decode, cache=cache)
    with pytest.raises(shmfeed.SpecError, match=r"is remote: give a local cache"):
        TarShards(f"s3://{BUCKET}/nope.tar", decode)


def test_a_truncated_object_is_an_error_naming_its_url_not_the_cached_copy(s3, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    fs, opts, _ = s3
    fs.pipe(f"{BUCKET}/bad/train-0.tar", _tar_bytes(0, 4)[: 512 * 3 + 10])  # inside the second member
    buf = io.BytesIO()
    pq.write_table(pa.table({"y": np.arange(10)}), buf)
    fs.pipe(f"{BUCKET}/bad/part-0.parquet", buf.getvalue()[:-20])  # the footer cut
    cache = ObjectCache(tmp_path / "cache", max_bytes=1 << 20, storage_options=opts)
    src = TarShards(f"s3://{BUCKET}/bad/*.tar", decode, cache=cache)
    with pytest.raises(SourceFileError, match=r"tar shard 's3://data/bad/train-0.tar': cannot read it at "
                       r"or just after member '0-0001.json'.*truncated or corrupt"):
        shmfeed.Loader(src, batch_size=1, num_workers=1)  # the first sample, read for the spec
    with pytest.raises(SourceFileError, match=r"cannot read the Parquet footer of 's3://data/bad/part-0.parquet'"):
        Parquet(f"s3://{BUCKET}/bad/*.parquet", cache=cache)


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_the_cache_evicts_the_least_recently_used_object_nobody_reads(s3, tmp_path):
    fs, opts, _ = s3
    for name in "abcd":
        fs.pipe(f"{BUCKET}/{name}.bin", name.encode() * 1000)
    cache = ObjectCache(tmp_path / "cache", max_bytes=2500, storage_options=opts)
    url = f"s3://{BUCKET}/{{}}.bin".format
    for name in "ab":
        with cache.open(url(name)) as obj:
            assert _read(obj.path) == name.encode() * 1000
    time.sleep(0.01)
    cache.open(url("a")).close()  # a is now more recent than b
    with cache.open(url("c")) as c:  # room for two: b goes
        assert sorted(n[-5:] for n in _cache_files(tmp_path / "cache")) == ["a.bin", "c.bin"]
        with cache.open(url("a")):  # a and c both being read: d finds no room
            with pytest.raises(SourceFileError, match=r"cache .* is full: 's3://data/d.bin' needs 1000 bytes, "
                               r"2000 of `max_bytes`=2500 are taken \(2000 by objects being read"):
                cache.open(url("d"))
        assert _read(c.path) == b"c" * 1000
    assert sum(_cache_files(tmp_path / "cache").values()) <= 2500
    with pytest.raises(SourceFileError, match=r"is 1000 bytes, more than the whole cache"):
        ObjectCache(tmp_path / "small", max_bytes=999, storage_options=opts).open(url("d"))


def test_a_cache_directory_that_cannot_be_written_is_refused_at_construction():
    ro = "/sys/kernel"  # sysfs: not writable, even by root
    if not os.path.isdir(ro) or os.access(ro, os.W_OK) and _writable(ro):
        pytest.skip("no read-only directory here")
    with pytest.raises(shmfeed.SpecError, match=r"cannot write to `cache_dir` '/sys/kernel'"):
        ObjectCache(ro, max_bytes=1 << 20)


def _writable(d) -> bool:
    try:
        with open(os.path.join(d, ".shmfeed-probe"), "wb"):
            pass
    except OSError:
        return False
    os.unlink(os.path.join(d, ".shmfeed-probe"))
    return True


def test_array_record_files_from_s3_are_read_through_the_cache(s3, tmp_path):
    ar = pytest.importorskip("array_record.python.array_record_module")
    fs, opts, _ = s3
    for k in range(2):
        local = tmp_path / f"part-{k}.array_record"
        w = ar.ArrayRecordWriter(str(local), "group_size:1")
        for i in range(10 * k, 10 * k + 10):
            w.write(json.dumps({"i": i}).encode())
        w.close()
        fs.put(str(local), f"{BUCKET}/ar/part-{k}.array_record")
    cache = ObjectCache(tmp_path / "cache", max_bytes=4 << 20, storage_options=opts)
    src = ArrayRecord(f"s3://{BUCKET}/ar/*.array_record", decode=lambda b: json.loads(b)["i"], cache=cache)
    assert len(src) == 20
    with shmfeed.Loader(src, batch_size=4, num_workers=2, shuffle=True) as loader:
        assert sorted(int(i) for b in loader for i in b) == list(range(20))
    assert len(_cache_files(tmp_path / "cache")) == 2


SIX = [3, 2, 4, 3, 2, 3]  # samples of each of six shards


def _put_six(fs) -> None:
    for s, n in enumerate(SIX):
        fs.pipe(f"{BUCKET}/six/train-{s}.tar", _tar_bytes(s, n))


@pytest.mark.parametrize("prefetch", [2, 0])
def test_workers_download_their_next_shards_ahead_so_no_read_waits_on_its_own_download(s3, tmp_path,
                                                                                       prefetch):
    fs, opts, _ = s3
    _put_six(fs)
    cache = ObjectCache(tmp_path / "cache", max_bytes=1 << 20, storage_options=opts, prefetch=prefetch)

    def counted(fields):  # what this worker had downloaded, and how, when it decoded the sample
        return {"s": json.loads(fields["json"])["s"], "pid": os.getpid(), **cache.downloads()}

    src = TarShards(f"s3://{BUCKET}/six/train-*.tar", counted, cache=cache)
    # The training process reads shards 0 and 1 (the batch spec, the shards-differ check):
    # each worker (shards 0, 2, 4 / 1, 3, 5) finds its first shard cached.
    with shmfeed.Loader(src, batch_size=4, num_workers=2, seed=1) as loader:
        rows = [dict(zip(b, vals)) for b in loader for vals in zip(*(b[k].tolist() for k in b))]
    assert sorted(r["s"] for r in rows) == [s for s, n in enumerate(SIX) for _ in range(n)]
    last = {}
    for r in rows:  # per worker, its counts at its last sample
        last[r["pid"]] = max(last.get(r["pid"], (0, 0)), (r["read"], r["prefetched"]))
    assert len(last) == 2
    if prefetch:  # shards 2 and 4 (3 and 5) were fetched ahead while 0 (1) was read
        assert sorted(last.values()) == [(0, 2), (0, 2)]
    else:
        assert sorted(last.values()) == [(2, 0), (2, 0)]
    assert len(_cache_files(tmp_path / "cache")) == 6


def test_a_prefetch_never_evicts_what_this_run_fetched_and_never_exceeds_the_budget(s3, tmp_path,
                                                                                     monkeypatch):
    from shmfeed.sources import _objstore
    fs, opts, _ = s3
    for name in "abcde":
        fs.pipe(f"{BUCKET}/{name}.bin", name.encode() * 1000)
    url = f"s3://{BUCKET}/{{}}.bin".format
    ObjectCache(tmp_path / "cache", max_bytes=2500, storage_options=opts).open(url("e")).close()
    time.sleep(0.01)  # e: an earlier run's, older than the cache below
    cache = ObjectCache(tmp_path / "cache", max_bytes=2500, storage_options=opts, prefetch=1)
    monkeypatch.setattr(_objstore, "_prefetch_pid", os.getpid())  # as in a worker
    ahead = {n: [(url(n), cache.info(url(n)))] for n in "bc"}
    with cache.open(url("a"), ahead=ahead["b"]):  # b fits once the stale e goes
        with cache.open(url("b"), ahead=ahead["c"]) as b:  # waits for b's prefetch: found whole
            assert _read(b.path) == b"b" * 1000
            assert sorted(n[-5:] for n in _cache_files(tmp_path / "cache")) == ["a.bin", "b.bin"]
        # c's prefetch would have evicted a (being read) or b (read in this run): skipped.
        with cache.open(url("c")) as c:  # so c's read downloads it, evicting b
            assert _read(c.path) == b"c" * 1000
            assert sorted(n[-5:] for n in _cache_files(tmp_path / "cache")) == ["a.bin", "c.bin"]
        counts = cache.downloads()
        assert (counts["read"], counts["prefetched"]) == (2, 1)


def _blocked_on(path: str) -> bool:
    """Whether some process or thread waits for an flock on `path` (/proc/locks shows
    a waiter as `-> FLOCK ...`, with the file's device:inode)."""
    ino = os.stat(path).st_ino
    with open("/proc/locks") as f:
        return any("->" in line and line.split()[-3].endswith(f":{ino}") for line in f)


def test_a_read_that_finds_its_object_being_downloaded_counts_a_wait(s3, tmp_path):
    import fcntl
    import threading
    fs, opts, _ = s3
    fs.pipe(f"{BUCKET}/w.bin", b"w" * 1000)
    url = f"s3://{BUCKET}/w.bin"
    cache = ObjectCache(tmp_path / "cache", max_bytes=10_000, storage_options=opts, prefetch=0)
    lock = cache._entry(url, cache.info(url)[1]) + ".lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)  # as another process downloading it
    got = []
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        def read() -> None:
            with cache.open(url) as obj:
                got.append(_read(obj.path))

        reader = threading.Thread(target=read)
        reader.start()
        deadline = time.monotonic() + 10
        while not _blocked_on(lock):
            assert time.monotonic() < deadline, "the read never waited on the lock"
            time.sleep(0.01)
    finally:
        os.close(fd)  # the "download" ends without a file: the read fetches it itself
    reader.join(timeout=30)
    assert got == [b"w" * 1000]
    assert cache.downloads() == {"read": 1, "prefetched": 0, "waited": 1}


class Hostile:
    """tests/_hostile.py in its own process, in front of a moto server: `mode(...)`
    makes it forward, stall, answer 503 or deny."""

    def __init__(self, upstream_port: int, mode_file):
        self.mode_file = mode_file
        self.mode("pass")
        here = os.path.dirname(os.path.abspath(__file__))
        self.proc = subprocess.Popen([sys.executable, os.path.join(here, "_hostile.py"), str(upstream_port),
                                      str(mode_file)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        line = self.proc.stdout.readline()  # its port, once it listens (the test's timeout bounds this)
        self.proc.stdout.close()
        if not line.strip():
            self.stop()
            raise RuntimeError("the proxy did not start")
        self.url = f"http://127.0.0.1:{int(line)}"

    def mode(self, text: str) -> None:
        tmp = f"{self.mode_file}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, self.mode_file)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def hostile(s3, tmp_path):
    """(filesystem straight to moto, with the shards put; storage_options through the proxy; proxy)."""
    fs, opts, server = s3
    _put_shards(fs)
    proxy = Hostile(server.port, tmp_path / "mode")
    try:
        yield fs, {"client_kwargs": {"endpoint_url": proxy.url}}, proxy
    finally:
        proxy.stop()


SHARDS = f"s3://{BUCKET}/shards/train-*.tar"


def test_a_server_that_stalls_is_an_error_naming_the_url_after_retries_times_the_timeout(hostile, tmp_path):
    _, opts, proxy = hostile
    cache = ObjectCache(tmp_path / "cache", max_bytes=1 << 20, storage_options=opts, retries=1,
                        retry_wait_s=0.05, timeout_s=0.5)
    src = TarShards(SHARDS, decode, cache=cache)
    proxy.mode("stall")
    t0 = time.monotonic()
    with pytest.raises(SourceFileError, match=r"'s3://data/shards/train-0.tar': downloading it failed 2 times, "
                       r"last with ReadTimeoutError.*Check that the server is up"):
        shmfeed.Loader(src, batch_size=2, num_workers=2)  # it reads the first sample for the spec
    assert time.monotonic() - t0 < 2 * 0.5 + 5  # two tries of 0.5 s (not s3fs's 5 x botocore's 5 each)
    assert _cache_files(tmp_path / "cache") == {}


def test_a_server_that_answers_503_is_retried_and_read_once_it_recovers(hostile, tmp_path):
    _, opts, proxy = hostile
    ref = _local_reference(tmp_path)
    proxy.mode("fail 2")  # one more than one retry: an error
    cache = ObjectCache(tmp_path / "cache", max_bytes=1 << 20, storage_options=opts, retries=1,
                        retry_wait_s=0.05)
    with pytest.raises(SourceFileError, match=r"'s3://data/shards/train-\*.tar': listing failed 2 times, "
                       r"last with .*Service ?Unavailable"):
        TarShards(SHARDS, decode, cache=cache)
    proxy.mode("fail 3")  # fewer than three retries: the listing gets through
    cache = ObjectCache(tmp_path / "cache", max_bytes=1 << 20, storage_options=opts, retries=3,
                        retry_wait_s=0.05)
    src = TarShards(SHARDS, decode, cache=cache)
    with shmfeed.Loader(src, batch_size=2, num_workers=2, seed=1) as loader:
        assert _epoch(loader) == ref


def test_wrong_credentials_are_an_error_naming_the_object_and_what_to_check(monkeypatch, tmp_path):
    boto3 = pytest.importorskip("boto3")
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    # moto checks credentials against its IAM users after the first two requests (the setup's).
    server = MotoServer(env={"INITIAL_NO_AUTH_ACTION_COUNT": "2"})
    try:
        client = boto3.client("s3", endpoint_url=server.url)
        client.create_bucket(Bucket=BUCKET)
        client.put_object(Bucket=BUCKET, Key="shards/train-0.tar", Body=_tar_bytes(0, 2))
        cache = ObjectCache(tmp_path / "cache", max_bytes=1 << 20, retries=1, retry_wait_s=0.05,
                            storage_options={"client_kwargs": {"endpoint_url": server.url}})
        checks = r"access denied \({}.*\); check the credentials \(`storage_options` key/secret, or the " \
                 r"environment's, e.g. AWS_ACCESS_KEY_ID"
        with pytest.raises(SourceFileError, match=r"'s3://data/shards/train-\*.tar': " + checks.format(
                "listing: The AWS Access Key Id you provided does not exist in our records")):
            TarShards(SHARDS, decode, cache=cache)
        with pytest.raises(SourceFileError, match=r"'s3://data/shards/train-0.tar': " + checks.format(
                "reading its size: ")):
            TarShards(f"s3://{BUCKET}/shards/train-0.tar", decode, cache=cache)
    finally:
        server.stop()
    assert _cache_files(tmp_path / "cache") == {}


@pytest.mark.parametrize("mode, says", [
    ("stall", r"downloading it failed 2 times, last with ReadTimeoutError"),
    ("fail 100", r"downloading it failed 2 times, last with .*Service ?Unavailable"),
    ("deny", r"access denied \(downloading it: "),
])
def test_a_hostile_server_met_mid_epoch_by_a_worker_is_an_error_in_batch_order_and_loses_nothing(
        hostile, tmp_path, mode, says):
    _, opts, proxy = hostile
    ref = _local_reference(tmp_path)
    cache = ObjectCache(tmp_path / "cache", max_bytes=1 << 20, storage_options=opts, retries=1,
                        retry_wait_s=0.05, timeout_s=0.5)
    src = TarShards(SHARDS, decode, cache=cache)
    got = []
    with shmfeed.Loader(src, batch_size=2, num_workers=2, seed=1) as loader:  # shards 0 and 1 read here
        proxy.mode(mode)  # shard 2, worker 0's next, is fetched from a server gone bad
        with pytest.raises(SourceFileError, match=r"'s3://data/shards/train-2.tar': " + says):
            for b in loader:
                got.append(b["s"].tolist())
    assert got == [[0, 0], [1, 1]]  # batch 2 (shard 2's first) is the error
    assert sorted(n.rsplit("-", 1)[-1] for n in _cache_files(tmp_path / "cache")) == ["0.tar", "1.tar"]
    proxy.mode("pass")  # the server is back: the same source gives the whole stream
    with shmfeed.Loader(src, batch_size=2, num_workers=2, seed=1) as loader:
        assert _epoch(loader) == ref


@pytest.mark.parametrize("glob", [True, False], ids=["pattern", "url"])
def test_a_server_that_stalls_under_a_parquet_footer_is_named_as_such_not_a_corrupt_file(hostile, tmp_path, glob):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    fs, opts, proxy = hostile
    buf = io.BytesIO()
    pq.write_table(pa.table({"y": np.arange(30)}), buf, row_group_size=7)
    fs.pipe(f"{BUCKET}/pq/part-0.parquet", buf.getvalue())
    cache = ObjectCache(tmp_path / "cache", max_bytes=1 << 20, storage_options=opts, retries=1,
                        retry_wait_s=0.05, timeout_s=0.5)
    proxy.mode("stall")
    paths = f"s3://{BUCKET}/pq/*.parquet" if glob else [f"s3://{BUCKET}/pq/part-0.parquet"]
    with pytest.raises(SourceFileError, match=r"failed 2 times, last with .*Check that the server is up") as err:
        Parquet(paths, cache=cache)
    assert "corrupt" not in str(err.value)
    proxy.mode("pass")
    assert len(Parquet(paths, cache=cache)) == 30
