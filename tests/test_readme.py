"""The README's pipeline examples (issue 28) run as written: each python block of the
README that shows Stream resume, token budgets, and Packed/Mix/Sampled/strings/
batch_transform runs in a fresh interpreter, followed by checks of what its comments
claim.  A block that is renamed or rewritten past recognition fails here (it is found by
a line it contains), not silently skipped."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK_TIMEOUT_S = 120
PREAMBLE = "import numpy as np\nimport shmfeed\n"  # what the README's first example imported

# (a line that identifies the block, checks run after it in the same namespace)
BLOCKS = {
    "stream-resume": ("def make(shard_index, num_shards, start=0):", """
        with shmfeed.Loader(shmfeed.sources.Stream(make, num_shards=4), batch_size=3, num_workers=1) as loader:
            full = [batch["x"][:, 0].tolist() for batch in loader]
        assert rest == full[3:], (rest, full)
    """),
    "token-budget": ("token_budget=8192", """
        assert {(128, 64), (64, 128), (32, 256), (16, 512)} <= shapes, shapes
        assert all(rows * width <= 8192 for rows, width in shapes), shapes
    """),
    "pipelines": ("from shmfeed.sources import Mix, Packed, Sampled", """
        assert packed.fill >= 0.95, packed.fill
        assert counts.sum() == 1000 and counts[9] > 3 * counts[:9].max(), counts
        m = Mix([packed, code], [0.8, 0.2])
        assert [m.schedule(i)[0] for i in range(5)].count(1) == 1  # rows 4:1
    """),
}


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_readme_pipeline_example_runs_as_written(name, tmp_path):
    marker, checks = BLOCKS[name]
    found = [b for b in _python_blocks() if marker in b]
    assert len(found) == 1, f"README.md has {len(found)} python blocks with {marker!r}, expected 1"
    script = tmp_path / f"readme_{name}.py"
    script.write_text(PREAMBLE + found[0] + textwrap.dedent(checks))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=BLOCK_TIMEOUT_S)
    assert done.returncode == 0, f"README block {name!r} failed:\n{done.stderr[-3000:]}"
