"""Turn a training state into named tensor pieces plus a JSON tree (the save side).

Every top-level entry becomes a tree (a module's or optimizer's ``state_dict()``, a
tensor, or a plain value). Tensors are replaced by ``{"__tensor__": name}`` references
and collected under fully-qualified names; everything else must be JSON-representable.
``ckpt._unflatten`` is the way back.
"""

from __future__ import annotations

import base64
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeGuard

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

from ckpt.errors import InvalidStateError
from ckpt.format import BYTES_REF as BYTES_REF
from ckpt.format import DTYPE_REF as DTYPE_REF
from ckpt.format import ITEMS_REF as ITEMS_REF
from ckpt.format import NDARRAY_REF as NDARRAY_REF
from ckpt.format import SAFETENSORS_METADATA, Box, dtype_name
from ckpt.format import STATE_MARKERS as _MARKERS
from ckpt.format import TENSOR_REF as TENSOR_REF
from ckpt.format import TUPLE_REF as TUPLE_REF


@dataclass(frozen=True)
class ShardedTensor:
    """A local shard of a larger global tensor, for users not on DTensor (e.g. Megatron TP).

    Args:
        local: this rank's data.
        global_shape: shape of the whole tensor across ranks.
        offsets: where ``local`` starts in the global tensor, per dimension.
        replicated: True when other ranks hold identical copies of this shard
            (it is then written by one of them only).
        mesh: optional, with ``placements``: the ranks that hold the tensor as a
            ``DeviceMesh``, where each rank holds the region a DTensor of these
            ``placements`` (``Shard(dim)``, ``Replicate()``, one per mesh dimension) would
            hold (``torch.chunk`` blocks). Checked against ``offsets``; with them a job's
            first save plans from these rules instead of gathering every rank's pieces
            (seconds at thousands of ranks).
        placements: see ``mesh``.
    """

    local: torch.Tensor
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    replicated: bool = False
    mesh: Any = None  # torch.distributed.device_mesh.DeviceMesh
    placements: tuple[Any, ...] | None = None  # torch.distributed.tensor.Placement

    def __post_init__(self) -> None:
        box = Box(tuple(self.offsets), tuple(self.local.shape))
        if not box.within(self.global_shape):
            raise InvalidStateError(
                f"shard at offsets {tuple(self.offsets)} with shape {tuple(self.local.shape)} "
                f"does not fit the global shape {tuple(self.global_shape)}"
            )
        if (self.mesh is None) != (self.placements is None):
            raise InvalidStateError("ShardedTensor: pass mesh and placements together, or neither")
        if self.mesh is not None:
            self._check_placements(box)

    def _check_placements(self, box: Box) -> None:
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        placements = tuple(self.placements or ())
        where = (
            f"ShardedTensor of global shape {list(self.global_shape)} at offsets "
            f"{list(self.offsets)} with placements {list(placements)}"
        )
        if len(placements) != self.mesh.ndim or not all(
            isinstance(p, (Shard, Replicate)) for p in placements
        ):
            raise InvalidStateError(
                f"{where}: give one Shard(dim) or Replicate() per dimension of its "
                f"{self.mesh.ndim}-D mesh"
            )
        if self.mesh.get_coordinate() is None:
            raise InvalidStateError(f"{where}: this rank is not in its mesh")
        shape, offset = compute_local_shape_and_global_offset(
            tuple(self.global_shape), self.mesh, placements
        )
        expected = Box(tuple(int(o) for o in offset), tuple(int(n) for n in shape))
        if expected != box and not (expected.numel == 0 and box.numel == 0):
            raise InvalidStateError(
                f"{where}: the mesh gives this rank the region at offsets "
                f"{list(expected.offsets)} of shape {list(expected.lengths)}, not the shard's "
                f"{list(box.lengths)}; fix the offsets or the placements"
            )
        copies = any(
            isinstance(p, Replicate) and n > 1 for p, n in zip(placements, self.mesh.shape)
        )
        if copies != self.replicated:
            raise InvalidStateError(
                f"{where}: replicated={self.replicated}, but the placements "
                f"{'replicate it over' if copies else 'give no copies on'} its mesh of shape "
                f"{list(self.mesh.shape)}; make them agree"
            )


