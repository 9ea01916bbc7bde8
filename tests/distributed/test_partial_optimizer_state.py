"""Parameters without optimizer state round-trip on any world size (issue 11): an FSDP2
model whose pooler never got a gradient, saved by 2 gloo ranks behind
``ckpt.ModelOptimizerState``, loads onto one process with exactly the state it had."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

import ckpt
from tests.support.gloo import run_ranks


class _Encoder(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.enc = nn.Linear(6, 5)
        self.pooler = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.enc(x)  # a CLS-token loss: the pooler gets no gradient
        return out


def _train(model: _Encoder, opt: torch.optim.Optimizer) -> None:
    torch.manual_seed(10)
    x = torch.randn(4, 6)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        model(x).pow(2).sum().backward()
        opt.step()


def _save_sharded(rank: int, world: int, root: str) -> list[str]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = _Encoder(0)
    for layer in (model.enc, model.pooler):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    _train(model, opt)
    ckpt.save({"train": ckpt.ModelOptimizerState(model, opt)}, root, step=1)
    return sorted(n for n, p in model.named_parameters() if p in opt.state)


def test_partial_optimizer_state_loads_onto_another_world_size(root: Path) -> None:
    with_state = run_ranks(_save_sharded, 2, str(root), timeout_s=60.0)
    assert with_state == [["enc.bias", "enc.weight"]] * 2
    expected = _Encoder(0)
    expected_opt = torch.optim.AdamW(expected.parameters(), lr=0.1)
    _train(expected, expected_opt)  # the same training on one process
    model = _Encoder(1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)

    ckpt.load({"train": ckpt.ModelOptimizerState(model, opt)}, root)

    assert sorted(n for n, p in model.named_parameters() if p in opt.state) == with_state[0]
    for (name, p), q in zip(model.named_parameters(), expected.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), msg=name)
        want: dict[str, Any] = expected_opt.state.get(q, {})
        for key, value in want.items():
            torch.testing.assert_close(opt.state[p][key], value, msg=f"{name}.{key}")
