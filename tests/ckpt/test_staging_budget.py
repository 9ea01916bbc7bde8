"""A staging budget: a state larger than the host memory staging may hold is staged and
written in buckets that reuse one buffer, and loads back bit for bit."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

import ckpt
from ckpt.coordination import LocalCoordinator
from ckpt.format import DATA_DIR, read_manifest, step_prefix
from storage_backends import LocalBackend
from tests.support.faulty import FaultyBackend
from tests.support.gloo import RankFailed, run_ranks

MiB = 1 << 20
BUDGET = 1 * MiB


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    """About 4.6 MiB: a matrix cut into row ranges, rows larger than the budget (cut along
    dimension 1), a one-row tensor larger than the budget, and small and 0-d tensors."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "matrix": torch.randn(640, 1024, generator=gen),  # 2.5 MiB
        "wide_rows": torch.randn(3, 80_000, generator=gen).to(torch.bfloat16),  # 160 KB rows
        "one_row": torch.randn(1, 150_000, generator=gen).double(),  # 1.2 MB in one row
        "ids": torch.arange(40_000, dtype=torch.int64),
        "complex": torch.randn(300, 7, dtype=torch.complex64, generator=gen),
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 5),
    }


def _zeros_like(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: torch.zeros_like(t) for name, t in state.items()}


