"""The GPU benchmark runs where a device is lent for minutes only: its every step is checked
here first, on CPU tensors (``--cpu-dry-run``), so it cannot fail there on a typo."""

from __future__ import annotations

import subprocess

from tests.support.benchmarks import run_benchmark
from tests.support.workers import REPO_ROOT


def test_bench_gpu_runs_every_step_in_a_cpu_dry_run() -> None:
    run = run_benchmark(
        "bench_gpu", "--gib", "0.01", "--repeats", "1", "--cpu-dry-run", timeout=240
    )
    for line in (
        "ckpt async_save stall",
        "first save stall after prepare",
        "page-locked staging",
        "ckpt.load into device tensors",
    ):
        assert line in run.stdout


def test_gpu_check_script_parses() -> None:
    assert (
        subprocess.run(["bash", "-n", str(REPO_ROOT / "benchmarks" / "gpu_check.sh")]).returncode
        == 0
    )
