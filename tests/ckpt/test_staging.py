"""Staging buffers: exact-size page-locking, the fallback when pinning fails, a failure to
stage that aborts the step for every rank, and (on CUDA) the stream ordering of the copy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt
from ckpt.coordination import LocalCoordinator
from ckpt.engine import StagingPool
from storage_backends import LocalBackend
from tests.support.gloo import RankFailed, run_ranks

ODD_SIZE = (3 << 20) + 1  # a power-of-two allocator would hold 4 MiB for it
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="pinning succeeds where CUDA is present")
def test_a_pool_that_cannot_pin_stages_in_pageable_memory_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pool = StagingPool(pin=True)
    buffer = pool.acquire(ODD_SIZE)
    assert "could not page-lock" in caplog.text and "ulimit -l" in caplog.text
    assert not pool.pinned and pool.pinned_bytes == 0
    assert buffer.capacity == pool.reserved_bytes == ODD_SIZE
    src = torch.arange(ODD_SIZE, dtype=torch.uint8)
    pool.copy_in([(src, buffer.view(0, ODD_SIZE))])
    assert torch.equal(buffer.data, src)
    pool.release(buffer)
    pool.close()


def test_reserve_allocates_ahead_and_acquire_reuses_it() -> None:
    pool = StagingPool(slots=2, pin=False)
    assert pool.reserve(ODD_SIZE) == 2 * ODD_SIZE
    assert pool.reserve(ODD_SIZE - 5) == 0  # large enough already
    first, second = pool.acquire(100), pool.acquire(ODD_SIZE)
    assert first.capacity == second.capacity == ODD_SIZE
    assert pool.reserved_bytes == 2 * ODD_SIZE
    pool.close()
    assert pool.reserved_bytes == 0


@needs_cuda
@pytest.mark.cuda
def test_cuda_staging_pins_exactly_the_buffer_and_unpins_on_close() -> None:
    pool = StagingPool()
    buffer = pool.acquire(ODD_SIZE)
    assert buffer.data.is_pinned()
    assert pool.pinned_bytes == pool.reserved_bytes == ODD_SIZE
    pool.release(buffer)
    bigger = pool.acquire(2 * ODD_SIZE)  # replaces the first: its pages are unlocked
    assert pool.pinned_bytes == 2 * ODD_SIZE
    pool.release(bigger)
    pool.close()
    assert pool.pinned_bytes == 0


@needs_cuda
@pytest.mark.cuda
def test_the_copy_waits_for_kernels_queued_before_the_save(tmp_path: Path) -> None:
    """Without the side stream waiting on the compute stream, the copy would read ``x`` before
    the queued ``add_`` (held back by a long ``_sleep`` kernel) ran."""
    x = torch.zeros(64 << 20, device="cuda")
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU time before the add
    x.add_(1)
    snap = ckpt.Snapshotter()
    snap.async_save({"x": x}, LocalBackend(tmp_path), 1, LocalCoordinator()).result()
    snap.close()
    x.zero_()
    target = {"x": torch.zeros(64 << 20, device="cuda")}
    assert ckpt.load(target, tmp_path) == 1
    assert torch.equal(target["x"], torch.ones(64 << 20, device="cuda"))


def _rank_with_failing_staging(rank: int, world: int, root: str) -> str:
    from ckpt.coordination import ProcessGroupCoordinator

    coordinator = ProcessGroupCoordinator(timeout=120)
    snap = ckpt.Snapshotter()
    if rank == 1:

        def no_memory(*args: Any, **kwargs: Any) -> Any:
            raise MemoryError("no host memory for staging")

        snap._pool.acquire = no_memory  # type: ignore[method-assign]
    state = {"w": torch.full((1000,), float(rank))}
    try:
        snap.async_save(state, LocalBackend(root), 1, coordinator).result()
    except (ckpt.CheckpointError, MemoryError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        snap.close(wait=False)
    return "saved"


def test_a_rank_that_cannot_stage_aborts_the_step_for_every_rank(tmp_path: Path) -> None:
    """The step had begun on every rank: the others learn at once, not at a timeout."""
    try:
        outcomes = run_ranks(_rank_with_failing_staging, 2, str(tmp_path), timeout_s=120)
    except RankFailed as exc:  # pragma: no cover - reported with the ranks' tracebacks
        raise AssertionError(str(exc)) from None
    assert outcomes[1].startswith("MemoryError")
    assert "no host memory" in outcomes[0], outcomes[0]  # the abort carries the cause
    assert ckpt.CheckpointManager(tmp_path, manual=True).restore({"w": torch.zeros(1000)}) is None
