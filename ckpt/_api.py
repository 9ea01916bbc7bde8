"""The function entry points: ``save``, ``async_save``, ``load``."""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar, cast

import torch
from tenacity import (
    RetryCallState,
    retry,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)
from torch import nn

from ckpt._foreign import dcp_message, find_dcp
from ckpt._metrics import record_restore, record_retry, record_save
from ckpt._open import open_url
from ckpt._unflatten import LoadPlan, module_names, plan_load
from ckpt.coordination import Coordinator, resolve_coordinator
from ckpt.engine import PendingSave, SaveOptions, SaveResult, ShardedTensor, default_snapshotter
from ckpt.engine._default import restored
from ckpt.engine._flatten import join_path
from ckpt.engine._spans import span
from ckpt.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    StateMismatchError,
    StorageError,
    storage_errors,
)
from ckpt.format import Manifest, SaveTimings
from recovery import Loader, LoadOptions, LoadStats, candidates, committed_steps
from storage_backends import RootNotFoundError, StorageBackend, as_tiered

log = logging.getLogger(__name__)


def async_save(
    state: Mapping[str, Any],
    url: str | os.PathLike[str] | StorageBackend,
    *,
    step: int,
    user_metadata: Mapping[str, Any] | None = None,
    coordinator: Coordinator | str | None = None,
    options: SaveOptions | None = None,
) -> PendingSave:
    """Snapshot ``state`` to host memory and write it in the background.

    Returns once every tensor is copied; training may then change them. At most one
    save is in flight per process: a second call waits for the first one's staging
    buffer. Call ``result()`` on the handle to wait for the commit.

    ``coordinator`` is None (embedded), a coordinator, or a ``redis://``/``rediss://``
    URL (a coordinator made from a URL is closed once the save has ended). ``options``
    sets this save's layout, e.g. ``SaveOptions(compression=Compression())``; every rank
    passes the same.

    Raises:
        CheckpointError: an earlier background save failed and nobody looked at it, or
            the state cannot be checkpointed.
    """
    return _start_save(
        state, open_url(url), step, user_metadata, coordinator, options, overlap_writes=False
    )


def _start_save(
    state: Mapping[str, Any],
    backend: StorageBackend,
    step: int,
    user_metadata: Mapping[str, Any] | None,
    coordinator: Coordinator | str | None,
    options: SaveOptions | None = None,
    *,
    overlap_writes: bool,
) -> PendingSave:
    """Start a save with the default engine; a coordinator made here from ``coordinator``
    (a Redis URL) is closed once the save has ended."""
    engine = default_snapshotter()
    engine.raise_unobserved()  # an earlier save's failure (counted when that save ended)
    made = resolve_coordinator(coordinator, backend.url)
    try:
        pending = record_save(
            backend,
            blocking=overlap_writes,
            start=lambda: engine.async_save(
                state,
                backend,
                step,
                made,
                user_metadata=user_metadata,
                overlap_writes=overlap_writes,
                options=options,
            ),
        )
    except BaseException:
        if made is not coordinator:
            made.close()
        raise
    if made is not coordinator:
        pending.add_done_callback(lambda _: made.close())
    return pending


def _blocking_save(
    state: Mapping[str, Any],
    url: str | os.PathLike[str] | StorageBackend,
    step: int,
    user_metadata: Mapping[str, Any] | None,
    coordinator: Coordinator | str | None,
    options: SaveOptions | None = None,
) -> SaveResult:
    pending = _start_save(
        state, open_url(url), step, user_metadata, coordinator, options, overlap_writes=True
    )
    return pending.result()


def save(
    state: Mapping[str, Any],
    url: str | os.PathLike[str] | StorageBackend,
    *,
    step: int,
    user_metadata: Mapping[str, Any] | None = None,
    coordinator: Coordinator | str | None = None,
    options: SaveOptions | None = None,
) -> SaveResult:
    """Save ``state`` as ``step`` and return once the checkpoint is committed.

    ``coordinator`` and ``options`` are as for ``async_save``.
    """
    # Nobody trains meanwhile: stream each file while the next one is staged.
    return _blocking_save(state, url, step, user_metadata, coordinator, options)


