"""Redis as operators run it: Sentinel URLs and failover, and Cluster hash tags.

Against real processes: a master, a replica and ``redis-server --sentinel`` on free
ports (``tests.support.redis_server.SentinelGroup``, failing over in about a second and a
half), SIGKILLed while ranks report. What must hold: no step is ever committed
inconsistently (the manifest exists exactly when every rank says committed, and loads bit
for bit), a step whose Redis state the failover lost fails cleanly or is re-driven, and
the next step commits through the new master.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt
from ckpt.coordination import RedisCoordinator, redis_client
from ckpt.format import manifest_path, read_manifest
from storage_backends import LocalBackend, StorageBackend
from tests.coordination.harness import CoordSpec, describe, spawn_ranks
from tests.coordination.redis_helpers import KillSwitch, job_key
from tests.coordination.test_redis import close_all, commit_rank0, rank_coordinators, report
from tests.support.ports import free_port
from tests.support.redis_server import (
    ClusterGroup,
    RedisServer,
    SentinelGroup,
    make_tls_files,
    redis_server_binary,
    tls_supported,
)

log = logging.getLogger(__name__)

# A thread standing in for a rank must end within this (a hang fails the test).
THREAD_WAIT_S = 60.0


@pytest.fixture
def sentinel_group(tmp_path: Path) -> Iterator[SentinelGroup]:
    """A master, one replica and one sentinel (quorum 1, down after 500 ms)."""
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed")
    with SentinelGroup(tmp_path / "sentinel") as group:
        yield group


def sentinel_spec(group: SentinelGroup, job: str, **kw: Any) -> CoordSpec:
    """Retries that outlast a failover (about 1.5 s here), short step timeouts."""
    return CoordSpec(
        "redis",
        url=group.url(),
        job=job,
        **{"timeout": 10.0, "heartbeat_ttl": 4.0, "retry_seconds": 15.0, **kw},
    )


# -- URLs ---------------------------------------------------------------------------------


def test_sentinel_urls_name_the_sentinels_the_service_and_the_db() -> None:
    """``redis+sentinel://`` lists sentinels (port 26379 by default), the service and db;
    user, password and options are the master's; a bad one is a CoordinationError that
    shows no password; an unreachable one names the sentinels and the service."""
    client = redis_client("redis+sentinel://:p%40ss@h1:5000,h2,[::1]:7/main/2?client_name=c")
    pool = client.connection_pool
    sentinels = [s.connection_pool.connection_kwargs for s in pool.sentinel_manager.sentinels]
    assert [(s["host"], s["port"]) for s in sentinels] == [("h1", 5000), ("h2", 26379), ("::1", 7)]
    assert pool.service_name == "main"
    assert {k: pool.connection_kwargs[k] for k in ("db", "password", "client_name")} == {
        "db": 2,
        "password": "p@ss",
        "client_name": "c",
    }
    client.close()
    tls = redis_client("rediss+sentinel://h/main?ssl_cert_reqs=none").connection_pool
    assert tls.connection_class.__name__ == "SentinelManagedSSLConnection"
    assert tls.sentinel_manager.sentinels[0].connection_pool.connection_kwargs["ssl_cert_reqs"]
    for bad in (
        "redis+sentinel://h:26379/",
        "redis+sentinel:///main",
        "redis+sentinel://h:port/main",
        "redis+sentinel://h/main/db",
        "redis+sentinel://:pw#x@h/main",
        "redis+sentinel://h/main?job=a:b",
    ):
        with pytest.raises(ckpt.CoordinationError) as err:
            RedisCoordinator(bad, job="j")
        assert "pw#x" not in str(err.value)
    ports = (free_port(), free_port())
    hosts = ",".join(f"127.0.0.1:{p}" for p in ports)
    with pytest.raises(ckpt.CoordinationError, match="unreachable") as err:
        RedisCoordinator(f"redis+sentinel://:s3cret@{hosts}/main/2", job="j", retry_seconds=0.5)
    assert f"redis+sentinel://{hosts}/main/2" in str(err.value) and "s3cret" not in str(err.value)


# -- Sentinel: a save through the master, and failover ---------------------------------------


def test_a_save_through_sentinel_and_after_a_failover(
    sentinel_group: SentinelGroup, job: str, root: Path
) -> None:
    """A manager with a ``redis+sentinel://`` URL saves step 1 through the master; the
    master is SIGKILLed and the same manager saves step 2 through the promoted replica
    (its calls retry through the failover); the index lists both."""
    url = sentinel_group.url(query=f"job={job}")
    with ckpt.CheckpointManager(root, coordinator=url, save_on_sigterm=False, manual=True) as mgr:
        mgr.save(1, {"x": torch.ones(2)}, blocking=True)
        first = sentinel_group.master()
        first_client = first.client()
        first_client.wait(1, 5000)  # step 1 is on the replica: this failover loses nothing
        first_client.close()
        sentinel_group.kill_master()
        mgr.save(2, {"x": torch.full((2,), 2.0)}, blocking=True)
        assert sentinel_group.master().port != first.port
        coordinator: Any = mgr.coordinator
        assert coordinator.step_index.committed_steps(mgr.backend) == [2, 1]
    state = {"x": torch.zeros(2)}
    assert ckpt.load(state, root) == 2 and torch.equal(state["x"], torch.full((2,), 2.0))


def _run(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """``fn`` in a thread; its result or exception lands in the returned list."""
    out: list[Any] = []

    def body() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # handed to the test
            out.append(exc)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, out


def _save_step(ranks: list[Any], backend: StorageBackend, step: int) -> list[Any]:
    """Rank 1 reports ``step`` and waits for its outcome while rank 0 commits it; what each
    returned or raised."""

    def waiter_rank() -> None:
        report(ranks[1], backend, step)
        ranks[1].wait_outcome(step, backend)

    waiter, waited = _run(waiter_rank)
    committer, committed = _run(lambda: commit_rank0(ranks[0], backend, step))
    for thread in (waiter, committer):
        thread.join(THREAD_WAIT_S)
        assert not thread.is_alive(), f"a rank hangs at step {step}"
    return [committed[0], waited[0]]


@pytest.mark.parametrize("when", ["before", "after"])
def test_master_killed_while_ranks_report(
    sentinel_group: SentinelGroup, job: str, backend: StorageBackend, when: str
) -> None:
    """Step 1 commits; the master is SIGKILLed just before (or just after) rank 1's report
    of step 2. Step 2 commits on both ranks (its manifest exists and loads) or fails on
    both with a CheckpointError (no manifest): never one without the other. Then step 3
    commits through the promoted replica on both ranks."""
    master = sentinel_group.master()
    assert master.proc is not None
    switch = KillSwitch(master.proc.pid, "EVALSHA:REPORT", when)
    ranks = rank_coordinators(sentinel_spec(sentinel_group, job), 2, client_factory=switch)
    try:
        first = _save_step(ranks, backend, 1)
        assert first[1] is None and not isinstance(first[0], BaseException), first
        switch.arm()
        second = _save_step(ranks, backend, 2)
        assert switch.fired.is_set()
        sentinel_group.wait_failover(master.port)
        published = backend.exists(manifest_path(2))
        log.info("killed %s the report: step 2 %s; ranks: %s", when, published, second)
        failed = [isinstance(r, BaseException) for r in second]
        for r in second:
            assert not isinstance(r, BaseException) or isinstance(r, ckpt.CheckpointError), r
        if published:
            assert failed == [False, False], second
        else:
            assert failed == [True, True], second
        third = _save_step(ranks, backend, 3)
        assert not any(isinstance(r, BaseException) for r in third), third
    finally:
        close_all(ranks)
    for step in (2, 3):
        if backend.exists(manifest_path(step)):
            assert set(read_manifest(backend, step).tensors) == {"t0", "t1"}


def test_a_report_the_failover_lost_is_sent_again(
    redis_server: RedisServer, job: str, backend: StorageBackend
) -> None:
    """What a failover does to a report acknowledged by the old master and never
    replicated, on one real server: rank 1's report of step 1 is deleted and every client
    connection is cut (as the dying master cuts them). The committer reads the reports
    again, rank 1 reports again on its reconnection, and the step commits on both ranks
    instead of waiting out its timeout."""
    spec = CoordSpec("redis", url=redis_server.url(), job=job, timeout=8.0, heartbeat_ttl=4.0)
    ranks = rank_coordinators(spec, 2)
    admin = redis_server.client()
    try:
        report(ranks[1], backend, 1)
        admin.delete(
            *[
                job_key(job, "step", 1, part, f"{ranks[0].generation}.1")
                for part in ("ranks", "reports", "wake")
            ]
        )
        waiter, waited = _run(lambda: ranks[1].wait_outcome(1, backend))
        committer, committed = _run(lambda: commit_rank0(ranks[0], backend, 1))
        _wait_for_clients(admin, blocked=2)  # rank 1's BLPOP, the committer's read
        admin.client_kill_filter(_type="normal", skipme=True)
        for thread in (waiter, committer):
            thread.join(THREAD_WAIT_S)
        assert waited == [None] and not isinstance(committed[0], BaseException), (
            waited,
            committed,
        )
    finally:
        admin.close()
        close_all(ranks)
    assert backend.exists(manifest_path(1))


def _wait_for_clients(admin: Any, *, blocked: int) -> None:
    """Until ``blocked`` clients wait in a blocking command."""
    import time

    deadline = time.monotonic() + THREAD_WAIT_S
    while int(admin.info("clients")["blocked_clients"]) < blocked:
        assert time.monotonic() < deadline, "the ranks never blocked"
        time.sleep(0.02)


def test_failover_longer_than_the_retry_budget_is_one_clear_error(
    sentinel_group: SentinelGroup, job: str, tmp_path: Path
) -> None:
    """The master dies and no replica can take over (the replica is gone too): a save
    fails with one CoordinationError naming the Sentinel service, once the retry budget
    is spent."""
    coordinator = RedisCoordinator(sentinel_group.url(), job=job, retry_seconds=2.0)
    try:
        for server in sentinel_group.servers:
            server.kill()
        with pytest.raises(ckpt.CoordinationError) as err:
            ckpt.save({"x": torch.ones(2)}, tmp_path / "root", step=1, coordinator=coordinator)
        assert "unreachable" in str(err.value) and "redis+sentinel://127.0.0.1:" in str(err.value)
        assert "/mymaster/0" in str(err.value)
    finally:
        coordinator.close()


# -- Cluster hash tags ------------------------------------------------------------------------


def _save_two_ranks(rank: int, world: int, spec: CoordSpec, root: str) -> str:
    from tests.coordination.harness import save_outcome

    coordinator = spec.make()
    try:
        return save_outcome(coordinator, LocalBackend(root), 1, rank, world)
    finally:
        coordinator.close()


def assert_one_slot_per_job(redis_server: RedisServer, job: str, root: Path) -> None:
    """Another job reads its index; then every key in Redis carries ``ckpt:{<job>}:`` or
    the other job's tag, and each job's keys share one Cluster slot."""
    from redis.crc import key_slot

    spec = CoordSpec("redis", url=redis_server.url(), job=f"{job}-other")
    other = spec.redis()
    try:
        other.step_index.committed_steps(LocalBackend(root))
    finally:
        other.close()
    client = redis_server.client()
    try:
        keys = [k.decode() for k in client.scan_iter("*")]
    finally:
        client.close()
    mine = [k for k in keys if k.startswith(job_key(job))]
    theirs = [k for k in keys if k.startswith(job_key(f"{job}-other"))]
    assert len(mine) >= 4 and theirs and len(mine) + len(theirs) == len(keys), keys
    assert {key_slot(k.encode()) for k in mine} == {key_slot(f"{{{job}}}".encode())}
    assert {key_slot(k.encode()) for k in theirs} == {key_slot(f"{{{job}-other}}".encode())}


def test_every_key_of_a_job_shares_one_hash_slot(
    redis_server: RedisServer, job: str, backend: StorageBackend, root: Path
) -> None:
    """Two ranks (coordinators in this process) save two steps and one of them reads the
    index: every key carries the job's tag and hashes to its slot."""
    ranks = rank_coordinators(CoordSpec("redis", url=redis_server.url(), job=job), 2)
    try:
        for step in (1, 2):
            assert not any(isinstance(r, BaseException) for r in _save_step(ranks, backend, step))
        assert ranks[0].step_index.committed_steps(backend) == [2, 1]
    finally:
        close_all(ranks)
    assert_one_slot_per_job(redis_server, job, root)


