"""Opening a checkpoint root from a URL, without importing torch (the CLI's fast paths)."""

from __future__ import annotations

import os

from ckpt.errors import StorageError
from storage_backends import S3Config, StorageBackend, StorageBackendError, open_backend


def open_url(
    url: str | os.PathLike[str] | StorageBackend,
    *,
    create: bool = True,
    s3_config: S3Config | None = None,
) -> StorageBackend:
    """A storage backend for ``url`` (a backend object is passed through).

    Args:
        url: a local path, ``file://`` or ``s3://`` URL, or a backend.
        create: make a local root now (writers). Readers pass False: they never create
            anything, and listing a root that does not exist raises
            ``storage_backends.RootNotFoundError`` ("no such checkpoint root").
        s3_config: settings of an S3 backend (default: the environment's).

    Raises:
        StorageError: the URL is malformed, or the root cannot be opened.
    """
    if not isinstance(url, (str, os.PathLike)):
        return url
    try:
        return open_backend(url, s3_config=s3_config, create=create)
    except StorageBackendError as exc:
        raise StorageError(str(exc), retryable=exc.retryable) from exc
