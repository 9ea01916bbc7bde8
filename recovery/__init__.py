"""Restore side of ckpt: choose a committed step, plan reshards, load byte ranges in parallel."""

from recovery._device_copy import DeviceCopier, HostBuffer, PinnedBufferPool
from recovery._discover import Candidate, candidates, committed_steps, validate_files
from recovery._loader import Destination, Loader, LoadOptions, LoadStats, verify_checkpoint
from recovery._reshard import PieceIndex, ReadRequest, plan_reads

__all__ = [
    "Candidate",
    "Destination",
    "DeviceCopier",
    "HostBuffer",
    "LoadStats",
    "PieceIndex",
    "LoadOptions",
    "Loader",
    "PinnedBufferPool",
    "ReadRequest",
    "candidates",
    "committed_steps",
    "plan_reads",
    "validate_files",
    "verify_checkpoint",
]