@dataclass(frozen=True)
class RestoreReport:
    """What a restore did.

    Attributes:
        step: the step loaded.
        skipped: newer committed steps that failed validation, with the reason.
        stats: bytes read, amplification and time of the tensor reads.
        missing: names in the state that the checkpoint lacks (kept as they were); only
            with ``strict=False``, which otherwise refuses them.
        unexpected: names in the checkpoint that the state lacks (not loaded); only with
            ``strict=False``.
        loaded_nothing: True when no tensor and no value of the checkpoint reached the
            state (logged at WARNING): the names do not match.
        timings: the loaded checkpoint's per-rank save timings, from its manifest; None
            when the manifest has none.
        discovery_seconds: the rest of the call: opening the storage, finding the step
            (listing, reading and validating manifests, steps skipped on the way) and, in
            a fresh process, the modules a first restore imports.
        planning_seconds: matching the state to the manifest and planning the reads.
        read_seconds: reading, verifying and copying tensor bytes into the state.
        apply_seconds: ``load_state_dict`` of modules, optimizers and other objects.
        manifest: the loaded step's manifest (its user metadata, layouts and timings).
    """

    step: int
    skipped: tuple[tuple[int, str], ...] = field(default_factory=tuple)
    stats: LoadStats | None = None
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    loaded_nothing: bool = False
    timings: SaveTimings | None = None
    discovery_seconds: float = 0.0
    planning_seconds: float = 0.0
    read_seconds: float = 0.0
    apply_seconds: float = 0.0
    manifest: Manifest | None = field(default=None, repr=False, compare=False)


def load(
    state: Mapping[str, Any],
    url: str | os.PathLike[str] | StorageBackend,
    *,
    step: int | None = None,
    strict: bool = True,
    options: LoadOptions | None = None,
    coordinator: Coordinator | str | None = None,
) -> int:
    """Load a committed checkpoint into ``state`` in place.

    Args:
        state: the same kind of dict that was saved; modules, optimizers and tensors
            are filled in place, plain values are replaced.
        url: the checkpoint root.
        step: the step to load; None loads the newest committed step that verifies,
            falling back to older ones when the newest is corrupt.
        strict: whether keys present on one side only are errors.
        options: reader settings.
        coordinator: None to load on this process alone; a coordinator of several ranks
            (or a ``redis://``/``rediss://`` URL) so that every rank loads the same step.

    Returns:
        The step loaded.

    Raises:
        CheckpointNotFoundError: no committed checkpoint (or not ``step``).
        CorruptCheckpointError: ``step`` was given and fails verification, or every
            committed step does.
        StateMismatchError: the state does not match the checkpoint.
    """
    return restore(
        state, url, step=step, strict=strict, options=options, coordinator=coordinator
    ).step


def restore(
    state: Mapping[str, Any],
    url: str | os.PathLike[str] | StorageBackend,
    *,
    step: int | None = None,
    strict: bool = True,
    options: LoadOptions | None = None,
    coordinator: Coordinator | str | None = None,
) -> RestoreReport:
    """``load`` that reports which steps it skipped and what it read.

    ``coordinator`` is None (this process alone), a coordinator, or a ``redis://`` /
    ``rediss://`` URL (the coordinator made from it is closed before returning).
    Nothing is created: a root that does not exist is ``CheckpointNotFoundError``. The
    next ``async_save``/``save`` of this process reuses the restored step's write plan
    when every rank describes exactly what its ranks did (no exchange of every rank's
    pieces: at thousands of ranks, seconds); ``CheckpointManager`` does the same.
    """
    began = time.perf_counter()
    backend = open_url(url, create=False)
    with span("ckpt.restore"):
        if not isinstance(coordinator, str):
            report = _restore(
                state, backend, step=step, strict=strict, options=options, coordinator=coordinator
            )
        else:
            made = resolve_coordinator(coordinator, backend.url)
            try:
                report = _restore(
                    state, backend, step=step, strict=strict, options=options, coordinator=made
                )
            finally:
                made.close()
    elapsed = time.perf_counter() - began
    if report.manifest is not None:
        restored(report.manifest)  # a module-level save next may reuse its write plan
    record_restore(backend, elapsed, len(report.skipped))
    # Discovery is the rest of the call: opening the storage, finding the step, and what
    # a first restore in a process imports on the way.
    measured = report.planning_seconds + report.read_seconds + report.apply_seconds
    return replace(report, discovery_seconds=max(0.0, elapsed - measured))


