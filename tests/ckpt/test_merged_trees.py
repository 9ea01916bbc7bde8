"""The union of the ranks' state trees (pipeline stages hold different parts of a state).

``merge_trees`` and ``tree_shape_digest`` (which ranks send a tree), the committer's merge
and the manifest's ``partial_maps``, a load that leaves other stages' keys alone but still
refuses what is really missing or unexpected, and ``ModelOptimizerState``'s parameter
groups by name (with the list form earlier checkpoints hold still loading).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import ckpt
from ckpt.coordination import ManifestBuilder
from ckpt.errors import CorruptCheckpointError, StateMismatchError
from ckpt.format import Manifest, ShardIndex, merge_trees, read_manifest, tree_shape_digest
from storage_backends import LocalBackend
from tests.support.on_disk import read_manifest as read_manifest_doc
from tests.support.on_disk import write_manifest

STAGE0 = {
    "model": {"embed.w": {"__tensor__": "model.embed.w"}, "l0.w": {"__tensor__": "model.l0.w"}},
    "step": 7,
    "sched": {"lrs": [0.1, 0.2]},
}
STAGE1 = {
    "model": {"l1.w": {"__tensor__": "model.l1.w"}, "head.w": {"__tensor__": "model.head.w"}},
    "step": 8,
    "sched": {"lrs": [0.3]},
    "stage1": {"microbatches": 4},
}


def test_merge_is_the_union_and_the_lower_rank_wins_each_place() -> None:
    merged, partial = merge_trees([STAGE0, STAGE1])
    assert merged == {
        "model": {**STAGE0["model"], **STAGE1["model"]},  # type: ignore[dict-item]
        "step": 7,
        "sched": {"lrs": [0.1, 0.2]},  # lists are values: not merged element by element
        "stage1": {"microbatches": 4},
    }
    assert list(merged["model"]) == ["embed.w", "l0.w", "l1.w", "head.w"]
    assert sorted(map(tuple, partial)) == [(), ("model",)]


def test_markers_are_values_not_mappings() -> None:
    a = {"t": {"__tensor__": "a"}, "b": {"__bytes__": "AA=="}}
    b = {"t": {"__tensor__": "b", "x": 1}, "b": {"__bytes__": "AQ==", "y": 2}}
    merged, partial = merge_trees([a, b])
    assert merged == a and partial == []


def test_equal_keys_merge_to_the_lowest_rank_tree_with_nothing_partial() -> None:
    other = json.loads(json.dumps(STAGE0).replace("7", "9"))
    assert merge_trees([STAGE0, other]) == (STAGE0, [])
    assert merge_trees([STAGE0]) == (STAGE0, [])


def test_shape_digest_follows_the_keys_not_the_values() -> None:
    digest = tree_shape_digest(STAGE0)
    assert tree_shape_digest({**STAGE0, "step": 100, "sched": {"lrs": []}}) == digest
    assert tree_shape_digest(STAGE1) != digest
    deeper = {**STAGE0, "sched": {"lrs": [0.1], "gamma": 0.5}}
    assert tree_shape_digest(deeper) != digest
    # A mapping and a value under the same key differ; so do keys that join the same way.
    assert tree_shape_digest({"a": {"b": 1}}) != tree_shape_digest({"a": 1})
    assert tree_shape_digest({"a.b": 1}) != tree_shape_digest({"a": {"b": 1}})


def _report(rank: int, state: dict[str, Any] | None) -> ShardIndex:
    return ShardIndex(rank=rank, tensors={}, files={}, state=state)


def _manifest(builder: ManifestBuilder, world: int) -> tuple[bytes, Manifest]:
    args: dict[str, Any] = {"generation": "g", "world_size": world, "chunk_bytes": 64}
    return builder.render(created_unix=1.0, **args), builder.build(created_unix=1.0, **args)


def test_the_committer_merges_the_trees_in_rank_order_whatever_the_arrival() -> None:
    first = {"sched": {"stage0": {"lr": 0.1}}, "step": 7}
    second = {"sched": {"stage1": {"lr": 0.2}}, "step": 8}
    builder = ManifestBuilder(3)
    for rank, state in ((3, second), (1, None), (0, first), (2, None)):
        builder.add_report(_report(rank, state).to_bytes(), f"rank {rank}", 64)
    data, built = _manifest(builder, 4)
    loaded = Manifest.from_bytes(data, "m")
    assert loaded == built and data == built.to_bytes()
    assert loaded.state == {"sched": {"stage0": {"lr": 0.1}, "stage1": {"lr": 0.2}}, "step": 7}
    assert loaded.partial_maps == (("sched",),)
    assert json.loads(data)["partial_maps"] == [["sched"]]


def test_one_tree_writes_the_manifest_as_before() -> None:
    builder = ManifestBuilder(3)
    builder.add(_report(0, STAGE0))
    builder.add(_report(1, None))
    data, built = _manifest(builder, 2)
    assert "partial_maps" not in json.loads(data)
    assert built.partial_maps == () and built.state == STAGE0


def test_a_partial_map_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    ckpt.save({"sched": {"lrs": [1.0]}, "step": 1}, tmp_path, step=1)
    doc = read_manifest_doc(tmp_path, 1)
    for bad in (["sched", "lrs"], ["nothing"], ["step"]):
        write_manifest(tmp_path, 1, {**doc, "partial_maps": [bad]})
        with pytest.raises(CorruptCheckpointError, match="partial_maps"):
            read_manifest(LocalBackend(tmp_path), 1)
    write_manifest(tmp_path, 1, {**doc, "partial_maps": [["sched"], []]})
    assert read_manifest(LocalBackend(tmp_path), 1).partial_maps == (("sched",), ())


# -- loading a merged tree -------------------------------------------------------------


class Stage(nn.Module):
    """A module whose state holds exactly ``names`` (e.g. ``l1.w``), tensors of 2 elements."""

    def __init__(self, *names: str) -> None:
        super().__init__()
        for name in names:
            holder, param = name.split(".")
            if not hasattr(self, holder):
                self.add_module(holder, nn.Module())
            getattr(self, holder).register_parameter(param, nn.Parameter(torch.zeros(2)))


NAMES = ("embed.w", "l0.w", "l1.w", "head.w")


def _two_stages(root: Path, *partial: list[str]) -> None:
    """A checkpoint as two stages save it: stage 0 holds embed and l0, stage 1 l1, head
    and its own schedule; ``partial``: the mappings the stages held in part."""
    values = {name: torch.full((2,), float(i + 1)) for i, name in enumerate(NAMES)}
    whole = {
        "model": values,
        "sched": {"w": torch.ones(2), "stage1": {"microbatches": 4}},
        "step": 7,
        "stage0_only": {"loss_scale": 1024.0},
    }
    ckpt.save(whole, root, step=1)
    if partial:
        doc = read_manifest_doc(root, 1)
        write_manifest(root, 1, {**doc, "partial_maps": list(partial)})


def test_a_stage_loads_its_own_part_strictly_and_leaves_the_rest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _two_stages(tmp_path, [], ["model"], ["sched"])
    stage = Stage("l1.w", "head.w")
    state: dict[str, Any] = {"model": stage, "sched": {"w": torch.zeros(2)}, "step": 0}
    with caplog.at_level(logging.INFO):
        ckpt.load(state, tmp_path)
    loaded = stage.state_dict()
    assert loaded["l1.w"].tolist() == [3.0, 3.0] and loaded["head.w"].tolist() == [4.0, 4.0]
    assert state["step"] == 7 and state["sched"]["w"].tolist() == [1.0, 1.0]
    assert "stage1" not in state["sched"]  # another stage's value, left to it
    assert "4 key(s) of the checkpoint belong to other ranks' parts" in caplog.text


def test_without_partial_maps_the_other_stage_is_unexpected(tmp_path: Path) -> None:
    _two_stages(tmp_path)
    state: dict[str, Any] = {
        "model": Stage("l1.w", "head.w"),
        "sched": {},
        "step": 0,
        "stage0_only": {},
    }
    with pytest.raises(StateMismatchError, match=r"not in the state: model\.embed\.w"):
        ckpt.load(state, tmp_path)


def test_partial_maps_still_refuse_what_is_missing_or_unexpected_elsewhere(
    tmp_path: Path,
) -> None:
    _two_stages(tmp_path, ["model"])
    missing: dict[str, Any] = {"model": Stage("l1.w", "l9.w"), "sched": {}, "step": 0}
    with pytest.raises(StateMismatchError, match=r"missing from the checkpoint: model\.l9\.w"):
        ckpt.load(missing, tmp_path)
    # "sched" is not listed: a tensor only the checkpoint holds there is still unexpected.
    unexpected: dict[str, Any] = {"model": Stage("l1.w"), "sched": Stage(), "step": 0}
    with pytest.raises(StateMismatchError, match=r"sched\.w"):
        ckpt.load(unexpected, tmp_path)


def test_a_plain_dict_gets_no_fresh_tensors_of_other_stages(tmp_path: Path) -> None:
    """A plain mapping may take tensors it lacks (an optimizer that never stepped), but not
    another stage's."""
    _two_stages(tmp_path, [], ["model"])
    state: dict[str, Any] = {"model": {"l1.w": torch.zeros(2)}, "sched": {}, "step": 0}
    ckpt.load(state, tmp_path)
    assert list(state["model"]) == ["l1.w"] and state["model"]["l1.w"].tolist() == [3.0, 3.0]
    _two_stages(tmp_path / "whole")
    state = {"model": {"l1.w": torch.zeros(2)}, "sched": {}, "step": 0, "stage0_only": {}}
    ckpt.load(state, tmp_path / "whole")
    assert sorted(state["model"]) == sorted(NAMES)  # without partial maps: all it holds


