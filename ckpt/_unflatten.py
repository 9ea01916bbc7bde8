r"""Load a stored state tree into a live state: the way back from ``ckpt.engine._flatten``.

The stored tree is merged with the target's tree. A tensor reference meets either the
target's tensor (filled in place, shapes and dtypes checked) or nothing (a fresh tensor
is allocated, e.g. the moments of an optimizer that has not stepped yet). What to read
becomes ``recovery.Destination``\ s for the loader.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ckpt.engine._flatten import (
    BYTES_REF,
    DTYPE_REF,
    ITEMS_REF,
    MAX_DEPTH,
    NDARRAY_REF,
    TENSOR_REF,
    TUPLE_REF,
    ShardedTensor,
    join_path,
    local_geometry,
    plain_name,
    state_tree,
)
from ckpt.errors import CorruptCheckpointError, StateMismatchError
from ckpt.format import Box, dtype_name, torch_dtype
from recovery import Destination

log = logging.getLogger(__name__)


@dataclass
class LoadPlan:
    """What loading a stored tree into a target needs: destinations, then rebuilt trees.

    Attributes:
        destinations: the tensor regions to read, and where they go.
        trees: per top-level key, the tree to put into the state.
        missing: tensors of the state that the checkpoint lacks.
        unexpected: keys of the checkpoint that the state lacks.
        mismatched: tensors whose shape or dtype differ (always an error).
        conflicts: places where one side holds a tensor and the other a value of another
            kind (an error when strict; otherwise the state keeps its own value).
        values: how many plain values (numbers, strings, bytes, dtypes) of the checkpoint
            the load puts into the state.
        elsewhere: keys of the checkpoint that the state lacks where the saving ranks held
            different keys (``Manifest.partial_maps``: another pipeline stage's): not loaded
            here, and not an error.
    """

    destinations: list[Destination] = field(default_factory=list)
    trees: dict[str, Any] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    values: int = 0
    elsewhere: list[str] = field(default_factory=list)

    @property
    def loads_nothing(self) -> bool:
        """Whether no tensor and no plain value of the checkpoint reaches the state."""
        return not self.destinations and self.values == 0


def plan_load(
    state: Mapping[str, Any],
    stored_tree: Mapping[str, Any],
    stored_tensors: Mapping[str, tuple[str, tuple[int, ...]]],
    *,
    strict: bool = True,
    partial_maps: Iterable[Sequence[str]] = (),
) -> LoadPlan:
    """Match the stored tree with ``state``; collect destinations and every mismatch.

    Nothing in ``state`` is touched here: a load that would fail fails before any byte
    is copied into it.

    Args:
        state: the user's state (modules, optimizers, tensors, values).
        stored_tree: the manifest's ``state``.
        stored_tensors: name -> (dtype, global shape) for every stored tensor.
        strict: whether keys present on one side only, and a tensor on one side where
            the other holds a value of another kind, are errors. Without it the state
            keeps its own tensors (and values) there, and the keys are logged.
        partial_maps: the manifest's mappings whose keys the saving ranks held in part
            (pipeline stages): keys there that ``state`` lacks are another rank's, left alone.

    Raises:
        StateMismatchError: listing missing and unexpected keys, tensors meeting values of
            another kind, shape and dtype mismatches.
    """
    plan = LoadPlan()
    partial = {_joined(p) for p in partial_maps}
    for key, value in state.items():
        if key not in stored_tree:
            plan.missing.append(key)
            continue
        # Modules define their full state; other objects may lack state they had when saved.
        allow_new = not isinstance(value, (nn.Module, torch.Tensor, ShardedTensor))
        target = state_tree(value)
        stored = stored_tree[key]
        if isinstance(value, nn.Module):
            stored = _plain_names(stored)  # written before compiled names were left out
        whole = {join_path(key, ".".join(p)) for p in _saved_maps(value)}
        merged = _Merge(stored_tensors, plan, allow_new, whole, partial).merge(stored, target, key)
        if isinstance(value, torch.optim.Optimizer):
            _check_param_groups(key, merged, target, plan)
        plan.trees[key] = merged
    others = plan.elsewhere if "" in partial else plan.unexpected
    others.extend(k for k in stored_tree if k not in state)
    problems = []
    if plan.mismatched:
        problems.append("mismatched: " + "; ".join(plan.mismatched))
    if strict and plan.conflicts:
        problems.append("kind mismatch: " + "; ".join(plan.conflicts))
    if strict and plan.missing:
        problems.append("missing from the checkpoint: " + ", ".join(plan.missing))
    if strict and plan.unexpected:
        problems.append("in the checkpoint but not in the state: " + ", ".join(plan.unexpected))
    if problems:
        raise StateMismatchError(
            "the state does not match the checkpoint — "
            + " | ".join(problems)
            + " (pass strict=False to keep the state's own value where only one side has a "
            "key or a tensor)"
        )
    if plan.conflicts:
        log.warning(
            "strict=False: kept the state's own value where the checkpoint holds another kind: %s",
            "; ".join(plan.conflicts),
        )
    if plan.missing:
        log.warning(
            "strict=False: %d key(s) of the state are missing from the checkpoint and keep "
            "their current values: %s",
            len(plan.missing),
            _listed(plan.missing),
        )
    if plan.unexpected:
        log.warning(
            "strict=False: %d key(s) of the checkpoint are not in the state and were not "
            "loaded: %s",
            len(plan.unexpected),
            _listed(plan.unexpected),
        )
    if plan.elsewhere:
        log.info(
            "%d key(s) of the checkpoint belong to other ranks' parts of the state (e.g. "
            "other pipeline stages) and were not loaded here: %s",
            len(plan.elsewhere),
            _listed(plan.elsewhere),
        )
    if plan.loads_nothing and (plan.missing or plan.unexpected or plan.conflicts):
        log.warning(
            "strict=False: nothing was loaded — no tensor and no value of the checkpoint "
            "matches the state (state keys: %s; checkpoint keys: %s); check the names "
            "(e.g. a prefix such as 'module.')",
            _listed(list(state)),
            _listed(list(stored_tree)),
        )
    return plan


def decode_tree(
    stored_tree: Mapping[str, Any],
    stored_tensors: Mapping[str, tuple[str, tuple[int, ...]]],
) -> tuple[dict[str, Any], list[Destination]]:
    """The stored tree as the values that were saved, without a target to load into.

    Markers are decoded (tuples, bytes, dtypes, numpy arrays, mappings with keys that are
    not strings); every tensor reference becomes a freshly allocated CPU tensor of the
    stored global shape and dtype, one per stored tensor however many names refer to it
    (tied weights stay tied).

    Returns:
        (the tree, the destinations that fill its tensors: read them before use).

    Raises:
        CorruptCheckpointError: the tree refers to a tensor that is not stored, or is malformed.
    """
    plan = LoadPlan()
    tree: dict[str, Any] = {}
    fresh: dict[str, torch.Tensor] = {}
    for key, stored in stored_tree.items():
        tree[key] = _Merge(stored_tensors, plan, True, fresh=fresh).merge(stored, _ABSENT, key)
    if plan.mismatched:
        raise CorruptCheckpointError("the checkpoint's state tree " + "; ".join(plan.mismatched))
    return tree, plan.destinations


def _listed(names: list[str], limit: int = 20) -> str:
    """``names`` for a log line: the first ``limit`` of them, and how many more."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _joined(path: Sequence[str]) -> str:
    """A stored key path as the load names places (``join_path``); "" for the root."""
    return ".".join(path)


def _saved_maps(value: Any) -> tuple[tuple[str, ...], ...]:
    """The paths inside ``value``'s state whose saved keys replace the live ones: an
    optimizer's per-parameter ``state`` (a parameter without saved state has none after
    ``load_state_dict``); an object may name its own in ``checkpoint_saved_maps``."""
    if isinstance(value, torch.optim.Optimizer):
        return (("state",),)
    named = getattr(value, "checkpoint_saved_maps", ())
    if isinstance(named, tuple) and all(
        isinstance(p, tuple) and all(isinstance(c, str) for c in p) for p in named
    ):
        return named
    return ()


def _plain_names(stored: Any) -> Any:
    """A module's stored tree under names without torch.compile's ``_orig_mod``."""
    if not isinstance(stored, dict) or stored.keys() & _VALUE_MARKERS:
        return stored
    return {plain_name(k): v for k, v in stored.items()}


def module_names(module: nn.Module, tree: Any) -> Any:
    """``tree`` (a module's state under plain names) under the names ``module.state_dict()``
    uses: a compiled module (or compiled submodule) gets its ``_orig_mod`` components back."""
    if not isinstance(tree, dict):
        return tree
    names = {plain_name(n): n for n in module.state_dict(keep_vars=True)}
    if all(plain == name for plain, name in names.items()):
        return tree
    return {names.get(k, k): v for k, v in tree.items()}


_ABSENT = object()
_DROP = object()


@dataclass
class _Merge:
    """Merges one top-level entry's stored tree with the target's, recording into ``plan``.

    Attributes:
        allow_new: whether the target may lack stored tensors (fresh ones are allocated,
            e.g. the moments of an optimizer that never stepped); modules may not.
        saved_maps: paths of mappings whose keys the checkpoint defines: keys only the
            target holds there are dropped, not missing (an optimizer's per-parameter state).
        partial: paths of mappings whose keys the saving ranks held in part: keys only the
            checkpoint holds there are another rank's (``LoadPlan.elsewhere``).
        fresh: the tensors allocated where the target has none, by stored name.
    """

    stored_tensors: Mapping[str, tuple[str, tuple[int, ...]]]
    plan: LoadPlan
    allow_new: bool
    saved_maps: set[str] = field(default_factory=set)
    partial: set[str] = field(default_factory=set)
    fresh: dict[str, torch.Tensor] = field(default_factory=dict)

    def merge(self, stored: Any, target: Any, path: str) -> Any:
        clash = _kind_clash(stored, target, self.allow_new)
        if clash is not None:
            self.plan.conflicts.append(f"{path!r} is {clash}")
            return target  # kept when not strict; strict raises before anything is applied
        if _is_tensor_ref(stored):
            return self._tensor(stored, target, path)
        if isinstance(stored, dict) and TUPLE_REF in stored:
            items = stored[TUPLE_REF]
            if not isinstance(items, list):
                raise _malformed(path, stored)
            return tuple(self._sequence(items, target, path))
        if isinstance(stored, dict) and ITEMS_REF in stored:
            pairs = stored[ITEMS_REF]
            if not isinstance(pairs, list) or not all(
                isinstance(p, list)
                and len(p) == 2
                and (p[0] is None or isinstance(p[0], (str, int, float)))
                for p in pairs
            ):
                raise _malformed(path, stored)
            return self._mapping([(k, v) for k, v in pairs], target, path)
        if isinstance(stored, dict) and BYTES_REF in stored:
            try:
                data = base64.b64decode(stored[BYTES_REF], validate=True)
            except (TypeError, binascii.Error) as exc:
                raise _malformed(path, stored) from exc
            self.plan.values += 1
            return data
        if isinstance(stored, dict) and DTYPE_REF in stored:
            if not isinstance(stored[DTYPE_REF], str):
                raise _malformed(path, stored)
            try:
                dtype = torch_dtype(stored[DTYPE_REF])
            except CorruptCheckpointError as exc:
                raise _malformed(path, stored) from exc
            self.plan.values += 1
            return dtype
        if isinstance(stored, dict):
            return self._mapping(list(stored.items()), target, path)
        if isinstance(stored, list):
            return self._sequence(stored, target, path)
        self.plan.values += 1
        return stored

    def _tensor(self, stored: dict[str, Any], target: Any, path: str) -> Any:
        name = stored.get(TENSOR_REF, stored.get(NDARRAY_REF))
        if not isinstance(name, str) or name not in self.stored_tensors:
            self.plan.mismatched.append(
                f"{path!r} refers to tensor {name!r}, which the checkpoint lacks"
            )
            return None
        dtype, shape = self.stored_tensors[name]
        geometry = local_geometry(target) if target is not _ABSENT else None
        if geometry is None:
            if not self.allow_new:
                self.plan.unexpected.append(path)
                return _DROP
            tensor = self.fresh.get(name)
            if tensor is None:  # one tensor for every name tied to it
                tensor = self.fresh[name] = torch.empty(shape, dtype=torch_dtype(dtype))
                self.plan.destinations.append(Destination(name, tensor, Box.full(shape)))
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
            self.plan.mismatched.append(f"{path!r}: " + ", ".join(problems))
            return target
        self.plan.destinations.append(Destination(name, local, box))
        return target

    def _sequence(self, stored: list[Any], target: Any, path: str) -> list[Any]:
        items = target if isinstance(target, (tuple, list)) else ()
        return [
            self.merge(v, items[i] if i < len(items) else _ABSENT, join_path(path, i))
            for i, v in enumerate(stored)
        ]

    def _mapping(self, stored: list[tuple[Any, Any]], target: Any, path: str) -> dict[Any, Any]:
        target_map = target if isinstance(target, Mapping) else {}
        out = {}
        elsewhere = path in self.partial and isinstance(target, Mapping)
        for k, v in stored:
            if elsewhere and k not in target_map:
                self.plan.elsewhere.append(join_path(path, k))
                continue
            merged = self.merge(v, target_map.get(k, _ABSENT), join_path(path, k))
            if merged is not _DROP:
                out[k] = merged
        if path in self.saved_maps:
            return out
        known = {k for k, _ in stored}
        for k, v in target_map.items():
            if k in known:
                continue
            below = _tensor_paths(v, join_path(path, k))
            if below:
                # A tensor only the state has is missing (an error when strict); without
                # strict the state keeps it.
                self.plan.missing.extend(below)
                out[k] = v
        return out


def _is_tensor_ref(stored: Any) -> bool:
    return isinstance(stored, dict) and (TENSOR_REF in stored or NDARRAY_REF in stored)


def _kind_clash(stored: Any, target: Any, allow_new: bool) -> str | None:
    """How ``stored`` and ``target`` differ in kind where a tensor is involved, else None.

    A tensor meets a tensor; a stored tensor may also replace None or a numpy array (or
    be allocated where the target has nothing, when ``allow_new``); a target container
    holding tensors meets a stored container of its kind. Plain values replace plain values.
    """
    if target is _ABSENT:
        return None
    target_is_tensor = local_geometry(target) is not None
    if _is_tensor_ref(stored):
        if target_is_tensor:
            return None
        if allow_new and (target is None or isinstance(target, np.ndarray)):
            return None
        return f"a tensor in the checkpoint but {_kind(target)} in the state"
    if target_is_tensor:
        return f"a tensor in the state but {_stored_kind(stored)} in the checkpoint"
    if isinstance(target, Mapping):
        fits = isinstance(stored, dict) and not (stored.keys() & _VALUE_MARKERS)
    elif isinstance(target, (list, tuple)):
        fits = isinstance(stored, list) or (isinstance(stored, dict) and TUPLE_REF in stored)
    else:
        return None
    if fits or not _tensor_paths(target, ""):
        return None
    return (
        f"{_kind(target)} holding tensors in the state but {_stored_kind(stored)} in the checkpoint"
    )


# Markers of stored values that are not mappings.
_VALUE_MARKERS = {TENSOR_REF, NDARRAY_REF, TUPLE_REF, BYTES_REF, DTYPE_REF}


def _kind(value: Any) -> str:
    if value is None:
        return "None"
    return f"a {type(value).__name__}"


def _stored_kind(stored: Any) -> str:
    if isinstance(stored, dict):
        for marker, kind in (
            (TUPLE_REF, "a tuple"),
            (BYTES_REF, "bytes"),
            (DTYPE_REF, "a dtype"),
        ):
            if marker in stored:
                return kind
        return "a dict"
    return _kind(stored)


def _tensor_paths(value: Any, path: str, _open: frozenset[int] = frozenset()) -> list[str]:
    """The names of the tensors in ``value`` (a tensor or containers of them)."""
    if local_geometry(value) is not None:
        return [path]
    # Deeper than anything that can have been saved, or a container inside itself.
    if len(_open) >= MAX_DEPTH or id(value) in _open:
        return []
    if isinstance(value, Mapping):
        children: Any = value.items()
    elif isinstance(value, (list, tuple)):
        children = enumerate(value)
    else:
        return []
    inside = _open | {id(value)}
    return [p for k, v in children for p in _tensor_paths(v, join_path(path, k), inside)]


def _check_param_groups(key: str, merged: Any, target: Any, plan: LoadPlan) -> None:
    """What ``Optimizer.load_state_dict`` would refuse, found before anything is loaded."""
    stored_groups = merged.get("param_groups") if isinstance(merged, dict) else None
    target_groups = target.get("param_groups") if isinstance(target, Mapping) else None
    if not isinstance(stored_groups, list) or not isinstance(target_groups, list):
        return
    if len(stored_groups) != len(target_groups):
        plan.mismatched.append(
            f"{key!r}: {len(stored_groups)} parameter groups in the checkpoint vs "
            f"{len(target_groups)} in the optimizer"
        )
        return
    for i, (saved, mine) in enumerate(zip(stored_groups, target_groups)):
        n_saved = _param_count(saved)
        n_mine = _param_count(mine)
        if n_saved != n_mine:
            plan.mismatched.append(
                f"{key!r}: parameter group {i} holds {n_saved} parameters in the checkpoint "
                f"vs {n_mine} in the optimizer"
            )


def _param_count(group: Any) -> int:
    """How many parameters a parameter group lists; -1 when it is not one."""
    params = group.get("params", ()) if isinstance(group, Mapping) else None
    return len(params) if isinstance(params, (list, tuple)) else -1


def _malformed(path: str, stored: Any) -> CorruptCheckpointError:
    text = repr(stored)
    return CorruptCheckpointError(
        f"the checkpoint's state tree is malformed at {path!r}: "
        f"{text[:80]}{'...' if len(text) > 80 else ''}"
    )
