"""The byte-level storage protocol every backend implements.

Call order, as the checkpoint layer uses it:

* Every writing rank, in background threads, for each of its data files:
  ``open_stream(path)`` -> ``BlobStream.write(...)`` any number of times ->
  ``BlobStream.commit()`` (durable and visible under ``path`` only now) or ``abort()``.
  Small objects (per-rank shard indexes) go through ``write(path, data)``.
  Different paths may be written from different threads at the same time.
* One committer, after every blob of a step is durable: ``put_if_absent(manifest, ...)``.
  This is the commit point of a checkpoint; it never overwrites.
* Readers: ``list_prefixes`` / ``list`` to discover, ``read`` for small objects,
  ``read_into`` for byte ranges of data files (called from many threads at once).
* Retention (one rank, after a commit): ``delete`` of paths or whole prefixes.

Paths are relative to the backend's root, use ``/`` as separator and never contain
``..`` or a leading ``/``. Implementations raise ``StorageBackendError`` subclasses
only, and say in ``retryable`` whether trying again may help.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

from typing_extensions import Buffer

BytesLike = Buffer  # bytes, bytearray, memoryview, numpy arrays: anything with the buffer protocol


@runtime_checkable
class BlobStream(Protocol):
    """A large object being written; invisible to readers until ``commit()``."""

    def write(self, data: BytesLike) -> None:
        """Append ``data``. May block while earlier data is flushed."""

    def commit(self) -> None:
        """Make the object durable and visible under its path, atomically."""

    def abort(self) -> None:
        """Drop everything written; the path is left as it was. Safe to call twice."""


@runtime_checkable
class StorageBackend(Protocol):
    """Moves bytes to and from one medium, under one root."""

    @property
    def url(self) -> str:
        """The root this backend writes under, as a URL (``file:///...``, ``s3://...``)."""

    def write(self, path: str, data: BytesLike | Sequence[BytesLike]) -> None:
        """Write a whole object atomically (visible only when complete), replacing any old one."""

    def open_stream(self, path: str) -> BlobStream:
        """Start streaming a large object to ``path``."""

    def put_if_absent(self, path: str, data: BytesLike) -> bool:
        """Create a small object atomically unless ``path`` exists.

        Returns:
            True when this call created it; False when the path already existed
            (the existing object is left untouched).
        """

    def read(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        """Read ``length`` bytes at ``offset`` (to the end when ``length`` is None)."""

    def read_into(self, path: str, offset: int, out: BytesLike) -> None:
        """Fill the writable buffer ``out`` with the bytes at ``offset``; short objects raise."""

    def size(self, path: str) -> int:
        """Size of the object in bytes; ``BlobNotFoundError`` when it does not exist."""

    def exists(self, path: str) -> bool:
        """Whether the object exists."""

    def list_objects(self, prefix: str = "") -> list[str]:
        """All object paths under ``prefix`` (recursive), sorted."""

    def list_prefixes(self, prefix: str = "") -> list[str]:
        """Immediate child "directories" under ``prefix`` (names only), sorted."""

    def delete(self, paths: Iterable[str]) -> None:
        """Delete objects; paths that do not exist are ignored."""

    def delete_prefix(self, prefix: str) -> None:
        """Delete every object under ``prefix`` (a "directory"), including unfinished ones."""

    def abort_unfinished(self, prefix: str, older_than_seconds: float = 0.0) -> int:
        """Drop unfinished streams under ``prefix`` started more than ``older_than_seconds`` ago
        (temporary files, incomplete multipart uploads) left by writers that died.

        Returns:
            How many were removed.
        """

    def close(self) -> None:
        """Release connections and thread pools."""
