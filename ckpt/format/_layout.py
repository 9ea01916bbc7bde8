"""Which writer holds which region of a tensor, described compactly (format v2).

A v2 manifest lists no stored pieces: each tensor carries a ``Layout`` saying which
writing rank holds which region, and each writer's pieces are in its own index file.
A restoring rank reads the layouts, then only the index files of the writers whose
regions overlap what it needs.

Sharded layouts are grids: the tensor is cut along some dimensions (``grid``: for each
cut dimension, ascending, the cell sizes run-length encoded as ``[size, count]`` pairs),
and the cells, enumerated row-major over the cut dimensions, are held by writers listed
as arithmetic runs ``[first, step, count]``. "Sharded evenly on dim 0 over 4096 ranks"
is ``grid=[[0, [[256, 4096]]]], writers=[[0, 1, 4096]]`` whatever the tensor's size.
Anything that is not a grid (replicated data cut into row ranges by the save planner,
arbitrary user boxes) is listed region by region (``regions``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence

import msgspec

from ckpt.errors import CorruptCheckpointError
from ckpt.format._geometry import Box, first_overlap

Cell = tuple[tuple[int, ...], tuple[int, ...], int]  # offsets, lengths, writer rank


class Layout(msgspec.Struct, frozen=True, gc=False, omit_defaults=True, array_like=False):
    """Which writer holds which region of one tensor.

    Attributes:
        grid: for each cut dimension (ascending), the cell sizes along it as
            ``(size, count)`` runs; None when the tensor is listed by ``regions``.
        writers: the writer of each grid cell (row-major over the cut dimensions) as
            ``(first, step, count)`` arithmetic runs.
        regions: ``(offsets, lengths, writer)`` of each stored region, when not a grid.
    """

    grid: tuple[tuple[int, tuple[tuple[int, int], ...]], ...] | None = None
    writers: tuple[tuple[int, int, int], ...] = ()
    regions: tuple[tuple[tuple[int, ...], tuple[int, ...], int], ...] | None = None

    # -- reading ------------------------------------------------------------------------

    def check(self, shape: tuple[int, ...], world_size: int, where: str) -> None:
        """The layout tiles ``shape`` exactly and names writers below ``world_size``
        (``CorruptCheckpointError``). Costs O(runs) for a grid."""
        if (self.grid is None) == (self.regions is None):
            raise CorruptCheckpointError(f"{where}: a layout needs exactly one of grid, regions")
        if self.regions is not None:
            self._check_regions(shape, world_size, where)
            return
        assert self.grid is not None
        numel = math.prod(shape)
        cells = 0 if numel == 0 else 1
        last = -1
        for dim, runs in self.grid:
            if not last < dim < len(shape):
                raise CorruptCheckpointError(f"{where}: grid dimension {dim} is out of order")
            last = dim
            if any(size < 1 or count < 1 for size, count in runs):
                raise CorruptCheckpointError(f"{where}: grid sizes must be positive")
            if sum(size * count for size, count in runs) != shape[dim]:
                raise CorruptCheckpointError(
                    f"{where}: grid cells along dimension {dim} do not add up to {shape[dim]}"
                )
            cells *= sum(count for _, count in runs)
        if numel == 0 and self.grid:
            raise CorruptCheckpointError(f"{where}: an empty tensor has no grid")
        listed = 0
        for first, step, count in self.writers:
            if count < 1 or first < 0 or first >= world_size:
                raise CorruptCheckpointError(f"{where}: writer run {first, step, count} is invalid")
            end = first + step * (count - 1)
            if not 0 <= end < world_size:
                raise CorruptCheckpointError(f"{where}: writer run {first, step, count} is invalid")
            listed += count
        if listed != cells:
            raise CorruptCheckpointError(
                f"{where}: the layout names {listed} writers for {cells} grid cells"
            )

    def _check_regions(self, shape: tuple[int, ...], world_size: int, where: str) -> None:
        assert self.regions is not None
        covered = 0
        boxes = []
        for offsets, lengths, writer in self.regions:
            box = Box(offsets, lengths)
            if len(offsets) != len(shape) or not box.within(shape) or box.numel == 0:
                raise CorruptCheckpointError(f"{where}: region {box} lies outside {list(shape)}")
            if not 0 <= writer < world_size:
                raise CorruptCheckpointError(f"{where}: region {box} names writer {writer}")
            covered += box.numel
            boxes.append(box)
        clash = first_overlap(boxes) if len(boxes) > 1 else None
        if clash is not None:
            raise CorruptCheckpointError(
                f"{where}: regions {clash[0]} and {clash[1]} overlap, so they do not tile "
                f"{list(shape)}"
            )
        if covered != math.prod(shape):
            raise CorruptCheckpointError(
                f"{where}: the regions cover {covered} of {math.prod(shape)} elements of "
                f"{list(shape)}, so they do not tile it"
            )

    @property
    def sole_writer(self) -> int | None:
        """The one writer of a tensor stored in one region (whole), else None."""
        if self.regions is not None:
            return self.regions[0][2] if len(self.regions) == 1 else None
        if len(self.writers) == 1 and self.writers[0][2] == 1:
            return self.writers[0][0]
        return None

    @property
    def lowest_writer(self) -> int | None:
        """The lowest writer the layout names (None when nobody writes: an empty tensor)."""
        if self.regions is not None:
            return min((writer for _, _, writer in self.regions), default=None)
        ends = [(first, first + step * (count - 1)) for first, step, count in self.writers]
        return min((min(run) for run in ends), default=None)

    @property
    def writer_ranks(self) -> set[int]:
        """Every writer the layout names."""
        if self.regions is not None:
            return {writer for _, _, writer in self.regions}
        return {first + step * i for first, step, count in self.writers for i in range(count)}

    def writers_overlapping(self, shape: tuple[int, ...], region: Box) -> set[int]:
        """The writers holding some element of ``region``."""
        if region.numel == 0:
            return set()
        if self.regions is not None:
            return {
                writer
                for offsets, lengths, writer in self.regions
                if Box(offsets, lengths).intersect(region) is not None
            }
        return {writer for _, writer in self._grid_cells(region)}

    def region_of(self, shape: tuple[int, ...], writer: int, within: Box) -> Box | None:
        """The one region ``writer`` holds that overlaps ``within``, when it lies inside
        ``within``; None when it holds none there, or more than one, or one that reaches
        outside (what a rank holds and writes part of never looks like that)."""
        if within.numel == 0:
            return None
        if self.regions is not None:
            found = [
                Box(offsets, lengths)
                for offsets, lengths, w in self.regions
                if w == writer and Box(offsets, lengths).intersect(within) is not None
            ]
        else:
            found = [self._cell_box(shape, c) for c, w in self._grid_cells(within) if w == writer]
        if len(found) != 1 or not _inside(found[0], within):
            return None
        return found[0]

    def _grid_cells(self, region: Box) -> Iterator[tuple[tuple[int, ...], int]]:
        """Each grid cell (its index along every cut dimension) overlapping the non-empty
        ``region``, and its writer."""
        assert self.grid is not None
        ranges = [
            range(
                _cell_at(runs, region.offsets[dim]),
                _cell_at(runs, region.offsets[dim] + region.lengths[dim] - 1) + 1,
            )
            for dim, runs in self.grid
        ]
        counts = [sum(count for _, count in runs) for _, runs in self.grid]
        for cell in itertools.product(*ranges):
            flat = 0
            for i, n in zip(cell, counts):
                flat = flat * n + i
            yield cell, _writer_of(self.writers, flat)

    def _cell_box(self, shape: tuple[int, ...], cell: tuple[int, ...]) -> Box:
        """The region of the grid cell with index ``cell`` along every cut dimension."""
        assert self.grid is not None
        starts, sizes = [0] * len(shape), list(shape)
        for (dim, runs), i in zip(self.grid, cell):
            starts[dim], sizes[dim] = _cell_bounds(runs, i)
        return Box(tuple(starts), tuple(sizes))

    def holds(self, writer: int, box: Box) -> bool:
        """``box`` lies inside one region that ``writer`` holds."""
        if box.numel == 0:
            return True
        if self.regions is not None:
            return any(
                w == writer and _inside(box, Box(offsets, lengths))
                for offsets, lengths, w in self.regions
            )
        assert self.grid is not None
        flat = 0
        for dim, runs in self.grid:
            index = _cell_at(runs, box.offsets[dim])
            start, size = _cell_bounds(runs, index)
            if box.offsets[dim] + box.lengths[dim] > start + size:
                return False
            flat = flat * sum(count for _, count in runs) + index
        return _writer_of(self.writers, flat) == writer

    def cells(self, shape: tuple[int, ...]) -> Iterator[Cell]:
        """Every region and its writer (expanded: O(cells))."""
        if self.regions is not None:
            yield from self.regions
            return
        assert self.grid is not None
        if math.prod(shape) == 0:
            return
        per_dim = []
        for dim, runs in self.grid:
            starts = []
            at = 0
            for size, count in runs:
                for _ in range(count):
                    starts.append((at, size))
                    at += size
            per_dim.append((dim, starts))
        writers = (first + step * i for first, step, count in self.writers for i in range(count))
        for cell, writer in zip(itertools.product(*(s for _, s in per_dim)), writers):
            offsets = [0] * len(shape)
            lengths = list(shape)
            for (dim, _), (start, size) in zip(per_dim, cell):
                offsets[dim] = start
                lengths[dim] = size
            yield tuple(offsets), tuple(lengths), writer


def infer_layout(shape: tuple[int, ...], cells: Sequence[Cell]) -> Layout:
    """The most compact layout of ``cells`` (regions that tile ``shape``, with writers).

    Empty cells are dropped; cells forming a grid give a grid, anything else regions.
    """
    cells = [c for c in cells if math.prod(c[1]) > 0]
    if not cells:
        return Layout(grid=())
    ndim = len(shape)
    cut: list[tuple[int, list[int], dict[int, int]]] = []
    for dim in range(ndim):
        intervals = sorted({(c[0][dim], c[1][dim]) for c in cells})
        at = 0
        for start, size in intervals:
            if start != at:
                return _regions(cells)
            at += size
        if at != shape[dim]:
            return _regions(cells)
        if len(intervals) > 1:
            cut.append(
                (dim, [size for _, size in intervals], {s: i for i, (s, _) in enumerate(intervals)})
            )
    total = math.prod(len(sizes) for _, sizes, _ in cut)
    if total != len(cells):
        return _regions(cells)
    writers: list[int | None] = [None] * total
    for offsets, _, writer in cells:
        flat = 0
        for dim, sizes, index in cut:
            flat = flat * len(sizes) + index[offsets[dim]]
        if writers[flat] is not None:
            return _regions(cells)
        writers[flat] = writer
    return grid_layout(
        [(dim, sizes) for dim, sizes, _ in cut], [w for w in writers if w is not None]
    )


def grid_layout(cuts: Sequence[tuple[int, Sequence[int]]], writers: Sequence[int]) -> Layout:
    """The grid layout cut along each ``(dimension, cell sizes)`` of ``cuts`` (ascending
    dimensions, each cut in two or more), its cells held by ``writers`` (row-major): what
    ``infer_layout`` gives for those cells."""
    return Layout(
        grid=tuple((dim, _sizes_runs(list(sizes))) for dim, sizes in cuts),
        writers=_writer_runs(list(writers)),
    )


def _regions(cells: Sequence[Cell]) -> Layout:
    return Layout(regions=tuple(sorted((tuple(o), tuple(n), w) for o, n, w in cells)))


def _sizes_runs(sizes: list[int]) -> tuple[tuple[int, int], ...]:
    return tuple((size, len(list(group))) for size, group in itertools.groupby(sizes))


def _writer_runs(writers: list[int]) -> tuple[tuple[int, int, int], ...]:
    runs: list[tuple[int, int, int]] = []
    i = 0
    while i < len(writers):
        if i + 1 == len(writers):
            runs.append((writers[i], 0, 1))
            break
        step = writers[i + 1] - writers[i]
        j = i + 1
        while j + 1 < len(writers) and writers[j + 1] - writers[j] == step:
            j += 1
        runs.append((writers[i], step, j - i + 1))
        i = j + 1
    return tuple(runs)


def _cell_at(runs: tuple[tuple[int, int], ...], position: int) -> int:
    """The index of the cell holding ``position`` along one cut dimension."""
    index = 0
    at = 0
    for size, count in runs:
        span = size * count
        if position < at + span:
            return index + (position - at) // size
        at += span
        index += count
    return index - 1


def _cell_bounds(runs: tuple[tuple[int, int], ...], index: int) -> tuple[int, int]:
    """(start, size) of cell ``index`` along one cut dimension."""
    at = 0
    for size, count in runs:
        if index < count:
            return at + index * size, size
        at += size * count
        index -= count
    return at, 0


def _writer_of(runs: tuple[tuple[int, int, int], ...], cell: int) -> int:
    for first, step, count in runs:
        if cell < count:
            return first + step * cell
        cell -= count
    return -1


def _inside(inner: Box, outer: Box) -> bool:
    return all(
        o0 <= i0 and i0 + n <= o0 + m
        for i0, n, o0, m in zip(inner.offsets, inner.lengths, outer.offsets, outer.lengths)
    )
