"""The Redis coordinator against real ``redis-server`` processes on free ports.

Besides the shared conformance suite: the round trips a checkpoint costs, fencing of a
zombie generation, two jobs on one server, the committed index across job restarts and
lost Redis state, heartbeats and timeouts, Redis killed and restarted mid-step (with and
without AOF), Redis gone for good, AUTH and TLS.

Protocol-level cases drive ``report / collect / mark_committed / wait_outcome / abort``
directly, one coordinator object per rank in this process, so that they are exact and
cheap (round trips are counted by a logging redis-py client given as ``client_factory``);
the cases about real failures run real gloo ranks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import pytest
import torch

import ckpt
from ckpt.coordination import job_from_url, publish, redis_client
from ckpt.engine import SaveOptions
from ckpt.format import (
    Box,
    ShardIndex,
    StoredPiece,
    TensorEntry,
    chunk_checksums,
    manifest_path,
    read_manifest,
    scan_steps,
    step_prefix,
)
from storage_backends import LocalBackend, StorageBackend
from tests.coordination.conformance import CoordinatorConformance
from tests.coordination.harness import (
    CoordSpec,
    Ranks,
    assert_loads_as,
    describe,
    save_outcome,
    send,
    steps_of,
    wait_signals,
)
from tests.coordination.redis_helpers import ClientLog, LoggingRedis, describe_state, job_key
from tests.support.redis_server import RedisServer

CHUNK = SaveOptions().chunk_bytes
# A thread standing in for a rank must finish within this (a hang fails the test).
THREAD_WAIT_S = 30.0


def redis_spec(server: RedisServer, job: str, **kw: Any) -> CoordSpec:
    """Short timeouts and a fast heartbeat: failures show within seconds."""
    return CoordSpec(
        "redis", url=server.url(), job=job, **{"timeout": 10.0, "heartbeat_ttl": 4.0, **kw}
    )


class TestRedisConformance(CoordinatorConformance):
    """``RedisCoordinator``: one process (world 1), or gloo ranks agreeing on the generation."""

    @pytest.fixture
    def spec(self, redis_server: RedisServer, job: str) -> CoordSpec:
        return redis_spec(redis_server, job)

    def committed_index(self, spec: CoordSpec, backend: StorageBackend) -> list[int]:
        restarted = spec.redis()  # a new incarnation of the job: a new generation
        try:
            return list(restarted.step_index.committed_steps(backend))
        finally:
            restarted.close()


# -- ranks as objects in this process ------------------------------------------------------


def rank_coordinators(spec: CoordSpec, world: int, **kw: Any) -> list[Any]:
    """One RedisCoordinator per rank of one incarnation (rank 0 takes the generation)."""
    first = spec.redis(rank=0, world_size=world, **kw)
    return [first] + [
        spec.redis(rank=r, world_size=world, generation=first.generation, **kw)
        for r in range(1, world)
    ]


def close_all(coordinators: list[Any]) -> None:
    for c in coordinators:
        c.close()


def shard_index(backend: StorageBackend, step: int, rank: int, generation: str) -> ShardIndex:
    """Rank ``rank``'s durable data for ``step``: one small tensor ``t<rank>`` in its own file."""
    data = torch.full((4,), float(rank)).numpy().tobytes()
    rel = f"data/{generation}-r{rank:05d}-000.safetensors"
    backend.write(f"{step_prefix(step)}/{rel}", data)
    piece = StoredPiece.at(
        Box((0,), (4,)), rel, 0, len(data), "raw", chunk_checksums(memoryview(data), CHUNK)
    )
    return ShardIndex(
        rank,
        {f"t{rank}": TensorEntry("float32", (4,), (piece,))},
        {rel: len(data)},
        state={} if rank == 0 else None,
    )


def commit_rank0(coordinator: Any, backend: StorageBackend, step: int) -> Any:
    index = shard_index(backend, step, 0, coordinator.generation)
    return coordinator.commit(backend, step, index, chunk_bytes=CHUNK, user_metadata={})


