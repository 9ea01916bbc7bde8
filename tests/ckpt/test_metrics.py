"""Prometheus metrics and profiler spans of saves and restores (docs/METRICS.md).

Metrics are read from a real ``prometheus_client.CollectorRegistry``. They are process-wide
and other tests of the session move them too, so each test reads them before and after and
checks the difference: counts and bytes exactly, durations only by their count. S3 retries
come from faults a botocore event hook injects into the moto server's requests. The checks
of the default registry and of a process without ``prometheus_client`` (its import blocked)
run in fresh interpreters.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from botocore.exceptions import ConnectionClosedError
from prometheus_client import CollectorRegistry, Counter

import ckpt
import ckpt.metrics
from storage_backends import RetryPolicy, S3Backend
from tests.support.faulty import FaultyBackend
from tests.support.on_disk import data_file, flip_byte, piece_of, read_manifest
from tests.support.ports import free_port
from tests.support.s3_servers import S3Server, aws_test_env, moto_s3, no_wait
from tests.support.workers import REPO_ROOT

__all__ = ["aws_test_env", "moto_s3"]  # fixtures used here

CHILD_TIMEOUT_S = 120.0


@pytest.fixture
def registry() -> Iterator[CollectorRegistry]:
    """A fresh registry that ckpt's metrics are exported on for the test."""
    reg = CollectorRegistry()
    ckpt.metrics.register(reg)
    yield reg
    ckpt.metrics.unregister(reg)


