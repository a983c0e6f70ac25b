"""The parent side of `shmfeed bench`: prepare the data, measure the references (the
memcpy bound of a batch, what one item costs in-process, how far plain processes
scale the item reads), run every (workload, repeat, loader) in its own child
interpreter (child.py), and sample each child's process tree while it runs.

Invariants:
- Loaders run one after the other, never two at once; within a repeat every loader
  of a workload runs back to back, so a slow drift of the machine hits all alike.
- A child runs in its own session, so that a child that outlives its time limit is
  killed with everything it started (`CHILD_SLACK_S` after its `seconds`), and so
  that what a loader leaves running after its child exits is counted and ended
  before the next measurement starts.
- Headspace: after the loaders of a workload in each repeat, each runs once more
  on the zero-cost twin of the source (`workloads.replay`), with no step, for
  `seconds` capped at `HEADSPACE_MAX_S` (`--no-headspace`: not at all); those runs
  are kept apart (`headspace_runs`) and never mixed into the measured ones.
- The sampler lives here, not in the measured process: it costs the measured loop
  no GIL time.  It sums RSS and, where /proc allows, PSS over the child and all its
  descendants every `MEMORY_SAMPLE_S` and keeps the peaks; and it reports the CPU
  that processes outside the tree took meanwhile (on a shared machine, the reason
  one repeat differs from the next).
- A mistake in the options or the machine's setup (a data folder that cannot be
  written, batches or a ring beyond the memory left, a /dev/shm a peer needs and
  cannot use) is a `SetupError`, found before anything is measured: the CLI prints
  its one-line message and exits 2.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from ... import _autotune, _sysinfo
from ..._config import MAX_SLOTS, default_num_slots, memory_shortfall
from ..._engine.ring import ring_bytes
from ..._processes import interpreter as _interpreter
from . import workloads
from .loaders import LOADERS, Job, not_installed
from .workloads import default_data_dir

CHILD_SLACK_S = 180.0  # a child may take this long beyond `seconds` (imports, startup, close)
LEFTOVER_GRACE_S = 3.0  # processes a child left behind get this long to exit by themselves
MEMORY_SAMPLE_S = 0.1  # sampling period of a child's process tree (memory, CPU)
PROGRESS_S = 0.2  # refresh period of the progress display on a terminal
STARTUP_GUESS_S = 2.0  # what a child takes beyond `seconds`, until one has been timed
MEMCPY_BUDGET_S = 0.3  # time spent measuring the memcpy bound of one workload, at most
MEMCPY_BUDGET_FRACTION = 0.25  # ... and at most this fraction of `seconds`
MEMCPY_GROUP_S = 0.002  # copies are timed in groups at least this long
SAMPLE_COST_ITEMS = 20  # items read in-process to report what one costs
CEILING_BUDGET_S = 0.5  # each process of the parallel-ceiling check reads for this long, at most
CEILING_STRIDE = 8  # items read between two looks at the clock
CEILING_ROUNDS = 2  # the 1-process and N-process checks alternate this many times
HEADSPACE_MAX_S = 2.0  # a headspace run measures this long at most: a ceiling needs no more
BUSY_LOAD_PER_CPU = 0.5  # a 1-minute load average above this per CPU gets a warning
# Peers that need /dev/shm: for their semaphores (multiprocessing's locks are named
# POSIX semaphores there), or for every batch in flight too.  shmfeed itself does not
# (its ring is a memfd).
SHM_FOR_SEMAPHORES = ("pickle", "keras")
SHM_FOR_BATCHES = ("torch", "grain")


class SetupError(Exception):
    """The options or this machine's setup cannot run the benchmark; the message is one
    line saying what is wrong and what to do (see the module docstring)."""


@dataclass
class BenchOptions:
    workloads: list[str]
    peers: list[str]  # loaders compared with shmfeed, in the order asked
    batch_size: int | None = None  # None: each workload's default
    workers: int | str = 2  # "auto": shmfeed's `num_workers="auto"`; the peers get `peer_workers`
    seconds: float = 3.0
    slots: int | str | None = None  # "auto": shmfeed's `num_slots="auto"`; the peers their default
    shuffle: bool = False
    seed: int = 0
    repeat: int = 1
    data_dir: Path = field(default_factory=default_data_dir)  # (the field `workloads` hides the module)
    data_rows: int | None = None  # rows of each data file (tests make small ones)
    length: int | None = None  # samples (batches) per epoch; None: the workload's default
    progress: bool = True
    step_ms: float = 0.0  # simulated training step per batch (child.py)
    worker_nice: int = 0  # shmfeed's workers' `worker_nice`
    headspace: bool = True  # also run each loader on a zero-cost source (its ceiling)

    @property
    def peer_workers(self) -> int:
        """The worker count of what takes a number (the peers, the plain-process
        ceiling): `--workers`, or for "auto" the count shmfeed's auto starts with."""
        if isinstance(self.workers, int):
            return self.workers
        return _autotune.start_workers()[0]

    @property
    def most_workers(self) -> int:
        """The most workers shmfeed may run (auto: one per usable CPU), for the memory checks."""
        return self.workers if isinstance(self.workers, int) else _sysinfo.usable_cpus().value

    @property
    def fixed_slots(self) -> int | None:
        """`--slots` for the peers and the memory checks (auto: the default)."""
        return self.slots if isinstance(self.slots, int) else None

    def as_dict(self) -> dict:
        d = asdict(self)
        d["data_dir"] = str(self.data_dir)
        d["peer_workers"] = self.peer_workers
        return d


