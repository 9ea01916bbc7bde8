"""A checkpoint on local disk as tests make and tamper with it: saves with a private engine,
manifest reads and (re-sealed) edits, byte flips in data files."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ckpt
from ckpt.coordination import LocalCoordinator
from ckpt.format import MANIFEST_NAME, seal_manifest, step_prefix
from storage_backends import LocalBackend


def save_with(
    state: Mapping[str, Any], root: Path, step: int, options: ckpt.SaveOptions | None = None
) -> ckpt.SaveResult:
    """Save ``state`` as ``step`` under ``root`` with its own engine (``ckpt.save`` uses the default one)."""
    snap = ckpt.Snapshotter(options)
    backend = LocalBackend(root)
    try:
        return snap.async_save(state, backend, step, LocalCoordinator()).result()
    finally:
        snap.close()
        backend.close()


def step_dir(root: Path, step: int) -> Path:
    """The directory of ``step``'s prefix."""
    return root / step_prefix(step)


def manifest_path(root: Path, step: int) -> Path:
    return step_dir(root, step) / MANIFEST_NAME


def read_manifest(root: Path, step: int) -> dict[str, Any]:
    """The manifest of ``step`` as parsed JSON. A format v2 manifest comes with every
    tensor's ``pieces`` and the ``headers`` of its data files taken from the writers'
    index files, as a v1 manifest lists them (``write_manifest`` drops them again)."""
    doc: dict[str, Any] = json.loads(manifest_path(root, step).read_bytes())
    inline = {name for name, entry in doc.get("tensors", {}).items() if entry.get("pieces")}
    for writer in doc.get("writers", ()):
        index = json.loads((step_dir(root, step) / writer["index"]).read_bytes())
        doc.setdefault("headers", {}).update(index["headers"])
        for name, entry in index["tensors"].items():
            if name not in inline:  # a tensor one writer stores whole is listed in both
                doc["tensors"][name]["pieces"].extend(entry["pieces"])
    return doc


def write_manifest(root: Path, step: int, doc: Mapping[str, Any]) -> None:
    """Replace the manifest of ``step`` (it is read-only on purpose; tests tamper anyway).

    A format v2 manifest is written without the pieces and headers ``read_manifest``
    added: tampering with those means tampering with a writer's index file."""
    path = manifest_path(root, step)
    path.chmod(0o644)
    body = {k: v for k, v in doc.items() if k != "manifest_checksum"}
    if body.get("writers"):
        tensors = body.get("tensors")
        if isinstance(tensors, dict):  # pieces stay listed only for tensors stored whole
            body["tensors"] = {
                n: {**e, "pieces": []} if _in_index_files(e) else e for n, e in tensors.items()
            }
        body.pop("headers", None)
    # Re-sealed, so that each test reaches the validation it is about.
    path.write_bytes(seal_manifest(json.dumps(body).encode()))


def _in_index_files(entry: Any) -> bool:
    """A v2 tensor entry whose pieces live in the writers' index files (not one whole region)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("layout"), dict):
        return False
    layout = entry["layout"]
    regions = layout.get("regions")
    if regions is not None:
        return len(regions) != 1
    writers = layout.get("writers", [])
    return not (len(writers) == 1 and writers[0][2] == 1)


def piece_of(root: Path, step: int, tensor: str) -> dict[str, Any]:
    """The single stored piece of ``tensor`` in ``step``'s manifest."""
    (piece,) = read_manifest(root, step)["tensors"][tensor]["pieces"]
    return dict(piece)


def data_file(root: Path, step: int, relative: str) -> Path:
    return step_dir(root, step) / relative


def flip_byte(path: Path, offset: int) -> None:
    """Invert every bit of the byte at ``offset`` of ``path``."""
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
