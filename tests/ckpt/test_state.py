"""Matching a stored checkpoint with the state it is loaded into: errors, in-place fills, objects."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import ckpt
from tests.support.checks import assert_bit_identical
from tests.support.on_disk import read_manifest


def trained(seed: int = 0, steps: int = 3) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A small model and AdamW after ``steps`` steps (so the optimizer has moments)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(5, 6)).pow(2).sum().backward()
        opt.step()
    return model, opt


def fresh(seed: int = 1) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The same architecture, differently initialised, with an optimizer that never stepped."""
    return trained(seed, steps=0)


def assert_state_dicts_equal(a: Any, b: Any) -> None:
    """Deep equality of state dicts, tensors compared bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor)
        assert_bit_identical(b, a)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            assert_state_dicts_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_state_dicts_equal(x, y)
    else:
        assert a == b


# --- mismatches ---------------------------------------------------------------------


def test_mismatch_lists_missing_unexpected_shape_and_dtype_in_one_error(root: Path) -> None:
    """One StateMismatchError names every problem at once, and nothing is loaded."""
    saved = {
        "model": nn.Linear(4, 3),
        "t": torch.ones(4),
        "only_saved": torch.ones(2),
        "n": 1,
    }
    ckpt.save(saved, root, step=1)
    target_model = nn.Linear(4, 5)  # weight [5, 4] and bias [5] vs [3, 4] and [3]
    target: dict[str, Any] = {
        "model": target_model,
        "t": torch.zeros(4, dtype=torch.float64),
        "only_target": torch.zeros(2),
        "n": 0,
    }
    before = {k: v.clone() for k, v in target_model.state_dict().items()}
    with pytest.raises(ckpt.StateMismatchError) as info:
        ckpt.load(target, root)
    message = str(info.value)
    assert "'model.weight'" in message and "shape [3, 4]" in message and "[5, 4]" in message
    assert "'model.bias'" in message
    assert "'t'" in message and "dtype float32" in message and "float64" in message
    assert "missing from the checkpoint: only_target" in message
    assert "in the checkpoint but not in the state: only_saved" in message
    # The check runs before any byte is read: the target is untouched.
    assert torch.equal(target["t"], torch.zeros(4, dtype=torch.float64))
    for k, v in target_model.state_dict().items():
        assert torch.equal(v, before[k])
    assert target["n"] == 0


def test_mismatch_names_missing_and_unexpected_tensors_inside_a_module(root: Path) -> None:
    """A module with a parameter the checkpoint lacks, or without one it has, is reported by name."""
    ckpt.save({"model": nn.Linear(4, 3, bias=False)}, root, step=1)
    with pytest.raises(ckpt.StateMismatchError) as info:
        ckpt.load({"model": nn.Linear(4, 3, bias=True)}, root)
    assert "missing from the checkpoint: model.bias" in str(info.value)

    ckpt.save({"model": nn.Linear(4, 3, bias=True)}, root, step=2)
    with pytest.raises(ckpt.StateMismatchError) as info:
        ckpt.load({"model": nn.Linear(4, 3, bias=False)}, root)
    assert "in the checkpoint but not in the state: model.bias" in str(info.value)


def test_strict_false_ignores_keys_on_one_side_only(root: Path) -> None:
    """strict=False loads what both sides share and leaves the rest alone."""
    saved: dict[str, Any] = {
        "model": nn.Linear(4, 3, bias=True),
        "t": torch.arange(3.0),
        "only_saved": 5,
    }
    ckpt.save(saved, root, step=1)
    model = nn.Linear(4, 3, bias=False)
    extra = torch.full((2,), 7.0)
    target: dict[str, Any] = {"model": model, "t": torch.zeros(3), "only_target": extra}
    assert ckpt.load(target, root, strict=False) == 1
    assert_bit_identical(model.weight.detach(), saved["model"].weight.detach())
    assert_bit_identical(target["t"], torch.arange(3.0))
    assert target["only_target"] is extra and torch.equal(extra, torch.full((2,), 7.0))
    assert "only_saved" not in target


def test_strict_false_still_reports_shape_and_dtype_mismatches(root: Path) -> None:
    """Relaxing key checks never lets a tensor of the wrong shape or dtype through."""
    ckpt.save({"a": torch.zeros(3), "b": torch.zeros(2)}, root, step=1)
    with pytest.raises(ckpt.StateMismatchError) as info:
        ckpt.load({"a": torch.zeros(4), "b": torch.zeros(2, dtype=torch.int32)}, root, strict=False)
    assert "'a'" in str(info.value) and "'b'" in str(info.value)


def test_a_stored_value_where_the_state_has_a_tensor_is_a_mismatch(root: Path) -> None:
    """A plain value saved under a name that is a tensor in the state is reported, not skipped."""
    ckpt.save({"t": {"not": "a tensor"}, "u": 3}, root, step=1)
    target = {"t": torch.zeros(2), "u": torch.zeros(2)}
    with pytest.raises(ckpt.StateMismatchError) as info:
        ckpt.load(target, root)
    assert "'t'" in str(info.value) and "'u'" in str(info.value)


def test_optimizer_with_other_param_groups_is_a_state_mismatch(root: Path) -> None:
    """Parameter groups load_state_dict would refuse are found before anything is loaded."""
    model, opt = trained()
    ckpt.save({"model": model, "optim": opt}, root, step=1)
    model2, _ = fresh()
    before = {k: v.clone() for k, v in model2.state_dict().items()}
    other = nn.Linear(2, 2)
    with pytest.raises(ckpt.StateMismatchError) as info:
        ckpt.load({"model": model2, "optim": torch.optim.AdamW(other.parameters())}, root)
    assert "'optim': parameter group 0 holds 4 parameters" in str(info.value)
    for k, v in model2.state_dict().items():  # the model was not filled either
        assert torch.equal(v, before[k])
    two_groups = torch.optim.AdamW([{"params": [p]} for p in model2.parameters()])
    with pytest.raises(ckpt.StateMismatchError, match="1 parameter groups in the checkpoint"):
        ckpt.load({"model": model2, "optim": two_groups}, root)


def test_load_state_dict_refusing_the_tree_is_a_state_mismatch(root: Path) -> None:
    """An object's own load_state_dict refusing the stored tree surfaces as StateMismatchError."""

    class Picky:
        def state_dict(self) -> dict[str, Any]:
            return {"n": 1}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            raise ValueError("n must be even")

    ckpt.save({"obj": Picky()}, root, step=1)
    with pytest.raises(ckpt.StateMismatchError) as info:
        ckpt.load({"obj": Picky()}, root)
    assert "'obj'" in str(info.value) and "n must be even" in str(info.value)
    assert isinstance(info.value.__cause__, ValueError)


