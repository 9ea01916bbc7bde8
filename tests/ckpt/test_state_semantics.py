"""State semantics users of PyTorch expect (issue 11): ``strict=False`` says what it skipped,
``torch.compile`` prefixes are not part of stored names, parameters without optimizer state
round-trip, tied weights are stored once and stay tied."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

import ckpt
from tests.support.checks import assert_bit_identical
from tests.support.on_disk import read_manifest

# --- strict=False -------------------------------------------------------------------


def test_strict_false_reports_missing_and_unexpected_keys(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The report lists both sides' extra keys, logged at WARNING; the shared ones load."""
    torch.manual_seed(0)
    saved = {"model": nn.Linear(4, 3), "old": torch.ones(2), "shared": torch.ones(3)}
    ckpt.save(saved, root, step=1)
    inner = nn.Linear(4, 3)
    shared = torch.zeros(3)
    target = {"model": nn.Sequential(inner), "new": torch.zeros(2), "shared": shared}
    before = inner.weight.detach().clone()

    report = ckpt.restore(target, root, strict=False)

    assert report.step == 1
    assert set(report.missing) == {"new", "model.0.weight", "model.0.bias"}
    assert set(report.unexpected) == {"old", "model.weight", "model.bias"}
    assert not report.loaded_nothing
    assert_bit_identical(inner.weight.detach(), before)  # kept, not loaded
    assert_bit_identical(shared, torch.ones(3))
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "model.0.weight" in warnings and "model.weight" in warnings


def test_strict_false_warns_when_nothing_was_loaded(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No tensor and no value matches: the restore says so instead of reporting a quiet success."""
    ckpt.save({"net": nn.Linear(4, 3), "step": 7}, root, step=1)
    target = {"model": nn.Linear(4, 3), "epoch": 0}

    report = ckpt.restore(target, root, strict=False)

    assert report.loaded_nothing
    assert set(report.missing) == {"model", "epoch"}
    assert set(report.unexpected) == {"net", "step"}
    assert target["epoch"] == 0
    assert any(
        r.levelno == logging.WARNING and "nothing was loaded" in r.getMessage()
        for r in caplog.records
    )


def test_strict_false_with_a_matching_state_reports_nothing_missing(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt.save({"model": nn.Linear(4, 3), "step": 7}, root, step=1)
    target = {"model": nn.Linear(4, 3), "step": 0}

    report = ckpt.restore(target, root, strict=False)

    assert report.missing == () and report.unexpected == () and not report.loaded_nothing
    assert target["step"] == 7
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# --- torch.compile ------------------------------------------------------------------


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _compiled(module: nn.Module) -> nn.Module:
    """``torch.compile(module)``: the ``_orig_mod`` wrapper exists before any forward pass."""
    compiled = torch.compile(module)
    assert isinstance(compiled, nn.Module)
    return compiled


def _assert_same_params(a: nn.Module, b: nn.Module) -> None:
    plain_a = {k.replace("_orig_mod.", ""): v for k, v in a.state_dict().items()}
    plain_b = {k.replace("_orig_mod.", ""): v for k, v in b.state_dict().items()}
    assert plain_a.keys() == plain_b.keys()
    for k in plain_a:
        assert_bit_identical(plain_b[k], plain_a[k])


@pytest.mark.parametrize("direction", ["compiled->plain", "plain->compiled"])
def test_compiled_module_loads_into_plain_one_and_back(root: Path, direction: str) -> None:
    """``_orig_mod`` is not part of the stored names: either side loads the other's checkpoint."""
    source, target = _net(0), _net(1)
    saved = _compiled(source) if direction == "compiled->plain" else source
    loaded = _compiled(target) if direction == "plain->compiled" else target
    ckpt.save({"model": saved}, root, step=1)
    assert set(read_manifest(root, 1)["tensors"]) == {
        "model.0.weight",
        "model.0.bias",
        "model.2.weight",
        "model.2.bias",
    }

    report = ckpt.restore({"model": loaded}, root)

    assert report.missing == () and report.unexpected == ()
    _assert_same_params(source, target)


def test_compiled_submodule_names_are_plain_too(root: Path) -> None:
    """A compiled submodule (``model.encoder = _compiled(...)``) stores plain names."""
    source = nn.Module()
    source.encoder = _compiled(_net(0))
    ckpt.save({"model": source}, root, step=1)
    target = nn.Module()
    target.encoder = _net(1)

    ckpt.load({"model": target}, root)

    _assert_same_params(source, target)


@pytest.mark.parametrize("compiled_target", [False, True])
def test_names_stored_with_orig_mod_still_load(root: Path, compiled_target: bool) -> None:
    """A checkpoint holding ``_orig_mod.`` names (a compiled module's state_dict saved as a
    dict, or a checkpoint written before the names were made plain) loads into a module."""
    source = _compiled(_net(0))
    ckpt.save({"model": source.state_dict()}, root, step=1)
    assert "model._orig_mod.0.weight" in read_manifest(root, 1)["tensors"]
    target = _net(1)

    ckpt.load({"model": _compiled(target) if compiled_target else target}, root)

    _assert_same_params(source, target)


@pytest.mark.parametrize("direction", ["compiled->plain", "plain->compiled"])
def test_compiled_module_through_model_optimizer_state(root: Path, direction: str) -> None:
    source, target = _net(0), _net(1)
    saved = _compiled(source) if direction == "compiled->plain" else source
    loaded = _compiled(target) if direction == "plain->compiled" else target
    src_opt = torch.optim.AdamW(saved.parameters(), lr=0.1)
    source(torch.randn(3, 4)).sum().backward()
    src_opt.step()
    dst_opt = torch.optim.AdamW(loaded.parameters(), lr=0.1)
    ckpt.save({"train": ckpt.ModelOptimizerState(saved, src_opt)}, root, step=1)

    ckpt.load({"train": ckpt.ModelOptimizerState(loaded, dst_opt)}, root)

    _assert_same_params(source, target)
    for p_src, p_dst in zip(source.parameters(), target.parameters()):
        assert_bit_identical(dst_opt.state[p_dst]["exp_avg"], src_opt.state[p_src]["exp_avg"])


# --- parameters without optimizer state ---------------------------------------------


def _encoder(seed: int) -> tuple[nn.ModuleDict, torch.optim.Optimizer]:
    """An encoder whose pooler never gets a gradient (a CLS-token fine-tune): after a step,
    AdamW holds state for the encoder only."""
    torch.manual_seed(seed)
    model = nn.ModuleDict({"enc": nn.Linear(4, 4), "pooler": nn.Linear(4, 2)})
    return model, torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.01)


