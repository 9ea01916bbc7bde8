"""Format v1: step prefixes, the manifest (the commit point) and per-rank shard indexes.

See docs/FORMAT.md for the contract. Everything read from storage is validated here
and turned into ``CorruptCheckpointError`` / ``UnsupportedFormatError`` with the file
and field named, never a ``KeyError`` or ``TypeError`` from deep inside.
"""

from __future__ import annotations

import json
import math
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from ckpt._codec import CHECKSUM_ALGORITHM, CODECS, DIGEST_HEX, checksum, chunk_count
from ckpt._geometry import Box
from ckpt.errors import CorruptCheckpointError, UnsupportedFormatError

FORMAT_NAME = "ckpt"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
INDEX_DIR = "index"
DATA_DIR = "data"
DEFAULT_CHUNK_BYTES = 1 << 20
_STEP_RE = re.compile(r"^step-(\d{9,})$")

# torch dtype name -> (safetensors dtype, element size)
_DTYPES: dict[str, tuple[str, int]] = {
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
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise TypeError(f"tensors of dtype {dtype} cannot be checkpointed (supported: {sorted(_DTYPES)})")
    return name


def torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise CorruptCheckpointError(f"unknown dtype {name!r} in manifest")
    dtype: torch.dtype = getattr(torch, name)
    return dtype


def safetensors_dtype(name: str) -> str:
    return _DTYPES[name][0]


def element_size(name: str) -> int:
    return _DTYPES[name][1]


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
        entries[name] = {"dtype": safetensors_dtype(dtype), "shape": real_shape,
                         "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    body = json.dumps(entries, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return len(body).to_bytes(8, "little") + body


def step_prefix(step: int) -> str:
    return f"step-{step:09d}"


def parse_step_prefix(name: str) -> int | None:
    match = _STEP_RE.match(name)
    return int(match.group(1)) if match else None


def safe_relative_path(path: Any, where: str) -> str:
    """Validate a path stored in a manifest: relative, normalised, inside the prefix."""
    if not isinstance(path, str) or not path:
        raise CorruptCheckpointError(f"{where}: file path {path!r} is not a non-empty string")
    norm = posixpath.normpath(path)
    if (
        path.startswith("/")
        or "\\" in path
        or "\x00" in path
        or norm != path
        or norm == ".."
        or norm.startswith("../")
    ):
        raise CorruptCheckpointError(
            f"{where}: file path {path!r} would leave the checkpoint prefix; refusing to read it"
        )
    return path


@dataclass(frozen=True)
class StoredPiece:
    """One stored piece of a tensor: its region, and where its bytes are."""

    box: Box
    file: str
    byte_offset: int
    byte_length: int
    codec: str
    checksums: str
    chunk_sizes: tuple[int, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "offsets": list(self.box.offsets),
            "lengths": list(self.box.lengths),
            "file": self.file,
            "byte_offset": self.byte_offset,
            "byte_length": self.byte_length,
            "codec": self.codec,
            "checksums": self.checksums,
        }
        if self.chunk_sizes is not None:
            out["chunk_sizes"] = list(self.chunk_sizes)
        return out

    @cached_property
    def json_text(self) -> str:
        """``to_json`` serialised, kept: a committer renders each piece once, as it arrives."""
        return _dumps(self.to_json())


@dataclass(frozen=True)
class TensorEntry:
    """A global tensor: its dtype, global shape and the pieces that store it."""

    dtype: str
    shape: tuple[int, ...]
    pieces: tuple[StoredPiece, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * element_size(self.dtype)

    def to_json(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "shape": list(self.shape),
            "pieces": [p.to_json() for p in self.pieces],
        }

    def json_text(self) -> str:
        """``to_json`` serialised from the pieces' kept texts."""
        head = _dumps({"dtype": self.dtype, "shape": list(self.shape)})
        return f'{head[:-1]},"pieces":[{",".join(p.json_text for p in self.pieces)}]}}'


@dataclass(frozen=True)
class ShardIndex:
    """What one rank wrote for one step: reported to the committer, merged into the manifest."""

    rank: int
    tensors: dict[str, TensorEntry]
    files: dict[str, int]
    state: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "tensors": {k: v.to_json() for k, v in self.tensors.items()},
            "files": dict(self.files),
            "state": self.state,
        }

    def to_bytes(self) -> bytes:
        return _dumps(self.to_json()).encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str, chunk_bytes: int) -> ShardIndex:
        raw = _parse_json(data, where)
        files = _parse_files(raw.get("files"), where)
        tensors = _parse_tensors(raw.get("tensors"), files, chunk_bytes, where, partial=True)
        rank = raw.get("rank")
        if not isinstance(rank, int):
            raise CorruptCheckpointError(f"{where}: 'rank' is missing or not an integer")
        state = raw.get("state")
        if state is not None and not isinstance(state, dict):
            raise CorruptCheckpointError(f"{where}: 'state' is not an object")
        return cls(rank=rank, tensors=tensors, files=files, state=state)


@dataclass(frozen=True)
class Manifest:
    """Everything a checkpoint holds; written last, its existence commits the step."""

    step: int
    generation: str
    world_size: int
    chunk_bytes: int
    tensors: dict[str, TensorEntry]
    files: dict[str, int]
    state: dict[str, Any]
    created_unix: float
    user_metadata: dict[str, Any] = field(default_factory=dict)
    layout: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())

    def to_bytes(self) -> bytes:
        doc = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "step": self.step,
            "generation": self.generation,
            "world_size": self.world_size,
            "created_unix": self.created_unix,
            "checksum_algorithm": CHECKSUM_ALGORITHM,
            "chunk_bytes": self.chunk_bytes,
            "files": self.files,
            "state": self.state,
            "layout": self.layout,
            "user_metadata": self.user_metadata,
        }
        # The tensors (nearly all of a large manifest) are joined from texts rendered
        # piece by piece; the rest goes through json.dumps.
        tensors = ",".join(f"{_dumps(name)}:{entry.json_text()}" for name, entry in self.tensors.items())
        head = _dumps(doc)
        return seal_manifest(f'{head[:-1]},"tensors":{{{tensors}}}}}'.encode())

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Manifest:
        verify_manifest_seal(data, where)
        raw = _parse_json(data, where)
        if raw.get("format") != FORMAT_NAME:
            raise CorruptCheckpointError(f"{where}: not a ckpt manifest (format={raw.get('format')!r})")
        version = raw.get("format_version")
        if not isinstance(version, int):
            raise CorruptCheckpointError(f"{where}: 'format_version' is missing")
        if version > FORMAT_VERSION:
            raise UnsupportedFormatError(
                f"{where}: written in format version {version}, this ckpt reads up to "
                f"{FORMAT_VERSION}; upgrade ckpt to load it"
            )
        if raw.get("checksum_algorithm") != CHECKSUM_ALGORITHM:
            raise UnsupportedFormatError(
                f"{where}: checksum algorithm {raw.get('checksum_algorithm')!r} is not supported"
            )
        chunk_bytes = _int_field(raw, "chunk_bytes", where, minimum=1)
        files = _parse_files(raw.get("files"), where)
        tensors = _parse_tensors(raw.get("tensors"), files, chunk_bytes, where, partial=False)
        state = raw.get("state")
        if not isinstance(state, dict):
            raise CorruptCheckpointError(f"{where}: 'state' is missing or not an object")
        generation = raw.get("generation")
        if not isinstance(generation, str):
            raise CorruptCheckpointError(f"{where}: 'generation' is missing")
        created = raw.get("created_unix", 0.0)
        return cls(
            step=_int_field(raw, "step", where, minimum=0),
            generation=generation,
            world_size=_int_field(raw, "world_size", where, minimum=1),
            chunk_bytes=chunk_bytes,
            tensors=tensors,
            files=files,
            state=state,
            created_unix=float(created) if isinstance(created, (int, float)) else 0.0,
            user_metadata=raw.get("user_metadata") or {},
            layout=raw.get("layout") or {},
        )


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