def report(coordinator: Any, backend: StorageBackend, step: int) -> int:
    index = shard_index(backend, step, coordinator.rank, coordinator.generation)
    return int(coordinator.report(step, index.to_bytes()))


def test_a_checkpoint_costs_at_most_three_round_trips_per_rank(
    redis_server: RedisServer, job: str, backend: StorageBackend
) -> None:
    """4 ranks: report + wait costs a non-committer 2 round trips; reading the reports +
    claim + commit costs the committer 3. A one-rank save through the engine costs 2."""
    spec = redis_spec(redis_server, job)
    log = ClientLog()
    ranks = rank_coordinators(spec, 4, client_factory=log)
    try:
        before = [c.round_trips for c in log.clients]
        for c in ranks[1:]:
            report(c, backend, 1)
        manifest = commit_rank0(ranks[0], backend, 1)
        for c in ranks[1:]:
            c.wait_outcome(1, backend)
        spent = [c.round_trips - b for c, b in zip(log.clients, before)]
        assert manifest is not None and backend.exists(manifest_path(1))
        assert spent == [3, 2, 2, 2]
    finally:
        close_all(ranks)
    single_log = ClientLog()
    single = spec.redis(client_factory=single_log)
    try:
        before_single = single_log.clients[0].round_trips
        assert save_outcome(single, backend, 2, 0, 1) == "committed"
        assert single_log.clients[0].round_trips - before_single <= 3
    finally:
        single.close()


def test_the_committer_merges_reports_while_they_arrive(
    redis_server: RedisServer, job: str, backend: StorageBackend
) -> None:
    """33 ranks. From ``begin`` the committer reads reports in the background: once 16 are
    in it has merged them (and Redis keeps only unread reports) before any more come;
    once the others are in and merged, the commit needs only the claim and the commit.
    Waiting ranks spend 2 round trips; the step hash records, by Redis's clock, when the
    last report came and when the step was committed."""
    spec = redis_spec(redis_server, job)
    log = ClientLog()
    ranks = rank_coordinators(spec, 33, start_heartbeat=False, client_factory=log)
    clients = log.clients
    try:
        ranks[0].begin(1, CHUNK)
        reader = ranks[0]._collectors[1]
        for c in ranks[1:17]:
            report(c, backend, 1)
        deadline = time.monotonic() + THREAD_WAIT_S
        while len(reader.builder.ranks) < 16:
            assert time.monotonic() < deadline, "the committer did not read the first 16 reports"
            time.sleep(0.01)
        client = redis_server.client()
        stream = job_key(
            job, "step", 1, "reports", f"{ranks[0].generation}.1"
        )  # the first save of step 1
        while client.xlen(stream) > 1:  # Redis drops what the committer merged
            assert time.monotonic() < deadline, "the merged reports stayed in Redis"
            time.sleep(0.01)
        for c in ranks[17:]:
            report(c, backend, 1)
        while len(reader.builder.ranks) < 32:
            assert time.monotonic() < deadline, "the committer did not read the other reports"
            time.sleep(0.01)
        assert clients[0].round_trips <= 6  # reads (16 of them wake it first, then 24 and 32)
        before = clients[0].round_trips
        manifest = commit_rank0(ranks[0], backend, 1)
        assert manifest is not None and sorted(manifest.tensors) == sorted(
            f"t{r}" for r in range(33)
        )
        assert (
            clients[0].round_trips - before == 2
        )  # claim, commit: every report was merged already
        spent = []
        for c, client in zip(ranks[1:], clients[1:]):
            b = client.round_trips
            c.wait_outcome(1, backend)
            spent.append(client.round_trips - b)
        assert spent == [1] * 32  # the report was the first of each rank's 2
        assert read_manifest(backend, 1).tensors.keys() == manifest.tensors.keys()
        marks = client.hmget(job_key(job, "step", 1), "last_report_us", "committed_us")
        assert int(marks[1]) >= int(marks[0]) > 0
    finally:
        close_all(ranks)


