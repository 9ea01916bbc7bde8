"""Between DCP's flat keys and ckpt's JSON state tree, both ways.

DCP flattens a state dict into fully-qualified keys (``"optim.state.0.exp_avg"``) and keeps
each key's path (``("optim", "state", "0", "exp_avg")``) in the global metadata's
``planner_data``: dict keys become strings, list indices stay integers, and tuples, empty
lists and other leaves become one value each (saved as bytes). ckpt stores the nested tree
itself, with ``{"__tensor__": name}`` for each tensor, under the same dotted names.

* ``encode_value`` turns one value DCP would pickle into its JSON (or refuses it);
* ``rebuild_tree`` nests the flat keys back into the tree a ``ckpt.save`` of the same state
  would have stored;
* ``decode_tree`` turns a stored tree back into Python values, with stand-ins for tensors,
  so that DCP's own flattening gives the keys its planner will ask for.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ckpt.engine import flatten
from ckpt.errors import CorruptCheckpointError, InvalidStateError
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


def encode_value(fqn: str, value: Any) -> Any:
    """The JSON of a value DCP saves as bytes (``WriteItemType.BYTE_IO``).

    Raises:
        InvalidStateError: the value is not JSON-representable (ckpt stores no pickle), or
            holds tensors or arrays inside a value DCP saves whole.
    """
    try:
        tensors, tree = flatten({fqn: value})
    except InvalidStateError as exc:
        raise InvalidStateError(
            f"dcp.save with ckpt.dcp.Writer (ckpt stores no pickle, values go to JSON): {exc}"
        ) from exc
    if tensors:
        raise InvalidStateError(
            f"dcp.save with ckpt.dcp.Writer: {fqn!r} is a {type(value).__name__} holding "
            f"tensors or arrays ({', '.join(sorted(tensors)[:3])}), which DCP saves whole as "
            "pickled bytes (a tuple, or any container when the planner does not flatten the "
            "state dict) and ckpt stores no pickle; hold the tensors in dicts or lists, and "
            "keep DCP's flatten_state_dict=True"
        )
    return tree[fqn]


@dataclass(frozen=True)
class _Leaf:
    json: Any


def rebuild_tree(leaves: Iterable[tuple[Path, Any]]) -> dict[str, Any]:
    """The nested JSON tree of a state from its flat leaves: (DCP path, JSON value).

    Integer path components are list indices; a list index that no leaf reaches was an
    empty dict (DCP saves nothing for those). An optimizer's per-parameter ``state``,
    whose integer keys DCP turned into strings, gets them back (``_optimizer_keys``).
    """
    root: dict[str | int, Any] = {}
    for path, value in leaves:
        node = root
        for depth, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if isinstance(child, _Leaf):
                raise InvalidStateError(
                    f"dcp.save with ckpt.dcp.Writer: {_dotted(path[: depth + 1])!r} is both a "
                    f"value and a container of {_dotted(path)!r}; the flattened keys collide"
                )
            node = child
        if path[-1] in node:
            raise InvalidStateError(
                f"dcp.save with ckpt.dcp.Writer: two entries of the state flatten to "
                f"{_dotted(path)!r}; rename one"
            )
        node[path[-1]] = _Leaf(value)
    tree = _to_json(root)
    if not isinstance(tree, dict):  # only when nothing was saved
        return {}
    return tree


def _dotted(path: Path) -> str:
    return ".".join(map(str, path))


def _to_json(node: Any) -> Any:
    if isinstance(node, _Leaf):
        return node.json
    if node and all(isinstance(k, int) for k in node):
        items: list[Any] = [{} for _ in range(max(node) + 1)]
        for index, child in node.items():
            items[index] = _to_json(child)
        return items
    out = {str(k): _to_json(v) for k, v in node.items()}
    _optimizer_keys(out)
    if out.keys() & STATE_MARKERS:
        return {ITEMS_REF: [[k, v] for k, v in out.items()]}
    return out


def _optimizer_keys(node: dict[str, Any]) -> None:
    """Give an optimizer state dict's ``state`` its integer keys back, and its ``state`` when
    DCP dropped it for being empty (an optimizer that never stepped).

    A dict is taken for an optimizer's when its ``param_groups`` is a list of dicts whose
    ``params`` are lists of integers, and every key of its ``state`` is one of those
    integers written in decimal: that is what ``torch.optim.Optimizer.state_dict()``
    makes, and what ``Optimizer.load_state_dict`` needs back.
    """
    groups = node.get("param_groups")
    if not isinstance(groups, list) or not groups:
        return
    ids: set[int] = set()
    for group in groups:
        params = group.get("params") if isinstance(group, dict) else None
        if not isinstance(params, list) or not all(type(p) is int for p in params):
            return
        ids.update(params)
    state = node.setdefault("state", {})
    if not isinstance(state, dict) or not state or state.keys() & STATE_MARKERS:
        return
    if all(k.isdigit() and int(k) in ids for k in state):
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
