"""A first save planned from rules (``ckpt.engine._regular``) on 4 real gloo ranks.

The state of ``tests.distributed.sharded`` without its Megatron-style shards: DTensors on a
1-D mesh and on a 2x2 mesh (HSDP's Replicate x Shard, a dimension split twice, uneven and
empty shards), a tensor-parallel module, an FSDP2 model with Adam, plain tensors, plus
FSDP2 over tensor parallelism (strided shards),
pipeline stages (DTensors on the two halves of the mesh, each holding other tensors) and
the RNG rows of every rank. Each rank plans it both ways and gets the same part, the same
bytes per rank and the same layouts to describe; the save itself exchanges rules, not
pieces, and restores bit for bit. With the Megatron shards (column blocks, copies across
data-parallel groups) the ranks have no rules, and the save plans from the pieces, unless
the shards name their mesh and placements: then they plan from rules too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import ckpt
from ckpt.coordination import default_coordinator
from ckpt.engine import (
    RegularPlan,
    described_layouts,
    flatten,
    make_plan,
    regular_plan,
    rules_of,
)
from ckpt.errors import InvalidStateError
from ckpt.format import read_manifest
from storage_backends import LocalBackend
from tests.distributed.sharded import (
    build_state,
    chunk,
    full_values,
    global_value,
    mismatches,
    zero_state,
)
from tests.distributed.test_write_plan import _CountingCoordinator
from tests.support.gloo import run_ranks

TIMEOUT_S = 120.0
SPLIT = 4096  # small: the replicated tensors of this state get cut between their holders


def _stages(rank: int) -> dict[str, Any]:
    """Two pipeline stages: ranks 0-1 hold stage 0's tensors, ranks 2-3 stage 1's."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))["dp"]
    stage = rank // 2
    shape = (4096, 3) if stage else (33, 7)
    return {
        f"stage{stage}": {
            "w": distribute_tensor(
                global_value(f"w{stage}", shape, torch.float32), mesh, [Shard(0)]
            ),
            "norm": distribute_tensor(
                global_value(f"norm{stage}", (2048,), torch.float32), mesh, [Replicate()]
            ),
            "head": global_value(f"head{stage}", (5,), torch.float32),
        }
    }


def _fsdp_over_tp() -> Any:
    """FSDP2 over tensor parallelism on a (dp, tp) mesh, as torchtitan builds it: the
    column-parallel weight's rows are split by tp, then by dp (a strided shard)."""
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    return model


def _regular_state(rank: int, world: int) -> dict[str, Any]:
    state = build_state(rank, world, "a")
    del state["megatron"]
    return {**state, **_stages(rank), "fsdp_tp": _fsdp_over_tp(), "rng": ckpt.RNGState()}


def _plans_compared(
    rank: int, tensors: dict[str, Any], rules: Any
) -> tuple[dict[str, bool], RegularPlan]:
    """Plan from the rules and from the pieces (two collectives): whether this rank's
    part, the bytes per rank and the layouts it describes are the same; the rules plan."""
    coordinator = default_coordinator()
    made = regular_plan(coordinator, tensors, rules, min_split_bytes=SPLIT)
    assert made is not None
    mine, whole = made
    pieces_mine, pieces = make_plan(coordinator, tensors, min_split_bytes=SPLIT)
    same = {
        "part": mine.boxes == pieces_mine.boxes,
        "bytes": whole.bytes_per_rank == pieces.bytes_per_rank,
        "layouts": described_layouts(1, rank, whole, tensors)
        == described_layouts(1, rank, pieces, tensors),
    }
    return same, whole


def _both_plans(rank: int, world: int, root: str) -> dict[str, Any]:
    state = _regular_state(rank, world)
    tensors = flatten(state)[0]
    rules = rules_of(tensors, rank, world)
    assert rules is not None, "every tensor of this state follows a rule"
    spread = tensors["fsdp_tp.0.weight"].spread
    assert spread is not None
    assert any(type(p).__name__ == "_StridedShard" for p in spread.placements)
    same, whole = _plans_compared(rank, tensors, rules)
    cut = {key[0] for key, shares in whole.shares.items() if len(shares) > 1}

    # Each stage loads its own tensors back, strictly (the stored tree holds both stages').
    loaded = {k: v for k, v in state.items() if k != "rng"}
    expected = full_values(loaded)
    counting = _CountingCoordinator(default_coordinator())
    engine = ckpt.Snapshotter()
    try:
        assert engine.async_save(state, LocalBackend(root), 1, counting).result(TIMEOUT_S)
    finally:
        engine.close()
    zero_state(loaded)
    ckpt.load(loaded, root, step=1)
    problems = mismatches(loaded, expected)

    irregular = build_state(rank, world, "a")
    assert rules_of(flatten(irregular)[0], rank, world) is None
    fallback = _CountingCoordinator(default_coordinator())
    ckpt.save(irregular, f"{root}-irregular", step=1, coordinator=fallback)
    return {
        "same": same,
        "cut": sorted(cut),
        "exchanged": counting.gathered,
        "problems": problems,
        "fallback": fallback.gathered,
    }


