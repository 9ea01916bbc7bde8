"""The loader's in-place path: whole chunks land straight in the target, the partly
needed chunks at both ends of a resharded row range go through a buffer, and every
byte that reaches a target is verified either way (a corrupt chunk names its file)."""

from __future__ import annotations

import itertools
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch

import ckpt
from ckpt.errors import ChecksumMismatchError
from ckpt.format import read_manifest, step_prefix
from recovery import Destination, Loader, LoadOptions
from storage_backends import LocalBackend

CHUNK = 64 << 10
ROWS, COLS = 4096, 256  # 4 MiB of float32, 1 KiB rows: row ranges cut chunks
STEP = 3


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    root = tmp_path_factory.mktemp("direct")
    full = torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(5))
    small = torch.arange(1000, dtype=torch.float32)
    ckpt.save({"w": full, "b": small}, root, step=STEP, options=ckpt.SaveOptions(chunk_bytes=CHUNK))
    return root, full


def _load_rows(root: Path, bounds: list[int], **options: int) -> tuple[list[torch.Tensor], int]:
    backend = LocalBackend(root, create=False)
    manifest = read_manifest(backend, STEP)
    targets = [torch.full((hi - lo, COLS), 7.0) for lo, hi in itertools.pairwise(bounds)]
    destinations = [
        Destination("w", t, ckpt.format.Box((lo, 0), (hi - lo, COLS)))
        for t, (lo, hi) in zip(targets, itertools.pairwise(bounds))
    ]
    stats = Loader(backend, manifest, LoadOptions(**options)).load(destinations)
    return targets, stats.bytes_read


@pytest.mark.parametrize(
    "bounds",
    [[0, ROWS], [0, 1365, 2730, ROWS], [100, 1900, 3999], [0, 64, 2100, 2101, ROWS]],
)
@pytest.mark.parametrize("step", [CHUNK, 5 * CHUNK + 4096, 8 << 20])
def test_row_ranges_cutting_chunks_load_bit_exactly(
    saved: tuple[Path, torch.Tensor], bounds: list[int], step: int
) -> None:
    root, full = saved
    targets, read = _load_rows(root, bounds, read_step_bytes=step, io_threads=3)
    for t, (lo, hi) in zip(targets, itertools.pairwise(bounds)):
        assert torch.equal(t, full[lo:hi])
    needed = (bounds[-1] - bounds[0]) * COLS * 4
    # Whole chunks only: at most one chunk of slack at each end of each range.
    assert needed <= read <= needed + 2 * CHUNK * (len(bounds) - 1)


def _corrupt(root: Path, at: int) -> Path:
    """Flip one byte ``at`` bytes into tensor w's stored bytes; returns the data file."""
    backend = LocalBackend(root, create=False)
    (piece,) = read_manifest(backend, STEP).tensors["w"].pieces
    path = root / step_prefix(STEP) / piece.file
    data = bytearray(path.read_bytes())
    data[piece.byte_offset + at] ^= 0xFF
    path.write_bytes(bytes(data))
    return Path(piece.file)


@pytest.mark.parametrize(
    "at",
    [
        1365 * COLS * 4 - 10,  # in the partly needed chunk at the end of the first range
        1365 * COLS * 4 + 10,  # the same chunk, where the second range starts
        2 * CHUNK + 5,  # a whole chunk read in place
        ROWS * COLS * 4 - 1,  # the last chunk
    ],
)
def test_corrupt_chunk_raises_naming_the_file(
    tmp_path: Path, saved: tuple[Path, torch.Tensor], at: int
) -> None:
    src, _ = saved
    root = tmp_path / "copy"
    shutil.copytree(src, root)
    file = _corrupt(root, at)
    with pytest.raises(ChecksumMismatchError) as info:
        _load_rows(root, [0, 1365, 2730, ROWS], read_step_bytes=3 * CHUNK)
    assert info.value.file == str(file)
    assert str(file) in str(info.value)
    with pytest.raises(ChecksumMismatchError):
        ckpt.load({"w": torch.empty(ROWS, COLS), "b": torch.empty(1000)}, root, step=STEP)


