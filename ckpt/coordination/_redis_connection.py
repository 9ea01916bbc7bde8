"""One rank's connection to Redis: the redis-py client, the registered scripts, and calls
that retry through connection loss (a restarting server) and fail as ``CoordinationError``.

Every redis-py exception, at construction and at each call, becomes a ``CoordinationError``
with one line: what was being done, on which rank, which server (never the password), and
what to do. A server that stays unreachable through ``retry_seconds`` raises
``RedisUnreachableError`` (a ``CoordinationError``): the coordinator can then turn to storage,
the truth (I5). Once a call found the server unreachable, later calls retry only briefly
until one succeeds, so that a failing save does not wait ``retry_seconds`` per call.

With a Sentinel URL (``redis+sentinel://``) the client asks the sentinels for the master
before each new connection: when the master dies, calls fail with connection errors (or
"no master found") until the sentinels have promoted a replica, and the same retries
carry them over to the new master. A failover can lose the writes the old master
acknowledged last (replication is asynchronous); ``losses`` counts the connection errors
this link met, so that the protocol can send again what it may have lost.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import redis
import redis.backoff
import redis.retry
import redis.sentinel
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from ckpt.coordination import _redis_scripts
from ckpt.coordination._redis_url import RedisURL
from ckpt.errors import CoordinationError
from storage_backends import report_retry

log = logging.getLogger(__name__)

T = TypeVar("T")

# Builds the redis-py client: called as ``factory(url, **options)`` with the URL for
# redis-py and ckpt's connection options (``socket_timeout``, ...).
ClientFactory = Callable[..., "redis.Redis"]

# Every blocking command ckpt sends waits at most BLOCKING_CALL_SECONDS, so a server that
# stops answering without closing the connection (stopped, hung, cut off by a firewall)
# ends a call after SOCKET_TIMEOUT_SECONDS instead of never.
BLOCKING_CALL_SECONDS = 30.0
SOCKET_TIMEOUT_SECONDS = BLOCKING_CALL_SECONDS + 30.0
# redis-py's own retries are off (recent versions retry a lost connection 10 times with
# backoff): the one retry policy is ``RedisLink.call``'s, which sees, and counts, each loss.
CLIENT_OPTIONS: dict[str, Any] = dict(
    socket_timeout=SOCKET_TIMEOUT_SECONDS,
    socket_connect_timeout=5,
    health_check_interval=0,
    retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0),
)
# While the server is known to be down, a call retries this long at most (a restart
# that comes back within it is still ridden through).
DOWN_RETRY_SECONDS = 1.0
# A sentinel answers "where is the master" at once or not at all: a dead one is skipped
# after this (the next sentinel of the URL is asked).
SENTINEL_TIMEOUT_SECONDS = 2.0


def redis_client(url: str, *, redis_class: type[redis.Redis] = redis.Redis, **options: Any) -> Any:
    """A redis-py client for a coordinator URL without ckpt's ``job`` option.

    ``redis://``, ``rediss://`` and ``unix://`` become ``redis_class.from_url(url,
    **options)``. ``redis+sentinel://`` and ``rediss+sentinel://`` become a client of the
    service's master found through the listed sentinels (redis-py's ``Sentinel.master_for``):
    each new connection asks the sentinels where the master is, so after a failover the
    client reconnects to the promoted replica. The URL's user, password, db and query
    options are the master's; with ``rediss+sentinel://`` the sentinels are reached over
    TLS too, with the same ``ssl_*`` options.

    Args:
        url: the coordinator URL, less ``?job=``.
        redis_class: the client class (a ``redis.Redis`` subclass, e.g. one that logs).
        options: connection options (``socket_timeout`` ...), over the URL's.

    Raises:
        CoordinationError: a Sentinel URL ckpt cannot parse.
        ValueError: redis-py refused an option of the URL.
    """
    target = RedisURL.parse(url)
    if not target.sentinels:
        return redis_class.from_url(url, **options)
    untyped: Any = redis  # parse_url, Sentinel and master_for carry no annotations
    kwargs = untyped.connection.parse_url(target.master_url)
    kwargs.pop("host", None)
    kwargs.pop("port", None)
    tls = kwargs.pop("connection_class", None) is redis.connection.SSLConnection
    kwargs.update(options)
    asked: dict[str, Any] = dict(
        socket_timeout=SENTINEL_TIMEOUT_SECONDS,
        socket_connect_timeout=SENTINEL_TIMEOUT_SECONDS,
        retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0),  # the next sentinel is asked
    )
    if tls:
        asked.update(ssl=True, **{k: v for k, v in kwargs.items() if k.startswith("ssl_")})
    sentinel = untyped.sentinel.Sentinel(list(target.sentinels), sentinel_kwargs=asked)
    return sentinel.master_for(target.service, redis_class=redis_class, ssl=tls, **kwargs)


class RedisUnreachableError(CoordinationError):
    """The Redis server did not answer through the whole retry budget (connection refused,
    reset or timed out): it is down, restarting, or cut off from this host."""


class RedisLink:
    """The client and scripts of one coordinator, shared by its threads (redis-py's
    connection pool hands each thread its own connection).

    Args:
        target: the parsed coordinator URL.
        rank: named in error messages.
        retry_seconds: how long a call retries through connection errors before failing.
        client_factory: builds the client (default: ``redis_client``).

    Raises:
        CoordinationError: the client cannot be built from the URL.
    """

    def __init__(
        self,
        target: RedisURL,
        *,
        rank: int,
        retry_seconds: float,
        client_factory: ClientFactory | None = None,
    ) -> None:
        self.where = target.where
        self._password = target.password
        self._rank = rank
        self._retry_seconds = retry_seconds
        self._down = threading.Event()  # the last call found the server unreachable
        self._losses = 0
        self._losses_lock = threading.Lock()
        factory = client_factory or redis_client
        try:
            # redis-py's return types are loose unions; the protocol knows what each returns.
            self.client: Any = factory(target.client_url, **CLIENT_OPTIONS)
            self.scripts = _redis_scripts.register(self.client)
        except (redis.RedisError, ValueError, TypeError) as exc:
            raise CoordinationError(
                f"Redis coordinator at {self.where}: cannot use the coordinator URL "
                f"({self._scrub(exc)}); check its scheme, host, port, db and options"
            ) from exc

    @property
    def down(self) -> bool:
        """Whether the last call found the server unreachable (no call succeeded since)."""
        return self._down.is_set()

    @property
    def losses(self) -> int:
        """How many times a call of this link met connection loss (each failed attempt).

        A change means the server may have restarted or failed over since: what was
        written before may be gone, and a caller can send it again."""
        return self._losses

    def _lost(self, exc: BaseException) -> bool:
        """The retry predicate: counts connection losses."""
        if not _retryable(exc):
            return False
        with self._losses_lock:
            self._losses += 1
        return True

    def call(self, what: str, fn: Callable[[], T], *, retry_seconds: float | None = None) -> T:
        """Run one Redis call, retrying through connection loss (e.g. a restarting server).

        Args:
            what: what the call does, for messages ("reporting step 3").
            fn: the call.
            retry_seconds: this call's retry budget (default: the link's; shorter while
                the server is known to be down).

        Raises:
            RedisUnreachableError: the server stayed unreachable through the retry budget.
            CoordinationError: Redis refused the call (authentication, a certificate, an
                error reply); the message names ``what``, the rank and the server.
        """
        budget = self._retry_seconds if retry_seconds is None else retry_seconds
        if self._down.is_set():
            budget = min(budget, DOWN_RETRY_SECONDS)
        retrying = Retrying(
            retry=retry_if_exception(self._lost),
            stop=stop_after_delay(budget) | stop_after_attempt(1000),
            wait=wait_random_exponential(multiplier=0.05, max=2.0),
            before_sleep=lambda state: self._log_retry(what, state),
            reraise=True,
        )
        try:
            for attempt in retrying:
                if attempt.retry_state.attempt_number > 1:
                    report_retry("redis", what)
                with attempt:
                    result = fn()
                    self._down.clear()
                    return result
        except redis.RedisError as exc:
            raise self._error(what, exc, budget) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def script(
        self,
        name: str,
        keys: Sequence[str],
        args: Sequence[Any],
        what: str,
        *,
        retry_seconds: float | None = None,
    ) -> list[str]:
        """Run the script ``name`` through ``call``; its reply as strings."""
        script = self.scripts[name]
        result = self.call(
            what, lambda: script(keys=list(keys), args=list(args)), retry_seconds=retry_seconds
        )
        return [r.decode() if isinstance(r, bytes) else str(r) for r in result]

    def close(self) -> None:
        try:
            self.client.close()
            pool = self.client.connection_pool if isinstance(self.client, redis.Redis) else None
            if isinstance(pool, redis.sentinel.SentinelConnectionPool):
                for sentinel in pool.sentinel_manager.sentinels:
                    sentinel.close()
        except redis.RedisError:  # closing a connection to a dead server: nothing to do
            pass

    # -- errors ------------------------------------------------------------------------

    def _error(self, what: str, exc: redis.RedisError, budget: float) -> CoordinationError:
        """The one-line error for a redis-py exception that ended ``what``."""
        head = f"Redis coordinator at {self.where} ({what}, rank {self._rank})"
        detail = self._scrub(exc)
        if _auth_failure(exc):
            return CoordinationError(
                f"{head}: authentication failed ({detail}); check the user and password in "
                "the coordinator URL (redis://[user]:PASSWORD@host:port/db, percent-encoded)"
            )
        if isinstance(exc, redis.ConnectionError) and isinstance(
            exc.__context__, ssl.SSLCertVerificationError
        ):
            return CoordinationError(
                f"{head}: TLS failed ({detail}); check the server certificate and the "
                "ssl_ca_certs / ssl_cert_reqs options of the coordinator URL"
            )
        if _retryable(exc):
            self._down.set()
            return RedisUnreachableError(
                f"{head}: unreachable for {budget:.0f} s ({detail}); check that redis-server is "
                "running and reachable from this host (or raise retry_seconds to ride out "
                "longer restarts); checkpoints already committed stay in storage"
            )
        return CoordinationError(
            f"{head}: Redis refused the call ({type(exc).__name__}: {detail}); check the "
            "server's version (>= 6.2), memory (maxmemory) and ACLs"
        )

    def _log_retry(self, what: str, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "rank %d: %s: Redis coordinator at %s: %s; retry %d in %.2f s",
            self._rank,
            what,
            self.where,
            self._scrub(exc) if exc is not None else "failed",
            state.attempt_number,
            state.upcoming_sleep,
        )

    def _scrub(self, exc: BaseException) -> str:
        """``exc``'s text, without the password should redis-py have echoed it."""
        if isinstance(exc, redis.sentinel.MasterNotFoundError):
            # redis-py's text is the repr of every sentinel client: say what it means.
            return (
                "no sentinel named a live master: the sentinels are unreachable, or the "
                "master is down and not replaced yet"
            )
        text = str(exc) or type(exc).__name__
        if self._password:
            text = text.replace(self._password, "***")
        return text


def _auth_failure(exc: redis.RedisError) -> bool:
    if isinstance(exc, redis.AuthenticationError):
        return True
    if isinstance(exc, redis.ResponseError):
        text = str(exc)
        return text.startswith(("NOAUTH", "WRONGPASS")) or "Authentication required" in text
    return False


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
