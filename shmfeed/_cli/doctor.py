"""`shmfeed doctor`: what this machine, this process's limits and this install mean for
shmfeed, one check at a time, each with a verdict and what to do.

Owns the checks and their thresholds; the numbers come from `_sysinfo` (CPUs,
memory, cgroups), `resource` (rlimits) and the filesystem.

Invariants:
- nothing here starts JAX's backend, CUDA or CuPy: packages are looked up with
  `importlib.util.find_spec` and their versions read from metadata, and GPUs are found
  from the driver's files or `nvidia-smi`.  So the start method reported is the one a
  fresh training process gets until it starts one of them itself.
- a check never raises: whatever goes wrong reading something becomes its verdict;
- the verdicts are "ok", "warn" (works, but slower or at risk) and "problem" (shmfeed
  will fail or be killed); only a problem makes the command exit non-zero.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import _sysinfo
from .._processes import forkserver as _forkserver
from .._sysinfo import CGROUP_ROOT, human_bytes

OK, WARN, PROBLEM = "ok", "warn", "problem"
VERDICTS = (OK, WARN, PROBLEM)  # in order of gravity

GiB = 2**30
MiB = 2**20
EXAMPLE_RING_BYTES = 1 * GiB  # the ring size the page-locking check is phrased for
MEMORY_PROBLEM_BYTES = 512 * MiB  # less headroom than this: a loader of any size is at risk
MEMORY_WARN_BYTES = 2 * GiB
ADDRESS_SPACE_PROBLEM_BYTES = 1 * GiB  # an interpreter with numpy and a ring barely fits
OPEN_FILES_PROBLEM = 64  # fewer fds than this: a loader with a few workers cannot start
OPEN_FILES_WARN = 1024  # datasets, JAX and shmfeed's pipes share the process's fds
SMALL_SHM_BYTES = 1 * GiB  # what other loaders (PyTorch's DataLoader) would call small
NVIDIA_SMI_TIMEOUT_S = 10.0
NVIDIA_PROC_GPUS = Path("/proc/driver/nvidia/gpus")
JAX_CUDA_PLUGINS = ("jax-cuda12-plugin", "jax-cuda13-plugin")
CUPY_PACKAGES = ("cupy", "cupy-cuda12x", "cupy-cuda13x", "cupy-cuda11x")


@dataclass
class Check:
    name: str
    verdict: str  # one of VERDICTS
    summary: str  # what was found, with the numbers
    fix: str = ""  # what to do about it (advice when the verdict is ok)
    details: dict = field(default_factory=dict)  # the numbers, for programs


# -- the checks -----------------------------------------------------------------------------
def check_cpus(cgroup_root: Path) -> Check:
    affinity = _sysinfo.affinity_cpus()
    quota = _sysinfo.cgroup_cpu_quota(cgroup_root)
    usable = _sysinfo.usable_cpus(cgroup_root)
    quota_text = "no quota" if quota.value is None else f"{quota.value:g} CPUs"
    details = {"usable": usable.as_dict(), "affinity": affinity.as_dict(),
               "cgroup_quota_cpus": quota.as_dict(), "cpu_count": os.cpu_count()}
    summary = (f"{usable.value} usable (this process may run on {affinity.value} of "
               f"{os.cpu_count()} CPUs; cgroup CPU quota: {quota_text})")
    if usable.value < 2:
        return Check("cpus", WARN, summary,
                     "workers would share one CPU with the training loop: use `num_workers=0` "
                     "(batches built in the loop) or 1, or give the job more CPUs", details)
    return Check("cpus", OK, summary,
                 f"`num_workers={usable.value - 1}` leaves a CPU for the training loop", details)


def check_memory(cgroup_root: Path) -> Check:
    available = _sysinfo.memory_available_bytes()
    total = _sysinfo.memory_total_bytes()
    limit = _sysinfo.cgroup_memory_limit_bytes(cgroup_root)
    used = _sysinfo.cgroup_memory_used_bytes(cgroup_root)
    headroom = _sysinfo.memory_headroom_bytes(cgroup_root)
    details = {"available": available.as_dict(), "total": total.as_dict(),
               "cgroup_limit": limit.as_dict(), "cgroup_used": used.as_dict(),
               "headroom": headroom.as_dict()}
    cgroup_text = ("no cgroup memory limit" if limit.value is None else
                   f"cgroup limit {human_bytes(limit.value)} ({limit.source}), "
                   f"{human_bytes(used.value or 0)} of it in use")
    summary = (f"{human_bytes(available.value)} available of {human_bytes(total.value)} "
               f"(MemAvailable); {cgroup_text}; {human_bytes(headroom.value)} can be allocated now")
    ring_note = ("the ring (num_slots x slot_bytes, see `repr(loader)`) is shared memory, "
                 "counted once against the cgroup limit however many workers map it")
    if headroom.value < MEMORY_PROBLEM_BYTES:
        return Check("memory", PROBLEM, summary,
                     f"under {human_bytes(MEMORY_PROBLEM_BYTES)} left: the OOM killer will end "
                     f"workers or the training process. Free memory or raise the limit; {ring_note}",
                     details)
    if headroom.value < MEMORY_WARN_BYTES:
        return Check("memory", WARN, summary,
                     f"little memory left: bound the ring with `memory_budget_bytes` well under "
                     f"{human_bytes(headroom.value)}; {ring_note}", details)
    return Check("memory", OK, summary,
                 f"keep the ring (`memory_budget_bytes`) well under {human_bytes(headroom.value)}: "
                 f"{ring_note}", details)


def check_shm() -> Check:
    size, free = _sysinfo.shm_bytes()
    details = {"dev_shm_size": size.as_dict(), "dev_shm_free": free.as_dict()}
    try:
        fd = os.memfd_create("shmfeed-doctor", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, os.sysconf("SC_PAGE_SIZE"))
        finally:
            os.close(fd)
    except (AttributeError, OSError) as exc:
        return Check("shm", PROBLEM, f"memfd_create failed: {exc}",
                     "shmfeed's ring is an anonymous memfd: it needs Linux >= 3.17 and a "
                     "seccomp profile that allows memfd_create", details)
    if size.value is None:
        shm_text = f"/dev/shm is missing ({size.source})"
    else:
        small = " (small)" if size.value < SMALL_SHM_BYTES else ""
        shm_text = f"/dev/shm is {human_bytes(size.value)}{small}, {human_bytes(free.value)} free"
    return Check("shm", OK, f"{shm_text}; memfd_create works",
                 "shmfeed does not use /dev/shm (its ring is an anonymous memfd): Docker's "
                 "64 MiB default needs no `--shm-size`", details)


def _rlimit_text(value: int) -> str:
    return "unlimited" if value == resource.RLIM_INFINITY else human_bytes(value)


def check_memlock(gpu_found: bool) -> Check:
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    details = {"soft": None if soft == resource.RLIM_INFINITY else soft,
               "hard": None if hard == resource.RLIM_INFINITY else hard,
               "example_ring_bytes": EXAMPLE_RING_BYTES}
    summary = f"RLIMIT_MEMLOCK {_rlimit_text(soft)} (hard {_rlimit_text(hard)})"
    if soft == resource.RLIM_INFINITY or soft >= EXAMPLE_RING_BYTES:
        return Check("memlock", OK, summary,
                     "enough to page-lock a ring for pinned GPU uploads", details)
    where = "" if gpu_found else " (only GPU uploads page-lock memory, and no GPU was found here)"
    raise_it = ("`ulimit -l unlimited`" if hard == resource.RLIM_INFINITY or hard >= EXAMPLE_RING_BYTES
                else f"`ulimit -l unlimited` as root (the hard limit is {_rlimit_text(hard)})")
    return Check("memlock", WARN,
                 f"{summary}: pinned GPU uploads page-lock the whole ring (a "
                 f"{human_bytes(EXAMPLE_RING_BYTES)} ring needs {human_bytes(EXAMPLE_RING_BYTES)} "
                 f"of it); CUDA may refuse, and uploads then read pageable memory, slower{where}",
                 f"raise it: {raise_it}; Docker `--ulimit memlock=-1`; systemd "
                 "`LimitMEMLOCK=infinity`", details)


def check_address_space() -> Check:
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    details = {"soft": None if soft == resource.RLIM_INFINITY else soft,
               "hard": None if hard == resource.RLIM_INFINITY else hard}
    summary = f"RLIMIT_AS {_rlimit_text(soft)} (hard {_rlimit_text(hard)})"
    if soft == resource.RLIM_INFINITY:
        return Check("address_space", OK, summary, "", details)
    verdict = PROBLEM if soft < ADDRESS_SPACE_PROBLEM_BYTES else WARN
    return Check("address_space", verdict,
                 f"{summary}: every process of a loader (training process, supervisor, "
                 f"workers) maps the whole ring, and JAX reserves large virtual ranges; all of "
                 f"it counts against {_rlimit_text(soft)}, far beyond the memory used",
                 "remove the limit (`ulimit -v unlimited`); limit real memory with a cgroup "
                 "(`docker --memory`, systemd `MemoryMax=`) instead", details)


def check_open_files() -> Check:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    details = {"soft": None if soft == resource.RLIM_INFINITY else soft,
               "hard": None if hard == resource.RLIM_INFINITY else hard}
    shown = "unlimited" if soft == resource.RLIM_INFINITY else str(soft)
    summary = f"RLIMIT_NOFILE {shown} (hard {'unlimited' if hard == resource.RLIM_INFINITY else hard})"
    if soft == resource.RLIM_INFINITY or soft >= OPEN_FILES_WARN:
        return Check("open_files", OK, summary, "", details)
    verdict = PROBLEM if soft < OPEN_FILES_PROBLEM else WARN
    return Check("open_files", verdict,
                 f"{summary}: each loader holds its ring's memfd and a pipe per worker, next "
                 "to the dataset's files and JAX's own",
                 f"raise it: `ulimit -n {hard if hard != resource.RLIM_INFINITY else 65536}` "
                 "(up to the hard limit without root)", details)


def check_core() -> Check:
    import shmfeed

    package_dir = Path(shmfeed.__file__).parent
    try:
        core = importlib.import_module("shmfeed._core")
    except ImportError as exc:  # only reached if the package imported without it
        return Check("core", PROBLEM, f"the C core shmfeed._core cannot be imported: {exc}",
                     "build it: `pip install -e .` in the checkout, or "
                     "`python setup.py build_ext --inplace`",
                     {"shmfeed": str(package_dir)})
    core_path = Path(str(core.__file__))
    details = {"shmfeed": str(package_dir), "core": str(core_path), "version": shmfeed.__version__}
    if core_path.parent != package_dir:
        # An editable install's finder can serve the core of another checkout.
        return Check("core", WARN, f"shmfeed {shmfeed.__version__} from {package_dir}, but its C core "
                     f"from {core_path}: another checkout's build, which may not match this code",
                     f"build the core here: `python setup.py build_ext --inplace` in {package_dir.parent}",
                     details)
    return Check("core", OK, f"shmfeed {shmfeed.__version__} from {package_dir}, C core "
                 f"{core_path.name} built next to it", "", details)


def _version(*distributions: str) -> str | None:
    for name in distributions:
        try:
            return f"{name} {importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _gpus() -> tuple[list[str], str]:
    """Names of the NVIDIA GPUs the driver shows, and how they were found."""
    smi = shutil.which("nvidia-smi")
    if smi is not None:
        try:
            out = subprocess.run([smi, "--query-gpu=name,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S)
            if out.returncode == 0:
                return [line.strip() for line in out.stdout.splitlines() if line.strip()], "nvidia-smi"
        except (OSError, subprocess.TimeoutExpired):
            pass
    names = []
    for info in sorted(NVIDIA_PROC_GPUS.glob("*/information")):
        model = next((line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
                      if line.startswith("Model:")), "NVIDIA GPU")
        names.append(model)
    if names:
        return names, str(NVIDIA_PROC_GPUS)
    if _sysinfo.gpu_device_nodes():
        return ["a GPU device node (" + ", ".join(_sysinfo.gpu_device_nodes()) + ")"], "/dev"
    return [], "nvidia-smi, /proc/driver/nvidia, /dev"


def check_jax() -> Check:
    jax = _version("jax") if importlib.util.find_spec("jax") is not None else None
    jaxlib = _version("jaxlib")
    plugin = _version(*JAX_CUDA_PLUGINS)
    details = {"jax": jax, "jaxlib": jaxlib, "cuda_plugin": plugin}
    if jax is None:
        return Check("jax", WARN, "JAX is not installed: shmfeed.jax (prefetch_to_device) is "
                     "unavailable; shmfeed.Loader works without it",
                     "`pip install 'shmfeed[jax]'`", details)
    parts = [p for p in (jax, jaxlib, plugin) if p]
    return Check("jax", OK, ", ".join(parts) + " (found without importing it)", "", details)


def check_gpu(gpus: tuple[list[str], str], jax_check: Check) -> Check:
    names, how = gpus
    cupy = _version(*CUPY_PACKAGES) if importlib.util.find_spec("cupy") is not None else None
    details = {"gpus": names, "found_by": how, "cupy": cupy}
    if not names:
        return Check("gpu", OK, f"no GPU found ({how}); CuPy {'installed' if cupy else 'not installed'}",
                     "shmfeed.jax feeds the CPU device with one host copy per batch", details)
    summary = f"{len(names)} GPU(s): {'; '.join(names)} (by {how}); " + (cupy or "CuPy not installed")
    if jax_check.details.get("jax") and not jax_check.details.get("cuda_plugin"):
        return Check("gpu", WARN, summary + "; JAX has no CUDA plugin",
                     "JAX will run on the CPU only: `pip install 'jax[cuda12]'`", details)
    if cupy is None:
        return Check("gpu", WARN, summary,
                     "without CuPy, uploads use XLA's transfer from pageable memory: install "
                     "CuPy for your CUDA version (e.g. `pip install cupy-cuda12x`) for pinned "
                     "uploads on shmfeed's own copy stream (`transfer='cupy'`)", details)
    return Check("gpu", OK, summary, "uploads page-lock the ring and copy on their own stream "
                 "(`transfer='cupy'`)", details)


def check_start_method() -> Check:
    why = _sysinfo.accelerator_in_use()
    if why is None:
        return Check("start_method", OK,
                     "fork: nothing in this process has started JAX's backend, CUDA or CuPy",
                     "a training script keeps fork if it creates the Loader before its first JAX "
                     "computation; after it, workers start from the fork server (a copy of the "
                     "process taken at `import shmfeed.jax`/`shmfeed.keras`) or, without one, "
                     "from a fresh interpreter, and the source must be picklable",
                     {"method": "fork", "why": None})
    if _forkserver.running():
        return Check("start_method", OK, f"forkserver: {why} runs in this process; pools start from "
                     "the copy of it taken before", "the source must be picklable (cloudpickle)",
                     {"method": "forkserver", "why": why})
    return Check("start_method", OK, f"fresh interpreter (spawn): {why} runs in this process",
                 "create the Loader before JAX/CUDA starts to fork instead, or `import shmfeed.jax` "
                 "(or `shmfeed.keras`) before it starts, so that pools start from a copy of the "
                 "process taken then (no imports to redo)", {"method": "spawn", "why": why})


def run_checks(cgroup_root: Path = CGROUP_ROOT) -> list[Check]:
    gpus = _gpus()
    jax_check = check_jax()
    steps: list[tuple[str, Callable[[], Check]]] = [
        ("cpus", lambda: check_cpus(cgroup_root)),
        ("memory", lambda: check_memory(cgroup_root)),
        ("shm", check_shm),
        ("memlock", lambda: check_memlock(bool(gpus[0]))),
        ("address_space", check_address_space),
        ("open_files", check_open_files),
        ("core", check_core),
        ("jax", lambda: jax_check),
        ("gpu", lambda: check_gpu(gpus, jax_check)),
        ("start_method", check_start_method),
    ]
    out = []
    for name, step in steps:
        try:
            out.append(step())
        except Exception as exc:  # a check that cannot read something says so, the rest run
            out.append(Check(name, WARN, f"could not check: {type(exc).__name__}: {exc}",
                             "[INTERNAL ERROR] please report it with this message"))
    return out


# -- output ---------------------------------------------------------------------------------
TEXT_WIDTH = 100
NAME_WIDTH = 14


def worst(checks: list[Check]) -> str:
    return max((c.verdict for c in checks), key=VERDICTS.index, default=OK)


def as_json(checks: list[Check]) -> dict:
    return {"python": platform.python_version(), "platform": platform.platform(),
            "verdict": worst(checks), "checks": [asdict(c) for c in checks]}


def as_text(checks: list[Check]) -> str:
    indent = " " * (8 + NAME_WIDTH)
    lines = [f"shmfeed doctor: Python {platform.python_version()} on {platform.platform()}"]
    for c in checks:
        lines.append(textwrap.fill(c.summary, TEXT_WIDTH, initial_indent=f"{c.verdict:<8}{c.name:<{NAME_WIDTH}}",
                                   subsequent_indent=indent))
        if c.fix:
            label = "fix: " if c.verdict != OK else "note: "
            lines.append(textwrap.fill(label + c.fix, TEXT_WIDTH, initial_indent=indent,
                                       subsequent_indent=indent + " " * len(label)))
    counts = {v: sum(c.verdict == v for c in checks) for v in VERDICTS}
    lines.append(f"{counts[OK]} ok, {counts[WARN]} warning(s), {counts[PROBLEM]} problem(s)")
    return "\n".join(lines)


def main(as_json_output: bool, cgroup_root: Path = CGROUP_ROOT) -> int:
    """Print the report; 1 if a check found a problem, else 0."""
    checks = run_checks(cgroup_root)
    if as_json_output:
        json.dump(as_json(checks), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(as_text(checks))
    return 1 if worst(checks) == PROBLEM else 0
