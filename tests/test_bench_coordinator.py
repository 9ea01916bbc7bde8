"""The coordinator benchmark runs end to end on a tiny world, so that it cannot rot: the
real RedisCoordinator committer and ranks (threads and protocol replicas) against its own
redis-server, format v2 and v1 reports interleaved."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.benchmarks import run_benchmark
from tests.support.redis_server import redis_server_binary


@pytest.mark.skipif(redis_server_binary() is None, reason="needs redis-server on PATH")
def test_bench_coordinator_commits_both_formats_on_a_tiny_world(tmp_path: Path) -> None:
    run = run_benchmark(
        "bench_coordinator",
        *("--ranks", "8", "--steps", "1", "--warmup", "0", "--real-ranks", "3"),
        *("--heartbeat-seconds", "0", "--spread-seconds", "0", "--format", "2,1"),
        timeout=120,
        json_out=tmp_path / "steps.json",
    )
    assert "format v2" in run.stdout and "format v1" in run.stdout
    steps = run.data["steps"]
    assert sorted(steps) == ["8/0.0/v1", "8/0.0/v2"]
    for key, (step,) in steps.items():
        assert step["format"] == int(key[-1])
        assert step["rt_max"] == 2 and step["replica_rt_max"] == 2  # report, one wait
    # A v2 manifest pins index files and describes layouts: smaller than v1's pieces.
    assert steps["8/0.0/v2"][0]["manifest_bytes"] < steps["8/0.0/v1"][0]["manifest_bytes"]