@dataclass(frozen=True)
class MeshPlacement:
    """A DTensor's device mesh and placements: what says which region every rank holds."""

    mesh: Any  # torch.distributed.device_mesh.DeviceMesh
    placements: tuple[Any, ...]  # torch.distributed.tensor.Placement, one per mesh dim


@dataclass
class FlatTensor:
    """One tensor of the state as this rank sees it (``spread``: a DTensor's mesh and
    placements, None for other tensors)."""

    name: str
    local: torch.Tensor
    global_shape: tuple[int, ...]
    box: Box
    replicated: bool
    dtype: str
    spread: MeshPlacement | None = None

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


def _is_dtensor(value: Any) -> TypeGuard[DTensor]:
    # No DTensor exists before its module is imported; importing it here would cost the
    # first save of a job without DTensors half a second.
    dtensor_module = sys.modules.get("torch.distributed.tensor")
    return dtensor_module is not None and isinstance(value, dtensor_module.DTensor)


def _dtensor_geometry(
    value: torch.Tensor,
) -> tuple[torch.Tensor, tuple[int, ...], Box, bool] | None:
    if not _is_dtensor(value):
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


def mesh_placement(value: Any) -> MeshPlacement | None:
    """The mesh and placements of ``value`` when it is a DTensor or a ``ShardedTensor``
    given them, else None."""
    if isinstance(value, ShardedTensor):
        if value.mesh is None or value.placements is None:
            return None
        return MeshPlacement(value.mesh, tuple(value.placements))
    if not _is_dtensor(value):
        return None
    return MeshPlacement(value.device_mesh, tuple(value.placements))


COMPILED_PREFIX = "_orig_mod"
"""The attribute under which ``torch.compile`` keeps the module it wraps: a component of
the compiled module's state_dict names that is not part of the stored names."""


def plain_name(name: str) -> str:
    """``name`` without the ``_orig_mod`` components that ``torch.compile`` adds."""
    if COMPILED_PREFIX not in name:
        return name
    return ".".join(part for part in name.split(".") if part != COMPILED_PREFIX)


def module_state(module: nn.Module) -> dict[str, Any]:
    """``module.state_dict()`` under the names of the uncompiled module: a compiled module
    (or one holding compiled submodules) stores what its plain self would, so that either
    loads into the other."""
    state = module.state_dict()
    if not any(COMPILED_PREFIX in name for name in state):
        return state
    plain: dict[str, Any] = {}
    for name, value in state.items():
        key = plain_name(name)
        if key in plain:
            raise InvalidStateError(
                f"{name!r} and another entry of the module's state_dict both stand for "
                f"{key!r} once torch.compile's {COMPILED_PREFIX!r} is left out; rename one"
            )
        plain[key] = value
    return plain


def state_tree(value: Any) -> Any:
    """The checkpointable tree of one top-level state entry."""
    if isinstance(value, nn.Module):
        return module_state(value)
    if (
        hasattr(value, "state_dict")
        and hasattr(value, "load_state_dict")
        and not isinstance(value, torch.Tensor)
    ):
        return value.state_dict()
    return value


MAX_DEPTH = 100
"""How deeply plain containers (dicts, lists, tuples) may nest in a saved state."""

_INT_LIMIT = 10**4300
"""Plain integers must stay below this in magnitude: Python turns an int of more than 4300
digits into text (JSON) only when its ``sys.set_int_max_str_digits`` allows, and a reader
with the default setting could not parse it back."""


def flatten(state: Mapping[str, Any]) -> tuple[dict[str, FlatTensor], dict[str, Any]]:
    """Split ``state`` into its tensors (by fully-qualified name) and a JSON tree.

    Every check of the values happens here, in the caller's thread and before anything
    is written: the tree returned always encodes as JSON.

    Raises:
        InvalidStateError: a value that cannot be stored, naming its path and the fix.
    """
    if not isinstance(state, Mapping):
        raise InvalidStateError(
            f"state must be a dict of name -> object, got {type(state).__name__}"
        )
    encoder = _TreeEncoder()
    tree: dict[str, Any] = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise InvalidStateError(f"top-level state keys must be strings, got {key!r}")
        encoder.aliases.clear()  # tied tensors are found within one entry
        tree[key] = encoder.encode(state_tree(value), key, 0)
    return encoder.tensors, tree


def join_path(path: str, key: Any) -> str:
    return f"{path}.{key}"


