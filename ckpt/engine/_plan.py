"""Save planning: which rank writes which bytes.

Every rank describes the pieces it holds; the descriptions are exchanged once per save
(in the training thread) and every rank runs the same deterministic assignment, in
integers, so that all ranks agree without talking again:

1. A piece only one rank holds is written by that rank.
2. Pieces several ranks hold (replicated data) are written exactly once. They are taken
   those with the fewest holders first (the least choice), then largest first, and
   shared out towards a common level: the level all ranks would reach if the replicated
   bytes were poured over them evenly (the mean, unless some ranks' own pieces already
   pass it; for a piece whose holders are all past it, the level that evens them out).
   A piece goes to its holders from the least loaded up, each taking the rows that bring
   it to the level: a piece that fits goes whole to one rank, a larger one is cut into
   contiguous row ranges along dimension 0 of its box, at most one range per holder.
3. A range is never smaller than ``min_split_bytes``: a piece too small to cut in two
   such ranges (and any 0-d or one-row piece) goes whole to its least loaded holder; a
   holder less than half a range below the level counts as full, one further below
   takes at least a whole range; a tail shorter than a range borrows from the one before.

Written bytes then equal unique bytes, few pieces are cut (about one per rank), and the
busiest writer stays within about half of ``min_split_bytes`` of the level whenever the
replicated data can even the ranks out.

The exchange and the assignment grow with world x tensors (at 4096 ranks and ~700 tensors
each, hundreds of MiB and about a minute). ``ckpt.engine._regular`` makes the same plan from
rank-independent rules when the state follows them, and ``ckpt.engine._plan_cache`` keeps a
plan for as long as the layout stays the same, across restarts too.
"""

from __future__ import annotations

import gc
import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple, Protocol

from ckpt.coordination import Coordinator
from ckpt.engine._flatten import FlatTensor
from ckpt.errors import CoordinationError
from ckpt.format import Box, Layout, TensorEntry, infer_layout
from ckpt.format._layout import Cell

PieceKey = tuple[str, tuple[int, ...], tuple[int, ...]]  # name, offsets, lengths

MIN_SPLIT_BYTES = 1 << 20
"""The smallest row range a replicated piece is cut into (the engine also keeps it at or
above the checksum chunk size)."""


class PieceInfo(NamedTuple):
    """What one rank holds of one tensor, as exchanged between ranks.

    ``dtype`` and ``shape`` (the global shape) let every rank check that all ranks hold
    the same tensor under each name before anything is staged; empty when unknown. A
    tuple: a first save at scale exchanges millions of them, and tuples pickle, unpickle
    and hash several times faster than objects.
    """

    name: str
    offsets: tuple[int, ...]
    lengths: tuple[int, ...]
    nbytes: int
    dtype: str = ""
    shape: tuple[int, ...] | None = None

    @property
    def key(self) -> PieceKey:
        return (self.name, self.offsets, self.lengths)


def piece_key(t: FlatTensor) -> PieceKey:
    return (t.name, t.box.offsets, t.box.lengths)


def description_digest(tensors: Mapping[str, FlatTensor], min_split_bytes: int) -> str:
    """What decides this rank's part of a plan and the layouts it describes: every tensor's
    name, dtype, global shape and held box (empty ones included), and the split size."""
    h = hashlib.blake2b(repr(min_split_bytes).encode(), digest_size=16)
    for t in tensors.values():
        h.update(repr((t.name, t.dtype, t.global_shape, t.box.offsets, t.box.lengths)).encode())
    return h.hexdigest()


def describe(tensors: Mapping[str, FlatTensor]) -> list[PieceInfo]:
    """This rank's non-empty pieces."""
    return [
        PieceInfo(t.name, t.box.offsets, t.box.lengths, t.nbytes, t.dtype, t.global_shape)
        for t in tensors.values()
        if t.local.numel() > 0
    ]


class Share(NamedTuple):
    """The part of a piece one rank writes: all of it, or a range of its rows."""

    rank: int
    box: Box  # global region
    nbytes: int


