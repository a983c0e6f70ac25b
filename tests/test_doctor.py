"""`shmfeed doctor` and the limits it reads (shmfeed._sysinfo).

The command runs for real in a child interpreter, under limits lowered with
`resource.setrlimit` before it starts (in `preexec_fn`), so each check is seen
reacting to a real limit.  cgroup readings are checked against fake hierarchies in a
temporary directory, laid out on this process's own cgroup paths (from
/proc/self/cgroup) so that the walk up the hierarchy is the real one.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from shmfeed import _sysinfo
from shmfeed._cli.doctor import PROBLEM, VERDICTS, WARN

CHECKS = ["cpus", "memory", "shm", "memlock", "address_space", "open_files", "core", "jax", "gpu",
          "start_method"]
DOCTOR_TIMEOUT_S = 60.0
KiB, MiB, GiB = 2**10, 2**20, 2**30


def _doctor(*args: str, limits: dict | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    def lower_limits() -> None:  # runs in the child, before it execs the interpreter
        for which, soft in (limits or {}).items():
            _, hard = resource.getrlimit(which)
            resource.setrlimit(which, (soft, hard))

    return subprocess.run([sys.executable, "-m", "shmfeed", "doctor", *args], capture_output=True,
                          text=True, timeout=DOCTOR_TIMEOUT_S, preexec_fn=lower_limits,
                          env={**os.environ, **(env or {})})


def _checks(proc: subprocess.CompletedProcess) -> dict[str, dict]:
    doc = json.loads(proc.stdout)
    return {c["name"]: c for c in doc["checks"]}


def test_json_has_every_check_with_a_verdict_and_a_fix_for_each_non_ok():
    proc = _doctor("--json")
    doc = json.loads(proc.stdout)
    checks = {c["name"]: c for c in doc["checks"]}
    assert list(checks) == CHECKS
    for c in checks.values():
        assert c["verdict"] in VERDICTS and c["summary"], c
        if c["verdict"] != "ok":
            assert c["fix"], c
    assert doc["verdict"] == max((c["verdict"] for c in checks.values()), key=VERDICTS.index)
    assert proc.returncode == (1 if doc["verdict"] == PROBLEM else 0), proc.stderr
    assert checks["cpus"]["details"]["usable"]["value"] == _sysinfo.usable_cpus().value
    core = checks["core"]["details"]
    assert Path(core["core"]).name.startswith("_core") and core["version"]
    # The doctor starts nothing that would make a Loader spawn.
    assert checks["start_method"]["details"] == {"method": "fork", "why": None}


def test_text_report_names_every_check_and_counts_verdicts():
    proc = _doctor()
    lines = proc.stdout.splitlines()
    for name in CHECKS:
        assert any(line.split()[1:2] == [name] for line in lines if line[:1] != " "), name
    assert lines[-1].endswith("problem(s)") and "ok," in lines[-1]
    assert "shmfeed does not use /dev/shm" in proc.stdout


def test_small_memlock_warns_about_pinned_uploads():
    proc = _doctor("--json", limits={resource.RLIMIT_MEMLOCK: 64 * KiB})
    c = _checks(proc)["memlock"]
    assert c["verdict"] == WARN
    assert c["details"]["soft"] == 64 * KiB
    assert "RLIMIT_MEMLOCK 64.0 KiB" in c["summary"] and "pinned GPU uploads" in c["summary"]
    assert "ulimit -l" in c["fix"]


def test_unlimited_memlock_is_ok():
    hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]
    if hard != resource.RLIM_INFINITY and hard < GiB:
        pytest.skip(f"the hard RLIMIT_MEMLOCK here is {hard} bytes: a child cannot raise its soft one to 1 GiB")
    proc = _doctor("--json", limits={resource.RLIMIT_MEMLOCK: hard})
    assert _checks(proc)["memlock"]["verdict"] == "ok"


def test_address_space_limit_is_reported_and_a_tiny_one_is_a_problem():
    one_thread = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}  # BLAS reserves per thread
    proc = _doctor("--json", limits={resource.RLIMIT_AS: 4 * GiB}, env=one_thread)
    c = _checks(proc)["address_space"]
    assert c["verdict"] == WARN and c["details"]["soft"] == 4 * GiB
    assert "RLIMIT_AS 4.0 GiB" in c["summary"] and "ulimit -v unlimited" in c["fix"]
    assert proc.returncode == 0 or json.loads(proc.stdout)["verdict"] == PROBLEM

    proc = _doctor("--json", limits={resource.RLIMIT_AS: 900 * MiB}, env=one_thread)
    assert proc.stdout, proc.stderr  # the interpreter, numpy and the doctor fit in 900 MiB
    c = _checks(proc)["address_space"]
    assert c["verdict"] == PROBLEM and "RLIMIT_AS 900.0 MiB" in c["summary"]
    assert proc.returncode == 1


def test_low_open_files_limit_is_reported():
    proc = _doctor("--json", limits={resource.RLIMIT_NOFILE: 200})
    c = _checks(proc)["open_files"]
    assert c["verdict"] == WARN and c["details"]["soft"] == 200
    assert "RLIMIT_NOFILE 200" in c["summary"] and "ulimit -n" in c["fix"]


def test_missing_c_core_says_how_to_build_it(tmp_path):
    shutil.copytree(Path(__file__).parents[1] / "shmfeed", tmp_path / "shmfeed",
                    ignore=shutil.ignore_patterns("_core*.so", "__pycache__"))
    # -S: without site's .pth files, so that no editable install can supply the core.
    path = os.pathsep.join([str(tmp_path), *site.getsitepackages()])
    proc = subprocess.run([sys.executable, "-S", "-m", "shmfeed", "doctor"], capture_output=True,
                          text=True, timeout=DOCTOR_TIMEOUT_S, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": path})
    assert proc.returncode == 1
    assert "shmfeed's C core (shmfeed._core) is not built" in proc.stderr
    assert "python setup.py build_ext --inplace" in proc.stderr


# -- cgroups ----------------------------------------------------------------------------------
def _own_paths() -> dict[str, str]:
    out = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            out[c] = path
    return out


def _write(path: Path, files: dict[str, str]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name).write_text(text + "\n")


def test_fake_cgroup_v2_limits(tmp_path):
    root = tmp_path / "cg"
    _write(root, {"cgroup.controllers": "cpuset cpu io memory pids"})
    leaf = root / _own_paths().get("", "/").lstrip("/")
    _write(leaf, {"memory.current": str(GiB), "memory.stat": f"anon 1\ninactive_file {256 * MiB}"})
    if leaf != root:  # the limit of the hierarchy's top binds a leaf that allows more
        _write(leaf, {"memory.max": str(8 * GiB), "cpu.max": "max 100000"})
    _write(root, {"memory.max": str(3 * GiB), "cpu.max": "150000 100000"})
    limit = _sysinfo.cgroup_memory_limit_bytes(root)
    assert limit.value == 3 * GiB and limit.source == str(root / "memory.max")
    assert _sysinfo.cgroup_memory_used_bytes(root).value == GiB - 256 * MiB
    assert _sysinfo.cgroup_cpu_quota(root).value == 1.5
    assert _sysinfo.usable_cpus(root).value == min(2, _sysinfo.affinity_cpus().value)
    assert _sysinfo.memory_limit_bytes(root).value == min(3 * GiB, _sysinfo.memory_total_bytes().value)
    headroom = _sysinfo.memory_headroom_bytes(root).value
    assert headroom == min(3 * GiB - (GiB - 256 * MiB), _sysinfo.memory_available_bytes().value)


def test_fake_cgroup_v1_limits(tmp_path):
    root = tmp_path / "cg"
    own = _own_paths()
    memory, cpu = root / "memory", root / "cpu,cpuacct"
    mem_leaf = memory / own.get("memory", "/").lstrip("/")
    cpu_leaf = cpu / own.get("cpu", "/").lstrip("/")
    no_limit = "9223372036854771712"  # what v1 writes for none
    _write(memory, {"memory.limit_in_bytes": no_limit})
    _write(mem_leaf, {"memory.limit_in_bytes": str(5 * GiB), "memory.usage_in_bytes": str(2 * GiB),
                      "memory.stat": f"cache 1\ntotal_inactive_file {GiB}"})
    _write(cpu_leaf, {"cpu.cfs_quota_us": "50000", "cpu.cfs_period_us": "100000"})
    assert _sysinfo.cgroup_memory_limit_bytes(root).value == 5 * GiB
    assert _sysinfo.cgroup_memory_used_bytes(root).value == GiB
    assert _sysinfo.cgroup_cpu_quota(root).value == 0.5
    assert _sysinfo.usable_cpus(root).value == 1
    if mem_leaf != memory:  # a parent's smaller limit binds
        _write(memory, {"memory.limit_in_bytes": str(4 * GiB)})
        assert _sysinfo.cgroup_memory_limit_bytes(root).value == 4 * GiB
        _write(memory, {"memory.limit_in_bytes": no_limit})

    _write(mem_leaf, {"memory.limit_in_bytes": no_limit})
    assert _sysinfo.cgroup_memory_limit_bytes(root).value is None
    _write(cpu_leaf, {"cpu.cfs_quota_us": "-1"})
    assert _sysinfo.cgroup_cpu_quota(root).value is None


def test_no_cgroup_hierarchy_means_no_limit(tmp_path):
    assert _sysinfo.cgroup_memory_limit_bytes(tmp_path).value is None
    assert _sysinfo.cgroup_cpu_quota(tmp_path).value is None
    assert _sysinfo.usable_cpus(tmp_path).value == _sysinfo.affinity_cpus().value


def test_doctor_reads_a_cgroup_limit_too_small_as_a_problem(tmp_path):
    root = tmp_path / "cg"
    _write(root, {"cgroup.controllers": "cpu memory"})
    leaf = root / _own_paths().get("", "/").lstrip("/")
    _write(leaf, {"memory.max": str(256 * MiB), "memory.current": str(100 * MiB),
                  "memory.stat": "inactive_file 0", "cpu.max": "100000 100000"})
    proc = _doctor("--json", "--cgroup-root", str(root))
    checks = _checks(proc)
    memory, cpus = checks["memory"], checks["cpus"]
    assert memory["verdict"] == PROBLEM and proc.returncode == 1
    assert memory["details"]["cgroup_limit"]["value"] == 256 * MiB
    assert memory["details"]["headroom"]["value"] == 156 * MiB
    assert "cgroup limit 256.0 MiB" in memory["summary"] and "156.0 MiB can be allocated" in memory["summary"]
    assert cpus["verdict"] == WARN and cpus["details"]["usable"]["value"] == 1
