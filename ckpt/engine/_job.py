"""The save engine: one ``SaveJob`` per save, run through three phases.

``Snapshotter.save_flat`` (training thread) agrees with the other ranks on who writes
what (``ckpt.engine._plan``: a replicated tensor once, large ones cut into row ranges spread
over their holders), lays this rank's pieces out in data files (``plan_files``), takes
a staging buffer and builds the job. Then:

1. ``stage`` (training thread, the only part training waits for): copy every piece
   from its device into the host buffer (``ckpt.engine._staging``: pinned memory and a CUDA
   side stream + event where CUDA exists). With ``overlap_writes`` each raw data file
   starts streaming as soon as it is staged. Under a staging budget smaller than the
   rank's data, the files come in buckets that take turns in the one buffer: every
   bucket but the last is staged and written here, the last one only staged.
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

import heapq
import itertools
import logging
import math
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import msgspec
import torch

from ckpt.coordination import Coordinator, data_files_vanished
from ckpt.engine._flatten import FlatTensor
from ckpt.engine._options import SaveOptions
from ckpt.engine._plan import WholePlan
from ckpt.engine._staging import StagingBuffer, StagingPool, align
from ckpt.errors import (
    AlreadyCommittedError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidStateError,
    storage_errors,
)
from ckpt.format import (
    DATA_DIR,
    Box,
    FileHeader,
    Manifest,
    PlanRecord,
    RankTiming,
    ShardIndex,
    StoredPiece,
    TensorEntry,
    WriterRef,
    checksum,
    chunk_checksums,
    compress_chunks,
    safetensors_header,
    seal_digest,
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
        buffer_offset: where the first piece is staged, from the start of the buffer.
        nbytes: raw bytes of all pieces.
        header: the safetensors header (empty when compressed).
        bucket: the files of one bucket are in the staging buffer together; buckets are
            staged one after another (always 0 without a staging budget).
    """

    path: str
    compressed: bool
    pieces: tuple[PlannedPiece, ...]
    buffer_offset: int
    nbytes: int
    header: bytes
    bucket: int = 0


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
    tensors: list[FlatTensor],
    options: SaveOptions,
    *,
    generation: str,
    rank: int,
    budget: int | None = None,
) -> tuple[list[DataFile], int]:
    """Group this rank's pieces into data files balanced by bytes; place them in the buffer.

    Args:
        tensors: the pieces this rank writes.
        options: the layout settings (``file_bytes``, ``io_threads``, compression).
        generation: the writer's generation, part of every file name.
        rank: this rank, part of every file name.
        budget: the most bytes the staging buffer may hold (None: no limit). When the
            pieces need more, each is cut into regions of at most ``budget /
            io_threads`` bytes (``cut_to_fit``), files are kept to that size and grouped
            into buckets of at most ``budget`` bytes, staged one after another.

    Returns:
        The files, bucket by bucket, and the staging bytes they need (the largest bucket).
    """
    # Unique per save: a writer of an earlier, failed attempt at the same step can never
    # replace a file of this one.
    nonce = uuid.uuid4().hex[:8]
    groups = _by_codec(tensors, options)
    members = [
        (is_compressed, group)
        for is_compressed, pieces in groups
        for group in _balanced(pieces, options.file_bytes)
    ]
    if budget is not None and _staged_bytes([m for _, m in members]) > budget:
        most = max(64, min(options.file_bytes, budget // options.io_threads))
        members = [
            (is_compressed, group)
            for is_compressed, pieces in groups
            for group in _packed([c for t in pieces for c in cut_to_fit(t, most)], most)
        ]
        buckets = _packed_files(members, budget)
    else:
        buckets = [members]
    files: list[DataFile] = []
    largest = 0
    for bucket, contents in enumerate(buckets):
        offset = 0
        for is_compressed, group in contents:
            suffix = "zst" if is_compressed else "safetensors"
            path = f"{DATA_DIR}/{generation}-r{rank:05d}-{nonce}-{len(files):03d}.{suffix}"
            # Widest elements first keeps every tensor aligned to its element size.
            group.sort(key=lambda t: (-t.local.element_size(), t.name, t.box.offsets))
            pieces, cursor = [], 0
            for t in group:
                pieces.append(PlannedPiece(t, offset + cursor, t.nbytes, cursor))
                cursor += t.nbytes
            header = b"" if is_compressed else _safetensors_header(group)
            files.append(
                DataFile(path, is_compressed, tuple(pieces), offset, cursor, header, bucket)
            )
            offset = align(offset + cursor)
        largest = max(largest, offset)
    return files, largest


def _by_codec(
    tensors: list[FlatTensor], options: SaveOptions
) -> list[tuple[bool, list[FlatTensor]]]:
    """(compressed, pieces): the raw pieces, then the compressed ones (groups not empty)."""
    raw, compressed = [], []
    for t in tensors:
        if options.compression is not None and options.compression.applies_to(t.name, t.nbytes):
            compressed.append(t)
        else:
            raw.append(t)
    return [(flag, group) for flag, group in ((False, raw), (True, compressed)) if group]


def _balanced(group: list[FlatTensor], file_bytes: int) -> list[list[FlatTensor]]:
    """``group`` in about ``total / file_bytes`` files of even sizes (largest piece first to
    the least loaded file), so that several are written in parallel."""
    total = sum(t.nbytes for t in group)
    count = max(1, min(len(group), math.ceil(total / file_bytes)))
    bins: list[list[FlatTensor]] = [[] for _ in range(count)]
    loads = [0] * count
    for t in sorted(group, key=lambda t: (-t.nbytes, t.name)):
        k = loads.index(min(loads))
        bins[k].append(t)
        loads[k] += t.nbytes
    return bins


def _staged_bytes(groups: list[list[FlatTensor]]) -> int:
    return sum(align(sum(t.nbytes for t in group)) for group in groups)


def _packed(pieces: list[FlatTensor], most: int) -> list[list[FlatTensor]]:
    """Files of at most ``most`` bytes each (every piece fits), as even as the pieces allow:
    largest first into the least loaded file it fits, a new file when none does. Two regions
    of one tensor never share a file (a file names each tensor once)."""
    total = sum(t.nbytes for t in pieces)
    bins: list[list[FlatTensor]] = [[] for _ in range(max(1, math.ceil(total / most)))]
    names: list[set[str]] = [set() for _ in bins]
    heap = [(0, k) for k in range(len(bins))]
    for t in sorted(pieces, key=lambda t: (-t.nbytes, t.name, t.box.offsets)):
        passed, chosen = [], None
        while heap and heap[0][0] + t.nbytes <= most:
            entry = heapq.heappop(heap)
            if t.name not in names[entry[1]]:
                chosen = entry
                break
            passed.append(entry)
        if chosen is None:
            chosen = (0, len(bins))
            bins.append([])
            names.append(set())
        load, k = chosen
        bins[k].append(t)
        names[k].add(t.name)
        heapq.heappush(heap, (load + t.nbytes, k))
        for entry in passed:
            heapq.heappush(heap, entry)
    return [b for b in bins if b]


def _packed_files(
    files: list[tuple[bool, list[FlatTensor]]], budget: int
) -> list[list[tuple[bool, list[FlatTensor]]]]:
    """Buckets of files whose staged (aligned) sizes add up to at most ``budget`` each:
    largest first into the least loaded bucket it fits, a new bucket when none does."""
    sizes = [align(sum(t.nbytes for t in group)) for _, group in files]
    buckets: list[list[tuple[bool, list[FlatTensor]]]] = [
        [] for _ in range(max(1, math.ceil(sum(sizes) / budget)))
    ]
    heap = [(0, k) for k in range(len(buckets))]
    for size, entry in sorted(zip(sizes, files), key=lambda x: -x[0]):
        if heap[0][0] + size <= budget:
            load, k = heapq.heappop(heap)
        else:
            load, k = 0, len(buckets)
            buckets.append([])
        buckets[k].append(entry)
        heapq.heappush(heap, (load + size, k))
    return [b for b in buckets if b]


def cut_to_fit(t: FlatTensor, most: int) -> list[FlatTensor]:
    """``t`` whole when it has at most ``most`` bytes, else rectangular regions of it that
    each do, tiling it: even ranges of rows (dimension 0) or, when a single row is larger,
    ranges along the first dimension whose slices fit, for each index of the dimensions
    before it. ``most`` must hold one element.
    """
    if t.nbytes <= most:
        return [t]
    offsets, lengths = t.box.offsets, t.box.lengths
    dim = len(lengths) - 1
    slice_bytes = t.local.element_size()  # bytes of one index along ``dim``
    while dim > 0 and slice_bytes * lengths[dim] <= most:
        slice_bytes *= lengths[dim]
        dim -= 1
    count = math.ceil(lengths[dim] / (most // slice_bytes))
    size, longer = divmod(lengths[dim], count)
    ranges, start = [], 0
    for k in range(count):
        n = size + (k < longer)
        ranges.append((start, n))
        start += n
    regions = []
    for index in itertools.product(*(range(n) for n in lengths[:dim])):
        head = tuple(o + i for o, i in zip(offsets, index))
        for start, n in ranges:
            box = Box(
                (*head, offsets[dim] + start, *offsets[dim + 1 :]),
                ((1,) * dim) + (n, *lengths[dim + 1 :]),
            )
            regions.append(part_of(t, box))
    return regions


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
        tree: the state's structure and plain values (only on the ranks that send it:
            rank 0 and the first rank of each differing tree, see ``Agreed``).
        files: this rank's data files.
        buffer: the staging buffer the files' pieces are copied into.
        imbalance: the busiest rank's planned bytes over the mean.
        user_metadata: stored in the manifest.
        on_committed: called with the manifest on the rank that published it.
        started_unix: wall-clock time the save began on this rank (its timing's start).
        layouts: format v2: the layouts this rank describes (``described_layouts``, worked
            out in the background); None: format v1, the rank reports its pieces to the
            committer.
        index_path: this rank's index file (format v2), relative to the step prefix.
        plan: format v2: the write plan the save was made with, for the manifest (None
            for a save planned alone).
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
    layouts: Future[dict[str, TensorEntry]] | None = None
    index_path: str = ""
    plan: PlanRecord | None = None
    host: memoryview = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # The buffer's bytes, as the I/O tasks read them.
        host = memoryview(self.buffer.data.numpy()).cast("B")  # type: ignore[arg-type]
        object.__setattr__(self, "host", host)

    @property
    def prefix(self) -> str:
        return step_prefix(self.step)

    @property
    def buckets(self) -> list[tuple[DataFile, ...]]:
        """The files in staging order, bucket by bucket (one bucket without a budget)."""
        return [tuple(fs) for _, fs in itertools.groupby(self.files, key=lambda f: f.bucket)]


def stage(
    job: SaveJob, pool: StagingPool, io: ThreadPoolExecutor, *, overlap_writes: bool
) -> dict[str, Future[WrittenFile]]:
    """Copy every piece of ``job`` from its device into the staging buffer.

    The only phase training waits for. With ``overlap_writes`` each raw data file
    starts streaming on ``io`` as soon as it is staged, while later files are still
    being copied. Under a staging budget every bucket but the last is written (and
    waited for) before the next one is copied over it, so once this returns the state
    may change: all of it is on the host or durable.

    Returns:
        The writes already started or finished, by file path.

    Raises:
        BaseException: whatever the copy or a write raised, after waiting for the writes
            already started (the buffer may only be reused once nobody reads it),
            removing this save's files, freeing the buffer and aborting the step for
            every rank.
    """
    started: dict[str, Future[WrittenFile]] = {}
    buckets = job.buckets
    try:
        for n, bucket in enumerate(buckets, start=1):
            groups = [(f,) for f in bucket] if overlap_writes else [bucket]
            for group in groups:
                pool.copy_in([_copy_pair(job.buffer, p) for f in group for p in f.pieces])
                if overlap_writes:
                    started.update(
                        (f.path, io.submit(_write_raw_file, job, f))
                        for f in group
                        if not f.compressed
                    )
            if n < len(buckets):
                # The next bucket is copied over this one: it must be durable first.
                started.update(_write(job, io, bucket, started))
                log.debug(
                    "step %d (rank %d): bucket %d of %d written",
                    job.step,
                    job.rank,
                    n,
                    len(buckets),
                )
    except BaseException as exc:
        for write in started.values():
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
    job: SaveJob, io: ThreadPoolExecutor, started: Mapping[str, Future[WrittenFile]]
) -> list[WrittenFile]:
    """Encode, checksum and write every data file of ``job`` durably.

    Raw files: one I/O task each, hashing every block just before writing it (``started``
    holds those ``stage`` began or finished). Compressed pieces: compressed in blocks on
    ``io``, hashed here, then their files written.

    Returns:
        What each file holds, in the order of ``job.files``.

    Raises:
        BaseException: the first failure, after every task ended and this save's files
            were removed.
    """
    try:
        writes = _write(job, io, job.files, started)
    except BaseException:
        _discard(job)
        raise
    return [writes[f.path].result() for f in job.files]


def _write(
    job: SaveJob,
    io: ThreadPoolExecutor,
    files: Sequence[DataFile],
    started: Mapping[str, Future[WrittenFile]],
) -> dict[str, Future[WrittenFile]]:
    """Write each of ``files`` that ``started`` does not hold, and wait for all of them.

    Returns:
        Every file's finished write, by path.

    Raises:
        BaseException: the first failure, after every task ended.
    """
    writes = {f.path: started[f.path] for f in files if f.path in started}
    writes.update(
        (f.path, io.submit(_write_raw_file, job, f))
        for f in files
        if not f.compressed and f.path not in writes
    )
    compressed = [f for f in files if f.compressed and f.path not in writes]
    encoded, errors = _compress(job, io, compressed)
    if not errors:
        writes.update(
            (f.path, io.submit(_write_compressed_file, job, f, encoded)) for f in compressed
        )
    for w in writes.values():
        error = w.exception()
        if error is not None:
            errors.append(error)
    if errors:
        if isinstance(errors[0], CheckpointNotFoundError):
            # Only a deleted prefix makes a write "not found" (local: the temporary file).
            raise data_files_vanished(job.step, job.backend.url, str(errors[0])) from errors[0]
        raise errors[0]
    return writes


def commit(
    job: SaveJob, written: Sequence[WrittenFile], timing: RankTiming | None = None
) -> Manifest | None:
    """Report what this rank wrote, and how long its phases took (``timing``, recorded in
    the manifest); the coordinator publishes the manifest on the committer.

    Returns:
        The manifest on the rank that published it, else None.
    """
    try:
        if job.layouts is not None:
            try:
                report = writer_report(job, written, timing)
            except BaseException as exc:  # e.g. shards that do not tile a tensor
                tell_the_others(job.coordinator, job.backend, job.step, exc)
                raise
        else:
            report = shard_index(job, written, timing)
        manifest = job.coordinator.commit(
            job.backend,
            job.step,
            report,
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
    stored: dict[str, list[StoredPiece]] = {}
    for w in written:
        for name, piece in w.pieces.items():
            stored.setdefault(name, []).append(piece)
    entries = {
        name: TensorEntry(t.dtype, t.global_shape, tuple(stored.get(name, ())))
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


def writer_report(
    job: SaveJob, written: Sequence[WrittenFile], timing: RankTiming | None = None
) -> ShardIndex:
    """Format v2: write this rank's index file (the pieces it stored), then the report
    that pins it, with the layouts of the tensors this rank describes."""
    stored: dict[str, list[StoredPiece]] = {}
    for w in written:
        for name, piece in w.pieces.items():
            stored.setdefault(name, []).append(piece)
    files = {w.path: w.stored_bytes for w in written}
    index = ShardIndex(
        rank=job.rank,
        tensors={
            name: TensorEntry(job.tensors[name].dtype, job.tensors[name].global_shape, tuple(p))
            for name, p in stored.items()
        },
        files=files,
        headers={w.path: w.header for w in written if w.header is not None},
    )
    data = index.to_bytes()
    path = f"{job.prefix}/{job.index_path}"
    try:
        with storage_errors(f"writing {job.backend.url}/{path}"):
            job.backend.write(path, data)
    except CheckpointNotFoundError as exc:  # the step's prefix was deleted under the save
        raise data_files_vanished(job.step, job.backend.url, str(exc)) from exc
    assert job.layouts is not None
    # A tensor stored whole by this rank (a replicated one, an optimizer's 0-d step) keeps
    # its pieces in the manifest too: every restoring rank needs it, and reading the index
    # file of each such writer would cost one index file per writer.
    described = {
        name: msgspec.structs.replace(entry, pieces=tuple(stored.get(name, ())))
        if entry.layout is not None and entry.layout.sole_writer == job.rank
        else entry
        for name, entry in job.layouts.result().items()
    }
    return ShardIndex(
        rank=job.rank,
        tensors=described,
        files={**files, job.index_path: len(data)},
        state=job.tree,
        timing=timing,
        writer=WriterRef(job.rank, job.index_path, len(data), seal_digest(data)),
        plan=job.plan,
    )


def described_layouts(
    step: int, rank: int, plan: WholePlan, tensors: Mapping[str, FlatTensor]
) -> dict[str, TensorEntry]:
    """The tensors whose layout ``rank`` reports: those it is the lowest writer of, and
    those nobody writes (empty ones) that it holds. Every rank holds the whole plan."""
    described = {}
    for name, t in tensors.items():
        layout = plan.written_layout(name, rank, t.global_shape)
        if layout is None:
            continue
        try:
            layout.check(t.global_shape, len(plan.bytes_per_rank), f"tensor {name!r}")
        except CorruptCheckpointError as exc:
            raise InvalidStateError(
                f"step {step}: tensor {name!r} of global shape {list(t.global_shape)}: the "
                f"saved shards do not tile it ({exc}); each element must be saved by exactly "
                "one rank (check ShardedTensor offsets and global_shape). Not committed"
            ) from exc
        described[name] = TensorEntry(t.dtype, t.global_shape, (), layout)
    return described


# -- encoding and writing one data file (I/O threads) ---------------------------------


@dataclass(frozen=True)
class _Encoded:
    """One piece compressed: a zstd frame per chunk, and the frames' checksums."""

    frames: list[bytes]
    checksums: str


def _compress(
    job: SaveJob, io: ThreadPoolExecutor, files: Sequence[DataFile]
) -> tuple[dict[tuple[str, str], _Encoded], list[BaseException]]:
    """Compress every piece of the compressed ``files`` in blocks on ``io``; wait for all.

    Returns:
        The pieces by (file path, tensor name), and the errors of those that failed
        (left out).
    """
    opts = job.options
    block = opts.write_block_bytes
    level = opts.compression.level if opts.compression else 3
    blocks_of: list[tuple[str, PlannedPiece, list[Future[list[bytes]]]]] = []
    for f in files:
        for p in f.pieces:
            view = job.host[p.buffer_offset : p.buffer_offset + p.nbytes]
            blocks = [view[i : i + block] for i in range(0, p.nbytes, block)]
            futures = [io.submit(compress_chunks, b, opts.chunk_bytes, level) for b in blocks]
            blocks_of.append((f.path, p, futures))
    encoded: dict[tuple[str, str], _Encoded] = {}
    errors: list[BaseException] = []
    for path, p, futures in blocks_of:
        try:
            results = [part.result() for part in futures]
        except BaseException as exc:
            errors.append(exc)
            continue
        frames = [frame for result in results for frame in result]
        encoded[path, p.tensor.name] = _Encoded(frames, "".join(checksum(fr) for fr in frames))
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
    job: SaveJob, f: DataFile, encoded: Mapping[tuple[str, str], _Encoded]
) -> WrittenFile:
    """Write one file of zstd frames, its pieces back to back."""
    path = f"{job.prefix}/{f.path}"
    pieces: dict[str, StoredPiece] = {}
    offset = 0
    with storage_errors(f"writing {path} under {job.backend.url}"):
        stream = job.backend.open_stream(path)
        try:
            for p in f.pieces:
                piece = encoded[f.path, p.tensor.name]
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
    paths = [f"{job.prefix}/{f.path}" for f in job.files]
    if job.index_path:
        paths.append(f"{job.prefix}/{job.index_path}")
    try:
        job.backend.delete(paths)
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
