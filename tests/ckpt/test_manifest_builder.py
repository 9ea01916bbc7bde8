"""The committer's merge: ``ManifestBuilder`` over ShardIndex objects and report bytes, and
``ShardIndex.from_bytes``'s validation of a rank's report."""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckpt.coordination import ManifestBuilder, merge_indexes
from ckpt.errors import (
    CoordinationError,
    CorruptCheckpointError,
    InvalidStateError,
    UnsupportedFormatError,
)
from ckpt.format import (
    Box,
    Manifest,
    ShardIndex,
    StoredPiece,
    TensorEntry,
    checksum,
    chunk_checksums,
    compress_chunks,
    element_size,
    seal_manifest,
)

CHUNK = 64  # small chunks, so that pieces carry several checksums
HEADER = 8  # bytes before the first piece of a data file (a stand-in safetensors header)
WHERE = "mem://ckpts/step-000000005/index/rank3.json"
PROPERTY = settings(max_examples=40, deadline=None, derandomize=True, database=None)

# name -> (dtype, global shape, boxes stored by this rank)
Layout = Mapping[str, tuple[str, tuple[int, ...], Sequence[Box]]]


def payload(box: Box, dtype: str, seed: int) -> bytes:
    """Deterministic, somewhat compressible bytes for a piece."""
    n = box.numel * element_size(dtype)
    return bytes((seed + i // 3) % 251 for i in range(n))


def rank_index(
    rank: int, layout: Layout, *, zstd: Sequence[str] = (), state: dict[str, Any] | None = None
) -> ShardIndex:
    """A rank's shard index: its pieces packed back to back in one data file of its own.

    Tensors named in ``zstd`` are stored compressed, one frame per chunk.
    """
    file = f"data/rank{rank:05d}.safetensors"
    offset = HEADER
    tensors: dict[str, TensorEntry] = {}
    for name, (dtype, shape, boxes) in layout.items():
        pieces = []
        for i, box in enumerate(boxes):
            raw = payload(box, dtype, seed=rank * 31 + i)
            if name in zstd:
                frames = compress_chunks(memoryview(raw), CHUNK, 3)
                sizes = tuple(len(f) for f in frames)
                piece = StoredPiece.at(
                    box,
                    file,
                    offset,
                    sum(sizes),
                    "zstd",
                    "".join(checksum(f) for f in frames),
                    sizes,
                )
            else:
                piece = StoredPiece.at(
                    box, file, offset, len(raw), "raw", chunk_checksums(memoryview(raw), CHUNK)
                )
            offset += piece.byte_length
            pieces.append(piece)
        tensors[name] = TensorEntry(dtype, tuple(shape), tuple(pieces))
    return ShardIndex(rank=rank, tensors=tensors, files={file: offset}, state=state)


def row_boxes(shape: tuple[int, ...], cuts: Sequence[int]) -> list[Box]:
    """Shard(0): rows ``cuts[i] .. cuts[i + 1]`` of a tensor of ``shape``."""
    return [
        Box((a, *(0 for _ in shape[1:])), (b - a, *shape[1:])) for a, b in itertools.pairwise(cuts)
    ]


def mesh_blocks(shape: tuple[int, int], mesh: tuple[int, int]) -> list[Box]:
    """A 2-D mesh's blocks, row-major over the mesh."""
    rows, cols = shape[0] // mesh[0], shape[1] // mesh[1]
    return [Box((i * rows, j * cols), (rows, cols)) for i in range(mesh[0]) for j in range(mesh[1])]


def add_mixed(builder: ManifestBuilder, indexes: Sequence[ShardIndex], as_bytes: set[int]) -> None:
    """Add each index as report bytes (ranks in ``as_bytes``) or as an object."""
    for index in indexes:
        if index.rank in as_bytes:
            builder.add_report(index.to_bytes(), f"report of rank {index.rank}", CHUNK)
        else:
            builder.add(index)


def render_and_build(builder: ManifestBuilder, created: float = 1234.5) -> tuple[bytes, Manifest]:
    common: dict[str, Any] = {
        "generation": "gen-1",
        "world_size": 4,
        "chunk_bytes": CHUNK,
        "created_unix": created,
        "user_metadata": {"run": "a"},
        "layout": {"mesh": [2, 2]},
    }
    return builder.render(**common), builder.build(**common)


def piece_sets(
    manifest: Manifest,
) -> dict[str, tuple[str, tuple[int, ...], frozenset[StoredPiece]]]:
    return {name: (e.dtype, e.shape, frozenset(e.pieces)) for name, e in manifest.tensors.items()}


def coverage(shape: tuple[int, ...], boxes: Sequence[Box]) -> np.ndarray:
    """How many boxes hold each element."""
    counts = np.zeros(shape, dtype=np.int64)
    for box in boxes:
        counts[tuple(slice(o, o + n) for o, n in zip(box.offsets, box.lengths))] += 1
    return counts


# --- a 4-rank save with every kind of piece ------------------------------------------------

ROWS = ("float32", (10, 3))
MESH = ("bfloat16", (4, 6))
SCALAR = ("int64", ())
PACKED = ("float64", (40,))
QUOTED = 'emb.\u00e9"q\\'  # a name JSON must escape
STATE0 = {"step": 5, "lr": 0.25, "sched": {"milestones": [1, 2]}, "name": "r\u00e9sum\u00e9"}
STATE2 = {"step": 5, "lr": 0.5}


def four_ranks() -> list[ShardIndex]:
    rows = row_boxes(ROWS[1], [0, 3, 6, 8, 10])
    blocks = mesh_blocks((4, 6), (2, 2))
    indexes = []
    for rank in range(4):
        layout: dict[str, tuple[str, tuple[int, ...], Sequence[Box]]] = {
            "model.rows": (*ROWS, [rows[rank]]),
            "model.mesh": (*MESH, [blocks[rank]]),
            "model.scalar": (*SCALAR, [Box((), ())] if rank == 0 else []),
            "optim.packed": (*PACKED, [Box((0,), (40,))] if rank == 1 else []),
            QUOTED: ("int32", (4,), [Box((rank,), (1,))]),
        }
        state = STATE0 if rank == 0 else STATE2 if rank == 2 else None
        indexes.append(rank_index(rank, layout, zstd=["optim.packed"], state=state))
    return indexes


def test_fixture_indexes_are_realistic() -> None:
    """The zstd piece spans several chunks and the reports survive their own round trip."""
    indexes = four_ranks()
    (packed,) = indexes[1].tensors["optim.packed"].pieces
    assert packed.chunk_sizes is not None and len(packed.chunk_sizes) == 5
    for index in indexes:
        assert ShardIndex.from_bytes(index.to_bytes(), "r", CHUNK) == index


def test_rendered_manifest_equals_built_manifest() -> None:
    """Reports added as bytes and as objects, out of rank order: ``render`` loads back as
    exactly ``build``'s manifest, and is byte for byte ``build(...).to_bytes()``."""
    indexes = four_ranks()
    builder = ManifestBuilder(5)
    add_mixed(builder, [indexes[3], indexes[0], indexes[2], indexes[1]], as_bytes={0, 2})
    data, built = render_and_build(builder)
    loaded = Manifest.from_bytes(data, "manifest")
    assert loaded == built
    assert data == built.to_bytes()
    assert loaded.created_unix == 1234.5
    assert loaded.state == STATE0  # the lowest rank's state, whatever the arrival order
    assert loaded.files == {
        f"data/rank{r:05d}.safetensors": indexes[r].files[f"data/rank{r:05d}.safetensors"]
        for r in range(4)
    }
    assert list(loaded.files) == sorted(loaded.files)
    assert loaded.user_metadata == {"run": "a"} and loaded.layout == {"mesh": [2, 2]}
    expected: dict[str, set[StoredPiece]] = {name: set() for name in indexes[0].tensors}
    for index in indexes:
        for name, entry in index.tensors.items():
            expected[name].update(entry.pieces)
    assert {name: set(e.pieces) for name, e in loaded.tensors.items()} == expected
    assert loaded.tensors["model.scalar"].shape == ()
    assert loaded.tensors["model.mesh"].dtype == "bfloat16"
    (packed,) = loaded.tensors["optim.packed"].pieces
    assert (
        packed.codec == "zstd"
        and packed.chunk_sizes == indexes[1].tensors["optim.packed"].pieces[0].chunk_sizes
    )


@pytest.mark.parametrize(
    "as_bytes", [set(), {0, 1, 2, 3}, {1, 3}], ids=["objects", "bytes", "mixed"]
)
def test_same_manifest_whatever_the_arrival_order(as_bytes: set[int]) -> None:
    """Every arrival order gives the same tensors (as sets of pieces), files and state."""
    indexes = four_ranks()
    reference = piece_sets(
        merge_indexes(step=5, generation="g", world_size=4, chunk_bytes=CHUNK, indexes=indexes)
    )
    for order in itertools.permutations(indexes):
        merged = merge_indexes(
            step=5, generation="g", world_size=4, chunk_bytes=CHUNK, indexes=list(order)
        )
        assert piece_sets(merged) == reference
        builder = ManifestBuilder(5)
        add_mixed(builder, order, as_bytes)
        data, built = render_and_build(builder)
        loaded = Manifest.from_bytes(data, "manifest")
        assert piece_sets(loaded) == reference
        assert loaded.state == STATE0
        assert loaded.files == merged.files
        assert data == built.to_bytes()


# --- overlaps, refused as they arrive --------------------------------------------------------

OVERLAPS: dict[str, tuple[tuple[int, ...], list[Box]]] = {
    "rows-by-one": ((10, 4), [Box((0, 0), (4, 4)), Box((4, 0), (3, 4)), Box((6, 0), (4, 4))]),
    "rows-by-one-backwards": (
        (10, 4),
        [Box((7, 0), (3, 4)), Box((4, 0), (3, 4)), Box((0, 0), (5, 4))],
    ),
    "mesh-blocks": (
        (4, 4),
        [Box((0, 0), (2, 2)), Box((0, 2), (2, 2)), Box((2, 0), (2, 2)), Box((1, 1), (2, 2))],
    ),
    "mesh-corner": ((4, 4), [Box((0, 0), (2, 2)), Box((2, 2), (2, 2)), Box((1, 1), (2, 2))]),
    "identical": ((6, 2), [Box((0, 0), (3, 2)), Box((3, 0), (3, 2)), Box((3, 0), (3, 2))]),
    "scalar": ((), [Box((), ()), Box((), ())]),
    # split on dim 1 first, then an overlap along dim 0
    "columns-then-rows": ((4, 4), [Box((0, 0), (4, 2)), Box((0, 2), (2, 2)), Box((1, 2), (2, 2))]),
    # the "longest" window: a long piece after short ones it covers
    "long-after-short": ((16,), [Box((i,), (1,)) for i in range(8)] + [Box((4,), (12,))]),
    "long-over-all": ((16,), [Box((i,), (1,)) for i in range(4, 12)] + [Box((0,), (16,))]),
    # a short piece far after a long one's start, with others in between
    "short-after-long": (
        (20,),
        [Box((0,), (10,)), Box((10,), (1,)), Box((11,), (1,)), Box((9,), (1,))],
    ),
    "short-at-long-end": (
        (20,),
        [Box((12,), (2,)), Box((0,), (12,)), Box((14,), (6,)), Box((11,), (1,))],
    ),
    "wide-then-thin-2d": (
        (8, 8),
        [
            Box((0, 0), (8, 1)),
            Box((0, 1), (8, 1)),
            Box((0, 2), (1, 6)),
            Box((7, 7), (1, 1)),
            Box((5, 0), (1, 1)),
        ],
    ),
}


@pytest.mark.parametrize("as_bytes", [False, True], ids=["objects", "bytes"])
@pytest.mark.parametrize("case", sorted(OVERLAPS))
def test_overlap_refused_when_the_overlapping_piece_arrives(case: str, as_bytes: bool) -> None:
    """Each piece comes from its own rank; all but the last are accepted, the last one is
    refused at once with the tensor and both boxes named."""
    shape, boxes = OVERLAPS[case]
    dtype = "float32"
    builder = ManifestBuilder(5)
    indexes = [rank_index(r, {"w": (dtype, shape, [box])}) for r, box in enumerate(boxes)]
    add_mixed(builder, indexes[:-1], as_bytes=set(range(len(boxes))) if as_bytes else set())
    with pytest.raises(InvalidStateError, match="overlap") as info:
        add_mixed(builder, indexes[-1:], as_bytes={len(boxes) - 1} if as_bytes else set())
    message = str(info.value)
    assert "'w'" in message and "step 5" in message
    assert str(boxes[-1]) in message
    others = [str(b) for b in boxes[:-1] if b.intersect(boxes[-1]) is not None]
    assert any(o in message for o in others), message


def test_overlap_within_one_report_is_refused() -> None:
    builder = ManifestBuilder(1)
    index = rank_index(0, {"w": ("float32", (8,), [Box((0,), (5,)), Box((4,), (4,))])})
    with pytest.raises(InvalidStateError, match=r"'w'.*overlap"):
        builder.add_report(index.to_bytes(), "r0", CHUNK)


def test_empty_pieces_never_overlap() -> None:
    """Zero-length boxes anywhere (inside other pieces, repeated) are accepted and cover nothing."""
    layouts: list[Layout] = [
        {
            "w": ("float32", (4, 3), [Box((0, 0), (4, 3)), Box((2, 0), (0, 3))]),
            "e": ("float32", (0, 3), [Box((0, 0), (0, 3))]),
        },
        {
            "w": ("float32", (4, 3), [Box((1, 1), (2, 0)), Box((2, 0), (0, 3))]),
            "e": ("float32", (0, 3), [Box((0, 0), (0, 3)), Box((0, 1), (0, 2))]),
        },
        {
            "w": ("float32", (4, 3), [Box((0, 0), (0, 0)), Box((4, 3), (0, 0))]),
            "e": ("float32", (0, 3), []),
        },
    ]
    builder = ManifestBuilder(1)
    add_mixed(builder, [rank_index(r, lay) for r, lay in enumerate(layouts)], as_bytes={1})
    data, built = render_and_build(builder)
    loaded = Manifest.from_bytes(data, "m")
    assert loaded == built
    assert len(loaded.tensors["w"].pieces) == 6
    assert sum(p.box.numel for p in loaded.tensors["w"].pieces) == 12


def test_empty_piece_first_then_a_split_tensor() -> None:
    """An empty piece arriving first does not decide how later pieces are compared."""
    builder = ManifestBuilder(1)
    boxes = [Box((0, 2), (4, 0)), Box((0, 0), (2, 4)), Box((2, 0), (2, 4))]
    for r, box in enumerate(boxes):
        builder.add(rank_index(r, {"w": ("float32", (4, 4), [box])}))
    with pytest.raises(InvalidStateError, match="overlap"):
        builder.add(rank_index(9, {"w": ("float32", (4, 4), [Box((3, 3), (1, 1))])}))


@st.composite
def block_tilings(draw: st.DrawFn) -> tuple[tuple[int, int], list[Box]]:
    """A 2-D shape cut into blocks by recursive guillotine cuts (blocks touch, never overlap)."""
    shape = (draw(st.integers(1, 12)), draw(st.integers(1, 12)))

    def split(box: Box, depth: int) -> list[Box]:
        dims = [d for d in (0, 1) if box.lengths[d] > 1]
        if not dims or depth > 5 or not draw(st.booleans()):
            return [box]
        d = draw(st.sampled_from(dims))
        cut = draw(st.integers(1, box.lengths[d] - 1))
        lo = Box(box.offsets, tuple(cut if i == d else n for i, n in enumerate(box.lengths)))
        hi = Box(
            tuple(o + cut if i == d else o for i, o in enumerate(box.offsets)),
            tuple(n - cut if i == d else n for i, n in enumerate(box.lengths)),
        )
        return split(lo, depth + 1) + split(hi, depth + 1)

    return shape, split(Box.full(shape), 0)


@PROPERTY
@given(tiling=block_tilings(), seed=st.integers(0, 2**32 - 1))
def test_touching_blocks_in_any_order_are_accepted(
    tiling: tuple[tuple[int, int], list[Box]], seed: int
) -> None:
    """Blocks that only touch are accepted in every order; then any one-element piece inside
    the tensor is refused as an overlap."""
    shape, boxes = tiling
    rng = random.Random(seed)
    rng.shuffle(boxes)
    builder = ManifestBuilder(2)
    for r, box in enumerate(boxes):
        builder.add(rank_index(r, {"w": ("float32", shape, [box])}))
    manifest = builder.build(
        generation="g", world_size=len(boxes), chunk_bytes=CHUNK, created_unix=0.0
    )
    assert (coverage(shape, [p.box for p in manifest.tensors["w"].pieces]) == 1).all()
    cell = Box((rng.randrange(shape[0]), rng.randrange(shape[1])), (1, 1))
    with pytest.raises(InvalidStateError, match="overlap"):
        builder.add(rank_index(len(boxes), {"w": ("float32", shape, [cell])}))


def test_touching_blocks_exhaustively_on_a_small_mesh() -> None:
    """A 3x3 mesh of uneven blocks (and a 2x2 mesh): all orders of arrival are accepted."""
    for blocks in (
        [Box((0, 0), (2, 2)), Box((0, 2), (2, 3)), Box((2, 0), (3, 2)), Box((2, 2), (3, 3))],
        [
            Box((r0, c0), (r1 - r0, c1 - c0))
            for r0, r1 in itertools.pairwise((0, 1, 3, 6))
            for c0, c1 in itertools.pairwise((0, 4, 5, 7))
        ],
    ):
        shape = (max(b.ends[0] for b in blocks), max(b.ends[1] for b in blocks))
        orders = (
            list(itertools.permutations(blocks))
            if len(blocks) <= 4
            else [random.Random(i).sample(blocks, len(blocks)) for i in range(200)]
        )
        for order in orders:
            builder = ManifestBuilder(1)
            builder.add(rank_index(0, {"w": ("float32", shape, list(order))}))
            builder.build(generation="g", world_size=1, chunk_bytes=CHUNK, created_unix=0.0)


# --- coverage --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["render", "build"])
def test_a_hole_is_refused_at_render_and_build(method: str) -> None:
    builder = ManifestBuilder(3)
    builder.add(rank_index(0, {"w": ("float32", (10, 2), [Box((0, 0), (4, 2))])}))
    builder.add_report(
        rank_index(1, {"w": ("float32", (10, 2), [Box((5, 0), (5, 2))])}).to_bytes(), "r1", CHUNK
    )
    with pytest.raises(InvalidStateError, match=r"'w'.*cover 18 of 20 elements"):
        getattr(builder, method)(generation="g", world_size=2, chunk_bytes=CHUNK, created_unix=0.0)


def test_a_tensor_no_rank_stored_is_refused() -> None:
    builder = ManifestBuilder(3)
    builder.add(rank_index(0, {"w": ("float32", (2, 3), [])}))
    builder.add(rank_index(1, {"w": ("float32", (2, 3), [])}))
    with pytest.raises(InvalidStateError, match=r"'w'.*cover 0 of 6 elements"):
        builder.render(generation="g", world_size=2, chunk_bytes=CHUNK, created_unix=0.0)


# --- ranks that disagree ------------------------------------------------------------------------


def test_a_rank_reporting_twice_is_refused() -> None:
    first = rank_index(1, {"w": ("float32", (4,), [Box((0,), (2,))])})
    again = rank_index(1, {"w": ("float32", (4,), [Box((2,), (2,))])})
    for add_first, add_again in itertools.product([False, True], repeat=2):
        builder = ManifestBuilder(7)
        add_mixed(builder, [first], as_bytes={1} if add_first else set())
        with pytest.raises(CoordinationError, match="rank 1 reported twice"):
            add_mixed(builder, [again], as_bytes={1} if add_again else set())


@pytest.mark.parametrize(
    "other",
    [("float16", (4, 2)), ("float32", (4, 3)), ("float32", (8,)), ("float32", ())],
    ids=["dtype", "shape", "rank-of-shape", "scalar"],
)
def test_ranks_disagreeing_on_a_tensor_are_refused(other: tuple[str, tuple[int, ...]]) -> None:
    dtype, shape = other
    boxes = [Box.full(shape)] if shape == () else [Box((0,) * len(shape), (0,) * len(shape))]
    builder = ManifestBuilder(7)
    builder.add(rank_index(0, {"w": ("float32", (4, 2), [Box((0, 0), (2, 2))])}))
    with pytest.raises(CoordinationError, match="disagree on tensor 'w'"):
        builder.add_report(rank_index(1, {"w": (dtype, shape, boxes)}).to_bytes(), "r1", CHUNK)


# --- parse_report ---------------------------------------------------------------------------------


def valid_report() -> dict[str, Any]:
    index = rank_index(
        3,
        {
            "raw": ("float32", (8, 4), [Box((0, 0), (4, 4)), Box((4, 0), (4, 4))]),
            "packed": ("float64", (40,), [Box((0,), (40,))]),
        },
        zstd=["packed"],
        state={"step": 5},
    )
    doc: dict[str, Any] = json.loads(index.to_bytes())
    return doc


def sealed(doc: Mapping[str, Any]) -> bytes:
    """A report document re-sealed (reports carry a checksum like manifests)."""
    return seal_manifest(
        json.dumps({k: v for k, v in doc.items() if k != "manifest_checksum"}).encode()
    )


def with_nan_state(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with a NaN in its state, written first: msgspec stops at the NaN before it
    sees anything else, so the report takes the json fallback."""
    return {"state": {"loss": math.nan}, **{k: v for k, v in doc.items() if k != "state"}}


@pytest.fixture
def fallbacks(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The reports that went through the json fallback (decoded by ``json``, then converted
    into the same schema by ``msgspec.convert``)."""
    calls: list[Any] = []
    real = msgspec.convert

    def spy(obj: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(obj)
        return real(obj, *args, **kwargs)

    monkeypatch.setattr(msgspec, "convert", spy)
    return calls


def _piece(doc: dict[str, Any], tensor: str = "raw", i: int = 0) -> dict[str, Any]:
    piece: dict[str, Any] = doc["tensors"][tensor]["pieces"][i]
    return piece


def _file(doc: dict[str, Any]) -> str:
    (name,) = doc["files"]
    return str(name)


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        target: Any = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return edit


def _shrink_file(doc: dict[str, Any]) -> None:
    doc["files"][_file(doc)] = _piece(doc, "raw", 1)["byte_offset"] + 10


def _list_other_file(doc: dict[str, Any]) -> None:
    _piece(doc)["file"] = "data/other.safetensors"


def _extra_checksum(doc: dict[str, Any]) -> None:
    _piece(doc)["checksums"] += "0" * 16


def _missing_checksum(doc: dict[str, Any]) -> None:
    _piece(doc)["checksums"] = _piece(doc)["checksums"][16:]


def _short_raw(doc: dict[str, Any]) -> None:
    _piece(doc)["byte_length"] -= 4


def _chunk_sizes_off(doc: dict[str, Any]) -> None:
    _piece(doc, "packed")["chunk_sizes"][0] += 1


def _chunk_sizes_missing(doc: dict[str, Any]) -> None:
    del _piece(doc, "packed")["chunk_sizes"]


def _chunk_sizes_one_short(doc: dict[str, Any]) -> None:
    piece = _piece(doc, "packed")
    sizes = piece["chunk_sizes"]
    piece["chunk_sizes"] = [sizes[0] + sizes[1], *sizes[2:]]


def _climbing_file_listed(doc: dict[str, Any]) -> None:
    doc["files"]["../x"] = 10_000
    _piece(doc)["file"] = "../x"


REJECTED: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "string-offset": (_set(("tensors", "raw", "pieces", 0, "offsets", 0), "0"), "offsets"),
    "float-length": (_set(("tensors", "raw", "pieces", 0, "lengths", 1), 4.0), "lengths"),
    "negative-byte-offset": (
        _set(("tensors", "raw", "pieces", 0, "byte_offset"), -1),
        "byte_offset",
    ),
    "string-byte-length": (
        _set(("tensors", "raw", "pieces", 0, "byte_length"), "64"),
        "byte_length",
    ),
    "checksums-not-string": (_set(("tensors", "raw", "pieces", 0, "checksums"), 12), "checksums"),
    "shape-negative": (_set(("tensors", "raw", "shape", 0), -8), "shape"),
    "rank-string": (_set(("rank",), "3"), "rank"),
    "rank-missing": (lambda doc: doc.pop("rank"), "rank"),
    "tensors-missing": (lambda doc: doc.pop("tensors"), "tensors"),
    "files-not-object": (_set(("files",), []), "files"),
    "file-size-negative": (lambda doc: doc["files"].update({_file(doc): -1}), ""),
    "file-not-listed": (_list_other_file, "does not list"),
    "file-climbs-out": (
        _set(("tensors", "raw", "pieces", 0, "file"), "../x"),
        "leave the checkpoint prefix",
    ),
    "file-absolute": (
        _set(("tensors", "raw", "pieces", 0, "file"), "/etc/passwd"),
        "leave the checkpoint prefix",
    ),
    "file-listed-climbs-out": (_climbing_file_listed, "leave the checkpoint prefix"),
    "bytes-past-file-end": (_shrink_file, "past the end"),
    "one-checksum-too-many": (_extra_checksum, "chunk checksums"),
    "one-checksum-missing": (_missing_checksum, "chunk checksums"),
    "raw-byte-length": (_short_raw, "stores 60 bytes for a piece of 64 bytes"),
    "zstd-sizes-sum": (_chunk_sizes_off, "chunk_sizes"),
    "zstd-sizes-missing": (_chunk_sizes_missing, "chunk_sizes"),
    "zstd-sizes-count": (_chunk_sizes_one_short, "chunk_sizes"),
    "unknown-dtype": (_set(("tensors", "raw", "dtype"), "float7"), "unknown dtype 'float7'"),
    "outside-shape": (
        _set(("tensors", "raw", "pieces", 1, "offsets"), [5, 0]),
        "outside the shape",
    ),
    "rank-of-box": (_set(("tensors", "raw", "pieces", 0, "offsets"), [0]), "differ in rank"),
}


@pytest.mark.parametrize("fallback", [False, True], ids=["msgspec", "json-fallback"])
@pytest.mark.parametrize("case", sorted(REJECTED))
def test_parse_report_rejects(case: str, fallback: bool, fallbacks: list[bytes]) -> None:
    """Each defect is a CorruptCheckpointError naming the report. With a NaN in the state
    the report takes the json fallback, which must refuse the same defects."""
    edit, words = REJECTED[case]
    doc = valid_report()
    if fallback:
        doc = with_nan_state(doc)
    ShardIndex.from_bytes(sealed(doc), WHERE, CHUNK)  # valid before the edit
    edit(doc)
    data = sealed(doc)
    with pytest.raises(CorruptCheckpointError) as info:
        ShardIndex.from_bytes(data, WHERE, CHUNK)
    assert not isinstance(info.value, UnsupportedFormatError)
    assert WHERE in str(info.value)
    assert words in str(info.value)
    assert len(fallbacks) == (2 if fallback else 0)


@pytest.mark.parametrize(
    "data", [b"{not json", b"", b"\xff\xfe", b"[1, 2]", b"null", b'{"rank": 3']
)
def test_parse_report_rejects_what_is_not_a_report(data: bytes) -> None:
    with pytest.raises(CorruptCheckpointError) as info:
        ShardIndex.from_bytes(data, WHERE, CHUNK)
    assert WHERE in str(info.value)


@pytest.mark.parametrize("fallback", [False, True], ids=["msgspec", "json-fallback"])
def test_parse_report_state_must_be_an_object(fallback: bool, fallbacks: list[bytes]) -> None:
    doc = valid_report()
    doc["state"] = [1, 2]
    if fallback:
        # a NaN ahead of everything (an unknown field: ignored once parsed) forces the fallback
        doc = {"note": math.nan, **doc}
    with pytest.raises(CorruptCheckpointError, match="state") as info:
        ShardIndex.from_bytes(sealed(doc), WHERE, CHUNK)
    assert WHERE in str(info.value)
    assert len(fallbacks) == (1 if fallback else 0)


@pytest.mark.parametrize("fallback", [False, True], ids=["msgspec", "json-fallback"])
def test_parse_report_unknown_codec_is_unsupported(fallback: bool) -> None:
    doc = valid_report()
    if fallback:
        doc = with_nan_state(doc)
    _piece(doc, "packed")["codec"] = "lz4"
    with pytest.raises(UnsupportedFormatError, match="unknown codec 'lz4'") as info:
        ShardIndex.from_bytes(sealed(doc), WHERE, CHUNK)
    assert WHERE in str(info.value)


@pytest.mark.parametrize(
    ("fallback", "value"),
    [
        pytest.param(False, True, id="msgspec-bool"),
        pytest.param(False, 3.0, id="msgspec-float"),
        pytest.param(True, True, id="json-fallback-bool"),
        pytest.param(True, 3.0, id="json-fallback-float"),
    ],
)
def test_parse_report_rank_must_be_an_integer(fallback: bool, value: Any) -> None:
    """``true`` is not rank 1, on either path."""
    doc = valid_report()
    if fallback:
        doc = with_nan_state(doc)
    doc["rank"] = value
    with pytest.raises(CorruptCheckpointError, match="rank"):
        ShardIndex.from_bytes(sealed(doc), WHERE, CHUNK)


@pytest.mark.parametrize("fallback", [False, True], ids=["msgspec", "json-fallback"])
def test_parse_report_file_size_must_be_an_integer(fallback: bool) -> None:
    """A file size of ``true`` is not one byte, on either path."""
    doc = valid_report()
    if fallback:
        doc = with_nan_state(doc)
    doc["files"]["data/tiny"] = True
    with pytest.raises(CorruptCheckpointError):
        ShardIndex.from_bytes(sealed(doc), WHERE, CHUNK)


def test_parse_report_paths_agree(fallbacks: list[bytes]) -> None:
    """The msgspec path and the json fallback read a valid report to the same values."""
    doc = valid_report()
    fast = ShardIndex.from_bytes(sealed(doc), WHERE, CHUNK)
    assert not fallbacks
    doc["state"] = {"step": 5, "loss": math.nan}
    slow = ShardIndex.from_bytes(sealed(doc), WHERE, CHUNK)
    assert len(fallbacks) == 1
    assert (fast.rank, fast.tensors, fast.files) == (slow.rank, slow.tensors, slow.files)
    assert slow.state is not None and math.isnan(slow.state["loss"])


def test_nan_in_state_survives_report_and_manifest() -> None:
    """``ShardIndex.to_bytes`` writes NaN (and infinities) in the state; the report still
    parses and the values reach the rendered manifest."""
    state = {"loss": math.nan, "best": math.inf, "worst": -math.inf, "step": 9}
    index = rank_index(0, {"w": ("float32", (4,), [Box((0,), (4,))])}, state=state)
    data = index.to_bytes()
    assert b"NaN" in data
    report = ShardIndex.from_bytes(data, WHERE, CHUNK)
    assert report.state is not None
    assert math.isnan(report.state["loss"]) and report.state["best"] == math.inf
    assert report.state["worst"] == -math.inf and report.state["step"] == 9
    assert report.tensors["w"].pieces[0] == index.tensors["w"].pieces[0]
    builder = ManifestBuilder(9)
    builder.add_report(data, WHERE, CHUNK)
    loaded = Manifest.from_bytes(
        builder.render(generation="g", world_size=1, chunk_bytes=CHUNK, created_unix=1.0), "m"
    )
    assert math.isnan(loaded.state["loss"]) and loaded.state["best"] == math.inf


def test_parse_report_refuses_chunk_sizes_on_a_raw_piece() -> None:
    """No writer lists chunk_sizes for a raw piece: a report that does is corrupt."""
    doc = valid_report()
    _piece(doc)["chunk_sizes"] = [1, 2]
    with pytest.raises(CorruptCheckpointError, match="raw piece lists chunk_sizes"):
        ShardIndex.from_bytes(sealed(doc), WHERE, CHUNK)


# --- property: row tilings over N ranks --------------------------------------------------------


@st.composite
def row_sharded_saves(draw: st.DrawFn) -> tuple[tuple[int, int], list[list[Box]]]:
    """A (rows, cols) tensor cut into row ranges (empty ones included), dealt to N ranks."""
    rows, cols = draw(st.integers(0, 30)), draw(st.integers(0, 4))
    inner = draw(st.lists(st.integers(0, rows), max_size=8))
    cuts = sorted([0, rows, *inner])
    boxes = row_boxes((rows, cols), cuts)
    world = draw(st.integers(1, 6))
    owners = draw(st.lists(st.integers(0, world - 1), min_size=len(boxes), max_size=len(boxes)))
    per_rank: list[list[Box]] = [[] for _ in range(world)]
    for box, owner in zip(boxes, owners):
        per_rank[owner].append(box)
    return (rows, cols), per_rank


@PROPERTY
@given(save=row_sharded_saves(), order=st.randoms(use_true_random=False), zstd=st.booleans())
def test_random_row_tilings_render_a_manifest_covering_every_element_once(
    save: tuple[tuple[int, int], list[list[Box]]], order: random.Random, zstd: bool
) -> None:
    shape, per_rank = save
    indexes = [
        rank_index(
            r,
            {"t": ("float32", shape, boxes), "c": ("int8", (), [Box((), ())] if r == 0 else [])},
            zstd=["t"] if zstd else [],
            state={"rank": r},
        )
        for r, boxes in enumerate(per_rank)
    ]
    order.shuffle(indexes)
    builder = ManifestBuilder(4)
    for index in indexes:
        builder.add_report(index.to_bytes(), f"rank {index.rank}", CHUNK)
    data = builder.render(
        generation="g", world_size=len(per_rank), chunk_bytes=CHUNK, created_unix=2.0
    )
    loaded = Manifest.from_bytes(data, "m")
    assert loaded == builder.build(
        generation="g", world_size=len(per_rank), chunk_bytes=CHUNK, created_unix=2.0
    )
    assert (coverage(shape, [p.box for p in loaded.tensors["t"].pieces]) == 1).all()
    assert sum(len(b) for b in per_rank) == len(loaded.tensors["t"].pieces)
    assert loaded.state == {"rank": 0}
    assert len(loaded.files) == len(per_rank)
