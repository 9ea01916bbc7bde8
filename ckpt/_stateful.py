"""``ModelOptimizerState``: a model and its optimizers as one checkpointable object.

It goes through ``torch.distributed.checkpoint.state_dict``: parameters and optimizer
state are keyed by fully-qualified parameter names (not by position), stay sharded as
the model is (FSDP2, tensor parallel, HSDP), and an optimizer that has not stepped yet
gets its state created before loading. Use it for sharded models and whenever the
checkpoint must load onto a different parallel layout.

Parameter groups are stored by name too (``{its first parameter's name: the group}``),
not as torch's list: the ranks of different pipeline stages hold different groups, and
the checkpoint keeps them all (``ckpt.format.merge_trees``), so that each stage, and a
job split into other stages, finds the settings of its own parameters.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

log = logging.getLogger(__name__)


class ModelOptimizerState:
    """Checkpointable ``(model, optimizers)``.

    Args:
        model: the (possibly sharded) module.
        optimizers: one optimizer or several; may be empty.
    """

    def __init__(self, model: nn.Module, optimizers: Optimizer | Iterable[Optimizer] = ()) -> None:
        self.model = model
        self.optimizers = [optimizers] if isinstance(optimizers, Optimizer) else list(optimizers)

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        if not self.optimizers:
            return {"model": get_model_state_dict(self.model)}
        model_sd, optim_sd = get_state_dict(self.model, self.optimizers)
        listed: list[dict[str, Any]] = optim_sd["param_groups"]  # type: ignore[assignment]
        groups = {g["params"][0]: g for g in listed if g["params"]}
        return {"model": model_sd, "optim": {"state": optim_sd["state"], "param_groups": groups}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        if self.optimizers:
            groups = state["optim"]["param_groups"]
            if isinstance(groups, Mapping):  # else a list: an earlier ckpt saved torch's own form
                state["optim"] = {**state["optim"], "param_groups": self._live_groups(groups)}
            # A parameter that had no optimizer state when saved (it never got a gradient)
            # has none after the load: the optimizer holds exactly what was saved. torch's
            # strict mode would refuse that; the checkpoint's keys were matched already.
            set_optimizer_state_dict(
                self.model,
                self.optimizers,
                state["optim"],
                options=StateDictOptions(strict=False),
            )
        set_model_state_dict(self.model, state["model"])

    def _live_groups(self, saved: Mapping[str, Any]) -> list[dict[str, Any]]:
        """torch's list of this rank's parameter groups, each with the saved settings of
        its parameters (a group none of whose parameters were saved keeps its own)."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        by_name = {name: group for group in saved.values() for name in group["params"]}
        live: list[dict[str, Any]] = get_optimizer_state_dict(  # type: ignore[assignment]
            self.model, self.optimizers
        )["param_groups"]
        groups = []
        for i, group in enumerate(live):
            found = [by_name[name] for name in group["params"] if name in by_name]
            if not found:
                log.warning(
                    "optimizer parameter group %d (%d parameters, e.g. %r): none of its "
                    "parameters is in the checkpoint; it keeps its current settings",
                    i,
                    len(group["params"]),
                    group["params"][0] if group["params"] else None,
                )
                groups.append(group)
                continue
            settings = _settings(found[0])
            if any(not _same(_settings(g), settings) for g in {id(g): g for g in found}.values()):
                log.warning(
                    "optimizer parameter group %d: its parameters were saved in groups of "
                    "different settings; it takes those of %r's",
                    i,
                    found[0]["params"][0],
                )
            groups.append({**settings, "params": group["params"]})
        return groups

    checkpoint_saved_maps = (("optim", "state"),)
    """Where the saved state is the whole truth: per-parameter optimizer state that only
    the live optimizer holds is dropped on load, not reported missing."""


def _settings(group: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k != "params"}


def _same(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two groups' settings are equal (a setting may be a tensor, e.g. ``lr``)."""
    if a.keys() != b.keys():
        return False
    for k, v in a.items():
        w = b[k]
        if isinstance(v, torch.Tensor) or isinstance(w, torch.Tensor):
            if not (isinstance(v, torch.Tensor) and isinstance(w, torch.Tensor)):
                return False
            if not torch.equal(v, w):
                return False
        elif v != w:
            return False
    return True
