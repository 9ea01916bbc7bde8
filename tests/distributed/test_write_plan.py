"""The multi-rank save plan (``assign_writers``) and the commit's tiling check.

Unit tests of the pure functions every rank runs on the exchanged piece lists: who
writes which piece, how large replicated pieces are cut into row ranges so that every
rank writes about the mean, and which sets of stored boxes the commit accepts. Then one
real run: 4 gloo ranks save a state dominated by large replicated tensors (raw and zstd),
and the checkpoints restore bit for bit onto 1 and onto 3 ranks.
"""

from __future__ import annotations

import math
import random
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt
from ckpt.coordination import LocalCoordinator, default_coordinator, merge_indexes
from ckpt.engine import (
    MIN_SPLIT_BYTES,
    PieceInfo,
    PieceKey,
    Rules,
    WritePlan,
    assign_writers,
    describe,
    description_digest,
    flatten,
)
from ckpt.format import (
    Box,
    ShardIndex,
    StoredPiece,
    TensorEntry,
    element_size,
    read_manifest,
    step_prefix,
)
from storage_backends import LocalBackend
from tests.distributed.sharded import global_value
from tests.support.gloo import run_ranks


def _piece(
    name: str, nbytes: int, offsets: tuple[int, ...] = (0,), lengths: tuple[int, ...] | None = None
) -> PieceInfo:
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
        assert again.shares == first.shares and again.bytes_per_rank == first.bytes_per_rank


def test_a_piece_held_by_one_rank_is_written_by_it() -> None:
    """Single holders are forced writers, even when that makes them the busiest rank;
    replicated pieces then go to the others."""
    per_rank = _replicated_world(3, [400, 400, 400])
    per_rank[0].append(_piece("big", 4000))
    plan = assign_writers(per_rank)
    assert plan.writers(("big", (0,), (1000,))) == (0,)
    assert {plan.writers((f"w{i}", (0,), (100,))) for i in range(3)} == {(1,), (2,)}
    assert plan.bytes_per_rank[0] == 4000


def test_replicated_pieces_written_once_and_balanced() -> None:
    """Many replicated pieces: each has exactly one writer, written bytes equal unique bytes,
    and the busiest writer stays within 1.5x of the mean."""
    rng = random.Random(1)
    for world in (2, 3, 4, 8):
        sizes = [rng.randrange(4, 100_000, 4) for _ in range(10 * world)]
        plan = assign_writers(_replicated_world(world, sizes))
        assert len(plan.shares) == len(sizes)
        assert all(len(shares) == 1 for shares in plan.shares.values())
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
    assert all(set(plan.writers(key)) <= ranks for key, ranks in holders.items())
    assert sum(plan.bytes_per_rank) == sum(p.nbytes for p in {p for ps in per_rank for p in ps})


def test_ties_go_to_the_lowest_rank_and_alternate() -> None:
    """Equal loads pick the lowest rank; equal-size pieces then alternate between ranks."""
    plan = assign_writers(_replicated_world(2, [8, 8, 8, 8]))
    writers = [plan.writers((f"w{i}", (0,), (2,))) for i in range(4)]
    assert writers == [(0,), (1,), (0,), (1,)]
    assert plan.bytes_per_rank == (16, 16) and plan.imbalance == 1.0


def test_a_rank_without_pieces_and_an_empty_plan() -> None:
    """A rank that holds nothing writes nothing; an empty state is perfectly balanced."""
    plan = assign_writers([[_piece("a", 8)], []])
    assert plan.bytes_per_rank == (8, 0) and plan.imbalance == 2.0
    empty = assign_writers([[], [], []])
    assert empty.shares == {} and empty.bytes_per_rank == (0, 0, 0) and empty.imbalance == 1.0


def test_empty_shards_are_not_pieces() -> None:
    """A 0-element local shard (more ranks than rows) is not offered for writing."""
    tensors, _ = flatten(
        {
            "empty": ckpt.ShardedTensor(torch.empty(0, 4), (2, 4), (2, 0)),
            "rows": ckpt.ShardedTensor(torch.ones(1, 4), (2, 4), (1, 0)),
        }
    )
    assert [(p.name, p.offsets, p.lengths, p.nbytes) for p in describe(tensors)] == [
        ("rows", (1, 0), (1, 4), 16)
    ]


