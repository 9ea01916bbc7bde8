"""Merge per-rank shard indexes into a manifest and publish it: the commit point."""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from ckpt.errors import (
    AlreadyCommittedError,
    CheckpointError,
    CheckpointNotFoundError,
    CoordinationError,
    InvalidStateError,
    SaveAbortedError,
    storage_errors,
)
from ckpt.format import (
    Box,
    FileHeader,
    Manifest,
    PlanRecord,
    RankTiming,
    SaveTimings,
    ShardIndex,
    StoredPiece,
    TensorEntry,
    WriterRef,
    manifest_path,
    merge_trees,
    step_prefix,
)
from ckpt.format._schema import (
    encode_entry,
    encode_piece,
    manifest_header,
    render_manifest,
    tensor_json,
)
from storage_backends import StorageBackend


class _Tiling:
    """Checks, piece by piece, that the pieces of one tensor never overlap, and counts
    the elements they cover (the tensor is tiled when the count reaches its size).

    Pieces are kept sorted by their offset along one dimension (the first one they are
    split on); a new piece is compared only with pieces that start within the longest
    piece's length before it, or inside it, along that dimension: one or two for 1-D
    sharding, a row of the mesh for 2-D sharding.
    """

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape
        self.covered = 0
        self._dim: int | None = None
        self._starts: list[int] = []
        self._boxes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
        self._longest = 0

    def add(self, offsets: tuple[int, ...], lengths: tuple[int, ...]) -> Box | None:
        """Record a piece; returns a piece it overlaps, if any."""
        numel = math.prod(lengths)
        self.covered += numel
        if numel == 0:
            return None
        if not offsets:
            if self._boxes:
                return Box(*self._boxes[0])
            self._boxes.append((offsets, lengths))
            return None
        if self._dim is None:
            self._dim = next((d for d, n in enumerate(lengths) if n < self.shape[d]), 0)
        dim = self._dim
        start, end = offsets[dim], offsets[dim] + lengths[dim]
        self._longest = max(self._longest, lengths[dim])
        first = bisect.bisect_right(self._starts, start - self._longest)
        last = bisect.bisect_left(self._starts, end)
        box = Box(offsets, lengths)
        for other in self._boxes[first:last]:
            if box.intersect(Box(*other)) is not None:
                return Box(*other)
        at = bisect.bisect_right(self._starts, start)
        self._starts.insert(at, start)
        self._boxes.insert(at, (offsets, lengths))
        return None


class _TensorParts:
    """One tensor of a manifest being built: its pieces, their JSON and their tiling."""

    def __init__(self, dtype: str, shape: tuple[int, ...]) -> None:
        self.dtype = dtype
        self.shape = shape
        self.pieces: list[StoredPiece] = []
        self.texts: list[bytes] = []
        self.tiling = _Tiling(shape)


