"""Layouts, tensors and checks for the resharding matrix (tests/distributed/test_reshard_matrix.py).

A *layout* is a name that says how a global tensor sits on ``world`` ranks:

* ``S0``, ``S1``, ``R``: a DTensor on a 1-D mesh with ``Shard(0)`` (FSDP), ``Shard(1)``
  (column TP) or ``Replicate()``;
* ``2D_<a>_<b>``: a DTensor on a 2x2 mesh (``dp`` x ``tp``, world 4 only) with placements
  ``a``/``b`` among ``S0``, ``S1``, ``R`` (``2D_S0_S1`` is TP2 x DP2, ``2D_R_S0`` is HSDP);
* ``ST0``, ``ST1``: Megatron-style ``ckpt.ShardedTensor`` slices along dim 0 / 1;
* ``full``: a plain tensor in a process without a process group.

Every global tensor's value is a function of its name (``tests.distributed.sharded.global_value``),
so any process can compute what any rank must hold, and a check needs no collective.
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch

import ckpt
from tests.distributed.sharded import chunk, global_value

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "bool": torch.bool,
}
LAYOUTS_1D = ("S0", "S1", "R", "ST0", "ST1")
LAYOUTS_2D = ("2D_S0_S1", "2D_R_S1", "2D_S0_R", "2D_R_S0", "2D_S0_S0", "2D_S1_S0")

Spec = list[Any]  # [name, shape, dtype name]: JSON-able, passed to the ranks


def layouts_for(world: int) -> tuple[str, ...]:
    """Every layout that exists on ``world`` ranks (2-D meshes need 4)."""
    if world == 1:
        return ("full",)
    return LAYOUTS_1D + (LAYOUTS_2D if world == 4 else ())


def random_specs(seed: int, count: int) -> list[Spec]:
    """``count`` tensors of random 2-D/3-D shapes with odd sizes, every dtype in turn, about a
    third with a dim of 1-3 (fewer than the ranks: empty shards), plus fixed edge cases: a
    tensor of several 4 KiB chunks and a 0-size one."""
    rng = random.Random(seed)
    names = list(DTYPES)
    specs: list[Spec] = []
    for i in range(count):
        dtype = names[i % len(names)]
        shape = [rng.choice([1, 3, 5, 7, 9, 11, 13, 17, 23]) for _ in range(rng.choice([2, 2, 3]))]
        if i % 3 == 0:
            shape[rng.randrange(len(shape))] = rng.randint(1, 3)
        specs.append([f"s{seed}_{i}_{dtype}", shape, dtype])
    specs.append([f"s{seed}_chunks", [67, 45], "float32"])
    specs.append([f"s{seed}_empty", [0, 6], "float32"])
    return specs


def _placement(text: str) -> Any:
    from torch.distributed.tensor import Replicate, Shard

    return Replicate() if text == "R" else Shard(int(text[1:]))


class Meshes:
    """The meshes of this process (made once: creating a mesh is a collective)."""

    def __init__(self, world: int) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        self.world = world
        self.one = init_device_mesh("cpu", (world,)) if world > 1 else None
        self.two = (
            init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp")) if world == 4 else None
        )

    def mesh_and_placements(self, layout: str) -> tuple[Any, list[Any]]:
        if layout.startswith("2D_"):
            _, a, b = layout.split("_")
            return self.two, [_placement(a), _placement(b)]
        return self.one, [_placement(layout)]


def full_of(spec: Spec) -> torch.Tensor:
    name, shape, dtype = spec
    return global_value(name, tuple(shape), DTYPES[dtype])


def sentinel_of(expected: torch.Tensor) -> torch.Tensor:
    """A tensor like ``expected`` that differs from it in every element."""
    if expected.dtype == torch.bool:
        return ~expected
    return (expected + 1).to(expected.dtype)


def place(
    spec: Spec, layout: str, meshes: Meshes, rank: int, *, sentinel: bool
) -> tuple[Any, torch.Tensor]:
    """(this rank's value of ``spec`` in ``layout``, what its local data must be after a load).

    With ``sentinel`` the value holds other data, so that a load has to overwrite all of it.
    """
    full = full_of(spec)
    shape = tuple(spec[1])
    if layout in ("full", "R"):
        expected = full.clone()
        box_offsets: tuple[int, ...] = (0,) * len(shape)
    elif layout in ("ST0", "ST1"):
        dim = int(layout[2])
        start, length = chunk(shape[dim], meshes.world, rank)
        expected = full.narrow(dim, start, length).clone()
        box_offsets = tuple(start if d == dim else 0 for d in range(len(shape)))
    else:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        mesh, placements = meshes.mesh_and_placements(layout)
        local_shape, offsets = compute_local_shape_and_global_offset(
            torch.Size(shape), mesh, placements
        )
        box_offsets = tuple(int(o) for o in offsets)
        index = tuple(slice(o, o + n) for o, n in zip(box_offsets, local_shape))
        expected = full[index].clone()
    local = sentinel_of(expected) if sentinel else expected.clone()
    if layout == "full":
        return local, expected
    if layout in ("ST0", "ST1"):
        return ckpt.ShardedTensor(local, shape, box_offsets), expected
    from torch.distributed.tensor import DTensor

    mesh, placements = meshes.mesh_and_placements(layout)
    stride = tuple(math.prod(shape[d + 1 :]) for d in range(len(shape)))
    value = DTensor.from_local(
        local, mesh, placements, run_check=False, shape=torch.Size(shape), stride=stride
    )
    return value, expected


def local_data(value: Any) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.to_local()
    if isinstance(value, ckpt.ShardedTensor):
        return value.local
    assert isinstance(value, torch.Tensor)
    return value
