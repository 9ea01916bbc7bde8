"""Shared fixtures. Slow cases (big fault campaigns) run reduced unless --full is given."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from storage_backends import LocalBackend


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--full", action="store_true", default=False,
        help="run the full counts of slow fault campaigns (CI runs a reduced count)",
    )


@pytest.fixture
def full(request: pytest.FixtureRequest) -> bool:
    """True when the full campaign was asked for with --full."""
    return bool(request.config.getoption("--full"))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An empty checkpoint root directory."""
    path = tmp_path / "ckpts"
    path.mkdir()
    return path


@pytest.fixture
def backend(root: Path) -> Iterator[LocalBackend]:
    b = LocalBackend(root)
    yield b
    b.close()


@pytest.fixture(autouse=True)
def _quiet_threads() -> Iterator[None]:
    # Bit-exact comparisons between processes rely on a fixed thread count.
    torch.set_num_threads(1)
    yield


@pytest.fixture(autouse=True)
def _log_level(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ckpt")
