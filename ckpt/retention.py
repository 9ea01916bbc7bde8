"""Retention and garbage collection of checkpoints under one root.

Rules (I3): the newest committed step is never deleted, nor any file a committed
manifest references. A committed step is deleted manifest first, so that at no moment
does a manifest name a missing file. Step prefixes without a manifest that are older
than the newest committed step are abandoned saves and are removed.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass

from ckpt.errors import storage_errors
from ckpt.format import INDEX_DIR, MANIFEST_NAME, Manifest, manifest_path, scan_steps, step_prefix
from storage_backends import StorageBackend, as_tiered

__all__ = [
    "GcPlan",
    "RetentionPolicy",
    "apply_retention",
    "plan_gc",
    "remove_unreferenced",
    "retire_step",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetentionPolicy:
    """Which committed checkpoints to keep.

    Args:
        keep_last: the newest N committed steps (at least 1; None keeps all).
        keep_every: also keep every step that is a multiple of this (None: none).
    """

    keep_last: int | None = 3
    keep_every: int | None = None

    def __post_init__(self) -> None:
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError("keep_last must be at least 1 (the newest checkpoint is always kept)")
        if self.keep_every is not None and self.keep_every < 1:
            raise ValueError("keep_every must be a positive number of steps")


@dataclass(frozen=True)
class GcPlan:
    """Steps to delete: superseded committed ones and abandoned partial ones."""

    committed: tuple[int, ...]
    abandoned: tuple[int, ...]


def plan_gc(
    committed: Collection[int],
    uncommitted: Collection[int],
    policy: RetentionPolicy,
    *,
    protect: Collection[int] = (),
) -> GcPlan:
    newest = max(committed, default=None)
    ordered = sorted(committed, reverse=True)
    keep = set(ordered[: policy.keep_last] if policy.keep_last is not None else ordered)
    if newest is not None:
        keep.add(newest)
    if policy.keep_every:
        keep.update(s for s in committed if s % policy.keep_every == 0)
    keep.update(protect)
    drop = tuple(sorted(s for s in committed if s not in keep))
    abandoned = tuple(
        sorted(s for s in uncommitted if newest is not None and s < newest and s not in protect)
    )
    return GcPlan(drop, abandoned)


def apply_retention(
    backend: StorageBackend, policy: RetentionPolicy, *, protect: Collection[int] = ()
) -> GcPlan:
    """Delete what ``policy`` no longer keeps under ``backend``'s root; return what was deleted."""
    with storage_errors(f"listing checkpoints under {backend.url}"):
        listing = scan_steps(backend)
    plan = plan_gc(listing.committed, listing.uncommitted, policy, protect=protect)
    for step in plan.committed:
        with storage_errors(f"deleting step {step} under {backend.url}"):
            backend.delete([manifest_path(step)])
            backend.delete_prefix(step_prefix(step))
        log.info("retention: deleted committed step %d under %s", step, backend.url)
    for step in plan.abandoned:
        with storage_errors(f"deleting abandoned step {step} under {backend.url}"):
            backend.delete_prefix(step_prefix(step))
        log.info("retention: deleted abandoned partial step %d under %s", step, backend.url)
    return plan


def remove_unreferenced(backend: StorageBackend, manifest: Manifest) -> list[str]:
    """Delete files in a committed step's prefix that its manifest does not name
    (leftovers of an aborted attempt at the same step by another generation)."""
    prefix = step_prefix(manifest.step)
    with storage_errors(f"listing {prefix} under {backend.url}"):
        present = backend.list_objects(prefix)
    keep = {f"{prefix}/{path}" for path in manifest.files} | {f"{prefix}/{MANIFEST_NAME}"}
    stale = [p for p in present if p not in keep and not p.startswith(f"{prefix}/{INDEX_DIR}/")]
    with storage_errors(f"deleting stale files in {prefix} under {backend.url}"):
        if stale:
            backend.delete(stale)
        # Nobody may write into a committed step any more: unfinished writes there are dead.
        unfinished = backend.abort_unfinished(prefix)
    if stale or unfinished:
        log.info(
            "committed step %d: removed %d stale files and %d unfinished writes",
            manifest.step,
            len(stale),
            unfinished,
        )
    return stale


def retire_step(backend: StorageBackend, step: int) -> None:
    """Un-commit ``step``: delete its manifest on every tier, leaving its files as an
    abandoned attempt that the next commit of the step (or gc) removes."""
    for tier in as_tiered(backend).tiers:
        with storage_errors(f"retiring step {step} under {tier.url}"):
            tier.delete([manifest_path(step)])
