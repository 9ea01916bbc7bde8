"""The JSON state tree of a manifest: its markers (docs/FORMAT.md, "The JSON state tree")
and the reader's check that a stored tree is well formed before anything walks it."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping
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
