"""The process-wide engine behind ``ckpt.save`` and ``ckpt.async_save``."""

from __future__ import annotations

import threading

from ckpt.engine._engine import Snapshotter
from ckpt.format import Manifest

_lock = threading.Lock()
_default: Snapshotter | None = None
_restored: Manifest | None = None  # for the default engine made after a ``ckpt.restore``


def default_snapshotter() -> Snapshotter:
    """One engine per process, so that module-level saves reuse its staging memory."""
    global _default, _restored
    with _lock:
        if _default is None:
            _default = Snapshotter()
            if _restored is not None:
                _default.reuse_plan_of(_restored)
                _restored = None
        return _default


def restored(manifest: Manifest) -> None:
    """``ckpt.restore`` loaded ``manifest``: the next module-level save may reuse its write
    plan (``Snapshotter.reuse_plan_of``), without making the engine for a job that only loads."""
    global _restored
    with _lock:
        if _default is None:
            _restored = manifest
            return
        _default.reuse_plan_of(manifest)