def data_folder_error(data_dir: Path, exc: OSError) -> SetupError:
    if data_dir.exists() and not data_dir.is_dir():
        return SetupError(f"the data folder {str(data_dir)!r} is not a folder. Give a writable folder "
                          "with --data-dir DIR (or $SHMFEED_BENCH_DATA)")
    where = f" ({exc.filename})" if exc.filename else ""
    return SetupError(f"the data folder {str(data_dir)!r} cannot hold the generated data: "
                      f"{exc.strerror or exc}{where}. Give a writable folder with --data-dir DIR (or "
                      "$SHMFEED_BENCH_DATA)")


def check_fits(workload: str, batch_size: int, batch_bytes: int, opts: BenchOptions) -> None:
    """Refuse, before allocating anything, batches and a ring beyond the memory left:
    the ring of `--slots` batches plus the two batch buffers of the memcpy bound."""
    slots = opts.fixed_slots or default_num_slots(opts.most_workers, batch_bytes)
    need = ring_bytes(min(slots, MAX_SLOTS), opts.most_workers, batch_bytes) + 2 * batch_bytes
    why = memory_shortfall(need)
    if why is not None:
        raise SetupError(
            f"{workload}: batches of {batch_size} samples are {batch_bytes / 2**20:,.1f} MiB, and a ring "
            f"of {slots} of them with the reference copies needs {need / 2**20:,.1f} MiB, but {why}. "
            "Lower --batch-size or --slots")


def check_shm(loaders: list[str], batch_bytes: int, opts: BenchOptions,
              path: str = _sysinfo.SHM_PATH) -> None:
    """Refuse peers that cannot run with this machine's /dev/shm (see SHM_FOR_*)."""
    users = [n for n in loaders if n in SHM_FOR_SEMAPHORES + SHM_FOR_BATCHES]
    if not users:
        return
    size, free = _sysinfo.shm_bytes(path)
    usable = size.value is not None and os.access(path, os.W_OK) and not (
        os.statvfs(path).f_flag & os.ST_RDONLY)
    labels = ", ".join(LOADERS[n].label for n in users)
    fix = (f"mount a writable tmpfs there (Docker: --shm-size=1g), or leave {', '.join(users)} "
           "out of --compare")
    if not usable:
        raise SetupError(f"{path} is missing or not writable ({size.source}), and {labels} "
                         f"need{'s' if len(users) == 1 else ''} it: {fix}")
    big = [n for n in users if n in SHM_FOR_BATCHES]
    need = batch_bytes * (opts.fixed_slots or default_num_slots(opts.peer_workers, batch_bytes))
    if big and free.value < need:
        raise SetupError(
            f"{path} has {free.value / 2**20:,.1f} MiB free, and {', '.join(big)} put every batch in "
            f"flight there ({need / 2**20:,.1f} MiB): {fix}")


