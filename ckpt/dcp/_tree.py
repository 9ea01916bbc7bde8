"""Between DCP's flat keys and ckpt's JSON state tree, both ways.

DCP flattens a state dict into fully-qualified keys (``"optim.state.0.exp_avg"``) and keeps
each key's path (``("optim", "state", "0", "exp_avg")``) in the global metadata's
``planner_data``: dict keys become strings, list indices stay integers, and tuples, empty
lists and other leaves become one value each (saved as bytes); an empty dict becomes
nothing. ckpt stores the nested tree itself, with ``{"__tensor__": name}`` for each
tensor, under the same dotted names.

This is the one place that maps DCP's keys back to a tree, for both ``Writer`` (the keys of
a save in progress) and ``import_dcp`` (the keys of a DCP checkpoint on disk):

* ``dcp_paths`` reads each key's path from DCP's metadata;
* ``encode_value`` turns one value DCP would pickle into its JSON (or refuses it);
* ``rebuild_tree`` nests the keys back into the tree a ``ckpt.save`` of the same state
  would have stored, giving an optimizer's ``state`` its integer keys back;
* ``decode_tree`` turns a stored tree back into Python values, with stand-ins for tensors,
  so that DCP's own flattening gives the keys its planner will ask for.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, cast

import torch
from torch.distributed.checkpoint.metadata import Metadata

from ckpt.engine import flatten
from ckpt.errors import CheckpointError, CorruptCheckpointError, InvalidStateError
from ckpt.format import (
    BYTES_REF,
    DTYPE_REF,
    ITEMS_REF,
    NDARRAY_REF,
    STATE_MARKERS,
    TENSOR_REF,
    TUPLE_REF,
    torch_dtype,
)

Path = tuple[str | int, ...]


class _LeftOut:
    def __repr__(self) -> str:
        return "LEFT_OUT"


LEFT_OUT: Final = _LeftOut()
"""A leaf value for ``rebuild_tree`` that was saved but is not kept (DCP pickled it, and
it was not, or could not be, imported)."""


def dcp_paths(metadata: Metadata) -> dict[str, Path]:
    """Each flat key's path in the saved tree, in the metadata's order.

    DCP's planner records the paths in ``planner_data``; a key without a valid recorded
    path (no planner data, or a planner that flattens nothing) stays a top-level key.
    """
    recorded = metadata.planner_data if isinstance(metadata.planner_data, Mapping) else {}
    paths: dict[str, Path] = {}
    for fqn in metadata.state_dict_metadata:
        path = recorded.get(fqn)
        valid = (
            isinstance(path, tuple)
            and path
            and isinstance(path[0], str)
            and all(isinstance(p, str) or (type(p) is int and p >= 0) for p in path)
        )
        paths[fqn] = cast(Path, path) if valid else (fqn,)
    return paths


def encode_value(fqn: str, value: Any, where: str) -> Any:
    """The JSON of a value DCP saves as bytes (``WriteItemType.BYTE_IO``).

    Args:
        fqn: the value's flat key.
        value: the value.
        where: what is being done, for the error message (``"dcp.save with ckpt.dcp.Writer"``).

    Raises:
        InvalidStateError: the value is not JSON-representable (ckpt stores no pickle), or
            holds tensors or arrays inside a value DCP saves whole.
    """
    try:
        tensors, tree = flatten({fqn: value})
    except InvalidStateError as exc:
        raise InvalidStateError(
            f"{where} (ckpt stores no pickle, values go to JSON): {exc}"
        ) from exc
    if tensors:
        raise InvalidStateError(
            f"{where}: {fqn!r} is a {type(value).__name__} holding tensors or arrays "
            f"({', '.join(sorted(tensors)[:3])}), which DCP saves whole as pickled bytes (a "
            "tuple, or any container when the planner does not flatten the state dict) and "
            "ckpt stores no pickle; hold the tensors in dicts or lists, and keep DCP's "
            "flatten_state_dict=True"
        )
    return tree[fqn]


@dataclass(frozen=True)
class _Leaf:
    json: Any


_Node = dict[str | int, Any]  # children: _Node, _Leaf or LEFT_OUT
_GONE: Final = object()  # what a node of nothing but left-out values becomes
_INDEX = re.compile(r"0|[1-9][0-9]*")


def rebuild_tree(
    leaves: Iterable[tuple[Path, Any]], fail: Callable[[str], CheckpointError]
) -> dict[str, Any]:
    """The nested JSON tree of a state from its flat leaves: (DCP path, JSON value or
    ``LEFT_OUT``), in DCP's order.

    Integer path components are list indices. A list index that no leaf reaches held an
    empty dict (DCP saves nothing for those): it becomes ``{}``. A left-out value becomes
    None in a list (which keeps its length) and is absent from a dict; a container of
    nothing but left-out values is left out itself. An optimizer's per-parameter
    ``state``, whose integer keys DCP turned into strings, gets them back
    (``_optimizer_keys``).

    Args:
        leaves: (path, JSON value or ``LEFT_OUT``) of every flat key.
        fail: makes the error for leaves that do not form one tree (its message given).

    Raises:
        CheckpointError: ``fail``'s, when two keys collide or a path does not fit the others.
    """
    root: _Node = {}
    for path, value in leaves:
        _place(root, path, value if value is LEFT_OUT else _Leaf(value), fail)
    tree = _to_json(root) if root else {}
    return tree if isinstance(tree, dict) else {}


def _place(root: _Node, path: Path, value: Any, fail: Callable[[str], CheckpointError]) -> None:
    node = root
    for depth, part in enumerate(path):
        if node and isinstance(next(iter(node)), int) != isinstance(part, int):
            raise fail(
                f"{_dotted(path)!r} does not fit the tree of the other keys (a list index "
                "where they have dict keys, or the reverse)"
            )
        if depth == len(path) - 1:
            break
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise fail(
                f"{_dotted(path[: depth + 1])!r} is both a value and a container of "
                f"{_dotted(path)!r}; the flattened keys collide"
            )
        node = child
    if path[-1] in node:
        raise fail(f"two entries of the state flatten to {_dotted(path)!r}; rename one")
    node[path[-1]] = value


def _dotted(path: Path) -> str:
    return ".".join(map(str, path))


def _to_json(node: Any) -> Any:
    if isinstance(node, _Leaf):
        return node.json
    if node is LEFT_OUT:
        return _GONE
    children = {k: _to_json(v) for k, v in node.items()}
    if all(v is _GONE for v in children.values()):
        return _GONE
    if isinstance(next(iter(children)), int):
        items: list[Any] = [{} for _ in range(max(children) + 1)]
        for index, child in children.items():
            items[index] = None if child is _GONE else child
        return items
    out = {str(k): v for k, v in children.items() if v is not _GONE}
    if "param_groups" in children:
        _optimizer_keys(out)
    if out.keys() & STATE_MARKERS:
        return {ITEMS_REF: [[k, v] for k, v in out.items()]}
    return out


def _optimizer_keys(node: dict[str, Any]) -> None:
    """Give an optimizer state dict's ``state`` its integer keys back, and its ``state``
    when DCP dropped it for being empty (an optimizer that never stepped).

    ``node`` had a ``param_groups`` when saved (perhaps left out since). It is taken for
    an optimizer's (what ``torch.optim.Optimizer.state_dict()`` makes, and what
    ``Optimizer.load_state_dict`` needs back) when every key of its ``state`` is a
    non-negative integer in canonical decimal and, where the groups' ``params`` are kept,
    those are lists of integers that include every key.
    """
    ids: set[int] | None = None  # None: the groups' params were left out
    if "param_groups" in node:
        groups = node["param_groups"]
        if not isinstance(groups, list) or not groups:
            return
        known: set[int] = set()
        complete = True
        for group in groups:
            if group is None or (isinstance(group, dict) and "params" not in group):
                complete = False  # that group, or its params, left out
                continue
            params = group.get("params") if isinstance(group, dict) else None
            if not isinstance(params, list) or not all(type(p) is int for p in params):
                return
            known.update(params)
        ids = known if complete else None
    if ids is not None:
        node.setdefault("state", {})
    state = node.get("state")
    if not isinstance(state, dict) or not state or state.keys() & STATE_MARKERS:
        return
    if all(_INDEX.fullmatch(k) and (ids is None or int(k) in ids) for k in state):
        node["state"] = {ITEMS_REF: [[int(k), v] for k, v in state.items()]}


@dataclass(frozen=True)
class ArrayRef:
    """Where a stored tree holds a numpy array: the name of the tensor holding its data."""

    name: str


class TensorStandIns:
    """Meta tensors standing for stored tensors while a stored tree is flattened DCP's way.

    DCP's flattening looks into a list only when it holds tensors, so the stand-ins must be
    tensors; they hold no memory.
    """

    def __init__(self, stored: Mapping[str, tuple[str, tuple[int, ...]]]) -> None:
        self._stored = stored
        self._names: dict[int, str] = {}
        self._keep: list[torch.Tensor] = []

    def make(self, name: str) -> torch.Tensor:
        dtype, shape = self._stored[name]
        tensor = torch.empty(shape, dtype=torch_dtype(dtype), device="meta")
        self._names[id(tensor)] = name
        self._keep.append(tensor)
        return tensor

    def knows(self, name: Any) -> bool:
        return isinstance(name, str) and name in self._stored

    def name_of(self, value: Any) -> str | None:
        """The stored name of a stand-in, else None."""
        if isinstance(value, torch.Tensor):
            return self._names.get(id(value))
        return None


def decode_tree(node: Any, tensors: TensorStandIns, where: str) -> Any:
    """A stored tree as Python values: tuples, int-keyed dicts, bytes and dtypes as they were
    saved, tensors as ``tensors``' stand-ins and numpy arrays as ``ArrayRef``.

    The manifest reader has checked the markers' shapes; a reference to a tensor the
    manifest lacks is still refused here.
    """
    if isinstance(node, list):
        return [decode_tree(v, tensors, where) for v in node]
    if not isinstance(node, dict):
        return node
    if TENSOR_REF in node:
        return tensors.make(_stored_name(node[TENSOR_REF], tensors, where))
    if NDARRAY_REF in node:
        return ArrayRef(_stored_name(node[NDARRAY_REF], tensors, where))
    if TUPLE_REF in node:
        return tuple(decode_tree(v, tensors, where) for v in node[TUPLE_REF])
    if ITEMS_REF in node:
        return {k: decode_tree(v, tensors, where) for k, v in node[ITEMS_REF]}
    if BYTES_REF in node:
        return base64.b64decode(node[BYTES_REF])
    if DTYPE_REF in node:
        return torch_dtype(node[DTYPE_REF])
    return {k: decode_tree(v, tensors, where) for k, v in node.items()}


def _stored_name(name: Any, tensors: TensorStandIns, where: str) -> str:
    if not isinstance(name, str) or not tensors.knows(name):
        raise CorruptCheckpointError(
            f"{where}: the state tree refers to tensor {name!r}, which the manifest lacks"
        )
    return name
