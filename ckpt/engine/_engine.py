"""The save engine's front: ``Snapshotter`` runs saves, ``PendingSave`` is their handle.

``Snapshotter.async_save`` flattens the state, plans and stages it on the training
thread (``ckpt.engine._job``: the job and its ``stage``, ``persist`` and ``commit``
phases), then persists and commits it on a background thread and hands back a
``PendingSave``: ``done()``, ``result(timeout)``, ``exception()``,
``add_done_callback(fn)``; a background failure nobody looked at is raised by the
next save.
"""

from __future__ import annotations

import json
import logging
import operator
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ckpt.coordination import Coordinator
from ckpt.engine._flatten import FlatTensor, flatten
from ckpt.engine._job import (
    SaveJob,
    WrittenFile,
    commit,
    described_layouts,
    part_of,
    persist,
    plan_files,
    stage,
    tell_the_others,
)
from ckpt.engine._options import SaveOptions
from ckpt.engine._plan import MIN_SPLIT_BYTES, RankPlan, WholePlan, make_plan, piece_key
from ckpt.engine._plan_cache import PlanCache
from ckpt.engine._spans import span
from ckpt.engine._staging import StagingPool, align
from ckpt.errors import CheckpointError, InvalidStateError, SaveAbortedError
from ckpt.format import (
    INDEX_DIR,
    Manifest,
    PlanRecord,
    RankTiming,
    TensorEntry,
    tree_shape_digest,
)
from storage_backends import StorageBackend, add_retry_observer, remove_retry_observer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SaveResult:
    """What a finished save did.

    Attributes:
        step: the step saved.
        url: the checkpoint root.
        committed: True when this process saw the step committed.
        bytes_written: data bytes this rank wrote (headers included).
        files: data files this rank wrote.
        stall_seconds: time training was blocked (flatten + plan + staging copy; under a
            staging budget, also writing every bucket but the last).
        persist_seconds: background time to write this rank's data durably.
        commit_seconds: background time from durable data to the committed manifest.
        write_imbalance: the busiest rank's planned bytes over the mean (1.0 = balanced).
    """

    step: int
    url: str
    committed: bool
    bytes_written: int
    files: int
    stall_seconds: float
    persist_seconds: float
    commit_seconds: float
    write_imbalance: float = 1.0

    @property
    def total_seconds(self) -> float:
        return self.stall_seconds + self.persist_seconds + self.commit_seconds


class PendingSave:
    """Handle of a save running in the background.

    ``result()`` waits and re-raises the background error with its traceback. An error
    nobody asked for is raised by the engine's next save call instead of vanishing.
    """

    def __init__(
        self, step: int, url: str, stall_seconds: float, future: Future[SaveResult]
    ) -> None:
        self.step = step
        self.url = url
        self.stall_seconds = stall_seconds
        self._future = future
        self._observed = False

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> SaveResult:
        """Wait for the commit.

        Raises:
            TimeoutError: not finished within ``timeout`` seconds.
            CheckpointError: the save failed; the previous committed checkpoint is intact.
        """
        self._observed = True
        return self._future.result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._observed = True
        return self._future.exception(timeout)

    def add_done_callback(self, fn: Callable[[Future[SaveResult]], object]) -> None:
        """Call ``fn`` with the finished future once the save ends (at once if it has).

        Reading the future there does not count as looking at the outcome: a failure
        is still raised by the engine's next save call. ``fn`` runs in the persist
        thread (or the caller's, when already done) and must not block.
        """
        self._future.add_done_callback(fn)

    @property
    def failed(self) -> bool:
        """Whether the save finished with an error (does not count as looking at it)."""
        return self._future.done() and self._future.exception() is not None

    @property
    def failed_unobserved(self) -> bool:
        return not self._observed and self.failed

    def __repr__(self) -> str:
        state = "done" if self.done() else "running"
        return f"PendingSave(step={self.step}, url={self.url!r}, {state})"


MAX_STEP = 2**63 - 1
"""The largest step number (manifests store it as a signed 64-bit integer)."""


