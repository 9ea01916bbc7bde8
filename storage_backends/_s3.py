"""S3 (and S3-compatible: MinIO, Ceph RGW, R2, SeaweedFS) backend, through botocore.

Large objects stream as multipart uploads with several parts in flight and bounded
memory (``_s3_stream``); the parts are zero-copy views of the caller's buffers, which
therefore must stay unchanged until ``commit()`` or ``abort()`` returns. Small objects
are one PUT. Reads are ranged GETs. The commit object is created with
``If-None-Match: *`` so two committers can never both win; servers that ignore the
header are detected once and then a check-then-put scheme is used, which keeps I1 and
leaves fencing (I4) to the coordinator (see docs/FORMAT.md).

Every call goes through ``S3Client.call`` (``_s3_client``): one tenacity policy
(full-jitter exponential backoff, bounded attempts and total time) that retries only
what may succeed on a second try (throttling, 5xx, timeouts, dropped connections,
bodies that end early), and one error table (``_s3_errors``) that turns every other
answer into a ``StorageBackendError`` subclass naming bucket, key and the fix. Retried
calls are idempotent: same key, same bytes.

Modules: ``_s3_config`` (settings, no client library), ``_s3_errors`` (the table),
``_s3_client`` (keys, retries, object calls), ``_s3_stream`` (multipart), this one (the
``StorageBackend`` protocol).
"""

from __future__ import annotations

import http.client
import logging
import threading
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import botocore.exceptions as bce

from storage_backends._errors import BlobNotFoundError, InvalidPathError, StorageBackendError
from storage_backends._protocol import BytesLike
from storage_backends._s3_client import S3Client
from storage_backends._s3_config import S3Config
from storage_backends._s3_errors import (
    InvalidRangeError,
    PreconditionFailedError,
    UploadGoneError,
    maps_to,
    rule_for,
)
from storage_backends._s3_stream import S3Stream

log = logging.getLogger(__name__)

_PROBE_DIR = ".ckpt-probe"  # where the conditional-put probe writes; never listed
_DELETE_BATCH = 1000  # S3's limit of keys per DeleteObjects


def _read_body_into(body: Any, out: memoryview) -> int:
    """Read a GET's body into ``out`` until it ends or ``out`` is full; returns the count.

    The bytes go straight from the socket into ``out`` through the ``http.client``
    response under urllib3's (its ``readinto`` reads into a temporary ``bytes`` and
    copies, which costs an allocation and a copy per call). That response is urllib3's
    internal ``_fp``; where it is absent or the body is content-encoded, botocore's own
    ``readinto`` is used. A body read to its end hands its connection back to the pool.
    """
    raw: Any = getattr(body, "_raw_stream", None)
    fp: Any = getattr(raw, "_fp", None)
    if not isinstance(fp, http.client.HTTPResponse) or raw.headers.get("content-encoding"):
        fp = None
    reader = body if fp is None else fp
    done = 0
    while done < len(out):
        try:
            n = reader.readinto(out[done:])
        except (http.client.HTTPException, OSError) as exc:
            raise bce.ResponseStreamingError(error=exc) from exc
        if not n:
            break
        done += n
    if fp is not None and fp.isclosed():
        raw.release_conn()
    return done


