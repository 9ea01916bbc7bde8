"""Runs inside a private mount namespace on a tiny tmpfs; reports what it saw as JSON.

``test_disk_full.py`` starts this as ``python -m tests.support.workers.enospc SCENARIO
MOUNTPOINT`` under
``unshare -m`` after mounting an 8 MiB tmpfs at MOUNTPOINT, then asserts on the facts
printed on the last line of stdout. Only this process sees the tmpfs, so every look at
the files has to happen here.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

MiB = 1 << 20


def _files(mount: str) -> list[str]:
    """Every file under ``mount`` (hidden temp files included), relative and sorted."""
    return sorted(
        os.path.relpath(os.path.join(d, n), mount)
        for d, _dirs, names in os.walk(mount)
        for n in names
    )


def _error_facts(exc: BaseException) -> dict[str, Any]:
    chain = []
    cause: BaseException | None = exc
    while cause is not None:
        chain.append(type(cause).__name__)
        cause = cause.__cause__
    return {
        "type": type(exc).__name__,
        "cause_chain": chain,
        "retryable": getattr(exc, "retryable", None),
        "path": getattr(exc, "path", None),
        "message": str(exc),
    }


def stream_scenario(mount: str) -> dict[str, Any]:
    """Overfill the disk through a stream, a whole-object write and ``put_if_absent``."""
    from storage_backends import LocalBackend, StorageBackendError

    backend = LocalBackend(mount)
    facts: dict[str, Any] = {}
    chunk = os.urandom(MiB)

    stream = backend.open_stream("step-1/data/big")
    facts["stream_error"] = None
    try:
        for _ in range(12):
            stream.write(chunk)
        stream.commit()
    except StorageBackendError as exc:
        facts["stream_error"] = _error_facts(exc)
    stream.abort()  # must be harmless after the failure
    facts["after_stream"] = {"files": _files(mount), "objects": backend.list_objects()}

    backend.write("step-1/manifest", b"old")
    facts["write_error"] = None
    try:
        backend.write("step-1/manifest", chunk * 10)
    except StorageBackendError as exc:
        facts["write_error"] = _error_facts(exc)
    facts["after_write"] = {
        "files": _files(mount),
        "old": backend.read("step-1/manifest").decode(),
    }

    facts["put_error"] = None
    try:
        backend.put_if_absent("step-2/manifest", bytes(10 * MiB))
    except StorageBackendError as exc:
        facts["put_error"] = _error_facts(exc)
    facts["after_put"] = {"files": _files(mount), "exists": backend.exists("step-2/manifest")}

    # Nothing leaked: three quarters of the disk can be filled again.
    backend.write("refill", bytes(6 * MiB))
    facts["refill_size"] = backend.size("refill")
    return facts


def ckpt_scenario(mount: str) -> dict[str, Any]:
    """Commit a small step, then save a state bigger than the disk and restore the first."""
    import torch

    import ckpt

    gen = torch.Generator().manual_seed(0)
    first: dict[str, Any] = {
        "w": torch.randn(64, 256, generator=gen),
        "ids": torch.randint(0, 1 << 40, (1000,), generator=gen),
        "step": 1,
        "note": {"lr": [0.1, 0.2]},
    }
    ckpt.save(first, mount, step=1)
    facts: dict[str, Any] = {"files_after_first": _files(mount)}

    big = {**first, "w": torch.randn(3 * MiB, generator=gen)}  # 12 MiB of float32
    facts["save_error"] = None
    try:
        ckpt.save(big, mount, step=2)
    except Exception as exc:
        facts["save_error"] = _error_facts(exc)

    target: dict[str, Any] = {
        "w": torch.zeros(64, 256),
        "ids": torch.zeros(1000, dtype=torch.int64),
        "step": 0,
        "note": {},
    }
    facts["loaded_step"] = ckpt.load(target, mount)
    facts["bit_identical"] = all(
        target[k].dtype == first[k].dtype
        and target[k].numpy().tobytes() == first[k].numpy().tobytes()
        for k in ("w", "ids")
    )
    facts["plain_values"] = [target["step"], target["note"]]
    try:
        ckpt.load(target, mount, step=2)
        facts["step2_load"] = "loaded"
    except ckpt.CheckpointError as exc:
        facts["step2_load"] = type(exc).__name__
    return facts


if __name__ == "__main__":
    scenario, mountpoint = sys.argv[1], sys.argv[2]
    result = {"stream": stream_scenario, "ckpt": ckpt_scenario}[scenario](mountpoint)
    print(json.dumps(result))