class _PathOnly:
    """A backend that reads by path only (it declares no ``OpensReaders``)."""

    def __init__(self, inner: LocalBackend) -> None:
        self.inner = inner
        self.url = inner.url
        self.ranges = 0

    def read(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        return self.inner.read(path, offset, length)

    def size(self, path: str) -> int:
        return self.inner.size(path)

    def read_into(self, path: str, offset: int, out: memoryview) -> None:
        self.ranges += 1
        self.inner.read_into(path, offset, out)


def test_readers_default_to_the_cpus_for_local_files_only(tmp_path: Path) -> None:
    """By default a local load runs at most one reader per CPU, other backends 4; an
    explicit ``io_threads`` is what runs."""
    local = LocalBackend(tmp_path)
    cpus = len(os.sched_getaffinity(0))
    assert LoadOptions().threads_for(local) == min(4, cpus)
    assert LoadOptions().threads_for(_PathOnly(local)) == 4  # type: ignore[arg-type]
    assert LoadOptions(io_threads=7).threads_for(local) == 7


def test_a_backend_without_readers_is_read_range_by_range(
    saved: tuple[Path, torch.Tensor],
) -> None:
    """The loader reads through ``read_into`` of a backend that opens no readers, and the
    result is the same."""
    root, full = saved
    backend = _PathOnly(LocalBackend(root, create=False))
    manifest = read_manifest(backend, STEP)  # type: ignore[arg-type]
    target = torch.zeros(ROWS, COLS)
    Loader(backend, manifest, LoadOptions(read_step_bytes=CHUNK)).load(  # type: ignore[arg-type]
        [Destination("w", target, ckpt.format.Box((0, 0), (ROWS, COLS)))]
    )
    assert torch.equal(target, full)
    assert backend.ranges >= ROWS * COLS * 4 // CHUNK


class _Recording(_PathOnly):
    """Records which thread read which range."""

    def __init__(self, inner: LocalBackend) -> None:
        super().__init__(inner)
        self.reads: list[tuple[int, str, int]] = []

    def read_into(self, path: str, offset: int, out: memoryview) -> None:
        self.reads.append((threading.get_ident(), path, offset))
        super().read_into(path, offset, out)


def test_readers_keep_to_one_file_in_offset_order(tmp_path: Path) -> None:
    """Each reader starts on a file of its own and reads it front to back (one sequential
    stream per file for the kernel's readahead); the load is exact."""
    state = {
        f"t{i}": torch.randn(256, 1024, generator=torch.Generator().manual_seed(i))
        for i in range(8)
    }
    options = ckpt.SaveOptions(chunk_bytes=CHUNK, file_bytes=2 << 20)
    ckpt.save(state, tmp_path, step=1, options=options)
    backend = _Recording(LocalBackend(tmp_path, create=False))
    manifest = read_manifest(backend, 1)  # type: ignore[arg-type]
    targets = {name: torch.zeros_like(t) for name, t in state.items()}
    destinations = [
        Destination(name, t, ckpt.format.Box((0, 0), tuple(t.shape))) for name, t in targets.items()
    ]
    Loader(backend, manifest, LoadOptions(io_threads=2, read_step_bytes=CHUNK)).load(  # type: ignore[arg-type]
        destinations
    )
    assert all(torch.equal(targets[n], state[n]) for n in state)
    data = [(t, p, o) for t, p, o in backend.reads if "/data/" in p]
    assert len({p for _, p, _ in data}) >= 2
    by_thread: dict[int, list[tuple[str, int]]] = {}
    for thread, path, offset in data:
        by_thread.setdefault(thread, []).append((path, offset))
    firsts = {reads[0][0] for reads in by_thread.values()}
    assert len(firsts) == len(by_thread)  # no two readers start on the same file
    for reads in by_thread.values():
        run = []
        for path, offset in reads:
            if path != reads[0][0]:
                break
            run.append(offset)
        assert run == sorted(run)
