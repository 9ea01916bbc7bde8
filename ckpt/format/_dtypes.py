"""Element types a checkpoint can hold, and the safetensors header of a data file.

torch is imported only to turn a stored dtype name into a ``torch.dtype``, so that
tools which only inspect checkpoints can read the format without it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ckpt.errors import CorruptCheckpointError

if TYPE_CHECKING:
    import torch

# torch dtype name -> (safetensors dtype, element size)
DTYPES: Mapping[str, tuple[str, int]] = {
    "float64": ("F64", 8),
    "float32": ("F32", 4),
    "float16": ("F16", 2),
    "bfloat16": ("BF16", 2),
    "float8_e4m3fn": ("F8_E4M3", 1),
    "float8_e5m2": ("F8_E5M2", 1),
    "int64": ("I64", 8),
    "int32": ("I32", 4),
    "int16": ("I16", 2),
    "int8": ("I8", 1),
    "uint64": ("U64", 8),
    "uint32": ("U32", 4),
    "uint16": ("U16", 2),
    "uint8": ("U8", 1),
    "bool": ("BOOL", 1),
    # Complex tensors are stored as their real view (..., 2) of the matching float type.
    "complex64": ("F32", 8),
    "complex128": ("F64", 16),
}


def dtype_name(dtype: torch.dtype) -> str:
    """The name a manifest stores for ``dtype`` (``TypeError`` when it cannot be stored)."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise TypeError(
            f"tensors of dtype {dtype} cannot be checkpointed (supported: {sorted(DTYPES)})"
        )
    return name


def torch_dtype(name: str) -> torch.dtype:
    """The ``torch.dtype`` of a stored dtype name."""
    import torch

    if name not in DTYPES:
        raise CorruptCheckpointError(f"unknown dtype {name!r} in manifest")
    dtype: torch.dtype = getattr(torch, name)
    return dtype


def element_size(name: str) -> int:
    """Bytes per element of a stored dtype name."""
    return DTYPES[name][1]


def safetensors_header(
    tensors: Sequence[tuple[str, str, Sequence[int]]], metadata: Mapping[str, str]
) -> bytes:
    """The header of a safetensors file holding ``(name, torch dtype name, shape)`` packed
    back to back in this order: length prefix, JSON, padding to 8 bytes.

    Complex tensors are described as their real view (an extra trailing dimension of 2).
    """
    entries: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, dtype, shape in tensors:
        nbytes = math.prod(shape) * element_size(dtype)
        real_shape = [*shape, 2] if dtype.startswith("complex") else list(shape)
        entries[name] = {
            "dtype": DTYPES[dtype][0],
            "shape": real_shape,
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    body = json.dumps(entries, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return len(body).to_bytes(8, "little") + body
