"""Loads into CUDA tensors: the pool of reusable read buffers (bound, reuse, release only after
the copies completed, the fallback when page-locking fails) on any machine, and on CUDA the
load itself: bit-exact targets, copies ordered after kernels queued before the load, and no
page-locked memory left behind."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
import torch

import ckpt
from ckpt.errors import ChecksumMismatchError
from ckpt.format import Box, read_manifest, step_prefix
from recovery import Destination, DeviceCopier, Loader, LoadOptions, PinnedBufferPool
from storage_backends import LocalBackend

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
MiB = 1 << 20


class Gate:
    """A completion that the test completes: stands for a CUDA event recorded after copies."""

    def __init__(self) -> None:
        self.done = threading.Event()

    def query(self) -> bool:
        return self.done.is_set()

    def synchronize(self) -> None:
        self.done.wait(timeout=30)


def test_pool_limit_fits_one_largest_request_and_at_most_two() -> None:
    assert PinnedBufferPool.bound(64 * MiB, 256 * MiB) == 128 * MiB
    assert PinnedBufferPool.bound(200 * MiB, 256 * MiB) == 256 * MiB
    assert PinnedBufferPool.bound(300 * MiB, 256 * MiB) == 300 * MiB


def test_a_released_buffer_is_reused_and_the_bound_holds() -> None:
    pool = PinnedBufferPool(3 * MiB, pin=False)
    first = pool.acquire(2 * MiB)
    assert first is not None and first.data.numel() == 2 * MiB and not first.pinned
    assert pool.acquire(2 * MiB, wait=False) is None  # 4 MiB would pass the bound
    assert pool.acquire(4 * MiB) is None  # larger than the bound: the caller reads pageable
    pool.release(first)
    again = pool.acquire(MiB + 1)  # the free 2 MiB buffer fits: reused, not a new one
    assert again is not None and again.data.numel() == MiB + 1
    assert again.data.data_ptr() == first.data.data_ptr()
    assert pool.allocated_bytes == 2 * MiB
    pool.release(again)
    pool.close()
    assert pool.allocated_bytes == 0 and pool.pinned_bytes == 0


def test_a_free_buffer_too_small_is_evicted_to_make_room() -> None:
    pool = PinnedBufferPool(3 * MiB, pin=False)
    small = pool.acquire(2 * MiB)
    assert small is not None
    pool.release(small)
    big = pool.acquire(3 * MiB)
    assert big is not None and big.data.numel() == 3 * MiB
    assert pool.allocated_bytes == 3 * MiB
    pool.release(big)
    pool.close()


def test_a_buffer_returns_only_after_its_copies_complete() -> None:
    pool = PinnedBufferPool(2 * MiB, pin=False)
    buffer = pool.acquire(2 * MiB)
    assert buffer is not None
    gate = Gate()
    pool.release(buffer, [gate])
    assert pool.acquire(MiB, wait=False) is None  # its copy may still read it
    got: list[int] = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire(MiB).data.data_ptr()))  # type: ignore[union-attr]
    waiter.start()
    waiter.join(timeout=0.2)
    assert waiter.is_alive() and not got  # waiting for the copy, not handed out early
    gate.done.set()
    waiter.join(timeout=30)
    assert got == [buffer.data.data_ptr()]
    pool.close()


def test_a_reader_waits_for_a_buffer_another_reader_holds() -> None:
    pool = PinnedBufferPool(MiB, pin=False)
    held = pool.acquire(MiB)
    assert held is not None
    got: list[bool] = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire(MiB) is not None))
    waiter.start()
    waiter.join(timeout=0.2)
    assert waiter.is_alive()
    pool.release(held)
    waiter.join(timeout=30)
    assert got == [True]
    pool.close()


def test_close_waits_for_pending_copies_and_frees_every_buffer() -> None:
    pool = PinnedBufferPool(4 * MiB, pin=False)
    a, b = pool.acquire(MiB), pool.acquire(MiB)
    assert a is not None and b is not None
    gate = Gate()
    pool.release(a, [gate])
    closer = threading.Thread(target=pool.close)
    closer.start()
    closer.join(timeout=0.2)
    assert closer.is_alive()  # a copy may still read ``a``
    gate.done.set()
    closer.join(timeout=30)
    assert pool.allocated_bytes == MiB  # ``b`` is still with its reader
    pool.release(b)  # freed on return after close
    assert pool.allocated_bytes == 0
    with pytest.raises(RuntimeError, match="closed"):
        pool.acquire(1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="pinning succeeds where CUDA is present")
def test_a_pool_that_cannot_pin_reads_into_pageable_memory_and_warns_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pool = PinnedBufferPool(4 * MiB, pin=True)
    a, b = pool.acquire(MiB), pool.acquire(MiB)
    assert a is not None and b is not None and not a.pinned and not b.pinned
    assert caplog.text.count("could not page-lock") == 1 and "ulimit -l" in caplog.text
    assert pool.pinned_bytes == 0
    pool.release(a)
    pool.release(b)
    pool.close()


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(13)
    return {
        "w": torch.randn(300, 1000, generator=g),  # 1.2 MB: several 256 KiB chunks
        "h": torch.randn(77, 33, generator=g).to(torch.bfloat16),
        "c": torch.randn(40, 5, dtype=torch.complex64, generator=g),
        "i": torch.randint(-(2**40), 2**40, (513,), generator=g),
        "s": torch.tensor(3.25, dtype=torch.float64),
        "b": torch.rand(29, 3, generator=g) > 0.5,
    }


def _save(root: Path, *, compress: bool) -> dict[str, torch.Tensor]:
    state = _state()
    options = ckpt.SaveOptions(
        chunk_bytes=256 << 10, compression=ckpt.Compression(min_bytes=0) if compress else None
    )
    ckpt.save(state, root, step=1, options=options)
    return state


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("compress", [False, True], ids=["raw", "zstd"])
def test_a_load_onto_cuda_tensors_is_bit_exact(tmp_path: Path, compress: bool) -> None:
    saved = _save(tmp_path, compress=compress)
    # One tensor stays on the host: a read may then serve a CPU and a CUDA target at once.
    devices = {k: "cpu" if k == "i" else "cuda" for k in saved}
    target = {k: torch.zeros_like(v, device=devices[k]) for k, v in saved.items()}
    # A small request size: many jobs, buffers reused across them under the bound.
    options = LoadOptions(max_request_bytes=256 << 10, device_buffer_bytes=512 << 10)
    assert ckpt.load(target, tmp_path, options=options) == 1
    for k, v in saved.items():
        assert target[k].device.type == devices[k]
        got = target[k].cpu()
        assert got.dtype == v.dtype and torch.equal(got.view(torch.uint8), v.view(torch.uint8)), k


@needs_cuda
@pytest.mark.cuda
def test_a_resharded_load_onto_cuda_slices_of_rows_and_columns_is_bit_exact(
    tmp_path: Path,
) -> None:
    saved = _save(tmp_path, compress=False)
    backend = LocalBackend(tmp_path)
    manifest = read_manifest(backend, 1)
    w = saved["w"]
    boxes = [Box((0, 0), (300, 400)), Box((0, 400), (300, 600)), Box((17, 3), (5, 990))]
    targets = [torch.full(b.lengths, -1.0, device="cuda") for b in boxes]
    # A non-contiguous target: a column slice of a bigger CUDA tensor.
    host = torch.full((300, 700), -1.0, device="cuda")
    targets.append(host[:, 100:500])
    boxes.append(Box((0, 250), (300, 400)))
    Loader(backend, manifest).load([Destination("w", t, b) for t, b in zip(targets, boxes)])
    for t, b in zip(targets, boxes):
        rows = slice(b.offsets[0], b.offsets[0] + b.lengths[0])
        cols = slice(b.offsets[1], b.offsets[1] + b.lengths[1])
        assert torch.equal(t.cpu(), w[rows, cols])
    assert torch.equal(host[:, :100].cpu(), torch.full((300, 100), -1.0))  # left alone


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("side_stream", [False, True], ids=["default-stream", "user-stream"])
def test_the_load_lands_after_kernels_queued_before_it(tmp_path: Path, side_stream: bool) -> None:
    """Kernels the caller queued before the load write the target; the loaded values must
    win. Without the load stream waiting on the caller's stream, the copies would run
    while a long kernel holds the caller's stream, and the queued ``fill_`` would overwrite
    them afterwards."""
    n = 16 << 20
    saved = torch.arange(n, dtype=torch.float32)
    ckpt.save({"x": saved}, tmp_path, step=1)
    target = {"x": torch.zeros(n, device="cuda")}
    stream = torch.cuda.Stream() if side_stream else torch.cuda.current_stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        a = torch.randn(2048, 2048, device="cuda")
        for _ in range(20):  # a chain of matmuls that keeps the stream busy
            a = torch.tanh(a @ a)
        torch.cuda._sleep(1_000_000_000)  # and about a second more of GPU time
        target["x"].fill_(7.0)
        assert ckpt.load(target, tmp_path) == 1
        # The caller's next kernel on its stream sees the loaded data.
        total = target["x"].sum(dtype=torch.float64)
    torch.cuda.synchronize()
    assert torch.equal(target["x"].cpu(), saved)
    assert total.item() == saved.sum(dtype=torch.float64).item()


@needs_cuda
@pytest.mark.cuda
def test_cuda_buffers_are_page_locked_reused_only_after_their_copy_and_unlocked_on_close() -> None:
    """The load stream is held back by a long kernel queued before the copier was made, so a
    buffer handed out again before its copy ran would be overwritten under that copy."""
    pool = PinnedBufferPool(MiB)  # room for one buffer: each reader reuses the last one
    torch.cuda._sleep(500_000_000)  # the load stream waits for this (about half a second)
    copier = DeviceCopier([torch.device("cuda", torch.cuda.current_device())], pool)
    targets = [torch.zeros(MiB, dtype=torch.uint8, device="cuda") for _ in range(3)]
    pointers = set()
    for value, target in enumerate(targets, start=1):
        buffer = copier.acquire(MiB)
        assert buffer is not None and buffer.pinned and buffer.data.is_pinned()
        pointers.add(buffer.data.data_ptr())
        buffer.data.fill_(value)
        copier.copy(target, buffer.data, [MiB], None, pinned=True)
        copier.release(buffer)
    assert len(pointers) == 1
    assert pool.pinned_bytes == pool.allocated_bytes == MiB
    copier.finish()
    assert pool.pinned_bytes == 0 and pool.allocated_bytes == 0
    for value, target in enumerate(targets, start=1):
        assert torch.equal(target.cpu(), torch.full((MiB,), value, dtype=torch.uint8))


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("compress", [False, True], ids=["raw", "zstd"])
def test_a_corrupt_chunk_of_a_cuda_target_raises_naming_the_file(
    tmp_path: Path, compress: bool
) -> None:
    """Bytes are verified in the host buffer before any copy to the device is enqueued."""
    _save(tmp_path, compress=compress)
    backend = LocalBackend(tmp_path)
    (piece,) = read_manifest(backend, 1).tensors["w"].pieces
    path = tmp_path / step_prefix(1) / piece.file
    data = bytearray(path.read_bytes())
    data[piece.byte_offset + piece.byte_length // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    target = {k: torch.zeros_like(v, device="cuda") for k, v in _state().items()}
    options = LoadOptions(max_request_bytes=256 << 10, device_buffer_bytes=512 << 10)
    with pytest.raises(ChecksumMismatchError, match=re.escape(piece.file)):
        ckpt.load(target, tmp_path, options=options)
    torch.cuda.synchronize()