@dataclass(frozen=True)
class WritePlan:
    """Who writes which part of every piece, and the bytes each rank writes."""

    shares: dict[PieceKey, tuple[Share, ...]]  # in row order; together they tile the piece
    bytes_per_rank: tuple[int, ...]

    @property
    def imbalance(self) -> float:
        """Busiest rank's bytes over the mean (1.0 is perfect balance)."""
        total = sum(self.bytes_per_rank)
        if not total:
            return 1.0
        return max(self.bytes_per_rank) / (total / len(self.bytes_per_rank))

    @cached_property
    def _cells(self) -> dict[str, list[Cell]]:
        cells: dict[str, list[Cell]] = {}
        for (name, _, _), shares in self.shares.items():
            held = cells.setdefault(name, [])
            held.extend((s.box.offsets, s.box.lengths, s.rank) for s in shares)
        return cells

    def written_layout(self, name: str, rank: int, shape: tuple[int, ...]) -> Layout | None:
        """The layout of tensor ``name`` (of global ``shape``) when ``rank`` is its lowest
        writer (or nobody writes it), else None."""
        cells = self._cells.get(name, [])
        if cells and min(c[2] for c in cells) != rank:
            return None
        return infer_layout(shape, cells)

    def writers(self, key: PieceKey) -> tuple[int, ...]:
        return tuple(s.rank for s in self.shares[key])

    def boxes_for(self, rank: int) -> dict[PieceKey, Box]:
        """The region of each piece that ``rank`` writes (at most one per piece)."""
        return {key: s.box for key, shares in self.shares.items() for s in shares if s.rank == rank}

    def for_rank(self, rank: int, held: Iterable[PieceKey]) -> RankPlan:
        """What ``rank`` needs of the plan, given the pieces it holds (no scan of the rest)."""
        boxes = {}
        for key in held:
            for share in self.shares.get(key, ()):
                if share.rank == rank:
                    boxes[key] = share.box
        return RankPlan(boxes, self.imbalance)


class WholePlan(Protocol):
    """The whole plan of a save, as the layouts a rank describes need it."""

    @property
    def bytes_per_rank(self) -> tuple[int, ...]: ...

    def written_layout(self, name: str, rank: int, shape: tuple[int, ...]) -> Layout | None: ...


@dataclass(frozen=True)
class RankPlan:
    """One rank's part of a write plan: the region of each of its pieces that it writes
    (pieces it writes nothing of are absent), and the plan's imbalance. Small enough to
    keep between saves, unlike the whole plan (O(world x tensors)). ``described`` holds
    the layouts this rank describes (``described_layouts``) when they come without the
    whole plan: a plan seeded from a manifest."""

    boxes: dict[PieceKey, Box]
    imbalance: float
    described: Mapping[str, TensorEntry] | None = None


def assign_writers(
    per_rank: Sequence[Sequence[PieceInfo]], *, min_split_bytes: int = MIN_SPLIT_BYTES
) -> WritePlan:
    """Deterministically share out every distinct piece (same result on every rank).

    Raises:
        CoordinationError: ranks disagree on a tensor's dtype or global shape (raised on
            every rank alike, before anything is staged).

    Args:
        per_rank: each rank's pieces, as ``describe`` lists them.
        min_split_bytes: the smallest row range a replicated piece is cut into.
    """
    # The hot loop of a first save at scale (millions of pieces): plain tuples, one dict
    # operation per piece.
    seen: dict[PieceKey, list[Any]] = {}  # key -> [piece, holder, holder, ...]
    tensors: dict[str, tuple[str, tuple[int, ...] | None, int]] = {}
    for rank, described in enumerate(per_rank):
        for p in described:
            key = (p[0], p[1], p[2])
            held = seen.get(key)
            if held is None:
                seen[key] = [p, rank]
            else:
                held.append(rank)
            known = tensors.setdefault(p[0], (p[4], p[5], rank))
            if known[0] != p[4] or known[1] != p[5]:
                raise CoordinationError(
                    f"ranks disagree on tensor {p.name!r}: {known[0]}{list(known[1] or ())} on "
                    f"rank {known[2]}, {p.dtype}{list(p.shape or ())} on rank {rank}; every "
                    "rank must save the same global tensor under a name (pipeline stages: keep "
                    "the whole model's parameter names and save optimizers through "
                    "ckpt.ModelOptimizerState, which names their state by parameter). Nothing "
                    "was saved"
                )
    load = [0] * len(per_rank)
    shares: dict[PieceKey, tuple[Share, ...]] = {}
    holders: dict[PieceKey, list[int]] = {}
    replicated = []
    for key, held in seen.items():
        piece = held[0]
        if len(held) == 2:
            shares[key] = (Share(held[1], Box(piece[1], piece[2]), piece[3]),)
            load[held[1]] += piece[3]
        else:
            replicated.append(piece)
            holders[key] = held[1:]
    shares.update(share_replicated(replicated, holders, load, min_split_bytes))
    return WritePlan(shares, tuple(load))


def share_replicated(
    replicated: list[PieceInfo],
    holders: Mapping[PieceKey, list[int]],
    load: list[int],
    min_split_bytes: int,
) -> dict[PieceKey, tuple[Share, ...]]:
    """Rule 2 and 3 of the module's: the shares of the pieces several ranks hold (each
    with its holders in rank order), given the bytes each rank writes of the pieces only
    it holds; ``load`` ends as every rank's bytes to write."""
    shares = {}
    replicated.sort(key=lambda p: (len(holders[p.key]), -p.nbytes, p.key))
    level = _water_level(load, sum(p.nbytes for p in replicated))
    for piece in replicated:
        shares[piece.key] = _share_out(piece, holders[piece.key], load, level, min_split_bytes)
        for s in shares[piece.key]:
            load[s.rank] += s.nbytes
    return shares


