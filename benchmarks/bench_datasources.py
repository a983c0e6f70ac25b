"""Rows/s of `shmfeed.sources.Parquet` against pyarrow's own reader in one process
(issue 29), and of `shmfeed.sources.ArrayRecord` against the `array_record` reader
(`--arrayrecord`), measured with the public API only (`PYTHONPATH=TREE python
benchmarks/bench_datasources.py`).

The data: `--rows` rows of a float32[--width] fixed-size list column and an int64
label, in one Parquet file with row groups of `--group` rows (snappy), written to a
temporary directory (in the page cache: this measures decoding, not the disk).  One
epoch each, alternating `--rounds` times, median reported:

- shmfeed: `Loader(Parquet(path), batch_size, num_workers=--workers, shuffle=--shuffle)`,
  the loop touching every batch (its first byte of each leaf), timed from the first
  batch on (the pool's start is `bench_startup.py`'s business);
- pyarrow, one thread: `ParquetFile.iter_batches(batch_size, use_threads=False)` with each
  batch converted to numpy (`to_numpy` of the flattened list, reshaped), in order;
- pyarrow, threaded: the same with `use_threads=True` (shown alongside).

With `--arrayrecord`, the same rows as ArrayRecord records (the float32 row's bytes
then the label's), decoded by `np.frombuffer`: shmfeed's `ArrayRecord` with workers
against `ArrayRecordReader.read(start, end)` in one process, decoded alike.

With `--s3`, the same rows as `--shards` tar shards (a `.npy` and a `.json` per row) in
a bucket of a moto S3 server started on 127.0.0.1, read by `TarShards` through an
`ObjectCache` (`max_bytes` twice the data): whole epochs from the Loader's construction
on (downloads are the point), with a cold cache and `prefetch=--prefetch`, a cold cache
and `prefetch=0` (each object when first read), and a warm cache; the bytes in the
cache directory are checked against `max_bytes` after each epoch.  Loopback has no
latency: `--latency-ms` makes each request to the server wait that long first (this
script as a delaying proxy, in a process of its own), as a remote store does.

Goal (issue 29): shmfeed with 2 workers >= 1.5x pyarrow one-thread where decoding
dominates.  Timings on a loaded machine mean nothing; run it on a quiet one.

    python benchmarks/bench_datasources.py [--rows 200000] [--width 64] [--group 4096]
        [--batch 256] [--workers 2] [--rounds 3] [--shuffle] [--arrayrecord] [--json OUT]
    python benchmarks/bench_datasources.py --s3 [--shards 16] [--prefetch 2] [--latency-ms 20] ...
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import shmfeed
from shmfeed.sources import Parquet


def write(path: str, rows: int, width: int, group: int) -> int:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, width), dtype=np.float32)
    table = pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), width),
                      "y": pa.array(np.arange(rows), pa.int64())})
    pq.write_table(table, path, row_group_size=group, compression="snappy")
    return os.path.getsize(path)


def run_shmfeed(path: str, batch: int, workers: int, shuffle: bool) -> float:
    with shmfeed.Loader(Parquet(path), batch_size=batch, num_workers=workers, shuffle=shuffle) as loader:
        t0, rows = None, 0
        for b in loader:  # timed from the first batch: the pool's start is not reading
            if t0 is None:
                t0 = time.perf_counter()
            else:
                rows += len(b["y"])
            _ = b["x"][0, 0] + b["y"][0]
        return rows / (time.perf_counter() - t0)


def run_pyarrow(path: str, batch: int, threads: bool) -> float:
    t0, rows = time.perf_counter(), 0
    pf = pq.ParquetFile(path)
    for rb in pf.iter_batches(batch_size=batch, use_threads=threads):
        col = rb.column("x")
        x = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), -1)
        y = rb.column("y").to_numpy()
        rows += len(y)
        _ = x[0, 0] + y[0]
    return rows / (time.perf_counter() - t0)


def write_arrayrecord(path: str, rows: int, width: int) -> int:
    from array_record.python.array_record_module import ArrayRecordWriter
    rng = np.random.default_rng(0)
    w = ArrayRecordWriter(path, "group_size:1")
    for i in range(rows):
        w.write(rng.standard_normal(width, dtype=np.float32).tobytes() + np.int64(i).tobytes())
    w.close()
    return os.path.getsize(path)


def decode_record(b: bytes) -> dict:
    return {"x": np.frombuffer(b, np.float32, count=(len(b) - 8) // 4), "y": np.frombuffer(b, np.int64, offset=len(b) - 8)[0]}


def run_shmfeed_arrayrecord(path: str, batch: int, workers: int, shuffle: bool) -> float:
    from shmfeed.sources import ArrayRecord
    with shmfeed.Loader(ArrayRecord(path, decode=decode_record), batch_size=batch, num_workers=workers,
                        shuffle=shuffle) as loader:
        t0, rows = None, 0
        for b in loader:
            if t0 is None:
                t0 = time.perf_counter()
            else:
                rows += len(b["y"])
            _ = b["x"][0, 0] + b["y"][0]
        return rows / (time.perf_counter() - t0)


def run_arrayrecord(path: str, batch: int) -> float:
    from array_record.python.array_record_module import ArrayRecordReader
    reader = ArrayRecordReader(path, "readahead_buffer_size:0,max_parallelism:0")
    n = reader.num_records()
    t0, rows = time.perf_counter(), 0
    for start in range(0, n, batch):
        samples = [decode_record(r) for r in reader.read(start, min(start + batch, n))]
        x, y = np.stack([s["x"] for s in samples]), np.array([s["y"] for s in samples])
        rows += len(y)
        _ = x[0, 0] + y[0]
    reader.close()
    return rows / (time.perf_counter() - t0)


class MotoServer:
    """`python -m moto.server` on a free port of 127.0.0.1 and, with a latency, this
    script as a proxy in front of it (`--proxy-for PORT`, its own process: the training
    process forks the Loader's supervisor and should run no threads of ours)."""

    def __init__(self, latency_ms: float):
        import socket
        import subprocess
        import sys
        import urllib.request
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.procs = [subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.procs[0].poll() is not None:
                    self.stop()
                    raise RuntimeError("the moto server did not start") from None
                time.sleep(0.1)
        self.url = f"http://127.0.0.1:{port}"
        if latency_ms > 0:
            proxy = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--proxy-for", str(port),
                                      "--latency-ms", str(latency_ms)], stdout=subprocess.PIPE)
            self.procs.append(proxy)
            assert proxy.stdout is not None
            self.url = f"http://127.0.0.1:{int(proxy.stdout.readline())}"
            proxy.stdout.close()

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


