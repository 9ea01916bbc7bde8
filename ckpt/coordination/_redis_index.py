"""The Redis coordinator's index of committed steps (I5: rebuilt from storage when lost).

The COMMIT script adds each committed step to the job's ``committed`` sorted set. The
``indexed`` marker says the set was merged with a storage scan; without it (FLUSHALL, a
restart without persistence, a job that never scanned) the next read merges the set with
a storage scan and sets the marker.

Redis can also die between the commit point and the index update (I5: the step is
committed all the same). CLAIM puts the step in ``claimed`` before the manifest is
published and COMMIT moves it to ``committed``; a read that finds steps left in
``claimed`` asks storage whether their manifest exists, indexes those that have one, and
forgets those that have none unless a save of the current generation is still
committing them. Steps retention
deleted while Redis was unreachable are dropped on this coordinator's next index call;
and since retention runs right after a commit, a read that settles a claim left behind
replaces the index with storage's listing. Residual: should Redis die
exactly between a successful commit and retention's index update, and the process end
before its next index call, a Redis restarted with persistence still lists the deleted
steps (restore reads storage, not this index; the fix needs retention to record its
intent in Redis before it deletes).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from typing import Any

from ckpt.coordination._redis_connection import RedisLink
from ckpt.coordination._redis_keys import JobKeys
from ckpt.errors import CoordinationError, storage_errors
from ckpt.format import manifest_path, scan_steps
from storage_backends import StorageBackend

log = logging.getLogger(__name__)


class RedisStepIndex:
    """A ``CommittedStepIndex`` kept in Redis, one per job."""

    def __init__(self, link: RedisLink, keys: JobKeys) -> None:
        self._link = link
        self._keys = keys
        self._unforgotten: set[int] = set()  # deleted by retention, still in Redis

    def committed_steps(self, backend: StorageBackend) -> list[int]:
        """Committed steps, newest first, from Redis; merged with a storage scan when Redis
        may have lost part of the index (no ``indexed`` marker: FLUSHALL, a restart without
        persistence), and with storage's answer for steps claimed but never marked
        committed (Redis died after the manifest was published).

        Raises:
            CoordinationError: Redis cannot be reached or refused the read.
            StorageError: storage could not be listed.
        """
        self._forget_pending()
        key, marker = self._keys.committed, self._keys.indexed

        def read() -> list[Any]:
            pipe = self._link.client.pipeline(transaction=True)
            pipe.zrevrange(key, 0, -1)
            pipe.exists(marker)
            pipe.zrange(self._keys.claimed, 0, -1)
            return list(pipe.execute())

        raw, complete, claimed = self._link.call("reading the index", read)
        steps = {int(s) for s in raw}
        if claimed and self._settle_claims(backend, [int(s) for s in claimed]):
            # Redis (or the committer) died after a commit point: retention may have run
            # then without telling the index. Storage is the truth: the index becomes its
            # listing.
            return self._replace_with_storage(backend, steps)
        if complete:
            return sorted(steps - self._unforgotten, reverse=True)
        # No marker: Redis never saw a storage scan, or lost its state (FLUSHALL, a restart
        # without persistence) and only holds the steps committed since. Merge, never drop:
        # a step committed while we scan is in Redis and must stay.
        with storage_errors(f"listing checkpoints under {backend.url}"):
            found = scan_steps(backend).committed
        merged = sorted({*found, *steps} - self._unforgotten, reverse=True)
        self._store(merged)
        if len(merged) > len(steps):
            log.info(
                "job %s: rebuilt the committed-step index from storage (%d steps)",
                self._keys.job,
                len(merged),
            )
        return merged

    def _replace_with_storage(self, backend: StorageBackend, before: set[int]) -> list[int]:
        """The index rebuilt as storage's listing (plus steps committed while listing)."""
        with storage_errors(f"listing checkpoints under {backend.url}"):
            found = set(scan_steps(backend).committed)
        key = self._keys.committed

        def rebuild() -> list[Any]:
            pipe = self._link.client.pipeline(transaction=True)
            pipe.zrange(key, 0, -1)
            pipe.delete(key)
            return list(pipe.execute())

        after, _ = self._link.call("rebuilding the index", rebuild)
        steps = (found | ({int(s) for s in after} - before)) - self._unforgotten
        self._store(steps)
        log.info(
            "job %s: rebuilt the committed-step index from storage (%d steps) after Redis "
            "was unreachable at a commit",
            self._keys.job,
            len(steps),
        )
        return sorted(steps, reverse=True)

    def _store(self, steps: Collection[int]) -> None:
        """Add ``steps`` to the index and mark it as complete (a storage scan is in it)."""

        def store() -> None:
            pipe = self._link.client.pipeline(transaction=True)
            if steps:
                pipe.zadd(self._keys.committed, {str(s): s for s in steps})
            pipe.set(self._keys.indexed, "1")
            pipe.execute()

        self._link.call("rebuilding the index", store)

    def forget_steps(self, steps: Sequence[int]) -> None:
        """Drop deleted steps from the index (retention). With Redis unreachable, they are
        dropped at this coordinator's next index call (a warning says so)."""
        self._unforgotten.update(steps)
        try:
            self._forget_pending()
        except CoordinationError as exc:
            log.warning(
                "job %s: could not drop steps %s from the Redis index (%s); "
                "they are dropped at the next index update",
                self._keys.job,
                sorted(self._unforgotten),
                exc,
            )

    def _forget_pending(self) -> None:
        if not self._unforgotten:
            return
        gone = sorted(self._unforgotten)
        key = self._keys.committed
        self._link.call(
            "updating the index", lambda: self._link.client.zrem(key, *[str(s) for s in gone])
        )
        self._unforgotten.difference_update(gone)

    def _settle_claims(self, backend: StorageBackend, claimed: list[int]) -> bool:
        """Index the steps of ``claimed`` whose manifest storage holds and drop the claims
        no save of the current generation is still committing. Returns whether any claim
        was settled (Redis or a committer died after a claim)."""
        with storage_errors(f"checking claimed steps under {backend.url}"):
            published = {s for s in claimed if backend.exists(manifest_path(s))}
        unpublished = [s for s in claimed if s not in published]

        def states() -> list[Any]:
            pipe = self._link.client.pipeline(transaction=False)
            pipe.get(self._keys.gen)
            for s in unpublished:
                pipe.hmget(self._keys.step_hash(s), "state", "gen")
            return list(pipe.execute())

        current, *answers = self._link.call("reading claimed steps", states)
        in_flight = {
            s
            for s, (state, gen) in zip(unpublished, answers)
            if state == b"committing" and gen is not None and gen == current
        }
        settled = [s for s in claimed if s not in in_flight]

        def settle() -> None:
            pipe = self._link.client.pipeline(transaction=True)
            if published:
                pipe.zadd(self._keys.committed, {str(s): s for s in published})
            pipe.zrem(self._keys.claimed, *[str(s) for s in settled])
            pipe.execute()

        if settled:
            self._link.call("indexing claimed steps", settle)
        if published:
            log.info(
                "job %s: indexed steps %s, published while Redis was unreachable",
                self._keys.job,
                sorted(published),
            )
        return bool(settled)
