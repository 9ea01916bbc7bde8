"""``ckpt demo`` runs for the node-failure tests, sized for CI or for ``--full``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ckpt.demo import DemoResult, run_demo


def sized_demo(workdir: Path, *, full: bool, **options: Any) -> DemoResult:
    """``run_demo`` without progress lines: 12 steps with a save every 3 in CI, 16 and 4
    with ``--full``; ``options`` are run_demo's (nproc, seed, kill_during, ...)."""
    return run_demo(
        str(workdir),
        steps=16 if full else 12,
        every=4 if full else 3,
        echo=lambda *_: None,
        **options,
    )
