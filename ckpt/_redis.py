"""Redis coordinator: consistent global checkpoints across nodes and job restarts.

Keys live under ``ckpt:<job>:`` so that jobs sharing one Redis never see each other:

===============================  ========================================================
``gen``                          the current generation (fencing token) of the job
``step:<s>``                     hash: state (open/committing/committed/aborted), gen,
                                 attempt, world, reason, last_report_us, committed_us
                                 (Redis clock)
``step:<s>:ranks:<save>``        set: the ranks that reported (a retried report counts once)
``step:<s>:reports:<save>``      stream: each rank's shard index as it reports, and an
                                 abort marker
``step:<s>:wake:<save>``         list: wakes the committer to read the reports (and on abort)
``step:<s>:done:<save>``         list: one outcome token per non-committer when the step ends
``committed``                    sorted set of committed steps (the index; rebuilt from
                                 storage when Redis lost it)
``indexed``                      set once ``committed`` was merged with a storage scan; its
                                 absence means Redis may have lost part of the index
``hb:<gen>``                     sorted set: rank -> Redis server time of its last
                                 heartbeat (ms; one clock for every host)
===============================  ========================================================

``<save>`` is ``<generation>.<attempt>``: the attempt counts the saves of the step begun
by this incarnation, so a step whose save aborted can be saved again.

Round trips per checkpoint. A non-committer reports (1) and blocks until the outcome
(1); only when the outcome takes longer than half a heartbeat TTL does it check the
step and the committer's heartbeat (1 per slice). The committer (rank 0) starts
reading the reports at ``begin``, while its own data is still being written. The
reports that bring the count to 16 and half of the others, to all but ... 256, 64
and 16, and to all wake it; each wake-up takes every report that has arrived in one
pipelined round trip and merges them into the manifest before the next, so only a few
reports are left to merge when the last one lands: 7 reads at 4096 ranks (one more per
4x ranks), fewer when wake-ups come while it merges. Then it claims the step while
re-checking its generation (1), publishes the manifest to storage, and marks the step
committed, waking the others (1). While reports are due it checks every rank's
heartbeat once per second (1). So the committer makes about 9 round trips plus one per
second of waiting (growing with log4 of the world size); every other rank makes 2 at
any world size. Every transition is one Lua script, so it is atomic; every script
first checks the caller's generation, so an older incarnation can neither report nor
commit (I4). Heartbeats run in their own thread and are not counted. Needs Redis >= 6.2.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
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
from ckpt._commit import ManifestBuilder, publish_bytes
from ckpt._coordinator import new_generation
from ckpt.errors import CoordinationError, FencedError, storage_errors
from ckpt.format import Manifest, ShardIndex, manifest_path, scan_steps
from storage_backends import StorageBackend

log = logging.getLogger(__name__)

T = TypeVar("T")

# The committer is woken to read the reports when 16 of them are in (it starts merging
# early), when half are, when all but ... 256, 64 and 16 are (x 4 per wake-up: a
# committer merges reports several times faster than they arrive, so each batch is
# merged before the next, smaller one is in), and when all are: a last batch of 16
# reports, and 7 reads at 4096 ranks, one more per 4x ranks.
_SMALLEST_BATCH = 16
_ATTEMPTS_KEPT = 16  # steps whose save count a coordinator remembers

# Redis's clock in microseconds, as a string: one clock for every host. The step hash
# keeps when its last report came and when it was committed (the commit latency).
_NOW_US = """
local function now_us()
  local t = redis.call('TIME')
  return t[1] .. string.format('%06d', tonumber(t[2]))
end
"""

# Shared by the scripts. How the step hash stands to the caller (generation g, attempt
# a): 'mine' (g and a), 'older' (another generation, or an earlier save of this step by
# g: it may be replaced unless it committed), 'newer' (a later save of this step by g:
# the caller is stale), or 'none'; and the hash's state.
_RELATION = """
local function relation(key, gen, attempt)
  local h = redis.call('HMGET', key, 'state', 'gen', 'attempt')
  if not h[1] then return 'none', false end
  if h[2] ~= gen then return 'older', h[1] end
  local theirs = tonumber(h[3] or '1')
  if theirs == attempt then return 'mine', h[1] end
  if theirs < attempt then return 'older', h[1] end
  return 'newer', h[1]
end

