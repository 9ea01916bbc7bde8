"""CheckpointManager: save policy, retention, busy handling, restore, RNG, SIGTERM, close.

Time-based policies run on a fake ``time.monotonic``; saves are held in flight with
``FaultyBackend``'s gate. Metrics are read after ``close()``, which joins the threads
whose done-callbacks update them.
"""

from __future__ import annotations

import math
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ckpt
from ckpt import CheckpointManager
from ckpt.format import StepListing, read_manifest, scan_steps, step_prefix
from ckpt.retention import RetentionPolicy, plan_gc
from storage_backends import LocalBackend
from tests.support.faulty import FaultyBackend
from tests.support.workers import REPO_ROOT


class FakeClock:
    """A ``time.monotonic`` that only moves when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(time, "monotonic", fake)
    return fake


def _state(value: float = 0.0) -> dict[str, Any]:
    return {"w": torch.full((256,), value), "step": 0}


def _committed(root: Path) -> tuple[int, ...]:
    return scan_steps(LocalBackend(root)).committed


def _finished(pending: ckpt.PendingSave) -> None:
    """Wait for a save to end without looking at its outcome (so it stays "unobserved")."""
    ended = threading.Event()
    pending.add_done_callback(lambda _: ended.set())
    assert ended.wait(60), "the save did not end"


def _run(mgr: CheckpointManager, steps: range) -> list[int]:
    """Call ``maybe_save`` for each step; return the steps it saved (waiting for each)."""
    saved = []
    for step in steps:
        pending = mgr.maybe_save(step, _state(float(step)))
        if pending is not None:
            pending.result()
            saved.append(step)
    return saved


def _run_no_wait(mgr: CheckpointManager, steps: range) -> list[int]:
    """Like ``_run`` but leaves the saves in flight."""
    return [s for s in steps if mgr.maybe_save(s, _state(float(s))) is not None]


# -- policy ------------------------------------------------------------------------------


def test_every_steps_saves_exactly_the_multiples(root: Path) -> None:
    with CheckpointManager(root, every_steps=3, keep_last=None, if_busy="wait") as mgr:
        assert _run(mgr, range(1, 11)) == [3, 6, 9]
        assert mgr.maybe_save(9, _state()) is None  # the same step is not saved twice
    assert _committed(root) == (3, 6, 9)
    assert mgr.metrics.saves_started == mgr.metrics.saves_committed == 3
    assert [r.step for r in mgr.metrics.history] == [3, 6, 9]
    assert mgr.metrics.saves_failed == mgr.metrics.saves_skipped_busy == 0


def test_manual_never_saves_by_itself_but_save_always_does(root: Path) -> None:
    with CheckpointManager(root, keep_last=None, manual=True) as mgr:
        assert _run(mgr, range(1, 6)) == []
        assert mgr.save(7, _state(), blocking=True).done()
    assert _committed(root) == (7,)


def test_a_final_save_of_the_step_just_saved_is_not_a_second_commit(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The common loop ending ``mgr.save(last_step)`` after ``maybe_save`` saved it."""
    caplog.set_level("INFO", logger="ckpt._manager")
    with CheckpointManager(root, every_steps=5, keep_last=None) as mgr:
        saved = mgr.maybe_save(10, _state(10.0))
        assert saved is not None
        assert mgr.save(10, _state(10.0), blocking=True) is saved
        assert saved.result().committed
    assert _committed(root) == (10,)
    assert mgr.metrics.saves_started == mgr.metrics.saves_committed == 1
    assert "step 10 was saved already by this manager" in caplog.text


def test_a_job_restarted_after_its_last_save_does_not_save_that_step_again(root: Path) -> None:
    ckpt.save(_state(3.0), root, step=20)
    with CheckpointManager(root, every_steps=5, keep_last=None) as mgr:
        state = _state()
        assert mgr.restore(state) == 20
        result = mgr.save(20, state, blocking=True).result()  # the loop had nothing left to run
        assert result.committed and result.bytes_written == 0
        assert mgr.save(21, state, blocking=True).result().bytes_written > 0
    assert _committed(root) == (20, 21)


