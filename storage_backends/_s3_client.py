"""The S3 calls shared by the backend and its multipart streams.

``S3Client`` is one bucket and key prefix behind one botocore client: it maps object
paths to keys, runs every call through the retry policy and the error table
(``_s3_errors``), and makes the object-level calls both the backend and its streams
need (single PUTs, the steps of a multipart upload), plus the thread pool that uploads
parts. Streams get this object, never the backend.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import urlparse

import botocore.exceptions as bce
import botocore.session
from botocore.config import Config
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from storage_backends._errors import InvalidPathError, StorageBackendError
from storage_backends._retries import report_retry
from storage_backends._s3_config import S3Config
from storage_backends._s3_errors import TRANSIENT, UploadGoneError, is_retryable, maps_to, to_error

log = logging.getLogger(__name__)

T = TypeVar("T")

# Integrity checksums S3 may return per part; the completion must repeat them.
_PART_CHECKSUMS = (
    "ChecksumCRC32",
    "ChecksumCRC32C",
    "ChecksumSHA1",
    "ChecksumSHA256",
    "ChecksumCRC64NVME",
)

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


class ViewReader(io.RawIOBase):
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


class S3Client:
    """Objects of one ``s3://bucket/prefix`` through one botocore client.

    Args:
        url: ``s3://bucket`` or ``s3://bucket/prefix``.
        config: endpoint, credentials, part size, retries...
        boto: a ready botocore/boto3 S3 client (tests, custom sessions); else one is made.

    Attributes:
        bucket / prefix / config: as given.
        boto: the botocore client (for calls this class does not wrap; run them through
            ``call``).
    """

    def __init__(self, url: str, config: S3Config, boto: Any = None) -> None:
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise StorageBackendError(f"not an S3 URL: {url!r} (expected s3://bucket/prefix)")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.config = config
        self.endpoint = (
            config.endpoint_url
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
        )
        self.boto = boto or self._make_boto()
        self._pool = ThreadPoolExecutor(
            max(4, config.max_concurrency * 2), thread_name_prefix="ckpt-s3"
        )

    def _make_boto(self) -> Any:
        cfg = self.config
        endpoint = self.endpoint
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
                request_checksum_calculation=(
                    "when_required" if cfg.checksum_algorithm is None else "when_supported"
                ),
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

    # -- paths and keys --------------------------------------------------------------------

    def key(self, path: str) -> str:
        """The key of object ``path``; ``InvalidPathError`` for a malformed path."""
        parts = path.split("/")
        if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise InvalidPathError(f"invalid object path {path!r}", path=path)
        return f"{self.prefix}/{path}" if self.prefix else path

    def key_prefix(self, prefix: str) -> str:
        """The key prefix of "directory" ``prefix``, ending in ``/`` ("" for the bucket root)."""
        prefix = prefix.strip("/")
        if prefix:
            self.key(prefix)
        base = "/".join(p for p in (self.prefix, prefix) if p)
        return f"{base}/" if base else ""

    def relative(self, key: str) -> str:
        """The object path of ``key`` (the inverse of ``key``)."""
        return key[len(self.prefix) + 1 :] if self.prefix else key

    def where(self, path: str) -> str:
        """``s3://bucket/key`` of ``path`` for messages (a malformed path as given)."""
        try:
            key = self.key(path) if path else self.prefix
        except InvalidPathError:
            key = path
        return f"s3://{self.bucket}/{key}"

    # -- the one way calls are made ------------------------------------------------------------

    def call(self, what: str, path: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` (botocore calls) under the retry policy; failures become
        ``StorageBackendError`` subclasses (through the error table) naming ``what`` and
        the object."""
        policy = self.config.retry
        retrying = Retrying(
            stop=stop_after_attempt(policy.attempts) | stop_after_delay(policy.total_seconds),
            wait=wait_random_exponential(multiplier=policy.initial_seconds, max=policy.max_seconds),
            retry=retry_if_exception(is_retryable),
            sleep=policy.sleep,
            before_sleep=lambda state: self._log_retry(what, path, state),
            reraise=True,
        )
        try:
            for attempt in retrying:
                if attempt.retry_state.attempt_number > 1:
                    report_retry("s3", what)
                with attempt:
                    return fn()
        except StorageBackendError:
            raise
        except bce.ClientError as exc:
            raise to_error(exc, what, self.where(path), path) from exc
        except TRANSIENT as exc:
            tries = retrying.statistics.get("attempt_number", 1)
            raise StorageBackendError(
                f"{what} {self.where(path)} failed after {tries} tries: {exc}: check that the "
                f"S3 endpoint {self._endpoint_name()} is right and reachable from this host",
                path=path,
                retryable=True,
            ) from exc
        except bce.NoCredentialsError as exc:
            raise StorageBackendError(
                f"{what} {self.where(path)}: no S3 credentials found: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or S3Config's keys "
                f"(endpoint {self._endpoint_name()})",
                path=path,
            ) from exc
        except bce.BotoCoreError as exc:
            raise StorageBackendError(f"{what} {self.where(path)}: {exc}", path=path) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _endpoint_name(self) -> str:
        return self.endpoint or "(AWS's default; set AWS_ENDPOINT_URL for another server)"

    def _log_retry(self, what: str, path: str, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "%s %s: %s; retry %d of %d in %.2f s (endpoint %s)",
            what,
            self.where(path),
            exc if exc is not None else "failed",
            state.attempt_number,
            self.config.retry.attempts - 1,
            state.upcoming_sleep,
            self.endpoint or "AWS",
        )

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run ``fn(*args)`` on the upload threads."""
        return self._pool.submit(fn, *args)

    # -- object calls ---------------------------------------------------------------------------

    def _put_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {}
        if self.config.sse:
            args["ServerSideEncryption"] = self.config.sse
        if self.config.sse_kms_key_id:
            args["SSEKMSKeyId"] = self.config.sse_kms_key_id
        if self.config.checksum_algorithm:
            args["ChecksumAlgorithm"] = self.config.checksum_algorithm
        return args

    def put(self, path: str, views: Sequence[memoryview], **extra: Any) -> Any:
        """One PUT of the concatenation of ``views`` (zero-copy); ``extra`` adds headers."""
        key = self.key(path)
        args = {**self._put_args(), **extra}

        def call() -> Any:
            body = ViewReader(views)
            return self.boto.put_object(
                Bucket=self.bucket, Key=key, Body=body, ContentLength=len(body), **args
            )

        return self.call("writing", path, call)

    def create_upload(self, path: str) -> str:
        """Start a multipart upload of ``path``; returns its id."""
        key = self.key(path)
        args = self._put_args()
        response = self.call(
            "starting the upload of",
            path,
            lambda: self.boto.create_multipart_upload(Bucket=self.bucket, Key=key, **args),
        )
        return str(response["UploadId"])

    def upload_part(
        self, path: str, upload_id: str, number: int, views: Sequence[memoryview]
    ) -> dict[str, Any]:
        """Upload part ``number`` (the concatenation of ``views``); returns its entry for
        the completion."""
        key = self.key(path)

        def call() -> dict[str, Any]:
            body = ViewReader(views)
            args = {
                "Bucket": self.bucket,
                "Key": key,
                "UploadId": upload_id,
                "PartNumber": number,
                "Body": body,
                "ContentLength": len(body),
            }
            if self.config.checksum_algorithm:
                args["ChecksumAlgorithm"] = self.config.checksum_algorithm
            response = self.boto.upload_part(**args)
            part = {"PartNumber": number, "ETag": response["ETag"]}
            part.update({name: response[name] for name in _PART_CHECKSUMS if name in response})
            return part

        return self.call(f"uploading part {number} of", path, call)

    def complete_upload(self, path: str, upload_id: str, parts: list[dict[str, Any]]) -> None:
        """Complete the upload: the object appears under ``path``, atomically."""
        key = self.key(path)
        tries = 0

        def call() -> None:
            nonlocal tries
            tries += 1
            try:
                self.boto.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                )
            except bce.ClientError as exc:
                # A retry after a completion whose answer was lost: the upload is gone
                # because it became the object. Anything else is a real failure.
                lost_answer = tries > 1 and maps_to(exc, UploadGoneError)
                if not (lost_answer and self._is_completed(key, parts)):
                    raise

        self.call("completing", path, call)

    def _is_completed(self, key: str, parts: list[dict[str, Any]]) -> bool:
        """Whether the object now under ``key`` is the upload of ``parts`` (its multipart ETag)."""
        try:
            digests = b"".join(bytes.fromhex(str(p["ETag"]).strip('"')) for p in parts)
        except ValueError:  # ETags that are not MD5s (SSE-KMS): cannot tell
            return False
        expected = f'"{hashlib.md5(digests, usedforsecurity=False).hexdigest()}-{len(parts)}"'
        try:
            head = self.boto.head_object(Bucket=self.bucket, Key=key)
        except bce.ClientError:
            return False
        return str(head.get("ETag")) == expected

    def abort_upload(self, path: str, upload_id: str, *, key: str | None = None) -> None:
        """Abort a multipart upload of ``path`` (by its ``key`` when given)."""
        key = key or self.key(path)
        self.call(
            "aborting the upload of",
            path,
            lambda: self.boto.abort_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id
            ),
        )

    def close(self) -> None:
        """Wait for part uploads in flight, then close the connections."""
        self._pool.shutdown(wait=True)
        self.boto.close()
