"""Format v2: reading the writers' index files a manifest pins.

A v2 manifest holds each tensor's layout, not its pieces; ``load_pieces`` reads the
index files of the writers that hold what a reader needs (all of them for a full read),
checks each against the manifest (size, seal digest, rank, and that every piece lies in
a region the layout gives its writer) and returns the manifest with those pieces.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import msgspec

from ckpt.errors import CorruptCheckpointError, storage_errors
from ckpt.format._geometry import Box
from ckpt.format._paths import step_prefix
from ckpt.format._schema import (
    FileHeader,
    Manifest,
    ShardIndex,
    StoredPiece,
    TensorEntry,
    WriterRef,
    check_tensors,
)
from ckpt.format._seal import seal_digest
from storage_backends import StorageBackend

_READERS = 16  # index files read at once


def writers_needed(manifest: Manifest, wanted: Mapping[str, Sequence[Box]]) -> list[WriterRef]:
    """The writers whose regions overlap ``wanted`` (tensor name -> regions)."""
    ranks: set[int] = set()
    for name, regions in wanted.items():
        entry = manifest.tensors.get(name)
        if entry is None or entry.layout is None or _inline(entry):
            continue
        for region in regions:
            ranks |= entry.layout.writers_overlapping(entry.shape, region)
    return [ref for ref in manifest.writers if ref.rank in ranks]


def load_pieces(
    backend: StorageBackend,
    manifest: Manifest,
    wanted: Mapping[str, Sequence[Box]] | None = None,
) -> Manifest:
    """``manifest`` with the stored pieces of the tensors in ``wanted`` (every tensor when
    None) filled in from the writers' index files; a v1 manifest is returned as it is.

    With ``wanted``, only the index files of writers overlapping those regions are read,
    and every tensor gets the pieces those writers stored (enough to fill the regions; a
    reshard plan checks the coverage). Without it, every index file is read and every
    tensor is checked to be tiled by its pieces, as a v1 manifest is.

    Raises:
        CorruptCheckpointError: an index file is missing, differs from what the manifest
            pins, or disagrees with the layouts.
    """
    if not manifest.writers:
        return manifest
    refs = list(manifest.writers) if wanted is None else writers_needed(manifest, wanted)
    with ThreadPoolExecutor(min(_READERS, max(1, len(refs))), "ckpt-index") as pool:
        indexes = list(pool.map(lambda ref: _read_index(backend, manifest, ref), refs))
    # Tensors one writer stores whole are listed with their pieces in the manifest itself.
    inline = {name for name, entry in manifest.tensors.items() if _inline(entry)}
    pieces: dict[str, list[StoredPiece]] = {
        name: [] for name in manifest.tensors if name not in inline
    }
    headers: dict[str, FileHeader] = {}
    for index in indexes:
        headers.update(index.headers)
        for name, entry in index.tensors.items():
            if name in pieces:
                pieces[name].extend(entry.pieces)
    tensors = {
        name: msgspec.structs.replace(entry, pieces=tuple(pieces[name]))
        if name in pieces
        else entry
        for name, entry in manifest.tensors.items()
    }
    loaded = msgspec.structs.replace(manifest, tensors=tensors, headers=headers)
    if wanted is None:
        where = f"{backend.url}/{step_prefix(manifest.step)}: the writers' index files"
        check_tensors(
            {name: _without_layout(entry) for name, entry in tensors.items()},
            manifest.files,
            headers,
            manifest.chunk_bytes,
            where,
            complete=True,
        )
    return loaded


def _inline(entry: TensorEntry) -> bool:
    """The manifest lists this tensor's pieces itself (one writer stores it whole)."""
    return bool(entry.pieces) and entry.layout is not None and entry.layout.sole_writer is not None


def _without_layout(entry: TensorEntry) -> TensorEntry:
    return msgspec.structs.replace(entry, layout=None)


def _read_index(backend: StorageBackend, manifest: Manifest, ref: WriterRef) -> ShardIndex:
    path = f"{step_prefix(manifest.step)}/{ref.index}"
    where = f"{backend.url}/{path}"
    with storage_errors(f"reading {where}", missing=CorruptCheckpointError):
        data = backend.read(path)
    if len(data) != ref.bytes or seal_digest(data) != ref.checksum:
        raise CorruptCheckpointError(
            f"{where}: writer {ref.rank}'s index file is not the one the manifest pins "
            f"({len(data)} bytes, expected {ref.bytes}); the checkpoint is corrupt"
        )
    index = ShardIndex.from_bytes(data, where, manifest.chunk_bytes)
    if index.rank != ref.rank or index.writer is not None:
        raise CorruptCheckpointError(f"{where}: not the index file of writer {ref.rank}")
    for path_in, size in index.files.items():
        if manifest.files.get(path_in) != size:
            raise CorruptCheckpointError(
                f"{where}: names data file {path_in!r} of {size} bytes, which the manifest "
                "does not list with that size"
            )
    for name, entry in index.tensors.items():
        known = manifest.tensors.get(name)
        if known is None or (known.dtype, known.shape) != (entry.dtype, entry.shape):
            raise CorruptCheckpointError(f"{where}: tensor {name!r} differs from the manifest's")
        assert known.layout is not None
        for piece in entry.pieces:
            if math.prod(piece.lengths) and not known.layout.holds(ref.rank, piece.box):
                raise CorruptCheckpointError(
                    f"{where}: tensor {name!r}: piece {piece.box} lies outside what the "
                    f"layout gives writer {ref.rank}"
                )
    return index
