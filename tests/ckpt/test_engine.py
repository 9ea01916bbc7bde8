"""The async snapshot engine: stage (blocking) -> persist (background) -> commit.

Saves are held "in flight" with ``FaultyBackend``'s gate and failures are injected
with it; nothing here waits on a clock.
"""

from __future__ import annotations

import concurrent.futures
import gc
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

import ckpt
from ckpt.coordination import LocalCoordinator
from ckpt.engine import StagingBuffer, default_snapshotter
from ckpt.errors import CoordinationError, StorageFullCheckpointError
from ckpt.format import DATA_DIR, manifest_path, read_manifest, scan_steps, step_prefix
from storage_backends import (
    BlobStream,
    BytesLike,
    LocalBackend,
    StorageBackendError,
    StorageFullError,
)
from tests.support.faulty import FaultyBackend

MiB = 1 << 20


@pytest.fixture
def snap() -> Iterator[ckpt.Snapshotter]:
    s = ckpt.Snapshotter()
    yield s
    s.close()


@pytest.fixture
def gated(snap: ckpt.Snapshotter, backend: LocalBackend) -> Iterator[FaultyBackend]:
    """``backend`` behind a closed gate; opened at teardown, before ``snap`` closes."""
    with FaultyBackend(backend, gate=threading.Event()) as faulty:
        yield faulty


def _state(seed: int = 0) -> dict[str, object]:
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(32, 16)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return {
        "model": model,
        "w": torch.randn(1000, generator=gen),
        "ids": torch.arange(500, dtype=torch.int64),
        "half": torch.randn(64, 8, generator=gen).to(torch.bfloat16),
        "step": 7,
    }


def _blank() -> dict[str, object]:
    """A state shaped like ``_state`` with different values, to load into."""
    state = _state(seed=99)
    for value in state.values():
        if isinstance(value, torch.Tensor):
            value.zero_()
    state["step"] = 0
    return state


