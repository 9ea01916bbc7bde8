"""The local filesystem backend: the shared conformance suite plus what only files show."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import storage_backends
from storage_backends import (
    InvalidPathError,
    LocalBackend,
    OpensReaders,
    StorageBackend,
    StorageBackendError,
    open_backend,
)

from .conformance import BackendConformance, payload

REPO_ROOT = Path(storage_backends.__file__).resolve().parent.parent


def all_files(root: Path) -> list[str]:
    """Every file under ``root``, hidden ones included, relative and sorted."""
    return sorted(
        (Path(d) / name).relative_to(root).as_posix()
        for d, _dirs, names in os.walk(root)
        for name in names
    )


class TestLocalBackend(BackendConformance):
    """``LocalBackend`` passes the conformance suite."""

    def make_backend(self, tmp_path: Path) -> StorageBackend:
        return LocalBackend(tmp_path / "root")


@pytest.fixture
def local(tmp_path: Path) -> LocalBackend:
    """A local backend rooted at ``tmp_path / "root"``."""
    return LocalBackend(tmp_path / "root")


def _full(path: str | os.PathLike[str], dir_fd: int | None) -> str:
    """``path`` as an absolute path, when it is relative to the directory open at ``dir_fd``."""
    if dir_fd is None:
        return os.fspath(path)
    return os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), os.fspath(path))


class _FsSpy:
    """Records fsync (by the path of the fd), replace and link calls (by full paths), in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple[str, ...]] = []
        real_fsync, real_replace, real_link = os.fsync, os.replace, os.link

        def fsync(fd: int) -> None:
            self.events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            real_fsync(fd)

        def replace(
            src: str | os.PathLike[str],
            dst: str | os.PathLike[str],
            *,
            src_dir_fd: int | None = None,
            dst_dir_fd: int | None = None,
        ) -> None:
            self.events.append(("replace", _full(src, src_dir_fd), _full(dst, dst_dir_fd)))
            real_replace(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)

        def link(
            src: str | os.PathLike[str],
            dst: str | os.PathLike[str],
            *,
            src_dir_fd: int | None = None,
            dst_dir_fd: int | None = None,
            follow_symlinks: bool = True,
        ) -> None:
            self.events.append(("link", _full(src, src_dir_fd), _full(dst, dst_dir_fd)))
            real_link(
                src,
                dst,
                src_dir_fd=src_dir_fd,
                dst_dir_fd=dst_dir_fd,
                follow_symlinks=follow_symlinks,
            )

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "link", link)

    def index(self, *event: str) -> int:
        """Position of the first event equal to ``event``."""
        return self.events.index(tuple(event))

    def published(self, kind: str) -> tuple[str, str]:
        """(temp path, final path) of the only publishing event of ``kind``."""
        found = [e for e in self.events if e[0] == kind]
        assert len(found) == 1, self.events
        return found[0][1], found[0][2]