# --------------------------------------------------------------------------- row ranges

MiB = 1 << 20
NEVER_CUT = 1 << 62  # as min_split_bytes: whole pieces only (the planner before row ranges)


def _matrix(
    name: str, rows: int, cols: int = 1024, itemsize: int = 4, first_row: int = 0
) -> PieceInfo:
    return PieceInfo(name, (first_row, 0), (rows, cols), rows * cols * itemsize)


def _norms(count: int) -> list[PieceInfo]:
    return [PieceInfo(f"norm{i}", (0,), (4096,), 4096 * 4) for i in range(count)]


def _assert_valid(
    plan: WritePlan, per_rank: list[list[PieceInfo]], min_split: int = MIN_SPLIT_BYTES
) -> None:
    """Every piece is written once: whole, or as contiguous row ranges in order that tile
    it, each by a different holder and at least ``min_split`` bytes; the loads add up."""
    holders: dict[PieceKey, set[int]] = defaultdict(set)
    pieces: dict[PieceKey, PieceInfo] = {}
    for rank, described in enumerate(per_rank):
        for p in described:
            holders[p.key].add(rank)
            pieces[p.key] = p
    assert plan.shares.keys() == pieces.keys()
    load = [0] * len(per_rank)
    for key, shares in plan.shares.items():
        piece = pieces[key]
        ranks = [s.rank for s in shares]
        assert set(ranks) <= holders[key] and len(set(ranks)) == len(ranks), (key, ranks)
        assert sum(s.nbytes for s in shares) == piece.nbytes
        if len(shares) == 1:
            assert shares[0].box == Box(piece.offsets, piece.lengths)
        else:
            itemsize = piece.nbytes // math.prod(piece.lengths)
            row = piece.offsets[0]
            for s in shares:
                assert (
                    s.box.offsets == (row, *piece.offsets[1:])
                    and s.box.lengths[1:] == piece.lengths[1:]
                )
                assert s.nbytes == s.box.numel * itemsize and s.nbytes >= min_split, (key, s)
                row += s.box.lengths[0]
            assert row == piece.offsets[0] + piece.lengths[0]
        for s in shares:
            load[s.rank] += s.nbytes
    assert plan.bytes_per_rank == tuple(load)
    assert sum(load) == sum(p.nbytes for p in pieces.values())


DDP_STATES = {
    "two 128 MiB matrices": [_matrix("embed", 32768), _matrix("head", 32768), *_norms(16)],
    "one 300 MiB matrix, odd rows": [_matrix("embed", 76801), *_norms(4)],
    "uneven sizes": [
        _matrix("a", 24_833),
        _matrix("b", 15_617, 1000),
        _matrix("c", 8_447, 1000, 2),
        _matrix("d", 1_793),
        _matrix("e", 777),
        *_norms(16),
    ],
    "a 1-D vector": [PieceInfo("vec", (0,), (50_000_017,), 200_000_068), *_norms(3)],
}


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("state", list(DDP_STATES))
def test_large_replicated_pieces_are_cut_into_balanced_row_ranges(world: int, state: str) -> None:
    """Pure data parallel with a few large tensors: the busiest rank writes <= 1.05x the
    mean, every byte exactly once; pieces are cut only where whole pieces are uneven."""
    per_rank = [list(DDP_STATES[state]) for _ in range(world)]
    plan = assign_writers(per_rank)
    _assert_valid(plan, per_rank)
    assert plan.imbalance <= 1.05, plan.bytes_per_rank
    whole = assign_writers(per_rank, min_split_bytes=NEVER_CUT)
    assert all(len(shares) == 1 for shares in whole.shares.values())
    cut = [len(shares) for shares in plan.shares.values() if len(shares) > 1]
    assert bool(cut) == (whole.imbalance > 1.05), (whole.bytes_per_rank, plan.bytes_per_rank)
    assert len(cut) < world


