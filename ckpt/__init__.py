"""ckpt: fault-tolerant checkpointing and recovery for distributed PyTorch training."""

from ckpt._api import RestoreReport, async_save, load, restore, save
from ckpt._engine import PendingSave, SaveResult, Snapshotter
from ckpt._flatten import ShardedTensor
from ckpt._manager import CheckpointManager, ManagerMetrics
from ckpt._options import Compression, LoadOptions, SaveOptions
from ckpt._rng import RNGState
from ckpt._stateful import ModelOptimizerState
from ckpt.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ChecksumMismatchError,
    CoordinationError,
    CorruptCheckpointError,
    FencedError,
    InvalidStateError,
    ReshardError,
    SaveAbortedError,
    StateMismatchError,
    StorageError,
    StorageFullCheckpointError,
    UnsupportedFormatError,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "ChecksumMismatchError",
    "Compression",
    "CoordinationError",
    "CorruptCheckpointError",
    "FencedError",
    "InvalidStateError",
    "LoadOptions",
    "ManagerMetrics",
    "ModelOptimizerState",
    "PendingSave",
    "RNGState",
    "ReshardError",
    "RestoreReport",
    "SaveAbortedError",
    "SaveOptions",
    "SaveResult",
    "ShardedTensor",
    "Snapshotter",
    "StateMismatchError",
    "StorageError",
    "StorageFullCheckpointError",
    "UnsupportedFormatError",
    "async_save",
    "load",
    "restore",
    "save",
]
