"""Training scripts as people write them, run as real interpreters: no
`if __name__ == "__main__":` guard, datasets defined in the script, in `python -c` or
on stdin, holding lambdas, the loader made after JAX has started (so its pool starts in
a fresh interpreter), a decoy `shmfeed/` in the working directory.  And the user's
global RNG streams, which shmfeed leaves as it found them.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from _sources import DataGenerator

import shmfeed

ROOT = Path(__file__).resolve().parent.parent
SCRIPT_TIMEOUT_S = 90.0

# The body of the scripts below: JAX runs before the loader exists, the dataset class
# lives in __main__ and holds a lambda, its on_epoch_end reshuffles with np.random, and
# every run of the body leaves a line in BODY_LOG.
BODY = """
import os, sys
import numpy as np
import jax.numpy as jnp
import shmfeed

with open(os.environ["BODY_LOG"], "a") as f:
    f.write(f"body ran in {os.getpid()}\\n")
jnp.zeros(3).block_until_ready()

class Volumes:
    def __init__(self, n):
        self.n, self.scale = n, (lambda x: x * 10)
        self.order = np.arange(n)
    def __len__(self):
        return self.n
    def __getitem__(self, b):
        return np.full((2, 3), self.scale(self.order[b]), np.int64)
    def on_epoch_end(self):
        np.random.shuffle(self.order)

np.random.seed(4)
ds = Volumes(6)
seen = []
with shmfeed.Loader(ds, batch_size=None, num_workers=2) as loader:
    for epoch in range(3):
        want = [int(v) * 10 for v in ds.order]
        got = [int(x[0, 0]) for x in loader]
        assert got == want, (got, want)
        seen.append(got)
    assert loader.pool_pid is not None
assert seen[0] != seen[1] or seen[1] != seen[2]
print("trained", seen)
"""


def _run(args: list[str], tmp_path: Path, *, stdin: str | None = None, cwd: Path | None = None,
         ) -> subprocess.CompletedProcess:
    env = dict(os.environ, BODY_LOG=str(tmp_path / "body.log"), PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, *args], input=stdin, capture_output=True, text=True,
                         timeout=SCRIPT_TIMEOUT_S, env=env, cwd=cwd or tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "trained" in out.stdout
    return out


def _body_runs(tmp_path: Path) -> int:
    return len((tmp_path / "body.log").read_text().splitlines())


def test_a_script_without_main_guard_runs_its_body_once(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(BODY)
    out = _run([str(script)], tmp_path)
    assert _body_runs(tmp_path) == 1, out.stderr
    assert out.stderr.count("starting workers from a fresh interpreter") == 1


@pytest.mark.parametrize("how", ["python -c", "stdin"])
def test_a_dataset_defined_in_python_c_or_stdin_works(tmp_path, how):
    if how == "stdin":
        _run(["-"], tmp_path, stdin=BODY)
    else:
        _run(["-c", BODY], tmp_path)
    assert _body_runs(tmp_path) == 1


def test_child_interpreters_import_the_same_shmfeed_whatever_the_working_directory(tmp_path):
    # A checkout without its compiled core, say, in the working directory: `python -c`
    # puts the working directory first on sys.path.
    decoy = tmp_path / "checkout"
    (decoy / "shmfeed").mkdir(parents=True)
    (decoy / "shmfeed" / "__init__.py").write_text("raise ImportError('the decoy shmfeed')\n")
    script = tmp_path / "train.py"
    script.write_text(BODY)
    _run([str(script)], tmp_path, cwd=decoy)
    assert _body_runs(tmp_path) == 1


def test_a_source_that_cannot_be_pickled_fails_at_construction_naming_the_attribute(tmp_path):
    script = textwrap.dedent("""
        import threading
        import numpy as np, jax.numpy as jnp, shmfeed
        jnp.zeros(3).block_until_ready()
        class Reader:
            def __init__(self):
                self.cache = {"index": threading.Lock()}
        class S:
            def __init__(self):
                self.reader = Reader()
            def __len__(self):
                return 4
            def __getitem__(self, i):
                return np.float32(i)
        try:
            shmfeed.Loader(S(), batch_size=2, num_workers=1)
        except shmfeed.SourcePickleError as e:
            print("path:", e.path)
            print(e)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=SCRIPT_TIMEOUT_S, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert "path: source.reader.cache['index']" in out.stdout, out.stdout + out.stderr
    assert "JAX's backend is running in this process" in out.stdout


@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_users_rng_streams_go_on_as_if_shmfeed_were_not_there(num_workers):
    """Keras calls the tutorial's on_epoch_end (np.random.shuffle) once per epoch; with
    shmfeed the hooks see the same stream and the user's later draws are the same."""
    ids = list(range(20))
    labels = {i: i % 5 for i in ids}

    def draws():
        return np.random.random(3).tolist(), random.random()

    np.random.seed(123)
    random.seed(9)
    gen = DataGenerator(ids, labels, batch_size=4)
    orders = []
    for _ in range(3):
        orders.append(gen.indexes.tolist())
        gen.on_epoch_end()
    want = orders, draws()

    np.random.seed(123)
    random.seed(9)
    gen = DataGenerator(ids, labels, batch_size=4)
    orders = []
    with shmfeed.Loader(gen, batch_size=None, num_workers=num_workers) as loader:
        for _ in range(3):
            orders.append(gen.indexes.tolist())
            batches = [x[:, 0, 0].astype(int).tolist() for x, _ in loader]
            assert sum(batches, []) == orders[-1]
    assert (orders, draws()) == want


def test_seed_none_follows_the_users_np_random_seed_without_drawing_from_it():
    def run(user_seed):
        np.random.seed(user_seed)
        with shmfeed.Loader(np.arange(12), batch_size=4, num_workers=0, shuffle=True,
                            seed=None) as loader:
            order = [b.tolist() for b in loader]
        return order, np.random.random()

    first, again, other = run(1), run(1), run(2)
    assert first == again and first[0] != other[0]
    np.random.seed(1)
    assert first[1] == np.random.random()  # the stream was not drawn from
