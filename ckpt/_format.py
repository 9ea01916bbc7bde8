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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from json.encoder import encode_basestring_ascii
from typing import Annotated, Any

import msgspec
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


# A stored piece as plain values: offsets, lengths, file, byte_offset, byte_length,
# codec, checksums, chunk_sizes. A committer keeps thousands of them per tensor; tuples
# of ints and strings cost little memory and the garbage collector stops tracking them.
PieceFields = tuple[tuple[int, ...], tuple[int, ...], str, int, int, str, str, "tuple[int, ...] | None"]


def piece_text(fields: PieceFields) -> str:
    """A piece's JSON object, as it appears in indexes and manifests."""
    offsets, lengths, file, byte_offset, byte_length, codec, checksums, chunk_sizes = fields
    sizes = "" if chunk_sizes is None else f',"chunk_sizes":[{_ints(chunk_sizes)}]'
    return (
        f'{{"offsets":[{_ints(offsets)}],"lengths":[{_ints(lengths)}],"file":{_quote(file)},'
        f'"byte_offset":{byte_offset},"byte_length":{byte_length},"codec":{_quote(codec)},'
        f'"checksums":{_quote(checksums)}{sizes}}}'
    )


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

    @classmethod
    def from_fields(cls, fields: PieceFields) -> StoredPiece:
        offsets, lengths, file, byte_offset, byte_length, codec, checksums, chunk_sizes = fields
        return cls(Box(offsets, lengths), file, byte_offset, byte_length, codec, checksums, chunk_sizes)

    @property
    def fields(self) -> PieceFields:
        return (self.box.offsets, self.box.lengths, self.file, self.byte_offset, self.byte_length,
                self.codec, self.checksums, self.chunk_sizes)

    @cached_property
    def json_text(self) -> str:
        return piece_text(self.fields)


