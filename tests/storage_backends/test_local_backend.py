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
from storage_backends import LocalBackend, StorageBackend, StorageBackendError, open_backend

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


class _FsSpy:
    """Records fsync (by the path of the fd), replace and link calls, in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple[str, ...]] = []
        real_fsync, real_replace, real_link = os.fsync, os.replace, os.link

        def fsync(fd: int) -> None:
            self.events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            real_fsync(fd)

        def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
            self.events.append(("replace", os.fspath(src), os.fspath(dst)))
            real_replace(src, dst)

        def link(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
            self.events.append(("link", os.fspath(src), os.fspath(dst)))
            real_link(src, dst)

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
