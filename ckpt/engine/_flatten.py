"""Turn a training state into named tensor pieces plus a JSON tree (the save side).

Every top-level entry becomes a tree (a module's or optimizer's ``state_dict()``, a
tensor, or a plain value). Tensors are replaced by ``{"__tensor__": name}`` references
and collected under fully-qualified names; everything else must be JSON-representable.
``ckpt._unflatten`` is the way back.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ckpt.errors import InvalidStateError
from ckpt.format import Box, dtype_name

TENSOR_REF = "__tensor__"
TUPLE_REF = "__tuple__"
ITEMS_REF = "__items__"
BYTES_REF = "__bytes__"
DTYPE_REF = "__dtype__"
NDARRAY_REF = "__ndarray__"
_MARKERS = {TENSOR_REF, TUPLE_REF, ITEMS_REF, BYTES_REF, DTYPE_REF, NDARRAY_REF}


@dataclass(frozen=True)
class ShardedTensor:
    """A local shard of a larger global tensor, for users not on DTensor (e.g. Megatron TP).

    Args:
        local: this rank's data.
        global_shape: shape of the whole tensor across ranks.
        offsets: where ``local`` starts in the global tensor, per dimension.
        replicated: True when other ranks hold identical copies of this shard
            (it is then written by one of them only).
    """

    local: torch.Tensor
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    replicated: bool = False

    def __post_init__(self) -> None:
        box = Box(tuple(self.offsets), tuple(self.local.shape))
        if not box.within(self.global_shape):
            raise InvalidStateError(
                f"shard at offsets {tuple(self.offsets)} with shape {tuple(self.local.shape)} "
                f"does not fit the global shape {tuple(self.global_shape)}"
            )


@dataclass
class FlatTensor:
    """One tensor of the state as this rank sees it."""

    name: str
    local: torch.Tensor
    global_shape: tuple[int, ...]
    box: Box
    replicated: bool
    dtype: str

    @property
    def nbytes(self) -> int:
        return self.local.numel() * self.local.element_size()


def local_geometry(value: Any) -> tuple[torch.Tensor, tuple[int, ...], Box, bool] | None:
    """(local data, global shape, region, replicated) of a tensor-like value, else None."""
    if isinstance(value, ShardedTensor):
        return (
            value.local,
            tuple(value.global_shape),
            Box(tuple(value.offsets), tuple(value.local.shape)),
            value.replicated,
        )
    if not isinstance(value, torch.Tensor):
        return None
    dtensor = _dtensor_geometry(value)
    if dtensor is not None:
        return dtensor
    return value, tuple(value.shape), Box.full(value.shape), True


def _dtensor_geometry(
    value: torch.Tensor,
) -> tuple[torch.Tensor, tuple[int, ...], Box, bool] | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    if not isinstance(value, DTensor):
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if any(p.is_partial() for p in value.placements):
        raise InvalidStateError(
            "a DTensor with Partial placement cannot be checkpointed: redistribute it to "
            "Shard/Replicate first"
        )
    local_shape, global_offset = compute_local_shape_and_global_offset(
        value.shape, value.device_mesh, value.placements
    )
    replicated = any(p.is_replicate() for p in value.placements)
    box = Box(tuple(int(o) for o in global_offset), tuple(int(n) for n in local_shape))
    return value.to_local(), tuple(value.shape), box, replicated


def state_tree(value: Any) -> Any:
    """The checkpointable tree of one top-level state entry."""
    if isinstance(value, nn.Module) or (
        hasattr(value, "state_dict")
        and hasattr(value, "load_state_dict")
        and not isinstance(value, torch.Tensor)
    ):
        return value.state_dict()
    return value


def flatten(state: Mapping[str, Any]) -> tuple[dict[str, FlatTensor], dict[str, Any]]:
    """Split ``state`` into its tensors (by fully-qualified name) and a JSON tree."""
    if not isinstance(state, Mapping):
        raise InvalidStateError(
            f"state must be a dict of name -> object, got {type(state).__name__}"
        )
    tensors: dict[str, FlatTensor] = {}
    tree: dict[str, Any] = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise InvalidStateError(f"top-level state keys must be strings, got {key!r}")
        tree[key] = _encode(state_tree(value), key, tensors)
    return tensors, tree


def join_path(path: str, key: Any) -> str:
    return f"{path}.{key}"


def _encode(value: Any, path: str, tensors: dict[str, FlatTensor]) -> Any:
    geometry = local_geometry(value)
    if geometry is not None:
        if path in tensors:
            raise InvalidStateError(f"two tensors in the state share the name {path!r}; rename one")
        local, global_shape, box, replicated = geometry
        try:
            name = dtype_name(local.dtype)
        except TypeError as exc:
            raise InvalidStateError(f"{path!r}: {exc}") from exc
        tensors[path] = FlatTensor(path, local.detach(), global_shape, box, replicated, name)
        return {TENSOR_REF: path}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise InvalidStateError(f"{path!r}: numpy arrays of objects cannot be checkpointed")
        ref = _encode(torch.from_numpy(np.ascontiguousarray(value)), path, tensors)
        return {NDARRAY_REF: ref[TENSOR_REF]}
    if isinstance(value, torch.dtype):
        return {DTYPE_REF: dtype_name(value)}
    if isinstance(value, (bytes, bytearray)):
        return {BYTES_REF: base64.b64encode(bytes(value)).decode()}
    if isinstance(value, Mapping):
        if all(isinstance(k, str) and k not in _MARKERS for k in value):
            return {k: _encode(v, join_path(path, k), tensors) for k, v in value.items()}
        items = []
        for k, v in value.items():
            if not isinstance(k, (str, int, bool, float)) and k is not None:
                raise InvalidStateError(
                    f"{path!r}: dict key {k!r} of type {type(k).__name__} cannot be stored"
                )
            items.append([k, _encode(v, join_path(path, k), tensors)])
        return {ITEMS_REF: items}
    if isinstance(value, tuple):
        return {TUPLE_REF: [_encode(v, join_path(path, i), tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, join_path(path, i), tensors) for i, v in enumerate(value)]
    raise InvalidStateError(
        f"{path!r}: values of type {type(value).__module__}.{type(value).__qualname__} cannot be "
        "checkpointed without pickle; convert it to tensors, numbers, strings, lists or dicts, "
        "or give it state_dict()/load_state_dict()"
    )
