"""The I/O benchmarks run end to end on tiny states, so that they cannot rot between the runs
their tables come from: every contender saves and loads, and the loads are checked bit for
bit by the benchmarks themselves. Behaviour only: the figures are not judged. CI runs the
local and S3 ones; the others (tens of seconds each here) run with --full."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.benchmarks import run_benchmark


def test_bench_local_runs_every_contender(tmp_path: Path) -> None:
    run = run_benchmark(
        "bench_local",
        *("--gib", "0.02", "--repeats", "1", "--dir", tmp_path),
        timeout=240,
        json_out=tmp_path / "local.json",
    )
    assert "verified bit for bit: ckpt.load, dcp.load" in run.stdout
    for row in ("ckpt   save, to commit", "ckpt   async_save stall", "ckpt   load, cold"):
        assert row in run.stdout
    assert "load cold >= 0.95x raw cold read bandwidth" in run.stdout
    assert run.data


@pytest.mark.slow  # ~50 s: three gloo worlds, and planning up to 100,000 pieces
def test_bench_reshard_loads_every_pair_bit_identical(tmp_path: Path) -> None:
    run = run_benchmark(
        "bench_reshard",
        *("--mib", "4", "--repeats", "1", "--plan-repeats", "1", "--dir", tmp_path),
        timeout=300,
    )
    for pair in ("2 -> 1", "4 -> 2", "2 -> 3"):
        assert pair in run.stdout
    assert "PASS  both loads bit-identical to the expected tensors" in run.stdout


@pytest.mark.slow
def test_bench_distributed_verifies_its_warm_up_saves(tmp_path: Path) -> None:
    run = run_benchmark(
        "bench_distributed",
        *("--nproc", "2", "--mib", "4", "--repeats", "1", "--dir", tmp_path),
        timeout=300,
        json_out=tmp_path / "dist.json",
    )
    assert "verified bit for bit after the warm-up saves" in run.stdout
    assert all(run.data["2"]["verified"].values())


@pytest.mark.slow
def test_bench_budget_saves_under_each_budget(tmp_path: Path) -> None:
    run = run_benchmark(
        "bench_budget",
        *("--gib", "0.02", "--budgets", "none,4", "--repeats", "1", "--dir", tmp_path),
        timeout=240,
        json_out=tmp_path / "budget.json",
    )
    assert [row["budget"] for row in run.data["rows"]] == [None, 4 << 20]  # bytes


def test_bench_s3_against_moto(tmp_path: Path) -> None:
    run = run_benchmark("bench_s3", "--mib", "4", "--repeats", "1", "--server", "moto", timeout=240)
    assert "S3 save >= 0.9x TransferManager upload" in run.stdout
    assert "S3 restore >= 1.0x its download" in run.stdout


@pytest.mark.slow
def test_bench_metrics_measures_both_modes() -> None:
    run = run_benchmark(
        "bench_metrics", "--tensors", "10", "--rounds", "1", "--saves", "2", timeout=240
    )
    assert "no metrics" in run.stdout and "one span (no profiler), us" in run.stdout