def test_four_ranks_plan_from_rules_as_from_pieces(tmp_path: Path) -> None:
    root = str(tmp_path / "regular")
    results = run_ranks(_both_plans, 4, root, timeout_s=TIMEOUT_S)
    for rank, result in enumerate(results):
        assert result["same"] == {"part": True, "bytes": True, "layouts": True}, rank
        assert result["exchanged"] == ["digest", "rules digest", "rules"], rank
        assert "pieces" in result["fallback"], rank
        assert result["problems"] == [], rank
    assert "stage1.norm" in results[0]["cut"], "a replicated tensor was cut between its holders"
    manifest = read_manifest(LocalBackend(root), 1)
    assert manifest.plan is not None and manifest.world_size == 4
    for name in ("stage0.w", "stage0.norm", "stage1.w", "stage1.norm", "stage1.head"):
        layout = manifest.tensors[name].layout
        assert layout is not None
        assert layout.writer_ranks <= ({0, 1} if name.startswith("stage0") else {2, 3})


def _megatron_shard(
    name: str, shape: tuple[int, int], mesh: Any, spec: tuple[str, ...], **overrides: Any
) -> ckpt.ShardedTensor:
    """A Megatron-style shard: the ``torch.chunk`` block ``spec`` gives this rank of
    ``mesh`` ("R" replicates, "S<dim>" splits), with the mesh and placements named."""
    from torch.distributed.tensor import Replicate, Shard

    placements = tuple(Replicate() if p == "R" else Shard(int(p[1:])) for p in spec)
    at = mesh.get_coordinate()
    offsets, lengths = [0, 0], list(shape)
    for placement, index, parts in zip(placements, at, mesh.shape):
        if isinstance(placement, Shard):
            d = placement.dim
            start, length = chunk(lengths[d], parts, index)
            offsets[d] += start
            lengths[d] = length
    full = global_value(name, shape, torch.float32)
    local = full[offsets[0] : offsets[0] + lengths[0], offsets[1] : offsets[1] + lengths[1]]
    args: dict[str, Any] = {
        "local": local.clone(),
        "global_shape": shape,
        "offsets": tuple(offsets),
        "replicated": "R" in spec,
        "mesh": mesh,
        "placements": placements,
        **overrides,
    }
    return ckpt.ShardedTensor(**args)


def _megatron_with_meshes(rank: int, world: int, root: str) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh

    flat = init_device_mesh("cpu", (world,))
    dp_tp = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
    state = {
        "megatron": {
            "col": _megatron_shard("m.col", (6, 12), flat, ("S1",)),
            "row": _megatron_shard("m.row", (10, 4), flat, ("S0",)),
            "uneven": _megatron_shard("m.uneven", (3, 5), flat, ("S0",)),  # rank 3: empty
            "tp_dp": _megatron_shard("m.tp_dp", (8, 6), dp_tp, ("R", "S0")),
            "grid": _megatron_shard("m.grid", (7, 9), dp_tp, ("S1", "S0")),
            "full_rep": _megatron_shard("m.full_rep", (5, 5), flat, ("R",)),
        }
    }
    tensors = flatten(state)[0]
    same, _ = _plans_compared(rank, tensors, rules_of(tensors, rank, world))
    expected = full_values(state)
    counting = _CountingCoordinator(default_coordinator())
    ckpt.save(state, root, step=1, coordinator=counting)
    zero_state(state)
    ckpt.load(state, root, step=1)

    refused = []
    for overrides in (
        {"replicated": False},  # the placements replicate it
        {"placements": None},  # a mesh without placements
        {"offsets": (1, 0)},  # not the region the mesh gives this rank
    ):
        try:
            _megatron_shard("m.tp_dp", (8, 6), dp_tp, ("R", "S0"), **overrides)
        except InvalidStateError as exc:
            refused.append(str(exc))
    return {
        "same": same,
        "exchanged": counting.gathered,
        "problems": mismatches(state, expected),
        "refused": refused,
    }


def test_megatron_shards_that_name_their_mesh_plan_from_rules(tmp_path: Path) -> None:
    results = run_ranks(_megatron_with_meshes, 4, str(tmp_path / "m"), timeout_s=TIMEOUT_S)
    for rank, result in enumerate(results):
        assert result["same"] == {"part": True, "bytes": True, "layouts": True}, rank
        assert result["exchanged"] == ["digest", "rules digest", "rules"], rank
        assert result["problems"] == [], rank
        replicated, together, region = result["refused"]
        assert "replicated=False, but the placements replicate it" in replicated
        assert "pass mesh and placements together" in together
        assert "fix the offsets or the placements" in region
