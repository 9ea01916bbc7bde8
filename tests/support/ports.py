"""Free TCP ports on the loopback interface, chosen at run time (nothing is hard-coded)."""

from __future__ import annotations

import random
import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    """Whether ``port`` can be bound on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_pair(taken: set[int], offset: int = 10_000) -> int:
    """A port P with P and P + ``offset`` both free and not in ``taken`` (both are added).

    For servers that derive a second port from the first (SeaweedFS's gRPC port is
    P + 10000). P is drawn from 20000..55000 - offset.
    """
    rng = random.Random()
    for _ in range(500):
        port = rng.randrange(20_000, 55_000 - offset)
        if port in taken or port + offset in taken:
            continue
        if port_is_free(port) and port_is_free(port + offset):
            taken.update((port, port + offset))
            return port
    raise RuntimeError(f"no free port pair (P, P + {offset}) below 55000 on 127.0.0.1")