_SEAL_OPEN = b'{"manifest_checksum":"'
_SEAL_BLANK = b"0" * DIGEST_HEX


def seal_manifest(body: bytes) -> bytes:
    """Prefix a JSON object with the checksum of the whole manifest.

    The digest is taken over the final bytes with the digest itself written as zeros,
    so a reader checks exactly the bytes it read, without re-serialising anything.
    """
    if not body.startswith(b"{") or body == b"{}":
        raise ValueError("a manifest body must be a non-empty JSON object")
    rest = memoryview(body)[1:]
    digest = checksum(_SEAL_OPEN, _SEAL_BLANK, b'",', rest).encode()
    return b"".join((_SEAL_OPEN, digest, b'",', rest))


def verify_manifest_seal(data: bytes, where: str) -> None:
    """Raise ``CorruptCheckpointError`` unless ``data`` carries a matching manifest checksum."""
    end = len(_SEAL_OPEN) + DIGEST_HEX
    if not data.startswith(_SEAL_OPEN) or len(data) < end + 2:
        raise CorruptCheckpointError(f"{where}: the manifest carries no checksum; the file is corrupt or foreign")
    stored = data[len(_SEAL_OPEN) : end]
    if checksum(_SEAL_OPEN, _SEAL_BLANK, memoryview(data)[end:]).encode() != stored:
        raise CorruptCheckpointError(f"{where}: manifest checksum mismatch; the file is corrupt")


