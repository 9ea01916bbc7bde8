"""How a save writes: typed configuration, one small frozen dataclass per concern.

``recovery.LoadOptions`` is the read side's.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from ckpt.format import DEFAULT_CHUNK_BYTES

MIN_STAGING_BUDGET = 64 << 10
"""The smallest staging budget a save takes, per checkpoint in flight."""


@dataclass(frozen=True)
class Compression:
    """Chunked zstd for selected tensors (off unless given).

    Args:
        level: zstd level; 1-3 keep up with fast disks, higher trades speed for size.
        patterns: fnmatch patterns of tensor names to compress ("*" = all).
        min_bytes: tensors smaller than this are stored raw.
    """

    level: int = 3
    patterns: tuple[str, ...] = ("*",)
    min_bytes: int = 64 << 10

    def applies_to(self, name: str, nbytes: int) -> bool:
        return nbytes >= self.min_bytes and any(fnmatch.fnmatchcase(name, p) for p in self.patterns)


@dataclass(frozen=True)
class SaveOptions:
    """How a save lays out and writes its bytes.

    Args:
        chunk_bytes: checksum (and compression) granularity; a ranged read verifies
            whole chunks, so smaller chunks mean less read amplification when resharding.
        compression: None to store raw (every data file is then valid safetensors).
        file_bytes: a rank's data is split into files of about this size so that several
            are written in parallel.
        io_threads: threads that write, hash and compress in the background.
        write_block_bytes: size of each write call / multipart part.
        staging_budget_bytes: the most host memory staging may hold, in total over the
            engine's checkpoints in flight (each gets an equal share); None = as much as
            the state (all of it is staged at once). When a rank's share of the state is
            larger, its data is staged and written in buckets that reuse one buffer: pieces
            are cut into regions that fit, and the save returns once the last bucket is
            staged, after writing the ones before it, so the stall grows but the memory
            does not. Compressed saves also hold one bucket's compressed frames.
        format_version: 2 (the default) keeps each rank's pieces in its own index file and
            describes each tensor's layout compactly in the manifest, so that metadata read
            on restore grows with a rank's own pieces, not with the world size; 1 lists every
            piece in the manifest, for readers older than ckpt's format v2.
    """

    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    compression: Compression | None = None
    file_bytes: int = 512 << 20
    io_threads: int = 4
    write_block_bytes: int = 64 << 20
    staging_budget_bytes: int | None = None
    format_version: int = 2

    def __post_init__(self) -> None:
        if self.format_version not in (1, 2):
            raise ValueError("format_version must be 1 or 2")
        if self.chunk_bytes < 4096 or self.chunk_bytes % 4096:
            raise ValueError("chunk_bytes must be a positive multiple of 4096")
        if self.write_block_bytes % self.chunk_bytes:
            raise ValueError("write_block_bytes must be a multiple of chunk_bytes")
        if self.io_threads < 1 or self.file_bytes < 1:
            raise ValueError("io_threads and file_bytes must be positive")
        if self.staging_budget_bytes is not None and (
            self.staging_budget_bytes < MIN_STAGING_BUDGET
        ):
            raise ValueError(
                f"staging_budget_bytes={self.staging_budget_bytes} is below the minimum of "
                f"{MIN_STAGING_BUDGET} bytes per checkpoint in flight; raise it, or pass None "
                "to stage the whole state at once"
            )

    def slot_budget(self, slots: int) -> int | None:
        """Each of ``slots`` staging buffers' share of ``staging_budget_bytes`` (None: no limit).

        Raises:
            ValueError: the share is below ``MIN_STAGING_BUDGET``.
        """
        if self.staging_budget_bytes is None:
            return None
        share = self.staging_budget_bytes // slots // 64 * 64
        if share < MIN_STAGING_BUDGET:
            raise ValueError(
                f"staging_budget_bytes={self.staging_budget_bytes} shared by {slots} checkpoints "
                f"in flight leaves {share} bytes each, below the minimum of {MIN_STAGING_BUDGET}; "
                f"raise it to at least {slots * MIN_STAGING_BUDGET} or lower max_in_flight"
            )
        return share
