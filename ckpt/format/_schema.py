"""The one schema of format v1: pieces, tensors, shard indexes and manifests.

Each stored object is one msgspec struct, and that struct is the only description
of it: it is what writers build, what JSON is decoded into (types checked in C) and
what readers use. What JSON types cannot express (paths inside the prefix, pieces
inside their tensor and file, checksum counts, coverage) is checked once, by
``check_tensors``, for manifests and reports alike.

State trees (``state``, ``layout``, ``user_metadata``) may hold NaN and infinities,
which strict JSON lacks: they are written with Python's ``json`` (``NaN``,
``Infinity``), and a document holding one is decoded by ``json`` and then converted
into the same structs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any, TypeVar

import msgspec

from ckpt.errors import CorruptCheckpointError, InvalidStateError, UnsupportedFormatError
from ckpt.format._codec import (
    CHECKSUM_ALGORITHM,
    CODECS,
    DIGEST_HEX,
    ZSTD_MAX_RATIO,
    chunk_count,
)
from ckpt.format._dtypes import DTYPES, MAX_SAFETENSORS_HEADER
from ckpt.format._geometry import Box, first_overlap
from ckpt.format._layout import Layout
from ckpt.format._paths import safe_relative_path
from ckpt.format._seal import seal_manifest, verify_manifest_seal
from ckpt.format._tree import check_partial_maps, check_state_markers, tree_depth_exceeds

FORMAT_NAME = "ckpt"
FORMAT_VERSION = 2
# Bounds on what a reader accepts (docs/FORMAT.md, "Validation on read"): anything past
# them is refused before it is walked or allocated.
# JSON levels of state, layout and user_metadata: save refuses states nesting more than
# 100 containers, and a tuple or a dict with non-string keys takes up to 3 JSON levels.
MAX_TREE_DEPTH = 320
MAX_NDIM = 64
MAX_ELEMENTS = 1 << 62  # of a tensor, counting its zero-length dimensions as one

_Count = Annotated[int, msgspec.Meta(ge=0)]
_Positive = Annotated[int, msgspec.Meta(ge=1)]
_Dims = Annotated[tuple[_Count, ...], msgspec.Meta(max_length=MAX_NDIM)]
# Seconds since the epoch, finite: NaN or a date past year 5000 is no timestamp.
_Timestamp = Annotated[float, msgspec.Meta(ge=0, le=1e11)]
# A duration in seconds, finite: a phase of a save longer than 30 years is no measurement.
_Seconds = Annotated[float, msgspec.Meta(ge=0, le=1e9)]


class StoredPiece(msgspec.Struct, frozen=True, gc=False, omit_defaults=True):
    """One stored region of a tensor and where its bytes are.

    Attributes:
        offsets, lengths: the region of the global tensor (row-major inside the piece).
        file: the data file, relative to the step prefix.
        byte_offset, byte_length: where the stored bytes are in ``file``.
        codec: ``raw`` or ``zstd`` (one frame per chunk).
        checksums: one 16-hex-digit digest per chunk of stored bytes, concatenated.
        chunk_sizes: the stored size of each zstd frame (None for ``raw``).
    """

    offsets: _Dims
    lengths: _Dims
    file: str
    byte_offset: _Count
    byte_length: _Count
    codec: str
    checksums: str
    chunk_sizes: tuple[_Count, ...] | None = None

    @classmethod
    def at(
        cls,
        box: Box,
        file: str,
        byte_offset: int,
        byte_length: int,
        codec: str,
        checksums: str,
        chunk_sizes: tuple[int, ...] | None = None,
    ) -> StoredPiece:
        """A piece storing the region ``box``."""
        return cls(
            box.offsets, box.lengths, file, byte_offset, byte_length, codec, checksums, chunk_sizes
        )

    @property
    def box(self) -> Box:
        return Box(self.offsets, self.lengths)


class TensorEntry(msgspec.Struct, frozen=True, gc=False, omit_defaults=True):
    """A global tensor: its dtype, global shape and the pieces that store it.

    In a format v2 manifest, ``layout`` says which writer holds which region and
    ``pieces`` is empty: the pieces are in the writers' index files (``load_pieces``
    fills them in, for every writer or only those a restore needs).
    """

    dtype: str
    shape: _Dims
    pieces: tuple[StoredPiece, ...]
    layout: Layout | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype][1]


class FileHeader(msgspec.Struct, frozen=True, gc=False):
    """The safetensors header of a raw data file: its first ``length`` bytes (the 8-byte
    length prefix, the JSON and its padding) and their checksum."""

    length: _Count
    checksum: str


class RankTiming(msgspec.Struct, frozen=True, gc=False, kw_only=True, omit_defaults=True):
    """How long one rank's save of one step took, as the rank reports it.

    Attributes:
        started_unix: wall-clock time the save began on this rank (before flattening).
        stall_s: seconds training was blocked (flatten, plan, staging copy).
        persist_s: seconds to write this rank's data files durably.
        retries: storage calls retried during the save; None when not counted.
    """

    started_unix: _Timestamp
    stall_s: _Seconds
    persist_s: _Seconds
    retries: _Count | None = None


class SaveTimings(msgspec.Struct, frozen=True, gc=False, kw_only=True, omit_defaults=True):
    """The phase times of a committed save: one array per field, indexed by rank.

    Columns rather than one record per rank keep the manifest small at thousands of
    ranks (a few dozen bytes per rank). Durations are rounded to 0.1 ms.

    Attributes:
        started_unix: wall-clock time the first rank began the save.
        commit_s: the committer's seconds from holding every report to the manifest
            rendered, right before it is published (the publish itself, one atomic
            create, cannot be recorded in the document it writes).
        start_s: each rank's start, in seconds after ``started_unix``.
        stall_s: each rank's stall (flatten, plan, staging copy).
        persist_s: each rank's time to write its data files durably.
        stored_bytes: each rank's data file bytes (the ``files`` it wrote).
        retries: each rank's retried storage calls; absent when not counted.
    """

    started_unix: _Timestamp
    commit_s: _Seconds
    start_s: tuple[_Seconds, ...]
    stall_s: tuple[_Seconds, ...]
    persist_s: tuple[_Seconds, ...]
    stored_bytes: tuple[_Count, ...]
    retries: tuple[_Count, ...] | None = None

    @classmethod
    def of_ranks(
        cls, ranks: Sequence[RankTiming], stored_bytes: Sequence[int], commit_s: float
    ) -> SaveTimings:
        """The columns of every rank's timing (``ranks[r]`` is rank r's)."""
        first = min(t.started_unix for t in ranks)
        counted = all(t.retries is not None for t in ranks)
        return cls(
            started_unix=first,
            commit_s=_rounded(commit_s),
            start_s=tuple(_rounded(t.started_unix - first) for t in ranks),
            stall_s=tuple(_rounded(t.stall_s) for t in ranks),
            persist_s=tuple(_rounded(t.persist_s) for t in ranks),
            stored_bytes=tuple(stored_bytes),
            retries=tuple(t.retries or 0 for t in ranks) if counted else None,
        )

    def check(self, world_size: int, where: str) -> None:
        """Every column has one entry per rank (``CorruptCheckpointError``)."""
        columns = {
            "start_s": self.start_s,
            "stall_s": self.stall_s,
            "persist_s": self.persist_s,
            "stored_bytes": self.stored_bytes,
        }
        if self.retries is not None:
            columns["retries"] = self.retries
        for name, column in columns.items():
            if len(column) != world_size:
                raise CorruptCheckpointError(
                    f"{where}: 'timings.{name}' has {len(column)} entries for {world_size} ranks"
                )


def _rounded(seconds: float) -> float:
    return round(max(0.0, seconds), 4)


class PlanRecord(msgspec.Struct, frozen=True, gc=False):
    """The write plan a v2 save was made with, so that the job's first save after a
    restart on the same world size can reuse it instead of planning again.

    Attributes:
        key: the digest of what every rank described to the planner (each tensor's name,
            dtype, global shape and held region, in rank order); a save whose ranks
            describe exactly this again makes exactly the layouts of this manifest.
        imbalance: the busiest writer's planned bytes over the mean.
    """

    key: Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{32}$")]
    imbalance: Annotated[float, msgspec.Meta(ge=1.0, le=1e9)]


class WriterRef(msgspec.Struct, frozen=True, gc=False):
    """A writer's index file, as a v2 manifest pins it.

    Attributes:
        rank: the writing rank.
        index: the index file, relative to the step prefix.
        bytes: its size.
        checksum: its seal (the digest it carries first, over all its bytes).
    """

    rank: _Count
    index: str
    bytes: _Count
    checksum: str


class ShardIndex(msgspec.Struct, frozen=True):
    """What one rank wrote for one step.

    In format v1 it is the rank's report, merged into the manifest: every tensor the rank
    holds, with the pieces it stored. In format v2 it is both the rank's index file (the
    tensors it stored pieces of, with those pieces) and, with ``writer`` naming that file,
    its report: ``tensors`` then holds only the tensors whose layout this rank describes
    (no pieces), and the committer merges only those, the files and the timings.
    """

    rank: _Count
    tensors: dict[str, TensorEntry]
    files: dict[str, _Count]
    state: dict[str, Any] | None = None
    headers: dict[str, FileHeader] = {}
    timing: RankTiming | None = None
    writer: WriterRef | None = None
    plan: PlanRecord | None = None

    def to_bytes(self) -> bytes:
        if self.state is not None:
            check_tree_depth(self.state, "state")
        # Sealed like a manifest: a report crosses storage or Redis before it is merged.
        body = b"".join(
            (
                b'{"rank":%d,"tensors":' % self.rank,
                _ENCODER.encode(self.tensors),
                b',"files":',
                _ENCODER.encode(self.files),
                b',"headers":',
                _ENCODER.encode(self.headers),
                b',"state":',
                _dumps(self.state).encode(),
                b',"timing":%s' % _ENCODER.encode(self.timing) if self.timing else b"",
                b',"writer":%s' % _ENCODER.encode(self.writer) if self.writer else b"",
                b',"plan":%s' % _ENCODER.encode(self.plan) if self.plan else b"",
                b"}",
            )
        )
        return seal_manifest(body)

    @classmethod
    def from_bytes(cls, data: bytes, where: str, chunk_bytes: int) -> ShardIndex:
        """Verify the seal, parse and validate a rank's report (``CorruptCheckpointError``
        naming ``where``)."""
        verify_manifest_seal(data, where)
        index = _decode(data, cls, where)
        _check_trees(where, state=index.state)
        _check_files(index.files, index.headers, where)
        if index.writer is not None:
            safe_relative_path(index.writer.index, where)
            for name, entry in index.tensors.items():
                here = f"{where}: tensor {name!r}"
                if entry.layout is None:
                    raise CorruptCheckpointError(f"{here}: a v2 report needs a layout")
                # World size is the committer's to check: any rank number is accepted here.
                entry.layout.check(entry.shape, 1 << 62, here)
                if entry.pieces and entry.layout.sole_writer != index.rank:
                    raise CorruptCheckpointError(
                        f"{here}: only a tensor stored whole by the reporting rank lists pieces"
                    )
            check_tensors(
                {n: e for n, e in index.tensors.items() if e.pieces},
                index.files,
                {},
                chunk_bytes,
                where,
                complete=True,
            )
            return index
        check_tensors(index.tensors, index.files, index.headers, chunk_bytes, where, complete=False)
        return index


class Manifest(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a checkpoint holds; written last, its existence commits the step.

    See docs/FORMAT.md for each field. The ``format``, ``format_version``,
    ``checksum_algorithm`` and ``manifest_checksum`` fields of the stored document are
    checked on read and written by ``to_bytes``; they are not attributes.
    """

    step: _Count
    generation: str
    world_size: _Positive
    chunk_bytes: _Positive
    tensors: dict[str, TensorEntry]
    files: dict[str, _Count]
    state: dict[str, Any]
    partial_maps: tuple[tuple[str, ...], ...] = ()
    created_unix: _Timestamp = 0.0
    user_metadata: dict[str, Any] = {}
    layout: dict[str, Any] = {}
    headers: dict[str, FileHeader] = {}
    timings: SaveTimings | None = None
    writers: tuple[WriterRef, ...] = ()
    plan: PlanRecord | None = None

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())

    @property
    def data_files(self) -> dict[str, int]:
        """``files`` without the writers' index files (format v2): the tensor data."""
        indexes = {w.index for w in self.writers}
        return {path: size for path, size in self.files.items() if path not in indexes}

    @property
    def format_version(self) -> int:
        """2 when the pieces live in writer index files (``writers``), else 1."""
        return 2 if self.writers else 1

    def to_bytes(self) -> bytes:
        """The sealed manifest document (in v2 without pieces: they are in the index files)."""
        if self.writers:
            return render_manifest(
                self.header(),
                (
                    (name, _ENCODER.encode(stored_entry(entry)))
                    for name, entry in self.tensors.items()
                ),
            )
        return render_manifest(
            self.header(),
            ((name, _ENCODER.encode(entry)) for name, entry in self.tensors.items()),
        )

    def header(self) -> dict[str, Any]:
        """Every field of the stored document but the tensors (and the seal)."""
        return manifest_header(
            step=self.step,
            generation=self.generation,
            world_size=self.world_size,
            created_unix=self.created_unix,
            chunk_bytes=self.chunk_bytes,
            files=self.files,
            state=self.state,
            partial_maps=self.partial_maps,
            layout=self.layout,
            user_metadata=self.user_metadata,
            headers={} if self.writers else self.headers,
            timings=self.timings,
            writers=self.writers,
            plan=self.plan,
        )

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Manifest:
        """Verify the seal, the format version, then every field (``CorruptCheckpointError``)."""
        verify_manifest_seal(data, where)
        envelope = _decode(data, _Envelope, where)
        if envelope.format != FORMAT_NAME:
            raise CorruptCheckpointError(
                f"{where}: not a ckpt manifest (format={envelope.format!r})"
            )
        version = envelope.format_version
        if type(version) is not int or version < 1:
            raise CorruptCheckpointError(
                f"{where}: 'format_version' is missing or not a version number"
            )
        if version > FORMAT_VERSION:
            raise UnsupportedFormatError(
                f"{where}: written in format version {version}, this ckpt reads up to "
                f"{FORMAT_VERSION}; upgrade ckpt to load it"
            )
        if envelope.checksum_algorithm != CHECKSUM_ALGORITHM:
            raise UnsupportedFormatError(
                f"{where}: checksum algorithm {envelope.checksum_algorithm!r} is not supported"
            )
        manifest = _decode(data, cls, where)
        _check_trees(
            where,
            state=manifest.state,
            layout=manifest.layout,
            user_metadata=manifest.user_metadata,
        )
        check_state_markers(manifest.state, manifest.tensors, where)
        check_partial_maps(manifest.state, manifest.partial_maps, where)
        if manifest.timings is not None:
            manifest.timings.check(manifest.world_size, where)
        _check_files(manifest.files, manifest.headers, where)
        if version >= 2:
            _check_layouts(manifest, where)
            return manifest
        if (
            manifest.writers
            or manifest.plan is not None
            or any(e.layout is not None for e in manifest.tensors.values())
        ):
            raise CorruptCheckpointError(
                f"{where}: a format v1 manifest lists writers, layouts or a write plan"
            )
        check_tensors(
            manifest.tensors,
            manifest.files,
            manifest.headers,
            manifest.chunk_bytes,
            where,
            complete=True,
        )
        return manifest


