"""Save timings in the manifest, and ``ckpt report``'s timeline of a root.

* 2 real gloo ranks save several steps, with the embedded coordinator and with Redis:
  every manifest records both ranks' stall, persist and bytes (exactly the bytes each
  rank reported), and the committer's time; a save through S3 that meets throttling
  records the real client's retries;
* a manifest without timings (as written before they existed) still loads, restores
  and is reported; a manifest with a field this reader does not know still loads (how a
  reader of before the timings sees them); timings of the wrong length are refused;
* the HTML report names every step, marks the invalid and the aborted ones and fetches
  nothing; the PNG is a PNG; making either writes nothing under the root.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch

import ckpt
from ckpt.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from ckpt.format import (
    DIGEST_HEX,
    INDEX_DIR,
    Manifest,
    RankTiming,
    SaveTimings,
    manifest_path,
    read_manifest,
    scan_steps,
    seal_manifest,
    step_prefix,
)
from ckpt.report import ABORTED, COMMITTED, INVALID, UNFINISHED, collect, main, write_report
from storage_backends import open_backend
from tests.coordination.harness import CoordSpec, describe, spawn_ranks
from tests.support.redis_server import RedisServer, redis_server_binary
from tests.support.s3_proxy import S3FaultProxy
from tests.support.s3_servers import S3Server, aws_test_env, moto_s3

__all__ = ["aws_test_env", "moto_s3"]  # fixtures used here

ROWS = 64
STEPS = (1, 2, 3, 4)
OLD_STEP, BROKEN_STEP, ABORTED_STEP = 2, 3, 5


def _sharded_state(rank: int, world: int, step: int) -> dict[str, Any]:
    local = torch.full((ROWS // world, 8), float(step * 10 + rank))
    return {
        "w": ckpt.ShardedTensor(local, (ROWS, 8), (rank * ROWS // world, 0)),
        "b": torch.arange(5.0),
        "step": step,
    }


def _save_sharded(rank: int, world: int, root: str, redis: CoordSpec | None) -> dict[str, Any]:
    """Each rank saves its half of ``w`` (and a replicated bias) for every step in STEPS
    under ``root`` (embedded coordinator), then, with ``redis``, steps 1 and 2 under
    ``root/redis`` through a Redis coordinator."""
    results: dict[str, Any] = {"embedded": {}, "redis": {}}
    for step in STEPS:
        result = ckpt.save(_sharded_state(rank, world, step), root, step=step)
        results["embedded"][step] = result.bytes_written
    if redis is not None:
        coordinator = redis.make()
        try:
            for step in (1, 2):
                state = _sharded_state(rank, world, step)
                result = ckpt.save(state, f"{root}/redis", step=step, coordinator=coordinator)
                results["redis"][step] = result.bytes_written
        finally:
            coordinator.close()
    return results


def _without_timings(manifest: Manifest) -> bytes:
    """The manifest as ckpt wrote it before it recorded timings."""
    return msgspec.structs.replace(manifest, timings=None).to_bytes()


@pytest.fixture(scope="module")
def redis_spec(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoordSpec | None]:
    """A Redis coordinator's description, on a real ``redis-server`` (None without one)."""
    if redis_server_binary() is None:
        yield None
        return
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield CoordSpec("redis", url=server.url(), job="timeline", timeout=30.0)


@pytest.fixture(scope="module")
def saved(
    tmp_path_factory: pytest.TempPathFactory, redis_spec: CoordSpec | None
) -> tuple[Path, list[dict[str, Any]]]:
    """2 gloo ranks' saves (and what each rank wrote): STEPS under the root, 2 steps under
    ``root/redis``."""
    path = tmp_path_factory.mktemp("timeline")
    outcomes = spawn_ranks(_save_sharded, 2, str(path), redis_spec, timeout_s=120.0)
    assert all(o.ok for o in outcomes), describe(outcomes)
    return path, [o.value for o in outcomes]


@pytest.fixture(scope="module")
def root(saved: tuple[Path, list[dict[str, Any]]]) -> Path:
    """The embedded root, with step 2 rewritten without timings, step 3 missing a data
    file and step 5 an aborted save."""
    path, _ = saved
    backend = open_backend(str(path))
    old = read_manifest(backend, OLD_STEP)
    (path / manifest_path(OLD_STEP)).write_bytes(_without_timings(old))
    broken = read_manifest(backend, BROKEN_STEP)
    (path / step_prefix(BROKEN_STEP) / sorted(broken.files)[0]).unlink()
    marker = path / step_prefix(ABORTED_STEP) / INDEX_DIR / "g-ABORTED"
    marker.parent.mkdir(parents=True)
    marker.write_text("rank 1 failed: StorageFullError('disk full')")
    return path