def _parse_json(data: bytes, where: str) -> dict[str, Any]:
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(f"{where}: not valid JSON ({exc}); the file is corrupt") from exc
    if not isinstance(raw, dict):
        raise CorruptCheckpointError(f"{where}: expected a JSON object")
    return raw


def _int_field(raw: Mapping[str, Any], name: str, where: str, minimum: int = 0) -> int:
    value = raw.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise CorruptCheckpointError(f"{where}: {name!r} must be an integer >= {minimum}, got {value!r}")
    return value


def _parse_files(raw: Any, where: str) -> dict[str, int]:
    if not isinstance(raw, dict):
        raise CorruptCheckpointError(f"{where}: 'files' is missing or not an object")
    files = {}
    for path, size in raw.items():
        safe_relative_path(path, where)
        if not isinstance(size, int) or size < 0:
            raise CorruptCheckpointError(f"{where}: size of {path!r} is not a byte count")
        files[path] = size
    return files


def _parse_tensors(
    raw: Any, files: Mapping[str, int], chunk_bytes: int, where: str, *, partial: bool
) -> dict[str, TensorEntry]:
    if not isinstance(raw, dict):
        raise CorruptCheckpointError(f"{where}: 'tensors' is missing or not an object")
    tensors = {}
    for name, entry in raw.items():
        here = f"{where}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise CorruptCheckpointError(f"{here} is not an object")
        dtype = entry.get("dtype")
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise CorruptCheckpointError(f"{here}: unknown dtype {dtype!r}")
        shape = _int_list(entry.get("shape"), f"{here}: shape")
        pieces_raw = entry.get("pieces")
        if not isinstance(pieces_raw, list):
            raise CorruptCheckpointError(f"{here}: 'pieces' is not a list")
        pieces = tuple(
            _parse_piece(p, shape, dtype, files, chunk_bytes, here) for p in pieces_raw
        )
        if not partial:
            covered = sum(p.box.numel for p in pieces)
            if covered != math.prod(shape):
                raise CorruptCheckpointError(
                    f"{here}: stored pieces cover {covered} of {math.prod(shape)} elements"
                )
        tensors[name] = TensorEntry(dtype=dtype, shape=tuple(shape), pieces=pieces)
    return tensors


def _int_list(raw: Any, where: str) -> list[int]:
    if not isinstance(raw, list) or not all(isinstance(v, int) and v >= 0 for v in raw):
        raise CorruptCheckpointError(f"{where} is not a list of non-negative integers")
    return raw


