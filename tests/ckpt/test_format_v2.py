"""Format v2: compact layouts in the manifest, pieces in per-writer index files that a
restore reads only where it needs them; format v1 stays readable."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt
from ckpt.convert import relayout
from ckpt.format import (
    Box,
    Layout,
    infer_layout,
    load_pieces,
    read_manifest,
    seal_digest,
    seal_manifest,
    writers_needed,
)
from storage_backends import LocalBackend
from tests.support.gloo import run_ranks
from tests.support.on_disk import flip_byte, manifest_path, save_with, step_dir, write_manifest


def _cells(shape: tuple[int, ...], layout: Layout) -> list[tuple[Any, ...]]:
    return sorted(layout.cells(shape))


# -- layouts --------------------------------------------------------------------------


def test_an_even_shard_on_dim_0_is_one_run_of_sizes_and_one_of_writers() -> None:
    shape = (4096, 16)
    cells = [((256 * r, 0), (256, 16), r) for r in range(16)]
    layout = infer_layout(shape, cells)
    assert layout.grid == ((0, ((256, 16),)),)
    assert layout.writers == ((0, 1, 16),)
    layout.check(shape, 16, "t")
    assert _cells(shape, layout) == sorted(cells)
    assert layout.writers_overlapping(shape, Box((300, 0), (400, 16))) == {1, 2}
    assert layout.holds(1, Box((256, 0), (10, 16)))
    assert not layout.holds(2, Box((256, 0), (10, 16)))
    assert not layout.holds(1, Box((500, 0), (20, 16)))  # crosses into rank 2's cell
    # What a rank holding rows 256..767 writes of them (the planner's part, from the layout)
    assert layout.region_of(shape, 1, Box((256, 0), (512, 16))) == Box((256, 0), (256, 16))
    assert layout.region_of(shape, 3, Box((256, 0), (512, 16))) is None  # holds none there
    assert layout.region_of(shape, 1, Box((300, 0), (100, 16))) is None  # reaches outside
    assert layout.lowest_writer == 0


def test_a_short_last_shard_and_empty_ranks_stay_compact() -> None:
    # torch.chunk of 10 rows over 4 ranks: 3, 3, 3, 1; of 2 rows over 4: ranks 2, 3 empty
    layout = infer_layout(
        (10,), [((0,), (3,), 0), ((3,), (3,), 1), ((6,), (3,), 2), ((9,), (1,), 3)]
    )
    assert layout.grid == ((0, ((3, 3), (1, 1))),)
    layout.check((10,), 4, "t")
    small = infer_layout((2,), [((0,), (1,), 0), ((1,), (1,), 1), ((2,), (0,), 2)])
    assert small.writers == ((0, 1, 2),)
    small.check((2,), 4, "t")


def test_a_2d_grid_with_strided_writers() -> None:
    shape = (8, 6)
    # 2 x 3 cells; cell (i, j) held by rank 2 * j + i (column-major ranks)
    cells = [((4 * i, 2 * j), (4, 2), 2 * j + i) for i in range(2) for j in range(3)]
    layout = infer_layout(shape, cells)
    assert layout.grid == ((0, ((4, 2),)), (1, ((2, 3),)))
    layout.check(shape, 6, "t")
    assert _cells(shape, layout) == sorted(cells)
    assert layout.writers == ((0, 2, 3), (1, 2, 3))
    assert layout.writers_overlapping(shape, Box((3, 1), (2, 2))) == {0, 2, 1, 3}
    assert layout.region_of(shape, 3, Box((0, 0), shape)) == Box((4, 2), (4, 2))
    assert infer_layout(shape, [(o, n, w + 5) for o, n, w in cells]).lowest_writer == 5


def test_whole_tensors_scalars_and_empty_tensors() -> None:
    assert infer_layout((5, 5), [((0, 0), (5, 5), 3)]) == Layout(grid=(), writers=((3, 0, 1),))
    scalar = infer_layout((), [((), (), 1)])
    scalar.check((), 2, "t")
    assert scalar.writers_overlapping((), Box((), ())) == {1}
    assert scalar.region_of((), 1, Box((), ())) == Box((), ())
    assert scalar.region_of((), 0, Box((), ())) is None
    empty = infer_layout((0, 4), [])
    empty.check((0, 4), 2, "t")
    assert list(empty.cells((0, 4))) == []
    assert empty.lowest_writer is None
    assert empty.region_of((0, 4), 0, Box((0, 0), (0, 4))) is None


def test_what_is_not_a_grid_is_listed_by_regions() -> None:
    shape = (10, 4)
    cells = [((0, 0), (6, 4), 0), ((6, 0), (4, 2), 1), ((6, 2), (4, 2), 2)]
    layout = infer_layout(shape, cells)
    assert layout.grid is None and layout.regions is not None
    layout.check(shape, 3, "t")
    assert layout.writers_overlapping(shape, Box((5, 3), (2, 1))) == {0, 2}
    assert layout.region_of(shape, 2, Box((6, 0), (4, 4))) == Box((6, 2), (4, 2))
    assert layout.region_of(shape, 0, Box((0, 0), (10, 4))) == Box((0, 0), (6, 4))
    assert layout.lowest_writer == 0


@pytest.mark.parametrize(
    "layout, message",
    [
        (Layout(grid=((0, ((3, 3),)),), writers=((0, 1, 3),)), "do not add up"),
        (Layout(grid=((0, ((5, 2),)),), writers=((0, 1, 3),)), "names 3 writers for 2"),
        (Layout(grid=((0, ((5, 2),)),), writers=((3, 1, 2),)), "invalid"),
        (Layout(regions=(((0,), (6,), 0), ((5,), (5,), 1))), "do not tile"),
        (Layout(grid=(), regions=(((0,), (10,), 0),)), "exactly one of"),
    ],
)
def test_a_layout_that_does_not_tile_is_corrupt(layout: Layout, message: str) -> None:
    with pytest.raises(ckpt.CorruptCheckpointError, match=message):
        layout.check((10,), 4, "t")


# -- on disk ------------------------------------------------------------------------


def _state() -> dict[str, Any]:
    torch.manual_seed(0)
    return {"w": torch.randn(64, 8), "b": torch.randn(8), "next_step": 3}


def _blank() -> dict[str, Any]:
    return {"w": torch.zeros(64, 8), "b": torch.zeros(8), "next_step": 0}


def _two_writers(root: Path, step: int, state: dict[str, Any] | None = None) -> None:
    """``state`` saved as ``step`` the way 2 ranks would have saved it (rows split in two):
    ``w`` and ``b`` each have a grid layout of 2 writers, their pieces in index files."""
    src = root.parent / f"{root.name}-src-{step}"
    save_with(state or _state(), src, step)
    relayout(LocalBackend(src), LocalBackend(root), world_size=2)


def _index_of(root: Path, step: int, rank: int) -> Path:
    doc = json.loads(manifest_path(root, step).read_bytes())
    index: str = doc["writers"][rank]["index"]
    return step_dir(root, step) / index


def test_a_save_writes_v2_and_v1_on_request(tmp_path: Path) -> None:
    save_with(_state(), tmp_path / "v2", 1)
    save_with(_state(), tmp_path / "v1", 1, ckpt.SaveOptions(format_version=1))
    v2 = json.loads(manifest_path(tmp_path / "v2", 1).read_bytes())
    v1 = json.loads(manifest_path(tmp_path / "v1", 1).read_bytes())
    assert v2["format_version"] == 2 and v1["format_version"] == 1
    assert [w["rank"] for w in v2["writers"]] == [0]
    # One writer stores every tensor whole: its pieces are listed in the manifest too.
    assert v2["tensors"]["w"]["layout"] == {"grid": [], "writers": [[0, 0, 1]]}
    assert v2["tensors"]["w"]["pieces"]
    _two_writers(tmp_path / "two", 1)
    two = json.loads(manifest_path(tmp_path / "two", 1).read_bytes())
    assert [w["rank"] for w in two["writers"]] == [0, 1]
    assert two["tensors"]["w"]["pieces"] == []
    assert two["tensors"]["w"]["layout"] == {"grid": [[0, [[32, 2]]]], "writers": [[0, 1, 2]]}
    assert "writers" not in v1 and v1["tensors"]["w"]["pieces"]
    for root in ("v1", "v2", "two"):
        state = _blank()
        ckpt.load(state, tmp_path / root)
        assert torch.equal(state["w"], _state()["w"])
        assert state["next_step"] == 3
        full = read_manifest(LocalBackend(tmp_path / root), 1)
        assert full.tensors["w"].pieces and full.format_version == (1 if root == "v1" else 2)


def test_a_corrupt_or_missing_index_file_is_a_corrupt_step(tmp_path: Path) -> None:
    root = tmp_path / "ckpts"
    save_with(_state(), root, 1)
    _two_writers(root, 2)
    index = _index_of(root, 2, 1)
    flip_byte(index, 40)
    state = _blank()
    report = ckpt.restore(state, root)
    assert report.step == 1 and [s for s, _ in report.skipped] == [2]
    assert "index file" in report.skipped[0][1] or "checksum" in report.skipped[0][1]
    with pytest.raises(ckpt.CorruptCheckpointError):
        ckpt.load(state, root, step=2)
    index.unlink()
    with pytest.raises(ckpt.CorruptCheckpointError):
        ckpt.load(state, root, step=2)


def test_a_layout_that_gives_a_piece_to_another_writer_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "ckpts"
    _two_writers(root, 1)
    doc = json.loads(manifest_path(root, 1).read_bytes())
    doc["tensors"]["w"]["layout"]["writers"] = [[1, -1, 2]]  # rows 0-31 to rank 1, 32-63 to 0
    write_manifest(root, 1, doc)
    state = _blank()
    with pytest.raises(ckpt.CorruptCheckpointError, match="outside what the layout gives"):
        ckpt.load(state, root, step=1)


@pytest.mark.parametrize(
    "plan", [{"key": "XYZ", "imbalance": 1.0}, {"key": "0" * 32, "imbalance": 0.5}, [1, 2]]
)
def test_a_malformed_plan_record_is_corrupt(tmp_path: Path, plan: Any) -> None:
    root = tmp_path / "ckpts"
    save_with(_state(), root, 1)
    save_with(_state(), root, 2)
    doc = json.loads(manifest_path(root, 2).read_bytes())
    assert set(doc["plan"]) == {"key", "imbalance"}  # recorded by every v2 save
    doc["plan"] = plan
    write_manifest(root, 2, doc)
    state = _blank()
    report = ckpt.restore(state, root)
    assert report.step == 1 and [s for s, _ in report.skipped] == [2]
    assert "plan" in report.skipped[0][1]


# -- restoring ranks read only the index files they need --------------------------


def _save_and_count(rank: int, world: int, root: str, new_world: int) -> dict[str, Any]:
    import torch.distributed as dist

    from ckpt.coordination import ProcessGroupCoordinator

    rows = 8 * world
    full = torch.arange(rows * 4, dtype=torch.float32).reshape(rows, 4)
    mine = ckpt.ShardedTensor(full[8 * rank : 8 * rank + 8].clone(), (rows, 4), (8 * rank, 0))
    ckpt.save({"t": mine}, root, step=1, coordinator=ProcessGroupCoordinator())
    dist.barrier()
    backend = LocalBackend(root)
    head = read_manifest(backend, 1, pieces=False)
    # The region this rank would hold on ``new_world`` ranks (torch.chunk sizes).
    per = -(-rows // new_world)
    region = Box((min(rows, per * rank), 0), (max(0, min(per, rows - per * rank)), 4))
    needed = sorted(w.rank for w in writers_needed(head, {"t": [region]}))
    loaded = load_pieces(backend, head, {"t": [region]})
    layout = head.tensors["t"].layout
    assert layout is not None
    return {
        "version": head.format_version,
        "layout": [list(map(list, g[1])) for g in layout.grid or ()],
        "needed": needed,
        "pieces": len(loaded.tensors["t"].pieces),
    }


def test_a_restoring_rank_reads_only_the_writers_it_overlaps(tmp_path: Path) -> None:
    same = run_ranks(_save_and_count, 4, str(tmp_path / "a"), 4)
    assert [r["needed"] for r in same] == [[0], [1], [2], [3]]
    assert all(r["version"] == 2 and r["layout"] == [[[8, 4]]] for r in same)
    assert [r["pieces"] for r in same] == [1, 1, 1, 1]
    halved = run_ranks(_save_and_count, 4, str(tmp_path / "b"), 2)
    assert [r["needed"] for r in halved] == [[0, 1], [2, 3], [], []]


# -- hostile index files -----------------------------------------------------------


def _rewrite_index(root: Path, step: int, edit: Any) -> None:
    """Edit rank 1's index file, re-seal it and re-pin it in a re-sealed manifest: what is
    tested is the validation behind the seals."""
    doc = json.loads(manifest_path(root, step).read_bytes())
    writer = doc["writers"][1]
    path = step_dir(root, step) / writer["index"]
    body = json.loads(path.read_bytes())
    body.pop("manifest_checksum")
    edit(body)
    data = seal_manifest(json.dumps(body).encode())
    path.chmod(0o644)
    path.write_bytes(data)
    writer.update(bytes=len(data), checksum=seal_digest(data))
    doc["files"][writer["index"]] = len(data)
    write_manifest(root, step, doc)


def _first_piece(body: dict[str, Any]) -> dict[str, Any]:
    piece: dict[str, Any] = body["tensors"]["w"]["pieces"][0]
    return piece


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda b: _first_piece(b).update(file="../../etc/passwd"), "leave the checkpoint prefix"),
        (lambda b: _first_piece(b).update(offsets=[60, 0]), "outside the shape"),
        (lambda b: _first_piece(b).update(offsets=[0, 0]), "outside what the layout gives"),
        (lambda b: _first_piece(b).update(byte_offset=1 << 40), "past the end"),
        (lambda b: b["files"].update({"data/extra.safetensors": 10}), "does not list"),
        (lambda b: b.update(rank=0), "not the index file of writer 1"),
        (lambda b: b["tensors"]["w"].update(shape=[64, 9]), "differs from the manifest"),
    ],
    ids=[
        "path-escape",
        "outside-shape",
        "other-writers-rows",
        "past-end",
        "unlisted-file",
        "wrong-rank",
        "shape",
    ],
)
def test_a_hostile_index_file_is_corrupt_and_restore_falls_back(
    tmp_path: Path, edit: Any, message: str
) -> None:
    root = tmp_path / "ckpts"
    save_with(_state(), root, 1)
    _two_writers(root, 2)
    _rewrite_index(root, 2, edit)
    state = _blank()
    with pytest.raises(ckpt.CorruptCheckpointError, match=message):
        ckpt.load(state, root, step=2)
    assert ckpt.restore(state, root).step == 1
    assert torch.equal(state["w"], _state()["w"])


def test_an_index_file_swapped_for_another_sealed_one_is_caught_by_its_pin(tmp_path: Path) -> None:
    root = tmp_path / "ckpts"
    _two_writers(root, 1)
    _two_writers(tmp_path / "other", 1, dict(_state(), w=torch.ones(64, 8)))
    target = _index_of(root, 1, 1)
    target.chmod(0o644)
    target.write_bytes(_index_of(tmp_path / "other", 1, 1).read_bytes())
    state = _blank()
    with pytest.raises(ckpt.CorruptCheckpointError, match="not the one the manifest pins"):
        ckpt.load(state, root, step=1)