@pytest.mark.slow
def test_every_key_of_a_gloo_job_shares_one_hash_slot(
    redis_server: RedisServer, job: str, root: Path
) -> None:
    """The same after a 2-rank save through gloo ranks and the save engine."""
    spec = CoordSpec("redis", url=redis_server.url(), job=job, timeout=10.0)
    outcomes = spawn_ranks(_save_two_ranks, 2, spec, str(root))
    assert [o.value for o in outcomes] == ["committed", "committed"], describe(outcomes)
    assert_one_slot_per_job(redis_server, job, root)


def test_tls_sentinel_url(tmp_path: Path, root: Path) -> None:
    """``rediss+sentinel://``: TLS to the sentinels and to the master (a throw-away CA);
    a save commits through it, and again after a failover."""
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed")
    if shutil.which("openssl") is None or not tls_supported():
        pytest.skip("no openssl, or this redis-server was built without TLS")
    files = make_tls_files(tmp_path / "tls")
    with SentinelGroup(tmp_path / "sentinel-tls", tls=files) as group:
        url = group.url(query="job=tls")
        assert url.startswith("rediss+sentinel://")
        coordinator = RedisCoordinator(url, retry_seconds=15.0)
        try:
            ckpt.save({"x": torch.ones(2)}, root, step=1, coordinator=coordinator)
            first = group.master()
            admin = first.client()
            admin.wait(1, 5000)
            admin.close()
            group.kill_master()
            ckpt.save({"x": torch.ones(2)}, root, step=2, coordinator=coordinator)
            assert group.master().port != first.port
        finally:
            coordinator.close()


