"""Byte movers for ckpt: one small protocol and its implementations.

Client libraries load only when used: ``S3Backend`` (botocore) is imported on first
access, and ``open_backend`` imports it only for an ``s3://`` URL, so a job on local
storage never loads botocore (nor does any of its spawned ranks).

Clients that retry calls report each retry to the observers added with
``add_retry_observer`` (ckpt counts them in its Prometheus metrics).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from storage_backends._errors import (
    BlobNotFoundError,
    InvalidPathError,
    RootNotFoundError,
    StorageBackendError,
    StorageFullError,
)
from storage_backends._local import LocalBackend
from storage_backends._protocol import (
    BlobReader,
    BlobStream,
    BytesLike,
    OpensReaders,
    StorageBackend,
    Tiered,
    as_tiered,
    open_reader,
)
from storage_backends._retries import (
    RetryObserver,
    add_retry_observer,
    remove_retry_observer,
    report_retry,
)
from storage_backends._s3_config import RetryPolicy, S3Config
from storage_backends._tiered import TieredBackend
from storage_backends._url import open_backend

if TYPE_CHECKING:
    from storage_backends._s3 import S3Backend

__all__ = [
    "BlobNotFoundError",
    "BlobReader",
    "BlobStream",
    "BytesLike",
    "InvalidPathError",
    "LocalBackend",
    "OpensReaders",
    "RetryObserver",
    "RetryPolicy",
    "RootNotFoundError",
    "S3Backend",
    "S3Config",
    "StorageBackend",
    "StorageBackendError",
    "StorageFullError",
    "Tiered",
    "TieredBackend",
    "add_retry_observer",
    "as_tiered",
    "open_backend",
    "open_reader",
    "remove_retry_observer",
    "report_retry",
]


def __getattr__(name: str) -> Any:
    # PEP 562: the S3 backend, and botocore with it, load on first use.
    if name == "S3Backend":
        from storage_backends._s3 import S3Backend

        return S3Backend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
