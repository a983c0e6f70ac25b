"""The `keras-sequence` workload of `shmfeed bench`: the Keras tutorial's `DataGenerator`
(one .npy file per ID, reshuffled with np.random in `on_epoch_end`) through
`model.fit(epochs=EPOCHS)` on Keras's JAX backend, with JAX already running, fed three
ways in the same run: shmfeed (`shmfeed.keras.feed(seq, num_workers=N)`), Keras's own
`PyDataset(workers=N, use_multiprocessing=True)`, and in-process loading.

Owns the tutorial's data files and the parent side of the run (the child, which
imports keras, is keras_fit_child.py).  Each loader trains in a fresh interpreter, one
after the other, with the same seeds, the model compiled before the clock starts.

Numbers, per loader: `fit_s` (model.fit of EPOCHS epochs, the loader's construction
included), split into `startup_s` (to the end of the first step: workers started, the
first batch built) and `after_first_step_s`; `step_ms`, the median step after an epoch's first (Keras takes the batch
inside the step, so this includes the wait for data); `epoch_gap_ms`, the median time
from the end of an epoch's last step to the end of the next epoch's first (hooks,
restarts, the first batch's build and its step); `boundary_ms`, that gap less
`step_ms`: what an epoch boundary costs beyond an ordinary step.  A Sequence whose
on_epoch_end reshuffles cannot have its next epoch's first batch built ahead (by any
loader), so the boundary includes at least one batch's build (here 32 x 2 ms of I/O)
less the steady step; `gap_over_inline_ms`, the epoch gap less in-process loading's in
the same round (which builds that batch and steps on it, and nothing else): what the
loader itself adds at the boundary.  With `repeat`, the loaders take turns for that
many rounds; each number is the median over rounds, ratios taken within a round.

Invariants: the data files are a pure function of (N_IDS, DIM, `DATA_VERSION`), written
once into the bench cache under a temporary name and renamed; every loader reads the
same files through the same class.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..._processes import interpreter as _interpreter
from . import workloads

NAME = "keras-sequence"
ABOUT = ("the Keras tutorial DataGenerator (one .npy per ID, 2 ms of I/O per sample, "
         "reshuffled in on_epoch_end) through model.fit on the JAX backend")
DATA_VERSION = 1
N_IDS = 512  # 16 batches of 32 per epoch
DIM = (32, 32, 32)  # the tutorial's
N_CHANNELS = 1
N_CLASSES = 10
BATCH_SIZE = 32
EPOCHS = 4
IO_S = 0.002  # I/O time of one sample (a page-cached np.load is topped up by a sleep to this)
LOADERS = ("shmfeed", "keras", "inline")
CHILD_TIMEOUT_S = 600.0


def ensure_files(data_dir: Path) -> Path:
    """The tutorial's `data/<ID>.npy` files (float32 DIM + (N_CHANNELS,)) and labels."""
    path = Path(data_dir) / f"{NAME}-n{N_IDS}-v{DATA_VERSION}"
    if (path / "labels.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    rng = np.random.default_rng([workloads.DATA_SEED, DATA_VERSION])
    for i in range(N_IDS):
        np.save(tmp / f"id-{i}.npy", rng.random(DIM + (N_CHANNELS,), dtype=np.float32))
    (tmp / "labels.json").write_text(json.dumps({f"id-{i}": int(i % N_CLASSES) for i in range(N_IDS)}))
    try:
        os.rename(tmp, path)
    except OSError:  # another run made it meanwhile
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    return path


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def boundary_numbers(epochs: list[list[tuple[float, float]]]) -> dict:
    """From each epoch's (step begin, step end) times.  Keras takes a step's batch inside
    the step, so a step's duration includes its wait for data."""
    steady = [end - begin for steps in epochs for begin, end in steps[1:]]
    across = [nxt[0][1] - cur[-1][1] for cur, nxt in zip(epochs, epochs[1:]) if cur and nxt]
    step_s, across_s = _median(steady), _median(across)
    return {
        "step_ms": None if step_s is None else step_s * 1e3,
        "epoch_gap_ms": None if across_s is None else across_s * 1e3,
        "boundary_ms": None if step_s is None or across_s is None else (across_s - step_s) * 1e3,
    }


def _train(name: str, path: Path, workers: int) -> dict:
    """One model.fit with loader `name`, in a fresh interpreter: its result."""
    env = dict(os.environ, KERAS_BACKEND="jax")
    with tempfile.TemporaryDirectory(prefix="shmfeed-bench-") as tmp:
        out = Path(tmp) / "result.json"
        try:
            proc = subprocess.run(
                _interpreter.python_command("from shmfeed._cli.bench.keras_fit_child import main; "
                                            "sys.exit(main(sys.argv[1:]))")
                + [name, str(path), str(workers), str(out)],
                env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                timeout=CHILD_TIMEOUT_S)
            log = (proc.stdout + proc.stderr)[-4000:]
        except subprocess.TimeoutExpired:
            log = f"no result after {CHILD_TIMEOUT_S:.0f} s"
        result: dict[str, Any] = (json.loads(out.read_text()) if out.exists()
                                  else {"status": "error", "log": log})
    if result.get("status") == "ok":
        result.update(boundary_numbers(result.pop("steps")))
    else:
        result.setdefault("log", log)
    return result


def run(data_dir: Path, workers: int, repeat: int = 1, progress: bool = True) -> dict:
    """Train with each loader in its own interpreter, the loaders taking turns, `repeat`
    rounds; per loader the medians over rounds (ratios are taken within a round, so
    that a slow moment of the machine weighs on all loaders alike); the JSON document."""
    try:
        path = ensure_files(data_dir)
    except OSError as exc:
        from .runner import data_folder_error

        raise data_folder_error(data_dir, exc) from exc
    doc: dict = {"workload": NAME, "about": ABOUT, "data_path": str(path), "workers": workers,
                 "epochs": EPOCHS, "batches_per_epoch": N_IDS // BATCH_SIZE, "repeat": repeat,
                 "loaders": {}}
    rounds: list[dict] = []
    for r in range(repeat):
        results = {}
        for name in LOADERS:
            if progress:
                print(f"{NAME} / {name} (round {r + 1} of {repeat}) ...", file=sys.stderr, flush=True)
            results[name] = _train(name, path, workers)
        keras, inline = results["keras"], results["inline"]
        for result in results.values():
            if result.get("status") != "ok":
                continue
            if keras.get("status") == "ok":
                result["ratio_to_keras"] = result["fit_s"] / keras["fit_s"]
            if inline.get("status") == "ok" and None not in (result["epoch_gap_ms"], inline["epoch_gap_ms"]):
                result["gap_over_inline_ms"] = result["epoch_gap_ms"] - inline["epoch_gap_ms"]
        rounds.append(results)
    for name in LOADERS:
        runs = [rd[name] for rd in rounds]
        ok = [run_ for run_ in runs if run_.get("status") == "ok"]
        if len(ok) < len(runs):
            doc["loaders"][name] = next(run_ for run_ in runs if run_.get("status") != "ok")
            continue
        summary: dict[str, Any] = {"status": "ok", "runs": runs}
        for key in ("fit_s", "startup_s", "after_first_step_s", "step_ms", "epoch_gap_ms",
                    "boundary_ms", "ratio_to_keras", "gap_over_inline_ms"):
            summary[key] = _median([run_[key] for run_ in ok if run_.get(key) is not None])
        doc["loaders"][name] = summary
    return doc


def table(doc: dict) -> str:
    rows = [f"{NAME}: {doc['about']}; {doc['epochs']} epochs of {doc['batches_per_epoch']} "
            f"batches, {doc['workers']} workers",
            f"{'loader':<10} {'fit s':>7} {'x Keras':>8} {'startup s':>10} {'rest s':>7} "
            f"{'step ms':>8} {'epoch gap ms':>13} {'boundary ms':>12} {'gap - inline ms':>16}"]

    def cell(v, fmt):
        return "-" if v is None else format(v, fmt)

    for name, r in doc["loaders"].items():
        if r.get("status") != "ok":
            rows.append(f"{name:<10} failed: {r.get('reason') or r.get('log', '')[-300:]}")
            continue
        rows.append(f"{name:<10} {r['fit_s']:>7.2f} {cell(r.get('ratio_to_keras'), '>8.2f')} "
                    f"{r['startup_s']:>10.2f} {r['after_first_step_s']:>7.2f} "
                    f"{cell(r['step_ms'], '>8.1f')} {cell(r['epoch_gap_ms'], '>13.1f')} "
                    f"{cell(r['boundary_ms'], '>12.1f')} {cell(r.get('gap_over_inline_ms'), '>16.1f')}")
    return "\n".join(rows)
