"""Redis failing under the coordinator: bad URLs and credentials, Redis dying after the
commit point (storage is the truth, I5), and a campaign that SIGKILLs redis-server at
each step of a save's protocol, for 1 and 2 ranks, with and without persistence.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import torch

import ckpt
from ckpt.coordination import RedisCoordinator, job_from_url
from ckpt.format import manifest_path, scan_steps
from storage_backends import LocalBackend, StorageBackend
from tests.coordination.harness import (
    CoordSpec,
    Ranks,
    assert_loads_as,
    describe,
    make_state,
    send,
    wait_signals,
)
from tests.coordination.redis_helpers import KillSwitch, LoggingRedis
from tests.coordination.test_redis import (
    close_all,
    commit_rank0,
    rank_coordinators,
    redis_spec,
    report,
)
from tests.support.campaign import CampaignTable
from tests.support.redis_server import RedisServer, redis_server_binary

# Passwords that once put jobs in the wrong namespace, or that URLs mangle.
PASSWORDS = ["pw-job=evil", "a&job=evil&x=1", "50%off&job=%41", "s3cret:/@pw?#job=x"]


@pytest.fixture
def tricky_server(tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed")
    with RedisServer(tmp_path / "redis-pw", password=request.param) as server:
        yield server


# -- URLs and credentials (defect 10) -------------------------------------------------------


@pytest.mark.parametrize("tricky_server", PASSWORDS, indirect=True)
def test_a_password_never_names_the_job(
    tricky_server: RedisServer, backend: StorageBackend, tmp_path: Path
) -> None:
    """A password with ``job=``, ``&``, ``%`` (percent-encoded, as any URL password must
    be) authenticates and leaves the namespace alone: without ``?job=`` a manager's job is
    derived from its root (two roots, two jobs), with ``?job=`` it is that name."""
    url = tricky_server.url()
    coordinator = RedisCoordinator(f"{url}?job=named", retry_seconds=1.0)
    try:
        assert coordinator.job == "named"
    finally:
        coordinator.close()
    jobs = []
    for root in (tmp_path / "a", tmp_path / "b"):
        with ckpt.CheckpointManager(
            root, coordinator=url, save_on_sigterm=False, manual=True
        ) as mgr:
            jobs.append(mgr.coordinator.job)  # type: ignore[attr-defined]
            assert mgr.coordinator.job == job_from_url(mgr.backend.url)  # type: ignore[attr-defined]
            mgr.save(1, {"x": torch.ones(2)}, blocking=True)
    assert len(set(jobs)) == 2


def test_an_unencoded_password_with_ampersand_and_job(tmp_path: Path) -> None:
    """``redis://:a&job=evil@host`` written raw: ``job=`` in the password is not the job."""
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed")
    with RedisServer(tmp_path / "redis-raw", password="a&job=evil") as server:
        raw = f"redis://:a&job=evil@127.0.0.1:{server.port}/0"
        coordinator = RedisCoordinator(raw, job="mine", retry_seconds=1.0)
        try:
            assert coordinator.job == "mine"
        finally:
            coordinator.close()
        with ckpt.CheckpointManager(
            tmp_path / "r", coordinator=raw, save_on_sigterm=False, manual=True
        ) as m:
            assert m.coordinator.job == job_from_url(m.backend.url)  # type: ignore[attr-defined]


@pytest.mark.parametrize("tricky_server", ["s3cret&job=x%zz"], indirect=True)
def test_credential_and_reachability_errors_are_coordination_errors(
    tricky_server: RedisServer, job: str
) -> None:
    """A wrong password, an unencoded ``#``, a bad job name, a dead server (for the rank
    that takes the generation and for one that only heartbeats) and an error reply: each
    is one CoordinationError line naming the server and the fix, never the password."""
    secret = "s3cret&job=x%zz"
    where = f"127.0.0.1:{tricky_server.port}"
    cases: list[tuple[str, dict[str, Any], str]] = [
        (tricky_server.url(password="wrong-" + secret), {}, "authentication failed"),
        (tricky_server.url(password=""), {}, "authentication failed"),
        (f"redis://:{secret}#frag@{where}/0", {}, "percent-encode"),
        (tricky_server.url(), {"job": "a:b"}, "job name"),
    ]
    for url, kw, expected in cases:
        with pytest.raises(ckpt.CoordinationError, match=expected) as err:
            RedisCoordinator(url, retry_seconds=0.5, **{"job": job, **kw})
        assert secret not in str(err.value) and quote(secret, safe="") not in str(err.value)
    tricky_server.kill()
    dead_cases: list[dict[str, Any]] = [{}, {"rank": 1, "world_size": 2, "generation": "g"}]
    for kw in dead_cases:
        with pytest.raises(ckpt.CoordinationError, match="unreachable") as err:
            RedisCoordinator(tricky_server.url(), job=job, retry_seconds=0.5, **kw)
        assert where in str(err.value) and "redis-server is running" in str(err.value)
        assert secret not in str(err.value) and quote(secret, safe="") not in str(err.value)
    tricky_server.start()

    class Refusing(LoggingRedis):
        def before_send(self, name: str) -> None:
            if name == "EVALSHA:CLAIM":
                raise ckpt_redis_error("OOM command not allowed when used memory > 'maxmemory'")

    coordinator = RedisCoordinator(
        tricky_server.url(), job=job, client_factory=Refusing.from_url, retry_seconds=0.5
    )
    try:
        with pytest.raises(ckpt.CoordinationError, match=r"refused the call.*OOM.*maxmemory"):
            coordinator.claim(1)
    finally:
        coordinator.close()


