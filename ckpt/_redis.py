"""Redis coordinator: consistent global checkpoints across nodes and job restarts.

Keys live under ``ckpt:<job>:`` so that jobs sharing one Redis never see each other:

=============================  ==========================================================
``gen``                        the current generation (fencing token) of the job
``step:<s>``                   hash: state (open/ready/committing/committed/aborted), gen,
                               world, reason
``step:<s>:idx``               hash: rank -> that rank's shard index (JSON)
``step:<s>:ready:<gen>``       list: pushed once when every non-committer has reported
``step:<s>:done:<gen>``        list: one token per non-committer when the step ends
``committed``                  sorted set of committed steps (the index; rebuilt from
                               storage when Redis lost it)
``indexed``                    set once ``committed`` was merged with a storage scan; its
                               absence means Redis may have lost part of the index
``hb:<gen>``                   sorted set: rank -> time of its last heartbeat (ms)
=============================  ==========================================================

Round trips per checkpoint: a non-committer reports (1) and waits for the outcome
(1 blocking pop); the committer waits for the reports (1 blocking pop), collects them
while re-checking its generation (1), publishes the manifest to storage, then marks the
step committed and wakes the others (1). Every transition is one Lua script, so it is
atomic; every script first checks the caller's generation, so an older incarnation can
neither report nor commit (I4). Heartbeats run in their own thread and do not count.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qs, parse_qsl, urlencode, urlparse, urlunparse

import redis
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from ckpt._agreement import GroupAgreement
from ckpt._commit import merge_indexes, publish
from ckpt._coordinator import new_generation
from ckpt._format import Manifest, ShardIndex, manifest_path, scan_steps
from ckpt.errors import CoordinationError, FencedError, storage_errors
from storage_backends import StorageBackend

log = logging.getLogger(__name__)

T = TypeVar("T")

_REPORT = """
local cur = redis.call('GET', KEYS[1])
if not cur then return {'LOST', ''} end
if cur ~= ARGV[1] then return {'FENCED', cur} end
local st = redis.call('HGET', KEYS[2], 'state')
if st and redis.call('HGET', KEYS[2], 'gen') ~= ARGV[1] then
  if st == 'committed' then return {'COMMITTED', ''} end
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
  st = false
end
if st == 'aborted' then return {'ABORTED', redis.call('HGET', KEYS[2], 'reason') or ''} end
if st == 'committed' then return {'COMMITTED', ''} end
if not st then
  redis.call('HSET', KEYS[2], 'state', 'open', 'gen', ARGV[1], 'world', ARGV[4])
  redis.call('EXPIRE', KEYS[2], ARGV[5])
end
redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[3], ARGV[5])
local n = redis.call('HLEN', KEYS[3])
if n == tonumber(ARGV[4]) - 1 and redis.call('HGET', KEYS[2], 'state') == 'open' then
  redis.call('HSET', KEYS[2], 'state', 'ready')
  redis.call('RPUSH', KEYS[4], 'ready')
  redis.call('EXPIRE', KEYS[4], ARGV[5])
end
return {'OK', tostring(n)}
"""

_COLLECT = """
local cur = redis.call('GET', KEYS[1])
if not cur then return {'LOST'} end
if cur ~= ARGV[1] then return {'FENCED', cur} end
local st = redis.call('HGET', KEYS[2], 'state')
if tonumber(ARGV[2]) > 1 then
  if not st then return {'LOST'} end
  if redis.call('HGET', KEYS[2], 'gen') ~= ARGV[1] then return {'LOST'} end
  if st == 'aborted' then return {'ABORTED', redis.call('HGET', KEYS[2], 'reason') or ''} end
  if st ~= 'ready' and st ~= 'committing' then return {'NOTREADY', st} end
else
  redis.call('HSET', KEYS[2], 'gen', ARGV[1], 'world', ARGV[2])
  redis.call('EXPIRE', KEYS[2], ARGV[3])
end
redis.call('HSET', KEYS[2], 'state', 'committing')
local out = {'OK'}
local all = redis.call('HGETALL', KEYS[3])
for i = 2, #all, 2 do out[#out + 1] = all[i] end
return out
"""

_COMMIT = """
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then return {'FENCED', cur} end
local st = redis.call('HGET', KEYS[2], 'state')
if st == 'committed' then return {'OK'} end
redis.call('HSET', KEYS[2], 'state', 'committed', 'gen', ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[2])
redis.call('UNLINK', KEYS[3])
local waiting = tonumber(ARGV[3])
while waiting > 0 do
  local n = math.min(waiting, 1000)
  local batch = {}
  for i = 1, n do batch[i] = 'committed' end
  redis.call('RPUSH', KEYS[5], unpack(batch))
  waiting = waiting - n
