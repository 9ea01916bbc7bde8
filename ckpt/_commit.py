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


class ManifestBuilder:
    """Merges per-rank shard indexes into one manifest, one index at a time.

    A committer adds each report as it arrives, so that little is left to do once the
    last one is in: ``add`` checks the index against the others and renders its pieces'
    JSON; ``build`` checks that the pieces tile every tensor and assembles the manifest.
    """

    def __init__(self, step: int) -> None:
        self.step = step
        self.ranks: set[int] = set()
        self._shapes: dict[str, tuple[str, tuple[int, ...]]] = {}
        self._pieces: dict[str, list[StoredPiece]] = {}
        self._files: dict[str, int] = {}
        self._state: tuple[int, dict[str, Any]] | None = None

    def add(self, index: ShardIndex) -> None:
        if index.rank in self.ranks:
            raise CoordinationError(f"step {self.step}: rank {index.rank} reported twice")
        for name, entry in index.tensors.items():
            known = self._shapes.get(name)
            if known is not None and known != (entry.dtype, entry.shape):
                raise CoordinationError(
                    f"step {self.step}: ranks disagree on tensor {name!r}: {known[0]}{list(known[1])} "
                    f"vs {entry.dtype}{list(entry.shape)} (rank {index.rank})"
                )
        self.ranks.add(index.rank)
        self._files.update(index.files)
        if index.state is not None and (self._state is None or index.rank < self._state[0]):
            self._state = (index.rank, index.state)
        for name, entry in index.tensors.items():
            self._shapes.setdefault(name, (entry.dtype, entry.shape))
            pieces = self._pieces.setdefault(name, [])
            for piece in entry.pieces:
                _ = piece.json_text  # rendered now, while other reports still arrive
                pieces.append(piece)

    def build(
        self,
        *,
        generation: str,
        world_size: int,
        chunk_bytes: int,
        user_metadata: Mapping[str, Any] | None = None,
        layout: Mapping[str, Any] | None = None,
    ) -> Manifest:
        """The manifest; ``InvalidStateError`` when the pieces do not tile some tensor."""
        tensors = {}
        for name, (dtype, shape) in self._shapes.items():
            pieces = self._pieces[name]
            _check_tiling(self.step, name, shape, pieces)
            tensors[name] = TensorEntry(dtype, shape, tuple(pieces))
        return Manifest(
            step=self.step,
            generation=generation,
            world_size=world_size,
            chunk_bytes=chunk_bytes,
            tensors=tensors,
            files=dict(sorted(self._files.items())),
            state=self._state[1] if self._state else {},
            created_unix=time.time(),
            user_metadata=dict(user_metadata or {}),
            layout=dict(layout or {}),
        )

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
    builder = ManifestBuilder(step)
    for index in sorted(indexes, key=lambda i: i.rank):
        builder.add(index)
    return builder.build(
        generation=generation, world_size=world_size, chunk_bytes=chunk_bytes,
        user_metadata=user_metadata, layout=layout,
    )


def _check_tiling(step: int, name: str, shape: tuple[int, ...], pieces: Sequence[StoredPiece]) -> None:
    """Readers refuse a tensor whose pieces do not tile it; never commit one."""
    covered = sum(p.box.numel for p in pieces)
    if covered != math.prod(shape):
        raise InvalidStateError(
            f"step {step}: tensor {name!r} of global shape {list(shape)}: the saved shards "
            f"cover {covered} of {math.prod(shape)} elements; each element must be saved "
            "by exactly one rank (check ShardedTensor offsets and global_shape). Not committed"
        )
    # The right count can still hide a hole: shards that overlap leave elements unsaved.
    overlap = _first_overlap([p.box for p in pieces])
    if overlap is not None:
        raise InvalidStateError(
            f"step {step}: tensor {name!r} of global shape {list(shape)}: saved shards "
            f"{overlap[0]} and {overlap[1]} overlap, so other elements are never saved; each "
            "element must be saved by exactly one rank (check ShardedTensor offsets). Not committed"
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