def _tensors(state: dict[str, object]) -> dict[str, torch.Tensor]:
    """Every tensor of a state by name, cloned."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if isinstance(value, torch.nn.Module):
            out.update({f"{key}.{k}": v.detach().clone() for k, v in value.state_dict().items()})
        elif isinstance(value, torch.Tensor):
            out[key] = value.clone()
    return out


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _finished(pending: ckpt.PendingSave) -> None:
    """Wait for a save to end without looking at its outcome (so it stays "unobserved")."""
    ended = threading.Event()
    pending.add_done_callback(lambda _: ended.set())
    assert ended.wait(60), "the save did not end"


def _mutate(state: dict[str, object]) -> None:
    """Add 1 in place to every tensor of ``state``, as an optimizer step would."""
    with torch.no_grad():
        for value in _tensors_live(state):
            value.add_(1)


def _tensors_live(state: dict[str, object]) -> list[torch.Tensor]:
    """Every tensor of ``state`` itself (module parameters and buffers included)."""
    live: list[torch.Tensor] = []
    for value in state.values():
        if isinstance(value, torch.nn.Module):
            live.extend(value.state_dict().values())
        elif isinstance(value, torch.Tensor):
            live.append(value)
    return live


# -- staging: the call returns after the copy; training may mutate at once ------------------


def test_mutation_after_async_save_returns_does_not_change_the_checkpoint(
    snap: ckpt.Snapshotter, backend: LocalBackend, gated: FaultyBackend
) -> None:
    faulty = gated
    state = _state()
    before = _tensors(state)
    # Occupy the background thread, so that nothing of the save runs before the first
    # mutation: whatever it finds must already be in the staging buffer.
    background_free = threading.Event()
    snap._persist.submit(background_free.wait, 10)

    pending = snap.async_save(state, faulty, 1, LocalCoordinator())
    assert not pending.done() and snap.busy() and snap.in_flight() == [pending]
    assert "running" in repr(pending)
    _mutate(state)  # training goes on at once
    state["step"] = 8
    background_free.set()
    assert faulty.held.wait(10), "the background write never started"
    _mutate(state)  # and while the write is held
    faulty.release()
    assert pending.result().committed

    target = _blank()
    assert ckpt.load(target, backend) == 1
    _assert_same(_tensors(target), before)
    assert target["step"] == 7
    assert not snap.busy()


def test_at_most_one_save_in_flight_the_second_waits_for_the_staging_buffer(
    snap: ckpt.Snapshotter,
    backend: LocalBackend,
    gated: FaultyBackend,
    caplog: pytest.LogCaptureFixture,
) -> None:
    faulty = gated
    order: list[str] = []
    second_waiting = threading.Event()
    real_acquire = snap._pool.acquire

    def acquire(
        nbytes: int, timeout: float | None = None, *, at_most: int | None = None
    ) -> StagingBuffer:
        second_waiting.set()
        return real_acquire(nbytes, timeout, at_most=at_most)

    first = snap.async_save(_state(1), faulty, 1, LocalCoordinator())
    assert faulty.held.wait(10)
    snap._pool.acquire = acquire  # type: ignore[method-assign]
    results: list[ckpt.PendingSave] = []

    def second_save() -> None:
        results.append(snap.async_save(_state(2), faulty, 2, LocalCoordinator()))
        order.append("second staged")

    thread = threading.Thread(target=second_save)
    thread.start()
    assert second_waiting.wait(10)
    # The first save still holds the only staging buffer: it cannot be handed out yet.
    assert snap._pool.busy() and not first.done()
    order.append("first released")
    faulty.release()
    thread.join(30)
    assert order == ["first released", "second staged"]
    assert first.result().step == 1
    assert results[0].result().step == 2
    assert scan_steps(backend).committed == (1, 2)
    assert "waiting for the checkpoint in flight" in caplog.text


# -- errors surface on the handle and at the next call ----------------------------------


@pytest.mark.parametrize(
    ("fault", "error", "expected"),
    [
        ({"fail_write_at": 1}, StorageBackendError, ckpt.StorageError),
        ({"fail_write_at": 2}, StorageFullError, StorageFullCheckpointError),
        ({"fail_commit_at": 2}, StorageBackendError, ckpt.StorageError),
    ],
    ids=["first-write", "second-write-disk-full", "second-file-commit"],
)
def test_failed_write_raises_on_the_handle_and_keeps_the_previous_step(
    snap: ckpt.Snapshotter,
    backend: LocalBackend,
    fault: dict[str, Any],
    error: type[StorageBackendError],
    expected: type[ckpt.CheckpointError],
) -> None:
    good = _state(1)
    snap.async_save(good, backend, 1, LocalCoordinator()).result()
    # Several files of several blocks each: files written before the fault are discarded.
    faulty = FaultyBackend(backend, error=error, **fault)
    bad = ckpt.Snapshotter(
        ckpt.SaveOptions(write_block_bytes=4096, chunk_bytes=4096, file_bytes=4096)
    )
    try:
        pending = bad.async_save(_state(2), faulty, 2, LocalCoordinator())
        with pytest.raises(expected) as info:
            pending.result()
        assert isinstance(info.value, ckpt.CheckpointError)
        assert info.value.__cause__ is faulty.failures[0]
        assert "step-000000002" in str(info.value)
        assert pending.done()
        bad.close()  # an error already seen on the handle is not raised again
    finally:
        bad.close(wait=False)

    assert not backend.exists(manifest_path(2))
    assert scan_steps(backend).committed == (1,)
    assert backend.list_objects(step_prefix(2)) == []  # partial files were discarded
    target = _blank()
    assert ckpt.load(target, backend) == 1
    _assert_same(_tensors(target), _tensors(good))


def test_unobserved_failure_is_raised_by_the_next_async_save(
    snap: ckpt.Snapshotter, backend: LocalBackend
) -> None:
    faulty = FaultyBackend(backend, fail_write_at=1)
    failed = snap.async_save(_state(), faulty, 1, LocalCoordinator())
    _finished(failed)
    assert failed.failed_unobserved

    with pytest.raises(ckpt.StorageError) as info:
        snap.async_save(_state(), faulty, 2, LocalCoordinator())
    assert info.value.__cause__ is faulty.failures[0]
    assert not failed.failed_unobserved  # raised once, not again
    assert snap.async_save(_state(), faulty, 2, LocalCoordinator()).result().committed
    assert scan_steps(backend).committed == (2,)


def test_a_done_callback_sees_the_outcome_without_observing_it(
    snap: ckpt.Snapshotter, backend: LocalBackend
) -> None:
    faulty = FaultyBackend(backend, fail_write_at=1)
    failed = snap.async_save(_state(), faulty, 1, LocalCoordinator())
    seen: list[BaseException | None] = []
    ended = threading.Event()

    def record(future: concurrent.futures.Future[ckpt.SaveResult]) -> None:
        seen.append(future.exception())
        ended.set()

    failed.add_done_callback(record)
    assert ended.wait(60), "the save did not end"
    assert isinstance(seen[0], ckpt.StorageError)
    assert failed.failed_unobserved  # still raised by the next call
    with pytest.raises(ckpt.StorageError):
        snap.async_save(_state(), faulty, 2, LocalCoordinator())

    late: list[bool] = []
    failed.add_done_callback(lambda future: late.append(future.done()))
    assert late == [True]  # added after the end: called at once


def test_unobserved_failure_is_raised_by_close(backend: LocalBackend) -> None:
    snap = ckpt.Snapshotter()
    failed = snap.async_save(_state(), FaultyBackend(backend, fail_put_at=1), 1, LocalCoordinator())
    _finished(failed)
    with pytest.raises(ckpt.StorageError):
        snap.close()
    with pytest.raises(ckpt.CheckpointError, match="closed"):
        snap.async_save(_state(), backend, 2, LocalCoordinator())


def test_failed_manifest_put_leaves_the_step_uncommitted(
    snap: ckpt.Snapshotter, backend: LocalBackend
) -> None:
    good = _state(1)
    snap.async_save(good, backend, 1, LocalCoordinator()).result()
    faulty = FaultyBackend(backend, fail_put_at=1)
    pending = snap.async_save(_state(2), faulty, 2, LocalCoordinator())
    with pytest.raises(ckpt.StorageError) as info:
        pending.result()
    assert info.value.__cause__ is faulty.failures[0]
    assert "manifest" in str(info.value)

    listing = scan_steps(backend)
    assert listing.committed == (1,) and listing.uncommitted == (2,)
    assert not backend.exists(manifest_path(2))
    assert any(
        p.startswith(f"{step_prefix(2)}/{DATA_DIR}/") for p in backend.list_objects(step_prefix(2))
    )
    target = _blank()
    assert ckpt.load(target, backend) == 1
    with pytest.raises(ckpt.CheckpointNotFoundError):
        ckpt.load(_blank(), backend, step=2)


def test_saving_a_committed_step_again_is_refused(
    snap: ckpt.Snapshotter, backend: LocalBackend
) -> None:
    first = _state(1)
    snap.async_save(first, backend, 3, LocalCoordinator()).result()
    with pytest.raises(CoordinationError, match="already committed"):
        snap.async_save(_state(2), backend, 3, LocalCoordinator()).result()
    target = _blank()
    assert ckpt.load(target, backend) == 3
    _assert_same(_tensors(target), _tensors(first))


def test_bad_step_is_refused_before_staging(snap: ckpt.Snapshotter, backend: LocalBackend) -> None:
    with pytest.raises(ckpt.InvalidStateError, match="step must be an integer from 0"):
        snap.async_save(_state(), backend, -1, LocalCoordinator())
    assert not snap.busy()


# -- the staging pool is reused ----------------------------------------------------------


def test_staging_bytes_stay_the_same_across_saves(
    snap: ckpt.Snapshotter, backend: LocalBackend
) -> None:
    state = _state()
    snap.async_save(state, backend, 0, LocalCoordinator()).result()
    reserved = snap.staging_bytes
    assert reserved >= sum(t.numel() * t.element_size() for t in _tensors_live(state))
    buffers = _staging_addresses(snap)
    for step in range(1, 10):
        _mutate(state)
        snap.async_save(state, backend, step, LocalCoordinator()).result()
        assert snap.staging_bytes == reserved
        assert _staging_addresses(snap) == buffers  # the same memory, not a new allocation


def _staging_addresses(snap: ckpt.Snapshotter) -> list[int]:
    return [b.data_ptr() for b in snap._pool._buffers if b is not None]


class _DiscardStream:
    def write(self, data: BytesLike) -> None:
        memoryview(data)

    def commit(self) -> None:
        pass

    def abort(self) -> None:
        pass


class _DiscardingBackend(LocalBackend):
    """Drops data files (manifests are still written): saves cost memory, not disk. The
    dropped files are still listed, for the committer's check that they exist."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.dropped: set[str] = set()

    def open_stream(self, path: str) -> BlobStream:  # type: ignore[override]
        self.dropped.add(path)
        return _DiscardStream()

    def list_objects(self, prefix: str = "") -> list[str]:
        mine = {p for p in self.dropped if p.startswith(f"{prefix}/")}
        return sorted(set(super().list_objects(prefix)) | mine)


