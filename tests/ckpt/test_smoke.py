"""End-to-end smoke test of the public surface on a local directory."""

from __future__ import annotations

from pathlib import Path

import torch

import ckpt


def _model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def test_save_then_load_restores_model_optimizer_and_values(root: Path) -> None:
    torch.manual_seed(0)
    model, opt = _model()
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 8)).pow(2).sum().backward()
        opt.step()
    state = {"model": model, "optim": opt, "step": 3, "note": {"lr": [0.1, 0.2]}}
    result = ckpt.save(state, root, step=3)
    assert result.committed

    model2, opt2 = _model()
    target = {"model": model2, "optim": opt2, "step": 0, "note": {}}
    assert ckpt.load(target, root) == 3
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for k in s1:
        for name in s1[k]:
            assert torch.equal(s1[k][name], s2[k][name])
    assert target["step"] == 3
    assert target["note"] == {"lr": [0.1, 0.2]}
