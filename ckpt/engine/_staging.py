"""Reusable host buffers that snapshots are copied into.

The copy into these buffers is the only part of a save that training waits for.
Buffers are kept across saves (one per checkpoint in flight) and only grow, so
steady-state saves allocate nothing. With CUDA, buffers are page-locked and the copies
run on a side stream that first waits for the producer stream.

Page-locking registers ordinary host memory with ``cudaHostRegister`` (as DCP's stager
does) rather than allocating with ``pin_memory=True``: PyTorch's caching host allocator
rounds every block up to a power of two and keeps freed blocks pinned, so a 4.1 GiB
state would pin 8 GiB for good. Registered buffers pin exactly their size and are
unregistered when they are replaced or the pool closes. When the driver refuses to pin
(e.g. a locked-memory limit), staging falls back to pageable memory with a warning.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ckpt.format import page_lock, page_unlock

log = logging.getLogger(__name__)

_ALIGN = 64


def align(n: int, to: int = _ALIGN) -> int:
    return -(-n // to) * to


@dataclass
class StagingBuffer:
    """One slot's flat byte buffer."""

    data: torch.Tensor  # uint8, 1-D, on the host
    slot: int

    @property
    def capacity(self) -> int:
        return self.data.numel()

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        return self.data[offset : offset + nbytes]


class StagingPool:
    """Host buffers for ``slots`` checkpoints in flight; ``acquire`` blocks while all are busy."""

    def __init__(self, slots: int = 1, *, pin: bool | None = None) -> None:
        if slots < 1:
            raise ValueError("a staging pool needs at least one slot")
        self._pin = torch.cuda.is_available() if pin is None else pin
        self._buffers: list[torch.Tensor | None] = [None] * slots
        self._registered: set[int] = set()  # data pointers page-locked by this pool
        self._free = list(range(slots))
        self._cond = threading.Condition()
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    @property
    def pinned(self) -> bool:
        return self._pin

    @property
    def reserved_bytes(self) -> int:
        return sum(b.numel() for b in self._buffers if b is not None)

    @property
    def pinned_bytes(self) -> int:
        """Host memory page-locked for staging (0 without CUDA, or after falling back)."""
        return sum(
            b.numel() for b in self._buffers if b is not None and b.data_ptr() in self._registered
        )

    def busy(self) -> bool:
        with self._cond:
            return not self._free

    @property
    def slots(self) -> int:
        """Checkpoints in flight this pool stages for (one buffer each)."""
        return len(self._buffers)

    def acquire(
        self, nbytes: int, timeout: float | None = None, *, at_most: int | None = None
    ) -> StagingBuffer:
        """A free slot's buffer of at least ``nbytes``, grown if needed (waits for a free slot).

        Args:
            nbytes: the bytes needed.
            timeout: seconds to wait for a free slot (None: no limit).
            at_most: a buffer larger than this (kept from an earlier, larger save) is
                replaced by one of ``nbytes``.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self._free), timeout=timeout):
                raise TimeoutError("no staging buffer became free in time")
            slot = self._free.pop()
        buffer = self._buffers[slot]
        too_large = at_most is not None and buffer is not None and buffer.numel() > at_most
        if buffer is None or buffer.numel() < nbytes or too_large:
            try:
                buffer = self._grow(slot, nbytes)
            except BaseException:
                self.release_slot(slot)
                raise
        return StagingBuffer(buffer, slot)

    def _grow(self, slot: int, nbytes: int) -> torch.Tensor:
        """Replace ``slot``'s buffer with one of ``nbytes``, freeing the old one first."""
        old = self._buffers[slot]
        self._buffers[slot] = None
        if old is not None:
            self._unregister(old)
            del old
        buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        if self._pin:
            self._register(buffer)
        self._buffers[slot] = buffer
        return buffer

    def _register(self, buffer: torch.Tensor) -> None:
        why = page_lock(buffer)
        if why is not None:
            self._pin = False
            log.warning(
                "could not page-lock %d bytes of staging memory (%s); staging in pageable "
                "memory instead: copies from the GPU will be slower and block the copy stream. "
                "Raise the locked-memory limit (ulimit -l) to pin",
                buffer.numel(),
                why,
            )
            return
        self._registered.add(buffer.data_ptr())

    def _unregister(self, buffer: torch.Tensor) -> None:
        pointer = buffer.data_ptr()
        if pointer not in self._registered:
            return
        self._registered.discard(pointer)
        # A copy may still be reading it; nothing is in flight when a slot is replaced or
        # the pool closes, but an unfinished stream must not see the pages unlocked.
        torch.cuda.synchronize()
        status = page_unlock(buffer)
        if status != 0:
            log.warning("cudaHostUnregister of a staging buffer returned CUDA error %d", status)

    def reserve(self, nbytes: int) -> int:
        """Allocate and touch every free slot's buffer up to ``nbytes`` ahead of the first save,
        whose stall would otherwise include the allocation and the page faults.

        Returns:
            The bytes newly allocated (0 when the buffers were large enough already).
        """
        with self._cond:
            slots = list(self._free)
        grown = 0
        for slot in slots:
            buffer = self._buffers[slot]
            if buffer is not None and buffer.numel() >= nbytes:
                continue
            fresh = self._grow(slot, nbytes)
            fresh.zero_()  # the page faults happen now, not during the first copy
            grown += fresh.numel()
        return grown

    def release(self, buffer: StagingBuffer) -> None:
        self.release_slot(buffer.slot)

    def release_slot(self, slot: int) -> None:
        with self._cond:
            if slot not in self._free:
                self._free.append(slot)
            self._cond.notify()

    def copy_in(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy each source tensor into its host destination view; returns when all are copied."""
        cuda_pairs: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for src, dst in pairs:
            if src.device.type == "cuda":
                cuda_pairs.setdefault(src.device, []).append((src, dst))
            else:
                dst.copy_(src)
        events = []
        for device, device_pairs in cuda_pairs.items():
            stream = self._streams.get(device)
            if stream is None:
                stream = self._streams[device] = torch.cuda.Stream(device=device)
            # The side stream must see every kernel queued so far that writes these tensors.
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for src, dst in device_pairs:
                    dst.copy_(src, non_blocking=self._pin)
                events.append(stream.record_event())
        for event in events:
            event.synchronize()

    def close(self) -> None:
        with self._cond:
            for buffer in self._buffers:
                if buffer is not None:
                    self._unregister(buffer)
            self._buffers = [None] * len(self._buffers)