# -- in-process references ---------------------------------------------------------------
def memcpy_bandwidth(nbytes: int, budget_s: float = MEMCPY_BUDGET_S) -> float:
    """Best bytes/s of copying an `nbytes` buffer into another (both already faulted in)."""
    src = np.ones(nbytes, np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    t = time.perf_counter()
    np.copyto(dst, src)
    one = max(time.perf_counter() - t, 1e-7)
    group = max(1, int(MEMCPY_GROUP_S / one))
    best = 0.0
    end = time.perf_counter() + budget_s
    while time.perf_counter() < end:
        t = time.perf_counter()
        for _ in range(group):
            np.copyto(dst, src)
        best = max(best, group * nbytes / (time.perf_counter() - t))
    return best


def describe_batch(workload: workloads.Workload, source, batch_size: int) -> tuple[int, float]:
    """(bytes of one batch, microseconds to read one item of `source` in this process)."""
    source[0]
    t = time.perf_counter()
    for i in range(SAMPLE_COST_ITEMS):
        item = source[i]
    item_us = (time.perf_counter() - t) / SAMPLE_COST_ITEMS * 1e6
    if workload.batch_level:
        return item.nbytes, item_us
    if workload.arrays:
        return item.nbytes * batch_size, item_us
    if workload.stream:  # samples {"x": row}: no label
        return item["x"].nbytes * batch_size, item_us
    return (item["x"].nbytes + np.dtype(np.int64).itemsize) * batch_size, item_us  # y stacks to int64


def _read_for(source, start: int, budget_s: float) -> int:
    """Read items of `source` from `start` on for `budget_s`; how many were read."""
    n = 0
    end = time.perf_counter() + budget_s
    while time.perf_counter() < end:
        for i in range(start + n, start + n + CEILING_STRIDE):
            source[i % len(source)]
        n += CEILING_STRIDE
    return n


def parallel_ceiling(source, processes: int, budget_s: float) -> float:
    """Items/s that `processes` plain forked processes reach together, each reading
    items of `source` in a loop with no loader at all: what N workers could do at
    best on this machine, whatever the loader (cores shared with other work, memory
    bandwidth, CPUs that are hyperthreads of one core all show here)."""
    pipes, pids = [], []
    try:
        for k in range(processes):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                code = 1
                try:
                    os.close(r)
                    n = _read_for(source, k * (len(source) // processes), budget_s)
                    os.write(w, n.to_bytes(8, "little"))
                    code = 0
                finally:
                    os._exit(code)
            os.close(w)
            pipes.append(r)
            pids.append(pid)
        total = 0
        for r in pipes:
            data = b""
            while len(data) < 8:
                chunk = os.read(r, 8 - len(data))
                if not chunk:
                    break
                data += chunk
            total += int.from_bytes(data, "little") if len(data) == 8 else 0
        return total / budget_s
    finally:
        for r in pipes:
            os.close(r)
        for pid in pids:
            os.waitpid(pid, 0)


# -- one child ------------------------------------------------------------------------------
def _busy_cpu_s() -> float:
    """CPU seconds this machine has spent busy, all processes and CPUs together."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0) + getattr(t, "steal", 0)


def _own_cpu_s() -> float:
    t = psutil.Process().cpu_times()
    return t.user + t.system


def non_file_pss_bytes(proc: psutil.Process) -> int:
    """PSS of `proc`'s anonymous and shared-memory pages: memory it holds or shares in
    a process tree (a ring counted once across it), without the mapped code and files
    that other programs share too.  USS where /proc/PID/smaps_rollup is missing."""
    try:
        with open(f"/proc/{proc.pid}/smaps_rollup") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith("Pss_"))
        return sum(int(fields[k].split()[0]) * 1024 for k in ("Pss_Anon", "Pss_Shmem"))
    except (OSError, KeyError):
        return proc.memory_full_info().uss


class TreeSampler:
    """Samples a process tree in a thread: peak RSS and PSS (bytes) of the process and
    all its descendants, and the CPU time they used, so that the CPU that *other*
    processes took from the machine meanwhile (`background_cpu_cores`) can be told
    apart: on a shared machine it is what makes one repeat unlike the next."""

    def __init__(self, pid: int):
        self.root = psutil.Process(pid)
        self.peak_rss = 0
        self.peak_pss: int | None = 0
        self._cpu_by_pid: dict[int, float] = {}
        self._t0, self._busy0, self._own0 = time.monotonic(), _busy_cpu_s(), _own_cpu_s()
        self.background_cpu_cores = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shmfeed-bench-sampler", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        try:
            procs = [self.root] + self.root.children(recursive=True)
        except psutil.Error:
            return
        rss = pss = 0
        for p in procs:
            try:
                with p.oneshot():
                    rss += p.memory_info().rss
                    cpu = p.cpu_times()
                    self._cpu_by_pid[p.pid] = cpu.user + cpu.system
                if self.peak_pss is not None:
                    pss += p.memory_full_info().pss
            except psutil.AccessDenied:
                self.peak_pss = None
            except psutil.Error:
                pass  # it just exited
        self.peak_rss = max(self.peak_rss, rss)
        if self.peak_pss is not None:
            self.peak_pss = max(self.peak_pss, pss)

    def _run(self) -> None:
        while not self._stop.wait(MEMORY_SAMPLE_S):
            self._sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        wall = time.monotonic() - self._t0
        other = (_busy_cpu_s() - self._busy0) - sum(self._cpu_by_pid.values()) - (_own_cpu_s() - self._own0)
        # CPU a process used after its last sample is missed, hence the floor at 0.
        self.background_cpu_cores = max(0.0, other / wall) if wall > 0 else 0.0


def _session_members(sid: int) -> list[int]:
    """Pids of the processes still in session `sid` (a child we started with its own)."""
    out = []
    for pid in psutil.pids():
        with contextlib.suppress(OSError):
            if os.getsid(pid) == sid:
                out.append(pid)
    return out


def _child_env(loader: str) -> dict:
    env = dict(os.environ)
    if loader == "keras":
        # Keras must import a backend; this benchmark computes nothing with it.
        env.setdefault("KERAS_BACKEND", "numpy")
    return env


def run_child(job: Job, tick: Callable[[float], None]) -> dict:
    """Measure one job in a child interpreter; the child's result plus peak memory."""
    with tempfile.TemporaryDirectory(prefix="shmfeed-bench-") as tmp:
        job_path, result_path, log_path = (os.path.join(tmp, n) for n in ("job.json", "result.json", "log"))
        with open(job_path, "w") as f:
            json.dump(job.as_dict(), f)
        with open(log_path, "wb") as log:
            child = subprocess.Popen(
                _interpreter.python_command("from shmfeed._cli.bench.child import main; "
                                            "sys.exit(main(sys.argv[1:]))") + [job_path, result_path],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=_child_env(job.loader), start_new_session=True)
        t0 = time.monotonic()
        limit_s = job.seconds + CHILD_SLACK_S
        memory = TreeSampler(child.pid)
        timed_out = False
        try:
            while child.poll() is None:
                waited = time.monotonic() - t0
                if waited > limit_s:
                    timed_out = True
                    break
                tick(waited)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(PROGRESS_S)
        finally:
            memory.stop()
            if child.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
                child.wait()
        # Whatever the loader left running in the child's session would weigh on the
        # next measurement: count it, give it `LEFTOVER_GRACE_S` to finish (Python's
        # resource tracker, e.g., unlinks what a peer leaked in /dev/shm), then end it.
        left_behind = _session_members(child.pid)
        deadline = time.monotonic() + LEFTOVER_GRACE_S
        while _session_members(child.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)
        with open(log_path, errors="replace") as f:
            log_tail = f.read()[-4000:]
        if timed_out:
            return {"status": "error", "reason": f"no result after {limit_s:.0f} s; the child was killed",
                    "log": log_tail}
        try:
            with open(result_path) as f:
                result = json.load(f)
        except (OSError, ValueError):
            return {"status": "error", "reason": f"the child exited with code {child.returncode} "
                    "and no result", "log": log_tail}
    result["processes_left_after_close"] = len(left_behind)
    if result["status"] == "ok":
        result["peak_rss_MB"] = memory.peak_rss / 1e6
        result["peak_pss_MB"] = None if memory.peak_pss is None else memory.peak_pss / 1e6
        result["background_cpu_cores"] = memory.background_cpu_cores
    elif result["status"] == "error":
        result["log"] = log_tail
    return result


# -- the whole run --------------------------------------------------------------------------
def _machine() -> dict:
    cpus = _sysinfo.usable_cpus().value
    model = platform.processor()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpus_usable": cpus, "cpu_count": os.cpu_count(), "cpu_model": model,
            "memory_GB": psutil.virtual_memory().total / 1e9, "python": platform.python_version(),
            "numpy": np.__version__, "platform": platform.platform(),
            "load_avg_1min_at_start": os.getloadavg()[0]}


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


class Progress:
    """Progress of the run on `stream` (stderr): a live bar with the time left when
    `rich` is installed and the stream is a terminal, a self-rewriting line on a
    terminal without it, one line per result otherwise (logs, CI).

    The time left is the measurements still to run times what one has taken so far
    (`expected_s`, the measured seconds plus a startup guess, before the first ends),
    less what the current one has run already."""

    def __init__(self, enabled: bool, total: int, expected_s: float, stream=None,
                 live: bool | None = None):
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self.tty = enabled and (self.stream.isatty() if live is None else live)
        self.total = total
        self.done = 0
        self.what = ""
        self.expected_s = expected_s
        self.took_s: list[float] = []
        self._t_start = time.monotonic()
        self._rich = self._start_rich() if self.tty else None

    def _start_rich(self):
        try:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
        except ImportError:
            return None
        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[left]}"),
                       console=Console(file=self.stream, force_terminal=True),
                       transient=True, refresh_per_second=1 / PROGRESS_S)
        bar.start()
        self._task = bar.add_task("preparing data and references", total=self.total, left="")
        return bar

    def per_job_s(self) -> float:
        return sum(self.took_s) / len(self.took_s) if self.took_s else self.expected_s

    def left_s(self, waited_s: float) -> float:
        per = self.per_job_s()
        after = max(0, self.total - self.done - 1) * per
        return after + max(per - waited_s, 0.0) if self.done < self.total else 0.0

    def start(self, what: str) -> None:
        self.what = what
        self._t_start = time.monotonic()
        self.tick(0.0)

    def tick(self, waited: float) -> None:
        left = f"about {_clock(self.left_s(waited))} left"
        if self._rich is not None:
            # The bar moves within a measurement too, capped short of its end.
            part = min(waited / self.per_job_s(), 0.99)
            self._rich.update(self._task, completed=self.done + part,
                              description=f"{self.what} {waited:5.1f} s", left=left)
        elif self.tty:
            self.stream.write(f"\r\x1b[K[{self.done + 1}/{self.total}] {self.what} {waited:5.1f} s, {left}")
            self.stream.flush()

    def finish(self, line: str) -> None:
        self.done += 1
        self.took_s.append(time.monotonic() - self._t_start)
        if self.tty and self._rich is None:
            self.stream.write("\r\x1b[K")
        left = f" ({_clock(self.left_s(0.0))} left)" if self.done < self.total else ""
        self.say(f"[{self.done}/{self.total}] {self.what}: {line}{left}")
        if self._rich is not None:
            self._rich.update(self._task, completed=self.done)

    def say(self, line: str) -> None:
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _summary(result: dict, step_ms: float) -> str:
    if result["status"] != "ok":
        return f"{result['status']}: {result['reason']}"
    wait = f", input wait {result['input_wait_fraction']:.2f}" if step_ms else ""
    return (f"{result['batches_per_s']:,.0f} batches/s, {result['MB_per_s']:,.0f} MB/s, "
            f"startup {result['startup_s']:.2f} s{wait}")