def test_commit_fsyncs_temp_file_then_renames_then_fsyncs_directory(
    local: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream's bytes are fsynced in a hidden temp file that is renamed over the final path,
    and the directory is fsynced after the rename."""
    spy = _FsSpy(monkeypatch)
    stream = local.open_stream("step-1/data/r0")
    stream.write(b"abc")
    stream.commit()
    tmp, final = spy.published("replace")
    assert final == str(local.root / "step-1" / "data" / "r0")
    assert Path(tmp).parent == Path(final).parent
    assert Path(tmp).name.startswith(".")
    assert spy.index("fsync", tmp) < spy.index("replace", tmp, final)
    assert spy.index("replace", tmp, final) < spy.index("fsync", str(Path(final).parent))
    assert all_files(local.root) == ["step-1/data/r0"]


def test_new_directories_are_made_durable(
    local: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every directory a write creates has its entry fsynced in its parent before the object
    is published, so a power cut cannot lose the path to a committed file."""
    spy = _FsSpy(monkeypatch)
    local.write("a/b/c/obj", b"x")
    tmp, final = spy.published("replace")
    publish = spy.index("replace", tmp, final)
    for parent in [local.root, local.root / "a", local.root / "a" / "b"]:
        assert spy.index("fsync", str(parent)) < publish, f"{parent} not fsynced before publish"


def test_put_if_absent_links_fsynced_temp_and_fsyncs_directory(
    local: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``put_if_absent`` publishes an fsynced temp file with a hard link (which never
    overwrites), fsyncs the directory, and removes the temp name."""
    spy = _FsSpy(monkeypatch)
    assert local.put_if_absent("step-1/manifest.json", b"{}")
    tmp, final = spy.published("link")
    assert spy.index("fsync", tmp) < spy.index("link", tmp, final)
    assert spy.index("link", tmp, final) < spy.index("fsync", str(local.root / "step-1"))
    assert all_files(local.root) == ["step-1/manifest.json"]


def test_no_temp_files_left_after_commit_abort_put_or_failure(local: LocalBackend) -> None:
    """Whatever the outcome of a write, no temp file stays behind."""
    local.write("w/obj", b"ab")
    stream = local.open_stream("s/committed")
    stream.write(b"x")
    stream.commit()
    stream = local.open_stream("s/aborted")
    stream.write(b"x")
    stream.abort()
    assert local.put_if_absent("p/obj", b"1")
    assert not local.put_if_absent("p/obj", b"2")
    with pytest.raises(StorageBackendError):
        local.write("w", b"a directory is in the way")
    with pytest.raises(TypeError):
        local.write("w/bad", "not a buffer")  # type: ignore[arg-type]
    assert all_files(local.root) == ["p/obj", "s/committed", "w/obj"]


def test_in_progress_temp_file_exists_but_is_not_listed(local: LocalBackend) -> None:
    """An open stream writes to a hidden temp file on disk, which listings skip."""
    local.write("step-1/data/done", b"d")
    stream = local.open_stream("step-1/data/r0")
    stream.write(payload(4096))
    on_disk = all_files(local.root)
    assert len(on_disk) == 2
    assert any(Path(p).name.startswith(".r0") for p in on_disk)
    assert local.list_objects() == ["step-1/data/done"]
    assert local.list_prefixes("step-1") == ["data"]
    stream.abort()
    assert all_files(local.root) == ["step-1/data/done"]


def test_crash_mid_stream_leaves_no_visible_object(local: LocalBackend) -> None:
    """A process killed while streaming leaves only an unlisted temp file: a new backend sees
    the old object unchanged, no new one, and ``delete_prefix`` removes the debris."""
    local.write("step-1/data/r0", b"old and committed")
    child = textwrap.dedent(
        """
        import os, signal, sys
        from storage_backends import LocalBackend
        b = LocalBackend(sys.argv[1])
        for path in ("step-1/data/r0", "step-2/data/r0"):
            s = b.open_stream(path)
            s.write(b"partial" * 10000)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", child, str(local.root)], env=env, capture_output=True, timeout=60
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert len(all_files(local.root)) == 3  # the old object and two orphaned temp files

    fresh = LocalBackend(local.root)
    assert fresh.list_objects() == ["step-1/data/r0"]
    assert fresh.read("step-1/data/r0") == b"old and committed"
    assert not fresh.exists("step-2/data/r0")
    fresh.delete_prefix("step-2")
    assert "step-2" not in fresh.list_prefixes()
    assert len(all_files(local.root)) == 2


def test_invalid_path_never_touches_outside_root(local: LocalBackend, tmp_path: Path) -> None:
    """A path escaping the root is refused before anything is created outside it."""
    before = all_files(tmp_path)
    for call in (
        lambda: local.write("../escape", b"x"),
        lambda: local.open_stream("../escape"),
        lambda: local.put_if_absent("../escape", b"x"),
        lambda: local.delete_prefix("../root"),
    ):
        with pytest.raises(storage_backends.InvalidPathError):
            call()
    assert all_files(tmp_path) == before
    assert local.root.is_dir()


def test_root_that_is_a_file_is_refused(tmp_path: Path) -> None:
    """A root path occupied by a file raises a backend error, not a bare ``OSError``."""
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StorageBackendError):
        LocalBackend(tmp_path / "file")


# -- symlinks and special files below the root ----------------------------------------------


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory beside the root (outside it) with a file, a subfolder and a file that
    looks like an unfinished stream."""
    victim = tmp_path / "outside"
    (victim / "sub").mkdir(parents=True)
    (victim / "secret").write_bytes(b"not yours")
    (victim / "sub" / "deep").write_bytes(b"nor this")
    (victim / f".x{'.tmp-'}0123").write_bytes(b"looks unfinished")
    return victim


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p: (directory / p).read_bytes() for p in all_files(directory)}


def test_symlinks_are_neither_objects_nor_prefixes(local: LocalBackend, outside: Path) -> None:
    """Listings skip symlinks (to directories and to files) and never descend into them;
    ``exists`` is False for them and for anything reached through them."""
    local.write("step-1/data/real", b"r")
    os.symlink(outside, local.root / "step-2")
    os.symlink(outside, local.root / "step-1" / "linked-dir")
    os.symlink(outside / "secret", local.root / "step-1" / "data" / "linked-file")
    assert local.list_prefixes() == ["step-1"]
    assert local.list_prefixes("step-1") == ["data"]
    assert local.list_objects() == ["step-1/data/real"]
    assert local.list_objects("step-2") == []
    assert local.list_prefixes("step-2") == []
    assert local.list_objects("step-1/linked-dir") == []
    assert not local.exists("step-1/data/linked-file")
    assert not local.exists("step-2/secret")
    assert not local.exists("step-1/linked-dir/secret")


@pytest.mark.parametrize(
    ("path", "link"),
    [
        ("step-2/secret", "step-2"),
        ("step-1/linked-dir/sub/deep", "step-1/linked-dir"),
        ("step-1/data/linked-file", "step-1/data/linked-file"),
    ],
)
def test_reads_never_follow_a_symlink(
    local: LocalBackend, outside: Path, path: str, link: str
) -> None:
    """Reading, reading into and sizing a path through or at a symlink raise
    ``InvalidPathError`` naming the link; nothing outside the root is read."""
    local.write("step-1/data/real", b"r")
    os.symlink(outside, local.root / "step-2")
    os.symlink(outside, local.root / "step-1" / "linked-dir")
    os.symlink(outside / "secret", local.root / "step-1" / "data" / "linked-file")
    for call in (
        lambda: local.read(path),
        lambda: local.read_into(path, 0, bytearray(1)),
        lambda: local.size(path),
    ):
        with pytest.raises(InvalidPathError, match="symlink") as info:
            call()
        assert repr(link) in str(info.value)


def test_writes_never_go_through_a_symlinked_directory(local: LocalBackend, outside: Path) -> None:
    """Writing, streaming and ``put_if_absent`` below a symlinked directory are refused and
    create nothing outside the root."""
    os.symlink(outside, local.root / "step-2")
    before = _snapshot(outside)
    for call in (
        lambda: local.write("step-2/new", b"x"),
        lambda: local.write("step-2/sub/new", b"x"),
        lambda: local.open_stream("step-2/sub/deeper/new"),
        lambda: local.put_if_absent("step-2/manifest.json", b"x"),
    ):
        with pytest.raises(InvalidPathError, match="symlink"):
            call()
    assert _snapshot(outside) == before
    assert sorted(os.listdir(outside)) == [".x.tmp-0123", "secret", "sub"]


def test_a_symlink_at_an_object_path_is_replaced_never_written_through(
    local: LocalBackend, outside: Path
) -> None:
    """``write`` over a symlink replaces the link with the object; ``put_if_absent`` finds
    the name taken. The file the link pointed to is untouched either way."""
    os.symlink(outside / "secret", local.root / "obj")
    os.symlink(outside / "secret", local.root / "manifest.json")
    local.write("obj", b"new")
    assert not (local.root / "obj").is_symlink()
    assert local.read("obj") == b"new"
    assert not local.put_if_absent("manifest.json", b"new")
    assert (outside / "secret").read_bytes() == b"not yours"


def test_deletion_unlinks_symlinks_never_their_targets(local: LocalBackend, outside: Path) -> None:
    """``delete_prefix`` of a symlinked prefix removes the link; of a real prefix, everything
    in it including links to directories and files, without entering them; ``delete`` of a
    symlink removes the link; deleting through a symlinked directory does nothing.
    ``abort_unfinished`` never looks behind a link either."""
    before = _snapshot(outside)
    local.write("step-1/data/real", b"r")
    os.symlink(outside, local.root / "step-1" / "data" / "linked-dir")
    os.symlink(outside / "secret", local.root / "step-1" / "linked-file")
    os.symlink(outside, local.root / "step-2")
    os.symlink(outside / "secret", local.root / "obj")

    assert local.abort_unfinished("") == 0
    assert local.abort_unfinished("step-2") == 0
    local.delete(["step-2/secret", "step-2/sub/deep", "step-1/data/linked-dir/secret"])
    local.delete_prefix("step-2/sub")
    assert _snapshot(outside) == before

    local.delete(["obj"])
    local.delete_prefix("step-2")
    local.delete_prefix("step-1")
    assert os.listdir(local.root) == []
    assert _snapshot(outside) == before


@pytest.mark.timeout(60)
def test_fifo_is_refused_without_blocking(local: LocalBackend) -> None:
    """A FIFO where an object is expected: reads and ``size`` raise ``InvalidPathError`` at
    once (a plain open would wait for a writer forever), ``exists`` is False, listings skip
    it and ``delete_prefix`` removes it."""
    local.write("step-1/data/real", b"r")
    os.mkfifo(local.root / "step-1" / "manifest.json")
    for call in (
        lambda: local.read("step-1/manifest.json"),
        lambda: local.read_into("step-1/manifest.json", 0, bytearray(1)),
        lambda: local.size("step-1/manifest.json"),
    ):
        with pytest.raises(InvalidPathError, match="FIFO"):
            call()
    assert not local.exists("step-1/manifest.json")
    assert local.list_objects() == ["step-1/data/real"]
    local.delete_prefix("step-1")
    assert os.listdir(local.root) == []


def test_root_may_be_a_symlink(tmp_path: Path) -> None:
    """``ln -s /nvme/ckpts ./ckpts``: a root that is a symlink works for every operation, and
    the backend keeps the path it was given."""
    real = tmp_path / "nvme"
    real.mkdir()
    os.symlink(real, tmp_path / "ckpts")
    backend = LocalBackend(tmp_path / "ckpts")
    assert backend.root == tmp_path / "ckpts"
    backend.write("step-1/data/r0", b"abc")
    assert backend.put_if_absent("step-1/manifest.json", b"{}")
    assert backend.read("step-1/data/r0", 1, 2) == b"bc"
    assert backend.size("step-1/data/r0") == 3
    assert backend.exists("step-1/manifest.json")
    assert backend.list_prefixes() == ["step-1"]
    assert backend.list_objects() == ["step-1/data/r0", "step-1/manifest.json"]
    assert all_files(real) == ["step-1/data/r0", "step-1/manifest.json"]
    backend.delete_prefix("step-1")
    assert os.listdir(real) == []


# -- open_backend --------------------------------------------------------------------------


def test_open_backend_plain_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Absolute, relative and ``Path`` arguments open a local backend at that directory,
    taken literally (a plain path is not parsed as a URL)."""
    monkeypatch.chdir(tmp_path)
    cases: list[tuple[str | Path, Path]] = [
        (str(tmp_path / "abs"), tmp_path / "abs"),
        (tmp_path / "as-path", tmp_path / "as-path"),
        ("rel/dir", tmp_path / "rel" / "dir"),
        (str(tmp_path / "odd?q=1#frag"), tmp_path / "odd?q=1#frag"),
    ]
    for arg, expected in cases:
        backend = open_backend(arg)
        assert isinstance(backend, LocalBackend)
        assert backend.root == expected
        assert expected.is_dir()


def test_open_backend_file_urls(tmp_path: Path) -> None:
    """``file:///path`` and ``file://localhost/path`` open the same directory, and a
    backend's own ``url`` (percent-encoded) opens its root again."""
    odd = tmp_path / "with space %25 and #hash"
    first = open_backend(odd.as_uri())
    assert isinstance(first, LocalBackend)
    assert first.root == odd
    first.write("obj", b"shared")
    again = open_backend(first.url)
    assert isinstance(again, LocalBackend)
    assert again.root == odd
    assert again.read("obj") == b"shared"
    via_localhost = open_backend("file://localhost" + (tmp_path / "lh").as_posix())
    assert isinstance(via_localhost, LocalBackend)
    assert via_localhost.root == tmp_path / "lh"


def test_open_backend_rejects_file_url_with_host(tmp_path: Path) -> None:
    """A ``file://`` URL naming another host is refused rather than read as a local path."""
    with pytest.raises(StorageBackendError, match="host"):
        open_backend("file://otherhost" + tmp_path.as_posix())


def test_open_backend_unknown_scheme(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unknown scheme raises a backend error naming the scheme and what is supported,
    and creates no directory."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StorageBackendError) as info:
        open_backend("gs://bucket/run1")
    message = str(info.value)
    assert "'gs'" in message
    assert "gs://bucket/run1" in message
    assert "file://" in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "url", ["", "   ", "file://", "file:", "file:///data/run#1", "file:///data/run?x=1"]
)
def test_open_backend_rejects_empty_or_lossy_urls(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An empty URL (an unset setting) or a file URL whose path would be cut short is refused,
    instead of silently writing to the current directory or to a different one."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StorageBackendError):
        open_backend(url)
    assert list(tmp_path.iterdir()) == []


def test_local_storage_never_imports_the_s3_client(tmp_path: Path) -> None:
    """``import storage_backends`` and ``open_backend`` of a local path (what every rank of
    a job on local disk does) load no S3 client library; ``S3Backend`` loads it on use."""
    child = textwrap.dedent(
        """
        import sys
        import storage_backends
        from storage_backends import S3Config, open_backend

        backend = open_backend(sys.argv[1])
        backend.write("obj", b"x")
        S3Config(part_size=8 << 20)
        clients = ("boto3", "botocore", "s3transfer")
        print(sorted(m for m in sys.modules if m.split(".")[0] in clients))
        storage_backends.S3Backend
        print("botocore" in sys.modules)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", child, str(tmp_path / "root")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["[]", "True"]


def test_a_hostile_deep_tree_is_refused_not_recursed(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path)
    deep = tmp_path / "step-000000001"
    path = deep
    for _ in range(200):
        path = path / "d"
    path.mkdir(parents=True)
    (path / "f").write_bytes(b"x")
    with pytest.raises(StorageBackendError, match="nested more than"):
        backend.list_objects("step-000000001")
    with pytest.raises(StorageBackendError, match="nested more than"):
        backend.delete_prefix("step-000000001")
    assert (path / "f").exists()


def test_reader_keeps_reading_the_file_it_opened(local: LocalBackend) -> None:
    """A local reader is one open file: a replace meanwhile does not mix versions, and the
    backend declares the capability the loader uses."""
    assert isinstance(local, OpensReaders)
    local.write("step/data.bin", b"a" * 100)
    reader = local.open_reader("step/data.bin")
    try:
        local.write("step/data.bin", b"b" * 50)
        out = bytearray(10)
        reader.read_into(90, out)
        assert out == b"a" * 10
    finally:
        reader.close()
    with pytest.raises(ValueError, match="closed"):
        reader.read_into(0, bytearray(1))
