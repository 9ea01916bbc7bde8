r"""Load a stored state tree into a live state: the way back from ``ckpt.engine._flatten``.

The stored tree is merged with the target's tree. A tensor reference meets either the
target's tensor (filled in place, shapes and dtypes checked) or nothing (a fresh tensor
is allocated, e.g. the moments of an optimizer that has not stepped yet). What to read
becomes ``recovery.Destination``\ s for the loader.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ckpt.engine._flatten import (
    BYTES_REF,
    DTYPE_REF,
    ITEMS_REF,
    NDARRAY_REF,
    TENSOR_REF,
    TUPLE_REF,
    ShardedTensor,
    join_path,
    local_geometry,
    state_tree,
)
from ckpt.errors import CorruptCheckpointError, StateMismatchError
from ckpt.format import Box, dtype_name, torch_dtype
from recovery import Destination


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
        plan.trees[key] = _merge(
            stored_tree[key], state_tree(value), key, stored_tensors, plan, allow_new
        )
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
            "the state does not match the checkpoint — "
            + " | ".join(problems)
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
    if isinstance(stored, dict) and (TENSOR_REF in stored or NDARRAY_REF in stored):
        name = stored.get(TENSOR_REF, stored.get(NDARRAY_REF))
        if not isinstance(name, str) or name not in stored_tensors:
            plan.mismatched.append(
                f"{path!r} refers to tensor {name!r}, which the checkpoint lacks"
            )
            return None
        dtype, shape = stored_tensors[name]
        geometry = local_geometry(target) if target is not _ABSENT else None
        if geometry is None:
            if target is _ABSENT and not allow_new:
                plan.unexpected.append(path)
                return _DROP
            if target is not _ABSENT and not allow_new:
                plan.mismatched.append(
                    f"{path!r} is a tensor in the checkpoint but {type(target).__name__} in the "
                    "state"
                )
                return None
            tensor = torch.empty(shape, dtype=torch_dtype(dtype))
            plan.destinations.append(Destination(name, tensor, Box.full(shape)))
            return tensor.numpy() if NDARRAY_REF in stored else tensor
        local, global_shape, box, _ = geometry
        problems = []
        if tuple(global_shape) != tuple(shape):
            problems.append(
                f"shape {list(shape)} in the checkpoint vs {list(global_shape)} in the state"
            )
        if dtype_name(local.dtype) != dtype:
            problems.append(
                f"dtype {dtype} in the checkpoint vs {dtype_name(local.dtype)} in the state"
            )
        if problems:
            plan.mismatched.append(f"{path!r}: " + ", ".join(problems))
            return target
        plan.destinations.append(Destination(name, local, box))
        return target
    if not allow_new and target is not _ABSENT and local_geometry(target) is not None:
        plan.mismatched.append(
            f"{path!r} is a tensor in the state but a {type(stored).__name__} in the checkpoint"
        )
        return target
    if isinstance(stored, dict) and TUPLE_REF in stored:
        items = stored[TUPLE_REF]
        if not isinstance(items, list):
            raise _malformed(path, stored)
        target_items = target if isinstance(target, (tuple, list)) else None
        return tuple(
            _merge(
                v,
                target_items[i] if target_items is not None and i < len(target_items) else _ABSENT,
                join_path(path, i),
                stored_tensors,
                plan,
                allow_new,
            )
            for i, v in enumerate(items)
        )
    if isinstance(stored, dict) and ITEMS_REF in stored:
        pairs = stored[ITEMS_REF]
        if not isinstance(pairs, list) or not all(
            isinstance(p, list)
            and len(p) == 2
            and (p[0] is None or isinstance(p[0], (str, int, float)))
            for p in pairs
        ):
            raise _malformed(path, stored)
        target_map = target if isinstance(target, Mapping) else {}
        out = {}
        for k, v in stored[ITEMS_REF]:
            merged = _merge(
                v, target_map.get(k, _ABSENT), join_path(path, k), stored_tensors, plan, allow_new
            )
            if merged is not _DROP:
                out[k] = merged
        _note_missing(
            target_map, stored_keys=[k for k, _ in stored[ITEMS_REF]], path=path, plan=plan
        )
        return out
    if isinstance(stored, dict) and BYTES_REF in stored:
        try:
            return base64.b64decode(stored[BYTES_REF], validate=True)
        except (TypeError, binascii.Error) as exc:
            raise _malformed(path, stored) from exc
    if isinstance(stored, dict) and DTYPE_REF in stored:
        if not isinstance(stored[DTYPE_REF], str):
            raise _malformed(path, stored)
        try:
            return torch_dtype(stored[DTYPE_REF])
        except CorruptCheckpointError as exc:
            raise _malformed(path, stored) from exc
    if isinstance(stored, dict):
        target_map = target if isinstance(target, Mapping) else {}
        out = {}
        for k, v in stored.items():
            merged = _merge(
                v, target_map.get(k, _ABSENT), join_path(path, k), stored_tensors, plan, allow_new
            )
            if merged is not _DROP:
                out[k] = merged
        _note_missing(target_map, stored_keys=list(stored), path=path, plan=plan)
        return out
    if isinstance(stored, list):
        target_items = target if isinstance(target, (list, tuple)) else None
        return [
            _merge(
                v,
                target_items[i] if target_items is not None and i < len(target_items) else _ABSENT,
                join_path(path, i),
                stored_tensors,
                plan,
                allow_new,
            )
            for i, v in enumerate(stored)
        ]
    return stored


def _malformed(path: str, stored: Any) -> CorruptCheckpointError:
    text = repr(stored)
    return CorruptCheckpointError(
        f"the checkpoint's state tree is malformed at {path!r}: "
        f"{text[:80]}{'...' if len(text) > 80 else ''}"
    )


def _note_missing(
    target: Mapping[Any, Any], *, stored_keys: list[Any], path: str, plan: LoadPlan
) -> None:
    known = set(stored_keys)
    for k, v in target.items():
        if k not in known and local_geometry(v) is not None:
            plan.missing.append(join_path(path, k))