def _step_encoder_only(model: nn.ModuleDict, opt: torch.optim.Optimizer, seed: int) -> None:
    torch.manual_seed(seed)
    opt.zero_grad(set_to_none=True)
    model["enc"](torch.randn(3, 4)).pow(2).sum().backward()
    opt.step()


def _params_with_state(model: nn.Module, opt: torch.optim.Optimizer) -> set[str]:
    return {name for name, p in model.named_parameters() if p in opt.state}


def _assert_same_optimizer_state(
    a: nn.Module, a_opt: torch.optim.Optimizer, b: nn.Module, b_opt: torch.optim.Optimizer
) -> None:
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert_bit_identical(pb.detach(), pa.detach())
        assert (pa in a_opt.state) == (pb in b_opt.state), name
        for k, v in a_opt.state.get(pa, {}).items():
            assert_bit_identical(b_opt.state[pb][k], v)


def test_parameter_without_optimizer_state_round_trips_through_model_optimizer_state(
    root: Path,
) -> None:
    model, opt = _encoder(0)
    _step_encoder_only(model, opt, 10)
    assert _params_with_state(model, opt) == {"enc.weight", "enc.bias"}
    ckpt.save({"train": ckpt.ModelOptimizerState(model, opt)}, root, step=1)
    other, other_opt = _encoder(1)

    ckpt.load({"train": ckpt.ModelOptimizerState(other, other_opt)}, root)

    assert _params_with_state(other, other_opt) == {"enc.weight", "enc.bias"}
    _assert_same_optimizer_state(model, opt, other, other_opt)
    _step_encoder_only(model, opt, 11)  # and training goes on identically
    _step_encoder_only(other, other_opt, 11)
    _assert_same_optimizer_state(model, opt, other, other_opt)


