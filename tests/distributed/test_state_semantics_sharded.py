"""State semantics on several ranks (issue 11), saved by gloo ranks and loaded onto one
process: an FSDP2 model whose pooler never got a gradient restores exactly the optimizer
state it had; an FSDP2 model's tied weights are stored once, even where a rank's shard is
empty, and stay tied."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

import ckpt
from tests.support.gloo import run_ranks
from tests.support.on_disk import read_manifest


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


class _TiedLM(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(2, 4)  # 2 rows on 3 ranks: one rank holds an empty shard
        self.lm_head = nn.Linear(4, 2, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lm_head(self.embed(x))
        return out


def _save_tied(rank: int, world: int, root: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _TiedLM(0)
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    ckpt.save({"model": model}, root, step=1)


def test_tied_weights_of_an_fsdp2_model_are_stored_once(root: Path) -> None:
    run_ranks(_save_tied, 3, str(root), timeout_s=60.0)
    assert set(read_manifest(root, 1)["tensors"]) == {"model.embed.weight"}
    model = _TiedLM(1)

    ckpt.load({"model": model}, root)

    assert model.lm_head.weight is model.embed.weight
    torch.testing.assert_close(model.embed.weight.detach(), _TiedLM(0).embed.weight.detach())
