"""Running the ``ckpt`` command line in the test's own process."""

from __future__ import annotations

import io
import sys

import pytest
from rich.console import Console

import ckpt.cli as cli


def run_cli(monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[int, str]:
    """Run the ``ckpt`` entry point with ``args``: (exit code, what it printed, unwrapped)."""
    out = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=out, width=10_000, color_system=None))
    monkeypatch.setattr(sys, "argv", ["ckpt", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    code = exit_info.value.code
    return (code if isinstance(code, int) else 1), out.getvalue()
