"""The process-wide engine behind ``ckpt.save`` and ``ckpt.async_save``."""

from __future__ import annotations

import threading

from ckpt.engine._engine import Snapshotter

_lock = threading.Lock()
_default: Snapshotter | None = None


def default_snapshotter() -> Snapshotter:
    """One engine per process, so that module-level saves reuse its staging memory."""
    global _default
    with _lock:
        if _default is None:
            _default = Snapshotter()
        return _default
