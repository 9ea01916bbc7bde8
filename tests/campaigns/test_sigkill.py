"""SIGKILL campaign: savers and gc killed between any two storage operations, and at random.

Each scenario kills its operation at every gap between two storage calls (a
``KillingBackend`` SIGKILLs the process before, or half-way through, its k-th call; a dry
run counts the calls, so k enumerates every gap), and after random delays:

* ``save``, ``async_save``: 1 rank saving step 2 over a committed step 1 (``ckpt.save``;
  ``ckpt.async_save`` with the tensors changed right after staging);
* ``manager``: a ``CheckpointManager`` loop saving 5 steps with ``keep_last=2``;
* ``ranks4``: a 4-rank gloo job saving step 2: rank 3 killed (a non-committer), rank 0
  killed (the committer), the whole job killed at once (the survivors of a single kill
  are killed a moment later, as a launcher does);
* ``gc``: ``ckpt gc --keep-last 2`` (``apply_retention``) over 5 committed steps and 2
  abandoned ones.

After each kill, in fresh processes: every committed manifest's files exist with their
sizes and checksums; restore gives the newest committed step, which is the previous step
or the new one, bit for bit (``torn`` and ``wrong_restore`` count failures); saving the
killed step's number again and the next one works (``save_failed``); gc then leaves no
garbage in older steps (``garbage``: abandoned prefixes; ``stale_files``: files no
manifest names in committed steps, after `ckpt gc --abandoned-after 0`); nothing
outside the root changed (``outside``); nothing raised an exception that is not a
``CheckpointError`` (``escapes``) or hung (``hangs``).

One driver process (``tests/support/workers/sigkill.py``) runs every trial by forking, so
torch is imported once. Reduced counts in CI; ``--full`` enumerates every kill point and
adds more random kills (``scripts/campaigns.sh --full -k sigkill``).
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
import torch

import ckpt
from ckpt.retention import RetentionPolicy, apply_retention
from storage_backends import LocalBackend
from tests.support.campaign import CampaignTable
from tests.support.faulty import FaultyBackend
from tests.support.leftovers import unnamed_files
from tests.support.workers import REPO_ROOT


@dataclass(frozen=True)
class Plan:
    """One scenario's row in the table and its counts: without --full, ``sample`` of the
    enumerated kill points (per kind of kill in ``ranks4``) and ``random`` random kills;
    with --full every kill point and ``full_random`` random kills."""

    name: str
    seed: int
    sample: int
    random: int
    full_random: int


PLANS = {
    "save": Plan("sigkill: 1 rank, ckpt.save", 11, 4, 1, 90),
    "async_save": Plan("sigkill: 1 rank, ckpt.async_save", 12, 4, 1, 90),
    "manager": Plan("sigkill: 1 rank, CheckpointManager loop, keep_last=2", 13, 4, 1, 40),
    "ranks4": Plan("sigkill: 4 ranks (rank 3 / rank 0 / whole job)", 14, 1, 1, 30),
    "gc": Plan("sigkill: ckpt gc --keep-last 2", 15, 4, 1, 40),
}
# Figures that must be 0.
MUST_BE_ZERO = (
    "stale_files",
    "torn",
    "wrong_restore",
    "escapes",
    "save_failed",
    "garbage",
    "outside",
    "hangs",
)
REPLY_TIMEOUT_S = 1800.0


class Driver:
    """The campaign driver process: one JSON request per line in, one JSON reply out."""

    def __init__(self, log: Path) -> None:
        self.log = log
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        self._stderr = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.workers.sigkill"],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )

    def run(self, scenario: str, where: Path, plan: Plan, full: bool) -> dict[str, Any]:
        request = {
            "scenario": scenario,
            "dir": str(where),
            "seed": plan.seed,
            "sample": None if full else plan.sample,
            "random": plan.full_random if full else plan.random,
        }
        stdin, stdout = self._pipes()
        stdin.write((json.dumps(request) + "\n").encode())
        stdin.flush()
        line = self._read_line(stdout, REPLY_TIMEOUT_S)
        reply: dict[str, Any] = json.loads(line)
        return reply

    def _pipes(self) -> tuple[IO[bytes], IO[bytes]]:
        if self.proc.stdin is None or self.proc.stdout is None:
            raise RuntimeError("the driver has no pipes")
        return self.proc.stdin, self.proc.stdout

    def _read_line(self, stdout: IO[bytes], timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if sel.select(timeout=1.0):
                    line = stdout.readline()
                    if not line:
                        break
                    return line
                if self.proc.poll() is not None:
                    break
        raise AssertionError(f"the campaign driver gave no answer:\n{self.stderr_tail()}")

    def stderr_tail(self) -> str:
        self._stderr.flush()
        return self.log.read_text(errors="replace")[-4000:]

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Driver]:
    d = Driver(tmp_path_factory.mktemp("sigkill") / "driver.log")
    yield d
    d.close()


@pytest.mark.campaign
@pytest.mark.timeout(REPLY_TIMEOUT_S + 60)
@pytest.mark.parametrize("scenario", list(PLANS))
def test_sigkill(
    scenario: str,
    driver: Driver,
    campaign_table: CampaignTable,
    full: bool,
    tmp_path: Path,
) -> None:
    plan = PLANS[scenario]
    reply = driver.run(scenario, tmp_path, plan, full)
    figures = reply["figures"]
    campaign_table.record(plan.name, **figures, seconds=reply["seconds"])
    wrong = {k: figures[k] for k in MUST_BE_ZERO if figures[k]}
    assert figures["trials"] > 0
    assert not wrong, f"{wrong} (seed {plan.seed})\n" + "\n".join(reply["failures"])


# ----------------------------------------------------------------- defects the campaign found


def _state(step: int) -> dict[str, Any]:
    return {"w": torch.full((64,), float(step)), "meta": {"step": step}}


def test_gc_removes_a_dead_attempts_files_from_a_step_saved_again(root: Path) -> None:
    ckpt.save(_state(1), root, step=1)
    # A save whose data files are durable but whose manifest never came: the storage a
    # SIGKILL right before the commit leaves (the campaign's "kill before storage call 5").
    with pytest.raises(ckpt.CheckpointError):
        ckpt.save(_state(2), FaultyBackend(LocalBackend(root), fail_put_at=1), step=2)
    ckpt.save(_state(2), root, step=2)  # the job comes back and saves step 2 again
    ckpt.save(_state(3), root, step=3)
    # What `ckpt gc --abandoned-after 0` does once no writer is alive.
    apply_retention(
        LocalBackend(root), RetentionPolicy(keep_last=None, abandoned_after=0), remove_stale=True
    )
    assert unnamed_files(root, 2) == []


def test_a_save_refused_as_already_committed_leaves_no_files(root: Path) -> None:
    ckpt.save(_state(2), root, step=2)
    with pytest.raises(ckpt.AlreadyCommittedError, match="already committed"):
        ckpt.save(_state(2), root, step=2)
    assert unnamed_files(root, 2) == []
