"""A first save's write plan from the rules tensors are laid out by, not from every piece.

``make_plan`` gathers the pieces of every rank: at 4096 ranks and ~700 tensors each,
hundreds of MiB per rank and tens of seconds of planning in the training thread. Most
states are regular, though: each tensor is a DTensor whose mesh and placements say which
region every rank holds, a ``ShardedTensor`` given a mesh and placements likewise, a plain
tensor that each rank holding it holds whole, or a ``ShardedTensor`` of one block of rows
per rank (the RNG states). Each rank then describes
its tensors by rules that do not depend on the rank (``Rules``). The ranks exchange a digest
of their rules and the bytes they hold alone; one rank of each group with the same rules
(all ranks, or those of one pipeline stage) sends the rules themselves, and every rank works
out the replicated pieces and their holders from the rules. The result is exactly the plan
``assign_writers`` makes of the gathered pieces.

A rank that cannot describe its tensors by rules (a ``ShardedTensor`` of another shape
without its mesh, FSDP2 over tensor parallelism on rows that do not divide evenly), or
rules that contradict each other, make every rank plan from the pieces.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from ckpt.coordination import Coordinator
from ckpt.engine._flatten import FlatTensor
from ckpt.engine._plan import (
    PieceInfo,
    PieceKey,
    RankPlan,
    Share,
    WritePlan,
    piece_key,
    share_replicated,
)
from ckpt.format import Box, Layout, element_size, grid_layout, infer_layout

REPLICATED = -1
"""In ``Rule.shards``: a mesh dimension along which every rank holds the same region."""


class MeshRanks(NamedTuple):
    """A device mesh: its shape, and its ranks in row-major order."""

    shape: tuple[int, ...]
    ranks: tuple[int, ...]

    def grid(self) -> np.ndarray[Any, Any]:
        return np.asarray(self.ranks, dtype=np.int64).reshape(self.shape)


class Rule(NamedTuple):
    """How the ranks of a tensor hold it: ``mesh`` indexes the rule set's meshes (-1: every
    holder holds it whole); ``shards`` gives, per mesh dimension, the tensor dimension it
    splits into ``torch.chunk``-sized blocks, or ``REPLICATED``."""

    dtype: str
    shape: tuple[int, ...]
    mesh: int
    shards: tuple[int, ...]


@dataclass(frozen=True)
class Rules:
    """A rank's tensors as rules (sorted by name), and the bytes it alone holds."""

    meshes: tuple[MeshRanks, ...]
    tensors: tuple[tuple[str, Rule], ...]
    unique_bytes: int
    digest: str = field(compare=False)


