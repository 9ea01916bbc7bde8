"""Symlinks, special files and odd step names under a checkpoint root, through the user's paths.

Nothing outside the root is ever read, written or deleted through a symlink: a symlink
below the root is neither a step nor an object; reading through one is refused with a
``CorruptCheckpointError`` (restore falls back to an older step); deleting a step unlinks
the symlinks in it, never what they point to. A FIFO where a manifest belongs is refused
instead of blocking the reader. Only the canonical spelling of a step prefix is a step.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt
from ckpt import CheckpointManager
from ckpt.format import StepListing, parse_step_prefix, scan_steps, step_prefix
from ckpt.retention import RetentionPolicy, apply_retention
from storage_backends import LocalBackend
from tests.support.cli import run_cli
from tests.support.on_disk import manifest_path, save_with, step_dir


def _state(value: float = 0.0) -> dict[str, Any]:
    return {"w": torch.full((64,), value), "meta": {"v": value}}


def _save(root: Path, step: int) -> None:
    save_with(_state(float(step)), root, step)


def _victim(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A directory outside the root holding files a user cares about."""
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    files = {"precious.txt": b"do not delete", "sub/more.bin": b"\x00" * 100}
    for name, data in files.items():
        (victim / name).write_bytes(data)
    return victim, files


def _assert_intact(victim: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        assert (victim / name).read_bytes() == data, f"{name} outside the root was touched"


# -- a symlinked step prefix ---------------------------------------------------------------


def test_manager_retention_never_deletes_through_a_symlinked_step(
    root: Path, tmp_path: Path
) -> None:
    """A symlink named like an old step pointing at a directory outside the root: the
    retention that runs after every commit leaves the directory (and the link) alone."""
    victim, files = _victim(tmp_path)
    os.symlink(victim, root / step_prefix(0))
    with CheckpointManager(root, every_steps=1, keep_last=1, if_busy="wait") as mgr:
        for step in (1, 2):
            pending = mgr.maybe_save(step, _state(float(step)))
            assert pending is not None
            pending.result()
    _assert_intact(victim, files)
    assert (root / step_prefix(0)).is_symlink()
    assert scan_steps(LocalBackend(root)) == StepListing(committed=(2,), uncommitted=())


def test_cli_gc_never_deletes_through_a_symlinked_step(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ckpt gc ROOT`` neither counts a symlinked step nor empties what it points to."""
    victim, files = _victim(tmp_path)
    _save(root, 5)
    os.symlink(victim, root / step_prefix(1))
    code, out = run_cli(monkeypatch, "gc", str(root), "--keep-last", "1")
    assert code == 0, out
    assert "partial steps []" in out
    _assert_intact(victim, files)
    code, out = run_cli(monkeypatch, "ls", str(root))
    assert code == 0 and "partial" not in out, out


# -- a committed step whose data folder is a symlink -----------------------------------------


def _symlink_data_out(root: Path, step: int, elsewhere: Path) -> tuple[Path, dict[str, bytes]]:
    """Move ``step``'s data folder out of the root and leave a symlink in its place."""
    data = step_dir(root, step) / "data"
    shutil.move(data, elsewhere)
    os.symlink(elsewhere, data)
    files = {p.name: p.read_bytes() for p in elsewhere.iterdir()}
    assert files
    return elsewhere, files


def test_data_through_a_symlink_is_refused_and_restore_falls_back(
    root: Path, tmp_path: Path
) -> None:
    """Step 2's ``data/`` points outside the root: loading step 2 raises a corrupt-checkpoint
    error naming the symlink, and restore falls back to step 1."""
    _save(root, 1)
    _save(root, 2)
    elsewhere, files = _symlink_data_out(root, 2, tmp_path / "other-disk")

    target = _state()
    with pytest.raises(ckpt.CorruptCheckpointError, match="symlink"):
        ckpt.load(target, root, step=2)
    with CheckpointManager(root, save_on_sigterm=False, manual=True) as mgr:
        assert mgr.restore(target) == 1
    assert torch.equal(target["w"], torch.full((64,), 1.0))
    _assert_intact(elsewhere, files)


def test_gc_of_a_step_with_symlinked_data_unlinks_the_link_only(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deleting a committed step whose ``data/`` is a symlink removes the step (the link
    itself) and leaves the files it pointed to; gc of the other steps goes on, then and
    later."""
    for step in (1, 2, 3):
        _save(root, step)
    elsewhere, files = _symlink_data_out(root, 2, tmp_path / "other-disk")

    plan = apply_retention(LocalBackend(root), RetentionPolicy(keep_last=1))
    assert plan.committed == (1, 2)
    assert sorted(os.listdir(root)) == [step_prefix(3)]
    _assert_intact(elsewhere, files)

    _save(root, 4)
    code, out = run_cli(monkeypatch, "gc", str(root), "--keep-last", "1")
    assert code == 0, out
    assert scan_steps(LocalBackend(root)) == StepListing(committed=(4,), uncommitted=())


def test_manifest_symlinked_out_of_the_root_is_not_a_checkpoint(root: Path, tmp_path: Path) -> None:
    """A manifest that is a symlink is never read: the step does not count as committed, and
    asking for it by number says why."""
    _save(root, 1)
    _save(root, 2)
    outside = tmp_path / "manifest.json"
    shutil.copyfile(manifest_path(root, 2), outside)
    manifest_path(root, 2).unlink()
    os.symlink(outside, manifest_path(root, 2))

    assert scan_steps(LocalBackend(root)).committed == (1,)
    with pytest.raises(ckpt.CorruptCheckpointError, match="symlink"):
        ckpt.load(_state(), root, step=2)
    assert ckpt.load(_state(), root) == 1


def test_a_symlinked_step_is_never_written_through(root: Path, tmp_path: Path) -> None:
    """Saving a step whose prefix is a symlink to a directory outside the root fails with a
    checkpoint error and writes nothing there."""
    victim, files = _victim(tmp_path)
    os.symlink(victim, root / step_prefix(3))
    with pytest.raises(ckpt.CheckpointError, match="symlink"):
        ckpt.save(_state(3.0), root, step=3)
    assert sorted(p.relative_to(victim).as_posix() for p in victim.rglob("*")) == sorted(
        [*files, "sub"]
    )


def test_root_that_is_a_symlink_works(tmp_path: Path) -> None:
    """``ln -s /nvme/ckpts ./ckpts``: the root itself may be a symlink."""
    real = tmp_path / "nvme"
    real.mkdir()
    link = tmp_path / "ckpts"
    os.symlink(real, link)
    with CheckpointManager(link, every_steps=1, keep_last=1, if_busy="wait") as mgr:
        for step in (1, 2):
            pending = mgr.maybe_save(step, _state(float(step)))
            assert pending is not None
            pending.result()
    assert sorted(os.listdir(real)) == [step_prefix(2)]
    target = _state()
    assert ckpt.load(target, link) == 2
    assert torch.equal(target["w"], torch.full((64,), 2.0))


# -- a FIFO where the manifest belongs -------------------------------------------------------


@pytest.mark.timeout(60)
def test_fifo_manifest_does_not_hang_load_or_the_cli(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``manifest.json`` replaced by a FIFO: load, inspect, verify and convert of that step
    fail at once with a one-line error instead of waiting for a writer forever; without a
    step, restore falls back to the step before."""
    _save(root, 1)
    _save(root, 2)
    manifest_path(root, 2).unlink()
    os.mkfifo(manifest_path(root, 2))

    with pytest.raises(ckpt.CorruptCheckpointError, match="FIFO"):
        ckpt.load(_state(), root, step=2)
    assert ckpt.load(_state(), root) == 1
    for command in ("inspect", "verify"):
        code, out = run_cli(monkeypatch, command, str(root), "--step", "2")
        assert code != 0 and "FIFO" in out, out
    out_root = str(root.parent / "out")
    code, out = run_cli(
        monkeypatch, "convert", str(root), out_root, "--step", "2", "--world-size", "1"
    )
    assert code != 0 and "FIFO" in out, out


# -- step names ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "step"),
    [
        ("step-000000003", 3),
        ("step-000000000", 0),
        ("step-123456789", 123456789),
        ("step-1234567890", 1234567890),
        ("step-0000000003", None),
        ("step-01234567890", None),
        ("step-00000003", None),
        ("step-000000003\n", None),
        ("step-\u0663\u0663\u0663\u0663\u0663\u0663\u0663\u0663\u0663", None),
        ("step--00000003", None),
        ("step-+00000003", None),
        ("Step-000000003", None),
    ],
)
def test_only_the_canonical_step_spelling_is_a_step(name: str, step: int | None) -> None:
    assert parse_step_prefix(name) == step
    if step is not None:
        assert step_prefix(step) == name


def test_a_second_spelling_of_a_step_is_not_ours(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``step-0000000003`` beside ``step-000000003``: ls and the scan see one step 3, and gc
    leaves the odd directory alone (it is not a checkpoint of ours)."""
    _save(root, 3)
    _save(root, 4)
    odd = root / "step-0000000003"
    shutil.copytree(step_dir(root, 3), odd)

    assert scan_steps(LocalBackend(root)) == StepListing(committed=(3, 4), uncommitted=())
    code, out = run_cli(monkeypatch, "gc", str(root), "--keep-last", "1")
    assert code == 0, out
    assert sorted(os.listdir(root)) == [odd.name, step_prefix(4)]
    assert scan_steps(LocalBackend(root)) == StepListing(committed=(4,), uncommitted=())
