"""Merge per-rank shard indexes into a manifest and publish it: the commit point."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ckpt._format import Manifest, ShardIndex, StoredPiece, TensorEntry, manifest_path, step_prefix
from ckpt._geometry import Box
from ckpt.errors import CoordinationError, InvalidStateError, storage_errors
from storage_backends import StorageBackend


def merge_indexes(
    *,
    step: int,
    generation: str,
    world_size: int,
    chunk_bytes: int,
    indexes: Sequence[ShardIndex],
    user_metadata: Mapping[str, Any] | None = None,
    layout: Mapping[str, Any] | None = None,
) -> Manifest:
    """One manifest from every rank's index; data file paths become relative to the step prefix."""
    tensors: dict[str, TensorEntry] = {}
    files: dict[str, int] = {}
    state: dict[str, Any] | None = None
    # Pieces are gathered in lists and frozen once: appending to tuples per rank is quadratic.
    pieces: dict[str, list[StoredPiece]] = {}
    for index in sorted(indexes, key=lambda i: i.rank):
        files.update(index.files)
        if index.state is not None and state is None:
            state = index.state
        for name, entry in index.tensors.items():
            known = tensors.get(name)
            if known is None:
                tensors[name] = entry
                pieces[name] = list(entry.pieces)
                continue
            if known.dtype != entry.dtype or known.shape != entry.shape:
                raise CoordinationError(
                    f"step {step}: ranks disagree on tensor {name!r}: {known.dtype}{list(known.shape)} "
                    f"vs {entry.dtype}{list(entry.shape)} (rank {index.rank})"
                )
            pieces[name].extend(entry.pieces)
    tensors = {name: TensorEntry(e.dtype, e.shape, tuple(pieces[name])) for name, e in tensors.items()}
    for name, entry in tensors.items():
        # Readers refuse a tensor whose pieces do not tile it; never commit one.
        covered = sum(p.box.numel for p in entry.pieces)
        if covered != math.prod(entry.shape):
            raise InvalidStateError(
                f"step {step}: tensor {name!r} of global shape {list(entry.shape)}: the saved shards "
                f"cover {covered} of {math.prod(entry.shape)} elements; each element must be saved "
                "by exactly one rank (check ShardedTensor offsets and global_shape). Not committed"
            )
        # The right count can still hide a hole: shards that overlap leave elements unsaved.
        overlap = _first_overlap([p.box for p in entry.pieces])
        if overlap is not None:
            raise InvalidStateError(
                f"step {step}: tensor {name!r} of global shape {list(entry.shape)}: saved shards "
                f"{overlap[0]} and {overlap[1]} overlap, so other elements are never saved; each "
                "element must be saved by exactly one rank (check ShardedTensor offsets). Not committed"
            )
    return Manifest(
        step=step,
        generation=generation,
        world_size=world_size,
        chunk_bytes=chunk_bytes,
        tensors=tensors,
        files=files,
        state=state or {},
        created_unix=time.time(),
        user_metadata=dict(user_metadata or {}),
        layout=dict(layout or {}),
    )


def _first_overlap(boxes: Sequence[Box]) -> tuple[Box, Box] | None:
    """Two of ``boxes`` that share an element, or None.

    A sweep along the dimension with the most distinct offsets, so that the usual
    layouts (Shard on any dimension, 2-D meshes) compare each box with few others.
    """
    boxes = [b for b in boxes if b.numel]
    if len(boxes) < 2:
        return None
    if boxes[0].ndim == 0:
        return boxes[0], boxes[1]
    dim = max(range(boxes[0].ndim), key=lambda d: len({b.offsets[d] for b in boxes}))
    active: list[Box] = []
    for box in sorted(boxes, key=lambda b: b.offsets[dim]):
        start = box.offsets[dim]
        active = [a for a in active if a.offsets[dim] + a.lengths[dim] > start]
        for other in active:
            if other.intersect(box) is not None:
                return other, box
        active.append(box)
    return None


def publish(backend: StorageBackend, manifest: Manifest) -> None:
    """Write the manifest with an atomic create; refuse when the step is already committed."""
    path = manifest_path(manifest.step)
    with storage_errors(f"committing {path} under {backend.url}"):
        created = backend.put_if_absent(path, manifest.to_bytes())
    if not created:
        raise CoordinationError(
            f"step {manifest.step} under {backend.url} is already committed by another writer; "
            f"this save (generation {manifest.generation}) was not committed. Delete "
            f"{step_prefix(manifest.step)}/ first if you mean to replace it"
        )
