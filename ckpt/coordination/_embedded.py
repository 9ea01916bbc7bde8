"""The embedded coordinators: no server. A single process commits on its own report; a
``torch.distributed`` job agrees through its process group and reports through storage.
Their index of committed steps is the storage listing (``step_index`` is None).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ckpt.coordination._agreement import GroupAgreement
from ckpt.coordination._commit import merge_indexes, publish
from ckpt.coordination._protocol import CommittedStepIndex, Coordinator, new_generation
from ckpt.errors import AlreadyCommittedError, CheckpointError, CoordinationError, storage_errors
from ckpt.format import (
    INDEX_DIR,
    Manifest,
    ShardIndex,
    manifest_path,
    read_manifest,
    step_prefix,
)
from storage_backends import StorageBackend

log = logging.getLogger(__name__)


class LocalCoordinator:
    """A single process: it is the only participant and commits on its own report."""

    def __init__(self, generation: str | None = None) -> None:
        self._generation = generation or new_generation()

    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return 1

    @property
    def generation(self) -> str:
        return self._generation

    @property
    def step_index(self) -> CommittedStepIndex | None:
        return None

    def begin(self, step: int, chunk_bytes: int) -> None:
        return None

    def all_gather(self, obj: Any) -> list[Any]:
        return [obj]

    def any_rank(self, flags: Sequence[bool]) -> list[bool]:
        return list(flags)

    def commit(
        self,
        backend: StorageBackend,
        step: int,
        index: ShardIndex,
        *,
        chunk_bytes: int,
        user_metadata: Mapping[str, Any],
    ) -> Manifest | None:
        manifest = merge_indexes(
            step=step,
            generation=self._generation,
            world_size=1,
            chunk_bytes=chunk_bytes,
            indexes=[index],
            user_metadata=user_metadata,
            reports_in=time.perf_counter(),
        )
        publish(backend, manifest)
        return manifest

    def report_failure(self, backend: StorageBackend, step: int, reason: str) -> None:
        return None

    def close(self) -> None:
        return None


class ProcessGroupCoordinator:
    """Embedded coordination for a ``torch.distributed`` job, with no server.

    Agreement (the generation, the save plan, the policy decision) uses the process
    group in the training thread. Reports and the commit go through storage, so the
    background threads never call a collective: each rank writes its shard index as
    ``step-N/index/<generation>-rank-R.json``; rank 0 waits for all of them, merges them
    and publishes the manifest; the other ranks wait for the manifest to appear. A rank
    that never reports makes the step time out: rank 0 leaves an abort marker, every
    rank raises ``CoordinationError`` and the previous committed step stays the newest.
    A step saved again after a failed attempt reports under ``<generation>-retryK`` so that
    nobody reads the failed attempt's reports or abort marker.

    Args:
        group: the process group (default: the whole world).
        timeout: seconds a rank waits for the others' reports / for the commit.
    """

    def __init__(self, group: Any = None, *, timeout: float = 600.0) -> None:
        if not GroupAgreement.available():
            raise CoordinationError(
                "ProcessGroupCoordinator needs torch.distributed to be initialised "
                "(call init_process_group first)"
            )
        self._agreement = GroupAgreement(group)
        self._rank = self._agreement.rank
        self._world = self._agreement.world_size
        self._timeout = timeout
        self._generation = self._agreement.broadcast_from_rank0(new_generation)
        self._attempts: dict[int, int] = {}  # step -> saves begun (same on every rank)

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world

    @property
    def generation(self) -> str:
        return self._generation

    @property
    def step_index(self) -> CommittedStepIndex | None:
        return None

    def begin(self, step: int, chunk_bytes: int) -> None:
        self._attempts[step] = self._attempts.get(step, 0) + 1

    def all_gather(self, obj: Any) -> list[Any]:
        return self._agreement.all_gather(obj)

    def any_rank(self, flags: Sequence[bool]) -> list[bool]:
        return self._agreement.any_rank(flags)

    def _attempt_tag(self, step: int) -> str:
        # A retry must not see the failed attempt's abort marker, nor its stale reports.
        retry = self._attempts.get(step, 1) - 1
        return f"{self._generation}-retry{retry}" if retry > 0 else self._generation

    def _index_path(self, step: int, rank: int) -> str:
        return f"{step_prefix(step)}/{INDEX_DIR}/{self._attempt_tag(step)}-rank-{rank:05d}.json"

    def _abort_path(self, step: int) -> str:
        return f"{step_prefix(step)}/{INDEX_DIR}/{self._attempt_tag(step)}-ABORTED"

    def commit(
        self,
        backend: StorageBackend,
        step: int,
        index: ShardIndex,
        *,
        chunk_bytes: int,
        user_metadata: Mapping[str, Any],
    ) -> Manifest | None:
        with storage_errors(f"reporting step {step} (rank {self._rank}) under {backend.url}"):
            backend.write(self._index_path(step, self._rank), index.to_bytes())
        if self._rank != 0:
            self._wait_for_commit(backend, step)
            return None
        indexes = self._collect(backend, step, index, chunk_bytes)
        reports_in = time.perf_counter()
        try:
            manifest = merge_indexes(
                step=step,
                generation=self._generation,
                world_size=self._world,
                chunk_bytes=chunk_bytes,
                indexes=indexes,
                user_metadata=user_metadata,
                reports_in=reports_in,
            )
            publish(backend, manifest)
        except BaseException as exc:
            # Tell the waiting ranks now instead of letting them wait out their timeout.
            try:
                self._write_abort(backend, step, f"rank 0 could not publish the manifest: {exc}")
            except CheckpointError as marker_exc:
                log.warning("step %d: could not leave the abort marker: %s", step, marker_exc)
            raise
        return manifest

    def report_failure(self, backend: StorageBackend, step: int, reason: str) -> None:
        self._write_abort(backend, step, f"rank {self._rank} failed: {reason}")

    def _write_abort(self, backend: StorageBackend, step: int, reason: str) -> None:
        with storage_errors(f"aborting step {step} under {backend.url}"):
            backend.write(self._abort_path(step), reason.encode())

    def _collect(
        self, backend: StorageBackend, step: int, own: ShardIndex, chunk_bytes: int
    ) -> list[ShardIndex]:
        wanted = {self._index_path(step, r): r for r in range(1, self._world)}
        deadline = time.monotonic() + self._timeout
        for delay in _poll_delays():
            with storage_errors(f"listing reports of step {step} under {backend.url}"):
                present = set(backend.list_objects(f"{step_prefix(step)}/{INDEX_DIR}"))
            missing = sorted(r for path, r in wanted.items() if path not in present)
            if not missing:
                break
            if self._abort_path(step) in present:
                with storage_errors(f"reading the abort marker of step {step} under {backend.url}"):
                    reason = backend.read(self._abort_path(step)).decode(errors="replace")
                raise CoordinationError(
                    f"step {step} was aborted ({reason}); the previous committed checkpoint stays "
                    "the newest"
                )
            if time.monotonic() > deadline:
                self._write_abort(
                    backend, step, f"ranks {missing} did not report within {self._timeout:.0f} s"
                )
                raise CoordinationError(
                    f"step {step}: ranks {missing} did not report within {self._timeout:.0f} s; "
                    "the step "
                    f"is aborted and the previous committed checkpoint under {backend.url} stays "
                    "the newest"
                )
            time.sleep(delay)
        indexes = [own]
        for path in wanted:
            with storage_errors(f"reading {path} under {backend.url}"):
                data = backend.read(path)
            indexes.append(ShardIndex.from_bytes(data, f"{backend.url}/{path}", chunk_bytes))
        return indexes

    def _wait_for_commit(self, backend: StorageBackend, step: int) -> None:
        deadline = time.monotonic() + self._timeout
        for delay in _poll_delays():
            with storage_errors(f"waiting for the commit of step {step} under {backend.url}"):
                if backend.exists(manifest_path(step)):
                    self._check_own_commit(backend, step)
                    return
                if backend.exists(self._abort_path(step)):
                    reason = backend.read(self._abort_path(step)).decode(errors="replace")
                    raise CoordinationError(
                        f"step {step} was aborted ({reason}); rank {self._rank}'s data is "
                        "discarded and the previous committed checkpoint stays the newest"
                    )
            if time.monotonic() > deadline:
                raise CoordinationError(
                    f"step {step}: rank {self._rank} saw no commit within {self._timeout:.0f} s "
                    "(rank 0 may have died); the previous committed checkpoint stays the newest"
                )
            time.sleep(delay)

    def _check_own_commit(self, backend: StorageBackend, step: int) -> None:
        """The manifest that appeared is this save's, not an older one of the same step."""
        manifest = read_manifest(backend, step, pieces=False)
        if manifest.generation != self._generation:
            raise AlreadyCommittedError(
                f"step {step} under {backend.url} is already committed by another writer "
                f"(generation {manifest.generation}); rank {self._rank}'s data is discarded"
            )

    def close(self) -> None:
        return None


def _poll_delays() -> Iterator[float]:
    delay = 0.002
    while True:
        yield delay
        delay = min(delay * 1.5, 0.1)


def default_coordinator() -> Coordinator:
    """The embedded coordinator that fits this process: the world's process group when
    torch.distributed is initialised with more than one rank, else a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return ProcessGroupCoordinator()
    return LocalCoordinator()