def _parse_piece(
    raw: Any,
    shape: list[int],
    dtype: str,
    files: Mapping[str, int],
    chunk_bytes: int,
    where: str,
) -> StoredPiece:
    if not isinstance(raw, dict):
        raise CorruptCheckpointError(f"{where}: a piece is not an object")
    box = Box(tuple(_int_list(raw.get("offsets"), f"{where}: offsets")),
              tuple(_int_list(raw.get("lengths"), f"{where}: lengths")))
    if len(box.offsets) != len(box.lengths):
        raise CorruptCheckpointError(f"{where}: piece offsets and lengths differ in rank")
    if not box.within(shape):
        raise CorruptCheckpointError(f"{where}: piece {box} lies outside the shape {shape}")
    file = safe_relative_path(raw.get("file"), where)
    if file not in files:
        raise CorruptCheckpointError(f"{where}: piece names {file!r}, which the checkpoint does not list")
    codec = raw.get("codec")
    if codec not in CODECS:
        raise UnsupportedFormatError(f"{where}: unknown codec {codec!r}")
    byte_offset = _int_field(raw, "byte_offset", where)
    byte_length = _int_field(raw, "byte_length", where)
    if byte_offset + byte_length > files[file]:
        raise CorruptCheckpointError(
            f"{where}: bytes {byte_offset}..{byte_offset + byte_length} lie past the end of {file!r}"
        )
    raw_length = box.numel * element_size(dtype)
    chunks = chunk_count(raw_length, chunk_bytes)
    checksums = raw.get("checksums")
    if not isinstance(checksums, str) or len(checksums) != chunks * DIGEST_HEX:
        raise CorruptCheckpointError(f"{where}: expected {chunks} chunk checksums in {file!r}")
    chunk_sizes: tuple[int, ...] | None = None
    if codec == "raw":
        if byte_length != raw_length:
            raise CorruptCheckpointError(
                f"{where}: stores {byte_length} bytes for a piece of {raw_length} bytes"
            )
    else:
        sizes = _int_list(raw.get("chunk_sizes"), f"{where}: chunk_sizes")
        if len(sizes) != chunks or sum(sizes) != byte_length:
            raise CorruptCheckpointError(f"{where}: chunk_sizes do not add up to byte_length")
        chunk_sizes = tuple(sizes)
    return StoredPiece(
        box=box,
        file=file,
        byte_offset=byte_offset,
        byte_length=byte_length,
        codec=codec,
        checksums=checksums,
        chunk_sizes=chunk_sizes,
    )


def manifest_path(step: int) -> str:
    return f"{step_prefix(step)}/{MANIFEST_NAME}"


@dataclass(frozen=True)
class StepListing:
    """Step prefixes found under a root: committed ones (manifest present) and the rest."""

    committed: tuple[int, ...]
    uncommitted: tuple[int, ...]


def scan_steps(backend: Any) -> StepListing:
    """List step prefixes under ``backend``'s root, oldest first.

    Storage is the source of truth: a step is committed exactly when its manifest exists.
    """
    committed: list[int] = []
    uncommitted: list[int] = []
    for name in backend.list_prefixes(""):
        step = parse_step_prefix(name)
        if step is None:
            continue
        (committed if backend.exists(manifest_path(step)) else uncommitted).append(step)
    return StepListing(tuple(sorted(committed)), tuple(sorted(uncommitted)))


def read_manifest(backend: Any, step: int) -> Manifest:
    """Read and validate the manifest of ``step``."""
    from ckpt.errors import CheckpointNotFoundError, storage_errors

    path = manifest_path(step)
    with storage_errors(f"reading {path} under {backend.url}", missing=CheckpointNotFoundError):
        data = backend.read(path)
    manifest = Manifest.from_bytes(data, f"{backend.url}/{path}")
    if manifest.step != step:
        raise CorruptCheckpointError(
            f"{backend.url}/{path}: the manifest says step {manifest.step}, its prefix says {step}"
        )
    return manifest