class ManifestBuilder:
    """Merges per-rank shard indexes into one manifest, one index at a time.

    A committer adds each report as it arrives, so that little is left to do once the
    last one is in: ``add_report`` validates a rank's index, checks its pieces against
    the others and renders their JSON; ``render`` checks that every tensor is covered
    and joins the texts into the sealed manifest; ``build`` makes the same manifest as
    objects. Pieces are frozen msgspec structs, which the garbage collector does not
    track: a committer holds the pieces of every rank in a training process.
    """

    def __init__(self, step: int) -> None:
        self.step = step
        self.ranks: set[int] = set()
        self._tensors: dict[str, _TensorParts] = {}
        self._files: dict[str, int] = {}
        self._headers: dict[str, FileHeader] = {}
        # The state trees of the ranks that sent one: rank 0's, and pipeline stages' own.
        self._states: dict[int, dict[str, Any]] = {}
        self._timings: dict[int, tuple[RankTiming, int]] = {}
        # Format v2: each rank's index file, and the layouts its report describes.
        self._writers: dict[int, WriterRef] = {}
        self._layouts: dict[str, TensorEntry] = {}
        self._plans: set[PlanRecord | None] = set()

    @property
    def files(self) -> Mapping[str, int]:
        """Data files of the reports added so far: path (relative to the step) -> bytes."""
        return self._files

    def add_report(self, data: bytes, where: str, chunk_bytes: int) -> None:
        """A rank's ``ShardIndex.to_bytes``, validated (``CorruptCheckpointError``) and added."""
        self.add(ShardIndex.from_bytes(data, where, chunk_bytes))

    def add(self, report: ShardIndex) -> None:
        if report.rank in self.ranks:
            raise CoordinationError(f"step {self.step}: rank {report.rank} reported twice")
        if self.ranks and (report.writer is not None) != bool(self._writers):
            raise CoordinationError(
                f"step {self.step}: rank {report.rank} reported in another format version than "
                "the ranks before it (mixed ckpt versions in one job?)"
            )
        if report.writer is not None:
            self._add_v2(report)
            return
        for name, entry in report.tensors.items():
            known = self._tensors.get(name)
            if known is not None and (known.dtype, known.shape) != (entry.dtype, entry.shape):
                raise CoordinationError(
                    f"step {self.step}: ranks disagree on tensor {name!r}: "
                    f"{known.dtype}{list(known.shape)} "
                    f"vs {entry.dtype}{list(entry.shape)} (rank {report.rank})"
                )
        self.ranks.add(report.rank)
        if report.timing is not None:
            self._timings[report.rank] = (report.timing, sum(report.files.values()))
        self._files.update(report.files)
        self._headers.update(report.headers)
        if report.state is not None:
            self._states[report.rank] = report.state
        for name, entry in report.tensors.items():
            parts = self._tensors.get(name)
            if parts is None:
                parts = self._tensors[name] = _TensorParts(entry.dtype, entry.shape)
            for piece in entry.pieces:
                overlap = parts.tiling.add(piece.offsets, piece.lengths)
                if overlap is not None:
                    raise _overlap_error(self.step, name, entry.shape, overlap, piece.box)
                parts.pieces.append(piece)
                parts.texts.append(encode_piece(piece))

    def _add_v2(self, report: ShardIndex) -> None:
        """A v2 report: its index file, its files and timing, and the layouts it describes
        (a few per rank); its pieces stay in its index file."""
        writer = report.writer
        assert writer is not None
        for name, entry in report.tensors.items():
            known = self._layouts.get(name)
            if known is not None and known != entry:
                raise CoordinationError(
                    f"step {self.step}: ranks disagree on tensor {name!r}: "
                    f"{known.dtype}{list(known.shape)} vs {entry.dtype}{list(entry.shape)} "
                    f"(rank {report.rank}), or on who writes which part of it"
                )
        self.ranks.add(report.rank)
        self._writers[report.rank] = writer
        self._plans.add(report.plan)
        if report.timing is not None:  # stored bytes: its data files, as in v1
            data = sum(report.files.values()) - report.files.get(writer.index, 0)
            self._timings[report.rank] = (report.timing, data)
        self._files.update(report.files)
        if report.state is not None:
            self._states[report.rank] = report.state
        self._layouts.update(report.tensors)

    def _writer_refs(self, world_size: int) -> tuple[WriterRef, ...]:
        if sorted(self._writers) != list(range(world_size)):
            raise CoordinationError(
                f"step {self.step}: {len(self._writers)} of {world_size} ranks reported their "
                "index files"
            )
        return tuple(self._writers[r] for r in range(world_size))

    def _plan(self) -> PlanRecord | None:
        """The write plan every rank reported saving with, if they all reported the same."""
        return next(iter(self._plans)) if len(self._plans) == 1 else None

    def render(
        self,
        *,
        generation: str,
        world_size: int,
        chunk_bytes: int,
        created_unix: float,
        user_metadata: Mapping[str, Any] | None = None,
        layout: Mapping[str, Any] | None = None,
        commit_seconds: float | None = None,
    ) -> bytes:
        """The sealed manifest; ``InvalidStateError`` when the pieces do not cover some tensor.

        With ``commit_seconds`` (the committer's time from holding every report to now),
        the manifest records every rank's timing, when every rank reported one.
        """
        v2 = bool(self._writers)
        if not v2:
            self._check_covered()
        state, partial = self._state_value()
        header = manifest_header(
            step=self.step,
            generation=generation,
            world_size=world_size,
            created_unix=created_unix,
            chunk_bytes=chunk_bytes,
            files=dict(sorted(self._files.items())),
            state=state,
            partial_maps=partial,
            layout=dict(layout or {}),
            user_metadata=dict(user_metadata or {}),
            headers=dict(sorted(self._headers.items())),
            timings=self.timings(world_size, commit_seconds),
            writers=self._writer_refs(world_size) if v2 else (),
            plan=self._plan(),
        )
        if v2:
            tensors = ((name, encode_entry(e)) for name, e in self._layouts.items())
        else:
            tensors = (
                (name, tensor_json(t.dtype, t.shape, t.texts)) for name, t in self._tensors.items()
            )
        return render_manifest(header, tensors)

    def build(
        self,
        *,
        generation: str,
        world_size: int,
        chunk_bytes: int,
        created_unix: float | None = None,
        user_metadata: Mapping[str, Any] | None = None,
        layout: Mapping[str, Any] | None = None,
        commit_seconds: float | None = None,
    ) -> Manifest:
        """The manifest as objects (``commit_seconds`` as for ``render``).

        Raises ``InvalidStateError`` when the pieces do not tile some tensor.
        """
        writers: tuple[WriterRef, ...] = ()
        if self._writers:
            writers = self._writer_refs(world_size)
            tensors = dict(self._layouts)
        else:
            self._check_covered()
            tensors = {
                name: TensorEntry(t.dtype, t.shape, tuple(t.pieces))
                for name, t in self._tensors.items()
            }
        state, partial = self._state_value()
        return Manifest(
            step=self.step,
            generation=generation,
            world_size=world_size,
            chunk_bytes=chunk_bytes,
            tensors=tensors,
            files=dict(sorted(self._files.items())),
            state=state,
            partial_maps=tuple(tuple(p) for p in partial),
            created_unix=time.time() if created_unix is None else created_unix,
            user_metadata=dict(user_metadata or {}),
            layout=dict(layout or {}),
            headers=dict(sorted(self._headers.items())),
            timings=self.timings(world_size, commit_seconds),
            writers=writers,
            plan=self._plan() if writers else None,
        )

    def timings(self, world_size: int, commit_seconds: float | None) -> SaveTimings | None:
        """Every rank's timing as columns; None unless ranks 0 to ``world_size - 1`` each
        reported one and the committer measured ``commit_seconds``."""
        if commit_seconds is None or len(self._timings) != world_size:
            return None
        if any(r not in self._timings for r in range(world_size)):
            return None
        ranks = [self._timings[r] for r in range(world_size)]
        return SaveTimings.of_ranks(
            [timing for timing, _ in ranks], [nbytes for _, nbytes in ranks], commit_seconds
        )

    def _state_value(self) -> tuple[dict[str, Any], list[list[str]]]:
        """The saved state tree: the union of the trees reported, the lower rank's value
        where two hold the same place; and the mappings not every tree held in full."""
        if len(self._states) <= 1:
            return next(iter(self._states.values()), {}), []
        return merge_trees([self._states[r] for r in sorted(self._states)])

    def _check_covered(self) -> None:
        # Readers refuse a tensor whose pieces do not tile it; never commit one. Overlaps
        # were refused as pieces came; with none, the right count means no hole.
        for name, parts in self._tensors.items():
            total = math.prod(parts.shape)
            if parts.tiling.covered != total:
                raise InvalidStateError(
                    f"step {self.step}: tensor {name!r} of global shape {list(parts.shape)}: the "
                    "saved "
                    f"shards cover {parts.tiling.covered} of {total} elements; each element must "
                    "be "
                    "saved by exactly one rank (check ShardedTensor offsets and global_shape). Not "
                    "committed"
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
    reports_in: float | None = None,
    partial_maps: tuple[tuple[str, ...], ...] = (),
) -> Manifest:
    """One manifest from every rank's index; data file paths become relative to the step prefix.

    ``reports_in`` (a ``time.perf_counter`` value) is when the committer held every index:
    with it, the manifest records the ranks' timings and the committer's merge time.
    ``partial_maps`` replaces those of the indexes' trees, for writers that hand over one
    tree already merged (an offline conversion, the DCP writer).
    """
    builder = ManifestBuilder(step)
    for index in sorted(indexes, key=lambda i: i.rank):
        builder.add(index)
    manifest = builder.build(
        generation=generation,
        world_size=world_size,
        chunk_bytes=chunk_bytes,
        user_metadata=user_metadata,
        layout=layout,
        commit_seconds=None if reports_in is None else time.perf_counter() - reports_in,
    )
    if partial_maps:
        manifest = msgspec.structs.replace(manifest, partial_maps=partial_maps)
    return manifest