def stored_entry(entry: TensorEntry) -> TensorEntry:
    """A tensor as a v2 manifest stores it: its layout, and its pieces only when one
    writer stores it whole (the pieces of the others are in the index files)."""
    if entry.layout is not None and entry.layout.sole_writer is None and entry.pieces:
        return msgspec.structs.replace(entry, pieces=())
    return entry


def _check_layouts(manifest: Manifest, where: str) -> None:
    """A v2 manifest: every rank's index file is listed, every tensor has a layout that
    tiles it (naming ranks of the job), and no pieces (they are in the index files)."""
    if manifest.headers:
        raise CorruptCheckpointError(f"{where}: a v2 manifest keeps headers in the index files")
    ranks = set()
    for ref in manifest.writers:
        safe_relative_path(ref.index, where)
        if ref.rank in ranks or ref.rank >= manifest.world_size:
            raise CorruptCheckpointError(f"{where}: writer {ref.rank} is listed twice or unknown")
        if manifest.files.get(ref.index) != ref.bytes or len(ref.checksum) != DIGEST_HEX:
            raise CorruptCheckpointError(
                f"{where}: writer {ref.rank}'s index {ref.index!r} is not listed with its size"
            )
        ranks.add(ref.rank)
    if len(ranks) != manifest.world_size:
        raise CorruptCheckpointError(
            f"{where}: {len(ranks)} writer index files are listed for {manifest.world_size} ranks"
        )
    for name, entry in manifest.tensors.items():
        here = f"{where}: tensor {name!r}"
        if entry.dtype not in DTYPES:
            raise CorruptCheckpointError(f"{here}: unknown dtype {entry.dtype!r}")
        if math.prod(max(1, n) for n in entry.shape) > MAX_ELEMENTS:
            raise CorruptCheckpointError(f"{here}: shape {list(entry.shape)} is too large")
        if entry.layout is None:
            raise CorruptCheckpointError(f"{here}: a v2 manifest needs a layout")
        entry.layout.check(entry.shape, manifest.world_size, here)
        if entry.pieces and entry.layout.sole_writer is None:
            raise CorruptCheckpointError(
                f"{here}: a v2 manifest lists pieces only of a tensor one writer stores whole"
            )
    inline = {
        name: msgspec.structs.replace(entry, layout=None)
        for name, entry in manifest.tensors.items()
        if entry.pieces
    }
    check_tensors(inline, manifest.files, {}, manifest.chunk_bytes, where, complete=True)


