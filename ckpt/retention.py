"""Retention and garbage collection of checkpoints under one root.

Rules (I3):

* Only committed steps that validate count toward ``keep_last``: the manifest reads and
  passes its checks, and every file it names exists with its recorded size (the checks
  restore's discovery makes; no data bytes are read). The window runs from the newest
  committed step down to the ``keep_last``-th valid one, so the newest valid step is
  never deleted. A committed step that fails validation is reported (a WARNING and
  ``GcPlan.invalid``) and treated like any other step by its place: inside the window
  it is kept (newer than the newest valid step it stays for inspection, and until the
  job saves that step number again), outside the window it is deleted. With no valid
  step at all, nothing committed is deleted.
* A committed step is deleted manifest first, so that at no moment does a manifest
  name a missing file.
* A step prefix without a manifest that is older than the newest committed step is an
  abandoned save only once nothing in it was written for ``abandoned_after`` seconds (a
  save in flight of any step, by this job or another one, keeps writing into it). One
  that is committed while it is being deleted is checked again, and its manifest is
  removed when it no longer validates.
* Files in a committed step that its manifest does not name (left by a crashed or losing
  attempt at the same step) are removed by ``ckpt gc`` (``remove_stale``) once they are
  that old too; the manager removes them right after its own commit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from ckpt.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    StorageError,
    storage_errors,
)
from ckpt.format import (
    INDEX_DIR,
    MANIFEST_NAME,
    Manifest,
    manifest_path,
    read_manifest,
    scan_steps,
    step_prefix,
)
from recovery import validate_files
from storage_backends import StorageBackend, as_tiered

__all__ = [
    "DEFAULT_ABANDONED_AFTER_S",
    "GcPlan",
    "RetentionPolicy",
    "apply_retention",
    "plan_gc",
    "remove_unreferenced",
    "retire_step",
    "unreferenced_files",
]

log = logging.getLogger(__name__)

DEFAULT_ABANDONED_AFTER_S = 3600.0


@dataclass(frozen=True)
class RetentionPolicy:
    """Which committed checkpoints to keep, and when a partial one is abandoned.

    Args:
        keep_last: the newest N committed steps that validate (at least 1; None keeps all).
        keep_every: also keep every step that is a multiple of this (None: none).
        abandoned_after: seconds without a write after which a step without a manifest
            (or a file no manifest names) is garbage; until then a writer may still use it.
    """

    keep_last: int | None = 3
    keep_every: int | None = None
    abandoned_after: float = DEFAULT_ABANDONED_AFTER_S

    def __post_init__(self) -> None:
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError("keep_last must be at least 1 (the newest checkpoint is always kept)")
        if self.keep_every is not None and self.keep_every < 1:
            raise ValueError("keep_every must be a positive number of steps")
        if self.abandoned_after < 0:
            raise ValueError("abandoned_after must be a number of seconds, 0 or more")


@dataclass(frozen=True)
class GcPlan:
    """What retention deleted (or, in a dry run, would delete), and what it found.

    Attributes:
        committed: committed steps outside the window.
        abandoned: steps without a manifest, older than the newest committed one, in
            which nothing was written for ``abandoned_after`` seconds.
        invalid: committed steps found failing validation (not counted toward
            ``keep_last``; also in ``committed`` when deleted).
        in_use: steps without a manifest kept because they were written to recently.
        stale_files: files no manifest names, removed from committed steps.
    """

    committed: tuple[int, ...]
    abandoned: tuple[int, ...]
    invalid: tuple[int, ...] = ()
    in_use: tuple[int, ...] = ()
    stale_files: tuple[str, ...] = ()


def plan_gc(
    committed: Collection[int],
    uncommitted: Collection[int],
    policy: RetentionPolicy,
    *,
    protect: Collection[int] = (),
    is_valid: Callable[[int], bool] | None = None,
    is_idle: Callable[[int], bool] | None = None,
) -> GcPlan:
    """Decide what to delete.

    Args:
        committed / uncommitted: the step prefixes with and without a manifest.
        protect: steps never deleted (e.g. not yet replicated to the durable tier).
        is_valid: whether a committed step validates; asked only for the steps of the
            window, newest first (None: every step is valid).
        is_idle: whether nothing was written under an uncommitted step for the lease;
            asked only for candidates (None: every one is idle).
    """
    keep = set(protect)
    invalid: list[int] = []
    ordered = sorted(committed, reverse=True)
    if policy.keep_last is None:
        keep.update(ordered)  # keeps all: no need to tell valid from invalid
    else:
        valid_kept = 0
        for step in ordered:
            if valid_kept >= policy.keep_last:
                break  # the rest is outside the window
            keep.add(step)
            if is_valid is None or is_valid(step):
                valid_kept += 1
            else:
                invalid.append(step)
    if policy.keep_every:
        keep.update(s for s in committed if s % policy.keep_every == 0)
    drop = tuple(sorted(s for s in committed if s not in keep))
    newest = ordered[0] if ordered else None
    abandoned: list[int] = []
    in_use: list[int] = []
    for step in sorted(uncommitted):
        if newest is None or step >= newest or step in protect:
            continue
        (abandoned if is_idle is None or is_idle(step) else in_use).append(step)
    return GcPlan(drop, tuple(abandoned), tuple(sorted(invalid)), tuple(in_use))


@dataclass(frozen=True)
class _Examined:
    """A committed step as retention sees it: its manifest when it reads, and why it is
    not valid (None when it is)."""

    manifest: Manifest | None
    error: CheckpointError | None


def _examine(backend: StorageBackend, step: int) -> _Examined:
    """Read and validate ``step``'s manifest and check its files' sizes (no data bytes).
    Storage failures propagate: retention never deletes on a guess."""
    try:
        manifest = read_manifest(backend, step, pieces=False)  # files are checked below
    except (CorruptCheckpointError, CheckpointNotFoundError) as exc:
        return _Examined(None, exc)
    try:
        validate_files(backend, manifest)
    except CorruptCheckpointError as exc:
        return _Examined(manifest, exc)
    return _Examined(manifest, None)


class _Pass:
    """One retention pass over one backend: validation and idleness, each asked once per step."""

    def __init__(self, backend: StorageBackend, policy: RetentionPolicy) -> None:
        self.backend = backend
        self.cutoff = time.time() - policy.abandoned_after
        self.examined: dict[int, _Examined] = {}

    def examine(self, step: int) -> _Examined:
        found = self.examined.get(step)
        if found is None:
            with storage_errors(f"validating step {step} under {self.backend.url}"):
                found = self.examined[step] = _examine(self.backend, step)
        return found

    def is_valid(self, step: int) -> bool:
        return self.examine(step).error is None

    def is_idle(self, step: int) -> bool:
        with storage_errors(f"checking writes under {step_prefix(step)} of {self.backend.url}"):
            written = self.backend.last_modified(step_prefix(step))
        return written is None or written <= self.cutoff


def apply_retention(
    backend: StorageBackend,
    policy: RetentionPolicy,
    *,
    protect: Collection[int] = (),
    remove_stale: bool = False,
    dry_run: bool = False,
    before_delete: Callable[[Sequence[int]], None] | None = None,
) -> GcPlan:
    """Delete what ``policy`` no longer keeps under ``backend``'s root.

    Args:
        protect: steps never deleted.
        before_delete: told the committed steps about to be deleted, before any is (a
            coordinator's index drops them first, so it never lists a deleted step).
        remove_stale: also remove files that no manifest names from the committed steps
            kept (what ``ckpt gc`` does; the manager does it after each commit).
        dry_run: delete nothing; return what would be deleted.

    Returns:
        What was deleted (would be, in a dry run) and what was found invalid or in use.
    """
    with storage_errors(f"listing checkpoints under {backend.url}"):
        listing = scan_steps(backend)
    gc = _Pass(backend, policy)
    plan = plan_gc(
        listing.committed,
        listing.uncommitted,
        policy,
        protect=protect,
        is_valid=gc.is_valid,
        is_idle=gc.is_idle,
    )
    kept: list[Manifest] = []
    if remove_stale:
        dropped = set(plan.committed)
        examined = (gc.examine(s) for s in listing.committed if s not in dropped)
        kept = [e.manifest for e in examined if e.manifest is not None]
    invalid = tuple(sorted(s for s, e in gc.examined.items() if e.error is not None))
    for step in invalid:
        log.warning(
            "retention: committed step %d under %s is not valid (%s); not counted toward "
            "keep_last, %s",
            step,
            backend.url,
            gc.examined[step].error,
            "deleted with the steps outside the window"
            if step in plan.committed
            else "kept for inspection",
        )
    for step in plan.in_use:
        log.info(
            "retention: partial step %d under %s was written to in the last %.0f s; kept "
            "(a save may be in flight)",
            step,
            backend.url,
            policy.abandoned_after,
        )
    lease = policy.abandoned_after
    if dry_run:
        stale = [p for m in kept for p in unreferenced_files(backend, m, older_than=lease)]
        return GcPlan(plan.committed, plan.abandoned, invalid, plan.in_use, tuple(stale))
    if plan.committed and before_delete is not None:
        before_delete(plan.committed)
    for step in plan.committed:
        with storage_errors(f"deleting step {step} under {backend.url}"):
            backend.delete([manifest_path(step)])
            backend.delete_prefix(step_prefix(step))
        log.info("retention: deleted committed step %d under %s", step, backend.url)
    for step in plan.abandoned:
        _delete_abandoned(backend, step)
    removed = [p for m in kept for p in remove_unreferenced(backend, m, older_than=lease)]
    return GcPlan(plan.committed, plan.abandoned, invalid, plan.in_use, tuple(removed))


def _delete_abandoned(backend: StorageBackend, step: int) -> None:
    prefix = step_prefix(step)
    try:
        with storage_errors(f"deleting abandoned step {step} under {backend.url}"):
            backend.delete_prefix(prefix)
    except StorageError as exc:
        # e.g. a directory that filled again while it was emptied: someone is writing there.
        log.warning("retention: could not delete partial step %d: %s", step, exc)
    else:
        log.info("retention: deleted abandoned partial step %d under %s", step, backend.url)
    # A save may have published this step while its files were being deleted. A manifest
    # that names deleted files must not stay (the committer checks too, after publishing).
    with storage_errors(f"checking {prefix} under {backend.url} after deleting it"):
        published = backend.exists(manifest_path(step))
    if not published:
        return
    examined = _examine(backend, step)
    if examined.error is None:
        log.warning(
            "retention: step %d under %s was committed while it was deleted as abandoned; "
            "it validates and is kept",
            step,
            backend.url,
        )
        return
    with storage_errors(f"deleting the manifest of step {step} under {backend.url}"):
        backend.delete([manifest_path(step)])
    log.error(
        "retention: step %d under %s was committed while it was deleted as abandoned (%s); its "
        "manifest was removed. Is another job or `ckpt gc --abandoned-after` too short using "
        "this root?",
        step,
        backend.url,
        examined.error,
    )


def unreferenced_files(
    backend: StorageBackend, manifest: Manifest, *, older_than: float = 0.0
) -> list[str]:
    """Files in a committed step's prefix that its manifest does not name (leftovers of an
    aborted attempt at the same step), written more than ``older_than`` seconds ago."""
    prefix = step_prefix(manifest.step)
    with storage_errors(f"listing {prefix} under {backend.url}"):
        present = backend.list_objects(prefix)
    keep = {f"{prefix}/{path}" for path in manifest.files} | {f"{prefix}/{MANIFEST_NAME}"}
    stale = [p for p in present if p not in keep and not p.startswith(f"{prefix}/{INDEX_DIR}/")]
    if older_than <= 0 or not stale:
        return stale
    cutoff = time.time() - older_than
    old = []
    with storage_errors(f"checking the age of stale files in {prefix} under {backend.url}"):
        for path in stale:
            written = backend.last_modified(path)
            if written is not None and written <= cutoff:
                old.append(path)
    return old


def remove_unreferenced(
    backend: StorageBackend, manifest: Manifest, *, older_than: float = 0.0
) -> list[str]:
    """Delete files in a committed step's prefix that its manifest does not name, and
    unfinished writes there, written more than ``older_than`` seconds ago."""
    prefix = step_prefix(manifest.step)
    stale = unreferenced_files(backend, manifest, older_than=older_than)
    with storage_errors(f"deleting stale files in {prefix} under {backend.url}"):
        if stale:
            backend.delete(stale)
        # Nobody may write into a committed step any more: unfinished writes there are dead.
        unfinished = backend.abort_unfinished(prefix, older_than)
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
