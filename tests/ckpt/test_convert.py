"""Offline conversion (issue 4, item 5): ``ckpt convert`` and ``ckpt.convert``.

* ``relayout`` to 1, 3 and 4 ranks along dims 0 and 1: the new checkpoint has the asked
  world size, one piece per rank holding exactly its ``torch.chunk`` slice, written in that
  rank's files, and loads back bit for bit into the original state (plain values too);
* ``export_safetensors``: one consolidated file, or shards + a Hugging Face
  ``model.safetensors.index.json`` (complete weight_map, right total_size), read back
  with ``safetensors.torch.load_file`` bit for bit; ``prefix`` selects and strips;
* ``export_torch``: a ``{name: tensor}`` file that ``torch.load(weights_only=True)`` reads;
* progress reports run from 0 to the total they announce;
* the ``ckpt convert`` command for every mode, and its errors: unknown ``--to``, missing
  ``--world-size``, a prefix that selects nothing, and a corrupt source (one flipped byte
  in a data file), which names the file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import ckpt
import ckpt.cli as cli
from ckpt.convert import export_safetensors, export_torch, relayout, split_box
from ckpt.format import element_size, read_manifest, scan_steps
from storage_backends import LocalBackend
from tests.support.checks import assert_bit_identical
from tests.support.cli import run_cli
from tests.support.on_disk import data_file, flip_byte, save_with

STEP = 12


def _value(seed: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype.is_complex:
        return torch.randn(shape, generator=gen, dtype=dtype)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    return torch.randint(-(2**40), 2**40, shape, generator=gen, dtype=dtype)


# name -> (shape, dtype): odd sizes, a dim of 2 (empty pieces on 3-4 ranks), 1-D (split on
# dim 0 even when dim 1 is asked), 3-D, 0-d, 0-size, and every kind of dtype.
SPECS: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
    "model.embed.weight": ((37, 16), torch.float32),
    "model.layers.0.w": ((13, 7), torch.bfloat16),
    "model.layers.0.b": ((13,), torch.float32),
    "model.layers.1.w": ((2, 11), torch.float16),
    "model.cube": ((5, 3, 4), torch.float64),
    "model.mask": ((9, 5), torch.bool),
    "model.freq": ((6, 3), torch.complex64),
    "optim.step": ((), torch.int64),
    "optim.ids": ((21, 3), torch.int64),
    "optim.empty": ((0, 4), torch.float32),
}


def _values() -> dict[str, torch.Tensor]:
    return {name: _value(i, shape, dtype) for i, (name, (shape, dtype)) in enumerate(SPECS.items())}


def _state(values: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``{"model": {...}, "optim": {...}, "meta": {...}}`` holding ``values`` under their names."""
    state: dict[str, Any] = {"model": {}, "optim": {}, "meta": {"epoch": 3, "lr": 0.5}}
    for name, tensor in values.items():
        top, rest = name.split(".", 1)
        state[top][rest] = tensor
    return state


