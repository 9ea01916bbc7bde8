"""Redis coordinator: consistent global checkpoints across nodes and job restarts.

The job's keys are listed in ``_redis_keys``, the transitions (Lua scripts) in ``lua/``,
the committer's reader of the reports in ``_redis_committer``, heartbeats in
``_redis_heartbeat`` and the index of committed steps in ``_redis_index``.

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

Failover (``redis+sentinel://``). A promoted replica may lack what the old master
acknowledged last. Nothing is decided on that alone: the manifest in storage is the
commit point and is created only if absent. A rank that met connection loss while
waiting for the commit reports again (a report is idempotent), and the committer reads
the whole stream of reports again after connection loss, skipping ranks it merged, so a
step whose reports were lost is re-driven instead of waiting out its timeout; a lost
generation fails the step (``LOST``) and the next one takes it again; a lost commit
marker is answered by the manifest in storage.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

from ckpt.coordination._agreement import GroupAgreement
from ckpt.coordination._commit import ManifestBuilder, publish_bytes
from ckpt.coordination._protocol import CommittedStepIndex, new_generation
from ckpt.coordination._redis_committer import ReportCollector, ReportsJob
from ckpt.coordination._redis_connection import (
    BLOCKING_CALL_SECONDS,
    ClientFactory,
    RedisLink,
    RedisUnreachableError,
)
from ckpt.coordination._redis_heartbeat import Heartbeat
from ckpt.coordination._redis_index import RedisStepIndex
from ckpt.coordination._redis_keys import JobKeys, StepKeys
from ckpt.coordination._redis_url import RedisURL, check_job
from ckpt.errors import AlreadyCommittedError, CoordinationError, FencedError, storage_errors
from ckpt.format import Manifest, ShardIndex, manifest_path
from storage_backends import StorageBackend

log = logging.getLogger(__name__)

# The committer is woken to read the reports when 16 of them are in (it starts merging
# early), when half are, when all but ... 256, 64 and 16 are (x 4 per wake-up: a
# committer merges reports several times faster than they arrive, so each batch is
# merged before the next, smaller one is in), and when all are: a last batch of 16
# reports, and 7 reads at 4096 ranks, one more per 4x ranks.
_SMALLEST_BATCH = 16
_ATTEMPTS_KEPT = 16  # steps whose save count a coordinator remembers
# A failing path's own Redis calls (marking the step aborted) retry this long at most:
# they must not hide, or delay much, the error that is already on its way.
_FAILING_PATH_RETRY_S = 2.0
# How often a rank that lost Redis while waiting for the commit looks for the manifest.
_STORAGE_POLL_S = 0.2
DEFAULT_JOB = "default"


class RedisCoordinator:
    """Coordinates the ranks of one job through Redis (``redis://``, ``rediss://``, AUTH,
    Sentinel).

    Args:
        url: ``redis://[[user]:password@]host:port/db`` (or ``rediss://``, ``unix://``;
            percent-encode the password), or a master behind Redis Sentinel:
            ``redis+sentinel://[[user]:password@]host:26379[,host:26379...]/SERVICE[/db]``
            (``rediss+sentinel://`` with TLS); ``?job=NAME`` sets the namespace.
        job: namespace of this job's keys (default: the URL's ``job``, else ``default``).
            Jobs sharing one Redis must use different names: two jobs in one namespace
            fence each other. ``CheckpointManager`` and ``ckpt.save`` given a URL without
            ``job`` derive it from the checkpoint root (``job_from_url``); built directly
            without one, the coordinator uses ``default`` and logs a warning.
        group: the torch.distributed process group that agrees on the generation and
            plan (default: the world when torch.distributed is initialised).
        rank / world_size / generation: for jobs without a process group; rank 0
            creates the generation when none is given.
        timeout: seconds to wait for the other ranks' reports / the commit.
        heartbeat_interval / heartbeat_ttl: a rank whose last heartbeat is older than
            the TTL is lost, and the step in flight is aborted.
        retry_seconds: how long a Redis call retries through connection errors (a
            restarting server) before failing; a rank that loses Redis while waiting for
            the commit looks for the manifest in storage this long.
        key_ttl_seconds: how long Redis keeps a step's hash.
        client_factory: builds the redis-py client, called as ``client_factory(url,
            **options)`` with the URL less ``job`` and ckpt's connection options; default
            ``ckpt.coordination.redis_client`` (``redis.Redis.from_url``, or a Sentinel
            master client). ``partial(redis_client, redis_class=C)`` with a ``redis.Redis``
            subclass ``C`` can instrument or adapt the calls (the benchmark counts round
            trips this way).
        start_heartbeat: False leaves this rank without a heartbeat (its liveness is then
            judged by others as lost after a TTL); for simulated ranks.

    Raises:
        CoordinationError: a bad URL or job name, or Redis refused or could not be reached
            (every redis-py error is turned into one, naming the server, never the password).
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
        client_factory: ClientFactory | None = None,
        start_heartbeat: bool = True,
    ) -> None:
        target = RedisURL.parse(url)
        self.job = check_job(job or target.job or DEFAULT_JOB)
        if self.job == DEFAULT_JOB and not (job or target.job):
            log.warning(
                "Redis coordinator at %s: no job name given, using namespace %r; jobs sharing "
                "this Redis must each pass job= (or ?job= in the URL), or they fence each other",
                target.where,
                DEFAULT_JOB,
            )
        self._keys = JobKeys(self.job)
        self._timeout = timeout
        self._ttl = key_ttl_seconds
        # Keys of a step in flight are useless once every rank's timeout has passed.
        self._inflight_ttl = int(max(3600.0, 2 * timeout))
        self._hb_ttl = heartbeat_ttl
        self._retry_seconds = retry_seconds
        self._agreement = (
            GroupAgreement(group) if (group is not None or GroupAgreement.available()) else None
        )
        if self._agreement is not None:
            self._rank = self._agreement.rank
            self._world = self._agreement.world_size
        else:
            self._rank = rank if rank is not None else 0
            self._world = world_size if world_size is not None else 1
        self._link = RedisLink(
            target,
            rank=self._rank,
            retry_seconds=retry_seconds,
            client_factory=client_factory,
        )
        if generation is None:
            if self._agreement is not None:
                generation = self._agreement.broadcast_from_rank0(self._take_generation)
            elif self._rank == 0:
                generation = self._take_generation()
            else:
                raise CoordinationError(
                    "ranks other than 0 need the generation when there is no process group"
                )
        self._generation = generation
        self._index = RedisStepIndex(self._link, self._keys)
        self._collectors: dict[int, ReportCollector] = {}
        self._attempts: dict[int, int] = {}  # step -> saves begun (the same on every rank)
        # step -> this rank's report and the link's ``losses`` when Redis acknowledged it
        self._reported: dict[int, tuple[bytes, int]] = {}
        self._heartbeat = Heartbeat(
            self._link,
            self._keys.heartbeats(generation),
            rank=self._rank,
            interval=heartbeat_interval,
            ttl=heartbeat_ttl,
        )
        if start_heartbeat:
            self._heartbeat.start()

    # -- plumbing -----------------------------------------------------------------

    def _attempt(self, step: int) -> int:
        """Which save of ``step`` by this incarnation is in flight (1 unless one was aborted)."""
        return self._attempts.get(step, 1)

    def _step_keys(self, step: int) -> StepKeys:
        return self._keys.step(step, self._generation, self._attempt(step))

    def _take_generation(self) -> str:
        token = new_generation()
        client = self._link.client
        self._link.call("taking a new generation", lambda: client.set(self._keys.gen, token))
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
        current = self._link.call(
            "re-registering",
            lambda: self._link.client.set(self._keys.gen, self._generation, nx=True, get=True),
        )
        if current is not None and current.decode() != self._generation:
            return self._fenced(current.decode())
        reason = "the Redis coordinator lost its state (restarted without persistence)"
        self._abort_quietly(step, reason)
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
            return AlreadyCommittedError(
                f"step {step} is already committed (by an earlier save of it); this save's "
                "files are discarded"
            )
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

    @property
    def step_index(self) -> CommittedStepIndex:
        """The job's index of committed steps in Redis."""
        return self._index

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
        collector = self._collector(step, chunk_bytes)
        self._collectors[step] = collector
        collector.start()

    def all_gather(self, obj: Any) -> list[Any]:
        if self._agreement is None:
            if self._world > 1:
                raise CoordinationError(
                    "a multi-rank save needs a process group to plan who writes what"
                )
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
            "generation": self._generation,
            "world_size": self._world,
            "chunk_bytes": chunk_bytes,
            "created_unix": time.time(),
            "user_metadata": user_metadata,
        }
        try:
            builder = self.collect(step, chunk_bytes)
            reports_in = time.perf_counter()
            builder.add(index)
            self.claim(step)
            # Measured once: the manifest built after the commit is the one published.
            described["commit_seconds"] = time.perf_counter() - reports_in
            rendered = builder.render(**described)
            publish_bytes(backend, step, self._generation, rendered, files=builder.files)
        except BaseException as exc:
            # Wake the other ranks now instead of letting them wait out their timeout.
            if not isinstance(exc, FencedError):
                reason = f"the committer (rank {self._rank}) could not publish the manifest: {exc}"
                self._abort_quietly(step, reason, committer=True)
            raise
        try:
            self.mark_committed(step)
        except FencedError:
            raise
        except CoordinationError as exc:
            # The manifest is durable: storage is the truth (I5), the step is committed.
            # The waiting ranks find the manifest in storage; the index learns of the step
            # from storage at its next read (the step is in ``claimed``).
            log.warning(
                "step %d committed in storage, but the Redis index could not be updated (%s); "
                "it will be rebuilt from storage",
                step,
                exc,
            )
        return builder.build(**described)  # the same manifest as objects, made after the commit

    # -- the protocol's steps, one call per round trip -----------------------------------

    def report(self, step: int, index_json: bytes) -> int:
        """A non-committer's data is durable. Returns how many ranks have reported."""
        status, detail = self._send_report(step, index_json)
        if status != "OK":
            raise self._refusal(step, status, detail)
        return int(detail)

    def _send_report(self, step: int, index_json: bytes) -> list[str]:
        """The REPORT script's answer; remembers the report to send again after a loss."""
        for old in sorted(self._reported)[:-_ATTEMPTS_KEPT]:
            del self._reported[old]
        keys = self._step_keys(step)
        status, detail = self._link.script(
            "REPORT",
            [keys.gen, keys.step, keys.ranks, keys.reports, keys.wake],
            [
                self._generation,
                self._rank,
                index_json,
                self._world,
                self._ttl,
                self._inflight_ttl,
                _SMALLEST_BATCH,
                self._attempt(step),
            ],
            f"reporting step {step}",
        )
        self._reported[step] = (index_json, self._link.losses)
        return [status, detail]

    def _report_again(self, step: int, backend: StorageBackend | None) -> bool:
        """After connection loss (a restart, a failover), send this rank's report of ``step``
        again: the server that answers now may never have seen it. True when the step
        turns out committed.

        Raises:
            CoordinationError: the step was aborted or Redis lost the generation.
            FencedError: a newer incarnation owns the job.
        """
        index_json, _ = self._reported[step]
        log.info("rank %d: Redis connection was lost; reporting step %d again", self._rank, step)
        status, detail = self._send_report(step, index_json)
        if status == "COMMITTED":
            return True
        if status == "LOST" and backend is not None:
            return self._committed_after_loss(step, backend)
        if status != "OK":
            raise self._refusal(step, status, detail)
        return False

    def collect(self, step: int, chunk_bytes: int) -> ManifestBuilder:
        """Committer: every other rank's report of ``step``, merged (waits for them)."""
        collector = self._collectors.pop(step, None)
        if collector is None:  # no begin(): read in this thread
            collector = self._collector(step, chunk_bytes)
            collector.run()
        return collector.result(self._timeout + 60.0)

    def claim(self, step: int) -> None:
        """Committer, before publishing: the generation is still current, the step not aborted."""
        keys = self._step_keys(step)
        status, detail = self._link.script(
            "CLAIM",
            [keys.gen, keys.step, self._keys.claimed],
            [self._generation, self._world, self._ttl, self._attempt(step), step],
            f"claiming step {step}",
        )
        if status != "OK":
            raise self._refusal(step, status, detail)

    def mark_committed(self, step: int) -> None:
        """Committer: the manifest is published; record the step and wake the other ranks."""
        keys = self._step_keys(step)
        status, detail = self._link.script(
            "COMMIT",
            [
                keys.gen,
                keys.step,
                keys.ranks,
                keys.reports,
                self._keys.committed,
                keys.done,
                keys.wake,
                self._keys.claimed,
            ],
            [
                self._generation,
                step,
                self._world - 1,
                self._ttl,
                self._inflight_ttl,
                self._attempt(step),
            ],
            f"committing step {step}",
        )
        if status == "FENCED":
            # The manifest is already durable: storage is the truth, the step is committed. But
            # this writer is a zombie: it must stop (no retention, no further saves).
            log.warning(
                "step %d committed in storage, but generation %s was superseded in Redis",
                step,
                self._generation,
            )
            raise FencedError(
                f"job {self.job}: step {step}'s manifest was published, but this writer's "
                f"generation {self._generation} was superseded by {detail} before it could mark "
                "the step committed; a newer incarnation of the job owns the checkpoints now"
            )

    def wait_outcome(self, step: int, backend: StorageBackend | None = None) -> None:
        """Non-committer: wait until the step is committed; raise when it is aborted.

        With ``backend``, storage has the last word (I5): a manifest there means the step
        is committed even when Redis never says so (the committer died after publishing,
        or Redis did), and a rank that loses Redis while waiting looks for the manifest.

        Raises:
            CoordinationError: the step was aborted, or its outcome could not be learnt
                (Redis unreachable and no manifest in storage within ``retry_seconds``).
            FencedError: a newer incarnation owns the job.
        """
        deadline = time.monotonic() + self._timeout
        while True:
            try:
                self._wait_on_redis(step, backend, deadline)
                return
            except RedisUnreachableError as exc:
                if backend is None:
                    raise
                if self._outcome_from_storage(step, backend, exc):
                    return
                # Redis answers again: wait on it (the step may still commit there).

    def _wait_on_redis(self, step: int, backend: StorageBackend | None, deadline: float) -> None:
        keys = self._step_keys(step)
        # A long slice: an abort or the commit wakes this rank at once; the slice only
        # bounds how late a dead committer is noticed.
        slice_s = min(BLOCKING_CALL_SECONDS, max(1.0, self._hb_ttl / 2))
        client = self._link.client
        while True:
            reported = self._reported.get(step)
            if (
                reported is not None
                and reported[1] != self._link.losses
                and self._report_again(step, backend)
            ):
                return
            losses = self._link.losses

            def pop(wait_s: float, losses: int) -> Any:
                if self._link.losses != losses:
                    return None  # reconnected: report again before waiting on this server
                return client.blpop([keys.done], timeout=wait_s)

            wait_s = max(0.01, min(slice_s, deadline - time.monotonic()))
            got = self._link.call(
                f"waiting for the commit of step {step}", partial(pop, wait_s, losses)
            )
            if got is None and self._link.losses != losses and step in self._reported:
                continue
            if got is not None:
                if got[1] == b"committed":
                    return
                reason = self._link.call(
                    "reading the abort reason", lambda: client.hget(keys.step, "reason")
                )
                raise CoordinationError(f"step {step} was aborted: {(reason or b'').decode()}")
            if backend is not None and self._manifest_exists(backend, step):
                return  # committed in storage; the committer died before telling Redis
            status, *detail = self._watch(step, "0")
            if status == "COMMITTED":
                return
            if status == "LOST" and backend is not None:
                self._committed_after_loss(step, backend)
                return
            if status != "OK":
                raise self._refusal(step, status, detail[0] if detail else "")
            if detail[0] == "1":
                self._give_up(
                    step,
                    "the committer (rank 0) stopped heartbeating while rank "
                    f"{self._rank} waited for the commit",
                )
            if time.monotonic() > deadline:
                self._give_up(
                    step, f"rank {self._rank} waited {self._timeout:.0f} s for the commit"
                )

    def _committed_after_loss(self, step: int, backend: StorageBackend) -> bool:
        """Redis lost this job's state while this rank waited for the commit of ``step``
        (restarted empty, or a failover to a replica that lacked it). The committer may have
        claimed the step on the server that was lost and be publishing the manifest now, so
        storage decides (I5): the step is marked aborted on the server that answers now (a
        committer that has not claimed it yet fails its claim), then this rank looks for
        the manifest for a heartbeat TTL, the time a claimed step takes to be published.

        Returns:
            True: the manifest is in storage, the step is committed.

        Raises:
            CoordinationError: no manifest appeared; the step is aborted.
            FencedError: a newer incarnation owns the job.
        """
        error = self._relost(step)
        if isinstance(error, FencedError):
            raise error
        give_up = time.monotonic() + max(self._hb_ttl, 2 * _STORAGE_POLL_S)
        while not self._manifest_exists(backend, step):
            if time.monotonic() > give_up:
                raise error
            time.sleep(_STORAGE_POLL_S)
        log.warning(
            "rank %d: step %d is committed (its manifest is in storage) although Redis lost "
            "its state; the Redis index will be rebuilt from storage",
            self._rank,
            step,
        )
        return True

    def _outcome_from_storage(
        self, step: int, backend: StorageBackend, lost: RedisUnreachableError
    ) -> bool:
        """Redis is unreachable while this rank waits for the commit: storage decides.

        Looks for the manifest for ``retry_seconds`` (the committer, if it had claimed the
        step, publishes it; if not, it fails within that time too), asking Redis again
        between looks.

        Returns:
            True: the manifest is there, the step is committed. False: Redis answers again.

        Raises:
            CoordinationError: neither Redis nor storage answered within ``retry_seconds``.
        """
        log.warning(
            "rank %d, step %d: Redis unreachable while waiting for the commit; looking for the "
            "manifest in storage",
            self._rank,
            step,
        )
        grace = max(self._retry_seconds, 2 * _STORAGE_POLL_S)
        give_up = time.monotonic() + grace
        while True:
            if self._manifest_exists(backend, step):
                log.warning(
                    "rank %d: step %d is committed (its manifest is in storage); the Redis "
                    "index will be rebuilt from storage",
                    self._rank,
                    step,
                )
                return True
            if time.monotonic() > give_up:
                raise CoordinationError(
                    f"step {step}: rank {self._rank} cannot learn whether the step committed: "
                    f"the Redis coordinator at {self._link.where} is unreachable and no manifest "
                    f"of step {step} appeared under {backend.url} within {grace:.0f} s; the step "
                    "is not committed (the previous committed checkpoint stays the newest); "
                    "check that redis-server is running, then save again"
                ) from lost
            time.sleep(_STORAGE_POLL_S)
            try:
                self._link.call(
                    "checking that Redis is back", self._link.client.ping, retry_seconds=0
                )
            except RedisUnreachableError:
                continue
            return False

    def report_failure(self, backend: StorageBackend, step: int, reason: str) -> None:
        self.abort(
            step,
            f"rank {self._rank} failed: {reason}",
            committer=self._rank == 0,
            retry_seconds=_FAILING_PATH_RETRY_S,
        )

    def abort(
        self,
        step: int,
        reason: str,
        *,
        committer: bool = False,
        retry_seconds: float | None = None,
    ) -> None:
        """Mark the step aborted and wake every waiting rank (and the committer's reader).

        Once the committer claimed the step only the committer can abort it: it may be
        publishing the manifest."""
        keys = self._step_keys(step)
        status, _ = self._link.script(
            "ABORT",
            [keys.gen, keys.step, keys.ranks, keys.reports, keys.done, keys.wake],
            [
                self._generation,
                self._world - 1,
                reason,
                self._ttl,
                self._inflight_ttl,
                "1" if committer else "0",
                self._attempt(step),
            ],
            f"aborting step {step}",
            retry_seconds=retry_seconds,
        )
        if status == "OK":
            log.warning("step %d aborted: %s", step, reason)

    def close(self) -> None:
        for collector in self._collectors.values():
            collector.stop()
        self._heartbeat.stop()
        self._link.close()

    # -- helpers of the steps ----------------------------------------------------------

    def _collector(self, step: int, chunk_bytes: int) -> ReportCollector:
        return ReportCollector(
            ReportsJob(
                step=step,
                chunk_bytes=chunk_bytes,
                expected=self._world - 1,
                keys=self._step_keys(step),
                link=self._link,
                timeout=self._timeout,
                check_every=min(1.0, self._hb_ttl / 4),
                check=partial(self._check_reporters, step),
            )
        )

    def _check_reporters(self, step: int, started: float, deadline: float) -> None:
        """The committer, every second while reports are due: the generation, an abort, lost
        ranks, the deadline."""
        status, *detail = self._watch(step, "*")
        if status != "OK":
            raise self._refusal(step, status, detail[0] if detail else "")
        beating, stale = int(detail[0]), detail[1:]
        if stale or (beating < self._world and time.monotonic() - started > self._hb_ttl):
            lost = self._heartbeat.lost_ranks(self._world)
            if lost:
                self._give_up(
                    step,
                    f"ranks {lost} stopped heartbeating while rank {self._rank} waited for reports",
                    committer=True,
                )
        if time.monotonic() > deadline:
            self._give_up(
                step, f"rank {self._rank} waited {self._timeout:.0f} s for reports", committer=True
            )

    def _watch(self, step: int, whom: str) -> list[str]:
        keys = self._step_keys(step)
        return self._link.script(
            "WATCH",
            [keys.gen, keys.step, self._keys.heartbeats(self._generation)],
            [self._generation, int(self._hb_ttl * 1000), whom, self._attempt(step)],
            f"checking step {step}",
        )

    def _give_up(self, step: int, reason: str, *, committer: bool = False) -> None:
        self._abort_quietly(step, reason, committer=committer)
        raise CoordinationError(
            f"step {step} aborted: {reason}; the previous committed checkpoint stays the newest"
        )

    def _abort_quietly(self, step: int, reason: str, *, committer: bool = False) -> None:
        """``abort`` on a path that is already failing: its own error must not hide the first."""
        try:
            self.abort(step, reason, committer=committer, retry_seconds=_FAILING_PATH_RETRY_S)
        except CoordinationError as exc:
            log.warning("step %d: could not mark the step aborted in Redis: %s", step, exc)

    def _manifest_exists(self, backend: StorageBackend, step: int) -> bool:
        with storage_errors(f"checking the commit of step {step} under {backend.url}"):
            return backend.exists(manifest_path(step))
