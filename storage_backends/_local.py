"""Local filesystem / NVMe backend.

Every object is written to a temporary file beside its final path, fsynced, moved
into place with ``os.replace`` and then the directory is fsynced, so an object is
either absent or complete and durable. ``put_if_absent`` publishes with ``os.link``,
which fails when the target exists: two committers can never both win.
"""

from __future__ import annotations

import errno
import os
import stat
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

from storage_backends._errors import (
    BlobNotFoundError,
    InvalidPathError,
    StorageBackendError,
    StorageFullError,
)
from storage_backends._protocol import BytesLike

_TMP_MARK = ".tmp-"
# Linux moves at most this many bytes per write()/read() call.
_MAX_IO = 1 << 30


def _os_error(exc: OSError, path: str, action: str) -> StorageBackendError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFullError(
            f"no space left while {action} {path!r}: free space on the checkpoint disk "
            "or lower keep_last",
            path=path,
        )
    if exc.errno == errno.ENOENT:
        return BlobNotFoundError(f"{path!r} does not exist ({action})", path=path)
    retryable = exc.errno in (errno.EINTR, errno.EAGAIN, errno.EIO, errno.ETIMEDOUT)
    return StorageBackendError(
        f"{action} {path!r} failed: {exc.strerror or exc}", path=path, retryable=retryable
    )


def _not_found(exc: OSError) -> bool:
    # A directory ("prefix") or anything below a file is not an object either.
    return exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR)


def _check_range(path: str, offset: int, length: int, size: int) -> None:
    if offset < 0 or length < 0 or offset + length > size:
        raise StorageBackendError(
            f"cannot read {path!r} at offset {offset} (length {length}): "
            f"the object has {size} bytes",
            path=path,
        )


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: BytesLike) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view[:_MAX_IO])
        view = view[written:]


class _LocalStream:
    def __init__(self, backend: LocalBackend, path: str) -> None:
        self._backend = backend
        self._path = path
        self._final = backend._resolve(path)
        self._tmp = (
            backend._make_parent(self._final) / f".{self._final.name}{_TMP_MARK}{uuid.uuid4().hex}"
        )
        try:
            self._fd: int | None = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:
            raise _os_error(exc, path, "creating") from exc

    def write(self, data: BytesLike) -> None:
        if self._fd is None:
            raise StorageBackendError(f"stream for {self._path!r} is closed", path=self._path)
        try:
            _write_all(self._fd, data)
        except OSError as exc:
            self.abort()
            raise _os_error(exc, self._path, "writing") from exc

    def commit(self) -> None:
        if self._fd is None:
            raise StorageBackendError(f"stream for {self._path!r} is closed", path=self._path)
        try:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            os.replace(self._tmp, self._final)
            _fsync_dir(self._final.parent)
        except OSError as exc:
            self.abort()
            raise _os_error(exc, self._path, "committing") from exc

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass


class LocalBackend:
    """Stores objects as files under a root directory (local disk, NVMe, NFS, tmpfs)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self._root = Path(root).expanduser().absolute()
        try:
            self._root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _os_error(exc, str(self._root), "creating the checkpoint root") from exc

    @property
    def url(self) -> str:
        return self._root.as_uri()

    @property
    def root(self) -> Path:
        return self._root

    def _resolve(self, path: str) -> Path:
        parts = path.split("/")
        if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise InvalidPathError(f"invalid object path {path!r}", path=path)
        return self._root.joinpath(*parts)

    def _resolve_prefix(self, prefix: str) -> Path:
        prefix = prefix.strip("/")
        return self._resolve(prefix) if prefix else self._root

    def _make_parent(self, final: Path) -> Path:
        parent = final.parent
        if not parent.is_dir():
            missing = []
            probe = parent
            while not probe.exists():
                missing.append(probe)
                probe = probe.parent
            parent.mkdir(parents=True, exist_ok=True)
            # Make the new directory entries durable too, outermost last.
            for directory in missing:
                _fsync_dir(directory.parent)
        return parent

    def write(self, path: str, data: BytesLike) -> None:
        stream = self.open_stream(path)
        try:
            stream.write(data)
            stream.commit()
        except BaseException:
            # e.g. a TypeError for a non-buffer: do not leave the temp file behind.
            stream.abort()
            raise

    def open_stream(self, path: str) -> _LocalStream:
        try:
            return _LocalStream(self, path)
        except OSError as exc:
            raise _os_error(exc, path, "creating") from exc

    def put_if_absent(self, path: str, data: BytesLike) -> bool:
        final = self._resolve(path)
        try:
            parent = self._make_parent(final)
        except OSError as exc:
            raise _os_error(exc, path, "creating the directory of") from exc
        tmp = parent / f".{final.name}{_TMP_MARK}{uuid.uuid4().hex}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, final)
            except FileExistsError:
                return False
            _fsync_dir(parent)
            return True
        except OSError as exc:
            raise _os_error(exc, path, "publishing") from exc
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass

    def _open_object(self, path: str) -> tuple[int, int]:
        """Open ``path`` for reading; returns (fd, size of that very file)."""
        target = self._resolve(path)
        try:
            fd = os.open(target, os.O_RDONLY)
        except OSError as exc:
            if _not_found(exc):
                raise BlobNotFoundError(f"{path!r} does not exist (opening)", path=path) from exc
            raise _os_error(exc, path, "opening") from exc
        try:
            st = os.fstat(fd)
        except OSError as exc:
            os.close(fd)
            raise _os_error(exc, path, "stat of") from exc
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise BlobNotFoundError(f"{path!r} is a prefix, not an object", path=path)
        return fd, st.st_size

    def read(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        # Size and bytes come from one open file, so a concurrent replace cannot mix versions.
        fd, size = self._open_object(path)
        try:
            if length is None:
                length = size - offset
            _check_range(path, offset, length, size)
            buf = bytearray(length)
            self._read_fd(fd, path, offset, memoryview(buf))
            return bytes(buf)
        finally:
            os.close(fd)

    def read_into(self, path: str, offset: int, out: BytesLike) -> None:
        view = memoryview(out).cast("B")
        fd, size = self._open_object(path)
        try:
            _check_range(path, offset, len(view), size)
            self._read_fd(fd, path, offset, view)
        finally:
            os.close(fd)

    def _read_fd(self, fd: int, path: str, offset: int, view: memoryview) -> None:
        try:
            done = 0
            while done < len(view):
                n = os.preadv(fd, [view[done : done + _MAX_IO]], offset + done)
                if n == 0:
                    raise StorageBackendError(
                        f"{path!r} ended at byte {offset + done}, expected {offset + len(view)}: "
                        "the file is truncated",
                        path=path,
                    )
                done += n
        except OSError as exc:
            raise _os_error(exc, path, "reading") from exc

    def size(self, path: str) -> int:
        target = self._resolve(path)
        try:
            st = target.stat()
        except OSError as exc:
            if _not_found(exc):
                raise BlobNotFoundError(f"{path!r} does not exist (stat of)", path=path) from exc
            raise _os_error(exc, path, "stat of") from exc
        if not stat.S_ISREG(st.st_mode):
            raise BlobNotFoundError(f"{path!r} is a prefix, not an object", path=path)
        return st.st_size

    def exists(self, path: str) -> bool:
        return self._resolve(path).is_file()

    def list_objects(self, prefix: str = "") -> list[str]:
        base = self._resolve_prefix(prefix)
        found: list[str] = []
        for dirpath, _dirnames, filenames in os.walk(base):
            rel_dir = Path(dirpath).relative_to(self._root).as_posix()
            for name in filenames:
                if _TMP_MARK in name and name.startswith("."):
                    continue
                found.append(name if rel_dir == "." else f"{rel_dir}/{name}")
        return sorted(found)

    def list_prefixes(self, prefix: str = "") -> list[str]:
        base = self._resolve_prefix(prefix)
        try:
            return sorted(entry.name for entry in os.scandir(base) if entry.is_dir())
        except (FileNotFoundError, NotADirectoryError):
            return []

    def delete(self, paths: Iterable[str]) -> None:
        for path in paths:
            try:
                os.unlink(self._resolve(path))
            except OSError as exc:
                if _not_found(exc):
                    continue  # absent, a prefix, or below an object: not an object
                raise _os_error(exc, path, "deleting") from exc

    def delete_prefix(self, prefix: str) -> None:
        base = self._resolve_prefix(prefix)
        if base == self._root:
            raise InvalidPathError("refusing to delete the whole backend root", path=prefix)
        try:
            for dirpath, dirnames, filenames in os.walk(base, topdown=False):
                for name in filenames:
                    try:
                        os.unlink(os.path.join(dirpath, name))
                    except FileNotFoundError:
                        pass
                for name in dirnames:
                    try:
                        os.rmdir(os.path.join(dirpath, name))
                    except FileNotFoundError:
                        pass
            try:
                os.rmdir(base)
            except (FileNotFoundError, NotADirectoryError):
                pass  # nothing there, or an object (which is not under its own prefix)
        except OSError as exc:
            raise _os_error(exc, prefix, "deleting") from exc

    def abort_unfinished(self, prefix: str, older_than_seconds: float = 0.0) -> int:
        """Remove temporary files of streams that never committed (a writer died)."""
        base = self._resolve_prefix(prefix)
        cutoff = time.time() - older_than_seconds
        removed = 0
        for dirpath, _dirnames, filenames in os.walk(base):
            for name in filenames:
                if not (name.startswith(".") and _TMP_MARK in name):
                    continue
                path = os.path.join(dirpath, name)
                try:
                    if os.stat(path).st_mtime <= cutoff:
                        os.unlink(path)
                        removed += 1
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    raise _os_error(exc, prefix, "removing unfinished files under") from exc
        return removed

    def close(self) -> None:
        pass

    def last_modified(self, prefix: str) -> float | None:
        """Newest mtime of the file ``prefix``, or of the directory ``prefix`` and everything
        below it (temporary files of unfinished writes included; links are not followed)."""
        base = self._resolve_prefix(prefix)
        try:
            st = os.lstat(base)
        except OSError as exc:
            if _not_found(exc):
                return None
            raise _os_error(exc, prefix, "stat of") from exc
        if not stat.S_ISDIR(st.st_mode):
            return st.st_mtime if stat.S_ISREG(st.st_mode) else None
        newest = st.st_mtime
        for dirpath, dirnames, filenames in os.walk(base):
            for name in (*dirnames, *filenames):
                try:
                    newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
                except FileNotFoundError:
                    continue  # deleted meanwhile
                except OSError as exc:
                    raise _os_error(exc, prefix, "stat of files under") from exc
        return newest