def test_state_only_the_live_optimizer_holds_is_dropped_on_load(root: Path) -> None:
    """The optimizer holds exactly what was saved, also for a plain optimizer entry whose
    live state covers a parameter the checkpoint has no state for."""
    model, opt = _encoder(0)
    _step_encoder_only(model, opt, 10)
    ckpt.save({"model": model, "opt": opt}, root, step=1)
    ckpt.save({"train": ckpt.ModelOptimizerState(model, opt)}, root / "mos", step=1)
    for entry in ("plain", "mos"):
        other, other_opt = _encoder(1)
        torch.manual_seed(3)
        other_opt.zero_grad()
        x = torch.randn(3, 4)
        other["pooler"](other["enc"](x)).pow(2).sum().backward()
        other_opt.step()  # now every parameter has state
        assert _params_with_state(other, other_opt) == {n for n, _ in other.named_parameters()}

        if entry == "plain":
            ckpt.load({"model": other, "opt": other_opt}, root)
        else:
            ckpt.load({"train": ckpt.ModelOptimizerState(other, other_opt)}, root / "mos")

        _assert_same_optimizer_state(model, opt, other, other_opt)


# --- tied weights -------------------------------------------------------------------


class _TiedLM(nn.Module):
    """An embedding and an output head that share one weight (``lm_head.weight is embed.weight``)."""

    def __init__(self, seed: int, tied: bool = True) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(10, 4)
        self.body = nn.Linear(4, 4)
        self.lm_head = nn.Linear(4, 10, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight


def test_tied_weights_are_stored_once_and_stay_tied(root: Path) -> None:
    source = _TiedLM(0)
    ckpt.save({"model": source}, root, step=1)
    manifest = read_manifest(root, 1)
    assert set(manifest["tensors"]) == {
        "model.embed.weight",
        "model.body.weight",
        "model.body.bias",
    }
    state = manifest["state"]["model"]
    assert state["lm_head.weight"] == state["embed.weight"] == {"__tensor__": "model.embed.weight"}
    target = _TiedLM(1)

    ckpt.load({"model": target}, root)

    assert target.lm_head.weight is target.embed.weight
    _assert_same_params(source, target)
    with torch.no_grad():
        target.embed.weight.add_(1.0)  # still one parameter
    assert_bit_identical(target.lm_head.weight.detach(), target.embed.weight.detach())


def test_tied_checkpoint_loads_into_untied_model(root: Path) -> None:
    """Both names get the stored tensor when the target does not tie them."""
    source = _TiedLM(0)
    ckpt.save({"model": source}, root, step=1)
    untied = _TiedLM(1, tied=False)

    ckpt.load({"model": untied}, root)

    assert untied.lm_head.weight is not untied.embed.weight
    _assert_same_params(source, untied)


def test_tensors_sharing_memory_differently_are_stored_apart(root: Path) -> None:
    """Only the same elements seen the same way are one tensor: views, transposes and
    separate top-level entries of shared memory are stored on their own."""
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    empty = nn.Parameter(torch.empty(0, 4))
    state = {
        "a": {"full": base, "t": base.t(), "row": base[1], "neg": base._neg_view()},
        "b": base,
        "empty": {"x": torch.empty(0, 4), "y": torch.empty(0, 4), "p": empty, "q": empty},
    }
    ckpt.save(state, root, step=1)
    stored = read_manifest(root, 1)
    assert set(stored["tensors"]) == {
        "a.full",
        "a.t",
        "a.row",
        "a.neg",
        "b",
        "empty.x",
        "empty.y",
        "empty.p",
    }
    assert stored["state"]["empty"]["q"] == {"__tensor__": "empty.p"}  # one tensor, tied
    parts = {
        "full": torch.zeros(3, 4),
        "t": torch.zeros(4, 3),
        "row": torch.zeros(4),
        "neg": torch.zeros(3, 4),
    }
    target = {"a": parts, "b": torch.zeros(3, 4), "empty": state["empty"]}
    ckpt.load(target, root)
    assert_bit_identical(parts["neg"], -base)
    assert_bit_identical(parts["t"], base.t().contiguous())


def test_tied_weights_through_model_optimizer_state(root: Path) -> None:
    class TiedLM(_TiedLM):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.lm_head(self.body(self.embed(x)))
            return out

    source = TiedLM(0)
    opt = torch.optim.AdamW(source.parameters(), lr=0.1)
    source(torch.tensor([1, 2, 3])).sum().backward()
    opt.step()
    ckpt.save({"train": ckpt.ModelOptimizerState(source, opt)}, root, step=1)
    assert not any("lm_head" in name for name in read_manifest(root, 1)["tensors"])
    target = TiedLM(1)
    target_opt = torch.optim.AdamW(target.parameters(), lr=0.1)

    ckpt.load({"train": ckpt.ModelOptimizerState(target, target_opt)}, root)

    assert target.lm_head.weight is target.embed.weight
    _assert_same_optimizer_state(source, opt, target, target_opt)