def test_tp_fsdp_mix_with_two_replicated_matrices_balances_four_ranks() -> None:
    """4 ranks, each with its own 32 MiB of shards plus two replicated 128 MiB matrices
    (the case whole-piece assignment left at 1.25x the mean): now even."""
    per_rank = [
        [
            *(_matrix(f"w{i}", 2048, first_row=2048 * r) for i in range(4)),
            _matrix("embed", 32768),
            _matrix("head", 32768),
            *_norms(16),
        ]
        for r in range(4)
    ]
    plan = assign_writers(per_rank)
    _assert_valid(plan, per_rank)
    assert plan.imbalance <= 1.01, plan.bytes_per_rank
    assert [len(plan.shares[(n, (0, 0), (32768, 1024))]) for n in ("embed", "head")] == [2, 2]


def test_a_rank_already_past_the_mean_gets_no_replicated_bytes() -> None:
    """Forced writers stay forced; the replicated bytes even out the other ranks."""
    per_rank = [[_matrix("embed", 32768), _matrix("head", 32768)] for _ in range(4)]
    per_rank[0].append(_matrix("own0", 25_600))  # 100 MiB only rank 0 holds
    for r in (1, 2, 3):
        per_rank[r].append(_matrix(f"own{r}", 2_560, first_row=r))  # 10 MiB each
    plan = assign_writers(per_rank)
    _assert_valid(plan, per_rank)
    assert plan.bytes_per_rank[0] == 100 * MiB
    others = plan.bytes_per_rank[1:]
    assert max(others) - min(others) <= MiB, plan.bytes_per_rank


def test_pieces_with_fewer_holders_are_placed_first() -> None:
    """A 30 MiB piece only ranks 0 and 1 hold goes first; the 90 MiB piece every rank
    holds then fills the others up: 40 MiB each (largest first would give 55, 55, 10)."""
    shared, pair = _matrix("shared", 23_040), _matrix("pair", 7_680)
    per_rank = [[shared, pair], [shared, pair], [shared]]
    plan = assign_writers(per_rank)
    _assert_valid(plan, per_rank)
    assert plan.bytes_per_rank == (40 * MiB, 40 * MiB, 40 * MiB)
    assert plan.writers(pair.key) == (0,) and plan.writers(shared.key) == (1, 2, 0)


def test_partly_replicated_large_pieces_are_cut_among_their_holders() -> None:
    """Large pieces held by random subsets of 6 ranks: ranges go to holders only, one per
    holder, the whole piece exactly once; the plan does not depend on list order."""
    rng = random.Random(3)
    per_rank: list[list[PieceInfo]] = [[] for _ in range(6)]
    for i in range(40):
        piece = _matrix(f"p{i}", rng.randrange(1, 9000), rng.choice([256, 1024]))
        for r in rng.sample(range(6), rng.randint(1, 6)):
            per_rank[r].append(piece)
    plan = assign_writers(per_rank)
    _assert_valid(plan, per_rank)
    assert any(len(shares) > 1 for shares in plan.shares.values())
    for _ in range(3):
        shuffled = [rng.sample(pieces, len(pieces)) for pieces in per_rank]
        assert assign_writers(shuffled) == plan


def test_replicated_data_spread_over_many_pieces_is_cut_rarely() -> None:
    """Hundreds of mid-size replicated pieces: balanced by whole pieces nearly everywhere;
    only a few pieces, about one per rank, are cut (never thousands of small pieces)."""
    rng = random.Random(4)
    pieces = [_matrix(f"p{i}", rng.randrange(64, 4096)) for i in range(300)]
    for world in (2, 3, 4, 8):
        per_rank = [list(pieces) for _ in range(world)]
        plan = assign_writers(per_rank)
        _assert_valid(plan, per_rank)
        assert plan.imbalance <= 1.05, (world, plan.bytes_per_rank)
        assert sum(len(shares) - 1 for shares in plan.shares.values()) <= world, world