def _shown(path: str) -> str:
    """``path`` quoted, shortened to fit a one-line message."""
    if len(path) > 120:
        path = f"{path[:60]}...{path[-50:]}"
    return repr(path)


def check_storable(tensor: torch.Tensor, path: str) -> None:
    """Refuse a tensor whose elements cannot be stored as one dense block, saying what to do.

    Raises:
        InvalidStateError: meta, sparse, nested or quantized tensors, and dtypes the
            format lacks.
    """
    where = _shown(path)
    if tensor.is_nested:
        raise InvalidStateError(
            f"{where} is a nested tensor; save its components (.unbind()) or a padded "
            "tensor (.to_padded_tensor(0.0)) instead"
        )
    if tensor.layout != torch.strided:
        kind = _SPARSE_LAYOUTS.get(tensor.layout, str(tensor.layout).removeprefix("torch."))
        raise InvalidStateError(
            f"{where} is a {kind} tensor; call .to_dense() before saving (or save its "
            "index and value tensors)"
        )
    if tensor.is_meta:
        raise InvalidStateError(
            f"{where} is a meta tensor and holds no data; materialize it (e.g. "
            "module.to_empty(device=...) and initialise it) before saving"
        )
    if tensor.is_quantized:
        raise InvalidStateError(
            f"{where} is a quantized tensor ({tensor.dtype}); save .dequantize(), or "
            ".int_repr() with its scale and zero point, instead"
        )
    try:
        dtype_name(tensor.dtype)
    except TypeError as exc:
        raise InvalidStateError(
            f"{where}: {exc}; convert it (e.g. .to(torch.float32)) before saving"
        ) from exc


_SPARSE_LAYOUTS = {
    torch.sparse_coo: "sparse COO",
    torch.sparse_csr: "sparse CSR",
    torch.sparse_csc: "sparse CSC",
    torch.sparse_bsr: "sparse BSR",
    torch.sparse_bsc: "sparse BSC",
}


