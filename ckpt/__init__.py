"""ckpt: fault-tolerant checkpointing and recovery for distributed PyTorch training.

The public names below load on first use (PEP 562): ``import ckpt`` costs almost
nothing, and importing ``recovery`` or ``ckpt.format`` first never runs the public
face, which itself imports ``recovery``. The submodule ``ckpt.dcp`` (DCP interop, which
imports torch.distributed.checkpoint) loads the same way, on first use of ``ckpt.dcp``.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from ckpt.errors import (
    AlreadyCommittedError,
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

if TYPE_CHECKING:
    from ckpt import dcp as dcp
    from ckpt._api import RestoreReport, async_save, load, restore, save
    from ckpt._manager import CheckpointManager, ManagerMetrics
    from ckpt._read import read
    from ckpt._rng import RNGState
    from ckpt._stateful import ModelOptimizerState
    from ckpt.coordination import (
        Coordinator,
        LocalCoordinator,
        ProcessGroupCoordinator,
        RedisCoordinator,
    )
    from ckpt.engine import (
        Compression,
        PendingSave,
        SaveOptions,
        SaveResult,
        ShardedTensor,
        Snapshotter,
    )
    from recovery import LoadOptions

DISTRIBUTION = "torch-ckpt"
"""The name to ``pip install`` (``ckpt`` on PyPI is an unrelated project); the import name is
``ckpt``."""

try:
    __version__ = version(DISTRIBUTION)
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

_LAZY = {
    "CheckpointManager": "ckpt._manager",
    "Compression": "ckpt.engine",
    "Coordinator": "ckpt.coordination",
    "LocalCoordinator": "ckpt.coordination",
    "ProcessGroupCoordinator": "ckpt.coordination",
    "RedisCoordinator": "ckpt.coordination",  # imports redis-py on first use
    "LoadOptions": "recovery",
    "ManagerMetrics": "ckpt._manager",
    "ModelOptimizerState": "ckpt._stateful",
    "PendingSave": "ckpt.engine",
    "RNGState": "ckpt._rng",
    "RestoreReport": "ckpt._api",
    "SaveOptions": "ckpt.engine",
    "SaveResult": "ckpt.engine",
    "ShardedTensor": "ckpt.engine",
    "Snapshotter": "ckpt.engine",
    "async_save": "ckpt._api",
    "load": "ckpt._api",
    "read": "ckpt._read",
    "restore": "ckpt._api",
    "save": "ckpt._api",
}


_LAZY_SUBMODULES = ("dcp",)


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"ckpt.{name}")  # which binds it here
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ckpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_LAZY_SUBMODULES))


__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "ChecksumMismatchError",
    "Compression",
    "AlreadyCommittedError",
    "Coordinator",
    "LocalCoordinator",
    "ProcessGroupCoordinator",
    "RedisCoordinator",
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
    "read",
    "restore",
    "save",
]