def test_small_pieces_are_never_cut() -> None:
    """A piece smaller than two minimal ranges goes whole to one rank, even when the
    ranks stay uneven; so do a 0-d piece and a one-row piece, however large."""
    per_rank = [[_matrix("a", 500), _matrix("b", 300)] for _ in range(2)]  # ~1.95 and ~1.2 MiB
    plan = assign_writers(per_rank)
    assert [len(shares) for shares in plan.shares.values()] == [1, 1]
    assert assign_writers(per_rank, min_split_bytes=MiB // 2).imbalance < plan.imbalance
    six = [[_matrix("six", 1536)] for _ in range(3)]  # 6 MiB
    assert len(assign_writers(six, min_split_bytes=4 * MiB).shares[six[0][0].key]) == 1
    assert len(assign_writers(six, min_split_bytes=3 * MiB).shares[six[0][0].key]) == 2
    huge = [
        PieceInfo("scalar", (), (), 64 * MiB),
        PieceInfo("row", (0, 0), (1, 16 * MiB), 64 * MiB),
    ]
    plan = assign_writers([list(huge) for _ in range(4)])
    _assert_valid(plan, [list(huge) for _ in range(4)])
    assert plan.bytes_per_rank == (64 * MiB, 64 * MiB, 0, 0)


def test_a_1d_vector_is_cut_into_element_ranges() -> None:
    """A 1-D tensor's rows are its elements: the ranges are 1-D boxes over the vector."""
    vec = PieceInfo("vec", (0,), (10_000_003,), 40_000_012)
    plan = assign_writers([[vec] for _ in range(3)])
    _assert_valid(plan, [[vec] for _ in range(3)])
    boxes = [s.box for s in plan.shares[vec.key]]
    assert boxes == [
        Box((0,), (3_333_334,)),
        Box((3_333_334,), (3_333_334,)),
        Box((6_666_668,), (3_333_335,)),
    ]


def _index(rank: int, boxes: list[Box], shape: tuple[int, ...]) -> ShardIndex:
    pieces = tuple(
        StoredPiece.at(box, f"data/r{rank}-{i}.safetensors", 0, box.numel * 4, "raw", "0" * 16)
        for i, box in enumerate(boxes)
    )
    return ShardIndex(rank=rank, tensors={"t": TensorEntry("float32", shape, pieces)}, files={})


def _merge(*indexes: ShardIndex) -> None:
    merge_indexes(
        step=1, generation="g", world_size=len(indexes), chunk_bytes=1 << 20, indexes=indexes
    )


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


# --------------------------------------------------------------------------- 4 real ranks

# name -> (global shape, dtype): the same values on every rank (replicated), except
# "sharded", whose rows are split between the ranks. ~58 MB, 3/4 of it in three tensors,
# so that 4 ranks can be evened out to within a few percent with ranges of >= 1 MiB.
REPLICATED_STATE: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
    "embed": ((5001, 1024), torch.float32),
    "head": ((3999, 1024), torch.float32),
    "vector": ((3_000_001,), torch.float32),
    "half": ((2048, 1000), torch.bfloat16),
    "count": ((), torch.int64),
    **{f"norm{i}": ((1024,), torch.float32) for i in range(8)},
}
SHARDED = ((1024, 1024), torch.float32)
RESHARDED_ON_LOAD = ("embed", "vector", "sharded")  # row slices on 3 ranks; the rest whole
STEP = 5
TIMEOUT_S = 120.0
_WRITER = re.compile(r"-r(\d{5})-")


def _expected() -> dict[str, torch.Tensor]:
    shapes = {**REPLICATED_STATE, "sharded": SHARDED}
    return {name: global_value(name, shape, dtype) for name, (shape, dtype) in shapes.items()}


def _rows(value: torch.Tensor, rank: int, world: int) -> tuple[torch.Tensor, int]:
    """This rank's torch.chunk of ``value``'s rows, and where it starts."""
    chunks = torch.chunk(value, world)
    if rank >= len(chunks):
        return value[:0], value.shape[0]
    return chunks[rank], sum(len(c) for c in chunks[:rank])


def _state(
    rank: int, world: int, sharded: tuple[str, ...], values: dict[str, torch.Tensor]
) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for name, value in values.items():
        if name in sharded:
            local, first = _rows(value, rank, world)
            offsets = (first, *(0 for _ in value.shape[1:]))
            state[name] = ckpt.ShardedTensor(local.clone(), tuple(value.shape), offsets)
        else:
            state[name] = value.clone()
    return state