class S3Backend:
    """Objects under ``s3://bucket/prefix``.

    Args:
        url: ``s3://bucket`` or ``s3://bucket/prefix``.
        config: endpoint, credentials, part size, retries...
        client: a ready boto3 S3 client (tests, custom sessions).
    """

    def __init__(self, url: str, config: S3Config | None = None, *, client: Any = None) -> None:
        self._s3 = S3Client(url, config or S3Config(), client)
        self._conditional: bool | None = {"on": True, "off": False}.get(self.config.conditional_put)
        self._probe_lock = threading.Lock()

    @property
    def bucket(self) -> str:
        return self._s3.bucket

    @property
    def prefix(self) -> str:
        return self._s3.prefix

    @property
    def config(self) -> S3Config:
        return self._s3.config

    @property
    def url(self) -> str:
        return self._s3.url

    # -- writes --------------------------------------------------------------------------

    def write(self, path: str, data: BytesLike) -> None:
        view = memoryview(data).cast("B")
        if len(view) <= self.config.part_size:
            self._s3.put(path, [view])
            return
        stream = self.open_stream(path)
        try:
            stream.write(view)
            stream.commit()
        except BaseException:
            stream.abort()
            raise

    def open_stream(self, path: str) -> S3Stream:
        return S3Stream(self._s3, path)

    def put_if_absent(self, path: str, data: BytesLike) -> bool:
        self._s3.key(path)  # a malformed path fails before any request (or probe)
        view = memoryview(data).cast("B")
        if not self._conditional_supported():
            if self.exists(path):
                return False
            self._s3.put(path, [view])
            return True
        try:
            self._s3.put(path, [view], IfNoneMatch="*")
            return True
        except PreconditionFailedError:
            pass
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
        probe = f"{_PROBE_DIR}/{uuid.uuid4().hex}"
        try:
            try:
                self._s3.put(probe, [memoryview(b"1")], IfNoneMatch="*")
            except PreconditionFailedError:
                return True  # an earlier try of this very PUT landed: the header is honoured
            try:
                self._s3.put(probe, [memoryview(b"2")], IfNoneMatch="*")
            except PreconditionFailedError:
                return True
            log.warning(
                "%s ignores If-None-Match: commits use check-then-put; rely on the "
                "coordinator's fencing against concurrent committers",
                self.url,
            )
            return False
        finally:
            try:
                self.delete([probe])
            except StorageBackendError as exc:  # a leftover probe is invisible to listings
                log.warning("could not delete the probe object %s: %s", probe, exc)

    # -- reads ---------------------------------------------------------------------------

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
        s3, key = self._s3, self._s3.key(path)

        def call() -> bytes | None:
            args: dict[str, Any] = {"Bucket": s3.bucket, "Key": key}
            if offset:
                args["Range"] = f"bytes={offset}-"
            try:
                response = s3.boto.get_object(**args)
            except bce.ClientError as exc:
                if offset and maps_to(exc, InvalidRangeError):
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

        data = s3.call("reading", path, call)
        if data is not None:
            return data
        size = self.size(path)
        if offset == size:
            return b""
        raise StorageBackendError(
            f"{path!r}: offset {offset} lies past the end of the object ({size} bytes)", path=path
        )

    def read_into(self, path: str, offset: int, out: BytesLike) -> None:
        s3, key = self._s3, self._s3.key(path)
        target = memoryview(out).cast("B")
        if not len(target):
            if self.size(path) < offset:
                raise StorageBackendError(f"{path!r} is shorter than offset {offset}", path=path)
            return
        done = 0
        etag: str | None = None

        def get(first: int, last: int) -> Any:
            nonlocal done, etag
            args: dict[str, Any] = {
                "Bucket": s3.bucket,
                "Key": key,
                "Range": f"bytes={first}-{last}",
            }
            if done and etag:
                # Resuming after a dropped connection: only from the same version of the object.
                args["IfMatch"] = etag
            try:
                return s3.boto.get_object(**args)
            except bce.ClientError as exc:
                if not (done and maps_to(exc, PreconditionFailedError)):
                    raise
            # Replaced since the first bytes came: start over on the new version.
            done, etag = 0, None
            return s3.boto.get_object(Bucket=s3.bucket, Key=key, Range=f"bytes={offset}-{last}")

        def call() -> None:
            nonlocal done, etag
            # HTTP byte ranges are inclusive; a retry fetches only what is still missing.
            last = offset + len(target) - 1
            response = get(offset + done, last)
            first = offset + done
            etag = etag or response.get("ETag")
            body = response["Body"]
            try:
                done += _read_body_into(body, target[done:])
            finally:
                body.close()
            if done < len(target):
                if int(response.get("ContentLength", 0)) < last - first + 1:
                    raise StorageBackendError(
                        f"{path!r} ended at byte {offset + done}, expected {offset + len(target)}: "
                        "the object is short",
                        path=path,
                    )
                raise bce.IncompleteReadError(actual_bytes=done, expected_bytes=len(target))

        try:
            s3.call("reading", path, call)
        except InvalidRangeError as exc:
            raise StorageBackendError(
                f"{path!r}: bytes {offset}..{offset + len(target) - 1} lie past the end", path=path
            ) from exc.__cause__

    def size(self, path: str) -> int:
        s3, key = self._s3, self._s3.key(path)
        response = s3.call("stat of", path, lambda: s3.boto.head_object(Bucket=s3.bucket, Key=key))
        return int(response["ContentLength"])

    def exists(self, path: str) -> bool:
        try:
            self.size(path)
            return True
        except BlobNotFoundError:
            return False

    # -- listings ------------------------------------------------------------------------

    def list_objects(self, prefix: str = "") -> list[str]:
        s3, base = self._s3, self._s3.key_prefix(prefix)
        paginator = s3.boto.get_paginator("list_objects_v2")

        def call() -> list[str]:
            keys: list[str] = []
            for page in paginator.paginate(Bucket=s3.bucket, Prefix=base):
                keys.extend(obj["Key"] for obj in page.get("Contents", []))
            return keys

        found = (s3.relative(key) for key in s3.call("listing", prefix, call))
        return sorted(rel for rel in found if rel and not rel.startswith(f"{_PROBE_DIR}/"))

    def list_prefixes(self, prefix: str = "") -> list[str]:
        s3, base = self._s3, self._s3.key_prefix(prefix)
        paginator = s3.boto.get_paginator("list_objects_v2")

        def call() -> list[str]:
            names: list[str] = []
            for page in paginator.paginate(Bucket=s3.bucket, Prefix=base, Delimiter="/"):
                common = page.get("CommonPrefixes", [])
                names.extend(p["Prefix"][len(base) :].rstrip("/") for p in common)
            return names

        names = sorted(n for n in s3.call("listing", prefix, call) if n and n != _PROBE_DIR)
        # Servers that keep objects in a file system (SeaweedFS) keep a directory after its
        # last object is deleted and list it as a common prefix (AWS never does). A prefix
        # is a "directory" only while it holds an object.
        if len(names) <= 1:
            return [n for n in names if self._holds_objects(f"{base}{n}/", prefix)]
        with ThreadPoolExecutor(min(8, len(names)), thread_name_prefix="ckpt-s3-list") as pool:
            held = list(pool.map(lambda n: self._holds_objects(f"{base}{n}/", prefix), names))
        return [n for n, h in zip(names, held) if h]

    def _holds_objects(self, key_prefix: str, prefix: str) -> bool:
        s3 = self._s3
        response = s3.call(
            "listing",
            prefix,
            lambda: s3.boto.list_objects_v2(Bucket=s3.bucket, Prefix=key_prefix, MaxKeys=1),
        )
        return bool(response.get("Contents"))

    # -- deletes -------------------------------------------------------------------------

    def delete(self, paths: Iterable[str]) -> None:
        s3 = self._s3
        pairs = [(p, s3.key(p)) for p in paths]
        for start in range(0, len(pairs), _DELETE_BATCH):
            batch = pairs[start : start + _DELETE_BATCH]

            def call(batch: list[tuple[str, str]] = batch) -> list[dict[str, Any]]:
                objects = [{"Key": k} for _, k in batch]
                response = s3.boto.delete_objects(
                    Bucket=s3.bucket, Delete={"Objects": objects, "Quiet": True}
                )
                # Per-key errors come inside an answer that is itself a success.
                errors = [
                    e
                    for e in response.get("Errors", [])
                    if not issubclass(rule_for(str(e.get("Code") or "")).kind, BlobNotFoundError)
                ]
                passing = [e for e in errors if rule_for(str(e.get("Code") or "")).retryable]
                if passing:
                    # Keys the server could not delete this time (throttled, 5xx): the
                    # batch again, through the retry policy (deleting is idempotent).
                    first = passing[0]
                    raise bce.ClientError(
                        {
                            "Error": {
                                "Code": str(first.get("Code")),
                                "Message": f"{first.get('Message')} (key {first.get('Key')})",
                            }
                        },
                        "DeleteObjects",
                    )
                return errors

            errors = s3.call("deleting", batch[0][0], call)
            if errors:
                first = errors[0]
                code = str(first.get("Code") or "")
                rule = rule_for(code)
                raise rule.kind(
                    f"deleting s3://{s3.bucket}/{first.get('Key')}: "
                    f"{code} ({first.get('Message')}): {rule.advice}",
                    path=s3.relative(str(first.get("Key", ""))),
                )

    def delete_prefix(self, prefix: str) -> None:
        if not prefix.strip("/"):
            raise InvalidPathError("refusing to delete the whole backend root", path=prefix)
        self.abort_unfinished(prefix)
        self.delete(self.list_objects(prefix))

    def abort_unfinished(self, prefix: str, older_than_seconds: float = 0.0) -> int:
        s3, base = self._s3, self._s3.key_prefix(prefix)
        cutoff = time.time() - older_than_seconds
        paginator = s3.boto.get_paginator("list_multipart_uploads")

        def call() -> list[tuple[str, str]]:
            uploads = []
            for page in paginator.paginate(Bucket=s3.bucket, Prefix=base):
                for upload in page.get("Uploads", []):
                    initiated = upload.get("Initiated")
                    if initiated is None or initiated.timestamp() <= cutoff:
                        uploads.append((upload["Key"], upload["UploadId"]))
            return uploads

        removed = 0
        for key, upload_id in s3.call("listing unfinished uploads under", prefix, call):
            try:
                s3.abort_upload(s3.relative(key), upload_id, key=key)
                removed += 1
            except (UploadGoneError, BlobNotFoundError):
                pass  # an upload that vanished meanwhile (completed or aborted) is fine
        return removed

    def close(self) -> None:
        self._s3.close()

    def last_modified(self, prefix: str) -> float | None:
        """Newest ``LastModified`` of the object ``prefix`` or of the objects under it, and
        of the parts of unfinished multipart uploads there (or when they were started)."""
        s3 = self._s3
        base = s3.key_prefix(prefix)
        exact = base.rstrip("/")  # the object itself; "" is the bucket root
        start = exact if prefix.strip("/") else base

        def ours(key: str) -> bool:
            return key == exact or key.startswith(base)

        def call() -> list[float]:
            times: list[float] = []
            for page in s3.boto.get_paginator("list_objects_v2").paginate(
                Bucket=s3.bucket, Prefix=start
            ):
                times += [
                    o["LastModified"].timestamp()
                    for o in page.get("Contents", [])
                    if ours(o["Key"])
                ]
            uploads = s3.boto.get_paginator("list_multipart_uploads")
            for page in uploads.paginate(Bucket=s3.bucket, Prefix=start):
                for upload in page.get("Uploads", []):
                    if not ours(upload["Key"]):
                        continue
                    times.append(upload["Initiated"].timestamp())
                    parts = s3.boto.get_paginator("list_parts").paginate(
                        Bucket=s3.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
                    times += [
                        p["LastModified"].timestamp() for pg in parts for p in pg.get("Parts", [])
                    ]
            return times

        try:
            times = s3.call("listing modification times under", prefix, call)
        except UploadGoneError:
            # An upload ended while its parts were listed: something was just written.
            return time.time()
        return max(times, default=None)