def checked_step(step: object) -> int:
    """``step`` as an ``int``: any integer type (``operator.index``) but bool, 0 to ``MAX_STEP``.

    Raises:
        InvalidStateError: ``step`` is a bool, not an integer, negative or too large.
    """
    if isinstance(step, (bool, np.bool_)) or (
        isinstance(step, torch.Tensor) and step.dtype == torch.bool
    ):
        raise InvalidStateError(
            f"step must be an integer from 0 to 2**63 - 1, not a bool ({step!r})"
        )
    try:
        value = operator.index(step)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidStateError(
            f"step must be an integer from 0 to 2**63 - 1, got {step!r} of type "
            f"{type(step).__name__}"
        ) from None
    if not 0 <= value <= MAX_STEP:
        raise InvalidStateError(f"step must be an integer from 0 to 2**63 - 1, got {value}")
    return value


def checked_metadata(user_metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy of ``user_metadata``, refused now (not after the data is written) when the
    manifest could not store it as JSON.

    Raises:
        InvalidStateError: a value JSON cannot hold (an object, a cycle, an integer of
            more than 4300 digits).
    """
    metadata = dict(user_metadata or {})
    try:
        json.dumps(metadata)
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidStateError(
            f"user_metadata cannot be stored as JSON ({exc}); keep it to strings, numbers, "
            "lists and dicts with string keys"
        ) from exc
    return metadata


# -- the engine -----------------------------------------------------------------------


class _StorageRetries:
    """Counts the storage calls retried in this process (a retry observer, any thread).

    A save's count is the difference across its writes: the retries this process made
    meanwhile, which are its own unless several saves write at once.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0

    def __call__(self, service: str, what: str) -> None:
        if service != "redis":  # a coordinator's retries are not storage's
            with self._lock:
                self.count += 1


class Snapshotter:
    """Owns the staging pool and background threads; runs saves one after another.

    Args:
        options: layout and I/O settings.
        max_in_flight: checkpoints allowed in the background at once; a further save
            waits for a staging buffer to free up. Each has an equal share of
            ``options.staging_budget_bytes``.

    Raises:
        ValueError: the staging budget leaves a checkpoint in flight too little.
    """

    def __init__(self, options: SaveOptions | None = None, *, max_in_flight: int = 1) -> None:
        self.options = options or SaveOptions()
        self.options.slot_budget(max_in_flight)
        self._pool = StagingPool(max_in_flight)
        self._io = ThreadPoolExecutor(self.options.io_threads, thread_name_prefix="ckpt-io")
        self._persist = ThreadPoolExecutor(max_in_flight, thread_name_prefix="ckpt-persist")
        # Format v2: the layouts a rank describes are worked out while it stages and writes.
        self._describe = ThreadPoolExecutor(1, thread_name_prefix="ckpt-layouts")
        self._plans = PlanCache()
        self._layouts: tuple[RankPlan, Future[dict[str, TensorEntry]]] | None = None
        self._retries = _StorageRetries()
        add_retry_observer(self._retries)
        self._pending: list[PendingSave] = []
        self._lock = threading.Lock()
        self._closed = False

    @property
    def staging_bytes(self) -> int:
        """Host memory held for staging (reused across saves)."""
        return self._pool.reserved_bytes

    @property
    def pinned_bytes(self) -> int:
        """Of ``staging_bytes``, the page-locked part (exactly the buffers' sizes)."""
        return self._pool.pinned_bytes

    def prepare(self, state: Mapping[str, Any], world_size: int = 1) -> int:
        """Allocate and touch the staging buffers a save of ``state`` will need, now.

        The first save's stall then holds only the copy, like every later one. Replicated
        tensors are shared among ``world_size`` ranks by the write plan, so each rank
        reserves its share; a first save that needs more grows the buffer then.

        Under a staging budget, each buffer is at most its share of it.

        Returns:
            The bytes reserved (the buffers only grow; see ``staging_bytes``).
        """
        tensors, _ = flatten(state)
        sharded = sum(align(t.nbytes) for t in tensors.values() if not t.replicated)
        replicated = sum(align(t.nbytes) for t in tensors.values() if t.replicated)
        need = sharded + align(-(-replicated // max(world_size, 1)))
        budget = self.options.slot_budget(self._pool.slots)
        self._pool.reserve(need if budget is None else min(need, budget))
        return self._pool.reserved_bytes

    def reuse_plan_of(self, manifest: Manifest) -> None:
        """Let the next save reuse the write plan ``manifest`` was saved with, when every rank
        describes exactly what that save's ranks did (a job restored on the same world size
        with the same model); otherwise it plans afresh, as it would have. Call it on every
        rank with the manifest they all restored (``CheckpointManager.restore`` does)."""
        self._plans.seed(manifest)

    def busy(self) -> bool:
        """Whether a save is still running in the background."""
        with self._lock:
            return any(not p.done() for p in self._pending)

    def in_flight(self) -> list[PendingSave]:
        with self._lock:
            return [p for p in self._pending if not p.done()]

    def raise_unobserved(self) -> None:
        """Raise the error of an earlier background save that nobody has looked at."""
        with self._lock:
            failed = [p for p in self._pending if p.failed_unobserved]
            self._pending = [p for p in self._pending if not p.done()]
        if failed:
            failed[0].result()  # raises with the original traceback

    def wait(self, timeout: float | None = None) -> list[SaveResult]:
        """Wait for every save in flight; re-raise the first failure."""
        with self._lock:
            # A failure the caller already got from ``result()`` is not raised a second time.
            pending = [p for p in self._pending if not (p._observed and p.failed)]
        results = [p.result(timeout) for p in pending]
        with self._lock:
            self._pending = [p for p in self._pending if not p.done()]
        return results

    def async_save(
        self,
        state: Mapping[str, Any],
        backend: StorageBackend,
        step: int,
        coordinator: Coordinator,
        *,
        user_metadata: Mapping[str, Any] | None = None,
        on_committed: Callable[[Manifest], None] | None = None,
        overlap_writes: bool = False,
        options: SaveOptions | None = None,
    ) -> PendingSave:
        """Stage ``state`` for ``step`` and return; the write and the commit run in the background.

        ``options`` replaces the engine's layout settings for this save only (its
        ``io_threads`` is the engine's, fixed when the engine was made).

        With ``overlap_writes`` each data file starts streaming as soon as it is staged,
        while later files are still being copied: the save commits sooner, but the copy
        shares the CPU with the writes, so the stall grows. Blocking saves use it.
        """
        if self._closed:
            raise CheckpointError("this checkpointer is closed; create a new one")
        step = checked_step(step)
        user_metadata = checked_metadata(user_metadata)
        self.raise_unobserved()
        start = time.perf_counter()
        with span("ckpt.save"):
            # Every value is checked here, before the step begins and anything is written.
            try:
                tensors, tree = flatten(state)
                refused: CheckpointError | None = None
            except CheckpointError as exc:
                refused = exc
            if coordinator.world_size > 1:
                # A refusal on one rank must not leave the others waiting in the plan exchange.
                _agree_on_refusal(coordinator, refused)
            if refused is not None:
                raise refused
            options = options or self.options
            options.slot_budget(self._pool.slots)  # refused before the step begins
            coordinator.begin(step, options.chunk_bytes)
            return self.save_flat(
                tensors,
                tree,
                backend,
                step,
                coordinator,
                user_metadata=user_metadata,
                on_committed=on_committed,
                started=start,
                overlap_writes=overlap_writes,
                options=options,
            )

    def save_flat(
        self,
        tensors: Mapping[str, FlatTensor],
        tree: dict[str, Any],
        backend: StorageBackend,
        step: int,
        coordinator: Coordinator,
        *,
        user_metadata: Mapping[str, Any] | None = None,
        on_committed: Callable[[Manifest], None] | None = None,
        started: float | None = None,
        overlap_writes: bool = False,
        options: SaveOptions | None = None,
        format_version: int | None = None,
        reuse_plan: bool = True,
    ) -> PendingSave:
        """``async_save`` of a state that is already flattened (offline conversion uses it).

        ``format_version`` (default: the options') 1 makes this rank report its pieces to
        the committer instead of writing an index file (the DCP writer merges the reports
        itself). ``reuse_plan=False`` plans this save alone, leaving the plan kept for the
        next save as it is: for writers that are not the ranks of a job saving again (the
        DCP writer, offline conversion)."""
        start = time.perf_counter() if started is None else started
        options = options or self.options
        version = options.format_version if format_version is None else format_version
        min_split = max(MIN_SPLIT_BYTES, options.chunk_bytes)
        sends_tree = coordinator.rank == 0
        if reuse_plan:
            plan, whole, sends_tree = self._plans.agree(
                coordinator,
                tensors,
                # Alone, a rank sends its tree anyway: no need to hash its keys.
                tree_digest=tree_shape_digest(tree) if coordinator.world_size > 1 else "",
                min_split_bytes=min_split,
            )
            if whole is None:
                log.debug("step %d: the write plan of the last save still holds", step)
            layouts = self._described_layouts(step, coordinator.rank, plan, whole, tensors, version)
        else:
            plan, whole = make_plan(coordinator, tensors, min_split_bytes=min_split)
            layouts = (
                self._describe.submit(described_layouts, step, coordinator.rank, whole, tensors)
                if version >= 2
                else None
            )
        mine = plan.boxes
        to_write = [
            part_of(t, mine[piece_key(t)]) for t in tensors.values() if piece_key(t) in mine
        ]
        budget = options.slot_budget(self._pool.slots)
        files, nbytes = plan_files(
            to_write,
            options,
            generation=coordinator.generation,
            rank=coordinator.rank,
            budget=budget,
        )
        buckets = 1 + max((f.bucket for f in files), default=0)
        if buckets > 1:
            log.info(
                "step %d (rank %d): staging %d bytes in %d buckets of at most %d bytes, each "
                "written before the next is staged, because they exceed the staging budget "
                "(staging_budget_bytes=%d over %d checkpoint(s) in flight)",
                step,
                coordinator.rank,
                sum(f.nbytes for f in files),
                buckets,
                nbytes,
                options.staging_budget_bytes,
                self._pool.slots,
            )
        metadata = dict(user_metadata or {})
        if self._pool.busy():
            log.info(
                "step %d: waiting for the checkpoint in flight to free its staging buffer", step
            )
        try:
            buffer = self._pool.acquire(nbytes, at_most=budget)
        except BaseException as exc:  # e.g. out of host memory: the step has begun everywhere
            tell_the_others(coordinator, backend, step, exc)
            raise
        job = SaveJob(
            step=step,
            rank=coordinator.rank,
            backend=backend,
            coordinator=coordinator,
            options=options,
            tensors=tensors,
            tree=tree if sends_tree else None,
            files=tuple(files),
            buffer=buffer,
            imbalance=plan.imbalance,
            user_metadata=metadata,
            on_committed=on_committed,
            started_unix=time.time() - (time.perf_counter() - start),
            layouts=layouts,
            index_path=(
                f"{INDEX_DIR}/{coordinator.generation}-r{coordinator.rank:05d}-"
                f"{uuid.uuid4().hex[:8]}.json"
                if version >= 2
                else ""
            ),
            plan=(
                PlanRecord(self._plans.key, max(1.0, plan.imbalance))
                if reuse_plan and version >= 2
                else None
            ),
        )
        retries = self._retries.count
        with span("ckpt.stage"):
            writes = stage(job, self._pool, self._io, overlap_writes=overlap_writes)
        stall = time.perf_counter() - start
        future = self._persist.submit(self._persist_and_commit, job, writes, stall, retries)
        pending = PendingSave(step, backend.url, stall, future)
        with self._lock:
            self._pending.append(pending)
        log.debug("step %d: staged %d bytes in %.3fs", step, nbytes, stall)
        return pending

    def _described_layouts(
        self,
        step: int,
        rank: int,
        plan: RankPlan,
        whole: WholePlan | None,
        tensors: Mapping[str, FlatTensor],
        version: int,
    ) -> Future[dict[str, TensorEntry]] | None:
        """Format v2: the layouts this rank describes, worked out in the background from the
        whole plan when it was just made, else those worked out for ``plan`` before."""
        if version < 2:
            self._plans.forget()  # the next v2 save needs the whole plan for its layouts
            return None
        if whole is None:
            if self._layouts is None or self._layouts[0] is not plan:
                assert plan.described is not None  # seeded from a restored manifest
                known: Future[dict[str, TensorEntry]] = Future()
                known.set_result(dict(plan.described))
                self._layouts = (plan, known)
            return self._layouts[1]
        try:
            future = self._describe.submit(described_layouts, step, rank, whole, tensors)
        except BaseException:
            self._plans.forget()
            raise

        def forget_failed(done: Future[dict[str, TensorEntry]]) -> None:
            if done.cancelled() or done.exception() is not None:  # e.g. shards that do not tile
                self._plans.forget()

        future.add_done_callback(forget_failed)
        self._layouts = (plan, future)
        return future

    def _persist_and_commit(
        self,
        job: SaveJob,
        started: Mapping[str, Future[WrittenFile]],
        stall: float,
        retries: int,
    ) -> SaveResult:
        """The background part of a save (the persist thread); ``retries`` is the count of
        storage retries before its first write."""
        t0 = time.perf_counter()
        try:
            try:
                with span("ckpt.persist"):
                    written = persist(job, self._io, started)
            except BaseException as exc:
                tell_the_others(job.coordinator, job.backend, job.step, exc)
                raise
            finally:
                self._pool.release(job.buffer)
            t1 = time.perf_counter()
            timing = RankTiming(
                started_unix=job.started_unix,
                stall_s=stall,
                persist_s=t1 - t0,
                retries=self._retries.count - retries,
            )
            with span("ckpt.commit"):
                commit(job, written, timing)
            t2 = time.perf_counter()
        except BaseException as exc:
            log.error("step %d (rank %d): save failed: %s", job.step, job.rank, exc)
            if isinstance(exc, CheckpointError):
                raise
            raise SaveAbortedError(
                f"step {job.step} (rank {job.rank}) was not committed: {exc!r}; the previous "
                f"committed checkpoint under {job.backend.url} is intact\n{traceback.format_exc()}"
            ) from exc
        bytes_written = sum(w.stored_bytes for w in written)
        log.info(
            "step %d (rank %d): %d bytes durable in %.3fs, committed after %.3fs more "
            "(busiest writer / mean: %.2f)",
            job.step,
            job.rank,
            bytes_written,
            t1 - t0,
            t2 - t1,
            job.imbalance,
        )
        return SaveResult(
            step=job.step,
            url=job.backend.url,
            committed=True,
            bytes_written=bytes_written,
            files=len(written),
            write_imbalance=job.imbalance,
            stall_seconds=stall,
            persist_seconds=t1 - t0,
            commit_seconds=t2 - t1,
        )

    def close(self, wait: bool = True) -> None:
        """Wait for saves in flight (re-raising their errors) and stop the threads."""
        if self._closed:
            return
        try:
            if wait:
                self.wait()
        finally:
            self._closed = True
            remove_retry_observer(self._retries)
            self._persist.shutdown(wait=wait)
            self._describe.shutdown(wait=wait)
            self._io.shutdown(wait=wait)
            self._pool.close()


def _agree_on_refusal(coordinator: Coordinator, refused: CheckpointError | None) -> None:
    """Raise on every rank when any rank refused its state (each rank's own error first)."""
    outcomes = coordinator.all_gather(None if refused is None else str(refused))
    failed = [(rank, why) for rank, why in enumerate(outcomes) if why is not None]
    if failed and refused is None:
        rank, why = failed[0]
        raise InvalidStateError(f"rank {rank} refused the state, so no rank saves: {why}")