# -- ModelOptimizerState's parameter groups ---------------------------------------------


def _trained(lr: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    groups: list[dict[str, Any]] = [
        {"params": model[0].parameters()},
        {"params": model[1].parameters(), "lr": lr * 2},
    ]
    opt = torch.optim.Adam(
        groups,
        lr=lr,
        betas=(0.8, 0.9),
    )
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    return model, opt


def test_parameter_groups_are_stored_by_name_and_load_back(tmp_path: Path) -> None:
    model, opt = _trained(0.01)
    ckpt.save({"train": ckpt.ModelOptimizerState(model, opt)}, tmp_path, step=1)
    groups = ckpt.read(tmp_path)["train"]["optim"]["param_groups"]
    assert groups["0.weight"]["lr"] == 0.01 and groups["1.weight"]["lr"] == 0.02
    assert groups["1.weight"]["params"] == ["1.weight", "1.bias"]
    other, other_opt = _trained(0.5)
    ckpt.load({"train": ckpt.ModelOptimizerState(other, other_opt)}, tmp_path)
    assert [g["lr"] for g in other_opt.param_groups] == [0.01, 0.02]
    assert other_opt.param_groups[1]["betas"] == (0.8, 0.9)
    assert other_opt.state_dict()["state"].keys() == opt.state_dict()["state"].keys()


class _TorchForm:
    """What ``ModelOptimizerState`` saved before its groups were stored by name."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        self.model, self.opt = model, opt

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.opt)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise AssertionError("only saved")


def test_groups_in_torch_list_form_still_load(tmp_path: Path) -> None:
    model, opt = _trained(0.01)
    ckpt.save({"train": _TorchForm(model, opt)}, tmp_path, step=1)
    assert isinstance(ckpt.read(tmp_path)["train"]["optim"]["param_groups"], list)
    other, other_opt = _trained(0.5)
    ckpt.load({"train": ckpt.ModelOptimizerState(other, other_opt)}, tmp_path)
    assert [g["lr"] for g in other_opt.param_groups] == [0.01, 0.02]
    for (_, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b)


def test_a_group_none_of_whose_parameters_was_saved_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model, opt = _trained(0.01)
    ckpt.save({"train": ckpt.ModelOptimizerState(model, opt)}, tmp_path, step=1)
    bigger = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(2, 2))
    groups = [{"params": bigger[:2].parameters()}, {"params": bigger[2].parameters()}]
    bigger_opt = torch.optim.Adam(groups, lr=0.5)
    ckpt.load({"train": ckpt.ModelOptimizerState(bigger, bigger_opt)}, tmp_path, strict=False)
    assert [g["lr"] for g in bigger_opt.param_groups] == [0.01, 0.5]
    assert (
        "parameter group 0: its parameters were saved in groups of different settings"
        in caplog.text
    )
    assert "parameter group 1 (2 parameters, e.g. '2.weight'): none of its parameters" in (
        caplog.text
    )
