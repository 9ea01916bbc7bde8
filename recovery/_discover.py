"""Choosing what to restore: committed steps, newest first, validated before use."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

from ckpt.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    storage_errors,
)
from ckpt.format import Manifest, read_manifest, scan_steps, step_prefix
from storage_backends import BlobNotFoundError, StorageBackend, as_tiered

log = logging.getLogger(__name__)


def committed_steps(backend: StorageBackend) -> list[int]:
    """Committed steps under the backend's root, newest first (storage is the source of truth)."""
    with storage_errors(f"listing checkpoints under {backend.url}"):
        return sorted(scan_steps(backend).committed, reverse=True)


_SIZES_CHECKED = 256  # above this many files, one listing checks that they exist


def validate_files(backend: StorageBackend, manifest: Manifest) -> None:
    """Every data file the manifest names exists with the size it records.

    A step of more than a few hundred files (thousands of ranks) is checked with one
    listing of its prefix instead of a request per file: every restoring rank does this,
    and a file that is short fails its read anyway (its chunks are verified).

    Raises:
        CorruptCheckpointError: naming the first missing or wrongly sized file.
    """
    prefix = step_prefix(manifest.step)
    if len(manifest.files) > _SIZES_CHECKED:
        with storage_errors(f"listing {backend.url}/{prefix}"):
            present = set(backend.list_objects(prefix))
        missing = sorted(p for p in manifest.files if f"{prefix}/{p}" not in present)
        if missing:
            raise CorruptCheckpointError(
                f"step {manifest.step}: data file {backend.url}/{prefix}/{missing[0]} is "
                f"missing ({len(missing)} of {len(manifest.files)} files)"
            )
        return
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
    """A committed step considered for restore: its manifest, or why it cannot be used.

    Attributes:
        backend: where to read it from (one tier of a tiered backend, else the backend).
    """

    step: int
    manifest: Manifest | None
    error: CheckpointError | None
    backend: StorageBackend


def _examine(tier: StorageBackend, step: int) -> Candidate:
    try:
        manifest = read_manifest(tier, step, pieces=False)  # pieces: only what a load needs
        validate_files(tier, manifest)
    except (CorruptCheckpointError, CheckpointNotFoundError) as exc:
        return Candidate(step, None, exc, tier)
    except BlobNotFoundError as exc:  # deleted between listing and reading
        return Candidate(step, None, CheckpointNotFoundError(str(exc)), tier)
    return Candidate(step, manifest, None, tier)


def candidates(backend: StorageBackend, step: int | None = None) -> Iterator[Candidate]:
    """Committed steps to try, newest first (only ``step`` when given), each validated.

    With a tiered backend every step is offered from each tier that holds it, the
    fast tier first, so a corrupt or lost local copy falls back to the remote copy of
    the same step before an older step.

    Raises:
        CheckpointNotFoundError: ``step`` is given and not committed.
        CorruptCheckpointError: ``step`` is given and fails validation in every tier.
    """
    tiers = as_tiered(backend).tiers
    if step is not None:
        holders = [t for t in tiers if step in committed_steps(t)] if len(tiers) > 1 else tiers
        found_any = False
        last_error: CheckpointError | None = None
        for tier in holders:
            candidate = _examine(tier, step)
            if candidate.manifest is None:
                if isinstance(candidate.error, CheckpointNotFoundError):
                    continue
                last_error = candidate.error
                continue
            found_any = True
            yield candidate
        if not found_any:
            if last_error is not None:
                raise last_error
            raise CheckpointNotFoundError(
                f"step {step} is not a committed checkpoint under {backend.url}"
            )
        return
    per_tier = [(tier, set(committed_steps(tier))) for tier in tiers]
    for found in sorted(set().union(*(steps for _, steps in per_tier)), reverse=True):
        for tier, steps in per_tier:
            if found in steps:
                yield _examine(tier, found)
