"""The snapshot engine: stage (blocking) -> persist (background) -> commit (coordinated).

``Snapshotter.async_save`` flattens the state, agrees with the other ranks on who
writes what (``ckpt._plan``: a replicated tensor once, large ones cut into row ranges
spread over their holders), plans the data files, copies every tensor or row range
this rank writes into a reusable host buffer and returns. A background thread
then encodes (safetensors layout or chunked zstd), checksums and writes the files,
reports to the coordinator and, on the committer, publishes the manifest.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ckpt._codec import checksum, chunk_checksums, compress_chunks
from ckpt._flatten import FlatTensor, flatten
from ckpt._format import (
    DATA_DIR,
    Manifest,
    ShardIndex,
    StoredPiece,
    TensorEntry,
    safetensors_header,
    step_prefix,
)
from ckpt._geometry import Box
from ckpt._options import SaveOptions
from ckpt._plan import MIN_SPLIT_BYTES, assign_writers, describe, piece_key
from ckpt._staging import StagingBuffer, StagingPool, align
from ckpt.coordination import Coordinator
from ckpt.errors import CheckpointError, SaveAbortedError, storage_errors
from storage_backends import StorageBackend

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SaveResult:
    """What a finished save did.

    Attributes:
        step: the step saved.
        url: the checkpoint root.
        committed: True when this process saw the step committed.
        bytes_written: data bytes this rank wrote (headers included).
        files: data files this rank wrote.
        stall_seconds: time training was blocked (flatten + plan + staging copy).
        persist_seconds: background time to write this rank's data durably.
        commit_seconds: background time from durable data to the committed manifest.
        write_imbalance: the busiest rank's planned bytes over the mean (1.0 = balanced).
    """

    step: int
    url: str
    committed: bool
    bytes_written: int
    files: int
    stall_seconds: float
    persist_seconds: float
    commit_seconds: float
    write_imbalance: float = 1.0

    @property
    def total_seconds(self) -> float:
        return self.stall_seconds + self.persist_seconds + self.commit_seconds


class PendingSave:
    """Handle of a save running in the background.

    ``result()`` waits and re-raises the background error with its traceback. An error
    nobody asked for is raised by the engine's next save call instead of vanishing.
    """

    def __init__(self, step: int, url: str, stall_seconds: float, future: Future[SaveResult]) -> None:
        self.step = step
        self.url = url
        self.stall_seconds = stall_seconds
        self._future = future
        self._observed = False

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> SaveResult:
        """Wait for the commit.

        Raises:
            TimeoutError: not finished within ``timeout`` seconds.
            CheckpointError: the save failed; the previous committed checkpoint is intact.
        """
        self._observed = True
        return self._future.result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._observed = True
        return self._future.exception(timeout)

    @property
    def failed(self) -> bool:
        """Whether the save finished with an error (does not count as looking at it)."""
        return self._future.done() and self._future.exception() is not None

    @property
    def failed_unobserved(self) -> bool:
        return not self._observed and self.failed

    def __repr__(self) -> str:
        state = "done" if self.done() else "running"
        return f"PendingSave(step={self.step}, url={self.url!r}, {state})"


@dataclass
class _Item:
    tensor: FlatTensor
    buffer_offset: int
    nbytes: int
    data_offset: int = 0  # within the file's data section (or stored stream when compressed)
    checksums: str = ""
    chunk_sizes: tuple[int, ...] | None = None


@dataclass
class _FilePlan:
    path: str
    compressed: bool
    items: list[_Item] = field(default_factory=list)
    buffer_offset: int = 0
    nbytes: int = 0
    header: bytes = b""

    @property
    def stored_bytes(self) -> int:
        if self.compressed:
            return sum(sum(i.chunk_sizes or ()) for i in self.items)
        return len(self.header) + self.nbytes


def _part(t: FlatTensor, box: Box) -> FlatTensor:
    """The part of ``t`` inside ``box``: all of it, or a range of its rows (a view, no copy)."""
    if box == t.box:
        return t
    return replace(t, local=t.local[box.relative_to(t.box)], box=box)


def _storage_view(local: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(local) if local.is_complex() else local


def plan_files(
    tensors: list[FlatTensor], options: SaveOptions, *, generation: str, rank: int
) -> tuple[list[_FilePlan], int]:
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
    files: list[_FilePlan] = []
    # Unique per save: a writer of an earlier, failed attempt at the same step can never
    # replace a file of this one.
    nonce = uuid.uuid4().hex[:8]
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
            index = len(files)
            path = f"{DATA_DIR}/{generation}-r{rank:05d}-{nonce}-{index:03d}.{suffix}"
            # Widest elements first keeps every tensor aligned to its element size.
            members.sort(key=lambda t: (-t.local.element_size(), t.name))
            files.append(_FilePlan(path=path, compressed=is_compressed,
                                   items=[_Item(t, 0, t.nbytes) for t in members]))
    offset = 0
    for f in files:
        f.buffer_offset = offset
        cursor = 0
        for item in f.items:
            item.buffer_offset = offset + cursor
            item.data_offset = cursor
            cursor += item.nbytes
        f.nbytes = cursor
        offset = align(offset + cursor)
        if not f.compressed:
            f.header = _safetensors_header(f)
    return files, offset


def _safetensors_header(f: _FilePlan) -> bytes:
    return safetensors_header(
        [(i.tensor.name, i.tensor.dtype, tuple(i.tensor.local.shape)) for i in f.items],
        {"format": "pt", "writer": "ckpt"},
    )


class Snapshotter:
    """Owns the staging pool and background threads; runs saves one after another.

    Args:
        options: layout and I/O settings.
        max_in_flight: checkpoints allowed in the background at once; a further save
            waits for a staging buffer to free up.
    """

    def __init__(self, options: SaveOptions | None = None, *, max_in_flight: int = 1) -> None:
        self.options = options or SaveOptions()
        self._pool = StagingPool(max_in_flight)
        self._io = ThreadPoolExecutor(self.options.io_threads, thread_name_prefix="ckpt-io")
        self._persist = ThreadPoolExecutor(max_in_flight, thread_name_prefix="ckpt-persist")
        self._pending: list[PendingSave] = []
        self._lock = threading.Lock()
        self._closed = False

    @property
    def staging_bytes(self) -> int:
        """Host memory held for staging (reused across saves)."""
        return self._pool.reserved_bytes

    def busy(self) -> bool:
        """Whether a save is still running in the background."""
        with self._lock:
            return any(not p.done() for p in self._pending)

    def in_flight(self) -> list[PendingSave]:
        with self._lock:
            return [p for p in self._pending if not p.done()]

    def raise_unobserved(self) -> None:
        """Raise the error of an earlier background save that nobody has looked at."""
        with self._lock:
            failed = [p for p in self._pending if p.failed_unobserved]
            self._pending = [p for p in self._pending if not p.done()]
        if failed:
            failed[0].result()  # raises with the original traceback

    def wait(self, timeout: float | None = None) -> list[SaveResult]:
        """Wait for every save in flight; re-raise the first failure."""
        with self._lock:
            # A failure the caller already got from ``result()`` is not raised a second time.
            pending = [p for p in self._pending if not (p._observed and p.failed)]
        results = [p.result(timeout) for p in pending]
        with self._lock:
            self._pending = [p for p in self._pending if not p.done()]
        return results

    def async_save(
        self,
        state: Mapping[str, Any],
        backend: StorageBackend,
        step: int,
        coordinator: Coordinator,
        *,
        user_metadata: Mapping[str, Any] | None = None,
        on_committed: Callable[[Manifest], None] | None = None,
        overlap_writes: bool = False,
    ) -> PendingSave:
        """Stage ``state`` for ``step`` and return; the write and the commit run in the background.

        With ``overlap_writes`` each data file starts streaming as soon as it is staged,
        while later files are still being copied: the save commits sooner, but the copy
        shares the CPU with the writes, so the stall grows. Blocking saves use it.
        """
        if self._closed:
            raise CheckpointError("this checkpointer is closed; create a new one")
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        self.raise_unobserved()
        start = time.perf_counter()
        coordinator.begin(step, self.options.chunk_bytes)
        tensors, tree = flatten(state)
        return self.save_flat(
            tensors, tree, backend, step, coordinator,
            user_metadata=user_metadata, on_committed=on_committed, started=start,
            overlap_writes=overlap_writes,
        )

    def save_flat(
        self,
        tensors: Mapping[str, FlatTensor],
        tree: dict[str, Any],
        backend: StorageBackend,
        step: int,
        coordinator: Coordinator,
        *,
        user_metadata: Mapping[str, Any] | None = None,
        on_committed: Callable[[Manifest], None] | None = None,
        started: float | None = None,
        overlap_writes: bool = False,
    ) -> PendingSave:
        """``async_save`` of a state that is already flattened (offline conversion uses it)."""
        start = time.perf_counter() if started is None else started
        plan = assign_writers(
            coordinator.all_gather(describe(tensors)),
            min_split_bytes=max(MIN_SPLIT_BYTES, self.options.chunk_bytes),
        )
        mine = plan.boxes_for(coordinator.rank)
        to_write = [_part(t, mine[piece_key(t)]) for t in tensors.values() if piece_key(t) in mine]
        files, nbytes = plan_files(to_write, self.options, generation=coordinator.generation, rank=coordinator.rank)
        if self._pool.busy():
            log.info("step %d: waiting for the checkpoint in flight to free its staging buffer", step)
        buffer = self._pool.acquire(nbytes)
        host = memoryview(buffer.data.numpy()).cast("B")  # type: ignore[arg-type]
        early: list[Future[None]] = []
        try:
            groups = [[f] for f in files] if overlap_writes else [files]
            for group in groups:
                pairs = []
                for f in group:
                    for item in f.items:
                        src = _storage_view(item.tensor.local)
                        dst = buffer.view(item.buffer_offset, item.nbytes).view(src.dtype).view(src.shape)
                        pairs.append((src, dst))
                self._pool.copy_in(pairs)
                if overlap_writes:
                    early += [
                        self._io.submit(self._write_raw_file, backend, step_prefix(step), f, host)
                        for f in group if not f.compressed
                    ]
        except BaseException as exc:
            for write in early:  # the buffer may only be reused once nobody reads it
                write.exception()
            self._discard(backend, step_prefix(step), files)
            self._pool.release(buffer)
            _tell_the_others(coordinator, backend, step, exc)
            raise
        stall = time.perf_counter() - start
        index_base = _IndexBase(
            rank=coordinator.rank,
            tensors=tensors,
            tree=tree if coordinator.rank == 0 else None,
        )
        future = self._persist.submit(
            self._run_background, backend, step, coordinator, files, buffer, index_base,
            dict(user_metadata or {}), stall, on_committed, plan.imbalance, early,
        )
        pending = PendingSave(step, backend.url, stall, future)
        with self._lock:
            self._pending.append(pending)
        log.debug("step %d: staged %d bytes in %.3fs", step, nbytes, stall)
        return pending

    def _run_background(
        self,
        backend: StorageBackend,
        step: int,
        coordinator: Coordinator,
        files: list[_FilePlan],
        buffer: StagingBuffer,
        index_base: _IndexBase,
        user_metadata: dict[str, Any],
        stall: float,
        on_committed: Callable[[Manifest], None] | None,
        imbalance: float,
        early_writes: list[Future[None]],
    ) -> SaveResult:
        prefix = step_prefix(step)
        t0 = time.perf_counter()
        try:
            try:
                self._write_files(backend, prefix, files, buffer, early_writes)
            except BaseException as exc:
                _tell_the_others(coordinator, backend, step, exc)
                raise
            finally:
                self._pool.release(buffer)
            t1 = time.perf_counter()
            index = index_base.build(files)
            manifest = coordinator.commit(
                backend, step, index, chunk_bytes=self.options.chunk_bytes, user_metadata=user_metadata
            )
            if manifest is not None and on_committed is not None:
                on_committed(manifest)
            t2 = time.perf_counter()
        except BaseException as exc:
            log.error("step %d (rank %d): save failed: %s", step, coordinator.rank, exc)
            if isinstance(exc, CheckpointError):
                raise
            raise SaveAbortedError(
                f"step {step} (rank {coordinator.rank}) was not committed: {exc!r}; the previous "
                f"committed checkpoint under {backend.url} is intact\n{traceback.format_exc()}"
            ) from exc
        bytes_written = sum(f.stored_bytes for f in files)
        log.info(
            "step %d (rank %d): %d bytes durable in %.3fs, committed after %.3fs more "
            "(busiest writer / mean: %.2f)",
            step, coordinator.rank, bytes_written, t1 - t0, t2 - t1, imbalance,
        )
        return SaveResult(
            step=step,
            url=backend.url,
            committed=True,
            bytes_written=bytes_written,
            files=len(files),
            write_imbalance=imbalance,
            stall_seconds=stall,
            persist_seconds=t1 - t0,
            commit_seconds=t2 - t1,
        )

    def _write_files(
        self,
        backend: StorageBackend,
        prefix: str,
        files: list[_FilePlan],
        buffer: StagingBuffer,
        early_writes: list[Future[None]],
    ) -> None:
        host = memoryview(buffer.data.numpy()).cast("B")  # type: ignore[arg-type]
        opts = self.options
        # Raw files: one writer thread each, hashing every block just before writing it
        # (already running when the save overlapped writes with staging).
        # Compressed pieces: compressed (and hashed) in blocks on the pool, then written.
        writes: list[Future[Any]] = list(early_writes) or [
            self._io.submit(self._write_raw_file, backend, prefix, f, host)
            for f in files if not f.compressed
        ]
        block_jobs: list[tuple[_Item, list[Future[Any]]]] = []
        for f in files:
            if not f.compressed:
                continue
            for item in f.items:
                view = host[item.buffer_offset : item.buffer_offset + item.nbytes]
                blocks = [view[i : i + opts.write_block_bytes] for i in range(0, item.nbytes, opts.write_block_bytes)]
                level = opts.compression.level if opts.compression else 3
                jobs = [self._io.submit(compress_chunks, b, opts.chunk_bytes, level) for b in blocks]
                block_jobs.append((item, jobs))
        errors: list[BaseException] = []
        frames_by_item: dict[int, list[bytes]] = {}
        for item, jobs in block_jobs:
            try:
                results = [j.result() for j in jobs]
            except BaseException as exc:
                errors.append(exc)
                continue
            frames = [frame for block in results for frame in block]
            frames_by_item[id(item)] = frames
            item.chunk_sizes = tuple(len(fr) for fr in frames)
            item.checksums = "".join(checksum(fr) for fr in frames)
        writes += [
            self._io.submit(self._write_compressed_file, backend, prefix, f, frames_by_item)
            for f in files if f.compressed and not errors
        ]
        for w in writes:
            try:
                w.result()
            except BaseException as exc:
                errors.append(exc)
        if errors:
            self._discard(backend, prefix, files)
            raise errors[0]

    def _write_raw_file(self, backend: StorageBackend, prefix: str, f: _FilePlan, host: memoryview) -> None:
        path = f"{prefix}/{f.path}"
        block = self.options.write_block_bytes
        with storage_errors(f"writing {path} under {backend.url}"):
            stream = backend.open_stream(path)
            try:
                stream.write(f.header)
                # Items lie back to back in the buffer: write in large blocks, hashing each
                # item's block (chunk-aligned to the item) right before it goes out.
                written = f.buffer_offset
                for item in f.items:
                    digests = []
                    for i in range(0, item.nbytes, block):
                        end = item.buffer_offset + min(i + block, item.nbytes)
                        digests.append(chunk_checksums(host[item.buffer_offset + i : end], self.options.chunk_bytes))
                        if end - written >= block:
                            stream.write(host[written:end])
                            written = end
                    item.checksums = "".join(digests)
                if written < f.buffer_offset + f.nbytes:
                    stream.write(host[written : f.buffer_offset + f.nbytes])
                stream.commit()
            except BaseException:
                stream.abort()
                raise

    def _write_compressed_file(
        self, backend: StorageBackend, prefix: str, f: _FilePlan, frames_by_item: dict[int, list[bytes]]
    ) -> None:
        path = f"{prefix}/{f.path}"
        with storage_errors(f"writing {path} under {backend.url}"):
            stream = backend.open_stream(path)
            try:
                offset = 0
                for item in f.items:
                    item.data_offset = offset
                    for frame in frames_by_item[id(item)]:
                        stream.write(frame)
                        offset += len(frame)
                stream.commit()
            except BaseException:
                stream.abort()
                raise

    def _discard(self, backend: StorageBackend, prefix: str, files: list[_FilePlan]) -> None:
        try:
            backend.delete(f"{prefix}/{f.path}" for f in files)
        except Exception as exc:  # the partial step is garbage either way; GC removes it later
            log.warning("could not remove partial files under %s/%s: %s", backend.url, prefix, exc)

    def close(self, wait: bool = True) -> None:
        """Wait for saves in flight (re-raising their errors) and stop the threads."""
        if self._closed:
            return
        try:
            if wait:
                self.wait()
        finally:
            self._closed = True
            self._persist.shutdown(wait=wait)
            self._io.shutdown(wait=wait)
            self._pool.close()


@dataclass
class _IndexBase:
    rank: int
    tensors: Mapping[str, FlatTensor]
    tree: dict[str, Any] | None

    def build(self, files: list[_FilePlan]) -> ShardIndex:
        entries: dict[str, TensorEntry] = {}
        file_sizes: dict[str, int] = {}
        written: dict[str, StoredPiece] = {}
        for f in files:
            file_sizes[f.path] = f.stored_bytes
            header = len(f.header)
            for item in f.items:
                t = item.tensor
                written[t.name] = StoredPiece(
                    box=t.box,
                    file=f.path,
                    byte_offset=header + item.data_offset,
                    byte_length=sum(item.chunk_sizes) if item.chunk_sizes is not None else item.nbytes,
                    codec="zstd" if f.compressed else "raw",
                    checksums=item.checksums,
                    chunk_sizes=item.chunk_sizes,
                )
        for name, t in self.tensors.items():
            piece = written.get(name)
            entries[name] = TensorEntry(t.dtype, t.global_shape, (piece,) if piece else ())
        return ShardIndex(rank=self.rank, tensors=entries, files=file_sizes, state=self.tree)


def _tell_the_others(coordinator: Coordinator, backend: StorageBackend, step: int, exc: BaseException) -> None:
    """This rank cannot save ``step``: abort it now, so the other ranks fail fast."""
    try:
        coordinator.report_failure(backend, step, repr(exc))
    except Exception as report_exc:  # the step fails either way
        log.warning("step %d: could not tell the other ranks: %s", step, report_exc)
