"""One conformance suite for every coordinator (Redis and embedded).

Each coordinator's test class subclasses ``CoordinatorConformance`` and provides the
``spec`` fixture (how to build the coordinator, in the test process and in each rank)
and ``committed_index`` (its queryable index of committed steps). The suite checks
only what the protocol promises (DESIGN.md, "Coordinator protocol", I1 and I4):

* a commit produces exactly one manifest, written by one committer after every file it
  names is durable, carrying the one generation that every rank shares;
* a rank that dies before its report, or a committer that dies between the last report
  and the manifest, or a committer whose manifest write fails, aborts the step: every
  surviving rank gets a ``CoordinationError`` (never a hang), no manifest appears, and
  the previous committed step stays the newest and loads bit for bit.

Multi-rank cases run real gloo processes that SIGKILL themselves at the chosen stage;
each spawn covers several steps because a spawn costs seconds here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from ckpt.format import manifest_path, read_manifest, scan_steps
from storage_backends import LocalBackend, StorageBackend
from tests.coordination.harness import (
    CoordSpec,
    RankOutcome,
    RecordingBackend,
    assert_committed_once_after_data,
    assert_loads_as,
    describe,
    kill_self,
    read_log,
    save_outcome,
    spawn_ranks,
    steps_of,
)

# -- what each rank runs ------------------------------------------------------------------


def lose_a_rank(
    rank: int, world: int, spec: CoordSpec, root: str, log_path: str, scenario: str
) -> dict[str, Any]:
    """Step 1 commits on every rank; then one participant is lost.

    Scenarios:
        ``reporter``: at step 2 the last rank dies with its data durable, before it
            reports (at the entry of ``commit``).
        ``committer``: at step 2 rank 0's manifest write fails (a storage error); at
            step 3 rank 0 dies after every report arrived, just before the manifest.
    """
    coordinator = spec.make()
    committer_lost = scenario == "committer" and rank == 0
    backend = RecordingBackend(
        LocalBackend(root),
        log_path=log_path,
        rank=rank,
        kill_at="manifest" if committer_lost else None,
        kill_step=3,
        fail_put_at=2 if committer_lost else None,  # the 2nd manifest put is step 2's
    )
    steps: dict[int, str] = {1: save_outcome(coordinator, backend, 1, rank, world)}
    if scenario == "reporter":
        if rank == world - 1:
            coordinator.commit = lambda *a, **k: kill_self()  # type: ignore[method-assign]
        steps[2] = save_outcome(coordinator, backend, 2, rank, world)
    else:
        steps[2] = save_outcome(coordinator, backend, 2, rank, world)
        steps[3] = save_outcome(coordinator, backend, 3, rank, world)
    coordinator.close()
    return {"generation": coordinator.generation, "steps": steps}


def save_again_after_abort(
    rank: int, world: int, spec: CoordSpec, root: str, log_path: str
) -> dict[str, Any]:
    """Step 1 commits; step 2's manifest write fails on rank 0 (the step aborts on every
    rank); the same incarnation saves step 2 again."""
    coordinator = spec.make()
    backend = RecordingBackend(
        LocalBackend(root), log_path=log_path, rank=rank, fail_put_at=2 if rank == 0 else None
    )
    outcomes = [save_outcome(coordinator, backend, step, rank, world) for step in (1, 2, 2)]
    coordinator.close()
    return {"generation": coordinator.generation, "outcomes": outcomes}


# Kill campaign: (world, victim rank, stage of step 2). Stages, in the order a save runs:
# "data-write" (its data is not durable), "report" (data durable, not reported),
# "after-report" (reported, then dead), "manifest" (the committer, every report in, no
# manifest yet), "after-manifest" (the committer, manifest durable, nothing after it).
KILL_CAMPAIGN = [
    *[
        (4, victim, stage)
        for victim in (1, 3)
        for stage in ("data-write", "report", "after-report")
    ],
    *[(4, 0, stage) for stage in ("data-write", "report", "manifest", "after-manifest")],
    (2, 1, "after-report"),
    (3, 0, "after-manifest"),
]
KILL_CAMPAIGN_REDUCED = [(4, 0, "after-manifest")]
# Where the stage decides the outcome of step 2 (True: committed). "after-report" may
# go either way: a survivor can give up on the dead rank while the committer commits.
KILL_OUTCOME = {"data-write": False, "report": False, "manifest": False, "after-manifest": True}


def kill_at_stage(
    rank: int, world: int, spec: CoordSpec, root: str, log_path: str, victim: int, stage: str
) -> dict[str, Any]:
    """Step 1 commits; at step 2 rank ``victim`` is SIGKILLed at ``stage``."""
    coordinator: Any = spec.make()
    backend_stage = None
    if rank == victim and stage in ("data-write", "manifest", "after-manifest"):
        backend_stage = stage
    elif rank == victim and stage == "after-report" and spec.kind == "embedded":
        backend_stage = "index-durable"  # the embedded report is the shard index file
    backend = RecordingBackend(
        LocalBackend(root), log_path=log_path, rank=rank, kill_at=backend_stage, kill_step=2
    )
    steps = {1: save_outcome(coordinator, backend, 1, rank, world)}
    if rank == victim and stage == "report":
        coordinator.commit = lambda *a, **k: kill_self()
    elif rank == victim and stage == "after-report" and spec.kind == "redis":
        report = coordinator.report

        def report_then_die(step: int, index_json: bytes) -> int:
            report(step, index_json)
            kill_self()
            raise AssertionError("unreachable")

        coordinator.report = report_then_die
    steps[2] = save_outcome(coordinator, backend, 2, rank, world)
    coordinator.close()
    return {"generation": coordinator.generation, "steps": steps}


class CoordinatorConformance:
    """Behaviour every coordinator must show. Subclass it; provide ``spec`` and ``committed_index``."""

    @pytest.fixture
    def spec(self) -> CoordSpec:
        """How to build the coordinator under test (short timeouts)."""
        raise NotImplementedError("subclasses return the coordinator's spec")

    def committed_index(self, spec: CoordSpec, backend: StorageBackend) -> list[int]:
        """Committed steps, newest first, as the coordinator's index reports them after a restart."""
        raise NotImplementedError

    # -- one process ---------------------------------------------------------------------

    def test_commit_writes_one_manifest_after_the_data(
        self, spec: CoordSpec, backend: StorageBackend, tmp_path: Path
    ) -> None:
        """Single process: each save commits exactly one manifest, after its data is durable,
        stamped with the coordinator's generation; the newest loads and the index lists both."""
        log = tmp_path / "writes.jsonl"
        recording = RecordingBackend(backend, log_path=str(log), rank=0)
        coordinator = spec.make()
        try:
            for step in (1, 2):
                assert save_outcome(coordinator, recording, step, 0, 1) == "committed"
                record = assert_committed_once_after_data(log, step, 1)
                assert record["generation"] == coordinator.generation
                assert read_manifest(backend, step).generation == coordinator.generation
        finally:
            coordinator.close()
        assert_loads_as(backend, 1, 2)
        assert self.committed_index(spec, backend) == [2, 1]

    def test_failed_manifest_write_keeps_the_previous_checkpoint(
        self, spec: CoordSpec, backend: StorageBackend, tmp_path: Path
    ) -> None:
        """Single process: a manifest write that fails aborts that step only; the previous
        step stays the newest and loads, and the next step commits normally."""
        faulty = RecordingBackend(
            backend, log_path=str(tmp_path / "writes.jsonl"), rank=0, fail_put_at=2
        )
        coordinator = spec.make()
        try:
            assert save_outcome(coordinator, faulty, 1, 0, 1) == "committed"
            outcome = save_outcome(coordinator, faulty, 2, 0, 1)
            assert outcome.startswith("StorageError") and "injected fault" in outcome
            assert not backend.exists(manifest_path(2))
            assert_loads_as(backend, 1, 1)
            assert save_outcome(coordinator, faulty, 3, 0, 1) == "committed"
        finally:
            coordinator.close()
        assert scan_steps(backend).committed == (1, 3)
        assert self.committed_index(spec, backend) == [3, 1]

    # -- real ranks ------------------------------------------------------------------------

    def test_rank_killed_before_its_report_aborts_the_step(
        self, spec: CoordSpec, backend: StorageBackend, root: Path, tmp_path: Path
    ) -> None:
        """3 gloo ranks: step 1 commits once, after every rank's data, under one shared
        generation. At step 2 rank 2 is SIGKILLed with its data durable but unreported:
        ranks 0 and 1 get a CoordinationError (no hang), step 2 has no manifest, and
        step 1 stays the newest, loads, and heads the index."""
        log = tmp_path / "writes.jsonl"
        outcomes = spawn_ranks(lose_a_rank, 3, spec, str(root), str(log), "reporter")
        assert outcomes[2].killed, describe(outcomes)
        record = assert_committed_once_after_data(log, 1, 3)
        for survivor in outcomes[:2]:
            steps = steps_of(survivor)
            assert steps["1"] == "committed"
            assert steps["2"].startswith("CoordinationError"), steps["2"]
            assert survivor.value["generation"] == record["generation"]
        assert not backend.exists(manifest_path(2))
        assert scan_steps(backend).committed == (1,)
        assert_loads_as(backend, 3, 1)
        assert self.committed_index(spec, backend) == [1]

    def test_committer_lost_before_the_manifest_aborts_the_step(
        self, spec: CoordSpec, backend: StorageBackend, root: Path, tmp_path: Path
    ) -> None:
        """2 gloo ranks: step 1 commits. At step 2 the committer's manifest write fails:
        it gets the StorageError and the other rank a CoordinationError saying so. At step
        3 the committer is SIGKILLed after the last report, before the manifest: the other
        rank gets a CoordinationError (no hang). Step 1 stays the newest and loads."""
        log = tmp_path / "writes.jsonl"
        outcomes = spawn_ranks(lose_a_rank, 2, spec, str(root), str(log), "committer")
        assert outcomes[0].killed, describe(outcomes)
        assert_committed_once_after_data(log, 1, 2)
        steps = steps_of(outcomes[1])
        assert steps["1"] == "committed"
        assert steps["2"].startswith("CoordinationError") and "could not publish" in steps["2"], (
            steps["2"]
        )
        assert steps["3"].startswith("CoordinationError"), steps["3"]
        # Rank 0 got as far as the manifest of step 3, so every report had arrived.
        starts = [e for e in read_log(log) if e["op"] == "manifest-start" and e["step"] == 3]
        assert len(starts) == 1 and starts[0]["missing"] == []
        for step in (2, 3):
            assert not backend.exists(manifest_path(step))
        assert scan_steps(backend).committed == (1,)
        assert_loads_as(backend, 2, 1)
        assert self.committed_index(spec, backend) == [1]

    def test_a_step_aborted_before_its_manifest_can_be_saved_again(
        self, spec: CoordSpec, backend: StorageBackend, root: Path, tmp_path: Path
    ) -> None:
        """2 gloo ranks: step 2 aborts (the committer's manifest write fails); saving step 2
        again in the same incarnation (e.g. the final save on SIGTERM) commits on both
        ranks, and step 2 then loads as the newest."""
        log = tmp_path / "writes.jsonl"
        outcomes = spawn_ranks(save_again_after_abort, 2, spec, str(root), str(log))
        for outcome in outcomes:
            first, aborted, again = outcome.value["outcomes"]
            assert first == "committed", describe(outcomes)
            assert aborted != "committed", describe(outcomes)
            assert again == "committed", describe(outcomes)
        assert scan_steps(backend).committed == (1, 2)
        assert_loads_as(backend, 2, 2)
        assert self.committed_index(spec, backend) == [2, 1]

    def test_kill_campaign(self, spec: CoordSpec, tmp_path: Path, full: bool) -> None:
        """Ranks SIGKILLed at every stage of a save (one case by default, all with --full):
        survivors always return; a step commits only with every rank's data durable, its
        one manifest written last; a survivor that says "committed" is right; otherwise the
        previous step stays the newest and loads."""
        for i, (world, victim, stage) in enumerate(
            KILL_CAMPAIGN if full else KILL_CAMPAIGN_REDUCED
        ):
            case = f"world {world}, rank {victim} killed at {stage}"
            root = tmp_path / f"case-{i}"
            root.mkdir()
            log = tmp_path / f"case-{i}.jsonl"
            case_spec = dataclasses.replace(spec, job=f"{spec.job}-{i}")
            outcomes = spawn_ranks(
                kill_at_stage, world, case_spec, str(root), str(log), victim, stage
            )
            try:
                self._check_kill_case(outcomes, LocalBackend(root), log, world, victim, stage)
            except AssertionError as exc:
                raise AssertionError(f"{case}: {exc}\n{describe(outcomes)}") from exc

    @staticmethod
    def _check_kill_case(
        outcomes: list[RankOutcome],
        backend: StorageBackend,
        log: Path,
        world: int,
        victim: int,
        stage: str,
    ) -> None:
        assert outcomes[victim].killed
        assert_committed_once_after_data(log, 1, world)
        committed = backend.exists(manifest_path(2))
        if stage in KILL_OUTCOME:
            assert committed == KILL_OUTCOME[stage]
        for survivor in (o for o in outcomes if o.rank != victim):
            steps = steps_of(survivor)
            assert steps["1"] == "committed"
            if committed and stage in KILL_OUTCOME:
                assert steps["2"] == "committed"
            elif not committed:
                assert steps["2"].startswith("CoordinationError"), steps["2"]
        if committed:
            assert_committed_once_after_data(log, 2, world)
            assert_loads_as(backend, world, 2)
        else:
            assert scan_steps(backend).committed == (1,)
            assert_loads_as(backend, world, 1)
