"""Node failure, end to end: a torchrun job (FSDP2 over gloo) saves asynchronously, one
worker is SIGKILLed, the job comes back (on fewer workers, or restarted by torchrun),
restores the newest committed step, reshards, continues, and ends bit-identical to a
run that made the same world-size change at the same step without any failure. A worker
killed mid-save and torchrun's own restarts are in ``test_node_failure_restarts.py``.

Deterministic on CPU: gloo reductions and the ops used are deterministic for a given
world size, so the comparison is exact (torch.equal), not a tolerance.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.demo import sized_demo
from tests.support.redis_server import RedisServer, redis_server_binary


def test_workers_killed_mid_step_resume_on_fewer(tmp_path: Path, full: bool) -> None:
    """SIGKILL one worker after a step, relaunch with one worker fewer: resharded restore.
    2 -> 1 workers in CI, 4 -> 3 with --full."""
    nproc, resume_nproc = (4, 3) if full else (2, 1)
    result = sized_demo(
        tmp_path / "demo",
        full=full,
        nproc=nproc,
        resume_nproc=resume_nproc,
        seed=3,
    )
    assert result.restored_step is not None
    assert result.restored_step < result.crash_step
    assert result.identical


def test_redis_coordinated_workers_killed_mid_step_resume_on_more(
    tmp_path: Path, full: bool
) -> None:
    """The same story with the Redis coordinator (``ckpt demo --coordinator redis://...``):
    workers commit through a real redis-server, one is SIGKILLed, the job comes back on more
    workers and finishes (2 -> 3 in CI, 4 -> 3 with --full)."""
    nproc, resume_nproc = (4, 3) if full else (2, 3)
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed")
    with RedisServer(tmp_path / "redis") as server:
        result = sized_demo(
            tmp_path / "demo",
            full=full,
            nproc=nproc,
            resume_nproc=resume_nproc,
            seed=11,
            coordinator=server.url(),
        )
    assert result.restored_step is not None
    assert result.restored_step < result.crash_step
    assert result.identical
