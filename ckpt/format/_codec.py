"""Per-chunk checksums and optional zstd compression of stored blobs.

A tensor piece's raw bytes are cut into fixed-size chunks (the manifest's
``chunk_bytes``; the last one may be short). Each chunk is stored either as is
("raw") or as one zstd frame ("zstd"), and the checksum covers the stored bytes of
each chunk, so any byte range can be read and verified chunk by chunk.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import xxhash
import zstandard

from ckpt.errors import CorruptCheckpointError

CHECKSUM_ALGORITHM = "xxh3_64"
DIGEST_HEX = 16
CODECS = ("raw", "zstd")
# The most raw bytes one stored zstd byte can stand for: a block holds at most 128 KiB
# and takes at least 4 bytes (an RLE block). Readers bound every frame's raw size with
# it before allocating anything.
ZSTD_MAX_RATIO = 32768

_local = threading.local()


def checksum(*parts: memoryview | bytes | bytearray) -> str:
    """The digest of ``parts`` concatenated (without concatenating them)."""
    if len(parts) == 1:
        return xxhash.xxh3_64_hexdigest(parts[0])
    state = xxhash.xxh3_64()
    for part in parts:
        state.update(part)
    return state.hexdigest()


def chunk_checksums(data: memoryview, chunk_bytes: int) -> str:
    """Concatenated hex digests of each ``chunk_bytes`` slice of ``data``."""
    return "".join(
        xxhash.xxh3_64_hexdigest(data[i : i + chunk_bytes])
        for i in range(0, len(data), chunk_bytes)
    )


def split_digests(digests: str) -> list[str]:
    return [digests[i : i + DIGEST_HEX] for i in range(0, len(digests), DIGEST_HEX)]


def chunk_count(raw_length: int, chunk_bytes: int) -> int:
    return max(1, -(-raw_length // chunk_bytes)) if raw_length else 0


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return cache[level]


def compress_chunks(data: memoryview, chunk_bytes: int, level: int) -> list[bytes]:
    """One zstd frame per chunk of ``data``."""
    compressor = _compressor(level)
    return [
        compressor.compress(data[i : i + chunk_bytes]) for i in range(0, len(data), chunk_bytes)
    ]


def decompress_chunk(frame: memoryview | bytes, raw_length: int) -> bytes:
    """The ``raw_length`` bytes of one zstd frame.

    Never allocates more than ``raw_length`` bytes: a frame that declares another size,
    does not decompress or decompresses to another length raises ``CorruptCheckpointError``.
    """
    decompressor = getattr(_local, "decompressor", None)
    if decompressor is None:
        decompressor = _local.decompressor = zstandard.ZstdDecompressor()
    try:
        declared = zstandard.frame_content_size(frame)
        if declared not in (-1, raw_length):
            raise CorruptCheckpointError(
                f"the zstd frame declares {declared} bytes, the manifest {raw_length}"
            )
        raw = decompressor.decompress(frame, max_output_size=raw_length)
    except zstandard.ZstdError as exc:
        raise CorruptCheckpointError(f"the zstd frame does not decompress: {exc}") from exc
    if len(raw) != raw_length:
        raise CorruptCheckpointError(
            f"the zstd frame decompresses to {len(raw)} bytes, the manifest says {raw_length}"
        )
    return raw


def stored_chunk_bounds(
    raw_length: int, chunk_bytes: int, stored_sizes: Sequence[int] | None
) -> list[tuple[int, int]]:
    """(offset, length) of each stored chunk within the piece's stored bytes."""
    count = chunk_count(raw_length, chunk_bytes)
    if stored_sizes is None:
        return [
            (i * chunk_bytes, min(chunk_bytes, raw_length - i * chunk_bytes)) for i in range(count)
        ]
    bounds = []
    offset = 0
    for size in stored_sizes:
        bounds.append((offset, size))
        offset += size
    return bounds