def test_a_failed_save_of_a_step_can_be_saved_again_by_name(root: Path) -> None:
    backend = FaultyBackend(LocalBackend(root), fail_write_at=1)
    with CheckpointManager(backend, manual=True, keep_last=None) as mgr:
        with pytest.raises(ckpt.CheckpointError):
            mgr.save(4, _state(), blocking=True)
        assert mgr.save(4, _state(), blocking=True).result().committed
    assert _committed(root) == (4,)


def test_every_seconds_follows_the_clock(root: Path, clock: FakeClock) -> None:
    with CheckpointManager(root, every_seconds=10.0, keep_last=None, if_busy="wait") as mgr:
        saved = []
        for step, advance in enumerate([0.0, 5.0, 4.5, 0.5, 9.5, 0.75, 100.0], start=1):
            clock.advance(advance)
            saved += _run(mgr, range(step, step + 1))
        # t = 0 (first: save), 5, 9.5, 10 (save), 19.5, 20.25 (save), 120.25 (save)
        assert saved == [1, 4, 6, 7]
    assert _committed(root) == (1, 4, 6, 7)


def test_auto_interval_saves_first_then_every_young_daly_period(
    root: Path, clock: FakeClock
) -> None:
    mtbf = 2.0
    with CheckpointManager(
        root, interval="auto", mtbf_seconds=mtbf, keep_last=None, if_busy="wait"
    ) as mgr:
        assert _run(mgr, range(1, 2)) == [1]  # saved at once, to measure the stall
        step = 2
        for _ in range(2):
            period = math.sqrt(2.0 * max(mgr.stall_estimate, 1e-3) * mtbf)
            clock.advance(period * 0.95)
            assert _run(mgr, range(step, step + 1)) == []
            clock.advance(period * 0.1)
            assert _run(mgr, range(step + 1, step + 2)) == [step + 1]
            step += 2
    assert _committed(root) == (1, 3, 5)


def test_auto_interval_plans_with_steady_stalls_not_the_first_save(root: Path) -> None:
    with CheckpointManager(root, every_steps=1, keep_last=2) as mgr:
        stalls = [
            mgr.save(step, _state(float(step)), blocking=True).stall_seconds for step in range(1, 5)
        ]
        assert mgr.stall_estimate == statistics.median(stalls[1:])


def test_restore_prepares_staging_so_the_first_save_allocates_nothing(root: Path) -> None:
    state = {"w": torch.randn(1 << 16), "b": torch.randn(300)}
    with CheckpointManager(root, every_steps=1) as mgr:
        assert mgr.restore(state) is None  # a fresh start still prepares
        reserved = mgr.staging_bytes
        assert reserved >= 4 * ((1 << 16) + 300)
        mgr.maybe_save(1, state).result()  # type: ignore[union-attr]
        assert mgr.staging_bytes == reserved  # the save used what was prepared
    with CheckpointManager(root, manual=True) as mgr:
        mgr.restore(state)
        assert mgr.staging_bytes == 0  # a manual manager may only restore
        assert mgr.prepare(state) == reserved


