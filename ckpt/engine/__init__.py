"""The save engine: flatten a state, plan who writes what, stage, persist, hand to commit.

A save runs in three named phases (``Snapshotter``): *stage* copies every local shard
into reusable host buffers (the only part that blocks training), *persist* encodes,
checksums and writes the data files in background threads, *commit* reports the files
to the coordinator, which publishes the manifest. The building blocks are public for
tools and tests: ``flatten`` (state -> named tensors + JSON tree), ``assign_writers``
(the write plan: replicated data written once, writers balanced by bytes; reused while
``description_digest`` of every rank is unchanged, and after a restart taken from the
restored manifest: ``seeded_part``) and the staging buffers.
"""

from ckpt.engine._default import default_snapshotter
from ckpt.engine._engine import PendingSave, SaveResult, Snapshotter
from ckpt.engine._flatten import FlatTensor, ShardedTensor, flatten, local_geometry, state_tree
from ckpt.engine._options import Compression, SaveOptions
from ckpt.engine._plan import (
    MIN_SPLIT_BYTES,
    PieceInfo,
    PieceKey,
    PlanCache,
    RankPlan,
    WritePlan,
    assign_writers,
    describe,
    description_digest,
    seeded_part,
)
from ckpt.engine._staging import StagingBuffer, StagingPool

__all__ = [
    "MIN_SPLIT_BYTES",
    "Compression",
    "FlatTensor",
    "PendingSave",
    "PieceInfo",
    "PieceKey",
    "PlanCache",
    "RankPlan",
    "SaveOptions",
    "SaveResult",
    "ShardedTensor",
    "Snapshotter",
    "StagingBuffer",
    "StagingPool",
    "WritePlan",
    "assign_writers",
    "default_snapshotter",
    "describe",
    "description_digest",
    "flatten",
    "local_geometry",
    "seeded_part",
    "state_tree",
]
