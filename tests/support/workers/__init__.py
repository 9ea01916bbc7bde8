"""Processes the tests spawn, each run as ``python -m tests.support.workers.NAME`` with the
repository root as working directory (or on ``PYTHONPATH``):

* ``train``: a small deterministic training loop with asynchronous checkpoints, killed and
  resumed by ``tests/ckpt/test_exact_resume.py``;
* ``sigterm``: a training loop told to stop with SIGTERM, in several modes
  (``tests/ckpt/test_manager.py``);
* ``enospc``: saves on a tiny private tmpfs until the disk is full
  (``tests/storage_backends/test_disk_full.py``).
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
