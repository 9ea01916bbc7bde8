"""``ckpt.read``: a checkpoint's state tree as it was saved, without a state to load into."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ckpt._api import first_loadable
from ckpt._open import open_url
from ckpt._unflatten import decode_tree
from ckpt.errors import CorruptCheckpointError, StateMismatchError, storage_errors
from ckpt.format import Manifest
from recovery import Loader, LoadOptions
from storage_backends import StorageBackend


def read(
    url: str | os.PathLike[str] | StorageBackend,
    *,
    step: int | None = None,
    keys: Sequence[str] | None = None,
    options: LoadOptions | None = None,
) -> dict[str, Any]:
    """The state tree of a committed checkpoint, on this process, without a template.

    What ``ckpt.save(state, ...)`` stored comes back as plain Python: a module as its
    ``state_dict()`` (``{name: tensor}``), an optimizer as ``{"state": ..., "param_groups":
    ...}``, plain values as saved (tuples, bytes, dtypes, numpy arrays, dicts with keys
    that are not strings included). Each tensor is whole, assembled from the pieces every
    rank wrote, on the CPU; names that were tied when saved share one tensor. The result
    loads back with ``load_state_dict`` and saves again with ``ckpt.save``. Every byte is
    checksum-verified; nothing is written, and a missing local root is not created.

    All of the selected tensors are held in memory at once: select with ``keys``, or use
    ``ckpt.load`` into a sharded state, for checkpoints larger than this host's memory.

    Args:
        url: the checkpoint root.
        step: the step to read; None reads the newest committed step that verifies,
            falling back to older ones (with a WARNING) when the newest is corrupt.
        keys: top-level entries to read (e.g. ``["model"]``); None reads all of them.
        options: reader settings.

    Returns:
        The saved state: top-level key -> its tree.

    Raises:
        CheckpointNotFoundError: no committed checkpoint (or not ``step``); the message
            names ``ckpt convert`` when the root holds a DCP checkpoint.
        CorruptCheckpointError: ``step`` was given and fails verification, or every
            committed step does.
        StateMismatchError: a key of ``keys`` is not in the checkpoint.
    """
    backend = open_url(url, create=False)

    def read_one(tier: StorageBackend, manifest: Manifest) -> dict[str, Any]:
        return read_manifest_tree(tier, manifest, keys=keys, options=options)

    return first_loadable(backend, step, read_one)[2]


def read_manifest_tree(
    backend: StorageBackend,
    manifest: Manifest,
    *,
    keys: Sequence[str] | None = None,
    options: LoadOptions | None = None,
) -> dict[str, Any]:
    """The state tree of one validated manifest (``read`` for a step already chosen)."""
    stored = manifest.state
    if keys is not None:
        absent = [k for k in keys if k not in stored]
        if absent:
            raise StateMismatchError(
                f"step {manifest.step} under {backend.url} holds no entry "
                f"{', '.join(map(repr, absent))}; its entries are {', '.join(sorted(stored))}"
            )
        stored = {k: stored[k] for k in keys}
    shapes = {name: (entry.dtype, entry.shape) for name, entry in manifest.tensors.items()}
    tree, destinations = decode_tree(stored, shapes)
    with storage_errors(
        f"reading step {manifest.step} from {backend.url}", missing=CorruptCheckpointError
    ):
        Loader(backend, manifest, options).load(destinations)
    return tree
