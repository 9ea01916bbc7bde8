"""``verify_checkpoint`` reports its progress in bytes, ending at the total it read."""

from __future__ import annotations

from pathlib import Path

import torch

import ckpt
from ckpt.format import read_manifest
from recovery import LoadOptions, verify_checkpoint
from storage_backends import LocalBackend


def test_verify_reports_bytes_done_up_to_the_total(root: Path) -> None:
    state = {f"t{i}": torch.randn(70_000) for i in range(6)}
    ckpt.save(state, root, step=1)
    backend = LocalBackend(root)
    seen: list[tuple[int, int]] = []
    stats = verify_checkpoint(
        backend,
        read_manifest(backend, 1),
        LoadOptions(max_request_bytes=1 << 20),
        progress=lambda done, total: seen.append((done, total)),
    )
    assert len(seen) > 1
    done = [d for d, _ in seen]
    assert done == sorted(done) and len(set(done)) == len(done)
    assert {t for _, t in seen} == {stats.bytes_read} and done[-1] == stats.bytes_read
