"""The SIGKILL campaign's driver: kills savers (and gc) at every storage gap, checks the rest.

``tests/campaigns/test_sigkill.py`` starts ``python -m tests.support.workers.sigkill``
once and sends it one JSON request per line on stdin::

    {"scenario": "save", "dir": "/tmp/...", "seed": 1, "sample": 12, "random": 4}

and reads one JSON line back: the scenario's figures (trials, killed, torn, ...) and a
description of every trial that went wrong. The process imports torch and ckpt once and
runs every trial in processes it forks from itself (a fork costs milliseconds; a fresh
interpreter with torch costs seconds). It never saves anything itself, so every child
starts clean: the verifier of a kill is a fresh process that shares nothing with the
killed one but the files.

A trial:

1. copies the scenario's template root (committed history made once, by forked
   children) into a fresh trial directory, beside an ``outside`` folder that nobody may
   touch;
2. forks the operation (``ckpt.save``, ``ckpt.async_save``, a ``CheckpointManager``
   loop, a 4-rank gloo job, or gc) with a ``KillingBackend`` that SIGKILLs it before
   (or half-way through) its k-th storage call, or SIGKILLs it after a random delay;
   a dry run first counts the calls, so that k enumerates every gap;
3. in a fresh child: every committed manifest's files exist with their sizes and pass
   their checksums; restore returns the newest committed step, which must be the previous
   step or the new one, bit for bit equal to what was saved;
4. in a fresh child (a fresh 4-rank job for the 4-rank scenarios): restore, save the
   killed step's number again (it must work, or be refused as already committed when the
   kill came after the commit) and the next step;
5. in a fresh child: gc (``ckpt gc``'s ``apply_retention``), then no garbage may be left
   in steps older than the newest committed one, and the newest restores bit for bit;
6. nothing outside the root changed.

Children write nothing on stdout (the request channel): their stdout is /dev/null.
Everything a save loads on first use (``torch.distributed.tensor`` takes a second) is
imported here, before any fork.
"""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.tensor

import ckpt
from ckpt.cli import app
from ckpt.coordination import LocalCoordinator
from ckpt.errors import CheckpointError, CheckpointNotFoundError
from ckpt.format import MANIFEST_NAME, parse_step_prefix, read_manifest, scan_steps
from ckpt.format import step_prefix as prefix_of
from ckpt.retention import RetentionPolicy, apply_retention
from recovery import verify_checkpoint
from storage_backends import LocalBackend, StorageBackend
from tests.support.checks import difference
from tests.support.kill_points import KillingBackend
from tests.support.leftovers import leftovers

WORLD = 4
CHILD_TIMEOUT_S = 60.0
# Small files and writes: several data files and several writes each, more gaps to die in.
SMALL_FILES = ckpt.SaveOptions(
    chunk_bytes=4096, file_bytes=8192, write_block_bytes=4096, io_threads=2
)

Json = dict[str, Any]


# --------------------------------------------------------------------------- states


def single_state(step: int) -> dict[str, Any]:
    """The state a 1-rank trainer holds at ``step`` (a function of ``step`` only)."""
    gen = torch.Generator().manual_seed(1000 + step)
    return {
        "w": torch.randn(48, 64, generator=gen),
        "ids": torch.randint(0, 1 << 40, (512,), generator=gen),
        "h": torch.randn(300, generator=gen).to(torch.bfloat16),
        "meta": {"step": step, "lr": [0.5 / step]},
    }


def single_target() -> dict[str, Any]:
    """An empty state of the same shapes, to restore into."""
    return {
        "w": torch.zeros(48, 64),
        "ids": torch.zeros(512, dtype=torch.int64),
        "h": torch.zeros(300, dtype=torch.bfloat16),
        "meta": {},
    }


def multi_full(step: int) -> dict[str, Any]:
    """The global state of the 4-rank job at ``step``."""
    gen = torch.Generator().manual_seed(2000 + step)
    return {
        "w": torch.randn(16, 32, generator=gen),
        "b": torch.randn(64, generator=gen).to(torch.float64),
        "meta": {"step": step},
    }


def multi_target() -> dict[str, Any]:
    return {"w": torch.zeros(16, 32), "b": torch.zeros(64, dtype=torch.float64), "meta": {}}


def multi_rank_state(rank: int, full: Mapping[str, Any]) -> dict[str, Any]:
    """Rank ``rank``'s part: rows of ``w`` (Megatron-style shards), ``b`` replicated."""
    rows = full["w"].shape[0] // WORLD
    return {
        "w": ckpt.ShardedTensor(
            full["w"][rank * rows : (rank + 1) * rows].clone(),
            tuple(full["w"].shape),
            (rank * rows, 0),
        ),
        "b": ckpt.ShardedTensor(full["b"].clone(), tuple(full["b"].shape), (0,), replicated=True),
        "meta": dict(full["meta"]),
    }


