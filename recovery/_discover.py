"""Choosing what to restore: committed steps, newest first, validated before use."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

from ckpt._format import Manifest, read_manifest, scan_steps, step_prefix
from ckpt.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    storage_errors,
)
from storage_backends import BlobNotFoundError, StorageBackend

log = logging.getLogger(__name__)


def committed_steps(backend: StorageBackend) -> list[int]:
    """Committed steps under the backend's root, newest first (storage is the source of truth)."""
    with storage_errors(f"listing checkpoints under {backend.url}"):
        return sorted(scan_steps(backend).committed, reverse=True)


def validate_files(backend: StorageBackend, manifest: Manifest) -> None:
    """Every data file the manifest names exists with the size it records.

    Raises:
        CorruptCheckpointError: naming the first missing or wrongly sized file.
    """
    prefix = step_prefix(manifest.step)
    for path, size in sorted(manifest.files.items()):
        full = f"{prefix}/{path}"
        try:
            with storage_errors(f"checking {backend.url}/{full}"):
                actual = backend.size(full)
        except CheckpointNotFoundError as exc:
            raise CorruptCheckpointError(
                f"step {manifest.step}: data file {backend.url}/{full} is missing"
            ) from exc.__cause__
        if actual != size:
            raise CorruptCheckpointError(
                f"step {manifest.step}: data file {backend.url}/{full} has {actual} bytes, "
                f"the manifest says {size}: the file is truncated or was replaced"
            )


@dataclass(frozen=True)
class Candidate:
    """A committed step considered for restore: its manifest, or why it cannot be used."""

    step: int
    manifest: Manifest | None
    error: CheckpointError | None


def candidates(backend: StorageBackend, step: int | None = None) -> Iterator[Candidate]:
    """Committed steps to try, newest first (only ``step`` when given), each validated.

    Raises:
        CheckpointNotFoundError: ``step`` is given and not committed.
    """
    if step is not None:
        try:
            manifest = read_manifest(backend, step)
        except CheckpointNotFoundError as exc:
            raise CheckpointNotFoundError(f"step {step} is not a committed checkpoint under {backend.url}") from exc
        validate_files(backend, manifest)
        yield Candidate(step, manifest, None)
        return
    for found in committed_steps(backend):
        try:
            manifest = read_manifest(backend, found)
            validate_files(backend, manifest)
        except (CorruptCheckpointError, CheckpointNotFoundError) as exc:
            yield Candidate(found, None, exc)
            continue
        except BlobNotFoundError as exc:  # deleted between listing and reading
            yield Candidate(found, None, CheckpointNotFoundError(str(exc)))
            continue
        yield Candidate(found, manifest, None)
