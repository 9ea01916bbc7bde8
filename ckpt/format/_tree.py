"""The JSON state tree of a manifest: its markers (docs/FORMAT.md, "The JSON state tree")
and the reader's check that a stored tree is well formed before anything walks it."""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ckpt.errors import CorruptCheckpointError
from ckpt.format._dtypes import DTYPES

TENSOR_REF = "__tensor__"
TUPLE_REF = "__tuple__"
ITEMS_REF = "__items__"
BYTES_REF = "__bytes__"
DTYPE_REF = "__dtype__"
NDARRAY_REF = "__ndarray__"
STATE_MARKERS = frozenset({TENSOR_REF, TUPLE_REF, ITEMS_REF, BYTES_REF, DTYPE_REF, NDARRAY_REF})


def is_plain_map(node: Any) -> bool:
    """Whether a stored node is a mapping with string keys (not a marked value)."""
    return isinstance(node, dict) and not (node.keys() & STATE_MARKERS)


def tree_shape_digest(tree: Mapping[str, Any]) -> str:
    """A digest of the keys of every plain mapping in ``tree``, by path (not of the values).

    Two ranks with the same digest hold the same keys everywhere, so merging their trees
    (``merge_trees``) adds nothing the lower rank's tree lacks: one of them sends it.
    """
    h = hashlib.blake2b(digest_size=16)
    stack: list[tuple[Any, str]] = [(tree, "")]
    while stack:
        node, path = stack.pop()
        for key, value in node.items():
            at = f"{path}\x1f{key}"
            h.update(at.encode("utf-8", "surrogatepass"))
            if is_plain_map(value):
                h.update(b"{")
                stack.append((value, at))
            else:
                h.update(b";")
    return h.hexdigest()


def merge_trees(trees: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], list[list[str]]]:
    """The union of state trees that ranks of one job saved (pipeline stages, expert groups).

    Plain mappings are merged key by key; anywhere else (a value, a tensor reference, a
    list) the first tree holding the place wins, so ``trees`` go in rank order.

    Returns:
        The merged tree, and the key paths of its mappings whose keys not every tree
        holding them had: there, a rank's state may lack keys the checkpoint stores.
    """
    partial: list[list[str]] = []
    return _merge_maps(list(trees), [], partial), partial


def _merge_maps(
    maps: list[Mapping[str, Any]], path: list[str], partial: list[list[str]]
) -> dict[str, Any]:
    if len(maps) == 1:
        return dict(maps[0])
    held: dict[str, list[Any]] = {}
    for m in maps:
        for key, value in m.items():
            held.setdefault(key, []).append(value)
    if any(len(values) < len(maps) for values in held.values()):
        partial.append(path)
    merged: dict[str, Any] = {}
    for key, values in held.items():
        if len(values) > 1 and all(is_plain_map(v) for v in values):
            merged[key] = _merge_maps(values, [*path, key], partial)
        else:
            merged[key] = values[0]
    return merged


def check_partial_maps(tree: Mapping[str, Any], paths: Iterable[Sequence[str]], where: str) -> None:
    """Every path of a manifest's ``partial_maps`` leads to a plain mapping of its state.

    Raises:
        CorruptCheckpointError: naming the first path that does not.
    """
    for path in paths:
        node: Any = tree
        for key in path:
            node = node.get(key) if is_plain_map(node) else None
        if not is_plain_map(node):
            raise CorruptCheckpointError(
                f"{where}: 'partial_maps' names {list(path)!r}, which is not a mapping of the "
                "state tree"
            )


def tree_depth_exceeds(tree: Any, limit: int) -> bool:
    """Whether a JSON tree nests more than ``limit`` containers deep (walked without recursion)."""
    stack: list[tuple[Any, int]] = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Iterable[Any] = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth >= limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def check_state_markers(tree: Mapping[str, Any], tensors: Mapping[str, Any], where: str) -> None:
    """Every marker of a stored state tree is well formed, and every tensor it refers to is
    stored: what a load would refuse, found without a target state (``ckpt verify``).

    Raises:
        CorruptCheckpointError: naming the path of the first malformed node.
    """
    stack: list[tuple[Any, str]] = [(value, key) for key, value in tree.items()]
    while stack:
        node, path = stack.pop()
        if isinstance(node, list):
            stack.extend((v, f"{path}.{i}") for i, v in enumerate(node))
            continue
        if not isinstance(node, dict):
            continue
        if TENSOR_REF in node or NDARRAY_REF in node:
            name = node.get(TENSOR_REF, node.get(NDARRAY_REF))
            if not isinstance(name, str) or name not in tensors:
                raise _malformed(where, path, node, "a tensor the checkpoint does not store")
        elif TUPLE_REF in node:
            items = node[TUPLE_REF]
            if not isinstance(items, list):
                raise _malformed(where, path, node, "a tuple that is not a list")
            stack.extend((v, f"{path}.{i}") for i, v in enumerate(items))
        elif ITEMS_REF in node:
            pairs = node[ITEMS_REF]
            if not isinstance(pairs, list) or not all(
                isinstance(p, list)
                and len(p) == 2
                and (p[0] is None or isinstance(p[0], (str, int, float)))
                for p in pairs
            ):
                raise _malformed(where, path, node, "items that are not [key, value] pairs")
            stack.extend((v, f"{path}.{k}") for k, v in pairs)
        elif BYTES_REF in node:
            try:
                base64.b64decode(node[BYTES_REF], validate=True)
            except (TypeError, ValueError, binascii.Error) as exc:
                raise _malformed(where, path, node, "bytes that are not base64") from exc
        elif DTYPE_REF in node:
            if not isinstance(node[DTYPE_REF], str) or node[DTYPE_REF] not in DTYPES:
                raise _malformed(where, path, node, "an unknown dtype")
        else:
            stack.extend((v, f"{path}.{k}") for k, v in node.items())


def _malformed(where: str, path: str, node: Any, why: str) -> CorruptCheckpointError:
    text = repr(node)
    return CorruptCheckpointError(
        f"{where}: the state tree is malformed at {path!r} ({why}): "
        f"{text[:80]}{'...' if len(text) > 80 else ''}"
    )