def state_differences(actual: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """What differs between a restored state and the expected one (bit for bit)."""
    out = []
    for key, want in expected.items():
        got = actual.get(key)
        if isinstance(got, ckpt.ShardedTensor):
            got = got.local
        if isinstance(want, ckpt.ShardedTensor):
            want = want.local
        if isinstance(want, torch.Tensor):
            why = difference(got, want) if isinstance(got, torch.Tensor) else "not a tensor"
        else:
            why = None if got == want else f"{got!r} != {want!r}"
        if why is not None:
            out.append(f"{key}: {why}")
    return out


# --------------------------------------------------------------------------- children


@dataclass
class Child:
    """A forked process and the pipe its result comes back on."""

    pid: int
    fd: int


@dataclass
class Outcome:
    """How a child ended: its exit status (``-signal`` when killed), what it returned,
    the exception it raised, or that it hung (it is SIGKILLed then)."""

    status: int | None
    value: Any = None
    error: Json | None = None
    hung: bool = False

    @property
    def killed(self) -> bool:
        return self.status == -signal.SIGKILL


def _error_facts(exc: BaseException) -> Json:
    return {
        "type": type(exc).__name__,
        "message": str(exc)[:400],
        "checkpoint_error": isinstance(exc, CheckpointError),
        "traceback": traceback.format_exc()[-1500:],
    }


def fork(fn: Callable[..., Any], *args: Any, pgid: int | None = None) -> Child:
    """Run ``fn(*args)`` in a forked child; ``pgid``: 0 leads a new process group, else joins."""
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child
        code = 0
        try:
            os.close(read_fd)
            if pgid is not None:
                os.setpgid(0, pgid)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            try:
                out: Json = {"value": fn(*args)}
            except BaseException as exc:
                out = {"error": _error_facts(exc)}
            data = memoryview(json.dumps(out).encode())
            while data:
                data = data[os.write(write_fd, data) :]
        except BaseException:
            code = 70
        finally:
            os._exit(code)
    os.close(write_fd)
    if pgid is not None:
        try:  # both sides set it: whichever runs first, the group exists before it is used
            os.setpgid(pid, pgid or pid)
        except OSError:
            pass
    return Child(pid, read_fd)


def wait(child: Child, timeout: float = CHILD_TIMEOUT_S) -> Outcome:
    """Collect a child's result; SIGKILL it when it takes longer than ``timeout``."""
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    hung = False
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                hung = True
                break
            ready, _, _ = select.select([child.fd], [], [], left)
            if not ready:
                continue
            data = os.read(child.fd, 1 << 16)
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(child.fd)
    if hung:
        try:
            os.kill(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _, status = os.waitpid(child.pid, 0)
    code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    body: Json = json.loads(b"".join(chunks)) if chunks and not hung else {}
    return Outcome(code, body.get("value"), body.get("error"), hung)


def run(fn: Callable[..., Any], *args: Any, timeout: float = CHILD_TIMEOUT_S) -> Outcome:
    return wait(fork(fn, *args), timeout)


def timed(fn: Callable[..., Any], *args: Any) -> float:
    """(Child.) Run ``fn(*args)``; the monotonic clock (system-wide) when it ended."""
    fn(*args)
    return time.monotonic()


def timed_rank(rank: int, fn: Callable[..., Any], *args: Any) -> float:
    fn(rank, *args)
    return time.monotonic()


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# --------------------------------------------------------------------------- kill points


@dataclass(frozen=True)
class Kill:
    """Where a trial dies: at storage call ``at`` (``mode`` before/inside) of ``rank``, or
    ``delay`` seconds after the start (the whole job), or never (``at`` and ``delay`` None)."""

    at: int | None = None
    mode: str = "before"
    rank: int | None = None  # None: a single process
    group: bool = False
    delay: float | None = None

    def describe(self) -> str:
        if self.delay is not None:
            return f"random kill after {self.delay * 1000:.1f} ms"
        who = "the job " if self.group else f"rank {self.rank} " if self.rank is not None else ""
        return f"kill {who}{self.mode} storage call {self.at}"

    def backend(
        self, root: Path, rank: int | None = None, trace: int | None = None
    ) -> StorageBackend:
        """The backend the operation under test uses on ``rank``."""
        inner = LocalBackend(root)
        if self.at is None or rank != self.rank:
            return inner if trace is None else KillingBackend(inner, trace=trace)
        return KillingBackend(inner, kill_at=self.at, mode=self.mode, group=self.group, trace=trace)


@dataclass(frozen=True)
class TraceLine:
    n: int
    op: str
    path: str
    thread: str


def read_trace(path: Path) -> list[TraceLine]:
    lines = []
    for raw in path.read_text().splitlines():
        n, op, target, thread = raw.split(" ", 3)
        lines.append(TraceLine(int(n), op, target, thread))
    return lines


def kill_points(trace: list[TraceLine], rank: int | None = None, group: bool = False) -> list[Kill]:
    """Every gap of a dry run's calls (and one past the end), and a half-way kill inside
    every call where half-way differs from before (writes, deletes of several paths)."""
    points = [Kill(n, "before", rank, group) for n in range(1, len(trace) + 2)]
    for line in trace:
        if line.op in ("stream.write", "write") or (line.op == "delete" and "," in line.path):
            points.append(Kill(line.n, "inside", rank, group))
    return points


def choose(points: list[Kill], sample: int | None, rng: random.Random) -> list[Kill]:
    """All ``points`` (``sample`` None), or ``sample`` of them drawn at random."""
    if sample is None or sample >= len(points):
        return points
    return rng.sample(points, sample)


def durable_manifests(trace: list[TraceLine]) -> set[int]:
    """Steps whose manifest publish certainly returned before a killed process died: its
    thread started another storage call after it (every traced call started before the
    kill)."""
    done: set[int] = set()
    for i, line in enumerate(trace):
        if line.op != "put_if_absent" or not line.path.endswith("/" + MANIFEST_NAME):
            continue
        step = parse_step_prefix(line.path.split("/", 1)[0])
        if step is not None and any(t.thread == line.thread for t in trace[i + 1 :]):
            done.add(step)
    return done


# --------------------------------------------------------------------------- checks


def snapshot_outside(trial: Path) -> dict[str, tuple[int, int]]:
    """Every entry of the trial directory except the root: (size, mtime_ns)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(trial):
        if Path(dirpath) == trial and "root" in dirnames:
            dirnames.remove("root")
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            out[os.path.relpath(os.path.join(dirpath, name), trial)] = (st.st_size, st.st_mtime_ns)
    return out


def inspect_root(root: str, kind: str) -> Json:
    """(In a fresh child.) Committed steps and their files, restore of the newest."""
    backend = LocalBackend(root)
    listing = scan_steps(backend)
    bad: dict[str, str] = {}
    for step in listing.committed:
        try:
            manifest = read_manifest(backend, step)
            for rel, size in manifest.files.items():
                path = Path(root) / prefix_of(step) / rel
                if not path.is_file():
                    raise CheckpointError(f"{path} is missing")
                if path.stat().st_size != size:
                    raise CheckpointError(f"{path}: {path.stat().st_size} bytes, manifest {size}")
            verify_checkpoint(backend, manifest)
        except CheckpointError as exc:
            bad[str(step)] = str(exc)[:300]
    target = single_target() if kind == "single" else multi_target()
    facts: Json = {
        "committed": list(listing.committed),
        "uncommitted": list(listing.uncommitted),
        "bad": bad,
        "restored": None,
        "skipped": [],
        "diff": [],
    }
    try:
        report = ckpt.restore(target, root)
    except CheckpointNotFoundError:
        return facts
    expected = single_state(report.step) if kind == "single" else multi_full(report.step)
    facts.update(
        restored=report.step,
        skipped=[f"{s}: {why[:200]}" for s, why in report.skipped],
        diff=state_differences(target, expected),
    )
    return facts


def gc_and_inspect(root: str, kind: str, keep_last: int | None) -> Json:
    """(In a fresh child.) ``ckpt gc`` (keep everything committed unless ``keep_last``),
    then what is left and a restore of the newest."""
    apply_retention(
        LocalBackend(root),
        RetentionPolicy(keep_last=keep_last, abandoned_after=0),
        remove_stale=True,
    )
    return {**leftovers(root), **inspect_root(root, kind)}


@dataclass
class Figures:
    """One scenario's counts, and a line per trial that went wrong."""

    trials: int = 0
    killed: int = 0
    new_committed: int = 0
    torn: int = 0
    wrong_restore: int = 0
    escapes: int = 0
    save_failed: int = 0
    garbage: int = 0
    stale_files: int = 0
    outside: int = 0
    hangs: int = 0
    failures: list[str] = field(default_factory=list)

    def problem(self, kind: str, trial: str, why: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.failures) < 40:
            self.failures.append(f"{kind}: {trial}: {why}")

    def child(self, trial: str, what: str, outcome: Outcome, kind: str = "save_failed") -> bool:
        """Count a verifying child's hang or exception (a ``CheckpointError`` counts as
        ``kind``, any other exception as an escape); True when it returned a value."""
        if outcome.hung:
            self.problem("hangs", trial, f"{what} hung")
            return False
        if outcome.error is not None:
            error = outcome.error
            self.problem(
                kind if error["checkpoint_error"] else "escapes",
                trial,
                f"{what} raised {error['type']}: {error['message']}\n{error['traceback']}",
            )
            return False
        if outcome.status != 0:
            self.problem("escapes", trial, f"{what} exited with status {outcome.status}")
            return False
        return True

    def killed_op(self, trial: str, outcome: Outcome) -> None:
        """Count the operation under test: killed (expected), finished before its kill
        point (fine), hung, or failed although nothing disturbed it."""
        if outcome.killed and not outcome.hung:
            self.killed += 1
        elif outcome.hung:
            self.problem("hangs", trial, "the operation under test hung")
        else:
            self.child(trial, "the operation under test", outcome)

    def restore_facts(
        self,
        trial: str,
        facts: Json,
        allowed: Collection[int | None],
        durable: Collection[int] = (),
    ) -> None:
        """Judge ``inspect_root``'s facts right after a kill (or after gc)."""
        committed = set(facts["committed"])
        if facts["bad"]:
            self.problem("torn", trial, f"committed steps fail verification: {facts['bad']}")
        if facts["skipped"]:
            self.problem("torn", trial, f"restore skipped committed steps: {facts['skipped']}")
        newest = max(committed, default=None)
        restored = facts["restored"]
        if restored != newest or restored not in allowed or facts["diff"]:
            self.problem(
                "wrong_restore",
                trial,
                f"restored {restored}, newest committed {newest}, allowed {sorted(allowed, key=str)}, "
                f"differences {facts['diff']}",
            )
        lost = {s for s in durable if newest is None or newest < s}
        if lost:
            self.problem("wrong_restore", trial, f"committed steps {sorted(lost)} were lost")

    def report(self) -> Json:
        counts = {k: v for k, v in self.__dict__.items() if k != "failures"}
        return {"figures": counts, "failures": self.failures}


# --------------------------------------------------------------------------- scenarios


@dataclass
class Request:
    scenario: str
    dir: Path
    seed: int
    sample: int | None  # enumerated kill points per kind of kill; None: all of them
    random: int  # kills at a random moment

    @classmethod
    def parse(cls, line: str) -> Request:
        doc = json.loads(line)
        return cls(doc["scenario"], Path(doc["dir"]), doc["seed"], doc["sample"], doc["random"])


class Campaign:
    """Runs the trials of one scenario under ``request.dir``."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.rng = random.Random(request.seed)
        self.figures = Figures()
        self.template = request.dir / "template"
        self.scratch = request.dir / "scratch"
        self.scratch.mkdir(parents=True, exist_ok=True)
        self._n = 0
        self._traces = 0
        self._failures_seen = 0

    def new_trial(self) -> tuple[str, Path, Path]:
        """A fresh trial directory holding a copy of the template root, and ``outside``."""
        self._n += 1
        trial = self.request.dir / f"t{self._n:04d}"
        shutil.copytree(self.template, trial / "root", symlinks=True)
        (trial / "outside").mkdir()
        (trial / "outside" / "sentinel.bin").write_bytes(os.urandom(256))
        os.symlink(trial / "outside", trial / "root-sibling-link")
        return f"{self.request.scenario} #{self._n}", trial, trial / "root"

    def trace_file(self) -> Path:
        self._traces += 1
        return self.scratch / f"trace-{self._traces}.txt"

    def dry_run(
        self, op: Callable[..., Any], *, traced: bool = True
    ) -> tuple[list[TraceLine], float]:
        """Run ``op`` once on a template copy without a kill: its calls, and how long after
        the fork it ended (random kills fall in that window)."""
        trial, path, root = self.new_trial()
        trace = self.trace_file()
        started = time.monotonic()
        outcome = run(timed, op, str(root), Kill(), str(trace) if traced else None)
        seconds = outcome.value - started if outcome.error is None else 0.0
        if outcome.status != 0 or outcome.error is not None:
            raise RuntimeError(f"dry run of {trial} failed: {outcome}")
        shutil.rmtree(path)
        return (read_trace(trace) if traced else []), seconds

    def random_kills(self, seconds: float, group: bool = False) -> list[Kill]:
        return [
            Kill(group=group, delay=self.rng.uniform(0.0, seconds))
            for _ in range(self.request.random)
        ]

    def finish_trial(self, trial: Trial) -> None:
        """Check the outside of the root; keep the directory of a trial that went wrong."""
        if snapshot_outside(trial.path) != trial.before:
            self.figures.problem("outside", trial.name, "something outside the root changed")
        if len(self.figures.failures) == self._failures_seen:
            shutil.rmtree(trial.path, ignore_errors=True)
        self._failures_seen = len(self.figures.failures)


# -- one trial ------------------------------------------------------------------------------


@dataclass
class Trial:
    name: str
    path: Path
    root: Path
    before: dict[str, tuple[int, int]]


def start_trial(campaign: Campaign, kill: Kill) -> Trial:
    campaign.figures.trials += 1
    name, path, root = campaign.new_trial()
    return Trial(f"{name} ({kill.describe()})", path, root, snapshot_outside(path))


def kill_process(campaign: Campaign, trial: Trial, op: Callable[..., Any], kill: Kill) -> Outcome:
    """Run ``op(root, kill, trace)`` in a child that dies as ``kill`` says; count how."""
    trace = campaign.trace_file()
    child = fork(op, str(trial.root), kill, str(trace))
    if kill.delay is not None:
        time.sleep(kill.delay)
        try:
            os.kill(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    outcome = wait(child)
    campaign.figures.killed_op(trial.name, outcome)
    outcome.value = read_trace(trace) if trace.exists() else []
    return outcome


def inspect_after_kill(
    campaign: Campaign, trial: Trial, kind: str, allowed: Collection[int | None], **judge: Any
) -> Json | None:
    """Verify the root in a fresh process right after a kill; None when that failed."""
    facts = run(inspect_root, str(trial.root), kind)
    if not campaign.figures.child(trial.name, "inspection after the kill", facts, "torn"):
        return None
    campaign.figures.restore_facts(trial.name, facts.value, allowed, **judge)
    value: Json = facts.value
    return value


def judge_gc(campaign: Campaign, trial: Trial, kind: str, newest: int) -> None:
    """gc after the resume: no garbage older than the newest step, which restores exactly."""
    f = campaign.figures
    after = run(gc_and_inspect, str(trial.root), kind, None)
    if not f.child(trial.name, "gc after the resume", after):
        return
    judge_garbage(campaign, trial, after.value)
    f.restore_facts(trial.name, after.value, {newest})


def judge_garbage(campaign: Campaign, trial: Trial, facts: Json) -> None:
    """Count what gc left in steps older than the newest committed one: abandoned step
    prefixes (``garbage``) and files that no manifest names in committed steps
    (``stale_files``: see ``test_sigkill``'s xfail tests)."""
    if facts["abandoned"]:
        campaign.figures.problem("garbage", trial.name, f"left after gc: {facts['abandoned']}")
    if facts["stale"]:
        campaign.figures.problem("stale_files", trial.name, f"left after gc: {facts['stale']}")


def judge_resume(
    campaign: Campaign, trial: Trial, who: str, result: Json, again: int, committed: bool
) -> None:
    """The saves after the kill: ``again + 1`` must work; ``again`` (the killed step's
    number) too, unless the killed save had committed it already (then it is refused)."""
    f = campaign.figures
    if result["diff"]:
        f.problem(
            "wrong_restore", trial.name, f"{who} restored {result['restored']}: {result['diff']}"
        )
    if result[str(again + 1)] != "ok" or (result[str(again)] != "ok" and not committed):
        f.problem("save_failed", trial.name, f"{who}: saves after the kill: {result}")


def kill_and_resume(campaign: Campaign, op: Callable[..., Any], kill: Kill, api: str) -> None:
    """One trial of a 1-rank save of step 2 over a committed step 1."""
    trial = start_trial(campaign, kill)
    kill_process(campaign, trial, op, kill)
    facts = inspect_after_kill(campaign, trial, "single", {1, 2}, durable={1})
    if facts is not None:
        committed = 2 in facts["committed"]
        campaign.figures.new_committed += committed
        resumed = run(resume_single, str(trial.root), 2, api)
        if campaign.figures.child(trial.name, "resume", resumed):
            judge_resume(campaign, trial, "resume", resumed.value, 2, committed)
        judge_gc(campaign, trial, "single", newest=3)
    campaign.finish_trial(trial)


# -- 1 rank: ckpt.save / ckpt.async_save ---------------------------------------------------


def _trace_fd(trace: str | None) -> int | None:
    return os.open(trace, os.O_WRONLY | os.O_CREAT | os.O_APPEND) if trace else None


def op_save(root: str, kill: Kill, trace: str | None) -> None:
    """(Child.) Save step 2 over a root holding step 1; killed as ``kill`` says."""
    ckpt.save(single_state(2), kill.backend(Path(root), trace=_trace_fd(trace)), step=2)


def op_async_save(root: str, kill: Kill, trace: str | None) -> None:
    """(Child.) ``async_save`` step 2, change the tensors at once (training goes on), wait."""
    state = single_state(2)
    pending = ckpt.async_save(state, kill.backend(Path(root), trace=_trace_fd(trace)), step=2)
    for value in state.values():
        if isinstance(value, torch.Tensor):
            value.fill_(7)
    pending.result()


def resume_single(root: str, again: int, api: str) -> Json:
    """(Fresh child.) Restore, then save ``again`` (the killed step) and ``again + 1``."""
    target = single_target()
    restored = ckpt.load(target, root)
    out: Json = {"restored": restored, "diff": state_differences(target, single_state(restored))}
    for step in (again, again + 1):
        try:
            if api == "async":
                ckpt.async_save(single_state(step), root, step=step).result()
            else:
                ckpt.save(single_state(step), root, step=step)
            out[str(step)] = "ok"
        except CheckpointError as exc:
            out[str(step)] = f"refused: {exc}"
    return out


def save_plain(root: str, step: int) -> None:
    ckpt.save(single_state(step), root, step=step)


def prepare_single(campaign: Campaign, steps: tuple[int, ...]) -> None:
    campaign.template.mkdir(parents=True, exist_ok=True)
    for step in steps:
        outcome = run(save_plain, str(campaign.template), step)
        if outcome.status != 0 or outcome.error is not None:
            raise RuntimeError(f"template step {step}: {outcome}")


def single_campaign(campaign: Campaign, api: str) -> None:
    op = op_async_save if api == "async" else op_save
    prepare_single(campaign, (1,))
    trace, seconds = campaign.dry_run(op)
    kills = choose(kill_points(trace), campaign.request.sample, campaign.rng)
    for kill in kills + campaign.random_kills(seconds):
        kill_and_resume(campaign, op, kill, api)


# -- 1 rank: CheckpointManager loop with retention -----------------------------------------

LOOP_STEPS = 5


def op_manager(root: str, kill: Kill, trace: str | None) -> None:
    """(Child.) A training loop saving every step through a manager keeping the last 2."""
    mgr = ckpt.CheckpointManager(
        kill.backend(Path(root), trace=_trace_fd(trace)),
        every_steps=1,
        keep_last=2,
        if_busy="wait",
        save_options=SMALL_FILES,
        save_on_sigterm=False,
    )
    state = single_target()
    for step in range(1, LOOP_STEPS + 1):
        for key, value in single_state(step).items():
            if isinstance(value, torch.Tensor):
                state[key].copy_(value)
            else:
                state[key] = value
        mgr.maybe_save(step, state)
    mgr.close()


def resume_manager(root: str) -> Json:
    """(Fresh child.) A manager restores, checks, and trains on for 2 steps, saving both."""
    mgr = ckpt.CheckpointManager(
        root, every_steps=1, keep_last=2, if_busy="wait", save_options=SMALL_FILES
    )
    state = single_target()
    restored = mgr.restore(state) or 0
    diff = state_differences(state, single_state(restored)) if restored else []
    for step in (restored + 1, restored + 2):
        mgr.maybe_save(step, single_state(step))
    mgr.close()
    return {"restored": restored, "diff": diff}


def manager_campaign(campaign: Campaign) -> None:
    campaign.template.mkdir(parents=True)
    trace, seconds = campaign.dry_run(op_manager)
    kills = choose(kill_points(trace), campaign.request.sample, campaign.rng)
    f = campaign.figures
    for kill in kills + campaign.random_kills(seconds):
        trial = start_trial(campaign, kill)
        killed = kill_process(campaign, trial, op_manager, kill)
        allowed: set[int | None] = {None, *range(1, LOOP_STEPS + 1)}
        durable = durable_manifests(killed.value)
        facts = inspect_after_kill(campaign, trial, "single", allowed, durable=durable)
        if facts is not None:
            f.new_committed += LOOP_STEPS in facts["committed"]
            resumed = run(resume_manager, str(trial.root))
            if f.child(trial.name, "resume", resumed):
                r = resumed.value
                if r["diff"]:
                    f.problem(
                        "wrong_restore", trial.name, f"resume restored {r['restored']}: {r['diff']}"
                    )
                judge_gc(campaign, trial, "single", newest=r["restored"] + 2)
        campaign.finish_trial(trial)


# -- 4 ranks over gloo -----------------------------------------------------------------------


def rank_main(rank: int, store: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    """(A rank of a forked job.) Join the gloo group through a file store, run ``fn``."""
    dist.init_process_group(
        "gloo",
        init_method=Path(store).as_uri(),  # a FileStore: no port to choose
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=30),
    )
    return fn(rank, *args)


def run_job(
    campaign: Campaign, fn: Callable[..., Any], args: tuple[Any, ...], kill: Kill | None = None
) -> list[Outcome]:
    """Fork a 4-rank job in its own process group; each rank's outcome. When a rank dies of
    SIGKILL, the others are SIGKILLed a moment later (a launcher tearing the job down);
    ``kill.delay`` kills the whole job at that moment."""
    store = str(campaign.trace_file()) + ".store"
    children: list[Child] = []
    pgid = 0
    for rank in range(WORLD):
        child = fork(rank_main, rank, store, fn, args, pgid=pgid)
        pgid = pgid or child.pid
        children.append(child)
    if kill is not None and kill.delay is not None:
        time.sleep(kill.delay)
        kill_group(pgid)
    outcomes: dict[int, Outcome] = {}
    pending = dict(enumerate(children))
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while pending:
        ready, _, _ = select.select([c.fd for c in pending.values()], [], [], 0.5)
        for rank, child in list(pending.items()):
            if child.fd not in ready:
                continue
            outcomes[rank] = wait(child, 10.0)
            del pending[rank]
            if outcomes[rank].killed and pending:
                # The launcher's teardown comes a moment later: the others may get on a
                # little (rank 0 may still commit a step every rank had reported).
                time.sleep(campaign.rng.uniform(0.0, 0.05))
                kill_group(pgid)
        if pending and time.monotonic() > deadline:
            kill_group(pgid)
            for rank, child in pending.items():
                outcomes[rank] = wait(child, 10.0)
                outcomes[rank].hung = True
            pending.clear()
    return [outcomes[r] for r in range(WORLD)]


def job_save(rank: int, root: str, step: int, kill: Kill, trace: str | None) -> None:
    fd = _trace_fd(trace) if rank == kill.rank else None
    ckpt.save(
        multi_rank_state(rank, multi_full(step)), kill.backend(Path(root), rank, fd), step=step
    )


def job_resume(rank: int, root: str, again: int) -> Json:
    """(A rank of a fresh job.) Restore this rank's part, save ``again`` and ``again + 1``."""
    target = multi_rank_state(rank, multi_target())
    restored = ckpt.load(target, root)
    out: Json = {
        "restored": restored,
        "diff": state_differences(target, multi_rank_state(rank, multi_full(restored))),
    }
    for step in (again, again + 1):
        try:
            ckpt.save(multi_rank_state(rank, multi_full(step)), root, step=step)
            out[str(step)] = "ok"
        except CheckpointError as exc:
            out[str(step)] = f"refused: {exc}"
    return out


def job_ok(outcomes: list[Outcome]) -> bool:
    return all(o.status == 0 and o.error is None for o in outcomes)


def multi_campaign(campaign: Campaign) -> None:
    """Kill rank 3 (a non-committer), rank 0 (the committer), or the whole job."""
    campaign.template.mkdir(parents=True)
    if not job_ok(run_job(campaign, job_save, (str(campaign.template), 1, Kill(), None))):
        raise RuntimeError("the template job failed")
    kills: list[Kill] = []
    slowest = 0.0
    for rank in (3, 0):
        _, path, root = campaign.new_trial()
        trace = campaign.trace_file()
        started = time.monotonic()
        job = run_job(campaign, timed_rank, (job_save, str(root), 2, Kill(rank=rank), str(trace)))
        if not job_ok(job):
            raise RuntimeError(f"the dry run tracing rank {rank} failed")
        slowest = max(slowest, *(o.value - started for o in job))
        shutil.rmtree(path)
        calls = read_trace(trace)
        kills += choose(kill_points(calls, rank), campaign.request.sample, campaign.rng)
        if rank == 0:  # the whole job dies at once, at each of rank 0's calls
            kills += choose(kill_points(calls, 0, True), campaign.request.sample, campaign.rng)
    f = campaign.figures
    for kill in kills + campaign.random_kills(slowest, group=True):
        trial = start_trial(campaign, kill)
        job = run_job(campaign, job_save, (str(trial.root), 2, kill, None), kill)
        if any(o.hung for o in job):
            f.problem("hangs", trial.name, "the killed job hung")
        for rank, o in enumerate(job):
            if o.error is not None and not o.error["checkpoint_error"]:
                f.problem(
                    "escapes",
                    trial.name,
                    f"rank {rank} raised {o.error['type']}: {o.error['message']}",
                )
        f.killed += any(o.killed for o in job)
        facts = inspect_after_kill(campaign, trial, "multi", {1, 2}, durable={1})
        if facts is not None:
            committed = 2 in facts["committed"]
            f.new_committed += committed
            resumed = run_job(campaign, job_resume, (str(trial.root), 2))
            if all([f.child(trial.name, f"resume rank {r}", o) for r, o in enumerate(resumed)]):
                for rank, o in enumerate(resumed):
                    judge_resume(campaign, trial, f"rank {rank}", o.value, 2, committed)
                judge_gc(campaign, trial, "multi", newest=3)
        campaign.finish_trial(trial)


# -- gc killed mid-way -------------------------------------------------------------------------

GC_COMMITTED = (1, 2, 4, 5, 7)
GC_PARTIAL = (3, 6)
GC_KEEP = 2


def op_gc(root: str, kill: Kill, trace: str | None) -> None:
    """(Child.) ``ckpt gc --keep-last 2`` over 5 committed steps and 2 abandoned ones: the
    command itself for random kills (and their untraced dry run), else what it runs,
    ``apply_retention``, on a wrapped backend."""
    if kill.delay is not None or (kill.at is None and trace is None):
        app(["gc", root, "--keep-last", str(GC_KEEP)], standalone_mode=False)
        return
    backend = kill.backend(Path(root), trace=_trace_fd(trace))
    apply_retention(backend, RetentionPolicy(keep_last=GC_KEEP))


def partial_save(root: str, step: int) -> None:
    """(Child.) A save killed half-way through its second data write: an abandoned step."""
    backend = KillingBackend(LocalBackend(root), kill_at=3, mode="inside")
    ckpt.Snapshotter(SMALL_FILES).async_save(
        single_state(step), backend, step, LocalCoordinator()
    ).result()


def gc_campaign(campaign: Campaign) -> None:
    prepare_single(campaign, GC_COMMITTED)
    for step in GC_PARTIAL:
        outcome = run(partial_save, str(campaign.template), step)
        if not outcome.killed:
            raise RuntimeError(f"the partial save of step {step} was not killed: {outcome}")
    trace, _ = campaign.dry_run(op_gc)
    kills = choose(kill_points(trace), campaign.request.sample, campaign.rng)
    _, seconds = campaign.dry_run(op_gc, traced=False)  # the command, for random kills
    newest = GC_COMMITTED[-1]
    kept = list(GC_COMMITTED[-GC_KEEP:])
    f = campaign.figures
    for kill in kills + campaign.random_kills(seconds):
        trial = start_trial(campaign, kill)
        kill_process(campaign, trial, op_gc, kill)
        facts = inspect_after_kill(campaign, trial, "single", {newest})
        if facts is not None:
            if set(kept) - set(facts["committed"]):
                f.problem(
                    "wrong_restore", trial.name, f"gc deleted kept steps: {facts['committed']}"
                )
            again = run(gc_and_inspect, str(trial.root), "single", GC_KEEP)
            if f.child(trial.name, "gc again", again):
                judge_garbage(campaign, trial, again.value)
                if again.value["uncommitted"] or again.value["committed"] != kept:
                    f.problem(
                        "garbage",
                        trial.name,
                        f"after gc: committed {again.value['committed']}, "
                        f"uncommitted {again.value['uncommitted']}",
                    )
                f.restore_facts(trial.name, again.value, {newest})
                resumed = run(resume_single, str(trial.root), newest + 1, "sync")
                if f.child(trial.name, "save after gc", resumed):
                    judge_resume(campaign, trial, "save after gc", resumed.value, newest + 1, False)
        campaign.finish_trial(trial)


SCENARIOS: dict[str, Callable[[Campaign], None]] = {
    "save": lambda c: single_campaign(c, "sync"),
    "async_save": lambda c: single_campaign(c, "async"),
    "manager": manager_campaign,
    "ranks4": multi_campaign,
    "gc": gc_campaign,
}


def main() -> int:
    torch.set_num_threads(1)
    for line in sys.stdin:
        if not line.strip():
            continue
        request = Request.parse(line)
        campaign = Campaign(request)
        started = time.monotonic()
        SCENARIOS[request.scenario](campaign)
        result = campaign.figures.report()
        result["seconds"] = round(time.monotonic() - started, 1)
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
