import os
import subprocess
import sys
from pathlib import Path

import numpy as np

import shmfeed


class Counting:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"x": np.full((3,), i, np.int32), "y": i}


def test_two_workers_deliver_every_sample_once_in_order():
    with shmfeed.Loader(Counting(21), batch_size=4, num_workers=2) as loader:
        ys = np.concatenate([b["y"].copy() for b in loader])
    assert ys.tolist() == list(range(21))


def test_importing_elsewhere_than_linux_says_linux_only_instead_of_failing_later():
    # The platform is faked in a fresh interpreter: memfd and futex exist only on Linux.
    code = "import sys; sys.platform = 'darwin'; import shmfeed"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(Path(shmfeed.__file__).parents[1])))
    assert proc.returncode != 0
    assert "ImportError: shmfeed runs on Linux only (this is darwin)" in proc.stderr
