"""Offline conversion: re-lay a checkpoint for another world size, or export it.

* ``relayout``: a new ckpt checkpoint whose tensors are split along one dimension into
  ``world_size`` pieces, as if ``world_size`` ranks had saved them (torch.chunk sizes,
  the same rule as DTensor ``Shard``), so each rank of the new job reads only its files.
* ``export_safetensors``: one consolidated safetensors file, or several with a
  Hugging Face style ``*.index.json`` when ``max_shard_bytes`` is set.
* ``export_torch``: a plain ``{name: tensor}`` dict written with ``torch.save``.

Conversion from and to torch.distributed.checkpoint (DCP) lives with the rest of DCP
interoperability: ``ckpt.dcp.import_dcp`` and ``ckpt.dcp.export_dcp``.

Memory stays bounded: re-layout holds one target rank's data at a time, exports one
tensor at a time (``export_torch`` holds all of them, by its nature).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ckpt.coordination import merge_indexes, new_generation, publish
from ckpt.engine import FlatTensor, PieceInfo, SaveOptions, Snapshotter
from ckpt.errors import CheckpointError, storage_errors
from ckpt.format import (
    Box,
    Manifest,
    ShardIndex,
    TensorEntry,
    element_size,
    load_pieces,
    safetensors_header,
    torch_dtype,
)
from recovery import Destination, Loader, candidates
from storage_backends import StorageBackend

__all__ = [
    "ConvertResult",
    "OfflineRanks",
    "Progress",
    "export_safetensors",
    "export_torch",
    "no_progress",
    "open_manifest",
    "relayout",
    "split_box",
]


Progress = Callable[[int, int, str], None]
"""A conversion's progress callback: (bytes done, bytes total, what is being done)."""


def no_progress(done: int, total: int, what: str) -> None:
    """The ``Progress`` callback that shows nothing."""
    return None


def open_manifest(backend: StorageBackend, step: int | None) -> Manifest:
    """The manifest of ``step`` (newest committed when None), validated."""
    for candidate in candidates(backend, step):
        if candidate.manifest is not None:
            return load_pieces(candidate.backend, candidate.manifest)
        if step is not None and candidate.error is not None:
            raise candidate.error
    raise CheckpointError(f"no usable committed checkpoint under {backend.url}")


def split_box(shape: Sequence[int], parts: int, index: int, dim: int) -> Box:
    """Region ``index`` of ``parts`` along ``dim``.

    Sizes follow torch.chunk; trailing parts may be empty.
    """
    if not shape:
        return Box((), ())
    size = shape[dim]
    chunk = math.ceil(size / parts) if size else 0
    lo = min(size, index * chunk)
    hi = min(size, lo + chunk)
    offsets = [0] * len(shape)
    lengths = list(shape)
    offsets[dim] = lo
    lengths[dim] = hi - lo
    return Box(tuple(offsets), tuple(lengths))


def _read_region(loader: Loader, name: str, entry: TensorEntry, box: Box) -> torch.Tensor:
    tensor = torch.empty(box.lengths, dtype=torch_dtype(entry.dtype))
    if box.numel:
        loader.load([Destination(name, tensor, box)])
    return tensor