def _save_replicated(rank: int, world: int, root: str) -> dict[str, Any]:
    """Save the state raw (``ckpt.save``) and compressed; report what each save said."""
    state = _state(rank, world, ("sharded",), _expected())
    out = {}
    raw = ckpt.save(state, f"{root}/raw", step=STEP)
    out["raw"] = [raw.committed, raw.bytes_written, raw.write_imbalance]
    engine = ckpt.Snapshotter(ckpt.SaveOptions(compression=ckpt.Compression()))
    try:
        zst = engine.async_save(
            state, LocalBackend(f"{root}/zst"), STEP, default_coordinator()
        ).result(TIMEOUT_S)
    finally:
        engine.close()
    out["zst"] = [zst.committed, zst.bytes_written, zst.write_imbalance]
    return out


def _mismatches(
    state: dict[str, Any], expected: dict[str, torch.Tensor], rank: int, world: int
) -> list[str]:
    problems = []
    for name, want in expected.items():
        value = state[name]
        got = value.local if isinstance(value, ckpt.ShardedTensor) else value
        if isinstance(value, ckpt.ShardedTensor):
            want = _rows(want, rank, world)[0]
        if got.dtype != want.dtype or not torch.equal(
            got.view(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)
        ):
            problems.append(f"{name} (rank {rank} of {world})")
    return problems


def _load_replicated(rank: int, world: int, roots: list[str]) -> list[str]:
    """Load each checkpoint into zeros laid out for ``world`` ranks (whole tensors on one);
    the mismatches."""
    expected = _expected()
    sharded = RESHARDED_ON_LOAD if world > 1 else ()
    problems = []
    for root in roots:
        target = _state(rank, world, sharded, {n: torch.zeros_like(v) for n, v in expected.items()})
        if ckpt.load(target, root) != STEP:
            problems.append(f"{root}: another step")
        problems += [f"{root}: {p}" for p in _mismatches(target, expected, rank, world)]
    return problems


