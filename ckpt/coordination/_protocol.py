"""The coordinator interface, and the optional index of committed steps.

A coordinator turns per-rank "my data for step s is durable" reports into exactly one
commit. Call order, per save: ``begin(step, chunk_bytes)`` on every rank in the
training thread, then ``commit(step, index)`` on every rank from the background thread
once that rank's data files are durable. The committer writes the manifest last (I1) and
only while its generation is current (I4). ``report_failure`` may come instead of
``commit`` from either thread; ``close`` once, when the job is done with it.

A coordinator may keep its own index of committed steps (``step_index``; Redis does);
otherwise the index is the storage listing. Storage stays the truth either way (I5).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from ckpt.format import Manifest, ShardIndex
from storage_backends import StorageBackend


def new_generation() -> str:
    """A fencing token that sorts by creation time and is unique per incarnation."""
    return f"{time.time_ns():x}-{os.getpid():x}-{uuid.uuid4().hex[:8]}"


class CommittedStepIndex(Protocol):
    """A coordinator's own index of committed steps, rebuilt from storage when lost (I5).

    The manager calls ``forget_steps`` on the committer once retention has deleted steps
    (in the save's background thread, after the commit).
    """

    def committed_steps(self, backend: StorageBackend) -> list[int]:
        """Committed steps under ``backend``, newest first."""

    def forget_steps(self, steps: Sequence[int]) -> None:
        """Drop steps that retention deleted from storage."""


class Coordinator(Protocol):
    """Agrees on consistent global checkpoints across the ranks of one job."""

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    @property
    def generation(self) -> str:
        """This incarnation's fencing token; data files and the manifest carry it."""

    @property
    def step_index(self) -> CommittedStepIndex | None:
        """The coordinator's own index of committed steps; None when the index is the
        storage listing."""

    def begin(self, step: int, chunk_bytes: int) -> None:
        """Announce that every rank is about to save ``step`` with checksum chunks of
        ``chunk_bytes`` (training thread)."""

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, by rank (training thread; may be a collective)."""

    def any_rank(self, flags: Sequence[bool]) -> list[bool]:
        """Element-wise OR of ``flags`` across ranks (training thread; may be a collective)."""

    def commit(
        self,
        backend: StorageBackend,
        step: int,
        index: ShardIndex,
        *,
        chunk_bytes: int,
        user_metadata: Mapping[str, Any],
    ) -> Manifest | None:
        """Report this rank's durable data; the committer returns the manifest it published.

        Runs in a background thread; never calls torch.distributed collectives.
        """

    def report_failure(self, backend: StorageBackend, step: int, reason: str) -> None:
        """This rank cannot save ``step`` (staging or writing its data failed): abort the step
        now so the other ranks fail fast instead of waiting out their timeout. Training or
        background thread; never a collective."""

    def close(self) -> None: ...
