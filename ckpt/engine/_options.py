"""How a save writes: typed configuration, one small frozen dataclass per concern.

``recovery.LoadOptions`` is the read side's.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from ckpt.format import DEFAULT_CHUNK_BYTES


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
    """

    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    compression: Compression | None = None
    file_bytes: int = 512 << 20
    io_threads: int = 4
    write_block_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        if self.chunk_bytes < 4096 or self.chunk_bytes % 4096:
            raise ValueError("chunk_bytes must be a positive multiple of 4096")
        if self.write_block_bytes % self.chunk_bytes:
            raise ValueError("write_block_bytes must be a multiple of chunk_bytes")
        if self.io_threads < 1 or self.file_bytes < 1:
            raise ValueError("io_threads and file_bytes must be positive")
