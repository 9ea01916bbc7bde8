"""Exceptions raised by storage backends.

Backends know bytes only; the checkpoint layer wraps these in its own error types.
"""

from __future__ import annotations


class StorageBackendError(Exception):
    """A storage operation failed.

    Attributes:
        path: the object the operation was about ("" when it was about the backend).
        retryable: whether trying the same operation again may succeed.
    """

    def __init__(self, message: str, *, path: str = "", retryable: bool = False) -> None:
        super().__init__(message)
        self.path = path
        self.retryable = retryable


class BlobNotFoundError(StorageBackendError):
    """The object does not exist."""


class RootNotFoundError(BlobNotFoundError):
    """The backend's root itself does not exist (a local directory nobody made yet)."""


class StorageFullError(StorageBackendError):
    """The medium has no space left (ENOSPC, EDQUOT, or the service's quota)."""


class InvalidPathError(StorageBackendError):
    """A path is malformed or would leave the backend's root."""