class Readings:
    """Differences of metric samples since this object was made."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._before = self._all()

    def _all(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in self._registry.collect()
            for s in family.samples
        }

    def delta(self, name: str, **labels: str) -> float:
        """How much sample ``name`` with exactly ``labels`` grew."""
        key = (name, tuple(sorted(labels.items())))
        return self._all().get(key, 0.0) - self._before.get(key, 0.0)


def state(seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 16, generator=g), "b": torch.randn(7, generator=g), "step": seed}


def blank() -> dict[str, Any]:
    return {"w": torch.zeros(64, 16), "b": torch.zeros(7), "step": -1}


def stored_bytes(root: Path, step: int) -> int:
    """Sizes of the data files of ``step``, from the disk (a one-rank save writes all)."""
    files = {p["file"] for t in read_manifest(root, step)["tensors"].values() for p in t["pieces"]}
    return sum(data_file(root, step, f).stat().st_size for f in files)


# -- saves and restores -----------------------------------------------------------------


def test_function_api_saves_and_restores_are_counted(
    registry: CollectorRegistry, root: Path
) -> None:
    r = Readings(registry)
    result = ckpt.save(state(1), root, step=1)
    ckpt.async_save(state(2), root, step=2).result()
    assert ckpt.load(blank(), root) == 2

    for kind in ("sync", "async"):
        assert r.delta("ckpt_save_stall_seconds_count", backend="local", kind=kind) == 1
        assert r.delta("ckpt_save_seconds_count", backend="local", kind=kind) == 1
        assert r.delta("ckpt_save_seconds_bucket", backend="local", kind=kind, le="+Inf") == 1
    assert result.bytes_written == stored_bytes(root, 1)
    assert r.delta("ckpt_saved_bytes_total", backend="local") == stored_bytes(
        root, 1
    ) + stored_bytes(root, 2)
    assert r.delta("ckpt_restore_seconds_count", backend="local") == 1
    assert r.delta("ckpt_restore_fallbacks_total", backend="local") == 0
    assert r.delta("ckpt_save_failures_total", backend="local", kind="sync", error="other") == 0


def test_manager_saves_and_restores_are_counted(registry: CollectorRegistry, root: Path) -> None:
    r = Readings(registry)
    with ckpt.CheckpointManager(root, every_steps=2, keep_last=None) as mgr:
        for step in range(1, 7):
            mgr.maybe_save(step, state(step))
            mgr.wait()
        mgr.save(7, state(7), blocking=True)
    with ckpt.CheckpointManager(root, manual=True) as again:
        assert again.restore(blank()) == 7

    assert r.delta("ckpt_save_stall_seconds_count", backend="local", kind="async") == 3
    assert r.delta("ckpt_save_seconds_count", backend="local", kind="async") == 3
    assert r.delta("ckpt_save_seconds_count", backend="local", kind="sync") == 1
    assert r.delta("ckpt_saved_bytes_total", backend="local") == sum(
        stored_bytes(root, s) for s in (2, 4, 6, 7)
    )
    assert r.delta("ckpt_restore_seconds_count", backend="local") == 1


def test_a_restore_that_falls_back_over_a_corrupt_step_counts_it(
    registry: CollectorRegistry, root: Path
) -> None:
    for step in (1, 2, 3):
        ckpt.save(state(step), root, step=step)
    for step in (2, 3):
        piece = piece_of(root, step, "w")
        flip_byte(data_file(root, step, piece["file"]), piece["byte_offset"] + 5)
    r = Readings(registry)
    with ckpt.CheckpointManager(root, manual=True) as mgr:
        assert mgr.restore(blank()) == 1
        assert mgr.metrics.restores_fallbacks == 2
    assert r.delta("ckpt_restore_fallbacks_total", backend="local") == 2
    assert r.delta("ckpt_restore_seconds_count", backend="local") == 1


def test_failed_saves_are_counted_once_by_error_class(
    registry: CollectorRegistry, root: Path, backend: Any
) -> None:
    r = Readings(registry)
    with pytest.raises(ckpt.InvalidStateError):
        ckpt.save({"bad": object()}, root, step=1)
    assert (
        r.delta("ckpt_save_failures_total", backend="local", kind="sync", error="InvalidStateError")
        == 1
    )

    # A background failure nobody looked at: counted when it happens, not again when the
    # next save raises it.
    faulty = FaultyBackend(backend, fail_write_at=1)
    ended = threading.Event()
    pending = ckpt.async_save(state(2), faulty, step=2)
    pending.add_done_callback(lambda _: ended.set())  # runs after the metrics' callback
    assert ended.wait(30)
    with pytest.raises(ckpt.StorageError):
        ckpt.async_save(state(3), faulty, step=3)
    assert (
        r.delta("ckpt_save_failures_total", backend="local", kind="async", error="StorageError")
        == 1
    )
    assert r.delta("ckpt_save_seconds_count", backend="local", kind="async") == 0
    assert r.delta("ckpt_saved_bytes_total", backend="local") == 0

    ckpt.async_save(state(3), faulty, step=3).result()  # the next save is counted as usual
    assert r.delta("ckpt_save_seconds_count", backend="local", kind="async") == 1


# -- retries ----------------------------------------------------------------------------


def inject(backend: S3Backend, operation: str, times: int, *, ranged: bool = False) -> list[int]:
    """Make the next ``times`` requests of ``operation`` (only ranged GETs with ``ranged``)
    fail with a dropped connection, a transient fault; returns the count of faults made."""
    made = [0]

    def fault(request: Any, **_: Any) -> None:
        if ranged and "Range" not in request.headers:
            return
        if made[0] < times:
            made[0] += 1
            raise ConnectionClosedError(endpoint_url=request.url)

    backend._s3.boto.meta.events.register(f"before-send.s3.{operation}", fault)
    return made


def test_s3_retries_are_counted(registry: CollectorRegistry, moto_s3: S3Server) -> None:
    backend = moto_s3.backend()
    try:
        made = inject(backend, "PutObject", 2)
        r = Readings(registry)
        ckpt.save(state(1), backend, step=1)
        assert ckpt.load(blank(), backend) == 1
        assert made[0] == 2
        assert r.delta("ckpt_retries_total", service="s3") == 2
        assert r.delta("ckpt_save_seconds_count", backend="s3", kind="sync") == 1
        assert r.delta("ckpt_restore_seconds_count", backend="s3") == 1
    finally:
        backend.close()


def test_restore_retries_of_a_transient_read_are_counted(
    registry: CollectorRegistry, moto_s3: S3Server
) -> None:
    """The S3 client gives up at once (one attempt), so restore's own retry takes over."""
    backend = moto_s3.backend(retry=RetryPolicy(attempts=1, sleep=no_wait))
    try:
        ckpt.save(state(1), backend, step=1)
        made = inject(backend, "GetObject", 1, ranged=True)
        r = Readings(registry)
        target = blank()
        assert ckpt.load(target, backend) == 1
        assert torch.equal(target["w"], state(1)["w"])
        assert made[0] == 1
        assert r.delta("ckpt_retries_total", service="restore") == 1
        assert r.delta("ckpt_retries_total", service="s3") == 0
        assert r.delta("ckpt_restore_fallbacks_total", backend="s3") == 0
    finally:
        backend.close()


