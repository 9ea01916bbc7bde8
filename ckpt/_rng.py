"""Random number generator states as checkpointable state (tensors, no pickle).

Every rank has its own RNG states, so they are stored as one row per rank of a
``[world_size, n]`` byte tensor: rank r writes row r only. A job restored onto a
different number of ranks gives rank r the row of rank ``r % saved_world_size``.

A row has the same width everywhere: the CUDA part is the generator of the rank's own
device (``torch.cuda.current_device()``) in a fixed-size slot, empty when CUDA is not in
use, so neither the number of visible devices nor whether CUDA was initialised changes
the shape a restore expects.
"""

from __future__ import annotations

import logging
import random
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ckpt.engine._flatten import ShardedTensor
from ckpt.errors import CheckpointError

log = logging.getLogger(__name__)

_TORCH_BYTES = torch.get_rng_state().numel()
_PY_WORDS = 625  # Mersenne Twister state words plus the position
_NP_WORDS = 624
_CUDA_SLOT = 64  # bytes kept for the CUDA generator's state (Philox: 16)
# py version, has py gauss, py gauss, np pos, np has gauss, np gauss, CUDA state bytes
_HEAD = struct.Struct("<iidiidi")


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _cuda_state() -> torch.Tensor:
    """The RNG state of this rank's CUDA device, or an empty tensor when CUDA is not in use."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state = torch.cuda.get_rng_state(torch.cuda.current_device()).cpu()
        if state.numel() > _CUDA_SLOT:
            raise CheckpointError(
                f"the CUDA generator state has {state.numel()} bytes, more than the "
                f"{_CUDA_SLOT} an RNG row holds: this torch build is not supported by RNGState"
            )
        return state
    return torch.empty(0, dtype=torch.uint8)


def _pack() -> torch.Tensor:
    """This process's RNG states as one flat uint8 tensor."""
    py_version, py_internal, py_gauss = random.getstate()
    np_state: Any = np.random.get_state(legacy=True)
    _, np_keys, np_pos, np_has_gauss, np_gauss = np_state
    cuda = _cuda_state()
    head = _HEAD.pack(
        py_version,
        py_gauss is not None,
        py_gauss or 0.0,
        int(np_pos),
        int(np_has_gauss),
        float(np_gauss),
        cuda.numel(),
    )
    parts = [
        torch.frombuffer(bytearray(head), dtype=torch.uint8),
        torch.get_rng_state(),
        torch.from_numpy(np.asarray(py_internal, dtype=np.uint32).view(np.uint8).copy()),
        torch.from_numpy(np.asarray(np_keys, dtype=np.uint32).view(np.uint8).copy()),
        cuda,
        torch.zeros(_CUDA_SLOT - cuda.numel(), dtype=torch.uint8),
    ]
    return torch.cat(parts)


def _unpack(blob: torch.Tensor) -> None:
    data = blob.numpy().tobytes()
    py_version, py_has_gauss, py_gauss, np_pos, np_has_gauss, np_gauss, cuda_bytes = (
        _HEAD.unpack_from(data)
    )
    at = _HEAD.size
    torch.set_rng_state(blob[at : at + _TORCH_BYTES].clone())
    at += _TORCH_BYTES
    py_internal = np.frombuffer(data, dtype=np.uint32, count=_PY_WORDS, offset=at)
    at += _PY_WORDS * 4
    random.setstate(
        (py_version, tuple(int(v) for v in py_internal), py_gauss if py_has_gauss else None)
    )
    np_keys = np.frombuffer(data, dtype=np.uint32, count=_NP_WORDS, offset=at).copy()
    at += _NP_WORDS * 4
    np.random.set_state(("MT19937", np_keys, np_pos, np_has_gauss, np_gauss))
    if cuda_bytes and torch.cuda.is_available():
        device = torch.cuda.current_device()
        torch.cuda.set_rng_state(blob[at : at + cuda_bytes].clone(), device)
    elif cuda_bytes:
        log.warning(
            "the checkpoint holds a CUDA RNG state but CUDA is not available here; "
            "only the CPU, Python and NumPy generators were restored"
        )


class RNGState:
    """The RNG states of every rank: torch CPU, each CUDA device, Python and NumPy.

    Put one in the state (the manager does with ``include_rng=True``) to resume with
    exactly the random numbers an uninterrupted run would have drawn.
    """

    def __init__(self) -> None:
        self._saved_world: int | None = None

    def checkpoint_load_hint(self, stored_shape: Callable[[str], tuple[int, ...] | None]) -> None:
        """Told by the loader, before a load, the stored global shape of each tensor of
        this object's saved state (by name below it): one row per rank that saved RNG
        states (the manifest's world size, unless ``ckpt convert`` rewrote it)."""
        shape = stored_shape("per_rank")
        self._saved_world = shape[0] if shape is not None and len(shape) == 2 else None

    def state_dict(self) -> dict[str, Any]:
        rank, world = _rank_and_world()
        blob = _pack()
        if self._saved_world is not None:
            # Loading: ask for the row of the rank whose stream this rank continues.
            source = rank % self._saved_world
            if self._saved_world != world and rank == 0:
                log.warning(
                    "RNG states were saved by %d ranks and are restored on %d: rank r takes the "
                    "states of rank r %% %d",
                    self._saved_world,
                    world,
                    self._saved_world,
                )
            return {
                "per_rank": ShardedTensor(
                    torch.empty_like(blob).unsqueeze(0),
                    (self._saved_world, blob.numel()),
                    (source, 0),
                )
            }
        return {"per_rank": ShardedTensor(blob.unsqueeze(0), (world, blob.numel()), (rank, 0))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        per_rank = state["per_rank"]
        local = per_rank.local if isinstance(per_rank, ShardedTensor) else per_rank
        self._saved_world = None
        _unpack(local.reshape(-1).to(torch.uint8))
