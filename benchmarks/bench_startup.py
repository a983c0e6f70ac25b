"""How long a worker pool takes to start, by start method, for a source whose class
derives from keras's (the tutorial's `DataGenerator` of the keras-sequence workload),
and what the fork server costs in memory (issue 12).

    python benchmarks/bench_startup.py                 # 5 repeats
    python benchmarks/bench_startup.py --repeats 1     # a quick sanity run

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
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("fork", "forkserver", "spawn")

CHILD = r"""
import json, sys, time
import keras, numpy as np, psutil
import shmfeed.keras
from shmfeed._bench import keras_fit
from shmfeed._bench.keras_fit_child import DataGenerator

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
server = shmfeed._forkserver._server
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data-dir", default=None, help="the bench cache (default: shmfeed's)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from shmfeed._bench import workloads

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