# --- objects and values -------------------------------------------------------------


def test_optimizer_that_never_stepped_receives_the_saved_moments(root: Path) -> None:
    """Fresh moment tensors are allocated for an empty optimizer; training then continues identically."""
    model, opt = trained()
    ckpt.save({"model": model, "optim": opt}, root, step=3)
    model2, opt2 = fresh()
    for group in opt2.param_groups:
        group["lr"] = 0.5  # restored to the saved value
    assert opt2.state_dict()["state"] == {}
    ckpt.load({"model": model2, "optim": opt2}, root)
    assert_state_dicts_equal(opt.state_dict(), opt2.state_dict())
    assert opt2.param_groups[0]["lr"] == 1e-2

    x = torch.randn(5, 6)
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert_bit_identical(q.detach(), p.detach())


def test_lr_scheduler_and_plain_values_are_restored(root: Path) -> None:
    """An LR scheduler's counters and learning rates, and plain values, come back as saved."""
    _, opt = trained()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(5):
        opt.step()
        sched.step()
    state = {
        "optim": opt,
        "sched": sched,
        "step": 5,
        "epoch": 1.5,
        "run": "name",
        "flags": [True, None],
    }
    ckpt.save(state, root, step=5)

    _, opt2 = fresh()
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=2, gamma=0.5)
    target: dict[str, Any] = {
        "optim": opt2,
        "sched": sched2,
        "step": 0,
        "epoch": 0.0,
        "run": "",
        "flags": [],
    }
    ckpt.load(target, root)
    assert sched2.state_dict() == sched.state_dict()
    assert sched2.last_epoch == 5 and sched2.get_last_lr() == sched.get_last_lr()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert (target["step"], target["epoch"], target["run"], target["flags"]) == (
        5,
        1.5,
        "name",
        [True, None],
    )