def _restore(
    state: Mapping[str, Any],
    url: str | os.PathLike[str] | StorageBackend,
    *,
    step: int | None = None,
    strict: bool = True,
    options: LoadOptions | None = None,
    coordinator: Coordinator | None = None,
) -> RestoreReport:
    """``load`` that reports which steps it skipped and what it read."""

    def fill(tier: StorageBackend, manifest: Manifest) -> tuple[_Loaded, Manifest]:
        return load_manifest(state, tier, manifest, strict=strict, options=options), manifest

    began = time.perf_counter()
    found, skipped, (loaded, manifest) = first_loadable(
        open_url(url, create=False), step, fill, coordinator=coordinator
    )
    elapsed = time.perf_counter() - began
    planning = loaded.match_seconds + loaded.stats.planning_seconds
    reads = loaded.stats.read_seconds
    discovery = max(0.0, elapsed - planning - reads - loaded.apply_seconds)
    log.debug(
        "restored step %d: discovery %.3f s, planning %.3f s, reads %.3f s, apply %.3f s",
        found,
        discovery,
        planning,
        reads,
        loaded.apply_seconds,
    )
    return RestoreReport(
        found,
        skipped,
        loaded.stats,
        tuple(loaded.plan.missing),
        tuple(loaded.plan.unexpected),
        loaded.plan.loads_nothing,
        manifest.timings,
        discovery,
        planning,
        reads,
        loaded.apply_seconds,
        manifest,
    )


T = TypeVar("T")


def first_loadable(
    backend: StorageBackend,
    step: int | None,
    load_one: Callable[[StorageBackend, Manifest], T],
    *,
    coordinator: Coordinator | None = None,
) -> tuple[int, tuple[tuple[int, str], ...], T]:
    """Run ``load_one`` on ``step``, or on the newest committed step it succeeds on.

    A step that fails verification or cannot be read (after the retries a transient
    storage error deserves) is skipped, logged, and the next older one is tried; any
    other ``CheckpointError`` of ``load_one`` (the state does not fit) is raised, since
    no older step would do better. With a ``coordinator`` of several ranks, every rank
    settles on the same step: a step that fails on any rank is skipped on all of them.

    Returns:
        (the step, the newer steps skipped with the reason, what ``load_one`` returned).

    Raises:
        CheckpointNotFoundError: nothing committed (naming a DCP checkpoint found there
            and the command that imports it), or ``step`` is not committed.
        CorruptCheckpointError: ``step`` was given and fails verification, or every
            committed step does.
    """
    group = coordinator if coordinator is not None and coordinator.world_size > 1 else None
    root_missing: RootNotFoundError | None = None
    if step is None:
        steps, root_missing = _committed_newest_first(backend)
    else:
        steps = [step]
    if group is not None and step is None:
        steps = _agreed_steps(group, steps)
    skipped: list[tuple[int, str]] = []
    for found in steps:
        loaded: T | None = None
        error: CheckpointError | None = None
        try:
            loaded = _load_from_any_tier(backend, found, load_one, skipped)
        except _FALLBACK_ERRORS as exc:
            error = exc
        except CheckpointError as exc:  # the state does not fit: no older step would either
            if group is None:
                raise
            error = exc
        if group is not None:
            error = _agreed_error(group, found, error)
        if error is None:
            if skipped:
                log.warning(
                    "using step %d after skipping %s",
                    found,
                    ", ".join(str(s) for s, _ in skipped),
                )
            return found, tuple(skipped), cast(T, loaded)
        if step is not None or not isinstance(error, _FALLBACK_ERRORS):
            raise error
        log.warning("skipping checkpoint step %d: %s; trying an older one", found, error)
        skipped.append((found, str(error)))
    if skipped:
        raise CorruptCheckpointError(
            f"every committed checkpoint under {backend.url} failed verification or could not "
            "be read: "
            + "; ".join(f"step {s}: {why}" for s, why in skipped)
            + f". Check them with `ckpt verify {backend.url}`; to start from scratch, move the "
            "root aside"
        )
    dcp = find_dcp(backend)
    if dcp:
        raise CheckpointNotFoundError(dcp_message(backend, dcp))
    if root_missing is not None:
        raise CheckpointNotFoundError(
            f"no committed checkpoint under {backend.url}: {root_missing}"
        ) from root_missing
    raise CheckpointNotFoundError(f"no committed checkpoint under {backend.url}")


