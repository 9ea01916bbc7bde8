"""The embedded coordinator (no server): a single process, or the job's process group
with reports and the commit going through storage. Its index is the storage listing."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckpt.format import scan_steps
from storage_backends import StorageBackend
from tests.coordination.conformance import CoordinatorConformance
from tests.coordination.harness import CoordSpec


class TestEmbeddedConformance(CoordinatorConformance):
    """``LocalCoordinator`` in one process, ``ProcessGroupCoordinator`` across gloo ranks."""

    @pytest.fixture
    def spec(self) -> CoordSpec:
        return CoordSpec("embedded", timeout=5.0)

    def committed_index(self, spec: CoordSpec, backend: StorageBackend) -> list[int]:
        return sorted(scan_steps(backend).committed, reverse=True)


def _fail_rank1_write(rank: int, world: int, root: str) -> str:
    """Rank 1's data write fails; every rank must fail fast, naming the failure."""
    import torch

    import ckpt
    from ckpt.coordination import ProcessGroupCoordinator
    from storage_backends import LocalBackend, StorageBackendError
    from tests.support.faulty import FaultyBackend

    inner = LocalBackend(root)
    backend = (
        FaultyBackend(inner, fail_write_at=1, error=StorageBackendError) if rank == 1 else inner
    )
    coordinator = ProcessGroupCoordinator(timeout=120)
    state = {
        "w": ckpt.ShardedTensor(torch.full((4,), float(rank)), (8,), (4 * rank,), replicated=False)
    }
    try:
        ckpt.Snapshotter().async_save(state, backend, 1, coordinator).result(timeout=60)
    except ckpt.CheckpointError as exc:
        return type(exc).__name__ + ": " + str(exc)[:200]
    return "committed"


def test_a_rank_whose_write_fails_aborts_the_step_for_everyone(tmp_path: Path) -> None:
    """A failed data write on one rank aborts the step at once: the other rank gets an error
    naming the failure long before its 120 s timeout, and no manifest is written."""
    from tests.support.gloo import run_ranks

    results = run_ranks(_fail_rank1_write, 2, str(tmp_path), timeout_s=60)
    assert all(r != "committed" for r in results), results
    assert "rank 1 failed" in results[0]
    assert not (tmp_path / "step-000000001" / "manifest.json").exists()