def test_nested_dict_state_is_updated_in_place(root: Path) -> None:
    """A dict in the state keeps its identity; its tensors are filled in place, its values replaced."""
    saved: dict[str, Any] = {
        "extra": {"buf": torch.arange(6.0).reshape(2, 3), "meta": {"k": 1}, "ids": (1, 2)}
    }
    ckpt.save(saved, root, step=1)
    inner: dict[str, Any] = {"buf": torch.zeros(2, 3), "meta": {}, "stale": "dropped"}
    buf = inner["buf"]
    target = {"extra": inner}
    ckpt.load(target, root)
    assert target["extra"] is inner
    assert inner["buf"] is buf and torch.equal(buf, saved["extra"]["buf"])
    assert inner["meta"] == {"k": 1} and inner["ids"] == (1, 2)
    assert "stale" not in inner


def test_top_level_tensor_is_filled_in_place(root: Path) -> None:
    """A tensor in the state is the same object, with the same storage, after load."""
    saved = torch.randn(3, 4)
    ckpt.save({"t": saved, "v": torch.arange(5)[1:4]}, root, step=1)
    t = torch.zeros(3, 4)
    ptr = t.data_ptr()
    base = torch.zeros(8, dtype=torch.int64)
    view = base[2:5]  # a view: filled through to its base
    target = {"t": t, "v": view}
    ckpt.load(target, root)
    assert target["t"] is t and t.data_ptr() == ptr
    assert_bit_identical(t, saved)
    assert target["v"] is view
    assert base.tolist() == [0, 0, 1, 2, 3, 0, 0, 0]


def test_rng_state_round_trips(root: Path) -> None:
    """RNGState resumes torch, Python and NumPy random streams exactly."""
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    ckpt.save({"rng": ckpt.RNGState()}, root, step=1)
    expected = (torch.rand(3), random.random(), np.random.rand(2))
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    ckpt.load({"rng": ckpt.RNGState()}, root)
    got = (torch.rand(3), random.random(), np.random.rand(2))
    assert torch.equal(got[0], expected[0])
    assert got[1] == expected[1]
    np.testing.assert_array_equal(got[2], expected[2])


def _rng_row_width(env: dict[str, str]) -> int:
    script = (
        "import torch, ckpt\n"
        "if torch.cuda.is_available():\n"
        "    torch.zeros(1, device='cuda')\n"
        "print(ckpt.RNGState().state_dict()['per_rank'].global_shape[1])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
        check=True,
    )
    return int(done.stdout)


def test_an_rng_row_has_one_width_whatever_cuda_shows() -> None:
    """A rank restored in a process that sees other devices (or none) reads the same row shape:
    the width may depend neither on the visible device count nor on CUDA being initialised."""
    widths = {_rng_row_width({"CUDA_VISIBLE_DEVICES": ""})}
    if torch.cuda.is_available():
        widths.add(_rng_row_width({}))
        widths.add(_rng_row_width({"CUDA_VISIBLE_DEVICES": "0"}))
    assert len(widths) == 1
    assert widths == {ckpt.RNGState().state_dict()["per_rank"].global_shape[1]}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_rank_s_own_cuda_generator_round_trips(root: Path) -> None:
    torch.cuda.manual_seed(5)
    ckpt.save({"rng": ckpt.RNGState()}, root, step=1)
    expected = torch.rand(4, device="cuda")
    torch.cuda.manual_seed(77)
    ckpt.load({"rng": ckpt.RNGState()}, root)
    assert torch.equal(torch.rand(4, device="cuda"), expected)


