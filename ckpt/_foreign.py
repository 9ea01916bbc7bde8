"""Recognise a checkpoint root that holds someone else's checkpoint, by file names only.

A job pointed at a torch.distributed.checkpoint (DCP) directory would otherwise find "no
committed checkpoint" and start again from step 0. Nothing here reads a file: DCP's
``.metadata`` is a pickle, and ckpt never unpickles what it did not write.
"""

from __future__ import annotations

import re

from storage_backends import StorageBackend, StorageBackendError

_DISTCP = re.compile(r"__\d+_\d+\.distcp")
_DCP_METADATA = ".metadata"


def find_dcp(backend: StorageBackend) -> list[str]:
    """The DCP checkpoint directories at the root of ``backend`` or one level below it
    (``""`` for the root itself): those holding a ``.metadata`` file or ``__R_N.distcp``
    data files. Empty when there are none, or when the root cannot be listed."""
    try:
        paths = backend.list_objects("")
    except (StorageBackendError, OSError):
        return []
    found: set[str] = set()
    for path in paths:
        folder, _, name = path.rpartition("/")
        if folder.count("/") > 0:
            continue  # deeper than one level below the root
        if name == _DCP_METADATA or _DISTCP.fullmatch(name):
            found.add(folder)
    return sorted(found)


def dcp_message(backend: StorageBackend, folders: list[str]) -> str:
    """One line: what was found under ``backend`` and what to do with it."""
    root = backend.url.rstrip("/")
    where = (
        root
        if folders == [""]
        else ", ".join(f"{root}/{f}" if f else root for f in folders[:3])
        + (f" and {len(folders) - 3} more" if len(folders) > 3 else "")
    )
    source = (f"{root}/{folders[0]}" if folders[0] else root) if len(folders) == 1 else "DCP_DIR"
    return (
        f"no committed ckpt checkpoint under {root}, but it holds a torch.distributed.checkpoint "
        f"(DCP) checkpoint ({where}: .metadata / *.distcp files), which ckpt does not read in "
        f"place: import it with `ckpt convert {source} DST` (add --trust-pickled-values to "
        "bring DCP's pickled non-tensor values too, such as an optimizer's param_groups) and "
        "point the job at DST, or load it with torch.distributed.checkpoint.load; refusing to "
        "start from scratch"
    )
