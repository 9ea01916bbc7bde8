"""Fixtures of the coordinator suite: real ``redis-server`` processes on free ports."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage_backends import LocalBackend
from tests.support.redis_server import (
    RedisServer,
    make_tls_files,
    redis_server_binary,
    tls_supported,
)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh ``redis-server`` without persistence, private to one test."""
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed")
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def redis_aof_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh ``redis-server`` with AOF (``appendfsync always``), private to one test."""
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed")
    with RedisServer(tmp_path / "redis-aof", appendonly=True) as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """``redis://127.0.0.1:PORT/0`` of a fresh server."""
    return redis_server.url()


@pytest.fixture
def redis_password_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh ``redis-server`` with ``requirepass``."""
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed")
    with RedisServer(tmp_path / "redis-auth", password="s3cret:/@pw") as server:
        yield server


@pytest.fixture
def redis_tls_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh TLS-only ``redis-server`` with a throw-away CA (skipped without TLS support)."""
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed")
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (needed to make a test certificate)")
    if not tls_supported():
        pytest.skip("this redis-server was built without TLS support (--tls-port unknown)")
    files = make_tls_files(tmp_path / "tls")
    with RedisServer(tmp_path / "redis-tls", tls=files) as server:
        yield server


@pytest.fixture
def job() -> str:
    """A job namespace no other test uses."""
    return f"test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def other_root(tmp_path: Path) -> Path:
    """A second, empty checkpoint root."""
    path = tmp_path / "ckpts-other"
    path.mkdir()
    return path


@pytest.fixture
def other_backend(other_root: Path) -> Iterator[LocalBackend]:
    b = LocalBackend(other_root)
    yield b
    b.close()