@pytest.fixture(scope="module")
def replicated_saves(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    root = tmp_path_factory.mktemp("replicated")
    return root, run_ranks(_save_replicated, 4, str(root), timeout_s=TIMEOUT_S)


def test_four_ranks_write_replicated_tensors_once_and_evenly(
    replicated_saves: tuple[Path, list[dict[str, Any]]],
) -> None:
    """Large replicated tensors are cut into row ranges written by different ranks: the
    busiest rank writes <= 1.05x the mean (planned, and counted from the manifest), the
    stored bytes are exactly the unique bytes, and every range is a valid safetensors
    tensor holding its rows."""
    from safetensors import safe_open

    root, results = replicated_saves
    expected = _expected()
    unique = sum(v.numel() * v.element_size() for v in expected.values())
    for codec in ("raw", "zst"):
        assert all(r[codec][0] for r in results), "every rank saw the commit"
        imbalances = {r[codec][2] for r in results}
        assert len(imbalances) == 1 and imbalances.pop() <= 1.05, results
        manifest = read_manifest(LocalBackend(root / codec), STEP)
        per_rank = [0] * 4
        for name, entry in manifest.tensors.items():
            for piece in entry.pieces:
                writer = _WRITER.search(piece.file)
                assert writer, piece.file
                per_rank[int(writer.group(1))] += piece.box.numel * element_size(entry.dtype)
            if not entry.shape or name.startswith("norm"):
                assert len(entry.pieces) == 1, (codec, name, entry.pieces)
        assert len(manifest.tensors["embed"].pieces) > 1, (
            "the largest tensor is cut into row ranges"
        )
        assert sum(per_rank) == unique
        assert max(per_rank) / (unique / 4) <= 1.05, per_rank
        assert sum(manifest.data_files.values()) == sum(r[codec][1] for r in results)
    manifest = read_manifest(LocalBackend(root / "raw"), STEP)
    assert sum(p.byte_length for e in manifest.tensors.values() for p in e.pieces) == unique
    step_dir = root / "raw" / step_prefix(STEP)
    for name, entry in manifest.tensors.items():
        for piece in entry.pieces:
            assert piece.codec == "raw"
            with safe_open(str(step_dir / piece.file), "pt") as f:
                region = tuple(
                    slice(o, o + n) for o, n in zip(piece.box.offsets, piece.box.lengths)
                )
                assert torch.equal(f.get_tensor(name), expected[name][region]), (name, piece.box)
    zst = read_manifest(LocalBackend(root / "zst"), STEP)
    assert {p.codec for p in zst.tensors["embed"].pieces} == {"zstd"}


def test_replicated_ranges_restore_onto_one_process(
    replicated_saves: tuple[Path, list[dict[str, Any]]],
) -> None:
    """Both checkpoints load bit for bit into whole plain tensors (no process group)."""
    root, _ = replicated_saves
    assert _load_replicated(0, 1, [str(root / "raw"), str(root / "zst")]) == []


def test_replicated_ranges_restore_onto_three_ranks(
    replicated_saves: tuple[Path, list[dict[str, Any]]],
) -> None:
    """On 3 ranks, row slices that straddle the stored ranges and whole replicated
    tensors both load bit for bit."""
    root, _ = replicated_saves
    results = run_ranks(
        _load_replicated, 3, [str(root / "raw"), str(root / "zst")], timeout_s=TIMEOUT_S
    )
    assert results == [[], [], []]


# -- the plan of the last save, reused while no rank's layout changes ------------------


class _CountingCoordinator:
    """The real coordinator, recording what each ``all_gather`` exchanged."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.gathered: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def all_gather(self, obj: Any) -> list[Any]:
        if isinstance(obj, list):
            self.gathered.append("pieces")
        elif isinstance(obj, tuple) and isinstance(obj[1], int):
            self.gathered.append("rules digest")
        elif isinstance(obj, tuple):
            self.gathered.append("digest")
        elif self.gathered[-1:] == ["rules digest"]:
            assert obj is None or isinstance(obj, Rules)  # one rank speaks for those alike
            self.gathered.append("rules")
        return list(self._inner.all_gather(obj))


def _cached_values(step: int, rows: int) -> dict[str, torch.Tensor]:
    return {
        "sharded": global_value(f"sharded{step}", (rows, 64), torch.float32),
        "bias": global_value(f"bias{step}", (64,), torch.float32),
    }


def _save_with_cached_plans(rank: int, world: int, root: str) -> list[list[str]]:
    """Seven saves on 2 ranks: the same layout twice, a new shape, rank 1 restarted (a fresh
    engine), the same layout again, in format v1 (no layouts: the next v2 save needs the
    whole plan), in v2. What each save exchanged, per save."""
    rows = {1: 96, 2: 96, 3: 80, 4: 80, 5: 80, 6: 80, 7: 80}
    engine = ckpt.Snapshotter()
    exchanged = []
    try:
        for step in range(1, 8):
            if step == 4 and rank == 1:
                engine.close()
                engine = ckpt.Snapshotter()
            coordinator = _CountingCoordinator(default_coordinator())
            state = _state(rank, world, ("sharded",), _cached_values(step, rows[step]))
            options = ckpt.SaveOptions(format_version=1 if step == 6 else 2)
            result = engine.async_save(
                state, LocalBackend(root), step, coordinator, options=options
            ).result(TIMEOUT_S)
            assert result.committed
            exchanged.append(coordinator.gathered)
    finally:
        engine.close()
    return exchanged


def test_a_save_with_the_last_layout_exchanges_one_digest_per_rank(tmp_path: Path) -> None:
    """The pieces are exchanged and planned again only when a rank's layout changed or a
    rank has no plan (restarted); every rank takes the same branch, and every step
    restores bit for bit."""
    results = run_ranks(_save_with_cached_plans, 2, str(tmp_path), timeout_s=TIMEOUT_S)
    planned = ["digest", "rules digest", "rules"]
    reused = ["digest"]
    exchanges = [planned, reused, planned, planned, reused, reused, planned]
    assert results[0] == results[1] == exchanges
    for step, rows in {1: 96, 2: 96, 3: 80, 4: 80, 5: 80, 6: 80, 7: 80}.items():
        expected = _cached_values(step, rows)
        target = {name: torch.zeros_like(value) for name, value in expected.items()}
        assert ckpt.load(target, str(tmp_path), step=step) == step
        assert _mismatches(target, expected, 0, 1) == [], step


def test_the_plan_digest_covers_every_input_of_the_plan() -> None:
    """A tensor's dtype, global shape, held box, an empty shard and the split size each
    change the digest; values do not."""
    base: dict[str, Any] = {"w": torch.zeros(8, 4), "b": torch.zeros(4)}
    digest = description_digest(flatten(base)[0], MIN_SPLIT_BYTES)
    assert (
        description_digest(flatten({"w": torch.ones(8, 4), "b": torch.ones(4)})[0], MIN_SPLIT_BYTES)
        == digest
    )
    variants: list[dict[str, Any]] = [
        {"w": torch.zeros(8, 4, dtype=torch.float64), "b": torch.zeros(4)},
        {"w": torch.zeros(4, 8), "b": torch.zeros(4)},
        {"w": ckpt.ShardedTensor(torch.zeros(4, 4), (8, 4), (4, 0)), "b": torch.zeros(4)},
        {**base, "empty": torch.zeros(0, 3)},
    ]
    for variant in variants:
        assert description_digest(flatten(variant)[0], MIN_SPLIT_BYTES) != digest, variant
    assert description_digest(flatten(base)[0], 2 * MIN_SPLIT_BYTES) != digest


def test_a_ranks_part_of_the_plan_is_what_the_whole_plan_gives_it() -> None:
    """``for_rank`` (what a rank keeps between saves) looks up only the rank's own pieces
    and finds the same regions as a scan of the whole plan."""
    per_rank = [
        [*_replicated_world(1, [4 << 20, 12, 3 << 20])[0], _piece(f"own{rank}", 4096)]
        for rank in range(4)
    ]
    plan = assign_writers(per_rank)
    for rank, held in enumerate(per_rank):
        mine = plan.for_rank(rank, [p.key for p in held])
        assert mine.boxes == plan.boxes_for(rank)
        assert mine.imbalance == plan.imbalance
    assert len(plan.shares[per_rank[0][0].key]) > 1, "the 4 MiB replicated piece is cut"


def test_a_save_planned_alone_leaves_the_kept_plan(tmp_path: Path) -> None:
    """``save_flat(reuse_plan=False)`` (the DCP writer, offline conversion) exchanges only its
    pieces, and the next ordinary save still reuses the plan it kept."""
    engine = ckpt.Snapshotter()
    backend = LocalBackend(tmp_path)
    state = _state(0, 1, (), _cached_values(1, 96))
    exchanged = []
    try:
        for step, alone in ((1, False), (2, True), (3, False)):
            coordinator = _CountingCoordinator(LocalCoordinator())
            if alone:
                tensors, tree = flatten(state)
                pending = engine.save_flat(
                    tensors, tree, backend, step, coordinator, reuse_plan=False
                )
            else:
                pending = engine.async_save(state, backend, step, coordinator)
            assert pending.result(TIMEOUT_S).committed
            exchanged.append(coordinator.gathered)
    finally:
        engine.close()
    assert exchanged == [["digest", "rules digest", "rules"], ["pieces"], ["digest"]]
    for step in (1, 2, 3):
        target = {name: torch.zeros_like(v) for name, v in _cached_values(1, 96).items()}
        assert ckpt.load(target, str(tmp_path), step=step) == step
        assert _mismatches(target, _cached_values(1, 96), 0, 1) == []


# -- the plan of a restored checkpoint, reused by the first save after a restart -------

SEEDED_SHAPES = {"sharded": (96, 64), "replicated": (4096, 1024), "bias": (64,)}  # 16 MiB: cut


def _seeded_values(step: int, rows: int = 96) -> dict[str, torch.Tensor]:
    shapes = {**SEEDED_SHAPES, "sharded": (rows, 64)}
    return {n: global_value(f"{n}{step}", s, torch.float32) for n, s in shapes.items()}


def _restart_and_save(rank: int, world: int, root: str) -> list[list[str]]:
    """Step 1 saved by one engine; then, as after a restart, fresh engines restore the step
    before and save: the same layout (2), rank 1 not seeded (3), a changed shape (4); then
    a module-level save (5) in the layout of step 3, the last one restored. Then two
    CheckpointManagers in another root: one saves step 1, the next restores it and
    saves step 2. What each save exchanged."""
    exchanged = []

    def save(engine: ckpt.Snapshotter, step: int) -> None:
        coordinator = _CountingCoordinator(default_coordinator())
        state = _state(rank, world, ("sharded",), _seeded_values(step, 80 if step == 4 else 96))
        assert engine.async_save(state, LocalBackend(root), step, coordinator).result(TIMEOUT_S)
        exchanged.append(coordinator.gathered)

    engine = ckpt.Snapshotter()
    for step in range(1, 5):
        try:
            save(engine, step)
        finally:
            engine.close()
        if step == 4:
            break
        engine = ckpt.Snapshotter()  # a restart: nothing kept
        target = _state(rank, world, ("sharded",), _seeded_values(step))
        report = ckpt.restore(target, root, step=step, coordinator=default_coordinator())
        assert report.manifest is not None and report.manifest.step == step
        if not (step == 2 and rank == 1):
            engine.reuse_plan_of(report.manifest)
    # Module-level saves: the default engine, made after those restores, takes the plan of
    # the last one (step 3's, the layout of steps 1-3), as ``ckpt.restore`` says.
    coordinator = _CountingCoordinator(default_coordinator())
    state = _state(rank, world, ("sharded",), _seeded_values(5))
    assert ckpt.async_save(state, root, step=5, coordinator=coordinator).result(TIMEOUT_S)
    exchanged.append(coordinator.gathered)

    managed = f"{root}/managed"
    for step in (1, 2):
        coordinator = _CountingCoordinator(default_coordinator())
        with ckpt.CheckpointManager(managed, coordinator=coordinator, every_steps=1) as mgr:
            state = _state(rank, world, ("sharded",), _seeded_values(step))
            assert mgr.restore(state) == (None if step == 1 else 1)
            coordinator.gathered.clear()
            assert mgr.save(step, state).result(TIMEOUT_S).committed
        exchanged.append(coordinator.gathered)
    return exchanged


def test_the_first_save_after_a_restart_reuses_the_restored_plan(tmp_path: Path) -> None:
    """A v2 manifest records the key of the plan it was saved with; a job restored from it
    on the same world size with the same layout saves without exchanging pieces (through a
    CheckpointManager, through an engine given the manifest, and through a module-level save
    after ckpt.restore). A rank not seeded, or a
    changed layout, makes every rank plan afresh. The layouts come out identical and every
    step restores bit for bit."""
    results = run_ranks(_restart_and_save, 2, str(tmp_path), timeout_s=TIMEOUT_S)
    planned, reused = ["digest", "rules digest", "rules"], ["digest"]
    assert results[0] == results[1] == [planned, reused, planned, planned, reused, planned, reused]
    backend = LocalBackend(tmp_path)
    manifests = {step: read_manifest(backend, step) for step in range(1, 5)}
    first = manifests[1]
    assert first.plan is not None
    layout = first.tensors["replicated"].layout
    assert layout is not None and layout.writer_ranks == {0, 1}, "cut between the ranks"
    for step in (2, 3):
        assert manifests[step].plan == first.plan
        assert {n: e.layout for n, e in manifests[step].tensors.items()} == {
            n: e.layout for n, e in first.tensors.items()
        }
    assert manifests[4].plan is not None and manifests[4].plan.key != first.plan.key
    managed = LocalBackend(tmp_path / "managed")
    assert read_manifest(managed, 2).plan == read_manifest(managed, 1).plan is not None
    assert read_manifest(backend, 5).plan == first.plan
    for step in range(1, 6):
        expected = _seeded_values(step, 80 if step == 4 else 96)
        target = {name: torch.zeros_like(value) for name, value in expected.items()}
        assert ckpt.load(target, str(tmp_path), step=step) == step
        assert _mismatches(target, expected, 0, 1) == [], step
