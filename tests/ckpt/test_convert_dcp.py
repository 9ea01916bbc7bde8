"""``ckpt convert`` from and to torch.distributed.checkpoint (DCP), issue 11.

* import: a real ``dcp.save`` of an FSDP2 model, its Adam state and a step from 2 gloo
  ranks becomes, through ``ckpt convert --trust-pickled-values``, a ckpt checkpoint that
  ``ckpt.load`` puts bit for bit into a plain model and optimizer on one process, at the
  step the checkpoint holds; ``--world-size 2`` writes a 2-rank layout;
* without the flag, DCP's pickled values are never unpickled: they are named in the
  output and the result, the tensors are imported; with it, a value that
  ``torch.load(weights_only=True)`` refuses (one whose unpickling would run code) is left
  out and its code never runs;
* nested values, tuples, lists with tensors inside and small read batches come through;
* an import and a ``dcp.save`` through ``ckpt.dcp.Writer`` of the same state store the same
  tree (one rebuild of DCP's keys): ``{}`` inside a list, an optimizer that never stepped;
* export: ``ckpt convert SRC DST --to dcp`` writes what plain ``dcp.load`` reads bit for
  bit, on one process and into an FSDP2 (DTensor) layout on 2 gloo ranks;
* a manager or ``ckpt.load`` on a DCP root names a convert command, and that command works;
* an empty, missing or non-DCP source, a DCP save that never finished and unreadable DCP
  metadata are refused with one clear line; a missing source is not created.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import nn

import ckpt
from ckpt.cli import EXIT_CORRUPT, EXIT_NOT_FOUND, EXIT_USAGE
from ckpt.dcp import Writer, export_dcp, import_dcp
from ckpt.format import read_manifest
from storage_backends import LocalBackend
from tests.support.checks import assert_all_bit_identical
from tests.support.cli import run_cli
from tests.support.gloo import run_ranks


def _mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 5))  # 5 rows: uneven


def _train(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(seed))
    for _ in range(2):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()


def _plain(seed: int) -> tuple[nn.Sequential, torch.optim.Adam]:
    model = _mlp(seed)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    _train(model, opt, seed)
    return model, opt


def _full(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every tensor of a model and its optimizer, whole, by name (DTensors gathered)."""
    from torch.distributed.tensor import DTensor

    def whole(t: torch.Tensor) -> torch.Tensor:
        return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()

    out = {f"model.{k}": whole(v) for k, v in model.state_dict().items()}
    for index, per_param in opt.state_dict()["state"].items():
        out.update({f"optim.{index}.{k}": whole(v) for k, v in per_param.items()})
    return out


def _fsdp(mesh: Any, seed: int) -> tuple[nn.Module, torch.optim.Adam]:
    from torch.distributed.fsdp import fully_shard

    model = _mlp(seed)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    _train(model, opt, seed)
    return model, opt


def _ranks(rank: int, world: int, out: str, export_dir: str, exported: str) -> dict[str, Any]:
    """Save with DCP from FSDP2 ranks; load the ckpt export into the same layout with DCP."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    model, opt = _fsdp(mesh, seed=0)
    dcp.save({"model": model.state_dict(), "optim": opt.state_dict(), "step": 7}, checkpoint_id=out)
    full = _full(model, opt)  # collective: every rank gathers
    if rank == 0:
        save_file(full, f"{out}-expected.safetensors")

    other, other_opt = _fsdp(mesh, seed=1)
    state: dict[str, Any] = {
        "model": other.state_dict(),
        "optim": other_opt.state_dict(),
        "step": 0,
    }
    dcp.load(state, checkpoint_id=export_dir)
    other.load_state_dict(state["model"])
    other_opt.load_state_dict(state["optim"])
    got = _full(other, other_opt)
    expected = load_file(exported)
    differ = sorted(k for k in expected if not torch.equal(got[k], expected[k]))
    return {"step": state["step"], "differ": differ, "names": sorted(got) == sorted(expected)}


@pytest.fixture(scope="module")
def gloo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One 2-rank run: its DCP checkpoint, and its load of a ckpt checkpoint's DCP export."""
    root = tmp_path_factory.mktemp("dcp")
    model, opt = _plain(5)
    ckpt.save({"model": model, "optim": opt, "step": 5}, root / "ckpt-src", step=5)
    export_dcp(LocalBackend(root / "ckpt-src"), root / "exported")
    save_file(_full(model, opt), root / "exported.safetensors")
    results = run_ranks(
        _ranks, 2, str(root / "saved"), str(root / "exported"), str(root / "exported.safetensors")
    )
    return {
        "root": root,
        "dcp": root / "saved",
        "expected": load_file(root / "saved-expected.safetensors"),
        "results": results,
    }


