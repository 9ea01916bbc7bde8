"""The save engine: one ``SaveJob`` per save, run through three phases.

``Snapshotter.save_flat`` (training thread) agrees with the other ranks on who writes
what (``ckpt.engine._plan``: a replicated tensor once, large ones cut into row ranges spread
over their holders), lays this rank's pieces out in data files (``plan_files``), takes
a staging buffer and builds the job. Then:

1. ``stage`` (training thread, the only part training waits for): copy every piece
   from its device into the host buffer (``ckpt.engine._staging``: pinned memory and a CUDA
   side stream + event where CUDA exists). With ``overlap_writes`` each raw data file
   starts streaming as soon as it is staged.
2. ``persist`` (the persist thread, fanning out to the I/O pool): encode (safetensors
   layout or chunked zstd), checksum and write every data file. Each I/O task returns
   a ``WrittenFile``: where each piece's bytes went, and their checksums.
3. ``commit`` (the persist thread): build the shard index from those ``WrittenFile``
   values and report it to the coordinator, which publishes the manifest on the
   committer.

Threads: the training thread builds the job and runs ``stage``; the job is frozen, so
the persist and I/O threads only read it, and results travel as return values
(futures) from phase to phase. Collectives (the planning ``all_gather``) run in the
training thread only; the background reaches the other ranks through the
coordinator's ``commit`` and ``report_failure`` alone. A rank whose staging or writing
fails removes its partial files and aborts the step for every rank
(``report_failure``), so nobody waits for it.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ckpt.coordination import Coordinator, data_files_vanished
from ckpt.engine._flatten import FlatTensor
from ckpt.engine._options import SaveOptions
from ckpt.engine._staging import StagingBuffer, StagingPool, align
from ckpt.errors import AlreadyCommittedError, CheckpointNotFoundError, storage_errors
from ckpt.format import (
    DATA_DIR,
    Box,
    FileHeader,
    Manifest,
    RankTiming,
    ShardIndex,
    StoredPiece,
    TensorEntry,
    checksum,
    chunk_checksums,
    compress_chunks,
    safetensors_header,
    step_prefix,
)
from storage_backends import StorageBackend

log = logging.getLogger(__name__)


# -- the plan of this rank's data files -----------------------------------------------


@dataclass(frozen=True)
class PlannedPiece:
    """One piece this rank writes, and where its bytes sit before and after encoding.

    Attributes:
        tensor: the piece (a whole local tensor, or a range of its rows).
        buffer_offset: where it is staged in the host buffer.
        nbytes: its raw size.
        data_offset: where it starts in its raw file's data section (after the header).
    """

    tensor: FlatTensor
    buffer_offset: int
    nbytes: int
    data_offset: int


@dataclass(frozen=True)
class DataFile:
    """One data file this rank writes: its pieces lie back to back in the staging buffer.

    Attributes:
        path: relative to the step prefix.
        compressed: chunked zstd (``.zst``) rather than a safetensors file.
        pieces: in file order.
        buffer_offset: where the first piece is staged.
        nbytes: raw bytes of all pieces.
        header: the safetensors header (empty when compressed).
    """

    path: str
    compressed: bool
    pieces: tuple[PlannedPiece, ...]
    buffer_offset: int
    nbytes: int
    header: bytes


@dataclass(frozen=True)
class WrittenFile:
    """What an I/O task durably wrote: one data file.

    Attributes:
        path: relative to the step prefix.
        stored_bytes: its size on storage (header included).
        pieces: tensor name -> where that piece's bytes are, with their checksums.
        header: a raw file's safetensors header, with its checksum (None when compressed).
    """

    path: str
    stored_bytes: int
    pieces: Mapping[str, StoredPiece]
    header: FileHeader | None = None


def part_of(t: FlatTensor, box: Box) -> FlatTensor:
    """The part of ``t`` inside ``box``: all of it, or a range of its rows (a view, no copy)."""
    if box == t.box:
        return t
    return replace(t, local=t.local[box.relative_to(t.box)], box=box)


def _storage_view(local: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(local) if local.is_complex() else local


def plan_files(
    tensors: list[FlatTensor], options: SaveOptions, *, generation: str, rank: int
) -> tuple[list[DataFile], int]:
    """Group this rank's pieces into data files balanced by bytes; place them in the buffer.

    Returns:
        The files and the staging bytes they need.
    """
    raw, compressed = [], []
    for t in tensors:
        if options.compression is not None and options.compression.applies_to(t.name, t.nbytes):
            compressed.append(t)
        else:
            raw.append(t)
    files: list[DataFile] = []
    # Unique per save: a writer of an earlier, failed attempt at the same step can never
    # replace a file of this one.
    nonce = uuid.uuid4().hex[:8]
    offset = 0
    for group, is_compressed, suffix in ((raw, False, "safetensors"), (compressed, True, "zst")):
        if not group:
            continue
        total = sum(t.nbytes for t in group)
        count = max(1, min(len(group), math.ceil(total / options.file_bytes)))
        bins: list[list[FlatTensor]] = [[] for _ in range(count)]
        loads = [0] * count
        for t in sorted(group, key=lambda t: (-t.nbytes, t.name)):
            k = loads.index(min(loads))
            bins[k].append(t)
            loads[k] += t.nbytes
        for members in bins:
            path = f"{DATA_DIR}/{generation}-r{rank:05d}-{nonce}-{len(files):03d}.{suffix}"
            # Widest elements first keeps every tensor aligned to its element size.
            members.sort(key=lambda t: (-t.local.element_size(), t.name))
            pieces, cursor = [], 0
            for t in members:
                pieces.append(PlannedPiece(t, offset + cursor, t.nbytes, cursor))
                cursor += t.nbytes
            header = b"" if is_compressed else _safetensors_header(members)
            files.append(DataFile(path, is_compressed, tuple(pieces), offset, cursor, header))
            offset = align(offset + cursor)
    return files, offset


def _safetensors_header(members: list[FlatTensor]) -> bytes:
    return safetensors_header(
        [(t.name, t.dtype, tuple(t.local.shape)) for t in members],
        {"format": "pt", "writer": "ckpt"},
    )


# -- the job and its three phases -----------------------------------------------------


@dataclass(frozen=True, eq=False)
class SaveJob:
    """Everything one rank's save of one step needs, from staging to commit.

    Attributes:
        step: the step saved.
        rank: this rank.
        backend: where the data files and the manifest go.
        coordinator: the phases reach it only through ``commit`` and ``report_failure``
            (the plan's collective ran before the job was built).
        options: layout and I/O settings.
        tensors: every piece this rank holds (the index lists those it does not write
            with no stored piece).
        tree: the state's structure and plain values (rank 0 only).
        files: this rank's data files.
        buffer: the staging buffer the files' pieces are copied into.
        imbalance: the busiest rank's planned bytes over the mean.
        user_metadata: stored in the manifest.
        on_committed: called with the manifest on the rank that published it.
        started_unix: wall-clock time the save began on this rank (its timing's start).
    """

    step: int
    rank: int
    backend: StorageBackend
    coordinator: Coordinator
    options: SaveOptions
    tensors: Mapping[str, FlatTensor]
    tree: dict[str, Any] | None
    files: tuple[DataFile, ...]
    buffer: StagingBuffer
    imbalance: float
    user_metadata: Mapping[str, Any]
    on_committed: Callable[[Manifest], None] | None
    started_unix: float = 0.0
    host: memoryview = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # The buffer's bytes, as the I/O tasks read them.
        host = memoryview(self.buffer.data.numpy()).cast("B")  # type: ignore[arg-type]
        object.__setattr__(self, "host", host)

    @property
    def prefix(self) -> str:
        return step_prefix(self.step)


def stage(
    job: SaveJob, pool: StagingPool, io: ThreadPoolExecutor, *, overlap_writes: bool
) -> list[Future[WrittenFile]]:
    """Copy every piece of ``job`` from its device into the staging buffer.

    The only phase training waits for. With ``overlap_writes`` each raw data file
    starts streaming on ``io`` as soon as it is staged, while later files are still
    being copied.

    Returns:
        The writes already started (none without ``overlap_writes``).

    Raises:
        BaseException: whatever the copy raised, after waiting for the writes already
            started (the buffer may only be reused once nobody reads it), removing this
            save's files, freeing the buffer and aborting the step for every rank.
    """
    started: list[Future[WrittenFile]] = []
    groups = [(f,) for f in job.files] if overlap_writes else [job.files]
    try:
        for group in groups:
            pool.copy_in([_copy_pair(job.buffer, p) for f in group for p in f.pieces])
            if overlap_writes:
                started += [io.submit(_write_raw_file, job, f) for f in group if not f.compressed]
    except BaseException as exc:
        for write in started:
            write.exception()
        _discard(job)
        pool.release(job.buffer)
        tell_the_others(job.coordinator, job.backend, job.step, exc)
        raise
    return started


def _copy_pair(buffer: StagingBuffer, piece: PlannedPiece) -> tuple[torch.Tensor, torch.Tensor]:
    """(source, host destination) of one piece: the buffer's bytes seen as its dtype and shape."""
    src = _storage_view(piece.tensor.local)
    dst = buffer.view(piece.buffer_offset, piece.nbytes).view(src.dtype).view(src.shape)
    return src, dst


def persist(
    job: SaveJob, io: ThreadPoolExecutor, started: Sequence[Future[WrittenFile]]
) -> list[WrittenFile]:
    """Encode, checksum and write every data file of ``job`` durably.

    Raw files: one I/O task each, hashing every block just before writing it (``started``
    holds them when ``stage`` began them). Compressed pieces: compressed in blocks on
    ``io``, hashed here, then their files written.

    Returns:
        What each file holds, in the order of ``job.files``.

    Raises:
        BaseException: the first failure, after every task ended and this save's files
            were removed.
    """
    writes: list[Future[WrittenFile]] = list(started) or [
        io.submit(_write_raw_file, job, f) for f in job.files if not f.compressed
    ]
    encoded, errors = _compress(job, io)
    if not errors:
        writes += [
            io.submit(_write_compressed_file, job, f, encoded) for f in job.files if f.compressed
        ]
    written: dict[str, WrittenFile] = {}
    for w in writes:
        try:
            result = w.result()
        except BaseException as exc:
            errors.append(exc)
        else:
            written[result.path] = result
    if errors:
        _discard(job)
        if isinstance(errors[0], CheckpointNotFoundError):
            # Only a deleted prefix makes a write "not found" (local: the temporary file).
            raise data_files_vanished(job.step, job.backend.url, str(errors[0])) from errors[0]
        raise errors[0]
    return [written[f.path] for f in job.files]


def commit(
    job: SaveJob, written: Sequence[WrittenFile], timing: RankTiming | None = None
) -> Manifest | None:
    """Report what this rank wrote, and how long its phases took (``timing``, recorded in
    the manifest); the coordinator publishes the manifest on the committer.

    Returns:
        The manifest on the rank that published it, else None.
    """
    try:
        manifest = job.coordinator.commit(
            job.backend,
            job.step,
            shard_index(job, written, timing),
            chunk_bytes=job.options.chunk_bytes,
            user_metadata=job.user_metadata,
        )
    except AlreadyCommittedError:
        _discard(job)  # no manifest will ever name them
        raise
    if manifest is not None and job.on_committed is not None:
        job.on_committed(manifest)
    return manifest


def shard_index(
    job: SaveJob, written: Sequence[WrittenFile], timing: RankTiming | None = None
) -> ShardIndex:
    """This rank's report: every piece it holds, with where it stored those it wrote."""
    stored = {name: piece for w in written for name, piece in w.pieces.items()}
    entries = {
        name: TensorEntry(t.dtype, t.global_shape, (stored[name],) if name in stored else ())
        for name, t in job.tensors.items()
    }
    files = {w.path: w.stored_bytes for w in written}
    headers = {w.path: w.header for w in written if w.header is not None}
    return ShardIndex(
        rank=job.rank,
        tensors=entries,
        files=files,
        state=job.tree,
        headers=headers,
        timing=timing,
    )


# -- encoding and writing one data file (I/O threads) ---------------------------------


@dataclass(frozen=True)
class _Encoded:
    """One piece compressed: a zstd frame per chunk, and the frames' checksums."""

    frames: list[bytes]
    checksums: str


def _compress(
    job: SaveJob, io: ThreadPoolExecutor
) -> tuple[dict[str, _Encoded], list[BaseException]]:
    """Compress every compressed piece of ``job`` in blocks on ``io``; wait for all blocks.

    Returns:
        The pieces by tensor name, and the errors of those that failed (left out).
    """
    opts = job.options
    block = opts.write_block_bytes
    level = opts.compression.level if opts.compression else 3
    blocks_of: list[tuple[PlannedPiece, list[Future[list[bytes]]]]] = []
    for f in job.files:
        if not f.compressed:
            continue
        for p in f.pieces:
            view = job.host[p.buffer_offset : p.buffer_offset + p.nbytes]
            blocks = [view[i : i + block] for i in range(0, p.nbytes, block)]
            futures = [io.submit(compress_chunks, b, opts.chunk_bytes, level) for b in blocks]
            blocks_of.append((p, futures))
    encoded: dict[str, _Encoded] = {}
    errors: list[BaseException] = []
    for p, futures in blocks_of:
        try:
            results = [part.result() for part in futures]
        except BaseException as exc:
            errors.append(exc)
            continue
        frames = [frame for result in results for frame in result]
        encoded[p.tensor.name] = _Encoded(frames, "".join(checksum(fr) for fr in frames))
    return encoded, errors


def _write_raw_file(job: SaveJob, f: DataFile) -> WrittenFile:
    """Stream one safetensors file from the staging buffer, hashing each block as it goes."""
    path = f"{job.prefix}/{f.path}"
    host = job.host
    block = job.options.write_block_bytes
    chunk_bytes = job.options.chunk_bytes
    header = len(f.header)
    pieces: dict[str, StoredPiece] = {}
    with storage_errors(f"writing {path} under {job.backend.url}"):
        stream = job.backend.open_stream(path)
        try:
            stream.write(f.header)
            # Pieces lie back to back in the buffer: write in large blocks, hashing each
            # piece's block (chunk-aligned to the piece) right before it goes out.
            written = f.buffer_offset
            for p in f.pieces:
                digests = []
                for i in range(0, p.nbytes, block):
                    end = p.buffer_offset + min(i + block, p.nbytes)
                    digests.append(chunk_checksums(host[p.buffer_offset + i : end], chunk_bytes))
                    if end - written >= block:
                        stream.write(host[written:end])
                        written = end
                pieces[p.tensor.name] = StoredPiece.at(
                    box=p.tensor.box,
                    file=f.path,
                    byte_offset=header + p.data_offset,
                    byte_length=p.nbytes,
                    codec="raw",
                    checksums="".join(digests),
                )
            if written < f.buffer_offset + f.nbytes:
                stream.write(host[written : f.buffer_offset + f.nbytes])
            stream.commit()
        except BaseException:
            stream.abort()
            raise
    return WrittenFile(f.path, header + f.nbytes, pieces, FileHeader(header, checksum(f.header)))


def _write_compressed_file(
    job: SaveJob, f: DataFile, encoded: Mapping[str, _Encoded]
) -> WrittenFile:
    """Write one file of zstd frames, its pieces back to back."""
    path = f"{job.prefix}/{f.path}"
    pieces: dict[str, StoredPiece] = {}
    offset = 0
    with storage_errors(f"writing {path} under {job.backend.url}"):
        stream = job.backend.open_stream(path)
        try:
            for p in f.pieces:
                piece = encoded[p.tensor.name]
                start = offset
                for frame in piece.frames:
                    stream.write(frame)
                    offset += len(frame)
                pieces[p.tensor.name] = StoredPiece.at(
                    box=p.tensor.box,
                    file=f.path,
                    byte_offset=start,
                    byte_length=offset - start,
                    codec="zstd",
                    checksums=piece.checksums,
                    chunk_sizes=tuple(len(fr) for fr in piece.frames),
                )
            stream.commit()
        except BaseException:
            stream.abort()
            raise
    return WrittenFile(f.path, offset, pieces)


def _discard(job: SaveJob) -> None:
    """Remove this save's data files (whichever exist)."""
    try:
        job.backend.delete(f"{job.prefix}/{f.path}" for f in job.files)
    except Exception as exc:  # the partial step is garbage either way; GC removes it later
        log.warning(
            "could not remove partial files under %s/%s: %s", job.backend.url, job.prefix, exc
        )


def tell_the_others(
    coordinator: Coordinator, backend: StorageBackend, step: int, exc: BaseException
) -> None:
    """This rank cannot save ``step``: abort it now, so the other ranks fail fast."""
    try:
        coordinator.report_failure(backend, step, repr(exc))
    except Exception as report_exc:  # the step fails either way
        log.warning("step %d: could not tell the other ranks: %s", step, report_exc)
