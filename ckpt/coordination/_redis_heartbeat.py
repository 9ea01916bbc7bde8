"""Liveness through Redis: each rank's heartbeat, and which ranks stopped beating.

A rank beats from its own thread every ``interval`` seconds into a sorted set scored by
Redis's clock, so hosts need not agree on the time. A rank whose last heartbeat is older
than ``ttl`` is lost, and the step in flight is aborted. Heartbeats are not retried: the
next one comes soon.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import redis

from ckpt.coordination._redis_connection import RedisLink

log = logging.getLogger(__name__)


class Heartbeat:
    """One rank's heartbeat in the set ``key`` (``hb:<generation>``).

    Args:
        link: the rank's connection.
        key: the heartbeat set of this generation.
        rank: the member this rank beats as.
        interval: seconds between two heartbeats.
        ttl: a rank whose last heartbeat is older than this is lost.
    """

    def __init__(
        self, link: RedisLink, key: str, *, rank: int, interval: float, ttl: float
    ) -> None:
        self._link = link
        self._key = key
        self._rank = rank
        self._interval = interval
        self._ttl = ttl
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Beat once now, then every ``interval`` seconds from a daemon thread.

        Raises:
            CoordinationError: the first heartbeat could not be sent.
        """
        self._link.call(f"sending rank {self._rank}'s first heartbeat", self._beat)
        self._thread = threading.Thread(target=self._loop, name="ckpt-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _beat(self) -> None:
        key_ttl = max(60, int(self._ttl * 10))
        self._link.scripts["BEAT"](keys=[self._key], args=[self._rank, key_ttl])

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._beat()
            except redis.RedisError as exc:
                log.warning("rank %d: heartbeat to Redis failed: %s", self._rank, exc)

    def lost_ranks(self, world_size: int) -> list[int]:
        """Ranks of this generation whose heartbeat is older than the TTL (or never came)."""

        def read() -> list[Any]:
            pipe = self._link.client.pipeline(transaction=True)
            pipe.time()
            pipe.zrange(self._key, 0, -1, withscores=True)
            return list(pipe.execute())

        (seconds, micros), beats = self._link.call("reading heartbeats", read)
        now = seconds * 1000 + micros // 1000
        ttl = self._ttl * 1000
        seen = {int(member): float(score) for member, score in beats}
        if not seen:
            return []  # Redis lost the heartbeats; the ranks are beating again
        # A rank that never beat counts as lost only once the others have beaten for a TTL.
        since = min(seen.values())
        return sorted(
            r
            for r in range(world_size)
            if (r in seen and now - seen[r] > ttl) or (r not in seen and now - since > ttl)
        )
