"""The training loop survives damaged checkpoints without a human (I2, I7): a corrupt or
unreadable newest step is skipped, the job saves that step number again, and every rank
of a job restores the same step."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt
from storage_backends import BlobReader, LocalBackend, StorageBackendError
from tests.support.campaign import CampaignTable
from tests.support.checks import assert_bit_identical
from tests.support.gloo import run_ranks
from tests.support.on_disk import data_file, flip_byte, piece_of, read_manifest


def _state(value: float) -> dict[str, Any]:
    return {"w": torch.full((256,), value), "meta": {"value": value}}


def _corrupt(root: Path, step: int) -> None:
    piece = piece_of(root, step, "w")
    flip_byte(data_file(root, step, piece["file"]), piece["byte_offset"] + 3)


def _train(root: Path | LocalBackend, steps: range, every: int) -> int | None:
    """A README-style loop; returns the step it restored."""
    state = _state(0.0)
    with ckpt.CheckpointManager(root, every_steps=every, keep_last=10, if_busy="wait") as mgr:
        start = mgr.restore(state)
        for step in steps:
            if start is not None and step <= start:
                continue
            state["w"].fill_(float(step))
            state["meta"] = {"value": float(step)}
            mgr.maybe_save(step, state)
    return start


def test_corrupt_newest_step_is_saved_again_by_the_loop(tmp_path: Path) -> None:
    root = tmp_path / "ckpts"
    _train(root, range(1, 31), every=5)
    _corrupt(root, 30)
    # Each incarnation restores 25, trains to 30 and must save step 30 again: no crash loop.
    assert _train(root, range(1, 33), every=5) == 25
    assert _train(root, range(1, 33), every=5) == 30
    state = _state(-1.0)
    assert ckpt.load(state, root) == 30
    assert_bit_identical(state["w"], torch.full((256,), 30.0))


def test_the_replaced_step_holds_only_the_new_files(tmp_path: Path) -> None:
    root = tmp_path / "ckpts"
    _train(root, range(1, 11), every=5)
    old_files = set(read_manifest(root, 10)["files"])
    _corrupt(root, 10)
    assert _train(root, range(1, 11), every=5) == 5
    new_files = set(read_manifest(root, 10)["files"])
    assert not old_files & new_files
    data = {p.name for p in (root / "step-000000010" / "data").iterdir()}
    assert data == {Path(f).name for f in new_files if f.startswith("data/")}


def test_function_save_over_a_committed_step_says_what_to_do(tmp_path: Path) -> None:
    ckpt.save(_state(1.0), tmp_path, step=3)
    with pytest.raises(ckpt.CheckpointError, match="already committed"):
        ckpt.save(_state(2.0), tmp_path, step=3)


class _UnreadableStep(LocalBackend):
    """A local root whose step ``bad`` answers every data read with an I/O error."""

    def __init__(self, root: Path, bad: int, *, retryable: bool) -> None:
        super().__init__(root)
        self.bad_prefix = f"step-{bad:09d}/data/"
        self.retryable = retryable
        self.failed_reads = 0

    def _check(self, path: str) -> None:
        if path.startswith(self.bad_prefix):
            self.failed_reads += 1
            raise StorageBackendError(
                f"reading {path!r} failed: Input/output error", path=path, retryable=self.retryable
            )

    def read_into(self, path: str, offset: int, out: Any) -> None:
        self._check(path)
        super().read_into(path, offset, out)

    def open_reader(self, path: str) -> BlobReader:  # the loader's ranged reads
        self._check(path)
        return super().open_reader(path)


@pytest.mark.parametrize("retryable", [True, False])
def test_unreadable_newest_step_falls_back_and_says_why(
    tmp_path: Path, retryable: bool, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt.save(_state(1.0), tmp_path, step=1)
    ckpt.save(_state(2.0), tmp_path, step=2)
    backend = _UnreadableStep(tmp_path, 2, retryable=retryable)
    state = _state(0.0)
    with caplog.at_level(logging.WARNING):
        report = ckpt.restore(state, backend)
    assert report.step == 1
    assert [s for s, _ in report.skipped] == [2]
    assert "Input/output error" in report.skipped[0][1]
    assert "skipping checkpoint step 2" in caplog.text
    assert backend.failed_reads >= (3 if retryable else 1)  # transient errors are retried
    assert_bit_identical(state["w"], torch.full((256,), 1.0))


def test_unreadable_step_asked_for_by_number_raises(tmp_path: Path) -> None:
    ckpt.save(_state(1.0), tmp_path, step=1)
    backend = _UnreadableStep(tmp_path, 1, retryable=False)
    with pytest.raises(ckpt.StorageError, match="Input/output error"):
        ckpt.load(_state(0.0), backend, step=1)


def test_nothing_restorable_names_every_step(tmp_path: Path) -> None:
    ckpt.save(_state(1.0), tmp_path, step=1)
    _corrupt(tmp_path, 1)
    with pytest.raises(ckpt.CorruptCheckpointError, match="step 1"):
        ckpt.load(_state(0.0), tmp_path)


def _restore_with_one_rank_damaged(rank: int, world: int, root: str) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))

    def sharded(value: float) -> Any:
        return distribute_tensor(torch.full((64,), value), mesh, [Shard(0)])

    mgr = ckpt.CheckpointManager(root, every_steps=1, keep_last=10)
    try:
        for step in (1, 2):
            mgr.save(step, {"w": sharded(float(step))}, blocking=True)
    finally:
        mgr.close()
    torch.distributed.barrier()
    if rank == 0:
        # Damage only the bytes rank 1 reads: rank 0 alone would happily load step 2.
        for piece in read_manifest(Path(root), 2)["tensors"]["w"]["pieces"]:
            if piece["offsets"] == [32]:
                flip_byte(data_file(Path(root), 2, piece["file"]), piece["byte_offset"])
    torch.distributed.barrier()
    target = {"w": sharded(0.0)}
    mgr = ckpt.CheckpointManager(root, every_steps=1, keep_last=10)
    try:
        restored = mgr.restore(target)
    finally:
        mgr.close()
    return {"step": restored, "w": target["w"].to_local().tolist()}


def test_every_rank_restores_the_same_step(tmp_path: Path) -> None:
    results = run_ranks(_restore_with_one_rank_damaged, 2, str(tmp_path / "ckpts"))
    assert [r["step"] for r in results] == [1, 1]
    assert [r["w"] for r in results] == [[1.0] * 32, [1.0] * 32]


def test_demo_refuses_a_directory_it_did_not_create(tmp_path: Path) -> None:
    from ckpt.demo import run_demo

    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    with pytest.raises(ckpt.CheckpointError, match="not created by `ckpt demo`"):
        run_demo(str(tmp_path))
    assert precious.read_text() == "keep me"


def _save_refused_on_one_rank(rank: int, world: int, root: str) -> str:
    value = torch.ones(4).to_sparse() if rank == 1 else torch.ones(4)
    try:
        ckpt.save({"w": value}, root, step=1)
    except ckpt.InvalidStateError as exc:
        return str(exc)
    return "saved"


def test_a_state_refused_on_one_rank_fails_every_rank_at_once(tmp_path: Path) -> None:
    results = run_ranks(_save_refused_on_one_rank, 2, str(tmp_path), timeout_s=30)
    assert "rank 1 refused the state" in results[0]
    assert "sparse" in results[1]
    assert not (tmp_path / "step-000000001").exists()


@pytest.mark.campaign
def test_campaign_damaged_newest_step_never_traps_the_loop(
    tmp_path: Path, full: bool, campaign_table: CampaignTable
) -> None:
    """Random damage to the newest step (a flipped data byte, a flipped manifest byte, a
    deleted or truncated data file), then two incarnations of the README loop: the first
    restores an older step and saves the damaged step number again, the second restores it."""
    import random

    trials = 60 if full else 6
    rng = random.Random(10)
    trapped = wrong = 0
    for trial in range(trials):
        root = tmp_path / f"t{trial}"
        _train(root, range(1, 11), every=5)
        piece = piece_of(root, 10, "w")
        data = data_file(root, 10, piece["file"])
        damage = rng.choice(["data byte", "manifest byte", "data file deleted", "truncated"])
        if damage == "data byte":
            flip_byte(data, piece["byte_offset"] + rng.randrange(piece["byte_length"]))
        elif damage == "manifest byte":
            manifest = root / "step-000000010" / "manifest.json"
            flip_byte(manifest, rng.randrange(manifest.stat().st_size))
        elif damage == "data file deleted":
            data.unlink()
        else:
            data.chmod(0o644)
            data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
        try:
            first = _train(root, range(1, 11), every=5)
            second = _train(root, range(1, 11), every=5)
        except ckpt.CheckpointError:
            trapped += 1
            continue
        state = _state(-1.0)
        if (
            (first, second) != (5, 10)
            or ckpt.load(state, root) != 10
            or not torch.equal(state["w"], torch.full((256,), 10.0))
        ):
            wrong += 1
    campaign_table.record(
        "damaged newest step, README loop restarted twice",
        trials=trials,
        trapped=trapped,
        wrong_restore=wrong,
    )
    assert trapped == 0 and wrong == 0


def _restore_with_a_mismatch_on_one_rank(rank: int, world: int, root: str) -> str:
    mgr = ckpt.CheckpointManager(root, every_steps=1, keep_last=10)
    try:
        mgr.save(1, {"w": torch.ones(4)}, blocking=True)
        target = {"w": torch.zeros(4)}
        if rank == 1:
            target["not_saved"] = torch.zeros(2)  # strict: a key the checkpoint lacks
        try:
            mgr.restore(target)
        except ckpt.StateMismatchError as exc:
            return f"mismatch: {exc}"
        return "restored"
    finally:
        mgr.close()


def test_a_state_mismatch_on_one_rank_stops_every_rank(tmp_path: Path) -> None:
    results = run_ranks(_restore_with_a_mismatch_on_one_rank, 2, str(tmp_path), timeout_s=30)
    assert results[0].startswith("mismatch: step 1 does not fit the state on rank 1"), results
    assert results[1].startswith("mismatch:") and "not_saved" in results[1], results
