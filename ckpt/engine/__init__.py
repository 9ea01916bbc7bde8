"""The save engine: flatten a state, plan who writes what, stage, persist, hand to commit.

A save runs in three named phases (``Snapshotter``): *stage* copies every local shard
into reusable host buffers (the only part that blocks training), *persist* encodes,
checksums and writes the data files in background threads, *commit* reports the files
to the coordinator, which publishes the manifest. The building blocks are public for
tools and tests: ``flatten`` (state -> named tensors + JSON tree), ``assign_writers``
(the write plan: replicated data written once, writers balanced by bytes; made from
rank-independent rules when the state follows them: ``rules_of``, ``regular_plan``; reused
while ``description_digest`` of every rank is unchanged, and after a restart taken from the
restored manifest: ``seeded_part``) and the staging buffers.
"""

from ckpt.engine._default import default_snapshotter
from ckpt.engine._engine import PendingSave, SaveResult, Snapshotter
from ckpt.engine._flatten import (
    FlatTensor,
    MeshPlacement,
    ShardedTensor,
    flatten,
    local_geometry,
    state_tree,
)
from ckpt.engine._job import described_layouts
from ckpt.engine._options import Compression, SaveOptions
from ckpt.engine._plan import (
    MIN_SPLIT_BYTES,
    PieceInfo,
    PieceKey,
    RankPlan,
    WritePlan,
    assign_writers,
    describe,
    description_digest,
    make_plan,
)
from ckpt.engine._plan_cache import PlanCache, plan_now, seeded_part
from ckpt.engine._regular import (
    REPLICATED,
    MeshRanks,
    RegularPlan,
    Rule,
    Rules,
    box_at,
    plan_rules,
    regular_plan,
    rules_of,
)
from ckpt.engine._staging import StagingBuffer, StagingPool

__all__ = [
    "MIN_SPLIT_BYTES",
    "REPLICATED",
    "Compression",
    "FlatTensor",
    "MeshPlacement",
    "MeshRanks",
    "PendingSave",
    "PieceInfo",
    "PieceKey",
    "PlanCache",
    "RankPlan",
    "RegularPlan",
    "Rule",
    "Rules",
    "SaveOptions",
    "SaveResult",
    "ShardedTensor",
    "Snapshotter",
    "StagingBuffer",
    "StagingPool",
    "WritePlan",
    "assign_writers",
    "box_at",
    "default_snapshotter",
    "describe",
    "described_layouts",
    "description_digest",
    "flatten",
    "local_geometry",
    "make_plan",
    "plan_now",
    "plan_rules",
    "regular_plan",
    "rules_of",
    "seeded_part",
    "state_tree",
]
