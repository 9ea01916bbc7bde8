"""S3 answers -> this package's errors: one table, consulted for every decision.

An S3 error names itself twice: an error code in the body (``NoSuchKey``) and an HTTP
status (404); answers to HEAD requests have no body, and botocore then reports the
status as the code. ``rule_for`` looks the code up first, and the status where the code
says nothing (absent, numeric, or unknown on a 5xx). The rule gives the exception
class, whether trying again may help, and what to do. Code that must react to one
particular answer (a refused condition, a range past the end, a vanished upload) asks
``maps_to(exc, SomeError)``; nothing compares code strings elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import botocore.exceptions as bce

from storage_backends._errors import BlobNotFoundError, StorageBackendError, StorageFullError


class PreconditionFailedError(StorageBackendError):
    """A condition of the request (``If-None-Match`` / ``If-Match``) did not hold (412)."""


class InvalidRangeError(StorageBackendError):
    """The requested byte range starts past the end of the object (416)."""


class UploadGoneError(StorageBackendError):
    """The multipart upload no longer exists: completed, or aborted (by GC?)."""


@dataclass(frozen=True)
class ErrorRule:
    """What one S3 answer means: the exception to raise, whether to retry, and the fix."""

    kind: type[StorageBackendError]
    retryable: bool
    advice: str


def _fails(advice: str, kind: type[StorageBackendError] = StorageBackendError) -> ErrorRule:
    return ErrorRule(kind, False, advice)


def _transient(advice: str) -> ErrorRule:
    return ErrorRule(StorageBackendError, True, advice)


_MISSING = _fails("the object does not exist", BlobNotFoundError)
_DENIED = _fails("access denied: check the credentials and the bucket policy")
_THROTTLED = _transient("throttled")
_SERVER = _transient("server error")
_UNAVAILABLE = _transient("server unavailable")
_PRECONDITION = _fails("a condition of the request did not hold", PreconditionFailedError)
_RANGE = _fails("the range lies past the end of the object", InvalidRangeError)
_UNEXPECTED = _fails("unexpected error")
_UNEXPECTED_SERVER = _transient("unexpected server error")

_BY_CODE: dict[str, ErrorRule] = {
    "NoSuchKey": _MISSING,
    "NotFound": _MISSING,
    "NoSuchBucket": _fails("the bucket does not exist: create it or fix the URL"),
    "AccessDenied": _DENIED,
    "Forbidden": _DENIED,
    "InvalidAccessKeyId": _fails("unknown access key: check the credentials"),
    "SignatureDoesNotMatch": _fails("bad secret key or clock skew: check the credentials"),
    "AllAccessDisabled": _fails("access to the bucket is disabled"),
    "QuotaExceeded": _fails(
        "the storage quota is exhausted: free space or raise the quota", StorageFullError
    ),
    "EntityTooLarge": _fails("object too large: lower part_size or split the data"),
    "NoSuchUpload": _fails("the multipart upload was aborted (by GC?)", UploadGoneError),
    "PreconditionFailed": _PRECONDITION,
    "InvalidRange": _RANGE,
    "SlowDown": _THROTTLED,
    "Throttling": _THROTTLED,
    "ThrottlingException": _THROTTLED,
    "RequestLimitExceeded": _THROTTLED,
    "TooManyRequests": _THROTTLED,
    "InternalError": _SERVER,
    "ServiceUnavailable": _UNAVAILABLE,
    "RequestTimeout": _transient("request timed out"),
    "RequestTimeTooSkewed": _fails("the clock is skewed: fix the host's time"),
    "IncompleteBody": _transient("the body ended early"),
    "ConditionalRequestConflict": _transient("a concurrent conditional write"),
    "OperationAborted": _transient("a conflicting operation is in progress"),
}

_BY_STATUS: dict[int, ErrorRule] = {
    403: _DENIED,
    404: _MISSING,
    412: _PRECONDITION,
    416: _RANGE,
    429: _THROTTLED,
    500: _SERVER,
    502: _transient("bad gateway"),
    503: _UNAVAILABLE,
    504: _transient("gateway timeout"),
}

# Failures below HTTP: the request may not have reached the server, or its answer was lost.
TRANSIENT: tuple[type[BaseException], ...] = (
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


def rule_for(code: str, status: int = 0) -> ErrorRule:
    """The rule for an answer with error ``code`` and HTTP ``status`` (0: unknown)."""
    rule = _BY_CODE.get(code)
    if rule is not None:
        return rule
    if not code or code.isdigit() or status >= 500:  # the status says more than the code
        rule = _BY_STATUS.get(status or int(code or 0))
        if rule is not None:
            return rule
    return _UNEXPECTED_SERVER if status >= 500 else _UNEXPECTED


def _code_and_status(exc: bce.ClientError) -> tuple[str, int]:
    response: dict[str, Any] = exc.response
    code = str(response.get("Error", {}).get("Code") or "")
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    return code, status


def _rule_of(exc: BaseException) -> ErrorRule | None:
    if isinstance(exc, bce.ClientError):
        return rule_for(*_code_and_status(exc))
    return None


def maps_to(exc: BaseException, kind: type[StorageBackendError]) -> bool:
    """Whether ``exc`` is an S3 answer that the table turns into ``kind`` (or a subclass)."""
    rule = _rule_of(exc)
    return rule is not None and issubclass(rule.kind, kind)


def is_retryable(exc: BaseException) -> bool:
    """Whether trying the same call again may succeed (the retry predicate)."""
    if isinstance(exc, TRANSIENT):
        return True
    rule = _rule_of(exc)
    return rule is not None and rule.retryable


def to_error(exc: bce.ClientError, what: str, where: str, path: str) -> StorageBackendError:
    """The exception for S3's answer ``exc`` to ``what`` on ``where`` (an ``s3://`` URL)."""
    code, status = _code_and_status(exc)
    rule = rule_for(code, status)
    shown = code or str(status)
    message = exc.response.get("Error", {}).get("Message") or shown
    return rule.kind(
        f"{what} {where}: {shown} ({message}): {rule.advice}", path=path, retryable=rule.retryable
    )
