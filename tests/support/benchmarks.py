"""Runs one benchmark as benchmarks/README.md shows it (``python -m benchmarks.NAME`` from
the repository root), for the smoke tests that keep every benchmark working."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.workers import REPO_ROOT


@dataclass(frozen=True)
class BenchmarkRun:
    """What a benchmark printed, and what it wrote with ``--json`` (None without it)."""

    stdout: str
    data: Any


def run_benchmark(
    name: str, *args: str | Path, timeout: float, json_out: Path | None = None
) -> BenchmarkRun:
    """Run ``benchmarks.<name>`` with ``args`` (and ``--json json_out``); it must succeed."""
    cmd = [sys.executable, "-m", f"benchmarks.{name}", *map(str, args)]
    if json_out is not None:
        cmd += ["--json", str(json_out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
    assert done.returncode == 0, (
        f"{name} exited with {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-4000:]}"
    )
    data = json.loads(json_out.read_text()) if json_out is not None else None
    return BenchmarkRun(done.stdout, data)
