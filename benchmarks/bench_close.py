"""How long `Loader.close()` takes, per start method and number of loaders open at
once (issue 23: the second of two loaders made after JAX started took 4 s to close).

    python benchmarks/bench_close.py                  # 5 repeats
    python benchmarks/bench_close.py --repeats 1      # a quick sanity run

Method.  Each repeat runs in a fresh interpreter that imports `shmfeed.jax` first (so
a fork server is kept), then:
- "fork": makes the loaders before JAX starts (the pool is forked from this process);
- "forkserver": starts JAX's backend, then makes them (pools forked by the fork server);
- "spawn": the same with `start_method="spawn"` (a fresh interpreter per pool).
Each loader (`num_workers=2`) reads one batch; with `--busy` its workers are then in
the middle of 0.5 s samples, which they never finish (SIGKILLed after the grace).
Timed: each `close()`, in the order the loaders were made.  Reported: per method and
count, the median over repeats of the slowest close of a run, and the slowest of all.
Goal: every close <= 100 ms.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("fork", "forkserver", "spawn")
GOAL_S = 0.1

CHILD = r"""
import json, sys, time
import numpy as np
import shmfeed, shmfeed.jax

class Slow:
    def __init__(self, busy_s): self.busy_s = busy_s
    def __len__(self): return 64
    def __getitem__(self, i):
        if i >= 4:  # the first batch is quick; the rest are being built at close()
            time.sleep(self.busy_s)
        return np.full((8,), i, np.float32)

method, count, busy_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
if method != "fork":
    import jax.numpy as jnp
    jnp.zeros(3).block_until_ready()  # JAX's backend runs from here
loaders = [shmfeed.Loader(Slow(busy_s), batch_size=4, num_workers=2, num_slots=4,
                          start_method="spawn" if method == "spawn" else "auto")
           for _ in range(count)]
for loader in loaders:
    next(iter(loader))
started = [loader.start_method for loader in loaders]
times = []
for loader in loaders:
    t0 = time.perf_counter()
    loader.close()
    times.append(time.perf_counter() - t0)
print(json.dumps({"started": started, "close_s": times}))
"""


def one_run(method: str, count: int, busy_s: float) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, method, str(count), str(busy_s)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    if out.returncode != 0:
        raise SystemExit(f"{method} x{count} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--counts", default="1,2,4", help="numbers of loaders open at once")
    ap.add_argument("--busy", action="store_true", help="close while workers are mid-sample")
    ap.add_argument("--json", type=Path, help="write the raw runs here")
    args = ap.parse_args()
    busy_s = 0.5 if args.busy else 0.0
    rows, raw = [], []
    for method in METHODS:
        for count in (int(c) for c in args.counts.split(",")):
            runs = [one_run(method, count, busy_s) for _ in range(args.repeats)]
            raw.append({"method": method, "count": count, "busy_s": busy_s, "runs": runs})
            worst = [max(r["close_s"]) for r in runs]
            started = sorted({m for r in runs for m in r["started"]})
            rows.append((method, count, "/".join(started), statistics.median(worst), max(worst)))
    print(f"{'method':<11} {'loaders':>7} {'started as':<11} {'median worst close':>19} {'slowest':>9}")
    for method, count, started, med, worst in rows:
        flag = "" if worst <= GOAL_S else f"   > {GOAL_S * 1000:.0f} ms"
        print(f"{method:<11} {count:>7} {started:<11} {med * 1000:>16.1f} ms {worst * 1000:>6.1f} ms{flag}")
    if args.json:
        args.json.write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