def chunk(n: int, parts: int, i: int) -> tuple[int, int]:
    """The i-th of ``parts`` blocks of ``n`` as ``torch.chunk`` and DTensor's ``Shard`` cut
    them: (start, length)."""
    size = -(-n // parts)
    start = min(i * size, n)
    return start, max(0, min(size, n - start))


def box_at(
    shape: tuple[int, ...], mesh_shape: tuple[int, ...], shards: tuple[int, ...], at: Sequence[int]
) -> Box:
    """The region the mesh coordinate ``at`` holds (mesh dimensions split in order, as
    DTensor does)."""
    offsets = [0] * len(shape)
    lengths = list(shape)
    for mesh_dim, dim in enumerate(shards):
        if dim != REPLICATED:
            start, lengths[dim] = chunk(lengths[dim], mesh_shape[mesh_dim], at[mesh_dim])
            offsets[dim] += start
    return Box(tuple(offsets), tuple(lengths))


def _same_region(a: Box, b: Box) -> bool:
    return a == b or (a.numel == 0 and b.numel == 0)


def _copies(mesh: MeshRanks, shards: tuple[int, ...]) -> int:
    """How many ranks hold each region."""
    return math.prod(n for n, dim in zip(mesh.shape, shards) if dim == REPLICATED)


def _mesh_rule(
    t: FlatTensor,
    rank: int,
    world: int,
    known: dict[int, MeshRanks],
    known_orders: dict[tuple[MeshRanks, tuple[int, ...]], MeshRanks],
) -> tuple[MeshRanks, tuple[int, ...]] | None:
    """The mesh and shards of a DTensor or of a ``ShardedTensor`` of rank-ordered blocks of
    rows, when they give exactly ``t``'s region on ``rank``."""
    if t.spread is not None:
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.placement_types import _StridedShard

        shards = []
        strided = []
        for p in t.spread.placements:
            if isinstance(p, (Shard, _StridedShard)):
                shards.append(p.dim)
                strided.append(isinstance(p, _StridedShard))
            elif isinstance(p, Replicate):
                shards.append(REPLICATED)
                strided.append(False)
            else:
                return None
        device_mesh = t.spread.mesh
        mesh = known.get(id(device_mesh))
        if mesh is None:
            ranks = device_mesh.mesh
            mesh = MeshRanks(tuple(ranks.shape), tuple(ranks.flatten().tolist()))
            known[id(device_mesh)] = mesh
        at = device_mesh.get_coordinate()
        if at is None or mesh.ranks[int(np.ravel_multi_index(at, mesh.shape))] != rank:
            return None
        if any(strided):
            # FSDP2 over tensor parallelism: a strided shard splits the blocks the plain
            # shards of its dimension cut, as if its mesh dimension came after theirs.
            order = sorted(range(len(shards)), key=lambda m: strided[m])
            reordered = known_orders.get((mesh, tuple(order)))
            if reordered is None:
                ranks = mesh.grid().transpose(order)
                reordered = MeshRanks(tuple(ranks.shape), tuple(ranks.reshape(-1).tolist()))
                known_orders[mesh, tuple(order)] = reordered
            mesh = reordered
            shards = [shards[m] for m in order]
            at = [at[m] for m in order]
    elif not t.replicated and t.global_shape:
        mesh, shards, at = MeshRanks((world,), tuple(range(world))), [0], [rank]
    else:
        return None
    if not _same_region(box_at(t.global_shape, mesh.shape, tuple(shards), at), t.box):
        return None
    return mesh, tuple(shards)


def rules_of(tensors: Mapping[str, FlatTensor], rank: int, world: int) -> Rules | None:
    """``rank``'s tensors as rules, or None when one of them follows none."""
    meshes: dict[MeshRanks, int] = {}
    known: dict[int, MeshRanks] = {}
    known_orders: dict[tuple[MeshRanks, tuple[int, ...]], MeshRanks] = {}
    described = []
    unique = 0
    for name in sorted(tensors):
        t = tensors[name]
        if t.replicated and t.spread is None:
            if t.box != Box.full(t.global_shape):
                return None
            described.append((name, Rule(t.dtype, t.global_shape, -1, ())))
            continue
        found = _mesh_rule(t, rank, world, known, known_orders)
        if found is None:
            return None
        mesh, shards = found
        index = meshes.setdefault(mesh, len(meshes))
        described.append((name, Rule(t.dtype, t.global_shape, index, shards)))
        if _copies(mesh, shards) == 1:
            unique += t.nbytes
    ordered = tuple(meshes)
    digest = hashlib.blake2b(repr((ordered, described)).encode(), digest_size=16).hexdigest()
    return Rules(ordered, tuple(described), unique, digest)


class _Tensor(NamedTuple):
    """One tensor of the whole job, as the rules of its holders give it."""

    dtype: str
    shape: tuple[int, ...]
    mesh: MeshRanks | None  # None: held whole by every holder
    shards: tuple[int, ...]
    holders: list[int]


@dataclass(frozen=True)
class RegularPlan:
    """The whole plan of a save planned from rules: ``replicated`` holds the shares of the
    pieces several ranks hold and every rank's bytes to write; every other piece is
    written by the one rank holding it."""

    tensors: dict[str, _Tensor]
    replicated: WritePlan

    @property
    def shares(self) -> dict[PieceKey, tuple[Share, ...]]:
        return self.replicated.shares

    @property
    def bytes_per_rank(self) -> tuple[int, ...]:
        return self.replicated.bytes_per_rank

    @property
    def imbalance(self) -> float:
        return self.replicated.imbalance

    def part_of(self, rank: int, tensors: Mapping[str, FlatTensor]) -> RankPlan:
        """What ``rank``, holding ``tensors``, writes of the plan."""
        mine: dict[PieceKey, Box] = {}
        for own in tensors.values():
            if own.local.numel() == 0:
                continue
            key = piece_key(own)
            written = self.shares.get(key)
            if written is None:
                mine[key] = own.box
            else:
                for share in written:
                    if share.rank == rank:
                        mine[key] = share.box
        return RankPlan(mine, self.imbalance)

    def written_layout(self, name: str, rank: int, shape: tuple[int, ...]) -> Layout | None:
        """The layout of tensor ``name`` (of global ``shape``) when ``rank`` is its lowest
        writer (or nobody writes it), else None."""
        t = self.tensors[name]
        if t.mesh is None and len(t.holders) == 1 and math.prod(t.shape) > 0:
            return (
                infer_layout(shape, [((0,) * len(shape), shape, rank)])
                if t.holders == [rank]
                else None
            )
        if t.mesh is None or _copies(t.mesh, t.shards) > 1:
            return self.replicated.written_layout(name, rank, shape)
        if math.prod(t.shape) == 0:
            return Layout(grid=())
        writers, cuts = _unique_grid(t)
        if int(writers.min()) != rank:
            return None
        return grid_layout([c for c in cuts if len(c[1]) > 1], writers.reshape(-1).tolist())


def _unique_grid(t: _Tensor) -> tuple[np.ndarray[Any, Any], list[tuple[int, list[int]]]]:
    """The writers of the non-empty regions of a tensor no two ranks share, with an axis
    per split tensor dimension (ascending), and the sizes of those regions along each.

    Along a dimension split by several mesh dimensions, each splits the blocks of the one
    before (as DTensor does); the blocks stay in ascending order."""
    assert t.mesh is not None
    at: list[Any] = [0] * len(t.mesh.shape)  # per mesh dimension: the index of each region
    dims = sorted({dim for dim in t.shards if dim != REPLICATED})
    cuts = []
    for axis, dim in enumerate(dims):
        starts = np.zeros(1, dtype=np.int64)
        lengths = np.full(1, t.shape[dim], dtype=np.int64)
        splitting = [m for m, d in enumerate(t.shards) if d == dim]
        indexes: list[np.ndarray[Any, Any]] = []
        for mesh_dim in splitting:
            parts = t.mesh.shape[mesh_dim]
            i = np.arange(parts, dtype=np.int64)
            size = -(-lengths // parts)
            begin = np.minimum(i[None, :] * size[:, None], lengths[:, None])
            lengths = np.minimum(size[:, None], lengths[:, None] - begin).reshape(-1)
            starts = (starts[:, None] + begin).reshape(-1)
            indexes = [index.repeat(parts) for index in indexes]
            indexes.append(np.tile(i, len(lengths) // parts))
        kept = lengths > 0
        shape = [1] * len(dims)
        shape[axis] = -1
        for mesh_dim, index in zip(splitting, indexes):
            at[mesh_dim] = index[kept].reshape(shape)
        cuts.append((dim, lengths[kept].tolist()))
    return t.mesh.grid()[tuple(at)], cuts


def _whole_job(
    sent: Mapping[str, Rules], members: Mapping[str, list[int]]
) -> dict[str, _Tensor] | None:
    """Every tensor of the job with its holders, from each group's rules; None when the
    rules contradict each other or a mesh is not exactly the ranks holding its tensor."""
    tensors: dict[str, _Tensor] = {}
    for digest, rules in sent.items():
        for name, rule in rules.tensors:
            mesh = rules.meshes[rule.mesh] if rule.mesh >= 0 else None
            known = tensors.get(name)
            if known is None:
                tensors[name] = _Tensor(rule.dtype, rule.shape, mesh, rule.shards, [])
            elif (known.dtype, known.shape, known.mesh, known.shards) != (
                rule.dtype,
                rule.shape,
                mesh,
                rule.shards,
            ):
                return None
            tensors[name].holders.extend(members[digest])
    for t in tensors.values():
        t.holders.sort()
        if t.mesh is not None and sorted(t.mesh.ranks) != t.holders:
            return None
    return tensors


def _replicated_pieces(name: str, t: _Tensor) -> Iterator[tuple[PieceInfo, list[int]]]:
    """The distinct non-empty pieces of a tensor several ranks hold, with their holders."""
    itemsize = element_size(t.dtype)
    if t.mesh is None:
        if len(t.holders) > 1 and math.prod(t.shape) > 0:
            zeros = (0,) * len(t.shape)
            nbytes = math.prod(t.shape) * itemsize
            yield PieceInfo(name, zeros, t.shape, nbytes, t.dtype, t.shape), t.holders
        return
    split = [d for d, dim in enumerate(t.shards) if dim != REPLICATED]
    copied = [d for d, dim in enumerate(t.shards) if dim == REPLICATED]
    grid = t.mesh.grid().transpose(split + copied)
    rows = grid.reshape(math.prod(t.mesh.shape[d] for d in split), -1)
    at = [0] * len(t.mesh.shape)
    for row, split_at in zip(rows, np.ndindex(*(t.mesh.shape[d] for d in split))):
        for d, i in zip(split, split_at):
            at[d] = i
        box = box_at(t.shape, t.mesh.shape, t.shards, at)
        if box.numel:
            info = PieceInfo(name, box.offsets, box.lengths, box.numel * itemsize, t.dtype, t.shape)
            yield info, sorted(row.tolist())


def regular_plan(
    coordinator: Coordinator,
    tensors: Mapping[str, FlatTensor],
    rules: Rules | None,
    *,
    min_split_bytes: int,
) -> tuple[RankPlan, RegularPlan] | None:
    """This rank's part of the plan and the whole plan, made from every rank's rules (a
    collective); None on every rank when one rank has no rules or the rules disagree."""
    offers = coordinator.all_gather(None if rules is None else (rules.digest, rules.unique_bytes))
    if rules is None or any(offer is None for offer in offers):
        return None
    members: dict[str, list[int]] = {}
    for rank, (digest, _) in enumerate(offers):
        members.setdefault(digest, []).append(rank)
    speaks = members[rules.digest][0] == coordinator.rank
    sent = coordinator.all_gather(rules if speaks else None)
    plan = plan_rules(
        {digest: sent[ranks[0]] for digest, ranks in members.items()},
        members,
        [unique for _, unique in offers],
        min_split_bytes=min_split_bytes,
    )
    if plan is None:
        return None
    return plan.part_of(coordinator.rank, tensors), plan


def plan_rules(
    rules: Mapping[str, Rules],
    members: Mapping[str, list[int]],
    unique_bytes: Sequence[int],
    *,
    min_split_bytes: int,
) -> RegularPlan | None:
    """The whole plan of the job whose ranks ``members[digest]`` have the rules
    ``rules[digest]`` and hold ``unique_bytes[rank]`` bytes alone (by their rules); None
    when the rules contradict each other."""
    job = _whole_job(rules, members)
    if job is None:
        return None
    load = list(unique_bytes)
    replicated: list[PieceInfo] = []
    holders: dict[PieceKey, list[int]] = {}
    for name, t in job.items():
        if t.mesh is None and len(t.holders) == 1:
            load[t.holders[0]] += math.prod(t.shape) * element_size(t.dtype)
            continue
        if t.mesh is not None and _copies(t.mesh, t.shards) == 1:
            continue
        for piece, held in _replicated_pieces(name, t):
            replicated.append(piece)
            holders[piece.key] = held
    shares = share_replicated(replicated, holders, load, min_split_bytes)
    return RegularPlan(job, WritePlan(shares, tuple(load)))