def _overlap_error(
    step: int, name: str, shape: tuple[int, ...], first: Box, second: Box
) -> InvalidStateError:
    # The right count can still hide a hole: shards that overlap leave elements unsaved.
    return InvalidStateError(
        f"step {step}: tensor {name!r} of global shape {list(shape)}: saved shards "
        f"{first} and {second} overlap, so other elements are never saved; each "
        "element must be saved by exactly one rank (check ShardedTensor offsets). Not committed"
    )


def publish(backend: StorageBackend, manifest: Manifest) -> None:
    """Write the manifest with an atomic create; refuse when the step is already committed."""
    publish_bytes(
        backend, manifest.step, manifest.generation, manifest.to_bytes(), files=manifest.files
    )


def publish_bytes(
    backend: StorageBackend, step: int, generation: str, data: bytes, *, files: Mapping[str, int]
) -> None:
    """``publish`` of a manifest already rendered (``ManifestBuilder.render``).

    The data files the manifest names (``files``: paths relative to the step prefix) are
    checked right before the manifest is created and again right after: another process
    (``ckpt gc``, a job sharing the root) may have deleted the step's prefix meanwhile,
    and a local ``put_if_absent`` would recreate the directory for the manifest alone.
    When they vanished after the manifest was created, the manifest is deleted again.

    Raises:
        SaveAbortedError: data files are missing; the step is not committed.
        AlreadyCommittedError: the step is already committed.
    """
    path = manifest_path(step)
    check_data_files(backend, step, files)
    try:
        with storage_errors(f"committing {path} under {backend.url}"):
            created = backend.put_if_absent(path, data)
    except CheckpointNotFoundError as exc:  # the step's directory was deleted under it
        raise data_files_vanished(step, backend.url, str(exc)) from exc
    if not created:
        raise AlreadyCommittedError(
            f"step {step} under {backend.url} is already committed by another writer; "
            f"this save (generation {generation}) was not committed. Save another step, or "
            f"delete {step_prefix(step)}/ first if you mean to replace it"
        )
    try:
        check_data_files(backend, step, files, published=True)
    except CheckpointError:
        # Never leave a manifest that may name missing files: withdraw it, fail the save.
        with storage_errors(f"withdrawing {path} under {backend.url}"):
            backend.delete([path])
        raise


