"""What a checkpoint root on local disk holds beyond what its manifests name: step prefixes
without a manifest, and files inside a committed step that its manifest does not name
(temporary files of unfinished writes included). Checks for the fault campaigns."""

from __future__ import annotations

import os
from pathlib import Path

from ckpt.format import INDEX_DIR, MANIFEST_NAME, read_manifest, scan_steps, step_prefix
from storage_backends import LocalBackend


def unnamed_files(root: str | Path, step: int) -> list[str]:
    """Files under committed ``step``'s prefix (hidden ones too) that are neither its
    manifest, nor a file the manifest names, nor a rank's report under ``index/``."""
    manifest = read_manifest(LocalBackend(root), step)
    base = Path(root) / step_prefix(step)
    keep = set(manifest.files) | {MANIFEST_NAME}
    found = []
    for dirpath, _dirs, names in os.walk(base):
        for name in names:
            rel = Path(dirpath, name).relative_to(base).as_posix()
            if rel not in keep and not rel.startswith(INDEX_DIR + "/"):
                found.append(f"{step_prefix(step)}/{rel}")
    return sorted(found)


def leftovers(root: str | Path) -> dict[str, list[str]]:
    """Garbage older than the newest committed step: ``abandoned`` step prefixes (no
    manifest) and ``stale`` files (``unnamed_files``) of older committed steps."""
    listing = scan_steps(LocalBackend(root))
    if not listing.committed:
        return {"abandoned": [], "stale": []}
    newest = listing.committed[-1]
    return {
        "abandoned": [step_prefix(s) for s in listing.uncommitted if s < newest],
        "stale": [f for s in listing.committed[:-1] for f in unnamed_files(root, s)],
    }
