"""``CheckpointManager``: wraps a training loop with a save policy, retention and restore."""

from __future__ import annotations

import logging
import math
import os
import signal
import statistics
import sys
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Literal, NoReturn

from ckpt import retention
from ckpt._api import RestoreReport, restore
from ckpt._foreign import find_dcp
from ckpt._metrics import record_save
from ckpt._open import open_url
from ckpt._rng import RNGState
from ckpt.coordination import Coordinator, resolve_coordinator
from ckpt.engine._engine import PendingSave, SaveResult, Snapshotter
from ckpt.engine._options import SaveOptions
from ckpt.errors import CheckpointError, CheckpointNotFoundError
from ckpt.format import Manifest, parse_step_prefix
from ckpt.retention import DEFAULT_ABANDONED_AFTER_S, RetentionPolicy, remove_unreferenced
from recovery import LoadOptions
from storage_backends import RootNotFoundError, StorageBackend, as_tiered

log = logging.getLogger(__name__)

RNG_KEY = "_ckpt_rng"
DEFAULT_SIGTERM_GRACE_S = 20.0
_RECENT_STALLS = 16


@dataclass
class ManagerMetrics:
    """Counters a training job can log; ``history`` holds one SaveResult per committed save."""

    saves_started: int = 0
    saves_committed: int = 0
    saves_failed: int = 0
    saves_skipped_busy: int = 0
    restores_fallbacks: int = 0
    stall_seconds_total: float = 0.0
    history: list[SaveResult] = field(default_factory=list)


