"""Exact resume, tested for real: SIGKILL a training process, restart it, compare bit for bit.

Each case runs ``tests/support/workers/train.py`` in a subprocess with asynchronous checkpoints,
kills it with SIGKILL at a chosen moment (a random step, right after a save started,
while a save's data is half written, after the data is durable but before the manifest,
before any checkpoint exists, twice in one run), restarts it on the same root and lets
it finish. The final parameters, buffers, optimizer state, LR schedule and the next RNG
draws must equal those of one uninterrupted run exactly. After every kill the storage
is inspected: every committed step verifies, the restart restores the newest committed
step, and no step prefix without a manifest is ever restored.

The cases that need a known torn state freeze one save on purpose (``--hang-step``) and
kill on its marker; the random ones rely on slowed writes, so most kills land mid-save.
"""

from __future__ import annotations

import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckpt.format import read_manifest, scan_steps
from ckpt.retention import RetentionPolicy, apply_retention
from recovery import verify_checkpoint
from storage_backends import LocalBackend
from tests.support.checks import assert_all_bit_identical
from tests.support.workers import REPO_ROOT

STEPS = 24
EVERY = 4
SLOW_SAVE_MS = 15.0
KEEP_LAST = 3
LINE_TIMEOUT_S = 60.0
FINISH_TIMEOUT_S = 120.0
CAMPAIGN_SEED = 20240611
# Random kill points stay this far before the end, so the process is still running when
# the signal lands (it would otherwise be a race with a clean exit, not a crash).
LAST_KILL_STEP = STEPS - 2 * EVERY

_RESTORED = re.compile(r"^restored (none|(\d+) skipped=(\d+))$")


class Worker:
    """A training subprocess whose stdout lines are collected by a reader thread."""

    def __init__(self, root: Path, out: Path, log: Path, extra: Sequence[str] = ()) -> None:
        cmd = [
            sys.executable,
            "-m",
            "tests.support.workers.train",
            "--root",
            str(root),
            "--steps",
            str(STEPS),
            "--every",
            str(EVERY),
            "--keep-last",
            str(KEEP_LAST),
            "--out",
            str(out),
            *extra,
        ]
        self.log = log
        self._stderr = log.open("ab")
        self.proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=self._stderr, text=True, bufsize=1
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def describe(self) -> str:
        """Output so far, for assertion messages."""
        tail = self.log.read_text(errors="replace")[-4000:]
        return f"stdout: {self.lines}\nstderr tail:\n{tail}"

    def wait_for(self, *wanted: str, timeout: float = LINE_TIMEOUT_S) -> None:
        """Block until every line in ``wanted`` was printed (in any order)."""
        missing = set(wanted) - set(self.lines)
        deadline = time.monotonic() + timeout
        while missing:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                pytest.fail(f"timed out waiting for {sorted(missing)}\n{self.describe()}")
            if line is None:
                self.proc.wait(timeout=LINE_TIMEOUT_S)
                pytest.fail(
                    f"worker exited ({self.proc.returncode}) before printing {sorted(missing)}\n"
                    f"{self.describe()}"
                )
            self.lines.append(line)
            missing.discard(line)

    def kill(self) -> int | None:
        """SIGKILL the worker and reap it; returns its exit status."""
        try:
            os.kill(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=LINE_TIMEOUT_S)
        self._drain()
        return self.proc.returncode

    def finish(self) -> None:
        """Wait for a clean exit after ``done``."""
        self.wait_for("done", timeout=FINISH_TIMEOUT_S)
        try:
            self.proc.wait(timeout=LINE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"worker did not exit after 'done'\n{self.describe()}")
        self._drain()
        assert self.proc.returncode == 0, self.describe()

    def _drain(self) -> None:
        self._reader.join(timeout=LINE_TIMEOUT_S)
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.lines.append(line)
        self._stderr.close()

    def restored(self) -> int | None:
        """The step the worker restored at start (None: started from scratch)."""
        for line in self.lines:
            match = _RESTORED.match(line)
            if match:
                if match.group(1) == "none":
                    return None
                assert match.group(3) == "0", f"restore skipped committed steps\n{self.describe()}"
                return int(match.group(2))
        pytest.fail(f"no 'restored' line\n{self.describe()}")


