"""What the coordinator suite shares: a launcher that outlives SIGKILLed ranks, a
backend that records the order of durable writes, file signals between a test and its
ranks, a small sharded state, and a picklable description of the coordinator under test.

``tests.support.gloo.run_ranks`` is not enough here: ``torch.multiprocessing`` terminates
the surviving ranks as soon as one dies, and the point of these tests is what the
survivors do. ``Ranks`` runs the same entry point (gloo on loopback, one JSON result per
rank) but waits for every rank, reports a killed one as such, and kills whatever is still
running at its deadline, so nothing hangs. Ranks start from a forkserver that has
imported torch once, so a spawn costs a fork instead of a fresh interpreter importing
torch (seconds per rank on a small machine).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import ckpt
from ckpt.coordination import Coordinator, LocalCoordinator, ProcessGroupCoordinator
from ckpt.format import MANIFEST_NAME, Manifest, parse_step_prefix, step_prefix
from storage_backends import BlobStream, BytesLike, StorageBackend
from tests.support.faulty import FaultyBackend
from tests.support.gloo import rank_main
from tests.support.ports import free_port

# Rows of the sharded tensor each rank holds; columns of it.
ROWS, COLS = 4, 8
# A rank (or the test) that waits for a signal longer than this fails instead of hanging.
SIGNAL_TIMEOUT_S = 60.0


# -- the coordinator under test ---------------------------------------------------------


@dataclass(frozen=True)
class CoordSpec:
    """How to build the coordinator under test, in the test process or in a rank.

    Short timeouts keep the failure cases quick; they bound waits, nothing asserts them.
    """

    kind: str  # "embedded" or "redis"
    url: str = ""
    job: str = "job"
    timeout: float = 5.0
    heartbeat_interval: float = 0.25
    heartbeat_ttl: float = 2.5
    retry_seconds: float = 20.0

    def make(self) -> Coordinator:
        """The coordinator for this process: the process group's when there is one."""
        import torch.distributed as dist

        grouped = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if self.kind == "embedded":
            return ProcessGroupCoordinator(timeout=self.timeout) if grouped else LocalCoordinator()
        coordinator: Coordinator = self.redis()
        return coordinator

    def redis(self, **overrides: Any) -> Any:
        """A ``RedisCoordinator`` (typed loosely: tests poke at its protocol steps)."""
        from ckpt.coordination import RedisCoordinator

        kwargs: dict[str, Any] = dict(
            job=self.job,
            timeout=self.timeout,
            heartbeat_interval=self.heartbeat_interval,
            heartbeat_ttl=self.heartbeat_ttl,
            retry_seconds=self.retry_seconds,
        )
        kwargs.update(overrides)
        return RedisCoordinator(self.url, **kwargs)


# -- state ------------------------------------------------------------------------------


def value(step: int, rank: int) -> float:
    return float(step * 100 + rank)


def make_state(step: int, rank: int, world: int) -> dict[str, Any]:
    """Rank ``rank``'s part of step ``step``: a row block of ``w`` (every rank writes data),
    a replicated ``b`` (written once) and a plain value."""
    return {
        "w": ckpt.ShardedTensor(
            torch.full((ROWS, COLS), value(step, rank)), (ROWS * world, COLS), (ROWS * rank, 0)
        ),
        "b": torch.full((3,), float(step)),
        "meta": {"step": step},
    }


def expected_w(step: int, world: int) -> torch.Tensor:
    return torch.cat([torch.full((ROWS, COLS), value(step, r)) for r in range(world)])


def load_newest(backend: StorageBackend, world: int) -> tuple[int, dict[str, Any]]:
    """Load the newest committed step into a fresh global state; return it and the state."""
    state: dict[str, Any] = {"w": torch.zeros(ROWS * world, COLS), "b": torch.zeros(3), "meta": {}}
    step = ckpt.load(state, backend)
    return step, state


def assert_loads_as(backend: StorageBackend, world: int, step: int) -> None:
    """The newest committed step is ``step`` and it loads with exactly step ``step``'s values."""
    loaded, state = load_newest(backend, world)
    assert loaded == step
    assert torch.equal(state["w"], expected_w(step, world))
    assert torch.equal(state["b"], torch.full((3,), float(step)))
    assert state["meta"] == {"step": step}


def save_outcome(
    coordinator: Coordinator, backend: StorageBackend, step: int, rank: int, world: int
) -> str:
    """Save ``step`` and wait for it; ``"committed"`` or ``"<ErrorClass>: <message>"``."""
    pending = ckpt.async_save(
        make_state(step, rank, world), backend, step=step, coordinator=coordinator
    )
    try:
        pending.result(timeout=SIGNAL_TIMEOUT_S)  # a TimeoutError here fails the rank: a hang
    except ckpt.CheckpointError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "committed"


def kill_self() -> None:
    """Die the way a node does: no cleanup, no exception, no atexit."""
    os.kill(os.getpid(), signal.SIGKILL)


# -- a backend that records durable writes ------------------------------------------------


