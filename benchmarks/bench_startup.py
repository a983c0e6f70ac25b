"""How long a worker pool takes to start, by start method, for a source whose class
derives from keras's (the tutorial's `DataGenerator` of the keras-sequence workload),
and what the fork server costs in memory (issue 12).

    python benchmarks/bench_startup.py                 # 5 repeats
    python benchmarks/bench_startup.py --repeats 1     # a quick sanity run
    python benchmarks/bench_startup.py --sweep         # start-up over dataset length (issue 31)

Method.  Every measurement runs in a fresh interpreter (KERAS_BACKEND=jax) that imports
keras, numpy and `shmfeed.keras` first, as a training script does at its top, then:
- "fork": creates the Loader before JAX starts (the plain fork);
- "forkserver": starts JAX's backend, then creates the Loader (the pool's supervisor is
  forked from the fork server that `import shmfeed.keras` started);
- "spawn": the same with `start_method="spawn"` (a fresh interpreter, which imports
  keras and jax to unpickle the Sequence).
Timed: `Loader(seq, batch_size=None, num_workers=2)` to its first batch (one batch is
32 samples of 2 ms I/O, so ~64 ms of it is the batch itself).  Also read: the fork
server's unique memory (USS) and proportional memory (PSS) while idle, once JAX has
started in the training process.  Reported: medians over repeats.

The sweep (`--sweep`).  Start-up to the first batch over dataset length (10^3 ... 10^9
samples) x workers {1, 2}, for shmfeed and each peer that is installed (in-process,
`multiprocessing.Pool.imap`, Keras `PyDataset`, torch `DataLoader`, Grain `DataLoader`;
a missing one is reported "skipped"), shuffled as training is (`--no-shuffle`: in
order).  The dataset is virtual (`Virtual`: `__len__` and a `__getitem__` that computes a
1 KiB sample), so 10^9 samples cost nothing until a loader builds something per sample
of it.  Each peer runs as the user would write it:
- shmfeed: `Loader(ds, batch_size=32, num_workers=W, shuffle=True)`;
- in-process: `rng.permutation(len(ds))`, then the first 32 of it read and stacked;
- pickle: the same order, `Pool(W).imap` of batches of it (fork);
- keras: a `PyDataset` of batches (`workers=W, use_multiprocessing=True`), iterated as
  `Model.fit` does (Keras shuffles the batch order);
- torch: `DataLoader(ds, batch_size=32, shuffle=True, num_workers=W)`;
- grain: `DataLoader` with `IndexSampler(shuffle=True)`, `Batch(32)`, `worker_count=W`.
Every run is a fresh interpreter (`--sweep-child`) in a memory limit of `--memory-mb`
(default 8192) for it and everything it starts: a memory cgroup of its own where this
machine lets us make one (cgroup v2 `memory.max`, or v1 `memory.limit_in_bytes` under
this process's own memory cgroup; its peak `memory.max_usage_in_bytes` / `memory.peak`
is reported, page cache included), else `RLIMIT_AS` (virtual memory, per process: a
peer over it gets a MemoryError instead of a kill; the output says which limit applied).
A run the kernel's OOM killer ended is recorded as `oom-killed`, a MemoryError under
RLIMIT_AS as `out-of-memory`, a run past `--timeout-s` as `timeout`: results, not a
crash of the sweep.  Timed: the loader's construction to its first batch in hand (the
loader's imports excluded, reported apart as `import_s`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("fork", "forkserver", "spawn")

CHILD = r"""
import json, sys, time
import keras, numpy as np, psutil
import shmfeed.keras
from shmfeed._cli.bench import keras_fit
from shmfeed._cli.bench.keras_fit_child import DataGenerator

method, data_dir = sys.argv[1], sys.argv[2]
path = keras_fit.ensure_files(__import__("pathlib").Path(data_dir))
labels = json.loads((path / "labels.json").read_text())
seq = DataGenerator(sorted(labels), labels, path)
out = {}
if method != "fork":
    import jax.numpy as jnp
    jnp.zeros(3).block_until_ready()  # JAX's backend runs from here
t0 = time.perf_counter()
loader = shmfeed.Loader(seq, batch_size=None, num_workers=2,
                        start_method="spawn" if method == "spawn" else "auto")
