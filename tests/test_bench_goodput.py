"""The goodput benchmark runs end to end, so that it cannot rot: a real torchrun job (FSDP2
over gloo) under CheckpointManager, a real SIGKILL from the driver, a real torchrun restart
that restores and trains on. Behaviour only: the figures are not judged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.benchmarks import run_benchmark


def run_bench(tmp_path: Path, mode: str, timeout: float) -> dict[str, Any]:
    run = run_benchmark(
        "bench_goodput",
        mode,
        "--dir",
        tmp_path,
        timeout=timeout,
        json_out=tmp_path / "goodput.json",
    )
    assert "| contender |" in run.stdout and "| GPUs |" in run.stdout
    data: dict[str, Any] = run.data
    return data


def check_run(run: dict[str, Any]) -> None:
    assert run["exit_status"] == 0, run
    assert 0.0 < run["goodput"] <= 1.0
    assert run["useful"] + run["lost"] == run["executed"]
    assert run["failures"] >= 1
    # Every failure was recovered from: a restarted generation trained after each kill.
    assert len(run["downtimes_s"]) == run["failures"]
    assert len(run["restores_s"]) >= 1 or run["contender"].endswith("every 20")


def test_smoke_kills_a_rank_and_the_restarted_job_resumes(tmp_path: Path) -> None:
    data = run_bench(tmp_path, "--smoke", timeout=240)
    assert data["mode"] == "smoke"
    (run,) = data["results"]
    check_run(run)
    assert run["kills"][0]["ranks"] == [1]
    assert run["committed"] >= 1  # a checkpoint landed before the kill, so the restart restored
    assert len(run["restores_s"]) == 1
    # The restored job resumed from a checkpoint, so less work was lost than was executed.
    assert run["useful"] > 0
    assert {row["gpus"] for row in data["projection"]} == {1024, 4096, 16384}
    assert all(0.0 < row["goodput"] < 1.0 for row in data["projection"])


@pytest.mark.slow
def test_quick_runs_every_contender_on_one_schedule(tmp_path: Path) -> None:
    data = run_bench(tmp_path, "--quick", timeout=600)
    names = [r["contender"] for r in data["results"]]
    assert names == ["ckpt every 5", "DCP every 5", "ckpt every 20", "ckpt auto"]
    for run in data["results"]:
        check_run(run)
        assert run["failures"] == len(data["schedule"])
    assert {row["contender"] for row in data["projection"]} == {"ckpt", "DCP", "blocking save"}