@dataclass(frozen=True)
class Listing:
    """Step prefixes under a root after a kill."""

    committed: tuple[int, ...]
    uncommitted: tuple[int, ...]

    @property
    def newest(self) -> int | None:
        return max(self.committed, default=None)


def inspect_root(root: Path) -> Listing:
    """List steps and verify every chunk of every committed one: no torn step is committed."""
    backend = LocalBackend(root)
    listing = scan_steps(backend)
    for step in listing.committed:
        verify_checkpoint(backend, read_manifest(backend, step))
    return Listing(listing.committed, listing.uncommitted)


@dataclass
class Run:
    """One crash-and-resume scenario on its own checkpoint root."""

    tmp: Path
    slow_save_ms: float = SLOW_SAVE_MS

    def __post_init__(self) -> None:
        self.root = self.tmp / "ckpts"
        self.out = self.tmp / "final.safetensors"
        self.log = self.tmp / "worker.log"
        self.after_kill: Listing | None = None  # storage right after the latest kill
        self._workers: list[Worker] = []

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        """Kill any worker a failed assertion left running (a frozen save never ends)."""
        for worker in self._workers:
            if worker.proc.poll() is None:
                worker.kill()

    def start(self, *extra: str) -> Worker:
        """Start (or restart) the worker on this run's root."""
        args = ["--slow-save-ms", str(self.slow_save_ms), *extra]
        worker = Worker(self.root, self.out, self.log, args)
        self._workers.append(worker)
        return worker

    def check_restored(self, worker: Worker) -> None:
        """A restart restores exactly the newest committed step left by the kill, never a torn one."""
        restored = worker.restored()
        if self.after_kill is None:
            assert restored is None, worker.describe()
            return
        assert restored == self.after_kill.newest, (
            f"restored {restored}, newest committed after the kill was {self.after_kill.newest}\n"
            f"{worker.describe()}"
        )
        assert restored not in self.after_kill.uncommitted

    def kill_at(self, *markers: str, extra: Sequence[str] = ()) -> Listing:
        """(Re)start the worker, SIGKILL it once every marker line appeared, inspect storage.

        Returns:
            The storage listing right after the kill.
        """
        worker = self.start(*extra)
        worker.wait_for(*markers)
        self.check_restored(worker)
        status = worker.kill()
        assert status == -signal.SIGKILL, f"the kill did not land ({status})\n{worker.describe()}"
        listing = inspect_root(self.root)
        seen = [int(line.split()[1]) for line in worker.lines if line.startswith("committed ")]
        if seen:  # retention may have removed older ones, never the newest
            assert listing.newest is not None and listing.newest >= max(seen), (listing, seen)
        self.after_kill = listing
        return listing

    def finish(self) -> dict[str, torch.Tensor]:
        """Restart, check what it restored, let it run to the end, return its final tensors."""
        worker = self.start()
        worker.finish()
        self.check_restored(worker)
        final = inspect_root(self.root)
        assert final.newest == STEPS, final
        # The job's retention keeps a partial step younger than its lease (a save may still
        # write there); once no job writes, `ckpt gc --abandoned-after 0` collects it.
        apply_retention(LocalBackend(self.root), RetentionPolicy(keep_last=None, abandoned_after=0))
        final = inspect_root(self.root)
        assert final.uncommitted == (), f"abandoned step prefixes were not collected: {final}"
        return load_file(self.out)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """Final tensors of one uninterrupted run (same program, same checkpoint policy)."""
    with Run(tmp_path_factory.mktemp("reference")) as run:
        return run.finish()


