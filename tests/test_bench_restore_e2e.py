"""The end-to-end restore benchmark runs in its quick mode, so that it cannot rot: fresh
gloo ranks on 1 and 2 processes save, restart, restore (checked against the save) and
take a first step, and every phase is reported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support.workers import REPO_ROOT


def test_bench_restore_e2e_quick_mode(tmp_path: Path) -> None:
    out = tmp_path / "e2e.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.bench_restore_e2e",
            "--quick",
            "--dir",
            str(tmp_path),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    assert sorted(result["medians"]) == ["1 rank, warm", "2 ranks, warm"]
    for phases in result["medians"].values():
        assert set(phases) >= {"import", "discovery", "planning", "reads", "apply", "total"}
        assert all(value >= 0 for value in phases.values())
        # Each value is a max over ranks: a rank's total covers its import and its restore.
        assert phases["total"] >= max(phases["import"], phases["restore"])
    for run in ("1 rank, warm", "2 ranks, warm"):
        assert run in done.stdout
    assert list(tmp_path.iterdir()) == [out]  # the checkpoints are gone
