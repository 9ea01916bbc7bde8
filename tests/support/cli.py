"""Running the ``ckpt`` command line in the test's own process."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

import ckpt.cli as cli


def run_cli(monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[int, str]:
    """Run the ``ckpt`` command line with ``args``: (exit status, what it printed on stdout
    and stderr, unwrapped, in order)."""
    out = io.StringIO()
    console = Console(file=out, width=10_000, color_system=None)
    monkeypatch.setattr(cli, "console", console)
    monkeypatch.setattr(cli, "err_console", console)
    return cli.run(list(args)), out.getvalue()
