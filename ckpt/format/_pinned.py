"""Page-locking host buffers for copies to and from CUDA devices.

Shared by the save's staging buffers and the load's read buffers: pageable tensors of
exactly the size needed, registered with ``cudaHostRegister`` (as DCP's stager does)
rather than allocated by PyTorch's caching host allocator, which rounds every block up to
a power of two and never returns freed blocks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the format reader itself needs no torch
    import torch

_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: page-locked for every CUDA context


def page_lock(buffer: torch.Tensor) -> str | None:
    """Page-lock ``buffer`` (a contiguous CPU uint8 tensor): None once locked, else why it
    could not be (no CUDA in this torch, the locked-memory limit, a CUDA error)."""
    import torch

    try:
        status = int(
            torch.cuda.cudart().cudaHostRegister(
                buffer.data_ptr(), buffer.numel(), _REGISTER_PORTABLE
            )
        )
    except (RuntimeError, AssertionError) as exc:  # AssertionError: torch without CUDA
        return str(exc) or type(exc).__name__
    return None if status == 0 else f"cudaHostRegister returned CUDA error {status}"


def page_unlock(buffer: torch.Tensor) -> int:
    """Unlock a buffer ``page_lock`` locked; returns the CUDA status (0: unlocked). The
    caller makes sure no copy still reads it."""
    import torch

    return int(torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr()))
