"""One rank's connection to Redis: the redis-py client, the registered scripts, and calls
that retry through connection loss (a restarting server) and fail as ``CoordinationError``.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import redis
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from ckpt.coordination import _redis_scripts
from ckpt.errors import CoordinationError

T = TypeVar("T")

# Builds the redis-py client: called as ``factory(url, **options)`` with the URL for
# redis-py and ckpt's connection options (``socket_timeout=None``, ...).
ClientFactory = Callable[..., "redis.Redis"]

CLIENT_OPTIONS: dict[str, Any] = dict(
    socket_timeout=None, socket_connect_timeout=5, health_check_interval=0
)


class RedisLink:
    """The client and scripts of one coordinator, shared by its threads (redis-py's
    connection pool hands each thread its own connection).

    Args:
        client_url: the URL for redis-py.
        rank: named in error messages.
        retry_seconds: how long a call retries through connection errors before failing.
        client_factory: builds the client (default: ``redis.Redis.from_url``).
    """

    def __init__(
        self,
        client_url: str,
        *,
        rank: int,
        retry_seconds: float,
        client_factory: ClientFactory | None = None,
    ) -> None:
        factory = client_factory or redis.Redis.from_url
        # redis-py's return types are loose unions; the protocol knows what each call returns.
        self.client: Any = factory(client_url, **CLIENT_OPTIONS)
        self.scripts = _redis_scripts.register(self.client)
        self._rank = rank
        self._retry_seconds = retry_seconds

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one Redis call, retrying through connection loss (e.g. a restarting server).

        Raises:
            CoordinationError: Redis refused the call, or stayed unreachable for
                ``retry_seconds``; the message names ``what`` and the rank.
        """
        retrying = Retrying(
            retry=retry_if_exception(_retryable),
            stop=stop_after_delay(self._retry_seconds) | stop_after_attempt(1000),
            wait=wait_random_exponential(multiplier=0.05, max=2.0),
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    return fn()
        except redis.AuthenticationError as exc:
            raise CoordinationError(
                f"Redis coordinator ({what}, rank {self._rank}): authentication failed: {exc}; "
                "check the password in the coordinator URL (redis://:PASSWORD@host:port/db)"
            ) from exc
        except redis.RedisError as exc:
            raise CoordinationError(
                f"Redis coordinator ({what}, rank {self._rank}): {exc}"
            ) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def script(self, name: str, keys: Sequence[str], args: Sequence[Any], what: str) -> list[str]:
        """Run the script ``name`` through ``call``; its reply as strings."""
        script = self.scripts[name]
        result = self.call(what, lambda: script(keys=list(keys), args=list(args)))
        return [r.decode() if isinstance(r, bytes) else str(r) for r in result]

    def close(self) -> None:
        self.client.close()


def _retryable(exc: BaseException) -> bool:
    """Connection loss and timeouts are worth retrying; a refused password or certificate
    is not."""
    if isinstance(exc, redis.AuthenticationError):  # a ConnectionError subclass in redis-py
        return False
    if isinstance(exc, redis.ConnectionError) and isinstance(
        exc.__context__, ssl.SSLCertVerificationError
    ):
        return False
    return isinstance(exc, (redis.ConnectionError, redis.TimeoutError))
