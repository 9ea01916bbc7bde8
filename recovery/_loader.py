"""The parallel ranged loader: read, verify, decompress and copy into target tensors.

Reads are whole checksum chunks, so every byte that reaches a target was verified.
The whole chunks of a stored piece that land unchanged in a contiguous CPU target
(a whole piece, or whole rows of it when resharding along dimension 0) are read
straight into the target's memory and verified there; everything else (chunks that a
target only partly needs, small pieces, compressed pieces, strided targets) goes
through a temporary buffer. CUDA targets are read, in bands of whole rows, into pooled
page-locked buffers, verified there, and copied on a load stream per device
(``recovery._device_copy``); ``_jobs`` is where each request takes its path. Nearby
ranges of one file are coalesced into one request, which matters for object stores.
Each request is read in steps of ``LoadOptions.read_step_bytes`` and the chunks a step
completes are hashed right away, while they are still in the CPU cache; the reader
threads (the calling thread among them) share one queue in which each reader keeps to one
file and reads it in offset order (``_JobQueue``).
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

import numpy as np
import torch

from ckpt.errors import (
    ChecksumMismatchError,
    CorruptCheckpointError,
    StateMismatchError,
    storage_errors,
)
from ckpt.format import (
    DIGEST_HEX,
    Box,
    FileHeader,
    Manifest,
    StoredPiece,
    check_safetensors_header,
    checksum,
    decompress_chunk,
    element_size,
    load_pieces,
    step_prefix,
    stored_chunk_bounds,
    torch_dtype,
)
from recovery._device_copy import (
    DEFAULT_LIMIT_BYTES,
    DeviceCopier,
    HostBuffer,
    PinnedBufferPool,
)
from recovery._reshard import ReadRequest, plan_reads
from storage_backends import OpensReaders, StorageBackend, open_reader

log = logging.getLogger(__name__)

_ALIGN = 64
# Pieces whose whole chunks for one target are fewer bytes than this are read through
# the coalesced buffer path (one request for many small tensors) instead of one request each.
_DIRECT_MIN_BYTES = 1 << 20
_DEFAULT_THREADS = 4


@dataclass(frozen=True)
class LoadOptions:
    """How a load reads.

    Args:
        io_threads: parallel readers. By default 4, and no more than the CPUs this process
            may run on when the backend reads local files (it declares ``OpensReaders``):
            such a read is a copy out of the page cache plus a hash, bound by the CPU, and
            readers beyond the CPUs only take turns (on a 2-CPU machine 2 readers restore
            faster than 4, warm, cold and with several ranks per machine).
        coalesce_gap_bytes: neighbouring ranges closer than this are read in one request.
        max_request_bytes: the largest single read request.
        read_step_bytes: each request is read in steps of this size, and the chunks a
            step completes are verified right away (while in the CPU cache).
        device_buffer_bytes: for targets on CUDA devices, the most page-locked host memory
            the load reads into (bounded further by twice its largest request).
    """

    io_threads: int | None = None
    coalesce_gap_bytes: int = 1 << 20
    max_request_bytes: int = 64 << 20
    read_step_bytes: int = 8 << 20
    device_buffer_bytes: int = DEFAULT_LIMIT_BYTES

    def threads_for(self, backend: StorageBackend) -> int:
        """The readers a load from ``backend`` runs (see ``io_threads``)."""
        if self.io_threads is not None:
            return max(1, self.io_threads)
        if isinstance(backend, OpensReaders):
            return max(1, min(_DEFAULT_THREADS, len(os.sched_getaffinity(0))))
        return _DEFAULT_THREADS


@dataclass
class Destination:
    """A tensor to fill on load, and the region of the global tensor it holds.

    Attributes:
        name: the tensor's fully-qualified name in the manifest.
        tensor: the target (any device); its shape is ``box.lengths``.
        box: the region of the global tensor that ``tensor`` holds.
    """

    name: str
    tensor: torch.Tensor
    box: Box


@dataclass(frozen=True)
class LoadStats:
    """What a load read.

    Attributes:
        bytes_needed: bytes of tensor data the targets required.
        bytes_read: bytes fetched from storage (whole checksum chunks, coalescing gaps).
        requests: read requests issued to the backend.
        seconds: wall time of the load (planning included).
        planning_seconds: of which planning (reshard overlaps, requests, coalescing);
            the rest is reading, verifying and copying.
    """

    bytes_needed: int
    bytes_read: int
    requests: int
    seconds: float
    planning_seconds: float = 0.0

    @property
    def read_seconds(self) -> float:
        """Reading, verifying and copying into the targets."""
        return self.seconds - self.planning_seconds

    @property
    def read_amplification(self) -> float:
        return self.bytes_read / self.bytes_needed if self.bytes_needed else 1.0


@dataclass
class _Segment:
    """Whole chunks [c0, c1) of one stored piece, and what they fill.

    ``requests`` are copied through a view shaped like the piece (``_scatter``);
    ``linear`` are (first raw byte of the piece, contiguous uint8 CPU view of a target)
    whose bytes land unchanged; ``device`` go to CUDA targets (``_to_device``).
    """

    tensor: str
    piece: StoredPiece
    c0: int
    c1: int
    requests: list[ReadRequest] = field(default_factory=list)
    file_start: int = 0
    file_end: int = 0
    linear: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    device: list[ReadRequest] = field(default_factory=list)


@dataclass
class _Job:
    file: str
    start: int
    end: int
    segments: list[_Segment] = field(default_factory=list)
    direct: torch.Tensor | None = None  # read straight into this uint8 view of a target
    header: FileHeader | None = None  # a safetensors header to check (bytes 0..length)
    # and, when verifying, the file's pieces it must describe: (name, dtype, shape, at, length)
    described: list[tuple[str, str, tuple[int, ...], int, int]] | None = None


class _JobQueue:
    """The jobs of a load, by file, each file's in offset order, shared by the readers.

    A reader keeps to one file and reads it front to back, so that the kernel's readahead
    sees one sequential stream per file (a disk delivers more that way than when readers
    hop between files and offsets); when its file runs out it takes the file with the most
    bytes left that no other reader has, and when every file left has a reader, the last
    job of the one with the most bytes left (its reader keeps the front).
    """

    def __init__(self, jobs: Iterable[_Job]) -> None:
        self._files: dict[str, deque[_Job]] = {}
        self._left: dict[str, int] = defaultdict(int)
        for job in sorted(jobs, key=lambda j: (j.file, j.start)):
            self._files.setdefault(job.file, deque()).append(job)
            self._left[job.file] += job.end - job.start
        self._owner: dict[int, str] = {}  # reader -> its file
        self._lock = threading.Lock()

    def take(self, reader: int) -> _Job | None:
        """The next job for ``reader``; None when there is none left."""
        with self._lock:
            file = self._owner.get(reader)
            if file is None or not self._files.get(file):
                file = self._choose(reader)
                if file is None:
                    return None
            if self._owner.get(reader) == file:
                job = self._files[file].popleft()
            else:
                job = self._files[file].pop()
            self._left[file] -= job.end - job.start
            if not self._files[file]:
                del self._files[file]
            return job

    def _choose(self, reader: int) -> str | None:
        if not self._files:
            return None
        taken = {f for r, f in self._owner.items() if r != reader}
        free = [f for f in self._files if f not in taken]
        if free:
            file = max(free, key=self._left.__getitem__)
            self._owner[reader] = file
            return file
        self._owner.pop(reader, None)
        return max(self._files, key=self._left.__getitem__)


def _bytes_view(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU uint8 tensor (no copy)."""
    return memoryview(tensor.numpy()).cast("B")  # type: ignore[arg-type]