class _ReportsBeforeRead(LoggingRedis):
    """The committer's client: keeps the reads of the reports it sends; before the second
    is sent, ``arrive`` runs (reports land while the reader is between two reads)."""

    arrive: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reads: list[str] = []

    def before_send(self, name: str) -> None:
        if name.endswith("XREAD"):
            self.reads.append(name)
            if len(self.reads) == 2 and self.arrive is not None:
                self.arrive()


def test_a_burst_is_read_as_it_arrives_without_waiting_for_a_wake_up(
    redis_server: RedisServer, job: str, backend: StorageBackend
) -> None:
    """301 ranks (wake-ups at 16, 150, 236, 284 and 300 reports). The committer's first
    read brings 16 reports; 15 more land before its next read, crossing no wake-up: a read
    that brought 16 or more while more than 256 are due is followed by one that does not
    wait, so it merges them at once. That read brought fewer than 16, so the next one
    waits again: no polling."""
    spec = redis_spec(redis_server, job)
    log = ClientLog()
    clients: list[_ReportsBeforeRead] = []

    def hooked(url: str, **options: Any) -> _ReportsBeforeRead:
        client = cast(
            _ReportsBeforeRead, redis_client(url, redis_class=_ReportsBeforeRead, **options)
        )
        clients.append(client)
        return client

    first = spec.redis(rank=0, world_size=301, start_heartbeat=False, client_factory=hooked)
    ranks = [first] + [
        spec.redis(
            rank=r,
            world_size=301,
            generation=first.generation,
            start_heartbeat=False,
            client_factory=log,
        )
        for r in range(1, 301)
    ]
    try:
        for c in ranks[1:17]:
            report(c, backend, 1)
        clients[0].arrive = lambda: [report(c, backend, 1) for c in ranks[17:32]]
        ranks[0].begin(1, CHUNK)
        reader = ranks[0]._collectors[1]
        deadline = time.monotonic() + THREAD_WAIT_S
        while len(reader.builder.ranks) < 31:
            assert time.monotonic() < deadline, "the reports that landed between reads waited"
            time.sleep(0.01)
        while len(clients[0].reads) < 3:
            assert time.monotonic() < deadline, "the reader stopped reading"
            time.sleep(0.01)
        # Waits for a wake-up; then none; then, after a read of 15, waits again (at 150).
        assert ["BLPOP" in n for n in clients[0].reads[:3]] == [True, False, True]
        for c in ranks[32:]:
            report(c, backend, 1)
        manifest = commit_rank0(ranks[0], backend, 1)
        assert manifest is not None and len(manifest.tensors) == 301
        for c in ranks[1:]:
            c.wait_outcome(1, backend)
    finally:
        close_all(ranks)


def test_a_retried_report_counts_once(
    redis_server: RedisServer, job: str, backend: StorageBackend
) -> None:
    """A report sent twice (a retry whose first reply was lost) is counted and merged once."""
    spec = redis_spec(redis_server, job)
    ranks = rank_coordinators(spec, 3)
    try:
        assert report(ranks[1], backend, 1) == 1
        assert report(ranks[1], backend, 1) == 1
        assert report(ranks[2], backend, 1) == 2
        manifest = commit_rank0(ranks[0], backend, 1)
        assert manifest is not None and sorted(manifest.tensors) == ["t0", "t1", "t2"]
        for c in ranks[1:]:
            c.wait_outcome(1, backend)
    finally:
        close_all(ranks)


def test_a_corrupt_report_aborts_the_step(
    redis_server: RedisServer, job: str, backend: StorageBackend
) -> None:
    """A report that is not a valid shard index: the committer refuses to commit with an
    error naming the rank, the other rank's wait ends in an abort, no manifest appears."""
    spec = redis_spec(redis_server, job)
    ranks = rank_coordinators(spec, 3)
    try:
        ranks[1].report(
            1, b'{"rank": 1, "tensors": {"t1": {"dtype": "float32", "shape": [4], "pieces": 7}}}'
        )
        report(ranks[2], backend, 1)
        with pytest.raises(ckpt.CorruptCheckpointError, match="rank 1's report of step 1"):
            commit_rank0(ranks[0], backend, 1)
        with pytest.raises(ckpt.CoordinationError, match="aborted"):
            ranks[2].wait_outcome(1, backend)
        assert not backend.exists(manifest_path(1))
    finally:
        close_all(ranks)


