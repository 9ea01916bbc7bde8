"""S3 (and S3-compatible: MinIO, Ceph RGW, R2, SeaweedFS) backend, through boto3.

Large objects stream as multipart uploads with several parts in flight and bounded
memory; the parts are zero-copy views of the caller's buffers, which therefore must
stay unchanged until ``commit()`` or ``abort()`` returns. Small objects are one PUT.
Reads are ranged GETs. The commit object is created with ``If-None-Match: *`` so two
committers can never both win; servers that ignore the header are detected once and
then a check-then-put scheme is used, which keeps I1 and leaves fencing (I4) to the
coordinator (see docs/FORMAT.md).

Every call goes through one tenacity policy (full-jitter exponential backoff, bounded
attempts and total time) that retries only what may succeed on a second try:
throttling, 5xx, timeouts, dropped connections, bodies that end early. Other errors
become ``StorageBackendError`` subclasses naming bucket, key and the fix. Retried
calls are idempotent: same key, same bytes.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlparse

import botocore.exceptions as bce
import botocore.session
from botocore.config import Config
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from storage_backends._errors import (
    BlobNotFoundError,
    InvalidPathError,
    StorageBackendError,
    StorageFullError,
)
from storage_backends._protocol import BytesLike

log = logging.getLogger(__name__)

T = TypeVar("T")

_MIN_PART = 5 << 20  # S3's smallest part, except the last one
_MAX_PARTS = 10_000

# S3 error code -> (exception type, retryable, what to do). One table, no string matching elsewhere.
_ERRORS: dict[str, tuple[type[StorageBackendError], bool, str]] = {
    "NoSuchKey": (BlobNotFoundError, False, "the object does not exist"),
    "404": (BlobNotFoundError, False, "the object does not exist"),
    "NotFound": (BlobNotFoundError, False, "the object does not exist"),
    "NoSuchBucket": (StorageBackendError, False, "the bucket does not exist: create it or fix the URL"),
    "AccessDenied": (StorageBackendError, False, "access denied: check the credentials and the bucket policy"),
    "403": (StorageBackendError, False, "access denied: check the credentials and the bucket policy"),
    "Forbidden": (StorageBackendError, False, "access denied: check the credentials and the bucket policy"),
    "InvalidAccessKeyId": (StorageBackendError, False, "unknown access key: check the credentials"),
    "SignatureDoesNotMatch": (StorageBackendError, False, "bad secret key or clock skew: check the credentials"),
    "AllAccessDisabled": (StorageBackendError, False, "access to the bucket is disabled"),
    "QuotaExceeded": (StorageFullError, False, "the storage quota is exhausted: free space or raise the quota"),
    "EntityTooLarge": (StorageBackendError, False, "object too large: lower part_size or split the data"),
    "NoSuchUpload": (StorageBackendError, False, "the multipart upload was aborted (by GC?)"),
    "SlowDown": (StorageBackendError, True, "throttled"),
    "Throttling": (StorageBackendError, True, "throttled"),
    "ThrottlingException": (StorageBackendError, True, "throttled"),
    "RequestLimitExceeded": (StorageBackendError, True, "throttled"),
    "TooManyRequests": (StorageBackendError, True, "throttled"),
    "429": (StorageBackendError, True, "throttled"),
    "InternalError": (StorageBackendError, True, "server error"),
    "ServiceUnavailable": (StorageBackendError, True, "server unavailable"),
    "503": (StorageBackendError, True, "server unavailable"),
    "500": (StorageBackendError, True, "server error"),
    "502": (StorageBackendError, True, "bad gateway"),
    "504": (StorageBackendError, True, "gateway timeout"),
    "RequestTimeout": (StorageBackendError, True, "request timed out"),
    "RequestTimeTooSkewed": (StorageBackendError, False, "the clock is skewed: fix the host's time"),
    "IncompleteBody": (StorageBackendError, True, "the body ended early"),
    "ConditionalRequestConflict": (StorageBackendError, True, "a concurrent conditional write"),
    "OperationAborted": (StorageBackendError, True, "a conflicting operation is in progress"),
}

_TRANSIENT = (
    bce.EndpointConnectionError,
    bce.ConnectionClosedError,
    bce.ReadTimeoutError,
    bce.ConnectTimeoutError,
    bce.IncompleteReadError,
    bce.ResponseStreamingError,
    bce.ProxyConnectionError,
    ConnectionError,
    TimeoutError,
)


@dataclass(frozen=True)
class RetryPolicy:
    """How S3 calls are retried: full-jitter exponential backoff, bounded both ways.

    Args:
        attempts: at most this many tries of one call.
        total_seconds: and at most this long in all.
        initial_seconds / max_seconds: the backoff range.
        sleep: the sleep function (tests pass one that does not wait).
    """

    attempts: int = 10
    total_seconds: float = 120.0
    initial_seconds: float = 0.1
    max_seconds: float = 10.0
    sleep: Callable[[float], None] = time.sleep


@dataclass(frozen=True)
class S3Config:
    """Everything a user of AWS, MinIO, Ceph RGW, R2 or SeaweedFS may need to set.

    Credentials come from boto3's standard chain (environment, profile, instance role)
    unless given here; they are never logged.

    Args:
        endpoint_url: the S3 endpoint (default: ``AWS_ENDPOINT_URL_S3`` /
            ``AWS_ENDPOINT_URL``, else AWS).
        region: the region (default: boto3's chain, else us-east-1).
        addressing_style: "path", "virtual" or "auto".
        profile: a named profile of the shared config files.
        part_size: multipart part size; also the single-PUT limit.
        max_concurrency: parts in flight per object (memory is bounded by
            part_size x max_concurrency per stream, and parts are views of the caller's data).
        sse / sse_kms_key_id: server-side encryption ("AES256" or "aws:kms").
        checksum_algorithm: server-side integrity checksum (e.g. "CRC32", "CRC32C",
            "SHA256") where the server supports it; None leaves boto3's default.
        conditional_put: "auto" probes once whether the server honours If-None-Match,
            "on" trusts it, "off" always uses the check-then-put fallback.
        connect_timeout / read_timeout: socket timeouts in seconds.
        max_pool_connections: HTTP connections kept per backend.
        retry: the retry policy.
    """

    endpoint_url: str | None = None
    region: str | None = None
    addressing_style: str = "auto"
    profile: str | None = None
    aws_access_key_id: str | None = field(default=None, repr=False)
    aws_secret_access_key: str | None = field(default=None, repr=False)
    aws_session_token: str | None = field(default=None, repr=False)
    part_size: int = 64 << 20
    max_concurrency: int = 8
    sse: str | None = None
    sse_kms_key_id: str | None = None
    checksum_algorithm: str | None = None
    conditional_put: str = "auto"
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    max_pool_connections: int = 32
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        if self.part_size < _MIN_PART:
            raise ValueError("part_size must be at least 5 MiB (S3's minimum part)")
        if self.conditional_put not in ("auto", "on", "off"):
            raise ValueError('conditional_put must be "auto", "on" or "off"')
        if self.addressing_style not in ("auto", "path", "virtual"):
            raise ValueError('addressing_style must be "auto", "path" or "virtual"')


def _error_code(exc: bce.ClientError) -> str:
    error = exc.response.get("Error", {})
    code = str(error.get("Code") or "")
    status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or "")
    if code in _ERRORS or not status:
        return code
    if code:
        return code if not status.startswith("5") or code in _ERRORS else status
    return status


def _precondition_failed(exc: StorageBackendError) -> bool:
    """Whether ``exc`` is the server refusing a conditional request (HTTP 412)."""
    cause = exc.__cause__
    return isinstance(cause, bce.ClientError) and _error_code(cause) in ("PreconditionFailed", "412")


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, _TRANSIENT):
        return True
    if isinstance(exc, bce.ClientError):
        code = _error_code(exc)
        if code in _ERRORS:
            return _ERRORS[code][1]
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return int(status) >= 500
    return False


_loader_lock = threading.Lock()
_shared_loader: Any = None


def _botocore_session(profile: str | None) -> Any:
    """A fresh botocore session (own credentials and profile) sharing one data loader.

    Loading the S3 service model and endpoint rules takes a good fraction of a second of
    CPU; every backend (``ckpt.load("s3://...")`` opens one per call) would pay it again.
    The loader only caches the read-only JSON models, so sharing it is safe.
    """
    global _shared_loader
    session = botocore.session.Session(profile=profile)
    with _loader_lock:
        if _shared_loader is None:
            _shared_loader = session.get_component("data_loader")
        else:
            session.register_component("data_loader", _shared_loader)
    return session


class _ViewReader(io.RawIOBase):
    """A seekable file over a list of buffers, without copying them (an upload body)."""

    def __init__(self, views: Sequence[memoryview]) -> None:
        self._views = list(views)
        self._length = sum(len(v) for v in self._views)
        self._pos = 0

    def __len__(self) -> int:
        return self._length

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, min(self._length, base + offset))
        return self._pos

    def readinto(self, out: Any) -> int:
        target = memoryview(out).cast("B")
        written = 0
        skip = self._pos
        for view in self._views:
            if skip >= len(view):
                skip -= len(view)
                continue
            piece = view[skip : skip + len(target) - written]
            target[written : written + len(piece)] = piece
            written += len(piece)
            skip = 0
            if written == len(target):
                break
        self._pos += written
        return written


class _S3Stream:
    """A multipart upload fed by ``write`` calls; parts go out as soon as they are full."""

    def __init__(self, backend: S3Backend, path: str) -> None:
        self._backend = backend
        self._path = path
        self._key = backend._key(path)
        self._pending: list[memoryview] = []
        self._pending_bytes = 0
        self._upload_id: str | None = None
        self._parts: list[Future[dict[str, Any]]] = []
        self._slots = threading.Semaphore(backend.config.max_concurrency)
        self._closed = False

    def write(self, data: BytesLike) -> None:
        if self._closed:
            raise StorageBackendError(f"stream for {self._path!r} is closed", path=self._path)
        view = memoryview(data).cast("B")
        if not len(view):
            return
        self._pending.append(view)
        self._pending_bytes += len(view)
        part = self._backend.config.part_size
        while self._pending_bytes >= part:
            self._send(self._take(part))

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
            self._upload_id = self._backend._create_upload(self._key, self._path)
        number = len(self._parts) + 1
        if number > _MAX_PARTS:
            raise StorageBackendError(f"{self._path!r} needs more than {_MAX_PARTS} parts: raise part_size", path=self._path)
        self._slots.acquire()  # bounded memory: at most max_concurrency parts in flight
        future = self._backend._pool.submit(self._upload_part, number, views)
        future.add_done_callback(lambda _f: self._slots.release())
        self._parts.append(future)

    def _upload_part(self, number: int, views: list[memoryview]) -> dict[str, Any]:
        upload_id = self._upload_id
        assert upload_id is not None

        def call() -> dict[str, Any]:
            body = _ViewReader(views)
            args = {"Bucket": self._backend.bucket, "Key": self._key, "UploadId": upload_id,
                    "PartNumber": number, "Body": body, "ContentLength": len(body)}
            if self._backend.config.checksum_algorithm:
                args["ChecksumAlgorithm"] = self._backend.config.checksum_algorithm
            response = self._backend._client.upload_part(**args)
            part = {"PartNumber": number, "ETag": response["ETag"]}
            for name in ("ChecksumCRC32", "ChecksumCRC32C", "ChecksumSHA1", "ChecksumSHA256", "ChecksumCRC64NVME"):
                if name in response:
                    part[name] = response[name]
            return part

        return self._backend._call(f"uploading part {number} of", self._path, call)

    def commit(self) -> None:
        if self._closed:
            raise StorageBackendError(f"stream for {self._path!r} is closed", path=self._path)
        try:
            if self._upload_id is None:
                self._backend.write(self._path, self._take(self._pending_bytes))
                self._closed = True
                return
            if self._pending_bytes:
                self._send(self._take(self._pending_bytes))
            parts = [f.result() for f in self._parts]
            self._complete(parts)
            self._closed = True
        except BaseException:
            self.abort()
            raise

    def _complete(self, parts: list[dict[str, Any]]) -> None:
        backend, upload_id = self._backend, self._upload_id
        tries = 0

        def call() -> None:
            nonlocal tries
            tries += 1
            try:
                backend._client.complete_multipart_upload(
                    Bucket=backend.bucket, Key=self._key, UploadId=upload_id, MultipartUpload={"Parts": parts})
            except bce.ClientError as exc:
                # A retry after a completion whose answer was lost: the upload is gone
                # because it became the object. Anything else is a real failure.
                if not (tries > 1 and _error_code(exc) == "NoSuchUpload" and self._is_completed(parts)):
                    raise

        backend._call("completing", self._path, call)

    def _is_completed(self, parts: list[dict[str, Any]]) -> bool:
        """Whether the object now under the key is this upload (its multipart ETag)."""
        try:
            digests = b"".join(bytes.fromhex(str(p["ETag"]).strip('"')) for p in parts)
        except ValueError:  # ETags that are not MD5s (SSE-KMS): cannot tell
            return False
        expected = f'"{hashlib.md5(digests, usedforsecurity=False).hexdigest()}-{len(parts)}"'
        try:
            head = self._backend._client.head_object(Bucket=self._backend.bucket, Key=self._key)
        except bce.ClientError:
            return False
        return str(head.get("ETag")) == expected

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
                self._backend._call("aborting the upload of", self._path, lambda: self._backend._client.abort_multipart_upload(
                    Bucket=self._backend.bucket, Key=self._key, UploadId=upload_id))
            except StorageBackendError as exc:  # GC aborts orphaned uploads later
                log.warning("could not abort the multipart upload of %s: %s", self._path, exc)


class S3Backend:
    """Objects under ``s3://bucket/prefix``.

    Args:
        url: ``s3://bucket`` or ``s3://bucket/prefix``.
        config: endpoint, credentials, part size, retries...
        client: a ready boto3 S3 client (tests, custom sessions).
    """

    def __init__(self, url: str, config: S3Config | None = None, *, client: Any = None) -> None:
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise StorageBackendError(f"not an S3 URL: {url!r} (expected s3://bucket/prefix)")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.config = config or S3Config()
        self._client = client or self._make_client()
        self._pool = ThreadPoolExecutor(max(4, self.config.max_concurrency * 2), thread_name_prefix="ckpt-s3")
        self._conditional: bool | None = {"on": True, "off": False}.get(self.config.conditional_put)
        self._probe_lock = threading.Lock()

    def _make_client(self) -> Any:
        cfg = self.config
        endpoint = cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        try:
            session = _botocore_session(cfg.profile)
            region = cfg.region or session.get_config_variable("region") or "us-east-1"
            botocore_config = Config(
                region_name=region,
                s3={"addressing_style": cfg.addressing_style},
                # Retries are ours (one tenacity policy for every call); botocore tries once.
                retries={"total_max_attempts": 1, "mode": "standard"},
                connect_timeout=cfg.connect_timeout,
                read_timeout=cfg.read_timeout,
                max_pool_connections=cfg.max_pool_connections,
                request_checksum_calculation="when_required" if cfg.checksum_algorithm is None else "when_supported",
                response_checksum_validation="when_required",
            )
            return session.create_client(
                "s3",
                region_name=region,
                endpoint_url=endpoint,
                aws_access_key_id=cfg.aws_access_key_id,
                aws_secret_access_key=cfg.aws_secret_access_key,
                aws_session_token=cfg.aws_session_token,
                config=botocore_config,
            )
        except bce.BotoCoreError as exc:
            raise StorageBackendError(
                f"cannot set up the S3 client for s3://{self.bucket}: {exc}: check the profile, "
                "region and endpoint settings (S3Config or the AWS_* environment)"
            ) from exc

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def _key(self, path: str) -> str:
        parts = path.split("/")
        if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise InvalidPathError(f"invalid object path {path!r}", path=path)
        return f"{self.prefix}/{path}" if self.prefix else path

    def _key_prefix(self, prefix: str) -> str:
        prefix = prefix.strip("/")
        if prefix:
            self._key(prefix)
        base = "/".join(p for p in (self.prefix, prefix) if p)
        return f"{base}/" if base else ""

    def _relative(self, key: str) -> str:
        return key[len(self.prefix) + 1 :] if self.prefix else key

    def _call(self, what: str, path: str, fn: Callable[[], T]) -> T:
        policy = self.config.retry
        retrying = Retrying(
            stop=stop_after_attempt(policy.attempts) | stop_after_delay(policy.total_seconds),
            wait=wait_random_exponential(multiplier=policy.initial_seconds, max=policy.max_seconds),
            retry=retry_if_exception(_retryable),
            sleep=policy.sleep,
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    return fn()
        except StorageBackendError:
            raise
        except bce.ClientError as exc:
            raise self._map(exc, what, path) from exc
        except _TRANSIENT as exc:
            raise StorageBackendError(
                f"{what} s3://{self.bucket}/{self._safe_key(path)} failed after retries: {exc}",
                path=path, retryable=True,
            ) from exc
        except bce.BotoCoreError as exc:
            raise StorageBackendError(f"{what} s3://{self.bucket}/{self._safe_key(path)}: {exc}", path=path) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _safe_key(self, path: str) -> str:
        try:
            return self._key(path) if path else self.prefix
        except InvalidPathError:
            return path

    def _map(self, exc: bce.ClientError, what: str, path: str) -> StorageBackendError:
        code = _error_code(exc)
        kind, retryable, advice = _ERRORS.get(code, (StorageBackendError, _retryable(exc), "unexpected error"))
        message = exc.response.get("Error", {}).get("Message") or code
        return kind(
            f"{what} s3://{self.bucket}/{self._safe_key(path)}: {code} ({message}): {advice}",
            path=path, retryable=retryable,
        )

    def _put_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {}
        if self.config.sse:
            args["ServerSideEncryption"] = self.config.sse
        if self.config.sse_kms_key_id:
            args["SSEKMSKeyId"] = self.config.sse_kms_key_id
        return args

    def _create_upload(self, key: str, path: str) -> str:
        args = self._put_args()
        if self.config.checksum_algorithm:
            args["ChecksumAlgorithm"] = self.config.checksum_algorithm
        response = self._call("starting the upload of", path, lambda: self._client.create_multipart_upload(
            Bucket=self.bucket, Key=key, **args))
        return str(response["UploadId"])

    # -- protocol ------------------------------------------------------------------

    def write(self, path: str, data: BytesLike | Sequence[BytesLike]) -> None:
        buffers: list[Any] = list(data) if isinstance(data, (list, tuple)) else [data]
        views = [memoryview(b).cast("B") for b in buffers]
        total = sum(len(v) for v in views)
        if total > self.config.part_size:
            stream = self.open_stream(path)
            for view in views:
                stream.write(view)
            stream.commit()
            return
        key = self._key(path)
        self._put(path, key, views)

    def _put(self, path: str, key: str, views: list[memoryview], **extra: Any) -> Any:
        args = {**self._put_args(), **extra}
        if self.config.checksum_algorithm:
            args["ChecksumAlgorithm"] = self.config.checksum_algorithm

        def call() -> Any:
            body = _ViewReader(views)
            return self._client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentLength=len(body), **args)

        return self._call("writing", path, call)

    def open_stream(self, path: str) -> _S3Stream:
        self._key(path)
        return _S3Stream(self, path)

    def put_if_absent(self, path: str, data: BytesLike) -> bool:
        key = self._key(path)
        view = memoryview(data).cast("B")
        if not self._conditional_supported():
            if self.exists(path):
                return False
            self._put(path, key, [view])
            return True
        try:
            self._put(path, key, [view], IfNoneMatch="*")
            return True
        except StorageBackendError as exc:
            if not _precondition_failed(exc):
                raise
        # A retried PUT may have succeeded the first time: the object being ours means we won.
        try:
            return self.read(path) == bytes(view)
        except BlobNotFoundError:
            return False

    def _conditional_supported(self) -> bool:
        if self._conditional is not None:
            return self._conditional
        with self._probe_lock:
            if self._conditional is None:
                self._conditional = self._probe_conditional()
        return bool(self._conditional)

    def _probe_conditional(self) -> bool:
        """Whether the server refuses a second ``If-None-Match: *`` PUT of one key.

        Only a clear answer counts: any other failure propagates and the next commit
        probes again (a transient fault must not switch conditional puts off for good).
        """
        probe = f".ckpt-probe/{uuid.uuid4().hex}"
        key = self._key(probe)
        try:
            try:
                self._put(probe, key, [memoryview(b"1")], IfNoneMatch="*")
            except StorageBackendError as exc:
                if _precondition_failed(exc):
                    return True  # an earlier try of this very PUT landed: the header is honoured
                raise
            try:
                self._put(probe, key, [memoryview(b"2")], IfNoneMatch="*")
            except StorageBackendError as exc:
                if _precondition_failed(exc):
                    return True
                raise
            log.warning(
                "%s ignores If-None-Match: commits use check-then-put; rely on the "
                "coordinator's fencing against concurrent committers", self.url,
            )
            return False
        finally:
            try:
                self.delete([probe])
            except StorageBackendError as exc:  # a leftover probe is invisible to listings
                log.warning("could not delete the probe object %s: %s", probe, exc)

    def read(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        if offset < 0 or (length is not None and length < 0):
            raise StorageBackendError(f"invalid range {offset}+{length} of {path!r}", path=path)
        if length is None:
            return self._read_to_end(path, offset)
        buf = bytearray(length)
        self.read_into(path, offset, buf)
        return bytes(buf)

    def _read_to_end(self, path: str, offset: int) -> bytes:
        # One GET, not HEAD then GET: an object replaced in between must not yield a mix
        # of two versions (or a spurious "short object" error).
        key = self._key(path)

        def call() -> bytes | None:
            args: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
            if offset:
                args["Range"] = f"bytes={offset}-"
            try:
                response = self._client.get_object(**args)
            except bce.ClientError as exc:
                if offset and _error_code(exc) in ("InvalidRange", "416"):
                    return None  # at or past the end: size() tells which
                raise
            body = response["Body"]
            try:
                data = bytes(body.read())  # botocore checks the length against Content-Length
            finally:
                body.close()
            if offset and response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 200:
                data = data[offset:]  # a server that ignored the Range header
            return data

        data = self._call("reading", path, call)
        if data is not None:
            return data
        size = self.size(path)
        if offset == size:
            return b""
        raise StorageBackendError(
            f"{path!r}: offset {offset} lies past the end of the object ({size} bytes)", path=path
        )

    def read_into(self, path: str, offset: int, out: BytesLike) -> None:
        key = self._key(path)
        target = memoryview(out).cast("B")
        if not len(target):
            if self.size(path) < offset:
                raise StorageBackendError(f"{path!r} is shorter than offset {offset}", path=path)
            return
        done = 0
        etag: str | None = None

        def get(first: int, last: int) -> Any:
            nonlocal done, etag
            args: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "Range": f"bytes={first}-{last}"}
            if done and etag:
                # Resuming after a dropped connection: only from the same version of the object.
                args["IfMatch"] = etag
            try:
                return self._client.get_object(**args)
            except bce.ClientError as exc:
                if not (done and _error_code(exc) in ("PreconditionFailed", "412")):
                    raise
            # Replaced since the first bytes came: start over on the new version.
            done, etag = 0, None
            return self._client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={offset}-{last}")

        def call() -> None:
            nonlocal done, etag
            # HTTP byte ranges are inclusive; a retry fetches only what is still missing.
            last = offset + len(target) - 1
            response = get(offset + done, last)
            first = offset + done
            etag = etag or response.get("ETag")
            body = response["Body"]
            try:
                while done < len(target):
                    chunk = body.read(min(8 << 20, len(target) - done))
                    if not chunk:
                        break
                    target[done : done + len(chunk)] = chunk
                    done += len(chunk)
            finally:
                body.close()
            if done < len(target):
                if int(response.get("ContentLength", 0)) < last - first + 1:
                    raise StorageBackendError(
                        f"{path!r} ended at byte {offset + done}, expected {offset + len(target)}: the object is short",
                        path=path,
                    )
                raise bce.IncompleteReadError(actual_bytes=done, expected_bytes=len(target))

        try:
            self._call("reading", path, call)
        except StorageBackendError as exc:
            cause = exc.__cause__
            if isinstance(cause, bce.ClientError) and _error_code(cause) in ("InvalidRange", "416"):
                raise StorageBackendError(f"{path!r}: bytes {offset}..{offset + len(target) - 1} lie past the end", path=path) from cause
            raise

    def size(self, path: str) -> int:
        key = self._key(path)
        response = self._call("stat of", path, lambda: self._client.head_object(Bucket=self.bucket, Key=key))
        return int(response["ContentLength"])

    def exists(self, path: str) -> bool:
        try:
            self.size(path)
            return True
        except BlobNotFoundError:
            return False

    def list_objects(self, prefix: str = "") -> list[str]:
        base = self._key_prefix(prefix)
        found: list[str] = []
        paginator = self._client.get_paginator("list_objects_v2")

        def call() -> list[str]:
            keys: list[str] = []
            for page in paginator.paginate(Bucket=self.bucket, Prefix=base):
                keys.extend(obj["Key"] for obj in page.get("Contents", []))
            return keys

        for key in self._call("listing", prefix, call):
            rel = self._relative(key)
            if rel and not rel.startswith(".ckpt-probe/"):
                found.append(rel)
        return sorted(found)

    def list_prefixes(self, prefix: str = "") -> list[str]:
        base = self._key_prefix(prefix)
        paginator = self._client.get_paginator("list_objects_v2")

        def call() -> list[str]:
            names: list[str] = []
            for page in paginator.paginate(Bucket=self.bucket, Prefix=base, Delimiter="/"):
                names.extend(p["Prefix"][len(base):].rstrip("/") for p in page.get("CommonPrefixes", []))
            return names

        names = sorted(n for n in self._call("listing", prefix, call) if n and n != ".ckpt-probe")
        # Servers that keep objects in a file system (SeaweedFS) keep a directory after its
        # last object is deleted and list it as a common prefix (AWS never does). A prefix
        # is a "directory" only while it holds an object.
        if len(names) <= 1:
            return [n for n in names if self._holds_objects(f"{base}{n}/", prefix)]
        with ThreadPoolExecutor(min(8, len(names)), thread_name_prefix="ckpt-s3-list") as pool:
            held = list(pool.map(lambda n: self._holds_objects(f"{base}{n}/", prefix), names))
        return [n for n, h in zip(names, held) if h]

    def _holds_objects(self, key_prefix: str, prefix: str) -> bool:
        response = self._call("listing", prefix, lambda: self._client.list_objects_v2(
            Bucket=self.bucket, Prefix=key_prefix, MaxKeys=1))
        return bool(response.get("Contents"))

    def delete(self, paths: Iterable[str]) -> None:
        pairs = [(p, self._key(p)) for p in paths]
        for start in range(0, len(pairs), 1000):
            batch = pairs[start : start + 1000]

            def call(batch: list[tuple[str, str]] = batch) -> list[dict[str, Any]]:
                response = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for _, k in batch], "Quiet": True}
                )
                errors = [e for e in response.get("Errors", []) if e.get("Code") != "NoSuchKey"]
                passing = [e for e in errors if _ERRORS.get(str(e.get("Code")), (StorageBackendError, False, ""))[1]]
                if passing:
                    # Keys the server could not delete this time (throttled, 5xx) in an
                    # answer that is itself a success: the batch again (deleting is idempotent).
                    first = passing[0]
                    raise bce.ClientError(
                        {"Error": {"Code": str(first.get("Code")), "Message": f"{first.get('Message')} (key {first.get('Key')})"}},
                        "DeleteObjects",
                    )
                return errors

            errors = self._call("deleting", batch[0][0], call)
            if errors:
                first = errors[0]
                code = str(first.get("Code") or "")
                kind, _, advice = _ERRORS.get(code, (StorageBackendError, False, "unexpected error"))
                raise kind(
                    f"deleting s3://{self.bucket}/{first.get('Key')}: {code} ({first.get('Message')}): {advice}",
                    path=self._relative(str(first.get("Key", ""))),
                )

    def delete_prefix(self, prefix: str) -> None:
        if not prefix.strip("/"):
            raise InvalidPathError("refusing to delete the whole backend root", path=prefix)
        self.abort_unfinished(prefix)
        self.delete(self.list_objects(prefix))

    def abort_unfinished(self, prefix: str, older_than_seconds: float = 0.0) -> int:
        base = self._key_prefix(prefix)
        cutoff = time.time() - older_than_seconds
        paginator = self._client.get_paginator("list_multipart_uploads")

        def call() -> list[tuple[str, str]]:
            uploads = []
            for page in paginator.paginate(Bucket=self.bucket, Prefix=base):
                for upload in page.get("Uploads", []):
                    initiated = upload.get("Initiated")
                    if initiated is None or initiated.timestamp() <= cutoff:
                        uploads.append((upload["Key"], upload["UploadId"]))
            return uploads

        removed = 0
        for key, upload_id in self._call("listing unfinished uploads under", prefix, call):

            def abort(key: str = key, upload_id: str = upload_id) -> Any:
                return self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)

            try:
                self._call("aborting the upload of", self._relative(key), abort)
                removed += 1
            except StorageBackendError as exc:
                cause = exc.__cause__
                if not (isinstance(cause, bce.ClientError) and _error_code(cause) in ("NoSuchUpload", "404")):
                    raise  # an upload that vanished meanwhile (completed or aborted) is fine
        return removed

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        close = getattr(self._client, "close", None)
        if close is not None:
            close()