class CheckpointManager:
    """Saves on a policy, keeps a retention window, restores the newest good checkpoint.

    Args:
        url: checkpoint root: a local path, ``file://`` URL (``s3://`` with the S3 backend).
        every_steps: save when ``step`` is a multiple of this.
        every_seconds: save when this long has passed since the last save started.
        interval: ``"auto"`` derives the save period from the measured stall and
            ``mtbf_seconds`` (Young/Daly: sqrt(2 * stall * MTBF)). A fresh job saves at
            its first ``maybe_save`` to measure the stall; a job that restored a checkpoint
            plans from the stall recorded in that checkpoint's manifest (the slowest rank's)
            until its own first save is measured, so it does not save right after restarting.
        manual: no automatic saves: the job saves by calling ``save`` itself (or only
            restores); ``maybe_save`` then saves only after SIGTERM. A manager needs
            one of ``every_steps``, ``every_seconds``, ``interval`` or ``manual=True``;
            without any it would never save, so it refuses to start.
        mtbf_seconds: the job's mean time between failures, for ``interval="auto"``.
        keep_last: committed checkpoints to keep (the newest is always kept).
        keep_every: also keep steps that are multiples of this, forever.
        keep_last_local: with a tiered backend, committed steps kept on the local tier
            (default: keep_last); keep_last/keep_every then apply to the remote tier. Steps
            not yet replicated are never deleted locally.
        abandoned_after: seconds without a write after which retention deletes a step that
            has no manifest (a save that died); younger ones may still be written to.
        coordinator: None for the embedded coordinator, a Coordinator, or a Redis URL
            (``redis://host:6379/0``; see ``ckpt.coordination.resolve_coordinator``).
        include_rng: also checkpoint the RNG states (torch, CUDA, Python, NumPy).
        if_busy: when a save is due while the previous one is still in the background:
            ``"skip"`` it (logged and counted) or ``"wait"`` for the previous one.
        save_on_sigterm: on SIGTERM, finish the save in flight, save at the next
            ``maybe_save`` call, then exit with status 143. A second SIGTERM, or one that
            arrives after ``close``, gets the handler that was there before (by default it
            ends the process at once).
        sigterm_grace_seconds: with ``save_on_sigterm``, the longest the process lives after
            the first SIGTERM. When it is still running then (the loop never reached
            ``maybe_save``, e.g. because a collective failed after a peer rank died, or the
            final save or the interpreter's exit waits on a save that cannot commit), a
            watchdog thread logs an ERROR and ends the process with ``os._exit(143)``. Nothing
            is torn by that: a step is committed only by its manifest, written last, so the
            step being written is garbage and restore takes the newest committed one. Keep
            it under the launcher's own grace (torchrun and Slurm send SIGKILL 30 s after
            SIGTERM by default); None disables the watchdog.
        save_options / load_options: layout and I/O settings.
        user_metadata: stored in every manifest.
    """

    def __init__(
        self,
        url: str | os.PathLike[str] | StorageBackend,
        *,
        every_steps: int | None = None,
        every_seconds: float | None = None,
        interval: Literal["auto"] | None = None,
        manual: bool = False,
        mtbf_seconds: float = 24 * 3600.0,
        keep_last: int | None = 3,
        keep_every: int | None = None,
        keep_last_local: int | None = None,
        abandoned_after: float = DEFAULT_ABANDONED_AFTER_S,
        coordinator: Coordinator | str | None = None,
        include_rng: bool = False,
        if_busy: Literal["skip", "wait"] = "skip",
        save_on_sigterm: bool = True,
        sigterm_grace_seconds: float | None = DEFAULT_SIGTERM_GRACE_S,
        save_options: SaveOptions | None = None,
        load_options: LoadOptions | None = None,
        user_metadata: Mapping[str, Any] | None = None,
    ) -> None:
        if every_steps is not None and every_steps < 1:
            raise ValueError("every_steps must be a positive number of steps")
        if every_seconds is not None and every_seconds <= 0:
            raise ValueError("every_seconds must be positive")
        if interval not in (None, "auto"):
            raise ValueError('interval must be None or "auto"')
        if sigterm_grace_seconds is not None and not sigterm_grace_seconds > 0:
            raise ValueError("sigterm_grace_seconds must be positive, or None for no watchdog")
        if if_busy not in ("skip", "wait"):
            raise ValueError('if_busy must be "skip" or "wait"')
        has_policy = every_steps is not None or every_seconds is not None or interval is not None
        if manual and has_policy:
            raise ValueError(
                "manual=True means no automatic saves: drop every_steps/every_seconds/interval, "
                "or drop manual=True"
            )
        if not manual and not has_policy:
            raise ValueError(
                "CheckpointManager has no save policy, so maybe_save() would never save: pass "
                'every_steps=N, every_seconds=T or interval="auto" for automatic saves, or '
                "manual=True to save only where you call mgr.save(step, state) (or ckpt.save)"
            )
        self._automatic = not manual
        # Made at the first save: a restore from a mistyped root must not create it.
        self.backend = open_url(url, create=False)
        self.retention = RetentionPolicy(
            keep_last=keep_last, keep_every=keep_every, abandoned_after=abandoned_after
        )
        self.local_retention = RetentionPolicy(
            keep_last=keep_last_local if keep_last_local is not None else keep_last,
            keep_every=keep_every,
            abandoned_after=abandoned_after,
        )
        self.coordinator = resolve_coordinator(coordinator, self.backend.url)
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self.interval = interval
        self.mtbf_seconds = mtbf_seconds
        self.include_rng = include_rng
        self.if_busy = if_busy
        self.load_options = load_options
        self.user_metadata = dict(user_metadata or {})
        self.metrics = ManagerMetrics()
        self.last_restore: RestoreReport | None = None
        self._snapshotter = Snapshotter(save_options)
        self._last_save_time: float | None = None
        self._last_saved_step: int | None = None
        self._restored_step: int | None = None
        self._last_pending: PendingSave | None = None
        self._stalls: list[float] = []  # the first save's, then the most recent ones
        self._restored_stall: float | None = None  # from the restored manifest's timings
        self._preempted: int | None = None
        self._replaceable: set[int] = set()
        self._previous_handler: Any = None
        self._closed = False
        self._metrics_lock = threading.Lock()
        self.sigterm_grace_seconds = sigterm_grace_seconds
        # The SIGTERM handler only stores the time and sets ``_sigterm_seen``; the watchdog is
        # started here because starting a thread inside a signal handler can deadlock on
        # threading's own locks if the main thread was interrupted holding them.
        self._sigterm_at: float | None = None
        self._sigterm_seen = threading.Event()  # set by the handler, or by close to stop it
        self._exiting = threading.Event()  # the final save is done: the watchdog stands down
        if save_on_sigterm and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._handler_installed = True
            if sigterm_grace_seconds is not None:
                threading.Thread(
                    target=self._sigterm_watchdog, name="ckpt-sigterm-watchdog", daemon=True
                ).start()
        else:
            self._handler_installed = False

    # -- restore -----------------------------------------------------------------------

    def restore(
        self, state: Mapping[str, Any], *, step: int | None = None, strict: bool = True
    ) -> int | None:
        """Load the newest committed checkpoint that verifies into ``state``.

        Falls back to older committed steps when the newest fails verification, logging
        why (see ``last_restore.skipped``).

        Returns:
            The restored step, or None when there is no checkpoint yet (logged; when the
            root does not exist, at WARNING, and nothing is created before the first save).

        Raises:
            CheckpointNotFoundError: ``step`` is not there, or the root holds a
                torch.distributed.checkpoint (DCP) checkpoint and no ckpt one (starting
                from scratch would silently drop it; the message says how to import it).
        """
        full = self._with_rng(state)
        try:
            report = restore(
                full,
                self.backend,
                step=step,
                strict=strict,
                options=self.load_options,
                coordinator=self.coordinator,
            )
        except CheckpointNotFoundError as exc:
            if step is not None or find_dcp(self.backend):
                raise  # a DCP checkpoint is there: starting from scratch would lose it
            if isinstance(exc.__cause__, RootNotFoundError):
                log.warning(
                    "checkpoint root %s does not exist: starting from scratch (it is created "
                    "at the first save; check the path if checkpoints were expected there)",
                    self.backend.url,
                )
            else:
                log.info("no checkpoint under %s yet; starting from scratch", self.backend.url)
            self._prepare_for_policy(state)
            return None
        if full is not state and isinstance(state, dict):
            # Plain values were replaced in the copy that carries the RNG entry.
            state.update({key: value for key, value in full.items() if key != RNG_KEY})
        self.last_restore = report
        if report.manifest is not None:
            self._snapshotter.reuse_plan_of(report.manifest)
        self.metrics.restores_fallbacks += len(report.skipped)
        # The job continues from an older step: the skipped ones it reaches again are replaced.
        self._replaceable = {skipped for skipped, _ in report.skipped if skipped > report.step}
        self._last_saved_step = report.step
        self._restored_step = report.step
        self._last_save_time = time.monotonic()
        timings = report.timings
        self._restored_stall = max(timings.stall_s) if timings and timings.stall_s else None
        self._prepare_for_policy(state)
        return report.step

    def _prepare_for_policy(self, state: Mapping[str, Any]) -> None:
        if self._automatic and self._snapshotter.staging_bytes == 0:
            self.prepare(state)

    # -- save --------------------------------------------------------------------------

    def maybe_save(self, step: int, state: Mapping[str, Any]) -> PendingSave | None:
        """Save ``step`` asynchronously if the policy says it is due.

        Blocks only while tensors are copied to host memory. Raises the error of an
        earlier background save that failed. After a SIGTERM it finishes the save in
        flight, saves this step, waits for its commit and exits with status 143.

        With several ranks, the decision is agreed in one small all-reduce per call: a
        save happens when it is due on any rank and is skipped when any rank is busy.
        """
        due, busy, preempted = (
            self._due(step),
            self._snapshotter.busy(),
            self._preempted is not None,
        )
        if self.coordinator.world_size > 1:
            due, busy, preempted = self.coordinator.any_rank([due, busy, preempted])
        if preempted:
            self._save_and_exit(step, state)
        if not due:
            self._snapshotter.raise_unobserved()
            return None
        if busy and self.if_busy == "skip":
            self.metrics.saves_skipped_busy += 1
            log.warning(
                "step %d: checkpoint due but the previous one is still being written; skipped "
                "(storage slower than the save interval: save less often or use if_busy='wait')",
                step,
            )
            self._snapshotter.raise_unobserved()
            return None
        return self.save(step, state)

    def save(
        self,
        step: int,
        state: Mapping[str, Any],
        *,
        blocking: bool = False,
        options: SaveOptions | None = None,
    ) -> PendingSave:
        """Save ``step`` now, regardless of the policy (waits for a save in flight first).

        ``options`` replaces the manager's ``save_options`` for this save only. A step this
        manager saved already (e.g. a final ``save`` after ``maybe_save`` saved the same
        step), or the step it restored and has not trained past, is not saved twice: the
        call returns the earlier save's handle (or a finished one) and logs it.
        """
        if self._closed:
            raise CheckpointError("this CheckpointManager is closed")
        # An earlier save's error is raised before this step counts as started, so that
        # calling again with the same step saves it.
        self._snapshotter.raise_unobserved()
        earlier = self._saved_already(step)
        if earlier is not None:
            if blocking:
                earlier.result()
            return earlier
        if step in self._replaceable:
            self._retire(step)
        started = time.monotonic()
        self.metrics.saves_started += 1
        try:
            pending = record_save(
                self.backend,
                blocking=blocking,
                start=lambda: self._snapshotter.async_save(
                    self._with_rng(state),
                    self.backend,
                    step,
                    self.coordinator,
                    user_metadata=self.user_metadata,
                    on_committed=self._after_commit,
                    overlap_writes=blocking,
                    options=options,
                ),
            )
        except BaseException:
            self.metrics.saves_failed += 1
            raise
        self._last_save_time = started
        self._last_saved_step = step
        self._last_pending = pending
        with self._metrics_lock:
            self.metrics.stall_seconds_total += pending.stall_seconds
        self._stalls.append(pending.stall_seconds)
        if len(self._stalls) > _RECENT_STALLS:
            del self._stalls[1]  # the first save's and the most recent ones are kept
        pending.add_done_callback(self._record)
        if blocking:
            pending.result()
        return pending

    def _saved_already(self, step: int) -> PendingSave | None:
        """The handle standing for ``step`` when this manager saved or restored it already."""
        earlier = self._last_pending
        if earlier is not None and earlier.step == step and not earlier.failed:
            log.info("step %d was saved already by this manager; not saving it twice", step)
            return earlier
        if step == self._restored_step and earlier is None and step not in self._replaceable:
            log.info(
                "step %d is the step restored from %s; not saving it again", step, self.backend.url
            )
            done: Future[SaveResult] = Future()
            done.set_result(SaveResult(step, self.backend.url, True, 0, 0, 0.0, 0.0, 0.0))
            return PendingSave(step, self.backend.url, 0.0, done)
        return None

    def _retire(self, step: int) -> None:
        """Un-commit ``step``, which restore skipped as corrupt or unreadable, so that it can be
        saved again (I7). Its manifest goes first; the new commit removes its old files."""
        self._replaceable.discard(step)
        if self.coordinator.rank == 0:
            reason = dict(self.last_restore.skipped if self.last_restore else ()).get(step, "")
            log.warning(
                "step %d under %s was skipped at restore (%s); replacing it with this save",
                step,
                self.backend.url,
                reason,
            )
            retention.retire_step(self.backend, step)
            index = self.coordinator.step_index
            if index is not None:
                index.forget_steps([step])
        if self.coordinator.world_size > 1:
            self.coordinator.any_rank([False])  # nobody writes before the manifest is gone

    def _record(self, future: Any) -> None:
        with self._metrics_lock:
            if future.exception() is None:
                self.metrics.saves_committed += 1
                self.metrics.history.append(future.result())
            else:
                self.metrics.saves_failed += 1

    def _after_commit(self, manifest: Manifest) -> None:
        try:
            remove_unreferenced(self.backend, manifest)
            tiered = as_tiered(self.backend)
            *fast, durable = tiered.tiers  # a plain backend: no fast tier
            unreplicated = {parse_step_prefix(d) for d in tiered.unreplicated()}
            protect = {s for s in unreplicated if s is not None}
            for tier in fast:
                retention.apply_retention(tier, self.local_retention, protect=protect)
            index = self.coordinator.step_index
            retention.apply_retention(
                durable,
                self.retention,
                before_delete=index.forget_steps if index is not None else None,
            )
            tiered.retry_failed()
        except CheckpointError as exc:  # the checkpoint is committed; GC can run again later
            log.warning("retention after step %d failed: %s", manifest.step, exc)

    def _due(self, step: int) -> bool:
        if step == self._last_saved_step:
            return False
        if self.every_steps is not None and step % self.every_steps == 0:
            return True
        period = self._period_seconds()
        if period is None:
            return False
        return self._last_save_time is None or time.monotonic() - self._last_save_time >= period

    def _period_seconds(self) -> float | None:
        if self.interval == "auto":
            if not self.metrics.saves_started and self._restored_stall is None:
                return 0.0  # a fresh job: save once to measure the cost
            period = math.sqrt(2.0 * max(self.stall_estimate, 1e-3) * self.mtbf_seconds)
            return period if self.every_seconds is None else min(period, self.every_seconds)
        return self.every_seconds

    @property
    def staging_bytes(self) -> int:
        """Host memory held for staging saves (kept and reused across saves)."""
        return self._snapshotter.staging_bytes

    @property
    def stall_estimate(self) -> float:
        """The steady-state stall of a save, in seconds, that ``interval="auto"`` plans with: the
        median of the recent saves' stalls, leaving out the first one (which may include
        allocating the staging buffers) once there are others. Before this manager's first
        save: the slowest rank's stall recorded in the manifest of the restored checkpoint,
        or 0.0 when nothing was restored or the manifest records no timings."""
        stalls = self._stalls[1:] if len(self._stalls) > 1 else self._stalls
        if stalls:
            return statistics.median(stalls)
        return self._restored_stall if self._restored_stall is not None else 0.0

    def prepare(self, state: Mapping[str, Any]) -> int:
        """Allocate and touch the host staging buffers for saves of ``state`` now, so that the
        first save stalls no longer than later ones. ``restore`` does it for managers with an
        automatic policy.

        Returns:
            The host bytes held for staging.
        """
        return self._snapshotter.prepare(self._with_rng(state), self.coordinator.world_size)

    def _with_rng(self, state: Mapping[str, Any]) -> Mapping[str, Any]:
        if not self.include_rng:
            return state
        if RNG_KEY in state:
            raise CheckpointError(f"state key {RNG_KEY!r} is reserved for include_rng=True")
        return {**state, RNG_KEY: RNGState()}

    # -- preemption --------------------------------------------------------------------

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if self._closed or self._preempted is not None:
            self._pass_on_sigterm(signum, frame)
            return
        self._sigterm_at = time.monotonic()
        self._preempted = signum
        if self.sigterm_grace_seconds is None:
            log.warning("SIGTERM received: will save at the next maybe_save() and exit")
        else:
            log.warning(
                "SIGTERM received: will save at the next maybe_save() and exit; the process "
                "ends in %.0f s at the latest",
                self.sigterm_grace_seconds,
            )
        self._sigterm_seen.set()

    def _pass_on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        """A second SIGTERM, or one after ``close``: what the replaced handler would do."""
        previous = self._previous_handler
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:  # SIG_DFL, or None (a handler not set from Python)
            log.warning("SIGTERM received again (or after close): terminating now")
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.raise_signal(signal.SIGTERM)

    def _sigterm_watchdog(self) -> None:
        """Ends the process ``sigterm_grace_seconds`` after SIGTERM unless it exited by then."""
        self._sigterm_seen.wait()
        if self._sigterm_at is None or self.sigterm_grace_seconds is None:
            return  # closed without a SIGTERM
        grace = self.sigterm_grace_seconds
        left = self._sigterm_at + grace - time.monotonic()
        if self._exiting.wait(max(left, 0.0)):
            return
        log.error(
            "rank %d: SIGTERM %g s ago and the process has not exited: no maybe_save() call "
            "finished the final save (the training loop is stuck or failed, e.g. a collective "
            "after a peer rank died, or exit waits on a save that cannot commit); exiting with "
            "status 143 without it. The newest committed checkpoint stays restorable; raise "
            "sigterm_grace_seconds if the final save only needs longer",
            self.coordinator.rank,
            grace,
        )
        for stream in (sys.stderr, sys.stdout):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(128 + signal.SIGTERM)

    @property
    def preempted(self) -> bool:
        """True once SIGTERM arrived (the next ``maybe_save`` saves and exits)."""
        return self._preempted is not None

    def _save_and_exit(self, step: int, state: Mapping[str, Any]) -> NoReturn:
        try:
            self._snapshotter.wait()
        except CheckpointError as exc:
            log.error("the save in flight failed during preemption: %s", exc)
        if self._last_saved_step != step:
            self.save(step, state, blocking=True)
        log.warning("step %d saved after SIGTERM; exiting", step)
        self.close()
        self._exiting.set()
        raise SystemExit(128 + signal.SIGTERM)

    # -- lifecycle ---------------------------------------------------------------------

    def wait(self) -> list[SaveResult]:
        """Wait for the save in flight; re-raise its error."""
        return self._snapshotter.wait()

    def close(self) -> None:
        """Wait for the save in flight, stop background threads, restore the SIGTERM handler."""
        if self._closed:
            return
        self._closed = True
        if self._sigterm_at is None:
            self._sigterm_seen.set()  # no SIGTERM: the watchdog ends; after one it stays on
        try:
            self._snapshotter.close()
        finally:
            self.coordinator.close()
            if self._handler_installed and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, self._previous_handler or signal.SIG_DFL)

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
