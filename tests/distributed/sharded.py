"""Sharded training states for multi-rank tests, and the tools that check them.

``build_state(world, variant)`` makes one state that holds every layout the save path
must handle: DTensors with Shard(0)/Shard(1)/Replicate on a 1-D mesh (uneven, empty
shards, 0-d), on a 2x2 mesh (when ``world`` is 4), Megatron-style ``ckpt.ShardedTensor``
shards (some replicated across data-parallel groups), plain tensors, a tensor-parallel
module and an FSDP2 model with Adam behind ``ckpt.ModelOptimizerState``. Variant ``"b"``
lays the same global tensors out differently, for loads onto another layout.

Every global tensor's values are a function of its name, so a loaded state can be
compared bit for bit with what was saved, on any number of ranks.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

import torch
import torch.distributed as dist
from torch import nn

import ckpt
from ckpt.engine import state_tree

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

# name -> (global shape, dtype, placements in variant "a", placements in variant "b").
# "S<d>" is Shard(d), "R" is Replicate().
MESH_1D: dict[str, tuple[tuple[int, ...], torch.dtype, tuple[str, ...], tuple[str, ...]]] = {
    "shard0": ((8, 6), torch.float32, ("S0",), ("S1",)),
    "shard1": ((5, 8), torch.float32, ("S1",), ("S0",)),
    "replicate": ((4, 3), torch.float64, ("R",), ("S0",)),
    "uneven": ((7, 5), torch.float32, ("S0",), ("S0",)),  # 7 rows: 2,2,2,1 on 4 ranks
    "tiny": ((2, 3), torch.bfloat16, ("S0",), ("R",)),  # fewer rows than ranks: empty shards
    "narrow": ((3, 1), torch.float32, ("S1",), ("S0",)),  # one column: all but one shard empty
    "vector": ((9,), torch.int64, ("S0",), ("S0",)),
    "scalar": ((), torch.float32, ("R",), ("R",)),
}

# 2x2 mesh placements on 4 ranks; other world sizes use the 1-D fallback (third item).
MESH_2D: dict[str, tuple[tuple[int, ...], torch.dtype, tuple[str, ...], tuple[str, ...]]] = {
    "s0s1": ((6, 8), torch.float32, ("S0", "S1"), ("S1",)),
    "rs0": ((10, 3), torch.float32, ("R", "S0"), ("S0",)),  # HSDP: replicate x shard
    "s0r": ((5, 4), torch.float16, ("S0", "R"), ("R",)),
    "s0s0": ((9, 2), torch.float32, ("S0", "S0"), ("S1",)),  # nested, uneven
}

REPLICATED_COUNT = 24
TOP_KEYS = ("dt", "dt2d", "megatron", "plain", "rep", "tp", "fsdp", "meta")


def global_value(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The full value of global tensor ``name``: the same on every rank and every run."""
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    return torch.randint(-1000, 1000, shape, generator=gen, dtype=dtype)


def chunk(n: int, parts: int, i: int) -> tuple[int, int]:
    """(start, length) of part ``i`` when ``n`` is split like ``torch.chunk``."""
    size = -(-n // parts) if parts else n
    start = min(i * size, n)
    return start, max(0, min(size, n - start))


def _placements(spec: tuple[str, ...]) -> list[Any]:
    from torch.distributed.tensor import Replicate, Shard

    return [Replicate() if p == "R" else Shard(int(p[1:])) for p in spec]


def _dtensor(
    name: str, shape: tuple[int, ...], dtype: torch.dtype, mesh: Any, spec: tuple[str, ...]
) -> Any:
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(global_value(name, shape, dtype), mesh, _placements(spec))


def _sharded(
    name: str, shape: tuple[int, ...], dim: int, parts: int, index: int, replicated: bool
) -> ckpt.ShardedTensor:
    full = global_value(name, shape, torch.float32)
    start, length = chunk(shape[dim], parts, index)
    offsets = tuple(start if d == dim else 0 for d in range(len(shape)))
    return ckpt.ShardedTensor(
        full.narrow(dim, start, length).clone(), shape, offsets, replicated=replicated
    )


def _megatron(rank: int, world: int, variant: str) -> dict[str, ckpt.ShardedTensor]:
    col_dim, row_dim = (1, 0) if variant == "a" else (0, 1)
    tp = 2 if world % 2 == 0 else 1
    return {
        # Column- and row-parallel linear weights, one shard per rank.
        "col": _sharded("megatron.col", (6, 12), col_dim, world, rank, False),
        "row": _sharded("megatron.row", (10, 4), row_dim, world, rank, False),
        # TP=2 x DP: the two ranks of a TP group hold different rows; DP groups hold copies.
        "tp_dp": _sharded("megatron.tp_dp", (8, 6), 0, tp, rank % tp, world > tp),
        "full_rep": _sharded("megatron.full_rep", (5, 5), 0, 1, 0, True),
    }


def _replicated() -> dict[str, torch.Tensor]:
    # Sizes from 1 to 50 rows: dedup must balance them across the writers.
    return {
        f"w{i}": global_value(f"rep.w{i}", (1 + (i * 37) % 50, 16), torch.float32)
        for i in range(REPLICATED_COUNT)
    }


def _mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 5))