def test_redis_retries_are_counted(registry: CollectorRegistry) -> None:
    """A coordinator whose server is down retries its calls for ``retry_seconds``, then
    fails; every retry is counted (how many depends on the backoff's timing)."""
    r = Readings(registry)
    with pytest.raises(ckpt.CoordinationError, match="unreachable"):
        ckpt.RedisCoordinator(
            f"redis://127.0.0.1:{free_port()}/0", job="metrics", retry_seconds=0.5
        )
    assert r.delta("ckpt_retries_total", service="redis") >= 1
    assert r.delta("ckpt_retries_total", service="s3") == 0


# -- registration -----------------------------------------------------------------------


def test_registering_twice_is_harmless_and_a_clash_is_a_clear_error(
    registry: CollectorRegistry,
) -> None:
    ckpt.metrics.register(registry)  # again: nothing changes
    names = {family.name for family in registry.collect()}
    assert {"ckpt_save_seconds", "ckpt_retries", "ckpt_saved_bytes"} <= names

    taken = CollectorRegistry()
    Counter("ckpt_retries", "someone else's", registry=taken)
    with pytest.raises(ckpt.CheckpointError, match="already holds metrics named like ckpt's"):
        ckpt.metrics.register(taken)
    assert ckpt.metrics.available()


# Each check of a fresh process runs a script in its own interpreter; the three start
# together (importing torch is most of their time) and each test waits for its own.
CHILDREN = {
    "default": """
        import torch, ckpt, ckpt.metrics
        from prometheus_client import REGISTRY, generate_latest
        ckpt.save({"w": torch.ones(3)}, ROOT, step=1)
        text = generate_latest(REGISTRY).decode()
        print('ckpt_save_seconds_count{backend="local",kind="sync"} 1.0' in text)
        ckpt.metrics.register()  # already there: nothing happens
        print(generate_latest(REGISTRY).decode().count("# TYPE ckpt_save_seconds histogram"))
        """,
    "clash": """
        import torch, ckpt, ckpt.metrics
        from prometheus_client import CollectorRegistry, Counter, generate_latest
        Counter("ckpt_retries", "an application's own counter")  # on the default registry
        ckpt.save({"w": torch.ones(3)}, ROOT, step=1)
        mine = CollectorRegistry()
        ckpt.metrics.register(mine)
        print("ckpt_saved_bytes_total" in generate_latest(mine).decode())
        """,
    "without": """
        import sys
        sys.modules["prometheus_client"] = None  # import prometheus_client now fails
        import torch, ckpt, ckpt.metrics
        ckpt.save({"w": torch.ones(3)}, ROOT, step=1)
        ckpt.async_save({"w": torch.ones(3) * 2}, ROOT, step=2).result()
        with ckpt.CheckpointManager(ROOT, every_steps=1) as mgr:
            mgr.maybe_save(3, {"w": torch.ones(3) * 3})
        target = {"w": torch.zeros(3)}
        print(ckpt.load(target, ROOT), target["w"].tolist(), ckpt.metrics.available())
        ckpt.metrics.unregister()
        try:
            ckpt.metrics.register()
        except ckpt.CheckpointError as exc:
            print("refused:", exc)
        """,
}


