"""Unit tests of the multi-rank save plan (``assign_writers``) and the commit's tiling check.

No processes: these are the pure functions every rank runs on the exchanged piece lists.
"""

from __future__ import annotations

import random

import pytest
import torch

import ckpt
from ckpt._commit import merge_indexes
from ckpt._flatten import flatten
from ckpt._format import ShardIndex, StoredPiece, TensorEntry
from ckpt._geometry import Box
from ckpt._plan import PieceInfo, assign_writers, describe


def _piece(name: str, nbytes: int, offsets: tuple[int, ...] = (0,), lengths: tuple[int, ...] | None = None) -> PieceInfo:
    return PieceInfo(name, offsets, lengths if lengths is not None else (nbytes // 4,), nbytes)


def _replicated_world(world: int, sizes: list[int]) -> list[list[PieceInfo]]:
    return [[_piece(f"w{i}", n) for i, n in enumerate(sizes)] for _ in range(world)]


def test_same_plan_whatever_order_ranks_list_their_pieces() -> None:
    """Every rank computes the same plan: it depends on the pieces, not on list order."""
    rng = random.Random(0)
    sizes = [rng.randrange(4, 4000, 4) for _ in range(60)]
    per_rank = _replicated_world(4, sizes)
    per_rank[1].append(_piece("only1", 40))
    first = assign_writers(per_rank)
    for _ in range(5):
        shuffled = [rng.sample(pieces, len(pieces)) for pieces in per_rank]
        again = assign_writers(shuffled)
        assert again.writer == first.writer and again.bytes_per_rank == first.bytes_per_rank


def test_a_piece_held_by_one_rank_is_written_by_it() -> None:
    """Single holders are forced writers, even when that makes them the busiest rank;
    replicated pieces then go to the others."""
    per_rank = _replicated_world(3, [400, 400, 400])
    per_rank[0].append(_piece("big", 4000))
    plan = assign_writers(per_rank)
    assert plan.writer[("big", (0,), (1000,))] == 0
    assert {plan.writer[(f"w{i}", (0,), (100,))] for i in range(3)} == {1, 2}
    assert plan.bytes_per_rank[0] == 4000


def test_replicated_pieces_written_once_and_balanced() -> None:
    """Many replicated pieces: each has exactly one writer, written bytes equal unique bytes,
    and the busiest writer stays within 1.5x of the mean."""
    rng = random.Random(1)
    for world in (2, 3, 4, 8):
        sizes = [rng.randrange(4, 100_000, 4) for _ in range(10 * world)]
        plan = assign_writers(_replicated_world(world, sizes))
        assert len(plan.writer) == len(sizes)
        assert sum(plan.bytes_per_rank) == sum(sizes)
        assert plan.imbalance <= 1.5, (world, plan.bytes_per_rank)


def test_partly_replicated_pieces_go_to_one_of_their_holders() -> None:
    """A piece held by a subset of ranks (one DP group's copy) is written by one of them."""
    rng = random.Random(2)
    per_rank: list[list[PieceInfo]] = [[] for _ in range(6)]
    holders: dict[tuple[str, tuple[int, ...], tuple[int, ...]], set[int]] = {}
    for i in range(80):
        piece = _piece(f"p{i}", rng.randrange(4, 10_000, 4))
        holders[piece.key] = set(rng.sample(range(6), rng.randint(1, 6)))
        for r in holders[piece.key]:
            per_rank[r].append(piece)
    plan = assign_writers(per_rank)
    assert all(plan.writer[key] in ranks for key, ranks in holders.items())
    assert sum(plan.bytes_per_rank) == sum(p.nbytes for p in {p for ps in per_rank for p in ps})


def test_ties_go_to_the_lowest_rank_and_alternate() -> None:
    """Equal loads pick the lowest rank; equal-size pieces then alternate between ranks."""
    plan = assign_writers(_replicated_world(2, [8, 8, 8, 8]))
    writers = [plan.writer[(f"w{i}", (0,), (2,))] for i in range(4)]
    assert writers == [0, 1, 0, 1]
    assert plan.bytes_per_rank == (16, 16) and plan.imbalance == 1.0


def test_a_rank_without_pieces_and_an_empty_plan() -> None:
    """A rank that holds nothing writes nothing; an empty state is perfectly balanced."""
    plan = assign_writers([[_piece("a", 8)], []])
    assert plan.bytes_per_rank == (8, 0) and plan.imbalance == 2.0
    empty = assign_writers([[], [], []])
    assert empty.writer == {} and empty.bytes_per_rank == (0, 0, 0) and empty.imbalance == 1.0


def test_empty_shards_are_not_pieces() -> None:
    """A 0-element local shard (more ranks than rows) is not offered for writing."""
    tensors, _ = flatten({
        "empty": ckpt.ShardedTensor(torch.empty(0, 4), (2, 4), (2, 0)),
        "rows": ckpt.ShardedTensor(torch.ones(1, 4), (2, 4), (1, 0)),
    })
    assert [(p.name, p.offsets, p.lengths, p.nbytes) for p in describe(tensors)] == [("rows", (1, 0), (1, 4), 16)]


def _index(rank: int, boxes: list[Box], shape: tuple[int, ...]) -> ShardIndex:
    pieces = tuple(
        StoredPiece(box, f"data/r{rank}-{i}.safetensors", 0, box.numel * 4, "raw", "0" * 16)
        for i, box in enumerate(boxes)
    )
    return ShardIndex(rank=rank, tensors={"t": TensorEntry("float32", shape, pieces)}, files={})


def _merge(*indexes: ShardIndex) -> None:
    merge_indexes(step=1, generation="g", world_size=len(indexes), chunk_bytes=1 << 20, indexes=indexes)


def test_commit_accepts_shards_that_tile_the_tensor() -> None:
    """Shards over rows, over columns, and over a 2x2 grid tile the tensor and commit."""
    _merge(_index(0, [Box((0, 0), (3, 4))], (6, 4)), _index(1, [Box((3, 0), (3, 4))], (6, 4)))
    _merge(_index(0, [Box((0, 0), (6, 2))], (6, 4)), _index(1, [Box((0, 2), (6, 2))], (6, 4)))
    grid = [Box((r, c), (3, 2)) for r in (0, 3) for c in (0, 2)]
    _merge(*(_index(i, [box], (6, 4)) for i, box in enumerate(grid)))


@pytest.mark.parametrize(
    "boxes",
    [
        [Box((0, 0), (3, 4)), Box((1, 0), (3, 4))],  # rows 1-2 twice, 4-5 never: count matches
        [Box((0, 0), (6, 3)), Box((0, 2), (6, 1))],  # column 2 twice, column 3 never
        [Box((0, 0), (3, 2)), Box((3, 0), (3, 2)), Box((0, 2), (4, 2)), Box((2, 2), (2, 2))],
    ],
)
def test_commit_refuses_overlapping_shards_even_when_the_count_matches(boxes: list[Box]) -> None:
    """Overlapping shards whose sizes add up to the tensor's still leave holes: not committed."""
    assert sum(b.numel for b in boxes) == 24
    with pytest.raises(ckpt.InvalidStateError, match="overlap"):
        _merge(*(_index(i, [box], (6, 4)) for i, box in enumerate(boxes)))


def test_commit_refuses_a_gap() -> None:
    """Shards that cover fewer elements than the global shape are not committed."""
    with pytest.raises(ckpt.InvalidStateError, match="cover 16 of 24"):
        _merge(_index(0, [Box((0, 0), (2, 4))], (6, 4)), _index(1, [Box((4, 0), (2, 4))], (6, 4)))