def _rss() -> int:
    gc.collect()
    return int(psutil.Process().memory_info().rss)


def test_host_memory_after_50_saves_is_about_that_after_one(
    snap: ckpt.Snapshotter, root: Path
) -> None:
    backend = _DiscardingBackend(root)
    state = {f"t{i}": torch.randn(4 * MiB) for i in range(4)}  # 4 x 16 MiB
    snap.async_save(state, backend, 1, LocalCoordinator()).result()
    after_one = _rss()
    reserved, buffers = snap.staging_bytes, _staging_addresses(snap)
    assert reserved >= 64 * MiB

    pending = [snap.async_save(state, backend, step, LocalCoordinator()) for step in range(2, 51)]
    assert all(p.result().committed for p in pending)
    assert snap.staging_bytes == reserved and _staging_addresses(snap) == buffers
    grown = _rss() - after_one
    assert grown < 32 * MiB, f"host memory grew by {grown / MiB:.1f} MiB over 49 more saves"


# -- what a save reports -----------------------------------------------------------------


@pytest.mark.parametrize("compression", [None, ckpt.Compression(min_bytes=0)], ids=["raw", "zstd"])
def test_save_result_fields(backend: LocalBackend, compression: ckpt.Compression | None) -> None:
    snap = ckpt.Snapshotter(ckpt.SaveOptions(compression=compression, file_bytes=4096))
    try:
        state = _state()
        state["zeros"] = torch.zeros(1 << 16)  # compresses well
        pending = snap.async_save(state, backend, 5, LocalCoordinator())
        assert (pending.step, pending.url) == (5, backend.url)
        result = pending.result()
    finally:
        snap.close()

    assert pending.done() and "done" in repr(pending)
    assert result.step == 5 and result.url == backend.url and result.committed
    manifest = read_manifest(backend, 5)
    data = [
        p
        for p in backend.list_objects(step_prefix(5))
        if p.startswith(f"{step_prefix(5)}/{DATA_DIR}/")
    ]
    # The data files; the manifest also lists the rank's index file (format v2).
    stored = {p: n for p, n in manifest.files.items() if p.startswith(f"{DATA_DIR}/")}
    assert set(manifest.files) - set(stored) == {w.index for w in manifest.writers}
    assert result.files == len(stored) == len(data) > 1
    assert result.bytes_written == sum(stored.values()) == sum(backend.size(p) for p in data)
    raw_bytes = sum(t.numel() * t.element_size() for t in _tensors_live(state))
    if compression is None:
        assert result.bytes_written > raw_bytes  # safetensors headers included
    else:
        assert result.bytes_written < raw_bytes
    assert result.stall_seconds == pending.stall_seconds >= 0
    assert result.persist_seconds >= 0 and result.commit_seconds >= 0
    assert result.total_seconds == pytest.approx(
        result.stall_seconds + result.persist_seconds + result.commit_seconds
    )
    target = _blank()
    target["zeros"] = torch.ones(1 << 16)
    assert ckpt.load(target, backend) == 5
    _assert_same(_tensors(target), _tensors(state))


