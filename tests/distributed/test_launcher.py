"""The multi-process launcher itself: results come back, failures name their rank."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.support.gloo import RankFailed, run_ranks


def _sum_ranks(rank: int, world: int) -> int:
    t = torch.tensor([rank])
    dist.all_reduce(t)
    return int(t.item())


def _fail_on_one(rank: int, world: int) -> int:
    if rank == 1:
        raise ValueError("rank one is broken")
    return rank


def test_results_come_back_per_rank() -> None:
    assert run_ranks(_sum_ranks, 3) == [3, 3, 3]


def test_a_failing_rank_is_named() -> None:
    with pytest.raises(RankFailed, match="rank 1: ValueError"):
        run_ranks(_fail_on_one, 2, timeout_s=10)
