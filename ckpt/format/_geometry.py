"""Where a stored or requested piece sits inside its global tensor."""

from __future__ import annotations

import math
from collections.abc import Sequence

import msgspec


class Box(msgspec.Struct, frozen=True, gc=False):
    """A rectangular region of a global tensor: ``offsets[d] .. offsets[d] + lengths[d]``.

    A planner makes millions of these when resharding a large checkpoint: a frozen
    msgspec struct is built in C and never tracked by the garbage collector.
    """

    offsets: tuple[int, ...]
    lengths: tuple[int, ...]

    @classmethod
    def full(cls, shape: Sequence[int]) -> Box:
        return cls(tuple(0 for _ in shape), tuple(int(n) for n in shape))

    @property
    def ndim(self) -> int:
        return len(self.lengths)

    @property
    def numel(self) -> int:
        return math.prod(self.lengths)

    @property
    def ends(self) -> tuple[int, ...]:
        return tuple(o + n for o, n in zip(self.offsets, self.lengths))

    def intersect(self, other: Box) -> Box | None:
        """The common region, or None when they do not overlap (or either is empty)."""
        offsets = []
        lengths = []
        for a0, an, b0, bn in zip(self.offsets, self.lengths, other.offsets, other.lengths):
            lo = max(a0, b0)
            hi = min(a0 + an, b0 + bn)
            if hi <= lo:
                return None
            offsets.append(lo)
            lengths.append(hi - lo)
        return Box(tuple(offsets), tuple(lengths))

    def relative_to(self, outer: Box) -> tuple[slice, ...]:
        """Index of this region inside ``outer``'s local tensor."""
        return tuple(
            slice(o - oo, o - oo + n) for o, n, oo in zip(self.offsets, self.lengths, outer.offsets)
        )

    def within(self, shape: Sequence[int]) -> bool:
        return len(shape) == self.ndim and all(
            o >= 0 and n >= 0 and o + n <= s for o, n, s in zip(self.offsets, self.lengths, shape)
        )


def row_span(piece: Box, region: Box) -> tuple[int, int]:
    """Elements of ``piece``'s row-major storage that hold the rows ``region`` touches.

    ``region`` must lie inside ``piece``. The span covers whole rows along dimension 0
    so that the bytes read can be viewed as a tensor and sliced; it is exact whenever
    ``region`` spans the piece fully in every other dimension.

    Returns:
        (first element, number of elements).
    """
    if piece.ndim == 0:
        return 0, 1
    row = math.prod(piece.lengths[1:])
    first_row = region.offsets[0] - piece.offsets[0]
    return first_row * row, region.lengths[0] * row


def first_overlap(boxes: Sequence[Box]) -> tuple[Box, Box] | None:
    """Two of ``boxes`` (of one tensor) that share an element, or None when all are disjoint.

    A sweep along the dimension where the boxes' starts differ most: each box is compared
    only with earlier ones still open there, which for sharded layouts are few (none for
    1-D sharding, one row of the mesh for 2-D sharding). Empty boxes overlap nothing.
    """
    live = [b for b in boxes if b.numel]
    if len(live) < 2:
        return None
    ndim = live[0].ndim
    if ndim == 0:
        return live[0], live[1]
    dim = max(range(ndim), key=lambda d: (len({b.offsets[d] for b in live}), -d))
    live.sort(key=lambda b: b.offsets[dim])
    open_boxes: list[Box] = []
    for box in live:
        start = box.offsets[dim]
        open_boxes = [b for b in open_boxes if b.offsets[dim] + b.lengths[dim] > start]
        for other in open_boxes:
            if other.intersect(box) is not None:
                return other, box
        open_boxes.append(box)
    return None