def test_the_first_save_imports_nothing(root: Path) -> None:
    """A lazy import on the first save is stall training pays once, and it fed interval="auto"
    a cost ten times the steady one; after restore, the save path is loaded."""
    script = f"""
import sys, torch, ckpt
state = {{"m": torch.nn.Linear(2, 2), "step": 1}}
with ckpt.CheckpointManager({str(root)!r}, every_steps=1) as mgr:
    mgr.restore(state)
    before = set(sys.modules)
    mgr.maybe_save(1, state).result()
    print(sorted(set(sys.modules) - before))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_auto_interval_after_a_restart_plans_with_the_restored_stall(
    root: Path, clock: FakeClock
) -> None:
    """A restarted job does not save at its first step: it plans with the stall recorded in
    the restored manifest, while a fresh job saves at once to measure it."""
    with CheckpointManager(
        root, interval="auto", mtbf_seconds=3600.0, keep_last=None, if_busy="wait"
    ) as mgr:
        assert _run(mgr, range(1, 2)) == [1]  # a fresh job: saved at once, to measure
        clock.advance(1e6)
        assert _run(mgr, range(2, 3)) == [2]
    recorded = read_manifest(LocalBackend(root), 2).timings
    assert recorded is not None
    with CheckpointManager(
        root, interval="auto", mtbf_seconds=3600.0, keep_last=None, if_busy="wait"
    ) as mgr:
        state = _state()
        assert mgr.restore(state) == 2
        assert mgr.stall_estimate == max(recorded.stall_s)
        period = math.sqrt(2.0 * max(mgr.stall_estimate, 1e-3) * 3600.0)
        assert _run(mgr, range(3, 4)) == []  # not at the first maybe_save after the restart
        clock.advance(period * 0.9)
        assert _run(mgr, range(4, 5)) == []
        clock.advance(period * 0.2)
        assert _run(mgr, range(5, 6)) == [5]  # at the period the policy chose
    assert _committed(root) == (1, 2, 5)


def test_auto_interval_is_capped_by_every_seconds(root: Path, clock: FakeClock) -> None:
    # With a one-day MTBF the derived period is at least sqrt(2 * 1 ms * 86400 s) ~ 13 s.
    with CheckpointManager(
        root,
        interval="auto",
        every_seconds=5.0,
        mtbf_seconds=86400.0,
        keep_last=None,
        if_busy="wait",
    ) as mgr:
        assert _run(mgr, range(1, 2)) == [1]
        clock.advance(4.0)
        assert _run(mgr, range(2, 3)) == []
        clock.advance(1.0)
        assert _run(mgr, range(3, 4)) == [3]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"every_steps": 0},
        {"every_seconds": 0.0},
        {"interval": "often"},
        {"every_steps": 1, "if_busy": "drop"},
        {"every_steps": 1, "keep_last": 0},
        {},  # no policy: maybe_save would never save
        {"manual": True, "every_steps": 1},
    ],
)
def test_bad_configuration_is_refused(root: Path, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        CheckpointManager(root, save_on_sigterm=False, **kwargs)


# -- retention ---------------------------------------------------------------------------


def test_keep_last_keeps_the_newest(root: Path) -> None:
    with CheckpointManager(root, every_steps=1, keep_last=2, if_busy="wait") as mgr:
        _run(mgr, range(1, 6))
    assert _committed(root) == (4, 5)
    assert sorted(os.listdir(root)) == [step_prefix(4), step_prefix(5)]


def test_keep_every_keeps_multiples_forever(root: Path) -> None:
    with CheckpointManager(root, every_steps=1, keep_last=1, keep_every=3, if_busy="wait") as mgr:
        _run(mgr, range(1, 8))
    assert _committed(root) == (3, 6, 7)


def test_newest_committed_survives_failed_saves_and_newer_partials_are_left_alone(
    root: Path,
) -> None:
    # Step 3's manifest put fails: its data files stay behind as a partial step.
    faulty = FaultyBackend(LocalBackend(root), fail_put_at=3)
    with CheckpointManager(faulty, every_steps=1, keep_last=1, if_busy="wait") as mgr:
        _run(mgr, range(1, 3))
        assert _committed(root) == (2,)
        pending = mgr.maybe_save(3, _state(3.0))
        assert pending is not None
        with pytest.raises(ckpt.StorageError):
            pending.result()
        listing = scan_steps(LocalBackend(root))
        assert listing.committed == (2,), "the newest committed step was deleted"
        assert listing.uncommitted == (3,)  # newer than the newest committed: maybe still in flight
        target = _state()
        assert ckpt.load(target, root) == 2 and torch.equal(target["w"], torch.full((256,), 2.0))

        _run(mgr, range(4, 5))
        # Step 3 is older than the newest committed step now, but was written to just now.
        assert scan_steps(LocalBackend(root)) == StepListing(committed=(4,), uncommitted=(3,))
        _age(root, 3)
        _run(mgr, range(5, 6))
    assert scan_steps(LocalBackend(root)) == StepListing(committed=(5,), uncommitted=())
    assert mgr.metrics.saves_failed == 1 and mgr.metrics.saves_committed == 4


def _age(root: Path, step: int, seconds: float = 2 * 3600.0) -> None:
    """Make everything under ``step``'s prefix look written ``seconds`` ago."""
    then = time.time() - seconds
    top = root / step_prefix(step)
    for path in [top, *top.rglob("*")]:
        os.utime(path, (then, then), follow_symlinks=False)


