"""Byte movers for ckpt: one small protocol and its implementations."""

from storage_backends._errors import (
    BlobNotFoundError,
    InvalidPathError,
    StorageBackendError,
    StorageFullError,
)
from storage_backends._local import LocalBackend
from storage_backends._protocol import BlobStream, BytesLike, StorageBackend, Tiered, as_tiered
from storage_backends._s3 import S3Backend
from storage_backends._s3_config import RetryPolicy, S3Config
from storage_backends._tiered import TieredBackend
from storage_backends._url import open_backend

__all__ = [
    "BlobNotFoundError",
    "BlobStream",
    "BytesLike",
    "InvalidPathError",
    "LocalBackend",
    "RetryPolicy",
    "S3Backend",
    "S3Config",
    "StorageBackend",
    "StorageBackendError",
    "StorageFullError",
    "Tiered",
    "TieredBackend",
    "as_tiered",
    "open_backend",
]
