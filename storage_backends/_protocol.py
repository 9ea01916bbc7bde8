"""The byte-level storage protocol every backend implements, and the tiering capability.

Call order, as the checkpoint layer uses it:

* Every writing rank, in the save engine's I/O threads, for each of its data files:
  ``open_stream(path)`` -> ``BlobStream.write(...)`` any number of times ->
  ``BlobStream.commit()`` (durable and visible under ``path`` only now) or ``abort()``.
  Different paths may be streamed from different threads at the same time. A save that
  fails ``delete``s the data files it started (from the thread that saw the failure).
* Every rank, after its files are durable, in the save's background thread (the
  embedded coordinator): ``write(path, data)`` of one small object, its shard index; a
  rank that fails writes a small abort marker the same way.
* One committer (rank 0, same thread), after every blob of a step is durable:
  ``list_objects`` of the step's reports, ``read`` of each, then
  ``put_if_absent(manifest, ...)``. This is the commit point of a checkpoint; it never
  overwrites. Other ranks poll ``exists`` of the manifest (the Redis coordinator too).
* Readers (restore, ``ckpt ls/inspect/verify``, in the caller's thread):
  ``list_prefixes`` + ``exists`` to find committed steps, ``read`` of manifests,
  ``size`` of data files to validate them, then ``read_into`` of byte ranges of data
  files from many loader threads at once.
* Retention (the committing rank, in the save's background thread after the commit; or
  ``ckpt gc``): ``list_objects`` and ``delete`` of stale files, ``abort_unfinished`` in
  a committed step, ``last_modified`` of a step without a manifest (a writer may still
  be using it), ``delete_prefix`` of whole steps. With ``Tiered`` backends, per tier.
* Whoever opened the backend ``close``s it once nothing else uses it.

A list of buffers that must become one object is streamed: ``open_stream``, one
``write`` per buffer, ``commit``.

Paths are relative to the backend's root, use ``/`` as separator and never contain
``..`` or a leading ``/``. Implementations raise ``StorageBackendError`` subclasses
only, and say in ``retryable`` whether trying again may help.

A backend that can open an object once for many ranged reads (``LocalBackend``: one file
descriptor instead of resolving the path for every range) also declares ``OpensReaders``;
the loader goes through ``open_reader(backend, path)``, which gives every other backend a
reader that calls its ``read_into``. A backend declaring it must read through its readers
exactly what its ``read_into`` would (a subclass that changes one changes both).

A backend made of several media (``TieredBackend``) also declares ``Tiered``; code that
treats tiers one by one (restore's fallback, per-tier retention) goes through
``as_tiered(backend)``, which views any other backend as a single tier.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import Future
from typing import Protocol, runtime_checkable

from typing_extensions import Buffer

BytesLike = Buffer  # bytes, bytearray, memoryview, numpy arrays: anything with the buffer protocol


@runtime_checkable
class BlobStream(Protocol):
    """A large object being written; invisible to readers until ``commit()``."""

    def write(self, data: BytesLike) -> None:
        """Append ``data``. May block while earlier data is flushed.

        The stream may keep a view of ``data`` (no copy) until ``commit()`` or
        ``abort()`` returns: the caller must not change it before.
        """

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

    def write(self, path: str, data: BytesLike) -> None:
        """Write one buffer as a whole object, atomically (visible only when complete),
        replacing any old one. Several buffers: ``open_stream``."""

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

    def last_modified(self, prefix: str) -> float | None:
        """When anything under ``prefix`` (or the object ``prefix`` itself) was last written,
        unfinished writes included, as Unix seconds; None when there is nothing.

        Retention calls it to tell an abandoned save from one still in flight.
        """


@runtime_checkable
class Tiered(Protocol):
    """The capability of a backend made of tiers: objects land on the first (fastest)
    tier and a commit replicates its directory to the others in the background.

    The backend itself is a ``StorageBackend`` over all its tiers (reads fall back from
    one tier to the next); ``tiers`` lets restore and retention treat each on its own.
    """

    @property
    def tiers(self) -> tuple[StorageBackend, ...]:
        """The tiers, fastest (local) first, the durable one last."""

    def unreplicated(self) -> list[str]:
        """Directories whose commit has not reached the last tier yet (queued, running or
        failed): retention must keep them on the tiers in front of it."""

    def retry_failed(self) -> list[Future[None]]:
        """Queue again every replication that failed; one future per replication."""


class _OneTier:
    """A plain backend seen as tiered: itself, nothing ever pending."""

    def __init__(self, backend: StorageBackend) -> None:
        self._tiers = (backend,)

    @property
    def tiers(self) -> tuple[StorageBackend, ...]:
        return self._tiers

    def unreplicated(self) -> list[str]:
        return []

    def retry_failed(self) -> list[Future[None]]:
        return []


def as_tiered(backend: StorageBackend) -> Tiered:
    """``backend``'s tiers and replication state: the backend itself when it is ``Tiered``,
    else a view of it as one tier with nothing to replicate."""
    return backend if isinstance(backend, Tiered) else _OneTier(backend)


@runtime_checkable
class BlobReader(Protocol):
    """One object opened for ranged reads, used from one thread at a time, then closed.

    All its reads see the same version of the object (one that is replaced meanwhile is
    not mixed in)."""

    def read_into(self, offset: int, out: BytesLike) -> None:
        """Fill the writable buffer ``out`` with the bytes at ``offset``; short objects raise."""

    def close(self) -> None:
        """Release the object. Safe to call twice."""


@runtime_checkable
class OpensReaders(Protocol):
    """The capability of opening an object once for many ranged reads.

    Declaring it also says that a read is local (a copy out of memory or off a local disk,
    bound by this process's CPUs rather than by a round trip): the loader then runs no more
    readers than there are CPUs, unless told otherwise.
    """

    def open_reader(self, path: str) -> BlobReader:
        """Open ``path`` for reading; ``BlobNotFoundError`` when it does not exist."""


class _PathReader:
    """A reader that asks the backend for each range by path."""

    def __init__(self, backend: StorageBackend, path: str) -> None:
        self._backend = backend
        self._path = path

    def read_into(self, offset: int, out: BytesLike) -> None:
        self._backend.read_into(self._path, offset, out)

    def close(self) -> None:
        pass


def open_reader(backend: StorageBackend, path: str) -> BlobReader:
    """A reader of ``path``: the backend's own when it declares ``OpensReaders``, else one
    that calls ``backend.read_into(path, ...)`` for every range (and opens nothing)."""
    if isinstance(backend, OpensReaders):
        return backend.open_reader(path)
    return _PathReader(backend, path)
