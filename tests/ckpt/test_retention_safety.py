"""Retention never costs a restorable checkpoint, and never tears a save in flight.

* Validity, not step numbers: only committed steps that validate (manifest + file
  sizes) count toward ``keep_last``; the newest valid step is never deleted.
* The lease: a step without a manifest is garbage only once nothing was written in it
  for ``abandoned_after`` seconds, so a save of an older step (after a fallback, or
  another job on the same root) is never deleted under its writer.
* The committer checks the data files right before and right after publishing: if
  garbage collection deleted them anyway, the save fails with a ``SaveAbortedError``
  that says so, and no manifest is left naming missing files.
* ``ckpt gc`` also removes files no manifest names from committed steps (old ones), and
  ``ckpt inspect`` cuts long user metadata.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import ckpt
from ckpt import cli
from ckpt.format import manifest_path, read_manifest, scan_steps, step_prefix
from ckpt.retention import GcPlan, RetentionPolicy, apply_retention, plan_gc
from recovery import validate_files
from storage_backends import BytesLike, LocalBackend, StorageBackend
from tests.support.campaign import CampaignTable
from tests.support.faulty import FaultyBackend
from tests.support.on_disk import data_file, piece_of
from tests.support.on_disk import manifest_path as manifest_file

HOUR = 3600.0


def _state(value: float = 0.0, numel: int = 64) -> dict[str, Any]:
    return {"w": torch.full((numel,), value), "b": torch.arange(8.0) + value, "step": int(value)}


def _save(target: Path | StorageBackend, step: int, **kwargs: Any) -> ckpt.SaveResult:
    return ckpt.save(_state(float(step)), target, step=step, **kwargs)


def _age(root: Path, step: int, seconds: float = 2 * HOUR, *, only: str | None = None) -> None:
    """Make everything under ``step``'s prefix (or the one file ``only`` there) look
    written ``seconds`` ago."""
    then = time.time() - seconds
    top = root / step_prefix(step)
    paths = [top / only] if only else [top, *top.rglob("*")]
    for path in paths:
        os.utime(path, (then, then), follow_symlinks=False)


def _loaded(root: Path) -> int | None:
    return ckpt.load(_state(-1.0), root)


def _gc(*args: str) -> str:
    result = CliRunner().invoke(cli.app, ["gc", *args])
    assert result.exit_code == 0, result.output
    return result.output


def _torn(backend: StorageBackend) -> list[int]:
    """Committed steps whose manifest names a file that is missing or has the wrong size."""
    torn = []
    for step in scan_steps(backend).committed:
        try:
            validate_files(backend, read_manifest(backend, step))
        except ckpt.CheckpointNotFoundError:
            continue  # deleted meanwhile: not a checkpoint, not torn
        except ckpt.CorruptCheckpointError:
            torn.append(step)
    return torn


def _truncate_data(root: Path, step: int) -> None:
    path = data_file(root, step, piece_of(root, step, "w")["file"])
    path.write_bytes(path.read_bytes()[:-4])


def _delete_data(root: Path, step: int) -> None:
    data_file(root, step, piece_of(root, step, "w")["file"]).unlink()


def _garble_manifest(root: Path, step: int) -> None:
    path = manifest_file(root, step)
    path.chmod(0o644)
    path.write_bytes(path.read_bytes()[:50])


CORRUPTIONS: dict[str, Callable[[Path, int], None]] = {
    "deleted-data": _delete_data,
    "truncated-data": _truncate_data,
    "garbled-manifest": _garble_manifest,
}


# -- defect 3: retention ranks by validity ----------------------------------------------


@pytest.mark.parametrize("corrupt", list(CORRUPTIONS.values()), ids=list(CORRUPTIONS))
def test_gc_keep_last_1_keeps_the_older_step_when_the_newest_is_corrupt(
    root: Path, corrupt: Callable[[Path, int], None], caplog: pytest.LogCaptureFixture
) -> None:
    """Steps 1 and 2, step 2 corrupt: ``ckpt gc --keep-last 1`` keeps step 1 restorable,
    keeps step 2 for inspection, and says that step 2 does not validate."""
    _save(root, 1)
    _save(root, 2)
    corrupt(root, 2)
    with caplog.at_level(logging.WARNING, logger="ckpt"):
        out = _gc(str(root), "--keep-last", "1")
    assert scan_steps(LocalBackend(root)).committed == (1, 2)
    assert _loaded(root) == 1
    assert "do not validate" in out and "[2]" in out
    assert any(
        "step 2" in r.getMessage() and "not valid" in r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING
    )
    # A valid step newer than the corrupt one makes it fall outside the window.
    _save(root, 3)
    _gc(str(root), "--keep-last", "1")
    assert scan_steps(LocalBackend(root)).committed == (3,)


def test_manager_keeps_steps_saved_after_a_fallback(root: Path) -> None:
    """Step 10 is corrupt; the job falls back to 5 and saves 6, 7, 8 with keep_last=2: the
    new steps are kept (8 and 7 are the two newest valid ones), 10 stays for inspection."""
    _save(root, 5)
    _save(root, 10)
    _delete_data(root, 10)
    with ckpt.CheckpointManager(root, every_steps=1, keep_last=2, if_busy="wait") as mgr:
        assert mgr.restore(_state(-1.0)) == 5
        for step in (6, 7, 8):
            pending = mgr.maybe_save(step, _state(float(step)))
            assert pending is not None and pending.result().committed
    assert scan_steps(LocalBackend(root)).committed == (7, 8, 10)
    assert _loaded(root) == 8


@pytest.mark.parametrize(
    ("committed", "invalid", "policy", "drop", "reported"),
    [
        ((1, 2), {2}, RetentionPolicy(keep_last=1), (), (2,)),
        ((1, 2, 3, 4), {4, 2}, RetentionPolicy(keep_last=2), (), (2, 4)),
        ((1, 2, 3, 4, 5), {4}, RetentionPolicy(keep_last=2), (1, 2), (4,)),
        ((1, 2, 3), {1, 2, 3}, RetentionPolicy(keep_last=1), (), (1, 2, 3)),
        ((2, 3, 4, 6), {6}, RetentionPolicy(keep_last=1, keep_every=2), (3,), (6,)),
        ((1, 2, 3), {3}, RetentionPolicy(keep_last=None), (), ()),  # keeps all: nothing to check
    ],
)
def test_plan_gc_counts_only_valid_steps(
    committed: tuple[int, ...],
    invalid: set[int],
    policy: RetentionPolicy,
    drop: tuple[int, ...],
    reported: tuple[int, ...],
) -> None:
    asked: list[int] = []

    def is_valid(step: int) -> bool:
        asked.append(step)
        return step not in invalid

    plan = plan_gc(committed, (), policy, is_valid=is_valid)
    assert (plan.committed, plan.invalid) == (drop, reported)
    valid = [s for s in committed if s not in invalid]
    if valid:
        assert max(valid) not in plan.committed
    assert asked == sorted(asked, reverse=True) and len(set(asked)) == len(asked)


def test_validation_reads_no_data_bytes_and_each_manifest_once(root: Path) -> None:
    """Validation is cheap: manifests and sizes only, each step examined once per pass."""
    for step in (1, 2, 3, 4):
        _save(root, step)

    class Counting(FaultyBackend):
        def __init__(self, inner: StorageBackend) -> None:
            super().__init__(inner)
            self.reads: list[str] = []

        def read(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
            self.reads.append(path)
            return super().read(path, offset, length)

        def read_into(self, path: str, offset: int, out: BytesLike) -> None:
            self.reads.append(path)
            super().read_into(path, offset, out)

    backend = Counting(LocalBackend(root))
    plan = apply_retention(backend, RetentionPolicy(keep_last=2), remove_stale=True)
    assert plan.committed == (1, 2)
    assert sorted(backend.reads) == [manifest_path(3), manifest_path(4)]


# -- defect 4: a save in flight is never torn -------------------------------------------


class _GcAround(LocalBackend):
    """A real local backend that runs a hook (garbage collection) at one point of a commit,
    once, deterministically: ``on_list`` when the committer lists the step's files before
    publishing, ``before_put`` / ``after_put`` around the manifest's creation."""

    def __init__(self, root: Path, step: int) -> None:
        super().__init__(root)
        self.step = step
        self.on_list: Callable[[], object] | None = None
        self.before_put: Callable[[], object] | None = None
        self.after_put: Callable[[], object] | None = None

    def list_objects(self, prefix: str = "") -> list[str]:
        if prefix == step_prefix(self.step) and self.on_list is not None:
            hook, self.on_list = self.on_list, None
            hook()
        return super().list_objects(prefix)

    def put_if_absent(self, path: str, data: BytesLike) -> bool:
        if self.before_put is not None:
            hook, self.before_put = self.before_put, None
            hook()
        created = super().put_if_absent(path, data)
        if self.after_put is not None:
            hook, self.after_put = self.after_put, None
            hook()
        return created


