"""Local filesystem / NVMe backend.

Every object is written to a temporary file beside its final path, fsynced, moved
into place with ``os.replace`` and then the directory is fsynced, so an object is
either absent or complete and durable. ``put_if_absent`` publishes with ``os.link``,
which fails when the target exists: two committers can never both win.

Symlinks. The root may itself be a symlink (``ln -s /nvme/ckpts ./ckpts``); it is
resolved once, when the backend is made. Below the root nothing is ever followed: every
operation walks down from the root one directory at a time with ``O_NOFOLLOW`` and works
relative to that directory's descriptor, so a symlink swapped in midway cannot redirect
it either. A symlink below the root:

* is neither an object nor a prefix: listings skip it and never enter it, ``exists`` is
  False;
* is refused with ``InvalidPathError`` naming it when a read, ``size`` or write would go
  through it or land on it (it could lead out of the root);
* is unlinked itself, never what it points to, when deletion meets it: ``delete`` of an
  object path that is a symlink, ``delete_prefix`` of a prefix that is one, and every
  symlink inside a prefix being deleted. A path that passes through a symlinked
  directory holds nothing of this root, so deleting it does nothing.

The root is made when the backend is opened with ``create=True`` (writers); readers
open it with ``create=False``, which never creates it: listing a missing root then raises
``RootNotFoundError`` ("no such checkpoint root") rather than finding it empty.

Only regular files are objects. A FIFO, socket or device where an object is expected is
refused with ``InvalidPathError`` without being opened, so that a reader never blocks on
one; files are opened ``O_NONBLOCK`` as well, in case one is swapped in meanwhile.
"""

from __future__ import annotations

import errno
import os
import stat
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from storage_backends._errors import (
    BlobNotFoundError,
    InvalidPathError,
    RootNotFoundError,
    StorageBackendError,
    StorageFullError,
)
from storage_backends._protocol import BlobReader, BytesLike

_TMP_MARK = ".tmp-"
# Linux moves at most this many bytes per write()/read() call.
_MAX_IO = 1 << 30
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW


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


def _is_tmp(name: str) -> bool:
    return name.startswith(".") and _TMP_MARK in name


def _check_range(path: str, offset: int, length: int, size: int) -> None:
    if offset < 0 or length < 0 or offset + length > size:
        raise StorageBackendError(
            f"cannot read {path!r} at offset {offset} (length {length}): "
            f"the object has {size} bytes",
            path=path,
        )


def _write_all(fd: int, data: BytesLike) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view[:_MAX_IO])
        view = view[written:]


def _lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    """The entry ``name`` in the directory open at ``dir_fd`` (a symlink itself), or None."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


# Checkpoints nest a few directories deep; a deeper tree is not ours and is refused
# rather than walked (no recursion or descriptor exhaustion on a hostile tree).
_MAX_DEPTH = 32


def _too_deep(rel: str) -> StorageBackendError:
    return StorageBackendError(
        f"{rel!r} is nested more than {_MAX_DEPTH} directories deep, which no checkpoint is; "
        "refusing to walk it (remove it by hand if it is not needed)",
        path=rel,
    )


def _walk_at(fd: int, rel: str) -> Iterator[tuple[int, str, list[os.DirEntry[str]]]]:
    """Walk the tree open at ``fd`` top-down without entering symlinks: for each directory,
    (its descriptor, its path relative to the start with a trailing ``/``, its entries that
    are not directories). A directory that vanishes or is replaced meanwhile is skipped."""
    with os.scandir(fd) as scan:
        entries = list(scan)
    subdirs = [e.name for e in entries if e.is_dir(follow_symlinks=False)]
    yield fd, rel, [e for e in entries if not e.is_dir(follow_symlinks=False)]
    if subdirs and rel.count("/") >= _MAX_DEPTH:
        raise _too_deep(rel)
    for name in subdirs:
        try:
            child = os.open(name, _DIR_FLAGS, dir_fd=fd)
        except (FileNotFoundError, NotADirectoryError):
            continue
        try:
            yield from _walk_at(child, f"{rel}{name}/")
        finally:
            os.close(child)


def _unlink_at(dir_fd: int, name: str, depth: int = 0) -> None:
    """Remove the entry ``name`` (a symlink itself, never its target); directories too."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        _remove_tree_at(dir_fd, name, depth)


