"""Reshard planning: which stored bytes fill which part of which target tensor.

For every target region, the stored pieces of that tensor that overlap it are found
with a sorted index on dimension 0 (bisect), not by scanning every piece, and each
overlap becomes one read of whole rows of the stored piece (exact when the overlap
spans the piece's other dimensions).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

from ckpt._format import StoredPiece, TensorEntry, element_size
from ckpt._geometry import Box, row_span
from ckpt.errors import ReshardError


@dataclass(frozen=True)
class ReadRequest:
    """Copy part of one stored piece into part of one target tensor.

    Attributes:
        target: index of the destination in the caller's list.
        tensor: tensor name (for messages).
        piece: the stored piece read from.
        raw_start: first byte needed, relative to the piece's raw (uncompressed) bytes.
        raw_length: bytes needed.
        region: the global region copied.
    """

    target: int
    tensor: str
    piece: StoredPiece
    raw_start: int
    raw_length: int
    region: Box


class PieceIndex:
    """The stored pieces of one tensor, sorted for overlap queries."""

    def __init__(self, pieces: Sequence[StoredPiece]) -> None:
        self._pieces = sorted(pieces, key=lambda p: p.box.offsets[:1])
        self._starts = [p.box.offsets[0] if p.box.ndim else 0 for p in self._pieces]
        # Largest dim-0 length lets a query start the scan early enough.
        self._max_len = max((p.box.lengths[0] if p.box.ndim else 1 for p in self._pieces), default=0)

    def overlapping(self, region: Box) -> list[StoredPiece]:
        if region.ndim == 0:
            return list(self._pieces)
        lo = region.offsets[0]
        hi = lo + region.lengths[0]
        first = bisect.bisect_left(self._starts, lo - self._max_len + 1)
        last = bisect.bisect_left(self._starts, hi)
        return [p for p in self._pieces[first:last] if p.box.intersect(region) is not None]


def plan_reads(name: str, entry: TensorEntry, targets: Sequence[tuple[int, Box]]) -> list[ReadRequest]:
    """Read requests that fill every target region of tensor ``name``.

    Raises:
        ReshardError: a target region lies outside the tensor or is not fully stored.
    """
    index = PieceIndex(entry.pieces)
    itemsize = element_size(entry.dtype)
    requests = []
    for target, region in targets:
        if not region.within(entry.shape):
            raise ReshardError(
                f"tensor {name!r}: requested region {region} lies outside its shape {list(entry.shape)}"
            )
        if region.numel == 0:
            continue
        covered = 0
        for piece in index.overlapping(region):
            overlap = piece.box.intersect(region)
            if overlap is None:
                continue
            first, count = row_span(piece.box, overlap)
            requests.append(
                ReadRequest(target, name, piece, first * itemsize, count * itemsize, overlap)
            )
            covered += overlap.numel
        if covered != region.numel:
            raise ReshardError(
                f"tensor {name!r}: the checkpoint stores {covered} of the {region.numel} elements "
                f"of region {region}; it was saved with a layout that does not cover it"
            )
    return requests