class _Envelope(msgspec.Struct):
    """The fields that say how to read the rest of a manifest."""

    format: Any = None
    format_version: Any = None
    checksum_algorithm: Any = None


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
    partial_maps: Sequence[Sequence[str]] = (),
    headers: Mapping[str, FileHeader] | None = None,
    timings: SaveTimings | None = None,
    writers: Sequence[WriterRef] = (),
    plan: PlanRecord | None = None,
) -> dict[str, Any]:
    """Every field of a stored manifest but the tensors, in the order it is written.

    ``partial_maps``, ``timings`` and ``plan`` (v2 only) are written only when there are
    any, so a manifest without them is the same document as before the fields existed.

    Raises:
        InvalidStateError: a tree nests deeper than readers accept (``MAX_TREE_DEPTH``).
    """
    for field, tree in (("state", state), ("layout", layout), ("user_metadata", user_metadata)):
        check_tree_depth(tree, field)
    header: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": 2 if writers else 1,
        "step": step,
        "generation": generation,
        "world_size": world_size,
        "created_unix": created_unix,
        "checksum_algorithm": CHECKSUM_ALGORITHM,
        "chunk_bytes": chunk_bytes,
        "files": files,
        "headers": {path: msgspec.to_builtins(h) for path, h in (headers or {}).items()},
        "state": state,
        **({"partial_maps": [list(p) for p in partial_maps]} if partial_maps else {}),
        "layout": layout,
        "user_metadata": user_metadata,
    }
    if timings is not None:
        header["timings"] = msgspec.to_builtins(timings)
    if writers:
        header["writers"] = msgspec.to_builtins(list(writers))
        if plan is not None:
            header["plan"] = msgspec.to_builtins(plan)
    return header


