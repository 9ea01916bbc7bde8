"""Named spans around the phases of a save and a restore, for profilers.

Each span is a ``torch.profiler.record_function`` range (seen by ``torch.profiler``
in the thread that runs the phase) and, once the process uses CUDA, an NVTX range
too (seen by Nsight Systems). One span per phase of a save or restore, never per
tensor: with no profiler running, a span costs a few microseconds.

Names: ``ckpt.save`` (the blocking part of a save call: flatten, plan, stage),
``ckpt.stage`` (device -> host copy), ``ckpt.persist`` and ``ckpt.commit`` (the
save's background thread), ``ckpt.restore``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def span(name: str) -> Iterator[None]:
    """A profiler range called ``name`` around the block (and an NVTX range under CUDA)."""
    with torch.profiler.record_function(name):
        # Only a process that already uses CUDA marks NVTX ranges: asking whether CUDA is
        # available would initialise it in processes that never use it.
        if torch.cuda.is_initialized():
            with torch.cuda.nvtx.range(name):
                yield
        else:
            yield