def _assert_bit_exact(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    for name, t in expected.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name


@pytest.mark.parametrize("compression", [None, ckpt.Compression(min_bytes=0)], ids=["raw", "zstd"])
def test_a_state_four_times_the_budget_saves_in_buckets_and_loads_bit_exact(
    tmp_path: Path, compression: ckpt.Compression | None, caplog: pytest.LogCaptureFixture
) -> None:
    state = _state()
    total = sum(t.nbytes for t in state.values())
    assert total > 4 * BUDGET
    snap = ckpt.Snapshotter(ckpt.SaveOptions(staging_budget_bytes=BUDGET, compression=compression))
    with caplog.at_level(logging.INFO, logger="ckpt.engine"):
        result = snap.async_save(state, LocalBackend(tmp_path), 1, LocalCoordinator()).result()
    assert 0 < snap.staging_bytes <= BUDGET
    snap.close()
    assert "buckets" in caplog.text and "staging_budget_bytes=1048576" in caplog.text
    assert result.committed and result.files > 4

    loaded = _zeros_like(state)
    assert ckpt.load(loaded, tmp_path) == 1
    _assert_bit_exact(loaded, state)

    manifest = read_manifest(LocalBackend(tmp_path), 1)
    assert len(manifest.tensors["one_row"].pieces) > 1  # one row cut along dimension 1
    if compression is None:  # the format is unchanged: every data file is safetensors
        for path in (p for p in manifest.files if p.startswith("data/")):
            with safe_open(str(tmp_path / step_prefix(1) / path), framework="pt") as f:
                assert list(f.keys())


def test_staging_never_holds_more_than_the_budget_across_saves(tmp_path: Path) -> None:
    state = _state()
    snap = ckpt.Snapshotter(ckpt.SaveOptions(staging_budget_bytes=BUDGET))
    assert 0 < snap.prepare(state) <= BUDGET
    for step in (1, 2):
        snap.async_save(state, LocalBackend(tmp_path), step, LocalCoordinator()).result()
        assert 0 < snap.staging_bytes <= BUDGET
    snap.close()


def test_the_budget_is_shared_by_the_checkpoints_in_flight(tmp_path: Path) -> None:
    state = _state()
    snap = ckpt.Snapshotter(ckpt.SaveOptions(staging_budget_bytes=2 * BUDGET), max_in_flight=2)
    pending = [
        snap.async_save(state, LocalBackend(tmp_path), step, LocalCoordinator()) for step in (1, 2)
    ]
    assert [p.result().step for p in pending] == [1, 2]
    assert 0 < snap.staging_bytes <= 2 * BUDGET
    snap.close()
    loaded = _zeros_like(state)
    assert ckpt.load(loaded, tmp_path) == 2
    _assert_bit_exact(loaded, state)


def test_a_budget_for_one_save_shrinks_a_buffer_kept_from_a_larger_one(tmp_path: Path) -> None:
    state = _state()
    snap = ckpt.Snapshotter()
    snap.async_save(state, LocalBackend(tmp_path), 1, LocalCoordinator()).result()
    assert snap.staging_bytes > BUDGET
    options = ckpt.SaveOptions(staging_budget_bytes=BUDGET)
    snap.async_save(state, LocalBackend(tmp_path), 2, LocalCoordinator(), options=options).result()
    assert 0 < snap.staging_bytes <= BUDGET
    snap.close()


def test_changes_after_async_save_returns_do_not_reach_the_checkpoint(tmp_path: Path) -> None:
    state = _state()
    expected = {name: t.clone() for name, t in state.items()}
    snap = ckpt.Snapshotter(ckpt.SaveOptions(staging_budget_bytes=BUDGET))
    pending = snap.async_save(state, LocalBackend(tmp_path), 1, LocalCoordinator())
    for t in state.values():
        t.zero_()
    pending.result()
    snap.close()
    loaded = _zeros_like(expected)
    ckpt.load(loaded, tmp_path)
    _assert_bit_exact(loaded, expected)


def test_a_budget_below_the_minimum_is_refused_before_anything_is_written(
    tmp_path: Path,
) -> None:
    with pytest.raises(ValueError, match="minimum of 65536 bytes"):
        ckpt.SaveOptions(staging_budget_bytes=4096)
    with pytest.raises(ValueError, match="at least 262144"):
        ckpt.Snapshotter(ckpt.SaveOptions(staging_budget_bytes=128 << 10), max_in_flight=4)
    snap = ckpt.Snapshotter(max_in_flight=4)
    options = ckpt.SaveOptions(staging_budget_bytes=128 << 10)
    with pytest.raises(ValueError, match="lower max_in_flight"):
        snap.async_save(_state(), LocalBackend(tmp_path), 1, LocalCoordinator(), options=options)
    snap.close()
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("blocking", [False, True], ids=["async", "blocking"])
def test_a_manager_with_a_staging_budget_saves_and_restores(tmp_path: Path, blocking: bool) -> None:
    """A blocking save streams each file as soon as it is staged, bucket by bucket."""
    state = _state()
    options = ckpt.SaveOptions(staging_budget_bytes=BUDGET)
    with ckpt.CheckpointManager(tmp_path, manual=True, save_options=options) as mgr:
        assert 0 < mgr.prepare(state) <= BUDGET
        mgr.save(7, state, blocking=blocking).result()
    restored = _zeros_like(state)
    with ckpt.CheckpointManager(tmp_path, manual=True) as mgr:
        assert mgr.restore(restored) == 7
    _assert_bit_exact(restored, state)


def _rank_saves_with_a_budget(rank: int, world: int, root: str) -> dict[str, Any]:
    from ckpt.coordination import ProcessGroupCoordinator

    shared = _state(seed=1)  # the same on both ranks: written once, shared out
    mine = torch.full((300, 1024), float(rank))  # 1.2 MiB, this rank's own
    state = {"shared": shared, "mine": ckpt.ShardedTensor(mine, (600, 1024), (300 * rank, 0))}
    coordinator = ProcessGroupCoordinator(timeout=60)
    snap = ckpt.Snapshotter(ckpt.SaveOptions(staging_budget_bytes=BUDGET))
    result = snap.async_save(state, LocalBackend(root), 3, coordinator).result()
    staging = snap.staging_bytes
    snap.close()
    loaded_shared = _zeros_like(shared)
    loaded_mine = ckpt.ShardedTensor(torch.zeros(300, 1024), (600, 1024), (300 * rank, 0))
    ckpt.load({"shared": loaded_shared, "mine": loaded_mine}, root, coordinator=coordinator)
    exact = torch.equal(loaded_mine.local, mine) and all(
        torch.equal(loaded_shared[name], t) for name, t in shared.items()
    )
    return {"exact": exact, "staging": staging, "bytes": result.bytes_written}


def test_two_gloo_ranks_save_and_load_under_a_budget(tmp_path: Path) -> None:
    try:
        outcomes = run_ranks(_rank_saves_with_a_budget, 2, str(tmp_path), timeout_s=120)
    except RankFailed as exc:  # pragma: no cover - reported with the ranks' tracebacks
        raise AssertionError(str(exc)) from None
    assert all(o["exact"] for o in outcomes), outcomes
    assert all(0 < o["staging"] <= BUDGET for o in outcomes), outcomes
    assert all(o["bytes"] > BUDGET for o in outcomes), outcomes  # both wrote several buckets


def test_a_write_failing_in_an_early_bucket_fails_the_call_and_leaves_no_files(
    tmp_path: Path,
) -> None:
    """Buckets before the last are written while the caller waits: their failure is the
    call's, and the step's partial files are removed."""
    snap = ckpt.Snapshotter(ckpt.SaveOptions(staging_budget_bytes=BUDGET))
    faulty = FaultyBackend(LocalBackend(tmp_path), fail_write_at=1)
    with faulty, pytest.raises(ckpt.CheckpointError):
        snap.async_save(_state(), faulty, 1, LocalCoordinator())
    data = tmp_path / step_prefix(1) / DATA_DIR
    assert not data.exists() or not any(data.iterdir())
    snap.async_save(_state(), LocalBackend(tmp_path), 1, LocalCoordinator()).result()
    snap.close()
    loaded = _zeros_like(_state())
    assert ckpt.load(loaded, tmp_path) == 1
    _assert_bit_exact(loaded, _state())