class Loader:
    """Fills target tensors from one committed checkpoint."""

    def __init__(
        self, backend: StorageBackend, manifest: Manifest, options: LoadOptions | None = None
    ) -> None:
        self._backend = backend
        self._manifest = manifest
        self._options = options or LoadOptions()
        self._prefix = step_prefix(manifest.step)
        self._all_pieces = not manifest.writers  # format v1 lists every piece

    def load(self, destinations: Sequence[Destination]) -> LoadStats:
        """Fill every destination; raises ``CorruptCheckpointError`` on any bad byte.

        CUDA targets are filled from page-locked buffers on a load stream per device, which
        first waits for the caller's current stream; the load returns once those copies are
        done (``recovery._device_copy``).
        """
        start = time.perf_counter()
        self._with_pieces(destinations)
        requests = self._plan(destinations)
        jobs = self._jobs(requests, destinations)
        jobs += self._header_jobs(self._files_read_whole(requests), describe=False)
        needed = sum(
            r.region.numel * element_size(self._manifest.tensors[r.tensor].dtype) for r in requests
        )
        read = sum(j.end - j.start for j in jobs)
        planned = time.perf_counter()
        device = self._device_copier(destinations)
        try:
            self._run_all(jobs, destinations, device)
        finally:
            if device is not None:
                device.finish()
        return LoadStats(needed, read, len(jobs), time.perf_counter() - start, planned - start)

    def _run_all(
        self,
        jobs: Sequence[_Job],
        destinations: Sequence[Destination],
        device: DeviceCopier | None,
    ) -> None:
        """Run ``jobs`` on ``io_threads`` readers (this thread among them) pulling from one
        queue; the first error stops the others at their next job and is raised."""
        queue = _JobQueue(jobs)
        errors: list[BaseException] = []

        def reader(me: int) -> None:
            while not errors:
                job = queue.take(me)
                if job is None:
                    return
                try:
                    self._run(job, destinations, device)
                except BaseException as exc:
                    errors.append(exc)
                    return

        helpers = min(self._options.threads_for(self._backend), len(jobs)) - 1
        if helpers > 0:
            with ThreadPoolExecutor(helpers, thread_name_prefix="ckpt-read") as pool:
                futures = [pool.submit(reader, i + 1) for i in range(helpers)]
                reader(0)
                for f in futures:
                    f.result()
        else:
            reader(0)
        if errors:
            raise errors[0]

    def _with_pieces(self, destinations: Sequence[Destination] | None) -> None:
        """Format v2: the pieces of the regions ``destinations`` need (all when None), from
        the index files of only the writers that hold them."""
        if self._all_pieces:
            return
        wanted: dict[str, list[Box]] | None = None
        if destinations is not None:
            wanted = {}
            for dest in destinations:
                wanted.setdefault(dest.name, []).append(dest.box)
        self._manifest = load_pieces(self._backend, self._manifest, wanted)
        self._all_pieces = wanted is None

    def verify(self, progress: Callable[[int, int], None] | None = None) -> LoadStats:
        """Read and verify every chunk of every stored piece without keeping the data.

        ``progress(bytes verified, bytes in all)`` is called as reads finish (in this thread).
        """
        start = time.perf_counter()
        self._with_pieces(None)
        chunk = self._manifest.chunk_bytes
        limit = max(chunk, self._options.max_request_bytes // chunk * chunk)
        segments = []
        for name, entry in self._manifest.tensors.items():
            for piece in entry.pieces:
                raw_length = piece.box.numel * element_size(entry.dtype)
                if raw_length == 0:
                    continue
                bounds = stored_chunk_bounds(raw_length, chunk, piece.chunk_sizes)
                per_request = limit // chunk
                for c0 in range(0, len(bounds), per_request):
                    c1 = min(c0 + per_request, len(bounds))
                    s0 = bounds[c0][0]
                    s1 = bounds[c1 - 1][0] + bounds[c1 - 1][1]
                    segments.append(
                        _Segment(
                            name, piece, c0, c1, [], piece.byte_offset + s0, piece.byte_offset + s1
                        )
                    )
        jobs = self._coalesce(segments)
        jobs += self._header_jobs(self._manifest.headers, describe=True)
        read = sum(j.end - j.start for j in jobs)
        done = 0
        threads = self._options.threads_for(self._backend)
        with ThreadPoolExecutor(threads, thread_name_prefix="ckpt-verify") as pool:
            futures = {pool.submit(self._run, job, ()): job for job in jobs}
            for future in as_completed(futures):
                future.result()
                if progress is not None:
                    job = futures[future]
                    done += job.end - job.start
                    progress(done, read)
        return LoadStats(self._manifest.total_bytes, read, len(jobs), time.perf_counter() - start)

    def _files_read_whole(self, requests: Sequence[ReadRequest]) -> list[str]:
        """Files with a header record of which this load reads every stored piece whole."""
        headers = self._manifest.headers
        if not headers:
            return []
        whole: dict[str, set[int]] = defaultdict(set)
        for req in requests:
            entry = self._manifest.tensors[req.tensor]
            if req.raw_start == 0 and req.raw_length == req.piece.box.numel * element_size(
                entry.dtype
            ):
                whole[req.piece.file].add(id(req.piece))
        stored: dict[str, int] = defaultdict(int)
        for entry in self._manifest.tensors.values():
            for piece in entry.pieces:
                if piece.file in whole and piece.byte_length:
                    stored[piece.file] += 1
        return [f for f, pieces in whole.items() if f in headers and len(pieces) == stored[f]]

    def _header_jobs(self, files: Iterable[str], *, describe: bool) -> list[_Job]:
        headers = self._manifest.headers
        by_file: dict[str, list[tuple[str, str, tuple[int, ...], int, int]]] = defaultdict(list)
        if describe:
            for name, entry in self._manifest.tensors.items():
                for p in entry.pieces:
                    if p.file in headers:
                        by_file[p.file].append(
                            (name, entry.dtype, p.lengths, p.byte_offset, p.byte_length)
                        )
        return [
            _Job(
                f,
                0,
                headers[f].length,
                header=headers[f],
                described=by_file[f] if describe else None,
            )
            for f in files
        ]

    def _check_header(self, job: _Job, data: memoryview, where: str) -> None:
        header = job.header
        if header is None:
            return
        if checksum(data) != header.checksum:
            raise ChecksumMismatchError(
                f"checksum mismatch in {where} (safetensors header, bytes 0..{job.end - 1}): "
                "the file is corrupt",
                file=job.file,
                tensor="",
                byte_range=(0, job.end - 1),
            )
        if job.described is not None:
            check_safetensors_header(
                bytes(data), self._manifest.files[job.file], job.described, where
            )

    def _plan(self, destinations: Sequence[Destination]) -> list[ReadRequest]:
        by_tensor: dict[str, list[tuple[int, Box]]] = defaultdict(list)
        for i, dest in enumerate(destinations):
            entry = self._manifest.tensors.get(dest.name)
            if entry is None:
                raise StateMismatchError(
                    f"tensor {dest.name!r} is not in checkpoint step {self._manifest.step}"
                )
            by_tensor[dest.name].append((i, dest.box))
        requests: list[ReadRequest] = []
        for name, targets in by_tensor.items():
            requests.extend(plan_reads(name, self._manifest.tensors[name], targets))
        return requests

    def _jobs(self, requests: list[ReadRequest], destinations: Sequence[Destination]) -> list[_Job]:
        chunk = self._manifest.chunk_bytes
        jobs: list[_Job] = []
        segments: dict[tuple[int, int, int], _Segment] = {}

        def segment(req: ReadRequest, raw_length: int, first: int, end: int) -> _Segment:
            """The segment of whole chunks holding raw bytes [first, end) of the piece."""
            piece = req.piece
            c0 = first // chunk
            c1 = min(math.ceil(end / chunk), math.ceil(raw_length / chunk))
            key = (id(piece), c0, c1)
            seg = segments.get(key)
            if seg is None:
                bounds = stored_chunk_bounds(raw_length, chunk, piece.chunk_sizes)
                s0 = bounds[c0][0]
                s1 = bounds[c1 - 1][0] + bounds[c1 - 1][1]
                seg = segments[key] = _Segment(
                    req.tensor,
                    piece,
                    c0,
                    c1,
                    file_start=piece.byte_offset + s0,
                    file_end=piece.byte_offset + s1,
                )
            return seg

        for req in requests:
            piece = req.piece
            raw_length = piece.box.numel * element_size(self._manifest.tensors[req.tensor].dtype)
            if destinations[req.target].tensor.device.type == "cuda":
                # Through a pooled page-locked buffer, then the load stream (``_to_device``).
                for band in self._bands(req):
                    end = band.raw_start + band.raw_length
                    segment(band, raw_length, band.raw_start, end).device.append(band)
                continue
            first, end = req.raw_start, req.raw_start + req.raw_length
            target = self._linear_view(req, destinations)
            if target is None:  # strided or non-CUDA device target: through a shaped view
                segment(req, raw_length, first, end).requests.append(req)
                continue
            if piece.codec == "raw":
                # The whole chunks inside [first, end) land in the target as they are stored.
                inner0 = -(-first // chunk) * chunk
                inner1 = end if end == raw_length else end // chunk * chunk
                if inner1 - inner0 >= _DIRECT_MIN_BYTES:
                    jobs.extend(
                        self._direct_jobs(
                            req, target[inner0 - first : inner1 - first], inner0, inner1
                        )
                    )
                    if first < inner0:
                        segment(req, raw_length, first, inner0).linear.append(
                            (first, target[: inner0 - first])
                        )
                    if inner1 < end:
                        segment(req, raw_length, inner1, end).linear.append(
                            (inner1, target[inner1 - first :])
                        )
                    continue
            segment(req, raw_length, first, end).linear.append((first, target))
        jobs.extend(self._coalesce(list(segments.values())))
        return jobs

    def _linear_view(
        self, req: ReadRequest, destinations: Sequence[Destination]
    ) -> torch.Tensor | None:
        """The target's bytes for ``req`` as one contiguous uint8 CPU view, when the
        requested raw bytes of the piece land there unchanged: the region spans the
        piece's every dimension but the first, and the target's view of it is contiguous.
        None for other targets (they take ``_scatter``; CUDA targets never come here)."""
        dest = destinations[req.target]
        if dest.tensor.device.type != "cpu" or dest.tensor.is_complex():
            return None
        if req.region.lengths[1:] != req.piece.lengths[1:]:
            return None  # whole rows read, only some columns wanted
        view = dest.tensor[req.region.relative_to(dest.box)] if dest.box.ndim else dest.tensor
        if not view.is_contiguous():
            return None
        return view.reshape(-1).view(torch.uint8)

    def _direct_jobs(
        self, req: ReadRequest, target: torch.Tensor, first: int, end: int
    ) -> list[_Job]:
        """Read raw bytes [first, end) of the piece (whole chunks) straight into ``target``."""
        piece = req.piece
        chunk = self._manifest.chunk_bytes
        step = max(chunk, self._options.max_request_bytes // chunk * chunk)
        jobs = []
        for lo in range(first, end, step):
            hi = min(lo + step, end)
            seg = _Segment(
                req.tensor,
                piece,
                lo // chunk,
                math.ceil(hi / chunk),
                [],
                piece.byte_offset + lo,
                piece.byte_offset + hi,
            )
            jobs.append(
                _Job(
                    piece.file,
                    seg.file_start,
                    seg.file_end,
                    [seg],
                    direct=target[lo - first : hi - first],
                )
            )
        return jobs

    def _coalesce(self, segments: list[_Segment]) -> list[_Job]:
        jobs: list[_Job] = []
        by_file: dict[str, list[_Segment]] = defaultdict(list)
        for seg in segments:
            by_file[seg.piece.file].append(seg)
        gap = self._options.coalesce_gap_bytes
        limit = self._options.max_request_bytes
        for file, segs in by_file.items():
            segs.sort(key=lambda s: s.file_start)
            current: _Job | None = None
            for seg in segs:
                # Aligned for the shaped views of ``_scatter``; byte copies need no alignment.
                start = seg.file_start - (seg.file_start % _ALIGN if seg.requests else 0)
                if (
                    current is not None
                    and start - current.end <= gap
                    and max(current.end, seg.file_end) - current.start <= limit
                ):
                    current.end = max(current.end, seg.file_end)
                    current.segments.append(seg)
                    continue
                current = _Job(file, start, seg.file_end, [seg])
                jobs.append(current)
        return jobs

    def _run(
        self,
        job: _Job,
        destinations: Sequence[Destination],
        device: DeviceCopier | None = None,
    ) -> None:
        pooled = self._device_buffer(job, device)
        try:
            self._read(job, destinations, device, pooled)
        finally:
            if pooled is not None and device is not None:
                device.release(pooled)  # reused once the copies enqueued from it have run

    def _read(
        self,
        job: _Job,
        destinations: Sequence[Destination],
        device: DeviceCopier | None,
        pooled: HostBuffer | None,
    ) -> None:
        """Read ``job`` (into ``pooled`` when given), verify it, fill its targets."""
        path = f"{self._prefix}/{job.file}"
        where = f"{self._backend.url}/{path}"
        if job.direct is not None:
            buffer = job.direct
        elif pooled is not None:
            buffer = pooled.data
        else:
            buffer = torch.empty(job.end - job.start, dtype=torch.uint8)
        host = _bytes_view(buffer)
        # Every chunk of the job, in file order: (start in the job, end, segment, chunk index).
        chunks: list[tuple[int, int, _Segment, int]] = []
        for seg in job.segments:
            bounds = self._bounds(seg)
            for c in range(seg.c0, seg.c1):
                at = seg.piece.byte_offset + bounds[c][0] - job.start
                chunks.append((at, at + bounds[c][1], seg, c))
        chunks.sort(key=lambda x: x[0])
        step = max(1, self._options.read_step_bytes)
        checked = 0
        with storage_errors(f"reading {where}", missing=CorruptCheckpointError):
            reader = open_reader(self._backend, path)
        try:
            for lo in range(0, len(host), step):
                hi = min(lo + step, len(host))
                with storage_errors(f"reading {where}", missing=CorruptCheckpointError):
                    reader.read_into(job.start + lo, host[lo:hi])
                # Hash what this step completed while it is still in the cache.
                while checked < len(chunks) and chunks[checked][1] <= hi:
                    at, stop, seg, c = chunks[checked]
                    self._check_chunk(seg, c, host[at:stop], where)
                    checked += 1
        finally:
            reader.close()
        self._check_header(job, host, where)
        if job.direct is not None:
            return
        for seg in job.segments:
            raw = self._raw(seg, host, job.start, where)
            self._scatter(seg, raw, destinations)
            if seg.device:
                # A stored (not decompressed) segment is a view of the read buffer.
                pinned = pooled is not None and pooled.pinned and seg.piece.codec == "raw"
                self._to_device(seg, raw, device, destinations, pinned)
            base = seg.c0 * self._manifest.chunk_bytes
            for first, target in seg.linear:
                # Contiguous CPU bytes to contiguous CPU bytes: one memcpy. (``copy_`` hands
                # copies over 32k elements to the intra-op thread pool, whose wake-up costs
                # milliseconds on a busy machine; ctypes releases the GIL for the call.)
                if first - base + target.numel() > raw.numel():
                    raise CorruptCheckpointError(
                        f"{where}: tensor {seg.tensor!r} chunks {seg.c0}..{seg.c1 - 1} hold "
                        f"{raw.numel()} bytes, fewer than the manifest's layout needs"
                    )
                ctypes.memmove(target.data_ptr(), raw.data_ptr() + first - base, target.numel())

    def _bounds(self, seg: _Segment) -> list[tuple[int, int]]:
        piece = seg.piece
        raw_length = piece.box.numel * element_size(self._manifest.tensors[seg.tensor].dtype)
        return stored_chunk_bounds(raw_length, self._manifest.chunk_bytes, piece.chunk_sizes)

    def _check_chunk(self, seg: _Segment, c: int, stored: memoryview, where: str) -> None:
        piece = seg.piece
        expected = piece.checksums[c * DIGEST_HEX : (c + 1) * DIGEST_HEX]
        if checksum(stored) != expected:
            first = piece.byte_offset + self._bounds(seg)[c][0]
            raise ChecksumMismatchError(
                f"checksum mismatch in {where} (tensor {seg.tensor!r}, bytes "
                f"{first}..{first + len(stored) - 1}): "
                "the file is corrupt",
                file=piece.file,
                tensor=seg.tensor,
                byte_range=(first, first + len(stored) - 1),
            )

    def _raw(self, seg: _Segment, host: memoryview, job_start: int, where: str) -> torch.Tensor:
        """The segment's raw bytes (decompressed when needed); its chunks are verified."""
        piece = seg.piece
        chunk = self._manifest.chunk_bytes
        bounds = self._bounds(seg)
        if piece.codec == "zstd":
            raw_length = piece.box.numel * element_size(self._manifest.tensors[seg.tensor].dtype)
            parts = []
            for c in range(seg.c0, seg.c1):
                offset, length = bounds[c]
                at = piece.byte_offset + offset - job_start
                raw_chunk = min(chunk, raw_length - c * chunk)
                try:
                    parts.append(decompress_chunk(host[at : at + length], raw_chunk))
                except Exception as exc:
                    raise CorruptCheckpointError(
                        f"{where}: tensor {seg.tensor!r} chunk {c} does not decompress: {exc}"
                    ) from exc
            return torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)
        at = piece.byte_offset + bounds[seg.c0][0] - job_start
        end = piece.byte_offset + bounds[seg.c1 - 1][0] + bounds[seg.c1 - 1][1] - job_start
        return torch.from_numpy(np.frombuffer(host[at:end], dtype=np.uint8))

    def _scatter(
        self, seg: _Segment, raw: torch.Tensor, destinations: Sequence[Destination]
    ) -> None:
        entry = self._manifest.tensors[seg.tensor]
        dtype = torch_dtype(entry.dtype)
        piece_shape = list(seg.piece.box.lengths)
        base = seg.c0 * self._manifest.chunk_bytes
        for req in seg.requests:
            data = raw[req.raw_start - base : req.raw_start - base + req.raw_length]
            if data.data_ptr() % _ALIGN:
                data = data.clone()
            dest = destinations[req.target]
            if dtype.is_complex:
                values = torch.view_as_complex(data.view(dtype.to_real()).view(-1, 2))
            else:
                values = data.view(dtype)
            if piece_shape:
                rows = req.region.lengths[0]
                values = values.view([rows, *piece_shape[1:]])
                src_box_offsets = (req.region.offsets[0], *seg.piece.box.offsets[1:])
                inner = tuple(
                    slice(o - so, o - so + n)
                    for o, n, so in zip(req.region.offsets, req.region.lengths, src_box_offsets)
                )
                values = values[inner]
                dest_view = dest.tensor[req.region.relative_to(dest.box)]
            else:
                values = values.view([])
                dest_view = dest.tensor
            dest_view.copy_(values)

    # --- CUDA targets: pooled page-locked read buffers, copies on the load streams ---

    def _device_copier(self, destinations: Sequence[Destination]) -> DeviceCopier | None:
        """A copier for the CUDA devices of ``destinations`` (None when there are none); built
        in the loading thread, after which it must be ``finish``ed."""
        devices = [d.tensor.device for d in destinations if d.tensor.device.type == "cuda"]
        if not devices:
            return None
        # A band of rows (``_bands``) spans at most two chunks more than a request.
        largest = self._options.max_request_bytes + 2 * self._manifest.chunk_bytes + _ALIGN
        limit = PinnedBufferPool.bound(largest, self._options.device_buffer_bytes)
        return DeviceCopier(devices, PinnedBufferPool(limit))

    def _bands(self, req: ReadRequest) -> list[ReadRequest]:
        """``req`` cut into bands of whole rows of about ``max_request_bytes`` (at least one
        row each), so that a large CUDA target is read in parallel through bounded buffers."""
        region = req.region
        rows = region.lengths[0] if region.lengths else 0
        row_bytes = req.raw_length // rows if rows else 0
        if not row_bytes:
            return [req]
        band = max(1, self._options.max_request_bytes // row_bytes)
        if band >= rows:
            return [req]
        bands = []
        for r in range(0, rows, band):
            n = min(band, rows - r)
            box = Box((region.offsets[0] + r, *region.offsets[1:]), (n, *region.lengths[1:]))
            start = req.raw_start + r * row_bytes
            bands.append(ReadRequest(req.target, req.tensor, req.piece, start, n * row_bytes, box))
        return bands

    def _device_buffer(self, job: _Job, device: DeviceCopier | None) -> HostBuffer | None:
        """A pooled (page-locked when possible) read buffer for a job whose stored bytes go
        to CUDA targets as read; None for other jobs, and for jobs larger than the pool."""
        if device is None or job.direct is not None:
            return None
        if any(seg.device and seg.piece.codec == "raw" for seg in job.segments):
            return device.acquire(job.end - job.start)
        return None

    def _to_device(
        self,
        seg: _Segment,
        raw: torch.Tensor,
        device: DeviceCopier | None,
        destinations: Sequence[Destination],
        pinned: bool,
    ) -> None:
        """Enqueue the copies of ``seg``'s verified bytes ``raw`` into its CUDA targets."""
        if device is None:
            raise RuntimeError("a load into CUDA tensors runs without its DeviceCopier")
        staged: HostBuffer | None = None
        if not pinned and seg.piece.codec != "raw":
            # Decompressed bytes are pageable: stage them in a pool buffer when one is free.
            staged = device.acquire(raw.numel(), wait=False)
            if staged is not None and not staged.pinned:  # the pool could not page-lock
                device.release(staged)
                staged = None
            if staged is not None:
                staged.data.copy_(raw)
                raw, pinned = staged.data, staged.pinned
        piece_shape = list(seg.piece.box.lengths)
        base = seg.c0 * self._manifest.chunk_bytes
        try:
            for req in seg.device:
                data = raw[req.raw_start - base : req.raw_start - base + req.raw_length]
                if data.numel() != req.raw_length:
                    raise CorruptCheckpointError(
                        f"{self._backend.url}/{self._prefix}/{seg.piece.file}: tensor "
                        f"{seg.tensor!r} chunks {seg.c0}..{seg.c1 - 1} hold {raw.numel()} "
                        "bytes, fewer than the manifest's layout needs"
                    )
                dest = destinations[req.target]
                if not piece_shape:
                    device.copy(dest.tensor, data, [], None, pinned=pinned)
                    continue
                shape = [req.region.lengths[0], *piece_shape[1:]]
                inner = None
                if list(req.region.lengths[1:]) != piece_shape[1:]:  # only some columns wanted
                    src_box_offsets = (req.region.offsets[0], *seg.piece.box.offsets[1:])
                    inner = tuple(
                        slice(o - so, o - so + n)
                        for o, n, so in zip(req.region.offsets, req.region.lengths, src_box_offsets)
                    )
                target = dest.tensor[req.region.relative_to(dest.box)]
                device.copy(target, data, shape, inner, pinned=pinned)
        finally:
            if staged is not None:
                device.release(staged)


def verify_checkpoint(
    backend: StorageBackend,
    manifest: Manifest,
    options: LoadOptions | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> LoadStats:
    """Read every stored chunk of a checkpoint and check its checksum (and that it decompresses).

    Memory stays bounded by the request size times the reader threads. ``progress(bytes
    verified, bytes in all)`` is called as reads finish.

    Raises:
        CorruptCheckpointError: the first bad chunk found, naming tensor, file and bytes.
    """
    return Loader(backend, manifest, options).verify(progress)