def test_abandoned_partial_steps_are_removed_after_the_next_commit(root: Path) -> None:
    backend = LocalBackend(root)
    backend.write(f"{step_prefix(3)}/data/x", b"half a checkpoint")
    _age(root, 3)  # nothing written there for longer than the lease
    backend.write(f"{step_prefix(2)}/data/x", b"a save of an older step, in flight")
    backend.write(f"{step_prefix(9)}/data/x", b"maybe still being written")
    with CheckpointManager(root, every_steps=4, keep_last=3, if_busy="wait") as mgr:
        _run(mgr, range(1, 5))
    listing = scan_steps(backend)
    assert listing.committed == (4,)
    assert listing.uncommitted == (2, 9)
    assert not (root / step_prefix(3)).exists()
    assert backend.read(f"{step_prefix(2)}/data/x") == b"a save of an older step, in flight"
    assert backend.read(f"{step_prefix(9)}/data/x") == b"maybe still being written"


@pytest.mark.parametrize(
    ("committed", "uncommitted", "policy", "drop", "abandoned"),
    [
        ((1, 2, 3, 4), (), RetentionPolicy(keep_last=2), (1, 2), ()),
        ((1, 2, 3, 4), (), RetentionPolicy(keep_last=1, keep_every=2), (1, 3), ()),
        ((1, 2, 3), (), RetentionPolicy(keep_last=None), (), ()),
        ((2, 5), (1, 4, 6), RetentionPolicy(keep_last=1), (2,), (1, 4)),
        ((), (1, 2), RetentionPolicy(keep_last=1), (), ()),
    ],
)
def test_plan_gc(
    committed: tuple[int, ...],
    uncommitted: tuple[int, ...],
    policy: RetentionPolicy,
    drop: tuple[int, ...],
    abandoned: tuple[int, ...],
) -> None:
    plan = plan_gc(committed, uncommitted, policy)
    assert (plan.committed, plan.abandoned) == (drop, abandoned)
    if committed:
        assert max(committed) not in plan.committed


# -- a save is due while the previous one is still in flight -----------------------------


