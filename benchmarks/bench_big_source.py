"""What a large in-memory dataset costs to reach the workers, by start method (issue
26.4): the peak extra memory of the whole process tree, and the time from `Loader(...)`
to its first batch.

    python benchmarks/bench_big_source.py              # 256 MiB
    python benchmarks/bench_big_source.py --mib 1024   # the issue's 1 GiB

Method.  Each start method runs in a fresh interpreter that starts a fork server first
(for "forkserver"; idle, taken before the data exists), builds a dataset object holding
one int64 array of `--mib` MiB (rows of 4 KiB), reads the tree's memory (the baseline),
then times `Loader(ds, batch_size=256, num_workers=2, start_method=...)` and its first
batch, while a thread samples the tree's memory every 5 ms until the first batch and
for `--settle-s` after it.  Tree memory = the PSS of every process of the tree outside
shared-memory mappings, plus each distinct shmfeed memfd (ring, source parcel) once,
at its allocated size (`st_blocks`; a memfd only mapped is read through
/proc/<pid>/map_files, which needs CAP_SYS_ADMIN, else counted as the mapping's length):
a memfd's pages are memory whether or not a process maps or has touched them.  Reported: peak minus baseline, as MiB and as a
fraction of the dataset; construction and first-batch times.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("fork", "forkserver", "spawn")

CHILD = r"""
import json, os, sys, threading, time
import numpy as np, psutil
import shmfeed

method, mib, settle_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
if method == "forkserver":
    assert shmfeed.start_fork_server()

def tree_bytes():
    me = psutil.Process()
    total, memfds = 0, {}
    for p in [me] + me.children(recursive=True):
        try:
            with open(f"/proc/{p.pid}/smaps_rollup") as f:
                rollup = {l.split(":")[0]: int(l.split()[1]) * 1024 for l in f if l.endswith("kB\n")}
            total += rollup["Pss"] - rollup.get("Pss_Shmem", 0)
            for fd in os.listdir(f"/proc/{p.pid}/fd"):
                path = f"/proc/{p.pid}/fd/{fd}"
                if os.readlink(path).startswith("/memfd:shmfeed"):
                    st = os.stat(path)
                    memfds[st.st_ino] = st.st_blocks * 512
            with open(f"/proc/{p.pid}/maps") as f:
                for line in f:
                    if "/memfd:shmfeed" in line:
                        fields = line.split()
                        lo, hi = (int(a, 16) for a in fields[0].split("-"))
                        try:  # the memfd behind the mapping (needs CAP_SYS_ADMIN)
                            size = os.stat(f"/proc/{p.pid}/map_files/{fields[0]}").st_blocks * 512
                        except OSError:
                            size = hi - lo  # at least what this mapping covers
                        memfds[int(fields[4])] = max(memfds.get(int(fields[4]), 0), size)
        except (OSError, psutil.Error, KeyError):
            continue
    return total + sum(memfds.values())

class Big:
    def __init__(self, nbytes):
        self.x = np.arange(nbytes // 8, dtype=np.int64).reshape(-1, 512)
    def __len__(self):
        return len(self.x)
    def __getitem__(self, i):
        return self.x[i]

ds = Big(mib << 20)
time.sleep(0.2)
base = tree_bytes()
peak = [base]
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], tree_bytes())
        stop.wait(0.005)
t = threading.Thread(target=sample, daemon=True)
t0 = time.perf_counter()
t.start()
loader = shmfeed.Loader(ds, batch_size=256, num_workers=2, start_method=method)
t1 = time.perf_counter()
first = next(iter(loader))
t2 = time.perf_counter()
assert np.array_equal(first, ds.x[:256])
del first
time.sleep(settle_s)
stop.set()
t.join()
peak[0] = max(peak[0], tree_bytes())
out = {"method": loader.start_method, "dataset_mib": mib,
       "peak_extra_mib": round((peak[0] - base) / 2**20, 1),
       "peak_extra_of_dataset": round((peak[0] - base) / (mib << 20), 3),
       "construct_s": round(t1 - t0, 3), "first_batch_s": round(t2 - t0, 3)}
loader.close()
print(json.dumps(out))
"""


def run(method: str, mib: int, settle_s: float) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, method, str(mib), str(settle_s)],
                         capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{method}: exit {out.returncode}\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=256, help="dataset size in MiB (default 256)")
    ap.add_argument("--settle-s", type=float, default=0.5,
                    help="how long memory is sampled after the first batch")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    args = ap.parse_args()
    for method in args.methods:
        print(json.dumps(run(method, args.mib, args.settle_s)), flush=True)


if __name__ == "__main__":
    main()
