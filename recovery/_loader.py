"""The parallel ranged loader: read, verify, decompress and copy into target tensors.

Reads are whole checksum chunks, so every byte that reaches a target was verified.
A stored piece that lands unchanged in a contiguous CPU target is read straight into
the target's memory; everything else goes through a temporary buffer. Nearby
ranges of one file are coalesced into one request, which matters for object stores.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
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
from recovery._reshard import ReadRequest, plan_reads
from storage_backends import StorageBackend

log = logging.getLogger(__name__)

_ALIGN = 64


@dataclass(frozen=True)
class LoadOptions:
    """How a load reads.

    Args:
        io_threads: parallel readers.
        coalesce_gap_bytes: neighbouring ranges closer than this are read in one request.
        max_request_bytes: the largest single read request.
    """

    io_threads: int = 4
    coalesce_gap_bytes: int = 1 << 20
    max_request_bytes: int = 64 << 20


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
        seconds: wall time of the tensor reads.
    """

    bytes_needed: int
    bytes_read: int
    requests: int
    seconds: float

    @property
    def read_amplification(self) -> float:
        return self.bytes_read / self.bytes_needed if self.bytes_needed else 1.0


@dataclass
class _Segment:
    """Whole chunks [c0, c1) of one stored piece, and the requests they serve."""

    tensor: str
    piece: StoredPiece
    c0: int
    c1: int
    requests: list[ReadRequest] = field(default_factory=list)
    file_start: int = 0
    file_end: int = 0


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
        """Fill every destination; raises ``CorruptCheckpointError`` on any bad byte."""
        start = time.perf_counter()
        self._with_pieces(destinations)
        requests = self._plan(destinations)
        jobs = self._jobs(requests, destinations)
        jobs += self._header_jobs(self._files_read_whole(requests), describe=False)
        needed = sum(
            r.region.numel * element_size(self._manifest.tensors[r.tensor].dtype) for r in requests
        )
        read = sum(j.end - j.start for j in jobs)
        # Largest first keeps the threads busy until the end.
        jobs.sort(key=lambda j: j.start - j.end)
        with ThreadPoolExecutor(self._options.io_threads, thread_name_prefix="ckpt-read") as pool:
            futures = [pool.submit(self._run, job, destinations) for job in jobs]
            errors = []
            for f in futures:
                try:
                    f.result()
                except BaseException as exc:
                    errors.append(exc)
        if errors:
            raise errors[0]
        return LoadStats(needed, read, len(jobs), time.perf_counter() - start)

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
        with ThreadPoolExecutor(self._options.io_threads, thread_name_prefix="ckpt-verify") as pool:
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
        for req in requests:
            piece = req.piece
            raw_length = piece.box.numel * element_size(self._manifest.tensors[req.tensor].dtype)
            direct = self._direct_view(req, raw_length, destinations)
            c0 = req.raw_start // chunk
            c1 = min(
                math.ceil((req.raw_start + req.raw_length) / chunk), math.ceil(raw_length / chunk)
            )
            if direct is not None:
                jobs.extend(self._direct_jobs(req, direct, raw_length))
                continue
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
            seg.requests.append(req)
        jobs.extend(self._coalesce(list(segments.values())))
        return jobs

    def _direct_view(
        self, req: ReadRequest, raw_length: int, destinations: Sequence[Destination]
    ) -> torch.Tensor | None:
        dest = destinations[req.target]
        if req.piece.codec != "raw" or req.raw_start != 0 or req.raw_length != raw_length:
            return None
        if req.region != req.piece.box:  # whole rows read, only some columns wanted
            return None
        if dest.tensor.device.type != "cpu" or dest.tensor.is_complex():
            return None
        view = dest.tensor[req.region.relative_to(dest.box)] if dest.box.ndim else dest.tensor
        if not view.is_contiguous():
            return None
        return view.reshape(-1).view(torch.uint8)

    def _direct_jobs(self, req: ReadRequest, target: torch.Tensor, raw_length: int) -> list[_Job]:
        piece = req.piece
        step = max(
            self._manifest.chunk_bytes,
            self._options.max_request_bytes
            // self._manifest.chunk_bytes
            * self._manifest.chunk_bytes,
        )
        jobs = []
        for lo in range(0, raw_length, step):
            hi = min(lo + step, raw_length)
            c0 = lo // self._manifest.chunk_bytes
            c1 = math.ceil(hi / self._manifest.chunk_bytes)
            seg = _Segment(
                req.tensor, piece, c0, c1, [req], piece.byte_offset + lo, piece.byte_offset + hi
            )
            jobs.append(_Job(piece.file, seg.file_start, seg.file_end, [seg], direct=target[lo:hi]))
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
                start = seg.file_start - seg.file_start % _ALIGN
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

    def _run(self, job: _Job, destinations: Sequence[Destination]) -> None:
        path = f"{self._prefix}/{job.file}"
        where = f"{self._backend.url}/{path}"
        if job.direct is not None:
            buffer = job.direct
        else:
            buffer = torch.empty(job.end - job.start, dtype=torch.uint8)
        with storage_errors(f"reading {where}", missing=CorruptCheckpointError):
            self._backend.read_into(path, job.start, _bytes_view(buffer))
        host = _bytes_view(buffer)
        self._check_header(job, host, where)
        for seg in job.segments:
            raw = self._verify(seg, host, job.start, where)
            if job.direct is None:
                self._scatter(seg, raw, destinations)

    def _verify(self, seg: _Segment, host: memoryview, job_start: int, where: str) -> torch.Tensor:
        """Check every chunk of the segment; return its raw bytes (decompressed when needed)."""
        piece = seg.piece
        chunk = self._manifest.chunk_bytes
        raw_length = piece.box.numel * element_size(self._manifest.tensors[seg.tensor].dtype)
        bounds = stored_chunk_bounds(raw_length, chunk, piece.chunk_sizes)
        parts = []
        for c in range(seg.c0, seg.c1):
            offset, length = bounds[c]
            at = piece.byte_offset + offset - job_start
            stored = host[at : at + length]
            expected = piece.checksums[c * DIGEST_HEX : (c + 1) * DIGEST_HEX]
            if checksum(stored) != expected:
                first = piece.byte_offset + offset
                raise ChecksumMismatchError(
                    f"checksum mismatch in {where} (tensor {seg.tensor!r}, bytes "
                    f"{first}..{first + length - 1}): "
                    "the file is corrupt",
                    file=piece.file,
                    tensor=seg.tensor,
                    byte_range=(first, first + length - 1),
                )
            if piece.codec == "zstd":
                raw_chunk = min(chunk, raw_length - c * chunk)
                try:
                    parts.append(decompress_chunk(stored, raw_chunk))
                except Exception as exc:
                    raise CorruptCheckpointError(
                        f"{where}: tensor {seg.tensor!r} chunk {c} does not decompress: {exc}"
                    ) from exc
        if piece.codec == "zstd":
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