def test_if_busy_skip_skips_counts_and_warns(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    faulty = FaultyBackend(LocalBackend(root), gate=threading.Event())
    with CheckpointManager(faulty, every_steps=1, keep_last=None, if_busy="skip") as mgr, faulty:
        first = mgr.maybe_save(1, _state(1.0))
        assert first is not None and faulty.held.wait(10)
        assert mgr.maybe_save(2, _state(2.0)) is None
        assert mgr.maybe_save(3, _state(3.0)) is None
        assert mgr.metrics.saves_skipped_busy == 2
        skipped = [
            r for r in caplog.records if r.levelname == "WARNING" and "skipped" in r.getMessage()
        ]
        assert len(skipped) == 2 and "step 2" in skipped[0].getMessage()
        faulty.release()
        first.result()
        assert _run(mgr, range(4, 5)) == [4]
    assert _committed(root) == (1, 4)
    assert mgr.metrics.saves_started == 2


def test_if_busy_wait_waits_for_the_save_in_flight(root: Path) -> None:
    faulty = FaultyBackend(LocalBackend(root), gate=threading.Event())
    order: list[str] = []
    with CheckpointManager(faulty, every_steps=1, keep_last=None, if_busy="wait") as mgr, faulty:
        first = mgr.maybe_save(1, _state(1.0))
        assert first is not None and faulty.held.wait(10)
        second: list[ckpt.PendingSave | None] = []

        def save_next() -> None:
            second.append(mgr.maybe_save(2, _state(2.0)))
            order.append("second staged")

        thread = threading.Thread(target=save_next)
        thread.start()
        order.append("first released")  # the first save holds the only staging buffer
        faulty.release()
        thread.join(30)
        assert order == ["first released", "second staged"]
        assert second[0] is not None and second[0].result().step == 2
    assert _committed(root) == (1, 2)
    assert mgr.metrics.saves_skipped_busy == 0


def test_a_failed_save_is_raised_by_the_next_call_and_that_step_can_be_retried(root: Path) -> None:
    faulty = FaultyBackend(LocalBackend(root), fail_write_at=1)
    with CheckpointManager(faulty, every_steps=1, keep_last=None, if_busy="wait") as mgr:
        failed = mgr.maybe_save(1, _state(1.0))
        assert failed is not None
        _finished(failed)
        with pytest.raises(ckpt.StorageError):
            mgr.maybe_save(2, _state(2.0))
        assert _run(mgr, range(2, 3)) == [2]  # the step whose call raised is saved on retry
    assert _committed(root) == (2,)
    assert mgr.metrics.saves_failed == 1 and mgr.metrics.saves_committed == 1


# -- restore -----------------------------------------------------------------------------


class Counter:
    """A plain object with state_dict/load_state_dict."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def state_dict(self) -> dict[str, Any]:
        return {"seen": list(self.seen)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = list(state["seen"])


def _job() -> dict[str, Any]:
    """Model, optimizer, LR scheduler, a custom stateful object, a tensor, plain values."""
    with torch.random.fork_rng():  # the same initial weights, the global RNG untouched
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.Dropout(0.25), torch.nn.Linear(8, 2)
        )
    optim = torch.optim.AdamW(model.parameters(), lr=0.05)
    return {
        "model": model,
        "optim": optim,
        "sched": torch.optim.lr_scheduler.StepLR(optim, step_size=2, gamma=0.5),
        "counter": Counter(),
        "ema": torch.zeros(2),
        "epoch": 0,
        "meta": {"name": "run"},
    }


def _train(state: dict[str, Any], step: int) -> tuple[float, float, float]:
    """One step that draws from torch (data and dropout), Python and NumPy RNGs."""
    x = torch.randn(5, 4)
    scale = 1.0 + random.random() + float(np.random.rand())
    state["optim"].zero_grad()
    out = state["model"](x)
    (out.pow(2).mean() * scale).backward()
    state["optim"].step()
    state["sched"].step()
    state["counter"].seen.append(step)
    state["ema"].mul_(0.9).add_(out.detach().mean(0), alpha=0.1)
    state["epoch"] = step // 3
    state["meta"]["last"] = step
    return float(x.sum()), random.random(), float(np.random.rand())


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _assert_jobs_equal(a: dict[str, Any], b: dict[str, Any]) -> None:
    for (name, p), (_, q) in zip(a["model"].state_dict().items(), b["model"].state_dict().items()):
        assert torch.equal(p, q), name
    sa, sb = a["optim"].state_dict(), b["optim"].state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for k in sa["state"]:
        for field in sa["state"][k]:
            assert torch.equal(
                torch.as_tensor(sa["state"][k][field]), torch.as_tensor(sb["state"][k][field])
            )
    assert a["sched"].state_dict() == b["sched"].state_dict()
    assert a["counter"].seen == b["counter"].seen
    assert torch.equal(a["ema"], b["ema"])
    assert (a["epoch"], a["meta"]) == (b["epoch"], b["meta"])


def test_restore_on_an_empty_root_returns_none(root: Path) -> None:
    with CheckpointManager(root, save_on_sigterm=False, manual=True) as mgr:
        assert mgr.restore(_job()) is None
        with pytest.raises(ckpt.CheckpointNotFoundError):
            mgr.restore(_job(), step=3)


@pytest.mark.parametrize("include_rng", [False, True], ids=["no-rng", "rng"])
def test_restore_returns_the_step_and_the_loop_continues_from_it(
    root: Path, include_rng: bool
) -> None:
    total, every, crash_after = 8, 3, 7

    _seed_everything(1)
    reference = _job()
    draws_ref = [_train(reference, step) for step in range(1, total + 1)]

    _seed_everything(1)
    first = _job()
    with CheckpointManager(
        root, every_steps=every, keep_last=2, include_rng=include_rng, if_busy="wait"
    ) as mgr:
        for step in range(1, crash_after + 1):
            _train(first, step)
            pending = mgr.maybe_save(step, first)
            if pending is not None:
                pending.result()
    assert _committed(root) == (3, 6)

    _seed_everything(12345)  # a restarted process starts from other RNG states
    resumed = _job()
    with CheckpointManager(
        root, every_steps=every, keep_last=2, include_rng=include_rng, if_busy="wait"
    ) as mgr:
        start = mgr.restore(resumed)
        assert start == 6 and mgr.last_restore is not None and mgr.last_restore.skipped == ()
        assert resumed["counter"].seen == list(range(1, 7))
        assert (resumed["epoch"], resumed["meta"]) == (2, {"name": "run", "last": 6})
        assert resumed["sched"].last_epoch == 6
        assert mgr.maybe_save(start, resumed) is None  # just restored: not saved again
        draws = [_train(resumed, step) for step in range(start + 1, total + 1)]
    if include_rng:
        assert draws == draws_ref[start:]
        _assert_jobs_equal(resumed, reference)
    else:
        assert draws != draws_ref[start:]


def test_include_rng_reserves_its_key(root: Path) -> None:
    with (
        CheckpointManager(root, every_steps=1, include_rng=True, save_on_sigterm=False) as mgr,
        pytest.raises(ckpt.CheckpointError, match="reserved"),
    ):
        mgr.maybe_save(1, {"_ckpt_rng": 1})


# -- SIGTERM and close -------------------------------------------------------------------


@pytest.mark.parametrize(
    "in_flight_fails", [False, True], ids=["in-flight-commits", "in-flight-fails"]
)
def test_sigterm_finishes_the_save_in_flight_saves_and_exits_143(
    root: Path, in_flight_fails: bool, caplog: pytest.LogCaptureFixture
) -> None:
    faulty = FaultyBackend(
        LocalBackend(root), gate=threading.Event(), fail_put_at=1 if in_flight_fails else None
    )
    before = signal.getsignal(signal.SIGTERM)
    mgr = CheckpointManager(faulty, every_steps=3, keep_last=None, if_busy="wait")
    events: list[str] = []
    real_wait = mgr._snapshotter.wait

    def wait(timeout: float | None = None) -> list[ckpt.SaveResult]:
        # Called by the preemption path while step 3 is still held: let it go now.
        events.append("in flight" if mgr._snapshotter.busy() else "idle")
        faulty.release()
        return real_wait(timeout)

    try:
        assert _run_no_wait(mgr, range(1, 4)) == [3]
        assert faulty.held.wait(10)
        assert signal.getsignal(signal.SIGTERM) == mgr._on_sigterm  # else the kill ends pytest
        os.kill(os.getpid(), signal.SIGTERM)
        assert mgr.preempted
        mgr._snapshotter.wait = wait  # type: ignore[method-assign]
        with pytest.raises(SystemExit) as info:
            mgr.maybe_save(4, _state(4.0))
        assert info.value.code == 143
        assert events[0] == "in flight"
        assert signal.getsignal(signal.SIGTERM) == before
    finally:
        faulty.release()
        mgr.close()
    if in_flight_fails:
        assert _committed(root) == (4,)
        assert "the save in flight failed during preemption" in caplog.text
    else:
        assert _committed(root) == (3, 4)
    target = _state()
    assert ckpt.load(target, root) == 4 and torch.equal(target["w"], torch.full((256,), 4.0))


def test_sigterm_in_a_real_process(root: Path) -> None:
    proc = _sigterm_worker(root, "save")
    try:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err
    assert _committed(root) == (3, 5), err
    target: dict[str, Any] = {"w": torch.zeros(1 << 16), "step": 0}
    assert ckpt.load(target, root) == 5
    assert target["step"] == 5 and torch.equal(target["w"], torch.full((1 << 16,), 5.0))
    older: dict[str, Any] = {"w": torch.zeros(1 << 16), "step": 0}
    assert ckpt.load(older, root, step=3) == 3 and torch.equal(
        older["w"], torch.full((1 << 16,), 3.0)
    )


def _sigterm_worker(root: Path, mode: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.workers.sigterm", str(root), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "READY":
        proc.kill()
        pytest.fail(f"the worker did not get ready: {proc.communicate(timeout=60)[1]}")
    return proc


@pytest.mark.parametrize("mode", ["stuck", "fails"])
def test_sigterm_ends_a_process_that_never_reaches_maybe_save(root: Path, mode: str) -> None:
    """A loop stuck (or failed, its exit waiting on a save that cannot commit) after SIGTERM:
    the watchdog ends it with status 143 and one ERROR line, well before the worker's own
    60 s limits would (status 3 when stuck, 1 when the held write gives up)."""
    proc = _sigterm_worker(root, mode)
    try:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=50)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err
    errors = [line for line in err.splitlines() if line.startswith("ERROR:ckpt._manager:")]
    assert len(errors) == 1 and "has not exited" in errors[0], err
    assert "exiting with status 143" in errors[0]
    # Step 3's save was released in "stuck" (it commits) and held in "fails" (not committed).
    assert _committed(root) == ((3,) if mode == "stuck" else ())


def test_a_second_sigterm_is_not_swallowed(root: Path) -> None:
    proc = _sigterm_worker(root, "twice")
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "PREEMPTED"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=50)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGTERM, err


def test_sigterm_after_close_gets_the_previous_handler(root: Path) -> None:
    seen: list[int] = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        mgr = CheckpointManager(root, manual=True)
        handler = signal.getsignal(signal.SIGTERM)
        closer = threading.Thread(target=mgr.close)  # off the main thread: handler stays
        closer.start()
        closer.join()
        assert signal.getsignal(signal.SIGTERM) == handler == mgr._on_sigterm
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [signal.SIGTERM] and not mgr.preempted
    finally:
        signal.signal(signal.SIGTERM, before)


def test_close_waits_for_the_save_in_flight(root: Path) -> None:
    faulty = FaultyBackend(LocalBackend(root), gate=threading.Event())
    before = signal.getsignal(signal.SIGTERM)
    mgr = CheckpointManager(faulty, every_steps=1, keep_last=None)
    assert signal.getsignal(signal.SIGTERM) != before
    pending = mgr.maybe_save(1, _state(1.0))
    assert pending is not None and faulty.held.wait(10)
    seen: list[bool] = []
    real_wait = mgr._snapshotter.wait

    def wait(timeout: float | None = None) -> list[ckpt.SaveResult]:
        seen.append(pending.done())  # close() got here while the save was held
        faulty.release()
        return real_wait(timeout)

    mgr._snapshotter.wait = wait  # type: ignore[method-assign]
    try:
        mgr.close()
    finally:
        faulty.release()
        mgr.close()
    assert seen == [False] and pending.done()
    assert pending.result().committed and _committed(root) == (1,)
    assert mgr.metrics.saves_committed == 1
    assert signal.getsignal(signal.SIGTERM) == before
    mgr.close()  # a second close is a no-op
    with pytest.raises(ckpt.CheckpointError, match="closed"):
        mgr.save(2, _state())


@pytest.fixture(autouse=True)
def _sigterm_restored() -> Iterator[None]:
    """Every manager here restores the SIGTERM handler it replaced."""
    before = signal.getsignal(signal.SIGTERM)
    yield
    assert signal.getsignal(signal.SIGTERM) == before