def _workers_of(loader: str, opts: BenchOptions) -> dict:
    """A job's `workers` and `slots`: "auto" goes to shmfeed only; the peers get numbers."""
    if loader == "shmfeed":
        return {"workers": opts.workers, "slots": opts.slots}
    return {"workers": opts.peer_workers, "slots": opts.fixed_slots}


def run_bench(opts: BenchOptions) -> dict:
    """Run the benchmark; the JSON document `report.py` renders."""
    loaders = ["shmfeed"] + [p for p in opts.peers if p != "shmfeed"]
    missing = {name: not_installed(name) for name in loaders}
    runnable = [n for n in loaders if missing[n] is None]
    def applies(workload: workloads.Workload, name: str) -> bool:
        return workloads.not_applicable(workload, name) is None

    def runs_per_loader(workload: workloads.Workload) -> int:
        return 1 + (opts.headspace and workloads.no_headspace(workload) is None)

    n_runs = opts.repeat * sum(applies(workloads.WORKLOADS[w], n) * runs_per_loader(workloads.WORKLOADS[w])
                               for w in opts.workloads for n in runnable)
    with Progress(opts.progress, n_runs, opts.seconds + STARTUP_GUESS_S) as progress:
        return _run(opts, loaders, missing, runnable, progress, applies)