def _flat(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {f"{top}.{k}": v for top in ("model", "optim") for k, v in state[top].items()}


def _blank(values: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A state of the same tensors holding other values (so a load has to fill all of them)."""
    return _state(
        {
            name: (~v if v.dtype == torch.bool else torch.full_like(v, 3))
            for name, v in values.items()
        }
    ) | {"meta": {}}


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A committed single-process checkpoint of every SPECS tensor, with 4 KiB chunks."""
    root = tmp_path_factory.mktemp("convert") / "src"
    save_with(_state(_values()), root, STEP, ckpt.SaveOptions(chunk_bytes=4096))
    return root


def _assert_loads_back(root: Path) -> None:
    values = _values()
    target = _blank(values)
    assert ckpt.load(target, root) == STEP
    assert target["meta"] == {"epoch": 3, "lr": 0.5}
    loaded = _flat(target)
    assert loaded.keys() == values.keys()
    for name, value in values.items():
        assert_bit_identical(loaded[name], value)


# --------------------------------------------------------------------------- relayout


@pytest.mark.parametrize("world_size", [1, 3, 4])
@pytest.mark.parametrize("dim", [0, 1])
def test_relayout_has_the_asked_layout_and_loads_back(
    source: Path, tmp_path: Path, world_size: int, dim: int
) -> None:
    """World size and pieces are as asked (rank r holds its torch.chunk slice, in its own
    files), the step and plain values survive, and the data loads back bit for bit."""
    dst = tmp_path / "dst"
    calls: list[tuple[int, int]] = []
    result = relayout(
        LocalBackend(source),
        LocalBackend(dst),
        world_size=world_size,
        dim=dim,
        progress=lambda done, total, what: calls.append((done, total)),
    )
    manifest = read_manifest(LocalBackend(dst), STEP)
    assert result.step == STEP and manifest.world_size == world_size
    assert result.tensors == len(SPECS)
    assert manifest.user_metadata["converted_from"].endswith(f"step {STEP}")
    for name, (shape, dtype) in SPECS.items():
        entry = manifest.tensors[name]
        assert entry.shape == shape and entry.dtype == str(dtype).removeprefix("torch.")
        got = {(p.box.offsets, p.box.lengths): p for p in entry.pieces}
        assert len(got) == len(entry.pieces)
        if not shape:
            assert list(got) == [((), ())]
            continue
        split = dim if dim < len(shape) else 0
        want = {r: split_box(shape, world_size, r, split) for r in range(world_size)}
        want = {r: b for r, b in want.items() if b.numel}
        assert set(got) == {(b.offsets, b.lengths) for b in want.values()}, name
        for r, box in want.items():
            piece = got[(box.offsets, box.lengths)]
            assert re.search(rf"-r{r:05d}-([0-9a-f]+-)?\d{{3}}\.safetensors$", piece.file), (
                name,
                r,
                piece.file,
            )
            assert piece.codec == "raw" and piece.byte_length == box.numel * element_size(
                entry.dtype
            )
    assert set(manifest.files) == set(result.files)
    _assert_loads_back(dst)
    # The progress bar moves forward and ends at the total it announced.
    dones = [d for d, _ in calls]
    assert dones == sorted(dones) and calls[-1][0] == calls[-1][1] == result.bytes


def test_relayout_of_a_relayout_loads_back(source: Path, tmp_path: Path) -> None:
    """4 ranks on dim 1, then 3 ranks on dim 0 (a reshard of a resharded checkpoint)."""
    relayout(LocalBackend(source), LocalBackend(tmp_path / "a"), world_size=4, dim=1)
    relayout(LocalBackend(tmp_path / "a"), LocalBackend(tmp_path / "b"), world_size=3, dim=0)
    assert read_manifest(LocalBackend(tmp_path / "b"), STEP).world_size == 3
    _assert_loads_back(tmp_path / "b")


def test_rng_states_load_after_a_relayout(tmp_path: Path) -> None:
    """The RNG rows are those of the ranks that trained, whatever world size a relayout
    gives the manifest: a load takes its row from the stored rows, not from it."""
    torch.manual_seed(11)
    ckpt.save({"rng": ckpt.RNGState()}, tmp_path / "src", step=1)
    expected = torch.rand(3)
    relayout(LocalBackend(tmp_path / "src"), LocalBackend(tmp_path / "dst"), world_size=2)
    assert read_manifest(LocalBackend(tmp_path / "dst"), 1).world_size == 2
    torch.manual_seed(0)
    ckpt.load({"rng": ckpt.RNGState()}, tmp_path / "dst")
    assert torch.equal(torch.rand(3), expected)


def test_relayout_refuses_zero_ranks(source: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="world_size"):
        relayout(LocalBackend(source), LocalBackend(tmp_path / "dst"), world_size=0)


# --------------------------------------------------------------------------- exports


def _exported(name: str, value: torch.Tensor) -> torch.Tensor:
    """What an export holds for ``value``: complex tensors as their real view (..., 2)."""
    return torch.view_as_real(value) if value.is_complex() else value


def test_export_safetensors_single_file(source: Path, tmp_path: Path) -> None:
    """One consolidated file; every tensor reads back bit for bit with safetensors."""
    out = tmp_path / "model.safetensors"
    result = export_safetensors(LocalBackend(source), out)
    assert result.files == [str(out)] and not (tmp_path / "model.safetensors.tmp").exists()
    loaded = load_file(str(out))
    values = _values()
    assert loaded.keys() == values.keys()
    for name, value in values.items():
        assert_bit_identical(loaded[name], _exported(name, value))
    assert result.bytes == sum(v.numel() * v.element_size() for v in values.values())


def test_export_safetensors_sharded_with_index(source: Path, tmp_path: Path) -> None:
    """--max-shard-size splits into several files + model.safetensors.index.json whose
    weight_map names every tensor's file and whose total_size is the tensor bytes."""
    out = tmp_path / "hf"
    limit = 1000
    result = export_safetensors(LocalBackend(source), out, max_shard_bytes=limit)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    values = _values()
    assert index["metadata"]["total_size"] == sum(
        v.numel() * v.element_size() for v in values.values()
    )
    assert index["weight_map"].keys() == values.keys()
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(shards):05d}\.safetensors", s) for s in shards)
    assert sorted(Path(f).name for f in result.files) == sorted(
        [*shards, "model.safetensors.index.json"]
    )
    seen: dict[str, torch.Tensor] = {}
    for shard in shards:
        part = load_file(str(out / shard))
        assert {n for n, f in index["weight_map"].items() if f == shard} == part.keys()
        nbytes = sum(t.numel() * t.element_size() for t in part.values())
        assert nbytes <= limit or len(part) == 1, (shard, nbytes)
        seen |= part
    for name, value in values.items():
        assert_bit_identical(seen[name], _exported(name, value))


def test_export_prefix_selects_and_strips(source: Path, tmp_path: Path) -> None:
    """prefix="model." keeps only model.* tensors, named without the prefix (HF style)."""
    export_safetensors(LocalBackend(source), tmp_path / "m.safetensors", prefix="model.")
    loaded = load_file(str(tmp_path / "m.safetensors"))
    values = _values()
    want = {n.removeprefix("model."): v for n, v in values.items() if n.startswith("model.")}
    assert loaded.keys() == want.keys() and "embed.weight" in loaded
    for name, value in want.items():
        assert_bit_identical(loaded[name], _exported(name, value))


def test_export_torch_reads_with_weights_only(source: Path, tmp_path: Path) -> None:
    """A plain {name: tensor} dict (complex kept complex) that torch.load(weights_only=True) reads."""
    out = tmp_path / "state.pt"
    calls: list[tuple[int, int]] = []
    result = export_torch(LocalBackend(source), out, progress=lambda d, t, w: calls.append((d, t)))
    loaded = torch.load(out, weights_only=True)
    values = _values()
    assert isinstance(loaded, dict) and loaded.keys() == values.keys()
    for name, value in values.items():
        assert_bit_identical(loaded[name], value)
    assert calls[-1] == (result.bytes, result.bytes)
    only_optim = torch.load(
        export_torch(LocalBackend(source), tmp_path / "o.pt", prefix="optim.").files[0],
        weights_only=True,
    )
    assert only_optim.keys() == {"step", "ids", "empty"}


def test_export_selecting_nothing_raises(source: Path, tmp_path: Path) -> None:
    for export in (export_safetensors, export_torch):
        with pytest.raises(
            ckpt.CheckpointError, match=re.escape("no tensor names start with 'nothing.'")
        ):
            export(LocalBackend(source), tmp_path / "x", prefix="nothing.")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- corrupt source


def _corrupt_copy(source: Path, tmp_path: Path) -> tuple[Path, str]:
    """A copy of ``source`` with one byte flipped inside the data of model.embed.weight."""
    import shutil

    root = tmp_path / "corrupt"
    shutil.copytree(source, root)
    manifest = read_manifest(LocalBackend(root), STEP)
    (piece,) = manifest.tensors["model.embed.weight"].pieces
    flip_byte(data_file(root, STEP, piece.file), piece.byte_offset + 5)
    return root, piece.file


def test_corrupt_source_raises_naming_the_file(source: Path, tmp_path: Path) -> None:
    """Every conversion checks the chunks it reads: a flipped byte gives ChecksumMismatchError
    naming the data file, and no export file (or temp file) is left behind as if complete."""
    root, file = _corrupt_copy(source, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    calls: list[Callable[[], object]] = [
        lambda: relayout(LocalBackend(root), LocalBackend(out / "ckpt"), world_size=2),
        lambda: export_safetensors(LocalBackend(root), out / "model.safetensors"),
        lambda: export_torch(LocalBackend(root), out / "state.pt"),
    ]
    for call in calls:
        with pytest.raises(ckpt.ChecksumMismatchError, match=re.escape(file)) as info:
            call()
        assert info.value.file == file and info.value.tensor == "model.embed.weight"
    leftovers = sorted(p.name for p in out.iterdir() if p.is_file())
    assert leftovers == [], leftovers
    assert scan_steps(LocalBackend(out / "ckpt")).committed == (), (
        "nothing committed from a corrupt source"
    )


# --------------------------------------------------------------------------- command line


def _invoke(*args: str) -> Any:
    return CliRunner().invoke(cli.app, ["convert", *args])


def test_cli_convert_every_mode(source: Path, tmp_path: Path) -> None:
    """`ckpt convert` re-lays out (--world-size/--dim), exports safetensors (single, sharded
    with --max-shard-size, --prefix) and torch; each output reads back bit for bit."""
    values = _values()
    res = _invoke(str(source), str(tmp_path / "k3"), "--world-size", "3", "--dim", "1")
    assert res.exit_code == 0, res.output
    assert f"step {STEP}: {len(SPECS)} tensors" in res.output
    assert read_manifest(LocalBackend(tmp_path / "k3"), STEP).world_size == 3
    _assert_loads_back(tmp_path / "k3")

    res = _invoke(str(source), str(tmp_path / "all.safetensors"), "--to", "safetensors")
    assert res.exit_code == 0, res.output
    loaded = load_file(str(tmp_path / "all.safetensors"))
    assert all(torch.equal(loaded[n], _exported(n, v)) for n, v in values.items())

    res = _invoke(
        str(source),
        str(tmp_path / "hf"),
        "--to",
        "safetensors",
        "--prefix",
        "model.",
        "--max-shard-size",
        "1KB",
    )
    assert res.exit_code == 0, res.output
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert index["weight_map"].keys() == {
        n.removeprefix("model.") for n in values if n.startswith("model.")
    }
    assert len(set(index["weight_map"].values())) > 1

    res = _invoke(str(source), str(tmp_path / "state.pt"), "--to", "torch", "--step", str(STEP))
    assert res.exit_code == 0, res.output
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    assert all(torch.equal(loaded[n], v) for n, v in values.items())


def test_cli_convert_usage_errors(source: Path, tmp_path: Path) -> None:
    """Unknown --to and a missing --world-size are usage errors (exit 2) that say what to do;
    a bad --max-shard-size too. Nothing is written."""
    res = _invoke(str(source), str(tmp_path / "x"), "--to", "onnx")
    assert res.exit_code == 2 and "--to must be ckpt, safetensors, torch or dcp" in res.output
    res = _invoke(str(source), str(tmp_path / "x"))
    assert res.exit_code == 2 and "--world-size" in res.output
    res = _invoke(
        str(source), str(tmp_path / "x"), "--to", "safetensors", "--max-shard-size", "lots"
    )
    assert res.exit_code == 2 and "cannot read the size" in res.output
    assert not (tmp_path / "x").exists()


def test_cli_convert_checkpoint_errors(
    monkeypatch: pytest.MonkeyPatch, source: Path, tmp_path: Path
) -> None:
    """Through the `ckpt` entry point: a prefix selecting nothing, and a corrupt source whose
    message names the data file, exit 2 and 1 (corrupt) with a one-line error (no traceback)."""
    code, text = run_cli(
        monkeypatch,
        "convert",
        str(source),
        str(tmp_path / "x.pt"),
        "--to",
        "torch",
        "--prefix",
        "nothing.",
    )
    assert code == 2 and "no tensor names start with 'nothing.'" in text
    root, file = _corrupt_copy(source, tmp_path)
    code, text = run_cli(
        monkeypatch, "convert", str(root), str(tmp_path / "y.safetensors"), "--to", "safetensors"
    )
    assert code == 1 and "error:" in text and "checksum mismatch" in text and file in text, text
    assert "Traceback" not in text
