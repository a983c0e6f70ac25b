"""The `shmfeed` command line: argument errors, and short benchmark runs on small
generated data whose JSON must be well formed with sane numbers.

Each loader runs in a child interpreter of the CLI, so peers never import into this
process; a peer that is not installed is skipped from the CLI's own check (importing
torch or keras here would cost seconds and leave state behind for later tests).
Runs are short (`RUN_S`) with small data files (`--data-rows`): the whole file takes
well under a minute on 2 cores.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shmfeed import _sysinfo
from shmfeed._cli.bench import report, workloads
from shmfeed._cli.bench.loaders import LOADERS, not_installed
from shmfeed._cli.bench.runner import Progress
from shmfeed._cli.main import _gpu_present, main

RUN_S = 0.2  # measured seconds per loader
DATA_ROWS = 64  # rows of each small data file (tokens: 4x as many, so batchlevel has 8 batches)
CLI_TIMEOUT_S = 100.0  # no run of this file comes near it
PER_SAMPLE = ["transport", "images", "compute", "tokens", "images-jpeg"]
ARRAYS = ["arrays-tokens", "arrays-images", "windows", "disk-images"]
WINDOW_TOKENS = 40 * 1024  # the windows file: 39 windows of 1025 tokens, one whole batch of 32


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-data")


def _bench(args, data_dir, tmp_path, capsys) -> tuple[int, dict, str, str]:
    out = tmp_path / "bench.json"
    rows = 4 * DATA_ROWS if any(w in args[1] for w in ("tokens", "batchlevel", "stream-shards")) else DATA_ROWS
    if "windows" in args[1]:
        rows = WINDOW_TOKENS
    code = main(["bench", *args, "--seconds", str(RUN_S), "--data-dir", str(data_dir),
                 "--data-rows", str(rows), "--json", str(out), "--no-progress"])
    captured = capsys.readouterr()
    doc = json.loads(out.read_text()) if out.exists() else {}
    return code, doc, captured.out, captured.err


def _check_sane(doc: dict, workload: str, loaders: list[str]) -> None:
    entry = doc["workloads"][workload]
    assert entry["batch_bytes"] > 0 and entry["memcpy_MB_per_s"] > 0 and entry["ceiling_ratio"] > 0
    assert list(entry["loaders"]) == ["shmfeed"] + [n for n in loaders if n != "shmfeed"]
    for name in loaders:
        info = entry["loaders"][name]
        s = info["summary"]
        assert s["status"] == "ok", (workload, name, info["runs"])
        assert s["batches_per_s"] > 0 and s["MB_per_s"] > 0
        # Every batch is whole (epochs are a multiple of the batch size), so bytes
        # follow from batches.
        expected = s["batches_per_s"] * entry["batch_bytes"] / 1e6
        assert s["MB_per_s"] == pytest.approx(expected, rel=0.01), (workload, name)
        assert 0 < s["memcpy_fraction"] == pytest.approx(s["MB_per_s"] / entry["memcpy_MB_per_s"])
        assert s["ratio_to_shmfeed"] > 0
        assert 0 <= s["startup_s"] < 60
        assert 0 <= s["input_wait_fraction"] <= 1
        assert s["peak_rss_MB"] > 0
        assert s["peak_pss_MB"] is None or 0 < s["peak_pss_MB"] <= s["peak_rss_MB"] * 1.01
        assert s["background_cpu_cores"] >= 0
        run = info["runs"][0]
        assert run["batches"] >= 1 and run["elapsed_s"] >= RUN_S
    shm = entry["loaders"]["shmfeed"]
    assert shm["summary"]["ratio_to_shmfeed"] == 1.0
    stats = shm["runs"][0]["loader_stats"]
    assert stats["batches"] == shm["runs"][0]["batches"] + 1  # the first batch is not timed
    assert stats["ring_bytes"] > 0 and len(stats["workers"]) == 2


def _header(out: str) -> list[str]:
    """The table's column names, from the CLI's stdout."""
    line = next(row for row in out.splitlines() if row.startswith("| workload "))
    return [c.strip() for c in line.split("|")[1:-1]]


# -- argument errors -------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["bench", "--compare", "nosuch"], "unknown loader 'nosuch'; known loaders: shmfeed, inline, pickle, torch, grain, keras"),
    (["bench", "--compare", "inline,tensorflow"], "unknown loader 'tensorflow'"),
    (["bench", "--workload", "video"], "unknown workload 'video'; known workloads: transport, images"),
    (["bench", "--seconds", "0"], "must be > 0"),
    (["bench", "--seconds", "soon"], "expected a number of seconds"),
    (["bench", "--workers", "0"], "must be >= 1"),
    (["bench", "--workers", "many"], "expected a whole number, got 'many'"),
    (["bench", "--workload", "keras-sequence", "--workers", "auto"], "--workers N, not auto"),
    (["bench", "--batch-size", "many"], "expected a whole number"),
    (["bench", "--slots", "1"], "at least 2 slots"),
    (["bench", "--plot", "chart.txt"], "give a .png, .svg or .pdf"),
    (["bench", "--device", "--compare", "torch"], "does not take --compare"),
    (["bench", "--step-ms", "-1"], "must be >= 0"),
    (["bench", "--step-ms", "fast"], "expected a number of milliseconds"),
    (["bench", "--device", "--step-ms", "5"], "does not take --step-ms"),
    (["bench", "--worker-nice", "20"], "invalid choice: 20"),
    (["bench", "--workload", "keras-sequence", "--worker-nice", "5"], "does not take --worker-nice"),
    (["bench", "--workload", "keras-sequence", "--no-headspace"], "does not take --no-headspace"),
    (["bench", "--json", "/nonexistent-dir/out.json"], "the folder '/nonexistent-dir' does not exist (nothing was run)"),
    (["bench", "--no-such-flag"], "unrecognized arguments"),
    (["bench", "--workload", "keras-sequence,transport"], "runs alone"),
    (["bench", "--workload", "keras-sequence", "--compare", "torch"], "does not take --compare"),
    ([], "required: COMMAND"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_arguments_exit_2_with_usage_and_reason(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: shmfeed" in err
    assert message in err


def test_help_exits_0_and_names_every_workload_and_loader(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in list(workloads.WORKLOADS) + list(LOADERS) + ["keras-sequence"]:
        assert name in out


def test_keras_sequence_epoch_boundary_numbers():
    from shmfeed._cli.bench.keras_fit import boundary_numbers

    # Two epochs of steps (begin, end) in seconds: steady steps of 10 ms; the second
    # epoch's first step ends 60 ms after the first epoch's last.
    epochs = [[(0.00, 0.01), (0.01, 0.02), (0.02, 0.03)], [(0.05, 0.09), (0.09, 0.10)]]
    got = boundary_numbers(epochs)
    assert got["step_ms"] == pytest.approx(10)
    assert got["epoch_gap_ms"] == pytest.approx(60)
    assert got["boundary_ms"] == pytest.approx(50)


def test_device_without_gpu_says_why_and_exits_0():
    if _gpu_present():
        pytest.skip("a GPU is present: the device benchmark would really run")
    # In a child interpreter: asking JAX for a GPU starts its backend, after which
    # Loaders of later tests in this process would have to spawn their workers.
    proc = subprocess.run([sys.executable, "-m", "shmfeed", "bench", "--device", "--seconds", "0.5"],
                          capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    assert "shmfeed bench --device: " in proc.stdout + proc.stderr


# -- runs ------------------------------------------------------------------------------------
# Workloads whose data takes seconds to generate and read (JPEG files, large images, ~1 ms
# of work per sample) run in the integration tier; the rest cover the same code paths.
HEAVY = ("images", "compute", "images-jpeg")


@pytest.mark.parametrize("workload", [pytest.param(w, marks=pytest.mark.integration) if w in HEAVY else w
                                      for w in PER_SAMPLE + ["batchlevel"]])
def test_each_workload_runs_shmfeed_inline_and_pickle(workload, data_dir, tmp_path, capsys):
    code, doc, out, err = _bench(["--workload", workload, "--compare", "inline,pickle", "--workers", "2"],
                                 data_dir, tmp_path, capsys)
    assert code == 0, err
    _check_sane(doc, workload, ["shmfeed", "inline", "pickle"])
    assert doc["command"][:3] == ["shmfeed", "bench", "--workload"]
    assert f"| {workload}" in out and "in-process" in out


@pytest.mark.parametrize("workload", ARRAYS)
def test_each_array_workload_runs_shmfeed_and_inline_and_marks_peers_na(workload, data_dir, tmp_path, capsys):
    code, doc, out, err = _bench(["--workload", workload, "--compare", "inline,pickle", "--workers", "2"],
                                 data_dir, tmp_path, capsys)
    assert code == 0, err
    pickle_row = doc["workloads"][workload]["loaders"].pop("pickle")
    assert pickle_row["summary"]["status"] == "skipped" and "n/a" in pickle_row["summary"]["reason"]
    _check_sane(doc, workload, ["shmfeed", "inline"])


@pytest.mark.integration  # each peer's child imports torch, grain or keras: seconds
@pytest.mark.parametrize("peer", ["torch", "grain", "keras"])
def test_peer_runs_a_per_sample_and_the_batch_level_workload(peer, data_dir, tmp_path, capsys):
    # The adapters have two paths, per-sample and batch-level; the workloads differ
    # only in the dataset's own work, which the test above covers.
    reason = not_installed(peer)
    if reason:
        pytest.skip(f"{peer}: {reason}")
    code, doc, out, err = _bench(["--workload", "tokens,batchlevel", "--compare", peer, "--workers", "2"],
                                 data_dir, tmp_path, capsys)
    assert code == 0, err
    for workload in ("tokens", "batchlevel"):
        _check_sane(doc, workload, ["shmfeed", peer])


def test_missing_peer_is_skipped_with_the_extra_to_install(data_dir, tmp_path, capsys, monkeypatch):
    info = LOADERS["torch"]
    monkeypatch.setitem(LOADERS, "torch", dataclasses.replace(info, requires="shmfeed_test_no_such_module"))
    code, doc, out, err = _bench(["--workload", "tokens", "--compare", "torch", "--workers", "2"],
                                 data_dir, tmp_path, capsys)
    assert code == 0, err
    row = doc["workloads"]["tokens"]["loaders"]["torch"]
    assert row["summary"]["status"] == "skipped"
    assert "skipped: not installed (pip install 'shmfeed[torch]')" in out


# Runs two epochs of the stream workload through one loader in a fresh interpreter (torch
# never imports into this process) and prints, per epoch, the rows delivered, how many
# were distinct, and a digest of them in delivery order.
_STREAM_EPOCHS = """
import hashlib, json, sys
import numpy as np
from shmfeed._cli.bench import workloads
from shmfeed._cli.bench.loaders import Job, adapter_module
loader, path = sys.argv[1:]
job = Job("stream-shards", loader, path, None, 32, 2, None, False, 0, 1.0)
source = workloads.make_source(workloads.WORKLOADS["stream-shards"], path, batch_size=32, length=None, seed=0)
adapter = adapter_module(loader).Adapter(source, job)
out = []
try:
    for epoch in range(2):
        x = np.concatenate([np.array(b["x"]) for b in adapter.epoch(epoch)])  # copies: slots return
        out.append([len(x), len(np.unique(x, axis=0)), hashlib.sha256(x.tobytes()).hexdigest()])