end
redis.call('EXPIRE', KEYS[5], ARGV[4])
return {'OK'}
"""

_ABORT = """
local st = redis.call('HGET', KEYS[2], 'state')
if st == 'committed' then return {'COMMITTED'} end
if st and redis.call('HGET', KEYS[2], 'gen') ~= ARGV[1] then return {'OTHER'} end
redis.call('HSET', KEYS[2], 'state', 'aborted', 'gen', ARGV[1], 'reason', ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('UNLINK', KEYS[3])
local waiting = tonumber(ARGV[2])
while waiting > 0 do
  local n = math.min(waiting, 1000)
  local batch = {}
  for i = 1, n do batch[i] = 'aborted' end
  redis.call('RPUSH', KEYS[5], unpack(batch))
  waiting = waiting - n
end
redis.call('EXPIRE', KEYS[5], ARGV[4])
return {'OK'}
"""


def job_from_url(url: str) -> str:
    """A stable job namespace for a checkpoint root (two roots never share one)."""
    return hashlib.sha1(url.encode()).hexdigest()[:16]


class RedisCoordinator:
    """Coordinates the ranks of one job through Redis (``redis://``, ``rediss://``, AUTH).

    Args:
        url: ``redis://[:password@]host:port/db`` (or ``rediss://``); ``?job=NAME`` sets
            the namespace.
        job: namespace of this job's keys (default: derived from the checkpoint root).
        group: the torch.distributed process group that agrees on the generation and
            plan (default: the world when torch.distributed is initialised).
        rank / world_size / generation: for jobs without a process group; rank 0
            creates the generation when none is given.
        timeout: seconds to wait for the other ranks' reports / the commit.
        heartbeat_interval / heartbeat_ttl: a rank whose last heartbeat is older than
            the TTL is lost, and the step in flight is aborted.
        retry_seconds: how long a Redis call retries through connection errors (a
            restarting server) before failing.
    """

    def __init__(
        self,
        url: str,
        *,
        job: str | None = None,
        group: Any = None,
        rank: int | None = None,
        world_size: int | None = None,
        generation: str | None = None,
        timeout: float = 600.0,
        heartbeat_interval: float = 1.0,
        heartbeat_ttl: float = 15.0,
        retry_seconds: float = 30.0,
        key_ttl_seconds: int = 7 * 24 * 3600,
        client: redis.Redis | None = None,
        start_heartbeat: bool = True,
    ) -> None:
        parsed = urlparse(url)
        if parsed.scheme not in ("redis", "rediss", "unix"):
            raise CoordinationError(f"coordinator URL {url!r} must start with redis://, rediss:// or unix://")
        query_job = parse_qs(parsed.query).get("job", [None])[0]
        self.job = job or query_job or "default"
        self._prefix = f"ckpt:{self.job}:"
        # ``job`` is ours; every other query option (ssl_ca_certs, ssl_cert_reqs, ...) is redis-py's.
        client_query = urlencode([(k, v) for k, v in parse_qsl(parsed.query) if k != "job"])
        # redis-py's return types are loose unions; the protocol knows what each call returns.
        self._client: Any = client or redis.Redis.from_url(
            urlunparse(parsed._replace(query=client_query)),
            socket_timeout=None, socket_connect_timeout=5, health_check_interval=0,
        )
        self._timeout = timeout
        self._retry_seconds = retry_seconds
        self._ttl = key_ttl_seconds
        self._hb_interval = heartbeat_interval
        self._hb_ttl = heartbeat_ttl
        self.round_trips = 0  # Redis commands issued by the save protocol (not heartbeats)
        self._lock = threading.Lock()
        self._agreement = GroupAgreement(group) if (group is not None or GroupAgreement.available()) else None
        if self._agreement is not None:
            self._rank = self._agreement.rank
            self._world = self._agreement.world_size
        else:
            self._rank = rank if rank is not None else 0
            self._world = world_size if world_size is not None else 1
        if generation is None:
            if self._agreement is not None:
                generation = self._agreement.broadcast_from_rank0(self._take_generation)
            elif self._rank == 0:
                generation = self._take_generation()
            else:
                raise CoordinationError("ranks other than 0 need the generation when there is no process group")
        self._generation = generation
        self._reports: dict[int, ShardIndex] = {}
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        if start_heartbeat:
            self._beat()
            self._heartbeat = threading.Thread(target=self._heartbeat_loop, name="ckpt-heartbeat", daemon=True)
            self._heartbeat.start()

    # -- plumbing -----------------------------------------------------------------

    def _key(self, *parts: object) -> str:
        return self._prefix + ":".join(str(p) for p in parts)

    def _step_keys(self, step: int) -> list[str]:
        return [
            self._key("gen"),
            self._key("step", step),
            self._key("step", step, "idx"),
            # Per generation: a zombie's blocking pop must never take a token meant for
            # the current incarnation's committer or waiters.
            self._key("step", step, "ready", self._generation),
            self._key("step", step, "done", self._generation),
        ]

    def _call(self, what: str, fn: Callable[[], T], *, count: bool = True) -> T:
        """Run one Redis call, retrying through connection loss (e.g. a restarting server)."""
        retrying = Retrying(
            retry=retry_if_exception(_retryable),
            stop=stop_after_delay(self._retry_seconds) | stop_after_attempt(1000),
            wait=wait_random_exponential(multiplier=0.05, max=2.0),
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    if count:
                        with self._lock:
                            self.round_trips += 1
                    return fn()
        except redis.AuthenticationError as exc:
            raise CoordinationError(
                f"Redis coordinator ({what}, rank {self._rank}): authentication failed: {exc}; check "
                "the password in the coordinator URL (redis://:PASSWORD@host:port/db)"
            ) from exc
        except redis.RedisError as exc:
            raise CoordinationError(f"Redis coordinator ({what}, rank {self._rank}): {exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _blpop(self, key: str, timeout: float, what: str) -> Any:
        return self._call(what, lambda: self._client.blpop([key], timeout=timeout))

    def _script(self, source: str, keys: Sequence[str], args: Sequence[object], what: str) -> list[Any]:
        script = self._client.register_script(source)
        result = self._call(what, lambda: script(keys=list(keys), args=list(args)))
        return [r.decode() if isinstance(r, bytes) else r for r in result]

    def _take_generation(self) -> str:
        token = new_generation()
        self._call("taking a new generation", lambda: self._client.set(self._key("gen"), token))
        log.info("job %s: generation %s", self.job, token)
        return token

    def _fenced(self, current: str) -> FencedError:
        return FencedError(
            f"job {self.job}: this writer's generation {self._generation} was superseded by "
            f"{current}; a newer incarnation of the job owns the checkpoints now"
        )

    def _relost(self, step: int) -> CoordinationError:
        # Redis lost our state (restarted without persistence): claim the generation
        # again unless a newer one took it, and fail this step cleanly.
        current = self._call("re-registering", lambda: self._client.set(self._key("gen"), self._generation, nx=True, get=True))
        if current is not None and current.decode() != self._generation:
            return self._fenced(current.decode())
        reason = "the Redis coordinator lost its state (restarted without persistence)"
        self.abort(step, reason)
        return CoordinationError(
            f"step {step}: the Redis coordinator lost its state (restarted without persistence); "
            "the step is aborted, the previous committed checkpoint stays the newest"
        )

    # -- Coordinator interface --------------------------------------------------------

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world

    @property
    def generation(self) -> str:
        return self._generation

    def begin(self, step: int) -> None:
        return None

    def all_gather(self, obj: Any) -> list[Any]:
        if self._agreement is None:
            if self._world > 1:
                raise CoordinationError("a multi-rank save needs a process group to plan who writes what")
            return [obj]
        return self._agreement.all_gather(obj)

    def any_rank(self, flags: Sequence[bool]) -> list[bool]:
        if self._agreement is None:
            return list(flags)
        return self._agreement.any_rank(flags)

    def commit(
        self,
        backend: StorageBackend,
        step: int,
        index: ShardIndex,
        *,
        chunk_bytes: int,
        user_metadata: Mapping[str, Any],
    ) -> Manifest | None:
        if self._rank != 0:
            self.report(step, index.to_bytes())
            self.wait_outcome(step, backend)
            return None
        indexes = [index, *self.collect(step, chunk_bytes)]
        try:
            manifest = merge_indexes(
                step=step,
                generation=self._generation,
                world_size=self._world,
                chunk_bytes=chunk_bytes,
                indexes=indexes,
                user_metadata=user_metadata,
            )
            publish(backend, manifest)
        except BaseException as exc:
            # Wake the other ranks now instead of letting them wait out their timeout.
            self._abort_quietly(step, f"the committer (rank {self._rank}) could not publish the manifest: {exc}")
            raise
        self.mark_committed(step)
        return manifest

    # -- the protocol, one call per round trip (the scale benchmark drives these) -------

    def report(self, step: int, index_json: bytes) -> int:
        """A non-committer's data is durable. Returns how many ranks have reported."""
        status, detail = self._script(
            _REPORT, self._step_keys(step),
            [self._generation, self._rank, index_json, self._world, self._ttl],
            f"reporting step {step}",
        )
        if status == "OK":
            return int(detail)
        if status == "FENCED":
            raise self._fenced(detail)
        if status == "LOST":
            raise self._relost(step)
        if status == "COMMITTED":
            raise CoordinationError(f"step {step} is already committed by an earlier generation")
        raise CoordinationError(f"step {step} was aborted: {detail}")

    def collect(self, step: int, chunk_bytes: int) -> list[ShardIndex]:
        """Committer: wait until every other rank reported, then fetch their indexes."""
        keys = self._step_keys(step)
        deadline = time.monotonic() + self._timeout
        if self._world > 1:
            while True:
                slice_s = max(0.01, min(1.0, deadline - time.monotonic()))
                got = self._blpop(keys[3], slice_s, f"waiting for reports of step {step}")
                if got is not None:
                    break
                self._check_waiting(step, deadline, waiting_for="reports")
        result = self._script(_COLLECT, keys, [self._generation, self._world, self._ttl], f"collecting step {step}")
        status = result[0]
        if status == "FENCED":
            raise self._fenced(result[1])
        if status == "LOST":
            raise self._relost(step)
        if status != "OK":
            raise CoordinationError(f"step {step}: cannot commit ({status} {result[1:]!r})")
        return [
            ShardIndex.from_bytes(raw.encode() if isinstance(raw, str) else raw, f"Redis report of step {step}", chunk_bytes)
            for raw in result[1:]
        ]

    def mark_committed(self, step: int) -> None:
        """Committer: the manifest is published; record the step and wake the other ranks."""
        keys = [*self._step_keys(step)[:3], self._key("committed"), self._step_keys(step)[4]]
        result = self._script(_COMMIT, keys, [self._generation, step, self._world - 1, self._ttl], f"committing step {step}")
        if result[0] == "FENCED":
            # The manifest is already durable: storage is the truth, the step is committed. But
            # this writer is a zombie: it must stop (no retention, no further saves).
            log.warning("step %d committed in storage, but generation %s was superseded in Redis", step, self._generation)
            raise FencedError(
                f"job {self.job}: step {step}'s manifest was published, but this writer's generation "
                f"{self._generation} was superseded by {result[1]} before it could mark the step "
                "committed; a newer incarnation of the job owns the checkpoints now"
            )

    def wait_outcome(self, step: int, backend: StorageBackend | None = None) -> None:
        """Non-committer: wait until the step is committed; raise when it is aborted."""
        keys = self._step_keys(step)
        deadline = time.monotonic() + self._timeout
        while True:
            slice_s = max(0.01, min(1.0, deadline - time.monotonic()))
            got = self._blpop(keys[4], slice_s, f"waiting for the commit of step {step}")
            if got is not None:
                if got[1] == b"committed":
                    return
                reason = self._client.hget(keys[1], "reason")
                raise CoordinationError(f"step {step} was aborted: {(reason or b'').decode()}")
            if backend is not None and self._manifest_exists(backend, step):
                return  # committed in storage; the committer died before telling Redis
            self._check_waiting(step, deadline, waiting_for="the commit")

    def _manifest_exists(self, backend: StorageBackend, step: int) -> bool:
        with storage_errors(f"checking the commit of step {step} under {backend.url}"):
            return backend.exists(manifest_path(step))

    def _check_waiting(self, step: int, deadline: float, *, waiting_for: str) -> None:
        """Between blocking pops: give up on lost state, lost ranks and the deadline."""
        keys = self._step_keys(step)
        current = self._call("checking the generation", lambda: self._client.get(keys[0]), count=False)
        if current is None:
            raise self._relost(step)
        if current.decode() != self._generation:
            raise self._fenced(current.decode())
        state = self._call("checking the step", lambda: self._client.hgetall(keys[1]), count=False)
        if state.get(b"state") == b"aborted" and state.get(b"gen", b"").decode() == self._generation:
            raise CoordinationError(f"step {step} was aborted: {state.get(b'reason', b'').decode()}")
        lost = self.lost_ranks()
        if lost:
            reason = f"ranks {lost} stopped heartbeating while rank {self._rank} waited for {waiting_for}"
            self.abort(step, reason)
            raise CoordinationError(f"step {step} aborted: {reason}")
        if time.monotonic() > deadline:
            reason = f"rank {self._rank} waited {self._timeout:.0f} s for {waiting_for}"
            self.abort(step, reason)
            raise CoordinationError(f"step {step} aborted: {reason}; the previous committed checkpoint stays the newest")

    def report_failure(self, backend: StorageBackend, step: int, reason: str) -> None:
        self.abort(step, f"rank {self._rank} failed: {reason}")

    def abort(self, step: int, reason: str) -> None:
        """Mark the step aborted and wake every waiting rank."""
        self._script(_ABORT, self._step_keys(step), [self._generation, self._world - 1, reason, self._ttl], f"aborting step {step}")
        log.warning("step %d aborted: %s", step, reason)

    def _abort_quietly(self, step: int, reason: str) -> None:
        """``abort`` on a path that is already failing: its own error must not hide the first."""
        try:
            self.abort(step, reason)
        except CoordinationError as exc:
            log.warning("step %d: could not mark the step aborted in Redis: %s", step, exc)

    # -- heartbeats ------------------------------------------------------------------

    def _beat(self) -> None:
        key = self._key("hb", self._generation)
        pipe = self._client.pipeline(transaction=False)
        pipe.zadd(key, {str(self._rank): int(time.time() * 1000)})
        pipe.expire(key, max(60, int(self._hb_ttl * 10)))
        pipe.execute()

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self._hb_interval):
            try:
                self._beat()
            except redis.RedisError as exc:
                log.warning("rank %d: heartbeat to Redis failed: %s", self._rank, exc)

    def lost_ranks(self) -> list[int]:
        """Ranks of this generation whose heartbeat is older than the TTL (or never came)."""
        beats = self._call("reading heartbeats", lambda: self._client.zrange(self._key("hb", self._generation), 0, -1, withscores=True), count=False)
        now = time.time() * 1000
        ttl = self._hb_ttl * 1000
        seen = {int(member): float(score) for member, score in beats}
        if not seen:
            return []  # Redis lost the heartbeats; the ranks are beating again
        # A rank that never beat counts as lost only once the others have beaten for a TTL.
        since = min(seen.values())
        return sorted(
            r for r in range(self._world)
            if (r in seen and now - seen[r] > ttl) or (r not in seen and now - since > ttl)
        )

    # -- the index of committed steps (I5: rebuilt from storage when lost) ---------------

    def committed_steps(self, backend: StorageBackend) -> list[int]:
        """Committed steps, newest first, from Redis; merged with a storage scan when Redis may
        have lost part of the index (no ``indexed`` marker: FLUSHALL, a restart without persistence)."""
        key, marker = self._key("committed"), self._key("indexed")

        def read() -> list[Any]:
            pipe = self._client.pipeline(transaction=True)
            pipe.zrevrange(key, 0, -1)
            pipe.exists(marker)
            return list(pipe.execute())

        steps, complete = self._call("reading the index", read, count=False)
        if complete:
            return [int(s) for s in steps]
        # No marker: Redis never saw a storage scan, or lost its state (FLUSHALL, a restart
        # without persistence) and only holds the steps committed since. Merge, never drop:
        # a step committed while we scan is in Redis and must stay.
        with storage_errors(f"listing checkpoints under {backend.url}"):
            found = scan_steps(backend).committed
        merged = sorted({*found, *(int(s) for s in steps)}, reverse=True)

        def rebuild() -> None:
            pipe = self._client.pipeline(transaction=True)
            if merged:
                pipe.zadd(key, {str(s): s for s in merged})
            pipe.set(marker, "1")
            pipe.execute()

        self._call("rebuilding the index", rebuild, count=False)
        if len(merged) > len(steps):
            log.info("job %s: rebuilt the committed-step index from storage (%d steps)", self.job, len(merged))
        return merged

    def forget_steps(self, steps: Sequence[int]) -> None:
        """Drop deleted steps from the index (retention)."""
        if steps:
            self._call("updating the index", lambda: self._client.zrem(self._key("committed"), *[str(s) for s in steps]), count=False)

    def close(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5)
        self._client.close()


def _retryable(exc: BaseException) -> bool:
    """Connection loss and timeouts are worth retrying; a refused password or certificate is not."""
    if isinstance(exc, redis.AuthenticationError):  # a ConnectionError subclass in redis-py
        return False
    if isinstance(exc, redis.ConnectionError) and isinstance(exc.__context__, ssl.SSLCertVerificationError):
        return False
    return isinstance(exc, (redis.ConnectionError, redis.TimeoutError))


def describe_state(client: redis.Redis, job: str) -> dict[str, Any]:
    """The job's keys and their types, for debugging (``ckpt`` never needs it)."""
    c: Any = client
    return {key.decode(): c.type(key).decode() for key in c.scan_iter(f"ckpt:{job}:*")}
