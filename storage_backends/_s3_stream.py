"""A multipart upload fed by ``write`` calls (the S3 backend's ``BlobStream``).

Parts go out as soon as they are full, at most ``max_concurrency`` at once (bounded
memory), as zero-copy views of the caller's buffers. A stream that never fills one part
becomes a single PUT at ``commit()``.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from typing import Any

from storage_backends._errors import StorageBackendError
from storage_backends._protocol import BytesLike
from storage_backends._s3_client import S3Client
from storage_backends._s3_config import MAX_PARTS

log = logging.getLogger(__name__)


class S3Stream:
    """One object being uploaded to ``path`` through ``client``."""

    def __init__(self, client: S3Client, path: str) -> None:
        client.key(path)  # a malformed path fails now, not at the first part
        self._client = client
        self._path = path
        self._part_size = client.config.part_size
        self._pending: list[memoryview] = []
        self._pending_bytes = 0
        self._upload_id: str | None = None
        self._parts: list[Future[dict[str, Any]]] = []
        self._slots = threading.Semaphore(client.config.max_concurrency)
        self._closed = False

    def write(self, data: BytesLike) -> None:
        if self._closed:
            raise StorageBackendError(f"stream for {self._path!r} is closed", path=self._path)
        view = memoryview(data).cast("B")
        if not len(view):
            return
        self._pending.append(view)
        self._pending_bytes += len(view)
        while self._pending_bytes >= self._part_size:
            self._send(self._take(self._part_size))

    def _take(self, n: int) -> list[memoryview]:
        taken: list[memoryview] = []
        need = n
        while need:
            head = self._pending[0]
            if len(head) <= need:
                taken.append(head)
                self._pending.pop(0)
                need -= len(head)
            else:
                taken.append(head[:need])
                self._pending[0] = head[need:]
                need = 0
        self._pending_bytes -= n
        return taken

    def _send(self, views: list[memoryview]) -> None:
        if self._upload_id is None:
            self._upload_id = self._client.create_upload(self._path)
        number = len(self._parts) + 1
        if number > MAX_PARTS:
            raise StorageBackendError(
                f"{self._path!r} needs more than {MAX_PARTS} parts: raise part_size",
                path=self._path,
            )
        self._slots.acquire()  # bounded memory: at most max_concurrency parts in flight
        client = self._client
        future = client.submit(client.upload_part, self._path, self._upload_id, number, views)
        future.add_done_callback(lambda _f: self._slots.release())
        self._parts.append(future)

    def commit(self) -> None:
        if self._closed:
            raise StorageBackendError(f"stream for {self._path!r} is closed", path=self._path)
        try:
            if self._upload_id is None:
                self._client.put(self._path, self._take(self._pending_bytes))
                self._closed = True
                return
            if self._pending_bytes:
                self._send(self._take(self._pending_bytes))
            parts = [f.result() for f in self._parts]
            self._client.complete_upload(self._path, self._upload_id, parts)
            self._closed = True
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        self._closed = True
        for future in self._parts:
            future.cancel()
        for future in self._parts:
            if not future.cancelled():
                try:
                    future.result()
                except Exception:  # the upload is being dropped anyway
                    pass
        self._parts = []
        self._pending = []
        if self._upload_id is not None:
            upload_id, self._upload_id = self._upload_id, None
            try:
                self._client.abort_upload(self._path, upload_id)
            except StorageBackendError as exc:  # GC aborts orphaned uploads later
                log.warning("could not abort the multipart upload of %s: %s", self._path, exc)
