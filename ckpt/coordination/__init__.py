"""Coordination: how the ranks of a job agree on one consistent checkpoint per step.

The ``Coordinator`` protocol and its implementations: the embedded ones (no server; a
single process, or the job's ``torch.distributed`` process group) and Redis (multi-node,
survives job restarts, keeps an index of committed steps). ``resolve_coordinator`` turns
what a user passes as ``coordinator=`` (None, a coordinator, or a Redis URL) into one.

The commit itself is here too: ``ManifestBuilder`` merges the ranks' shard indexes as
they arrive (validated, overlaps refused, coverage checked) into the sealed manifest,
and ``publish`` creates it atomically, the commit point of a step.

redis-py is imported only when a ``RedisCoordinator`` (or ``redis_client``, the client a
coordinator URL names, Sentinel URLs included) is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ckpt.coordination._commit import (
    ManifestBuilder,
    check_data_files,
    data_files_vanished,
    merge_indexes,
    publish,
    publish_bytes,
)
from ckpt.coordination._embedded import (
    LocalCoordinator,
    ProcessGroupCoordinator,
    default_coordinator,
)
from ckpt.coordination._protocol import CommittedStepIndex, Coordinator, new_generation
from ckpt.coordination._redis_url import job_from_url
from ckpt.coordination._resolve import resolve_coordinator

if TYPE_CHECKING:
    from ckpt.coordination._redis import RedisCoordinator
    from ckpt.coordination._redis_connection import redis_client

__all__ = [
    "CommittedStepIndex",
    "Coordinator",
    "LocalCoordinator",
    "ManifestBuilder",
    "ProcessGroupCoordinator",
    "RedisCoordinator",
    "check_data_files",
    "data_files_vanished",
    "default_coordinator",
    "job_from_url",
    "merge_indexes",
    "new_generation",
    "publish",
    "publish_bytes",
    "redis_client",
    "resolve_coordinator",
]


def __getattr__(name: str) -> Any:
    if name == "RedisCoordinator":  # imports redis-py, so only on first use
        from ckpt.coordination._redis import RedisCoordinator

        return RedisCoordinator
    if name == "redis_client":
        from ckpt.coordination._redis_connection import redis_client

        return redis_client
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