class OfflineRanks:
    """Plays the coordinator for writers that save one after another in one process.

    There is one writer per entry of ``descriptions`` (what it holds): one per rank of a
    ``world_size`` layout, or more when each rank's data is written in several bounded
    passes. The manifest names ``world_size``; writer 0 carries the state tree, and
    ``partial_maps`` (the source's: which of its mappings the saving ranks held in part).
    """

    def __init__(
        self,
        world_size: int,
        descriptions: list[list[PieceInfo]],
        partial_maps: tuple[tuple[str, ...], ...] = (),
    ) -> None:
        self._world = world_size
        self._descriptions = descriptions
        self._partial_maps = partial_maps
        self._indexes: list[ShardIndex] = []
        self.rank = 0
        self.generation = new_generation()
        self.step_index = None  # the index is the storage listing

    @property
    def world_size(self) -> int:
        return self._world

    def begin(self, step: int, chunk_bytes: int) -> None:
        return None

    def all_gather(self, obj: Any) -> list[Any]:
        return list(self._descriptions)

    def any_rank(self, flags: Sequence[bool]) -> list[bool]:
        return list(flags)

    def commit(
        self,
        backend: StorageBackend,
        step: int,
        index: ShardIndex,
        *,
        chunk_bytes: int,
        user_metadata: Mapping[str, Any],
    ) -> Manifest | None:
        self._indexes.append(index)
        if len(self._indexes) < len(self._descriptions):
            return None
        manifest = merge_indexes(
            step=step,
            generation=self.generation,
            world_size=self._world,
            chunk_bytes=chunk_bytes,
            indexes=self._indexes,
            user_metadata=user_metadata,
            partial_maps=self._partial_maps,
        )
        publish(backend, manifest)
        return manifest

    def report_failure(self, backend: StorageBackend, step: int, reason: str) -> None:
        return None

    def close(self) -> None:
        return None

    @property
    def files(self) -> list[str]:
        return [f for index in self._indexes for f in index.files]


@dataclass(frozen=True)
class ConvertResult:
    """What a conversion wrote: the step, how many tensors, their bytes, the files."""

    step: int
    tensors: int
    bytes: int
    files: list[str]


def relayout(
    src: StorageBackend,
    dst: StorageBackend,
    *,
    world_size: int,
    step: int | None = None,
    dim: int = 0,
    options: SaveOptions | None = None,
    progress: Progress = no_progress,
) -> ConvertResult:
    """Write ``step`` of ``src`` to ``dst`` as a checkpoint of ``world_size`` ranks."""
    if world_size < 1:
        raise ValueError("world_size must be at least 1")
    manifest = open_manifest(src, step)
    loader = Loader(src, manifest)
    boxes: dict[int, dict[str, Box]] = {}
    for rank in range(world_size):
        per_rank: dict[str, Box] = {}
        for name, entry in manifest.tensors.items():
            if not entry.shape:
                box = Box((), ()) if rank == 0 else None
            else:
                d = dim if dim < len(entry.shape) else 0
                box = split_box(entry.shape, world_size, rank, d)
            if box is not None:
                per_rank[name] = box
        boxes[rank] = per_rank
    descriptions = [
        [
            PieceInfo(n, b.offsets, b.lengths, b.numel * element_size(manifest.tensors[n].dtype))
            for n, b in boxes[r].items()
            if b.numel
        ]
        for r in range(world_size)
    ]
    ranks = OfflineRanks(world_size, descriptions, manifest.partial_maps)
    # Tensor bytes, as counted below (file sizes would add headers: the bar never reached 100%).
    total = sum(entry.nbytes for entry in manifest.tensors.values())
    done = 0
    engine = Snapshotter(options)
    try:
        for rank in range(world_size):
            ranks.rank = rank
            tensors: dict[str, FlatTensor] = {}
            for name, box in boxes[rank].items():
                entry = manifest.tensors[name]
                local = _read_region(loader, name, entry, box)
                tensors[name] = FlatTensor(name, local, tuple(entry.shape), box, False, entry.dtype)
                done += local.numel() * local.element_size()
                progress(done, total, f"rank {rank}/{world_size}: {name}")
            pending = engine.save_flat(
                tensors,
                manifest.state,
                dst,
                manifest.step,
                ranks,
                user_metadata={
                    **manifest.user_metadata,
                    "converted_from": f"{src.url} step {manifest.step}",
                },
                reuse_plan=False,
            )
            pending.result()
    finally:
        engine.close()
    return ConvertResult(manifest.step, len(manifest.tensors), total, sorted(ranks.files))


