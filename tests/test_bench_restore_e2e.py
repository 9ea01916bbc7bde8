"""The end-to-end restore benchmark runs in its quick mode, so that it cannot rot: fresh
gloo ranks on 1 and 2 processes save, restart, restore (checked against the save) and
take a first step, and every phase is reported."""

from __future__ import annotations

from pathlib import Path

from tests.support.benchmarks import run_benchmark


def test_bench_restore_e2e_quick_mode(tmp_path: Path) -> None:
    out = tmp_path / "e2e.json"
    run = run_benchmark(
        "bench_restore_e2e", "--quick", "--dir", tmp_path, timeout=300, json_out=out
    )
    result = run.data
    assert sorted(result["medians"]) == ["1 rank, warm", "2 ranks, warm"]
    for phases in result["medians"].values():
        assert set(phases) >= {"import", "discovery", "planning", "reads", "apply", "total"}
        assert all(value >= 0 for value in phases.values())
        # Each value is a max over ranks: a rank's total covers its import and its restore.
        assert phases["total"] >= max(phases["import"], phases["restore"])
    for name in ("1 rank, warm", "2 ranks, warm"):
        assert name in run.stdout
    assert list(tmp_path.iterdir()) == [out]  # the checkpoints are gone
