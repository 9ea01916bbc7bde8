"""Reshard planning (issue 4, items 2 and 7): property tests of ``plan_reads`` / ``PieceIndex``,
and of the loader that executes the plans.

Planner properties, on random shapes (0-3 dims, odd and zero-length sizes) stored as
random tilings (grid splits along several dims, and recursive "guillotine" splits that
no grid produces), read into random target regions or whole target tilings:

* every target element is covered by exactly one request (no hole, no double write);
* every request's region lies inside its stored piece and inside its target;
* ``raw_start``/``raw_length`` stay inside the piece's raw bytes and are exactly the
  rows of the piece that the region touches; the bytes they name, viewed as those rows
  and sliced on the inner dims, are the target's values (checked on element indices);
* a region that spans the piece's inner dims is one exact byte range (no amplification);
* ``PieceIndex.overlapping`` (bisect on one dim) finds exactly the pieces a brute-force
  scan finds;
* a region the stored pieces do not fully cover, or that lies outside the tensor,
  raises ``ReshardError``; stored pieces that overlap inside a region (a corrupt manifest,
  where a duplicated piece can hide a hole from an element count) raise
  ``CorruptCheckpointError``.

Loader properties, on real checkpoints re-laid out offline by ``ckpt.convert.relayout``
into 1-4 ranks along dims 0/1, loaded through ``ckpt.restore`` into ``ckpt.ShardedTensor``
targets: random regions come back bit for bit, and ``LoadStats`` reads never less than
needed and never more than whole checksum chunks at both ends of each touched piece
plus the loader's < 64-byte alignment of a request start. Targets made of whole stored
pieces (row-sharded) are read straight into the target: amplification exactly 1.0.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import ckpt
from ckpt.convert import relayout
from ckpt.format import Box, StoredPiece, TensorEntry, element_size, read_manifest, row_span
from recovery import Destination, Loader, PieceIndex, plan_reads
from storage_backends import LocalBackend
from tests.support.checks import assert_bit_identical
from tests.support.on_disk import save_with

DTYPES = ("float32", "bfloat16", "int64", "bool")
# Derandomized and without an example database, as the other property tests here: the same
# examples on every run and machine, so a failure in CI reproduces locally.
PLANNER_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
LOADER_SETTINGS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# --------------------------------------------------------------------------- strategies


@st.composite
def shapes(draw: st.DrawFn, max_dim: int = 9) -> tuple[int, ...]:
    """0-3 dims, sizes 0..max_dim (odd sizes, 1 and 0 included)."""
    ndim = draw(st.integers(0, 3))
    return tuple(draw(st.lists(st.integers(0, max_dim), min_size=ndim, max_size=ndim)))


@st.composite
def cuts(draw: st.DrawFn, size: int) -> list[tuple[int, int]]:
    """``size`` split into consecutive intervals (repeated cut points give empty ones)."""
    points = sorted(draw(st.lists(st.integers(0, size), max_size=4)))
    bounds = [0, *points, size]
    return [(lo, hi - lo) for lo, hi in itertools.pairwise(bounds)]


@st.composite
def grid_tiling(draw: st.DrawFn, shape: tuple[int, ...]) -> list[Box]:
    """The cartesian product of independent splits of every dim (DTensor / FSDP / TP grids)."""
    per_dim = [draw(cuts(n)) for n in shape]
    boxes = [Box((), ())]
    for intervals in per_dim:
        boxes = [Box((*b.offsets, o), (*b.lengths, n)) for b in boxes for o, n in intervals]
    return boxes


@st.composite
def guillotine_tiling(draw: st.DrawFn, shape: tuple[int, ...]) -> list[Box]:
    """Recursive cuts of a box along random dims: pieces of uneven lengths on every dim."""
    if not shape:
        return [Box((), ())]
    todo = [Box.full(shape)]
    done: list[Box] = []
    while todo:
        box = todo.pop()
        if len(done) + len(todo) >= 12 or not draw(st.booleans()):
            done.append(box)
            continue
        d = draw(st.integers(0, box.ndim - 1))
        cut = draw(st.integers(0, box.lengths[d]))
        left_l = list(box.lengths)
        right_o = list(box.offsets)
        right_l = list(box.lengths)
        left_l[d] = cut
        right_o[d] += cut
        right_l[d] -= cut
        todo += [Box(box.offsets, tuple(left_l)), Box(tuple(right_o), tuple(right_l))]
    return done


@st.composite
def tilings(draw: st.DrawFn, shape: tuple[int, ...]) -> list[Box]:
    boxes = draw(st.one_of(grid_tiling(shape), guillotine_tiling(shape)))
    return draw(st.permutations(boxes))


@st.composite
def regions(draw: st.DrawFn, shape: tuple[int, ...]) -> Box:
    """Any box inside ``shape`` (zero-length ones included)."""
    offsets, lengths = [], []
    for n in shape:
        o = draw(st.integers(0, n))
        offsets.append(o)
        lengths.append(draw(st.integers(0, n - o)))
    return Box(tuple(offsets), tuple(lengths))


@st.composite
def problems(draw: st.DrawFn) -> tuple[TensorEntry, list[tuple[int, Box]]]:
    """A stored tensor (random tiling) and targets: random regions or a whole target tiling."""
    shape = draw(shapes())
    dtype = draw(st.sampled_from(DTYPES))
    entry = entry_of(dtype, shape, draw(tilings(shape)))
    if draw(st.booleans()):
        boxes = draw(tilings(shape))
    else:
        boxes = draw(st.lists(regions(shape), min_size=1, max_size=4))
    return entry, list(enumerate(boxes))


def entry_of(dtype: str, shape: tuple[int, ...], boxes: list[Box]) -> TensorEntry:
    """A manifest entry whose pieces are ``boxes`` (file, offsets and checksums are dummies)."""
    itemsize = element_size(dtype)
    pieces = tuple(
        StoredPiece.at(box, f"data/p{i}.safetensors", 1000 * i, box.numel * itemsize, "raw", "")
        for i, box in enumerate(boxes)
    )
    return TensorEntry(dtype, shape, pieces)


def _index(box: Box) -> tuple[slice, ...]:
    return tuple(slice(o, o + n) for o, n in zip(box.offsets, box.lengths))


def _inside(inner: Box, outer: Box) -> bool:
    return all(
        oo <= o and o + n <= oo + on
        for o, n, oo, on in zip(inner.offsets, inner.lengths, outer.offsets, outer.lengths)
    )


# --------------------------------------------------------------------------- planner properties


@PLANNER_SETTINGS
@given(problems())
@example((entry_of("float32", (), [Box((), ())]), [(0, Box((), ()))]))  # 0-d tensor
@example((entry_of("int64", (3, 0), [Box((0, 0), (3, 0))]), [(0, Box((0, 0), (3, 0)))]))  # 0-size
def test_plan_covers_every_target_element_exactly_once(
    problem: tuple[TensorEntry, list[tuple[int, Box]]],
) -> None:
    """Each target element gets exactly one request; requests stay inside piece and target."""
    entry, targets = problem
    requests = plan_reads("t", entry, targets)
    counts = {i: torch.zeros(box.lengths, dtype=torch.int32) for i, box in targets}
    boxes = dict(targets)
    for req in requests:
        target = boxes[req.target]
        assert req.tensor == "t"
        assert req.region.numel > 0, "empty overlaps are not requested"
        assert req.piece in entry.pieces
        assert _inside(req.region, req.piece.box), (req.region, req.piece.box)
        assert _inside(req.region, target), (req.region, target)
        counts[req.target][req.region.relative_to(target)] += 1
    for i, count in counts.items():
        assert bool((count == 1).all()), (
            f"target {i} {boxes[i]}: coverage {count.unique().tolist()}"
        )
    # One request per (target, piece) pair that overlaps.
    pairs = [(r.target, r.piece.file) for r in requests]
    assert len(pairs) == len(set(pairs))


@PLANNER_SETTINGS
@given(problems())
def test_plan_byte_ranges_are_the_rows_needed(
    problem: tuple[TensorEntry, list[tuple[int, Box]]],
) -> None:
    """raw_start/raw_length lie in the piece's raw bytes, are exactly the rows the region
    touches, are exact when the region spans the piece's inner dims, and the bytes they
    name hold the target's values (checked on a tensor of element indices)."""
    entry, targets = problem
    itemsize = element_size(entry.dtype)
    # Element e of the global tensor holds e: the "raw bytes" of a piece are its indices.
    numbered = torch.arange(math.prod(entry.shape), dtype=torch.int64).reshape(entry.shape)
    filled = {i: torch.full(box.lengths, -1, dtype=torch.int64) for i, box in targets}
    boxes = dict(targets)
    for req in plan_reads("t", entry, targets):
        piece = req.piece.box
        raw_bytes = piece.numel * itemsize
        assert req.raw_start >= 0 and req.raw_start + req.raw_length <= raw_bytes
        assert req.raw_start % itemsize == 0 and req.raw_length % itemsize == 0
        row = math.prod(piece.lengths[1:]) * itemsize if piece.ndim else itemsize
        if piece.ndim:
            assert req.raw_start == (req.region.offsets[0] - piece.offsets[0]) * row
            assert req.raw_length == req.region.lengths[0] * row
        else:
            assert (req.raw_start, req.raw_length) == (0, itemsize)
        if req.region.lengths[1:] == piece.lengths[1:]:
            assert req.raw_length == req.region.numel * itemsize, (
                "spanning region reads exact bytes"
            )
        assert (req.raw_start // itemsize, req.raw_length // itemsize) == row_span(
            piece, req.region
        )
        # Execute the request the way the loader does, on element indices.
        stored = numbered[_index(piece)].contiguous().reshape(-1)
        span = stored[req.raw_start // itemsize : (req.raw_start + req.raw_length) // itemsize]
        if piece.ndim:
            rows = span.view(req.region.lengths[0], *piece.lengths[1:])
            inner = tuple(
                slice(o - po, o - po + n)
                for o, n, po in zip(
                    req.region.offsets[1:], req.region.lengths[1:], piece.offsets[1:]
                )
            )
            index = (slice(None), *inner)  # mypy misreads rows[(a, *b)] as 3.11-only syntax
            values = rows[index]
        else:
            values = span.view([])
        filled[req.target][req.region.relative_to(boxes[req.target])] = values
    for i, box in targets:
        assert torch.equal(filled[i], numbered[_index(box)]), f"target {i} {box}"


@PLANNER_SETTINGS
@given(st.data())
def test_piece_index_finds_exactly_the_overlapping_pieces(data: st.DataObject) -> None:
    """The bisect index returns the same pieces as a scan of all of them, for any region."""
    shape = data.draw(shapes(max_dim=12))
    entry = entry_of("float32", shape, data.draw(tilings(shape)))
    index = PieceIndex(entry.pieces)
    for _ in range(5):
        region = data.draw(regions(shape))
        found = index.overlapping(region)
        if region.ndim == 0:
            assert found == list(entry.pieces)
            continue
        brute = [p for p in entry.pieces if p.box.intersect(region) is not None]
        assert sorted(found, key=id) == sorted(brute, key=id), region


@PLANNER_SETTINGS
@given(st.data())
def test_uncovered_region_raises_reshard_error(data: st.DataObject) -> None:
    """With one non-empty piece missing, a region touching it raises ReshardError naming the
    tensor; a region that avoids it still plans."""
    shape = data.draw(shapes())
    boxes = data.draw(tilings(shape))
    holes = [i for i, b in enumerate(boxes) if b.numel > 0]
    assume(holes)
    hole = boxes[data.draw(st.sampled_from(holes))]
    entry = entry_of("int64", shape, [b for b in boxes if b is not hole])
    region = data.draw(regions(shape))
    touches = hole.ndim == 0 or hole.intersect(region) is not None
    if touches:
        with pytest.raises(ckpt.ReshardError, match="'t'"):
            plan_reads("t", entry, [(0, region)])
    else:
        requests = plan_reads("t", entry, [(0, region)])
        assert sum(r.region.numel for r in requests) == region.numel


@PLANNER_SETTINGS
@given(st.data())
def test_region_outside_the_tensor_raises_reshard_error(data: st.DataObject) -> None:
    """Regions past the end of a dim, with a negative offset, or of another rank are refused."""
    shape = data.draw(shapes().filter(lambda s: len(s) > 0))
    entry = entry_of("float32", shape, data.draw(tilings(shape)))
    d = data.draw(st.integers(0, len(shape) - 1))
    region = data.draw(regions(shape))
    kind = data.draw(st.sampled_from(["past_end", "negative", "rank"]))
    offsets, lengths = list(region.offsets), list(region.lengths)
    if kind == "past_end":
        lengths[d] = shape[d] - offsets[d] + data.draw(st.integers(1, 3))
    elif kind == "negative":
        offsets[d] = -data.draw(st.integers(1, 3))
    else:
        offsets.append(0)
        lengths.append(1)
    with pytest.raises(ckpt.ReshardError, match="outside"):
        plan_reads("t", entry, [(0, Box(tuple(offsets), tuple(lengths)))])


def test_duplicated_piece_cannot_hide_a_hole() -> None:
    """A (corrupt) manifest whose pieces overlap and leave a hole of the same size passes an
    element count; the planner refuses it (CorruptCheckpointError) rather than leave target
    bytes unwritten, and also refuses regions that would be written twice."""
    shape = (4, 3)
    twice = Box((0, 0), (2, 3))
    entry = entry_of("float32", shape, [twice, twice])  # rows 2..3 are never stored
    for region in (Box.full(shape), Box((0, 0), (2, 3)), Box((1, 1), (1, 1))):
        with pytest.raises(ckpt.CorruptCheckpointError, match=r"'t'.*overlap"):
            plan_reads("t", entry, [(0, region)])
    # Rows 2..3 touch only the hole: an ordinary uncovered region.
    with pytest.raises(ckpt.ReshardError, match="'t'"):
        plan_reads("t", entry, [(0, Box((2, 0), (2, 3)))])
    scalar = entry_of("int64", (), [Box((), ()), Box((), ())])
    with pytest.raises(ckpt.CorruptCheckpointError, match="overlap"):
        plan_reads("t", scalar, [(0, Box((), ()))])


@PLANNER_SETTINGS
@given(st.data())
def test_any_overlap_between_pieces_is_refused(data: st.DataObject) -> None:
    """A tiling with one piece duplicated: every region touching the duplicate is refused as
    corrupt, every other region plans normally."""
    shape = data.draw(shapes())
    boxes = data.draw(tilings(shape))
    nonempty = [b for b in boxes if b.numel > 0]
    assume(nonempty)
    dup = data.draw(st.sampled_from(nonempty))
    entry = entry_of("float32", shape, [*boxes, dup])
    region = data.draw(regions(shape))
    if region.numel > 0 and (dup.ndim == 0 or dup.intersect(region) is not None):
        with pytest.raises(ckpt.CorruptCheckpointError, match="overlap"):
            plan_reads("t", entry, [(0, region)])
    else:
        assert sum(r.region.numel for r in plan_reads("t", entry, [(0, region)])) == region.numel


def test_overlapping_pieces_in_a_manifest_fail_the_load(tmp_path: Path) -> None:
    """End to end: a re-sealed manifest in which one piece claims another's rows (the counts
    still add up) makes ckpt.load raise CorruptCheckpointError, never return partial data."""
    from tests.support.on_disk import read_manifest as read_doc
    from tests.support.on_disk import write_manifest

    value = torch.arange(40, dtype=torch.float32).reshape(8, 5)
    save_with({"w": value}, tmp_path / "src", STEP)
    v1 = ckpt.SaveOptions(format_version=1)  # the pieces tampered with are in the manifest
    relayout(
        LocalBackend(tmp_path / "src"), LocalBackend(tmp_path / "k2"), world_size=2, options=v1
    )
    doc = read_doc(tmp_path / "k2", STEP)
    pieces = doc["tensors"]["w"]["pieces"]
    assert [p["offsets"] for p in sorted(pieces, key=lambda p: p["offsets"])] == [[0, 0], [4, 0]]
    for p in pieces:
        p["offsets"] = [0, 0]
    write_manifest(tmp_path / "k2", STEP, doc)
    target = {"w": torch.zeros(8, 5)}
    with pytest.raises(ckpt.CorruptCheckpointError, match=r"'w'.*overlap"):
        ckpt.load(target, tmp_path / "k2", step=STEP)


# --------------------------------------------------------------------------- loader properties

CHUNK = 4096
STEP = 5
# Name -> (shape, dtype): several chunks per piece at CHUNK bytes; odd sizes; a dim of 2
# (empty pieces on 3 and 4 ranks); a 0-size tensor; a 0-d one; rows of exactly 1 KiB
# ("aligned": piece starts and chunk boundaries fall on whole rows).
LOADER_TENSORS: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
    "odd": ((97, 33), torch.float32),
    "bf16": ((130, 31), torch.bfloat16),
    "ids": ((1001,), torch.int64),
    "mask": ((300, 7), torch.bool),
    "cube": ((9, 10, 11), torch.float32),
    "short": ((2, 513), torch.int64),
    "aligned": ((96, 256), torch.float32),
    "empty": ((0, 5), torch.float32),
    "scalar": ((), torch.int64),
}
LAYOUTS = [(k, d) for k in (1, 2, 3, 4) for d in (0, 1)]


