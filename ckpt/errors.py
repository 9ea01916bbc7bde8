"""The exceptions ckpt raises. Catch ``CheckpointError`` for all of them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from storage_backends import (
    BlobNotFoundError,
    InvalidPathError,
    StorageBackendError,
    StorageFullError,
)


class CheckpointError(Exception):
    """Base class of every error this library raises on purpose."""


class CheckpointNotFoundError(CheckpointError):
    """No committed checkpoint matches the request (URL, step)."""


class CorruptCheckpointError(CheckpointError):
    """Stored bytes do not match what the manifest promises (checksum, size, syntax, paths)."""


class ChecksumMismatchError(CorruptCheckpointError):
    """A stored chunk's checksum differs from the manifest's.

    Attributes:
        file: the data file, relative to the checkpoint prefix.
        tensor: the tensor the chunk belongs to.
        byte_range: first and last byte (inclusive) of the chunk in the file.
    """

    def __init__(
        self, message: str, *, file: str, tensor: str, byte_range: tuple[int, int]
    ) -> None:
        super().__init__(message)
        self.file = file
        self.tensor = tensor
        self.byte_range = byte_range


class UnsupportedFormatError(CorruptCheckpointError):
    """The checkpoint was written in a format version this library cannot read."""


class StateMismatchError(CheckpointError):
    """The state to load into does not match the checkpoint (keys, shapes, dtypes)."""


class ReshardError(CheckpointError):
    """A checkpoint cannot be laid onto the requested layout."""


class StorageError(CheckpointError):
    """The storage medium failed.

    Attributes:
        retryable: whether trying again may succeed (throttling, timeouts, transient I/O).
    """

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class StorageFullCheckpointError(StorageError):
    """The medium ran out of space; nothing committed before was touched."""


class CoordinationError(CheckpointError):
    """The ranks could not agree on a checkpoint (timeout, lost participant, coordinator down)."""


class AlreadyCommittedError(CoordinationError):
    """The step is already committed by another writer; this save was not committed and
    its data files were discarded."""


class FencedError(CoordinationError):
    """This writer belongs to an older generation of the job and may no longer commit."""


class SaveAbortedError(CheckpointError):
    """A save did not commit; the previous committed checkpoint is intact."""


@contextmanager
def storage_errors(
    what: str, *, missing: type[CheckpointError] = CheckpointNotFoundError
) -> Iterator[None]:
    """Re-raise storage backend failures as ckpt errors naming ``what`` was being done.

    Args:
        what: the operation, for the message ("writing step-5/data/r0.safetensors").
        missing: the type to raise when the object does not exist (a missing data file
            of a committed checkpoint is corruption, a missing manifest is "not found").

    A path the backend refuses to follow (a symlink or a FIFO under the root, where ckpt
    only ever writes directories and regular files) is corruption of the checkpoint.
    """
    try:
        yield
    except BlobNotFoundError as exc:
        raise missing(f"{what}: {exc}") from exc
    except InvalidPathError as exc:
        raise CorruptCheckpointError(f"{what}: {exc}") from exc
    except StorageFullError as exc:
        raise StorageFullCheckpointError(f"{what}: {exc}") from exc
    except StorageBackendError as exc:
        raise StorageError(f"{what}: {exc}", retryable=exc.retryable) from exc


class InvalidStateError(CheckpointError):
    """The state handed to save cannot be checkpointed (unsupported value type, name clash)."""
