"""A real full disk: an 8 MiB tmpfs in a private mount namespace, no mocked ``ENOSPC``.

Each test runs ``tests/support/workers/enospc.py`` under ``unshare -m`` after mounting the tmpfs, so the
mount is invisible to (and cleaned up without) the rest of the machine. The tests are
skipped only where the kernel or the container does not let us create the namespace
or mount a tmpfs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import storage_backends

REPO_ROOT = Path(storage_backends.__file__).resolve().parent.parent
CHILD = "tests.support.workers.enospc"
# Mount the tmpfs at $1, then run the rest of the arguments as the child.
MOUNT_AND_RUN = 'mount -t tmpfs -o size=8m tmpfs "$1" && shift && exec "$@"'


@pytest.fixture(scope="module")
def can_mount_tmpfs(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Skips the module unless ``unshare -m`` + ``mount -t tmpfs`` are permitted here."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        pytest.skip("needs the unshare and mount commands (util-linux)")
    probe = tmp_path_factory.mktemp("probe")
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", MOUNT_AND_RUN, "sh", str(probe), "true"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if proc.returncode != 0:
        pytest.skip(
            "cannot mount a private tmpfs here (needs root or CAP_SYS_ADMIN): "
            + proc.stderr.strip()
        )


def run_on_full_disk(scenario: str, mountpoint: Path) -> dict[str, Any]:
    """Run one scenario of the child on a fresh 8 MiB tmpfs; return the facts it reported."""
    mountpoint.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    in_namespace = ["unshare", "-m", "sh", "-c", MOUNT_AND_RUN, "sh", str(mountpoint)]
    proc = subprocess.run(
        [*in_namespace, sys.executable, "-m", CHILD, scenario, str(mountpoint)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, (
        f"child failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    )
    assert list(mountpoint.iterdir()) == [], "the tmpfs leaked out of the private namespace"
    facts: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return facts


def assert_storage_full(error: dict[str, Any] | None, path: str) -> None:
    """The reported error is a non-retryable ``StorageFullError`` about ``path``."""
    assert error is not None, "overfilling the disk raised nothing"
    assert error["type"] == "StorageFullError", error
    assert error["retryable"] is False, error
    assert error["path"] == path, error
    assert "OSError" in error["cause_chain"], error


@pytest.mark.usefixtures("can_mount_tmpfs")
def test_backend_writes_on_full_disk(tmp_path: Path) -> None:
    """A stream, a whole-object write and a put_if_absent that overfill the disk raise
    ``StorageFullError`` (not retryable), leave no object and no temp file, keep the old
    object intact, and give every byte of space back."""
    facts = run_on_full_disk("stream", tmp_path / "mnt")

    assert_storage_full(facts["stream_error"], "step-1/data/big")
    assert facts["after_stream"] == {"files": [], "objects": []}

    assert_storage_full(facts["write_error"], "step-1/manifest")
    assert facts["after_write"] == {"files": ["step-1/manifest"], "old": "old"}

    assert_storage_full(facts["put_error"], "step-2/manifest")
    assert facts["after_put"] == {"files": ["step-1/manifest"], "exists": False}

    assert facts["refill_size"] == 6 << 20


@pytest.mark.usefixtures("can_mount_tmpfs")
def test_checkpoint_save_on_full_disk(tmp_path: Path) -> None:
    """``ckpt.save`` of a state bigger than the free space fails with a storage-full error
    (directly, or as the cause of ``SaveAbortedError``), the failed step is not visible,
    and the step committed before loads back bit for bit."""
    facts = run_on_full_disk("ckpt", tmp_path / "mnt")

    assert any(name.endswith(".safetensors") for name in facts["files_after_first"])
    error = facts["save_error"]
    assert error is not None, "saving 12 MiB onto an 8 MiB disk raised nothing"
    chain = error["cause_chain"]
    assert chain[0] in ("StorageFullCheckpointError", "SaveAbortedError"), error
    assert "StorageFullCheckpointError" in chain, error
    assert "StorageFullError" in chain, error

    assert facts["loaded_step"] == 1
    assert facts["bit_identical"] is True
    assert facts["plain_values"] == [1, {"lr": [0.1, 0.2]}]
    assert facts["step2_load"] == "CheckpointNotFoundError"