# -- the module-level functions share one engine -----------------------------------------


def test_module_level_save_and_async_save_use_the_default_engine(root: Path) -> None:
    engine = default_snapshotter()
    state = _state()
    result = ckpt.save(state, root, step=1)
    assert isinstance(result, ckpt.SaveResult) and result.committed
    reserved = engine.staging_bytes
    assert reserved > 0

    backend = LocalBackend(root)
    expected = _tensors(state)
    with FaultyBackend(backend, gate=threading.Event()) as faulty:
        pending = ckpt.async_save(state, faulty, step=2, user_metadata={"run": "a"})
        assert faulty.held.wait(10)
        assert isinstance(pending, ckpt.PendingSave) and engine.in_flight() == [pending]
        _mutate(state)
    assert pending.result().step == 2
    assert engine.staging_bytes == reserved
    assert read_manifest(backend, 2).user_metadata == {"run": "a"}

    target = _blank()
    assert ckpt.load(target, f"file://{root}") == 2
    _assert_same(_tensors(target), expected)


def test_module_level_async_save_raises_an_unobserved_failure_next(root: Path) -> None:
    faulty = FaultyBackend(LocalBackend(root), fail_write_at=1)
    failed = ckpt.async_save(_state(), faulty, step=1)
    _finished(failed)
    with pytest.raises(ckpt.StorageError):
        ckpt.async_save(_state(), root, step=2)
    assert ckpt.save(_state(), root, step=2).committed


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_are_staged_before_the_call_returns(
    snap: ckpt.Snapshotter, backend: LocalBackend, gated: FaultyBackend
) -> None:
    faulty = gated
    x = torch.zeros(16 * MiB, device="cuda")
    x.add_(1)  # queued on the current stream: the snapshot must see it
    pending = snap.async_save({"x": x}, faulty, 1, LocalCoordinator())
    x.mul_(0).add_(5)  # must not reach the checkpoint
    faulty.release()
    pending.result()
    target = {"x": torch.zeros(16 * MiB)}
    assert ckpt.load(target, backend) == 1
    assert torch.equal(target["x"], torch.ones(16 * MiB))