def delaying_proxy(upstream: int, latency_s: float) -> None:
    """Forward connections to 127.0.0.1:`upstream`, each request `latency_s` late (the
    round trip to a far server); print the port, serve until killed."""
    import socket
    import threading

    def pipe(src: socket.socket, dst: socket.socket, delay: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if delay and data[:4] in (b"GET ", b"HEAD", b"PUT ", b"POST"):
                    time.sleep(latency_s)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            dst.close()

    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(64)
    print(lsock.getsockname()[1], flush=True)
    while True:
        conn, _ = lsock.accept()
        up = socket.create_connection(("127.0.0.1", upstream))
        threading.Thread(target=pipe, args=(conn, up, True), daemon=True).start()
        threading.Thread(target=pipe, args=(up, conn, False), daemon=True).start()


def write_shards(fs, bucket: str, shards: int, rows: int, width: int) -> int:
    import io
    import tarfile
    rng = np.random.default_rng(0)
    total = 0
    for s in range(shards):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i in range(s * rows // shards, (s + 1) * rows // shards):
                npy = io.BytesIO()
                np.save(npy, rng.standard_normal(width, dtype=np.float32))
                for name, data in ((f"{i:09d}.x.npy", npy.getvalue()), (f"{i:09d}.json", json.dumps({"y": i}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        fs.pipe(f"{bucket}/train-{s:05d}.tar", buf.getvalue())
        total += len(buf.getvalue())
    return total


def decode_tar(fields: dict) -> dict:
    import io
    return {"x": np.load(io.BytesIO(fields["x.npy"])), "y": json.loads(fields["json"])["y"]}


def run_s3(opts: dict, cache_dir: str, max_bytes: int, prefetch: int, batch: int, workers: int) -> float:
    from shmfeed.sources import ObjectCache, TarShards
    t0 = time.perf_counter()
    cache = ObjectCache(cache_dir, max_bytes=max_bytes, storage_options=opts, prefetch=prefetch)
    rows = 0
    with shmfeed.Loader(TarShards("s3://bench/train-*.tar", decode_tar, cache=cache), batch_size=batch,
                        num_workers=workers) as loader:
        for b in loader:
            rows += len(b["y"])
            _ = b["x"][0, 0] + b["y"][0]
    rate = rows / (time.perf_counter() - t0)
    used = sum(e.stat().st_size for e in os.scandir(cache_dir) if not e.name.endswith(".lock"))
    if used > max_bytes:
        raise AssertionError(f"the cache holds {used} bytes, over its `max_bytes`={max_bytes}")
    return rate


def main_s3(args: argparse.Namespace) -> None:
    import shutil

    import s3fs
    for k, v in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(k, v)
    server = MotoServer(args.latency_ms)
    try:
        opts = {"client_kwargs": {"endpoint_url": server.url}}
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
        fs.mkdir("bench")
        size = write_shards(fs, "bench", args.shards, args.rows, args.width)
        runs: dict[str, list[float]] = {f"cold, prefetch={args.prefetch}": [], "cold, prefetch=0": [],
                                        "warm": []}
        with tempfile.TemporaryDirectory() as tmp:
            cache_dir = os.path.join(tmp, "cache")
            for _ in range(args.rounds):
                for prefetch in (args.prefetch, 0):
                    shutil.rmtree(cache_dir, ignore_errors=True)
                    runs[f"cold, prefetch={prefetch}"].append(
                        run_s3(opts, cache_dir, 2 * size, prefetch, args.batch, args.workers))
                runs["warm"].append(run_s3(opts, cache_dir, 2 * size, args.prefetch, args.batch, args.workers))
    finally:
        server.stop()
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(f"{args.rows} rows x float32[{args.width}] in {args.shards} tar shards on a moto S3 server "
          f"(+{args.latency_ms} ms a request), {size / 1e6:.1f} MB, batch {args.batch}, {args.workers} workers, "
          f"whole epochs from the Loader's construction, cpus={os.cpu_count()}")
    for k, v in med.items():
        print(f"  {k:28s} {v:12,.0f} rows/s {v * size / args.rows / 1e6:8.1f} MB/s (object bytes)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "object_bytes": size, "rows_per_s": med, "runs": runs}, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--group", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shuffle", action="store_true")
    ap.add_argument("--arrayrecord", action="store_true", help="ArrayRecord instead of Parquet")
    ap.add_argument("--s3", action="store_true", help="tar shards from a moto S3 server, cold and warm cache")
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--proxy-for", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.proxy_for:
        return delaying_proxy(args.proxy_for, args.latency_ms / 1000)
    if args.s3:
        return main_s3(args)
    with tempfile.TemporaryDirectory() as tmp:
        runs: dict[str, list[float]]
        if args.arrayrecord:
            path = os.path.join(tmp, "data.array_record")
            size = write_arrayrecord(path, args.rows, args.width)
            runs, base = {"shmfeed": [], "array_record": []}, "array_record"
            for _ in range(args.rounds):
                runs["shmfeed"].append(run_shmfeed_arrayrecord(path, args.batch, args.workers, args.shuffle))
                runs["array_record"].append(run_arrayrecord(path, args.batch))
        else:
            path = os.path.join(tmp, "data.parquet")
            size = write(path, args.rows, args.width, args.group)
            runs, base = {"shmfeed": [], "pyarrow-1thread": [], "pyarrow-threads": []}, "pyarrow-1thread"
            for _ in range(args.rounds):
                runs["shmfeed"].append(run_shmfeed(path, args.batch, args.workers, args.shuffle))
                runs["pyarrow-1thread"].append(run_pyarrow(path, args.batch, False))
                runs["pyarrow-threads"].append(run_pyarrow(path, args.batch, True))
    med = {k: statistics.median(v) for k, v in runs.items()}
    mb_per_row = size / args.rows / 1e6
    layout = "ArrayRecord records" if args.arrayrecord else f"Parquet, row groups of {args.group}"
    print(f"{args.rows} rows x float32[{args.width}], {layout}, batch {args.batch}, "
          f"file {size / 1e6:.1f} MB, shuffle={args.shuffle}, cpus={os.cpu_count()}")
    for k, v in med.items():
        print(f"  {k + (f' ({args.workers} workers)' if k == 'shmfeed' else ''):28s} {v:12,.0f} rows/s "
              f"{v * mb_per_row:8.1f} MB/s (file bytes)")
    print(f"  shmfeed / {base}: {med['shmfeed'] / med[base]:.2f}x (goal >= 1.5x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "file_bytes": size, "rows_per_s": med, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
