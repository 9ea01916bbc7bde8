"""Helpers shared by the benchmarks: page cache eviction, residency, RSS, timing, walking
a state's tensors, and running gloo ranks.

Nothing here asserts a timing; the benchmarks only measure and report.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tests.support.ports import free_port

DROP_CACHES = Path("/proc/sys/vm/drop_caches")
GB = 1e9  # bandwidths are reported in decimal GB/s


def files_under(path: Path) -> list[Path]:
    """Every regular file at or below ``path``."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file())


def try_drop_caches() -> bool:
    """Write 3 to /proc/sys/vm/drop_caches; False when not permitted (e.g. in a container)."""
    try:
        os.sync()
        DROP_CACHES.write_text("3\n")
    except OSError:
        return False
    return True


class PageCache:
    """Evicts files from the page cache before a cold read.

    Each file is fsynced (dirty pages cannot be dropped) and then dropped with
    ``posix_fadvise(POSIX_FADV_DONTNEED)``. With ``drop_caches=True`` the whole page
    cache is dropped as well where permitted; that also evicts the interpreter's and
    torch's code pages (the next timed call pages them back in) and slows every other
    process on the machine, so it is opt-in. ``method`` says what was used.
    ``worst_resident`` is the largest fraction of a file still cached right after an
    eviction (checked with ``mincore``), so a "cold" number that was really served from
    memory does not go unnoticed.
    """

    def __init__(self, drop_caches: bool = False) -> None:
        self.drop_caches = drop_caches and try_drop_caches()
        self.method = "fsync + posix_fadvise(DONTNEED)"
        if self.drop_caches:
            self.method += " + drop_caches=3"
        elif drop_caches:
            self.method += " (drop_caches not permitted)"
        self.worst_resident = 0.0

    def evict(self, path: Path) -> float:
        """Evict every file under ``path``; returns the fraction of its bytes still cached."""
        files = files_under(path)
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        if self.drop_caches:
            try_drop_caches()
        total = sum(f.stat().st_size for f in files)
        cached = sum(resident_bytes(f) for f in files)
        fraction = cached / total if total else 0.0
        self.worst_resident = max(self.worst_resident, fraction)
        return fraction


_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_MAP_FAILED = ctypes.c_void_p(-1).value


def resident_bytes(path: Path) -> int:
    """Bytes of ``path`` currently in the page cache (``mincore`` on a read-only mapping)."""
    size = path.stat().st_size
    if size == 0:
        return 0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == _MAP_FAILED:
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
        try:
            pages = -(-size // mmap.PAGESIZE)
            vec = np.zeros(pages, dtype=np.uint8)
            if _libc.mincore(addr, size, vec.ctypes.data) != 0:
                raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
            return min(size, int((vec & 1).sum()) * mmap.PAGESIZE)
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def rss_bytes() -> int:
    """Resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * mmap.PAGESIZE


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@contextmanager
def timed(samples: dict[str, list[float]], key: str) -> Iterator[None]:
    """Append the wall time of the block to ``samples[key]`` (only when it succeeds)."""
    start = time.perf_counter()
    yield
    samples.setdefault(key, []).append(time.perf_counter() - start)


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def human_bytes(n: float) -> str:
    if abs(n) < 1 << 20:
        return f"{n / 1024:.1f} KiB"
    if abs(n) < 1 << 30:
        return f"{n / (1 << 20):.1f} MiB"
    return f"{n / (1 << 30):.2f} GiB"


def git_revision(repo: Path) -> str:
    """``<commit>`` or ``<commit>+dirty``: which code a run measured."""
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def iter_tensors(tree: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(dotted name, tensor) of every tensor in a nested dict, in insertion order."""
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from iter_tensors(value, f"{prefix}.{key}" if prefix else str(key))


def run_gloo_world(
    world: int, fn: Callable[..., Any], *args: Any, init_timeout_s: float = 120.0
) -> Any:
    """Run ``fn(*args)`` on ``world`` spawned gloo ranks; return rank 0's (JSON) result.

    ``fn`` must be a module-level function (spawn imports it by name). A failed rank
    stops the benchmark with that rank's traceback.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        context = torch.multiprocessing.start_processes(
            _gloo_rank,
            args=(world, free_port(), out_dir, init_timeout_s, fn, args),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
        try:
            while not context.join(timeout=60):
                pass
        except Exception as exc:  # a rank died: report what the ranks wrote
            print(f"  a rank failed: {exc!r}", file=sys.stderr)
        results = []
        for rank in range(world):
            path = Path(out_dir) / f"rank{rank}.json"
            data = (
                json.loads(path.read_text())
                if path.exists()
                else {"ok": False, "error": "no result"}
            )
            if not data["ok"]:
                raise SystemExit(f"{fn.__name__}: rank {rank} of {world} failed:\n{data['error']}")
            results.append(data["value"])
        return results[0]


def _gloo_rank(
    rank: int,
    world: int,
    port: int,
    out_dir: str,
    init_timeout_s: float,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
) -> None:
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world)
    )
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    result = Path(out_dir) / f"rank{rank}.json"
    try:
        dist.init_process_group(
            "gloo", rank=rank, world_size=world, timeout=timedelta(seconds=init_timeout_s)
        )
        try:
            result.write_text(json.dumps({"ok": True, "value": fn(*args)}))
        finally:
            dist.destroy_process_group()
    except BaseException as exc:
        result.write_text(json.dumps({"ok": False, "error": f"{exc!r}\n{traceback.format_exc()}"}))
        raise