def _value(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    return torch.randint(-(2**40), 2**40, shape, generator=gen, dtype=dtype)


@dataclass
class Relaid:
    """A source checkpoint and its offline re-layouts, with the full values saved."""

    values: dict[str, torch.Tensor]
    roots: dict[tuple[int, int], Path]


@pytest.fixture(scope="module")
def relaid(tmp_path_factory: pytest.TempPathFactory) -> Relaid:
    base = tmp_path_factory.mktemp("relaid")
    values = {name: _value(name, shape, dtype) for name, (shape, dtype) in LOADER_TENSORS.items()}
    save_with(dict(values), base / "src", STEP)
    src = LocalBackend(base / "src")
    roots = {}
    for k, d in LAYOUTS:
        root = base / f"k{k}-d{d}"
        dst = LocalBackend(root)
        relayout(src, dst, world_size=k, dim=d, options=ckpt.SaveOptions(chunk_bytes=CHUNK))
        dst.close()
        roots[(k, d)] = root
    src.close()
    return Relaid(values, roots)


def _restore_region(root: Path, name: str, box: Box) -> tuple[torch.Tensor, Any]:
    """Load ``box`` of tensor ``name`` into a ShardedTensor target (sentinel-filled first)."""
    shape, dtype = LOADER_TENSORS[name]
    local = (
        torch.ones(box.lengths, dtype=dtype)
        if dtype == torch.bool
        else torch.full(box.lengths, 7).to(dtype)
    )
    target = ckpt.ShardedTensor(local, shape, box.offsets)
    report = ckpt.restore({name: target}, root, strict=False)
    assert report.step == STEP and report.stats is not None
    return local, report.stats


def _allowance(root: Path, name: str, box: Box) -> tuple[int, int]:
    """(the most the loader may read: the touched pieces whole, each with < 64 bytes of start
    alignment; the most it may read beyond the need: whole rows, whole chunks at both ends of
    each touched byte range, and the same alignment)."""
    manifest = read_manifest(LocalBackend(root), STEP)
    entry = manifest.tensors[name]
    itemsize = element_size(entry.dtype)
    whole = extra = 0
    for piece in entry.pieces:
        overlap = piece.box.intersect(box) if box.ndim else piece.box
        if overlap is None:
            continue
        raw = piece.box.numel * itemsize
        first, count = row_span(piece.box, overlap)
        a, b = first * itemsize, (first + count) * itemsize
        whole += raw + 63
        extra += (
            (a % CHUNK)
            + (min(-(-b // CHUNK) * CHUNK, raw) - b)
            + (b - a - overlap.numel * itemsize)
            + 63
        )
    return whole, extra


@LOADER_SETTINGS
@given(st.data())
def test_loader_reads_random_regions_bit_exactly(relaid: Relaid, data: st.DataObject) -> None:
    """Any region of any tensor of any re-layout loads bit for bit; the bytes read are at least
    the bytes needed and at most whole chunks (+ alignment) around each touched piece range."""
    name = data.draw(st.sampled_from(sorted(LOADER_TENSORS)))
    layout = data.draw(st.sampled_from(LAYOUTS))
    root = relaid.roots[layout]
    full = relaid.values[name]
    box = data.draw(regions(tuple(full.shape)))
    local, stats = _restore_region(root, name, box)
    assert_bit_identical(local, full[_index(box)])
    needed = box.numel * full.element_size()
    assert stats.bytes_needed == needed
    whole, extra = _allowance(root, name, box)
    assert needed <= stats.bytes_read <= min(needed + extra, whole), stats
    assert stats.read_amplification >= 1.0


@LOADER_SETTINGS
@given(st.data())
def test_loader_fills_many_targets_in_one_load(relaid: Relaid, data: st.DataObject) -> None:
    """One ``Loader.load`` of several regions of several tensors (regions may overlap and share
    chunks, destinations may be non-contiguous views) fills each bit for bit; each request
    stays inside one data file."""
    layout = data.draw(st.sampled_from(LAYOUTS))
    root = relaid.roots[layout]
    manifest = read_manifest(LocalBackend(root), STEP)
    destinations, expected = [], []
    for _ in range(data.draw(st.integers(1, 6))):
        name = data.draw(st.sampled_from(sorted(LOADER_TENSORS)))
        full = relaid.values[name]
        box = data.draw(regions(tuple(full.shape)))
        if box.ndim >= 2 and data.draw(st.booleans()):
            # A transposed buffer: the destination is a non-contiguous view.
            order = list(range(box.ndim))[::-1]
            tensor = torch.zeros([box.lengths[d] for d in order], dtype=full.dtype).permute(order)
        else:
            tensor = torch.zeros(box.lengths, dtype=full.dtype)
        destinations.append(Destination(name, tensor, box))
        expected.append(full[_index(box)])
    stats = Loader(LocalBackend(root), manifest).load(destinations)
    for dest, want in zip(destinations, expected):
        assert_bit_identical(dest.tensor.contiguous(), want)
    assert stats.bytes_needed == sum(w.numel() * w.element_size() for w in expected)
    assert stats.bytes_read <= stats.requests * max(manifest.files.values(), default=0)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_loader_whole_pieces_read_exactly(relaid: Relaid, k: int) -> None:
    """Row-sharded (dim 0) targets made of whole stored pieces, on every re-layout: each piece is
    read straight into the target's memory, so bytes read == bytes needed (amplification 1.0)
    and one request per non-empty piece."""
    for name, (shape, _) in LOADER_TENSORS.items():
        if len(shape) == 0 or math.prod(shape) == 0:
            continue
        manifest = read_manifest(LocalBackend(relaid.roots[(k, 0)]), STEP)
        pieces = sorted(manifest.tensors[name].pieces, key=lambda p: p.box.offsets[0])
        # Every run of consecutive pieces: rank r of a coarser layout, or the whole tensor.
        for i in range(len(pieces)):
            for j in range(i + 1, len(pieces) + 1):
                lo = pieces[i].box.offsets[0]
                hi = pieces[j - 1].box.offsets[0] + pieces[j - 1].box.lengths[0]
                box = Box((lo, *[0] * (len(shape) - 1)), (hi - lo, *shape[1:]))
                local, stats = _restore_region(relaid.roots[(k, 0)], name, box)
                assert_bit_identical(local, relaid.values[name][_index(box)])
                assert stats.bytes_read == stats.bytes_needed == box.numel * local.element_size()
                assert stats.read_amplification == 1.0
                assert stats.requests == j - i


def test_loader_chunk_aligned_rows_read_only_alignment_slack(relaid: Relaid) -> None:
    """Row ranges whose bytes start and end on chunk boundaries inside every piece they touch
    (tensor "aligned": 1 KiB rows, 4 rows per 4 KiB chunk, pieces starting on multiples of 4
    rows) read the needed bytes plus only the < 64-byte alignment of each request's start:
    amplification below 1 + 64 / 4096."""
    name = "aligned"
    full = relaid.values[name]
    for k in (1, 2, 3, 4):
        root = relaid.roots[(k, 0)]
        manifest = read_manifest(LocalBackend(root), STEP)
        starts = sorted(p.box.offsets[0] for p in manifest.tensors[name].pieces)
        assert all(s % 4 == 0 for s in starts), starts
        for lo in range(0, 96, 4):
            for hi in range(lo + 4, 97, 20):
                box = Box((lo, 0), (hi - lo, 256))
                local, stats = _restore_region(root, name, box)
                assert_bit_identical(local, full[lo:hi])
                touched = sum(
                    1 for p in manifest.tensors[name].pieces if p.box.intersect(box) is not None
                )
                assert 0 <= stats.bytes_read - stats.bytes_needed < 64 * touched, (k, lo, hi, stats)
                assert stats.read_amplification < 1 + 64 / 4096
