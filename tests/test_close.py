"""`close()` is fast for every start method and any number of loaders open at once
(issue 23: with two loaders made after JAX started, the second close took 4 s, because
the fork server sat in a receive that Python 3.11 does not make non-blocking and
never reaped the supervisor).  Real scripts, with JAX started where the method needs
it; benchmarks/bench_close.py measures the same for timing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT_TIMEOUT_S = 90.0
# The goal is 100 ms; this bound leaves room for a machine busy with other tests,
# and still fails the 4 s a close took when the fork server did not reap.
CLOSE_BOUND_S = 1.0

SCRIPT = """
import json, sys, time
import numpy as np
import shmfeed, shmfeed.jax

class Slow:
    def __len__(self):
        return 64
    def __getitem__(self, i):
        if i >= 8:   # the first batches come at once; the next are mid-build at close()
            time.sleep(5.0)
        return np.full((4,), i, np.float32)

method = sys.argv[1]
if method != "fork":
    import jax.numpy as jnp
    jnp.zeros(3).block_until_ready()   # JAX's backend runs: no plain fork from here
loaders = [shmfeed.Loader(Slow(), batch_size=4, num_workers=2, num_slots=4,
                          start_method="spawn" if method == "spawn" else "auto")
           for _ in range(3)]
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


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_every_close_of_several_loaders_is_fast_even_with_workers_mid_sample(tmp_path, method):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPT))
    out = subprocess.run([sys.executable, str(script), method], capture_output=True, text=True,
                         timeout=SCRIPT_TIMEOUT_S, cwd=tmp_path,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["started"] == [method] * 3
    assert max(result["close_s"]) < CLOSE_BOUND_S, result["close_s"]
