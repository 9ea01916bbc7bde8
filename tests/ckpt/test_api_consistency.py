"""One API: the function entry points and the manager take the same options and
coordinators, and a manager cannot be built so that it silently never saves."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import ckpt
from ckpt import CheckpointManager, Compression, SaveOptions
from storage_backends import LocalBackend
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


# -- a DCP checkpoint is not mistaken for an empty root ----------------------------------


def _dcp_save(directory: Path) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group": one process is all we need
        dcp.save({"w": torch.ones(4)}, checkpoint_id=str(directory))


def test_a_manager_on_a_dcp_root_refuses_to_start_from_scratch(tmp_path: Path) -> None:
    _dcp_save(tmp_path)
    with (
        CheckpointManager(tmp_path, every_steps=10, save_on_sigterm=False) as mgr,
        pytest.raises(ckpt.CheckpointNotFoundError) as refused,
    ):
        mgr.restore(_state())
    message = str(refused.value)
    assert "DCP" in message and ".distcp" in message
    assert f"ckpt convert {LocalBackend(tmp_path).url.rstrip('/')} DST" in message
    with pytest.raises(ckpt.CheckpointNotFoundError, match="ckpt convert"):
        ckpt.load(_state(), tmp_path)


@pytest.mark.parametrize(
    "files",
    [
        ["step-100/.metadata", "step-100/__0_0.distcp", "step-200/.metadata"],  # torchtitan
        ["__0_0.distcp", "__1_0.distcp"],  # data files of a save that never finished
    ],
)
def test_dcp_step_folders_are_recognised_by_their_names(tmp_path: Path, files: list[str]) -> None:
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"not read")  # never unpickled: names are enough
    with pytest.raises(ckpt.CheckpointNotFoundError, match=r"DCP.*ckpt convert"):
        ckpt.load(_state(), tmp_path)
    with (
        CheckpointManager(tmp_path, manual=True, save_on_sigterm=False) as mgr,
        pytest.raises(ckpt.CheckpointNotFoundError, match="DCP"),
    ):
        mgr.restore(_state())


def test_unrelated_files_still_mean_an_empty_root(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / ".metadata").write_text("too deep to be a DCP step folder")
    with CheckpointManager(tmp_path, manual=True, save_on_sigterm=False) as mgr:
        assert mgr.restore(_state()) is None
    with pytest.raises(ckpt.CheckpointNotFoundError, match="no committed checkpoint"):
        ckpt.load(_state(), tmp_path)


def test_a_ckpt_checkpoint_next_to_a_dcp_one_is_restored(tmp_path: Path) -> None:
    _dcp_save(tmp_path / "dcp")
    ckpt.save(_state(), tmp_path, step=3)
    with CheckpointManager(tmp_path, manual=True, save_on_sigterm=False) as mgr:
        assert mgr.restore(_state()) == 3


# -- the distribution name ----------------------------------------------------------------


def test_the_distribution_name_is_not_the_taken_one_and_matches_the_version_lookup() -> None:
    pyproject = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    names = re.findall(r'^name = "([^"]+)"$', pyproject, flags=re.MULTILINE)
    assert names == [ckpt.DISTRIBUTION]
    assert ckpt.DISTRIBUTION != "ckpt"  # an unrelated project on PyPI