finally:
    adapter.close()
print(json.dumps(out))
"""


def test_every_stream_loader_delivers_every_row_of_the_shard_files_once_per_epoch(data_dir):
    data = workloads.WORKLOADS["stream-shards"].data
    rows = 4 * DATA_ROWS
    path, _ = workloads.ensure_file(data, data_dir, rows)
    assert workloads.ensure_file(data, data_dir, rows) == (path, False)  # cached
    lengths = workloads.shard_rows(rows)
    assert sum(lengths) == rows and len(set(lengths)) == workloads.NUM_SHARDS  # unequal files
    assert any(n > 32 for n in lengths) and any(n < 32 for n in lengths)  # whole and partial batches
    loaders = [n for n in workloads.STREAM_LOADERS if not_installed(n) is None]
    epochs = {}
    for name in loaders:
        proc = subprocess.run([sys.executable, "-c", _STREAM_EPOCHS, name, str(path)],
                              capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
        assert proc.returncode == 0, (name, proc.stderr)
        epochs[name] = json.loads(proc.stdout.splitlines()[-1])
        for delivered, distinct, _ in epochs[name]:
            assert delivered == distinct == rows, name  # every row, none twice
    # In-process reads the shards in shmfeed's round-robin order, row for row.
    assert epochs["inline"] == epochs["shmfeed"]
    assert epochs["shmfeed"][0] == epochs["shmfeed"][1]


def test_stream_workload_runs_shmfeed_inline_and_torch_and_marks_other_peers_na(data_dir, tmp_path, capsys):
    runs = ["shmfeed", "inline"] + (["torch"] if not_installed("torch") is None else [])
    code, doc, out, err = _bench(["--workload", "stream-shards", "--compare", "inline,torch,pickle",
                                  "--workers", "2"], data_dir, tmp_path, capsys)
    assert code == 0, err
    entry = doc["workloads"]["stream-shards"]
    assert entry["batch_bytes"] == 32 * 512 * 4 and entry["ceiling_ratio"] > 0
    pickle_row = entry["loaders"]["pickle"]["summary"]
    assert pickle_row["status"] == "skipped" and "n/a" in pickle_row["reason"]
    for name in runs:
        s = entry["loaders"][name]["summary"]
        assert s["status"] == "ok", (name, entry["loaders"][name]["runs"])
        # The last batch of a shard (torch: of a worker's files) is short.
        assert 0 < s["MB_per_s"] <= s["batches_per_s"] * entry["batch_bytes"] / 1e6 * 1.001, name
        assert entry["loaders"][name]["runs"][0]["epochs_started"] >= 2, name  # epoch ends count
    stats = entry["loaders"]["shmfeed"]["runs"][0]["loader_stats"]
    assert len(stats["workers"]) == 2
    assert "| stream-shards" in out


def test_repeats_report_medians(data_dir, tmp_path, capsys):
    code, doc, out, err = _bench(["--workload", "tokens", "--compare", "none", "--workers", "2",
                                  "--repeat", "3"], data_dir, tmp_path, capsys)
    assert code == 0, err
    shm = doc["workloads"]["tokens"]["loaders"]["shmfeed"]
    rates = sorted(r["batches_per_s"] for r in shm["runs"])
    assert len(rates) == 3 and shm["summary"]["batches_per_s"] == rates[1]
    assert "(repeat 3/3)" not in out  # progress goes to stderr, never into the table


def test_python_dash_m_runs_the_readme_command_with_json_on_stdout_and_a_plot(data_dir, tmp_path):
    # In a child interpreter: matplotlib keeps its font files open for the life of
    # the process, which the leak check of this one would (rightly) report.
    plot = tmp_path / "bench.png"
    with_plot = importlib.util.find_spec("matplotlib") is not None  # not in the `test` extra
    proc = subprocess.run(
        [sys.executable, "-m", "shmfeed", "bench", "--workload", "compute", "--compare", "inline",
         "--step-ms", "30", "--seconds", str(RUN_S), "--data-dir", str(data_dir), "--data-rows", str(DATA_ROWS),
         "--json", "-"] + (["--plot", str(plot)] if with_plot else []),
        capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)  # the table went to stderr
    _check_sane(doc, "compute", ["shmfeed", "inline"])
    assert "| compute" in proc.stderr and "data: " in proc.stderr
    assert "verdict (compute): shmfeed delivered " in proc.stderr  # with the table
    if with_plot:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_fails_before_running(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import` does when it is missing
    never = tmp_path / "never-made"
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--workload", "tokens", "--data-dir", str(never), "--plot", str(tmp_path / "b.png")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--plot needs matplotlib cannot be imported" in err
    assert "pip install 'shmfeed[plot]'" in err and "nothing was run" in err
    assert not never.exists()  # no data was generated: nothing ran


def test_worker_nice_reaches_shmfeeds_loader(data_dir, tmp_path, capsys):
    code, doc, out, err = _bench(["--workload", "arrays-tokens", "--compare", "inline", "--workers", "2",
                                  "--worker-nice", "5"], data_dir, tmp_path, capsys)
    assert code == 0, err
    _check_sane(doc, "arrays-tokens", ["shmfeed", "inline"])
    assert doc["options"]["worker_nice"] == 5
    run = doc["workloads"]["arrays-tokens"]["loaders"]["shmfeed"]["runs"][0]
    assert run["loader_stats"]["worker_nice"] == [5]  # as the kernel reports the workers


def test_workers_and_slots_auto_reach_shmfeed_and_the_peers_get_numbers(data_dir, tmp_path, capsys):
    code, doc, out, err = _bench(["--workload", "transport", "--compare", "pickle", "--workers", "auto",
                                  "--slots", "auto", "--no-headspace"], data_dir, tmp_path, capsys)
    assert code == 0, err
    peers = min(_sysinfo.usable_cpus().value, 8)  # what auto starts with
    assert doc["options"]["workers"] == "auto" and doc["options"]["peer_workers"] == peers
    loaders = doc["workloads"]["transport"]["loaders"]
    assert loaders["pickle"]["summary"]["status"] == "ok"
    stats = loaders["shmfeed"]["runs"][0]["loader_stats"]
    assert stats["auto"].startswith(f"{peers} worker(s): ") and stats["auto_decisions"][0]["action"] == "start"
    assert f'shmfeed num_workers="auto" (the others {peers} workers)' in out
    assert f"{peers} plain processes read" in out


# -- the simulated step, the columns ------------------------------------------------------------
STEP_MS = 5.0


def test_step_ms_sleeps_after_each_batch_and_reports_input_wait_per_loader(data_dir, tmp_path, capsys):
    code, doc, out, err = _bench(["--workload", "tokens", "--compare", "inline", "--workers", "2",
                                  "--step-ms", str(STEP_MS)], data_dir, tmp_path, capsys)
    assert code == 0, err
    _check_sane(doc, "tokens", ["shmfeed", "inline"])
    assert doc["options"]["step_ms"] == STEP_MS
    assert _header(out)[-1] == "input wait"
    assert f"a simulated {STEP_MS:g} ms training step per batch" in out
    assert "  input wait: share of the time" in out and "the loop waited for input" in out
    for name, info in doc["workloads"]["tokens"]["loaders"].items():
        run = info["runs"][0]
        # Each batch is followed by a step: the rate cannot beat 1 / step.
        assert run["batches_per_s"] <= 1e3 / STEP_MS, name
        assert 0 <= run["input_wait_fraction"] < 1 and run["loop_cpu_ms_per_batch"] > 0


def test_without_a_step_the_table_shows_loop_cpu_and_leaves_input_wait_out(data_dir, tmp_path, capsys):
    code, doc, out, err = _bench(["--workload", "compute", "--compare", "inline", "--workers", "2"],
                                 data_dir, tmp_path, capsys)
    assert code == 0, err
    header = _header(out)
    assert header[-1] == "loop CPU ms" and "input wait" not in header
    assert "input wait is ~1 for every loader, left out" in out
    # Under the table: what the columns a newcomer cannot guess mean, and one verdict line.
    legend = {line.split(":")[0].strip() for line in out.splitlines() if line.startswith("  ")}
    assert {"x shmfeed", "memcpy", "loop CPU ms"} <= legend and "input wait" not in legend
    verdict = out.splitlines()[-1]
    assert verdict.startswith("verdict (compute): shmfeed delivered ") and "ms of CPU per batch" in verdict
    loaders = doc["workloads"]["compute"]["loaders"]
    for info in loaders.values():
        assert 0 < info["summary"]["input_wait_fraction"] <= 1  # still in the JSON
    # In-process loading computes every sample (~1 ms each) in the loop; shmfeed's
    # workers do it in their own processes, so the loop only takes the batch.
    shm, inline = (loaders[n]["summary"]["loop_cpu_ms_per_batch"] for n in ("shmfeed", "inline"))
    assert 0 < 10 * shm < inline


def test_a_results_file_from_before_loop_cpu_and_step_ms_still_renders():
    doc = json.loads((Path(__file__).parents[1] / "benchmarks" / "results-2026-11-21.json").read_text())
    assert "step_ms" not in doc["options"]
    text = report.heading(doc) + "\n" + report.table(doc)
    assert "no training step" in text and "| transport  | shmfeed " in text
    assert text.splitlines()[-1].rstrip().endswith("- |")  # no loop CPU measured then


# -- progress ---------------------------------------------------------------------------------
def test_progress_without_a_terminal_prints_one_line_per_result_with_the_time_left():
    out = io.StringIO()
    with Progress(True, 3, expected_s=10.0, stream=out) as p:
        assert p.left_s(0.0) == 30.0  # nothing measured yet: the guess, three times
        p.start("tokens / shmfeed")
        p.tick(4.0)
        p.took_s.append(4.0)  # as if the first took 4 s
        p.done = 1
        assert p.left_s(1.0) == 4.0 + 3.0  # one more after this one, and 3 s of this one
        p.start("tokens / inline")
        p.finish("123 batches/s")
    assert out.getvalue().startswith("[2/3] tokens / inline: 123 batches/s (0:0")
    assert out.getvalue().endswith(" left)\n") and "\r" not in out.getvalue()


def test_progress_on_a_terminal_shows_a_live_bar_with_rich():
    pytest.importorskip("rich")
    out = io.StringIO()
    with Progress(True, 2, expected_s=1.0, stream=out, live=True) as p:
        assert p._rich is not None
        p.say("data: somewhere")
        p.start("tokens / shmfeed")
        p.tick(0.5)
        p.finish("99 batches/s")
    text = out.getvalue()
    assert "data: somewhere" in text and "[1/2] tokens / shmfeed: 99 batches/s" in text
    assert "left" in text


# -- a user's mistake is one line and exit 2, never a traceback --------------------------
def _one_line_exit_2(code: int, err: str, *needles: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert "Traceback" not in err and len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def _quick(*args: str) -> list[str]:
    return ["bench", *args, "--seconds", str(RUN_S), "--data-rows", str(DATA_ROWS), "--no-progress"]


def test_a_data_dir_that_is_a_file_is_one_line_not_a_traceback(capsys):
    code = main(_quick("--data-dir", "/dev/null"))
    _one_line_exit_2(code, capsys.readouterr().err, "'/dev/null' is not a folder", "--data-dir")


def test_an_unwritable_default_cache_folder_is_one_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.delenv("SHMFEED_BENCH_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker / "cache"))  # under a file: no folder there
    code = main(_quick())
    _one_line_exit_2(code, capsys.readouterr().err, "cannot hold the generated data", "--data-dir")


@pytest.mark.parametrize(("args", "needle", "usage"), [
    (("--batch-size", "1000000000"), "Lower --batch-size or --slots", False),
    (("--slots", "1000000000"), "Lower --batch-size or --slots", False),
    (("--batch-size", "1e9"), "--batch-size: expected a whole number", True),
    (("--slots", "10000000000"), "at most 4294967294 slots", True),
])
def test_batches_or_a_ring_beyond_memory_are_refused_before_allocating(args, needle, usage, data_dir, capsys):
    """`--slots 1000000000` used to allocate for minutes; `--batch-size 1000000000` died in
    numpy with a traceback."""
    t0 = time.monotonic()
    try:
        code = main(_quick(*args, "--data-dir", str(data_dir)))
    except SystemExit as exc:  # argparse: its usage, then one line with the reason
        code = exc.code
    err = capsys.readouterr().err
    if usage:
        assert code == 2 and needle in err.splitlines()[-1] and "Traceback" not in err, err
    else:
        _one_line_exit_2(code, err, needle)
    assert time.monotonic() - t0 < 30  # nothing measured


_UNDER_RLIMIT = """
import resource, sys
from shmfeed._cli.main import main
with open("/proc/self/statm") as f:
    vm = int(f.read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (vm + (64 << 20), resource.RLIM_INFINITY))
