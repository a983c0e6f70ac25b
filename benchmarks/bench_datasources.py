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
script as a delaying proxy, in a process of its own), as a remote store does (a shard
of `BLOCK_BYTES` blocks is several requests).  Counted, not timed: per cold run, the
workers' reads that had to download their own shard and those that waited for a
download in progress (`ObjectCache.downloads()` at each worker's last sample); a
prefetch that pays leaves both at 0 (try `--latency-ms 150`).

Decode-dominated workloads (`--images parquet|arrayrecord|tar`), the shapes users'
data has: `--rows` (default 4,000) RGB images of `--image-size` pixels a side (smooth
gradients plus noise, `--image-format` jpeg or png, made here with Pillow) and an int64
label, decoded per row by `decode_image` (Pillow, to uint8[H, W, 3]) in the workers and,
for the reference, in one process after the format's own reader:

- parquet: a Hugging Face style Parquet file, the column `image` a struct {bytes, path}
  (row groups of `--group`, default 100 rows as `datasets` writes image sets), read by `Parquet(path, decode=...)`; the reference reads
  it with pyarrow (`iter_batches`, `use_threads=False`) and decodes each row;
- arrayrecord: records of the image's bytes then the label's 8, `ArrayRecord(path,
  decode=...)` against `ArrayRecordReader.read(start, end)` with the same decode;
- tar: `--shards` WebDataset-style tar shards (`000017.jpg` + `000017.json`) read by
  `TarShards(paths, decode)`; the reference reads the shards one after the other with
  `tarfile` (the members of a key grouped) and decodes each sample.

Goal (issue 29): shmfeed with 2 workers >= 1.5x the format's reader in one process
(pyarrow one thread) where decoding dominates.  Timings on a loaded machine mean
nothing; run it on a quiet one.

    python benchmarks/bench_datasources.py [--rows 200000] [--width 64] [--group 4096]
        [--batch 256] [--workers 2] [--rounds 3] [--shuffle] [--arrayrecord] [--json OUT]
    python benchmarks/bench_datasources.py --images parquet|arrayrecord|tar [--rows 4000]
        [--image-size 96] [--image-format jpeg] [--batch 64] [--group 100] [--shards 8] [--shuffle] ...
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


def make_images(rows: int, size: int, fmt: str) -> list[bytes]:
    """`rows` encoded images (`fmt`: jpeg or png), each its own (a Parquet writer would
    dictionary-encode repeated ones): smooth gradients with noise, so that they compress
    and decode like photos, not like noise or a flat colour."""
    import io

    from PIL import Image
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    distinct = []
    for k in range(rows):
        a, b, c = rng.uniform(0, 255, 3)
        img = np.stack([a * xx + (255 - a) * yy, b * yy + c * xx * yy, (c + 80 * np.sin(6 * xx + k)) % 255], -1)
        img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format=fmt.upper(), **({"quality": 90} if fmt == "jpeg" else {}))
        distinct.append(buf.getvalue())
    return distinct


def decode_image(data: bytes) -> np.ndarray:
    import io

    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def decode_parquet_row(row: dict) -> dict:
    return {"image": decode_image(row["image"]["bytes"]), "label": row["label"]}


def decode_image_record(b: bytes) -> dict:
    return {"image": decode_image(b[:-8]), "label": np.frombuffer(b, np.int64, offset=len(b) - 8)[0]}


def decode_tar_sample(fields: dict) -> dict:
    return {"image": decode_image(fields["jpg"]), "label": json.loads(fields["json"])["label"]}


def time_batches(loader, key: str = "label") -> float:
    """Rows/s of a loop touching every batch, from the first batch on (the pool's start
    is `bench_startup.py`'s business)."""
    t0, rows = None, 0
    for b in loader:
        if t0 is None:
            t0 = time.perf_counter()
        else:
            rows += len(b[key])
        _ = b["image"][0, 0, 0] + b[key][0]
    return rows / (time.perf_counter() - t0)


def stacked(samples: list[dict]) -> float:
    """What a batch costs a one-process reader besides decoding: stacking its rows."""
    x, y = np.stack([s["image"] for s in samples]), np.array([s["label"] for s in samples])
    return x[0, 0, 0] + y[0]