def test_two_ranks_commit_on_a_redis_cluster(
    tmp_path: Path, job: str, backend: StorageBackend
) -> None:
    """A real 3-master Redis Cluster, reached through redis-py's ``RedisCluster`` (given as
    ``client_factory``): two ranks commit two steps (every script runs with keys of one
    slot) and the index reads back; every key sits in the job's slot."""
    from redis.cluster import RedisCluster
    from redis.crc import key_slot

    if redis_server_binary() is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server or redis-cli is not installed")

    def cluster_client(url: str, **options: Any) -> Any:
        return RedisCluster.from_url(url, **options)

    with ClusterGroup(tmp_path / "cluster") as cluster:
        spec = CoordSpec("redis", url=cluster.url(), job=job, timeout=10.0)
        ranks = rank_coordinators(spec, 2, client_factory=cluster_client)
        try:
            for step in (1, 2):
                outcome = _save_step(ranks, backend, step)
                assert not any(isinstance(r, BaseException) for r in outcome), outcome
            assert ranks[0].step_index.committed_steps(backend) == [2, 1]
        finally:
            close_all(ranks)
        keys: list[bytes] = []
        for server in cluster.servers:
            client = server.client()
            try:
                keys += list(client.scan_iter("*"))
            finally:
                client.close()
        assert keys and {key_slot(k) for k in keys} == {key_slot(f"{{{job}}}".encode())}