def check_data_files(
    backend: StorageBackend, step: int, files: Mapping[str, int], *, published: bool = False
) -> None:
    """Every data file in ``files`` exists under ``step``'s prefix (one listing).

    Their sizes are not read again: file names are unique per save, and their writers
    recorded the sizes they made durable. What a listing catches is what happens to
    them: a prefix deleted by garbage collection under a save.

    Raises:
        SaveAbortedError: some are missing (``data_files_vanished``).
    """
    prefix = step_prefix(step)
    with storage_errors(f"listing {prefix} under {backend.url} before its commit"):
        present = set(backend.list_objects(prefix))
    missing = sorted(p for p in files if f"{prefix}/{p}" not in present)
    if missing:
        raise data_files_vanished(
            step,
            backend.url,
            f"{len(missing)} of {len(files)} are missing, e.g. {prefix}/{missing[0]}",
            published=published,
        )


def data_files_vanished(
    step: int, url: str, detail: str, *, published: bool = False
) -> SaveAbortedError:
    """The error of a save whose data files were deleted under it."""
    when = "while its manifest was published (the manifest was withdrawn)" if published else ""
    return SaveAbortedError(
        f"data files of step {step} under {url} disappeared during the save"
        f"{' ' + when if when else ''} ({detail}): was `ckpt gc` or another job using the "
        "same root? Step not committed; the previous committed checkpoint is intact"
    )