def write_image_data(kind: str, tmp: str, args: argparse.Namespace) -> tuple[list[str], int]:
    """The `--images` data set of `kind` under `tmp`: (paths, bytes)."""
    images = make_images(args.rows, args.image_size, "jpeg" if kind == "tar" else args.image_format)
    if kind == "parquet":
        path = os.path.join(tmp, "images.parquet")
        col = pa.array([{"bytes": b, "path": f"{i:09d}.img"} for i, b in enumerate(images)],
                       pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
        pq.write_table(pa.table({"image": col, "label": pa.array(np.arange(args.rows), pa.int64())}), path,
                       row_group_size=args.group, compression="snappy")
        return [path], os.path.getsize(path)
    if kind == "arrayrecord":
        from array_record.python.array_record_module import ArrayRecordWriter
        path = os.path.join(tmp, "images.array_record")
        w = ArrayRecordWriter(path, "group_size:1")
        for i, b in enumerate(images):
            w.write(b + np.int64(i).tobytes())
        w.close()
        return [path], os.path.getsize(path)
    import io
    import tarfile
    paths = []
    for s in range(args.shards):
        path = os.path.join(tmp, f"train-{s:05d}.tar")
        with tarfile.open(path, "w") as tar:
            for i in range(s * args.rows // args.shards, (s + 1) * args.rows // args.shards):
                for name, data in ((f"{i:09d}.jpg", images[i]), (f"{i:09d}.json", json.dumps({"label": i}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths, sum(os.path.getsize(p) for p in paths)


def run_images_shmfeed(kind: str, paths: list[str], args: argparse.Namespace) -> float:
    from shmfeed.sources import ArrayRecord, TarShards
    if kind == "parquet":
        source = Parquet(paths, decode=decode_parquet_row)
    elif kind == "arrayrecord":
        source = ArrayRecord(paths, decode=decode_image_record)
    else:
        source = TarShards(paths, decode_tar_sample)
    shuffle = args.shuffle and kind != "tar"  # a Stream's order is its shards'
    with shmfeed.Loader(source, batch_size=args.batch, num_workers=args.workers, shuffle=shuffle) as loader:
        return time_batches(loader)


def run_images_reader(kind: str, paths: list[str], batch: int) -> float:
    """The format's own reader in this process, each row decoded by the same function,
    in order (the whole epoch timed: a reader has no start to leave out)."""
    t0, rows = time.perf_counter(), 0
    if kind == "parquet":
        for path in paths:
            for rb in pq.ParquetFile(path).iter_batches(batch_size=batch, use_threads=False):
                images, labels = rb.column("image").field("bytes").to_pylist(), rb.column("label").to_numpy()
                stacked([{"image": decode_image(b), "label": y} for b, y in zip(images, labels)])
                rows += len(labels)
    elif kind == "arrayrecord":
        from array_record.python.array_record_module import ArrayRecordReader
        for path in paths:
            reader = ArrayRecordReader(path, "readahead_buffer_size:0,max_parallelism:0")
            n = reader.num_records()
            for start in range(0, n, batch):
                stacked([decode_image_record(r) for r in reader.read(start, min(start + batch, n))])
                rows += min(batch, n - start)
            reader.close()
    else:
        import tarfile
        samples: list[dict] = []
        for path in paths:
            fields: dict = {}
            with tarfile.open(path, "r|") as tar:
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    if fields and fields["__key__"] != key:
                        samples.append(decode_tar_sample(fields))
                        fields = {}
                    fields["__key__"] = key
                    fields[ext] = tar.extractfile(member).read()
                    if len(samples) == batch:
                        stacked(samples)
                        rows, samples = rows + batch, []
            if fields:
                samples.append(decode_tar_sample(fields))
        if samples:
            stacked(samples)
            rows += len(samples)
    return rows / (time.perf_counter() - t0)


def main_images(args: argparse.Namespace) -> None:
    kind = args.images
    args.rows = args.rows or 4000
    with tempfile.TemporaryDirectory() as tmp:
        paths, size = write_image_data(kind, tmp, args)
        base = {"parquet": "pyarrow-1thread + decode", "arrayrecord": "array_record + decode",
                "tar": "tarfile + decode"}[kind]
        runs: dict[str, list[float]] = {"shmfeed": [], base: []}
        for _ in range(args.rounds):
            runs["shmfeed"].append(run_images_shmfeed(kind, paths, args))
            runs[base].append(run_images_reader(kind, paths, args.batch))
    med = {k: statistics.median(v) for k, v in runs.items()}
    fmt = "jpeg" if kind == "tar" else args.image_format
    layout = {"parquet": f"Parquet (HF image struct), row groups of {args.group}", "arrayrecord": "ArrayRecord records",
              "tar": f"{args.shards} tar shards (jpg + json)"}[kind]
    print(f"{args.rows} rows x {fmt} {args.image_size}x{args.image_size} RGB + label, {layout}, decoded per row, "
          f"batch {args.batch}, {size / 1e6:.1f} MB, shuffle={args.shuffle and kind != 'tar'}, cpus={os.cpu_count()}")
    for k, v in med.items():
        print(f"  {k + (f' ({args.workers} workers)' if k == 'shmfeed' else ''):28s} {v:12,.0f} rows/s")
    print(f"  shmfeed / {base}: {med['shmfeed'] / med[base]:.2f}x (goal >= 1.5x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "bytes": size, "rows_per_s": med, "runs": runs}, f, indent=1)


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


def decode_tar_counted(cache, fields: dict) -> dict:
    """`decode_tar`, and what this worker's cache had downloaded, and how, so far."""
    return {**decode_tar(fields), "pid": os.getpid(), **cache.downloads()}


def run_s3(opts: dict, cache_dir: str, max_bytes: int, prefetch: int, batch: int,
           workers: int) -> tuple[float, dict[str, int]]:
    """(rows/s, the workers' download counts summed: `read`, `prefetched`, `waited`)."""
    import functools

    from shmfeed.sources import ObjectCache, TarShards
    t0 = time.perf_counter()
    cache = ObjectCache(cache_dir, max_bytes=max_bytes, storage_options=opts, prefetch=prefetch)
    rows = 0
    last: dict[int, tuple[int, int, int]] = {}
    decode = functools.partial(decode_tar_counted, cache)
    with shmfeed.Loader(TarShards("s3://bench/train-*.tar", decode, cache=cache), batch_size=batch,
                        num_workers=workers) as loader:
        for b in loader:
            rows += len(b["y"])
            _ = b["x"][0, 0] + b["y"][0]
            for pid in np.unique(b["pid"]):  # the counts only grow: a worker's last is its most
                at = np.flatnonzero(b["pid"] == pid)[-1]
                last[int(pid)] = max(last.get(int(pid), (0, 0, 0)),
                                     (int(b["read"][at]), int(b["prefetched"][at]), int(b["waited"][at])))
    rate = rows / (time.perf_counter() - t0)
    counts = dict(zip(("read", "prefetched", "waited"), np.sum(list(last.values()), axis=0).tolist()))
    used = sum(e.stat().st_size for e in os.scandir(cache_dir) if not e.name.endswith(".lock"))
    if used > max_bytes:
        raise AssertionError(f"the cache holds {used} bytes, over its `max_bytes`={max_bytes}")
    return rate, counts


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
        counts: dict[str, list[dict]] = {k: [] for k in runs}
        with tempfile.TemporaryDirectory() as tmp:
            cache_dir = os.path.join(tmp, "cache")
            for _ in range(args.rounds):
                for prefetch in (args.prefetch, 0):
                    shutil.rmtree(cache_dir, ignore_errors=True)
                    rate, count = run_s3(opts, cache_dir, 2 * size, prefetch, args.batch, args.workers)
                    runs[f"cold, prefetch={prefetch}"].append(rate)
                    counts[f"cold, prefetch={prefetch}"].append(count)
                rate, count = run_s3(opts, cache_dir, 2 * size, args.prefetch, args.batch, args.workers)
                runs["warm"].append(rate)
                counts["warm"].append(count)
    finally:
        server.stop()
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(f"{args.rows} rows x float32[{args.width}] in {args.shards} tar shards on a moto S3 server "
          f"(+{args.latency_ms} ms a request), {size / 1e6:.1f} MB, batch {args.batch}, {args.workers} workers, "
          f"whole epochs from the Loader's construction, cpus={os.cpu_count()}")
    for k, v in med.items():
        c = counts[k]
        print(f"  {k:28s} {v:12,.0f} rows/s {v * size / args.rows / 1e6:8.1f} MB/s (object bytes); workers' "
              f"reads that downloaded their shard {[x['read'] for x in c]}, waited for a download "
              f"{[x['waited'] for x in c]}, shards prefetched {[x['prefetched'] for x in c]} (per round)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "object_bytes": size, "rows_per_s": med, "runs": runs,
                       "downloads": counts}, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=None, help="default 200,000; 4,000 with --images")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--group", type=int, default=None, help="default 4,096; 100 with --images")
    ap.add_argument("--batch", type=int, default=None, help="default 256; 64 with --images")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shuffle", action="store_true")
    ap.add_argument("--arrayrecord", action="store_true", help="ArrayRecord instead of Parquet")
    ap.add_argument("--s3", action="store_true", help="tar shards from a moto S3 server, cold and warm cache")
    ap.add_argument("--images", choices=["parquet", "arrayrecord", "tar"],
                    help="decode-dominated: encoded images decoded per row (see above)")
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--image-format", choices=["jpeg", "png"], default="jpeg")
    ap.add_argument("--shards", type=int, default=None, help="default 16; 8 with --images")
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--proxy-for", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.proxy_for:
        return delaying_proxy(args.proxy_for, args.latency_ms / 1000)
    if args.images:
        args.batch, args.shards, args.group = args.batch or 64, args.shards or 8, args.group or 100
        return main_images(args)
    args.rows, args.batch, args.shards = args.rows or 200_000, args.batch or 256, args.shards or 16
    args.group = args.group or 4096
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
