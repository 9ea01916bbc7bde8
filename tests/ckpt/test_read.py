"""``ckpt.read`` (issue 11): a checkpoint's state tree without a template, on one process.

* every kind of plain value the tree encodes comes back as saved: tuples, bytes, dtypes,
  numpy arrays, dicts with keys that are not strings (or that look like markers), nested
  containers, big ints, None; tensors of every dtype kind, 0-d and empty;
* a model and its optimizer come back as their state dicts, which ``load_state_dict``
  accepts, and the tree saves again with ``ckpt.save`` and reads back the same;
* tied weights come back as one tensor under both names;
* a sharded save of 2 gloo ranks (DTensor Shard(0)/Shard(1)/Replicate, uneven, a
  ``ckpt.ShardedTensor``) reads on one process as the whole tensors;
* a compressed save reads the same; ``keys`` reads only some entries;
* step=None falls back over a corrupt newest step with a WARNING; a corrupt step asked
  for, an empty root, a missing root and a DCP root raise the library's errors;
* reading writes nothing: no file changes and a missing root is not created.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

import ckpt
from ckpt.format import read_manifest as stored_manifest
from storage_backends import LocalBackend
from tests.support.checks import assert_bit_identical
from tests.support.gloo import run_ranks
from tests.support.on_disk import data_file, flip_byte, read_manifest


def assert_same(actual: Any, expected: Any, path: str = "") -> None:
    """Equal trees: the same container and value types, tensors and arrays bit for bit."""
    assert type(actual) is type(expected), f"{path}: {type(actual)} vs {type(expected)}"
    if isinstance(expected, torch.Tensor):
        assert_bit_identical(actual, expected)
    elif isinstance(expected, np.ndarray):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, path
        assert actual.tobytes() == expected.tobytes(), path
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), f"{path}: {list(actual)} vs {list(expected)}"
        for k in expected:
            assert_same(actual[k], expected[k], f"{path}.{k}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), path
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{path}.{i}")
    else:
        assert actual == expected, f"{path}: {actual!r} vs {expected!r}"


def _values() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(3)
    return {
        "step": 5,
        "extra": {
            "t": (1, 2, ("nested", [3.5, None])),
            "b": b"\x00x\xff",
            "ba": bytearray(b"ab"),
            "dtypes": [torch.bfloat16, torch.float8_e4m3fn, torch.complex64],
            "array": np.arange(6, dtype=np.int16).reshape(2, 3),
            "int_keys": {1: "one", 2.5: "float", None: "none", False: "bool"},
            "marker_key": {"__tensor__": "not a tensor", "plain": 1},
            "big": 2**80,
            "flags": [True, False],
            "empty": {},
        },
        "tensors": {
            "bf16": torch.randn(3, 4, generator=gen).bfloat16(),
            "scalar": torch.tensor(2.5, dtype=torch.float64),
            "empty": torch.zeros(0, 3),
            "complex": torch.randn(2, 2, generator=gen, dtype=torch.complex64),
            "mask": torch.tensor([True, False, True]),
            "ints": torch.arange(-3, 3, dtype=torch.int64),
        },
        "lone": torch.ones(2, dtype=torch.float16),
    }


def _expected_values() -> dict[str, Any]:
    """What the tree of ``_values()`` reads back as: bytearray is stored as bytes."""
    expected = _values()
    expected["extra"]["ba"] = bytes(expected["extra"]["ba"])
    return expected


def test_every_kind_of_value_reads_back_as_saved(tmp_path: Path) -> None:
    ckpt.save(_values(), tmp_path, step=7)
    assert_same(ckpt.read(tmp_path), _expected_values())
    assert_same(ckpt.read(tmp_path, step=7, keys=["extra"]), {"extra": _expected_values()["extra"]})


class _Net(nn.Module):
    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.body = nn.Linear(6, 6)
        self.norm = nn.BatchNorm1d(6)  # a buffer, and an int64 counter
        self.head = nn.Linear(6, 11, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.norm(self.body(self.embed(x))))
        return out


def _trained(seed: int, tied: bool = False) -> tuple[_Net, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = _Net(tied)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        model(torch.randint(0, 11, (4,))).sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_model_and_optimizer_load_back_and_save_again(tmp_path: Path) -> None:
    model, opt = _trained(0)
    ckpt.save({"model": model, "optim": opt, "step": 5}, tmp_path / "a", step=5)
    tree = ckpt.read(tmp_path / "a")
    assert set(tree) == {"model", "optim", "step"} and tree["step"] == 5
    assert_same(tree["model"], dict(model.state_dict()))
    assert_same(tree["optim"], opt.state_dict())

    fresh, fresh_opt = _trained(1)
    fresh.load_state_dict(tree["model"])
    fresh_opt.load_state_dict(tree["optim"])
    assert_same(dict(fresh.state_dict()), dict(model.state_dict()))
    assert_same(fresh_opt.state_dict(), opt.state_dict())

    ckpt.save(tree, tmp_path / "b", step=5)
    assert_same(ckpt.read(tmp_path / "b"), tree)
    other, other_opt = _trained(2)
    assert ckpt.load({"model": other, "optim": other_opt, "step": 0}, tmp_path / "b") == 5
    assert_same(dict(other.state_dict()), dict(model.state_dict()))


def test_tied_weights_come_back_as_one_tensor(tmp_path: Path) -> None:
    model, _ = _trained(0, tied=True)
    ckpt.save({"model": model}, tmp_path, step=1)
    stored = stored_manifest(LocalBackend(tmp_path), 1)
    assert "model.head.weight" not in stored.tensors  # stored once
    weights = ckpt.read(tmp_path)["model"]
    assert weights["head.weight"] is weights["embed.weight"]
    assert_bit_identical(weights["head.weight"], model.embed.weight.detach())
    fresh, _ = _trained(1, tied=True)
    fresh.load_state_dict(weights)
    assert fresh.head.weight is fresh.embed.weight
    assert_same(dict(fresh.state_dict()), dict(model.state_dict()))


def test_compressed_save_reads_the_same(tmp_path: Path) -> None:
    options = ckpt.SaveOptions(compression=ckpt.Compression(min_bytes=0), chunk_bytes=4096)
    big = torch.arange(5000, dtype=torch.float32).reshape(50, 100)  # several chunks
    ckpt.save({**_values(), "big": big}, tmp_path, step=3, options=options)
    doc = read_manifest(tmp_path, 3)
    assert {p["codec"] for p in doc["tensors"]["big"]["pieces"]} == {"zstd"}
    assert_same(ckpt.read(tmp_path), {**_expected_values(), "big": big})


# -- a save of 2 gloo ranks, read on one process ------------------------------------------

SHARDED = {  # name -> (global shape, placement)
    "rows": ((7, 5), "S0"),  # uneven: 4 + 3 rows
    "cols": ((4, 9), "S1"),
    "copy": ((3, 3), "R"),
    "tiny": ((1, 4), "S0"),  # one rank holds an empty shard
}


def _global(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    return torch.randn(shape, generator=gen)


def _sharded_save(rank: int, world: int, root: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    placements = {"S0": Shard(0), "S1": Shard(1), "R": Replicate()}
    weights = {
        name: distribute_tensor(_global(name, shape), mesh, [placements[p]])
        for name, (shape, p) in SHARDED.items()
    }
    full = _global("megatron", (6, 4))
    rows = full.shape[0] // world
    state = {
        "weights": weights,
        "megatron": ckpt.ShardedTensor(
            full[rank * rows : (rank + 1) * rows].clone(), (6, 4), (rank * rows, 0)
        ),
        "step": 9,
    }
    ckpt.save(state, root, step=9, coordinator=ckpt.ProcessGroupCoordinator(dist.group.WORLD))


def test_a_sharded_save_of_two_ranks_reads_whole_on_one_process(tmp_path: Path) -> None:
    run_ranks(_sharded_save, 2, str(tmp_path))
    assert read_manifest(tmp_path, 9)["world_size"] == 2
    tree = ckpt.read(tmp_path)
    expected = {name: _global(name, shape) for name, (shape, _) in SHARDED.items()}
    assert_same(tree, {"weights": expected, "megatron": _global("megatron", (6, 4)), "step": 9})


# -- which step, and errors -----------------------------------------------------------------


def test_a_corrupt_newest_step_falls_back_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt.save({"w": torch.full((64,), 1.0), "step": 1}, tmp_path, step=1)
    ckpt.save({"w": torch.full((64,), 2.0), "step": 2}, tmp_path, step=2)
    (piece,) = read_manifest(tmp_path, 2)["tensors"]["w"]["pieces"]
    flip_byte(data_file(tmp_path, 2, piece["file"]), piece["byte_offset"] + 3)
    with caplog.at_level(logging.WARNING):
        tree = ckpt.read(tmp_path)
    assert tree["step"] == 1
    assert_bit_identical(tree["w"], torch.full((64,), 1.0))
    assert any("skipping checkpoint step 2" in r.getMessage() for r in caplog.records)
    with pytest.raises(ckpt.CorruptCheckpointError, match="checksum"):
        ckpt.read(tmp_path, step=2)


def test_not_found(tmp_path: Path) -> None:
    with pytest.raises(ckpt.CheckpointNotFoundError, match="no committed checkpoint"):
        ckpt.read(tmp_path)
    ckpt.save({"step": 1}, tmp_path, step=1)
    with pytest.raises(ckpt.CheckpointNotFoundError, match="step 4"):
        ckpt.read(tmp_path, step=4)
    with pytest.raises(ckpt.StateMismatchError, match=r"'model'.*step"):
        ckpt.read(tmp_path, keys=["model"])


def test_a_dcp_root_names_the_convert_command(tmp_path: Path) -> None:
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no process group: one process is all we need
        dcp.save({"w": torch.ones(4)}, checkpoint_id=str(tmp_path))
    with pytest.raises(ckpt.CheckpointNotFoundError, match=r"DCP.*ckpt convert"):
        ckpt.read(tmp_path)


def _snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            st = path.lstat()
            found[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns, st.st_mode)
    return found


def test_reading_writes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    ckpt.save(_values(), root, step=1)
    ckpt.save(_values(), root, step=2)
    before = _snapshot(root)
    ckpt.read(root)
    ckpt.read(root, step=1)
    assert _snapshot(root) == before
    missing = tmp_path / "missing" / "root"
    with pytest.raises(ckpt.CheckpointNotFoundError):
        ckpt.read(missing)
    with pytest.raises(ckpt.CheckpointNotFoundError):
        ckpt.read(f"file://{missing}", step=3)
    assert not (tmp_path / "missing").exists()