# --- ShardedTensor and names --------------------------------------------------------


def test_sharded_tensor_records_its_global_shape_and_offsets(root: Path) -> None:
    """A ShardedTensor covering its global tensor is stored with global shape and offsets."""
    full = torch.arange(48.0).reshape(8, 6)
    ckpt.save({"w": ckpt.ShardedTensor(full.clone(), (8, 6), (0, 0))}, root, step=1)
    entry = read_manifest(root, 1)["tensors"]["w"]
    assert entry["shape"] == [8, 6]
    assert [(p["offsets"], p["lengths"]) for p in entry["pieces"]] == [([0, 0], [8, 6])]
    plain = torch.zeros(8, 6)
    ckpt.load({"w": plain}, root)
    assert_bit_identical(plain, full)


@pytest.mark.parametrize(
    ("offsets", "rows", "cols"),
    [
        ((2, 0), slice(2, 6), slice(0, 6)),
        ((0, 3), slice(0, 8), slice(3, 6)),
        ((5, 2), slice(5, 8), slice(2, 5)),
    ],
    ids=["rows", "columns", "block"],
)
def test_sharded_tensor_loads_the_region_it_owns(
    root: Path, offsets: tuple[int, int], rows: slice, cols: slice
) -> None:
    """Loading into a ShardedTensor fills exactly its region of the global tensor, in place."""
    full = torch.arange(48.0).reshape(8, 6)
    ckpt.save({"w": ckpt.ShardedTensor(full.clone(), (8, 6), (0, 0))}, root, step=1)
    local = torch.zeros(rows.stop - rows.start, cols.stop - cols.start)
    target = {"w": ckpt.ShardedTensor(local, (8, 6), offsets)}
    ckpt.load(target, root)
    assert target["w"].local is local
    assert_bit_identical(local, full[rows, cols])


def test_sharded_tensor_global_shape_mismatch_is_reported(root: Path) -> None:
    """The global shape, not the local one, is matched against the checkpoint."""
    ckpt.save({"w": torch.zeros(8, 6)}, root, step=1)
    target = {"w": ckpt.ShardedTensor(torch.zeros(4, 6), (9, 6), (0, 0))}
    with pytest.raises(ckpt.StateMismatchError) as info:
        ckpt.load(target, root)
    assert "[8, 6]" in str(info.value) and "[9, 6]" in str(info.value)


def test_sharded_tensor_that_does_not_fit_its_global_shape_is_invalid() -> None:
    """A shard reaching past its global shape is refused when it is built."""
    with pytest.raises(ckpt.InvalidStateError):
        ckpt.ShardedTensor(torch.zeros(4, 6), (8, 6), (5, 0))


def test_saving_part_of_a_global_tensor_from_one_process_does_not_commit(root: Path) -> None:
    """A single process holding one shard cannot commit a checkpoint that could never load."""
    shard = ckpt.ShardedTensor(torch.ones(4, 6), (8, 6), (2, 0))
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.save({"w": shard}, root, step=1)
    assert "'w'" in str(info.value) and "24 of 48" in str(info.value)
    with pytest.raises(ckpt.CheckpointNotFoundError):
        ckpt.load({"w": torch.zeros(8, 6)}, root)


@pytest.mark.parametrize(
    "state",
    [
        {"a": {"b": torch.zeros(1)}, "a.b": torch.zeros(1)},
        {"m": {1: torch.zeros(1), "1": torch.zeros(1)}},
        {"l": [torch.zeros(1)], "l.0": torch.zeros(1)},
    ],
    ids=["dotted-key", "int-and-str-key", "list-index"],
)
def test_tensors_sharing_a_name_are_refused(root: Path, state: dict[str, Any]) -> None:
    """Two tensors whose fully-qualified names clash raise InvalidStateError naming the name."""
    with pytest.raises(ckpt.InvalidStateError) as info:
        ckpt.save(state, root, step=1)
    assert "share the name" in str(info.value)
    assert list(root.iterdir()) == []