def test_waiting_ranks_do_not_poll(
    redis_server: RedisServer, job: str, backend: StorageBackend
) -> None:
    """The commit comes 1.5 s after the report: the waiting rank blocks the whole time in
    one pop (its slice is half the heartbeat TTL) and spends 2 round trips in all."""
    spec = redis_spec(redis_server, job, heartbeat_ttl=4.0)
    log = ClientLog()
    ranks = rank_coordinators(spec, 2, client_factory=log)
    try:
        before = log.clients[1].round_trips
        report(ranks[1], backend, 1)
        with ThreadPoolExecutor(1) as pool:
            waiter = pool.submit(ranks[1].wait_outcome, 1, backend)
            time.sleep(1.5)
            commit_rank0(ranks[0], backend, 1)
            waiter.result(THREAD_WAIT_S)
        assert log.clients[1].round_trips - before == 2
    finally:
        close_all(ranks)


def test_a_report_from_an_earlier_save_of_the_step_is_refused(
    redis_server: RedisServer, job: str, backend: StorageBackend
) -> None:
    """The first save of step 1 aborts and every rank begins it again: a report still
    coming from the first save (a slow rank) is refused, and the second save commits."""
    spec = redis_spec(redis_server, job)
    ranks = rank_coordinators(spec, 2)
    slow = spec.redis(
        rank=1, world_size=2, generation=ranks[0].generation
    )  # stays at the first save
    try:
        for c in (*ranks, slow):
            c.begin(1, CHUNK)
        ranks[1].abort(1, "test: the first save of step 1 fails")
        for c in ranks:
            c.begin(1, CHUNK)
        assert report(ranks[1], backend, 1) == 1
        with pytest.raises(ckpt.CoordinationError, match="a later save of this step has begun"):
            report(slow, backend, 1)
        manifest = commit_rank0(ranks[0], backend, 1)
        assert manifest is not None and sorted(manifest.tensors) == ["t0", "t1"]
        ranks[1].wait_outcome(1, backend)
    finally:
        close_all([*ranks, slow])


def test_redis_remembering_an_old_commit_does_not_block_a_new_save(
    redis_server: RedisServer, job: str, backend: StorageBackend, root: Path
) -> None:
    """Storage is the truth: step 1 committed by an earlier incarnation and still in
    storage refuses a new save of step 1 (the manifest's atomic create), every rank
    learning of it; once the step is deleted from storage (retention, a wiped root)
    while Redis still remembers the commit, a new incarnation saves step 1 again."""
    spec = redis_spec(redis_server, job)
    first = rank_coordinators(spec, 2)
    try:
        report(first[1], backend, 1)
        commit_rank0(first[0], backend, 1)
        first[1].wait_outcome(1, backend)
    finally:
        close_all(first)
    again = rank_coordinators(spec, 2)
    try:
        report(again[1], backend, 1)
        with pytest.raises(ckpt.CoordinationError, match="already committed"):
            commit_rank0(again[0], backend, 1)
        with pytest.raises(ckpt.CoordinationError, match="aborted"):
            again[1].wait_outcome(1)
    finally:
        close_all(again)
    shutil.rmtree(root / step_prefix(1))
    third = rank_coordinators(spec, 2)
    try:
        report(third[1], backend, 1)
        manifest = commit_rank0(third[0], backend, 1)
        third[1].wait_outcome(1, backend)
        assert manifest is not None and read_manifest(backend, 1).generation == third[0].generation
    finally:
        close_all(third)


