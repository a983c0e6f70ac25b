"""What the machine and this process's cgroup allow: CPUs, memory, shared memory.

Owns reading those limits from the kernel (sched_getaffinity, psutil's /proc
readings, the cgroup filesystem, v2 or v1).  Every function is pure and returns a
`Reading`: a number (None: no limit, or unknown) and where it came from, so that a
message built on it can name its source.  Used by `shmfeed doctor` and meant for the
Loader's checks at construction (refusing a ring larger than the machine allows).
Also what runs in this process that makes forking it unsafe (`accelerator_in_use`).

Invariants:
- nothing here raises for a missing or unreadable file: the Reading says so instead;
- a cgroup limit is the smallest one set on the path from this process's cgroup up to
  the root of its hierarchy (a parent's limit binds its children);
- `cgroup_root` is a parameter only so that tests can point it at a fake hierarchy.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
SHM_PATH = "/dev/shm"
GPU_DEVICE_NODES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/kfd")  # NVIDIA's, then AMD's
# cgroup v1 writes "no limit" as the largest page-aligned int64 (9223372036854771712);
# anything from here up is no limit.
V1_NO_LIMIT_BYTES = 2**62


@dataclass(frozen=True)
class Reading:
    """A number the kernel reported (None: no limit, or not readable) and its source."""

    # int or float, or None; typed Any because most readings (CPUs, MemTotal) always have
    # one, and their callers compute with it directly.
    value: Any
    source: str

    def as_dict(self) -> dict:
        return {"value": self.value, "source": self.source}


def human_bytes(n: float) -> str:
    """`n` bytes in the largest binary unit that keeps it >= 1 (e.g. '1.5 GiB')."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


