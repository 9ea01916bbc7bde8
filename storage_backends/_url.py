"""Pick a backend from a URL."""

from __future__ import annotations

import os
from urllib.parse import unquote, urlparse

from storage_backends._errors import StorageBackendError
from storage_backends._local import LocalBackend
from storage_backends._protocol import StorageBackend
from storage_backends._s3_config import S3Config


def open_backend(
    url: str | os.PathLike[str], *, s3_config: S3Config | None = None, create: bool = True
) -> StorageBackend:
    """Open the backend for ``url``: a plain path, ``file://`` URL or ``s3://bucket/prefix``.

    Args:
        url: where the checkpoints live.
        s3_config: settings of the S3 backend (default: boto3's environment: credentials
            chain, ``AWS_ENDPOINT_URL``, region).
        create: make a local root now; False for readers, which must never create one
            (see ``LocalBackend``). S3 never creates a bucket.

    Raises:
        StorageBackendError: the URL is empty or malformed, or its scheme is not supported.
    """
    text = os.fspath(url)
    if not text.strip():
        # An unset setting must not silently turn the current directory into the root.
        raise StorageBackendError("empty storage URL: give a directory or a file:///path URL")
    parsed = urlparse(text)
    if parsed.scheme in ("", "file") or (len(parsed.scheme) == 1 and os.name == "nt"):
        if parsed.scheme == "file":
            if parsed.netloc not in ("", "localhost"):
                raise StorageBackendError(f"file URL with a host is not supported: {text!r}")
            if not parsed.path or parsed.query or parsed.fragment:
                raise StorageBackendError(
                    f"file URL {text!r} has no path, or a '?' or '#' that would be dropped: "
                    "use file:///absolute/path with those characters percent-encoded"
                )
            return LocalBackend(unquote(parsed.path), create=create)
        return LocalBackend(text, create=create)
    if parsed.scheme == "s3":
        from storage_backends._s3 import S3Backend  # botocore loads only for S3 URLs

        return S3Backend(text, s3_config)
    raise StorageBackendError(
        f"unsupported storage URL scheme {parsed.scheme!r} in {text!r}: use a local path, file:// "
        "or s3://"
    )