sys.exit(main(sys.argv[1:]))
"""


def test_a_ring_beyond_a_64_mb_memory_limit_is_one_line(data_dir):
    """A 64 MB container (here: RLIMIT_AS at 64 MB above what the CLI has mapped, which
    the same arithmetic check reads) cannot hold transport's ring of 8 x 9 MB batches."""
    proc = subprocess.run([sys.executable, "-c", _UNDER_RLIMIT, *_quick("--data-dir", str(data_dir))],
                          capture_output=True, text=True, timeout=CLI_TIMEOUT_S, env=_this_checkout())
    _one_line_exit_2(proc.returncode, proc.stderr, "RLIMIT_AS", "Lower --batch-size or --slots")


def _in_mount_namespace(script: str) -> subprocess.CompletedProcess:
    """Run `script` (sh) in a private mount namespace: its mounts vanish with it."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare here")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=CLI_TIMEOUT_S)
    if probe.returncode != 0:
        pytest.skip(f"no mount namespace here: {probe.stderr.decode().strip()}")
    return subprocess.run(["unshare", "-m", "sh", "-ec", script], capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S, env=_this_checkout())


def _this_checkout() -> dict:
    """The environment of a child that imports this checkout's shmfeed, wherever it runs."""
    import os

    root = str(Path(__file__).resolve().parent.parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}


