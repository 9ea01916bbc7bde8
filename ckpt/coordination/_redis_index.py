"""The Redis coordinator's index of committed steps (I5: rebuilt from storage when lost).

The COMMIT script adds each committed step to the job's ``committed`` sorted set. The
``indexed`` marker says the set was merged with a storage scan; without it (FLUSHALL, a
restart without persistence, a job that never scanned) the next read merges the set with
a storage scan and sets the marker.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from ckpt.coordination._redis_connection import RedisLink
from ckpt.coordination._redis_keys import JobKeys
from ckpt.errors import storage_errors
from ckpt.format import scan_steps
from storage_backends import StorageBackend

log = logging.getLogger(__name__)


class RedisStepIndex:
    """A ``CommittedStepIndex`` kept in Redis, one per job."""

    def __init__(self, link: RedisLink, keys: JobKeys) -> None:
        self._link = link
        self._keys = keys

    def committed_steps(self, backend: StorageBackend) -> list[int]:
        """Committed steps, newest first, from Redis; merged with a storage scan when Redis
        may have lost part of the index (no ``indexed`` marker: FLUSHALL, a restart without
        persistence)."""
        key, marker = self._keys.committed, self._keys.indexed

        def read() -> list[Any]:
            pipe = self._link.client.pipeline(transaction=True)
            pipe.zrevrange(key, 0, -1)
            pipe.exists(marker)
            return list(pipe.execute())

        steps, complete = self._link.call("reading the index", read)
        if complete:
            return [int(s) for s in steps]
        # No marker: Redis never saw a storage scan, or lost its state (FLUSHALL, a restart
        # without persistence) and only holds the steps committed since. Merge, never drop:
        # a step committed while we scan is in Redis and must stay.
        with storage_errors(f"listing checkpoints under {backend.url}"):
            found = scan_steps(backend).committed
        merged = sorted({*found, *(int(s) for s in steps)}, reverse=True)

        def rebuild() -> None:
            pipe = self._link.client.pipeline(transaction=True)
            if merged:
                pipe.zadd(key, {str(s): s for s in merged})
            pipe.set(marker, "1")
            pipe.execute()

        self._link.call("rebuilding the index", rebuild)
        if len(merged) > len(steps):
            log.info(
                "job %s: rebuilt the committed-step index from storage (%d steps)",
                self._keys.job,
                len(merged),
            )
        return merged

    def forget_steps(self, steps: Sequence[int]) -> None:
        """Drop deleted steps from the index (retention)."""
        if steps:
            key = self._keys.committed
            self._link.call(
                "updating the index", lambda: self._link.client.zrem(key, *[str(s) for s in steps])
            )
