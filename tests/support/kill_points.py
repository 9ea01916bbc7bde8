"""A storage backend wrapper that SIGKILLs its own process at the k-th storage call.

``KillingBackend(inner, kill_at=k)`` delegates every call of the storage protocol to
``inner`` and counts them (``open_stream``, each ``BlobStream.write`` / ``commit`` /
``abort``, ``write``, ``put_if_absent``, reads, listings, deletes: everything but ``url``
and ``close``), across threads. Call number ``kill_at`` (1-based) never returns: the
process is SIGKILLed

* ``"before"`` the call touches storage, i.e. in the gap between call k-1 and call k, or
* ``"inside"`` it, half-way: a stream write or whole-object ``write`` stores the first
  half of its bytes, a ``delete`` of several paths deletes the first half of them; other
  calls are killed before they start.

With ``group=True`` the whole process group is killed (every rank of a job forked into
one group). ``trace`` (an open file descriptor) receives one line
``"<n> <op> <path> <thread name>"`` per call, written before the call runs, so that a dry run without ``kill_at`` counts the
calls of an operation and a killed run says where it died. Enumerating ``kill_at`` over
1..N+1 for a dry run's N calls hits every gap between two storage operations.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterable
from typing import NoReturn

from storage_backends import BlobStream, BytesLike, StorageBackend

KILL_MODES = ("before", "inside")


class _KillingStream:
    def __init__(self, owner: KillingBackend, path: str, inner: BlobStream) -> None:
        self._owner = owner
        self._path = path
        self._inner = inner

    def write(self, data: BytesLike) -> None:
        if self._owner._count("stream.write", self._path):
            view = memoryview(data).cast("B")
            self._inner.write(view[: len(view) // 2])
            self._owner._die()
        self._inner.write(data)

    def commit(self) -> None:
        if self._owner._count("stream.commit", self._path):
            self._owner._die()
        self._inner.commit()

    def abort(self) -> None:
        if self._owner._count("stream.abort", self._path):
            self._owner._die()
        self._inner.abort()


class KillingBackend:
    """Wraps ``inner``; SIGKILLs this process (or its group) at storage call ``kill_at``.

    Args:
        inner: the backend that really stores the bytes.
        kill_at: the 1-based number of the call that dies; None never kills.
        mode: ``"before"`` or ``"inside"`` (see the module docstring).
        group: kill the whole process group instead of this process.
        trace: a file descriptor that gets one line per call.

    Attributes:
        calls: storage calls made so far.
    """

    def __init__(
        self,
        inner: StorageBackend,
        *,
        kill_at: int | None = None,
        mode: str = "before",
        group: bool = False,
        trace: int | None = None,
    ) -> None:
        if mode not in KILL_MODES:
            raise ValueError(f"mode must be one of {KILL_MODES}")
        self.inner = inner
        self.kill_at = kill_at
        self.mode = mode
        self.group = group
        self.trace = trace
        self.calls = 0
        self._lock = threading.Lock()

    def _count(self, op: str, path: str) -> bool:
        """Count one call; kill now when it is the chosen one in ``before`` mode. Returns
        True when the caller must do half of its work and then call ``_die``."""
        with self._lock:
            self.calls += 1
            n = self.calls
            if self.trace is not None:
                thread = threading.current_thread().name
                os.write(self.trace, f"{n} {op} {path} {thread}\n".encode())
        if n != self.kill_at:
            return False
        if self.mode == "before":
            self._die()
        return True

    def _die(self) -> NoReturn:
        if self.group:
            os.killpg(os.getpgid(0), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
        while True:  # the signal may take a moment to land; this thread never goes on
            threading.Event().wait()

    # -- the StorageBackend protocol ------------------------------------------------------

    @property
    def url(self) -> str:
        return self.inner.url

    def write(self, path: str, data: BytesLike) -> None:
        if self._count("write", path):
            stream = self.inner.open_stream(path)
            view = memoryview(data).cast("B")
            stream.write(view[: len(view) // 2])
            self._die()
        self.inner.write(path, data)

    def open_stream(self, path: str) -> BlobStream:
        if self._count("open_stream", path):
            self._die()
        return _KillingStream(self, path, self.inner.open_stream(path))

    def put_if_absent(self, path: str, data: BytesLike) -> bool:
        if self._count("put_if_absent", path):
            self._die()
        return self.inner.put_if_absent(path, data)

    def read(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        if self._count("read", path):
            self._die()
        return self.inner.read(path, offset, length)

    def read_into(self, path: str, offset: int, out: BytesLike) -> None:
        if self._count("read_into", path):
            self._die()
        self.inner.read_into(path, offset, out)

    def size(self, path: str) -> int:
        if self._count("size", path):
            self._die()
        return self.inner.size(path)

    def exists(self, path: str) -> bool:
        if self._count("exists", path):
            self._die()
        return self.inner.exists(path)

    def list_objects(self, prefix: str = "") -> list[str]:
        if self._count("list_objects", prefix):
            self._die()
        return self.inner.list_objects(prefix)

    def list_prefixes(self, prefix: str = "") -> list[str]:
        if self._count("list_prefixes", prefix):
            self._die()
        return self.inner.list_prefixes(prefix)

    def delete(self, paths: Iterable[str]) -> None:
        paths = list(paths)
        if self._count("delete", ",".join(paths)):
            self.inner.delete(paths[: len(paths) // 2])
            self._die()
        self.inner.delete(paths)

    def delete_prefix(self, prefix: str) -> None:
        if self._count("delete_prefix", prefix):
            self._die()
        self.inner.delete_prefix(prefix)

    def abort_unfinished(self, prefix: str, older_than_seconds: float = 0.0) -> int:
        if self._count("abort_unfinished", prefix):
            self._die()
        return self.inner.abort_unfinished(prefix, older_than_seconds)

    def last_modified(self, prefix: str) -> float | None:
        if self._count("last_modified", prefix):
            self._die()
        return self.inner.last_modified(prefix)

    def close(self) -> None:
        self.inner.close()
