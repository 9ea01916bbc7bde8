"""Shared fixtures, and ``--full``: tests marked ``@pytest.mark.slow`` are skipped without it;
tests that take the ``full`` fixture run a reduced count without it (CI) and all with it."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from storage_backends import LocalBackend

# The fault campaigns' figures table (``campaign`` marker, ``campaign_table`` fixture).
pytest_plugins = ("tests.support.campaign",)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--full",
        action="store_true",
        default=False,
        help="run the tests marked slow, and the full counts of reduced campaigns",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without --full, every test marked ``slow`` is skipped (and says how to run it)."""
    if config.getoption("--full"):
        return
    skip = pytest.mark.skip(reason="slow: run with --full")
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(skip)


@pytest.fixture
def full(request: pytest.FixtureRequest) -> bool:
    """True with --full: a test that runs a reduced count by default runs all of it."""
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
