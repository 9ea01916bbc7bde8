"""The write plan made from rank-independent rules (``ckpt.engine._regular``).

The rules planner must make exactly the plan ``assign_writers`` makes of every rank's
pieces: the same shares, the same bytes per rank, the same part for each rank and the same
layouts described. These tests simulate jobs of up to 64 ranks on meshes of one to three
dimensions (even, uneven and empty shards, replicated dimensions, a dimension split twice,
pipeline stages holding different tensors, plain tensors held by some ranks) and compare
the two planners on them; the region rule is compared with DTensor's own.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

from ckpt.coordination import LocalCoordinator
from ckpt.engine import (
    REPLICATED,
    FlatTensor,
    MeshPlacement,
    MeshRanks,
    PieceInfo,
    RegularPlan,
    Rule,
    Rules,
    ShardedTensor,
    WritePlan,
    assign_writers,
    box_at,
    flatten,
    plan_now,
    plan_rules,
    rules_of,
)
from ckpt.format import Box, element_size

SPLIT = 4096  # small, so that the replicated pieces of these tests are cut too


@pytest.mark.parametrize(
    ("shape", "mesh_shape", "shards"),
    [
        ((10,), (4,), (0,)),
        ((3, 5), (8,), (0,)),
        ((0, 4), (2,), (0,)),
        ((7, 9), (2, 3), (0, 1)),
        ((7, 9), (2, 3), (1, 0)),
        ((13, 4), (2, 3), (0, 0)),
        ((5, 6, 7), (2, 2, 2), (2, REPLICATED, 0)),
        ((6,), (3, 2), (REPLICATED, 0)),
    ],
)
def test_regions_are_those_dtensor_gives(
    shape: tuple[int, ...], mesh_shape: tuple[int, ...], shards: tuple[int, ...]
) -> None:
    placements = [Replicate() if d == REPLICATED else Shard(d) for d in shards]
    for at in itertools.product(*(range(n) for n in mesh_shape)):
        lengths, offsets = _compute_local_shape_and_global_offset(
            shape, mesh_shape, list(at), placements
        )
        box = box_at(shape, mesh_shape, shards, at)
        assert box.lengths == tuple(lengths), at
        if box.numel:
            assert box.offsets == tuple(offsets), at


# -- simulated jobs: every rank's pieces by the rules, planned both ways ------------------


@dataclass(frozen=True)
class _Sim:
    """A tensor of a simulated job: held by the ranks of ``mesh`` by ``shards``, or held
    whole by ``holders`` (mesh None)."""

    name: str
    shape: tuple[int, ...]
    mesh: MeshRanks | None = None
    shards: tuple[int, ...] = ()
    holders: tuple[int, ...] = ()
    dtype: str = "float32"


def _held(t: _Sim, rank: int) -> Box | None:
    if t.mesh is None:
        return Box.full(t.shape) if rank in t.holders else None
    if rank not in t.mesh.ranks:
        return None
    at = [int(i) for i in np.unravel_index(t.mesh.ranks.index(rank), t.mesh.shape)]
    return box_at(t.shape, t.mesh.shape, t.shards, at)


def _plans(world: int, tensors: list[_Sim]) -> tuple[WritePlan, RegularPlan | None]:
    per_rank: list[list[PieceInfo]] = []
    rules_by_rank: list[Rules] = []
    for rank in range(world):
        infos = []
        meshes: dict[MeshRanks, int] = {}
        described = []
        unique = 0
        for t in sorted(tensors, key=lambda t: t.name):
            box = _held(t, rank)
            if box is None:
                continue
            nbytes = box.numel * element_size(t.dtype)
            if box.numel:
                infos.append(PieceInfo(t.name, box.offsets, box.lengths, nbytes, t.dtype, t.shape))
            if t.mesh is None:
                described.append((t.name, Rule(t.dtype, t.shape, -1, ())))
                continue
            index = meshes.setdefault(t.mesh, len(meshes))
            described.append((t.name, Rule(t.dtype, t.shape, index, t.shards)))
            copies = math.prod(n for n, d in zip(t.mesh.shape, t.shards) if d == REPLICATED)
            if copies == 1:
                unique += nbytes
        per_rank.append(infos)
        digest = repr((tuple(meshes), described))
        rules_by_rank.append(Rules(tuple(meshes), tuple(described), unique, digest))
    members: dict[str, list[int]] = {}
    for rank, rules in enumerate(rules_by_rank):
        members.setdefault(rules.digest, []).append(rank)
    regular = plan_rules(
        {d: rules_by_rank[ranks[0]] for d, ranks in members.items()},
        members,
        [r.unique_bytes for r in rules_by_rank],
        min_split_bytes=SPLIT,
    )
    return assign_writers(per_rank, min_split_bytes=SPLIT), regular


def _flat(t: _Sim, rank: int) -> FlatTensor | None:
    box = _held(t, rank)
    if box is None:
        return None
    local = torch.empty(box.lengths)
    return FlatTensor(t.name, local, t.shape, box, t.mesh is None, t.dtype)


def _same_plans(world: int, tensors: list[_Sim]) -> None:
    pieces, regular = _plans(world, tensors)
    assert regular is not None
    assert regular.bytes_per_rank == pieces.bytes_per_rank
    assert regular.imbalance == pieces.imbalance
    assert regular.shares == {k: v for k, v in pieces.shares.items() if k in regular.shares}
    for rank in range(world):
        held = {t.name: f for t in tensors if (f := _flat(t, rank)) is not None}
        mine = regular.part_of(rank, held)
        expected = pieces.for_rank(
            rank, ((f.name, f.box.offsets, f.box.lengths) for f in held.values())
        )
        assert mine.boxes == expected.boxes, rank
        for name, f in held.items():
            got = regular.written_layout(name, rank, f.global_shape)
            want = pieces.written_layout(name, rank, f.global_shape)
            assert got == want, (name, rank)


def _mesh(shape: tuple[int, ...], ranks: list[int] | None = None) -> MeshRanks:
    return MeshRanks(shape, tuple(ranks if ranks is not None else range(math.prod(shape))))


def test_fsdp_with_uneven_and_empty_shards_and_plain_tensors() -> None:
    world = 8
    fsdp = _mesh((world,))
    everyone = tuple(range(world))
    _same_plans(
        world,
        [
            _Sim("w", (64, 32), fsdp, (0,)),
            _Sim("tall", (13, 5), fsdp, (0,)),
            _Sim("few", (3, 100), fsdp, (0,)),
            _Sim("none", (0, 4), fsdp, (0,)),
            _Sim("step", (), None, (), everyone),
            _Sim("bias", (1000,), None, (), everyone),
            _Sim("big", (4096,), None, (), everyone),
            _Sim("rng", (world, 20), fsdp, (0,), dtype="uint8"),
        ],
    )


@pytest.mark.parametrize(
    "shards", [(REPLICATED, 0), (0, REPLICATED), (0, 1), (1, 0), (0, 0), (REPLICATED, REPLICATED)]
)
def test_two_dimensional_meshes(shards: tuple[int, ...]) -> None:
    mesh = _mesh((2, 4), [0, 2, 4, 6, 1, 3, 5, 7])  # ranks not in row-major order
    _same_plans(
        8,
        [
            _Sim("a", (4096, 8), mesh, shards),
            _Sim("b", (37, 64), mesh, shards),
            _Sim("c", (3, 3), mesh, shards),
            _Sim("plain", (2000,), None, (), tuple(range(8))),
        ],
    )


def test_hsdp_with_tensor_parallel_on_three_dimensions() -> None:
    mesh = _mesh((2, 4, 2))
    _same_plans(
        16,
        [
            _Sim("attn.q", (256, 64), mesh, (REPLICATED, 0, 1)),
            _Sim("attn.o", (64, 256), mesh, (REPLICATED, 1, 0)),
            _Sim("norm", (64,), mesh, (REPLICATED, 0, REPLICATED)),
            _Sim("embed", (1000, 64), mesh, (REPLICATED, 0, 0)),
            _Sim("split_twice", (50, 9), mesh, (0, 0, 1)),
            _Sim("split_thrice", (70, 3), mesh, (0, 0, 0)),
            _Sim("few_rows", (3, 40), mesh, (1, 0, 0)),
            _Sim("step", (), None, (), tuple(range(16))),
        ],
    )


def test_pipeline_stages_hold_different_tensors() -> None:
    stage0, stage1 = _mesh((2, 2), [0, 1, 2, 3]), _mesh((2, 2), [4, 5, 6, 7])
    _same_plans(
        8,
        [
            _Sim("layers.0.w", (512, 16), stage0, (REPLICATED, 0)),
            _Sim("layers.1.w", (512, 16), stage1, (REPLICATED, 0)),
            _Sim("layers.1.b", (300,), stage1, (0, REPLICATED)),
            _Sim("embed", (2048,), None, (), (0, 1, 2, 3)),
            _Sim("head", (2048,), None, (), (4, 5, 6, 7)),
            _Sim("lonely", (100,), None, (), (5,)),
            _Sim("step", (), None, (), tuple(range(8))),
        ],
    )


def test_a_large_world() -> None:
    world = 64
    fsdp, hsdp = _mesh((world,)), _mesh((4, 16))
    _same_plans(
        world,
        [
            *(_Sim(f"w{i}", (100 + 37 * i, 16), fsdp, (0,)) for i in range(10)),
            *(_Sim(f"h{i}", (50 + 11 * i, 8), hsdp, (REPLICATED, 0)) for i in range(5)),
            *(_Sim(f"s{i}", (), None, (), tuple(range(world))) for i in range(6)),
        ],
    )


def test_rules_that_disagree_give_no_plan() -> None:
    mesh = _mesh((4,))
    first = Rules((mesh,), (("w", Rule("float32", (8,), 0, (0,))),), 8, "a")
    other = Rules((mesh,), (("w", Rule("bfloat16", (8,), 0, (0,))),), 8, "b")
    assert (
        plan_rules(
            {"a": first, "b": other}, {"a": [0, 1], "b": [2, 3]}, [8] * 4, min_split_bytes=SPLIT
        )
        is None
    )
    # A mesh naming ranks that do not hold the tensor.
    wide = Rules((_mesh((4,)),), (("w", Rule("float32", (8,), 0, (0,))),), 8, "a")
    assert plan_rules({"a": wide}, {"a": [0, 1, 2]}, [8] * 3, min_split_bytes=SPLIT) is None


# -- the rules a rank finds in its state ------------------------------------------------


def _tensors(state: dict[str, object]) -> dict[str, FlatTensor]:
    return flatten(state)[0]


def test_plain_tensors_and_blocks_of_rows_by_rank_have_rules() -> None:
    state = {
        "plain": torch.zeros(3, 4),
        "rows": ShardedTensor(torch.zeros(1, 8), (4, 8), (2, 0)),
        "blocks": ShardedTensor(torch.zeros(3, 2), (10, 2), (6, 0)),
    }
    rules = rules_of(_tensors(state), 2, 4)
    assert rules is not None
    by_name = dict(rules.tensors)
    assert by_name["plain"] == Rule("float32", (3, 4), -1, ())
    assert by_name["rows"] == Rule("float32", (4, 8), 0, (0,))
    assert by_name["blocks"] == Rule("float32", (10, 2), 0, (0,))
    assert rules.meshes == (_mesh((4,)),)
    assert rules.unique_bytes == (8 + 6) * 4
    on_rank_1 = {
        **state,
        "rows": ShardedTensor(torch.zeros(1, 8), (4, 8), (1, 0)),
        "blocks": ShardedTensor(torch.zeros(3, 2), (10, 2), (3, 0)),
    }
    same = rules_of(_tensors(on_rank_1), 1, 4)
    assert same is not None and same.digest == rules.digest, "the rules do not depend on the rank"


@pytest.mark.parametrize(
    "odd",
    [
        ShardedTensor(torch.zeros(1, 8), (4, 8), (3, 0)),  # not this rank's block
        ShardedTensor(torch.zeros(4, 4), (4, 8), (0, 4)),  # split along columns
        ShardedTensor(torch.zeros(1, 8), (4, 8), (1, 0), replicated=True),  # a replicated part
    ],
)
def test_other_sharded_tensors_have_none(odd: ShardedTensor) -> None:
    assert rules_of(_tensors({"plain": torch.zeros(2), "odd": odd}), 1, 4) is None


class _BrokenMesh:
    """A mesh whose ranks cannot be read: a layout the rules misread."""

    @property
    def mesh(self) -> torch.Tensor:
        raise RuntimeError("no ranks here")


def test_a_rank_whose_rules_fail_plans_from_pieces(caplog: pytest.LogCaptureFixture) -> None:
    t = flatten({"w": torch.ones(4, 2)})[0]["w"]
    broken = FlatTensor(
        "w", t.local, t.global_shape, t.box, False, t.dtype, MeshPlacement(_BrokenMesh(), ())
    )
    with caplog.at_level("WARNING", logger="ckpt"):
        mine, whole = plan_now(LocalCoordinator(), {"w": broken}, min_split_bytes=SPLIT)
    assert isinstance(whole, WritePlan)
    assert mine.boxes == {("w", (0, 0), (4, 2)): Box((0, 0), (4, 2))}
    assert "plans this save from its pieces" in caplog.text
