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

from ckpt.errors import CorruptCheckpointError, ReshardError
from ckpt.format import Box, StoredPiece, TensorEntry, element_size, row_span


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
    """The stored pieces of one tensor, sorted for overlap queries.

    Pieces are sorted by their start along the dimension where starts differ most
    (dim 0 for FSDP/row sharding, dim 1 for column sharding); a query bisects to the
    pieces whose start lies in ``[lo - longest piece, hi)`` on that dimension and checks
    only those. For the tilings that sharding produces this is O(log n + overlaps).
    """

    def __init__(self, pieces: Sequence[StoredPiece]) -> None:
        ndim = len(pieces[0].offsets) if pieces else 0
        self._dim = 0
        if ndim:
            distinct = [len({p.offsets[d] for p in pieces}) for d in range(ndim)]
            self._dim = max(range(ndim), key=lambda d: (distinct[d], -d))
        d = self._dim
        self._pieces = sorted(pieces, key=lambda p: p.offsets[d] if ndim else 0)
        self._starts = [p.offsets[d] if ndim else 0 for p in self._pieces]
        self._longest = max((p.lengths[d] if ndim else 1 for p in self._pieces), default=0)

    @property
    def dim(self) -> int:
        """The dimension pieces are sorted on (``overlapping`` returns them in that order)."""
        return self._dim

    def overlapping(self, region: Box) -> list[StoredPiece]:
        if region.ndim == 0:
            return list(self._pieces)
        d = self._dim
        lo = region.offsets[d]
        hi = lo + region.lengths[d]
        first = bisect.bisect_left(self._starts, lo - self._longest + 1)
        last = bisect.bisect_left(self._starts, hi)
        return [p for p in self._pieces[first:last] if p.box.intersect(region) is not None]


def plan_reads(
    name: str, entry: TensorEntry, targets: Sequence[tuple[int, Box]]
) -> list[ReadRequest]:
    """Read requests that fill every target region of tensor ``name``.

    Raises:
        ReshardError: a target region lies outside the tensor or is not fully stored.
        CorruptCheckpointError: stored pieces overlap inside a target region.
    """
    index = PieceIndex(entry.pieces)
    itemsize = element_size(entry.dtype)
    requests = []
    for target, region in targets:
        if not region.within(entry.shape):
            raise ReshardError(
                f"tensor {name!r}: requested region {region} lies outside its shape "
                f"{list(entry.shape)}"
            )
        if region.numel == 0:
            continue
        covered = 0
        overlaps = []
        for piece in index.overlapping(region):
            box = piece.box
            overlap = box.intersect(region)
            if overlap is None:
                continue
            first, count = row_span(box, overlap)
            requests.append(
                ReadRequest(target, name, piece, first * itemsize, count * itemsize, overlap)
            )
            overlaps.append(overlap)
            covered += overlap.numel
        # An element count alone is fooled by a piece stored twice next to a hole.
        clash = _first_clash(overlaps, index.dim)
        if clash is not None:
            raise CorruptCheckpointError(
                f"tensor {name!r}: stored pieces overlap at {clash}, so part of region {region} "
                "would be written twice (and another part, possibly, never); the manifest is "
                "inconsistent"
            )
        if covered != region.numel:
            raise ReshardError(
                f"tensor {name!r}: the checkpoint stores {covered} of the {region.numel} elements "
                f"of region {region}; it was saved with a layout that does not cover it"
            )
    return requests


def _first_clash(boxes: Sequence[Box], dim: int) -> Box | None:
    """The overlap of two of ``boxes`` (sorted by start on ``dim``), or None when disjoint.

    A sweep on ``dim``: each box is checked only against earlier boxes still open there,
    which for sharded layouts are few (none for 1-D sharding along ``dim``).
    """
    if len(boxes) < 2:
        return None
    if boxes[0].ndim == 0:
        return boxes[0]
    open_boxes: list[Box] = []
    for box in boxes:
        start = box.offsets[dim]
        open_boxes = [b for b in open_boxes if b.offsets[dim] + b.lengths[dim] > start]
        for other in open_boxes:
            common = other.intersect(box)
            if common is not None:
                return common
        open_boxes.append(box)
    return None