-- A refusal unless the caller's generation is the job's current one and its save of
-- the step the latest; then the relation and state as above.
local function check_caller(gen_key, step_key, gen, attempt)
  local cur = redis.call('GET', gen_key)
  if not cur then return {'LOST', ''} end
  if cur ~= gen then return {'FENCED', cur} end
  local rel, st = relation(step_key, gen, attempt)
  if rel == 'newer' then return {'ABORTED', 'a later save of this step has begun'} end
  return false, rel, st
end
"""

# KEYS: gen, step, ranks, reports, wake.
# ARGV: gen, rank, index JSON, world, step TTL, in-flight TTL, smallest batch, attempt.
_REPORT = _NOW_US + _RELATION + """
local refused, rel, st = check_caller(KEYS[1], KEYS[2], ARGV[1], tonumber(ARGV[8]))
if refused then return refused end
if rel == 'older' then
  -- Even a commit by an earlier save is history here: its manifest may have been
  -- deleted since; if it is still there, the atomic create of ours refuses.
  redis.call('DEL', KEYS[2])
  st = false
end
if st == 'committed' then return {'COMMITTED', ''} end
if st == 'aborted' then return {'ABORTED', redis.call('HGET', KEYS[2], 'reason') or ''} end
if redis.call('SADD', KEYS[3], ARGV[2]) == 0 then
  return {'OK', tostring(redis.call('SCARD', KEYS[3]))}
end
local n = redis.call('SCARD', KEYS[3])
if st then
  redis.call('HSET', KEYS[2], 'last_report_us', now_us())
else
  redis.call('HSET', KEYS[2], 'state', 'open', 'gen', ARGV[1], 'attempt', ARGV[8], 'world', ARGV[4],
             'last_report_us', now_us())
  redis.call('EXPIRE', KEYS[2], ARGV[5])
end
redis.call('XADD', KEYS[4], '*', 'rank', ARGV[2], 'index', ARGV[3])
if n == 1 then
  redis.call('EXPIRE', KEYS[3], ARGV[6])
  redis.call('EXPIRE', KEYS[4], ARGV[6])
end
local expected = tonumber(ARGV[4]) - 1
local smallest = tonumber(ARGV[7])
local wake = n == smallest or n == math.floor(expected / 2) or n == expected
local rest = smallest
while not wake and rest < expected / 2 do
  wake = n == expected - rest
  rest = rest * 4
end
if wake then
  redis.call('RPUSH', KEYS[5], n)
  redis.call('EXPIRE', KEYS[5], ARGV[6])
end
return {'OK', tostring(n)}
"""

# Committer, before publishing the manifest. KEYS: gen, step. ARGV: gen, world, step TTL,
# attempt.
_CLAIM = _RELATION + """
local refused, rel, st = check_caller(KEYS[1], KEYS[2], ARGV[1], tonumber(ARGV[4]))
if refused then return refused end
if rel == 'mine' and st == 'committed' then return {'COMMITTED', ''} end
if rel == 'mine' and st == 'aborted' then
  return {'ABORTED', redis.call('HGET', KEYS[2], 'reason') or ''}
