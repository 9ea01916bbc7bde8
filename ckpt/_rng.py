"""Random number generator states as checkpointable state (tensors and JSON, no pickle)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


class RNGState:
    """The RNG states of this process: torch CPU, every CUDA device, Python and NumPy.

    Put one in the state (the manager does with ``include_rng=True``) to resume with
    exactly the random numbers an uninterrupted run would have drawn.
    """

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = random.getstate()
        np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "python": {"version": version, "internal": list(internal), "gauss_next": gauss},
            "numpy": {
                "kind": np_kind,
                "keys": torch.from_numpy(np.asarray(np_keys).astype(np.int64)),
                "pos": int(np_pos),
                "has_gauss": int(np_has_gauss),
                "cached_gaussian": float(np_gauss),
            },
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"].to(torch.uint8))
        py = state["python"]
        random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
        npy = state["numpy"]
        np.random.set_state(
            (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
        )
        cuda = state.get("cuda")
        if cuda and torch.cuda.is_available():
            for device, s in enumerate(cuda[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s.to(torch.uint8), device)