def _whole(piece: PieceInfo, rank: int) -> Share:
    return Share(rank, Box(piece.offsets, piece.lengths), piece.nbytes)


def _share_out(
    piece: PieceInfo, holders: list[int], load: list[int], level: int, min_split_bytes: int
) -> tuple[Share, ...]:
    """``piece`` whole for its least loaded holder, or row ranges for several, towards ``level``."""
    least = min(holders, key=load.__getitem__)  # holders ascend: ties go to the lowest rank
    cut = _cut_sizes(piece, min_split_bytes)
    if cut is None:
        return (_whole(piece, least),)
    row_bytes, min_rows = cut
    if 2 * (piece.lengths[0] - (level - load[least]) // row_bytes) < min_rows:  # it fits
        return (_whole(piece, least),)
    level = max(level, _water_level([load[r] for r in holders], piece.nbytes))
    counts = _fill(
        sorted(holders, key=load.__getitem__),
        load,
        level,
        piece.lengths[0],
        row_bytes,
        min_rows,
    )
    if not counts:
        return (_whole(piece, least),)
    return tuple(_row_ranges(piece, _without_short_tail(counts, min_rows), row_bytes))


def _cut_sizes(piece: PieceInfo, min_split_bytes: int) -> tuple[int, int] | None:
    """(bytes per row, rows of the smallest range), or None when ``piece`` is not cut at all."""
    if not piece.lengths or piece.lengths[0] < 2:  # 0-d or one row
        return None
    row_bytes, ragged = divmod(piece.nbytes, piece.lengths[0])
    min_rows = max(1, -(-min_split_bytes // max(1, row_bytes)))
    if ragged or piece.lengths[0] < 2 * min_rows:
        return None
    return row_bytes, min_rows


def _fill(
    holders: list[int], load: list[int], level: int, rows: int, row_bytes: int, min_rows: int
) -> list[tuple[int, int]]:
    """(rank, rows) in row order: each holder, least loaded first, takes the rows that bring
    it to ``level``; none when every holder is within half a range of it."""
    counts: list[tuple[int, int]] = []
    left = rows
    for rank in holders:
        room = (level - load[rank]) // row_bytes
        if 2 * room < min_rows:
            continue
        take = min(max(room, min_rows), left)
        if 2 * (left - take) < min_rows:
            take = left
        counts.append((rank, take))
        left -= take
        if not left:
            return counts
    if counts:  # rounding and skipped holders: the last range takes the rest
        counts[-1] = (counts[-1][0], counts[-1][1] + left)
    return counts


def _water_level(loads: list[int], extra: int) -> int:
    """The smallest level L such that raising every load below L up to L takes
    ``extra`` bytes or more."""
    ordered = sorted(loads)
    total = extra
    for k, value in enumerate(ordered, start=1):
        total += value
        level = -(-total // k)
        if k == len(ordered) or level <= ordered[k]:
            return level
    return 0  # no ranks


def _without_short_tail(counts: list[tuple[int, int]], min_rows: int) -> list[tuple[int, int]]:
    """Only the last range can be short: it borrows from the one before, or joins it."""
    if len(counts) < 2 or counts[-1][1] >= min_rows:
        return counts
    (prev_rank, prev_rows), (last_rank, last_rows) = counts[-2], counts[-1]
    short = min_rows - last_rows
    if prev_rows - short >= min_rows:
        return [*counts[:-2], (prev_rank, prev_rows - short), (last_rank, min_rows)]
    return [*counts[:-2], (prev_rank, prev_rows + last_rows)]


def _row_ranges(piece: PieceInfo, counts: list[tuple[int, int]], row_bytes: int) -> list[Share]:
    shares = []
    start = piece.offsets[0]
    for rank, count in counts:
        box = Box((start, *piece.offsets[1:]), (count, *piece.lengths[1:]))
        shares.append(Share(rank, box, count * row_bytes))
        start += count
    return shares


@contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside: unpickling and planning millions of pieces
    (tuples, lists: none of them cyclic) would otherwise set off collections that scan the
    growing heap again and again (about 3x the planning time at scale)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def make_plan(
    coordinator: Coordinator, tensors: Mapping[str, FlatTensor], *, min_split_bytes: int
) -> tuple[RankPlan, WritePlan]:
    """Exchange every rank's pieces and plan (a collective): this rank's part, and the
    whole plan."""
    with _gc_paused():
        plan = assign_writers(
            coordinator.all_gather(describe(tensors)), min_split_bytes=min_split_bytes
        )
    return plan.for_rank(coordinator.rank, (piece_key(t) for t in tensors.values())), plan