def ckpt_redis_error(text: str) -> Exception:
    import redis

    return redis.ResponseError(text)


# -- Redis dies after the manifest is published (defect 9) ------------------------------------


def test_redis_killed_after_the_manifest_the_step_is_committed(
    redis_aof_server: RedisServer,
    job: str,
    backend: StorageBackend,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis is SIGKILLed just before the committer marks step 1 committed: the committer
    returns the manifest (a WARNING says the index is rebuilt from storage), the waiting
    rank finds the manifest in storage; after Redis restarts with AOF (which knows nothing
    of the commit) a new incarnation's index lists the step."""
    assert redis_aof_server.proc is not None
    switch = KillSwitch(redis_aof_server.proc.pid, "EVALSHA:COMMIT", "before")
    spec = redis_spec(redis_aof_server, job, retry_seconds=1.0)
    ranks = rank_coordinators(spec, 2, client_factory=switch)
    try:
        report(ranks[1], backend, 1)
        switch.arm()
        manifest = commit_rank0(ranks[0], backend, 1)
        assert switch.fired.is_set()
        assert manifest is not None and backend.exists(manifest_path(1))
        assert "will be rebuilt from storage" in caplog.text
        ranks[1].wait_outcome(1, backend)  # Redis is gone: storage answers
    finally:
        close_all(ranks)
    redis_aof_server.start(appendonly=True)
    again = spec.redis()
    try:
        assert again.step_index.committed_steps(backend) == [1]
    finally:
        again.close()


def test_redis_gone_while_waiting_and_no_manifest_is_a_clear_error(
    redis_server: RedisServer, job: str, backend: StorageBackend
) -> None:
    """A rank waits for the commit; Redis dies and the committer never publishes: the wait
    ends (bounded) in a CoordinationError that names the server and says what to do."""
    spec = redis_spec(redis_server, job, retry_seconds=0.5)
    ranks = rank_coordinators(spec, 2)
    try:
        report(ranks[1], backend, 1)
        redis_server.kill()
        with pytest.raises(ckpt.CoordinationError, match="cannot learn whether") as err:
            ranks[1].wait_outcome(1, backend)
        assert f"127.0.0.1:{redis_server.port}" in str(err.value)
        assert "redis-server is running" in str(err.value)
    finally:
        close_all(ranks)


def test_manager_keeps_going_when_redis_dies_at_the_commit(
    redis_aof_server: RedisServer, job: str, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A CheckpointManager (keep_last=1) whose Redis dies just before step 2 is marked
    committed: the save succeeds, retention runs (step 1 is deleted), and once Redis is
    back the same manager saves step 3 and the index is right (step 1 dropped late)."""
    assert redis_aof_server.proc is not None
    switch = KillSwitch(redis_aof_server.proc.pid, "EVALSHA:COMMIT", "before")
    coordinator = redis_spec(redis_aof_server, job, retry_seconds=1.0).redis(client_factory=switch)
    with ckpt.CheckpointManager(
        root, coordinator=coordinator, keep_last=1, save_on_sigterm=False, manual=True
    ) as mgr:
        mgr.save(1, make_state(1, 0, 1), blocking=True)
        switch.arm()
        mgr.save(2, make_state(2, 0, 1), blocking=True)
        assert switch.fired.is_set()
        assert scan_steps(mgr.backend).committed == (2,)
        assert mgr.metrics.saves_committed == 2
        redis_aof_server.start(appendonly=True)
        mgr.save(3, make_state(3, 0, 1), blocking=True)
        assert coordinator.step_index.committed_steps(mgr.backend) == [3]
    assert_loads_as(LocalBackend(root), 1, 3)


# -- campaign: Redis SIGKILLed at each protocol step of a save ----------------------------------

# (command, the rank that sends it). "before": killed just before it is sent; "after": just
# after its reply. XREAD is the committer's reading of reports from ``begin``; BLPOP is a
# waiting rank's wait for the outcome; ZREM is retention's index update after the commit.
STEPS_2 = [
    ("XREAD", 0),
    ("EVALSHA:REPORT", 1),
    ("EVALSHA:CLAIM", 0),
    ("EVALSHA:COMMIT", 0),
    ("BLPOP", 1),
    ("EVALSHA:BEAT", 1),
    ("ZREM", 0),
]
STEPS_1 = [("EVALSHA:CLAIM", 0), ("EVALSHA:COMMIT", 0), ("EVALSHA:BEAT", 0), ("ZREM", 0)]
CAMPAIGN = [
    (world, command, sender, when, aof)
    for aof in (True, False)
    for world, steps in ((1, STEPS_1), (2, STEPS_2))
    for command, sender in steps
    for when in ("before", "after")
]
CAMPAIGN_REDUCED = [
    (2, "EVALSHA:COMMIT", 0, "before", True),
    (1, "EVALSHA:CLAIM", 0, "after", False),
]
# Whether step 2 commits, where the kill decides it (None: either way).
EXPECTED = {
    ("XREAD", "before"): False,
    ("XREAD", "after"): False,
    ("EVALSHA:REPORT", "before"): False,
    ("EVALSHA:REPORT", "after"): False,
    ("EVALSHA:CLAIM", "before"): False,
    ("EVALSHA:CLAIM", "after"): True,
    ("EVALSHA:COMMIT", "before"): True,
    ("EVALSHA:COMMIT", "after"): True,
    ("ZREM", "before"): True,
    ("ZREM", "after"): True,
}


# Redis killed between a successful COMMIT and retention's index update (ZREM): the
# documented residual of the index (restore reads storage, not the index).
RESIDUAL = {("EVALSHA:COMMIT", "after"), ("ZREM", "before")}
# Kills whose moment depends on timing (a waiting rank's pop, a heartbeat): when step 2
# committed, they may land in that window too.
TIMING_DEPENDENT = {"BLPOP", "EVALSHA:BEAT"}


def killed_at_step(
    rank: int,
    world: int,
    spec: CoordSpec,
    root: str,
    signals: str,
    case: tuple[int, str, int, str, int],
) -> dict[str, Any]:
    """Step 1 commits; during step 2 redis-server is SIGKILLed at the chosen protocol step;
    after the test restarted Redis, a new incarnation saves step 3 and reads the index."""
    _, command, sender, when, pid = case
    switch = KillSwitch(pid, command, when)
    backend = LocalBackend(root)

    def save(mgr: ckpt.CheckpointManager, step: int) -> str:
        try:
            mgr.save(step, make_state(step, rank, world), blocking=True)
        except ckpt.CheckpointError as exc:  # anything else escapes and fails the rank
            return f"{type(exc).__name__}: {exc}"
        return "committed"

    mgr = ckpt.CheckpointManager(
        backend,
        coordinator=spec.redis(client_factory=switch),
        keep_last=1,
        save_on_sigterm=False,
        manual=True,
    )
    steps = {1: save(mgr, 1)}
    if rank == sender:
        switch.arm()
    steps[2] = save(mgr, 2)
    switch.armed = False
    send(signals, f"saved-{rank}")
    wait_signals(signals, ["restarted"])
    mgr.close()
    incarnation = spec.redis()
    with ckpt.CheckpointManager(
        backend, coordinator=incarnation, keep_last=1, save_on_sigterm=False, manual=True
    ) as again:
        steps[3] = save(again, 3)
        index = incarnation.step_index.committed_steps(backend) if rank == 0 else None
    return {"steps": steps, "fired": switch.fired.is_set(), "index": index}


@pytest.mark.campaign
def test_redis_killed_at_each_protocol_step(
    tmp_path: Path, full: bool, campaign_table: CampaignTable
) -> None:
    """For 1 and 2 ranks, with and without AOF, redis-server is SIGKILLed at each step of a
    save (two cases by default, all with --full). Every rank returns within its deadline
    with "committed" or a CheckpointError; step 2 is committed exactly when its manifest
    exists, and then it loads bit for bit (else step 1 does); no rank calls a step that is
    not in storage committed; after Redis restarts, a new incarnation commits step 3 and
    its index equals storage's listing."""
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed")
    rows: list[tuple[str, ...]] = []
    for i, (world, command, sender, when, aof) in enumerate(CAMPAIGN if full else CAMPAIGN_REDUCED):
        name = f"world {world}, {when} {command} (rank {sender}), {'AOF' if aof else 'no AOF'}"
        started = time.monotonic()
        with RedisServer(tmp_path / f"redis-{i}", appendonly=aof) as server:
            assert server.proc is not None
            root = tmp_path / f"case-{i}"
            root.mkdir()
            signals = tmp_path / f"signals-{i}"
            signals.mkdir()
            spec = redis_spec(server, f"campaign-{i}", retry_seconds=1.0, timeout=10.0)
            case = (world, command, sender, when, server.proc.pid)
            with Ranks(killed_at_step, world, spec, str(root), str(signals), case) as ranks:
                wait_signals(signals, [f"saved-{r}" for r in range(world)], ranks=ranks)
                backend = LocalBackend(root)
                committed = backend.exists(manifest_path(2))
                try:  # step 2 committed loads bit for bit; else step 1 is still the newest
                    assert_loads_as(backend, world, 2 if committed else 1)
                except AssertionError as exc:
                    raise AssertionError(f"{name}: {exc}") from exc
                server.kill()  # when the step never came (a heartbeat), kill now
                server.start(appendonly=aof)
                send(signals, "restarted")
                outcomes = ranks.join()
            try:
                rows.append((name, *_check_case(outcomes, backend, committed, command, when)))
            except AssertionError as exc:
                raise AssertionError(f"{name}: {exc}\n{describe(outcomes)}") from exc
        rows[-1] = (*rows[-1], f"{time.monotonic() - started:.1f}")
    _print_table(rows)
    campaign_table.record(
        "Redis SIGKILLed at each protocol step (1-2 ranks, AOF on/off)",
        trials=len(rows),
        killed=sum(r[1] == "yes" for r in rows),
        new_committed=sum(r[2] == "committed" for r in rows),
        torn=0,  # every case checks it (manifest <=> committed, bit-exact loads)
        escapes=0,
        hangs=0,
        stale_index=sum(r[4] != "-" for r in rows),
    )


def _check_case(
    outcomes: list[Any], backend: StorageBackend, committed: bool, command: str, when: str
) -> tuple[str, str, str, str]:
    for o in outcomes:
        assert o.ok, f"rank {o.rank}: {o.error} (exit {o.exitcode})"
    results = [{int(k): v for k, v in o.value["steps"].items()} for o in outcomes]
    for r in results:
        assert r[1] == "committed" and r[3] == "committed", r
        assert r[2] == "committed" or r[2].split(":")[0].endswith("Error"), r[2]
    expected = EXPECTED.get((command, when))
    if expected is not None:
        assert committed == expected, f"step 2 committed: {committed}, expected {expected}"
    if not committed:
        assert all(r[2] != "committed" for r in results), "a rank called step 2 committed"
    else:
        assert results[0][2] == "committed", "the committer failed a published step"
    # Step 3 is the newest and loads bit for bit; retention (keep_last=1) left only it.
    assert scan_steps(backend).committed == (3,)
    assert_loads_as(backend, len(outcomes), 3)
    index = outcomes[0].value["index"]
    stale = sorted(set(index) - {3})
    fired = any(o.value["fired"] for o in outcomes)
    timing = command in TIMING_DEPENDENT and committed  # the kill may land after COMMIT
    if ((command, when) in RESIDUAL or timing) and fired:
        # Redis died as retention deleted step 1: the index is told before the delete but
        # could not hear it, and this process ended before its next index call, so with
        # AOF the index keeps listing it (restore reads storage, not this index). Shown
        # in the table as "stale index".
        assert set(stale) <= {1}, index
    else:
        assert index == [3], index
    ranks = ", ".join(r[2].split(":")[0] for r in results)
    return (
        "yes" if fired else "no",
        "committed" if committed else "not committed",
        ranks,
        str(stale or "-"),
    )


def _print_table(rows: list[tuple[str, ...]]) -> None:
    header = ("case", "killed", "step 2", "ranks say", "stale index", "s")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in [header, *rows]]
    logging.getLogger(__name__).info("Redis killed at each protocol step:\n%s", "\n".join(lines))
    print("\n" + "\n".join(lines))


def test_a_hung_server_ends_in_a_coordination_error_not_a_hang(tmp_path: Path) -> None:
    """redis-server stopped (SIGSTOP: the connection stays open, nothing answers) during a
    save: every call ends at the client's socket timeout (shortened here from its 60 s
    default through the documented ``client_factory``) and the save fails with a
    CoordinationError naming the server; it does not wait forever."""
    import os
    import signal

    import redis

    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed")

    def short_timeouts(url: str, **options: Any) -> Any:
        return redis.Redis.from_url(url, **{**options, "socket_timeout": 1.0})

    with RedisServer(tmp_path / "redis-hung") as server:
        coordinator = RedisCoordinator(
            f"{server.url()}?job=hung", retry_seconds=2.0, client_factory=short_timeouts
        )
        try:
            assert server.proc is not None
            os.kill(server.proc.pid, signal.SIGSTOP)
            try:
                with pytest.raises(ckpt.CoordinationError, match=r"127\.0\.0\.1"):
                    ckpt.save(
                        {"x": torch.ones(2)}, tmp_path / "root", step=1, coordinator=coordinator
                    )
            finally:
                os.kill(server.proc.pid, signal.SIGCONT)
        finally:
            coordinator.close()
