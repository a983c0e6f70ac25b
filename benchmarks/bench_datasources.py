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

Goal (issue 29): shmfeed with 2 workers >= 1.5x pyarrow one-thread where decoding
dominates.  Timings on a loaded machine mean nothing; run it on a quiet one.

    python benchmarks/bench_datasources.py [--rows 200000] [--width 64] [--group 4096]
        [--batch 256] [--workers 2] [--rounds 3] [--shuffle] [--arrayrecord] [--json OUT]
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
    ap.add_argument("--json")
    args = ap.parse_args()
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
