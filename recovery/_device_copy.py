"""Host-to-device copies for a load into CUDA tensors: page-locked read buffers and load streams.

Who calls what, from which thread, in which order:

1. The loading thread builds one ``DeviceCopier`` per load, for the CUDA devices its targets
   live on. Each device gets a dedicated load stream, which first waits for the loading
   thread's current stream on that device: kernels queued before the load that touch the
   targets run before any byte of the load lands.
2. Reader threads ``acquire`` a host buffer, read and verify into it, enqueue their copies
   with ``copy`` (non-blocking from page-locked memory, on the load stream) and ``release``
   the buffer, which records an event on the load streams. The buffer is handed out again
   only once that event has completed, so a later read never overwrites bytes a copy is
   still reading.
3. The loading thread calls ``finish``: the current streams wait on the load streams, then
   every copy is waited for and the buffers are unlocked and freed. **The load returns
   after its copies are done** (not merely ordered before the caller's next kernels), so the
   targets are safe on any stream, from the host, and when the caller frees them at once:
   the targets therefore need no ``record_stream``. The temporaries the copies use on the
   device are allocated and freed on the load stream itself, which the caching allocator
   already orders.

Buffers are registered with ``cudaHostRegister`` at their exact size (as the save side's
staging pool does, and for the same reason: PyTorch's caching host allocator rounds up to a
power of two and keeps freed blocks pinned) and unregistered when evicted or when the pool
closes. Their total is bounded; when the driver refuses to page-lock (a locked-memory
limit), the pool warns once and hands out pageable buffers, whose copies block their reader.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ckpt.format import page_lock, page_unlock

log = logging.getLogger(__name__)

DEFAULT_LIMIT_BYTES = 256 << 20


class Completion(Protocol):
    """What a buffer waits for before reuse: a ``torch.cuda.Event`` recorded after its copies."""

    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


@dataclass
class HostBuffer:
    """``data``: ``nbytes`` of a pool buffer (uint8, 1-D, on the host), for one reader."""

    data: torch.Tensor
    base: torch.Tensor = field(repr=False)
    pinned: bool


class PinnedBufferPool:
    """Reusable host buffers of exact sizes, page-locked when possible, at most ``limit_bytes``.

    ``acquire`` reuses the smallest free buffer that fits, else allocates one while the bound
    allows, else evicts free buffers that are too small, else waits for a released buffer's
    copies to complete. A request larger than the bound gets None: the caller reads it into
    pageable memory (page-locking and unlocking it for one read would cost more than it saves).
    A reader holds at most one buffer it waited for, so readers never wait on each other in a
    cycle.
    """

    @staticmethod
    def bound(largest_request: int, limit_bytes: int = DEFAULT_LIMIT_BYTES) -> int:
        """The bound for a load: room for two of its largest requests, at most ``limit_bytes``,
        and never less than one largest request (so that every request can be pooled)."""
        return max(largest_request, min(limit_bytes, 2 * largest_request))

    def __init__(self, limit_bytes: int = DEFAULT_LIMIT_BYTES, *, pin: bool | None = None) -> None:
        if limit_bytes < 1:
            raise ValueError("a pinned buffer pool needs a positive byte limit")
        self._limit = limit_bytes
        self._pin = torch.cuda.is_available() if pin is None else pin
        self._cond = threading.Condition()
        self._free: list[torch.Tensor] = []
        self._pending: deque[tuple[torch.Tensor, list[Completion]]] = deque()
        self._allocated = 0  # bytes of every buffer: free, pending, in use, being allocated
        self._registered: set[int] = set()  # data pointers page-locked by this pool
        self._registered_bytes = 0
        self._closed = False

    @property
    def limit_bytes(self) -> int:
        return self._limit

    @property
    def allocated_bytes(self) -> int:
        """Host memory this pool holds (free, in use, or waiting for its copies)."""
        with self._cond:
            return self._allocated

    @property
    def pinned_bytes(self) -> int:
        """Host memory page-locked by this pool (0 after ``close``, or after falling back)."""
        with self._cond:
            return self._registered_bytes

    def acquire(self, nbytes: int, *, wait: bool = True) -> HostBuffer | None:
        """A buffer of ``nbytes`` for one reader, or None when ``nbytes`` exceeds the bound, or
        when ``wait`` is False and the bound leaves no room now."""
        nbytes = max(nbytes, 1)
        if nbytes > self._limit:
            return None
        with self._cond:
            while True:
                if self._closed:
                    raise RuntimeError("the pinned buffer pool is closed")
                self._reclaim()
                fit = [b for b in self._free if b.numel() >= nbytes]
                if fit:
                    base = min(fit, key=lambda b: b.numel())
                    self._take(base)
                    return self._hand_out(base, nbytes)
                if self._allocated + nbytes <= self._limit:
                    self._allocated += nbytes
                    break
                if self._free:  # free but too small: make room
                    self._evict(max(self._free, key=lambda b: b.numel()))
                    continue
                if not wait:
                    return None
                if self._pending:
                    _, completions = self._pending[0]
                    self._cond.release()
                    try:
                        for completion in completions:
                            completion.synchronize()
                    finally:
                        self._cond.acquire()
                    continue
                self._cond.wait()  # every buffer is with a reader: wait for a release
        try:
            base = torch.empty(nbytes, dtype=torch.uint8)
            pinned = self._register(base)
        except BaseException:
            with self._cond:
                self._allocated -= nbytes
                self._cond.notify_all()
            raise
        return HostBuffer(base, base, pinned)

    def release(self, buffer: HostBuffer, completions: Sequence[Completion] = ()) -> None:
        """Give ``buffer`` back; it is reused once every completion has completed."""
        with self._cond:
            closed = self._closed
            if not closed:
                if completions:
                    self._pending.append((buffer.base, list(completions)))
                else:
                    self._free.append(buffer.base)
                self._cond.notify_all()
        if closed:
            self._drop(buffer.base, list(completions))

    def close(self) -> None:
        """Wait for every released buffer's copies, then unlock and free every buffer.

        Buffers still held by a reader are unlocked when that reader releases them.
        """
        with self._cond:
            self._closed = True
            pending, self._pending = list(self._pending), deque()
            free, self._free = self._free, []
            self._cond.notify_all()
        for base, completions in pending:
            self._drop(base, completions)
        with self._cond:
            for base in free:
                self._evict(base, listed=False)

    def _take(self, base: torch.Tensor) -> None:
        """Remove ``base`` from the free list (by identity: ``==`` on tensors compares values)."""
        del self._free[next(i for i, b in enumerate(self._free) if b is base)]

    def _hand_out(self, base: torch.Tensor, nbytes: int) -> HostBuffer:
        return HostBuffer(base[:nbytes], base, base.data_ptr() in self._registered)

    def _reclaim(self) -> None:
        """Move released buffers whose copies completed to the free list (lock held)."""
        # Any entry may complete first (several load streams; events of several readers).
        waiting: deque[tuple[torch.Tensor, list[Completion]]] = deque()
        for base, completions in self._pending:
            if all(c.query() for c in completions):
                self._free.append(base)
            else:
                waiting.append((base, completions))
        self._pending = waiting

    def _drop(self, base: torch.Tensor, completions: list[Completion]) -> None:
        for completion in completions:
            completion.synchronize()
        with self._cond:
            self._evict(base, listed=False)

    def _evict(self, base: torch.Tensor, *, listed: bool = True) -> None:
        """Unlock and forget a buffer no copy reads any more (lock held)."""
        if listed:
            self._take(base)
        self._unregister(base)
        self._allocated -= base.numel()
        self._cond.notify_all()

    def _register(self, buffer: torch.Tensor) -> bool:
        if not self._pin:
            return False
        why = page_lock(buffer)
        if why is not None:
            with self._cond:
                warn, self._pin = self._pin, False
            if warn:
                log.warning(
                    "could not page-lock %d bytes of load buffers (%s); reading into pageable "
                    "memory instead: copies to the GPU will be slower and block the readers. "
                    "Raise the locked-memory limit (ulimit -l) to pin",
                    buffer.numel(),
                    why,
                )
            return False
        with self._cond:
            self._registered.add(buffer.data_ptr())
            self._registered_bytes += buffer.numel()
        return True

    def _unregister(self, buffer: torch.Tensor) -> None:
        """Unlock ``buffer`` (lock held); callers guarantee no copy still reads it."""
        pointer = buffer.data_ptr()
        if pointer not in self._registered:
            return
        self._registered.discard(pointer)
        self._registered_bytes -= buffer.numel()
        status = page_unlock(buffer)
        if status != 0:
            log.warning("cudaHostUnregister of a load buffer returned CUDA error %d", status)


class DeviceCopier:
    """One load's copies into CUDA tensors: a buffer pool and one load stream per device.

    Build it in the loading thread (it captures that thread's current streams), use
    ``acquire``/``copy``/``release`` from reader threads, and call ``finish`` in the loading
    thread, also after a failure.
    """

    def __init__(self, devices: Iterable[torch.device], pool: PinnedBufferPool) -> None:
        self.pool = pool
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._callers: dict[torch.device, torch.cuda.Stream] = {}
        for device in devices:
            if device in self._streams:
                continue
            caller = torch.cuda.current_stream(device)
            stream = torch.cuda.Stream(device=device)
            # Kernels queued before the load may read or write the targets: ours come after.
            stream.wait_stream(caller)
            self._callers[device] = caller
            self._streams[device] = stream

    def acquire(self, nbytes: int, *, wait: bool = True) -> HostBuffer | None:
        return self.pool.acquire(nbytes, wait=wait)

    def release(self, buffer: HostBuffer) -> None:
        """Give a buffer back once every copy enqueued so far from it has run."""
        events = []
        if buffer.pinned:
            for stream in self._streams.values():
                events.append(stream.record_event())
        self.pool.release(buffer, events)

    def copy(
        self,
        target: torch.Tensor,
        data: torch.Tensor,
        shape: Sequence[int],
        inner: tuple[slice, ...] | None,
        *,
        pinned: bool,
    ) -> None:
        """Enqueue the copy of stored bytes into a CUDA target on its device's load stream.

        Args:
            target: the destination view, on a CUDA device this copier serves.
            data: the stored bytes (uint8, contiguous, on the host) of ``shape`` elements of
                ``target``'s dtype, of which ``inner`` (None: all) is wanted.
            shape: the shape ``data`` holds.
            inner: the slices of ``shape`` that land in ``target``.
            pinned: whether ``data`` is page-locked; pageable bytes are copied synchronously.
        """
        stream = self._streams[target.device]
        dtype = target.dtype
        with torch.cuda.stream(stream):
            if inner is None and target.is_contiguous() and not dtype.is_complex:
                target.reshape(-1).view(torch.uint8).copy_(data, non_blocking=pinned)
                return
            # Bytes to the device as they are, then view, slice and copy there.
            staged = torch.empty(data.numel(), dtype=torch.uint8, device=target.device)
            staged.copy_(data, non_blocking=pinned)
            if dtype.is_complex:
                values = torch.view_as_complex(staged.view(dtype.to_real()).view(-1, 2))
            else:
                values = staged.view(dtype)
            values = values.view(list(shape))
            if inner is not None:
                values = values[inner]
            target.copy_(values)

    def finish(self) -> None:
        """Order the loading thread's streams after the copies, wait for them, free the buffers."""
        try:
            for device, stream in self._streams.items():
                self._callers[device].wait_stream(stream)
            for stream in self._streams.values():
                stream.synchronize()
        finally:
            self.pool.close()
