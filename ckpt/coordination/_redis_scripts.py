"""The Lua scripts of the Redis coordinator, loaded once from the package's ``lua/`` files.

Every state transition is one script, so it is atomic. Each is sent as a first line that
names it (``-- ckpt REPORT``: monitoring and client wrappers can tell the scripts apart),
then the shared ``_common.lua`` (the caller checks, the server clock, the waiter fan-out),
then its own file. redis-py's script objects send them by SHA (EVALSHA) and load one
into a server that does not know it yet.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from importlib import resources
from typing import Any

NAMES = ("REPORT", "CLAIM", "COMMIT", "ABORT", "WATCH", "BEAT")
HEADER = "-- ckpt "


@functools.cache
def sources() -> Mapping[str, str]:
    """Every script's full text, by name (read from the package data once per process)."""
    folder = resources.files(__package__) / "lua"
    common = (folder / "_common.lua").read_text(encoding="utf-8")
    return {
        name: f"{HEADER}{name}\n{common}\n{(folder / f'{name.lower()}.lua').read_text('utf-8')}"
        for name in NAMES
    }


def register(client: Any) -> dict[str, Any]:
    """redis-py script objects on ``client``, by name."""
    return {name: client.register_script(source) for name, source in sources().items()}