def test_a_dcp_save_of_two_fsdp_ranks_imports_and_loads_bit_exact(
    gloo: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dst = tmp_path / "imported"
    code, out = run_cli(
        monkeypatch, "convert", str(gloo["dcp"]), str(dst), "--trust-pickled-values"
    )
    assert code == 0, out
    assert "step 7:" in out and "not imported" not in out
    model, opt = _plain(9)  # other values, same shapes
    state: dict[str, Any] = {"model": model, "optim": opt, "step": 0}
    assert ckpt.load(state, dst) == 7
    assert state["step"] == 7
    assert_all_bit_identical(_full(model, opt), gloo["expected"])
    assert opt.param_groups[0]["lr"] == 0.05 and opt.param_groups[0]["betas"] == (0.9, 0.999)

    code, out = run_cli(
        monkeypatch,
        "convert",
        str(gloo["dcp"]),
        str(tmp_path / "two"),
        "--trust-pickled-values",
        "--world-size",
        "2",
        "--step",
        "70",
    )
    assert code == 0, out
    manifest = read_manifest(LocalBackend(tmp_path / "two"), 70)
    assert manifest.world_size == 2
    assert len(manifest.tensors["model.0.weight"].pieces) == 2
    model, opt = _plain(9)
    assert ckpt.load({"model": model, "optim": opt, "step": 0}, tmp_path / "two") == 70
    assert_all_bit_identical(_full(model, opt), gloo["expected"])


def test_pickled_values_are_left_out_unless_trusted(
    gloo: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out = run_cli(monkeypatch, "convert", str(gloo["dcp"]), str(tmp_path / "a"))
    assert code == 0, out
    assert "step 0:" in out  # the step is one of the pickled values
    assert re.search(r"13 non-tensor values of the DCP checkpoint were not imported", out), out
    assert "optim.param_groups.0.lr" in out and "--trust-pickled-values" in out
    tree = ckpt.read(tmp_path / "a")
    assert set(tree) == {"model", "optim"} and set(tree["optim"]) == {"state"}
    model = _mlp(9)
    model.load_state_dict(tree["model"])
    assert_all_bit_identical(
        {f"model.{k}": v for k, v in model.state_dict().items()},
        {k: v for k, v in gloo["expected"].items() if k.startswith("model.")},
    )
    optim_state = {
        f"optim.{i}.{k}": v for i, per in tree["optim"]["state"].items() for k, v in per.items()
    }
    assert_all_bit_identical(
        optim_state, {k: v for k, v in gloo["expected"].items() if k.startswith("optim.")}
    )


class _RunsCode:
    """A value whose unpickling would create a file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def _dcp_save(state: dict[str, Any], directory: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no process group: one process is all we need
        dcp.save(state, checkpoint_id=str(directory))


def test_values_nested_lists_and_small_batches(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    marker = tmp_path / "code-ran"
    ones = torch.ones(3, 2)
    state: dict[str, Any] = {
        "weights": {f"w{i}": torch.full((5, 4), float(i)) for i in range(4)},
        "extra": {
            "t": (1, "two", 3.0),
            "items": [10, {"inner": torch.arange(6)}, "s"],
            "empty": torch.zeros(0, 3),
            "scalar": torch.tensor(4, dtype=torch.int16),
            "half": ones.bfloat16(),
        },
        "global_step": 12,
        "evil": _RunsCode(str(marker)),
    }
    _dcp_save(state, tmp_path / "src")
    with caplog.at_level(logging.WARNING):
        result = import_dcp(
            tmp_path / "src",
            LocalBackend(tmp_path / "dst"),
            trust_pickled_values=True,
            batch_bytes=100,  # one tensor per batch
        )
    assert not marker.exists()
    assert [name for name, _ in result.skipped] == ["evil"]
    assert "weights_only" in result.skipped[0][1]
    assert "evil" in caplog.text
    assert result.step == 12 and result.tensors == 8
    tree = ckpt.read(tmp_path / "dst")
    expected = dict(state)
    del expected["evil"]
    assert list(tree) == ["weights", "extra", "global_step"]
    assert tree["extra"]["t"] == (1, "two", 3.0)
    assert tree["extra"]["items"][0] == 10 and tree["extra"]["items"][2] == "s"
    flat = {
        **{f"weights.{k}": v for k, v in tree["weights"].items()},
        "inner": tree["extra"]["items"][1]["inner"],
        "empty": tree["extra"]["empty"],
        "scalar": tree["extra"]["scalar"],
        "half": tree["extra"]["half"],
    }
    assert_all_bit_identical(
        flat,
        {
            **{f"weights.{k}": v for k, v in state["weights"].items()},
            "inner": torch.arange(6),
            "empty": torch.zeros(0, 3),
            "scalar": torch.tensor(4, dtype=torch.int16),
            "half": ones.bfloat16(),
        },
    )

    plain = import_dcp(tmp_path / "src", LocalBackend(tmp_path / "plain"), step=3)
    assert plain.values == () and len(plain.skipped) == 5
    items = ckpt.read(tmp_path / "plain")["extra"]["items"]
    assert len(items) == 3 and items[0] is None and items[2] is None  # left out: None
    assert torch.equal(items[1]["inner"], torch.arange(6))


def test_import_and_writer_store_the_same_tree(tmp_path: Path) -> None:
    model = _mlp(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)  # never stepped
    state: dict[str, Any] = {
        "model": model.state_dict(),
        "optim": opt.state_dict(),
        "extra": {"items": [1, {}, {"t": torch.arange(3)}], "pair": (2, "x"), "none": None},
        "step": 4,
    }
    _dcp_save(state, tmp_path / "src")
    assert import_dcp(tmp_path / "src", tmp_path / "imported", trust_pickled_values=True).step == 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=Writer(tmp_path / "written", step=4))
    imported = read_manifest(LocalBackend(tmp_path / "imported"), 4)
    assert imported.state == read_manifest(LocalBackend(tmp_path / "written"), 4).state
    tree = ckpt.read(tmp_path / "imported")
    assert tree["extra"]["items"][:2] == [1, {}]  # DCP saved nothing for the {}: it is back
    assert tree["optim"]["state"] == {}  # nor for the empty state: back too
    other = torch.optim.SGD(_mlp(3).parameters(), lr=0.1)
    other.load_state_dict(tree["optim"])
    assert other.param_groups[0]["lr"] == 0.5 and other.param_groups[0]["momentum"] == 0.9


def test_export_reads_back_with_plain_dcp_load(
    gloo: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = gloo["root"] / "ckpt-src"
    code, out = run_cli(monkeypatch, "convert", str(source), str(tmp_path / "out"), "--to", "dcp")
    assert code == 0, out
    assert (tmp_path / "out" / ".metadata").is_file()
    model, opt = _plain(9)
    state: dict[str, Any] = {"model": model.state_dict(), "optim": opt.state_dict(), "step": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(tmp_path / "out"))
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optim"])
    assert state["step"] == 5
    original, original_opt = _plain(5)
    assert_all_bit_identical(_full(model, opt), _full(original, original_opt))
    # The same export loaded by 2 FSDP2 ranks into their DTensor shards.
    assert [r["step"] for r in gloo["results"]] == [5, 5]
    assert all(r["names"] and r["differ"] == [] for r in gloo["results"]), gloo["results"]

    code, out = run_cli(monkeypatch, "convert", str(source), str(tmp_path / "out"), "--to", "dcp")
    assert code == 2 and "is not empty" in out


def test_the_command_a_dcp_root_names_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, opt = _plain(3)
    _dcp_save({"model": model.state_dict(), "optim": opt.state_dict(), "step": 4}, tmp_path / "run")
    with pytest.raises(ckpt.CheckpointNotFoundError) as refused:
        ckpt.load({"model": _mlp(1)}, tmp_path / "run")
    match = re.search(r"`ckpt convert (\S+) DST` \(add (--[a-z-]+)", str(refused.value))
    assert match, refused.value
    with (
        ckpt.CheckpointManager(tmp_path / "run", manual=True, save_on_sigterm=False) as mgr,
        pytest.raises(ckpt.CheckpointNotFoundError, match="ckpt convert"),
    ):
        mgr.restore({"model": _mlp(1)})
    code, out = run_cli(monkeypatch, "convert", match[1], str(tmp_path / "new"), match[2])
    assert code == 0, out
    other, other_opt = _plain(1)
    with ckpt.CheckpointManager(tmp_path / "new", manual=True, save_on_sigterm=False) as mgr:
        assert mgr.restore({"model": other, "optim": other_opt, "step": 0}) == 4
    assert_all_bit_identical(_full(other, other_opt), _full(model, opt))


def test_refusals_are_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(src: Path, *extra: str) -> str:
        code, out = run_cli(monkeypatch, "convert", str(src), str(tmp_path / "dst"), *extra)
        assert code in (EXIT_USAGE, EXIT_NOT_FOUND, EXIT_CORRUPT), out
        line = out.strip()  # the progress bar leaves an empty line behind
        assert line.startswith("ckpt: error: ") and "\n" not in line, out
        return line

    (tmp_path / "empty").mkdir()
    assert "nothing to convert" in refused(tmp_path / "empty")
    assert "no such checkpoint root" in refused(tmp_path / "missing")
    assert not (tmp_path / "missing").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model.pt").write_bytes(b"not a checkpoint")
    assert "nothing to convert" in refused(tmp_path / "other")

    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "__0_0.distcp").write_bytes(b"data")
    assert "never finished" in refused(tmp_path / "unfinished")
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / ".metadata").write_bytes(b"\x00 not metadata")
    assert "cannot read it" in refused(tmp_path / "garbage")
    assert not (tmp_path / "dst").exists()
