"""Names under a checkpoint root: step prefixes, the manifest, data and index folders."""

from __future__ import annotations

import posixpath
import re
from typing import Any

from ckpt.errors import CorruptCheckpointError

MANIFEST_NAME = "manifest.json"
INDEX_DIR = "index"
DATA_DIR = "data"
DEFAULT_CHUNK_BYTES = 1 << 20
_STEP_RE = re.compile(r"step-([0-9]{9,})")


def step_prefix(step: int) -> str:
    """The prefix of ``step`` under the root: ``step-`` and at least 9 digits."""
    return f"step-{step:09d}"


def parse_step_prefix(name: str) -> int | None:
    """The step a prefix name holds, or None for any other name.

    Only the spelling ``step_prefix`` writes is a step: ``step-0000000003`` (an extra
    leading zero) is not step 3, so that no step is counted, listed or deleted twice.
    """
    match = _STEP_RE.fullmatch(name)
    if match is None:
        return None
    step = int(match.group(1))
    return step if step_prefix(step) == name else None


def manifest_path(step: int) -> str:
    return f"{step_prefix(step)}/{MANIFEST_NAME}"


def safe_relative_path(path: Any, where: str) -> str:
    """Validate a path stored in a manifest: relative, normalised, inside the prefix."""
    if not isinstance(path, str) or not path:
        raise CorruptCheckpointError(f"{where}: file path {path!r} is not a non-empty string")
    norm = posixpath.normpath(path)
    if (
        path.startswith("/")
        or "\\" in path
        or "\x00" in path
        or norm != path
        or norm == ".."
        or norm.startswith("../")
    ):
        raise CorruptCheckpointError(
            f"{where}: file path {path!r} would leave the checkpoint prefix; refusing to read it"
        )
    return path