class _TreeEncoder:
    """Turns one state into its JSON tree, collecting its tensors by name.

    It keeps the containers on the path being encoded, so that a state which contains
    itself is refused instead of recursing for ever.
    """

    def __init__(self) -> None:
        self.tensors: dict[str, FlatTensor] = {}
        self._open: dict[int, str] = {}  # id of a container being encoded -> its path
        # The memory and geometry of each tensor stored so far -> its name: a tensor met
        # again under another name (tied weights) is stored once, both names refer to it.
        self.aliases: dict[tuple[Any, ...], str] = {}

    def encode(self, value: Any, path: str, depth: int) -> Any:
        if isinstance(value, torch.Tensor):
            check_storable(value, path)  # before its geometry: a nested tensor has no shape
        geometry = local_geometry(value)
        if geometry is not None:
            return self._tensor(geometry, path, mesh_placement(value))
        if value is None or isinstance(value, (bool, str, float)):
            return value
        if isinstance(value, int):
            return _checked_int(value, path)
        if isinstance(value, np.generic):
            item = value.item()
            if isinstance(item, np.generic):  # no Python equivalent (e.g. float128)
                raise InvalidStateError(
                    f"{_shown(path)}: numpy {type(value).__name__} values cannot be "
                    "checkpointed; convert it to a Python number or a tensor"
                )
            return self.encode(item, path, depth)
        if isinstance(value, np.ndarray):
            return self._ndarray(value, path)
        if isinstance(value, torch.dtype):
            try:
                return {DTYPE_REF: dtype_name(value)}
            except TypeError as exc:
                raise InvalidStateError(f"{_shown(path)}: {exc}") from exc
        if isinstance(value, (bytes, bytearray)):
            return {BYTES_REF: base64.b64encode(bytes(value)).decode()}
        if isinstance(value, (Mapping, tuple, list)):
            return self._container(value, path, depth)
        raise InvalidStateError(
            f"{_shown(path)}: values of type {type(value).__module__}."
            f"{type(value).__qualname__} cannot be checkpointed without pickle; convert it "
            "to tensors, numbers, strings, lists or dicts, or give it "
            "state_dict()/load_state_dict()"
        )

    def _tensor(
        self,
        geometry: tuple[torch.Tensor, tuple[int, ...], Box, bool],
        path: str,
        spread: MeshPlacement | None = None,
    ) -> dict[str, str]:
        if path in self.tensors:
            raise InvalidStateError(
                f"two tensors in the state share the name {_shown(path)}; rename one"
            )
        if path == SAFETENSORS_METADATA:
            raise InvalidStateError(f"{path!r} is reserved by safetensors; rename the tensor")
        local, global_shape, box, replicated = geometry
        check_storable(local, path)
        first = self.aliases.setdefault(_alias_key(local, global_shape, box, replicated), path)
        if first != path:
            return {TENSOR_REF: first}
        # A conjugate or negative view is a flag on shared memory; store the values it shows.
        local = local.detach().resolve_conj().resolve_neg()
        name = dtype_name(local.dtype)
        self.tensors[path] = FlatTensor(path, local, global_shape, box, replicated, name, spread)
        return {TENSOR_REF: path}

    def _ndarray(self, value: np.ndarray[Any, Any], path: str) -> dict[str, str]:
        try:
            tensor = torch.from_numpy(np.ascontiguousarray(value))
        except TypeError as exc:
            raise InvalidStateError(
                f"{_shown(path)}: numpy arrays of dtype {value.dtype} cannot be checkpointed; "
                "convert it to a numeric dtype or a list"
            ) from exc
        ref = self.encode(tensor, path, 0)
        return {NDARRAY_REF: ref[TENSOR_REF]}

    def _container(
        self, value: Mapping[Any, Any] | tuple[Any, ...] | list[Any], path: str, depth: int
    ) -> Any:
        if id(value) in self._open:
            raise InvalidStateError(
                f"{_shown(path)} refers back to {_shown(self._open[id(value)])}, which "
                "contains it: a state that contains itself cannot be checkpointed; break the "
                "cycle before saving"
            )
        if depth >= MAX_DEPTH:
            raise InvalidStateError(
                f"{_shown(path)}: the state nests containers more than {MAX_DEPTH} deep; "
                "flatten it (e.g. a list of records or a tensor)"
            )
        self._open[id(value)] = path
        try:
            return self._members(value, path, depth + 1)
        finally:
            del self._open[id(value)]

    def _members(
        self, value: Mapping[Any, Any] | tuple[Any, ...] | list[Any], path: str, depth: int
    ) -> Any:
        if isinstance(value, tuple):
            return {
                TUPLE_REF: [self.encode(v, join_path(path, i), depth) for i, v in enumerate(value)]
            }
        if isinstance(value, list):
            return [self.encode(v, join_path(path, i), depth) for i, v in enumerate(value)]
        if all(isinstance(k, str) and k not in _MARKERS for k in value):
            return {k: self.encode(v, join_path(path, k), depth) for k, v in value.items()}
        items = []
        for k, v in value.items():
            if not isinstance(k, (str, int, bool, float)) and k is not None:
                raise InvalidStateError(
                    f"{_shown(path)}: dict key {k!r} of type {type(k).__name__} cannot be stored"
                )
            if isinstance(k, int):
                _checked_int(k, path, "a dict key")
            items.append([k, self.encode(v, join_path(path, k), depth)])
        return {ITEMS_REF: items}


def _alias_key(
    local: torch.Tensor, global_shape: tuple[int, ...], box: Box, replicated: bool
) -> tuple[Any, ...]:
    """What makes two tensors the same stored tensor: the same elements of the same memory,
    seen the same way, at the same place of the same global tensor.

    A tensor without elements (an empty shard of a tied weight on some rank) has no
    meaningful address: its storage object stands for it, so that every rank decides the
    same for the same two names.
    """
    storage = local.untyped_storage()
    memory = storage._cdata if local.numel() == 0 else storage.data_ptr()
    return (
        local.device,
        local.numel() == 0,
        memory,
        local.storage_offset(),
        tuple(local.shape),
        tuple(local.stride()),
        local.dtype,
        local.is_conj(),
        local.is_neg(),
        tuple(global_shape),
        box,
        replicated,
    )


def _checked_int(value: int, path: str, what: str = "an integer") -> int:
    if not -_INT_LIMIT < value < _INT_LIMIT:
        raise InvalidStateError(
            f"{_shown(path)}: {what} of {value.bit_length()} bits has more than 4300 decimal "
            "digits, more than JSON readers parse; store it as a string or bytes"
        )
    return value
