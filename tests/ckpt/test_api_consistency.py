"""One API: the function entry points and the manager take the same options and
coordinators, and a manager cannot be built so that it silently never saves."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import ckpt
from ckpt import CheckpointManager, Compression, SaveOptions
from tests.support.redis_server import RedisServer, redis_server_binary

RAW_BYTES = 1 << 20
COMPRESSED = SaveOptions(compression=Compression(level=1, min_bytes=0))


def _state() -> dict[str, torch.Tensor]:
    return {"w": torch.zeros(RAW_BYTES // 4)}  # compresses to almost nothing


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed")
    with RedisServer(tmp_path / "redis") as server:
        yield server.url()


# -- a save policy is required -----------------------------------------------------------


def test_a_manager_without_a_policy_refuses_to_start_and_names_the_options(
    tmp_path: Path,
) -> None:
    with pytest.raises(ValueError) as refused:
        CheckpointManager(tmp_path, save_on_sigterm=False)
    message = str(refused.value)
    for option in ("every_steps", "every_seconds", "interval", "manual=True"):
        assert option in message


def test_a_manual_manager_saves_only_when_told(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, manual=True, save_on_sigterm=False) as mgr:
        assert all(mgr.maybe_save(step, _state()) is None for step in range(1, 51))
        mgr.save(51, _state(), blocking=True)
    assert ckpt.load(_state(), tmp_path) == 51


# -- SaveOptions on every save entry point -----------------------------------------------


def test_save_and_async_save_take_save_options(tmp_path: Path) -> None:
    raw = ckpt.save(_state(), tmp_path / "raw", step=1)
    packed = ckpt.save(_state(), tmp_path / "packed", step=1, options=COMPRESSED)
    pending = ckpt.async_save(_state(), tmp_path / "async", step=1, options=COMPRESSED)
    assert raw.bytes_written >= RAW_BYTES
    assert packed.bytes_written < RAW_BYTES // 10
    assert pending.result().bytes_written < RAW_BYTES // 10
    for root in ("packed", "async"):
        target = {"w": torch.ones(RAW_BYTES // 4)}
        assert ckpt.load(target, tmp_path / root) == 1
        assert torch.equal(target["w"], _state()["w"])


def test_a_manager_save_takes_one_off_options(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, manual=True, save_on_sigterm=False) as mgr:
        plain = mgr.save(1, _state(), blocking=True).result()
        packed = mgr.save(2, _state(), blocking=True, options=COMPRESSED).result()
    assert plain.bytes_written >= RAW_BYTES
    assert packed.bytes_written < RAW_BYTES // 10


# -- coordinators: public, and an object or a URL everywhere ----------------------------


def test_the_coordinators_are_public() -> None:
    from ckpt import coordination

    assert ckpt.LocalCoordinator is coordination.LocalCoordinator
    assert ckpt.ProcessGroupCoordinator is coordination.ProcessGroupCoordinator
    assert ckpt.RedisCoordinator is coordination.RedisCoordinator
    assert ckpt.Coordinator is coordination.Coordinator
    assert {"LocalCoordinator", "RedisCoordinator", "ProcessGroupCoordinator"} <= set(dir(ckpt))


def test_every_entry_point_takes_a_coordinator_object(tmp_path: Path) -> None:
    coordinator = ckpt.LocalCoordinator()
    ckpt.save(_state(), tmp_path, step=1, coordinator=coordinator)
    ckpt.async_save(_state(), tmp_path, step=2, coordinator=coordinator).result()
    assert ckpt.load(_state(), tmp_path, coordinator=coordinator) == 2
    assert ckpt.restore(_state(), tmp_path, step=1, coordinator=coordinator).step == 1


def test_every_entry_point_takes_a_redis_url(tmp_path: Path, redis_url: str) -> None:
    ckpt.save(_state(), tmp_path, step=1, coordinator=redis_url)
    ckpt.async_save(_state(), tmp_path, step=2, coordinator=redis_url).result()
    assert ckpt.load(_state(), tmp_path, coordinator=redis_url) == 2
    assert ckpt.restore(_state(), tmp_path, step=1, coordinator=redis_url).step == 1
    with CheckpointManager(tmp_path, manual=True, coordinator=redis_url) as mgr:
        assert mgr.restore(_state()) == 2


@pytest.mark.parametrize("entry", ["save", "async_save", "load", "restore"])
def test_a_bad_coordinator_url_is_a_coordination_error(tmp_path: Path, entry: str) -> None:
    ckpt.save(_state(), tmp_path, step=1)
    call = getattr(ckpt, entry)
    kwargs = {"step": 2} if entry in ("save", "async_save") else {}
    with pytest.raises(ckpt.CoordinationError):
        call(_state(), tmp_path, coordinator="http://not-redis:1/0", **kwargs)