# -- cgroups ------------------------------------------------------------------------------
def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _own_cgroup_paths() -> dict[str, str]:
    """Controller name -> this process's cgroup path in that hierarchy ("" for v2)."""
    out: dict[str, str] = {}
    for line in (_read(PROC_SELF_CGROUP) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        for c in controllers.split(",") if controllers else [""]:
            out[c] = path
    return out


def _hierarchy(controller: str, cgroup_root: Path) -> tuple[int, list[Path]] | None:
    """(cgroup version, directories from this process's cgroup up to the hierarchy's
    root) of `controller`, or None when it is not mounted under `cgroup_root`."""
    own = _own_cgroup_paths()
    v2_controllers = (_read(cgroup_root / "cgroup.controllers") or "").split()
    if controller in v2_controllers:
        version, top, rel = 2, cgroup_root, own.get("", "/")
    else:
        tops = [d for d in (cgroup_root.iterdir() if cgroup_root.is_dir() else [])
                if d.is_dir() and controller in d.name.split(",")]
        if not tops:
            return None
        version, top, rel = 1, tops[0], own.get(controller, "/")
    leaf = top / rel.lstrip("/")
    if not leaf.is_dir():
        # Inside a container without its own cgroup namespace the path named in
        # /proc/self/cgroup is the host's; the container's cgroup is mounted as the top.
        leaf = top
    dirs = [leaf]
    while dirs[-1] != top and top in dirs[-1].parents:
        dirs.append(dirs[-1].parent)
    return version, dirs


def _smallest(dirs: list[Path], name: str, parse) -> Reading | None:
    """The smallest value of file `name` over `dirs` (None: unlimited everywhere)."""
    best: Reading | None = None
    for d in dirs:
        text = _read(d / name)
        if text is None:
            continue
        value = parse(text)
        if value is not None and (best is None or best.value is None or value < best.value):
            best = Reading(value, str(d / name))
        elif best is None:
            best = Reading(None, f"{d / name}: no limit")
    return best


def _bytes_limit(text: str) -> int | None:
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= V1_NO_LIMIT_BYTES else value


def cgroup_memory_limit_bytes(cgroup_root: Path = CGROUP_ROOT) -> Reading:
    """The memory limit of this process's cgroup (v2 `memory.max`, v1
    `memory.limit_in_bytes`): value None when there is none."""
    found = _hierarchy("memory", Path(cgroup_root))
    if found is None:
        return Reading(None, f"no memory cgroup under {cgroup_root}")
    version, dirs = found
    name = "memory.max" if version == 2 else "memory.limit_in_bytes"
    return _smallest(dirs, name, _bytes_limit) or Reading(None, f"no {name} under {dirs[0]}")


def cgroup_memory_used_bytes(cgroup_root: Path = CGROUP_ROOT) -> Reading:
    """Memory this process's cgroup uses, less the page cache the kernel can drop
    (inactive file pages), as `docker stats` counts it: value None when unknown."""
    found = _hierarchy("memory", Path(cgroup_root))
    if found is None:
        return Reading(None, f"no memory cgroup under {cgroup_root}")
    version, dirs = found
    usage_name, inactive_key = (("memory.current", "inactive_file") if version == 2
                                else ("memory.usage_in_bytes", "total_inactive_file"))
    usage = _read(dirs[0] / usage_name)
    if usage is None or not usage.isdigit():
        return Reading(None, f"{dirs[0] / usage_name} not readable")
    inactive = 0
    for line in (_read(dirs[0] / "memory.stat") or "").splitlines():
        key, _, value = line.partition(" ")
        if key == inactive_key and value.isdigit():
            inactive = int(value)
    return Reading(max(0, int(usage) - inactive), f"{dirs[0] / usage_name} - {inactive_key}")


def cgroup_cpu_quota(cgroup_root: Path = CGROUP_ROOT) -> Reading:
    """CPUs' worth of time this process's cgroup may use (v2 `cpu.max`, v1
    `cpu.cfs_quota_us / cpu.cfs_period_us`), e.g. 1.5: value None when unlimited."""
    found = _hierarchy("cpu", Path(cgroup_root))
    if found is None:
        return Reading(None, f"no cpu cgroup under {cgroup_root}")
    version, dirs = found
    if version == 2:
        def parse(text: str) -> float | None:
            quota, _, period = text.partition(" ")
            if quota == "max" or not period:
                return None
            return int(quota) / int(period)

        return _smallest(dirs, "cpu.max", parse) or Reading(None, f"no cpu.max under {dirs[0]}")
    best: Reading | None = None
    for d in dirs:
        quota, period = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
        if quota is None or period is None or int(quota) < 0 or int(period) <= 0:
            continue
        cores = int(quota) / int(period)
        if best is None or cores < best.value:
            best = Reading(cores, f"{d / 'cpu.cfs_quota_us'} / cpu.cfs_period_us")
    return best or Reading(None, f"{dirs[0] / 'cpu.cfs_quota_us'}: no quota")


# -- CPUs and memory ------------------------------------------------------------------------
def affinity_cpus() -> Reading:
    """CPUs this process may run on."""
    try:
        return Reading(len(os.sched_getaffinity(0)), "sched_getaffinity")
    except AttributeError:  # not Linux
        return Reading(os.cpu_count() or 1, "os.cpu_count")


def usable_cpus(cgroup_root: Path = CGROUP_ROOT) -> Reading:
    """Whole CPUs this process can keep busy: its affinity, capped by the cgroup's CPU
    quota (rounded up: a 1.5-CPU quota runs 2 workers at 75%)."""
    cpus, quota = affinity_cpus(), cgroup_cpu_quota(cgroup_root)
    if quota.value is not None and math.ceil(quota.value) < cpus.value:
        return Reading(max(1, math.ceil(quota.value)), f"cgroup CPU quota ({quota.source})")
    return cpus


def most_useful_workers(cpus: int) -> int:
    """The most workers that can speed a training loop up on `cpus` CPUs: one CPU is the
    loop's own.  The constructor's warning and `Stats`' advice both follow this rule."""
    return max(cpus - 1, 1)


def memory_total_bytes() -> Reading:
    return Reading(psutil.virtual_memory().total, "MemTotal (/proc/meminfo)")


def memory_available_bytes() -> Reading:
    """Memory the kernel can give without swapping (MemAvailable: free plus
    reclaimable page cache)."""
    return Reading(psutil.virtual_memory().available, "MemAvailable (/proc/meminfo)")


def memory_limit_bytes(cgroup_root: Path = CGROUP_ROOT) -> Reading:
    """The most memory this process and its children can ever hold: the machine's,
    or its cgroup's limit when that is smaller."""
    total, limit = memory_total_bytes(), cgroup_memory_limit_bytes(cgroup_root)
    return limit if limit.value is not None and limit.value < total.value else total


def memory_headroom_bytes(cgroup_root: Path = CGROUP_ROOT) -> Reading:
    """Memory that can be allocated now: MemAvailable, or what is left below the
    cgroup's limit when that is less."""
    available = memory_available_bytes()
    limit = cgroup_memory_limit_bytes(cgroup_root)
    if limit.value is None:
        return available
    used = cgroup_memory_used_bytes(cgroup_root)
    left = limit.value - (used.value or 0)
    if left < available.value:
        return Reading(max(0, left), f"{limit.source} minus the cgroup's use ({used.source})")
    return available


def shm_bytes(path: str = SHM_PATH) -> tuple[Reading, Reading]:
    """(size, free bytes) of the tmpfs at `path` (values None when it is missing)."""
    try:
        st = os.statvfs(path)
    except OSError as exc:
        missing = Reading(None, f"{path}: {exc.strerror}")
        return missing, missing
    return (Reading(st.f_blocks * st.f_frsize, f"statvfs({path})"),
            Reading(st.f_bavail * st.f_frsize, f"statvfs({path})"))


def gpu_device_nodes() -> list[str]:
    """The GPU device files present (NVIDIA or AMD), without loading any GPU library."""
    return [p for p in GPU_DEVICE_NODES if os.path.exists(p)]


def accelerator_in_use() -> str | None:
    """What makes forking this process unsafe, if anything."""
    if "jax" in sys.modules:
        try:
            from jax._src import xla_bridge

            if getattr(xla_bridge, "_backends", None):
                return "JAX's backend"
        except Exception:
            pass
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_initialized():
                return "CUDA (PyTorch)"
        except Exception:
            pass
    if "cupy" in sys.modules:
        return "CuPy"
    return None