@pytest.fixture(scope="module", autouse=True)
def children(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The scripts of ``CHILDREN``, each with its own checkpoint ROOT, started together as the
    module begins (so that they run while the tests of this process do)."""
    procs: dict[str, subprocess.Popen[str]] = {}
    for name, script in CHILDREN.items():
        root = tmp_path_factory.mktemp(f"child-{name}")
        procs[name] = subprocess.Popen(
            [sys.executable, "-c", f"ROOT = {str(root)!r}\n" + textwrap.dedent(script)],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def outcome(children: dict[str, Any], name: str) -> tuple[list[str], str]:
    """The stdout lines and the stderr of child ``name``, which must succeed."""
    out, err = children[name].communicate(timeout=CHILD_TIMEOUT_S)
    assert children[name].returncode == 0, err
    return out.splitlines(), err


def test_metrics_appear_on_the_default_registry_after_the_first_save(
    children: dict[str, Any],
) -> None:
    """What a Prometheus user expects: nothing to call before scraping."""
    lines, _ = outcome(children, "default")
    assert lines == ["True", "1"]


def test_a_name_taken_on_the_default_registry_does_not_break_saves(
    children: dict[str, Any],
) -> None:
    """The save goes on; a warning says how to export the metrics on another registry."""
    lines, err = outcome(children, "clash")
    assert lines == ["True"]
    assert "not exported on prometheus_client's default registry" in err


def test_without_prometheus_client_nothing_changes(children: dict[str, Any]) -> None:
    lines, _ = outcome(children, "without")
    assert lines[0] == "3 [3.0, 3.0, 3.0] False"
    assert lines[1].startswith("refused:") and "pip install" in lines[1]


# -- profiler spans ---------------------------------------------------------------------


def span_names(prof: torch.profiler.profile) -> set[str]:
    return {e.name for e in prof.events() if e.name.startswith("ckpt.")}


def test_spans_of_the_calling_thread_appear_in_a_profiler_trace(root: Path) -> None:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ckpt.save(state(1), root, step=1)
        ckpt.load(blank(), root)
    assert {"ckpt.save", "ckpt.stage", "ckpt.restore"} <= span_names(prof)


def test_background_spans_appear_when_the_profiler_records_all_threads(root: Path) -> None:
    """Persist and commit run on the save's background thread, which torch.profiler records
    only with ``profile_all_threads``."""
    try:
        config = torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
    except TypeError:
        pytest.skip("this torch's profiler cannot record other threads (profile_all_threads)")
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], experimental_config=config
    ) as prof:
        ckpt.async_save(state(1), root, step=1).result()
    assert {"ckpt.save", "ckpt.stage", "ckpt.persist", "ckpt.commit"} <= span_names(prof)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nvtx_ranges_mark_the_phases_under_cuda(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pushed: list[str] = []
    real_push: Callable[[str], Any] = torch.cuda.nvtx.range_push

    def push(msg: str) -> Any:
        pushed.append(msg)
        return real_push(msg)

    monkeypatch.setattr(torch.cuda.nvtx, "range_push", push)
    gpu = {"w": torch.randn(64, 16, device="cuda"), "b": torch.randn(7, device="cuda")}
    ckpt.save(gpu, root, step=1)
    ckpt.load({"w": torch.zeros(64, 16, device="cuda"), "b": torch.zeros(7, device="cuda")}, root)
    assert {"ckpt.save", "ckpt.stage", "ckpt.persist", "ckpt.commit", "ckpt.restore"} <= set(pushed)