@pytest.mark.slow  # in CI the random campaign's point covers it
def test_kill_at_a_random_step(tmp_path: Path, reference: dict[str, torch.Tensor]) -> None:
    step = random.Random(CAMPAIGN_SEED).randint(EVERY + 1, LAST_KILL_STEP)
    with Run(tmp_path) as run:
        run.kill_at(f"step {step}")
        assert_all_bit_identical(run.finish(), reference)


def test_kill_right_after_a_save_started(
    tmp_path: Path, reference: dict[str, torch.Tensor]
) -> None:
    with Run(tmp_path) as run:
        run.kill_at(f"saving {2 * EVERY}")
        assert_all_bit_identical(run.finish(), reference)


def test_kill_while_save_data_is_half_written(
    tmp_path: Path, reference: dict[str, torch.Tensor]
) -> None:
    torn = 3 * EVERY
    with Run(tmp_path) as run:
        listing = run.kill_at(
            f"hang data {torn}",
            f"committed {torn - EVERY}",
            extra=["--hang-step", str(torn), "--hang-phase", "data"],
        )
        assert torn in listing.uncommitted, listing  # the torn prefix is on disk ...
        assert listing.newest == torn - EVERY, listing  # ... and restore must not pick it
        assert_all_bit_identical(run.finish(), reference)


def test_kill_before_any_checkpoint(tmp_path: Path, reference: dict[str, torch.Tensor]) -> None:
    with Run(tmp_path) as run:
        # The first save freezes before its manifest: nothing commits before the kill lands.
        listing = run.kill_at(
            f"step {EVERY - 1}", extra=["--hang-step", str(EVERY), "--hang-phase", "commit"]
        )
        assert listing.committed == (), listing
        assert_all_bit_identical(run.finish(), reference)


def test_kill_twice_in_one_run(tmp_path: Path, reference: dict[str, torch.Tensor]) -> None:
    torn = 2 * EVERY
    step = random.Random(CAMPAIGN_SEED + 1).randint(torn + 1, LAST_KILL_STEP)
    with Run(tmp_path) as run:
        # First: the data of step 2K is durable, its manifest is not written yet.
        listing = run.kill_at(
            f"hang commit {torn}",
            f"committed {torn - EVERY}",
            extra=["--hang-step", str(torn), "--hang-phase", "commit"],
        )
        assert torn in listing.uncommitted and listing.newest == torn - EVERY, listing
        # Second: resumed from step K, it dies again at a random later step.
        listing = run.kill_at(f"step {step}")
        assert listing.newest is not None and listing.newest >= torn - EVERY, listing
        assert_all_bit_identical(run.finish(), reference)


def _campaign_point(rng: random.Random) -> str:
    """A kill marker: a random step, the start of a save, or the moment right after a commit."""
    kind = rng.choice(("step", "step", "saving", "committed"))
    if kind == "step":
        return f"step {rng.randint(1, LAST_KILL_STEP)}"
    return f"{kind} {EVERY * rng.randint(1, LAST_KILL_STEP // EVERY)}"


@pytest.mark.timeout(1800)
def test_random_kill_campaign(
    tmp_path: Path, reference: dict[str, torch.Tensor], full: bool
) -> None:
    """Many random kill points (20 with --full, 1 otherwise), each on a fresh root."""
    rng = random.Random(CAMPAIGN_SEED + 2)
    points = [_campaign_point(rng) for _ in range(20 if full else 1)]
    for i, marker in enumerate(points):
        slow_ms = rng.choice((0.0, SLOW_SAVE_MS, 40.0))
        (tmp_path / f"kill-{i}").mkdir()
        with Run(tmp_path / f"kill-{i}", slow_save_ms=slow_ms) as run:
            run.kill_at(marker)
            got = run.finish()
        try:
            assert_all_bit_identical(got, reference)
        except AssertionError as exc:
            raise AssertionError(f"kill point {i} ({marker!r}, {slow_ms} ms/write): {exc}") from exc