def render_manifest(header: Mapping[str, Any], tensors: Iterable[tuple[str, bytes]]) -> bytes:
    """The sealed manifest: ``header`` plus ``tensors``, pairs of a name and the tensor's
    JSON (a ``TensorEntry`` encoded, or built from pieces already encoded one by one)."""
    body = b",".join(b"%s:%s" % (_dumps(name).encode(), text) for name, text in tensors)
    head = _dumps(header).encode()
    return seal_manifest(b'%s,"tensors":{%s}}' % (head[:-1], body))


def tensor_json(dtype: str, shape: tuple[int, ...], piece_texts: list[bytes]) -> bytes:
    """A tensor's JSON from its pieces' JSON (``encode_piece``)."""
    return b'{"dtype":%s,"shape":%s,"pieces":[%s]}' % (
        _dumps(dtype).encode(),
        _ENCODER.encode(shape),
        b",".join(piece_texts),
    )


def encode_entry(entry: TensorEntry) -> bytes:
    """A tensor's JSON, as manifests store it."""
    return _ENCODER.encode(entry)


def encode_piece(piece: StoredPiece) -> bytes:
    """A piece's JSON, as manifests and reports store it."""
    return _ENCODER.encode(piece)


_ENCODER = msgspec.json.Encoder()
_JSON = json.JSONEncoder(separators=(",", ":"))  # writes NaN and Infinity, as state trees need
_T = TypeVar("_T")
_DECODERS: dict[type[Any], msgspec.json.Decoder[Any]] = {}