def _gc_pass(root: Path, policy: RetentionPolicy, runs: list[GcPlan] | None = None) -> None:
    plan = apply_retention(LocalBackend(root), policy)
    if runs is not None:
        runs.append(plan)


def test_gc_between_write_and_publish_leaves_a_save_of_an_older_step_alone(root: Path) -> None:
    """Step 5 is committed; a save of step 3 (after a fallback) has written its data when
    ``ckpt gc`` runs: the lease keeps step 3, which commits whole."""
    _save(root, 5)
    runs: list[GcPlan] = []
    backend = _GcAround(root, 3)
    backend.on_list = lambda: _gc_pass(root, RetentionPolicy(), runs)
    assert _save(backend, 3).committed
    assert runs[0].in_use == (3,) and runs[0].abandoned == ()
    assert _torn(backend) == []
    assert ckpt.load(_state(-1.0), root, step=3) == 3


def test_data_deleted_before_the_publish_fails_the_save_and_commits_nothing(root: Path) -> None:
    """A gc with a lapsed lease deletes step 3's data between its write and its publish:
    the save raises a SaveAbortedError naming what happened, and step 3 has no manifest.
    (The old code recreated the directory for the manifest alone: committed=True, torn.)"""
    _save(root, 5)
    backend = _GcAround(root, 3)
    backend.on_list = lambda: _gc_pass(root, RetentionPolicy(abandoned_after=0))
    with pytest.raises(ckpt.SaveAbortedError, match="disappeared during the save") as caught:
        _save(backend, 3)
    assert not isinstance(caught.value, ckpt.CheckpointNotFoundError)
    assert "ckpt gc" in str(caught.value) and "step 3" in str(caught.value)
    assert "withdrawn" not in str(caught.value)
    assert not backend.exists(manifest_path(3))
    assert _torn(backend) == [] and _loaded(root) == 5