end
redis.call('HSET', KEYS[2], 'state', 'committing', 'gen', ARGV[1], 'attempt', ARGV[4], 'world', ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return {'OK', ''}
"""

# KEYS: gen, step, ranks, reports, committed, done, wake.
# ARGV: gen, step, waiting ranks, step TTL, in-flight TTL, attempt.
_COMMIT = _NOW_US + """
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then return {'FENCED', cur} end
if redis.call('HGET', KEYS[2], 'state') == 'committed' then return {'OK', ''} end
redis.call('HSET', KEYS[2], 'state', 'committed', 'gen', ARGV[1], 'attempt', ARGV[6], 'committed_us', now_us())
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('ZADD', KEYS[5], ARGV[2], ARGV[2])
redis.call('UNLINK', KEYS[3], KEYS[4], KEYS[7])
local waiting = tonumber(ARGV[3])
while waiting > 0 do
  local n = math.min(waiting, 1000)
  local batch = {}
  for i = 1, n do batch[i] = 'committed' end
  redis.call('RPUSH', KEYS[6], unpack(batch))
  waiting = waiting - n
end
redis.call('EXPIRE', KEYS[6], ARGV[5])
return {'OK', ''}
"""

# KEYS: gen, step, ranks, reports, done, wake.
# ARGV: gen, waiting ranks, reason, step TTL, in-flight TTL, '1' when the committer
# aborts, attempt.
_ABORT = _RELATION + """
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then return {'FENCED', cur} end
local rel, st = relation(KEYS[2], ARGV[1], tonumber(ARGV[7]))
if rel == 'newer' then return {'OTHER', ''} end
if rel == 'mine' and st == 'committed' then return {'COMMITTED', ''} end
if rel == 'mine' and st == 'aborted' then return {'OK', ''} end
if rel == 'mine' and st == 'committing' and ARGV[6] ~= '1' then return {'COMMITTING', ''} end
redis.call('HSET', KEYS[2], 'state', 'aborted', 'gen', ARGV[1], 'attempt', ARGV[7], 'reason', ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('UNLINK', KEYS[3])
redis.call('XADD', KEYS[4], '*', 'abort', ARGV[3])
redis.call('EXPIRE', KEYS[4], ARGV[5])
redis.call('RPUSH', KEYS[6], 'abort')
redis.call('EXPIRE', KEYS[6], ARGV[5])
local waiting = tonumber(ARGV[2])
while waiting > 0 do
  local n = math.min(waiting, 1000)
  local batch = {}
  for i = 1, n do batch[i] = 'aborted' end
  redis.call('RPUSH', KEYS[5], unpack(batch))
  waiting = waiting - n
end
redis.call('EXPIRE', KEYS[5], ARGV[5])
return {'OK', ''}
"""

# A waiting rank's check. KEYS: gen, step, hb. ARGV: gen, heartbeat TTL (ms), whom to
# watch: '*' for every rank (the committer: the number of heartbeats and up to 64
# stale ranks) or one rank (a non-committer watches the committer: '1' when stale);
# attempt.
_WATCH = _RELATION + """
local refused, rel, st = check_caller(KEYS[1], KEYS[2], ARGV[1], tonumber(ARGV[4]))
if refused then return refused end
if rel == 'mine' and st == 'aborted' then
  return {'ABORTED', redis.call('HGET', KEYS[2], 'reason') or ''}
end
if rel == 'mine' and st == 'committed' then return {'COMMITTED', ''} end
local t = redis.call('TIME')
local oldest = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[2])
if ARGV[3] == '*' then
  local out = {'OK', tostring(redis.call('ZCARD', KEYS[3]))}
  local stale = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', string.format('(%d', oldest), 'LIMIT', 0, 64)
  for i = 1, #stale do out[#out + 1] = stale[i] end
  return out
end
local seen = redis.call('ZSCORE', KEYS[3], ARGV[3])
if seen and tonumber(seen) >= oldest then return {'OK', '0'} end
return {'OK', '1'}
"""

# KEYS: hb. ARGV: rank, key TTL (s). The score is Redis's clock, so hosts need not agree.
_BEAT = """
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""


def job_from_url(url: str) -> str:
    """A stable job namespace for a checkpoint root (two roots never share one)."""
    return hashlib.sha1(url.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class _StepKeys:
    gen: str
    step: str
    ranks: str
    reports: str
    wake: str
    done: str


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
        self._scripts = {
            name: self._client.register_script(source)
            for name, source in (("REPORT", _REPORT), ("CLAIM", _CLAIM), ("COMMIT", _COMMIT),
                                 ("ABORT", _ABORT), ("WATCH", _WATCH), ("BEAT", _BEAT))
        }
        self._timeout = timeout
        self._retry_seconds = retry_seconds
        self._ttl = key_ttl_seconds
        # Keys of a step in flight are useless once every rank's timeout has passed.
        self._inflight_ttl = int(max(3600.0, 2 * timeout))
        self._hb_interval = heartbeat_interval
        self._hb_ttl = heartbeat_ttl
        self.round_trips = 0  # Redis round trips of the save protocol (not heartbeats or index reads)
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
        self._collectors: dict[int, _ReportCollector] = {}
        self._attempts: dict[int, int] = {}  # step -> saves begun (the same on every rank)
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        if start_heartbeat:
            self._beat()
            self._heartbeat = threading.Thread(target=self._heartbeat_loop, name="ckpt-heartbeat", daemon=True)
            self._heartbeat.start()

    # -- plumbing -----------------------------------------------------------------

    def _key(self, *parts: object) -> str:
        return self._prefix + ":".join(str(p) for p in parts)

    def _attempt(self, step: int) -> int:
        """Which save of ``step`` by this incarnation is in flight (1 unless one was aborted)."""
        return self._attempts.get(step, 1)

    def _step_keys(self, step: int) -> _StepKeys:
        # Per generation and attempt: a zombie, or a rank still finishing an aborted save
        # of the step, can never read, count or take what belongs to the current save.
        save = f"{self._generation}.{self._attempt(step)}"
        return _StepKeys(
            gen=self._key("gen"),
            step=self._key("step", step),
            ranks=self._key("step", step, "ranks", save),
            reports=self._key("step", step, "reports", save),
            wake=self._key("step", step, "wake", save),
            done=self._key("step", step, "done", save),
        )

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

    def _script(self, name: str, keys: Sequence[str], args: Sequence[Any], what: str) -> list[str]:
        script = self._scripts[name]
        result = self._call(what, lambda: script(keys=list(keys), args=list(args)))
        return [r.decode() if isinstance(r, bytes) else str(r) for r in result]

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

    def _refusal(self, step: int, status: str, detail: str) -> CoordinationError:
        """The error for a script's refusal (anything but OK)."""
        if status == "FENCED":
            return self._fenced(detail)
        if status == "LOST":
            return self._relost(step)
        if status == "COMMITTED":
            return CoordinationError(f"step {step} is already committed by an earlier generation")
        if status == "ABORTED":
            return CoordinationError(f"step {step} was aborted: {detail}")
        return CoordinationError(f"step {step}: unexpected answer from Redis: {status} {detail}")

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

    def begin(self, step: int, chunk_bytes: int) -> None:
        """Every rank counts the saves of ``step`` (a save of a step whose earlier save was
        aborted is a new attempt); the committer starts reading reports now, while its
        own data is still being written."""
        self._attempts[step] = self._attempts.get(step, 0) + 1
        for old in sorted(self._attempts)[:-_ATTEMPTS_KEPT]:
            del self._attempts[old]
        if self._rank != 0 or self._world == 1:
            return
        previous = self._collectors.pop(step, None)
        if previous is not None:
            previous.stop()
        collector = _ReportCollector(self, step, chunk_bytes)
        self._collectors[step] = collector
        collector.start()

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
        described: dict[str, Any] = {
            "generation": self._generation, "world_size": self._world, "chunk_bytes": chunk_bytes,
            "created_unix": time.time(), "user_metadata": user_metadata,
        }
        try:
            builder = self.collect(step, chunk_bytes)
            builder.add(index)
            self.claim(step)
            publish_bytes(backend, step, self._generation, builder.render(**described))
        except BaseException as exc:
            # Wake the other ranks now instead of letting them wait out their timeout.
            if not isinstance(exc, FencedError):
                self._abort_quietly(
                    step, f"the committer (rank {self._rank}) could not publish the manifest: {exc}", committer=True
                )
            raise
        self.mark_committed(step)
        return builder.build(**described)  # the same manifest as objects, made after the commit

    # -- the protocol, one call per round trip (tests and the scale benchmark drive these) --

    def report(self, step: int, index_json: bytes) -> int:
        """A non-committer's data is durable. Returns how many ranks have reported."""
        keys = self._step_keys(step)
        status, detail = self._script(
            "REPORT", [keys.gen, keys.step, keys.ranks, keys.reports, keys.wake],
            [self._generation, self._rank, index_json, self._world, self._ttl, self._inflight_ttl,
             _SMALLEST_BATCH, self._attempt(step)],
            f"reporting step {step}",
        )
        if status != "OK":
            raise self._refusal(step, status, detail)
        return int(detail)

    def collect(self, step: int, chunk_bytes: int) -> ManifestBuilder:
        """Committer: every other rank's report of ``step``, merged (waits for them)."""
        collector = self._collectors.pop(step, None)
        if collector is None:  # no begin(): read in this thread
            collector = _ReportCollector(self, step, chunk_bytes)
            collector.run()
        return collector.result(self._timeout + 60.0)

    def claim(self, step: int) -> None:
        """Committer, before publishing: the generation is still current, the step not aborted."""
        keys = self._step_keys(step)
        status, detail = self._script(
            "CLAIM", [keys.gen, keys.step], [self._generation, self._world, self._ttl, self._attempt(step)],
            f"claiming step {step}",
        )
        if status != "OK":
            raise self._refusal(step, status, detail)

    def mark_committed(self, step: int) -> None:
        """Committer: the manifest is published; record the step and wake the other ranks."""
        keys = self._step_keys(step)
        status, detail = self._script(
            "COMMIT", [keys.gen, keys.step, keys.ranks, keys.reports, self._key("committed"), keys.done, keys.wake],
            [self._generation, step, self._world - 1, self._ttl, self._inflight_ttl, self._attempt(step)],
            f"committing step {step}",
        )
        if status == "FENCED":
            # The manifest is already durable: storage is the truth, the step is committed. But
            # this writer is a zombie: it must stop (no retention, no further saves).
            log.warning("step %d committed in storage, but generation %s was superseded in Redis", step, self._generation)
            raise FencedError(
                f"job {self.job}: step {step}'s manifest was published, but this writer's generation "
                f"{self._generation} was superseded by {detail} before it could mark the step "
                "committed; a newer incarnation of the job owns the checkpoints now"
            )

    def wait_outcome(self, step: int, backend: StorageBackend | None = None) -> None:
        """Non-committer: wait until the step is committed; raise when it is aborted."""
        keys = self._step_keys(step)
        deadline = time.monotonic() + self._timeout
        # A long slice: an abort or the commit wakes this rank at once; the slice only
        # bounds how late a dead committer is noticed.
        slice_s = max(1.0, self._hb_ttl / 2)
        while True:
            wait_s = max(0.01, min(slice_s, deadline - time.monotonic()))
            got = self._call(f"waiting for the commit of step {step}",
                             partial(self._client.blpop, [keys.done], timeout=wait_s))
            if got is not None:
                if got[1] == b"committed":
                    return
                reason = self._call("reading the abort reason", lambda: self._client.hget(keys.step, "reason"))
                raise CoordinationError(f"step {step} was aborted: {(reason or b'').decode()}")
            if backend is not None and self._manifest_exists(backend, step):
                return  # committed in storage; the committer died before telling Redis
            status, *detail = self._watch(step, "0")
            if status == "COMMITTED":
                return
            if status != "OK":
                raise self._refusal(step, status, detail[0] if detail else "")
            if detail[0] == "1":
                self._give_up(step, f"the committer (rank 0) stopped heartbeating while rank {self._rank} "
                                    "waited for the commit")
            if time.monotonic() > deadline:
                self._give_up(step, f"rank {self._rank} waited {self._timeout:.0f} s for the commit")

    def _watch(self, step: int, whom: str) -> list[str]:
        keys = self._step_keys(step)
        return self._script("WATCH", [keys.gen, keys.step, self._key("hb", self._generation)],
                            [self._generation, int(self._hb_ttl * 1000), whom, self._attempt(step)],
                            f"checking step {step}")

    def _give_up(self, step: int, reason: str, *, committer: bool = False) -> None:
        self._abort_quietly(step, reason, committer=committer)
        raise CoordinationError(f"step {step} aborted: {reason}; the previous committed checkpoint stays the newest")

    def _manifest_exists(self, backend: StorageBackend, step: int) -> bool:
        with storage_errors(f"checking the commit of step {step} under {backend.url}"):
            return backend.exists(manifest_path(step))

    def report_failure(self, backend: StorageBackend, step: int, reason: str) -> None:
        self.abort(step, f"rank {self._rank} failed: {reason}", committer=self._rank == 0)

    def abort(self, step: int, reason: str, *, committer: bool = False) -> None:
        """Mark the step aborted and wake every waiting rank (and the committer's reader).

        Once the committer claimed the step only the committer can abort it: it may be
        publishing the manifest."""
        keys = self._step_keys(step)
        status, _ = self._script(
            "ABORT", [keys.gen, keys.step, keys.ranks, keys.reports, keys.done, keys.wake],
            [self._generation, self._world - 1, reason, self._ttl, self._inflight_ttl, "1" if committer else "0",
             self._attempt(step)],
            f"aborting step {step}",
        )
        if status == "OK":
            log.warning("step %d aborted: %s", step, reason)

    def _abort_quietly(self, step: int, reason: str, *, committer: bool = False) -> None:
        """``abort`` on a path that is already failing: its own error must not hide the first."""
        try:
            self.abort(step, reason, committer=committer)
        except CoordinationError as exc:
            log.warning("step %d: could not mark the step aborted in Redis: %s", step, exc)

    # -- heartbeats ------------------------------------------------------------------

    def _beat(self) -> None:
        self._scripts["BEAT"](keys=[self._key("hb", self._generation)],
                              args=[self._rank, max(60, int(self._hb_ttl * 10))])

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self._hb_interval):
            try:
                self._beat()
            except redis.RedisError as exc:
                log.warning("rank %d: heartbeat to Redis failed: %s", self._rank, exc)

    def lost_ranks(self) -> list[int]:
        """Ranks of this generation whose heartbeat is older than the TTL (or never came)."""
        def read() -> list[Any]:
            pipe = self._client.pipeline(transaction=True)
            pipe.time()
            pipe.zrange(self._key("hb", self._generation), 0, -1, withscores=True)
            return list(pipe.execute())

        (seconds, micros), beats = self._call("reading heartbeats", read, count=False)
        now = seconds * 1000 + micros // 1000
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
        for collector in self._collectors.values():
            collector.stop()
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5)
        self._client.close()


class _ReportCollector:
    """The committer's reader of one step's reports: it reads them as they arrive and
    merges each into the manifest at once, so that little is left after the last one.
    Runs in its own thread from ``begin``, or in the committer's thread without one."""

    def __init__(self, coordinator: RedisCoordinator, step: int, chunk_bytes: int) -> None:
        self._coordinator = coordinator
        self._step = step
        self._chunk_bytes = chunk_bytes
        self.builder = ManifestBuilder(step)
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._stopped = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self.run, name=f"ckpt-reports-{self._step}", daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()

    def run(self) -> None:
        try:
            self._read_all()
        except BaseException as exc:  # handed to the committer by result()
            self._error = exc
        finally:
            self._done.set()

    def result(self, timeout: float) -> ManifestBuilder:
        if not self._done.wait(timeout):
            raise CoordinationError(f"step {self._step}: the reports were not read within {timeout:.0f} s")
        if self._error is not None:
            raise self._error
        return self.builder

    def _read_all(self) -> None:
        coordinator, step = self._coordinator, self._step
        expected = coordinator.world_size - 1
        started = time.monotonic()
        deadline = started + coordinator._timeout
        check_every = min(1.0, coordinator._hb_ttl / 4)
        next_check = started + check_every
        last_id = "0-0"
        while len(self.builder.ranks) < expected:
            if self._stopped.is_set():
                raise CoordinationError(f"step {step}: reading the reports was stopped")
            block_ms = max(1, int(1000 * (min(next_check, deadline) - time.monotonic())))
            entries = coordinator._call(
                f"reading the reports of step {step}",
                partial(self._read, last_id, block_ms),
            )
            for entry_id, fields in entries:
                last_id = entry_id
                self._take(fields)
            now = time.monotonic()
            if now >= next_check or now >= deadline:
                self._check(started, deadline)
                next_check = now + check_every

    def _read(self, last_id: str, block_ms: int) -> list[tuple[Any, dict[bytes, bytes]]]:
        """One round trip: drop the reports already merged, wait for a wake-up (or the block
        time), read every report that has arrived."""
        keys = self._coordinator._step_keys(self._step)
        pipe = self._coordinator._client.pipeline(transaction=False)
        if last_id != "0-0":
            pipe.xtrim(keys.reports, minid=last_id, approximate=False)  # keep only unmerged reports
        pipe.blpop([keys.wake], timeout=block_ms / 1000)
        pipe.delete(keys.wake)  # wake-ups queued while merging: this read takes their reports
        pipe.xread({keys.reports: last_id})
        reply = pipe.execute()[-1]
        if not reply:
            return []
        return [(entry_id.decode(), fields) for entry_id, fields in reply[0][1]]

    def _take(self, fields: dict[bytes, bytes]) -> None:
        if b"abort" in fields:
            raise CoordinationError(f"step {self._step} was aborted: {fields[b'abort'].decode()}")
        rank = fields.get(b"rank", b"?").decode()
        where = f"rank {rank}'s report of step {self._step} in Redis"
        self.builder.add_report(fields[b"index"], where, self._chunk_bytes)

    def _check(self, started: float, deadline: float) -> None:
        """Every second while reports are due: the generation, an abort, lost ranks, the deadline."""
        coordinator, step = self._coordinator, self._step
        status, *detail = coordinator._watch(step, "*")
        if status != "OK":
            raise coordinator._refusal(step, status, detail[0] if detail else "")
        beating, stale = int(detail[0]), detail[1:]
        if stale or (beating < coordinator.world_size and time.monotonic() - started > coordinator._hb_ttl):
            lost = coordinator.lost_ranks()
            if lost:
                coordinator._give_up(step, f"ranks {lost} stopped heartbeating while rank "
                                           f"{coordinator.rank} waited for reports", committer=True)
        if time.monotonic() > deadline:
            coordinator._give_up(step, f"rank {coordinator.rank} waited {coordinator._timeout:.0f} s "
                                       "for reports", committer=True)


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