def _dumps(value: Any) -> str:
    return _JSON.encode(value)


def _decode(data: bytes, kind: type[_T], where: str) -> _T:
    decoder: msgspec.json.Decoder[_T] | None = _DECODERS.get(kind)
    if decoder is None:
        decoder = _DECODERS[kind] = msgspec.json.Decoder(kind)
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise CorruptCheckpointError(f"{where}: {exc}") from exc
    except msgspec.DecodeError:
        pass  # not strict JSON: NaN or Infinity in a state tree, or not JSON at all
    except RecursionError as exc:
        raise _too_deep(where) from exc
    try:
        raw = json.loads(data)
    except RecursionError as exc:
        raise _too_deep(where) from exc
    except ValueError as exc:  # not JSON, not UTF-8, or an integer of thousands of digits
        raise CorruptCheckpointError(
            f"{where}: not valid JSON ({exc}); the file is corrupt"
        ) from exc
    try:
        return msgspec.convert(raw, kind)
    except msgspec.ValidationError as exc:
        raise CorruptCheckpointError(f"{where}: {exc}") from exc
    except RecursionError as exc:
        raise _too_deep(where) from exc


def _too_deep(where: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{where}: the document nests too deep to read (readers accept {MAX_TREE_DEPTH} "
        "levels); the file is corrupt or hostile"
    )


def check_tree_depth(tree: Any, field: str) -> None:
    """Refuse to write a tree that readers would refuse (``InvalidStateError``)."""
    if tree_depth_exceeds(tree, MAX_TREE_DEPTH):
        raise InvalidStateError(
            f"the checkpoint's {field} nests deeper than {MAX_TREE_DEPTH} levels, which readers "
            "refuse; flatten it"
        )


def _check_trees(where: str, **trees: Any) -> None:
    for field, tree in trees.items():
        if tree is not None and tree_depth_exceeds(tree, MAX_TREE_DEPTH):
            raise CorruptCheckpointError(
                f"{where}: {field!r} nests deeper than {MAX_TREE_DEPTH} levels; the file is "
                "corrupt or hostile"
            )


def _check_files(files: Mapping[str, int], headers: Mapping[str, FileHeader], where: str) -> None:
    for path in files:
        safe_relative_path(path, where)
    for path, header in headers.items():
        size = files.get(path)
        if size is None:
            raise CorruptCheckpointError(
                f"{where}: 'headers' names {path!r}, which the checkpoint does not list"
            )
        if not 8 <= header.length <= min(size, MAX_SAFETENSORS_HEADER):
            raise CorruptCheckpointError(
                f"{where}: the header of {path!r} is said to take {header.length} bytes of "
                f"its {size}"
            )
        if len(header.checksum) != DIGEST_HEX:
            raise CorruptCheckpointError(f"{where}: the header checksum of {path!r} is malformed")


def check_tensors(
    tensors: Mapping[str, TensorEntry],
    files: Mapping[str, int],
    headers: Mapping[str, FileHeader],
    chunk_bytes: int,
    where: str,
    *,
    complete: bool,
) -> None:
    """What a tensor's JSON types cannot say: known dtype, a bounded size, pieces inside the
    shape and their file (past its header), pairwise disjoint, checksums for every chunk,
    stored sizes that account for every raw byte; with ``complete``, pieces that cover the
    whole tensor (a report holds only its rank's pieces).

    Every size a reader later allocates is bounded here, before anything is: raw pieces
    store exactly their elements' bytes, zstd frames at most ``ZSTD_MAX_RATIO`` raw bytes
    per stored byte, and stored bytes lie inside files of listed sizes.

    A committer runs this for every piece of every rank: texts are built only to raise.
    """
    for name, entry in tensors.items():
        here = f"{where}: tensor {name!r}"
        element = DTYPES.get(entry.dtype)
        if element is None:
            raise CorruptCheckpointError(f"{here}: unknown dtype {entry.dtype!r}")
        numel = math.prod(entry.shape)
        if math.prod(max(1, n) for n in entry.shape) > MAX_ELEMENTS:
            raise CorruptCheckpointError(f"{here}: shape {list(entry.shape)} is too large")
        covered = 0
        for piece in entry.pieces:
            _check_piece(
                piece,
                entry.shape,
                element[1] * math.prod(piece.lengths),
                files,
                headers,
                chunk_bytes,
                here,
            )
            covered += math.prod(piece.lengths)
        # A committer checks a report's pieces against every rank's (InvalidStateError).
        if complete and len(entry.pieces) > 1:
            clash = first_overlap([p.box for p in entry.pieces])
            if clash is not None:
                raise CorruptCheckpointError(
                    f"{here}: stored pieces {clash[0]} and {clash[1]} overlap; the manifest is "
                    "inconsistent"
                )
        if complete and covered != numel:
            raise CorruptCheckpointError(
                f"{here}: stored pieces cover {covered} of {numel} elements"
            )


def _check_piece(
    piece: StoredPiece,
    shape: tuple[int, ...],
    raw_length: int,
    files: Mapping[str, int],
    headers: Mapping[str, FileHeader],
    chunk_bytes: int,
    where: str,
) -> None:
    offsets, lengths = piece.offsets, piece.lengths
    if len(offsets) != len(lengths):
        raise CorruptCheckpointError(f"{where}: piece offsets and lengths differ in rank")
    if len(shape) != len(offsets) or any(o + n > s for o, n, s in zip(offsets, lengths, shape)):
        raise CorruptCheckpointError(
            f"{where}: piece {piece.box} lies outside the shape {list(shape)}"
        )
    size = files.get(piece.file)
    if size is None:
        safe_relative_path(piece.file, where)  # the clearer error for a path that climbs out
        raise CorruptCheckpointError(
            f"{where}: piece names {piece.file!r}, which the checkpoint does not list"
        )
    if piece.codec not in CODECS:
        raise UnsupportedFormatError(f"{where}: unknown codec {piece.codec!r}")
    if piece.byte_offset + piece.byte_length > size:
        raise CorruptCheckpointError(
            f"{where}: bytes {piece.byte_offset}..{piece.byte_offset + piece.byte_length} lie past "
            f"the end of {piece.file!r}"
        )
    header = headers.get(piece.file)
    if header is not None and (piece.codec != "raw" or piece.byte_offset < header.length):
        raise CorruptCheckpointError(
            f"{where}: a {piece.codec} piece at byte {piece.byte_offset} of {piece.file!r} lies "
            f"in or after its {header.length}-byte safetensors header"
        )
    chunks = chunk_count(raw_length, chunk_bytes)
    if len(piece.checksums) != chunks * DIGEST_HEX:
        raise CorruptCheckpointError(
            f"{where}: expected {chunks} chunk checksums in {piece.file!r}"
        )
    if piece.codec == "raw":
        if piece.byte_length != raw_length:
            raise CorruptCheckpointError(
                f"{where}: stores {piece.byte_length} bytes for a piece of {raw_length} bytes"
            )
        if piece.chunk_sizes is not None:
            raise CorruptCheckpointError(f"{where}: a raw piece lists chunk_sizes")
        return
    sizes = piece.chunk_sizes
    if sizes is None or len(sizes) != chunks or sum(sizes) != piece.byte_length:
        raise CorruptCheckpointError(f"{where}: chunk_sizes do not add up to byte_length")
    # Every chunk but the last holds chunk_bytes raw bytes: no frame may claim more than a
    # zstd frame of its stored size can hold.
    if chunks and (
        (chunks > 1 and min(sizes[:-1]) * ZSTD_MAX_RATIO < chunk_bytes)
        or sizes[-1] * ZSTD_MAX_RATIO < raw_length - (chunks - 1) * chunk_bytes
    ):
        raise CorruptCheckpointError(
            f"{where}: {piece.byte_length} stored zstd bytes in {piece.file!r} cannot hold the "
            f"piece's {raw_length} raw bytes in chunks of {chunk_bytes}"
        )