@pytest.mark.parametrize("when", ["before_put", "after_put"])
def test_data_deleted_around_the_publish_withdraws_the_manifest(root: Path, when: str) -> None:
    """The data vanishes after the committer's first check, just before or just after the
    manifest is created: the manifest is deleted again and the save fails."""
    _save(root, 5)
    backend = _GcAround(root, 3)

    def delete_data() -> None:
        backend.delete(p for p in backend.list_objects(step_prefix(3)) if "/data/" in p)

    setattr(backend, when, delete_data)
    with pytest.raises(ckpt.SaveAbortedError, match="manifest was withdrawn"):
        _save(backend, 3)
    assert not backend.exists(manifest_path(3))
    assert _torn(backend) == [] and _loaded(root) == 5


def test_prefix_deleted_during_the_write_is_a_save_aborted_error(root: Path) -> None:
    """The data file is being streamed when its prefix is deleted: the failure says what
    happened instead of raising CheckpointNotFoundError."""
    _save(root, 5)
    with FaultyBackend(LocalBackend(root), gate=threading.Event()) as faulty:
        pending = ckpt.async_save(_state(3.0), faulty, step=3)
        assert faulty.held.wait(10)
        apply_retention(LocalBackend(root), RetentionPolicy(abandoned_after=0))
        faulty.release()
        with pytest.raises(ckpt.SaveAbortedError, match="disappeared during the save"):
            pending.result()
    assert not LocalBackend(root).exists(manifest_path(3)) and _loaded(root) == 5


def test_another_jobs_retention_spares_a_save_in_flight(root: Path) -> None:
    """Job B saves step 3 (held mid-write) while job A commits step 10 with keep_last=1:
    A's retention after its commit leaves B's step alone, and B commits it whole."""
    _save(root, 5)
    with FaultyBackend(LocalBackend(root), gate=threading.Event()) as faulty:
        pending = ckpt.async_save(_state(3.0), faulty, step=3)
        assert faulty.held.wait(10)
        with ckpt.CheckpointManager(root, keep_last=1, save_on_sigterm=False, manual=True) as job_a:
            assert job_a.save(10, _state(10.0), blocking=True).result().committed
        faulty.release()
        assert pending.result().committed
    assert scan_steps(LocalBackend(root)).committed == (3, 10)
    assert _torn(LocalBackend(root)) == []