# What makes restore move on to an older step: the step is damaged, unreadable after
# retries, or vanished between the listing and the read.
_FALLBACK_ERRORS = (CorruptCheckpointError, StorageError, CheckpointNotFoundError)
_READ_ATTEMPTS = 3


def _committed_newest_first(backend: StorageBackend) -> tuple[list[int], RootNotFoundError | None]:
    """Committed steps of every tier, newest first, and the error of a root that does not
    exist (a rank whose root is missing still takes part in agreeing on a step)."""
    found: set[int] = set()
    missing: RootNotFoundError | None = None
    for tier in as_tiered(backend).tiers:
        try:
            found.update(committed_steps(tier))
        except CheckpointNotFoundError as exc:
            if not isinstance(exc.__cause__, RootNotFoundError):
                raise
            missing = exc.__cause__
    return sorted(found, reverse=True), missing


def _agreed_steps(group: Coordinator, steps: list[int]) -> list[int]:
    """The steps every rank sees committed, newest first (listings may differ for a moment)."""
    seen = group.all_gather(steps)
    common = set(seen[0]).intersection(*map(set, seen[1:]))
    missing = sorted(set().union(*map(set, seen)) - common, reverse=True)
    if missing:
        log.warning("steps %s are not visible to every rank yet; not restoring them", missing)
    return sorted(common, reverse=True)


def _agreed_error(
    group: Coordinator, step: int, error: CheckpointError | None
) -> CheckpointError | None:
    """The outcome every rank acts on: None when ``step`` loaded on every rank; else this
    rank's error, or one naming the rank where it failed. When any rank's error is not one
    to fall back from (the state does not fit), every rank gets such an error, so that all
    of them stop together instead of some trying an older step alone."""
    mine = None if error is None else (isinstance(error, _FALLBACK_ERRORS), str(error))
    outcomes = group.all_gather(mine)
    failed = [(rank, why) for rank, why in enumerate(outcomes) if why is not None]
    if not failed:
        return None
    fatal = [(rank, why) for rank, (fallback, why) in failed if not fallback]
    if fatal and (error is None or isinstance(error, _FALLBACK_ERRORS)):
        rank, why = fatal[0]
        return StateMismatchError(f"step {step} does not fit the state on rank {rank}: {why}")
    if error is not None:
        return error
    rank, (_, why) = failed[0]
    return CorruptCheckpointError(f"step {step} failed on rank {rank}: {why}")


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, StorageError) and exc.retryable


def _before_retry(state: RetryCallState) -> None:
    record_retry("restore")
    step = state.args[1]
    log.warning(
        "step %d: %s; retrying in %.1f s (attempt %d of %d)",
        step,
        state.outcome.exception() if state.outcome else "",
        state.upcoming_sleep,
        state.attempt_number + 1,
        _READ_ATTEMPTS,
    )