def _cli_line(*args: str) -> str:
    return f"{shlex.quote(sys.executable)} -m shmfeed " + " ".join(shlex.quote(a) for a in _quick(*args))


def test_a_read_only_data_dir_is_one_line(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    proc = _in_mount_namespace(f"mount -t tmpfs -o ro,size=1m none {ro}\n"
                               f"{_cli_line('--data-dir', str(ro / 'data'))}")
    _one_line_exit_2(proc.returncode, proc.stderr, "Read-only file system", "--data-dir")


def test_a_dev_shm_a_peer_cannot_use_is_one_line_and_shmfeed_runs_without_it(data_dir):
    """shmfeed's ring is a memfd: a read-only or 1 MB /dev/shm is no matter to it, but
    `Pool.imap` needs its semaphores there, and torch every batch in flight."""
    check = ("from shmfeed._cli.bench.runner import BenchOptions, SetupError, check_shm\n"
             "try:\n"
             "    check_shm(['torch'], 9 << 20, BenchOptions(workloads=[], peers=[]))\n"
             "except SetupError as exc:\n"
             "    print(exc)\n")
    proc = _in_mount_namespace(
        "mount -t tmpfs -o ro,size=1m none /dev/shm\n"
        f"{_cli_line('--data-dir', str(data_dir), '--compare', 'pickle')} || echo rc=$?\n"
        f"{_cli_line('--data-dir', str(data_dir), '--compare', 'none')} >/dev/null\n"
        "mount -o remount,rw /dev/shm\n"
        f"{shlex.quote(sys.executable)} -c {shlex.quote(check)}\n")
    assert proc.returncode == 0, proc.stderr
    assert "rc=2" in proc.stdout, proc.stdout
    _one_line_exit_2(2, proc.stderr, "/dev/shm is missing or not writable", "--compare")
    assert "/dev/shm has 1.0 MiB free, and torch put every batch in flight there" in proc.stdout