def _tree(path: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under ``path``: size, mtime and digest."""
    return {
        str(p.relative_to(path)): (
            p.stat().st_size,
            p.stat().st_mtime_ns,
            hashlib.sha256(p.read_bytes()).hexdigest(),
        )
        for p in sorted(path.rglob("*"))
        if p.is_file()
    } | {str(p.relative_to(path)) + "/": (0, 0, "") for p in path.rglob("*") if p.is_dir()}


def _check_timings(path: Path, step: int, per_rank: list[int]) -> SaveTimings:
    """The manifest of ``step`` records both ranks' timings; their bytes are ``per_rank``."""
    m = read_manifest(open_backend(str(path)), step)
    t = m.timings
    assert t is not None, f"step {step} under {path} records no timings"
    assert m.world_size == 2
    for column in (t.start_s, t.stall_s, t.persist_s, t.stored_bytes):
        assert len(column) == 2
        assert all(v >= 0 for v in column)
    assert t.commit_s >= 0
    assert min(t.start_s) == 0.0  # started_unix is the first rank's start
    assert t.started_unix <= m.created_unix
    assert list(t.stored_bytes) == per_rank
    assert sum(t.stored_bytes) == sum(m.data_files.values())
    for rank in range(2):  # each rank's bytes are its own data files
        mine = sum(size for f, size in m.data_files.items() if f"-r{rank:05d}-" in f)
        assert t.stored_bytes[rank] == mine
    assert t.retries == (0, 0)  # local storage never retries
    return t


def test_two_ranks_record_their_timings_in_the_manifest(
    saved: tuple[Path, list[dict[str, Any]]], root: Path
) -> None:
    _, per_rank = saved
    first, last = (
        _check_timings(root, step, [rank["embedded"][str(step)] for rank in per_rank])
        for step in (1, 4)
    )
    assert first.started_unix < last.started_unix


def test_redis_coordinated_saves_record_timings_too(
    saved: tuple[Path, list[dict[str, Any]]], redis_spec: CoordSpec | None
) -> None:
    if redis_spec is None:
        pytest.skip("redis-server is not installed")
    path, per_rank = saved
    for step in (1, 2):
        _check_timings(path / "redis", step, [rank["redis"][str(step)] for rank in per_rank])


def test_storage_retries_during_a_save_are_counted(moto_s3: S3Server) -> None:
    """Two PUTs of the data file answered 503 SlowDown: the real S3 client retries them,
    and the manifest says this rank retried twice."""
    with S3FaultProxy(moto_s3.endpoint) as proxy:
        backend = open_backend(moto_s3.url(), s3_config=moto_s3.config(proxy.endpoint))
        try:
            proxy.fail_next("slowdown", count=2, method="PUT", target="/data/")
            ckpt.save({"w": torch.ones(1000)}, backend, step=1)
            assert len(proxy.faults()) == 2
            timings = read_manifest(backend, 1).timings
            assert timings is not None and timings.retries == (2,)
        finally:
            backend.close()


def test_a_manifest_without_timings_loads_restores_and_is_reported(
    root: Path,
) -> None:
    path = root
    raw = (path / manifest_path(OLD_STEP)).read_bytes()
    assert b"timings" not in raw
    m = read_manifest(open_backend(str(path)), OLD_STEP)
    assert m.timings is None
    target: dict[str, Any] = {"w": torch.zeros(ROWS, 8), "b": torch.zeros(5), "step": 0}
    assert ckpt.load(target, path, step=OLD_STEP) == OLD_STEP
    assert target["step"] == OLD_STEP
    assert torch.equal(target["w"][: ROWS // 2], torch.full((ROWS // 2, 8), 20.0))
    record = next(r for r in collect(path) if r.step == OLD_STEP)
    assert (record.status, record.timings, record.total_bytes) == (COMMITTED, None, m.total_bytes)


def test_a_reader_ignores_manifest_fields_it_does_not_know(tmp_path: Path) -> None:
    # How a reader from before the timings sees a manifest that has them: format v1 lets
    # writers add optional fields, and readers skip the ones they do not know.
    ckpt.save({"w": torch.ones(3)}, tmp_path, step=1)
    path = tmp_path / manifest_path(1)
    data = path.read_bytes()
    rest = data[len(b'{"manifest_checksum":"') + DIGEST_HEX + len(b'",') :]
    path.write_bytes(seal_manifest(b'{"a_field_from_the_future":{"columns":[1,2]},' + rest))
    assert read_manifest(open_backend(str(tmp_path)), 1).step == 1
    target = {"w": torch.zeros(3)}
    assert ckpt.load(target, tmp_path) == 1
    assert torch.equal(target["w"], torch.ones(3))


def test_timings_with_a_column_per_rank_missing_are_refused(tmp_path: Path) -> None:
    ckpt.save({"w": torch.ones(3)}, tmp_path, step=1)
    backend = open_backend(str(tmp_path))
    m = read_manifest(backend, 1)
    assert m.timings is not None
    short = msgspec.structs.replace(m.timings, stall_s=())
    data = msgspec.structs.replace(m, timings=short).to_bytes()
    with pytest.raises(CorruptCheckpointError, match=r"timings\.stall_s"):
        Manifest.from_bytes(data, "manifest.json")
    negative = msgspec.structs.replace(m, timings=msgspec.structs.replace(m.timings, commit_s=-1.0))
    with pytest.raises(CorruptCheckpointError):
        Manifest.from_bytes(negative.to_bytes(), "manifest.json")


def test_html_report_shows_every_step_and_fetches_nothing(root: Path, tmp_path: Path) -> None:
    path = root
    before = _tree(path)
    out = tmp_path / "timeline.html"
    assert main([str(path), "-o", str(out)]) == 0
    assert _tree(path) == before, "the report wrote under the root"
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    for step in (*STEPS, ABORTED_STEP):
        assert f"<td>{step}</td>" in page
    assert "<td class=l>invalid</td>" in page and "<td class=l>aborted</td>" in page
    assert "disk full" in page and "no timings recorded" in page
    assert "<svg" in page and "<title>" in page
    lowered = page.lower()
    assert "http://" not in lowered and "https://" not in lowered
    assert "<script src" not in lowered and "<link" not in lowered and "@import" not in lowered

    statuses = {r.step: r.status for r in collect(path)}
    assert statuses == {1: COMMITTED, 2: COMMITTED, 3: INVALID, 4: COMMITTED, 5: ABORTED}
    assert [r.step for r in collect(path, last=2)] == [4, 5]


def test_png_report_is_a_png_and_leaves_the_root_alone(root: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = root
    before = _tree(path)
    out = tmp_path / "timeline.png"
    assert main([str(path), "-o", str(out), "--last", "3"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000
    assert _tree(path) == before


def test_report_of_an_unfinished_save_an_unknown_suffix_and_no_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    ckpt.save({"w": torch.ones(3)}, root, step=1)
    (root / step_prefix(2) / "data").mkdir(parents=True)
    records = collect(root)
    assert [(r.step, r.status) for r in records] == [(1, COMMITTED), (2, UNFINISHED)]
    with pytest.raises(CheckpointError, match=r"\.html or a \.png"):
        write_report(records, tmp_path / "timeline.txt", title="root")
    assert main([str(root), "-o", str(tmp_path / "timeline.txt")]) == 2
    assert scan_steps(open_backend(str(root))).committed == (1,)
    missing = tmp_path / "no-such-root"
    with pytest.raises(CheckpointNotFoundError):
        collect(missing)
    assert main([str(missing), "-o", str(tmp_path / "timeline.html")]) == 2
    assert not missing.exists() and not (tmp_path / "timeline.html").exists()


def test_timings_columns_stay_small_at_4096_ranks() -> None:
    ranks = 4096
    base = 1_795_672_800.123456
    timings = SaveTimings.of_ranks(
        [
            RankTiming(started_unix=base + i * 1e-4, stall_s=0.4321 + i * 1e-5, persist_s=12.34567)
            for i in range(ranks)
        ],
        [1_234_567_890 + i for i in range(ranks)],
        commit_s=1.2345678,
    )
    assert timings.retries is None
    size = len(msgspec.json.encode(timings))
    assert size / ranks < 40, f"{size / ranks:.1f} bytes per rank"