# A retryable storage error is tried again (0.2 s, 0.4 s) before the step counts as
# unreadable and restore moves on to an older one.
_retry_transient = retry(
    retry=retry_if_exception(_transient),
    stop=stop_after_attempt(_READ_ATTEMPTS),
    wait=wait_exponential(multiplier=0.2),
    before_sleep=_before_retry,
    reraise=True,
)


@_retry_transient
def _load_from_any_tier(
    backend: StorageBackend,
    step: int,
    load_one: Callable[[StorageBackend, Manifest], T],
    skipped: list[tuple[int, str]],
) -> T:
    """``load_one`` on ``step`` from the first tier that holds a good copy (a bad copy on
    one tier is added to ``skipped``)."""
    tier_failures: list[tuple[int, str]] = []
    for candidate in candidates(backend, step):
        assert candidate.manifest is not None  # a step given: only usable copies are offered
        try:
            loaded = load_one(candidate.backend, candidate.manifest)
        except (CorruptCheckpointError, StorageError) as exc:
            last = exc  # another tier may hold a good copy
            log.warning("step %d on %s: %s; trying the next copy", step, candidate.backend.url, exc)
            tier_failures.append((step, f"{candidate.backend.url}: {exc}"))
            continue
        skipped += tier_failures
        return loaded
    raise last


@dataclass(frozen=True)
class _Loaded:
    """What loading one manifest did: the reads, and the plan that matched the state."""

    stats: LoadStats
    plan: LoadPlan
    match_seconds: float = 0.0  # matching the state to the manifest (before the loader plans)
    apply_seconds: float = 0.0  # load_state_dict and plain values, after the reads


def _stored_shape(
    stored: Mapping[str, tuple[str, tuple[int, ...]]], key: str, name: str
) -> tuple[int, ...] | None:
    """The global shape of tensor ``name`` of the state saved under ``key``, if stored."""
    entry = stored.get(join_path(key, name))
    return None if entry is None else entry[1]


def load_manifest(
    state: Mapping[str, Any],
    backend: StorageBackend,
    manifest: Manifest,
    *,
    strict: bool = True,
    options: LoadOptions | None = None,
) -> _Loaded:
    """Fill ``state`` from one validated manifest."""
    began = time.perf_counter()
    stored = {name: (entry.dtype, entry.shape) for name, entry in manifest.tensors.items()}
    for key, value in state.items():
        hint = getattr(value, "checkpoint_load_hint", None)
        if callable(hint):
            hint(functools.partial(_stored_shape, stored, key))
    plan = plan_load(
        state, manifest.state, stored, strict=strict, partial_maps=manifest.partial_maps
    )
    with storage_errors(
        f"loading step {manifest.step} from {backend.url}", missing=CorruptCheckpointError
    ):
        matched = time.perf_counter()
        stats = Loader(backend, manifest, options).load(plan.destinations)
    read = time.perf_counter()
    for key, tree in plan.trees.items():
        target = state[key]
        if isinstance(target, nn.Module):
            _load_state_dict(key, target, module_names(target, tree), strict=strict)
        elif isinstance(target, (torch.Tensor, ShardedTensor)):
            continue  # filled in place
        elif hasattr(target, "load_state_dict") and hasattr(target, "state_dict"):
            _load_state_dict(key, target, tree)
        elif isinstance(target, dict) and isinstance(tree, dict):
            target.clear()
            target.update(tree)
        elif isinstance(target, list) and isinstance(tree, list):
            target[:] = tree
        elif isinstance(state, dict):
            state[key] = tree
    return _Loaded(stats, plan, matched - began, time.perf_counter() - read)


def _load_state_dict(key: str, target: Any, tree: Any, **kwargs: Any) -> None:
    """``target.load_state_dict(tree)``, with its refusal reported as a state mismatch."""
    try:
        target.load_state_dict(tree, **kwargs)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise StateMismatchError(
            f"{key!r}: {type(target).__name__}.load_state_dict refused the checkpoint's state: "
            f"{exc}"
        ) from exc