def test_zombie_generation_is_fenced(
    redis_server: RedisServer, job: str, backend: StorageBackend
) -> None:
    """After a new incarnation takes the job, coordinators holding the old generation get
    FencedError on report, collect, commit, wait_outcome and mark_committed; the zombie
    committer writes no manifest (I4) and takes none of the new incarnation's wake-up
    tokens, so the new incarnation's step commits as if the zombie were not there."""
    spec = redis_spec(redis_server, job)
    old = rank_coordinators(spec, 2)
    new = rank_coordinators(spec, 2)  # the job restarted: a newer generation
    zombie = spec.redis(rank=1, world_size=2, generation=old[0].generation)  # from the old string
    try:
        assert new[0].generation != old[0].generation
        assert report(new[1], backend, 5) == 1  # the new step 5 is ready for its committer
        for stale in (old[1], zombie):
            with pytest.raises(ckpt.FencedError, match="superseded"):
                report(stale, backend, 5)
        with pytest.raises(ckpt.FencedError):
            old[0].collect(5, CHUNK)
        with pytest.raises(ckpt.FencedError):
            commit_rank0(old[0], backend, 5)
        assert not backend.exists(manifest_path(5))
        commit_rank0(new[0], backend, 5)  # its "ready" token was still there
        with pytest.raises(ckpt.FencedError):
            old[1].wait_outcome(5)
        new[1].wait_outcome(5)  # its "committed" token was still there (no storage fallback)
        with pytest.raises(ckpt.FencedError):
            old[0].mark_committed(6)
        assert read_manifest(backend, 5).generation == new[0].generation
        assert new[0].step_index.committed_steps(backend) == [5]
    finally:
        close_all([*old, *new, zombie])


def test_two_jobs_share_one_redis(
    redis_server: RedisServer,
    backend: StorageBackend,
    other_backend: StorageBackend,
    tmp_path: Path,
) -> None:
    """Jobs ``a`` and ``b`` use the same step numbers on one server: b's restart does not
    fence a, b's abort does not touch a's step, each index lists its own steps, and every
    key lives under its job's prefix. Managers given a redis:// URL get a job per root."""
    a = rank_coordinators(redis_spec(redis_server, "a"), 2)
    b = rank_coordinators(redis_spec(redis_server, "b"), 2)
    try:
        report(a[1], backend, 1)
        report(b[1], other_backend, 1)
        b_restarted = rank_coordinators(redis_spec(redis_server, "b"), 2)
        close_all(b)
        b = b_restarted
        b[0].abort(1, "test: job b gives up on step 1")
        commit_rank0(a[0], backend, 1)  # job a is neither fenced nor aborted
        a[1].wait_outcome(1, backend)
        report(b[1], other_backend, 2)
        commit_rank0(b[0], other_backend, 2)
        b[1].wait_outcome(2, other_backend)
        assert a[0].step_index.committed_steps(backend) == [1]
        assert b[0].step_index.committed_steps(other_backend) == [2]
        keys = (
            describe_state(redis_server.client(), "a").keys()
            | describe_state(redis_server.client(), "b").keys()
        )
        assert {k.decode() for k in redis_server.client().keys("*")} == keys
    finally:
        close_all(a + b)
    url = redis_server.url()
    for root, step in ((tmp_path / "ckpts", 3), (tmp_path / "ckpts-other", 4)):
        with ckpt.CheckpointManager(
            root, coordinator=url, save_on_sigterm=False, manual=True
        ) as mgr:
            assert mgr.coordinator.job == job_from_url(mgr.backend.url)  # type: ignore[attr-defined]
            mgr.save(step, {"x": torch.full((2,), float(step))}, blocking=True)
    assert job_from_url(LocalBackend(tmp_path / "ckpts").url) != job_from_url(
        LocalBackend(tmp_path / "ckpts-other").url
    )
    for root, steps in ((tmp_path / "ckpts", [3, 1]), (tmp_path / "ckpts-other", [4, 2])):
        with ckpt.CheckpointManager(
            root, coordinator=url, save_on_sigterm=False, manual=True
        ) as mgr:
            assert mgr.coordinator.step_index.committed_steps(mgr.backend) == steps  # type: ignore[union-attr]