def _run(opts: BenchOptions, loaders: list[str], missing: dict, runnable: list[str],
         progress: Progress, applies) -> dict:
    doc: dict = {
        "shmfeed_version": _shmfeed_version(),
        "machine": _machine(),
        "options": opts.as_dict(),
        "workloads": {},
    }
    load, cpus = doc["machine"]["load_avg_1min_at_start"], doc["machine"]["cpus_usable"]
    if load > BUSY_LOAD_PER_CPU * cpus:
        progress.say(f"note: the machine is busy (load average {load:.1f} on {cpus} CPUs): "
                     "expect noisy numbers; --repeat 3 or more reports medians")
    for name in opts.workloads:
        workload = workloads.WORKLOADS[name]
        try:
            path, made = workloads.ensure_file(workload.data, opts.data_dir, opts.data_rows)
        except OSError as exc:
            raise data_folder_error(opts.data_dir, exc) from exc
        progress.say(f"data: {path} ({'generated' if made else 'cached'})")
        if not workload.cold:
            workloads.warm_page_cache(path)
        batch_size = opts.batch_size or workload.batch_size
        source = workloads.make_source(workload, str(path), batch_size=batch_size,
                                       length=opts.length, seed=opts.seed)
        batch_bytes, item_us = describe_batch(workload, source, batch_size)
        check_fits(name, batch_size, batch_bytes, opts)
        check_shm(runnable, batch_bytes, opts)
        budget_s = min(CEILING_BUDGET_S, MEMCPY_BUDGET_FRACTION * opts.seconds)
        one = many = 0.0
        for _ in range(CEILING_ROUNDS):  # alternated, best of each: a short check is noisy
            one = max(one, parallel_ceiling(source, 1, budget_s))
            many = max(many, parallel_ceiling(source, opts.peer_workers, budget_s))
        del source
        entry: dict[str, Any] = {
            "about": workload.about,
            "data_path": str(path),
            "batch_size": batch_size,
            "batch_bytes": batch_bytes,
            "item_us_in_process": item_us,
            "ceiling_items_per_s_1_process": one,
            f"ceiling_items_per_s_{opts.peer_workers}_processes": many,
            "ceiling_ratio": many / one if one else None,
            "memcpy_MB_per_s": memcpy_bandwidth(
                batch_bytes, min(MEMCPY_BUDGET_S, MEMCPY_BUDGET_FRACTION * opts.seconds)) / 1e6,
            "loaders": {n: {"label": LOADERS[n].label, "runs": []} for n in loaders},
        }
        headspace = opts.headspace and workloads.no_headspace(workload) is None
        if headspace:
            for n in loaders:
                entry["loaders"][n]["headspace_runs"] = []
        else:
            entry["headspace"] = workloads.no_headspace(workload) or "none: --no-headspace"
        doc["workloads"][name] = entry
        for n in loaders:
            if missing[n] is not None:
                entry["loaders"][n]["runs"].append({"status": "skipped", "reason": missing[n]})
            elif not applies(workload, n):
                entry["loaders"][n]["runs"].append(
                    {"status": "skipped", "reason": workloads.not_applicable(workload, n)})
        for rep in range(opts.repeat):
            rep_note = f" (repeat {rep + 1}/{opts.repeat})" if opts.repeat > 1 else ""
            for n in [n for n in runnable if applies(workload, n)]:
                job = Job(workload=name, loader=n, data_path=str(path), length=opts.length,
                          batch_size=batch_size, **_workers_of(n, opts),
                          shuffle=opts.shuffle, seed=opts.seed, seconds=opts.seconds,
                          step_ms=opts.step_ms, worker_nice=opts.worker_nice)
                progress.start(f"{name} / {n}{rep_note}")
                result = run_child(job, progress.tick)
                result["repeat"] = rep
                progress.finish(_summary(result, opts.step_ms or workload.step_ms))
                entry["loaders"][n]["runs"].append(result)
            for n in [n for n in runnable if headspace and applies(workload, n)]:
                job = Job(workload=name, loader=n, data_path=str(path), length=opts.length,
                          batch_size=batch_size, **_workers_of(n, opts),
                          shuffle=opts.shuffle, seed=opts.seed, seconds=min(opts.seconds, HEADSPACE_MAX_S),
                          worker_nice=opts.worker_nice, replay=True)
                progress.start(f"{name} / {n} headspace{rep_note}")
                result = run_child(job, progress.tick)
                result["repeat"] = rep
                progress.finish(_summary(result, 0.0))
                entry["loaders"][n]["headspace_runs"].append(result)
    doc["machine"]["load_avg_1min_at_end"] = os.getloadavg()[0]
    return doc


def _shmfeed_version() -> str:
    import shmfeed

    return shmfeed.__version__
