"""Every script in examples/ runs its ``--smoke`` self-check (a short real run that
verifies its own outcome) and exits 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.py"))


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_smoke(script: Path, tmp_path: Path) -> None:
    assert "--smoke" in script.read_text(), f"{script.name} has no --smoke mode for CI"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(script.parents[1])}
    done = subprocess.run(
        [sys.executable, str(script), "--smoke"],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=tmp_path,
        env=env,
    )
    assert done.returncode == 0, (
        f"{script.name} --smoke failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    )
    assert "smoke:" in done.stdout
