"""``ModelOptimizerState``: a model and its optimizers as one checkpointable object.

It goes through ``torch.distributed.checkpoint.state_dict``: parameters and optimizer
state are keyed by fully-qualified parameter names (not by position), stay sharded as
the model is (FSDP2, tensor parallel, HSDP), and an optimizer that has not stepped yet
gets its state created before loading. Use it for sharded models and whenever the
checkpoint must load onto a different parallel layout.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn
from torch.optim import Optimizer


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
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        if self.optimizers:
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

    checkpoint_saved_maps = (("optim", "state"),)
    """Where the saved state is the whole truth: per-parameter optimizer state that only
    the live optimizer holds is dropped on load, not reported missing."""