next(iter(loader))
out["first_batch_s"] = time.perf_counter() - t0
out["method"] = loader.start_method
server = shmfeed._processes.forkserver._server
if server is not None:
    info = psutil.Process(server.pid).memory_full_info()
    out["server_uss_mb"], out["server_pss_mb"] = info.uss / 1e6, info.pss / 1e6
    out["training_rss_mb"] = psutil.Process().memory_info().rss / 1e6
loader.close()
print(json.dumps(out))
"""


def measure(method: str, data_dir: str) -> dict:
    env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", CHILD, method, data_dir], capture_output=True,
                         text=True, env=env, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"{method}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- the sweep -------------------------------------------------------------------------
SWEEP_LOADERS = ("shmfeed", "inline", "pickle", "keras", "torch", "grain")
REQUIRES = {"keras": "keras", "torch": "torch", "grain": "grain"}  # peer: the module it needs
SWEEP_LENGTHS = tuple(10**k for k in range(3, 10))
SWEEP_WORKERS = (1, 2)
SWEEP_BATCH = 32
SAMPLE_BYTES = 1024
MEMORY_MB = 8192  # each run's memory limit (issue 31: "a memory cgroup of 8 GB")
RUN_TIMEOUT_S = 300.0
CGROUP_V1 = Path("/sys/fs/cgroup/memory")
CGROUP_V2 = Path("/sys/fs/cgroup")
LEFTOVER_GRACE_S = 3.0  # what a run left running gets this long to end by itself
CGROUP_PREFIX = f"shmfeed-sweep-{os.getpid()}-"  # a run's cgroup: this sweep's, then a number
CGROUP_DRAIN_S = 10.0  # a cgroup's last processes get this long to go before it is removed


class Virtual:
    """`len(ds)` samples that exist only when read: `ds[i]` computes a 1 KiB sample."""

    def __init__(self, length: int):
        self.length = int(length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i):
        import numpy as np

        i = int(i)
        if not 0 <= i < self.length:
            raise IndexError(f"sample {i} out of range [0, {self.length})")
        return {"x": np.full(SAMPLE_BYTES, i % 251, np.uint8), "y": i}


def _collate(samples: list) -> dict:
    import numpy as np

    return {"x": np.stack([s["x"] for s in samples]), "y": np.array([s["y"] for s in samples])}


_pool_ds: Virtual | None = None  # the dataset in each Pool worker (inherited through fork)


def _pool_build(idx) -> dict:
    assert _pool_ds is not None
    return _collate([_pool_ds[i] for i in idx])


def _first_batch(loader: str, ds: Virtual, workers: int, shuffle: bool) -> tuple[float, float]:
    """(seconds importing the loader, seconds from its construction to the first batch)."""
    global _pool_ds
    import numpy as np

    n, bs = len(ds), SWEEP_BATCH
    t_import = time.perf_counter()
    if loader == "shmfeed":
        import shmfeed
    elif loader == "pickle":
        import multiprocessing
    elif loader == "keras":
        import keras
        from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter
    elif loader == "torch":
        from torch.utils.data import DataLoader
    elif loader == "grain":
        import grain.python as grain
    t0 = time.perf_counter()
    import_s = t0 - t_import
    if loader == "shmfeed":
        with shmfeed.Loader(ds, batch_size=bs, num_workers=workers, shuffle=shuffle, seed=0) as feed:
            next(iter(feed))
            return import_s, time.perf_counter() - t0
    order = np.random.default_rng(0).permutation(n) if shuffle else range(n)
    if loader == "inline":
        _collate([ds[i] for i in order[:bs]])
        return import_s, time.perf_counter() - t0
    if loader == "pickle":
        _pool_ds = ds
        pool = multiprocessing.get_context("fork").Pool(workers)
        try:
            next(pool.imap((_pool_build), (order[s : s + bs] for s in range(0, n, bs))))
            t = time.perf_counter() - t0
        finally:
            pool.terminate()
            pool.join()
        return import_s, t
    if loader == "keras":
        class Batches(keras.utils.PyDataset):
            def __len__(self):
                return -(-n // bs)

            def __getitem__(self, b):
                return _collate([ds[i] for i in range(b * bs, min(n, (b + 1) * bs))])

        adapter = PyDatasetAdapter(Batches(workers=workers, use_multiprocessing=True), shuffle=shuffle)
        adapter.on_epoch_begin()
        try:
            next(iter(adapter.get_numpy_iterator()))
            t = time.perf_counter() - t0
        finally:
            adapter.on_epoch_end()
        return import_s, t
    if loader == "torch":
        dl = DataLoader(ds, batch_size=bs, shuffle=shuffle, num_workers=workers)
        it = iter(dl)
        next(it)
        t = time.perf_counter() - t0
        it._shutdown_workers()
        return import_s, t
    if loader == "grain":
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        sampler = grain.IndexSampler(num_records=n, shard_options=grain.NoSharding(), shuffle=shuffle,
                                     num_epochs=1, seed=0)
        gl = grain.DataLoader(data_source=ds, sampler=sampler, operations=[grain.Batch(bs)],
                              worker_count=workers)
        it = iter(gl)
        next(it)
        t = time.perf_counter() - t0
        with contextlib.suppress(Exception):
            it._iterator.close()  # type: ignore[attr-defined]
        return import_s, t
    raise ValueError(f"unknown loader {loader!r}")


def sweep_child(spec: dict) -> dict:
    """One run, in the limited interpreter: the result as a JSON-able dict."""
    if importlib.util.find_spec(REQUIRES.get(spec["loader"], "numpy")) is None:
        return {"status": "skipped", "reason": f"{REQUIRES[spec['loader']]} is not installed"}
    try:
        import_s, first_s = _first_batch(spec["loader"], Virtual(spec["length"]), spec["workers"],
                                         spec["shuffle"])
    except MemoryError as exc:
        return {"status": "out-of-memory", "reason": f"MemoryError: {exc}"}
    own, reaped = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"status": "ok", "import_s": import_s, "first_batch_s": first_s,
            "cpu_s": own.ru_utime + own.ru_stime + reaped.ru_utime + reaped.ru_stime,
            "own_max_rss_MB": own.ru_maxrss / 1e3}


class MemoryJail:
    """A memory limit for one run and everything it starts (see the module docstring).

    `preexec` runs in the forked child before it executes Python: it joins the cgroup,
    or sets RLIMIT_AS.  `close` ends what is left in the cgroup and removes it."""

    def __init__(self, limit_bytes: int, kind: str = "auto"):
        self.limit = int(limit_bytes)
        self.path: Path | None = None
        self.kind, self.why_not_cgroup = "rlimit", ""
        if kind in ("auto", "cgroup"):
            try:
                self.path, self.kind = self._make_cgroup()
            except OSError as exc:
                self.why_not_cgroup = f"no memory cgroup could be made here ({exc})"
                if kind == "cgroup":
                    raise
        else:
            self.why_not_cgroup = "RLIMIT_AS was asked for"

    def _make_cgroup(self) -> tuple[Path, str]:
        name = f"{CGROUP_PREFIX}{time.monotonic_ns()}"
        controllers = CGROUP_V2 / "cgroup.controllers"
        if controllers.exists() and "memory" in controllers.read_text().split():
            own = _own_cgroup("")
            path = CGROUP_V2 / own.lstrip("/") / name
            path.mkdir()
            try:
                (path / "memory.max").write_text(str(self.limit))
                if (path / "memory.swap.max").exists():  # swapping would hide the limit
                    (path / "memory.swap.max").write_text("0")
            except OSError:
                path.rmdir()
                raise
            return path, "cgroup v2"
        if not CGROUP_V1.is_dir():
            raise OSError("neither cgroup v2 with the memory controller nor cgroup v1's memory hierarchy")
        own = CGROUP_V1 / _own_cgroup("memory").lstrip("/")
        path = (own if own.is_dir() else CGROUP_V1) / name
        path.mkdir()
        try:
            (path / "memory.limit_in_bytes").write_text(str(self.limit))
            with contextlib.suppress(OSError):  # swap accounting is off on many kernels
                (path / "memory.memsw.limit_in_bytes").write_text(str(self.limit))
        except OSError:
            path.rmdir()
            raise
        return path, "cgroup v1"

    def describe(self) -> str:
        mb = self.limit / 2**20
        if self.path is not None:
            return f"a memory {self.kind} of {mb:,.0f} MB per run ({self.path.parent})"
        return (f"RLIMIT_AS of {mb:,.0f} MB per process (virtual memory; a peer over it gets a "
                f"MemoryError, not a kill): {self.why_not_cgroup}")

    def preexec(self) -> None:
        if self.path is not None:
            (self.path / "cgroup.procs").write_text(str(os.getpid()))
        else:
            resource.setrlimit(resource.RLIMIT_AS, (self.limit, self.limit))

    def oom_kills(self) -> int:
        if self.path is None:
            return 0
        name = "memory.events" if self.kind == "cgroup v2" else "memory.oom_control"
        for line in (self.path / name).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        failcnt = self.path / "memory.failcnt"  # (a kernel without the oom_kill count)
        return int(failcnt.exists() and int(failcnt.read_text()) > 0)

    def peak_MB(self) -> float | None:
        if self.path is None:
            return None
        name = "memory.peak" if self.kind == "cgroup v2" else "memory.max_usage_in_bytes"
        with contextlib.suppress(OSError, ValueError):
            return int((self.path / name).read_text()) / 1e6
        return None

    def close(self) -> None:
        if self.path is None:
            return
        deadline = time.monotonic() + CGROUP_DRAIN_S
        while True:
            pids = [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
            if not pids or time.monotonic() > deadline:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        self.path.rmdir()
        self.path = None


def _own_cgroup(controller: str) -> str:
    """This process's cgroup path in `controller`'s hierarchy ("" : the v2 one)."""
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, names, path = line.rstrip("\n").split(":", 2)
            if (controller and controller in names.split(",")) or (not controller and names == ""):
                return path
    return "/"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_run(spec: dict, memory_bytes: int, jail_kind: str, timeout_s: float) -> dict:
    """One run of the sweep in its own interpreter and memory limit; never raises for
    what happens inside it: an OOM kill, a MemoryError or a hang is its result."""
    jail = MemoryJail(memory_bytes, jail_kind)
    result: dict = {}
    try:
        with tempfile.TemporaryDirectory(prefix="shmfeed-sweep-") as tmp:
            out = os.path.join(tmp, "result.json")
            env = dict(os.environ, PYTHONPATH=str(ROOT), KERAS_BACKEND=os.environ.get("KERAS_BACKEND", "numpy"))
            proc = subprocess.Popen([sys.executable, __file__, "--sweep-child", json.dumps(spec), out],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, env=env, start_new_session=True,
                                    preexec_fn=jail.preexec)
            try:
                _, err = proc.communicate(timeout=timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            # What it left running gets a moment to end by itself (Python's resource
            # tracker unlinks a pool's semaphores from /dev/shm), then is killed.
            deadline = time.monotonic() + (0 if timed_out else LEFTOVER_GRACE_S)
            while time.monotonic() < deadline and _group_alive(proc.pid):
                time.sleep(0.05)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            if timed_out:
                _, err = proc.communicate()
            with contextlib.suppress(OSError, ValueError), open(out) as f:
                result = json.load(f)
            oom = jail.oom_kills()
            if oom:
                result = {"status": "oom-killed", "reason": f"the OOM killer ended {oom} process(es) "
                          f"of the run (exit code {proc.returncode})", **{k: v for k, v in result.items()
                                                                          if k not in ("status", "reason")}}
            elif timed_out:
                result = {"status": "timeout", "reason": f"no first batch in {timeout_s:g} s"}
            elif not result:
                result = {"status": "error", "reason": f"exit code {proc.returncode}",
                          "stderr": err.decode(errors="replace")[-2000:]}
            result["peak_MB"] = jail.peak_MB()
            result["limit"] = jail.kind
    finally:
        jail.close()
    return spec | result


def _length(n: int) -> str:
    k = len(str(n)) - 1
    return f"1e{k}" if n == 10**k else str(n)


def _cell(r: dict, key: str, fmt: str) -> str:
    if r["status"] == "ok":
        value = r.get(key)
        return "-" if value is None else format(value, fmt)
    return {"oom-killed": "OOM", "out-of-memory": "MemErr", "timeout": "t/o", "skipped": "skip"}.get(
        r["status"], "err")


def sweep(args: argparse.Namespace) -> int:
    lengths = [int(float(x)) for x in args.lengths.split(",")]
    workers = [int(x) for x in args.workers.split(",")]
    loaders = args.loaders.split(",")
    unknown = sorted(set(loaders) - set(SWEEP_LOADERS))
    if unknown:
        print(f"bench_startup.py: unknown loader(s) {', '.join(unknown)}; known: {', '.join(SWEEP_LOADERS)}",
              file=sys.stderr)
        return 2
    limit = args.memory_mb << 20
    probe = MemoryJail(limit, args.memory_limit)
    cgroups_in = None if probe.path is None else str(probe.path.parent)
    limit_text = probe.describe()
    probe.close()
    print(f"start-up sweep: first batch of {SWEEP_BATCH} samples of {SAMPLE_BYTES} B, "
          f"{'shuffled' if args.shuffle else 'in order'}; limit: {limit_text}", flush=True)
    results = []
    for w in workers:
        for loader in loaders:
            for n in lengths:
                spec = {"loader": loader, "length": n, "workers": w, "shuffle": args.shuffle}
                r = sweep_run(spec, limit, args.memory_limit, args.timeout_s)
                results.append(r)
                print(f"  {loader} x{w} n={_length(n)}: {r['status']}"
                      + (f" {r['first_batch_s']:.3f} s" if r["status"] == "ok" else f" ({r.get('reason', '')})")
                      + (f", peak {r['peak_MB']:,.0f} MB" if r.get("peak_MB") is not None else ""),
                      file=sys.stderr, flush=True)
                if r["status"] == "skipped":
                    results += [r | {"length": m} for m in lengths if m != n]
                    break  # the other lengths would skip alike
    for title, key, fmt in (("first batch s", "first_batch_s", ".3f"), ("peak MB (cgroup)", "peak_MB", ",.0f")):
        print(f"\n{title}" + ("" if key != "peak_MB" or probe.kind != "rlimit" else " (not measured under RLIMIT_AS)"))
        print(f"{'loader':<9}{'workers':>8}" + "".join(f"{_length(n):>9}" for n in lengths))
        for w in workers:
            for loader in loaders:
                row = {r["length"]: r for r in results if r["loader"] == loader and r["workers"] == w}
                print(f"{loader:<9}{w:>8}" + "".join(f"{_cell(row[n], key, fmt):>9}" for n in lengths))
    print("OOM: killed by the kernel in the memory limit; MemErr: a MemoryError under RLIMIT_AS; "
          "t/o: past --timeout-s; skip: not installed")
    doc = {"limit": limit_text, "cgroups_in": cgroups_in, "cgroup_prefix": CGROUP_PREFIX,
           "batch_size": SWEEP_BATCH, "sample_bytes": SAMPLE_BYTES,
           "shuffle": args.shuffle, "runs": results}
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--sweep-child":
        sys.path.insert(0, str(ROOT))
        result = sweep_child(json.loads(sys.argv[2]))
        Path(sys.argv[3]).write_text(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data-dir", default=None, help="the bench cache (default: shmfeed's)")
    parser.add_argument("--sweep", action="store_true", help="start-up over dataset length x workers")
    parser.add_argument("--lengths", default=",".join(map(str, SWEEP_LENGTHS)), help="(--sweep) dataset lengths")
    parser.add_argument("--workers", default=",".join(map(str, SWEEP_WORKERS)), help="(--sweep) worker counts")
    parser.add_argument("--loaders", default=",".join(SWEEP_LOADERS), help="(--sweep) loaders")
    parser.add_argument("--memory-mb", type=int, default=MEMORY_MB, help="(--sweep) memory limit of each run")
    parser.add_argument("--memory-limit", choices=("auto", "cgroup", "rlimit"), default="auto",
                        help="(--sweep) how: a memory cgroup where possible (auto), or RLIMIT_AS")
    parser.add_argument("--timeout-s", type=float, default=RUN_TIMEOUT_S, help="(--sweep) per run")
    parser.add_argument("--no-shuffle", dest="shuffle", action="store_false", help="(--sweep) in order")
    parser.add_argument("--json", default=None, help="(--sweep) write every run here")
    args = parser.parse_args()
    if args.sweep:
        sys.exit(sweep(args))
    sys.path.insert(0, str(ROOT))
    from shmfeed._cli.bench import workloads

    data_dir = args.data_dir or str(workloads.default_data_dir())
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    for _ in range(args.repeats):
        for method in METHODS:  # taking turns: a slow moment weighs on all alike
            runs[method].append(measure(method, data_dir))
    print(f"pool start to the first batch, tutorial Sequence, 2 workers, median of {args.repeats}")
    print(f"{'method':<11} {'used':<11} {'first batch s':>14} {'server USS MB':>14} {'server PSS MB':>14}")
    summary = {}
    for method, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "method"}
        summary[method] = med | {"used": sorted({r["method"] for r in rs})}
        uss, pss = med.get("server_uss_mb"), med.get("server_pss_mb")
        print(f"{method:<11} {','.join(summary[method]['used']):<11} {med['first_batch_s']:>14.3f} "
              f"{'-' if uss is None else f'{uss:.1f}':>14} {'-' if pss is None else f'{pss:.1f}':>14}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
