"""Turn a training state into named tensor pieces plus a JSON tree, and back.

Save: every top-level entry becomes a tree (a module's or optimizer's ``state_dict()``,
a tensor, or a plain value). Tensors are replaced by ``{"__tensor__": name}`` references
and collected under fully-qualified names; everything else must be JSON-representable.

Load: the stored tree is merged with the target's tree. A reference meets either the
target's tensor (filled in place, shapes and dtypes checked) or nothing (a fresh tensor
is allocated, e.g. the moments of an optimizer that has not stepped yet).
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ckpt._format import dtype_name, torch_dtype
from ckpt._geometry import Box
from ckpt.errors import CorruptCheckpointError, InvalidStateError, StateMismatchError

TENSOR_REF = "__tensor__"
_TUPLE = "__tuple__"
_ITEMS = "__items__"
_BYTES = "__bytes__"
_DTYPE = "__dtype__"
_NDARRAY = "__ndarray__"
_MARKERS = {TENSOR_REF, _TUPLE, _ITEMS, _BYTES, _DTYPE, _NDARRAY}


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
        return value.local, tuple(value.global_shape), Box(tuple(value.offsets), tuple(value.local.shape)), value.replicated
    if not isinstance(value, torch.Tensor):
        return None
    dtensor = _dtensor_geometry(value)
    if dtensor is not None:
        return dtensor
    return value, tuple(value.shape), Box.full(value.shape), True


def _dtensor_geometry(value: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], Box, bool] | None:
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
        hasattr(value, "state_dict") and hasattr(value, "load_state_dict") and not isinstance(value, torch.Tensor)
    ):
        return value.state_dict()
    return value


def flatten(state: Mapping[str, Any]) -> tuple[dict[str, FlatTensor], dict[str, Any]]:
    """Split ``state`` into its tensors (by fully-qualified name) and a JSON tree."""
    if not isinstance(state, Mapping):
        raise InvalidStateError(f"state must be a dict of name -> object, got {type(state).__name__}")
    tensors: dict[str, FlatTensor] = {}
    tree: dict[str, Any] = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise InvalidStateError(f"top-level state keys must be strings, got {key!r}")
        tree[key] = _encode(state_tree(value), key, tensors)
    return tensors, tree


def _join(path: str, key: Any) -> str:
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
        return {_NDARRAY: ref[TENSOR_REF]}
    if isinstance(value, torch.dtype):
        return {_DTYPE: dtype_name(value)}
    if isinstance(value, (bytes, bytearray)):
        return {_BYTES: base64.b64encode(bytes(value)).decode()}
    if isinstance(value, Mapping):
        if all(isinstance(k, str) and k not in _MARKERS for k in value):
            return {k: _encode(v, _join(path, k), tensors) for k, v in value.items()}
        items = []
        for k, v in value.items():
            if not isinstance(k, (str, int, bool, float)) and k is not None:
                raise InvalidStateError(f"{path!r}: dict key {k!r} of type {type(k).__name__} cannot be stored")
            items.append([k, _encode(v, _join(path, k), tensors)])
        return {_ITEMS: items}
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, _join(path, i), tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, _join(path, i), tensors) for i, v in enumerate(value)]
    raise InvalidStateError(
        f"{path!r}: values of type {type(value).__module__}.{type(value).__qualname__} cannot be "
        "checkpointed without pickle; convert it to tensors, numbers, strings, lists or dicts, "
        "or give it state_dict()/load_state_dict()"
    )


@dataclass
class Destination:
    """A tensor to fill on load, and the region of the global tensor it holds."""

    name: str
    tensor: torch.Tensor
    box: Box


@dataclass
class LoadPlan:
    """What loading a stored tree into a target needs: destinations, then rebuilt trees."""

    destinations: list[Destination] = field(default_factory=list)
    trees: dict[str, Any] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)


def plan_load(
    state: Mapping[str, Any],
    stored_tree: Mapping[str, Any],
    stored_tensors: Mapping[str, tuple[str, tuple[int, ...]]],
    *,
    strict: bool = True,
) -> LoadPlan:
    """Match the stored tree with ``state``; collect destinations and every mismatch.

    Args:
        state: the user's state (modules, optimizers, tensors, values).
        stored_tree: the manifest's ``state``.
        stored_tensors: name -> (dtype, global shape) for every stored tensor.
        strict: whether keys present on one side only are errors.

    Raises:
        StateMismatchError: listing missing and unexpected keys, shape and dtype mismatches.
    """
    plan = LoadPlan()
    for key, value in state.items():
        if key not in stored_tree:
            plan.missing.append(key)
            continue
        # Modules define their full state; other objects may lack state they had when saved.
        allow_new = not isinstance(value, (nn.Module, torch.Tensor, ShardedTensor))
        plan.trees[key] = _merge(stored_tree[key], state_tree(value), key, stored_tensors, plan, allow_new)
    plan.unexpected.extend(k for k in stored_tree if k not in state)
    problems = []
    if plan.mismatched:
        problems.append("mismatched: " + "; ".join(plan.mismatched))
    if strict and plan.missing:
        problems.append("missing from the checkpoint: " + ", ".join(plan.missing))
    if strict and plan.unexpected:
        problems.append("in the checkpoint but not in the state: " + ", ".join(plan.unexpected))
    if problems:
        raise StateMismatchError(
            "the state does not match the checkpoint — " + " | ".join(problems)
            + " (pass strict=False to ignore keys present on one side only)"
        )
    return plan


_ABSENT = object()
_DROP = object()


def _merge(
    stored: Any,
    target: Any,
    path: str,
    stored_tensors: Mapping[str, tuple[str, tuple[int, ...]]],
    plan: LoadPlan,
    allow_new: bool,
) -> Any:
    if isinstance(stored, dict) and (TENSOR_REF in stored or _NDARRAY in stored):
        name = stored.get(TENSOR_REF, stored.get(_NDARRAY))
        if not isinstance(name, str) or name not in stored_tensors:
            plan.mismatched.append(f"{path!r} refers to tensor {name!r}, which the checkpoint lacks")
            return None
        dtype, shape = stored_tensors[name]
        geometry = local_geometry(target) if target is not _ABSENT else None
        if geometry is None:
            if target is _ABSENT and not allow_new:
                plan.unexpected.append(path)
                return _DROP
            if target is not _ABSENT and not allow_new:
                plan.mismatched.append(f"{path!r} is a tensor in the checkpoint but {type(target).__name__} in the state")
                return None
            tensor = torch.empty(shape, dtype=torch_dtype(dtype))
            plan.destinations.append(Destination(name, tensor, Box.full(shape)))
            return tensor.numpy() if _NDARRAY in stored else tensor
        local, global_shape, box, _ = geometry
        problems = []
        if tuple(global_shape) != tuple(shape):
            problems.append(f"shape {list(shape)} in the checkpoint vs {list(global_shape)} in the state")
        if dtype_name(local.dtype) != dtype:
            problems.append(f"dtype {dtype} in the checkpoint vs {dtype_name(local.dtype)} in the state")
        if problems:
            plan.mismatched.append(f"{path!r}: " + ", ".join(problems))
            return target
        plan.destinations.append(Destination(name, local, box))
        return target
    if not allow_new and target is not _ABSENT and local_geometry(target) is not None:
        plan.mismatched.append(f"{path!r} is a tensor in the state but a {type(stored).__name__} in the checkpoint")
        return target
    if isinstance(stored, dict) and _TUPLE in stored:
        items = stored[_TUPLE]
        if not isinstance(items, list):
            raise _malformed(path, stored)
        target_items = target if isinstance(target, (tuple, list)) else None
        return tuple(
            _merge(v, target_items[i] if target_items is not None and i < len(target_items) else _ABSENT,
                   _join(path, i), stored_tensors, plan, allow_new)
            for i, v in enumerate(items)
        )
    if isinstance(stored, dict) and _ITEMS in stored:
        pairs = stored[_ITEMS]
        if not isinstance(pairs, list) or not all(
            isinstance(p, list) and len(p) == 2 and (p[0] is None or isinstance(p[0], (str, int, float)))
            for p in pairs
        ):
            raise _malformed(path, stored)
        target_map = target if isinstance(target, Mapping) else {}
        out = {}
        for k, v in stored[_ITEMS]:
            merged = _merge(v, target_map.get(k, _ABSENT), _join(path, k), stored_tensors, plan, allow_new)
            if merged is not _DROP:
                out[k] = merged
        _note_missing(target_map, stored_keys=[k for k, _ in stored[_ITEMS]], path=path, plan=plan)
        return out
    if isinstance(stored, dict) and _BYTES in stored:
        try:
            return base64.b64decode(stored[_BYTES], validate=True)
        except (TypeError, binascii.Error) as exc:
            raise _malformed(path, stored) from exc
    if isinstance(stored, dict) and _DTYPE in stored:
        if not isinstance(stored[_DTYPE], str):
            raise _malformed(path, stored)
        try:
            return torch_dtype(stored[_DTYPE])
        except CorruptCheckpointError as exc:
            raise _malformed(path, stored) from exc
    if isinstance(stored, dict):
        target_map = target if isinstance(target, Mapping) else {}
        out = {}
        for k, v in stored.items():
            merged = _merge(v, target_map.get(k, _ABSENT), _join(path, k), stored_tensors, plan, allow_new)
            if merged is not _DROP:
                out[k] = merged
        _note_missing(target_map, stored_keys=list(stored), path=path, plan=plan)
        return out
    if isinstance(stored, list):
        target_items = target if isinstance(target, (list, tuple)) else None
        return [
            _merge(v, target_items[i] if target_items is not None and i < len(target_items) else _ABSENT,
                   _join(path, i), stored_tensors, plan, allow_new)
            for i, v in enumerate(stored)
        ]
    return stored


def _malformed(path: str, stored: Any) -> CorruptCheckpointError:
    text = repr(stored)
    return CorruptCheckpointError(
        f"the checkpoint's state tree is malformed at {path!r}: {text[:80]}{'...' if len(text) > 80 else ''}"
    )


def _note_missing(target: Mapping[Any, Any], *, stored_keys: list[Any], path: str, plan: LoadPlan) -> None:
    known = set(stored_keys)
    for k, v in target.items():
        if k not in known and local_geometry(v) is not None:
            plan.missing.append(_join(path, k))


def nbytes_of(shape: tuple[int, ...], dtype: str) -> int:
    return math.prod(shape) * torch_dtype(dtype).itemsize