@dataclass(frozen=True)
class TensorEntry:
    """A global tensor: its dtype, global shape and the pieces that store it."""

    dtype: str
    shape: tuple[int, ...]
    pieces: tuple[StoredPiece, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * element_size(self.dtype)

    def json_text(self) -> str:
        return tensor_text(self.dtype, self.shape, [p.json_text for p in self.pieces])


def tensor_text(dtype: str, shape: Sequence[int], piece_texts: Sequence[str]) -> str:
    """A tensor's JSON object from its pieces' JSON texts."""
    return f'{{"dtype":{_dumps(dtype)},"shape":[{_ints(shape)}],"pieces":[{",".join(piece_texts)}]}}'


@dataclass(frozen=True)
class ShardIndex:
    """What one rank wrote for one step: reported to the committer, merged into the manifest."""

    rank: int
    tensors: dict[str, TensorEntry]
    files: dict[str, int]
    state: dict[str, Any] | None = None

    def to_bytes(self) -> bytes:
        tensors = ",".join(f"{_dumps(name)}:{entry.json_text()}" for name, entry in self.tensors.items())
        return (
            f'{{"rank":{self.rank},"tensors":{{{tensors}}},"files":{_dumps(self.files)},'
            f'"state":{_dumps(self.state)}}}'
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str, chunk_bytes: int) -> ShardIndex:
        report = parse_report(data, where, chunk_bytes)
        tensors = {
            name: TensorEntry(dtype, shape, tuple(StoredPiece.from_fields(f) for f in pieces))
            for name, (dtype, shape, pieces) in report.tensors.items()
        }
        return cls(rank=report.rank, tensors=tensors, files=report.files, state=report.state)


TensorFields = tuple[str, tuple[int, ...], list[PieceFields]]  # dtype, shape, pieces


@dataclass(frozen=True)
class Report:
    """A rank's shard index as plain values (what a committer merges, without objects)."""

    rank: int
    tensors: dict[str, TensorFields]
    files: dict[str, int]
    state: dict[str, Any] | None


_Count = Annotated[int, msgspec.Meta(ge=0)]


class _PieceMessage(msgspec.Struct, gc=False):
    offsets: tuple[_Count, ...]
    lengths: tuple[_Count, ...]
    file: str
    byte_offset: _Count
    byte_length: _Count
    codec: str
    checksums: str
    chunk_sizes: tuple[_Count, ...] | None = None


class _TensorMessage(msgspec.Struct, gc=False):
    dtype: str
    shape: tuple[_Count, ...]
    pieces: list[_PieceMessage]


class _ReportMessage(msgspec.Struct):
    rank: int
    tensors: dict[str, _TensorMessage]
    files: dict[str, _Count]
    state: dict[str, Any] | None = None


# A committer parses every rank's report: msgspec decodes and type-checks it in C; the
# checks JSON cannot express (paths, byte ranges, checksum counts) follow in Python.
_REPORT_DECODER = msgspec.json.Decoder(_ReportMessage)


def parse_report(data: bytes, where: str, chunk_bytes: int) -> Report:
    """Parse and validate a rank's shard index (``ShardIndex.to_bytes``)."""
    try:
        message = _REPORT_DECODER.decode(data)
    except msgspec.ValidationError as exc:
        raise CorruptCheckpointError(f"{where}: {exc}") from exc
    except msgspec.DecodeError:
        return _parse_report_json(data, where, chunk_bytes)  # e.g. NaN in the state
    files = _parse_files(message.files, where)
    tensors: dict[str, TensorFields] = {}
    for name, tensor in message.tensors.items():
        here = f"{where}: tensor {name!r}"
        if tensor.dtype not in _DTYPES:
            raise CorruptCheckpointError(f"{here}: unknown dtype {tensor.dtype!r}")
        tensors[name] = (tensor.dtype, tensor.shape, [
            _check_piece(p.offsets, p.lengths, p.file, p.byte_offset, p.byte_length, p.codec, p.checksums,
                         p.chunk_sizes, tensor.shape, tensor.dtype, files, chunk_bytes, here)
            for p in tensor.pieces
        ])
    return Report(rank=message.rank, tensors=tensors, files=files, state=message.state)


def _parse_report_json(data: bytes, where: str, chunk_bytes: int) -> Report:
    raw = _parse_json(data, where)
    files = _parse_files(raw.get("files"), where)
    tensors = _parse_tensor_fields(raw.get("tensors"), files, chunk_bytes, where)
    rank = raw.get("rank")
    if type(rank) is not int:
        raise CorruptCheckpointError(f"{where}: 'rank' is missing or not an integer")
    state = raw.get("state")
    if state is not None and not isinstance(state, dict):
        raise CorruptCheckpointError(f"{where}: 'state' is not an object")
    return Report(rank=rank, tensors=tensors, files=files, state=state)


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
        doc = manifest_header(
            step=self.step, generation=self.generation, world_size=self.world_size,
            created_unix=self.created_unix, chunk_bytes=self.chunk_bytes, files=self.files,
            state=self.state, layout=self.layout, user_metadata=self.user_metadata,
        )
        return render_manifest(doc, (
            (name, entry.dtype, entry.shape, [p.json_text for p in entry.pieces])
            for name, entry in self.tensors.items()
        ))

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
        tensors = _parse_tensors(raw.get("tensors"), files, chunk_bytes, where)
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


_ENCODER = json.JSONEncoder(separators=(",", ":"))


def _dumps(value: Any) -> str:
    return _ENCODER.encode(value)


def manifest_header(
    *,
    step: int,
    generation: str,
    world_size: int,
    created_unix: float,
    chunk_bytes: int,
    files: Mapping[str, int],
    state: Mapping[str, Any],
    layout: Mapping[str, Any],
    user_metadata: Mapping[str, Any],
) -> dict[str, Any]:
    """Every field of a manifest but the tensors."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "step": step,
        "generation": generation,
        "world_size": world_size,
        "created_unix": created_unix,
        "checksum_algorithm": CHECKSUM_ALGORITHM,
        "chunk_bytes": chunk_bytes,
        "files": files,
        "state": state,
        "layout": layout,
        "user_metadata": user_metadata,
    }


def render_manifest(
    header: Mapping[str, Any], tensors: Iterable[tuple[str, str, Sequence[int], Sequence[str]]]
) -> bytes:
    """The sealed manifest: ``header`` plus the tensors (name, dtype, shape, piece texts).

    The tensors, nearly all of a large manifest, are joined from texts rendered piece
    by piece (a committer renders them as reports arrive); the rest is ``json.dumps``.
    """
    body = ",".join(f"{_dumps(name)}:{tensor_text(dtype, shape, texts)}" for name, dtype, shape, texts in tensors)
    head = _dumps(header)
    return seal_manifest(f'{head[:-1]},"tensors":{{{body}}}}}'.encode())


_quote = encode_basestring_ascii  # a JSON string, as json.dumps writes it


def _ints(values: Sequence[int]) -> str:
    return ",".join(map(str, values))


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
        if type(size) is not int or size < 0:
            raise CorruptCheckpointError(f"{where}: size of {path!r} is not a byte count")
        files[path] = size
    return files


def _parse_tensor_fields(
    raw: Any, files: Mapping[str, int], chunk_bytes: int, where: str
) -> dict[str, TensorFields]:
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
        shape = _int_list(entry.get("shape"), here, ": shape")
        pieces_raw = entry.get("pieces")
        if not isinstance(pieces_raw, list):
            raise CorruptCheckpointError(f"{here}: 'pieces' is not a list")
        pieces = [_piece_from_json(p, tuple(shape), dtype, files, chunk_bytes, here) for p in pieces_raw]
        tensors[name] = (dtype, tuple(shape), pieces)
    return tensors


def _parse_tensors(raw: Any, files: Mapping[str, int], chunk_bytes: int, where: str) -> dict[str, TensorEntry]:
    """A manifest's tensors: every one must be fully covered by its pieces."""
    tensors = {}
    for name, (dtype, shape, fields) in _parse_tensor_fields(raw, files, chunk_bytes, where).items():
        pieces = tuple(StoredPiece.from_fields(f) for f in fields)
        covered = sum(p.box.numel for p in pieces)
        if covered != math.prod(shape):
            raise CorruptCheckpointError(
                f"{where}: tensor {name!r}: stored pieces cover {covered} of {math.prod(shape)} elements"
            )
        tensors[name] = TensorEntry(dtype=dtype, shape=shape, pieces=pieces)
    return tensors


def _int_list(raw: Any, where: str, name: str = "") -> list[int]:
    if type(raw) is list:
        for value in raw:
            if type(value) is not int or value < 0:
                break
        else:
            return raw
    raise CorruptCheckpointError(f"{where}{name} is not a list of non-negative integers")


def _piece_from_json(
    raw: Any,
    shape: tuple[int, ...],
    dtype: str,
    files: Mapping[str, int],
    chunk_bytes: int,
    where: str,
) -> PieceFields:
    """A piece of a manifest: its JSON types checked, then ``_check_piece``."""
    if type(raw) is not dict:
        raise CorruptCheckpointError(f"{where}: a piece is not an object")
    byte_offset = raw.get("byte_offset")
    byte_length = raw.get("byte_length")
    if type(byte_offset) is not int or type(byte_length) is not int or byte_offset < 0 or byte_length < 0:
        raise CorruptCheckpointError(
            f"{where}: 'byte_offset' and 'byte_length' must be integers >= 0, got "
            f"{byte_offset!r} and {byte_length!r}"
        )
    checksums = raw.get("checksums")
    if type(checksums) is not str:
        raise CorruptCheckpointError(f"{where}: 'checksums' is not a string")
    sizes = raw.get("chunk_sizes")
    return _check_piece(
        tuple(_int_list(raw.get("offsets"), where, ": offsets")),
        tuple(_int_list(raw.get("lengths"), where, ": lengths")),
        raw.get("file"),
        byte_offset,
        byte_length,
        raw.get("codec"),
        checksums,
        None if sizes is None else tuple(_int_list(sizes, where, ": chunk_sizes")),
        shape, dtype, files, chunk_bytes, where,
    )


def _check_piece(
    offsets: tuple[int, ...],
    lengths: tuple[int, ...],
    file: Any,
    byte_offset: int,
    byte_length: int,
    codec: Any,
    checksums: str,
    chunk_sizes: tuple[int, ...] | None,
    shape: tuple[int, ...],
    dtype: str,
    files: Mapping[str, int],
    chunk_bytes: int,
    where: str,
) -> PieceFields:
    """The checks of a piece that its JSON types cannot express; returns its fields.

    A committer runs this for every piece of every rank: error texts are built only
    when raised, and the file name is checked against ``files`` (validated already).
    """
    if len(offsets) != len(lengths):
        raise CorruptCheckpointError(f"{where}: piece offsets and lengths differ in rank")
    if len(shape) != len(offsets) or any(o + n > s for o, n, s in zip(offsets, lengths, shape)):
        raise CorruptCheckpointError(f"{where}: piece {Box(offsets, lengths)} lies outside the shape {list(shape)}")
    if type(file) is not str or file not in files:
        safe_relative_path(file, where)  # the clearer error for a path that climbs out
        raise CorruptCheckpointError(f"{where}: piece names {file!r}, which the checkpoint does not list")
    if codec not in CODECS:
        raise UnsupportedFormatError(f"{where}: unknown codec {codec!r}")
    if byte_offset + byte_length > files[file]:
        raise CorruptCheckpointError(
            f"{where}: bytes {byte_offset}..{byte_offset + byte_length} lie past the end of {file!r}"
        )
    raw_length = math.prod(lengths) * _DTYPES[dtype][1]
    chunks = chunk_count(raw_length, chunk_bytes)
    if len(checksums) != chunks * DIGEST_HEX:
        raise CorruptCheckpointError(f"{where}: expected {chunks} chunk checksums in {file!r}")
    if codec == "raw":
        if byte_length != raw_length:
            raise CorruptCheckpointError(
                f"{where}: stores {byte_length} bytes for a piece of {raw_length} bytes"
            )
        chunk_sizes = None
    elif chunk_sizes is None or len(chunk_sizes) != chunks or sum(chunk_sizes) != byte_length:
        raise CorruptCheckpointError(f"{where}: chunk_sizes do not add up to byte_length")
    return (offsets, lengths, file, byte_offset, byte_length, codec, checksums, chunk_sizes)


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
