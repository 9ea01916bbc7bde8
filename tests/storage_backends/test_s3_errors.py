"""The S3 error table: how an answer's code and HTTP status decide the error class and
whether to retry (the servers' real answers are exercised in ``test_s3_backend``)."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError

from storage_backends import BlobNotFoundError, StorageBackendError, StorageFullError
from storage_backends._s3_errors import (
    InvalidRangeError,
    PreconditionFailedError,
    UploadGoneError,
    is_retryable,
    maps_to,
    to_error,
)


def answer(code: str, status: int, message: str = "") -> ClientError:
    """A ``ClientError`` as botocore builds it (HEAD answers have the status as code)."""
    error = {"Code": code, "Message": message} if code else {}
    return ClientError({"Error": error, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op")


@pytest.mark.parametrize(
    ("code", "status", "kind", "retryable"),
    [
        ("NoSuchKey", 404, BlobNotFoundError, False),
        ("404", 404, BlobNotFoundError, False),  # HEAD
        ("", 404, BlobNotFoundError, False),
        ("NoSuchBucket", 404, StorageBackendError, False),  # a 404 that is not "not found"
        ("NoSuchUpload", 404, UploadGoneError, False),
        ("PreconditionFailed", 412, PreconditionFailedError, False),
        ("412", 412, PreconditionFailedError, False),
        ("InvalidRange", 416, InvalidRangeError, False),
        ("QuotaExceeded", 403, StorageFullError, False),
        ("AccessDenied", 403, StorageBackendError, False),
        ("SlowDown", 503, StorageBackendError, True),
        ("429", 429, StorageBackendError, True),
        ("SomethingNew", 500, StorageBackendError, True),  # unknown codes: 5xx retries
        ("SomethingNew", 501, StorageBackendError, True),
        ("SomethingNew", 400, StorageBackendError, False),
    ],
)
def test_code_and_status_decide_class_and_retry(
    code: str, status: int, kind: type[StorageBackendError], retryable: bool
) -> None:
    """The code decides when the table knows it, else the status; the error names the
    object, the code and the fix."""
    exc = answer(code, status, "said the server")
    error = to_error(exc, "reading", "s3://bucket/run/obj", "obj")
    assert type(error) is kind
    assert error.retryable is retryable and is_retryable(exc) is retryable
    assert error.path == "obj" and "s3://bucket/run/obj" in str(error)
    assert (code or str(status)) in str(error)
    assert maps_to(exc, kind)


def test_only_server_answers_map() -> None:
    """Exceptions that are not S3 answers map to nothing."""
    assert not maps_to(ValueError("x"), StorageBackendError)
    assert not is_retryable(ValueError("x"))
    assert is_retryable(ConnectionResetError())
