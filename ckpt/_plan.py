"""Save planning: which rank writes which piece.

Every rank describes the pieces it holds; the descriptions are exchanged once per save
(in the training thread) and every rank runs the same deterministic assignment:
a piece only one rank holds is written by that rank; a piece several ranks hold
(replicated data) is written exactly once, by the holder with the fewest bytes
assigned so far, largest pieces first. Written bytes then equal unique bytes and
the busiest writer stays close to the average.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ckpt._flatten import FlatTensor

PieceKey = tuple[str, tuple[int, ...], tuple[int, ...]]  # name, offsets, lengths


@dataclass(frozen=True)
class PieceInfo:
    """What one rank holds of one tensor, as exchanged between ranks."""

    name: str
    offsets: tuple[int, ...]
    lengths: tuple[int, ...]
    nbytes: int

    @property
    def key(self) -> PieceKey:
        return (self.name, self.offsets, self.lengths)


def describe(tensors: Mapping[str, FlatTensor]) -> list[PieceInfo]:
    """This rank's non-empty pieces."""
    return [
        PieceInfo(t.name, t.box.offsets, t.box.lengths, t.nbytes)
        for t in tensors.values()
        if t.local.numel() > 0
    ]


@dataclass(frozen=True)
class WritePlan:
    """The writer of every piece, and the bytes each rank writes."""

    writer: dict[PieceKey, int]
    bytes_per_rank: tuple[int, ...]

    @property
    def imbalance(self) -> float:
        """Busiest rank's bytes over the mean (1.0 is perfect balance)."""
        total = sum(self.bytes_per_rank)
        if not total:
            return 1.0
        return max(self.bytes_per_rank) / (total / len(self.bytes_per_rank))


def assign_writers(per_rank: Sequence[Sequence[PieceInfo]]) -> WritePlan:
    """Deterministically choose one writer per distinct piece (same result on every rank)."""
    holders: dict[PieceKey, list[int]] = {}
    sizes: dict[PieceKey, int] = {}
    for rank, pieces in enumerate(per_rank):
        for p in pieces:
            holders.setdefault(p.key, []).append(rank)
            sizes[p.key] = p.nbytes
    load = [0] * len(per_rank)
    writer: dict[PieceKey, int] = {}
    shared = []
    for key, ranks in holders.items():
        if len(ranks) == 1:
            writer[key] = ranks[0]
            load[ranks[0]] += sizes[key]
        else:
            shared.append(key)
    shared.sort(key=lambda k: (-sizes[k], k))
    for key in shared:
        best = min(holders[key], key=lambda r: (load[r], r))
        writer[key] = best
        load[best] += sizes[key]
    return WritePlan(writer, tuple(load))
