"""A storage backend wrapper for fault injection (DCP's ``FaultyStorageWriter``, for bytes).

``FaultyBackend`` delegates every call to an inner backend and can

* fail the k-th stream write, the k-th stream commit or the k-th ``put_if_absent``
  (the manifest commit) with a chosen ``StorageBackendError`` subclass, once each;
* hold every stream write on a ``threading.Event`` (``gate``), so that a save stays
  "in flight" for exactly as long as a test wants, without sleeps.

Counts start at 1 and run over the wrapper's lifetime, across threads and files;
``writes``, ``commits`` and ``puts`` say how many calls were made so far, so a test can
arm a fault relative to now: ``faulty.fail_write_at = faulty.writes + 1``. Small objects
written with ``write(path, data)`` go through ``open_stream`` and count as stream writes.

Leaving a ``with faulty:`` block opens the gate, so that a failing assertion does not
leave a save held (and the ``close()`` that follows waiting on it). Typical use::

    with FaultyBackend(LocalBackend(root), gate=threading.Event()) as faulty:
        pending = snapshotter.async_save(state, faulty, 1, LocalCoordinator())
        faulty.held.wait(10)  # the background write has reached the gate
        ...                   # the save is in flight here, deterministically
        faulty.release()      # let it finish
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from storage_backends import BlobStream, BytesLike, StorageBackend, StorageBackendError

# A held write gives up after this long, so that a test bug fails instead of hanging.
GATE_TIMEOUT_S = 60.0


class _FaultyStream:
    def __init__(self, owner: FaultyBackend, path: str, inner: BlobStream) -> None:
        self._owner = owner
        self._path = path
        self._inner = inner

    def write(self, data: BytesLike) -> None:
        self._owner._before("write", self._path)
        self._inner.write(data)

    def commit(self) -> None:
        self._owner._before("commit", self._path)
        self._inner.commit()

    def abort(self) -> None:
        self._inner.abort()


class FaultyBackend:
    """Wraps ``inner``; fails or holds chosen operations.

    Args:
        inner: the backend that really stores the bytes.
        fail_write_at: fail the k-th ``BlobStream.write`` (1-based), once.
        fail_commit_at: fail the k-th ``BlobStream.commit``, once.
        fail_put_at: fail the k-th ``put_if_absent`` (the manifest commit), once.
        error: the ``StorageBackendError`` subclass raised by an injected fault.
        gate: when given and not set, every stream write waits until it is set.

    Attributes:
        writes / commits / puts: calls seen so far (including failed ones).
        held: set once a write has reached a closed ``gate``.
        failures: the errors injected so far, in order.
    """

    def __init__(
        self,
        inner: StorageBackend,
        *,
        fail_write_at: int | None = None,
        fail_commit_at: int | None = None,
        fail_put_at: int | None = None,
        error: type[StorageBackendError] = StorageBackendError,
        gate: threading.Event | None = None,
    ) -> None:
        self.inner = inner
        self.fail_write_at = fail_write_at
        self.fail_commit_at = fail_commit_at
        self.fail_put_at = fail_put_at
        self.error = error
        self.gate = gate
        self.held = threading.Event()
        self.writes = 0
        self.commits = 0
        self.puts = 0
        self.failures: list[StorageBackendError] = []
        self._lock = threading.Lock()

    def _before(self, op: str, path: str) -> None:
        """Count ``op``; hold it on the gate (writes) or raise when it is the chosen one."""
        with self._lock:
            if op == "write":
                self.writes += 1
                fail = self.writes == self.fail_write_at
            elif op == "commit":
                self.commits += 1
                fail = self.commits == self.fail_commit_at
            else:
                self.puts += 1
                fail = self.puts == self.fail_put_at
        if op == "write" and self.gate is not None and not self.gate.is_set():
            self.held.set()
            if not self.gate.wait(GATE_TIMEOUT_S):
                raise StorageBackendError(f"test gate never opened for {path!r}", path=path)
        if fail:
            exc = self.error(f"injected fault: {op} of {path!r}", path=path)
            self.failures.append(exc)
            raise exc

    def release(self) -> None:
        """Open the gate: held writes go on and later ones pass (no-op without a gate)."""
        if self.gate is not None:
            self.gate.set()

    def __enter__(self) -> FaultyBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- the StorageBackend protocol ------------------------------------------------------

    @property
    def url(self) -> str:
        return self.inner.url

    def write(self, path: str, data: BytesLike) -> None:
        stream = self.open_stream(path)
        try:
            stream.write(data)
            stream.commit()
        except BaseException:
            stream.abort()
            raise

    def open_stream(self, path: str) -> BlobStream:
        return _FaultyStream(self, path, self.inner.open_stream(path))

    def put_if_absent(self, path: str, data: BytesLike) -> bool:
        self._before("put", path)
        return self.inner.put_if_absent(path, data)

    def read(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        return self.inner.read(path, offset, length)

    def read_into(self, path: str, offset: int, out: BytesLike) -> None:
        self.inner.read_into(path, offset, out)

    def size(self, path: str) -> int:
        return self.inner.size(path)

    def exists(self, path: str) -> bool:
        return self.inner.exists(path)

    def list_objects(self, prefix: str = "") -> list[str]:
        return self.inner.list_objects(prefix)

    def list_prefixes(self, prefix: str = "") -> list[str]:
        return self.inner.list_prefixes(prefix)

    def delete(self, paths: Iterable[str]) -> None:
        self.inner.delete(paths)

    def delete_prefix(self, prefix: str) -> None:
        self.inner.delete_prefix(prefix)

    def abort_unfinished(self, prefix: str, older_than_seconds: float = 0.0) -> int:
        return self.inner.abort_unfinished(prefix, older_than_seconds)

    def close(self) -> None:
        self.inner.close()

    def last_modified(self, prefix: str) -> float | None:
        return self.inner.last_modified(prefix)