def _selected(manifest: Manifest, prefix: str | None) -> list[tuple[str, str]]:
    """(stored name, exported name) pairs, keeping only names under ``prefix`` and stripping it."""
    out = []
    for name in sorted(manifest.tensors):
        if prefix:
            if not name.startswith(prefix):
                continue
            out.append((name, name[len(prefix) :]))
        else:
            out.append((name, name))
    if not out:
        raise CheckpointError(f"no tensor names start with {prefix!r}")
    return out


def export_safetensors(
    src: StorageBackend,
    path: str | os.PathLike[str],
    *,
    step: int | None = None,
    prefix: str | None = None,
    max_shard_bytes: int | None = None,
    progress: Progress = no_progress,
) -> ConvertResult:
    """Consolidate ``step`` into safetensors file(s) at ``path``.

    ``path`` is a file, or a directory when the export is sharded.
    """
    manifest = open_manifest(src, step)
    loader = Loader(src, manifest)
    names = _selected(manifest, prefix)
    groups: list[list[tuple[str, str]]] = [[]]
    group_bytes = 0
    for stored, exported in names:
        nbytes = manifest.tensors[stored].nbytes
        if max_shard_bytes and groups[-1] and group_bytes + nbytes > max_shard_bytes:
            groups.append([])
            group_bytes = 0
        groups[-1].append((stored, exported))
        group_bytes += nbytes
    target = os.fspath(path)
    if len(groups) == 1 and not max_shard_bytes:
        file_paths = [target]
    else:
        os.makedirs(target, exist_ok=True)
        file_paths = [
            os.path.join(target, f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors")
            for i in range(len(groups))
        ]
    total = sum(manifest.tensors[s].nbytes for s, _ in names)
    done = 0
    weight_map: dict[str, str] = {}
    for group, file_path in zip(groups, file_paths):
        header = safetensors_header(
            [
                (exported, manifest.tensors[stored].dtype, manifest.tensors[stored].shape)
                for stored, exported in group
            ],
            {"format": "pt", "source": f"ckpt step {manifest.step}"},
        )
        weight_map.update((exported, os.path.basename(file_path)) for _, exported in group)
        tmp = f"{file_path}.tmp"
        try:
            with open(tmp, "wb") as out:
                out.write(header)
                for stored, _ in group:
                    entry = manifest.tensors[stored]
                    tensor = _read_region(loader, stored, entry, Box.full(entry.shape))
                    if tensor.is_complex():
                        tensor = torch.view_as_real(tensor)
                    # reshape first: a 0-d tensor cannot be viewed as bytes of another size.
                    out.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
                    done += entry.nbytes
                    progress(done, total, stored)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            # A failed export leaves no partial file behind.
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        os.replace(tmp, file_path)
    if len(file_paths) > 1 or max_shard_bytes:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        index_path = os.path.join(target, "model.safetensors.index.json")
        with open(index_path, "w") as f:
            json.dump(index, f, indent=2)
        file_paths.append(index_path)
    return ConvertResult(manifest.step, len(names), total, file_paths)


def export_torch(
    src: StorageBackend,
    path: str | os.PathLike[str],
    *,
    step: int | None = None,
    prefix: str | None = None,
    progress: Progress = no_progress,
) -> ConvertResult:
    """Consolidate ``step`` into one ``{name: tensor}`` dict saved with ``torch.save``."""
    manifest = open_manifest(src, step)
    loader = Loader(src, manifest)
    names = _selected(manifest, prefix)
    total = sum(manifest.tensors[s].nbytes for s, _ in names)
    out: dict[str, torch.Tensor] = {}
    done = 0
    for stored, exported in names:
        entry = manifest.tensors[stored]
        out[exported] = _read_region(loader, stored, entry, Box.full(entry.shape))
        done += entry.nbytes
        progress(done, total, stored)
    with storage_errors(f"writing {path}"):
        torch.save(out, os.fspath(path))
    return ConvertResult(manifest.step, len(names), total, [os.fspath(path)])
