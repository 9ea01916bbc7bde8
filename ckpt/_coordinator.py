"""The coordinator interface and the embedded implementation.

A coordinator turns per-rank "my data for step s is durable" reports into exactly one
commit. Call order, per save: ``begin(step)`` on every rank in the training thread,
then ``commit(step, index)`` on every rank from the background thread once that
rank's data files are durable. The committer writes the manifest last (I1) and only
while its generation is current (I4).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Mapping
from typing import Any, Protocol

from ckpt._commit import merge_indexes, publish
from ckpt._format import Manifest, ShardIndex
from storage_backends import StorageBackend


def new_generation() -> str:
    """A fencing token that sorts by creation time and is unique per incarnation."""
    return f"{time.time_ns():x}-{os.getpid():x}-{uuid.uuid4().hex[:8]}"


class Coordinator(Protocol):
    """Agrees on consistent global checkpoints across the ranks of one job."""

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    @property
    def generation(self) -> str:
        """This incarnation's fencing token; data files and the manifest carry it."""

    def begin(self, step: int) -> None:
        """Announce that every rank is about to save ``step`` (training thread)."""

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

    def close(self) -> None: ...


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

    def begin(self, step: int) -> None:
        return None

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
        )
        publish(backend, manifest)
        return manifest

    def close(self) -> None:
        return None
