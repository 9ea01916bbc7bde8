"""Pipeline parallelism: ranks of different stages hold different parts of the state.

4 gloo ranks on a (pp=2, dp=2) mesh, laid out as torchtitan splits a model: each stage
keeps the whole model's parameter names for its own layers (stage 0: the embedding and
layers 0-1, stage 1: layers 2-3 and the head), FSDP2 over its data-parallel pair, Adam
with a learning rate of its own, and plain values only its stage has. The checkpoint
stores the union of the stages' trees, so that:
- each stage restores its own model, optimizer moments and settings, strictly, without
  reading or allocating the other stage's;
- 2 ranks (one per stage, no data parallelism) restore it strictly;
- one process holding the whole model (one optimizer group per former stage) restores
  every stage's parameters, moments and learning rate;
- ``ckpt convert`` to another world size keeps what the stages held in part.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

import ckpt
from ckpt.convert import relayout
from ckpt.format import read_manifest
from storage_backends import LocalBackend
from tests.distributed.sharded import (
    full_values,
    load_expected,
    mismatches,
    named_tensors,
    save_expected,
)
from tests.support.gloo import run_ranks

TIMEOUT_S = 120.0
STEP = 3
LR = {0: 0.01, 1: 0.02}
STAGE_LAYERS = {0: ("embed", "0", "1"), 1: ("2", "3", "head")}


class Net(nn.Module):
    """The whole model; a stage deletes what it does not run (torchtitan's split)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed: nn.Module | None = nn.Linear(4, 8)
        self.layers = nn.ModuleDict({str(i): nn.Linear(8, 8) for i in range(4)})
        self.head: nn.Module | None = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            x = self.embed(x)
        for layer in self.layers.values():
            x = torch.tanh(layer(x))
        return self.head(x) if self.head is not None else x


def _stage_model(stage: int | None, seed: int) -> Net:
    torch.manual_seed(seed)
    model = Net()
    if stage is None:
        return model
    keep = STAGE_LAYERS[stage]
    if "embed" not in keep:
        model.embed = None
    if "head" not in keep:
        model.head = None
    for name in list(model.layers):
        if name not in keep:
            del model.layers[name]
    return model


def _stage_state(rank: int, seed: int, lr: float | None = None) -> tuple[dict[str, Any], int]:
    """This rank's stage: an FSDP2-sharded part of the model, its Adam, its own values."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    world = dist.get_world_size()
    pp = 2
    dp = world // pp
    stage = rank // dp
    model = _stage_model(stage, seed)
    if dp > 1:
        mesh = init_device_mesh("cpu", (pp, dp), mesh_dim_names=("pp", "dp"))["dp"]
        for layer in model.layers.values():
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=LR[stage] if lr is None else lr)
    state = {
        "train": ckpt.ModelOptimizerState(model, opt),
        "schedule": {f"stage{stage}": {"microbatches": 4 + stage}},
        "step": 0,
        "rng": ckpt.RNGState(),
    }
    return state, stage


def _train(state: dict[str, Any], stage: int) -> None:
    train = state["train"]
    for _ in range(2):
        x = torch.randn(3, 4 if stage == 0 else 8)
        train.model(x).square().sum().backward()
        train.optimizers[0].step()
        train.optimizers[0].zero_grad()


def _lrs(state: dict[str, Any]) -> list[float]:
    return [group["lr"] for group in state["train"].optimizers[0].param_groups]


def _save_stages(rank: int, world: int, root: str, expected_dir: str) -> dict[str, Any]:
    state, stage = _stage_state(rank, seed=1)
    _train(state, stage)
    state["step"] = STEP
    expected = full_values(state)
    if rank % (world // 2) == 0:
        save_expected(
            {k: v for k, v in expected.items() if not k.startswith("rng")},
            f"{expected_dir}/stage{stage}.safetensors",
        )
    ckpt.save(state, root, step=STEP)

    # Same layout, fresh values: every rank restores its own stage, strictly.
    fresh, _ = _stage_state(rank, seed=2, lr=0.5)
    fresh["schedule"] = {f"stage{stage}": {"microbatches": 0}}
    assert ckpt.load(fresh, root) == STEP
    loaded_moments = sorted(fresh["train"].optimizers[0].state_dict()["state"])
    return {
        "stage": stage,
        "problems": mismatches(fresh, expected),
        "lrs": _lrs(fresh),
        "schedule": fresh["schedule"],
        "step": fresh["step"],
        "moments": len(loaded_moments),
        "params": len(list(fresh["train"].model.parameters())),
    }


def _expected_stage(expected_dir: str, stage: int) -> dict[str, torch.Tensor]:
    return load_expected(f"{expected_dir}/stage{stage}.safetensors")


def _restore_one_rank_per_stage(rank: int, world: int, root: str, expected_dir: str) -> Any:
    state, stage = _stage_state(rank, seed=3, lr=0.5)
    state["schedule"] = {f"stage{stage}": {}}
    assert ckpt.load(state, root) == STEP
    expected = _expected_stage(expected_dir, stage)
    loaded = {k: v for k, v in full_values(state).items() if not k.startswith("rng")}
    return {
        "problems": [
            k for k in expected if k not in loaded or not torch.equal(loaded[k], expected[k])
        ]
        + [k for k in loaded if k not in expected],
        "lrs": _lrs(state),
        "schedule": state["schedule"],
    }


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("pp")
    expected_dir = tmp_path_factory.mktemp("pp-expected")
    results = run_ranks(_save_stages, 4, str(root / "ckpt"), str(expected_dir), timeout_s=TIMEOUT_S)
    return {"root": root / "ckpt", "expected": expected_dir, "results": results}


def test_each_stage_restores_its_own_part_strictly(saved: dict[str, Any]) -> None:
    for rank, result in enumerate(saved["results"]):
        stage = rank // 2
        assert result["stage"] == stage
        assert result["problems"] == [], rank
        assert result["lrs"] == [LR[stage]], rank
        assert result["schedule"] == {f"stage{stage}": {"microbatches": 4 + stage}}, rank
        assert result["step"] == STEP
        # Only its own parameters got optimizer state: nothing of the other stage's.
        assert result["moments"] == result["params"] == 6, rank


def test_the_manifest_keeps_every_stage_and_names_the_partial_maps(
    saved: dict[str, Any],
) -> None:
    manifest = read_manifest(LocalBackend(saved["root"]), STEP)
    model = manifest.state["train"]["model"]
    assert {k.split(".")[0] for k in model} == {"embed", "layers", "head"}
    assert len(model) == 12 and len(manifest.state["train"]["optim"]["state"]) == 12
    groups = manifest.state["train"]["optim"]["param_groups"]
    assert groups.keys() == {"embed.weight", "layers.2.weight"}
    assert groups["embed.weight"]["lr"] == LR[0] and groups["layers.2.weight"]["lr"] == LR[1]
    assert groups["layers.2.weight"]["params"][-1] == "head.bias"
    assert manifest.state["schedule"] == {
        "stage0": {"microbatches": 4},
        "stage1": {"microbatches": 5},
    }
    assert set(manifest.partial_maps) == {
        ("train", "model"),
        ("train", "optim", "state"),
        ("train", "optim", "param_groups"),
        ("schedule",),
    }


def test_two_ranks_one_per_stage_restore_strictly(saved: dict[str, Any]) -> None:
    results = run_ranks(
        _restore_one_rank_per_stage,
        2,
        str(saved["root"]),
        str(saved["expected"]),
        timeout_s=TIMEOUT_S,
    )
    for stage, result in enumerate(results):
        assert result["problems"] == [], stage
        assert result["lrs"] == [LR[stage]]
        assert result["schedule"] == {f"stage{stage}": {"microbatches": 4 + stage}}


def test_one_process_with_the_whole_model_restores_every_stage(
    saved: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    model = _stage_model(None, seed=4)
    stage_params = [
        [
            p
            for n, p in model.named_parameters()
            if n.split(".")[0] == "embed" or n.split(".")[:2] in (["layers", "0"], ["layers", "1"])
        ],
        [
            p
            for n, p in model.named_parameters()
            if n.split(".")[0] == "head" or n.split(".")[:2] in (["layers", "2"], ["layers", "3"])
        ],
    ]
    opt = torch.optim.Adam([{"params": ps} for ps in stage_params], lr=0.5)
    state: dict[str, Any] = {
        "train": ckpt.ModelOptimizerState(model, opt),
        "schedule": {"stage0": {}, "stage1": {}},
        "step": 0,
        "rng": ckpt.RNGState(),
    }
    with caplog.at_level(logging.WARNING):
        assert ckpt.load(state, saved["root"]) == STEP
    expected = {
        **_expected_stage(saved["expected"], 0),
        **_expected_stage(saved["expected"], 1),
    }
    loaded = {k: v for k, v in named_tensors(state).items() if not k.startswith("rng")}
    assert sorted(loaded) == sorted(expected)
    for name, want in expected.items():
        assert torch.equal(loaded[name].detach(), want), name
    assert [g["lr"] for g in opt.param_groups] == [LR[0], LR[1]]
    assert state["schedule"] == {"stage0": {"microbatches": 4}, "stage1": {"microbatches": 5}}
    assert "parameter group" not in caplog.text  # every group found its saved settings


def test_an_offline_relayout_keeps_the_stages_apart(
    saved: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> None:
    dst = tmp_path_factory.mktemp("pp-relayout")
    relayout(LocalBackend(saved["root"]), LocalBackend(dst), world_size=2)
    source = read_manifest(LocalBackend(saved["root"]), STEP)
    converted = read_manifest(LocalBackend(dst), STEP)
    assert converted.world_size == 2 and converted.state == source.state
    assert converted.partial_maps == source.partial_maps != ()
    results = run_ranks(
        _restore_one_rank_per_stage, 2, str(dst), str(saved["expected"]), timeout_s=TIMEOUT_S
    )
    for stage, result in enumerate(results):
        assert result["problems"] == [], stage
        assert result["lrs"] == [LR[stage]]
