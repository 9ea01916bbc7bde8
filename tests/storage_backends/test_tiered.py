"""Tiered storage: local commit first, remote replication with the commit object last,
reads that fall back per tier, and per-tier retention that never drops unreplicated steps."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import ckpt
from ckpt.format import manifest_path, scan_steps
from storage_backends import BlobStream, BytesLike, LocalBackend, StorageBackendError, TieredBackend


class _GatedRemote(LocalBackend):
    """A remote tier whose writes wait for a gate and that records the order of publications."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gate = threading.Event()
        self.gate.set()
        self.order: list[str] = []
        self.fail = False

    # LocalBackend.open_stream declares its private stream class; this returns the same.
    def open_stream(self, path: str) -> BlobStream:  # type: ignore[override]
        if not self.gate.wait(timeout=30):
            raise StorageBackendError("gate never opened", path=path, retryable=True)
        if self.fail:
            raise StorageBackendError("remote down", path=path, retryable=True)
        self.order.append(path)
        return super().open_stream(path)

    def put_if_absent(self, path: str, data: BytesLike) -> bool:
        self.order.append(path)
        return super().put_if_absent(path, data)


Tiers = tuple[LocalBackend, _GatedRemote, TieredBackend]


@pytest.fixture
def tiers(tmp_path: Path) -> Iterator[tuple[LocalBackend, _GatedRemote, TieredBackend]]:
    local = LocalBackend(tmp_path / "local")
    remote = _GatedRemote(tmp_path / "remote")
    tiered = TieredBackend(local, remote)
    yield local, remote, tiered
    remote.gate.set()
    tiered.close()


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(256, 64, generator=g), "b": torch.randn(64, generator=g)}


def test_commit_is_local_first_and_remote_gets_the_manifest_last(tiers: Tiers) -> None:
    """A save commits locally while the remote is held; replication then writes every data
    file before the manifest, so the remote never shows a manifest without its data."""
    local, remote, tiered = tiers
    remote.gate.clear()
    ckpt.save(_state(1), tiered, step=1)
    assert scan_steps(local).committed == (1,)
    assert scan_steps(remote).committed == ()
    assert tiered.unreplicated() == ["step-000000001"]
    remote.gate.set()
    tiered.wait_replicated(timeout=30)
    assert scan_steps(remote).committed == (1,)
    assert remote.order[-1] == manifest_path(1)
    # Data files, then the index file naming them (format v2), then the manifest.
    assert all(
        p.startswith(("step-000000001/data/", "step-000000001/index/")) for p in remote.order[:-1]
    )
    assert tiered.unreplicated() == []


def test_losing_the_local_disk_loses_nothing_that_reached_the_remote(
    tiers: Tiers, tmp_path: Path
) -> None:
    """After the local tier is wiped, restore reads the replicated step from the remote tier."""
    _local, _remote, tiered = tiers
    saved = _state(2)
    ckpt.save(saved, tiered, step=7)
    tiered.wait_replicated(timeout=30)
    shutil.rmtree(tmp_path / "local")
    fresh = TieredBackend(LocalBackend(tmp_path / "local"), LocalBackend(tmp_path / "remote"))
    target = {k: torch.zeros_like(v) for k, v in saved.items()}
    report = ckpt.restore(target, fresh)
    fresh.close()
    assert report.step == 7
    assert all(torch.equal(target[k], saved[k]) for k in saved)


def test_a_corrupt_local_copy_falls_back_to_the_remote_copy_of_the_same_step(tiers: Tiers) -> None:
    """Restore prefers the local tier, and a checksum failure there tries the remote copy of
    the same step before any older step."""
    local, _remote, tiered = tiers
    ckpt.save(_state(3), tiered, step=1)
    newest = _state(4)
    ckpt.save(newest, tiered, step=2)
    tiered.wait_replicated(timeout=30)
    data = next(p for p in local.list_objects("step-000000002/data"))
    path = local.root / data
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(raw))
    target = {k: torch.zeros_like(v) for k, v in newest.items()}
    report = ckpt.restore(target, tiered)
    assert report.step == 2
    assert len(report.skipped) == 1 and report.skipped[0][0] == 2
    assert all(torch.equal(target[k], newest[k]) for k in newest)


def test_per_tier_retention_keeps_unreplicated_steps_locally(tiers: Tiers) -> None:
    """keep_last_local trims the local tier, keep_last the remote one, and a step the remote
    has not received yet is never deleted locally."""
    local, remote, tiered = tiers
    state = _state(5)
    with ckpt.CheckpointManager(
        tiered, every_steps=1, keep_last=3, keep_last_local=1, if_busy="wait"
    ) as mgr:
        for step in range(1, 4):
            mgr.maybe_save(step, state)
            mgr.wait()
            tiered.wait_replicated(timeout=30)
        remote.gate.clear()
        mgr.maybe_save(4, state)
        mgr.wait()
        mgr.maybe_save(5, state)
        mgr.wait()
        # Steps 4 and 5 wait for the remote: both stay local although keep_last_local=1.
        assert {4, 5} <= set(scan_steps(local).committed)
        remote.gate.set()
        tiered.wait_replicated(timeout=30)
        mgr.maybe_save(6, state)
        mgr.wait()
    tiered.wait_replicated(timeout=30)
    assert scan_steps(local).committed[-1] == 6
    assert 6 in scan_steps(remote).committed
    assert len(scan_steps(remote).committed) <= 4


def test_failed_replication_is_reported_and_retried(tiers: Tiers) -> None:
    """A remote outage leaves the step local-only and listed as unreplicated; retry_failed
    replicates it once the remote is back."""
    _local, remote, tiered = tiers
    remote.fail = True
    ckpt.save(_state(6), tiered, step=1)
    with pytest.raises(StorageBackendError):
        tiered.wait_replicated(timeout=30)
    assert tiered.unreplicated() == ["step-000000001"]
    remote.fail = False
    for future in tiered.retry_failed():
        future.result(timeout=30)
    assert scan_steps(remote).committed == (1,)
    assert tiered.unreplicated() == []