def _tp_module(mesh: Any, variant: str) -> nn.Module:
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    module = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 8))
    with torch.no_grad():
        for name, param in module.named_parameters():
            param.copy_(global_value(f"tp.{name}", tuple(param.shape), torch.float32))
    plan: dict[str, Any] = (
        {"0": ColwiseParallel(), "2": RowwiseParallel()}
        if variant == "a"
        else {"0": RowwiseParallel(), "2": ColwiseParallel()}
    )
    return parallelize_module(module, mesh, plan)


def _fsdp(mesh: Any, trained: bool) -> ckpt.ModelOptimizerState:
    """An FSDP2 MLP (10 and 5 rows: uneven, and empty shards on 4 ranks) with Adam."""
    from torch.distributed.fsdp import fully_shard

    model = _mlp(seed=1 if trained else 2)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = torch.optim.Adam(model.parameters(), lr=0.05)
    if trained:
        x = global_value("fsdp.x", (4, 6), torch.float32)
        for _ in range(2):
            optim.zero_grad()
            model(x).pow(2).sum().backward()
            optim.step()
    return ckpt.ModelOptimizerState(model, optim)


def build_state(rank: int, world: int, variant: str, *, trained: bool = True) -> dict[str, Any]:
    """The full test state on this rank (needs an initialised process group).

    Args:
        variant: "a" (the save layout) or "b" (the same tensors laid out differently).
        trained: False builds the FSDP model from another seed with a fresh Adam, as a
            restarted job would before loading.
    """
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    a = variant == "a"
    dt = {
        name: _dtensor(f"dt.{name}", shape, dtype, mesh, spec_a if a else spec_b)
        for name, (shape, dtype, spec_a, spec_b) in MESH_1D.items()
    }
    if world == 4 and a:
        mesh2 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        dt2d = {
            name: _dtensor(f"dt2d.{name}", shape, dtype, mesh2, spec)
            for name, (shape, dtype, spec, _) in MESH_2D.items()
        }
    else:
        dt2d = {
            name: _dtensor(f"dt2d.{name}", shape, dtype, mesh, ("S0",) if a else spec)
            for name, (shape, dtype, _, spec) in MESH_2D.items()
        }
    plain = {
        "a": global_value("plain.a", (3, 4), torch.float32),
        "ids": global_value("plain.ids", (10,), torch.int64),
        "mask": global_value("plain.mask", (2, 5), torch.bool),
        "lr": torch.tensor(3.5),
    }
    return {
        "dt": dt,
        "dt2d": dt2d,
        "megatron": _megatron(rank, world, variant),
        "plain": plain,
        "rep": _replicated(),
        "tp": _tp_module(mesh, variant),
        "fsdp": _fsdp(mesh, trained),
        "meta": {"epoch": 3, "note": "sharded"},
    }


def named_tensors(state: Mapping[str, Any]) -> dict[str, Any]:
    """Every tensor-like leaf of ``state`` under the fully-qualified name ckpt stores it as."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        _walk(state_tree(value), key, out)
    return out


def _walk(value: Any, path: str, out: dict[str, Any]) -> None:
    if isinstance(value, (torch.Tensor, ckpt.ShardedTensor)):
        out[path] = value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            _walk(v, f"{path}.{k}", out)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _walk(v, f"{path}.{i}", out)


def _is_dtensor(value: object) -> TypeGuard[DTensor]:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def full_value(value: torch.Tensor | ckpt.ShardedTensor) -> torch.Tensor:
    """The whole global tensor behind a DTensor, a ShardedTensor or a plain tensor
    (a collective for the first two: every rank calls it in the same order)."""
    if _is_dtensor(value):
        return value.full_tensor().detach().clone()
    if isinstance(value, ckpt.ShardedTensor):
        pieces: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(pieces, (tuple(value.offsets), value.local))
        full = torch.zeros(value.global_shape, dtype=value.local.dtype)
        for offsets, local in pieces:
            full[tuple(slice(o, o + n) for o, n in zip(offsets, local.shape))] = local
        return full
    return value.detach().clone()


def local_of(value: torch.Tensor | ckpt.ShardedTensor) -> torch.Tensor:
    """The tensor this rank holds."""
    if _is_dtensor(value):
        return value.to_local()
    if isinstance(value, ckpt.ShardedTensor):
        return value.local
    return value


def zero_state(state: Mapping[str, Any]) -> None:
    """Overwrite every tensor of ``state`` in place, so that a load has to fill it."""
    with torch.no_grad():
        for value in named_tensors(state).values():
            local = local_of(value)
            local.copy_(torch.zeros_like(local) if local.dtype != torch.bool else ~local)


def mismatches(state: Mapping[str, Any], expected: Mapping[str, torch.Tensor]) -> list[str]:
    """Names whose full value differs from ``expected`` (bit for bit), or that are missing on either side."""
    found = named_tensors(state)
    problems = [f"{name}: missing from the state" for name in expected if name not in found]
    problems += [f"{name}: not expected" for name in found if name not in expected]
    for name, value in found.items():
        if name not in expected:
            continue
        full = full_value(value)
        want = expected[name]
        if full.dtype != want.dtype or full.shape != want.shape:
            problems.append(
                f"{name}: {full.dtype}{list(full.shape)} vs {want.dtype}{list(want.shape)}"
            )
        elif not torch.equal(full, want):
            problems.append(f"{name}: values differ")
    return problems


def full_values(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """name -> whole global tensor of every tensor in ``state`` (collective)."""
    return {name: full_value(value) for name, value in named_tensors(state).items()}


def save_expected(values: Mapping[str, torch.Tensor], path: str | Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in values.items()}, str(path))


def load_expected(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))
