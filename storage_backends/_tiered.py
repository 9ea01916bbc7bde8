"""Tiered storage: write to a fast local tier, replicate to a remote tier in the background.

Writes and commits go to the local tier, so a save commits at local-disk speed
("committed-local"). Publishing a commit object (``put_if_absent``) queues the
replication of every object in the same directory, then of the commit object itself,
last, with the remote's own atomic create ("committed-remote"). Reads prefer the local
tier and fall back to the remote one, so losing a node's disk loses nothing that
reached the remote tier. Deletes apply to both tiers. The backend declares ``Tiered``:
retention per tier goes through ``as_tiered(backend).tiers`` and must keep
``unreplicated()`` directories on the local tier.
"""

from __future__ import annotations

import logging
import posixpath
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor

from storage_backends._errors import BlobNotFoundError, StorageBackendError
from storage_backends._protocol import BlobStream, BytesLike, StorageBackend

log = logging.getLogger(__name__)

_COPY_BLOCK = 64 << 20


class TieredBackend:
    """A local tier in front of a remote tier.

    Args:
        local: the fast tier (NVMe).
        remote: the durable tier (S3).
        replication_threads: objects copied at once.
    """

    def __init__(
        self, local: StorageBackend, remote: StorageBackend, *, replication_threads: int = 4
    ) -> None:
        self.local = local
        self.remote = remote
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ckpt-tier")
        self._copiers = ThreadPoolExecutor(replication_threads, thread_name_prefix="ckpt-tier-copy")
        self._lock = threading.Lock()
        self._pending: dict[str, Future[None]] = {}  # commit object path -> its replication
        self.failures: dict[str, BaseException] = {}

    @property
    def url(self) -> str:
        return self.local.url

    @property
    def tiers(self) -> tuple[StorageBackend, ...]:
        """The tiers in the order reads prefer them: local, then remote (``Tiered``)."""
        return (self.local, self.remote)

    # -- writes: local first ---------------------------------------------------------

    def write(self, path: str, data: BytesLike) -> None:
        self.local.write(path, data)

    def open_stream(self, path: str) -> BlobStream:
        return self.local.open_stream(path)

    def put_if_absent(self, path: str, data: BytesLike) -> bool:
        if self.remote.exists(path):
            return (
                False  # committed remotely by someone else (e.g. before this node's disk was lost)
            )
        if not self.local.put_if_absent(path, data):
            return False
        self.replicate(path)
        return True

    def replicate(self, commit_path: str) -> Future[None]:
        """Queue the copy of ``commit_path``'s directory to the remote tier, commit object last."""
        with self._lock:
            future = self._pending.get(commit_path)
            if future is not None and not future.done():
                return future
            future = self._pool.submit(self._replicate, commit_path)
            self._pending[commit_path] = future
            self.failures.pop(commit_path, None)
        return future

    def _replicate(self, commit_path: str) -> None:
        directory = posixpath.dirname(commit_path)
        try:
            present_remote = set(self.remote.list_objects(directory)) if directory else set()
            objects = [
                p
                for p in self.local.list_objects(directory)
                if p != commit_path and p not in present_remote
            ]
            for future in [self._copiers.submit(self._copy, p) for p in objects]:
                future.result()
            data = self.local.read(commit_path)
            if (
                not self.remote.put_if_absent(commit_path, data)
                and self.remote.read(commit_path) != data
            ):
                raise StorageBackendError(
                    f"{commit_path!r} exists on the remote tier with other contents; not replaced",
                    path=commit_path,
                )
            log.info("replicated %s to %s", directory or commit_path, self.remote.url)
        except BaseException as exc:
            with self._lock:
                self.failures[commit_path] = exc
            log.error(
                "replicating %s to %s failed: %s (it stays local-only; retried on the next commit)",
                commit_path,
                self.remote.url,
                exc,
            )
            raise

    def _copy(self, path: str) -> None:
        size = self.local.size(path)
        stream = self.remote.open_stream(path)
        try:
            for offset in range(0, size, _COPY_BLOCK):
                # A fresh buffer per block: the remote stream may keep a view of it until commit.
                block = bytearray(min(_COPY_BLOCK, size - offset))
                self.local.read_into(path, offset, block)
                stream.write(block)
            stream.commit()
        except BaseException:
            stream.abort()
            raise

    def retry_failed(self) -> list[Future[None]]:
        """Queue again every replication that failed."""
        with self._lock:
            failed = list(self.failures)
        return [self.replicate(p) for p in failed]

    def unreplicated(self) -> list[str]:
        """Directories whose commit is local only (queued, running or failed)."""
        with self._lock:
            return sorted(
                posixpath.dirname(p)
                for p, f in self._pending.items()
                if not f.done() or p in self.failures
            )

    def wait_replicated(self, timeout: float | None = None) -> None:
        """Wait for every queued replication; raise the first failure."""
        with self._lock:
            futures = list(self._pending.values())
        for future in futures:
            future.result(timeout)

    # -- reads: local, else remote -------------------------------------------------------

    def read(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        try:
            return self.local.read(path, offset, length)
        except BlobNotFoundError:
            return self.remote.read(path, offset, length)

    def read_into(self, path: str, offset: int, out: BytesLike) -> None:
        try:
            self.local.read_into(path, offset, out)
        except BlobNotFoundError:
            self.remote.read_into(path, offset, out)

    def size(self, path: str) -> int:
        try:
            return self.local.size(path)
        except BlobNotFoundError:
            return self.remote.size(path)

    def exists(self, path: str) -> bool:
        return self.local.exists(path) or self.remote.exists(path)

    def list_objects(self, prefix: str = "") -> list[str]:
        return sorted(set(self.local.list_objects(prefix)) | set(self.remote.list_objects(prefix)))

    def list_prefixes(self, prefix: str = "") -> list[str]:
        return sorted(
            set(self.local.list_prefixes(prefix)) | set(self.remote.list_prefixes(prefix))
        )

    # -- deletes: both tiers ---------------------------------------------------------------

    def delete(self, paths: Iterable[str]) -> None:
        paths = list(paths)
        self.local.delete(paths)
        self.remote.delete(paths)

    def delete_prefix(self, prefix: str) -> None:
        self.local.delete_prefix(prefix)
        self.remote.delete_prefix(prefix)

    def abort_unfinished(self, prefix: str, older_than_seconds: float = 0.0) -> int:
        return self.local.abort_unfinished(
            prefix, older_than_seconds
        ) + self.remote.abort_unfinished(prefix, older_than_seconds)

    def close(self) -> None:
        """Finish queued replications, then release both tiers."""
        self._pool.shutdown(wait=True)
        self._copiers.shutdown(wait=True)
        self.local.close()
        self.remote.close()

    def last_modified(self, prefix: str) -> float | None:
        """The newest of both tiers'."""
        found = (tier.last_modified(prefix) for tier in (self.local, self.remote))
        return max((t for t in found if t is not None), default=None)