def test_redis_py_is_imported_only_when_a_redis_coordinator_is_used() -> None:
    """``import ckpt`` and ``import ckpt.coordination`` leave redis-py unloaded; resolving
    ``RedisCoordinator`` loads it."""
    code = (
        "import sys, ckpt, ckpt.coordination as c; loaded = 'redis' in sys.modules; "
        "c.RedisCoordinator; print(loaded, 'redis' in sys.modules)"
    )
    root = str(Path(__file__).resolve().parents[2])  # this checkout's ckpt, not an installed one
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.split() == ["False", "True"]


def test_save_functions_take_a_redis_url(
    redis_server: RedisServer, backend: StorageBackend
) -> None:
    """``ckpt.save`` and ``ckpt.async_save`` given ``coordinator="redis://..."`` commit through
    a RedisCoordinator of the root's job (its index in Redis lists both steps) and close it
    once the save has ended (no heartbeat thread is left)."""
    url = redis_server.url()
    ckpt.save({"x": torch.ones(2)}, backend, step=1, coordinator=url)
    pending = ckpt.async_save({"x": torch.full((2,), 2.0)}, backend, step=2, coordinator=url)
    pending.result(timeout=THREAD_WAIT_S)
    committed = redis_server.client().zrange(job_key(job_from_url(backend.url), "committed"), 0, -1)
    assert committed == [b"1", b"2"]
    assert_loads_x(backend, 2.0)
    deadline = time.monotonic() + THREAD_WAIT_S
    while any(t.name == "ckpt-heartbeat" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "a coordinator made from the URL was not closed"
        time.sleep(0.01)


def assert_loads_x(backend: StorageBackend, value: float) -> None:
    state = {"x": torch.zeros(2)}
    ckpt.load(state, backend)
    assert torch.equal(state["x"], torch.full((2,), value))


class _NoListing(LocalBackend):
    """A backend that refuses to list: an answer that needs a storage scan fails."""

    def list_prefixes(self, prefix: str = "") -> list[str]:
        raise AssertionError("the index was read from storage, not from Redis")


def test_committed_index_survives_restarts_and_is_rebuilt(
    redis_aof_server: RedisServer, job: str, backend: StorageBackend, root: Path
) -> None:
    """The committed index survives a job restart and a Redis restart with AOF (read from
    Redis, no storage scan); after FLUSHALL or a restart without persistence it is rebuilt
    from storage, including when a new step was committed before anyone asked (I5)."""
    spec = redis_spec(redis_aof_server, job)
    first = spec.redis()
    try:
        for step in (1, 2):
            assert save_outcome(first, backend, step, 0, 1) == "committed"
        assert first.step_index.committed_steps(backend) == [2, 1]
    finally:
        first.close()

    def index(b: StorageBackend) -> list[int]:
        restarted = spec.redis()  # every read is from a new incarnation of the job
        try:
            return list(restarted.step_index.committed_steps(b))
        finally:
            restarted.close()

    assert index(_NoListing(root)) == [2, 1]
    redis_aof_server.restart(appendonly=True)
    assert index(_NoListing(root)) == [2, 1]
    redis_aof_server.client().flushall()
    assert index(backend) == [2, 1]
    assert index(_NoListing(root)) == [2, 1]
    redis_aof_server.restart(appendonly=False)  # comes back empty
    again = spec.redis()
    try:
        assert save_outcome(again, backend, 3, 0, 1) == "committed"  # only step 3 is in Redis now
        assert again.step_index.committed_steps(backend) == [3, 2, 1]
    finally:
        again.close()
    assert index(_NoListing(root)) == [3, 2, 1]


def test_lost_heartbeat_aborts_the_step(
    redis_server: RedisServer, job: str, backend: StorageBackend
) -> None:
    """3 ranks, a long timeout: rank 1 stops heartbeating before it reports. The committer
    aborts the step because of the lost heartbeat (not the timeout) and the waiting rank
    2 gets the abort too; no manifest appears."""
    spec = redis_spec(redis_server, job, timeout=60.0, heartbeat_interval=0.1, heartbeat_ttl=1.5)
    ranks = rank_coordinators(spec, 3)
    try:
        report(ranks[2], backend, 1)
        ranks[1].close()  # its heartbeat thread stops: the process is "gone"
        with ThreadPoolExecutor(1) as pool:
            waiter = pool.submit(ranks[2].wait_outcome, 1, backend)
            with pytest.raises(ckpt.CoordinationError, match=r"ranks \[1\] stopped heartbeating"):
                commit_rank0(ranks[0], backend, 1)
            with pytest.raises(ckpt.CoordinationError, match="aborted"):
                waiter.result(THREAD_WAIT_S)
        assert not backend.exists(manifest_path(1))
    finally:
        close_all(ranks)


def test_timeout_aborts_and_a_late_report_is_refused(
    redis_server: RedisServer, job: str, backend: StorageBackend
) -> None:
    """A rank that keeps heartbeating but never reports: the committer aborts the step
    at its timeout; the straggler's late report is refused; no manifest appears."""
    spec = redis_spec(redis_server, job, timeout=1.5)
    ranks = rank_coordinators(spec, 2)
    try:
        with pytest.raises(ckpt.CoordinationError, match="waited"):
            commit_rank0(ranks[0], backend, 1)
        with pytest.raises(ckpt.CoordinationError, match="aborted"):
            report(ranks[1], backend, 1)
        assert not backend.exists(manifest_path(1))
    finally:
        close_all(ranks)


def test_committer_dead_after_the_manifest_still_commits(
    redis_server: RedisServer, job: str, backend: StorageBackend
) -> None:
    """The committer publishes the manifest and dies before telling Redis: the waiting
    rank sees the manifest in storage and treats the step as committed (storage is the
    truth), and the index rebuilt from storage lists it."""
    spec = redis_spec(redis_server, job, heartbeat_ttl=30.0)
    ranks = rank_coordinators(spec, 2)
    try:
        report(ranks[1], backend, 1)
        builder = ranks[0].collect(1, CHUNK)
        builder.add(shard_index(backend, 1, 0, ranks[0].generation))
        publish(
            backend, builder.build(generation=ranks[0].generation, world_size=2, chunk_bytes=CHUNK)
        )
        ranks[0].close()  # ... and no mark_committed
        ranks[1].wait_outcome(1, backend)  # returns: committed in storage
        assert ranks[1].step_index.committed_steps(backend) == [1]
    finally:
        close_all(ranks)


def test_redis_gone_for_good_gives_a_clear_error(
    redis_server: RedisServer, job: str, backend: StorageBackend
) -> None:
    """Redis dies and does not come back: a rank's report fails with a CoordinationError
    naming the step after its retry budget, and nothing is committed."""
    spec = redis_spec(redis_server, job, retry_seconds=1.0)
    ranks = rank_coordinators(spec, 2)
    try:
        redis_server.kill()
        with pytest.raises(ckpt.CoordinationError, match="reporting step 1"):
            report(ranks[1], backend, 1)
        assert not backend.exists(manifest_path(1))
    finally:
        close_all(ranks)


def test_auth_with_requirepass(
    redis_password_server: RedisServer, job: str, backend: StorageBackend
) -> None:
    """``redis://:password@host:port/0`` (a password with URL-special characters) works; a
    wrong or missing password is a CoordinationError that says authentication failed."""
    good = redis_password_server.url()
    coordinator = CoordSpec("redis", url=good, job=job).redis()
    try:
        assert save_outcome(coordinator, backend, 1, 0, 1) == "committed"
    finally:
        coordinator.close()
    for bad in (
        redis_password_server.url(password="wrong"),
        redis_password_server.url(password=""),
    ):
        with pytest.raises(ckpt.CoordinationError, match="authentication failed"):
            CoordSpec("redis", url=bad, job=job).redis()


def test_tls_rediss(redis_tls_server: RedisServer, backend: StorageBackend, tmp_path: Path) -> None:
    """``rediss://`` with the CA given in the URL (``ssl_ca_certs``) commits, also through
    CheckpointManager with ``job=`` in the same URL; an untrusted certificate is a
    CoordinationError."""
    assert redis_tls_server.tls is not None
    ca = redis_tls_server.tls["ca"]
    url = f"{redis_tls_server.url()}?ssl_ca_certs={ca}&job=tls-job"
    with ckpt.CheckpointManager(
        backend, coordinator=url, save_on_sigterm=False, manual=True
    ) as mgr:
        assert mgr.coordinator.job == "tls-job"  # type: ignore[attr-defined]
        mgr.save(1, {"x": torch.ones(2)}, blocking=True)
        assert mgr.coordinator.step_index.committed_steps(backend) == [1]  # type: ignore[union-attr]
    with pytest.raises(ckpt.CoordinationError, match="certificate"):
        CoordSpec("redis", url=redis_tls_server.url(), job="tls-job").redis()


# -- Redis killed and restarted in the middle of a step (real ranks) ------------------------


def redis_restarts(
    rank: int, world: int, spec: CoordSpec, root: str, signals: str
) -> dict[str, Any]:
    """Steps 1-4. At steps 2 and 3 every non-committer reports, then the committer stops
    before collecting until the test has restarted Redis (with AOF before step 2's
    collect, without persistence before step 3's)."""
    coordinator: Any = spec.make()
    paused = (2, 3)
    if rank == 0:
        collect = coordinator.collect

        def paused_collect(step: int, chunk_bytes: int) -> Any:
            if step in paused:
                send(signals, f"collecting-{step}")
                wait_signals(signals, [f"restarted-{step}"])
            return collect(step, chunk_bytes)

        coordinator.collect = paused_collect
    else:
        report_step = coordinator.report

        def signalled_report(step: int, index_json: bytes) -> int:
            n = int(report_step(step, index_json))
            send(signals, f"reported-{step}-{rank}")
            return n

        coordinator.report = signalled_report
    backend = LocalBackend(root)
    steps = {step: save_outcome(coordinator, backend, step, rank, world) for step in (1, 2, 3, 4)}
    coordinator.close()
    return {"generation": coordinator.generation, "steps": steps}


def test_redis_killed_and_restarted_mid_step(
    redis_aof_server: RedisServer, job: str, backend: StorageBackend, root: Path, tmp_path: Path
) -> None:
    """2 gloo ranks; Redis is SIGKILLed while a step is in flight (all reports in, the
    commit not yet made). Restarted with AOF, the protocol continues and the step
    commits. Restarted without persistence, the step aborts cleanly on both ranks, the
    next step commits again, and the index lists every committed step, rebuilt from
    storage. Nothing hangs."""
    spec = redis_spec(redis_aof_server, job, heartbeat_ttl=5.0, timeout=20.0)
    signals = tmp_path / "signals"
    signals.mkdir()
    with Ranks(redis_restarts, 2, spec, str(root), str(signals)) as ranks:
        for step, aof in ((2, True), (3, False)):
            wait_signals(signals, [f"collecting-{step}", f"reported-{step}-1"], ranks=ranks)
            redis_aof_server.restart(appendonly=aof)
            send(signals, f"restarted-{step}")
        outcomes = ranks.join()
    for outcome in outcomes:
        steps = steps_of(outcome)
        assert steps["1"] == "committed", describe(outcomes)
        assert steps["2"] == "committed", describe(outcomes)
        # The committer may have claimed step 3 before the restart: then it commits (storage
        # decides, every rank agrees); else it is aborted on every rank.
        assert (steps["3"] == "committed") == (steps_of(outcomes[0])["3"] == "committed")
        assert steps["3"] == "committed" or steps["3"].startswith("CoordinationError"), describe(
            outcomes
        )
        assert steps["4"] == "committed", describe(outcomes)
    step3 = steps_of(outcomes[0])["3"]
    assert step3 == "committed" or "lost its state" in step3
    committed = (1, 2, 3, 4) if step3 == "committed" else (1, 2, 4)
    assert scan_steps(backend).committed == committed
    assert_loads_as(backend, 2, 4)
    restarted = spec.redis()
    try:
        assert restarted.step_index.committed_steps(backend) == sorted(committed, reverse=True)
    finally:
        restarted.close()