def _campaign(root: Path, saves: int, lease: float) -> dict[str, int]:
    """Saves of older steps on one thread while gc loops on another; counts outcomes."""
    backend = LocalBackend(root)
    _save(root, 10_000)  # the newest committed step: every save below is of an older one
    stop = threading.Event()
    counts = {"gc passes": 0, "committed": 0, "aborted": 0, "withdrawn": 0, "other": 0}
    policy = RetentionPolicy(keep_last=None, abandoned_after=lease)
    others: list[str] = []
    # A gc pass that deletes a step a save is committing at that moment withdraws the
    # manifest at the end of the pass (the committer's own check after publishing can pass
    # just before gc deletes the files): torn steps are looked for between passes.
    between_passes = threading.Lock()

    def gc_loop() -> None:
        while not stop.is_set():
            with between_passes:
                apply_retention(LocalBackend(root), policy, remove_stale=True)
            counts["gc passes"] += 1

    gc_thread = threading.Thread(target=gc_loop, name="gc-loop")
    gc_thread.start()
    try:
        for step in range(1, saves + 1):
            try:
                result = _save(backend, step)
            except ckpt.SaveAbortedError:
                counts["aborted"] += 1
                continue
            except ckpt.CheckpointError as exc:
                counts["other"] += 1
                others.append(repr(exc))
                continue
            assert result.committed
            counts["committed"] += 1
            with between_passes:
                if not backend.exists(manifest_path(step)):
                    counts["withdrawn"] += 1  # gc found it torn after deleting it, and said so
                assert _torn(backend) == [], f"torn after saving step {step}: {counts}"
    finally:
        stop.set()
        gc_thread.join(60)
    assert _torn(backend) == []
    assert not others, others
    return counts


def _record(table: CampaignTable, name: str, counts: dict[str, int], saves: int) -> None:
    table.record(
        name,
        trials=saves,
        committed=counts["committed"],
        aborted_cleanly=counts["aborted"],
        withdrawn=counts["withdrawn"],
        gc_passes=counts["gc passes"],
        torn=0,  # _campaign asserts it after every save
        escapes=counts["other"],
    )


@pytest.mark.campaign
def test_campaign_gc_with_the_default_lease_never_touches_saves_in_flight(
    root: Path, full: bool, campaign_table: CampaignTable
) -> None:
    counts = _campaign(root, 200 if full else 20, HOUR)
    _record(
        campaign_table, "gc looping + saves of older steps (lease 1 h)", counts, 200 if full else 20
    )
    assert counts["committed"] == (200 if full else 20), counts
    assert counts["gc passes"] > 0


@pytest.mark.campaign
def test_campaign_gc_with_no_lease_never_tears_a_step(
    root: Path, full: bool, caplog: pytest.LogCaptureFixture, campaign_table: CampaignTable
) -> None:
    """The worst case: gc deletes every partial step at once. Saves fail cleanly or commit
    whole; no committed manifest ever names a missing file."""
    caplog.set_level(logging.CRITICAL, logger="ckpt")  # hundreds of expected failures
    counts = _campaign(root, 200 if full else 20, 0.0)
    _record(
        campaign_table, "gc looping + saves of older steps (no lease)", counts, 200 if full else 20
    )
    assert counts["other"] == 0, counts


# -- defect 13: gc removes leftovers of other attempts; inspect cuts long metadata --------


def test_gc_removes_old_files_no_manifest_names_and_keeps_young_ones(root: Path) -> None:
    _save(root, 1)
    backend = LocalBackend(root)
    old, young = f"{step_prefix(1)}/data/lost-attempt.safetensors", f"{step_prefix(1)}/data/y"
    backend.write(old, b"a crashed attempt's file")
    backend.write(young, b"a losing attempt, still writing")
    _age(root, 1, only="data/lost-attempt.safetensors")

    assert "1 files no manifest names" in _gc(str(root), "--dry-run")
    assert backend.exists(old)
    assert "1 files no manifest names" in _gc(str(root))
    assert not backend.exists(old) and backend.exists(young)
    assert _loaded(root) == 1
    assert "1 files no manifest names" in _gc(str(root), "--abandoned-after", "0")
    assert not backend.exists(young) and _loaded(root) == 1


def test_gc_abandoned_after_option(root: Path) -> None:
    _save(root, 5)
    LocalBackend(root).write(f"{step_prefix(3)}/data/x", b"partial")
    assert "kept partial steps [3]" in _gc(str(root))
    assert scan_steps(LocalBackend(root)).uncommitted == (3,)
    assert "partial steps [3]" in _gc(str(root), "--abandoned-after", "0")
    assert scan_steps(LocalBackend(root)).uncommitted == ()
    result = CliRunner().invoke(cli.app, ["gc", str(root), "--abandoned-after", "-1"])
    assert result.exit_code != 0


def test_inspect_cuts_long_user_metadata(root: Path) -> None:
    big = "x" * 1_000_000
    _save(root, 1, user_metadata={"big": big, "small": 1, "markup": "[red]not markup[/red]"})
    result = CliRunner().invoke(cli.app, ["inspect", str(root)])
    assert result.exit_code == 0, result.output
    assert len(result.output) < 5000
    assert "small: 1" in result.output
    assert "[red]not markup[/red]" in result.output
    assert f"({len(big) + 2} bytes; use ckpt.format to read it)" in result.output