class _RecordingStream:
    def __init__(self, owner: RecordingBackend, path: str, inner: BlobStream) -> None:
        self._owner = owner
        self._path = path
        self._inner = inner
        self._size = 0

    def write(self, data: BytesLike) -> None:
        self._owner.maybe_kill("data-write", self._path)
        self._inner.write(data)
        self._size += memoryview(data).nbytes

    def commit(self) -> None:
        self._inner.commit()
        self._owner.record(op="durable", path=self._path, size=self._size)
        self._owner.maybe_kill("index-durable", self._path)

    def abort(self) -> None:
        self._inner.abort()


class RecordingBackend(FaultyBackend):
    """``FaultyBackend`` that also appends every durable write and manifest commit to a log.

    The log is one JSON line per event, shared by all ranks (``O_APPEND``), so its order is
    the order in which writes became durable. Before a manifest is put it checks, against
    the storage itself, that every file the manifest names is there with its size.

    Args:
        log_path: the shared log file.
        rank: written into each record.
        kill_at: SIGKILL this process at this stage of step ``kill_step``:
            ``data-write`` (the first write of a data file: its data is not durable),
            ``index-durable`` (right after an embedded report, the shard index file, is
            durable), ``manifest`` (just before the manifest is put: the committer dies
            between the last report and the commit point) or ``after-manifest`` (the
            manifest is durable, nothing after it ran).
        kill_step: the step whose stage kills.
    """

    def __init__(
        self,
        inner: StorageBackend,
        *,
        log_path: str,
        rank: int,
        kill_at: str | None = None,
        kill_step: int | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(inner, **kw)
        self.log_path = log_path
        self.rank = rank
        self.kill_at = kill_at
        self.kill_step = kill_step

    def maybe_kill(self, stage: str, path: str) -> None:
        """Die here when ``stage`` of ``kill_step`` is the chosen moment."""
        if stage != self.kill_at or self.kill_step is None:
            return
        prefix = step_prefix(self.kill_step)
        folder = {"data-write": "data", "index-durable": "index"}.get(stage)
        if folder is None or path.startswith(f"{prefix}/{folder}/"):
            kill_self()

    def record(self, **event: Any) -> None:
        line = json.dumps({"rank": self.rank, **event}) + "\n"
        fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def open_stream(self, path: str) -> BlobStream:
        return _RecordingStream(self, path, super().open_stream(path))

    def put_if_absent(self, path: str, data: BytesLike) -> bool:
        head, _, name = path.rpartition("/")
        step = parse_step_prefix(head)
        if name != MANIFEST_NAME or step is None:
            return super().put_if_absent(path, data)
        manifest = Manifest.from_bytes(bytes(data), path)
        missing = [
            rel
            for rel, size in manifest.files.items()
            if not self.inner.exists(f"{head}/{rel}") or self.inner.size(f"{head}/{rel}") != size
        ]
        self.record(
            op="manifest-start",
            step=step,
            path=path,
            missing=missing,
            files=sorted(manifest.files),
            generation=manifest.generation,
        )
        if step == self.kill_step:
            self.maybe_kill("manifest", path)
        created = super().put_if_absent(path, data)
        self.record(op="manifest-done", step=step, path=path, created=created)
        if step == self.kill_step:
            self.maybe_kill("after-manifest", path)
        return created


def read_log(log_path: Path) -> list[dict[str, Any]]:
    if not log_path.exists():
        return []
    return [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]


def assert_committed_once_after_data(log_path: Path, step: int, world: int) -> dict[str, Any]:
    """Exactly one manifest of ``step`` was put, by rank 0, after every file it names was
    durable (in the log and on storage), and it names data of every rank.

    Returns:
        The ``manifest-start`` record (generation and files of the manifest).
    """
    events = read_log(log_path)
    prefix = step_prefix(step)
    starts = [i for i, e in enumerate(events) if e["op"] == "manifest-start" and e["step"] == step]
    dones = [e for e in events if e["op"] == "manifest-done" and e["step"] == step]
    assert len(starts) == 1, f"step {step}: {len(starts)} manifest writes, expected exactly one"
    assert [d["created"] for d in dones] == [True]
    start = events[starts[0]]
    assert start["rank"] == 0
    assert start["missing"] == [], (
        f"step {step}: the manifest was put before {start['missing']} were durable"
    )
    durable_before = {e["path"] for e in events[: starts[0]] if e["op"] == "durable"}
    for rel in start["files"]:
        assert f"{prefix}/{rel}" in durable_before, (
            f"{prefix}/{rel} became durable after the manifest"
        )
    # Data files are named <generation>-r<rank>-...: one generation on every rank, and
    # every rank's data is in the manifest.
    tag = start["generation"] + "-r"
    names = [rel.rpartition("/")[2] for rel in start["files"]]
    assert all(name.startswith(tag) for name in names), f"step {step}: {names} not all of {tag}*"
    writers = {int(name[len(tag) :].split("-")[0]) for name in names}
    assert writers == set(range(world)), f"step {step}: data from ranks {sorted(writers)} only"
    return start


# -- file signals between the test and its ranks ------------------------------------------


def send(directory: str | Path, name: str) -> None:
    """Raise the signal ``name`` (an empty file) in ``directory``."""
    (Path(directory) / name).touch()


def wait_signals(
    directory: str | Path,
    names: list[str],
    *,
    timeout: float = SIGNAL_TIMEOUT_S,
    ranks: Ranks | None = None,
) -> None:
    """Wait until every signal in ``names`` was raised; fail early when ``ranks`` died."""
    deadline = time.monotonic() + timeout
    while True:
        missing = [n for n in names if not (Path(directory) / n).exists()]
        if not missing:
            return
        if ranks is not None and ranks.finished():
            raise AssertionError(f"the ranks ended before signalling {missing}: {ranks.join()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no signal {missing} within {timeout:.0f} s")
        time.sleep(0.02)


# -- a launcher that survives dead ranks -----------------------------------------------------

_PRELOAD = [
    "torch",
    "torch.distributed",
    "ckpt",
    "ckpt.coordination._redis",
    "tests.coordination.conformance",
]


def _context() -> Any:
    """The forkserver context; its server imports torch and ckpt once per test session."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


@dataclass
class RankOutcome:
    """How one rank ended: its return value, its error, or a signal."""

    rank: int
    exitcode: int | None
    value: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.exitcode == 0

    @property
    def killed(self) -> bool:
        return self.exitcode == -signal.SIGKILL


class Ranks:
    """``world`` gloo ranks running ``fn(rank, world, *args)``; use as a context manager.

    Args:
        timeout_s: every rank must end within this; ``join`` kills the rest.
        pg_timeout_s: gloo's collective timeout in the ranks.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        world: int,
        *args: Any,
        timeout_s: float = 120.0,
        pg_timeout_s: float = 30.0,
    ) -> None:
        self._fn = fn
        self._world = world
        self._args = args
        self._timeout_s = timeout_s
        self._pg_timeout_s = pg_timeout_s
        self._dir = tempfile.TemporaryDirectory(prefix="ckpt-ranks-")
        self._procs: list[Any] = []
        self._deadline = 0.0
        self._outcomes: list[RankOutcome] | None = None

    def __enter__(self) -> Ranks:
        ctx = _context()
        port = free_port()
        self._deadline = time.monotonic() + self._timeout_s
        for rank in range(self._world):
            p = ctx.Process(
                target=rank_main,
                args=(
                    rank,
                    self._world,
                    port,
                    self._dir.name,
                    self._pg_timeout_s,
                    self._fn,
                    self._args,
                ),
                name=f"rank{rank}",
            )
            p.start()
            self._procs.append(p)
        return self

    def finished(self) -> bool:
        """Whether every rank has ended."""
        return all(not p.is_alive() for p in self._procs)

    def join(self) -> list[RankOutcome]:
        """Wait for every rank (killing any still running at the deadline); their outcomes."""
        if self._outcomes is not None:
            return self._outcomes
        hung: set[int] = set()
        for rank, p in enumerate(self._procs):
            p.join(max(0.0, self._deadline - time.monotonic()))
            if p.is_alive():
                hung.add(rank)
                p.kill()
                p.join(10)
        outcomes = []
        for rank, p in enumerate(self._procs):
            path = Path(self._dir.name) / f"rank{rank}.json"
            outcome = RankOutcome(rank, p.exitcode)
            if rank in hung:
                outcome.error = (
                    f"still running after {self._timeout_s:.0f} s (a hang); killed by the test"
                )
            elif path.exists():
                data = json.loads(path.read_text())
                if data["ok"]:
                    outcome.value = data["value"]
                else:
                    outcome.error = data["error"]
            elif not outcome.killed:
                outcome.error = f"exited with {p.exitcode} and no result"
            outcomes.append(outcome)
        self._outcomes = outcomes
        return outcomes

    def __exit__(self, *exc: object) -> None:
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(10)
        self._dir.cleanup()


def spawn_ranks(
    fn: Callable[..., Any], world: int, *args: Any, timeout_s: float = 120.0
) -> list[RankOutcome]:
    """Run ``fn`` on ``world`` ranks to the end; every rank's outcome, dead ones included."""
    with Ranks(fn, world, *args, timeout_s=timeout_s) as ranks:
        return ranks.join()


def describe(outcomes: list[RankOutcome]) -> str:
    """The outcomes, for an assertion message."""
    return "\n".join(
        f"rank {o.rank}: exit {o.exitcode}, value {o.value!r}, error {o.error}" for o in outcomes
    )


def steps_of(outcome: RankOutcome) -> Mapping[str, str]:
    """A surviving rank's per-step results (JSON turned the step numbers into strings)."""
    assert outcome.ok, f"rank {outcome.rank} failed: exit {outcome.exitcode}, {outcome.error}"
    return dict(outcome.value["steps"])
