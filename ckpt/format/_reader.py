"""Reading a checkpoint root: which steps exist, and a step's validated manifest."""

from __future__ import annotations

from dataclasses import dataclass

from ckpt.errors import CheckpointNotFoundError, CorruptCheckpointError, storage_errors
from ckpt.format._paths import manifest_path, parse_step_prefix
from ckpt.format._schema import Manifest
from ckpt.format._writers import load_pieces
from storage_backends import StorageBackend


@dataclass(frozen=True)
class StepListing:
    """Step prefixes found under a root: committed ones (manifest present) and the rest."""

    committed: tuple[int, ...]
    uncommitted: tuple[int, ...]


def scan_steps(backend: StorageBackend) -> StepListing:
    """List step prefixes under ``backend``'s root, oldest first.

    Storage is the source of truth: a step is committed exactly when its manifest exists.
    Raises the backend's ``StorageBackendError``; callers name what they were doing.
    """
    committed: list[int] = []
    uncommitted: list[int] = []
    for name in backend.list_prefixes(""):
        step = parse_step_prefix(name)
        if step is None:
            continue
        (committed if backend.exists(manifest_path(step)) else uncommitted).append(step)
    return StepListing(tuple(sorted(committed)), tuple(sorted(uncommitted)))


def read_manifest(backend: StorageBackend, step: int, *, pieces: bool = True) -> Manifest:
    """Read and validate the manifest of ``step``.

    A format v2 manifest keeps its pieces in the writers' index files: with ``pieces``
    (the default) every one is read, so the result lists every stored piece as a v1
    manifest does; without, the tensors carry their layouts only, and ``load_pieces``
    fetches what a reader needs.

    Raises:
        CheckpointNotFoundError: the step has no manifest.
        CorruptCheckpointError: the manifest fails its checksum or any check of the format.
        StorageError: the medium failed.
    """
    path = manifest_path(step)
    with storage_errors(f"reading {path} under {backend.url}", missing=CheckpointNotFoundError):
        data = backend.read(path)
    manifest = Manifest.from_bytes(data, f"{backend.url}/{path}")
    if manifest.step != step:
        raise CorruptCheckpointError(
            f"{backend.url}/{path}: the manifest says step {manifest.step}, its prefix says {step}"
        )
    return load_pieces(backend, manifest) if pieces else manifest