def _remove_tree_at(dir_fd: int, name: str, depth: int = 0) -> None:
    """Remove the directory ``name`` and everything below it, never entering a symlink."""
    if depth >= _MAX_DEPTH:
        raise _too_deep(name)
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    except NotADirectoryError:  # replaced by a file or a symlink: remove that entry itself
        _unlink_at(dir_fd, name, depth)
        return
    try:
        with os.scandir(fd) as scan:
            entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in scan]
        for child, is_dir in entries:
            if is_dir:
                _remove_tree_at(fd, child, depth + 1)
            else:
                _unlink_at(fd, child, depth + 1)
    finally:
        os.close(fd)
    try:
        os.rmdir(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


class _LocalStream:
    def __init__(self, backend: LocalBackend, path: str) -> None:
        self._path = path
        parts = backend._parts(path)
        self._name = parts[-1]
        self._tmp = f".{self._name}{_TMP_MARK}{uuid.uuid4().hex}"
        self._dir_fd: int | None = backend._parent_for_write(parts, path)
        try:
            self._fd: int | None = os.open(self._tmp, _NEW_FILE_FLAGS, 0o644, dir_fd=self._dir_fd)
        except OSError as exc:
            self._close_dir()
            raise _os_error(exc, path, "creating") from exc

    def _close_dir(self) -> None:
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None

    def write(self, data: BytesLike) -> None:
        if self._fd is None:
            raise StorageBackendError(f"stream for {self._path!r} is closed", path=self._path)
        try:
            _write_all(self._fd, data)
        except OSError as exc:
            self.abort()
            raise _os_error(exc, self._path, "writing") from exc

    def commit(self) -> None:
        if self._fd is None or self._dir_fd is None:
            raise StorageBackendError(f"stream for {self._path!r} is closed", path=self._path)
        try:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            # Replaces a symlink at the final name itself, never writes through it.
            os.replace(self._tmp, self._name, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
            os.fsync(self._dir_fd)
        except OSError as exc:
            self.abort()
            raise _os_error(exc, self._path, "committing") from exc
        self._close_dir()

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._dir_fd is not None:
            try:
                os.unlink(self._tmp, dir_fd=self._dir_fd)
            except FileNotFoundError:
                pass
            finally:
                self._close_dir()


def _pread_all(fd: int, path: str, offset: int, view: memoryview) -> None:
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


class _LocalReader:
    """An open data file read by byte ranges (``LocalBackend.open_reader``)."""

    def __init__(self, fd: int, size: int, path: str) -> None:
        self._fd = fd
        self._size = size
        self._path = path

    def read_into(self, offset: int, out: BytesLike) -> None:
        if self._fd < 0:
            raise ValueError(f"reader of {self._path!r} is closed")
        view = memoryview(out).cast("B")
        _check_range(self._path, offset, len(view), self._size)
        _pread_all(self._fd, self._path, offset, view)

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


class LocalBackend:
    """Stores objects as files under a root directory (local disk, NVMe, NFS, tmpfs).

    Never follows a symlink below the root (see the module's docstring); the root itself
    may be one.
    """

    def __init__(self, root: str | os.PathLike[str], *, create: bool = True) -> None:
        """Open the directory ``root``.

        Args:
            root: the checkpoint root (``~`` is expanded; a relative path is made absolute).
            create: make the root (and its parents) now. With False nothing is created
                here: readers use this, so that a mistyped path is reported instead of
                made. A missing root then lists as ``RootNotFoundError``, and the first
                write creates it (a job that restores, then saves).

        Raises:
            StorageBackendError: the root is a file, or cannot be created.
        """
        self._root = Path(root).expanduser().absolute()
        self._create_on_write = not create
        if create:
            try:
                self._root.mkdir(parents=True, exist_ok=True)
            except FileExistsError as exc:  # a file, or a symlink to one
                raise self._not_a_directory() from exc
            except OSError as exc:
                raise _os_error(exc, str(self._root), "creating the checkpoint root") from exc
        elif self._root.exists() and not self._root.is_dir():
            raise self._not_a_directory()
        # Resolved once: the root may be a symlink; nothing below it is ever followed.
        self._real_root = os.path.realpath(self._root)

    def _not_a_directory(self) -> StorageBackendError:
        return StorageBackendError(
            f"the checkpoint root {self._root} is a file, not a directory: give the directory "
            "the checkpoints live in (or a new one)",
            path=str(self._root),
        )

    def _root_missing(self) -> RootNotFoundError:
        return RootNotFoundError(
            f"no such checkpoint root: {self._root} does not exist (nothing was created; "
            "check the path)",
            path="",
        )

    @property
    def url(self) -> str:
        return self._root.as_uri()

    @property
    def root(self) -> Path:
        return self._root

    # -- walking down from the root ----------------------------------------------------

    def _parts(self, path: str) -> list[str]:
        parts = path.split("/")
        if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise InvalidPathError(f"invalid object path {path!r}", path=path)
        return parts

    def _prefix_parts(self, prefix: str) -> list[str]:
        prefix = prefix.strip("/")
        return self._parts(prefix) if prefix else []

    def _symlink_error(self, path: str, link: Sequence[str]) -> InvalidPathError:
        name = "/".join(link)
        where = "is a symlink" if name == path else f"goes through {name!r}, a symlink"
        what = "file" if name == path else "directory"
        return InvalidPathError(
            f"{path!r} {where} below the checkpoint root {self._root}; symlinks there are never "
            f"followed (one could lead out of the root): replace it with the real {what}",
            path=path,
        )

    def _open_dir(self, parts: Sequence[str], path: str, *, create: bool = False) -> int:
        """A descriptor of the directory ``root/parts``, reached one component at a time
        without following symlinks. With ``create``, missing directories are made and each
        new entry fsynced in its parent before anything is published in it.

        Raises:
            FileNotFoundError: a component is missing (and ``create`` is False).
            NotADirectoryError: a component is a file.
            InvalidPathError: a component is a symlink.
        """
        try:
            fd = os.open(self._real_root, _DIR_FLAGS)
        except FileNotFoundError:
            if not (create and self._create_on_write):
                raise
            os.makedirs(self._real_root, exist_ok=True)
            fd = os.open(self._real_root, _DIR_FLAGS)
        try:
            for i, name in enumerate(parts):
                try:
                    try:
                        child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                    except FileNotFoundError:
                        if not create:
                            raise
                        try:
                            os.mkdir(name, dir_fd=fd)
                        except FileExistsError:
                            pass  # made by a concurrent writer
                        else:
                            os.fsync(fd)
                        child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except NotADirectoryError:
                    st = _lstat_at(fd, name)
                    if st is not None and stat.S_ISLNK(st.st_mode):
                        raise self._symlink_error(path, parts[: i + 1]) from None
                    raise
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _parent_for_write(self, parts: Sequence[str], path: str) -> int:
        try:
            return self._open_dir(parts[:-1], path, create=True)
        except OSError as exc:
            raise _os_error(exc, path, "creating the directory of") from exc

    def _parent_for_read(self, parts: Sequence[str], path: str, action: str) -> int:
        try:
            return self._open_dir(parts[:-1], path)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise BlobNotFoundError(f"{path!r} does not exist ({action})", path=path) from exc
        except OSError as exc:
            raise _os_error(exc, path, action) from exc

    def _check_object(
        self, st: os.stat_result | None, path: str, parts: Sequence[str], action: str
    ) -> os.stat_result:
        """``st`` when it is a regular file; else the error saying what is there instead."""
        if st is None:
            raise BlobNotFoundError(f"{path!r} does not exist ({action})", path=path)
        if stat.S_ISREG(st.st_mode):
            return st
        if stat.S_ISDIR(st.st_mode):
            raise BlobNotFoundError(f"{path!r} is a prefix, not an object", path=path)
        if stat.S_ISLNK(st.st_mode):
            raise self._symlink_error(path, parts)
        raise InvalidPathError(
            f"{path!r} below the checkpoint root {self._root} is {_kind(st.st_mode)}, not a "
            "regular file; it is never opened: remove it",
            path=path,
        )

    # -- writing -----------------------------------------------------------------------

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
        return _LocalStream(self, path)

    def put_if_absent(self, path: str, data: BytesLike) -> bool:
        parts = self._parts(path)
        dir_fd = self._parent_for_write(parts, path)
        tmp = f".{parts[-1]}{_TMP_MARK}{uuid.uuid4().hex}"
        try:
            fd = os.open(tmp, _NEW_FILE_FLAGS, 0o644, dir_fd=dir_fd)
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                # Fails on any existing entry, a symlink included: never writes through one.
                os.link(tmp, parts[-1], src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except FileExistsError:
                return False
            os.fsync(dir_fd)
            return True
        except OSError as exc:
            raise _os_error(exc, path, "publishing") from exc
        finally:
            try:
                os.unlink(tmp, dir_fd=dir_fd)
            except FileNotFoundError:
                pass
            finally:
                os.close(dir_fd)

    # -- reading -----------------------------------------------------------------------

    def _open_object(self, path: str) -> tuple[int, int]:
        """Open ``path`` for reading; returns (fd, size of that very file)."""
        parts = self._parts(path)
        dir_fd = self._parent_for_read(parts, path, "opening")
        try:
            # Checked before opening: opening a FIFO or a device may block or act.
            self._check_object(_lstat_at(dir_fd, parts[-1]), path, parts, "opening")
            fd = os.open(parts[-1], _READ_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # became a symlink since
                raise self._symlink_error(path, parts) from exc
            if _not_found(exc):
                raise BlobNotFoundError(f"{path!r} does not exist (opening)", path=path) from exc
            raise _os_error(exc, path, "opening") from exc
        finally:
            os.close(dir_fd)
        try:
            st = self._check_object(os.fstat(fd), path, parts, "opening")  # replaced since?
            os.set_blocking(fd, True)
        except OSError as exc:
            os.close(fd)
            raise _os_error(exc, path, "stat of") from exc
        except BaseException:
            os.close(fd)
            raise
        return fd, st.st_size

    def read(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        # Size and bytes come from one open file, so a concurrent replace cannot mix versions.
        fd, size = self._open_object(path)
        try:
            if length is None:
                length = size - offset
            _check_range(path, offset, length, size)
            buf = bytearray(length)
            _pread_all(fd, path, offset, memoryview(buf))
            return bytes(buf)
        finally:
            os.close(fd)

    def read_into(self, path: str, offset: int, out: BytesLike) -> None:
        reader = self.open_reader(path)
        try:
            reader.read_into(offset, out)
        finally:
            reader.close()

    def open_reader(self, path: str) -> BlobReader:
        """``path`` opened once (the checks of ``read_into`` done once) for many ranged
        reads with ``preadv``; every read sees the file that was opened."""
        fd, size = self._open_object(path)
        return _LocalReader(fd, size, path)

    def size(self, path: str) -> int:
        parts = self._parts(path)
        dir_fd = self._parent_for_read(parts, path, "stat of")
        try:
            st = _lstat_at(dir_fd, parts[-1])
        except OSError as exc:
            raise _os_error(exc, path, "stat of") from exc
        finally:
            os.close(dir_fd)
        return self._check_object(st, path, parts, "stat of").st_size

    def exists(self, path: str) -> bool:
        parts = self._parts(path)
        try:
            dir_fd = self._open_dir(parts[:-1], path)
        except (FileNotFoundError, NotADirectoryError, InvalidPathError):
            return False
        except OSError as exc:
            raise _os_error(exc, path, "stat of") from exc
        try:
            st = _lstat_at(dir_fd, parts[-1])
        except OSError as exc:
            raise _os_error(exc, path, "stat of") from exc
        finally:
            os.close(dir_fd)
        return st is not None and stat.S_ISREG(st.st_mode)

    # -- listing -----------------------------------------------------------------------

    def _open_prefix(self, parts: Sequence[str], prefix: str, action: str) -> int | None:
        """The directory of a prefix, or None when there is none (missing, a file, or
        reached through a symlink: nothing of this root); ``RootNotFoundError`` when the
        prefix is the root and the root is missing."""
        try:
            return self._open_dir(parts, prefix)
        except (FileNotFoundError, NotADirectoryError, InvalidPathError):
            if not parts and not os.path.isdir(self._real_root):
                raise self._root_missing() from None
            return None
        except OSError as exc:
            raise _os_error(exc, prefix, action) from exc

    def list_objects(self, prefix: str = "") -> list[str]:
        parts = self._prefix_parts(prefix)
        fd = self._open_prefix(parts, prefix, "listing")
        if fd is None:
            return []
        found: list[str] = []
        try:
            for _dir_fd, rel, entries in _walk_at(fd, "".join(f"{p}/" for p in parts)):
                found.extend(
                    rel + e.name
                    for e in entries
                    if e.is_file(follow_symlinks=False) and not _is_tmp(e.name)
                )
        except OSError as exc:
            raise _os_error(exc, prefix, "listing") from exc
        finally:
            os.close(fd)
        return sorted(found)

    def list_prefixes(self, prefix: str = "") -> list[str]:
        parts = self._prefix_parts(prefix)
        fd = self._open_prefix(parts, prefix, "listing")
        if fd is None:
            return []
        try:
            with os.scandir(fd) as scan:
                return sorted(e.name for e in scan if e.is_dir(follow_symlinks=False))
        except OSError as exc:
            raise _os_error(exc, prefix, "listing") from exc
        finally:
            os.close(fd)

    # -- deleting ----------------------------------------------------------------------

    def delete(self, paths: Iterable[str]) -> None:
        for path in paths:
            parts = self._parts(path)
            try:
                dir_fd = self._open_dir(parts[:-1], path)
            except (FileNotFoundError, NotADirectoryError, InvalidPathError):
                continue  # absent, below an object, or through a symlink: not an object here
            except OSError as exc:
                raise _os_error(exc, path, "deleting") from exc
            try:
                os.unlink(parts[-1], dir_fd=dir_fd)  # a symlink is removed itself
            except OSError as exc:
                if not _not_found(exc):  # absent, or a prefix: not an object
                    raise _os_error(exc, path, "deleting") from exc
            finally:
                os.close(dir_fd)

    def delete_prefix(self, prefix: str) -> None:
        parts = self._prefix_parts(prefix)
        if not parts:
            raise InvalidPathError("refusing to delete the whole backend root", path=prefix)
        try:
            dir_fd = self._open_dir(parts[:-1], prefix)
        except (FileNotFoundError, NotADirectoryError, InvalidPathError):
            return  # nothing there, or through a symlink: nothing of this root
        except OSError as exc:
            raise _os_error(exc, prefix, "deleting") from exc
        try:
            st = _lstat_at(dir_fd, parts[-1])
            if st is None:
                return
            if stat.S_ISLNK(st.st_mode):
                _unlink_at(dir_fd, parts[-1])  # the link itself, never what it points to
            elif stat.S_ISDIR(st.st_mode):
                _remove_tree_at(dir_fd, parts[-1])
            # else: an object, which is not under its own prefix
        except OSError as exc:
            raise _os_error(exc, prefix, "deleting") from exc
        finally:
            os.close(dir_fd)

    def abort_unfinished(self, prefix: str, older_than_seconds: float = 0.0) -> int:
        """Remove temporary files of streams that never committed (a writer died)."""
        parts = self._prefix_parts(prefix)
        try:
            fd = self._open_prefix(parts, prefix, "removing unfinished files under")
        except RootNotFoundError:
            return 0
        if fd is None:
            return 0
        cutoff = time.time() - older_than_seconds
        removed = 0
        try:
            for dir_fd, _rel, entries in _walk_at(fd, ""):
                for entry in entries:
                    if not (_is_tmp(entry.name) and entry.is_file(follow_symlinks=False)):
                        continue
                    try:
                        if entry.stat(follow_symlinks=False).st_mtime <= cutoff:
                            os.unlink(entry.name, dir_fd=dir_fd)
                            removed += 1
                    except FileNotFoundError:
                        continue
        except OSError as exc:
            raise _os_error(exc, prefix, "removing unfinished files under") from exc
        finally:
            os.close(fd)
        return removed

    def close(self) -> None:
        pass

    def last_modified(self, prefix: str) -> float | None:
        """Newest mtime of the file ``prefix``, or of the directory ``prefix`` and everything
        below it (temporary files of unfinished writes included; links are not followed)."""
        parts = self._prefix_parts(prefix)
        if not parts:
            raise InvalidPathError("last_modified needs a prefix below the root", path=prefix)
        try:
            dir_fd = self._open_dir(parts[:-1], prefix)
        except (FileNotFoundError, NotADirectoryError, InvalidPathError):
            return None  # nothing there, or through a symlink: nothing of this root
        except OSError as exc:
            raise _os_error(exc, prefix, "stat of") from exc
        try:
            st = _lstat_at(dir_fd, parts[-1])
            if st is None or not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
                return None
            if stat.S_ISREG(st.st_mode):
                return st.st_mtime
            newest = st.st_mtime
            fd = os.open(parts[-1], _DIR_FLAGS, dir_fd=dir_fd)
            try:
                for sub_fd, _rel, entries in _walk_at(fd, ""):
                    newest = max(newest, os.fstat(sub_fd).st_mtime)
                    for entry in entries:
                        try:
                            newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
                        except FileNotFoundError:
                            continue  # deleted meanwhile
            finally:
                os.close(fd)
            return newest
        except (FileNotFoundError, NotADirectoryError):
            return None  # deleted or replaced meanwhile
        except OSError as exc:
            raise _os_error(exc, prefix, "stat of files under") from exc
        finally:
            os.close(dir_fd)
