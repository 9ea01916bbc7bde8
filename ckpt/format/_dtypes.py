"""Element types a checkpoint can hold, and the safetensors header of a data file.

torch is imported only to turn a stored dtype name into a ``torch.dtype``, so that
tools which only inspect checkpoints can read the format without it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ckpt.errors import CorruptCheckpointError, InvalidStateError

if TYPE_CHECKING:
    import torch

# The name a safetensors header keeps for its metadata: no tensor can be stored under it.
SAFETENSORS_METADATA = "__metadata__"
# The largest header (length prefix included) a reader reads; safetensors' own limit.
MAX_SAFETENSORS_HEADER = 8 + 100_000_000

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

    Raises:
        InvalidStateError: a tensor is named ``__metadata__``, which safetensors reserves.
    """
    entries: dict[str, Any] = {SAFETENSORS_METADATA: dict(metadata)}
    offset = 0
    for name, dtype, shape in tensors:
        if name == SAFETENSORS_METADATA:
            raise InvalidStateError(
                f"a tensor cannot be named {name!r} in a safetensors file (the name is reserved "
                "for the file's metadata); rename it"
            )
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


def check_safetensors_header(
    header: bytes,
    file_size: int,
    tensors: Sequence[tuple[str, str, Sequence[int], int, int]],
    where: str,
) -> None:
    """Check that ``header`` (a data file's first bytes, length prefix included) makes the
    file a safetensors file holding exactly ``(name, torch dtype name, shape, byte_offset,
    byte_length)`` for each tensor, and nothing else, up to ``file_size``.

    Raises:
        CorruptCheckpointError: naming ``where`` and what differs.
    """
    length = int.from_bytes(header[:8], "little") + 8
    if len(header) < 8 or length != len(header):
        raise CorruptCheckpointError(
            f"{where}: the safetensors header length field says {length} bytes, the manifest "
            f"{len(header)}"
        )
    try:
        entries = json.loads(header[8:])
    except (ValueError, RecursionError) as exc:
        raise CorruptCheckpointError(f"{where}: the safetensors header is not JSON") from exc
    if not isinstance(entries, dict):
        raise CorruptCheckpointError(f"{where}: the safetensors header is not a JSON object")
    entries.pop(SAFETENSORS_METADATA, None)
    expected: dict[str, Any] = {}
    end = length
    # safetensors packs tensors back to back after the header, leaving no byte unaccounted.
    for name, dtype, shape, byte_offset, byte_length in sorted(tensors, key=lambda t: t[3]):
        if byte_offset != end:
            raise CorruptCheckpointError(
                f"{where}: tensor {name!r} starts at byte {byte_offset}, not right after the "
                f"previous one (byte {end})"
            )
        real_shape = [*shape, 2] if dtype.startswith("complex") else list(shape)
        expected[name] = {
            "dtype": DTYPES[dtype][0],
            "shape": real_shape,
            "data_offsets": [end - length, end - length + byte_length],
        }
        end += byte_length
    if entries != expected:
        differ = sorted(set(entries) ^ set(expected)) or sorted(
            n for n in expected if entries[n] != expected[n]
        )
        raise CorruptCheckpointError(
            f"{where}: the safetensors header does not describe the manifest's pieces "
            f"(first difference: {differ[0]!r})"
        )
    if end != file_size:
        raise CorruptCheckpointError(
            f"{where}: the header and pieces account for {end} of the file's {file_size} bytes"
        )
