"""What `shmfeed bench` says a loader costs (issue 31): CPU-seconds per GB of the whole
process tree, the headspace runs on a zero-cost source, and the start-up sweep of
`benchmarks/bench_startup.py --sweep` with its memory limit per run.  Real children,
real workers, a real memory cgroup where this machine lets us make one."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shmfeed._cli.bench import report, workloads
from shmfeed._cli.main import main
from shmfeed.sources import Arrays

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_startup.py"
RUN_S = 0.5  # measured seconds per loader: enough clock ticks of the workers' CPU
DATA_ROWS = 64
SWEEP_TIMEOUT_S = 100.0


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-cost-data")


def _bench(args, data_dir, tmp_path, capsys) -> tuple[int, dict, str]:
    out = tmp_path / "bench.json"
    code = main(["bench", *args, "--seconds", str(RUN_S), "--data-dir", str(data_dir),
                 "--data-rows", str(4 * DATA_ROWS), "--json", str(out), "--no-progress"])
    return code, json.loads(out.read_text()), capsys.readouterr().out


def test_cpu_per_gb_counts_the_workers_and_headspace_runs_replay_a_built_sample(data_dir, tmp_path, capsys):
    code, doc, out = _bench(["--workload", "compute", "--compare", "inline,pickle", "--workers", "2"],
                            data_dir, tmp_path, capsys)
    assert code == 0, out
    entry = doc["workloads"]["compute"]
    for name in ("shmfeed", "inline", "pickle"):
        info = entry["loaders"][name]
        (run,), (head,) = info["runs"], info["headspace_runs"]
        assert run["status"] == "ok" and head["status"] == "ok", (run, head)
        assert run["tree_cpu_s"] > 0 and run["cpu_s_per_GB"] > 0 and run["peak_pss_MB"] > 0
        assert run["startup_s"] > 0
        assert (run["replay"], run["source"]) == (False, "SampleSource")
        # The headspace run really reads a zero-cost source: an item costs next to
        # nothing there, against ~1 ms of numpy work in the measured run.
        assert (head["replay"], head["source"]) == (True, "ReplaySamples")
        assert head["source_item_us"] < entry["item_us_in_process"] / 10
        s = info["summary"]
        assert s["headspace_batches_per_s"] > 0 and s["share_of_headspace"] > 0
    # The compute is the workers' for shmfeed and Pool: a CPU figure of the training
    # process alone would be a small part of the tree's.
    for name in ("shmfeed", "pickle"):
        run = entry["loaders"][name]["runs"][0]
        loop_cpu_s = run["loop_cpu_ms_per_batch"] * run["batches"] / 1e3
        assert run["tree_cpu_s"] > 2 * loop_cpu_s, run
    header = out.splitlines()[[i for i, line in enumerate(out.splitlines()) if line.startswith("| workload")][0]]
    assert "| CPU s/GB |" in header and "| peak PSS MB |" in header and "| startup s |" in header
    assert "headspace (compute, batches/s on a zero-cost source): shmfeed " in out
    assert "  CPU s/GB: " in out and "  headspace: " in out and "  peak PSS MB: " in out


def test_array_workloads_and_no_headspace_leave_the_ceiling_out_with_the_reason(data_dir, tmp_path, capsys):
    code, doc, out = _bench(["--workload", "arrays-tokens", "--compare", "none"], data_dir, tmp_path, capsys)
    assert code == 0, out
    assert doc["workloads"]["arrays-tokens"]["headspace"].startswith("none: the source is a gather")
    assert "headspace_runs" not in doc["workloads"]["arrays-tokens"]["loaders"]["shmfeed"]
    assert "headspace (arrays-tokens): none: the source is a gather" in out

    code, doc, out = _bench(["--workload", "tokens", "--compare", "none", "--no-headspace"],
                            data_dir, tmp_path, capsys)
    assert code == 0, out
    assert doc["workloads"]["tokens"]["headspace"] == "none: --no-headspace"
    assert "headspace_runs" not in doc["workloads"]["tokens"]["loaders"]["shmfeed"]
    assert "  headspace: " not in out


def test_replay_sources_hand_out_one_built_item_and_keep_the_sources_shape(data_dir):
    path, _ = workloads.ensure_file(workloads.FEATURES, data_dir, DATA_ROWS)
    samples = workloads.replay(workloads.SampleSource(str(path), 1000, "compute", seed=0))
    assert len(samples) == 1000 and samples[0]["x"] is samples[999]["x"]  # no work per item
    assert not samples[5]["x"].flags.writeable  # a loader writing into it would show
    with pytest.raises(IndexError):
        samples[1000]

    tokens, _ = workloads.ensure_file(workloads.TOKENS, data_dir, 4 * DATA_ROWS)
    batches = workloads.replay(workloads.BatchSource(str(tokens), 32, 50))
    assert isinstance(batches, workloads.BatchSource)  # the adapters' batch-level branch
    assert len(batches) == 50 and batches[0] is batches[49] and batches[0].shape == (32, 512)

    shards, _ = workloads.ensure_file(workloads.SHARDS, data_dir, 4 * DATA_ROWS)
    files = workloads.ShardFiles(str(shards))
    rows = workloads.replay(files)
    assert isinstance(rows, workloads.ShardFiles)
    assert [sum(1 for _ in rows(s, 8)) for s in range(8)] == files.lengths  # every row, once
    assert not np.array_equal(next(rows(0, 8))["x"], next(rows(1, 8))["x"])  # shards differ (Stream checks)

    with pytest.raises(TypeError, match="no replay"):
        workloads.replay(Arrays(np.zeros((4, 2))))


def test_a_results_file_from_before_cost_columns_renders_with_dashes_and_no_headspace():
    doc = json.loads((ROOT / "benchmarks" / "results-2026-11-21.json").read_text())
    report.summarise(doc)
    text = report.table(doc)
    assert "CPU s/GB" in text.splitlines()[0]
    assert report.headspace(doc) == [] and "headspace" not in report.legend(doc)


# -- the start-up sweep ------------------------------------------------------------------
def _sweep(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "sweep.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--sweep", "--workers", "1", "--json", str(out), *args],
                          capture_output=True, text=True, timeout=SWEEP_TIMEOUT_S,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def _by_loader(doc: dict) -> dict:
    return {r["loader"]: r for r in doc["runs"]}


def _cgroup_possible() -> bool:
    spec = importlib.util.spec_from_file_location("bench_startup", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        module.MemoryJail(64 << 20, "cgroup").close()
    except OSError:
        return False
    return True


def test_sweep_records_an_oom_kill_in_a_64_mb_cgroup_as_that_runs_result(tmp_path):
    if not _cgroup_possible():
        pytest.skip("no memory cgroup can be made here (the RLIMIT_AS test covers the fallback)")
    # In-process shuffling of 10^9 samples builds an 8 GB permutation: killed at 64 MB;
    # shmfeed's shuffle builds none, and the sweep goes on to it.
    proc, doc = _sweep(tmp_path, "--lengths", "1e9", "--loaders", "inline,shmfeed", "--memory-mb", "64",
                       "--memory-limit", "cgroup")
    runs = _by_loader(doc)
    assert runs["inline"]["status"] == "oom-killed", runs["inline"]
    assert runs["inline"]["limit"] == "cgroup v1" or runs["inline"]["limit"] == "cgroup v2"
    assert runs["shmfeed"]["status"] == "ok" and runs["shmfeed"]["first_batch_s"] > 0, runs["shmfeed"]
    assert 0 < runs["shmfeed"]["peak_MB"] <= 64 * 2**20 / 1e6
    assert doc["limit"].startswith("a memory cgroup v") and "OOM" in proc.stdout
    assert not list(Path(doc["cgroups_in"]).glob(doc["cgroup_prefix"] + "*")), "a run's cgroup was left behind"


def test_sweep_under_rlimit_as_records_a_memory_error_as_that_runs_result(tmp_path):
    proc, doc = _sweep(tmp_path, "--lengths", "1e9", "--loaders", "inline", "--memory-mb", "2048",
                       "--memory-limit", "rlimit")
    (run,) = doc["runs"]
    assert run["status"] == "out-of-memory" and "MemoryError" in run["reason"], run
    assert doc["limit"].startswith("RLIMIT_AS of 2,048 MB") and "MemErr" in proc.stdout


def test_sweep_skips_a_missing_peer_at_every_length_and_times_the_installed(tmp_path):
    proc, doc = _sweep(tmp_path, "--lengths", "1000,100000", "--loaders", "shmfeed,inline,pickle,torch,grain",
                       "--memory-mb", "1024")
    assert len(doc["runs"]) == 10
    for r in doc["runs"]:
        if r["loader"] in ("torch", "grain") and importlib.util.find_spec(r["loader"]) is None:
            assert r["status"] == "skipped" and "not installed" in r["reason"], r
        else:
            assert r["status"] == "ok" and r["first_batch_s"] > 0 and r["import_s"] >= 0, r


@pytest.mark.integration
def test_sweep_runs_every_installed_peer_with_both_worker_counts_to_10_million_samples(tmp_path):
    proc, doc = _sweep(tmp_path, "--lengths", "1000,10000000", "--workers", "1,2", "--memory-mb", "4096")
    assert len(doc["runs"]) == 6 * 2 * 2
    for r in doc["runs"]:
        assert r["status"] in ("ok", "skipped"), r
        assert r["status"] == "ok" or importlib.util.find_spec(r["loader"]) is None, r
